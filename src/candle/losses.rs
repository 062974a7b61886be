//! The loss terms beside the policy loss on candle tensors: the sampled KL estimators (with
//! candle autograd), KL-in-reward shaping and the clipped value loss (with candle autograd).

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Result, Shape, Storage, Tensor, bail};

use super::storage::{cpu_side, flat, guard, per_row, tensor};
use super::to_candle;
use crate::cpu;
use crate::{
    KlRewardsInputs, KlRewardsOptions, RowShape, SampledKlInputs, SampledKlOptions, SampledKlOutputs,
    SampledKlStats, ValueLossInputs, ValueLossOptions, ValueLossOutputs, ValueLossStats,
};

/// The `[B, T]` dims of a batch tensor.
pub(super) fn batch_dims(t: &Tensor, what: &'static str) -> Result<Vec<usize>> {
    let dims = t.dims().to_vec();
    if dims.len() != 2 {
        bail!("{what}: shape {dims:?}, expected [B, T]")
    }
    Ok(dims)
}

/// A slot an op's forward fills (its statistics and side outputs) for the caller to take.
type Slot<T> = Arc<Mutex<Option<T>>>;

fn take<T>(slot: &Slot<T>, what: &str) -> Result<T> {
    match slot.lock().unwrap_or_else(|e| e.into_inner()).take() {
        Some(v) => Ok(v),
        None => bail!("{what}: the forward left no statistics"),
    }
}

fn put<T>(slot: &Slot<T>, v: T) {
    *slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(v);
}

/// [`sampled_kl`]'s result.
#[derive(Debug, Clone)]
pub struct SampledKl {
    /// `coef·aggregate(k)` (f32, shape `[]`), differentiable in `logp`.
    pub loss: Tensor,
    /// The chosen estimator per token, `[B, T]` f32, 0 at padding (no gradient).
    pub values: Tensor,
    /// Every estimator aggregated as the loss is, the clamped fraction and the counts.
    pub stats: SampledKlStats,
}

/// The constant inputs of [`sampled_kl`], each `[B, T]` like `logp` (f32; the mask `u8`).
#[derive(Debug, Clone, Copy)]
pub struct KlTensors<'a> {
    /// `log π_ref(y_t)`.
    pub ref_logp: &'a Tensor,
    /// Response mask (`u8`, 0 = padding); `None`: every token counts.
    pub mask: Option<&'a Tensor>,
    /// `log π_old(y_t)` of the policy that sampled the tokens, for the bias correction
    /// ([`SampledKlOptions::bias_correction`]: given exactly when it is on).
    pub old_logp: Option<&'a Tensor>,
}

impl<'a> KlTensors<'a> {
    /// The reference's log-probs.
    pub fn new(ref_logp: &'a Tensor) -> Self {
        KlTensors { ref_logp, mask: None, old_logp: None }
    }
    /// Adds the response mask.
    pub fn mask(self, mask: &'a Tensor) -> Self {
        KlTensors { mask: Some(mask), ..self }
    }
    /// Adds the sampling policy's log-probs (bias correction).
    pub fn old_logp(self, old_logp: &'a Tensor) -> Self {
        KlTensors { old_logp: Some(old_logp), ..self }
    }
}

