//! CUDA sampled KL estimators and KL-in-reward shaping: safe wrappers and their launches.
//!
//! `sampled_kl` runs one kernel when the denominators are global and no statistics are asked
//! for; statistics add a one-block finalising kernel, and local denominators with a gradient a
//! third pass (the gradient needs the batch's counts first). Nothing synchronises the host.

use std::sync::Arc;

use cudarc::driver::{CudaStream, DevicePtr, DevicePtrMut, DeviceRepr, LaunchConfig, PushKernelArg};

use crate::cuda::aggregation::{
    AggregationParams, FinalizeParams, ONE_BLOCK, check_workspace, count_mask, known_counts,
    records_and_count_bytes, workspace_or_alloc,
};
use crate::cuda::module::{Module, function};
use crate::cuda::{DeviceStats, LaunchContext, driver_error, opt_ptr, opt_ptr_mut, view_ptr};
use crate::memory::IntoViewMut;
use crate::{
    BatchCounts, Cuda, Error, KlRewardsInputs, KlRewardsOptions, Result, RowShape, SampledKlInputs,
    SampledKlOptions, SampledKlOutputs, SampledKlStats,
};

/// Bytes per sequence of the row records (`SampledRow` in the kernel: 10 f32).
const RECORD_BYTES: usize = 40;
/// f64 words of the statistics buffer.
const STATS_WORDS: usize = 13;

/// Bytes of workspace [`sampled_kl`] may use for `shape`: one record per sequence (for the
/// statistics), and the valid-token counts a gradient under the batch's own denominators needs
/// first (a local normaliser with a mask: one small pass over the mask before the one pass over
/// the inputs).
pub fn sampled_kl_workspace_bytes(shape: RowShape) -> usize {
    records_and_count_bytes(shape.rows * RECORD_BYTES, shape.rows)
}

/// The GPU twin of [`cpu::sampled_kl`](crate::cpu::sampled_kl) (same estimators, clamps,
/// aggregations and normalisers), enqueued on `ctx`'s stream: per-token values, the gradient of
/// `loss = β·aggregate(k)` with respect to `logp`, and the batch statistics into
/// `out.stats`, with the bias correction when the options ask for it. A valid token's
/// non-finite `old_logp`, NaN, infinite KL or overflow is reported in `ctx`'s status word as the
/// CPU returns it (row = sequence).
///
/// ```no_run
/// use rlhf_kernels::cuda::{self, CudaDevice, LaunchContext, DeviceStats};
/// use rlhf_kernels::{KlEstimator, RowShape, SampledKlInputs, SampledKlOptions, SampledKlOutputs, SampledKlStats};
/// let device = CudaDevice::new(0)?;
/// let s = device.stream();
/// let (logp, ref_logp) = (s.clone_htod(&[-1.0f32, -2.0]).unwrap(), s.clone_htod(&[-1.5f32, -2.0]).unwrap());
/// let mut grad = s.alloc_zeros::<f32>(2).unwrap();
/// let (mut stats, mut ctx) = (DeviceStats::<SampledKlStats>::new(s)?, LaunchContext::new(s)?);
/// let inputs = SampledKlInputs::new(RowShape::new(1, 2), &logp, &ref_logp);
/// let out = SampledKlOutputs::default().grad_logp(&mut grad).stats(&mut stats);
/// cuda::sampled_kl(&mut ctx, &inputs, out, &SampledKlOptions::new(KlEstimator::K3))?;
/// ctx.check()?;
/// println!("KL loss {}", stats.read(s)?.loss);
/// # Ok::<(), rlhf_kernels::Error>(())
/// ```
pub fn sampled_kl(
    ctx: &mut LaunchContext,
    inputs: &SampledKlInputs<'_, Cuda>,
    mut out: SampledKlOutputs<'_, Cuda>,
    opts: &SampledKlOptions,
) -> Result<()> {
    let (stream, status) = ctx.parts();
    inputs.validate(opts)?;
    let shape = inputs.shape;
    out.check(shape)?;
    if let Some(w) = &out.workspace {
        check_workspace(w.len(), sampled_kl_workspace_bytes(shape))?;
    }
    let s: &CudaStream = stream;
    let (logp, _g1) = inputs.logp.device_ptr(s);
    let (ref_logp, _g2) = inputs.ref_logp.device_ptr(s);
    let (mask, _g3) = opt_ptr(&inputs.mask, s);
    let (old_logp, _g9) = opt_ptr(&inputs.old_logp, s);
    let (values, _g4) = opt_ptr_mut(&mut out.values, s);
    let (grad_logp, _g5) = opt_ptr_mut(&mut out.grad_logp, s);
    let (workspace, _g6) = opt_ptr_mut(&mut out.workspace, s);
    let (stats, _g7) = DeviceStats::opt_words_ptr(out.stats.take(), s);
    let (status, _g8) = status.device_ptr(s);
    let args =
        SampledKlArgs { shape, logp, ref_logp, mask, old_logp, values, grad_logp, stats, workspace, status };
    // SAFETY: every address comes from a cudarc buffer of this stream's context whose length
    // was checked above (the outputs are distinct mutable borrows, the statistics buffer holds
    // 13 f64); the guards keep cudarc's event tracking in order until the launches are enqueued.
    unsafe { launch_sampled(stream, &args, opts) }
}

