//! CUDA log-softmax: the safe wrappers over cudarc buffers and the launches of
//! `kernels/logprobs.cu` they share with the raw layer (raw.rs).

use cudarc::driver::{CudaStream, DevicePtr, DevicePtrMut, DeviceRepr, LaunchConfig, PushKernelArg, sys};

use crate::cuda::module::{Module, function};
use crate::cuda::{LaunchContext, driver_error};
use crate::{DType, Element, LogSoftmaxOptions, Result, RowShape};

/// Threads per block for rows of `cols` elements: the fewest (a power of two, 32 to 1024) that
/// hold the row in registers, 8 chunks of 4 elements per thread (`LS_RESIDENT` in
/// kernels/logprobs.cu), so rows of up to 32768 elements are read once. A function of the row
/// length only (the kernels move 4 elements per thread and access whatever the dtype), which
/// keeps results batch-invariant (see kernels/common.cuh).
pub(crate) fn row_block_threads(cols: usize) -> u32 {
    const RESIDENT_CHUNKS: usize = 8;
    let threads = cols.div_ceil(4 * RESIDENT_CHUNKS).next_power_of_two();
    threads.clamp(32, 1024) as u32
}

fn row_launch(shape: RowShape) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (shape.rows as u32, 1, 1),
        block_dim: (row_block_threads(shape.cols), 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Log-softmax of every row of `logits` (f32, f16 or bf16, `shape`, row stride ≥ cols) with
/// temperature τ into the dense `[rows, cols]` f32 buffer `out`, enqueued on `ctx`'s stream:
///
/// `out_v = (x_v − max x)/τ − ln Σ_u exp((x_u − max x)/τ)` (nats; `-inf` logits give `-inf`).
///
/// One block per row keeps up to 32768 elements of the row in registers between the online max
/// and sum and the output, so such rows are read once (the rest of a wider row is read again),
/// 4 elements per thread and access (16-byte f32 stores, 8- or 16-byte loads) where the row is
/// aligned. A row with a NaN, a `+inf` or only `-inf` gets NaN outputs
/// and is reported in `ctx`'s status word. Shape and option errors are returned at once.
///
/// ```no_run
/// use rlhf_kernels::cuda::{self, CudaDevice, LaunchContext};
/// use rlhf_kernels::{LogSoftmaxOptions, RowShape};
/// let device = CudaDevice::new(0)?;
/// let stream = device.stream();
/// let logits = stream.clone_htod(&[1.0f32, 2.0, 3.0]).unwrap();
/// let mut out = stream.alloc_zeros::<f32>(3).unwrap();
/// let mut ctx = LaunchContext::new(stream)?;
/// cuda::log_softmax(
///     &mut ctx,
///     &logits,
///     RowShape::new(1, 3),
///     &mut out,
///     &LogSoftmaxOptions::default(),
/// )?;
/// ctx.check()?;
/// # Ok::<(), rlhf_kernels::Error>(())
/// ```
pub fn log_softmax<T: Element>(
    ctx: &mut LaunchContext,
    logits: &impl DevicePtr<T>,
    shape: RowShape,
    out: &mut impl DevicePtrMut<f32>,
    opts: &LogSoftmaxOptions,
) -> Result<()> {
    let (stream, status) = ctx.parts();
    check_forward(shape, logits.len(), out.len())?;
    let inv_tau = opts.inv_temperature()?;
    let (x, _read_x) = logits.device_ptr(stream);
    let (y, _write_y) = out.device_ptr_mut(stream);
    let (st, _write_st) = status.device_ptr(stream);
    // SAFETY: the pointers come from live cudarc buffers of `stream`'s context, lengths checked above
    // (logits ≥ min_len, out = rows·cols f32, status one u64); `out` is a mutable borrow, so it cannot
    // alias `logits`; the guards keep cudarc's event tracking in order until the launch is enqueued.
    unsafe { launch_forward(stream, T::DTYPE, shape, x, y, st, inv_tau) }
}

/// Backward of [`log_softmax`]: from its output `out` and the upstream gradient `grad_out`
/// (dense `[rows, cols]` f32) writes `grad_logits_v = (g_v − exp(out_v)·Σ_u g_u) / τ` into
/// `grad_logits` (the logits' dtype and `shape`), enqueued on `ctx`'s stream.
///
/// A row whose `grad_out` is not finite gets NaN outputs and is reported in `ctx`'s status word; a
/// NaN or `+inf` in `out` (which the forward never produces) is reported too.
///
/// ```no_run
/// use rlhf_kernels::cuda::{self, CudaDevice, LaunchContext};
/// use rlhf_kernels::{LogSoftmaxOptions, RowShape};
/// let device = CudaDevice::new(0)?;
/// let stream = device.stream();
/// let out = stream.clone_htod(&[0.5f32.ln(), 0.5f32.ln()]).unwrap();
/// let grad_out = stream.clone_htod(&[1.0f32, 0.0]).unwrap();
/// let mut grad = stream.alloc_zeros::<f32>(2).unwrap();
/// let mut ctx = LaunchContext::new(stream)?;
/// cuda::log_softmax_backward(
///     &mut ctx,
///     &out,
///     &grad_out,
///     RowShape::new(1, 2),
///     &mut grad,
///     &LogSoftmaxOptions::default(),
/// )?;
/// ctx.check()?; // grad = [0.5, -0.5]
/// # Ok::<(), rlhf_kernels::Error>(())
/// ```
pub fn log_softmax_backward<T: Element>(
    ctx: &mut LaunchContext,
    out: &impl DevicePtr<f32>,
    grad_out: &impl DevicePtr<f32>,
    shape: RowShape,
    grad_logits: &mut impl DevicePtrMut<T>,
    opts: &LogSoftmaxOptions,
) -> Result<()> {
    let (stream, status) = ctx.parts();
    check_backward(shape, out.len(), grad_out.len(), grad_logits.len())?;
    let inv_tau = opts.inv_temperature()?;
    let (y, _read_y) = out.device_ptr(stream);
    let (g, _read_g) = grad_out.device_ptr(stream);
    let (dx, _write_dx) = grad_logits.device_ptr_mut(stream);
    let (st, _write_st) = status.device_ptr(stream);
    // SAFETY: as in `log_softmax`: live cudarc buffers of this context, lengths checked
    // against `shape`, the output borrowed mutably (no alias with the inputs).
    unsafe { launch_backward(stream, T::DTYPE, shape, [y, g, dx], st, inv_tau) }
}

pub(super) fn check_forward(shape: RowShape, logits_len: usize, out_len: usize) -> Result<()> {
    shape.check_buffer("logits", logits_len)?;
    shape.dense().check_buffer("out", out_len)
}

/// The kernels' `LogSoftmaxParams` (kernels/logprobs.cu), field for field: the forward reads
/// `logits` and writes `out`, the backward reads `out` and `grad_out` and writes `grad`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct LogSoftmaxParams {
    logits: u64,
    out: u64,
    grad_out: u64,
    grad: u64,
    ld_logits: i64,
    ld_out: i64,
    ld_grad_out: i64,
    ld_grad: i64,
    rows: i32,
    cols: i32,
    inv_tau: f32,
}

