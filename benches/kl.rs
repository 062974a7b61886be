//! Criterion benches of the KL family on the shapes of benches/shapes.txt: the sampled
//! estimator (values + gradient + statistics in one call; on the CPU also bias-corrected, with
//! `old_logp`) and the exact `KL[π‖π_ref]`
//! forward + backward (both logits rows bf16), CPU and CUDA. Throughput counts the bytes each
//! op must move.

mod common;

use common::{config, id};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use rlhf_kernels::testing::Rng;
use rlhf_kernels::{
    DType, Element, ExactDivergence, ExactKlOptions, KlEstimator, RowShape, SampledKlOptions, bf16, cpu, f16,
};
use rlhf_kernels::{ExactKlGrads, ExactKlOutputs, ReferenceRows, SampledKlInputs, SampledKlOutputs};

/// Sampled: logp, ref_logp and mask read; values and gradient written.
fn sampled_bytes(shape: RowShape) -> u64 {
    shape.len() as u64 * (4 + 4 + 1 + 4 + 4)
}

/// Exact forward + backward: both rows read twice, the gradient written once.
fn exact_bytes(shape: RowShape, dtype: DType) -> u64 {
    5 * shape.len() as u64 * dtype.size_bytes() as u64
}

struct SampledInputs {
    logp: Vec<f32>,
    ref_logp: Vec<f32>,
    mask: Vec<u8>,
    old_logp: Vec<f32>,
}

fn sampled_inputs(shape: RowShape) -> SampledInputs {
    let mut rng = Rng::new(1);
    let logp: Vec<f32> = (0..shape.len()).map(|_| -(rng.uniform() * 6.0) as f32).collect();
    let ref_logp = logp.iter().map(|&x| x + (rng.normal() * 0.3) as f32).collect();
    let mask = (0..shape.len()).map(|t| u8::from(t % shape.cols < shape.cols * 7 / 8)).collect();
    let old_logp = logp.iter().map(|&x| x + (rng.normal() * 0.2) as f32).collect();
    SampledInputs { logp, ref_logp, mask, old_logp }
}

fn bench_cpu(c: &mut Criterion) {
    for (shape, _) in common::shapes("sampled_kl", "cpu") {
        let inp = sampled_inputs(shape);
        let (mut v, mut g) = (vec![0.0f32; shape.len()], vec![0.0f32; shape.len()]);
        let plain = SampledKlInputs::new(shape, &inp.logp, &inp.ref_logp).mask(&inp.mask);
        let k3 = SampledKlOptions::new(KlEstimator::K3);
        let extra = shape.len() as u64 * 4; // old_logp read
        for (name, inputs, opts, bytes) in [
            ("sampled_kl", plain, k3, sampled_bytes(shape)),
            (
                "sampled_kl_bias_corrected",
                plain.old_logp(&inp.old_logp),
                k3.bias_correction(true),
                sampled_bytes(shape) + extra,
            ),
        ] {
            let mut grp = c.benchmark_group(name);
            grp.throughput(Throughput::Bytes(bytes));
            grp.bench_function(id("cpu", shape, DType::F32), |b| {
                b.iter(|| {
                    let out = SampledKlOutputs::default().values(&mut v).grad_logp(&mut g);
                    cpu::sampled_kl(&inputs, out, &opts).unwrap()
                })
            });
            grp.finish();
        }
    }
    for (shape, dtype) in common::shapes("exact_kl", "cpu") {
        match dtype {
            DType::F32 => bench_exact_cpu::<f32>(c, shape),
            DType::F16 => bench_exact_cpu::<f16>(c, shape),
            DType::BF16 => bench_exact_cpu::<bf16>(c, shape),
        }
    }
}

fn exact_inputs<T: Element>(shape: RowShape) -> (Vec<T>, Vec<T>) {
    let mut rng = Rng::new(2);
    let p: Vec<T> = rng.logits(shape, 3.0);
    let q = p.iter().map(|&x| T::from_f32(x.to_f32() + (rng.normal() * 0.5) as f32)).collect();
    (p, q)
}

fn bench_exact_cpu<T: Element>(c: &mut Criterion, shape: RowShape) {
    let (p, q) = exact_inputs::<T>(shape);
    let n = shape.rows;
    let opts = ExactKlOptions::new(ExactDivergence::PolicyRef);
    let (mut value, mut lp, mut lq) = (vec![0.0f32; n], vec![0.0f32; n], vec![0.0f32; n]);
    let mut grad = vec![T::default(); shape.len()];
    let g = vec![1.0f32 / n as f32; n];
    let reference = ReferenceRows::new(&q, shape);
    let mut grp = c.benchmark_group("exact_kl_fwd_bwd");
    grp.throughput(Throughput::Bytes(exact_bytes(shape, T::DTYPE)));
    grp.bench_function(id("cpu", shape, T::DTYPE), |b| {
        b.iter(|| {
            let out = ExactKlOutputs::default().value(&mut value).lse(&mut lp, &mut lq);
            cpu::exact_kl(&p, shape, &reference, out, &opts).unwrap();
            let grads = ExactKlGrads::new(&g, &lp, &lq).value(&value);
            cpu::exact_kl_backward(&p, shape, &reference, &grads, &mut grad, &opts).unwrap();
        })
    });
    grp.finish();
}

