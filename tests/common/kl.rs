//! Shared cases for the KL tests: the same inputs and checks for every backend, held to the
//! f64 reference. The sampled estimators and the KL rewards here, the exact divergences (and
//! their shards and statistic) in `kl/exact.rs`.

mod exact;
pub use exact::*;

use rlhf_kernels::testing::{Rng, Tolerance, assert_close};
use rlhf_kernels::{
    Aggregation, DType, Error, KlEstimator, KlRewardsInputs, KlRewardsOptions, Normaliser, Result,
    RowProblem, RowShape, SampledKlInputs, SampledKlOptions, SampledKlStats, reference,
};

/// A `[B, T]` batch of per-token log-probs of the policy and the reference.
#[derive(Debug, Clone)]
pub struct SampledCase {
    pub logp: Vec<f32>,
    pub ref_logp: Vec<f32>,
    pub shape: RowShape,
    pub mask: Option<Vec<u8>>,
    /// The sampling policy's log-probs, for the bias correction.
    pub old_logp: Option<Vec<f32>>,
    pub opts: SampledKlOptions,
}

impl SampledCase {
    /// The host inputs.
    pub fn inputs(&self) -> SampledKlInputs<'_> {
        SampledKlInputs {
            mask: self.mask.as_deref(),
            old_logp: self.old_logp.as_deref(),
            ..SampledKlInputs::new(self.shape, &self.logp, &self.ref_logp)
        }
    }

    /// With the bias correction: old log-probs within ±0.3 of the policy's (a few far, to hit
    /// the ratio's clamp).
    pub fn bias_corrected(mut self, seed: u64) -> Self {
        let mut rng = Rng::new(seed);
        let old = self
            .logp
            .iter()
            .map(|&lp| if rng.uniform() < 0.02 { lp + 25.0 } else { lp + (rng.normal() * 0.3) as f32 })
            .collect();
        self.old_logp = Some(old);
        self.opts = self.opts.bias_correction(true);
        self
    }

    /// Log-probs in (-8, 0), the reference within ±2 of the policy (a few far away, to hit
    /// the clamps), one sequence in four fully masked, ragged lengths. (`-inf` inputs have
    /// tests of their own: k1 and k2 are infinite there.)
    pub fn random(shape: RowShape, seed: u64) -> Self {
        let mut rng = Rng::new(seed);
        let n = shape.rows * shape.row_stride;
        let mut logp = vec![f32::NAN; n];
        let mut ref_logp = vec![f32::NAN; n];
        let mut mask = vec![0u8; n];
        for i in 0..shape.rows {
            let len = if i % 4 == 1 { 0 } else { 1 + rng.below(shape.cols) };
            for (k, t) in shape.row_range(i).enumerate() {
                let lp = -(rng.uniform() * 8.0) as f32;
                let far = rng.uniform() < 0.03;
                let rlp =
                    if far { lp - 30.0 * rng.uniform() as f32 } else { lp + (rng.normal() * 0.7) as f32 };
                logp[t] = lp;
                ref_logp[t] = rlp;
                mask[t] = u8::from(k < len);
            }
        }
        SampledCase {
            logp,
            ref_logp,
            shape,
            mask: Some(mask),
            old_logp: None,
            opts: SampledKlOptions::new(KlEstimator::K3),
        }
    }
}

