//! The launch plumbing of the token kernels: kernel names, argument records, the split
//! decision and the launches the safe functions (tokens.rs) and the raw layer (raw.rs) share.

use std::sync::Arc;

use cudarc::driver::{
    CudaSlice, CudaStream, DevicePtrMut, DeviceRepr, LaunchConfig, PushKernelArg, ValidAsZeroBits,
};

use crate::cuda::driver_error;
use crate::cuda::module::{Module, function};
use crate::{DType, Error, IndexType, Result, RowShape, TokenLogprobsOptions, VocabPartial};

/// Threads per block of every token kernel (`TOKEN_BLOCK` in the kernel).
pub(super) const BLOCK: u32 = 256;
/// 16-byte vectors each thread loads per chunk (`TOKEN_VPT`).
const VECTORS_PER_THREAD: usize = 4;
/// Below this many rows a long row is split across blocks (a launch choice only: both paths
/// give the same bits).
pub(crate) const SPLIT_ROWS: usize = 1024;

// SAFETY: VocabPartial is repr(C) plain old data (four f32 and a u32), the layout of the
// kernels' `VocabPartial`; every bit pattern is a valid value, including all zeros.
unsafe impl DeviceRepr for VocabPartial {}
// SAFETY: as above: all-zero bits are a valid VocabPartial.
unsafe impl ValidAsZeroBits for VocabPartial {}

/// Logits per chunk for `dtype`: 256 threads × 4 vectors × 16 bytes.
pub(super) fn chunk_len(dtype: DType) -> usize {
    BLOCK as usize * VECTORS_PER_THREAD * (16 / dtype.size_bytes())
}

pub(super) fn chunks(shape: RowShape, dtype: DType) -> usize {
    shape.cols.div_ceil(chunk_len(dtype))
}

pub(super) fn split(shape: RowShape, dtype: DType) -> bool {
    chunks(shape, dtype) > 1 && shape.rows < SPLIT_ROWS
}

/// The kernels' `RowSelect` (kernels/logprobs.cu): which rows are padding.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub(super) struct RowSelect {
    targets: u64,
    index_kind: i32,
    mask: u64,
    has_ignore: i32,
    ignore_index: i64,
}

// The kernels pin the same size and offsets (`static_assert` in kernels/).
pin_layout!(RowSelect, 40, {
    targets: 0, index_kind: 8, mask: 16, has_ignore: 24, ignore_index: 32,
});

// SAFETY: repr(C) with the field types and order of the kernels' `struct RowSelect`
// {const void*, int, const unsigned char*, int, long long}; passed by value as a kernel
// parameter.
unsafe impl DeviceRepr for RowSelect {}

impl RowSelect {
    pub(super) fn new(targets: u64, index: IndexType, mask: u64, opts: &TokenLogprobsOptions) -> Self {
        let index_kind = match index {
            IndexType::I32 => 0,
            IndexType::U32 => 1,
            IndexType::I64 => 2,
        };
        let (has_ignore, ignore_index) = match opts.ignore_index {
            Some(i) => (1, i),
            None => (0, 0),
        };
        RowSelect { targets, index_kind, mask, has_ignore, ignore_index }
    }
}

/// Everything a forward launch needs, as device addresses.
#[derive(Clone, Copy)]
pub(super) struct ForwardArgs {
    pub(super) logits: u64,
    pub(super) dtype: DType,
    pub(super) shape: RowShape,
    pub(super) sel: RowSelect,
    pub(super) inv_tau: f32,
    pub(super) outputs: [u64; 3],
    pub(super) status: u64,
}

/// The kernels' `TokenRowsParams` (kernels/logprobs.cu), field for field: the rows kernels of
/// the forward (outputs) and of the shard mode (`partials`, `vocab_offset`).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub(super) struct TokenRowsParams {
    pub(super) logits: u64,
    pub(super) logp: u64,
    pub(super) entropy: u64,
    pub(super) lse: u64,
    pub(super) partials: u64,
    pub(super) sel: RowSelect,
    pub(super) ld: i64,
    pub(super) vocab_offset: i64,
    pub(super) rows: i32,
    pub(super) cols: i32,
    pub(super) inv_tau: f32,
}

/// The kernels' `TokenBackwardParams` (kernels/logprobs.cu), field for field.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct TokenBackwardParams {
    logits: u64,
    grad: u64,
    lse: u64,
    entropy: u64,
    g_logp: u64,
    g_entropy: u64,
    sel: RowSelect,
    ld: i64,
    ld_grad: i64,
    rows: i32,
    cols: i32,
    inv_tau: f32,
}

// The kernels pin the same size and offsets (`static_assert` in kernels/).
pin_layout!(TokenRowsParams, 112, {
    logits: 0, logp: 8, entropy: 16, lse: 24, partials: 32, sel: 40, ld: 80, vocab_offset: 88,
    rows: 96, cols: 100, inv_tau: 104,
});
pin_layout!(TokenBackwardParams, 120, {
    logits: 0, grad: 8, lse: 16, entropy: 24, g_logp: 32, g_entropy: 40, sel: 48, ld: 88,
    ld_grad: 96, rows: 104, cols: 108, inv_tau: 112,
});
pin_layout!(TokenMergeParams, 104, {
    partials: 0, logp: 8, entropy: 16, lse: 24, sel: 32, row_stride: 72, part_stride: 80, parts: 88, rows: 92,
    inv_tau: 96,
});

