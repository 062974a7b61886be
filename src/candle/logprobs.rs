//! Token log-probabilities and entropies of candle logits, with candle autograd.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Storage, Tensor, WithDType, bail};

use super::storage::{
    INDEX_DTYPES, cpu_side, flat, guard, per_row, row_blocks, storage_slice, tensor, unpack, with_float,
    with_index,
};
use super::to_candle;
use crate::{TokenGrads, TokenLogprobsOptions, TokenOutputs, Tokens, cpu};

/// [`token_logprobs`]'s outputs, each shaped like the targets; both differentiable.
#[derive(Debug, Clone)]
pub struct TokenLogprobs {
    /// `log softmax(z/τ)[y]` in nats; 0 at masked or ignored rows.
    pub logp: Tensor,
    /// `H = lse − Σ_v p_v·z_v/τ` in nats; 0 at masked or ignored rows.
    pub entropy: Tensor,
}

/// `log p(y)` and the entropy of every row of `logits` (`[..., V]`, f32 / bf16 / f16) without
/// materialising the softmax: `log p(y) = z_y/τ − lse`, `lse = ln Σ_v exp(z_v/τ)`,
/// `H = lse − Σ_v p_v·z_v/τ`, in nats, computed in f32.
///
/// `targets` (`u32`, `i64` or `i32`) and the optional `mask` (`u8`, 0 = padding) have the
/// logits' leading shape. Masked rows and rows whose target is `opts.ignore_index` give 0 and
/// no gradient. Gradients flow to `logits` from both outputs (`∂/∂z_v` of `log p(y)` is
/// `(1[v = y] − p_v)/τ`; of `H`, `−p_v·(log p_v + H)/τ`), through this crate's one-pass
/// backward. The logits may be any view with a unit stride on the last dimension; they are
/// not copied.
///
/// Errors: shapes, dtypes or devices that do not match, an out-of-range target, and (on
/// either device) a row with a NaN or of only `-inf` among the rows that count.
///
/// ```
/// use candle_core::{Device, Tensor, Var};
/// use rlhf_kernels::TokenLogprobsOptions;
/// let logits = Var::new(&[[1.0f32, 2.0, 3.0]], &Device::Cpu)?;
/// let targets = Tensor::new(&[2u32], &Device::Cpu)?;
/// let out = rlhf_kernels::candle::token_logprobs(&logits, &targets, None, &TokenLogprobsOptions::default())?;
/// let grads = out.logp.sum_all()?.backward()?;
/// let g = grads.get(&logits).unwrap().to_vec2::<f32>()?;
/// assert!((g[0][2] - (1.0 - 0.66524096)).abs() < 1e-6); // 1 − p_y
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn token_logprobs(
    logits: &Tensor,
    targets: &Tensor,
    mask: Option<&Tensor>,
    opts: &TokenLogprobsOptions,
) -> Result<TokenLogprobs> {
    let Some((_, lead)) = logits.dims().split_last() else {
        bail!("logits: expected a tensor [..., V], got a scalar")
    };
    let targets = per_row(targets, lead, logits, &INDEX_DTYPES, "targets")?;
    let mask = mask.map(|m| per_row(m, lead, logits, &[DType::U8], "mask")).transpose()?;
    opts.inv_temperature().map_err(to_candle)?;
    // [3, N]: log p(y), H and lse (kept for the backward) of every row.
    let out = logits.apply_op2(&targets, TokenLogprobsOp { opts: *opts, mask })?;
    Ok(TokenLogprobs { logp: out.get(0)?.reshape(lead)?, entropy: out.get(1)?.reshape(lead)? })
}

/// The op candle records: forward into `[3, N]` (`logp`, `entropy`, `lse`), backward from
/// the saved rows.
struct TokenLogprobsOp {
    opts: TokenLogprobsOptions,
    mask: Option<Tensor>,
}

