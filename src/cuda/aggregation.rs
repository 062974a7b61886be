//! Loss aggregation on the GPU: a `[B, T]` batch of masked per-token values reduced to one
//! scalar with an [`Aggregation`] mode and a [`Normaliser`], the twin of
//! [`Aggregation::aggregate`] (f32 sums within a sequence, f64 across sequences, fixed
//! orders: bitwise deterministic). Two small kernels, nothing synchronises the host.
//!
//! Use it for the batch statistics of ops that write per-token values, e.g. the masked mean of
//! the exact KL from [`exact_kl`](super::exact_kl)'s `value` (rows = tokens, `[B·T]` viewed as
//! `[B, T]`).

use std::sync::Arc;

use cudarc::driver::{
    CudaSlice, CudaStream, CudaView, DevicePtr, DevicePtrMut, DeviceRepr, LaunchConfig, PushKernelArg,
    SyncOnDrop,
};

use crate::cuda::DeviceStats;
use crate::cuda::module::{Module, function};
use crate::cuda::{CudaStatus, driver_error, view_ptr};
use crate::{Aggregated, Aggregation, BatchCounts, Error, Normaliser, Result, RowShape};

/// The kernels' aggregation code and `max_len`.
pub(crate) fn aggregation_code(a: Aggregation) -> (i32, f64) {
    match a {
        Aggregation::TokenMean => (0, 0.0),
        Aggregation::SeqMeanTokenSum => (1, 0.0),
        Aggregation::SeqMeanTokenMean => (2, 0.0),
        Aggregation::SeqMeanTokenSumNorm { max_len } => (3, max_len as f64),
    }
}

/// The aggregation a finalize kernel applies (kernels/aggregation.cuh `AggregationParams`): one
/// parameter block, the same fields at the same offsets on both sides (asserted on both), built
/// from an [`Aggregation`] and the denominators when the host knows them.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub(crate) struct AggregationParams {
    aggregation: i32,
    use_global: i32,
    max_len: f64,
    tokens: f64,
    valid_sequences: f64,
    sequences: f64,
}

const _: () = {
    use std::mem::{offset_of, size_of};
    assert!(size_of::<AggregationParams>() == 40);
    assert!(offset_of!(AggregationParams, use_global) == 4 && offset_of!(AggregationParams, max_len) == 8);
    assert!(offset_of!(AggregationParams, tokens) == 16 && offset_of!(AggregationParams, sequences) == 32);
};

// SAFETY: repr(C) with the layout of the kernels' `struct AggregationParams` (asserted above and
// by static_asserts in kernels/aggregation.cuh): two ints, then four doubles.
unsafe impl DeviceRepr for AggregationParams {}

impl AggregationParams {
    /// `aggregation` over `counts` (`[valid tokens, valid sequences, sequences]`) when known,
    /// else over the batch's own counts, which the finalize kernel sums from its records.
    pub(crate) fn new(aggregation: Aggregation, counts: Option<[f64; 3]>) -> Self {
        let (code, max_len) = aggregation_code(aggregation);
        let [tokens, valid_sequences, sequences] = counts.unwrap_or([0.0; 3]);
        AggregationParams {
            aggregation: code,
            use_global: i32::from(counts.is_some()),
            max_len,
            tokens,
            valid_sequences,
            sequences,
        }
    }
}

/// The denominators when the host knows them without a pass over the data: the global
/// normaliser's, or this batch's own when there is no mask (every token valid). Otherwise the
/// ops count the mask on the device first ([`count_mask`]); either way their gradients are
/// written in the same pass as their statistics.
pub(crate) fn known_counts(normaliser: Normaliser, shape: RowShape, masked: bool) -> Option<[f64; 3]> {
    match normaliser {
        Normaliser::Global { valid_tokens, valid_sequences, sequences } => {
            Some([valid_tokens, valid_sequences, sequences])
        }
        Normaliser::Local if !masked => {
            let c = BatchCounts::of(shape, None);
            Some([c.valid_tokens, c.valid_sequences, c.sequences])
        }
        Normaliser::Local => None,
    }
}

