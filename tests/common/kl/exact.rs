//! The exact divergences' shared cases: forward and backward against the f64 reference, the
//! edge cases and errors, vocabulary shards and the batch statistic.

use rlhf_kernels::testing::{Rng, Tolerance, assert_close};
use rlhf_kernels::{
    Aggregated, Aggregation, BatchCounts, DType, Element, Error, ExactDivergence, ExactKlOptions,
    ExactKlStatistic, Normaliser, ReferenceRows, Result, RowProblem, RowShape, bf16, f16, reference,
};

/// The outputs of an exact forward.
#[derive(Debug, Clone)]
pub struct ExactOut {
    pub value: Vec<f32>,
    pub policy_lse: Vec<f32>,
    pub ref_lse: Vec<f32>,
    pub policy_term: Vec<f32>,
}

impl ExactOut {
    pub fn zeros(n: usize) -> Self {
        ExactOut {
            value: vec![0.0; n],
            policy_lse: vec![0.0; n],
            ref_lse: vec![0.0; n],
            policy_term: vec![0.0; n],
        }
    }
}

#[derive(Debug, Clone)]
pub struct ExactCase<P, Q> {
    pub policy: Vec<P>,
    pub policy_shape: RowShape,
    pub reference: Vec<Q>,
    pub ref_shape: RowShape,
    pub mask: Option<Vec<u8>>,
    pub opts: ExactKlOptions,
}

impl<P: Element, Q: Element> ExactCase<P, Q> {
    /// A policy and a nearby reference (σ 3 logits, reference = policy + N(0, 0.5²)), banned
    /// tokens on both sides in odd rows (the reference bans only tokens the policy bans too,
    /// so KL[π‖ref] stays finite), a masked row in five; the reference has its own stride.
    pub fn random(rows: usize, cols: usize, divergence: ExactDivergence, tau: f32, seed: u64) -> Self {
        let mut rng = Rng::new(seed);
        let policy_shape = RowShape::new(rows, cols).with_row_stride(cols + (seed as usize % 3));
        let ref_shape = RowShape::new(rows, cols).with_row_stride(cols + 1);
        let mut policy: Vec<P> = vec![P::from_f32(f32::NAN); rows * policy_shape.row_stride];
        let mut reference: Vec<Q> = vec![Q::from_f32(f32::NAN); rows * ref_shape.row_stride];
        let mut mask = vec![1u8; rows];
        for r in 0..rows {
            for v in 0..cols {
                let x = (rng.normal() * 3.0) as f32;
                let mut y = x + (rng.normal() * 0.5) as f32;
                let mut x = x;
                if r % 2 == 1 && v > 0 && rng.uniform() < 0.1 {
                    x = f32::NEG_INFINITY;
                    if rng.uniform() < 0.5 {
                        y = f32::NEG_INFINITY;
                    }
                }
                policy[policy_shape.row_start(r) + v] = P::from_f32(x);
                reference[ref_shape.row_start(r) + v] = Q::from_f32(y);
            }
            if r % 5 == 3 {
                mask[r] = 0;
            }
        }
        ExactCase {
            policy,
            policy_shape,
            reference,
            ref_shape,
            mask: Some(mask),
            opts: ExactKlOptions::new(divergence).temperature(tau),
        }
    }

    pub fn reference_rows(&self) -> rlhf_kernels::ReferenceRows<'_, Q> {
        rlhf_kernels::ReferenceRows {
            logits: &self.reference,
            shape: self.ref_shape,
            mask: self.mask.as_deref(),
        }
    }

    pub fn scale(&self) -> f64 {
        let m = |v: f64| if v.is_finite() { v.abs() } else { 0.0 };
        let a = self.policy.iter().map(|x| m(x.to_f64())).fold(0.0, f64::max);
        let b = self.reference.iter().map(|x| m(x.to_f64())).fold(0.0, f64::max);
        a.max(b).max(1.0) / self.opts.temperature as f64
    }
}