/// A sampled KL estimator over a `[B, T]` batch of the sampled tokens' log-probs under the
/// policy (`logp`, f32) and the reference (`inputs.ref_logp`, f32, a constant), with
/// `log r = ref_logp − logp`: `opts.estimator` per token (k1 = `−log r`, k2 = `½(log r)²`,
/// k3 = `(r − 1) − log r`, … see [`KlEstimator`](crate::KlEstimator): k1, k2, k3 and abs estimate
/// `KL[π ‖ π_ref]`, k1_rev and k3_rev `KL[π_ref ‖ π]`), clamped as `opts` says, aggregated with
/// `opts.aggregation` and scaled by `opts.coef`. `loss.backward()` gives `∂loss/∂logp` (0 where
/// a clamp is active). `inputs.mask` (`u8`, `[B, T]`) marks padding. With
/// [`SampledKlOptions::bias_correction`] each estimate is weighted by `π/π_old` from
/// `inputs.old_logp`, the weight not detached (its gradient is in `∂loss/∂logp`). The
/// statistics are read to the host (on the GPU that waits for the kernels).
///
/// ```
/// use candle_core::{Device, Tensor, Var};
/// use rlhf_kernels::candle::{KlTensors, sampled_kl};
/// use rlhf_kernels::{KlEstimator, SampledKlOptions};
/// let dev = Device::Cpu;
/// let logp = Var::new(&[[-1.0f32, -2.0]], &dev)?;
/// let ref_logp = Tensor::new(&[[-1.5f32, -2.0]], &dev)?;
/// let out = sampled_kl(&logp, &KlTensors::new(&ref_logp), &SampledKlOptions::new(KlEstimator::K1))?;
/// assert!((out.loss.to_scalar::<f32>()? - 0.25).abs() < 1e-6); // mean of −log r = (0.5 + 0)/2
/// let grads = out.loss.backward()?;
/// assert_eq!(grads.get(&logp).unwrap().to_vec2::<f32>()?, vec![vec![0.5, 0.5]]);
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn sampled_kl(logp: &Tensor, inputs: &KlTensors<'_>, opts: &SampledKlOptions) -> Result<SampledKl> {
    let dims = batch_dims(logp, "logp")?;
    opts.limits().map_err(to_candle)?;
    crate::kl::check_bias_correction(opts.bias_correction, inputs.old_logp.is_some()).map_err(to_candle)?;
    let logp = per_row(logp, &dims, logp, &[DType::F32], "logp")?;
    let constant = |t: &Tensor, dt, what| per_row(t, &dims, &logp, &[dt], what);
    let op = SampledKlOp {
        opts: *opts,
        shape: RowShape::new(dims[0], dims[1]),
        ref_logp: constant(inputs.ref_logp, DType::F32, "ref_logp")?,
        mask: inputs.mask.map(|m| constant(m, DType::U8, "mask")).transpose()?,
        old_logp: inputs.old_logp.map(|o| constant(o, DType::F32, "old_logp")).transpose()?,
        out: Arc::default(),
    };
    let slot = op.out.clone();
    let loss = logp.apply_op1(op)?;
    let (values, stats) = take(&slot, "sampled_kl")?;
    Ok(SampledKl { loss, values, stats })
}

pub(super) struct SampledKlOp {
    opts: SampledKlOptions,
    shape: RowShape,
    ref_logp: Tensor,
    mask: Option<Tensor>,
    old_logp: Option<Tensor>,
    out: Slot<(Tensor, SampledKlStats)>,
}

impl SampledKlOp {
    fn cpu(
        &self,
        (lp, ll): (&CpuStorage, &Layout),
        values: Option<&mut [f32]>,
        grad_logp: Option<&mut [f32]>,
    ) -> Result<SampledKlStats> {
        let n = self.shape.len();
        let (ref_guard, mask_guard) = (guard(Some(&self.ref_logp)), guard(self.mask.as_ref()));
        let old_guard = guard(self.old_logp.as_ref());
        let Some(r) = cpu_side::<f32>(&ref_guard, n, "ref_logp")? else { bail!("ref_logp: missing") };
        let m = cpu_side::<u8>(&mask_guard, n, "mask")?;
        let old_logp = cpu_side::<f32>(&old_guard, n, "old_logp")?;
        let out = SampledKlOutputs { values, grad_logp, ..Default::default() };
        cpu::sampled_kl(
            &SampledKlInputs {
                mask: m,
                old_logp,
                ..SampledKlInputs::new(self.shape, flat::<f32>(lp, ll, n, "logp")?, r)
            },
            out,
            &self.opts,
        )
        .map_err(to_candle)
    }

    fn dims(&self) -> (usize, usize) {
        (self.shape.rows, self.shape.cols)
    }
}

