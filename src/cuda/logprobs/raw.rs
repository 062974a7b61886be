//! Raw-pointer entry points of the logprobs family (see [`crate::cuda::raw`]): device
//! addresses, dtypes and shapes for callers that own their memory. Same launches as the safe
//! functions.

use std::sync::Arc;

use cudarc::driver::{CudaStream, LaunchConfig, PushKernelArg};

use super::log_softmax::{self, check_backward, check_forward};
use super::token_launch::*;
use crate::cuda::module::{Module, function};
use crate::cuda::{RawStream, driver_error, non_null};
use crate::logprobs::check_grads_present;
use crate::{DType, Error, IndexType, LogSoftmaxOptions, Result, RowShape, TokenLogprobsOptions};

/// Buffers of a raw [`log_softmax`] call: device addresses (byte offsets included).
#[derive(Debug, Clone, Copy)]
pub struct LogSoftmaxArgs {
    /// Logits, `dtype`, laid out as `shape`.
    pub logits: u64,
    /// Dtype of the logits.
    pub dtype: DType,
    /// Shape of the logits (row stride ≥ cols).
    pub shape: RowShape,
    /// Output, dense `[rows, cols]` f32.
    pub out: u64,
    /// One u64 status word, initialised to [`STATUS_CLEAR`](crate::cuda::raw::STATUS_CLEAR).
    pub status: u64,
}

/// Buffers of a raw [`log_softmax_backward`] call.
#[derive(Debug, Clone, Copy)]
pub struct LogSoftmaxBackwardArgs {
    /// Forward output, dense `[rows, cols]` f32.
    pub out: u64,
    /// Upstream gradient, dense `[rows, cols]` f32.
    pub grad_out: u64,
    /// Gradient with respect to the logits, `dtype`, laid out as `shape`.
    pub grad_logits: u64,
    /// Dtype of `grad_logits`.
    pub dtype: DType,
    /// Shape of `grad_logits` (row stride ≥ cols).
    pub shape: RowShape,
    /// One u64 status word, initialised to [`STATUS_CLEAR`](crate::cuda::raw::STATUS_CLEAR).
    pub status: u64,
}

/// [`cuda::log_softmax`](crate::cuda::log_softmax) on raw device pointers, enqueued on a
/// stream owned by the caller (PyTorch's current stream, a burn/cubecl stream, …).
/// Returns once the kernel is enqueued; problems in the data land in `args.status`
/// (read it back and pass it to [`decode_status`](crate::cuda::raw::decode_status)).
///
/// # Safety
/// - `stream.stream` is a live stream of device `stream.ordinal`'s primary context (or
///   null for the legacy default stream);
/// - `args.logits` points to device memory of that context holding at least
///   `args.shape.min_len()` elements of `args.dtype`; `args.out` to `rows·cols` f32 that
///   overlap nothing else; `args.status` to one u64;
/// - every buffer stays allocated and untouched by other streams until the kernel has
///   run (order with the stream's owner as usual).
///
/// ```no_run
/// use rlhf_kernels::cuda::raw::{self, LogSoftmaxArgs, RawStream};
/// use rlhf_kernels::{DType, LogSoftmaxOptions, RowShape};
/// # let (logits_ptr, out_ptr, status_ptr, cu_stream) = (0u64, 0u64, 0u64, std::ptr::null_mut());
/// let args = LogSoftmaxArgs { logits: logits_ptr, dtype: DType::BF16,
///     shape: RowShape::new(8, 151936), out: out_ptr, status: status_ptr };
/// // SAFETY: pointers from tensors that live on device 0 and outlive the launch.
/// unsafe { raw::log_softmax(RawStream { ordinal: 0, stream: cu_stream }, &args,
///                           &LogSoftmaxOptions::default())? };
/// # Ok::<(), rlhf_kernels::Error>(())
/// ```
pub unsafe fn log_softmax(stream: RawStream, args: &LogSoftmaxArgs, opts: &LogSoftmaxOptions) -> Result<()> {
    let shape = args.shape;
    check_forward(shape, shape.min_len(), shape.len())?;
    non_null(&[("logits", args.logits), ("out", args.out), ("status", args.status)])?;
    let inv_tau = opts.inv_temperature()?;
    // SAFETY: the caller guarantees the stream belongs to the ordinal's primary context.
    let stream = unsafe { stream.borrow() }?;
    // SAFETY: the caller guarantees what `launch_forward` needs (see # Safety).
    unsafe {
        log_softmax::launch_forward(&stream, args.dtype, shape, args.logits, args.out, args.status, inv_tau)
    }
}

