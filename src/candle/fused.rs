//! The fused path on candle tensors: the policy loss (with the entropy bonus and an optional
//! sampled KL term) straight from `[B, T, V]` logits, its gradient w.r.t. the logits computed in
//! the forward (two passes over the logits, no `[N, V]` softmax) and scaled in the backward.

use std::sync::{Arc, Mutex};

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Storage, Tensor, WithDType, bail};

use super::storage::{
    INDEX_DTYPES, cpu_side, flat, guard, per_row, row_blocks, storage_slice, tensor, unpack, with_float,
    with_index,
};
use super::to_candle;
use crate::{FusedPolicyInputs, FusedPolicyOptions, FusedPolicyStats, RowBlocks, RowShape, Tokens, cpu};

/// The constant inputs of [`policy_loss_from_logits`], each `[B, T]` like the targets (f32;
/// the mask `u8`).
#[derive(Debug, Clone, Copy)]
pub struct FusedTensors<'a> {
    /// `log π_old(y_t)` from the rollout.
    pub old_logp: &'a Tensor,
    /// Advantages per token.
    pub advantages: &'a Tensor,
    /// Response mask (`u8`, 0 = padding); `None`: every token counts. The fused path has no
    /// ignore index: padding comes from here only.
    pub mask: Option<&'a Tensor>,
    /// `log π_ref(y_t)` for a KL loss term (with [`FusedPolicyOptions::kl`]).
    pub ref_logp: Option<&'a Tensor>,
}

impl<'a> FusedTensors<'a> {
    /// The two required inputs.
    pub fn new(old_logp: &'a Tensor, advantages: &'a Tensor) -> Self {
        FusedTensors { old_logp, advantages, mask: None, ref_logp: None }
    }
    /// Adds the response mask.
    pub fn mask(self, mask: &'a Tensor) -> Self {
        FusedTensors { mask: Some(mask), ..self }
    }
    /// Adds the reference log-probs of a KL loss term.
    pub fn ref_logp(self, ref_logp: &'a Tensor) -> Self {
        FusedTensors { ref_logp: Some(ref_logp), ..self }
    }
}

/// [`policy_loss_from_logits`]'s result.
#[derive(Debug, Clone)]
pub struct FusedPolicyLoss {
    /// The scalar policy loss (with the entropy bonus) plus the KL term (f32, shape `[]`),
    /// differentiable in the logits.
    pub loss: Tensor,
    /// The policy loss's statistics and the KL term's.
    pub stats: FusedPolicyStats,
}

/// The policy loss straight from the policy logits `[B, T, V]` (f32 / bf16 / f16) and the
/// sampled `targets` `[B, T]` (`u32`, `i64` or `i32`): the token log-probs and entropies at
/// `opts.temperature`, the KL term `opts.kl` to `inputs.ref_logp` (when given; no importance
/// ratio), the policy loss `opts.loss` with its entropy bonus, and the backward of the total
/// into the logits — computed in the forward and kept with the graph (one gradient the size of
/// the logits) for `loss.backward()` to scale by the upstream gradient. The logits' rows must share one
/// stride (a contiguous tensor, or rows padded to a stride); other views are copied first.
///
/// Errors: shapes, dtypes or devices that do not match, a KL term with only one of its options
/// and `ref_logp`, and the errors of each stage (targets out of range at valid tokens, rows
/// without a defined log-softmax, non-finite loss inputs).
///
/// ```
/// use candle_core::{Device, Tensor, Var};
/// use rlhf_kernels::FusedPolicyOptions;
/// use rlhf_kernels::candle::{FusedTensors, policy_loss_from_logits};
/// let dev = Device::Cpu;
/// let logits = Var::new(&[[[1.0f32, 2.0, 0.5], [0.0, 0.0, 3.0]]], &dev)?; // [B, T, V] = [1, 2, 3]
/// let targets = Tensor::new(&[[1u32, 2]], &dev)?;
/// let (old, adv) = (Tensor::new(&[[-0.5f32, -0.2]], &dev)?, Tensor::new(&[[1.0f32, -1.0]], &dev)?);
/// let inputs = FusedTensors::new(&old, &adv);
/// let out = policy_loss_from_logits(&logits, &targets, &inputs, &FusedPolicyOptions::default())?;
/// let grads = out.loss.backward()?;
/// assert_eq!(grads.get(&logits).unwrap().dims(), &[1, 2, 3]);
/// assert!(out.stats.kl.is_none());
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn policy_loss_from_logits(
    logits: &Tensor,
    targets: &Tensor,
    inputs: &FusedTensors<'_>,
    opts: &FusedPolicyOptions,
) -> Result<FusedPolicyLoss> {
    let &[b, t, _] = logits.dims() else { bail!("logits: shape {:?}, expected [B, T, V]", logits.dims()) };
    let dims = [b, t];
    // One block of evenly spaced rows is read in place; any other view (rows of several strides,
    // a last dimension without unit stride) is copied, which autograd records.
    let logits = match row_blocks(logits.layout(), "logits") {
        Ok(rows) if rows.offsets.len() == 1 => logits.clone(),
        _ => logits.contiguous()?,
    };
    let per = |x: &Tensor, dtypes: &[DType], what| per_row(x, &dims, &logits, dtypes, what);
    let op = FusedOp {
        opts: *opts,
        sequences: RowShape::new(b, t),
        targets: per(targets, &INDEX_DTYPES, "targets")?,
        old_logp: per(inputs.old_logp, &[DType::F32], "old_logp")?,
        advantages: per(inputs.advantages, &[DType::F32], "advantages")?,
        mask: inputs.mask.map(|m| per(m, &[DType::U8], "mask")).transpose()?,
        ref_logp: inputs.ref_logp.map(|r| per(r, &[DType::F32], "ref_logp")).transpose()?,
        saved: Arc::default(),
    };
    let saved = op.saved.clone();
    let loss = logits.apply_op1(op)?;
    let stats = saved.lock().unwrap_or_else(|e| e.into_inner()).as_ref().map(|(_, s)| *s);
    let Some(stats) = stats else { bail!("policy_loss_from_logits: the forward left no statistics") };
    Ok(FusedPolicyLoss { loss, stats })
}

