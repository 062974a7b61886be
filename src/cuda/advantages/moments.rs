//! Masked moments and whitening on the GPU.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, CudaView, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg};

use crate::cuda::module::{Module, function};
use crate::cuda::{CudaStatus, driver_error, view_ptr};
use crate::{Moments, Result, RowShape, WhitenOptions};

/// Bytes of one row record of the moments (`MomentsF64` in the kernel: 5 f64).
const MOMENT_RECORD_BYTES: usize = 40;

/// The device buffers of [`masked_moments`] and [`whiten`]: the result (five f64) and one
/// record per sequence, reused across calls (grown for larger batches).
#[derive(Debug)]
pub struct DeviceMoments {
    out: CudaSlice<f64>,
    records: CudaSlice<u8>,
}

impl DeviceMoments {
    /// Allocates the result on `stream`'s device.
    pub fn new(stream: &Arc<CudaStream>) -> Result<Self> {
        Ok(DeviceMoments {
            out: stream.alloc_zeros::<f64>(5).map_err(driver_error("allocating moments"))?,
            records: stream
                .alloc_zeros::<u8>(MOMENT_RECORD_BYTES)
                .map_err(driver_error("allocating moments"))?,
        })
    }

    /// Synchronises `stream` and returns the moments of the last call into `self`.
    pub fn read(&self, stream: &Arc<CudaStream>) -> Result<Moments> {
        let w = stream.clone_dtoh(&self.out).map_err(driver_error("reading moments"))?;
        Ok(Moments { count: w[0], mean: w[1], var: w[2], min: w[3], max: w[4] })
    }

    /// The result on the device: `[count, mean, unbiased variance, min, max]` (f64).
    pub fn as_view(&self) -> CudaView<'_, f64> {
        self.out.as_view()
    }
}

