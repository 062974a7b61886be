//! CUDA exact full-vocabulary divergences between two logits rows, and their backward into
//! the policy logits: safe wrappers and their launches.
//!
//! Every row pair is cut into fixed chunks of 8192 logits. Many rows: one block walks each
//! row; few rows (under 1024): one block per chunk and a merge kernel. Both paths run the same
//! operations in the same order (bitwise batch-invariant). The JSD adds a second pass over the
//! rows after the two log-sum-exps are known.

use std::sync::Arc;

use cudarc::driver::{
    CudaSlice, CudaStream, DevicePtr, DevicePtrMut, DeviceRepr, LaunchConfig, PushKernelArg, SyncOnDrop,
};

use crate::cuda::aggregation::{aggregate_with, check_workspace};
use crate::cuda::module::{Module, function};
use crate::cuda::{LaunchContext, driver_error, non_null, opt_ptr, opt_ptr_mut};
use crate::logprobs::check_len;
use crate::reference::check_pair;
use crate::{Cuda, ExactKlOutputs, ReferenceRows};
use crate::{DType, Element, Error, ExactDivergence, ExactKlOptions, ExactKlPartial, Result, RowShape};

pub(super) const BLOCK: u32 = 256;
const CHUNK: usize = 8192;
const SPLIT_ROWS: usize = 1024;
/// `PairPartial` in the kernel: the layout of [`ExactKlPartial`].
const PARTIAL_BYTES: usize = size_of::<ExactKlPartial>();

pub(super) fn chunks(shape: RowShape) -> usize {
    shape.cols.div_ceil(CHUNK)
}

fn split(shape: RowShape) -> bool {
    chunks(shape) > 1 && shape.rows < SPLIT_ROWS
}

/// Byte offsets in the workspace: (JSD normalisers, chunk partials, JSD chunk sums, total).
fn layout(shape: RowShape, divergence: ExactDivergence) -> (usize, usize, usize, usize) {
    let up = |n: usize| n.next_multiple_of(16);
    let jsd = matches!(divergence, ExactDivergence::Jsd { .. });
    let lse = if jsd { up(shape.rows * 8) } else { 0 };
    let partials = if split(shape) { up(shape.rows * chunks(shape) * PARTIAL_BYTES) } else { 0 };
    let sums = if jsd && split(shape) { up(shape.rows * chunks(shape) * 8) } else { 0 };
    (0, lse, lse + partials, lse + partials + sums)
}

/// Bytes of workspace [`exact_kl`] uses for `shape` and `divergence` (0 for many rows of the
/// two KLs).
pub fn exact_kl_workspace_bytes(shape: RowShape, divergence: ExactDivergence) -> usize {
    layout(shape, divergence).3
}

/// Blocks of a one-block-per-(row, chunk) launch (at most i32::MAX).
pub(super) fn grid_blocks(rows: usize, chunks: usize) -> Result<u32> {
    rows.checked_mul(chunks).filter(|&b| b <= i32::MAX as usize).map(|b| b as u32).ok_or(Error::TooLarge {
        what: "rows * vocabulary chunks",
        value: rows.saturating_mul(chunks),
        max: i32::MAX as usize,
    })
}

/// The exact-divergence kernels, each instantiated for every (policy, reference) dtype pair
/// (`RK_EXACT` in kernels/kl_exact.cu).
#[derive(Debug, Clone, Copy)]
pub(super) enum ExactKernel {
    Chunks,
    Rows,
    JsdChunks,
    JsdRows,
    Backward,
}

/// The name of `k` for policy dtype `p` and reference dtype `q`: `<kernel>_<p>_<q>`, from a
/// static table (no formatting on the launch path).
pub(super) fn kernel(k: ExactKernel, p: DType, q: DType) -> &'static str {
    macro_rules! names {
        ($base:literal) => {
            [
                [concat!($base, "_f32_f32"), concat!($base, "_f32_f16"), concat!($base, "_f32_bf16")],
                [concat!($base, "_f16_f32"), concat!($base, "_f16_f16"), concat!($base, "_f16_bf16")],
                [concat!($base, "_bf16_f32"), concat!($base, "_bf16_f16"), concat!($base, "_bf16_bf16")],
            ]
        };
    }
    const CHUNKS: [[&str; 3]; 3] = names!("exact_kl_chunks");
    const ROWS: [[&str; 3]; 3] = names!("exact_kl_rows");
    const JSD_CHUNKS: [[&str; 3]; 3] = names!("jsd_chunks");
    const JSD_ROWS: [[&str; 3]; 3] = names!("jsd_rows");
    const BACKWARD: [[&str; 3]; 3] = names!("exact_kl_backward");
    let table = match k {
        ExactKernel::Chunks => &CHUNKS,
        ExactKernel::Rows => &ROWS,
        ExactKernel::JsdChunks => &JSD_CHUNKS,
        ExactKernel::JsdRows => &JSD_ROWS,
        ExactKernel::Backward => &BACKWARD,
    };
    let index = |d: DType| match d {
        DType::F32 => 0,
        DType::F16 => 1,
        DType::BF16 => 2,
    };
    table[index(p)][index(q)]
}

