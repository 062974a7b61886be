//! The fused path from logits on the GPU: the twin of
//! [`cpu::policy_loss_from_logits`](crate::cpu::policy_loss_from_logits). Two passes over the
//! logits (the token forward, then the backward, optionally in place) and `O(N)` kernels in
//! between (the KL term, the policy loss), all on the caller's stream. The five `f32` per token
//! of temporaries and the stages' scratch live in one workspace ([`fused_workspace_bytes`]):
//! the caller's on the raw layer, the one [`DeviceFusedStats`] keeps on the safe one (allocated
//! once, reused by every call of the same size or smaller).

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut};

use crate::SampledKlStats;
use crate::cuda::DeviceStats;
use crate::cuda::aggregation::workspace_or_alloc;
use crate::cuda::kl::raw::SampledKlArgs;
use crate::cuda::kl::{launch_sampled, sampled_kl_workspace_bytes};
use crate::cuda::logprobs::raw::{TokenLogprobsArgs, TokenLogprobsBackwardArgs, backward_on, forward_on};
use crate::cuda::logprobs::token_logprobs_workspace_bytes;
use crate::cuda::{CudaStatus, LaunchContext, driver_error, non_null, opt_ptr};
use crate::logprobs::check_len;
use crate::{
    Cuda, DType, Element, Error, FusedPolicyInputs, FusedPolicyOptions, FusedPolicyStats, IndexType, Result,
    RowShape, TargetIndex,
};

use super::loss::{PolicyLossArgs, launch_policy, policy_loss_workspace_bytes};
use crate::PolicyLossStats;

/// The statistics of the fused path on the device, and the workspace its calls reuse (the
/// per-token temporaries and the stages' scratch: [`fused_workspace_bytes`], grown when a batch
/// needs more).
#[derive(Debug)]
pub struct DeviceFusedStats {
    policy: DeviceStats<PolicyLossStats>,
    kl: DeviceStats<SampledKlStats>,
    with_kl: bool,
    workspace: Option<CudaSlice<u8>>,
}

impl DeviceFusedStats {
    /// Allocates both statistics buffers on `stream`'s device (the workspace on first use).
    pub fn new(stream: &Arc<CudaStream>) -> Result<Self> {
        Ok(DeviceFusedStats {
            policy: DeviceStats::<PolicyLossStats>::new(stream)?,
            kl: DeviceStats::<SampledKlStats>::new(stream)?,
            with_kl: false,
            workspace: None,
        })
    }

    /// Synchronises `stream` and returns the statistics of the last call into `self`.
    pub fn read(&self, stream: &Arc<CudaStream>) -> Result<FusedPolicyStats> {
        Ok(FusedPolicyStats {
            policy: self.policy.read(stream)?,
            kl: if self.with_kl { Some(self.kl.read(stream)?) } else { None },
        })
    }
}

/// Bytes of one per-token f32 temporary, rounded up to 16.
fn temporary_bytes(rows: usize) -> usize {
    (rows * 4).div_ceil(16) * 16
}

/// Bytes of workspace the fused path uses for logits of `shape` and `dtype` over `sequences`:
/// five per-token f32 temporaries (logp, entropy, lse and the two upstream gradients), then
/// the scratch the stages take in turn (the split token forward's partials, the KL term's and
/// the loss's row records and mask count).
pub fn fused_workspace_bytes(shape: RowShape, dtype: DType, sequences: RowShape) -> usize {
    let scratch = token_logprobs_workspace_bytes(shape, dtype)
        .max(sampled_kl_workspace_bytes(sequences))
        .max(policy_loss_workspace_bytes(sequences));
    5 * temporary_bytes(shape.rows) + scratch
}