// The kernels pin the same size and offsets (`static_assert` in kernels/).
pin_layout!(LogSoftmaxParams, 80, {
    logits: 0, out: 8, grad_out: 16, grad: 24, ld_logits: 32, ld_out: 40, ld_grad_out: 48,
    ld_grad: 56, rows: 64, cols: 68, inv_tau: 72,
});

// SAFETY: repr(C) with the layout of the kernels' `struct LogSoftmaxParams` (asserted above and
// in the kernel), passed by value; plain old data.
unsafe impl DeviceRepr for LogSoftmaxParams {}

impl LogSoftmaxParams {
    /// `shape`'s logits (row stride allowed) and the dense `[rows, cols]` f32 rows of `out` and
    /// `grad_out`; the addresses 0, to be filled by the launch.
    fn new(shape: RowShape, inv_tau: f32) -> Self {
        let (ld, dense) = (shape.row_stride as i64, shape.cols as i64);
        LogSoftmaxParams {
            logits: 0,
            out: 0,
            grad_out: 0,
            grad: 0,
            ld_logits: ld,
            ld_out: dense,
            ld_grad_out: dense,
            ld_grad: ld,
            rows: shape.rows as i32,
            cols: shape.cols as i32,
            inv_tau,
        }
    }
}

pub(super) fn check_backward(
    shape: RowShape,
    out_len: usize,
    grad_out_len: usize,
    grad_len: usize,
) -> Result<()> {
    shape.dense().check_buffer("out", out_len)?;
    shape.dense().check_buffer("grad_out", grad_out_len)?;
    shape.check_buffer("grad_logits", grad_len)
}

