//! Shared cases of the PPO family for the CPU and CUDA test files: every branch of each
//! objective hit deliberately with gradients against finite differences of the f64 loss,
//! random sweeps against the reference, micro-batches that add up to the full batch under the
//! global normaliser, and every error path. The fused path from logits is in `ppo/fused.rs`.

mod fused;
pub use fused::*;

use rlhf_kernels::SampledKlInputs;
use rlhf_kernels::testing::{Rng, Tolerance, assert_close};
use rlhf_kernels::{
    Aggregation, DType, Error, Normaliser, PolicyLossInputs, PolicyLossOptions, PolicyLossStats,
    PolicyObjective, Result, RowProblem, RowShape, ValueLossInputs, ValueLossOptions, ValueLossStats,
    reference,
};

/// An owned policy-loss problem.
#[derive(Debug, Clone)]
pub struct PolicyCase {
    pub shape: RowShape,
    pub logp: Vec<f32>,
    pub old_logp: Vec<f32>,
    pub advantages: Vec<f32>,
    pub mask: Option<Vec<u8>>,
    pub entropy: Option<Vec<f32>>,
}

impl PolicyCase {
    /// Random log-ratios in ±0.4 (ε = 0.2 clips a good share on both sides), advantages
    /// N(0, 1), entropies in [0, 3), a mask with padding tails and one empty row; NaN at masked
    /// tokens (never read).
    pub fn random(shape: RowShape, seed: u64) -> Self {
        let mut rng = Rng::new(seed);
        let n = shape.min_len();
        let mut mask = vec![0u8; n];
        for i in 0..shape.rows {
            let len = if shape.rows > 2 && i == 1 { 0 } else { 1 + rng.below(shape.cols) };
            for (j, t) in shape.row_range(i).enumerate() {
                mask[t] = u8::from(j < len);
            }
        }
        let mut old = vec![f32::NAN; n];
        let mut logp = vec![f32::NAN; n];
        let mut adv = vec![f32::NAN; n];
        let mut entropy = vec![f32::NAN; n];
        for t in 0..n {
            if mask[t] != 0 {
                old[t] = -(rng.uniform() * 5.0) as f32 - 0.05;
                logp[t] = old[t] + ((rng.uniform() - 0.5) * 0.8) as f32;
                adv[t] = rng.normal() as f32;
                entropy[t] = (rng.uniform() * 3.0) as f32;
            }
        }
        PolicyCase { shape, logp, old_logp: old, advantages: adv, mask: Some(mask), entropy: Some(entropy) }
    }

    pub fn inputs(&self) -> PolicyLossInputs<'_> {
        PolicyLossInputs {
            shape: self.shape,
            logp: &self.logp,
            old_logp: &self.old_logp,
            advantages: &self.advantages,
            mask: self.mask.as_deref(),
            entropy: self.entropy.as_deref(),
        }
    }
}

/// An owned value-loss problem.
#[derive(Debug, Clone)]
pub struct ValueCase {
    pub shape: RowShape,
    pub values: Vec<f32>,
    pub old_values: Vec<f32>,
    pub returns: Vec<f32>,
    pub mask: Option<Vec<u8>>,
}

impl ValueCase {
    pub fn random(shape: RowShape, seed: u64) -> Self {
        let p = PolicyCase::random(shape, seed);
        let mut rng = Rng::new(seed + 1);
        let n = shape.min_len();
        let old: Vec<f32> = rng.normals(n, 1.0);
        let values = old.iter().map(|&o| o + (rng.normal() * 0.4) as f32).collect();
        ValueCase { shape, values, old_values: old, returns: rng.normals(n, 1.5), mask: p.mask }
    }

    pub fn inputs(&self) -> ValueLossInputs<'_> {
        ValueLossInputs {
            shape: self.shape,
            values: &self.values,
            old_values: &self.old_values,
            returns: &self.returns,
            mask: self.mask.as_deref(),
        }
    }
}

/// Dense per-token outputs of a backend.
pub struct PolicyOut {
    pub loss: Vec<f32>,
    pub grad_logp: Vec<f32>,
    pub grad_entropy: Vec<f32>,
    pub stats: PolicyLossStats,
}