/// What each backend's test file implements for the elementwise ops.
pub trait SampledBackend {
    /// (values, grad_logp, stats), buffers laid out as the inputs.
    fn sampled(&self, c: &SampledCase) -> Result<(Vec<f32>, Vec<f32>, SampledKlStats)>;
    /// The rewards, laid out as the inputs.
    fn rewards(&self, inputs: &KlRewardsInputs<'_>, opts: &KlRewardsOptions) -> Result<Vec<f32>>;
}

fn dense(v: &[f32], shape: RowShape) -> Vec<f32> {
    (0..shape.rows).flat_map(|r| v[shape.row_range(r)].iter().copied()).collect()
}

/// Every estimator × aggregation × normaliser on a few shapes, against the reference.
pub fn sampled_sweep(b: &impl SampledBackend) {
    let aggregations = [
        Aggregation::TokenMean,
        Aggregation::SeqMeanTokenSum,
        Aggregation::SeqMeanTokenMean,
        Aggregation::SeqMeanTokenSumNorm { max_len: 300 },
    ];
    let mut seed = 0;
    for shape in [
        RowShape::new(1, 1),
        RowShape::new(7, 33).with_row_stride(35),
        RowShape::new(16, 257),
        RowShape::new(3, 4096),
    ] {
        for e in KlEstimator::ALL {
            for (k, aggregation) in aggregations.into_iter().enumerate() {
                seed += 1;
                let mut c = SampledCase::random(shape, seed);
                let normaliser = if k % 2 == 0 {
                    Normaliser::Local
                } else {
                    Normaliser::Global { valid_tokens: 1000.0, valid_sequences: 13.0, sequences: 20.0 }
                };
                c.opts = SampledKlOptions::new(e).aggregation(aggregation).normaliser(normaliser).coef(0.25);
                if seed % 5 == 0 {
                    c.opts = c.opts.log_ratio_clamp(None).value_clamp(None);
                }
                if seed % 3 == 0 {
                    c = c.bias_corrected(seed);
                }
                check_sampled(b, &c);
            }
        }
    }
}

pub fn check_sampled(b: &impl SampledBackend, c: &SampledCase) {
    let what = format!("{:?} {:?}", c.opts, c.shape);
    let expected = reference::sampled_kl(&c.inputs(), &c.opts).unwrap();
    let (v, g, stats) = b.sampled(c).unwrap();
    // Values up to 0.5·30² for k2 far from the reference: f32 relative tolerance.
    let tol = Tolerance::for_dtype(DType::F32).scaled(1.0);
    assert_close(
        &dense(&v, c.shape),
        &expected.values,
        Tolerance { abs: 1e-5, rel: 1e-5 },
        &format!("values {what}"),
    );
    let g_scale = expected.grad_logp.iter().fold(0.0f64, |m, x| m.max(x.abs()));
    assert_close(&dense(&g, c.shape), &expected.grad_logp, tol.scaled(g_scale), &format!("grad {what}"));
    let close = |a: f64, e: f64| a == e || (a - e).abs() <= 1e-5 * (1.0 + e.abs());
    assert!(close(stats.loss, expected.stats.loss), "loss {} vs {} {what}", stats.loss, expected.stats.loss);
    for (k, (a, e)) in stats.means.iter().zip(expected.stats.means).enumerate() {
        assert!(close(*a, e), "mean of {:?}: {a} vs {e} {what}", KlEstimator::ALL[k]);
    }
    assert_eq!(stats.counts, expected.stats.counts);
    assert!((stats.clamped_fraction - expected.stats.clamped_fraction).abs() < 1e-9, "{what}");
}

/// `-inf` log-probs: the clamped exp-based estimators stay finite where the reference forbids
/// a sampled token; k1 and k2 are infinite there and reported; `-inf` on both sides is a NaN
/// log-ratio and reported.
pub fn sampled_infinities(b: &impl SampledBackend) {
    let ninf = f32::NEG_INFINITY;
    let case = |logp: [f32; 2], ref_logp: [f32; 2], e: KlEstimator| SampledCase {
        logp: logp.to_vec(),
        ref_logp: ref_logp.to_vec(),
        shape: RowShape::new(2, 1),
        mask: None,
        old_logp: None,
        opts: SampledKlOptions::new(e),
    };
    for e in [KlEstimator::K3, KlEstimator::K1Rev, KlEstimator::K3Rev, KlEstimator::GradRefPolicy] {
        check_sampled(b, &case([-1.0, -2.0], [-1.5, ninf], e));
    }
    for e in [KlEstimator::K1, KlEstimator::K2, KlEstimator::Abs, KlEstimator::GradPolicyRef] {
        let err = b.sampled(&case([-1.0, -2.0], [-1.5, ninf], e)).unwrap_err();
        assert_eq!(
            err,
            Error::InvalidRow { op: "sampled_kl", row: 1, problem: RowProblem::InfiniteKl },
            "{e:?}"
        );
    }
    let err = b.sampled(&case([-1.0, ninf], [-1.5, ninf], KlEstimator::K3)).unwrap_err();
    assert_eq!(err, Error::InvalidRow { op: "sampled_kl", row: 1, problem: RowProblem::NaN });
    // A -inf on both sides under the mask is padding.
    let mut c = case([-1.0, ninf], [-1.5, ninf], KlEstimator::K1);
    c.mask = Some(vec![1, 0]);
    check_sampled(b, &c);
}

pub fn rewards_sweep(b: &impl SampledBackend) {
    for (shape, seed) in [
        (RowShape::new(1, 1), 1),
        (RowShape::new(9, 100).with_row_stride(101), 2),
        (RowShape::new(64, 2048), 3),
    ] {
        let c = SampledCase::random(shape, seed);
        let kl: Vec<f32> =
            c.logp.iter().zip(&c.ref_logp).map(|(a, b)| if b.is_finite() { a - b } else { 30.0 }).collect();
        let scores: Vec<f32> = (0..shape.rows).map(|i| i as f32 - 3.5).collect();
        let inputs = KlRewardsInputs { mask: c.mask.as_deref(), ..KlRewardsInputs::new(shape, &kl, &scores) };
        let opts = KlRewardsOptions::new(0.05);
        let expected = reference::kl_rewards(&inputs, &opts).unwrap();
        let r = b.rewards(&inputs, &opts).unwrap();
        assert_close(
            &dense(&r, shape),
            &expected,
            Tolerance::for_dtype(DType::F32).scaled(10.0),
            "kl_rewards",
        );
    }
}

/// A non-finite KL at a valid token or a non-finite score names its sequence
/// (`NonFinite`); finite inputs whose reward overflows f32 name theirs (`Overflow`); a NaN KL
/// under the mask is padding.
pub fn rewards_problems(b: &impl SampledBackend) {
    let shape = RowShape::new(3, 2);
    let mask = [1u8, 1, 1, 0, 1, 1];
    let kl = [0.5f32, 0.25, 0.5, f32::NAN, 0.5, 0.25];
    let scores = [1.0f32, 2.0, 3.0];
    let (inputs, opts) = (KlRewardsInputs::new(shape, &kl, &scores).mask(&mask), KlRewardsOptions::new(0.1));
    let expected = reference::kl_rewards(&inputs, &opts).unwrap();
    let r = b.rewards(&inputs, &opts).unwrap();
    assert_close(&r, &expected, Tolerance::for_dtype(DType::F32), "masked NaN");
    let rewards_err = |kl: &[f32], scores: &[f32], beta: f32| {
        let (inputs, opts) =
            (KlRewardsInputs::new(shape, kl, scores).mask(&mask), KlRewardsOptions::new(beta));
        let want = reference::kl_rewards(&inputs, &opts).unwrap_err();
        let got = b.rewards(&inputs, &opts).unwrap_err();
        assert_eq!(got, want);
        got
    };
    let row_problem = |row, problem| Error::InvalidRow { op: "kl_rewards", row, problem };
    let mut nan = kl;
    nan[4] = f32::NAN;
    assert_eq!(rewards_err(&nan, &scores, 0.1), row_problem(2, RowProblem::NonFinite));
    assert_eq!(rewards_err(&kl, &[1.0, f32::INFINITY, 3.0], 0.1), row_problem(1, RowProblem::NonFinite));
    // −3e38·0.5 fits f32, −3e38·0.5 + (−3e38) does not: the last valid token of row 0 overflows.
    assert_eq!(rewards_err(&kl, &[-3e38, 0.0, 0.0], 3e38), row_problem(0, RowProblem::Overflow));
    let mut big = kl;
    big[5] = 3e38;
    assert_eq!(rewards_err(&big, &scores, 10.0), row_problem(2, RowProblem::Overflow));
}

// ---- toy distributions ----------------------------------------------------------------------

/// A policy and a bimodal reference over 6 tokens, same support.
pub fn toy_pair() -> (Vec<f64>, Vec<f64>) {
    let norm = |v: Vec<f64>| {
        let s: f64 = v.iter().sum();
        v.into_iter().map(|x| x / s).collect::<Vec<_>>()
    };
    (norm(vec![0.3, 0.25, 0.2, 0.1, 0.1, 0.05]), norm(vec![0.35, 0.05, 0.05, 0.05, 0.15, 0.35]))
}

/// `KL[a ‖ b]` in f64 (terms with a = 0 are 0).
pub fn kl(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).filter(|(a, _)| **a > 0.0).map(|(a, b)| a * (a / b).ln()).sum()
}