pub trait ExactBackend {
    fn forward<P: Element, Q: Element>(&self, c: &ExactCase<P, Q>) -> Result<ExactOut>;
    /// The tensor-parallel recipe over `shards` of `c` (value and both normalisers; for the
    /// JSD also its second round): shard partials, merged in shard order, finished.
    fn forward_sharded<P: Element, Q: Element>(
        &self,
        c: &ExactCase<P, Q>,
        shards: &[Shard<P, Q>],
    ) -> Result<ExactOut>;
    /// The value (empty when `with_value` is false) and the batch statistic `stat` with the
    /// batch's counts, from one call.
    fn forward_with_statistic<P: Element, Q: Element>(
        &self,
        c: &ExactCase<P, Q>,
        stat: ExactKlStatistic,
        with_value: bool,
    ) -> Result<(Vec<f32>, Aggregated)>;
    /// The full gradient buffer (the policy's layout).
    fn backward<P: Element, Q: Element>(
        &self,
        c: &ExactCase<P, Q>,
        f: &ExactOut,
        g: &[f32],
        in_place: bool,
    ) -> Result<Vec<P>>;
}

pub const DIVERGENCES: [ExactDivergence; 4] = [
    ExactDivergence::PolicyRef,
    ExactDivergence::RefPolicy,
    ExactDivergence::Jsd { beta: 0.5 },
    ExactDivergence::Jsd { beta: 0.1 },
];

pub fn check_exact<P: Element, Q: Element>(b: &impl ExactBackend, c: &ExactCase<P, Q>, seed: u64) {
    let what = format!(
        "{}/{} {:?} {:?} tau={}",
        P::DTYPE,
        Q::DTYPE,
        c.opts.divergence,
        c.policy_shape,
        c.opts.temperature
    );
    let e = reference::exact_kl(&c.policy, c.policy_shape, &c.reference_rows(), &c.opts).unwrap();
    let f = b.forward(c).unwrap();
    let tol = Tolerance::for_dtype(DType::F32).scaled(c.scale());
    assert_close(&f.value, &e.value, tol, &format!("value {what}"));
    assert_close(&f.policy_lse, &e.policy_lse, tol, &format!("policy lse {what}"));
    assert_close(&f.ref_lse, &e.ref_lse, tol, &format!("ref lse {what}"));
    assert_close(&f.policy_term, &e.policy_term, tol, &format!("policy term {what}"));
    assert!(f.value.iter().all(|&v| v >= 0.0), "a divergence is never negative: {what}");

    let g = Rng::new(seed).normals(c.policy_shape.rows, 1.0);
    let expected =
        reference::exact_kl_backward(&c.policy, c.policy_shape, &c.reference_rows(), &g, &c.opts).unwrap();
    let grad = b.backward(c, &f, &g, false).unwrap();
    let dense: Vec<P> =
        (0..c.policy_shape.rows).flat_map(|r| grad[c.policy_shape.row_range(r)].iter().copied()).collect();
    let scale = expected.iter().fold(0.0f64, |m, x| m.max(x.abs()));
    assert_close(
        &dense,
        &expected,
        Tolerance::for_dtype(P::DTYPE).scaled(scale.max(1e-3)),
        &format!("grad {what}"),
    );
    let in_place = b.backward(c, &f, &g, true).unwrap();
    for r in 0..c.policy_shape.rows {
        let range = c.policy_shape.row_range(r);
        let same = in_place[range.clone()]
            .iter()
            .zip(&grad[range])
            .all(|(a, b)| a.to_f64().to_bits() == b.to_f64().to_bits());
        assert!(same, "in place differs from out of place, row {r}: {what}");
    }
}

pub fn exact_sweep<P: Element, Q: Element>(b: &impl ExactBackend) {
    let small = crate::common::small();
    let shapes: &[(usize, usize)] = if small {
        &[(1, 1), (7, 129), (3, 9000)]
    } else {
        &[(1, 1), (1, 2), (7, 31), (5, 129), (16, 1000), (4, 9000), (3, 32000), (2, 151936)]
    };
    let mut seed = 0u64;
    for &(rows, cols) in shapes {
        for divergence in DIVERGENCES {
            seed += 1;
            let tau = [1.0, 0.7, 1.3][seed as usize % 3];
            check_exact(b, &ExactCase::<P, Q>::random(rows, cols, divergence, tau, seed), seed);
        }
    }
}

