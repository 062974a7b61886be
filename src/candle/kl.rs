//! The exact full-vocabulary divergence of candle logits rows, with candle autograd.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Storage, Tensor, WithDType, bail};

use super::storage::{cpu_side, flat, guard, per_row, row_blocks, storage_slice, tensor, unpack, with_float};
use super::to_candle;
use crate::ExactKlOutputs;
use crate::cpu::{self};
use crate::{ExactKlGrads, ReferenceRows};
use crate::{ExactKlOptions, RowBlocks};

/// The exact divergence between the policy's and the reference's next-token distributions
/// for every row of two `[..., V]` logits tensors (f32 / bf16 / f16, either dtype on either
/// side), in nats, shaped like the leading dimensions:
/// `KL[π ‖ π_ref] = Σ_v p_v·(log p_v − log q_v)`, `KL[π_ref ‖ π] = Σ_v q_v·(log q_v − log p_v)`
/// or the generalised JSD, as `opts.divergence` says (argument order names the direction:
/// [`ExactDivergence::PolicyRef`](crate::ExactDivergence::PolicyRef) is `KL[π ‖ π_ref]`).
///
/// Differentiable in `policy_logits` (the gradient of `KL[π ‖ π_ref]` in `z_v` is
/// `p_v·(log p_v − log q_v − KL)/τ`; of `KL[π_ref ‖ π]`, `(p_v − q_v)/τ`); the reference is a
/// constant and gets no gradient. `mask` (`u8`, leading shape) marks padding rows: value 0,
/// no gradient. Neither logits tensor is copied.
///
/// ```
/// use candle_core::{Device, Tensor, Var};
/// use rlhf_kernels::{ExactDivergence, ExactKlOptions};
/// let policy = Var::new(&[[0.0f32, 1.0, 2.0]], &Device::Cpu)?;
/// let reference = Tensor::new(&[[0.0f32, 1.0, 2.0]], &Device::Cpu)?;
/// let opts = ExactKlOptions::new(ExactDivergence::PolicyRef);
/// let kl = rlhf_kernels::candle::exact_kl(&policy, &reference, None, &opts)?;
/// assert!(kl.to_vec1::<f32>()?[0].abs() < 1e-6); // same distribution
/// let grads = kl.sum_all()?.backward()?;
/// assert!(grads.get(&policy).is_some());
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn exact_kl(
    policy_logits: &Tensor,
    ref_logits: &Tensor,
    mask: Option<&Tensor>,
    opts: &ExactKlOptions,
) -> Result<Tensor> {
    let Some((_, lead)) = policy_logits.dims().split_last() else {
        bail!("policy logits: expected a tensor [..., V], got a scalar")
    };
    if ref_logits.dims() != policy_logits.dims() {
        bail!(
            "reference logits: shape {:?}, expected the policy's {:?}",
            ref_logits.dims(),
            policy_logits.dims()
        )
    }
    if !ref_logits.device().same_device(policy_logits.device()) {
        bail!("reference logits: on another device than the policy's")
    }
    let mask = mask.map(|m| per_row(m, lead, policy_logits, &[DType::U8], "mask")).transpose()?;
    opts.inv_temperature().map_err(to_candle)?;
    // [4, N]: the divergence, both log-sum-exps and the policy term (kept for the backward).
    let out = policy_logits.apply_op2(ref_logits, ExactKlOp { opts: *opts, mask })?;
    out.get(0)?.reshape(lead)
}

/// Number of saved rows of the forward: value, policy lse, reference lse, policy term.
const SAVED: usize = 4;

pub(super) struct ExactKlOp {
    opts: ExactKlOptions,
    mask: Option<Tensor>,
}

