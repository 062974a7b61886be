//! The CPU KL family held to the f64 reference, and the mathematics of MATH.md §2 checked
//! numerically: unbiasedness (statistically, with a fixed seed), the gradient each estimator
//! actually follows (by exact expectation), exact divergences and their gradients.

mod common;

use common::cpu::Cpu;
use common::kl::{self};
use rlhf_kernels::testing::{Rng, Tolerance, assert_close};
use rlhf_kernels::{
    Aggregation, DType, Error, ExactDivergence, ExactKlOptions, KlController, KlDirection, KlEstimator,
    Normaliser, RowProblem, RowShape, SampledKlOptions, bf16, cpu, f16, reference,
};
use rlhf_kernels::{ExactKlGrads, ReferenceRows};
use rlhf_kernels::{KlRewardsInputs, KlRewardsOptions, SampledKlInputs, SampledKlOutputs};

#[test]
fn sampled_estimators_match_the_reference() {
    kl::sampled_sweep(&Cpu);
}

#[test]
fn sampled_estimators_at_infinite_log_ratios() {
    kl::sampled_infinities(&Cpu);
}

#[test]
fn bias_corrected_estimates_have_their_gradient_and_errors() {
    kl::sampled_bias_correction(&Cpu);
}

/// The bias correction by exact expectation over a toy vocabulary whose tokens are drawn from
/// π_old ≠ π: `E_{π_old}[ρ·k]` is the KL of the *current* policy that each unbiased estimator
/// estimates, and the expected loss gradient `E_{π_old}[∂(ρ·k)/∂logp · ∇θ log π]` is the
/// gradient of that KL for the plain estimators (the score term `ρ·k` restores the sampling
/// policy's dependence on θ: k3 alone would give `∇KL[ref‖π]`, k1 alone 0) and for the
/// gradient-correct pairs the gradient they promise.
#[test]
fn bias_correction_estimates_the_current_policy() {
    let softmax = |t: &[f64]| {
        let m = t.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let s: f64 = t.iter().map(|x| (x - m).exp()).sum();
        t.iter().map(|x| (x - m).exp() / s).collect::<Vec<f64>>()
    };
    let theta = [0.3f64, -0.2, 0.9, -1.1, 0.0];
    let (q, old) = (softmax(&[0.0, 0.4, 0.5, -0.6, -0.3]), softmax(&[0.5, 0.1, 0.2, -0.4, 0.3]));
    let p = softmax(&theta);
    let kl_pr = |t: &[f64]| kl::kl(&softmax(t), &q);
    let kl_rp = |t: &[f64]| kl::kl(&q, &softmax(t));
    let ln = |v: &[f64]| v.iter().map(|x| x.ln() as f32).collect::<Vec<f32>>();
    type Objective<'a> = &'a dyn Fn(&[f64]) -> f64;
    // Each estimator's KL: its value's expectation, and its expected gradient's objective.
    let claims: [(KlEstimator, Objective); 6] = [
        (KlEstimator::K1, &kl_pr),
        (KlEstimator::K3, &kl_pr),
        (KlEstimator::K1Rev, &kl_rp),
        (KlEstimator::K3Rev, &kl_rp),
        (KlEstimator::GradPolicyRef, &kl_pr),
        (KlEstimator::GradRefPolicy, &kl_rp),
    ];
    for (e, objective) in claims {
        let opts = SampledKlOptions::new(e)
            .bias_correction(true)
            .log_ratio_clamp(None)
            .value_clamp(None)
            .aggregation(Aggregation::SeqMeanTokenSum);
        let (logp, ref_logp, old_logp) = (ln(&p), ln(&q), ln(&old));
        // One token per sequence: per vocabulary entry, ρ·k and its gradient (undo 1/B).
        let inputs = SampledKlInputs::new(RowShape::new(5, 1), &logp, &ref_logp).old_logp(&old_logp);
        let r = reference::sampled_kl(&inputs, &opts).unwrap();
        let value: f64 = (0..5).map(|y| old[y] * r.values[y]).sum();
        assert!(
            (value - objective(&theta)).abs() < 1e-6,
            "{e:?}: E_old[ρk] {value} vs {}",
            objective(&theta)
        );
        for j in 0..5 {
            let expected: f64 =
                (0..5).map(|y| old[y] * 5.0 * r.grad_logp[y] * (f64::from(u8::from(y == j)) - p[j])).sum();
            let (mut up, mut down) = (theta, theta);
            up[j] += 1e-5;
            down[j] -= 1e-5;
            let numeric = (objective(&up) - objective(&down)) / 2e-5;
            assert!((expected - numeric).abs() < 2e-4, "{e:?}, θ[{j}]: {expected} vs {numeric}");
        }
        // The CPU backend agrees with the reference.
        let mut g = [0.0f32; 5];
        let stats = cpu::sampled_kl(&inputs, SampledKlOutputs::default().grad_logp(&mut g), &opts).unwrap();
        assert!((stats.loss - r.stats.loss).abs() < 1e-6 * (1.0 + r.stats.loss.abs()));
        assert_close(&g, &r.grad_logp, Tolerance::for_dtype(DType::F32), "bias-corrected gradient");
    }
}

