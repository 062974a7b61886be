//! Criterion benches of the log-softmax forward and backward on the shapes of
//! benches/shapes.txt, on the CPU and (when a GPU is usable) with CUDA, plus the GPU's
//! device-to-device copy bandwidth as the yardstick. Throughput counts the bytes each op must
//! move: every input read once, every output written once.
//!
//! `cargo bench --bench logsoftmax -- cpu` runs the CPU cases only; scripts/bench-cpu.sh
//! puts them beside PyTorch's.

use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use rlhf_kernels::testing::Rng;
use rlhf_kernels::{DType, Element, LogSoftmaxOptions, RowShape, bf16, cpu, f16};

/// (device, shape, dtype) of every `log_softmax` line of benches/shapes.txt.
fn shapes(device: &str) -> Vec<(RowShape, DType)> {
    include_str!("shapes.txt")
        .lines()
        .map(|l| l.split('#').next().unwrap_or("").split_whitespace().collect::<Vec<_>>())
        .filter(|w| w.len() == 5 && w[0] == "log_softmax" && w[1] == device)
        .map(|w| (RowShape::new(w[2].parse().unwrap(), w[3].parse().unwrap()), w[4].parse().unwrap()))
        .collect()
}

fn id(device: &str, shape: RowShape, dtype: DType) -> BenchmarkId {
    BenchmarkId::new(device, format!("{dtype}/{}x{}", shape.rows, shape.cols))
}

fn bytes(shape: RowShape, dtype: DType) -> (u64, u64) {
    let n = shape.len() as u64;
    let t = dtype.size_bytes() as u64;
    (n * (t + 4), n * (4 + 4 + t))
}

fn bench_cpu(c: &mut Criterion) {
    for (shape, dtype) in shapes("cpu") {
        match dtype {
            DType::F32 => bench_cpu_typed::<f32>(c, shape),
            DType::F16 => bench_cpu_typed::<f16>(c, shape),
            DType::BF16 => bench_cpu_typed::<bf16>(c, shape),
        }
    }
}

fn bench_cpu_typed<T: Element>(c: &mut Criterion, shape: RowShape) {
    let mut rng = Rng::new(0);
    let logits: Vec<T> = rng.logits(shape, 3.0);
    let grad_out = rng.normals(shape.len(), 1.0);
    let opts = LogSoftmaxOptions::default();
    let mut out = vec![0.0f32; shape.len()];
    let mut grad = vec![T::default(); shape.len()];
    let (fwd_bytes, bwd_bytes) = bytes(shape, T::DTYPE);

    let mut g = c.benchmark_group("log_softmax_fwd");
    g.throughput(Throughput::Bytes(fwd_bytes));
    g.bench_function(id("cpu", shape, T::DTYPE), |b| {
        b.iter(|| cpu::log_softmax(&logits, shape, &mut out, &opts).unwrap())
    });
    g.finish();

    let mut g = c.benchmark_group("log_softmax_bwd");
    g.throughput(Throughput::Bytes(bwd_bytes));
    g.bench_function(id("cpu", shape, T::DTYPE), |b| {
        b.iter(|| cpu::log_softmax_backward(&out, &grad_out, shape, &mut grad, &opts).unwrap())
    });
    g.finish();
}

#[cfg(feature = "cuda")]
mod gpu {
    use super::*;
    use rlhf_kernels::cuda::{self, CudaDevice, CudaStatus};
    use rlhf_kernels::cudarc::driver::sys::CUevent_flags;
    use rlhf_kernels::cudarc::driver::{CudaStream, DeviceRepr};
    use std::sync::Arc;

    /// Times `iters` back-to-back launches with CUDA events (the kernels' own time, no host
    /// synchronisation inside the timed region).
    fn time_events(stream: &Arc<CudaStream>, iters: u64, mut launch: impl FnMut()) -> Duration {
        let flags = Some(CUevent_flags::CU_EVENT_DEFAULT);
        let start = stream.record_event(flags).unwrap();
        for _ in 0..iters {
            launch();
        }
        let end = stream.record_event(flags).unwrap();
        Duration::from_secs_f64(start.elapsed_ms(&end).unwrap() as f64 / 1e3)
    }

    fn upload<T: DeviceRepr>(
        stream: &Arc<CudaStream>,
        v: &[T],
    ) -> rlhf_kernels::cudarc::driver::CudaSlice<T> {
        stream.clone_htod(v).unwrap()
    }

    pub fn bench_cuda(c: &mut Criterion) {
        let device = match CudaDevice::new(0) {
            Ok(d) => d,
            Err(e) => {
                eprintln!("skipped: CUDA benches: {e}");
                return;
            }
        };
        let s = device.stream().clone();
        bench_copy(c, &s);
        for (shape, dtype) in shapes("cuda") {
            match dtype {
                DType::F32 => bench_typed::<f32>(c, &s, shape),
                DType::F16 => bench_typed::<f16>(c, &s, shape),
                DType::BF16 => bench_typed::<bf16>(c, &s, shape),
            }
        }
    }

    /// Device-to-device copy of 1 GiB: the bandwidth every kernel is compared with.
    fn bench_copy(c: &mut Criterion, s: &Arc<CudaStream>) {
        let n = 1usize << 28;
        let src = s.alloc_zeros::<f32>(n).unwrap();
        let mut dst = s.alloc_zeros::<f32>(n).unwrap();
        let mut g = c.benchmark_group("copy");
        g.throughput(Throughput::Bytes(2 * 4 * n as u64));
        g.bench_function("cuda/d2d/1GiB", |b| {
            b.iter_custom(|iters| time_events(s, iters, || s.memcpy_dtod(&src, &mut dst).unwrap()))
        });
        g.finish();
    }

    fn bench_typed<T: Element>(c: &mut Criterion, s: &Arc<CudaStream>, shape: RowShape) {
        let mut rng = Rng::new(0);
        let x = upload(s, &rng.logits::<T>(shape, 3.0));
        let g_out = upload(s, &rng.normals(shape.len(), 1.0));
        let mut y = s.alloc_zeros::<f32>(shape.len()).unwrap();
        let mut dx = s.alloc_zeros::<T>(shape.len()).unwrap();
        let mut status = CudaStatus::new(s).unwrap();
        let opts = LogSoftmaxOptions::default();
        let (fwd_bytes, bwd_bytes) = bytes(shape, T::DTYPE);

        let mut g = c.benchmark_group("log_softmax_fwd");
        g.throughput(Throughput::Bytes(fwd_bytes));
        g.bench_function(id("cuda", shape, T::DTYPE), |b| {
            b.iter_custom(|iters| {
                time_events(s, iters, || cuda::log_softmax(s, &x, shape, &mut y, &mut status, &opts).unwrap())
            })
        });
        g.finish();

        let mut g = c.benchmark_group("log_softmax_bwd");
        g.throughput(Throughput::Bytes(bwd_bytes));
        g.bench_function(id("cuda", shape, T::DTYPE), |b| {
            b.iter_custom(|iters| {
                time_events(s, iters, || {
                    cuda::log_softmax_backward(s, &y, &g_out, shape, &mut dx, &mut status, &opts).unwrap()
                })
            })
        });
        g.finish();
        status.check(s).unwrap();
    }
}

#[cfg(feature = "cuda")]
use gpu::bench_cuda;

#[cfg(not(feature = "cuda"))]
fn bench_cuda(_: &mut Criterion) {
    eprintln!("skipped: CUDA benches: built without the `cuda` feature");
}

fn config() -> Criterion {
    Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
}

criterion_group! { name = benches; config = config(); targets = bench_cpu, bench_cuda }
criterion_main!(benches);