/// The two logits rows of a raw exact divergence (every exact entry point of the raw layer
/// takes one): device addresses of the policy's and the reference's logits, each with its own
/// dtype and row stride (the same rows and cols), and the row mask. For a vocabulary shard, the
/// shard's columns of both.
#[derive(Debug, Clone, Copy)]
pub struct PairArgs {
    /// Policy logits, `policy_dtype`, laid out as `policy_shape`.
    pub policy: u64,
    /// Dtype of the policy logits.
    pub policy_dtype: DType,
    /// Shape of the policy logits (row stride ≥ cols).
    pub policy_shape: RowShape,
    /// Reference logits, `ref_dtype`, laid out as `ref_shape`.
    pub reference: u64,
    /// Dtype of the reference logits.
    pub ref_dtype: DType,
    /// Shape of the reference logits: the policy's rows and cols, its own row stride.
    pub ref_shape: RowShape,
    /// `rows` mask bytes (0 = padding), or 0.
    pub mask: u64,
}

impl PairArgs {
    /// The pair of the safe layer: `policy` (an address of `policy_shape` in `P`'s dtype) and
    /// `reference`'s logits and mask on `s`, with the guards that keep cudarc's event tracking
    /// in order until the launches are enqueued.
    pub(super) fn of<'a, P: Element, Q: Element>(
        s: &'a CudaStream,
        policy: u64,
        policy_shape: RowShape,
        reference: &'a ReferenceRows<'_, Q, Cuda>,
    ) -> (PairArgs, (SyncOnDrop<'a>, Option<SyncOnDrop<'a>>)) {
        let (q, g1) = reference.logits.device_ptr(s);
        let (mask, g2) = opt_ptr(&reference.mask, s);
        let pair = PairArgs {
            policy,
            policy_dtype: P::DTYPE,
            policy_shape,
            reference: q,
            ref_dtype: Q::DTYPE,
            ref_shape: reference.shape,
            mask,
        };
        (pair, (g1, g2))
    }

    /// The shapes agree (the same rows and cols, valid strides) and neither side is null.
    pub(super) fn check(&self) -> Result<()> {
        let (p, q) = (self.policy_shape, self.ref_shape);
        check_pair(p.min_len(), p, q.min_len(), q, None)?;
        non_null(&[("policy", self.policy), ("reference", self.reference)])
    }

    /// The kernels' parameters for this pair at temperature `1/inv_tau`, every other field
    /// empty.
    pub(super) fn params(&self, inv_tau: f32) -> ExactParams {
        ExactParams::pair(self.policy, self.policy_shape, self.reference, self.ref_shape, self.mask, inv_tau)
    }
}

/// Buffers of a raw [`exact_kl`](crate::cuda::raw::exact_kl) call: device addresses, 0 for an
/// absent optional buffer.
#[derive(Debug, Clone, Copy)]
pub struct ExactKlArgs {
    /// The two logits rows and their mask.
    pub pair: PairArgs,
    /// `rows` f32: the divergence, or 0.
    pub value: u64,
    /// `rows` f32: `ln Σ exp(z_policy)`, or 0.
    pub policy_lse: u64,
    /// `rows` f32: `ln Σ exp(z_ref)`, or 0.
    pub ref_lse: u64,
    /// `rows` f32: the JSD's `KL[p ‖ m]` (the value for the two KLs), or 0.
    pub policy_term: u64,
    /// [`exact_kl_workspace_bytes`](crate::cuda::exact_kl_workspace_bytes) bytes at a 16-byte
    /// aligned address (the size is not checked: the caller's promise), or 0 to allocate on
    /// the stream when needed.
    pub workspace: u64,
    /// One u64 status word, initialised to [`STATUS_CLEAR`](crate::cuda::raw::STATUS_CLEAR).
    pub status: u64,
}