#[test]
fn kl_rewards_match_the_reference() {
    kl::rewards_sweep(&Cpu);
    kl::rewards_problems(&Cpu);
}

#[test]
fn exact_divergences_match_the_reference() {
    kl::exact_sweep::<bf16, f16>(&Cpu);
    kl::exact_sweep::<f32, f32>(&Cpu);
    kl::exact_sweep::<f16, bf16>(&Cpu);
}

#[test]
fn exact_shards_merge_to_the_whole_row() {
    kl::exact_shards(&Cpu);
}

#[test]
fn exact_shard_problems_refuse_the_row() {
    kl::exact_shard_problems(&Cpu);
}

/// The host merges of shard records refuse what their CUDA twins refuse (a statistic, the JSD's
/// value from the first round, no output, records that are not whole rows, the two KLs given to
/// the JSD's last step), write 0 on padding rows and the value as the two KLs' policy term, and
/// refuse a valid row whose log-sum-exps the merge could not give.
#[test]
fn exact_shard_merges_check_their_outputs() {
    use rlhf_kernels::{Aggregated, ExactKlOutputs, ExactKlPartial, ExactKlStatistic};
    let (rows, cols) = (3, 6);
    let p: Vec<f32> = (0..rows * cols).map(|i| (i % 5) as f32 * 0.3).collect();
    let q: Vec<f32> = (0..rows * cols).map(|i| (i % 4) as f32 * 0.2).collect();
    let mask = [1u8, 0, 1];
    let shape = RowShape::new(rows, cols);
    let opts = ExactKlOptions::new(ExactDivergence::PolicyRef);
    let r = ReferenceRows::new(&q, shape).with_mask(&mask);
    let mut parts = vec![ExactKlPartial::EMPTY; rows];
    cpu::exact_kl_shard_partials(&p, shape, &r, &mut parts, &opts).unwrap();
    let (mut v, mut t, mut lp, mut lq) = ([9.0f32; 3], [9.0f32; 3], [9.0f32; 3], [9.0f32; 3]);
    let out = ExactKlOutputs::default().value(&mut v).policy_term(&mut t).lse(&mut lp, &mut lq);
    cpu::finish_exact_kl_partials(&parts, Some(&mask), out, &opts).unwrap();
    let mut whole = [0.0f32; 3];
    cpu::exact_kl(&p, shape, &r, ExactKlOutputs::default().value(&mut whole), &opts).unwrap();
    assert_eq!(v, whole, "one shard merges to the whole row");
    assert_eq!(t, v, "the two KLs' policy term is the value");
    assert_eq!((v[1], lp[1], lq[1]), (0.0, 0.0, 0.0), "padding row");
    let refused = |r: rlhf_kernels::Result<()>, name: &str| {
        assert!(matches!(&r, Err(Error::InvalidOption { name: n, .. }) if *n == name), "{name}: {r:?}")
    };
    let mut stat = Aggregated::default();
    let statistic = ExactKlStatistic::masked_mean(RowShape::new(1, 3));
    let out = ExactKlOutputs::default().value(&mut v).statistic(&mut stat, statistic);
    refused(cpu::finish_exact_kl_partials(&parts, None, out, &opts), "statistic");
    refused(cpu::finish_exact_kl_partials(&parts, None, ExactKlOutputs::default(), &opts), "outputs");
    refused(
        cpu::finish_exact_kl_partials(&parts[..2], None, ExactKlOutputs::default().value(&mut v), &opts),
        "partials",
    );
    let jsd = ExactKlOptions::new(ExactDivergence::Jsd { beta: 0.5 });
    refused(
        cpu::finish_exact_kl_partials(&parts, None, ExactKlOutputs::default().value(&mut v), &jsd),
        "outputs",
    );
    let sums = [[0.1f32, 0.2]; 3];
    let lse = [1.0f32, 1.0, f32::NAN];
    fn value(v: &mut [f32; 3]) -> ExactKlOutputs<'_> {
        ExactKlOutputs::default().value(v)
    }
    refused(cpu::finish_jsd_sums(&sums, None, [&lse, &lse], value(&mut v), &opts), "divergence");
    refused(cpu::finish_jsd_sums(&sums, None, [&lse, &lse], ExactKlOutputs::default(), &jsd), "outputs");
    let err = cpu::finish_jsd_sums(&sums, None, [&lse, &lse], value(&mut v), &jsd).unwrap_err();
    assert!(matches!(err, Error::InvalidRow { row: 2, problem: RowProblem::NaN, .. }), "{err}");
    let mut v = [9.0f32; 3];
    cpu::finish_jsd_sums(
        &sums,
        Some(&[1, 1, 0]),
        [&lse, &lse],
        ExactKlOutputs::default().value(&mut v),
        &jsd,
    )
    .unwrap();
    let want = (0.5f32 * 0.1 + 0.5 * 0.2).max(0.0);
    assert_eq!(v, [want, want, 0.0], "β·0.1 + (1 − β)·0.2 per valid row, 0 on padding");
}

