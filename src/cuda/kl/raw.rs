//! The raw layer of the KL family: device addresses, dtypes and shapes, for callers that own
//! their memory (PyTorch through its data pointers, tch-rs, burn). Same launches as the safe
//! functions.

use super::exact::launch_forward;
pub use super::exact::{ExactKlArgs, PairArgs};
pub use super::exact_backward::ExactKlBackwardArgs;
use super::exact_backward::launch_backward;
pub use super::sampled::{
    KlRewardsArgs, SAMPLED_KL_STATS_WORDS, SampledKlArgs, sampled_kl_stats_from_words,
    sampled_kl_stats_to_words,
};
use super::sampled::{launch_rewards, launch_sampled};
pub use super::shards::{ExactKlShardArgs, FinishExactKlArgs, FinishJsdArgs, JsdShardArgs};
use super::shards::{
    launch_finish_jsd, launch_finish_partials, launch_jsd_shard_sums, launch_shard_partials,
};
use crate::cuda::{RawStream, non_null};
use crate::{Error, ExactKlOptions, KlRewardsOptions, Result, SampledKlOptions};

/// [`cuda::sampled_kl`](crate::cuda::sampled_kl) on raw device pointers, enqueued on a stream
/// owned by the caller: per-token values, `∂loss/∂logp` and the 13 statistics words, each when
/// its address is not 0 (`old_logp`: the bias correction's weights). Rows with a non-finite
/// `old_logp`, a NaN, an infinite KL or an overflow are reported in the status word (decode it
/// with [`decode_status`](crate::cuda::raw::decode_status)).
///
/// # Safety
/// - `stream.stream` is a live stream of device `stream.ordinal`'s primary context (or null);
/// - every non-zero address points to device memory of that context holding what its
///   [`SampledKlArgs`] field documents for `args.shape` (per-token buffers `shape.min_len()`
///   elements); the outputs, statistics and workspace overlap nothing else;
/// - every buffer stays allocated, and untouched by other streams, until the kernels ran.
///
/// ```no_run
/// use rlhf_kernels::cuda::raw::{self, RawStream, SampledKlArgs};
/// use rlhf_kernels::{KlEstimator, RowShape, SampledKlOptions};
/// # let (logp, ref_logp, grad, status, cu_stream) = (0u64, 0u64, 0u64, 0u64, std::ptr::null_mut());
/// let args = SampledKlArgs { shape: RowShape::new(64, 1024), logp, ref_logp, mask: 0, old_logp: 0, values: 0,
///     grad_logp: grad, stats: 0, workspace: 0, status };
/// let opts = SampledKlOptions::new(KlEstimator::K3).coef(0.05);
/// // SAFETY: pointers from tensors that live on device 0 and outlive the launch.
/// unsafe { raw::sampled_kl(RawStream { ordinal: 0, stream: cu_stream }, &args, &opts)? };
/// # Ok::<(), rlhf_kernels::Error>(())
/// ```
pub unsafe fn sampled_kl(stream: RawStream, args: &SampledKlArgs, opts: &SampledKlOptions) -> Result<()> {
    non_null(&[("logp", args.logp), ("ref_logp", args.ref_logp), ("status", args.status)])?;
    args.shape.validate("sampled KL")?;
    opts.limits()?;
    // SAFETY: the caller guarantees the stream belongs to the ordinal's primary context.
    let stream = unsafe { stream.borrow() }?;
    // SAFETY: the caller guarantees every buffer (see # Safety).
    unsafe { launch_sampled(&stream, args, opts) }
}

/// [`cuda::kl_rewards`](crate::cuda::kl_rewards) on raw device pointers: `r_t = −β·kl_t` on
/// valid tokens plus each sequence's score on its last valid token, 0 on padding. A non-finite
/// KL or score, or an overflowed reward, is reported in the status word.
///
/// # Safety
/// As [`sampled_kl`], for the buffers of [`KlRewardsArgs`]; `rewards` overlaps nothing else.
pub unsafe fn kl_rewards(stream: RawStream, args: &KlRewardsArgs, opts: &KlRewardsOptions) -> Result<()> {
    non_null(&[
        ("kl", args.kl),
        ("scores", args.scores),
        ("rewards", args.rewards),
        ("status", args.status),
    ])?;
    args.shape.validate("kl_rewards")?;
    opts.validate()?;
    // SAFETY: the caller guarantees the stream belongs to the ordinal's primary context.
    let stream = unsafe { stream.borrow() }?;
    // SAFETY: the caller guarantees every buffer (see # Safety).
    unsafe { launch_rewards(&stream, args, opts) }
}