/// [`cuda::log_softmax_backward`](crate::cuda::log_softmax_backward) on raw device
/// pointers, enqueued on a stream owned by the caller.
///
/// # Safety
/// As [`log_softmax`]: a live stream of the ordinal's primary context; `args.out` and
/// `args.grad_out` hold `rows·cols` f32; `args.grad_logits` holds `shape.min_len()`
/// elements of `args.dtype` and overlaps neither input; `args.status` is one u64; all
/// stay allocated until the kernel has run.
///
/// ```no_run
/// use rlhf_kernels::cuda::raw::{self, LogSoftmaxBackwardArgs, RawStream};
/// use rlhf_kernels::{DType, LogSoftmaxOptions, RowShape};
/// # let (out, grad_out, grad, status, cu_stream) = (0u64, 0u64, 0u64, 0u64, std::ptr::null_mut());
/// let args = LogSoftmaxBackwardArgs { out, grad_out, grad_logits: grad, dtype: DType::F32,
///     shape: RowShape::new(8, 1000), status };
/// // SAFETY: pointers from tensors that live on device 0 and outlive the launch.
/// unsafe { raw::log_softmax_backward(RawStream { ordinal: 0, stream: cu_stream }, &args,
///                                    &LogSoftmaxOptions::default())? };
/// # Ok::<(), rlhf_kernels::Error>(())
/// ```
pub unsafe fn log_softmax_backward(
    stream: RawStream,
    args: &LogSoftmaxBackwardArgs,
    opts: &LogSoftmaxOptions,
) -> Result<()> {
    let shape = args.shape;
    check_backward(shape, shape.len(), shape.len(), shape.min_len())?;
    let ptrs = [("out", args.out), ("grad_out", args.grad_out), ("grad_logits", args.grad_logits)];
    non_null(&ptrs)?;
    non_null(&[("status", args.status)])?;
    let inv_tau = opts.inv_temperature()?;
    // SAFETY: the caller guarantees the stream belongs to the ordinal's primary context.
    let stream = unsafe { stream.borrow() }?;
    let ptrs = [args.out, args.grad_out, args.grad_logits];
    // SAFETY: the caller guarantees what `launch_backward` needs (see # Safety).
    unsafe { log_softmax::launch_backward(&stream, args.dtype, shape, ptrs, args.status, inv_tau) }
}

/// Buffers of a raw [`token_logprobs`] call: device addresses (byte offsets included); 0
/// for an absent optional buffer.
#[derive(Debug, Clone, Copy)]
pub struct TokenLogprobsArgs {
    /// Logits, `dtype`, laid out as `shape`.
    pub logits: u64,
    /// Dtype of the logits.
    pub dtype: DType,
    /// Shape of the logits (row stride ≥ cols).
    pub shape: RowShape,
    /// `rows` target ids of type `index_type`.
    pub targets: u64,
    /// Type of the target ids.
    pub index_type: IndexType,
    /// `rows` mask bytes, or 0.
    pub mask: u64,
    /// `rows` f32 outputs each, or 0 (at least one non-zero).
    pub logp: u64,
    /// See `logp`.
    pub entropy: u64,
    /// See `logp`.
    pub lse: u64,
    /// [`token_logprobs_workspace_bytes`](crate::cuda::token_logprobs_workspace_bytes)
    /// bytes at a 16-byte aligned address, or 0 to allocate on the stream.
    pub workspace: u64,
    /// One u64 status word, initialised to [`STATUS_CLEAR`](crate::cuda::raw::STATUS_CLEAR).
    pub status: u64,
}