#[test]
fn exact_statistic_from_the_same_call() {
    kl::exact_statistic(&Cpu);
}

#[test]
fn exact_edge_cases() {
    kl::exact_edge_cases(&Cpu);
}

/// `∂k/∂logp` of every estimator against central differences of its value (f64 reference),
/// away from the clamps.
#[test]
fn estimator_gradients_match_finite_differences() {
    let mut rng = Rng::new(3);
    for e in KlEstimator::ALL {
        for _ in 0..50 {
            let (lp, rlp) = (-(rng.uniform() * 4.0) as f32 - 0.1, -(rng.uniform() * 4.0) as f32 - 0.1);
            if (lp - rlp).abs() < 1e-2 {
                continue; // abs has a kink at 0
            }
            let opts = SampledKlOptions::new(e).aggregation(Aggregation::SeqMeanTokenSum);
            let at = |lp: f32| {
                reference::sampled_kl(&SampledKlInputs::new(RowShape::new(1, 1), &[lp], &[rlp]), &opts)
                    .unwrap()
            };
            let h = 1e-3f32;
            let value_of = |e: KlEstimator, lp: f32| {
                reference::sampled_kl(
                    &SampledKlInputs::new(RowShape::new(1, 1), &[lp], &[rlp]),
                    &opts.clone_with(e),
                )
                .unwrap()
                .values[0]
            };
            // The straight-through estimators differentiate another estimator's value.
            let grad_source = match e {
                KlEstimator::GradPolicyRef => KlEstimator::K2,
                KlEstimator::GradRefPolicy => KlEstimator::K3,
                e => e,
            };
            let numeric = (value_of(grad_source, lp + h) - value_of(grad_source, lp - h))
                / ((lp + h) as f64 - (lp - h) as f64);
            let analytic = at(lp).grad_logp[0];
            assert!(
                (numeric - analytic).abs() < 1e-4 * (1.0 + analytic.abs()),
                "{e:?} at lp={lp} rlp={rlp}: {numeric} vs {analytic}"
            );
        }
    }
}

