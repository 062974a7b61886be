//! The launches of the batch reductions (kernels/aggregation.cu, and the moments of
//! kernels/advantages.cu), their parameter blocks, and the helpers every loss shares: the
//! denominators the host knows, the workspace, the mask count on the device.

use std::sync::Arc;

use cudarc::driver::{
    CudaSlice, CudaStream, DevicePtrMut, DeviceRepr, LaunchConfig, PushKernelArg, SyncOnDrop,
};

use crate::cuda::driver_error;
use crate::cuda::module::{Module, function};
use crate::{Aggregation, BatchCounts, Error, Normaliser, Result, RowShape, WhitenOptions};

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

// The kernels pin the same size and offsets (`static_assert` in kernels/).
pin_layout!(AggregationParams, 40, {
    aggregation: 0, use_global: 4, max_len: 8, tokens: 16, valid_sequences: 24, sequences: 32,
});

// SAFETY: repr(C) with the layout of the kernels' `struct AggregationParams` (asserted above and
// by static_asserts in kernels/aggregation.cuh): two ints, then four doubles.
unsafe impl DeviceRepr for AggregationParams {}

impl AggregationParams {
    /// `aggregation` over `counts` (`[valid tokens, valid sequences, sequences]`) when known,
    /// else over the batch's own counts, which the finalize kernel sums from its records.
    pub(crate) fn new(aggregation: Aggregation, counts: Option<[f64; 3]>) -> Self {
        let (code, max_len) = aggregation.code();
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

/// A loss's finalize parameter block (kernels/aggregation.cuh `FinalizeParams`), the one
/// argument of `policy_loss_finalize`, `value_loss_finalize` and `sampled_kl_finalize`: the same
/// fields at the same offsets on both sides (asserted on both).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub(crate) struct FinalizeParams {
    /// The row records the loss's rows kernel wrote.
    pub(crate) records: u64,
    /// The loss's statistics words.
    pub(crate) stats: u64,
    pub(crate) rows: i32,
    /// The loss's coefficient (entropy, value or KL).
    pub(crate) coef: f32,
    /// The sampled KL's estimator code (0 for the others).
    pub(crate) chosen: i32,
    pub(crate) aggregation: AggregationParams,
}

// The kernels pin the same size and offsets (`static_assert` in kernels/).
pin_layout!(FinalizeParams, 72, {
    records: 0, stats: 8, rows: 16, coef: 20, chosen: 24, aggregation: 32,
});

// SAFETY: repr(C) with the layout of the kernels' `struct FinalizeParams` (asserted above and
// by static_asserts in kernels/aggregation.cuh), passed by value; plain old data.
unsafe impl DeviceRepr for FinalizeParams {}

/// A masked batch reduction's parameter block (kernels/aggregation.cuh `ReductionParams`), the
/// one argument of the aggregation, moments, whitening and mask-count kernels besides the
/// status word: the same fields at the same offsets on both sides (asserted on both).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub(crate) struct ReductionParams {
    values: u64,
    mask: u64,
    records: u64,
    out: u64,
    ld: i64,
    rows: i32,
    cols: i32,
    aggregation: AggregationParams,
    eps: f64,
    keep_mean: i32,
}

// The kernels pin the same size and offsets (`static_assert` in kernels/).
pin_layout!(ReductionParams, 104, {
    values: 0, mask: 8, records: 16, out: 24, ld: 32, rows: 40, cols: 44, aggregation: 48,
    eps: 88, keep_mean: 96,
});

// SAFETY: repr(C) with the layout of the kernels' `struct ReductionParams` (asserted above and
// by static_asserts in kernels/aggregation.cuh), passed by value; plain old data.
unsafe impl DeviceRepr for ReductionParams {}

impl ReductionParams {
    /// The batch of `a` with its records at `records`, no aggregation and no whitening.
    pub(crate) fn new(a: &ReductionArgs, records: u64) -> Self {
        let shape = a.shape;
        ReductionParams {
            values: a.values,
            mask: a.mask,
            records,
            out: a.out,
            ld: shape.row_stride as i64,
            rows: shape.rows as i32,
            cols: shape.cols as i32,
            aggregation: AggregationParams::new(Aggregation::TokenMean, None),
            eps: 0.0,
            keep_mean: 0,
        }
    }

