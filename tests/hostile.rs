//! Hostile but finite input on the CPU backend and the f64 reference: the shared property tests
//! and named cases of `tests/common/hostile.rs` on [`Cpu`], the same random batches through every
//! reference entry point, and what only the host has (vocabulary shards merged on the host, the
//! KL controller, the GAE error scale, the dtype limits).

mod common;

use common::cpu::Cpu;
use common::hostile::{
    self, Allow, aggregation, check, divergence, estimator, f32s, gae_options, group_options, ok,
    policy_options, run, temperature, value_options,
};
use proptest::prelude::*;
use rlhf_kernels::{
    Error, ExactKlOptions, GaeInputs, GaeOptions, GroupAdvantageOptions, Groups, KlController,
    LogSoftmaxOptions, PolicyLossInputs, PolicyLossOptions, PolicyObjective, RowProblem, RowShape,
    SampledKlOptions, TokenLogprobsOptions, TokenOutputs, Tokens, ValueLossInputs, VocabPartial,
    WhitenOptions, cpu, reference,
};
use rlhf_kernels::{KlRewardsInputs, KlRewardsOptions, ReferenceRows, SampledKlInputs};

#[test]
fn logprobs_family() {
    hostile::logprobs_family(&Cpu, 400);
}

#[test]
fn kl_family() {
    hostile::kl_family(&Cpu, 400);
}

#[test]
fn advantages_family() {
    hostile::advantages_family(&Cpu, 400);
}

#[test]
fn ppo_family() {
    hostile::ppo_family(&Cpu, 400);
}

#[test]
fn named_cases() {
    hostile::named_cases(&Cpu);
}

/// Vocabulary shards of the same rows, merged on the host; an offset that would overflow the
/// global token id.
#[test]
fn vocab_shards() {
    run(400, |b| {
        let s = b.shape;
        let opts = TokenLogprobsOptions::default().temperature(temperature(b));
        let tokens = Tokens::new(&b.targets);
        let masked = Tokens::new(&b.targets).with_mask(&b.mask[..s.rows]);
        for tok in [&tokens, &masked] {
            if s.cols < 2 {
                continue;
            }
            let half = s.cols / 2;
            let left = RowShape::new(s.rows, half).with_row_stride(s.row_stride);
            let right = RowShape::new(s.rows, s.cols - half).with_row_stride(s.row_stride);
            let mut partials = vec![<VocabPartial as bytemuck::Zeroable>::zeroed(); 2 * s.rows];
            let (p0, p1) = partials.split_at_mut(s.rows);
            let first = ok(cpu::vocab_shard_partials(&b.a, left, tok, 0, p0, &opts));
            let second = ok(cpu::vocab_shard_partials(&b.a[half..], right, tok, half, p1, &opts));
            if first.is_some() && second.is_some() {
                let (mut logp, mut entropy, mut lse) =
                    (vec![0.0f32; s.rows], vec![0.0f32; s.rows], vec![0.0f32; s.rows]);
                let out = TokenOutputs::default().logp(&mut logp).entropy(&mut entropy).lse(&mut lse);
                if ok(cpu::finish_vocab_partials(&partials, 2, tok, out, &opts)).is_some() {
                    check("sharded logp", f32s(&logp), Allow::NegInf)?;
                    check("sharded entropy", f32s(&entropy), Allow::Finite)?;
                    check("sharded lse", f32s(&lse), Allow::Finite)?;
                }
            }
        }
        let mut partials = vec![<VocabPartial as bytemuck::Zeroable>::zeroed(); s.rows];
        let r = cpu::vocab_shard_partials(&b.a, s, &tokens, usize::MAX - s.cols / 2, &mut partials, &opts);
        prop_assert!(r.is_err(), "vocab_offset near usize::MAX accepted");
        Ok(())
    });
}