/// Buffers of a raw [`policy_loss_from_logits`](crate::cuda::raw::policy_loss_from_logits)
/// call: device addresses, 0 for an absent optional buffer.
#[derive(Debug, Clone, Copy)]
pub struct FusedPolicyArgs {
    /// Policy logits, `dtype`, laid out as `shape` (one row per token).
    pub logits: u64,
    /// Dtype of the logits and of the gradient.
    pub dtype: DType,
    /// Shape of the logits (row stride ≥ cols).
    pub shape: RowShape,
    /// `rows` sampled token ids of type `index_type`.
    pub targets: u64,
    /// Type of the token ids.
    pub index_type: IndexType,
    /// `rows` mask bytes (0 = padding), or 0.
    pub mask: u64,
    /// The dense `[B, T]` view of the token rows (`B·T = rows`).
    pub sequences: RowShape,
    /// `rows` f32 `log π_old(y_t)`.
    pub old_logp: u64,
    /// `rows` f32 advantages.
    pub advantages: u64,
    /// `rows` f32 reference log-probs for the KL term, or 0 for none (then no KL options).
    pub ref_logp: u64,
    /// The gradient w.r.t. the logits, laid out as `shape`; equal to `logits` in place.
    pub grad_logits: u64,
    /// 15 f64 of policy statistics out
    /// ([`policy_stats_from_words`](crate::cuda::raw::policy_stats_from_words)), or 0.
    pub policy_stats: u64,
    /// 13 f64 of KL statistics out
    /// ([`sampled_kl_stats_from_words`](crate::cuda::raw::sampled_kl_stats_from_words)), or 0.
    pub kl_stats: u64,
    /// [`fused_workspace_bytes`] bytes at a 16-byte aligned address, or 0 to allocate on the
    /// stream.
    pub workspace: u64,
    /// One u64 status word, initialised to [`STATUS_CLEAR`](crate::cuda::raw::STATUS_CLEAR).
    pub status: u64,
}

/// The fused path's launches on device addresses (the safe and raw entry points share them):
/// the token forward into the workspace's temporaries, the KL term, the policy loss (its
/// gradient accumulated onto the KL term's), then the backward into `grad_logits`.
///
/// # Safety
/// Every non-zero address of `a` is device memory of `stream`'s context of the size its
/// [`FusedPolicyArgs`] field documents; `grad_logits` equals `logits` or overlaps nothing
/// else; the workspace and statistics overlap nothing else; every buffer stays allocated until
/// the kernels ran.
pub(crate) unsafe fn launch_fused(
    stream: &Arc<CudaStream>,
    a: &FusedPolicyArgs,
    opts: &FusedPolicyOptions,
) -> Result<()> {
    let n = a.shape.rows;
    let seqs = a.sequences;
    check_sequences(a.shape, seqs)?;
    non_null(&[
        ("old_logp", a.old_logp),
        ("advantages", a.advantages),
        ("grad_logits", a.grad_logits),
        ("status", a.status),
    ])?;
    let kl = opts.validate(a.ref_logp != 0)?;
    if let Some(k) = kl {
        k.limits()?;
    }
    let t = opts.logprobs();
    let mut owned = None;
    let need = fused_workspace_bytes(a.shape, a.dtype, seqs);
    let (ws, _g) = workspace_or_alloc(stream, true, a.workspace, need, &mut owned)?;
    let stride = temporary_bytes(n) as u64;
    let [logp, entropy, lse, grad_logp, grad_entropy] = [0, 1, 2, 3, 4].map(|k| ws + k * stride);
    let scratch = ws + 5 * stride;
    let tokens = |logits| (logits, a.dtype, a.shape, a.targets, a.index_type, a.mask);
    let (logits, dtype, shape, targets, index_type, mask) = tokens(a.logits);
    let fwd = TokenLogprobsArgs {
        logits,
        dtype,
        shape,
        targets,
        index_type,
        mask,
        logp,
        entropy,
        lse,
        workspace: scratch,
        status: a.status,
    };
    // SAFETY: the caller's contract; the temporaries are `rows` f32 each inside the workspace
    // and the scratch holds the split forward's partials (fused_workspace_bytes).
    unsafe { forward_on(stream, &fwd, &t) }?;
    if let Some(k) = kl {
        let args = SampledKlArgs {
            shape: seqs,
            logp,
            ref_logp: a.ref_logp,
            mask,
            // The bias correction weights by π/π_old with the loss's own old log-probs.
            old_logp: if k.bias_correction { a.old_logp } else { 0 },
            values: 0,
            grad_logp,
            stats: a.kl_stats,
            workspace: scratch,
            status: a.status,
        };
        // SAFETY: as above; the token mask is the dense [B, T] mask of the sequences.
        unsafe { launch_sampled(stream, &args, k) }?;
    }
    let loss = PolicyLossArgs {
        shape: seqs,
        logp,
        old_logp: a.old_logp,
        advantages: a.advantages,
        mask,
        entropy,
        loss: 0,
        grad_logp,
        grad_entropy,
        accumulate: kl.is_some(),
        stats: a.policy_stats,
        workspace: scratch,
        status: a.status,
    };
    // SAFETY: as above; the scratch is free again (the KL term's kernels are ordered before).
    unsafe { launch_policy(stream, &loss, &opts.loss) }?;
    let bwd = TokenLogprobsBackwardArgs {
        logits,
        dtype,
        shape,
        targets,
        index_type,
        mask,
        lse,
        entropy,
        grad_logp,
        grad_entropy,
        grad_logits: a.grad_logits,
        status: a.status,
    };
    // SAFETY: as above; the saved lse, entropy and upstream gradients were written by the
    // launches before, on this stream.
    unsafe { backward_on(stream, &bwd, &t) }
}