/// Bytes of the mask count's device scratch for `rows` sequences ([`count_mask`]): the rows'
/// valid counts (f32), then the three f64 counts at a 16-byte aligned offset.
pub(crate) fn mask_count_bytes(rows: usize) -> usize {
    mask_counts_offset(rows) + 3 * 8
}

fn mask_counts_offset(rows: usize) -> usize {
    (rows * 4).div_ceil(16) * 16
}

/// A workspace of `records` bytes of row records followed by the mask count's scratch:
/// `records` rounded up to 16 bytes, plus [`mask_count_bytes`].
pub(crate) fn records_and_count_bytes(records: usize, rows: usize) -> usize {
    records.div_ceil(16) * 16 + mask_count_bytes(rows)
}

/// A caller's workspace of `len` bytes where `need` are required: a shape error if short.
pub(crate) fn check_workspace(len: usize, need: usize) -> Result<()> {
    if len < need {
        return Err(Error::ShapeMismatch { what: "workspace", min: need, max: usize::MAX, actual: len });
    }
    Ok(())
}

/// The workspace of a loss launch: none when `wanted` is false, the caller's `given` address
/// when not 0, else `need` fresh bytes on `stream` kept in `owned` until the launches are
/// enqueued (freed in stream order after them). The address must be 16-byte aligned.
pub(crate) fn workspace_or_alloc<'a>(
    stream: &'a Arc<CudaStream>,
    wanted: bool,
    given: u64,
    need: usize,
    owned: &'a mut Option<CudaSlice<u8>>,
) -> Result<(u64, Option<SyncOnDrop<'a>>)> {
    let (p, g) = if !wanted {
        return Ok((0, None));
    } else if given != 0 {
        (given, None)
    } else {
        // SAFETY: the kernels write the mask count and every record before anything reads them.
        let slice =
            unsafe { stream.alloc::<u8>(need.max(16)) }.map_err(driver_error("allocating a workspace"))?;
        let s: &CudaStream = stream;
        let (p, g) = owned.insert(slice).device_ptr_mut(s);
        (p, Some(g))
    };
    if p % 16 != 0 {
        return Err(Error::InvalidOption {
            name: "workspace",
            value: format!("address {p:#x}"),
            expected: "a 16-byte aligned device address",
        });
    }
    Ok((p, g))
}