impl CustomOp2 for ExactKlOp {
    fn name(&self) -> &'static str {
        "rlhf-kernels-exact-kl"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (p_rows, q_rows) =
            RowBlocks::aligned(row_blocks(l1, "policy logits")?, row_blocks(l2, "reference logits")?);
        let n = p_rows.rows();
        let mask_guard = guard(self.mask.as_ref());
        let mask = cpu_side::<u8>(&mask_guard, n, "mask")?;
        let mut out = vec![0f32; SAVED * n];
        let (value, rest) = out.split_at_mut(n);
        let (policy_lse, rest) = rest.split_at_mut(n);
        let (ref_lse, policy_term) = rest.split_at_mut(n);
        with_float!(s1.dtype(), "policy logits", P => with_float!(s2.dtype(), "reference logits", Q => {
            let (policy, reference) = (storage_slice::<P>(s1, "policy logits")?, storage_slice::<Q>(s2, "reference logits")?);
            for k in 0..p_rows.offsets.len() {
                let r = p_rows.block_rows(k);
                let reference = ReferenceRows {
                    logits: &reference[q_rows.block_range(k)],
                    shape: q_rows.shape,
                    mask: mask.map(|m| &m[r.clone()]),
                };
                let outs = ExactKlOutputs {
                    value: Some(&mut value[r.clone()]),
                    policy_lse: Some(&mut policy_lse[r.clone()]),
                    ref_lse: Some(&mut ref_lse[r.clone()]),
                    policy_term: Some(&mut policy_term[r]),
                    ..Default::default()
                };
                cpu::exact_kl(&policy[p_rows.block_range(k)], p_rows.shape, &reference, outs, &self.opts)
                    .map_err(|e| to_candle(p_rows.block_error(k, e)))?;
            }
        }));
        Ok((CpuStorage::F32(out), Shape::from((SAVED, n))))
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
        policy: &Tensor,
        reference: &Tensor,
        saved: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let (p_rows, q_rows) = RowBlocks::aligned(
            row_blocks(policy.layout(), "policy logits")?,
            row_blocks(reference.layout(), "reference logits")?,
        );
        let (ps, _) = policy.storage_and_layout();
        let (qs, _) = reference.storage_and_layout();
        let (ss, sl) = saved.storage_and_layout();
        let (gs, gl) = grad.storage_and_layout();
        let mask_guard = guard(self.mask.as_ref());
        let packed = match (&*ps, &*qs, &*ss, &*gs) {
            (Storage::Cpu(p), Storage::Cpu(q), Storage::Cpu(s), Storage::Cpu(g)) => {
                let n = p_rows.rows();
                let mask = cpu_side::<u8>(&mask_guard, n, "mask")?;
                let saved = flat::<f32>(s, sl, SAVED * n, "saved rows")?;
                let grad = flat::<f32>(g, gl, SAVED * n, "upstream gradient")?;
                with_float!(p.dtype(), "policy logits", P => with_float!(q.dtype(), "reference logits", Q => {
                    let (policy, reference) = (storage_slice::<P>(p, "policy logits")?, storage_slice::<Q>(q, "reference logits")?);
                    let mut out = vec![P::from_f64(0.0); n * p_rows.shape.row_stride];
                    for k in 0..p_rows.offsets.len() {
                        let r = p_rows.block_rows(k);
                        let at = |base: usize| &saved[base * n..][r.clone()];
                        let reference = ReferenceRows {
                            logits: &reference[q_rows.block_range(k)],
                            shape: q_rows.shape,
                            mask: mask.map(|m| &m[r.clone()]),
                        };
                        let grads = ExactKlGrads {
                            grad: &grad[r.clone()],
                            policy_lse: at(1),
                            ref_lse: at(2),
                            value: Some(at(0)),
                            policy_term: Some(at(3)),
                        };
                        cpu::exact_kl_backward(
                            &policy[p_rows.block_range(k)],
                            p_rows.shape,
                            &reference,
                            &grads,
                            &mut out[p_rows.packed_range(k)],
                            &self.opts,
                        )
                        .map_err(|e| to_candle(p_rows.block_error(k, e)))?;
                    }
                    tensor(Storage::Cpu(P::to_cpu_storage_owned(out)), (n, p_rows.shape.row_stride))
                }))
            }
            #[cfg(feature = "candle-cuda")]
            (Storage::Cuda(p), Storage::Cuda(q), Storage::Cuda(s), Storage::Cuda(g)) => {
                let mask = super::storage::cuda_side(&mask_guard, "mask")?;
                gpu::backward(self, (&p_rows, p), (&q_rows, q), (s, sl), (g, gl), mask)?
            }
            _ => bail!("exact_kl backward: the logits and the gradient are on different devices"),
        };
        drop((ps, qs, ss, gs, mask_guard));
        Ok((Some(unpack(&p_rows, packed, policy.dims())?), None))
    }
}

#[cfg(feature = "candle-cuda")]
mod gpu {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::CudaStorage;
    use candle_core::{Layout, Result, Shape, Storage, Tensor};

    use super::super::storage::{
        check, cuda_side, flat_view, guard, row_blocks, stream_of, tensor, with_float,
    };
    use super::super::to_candle;
    use super::{ExactKlOp, SAVED};
    use crate::ExactKlOutputs;
    use crate::cuda::{self};
    use crate::{ExactKlGrads, ReferenceRows, RowBlocks};

