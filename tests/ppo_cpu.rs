//! The CPU PPO family held to the f64 reference: every objective × aggregation × normaliser,
//! each clip branch against finite differences, micro-batches that add up under the global
//! normaliser, the value loss, and every error path.

mod common;

use common::cpu::Cpu;
use common::ppo::{self, PolicyCase, PpoBackend};
use rlhf_kernels::{PolicyLossOptions, RowShape, bf16};

#[test]
fn fused_path_equals_the_composed_reference() {
    ppo::fused_path::<f32>(&Cpu);
    ppo::fused_path::<bf16>(&Cpu);
}

#[test]
fn policy_loss_matches_the_reference() {
    ppo::policy_sweep(&Cpu);
}

#[test]
fn every_branch_has_the_exact_gradient() {
    ppo::policy_branches(&Cpu);
}

#[test]
fn micro_batches_add_up_under_the_global_normaliser() {
    ppo::micro_batches(&Cpu);
}

#[test]
fn policy_loss_errors() {
    ppo::policy_errors(&Cpu);
}

#[test]
fn gradients_accumulate_onto_the_buffers() {
    ppo::accumulate(&Cpu);
}

#[test]
fn value_loss() {
    ppo::value_cases(&Cpu);
}

/// Two runs are bitwise equal (rows reduce in a fixed order whatever the thread count).
#[test]
fn policy_loss_is_deterministic() {
    let c = PolicyCase::random(RowShape::new(64, 500), 3);
    let opts = PolicyLossOptions::default().entropy_coef(0.01);
    let (a, b) = (Cpu.policy(&c, &opts).unwrap(), Cpu.policy(&c, &opts).unwrap());
    assert_eq!(a.stats.loss.to_bits(), b.stats.loss.to_bits());
    assert!(a.grad_logp.iter().zip(&b.grad_logp).all(|(x, y)| x.to_bits() == y.to_bits()));
}
