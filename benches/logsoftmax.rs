//! Criterion benches of the log-softmax forward and backward on the shapes of
//! benches/shapes.txt, on the CPU and (when a GPU is usable) with CUDA, plus the GPU's
//! device-to-device copy bandwidth as the yardstick. Throughput counts the bytes each op must
//! move: every input read once, every output written once.
//!
//! `cargo bench --bench logsoftmax -- cpu` runs the CPU cases only; scripts/bench-cpu.sh
//! puts them beside PyTorch's.

mod common;

use common::{config, id};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use rlhf_kernels::testing::Rng;
use rlhf_kernels::{DType, Element, LogSoftmaxOptions, RowShape, bf16, cpu, f16};

fn shapes(device: &str) -> Vec<(RowShape, DType)> {
    common::shapes("log_softmax", device)
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
    use crate::common::gpu::{bench_events, device, time_events};
    use rlhf_kernels::cuda::{self, LaunchContext};
    use rlhf_kernels::cudarc::driver::CudaStream;
    use std::sync::Arc;

    pub fn bench_cuda(c: &mut Criterion) {
        let Some(device) = device() else { return };
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
        let x = s.clone_htod(&rng.logits::<T>(shape, 3.0)).unwrap();
        let g_out = s.clone_htod(&rng.normals(shape.len(), 1.0)).unwrap();
        let mut y = s.alloc_zeros::<f32>(shape.len()).unwrap();
        let mut dx = s.alloc_zeros::<T>(shape.len()).unwrap();
        let mut ctx = LaunchContext::new(s).unwrap();
        let opts = LogSoftmaxOptions::default();
        let (fwd_bytes, bwd_bytes) = bytes(shape, T::DTYPE);

        bench_events(c, "log_softmax_fwd", shape, T::DTYPE, fwd_bytes, s, || {
            cuda::log_softmax(&mut ctx, &x, shape, &mut y, &opts).unwrap()
        });
        bench_events(c, "log_softmax_bwd", shape, T::DTYPE, bwd_bytes, s, || {
            cuda::log_softmax_backward(&mut ctx, &y, &g_out, shape, &mut dx, &opts).unwrap()
        });
        ctx.check().unwrap();
    }
}

#[cfg(feature = "cuda")]
use gpu::bench_cuda;

#[cfg(not(feature = "cuda"))]
fn bench_cuda(_: &mut Criterion) {
    eprintln!("skipped: CUDA benches: built without the `cuda` feature");
}

criterion_group! { name = benches; config = config(); targets = bench_cpu, bench_cuda }
criterion_main!(benches);
