//! Masked moments and whitening on the GPU.

use std::sync::Arc;

use cudarc::driver::{CudaStream, CudaView, DevicePtr, DevicePtrMut, PushKernelArg, SyncOnDrop};

use crate::cuda::DeviceStats;
use crate::cuda::aggregation::{ONE_BLOCK, ReductionArgs, ReductionParams, per_row, workspace_or_alloc};
use crate::cuda::module::{Module, function};
use crate::cuda::{LaunchContext, driver_error, view_ptr};
use crate::{Moments, Result, RowShape, WhitenOptions};

/// Bytes of one row record of the moments (`MomentsF64` in the kernel: 5 f64).
const MOMENT_RECORD_BYTES: usize = 40;

/// Bytes of workspace a raw [`masked_moments`](crate::cuda::raw::masked_moments) or
/// [`whiten`](crate::cuda::raw::whiten) uses for `shape`: one record of five f64 per sequence.
pub fn moments_workspace_bytes(shape: RowShape) -> usize {
    shape.rows * MOMENT_RECORD_BYTES
}

/// The moments' two launches (rows, then one finalising block) on checked device addresses;
/// the records are allocated on the stream when the workspace is 0.
///
/// # Safety
/// Every non-zero address of `a` is device memory of `stream`'s context of the size its
/// [`ReductionArgs`] field documents, `out` and the workspace overlap nothing else, and every
/// buffer stays allocated until the kernels ran.
pub(super) unsafe fn launch_moments(stream: &Arc<CudaStream>, a: &ReductionArgs) -> Result<()> {
    let shape = a.shape;
    let mut owned = None;
    let (rec, _g1) =
        workspace_or_alloc(stream, true, a.workspace, moments_workspace_bytes(shape), &mut owned)?;
    let params = ReductionParams::new(a, rec);
    let ctx = stream.context();
    let f = function(ctx, Module::Advantages, "moments_rows")?;
    let mut l = stream.launch_builder(&f);
    l.arg(&params).arg(&a.status);
    // SAFETY: matches `moments_rows(ReductionParams, unsigned long long*)` (the layout asserted on
    // both sides); one block of 256 threads per row; values and mask cover the shape (the
    // caller's contract); the records hold rows·40 bytes, 16-byte aligned.
    unsafe { l.launch(per_row(shape)) }.map_err(driver_error("launching moments_rows"))?;
    let f = function(ctx, Module::Advantages, "moments_finalize")?;
    let mut l = stream.launch_builder(&f);
    l.arg(&params);
    // SAFETY: matches `moments_finalize(ReductionParams)`; exactly one block of 256 threads (its
    // tree assumes it); reads the records written above on this stream, writes the five f64 of
    // `out`.
    unsafe { l.launch(ONE_BLOCK) }.map_err(driver_error("launching moments_finalize"))?;
    Ok(())
}

/// [`launch_moments`], then `x ← (x − mean)·scale + offset` on the valid tokens (0 on the
/// others).
///
/// # Safety
/// As [`launch_moments`]; `values` is written in place.
pub(super) unsafe fn launch_whiten(
    stream: &Arc<CudaStream>,
    a: &ReductionArgs,
    opts: &WhitenOptions,
) -> Result<()> {
    opts.validate()?;
    // SAFETY: the caller's contract (see # Safety).
    unsafe { launch_moments(stream, a) }?;
    // The records are not read: the moments are in `out`.
    let params = ReductionParams::new(a, 0).whitening(opts);
    let f = function(stream.context(), Module::Advantages, "whiten_apply")?;
    let mut l = stream.launch_builder(&f);
    l.arg(&params);
    // SAFETY: matches `whiten_apply(ReductionParams)`; one block per row; values and mask cover
    // the shape (the caller's contract); the moments in `out` were written by the launches above
    // on this stream.
    unsafe { l.launch(per_row(a.shape)) }.map_err(driver_error("launching whiten_apply"))?;
    Ok(())
}

