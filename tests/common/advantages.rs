//! Shared cases of the advantages family for the CPU and CUDA test files, held to the f64
//! reference (GAE within the documented scan bound) and to hand-computed values.

use rlhf_kernels::testing::{Rng, Tolerance, assert_close};
use rlhf_kernels::{
    Error, GaeInputs, GaeOptions, GroupAdvantageOptions, GroupStd, Groups, MaskedSteps, Moments,
    OverlongInputs, OverlongOptions, Result, RowProblem, RowShape, SingletonGroups, WhitenOptions,
    gae_error_bound_factor, gae_error_scale, reference,
};

/// Marks the elements between `cols` and the row stride: a backend must leave them alone.
pub const UNTOUCHED: f32 = 12345.0;

/// An owned GAE problem.
#[derive(Debug, Clone)]
pub struct GaeCase {
    pub shape: RowShape,
    pub rewards: Option<Vec<f32>>,
    pub kl: Option<Vec<f32>>,
    pub beta: f32,
    pub scores: Option<Vec<f32>>,
    pub values: Option<Vec<f32>>,
    pub mask: Option<Vec<u8>>,
}

/// Mask patterns of the sweep.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum MaskKind {
    None,
    RightPadded,
    LeftPadded,
    Holes,
}

impl GaeCase {
    /// Random inputs with every reward source, NaN at masked positions (never read), and
    /// every third row fully masked when `kind` has a mask.
    pub fn random(shape: RowShape, kind: MaskKind, seed: u64) -> Self {
        let mut rng = Rng::new(seed);
        let n = shape.min_len();
        let mask = match kind {
            MaskKind::None => None,
            _ => {
                let mut m = vec![0u8; n];
                for i in 0..shape.rows {
                    if shape.rows > 1 && i % 3 == 2 {
                        continue; // fully masked row
                    }
                    let len = 1 + rng.below(shape.cols);
                    for (j, t) in shape.row_range(i).enumerate() {
                        m[t] = match kind {
                            MaskKind::RightPadded => u8::from(j < len),
                            MaskKind::LeftPadded => u8::from(j >= shape.cols - len),
                            _ => u8::from(rng.uniform() < 0.7),
                        };
                    }
                }
                Some(m)
            }
        };
        let mut field = |scale: f64| {
            let mut v = rng.normals(n, scale);
            if let Some(m) = &mask {
                for (x, &b) in v.iter_mut().zip(m) {
                    if b == 0 {
                        *x = f32::NAN;
                    }
                }
            }
            v
        };
        let (rewards, kl, values) = (field(0.1), field(0.05), field(1.0));
        let scores = rng.normals(shape.rows, 1.0);
        GaeCase {
            shape,
            rewards: Some(rewards),
            kl: Some(kl.iter().map(|x| x.abs()).collect()),
            beta: 0.05,
            scores: Some(scores),
            values: Some(values),
            mask,
        }
    }

    pub fn inputs(&self) -> GaeInputs<'_> {
        GaeInputs {
            shape: self.shape,
            rewards: self.rewards.as_deref(),
            kl_penalty: self.kl.as_deref().map(|k| (k, self.beta)),
            scores: self.scores.as_deref(),
            values: self.values.as_deref(),
            mask: self.mask.as_deref(),
        }
    }
}

