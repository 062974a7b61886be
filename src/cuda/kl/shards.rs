//! CUDA exact divergences over a vocabulary split across tensor-parallel ranks: each rank
//! reduces its slice of both logits rows to an [`ExactKlPartial`] per row, the ranks gather the
//! partials as `[shards][rows]`, and any rank finishes the rows. The JSD adds a second round
//! (per-shard sums given the merged log-sum-exps). Same recipe as
//! [`cpu::exact_kl_shard_partials`](crate::cpu::exact_kl_shard_partials), same operations in
//! the same order as the whole-row kernels.

use std::sync::Arc;

use cudarc::driver::{
    CudaStream, CudaView, CudaViewMut, DevicePtr, DevicePtrMut, DeviceRepr, LaunchConfig, ValidAsZeroBits,
};

use super::exact::{
    BLOCK, ExactKernel, ExactOut, ExactParams, PairArgs, check_reference, kernel, launch_exact, per_thread,
};
use crate::cuda::{LaunchContext, non_null, opt_ptr_mut, view_ptr};
use crate::kl::{jsd_beta, shard_count};
use crate::logprobs::check_len;
use crate::{Cuda, ExactKlOutputs, ReferenceRows};
use crate::{Element, Error, ExactDivergence, ExactKlOptions, ExactKlPartial, Result, RowShape};

// SAFETY: ExactKlPartial is repr(C) plain old data (six f32 and a u32), the layout of the
// kernels' `PairPartial` (pinned beside its declaration in src/kl.rs); every bit pattern is a valid value, including all zeros.
unsafe impl DeviceRepr for ExactKlPartial {}

// SAFETY: as above: all-zero bits are a valid ExactKlPartial.
unsafe impl ValidAsZeroBits for ExactKlPartial {}

fn per_row(rows: usize) -> LaunchConfig {
    LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 }
}

/// One row per merge thread and `shards` records per row: the limits of a non-empty
/// `[rows, shards]` batch (the kernels count both in 32 bits).
fn check_counts(what: &'static str, rows: usize, shards: usize) -> Result<()> {
    RowShape::new(rows, shards).validate(what)
}

/// Per-row [`ExactKlPartial`]s of a vocabulary shard on the GPU: `policy` and
/// `reference.logits` hold the same columns of the full vocabulary. The GPU twin of
/// [`cpu::exact_kl_shard_partials`](crate::cpu::exact_kl_shard_partials): padding rows give
/// [`ExactKlPartial::EMPTY`], row problems travel in the flags. Gather the partials of all
/// shards as `[shards][rows]` and finish with [`finish_exact_kl_partials`].
///
/// ```no_run
/// use rlhf_kernels::cuda::{self, CudaDevice, LaunchContext};
/// use rlhf_kernels::{ExactKlOutputs};
/// use rlhf_kernels::{ReferenceRows};
/// use rlhf_kernels::{ExactDivergence, ExactKlOptions, ExactKlPartial, RowShape};
/// let device = CudaDevice::new(0)?;
/// let s = device.stream();
/// let (rows, shard_cols, shards) = (4, 3, 2);
/// let opts = ExactKlOptions::new(ExactDivergence::PolicyRef);
/// let shape = RowShape::new(rows, shard_cols);
/// let mut gathered = s.alloc_zeros::<ExactKlPartial>(shards * rows).unwrap();
/// let mut ctx = LaunchContext::new(s)?;
/// for k in 0..shards {
///     // On rank k: its slice of both rows (here the same numbers on every rank).
///     let p = s.clone_htod(&[0.5f32, 1.0, -1.0].repeat(rows)).unwrap();
///     let q = s.clone_htod(&[0.0f32, 1.0, 0.0].repeat(rows)).unwrap();
///     let r = ReferenceRows { logits: q.as_view(), shape, mask: None };
///     let mut mine = gathered.slice_mut(k * rows..(k + 1) * rows); // all-gather in practice
///     cuda::exact_kl_shard_partials(&mut ctx, &p, shape, &r, &mut mine, &opts)?;
/// }
/// let mut kl = s.alloc_zeros::<f32>(rows).unwrap();
/// let out = ExactKlOutputs { value: Some(kl.as_view_mut()), ..Default::default() };
/// cuda::finish_exact_kl_partials(&mut ctx, &gathered, None, out, &opts)?;
/// ctx.check()?;
/// # Ok::<(), rlhf_kernels::Error>(())
/// ```
pub fn exact_kl_shard_partials<P: Element, Q: Element>(
    ctx: &mut LaunchContext,
    policy: &impl DevicePtr<P>,
    policy_shape: RowShape,
    reference: &ReferenceRows<'_, Q, Cuda>,
    partials: &mut impl DevicePtrMut<ExactKlPartial>,
    opts: &ExactKlOptions,
) -> Result<()> {
    let stream = ctx.stream();
    check_reference(policy.len(), policy_shape, reference)?;
    check_len("partials", partials.len(), policy_shape.rows)?;
    let s: &CudaStream = stream;
    let (policy, _g1) = policy.device_ptr(s);
    let (pair, _g2) = PairArgs::of::<P, Q>(s, policy, policy_shape, reference);
    let (partials, _g4) = partials.device_ptr_mut(s);
    let args = ExactKlShardArgs { pair, partials };
    // SAFETY: every address comes from a cudarc buffer of this stream's context whose length
    // was checked above; the guards keep cudarc's event tracking in order until the launch is
    // enqueued.
    unsafe { launch_shard_partials(stream, &args, opts) }
}