trait CloneWith {
    fn clone_with(&self, e: KlEstimator) -> Self;
}

impl CloneWith for SampledKlOptions {
    fn clone_with(&self, e: KlEstimator) -> Self {
        let mut o = *self;
        o.estimator = e;
        o
    }
}

/// k1, k3 (for KL[π‖ref]) and k1_rev, k3_rev (for KL[ref‖π]) are unbiased when the supports
/// agree: their sample means over 200 000 tokens drawn from π sit within 5 standard errors of
/// the exact KL. k2 and abs are biased and are not expected to.
#[test]
fn unbiased_estimators_average_to_the_exact_kl() {
    let (pi, reference) = kl::toy_pair();
    let samples = kl::sample(&pi, 200_000, 17);
    let logp: Vec<f32> = samples.iter().map(|&y| pi[y].ln() as f32).collect();
    let ref_logp: Vec<f32> = samples.iter().map(|&y| reference[y].ln() as f32).collect();
    let exact_pr = kl::kl(&pi, &reference);
    let exact_rp = kl::kl(&reference, &pi);
    for (e, exact) in [
        (KlEstimator::K1, exact_pr),
        (KlEstimator::K3, exact_pr),
        (KlEstimator::K1Rev, exact_rp),
        (KlEstimator::K3Rev, exact_rp),
    ] {
        let opts = SampledKlOptions::new(e).log_ratio_clamp(None).value_clamp(None);
        let r = reference::sampled_kl(
            &SampledKlInputs::new(RowShape::new(1, logp.len()), &logp, &ref_logp),
            &opts,
        )
        .unwrap();
        let (mean, se) = kl::mean_and_standard_error(&r.values);
        assert!((mean - exact).abs() < 5.0 * se, "{e:?}: mean {mean} vs exact {exact} (se {se})");
        // The CPU backend's statistics say the same.
        let mut v = vec![0.0f32; logp.len()];
        let stats = cpu::sampled_kl(
            &SampledKlInputs::new(RowShape::new(1, logp.len()), &logp, &ref_logp),
            SampledKlOutputs::default().values(&mut v),
            &opts,
        )
        .unwrap();
        assert!((stats.mean(e) - mean).abs() < 1e-4 * (1.0 + mean.abs()));
    }
}

/// Where the supports differ the estimators are biased, by exactly the mass the samples can
/// never see: if the reference puts mass `q_missing` on tokens the policy bans, k3's
/// expectation is `KL[π‖ref] − q_missing`, and KL[ref‖π] is infinite while k1_rev and k3_rev
/// stay finite. Computed as exact expectations over the toy vocabulary.
#[test]
fn bias_where_the_supports_differ() {
    let pi = [0.5f64, 0.3, 0.2, 0.0];
    let reference = [0.4f64, 0.3, 0.2, 0.1];
    let q_missing = 0.1;
    let expect = |e: KlEstimator| -> f64 {
        let opts = SampledKlOptions::new(e).log_ratio_clamp(None).value_clamp(None);
        (0..3)
            .map(|y| {
                let r = reference::sampled_kl(
                    &SampledKlInputs::new(
                        RowShape::new(1, 1),
                        &[pi[y].ln() as f32],
                        &[reference[y].ln() as f32],
                    ),
                    &opts,
                )
                .unwrap();
                pi[y] * r.values[0]
            })
            .sum()
    };
    let exact_pr = kl::kl(&pi, &reference);
    assert!((expect(KlEstimator::K1) - exact_pr).abs() < 1e-6, "k1 stays unbiased: supp π ⊆ supp ref");
    assert!(
        (expect(KlEstimator::K3) - (exact_pr - q_missing)).abs() < 1e-6,
        "k3 is short by the unseen reference mass"
    );
    assert_eq!(kl::kl(&reference, &pi), f64::INFINITY);
    assert!(expect(KlEstimator::K1Rev).is_finite() && expect(KlEstimator::K3Rev).is_finite());
}