impl CustomOp2 for TokenLogprobsOp {
    fn name(&self) -> &'static str {
        "rlhf-kernels-token-logprobs"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let rows = row_blocks(l1, "logits")?;
        let n = rows.rows();
        let mask_guard = guard(self.mask.as_ref());
        let mask = cpu_side::<u8>(&mask_guard, n, "mask")?;
        let mut out = vec![0f32; 3 * n];
        let (logp, rest) = out.split_at_mut(n);
        let (entropy, lse) = rest.split_at_mut(n);
        with_float!(s1.dtype(), "logits", T => with_index!(s2.dtype(), "targets", I => {
            let logits = storage_slice::<T>(s1, "logits")?;
            let targets = flat::<I>(s2, l2, n, "targets")?;
            for k in 0..rows.offsets.len() {
                let r = rows.block_rows(k);
                let tokens = Tokens { targets: &targets[r.clone()], mask: mask.map(|m| &m[r.clone()]) };
                let outs = TokenOutputs::default()
                    .logp(&mut logp[r.clone()])
                    .entropy(&mut entropy[r.clone()])
                    .lse(&mut lse[r]);
                cpu::token_logprobs(&logits[rows.block_range(k)], rows.shape, &tokens, outs, &self.opts)
                    .map_err(|e| to_candle(rows.block_error(k, e)))?;
            }
        }));
        Ok((CpuStorage::F32(out), Shape::from((3, n))))
    }

    #[cfg(feature = "candle-cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        gpu::forward(self, s1, l1, s2, l2)
    }

    fn bwd(
        &self,
        logits: &Tensor,
        targets: &Tensor,
        saved: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let rows = row_blocks(logits.layout(), "logits")?;
        let (ls, _) = logits.storage_and_layout();
        let (ts, tl) = targets.storage_and_layout();
        let (ss, sl) = saved.storage_and_layout();
        let (gs, gl) = grad.storage_and_layout();
        let mask_guard = guard(self.mask.as_ref());
        let packed = match (&*ls, &*ts, &*ss, &*gs) {
            (Storage::Cpu(l), Storage::Cpu(t), Storage::Cpu(s), Storage::Cpu(g)) => {
                let n = rows.rows();
                let mask = cpu_side::<u8>(&mask_guard, n, "mask")?;
                let saved = flat::<f32>(s, sl, 3 * n, "saved rows")?;
                let grad = flat::<f32>(g, gl, 3 * n, "upstream gradient")?;
                with_float!(l.dtype(), "logits", T => with_index!(t.dtype(), "targets", I => {
                    let logits = storage_slice::<T>(l, "logits")?;
                    let targets = flat::<I>(t, tl, n, "targets")?;
                    let mut out = vec![T::from_f64(0.0); n * rows.shape.row_stride];
                    for k in 0..rows.offsets.len() {
                        let r = rows.block_rows(k);
                        let at = |base: usize| &saved[base * n..][r.clone()];
                        let g_at = |base: usize| &grad[base * n..][r.clone()];
                        let tokens = Tokens { targets: &targets[r.clone()], mask: mask.map(|m| &m[r.clone()]) };
                        let grads = TokenGrads { lse: at(2), entropy: Some(at(1)), grad_logp: Some(g_at(0)), grad_entropy: Some(g_at(1)) };
                        cpu::token_logprobs_backward(
                            &logits[rows.block_range(k)],
                            rows.shape,
                            &tokens,
                            &grads,
                            &mut out[rows.packed_range(k)],
                            &self.opts,
                        )
                        .map_err(|e| to_candle(rows.block_error(k, e)))?;
                    }
                    tensor(Storage::Cpu(T::to_cpu_storage_owned(out)), (n, rows.shape.row_stride))
                }))
            }
            #[cfg(feature = "candle-cuda")]
            (Storage::Cuda(l), Storage::Cuda(t), Storage::Cuda(s), Storage::Cuda(g)) => {
                let mask = super::storage::cuda_side(&mask_guard, "mask")?;
                gpu::backward(self, &rows, l, (t, tl), (s, sl), (g, gl), mask)?
            }
            _ => bail!("token_logprobs backward: the logits, targets and gradient are on different devices"),
        };
        drop((ls, ts, ss, gs, mask_guard));
        Ok((Some(unpack(&rows, packed, logits.dims())?), None))
    }
}

#[cfg(feature = "candle-cuda")]
mod gpu {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::CudaStorage;
    use candle_core::{Layout, Result, Shape, Storage, Tensor};

