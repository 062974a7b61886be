//! The clipped value loss on the GPU (kernels/ppo.cu `value_loss_*`), with the launch
//! sequence it shares with the policy loss.

use std::sync::Arc;

use cudarc::driver::{CudaStream, DevicePtr, DeviceRepr};

use super::loss::LossLaunch;
use crate::cuda::aggregation::{
    AggregationParams, FinalizeParams, check_workspace, count_mask, known_counts, records_and_count_bytes,
    workspace_or_alloc,
};
use crate::cuda::{DeviceStats, LaunchContext, opt_ptr, opt_ptr_mut};
use crate::{
    BatchCounts, Cuda, Result, RowShape, ValueLossInputs, ValueLossOptions, ValueLossOutputs, ValueLossStats,
};

/// Bytes per sequence of the value row records (`ValueRow`: 4 f32).
const VALUE_RECORD_BYTES: usize = 16;
/// f64 words of the statistics of a raw [`value_loss`](crate::cuda::raw::value_loss):
/// `[loss, clip fraction, valid tokens, valid sequences, sequences]`.
pub const VALUE_STATS_WORDS: usize = 5;

/// Bytes of workspace [`value_loss`] may use for `shape`: one record per sequence (for the
/// statistics), and the valid-token counts a gradient under the batch's own denominators needs
/// first (a local normaliser with a mask).
pub fn value_loss_workspace_bytes(shape: RowShape) -> usize {
    records_and_count_bytes(shape.rows * VALUE_RECORD_BYTES, shape.rows)
}

/// The kernels' `ValueParams`, field for field.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct ValueParams {
    values: u64,
    old_values: u64,
    returns: u64,
    mask: u64,
    loss: u64,
    grad_values: u64,
    ld: i64,
    rows: i32,
    cols: i32,
    clip: f32,
    coef: f32,
    aggregation: i32,
    max_len: f64,
    weights_known: i32,
    tokens: f64,
    valid_sequences: f64,
    sequences: f64,
    counts: u64,
    records: u64,
}

// The kernels pin the same size and offsets (`static_assert` in kernels/).
pin_layout!(ValueParams, 136, {
    values: 0, old_values: 8, returns: 16, mask: 24, loss: 32, grad_values: 40, ld: 48, rows: 56,
    cols: 60, clip: 64, coef: 68, aggregation: 72, max_len: 80, weights_known: 88, tokens: 96,
    valid_sequences: 104, sequences: 112, counts: 120, records: 128,
});

// SAFETY: repr(C) with the layout of the kernels' `struct ValueParams` (asserted above and in
// the kernel): six 8-byte pointers, a 64-bit stride, two ints, two floats, an int (padded to 8),
// a double, an int (padded to 8), three doubles and two pointers (136 bytes).
unsafe impl DeviceRepr for ValueParams {}