/// MATH.md's table of what each estimator minimises as a loss, verified by exact expectation
/// over a toy vocabulary: E_π[∂k/∂logp · ∇θ log π] against central differences (in θ, the
/// policy logits) of the claimed objective.
#[test]
fn loss_gradients_follow_the_claimed_objectives() {
    let theta = [0.3f64, -0.2, 0.9, -1.1, 0.0];
    let ref_theta = [0.0f64, 0.4, 0.5, -0.6, -0.3];
    let softmax = |t: &[f64]| {
        let m = t.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let s: f64 = t.iter().map(|x| (x - m).exp()).sum();
        t.iter().map(|x| (x - m).exp() / s).collect::<Vec<f64>>()
    };
    let q = softmax(&ref_theta);
    // Objectives as functions of the policy logits.
    let kl_pr = |t: &[f64]| kl::kl(&softmax(t), &q);
    let kl_rp = |t: &[f64]| kl::kl(&q, &softmax(t));
    let half_sq = |t: &[f64]| {
        let p = softmax(t);
        0.5 * q.iter().zip(&p).map(|(qv, pv)| qv * (qv / pv).ln().powi(2)).sum::<f64>()
    };
    let l1 = |t: &[f64]| softmax(t).iter().zip(&q).map(|(p, q)| (p - q).abs()).sum::<f64>();
    let zero = |_: &[f64]| 0.0;
    let rev1 = |t: &[f64]| kl_rp(t) + half_sq(t);
    type Objective<'a> = &'a dyn Fn(&[f64]) -> f64;
    let claims: [(KlEstimator, Objective); 8] = [
        (KlEstimator::K1, &zero),
        (KlEstimator::K2, &kl_pr),
        (KlEstimator::K3, &kl_rp),
        (KlEstimator::Abs, &l1),
        (KlEstimator::K1Rev, &rev1),
        (KlEstimator::K3Rev, &half_sq),
        (KlEstimator::GradPolicyRef, &kl_pr),
        (KlEstimator::GradRefPolicy, &kl_rp),
    ];
    let p = softmax(&theta);
    for (e, objective) in claims {
        let opts = SampledKlOptions::new(e)
            .log_ratio_clamp(None)
            .value_clamp(None)
            .aggregation(Aggregation::SeqMeanTokenSum);
        let logp: Vec<f32> = p.iter().map(|x| x.ln() as f32).collect();
        let ref_logp: Vec<f32> = q.iter().map(|x| x.ln() as f32).collect();
        // One token per sequence: the gradient is ∂k/∂logp of each vocabulary entry.
        let g = reference::sampled_kl(&SampledKlInputs::new(RowShape::new(5, 1), &logp, &ref_logp), &opts)
            .unwrap()
            .grad_logp;
        let g: Vec<f64> = g.iter().map(|x| x * 5.0).collect(); // undo the 1/B_valid weight
        for j in 0..5 {
            let expected_grad: f64 = (0..5).map(|y| p[y] * g[y] * (f64::from(u8::from(y == j)) - p[j])).sum();
            let h = 1e-5;
            let (mut up, mut down) = (theta, theta);
            up[j] += h;
            down[j] -= h;
            let numeric = (objective(&up) - objective(&down)) / (2.0 * h);
            assert!(
                (expected_grad - numeric).abs() < 2e-4,
                "{e:?}, θ[{j}]: E[grad] {expected_grad} vs ∇objective {numeric}"
            );
        }
    }
}