/// Buffers of a raw [`exact_kl_shard_partials`](crate::cuda::raw::exact_kl_shard_partials):
/// this rank's vocabulary slice of both logits rows; 0 for an absent mask.
#[derive(Debug, Clone, Copy)]
pub struct ExactKlShardArgs {
    /// The shard's columns of both logits rows (`cols` = the shard's width) and their mask.
    pub pair: PairArgs,
    /// `rows` [`ExactKlPartial`] records out.
    pub partials: u64,
}

/// The shard partials' launch on device addresses (the safe and raw entry points share it):
/// checks the shapes, the pointers and the options, then launches.
///
/// # Safety
/// Every non-zero address of `a` is device memory of `stream`'s context holding what its
/// [`ExactKlShardArgs`] field documents; `partials` overlaps nothing else; every buffer stays
/// allocated until the kernel ran.
pub(super) unsafe fn launch_shard_partials(
    stream: &Arc<CudaStream>,
    a: &ExactKlShardArgs,
    opts: &ExactKlOptions,
) -> Result<()> {
    a.pair.check()?;
    non_null(&[("partials", a.partials)])?;
    let inv_tau = opts.inv_temperature()?;
    let params = ExactParams { partials: a.partials, ..a.pair.params(inv_tau) };
    let name = kernel(ExactKernel::Rows, a.pair.policy_dtype, a.pair.ref_dtype);
    // SAFETY: `exact_kl_rows_<p>_<q>(ExactParams, unsigned long long*)` with one block of 256
    // threads per row (rows ≤ i32::MAX: the shape is validated); both rows cover their shapes
    // (the caller's contract); with `partials` non-null the kernel writes one record per row
    // and touches neither the (null) outputs nor the (null) status.
    unsafe { launch_exact(stream, name, per_row(a.pair.policy_shape.rows), &params, Some(0)) }
}

