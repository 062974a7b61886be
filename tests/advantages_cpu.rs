//! The CPU advantages family held to the f64 reference and to hand-computed cases: GAE (every
//! mask layout, both conventions, γ/λ corners, 128k-long sequences), the group estimators,
//! masked moments and whitening, and every error path.

mod common;

use common::advantages::{self as adv, AdvantagesBackend, GaeCase};
use common::cpu::Cpu;
use rlhf_kernels::{GaeOptions, GroupAdvantageOptions, Groups, RowShape, WhitenOptions, cpu};
use rlhf_kernels::{GaeOutputs, GroupAdvantageOutputs};

#[test]
fn overlong_shaping() {
    adv::overlong(&Cpu);
}

#[test]
fn gae_sweep() {
    adv::gae_sweep(&Cpu);
}

#[test]
fn gae_by_hand() {
    adv::gae_by_hand(&Cpu);
}

#[test]
fn gae_long_sequences() {
    adv::gae_long(&Cpu);
}

#[test]
fn gae_errors() {
    adv::gae_errors(&Cpu);
}

#[test]
fn gae_batch_invariance() {
    adv::gae_batch_invariance(&Cpu);
}

#[test]
fn groups_by_hand() {
    adv::groups_by_hand(&Cpu);
}

#[test]
fn groups_random() {
    adv::groups_random(&Cpu);
}

#[test]
fn group_errors() {
    adv::group_errors(&Cpu);
}

#[test]
fn moments_and_whitening() {
    adv::moments_and_whitening(&Cpu);
}

/// The CPU runs the recurrence in f64: within one f32 rounding of the reference, far inside
/// the GPU's bound.
#[test]
fn gae_cpu_is_within_one_rounding() {
    let c = GaeCase::random(RowShape::new(4, 3000), adv::MaskKind::Holes, 4);
    let opts = GaeOptions::new(0.99, 0.95);
    let expected = rlhf_kernels::reference::gae(&c.inputs(), &opts).unwrap();
    let (a, _) = Cpu.gae(&c, &opts).unwrap();
    for (g, e) in a.iter().zip(&expected.advantages) {
        assert_eq!(*g, *e as f32, "not the f64 result rounded once");
    }
}

/// REINFORCE++ and REINFORCE++-baseline as the module docs compose them, against the
/// reference composition.
#[test]
fn reinforce_plus_plus_recipes() {
    let shape = RowShape::new(6, 9);
    let c = GaeCase::random(shape, adv::MaskKind::RightPadded, 12);
    let mask = c.mask.clone().unwrap();
    // REINFORCE++: discounted returns of the token rewards, then batch whitening.
    let opts = GaeOptions::discounted_returns(0.99).masked_steps(rlhf_kernels::MaskedSteps::Reset);
    let returns_only = GaeCase { values: None, ..c.clone() };
    let mut g = vec![0.0f32; shape.len()];
    cpu::gae(&returns_only.inputs(), GaeOutputs::default().advantages(&mut g), &opts).unwrap();
    let exp = rlhf_kernels::reference::gae(&returns_only.inputs(), &opts).unwrap().advantages;
    let exp: Vec<f32> = exp.iter().map(|&x| x as f32).collect();
    let want = rlhf_kernels::reference::whiten(&exp, shape, Some(&mask), &WhitenOptions::default()).unwrap();
    cpu::whiten(&mut g, shape, Some(&mask), &WhitenOptions::default()).unwrap();
    let tol = rlhf_kernels::testing::Tolerance::for_dtype(rlhf_kernels::DType::F32).scaled(10.0);
    rlhf_kernels::testing::assert_close(&g, &want, tol, "REINFORCE++");
    // REINFORCE++-baseline: group mean subtracted, broadcast, then whitened.
    let groups = Groups::new(&[0, 1, 0, 1, 2, 2], 3).unwrap();
    let scores = c.scores.clone().unwrap();
    let mut tokens = vec![0.0f32; shape.len()];
    let out = GroupAdvantageOutputs::default().per_token(&mut tokens, shape, Some(&mask));
    cpu::group_advantages(&scores, &groups, out, &GroupAdvantageOptions::group_mean()).unwrap();
    cpu::whiten(&mut tokens, shape, Some(&mask), &WhitenOptions::default()).unwrap();
    let base =
        rlhf_kernels::reference::group_advantages(&scores, &groups, &GroupAdvantageOptions::group_mean())
            .unwrap();
    let broadcast: Vec<f32> =
        (0..shape.len()).map(|t| if mask[t] != 0 { base[t / shape.cols] as f32 } else { 0.0 }).collect();
    let want =
        rlhf_kernels::reference::whiten(&broadcast, shape, Some(&mask), &WhitenOptions::default()).unwrap();
    rlhf_kernels::testing::assert_close(&tokens, &want, tol, "REINFORCE++-baseline");
}