/// The op candle records: the forward computes the loss, the statistics and the gradient; the
/// backward scales the saved gradient.
struct FusedOp {
    opts: FusedPolicyOptions,
    sequences: RowShape,
    targets: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Option<Tensor>,
    ref_logp: Option<Tensor>,
    /// The forward's gradient w.r.t. the logits (the logits' shape) and its statistics.
    saved: Arc<Mutex<Option<(Tensor, FusedPolicyStats)>>>,
}

impl FusedOp {
    /// The one block of evenly spaced rows of the logits, one row per token.
    fn rows(&self, layout: &Layout) -> Result<RowBlocks> {
        let rows = row_blocks(layout, "logits")?;
        if rows.offsets.len() != 1 || rows.rows() != self.sequences.len() {
            bail!("logits: {} blocks of rows for a [B, T] = {:?} batch", rows.offsets.len(), self.sequences)
        }
        Ok(rows)
    }

    fn save(&self, grad: Tensor, stats: FusedPolicyStats) -> f32 {
        *self.saved.lock().unwrap_or_else(|e| e.into_inner()) = Some((grad, stats));
        stats.total_loss() as f32
    }
}

impl CustomOp1 for FusedOp {
    fn name(&self) -> &'static str {
        "rlhf-kernels-policy-loss-from-logits"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let rows = self.rows(l)?;
        let n = rows.rows();
        let (ts, tl) = self.targets.storage_and_layout();
        let (os, ol) = self.old_logp.storage_and_layout();
        let (a_s, al) = self.advantages.storage_and_layout();
        let (mask_guard, ref_guard) = (guard(self.mask.as_ref()), guard(self.ref_logp.as_ref()));
        let (Storage::Cpu(t), Storage::Cpu(o), Storage::Cpu(a)) = (&*ts, &*os, &*a_s) else {
            bail!("policy_loss_from_logits: the per-token inputs on another device than the logits")
        };
        let (old, adv) = (flat::<f32>(o, ol, n, "old_logp")?, flat::<f32>(a, al, n, "advantages")?);
        let mask = cpu_side::<u8>(&mask_guard, n, "mask")?;
        let ref_logp = cpu_side::<f32>(&ref_guard, n, "ref_logp")?;
        let (packed, stats) = with_float!(s.dtype(), "logits", T => with_index!(t.dtype(), "targets", I => {
            let logits = storage_slice::<T>(s, "logits")?;
            let tokens = Tokens { targets: flat::<I>(t, tl, n, "targets")?, mask };
            let inputs = FusedPolicyInputs::new(tokens, self.sequences, old, adv);
            let inputs = FusedPolicyInputs { ref_logp, ..inputs };
            let mut grad = vec![T::from_f64(0.0); n * rows.shape.row_stride];
            let logits = &logits[rows.block_range(0)];
            let stats = cpu::policy_loss_from_logits(logits, rows.shape, &inputs, &mut grad, &self.opts)
                .map_err(to_candle)?;
            (tensor(Storage::Cpu(T::to_cpu_storage_owned(grad)), (n, rows.shape.row_stride)), stats)
        }));
        let loss = self.save(unpack(&rows, packed, l.dims())?, stats);
        Ok((CpuStorage::F32(vec![loss]), Shape::from(())))
    }

    #[cfg(feature = "candle-cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let rows = self.rows(l)?;
        let (packed, stats) = gpu::forward(self, &rows, s)?;
        let loss = self.save(unpack(&rows, packed, l.dims())?, stats);
        let loss = s.device.cuda_stream().clone_htod(&[loss]).map_err(|e| {
            candle_core::Error::msg(format!("policy_loss_from_logits: copying the loss to the device: {e:?}"))
        })?;
        Ok((candle_core::CudaStorage::wrap_cuda_slice(loss, s.device.clone()), Shape::from(())))
    }

    fn bwd(&self, _logits: &Tensor, _loss: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let saved = self.saved.lock().unwrap_or_else(|e| e.into_inner()).as_ref().map(|(g, _)| g.clone());
        let Some(g) = saved else { bail!("policy_loss_from_logits: backward before the forward") };
        Ok(Some(g.broadcast_mul(&grad.to_dtype(g.dtype())?)?))
    }
}