/// [`cuda::token_logprobs`](crate::cuda::token_logprobs) on raw device pointers, enqueued on
/// a stream owned by the caller.
///
/// # Safety
/// - `stream.stream` is a live stream of device `stream.ordinal`'s primary context (or null);
/// - every non-zero address points to device memory of that context of the size its field
///   documents (`logits`: `shape.min_len()` elements of `dtype`); the outputs overlap
///   nothing else;
/// - every buffer stays allocated, and untouched by other streams, until the kernels ran.
pub unsafe fn token_logprobs(
    stream: RawStream,
    args: &TokenLogprobsArgs,
    opts: &TokenLogprobsOptions,
) -> Result<()> {
    // SAFETY: the caller guarantees the stream belongs to the ordinal's primary context.
    let stream = unsafe { stream.borrow() }?;
    // SAFETY: the caller guarantees every buffer (see # Safety).
    unsafe { forward_on(&stream, args, opts) }
}

/// [`token_logprobs`] on a stream of this crate: checks the arguments, then launches.
///
/// # Safety
/// As [`token_logprobs`], for `stream`.
pub(crate) unsafe fn forward_on(
    stream: &Arc<CudaStream>,
    args: &TokenLogprobsArgs,
    opts: &TokenLogprobsOptions,
) -> Result<()> {
    args.shape.validate("logits")?;
    non_null(&[("logits", args.logits), ("targets", args.targets), ("status", args.status)])?;
    if args.logp == 0 && args.entropy == 0 && args.lse == 0 {
        return Err(Error::InvalidOption {
            name: "outputs",
            value: "none requested".into(),
            expected: "at least one of logp, entropy, lse",
        });
    }
    let inv_tau = opts.inv_temperature()?;
    let sel = RowSelect::new(args.targets, args.index_type, args.mask, opts);
    let launch = ForwardArgs {
        logits: args.logits,
        dtype: args.dtype,
        shape: args.shape,
        sel,
        inv_tau,
        outputs: [args.logp, args.entropy, args.lse],
        status: args.status,
    };
    // SAFETY: the caller guarantees every buffer (see # Safety).
    unsafe { launch_forward(stream, &launch, args.workspace) }
}

/// Buffers of a raw [`token_logprobs_backward`] call; 0 for an absent optional buffer.
#[derive(Debug, Clone, Copy)]
pub struct TokenLogprobsBackwardArgs {
    /// Logits, `dtype`, laid out as `shape`.
    pub logits: u64,
    /// Dtype of the logits and the gradient.
    pub dtype: DType,
    /// Shape of the logits and of the gradient (row stride ≥ cols).
    pub shape: RowShape,
    /// `rows` target ids of type `index_type`.
    pub targets: u64,
    /// Type of the target ids.
    pub index_type: IndexType,
    /// `rows` mask bytes, or 0.
    pub mask: u64,
    /// `rows` f32: the forward's lse.
    pub lse: u64,
    /// `rows` f32: the forward's entropy (needed with `grad_entropy`), or 0.
    pub entropy: u64,
    /// `rows` f32 upstream gradient of logp, or 0.
    pub grad_logp: u64,
    /// `rows` f32 upstream gradient of the entropy, or 0.
    pub grad_entropy: u64,
    /// The gradient, laid out as `shape`; equal to `logits` for the in-place backward.
    pub grad_logits: u64,
    /// One u64 status word, initialised to [`STATUS_CLEAR`](crate::cuda::raw::STATUS_CLEAR).
    pub status: u64,
}

/// [`cuda::token_logprobs_backward`](crate::cuda::token_logprobs_backward) on raw device
/// pointers, in place when `args.grad_logits == args.logits`.
///
/// # Safety
/// As [`token_logprobs`]; `grad_logits` covers the shape and either equals `logits` or
/// overlaps nothing else.
pub unsafe fn token_logprobs_backward(
    stream: RawStream,
    args: &TokenLogprobsBackwardArgs,
    opts: &TokenLogprobsOptions,
) -> Result<()> {
    // SAFETY: the caller guarantees the stream belongs to the ordinal's primary context.
    let stream = unsafe { stream.borrow() }?;
    // SAFETY: the caller guarantees every buffer (see # Safety).
    unsafe { backward_on(&stream, args, opts) }
}