/// The kernels' `ExactOut` (six nullable pointers).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct ExactOut {
    pub(super) value: u64,
    pub(super) policy_lse: u64,
    pub(super) ref_lse: u64,
    pub(super) policy_term: u64,
    pub(super) jsd_lse_p: u64,
    pub(super) jsd_lse_q: u64,
}

// The kernels pin the same size and offsets (`static_assert` in kernels/).
pin_layout!(ExactOut, 48, {
    value: 0, policy_lse: 8, ref_lse: 16, policy_term: 24, jsd_lse_p: 32, jsd_lse_q: 40,
});

// SAFETY: repr(C) with the layout of the kernels' `struct ExactOut` (six 8-byte pointers),
// passed by value.
unsafe impl DeviceRepr for ExactOut {}

pub(super) fn check_reference<Q>(
    policy_len: usize,
    policy_shape: RowShape,
    r: &ReferenceRows<'_, Q, Cuda>,
) -> Result<()> {
    check_pair(policy_len, policy_shape, r.logits.len(), r.shape, None)?;
    r.mask.as_ref().map_or(Ok(()), |m| check_len("mask", m.len(), policy_shape.rows))
}

/// The GPU twin of [`cpu::exact_kl`](crate::cpu::exact_kl) (same divergences, dtypes may differ per
/// side), enqueued on `ctx`'s stream. Rows without a defined result (NaN, `+inf`, only `-inf` on
/// either side, or finite logits whose `max/τ` is beyond f32:
/// [`RowProblem::Overflow`](crate::RowProblem::Overflow)) get NaN and are reported in `ctx`'s
/// status word; an infinite `KL[π‖π_ref]` gets `+inf` and is reported as
/// [`RowProblem::InfiniteKl`](crate::RowProblem::InfiniteKl). The statistic aggregates the values
/// as they are (a failed row's NaN makes it NaN; only the row's own report is made).
///
/// ```no_run
/// use rlhf_kernels::cuda::{self, CudaDevice, LaunchContext};
/// use rlhf_kernels::{ExactKlOutputs};
/// use rlhf_kernels::{ReferenceRows};
/// use rlhf_kernels::{bf16, f16, ExactDivergence, ExactKlOptions, RowShape};
/// let device = CudaDevice::new(0)?;
/// let s = device.stream();
/// let shape = RowShape::new(1, 2);
/// let policy = s.clone_htod(&[bf16::from_f32(1.0), bf16::from_f32(0.0)]).unwrap();
/// let reference = s.clone_htod(&[f16::from_f32(0.0), f16::from_f32(0.0)]).unwrap();
/// let mut kl = s.alloc_zeros::<f32>(1).unwrap();
/// let mut ctx = LaunchContext::new(s)?;
/// let r = ReferenceRows { logits: reference.as_view(), shape, mask: None };
/// let out = ExactKlOutputs { value: Some(kl.as_view_mut()), ..Default::default() };
/// cuda::exact_kl(&mut ctx, &policy, shape, &r, out, &ExactKlOptions::new(ExactDivergence::PolicyRef))?;
/// ctx.check()?;
/// # Ok::<(), rlhf_kernels::Error>(())
/// ```
pub fn exact_kl<P: Element, Q: Element>(
    ctx: &mut LaunchContext,
    policy: &impl DevicePtr<P>,
    policy_shape: RowShape,
    reference: &ReferenceRows<'_, Q, Cuda>,
    mut out: ExactKlOutputs<'_, Cuda>,
    opts: &ExactKlOptions,
) -> Result<()> {
    let (stream, status) = ctx.parts();
    check_reference(policy.len(), policy_shape, reference)?;
    let rows = policy_shape.rows;
    let statistic = out.statistic.take();
    let mut own_values: Option<CudaSlice<f32>> = None;
    if let Some((_, stat)) = &statistic {
        stat.validate(rows)?;
        if out.value.is_none() {
            own_values =
                Some(stream.alloc_zeros::<f32>(rows).map_err(driver_error("allocating exact_kl values"))?);
        }
    }
    if own_values.is_none() {
        out.check_rows(Some(rows))?;
    }
    opts.inv_temperature()?;
    let need = exact_kl_workspace_bytes(policy_shape, opts.divergence);
    if let Some(w) = &out.workspace {
        check_workspace(w.len(), need)?;
    }
    {
        let s: &CudaStream = stream;
        let (policy, _g1) = policy.device_ptr(s);
        let (pair, _g2) = PairArgs::of::<P, Q>(s, policy, policy_shape, reference);
        let (value, _g4) = match own_values.as_mut() {
            Some(v) => {
                let (p, g) = v.device_ptr_mut(s);
                (p, Some(g))
            }
            None => opt_ptr_mut(&mut out.value, s),
        };
        let (policy_lse, _g5) = opt_ptr_mut(&mut out.policy_lse, s);
        let (ref_lse, _g6) = opt_ptr_mut(&mut out.ref_lse, s);
        let (policy_term, _g7) = opt_ptr_mut(&mut out.policy_term, s);
        let (workspace, _g8) = opt_ptr_mut(&mut out.workspace, s);
        let (st, _g9) = status.device_ptr(s);
        let args = ExactKlArgs { pair, value, policy_lse, ref_lse, policy_term, workspace, status: st };
        // SAFETY: every address comes from a cudarc buffer of this stream's context whose
        // length was checked above (the workspace's too; the own values hold `rows` f32); the
        // guards keep cudarc's event tracking in order until the launches are enqueued.
        unsafe { launch_forward(stream, &args, opts) }?;
    }
    if let Some((agg, stat)) = statistic {
        let mask = reference.mask.as_ref();
        let (a, n) = (stat.aggregation, stat.normaliser);
        match (&own_values, &out.value) {
            // A failed row was reported by the forward: its NaN is not reported again.
            (Some(v), _) => aggregate_with(stream, v, stat.sequences, mask, a, n, agg, None)?,
            (None, Some(v)) => aggregate_with(stream, v, stat.sequences, mask, a, n, agg, None)?,
            (None, None) => unreachable!("the statistic has its own values when none are requested"),
        }
    }
    Ok(())
}