/// # Safety
/// `logits` covers `shape` (dtype `dtype`), `out` covers `rows·cols` f32 and does not overlap
/// `logits`, `status` is one u64; all are device memory of `stream`'s context.
pub(super) unsafe fn launch_forward(
    stream: &CudaStream,
    dtype: DType,
    shape: RowShape,
    logits: sys::CUdeviceptr,
    out: sys::CUdeviceptr,
    status: sys::CUdeviceptr,
    inv_tau: f32,
) -> Result<()> {
    let name = match dtype {
        DType::F32 => "log_softmax_forward_f32",
        DType::F16 => "log_softmax_forward_f16",
        DType::BF16 => "log_softmax_forward_bf16",
    };
    let func = function(stream.context(), Module::Logprobs, name)?;
    let params = LogSoftmaxParams { logits, out, ..LogSoftmaxParams::new(shape, inv_tau) };
    let mut launch = stream.launch_builder(&func);
    launch.arg(&params).arg(&status);
    // Kernel: `log_softmax_forward_<dtype>(LogSoftmaxParams, unsigned long long*)`, one block per
    // row of 32..=1024 threads (a multiple of 32).
    // SAFETY: arguments (the struct's layout asserted on both sides) and launch shape match it
    // (rows ≤ i32::MAX); the caller guarantees the pointers cover the shape, which the kernel
    // touches only within `row * ld + [0, cols)`.
    unsafe { launch.launch(row_launch(shape)) }.map_err(driver_error("launching log_softmax_forward"))?;
    Ok(())
}

/// # Safety
/// `[out, grad_out]` cover `rows·cols` f32 each, `grad` covers `shape` (dtype `dtype`) and
/// overlaps neither, `status` is one u64; all device memory of `stream`'s context.
pub(super) unsafe fn launch_backward(
    stream: &CudaStream,
    dtype: DType,
    shape: RowShape,
    [out, grad_out, grad]: [sys::CUdeviceptr; 3],
    status: sys::CUdeviceptr,
    inv_tau: f32,
) -> Result<()> {
    let name = match dtype {
        DType::F32 => "log_softmax_backward_f32",
        DType::F16 => "log_softmax_backward_f16",
        DType::BF16 => "log_softmax_backward_bf16",
    };
    let func = function(stream.context(), Module::Logprobs, name)?;
    let params = LogSoftmaxParams { out, grad_out, grad, ..LogSoftmaxParams::new(shape, inv_tau) };
    let mut launch = stream.launch_builder(&func);
    launch.arg(&params).arg(&status);
    // SAFETY: matches `log_softmax_backward_<dtype>(LogSoftmaxParams, unsigned long long*)` (the
    // layout asserted on both sides); launch shape as in `launch_forward`; the caller guarantees
    // the pointers cover the shape.
    unsafe { launch.launch(row_launch(shape)) }.map_err(driver_error("launching log_softmax_backward"))?;
    Ok(())
}