/// The clipped value loss on the GPU, the twin of [`cpu::value_loss`](crate::cpu::value_loss).
/// A sequence with a non-finite input at a valid token is reported to `ctx`'s status word
/// ([`RowProblem::NonFinite`](crate::RowProblem::NonFinite)); one whose finite inputs give a
/// loss or gradient beyond f32 as [`RowProblem::Overflow`](crate::RowProblem::Overflow). With
/// statistics the kernels also sum each row's losses in f32, and a row sum beyond f32 is
/// `Overflow` too: there the CPU, which sums in f64, can still return a (huge) finite loss.
///
/// ```no_run
/// use rlhf_kernels::cuda::{self, CudaDevice, LaunchContext};
/// use rlhf_kernels::{ValueLossOutputs};
/// use rlhf_kernels::{ValueLossInputs};
/// use rlhf_kernels::{RowShape, ValueLossOptions};
/// let device = CudaDevice::new(0)?;
/// let s = device.stream();
/// let (v, old, ret) = (s.clone_htod(&[1.0f32]).unwrap(), s.clone_htod(&[0.0f32]).unwrap(), s.clone_htod(&[2.0f32]).unwrap());
/// let mut grad = s.alloc_zeros::<f32>(1).unwrap();
/// let mut ctx = LaunchContext::new(s)?;
/// let inputs = ValueLossInputs { shape: RowShape::new(1, 1), values: v.as_view(), old_values: old.as_view(),
///     returns: ret.as_view(), mask: None };
/// let out = ValueLossOutputs { grad_values: Some(grad.as_view_mut()), ..Default::default() };
/// cuda::value_loss(&mut ctx, &inputs, out, &ValueLossOptions::default())?;
/// ctx.check()?;
/// # Ok::<(), rlhf_kernels::Error>(())
/// ```
pub fn value_loss(
    ctx: &mut LaunchContext,
    inputs: &ValueLossInputs<'_, Cuda>,
    mut out: ValueLossOutputs<'_, Cuda>,
    opts: &ValueLossOptions,
) -> Result<()> {
    let (stream, status) = ctx.parts();
    let shape = inputs.shape;
    inputs.validate()?;
    out.check(shape)?;
    opts.validate()?;
    if let Some(w) = &out.workspace {
        check_workspace(w.len(), value_loss_workspace_bytes(shape))?;
    }
    let s: &CudaStream = stream;
    let (values, _g1) = inputs.values.device_ptr(s);
    let (old_values, _g2) = inputs.old_values.device_ptr(s);
    let (returns, _g3) = inputs.returns.device_ptr(s);
    let (mask, _g4) = opt_ptr(&inputs.mask, s);
    let (loss, _g5) = opt_ptr_mut(&mut out.loss, s);
    let (grad_values, _g6) = opt_ptr_mut(&mut out.grad_values, s);
    let (workspace, _g7) = opt_ptr_mut(&mut out.workspace, s);
    let (stats, _g8) = DeviceStats::opt_words_ptr(out.stats.take(), s);
    let (status, _g9) = status.device_ptr(s);
    let args = ValueLossArgs {
        shape,
        values,
        old_values,
        returns,
        mask,
        loss,
        grad_values,
        stats,
        workspace,
        status,
    };
    // SAFETY: every address comes from a cudarc buffer of this stream's context whose length
    // was checked above (the outputs are distinct mutable borrows, the statistics buffer holds
    // five f64); the guards keep cudarc's event tracking in order until the launches are
    // enqueued.
    unsafe { launch_value(stream, &args, opts) }
}

/// Buffers of a raw [`value_loss`](crate::cuda::raw::value_loss) call: device addresses, 0 for
/// an absent optional buffer.
#[derive(Debug, Clone, Copy)]
pub struct ValueLossArgs {
    /// `[B, T]` of every per-token buffer (row stride allowed).
    pub shape: RowShape,
    /// f32 current values `v`.
    pub values: u64,
    /// f32 rollout-time values.
    pub old_values: u64,
    /// f32 value targets.
    pub returns: u64,
    /// Mask bytes (0 = padding), or 0.
    pub mask: u64,
    /// f32 per-token loss out, or 0.
    pub loss: u64,
    /// f32 `coef·w·∂L_v/∂v` out, or 0.
    pub grad_values: u64,
    /// [`VALUE_STATS_WORDS`] f64 of statistics out (read them with [`value_stats_from_words`]),
    /// or 0.
    pub stats: u64,
    /// [`value_loss_workspace_bytes`] bytes at a 16-byte aligned address, or 0 to allocate on
    /// the stream when needed.
    pub workspace: u64,
    /// One u64 status word, initialised to [`STATUS_CLEAR`](crate::cuda::raw::STATUS_CLEAR).
    pub status: u64,
}

