//! The raw layer of the PPO losses: device addresses and a caller-owned stream, for callers
//! that own their memory (PyTorch through its data pointers, tch-rs, burn). Same launches as
//! the safe functions.

use super::fused::launch_fused;
pub use super::fused::{FusedPolicyArgs, fused_workspace_bytes};
use super::loss::{PolicyLossArgs, launch_policy};
use super::value::launch_value;
pub use super::value::{VALUE_STATS_WORDS, ValueLossArgs, value_stats_from_words, value_stats_to_words};
use crate::cuda::{RawStream, non_null};
use crate::{FusedPolicyOptions, PolicyLossOptions, Result, ValueLossOptions};

/// [`cuda::policy_loss`](crate::cuda::policy_loss) on raw device pointers, enqueued on a
/// stream owned by the caller. Rows with non-finite inputs are reported in the status word
/// (decode it with [`decode_status`](crate::cuda::raw::decode_status)).
///
/// # Safety
/// - `stream.stream` is a live stream of device `stream.ordinal`'s primary context (or null);
/// - every non-zero address points to device memory of that context holding what its
///   [`PolicyLossArgs`] field documents for `args.shape` (per-token buffers
///   `shape.min_len()` elements); the outputs, statistics and workspace overlap nothing else;
/// - every buffer stays allocated, and untouched by other streams, until the kernels ran.
///
/// ```no_run
/// use rlhf_kernels::cuda::raw::{self, PolicyLossArgs, RawStream};
/// use rlhf_kernels::{PolicyLossOptions, RowShape};
/// # let (logp, old, adv, grad, status, cu_stream) = (0u64, 0u64, 0u64, 0u64, 0u64, std::ptr::null_mut());
/// let args = PolicyLossArgs { shape: RowShape::new(64, 1024), logp, old_logp: old, advantages: adv, mask: 0,
///     entropy: 0, loss: 0, grad_logp: grad, grad_entropy: 0, accumulate: false, stats: 0, workspace: 0, status };
/// // SAFETY: pointers from tensors that live on device 0 and outlive the launch.
/// unsafe { raw::policy_loss(RawStream { ordinal: 0, stream: cu_stream }, &args, &PolicyLossOptions::default())? };
/// # Ok::<(), rlhf_kernels::Error>(())
/// ```
pub unsafe fn policy_loss(stream: RawStream, args: &PolicyLossArgs, opts: &PolicyLossOptions) -> Result<()> {
    non_null(&[
        ("logp", args.logp),
        ("old_logp", args.old_logp),
        ("advantages", args.advantages),
        ("status", args.status),
    ])?;
    args.shape.validate("policy loss")?;
    opts.validate()?;
    // SAFETY: the caller guarantees the stream belongs to the ordinal's primary context.
    let stream = unsafe { stream.borrow() }?;
    // SAFETY: the caller guarantees every buffer (see # Safety).
    unsafe { launch_policy(&stream, args, opts) }
}

/// [`cuda::value_loss`](crate::cuda::value_loss) on raw device pointers, enqueued on a stream
/// owned by the caller. Rows with a non-finite input or an overflow are reported in the status
/// word.
///
/// # Safety
/// As [`policy_loss`], for the buffers of [`ValueLossArgs`].
pub unsafe fn value_loss(stream: RawStream, args: &ValueLossArgs, opts: &ValueLossOptions) -> Result<()> {
    non_null(&[
        ("values", args.values),
        ("old_values", args.old_values),
        ("returns", args.returns),
        ("status", args.status),
    ])?;
    args.shape.validate("value loss")?;
    opts.validate()?;
    // SAFETY: the caller guarantees the stream belongs to the ordinal's primary context.
    let stream = unsafe { stream.borrow() }?;
    // SAFETY: the caller guarantees every buffer (see # Safety).
    unsafe { launch_value(&stream, args, opts) }
}

/// [`cuda::policy_loss_from_logits`](crate::cuda::policy_loss_from_logits) on raw device
/// pointers, enqueued on a stream owned by the caller: the token forward, the KL term (when
/// `args.ref_logp` is not 0, with the options' KL estimator), the policy loss with the entropy bonus and
/// the backward into `args.grad_logits` (in place when it equals `args.logits`), the
/// temporaries in `args.workspace`. Row problems are reported in the status word.
///
/// # Safety
/// - `stream.stream` is a live stream of device `stream.ordinal`'s primary context (or null);
/// - every non-zero address points to device memory of that context holding what its
///   [`FusedPolicyArgs`] field documents (`logits` and `grad_logits`: `shape.min_len()`
///   elements of `dtype`; the per-token buffers `shape.rows` elements); `grad_logits` equals
///   `logits` or overlaps nothing else; the workspace and statistics overlap nothing else;
/// - every buffer stays allocated, and untouched by other streams, until the kernels ran.
pub unsafe fn policy_loss_from_logits(
    stream: RawStream,
    args: &FusedPolicyArgs,
    opts: &FusedPolicyOptions,
) -> Result<()> {
    non_null(&[("logits", args.logits), ("targets", args.targets)])?;
    // SAFETY: the caller guarantees the stream belongs to the ordinal's primary context.
    let stream = unsafe { stream.borrow() }?;
    // SAFETY: the caller guarantees every buffer (see # Safety).
    unsafe { launch_fused(&stream, args, opts) }
}
