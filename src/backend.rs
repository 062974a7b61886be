//! Choosing where to run: the best available backend, and why CUDA is not used when it isn't.

use std::fmt;

use crate::Job;

/// Where an op runs.
///
/// ```
/// use rlhf_kernels::Backend;
/// let (backend, why_not_cuda) = Backend::best_with_reason();
/// println!("running on {}", backend.describe());
/// if let Some(reason) = why_not_cuda {
///     println!("CUDA not used: {reason}");
/// }
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Backend {
    /// The multi-threaded, vectorised CPU backend ([`cpu`](crate::cpu)).
    Cpu,
    /// A GPU with the kernels loaded ([`cuda`](crate::cuda)).
    #[cfg(feature = "cuda")]
    Cuda(crate::cuda::CudaDevice),
}

/// Why [`Backend::best`] did not pick CUDA.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum CudaUnavailable {
    /// Built without the `cuda` feature.
    FeatureDisabled,
    /// `RLHF_KERNELS_BACKEND=cpu` is set.
    DisabledByEnv,
    /// Built without nvcc, so no kernel is embedded.
    KernelsNotBuilt,
    /// No libcuda on this machine.
    NoDriver,
    /// The driver reports no device.
    NoDevice,
    /// A driver call failed (message included).
    Driver(String),
}

impl fmt::Display for CudaUnavailable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CudaUnavailable::FeatureDisabled => {
                f.write_str("built without the `cuda` feature (enable it: it is on by default)")
            }
            CudaUnavailable::DisabledByEnv => f.write_str("RLHF_KERNELS_BACKEND=cpu is set"),
            CudaUnavailable::KernelsNotBuilt => f.write_str(
                "kernels not built (no nvcc at build time): run scripts/install-nvcc.sh and rebuild",
            ),
            CudaUnavailable::NoDriver => f.write_str("no CUDA driver (libcuda) on this machine"),
            CudaUnavailable::NoDevice => f.write_str("the CUDA driver reports no GPU"),
            CudaUnavailable::Driver(m) => write!(f, "CUDA driver error: {m}"),
        }
    }
}

impl Backend {
    /// CUDA device 0 when it is usable, else the CPU. Never fails.
    pub fn best() -> Backend {
        Self::best_with_reason().0
    }

    /// Like [`best`](Self::best), and says why CUDA was not chosen.
    ///
    /// Rules, in order: `RLHF_KERNELS_BACKEND=cpu` forces the CPU; without the `cuda`
    /// feature, without embedded kernels, without libcuda or without a GPU the CPU is used;
    /// otherwise device 0 (`RLHF_KERNELS_DEVICE` picks another ordinal) with its modules
    /// loaded.
    pub fn best_with_reason() -> (Backend, Option<CudaUnavailable>) {
        if std::env::var("RLHF_KERNELS_BACKEND").is_ok_and(|v| v.eq_ignore_ascii_case("cpu")) {
            return (Backend::Cpu, Some(CudaUnavailable::DisabledByEnv));
        }
        #[cfg(feature = "cuda")]
        {
            let ordinal = std::env::var("RLHF_KERNELS_DEVICE").ok().and_then(|v| v.parse().ok()).unwrap_or(0);
            match crate::cuda::CudaDevice::new(ordinal) {
                Ok(device) => (Backend::Cuda(device), None),
                Err(e) => (Backend::Cpu, Some(CudaUnavailable::from_error(&e))),
            }
        }
        #[cfg(not(feature = "cuda"))]
        (Backend::Cpu, Some(CudaUnavailable::FeatureDisabled))
    }

    /// One line for logs: "cpu (2 threads, avx512)" or "cuda:0 NVIDIA H100 (sm_90)".
    pub fn describe(&self) -> String {
        match self {
            Backend::Cpu => crate::cpu::describe(),
            #[cfg(feature = "cuda")]
            Backend::Cuda(device) => device.describe(),
        }
    }

    /// True when the backend is a GPU.
    pub fn is_cuda(&self) -> bool {
        !matches!(self, Backend::Cpu)
    }

    /// Runs `job` here: on a [`CpuExecutor`](crate::cpu::CpuExecutor), or on a
    /// `cuda::CudaExecutor` over the device's stream (checked with
    /// [`finish`](crate::Executor::finish) after the job returns).
    ///
    /// ```
    /// use rlhf_kernels::{Backend, Executor, Job, Result};
    /// struct Roundtrip;
    /// impl Job for Roundtrip {
    ///     type Output = Vec<f32>;
    ///     fn run<E: Executor>(self, e: &mut E) -> Result<Vec<f32>> {
    ///         let buf = e.upload(&[1.0f32, 2.0])?;
    ///         e.download(&buf)
    ///     }
    /// }
    /// assert_eq!(Backend::Cpu.run(Roundtrip)?, [1.0, 2.0]);
    /// # Ok::<(), rlhf_kernels::Error>(())
    /// ```
    pub fn run<J: Job>(&self, job: J) -> crate::Result<J::Output> {
        match self {
            Backend::Cpu => job.run(&mut crate::cpu::CpuExecutor),
            #[cfg(feature = "cuda")]
            Backend::Cuda(device) => {
                let mut e = crate::cuda::CudaExecutor::new(device)?;
                let out = job.run(&mut e)?;
                crate::Executor::finish(&mut e)?;
                Ok(out)
            }
        }
    }
}

impl CudaUnavailable {
    /// The reason behind an error of [`CudaDevice::new`](crate::cuda::CudaDevice::new).
    #[cfg(feature = "cuda")]
    pub fn from_error(e: &crate::Error) -> Self {
        use crate::Error;
        match e {
            Error::KernelsNotBuilt => CudaUnavailable::KernelsNotBuilt,
            Error::NoDriver => CudaUnavailable::NoDriver,
            Error::NoDevice { .. } => CudaUnavailable::NoDevice,
            other => CudaUnavailable::Driver(other.to_string()),
        }
    }
}