pub trait PpoBackend {
    fn policy(&self, c: &PolicyCase, opts: &PolicyLossOptions) -> Result<PolicyOut>;
    /// `grad_logp` and `grad_entropy` accumulated onto buffers that hold `start` (the inputs'
    /// layout), dense.
    fn policy_onto(
        &self,
        c: &PolicyCase,
        opts: &PolicyLossOptions,
        start: &[f32],
    ) -> Result<(Vec<f32>, Vec<f32>)>;
    /// Per-token loss, gradient and statistics.
    fn value(&self, c: &ValueCase, opts: &ValueLossOptions) -> Result<(Vec<f32>, Vec<f32>, ValueLossStats)>;
    /// The aggregate of masked `[B, T]` values.
    fn aggregate(
        &self,
        values: &[f32],
        shape: RowShape,
        mask: Option<&[u8]>,
        aggregation: Aggregation,
        norm: Normaliser,
    ) -> Result<f64>;
}

pub const AGGREGATIONS: [Aggregation; 4] = [
    Aggregation::TokenMean,
    Aggregation::SeqMeanTokenSum,
    Aggregation::SeqMeanTokenMean,
    Aggregation::SeqMeanTokenSumNorm { max_len: 64 },
];

pub fn objectives() -> Vec<PolicyLossOptions> {
    vec![
        PolicyLossOptions::default(),
        PolicyLossOptions::default().clip(0.2, 0.28).dual_clip(Some(3.0)).entropy_coef(0.01),
        PolicyLossOptions::new(PolicyObjective::KlPenalty { beta: 0.1 }),
        PolicyLossOptions::new(PolicyObjective::Gspo).clip(0.05, 0.08),
        PolicyLossOptions::new(PolicyObjective::Cispo).clip(1.0, 0.28),
        PolicyLossOptions::new(PolicyObjective::SAPO),
        PolicyLossOptions::new(PolicyObjective::Sapo { tau_pos: 0.5, tau_neg: 3.0 }).log_ratio_clamp(None),
        PolicyLossOptions::new(PolicyObjective::Gmpo).clip(0.4, 0.4),
        PolicyLossOptions::new(PolicyObjective::Gmpo).clip(0.05, 0.1).log_ratio_clamp(Some(0.5)),
    ]
}

fn f32_tol(scale: f64) -> Tolerance {
    Tolerance::for_dtype(DType::F32).scaled(scale)
}

fn close(a: f64, b: f64, tol: f64, what: &str) {
    let ok = a == b || (a - b).abs() <= tol * (1.0 + b.abs());
    assert!(ok, "{what}: {a} vs {b}");
}

pub fn check_stats(got: &PolicyLossStats, want: &PolicyLossStats, what: &str) {
    let t = 1e-5;
    close(got.loss, want.loss, t, &format!("{what} loss"));
    close(got.policy_loss, want.policy_loss, t, &format!("{what} policy_loss"));
    close(got.entropy_loss, want.entropy_loss, t, &format!("{what} entropy_loss"));
    assert_eq!(got.clip_fraction_low, want.clip_fraction_low, "{what} clip low");
    assert_eq!(got.clip_fraction_high, want.clip_fraction_high, "{what} clip high");
    assert_eq!(got.dual_clip_fraction, want.dual_clip_fraction, "{what} dual");
    close(got.approx_kl_k1, want.approx_kl_k1, t, &format!("{what} k1"));
    close(got.approx_kl_k3, want.approx_kl_k3, t, &format!("{what} k3"));
    close(got.ratio_mean, want.ratio_mean, t, &format!("{what} ratio mean"));
    close(got.ratio_min, want.ratio_min, t, &format!("{what} ratio min"));
    close(got.ratio_max, want.ratio_max, t, &format!("{what} ratio max"));
    close(got.entropy_mean, want.entropy_mean, t, &format!("{what} entropy mean"));
    assert_eq!(got.counts, want.counts, "{what} counts");
}

/// Every objective × aggregation × normaliser on a few shapes against the reference.
pub fn policy_sweep(b: &impl PpoBackend) {
    let mut seed = 0;
    for shape in [RowShape::new(1, 1), RowShape::new(5, 37).with_row_stride(40), RowShape::new(16, 300)] {
        for opts in objectives() {
            for (k, aggregation) in AGGREGATIONS.into_iter().enumerate() {
                seed += 1;
                let c = PolicyCase::random(shape, seed);
                let normaliser = if k % 2 == 0 {
                    Normaliser::Local
                } else {
                    Normaliser::Global { valid_tokens: 900.0, valid_sequences: 20.0, sequences: 24.0 }
                };
                let opts = opts.aggregation(aggregation).normaliser(normaliser);
                let what = format!("{shape:?} {opts:?}");
                let want = reference::policy_loss(&c.inputs(), &opts).unwrap();
                let got = b.policy(&c, &opts).unwrap();
                assert_close(&got.loss, &want.loss, f32_tol(20.0), &format!("loss {what}"));
                let gscale = want.grad_logp.iter().fold(1e-3f64, |m, x| m.max(x.abs()));
                let tol = Tolerance { rel: 1e-5, abs: 1e-6 * gscale };
                assert_close(&got.grad_logp, &want.grad_logp, tol, &format!("grad {what}"));
                assert_close(&got.grad_entropy, &want.grad_entropy, tol, &format!("grad H {what}"));
                check_stats(&got.stats, &want.stats, &what);
            }
        }
    }
}