    use super::super::storage::{
        check, cuda_side, flat_view, guard, row_blocks, stream_of, tensor, with_float, with_index,
    };
    use super::super::to_candle;
    use super::TokenLogprobsOp;
    use crate::cuda;
    use crate::{RowBlocks, TokenGrads, TokenOutputs, Tokens};

    pub(super) fn forward(
        op: &TokenLogprobsOp,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let rows = row_blocks(l1, "logits")?;
        let n = rows.rows();
        let (_, mut ctx) = stream_of(s1)?;
        let mask_guard = guard(op.mask.as_ref());
        let mask =
            cuda_side(&mask_guard, "mask")?.map(|(m, l)| flat_view::<u8>(m, l, n, "mask")).transpose()?;
        let mut out = s1.device.alloc_zeros::<f32>(3 * n)?;
        with_float!(s1.dtype(), "logits", T => with_index!(s2.dtype(), "targets", I => {
            let logits = s1.as_cuda_slice::<T>()?;
            let targets = flat_view::<I>(s2, l2, n, "targets")?;
            for k in 0..rows.offsets.len() {
                let r = rows.block_rows(k);
                let tokens = Tokens {
                    targets: targets.slice(r.clone()),
                    mask: mask.as_ref().map(|m| m.slice(r.clone())),
                };
                let (mut logp, mut rest) = out.split_at_mut(n);
                let (mut entropy, mut lse) = rest.split_at_mut(n);
                let outs = TokenOutputs {
                    logp: Some(logp.slice_mut(r.clone())),
                    entropy: Some(entropy.slice_mut(r.clone())),
                    lse: Some(lse.slice_mut(r)),
                    workspace: None,
                };
                cuda::token_logprobs(
                    &mut ctx,
                    &logits.slice(rows.block_range(k)),
                    rows.shape,
                    &tokens,
                    outs,
                    &op.opts,
                )
                .map_err(to_candle)?;
            }
        }));
        check(ctx)?;
        Ok((CudaStorage::wrap_cuda_slice(out, s1.device.clone()), Shape::from((3, n))))
    }

    pub(super) fn backward(
        op: &TokenLogprobsOp,
        rows: &RowBlocks,
        logits: &CudaStorage,
        (targets, tl): (&CudaStorage, &Layout),
        (saved, sl): (&CudaStorage, &Layout),
        (grad, gl): (&CudaStorage, &Layout),
        mask: Option<(&CudaStorage, &Layout)>,
    ) -> Result<Tensor> {
        let n = rows.rows();
        let (_, mut ctx) = stream_of(logits)?;
        let mask = mask.map(|(m, l)| flat_view::<u8>(m, l, n, "mask")).transpose()?;
        let saved = flat_view::<f32>(saved, sl, 3 * n, "saved rows")?;
        let grad = flat_view::<f32>(grad, gl, 3 * n, "upstream gradient")?;
        let packed = with_float!(logits.dtype(), "logits", T => with_index!(targets.dtype(), "targets", I => {
            let src = logits.as_cuda_slice::<T>()?;
            let targets = flat_view::<I>(targets, tl, n, "targets")?;
            let mut out = logits.device.alloc_zeros::<T>(n * rows.shape.row_stride)?;
            for k in 0..rows.offsets.len() {
                let r = rows.block_rows(k);
                let at = |base: usize| saved.slice(base * n + r.start..base * n + r.end);
                let g_at = |base: usize| grad.slice(base * n + r.start..base * n + r.end);
                let tokens = Tokens {
                    targets: targets.slice(r.clone()),
                    mask: mask.as_ref().map(|m| m.slice(r.clone())),
                };
                let grads = TokenGrads {
                    lse: at(2),
                    entropy: Some(at(1)),
                    grad_logp: Some(g_at(0)),
                    grad_entropy: Some(g_at(1)),
                };
                cuda::token_logprobs_backward(
                    &mut ctx,
                    &src.slice(rows.block_range(k)),
                    rows.shape,
                    &tokens,
                    &grads,
                    &mut out.slice_mut(rows.packed_range(k)),
                    &op.opts,
                )
                .map_err(to_candle)?;
            }
            tensor(Storage::Cuda(CudaStorage::wrap_cuda_slice(out, logits.device.clone())), (n, rows.shape.row_stride))
        }));
        check(ctx)?;
        Ok(packed)
    }
}
