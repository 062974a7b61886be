//! The policy loss on the GPU (kernels/ppo.cu), and the launch sequence it shares with the
//! value loss. One kernel (one block per sequence) when the denominators are
//! global and no statistics are asked for; statistics add a one-block reduction of the row
//! records, and local denominators with a gradient a third pass (the weights need the batch's
//! counts first). Nothing synchronises the host.

use std::sync::Arc;

use cudarc::driver::{CudaStream, DevicePtr, DeviceRepr, LaunchConfig, PushKernelArg};

use crate::cuda::aggregation::{
    AggregationParams, FinalizeParams, ONE_BLOCK, check_workspace, count_mask, known_counts,
    records_and_count_bytes, workspace_or_alloc,
};
use crate::cuda::module::{Module, function};
use crate::cuda::{DeviceStats, LaunchContext, driver_error, opt_ptr, opt_ptr_mut};
use crate::{
    BatchCounts, Cuda, PolicyLossInputs, PolicyLossOptions, PolicyLossOutputs, PolicyLossStats,
    PolicyObjective, Result, RowShape,
};

/// Bytes per sequence of the policy row records (`PolicyRow`: 12 f32).
const POLICY_RECORD_BYTES: usize = 48;
/// f64 words of the policy statistics (`PolicyStat` in the kernel).
pub const POLICY_STATS_WORDS: usize = 15;

/// Bytes of workspace [`policy_loss`] may use for `shape`: one record per sequence (for the
/// statistics), and the valid-token counts a gradient under the batch's own denominators needs
/// first (a local normaliser with a mask: one small pass over the mask before the one pass over
/// the inputs).
pub fn policy_loss_workspace_bytes(shape: RowShape) -> usize {
    records_and_count_bytes(shape.rows * POLICY_RECORD_BYTES, shape.rows)
}

/// The kernels' `PolicyParams` (kernels/ppo.cu), field for field.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct PolicyParams {
    logp: u64,
    old_logp: u64,
    advantages: u64,
    mask: u64,
    entropy: u64,
    loss: u64,
    grad_logp: u64,
    grad_entropy: u64,
    ld: i64,
    rows: i32,
    cols: i32,
    objective: i32,
    clip_low: f32,
    clip_high: f32,
    dual: f32,
    lr_clamp: f32,
    beta: f32,
    entropy_coef: f32,
    aggregation: i32,
    max_len: f64,
    weights_known: i32,
    accumulate: i32,
    tokens: f64,
    valid_sequences: f64,
    sequences: f64,
    counts: u64,
    records: u64,
    /// SAPO's temperatures τ₊, τ₋ (1 for the other objectives).
    tau_pos: f32,
    tau_neg: f32,
}

// The kernels pin the same size and offsets (`static_assert` in kernels/).
pin_layout!(PolicyParams, 176, {
    logp: 0, old_logp: 8, advantages: 16, mask: 24, entropy: 32, loss: 40, grad_logp: 48,
    grad_entropy: 56, ld: 64, rows: 72, cols: 76, objective: 80, clip_low: 84, clip_high: 88,
    dual: 92, lr_clamp: 96, beta: 100, entropy_coef: 104, aggregation: 108, max_len: 112,
    weights_known: 120, accumulate: 124, tokens: 128, valid_sequences: 136, sequences: 144,
    counts: 152, records: 160, tau_pos: 168, tau_neg: 172,
});

// SAFETY: repr(C) with the layout of the kernels' `struct PolicyParams` (asserted above and in
// the kernel): eight 8-byte pointers, a 64-bit stride, three ints, six floats, an int, a
// double, two ints, three doubles, two pointers and two floats, in that order on both sides
// (176 bytes).
unsafe impl DeviceRepr for PolicyParams {}