/// Buffers of a raw [`sampled_kl`](crate::cuda::raw::sampled_kl) call: device addresses, 0 for
/// an absent optional buffer.
#[derive(Debug, Clone, Copy)]
pub struct SampledKlArgs {
    /// `[B, T]` of every per-token buffer (row stride allowed).
    pub shape: RowShape,
    /// f32 `log π(y_t)`.
    pub logp: u64,
    /// f32 `log π_ref(y_t)`.
    pub ref_logp: u64,
    /// Mask bytes (0 = padding), or 0.
    pub mask: u64,
    /// f32 `log π_old(y_t)` for the bias correction (exactly when the options ask for it), or 0.
    pub old_logp: u64,
    /// f32 estimator value per token out, or 0.
    pub values: u64,
    /// f32 `∂loss/∂logp` per token out, or 0.
    pub grad_logp: u64,
    /// 13 f64 of statistics out (read them with
    /// [`sampled_kl_stats_from_words`](crate::cuda::raw::sampled_kl_stats_from_words)), or 0.
    pub stats: u64,
    /// [`sampled_kl_workspace_bytes`] bytes at a 16-byte aligned address, or 0 to allocate on
    /// the stream when needed.
    pub workspace: u64,
    /// One u64 status word, initialised to [`STATUS_CLEAR`](crate::cuda::raw::STATUS_CLEAR).
    pub status: u64,
}

/// f64 words of the statistics of a raw [`sampled_kl`](crate::cuda::raw::sampled_kl).
pub const SAMPLED_KL_STATS_WORDS: usize = STATS_WORDS;

/// The statistics of a raw [`sampled_kl`](crate::cuda::raw::sampled_kl) from its 13 f64 words
/// (`[loss, the eight means of SampledKlStats::means, clamped fraction, valid tokens, valid
/// sequences, sequences]`).
///
/// ```
/// use rlhf_kernels::cuda::raw::{SAMPLED_KL_STATS_WORDS, sampled_kl_stats_from_words, sampled_kl_stats_to_words};
/// let mut w = [0.0f64; SAMPLED_KL_STATS_WORDS];
/// w.iter_mut().enumerate().for_each(|(i, x)| *x = i as f64);
/// let stats = sampled_kl_stats_from_words(&w)?;
/// assert_eq!((stats.loss, stats.clamped_fraction), (0.0, 9.0));
/// assert_eq!(sampled_kl_stats_to_words(&stats), w);
/// assert!(sampled_kl_stats_from_words(&w[..3]).is_err());
/// # Ok::<(), rlhf_kernels::Error>(())
/// ```
pub fn sampled_kl_stats_from_words(w: &[f64]) -> Result<SampledKlStats> {
    crate::logprobs::check_len("sampled KL statistics words", w.len(), STATS_WORDS)?;
    let mut means = [0.0; 8];
    means.copy_from_slice(&w[1..9]);
    Ok(SampledKlStats {
        loss: w[0],
        means,
        clamped_fraction: w[9],
        counts: BatchCounts { valid_tokens: w[10], valid_sequences: w[11], sequences: w[12] },
    })
}