impl CustomOp1 for SampledKlOp {
    fn name(&self) -> &'static str {
        "rlhf-kernels-sampled-kl"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let mut values = vec![0f32; self.shape.len()];
        let stats = self.cpu((s, l), Some(&mut values), None)?;
        put(&self.out, (tensor(Storage::Cpu(CpuStorage::F32(values)), self.dims()), stats));
        Ok((CpuStorage::F32(vec![stats.loss as f32]), Shape::from(())))
    }

    #[cfg(feature = "candle-cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        Ok((gpu::sampled_forward(self, (s, l))?, Shape::from(())))
    }

    fn bwd(&self, logp: &Tensor, _loss: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let (ls, ll) = logp.storage_and_layout();
        let g = match &*ls {
            Storage::Cpu(l) => {
                let mut g = vec![0f32; self.shape.len()];
                self.cpu((l, ll), None, Some(&mut g))?;
                tensor(Storage::Cpu(CpuStorage::F32(g)), self.dims())
            }
            #[cfg(feature = "candle-cuda")]
            Storage::Cuda(l) => gpu::sampled_backward(self, (l, ll))?,
            _ => bail!("sampled_kl: unsupported device"),
        };
        drop(ls);
        Ok(Some(g.broadcast_mul(grad)?))
    }
}

/// KL-in-reward shaping (the InstructGPT reward): `r_t = −β·kl_t` on the valid tokens of a
/// `[B, T]` batch (`kl`, f32) plus each sequence's score (`scores`, `[B]` f32) on its last
/// valid token, 0 at padding (`mask`, `u8`). A constant: no autograd.
///
/// ```
/// use candle_core::{Device, Tensor};
/// let kl = Tensor::new(&[[0.5f32, 0.25]], &Device::Cpu)?;
/// let scores = Tensor::new(&[2.0f32], &Device::Cpu)?;
/// let r = rlhf_kernels::candle::kl_rewards(&kl, &scores, None, &rlhf_kernels::KlRewardsOptions::new(0.1))?;
/// assert_eq!(r.to_vec2::<f32>()?, vec![vec![-0.05, 1.975]]);
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn kl_rewards(
    kl: &Tensor,
    scores: &Tensor,
    mask: Option<&Tensor>,
    opts: &KlRewardsOptions,
) -> Result<Tensor> {
    let dims = batch_dims(kl, "kl")?;
    let kl = per_row(kl, &dims, kl, &[DType::F32], "kl")?;
    let scores = per_row(scores, &dims[..1], &kl, &[DType::F32], "scores")?;
    let mask = mask.map(|m| per_row(m, &dims, &kl, &[DType::U8], "mask")).transpose()?;
    let shape = RowShape::new(dims[0], dims[1]);
    let guards = [guard(Some(&kl)), guard(Some(&scores)), guard(mask.as_ref())];
    match kl.device() {
        Device::Cpu => {
            let n = shape.len();
            let (Some(k), Some(s)) =
                (cpu_side::<f32>(&guards[0], n, "kl")?, cpu_side::<f32>(&guards[1], shape.rows, "scores")?)
            else {
                bail!("kl_rewards: missing input")
            };
            let m = cpu_side::<u8>(&guards[2], n, "mask")?;
            let mut r = vec![0f32; n];
            let inputs = KlRewardsInputs { mask: m, ..KlRewardsInputs::new(shape, k, s) };
            cpu::kl_rewards(&inputs, &mut r, opts).map_err(to_candle)?;
            Ok(tensor(Storage::Cpu(CpuStorage::F32(r)), (shape.rows, shape.cols)))
        }
        #[cfg(feature = "candle-cuda")]
        Device::Cuda(_) => gpu::kl_rewards(&guards, shape, opts),
        other => bail!("kl_rewards: unsupported device {:?}", other.location()),
    }
}

/// The constant inputs of [`value_loss`], each `[B, T]` like the values (f32; the mask `u8`).
#[derive(Debug, Clone, Copy)]
pub struct ValueTensors<'a> {
    /// The values at rollout time.
    pub old_values: &'a Tensor,
    /// The value targets (e.g. GAE returns).
    pub returns: &'a Tensor,
    /// Response mask (`u8`, 0 = padding); `None`: every token counts.
    pub mask: Option<&'a Tensor>,
}

impl<'a> ValueTensors<'a> {
    /// The two required inputs.
    pub fn new(old_values: &'a Tensor, returns: &'a Tensor) -> Self {
        ValueTensors { old_values, returns, mask: None }
    }
    /// Adds the response mask.
    pub fn mask(self, mask: &'a Tensor) -> Self {
        ValueTensors { mask: Some(mask), ..self }
    }
}