#[cfg(feature = "candle-cuda")]
mod gpu {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::CudaStorage;
    use candle_core::{Result, Storage, Tensor, bail};

    use super::super::storage::{
        check, cuda_side, flat_view, guard, stream_of, tensor, with_float, with_index,
    };
    use super::super::to_candle;
    use super::FusedOp;
    use crate::cuda::{self, DeviceFusedStats};
    use crate::{FusedPolicyInputs, FusedPolicyStats, RowBlocks, Tokens};

    /// The fused path on candle's stream: the packed `[rows, row_stride]` gradient and the
    /// statistics.
    pub(super) fn forward(
        op: &FusedOp,
        rows: &RowBlocks,
        s: &CudaStorage,
    ) -> Result<(Tensor, FusedPolicyStats)> {
        let n = rows.rows();
        let (stream, mut ctx) = stream_of(s)?;
        let (ts, tl) = op.targets.storage_and_layout();
        let (os, ol) = op.old_logp.storage_and_layout();
        let (a_s, al) = op.advantages.storage_and_layout();
        let (mask_guard, ref_guard) = (guard(op.mask.as_ref()), guard(op.ref_logp.as_ref()));
        let (Storage::Cuda(t), Storage::Cuda(o), Storage::Cuda(a)) = (&*ts, &*os, &*a_s) else {
            bail!("policy_loss_from_logits: the per-token inputs on another device than the logits")
        };
        let (old, adv) = (flat_view::<f32>(o, ol, n, "old_logp")?, flat_view::<f32>(a, al, n, "advantages")?);
        let mask =
            cuda_side(&mask_guard, "mask")?.map(|(m, l)| flat_view::<u8>(m, l, n, "mask")).transpose()?;
        let ref_logp = cuda_side(&ref_guard, "ref_logp")?
            .map(|(r, l)| flat_view::<f32>(r, l, n, "ref_logp"))
            .transpose()?;
        let mut stats = DeviceFusedStats::new(&stream).map_err(to_candle)?;
        let packed = with_float!(s.dtype(), "logits", T => with_index!(t.dtype(), "targets", I => {
            let logits = s.as_cuda_slice::<T>()?;
            let tokens = Tokens { targets: flat_view::<I>(t, tl, n, "targets")?, mask };
            let inputs = FusedPolicyInputs::new(tokens, op.sequences, old, adv);
            let inputs = FusedPolicyInputs { ref_logp, ..inputs };
            let mut grad = s.device.alloc_zeros::<T>(n * rows.shape.row_stride)?;
            cuda::policy_loss_from_logits(
                &mut ctx,
                &logits.slice(rows.block_range(0)),
                rows.shape,
                &inputs,
                &mut grad,
                &mut stats,
                &op.opts,
            )
            .map_err(to_candle)?;
            let grad = CudaStorage::wrap_cuda_slice(grad, s.device.clone());
            tensor(Storage::Cuda(grad), (n, rows.shape.row_stride))
        }));
        check(ctx)?;
        Ok((packed, stats.read(&stream).map_err(to_candle)?))
    }
}