#[test]
fn clamps_zero_the_gradient_and_are_counted() {
    let logp = [-1.0f32, -1.0, -30.0];
    let ref_logp = [-1.0f32, -40.0, -1.0]; // log r = 0, -39 (clamped), +29 (clamped; k3 value clamped too)
    let opts = SampledKlOptions::new(KlEstimator::K3).aggregation(Aggregation::SeqMeanTokenSum);
    let mut g = [0.0f32; 3];
    let stats = cpu::sampled_kl(
        &SampledKlInputs::new(RowShape::new(1, 3), &logp, &ref_logp),
        SampledKlOutputs::default().grad_logp(&mut g),
        &opts,
    )
    .unwrap();
    assert_eq!(g, [0.0, 0.0, 0.0]); // 1 − r = 0 at log r = 0; clamped elsewhere
    assert!((stats.clamped_fraction - 2.0 / 3.0).abs() < 1e-12);
    assert!(stats.mean(KlEstimator::K3) <= 20.0 + 1e-6, "values clamped to ±10 each");
    let unclamped = SampledKlOptions::new(KlEstimator::K1Rev).log_ratio_clamp(None).value_clamp(None);
    let r = reference::sampled_kl(
        &SampledKlInputs::new(RowShape::new(1, 1), &[-1.0], &[f32::NEG_INFINITY]),
        &unclamped,
    )
    .unwrap();
    assert_eq!(r.values[0], 0.0, "r = 0 gives k1_rev = 0");
}

/// Micro-batches with the global normaliser add up to the full batch: loss and gradient.
#[test]
fn global_normalisers_make_micro_batches_add_up() {
    let full = kl::SampledCase::random(RowShape::new(6, 50), 9);
    for aggregation in [
        Aggregation::TokenMean,
        Aggregation::SeqMeanTokenSum,
        Aggregation::SeqMeanTokenMean,
        Aggregation::SeqMeanTokenSumNorm { max_len: 64 },
    ] {
        let base = SampledKlOptions::new(KlEstimator::K3).aggregation(aggregation).coef(0.1);
        let whole = reference::sampled_kl(
            &SampledKlInputs {
                mask: full.mask.as_deref(),
                ..SampledKlInputs::new(full.shape, &full.logp, &full.ref_logp)
            },
            &base,
        )
        .unwrap();
        let c = whole.stats.counts;
        let global = base.normaliser(Normaliser::Global {
            valid_tokens: c.valid_tokens,
            valid_sequences: c.valid_sequences,
            sequences: c.sequences,
        });
        let (mut loss, mut grad) = (0.0, Vec::new());
        for half in [0..150, 150..300] {
            let mask = full.mask.as_ref().map(|m| &m[half.clone()]);
            let mut g = vec![0.0f32; 150];
            let stats = cpu::sampled_kl(
                &SampledKlInputs {
                    mask,
                    ..SampledKlInputs::new(
                        RowShape::new(3, 50),
                        &full.logp[half.clone()],
                        &full.ref_logp[half],
                    )
                },
                SampledKlOutputs::default().grad_logp(&mut g),
                &global,
            )
            .unwrap();
            loss += stats.loss;
            grad.extend(g);
        }
        assert!((loss - whole.stats.loss).abs() < 1e-6 * (1.0 + whole.stats.loss.abs()), "{aggregation:?}");
        assert_close(
            &grad,
            &whole.grad_logp,
            Tolerance::for_dtype(DType::F32),
            &format!("{aggregation:?} grad"),
        );
    }
}

#[test]
fn adaptive_controller() {
    let mut c = KlController::adaptive(0.2, 1.0, 100.0).unwrap();
    assert!(c.is_adaptive());
    c.update(1.1, 10).unwrap(); // e = 0.1
    assert!((c.value() - 0.2 * 1.01).abs() < 1e-12);
    c.update(0.0, 10).unwrap(); // e = -1, clipped to -0.2
    assert!((c.value() - 0.2 * 1.01 * 0.98).abs() < 1e-12);
    c.update(f64::NAN, 10).unwrap();
    assert!((c.value() - 0.2 * 1.01 * 0.98).abs() < 1e-12, "a NaN observation changes nothing");
    // 1 − 0.2·600/100 < 0: β would turn negative; an error, β unchanged.
    assert!(matches!(c.update(0.0, 600), Err(Error::InvalidOption { name: "n_steps", .. })));
    assert!((c.value() - 0.2 * 1.01 * 0.98).abs() < 1e-12);
    // 1 + 0.2·usize::MAX/100 overflows nothing, but β·that does for a huge β.
    let mut big = KlController::adaptive(1e300, 1.0, 1e-300).unwrap();
    assert!(big.update(10.0, 1000).is_err() && big.value() == 1e300);
    let mut f = KlController::fixed(0.05).unwrap();
    f.update(100.0, 1000).unwrap();
    assert_eq!(f.value(), 0.05);
    for (initial, target, horizon) in [
        (f64::NAN, 1.0, 1.0),
        (0.1, f64::NAN, 1.0),
        (0.1, 1.0, 0.0),
        (0.0, 1.0, 1.0),
        (0.1, -1.0, 1.0),
        (0.1, 1.0, f64::INFINITY),
    ] {
        assert!(
            matches!(KlController::adaptive(initial, target, horizon), Err(Error::InvalidOption { .. })),
            "{initial} {target} {horizon}"
        );
    }
    assert!(KlController::fixed(f64::NAN).is_err() && KlController::fixed(-1.0).is_err());
    assert_eq!(KlEstimator::gradient_of(KlDirection::RefPolicy).value_direction(), KlDirection::RefPolicy);
}

