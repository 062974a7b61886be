//! The CPU PPO family held to the f64 reference: every objective × aggregation × normaliser,
//! each clip branch against finite differences, micro-batches that add up under the global
//! normaliser, the value loss, and every error path.

mod common;

use common::ppo::{self, FusedBackend, FusedCase, PolicyCase, PolicyOut, PpoBackend, ValueCase};
use rlhf_kernels::{
    Element, FusedPolicyStats, PolicyLossOptions, Result, RowShape, TokenLogprobsOptions, ValueLossOptions,
    ValueLossStats, bf16, cpu,
};

struct Cpu;

/// The dense part of a strided buffer.
fn dense(v: &[f32], shape: RowShape) -> Vec<f32> {
    (0..shape.rows).flat_map(|r| v[shape.row_range(r)].iter().copied()).collect()
}

impl PpoBackend for Cpu {
    fn policy(&self, c: &PolicyCase, opts: &PolicyLossOptions) -> Result<PolicyOut> {
        let n = c.shape.min_len();
        let (mut l, mut g, mut h) = (vec![f32::NAN; n], vec![f32::NAN; n], vec![f32::NAN; n]);
        let out = cpu::PolicyLossOutputs::default().loss(&mut l).grad_logp(&mut g).grad_entropy(&mut h);
        let stats = cpu::policy_loss(&c.inputs(), out, opts)?;
        Ok(PolicyOut {
            loss: dense(&l, c.shape),
            grad_logp: dense(&g, c.shape),
            grad_entropy: dense(&h, c.shape),
            stats,
        })
    }

    fn policy_onto(
        &self,
        c: &PolicyCase,
        opts: &PolicyLossOptions,
        start: &[f32],
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        let (mut g, mut h) = (start.to_vec(), start.to_vec());
        let out = cpu::PolicyLossOutputs::default().grad_logp(&mut g).grad_entropy(&mut h).accumulate(true);
        cpu::policy_loss(&c.inputs(), out, opts)?;
        Ok((dense(&g, c.shape), dense(&h, c.shape)))
    }

    fn value(&self, c: &ValueCase, opts: &ValueLossOptions) -> Result<(Vec<f32>, Vec<f32>, ValueLossStats)> {
        let n = c.shape.min_len();
        let (mut l, mut g) = (vec![f32::NAN; n], vec![f32::NAN; n]);
        let stats = cpu::value_loss(
            &c.inputs(),
            cpu::ValueLossOutputs::default().loss(&mut l).grad_values(&mut g),
            opts,
        )?;
        Ok((dense(&l, c.shape), dense(&g, c.shape), stats))
    }
}

impl FusedBackend for Cpu {
    fn fused<T: Element>(
        &self,
        c: &FusedCase<T>,
        opts: &PolicyLossOptions,
        in_place: bool,
    ) -> Result<(Vec<T>, FusedPolicyStats)> {
        let inputs = c.inputs(ppo::fused_kl());
        let lp = TokenLogprobsOptions::default();
        if in_place {
            let mut logits = c.logits.clone();
            let stats = cpu::policy_loss_from_logits_in_place(&mut logits, c.shape, &inputs, &lp, opts)?;
            Ok((logits, stats))
        } else {
            let mut grad = vec![T::from_f32(f32::NAN); c.logits.len()];
            let stats = cpu::policy_loss_from_logits(&c.logits, c.shape, &inputs, &mut grad, &lp, opts)?;
            Ok((grad, stats))
        }
    }
}

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