/// The logits' shape, and `sequences` as the dense `[B, T]` view of its rows.
fn check_sequences(shape: RowShape, sequences: RowShape) -> Result<()> {
    shape.validate("logits")?;
    sequences.validate("sequences")?;
    let n = shape.rows;
    if sequences.row_stride != sequences.cols || sequences.len() != n {
        return Err(Error::ShapeMismatch { what: "sequences", min: n, max: n, actual: sequences.len() });
    }
    Ok(())
}

/// Checks the safe path's buffers, grows the workspace and runs [`launch_fused`] with
/// `grad_logits` (the logits' own address for the in-place path).
#[allow(clippy::too_many_arguments)]
fn run<T: Element, I: TargetIndex>(
    stream: &Arc<CudaStream>,
    logits: u64,
    shape: RowShape,
    inputs: &FusedPolicyInputs<'_, I, Cuda>,
    grad_logits: u64,
    stats: &mut DeviceFusedStats,
    status: &mut CudaStatus,
    opts: &FusedPolicyOptions,
) -> Result<()> {
    check_sequences(shape, inputs.sequences)?;
    let n = shape.rows;
    check_len("targets", inputs.tokens.targets.len(), n)?;
    if let Some(m) = &inputs.tokens.mask {
        check_len("mask", m.len(), n)?;
    }
    check_len("old_logp", inputs.old_logp.len(), n)?;
    check_len("advantages", inputs.advantages.len(), n)?;
    if let Some(r) = &inputs.ref_logp {
        check_len("ref_logp", r.len(), n)?;
    }
    opts.validate(inputs.ref_logp.is_some())?;
    let need = fused_workspace_bytes(shape, T::DTYPE, inputs.sequences);
    if stats.workspace.as_ref().is_none_or(|w| w.len() < need) {
        // SAFETY: the stages write every temporary and record before reading it.
        let w = unsafe { stream.alloc::<u8>(need.max(16)) }
            .map_err(driver_error("allocating the fused workspace"))?;
        stats.workspace = Some(w);
    }
    let with_kl = inputs.ref_logp.is_some();
    let s: &CudaStream = stream;
    let (targets, _g1) = inputs.tokens.targets.device_ptr(s);
    let (mask, _g2) = opt_ptr(&inputs.tokens.mask, s);
    let (old_logp, _g3) = inputs.old_logp.device_ptr(s);
    let (advantages, _g4) = inputs.advantages.device_ptr(s);
    let (ref_logp, _g5) = opt_ptr(&inputs.ref_logp, s);
    let (policy_stats, _g6) = stats.policy.words_ptr(s);
    let (kl_stats, _g7) = stats.kl.words_ptr(s);
    let (workspace, _g8) = stats.workspace.as_mut().expect("allocated above").device_ptr_mut(s);
    let (status, _g9) = status.device_ptr(s);
    let args = FusedPolicyArgs {
        logits,
        dtype: T::DTYPE,
        shape,
        targets,
        index_type: I::INDEX_TYPE,
        mask,
        sequences: inputs.sequences,
        old_logp,
        advantages,
        ref_logp,
        grad_logits,
        policy_stats,
        kl_stats: if with_kl { kl_stats } else { 0 },
        workspace,
        status,
    };
    // SAFETY: every address comes from a cudarc buffer of this stream's context whose length
    // was checked here or by the callers (logits and gradient cover the shape); the workspace
    // holds fused_workspace_bytes; the guards keep cudarc's event tracking in order until the
    // launches are enqueued.
    unsafe { launch_fused(stream, &args, opts) }?;
    stats.with_kl = with_kl;
    Ok(())
}