// SAFETY: repr(C) with the layouts of the kernels' structs (asserted above and in the kernel),
// passed by value; plain old data (RowSelect is DeviceRepr itself).
unsafe impl DeviceRepr for TokenRowsParams {}
// SAFETY: as above.
unsafe impl DeviceRepr for TokenBackwardParams {}
// SAFETY: as above.
unsafe impl DeviceRepr for TokenMergeParams {}

pub(super) fn forward_name(dtype: DType, entropy: bool, chunked: bool) -> &'static str {
    match (entropy, chunked, dtype) {
        (false, false, DType::F32) => "token_logprobs_rows_f32",
        (false, false, DType::F16) => "token_logprobs_rows_f16",
        (false, false, DType::BF16) => "token_logprobs_rows_bf16",
        (true, false, DType::F32) => "token_logprobs_entropy_rows_f32",
        (true, false, DType::F16) => "token_logprobs_entropy_rows_f16",
        (true, false, DType::BF16) => "token_logprobs_entropy_rows_bf16",
        (false, true, DType::F32) => "token_logprobs_chunks_f32",
        (false, true, DType::F16) => "token_logprobs_chunks_f16",
        (false, true, DType::BF16) => "token_logprobs_chunks_bf16",
        (true, true, DType::F32) => "token_logprobs_entropy_chunks_f32",
        (true, true, DType::F16) => "token_logprobs_entropy_chunks_f16",
        (true, true, DType::BF16) => "token_logprobs_entropy_chunks_bf16",
    }
}

/// # Safety
/// `args.sel` and `args.outputs`/`args.status` point to device memory of `stream`'s context
/// holding `rows` targets (of the given index type), `rows` mask bytes (or 0), `rows` f32 per
/// non-zero output and one u64; `logits` covers the shape; `workspace` is 0 or holds
/// [`token_logprobs_workspace_bytes`](crate::cuda::token_logprobs_workspace_bytes) bytes.
pub(super) unsafe fn launch_forward(
    stream: &Arc<CudaStream>,
    args: &ForwardArgs,
    workspace: u64,
) -> Result<()> {
    let ForwardArgs { logits, dtype, shape, sel, inv_tau, outputs, status } = *args;
    let entropy = outputs[1] != 0;
    let mut params = TokenRowsParams {
        logits,
        logp: outputs[0],
        entropy: outputs[1],
        lse: outputs[2],
        partials: 0,
        sel,
        ld: shape.row_stride as i64,
        vocab_offset: 0,
        rows: shape.rows as i32,
        cols: shape.cols as i32,
        inv_tau,
    };
    if !split(shape, dtype) {
        let func = function(stream.context(), Module::Logprobs, forward_name(dtype, entropy, false))?;
        let mut launch = stream.launch_builder(&func);
        launch.arg(&params).arg(&status);
        let cfg = LaunchConfig {
            grid_dim: (shape.rows as u32, 1, 1),
            block_dim: (BLOCK, 1, 1),
            shared_mem_bytes: 0,
        };
        // Kernel: `token_logprobs[_entropy]_rows_<dtype>(TokenRowsParams, unsigned long long*)`.
        // SAFETY: the arguments match that signature (the struct's layout is asserted on both sides); one block of 256 threads per row (rows ≤ i32::MAX);
        // the caller guarantees the buffers, touched only within `row * ld + [0, cols)` and `[row]`.
        unsafe { launch.launch(cfg) }.map_err(driver_error("launching token_logprobs"))?;
        return Ok(());
    }
    let chunks = chunks(shape, dtype);
    let blocks = grid_blocks(shape.rows, chunks)?;
    if workspace % 16 != 0 {
        return Err(Error::InvalidOption {
            name: "workspace",
            value: format!("address {workspace:#x}"),
            expected: "a 16-byte aligned device address",
        });
    }
    let mut owned: Option<CudaSlice<VocabPartial>> = None;
    let (partials, _guard) = if workspace != 0 {
        (workspace, None)
    } else {
        // SAFETY: the chunk kernel writes every record before the merge kernel reads it, both
        // on this stream.
        let slice = unsafe { stream.alloc::<VocabPartial>(shape.rows * chunks) }
            .map_err(driver_error("allocating the token_logprobs workspace"))?;
        let (p, g) = owned.insert(slice).device_ptr_mut(stream);
        (p, Some(g))
    };
    params.partials = partials;
    let func = function(stream.context(), Module::Logprobs, forward_name(dtype, entropy, true))?;
    let mut launch = stream.launch_builder(&func);
    launch.arg(&params);
    let cfg = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 };
    // SAFETY: matches `token_logprobs[_entropy]_chunks_<dtype>(TokenRowsParams)` (the layout
    // asserted on both sides), which reads the logits, shape, selection and temperature and
    // writes `partials`; one block per (row, chunk), rows·chunks ≤ i32::MAX; `partials` holds
    // rows·chunks records (the workspace size, or just allocated).
    unsafe { launch.launch(cfg) }.map_err(driver_error("launching token_logprobs (chunks)"))?;
    let merge = TokenMergeParams {
        partials,
        logp: outputs[0],
        entropy: outputs[1],
        lse: outputs[2],
        sel,
        row_stride: chunks as i64,
        part_stride: 1,
        parts: chunks as i32,
        rows: shape.rows as i32,
        inv_tau,
    };
    // SAFETY: record (row, c) at row·chunks + c, all written by the launch above.
    unsafe { launch_merge(stream, &merge, status) }
}