/// The launches shared by the two losses (kernels/ppo.cu): `{loss}_rows(Params, status)`
/// with one block of 256 threads per sequence, then, when records are needed, the one-block
/// `{loss}_finalize(FinalizeParams)`. (The mask count a gradient under the batch's own
/// denominators needs runs before, from the caller.)
pub(super) struct LossLaunch {
    /// The rows kernel and the finalize kernel of the loss.
    pub(super) kernels: [&'static str; 2],
    pub(super) rows: usize,
    pub(super) status: u64,
    /// The finalize kernel's block (its records: the rows kernel's too).
    pub(super) finalize: FinalizeParams,
    pub(super) need_records: bool,
}

impl LossLaunch {
    /// The rows kernel (per-token outputs and gradients, row records), then, when the
    /// statistics are wanted, the finalize kernel.
    ///
    /// # Safety
    /// `params` is the `Params` struct of `self.kernels`, whose pointers are null or
    /// cover the launch's shape, with the same `records` as `finalize`, which (when records
    /// are needed) hold one row record per sequence and `finalize.stats` the kernel's statistics words, all device
    /// memory of `stream`'s context that stays allocated until the kernels ran.
    pub(super) unsafe fn run<P: DeviceRepr>(&self, stream: &Arc<CudaStream>, params: &P) -> Result<()> {
        let ctx = stream.context();
        let per_row =
            LaunchConfig { grid_dim: (self.rows as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        let f = function(ctx, Module::Ppo, self.kernels[0])?;
        let mut l = stream.launch_builder(&f);
        l.arg(params).arg(&self.status);
        // SAFETY: the caller's contract; the signature is `(Params, unsigned long long*)`,
        // one block of 256 threads per sequence (rows ≤ i32::MAX by the shape check).
        unsafe { l.launch(per_row) }.map_err(driver_error("launching a loss's rows kernel"))?;
        if !self.need_records {
            return Ok(());
        }
        let f = function(ctx, Module::Ppo, self.kernels[1])?;
        let mut l = stream.launch_builder(&f);
        l.arg(&self.finalize);
        // SAFETY: matches `{loss}_finalize(FinalizeParams)` (the layout asserted on both sides);
        // exactly one block of 256 threads (its trees assume it); reads the records written above
        // on this stream and writes the statistics.
        unsafe { l.launch(ONE_BLOCK) }.map_err(driver_error("launching a loss's finalize kernel"))?;
        Ok(())
    }
}

/// The policy loss on the GPU, the twin of [`cpu::policy_loss`](crate::cpu::policy_loss) (same
/// objectives, aggregation, gradients and statistics; f32 row sums combined in f64 in a fixed
/// order). A sequence with a non-finite input at a valid token is reported to `ctx`'s status word
/// ([`RowProblem::NonFinite`](crate::RowProblem::NonFinite)), one whose finite inputs give a loss
/// or a gradient beyond f32, or (with statistics) an f32 row sum beyond it, as
/// [`RowProblem::Overflow`](crate::RowProblem::Overflow), as the CPU, whose row sums are f32 too.
///
/// ```no_run
/// use rlhf_kernels::cuda::{self, CudaDevice, LaunchContext, DeviceStats};
/// use rlhf_kernels::{PolicyLossOutputs};
/// use rlhf_kernels::{PolicyLossStats};
/// use rlhf_kernels::{PolicyLossInputs};
/// use rlhf_kernels::{PolicyLossOptions, RowShape};
/// let device = CudaDevice::new(0)?;
/// let s = device.stream();
/// let (logp, old, adv) = (s.clone_htod(&[-1.0f32, -0.5]).unwrap(), s.clone_htod(&[-1.0f32, -1.0]).unwrap(), s.clone_htod(&[1.0f32, 1.0]).unwrap());
/// let mut grad = s.alloc_zeros::<f32>(2).unwrap();
/// let (mut stats, mut ctx) = (DeviceStats::<PolicyLossStats>::new(s)?, LaunchContext::new(s)?);
/// let inputs = PolicyLossInputs { shape: RowShape::new(1, 2), logp: logp.as_view(), old_logp: old.as_view(),
///     advantages: adv.as_view(), mask: None, entropy: None };
/// let out = PolicyLossOutputs { grad_logp: Some(grad.as_view_mut()), stats: Some(&mut stats), ..Default::default() };
/// cuda::policy_loss(&mut ctx, &inputs, out, &PolicyLossOptions::default())?;
/// ctx.check()?;
/// assert_eq!(stats.read(s)?.clip_fraction_high, 0.5);
/// # Ok::<(), rlhf_kernels::Error>(())
/// ```
pub fn policy_loss(
    ctx: &mut LaunchContext,
    inputs: &PolicyLossInputs<'_, Cuda>,
    mut out: PolicyLossOutputs<'_, Cuda>,
    opts: &PolicyLossOptions,
) -> Result<()> {
    let (stream, status) = ctx.parts();
    let shape = inputs.shape;
    inputs.validate()?;
    out.check(shape)?;
    opts.validate()?;
    if let Some(w) = &out.workspace {
        check_workspace(w.len(), policy_loss_workspace_bytes(shape))?;
    }
    let s: &CudaStream = stream;
    let (logp, _g1) = inputs.logp.device_ptr(s);
    let (old_logp, _g2) = inputs.old_logp.device_ptr(s);
    let (advantages, _g3) = inputs.advantages.device_ptr(s);
    let (mask, _g4) = opt_ptr(&inputs.mask, s);
    let (entropy, _g5) = opt_ptr(&inputs.entropy, s);
    let (loss, _g6) = opt_ptr_mut(&mut out.loss, s);
    let (grad_logp, _g7) = opt_ptr_mut(&mut out.grad_logp, s);
    let (grad_entropy, _g8) = opt_ptr_mut(&mut out.grad_entropy, s);
    let (workspace, _g9) = opt_ptr_mut(&mut out.workspace, s);
    let (stats, _g10) = DeviceStats::opt_words_ptr(out.stats.take(), s);
    let (status, _g11) = status.device_ptr(s);
    let args = PolicyLossArgs {
        shape,
        logp,
        old_logp,
        advantages,
        mask,
        entropy,
        loss,
        grad_logp,
        grad_entropy,
        accumulate: out.accumulate,
        stats,
        workspace,
        status,
    };
    // SAFETY: every address comes from a cudarc buffer of this stream's context whose length
    // was checked above (the outputs are distinct mutable borrows, the statistics buffer holds
    // 15 f64); the guards keep cudarc's event tracking in order until the launches are
    // enqueued.
    unsafe { launch_policy(stream, &args, opts) }
}

/// Buffers of a raw [`policy_loss`](crate::cuda::raw::policy_loss) call: device addresses, 0
/// for an absent optional buffer.
#[derive(Debug, Clone, Copy)]
pub struct PolicyLossArgs {
    /// `[B, T]` of every per-token buffer (row stride allowed).
    pub shape: RowShape,
    /// f32 `log π(y_t)`.
    pub logp: u64,
    /// f32 `log π_old(y_t)`.
    pub old_logp: u64,
    /// f32 advantages.
    pub advantages: u64,
    /// Mask bytes (0 = padding), or 0.
    pub mask: u64,
    /// f32 entropies, or 0.
    pub entropy: u64,
    /// f32 per-token loss out, or 0.
    pub loss: u64,
    /// f32 `∂loss/∂logp` out, or 0.
    pub grad_logp: u64,
    /// f32 `∂loss/∂H` out, or 0.
    pub grad_entropy: u64,
    /// Add `∂loss/∂logp` to `grad_logp` at valid tokens instead of overwriting it.
    pub accumulate: bool,
    /// 15 f64 of statistics out (read them with
    /// [`policy_stats_from_words`](crate::cuda::raw::policy_stats_from_words)), or 0.
    pub stats: u64,
    /// [`policy_loss_workspace_bytes`] bytes at a 16-byte aligned address, or 0 to allocate
    /// on the stream when needed.
    pub workspace: u64,
    /// One u64 status word, initialised to [`STATUS_CLEAR`](crate::cuda::raw::STATUS_CLEAR).
    pub status: u64,
}

/// The statistics of a raw [`policy_loss`](crate::cuda::raw::policy_loss) from its 15 f64
/// words (`[loss, policy loss, entropy loss, clip low, clip high, dual clip, k1, k3, ratio
/// mean, ratio min, ratio max, entropy mean, valid tokens, valid sequences, sequences]`).
///
/// ```
/// use rlhf_kernels::cuda::raw::{policy_stats_from_words, POLICY_STATS_WORDS};
/// let mut w = [0.0f64; POLICY_STATS_WORDS];
/// w[0] = -0.25;
/// assert_eq!(policy_stats_from_words(&w)?.loss, -0.25);
/// assert!(policy_stats_from_words(&w[..3]).is_err());
/// # Ok::<(), rlhf_kernels::Error>(())
/// ```
pub fn policy_stats_from_words(w: &[f64]) -> Result<PolicyLossStats> {
    crate::logprobs::check_len("policy statistics words", w.len(), POLICY_STATS_WORDS)?;
    Ok(PolicyLossStats {
        loss: w[0],
        policy_loss: w[1],
        entropy_loss: w[2],
        clip_fraction_low: w[3],
        clip_fraction_high: w[4],
        dual_clip_fraction: w[5],
        approx_kl_k1: w[6],
        approx_kl_k3: w[7],
        ratio_mean: w[8],
        ratio_min: w[9],
        ratio_max: w[10],
        entropy_mean: w[11],
        counts: BatchCounts { valid_tokens: w[12], valid_sequences: w[13], sequences: w[14] },
    })
}

/// The 15 words of [`policy_stats_from_words`] from statistics (for callers that hand the CPU
/// backend's statistics on in the GPU's layout, e.g. the Python module).
///
/// ```
/// use rlhf_kernels::cuda::raw::{policy_stats_from_words, policy_stats_to_words};
/// let mut w = [0.0f64; 15];
/// w.iter_mut().enumerate().for_each(|(i, x)| *x = i as f64);
/// assert_eq!(policy_stats_to_words(&policy_stats_from_words(&w)?), w);
/// # Ok::<(), rlhf_kernels::Error>(())
/// ```
pub fn policy_stats_to_words(s: &PolicyLossStats) -> [f64; POLICY_STATS_WORDS] {
    [
        s.loss,
        s.policy_loss,
        s.entropy_loss,
        s.clip_fraction_low,
        s.clip_fraction_high,
        s.dual_clip_fraction,
        s.approx_kl_k1,
        s.approx_kl_k3,
        s.ratio_mean,
        s.ratio_min,
        s.ratio_max,
        s.entropy_mean,
        s.counts.valid_tokens,
        s.counts.valid_sequences,
        s.counts.sequences,
    ]
}

/// The policy loss's launches on checked device addresses (the safe and raw entry points
/// share them): row records and statistics are allocated on the stream when needed and not
/// given.
///
/// # Safety
/// Every non-zero address of `a` is device memory of `stream`'s context of the size its
/// [`PolicyLossArgs`] field documents, the outputs overlap nothing else, and every buffer
/// stays allocated until the kernels ran.
pub(crate) unsafe fn launch_policy(
    stream: &Arc<CudaStream>,
    a: &PolicyLossArgs,
    opts: &PolicyLossOptions,
) -> Result<()> {
    let shape = a.shape;
    shape.validate("policy loss")?;
    opts.validate()?;
    let global = known_counts(opts.normaliser, shape, a.mask != 0);
    let want_grad = a.grad_logp != 0 || a.grad_entropy != 0;
    // The batch's own counts under a mask: counted on the device before the one pass.
    let count_on_device = want_grad && global.is_none();
    let need_records = a.stats != 0;
    let mut owned = None;
    let need = policy_loss_workspace_bytes(shape);
    let (workspace, _g1) =
        workspace_or_alloc(stream, need_records || count_on_device, a.workspace, need, &mut owned)?;
    let records = if need_records { workspace } else { 0 };
    // SAFETY: when counting, a mask is present (the counts are not known on the host) and
    // covers the shape (checked, or the raw caller's contract), and the workspace is
    // policy_loss_workspace_bytes long, 16-byte aligned, alive until this call's kernels ran.
    let device_counts = unsafe {
        count_mask(count_on_device, stream, a.mask, shape, workspace, shape.rows * POLICY_RECORD_BYTES)?
    };
    let stats = a.stats;
    let (aggregation, max_len) = opts.aggregation.code();
    let objective = opts.objective.code();
    let counts = global.unwrap_or([0.0; 3]);
    let params = PolicyParams {
        logp: a.logp,
        old_logp: a.old_logp,
        advantages: a.advantages,
        mask: a.mask,
        entropy: a.entropy,
        loss: a.loss,
        grad_logp: a.grad_logp,
        grad_entropy: a.grad_entropy,
        ld: shape.row_stride as i64,
        rows: shape.rows as i32,
        cols: shape.cols as i32,
        objective,
        clip_low: opts.clip_low,
        clip_high: opts.clip_high,
        dual: opts.dual_bound(),
        lr_clamp: opts.lr_clamp(),
        beta: if let PolicyObjective::KlPenalty { beta } = opts.objective { beta } else { 0.0 },
        entropy_coef: opts.entropy_coef,
        aggregation,
        max_len,
        weights_known: i32::from(global.is_some()),
        accumulate: i32::from(a.accumulate),
        tokens: counts[0],
        valid_sequences: counts[1],
        sequences: counts[2],
        counts: device_counts,
        records,
        tau_pos: opts.objective.sapo_taus().0,
        tau_neg: opts.objective.sapo_taus().1,
    };
    let launch = LossLaunch {
        kernels: ["policy_loss_rows", "policy_loss_finalize"],
        rows: shape.rows,
        status: a.status,
        finalize: FinalizeParams {
            records,
            stats,
            rows: shape.rows as i32,
            coef: opts.entropy_coef,
            chosen: 0,
            aggregation: AggregationParams::new(opts.aggregation, global),
        },
        need_records,
    };
    // SAFETY: `params` is the kernels' `PolicyParams`, every pointer in it null or covering the
    // shape (the caller's contract); the records hold one 48-byte `PolicyRow` per row at a
    // 16-byte aligned address and the statistics 15 f64 (given or allocated above).
    unsafe { launch.run(stream, &params) }
}