#[cfg(feature = "cuda")]
mod gpu {
    use super::*;
    use crate::common::gpu::{bench_events, device};
    use rlhf_kernels::SampledKlStats;
    use rlhf_kernels::cuda::{self, DeviceStats, LaunchContext};
    use rlhf_kernels::cudarc::driver::CudaStream;
    use rlhf_kernels::{ExactKlGrads, ReferenceRows};
    use rlhf_kernels::{ExactKlOutputs, SampledKlInputs, SampledKlOutputs};
    use std::sync::Arc;

    pub fn bench_cuda(c: &mut Criterion) {
        let Some(device) = device() else { return };
        let s = device.stream().clone();
        for (shape, _) in common::shapes("sampled_kl", "cuda") {
            bench_sampled(c, &s, shape);
        }
        for (shape, dtype) in common::shapes("exact_kl", "cuda") {
            match dtype {
                DType::F32 => bench_exact::<f32>(c, &s, shape),
                DType::F16 => bench_exact::<f16>(c, &s, shape),
                DType::BF16 => bench_exact::<bf16>(c, &s, shape),
            }
        }
    }

    fn bench_sampled(c: &mut Criterion, s: &Arc<CudaStream>, shape: RowShape) {
        let inp = sampled_inputs(shape);
        let (lp, rlp, mask) = (
            s.clone_htod(&inp.logp).unwrap(),
            s.clone_htod(&inp.ref_logp).unwrap(),
            s.clone_htod(&inp.mask).unwrap(),
        );
        let (mut v, mut g) =
            (s.alloc_zeros::<f32>(shape.len()).unwrap(), s.alloc_zeros::<f32>(shape.len()).unwrap());
        let mut ws = s.alloc_zeros::<u8>(cuda::sampled_kl_workspace_bytes(shape)).unwrap();
        let (mut stats, mut ctx) =
            (DeviceStats::<SampledKlStats>::new(s).unwrap(), LaunchContext::new(s).unwrap());
        let opts = SampledKlOptions::new(KlEstimator::K3);
        let inputs = SampledKlInputs {
            shape,
            logp: lp.as_view(),
            ref_logp: rlp.as_view(),
            mask: Some(mask.as_view()),
            old_logp: None,
        };
        bench_events(c, "sampled_kl", shape, DType::F32, sampled_bytes(shape), s, || {
            let out = SampledKlOutputs {
                values: Some(v.as_view_mut()),
                grad_logp: Some(g.as_view_mut()),
                stats: Some(&mut stats),
                workspace: Some(ws.as_view_mut()),
            };
            cuda::sampled_kl(&mut ctx, &inputs, out, &opts).unwrap()
        });
        ctx.check().unwrap();
    }

    fn bench_exact<T: Element>(c: &mut Criterion, s: &Arc<CudaStream>, shape: RowShape) {
        let (hp, hq) = exact_inputs::<T>(shape);
        let (p, q) = (s.clone_htod(&hp).unwrap(), s.clone_htod(&hq).unwrap());
        let n = shape.rows;
        let opts = ExactKlOptions::new(ExactDivergence::PolicyRef);
        let (mut value, mut lp, mut lq) = (
            s.alloc_zeros::<f32>(n).unwrap(),
            s.alloc_zeros::<f32>(n).unwrap(),
            s.alloc_zeros::<f32>(n).unwrap(),
        );
        let g = s.clone_htod(&vec![1.0f32 / n as f32; n]).unwrap();
        let mut grad = s.alloc_zeros::<T>(shape.len()).unwrap();
        let mut ws =
            s.alloc_zeros::<u8>(cuda::exact_kl_workspace_bytes(shape, opts.divergence).max(16)).unwrap();
        let mut ctx = LaunchContext::new(s).unwrap();
        let r = ReferenceRows { logits: q.as_view(), shape, mask: None };
        bench_events(c, "exact_kl_fwd_bwd", shape, T::DTYPE, exact_bytes(shape, T::DTYPE), s, || {
            let out = ExactKlOutputs {
                value: Some(value.as_view_mut()),
                policy_lse: Some(lp.as_view_mut()),
                ref_lse: Some(lq.as_view_mut()),
                policy_term: None,
                workspace: Some(ws.as_view_mut()),
                statistic: None,
            };
            cuda::exact_kl(&mut ctx, &p, shape, &r, out, &opts).unwrap();
            let grads = ExactKlGrads {
                grad: g.as_view(),
                policy_lse: lp.as_view(),
                ref_lse: lq.as_view(),
                value: Some(value.as_view()),
                policy_term: None,
            };
            cuda::exact_kl_backward(&mut ctx, &p, shape, &r, &grads, &mut grad, &opts).unwrap();
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
