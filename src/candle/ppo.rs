//! The PPO / GRPO policy loss on candle tensors, with candle autograd.

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Storage, Tensor, bail};

use super::storage::{cpu_side, flat, guard, per_row, tensor};
use super::to_candle;
use crate::PolicyLossOutputs;
use crate::cpu::{self};
use crate::{PolicyLossInputs, PolicyLossOptions, PolicyLossStats, RowShape};

/// The constant inputs of [`policy_loss`], each `[B, T]` like `logp` (f32; the mask `u8`).
#[derive(Debug, Clone, Copy)]
pub struct PolicyTensors<'a> {
    /// `log π_old(y_t)` from the rollout.
    pub old_logp: &'a Tensor,
    /// Advantages per token.
    pub advantages: &'a Tensor,
    /// Response mask (`u8`, 0 = padding); `None`: every token counts.
    pub mask: Option<&'a Tensor>,
    /// Per-token entropies for the bonus `−c_H·H` (differentiable: the bonus's gradient flows
    /// into them) and the entropy statistic.
    pub entropy: Option<&'a Tensor>,
}

impl<'a> PolicyTensors<'a> {
    /// The two required inputs.
    pub fn new(old_logp: &'a Tensor, advantages: &'a Tensor) -> Self {
        PolicyTensors { old_logp, advantages, mask: None, entropy: None }
    }
    /// Adds the response mask.
    pub fn mask(self, mask: &'a Tensor) -> Self {
        PolicyTensors { mask: Some(mask), ..self }
    }
    /// Adds the entropies (for the bonus).
    pub fn entropy(self, entropy: &'a Tensor) -> Self {
        PolicyTensors { entropy: Some(entropy), ..self }
    }
}

/// [`policy_loss`]'s result.
#[derive(Debug, Clone)]
pub struct PolicyLoss {
    /// The scalar `policy_loss − c_H·entropy_loss` (f32, shape `[]`), differentiable in
    /// `logp` and the entropies.
    pub loss: Tensor,
    /// Clip fractions, approximate KL, ratio range, the loss's parts: from the same pass.
    pub stats: PolicyLossStats,
}

/// The policy loss of `opts.objective` (clipped surrogate with asymmetric and dual clip,
/// PPO-KL, GSPO, CISPO, SAPO or GMPO) over a `[B, T]` batch of `logp = log π(y_t)` (f32), aggregated as
/// `opts.aggregation` says with `opts.normaliser`, plus the entropy bonus; per token, for the
/// clipped surrogate, `L = max(−A·r, −A·clip(r, 1 − ε_low, 1 + ε_high))` with
/// `r = exp(logp − old_logp)`.
///
/// `loss.backward()` gives `∂loss/∂logp` (and `∂loss/∂H` with entropies), which then flows on
/// through e.g. [`token_logprobs`](super::token_logprobs) into the logits. The statistics are
/// read to the host (on the GPU that waits for the kernels).
///
/// ```
/// use candle_core::{Device, Tensor, Var};
/// use rlhf_kernels::{PolicyLossOptions, PolicyObjective};
/// use rlhf_kernels::candle::{PolicyTensors, policy_loss};
/// let dev = Device::Cpu;
/// let logp = Var::new(&[[-1.0f32, -2.0], [-0.5, -0.1]], &dev)?;
/// let old = Tensor::new(&[[-1.0f32, -2.0], [-0.5, -0.1]], &dev)?;
/// let adv = Tensor::new(&[[1.0f32, 1.0], [-1.0, -1.0]], &dev)?;
/// let opts = PolicyLossOptions::new(PolicyObjective::Clip);
/// let out = policy_loss(&logp, &PolicyTensors::new(&old, &adv), &opts)?;
/// assert_eq!(out.stats.clip_fraction_low + out.stats.clip_fraction_high, 0.0);
/// let grads = out.loss.backward()?;
/// assert_eq!(grads.get(&logp).unwrap().dims(), &[2, 2]);
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn policy_loss(
    logp: &Tensor,
    inputs: &PolicyTensors<'_>,
    opts: &PolicyLossOptions,
) -> Result<PolicyLoss> {
    let dims = logp.dims().to_vec();
    if dims.len() != 2 {
        bail!("logp: shape {dims:?}, expected [B, T]")
    }
    let logp = per_row(logp, &dims, logp, &[DType::F32], "logp")?;
    let core = Core {
        opts: *opts,
        shape: RowShape::new(dims[0], dims[1]),
        old_logp: per_row(inputs.old_logp, &dims, &logp, &[DType::F32], "old_logp")?,
        advantages: per_row(inputs.advantages, &dims, &logp, &[DType::F32], "advantages")?,
        mask: inputs.mask.map(|m| per_row(m, &dims, &logp, &[DType::U8], "mask")).transpose()?,
        stats: Arc::default(),
    };
    let stats = core.stats.clone();
    let loss = match inputs.entropy {
        Some(h) => logp.apply_op2(&per_row(h, &dims, &logp, &[DType::F32], "entropy")?, WithEntropy(core))?,
        None => logp.apply_op1(WithoutEntropy(core))?,
    };
    let stats = stats.lock().unwrap_or_else(|e| e.into_inner()).take();
    let Some(stats) = stats else { bail!("policy_loss: the forward left no statistics") };
    Ok(PolicyLoss { loss, stats })
}