/// [`token_logprobs_backward`] on a stream of this crate: checks the arguments, then
/// launches.
///
/// # Safety
/// As [`token_logprobs_backward`], for `stream`.
pub(crate) unsafe fn backward_on(
    stream: &Arc<CudaStream>,
    args: &TokenLogprobsBackwardArgs,
    opts: &TokenLogprobsOptions,
) -> Result<()> {
    args.shape.validate("logits")?;
    let required = [
        ("logits", args.logits),
        ("targets", args.targets),
        ("lse", args.lse),
        ("grad_logits", args.grad_logits),
        ("status", args.status),
    ];
    non_null(&required)?;
    check_grads_present(args.grad_logp != 0, args.grad_entropy != 0, args.entropy != 0)?;
    let inv_tau = opts.inv_temperature()?;
    let launch = BackwardArgs {
        dtype: args.dtype,
        shape: args.shape,
        sel: RowSelect::new(args.targets, args.index_type, args.mask, opts),
        inv_tau,
        logits: args.logits,
        grad: args.grad_logits,
        saved: [args.lse, args.entropy],
        upstream: [args.grad_logp, args.grad_entropy],
        status: args.status,
    };
    // SAFETY: the caller guarantees every buffer (see # Safety).
    unsafe { launch_backward(stream, &launch) }
}

/// Buffers of a raw [`vocab_shard_partials`]: this rank's vocabulary slice of the logits;
/// 0 for an absent mask.
#[derive(Debug, Clone, Copy)]
pub struct VocabShardArgs {
    /// Logits of this shard, `dtype`, laid out as `shape` (`cols` = the shard's width).
    pub logits: u64,
    /// Dtype of the logits.
    pub dtype: DType,
    /// Shape of the shard's logits (row stride ≥ cols).
    pub shape: RowShape,
    /// `rows` global target ids of type `index_type`.
    pub targets: u64,
    /// Type of the target ids.
    pub index_type: IndexType,
    /// `rows` mask bytes, or 0.
    pub mask: u64,
    /// The global token id of the shard's first column.
    pub vocab_offset: usize,
    /// `rows` [`VocabPartial`](crate::VocabPartial) records out.
    pub partials: u64,
}

/// [`cuda::vocab_shard_partials`](crate::cuda::vocab_shard_partials) on raw device pointers:
/// one [`VocabPartial`](crate::VocabPartial) per row over this shard, to be gathered
/// `[shards][rows]` and merged
/// by [`finish_vocab_partials`].
///
/// # Safety
/// As [`token_logprobs`], for the buffers of [`VocabShardArgs`]; `partials` overlaps nothing
/// else.
pub unsafe fn vocab_shard_partials(
    stream: RawStream,
    args: &VocabShardArgs,
    opts: &TokenLogprobsOptions,
) -> Result<()> {
    // SAFETY: the caller guarantees the stream belongs to the ordinal's primary context.
    let stream = unsafe { stream.borrow() }?;
    // SAFETY: the caller guarantees every buffer (see # Safety).
    unsafe { shard_partials_on(&stream, args, opts) }
}