/// [`value_loss`]'s result.
#[derive(Debug, Clone)]
pub struct ValueLoss {
    /// `coef·aggregate(L_v)` (f32, shape `[]`), differentiable in the values.
    pub loss: Tensor,
    /// The loss and the clip fraction, from the same pass.
    pub stats: ValueLossStats,
}

/// The clipped value loss over a `[B, T]` batch of `values` (f32): per token
/// `L_v = ½·max((v − R)², (v_clip − R)²)` with `v_clip = v_old + clamp(v − v_old, ±clip)` (no
/// clipping without `opts.clip`), aggregated with `opts.aggregation`, scaled by `opts.coef`.
/// `loss.backward()` gives `∂loss/∂values`.
///
/// ```
/// use candle_core::{Device, Tensor, Var};
/// use rlhf_kernels::ValueLossOptions;
/// use rlhf_kernels::candle::{ValueTensors, value_loss};
/// let dev = Device::Cpu;
/// let values = Var::new(&[[1.0f32, 0.0]], &dev)?;
/// let (old, ret) = (Tensor::new(&[[1.0f32, 0.0]], &dev)?, Tensor::new(&[[2.0f32, 0.0]], &dev)?);
/// let out = value_loss(&values, &ValueTensors::new(&old, &ret), &ValueLossOptions::default().coef(1.0))?;
/// assert_eq!(out.loss.to_scalar::<f32>()?, 0.25); // mean of ½·(1 − 2)² and 0
/// let grads = out.loss.backward()?;
/// assert_eq!(grads.get(&values).unwrap().to_vec2::<f32>()?, vec![vec![-0.5, 0.0]]);
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn value_loss(values: &Tensor, inputs: &ValueTensors<'_>, opts: &ValueLossOptions) -> Result<ValueLoss> {
    let dims = batch_dims(values, "values")?;
    opts.validate().map_err(to_candle)?;
    let values = per_row(values, &dims, values, &[DType::F32], "values")?;
    let op = ValueLossOp {
        opts: *opts,
        shape: RowShape::new(dims[0], dims[1]),
        old_values: per_row(inputs.old_values, &dims, &values, &[DType::F32], "old_values")?,
        returns: per_row(inputs.returns, &dims, &values, &[DType::F32], "returns")?,
        mask: inputs.mask.map(|m| per_row(m, &dims, &values, &[DType::U8], "mask")).transpose()?,
        stats: Arc::default(),
    };
    let slot = op.stats.clone();
    let loss = values.apply_op1(op)?;
    Ok(ValueLoss { loss, stats: take(&slot, "value_loss")? })
}

pub(super) struct ValueLossOp {
    opts: ValueLossOptions,
    shape: RowShape,
    old_values: Tensor,
    returns: Tensor,
    mask: Option<Tensor>,
    stats: Slot<ValueLossStats>,
}

impl ValueLossOp {
    fn cpu(&self, (v, vl): (&CpuStorage, &Layout), grad: Option<&mut [f32]>) -> Result<ValueLossStats> {
        let n = self.shape.len();
        let guards = [guard(Some(&self.old_values)), guard(Some(&self.returns)), guard(self.mask.as_ref())];
        let (Some(old), Some(ret)) =
            (cpu_side::<f32>(&guards[0], n, "old_values")?, cpu_side::<f32>(&guards[1], n, "returns")?)
        else {
            bail!("value_loss: missing input")
        };
        let inputs = ValueLossInputs {
            shape: self.shape,
            values: flat::<f32>(v, vl, n, "values")?,
            old_values: old,
            returns: ret,
            mask: cpu_side::<u8>(&guards[2], n, "mask")?,
        };
        let out = ValueLossOutputs { grad_values: grad, ..Default::default() };
        cpu::value_loss(&inputs, out, &self.opts).map_err(to_candle)
    }
}