/// What both ops share: the options, the constant inputs and a slot for the forward's
/// statistics.
struct Core {
    opts: PolicyLossOptions,
    shape: RowShape,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Option<Tensor>,
    stats: Arc<Mutex<Option<PolicyLossStats>>>,
}

/// The gradient buffers a backward asks for.
type CpuGrads<'a> = (&'a mut [f32], Option<&'a mut [f32]>);

impl Core {
    fn cpu(
        &self,
        (logp, ll): (&CpuStorage, &Layout),
        entropy: Option<(&CpuStorage, &Layout)>,
        grads: Option<CpuGrads<'_>>,
    ) -> Result<PolicyLossStats> {
        let n = self.shape.len();
        let (og, ol) = self.old_logp.storage_and_layout();
        let (ag, al) = self.advantages.storage_and_layout();
        let mask_guard = guard(self.mask.as_ref());
        let (Storage::Cpu(old), Storage::Cpu(adv)) = (&*og, &*ag) else {
            bail!("policy_loss: old_logp and advantages on another device than logp")
        };
        let mut inputs = PolicyLossInputs::new(
            self.shape,
            flat::<f32>(logp, ll, n, "logp")?,
            flat::<f32>(old, ol, n, "old_logp")?,
            flat::<f32>(adv, al, n, "advantages")?,
        );
        if let Some(m) = cpu_side::<u8>(&mask_guard, n, "mask")? {
            inputs = inputs.mask(m);
        }
        if let Some((h, hl)) = entropy {
            inputs = inputs.entropy(flat::<f32>(h, hl, n, "entropy")?);
        }
        let out = match grads {
            Some((grad_logp, grad_entropy)) => {
                PolicyLossOutputs { grad_logp: Some(grad_logp), grad_entropy, ..Default::default() }
            }
            None => PolicyLossOutputs::default(),
        };
        cpu::policy_loss(&inputs, out, &self.opts).map_err(to_candle)
    }

    fn forward_cpu(
        &self,
        logp: (&CpuStorage, &Layout),
        entropy: Option<(&CpuStorage, &Layout)>,
    ) -> Result<CpuStorage> {
        let stats = self.cpu(logp, entropy, None)?;
        *self.stats.lock().unwrap_or_else(|e| e.into_inner()) = Some(stats);
        Ok(CpuStorage::F32(vec![stats.loss as f32]))
    }

    /// `(∂loss/∂logp, ∂loss/∂H)` scaled by the upstream gradient `grad` (a scalar).
    fn backward(
        &self,
        logp: &Tensor,
        entropy: Option<&Tensor>,
        grad: &Tensor,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let (ls, ll) = logp.storage_and_layout();
        let entropy_guard = entropy.map(|h| h.storage_and_layout());
        let (grad_logp, grad_entropy) = match &*ls {
            Storage::Cpu(l) => {
                let h = match &entropy_guard {
                    Some((guard, layout)) => match &**guard {
                        Storage::Cpu(h) => Some((h, *layout)),
                        _ => bail!("entropy: on another device than logp"),
                    },
                    None => None,
                };
                let n = self.shape.len();
                let (mut gl, mut gh) = (vec![0f32; n], vec![0f32; if h.is_some() { n } else { 0 }]);
                self.cpu((l, ll), h, Some((&mut gl, h.map(|_| &mut gh[..]))))?;
                let gh = h.map(|_| tensor(Storage::Cpu(CpuStorage::F32(gh)), self.shape_dims()));
                (tensor(Storage::Cpu(CpuStorage::F32(gl)), self.shape_dims()), gh)
            }
            #[cfg(feature = "candle-cuda")]
            Storage::Cuda(l) => {
                let h = match &entropy_guard {
                    Some((guard, layout)) => match &**guard {
                        Storage::Cuda(h) => Some((h, *layout)),
                        _ => bail!("entropy: on another device than logp"),
                    },
                    None => None,
                };
                gpu::backward(self, (l, ll), h)?
            }
            _ => bail!("policy_loss: unsupported device"),
        };
        drop((ls, entropy_guard));
        let grad_logp = grad_logp.broadcast_mul(grad)?;
        let grad_entropy = grad_entropy.map(|g| g.broadcast_mul(grad)).transpose()?;
        Ok((grad_logp, grad_entropy))
    }

    fn shape_dims(&self) -> (usize, usize) {
        (self.shape.rows, self.shape.cols)
    }
}

/// The loss without entropies: differentiable in `logp`.
struct WithoutEntropy(Core);

/// The loss with the entropy bonus: differentiable in `logp` and the entropies.
struct WithEntropy(Core);

