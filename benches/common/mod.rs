//! Shared by the criterion benches: the shapes of benches/shapes.txt, byte counts and CUDA
//! event timing.
#![allow(dead_code)] // each bench uses part of this module

use rlhf_kernels::{DType, RowShape};

/// (shape, dtype) of every line of benches/shapes.txt for `op` on `device`.
pub fn shapes(op: &str, device: &str) -> Vec<(RowShape, DType)> {
    include_str!("../shapes.txt")
        .lines()
        .map(|l| l.split('#').next().unwrap_or("").split_whitespace().collect::<Vec<_>>())
        .filter(|w| w.len() == 5 && w[0] == op && w[1] == device)
        .map(|w| (RowShape::new(w[2].parse().unwrap(), w[3].parse().unwrap()), w[4].parse().unwrap()))
        .collect()
}

/// Benchmark id `device/dtype/NxV`.
pub fn id(device: &str, shape: RowShape, dtype: DType) -> criterion::BenchmarkId {
    criterion::BenchmarkId::new(device, format!("{dtype}/{}x{}", shape.rows, shape.cols))
}

pub fn config() -> criterion::Criterion {
    use std::time::Duration;
    criterion::Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
}

#[cfg(feature = "cuda")]
pub mod gpu {
    use std::sync::Arc;
    use std::time::Duration;

    use rlhf_kernels::cuda::CudaDevice;
    use rlhf_kernels::cudarc::driver::CudaStream;
    use rlhf_kernels::cudarc::driver::sys::CUevent_flags;

    /// The bench GPU, or `None` after printing why there is none.
    pub fn device() -> Option<CudaDevice> {
        match CudaDevice::new(0) {
            Ok(d) => Some(d),
            Err(e) => {
                eprintln!("skipped: CUDA benches: {e}");
                None
            }
        }
    }

    /// Times `iters` back-to-back launches with CUDA events: the kernels' own time, no host
    /// synchronisation inside the timed region.
    pub fn time_events(stream: &Arc<CudaStream>, iters: u64, mut launch: impl FnMut()) -> Duration {
        let flags = Some(CUevent_flags::CU_EVENT_DEFAULT);
        let start = stream.record_event(flags).unwrap();
        for _ in 0..iters {
            launch();
        }
        let end = stream.record_event(flags).unwrap();
        Duration::from_secs_f64(start.elapsed_ms(&end).unwrap() as f64 / 1e3)
    }
}
