//! Finding a usable GPU without ever letting cudarc panic, and the primary contexts.

use std::sync::{Arc, Mutex};

use cudarc::driver::{CudaContext, CudaStream, sys};

use super::{CudaStatus, driver_error, module};
use crate::{Error, Result};

/// A GPU ready to run the kernels: a context with the modules loaded and a stream.
///
/// ```no_run
/// use rlhf_kernels::cuda::CudaDevice;
/// let device = CudaDevice::new(0)?;
/// println!("{}", device.describe());
/// # Ok::<(), rlhf_kernels::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct CudaDevice {
    stream: Arc<CudaStream>,
}

impl CudaDevice {
    /// Opens device `ordinal` (its primary context, shared with the CUDA runtime, PyTorch and
    /// candle), loads every kernel module, and uses the context's default stream.
    ///
    /// Errors, checked in this order: [`Error::KernelsNotBuilt`], [`Error::NoDriver`],
    /// [`Error::NoDevice`], [`Error::Driver`] (including a GPU the embedded kernels have no
    /// code for).
    pub fn new(ordinal: usize) -> Result<Self> {
        if !module::kernels_built() {
            return Err(Error::KernelsNotBuilt);
        }
        let ctx = primary_context(ordinal)?;
        module::load_all(&ctx)?;
        Ok(CudaDevice { stream: ctx.default_stream() })
    }

    /// Uses a stream the caller already has (e.g. candle's `CudaDevice::cuda_stream()`);
    /// loads the kernel modules into its context.
    pub fn from_stream(stream: Arc<CudaStream>) -> Result<Self> {
        module::load_all(stream.context())?;
        Ok(CudaDevice { stream })
    }

    /// The stream every op of this device is enqueued on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// The device ordinal.
    pub fn ordinal(&self) -> usize {
        self.stream.context().ordinal()
    }

    /// Compute capability, e.g. `(9, 0)` for an H100.
    pub fn compute_capability(&self) -> Result<(i32, i32)> {
        self.stream.context().compute_capability().map_err(driver_error("querying the compute capability"))
    }

    /// A [`LaunchContext`] on this device's stream, with a clear status word.
    pub fn launch_context(&self) -> Result<LaunchContext> {
        LaunchContext::new(&self.stream)
    }

    /// "cuda:0 NVIDIA H100 80GB HBM3 (sm_90)".
    pub fn describe(&self) -> String {
        let ctx = self.stream.context();
        let name = ctx.name().unwrap_or_else(|_| "unknown GPU".into());
        match self.compute_capability() {
            Ok((major, minor)) => format!("cuda:{} {name} (sm_{major}{minor})", ctx.ordinal()),
            Err(_) => format!("cuda:{} {name}", ctx.ordinal()),
        }
    }
}

/// Where the safe CUDA ops run: a stream, and the status word their kernels report into. Every
/// op takes one first (`&mut LaunchContext`), enqueues its kernels on the stream and returns;
/// nothing synchronises until [`check`](Self::check), which waits for the stream and returns
/// the first input problem a kernel reported since the last check (a row of only `-inf`, a
/// NaN, an overflow: [`Error::InvalidRow`]), lowest row first. Once per training step is
/// enough; the outputs of a reported row are NaN.
///
/// ```no_run
/// use rlhf_kernels::cuda::{self, CudaDevice};
/// use rlhf_kernels::{LogSoftmaxOptions, RowShape};
/// let device = CudaDevice::new(0)?;
/// let mut ctx = device.launch_context()?;
/// let s = ctx.stream().clone();
/// let logits = s.clone_htod(&[0.0f32, f32::NEG_INFINITY]).unwrap();
/// let mut out = s.alloc_zeros::<f32>(2).unwrap();
/// cuda::log_softmax(&mut ctx, &logits, RowShape::new(1, 2), &mut out, &LogSoftmaxOptions::default())?;
/// ctx.check()?; // Ok: one token is allowed
/// # Ok::<(), rlhf_kernels::Error>(())
/// ```
#[derive(Debug)]
pub struct LaunchContext {
    stream: Arc<CudaStream>,
    status: CudaStatus,
}

