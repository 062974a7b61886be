//! Criterion benches of the token log-probs forward (logp alone, logp + entropy) and backward
//! (out of place and in place) on the shapes of benches/shapes.txt, CPU and CUDA.
//! Throughput counts the bytes each op must move: the logits read once (and the gradient
//! written once), plus the per-row vectors.

mod common;

use common::{config, id};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use rlhf_kernels::testing::Rng;
use rlhf_kernels::{
    DType, Element, RowShape, TokenGrads, TokenLogprobsOptions, TokenOutputs, Tokens, bf16, cpu, f16,
};

/// Bytes of (logp forward, logp + entropy forward, backward with both upstream gradients).
fn bytes(shape: RowShape, dtype: DType) -> [u64; 3] {
    let (n, rows, t) = (shape.len() as u64, shape.rows as u64, dtype.size_bytes() as u64);
    [n * t + rows * (8 + 4), n * t + rows * (8 + 8), 2 * n * t + rows * (8 + 16)]
}

struct Inputs<T> {
    logits: Vec<T>,
    targets: Vec<i64>,
    grad_logp: Vec<f32>,
    grad_entropy: Vec<f32>,
}

fn inputs<T: Element>(shape: RowShape) -> Inputs<T> {
    let mut rng = Rng::new(0);
    Inputs {
        logits: rng.logits(shape, 3.0),
        targets: (0..shape.rows).map(|_| rng.below(shape.cols) as i64).collect(),
        grad_logp: rng.normals(shape.rows, 1.0),
        grad_entropy: rng.normals(shape.rows, 0.1),
    }
}

fn bench_cpu(c: &mut Criterion) {
    for (shape, dtype) in common::shapes("token_logprobs", "cpu") {
        match dtype {
            DType::F32 => bench_cpu_typed::<f32>(c, shape),
            DType::F16 => bench_cpu_typed::<f16>(c, shape),
            DType::BF16 => bench_cpu_typed::<bf16>(c, shape),
        }
    }
}

fn bench_cpu_typed<T: Element>(c: &mut Criterion, shape: RowShape) {
    let inp = inputs::<T>(shape);
    let tokens = Tokens::new(&inp.targets);
    let opts = TokenLogprobsOptions::default();
    let n = shape.rows;
    let (mut logp, mut entropy, mut lse) = (vec![0.0f32; n], vec![0.0f32; n], vec![0.0f32; n]);
    let [fwd, fwd_h, bwd] = bytes(shape, T::DTYPE);
    let dev = "cpu";

    let mut g = c.benchmark_group("token_logprobs_fwd");
    g.throughput(Throughput::Bytes(fwd));
    g.bench_function(id(dev, shape, T::DTYPE), |b| {
        b.iter(|| {
            cpu::token_logprobs(&inp.logits, shape, &tokens, TokenOutputs::default().logp(&mut logp), &opts)
                .unwrap()
        })
    });
    g.finish();

    let mut g = c.benchmark_group("token_logprobs_entropy_fwd");
    g.throughput(Throughput::Bytes(fwd_h));
    g.bench_function(id(dev, shape, T::DTYPE), |b| {
        b.iter(|| {
            let out = TokenOutputs::default().logp(&mut logp).entropy(&mut entropy).lse(&mut lse);
            cpu::token_logprobs(&inp.logits, shape, &tokens, out, &opts).unwrap()
        })
    });
    g.finish();

    let grads = TokenGrads::new(&lse).grad_logp(&inp.grad_logp).grad_entropy(&inp.grad_entropy, &entropy);
    let mut grad = vec![T::default(); shape.len()];
    let mut g = c.benchmark_group("token_logprobs_bwd");
    g.throughput(Throughput::Bytes(bwd));
    g.bench_function(id(dev, shape, T::DTYPE), |b| {
        b.iter(|| {
            cpu::token_logprobs_backward(&inp.logits, shape, &tokens, &grads, &mut grad, &opts).unwrap()
        })
    });
    g.finish();

    // In place overwrites the logits: each iteration starts from a fresh copy, timed apart.
    let mut g = c.benchmark_group("token_logprobs_bwd_inplace");
    g.throughput(Throughput::Bytes(bwd));
    g.bench_function(id(dev, shape, T::DTYPE), |b| {
        b.iter_batched_ref(
            || inp.logits.clone(),
            |x| cpu::token_logprobs_backward_in_place(x, shape, &tokens, &grads, &opts).unwrap(),
            criterion::BatchSize::LargeInput,
        )
    });
    g.finish();
}

