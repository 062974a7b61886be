//! Loss aggregation on the GPU: a `[B, T]` batch of masked per-token values reduced to one
//! scalar with an [`Aggregation`] mode and a [`Normaliser`], the twin of
//! [`Aggregation::aggregate`] (f32 sums within a sequence, f64 across sequences, fixed
//! orders: bitwise deterministic). Two small kernels, nothing synchronises the host.
//!
//! Use it for the batch statistics of ops that write per-token values, e.g. the masked mean of
//! the exact KL from [`exact_kl`](super::exact_kl)'s `value` (rows = tokens, `[B·T]` viewed as
//! `[B, T]`).
//!
//! Layout: `launch.rs` (the parameter blocks, the launches and the helpers the losses share),
//! `raw.rs` (the raw entry point), this file (the safe one).

mod launch;
pub(crate) mod raw;

use std::sync::Arc;

use cudarc::driver::{CudaStream, CudaView, DevicePtr};

use launch::launch_aggregate;
pub(crate) use launch::{
    AggregationParams, FinalizeParams, ONE_BLOCK, ReductionParams, check_workspace, count_mask, known_counts,
    per_row, records_and_count_bytes, workspace_or_alloc,
};
pub use launch::{ReductionArgs, aggregate_workspace_bytes};

use crate::cuda::DeviceStats;
use crate::cuda::{CudaStatus, LaunchContext, view_ptr};
use crate::{Aggregated, Aggregation, Normaliser, Result, RowShape};

/// Aggregates the masked `[B, T]` `values` of `shape` (`mask`, one byte per token in the same
/// layout, 0 = padding, or `None`) on `ctx`'s stream into `out`:
/// `Σ_{i,t} mask·w_i·L[i, t]` with the per-token weight `w_i` of `aggregation` under `norm`
/// (MATH.md §4; see [`Aggregation::token_weight`]). An empty batch (every token masked)
/// aggregates to 0; infinities of one sign give that infinite aggregate.
///
/// Reported through `ctx`'s status word (as [`Aggregation::aggregate`] returns them): a NaN at a
/// valid token, or `+inf` and `−inf` that meet, is
/// [`RowProblem::NonFinite`](crate::RowProblem::NonFinite) for the first row holding it; finite
/// values whose f32 sum within a sequence overflows are
/// [`RowProblem::Overflow`](crate::RowProblem::Overflow), also beside an infinity of the other sign
/// (the host sums in f64 and does not overflow there).
///
/// ```no_run
/// use rlhf_kernels::cuda::{self, CudaDevice, LaunchContext, DeviceStats};
/// use rlhf_kernels::Aggregated;
/// use rlhf_kernels::{Aggregation, Normaliser, RowShape};
/// let device = CudaDevice::new(0)?;
/// let s = device.stream();
/// let kl = s.clone_htod(&[0.5f32, 0.25, 0.0, 1.0]).unwrap();
/// let mask = s.clone_htod(&[1u8, 1, 0, 1]).unwrap();
/// let (mut mean, mut ctx) = (DeviceStats::<Aggregated>::new(s)?, LaunchContext::new(s)?);
/// let shape = RowShape::new(2, 2);
/// let (agg, norm) = (Aggregation::TokenMean, Normaliser::Local);
/// cuda::aggregate(&mut ctx, &kl, shape, Some(&mask.as_view()), agg, norm, &mut mean)?;
/// ctx.check()?;
/// assert_eq!(mean.read(s)?.value, 0.5); // (0.5 + 0.25 + 1.0) / 3 valid tokens
/// # Ok::<(), rlhf_kernels::Error>(())
/// ```
pub fn aggregate(
    ctx: &mut LaunchContext,
    values: &impl DevicePtr<f32>,
    shape: RowShape,
    mask: Option<&CudaView<'_, u8>>,
    aggregation: Aggregation,
    norm: Normaliser,
    out: &mut DeviceStats<Aggregated>,
) -> Result<()> {
    let (stream, status) = ctx.parts();
    aggregate_with(stream, values, shape, mask, aggregation, norm, out, Some(status))
}

/// [`aggregate`], reporting into `status` or, with `None`, nowhere: for the ops that
/// aggregate their own per-row values, whose problems they reported themselves (the NaN they
/// leave in a failed row must not be reported again, as an aggregation problem).
#[allow(clippy::too_many_arguments)]
pub(crate) fn aggregate_with(
    stream: &Arc<CudaStream>,
    values: &impl DevicePtr<f32>,
    shape: RowShape,
    mask: Option<&CudaView<'_, u8>>,
    aggregation: Aggregation,
    norm: Normaliser,
    out: &mut DeviceStats<Aggregated>,
    status: Option<&mut CudaStatus>,
) -> Result<()> {
    shape.check_buffer("values", values.len())?;
    if let Some(m) = mask {
        shape.check_buffer("mask", m.len())?;
    }
    let ((out, _g4), (workspace, _g3)) = out.with_records(stream, aggregate_workspace_bytes(shape))?;
    let s: &CudaStream = stream;
    let (values, _g1) = values.device_ptr(s);
    let (mask, _g2) = view_ptr(mask, s);
    let (status, _g5) = match status {
        Some(st) => {
            let (p, g) = st.device_ptr(s);
            (p, Some(g))
        }
        None => (0, None),
    };
    let args = ReductionArgs { shape, values, mask, out, workspace, status };
    // SAFETY: every address comes from a cudarc buffer of this stream's context whose length was
    // checked above (the records hold aggregate_workspace_bytes from a fresh, 256-byte aligned
    // allocation); a null status makes the kernels report nothing; the guards keep cudarc's
    // event tracking in order until the launches are enqueued.
    unsafe { launch_aggregate(stream, &args, aggregation, norm) }
}