/// The launches of an exact forward on checked device addresses (the safe and raw entry
/// points share them).
///
/// # Safety
/// Every non-zero address of `a` is device memory of `stream`'s context of the size its
/// [`ExactKlArgs`] field documents, the outputs overlap nothing else, and every buffer stays
/// allocated until the kernels ran.
pub(super) unsafe fn launch_forward(
    stream: &Arc<CudaStream>,
    a: &ExactKlArgs,
    opts: &ExactKlOptions,
) -> Result<()> {
    let inv_tau = opts.inv_temperature()?;
    let policy_shape = a.pair.policy_shape;
    let rows = policy_shape.rows;
    let (lse_at, partials_at, sums_at, need) = layout(policy_shape, opts.divergence);
    let chunks = chunks(policy_shape);
    // One block per (row, chunk) only on the split path, whose rows are few.
    let blocks = if split(policy_shape) { grid_blocks(rows, chunks)? } else { 0 };
    let s: &CudaStream = stream;
    let mut owned: Option<CudaSlice<u8>> = None;
    let (work, _g) = if need == 0 {
        (0, None)
    } else if a.workspace != 0 {
        (a.workspace, None)
    } else {
        // SAFETY: each region is written by one kernel before the next one reads it, all on
        // this stream.
        let slice =
            unsafe { stream.alloc::<u8>(need) }.map_err(driver_error("allocating the exact_kl workspace"))?;
        let (w, g) = owned.insert(slice).device_ptr_mut(s);
        (w, Some(g))
    };
    if work % 16 != 0 {
        return Err(Error::InvalidOption {
            name: "workspace",
            value: format!("address {work:#x}"),
            expected: "a 16-byte aligned device address",
        });
    }
    let (div, beta) = opts.divergence.code();
    let jsd = div == 2;
    // The JSD's normalisers: rows f32 for the policy, then rows f32 for the reference.
    let (jsd_lse_p, jsd_lse_q) =
        if jsd { (work + lse_at as u64, work + (lse_at + 4 * rows) as u64) } else { (0, 0) };
    let out = ExactOut {
        value: a.value,
        policy_lse: a.policy_lse,
        ref_lse: a.ref_lse,
        policy_term: a.policy_term,
        jsd_lse_p,
        jsd_lse_q,
    };
    let mut params = ExactParams { out, divergence: div, beta, ..a.pair.params(inv_tau) };
    let (pt, qt) = (a.pair.policy_dtype, a.pair.ref_dtype);
    let per_row =
        LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 };
    let per_chunk = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 };
    let st = a.status;

    // Every launch below reads rows that cover the shapes checked above (or the raw caller's
    // contract) and writes outputs of `rows` f32 (or null); the split path's records live in
    // the workspace regions of `layout` (rows·chunks of them), each written by one kernel before
    // the next reads it, all on this stream.

    // Pass 1: both log-sum-exps and, for the two KLs, the value.
    if split(policy_shape) {
        params.partials = work + partials_at as u64;
        // Record (row, chunk) at row·chunks + chunk.
        (params.row_stride, params.part_stride, params.parts) = (chunks as i64, 1, chunks as i32);
        let name = kernel(ExactKernel::Chunks, pt, qt);
        // SAFETY: `exact_kl_chunks_<p>_<q>(ExactParams)` (no status), one block of 256 threads
        // per (row, chunk), rows·chunks ≤ i32::MAX (`grid_blocks`); writes the rows·chunks
        // PairPartial records at `partials`.
        unsafe { launch_exact(stream, name, per_chunk, &params, None) }?;
        // SAFETY: `exact_kl_merge(ExactParams, unsigned long long*)`, one thread per row; reads
        // the records just written at strides (chunks, 1), writes `out` (the JSD's normalisers
        // included) and may report into the status word `st`.
        unsafe { launch_exact(stream, "exact_kl_merge", per_thread(rows), &params, Some(st)) }?;
    } else {
        let name = kernel(ExactKernel::Rows, pt, qt);
        // SAFETY: `exact_kl_rows_<p>_<q>(ExactParams, unsigned long long*)`, one block of 256
        // threads per row; with null `partials` it finishes the rows into `out` and may report
        // into `st`.
        unsafe { launch_exact(stream, name, per_row, &params, Some(st)) }?;
    }
    if !jsd {
        return Ok(());
    }
    // Pass 2 (JSD): Σ p·log(p/m) and Σ q·log(q/m) from the normalisers pass 1 wrote.
    (params.lse_p, params.lse_q) = (jsd_lse_p, jsd_lse_q);
    if split(policy_shape) {
        params.partials = work + sums_at as u64;
        let name = kernel(ExactKernel::JsdChunks, pt, qt);
        // SAFETY: `jsd_chunks_<p>_<q>(ExactParams)` (no status), one block per (row, chunk);
        // reads the rows·2 normalisers in the workspace, writes rows·chunks float2 sums at the
        // 16-byte aligned `partials`.
        unsafe { launch_exact(stream, name, per_chunk, &params, None) }?;
        // SAFETY: `jsd_merge(ExactParams)` (no status), one thread per row; reads those sums at
        // strides (chunks, 1) and the normalisers, writes `out.value` and `out.policy_term`.
        unsafe { launch_exact(stream, "jsd_merge", per_thread(rows), &params, None) }
    } else {
        params.partials = 0;
        let name = kernel(ExactKernel::JsdRows, pt, qt);
        // SAFETY: `jsd_rows_<p>_<q>(ExactParams)` (no status), one block of 256 threads per row;
        // reads the normalisers, and with null `partials` writes `out.value` and
        // `out.policy_term`.
        unsafe { launch_exact(stream, name, per_row, &params, None) }
    }
}