    pub(super) fn forward(
        op: &ExactKlOp,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let (p_rows, q_rows) =
            RowBlocks::aligned(row_blocks(l1, "policy logits")?, row_blocks(l2, "reference logits")?);
        let n = p_rows.rows();
        let (_, mut ctx) = stream_of(s1)?;
        let mask_guard = guard(op.mask.as_ref());
        let mask =
            cuda_side(&mask_guard, "mask")?.map(|(m, l)| flat_view::<u8>(m, l, n, "mask")).transpose()?;
        let mut out = s1.device.alloc_zeros::<f32>(SAVED * n)?;
        with_float!(s1.dtype(), "policy logits", P => with_float!(s2.dtype(), "reference logits", Q => {
            let (policy, reference) = (s1.as_cuda_slice::<P>()?, s2.as_cuda_slice::<Q>()?);
            for k in 0..p_rows.offsets.len() {
                let r = p_rows.block_rows(k);
                let reference = ReferenceRows {
                    logits: reference.slice(q_rows.block_range(k)),
                    shape: q_rows.shape,
                    mask: mask.as_ref().map(|m| m.slice(r.clone())),
                };
                let (mut value, mut rest) = out.split_at_mut(n);
                let (mut policy_lse, mut rest) = rest.split_at_mut(n);
                let (mut ref_lse, mut policy_term) = rest.split_at_mut(n);
                let outs = ExactKlOutputs {
                    value: Some(value.slice_mut(r.clone())),
                    policy_lse: Some(policy_lse.slice_mut(r.clone())),
                    ref_lse: Some(ref_lse.slice_mut(r.clone())),
                    policy_term: Some(policy_term.slice_mut(r)),
                    workspace: None,
                    statistic: None,
                };
                cuda::exact_kl(&mut ctx, &policy.slice(p_rows.block_range(k)), p_rows.shape, &reference, outs, &op.opts)
                    .map_err(to_candle)?;
            }
        }));
        check(ctx)?;
        Ok((CudaStorage::wrap_cuda_slice(out, s1.device.clone()), Shape::from((SAVED, n))))
    }

    pub(super) fn backward(
        op: &ExactKlOp,
        (p_rows, policy): (&RowBlocks, &CudaStorage),
        (q_rows, reference): (&RowBlocks, &CudaStorage),
        (saved, sl): (&CudaStorage, &Layout),
        (grad, gl): (&CudaStorage, &Layout),
        mask: Option<(&CudaStorage, &Layout)>,
    ) -> Result<Tensor> {
        let n = p_rows.rows();
        let (_, mut ctx) = stream_of(policy)?;
        let mask = mask.map(|(m, l)| flat_view::<u8>(m, l, n, "mask")).transpose()?;
        let saved = flat_view::<f32>(saved, sl, SAVED * n, "saved rows")?;
        let grad = flat_view::<f32>(grad, gl, SAVED * n, "upstream gradient")?;
        let packed = with_float!(policy.dtype(), "policy logits", P => with_float!(reference.dtype(), "reference logits", Q => {
            let (src, ref_src) = (policy.as_cuda_slice::<P>()?, reference.as_cuda_slice::<Q>()?);
            let mut out = policy.device.alloc_zeros::<P>(n * p_rows.shape.row_stride)?;
            for k in 0..p_rows.offsets.len() {
                let r = p_rows.block_rows(k);
                let at = |base: usize| saved.slice(base * n + r.start..base * n + r.end);
                let reference = ReferenceRows {
                    logits: ref_src.slice(q_rows.block_range(k)),
                    shape: q_rows.shape,
                    mask: mask.as_ref().map(|m| m.slice(r.clone())),
                };
                let grads = ExactKlGrads {
                    grad: grad.slice(r.clone()),
                    policy_lse: at(1),
                    ref_lse: at(2),
                    value: Some(at(0)),
                    policy_term: Some(at(3)),
                };
                cuda::exact_kl_backward(
                    &mut ctx,
                    &src.slice(p_rows.block_range(k)),
                    p_rows.shape,
                    &reference,
                    &grads,
                    &mut out.slice_mut(p_rows.packed_range(k)),
                    &op.opts,
                )
                .map_err(to_candle)?;
            }
            tensor(Storage::Cuda(CudaStorage::wrap_cuda_slice(out, policy.device.clone())), (n, p_rows.shape.row_stride))
        }));
        check(ctx)?;
        Ok(packed)
    }
}