pub(super) fn grid_blocks(rows: usize, chunks: usize) -> Result<u32> {
    let blocks = rows.checked_mul(chunks).filter(|&b| b <= i32::MAX as usize);
    blocks.map(|b| b as u32).ok_or(Error::TooLarge {
        what: "rows * vocabulary chunks",
        value: rows.saturating_mul(chunks),
        max: i32::MAX as usize,
    })
}

/// The kernels' `TokenMergeParams` (kernels/logprobs.cu), field for field: `parts` records per
/// row, record (row, k) at `row * row_stride + k * part_stride`, and the outputs (each 0 or
/// `rows` f32).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub(super) struct TokenMergeParams {
    pub(super) partials: u64,
    pub(super) logp: u64,
    pub(super) entropy: u64,
    pub(super) lse: u64,
    pub(super) sel: RowSelect,
    pub(super) row_stride: i64,
    pub(super) part_stride: i64,
    pub(super) parts: i32,
    pub(super) rows: i32,
    pub(super) inv_tau: f32,
}

/// # Safety
/// `params.partials` holds the records its strides name for every row and k < parts; `sel`,
/// `outputs` and `status` as in [`launch_forward`].
pub(super) unsafe fn launch_merge(
    stream: &Arc<CudaStream>,
    params: &TokenMergeParams,
    status: u64,
) -> Result<()> {
    let func = function(stream.context(), Module::Logprobs, "token_merge")?;
    let mut launch = stream.launch_builder(&func);
    launch.arg(params).arg(&status);
    let cfg = LaunchConfig {
        grid_dim: ((params.rows as usize).div_ceil(256) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: matches `token_merge(TokenMergeParams, unsigned long long*)` (the layout asserted
    // on both sides); one thread per row, guarded by `row < rows`; the caller guarantees the
    // buffers.
    unsafe { launch.launch(cfg) }.map_err(driver_error("launching token_merge"))?;
    Ok(())
}

/// Everything a backward launch needs, as device addresses.
#[derive(Clone, Copy)]
pub(super) struct BackwardArgs {
    pub(super) dtype: DType,
    pub(super) shape: RowShape,
    pub(super) sel: RowSelect,
    pub(super) inv_tau: f32,
    pub(super) logits: u64,
    pub(super) grad: u64,
    pub(super) saved: [u64; 2],
    pub(super) upstream: [u64; 2],
    pub(super) status: u64,
}

/// # Safety
/// `args.logits` and `args.grad` cover the shape (they may be equal: in place); `saved[0]`
/// (lse) holds `rows` f32, `saved[1]` (entropy) too when `upstream[1]` is non-zero; the
/// upstream gradients are 0 or `rows` f32; `sel` and `status` as in [`launch_forward`].
pub(super) unsafe fn launch_backward(stream: &Arc<CudaStream>, args: &BackwardArgs) -> Result<()> {
    let BackwardArgs { dtype, shape, sel, inv_tau, logits, grad, saved, upstream, status } = *args;
    let name = match dtype {
        DType::F32 => "token_logprobs_backward_f32",
        DType::F16 => "token_logprobs_backward_f16",
        DType::BF16 => "token_logprobs_backward_bf16",
    };
    let func = function(stream.context(), Module::Logprobs, name)?;
    let blocks = grid_blocks(shape.rows, chunks(shape, dtype))?;
    let ld = shape.row_stride as i64;
    let params = TokenBackwardParams {
        logits,
        grad,
        lse: saved[0],
        entropy: saved[1],
        g_logp: upstream[0],
        g_entropy: upstream[1],
        sel,
        ld,
        ld_grad: ld,
        rows: shape.rows as i32,
        cols: shape.cols as i32,
        inv_tau,
    };
    let mut launch = stream.launch_builder(&func);
    launch.arg(&params).arg(&status);
    let cfg = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 };
    // Kernel: `token_logprobs_backward_<dtype>(TokenBackwardParams, unsigned long long*)`.
    // SAFETY: the arguments match that signature (the struct's layout is asserted on both sides); one block of 256 threads per (row, chunk), rows·chunks
    // ≤ i32::MAX; each element is read and written by one thread within `row * ld + [0, cols)`.
    unsafe { launch.launch(cfg) }.map_err(driver_error("launching token_logprobs_backward"))?;
    Ok(())
}