impl LaunchContext {
    /// A context on `stream` (e.g. candle's `CudaDevice::cuda_stream()`, or
    /// [`CudaDevice::stream`]) with a clear status word. The kernel modules must be loaded in
    /// the stream's context: open it with [`CudaDevice::new`] or [`CudaDevice::from_stream`]
    /// first.
    pub fn new(stream: &Arc<CudaStream>) -> Result<Self> {
        Ok(LaunchContext { stream: stream.clone(), status: CudaStatus::new(stream)? })
    }

    /// The stream the ops are enqueued on (allocate their buffers and statistics on it).
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Synchronises the stream, reads the status word and clears it: the first problem the
    /// kernels reported since the last check, as an error.
    pub fn check(&mut self) -> Result<()> {
        self.status.check(&self.stream)
    }

    /// The stream and the status word, for an op's launches.
    pub(crate) fn parts(&mut self) -> (&Arc<CudaStream>, &mut CudaStatus) {
        (&self.stream, &mut self.status)
    }
}

/// A stream owned by someone else, for the raw layer: the device ordinal and the `CUstream`
/// handle (null for the legacy default stream).
#[derive(Debug, Clone, Copy)]
pub struct RawStream {
    /// Device ordinal; the stream must belong to this device's primary context.
    pub ordinal: usize,
    /// The stream handle, e.g. `torch.cuda.current_stream().cuda_stream`.
    pub stream: sys::CUstream,
}

impl RawStream {
    /// Wraps the stream without taking ownership.
    ///
    /// # Safety
    /// `self.stream` must be a valid stream of device `ordinal`'s primary context (or null),
    /// alive for as long as the returned handle is used.
    pub(crate) unsafe fn borrow(self) -> Result<Arc<CudaStream>> {
        let ctx = primary_context(self.ordinal)?;
        // SAFETY: the caller guarantees the stream belongs to this primary context and
        // outlives the wrapper, which does not destroy it on drop.
        Ok(unsafe { ctx.wrap_borrowed_stream(self.stream) })
    }
}

/// Whether libcuda can be loaded. With candle's CUDA backend (feature `candle-cuda`) cudarc is
/// linked against libcuda (candle asks for it), so the process could not have started without
/// it; otherwise cudarc loads it at run time and panics when it is absent, so probe first.
fn driver_present() -> bool {
    #[cfg(feature = "candle-cuda")]
    return true;
    // SAFETY: only tries to dlopen libcuda under its usual names and closes it again; no
    // driver function is called.
    #[cfg(not(feature = "candle-cuda"))]
    unsafe {
        sys::is_culib_present()
    }
}

/// The primary context of `ordinal`, retained once per process and cached.
///
/// Probes for libcuda before any other cudarc call: cudarc panics when it is absent.
pub(crate) fn primary_context(ordinal: usize) -> Result<Arc<CudaContext>> {
    static CONTEXTS: Mutex<Vec<Arc<CudaContext>>> = Mutex::new(Vec::new());
    let mut contexts = CONTEXTS.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(ctx) = contexts.iter().find(|c| c.ordinal() == ordinal) {
        return Ok(ctx.clone());
    }
    if !driver_present() {
        return Err(Error::NoDriver);
    }
    let count = match CudaContext::device_count() {
        Ok(n) => n.max(0) as usize,
        Err(e) if e.0 == sys::CUresult::CUDA_ERROR_NO_DEVICE => 0,
        Err(e) => return Err(driver_error("initialising the CUDA driver")(e)),
    };
    if ordinal >= count {
        return Err(Error::NoDevice { ordinal, count });
    }
    let ctx = CudaContext::new(ordinal).map_err(driver_error("creating the CUDA context"))?;
    contexts.push(ctx.clone());
    Ok(ctx)
}