/// Merges the [`ExactKlPartial`]s of all shards (`[shards][rows]`, shard order; `mask` one byte
/// per row or `None`) and writes the requested outputs as [`exact_kl`](super::exact_kl) would
/// for the whole vocabulary. For the JSD it writes only the two log-sum-exps (both required:
/// they feed [`jsd_shard_sums`]). Rows without a defined result get NaN and are reported in
/// `ctx`'s status word. `out.workspace` is not used.
pub fn finish_exact_kl_partials(
    ctx: &mut LaunchContext,
    partials: &impl DevicePtr<ExactKlPartial>,
    mask: Option<&CudaView<'_, u8>>,
    mut out: ExactKlOutputs<'_, Cuda>,
    opts: &ExactKlOptions,
) -> Result<()> {
    let (stream, status) = ctx.parts();
    let rows = out.check_merge(opts.divergence)?;
    let shards = shard_count("partials", partials.len(), rows)?;
    mask.map_or(Ok(()), |m| check_len("mask", m.len(), rows))?;
    let s: &CudaStream = stream;
    let (partials, _g1) = partials.device_ptr(s);
    let (mask, _g2) = view_ptr(mask, s);
    let (value, _g3) = opt_ptr_mut(&mut out.value, s);
    let (policy_lse, _g4) = opt_ptr_mut(&mut out.policy_lse, s);
    let (ref_lse, _g5) = opt_ptr_mut(&mut out.ref_lse, s);
    let (policy_term, _g6) = opt_ptr_mut(&mut out.policy_term, s);
    let (status, _g7) = status.device_ptr(s);
    let args =
        FinishExactKlArgs { partials, shards, rows, mask, value, policy_lse, ref_lse, policy_term, status };
    // SAFETY: every address comes from a cudarc buffer of this stream's context whose length
    // was checked above (the partials hold shards·rows records); the guards keep cudarc's event
    // tracking in order until the launch is enqueued.
    unsafe { launch_finish_partials(stream, &args, opts) }
}

/// Buffers of a raw [`finish_exact_kl_partials`](crate::cuda::raw::finish_exact_kl_partials);
/// 0 for an absent optional buffer.
#[derive(Debug, Clone, Copy)]
pub struct FinishExactKlArgs {
    /// `shards · rows` [`ExactKlPartial`] records, laid out `[shards][rows]` (shard order).
    pub partials: u64,
    /// Number of shards.
    pub shards: usize,
    /// Number of rows.
    pub rows: usize,
    /// `rows` mask bytes (0 = padding), or 0.
    pub mask: u64,
    /// `rows` f32: the divergence, or 0 (0 for the JSD).
    pub value: u64,
    /// `rows` f32: `ln Σ exp(z_policy)`, or 0 (required for the JSD).
    pub policy_lse: u64,
    /// `rows` f32: `ln Σ exp(z_ref)`, or 0 (required for the JSD).
    pub ref_lse: u64,
    /// `rows` f32: the value again for the two KLs, or 0 (0 for the JSD).
    pub policy_term: u64,
    /// One u64 status word, initialised to [`STATUS_CLEAR`](crate::cuda::raw::STATUS_CLEAR).
    pub status: u64,
}