/// The same batches through the f64 reference of every family.
#[test]
fn reference_backend() {
    run(400, |b| {
        let s = b.shape;
        let tau = temperature(b);
        let ls = LogSoftmaxOptions::default().temperature(tau);
        if let Some(r) = ok(reference::log_softmax(&b.a, s, &ls)) {
            check("log_softmax", r, Allow::NegInf)?;
        }
        if let Some(r) = ok(reference::log_softmax_backward(&b.a, s, &b.b[..s.len()], &ls)) {
            check("log_softmax_backward", r, Allow::Finite)?;
        }
        let opts = TokenLogprobsOptions::default().temperature(tau);
        let tokens = Tokens::new(&b.targets);
        let masked = Tokens::new(&b.targets).with_mask(&b.mask[..s.rows]);
        for tok in [&tokens, &masked] {
            if let Some(r) = ok(reference::token_logprobs(&b.a, s, tok, &opts)) {
                check("logp", r.logp, Allow::NegInf)?;
                check("entropy", r.entropy, Allow::Finite)?;
                check("lse", r.lse, Allow::Finite)?;
            }
            if let Some(r) =
                ok(reference::token_logprobs_backward(&b.a, s, tok, Some(&b.scores), None, &opts))
            {
                check("token_logprobs_backward", r, Allow::Finite)?;
            }
        }

        let mask = &b.mask[..s.rows * s.row_stride];
        let coef = if b.pick[1] % 2 == 0 { 0.1 } else { b.scalars[1] };
        let clamp = |x: f32| if b.pick[2] % 3 == 0 { None } else { Some(x.abs().max(1e-3)) };
        let kopts = SampledKlOptions::new(estimator(b.pick[3]))
            .coef(coef)
            .log_ratio_clamp(clamp(b.scalars[2]))
            .value_clamp(clamp(b.scalars[3]))
            .aggregation(aggregation(b.pick[4], s.cols));
        if let Some(r) = ok(reference::sampled_kl(&SampledKlInputs::new(s, &b.a, &b.b).mask(mask), &kopts)) {
            check("sampled_kl", r.values.into_iter().chain(r.grad_logp), Allow::Finite)?;
            check("sampled_kl loss", [r.stats.loss], Allow::Finite)?;
        }
        if let Some(r) = ok(reference::kl_rewards(
            &KlRewardsInputs::new(s, &b.a, &b.scores).mask(mask),
            &KlRewardsOptions::new(b.scalars[4]),
        )) {
            check("kl_rewards", r, Allow::Finite)?;
        }
        let (divergence, value_allow) = divergence(b.pick[5]);
        let xopts = ExactKlOptions::new(divergence).temperature(tau);
        if let Some(r) = ok(reference::exact_kl(
            &b.a,
            s,
            &ReferenceRows::new(&b.b, s).with_mask(&b.mask[..s.rows]),
            &xopts,
        )) {
            check("exact_kl", r.value, value_allow)?;
            check("exact_kl lse", r.policy_lse.into_iter().chain(r.ref_lse), Allow::Finite)?;
        }

        let d = s.dense();
        let n = d.len();
        let gae = gae_options(b);
        let inputs = GaeInputs::new(d)
            .rewards(&b.a[..n])
            .values(&b.b[..n])
            .kl_penalty(&b.c[..n], b.scalars[2])
            .scores(&b.scores)
            .mask(&b.mask[..n]);
        if let Some(r) = ok(reference::gae(&inputs, &gae)) {
            check("gae", r.advantages.into_iter().chain(r.returns), Allow::Finite)?;
        }
        if let Some(e) = ok(rlhf_kernels::gae_error_scale(&inputs, &gae)) {
            check("gae_error_scale", e, Allow::Finite)?;
        }
        let ids: Vec<u32> = (0..d.rows as u32).map(|i| i % 2).collect();
        let groups = Groups::new(&ids, 2).unwrap();
        if let Some(r) = ok(reference::group_advantages(&b.scores, &groups, &group_options(b))) {
            check("group_advantages", r, Allow::Finite)?;
        }
        let wopts = WhitenOptions::default().keep_mean(b.pick[4] % 2 == 0).eps(b.scalars[4].abs());
        if let Some(r) = ok(reference::whiten(&b.a[..n], d, Some(&b.mask[..n]), &wopts)) {
            check("whiten", r, Allow::Finite)?;
        }

        let popts = policy_options(b, d.cols);
        let inputs = PolicyLossInputs::new(d, &b.a[..n], &b.b[..n], &b.c[..n]).mask(&b.mask[..n]);
        for inputs in [inputs, inputs.entropy(&b.c[..n])] {
            if let Some(r) = ok(reference::policy_loss(&inputs, &popts)) {
                check("policy loss", r.loss.into_iter().chain(r.grad_logp), Allow::Finite)?;
                check("policy stats", [r.stats.loss], Allow::Finite)?;
            }
        }
        let vin = ValueLossInputs {
            shape: d,
            values: &b.a[..n],
            old_values: &b.b[..n],
            returns: &b.c[..n],
            mask: Some(&b.mask[..n]),
        };
        if let Some(r) = ok(reference::value_loss(&vin, &value_options(b, d.cols))) {
            check("value loss", r.loss.into_iter().chain(r.grad_values), Allow::Finite)?;
        }
        Ok(())
    });
}

#[test]
fn kl_controller() {
    run(200, |b| {
        let (initial, target, horizon) = (b.scalars[0], b.scalars[1], b.scalars[2]);
        if let Some(mut c) = ok(KlController::adaptive(initial as f64, target as f64, horizon as f64)) {
            for (observed, n) in [(b.scalars[3], b.pick[0] as usize), (b.scalars[4], usize::MAX)] {
                if ok(c.update(observed as f64, n)).is_some() {
                    prop_assert!(c.value().is_finite() && c.value() > 0.0, "β = {}", c.value());
                }
            }
        }
        Ok(())
    });
}