impl CustomOp1 for WithoutEntropy {
    fn name(&self) -> &'static str {
        "rlhf-kernels-policy-loss"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        Ok((self.0.forward_cpu((s, l), None)?, Shape::from(())))
    }

    #[cfg(feature = "candle-cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        Ok((gpu::forward(&self.0, (s, l), None)?, Shape::from(())))
    }

    fn bwd(&self, logp: &Tensor, _loss: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(self.0.backward(logp, None, grad)?.0))
    }
}

impl CustomOp2 for WithEntropy {
    fn name(&self) -> &'static str {
        "rlhf-kernels-policy-loss-entropy"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        Ok((self.0.forward_cpu((s1, l1), Some((s2, l2)))?, Shape::from(())))
    }

    #[cfg(feature = "candle-cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        Ok((gpu::forward(&self.0, (s1, l1), Some((s2, l2)))?, Shape::from(())))
    }

    fn bwd(
        &self,
        logp: &Tensor,
        entropy: &Tensor,
        _loss: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (grad_logp, grad_entropy) = self.0.backward(logp, Some(entropy), grad)?;
        Ok((Some(grad_logp), grad_entropy))
    }
}

#[cfg(feature = "candle-cuda")]
mod gpu {
    use candle_core::cuda_backend::CudaStorage;
    use candle_core::{Layout, Result, Storage, Tensor, bail};

    use super::super::storage::{check, cuda_side, flat_view, guard, stream_of, tensor};
    use super::super::to_candle;
    use super::Core;
    use crate::cuda::{self, DeviceStats};
    use crate::{PolicyLossInputs, PolicyLossOutputs, PolicyLossStats};

    /// Runs the loss on the GPU; with `grads`, writes `∂loss/∂logp` (and `∂loss/∂H`).
    fn run(
        core: &Core,
        (logp, ll): (&CudaStorage, &Layout),
        entropy: Option<(&CudaStorage, &Layout)>,
        grads: Option<(&mut cudarc::driver::CudaSlice<f32>, Option<&mut cudarc::driver::CudaSlice<f32>>)>,
    ) -> Result<PolicyLossStats> {
        let n = core.shape.len();
        let (stream, mut ctx) = stream_of(logp)?;
        let (og, ol) = core.old_logp.storage_and_layout();
        let (ag, al) = core.advantages.storage_and_layout();
        let mask_guard = guard(core.mask.as_ref());
        let (Storage::Cuda(old), Storage::Cuda(adv)) = (&*og, &*ag) else {
            bail!("policy_loss: old_logp and advantages on another device than logp")
        };
        let mask =
            cuda_side(&mask_guard, "mask")?.map(|(m, l)| flat_view::<u8>(m, l, n, "mask")).transpose()?;
        let inputs = PolicyLossInputs {
            shape: core.shape,
            logp: flat_view::<f32>(logp, ll, n, "logp")?,
            old_logp: flat_view::<f32>(old, ol, n, "old_logp")?,
            advantages: flat_view::<f32>(adv, al, n, "advantages")?,
            mask,
            entropy: entropy.map(|(h, hl)| flat_view::<f32>(h, hl, n, "entropy")).transpose()?,
        };
        let mut stats = DeviceStats::<PolicyLossStats>::new(&stream).map_err(to_candle)?;
        let (grad_logp, grad_entropy) = match grads {
            Some((gl, gh)) => (Some(gl.slice_mut(..)), gh.map(|g| g.slice_mut(..))),
            None => (None, None),
        };
        let out =
            PolicyLossOutputs { grad_logp, grad_entropy, stats: Some(&mut stats), ..Default::default() };
        cuda::policy_loss(&mut ctx, &inputs, out, &core.opts).map_err(to_candle)?;
        check(ctx)?;
        stats.read(&stream).map_err(to_candle)
    }

    pub(super) fn forward(
        core: &Core,
        logp: (&CudaStorage, &Layout),
        entropy: Option<(&CudaStorage, &Layout)>,
    ) -> Result<CudaStorage> {
        let stats = run(core, logp, entropy, None)?;
        *core.stats.lock().unwrap_or_else(|e| e.into_inner()) = Some(stats);
        let loss = logp.0.device.cuda_stream().clone_htod(&[stats.loss as f32]).map_err(|e| {
            candle_core::Error::msg(format!("policy_loss: copying the loss to the device: {e:?}"))
        })?;
        Ok(CudaStorage::wrap_cuda_slice(loss, logp.0.device.clone()))
    }

    pub(super) fn backward(
        core: &Core,
        logp: (&CudaStorage, &Layout),
        entropy: Option<(&CudaStorage, &Layout)>,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let dev = &logp.0.device;
        let n = core.shape.len();
        let mut gl = dev.alloc_zeros::<f32>(n)?;
        let mut gh = entropy.map(|_| dev.alloc_zeros::<f32>(n)).transpose()?;
        run(core, logp, entropy, Some((&mut gl, gh.as_mut())))?;
        let wrap = |g| tensor(Storage::Cuda(CudaStorage::wrap_cuda_slice(g, dev.clone())), core.shape_dims());
        Ok((wrap(gl), gh.map(wrap)))
    }
}