#[cfg(feature = "cuda")]
mod gpu {
    use super::*;
    use crate::common::gpu::{bench_events, device};
    use rlhf_kernels::cuda::{self, LaunchContext};
    use rlhf_kernels::cudarc::driver::CudaStream;
    use rlhf_kernels::{TokenGrads, TokenOutputs, Tokens};
    use std::sync::Arc;

    pub fn bench_cuda(c: &mut Criterion) {
        let Some(device) = device() else { return };
        let s = device.stream().clone();
        for (shape, dtype) in common::shapes("token_logprobs", "cuda") {
            match dtype {
                DType::F32 => bench_typed::<f32>(c, &s, shape),
                DType::F16 => bench_typed::<f16>(c, &s, shape),
                DType::BF16 => bench_typed::<bf16>(c, &s, shape),
            }
        }
    }

    fn bench_typed<T: Element>(c: &mut Criterion, s: &Arc<CudaStream>, shape: RowShape) {
        let inp = inputs::<T>(shape);
        let n = shape.rows;
        let mut x = s.clone_htod(&inp.logits).unwrap();
        let targets = s.clone_htod(&inp.targets).unwrap();
        let (gl, gh) = (s.clone_htod(&inp.grad_logp).unwrap(), s.clone_htod(&inp.grad_entropy).unwrap());
        let (mut logp, mut entropy, mut lse) = (
            s.alloc_zeros::<f32>(n).unwrap(),
            s.alloc_zeros::<f32>(n).unwrap(),
            s.alloc_zeros::<f32>(n).unwrap(),
        );
        let mut grad = s.alloc_zeros::<T>(shape.len()).unwrap();
        let mut workspace =
            s.alloc_zeros::<u8>(cuda::token_logprobs_workspace_bytes(shape, T::DTYPE).max(1)).unwrap();
        let mut ctx = LaunchContext::new(s).unwrap();
        let tokens = Tokens::new(targets.as_view());
        let opts = TokenLogprobsOptions::default();
        let [fwd, fwd_h, bwd] = bytes(shape, T::DTYPE);

        bench_events(c, "token_logprobs_fwd", shape, T::DTYPE, fwd, s, || {
            let out = TokenOutputs::default().logp(logp.as_view_mut()).workspace(workspace.as_view_mut());
            cuda::token_logprobs(&mut ctx, &x, shape, &tokens, out, &opts).unwrap()
        });
        bench_events(c, "token_logprobs_entropy_fwd", shape, T::DTYPE, fwd_h, s, || {
            let out = TokenOutputs::default()
                .logp(logp.as_view_mut())
                .entropy(entropy.as_view_mut())
                .lse(lse.as_view_mut())
                .workspace(workspace.as_view_mut());
            cuda::token_logprobs(&mut ctx, &x, shape, &tokens, out, &opts).unwrap()
        });

        let grads = TokenGrads::new(lse.as_view())
            .grad_logp(gl.as_view())
            .grad_entropy(gh.as_view(), entropy.as_view());
        bench_events(c, "token_logprobs_bwd", shape, T::DTYPE, bwd, s, || {
            cuda::token_logprobs_backward(&mut ctx, &x, shape, &tokens, &grads, &mut grad, &opts).unwrap()
        });

        // In place: the first iteration turns the logits into gradients and later ones read
        // those; the traffic and the arithmetic are the same.
        bench_events(c, "token_logprobs_bwd_inplace", shape, T::DTYPE, bwd, s, || {
            cuda::token_logprobs_backward_in_place(&mut ctx, &mut x, shape, &tokens, &grads, &opts).unwrap()
        });
        // The in-place runs fed gradients back in as logits, which may leave non-finite rows:
        // clear the word rather than report them as errors of the benchmark.
        let _ = ctx.check();
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
