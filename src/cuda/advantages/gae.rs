//! GAE on the GPU: the safe function, the raw layer and their shared launches.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, DevicePtrMut, DeviceRepr, LaunchConfig, PushKernelArg};

use crate::advantages::check_gae_sources;
use crate::cuda::module::{Module, function};
use crate::cuda::{LaunchContext, driver_error, opt_ptr, opt_ptr_mut, view_ptr};
use crate::{Cuda, Error, GaeInputs, GaeOptions, GaeOutputs, MaskedSteps, Result, RowShape};

/// Positions per GAE block (`GAE_CHUNK` in the kernel).
const GAE_CHUNK: usize = 1024;
/// Sequences up to this long take one warp (`GAE_WARP_SPAN`).
const GAE_WARP_SPAN: usize = 128;
/// Sequences of up to this many chunks take one block, which walks them right to left in one
/// pass (`gae_sequence`); longer ones are split over a block per chunk after a pass that composes
/// each chunk's map (`gae_chunk_maps`, `gae_carries`, `gae_block`).
const GAE_SEQUENCE_CHUNKS: usize = 4;
/// Bytes of one composed chunk map (`Affine`: 8 f32).
const MAP_BYTES: usize = 32;
/// Bytes of one entering state (`GaeState`: 3 f32), rounded up so the maps stay aligned.
const STATE_BYTES: usize = 16;

/// Bytes of workspace [`gae`] may use for `shape`: per 1024-position chunk a 32-byte map and
/// a 16-byte entering state when a sequence is longer than 4096 positions, else 0.
pub fn gae_workspace_bytes(shape: RowShape) -> usize {
    let chunks = shape.cols.div_ceil(GAE_CHUNK);
    if chunks > GAE_SEQUENCE_CHUNKS { shape.rows * chunks * (MAP_BYTES + STATE_BYTES) } else { 0 }
}

/// The kernels' `GaeParams` (kernels/advantages.cu), field for field.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct GaeParams {
    rewards: u64,
    kl: u64,
    scores: u64,
    values: u64,
    mask: u64,
    advantages: u64,
    returns: u64,
    ld: i64,
    rows: i32,
    cols: i32,
    nchunks: i32,
    gamma: f32,
    gamma_lambda: f32,
    beta: f32,
    reset: i32,
    /// The split scan's workspace: `rows·nchunks` 32-byte chunk maps, then as many entering
    /// states (0 for the one-pass kernels).
    maps: u64,
    carries: u64,
}

// The kernels pin the same size and offsets (`static_assert` in kernels/).
pin_layout!(GaeParams, 112, {
    rewards: 0, kl: 8, scores: 16, values: 24, mask: 32, advantages: 40, returns: 48, ld: 56,
    rows: 64, cols: 68, nchunks: 72, gamma: 76, gamma_lambda: 80, beta: 84, reset: 88, maps: 96,
    carries: 104,
});

// SAFETY: repr(C) with the layout of the kernels' `struct GaeParams` (asserted above and in the
// kernel): seven 8-byte pointers, a 64-bit stride, three ints, three floats, an int (padded to
// 96), then two pointers: 112 bytes on both sides.
unsafe impl DeviceRepr for GaeParams {}