/// The merge's launch on device addresses (the safe and raw entry points share it): checks
/// the counts, the pointers and the outputs the divergence allows, then launches.
///
/// # Safety
/// Every non-zero address of `a` is device memory of `stream`'s context holding what its
/// [`FinishExactKlArgs`] field documents; the outputs overlap nothing else; every buffer
/// stays allocated until the kernel ran.
pub(super) unsafe fn launch_finish_partials(
    stream: &Arc<CudaStream>,
    a: &FinishExactKlArgs,
    opts: &ExactKlOptions,
) -> Result<()> {
    check_counts("partials", a.rows, a.shards)?;
    non_null(&[("partials", a.partials), ("status", a.status)])?;
    let outputs = [a.value, a.policy_lse, a.ref_lse, a.policy_term];
    if outputs.iter().all(|&p| p == 0) {
        return Err(Error::InvalidOption {
            name: "outputs",
            value: "none requested".into(),
            expected: "at least one of value, policy_lse, ref_lse, policy_term",
        });
    }
    if matches!(opts.divergence, ExactDivergence::Jsd { .. })
        && (a.value != 0 || a.policy_term != 0 || a.policy_lse == 0 || a.ref_lse == 0)
    {
        return Err(Error::InvalidOption {
            name: "outputs",
            value: "value or policy_term, or a missing log-sum-exp, for the JSD".into(),
            expected: "policy_lse and ref_lse only: the JSD's value comes from finish_jsd_sums",
        });
    }
    let inv_tau = opts.inv_temperature()?;
    let params = ExactParams {
        partials: a.partials,
        out: ExactOut {
            value: a.value,
            policy_lse: a.policy_lse,
            ref_lse: a.ref_lse,
            policy_term: a.policy_term,
            ..ExactOut::default()
        },
        mask: a.mask,
        // Record (row, shard) at row + shard·rows.
        row_stride: 1,
        part_stride: a.rows as i64,
        rows: a.rows as i32,
        parts: a.shards as i32,
        divergence: opts.divergence.code().0,
        inv_tau,
        ..ExactParams::default()
    };
    // SAFETY: `exact_kl_merge(ExactParams, unsigned long long*)`, one thread per row (rows and
    // shards within 32 bits: checked); the partials hold shards·rows records, the mask (or
    // null) and every non-null output `rows` bytes / f32, the status one u64 (the caller's
    // contract).
    unsafe { launch_exact(stream, "exact_kl_merge", per_thread(a.rows), &params, Some(a.status)) }
}

/// The JSD's second round on a vocabulary shard on the GPU: per row the pair
/// `[Σ p·log(p/m), Σ q·log(q/m)]` over the shard's columns, written as two f32 into `sums`
/// (`2·rows` f32), given the rows' full log-sum-exps from [`finish_exact_kl_partials`]. The
/// GPU twin of [`cpu::jsd_shard_sums`](crate::cpu::jsd_shard_sums). Padding rows and rows the
/// merge refused give `[0, 0]` (the merge reported them). Gather as `[shards][rows][2]` and
/// finish with [`finish_jsd_sums`].
#[allow(clippy::too_many_arguments)] // context, the two sides, both normalisers, output, options
pub fn jsd_shard_sums<P: Element, Q: Element>(
    ctx: &mut LaunchContext,
    policy: &impl DevicePtr<P>,
    policy_shape: RowShape,
    reference: &ReferenceRows<'_, Q, Cuda>,
    policy_lse: &CudaView<'_, f32>,
    ref_lse: &CudaView<'_, f32>,
    sums: &mut CudaViewMut<'_, f32>,
    opts: &ExactKlOptions,
) -> Result<()> {
    let stream = ctx.stream();
    check_reference(policy.len(), policy_shape, reference)?;
    let rows = policy_shape.rows;
    check_len("policy_lse", policy_lse.len(), rows)?;
    check_len("ref_lse", ref_lse.len(), rows)?;
    check_len("sums", sums.len(), 2 * rows)?;
    let s: &CudaStream = stream;
    let (policy, _g1) = policy.device_ptr(s);
    let (pair, _g2) = PairArgs::of::<P, Q>(s, policy, policy_shape, reference);
    let (policy_lse, _g4) = policy_lse.device_ptr(s);
    let (ref_lse, _g5) = ref_lse.device_ptr(s);
    let (sums, _g6) = sums.device_ptr_mut(s);
    let args = JsdShardArgs { pair, policy_lse, ref_lse, sums };
    // SAFETY: every address comes from a cudarc buffer of this stream's context whose length
    // was checked above; the guards keep cudarc's event tracking in order until the launch is
    // enqueued.
    unsafe { launch_jsd_shard_sums(stream, &args, opts) }
}