/// One implementation of the family under test. Outputs in the inputs' layout (the gaps of a
/// strided layout pre-filled with [`UNTOUCHED`]).
pub trait AdvantagesBackend {
    /// Advantages and returns.
    fn gae(&self, c: &GaeCase, opts: &GaeOptions) -> Result<(Vec<f32>, Vec<f32>)>;
    /// Per-sequence advantages, and per-token ones when `tokens` is given.
    fn group(
        &self,
        scores: &[f32],
        groups: &Groups,
        opts: &GroupAdvantageOptions,
        tokens: Option<(RowShape, Option<&[u8]>)>,
    ) -> Result<(Vec<f32>, Option<Vec<f32>>)>;
    /// Masked moments.
    fn moments(&self, values: &[f32], shape: RowShape, mask: Option<&[u8]>) -> Result<Moments>;
    /// Whitened copy of `values` and the moments used.
    fn whiten(
        &self,
        values: &[f32],
        shape: RowShape,
        mask: Option<&[u8]>,
        opts: &WhitenOptions,
    ) -> Result<(Vec<f32>, Moments)>;
    /// The overlong-shaped scores.
    fn overlong(&self, inputs: &OverlongInputs<'_>, opts: &OverlongOptions) -> Result<Vec<f32>>;
}

/// A buffer for outputs of `shape`, with the stride gaps marked.
pub fn out_buffer(shape: RowShape) -> Vec<f32> {
    vec![UNTOUCHED; shape.min_len()]
}

/// The dense `[B·T]` part of a strided buffer, after checking that the gaps are untouched.
pub fn dense(v: &[f32], shape: RowShape, what: &str) -> Vec<f32> {
    for i in 0..shape.rows.saturating_sub(1) {
        let gap = shape.row_range(i).end..shape.row_start(i + 1);
        assert!(v[gap].iter().all(|&x| x == UNTOUCHED), "{what}: wrote between cols and the row stride");
    }
    (0..shape.rows).flat_map(|r| v[shape.row_range(r)].iter().copied()).collect()
}

/// GAE of `c` against the reference: within `K(T)·2⁻²⁴·Ā_t` everywhere, exactly 0 at masked
/// positions.
pub fn check_gae(b: &impl AdvantagesBackend, c: &GaeCase, opts: &GaeOptions, what: &str) {
    let what = format!("{what} {:?} {opts:?}", c.shape);
    let expected = reference::gae(&c.inputs(), opts).unwrap();
    let scale = gae_error_scale(&c.inputs(), opts).unwrap();
    let (adv, ret) = b.gae(c, opts).unwrap();
    let (adv, ret) = (dense(&adv, c.shape, &what), dense(&ret, c.shape, &what));
    let k = gae_error_bound_factor(c.shape.cols) * f64::from(f32::EPSILON) / 2.0;
    for (name, got, exp) in [("advantages", &adv, &expected.advantages), ("returns", &ret, &expected.returns)]
    {
        for (j, ((&g, &e), &s)) in got.iter().zip(exp.iter()).zip(&scale).enumerate() {
            let bound = k * s + f64::from(f32::MIN_POSITIVE);
            assert!((g as f64 - e).abs() <= bound, "{what} {name}[{j}]: {g} vs {e} (bound {bound:e})");
        }
    }
    if let Some(m) = &c.mask {
        let dense_mask: Vec<u8> =
            (0..c.shape.rows).flat_map(|r| m[c.shape.row_range(r)].iter().copied()).collect();
        for (j, &v) in dense_mask.iter().enumerate() {
            if v == 0 {
                assert!(adv[j] == 0.0 && ret[j] == 0.0, "{what}: masked position {j} not 0");
            }
        }
    }
}

/// Shapes × masks × γ/λ × conventions × reward sources.
pub fn gae_sweep(b: &impl AdvantagesBackend) {
    let shapes = [
        RowShape::new(1, 1),
        RowShape::new(3, 1),
        RowShape::new(4, 7).with_row_stride(10),
        RowShape::new(9, 128),
        RowShape::new(3, 129).with_row_stride(131),
        RowShape::new(2, 1024),
        RowShape::new(3, 1025),
        RowShape::new(2, 5000).with_row_stride(5003),
    ];
    let mut seed = 10;
    for shape in shapes {
        for kind in [MaskKind::None, MaskKind::RightPadded, MaskKind::LeftPadded, MaskKind::Holes] {
            for (gamma, lambda) in [(1.0, 1.0), (0.99, 0.95), (0.5, 0.0), (0.0, 0.5), (1.0, 0.5)] {
                seed += 1;
                let mut c = GaeCase::random(shape, kind, seed);
                match seed % 4 {
                    0 => c.kl = None,
                    1 => c.rewards = None,
                    2 => c.values = None,
                    _ => {}
                }
                let masked = if seed % 2 == 0 { MaskedSteps::PassThrough } else { MaskedSteps::Reset };
                let opts = GaeOptions::new(gamma, lambda).masked_steps(masked);
                check_gae(b, &c, &opts, &format!("{kind:?}"));
            }
        }
    }
}

/// A small case by hand: T = 4, a hole at t = 2, score on t = 3, γ = 0.5, λ = 0.5.
pub fn gae_by_hand(b: &impl AdvantagesBackend) {
    let shape = RowShape::new(1, 4);
    let c = GaeCase {
        shape,
        rewards: Some(vec![1.0, 0.0, f32::NAN, 0.0]),
        kl: None,
        beta: 0.0,
        scores: Some(vec![2.0]),
        values: Some(vec![1.0, 2.0, f32::NAN, 4.0]),
        mask: Some(vec![1, 1, 0, 1]),
    };
    // Pass-through: δ3 = 2 − 4 = −2, A3 = −2; δ1 = 0 + 0.5·4 − 2 = 0, A1 = 0 + 0.25·(−2) = −0.5;
    // δ0 = 1 + 0.5·2 − 1 = 1, A0 = 1 + 0.25·(−0.5) = 0.875.
    let (adv, ret) = b.gae(&c, &GaeOptions::new(0.5, 0.5)).unwrap();
    assert_eq!(adv, [0.875, -0.5, 0.0, -2.0]);
    assert_eq!(ret, [1.875, 1.5, 0.0, 2.0]);
    // Reset: t = 1 ends its episode: A1 = −2, A0 = 1 + 0.5·2 − 1 + 0.25·(−2) = 0.5.
    let (adv, _) = b.gae(&c, &GaeOptions::new(0.5, 0.5).masked_steps(MaskedSteps::Reset)).unwrap();
    assert_eq!(adv, [0.5, -2.0, 0.0, -2.0]);
    // Discounted returns (no values, λ = 1, γ = 0.5): G3 = 2, G1 = 0 + 0.5·2 = 1, G0 = 1.5.
    let no_values = GaeCase { values: None, ..c };
    let (adv, ret) = b.gae(&no_values, &GaeOptions::discounted_returns(0.5)).unwrap();
    assert_eq!((adv.clone(), ret), (vec![1.5, 1.0, 0.0, 2.0], adv));
}

/// The scan equals the sequential recurrence on a 128k-long sequence (γλ close to and equal
/// to 1, holes in the mask) within the documented bound.
pub fn gae_long(b: &impl AdvantagesBackend) {
    for (i, (gamma, lambda)) in [(1.0f32, 0.95f32), (1.0, 1.0)].into_iter().enumerate() {
        let c = GaeCase::random(RowShape::new(1, 131072), MaskKind::Holes, 77 + i as u64);
        check_gae(b, &c, &GaeOptions::new(gamma, lambda), "128k");
    }
}

/// Every GAE error path, and hostile-but-valid input.
pub fn gae_errors(b: &impl AdvantagesBackend) {
    let shape = RowShape::new(3, 4);
    let good = GaeCase::random(shape, MaskKind::Holes, 5);
    let opts = GaeOptions::new(1.0, 0.95);
    let short = GaeCase { values: Some(vec![0.0; 11]), ..good.clone() };
    assert!(matches!(b.gae(&short, &opts), Err(Error::ShapeMismatch { what: "values", .. })));
    let scores = GaeCase { scores: Some(vec![0.0; 2]), ..good.clone() };
    assert!(matches!(b.gae(&scores, &opts), Err(Error::ShapeMismatch { what: "scores", .. })));
    let nothing = GaeCase { rewards: None, kl: None, scores: None, ..good.clone() };
    assert!(matches!(b.gae(&nothing, &opts), Err(Error::InvalidOption { name: "rewards", .. })));
    assert!(matches!(
        b.gae(&good, &GaeOptions::new(1.5, 1.0)),
        Err(Error::InvalidOption { name: "gamma", .. })
    ));
    assert!(matches!(b.gae(&good, &GaeOptions::new(1.0, f32::NAN)), Err(Error::InvalidOption { .. })));
    let empty = GaeCase::random(RowShape::new(0, 4), MaskKind::None, 1);
    assert!(matches!(b.gae(&empty, &opts), Err(Error::EmptyInput { .. })));
    // A NaN reward at a valid position of row 1 (and an infinite value in row 2).
    let mut bad = GaeCase::random(shape, MaskKind::None, 6);
    bad.rewards.as_mut().unwrap()[5] = f32::NAN;
    bad.values.as_mut().unwrap()[9] = f32::INFINITY;
    let err = b.gae(&bad, &opts).unwrap_err();
    assert_eq!(err, Error::InvalidRow { op: "gae", row: 1, problem: RowProblem::NonFinite });
    // Overflow from finite inputs.
    let mut big = GaeCase::random(shape, MaskKind::None, 7);
    big.rewards.as_mut().unwrap()[11] = 3e38;
    big.values.as_mut().unwrap()[11] = -3e38;
    let err = b.gae(&big, &opts).unwrap_err();
    assert_eq!(err, Error::InvalidRow { op: "gae", row: 2, problem: RowProblem::Overflow });
    // A bad input after the overflow in the same row names the input (the lower code wins).
    big.values.as_mut().unwrap()[10] = f32::NAN;
    let err = b.gae(&big, &opts).unwrap_err();
    assert_eq!(err, Error::InvalidRow { op: "gae", row: 2, problem: RowProblem::NonFinite });
    // All masked: zeros, no error, NaN inputs never read.
    let mut all_masked = GaeCase::random(shape, MaskKind::Holes, 8);
    all_masked.mask = Some(vec![0; shape.len()]);
    all_masked.rewards = Some(vec![f32::NAN; shape.len()]);
    let (adv, ret) = b.gae(&all_masked, &opts).unwrap();
    assert!(adv.iter().chain(&ret).all(|&x| x == 0.0));
}

/// Rows of one batch do not affect each other: a row alone equals the same row in a batch,
/// bit for bit (the launch depends on the length only).
pub fn gae_batch_invariance(b: &impl AdvantagesBackend) {
    for cols in [100, 3000] {
        let batch = GaeCase::random(RowShape::new(6, cols), MaskKind::Holes, 31);
        let opts = GaeOptions::new(1.0, 0.95);
        let (adv, _) = b.gae(&batch, &opts).unwrap();
        let one_row = |v: &Option<Vec<f32>>| v.as_ref().map(|v| v[4 * cols..5 * cols].to_vec());
        let alone = GaeCase {
            shape: RowShape::new(1, cols),
            rewards: one_row(&batch.rewards),
            kl: one_row(&batch.kl),
            beta: batch.beta,
            scores: batch.scores.as_ref().map(|s| vec![s[4]]),
            values: one_row(&batch.values),
            mask: batch.mask.as_ref().map(|m| m[4 * cols..5 * cols].to_vec()),
        };
        let (adv_alone, _) = b.gae(&alone, &opts).unwrap();
        let same = adv_alone.iter().zip(&adv[4 * cols..5 * cols]).all(|(a, b)| a.to_bits() == b.to_bits());
        assert!(same, "T = {cols}: row 4 alone differs from row 4 in the batch");
        let (again, _) = b.gae(&batch, &opts).unwrap();
        assert!(again.iter().zip(&adv).all(|(a, b)| a.to_bits() == b.to_bits()), "two runs differ");
    }
}

/// f32 tolerance relative to the magnitudes that entered.
fn f32_tol(scale: f64) -> Tolerance {
    Tolerance::for_dtype(rlhf_kernels::DType::F32).scaled(scale)
}

/// Hand-computed group estimators: groups out of order and of unequal sizes, every option.
pub fn groups_by_hand(b: &impl AdvantagesBackend) {
    // Group 0: sequences 1, 3 (scores 1, 3); group 1: 0, 2, 4 (0, 0, 3); group 2: sequence 5 (7).
    let groups = Groups::new(&[1, 0, 1, 0, 1, 2], 3).unwrap();
    let s = [0.0f32, 1.0, 0.0, 3.0, 3.0, 7.0];
    let sq2 = 2f64.sqrt();
    let sd1_unbiased = 3f64.sqrt(); // group 1: mean 1, m2 = 1 + 1 + 4 = 6, var 3
    let sd1_biased = 2f64.sqrt(); // var 2
    let cases: [(GroupAdvantageOptions, [f64; 6]); 5] = [
        (
            GroupAdvantageOptions::grpo(),
            [
                -1.0 / (sd1_unbiased + 1e-6),
                -1.0 / (sq2 + 1e-6),
                -1.0 / (sd1_unbiased + 1e-6),
                1.0 / (sq2 + 1e-6),
                2.0 / (sd1_unbiased + 1e-6),
                7.0 / (1.0 + 1e-6),
            ],
        ),
        (
            GroupAdvantageOptions::grpo().std(GroupStd::Biased).eps(0.0),
            [-1.0 / sd1_biased, -1.0, -1.0 / sd1_biased, 1.0, 2.0 / sd1_biased, 7.0],
        ),
        (GroupAdvantageOptions::grpo().std(GroupStd::NoStd), [-1.0, -1.0, -1.0, 1.0, 2.0, 7.0]),
        (GroupAdvantageOptions::rloo(), [-1.5, -2.0, -1.5, 2.0, 3.0, 0.0]),
        (GroupAdvantageOptions::group_mean(), [-1.0, -1.0, -1.0, 1.0, 2.0, 7.0]),
    ];
    for (opts, expected) in cases {
        let (a, _) = b.group(&s, &groups, &opts, None).unwrap();
        assert_close(&a, &expected, f32_tol(7.0), &format!("{opts:?}"));
        let reference = reference::group_advantages(&s, &groups, &opts).unwrap();
        assert_close(&a, &reference, f32_tol(7.0), &format!("{opts:?} vs reference"));
        // Singletons refused on request.
        let strict = opts.singletons(SingletonGroups::Error);
        assert!(matches!(
            b.group(&s, &groups, &strict, None),
            Err(Error::InvalidOption { name: "groups", .. })
        ));
    }
}

/// Random groups (64 groups of sizes 1..=16, shuffled) against the reference, with the
/// broadcast to tokens under a mask and a row stride.
pub fn groups_random(b: &impl AdvantagesBackend) {
    let mut rng = Rng::new(91);
    let mut ids = Vec::new();
    for g in 0..64u32 {
        ids.extend(std::iter::repeat_n(g, 1 + rng.below(16)));
    }
    for i in (1..ids.len()).rev() {
        ids.swap(i, rng.below(i + 1));
    }
    let groups = Groups::new(&ids, 66).unwrap(); // ids 64 and 65 unused
    let scores: Vec<f32> = rng.normals(ids.len(), 2.0).iter().map(|x| x + 5.0).collect();
    let shape = RowShape::new(ids.len(), 37).with_row_stride(40);
    let mask: Vec<u8> = (0..shape.min_len()).map(|_| u8::from(rng.uniform() < 0.8)).collect();
    for opts in [
        GroupAdvantageOptions::grpo(),
        GroupAdvantageOptions::grpo().std(GroupStd::Biased).eps(1e-4),
        GroupAdvantageOptions::grpo().std(GroupStd::NoStd),
        GroupAdvantageOptions::rloo(),
        GroupAdvantageOptions::group_mean(),
    ] {
        let expected = reference::group_advantages(&scores, &groups, &opts).unwrap();
        let (a, tokens) = b.group(&scores, &groups, &opts, Some((shape, Some(&mask)))).unwrap();
        let scale = expected.iter().fold(10.0f64, |m, x| m.max(x.abs()));
        assert_close(&a, &expected, f32_tol(scale), &format!("{opts:?}"));
        let tokens = dense(&tokens.unwrap(), shape, "per-token advantages");
        for i in 0..shape.rows {
            for (j, t) in shape.row_range(i).enumerate() {
                let want = if mask[t] != 0 { a[i] } else { 0.0 };
                assert_eq!(tokens[i * shape.cols + j], want, "{opts:?}: token {j} of sequence {i}");
            }
        }
    }
}

/// Errors of the group estimators.
pub fn group_errors(b: &impl AdvantagesBackend) {
    assert!(matches!(Groups::new(&[0, 3], 3), Err(Error::InvalidOption { name: "group id", .. })));
    assert!(matches!(Groups::new(&[], 3), Err(Error::EmptyInput { .. })));
    assert!(matches!(Groups::new(&[0], 0), Err(Error::EmptyInput { .. })));
    let groups = Groups::new(&[0, 0, 1, 1], 2).unwrap();
    let opts = GroupAdvantageOptions::grpo();
    assert!(matches!(
        b.group(&[1.0; 3], &groups, &opts, None),
        Err(Error::ShapeMismatch { what: "scores", .. })
    ));
    let wrong_rows = RowShape::new(3, 2);
    assert!(matches!(
        b.group(&[1.0; 4], &groups, &opts, Some((wrong_rows, None))),
        Err(Error::ShapeMismatch { .. })
    ));
    let bad_eps = GroupAdvantageOptions::grpo().eps(-1.0);
    assert!(matches!(
        b.group(&[1.0; 4], &groups, &bad_eps, None),
        Err(Error::InvalidOption { name: "eps", .. })
    ));
    let err = b.group(&[1.0, 2.0, f32::NAN, 0.0], &groups, &opts, None).unwrap_err();
    assert_eq!(err, Error::InvalidRow { op: "group_advantages", row: 2, problem: RowProblem::NonFinite });
    // A constant group (every response scored alike: common) with ε = 0 carries no signal:
    // advantages 0, the limit of 0/(0 + ε), not 0/0 = NaN and not an error that stops a run.
    let zero_eps = GroupAdvantageOptions::grpo().eps(0.0);
    let a = b.group(&[1.0, 1.0, 0.0, 2.0], &groups, &zero_eps, None).unwrap();
    let expected = reference::group_advantages(&[1.0, 1.0, 0.0, 2.0], &groups, &zero_eps).unwrap();
    assert_close(&a.0, &expected, Tolerance::for_dtype(rlhf_kernels::DType::F32), "constant group at eps 0");
    assert_eq!(a.0[0], 0.0);
    // A NaN in one group names its own sequence, not the first member of the group.
    let err = b.group(&[1.0, 2.0, 3.0, f32::NAN], &groups, &opts, None).unwrap_err();
    assert_eq!(err, Error::InvalidRow { op: "group_advantages", row: 3, problem: RowProblem::NonFinite });
    // RLOO of finite scores near ±f32::MAX overflows f32.
    let err = b.group(&[3e38, -3e38, 0.0, 1.0], &groups, &GroupAdvantageOptions::rloo(), None).unwrap_err();
    assert_eq!(err, Error::InvalidRow { op: "group_advantages", row: 0, problem: RowProblem::Overflow });
}

/// Moments and whitening against the reference, with the corner cases of MATH.md.
pub fn moments_and_whitening(b: &impl AdvantagesBackend) {
    let mut rng = Rng::new(3);
    for (k, shape) in [RowShape::new(1, 1), RowShape::new(5, 33).with_row_stride(35), RowShape::new(64, 4096)]
        .into_iter()
        .enumerate()
    {
        let mut values: Vec<f32> = rng.normals(shape.min_len(), 3.0).iter().map(|x| x + 1.5).collect();
        let mask: Vec<u8> = (0..shape.min_len()).map(|_| u8::from(rng.uniform() < 0.6)).collect();
        for (t, &m) in mask.iter().enumerate() {
            if m == 0 {
                values[t] = f32::NAN; // never read
            }
        }
        let mask = if k == 0 { None } else { Some(&mask[..]) };
        if k == 0 {
            values[0] = 2.5;
        }
        let what = format!("{shape:?}");
        let want = reference::masked_moments(&values, shape, mask).unwrap();
        let got = b.moments(&values, shape, mask).unwrap();
        assert_eq!(got.count, want.count, "{what} count");
        assert_eq!((got.min, got.max), (want.min, want.max), "{what} min/max");
        assert_close(&[got.mean as f32, got.var as f32], &[want.mean, want.var], f32_tol(10.0), &what);
        for opts in [WhitenOptions::default(), WhitenOptions::default().keep_mean(true).eps(1e-3)] {
            let want = reference::whiten(&values, shape, mask, &opts).unwrap();
            let (got, _) = b.whiten(&values, shape, mask, &opts).unwrap();
            assert_close(&dense(&got, shape, &what), &want, f32_tol(10.0), &format!("{what} {opts:?}"));
        }
    }
    // n = 1: variance 0, no error; the lone value whitens to 0.
    let one = b.moments(&[4.0, 9.0], RowShape::new(1, 2), Some(&[0, 1])).unwrap();
    assert_eq!((one.count, one.mean, one.var), (1.0, 9.0, 0.0));
    // Empty: the identities, and whitening writes zeros.
    let none = b.moments(&[4.0, 9.0], RowShape::new(2, 1), Some(&[0, 0])).unwrap();
    assert_eq!(none, Moments::EMPTY);
    let (w, _) =
        b.whiten(&[4.0, 9.0], RowShape::new(2, 1), Some(&[0, 0]), &WhitenOptions::default()).unwrap();
    assert_eq!(w, [0.0, 0.0]);
    // Errors.
    let err = b.moments(&[1.0, 2.0, f32::INFINITY, 0.0], RowShape::new(2, 2), None).unwrap_err();
    assert_eq!(err, Error::InvalidRow { op: "masked_moments", row: 1, problem: RowProblem::NonFinite });
    assert!(matches!(b.moments(&[1.0; 3], RowShape::new(2, 2), None), Err(Error::ShapeMismatch { .. })));
    assert!(matches!(b.moments(&[], RowShape::new(0, 2), None), Err(Error::EmptyInput { .. })));
    let bad = WhitenOptions::default().eps(-1.0);
    assert!(matches!(b.whiten(&[1.0; 4], RowShape::new(2, 2), None, &bad), Err(Error::InvalidOption { .. })));
}

/// DAPO's overlong shaping: by hand at the band's edges (verl's `dapo.py` values: 0 up to
/// `L_max − L_buf`, `−(L − (L_max − L_buf))/L_buf·factor` inside, the full penalty at `L_max`),
/// random ragged batches with a row stride against the reference (bitwise: one f64 penalty
/// rounded once, one f32 addition), and the errors.
pub fn overlong(b: &impl AdvantagesBackend) {
    // Lengths 0, 12, 13, 16, 20 with L_max = 20, L_buf = 8, penalty 0.5: 0, 0, −1/16, −1/4, −1/2.
    let (cols, lengths) = (24, [0usize, 12, 13, 16, 20, 24]);
    let shape = RowShape::new(lengths.len(), cols);
    let mask: Vec<u8> = lengths.iter().flat_map(|&l| (0..cols).map(move |t| u8::from(t < l))).collect();
    let scores = [1.0f32, 1.0, 0.0, 2.0, -1.0, 0.5];
    let opts = OverlongOptions::new(20, 8).penalty(0.5);
    let got = b.overlong(&OverlongInputs::new(shape, &scores).mask(&mask), &opts).unwrap();
    assert_eq!(got, [1.0, 1.0, -0.0625, 1.75, -1.5, 0.0], "beyond L_max: the full penalty");
    // Without a mask every response is T long.
    let all = b.overlong(&OverlongInputs::new(RowShape::new(2, 18), &[0.0, 1.0]), &opts).unwrap();
    assert_eq!(all, [-0.375, 0.625]);
    let mut rng = Rng::new(5);
    for (k, shape) in
        [RowShape::new(1, 1), RowShape::new(37, 300).with_row_stride(301), RowShape::new(5, 4096)]
            .into_iter()
            .enumerate()
    {
        let mask: Vec<u8> = (0..shape.min_len()).map(|_| u8::from(rng.uniform() < 0.9)).collect();
        let scores = rng.normals(shape.rows, 1.0);
        let opts = OverlongOptions::new(shape.cols, 1 + shape.cols / (2 + k)).penalty(1.0 + k as f32);
        let inputs = OverlongInputs::new(shape, &scores).mask(&mask);
        let want = reference::overlong_shaping(&inputs, &opts).unwrap();
        let got = b.overlong(&inputs, &opts).unwrap();
        assert_close(&got, &want, f32_tol(2.0), &format!("{shape:?}"));
    }
    // Errors: options, shapes, a non-finite score, an overflow.
    let one = RowShape::new(1, 4);
    let bad = |inputs: &OverlongInputs<'_>, opts: &OverlongOptions| b.overlong(inputs, opts).unwrap_err();
    let ok_inputs = OverlongInputs::new(one, &[1.0]);
    for opts in [
        OverlongOptions::new(4, 0),
        OverlongOptions::new(4, 5),
        OverlongOptions::new(4, 2).penalty(-1.0),
        OverlongOptions::new(usize::MAX, 2),
    ] {
        assert!(matches!(bad(&ok_inputs, &opts), Error::InvalidOption { .. }), "{opts:?}");
    }
    let opts = OverlongOptions::new(4, 2);
    assert!(matches!(bad(&OverlongInputs::new(one, &[1.0, 2.0]), &opts), Error::ShapeMismatch { .. }));
    assert!(matches!(
        bad(&OverlongInputs::new(one, &[1.0]).mask(&[1, 1]), &opts),
        Error::ShapeMismatch { .. }
    ));
    let two = RowShape::new(2, 4);
    let nan = bad(&OverlongInputs::new(two, &[1.0, f32::NAN]), &opts);
    assert_eq!(nan, Error::InvalidRow { op: "overlong_shaping", row: 1, problem: RowProblem::NonFinite });
    let over = bad(&OverlongInputs::new(two, &[-3.4e38, -3.4e38]), &OverlongOptions::new(4, 2).penalty(1e38));
    assert_eq!(over, Error::InvalidRow { op: "overlong_shaping", row: 0, problem: RowProblem::Overflow });
}
