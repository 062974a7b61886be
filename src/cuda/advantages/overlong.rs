//! DAPO's overlong shaping of the outcome scores on the GPU: one block per sequence counts its
//! valid tokens and writes its shaped score.

use std::sync::Arc;

use cudarc::driver::{CudaStream, DevicePtr, DevicePtrMut, DeviceRepr, LaunchConfig, PushKernelArg};

use crate::cuda::module::{Module, function};
use crate::cuda::{LaunchContext, driver_error, view_ptr};
use crate::memory::IntoViewMut;
use crate::{Cuda, OverlongInputs, OverlongOptions, Result, RowShape};

/// DAPO's overlong shaping on the GPU, the twin of
/// [`cpu::overlong_shaping`](crate::cpu::overlong_shaping) (the same f64 penalty rounded once,
/// the same f32 addition: equal bits): `shaped[i] = scores[i] + R_len(L_i)`. A non-finite score
/// or an overflowed result is reported to `ctx`'s status word (row = sequence).
///
/// ```no_run
/// use rlhf_kernels::cuda::{self, CudaDevice, LaunchContext};
/// use rlhf_kernels::{OverlongInputs, OverlongOptions, RowShape};
/// let device = CudaDevice::new(0)?;
/// let s = device.stream();
/// let (scores, mask) = (s.clone_htod(&[1.0f32, 1.0]).unwrap(), s.clone_htod(&[1u8, 1, 0, 1, 1, 1]).unwrap());
/// let mut shaped = s.alloc_zeros::<f32>(2).unwrap();
/// let mut ctx = LaunchContext::new(s)?;
/// let inputs = OverlongInputs::new(RowShape::new(2, 3), &scores).mask(&mask);
/// cuda::overlong_shaping(&mut ctx, &inputs, &mut shaped, &OverlongOptions::new(3, 2))?;
/// ctx.check()?;
/// assert_eq!(s.clone_dtoh(&shaped).unwrap(), [0.5, 0.0]);
/// # Ok::<(), rlhf_kernels::Error>(())
/// ```
pub fn overlong_shaping<'a>(
    ctx: &mut LaunchContext,
    inputs: &OverlongInputs<'_, Cuda>,
    shaped: impl IntoViewMut<'a, f32, Memory = Cuda>,
    opts: &OverlongOptions,
) -> Result<()> {
    let (stream, status) = ctx.parts();
    let mut shaped = shaped.into_view_mut();
    inputs.validate(shaped.len(), opts)?;
    let s: &CudaStream = stream;
    let (scores, _g1) = inputs.scores.device_ptr(s);
    let (mask, _g2) = view_ptr(inputs.mask.as_ref(), s);
    let (shaped, _g3) = shaped.device_ptr_mut(s);
    let (status, _g4) = status.device_ptr(s);
    let args = OverlongArgs { shape: inputs.shape, scores, mask, shaped, status };
    // SAFETY: every address comes from a cudarc buffer of this stream's context whose length was
    // checked above; the guards keep cudarc's event tracking in order until the launch.
    unsafe { launch_overlong(stream, &args, opts) }
}

/// Buffers of a raw [`overlong_shaping`](crate::cuda::raw::overlong_shaping) call: device
/// addresses, 0 for an absent mask.
#[derive(Debug, Clone, Copy)]
pub struct OverlongArgs {
    /// `[B, T]` of the mask (row stride allowed).
    pub shape: RowShape,
    /// f32 score per sequence (`shape.rows`).
    pub scores: u64,
    /// Mask bytes (0 = padding), or 0 (every response `shape.cols` long).
    pub mask: u64,
    /// f32 shaped score per sequence out.
    pub shaped: u64,
    /// One u64 status word, initialised to [`STATUS_CLEAR`](crate::cuda::raw::STATUS_CLEAR).
    pub status: u64,
}

/// The kernel's `OverlongParams` (kernels/advantages.cu), field for field.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct OverlongParams {
    scores: u64,
    mask: u64,
    shaped: u64,
    ld: i64,
    max_len: i64,
    buffer_len: i64,
    rows: i32,
    cols: i32,
    penalty: f32,
}

// The kernels pin the same size and offsets (`static_assert` in kernels/).
pin_layout!(OverlongParams, 64, {
    scores: 0, mask: 8, shaped: 16, ld: 24, max_len: 32, buffer_len: 40, rows: 48, cols: 52,
    penalty: 56,
});

// SAFETY: repr(C) with the layout of the kernel's `struct OverlongParams` (asserted above and in
// the kernel), passed by value; plain old data.
unsafe impl DeviceRepr for OverlongParams {}

/// The `overlong_shaping` launch on checked device addresses (the safe and raw entry points
/// share it).
///
/// # Safety
/// Every non-zero address of `a` is device memory of `stream`'s context of the size its
/// [`OverlongArgs`] field documents, `shaped` overlaps nothing else, and every buffer stays
/// allocated until the kernel ran.
pub(super) unsafe fn launch_overlong(
    stream: &Arc<CudaStream>,
    a: &OverlongArgs,
    opts: &OverlongOptions,
) -> Result<()> {
    let shape = a.shape;
    shape.validate("overlong shaping")?;
    opts.validate()?;
    let params = OverlongParams {
        scores: a.scores,
        mask: a.mask,
        shaped: a.shaped,
        ld: shape.row_stride as i64,
        max_len: opts.max_len as i64,
        buffer_len: opts.buffer_len as i64,
        rows: shape.rows as i32,
        cols: shape.cols as i32,
        penalty: opts.penalty,
    };
    let func = function(stream.context(), Module::Advantages, "overlong_shaping")?;
    let mut launch = stream.launch_builder(&func);
    launch.arg(&params).arg(&a.status);
    let cfg =
        LaunchConfig { grid_dim: (shape.rows as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    // SAFETY: matches `overlong_shaping(OverlongParams, unsigned long long*)` (the layout is
    // asserted on both sides); one block of 256 threads per sequence (rows ≤ i32::MAX by the
    // shape check); `scores` and `shaped` hold one f32 per row and `mask` covers the shape (the
    // caller's contract); `status` is one u64.
    unsafe { launch.launch(cfg) }.map_err(driver_error("launching overlong_shaping"))?;
    Ok(())
}
