//! CUDA token log-probabilities, entropy and lse, their one-pass backward (optionally in
//! place) and the vocabulary-shard partials: the safe wrappers over cudarc views. The
//! launches and the raw pointer layer are in `token_launch.rs`.
//!
//! Every row is cut into fixed chunks (4096 f32 or 8192 f16/bf16 logits). Many rows: one
//! block walks each row. Few long rows (under 1024): one block per chunk writes a
//! [`VocabPartial`] to a workspace and a second kernel merges them, which fills the GPU even for
//! a single row. Both paths run the same operations in the same order, so the result depends
//! on V and the dtype only: one row alone equals the same row in a batch of 4096, bit for bit.

use std::sync::Arc;

use cudarc::driver::{CudaStream, DevicePtr, DevicePtrMut};

use super::raw::{FinishVocabArgs, VocabShardArgs, finish_partials_on, shard_partials_on};
use super::token_launch::{
    BackwardArgs, ForwardArgs, RowSelect, chunks, launch_backward, launch_forward, split,
};
use crate::cuda::{CudaStatus, LaunchContext, opt_ptr, opt_ptr_mut};
use crate::logprobs::check_len;
use crate::{
    Cuda, DType, Element, Result, RowShape, TargetIndex, TokenGrads, TokenLogprobsOptions, TokenOutputs,
    Tokens, VocabPartial,
};

/// Bytes of workspace [`token_logprobs`] uses for `shape` and `dtype`: 0 when each row is
/// walked by one block, else one [`VocabPartial`] per (row, chunk).
pub fn token_logprobs_workspace_bytes(shape: RowShape, dtype: DType) -> usize {
    if split(shape, dtype) { shape.rows * chunks(shape, dtype) * size_of::<VocabPartial>() } else { 0 }
}

/// Log-probability of each row's target, the row's entropy and its log-sum-exp, for any subset
/// requested in `out`, enqueued on `ctx`'s stream — the GPU twin of
/// [`cpu::token_logprobs`](crate::cpu::token_logprobs) (same formulas):
///
/// `logp = z_y − lse`, `H = lse − Σ_v p_v·z_v`, `lse = ln Σ_v exp(z_v)`, `z = logits / τ`.
///
/// Reads each logit once (16-byte loads, f32 accumulation) and writes 4 bytes per row and output;
/// padding rows are not read and give 0. Rows without a defined result (NaN, `+inf`, only `-inf`, a
/// target outside `[0, V)`) get NaN and are reported in `ctx`'s status word; shape and option
/// errors are returned at once. Without `out.workspace`, few long rows allocate
/// [`token_logprobs_workspace_bytes`] on the stream (stream-ordered with no host synchronisation on
/// GPUs with memory pools; cudarc synchronises on older ones).
///
/// A row whose finite logits put `max logit / τ` beyond f32's range has no f32 `lse`: it gets
/// NaN and is reported as [`RowProblem::Overflow`](crate::RowProblem::Overflow), as on the CPU.
///
/// ```no_run
/// use rlhf_kernels::cuda::{self, CudaDevice, LaunchContext};
/// use rlhf_kernels::{TokenOutputs, Tokens};
/// use rlhf_kernels::{bf16, RowShape, TokenLogprobsOptions};
/// let device = CudaDevice::new(0)?;
/// let s = device.stream();
/// let shape = RowShape::new(2, 4);
/// let logits = s.clone_htod(&[bf16::from_f32(1.0); 8]).unwrap();
/// let targets = s.clone_htod(&[3i64, 0]).unwrap();
/// let mut logp = s.alloc_zeros::<f32>(2).unwrap();
/// let mut ctx = LaunchContext::new(s)?;
/// cuda::token_logprobs(
///     &mut ctx,
///     &logits,
///     shape,
///     &Tokens::new(targets.as_view()),
///     TokenOutputs::default().logp(logp.as_view_mut()),
///     &TokenLogprobsOptions::default(),
/// )?;
/// ctx.check()?; // logp = [ln 1/4, ln 1/4]
/// # Ok::<(), rlhf_kernels::Error>(())
/// ```
pub fn token_logprobs<T: Element, I: TargetIndex>(
    ctx: &mut LaunchContext,
    logits: &impl DevicePtr<T>,
    shape: RowShape,
    tokens: &Tokens<'_, I, Cuda>,
    mut out: TokenOutputs<'_, Cuda>,
    opts: &TokenLogprobsOptions,
) -> Result<()> {
    let (stream, status) = ctx.parts();
    shape.check_buffer("logits", logits.len())?;
    tokens.check(shape.rows)?;
    out.check(shape.rows)?;
    let inv_tau = opts.inv_temperature()?;
    let need = token_logprobs_workspace_bytes(shape, T::DTYPE);
    if let Some(w) = &out.workspace {
        crate::cuda::aggregation::check_workspace(w.len(), need)?;
    }
    let s: &CudaStream = stream;
    let (x, _gx) = logits.device_ptr(s);
    let (targets, _gt) = tokens.targets.device_ptr(s);
    let (mask, _gm) = opt_ptr(&tokens.mask, s);
    let (logp, _g1) = opt_ptr_mut(&mut out.logp, s);
    let (entropy, _g2) = opt_ptr_mut(&mut out.entropy, s);
    let (lse, _g3) = opt_ptr_mut(&mut out.lse, s);
    let (workspace, _g4) = opt_ptr_mut(&mut out.workspace, s);
    let (st, _g5) = status.device_ptr(s);
    let sel = RowSelect::new(targets, I::INDEX_TYPE, mask, opts);
    let args = ForwardArgs {
        logits: x,
        dtype: T::DTYPE,
        shape,
        sel,
        inv_tau,
        outputs: [logp, entropy, lse],
        status: st,
    };
    // SAFETY: every pointer comes from a live cudarc view of this stream's context, lengths checked above
    // (logits ≥ min_len, targets/mask/outputs = rows, workspace ≥ the split path's need); outputs are
    // mutable borrows (no aliasing); the guards order cudarc's event tracking around the launches.
    unsafe { launch_forward(stream, &args, workspace) }
}