/// The statistics of a raw [`value_loss`](crate::cuda::raw::value_loss) from its five f64
/// words.
///
/// ```
/// use rlhf_kernels::cuda::raw::{VALUE_STATS_WORDS, value_stats_from_words, value_stats_to_words};
/// let w = [0.5, 0.25, 10.0, 2.0, 3.0];
/// let stats = value_stats_from_words(&w)?;
/// assert_eq!((stats.loss, stats.counts.sequences), (0.5, 3.0));
/// assert_eq!(value_stats_to_words(&stats), w);
/// assert!(value_stats_from_words(&w[..VALUE_STATS_WORDS - 1]).is_err());
/// # Ok::<(), rlhf_kernels::Error>(())
/// ```
pub fn value_stats_from_words(w: &[f64]) -> Result<ValueLossStats> {
    crate::logprobs::check_len("value statistics words", w.len(), VALUE_STATS_WORDS)?;
    Ok(ValueLossStats {
        loss: w[0],
        clip_fraction: w[1],
        counts: BatchCounts { valid_tokens: w[2], valid_sequences: w[3], sequences: w[4] },
    })
}

/// The five words of [`value_stats_from_words`] from statistics (for callers that hand the CPU
/// backend's statistics on in the GPU's layout, e.g. the Python module).
pub fn value_stats_to_words(s: &ValueLossStats) -> [f64; VALUE_STATS_WORDS] {
    [s.loss, s.clip_fraction, s.counts.valid_tokens, s.counts.valid_sequences, s.counts.sequences]
}

/// The value loss's launches on checked device addresses (the safe and raw entry points share
/// them): row records and the mask count are allocated on the stream when needed and not given.
///
/// # Safety
/// Every non-zero address of `a` is device memory of `stream`'s context of the size its
/// [`ValueLossArgs`] field documents, the outputs overlap nothing else, and every buffer stays
/// allocated until the kernels ran.
pub(crate) unsafe fn launch_value(
    stream: &Arc<CudaStream>,
    a: &ValueLossArgs,
    opts: &ValueLossOptions,
) -> Result<()> {
    let shape = a.shape;
    opts.validate()?;
    let global = known_counts(opts.normaliser, shape, a.mask != 0);
    // The batch's own counts under a mask: counted on the device before the one pass.
    let count_on_device = a.grad_values != 0 && global.is_none();
    let need_records = a.stats != 0;
    let mut owned = None;
    let need = value_loss_workspace_bytes(shape);
    let (workspace, _g1) =
        workspace_or_alloc(stream, need_records || count_on_device, a.workspace, need, &mut owned)?;
    let records = if need_records { workspace } else { 0 };
    // SAFETY: when counting, a mask is present (the counts are not known on the host) and
    // covers the shape (checked, or the raw caller's contract), and the workspace is
    // value_loss_workspace_bytes long, 16-byte aligned, alive until this call's kernels ran.
    let device_counts = unsafe {
        count_mask(count_on_device, stream, a.mask, shape, workspace, shape.rows * VALUE_RECORD_BYTES)?
    };
    let (aggregation, max_len) = opts.aggregation.code();
    let counts = global.unwrap_or([0.0; 3]);
    let params = ValueParams {
        values: a.values,
        old_values: a.old_values,
        returns: a.returns,
        mask: a.mask,
        loss: a.loss,
        grad_values: a.grad_values,
        ld: shape.row_stride as i64,
        rows: shape.rows as i32,
        cols: shape.cols as i32,
        clip: opts.clip.unwrap_or(-1.0),
        coef: opts.coef,
        aggregation,
        max_len,
        weights_known: i32::from(global.is_some()),
        tokens: counts[0],
        valid_sequences: counts[1],
        sequences: counts[2],
        counts: device_counts,
        records,
    };
    let launch = LossLaunch {
        kernels: ["value_loss_rows", "value_loss_finalize"],
        rows: shape.rows,
        status: a.status,
        finalize: FinalizeParams {
            records,
            stats: a.stats,
            rows: shape.rows as i32,
            coef: opts.coef,
            chosen: 0,
            aggregation: AggregationParams::new(opts.aggregation, global),
        },
        need_records,
    };
    // SAFETY: `params` is the kernels' `ValueParams`: every pointer in it is null or covers
    // the shape (the caller's contract); the records hold one 16-byte `ValueRow` per row and
    // the statistics five f64.
    unsafe { launch.run(stream, &params) }
}