impl CustomOp1 for ValueLossOp {
    fn name(&self) -> &'static str {
        "rlhf-kernels-value-loss"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let stats = self.cpu((s, l), None)?;
        put(&self.stats, stats);
        Ok((CpuStorage::F32(vec![stats.loss as f32]), Shape::from(())))
    }

    #[cfg(feature = "candle-cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        Ok((gpu::value_forward(self, (s, l))?, Shape::from(())))
    }

    fn bwd(&self, values: &Tensor, _loss: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let (vs, vl) = values.storage_and_layout();
        let dims = (self.shape.rows, self.shape.cols);
        let g = match &*vs {
            Storage::Cpu(v) => {
                let mut g = vec![0f32; self.shape.len()];
                self.cpu((v, vl), Some(&mut g))?;
                tensor(Storage::Cpu(CpuStorage::F32(g)), dims)
            }
            #[cfg(feature = "candle-cuda")]
            Storage::Cuda(v) => gpu::value_backward(self, (v, vl))?,
            _ => bail!("value_loss: unsupported device"),
        };
        drop(vs);
        Ok(Some(g.broadcast_mul(grad)?))
    }
}

#[cfg(feature = "candle-cuda")]
mod gpu {
    use candle_core::cuda_backend::CudaStorage;
    use candle_core::{Layout, Result, Storage, Tensor, bail};
    use cudarc::driver::CudaSlice;

    use super::super::storage::{Guard, check, cuda_side, flat_view, guard, stream_of, tensor};
    use super::super::to_candle;
    use super::{SampledKlOp, ValueLossOp, put};
    use crate::cuda::{self, DeviceStats};
    use crate::{
        KlRewardsInputs, KlRewardsOptions, RowShape, SampledKlInputs, SampledKlOutputs, SampledKlStats,
        ValueLossInputs, ValueLossOutputs, ValueLossStats,
    };

    fn sampled_run(
        op: &SampledKlOp,
        (logp, ll): (&CudaStorage, &Layout),
        values: Option<&mut CudaSlice<f32>>,
        grad: Option<&mut CudaSlice<f32>>,
    ) -> Result<SampledKlStats> {
        let n = op.shape.len();
        let (stream, mut ctx) = stream_of(logp)?;
        let (ref_guard, mask_guard) = (guard(Some(&op.ref_logp)), guard(op.mask.as_ref()));
        let Some((r, rl)) = cuda_side(&ref_guard, "ref_logp")? else { bail!("ref_logp: missing") };
        let mask =
            cuda_side(&mask_guard, "mask")?.map(|(m, l)| flat_view::<u8>(m, l, n, "mask")).transpose()?;
        let old_guard = guard(op.old_logp.as_ref());
        let old_logp = cuda_side(&old_guard, "old_logp")?
            .map(|(o, l)| flat_view::<f32>(o, l, n, "old_logp"))
            .transpose()?;
        let inputs = SampledKlInputs {
            shape: op.shape,
            logp: flat_view::<f32>(logp, ll, n, "logp")?,
            ref_logp: flat_view::<f32>(r, rl, n, "ref_logp")?,
            mask,
            old_logp,
        };
        let mut stats = DeviceStats::<SampledKlStats>::new(&stream).map_err(to_candle)?;
        let out = SampledKlOutputs {
            values: values.map(|v| v.slice_mut(..)),
            grad_logp: grad.map(|g| g.slice_mut(..)),
            stats: Some(&mut stats),
            workspace: None,
        };
        cuda::sampled_kl(&mut ctx, &inputs, out, &op.opts).map_err(to_candle)?;
        check(ctx)?;
        stats.read(&stream).map_err(to_candle)
    }

    fn wrap(g: CudaSlice<f32>, dev: &candle_core::CudaDevice, shape: RowShape) -> Tensor {
        tensor(Storage::Cuda(CudaStorage::wrap_cuda_slice(g, dev.clone())), (shape.rows, shape.cols))
    }

    fn scalar(x: f64, dev: &candle_core::CudaDevice, what: &str) -> Result<CudaStorage> {
        let s = dev
            .cuda_stream()
            .clone_htod(&[x as f32])
            .map_err(|e| candle_core::Error::msg(format!("{what}: copying the loss to the device: {e:?}")))?;
        Ok(CudaStorage::wrap_cuda_slice(s, dev.clone()))
    }