/// The kernels' `ExactParams` (kernels/kl_exact.cu), field for field: the one parameter block
/// of every exact-divergence kernel, forward, backward and the merges (each kernel's comment
/// there names the fields it reads).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct ExactParams {
    pub(super) policy: u64,
    pub(super) reference: u64,
    /// The backward's policy gradient (the policy's dtype and stride; may equal `policy`).
    pub(super) grad: u64,
    pub(super) mask: u64,
    /// The normalisers the JSD's second pass and the backward read (`rows` f32 each).
    pub(super) lse_p: u64,
    pub(super) lse_q: u64,
    /// The backward's saved forward term and upstream gradient.
    pub(super) saved: u64,
    pub(super) g: u64,
    /// `PairPartial` (the KLs) or `float2` (the JSD) records, or 0.
    pub(super) partials: u64,
    pub(super) out: ExactOut,
    pub(super) ldp: i64,
    pub(super) ldq: i64,
    /// The merges: record (row, k) at `row·row_stride + k·part_stride`, `parts` per row.
    pub(super) row_stride: i64,
    pub(super) part_stride: i64,
    pub(super) rows: i32,
    pub(super) cols: i32,
    pub(super) parts: i32,
    pub(super) divergence: i32,
    pub(super) beta: f32,
    pub(super) inv_tau: f32,
}