/// The named cases of the shared module on the reference, and those only the host has.
#[test]
fn host_named_cases() {
    use RowProblem::{NonFinite, Overflow};
    let row = |op: &'static str, row: usize, problem| Error::InvalidRow { op, row, problem };
    let shape = RowShape::new(2, 2);
    let kl = [0.1f32, 0.2, f32::NAN, 0.3];
    let r =
        reference::kl_rewards(&KlRewardsInputs::new(shape, &kl, &[1.0, 1.0]), &KlRewardsOptions::new(0.1));
    assert_eq!(r, Err(row("kl_rewards", 1, NonFinite)));
    // KlController::adaptive with a NaN target.
    assert!(matches!(KlController::adaptive(0.1, f64::NAN, 1e4), Err(Error::InvalidOption { .. })));
    // gae_error_scale with a NaN.
    let values = [1.0f32, 2.0, f32::NAN, 3.0];
    let inputs = GaeInputs::new(shape).rewards(&values);
    let r = rlhf_kernels::gae_error_scale(&inputs, &GaeOptions::new(1.0, 0.95));
    assert_eq!(r, Err(row("gae", 1, NonFinite)));
    // policy_loss with log_ratio_clamp(80) and |A| = 1e4.
    let (logp, old, adv) = ([0.0f32, 100.0], [0.0f32, 0.0], [1.0f32, -1e4]);
    let inputs = PolicyLossInputs::new(RowShape::new(1, 2), &logp, &old, &adv);
    let opts = PolicyLossOptions::new(PolicyObjective::KlPenalty { beta: 0.1 }).log_ratio_clamp(Some(80.0));
    assert_eq!(reference::policy_loss(&inputs, &opts).map(|_| ()), Err(row("policy_loss", 0, Overflow)));
    // value_loss with ½·(v − R)² > 3.4e38.
    let vin = ValueLossInputs::new(shape, &[0.0, 0.0, 3e19, 0.0], &[0.0; 4], &[0.0; 4]);
    let r = reference::value_loss(&vin, &rlhf_kernels::ValueLossOptions::default());
    assert_eq!(r.map(|_| ()), Err(row("value_loss", 1, Overflow)));
    // token_logprobs with logits 1e30 and τ = 1e-9.
    let opts = TokenLogprobsOptions::default().temperature(1e-9);
    let r = reference::token_logprobs(&[1e30f32, 0.0], RowShape::new(1, 2), &Tokens::new(&[0i64]), &opts);
    assert_eq!(r.map(|_| ()), Err(row("token_logprobs", 0, Overflow)));
    // sampled_kl with β = 3e38.
    let opts = SampledKlOptions::new(rlhf_kernels::KlEstimator::K2).coef(3e38);
    let r = reference::sampled_kl(&SampledKlInputs::new(RowShape::new(1, 1), &[-3.0], &[-1.0]), &opts);
    assert_eq!(r.map(|_| ()), Err(row("sampled_kl", 0, Overflow)));
    // vocab_shard_partials with vocab_offset = usize::MAX.
    let mut partials = [<VocabPartial as bytemuck::Zeroable>::zeroed(); 1];
    let r = cpu::vocab_shard_partials(
        &[0.0f32, 1.0],
        RowShape::new(1, 2),
        &Tokens::new(&[1i64]),
        usize::MAX,
        &mut partials,
        &TokenLogprobsOptions::default(),
    );
    assert!(matches!(r, Err(Error::TooLarge { what: "vocab_offset + cols", .. })), "{r:?}");
    // Group advantages: a NaN names its own sequence; no spread at ε = 0 gives 0.
    let groups = Groups::new(&[0, 1, 0, 1], 2).unwrap();
    let r = reference::group_advantages(&[1.0, 2.0, 3.0, f32::NAN], &groups, &GroupAdvantageOptions::grpo());
    assert_eq!(r.map(|_| ()), Err(row("group_advantages", 3, NonFinite)));
    let r = reference::group_advantages(&[2.0; 4], &groups, &GroupAdvantageOptions::grpo().eps(0.0)).unwrap();
    assert_eq!(r, vec![0.0; 4]);
    // Element::fits: the last values that round to a finite f16 / bf16.
    use rlhf_kernels::{Element, bf16, f16};
    assert!(f16::fits(65519.996) && f16::from_f32(65519.996).to_f32().is_finite());
    assert!(!f16::fits(65520.0) && f16::from_f32(65520.0).to_f32().is_infinite());
    let (below, at) = (f32::from_bits(0x7F7F_7FFF), f32::from_bits(0x7F7F_8000));
    assert!(bf16::fits(below) && bf16::from_f32(below).to_f32().is_finite());
    assert!(!bf16::fits(at) && bf16::from_f32(at).to_f32().is_infinite());
    assert!(f32::fits(f32::MAX) && !f32::fits(f32::INFINITY) && !f32::fits(f32::NAN));
}