    pub(super) fn sampled_forward(op: &SampledKlOp, logp: (&CudaStorage, &Layout)) -> Result<CudaStorage> {
        let dev = &logp.0.device;
        let mut values = dev.alloc_zeros::<f32>(op.shape.len())?;
        let stats = sampled_run(op, logp, Some(&mut values), None)?;
        put(&op.out, (wrap(values, dev, op.shape), stats));
        scalar(stats.loss, dev, "sampled_kl")
    }

    pub(super) fn sampled_backward(op: &SampledKlOp, logp: (&CudaStorage, &Layout)) -> Result<Tensor> {
        let dev = &logp.0.device;
        let mut g = dev.alloc_zeros::<f32>(op.shape.len())?;
        sampled_run(op, logp, None, Some(&mut g))?;
        Ok(wrap(g, dev, op.shape))
    }

    pub(super) fn kl_rewards(
        guards: &[Guard<'_>; 3],
        shape: RowShape,
        opts: &KlRewardsOptions,
    ) -> Result<Tensor> {
        let n = shape.len();
        let (Some((k, kl)), Some((s, sl))) = (cuda_side(&guards[0], "kl")?, cuda_side(&guards[1], "scores")?)
        else {
            bail!("kl_rewards: missing input")
        };
        let mask =
            cuda_side(&guards[2], "mask")?.map(|(m, l)| flat_view::<u8>(m, l, n, "mask")).transpose()?;
        let (_, mut ctx) = stream_of(k)?;
        let dev = &k.device;
        let mut r = dev.alloc_zeros::<f32>(n)?;
        let (kv, sv) = (flat_view::<f32>(k, kl, n, "kl")?, flat_view::<f32>(s, sl, shape.rows, "scores")?);
        let inputs = KlRewardsInputs { mask, ..KlRewardsInputs::new(shape, kv, sv) };
        cuda::kl_rewards(&mut ctx, &inputs, &mut r, opts).map_err(to_candle)?;
        check(ctx)?;
        Ok(wrap(r, dev, shape))
    }

    fn value_run(
        op: &ValueLossOp,
        (values, vl): (&CudaStorage, &Layout),
        grad: Option<&mut CudaSlice<f32>>,
    ) -> Result<ValueLossStats> {
        let n = op.shape.len();
        let (stream, mut ctx) = stream_of(values)?;
        let guards = [guard(Some(&op.old_values)), guard(Some(&op.returns)), guard(op.mask.as_ref())];
        let (Some((o, ol)), Some((r, rl))) =
            (cuda_side(&guards[0], "old_values")?, cuda_side(&guards[1], "returns")?)
        else {
            bail!("value_loss: missing input")
        };
        let mask =
            cuda_side(&guards[2], "mask")?.map(|(m, l)| flat_view::<u8>(m, l, n, "mask")).transpose()?;
        let inputs = ValueLossInputs {
            shape: op.shape,
            values: flat_view::<f32>(values, vl, n, "values")?,
            old_values: flat_view::<f32>(o, ol, n, "old_values")?,
            returns: flat_view::<f32>(r, rl, n, "returns")?,
            mask,
        };
        let mut stats = DeviceStats::<ValueLossStats>::new(&stream).map_err(to_candle)?;
        let out = ValueLossOutputs {
            grad_values: grad.map(|g| g.slice_mut(..)),
            stats: Some(&mut stats),
            ..Default::default()
        };
        cuda::value_loss(&mut ctx, &inputs, out, &op.opts).map_err(to_candle)?;
        check(ctx)?;
        stats.read(&stream).map_err(to_candle)
    }

    pub(super) fn value_forward(op: &ValueLossOp, values: (&CudaStorage, &Layout)) -> Result<CudaStorage> {
        let stats = value_run(op, values, None)?;
        put(&op.stats, stats);
        scalar(stats.loss, &values.0.device, "value_loss")
    }

    pub(super) fn value_backward(op: &ValueLossOp, values: (&CudaStorage, &Layout)) -> Result<Tensor> {
        let dev = &values.0.device;
        let mut g = dev.alloc_zeros::<f32>(op.shape.len())?;
        value_run(op, values, Some(&mut g))?;
        Ok(wrap(g, dev, op.shape))
    }
}