/// Backward of [`token_logprobs`] into `grad_logits` (the logits' shape and dtype), enqueued
/// on `ctx`'s stream — the GPU twin of
/// [`cpu::token_logprobs_backward`](crate::cpu::token_logprobs_backward):
///
/// `grad_v = (g_logp·(1[v = y] − p_v) − g_H·p_v·((z_v − lse) + H)) / τ`, `p_v = exp(z_v − lse)`.
///
/// One pass: reads each logit once, writes each gradient once. Padding rows get 0. Rows whose
/// saved `lse`/`H` or upstream gradient is not finite, or whose target is out of range, get
/// NaN and are reported in `ctx`'s status word.
///
/// ```no_run
/// use rlhf_kernels::cuda::{self, CudaDevice, LaunchContext};
/// use rlhf_kernels::{TokenGrads, Tokens};
/// use rlhf_kernels::{RowShape, TokenLogprobsOptions};
/// let device = CudaDevice::new(0)?;
/// let s = device.stream();
/// let logits = s.clone_htod(&[0.0f32, 0.0]).unwrap();
/// let targets = s.clone_htod(&[0i32]).unwrap();
/// let lse = s.clone_htod(&[2f32.ln()]).unwrap();
/// let g = s.clone_htod(&[1.0f32]).unwrap();
/// let mut grad = s.alloc_zeros::<f32>(2).unwrap();
/// let mut ctx = LaunchContext::new(s)?;
/// cuda::token_logprobs_backward(
///     &mut ctx,
///     &logits,
///     RowShape::new(1, 2),
///     &Tokens::new(targets.as_view()),
///     &TokenGrads::new(lse.as_view()).grad_logp(g.as_view()),
///     &mut grad,
///     &TokenLogprobsOptions::default(),
/// )?;
/// ctx.check()?; // grad = [0.5, -0.5]
/// # Ok::<(), rlhf_kernels::Error>(())
/// ```
pub fn token_logprobs_backward<T: Element, I: TargetIndex>(
    ctx: &mut LaunchContext,
    logits: &impl DevicePtr<T>,
    shape: RowShape,
    tokens: &Tokens<'_, I, Cuda>,
    grads: &TokenGrads<'_, Cuda>,
    grad_logits: &mut impl DevicePtrMut<T>,
    opts: &TokenLogprobsOptions,
) -> Result<()> {
    let (stream, status) = ctx.parts();
    shape.check_buffer("logits", logits.len())?;
    shape.check_buffer("grad_logits", grad_logits.len())?;
    let s: &CudaStream = stream;
    let (x, _gx) = logits.device_ptr(s);
    let (dx, _gd) = grad_logits.device_ptr_mut(s);
    backward_common(stream, x, dx, shape, tokens, grads, status, opts, T::DTYPE)
}