/// GAE advantages and returns on the GPU: the twin of [`cpu::gae`](crate::cpu::gae) (same
/// inputs, conventions and outputs), computed as a parallel scan in f32 — within
/// [`gae_error_bound_factor`](crate::gae_error_bound_factor)`(T)·2⁻²⁴·Ā_t` of the exact
/// result (crate docs of the advantages family). A sequence whose advantages are not finite
/// is reported to `ctx`'s status word ([`RowProblem::NonFinite`](crate::RowProblem::NonFinite)).
///
/// ```no_run
/// use rlhf_kernels::cuda::{self, CudaDevice, LaunchContext};
/// use rlhf_kernels::{GaeInputs, GaeOutputs};
/// use rlhf_kernels::{GaeOptions, RowShape};
/// let device = CudaDevice::new(0)?;
/// let s = device.stream();
/// let shape = RowShape::new(1, 3);
/// let (kl, values) = (s.clone_htod(&[0.1f32, 0.2, 0.0]).unwrap(), s.clone_htod(&[0.5f32, 0.4, 0.0]).unwrap());
/// let (scores, mask) = (s.clone_htod(&[1.0f32]).unwrap(), s.clone_htod(&[1u8, 1, 0]).unwrap());
/// let mut adv = s.alloc_zeros::<f32>(3).unwrap();
/// let mut ctx = LaunchContext::new(s)?;
/// let inputs = GaeInputs::new(shape).kl_penalty(kl.as_view(), 0.05).scores(scores.as_view())
///     .values(values.as_view()).mask(mask.as_view());
/// cuda::gae(&mut ctx, &inputs, GaeOutputs::default().advantages(adv.as_view_mut()), &GaeOptions::new(1.0, 0.95))?;
/// ctx.check()?;
/// # Ok::<(), rlhf_kernels::Error>(())
/// ```
pub fn gae(
    ctx: &mut LaunchContext,
    inputs: &GaeInputs<'_, Cuda>,
    mut out: GaeOutputs<'_, Cuda>,
    opts: &GaeOptions,
) -> Result<()> {
    let (stream, status) = ctx.parts();
    let shape = inputs.shape;
    inputs.validate()?;
    out.check(shape)?;
    shape.validate("gae inputs")?;
    let need = gae_workspace_bytes(shape);
    if let Some(w) = &out.workspace
        && w.len() < need
    {
        return Err(Error::ShapeMismatch {
            what: "gae workspace",
            min: need,
            max: usize::MAX,
            actual: w.len(),
        });
    }
    let s: &CudaStream = stream;
    let (rewards, _g1) = opt_ptr(&inputs.rewards, s);
    let kl_view = inputs.kl_penalty.as_ref().map(|k| &k.0);
    let (kl, _g2) = view_ptr(kl_view, s);
    let (scores, _g3) = opt_ptr(&inputs.scores, s);
    let (values, _g4) = opt_ptr(&inputs.values, s);
    let (mask, _g5) = opt_ptr(&inputs.mask, s);
    let (advantages, _g6) = opt_ptr_mut(&mut out.advantages, s);
    let (returns, _g7) = opt_ptr_mut(&mut out.returns, s);
    let (workspace, _g8) = opt_ptr_mut(&mut out.workspace, s);
    let (st, _g9) = status.device_ptr(s);
    let args = GaeArgs {
        shape,
        rewards,
        kl,
        beta: inputs.kl_penalty.as_ref().map_or(0.0, |k| k.1),
        scores,
        values,
        mask,
        advantages,
        returns,
        workspace,
        status: st,
    };
    // The guards keep cudarc's event tracking in order until the launches are enqueued.
    // SAFETY: every address is a cudarc buffer of this context with its length checked above
    // (scores one per row, workspace ≥ gae_workspace_bytes); the outputs are distinct borrows.
    unsafe { launch_gae(stream, &args, opts) }
}

/// Buffers of a raw [`gae`](crate::cuda::raw::gae) call: device addresses (f32 per-token
/// buffers laid out as `shape`), 0 for an absent optional buffer. At least one reward source
/// (`rewards`, `kl`, `scores`) and one output.
#[derive(Debug, Clone, Copy)]
pub struct GaeArgs {
    /// `[B, T]` of every per-token buffer.
    pub shape: RowShape,
    /// Dense rewards, or 0.
    pub rewards: u64,
    /// Per-token KL estimates, or 0.
    pub kl: u64,
    /// β of the KL penalty `−β·kl_t` (ignored without `kl`).
    pub beta: f32,
    /// One score per sequence, or 0.
    pub scores: u64,
    /// Values `V_t`, or 0 (discounted returns).
    pub values: u64,
    /// Mask bytes, or 0.
    pub mask: u64,
    /// Advantages out, or 0.
    pub advantages: u64,
    /// Returns out, or 0.
    pub returns: u64,
    /// [`gae_workspace_bytes`] bytes at a 16-byte aligned address, or 0 to allocate on the
    /// stream when needed.
    pub workspace: u64,
    /// One u64 status word, initialised to [`STATUS_CLEAR`](crate::cuda::raw::STATUS_CLEAR).
    pub status: u64,
}

