//! Criterion benches of the PPO family on the shapes of benches/shapes.txt: the policy loss
//! (clipped surrogate with dual clip and the entropy bonus, token-mean; on the CPU also SAPO
//! and GMPO, sequence-mean-token-mean) writing both upstream gradients and the statistics, CPU
//! and CUDA. Throughput counts the bytes the op must move.

mod common;

use common::{config, id};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use rlhf_kernels::testing::Rng;
use rlhf_kernels::{
    Aggregation, DType, Element, FusedPolicyInputs, FusedPolicyOptions, PolicyLossInputs, PolicyLossOptions,
    PolicyLossOutputs, PolicyObjective, RowShape, Tokens, bf16, cpu, f16,
};

/// Tokens per sequence of the fused-path bench.
const SEQ_LEN: usize = 256;

/// Fused path: the logits read twice, the gradient written once, per-token inputs.
fn fused_bytes(shape: RowShape, dtype: DType) -> u64 {
    3 * shape.len() as u64 * dtype.size_bytes() as u64 + shape.rows as u64 * (8 + 1 + 4 + 4)
}

/// Logits, targets, old log-probs near the policy's and advantages for the fused path.
struct FusedData<T> {
    logits: Vec<T>,
    targets: Vec<i64>,
    mask: Vec<u8>,
    old: Vec<f32>,
    adv: Vec<f32>,
}

fn fused_data<T: Element>(shape: RowShape) -> FusedData<T> {
    let mut rng = Rng::new(8);
    let logits: Vec<T> = rng.logits(shape, 3.0);
    let targets: Vec<i64> = (0..shape.rows).map(|_| rng.below(shape.cols) as i64).collect();
    // Old log-probs: about the uniform policy's, the scale of these logits' log-probs.
    let old = (0..shape.rows).map(|_| -(shape.cols as f32).ln() + 0.3 * rng.normal() as f32).collect();
    FusedData { logits, targets, mask: vec![1; shape.rows], old, adv: rng.normals(shape.rows, 1.0) }
}

fn sequences(shape: RowShape) -> RowShape {
    RowShape::new(shape.rows / SEQ_LEN, SEQ_LEN)
}

/// logp, old_logp, advantages, entropy and mask read; two gradients written.
fn loss_bytes(shape: RowShape) -> u64 {
    shape.len() as u64 * (4 * 4 + 1 + 8)
}

struct Data {
    logp: Vec<f32>,
    old: Vec<f32>,
    adv: Vec<f32>,
    entropy: Vec<f32>,
    mask: Vec<u8>,
}

fn data(shape: RowShape) -> Data {
    let mut rng = Rng::new(7);
    let old: Vec<f32> = (0..shape.len()).map(|_| -(rng.uniform() * 5.0) as f32).collect();
    let logp = old.iter().map(|&o| o + ((rng.uniform() - 0.5) * 0.8) as f32).collect();
    let mask = (0..shape.rows)
        .flat_map(|_| {
            let len = shape.cols / 2 + rng.below(shape.cols / 2 + 1);
            (0..shape.cols).map(move |t| u8::from(t < len))
        })
        .collect();
    let entropy = (0..shape.len()).map(|_| (rng.uniform() * 3.0) as f32).collect();
    Data { logp, old, adv: rng.normals(shape.len(), 1.0), entropy, mask }
}

fn opts() -> PolicyLossOptions {
    PolicyLossOptions::default().dual_clip(Some(3.0)).entropy_coef(0.01)
}