/// The moments' two launches (rows, then one finalising block).
fn launch_moments(
    stream: &Arc<CudaStream>,
    values: u64,
    shape: RowShape,
    mask: u64,
    out: &mut DeviceMoments,
    status: u64,
) -> Result<()> {
    let need = shape.rows * MOMENT_RECORD_BYTES;
    if out.records.len() < need {
        out.records = stream.alloc_zeros::<u8>(need).map_err(driver_error("allocating moment records"))?;
    }
    let s: &CudaStream = stream;
    let (rec, _g1) = out.records.device_ptr_mut(s);
    let (o, _g2) = out.out.device_ptr_mut(s);
    let (ld, rows, cols) = (shape.row_stride as i64, shape.rows as i32, shape.cols as i32);
    let ctx = stream.context();
    let f = function(ctx, Module::Advantages, "moments_rows")?;
    let mut l = stream.launch_builder(&f);
    l.arg(&values).arg(&ld).arg(&mask).arg(&rows).arg(&cols).arg(&rec).arg(&status);
    let cfg =
        LaunchConfig { grid_dim: (shape.rows as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    // SAFETY: matches `moments_rows(const float*, long long, const unsigned char*, int, int,
    // MomentsF64*, unsigned long long*)`; one block of 256 threads per row; values and mask
    // cover the checked shape; the records hold rows·40 bytes (8-byte aligned allocation).
    unsafe { l.launch(cfg) }.map_err(driver_error("launching moments_rows"))?;
    let f = function(ctx, Module::Advantages, "moments_finalize")?;
    let mut l = stream.launch_builder(&f);
    l.arg(&rec).arg(&rows).arg(&o);
    let one = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    // SAFETY: matches `moments_finalize(const MomentsF64*, int, double*)`; exactly one block of 256
    // threads (its tree assumes it); reads the records written above on this stream, writes
    // the five f64 of `out`.
    unsafe { l.launch(one) }.map_err(driver_error("launching moments_finalize"))?;
    Ok(())
}

fn check_values(shape: RowShape, len: usize, mask: Option<&CudaView<'_, u8>>) -> Result<()> {
    shape.check_buffer("values", len)?;
    if let Some(m) = mask {
        shape.check_buffer("mask", m.len())?;
    }
    Ok(())
}

/// Count, mean, unbiased variance, min and max of the valid tokens of a `[B, T]` batch on the
/// GPU, into `out` (read it with [`DeviceMoments::read`] or use it on the device): the twin of
/// [`cpu::masked_moments`](crate::cpu::masked_moments): two f64 passes per row (count and
/// sum, then squared deviations), Chan merges across rows in f64, fixed orders:
/// deterministic. A row with a non-finite valid value is reported to `status`.
///
/// ```no_run
/// use rlhf_kernels::cuda::{self, CudaDevice, CudaStatus, DeviceMoments};
/// use rlhf_kernels::RowShape;
/// let device = CudaDevice::new(0)?;
/// let s = device.stream();
/// let x = s.clone_htod(&[1.0f32, 3.0]).unwrap();
/// let (mut m, mut status) = (DeviceMoments::new(s)?, CudaStatus::new(s)?);
/// cuda::masked_moments(s, &x, RowShape::new(1, 2), None, &mut m, &mut status)?;
/// status.check(s)?;
/// assert_eq!(m.read(s)?.mean, 2.0);
/// # Ok::<(), rlhf_kernels::Error>(())
/// ```
pub fn masked_moments(
    stream: &Arc<CudaStream>,
    values: &impl DevicePtr<f32>,
    shape: RowShape,
    mask: Option<&CudaView<'_, u8>>,
    out: &mut DeviceMoments,
    status: &mut CudaStatus,
) -> Result<()> {
    check_values(shape, values.len(), mask)?;
    let s: &CudaStream = stream;
    let (v, _g1) = values.device_ptr(s);
    let (m, _g2) = view_ptr(mask, s);
    let (st, _g3) = status.device_ptr(s);
    launch_moments(stream, v, shape, m, out, st)
}

/// Whitens the valid tokens of a `[B, T]` batch in place on the GPU (masked tokens become 0),
/// the twin of [`cpu::whiten`](crate::cpu::whiten): [`masked_moments`] into `moments`, then
/// `x ← x·scale + shift` with `scale = 1/sqrt(var + ε)` and `shift = −mean·scale` (+ mean
/// with `keep_mean`), three launches, no host round trip.
///
/// ```no_run
/// use rlhf_kernels::cuda::{self, CudaDevice, CudaStatus, DeviceMoments};
/// use rlhf_kernels::{RowShape, WhitenOptions};
/// let device = CudaDevice::new(0)?;
/// let s = device.stream();
/// let mut adv = s.clone_htod(&[1.0f32, 3.0]).unwrap();
/// let (mut m, mut status) = (DeviceMoments::new(s)?, CudaStatus::new(s)?);
/// cuda::whiten(s, &mut adv, RowShape::new(1, 2), None, &WhitenOptions::default(), &mut m, &mut status)?;
/// status.check(s)?;
/// # Ok::<(), rlhf_kernels::Error>(())
/// ```
pub fn whiten(
    stream: &Arc<CudaStream>,
    values: &mut impl DevicePtrMut<f32>,
    shape: RowShape,
    mask: Option<&CudaView<'_, u8>>,
    opts: &WhitenOptions,
    moments: &mut DeviceMoments,
    status: &mut CudaStatus,
) -> Result<()> {
    check_values(shape, values.len(), mask)?;
    opts.validate()?;
    let s: &CudaStream = stream;
    let (v, _g1) = values.device_ptr_mut(s);
    let (m, _g2) = view_ptr(mask, s);
    let (st, _g3) = status.device_ptr(s);
    launch_moments(stream, v, shape, m, moments, st)?;
    let (mo, _g4) = moments.out.device_ptr(s);
    let (ld, rows, cols) = (shape.row_stride as i64, shape.rows as i32, shape.cols as i32);
    let (eps, keep) = (opts.eps as f64, i32::from(opts.keep_mean));
    let f = function(stream.context(), Module::Advantages, "whiten_apply")?;
    let mut l = stream.launch_builder(&f);
    l.arg(&v).arg(&ld).arg(&m).arg(&rows).arg(&cols).arg(&mo).arg(&eps).arg(&keep);
    let cfg =
        LaunchConfig { grid_dim: (shape.rows as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    // SAFETY: matches `whiten_apply(float*, long long, const unsigned char*, int, int, const
    // double*, double, int)`; one block per row; values and mask cover the checked shape;
    // the moments were written by the launches above on this stream.
    unsafe { l.launch(cfg) }.map_err(driver_error("launching whiten_apply"))?;
    Ok(())
}