/// When `wanted`, counts the valid tokens of the masked batch `shape` on `stream` (two small
/// launches: one block per row reading its mask, one block summing the rows), for the ops
/// whose gradients divide by the batch's own counts and so need them before their one pass
/// over the inputs. The scratch is the tail of a [`records_and_count_bytes`] workspace, after
/// its `records` bytes. Returns the device address of the three f64 counts `[valid tokens,
/// valid sequences, sequences]`, which the ops' kernels read, or 0 when not wanted.
///
/// # Safety
/// When `wanted`: `mask` is a device address of `shape.len()` bytes (row stride included) and
/// `workspace` one of `records_and_count_bytes(records, shape.rows)` bytes, 16-byte aligned,
/// both of `stream`'s context and alive until the kernels that read the counts have run.
pub(crate) unsafe fn count_mask(
    wanted: bool,
    stream: &Arc<CudaStream>,
    mask: u64,
    shape: RowShape,
    workspace: u64,
    records: usize,
) -> Result<u64> {
    if !wanted {
        return Ok(0);
    }
    let scratch = workspace + records.div_ceil(16) as u64 * 16;
    let (rows, cols, ld) = (shape.rows as i32, shape.cols as i32, shape.row_stride as i64);
    let counts = scratch + mask_counts_offset(shape.rows) as u64;
    let f = function(stream.context(), Module::Aggregation, "mask_counts_rows")?;
    let mut l = stream.launch_builder(&f);
    l.arg(&mask).arg(&ld).arg(&rows).arg(&cols).arg(&scratch);
    let per_row =
        LaunchConfig { grid_dim: (shape.rows as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    // SAFETY: matches `mask_counts_rows(const unsigned char*, long long, int, int, float*)`; one
    // block of 256 threads per row (rows ≤ i32::MAX by the callers' shape checks); the mask
    // covers the shape and the scratch its `rows` f32 (the caller's contract).
    unsafe { l.launch(per_row) }.map_err(driver_error("launching mask_counts_rows"))?;
    let f = function(stream.context(), Module::Aggregation, "mask_counts_finalize")?;
    let mut l = stream.launch_builder(&f);
    l.arg(&scratch).arg(&rows).arg(&counts);
    let one = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    // SAFETY: matches `mask_counts_finalize(const float*, int, double*)`; exactly one block of
    // 256 threads (its tree assumes it); reads the row counts written above on this stream and
    // writes 3 f64 at a 16-byte aligned address inside the scratch.
    unsafe { l.launch(one) }.map_err(driver_error("launching mask_counts_finalize"))?;
    Ok(counts)
}

/// Aggregates the masked `[B, T]` `values` of `shape` (`mask`, one byte per token in the same
/// layout, 0 = padding, or `None`) on `stream` into `out`:
/// `Σ_{i,t} mask·w_i·L[i, t]` with the per-token weight `w_i` of `aggregation` under `norm`
/// (MATH.md §4; see [`Aggregation::token_weight`]). An empty batch (every token masked)
/// aggregates to 0; infinities of one sign give that infinite aggregate.
///
/// Reported through `status` (as [`Aggregation::aggregate`] returns them): a NaN at a valid
/// token, or `+inf` and `−inf` that meet, is [`RowProblem::NonFinite`](crate::RowProblem::NonFinite)
/// for the first row holding it; finite values whose f32 sum within a sequence overflows are
/// [`RowProblem::Overflow`](crate::RowProblem::Overflow), also beside an infinity of the other
/// sign (the host sums in f64 and does not overflow there).
///
/// ```no_run
/// use rlhf_kernels::cuda::{self, CudaDevice, CudaStatus, DeviceStats};
/// use rlhf_kernels::Aggregated;
/// use rlhf_kernels::{Aggregation, Normaliser, RowShape};
/// let device = CudaDevice::new(0)?;
/// let s = device.stream();
/// let kl = s.clone_htod(&[0.5f32, 0.25, 0.0, 1.0]).unwrap();
/// let mask = s.clone_htod(&[1u8, 1, 0, 1]).unwrap();
/// let (mut mean, mut status) = (DeviceStats::<Aggregated>::new(s)?, CudaStatus::new(s)?);
/// let shape = RowShape::new(2, 2);
/// let (agg, norm) = (Aggregation::TokenMean, Normaliser::Local);
/// cuda::aggregate(s, &kl, shape, Some(&mask.as_view()), agg, norm, &mut mean, &mut status)?;
/// status.check(s)?;
/// assert_eq!(mean.read(s)?.value, 0.5); // (0.5 + 0.25 + 1.0) / 3 valid tokens
/// # Ok::<(), rlhf_kernels::Error>(())
/// ```
#[allow(clippy::too_many_arguments)] // issue 15 gives every op one inputs struct
pub fn aggregate(
    stream: &Arc<CudaStream>,
    values: &impl DevicePtr<f32>,
    shape: RowShape,
    mask: Option<&CudaView<'_, u8>>,
    aggregation: Aggregation,
    norm: Normaliser,
    out: &mut DeviceStats<Aggregated>,
    status: &mut CudaStatus,
) -> Result<()> {
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

/// Buffers of a raw batch reduction: [`aggregate`](crate::cuda::raw::aggregate),
/// [`masked_moments`](crate::cuda::raw::masked_moments) or [`whiten`](crate::cuda::raw::whiten).
/// Device addresses, 0 for an absent mask or workspace.
#[derive(Debug, Clone, Copy)]
pub struct ReductionArgs {
    /// `[B, T]` of `values` and `mask` (row stride allowed).
    pub shape: RowShape,
    /// f32 per-token values (whitened in place by `whiten`).
    pub values: u64,
    /// Mask bytes (0 = padding), or 0.
    pub mask: u64,
    /// The f64 result: four for the aggregation (`[value, valid tokens, valid sequences,
    /// sequences]`), five for the moments (`[count, mean, unbiased variance, min, max]`).
    pub out: u64,
    /// The reduction's row records ([`aggregate_workspace_bytes`] or
    /// [`moments_workspace_bytes`](crate::cuda::moments_workspace_bytes)) at a 16-byte aligned
    /// address, or 0 to allocate on the stream.
    pub workspace: u64,
    /// One u64 status word, initialised to [`STATUS_CLEAR`](crate::cuda::raw::STATUS_CLEAR).
    pub status: u64,
}

/// Bytes of workspace a raw [`aggregate`](crate::cuda::raw::aggregate) uses for `shape`: one
/// 16-byte record per sequence (its sum, the sum of its finite values, its valid count and
/// whether the row was reported).
pub fn aggregate_workspace_bytes(shape: RowShape) -> usize {
    shape.rows * 16
}

/// The raw layer of the aggregation (see [`crate::cuda::raw`]).
pub(crate) mod raw {
    use super::{ReductionArgs, launch_aggregate};
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
}

/// The aggregation's two launches on checked device addresses (the safe and raw entry points
/// share them); the records are allocated on the stream when the workspace is 0.
///
/// # Safety
/// Every non-zero address of `a` is device memory of `stream`'s context of the size its
/// [`ReductionArgs`] field documents, `out` and the workspace overlap nothing else, and every
/// buffer stays allocated until the kernels ran.
unsafe fn launch_aggregate(
    stream: &Arc<CudaStream>,
    a: &ReductionArgs,
    aggregation: Aggregation,
    norm: Normaliser,
) -> Result<()> {
    aggregation.validate()?;
    norm.validate()?;
    let shape = a.shape;
    let rows = shape.rows;
    let mut owned = None;
    let (rec, _g1) =
        workspace_or_alloc(stream, true, a.workspace, aggregate_workspace_bytes(shape), &mut owned)?;
    let params = AggregationParams::new(
        aggregation,
        match norm {
            Normaliser::Local => None,
            Normaliser::Global { valid_tokens, valid_sequences, sequences } => {
                Some([valid_tokens, valid_sequences, sequences])
            }
        },
    );
    let (ld, rows_i, cols_i) = (shape.row_stride as i64, rows as i32, shape.cols as i32);
    let ctx = stream.context();

    let f = function(ctx, Module::Aggregation, "aggregate_rows")?;
    let mut l = stream.launch_builder(&f);
    l.arg(&a.values).arg(&ld).arg(&a.mask).arg(&rows_i).arg(&cols_i).arg(&rec).arg(&a.status);
    let cfg = LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    // SAFETY: matches `aggregate_rows(const float*, long long, const unsigned char*, int, int,
    // AggregateRow*, unsigned long long*)`; one block of 256 threads per row; `values` (and
    // `mask`, same layout) cover the shape (the caller's contract); the records hold 2·rows f32
    // at an 8-byte aligned address for the kernel's one two-f32 record per row; `status` is one
    // u64.
    unsafe { l.launch(cfg) }.map_err(driver_error("launching aggregate_rows"))?;

    let f = function(ctx, Module::Aggregation, "aggregate_finalize")?;
    let mut l = stream.launch_builder(&f);
    l.arg(&rec).arg(&rows_i).arg(&params).arg(&a.out).arg(&a.status);
    let one = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    // SAFETY: matches `aggregate_finalize(const AggregateRow*, int, AggregationParams, double*,
    // unsigned long long*)`; one block of 256 threads; reads the `rows` records the launch above
    // wrote on this stream, writes the four f64 of `out` and may report into the one u64 of
    // `status`.
    unsafe { l.launch(one) }.map_err(driver_error("launching aggregate_finalize"))?;
    Ok(())
}