/// The 13 words of [`sampled_kl_stats_from_words`] from statistics (for callers that hand the
/// CPU backend's statistics on in the GPU's layout, e.g. the Python module).
pub fn sampled_kl_stats_to_words(s: &SampledKlStats) -> [f64; STATS_WORDS] {
    let mut w = [0.0; STATS_WORDS];
    w[0] = s.loss;
    w[1..9].copy_from_slice(&s.means);
    w[9] = s.clamped_fraction;
    w[10..].copy_from_slice(&[s.counts.valid_tokens, s.counts.valid_sequences, s.counts.sequences]);
    w
}

/// The kernels' `SampledParams` (kernels/kl_sampled.cu), field for field.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct SampledParams {
    logp: u64,
    ref_logp: u64,
    mask: u64,
    counts: u64,
    values: u64,
    grad: u64,
    ld: i64,
    rows: i32,
    cols: i32,
    chosen: i32,
    lr_clamp: f32,
    v_clamp: f32,
    coef: f32,
    aggregation: i32,
    weights_known: i32,
    max_len: f64,
    tokens: f64,
    valid_sequences: f64,
    sequences: f64,
    records: u64,
    /// The sampling policy's log-probs (bias correction), or null.
    old_logp: u64,
}

// The kernels pin the same size and offsets (`static_assert` in kernels/).
pin_layout!(SampledParams, 136, {
    logp: 0, ref_logp: 8, mask: 16, counts: 24, values: 32, grad: 40, ld: 48, rows: 56, cols: 60,
    chosen: 64, lr_clamp: 68, v_clamp: 72, coef: 76, aggregation: 80, weights_known: 84,
    max_len: 88, tokens: 96, valid_sequences: 104, sequences: 112, records: 120, old_logp: 128,
});

// SAFETY: repr(C) with the layout of the kernels' `struct SampledParams` (asserted above and in
// the kernel), passed by value; plain old data.
unsafe impl DeviceRepr for SampledParams {}