/// [`token_logprobs_backward`] written over the logits themselves (no gradient buffer; as
/// Liger does). Every element is read before the same thread overwrites it; the result equals
/// the out-of-place backward bit for bit.
///
/// ```no_run
/// use rlhf_kernels::cuda::{self, CudaDevice, LaunchContext};
/// use rlhf_kernels::{TokenGrads, Tokens};
/// use rlhf_kernels::{RowShape, TokenLogprobsOptions};
/// let device = CudaDevice::new(0)?;
/// let s = device.stream();
/// let mut logits = s.clone_htod(&[0.0f32, 0.0]).unwrap();
/// let targets = s.clone_htod(&[0i32]).unwrap();
/// let lse = s.clone_htod(&[2f32.ln()]).unwrap();
/// let g = s.clone_htod(&[1.0f32]).unwrap();
/// let mut ctx = LaunchContext::new(s)?;
/// cuda::token_logprobs_backward_in_place(
///     &mut ctx,
///     &mut logits,
///     RowShape::new(1, 2),
///     &Tokens::new(targets.as_view()),
///     &TokenGrads::new(lse.as_view()).grad_logp(g.as_view()),
///     &TokenLogprobsOptions::default(),
/// )?;
/// ctx.check()?; // logits now hold the gradient [0.5, -0.5]
/// # Ok::<(), rlhf_kernels::Error>(())
/// ```
pub fn token_logprobs_backward_in_place<T: Element, I: TargetIndex>(
    ctx: &mut LaunchContext,
    logits: &mut impl DevicePtrMut<T>,
    shape: RowShape,
    tokens: &Tokens<'_, I, Cuda>,
    grads: &TokenGrads<'_, Cuda>,
    opts: &TokenLogprobsOptions,
) -> Result<()> {
    let (stream, status) = ctx.parts();
    shape.check_buffer("logits", logits.len())?;
    let s: &CudaStream = stream;
    let (x, _gx) = logits.device_ptr_mut(s);
    backward_common(stream, x, x, shape, tokens, grads, status, opts, T::DTYPE)
}

#[allow(clippy::too_many_arguments)] // private: the public entry points group their inputs
fn backward_common<I: TargetIndex>(
    stream: &Arc<CudaStream>,
    x: u64,
    dx: u64,
    shape: RowShape,
    tokens: &Tokens<'_, I, Cuda>,
    grads: &TokenGrads<'_, Cuda>,
    status: &mut CudaStatus,
    opts: &TokenLogprobsOptions,
    dtype: DType,
) -> Result<()> {
    tokens.check(shape.rows)?;
    grads.check(shape.rows)?;
    let inv_tau = opts.inv_temperature()?;
    let s: &CudaStream = stream;
    let (targets, _gt) = tokens.targets.device_ptr(s);
    let (mask, _gm) = opt_ptr(&tokens.mask, s);
    let (lse, _g1) = grads.lse.device_ptr(s);
    let (entropy, _g2) = opt_ptr(&grads.entropy, s);
    let (g_logp, _g3) = opt_ptr(&grads.grad_logp, s);
    let (g_entropy, _g4) = opt_ptr(&grads.grad_entropy, s);
    let (st, _g5) = status.device_ptr(s);
    let args = BackwardArgs {
        dtype,
        shape,
        sel: RowSelect::new(targets, I::INDEX_TYPE, mask, opts),
        inv_tau,
        logits: x,
        grad: dx,
        saved: [lse, entropy],
        upstream: [g_logp, g_entropy],
        status: st,
    };
    // SAFETY: `x`/`dx` come from the caller's checked cudarc buffers (the same buffer when in
    // place, which the kernel supports); the per-row buffers' lengths were checked above; the
    // guards keep cudarc's event tracking in order until the launch is enqueued.
    unsafe { launch_backward(stream, &args) }
}