/// Identical rows give 0; `+inf` KL[π‖ref] is reported; KL[ref‖π] = `+inf` is returned with a
/// finite gradient; the JSD stays finite.
pub fn exact_edge_cases(b: &impl ExactBackend) {
    let ninf = f32::NEG_INFINITY;
    let shape = RowShape::new(2, 4);
    let same = vec![0.5f32, ninf, -1.0, 2.0, 0.0, 0.0, 0.0, 0.0];
    for divergence in DIVERGENCES {
        let c = ExactCase {
            policy: same.clone(),
            policy_shape: shape,
            reference: same.clone(),
            ref_shape: shape,
            mask: None,
            opts: ExactKlOptions::new(divergence),
        };
        let f = b.forward(&c).unwrap();
        assert!(f.value.iter().all(|&v| v.abs() < 1e-6), "{divergence:?} of identical rows: {:?}", f.value);
        let g = b.backward(&c, &f, &[1.0, 1.0], false).unwrap();
        assert!(g.iter().all(|x| x.abs() < 1e-6), "{divergence:?} gradient at identical rows");
    }
    // The reference bans token 1, the policy does not.
    let policy = vec![0.0f32, 0.0, 0.0, 0.0];
    let refr = vec![0.0f32, ninf, 0.0, 0.0];
    let one = RowShape::new(1, 4);
    let case = |d| ExactCase {
        policy: policy.clone(),
        policy_shape: one,
        reference: refr.clone(),
        ref_shape: one,
        mask: None,
        opts: ExactKlOptions::new(d),
    };
    let err = b.forward(&case(ExactDivergence::PolicyRef)).unwrap_err();
    assert_eq!(err, Error::InvalidRow { op: "exact_kl", row: 0, problem: RowProblem::InfiniteKl });
    let jsd = b.forward(&case(ExactDivergence::Jsd { beta: 0.5 })).unwrap();
    assert!(jsd.value[0].is_finite() && jsd.value[0] > 0.0);
    // The policy bans token 1, the reference does not: KL[ref‖π] = +inf, gradient p − q finite.
    let c = ExactCase {
        policy: refr.clone(),
        policy_shape: one,
        reference: policy.clone(),
        ref_shape: one,
        mask: None,
        opts: ExactKlOptions::new(ExactDivergence::RefPolicy),
    };
    let f = b.forward(&c).unwrap();
    assert_eq!(f.value[0], f32::INFINITY);
    let g = b.backward(&c, &f, &[1.0], false).unwrap();
    assert!(g.iter().all(|x| x.is_finite()));
    assert!((g[1].to_f64() + 0.25).abs() < 1e-6, "p − q at the banned token: 0 − 1/4");
    // KL[π‖ref] stays finite where only the policy bans a token.
    let c = ExactCase { opts: ExactKlOptions::new(ExactDivergence::PolicyRef), ..c };
    assert!(b.forward(&c).unwrap().value[0].is_finite());
    // The JSD's mixture where β·p underflows in linear space: probabilities of e^-103 (f32
    // subnormals) on both sides (a hostile batch found `+inf` on the GPU), and a tiny β.
    let policy = vec![0.0f32, 0.0, -102.18032];
    let reference = vec![0.0f32, 102.87347, 0.0];
    let one = RowShape::new(1, 3);
    for beta in [0.5, 1e-30, 1.0 - 1e-7] {
        let c = ExactCase {
            policy: policy.clone(),
            policy_shape: one,
            reference: reference.clone(),
            ref_shape: one,
            mask: None,
            opts: ExactKlOptions::new(ExactDivergence::Jsd { beta }),
        };
        let rows = ReferenceRows::new(&c.reference[..], one);
        let want = reference::exact_kl(&c.policy, one, &rows, &c.opts).unwrap().value[0];
        let f = b.forward(&c).unwrap();
        assert!(
            (f.value[0] as f64 - want).abs() <= 1e-5 * (1.0 + want.abs()),
            "β {beta}: {} vs {want}",
            f.value[0]
        );
        let g = b.backward(&c, &f, &[1.0], false).unwrap();
        assert!(g.iter().all(|x| x.to_f64().is_finite()), "β {beta}: gradient {g:?}");
    }
}