/// The sampled KL's launches on checked device addresses (the safe and raw entry points share
/// them): row records and the mask count are allocated on the stream when needed and not given.
///
/// # Safety
/// Every non-zero address of `a` is device memory of `stream`'s context of the size its
/// [`SampledKlArgs`] field documents, the outputs overlap nothing else, and every buffer stays
/// allocated until the kernels ran.
pub(crate) unsafe fn launch_sampled(
    stream: &Arc<CudaStream>,
    a: &SampledKlArgs,
    opts: &SampledKlOptions,
) -> Result<()> {
    let shape = a.shape;
    if a.values == 0 && a.grad_logp == 0 && a.stats == 0 {
        return Err(Error::InvalidOption {
            name: "outputs",
            value: "none requested".into(),
            expected: "at least one of values, grad_logp, stats",
        });
    }
    let (lr_clamp, v_clamp) = opts.limits()?;
    crate::kl::check_bias_correction(opts.bias_correction, a.old_logp != 0)?;
    let (aggregation, max_len) = opts.aggregation.code();
    let global = known_counts(opts.normaliser, shape, a.mask != 0);
    // The batch's own counts under a mask: counted on the device before the one pass.
    let count_on_device = a.grad_logp != 0 && global.is_none();
    let need_records = a.stats != 0;
    let mut owned = None;
    let need = sampled_kl_workspace_bytes(shape);
    let (workspace, _g1) =
        workspace_or_alloc(stream, need_records || count_on_device, a.workspace, need, &mut owned)?;
    let records = if need_records { workspace } else { 0 };
    // SAFETY: when counting, a mask is present (the counts are not known on the host) and
    // covers the shape (checked, or the raw caller's contract), and the workspace is
    // sampled_kl_workspace_bytes long, 16-byte aligned, alive until this call's kernels ran.
    let device_counts =
        unsafe { count_mask(count_on_device, stream, a.mask, shape, workspace, shape.rows * RECORD_BYTES)? };

    let rows = shape.rows as i32;
    let (chosen, coef) = (opts.estimator.code(), opts.coef);
    let counts = global.unwrap_or([0.0; 3]);
    let params = SampledParams {
        logp: a.logp,
        ref_logp: a.ref_logp,
        mask: a.mask,
        counts: device_counts,
        values: a.values,
        grad: a.grad_logp,
        ld: shape.row_stride as i64,
        rows,
        cols: shape.cols as i32,
        chosen,
        lr_clamp,
        v_clamp,
        coef,
        aggregation,
        weights_known: i32::from(global.is_some()),
        max_len,
        tokens: counts[0],
        valid_sequences: counts[1],
        sequences: counts[2],
        records,
        old_logp: a.old_logp,
    };
    let per_row =
        LaunchConfig { grid_dim: (shape.rows as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };

    let func = function(stream.context(), Module::KlSampled, "sampled_kl_rows")?;
    let mut launch = stream.launch_builder(&func);
    launch.arg(&params).arg(&a.status);
    // SAFETY: matches `sampled_kl_rows(SampledParams, unsigned long long*)` (the
    // struct's layout is asserted on both sides); one block of 256 threads per sequence (rows ≤
    // i32::MAX, checked by the shape); every buffer covers the shape (the caller's contract) or
    // is null, which the kernel tests; the records hold one 40-byte record per row and the
    // counts (when not null) were written by the mask count above on this stream. The gradient
    // is written only with known denominators, which it has whenever it is requested.
    unsafe { launch.launch(per_row) }.map_err(driver_error("launching sampled_kl_rows"))?;

    if need_records {
        let params = FinalizeParams {
            records,
            stats: a.stats,
            rows,
            coef,
            chosen,
            aggregation: AggregationParams::new(opts.aggregation, global),
        };
        let func = function(stream.context(), Module::KlSampled, "sampled_kl_finalize")?;
        let mut launch = stream.launch_builder(&func);
        launch.arg(&params);
        // SAFETY: matches `sampled_kl_finalize(FinalizeParams)` (the layout asserted on both
        // sides); exactly one block of 256 threads (the kernel's tree assumes it); the records
        // were written by the launch above on this stream and the statistics buffer holds 13 f64.
        unsafe { launch.launch(ONE_BLOCK) }.map_err(driver_error("launching sampled_kl_finalize"))?;
    }
    Ok(())
}

/// The GPU twin of [`cpu::kl_rewards`](crate::cpu::kl_rewards): `r_t = −β·kl_t` on valid
/// tokens plus each sequence's score on its last valid token, 0 on padding; one kernel. A
/// sequence with a non-finite KL at a valid token or a non-finite score
/// ([`RowProblem::NonFinite`](crate::RowProblem::NonFinite)), or whose reward overflows f32
/// ([`RowProblem::Overflow`](crate::RowProblem::Overflow)), is reported in `ctx`'s status word.
///
/// ```no_run
/// use rlhf_kernels::cuda::{self, CudaDevice, LaunchContext};
/// use rlhf_kernels::{KlRewardsInputs, KlRewardsOptions, RowShape};
/// let device = CudaDevice::new(0)?;
/// let s = device.stream();
/// let kl = s.clone_htod(&[0.5f32, 0.25]).unwrap();
/// let scores = s.clone_htod(&[2.0f32]).unwrap();
/// let mut rewards = s.alloc_zeros::<f32>(2).unwrap();
/// let mut ctx = LaunchContext::new(s)?;
/// let inputs = KlRewardsInputs::new(RowShape::new(1, 2), &kl, &scores);
/// cuda::kl_rewards(&mut ctx, &inputs, &mut rewards, &KlRewardsOptions::new(0.1))?;
/// ctx.check()?;
/// # Ok::<(), rlhf_kernels::Error>(())
/// ```
pub fn kl_rewards<'a>(
    ctx: &mut LaunchContext,
    inputs: &KlRewardsInputs<'_, Cuda>,
    rewards: impl IntoViewMut<'a, f32, Memory = Cuda>,
    opts: &KlRewardsOptions,
) -> Result<()> {
    let (stream, status) = ctx.parts();
    let mut rewards = rewards.into_view_mut();
    inputs.validate(Some(rewards.len()), opts)?;
    let s: &CudaStream = stream;
    let (kl, _g1) = inputs.kl.device_ptr(s);
    let (mask, _g2) = view_ptr(inputs.mask.as_ref(), s);
    let (scores, _g3) = inputs.scores.device_ptr(s);
    let (rewards, _g4) = rewards.device_ptr_mut(s);
    let (status, _g5) = status.device_ptr(s);
    let args = KlRewardsArgs { shape: inputs.shape, kl, mask, scores, rewards, status };
    // SAFETY: every address comes from a cudarc buffer of this stream's context whose length was
    // checked above; the guards keep cudarc's event tracking in order until the launch.
    unsafe { launch_rewards(stream, &args, opts) }
}