/// One token per branch, the gradient of each against central differences of the f64
/// aggregated loss (points at least 0.05 away from every clip edge).
pub fn policy_branches(b: &impl PpoBackend) {
    // (log-ratio, advantage): ratio e^lr; with ε = 0.2 and c = 3.
    #[rustfmt::skip]
    let points: [(f32, f32); 9] = [
        (-0.5, 1.0),  // A > 0, r = 0.61 < 0.8: L1 is the max, full gradient
        (0.05, 1.0),  // A > 0, inside the band
        (0.4, 1.0),   // A > 0, r = 1.49 > 1.2: clipped, no gradient
        (-0.5, -1.0), // A < 0, r < 0.8: clipped, no gradient
        (0.05, -1.0), // A < 0, inside the band
        (0.5, -1.0),  // A < 0, 1.2 < r = 1.65 < 3: L1 is the max, full gradient
        (1.5, -1.0),  // A < 0, r = 4.48 > 3: dual clip, no gradient
        (0.3, 0.0),   // A = 0
        (25.0, 1.0),  // log-ratio clamp active: no gradient, finite loss
    ];
    let shape = RowShape::new(1, points.len());
    let old: Vec<f32> = (0..points.len()).map(|i| -1.0 - 0.1 * i as f32).collect();
    let c = PolicyCase {
        shape,
        logp: points.iter().zip(&old).map(|((lr, _), o)| o + lr).collect(),
        old_logp: old,
        advantages: points.iter().map(|p| p.1).collect(),
        mask: None,
        entropy: None,
    };
    let opts = PolicyLossOptions::default().dual_clip(Some(3.0)).aggregation(Aggregation::SeqMeanTokenSum);
    let got = b.policy(&c, &opts).unwrap();
    let expected_zero = [false, false, true, true, false, false, true, true, true];
    for (t, &zero) in expected_zero.iter().enumerate() {
        assert_eq!(got.grad_logp[t] == 0.0, zero, "branch {t}: gradient {}", got.grad_logp[t]);
    }
    assert_eq!(
        (got.stats.clip_fraction_low, got.stats.clip_fraction_high, got.stats.dual_clip_fraction),
        (1.0 / 9.0, 2.0 / 9.0, 1.0 / 9.0)
    );
    assert!(got.loss.iter().all(|l| l.is_finite()));
    for opts in [
        opts,
        opts.normaliser(Normaliser::Global { valid_tokens: 9.0, valid_sequences: 2.0, sequences: 2.0 }),
    ] {
        finite_differences(b, &c, &opts, &(0..points.len() - 1).collect::<Vec<_>>());
    }
    // PPO-KL everywhere smooth; GSPO with one advantage per sequence under seq-mean-token-mean
    // has exactly the sequence-level GSPO gradient (MATH.md).
    let kl = PolicyLossOptions::new(PolicyObjective::KlPenalty { beta: 0.3 });
    let small = PolicyCase {
        logp: c.logp[..8].to_vec(),
        old_logp: c.old_logp[..8].to_vec(),
        advantages: c.advantages[..8].to_vec(),
        shape: RowShape::new(2, 4),
        ..c.clone()
    };
    finite_differences(b, &small, &kl, &(0..8).collect::<Vec<_>>());
    let mut gspo_case = PolicyCase::random(RowShape::new(3, 6), 5);
    gspo_case.mask = Some(vec![1; 18]);
    gspo_case.entropy = None;
    for i in 0..3 {
        let a = [0.7, -0.4, 1.3][i];
        gspo_case.advantages[i * 6..(i + 1) * 6].fill(a);
        for t in i * 6..(i + 1) * 6 {
            gspo_case.old_logp[t] = -1.0 - 0.1 * t as f32;
            gspo_case.logp[t] = gspo_case.old_logp[t] + [0.01, -0.02, 0.015][i] + 0.002 * (t % 6) as f32;
        }
    }
    let gspo = PolicyLossOptions::new(PolicyObjective::Gspo).aggregation(Aggregation::SeqMeanTokenMean);
    finite_differences(b, &gspo_case, &gspo, &(0..18).collect::<Vec<_>>());
    sapo_and_gmpo_branches(b);
}

