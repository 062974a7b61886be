//! The backward of the exact divergences on the GPU: into the policy logits, into a buffer or
//! in place, from the forward's saved statistics.

use std::sync::Arc;

use cudarc::driver::{CudaStream, DevicePtr, DevicePtrMut, LaunchConfig};

use super::exact::{
    BLOCK, ExactKernel, ExactParams, PairArgs, check_reference, chunks, grid_blocks, kernel, launch_exact,
};
use crate::cuda::{CudaStatus, LaunchContext, opt_ptr};
use crate::logprobs::check_len;
use crate::{
    Cuda, Element, Error, ExactDivergence, ExactKlGrads, ExactKlOptions, ReferenceRows, Result, RowShape,
};

/// Buffers of a raw [`exact_kl_backward`](crate::cuda::raw::exact_kl_backward) call: device
/// addresses, 0 for an absent optional buffer.
#[derive(Debug, Clone, Copy)]
pub struct ExactKlBackwardArgs {
    /// The two logits rows and their mask (the gradient has the policy's dtype and shape).
    pub pair: PairArgs,
    /// `rows` f32: the upstream gradient `g[n]` of each row's divergence.
    pub grad: u64,
    /// `rows` f32: the forward's policy log-sum-exp.
    pub policy_lse: u64,
    /// `rows` f32: the forward's reference log-sum-exp.
    pub ref_lse: u64,
    /// `rows` f32: the forward's value (required for `KL[π‖π_ref]`), or 0.
    pub value: u64,
    /// `rows` f32: the forward's policy term (required for the JSD), or 0.
    pub policy_term: u64,
    /// The gradient w.r.t. the policy logits, laid out as `policy_shape`; equal to `policy`
    /// for the in-place backward.
    pub grad_policy: u64,
    /// One u64 status word, initialised to [`STATUS_CLEAR`](crate::cuda::raw::STATUS_CLEAR).
    pub status: u64,
}

/// The GPU twin of [`cpu::exact_kl_backward`](crate::cpu::exact_kl_backward), enqueued on
/// `ctx`'s stream: the gradient of `Σ_n g[n]·D[n]` with respect to the policy logits, written into
/// `grad_policy` (the policy's shape and dtype). Rows with a non-finite saved statistic or
/// upstream gradient get NaN and are reported in `ctx`'s status word.
pub fn exact_kl_backward<P: Element, Q: Element>(
    ctx: &mut LaunchContext,
    policy: &impl DevicePtr<P>,
    policy_shape: RowShape,
    reference: &ReferenceRows<'_, Q, Cuda>,
    grads: &ExactKlGrads<'_, Cuda>,
    grad_policy: &mut impl DevicePtrMut<P>,
    opts: &ExactKlOptions,
) -> Result<()> {
    let (stream, status) = ctx.parts();
    policy_shape.check_buffer("grad_policy", grad_policy.len())?;
    let s: &CudaStream = stream;
    let (p, _gp) = policy.device_ptr(s);
    let (dx, _gd) = grad_policy.device_ptr_mut(s);
    backward::<P, Q>(stream, [p, dx], policy.len(), policy_shape, reference, grads, status, opts)
}

/// [`exact_kl_backward`] written over the policy logits (no gradient buffer).
pub fn exact_kl_backward_in_place<P: Element, Q: Element>(
    ctx: &mut LaunchContext,
    policy: &mut impl DevicePtrMut<P>,
    policy_shape: RowShape,
    reference: &ReferenceRows<'_, Q, Cuda>,
    grads: &ExactKlGrads<'_, Cuda>,
    opts: &ExactKlOptions,
) -> Result<()> {
    let (stream, status) = ctx.parts();
    let len = policy.len();
    let s: &CudaStream = stream;
    let (p, _gp) = policy.device_ptr_mut(s);
    backward::<P, Q>(stream, [p, p], len, policy_shape, reference, grads, status, opts)
}

