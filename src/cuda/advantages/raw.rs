//! The raw layer of the advantages family (see [`crate::cuda::raw`]): GAE, the group
//! estimators, masked moments, whitening and the overlong shaping on device addresses, enqueued on a stream owned by
//! the caller. Same launches as the safe functions.

pub use super::gae::GaeArgs;
use super::gae::launch_gae;
use super::groups::DeviceGroups;
pub use super::groups::GroupAdvantageArgs;
use super::groups::{GroupPtrs, launch_groups};
use super::moments::{launch_moments, launch_whiten};
pub use super::overlong::OverlongArgs;
use super::overlong::launch_overlong;
use crate::cuda::aggregation::ReductionArgs;
use crate::cuda::{RawStream, non_null};
use crate::logprobs::check_len;
use crate::{
    Error, GaeOptions, GroupAdvantageOptions, Groups, OverlongOptions, Result, RowShape, WhitenOptions,
};

/// [`cuda::overlong_shaping`](crate::cuda::overlong_shaping) on device addresses, enqueued on
/// a stream owned by the caller. A non-finite score or an overflowed result is reported in the
/// status word.
///
/// # Safety
/// - `stream.stream` is a live stream of device `stream.ordinal`'s primary context (or null);
/// - `scores` and `shaped` hold `args.shape.rows` f32 and a non-zero `mask` covers `args.shape`,
///   all device memory of that context; `shaped` overlaps nothing else;
/// - every buffer stays allocated, and untouched by other streams, until the kernel ran.
pub unsafe fn overlong_shaping(stream: RawStream, args: &OverlongArgs, opts: &OverlongOptions) -> Result<()> {
    non_null(&[("scores", args.scores), ("shaped", args.shaped), ("status", args.status)])?;
    // SAFETY: the caller guarantees the stream belongs to the ordinal's primary context.
    let stream = unsafe { stream.borrow() }?;
    // SAFETY: the caller guarantees every buffer (see # Safety).
    unsafe { launch_overlong(&stream, args, opts) }
}

/// [`cuda::gae`](crate::cuda::gae) on device addresses, enqueued on a stream owned by the
/// caller. Sequences with non-finite advantages are reported in the status word (decode it with
/// [`decode_status`](crate::cuda::raw::decode_status)).
///
/// # Safety
/// - `stream.stream` is a live stream of device `stream.ordinal`'s primary context (or null);
/// - every non-zero address points to device memory of that context holding what its
///   [`GaeArgs`] field documents for `args.shape` (per-token buffers `shape.min_len()` f32 or
///   mask bytes, `scores` one f32 per row); the outputs and workspace overlap nothing else;
/// - every buffer stays allocated, and untouched by other streams, until the kernels ran.
///
/// ```no_run
/// use rlhf_kernels::cuda::raw::{self, GaeArgs, RawStream};
/// use rlhf_kernels::{GaeOptions, RowShape};
/// # let (rewards, values, adv, status, cu_stream) = (0u64, 0u64, 0u64, 0u64, std::ptr::null_mut());
/// let args = GaeArgs { shape: RowShape::new(512, 4096), rewards, kl: 0, beta: 0.0, scores: 0, values,
///     mask: 0, advantages: adv, returns: 0, workspace: 0, status };
/// // SAFETY: pointers from tensors that live on device 0 and outlive the launch.
/// unsafe { raw::gae(RawStream { ordinal: 0, stream: cu_stream }, &args, &GaeOptions::new(1.0, 0.95))? };
/// # Ok::<(), rlhf_kernels::Error>(())
/// ```
pub unsafe fn gae(stream: RawStream, args: &GaeArgs, opts: &GaeOptions) -> Result<()> {
    non_null(&[("status", args.status)])?;
    // SAFETY: the caller guarantees the stream belongs to the ordinal's primary context.
    let stream = unsafe { stream.borrow() }?;
    // SAFETY: the caller guarantees every buffer (see # Safety).
    unsafe { launch_gae(&stream, args, opts) }
}