/// GAE's launches on checked device addresses (the safe and raw entry points share them).
///
/// # Safety
/// Every non-zero address of `a` is device memory of `stream`'s context of the size its
/// [`GaeArgs`] field documents, the outputs overlap nothing else, and every buffer stays
/// allocated until the kernels ran.
pub(crate) unsafe fn launch_gae(stream: &Arc<CudaStream>, a: &GaeArgs, opts: &GaeOptions) -> Result<()> {
    let shape = a.shape;
    check_gae_sources(shape, a.rewards != 0, (a.kl != 0).then_some(a.beta), a.scores != 0)?;
    opts.validate()?;
    if a.advantages == 0 && a.returns == 0 {
        return Err(Error::InvalidOption {
            name: "outputs",
            value: "none".into(),
            expected: "advantages and/or returns",
        });
    }
    let nchunks = shape.cols.div_ceil(GAE_CHUNK);
    let split = nchunks > GAE_SEQUENCE_CHUNKS;
    let blocks = if shape.cols <= GAE_WARP_SPAN {
        shape.rows.div_ceil(8)
    } else if split {
        shape.rows * nchunks
    } else {
        shape.rows
    };
    if blocks > i32::MAX as usize {
        return Err(Error::TooLarge {
            what: "rows * chunks of 1024 positions",
            value: blocks,
            max: i32::MAX as usize,
        });
    }
    let need = gae_workspace_bytes(shape);
    let s: &CudaStream = stream;
    let st = a.status;
    let mut params = GaeParams {
        rewards: a.rewards,
        kl: a.kl,
        scores: a.scores,
        values: a.values,
        mask: a.mask,
        advantages: a.advantages,
        returns: a.returns,
        ld: shape.row_stride as i64,
        rows: shape.rows as i32,
        cols: shape.cols as i32,
        nchunks: nchunks as i32,
        gamma: opts.gamma,
        gamma_lambda: opts.gamma * opts.lambda,
        beta: if a.kl != 0 { a.beta } else { 0.0 },
        reset: i32::from(opts.masked == MaskedSteps::Reset),
        maps: 0,
        carries: 0,
    };
    let cfg = LaunchConfig { grid_dim: (blocks as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    let ctx = stream.context();

    if shape.cols <= GAE_WARP_SPAN {
        let f = function(ctx, Module::Advantages, "gae_warp")?;
        let mut l = stream.launch_builder(&f);
        l.arg(&params).arg(&st);
        // Kernel: gae_warp(GaeParams, unsigned long long*); 8 warps a block, a sequence each.
        // SAFETY: the arguments match; every pointer in `params` is null or covers the shape
        // (scores one per row) and the two outputs overlap nothing (the caller's contract).
        unsafe { l.launch(cfg) }.map_err(driver_error("launching gae_warp"))?;
        return Ok(());
    }
    if !split {
        let f = function(ctx, Module::Advantages, "gae_sequence")?;
        let mut l = stream.launch_builder(&f);
        l.arg(&params).arg(&st);
        // Kernel: gae_sequence(GaeParams, unsigned long long*); a block of 256 threads per
        // sequence walks its (at most GAE_SEQUENCE_CHUNKS) chunks.
        // SAFETY: the arguments match; every pointer in `params` is null or covers the shape
        // (scores one per row) and the two outputs overlap nothing (the caller's contract).
        unsafe { l.launch(cfg) }.map_err(driver_error("launching gae_sequence"))?;
        return Ok(());
    }

    let mut owned: Option<CudaSlice<u8>> = None;
    let (maps, _g) = if a.workspace != 0 {
        (a.workspace, None)
    } else {
        // SAFETY: gae_chunk_maps writes the map of every chunk but the first of each row and
        // gae_carries reads only those; gae_carries writes every state gae_block reads.
        let slice =
            unsafe { stream.alloc::<u8>(need) }.map_err(driver_error("allocating the gae workspace"))?;
        let (p, g) = owned.insert(slice).device_ptr_mut(s);
        (p, Some(g))
    };
    if maps % 16 != 0 {
        return Err(Error::InvalidOption {
            name: "workspace",
            value: format!("address {maps:#x}"),
            expected: "a 16-byte aligned device address",
        });
    }
    // The entering states (12 bytes each) after the maps (32 bytes each, a multiple of 16).
    params.maps = maps;
    params.carries = maps + (shape.rows * nchunks * MAP_BYTES) as u64;
    {
        let f = function(ctx, Module::Advantages, "gae_chunk_maps")?;
        let mut l = stream.launch_builder(&f);
        l.arg(&params);
        // SAFETY: matches `gae_chunk_maps(GaeParams)` (writing `maps`); one block of 256 threads per
        // (row, chunk), rows·chunks ≤ i32::MAX (checked); the workspace holds rows·nchunks
        // 32-byte maps then as many 16-byte states (the caller's contract, or allocated with that size).
        unsafe { l.launch(cfg) }.map_err(driver_error("launching gae_chunk_maps"))?;
        let f = function(ctx, Module::Advantages, "gae_carries")?;
        let mut l = stream.launch_builder(&f);
        l.arg(&params);
        let per_row = LaunchConfig {
            grid_dim: (shape.rows.div_ceil(256) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: matches `gae_carries(GaeParams)` (reading `maps`, writing `carries`); one thread per
        // row (threads past the last row return); reads the maps of chunks 1.. written above
        // on this stream and writes every chunk's entering state inside the workspace.
        unsafe { l.launch(per_row) }.map_err(driver_error("launching gae_carries"))?;
    }
    let f = function(ctx, Module::Advantages, "gae_block")?;
    let mut l = stream.launch_builder(&f);
    l.arg(&params).arg(&st);
    // Kernel: gae_block(GaeParams, unsigned long long*) (reading `carries`); a block a (row, chunk).
    // SAFETY: the arguments match; `carries` holds the states the launch above wrote on this
    // stream; `params` pointers are null or cover the shape (the caller's contract).
    unsafe { l.launch(cfg) }.map_err(driver_error("launching gae_block"))?;
    Ok(())
}