/// The policy loss straight from the policy logits on the GPU, the twin of
/// [`cpu::policy_loss_from_logits`](crate::cpu::policy_loss_from_logits): token forward, KL
/// term, policy loss with the entropy bonus, backward into `grad_logits`, all enqueued on
/// `ctx`'s stream (read the statistics with [`DeviceFusedStats::read`]). Input problems go to
/// `ctx`'s status word, which the stages share and where the lowest row wins: a bad token (an
/// out-of-range target, a row without a defined log-softmax) may be reported as the policy
/// loss's `NonFinite` at the token's sequence, whose index is lower.
///
/// ```no_run
/// use rlhf_kernels::cuda::{self, CudaDevice, LaunchContext, DeviceFusedStats};
/// use rlhf_kernels::{FusedPolicyInputs, FusedPolicyOptions, RowShape, Tokens};
/// let device = CudaDevice::new(0)?;
/// let s = device.stream();
/// let shape = RowShape::new(2, 4);
/// let logits = s.clone_htod(&[0.5f32, 1.0, -1.0, 0.0, 2.0, 0.0, 0.0, 0.0]).unwrap();
/// let targets = s.clone_htod(&[1i64, 0]).unwrap();
/// let (old, adv) = (s.clone_htod(&[-1.0f32, -0.5]).unwrap(), s.clone_htod(&[1.0f32, -1.0]).unwrap());
/// let mut grad = s.alloc_zeros::<f32>(8).unwrap();
/// let (mut stats, mut ctx) = (DeviceFusedStats::new(s)?, LaunchContext::new(s)?);
/// let inputs = FusedPolicyInputs::new(Tokens::new(&targets), RowShape::new(1, 2), &old, &adv);
/// cuda::policy_loss_from_logits(
///     &mut ctx,
///     &logits,
///     shape,
///     &inputs,
///     &mut grad,
///     &mut stats,
///     &FusedPolicyOptions::default(),
/// )?;
/// ctx.check()?;
/// println!("loss {}", stats.read(s)?.total_loss());
/// # Ok::<(), rlhf_kernels::Error>(())
/// ```
pub fn policy_loss_from_logits<T: Element, I: TargetIndex>(
    ctx: &mut LaunchContext,
    logits: &impl DevicePtr<T>,
    shape: RowShape,
    inputs: &FusedPolicyInputs<'_, I, Cuda>,
    grad_logits: &mut impl DevicePtrMut<T>,
    stats: &mut DeviceFusedStats,
    opts: &FusedPolicyOptions,
) -> Result<()> {
    let (stream, status) = ctx.parts();
    shape.check_buffer("logits", logits.len())?;
    shape.check_buffer("grad_logits", grad_logits.len())?;
    let s: &CudaStream = stream;
    let (x, _g1) = logits.device_ptr(s);
    let (g, _g2) = grad_logits.device_ptr_mut(s);
    run::<T, I>(stream, x, shape, inputs, g, stats, status, opts)
}

/// [`policy_loss_from_logits`] writing the gradient over the logits.
///
/// ```no_run
/// use rlhf_kernels::cuda::{self, CudaDevice, LaunchContext, DeviceFusedStats};
/// use rlhf_kernels::{FusedPolicyInputs, FusedPolicyOptions, RowShape, Tokens};
/// let device = CudaDevice::new(0)?;
/// let s = device.stream();
/// let mut logits = s.clone_htod(&[0.0f32, 1.0, 2.0]).unwrap();
/// let targets = s.clone_htod(&[2i64]).unwrap();
/// let (old, adv) = (s.clone_htod(&[-0.5f32]).unwrap(), s.clone_htod(&[1.0f32]).unwrap());
/// let (mut stats, mut ctx) = (DeviceFusedStats::new(s)?, LaunchContext::new(s)?);
/// let inputs = FusedPolicyInputs::new(Tokens::new(&targets), RowShape::new(1, 1), &old, &adv);
/// cuda::policy_loss_from_logits_in_place(
///     &mut ctx,
///     &mut logits,
///     RowShape::new(1, 3),
///     &inputs,
///     &mut stats,
///     &FusedPolicyOptions::default(),
/// )?;
/// ctx.check()?;
/// # Ok::<(), rlhf_kernels::Error>(())
/// ```
pub fn policy_loss_from_logits_in_place<T: Element, I: TargetIndex>(
    ctx: &mut LaunchContext,
    logits: &mut (impl DevicePtr<T> + DevicePtrMut<T>),
    shape: RowShape,
    inputs: &FusedPolicyInputs<'_, I, Cuda>,
    stats: &mut DeviceFusedStats,
    opts: &FusedPolicyOptions,
) -> Result<()> {
    let (stream, status) = ctx.parts();
    shape.check_buffer("logits", logits.len())?;
    let (x, _g) = logits.device_ptr_mut(stream);
    run::<T, I>(stream, x, shape, inputs, x, stats, status, opts)
}