/// [`cuda::exact_kl`](crate::cuda::exact_kl) on raw device pointers, enqueued on a stream
/// owned by the caller. Row problems are reported in the status word (decode it with
/// [`decode_status`](crate::cuda::raw::decode_status)).
///
/// # Safety
/// - `stream.stream` is a live stream of device `stream.ordinal`'s primary context (or null);
/// - every non-zero address points to device memory of that context of the size its field
///   documents (`pair.policy`: `pair.policy_shape.min_len()` elements of `pair.policy_dtype`,
///   `pair.reference` likewise); the outputs and the workspace overlap nothing else;
/// - every buffer stays allocated, and untouched by other streams, until the kernels ran.
pub unsafe fn exact_kl(stream: RawStream, args: &ExactKlArgs, opts: &ExactKlOptions) -> Result<()> {
    args.pair.check()?;
    non_null(&[("status", args.status)])?;
    if [args.value, args.policy_lse, args.ref_lse, args.policy_term].iter().all(|&p| p == 0) {
        return Err(Error::InvalidOption {
            name: "outputs",
            value: "none requested".into(),
            expected: "at least one of value, policy_lse, ref_lse, policy_term",
        });
    }
    opts.inv_temperature()?;
    // SAFETY: the caller guarantees the stream belongs to the ordinal's primary context.
    let stream = unsafe { stream.borrow() }?;
    // SAFETY: the caller guarantees every buffer (see # Safety).
    unsafe { launch_forward(&stream, args, opts) }
}

/// [`cuda::exact_kl_backward`](crate::cuda::exact_kl_backward) on raw device pointers, in
/// place when `args.grad_policy == args.pair.policy`.
///
/// # Safety
/// As [`exact_kl`]; `grad_policy` covers the policy shape and either equals `policy` or
/// overlaps nothing else.
pub unsafe fn exact_kl_backward(
    stream: RawStream,
    args: &ExactKlBackwardArgs,
    opts: &ExactKlOptions,
) -> Result<()> {
    args.pair.check()?;
    let required = [
        ("grad", args.grad),
        ("policy_lse", args.policy_lse),
        ("ref_lse", args.ref_lse),
        ("grad_policy", args.grad_policy),
        ("status", args.status),
    ];
    non_null(&required)?;
    // SAFETY: the caller guarantees the stream belongs to the ordinal's primary context.
    let stream = unsafe { stream.borrow() }?;
    // SAFETY: the caller guarantees every buffer (see # Safety); the launch refuses a missing
    // saved value or policy term before enqueuing anything.
    unsafe { launch_backward(&stream, args, opts) }
}