/// SAPO's gate is smooth: its gradient matches central differences everywhere, far ratios
/// included, for both temperatures. GMPO's sequence loss, with advantages that vary within a
/// sequence, has the exact gradient at the tokens its log-space clip leaves alone and 0 at the
/// others, under every aggregation.
fn sapo_and_gmpo_branches(b: &impl PpoBackend) {
    // (log-ratio, advantage), one sequence each of 5 tokens.
    #[rustfmt::skip]
    let points: [(f32, f32); 10] = [
        (-2.0, 1.0), (-0.1, 1.0), (0.0, 1.5), (0.3, 0.5), (2.5, 1.0),     // SAPO τ₊; GMPO: 0.3 > 0.2 clipped
        (-2.5, -1.0), (-0.3, -0.5), (0.1, -1.0), (1.2, -2.0), (0.05, 0.0), // τ₋; GMPO: −0.3 < −0.2 clipped, A = 0
    ];
    let old: Vec<f32> = (0..points.len()).map(|i| -1.5 - 0.05 * i as f32).collect();
    let c = PolicyCase {
        shape: RowShape::new(2, 5),
        logp: points.iter().zip(&old).map(|((lr, _), o)| o + lr).collect(),
        old_logp: old,
        advantages: points.iter().map(|p| p.1).collect(),
        mask: None,
        entropy: None,
    };
    let all: Vec<usize> = (0..points.len()).collect();
    for aggregation in AGGREGATIONS {
        for sapo in [PolicyObjective::SAPO, PolicyObjective::Sapo { tau_pos: 2.0, tau_neg: 0.7 }] {
            let opts = PolicyLossOptions::new(sapo).aggregation(aggregation);
            finite_differences(b, &c, &opts, &all);
            let got = b.policy(&c, &opts).unwrap();
            assert!(got.grad_logp.iter().enumerate().all(|(t, &g)| (g == 0.0) == (points[t].1 == 0.0)));
        }
        let gmpo = PolicyLossOptions::new(PolicyObjective::Gmpo).clip(0.2, 0.2).aggregation(aggregation);
        finite_differences(b, &c, &gmpo, &all);
        let got = b.policy(&c, &gmpo).unwrap();
        let zero: Vec<bool> = got.grad_logp.iter().map(|&g| g == 0.0).collect();
        // Clipped: 0.3 with A > 0 (index 3), 2.5 (4); −2.5 and −0.3 with A < 0 (5, 6); A = 0 (9).
        assert_eq!(
            zero,
            [false, false, false, true, true, true, true, false, false, true],
            "{aggregation:?}"
        );
        assert_eq!((got.stats.clip_fraction_low, got.stats.clip_fraction_high), (0.2, 0.2));
    }
}

/// `grad_logp[t]` against the central difference of the reference's aggregated loss.
fn finite_differences(b: &impl PpoBackend, c: &PolicyCase, opts: &PolicyLossOptions, tokens: &[usize]) {
    let got = b.policy(c, opts).unwrap();
    let h = 1e-3f32;
    for &t in tokens {
        let at = |d: f32| {
            let mut p = c.clone();
            p.logp[t] += d;
            reference::policy_loss(&p.inputs(), opts).unwrap().stats.loss
        };
        let (hi, lo) = (c.logp[t] + h, c.logp[t] - h);
        let fd = (at(h) - at(-h)) / (hi as f64 - lo as f64);
        let g = got.grad_logp[t] as f64;
        assert!(
            (g - fd).abs() <= 2e-3 * (1.0 + fd.abs()),
            "{opts:?} token {t}: gradient {g} vs finite difference {fd}"
        );
    }
}

