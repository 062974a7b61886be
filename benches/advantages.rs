//! Criterion benches of the advantages family on the shapes of benches/shapes.txt: GAE +
//! returns over `[B, T]` (rewards, values, a right-padded mask) and GRPO over 64k sequence
//! scores in interleaved groups of 16, CPU and CUDA. Throughput counts the bytes each op must
//! move.

mod common;

use common::{config, id};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use rlhf_kernels::testing::Rng;
use rlhf_kernels::{DType, GaeInputs, GaeOptions, GroupAdvantageOptions, Groups, RowShape, cpu};
use rlhf_kernels::{GaeOutputs, GroupAdvantageOutputs};

/// Groups of the GRPO bench.
const GROUP_SIZE: usize = 16;

/// GAE: rewards, values and mask read; advantages and returns written.
fn gae_bytes(shape: RowShape) -> u64 {
    shape.len() as u64 * (4 + 4 + 1 + 4 + 4)
}

/// GRPO: scores and ids read, advantages written (the group lists are as large as the ids).
fn grpo_bytes(sequences: usize) -> u64 {
    sequences as u64 * (4 + 4 + 4)
}

struct GaeData {
    rewards: Vec<f32>,
    values: Vec<f32>,
    mask: Vec<u8>,
}

fn gae_data(shape: RowShape) -> GaeData {
    let mut rng = Rng::new(5);
    let mask = (0..shape.rows)
        .flat_map(|_| {
            let len = shape.cols / 2 + rng.below(shape.cols / 2 + 1);
            (0..shape.cols).map(move |t| u8::from(t < len))
        })
        .collect();
    GaeData { rewards: rng.normals(shape.len(), 0.1), values: rng.normals(shape.len(), 1.0), mask }
}

fn grpo_data(sequences: usize) -> (Vec<f32>, Groups) {
    let prompts = sequences / GROUP_SIZE;
    let ids: Vec<u32> = (0..sequences).map(|i| (i % prompts) as u32).collect();
    (Rng::new(6).normals(sequences, 1.0), Groups::new(&ids, prompts).unwrap())
}

fn opts() -> GaeOptions {
    GaeOptions::new(1.0, 0.95)
}

fn bench_cpu(c: &mut Criterion) {
    for (shape, _) in common::shapes("gae", "cpu") {
        let d = gae_data(shape);
        let (mut a, mut r) = (vec![0.0f32; shape.len()], vec![0.0f32; shape.len()]);
        let inputs = GaeInputs::new(shape).rewards(&d.rewards).values(&d.values).mask(&d.mask);
        let mut grp = c.benchmark_group("gae");
        grp.throughput(Throughput::Bytes(gae_bytes(shape)));
        grp.bench_function(id("cpu", shape, DType::F32), |b| {
            b.iter(|| {
                cpu::gae(&inputs, GaeOutputs::default().advantages(&mut a).returns(&mut r), &opts()).unwrap()
            })
        });
        grp.finish();
    }
    for (shape, _) in common::shapes("grpo", "cpu") {
        let (scores, groups) = grpo_data(shape.rows);
        let mut a = vec![0.0f32; shape.rows];
        let mut grp = c.benchmark_group("grpo");
        grp.throughput(Throughput::Bytes(grpo_bytes(shape.rows)));
        grp.bench_function(id("cpu", shape, DType::F32), |b| {
            b.iter(|| {
                let out = GroupAdvantageOutputs::default().per_sequence(&mut a);
                cpu::group_advantages(&scores, &groups, out, &GroupAdvantageOptions::grpo()).unwrap()
            })
        });
        grp.finish();
    }
}

#[cfg(feature = "cuda")]
mod gpu {
    use super::*;
    use crate::common::gpu::{bench_events, device};
    use rlhf_kernels::cuda::{self, DeviceGroups, LaunchContext};
    use rlhf_kernels::{GaeInputs, GaeOutputs, GroupAdvantageOutputs};

    pub fn bench_cuda(c: &mut Criterion) {
        let Some(device) = device() else { return };
        let s = device.stream().clone();
        let mut ctx = LaunchContext::new(&s).unwrap();
        for (shape, _) in common::shapes("gae", "cuda") {
            let d = gae_data(shape);
            let (rw, v, m) = (
                s.clone_htod(&d.rewards).unwrap(),
                s.clone_htod(&d.values).unwrap(),
                s.clone_htod(&d.mask).unwrap(),
            );
            let (mut a, mut r) =
                (s.alloc_zeros::<f32>(shape.len()).unwrap(), s.alloc_zeros::<f32>(shape.len()).unwrap());
            let mut ws = s.alloc_zeros::<u8>(cuda::gae_workspace_bytes(shape).max(16)).unwrap();
            let inputs = GaeInputs::new(shape).rewards(rw.as_view()).values(v.as_view()).mask(m.as_view());
            bench_events(c, "gae", shape, DType::F32, gae_bytes(shape), &s, || {
                let out = GaeOutputs::default()
                    .advantages(a.as_view_mut())
                    .returns(r.as_view_mut())
                    .workspace(ws.as_view_mut());
                cuda::gae(&mut ctx, &inputs, out, &opts()).unwrap()
            });
        }
        for (shape, _) in common::shapes("grpo", "cuda") {
            let (scores, groups) = grpo_data(shape.rows);
            let sc = s.clone_htod(&scores).unwrap();
            let dg = DeviceGroups::new(&s, &groups).unwrap();
            let mut a = s.alloc_zeros::<f32>(shape.rows).unwrap();
            bench_events(c, "grpo", shape, DType::F32, grpo_bytes(shape.rows), &s, || {
                let out = GroupAdvantageOutputs::default().per_sequence(a.as_view_mut());
                let opts = GroupAdvantageOptions::grpo();
                cuda::group_advantages(&mut ctx, &sc.as_view(), &dg, out, &opts).unwrap()
            });
        }
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