#[test]
fn errors() {
    let shape = RowShape::new(2, 2);
    let ok = [-1.0f32; 4];
    let mut nan = ok;
    nan[3] = f32::NAN;
    let run = |a: &[f32], b: &[f32], opts: &SampledKlOptions| {
        cpu::sampled_kl(&SampledKlInputs::new(shape, a, b), SampledKlOutputs::default(), opts)
    };
    let k3 = SampledKlOptions::new(KlEstimator::K3);
    assert_eq!(
        run(&ok, &nan, &k3).unwrap_err(),
        Error::InvalidRow { op: "sampled_kl", row: 1, problem: RowProblem::NaN }
    );
    // A NaN under the mask is padding, not an error.
    assert!(
        cpu::sampled_kl(
            &SampledKlInputs::new(shape, &ok, &nan).mask(&[1, 1, 1, 0]),
            SampledKlOutputs::default(),
            &k3
        )
        .is_ok()
    );
    assert!(matches!(run(&ok[..3], &ok, &k3), Err(Error::ShapeMismatch { what: "logp", .. })));
    assert!(matches!(
        run(&ok, &ok, &k3.log_ratio_clamp(Some(-1.0))),
        Err(Error::InvalidOption { name: "log_ratio_clamp", .. })
    ));
    assert!(matches!(run(&ok, &ok, &k3.coef(f32::NAN)), Err(Error::InvalidOption { name: "coef", .. })));
    assert!(matches!(
        run(&ok, &ok, &k3.aggregation(Aggregation::SeqMeanTokenSumNorm { max_len: 0 })),
        Err(Error::InvalidOption { .. })
    ));
    let bad_norm = Normaliser::Global { valid_tokens: -1.0, valid_sequences: 1.0, sequences: 1.0 };
    assert!(matches!(
        run(&ok, &ok, &k3.normaliser(bad_norm)),
        Err(Error::InvalidOption { name: "valid_tokens", .. })
    ));
    let mut r = [0.0f32; 4];
    assert!(matches!(
        cpu::kl_rewards(&KlRewardsInputs::new(shape, &ok, &[1.0]), &mut r, &KlRewardsOptions::new(0.1)),
        Err(Error::ShapeMismatch { what: "scores", .. })
    ));
    assert!(matches!(
        cpu::kl_rewards(
            &KlRewardsInputs::new(shape, &ok, &[1.0, 1.0]),
            &mut r,
            &KlRewardsOptions::new(f32::INFINITY)
        ),
        Err(Error::InvalidOption { name: "beta", .. })
    ));
    kl::exact_errors(&Cpu);
    // Exact backward needs the saved value for KL[π‖ref].
    let p = [0.0f32; 4];
    let grads = ExactKlGrads::new(&[1.0, 1.0], &[1.0, 1.0], &[1.0, 1.0]);
    let mut dx = [0.0f32; 4];
    let err = cpu::exact_kl_backward(
        &p,
        shape,
        &ReferenceRows::new(&p, shape),
        &grads,
        &mut dx,
        &ExactKlOptions::new(ExactDivergence::PolicyRef),
    );
    assert!(matches!(err, Err(Error::InvalidOption { name: "value", .. })));
}