#[allow(clippy::too_many_arguments)] // private: the public entry points group their inputs
fn backward<P: Element, Q: Element>(
    stream: &Arc<CudaStream>,
    [p, dx]: [u64; 2],
    policy_len: usize,
    policy_shape: RowShape,
    reference: &ReferenceRows<'_, Q, Cuda>,
    grads: &ExactKlGrads<'_, Cuda>,
    status: &mut CudaStatus,
    opts: &ExactKlOptions,
) -> Result<()> {
    check_reference(policy_len, policy_shape, reference)?;
    let rows = policy_shape.rows;
    for (what, v) in [("grad", &grads.grad), ("policy_lse", &grads.policy_lse), ("ref_lse", &grads.ref_lse)] {
        check_len(what, v.len(), rows)?;
    }
    for (what, v) in [("value", &grads.value), ("policy_term", &grads.policy_term)] {
        v.as_ref().map_or(Ok(()), |v| check_len(what, v.len(), rows))?;
    }
    let s: &CudaStream = stream;
    let (pair, _g1) = PairArgs::of::<P, Q>(s, p, policy_shape, reference);
    let (policy_lse, _g3) = grads.policy_lse.device_ptr(s);
    let (ref_lse, _g4) = grads.ref_lse.device_ptr(s);
    let (value, _g5) = opt_ptr(&grads.value, s);
    let (policy_term, _g6) = opt_ptr(&grads.policy_term, s);
    let (grad, _g7) = grads.grad.device_ptr(s);
    let (st, _g8) = status.device_ptr(s);
    let args = ExactKlBackwardArgs {
        pair,
        grad,
        policy_lse,
        ref_lse,
        value,
        policy_term,
        grad_policy: dx,
        status: st,
    };
    // SAFETY: every address comes from a cudarc buffer of this stream's context whose length
    // was checked above (`p` and `dx` by the callers: the same buffer when in place, which
    // the kernel supports); the guards keep cudarc's event tracking in order.
    unsafe { launch_backward(stream, &args, opts) }
}

/// The launch of an exact backward on device addresses (the safe and raw entry points share
/// it).
///
/// # Safety
/// Every non-zero address of `a` is device memory of `stream`'s context of the size its
/// [`ExactKlBackwardArgs`] field documents; `grad_policy` equals `policy` or overlaps nothing
/// else; every buffer stays allocated until the kernel ran.
pub(super) unsafe fn launch_backward(
    stream: &Arc<CudaStream>,
    a: &ExactKlBackwardArgs,
    opts: &ExactKlOptions,
) -> Result<()> {
    let saved = match opts.divergence {
        ExactDivergence::PolicyRef => Some(a.value).filter(|&v| v != 0).ok_or("value"),
        ExactDivergence::RefPolicy => Ok(a.grad),
        ExactDivergence::Jsd { .. } => Some(a.policy_term).filter(|&v| v != 0).ok_or("policy_term"),
    };
    let saved = saved.map_err(|name| Error::InvalidOption {
        name,
        value: "missing".into(),
        expected: "the forward's saved value (KL[policy||ref]) or policy_term (JSD)",
    })?;
    let inv_tau = opts.inv_temperature()?;
    let shape = a.pair.policy_shape;
    let blocks = grid_blocks(shape.rows, chunks(shape))?;
    let (divergence, beta) = opts.divergence.code();
    let params = ExactParams {
        grad: a.grad_policy,
        lse_p: a.policy_lse,
        lse_q: a.ref_lse,
        saved,
        g: a.grad,
        divergence,
        beta,
        ..a.pair.params(inv_tau)
    };
    let name = kernel(ExactKernel::Backward, a.pair.policy_dtype, a.pair.ref_dtype);
    let cfg = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 };
    // SAFETY: `exact_kl_backward_<p>_<q>(ExactParams, unsigned long long*)` with one block of 256
    // threads per (row, chunk); the caller guarantees the buffers (see # Safety); for KL[ref‖π]
    // `saved` points at `grad` and is never read.
    unsafe { launch_exact(stream, name, cfg, &params, Some(a.status)) }
}