/// Buffers of a raw [`kl_rewards`](crate::cuda::raw::kl_rewards) call: device addresses, 0 for
/// an absent mask.
#[derive(Debug, Clone, Copy)]
pub struct KlRewardsArgs {
    /// `[B, T]` of `kl`, `mask` and `rewards` (row stride allowed).
    pub shape: RowShape,
    /// f32 per-token KL estimate.
    pub kl: u64,
    /// Mask bytes (0 = padding), or 0.
    pub mask: u64,
    /// f32 score per sequence (`shape.rows` of them).
    pub scores: u64,
    /// f32 per-token reward out.
    pub rewards: u64,
    /// One u64 status word, initialised to [`STATUS_CLEAR`](crate::cuda::raw::STATUS_CLEAR).
    pub status: u64,
}

/// The kernels' `RewardsParams` (kernels/kl_sampled.cu), field for field.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct RewardsParams {
    kl: u64,
    mask: u64,
    scores: u64,
    rewards: u64,
    ld: i64,
    rows: i32,
    cols: i32,
    beta: f32,
}

// The kernels pin the same size and offsets (`static_assert` in kernels/).
pin_layout!(RewardsParams, 56, {
    kl: 0, mask: 8, scores: 16, rewards: 24, ld: 32, rows: 40, cols: 44, beta: 48,
});

// SAFETY: repr(C) with the layout of the kernels' `struct RewardsParams` (asserted above and
// in the kernel), passed by value; plain old data.
unsafe impl DeviceRepr for RewardsParams {}

/// The `kl_rewards` launch on checked device addresses (the safe and raw entry points share it).
///
/// # Safety
/// Every non-zero address of `a` is device memory of `stream`'s context of the size its
/// [`KlRewardsArgs`] field documents, `rewards` overlaps nothing else, and every buffer stays
/// allocated until the kernel ran.
pub(super) unsafe fn launch_rewards(
    stream: &Arc<CudaStream>,
    a: &KlRewardsArgs,
    opts: &KlRewardsOptions,
) -> Result<()> {
    let shape = a.shape;
    let params = RewardsParams {
        kl: a.kl,
        mask: a.mask,
        scores: a.scores,
        rewards: a.rewards,
        ld: shape.row_stride as i64,
        rows: shape.rows as i32,
        cols: shape.cols as i32,
        beta: opts.beta,
    };
    let func = function(stream.context(), Module::KlSampled, "kl_rewards")?;
    let mut launch = stream.launch_builder(&func);
    launch.arg(&params).arg(&a.status);
    let cfg =
        LaunchConfig { grid_dim: (shape.rows as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    // SAFETY: matches `kl_rewards(RewardsParams, unsigned long long*)` (the struct's layout is
    // asserted on both sides); one block of 256 threads per sequence; `kl`,
    // `mask` and `rewards` cover the shape, `scores` holds one value per row (the caller's
    // contract) and `status` is one u64 status word.
    unsafe { launch.launch(cfg) }.map_err(driver_error("launching kl_rewards"))?;
    Ok(())
}