// The kernels pin the same size and offsets (`static_assert` in kernels/).
pin_layout!(ExactParams, 176, {
    policy: 0, reference: 8, grad: 16, mask: 24, lse_p: 32, lse_q: 40, saved: 48, g: 56,
    partials: 64, out: 72, ldp: 120, ldq: 128, row_stride: 136, part_stride: 144, rows: 152,
    cols: 156, parts: 160, divergence: 164, beta: 168, inv_tau: 172,
});

// SAFETY: repr(C) with the layout of the kernels' `struct ExactParams` (asserted above and in
// the kernel), passed by value; plain old data.
unsafe impl DeviceRepr for ExactParams {}

impl ExactParams {
    /// The row pair `policy` (`policy_shape`) and `reference` (`ref_shape`: the same rows and
    /// cols, its own stride) with their row mask; every other field empty.
    pub(super) fn pair(
        policy: u64,
        policy_shape: RowShape,
        reference: u64,
        ref_shape: RowShape,
        mask: u64,
        inv_tau: f32,
    ) -> Self {
        ExactParams {
            policy,
            reference,
            mask,
            ldp: policy_shape.row_stride as i64,
            ldq: ref_shape.row_stride as i64,
            rows: policy_shape.rows as i32,
            cols: policy_shape.cols as i32,
            inv_tau,
            ..ExactParams::default()
        }
    }
}

/// One thread per row.
pub(super) fn per_thread(rows: usize) -> LaunchConfig {
    LaunchConfig { grid_dim: (rows.div_ceil(256) as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }
}

/// Launches the exact-family kernel `name` on `cfg` with `params`, followed by the status word
/// for the kernels that report (`exact_kl_rows`, `exact_kl_merge`, `exact_kl_backward`; `None`
/// for the others, whose signature is `(ExactParams)` alone).
///
/// # Safety
/// `name`'s signature is `(ExactParams[, unsigned long long*])` as `status` says (the struct's
/// layout is asserted on both sides), `cfg` is its launch shape (one block of 256 threads per
/// row or per (row, chunk), one thread per row for the merges; at most i32::MAX blocks), and
/// every non-zero address in `params` is device memory of `stream`'s context holding what the
/// kernel reads or writes for `params`' shape, alive until the kernel ran.
pub(super) unsafe fn launch_exact(
    stream: &Arc<CudaStream>,
    name: &'static str,
    cfg: LaunchConfig,
    params: &ExactParams,
    status: Option<u64>,
) -> Result<()> {
    let f = function(stream.context(), Module::KlExact, name)?;
    let mut l = stream.launch_builder(&f);
    l.arg(params);
    if let Some(st) = &status {
        l.arg(st);
    }
    // SAFETY: the caller's contract (see # Safety).
    unsafe { l.launch(cfg) }.map_err(|e| Error::Driver {
        during: "launching an exact-divergence kernel",
        message: format!("{name}: {e:?}"),
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{ExactKernel, kernel};
    use crate::DType;

    /// The static table spells each instantiation as `RK_EXACT` does: `<kernel>_<p>_<q>`.
    #[test]
    fn kernel_names_follow_the_instantiations() {
        let kernels = [
            (ExactKernel::Chunks, "exact_kl_chunks"),
            (ExactKernel::Rows, "exact_kl_rows"),
            (ExactKernel::JsdChunks, "jsd_chunks"),
            (ExactKernel::JsdRows, "jsd_rows"),
            (ExactKernel::Backward, "exact_kl_backward"),
        ];
        let source = include_str!("../../../kernels/kl_exact.cu");
        for (k, base) in kernels {
            for p in [DType::F32, DType::F16, DType::BF16] {
                for q in [DType::F32, DType::F16, DType::BF16] {
                    assert_eq!(kernel(k, p, q), format!("{base}_{}_{}", p.name(), q.name()));
                }
            }
            assert!(source.contains(&format!("{base}_##PS##_##QS")), "kernels/kl_exact.cu lacks {base}");
        }
    }
}