/// Buffers of a raw [`jsd_shard_sums`](crate::cuda::raw::jsd_shard_sums): this rank's slice
/// of both logits rows and the rows' full log-sum-exps; 0 for an absent mask.
#[derive(Debug, Clone, Copy)]
pub struct JsdShardArgs {
    /// The shard's columns of both logits rows (`cols` = the shard's width) and their mask.
    pub pair: PairArgs,
    /// `rows` f32: the full rows' `ln Σ exp(z_policy)` (from the merge).
    pub policy_lse: u64,
    /// `rows` f32: the full rows' `ln Σ exp(z_ref)`.
    pub ref_lse: u64,
    /// `2·rows` f32 out at an 8-byte aligned address: per row `[Σ p·log(p/m), Σ q·log(q/m)]`.
    pub sums: u64,
}

/// The JSD shard round's launch on device addresses (the safe and raw entry points share it):
/// checks the shapes, the pointers, the alignment and the divergence, then launches.
///
/// # Safety
/// Every non-zero address of `a` is device memory of `stream`'s context holding what its
/// [`JsdShardArgs`] field documents; `sums` overlaps nothing else; every buffer stays
/// allocated until the kernel ran.
pub(super) unsafe fn launch_jsd_shard_sums(
    stream: &Arc<CudaStream>,
    a: &JsdShardArgs,
    opts: &ExactKlOptions,
) -> Result<()> {
    a.pair.check()?;
    non_null(&[("policy_lse", a.policy_lse), ("ref_lse", a.ref_lse), ("sums", a.sums)])?;
    check_float2_aligned(a.sums)?;
    let beta = jsd_beta(opts.divergence)?;
    let inv_tau = opts.inv_temperature()?;
    let params = ExactParams {
        lse_p: a.policy_lse,
        lse_q: a.ref_lse,
        partials: a.sums,
        beta,
        ..a.pair.params(inv_tau)
    };
    let name = kernel(ExactKernel::JsdRows, a.pair.policy_dtype, a.pair.ref_dtype);
    // SAFETY: `jsd_rows_<p>_<q>(ExactParams)` with one block of 256 threads per row (rows ≤
    // i32::MAX: the shape is validated); both rows cover their shapes, the normalisers hold
    // `rows` f32 and `sums` 2·rows f32 at an 8-byte aligned address (checked), so the kernel's
    // one float2 per row fits (the caller's contract); with `partials` non-null it writes no
    // value or policy term.
    unsafe { launch_exact(stream, name, per_row(a.pair.policy_shape.rows), &params, None) }
}