/// The variants beside the clipped loss, on its shapes: (bench group, options).
fn variants() -> [(&'static str, PolicyLossOptions); 3] {
    let per_sequence = |o: PolicyObjective| {
        PolicyLossOptions::new(o).entropy_coef(0.01).aggregation(Aggregation::SeqMeanTokenMean)
    };
    [
        ("ppo_loss", opts()),
        ("ppo_loss_sapo", per_sequence(PolicyObjective::SAPO)),
        ("ppo_loss_gmpo", per_sequence(PolicyObjective::Gmpo).clip(0.4, 0.4)),
    ]
}

fn bench_cpu(c: &mut Criterion) {
    for (shape, _) in common::shapes("ppo_loss", "cpu") {
        let d = data(shape);
        let (mut g, mut h) = (vec![0.0f32; shape.len()], vec![0.0f32; shape.len()]);
        let inputs = PolicyLossInputs::new(shape, &d.logp, &d.old, &d.adv).mask(&d.mask).entropy(&d.entropy);
        for (name, opts) in variants() {
            let mut grp = c.benchmark_group(name);
            grp.throughput(Throughput::Bytes(loss_bytes(shape)));
            grp.bench_function(id("cpu", shape, DType::F32), |b| {
                b.iter(|| {
                    let out = PolicyLossOutputs::default().grad_logp(&mut g).grad_entropy(&mut h);
                    cpu::policy_loss(&inputs, out, &opts).unwrap()
                })
            });
            grp.finish();
        }
    }
    for (shape, dtype) in common::shapes("ppo_fused", "cpu") {
        match dtype {
            DType::F32 => bench_fused_cpu::<f32>(c, shape),
            DType::F16 => bench_fused_cpu::<f16>(c, shape),
            DType::BF16 => bench_fused_cpu::<bf16>(c, shape),
        }
    }
}

fn bench_fused_cpu<T: Element>(c: &mut Criterion, shape: RowShape) {
    let d = fused_data::<T>(shape);
    let mut grad = vec![T::default(); shape.len()];
    let tokens = Tokens::new(&d.targets).with_mask(&d.mask);
    let inputs = FusedPolicyInputs::new(tokens, sequences(shape), &d.old, &d.adv);
    let fused = FusedPolicyOptions::new(opts());
    let mut grp = c.benchmark_group("ppo_fused");
    grp.throughput(Throughput::Bytes(fused_bytes(shape, T::DTYPE)));
    grp.bench_function(id("cpu", shape, T::DTYPE), |b| {
        b.iter(|| cpu::policy_loss_from_logits(&d.logits, shape, &inputs, &mut grad, &fused).unwrap())
    });
    grp.finish();
}

#[cfg(feature = "cuda")]
mod gpu {
    use super::*;
    use crate::common::gpu::{bench_events, device};
    use rlhf_kernels::PolicyLossStats;
    use rlhf_kernels::cuda::{self, DeviceFusedStats, DeviceStats, LaunchContext};
    use rlhf_kernels::cudarc::driver::CudaStream;
    use std::sync::Arc;

    pub fn bench_cuda(c: &mut Criterion) {
        let Some(device) = device() else { return };
        let s = device.stream().clone();
        let mut ctx = LaunchContext::new(&s).unwrap();
        for (shape, _) in common::shapes("ppo_loss", "cuda") {
            let d = data(shape);
            let up = |v: &[f32]| s.clone_htod(v).unwrap();
            let (lp, old, adv, ent) = (up(&d.logp), up(&d.old), up(&d.adv), up(&d.entropy));
            let mask = s.clone_htod(&d.mask).unwrap();
            let (mut g, mut h) =
                (s.alloc_zeros::<f32>(shape.len()).unwrap(), s.alloc_zeros::<f32>(shape.len()).unwrap());
            let mut ws = s.alloc_zeros::<u8>(cuda::policy_loss_workspace_bytes(shape)).unwrap();
            let mut stats = DeviceStats::<PolicyLossStats>::new(&s).unwrap();
            let inputs = PolicyLossInputs {
                shape,
                logp: lp.as_view(),
                old_logp: old.as_view(),
                advantages: adv.as_view(),
                mask: Some(mask.as_view()),
                entropy: Some(ent.as_view()),
            };
            bench_events(c, "ppo_loss", shape, DType::F32, loss_bytes(shape), &s, || {
                let out = PolicyLossOutputs {
                    grad_logp: Some(g.as_view_mut()),
                    grad_entropy: Some(h.as_view_mut()),
                    stats: Some(&mut stats),
                    workspace: Some(ws.as_view_mut()),
                    ..Default::default()
                };
                cuda::policy_loss(&mut ctx, &inputs, out, &opts()).unwrap()
            });
        }
        for (shape, dtype) in common::shapes("ppo_fused", "cuda") {
            match dtype {
                DType::F32 => bench_fused::<f32>(c, &s, shape),
                DType::F16 => bench_fused::<f16>(c, &s, shape),
                DType::BF16 => bench_fused::<bf16>(c, &s, shape),
            }
        }
        ctx.check().unwrap();
    }

    fn bench_fused<T: Element>(c: &mut Criterion, s: &Arc<CudaStream>, shape: RowShape) {
        let d = fused_data::<T>(shape);
        let logits = s.clone_htod(&d.logits).unwrap();
        let (targets, mask) = (s.clone_htod(&d.targets).unwrap(), s.clone_htod(&d.mask).unwrap());
        let (old, adv) = (s.clone_htod(&d.old).unwrap(), s.clone_htod(&d.adv).unwrap());
        let mut grad = s.alloc_zeros::<T>(shape.len()).unwrap();
        let (mut stats, mut ctx) = (DeviceFusedStats::new(s).unwrap(), LaunchContext::new(s).unwrap());
        let inputs =
            FusedPolicyInputs::new(Tokens::new(&targets).with_mask(&mask), sequences(shape), &old, &adv);
        let fused = FusedPolicyOptions::new(opts());
        bench_events(c, "ppo_fused", shape, T::DTYPE, fused_bytes(shape, T::DTYPE), s, || {
            cuda::policy_loss_from_logits(&mut ctx, &logits, shape, &inputs, &mut grad, &mut stats, &fused)
                .unwrap()
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