pub fn exact_errors(b: &impl ExactBackend) {
    let shape = RowShape::new(2, 3);
    let good = vec![0.0f32; 6];
    let mut bad = good.clone();
    bad[4] = f32::NAN;
    let case = |p: &Vec<f32>, q: &Vec<f32>, d| ExactCase {
        policy: p.clone(),
        policy_shape: shape,
        reference: q.clone(),
        ref_shape: shape,
        mask: None,
        opts: ExactKlOptions::new(d),
    };
    for d in DIVERGENCES {
        assert_eq!(
            b.forward(&case(&good, &bad, d)).unwrap_err(),
            Error::InvalidRow { op: "exact_kl", row: 1, problem: RowProblem::NaN }
        );
        assert_eq!(
            b.forward(&case(&bad, &good, d)).unwrap_err(),
            Error::InvalidRow { op: "exact_kl", row: 1, problem: RowProblem::NaN }
        );
    }
    let all_ninf = vec![f32::NEG_INFINITY; 6];
    assert_eq!(
        b.forward(&case(&all_ninf, &good, ExactDivergence::RefPolicy)).unwrap_err(),
        Error::InvalidRow { op: "exact_kl", row: 0, problem: RowProblem::AllNegInf }
    );
    let mut c = case(&good, &good, ExactDivergence::Jsd { beta: 1.0 });
    assert!(matches!(b.forward(&c), Err(Error::InvalidOption { name: "jsd beta", .. })));
    c.opts = ExactKlOptions::new(ExactDivergence::PolicyRef);
    c.ref_shape = RowShape::new(3, 2);
    assert!(matches!(b.forward(&c), Err(Error::ShapeMismatch { .. })));
    let c = case(&good, &good, ExactDivergence::PolicyRef);
    let f = b.forward(&c).unwrap();
    assert_eq!(
        b.backward(&c, &f, &[1.0, f32::NAN], false).unwrap_err(),
        Error::InvalidRow { op: "exact_kl_backward", row: 1, problem: RowProblem::GradNonFinite }
    );
}

/// One vocabulary shard of an [`ExactCase`]: the same columns of both sides, dense.
pub struct Shard<P, Q> {
    pub policy: Vec<P>,
    pub reference: Vec<Q>,
    pub shape: RowShape,
}

impl<P: Element, Q: Element> ExactCase<P, Q> {
    /// The case cut at the column `bounds` (first 0, last cols).
    pub fn shards(&self, bounds: &[usize]) -> Vec<Shard<P, Q>> {
        fn cut<T: Copy>(data: &[T], shape: RowShape, lo: usize, hi: usize) -> Vec<T> {
            (0..shape.rows)
                .flat_map(|r| data[shape.row_start(r) + lo..shape.row_start(r) + hi].to_vec())
                .collect()
        }
        let rows = self.policy_shape.rows;
        bounds
            .windows(2)
            .map(|w| Shard {
                policy: cut(&self.policy, self.policy_shape, w[0], w[1]),
                reference: cut(&self.reference, self.ref_shape, w[0], w[1]),
                shape: RowShape::new(rows, w[1] - w[0]),
            })
            .collect()
    }
}

/// Column bounds of uneven shards of a 20 000-wide row: a 1-wide shard, one ending on a chunk
/// boundary, one a single column past it.
const SHARD_BOUNDS: [usize; 6] = [0, 1, 7_777, 8_192, 19_999, 20_000];

/// The shard recipe gives the whole row's divergence and normalisers (masked rows, banned
/// tokens, every divergence, the JSD's two rounds).
pub fn exact_shards(b: &impl ExactBackend) {
    let rows = 6usize;
    for divergence in DIVERGENCES {
        let case = ExactCase::<bf16, f16>::random(rows, *SHARD_BOUNDS.last().unwrap(), divergence, 0.7, 31);
        let whole = b.forward(&case).unwrap();
        let got = b.forward_sharded(&case, &case.shards(&SHARD_BOUNDS)).unwrap();
        let tol = Tolerance { rel: 1e-5, abs: 1e-5 * case.scale() };
        let f64s = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<_>>();
        assert_close(&got.value, &f64s(&whole.value), tol, &format!("{divergence:?} value from shards"));
        assert_close(&got.policy_lse, &f64s(&whole.policy_lse), tol, &format!("{divergence:?} policy lse"));
        assert_close(&got.ref_lse, &f64s(&whole.ref_lse), tol, &format!("{divergence:?} ref lse"));
        if let Some(mask) = &case.mask {
            for r in (0..rows).filter(|&r| mask[r] == 0) {
                assert_eq!(got.value[r], 0.0, "{divergence:?}: masked row {r} gives 0");
            }
        }
    }
}

