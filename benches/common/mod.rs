//! Shared by the criterion benches: the shapes of benches/shapes.txt, byte counts and CUDA
//! event timing.
#![allow(dead_code)] // each bench uses part of this module

use rlhf_kernels::{DType, RowShape};

/// (shape, dtype) of every line of benches/shapes.txt for `op` on `device`.
///
/// `RLHF_KERNELS_BENCH_ROWS=cap` (the emulated traffic run, `scripts/emulator.sh traffic`) cuts
/// the shapes of 2^22 elements or more to 1024 rows: the same launch path (1024 rows and more
/// take the one-block-per-row path) and the same traffic per row, in a size the emulator can run.
pub fn shapes(op: &str, device: &str) -> Vec<(RowShape, DType)> {
    let cap = std::env::var("RLHF_KERNELS_BENCH_ROWS").is_ok_and(|v| v == "cap");
    include_str!("../shapes.txt")
        .lines()
        .map(|l| l.split('#').next().unwrap_or("").split_whitespace().collect::<Vec<_>>())
        .filter(|w| w.len() == 5 && w[0] == op && w[1] == device)
        .map(|w| {
            let (mut rows, cols): (usize, usize) = (w[2].parse().unwrap(), w[3].parse().unwrap());
            if cap && rows > 1024 && rows * cols >= 1 << 22 {
                rows = 1024;
            }
            (RowShape::new(rows, cols), w[4].parse().unwrap())
        })
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

    use criterion::{Criterion, Throughput};
    use rlhf_kernels::cuda::CudaDevice;
    use rlhf_kernels::cudarc::driver::CudaStream;
    use rlhf_kernels::cudarc::driver::sys::CUevent_flags;
    use rlhf_kernels::{DType, RowShape};

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

    /// One CUDA case of `group`: `Throughput::Bytes(bytes)` and [`time_events`] of `launch`.
    /// Under the emulated device's traffic mode (`RK_EMU_TRAFFIC`, `scripts/emulator.sh
    /// traffic`) each timing call's launches are framed in the traffic log by a `case` line
    /// (group, shape, dtype, the bytes the op must move) and an `end` line.
    pub fn bench_events(
        c: &mut Criterion,
        group: &str,
        shape: RowShape,
        dtype: DType,
        bytes: u64,
        stream: &Arc<CudaStream>,
        mut launch: impl FnMut(),
    ) {
        let mut g = c.benchmark_group(group);
        g.throughput(Throughput::Bytes(bytes));
        let case = format!("case {group} {}x{} {dtype} {bytes}", shape.rows, shape.cols);
        g.bench_function(super::id("cuda", shape, dtype), |b| {
            b.iter_custom(|iters| {
                traffic_line(&case);
                let t = time_events(stream, iters, &mut launch);
                traffic_line("end");
                t
            })
        });
        g.finish();
    }

    /// Appends a line to the emulator's traffic log when there is one.
    fn traffic_line(line: &str) {
        use std::io::Write as _;
        static PATH: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
        if let Some(path) = PATH.get_or_init(|| std::env::var("RK_EMU_TRAFFIC").ok()) {
            let mut f = std::fs::OpenOptions::new().create(true).append(true).open(path).unwrap();
            writeln!(f, "{line}").unwrap();
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
