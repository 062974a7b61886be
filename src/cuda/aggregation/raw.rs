//! The raw layer of the aggregation (see [`crate::cuda::raw`]).

use super::launch::{ReductionArgs, launch_aggregate};
use crate::cuda::{RawStream, non_null};
use crate::{Aggregation, Normaliser, Result};

/// [`cuda::aggregate`](crate::cuda::aggregate) on raw device pointers, enqueued on a stream
/// owned by the caller. A NaN value, `+inf` meeting `−inf`, or an f32 row sum that
/// overflows is reported in the status word.
///
/// # Safety
/// - `stream.stream` is a live stream of device `stream.ordinal`'s primary context (or null);
/// - every non-zero address points to device memory of that context holding what its
///   [`ReductionArgs`] field documents (`values` and `mask`: `shape.min_len()` elements);
///   `out` and the workspace overlap nothing else;
/// - every buffer stays allocated, and untouched by other streams, until the kernels ran.
pub unsafe fn aggregate(
    stream: RawStream,
    args: &ReductionArgs,
    aggregation: Aggregation,
    norm: Normaliser,
) -> Result<()> {
    non_null(&[("values", args.values), ("out", args.out), ("status", args.status)])?;
    args.shape.validate("aggregate")?;
    // SAFETY: the caller guarantees the stream belongs to the ordinal's primary context.
    let stream = unsafe { stream.borrow() }?;
    // SAFETY: the caller guarantees every buffer (see # Safety).
    unsafe { launch_aggregate(&stream, args, aggregation, norm) }
}