/// Micro-batches with the mini-batch's global counts add up to the full batch: the loss, and
/// the gradients row by row, for every aggregation.
pub fn micro_batches(b: &impl PpoBackend) {
    let full = PolicyCase::random(RowShape::new(8, 20), 77);
    let counts = rlhf_kernels::BatchCounts::of(full.shape, full.mask.as_deref());
    let global = Normaliser::Global {
        valid_tokens: counts.valid_tokens,
        valid_sequences: counts.valid_sequences,
        sequences: counts.sequences,
    };
    let part = |lo: usize, hi: usize| {
        let r = lo * 20..hi * 20;
        PolicyCase {
            shape: RowShape::new(hi - lo, 20),
            logp: full.logp[r.clone()].to_vec(),
            old_logp: full.old_logp[r.clone()].to_vec(),
            advantages: full.advantages[r.clone()].to_vec(),
            mask: full.mask.as_ref().map(|m| m[r.clone()].to_vec()),
            entropy: full.entropy.as_ref().map(|e| e[r.clone()].to_vec()),
        }
    };
    for aggregation in AGGREGATIONS {
        let opts = PolicyLossOptions::default().entropy_coef(0.01).aggregation(aggregation);
        let whole = b.policy(&full, &opts).unwrap();
        let opts = opts.normaliser(global);
        let (a, c) = (b.policy(&part(0, 3), &opts).unwrap(), b.policy(&part(3, 8), &opts).unwrap());
        close(
            a.stats.loss + c.stats.loss,
            whole.stats.loss,
            1e-6,
            &format!("{aggregation:?} micro-batch loss"),
        );
        let joined: Vec<f32> = a.grad_logp.iter().chain(&c.grad_logp).copied().collect();
        let want: Vec<f64> = whole.grad_logp.iter().map(|&g| g as f64).collect();
        assert_close(
            &joined,
            &want,
            Tolerance { rel: 1e-6, abs: 1e-9 },
            &format!("{aggregation:?} gradients"),
        );
        // The trap: local denominators do not add up (except by accident).
        let local = opts.normaliser(Normaliser::Local);
        let (a, c) = (b.policy(&part(0, 3), &local).unwrap(), b.policy(&part(3, 8), &local).unwrap());
        if !matches!(aggregation, Aggregation::SeqMeanTokenSumNorm { .. }) {
            assert!(
                (a.stats.loss + c.stats.loss - whole.stats.loss).abs() > 1e-4,
                "{aggregation:?}: local adds up?"
            );
        }
    }
}

/// Every policy-loss error path and hostile-but-valid input.
pub fn policy_errors(b: &impl PpoBackend) {
    let c = PolicyCase::random(RowShape::new(3, 5), 9);
    let opts = PolicyLossOptions::default();
    let short = PolicyCase { advantages: vec![0.0; 14], ..c.clone() };
    assert!(matches!(b.policy(&short, &opts), Err(Error::ShapeMismatch { what: "advantages", .. })));
    let empty = PolicyCase {
        shape: RowShape::new(0, 5),
        logp: vec![],
        old_logp: vec![],
        advantages: vec![],
        mask: None,
        entropy: None,
    };
    assert!(matches!(b.policy(&empty, &opts), Err(Error::EmptyInput { .. })));
    for bad in [
        opts.clip(1.5, 0.2),
        opts.clip(0.2, f32::NAN),
        opts.dual_clip(Some(1.1)),
        opts.log_ratio_clamp(Some(100.0)),
        PolicyLossOptions::new(PolicyObjective::KlPenalty { beta: f32::INFINITY }),
        opts.aggregation(Aggregation::SeqMeanTokenSumNorm { max_len: 0 }),
    ] {
        assert!(matches!(b.policy(&c, &bad), Err(Error::InvalidOption { .. })), "{bad:?} accepted");
    }
    // A NaN at a valid token of row 2 (row 0's first token is always valid).
    let mut nan = PolicyCase::random(RowShape::new(3, 5), 9);
    nan.mask = None;
    nan.logp
        .iter_mut()
        .chain(nan.old_logp.iter_mut())
        .chain(nan.advantages.iter_mut())
        .for_each(|x| *x = 0.0);
    nan.entropy = Some(vec![1.0; 15]);
    nan.advantages[11] = f32::NAN;
    let err = b.policy(&nan, &opts).err().unwrap();
    assert_eq!(err, Error::InvalidRow { op: "policy_loss", row: 2, problem: RowProblem::NonFinite });
    // All masked: loss 0, zeros, no NaN.
    let mut none = PolicyCase::random(RowShape::new(2, 4), 10);
    none.mask = Some(vec![0; 8]);
    for opts in objectives() {
        let out = b.policy(&none, &opts.aggregation(Aggregation::SeqMeanTokenMean)).unwrap();
        assert_eq!(out.stats.loss, 0.0);
        assert!(out.grad_logp.iter().chain(&out.loss).all(|&x| x == 0.0));
    }
}