/// A NaN or `+inf` in one shard of a row refuses that row when the shards are merged.
pub fn exact_shard_problems(b: &impl ExactBackend) {
    for (divergence, bad, problem) in [
        (ExactDivergence::PolicyRef, f32::NAN, RowProblem::NaN),
        (ExactDivergence::Jsd { beta: 0.5 }, f32::INFINITY, RowProblem::PosInf),
    ] {
        let case = ExactCase::<f32, f32>::random(3, *SHARD_BOUNDS.last().unwrap(), divergence, 1.0, 5);
        let mut shards = case.shards(&SHARD_BOUNDS);
        let s = &mut shards[3];
        s.reference[s.shape.row_start(2) + 17] = bad;
        let err = b.forward_sharded(&case, &shards).unwrap_err();
        assert!(
            matches!(err, Error::InvalidRow { row: 2, problem: p, .. } if p == problem),
            "{divergence:?}: a {bad} in one shard: {err}"
        );
    }
}

/// The batch statistic from the same call: every aggregation and normaliser against the
/// host aggregation of the reference values, the same bits with or without the value output,
/// and a view of the wrong size refused.
pub fn exact_statistic(b: &impl ExactBackend) {
    let aggregations = [
        Aggregation::TokenMean,
        Aggregation::SeqMeanTokenSum,
        Aggregation::SeqMeanTokenMean,
        Aggregation::SeqMeanTokenSumNorm { max_len: 16 },
    ];
    for (k, divergence) in DIVERGENCES.into_iter().enumerate() {
        let c = ExactCase::<bf16, f16>::random(24, 300, divergence, 0.9, 60 + k as u64);
        let mask = c.mask.as_deref();
        let e = reference::exact_kl(&c.policy, c.policy_shape, &c.reference_rows(), &c.opts).unwrap();
        let sequences = RowShape::new(3, 8);
        for (j, aggregation) in aggregations.into_iter().enumerate() {
            let normaliser = if j % 2 == 0 {
                Normaliser::Local
            } else {
                Normaliser::Global { valid_tokens: 50.0, valid_sequences: 5.0, sequences: 6.0 }
            };
            let stat = ExactKlStatistic { sequences, aggregation, normaliser };
            let exact: Vec<f32> = e.value.iter().map(|&v| v as f32).collect();
            let want = aggregation.aggregate(&exact, sequences, mask, normaliser).unwrap();
            let (value, got) = b.forward_with_statistic(&c, stat, true).unwrap();
            assert_eq!(
                got.counts,
                BatchCounts::of(sequences, mask),
                "{divergence:?}: the batch's own counts"
            );
            let got = got.value;
            let scale = e.value.iter().filter(|v| v.is_finite()).fold(1.0f64, |m, v| m.max(v.abs())) * 24.0;
            let tol = Tolerance::for_dtype(DType::F32).scaled(scale);
            assert_close(&[got as f32], &[want], tol, &format!("{divergence:?} {aggregation:?}"));
            let from_values = aggregation.aggregate(&value, sequences, mask, normaliser).unwrap();
            assert!(
                got == from_values || (got - from_values).abs() <= 1e-6 * from_values.abs().max(1.0),
                "statistic of its own values: {got} vs {from_values} ({divergence:?} {aggregation:?})"
            );
            let (_, alone) = b.forward_with_statistic(&c, stat, false).unwrap();
            let alone = alone.value;
            assert_eq!(
                alone.to_bits(),
                got.to_bits(),
                "{divergence:?}: the statistic depends on the value output"
            );
        }
        let wrong = ExactKlStatistic::masked_mean(RowShape::new(5, 5));
        assert!(matches!(
            b.forward_with_statistic(&c, wrong, true),
            Err(Error::ShapeMismatch { what: "statistic sequences", .. })
        ));
    }
}