/// [`cuda::exact_kl_shard_partials`](crate::cuda::exact_kl_shard_partials) on raw device
/// pointers: one [`ExactKlPartial`](crate::ExactKlPartial) per row over this rank's slice of
/// both rows, to be gathered `[shards][rows]` and merged by [`finish_exact_kl_partials`].
/// Row problems travel in the records' flags (the merge reports them).
///
/// # Safety
/// - `stream.stream` is a live stream of device `stream.ordinal`'s primary context (or null);
/// - every non-zero address points to device memory of that context holding what its
///   [`ExactKlShardArgs`] field documents (`pair.policy`: `pair.policy_shape.min_len()` elements
///   of `pair.policy_dtype`, `pair.reference` likewise); `partials` overlaps nothing else;
/// - every buffer stays allocated, and untouched by other streams, until the kernel ran.
///
/// ```no_run
/// use rlhf_kernels::cuda::raw::{self, ExactKlShardArgs, PairArgs, RawStream};
/// use rlhf_kernels::{DType, ExactDivergence, ExactKlOptions, RowShape};
/// # let (policy, reference, partials, cu_stream) = (0u64, 0u64, 0u64, std::ptr::null_mut());
/// // This rank holds columns [0, 16000) of a 128000-token vocabulary.
/// let shape = RowShape::new(64, 16_000).with_row_stride(128_000);
/// let pair = PairArgs { policy, policy_dtype: DType::BF16, policy_shape: shape, reference,
///     ref_dtype: DType::BF16, ref_shape: shape, mask: 0 };
/// let args = ExactKlShardArgs { pair, partials };
/// let opts = ExactKlOptions::new(ExactDivergence::PolicyRef);
/// // SAFETY: pointers from tensors that live on device 0 and outlive the launch.
/// unsafe { raw::exact_kl_shard_partials(RawStream { ordinal: 0, stream: cu_stream }, &args, &opts)? };
/// # Ok::<(), rlhf_kernels::Error>(())
/// ```
pub unsafe fn exact_kl_shard_partials(
    stream: RawStream,
    args: &ExactKlShardArgs,
    opts: &ExactKlOptions,
) -> Result<()> {
    // SAFETY: the caller guarantees the stream belongs to the ordinal's primary context.
    let stream = unsafe { stream.borrow() }?;
    // SAFETY: the caller guarantees every buffer (see # Safety).
    unsafe { launch_shard_partials(&stream, args, opts) }
}

/// [`cuda::finish_exact_kl_partials`](crate::cuda::finish_exact_kl_partials) on raw device
/// pointers: the shards' partials merged in shard order and the requested outputs written as
/// [`exact_kl`] would for the whole vocabulary (for the JSD only the two log-sum-exps, both
/// required). Row problems are reported in the status word.
///
/// # Safety
/// As [`exact_kl_shard_partials`], for the buffers of [`FinishExactKlArgs`]; the outputs
/// overlap nothing else.
pub unsafe fn finish_exact_kl_partials(
    stream: RawStream,
    args: &FinishExactKlArgs,
    opts: &ExactKlOptions,
) -> Result<()> {
    // SAFETY: the caller guarantees the stream belongs to the ordinal's primary context.
    let stream = unsafe { stream.borrow() }?;
    // SAFETY: the caller guarantees every buffer (see # Safety).
    unsafe { launch_finish_partials(&stream, args, opts) }
}

/// [`cuda::jsd_shard_sums`](crate::cuda::jsd_shard_sums) on raw device pointers: the JSD's
/// second round on this rank's slice, given the full rows' log-sum-exps from
/// [`finish_exact_kl_partials`]; gather the sums `[shards][rows][2]` and finish with
/// [`finish_jsd_sums`].
///
/// # Safety
/// As [`exact_kl_shard_partials`], for the buffers of [`JsdShardArgs`]; `sums` overlaps
/// nothing else.
pub unsafe fn jsd_shard_sums(stream: RawStream, args: &JsdShardArgs, opts: &ExactKlOptions) -> Result<()> {
    // SAFETY: the caller guarantees the stream belongs to the ordinal's primary context.
    let stream = unsafe { stream.borrow() }?;
    // SAFETY: the caller guarantees every buffer (see # Safety).
    unsafe { launch_jsd_shard_sums(&stream, args, opts) }
}

/// [`cuda::finish_jsd_sums`](crate::cuda::finish_jsd_sums) on raw device pointers: the shards'
/// sums added in shard order into the JSD's value and/or policy term.
///
/// # Safety
/// As [`exact_kl_shard_partials`], for the buffers of [`FinishJsdArgs`]; the outputs overlap
/// nothing else.
pub unsafe fn finish_jsd_sums(stream: RawStream, args: &FinishJsdArgs, opts: &ExactKlOptions) -> Result<()> {
    // SAFETY: the caller guarantees the stream belongs to the ordinal's primary context.
    let stream = unsafe { stream.borrow() }?;
    // SAFETY: the caller guarantees every buffer (see # Safety).
    unsafe { launch_finish_jsd(&stream, args, opts) }
}