/// `n` tokens drawn from `p` with a fixed seed.
pub fn sample(p: &[f64], n: usize, seed: u64) -> Vec<usize> {
    let mut rng = Rng::new(seed);
    (0..n)
        .map(|_| {
            let u = rng.uniform();
            let mut acc = 0.0;
            p.iter()
                .position(|&x| {
                    acc += x;
                    u < acc
                })
                .unwrap_or(p.len() - 1)
        })
        .collect()
}

pub fn mean_and_standard_error(v: &[f64]) -> (f64, f64) {
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n;
    let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0);
    (mean, (var / n).sqrt())
}

/// The bias-corrected estimate's gradient `ρ·∂k + ρ·k` against central differences of the f64
/// reference's aggregated loss (every estimator, ρ's clamp inactive and active), and its
/// errors: `old_logp` without the option or the option without it, a non-finite `old_logp`.
pub fn sampled_bias_correction(b: &impl SampledBackend) {
    let shape = RowShape::new(3, 4);
    let logp: Vec<f32> = (0..12).map(|t| -0.5 - 0.2 * t as f32).collect();
    let ref_logp: Vec<f32> =
        logp.iter().enumerate().map(|(t, lp)| lp + [0.4, -0.7, 1.1, -0.2][t % 4]).collect();
    // log ρ: small, except token 5 (2.8, beyond the clamp of 2 below: no score term there).
    let old: Vec<f32> = logp
        .iter()
        .enumerate()
        .map(|(t, lp)| lp - [0.3, -0.2, 0.1, 0.25][t % 4] - if t == 5 { 3.0 } else { 0.0 })
        .collect();
    for e in KlEstimator::ALL {
        let opts = SampledKlOptions::new(e)
            .bias_correction(true)
            .log_ratio_clamp(Some(2.0))
            .value_clamp(None)
            .aggregation(Aggregation::SeqMeanTokenMean)
            .coef(0.5);
        let c = SampledCase {
            logp: logp.clone(),
            ref_logp: ref_logp.clone(),
            shape,
            mask: None,
            old_logp: Some(old.clone()),
            opts,
        };
        check_sampled(b, &c);
        let (_, g, _) = b.sampled(&c).unwrap();
        // The straight-through estimators' gradient is not their value's: the reference holds them.
        if matches!(e, KlEstimator::GradPolicyRef | KlEstimator::GradRefPolicy) {
            continue;
        }
        let h = 1e-3f32;
        for t in 0..12 {
            let at = |d: f32| {
                let mut p = c.clone();
                p.logp[t] += d;
                reference::sampled_kl(&p.inputs(), &p.opts).unwrap().stats.loss
            };
            let (hi, lo) = (logp[t] + h, logp[t] - h);
            let numeric = (at(h) - at(-h)) / (hi as f64 - lo as f64);
            assert!(
                (g[t] as f64 - numeric).abs() <= 2e-3 * (1.0 + numeric.abs()),
                "{e:?} token {t}: {} vs {numeric}",
                g[t]
            );
        }
    }
    let plain = SampledCase::random(RowShape::new(2, 5), 3);
    let with_old = plain.clone().bias_corrected(4);
    let err = |c: &SampledCase| b.sampled(c).unwrap_err();
    assert!(matches!(
        err(&SampledCase { opts: plain.opts.bias_correction(true), ..plain.clone() }),
        Error::InvalidOption { name: "bias_correction", .. }
    ));
    assert!(matches!(
        err(&SampledCase { opts: plain.opts, ..with_old.clone() }),
        Error::InvalidOption { name: "bias_correction", .. }
    ));
    let mut bad = with_old.clone();
    let t = bad.mask.as_ref().unwrap().iter().position(|&m| m != 0).unwrap();
    bad.old_logp.as_mut().unwrap()[t] = f32::NEG_INFINITY;
    let row = t / bad.shape.row_stride;
    assert!(
        matches!(err(&bad), Error::InvalidRow { row: r, problem: RowProblem::NonFinite, .. } if r == row),
        "{:?}",
        err(&bad)
    );
    // At a masked token it is not read.
    let mut masked = with_old;
    let t = masked.mask.as_ref().unwrap().iter().position(|&m| m == 0).unwrap();
    masked.old_logp.as_mut().unwrap()[t] = f32::NAN;
    assert!(b.sampled(&masked).is_ok());
}