/// Per-row [`VocabPartial`]s of a vocabulary shard on the GPU (columns
/// `[vocab_offset, vocab_offset + cols)` of the full vocabulary), the GPU twin of
/// [`cpu::vocab_shard_partials`](crate::cpu::vocab_shard_partials). Padding rows give
/// [`VocabPartial::EMPTY`]; row problems travel in the flags. Gather the partials of all
/// shards as `[shards][rows]` and finish with [`finish_vocab_partials`].
pub fn vocab_shard_partials<T: Element, I: TargetIndex>(
    ctx: &mut LaunchContext,
    logits: &impl DevicePtr<T>,
    shape: RowShape,
    tokens: &Tokens<'_, I, Cuda>,
    vocab_offset: usize,
    partials: &mut impl DevicePtrMut<VocabPartial>,
    opts: &TokenLogprobsOptions,
) -> Result<()> {
    let stream = ctx.stream();
    shape.check_buffer("logits", logits.len())?;
    tokens.check(shape.rows)?;
    check_len("partials", partials.len(), shape.rows)?;
    let s: &CudaStream = stream;
    let (x, _gx) = logits.device_ptr(s);
    let (targets, _gt) = tokens.targets.device_ptr(s);
    let (mask, _gm) = opt_ptr(&tokens.mask, s);
    let (p, _gp) = partials.device_ptr_mut(s);
    let args = VocabShardArgs {
        logits: x,
        dtype: T::DTYPE,
        shape,
        targets,
        index_type: I::INDEX_TYPE,
        mask,
        vocab_offset,
        partials: p,
    };
    // SAFETY: every address comes from a cudarc buffer of this stream's context whose length
    // was checked above; the guards keep cudarc's event tracking in order until the launch.
    unsafe { shard_partials_on(stream, &args, opts) }
}

/// Merges the [`VocabPartial`]s of `shards` vocabulary shards (`[shards][rows]`, shard order)
/// and writes the requested outputs, as [`token_logprobs`] would for the whole vocabulary.
/// Rows without a defined result (including a target no shard holds) get NaN and are reported
/// in `ctx`'s status word.
pub fn finish_vocab_partials<I: TargetIndex>(
    ctx: &mut LaunchContext,
    partials: &impl DevicePtr<VocabPartial>,
    shards: usize,
    tokens: &Tokens<'_, I, Cuda>,
    mut out: TokenOutputs<'_, Cuda>,
    opts: &TokenLogprobsOptions,
) -> Result<()> {
    let (stream, status) = ctx.parts();
    let rows = tokens.targets.len();
    tokens.check(rows)?;
    out.check(rows)?;
    check_len("partials", partials.len(), shards.saturating_mul(rows))?;
    let s: &CudaStream = stream;
    let (p, _gp) = partials.device_ptr(s);
    let (targets, _gt) = tokens.targets.device_ptr(s);
    let (mask, _gm) = opt_ptr(&tokens.mask, s);
    let (logp, _g1) = opt_ptr_mut(&mut out.logp, s);
    let (entropy, _g2) = opt_ptr_mut(&mut out.entropy, s);
    let (lse, _g3) = opt_ptr_mut(&mut out.lse, s);
    let (status, _g5) = status.device_ptr(s);
    let args = FinishVocabArgs {
        partials: p,
        shards,
        rows,
        targets,
        index_type: I::INDEX_TYPE,
        mask,
        logp,
        entropy,
        lse,
        status,
    };
    // SAFETY: every address comes from a cudarc buffer of this stream's context whose length
    // was checked above (partials: shards·rows records); the guards keep cudarc's event
    // tracking in order until the launch.
    unsafe { finish_partials_on(stream, &args, opts) }
}