/// Sums the JSD's shard sums (`[shards][rows][2]` f32, shard order) and writes
/// `out.value = max(0, β·Σ s_p + (1 − β)·Σ s_q)` and `out.policy_term = max(0, Σ s_p)` (at
/// least one of them, `rows` f32 each), given the rows' full log-sum-exps from
/// [`finish_exact_kl_partials`]. Padding rows get 0; rows with non-finite log-sum-exps (refused
/// by the merge, which reported them) get NaN. The outputs' log-sum-exps, statistic and
/// workspace are not used: passing them is an error.
pub fn finish_jsd_sums(
    ctx: &mut LaunchContext,
    sums: &CudaView<'_, f32>,
    mask: Option<&CudaView<'_, u8>>,
    [policy_lse, ref_lse]: [&CudaView<'_, f32>; 2],
    out: ExactKlOutputs<'_, Cuda>,
    opts: &ExactKlOptions,
) -> Result<()> {
    let stream = ctx.stream();
    let rows = policy_lse.len();
    check_len("ref_lse", ref_lse.len(), rows)?;
    let shards = shard_count("sums", sums.len() / 2, rows)?;
    check_len("sums", sums.len(), 2 * shards * rows)?;
    mask.map_or(Ok(()), |m| check_len("mask", m.len(), rows))?;
    out.check_jsd_finish(rows)?;
    let ExactKlOutputs { mut value, mut policy_term, .. } = out;
    let s: &CudaStream = stream;
    let (sums, _g1) = sums.device_ptr(s);
    let (mask, _g2) = view_ptr(mask, s);
    let (policy_lse, _g3) = policy_lse.device_ptr(s);
    let (ref_lse, _g4) = ref_lse.device_ptr(s);
    let (value, _g5) = opt_ptr_mut(&mut value, s);
    let (policy_term, _g6) = opt_ptr_mut(&mut policy_term, s);
    let args = FinishJsdArgs { sums, shards, rows, mask, policy_lse, ref_lse, value, policy_term };
    // SAFETY: every address comes from a cudarc buffer of this stream's context whose length
    // was checked above (the sums hold 2·shards·rows f32); the guards keep cudarc's event
    // tracking in order until the launch is enqueued.
    unsafe { launch_finish_jsd(stream, &args, opts) }
}

/// Buffers of a raw [`finish_jsd_sums`](crate::cuda::raw::finish_jsd_sums); 0 for an absent
/// optional buffer.
#[derive(Debug, Clone, Copy)]
pub struct FinishJsdArgs {
    /// `shards · rows · 2` f32 at an 8-byte aligned address: the shards' sums, laid out
    /// `[shards][rows][2]` (shard order).
    pub sums: u64,
    /// Number of shards.
    pub shards: usize,
    /// Number of rows.
    pub rows: usize,
    /// `rows` mask bytes (0 = padding), or 0.
    pub mask: u64,
    /// `rows` f32: the full rows' `ln Σ exp(z_policy)` (from the merge).
    pub policy_lse: u64,
    /// `rows` f32: the full rows' `ln Σ exp(z_ref)`.
    pub ref_lse: u64,
    /// `rows` f32 out: `max(0, β·Σ s_p + (1 − β)·Σ s_q)`, or 0.
    pub value: u64,
    /// `rows` f32 out: `max(0, Σ s_p)`, or 0 (at least one of the two).
    pub policy_term: u64,
}

/// The JSD merge's launch on device addresses (the safe and raw entry points share it):
/// checks the counts, the pointers, the alignment and the divergence, then launches.
///
/// # Safety
/// Every non-zero address of `a` is device memory of `stream`'s context holding what its
/// [`FinishJsdArgs`] field documents; the outputs overlap nothing else; every buffer stays
/// allocated until the kernel ran.
pub(super) unsafe fn launch_finish_jsd(
    stream: &Arc<CudaStream>,
    a: &FinishJsdArgs,
    opts: &ExactKlOptions,
) -> Result<()> {
    check_counts("sums", a.rows, a.shards)?;
    non_null(&[("sums", a.sums), ("policy_lse", a.policy_lse), ("ref_lse", a.ref_lse)])?;
    if a.value == 0 && a.policy_term == 0 {
        return Err(Error::InvalidOption {
            name: "outputs",
            value: "none of value and policy_term".into(),
            expected: "value, policy_term or both (the log-sum-exps are inputs here)",
        });
    }
    check_float2_aligned(a.sums)?;
    let params = ExactParams {
        partials: a.sums,
        lse_p: a.policy_lse,
        lse_q: a.ref_lse,
        out: ExactOut { value: a.value, policy_term: a.policy_term, ..ExactOut::default() },
        mask: a.mask,
        // float2 (row, shard) at row + shard·rows.
        row_stride: 1,
        part_stride: a.rows as i64,
        rows: a.rows as i32,
        parts: a.shards as i32,
        beta: jsd_beta(opts.divergence)?,
        ..ExactParams::default()
    };
    // SAFETY: `jsd_merge(ExactParams)`, one thread per row (rows and shards within 32 bits:
    // checked); the sums hold shards·rows float2 at an 8-byte aligned address (checked), the
    // normalisers, the mask (or null) and every non-null output `rows` f32 / bytes (the
    // caller's contract).
    unsafe { launch_exact(stream, "jsd_merge", per_thread(a.rows), &params, None) }
}

fn check_float2_aligned(address: u64) -> Result<()> {
    if address % 8 != 0 {
        return Err(Error::InvalidOption {
            name: "sums",
            value: format!("address {address:#x}"),
            expected: "an 8-byte aligned device address (pairs of f32 are read as float2)",
        });
    }
    Ok(())
}