    /// These parameters with whitening's ε and `keep_mean` of `opts`.
    pub(crate) fn whitening(self, opts: &WhitenOptions) -> Self {
        ReductionParams { eps: opts.eps as f64, keep_mean: i32::from(opts.keep_mean), ..self }
    }
}

/// One block of 256 threads per row of `shape`.
pub(crate) fn per_row(shape: RowShape) -> LaunchConfig {
    LaunchConfig { grid_dim: (shape.rows as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }
}

/// Exactly one block of 256 threads (the finalize kernels' trees assume it).
pub(crate) const ONE_BLOCK: LaunchConfig =
    LaunchConfig { grid_dim: (1, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };

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
fn mask_count_bytes(rows: usize) -> usize {
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
    let counts = scratch + mask_counts_offset(shape.rows) as u64;
    let args = ReductionArgs { shape, values: 0, mask, out: counts, workspace: scratch, status: 0 };
    let params = ReductionParams::new(&args, scratch);
    let f = function(stream.context(), Module::Aggregation, "mask_counts_rows")?;
    let mut l = stream.launch_builder(&f);
    l.arg(&params);
    // SAFETY: matches `mask_counts_rows(ReductionParams)` (its layout asserted on both sides);
    // one block of 256 threads per row (rows ≤ i32::MAX by the callers' shape checks); the mask
    // covers the shape and the records (the scratch) its `rows` f32 (the caller's contract).
    unsafe { l.launch(per_row(shape)) }.map_err(driver_error("launching mask_counts_rows"))?;
    let f = function(stream.context(), Module::Aggregation, "mask_counts_finalize")?;
    let mut l = stream.launch_builder(&f);
    l.arg(&params);
    // SAFETY: matches `mask_counts_finalize(ReductionParams)`; exactly one block of 256 threads
    // (its tree assumes it); reads the row counts written above on this stream and writes 3 f64
    // at `out`, a 16-byte aligned address inside the scratch.
    unsafe { l.launch(ONE_BLOCK) }.map_err(driver_error("launching mask_counts_finalize"))?;
    Ok(counts)
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

/// The aggregation's two launches on checked device addresses (the safe and raw entry points
/// share them); the records are allocated on the stream when the workspace is 0.
///
/// # Safety
/// Every non-zero address of `a` is device memory of `stream`'s context of the size its
/// [`ReductionArgs`] field documents, `out` and the workspace overlap nothing else, and every
/// buffer stays allocated until the kernels ran.
pub(super) unsafe fn launch_aggregate(
    stream: &Arc<CudaStream>,
    a: &ReductionArgs,
    aggregation: Aggregation,
    norm: Normaliser,
) -> Result<()> {
    aggregation.validate()?;
    norm.validate()?;
    let shape = a.shape;
    let mut owned = None;
    let (rec, _g1) =
        workspace_or_alloc(stream, true, a.workspace, aggregate_workspace_bytes(shape), &mut owned)?;
    let mut params = ReductionParams::new(a, rec);
    params.aggregation = AggregationParams::new(
        aggregation,
        match norm {
            Normaliser::Local => None,
            Normaliser::Global { valid_tokens, valid_sequences, sequences } => {
                Some([valid_tokens, valid_sequences, sequences])
            }
        },
    );
    let ctx = stream.context();

    let f = function(ctx, Module::Aggregation, "aggregate_rows")?;
    let mut l = stream.launch_builder(&f);
    l.arg(&params).arg(&a.status);
    // SAFETY: matches `aggregate_rows(ReductionParams, unsigned long long*)` (the layout asserted
    // on both sides); one block of 256 threads per row; `values` (and `mask`, same layout) cover
    // the shape (the caller's contract); the records hold one 16-byte `AggregateRow` per row at
    // a 16-byte aligned address; `status` is one u64 or null (nothing reported).
    unsafe { l.launch(per_row(shape)) }.map_err(driver_error("launching aggregate_rows"))?;

    let f = function(ctx, Module::Aggregation, "aggregate_finalize")?;
    let mut l = stream.launch_builder(&f);
    l.arg(&params).arg(&a.status);
    // SAFETY: matches `aggregate_finalize(ReductionParams, unsigned long long*)`; one block of 256
    // threads; reads the `rows` records the launch above wrote on this stream, writes the four
    // f64 of `out` and may report into the one u64 of `status`.
    unsafe { l.launch(ONE_BLOCK) }.map_err(driver_error("launching aggregate_finalize"))?;
    Ok(())
}