/// [`cuda::group_advantages`](crate::cuda::group_advantages) on raw device pointers, enqueued
/// on a stream owned by the caller; the groups' member lists are uploaded on that stream first.
/// Non-finite scores are reported in the status word.
///
/// # Safety
/// - `stream.stream` is a live stream of device `stream.ordinal`'s primary context (or null);
/// - every non-zero address points to device memory of that context holding what its
///   [`GroupAdvantageArgs`] field documents for `groups.sequences()` = B sequences; the
///   outputs overlap nothing else;
/// - every buffer stays allocated, and untouched by other streams, until the kernel ran.
pub unsafe fn group_advantages(
    stream: RawStream,
    groups: &Groups,
    args: &GroupAdvantageArgs,
    opts: &GroupAdvantageOptions,
) -> Result<()> {
    non_null(&[("scores", args.scores), ("status", args.status)])?;
    opts.validate()?;
    groups.check_singletons(opts)?;
    if args.per_sequence == 0 && args.per_token == 0 {
        return Err(Error::InvalidOption {
            name: "outputs",
            value: "none".into(),
            expected: "per-sequence and/or per-token advantages",
        });
    }
    let token_shape = if args.per_token != 0 {
        args.token_shape.validate("per-token advantages")?;
        check_len("per-token advantage rows", args.token_shape.rows, groups.sequences())?;
        args.token_shape
    } else {
        RowShape::new(groups.sequences(), 1)
    };
    // SAFETY: the caller guarantees the stream belongs to the ordinal's primary context.
    let stream = unsafe { stream.borrow() }?;
    let device_groups = DeviceGroups::new(&stream, groups)?;
    let ptrs = GroupPtrs {
        scores: args.scores,
        per_sequence: args.per_sequence,
        per_token: args.per_token,
        mask: if args.per_token != 0 { args.mask } else { 0 },
        status: args.status,
    };
    // SAFETY: the caller guarantees every buffer (see # Safety); the groups live on this
    // stream until dropped after the enqueue (cudarc frees them in stream order).
    unsafe { launch_groups(&stream, &device_groups, opts, &ptrs, token_shape) }
}

/// [`cuda::masked_moments`](crate::cuda::masked_moments) on raw device pointers, enqueued on
/// a stream owned by the caller: the five f64 of `args.out`. A row with a non-finite valid
/// value is reported in the status word.
///
/// # Safety
/// - `stream.stream` is a live stream of device `stream.ordinal`'s primary context (or null);
/// - every non-zero address points to device memory of that context holding what its
///   [`ReductionArgs`] field documents (`values` and `mask`: `shape.min_len()` elements);
///   `out` and the workspace overlap nothing else;
/// - every buffer stays allocated, and untouched by other streams, until the kernels ran.
pub unsafe fn masked_moments(stream: RawStream, args: &ReductionArgs) -> Result<()> {
    check(args)?;
    // SAFETY: the caller guarantees the stream belongs to the ordinal's primary context.
    let stream = unsafe { stream.borrow() }?;
    // SAFETY: the caller guarantees every buffer (see # Safety).
    unsafe { launch_moments(&stream, args) }
}

/// [`cuda::whiten`](crate::cuda::whiten) on raw device pointers: the moments into
/// `args.out`, then the valid tokens of `args.values` whitened in place (masked ones 0).
///
/// # Safety
/// As [`masked_moments`]; `values` is written.
pub unsafe fn whiten(stream: RawStream, args: &ReductionArgs, opts: &WhitenOptions) -> Result<()> {
    check(args)?;
    opts.validate()?;
    // SAFETY: the caller guarantees the stream belongs to the ordinal's primary context.
    let stream = unsafe { stream.borrow() }?;
    // SAFETY: the caller guarantees every buffer (see # Safety).
    unsafe { launch_whiten(&stream, args, opts) }
}

fn check(args: &ReductionArgs) -> Result<()> {
    non_null(&[("values", args.values), ("out", args.out), ("status", args.status)])?;
    args.shape.validate("moments")
}