/// [`vocab_shard_partials`] on a stream of this crate: checks the arguments, then launches.
///
/// # Safety
/// As [`vocab_shard_partials`], for `stream`.
pub(crate) unsafe fn shard_partials_on(
    stream: &Arc<CudaStream>,
    args: &VocabShardArgs,
    opts: &TokenLogprobsOptions,
) -> Result<()> {
    args.shape.validate("logits")?;
    non_null(&[("logits", args.logits), ("targets", args.targets), ("partials", args.partials)])?;
    let offset = crate::logprobs::check_vocab_offset(args.vocab_offset, args.shape.cols)?;
    let inv_tau = opts.inv_temperature()?;
    let sel = RowSelect::new(args.targets, args.index_type, args.mask, opts);
    let func = function(stream.context(), Module::Logprobs, forward_name(args.dtype, true, false))?;
    let shape = args.shape;
    let params = TokenRowsParams {
        logits: args.logits,
        logp: 0,
        entropy: 0,
        lse: 0,
        partials: args.partials,
        sel,
        ld: shape.row_stride as i64,
        vocab_offset: offset,
        rows: shape.rows as i32,
        cols: shape.cols as i32,
        inv_tau,
    };
    let null = 0u64;
    let mut launch = stream.launch_builder(&func);
    launch.arg(&params).arg(&null);
    let cfg =
        LaunchConfig { grid_dim: (shape.rows as u32, 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 };
    // Kernel: token_logprobs_entropy_rows_<dtype>(TokenRowsParams, unsigned long long*); a block
    // a row. SAFETY: the arguments match (the struct's layout is asserted on both sides), with
    // null outputs and status (the partial mode never reports); the logits cover the shape and `partials` holds `rows` records (the
    // caller's contract).
    unsafe { launch.launch(cfg) }.map_err(driver_error("launching vocab_shard_partials"))?;
    Ok(())
}

/// Buffers of a raw [`finish_vocab_partials`]; 0 for an absent optional buffer.
#[derive(Debug, Clone, Copy)]
pub struct FinishVocabArgs {
    /// `shards · rows` [`VocabPartial`](crate::VocabPartial) records, laid out `[shards][rows]`
    /// (shard order).
    pub partials: u64,
    /// Number of shards.
    pub shards: usize,
    /// Number of rows.
    pub rows: usize,
    /// `rows` global target ids of type `index_type`.
    pub targets: u64,
    /// Type of the target ids.
    pub index_type: IndexType,
    /// `rows` mask bytes, or 0.
    pub mask: u64,
    /// `rows` f32 outputs each, or 0 (at least one non-zero).
    pub logp: u64,
    /// See `logp`.
    pub entropy: u64,
    /// See `logp`.
    pub lse: u64,
    /// One u64 status word, initialised to [`STATUS_CLEAR`](crate::cuda::raw::STATUS_CLEAR).
    pub status: u64,
}

/// [`cuda::finish_vocab_partials`](crate::cuda::finish_vocab_partials) on raw device
/// pointers: the shards' partials merged in shard order and the requested outputs written,
/// as [`token_logprobs`] would for the whole vocabulary.
///
/// # Safety
/// As [`token_logprobs`], for the buffers of [`FinishVocabArgs`].
pub unsafe fn finish_vocab_partials(
    stream: RawStream,
    args: &FinishVocabArgs,
    opts: &TokenLogprobsOptions,
) -> Result<()> {
    // SAFETY: the caller guarantees the stream belongs to the ordinal's primary context.
    let stream = unsafe { stream.borrow() }?;
    // SAFETY: the caller guarantees every buffer (see # Safety).
    unsafe { finish_partials_on(&stream, args, opts) }
}

/// [`finish_vocab_partials`] on a stream of this crate: checks the arguments, then
/// launches.
///
/// # Safety
/// As [`finish_vocab_partials`], for `stream`.
pub(crate) unsafe fn finish_partials_on(
    stream: &Arc<CudaStream>,
    args: &FinishVocabArgs,
    opts: &TokenLogprobsOptions,
) -> Result<()> {
    // One row per merge thread and `shards` records per row: the same 32-bit limits as a
    // [rows, shards] batch.
    RowShape::new(args.rows, args.shards).validate("partials")?;
    non_null(&[("partials", args.partials), ("targets", args.targets), ("status", args.status)])?;
    if args.logp == 0 && args.entropy == 0 && args.lse == 0 {
        return Err(Error::InvalidOption {
            name: "outputs",
            value: "none requested".into(),
            expected: "at least one of logp, entropy, lse",
        });
    }
    let inv_tau = opts.inv_temperature()?;
    let sel = RowSelect::new(args.targets, args.index_type, args.mask, opts);
    let params = TokenMergeParams {
        partials: args.partials,
        logp: args.logp,
        entropy: args.entropy,
        lse: args.lse,
        sel,
        row_stride: 1,
        part_stride: args.rows as i64,
        parts: args.shards as i32,
        rows: args.rows as i32,
        inv_tau,
    };
    // SAFETY: `partials` holds shards·rows records laid out [shards][rows]: record (row, k)
    // at row·1 + k·rows; outputs hold `rows` f32 each; status one u64 (the caller's
    // contract).
    unsafe { launch_merge(stream, &params, args.status) }
}