/// The device addresses of a safe moments call: `out`'s records grown to the batch.
fn moments_args<'a>(
    stream: &'a Arc<CudaStream>,
    shape: RowShape,
    out: &'a mut DeviceStats<Moments>,
) -> Result<(u64, u64, [SyncOnDrop<'a>; 2])> {
    let ((o, g2), (workspace, g1)) = out.with_records(stream, moments_workspace_bytes(shape))?;
    Ok((o, workspace, [g1, g2]))
}

fn check_values(shape: RowShape, len: usize, mask: Option<&CudaView<'_, u8>>) -> Result<()> {
    shape.check_buffer("values", len)?;
    if let Some(m) = mask {
        shape.check_buffer("mask", m.len())?;
    }
    Ok(())
}

/// Count, mean, unbiased variance, min and max of the valid tokens of a `[B, T]` batch on the GPU,
/// into `out` (read it with [`DeviceStats::read`](crate::cuda::DeviceStats::read) or use it on the
/// device): the twin of [`cpu::masked_moments`](crate::cpu::masked_moments): two f64 passes per row
/// (count and sum, then squared deviations), Chan merges across rows in f64, fixed orders:
/// deterministic. A row with a non-finite valid value is reported to `ctx`'s status word.
///
/// ```no_run
/// use rlhf_kernels::cuda::{self, CudaDevice, LaunchContext, DeviceStats};
/// use rlhf_kernels::{Moments};
/// use rlhf_kernels::RowShape;
/// let device = CudaDevice::new(0)?;
/// let s = device.stream();
/// let x = s.clone_htod(&[1.0f32, 3.0]).unwrap();
/// let (mut m, mut ctx) = (DeviceStats::<Moments>::new(s)?, LaunchContext::new(s)?);
/// cuda::masked_moments(&mut ctx, &x, RowShape::new(1, 2), None, &mut m)?;
/// ctx.check()?;
/// assert_eq!(m.read(s)?.mean, 2.0);
/// # Ok::<(), rlhf_kernels::Error>(())
/// ```
pub fn masked_moments(
    ctx: &mut LaunchContext,
    values: &impl DevicePtr<f32>,
    shape: RowShape,
    mask: Option<&CudaView<'_, u8>>,
    out: &mut DeviceStats<Moments>,
) -> Result<()> {
    let (stream, status) = ctx.parts();
    check_values(shape, values.len(), mask)?;
    let s: &CudaStream = stream;
    let (values, _g1) = values.device_ptr(s);
    let (mask, _g2) = view_ptr(mask, s);
    let (status, _g3) = status.device_ptr(s);
    let (out, workspace, _g4) = moments_args(stream, shape, out)?;
    let args = ReductionArgs { shape, values, mask, out, workspace, status };
    // SAFETY: every address comes from a cudarc buffer of this stream's context whose length
    // was checked above (the records were grown to the batch); the guards keep cudarc's event
    // tracking in order until the launches are enqueued.
    unsafe { launch_moments(stream, &args) }
}

/// Whitens the valid tokens of a `[B, T]` batch in place on the GPU (masked tokens become 0),
/// the twin of [`cpu::whiten`](crate::cpu::whiten): [`masked_moments`] into `moments`, then
/// `x ← (x − mean)·scale + offset` with `scale = 1/sqrt(var + ε)` and `offset = mean` with
/// `keep_mean` (else 0), three launches, no host round trip.
///
/// ```no_run
/// use rlhf_kernels::cuda::{self, CudaDevice, LaunchContext, DeviceStats};
/// use rlhf_kernels::{Moments};
/// use rlhf_kernels::{RowShape, WhitenOptions};
/// let device = CudaDevice::new(0)?;
/// let s = device.stream();
/// let mut adv = s.clone_htod(&[1.0f32, 3.0]).unwrap();
/// let (mut m, mut ctx) = (DeviceStats::<Moments>::new(s)?, LaunchContext::new(s)?);
/// cuda::whiten(&mut ctx, &mut adv, RowShape::new(1, 2), None, &mut m, &WhitenOptions::default())?;
/// ctx.check()?;
/// # Ok::<(), rlhf_kernels::Error>(())
/// ```
pub fn whiten(
    ctx: &mut LaunchContext,
    values: &mut impl DevicePtrMut<f32>,
    shape: RowShape,
    mask: Option<&CudaView<'_, u8>>,
    moments: &mut DeviceStats<Moments>,
    opts: &WhitenOptions,
) -> Result<()> {
    let (stream, status) = ctx.parts();
    check_values(shape, values.len(), mask)?;
    let s: &CudaStream = stream;
    let (values, _g1) = values.device_ptr_mut(s);
    let (mask, _g2) = view_ptr(mask, s);
    let (status, _g3) = status.device_ptr(s);
    let (out, workspace, _g4) = moments_args(stream, shape, moments)?;
    let args = ReductionArgs { shape, values, mask, out, workspace, status };
    // SAFETY: as in `masked_moments`; `values` is a distinct mutable borrow.
    unsafe { launch_whiten(stream, &args, opts) }
}