/// The value loss: branches against finite differences, a sweep against the reference, errors.
pub fn value_cases(b: &impl PpoBackend) {
    // (v, old, R) with ε_v = 0.5: unclipped wins; clipped wins outside the band; clipped wins
    // inside the band (v_clip = v); unclipped wins outside the band.
    let c = ValueCase {
        shape: RowShape::new(1, 4),
        values: vec![0.2, 1.0, 0.3, -1.0],
        old_values: vec![0.0, 0.0, 0.0, 0.0],
        returns: vec![1.0, 2.0, 0.0, 1.0],
        mask: None,
    };
    let opts = ValueLossOptions::default().clip(Some(0.5)).coef(0.5);
    let (loss, grad, stats) = b.value(&c, &opts).unwrap();
    let want = reference::value_loss(&c.inputs(), &opts).unwrap();
    assert_close(&loss, &want.loss, f32_tol(1.0), "value loss branches");
    assert_close(&grad, &want.grad_values, f32_tol(1.0), "value grad branches");
    assert_eq!(stats.clip_fraction, 0.25);
    for (t, &g) in grad.iter().enumerate() {
        let at = |d: f32| {
            let mut p = c.clone();
            p.values[t] += d;
            reference::value_loss(&p.inputs(), &opts).unwrap().stats.loss
        };
        let fd = (at(1e-3) - at(-1e-3)) / 2e-3;
        assert!((g as f64 - fd).abs() < 1e-3, "value token {t}: {g} vs {fd}");
    }
    for (k, aggregation) in AGGREGATIONS.into_iter().enumerate() {
        for clip in [None, Some(0.2)] {
            let c = ValueCase::random(RowShape::new(6, 33).with_row_stride(35), 40 + k as u64);
            let opts = ValueLossOptions::default().clip(clip).aggregation(aggregation);
            let want = reference::value_loss(&c.inputs(), &opts).unwrap();
            let (loss, grad, stats) = b.value(&c, &opts).unwrap();
            assert_close(&loss, &want.loss, f32_tol(10.0), "value loss");
            assert_close(&grad, &want.grad_values, Tolerance { rel: 1e-5, abs: 1e-7 }, "value grad");
            close(stats.loss, want.stats.loss, 1e-5, "value stat loss");
            assert_eq!(stats.clip_fraction, want.stats.clip_fraction);
        }
    }
    let mut bad = c.clone();
    bad.returns[2] = f32::INFINITY;
    let err = b.value(&bad, &opts).err().unwrap();
    assert_eq!(err, Error::InvalidRow { op: "value_loss", row: 0, problem: RowProblem::NonFinite });
    let short = ValueCase { old_values: vec![0.0; 3], ..c.clone() };
    assert!(matches!(b.value(&short, &opts), Err(Error::ShapeMismatch { what: "old_values", .. })));
    assert!(matches!(b.value(&c, &opts.clip(Some(-1.0))), Err(Error::InvalidOption { .. })));
}

/// Accumulating adds `∂loss/∂logp` at valid tokens and leaves masked tokens alone;
/// `∂loss/∂H` is overwritten.
pub fn accumulate(b: &impl PpoBackend) {
    let c = PolicyCase::random(RowShape::new(6, 40).with_row_stride(43), 31);
    for opts in [
        PolicyLossOptions::default().entropy_coef(0.02),
        PolicyLossOptions::default().normaliser(Normaliser::Global {
            valid_tokens: 100.0,
            valid_sequences: 5.0,
            sequences: 6.0,
        }),
    ] {
        let start: Vec<f32> = (0..c.shape.min_len()).map(|t| 0.001 * t as f32 - 0.1).collect();
        let plain = b.policy(&c, &opts).unwrap();
        let (g, h) = b.policy_onto(&c, &opts, &start).unwrap();
        let mask = c.mask.as_ref().unwrap();
        for i in 0..c.shape.rows {
            for (j, t) in c.shape.row_range(i).enumerate() {
                let k = i * c.shape.cols + j;
                let eg = if mask[t] != 0 { start[t] + plain.grad_logp[k] } else { start[t] };
                let eh = plain.grad_entropy[k];
                assert_eq!((g[k], h[k]), (eg, eh), "{opts:?}: token {t}");
            }
        }
    }
}
