//! Hostile but finite input, property-tested on any backend: random values across the whole
//! f32 range (huge, tiny, subnormal, of either sign, mixed within a row) and random options go
//! into every entry point of a backend through the families' test traits. Each call must return
//! a typed error, or outputs that are finite or the ±inf its docs name. Never a panic (proptest
//! reports one as a failure), never an undocumented NaN, never an overflow to ±inf that no doc
//! names. The same bodies run on the CPU (`tests/hostile.rs`, beside the reference's) and on
//! CUDA (`tests/hostile_cuda.rs`); [`named_cases`] pins the exact error of each case that once
//! returned a NaN or an infinity.

use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use rlhf_kernels::{
    Aggregation, Error, ExactDivergence, ExactKlOptions, ExactKlStatistic, GaeOptions, GroupAdvantageOptions,
    GroupStd, Groups, KlEstimator, KlRewardsInputs, KlRewardsOptions, LogSoftmaxOptions, MaskedSteps,
    Normaliser, OverlongInputs, OverlongOptions, PolicyLossOptions, PolicyObjective, Result, RowProblem,
    RowShape, SampledKlOptions, SingletonGroups, TokenGrads, TokenLogprobsOptions, ValueLossOptions,
    WhitenOptions,
};

use super::advantages::{AdvantagesBackend, GaeCase};
use super::kl::{ExactBackend, ExactCase, ExactOut, SampledBackend, SampledCase};
use super::ppo::{FusedBackend, FusedCase, PolicyCase, PpoBackend, ValueCase};
use super::tokens::{Case, TokenBackend};
use super::{Backward, Forward};

/// Every family trait: what a backend implements to run the hostile bodies.
pub trait Backend:
    Forward
    + Backward
    + TokenBackend
    + SampledBackend
    + ExactBackend
    + AdvantagesBackend
    + PpoBackend
    + FusedBackend
{
}
impl<B> Backend for B where
    B: Forward
        + Backward
        + TokenBackend
        + SampledBackend
        + ExactBackend
        + AdvantagesBackend
        + PpoBackend
        + FusedBackend
{
}

/// A finite f32 from anywhere in the range: ordinary values, any finite bit pattern (mostly huge
/// or tiny magnitudes), and the extremes.
pub fn wild() -> impl Strategy<Value = f32> {
    prop_oneof![
        -8.0f32..8.0,
        any::<u32>().prop_map(|b| {
            let x = f32::from_bits(b);
            if x.is_finite() { x } else { f32::MAX.copysign(x) }
        }),
        prop::sample::select(vec![
            0.0,
            -0.0,
            f32::MAX,
            -f32::MAX,
            f32::MIN_POSITIVE,
            -f32::MIN_POSITIVE,
            1e-45,
            1e30,
            -1e30,
            1e19,
            -1e19,
            80.0,
            -80.0,
        ]),
    ]
}

/// rows × cols (row stride cols + pad) of three wild inputs, a mask, a target per row, a score
/// per row, eight wild scalars for the options and eight small choices.
#[derive(Debug, Clone)]
pub struct Batch {
    pub shape: RowShape,
    pub a: Vec<f32>,
    pub b: Vec<f32>,
    pub c: Vec<f32>,
    pub mask: Vec<u8>,
    pub targets: Vec<i64>,
    pub scores: Vec<f32>,
    pub scalars: Vec<f32>,
    pub pick: Vec<u8>,
}

impl Batch {
    /// The first `n` elements of the three inputs.
    fn abc(&self, n: usize) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        (self.a[..n].to_vec(), self.b[..n].to_vec(), self.c[..n].to_vec())
    }
}

pub fn batch() -> impl Strategy<Value = Batch> {
    (1usize..5, 1usize..7, 0usize..3).prop_flat_map(|(rows, cols, pad)| {
        let shape = RowShape::new(rows, cols).with_row_stride(cols + pad);
        let n = shape.rows * shape.row_stride;
        (
            prop::collection::vec(wild(), n),
            prop::collection::vec(wild(), n),
            prop::collection::vec(wild(), n),
            prop::collection::vec(prop_oneof![3 => Just(1u8), 1 => Just(0u8)], n),
            prop::collection::vec(0..cols as i64, rows),
            prop::collection::vec(wild(), rows),
            prop::collection::vec(wild(), 8),
            prop::collection::vec(any::<u8>(), 8),
        )
            .prop_map(move |(a, b, c, mask, targets, scores, scalars, pick)| Batch {
                shape,
                a,
                b,
                c,
                mask,
                targets,
                scores,
                scalars,
                pick,
            })
    })
}

/// What a checked output may hold besides finite values.
#[derive(Clone, Copy, PartialEq)]
pub enum Allow {
    Finite,
    NegInf,
    PosInf,
}

pub fn check(what: &str, values: impl IntoIterator<Item = f64>, allow: Allow) -> Result<(), TestCaseError> {
    for (i, v) in values.into_iter().enumerate() {
        let ok = v.is_finite()
            || (allow == Allow::NegInf && v == f64::NEG_INFINITY)
            || (allow == Allow::PosInf && v == f64::INFINITY);
        if !ok {
            return Err(TestCaseError::fail(format!("{what}[{i}] = {v}")));
        }
    }
    Ok(())
}

pub fn f32s(v: &[f32]) -> impl Iterator<Item = f64> + '_ {
    v.iter().map(|&x| x as f64)
}

/// The valid positions of a `[B, T]` output: padding columns past `cols` are never written.
pub fn valid_cells(shape: RowShape, v: &[f32]) -> Vec<f64> {
    (0..shape.rows).flat_map(|r| v[shape.row_range(r)].iter().map(|&x| x as f64)).collect()
}

/// Runs `f` on `cases` random batches; an `Err` of the crate is a pass, its `Ok` is checked by `f`.
pub fn run(cases: u32, f: impl Fn(&Batch) -> Result<(), TestCaseError>) {
    let mut runner = TestRunner::new(Config { cases, ..Config::default() });
    runner.run(&batch(), |b| f(&b)).unwrap();
}

/// `Ok(value)` to check, or `None` for a typed error (which is a pass).
pub fn ok<T>(r: Result<T>) -> Option<T> {
    match r {
        Ok(v) => Some(v),
        Err(Error::InvalidRow { .. } | Error::InvalidOption { .. } | Error::TargetOutOfRange { .. }) => None,
        Err(e) => panic!("unexpected error kind for valid shapes: {e}"),
    }
}

pub fn temperature(b: &Batch) -> f32 {
    if b.pick[0] % 2 == 0 { 1.0 } else { b.scalars[0].abs().max(1e-30) }
}

pub fn estimator(pick: u8) -> KlEstimator {
    KlEstimator::ALL[pick as usize % KlEstimator::ALL.len()]
}

pub fn aggregation(pick: u8, cols: usize) -> Aggregation {
    match pick % 4 {
        0 => Aggregation::TokenMean,
        1 => Aggregation::SeqMeanTokenSum,
        2 => Aggregation::SeqMeanTokenMean,
        _ => Aggregation::SeqMeanTokenSumNorm { max_len: cols },
    }
}

/// The divergence of an exact-KL case and what its value may be besides finite (`KL[π_ref‖π]`
/// is `+inf` where the policy bans a token the reference samples).
pub fn divergence(pick: u8) -> (ExactDivergence, Allow) {
    match pick % 3 {
        0 => (ExactDivergence::PolicyRef, Allow::Finite),
        1 => (ExactDivergence::RefPolicy, Allow::PosInf),
        _ => (ExactDivergence::Jsd { beta: 0.5 }, Allow::Finite),
    }
}

/// Log-softmax forward and backward, token log-probs (with and without a mask) and both
/// backwards.
pub fn logprobs_family(be: &impl Backend, cases: u32) {
    run(cases, |b| {
        let s = b.shape;
        let tau = temperature(b);
        let ls = LogSoftmaxOptions::default().temperature(tau);
        if let Some(out) = ok(Forward::forward(be, &b.a, s, &ls)) {
            check("log_softmax", f32s(&out), Allow::NegInf)?;
            if let Some(g) = ok(Backward::backward::<f32>(be, &out, &b.b[..s.len()], s.dense(), &ls)) {
                check("log_softmax_backward", f32s(&g), Allow::Finite)?;
            }
        }
        let opts = TokenLogprobsOptions::default().temperature(tau);
        for mask in [None, Some(b.mask[..s.rows].to_vec())] {
            let case = Case { logits: b.a.clone(), shape: s, targets: b.targets.clone(), mask, opts };
            if let Some(f) = ok(TokenBackend::forward(be, &case, true)) {
                check("logp", f32s(&f.logp), Allow::NegInf)?;
                check("entropy", f32s(&f.entropy), Allow::Finite)?;
                check("lse", f32s(&f.lse), Allow::Finite)?;
                let grads =
                    TokenGrads::new(&f.lse).grad_logp(&b.scores).grad_entropy(&b.c[..s.rows], &f.entropy);
                for in_place in [false, true] {
                    if let Some(g) = ok(TokenBackend::backward(be, &case, &grads, in_place)) {
                        check("token_logprobs_backward", valid_cells(s, &g), Allow::Finite)?;
                    }
                }
            }
        }
        Ok(())
    });
}

/// Sampled KL with random options, KL-in-reward shaping, and the exact divergences with their
/// backward.
pub fn kl_family(be: &impl Backend, cases: u32) {
    run(cases, |b| {
        let s = b.shape;
        let mask = &b.mask[..s.rows * s.row_stride];
        let coef = if b.pick[1] % 2 == 0 { 0.1 } else { b.scalars[1] };
        let clamp = |x: f32| if b.pick[2] % 3 == 0 { None } else { Some(x.abs().max(1e-3)) };
        let opts = SampledKlOptions::new(estimator(b.pick[3]))
            .coef(coef)
            .log_ratio_clamp(clamp(b.scalars[2]))
            .value_clamp(clamp(b.scalars[3]))
            .aggregation(aggregation(b.pick[4], s.cols))
            .bias_correction(b.pick[5] % 2 == 1);
        let case = SampledCase {
            logp: b.a.clone(),
            ref_logp: b.b.clone(),
            shape: s,
            mask: Some(mask.to_vec()),
            // The bias correction's sampling log-probs: the third wild array.
            old_logp: opts.bias_correction.then(|| b.c.clone()),
            opts,
        };
        if let Some((values, grad, stats)) = ok(be.sampled(&case)) {
            check("sampled_kl values", valid_cells(s, &values), Allow::Finite)?;
            check("sampled_kl grad", valid_cells(s, &grad), Allow::Finite)?;
            check(
                "sampled_kl stats",
                [stats.loss, stats.clamped_fraction].into_iter().chain(stats.means),
                Allow::Finite,
            )?;
        }
        if let Some(r) = ok(be.rewards(
            &KlRewardsInputs::new(s, &b.a, &b.scores).mask(mask),
            &KlRewardsOptions::new(b.scalars[4]),
        )) {
            check("kl_rewards", valid_cells(s, &r), Allow::Finite)?;
        }

        let (divergence, value_allow) = divergence(b.pick[5]);
        let case = ExactCase {
            policy: b.a.clone(),
            policy_shape: s,
            reference: b.b.clone(),
            ref_shape: s,
            mask: Some(b.mask[..s.rows].to_vec()),
            opts: ExactKlOptions::new(divergence).temperature(temperature(b)),
        };
        if let Some(f) = ok(ExactBackend::forward(be, &case)) {
            check("exact_kl", f32s(&f.value), value_allow)?;
            check("exact_kl lse", f32s(&f.policy_lse).chain(f32s(&f.ref_lse)), Allow::Finite)?;
            for in_place in [false, true] {
                if let Some(g) = ok(ExactBackend::backward(be, &case, &f, &b.scores, in_place)) {
                    check("exact_kl_backward", valid_cells(s, &g), Allow::Finite)?;
                }
            }
        }
        Ok(())
    });
}

/// GAE with random γ, λ and masked-step convention, the group estimators, moments and
/// whitening, and the aggregation of any `[B, T]` values.
pub fn advantages_family(be: &impl Backend, cases: u32) {
    run(cases, |b| {
        let s = b.shape.dense();
        let n = s.len();
        let opts = gae_options(b);
        let (rewards, values, kl) = b.abc(n);
        let case = GaeCase {
            shape: s,
            rewards: Some(rewards),
            kl: Some(kl),
            beta: b.scalars[2],
            scores: Some(b.scores.clone()),
            values: Some(values),
            mask: Some(b.mask[..n].to_vec()),
        };
        if let Some((adv, ret)) = ok(be.gae(&case, &opts)) {
            check("gae advantages", f32s(&adv), Allow::Finite)?;
            check("gae returns", f32s(&ret), Allow::Finite)?;
        }

        let ids: Vec<u32> = (0..s.rows as u32).map(|i| i % 2).collect();
        let groups = Groups::new(&ids, 2).unwrap();
        let gopts = group_options(b);
        if let Some((a, _)) = ok(be.group(&b.scores, &groups, &gopts, None)) {
            check("group_advantages", f32s(&a), Allow::Finite)?;
        }
        // DAPO's overlong shaping with a wild penalty and band (0 or past max_len: errors).
        let band = (b.pick[6] as usize) % (s.cols + 2);
        let oopts = OverlongOptions::new(s.cols, band).penalty(b.scalars[5]);
        let oinputs = OverlongInputs::new(s, &b.scores).mask(&b.mask[..n]);
        if let Some(shaped) = ok(be.overlong(&oinputs, &oopts)) {
            check("overlong_shaping", f32s(&shaped), Allow::Finite)?;
        }

        let mask = Some(&b.mask[..n]);
        if let Some(m) = ok(be.moments(&b.a[..n], s, mask)) {
            check("moments", [m.count, m.mean, m.var], Allow::Finite)?;
        }
        let wopts = WhitenOptions::default().keep_mean(b.pick[4] % 2 == 0).eps(b.scalars[4].abs());
        if let Some((w, _)) = ok(be.whiten(&b.a[..n], s, mask, &wopts)) {
            check("whiten", f32s(&w), Allow::Finite)?;
        }
        if let Some(v) =
            ok(be.aggregate(&b.a[..n], s, mask, aggregation(b.pick[5], s.cols), Normaliser::Local))
        {
            check("aggregate", [v], Allow::Finite)?;
        }
        Ok(())
    });
}

/// The GAE options a batch picks: γ and λ in [0, 1], either masked-step convention.
pub fn gae_options(b: &Batch) -> GaeOptions {
    let (gamma, lambda) = if b.pick[0] % 2 == 0 {
        (1.0, 0.95)
    } else {
        (b.scalars[0].abs().min(1.0), b.scalars[1].abs().min(1.0))
    };
    let masked = if b.pick[1] % 2 == 0 { MaskedSteps::PassThrough } else { MaskedSteps::Reset };
    GaeOptions::new(gamma, lambda).masked_steps(masked)
}

/// The group estimator, standard deviation and ε a batch picks.
pub fn group_options(b: &Batch) -> GroupAdvantageOptions {
    let std = [GroupStd::Unbiased, GroupStd::Biased, GroupStd::NoStd][b.pick[2] as usize % 3];
    match b.pick[3] % 3 {
        0 => GroupAdvantageOptions::grpo(),
        1 => GroupAdvantageOptions::rloo(),
        _ => GroupAdvantageOptions::group_mean(),
    }
    .std(std)
    .eps(b.scalars[3].abs())
    .singletons(SingletonGroups::Neutral)
}

/// The policy-loss options a batch picks.
pub fn policy_options(b: &Batch, cols: usize) -> PolicyLossOptions {
    let objective = match b.pick[0] % 6 {
        0 => PolicyObjective::Clip,
        1 => PolicyObjective::KlPenalty { beta: b.scalars[0] },
        2 => PolicyObjective::Gspo,
        3 => PolicyObjective::Cispo,
        // Wild temperatures: non-positive, infinite or NaN ones are option errors.
        4 => PolicyObjective::Sapo { tau_pos: b.scalars[0], tau_neg: b.scalars[1] },
        _ => PolicyObjective::Gmpo,
    };
    let clamp = match b.pick[1] % 3 {
        0 => Some(20.0),
        1 => Some(b.scalars[1].abs().clamp(1e-3, 80.0)),
        _ => None,
    };
    PolicyLossOptions::new(objective)
        .log_ratio_clamp(clamp)
        .dual_clip(if b.pick[2] % 2 == 0 { None } else { Some(3.0) })
        .entropy_coef(if b.pick[3] % 2 == 0 { 0.0 } else { b.scalars[2] })
        .aggregation(aggregation(b.pick[4], cols))
}

/// The value-loss options a batch picks.
pub fn value_options(b: &Batch, cols: usize) -> ValueLossOptions {
    ValueLossOptions::default()
        .clip(if b.pick[5] % 2 == 0 { None } else { Some(b.scalars[3].abs()) })
        .coef(if b.pick[6] % 2 == 0 { 0.5 } else { b.scalars[4] })
        .aggregation(aggregation(b.pick[7], cols))
}

/// The policy loss (every objective, random clamps, with and without entropies), the value
/// loss, and the fused path from the logits (the rows as one sequence, with and without the KL
/// term, out of place and in place).
pub fn ppo_family(be: &impl Backend, cases: u32) {
    run(cases, |b| {
        let s = b.shape.dense();
        let n = s.len();
        let opts = policy_options(b, s.cols);
        let (logp, old_logp, advantages) = b.abc(n);
        let mask = Some(b.mask[..n].to_vec());
        let case = PolicyCase { shape: s, logp, old_logp, advantages, mask: mask.clone(), entropy: None };
        let with_entropy = PolicyCase { entropy: Some(b.c[..n].to_vec()), ..case.clone() };
        for case in [case, with_entropy] {
            if let Some(out) = ok(be.policy(&case, &opts)) {
                check("policy loss", f32s(&out.loss), Allow::Finite)?;
                check("policy grad", f32s(&out.grad_logp).chain(f32s(&out.grad_entropy)), Allow::Finite)?;
                let st = out.stats;
                let means = [
                    st.loss,
                    st.policy_loss,
                    st.entropy_loss,
                    st.approx_kl_k1,
                    st.approx_kl_k3,
                    st.ratio_mean,
                ];
                check("policy stats", means, Allow::Finite)?;
            }
        }
        let (values, old_values, returns) = b.abc(n);
        let case = ValueCase { shape: s, values, old_values, returns, mask };
        if let Some((loss, grad, st)) = ok(be.value(&case, &value_options(b, s.cols))) {
            check("value loss", f32s(&loss).chain(f32s(&grad)), Allow::Finite)?;
            check("value stats", [st.loss], Allow::Finite)?;
        }

        let rows = b.shape.rows;
        let fused = FusedCase {
            shape: b.shape,
            logits: b.a.clone(),
            targets: b.targets.clone(),
            mask: b.mask[..rows].to_vec(),
            sequences: RowShape::new(1, rows),
            old_logp: b.b[..rows].to_vec(),
            advantages: b.c[..rows].to_vec(),
            ref_logp: (b.pick[7] % 2 == 0).then(|| b.scores.clone()),
            kl_bias_correction: b.pick[6] % 2 == 0,
        };
        let opts = policy_options(b, rows);
        for in_place in [false, true] {
            if let Some((grad, st)) = ok(be.fused(&fused, &fused.options(&opts), in_place)) {
                check("fused grad", valid_cells(b.shape, &grad), Allow::Finite)?;
                let kl = st.kl.map(|k| k.loss);
                check("fused stats", [st.total_loss(), st.policy.loss].into_iter().chain(kl), Allow::Finite)?;
            }
        }
        Ok(())
    });
}

fn row(op: &'static str, row: usize, problem: RowProblem) -> Error {
    Error::InvalidRow { op, row, problem }
}

fn err_of<T>(r: Result<T>) -> Error {
    match r {
        Ok(_) => panic!("Ok where an error was expected"),
        Err(e) => e,
    }
}

/// Each hostile input that once returned `Ok` with a NaN or ±inf, with the error it gives now.
pub fn named_cases(be: &impl Backend) {
    use RowProblem::{NonFinite, Overflow};
    let shape = RowShape::new(2, 2);
    // kl_rewards with a NaN KL or score.
    let kl = [0.1f32, 0.2, f32::NAN, 0.3];
    assert_eq!(
        err_of(be.rewards(&KlRewardsInputs::new(shape, &kl, &[1.0, 1.0]), &KlRewardsOptions::new(0.1))),
        row("kl_rewards", 1, NonFinite)
    );
    let r =
        be.rewards(&KlRewardsInputs::new(shape, &[0.1; 4], &[f32::NAN, 1.0]), &KlRewardsOptions::new(0.1));
    assert_eq!(err_of(r), row("kl_rewards", 0, NonFinite));
    // The aggregate of a NaN (a masked one is not read), of +inf, and of +inf with -inf.
    let (agg, local) = (Aggregation::TokenMean, Normaliser::Local);
    let values = [1.0f32, 2.0, f32::NAN, 3.0];
    assert_eq!(err_of(be.aggregate(&values, shape, None, agg, local)), row("aggregate", 1, NonFinite));
    assert_eq!(be.aggregate(&values, shape, Some(&[1, 1, 0, 1]), agg, local).unwrap(), 2.0);
    let inf = [1.0f32, f32::INFINITY, 0.0, 0.0];
    assert_eq!(be.aggregate(&inf, shape, None, agg, local).unwrap(), f64::INFINITY);
    let both = [1.0f32, f32::INFINITY, f32::NEG_INFINITY, 0.0];
    assert_eq!(err_of(be.aggregate(&both, shape, None, agg, local)), row("aggregate", 0, NonFinite));
    // Whitening that keeps the mean of one f32::MAX under a tiny ε: x·scale − mean·scale would
    // cancel at 1e54 and round past f32::MAX; the deviation first gives the value back.
    let keep = WhitenOptions::default().keep_mean(true).eps(1.2e-32);
    let (w, m) = be.whiten(&[f32::MAX], RowShape::new(1, 1), Some(&[1]), &keep).unwrap();
    assert_eq!((w, m.var), (vec![f32::MAX], 0.0));
    // policy_loss with log_ratio_clamp(80) and |A| = 1e4: e^80·1e4 > 3.4e38.
    let one_by_two = RowShape::new(1, 2);
    let case = PolicyCase {
        shape: one_by_two,
        logp: vec![0.0, 100.0],
        old_logp: vec![0.0, 0.0],
        advantages: vec![1.0, -1e4],
        mask: None,
        entropy: None,
    };
    let opts = PolicyLossOptions::new(PolicyObjective::KlPenalty { beta: 0.1 }).log_ratio_clamp(Some(80.0));
    assert_eq!(err_of(be.policy(&case, &opts)), row("policy_loss", 0, Overflow));
    // value_loss with ½·(v − R)² > 3.4e38 (|v − R| > 2.6e19; 2e19 fits).
    let case = ValueCase {
        shape,
        values: vec![0.0, 0.0, 3e19, 0.0],
        old_values: vec![0.0; 4],
        returns: vec![0.0; 4],
        mask: None,
    };
    assert_eq!(err_of(be.value(&case, &ValueLossOptions::default())), row("value_loss", 1, Overflow));
    let fits = ValueCase { values: vec![0.0, 0.0, 2e19, 0.0], ..case };
    assert!(be.value(&fits, &ValueLossOptions::default()).is_ok());
    // token_logprobs with logits 1e30 and τ = 1e-9: lse = 1e39.
    let opts = TokenLogprobsOptions::default().temperature(1e-9);
    let case = Case { logits: vec![1e30f32, 0.0], shape: one_by_two, targets: vec![0], mask: None, opts };
    assert_eq!(err_of(TokenBackend::forward(be, &case, true)), row("token_logprobs", 0, Overflow));
    // Its backward at τ = 0.25 with ∂L/∂logp = 3e38: 4·3e38·(1 − ½) does not fit f32.
    let opts = TokenLogprobsOptions::default().temperature(0.25);
    let case = Case { logits: vec![0.0f32, 0.0], shape: one_by_two, targets: vec![0], mask: None, opts };
    let (lse, g) = ([(2.0f32).ln() * 1.0], [3e38f32]);
    for in_place in [false, true] {
        let r = TokenBackend::backward(be, &case, &TokenGrads::new(&lse).grad_logp(&g), in_place);
        assert_eq!(err_of(r), row("token_logprobs_backward", 0, Overflow), "in place: {in_place}");
    }
    // The log-softmax backward at τ = 0.5 with an upstream gradient of ±3e38 (sum 0).
    let ls = LogSoftmaxOptions::default().temperature(0.5);
    let out = [-(2.0f32).ln(); 2];
    let r = Backward::backward::<f32>(be, &out, &[3e38, -3e38], one_by_two, &ls);
    assert_eq!(err_of(r), row("log_softmax_backward", 0, Overflow));
    // sampled_kl with β = 3e38: k2's gradient −log r = −2 times β overflows to −inf (1e38 fits).
    let one = RowShape::new(1, 1);
    let opts = SampledKlOptions::new(KlEstimator::K2).coef(3e38);
    let case =
        SampledCase { logp: vec![-3.0], ref_logp: vec![-1.0], shape: one, mask: None, old_logp: None, opts };
    assert_eq!(err_of(be.sampled(&case)), row("sampled_kl", 0, Overflow));
    assert!(be.sampled(&SampledCase { opts: opts.coef(1e38), ..case }).is_ok());
    // The exact divergences with logits 1e30 at τ = 1e-9 (lse beyond f32), and a backward whose
    // ∂L/∂KL·(1/τ) overflows.
    for (divergence, _) in [0, 1, 2].map(divergence) {
        let case = ExactCase {
            policy: vec![1e30f32, 0.0],
            policy_shape: one_by_two,
            reference: vec![0.0f32, 1.0],
            ref_shape: one_by_two,
            mask: None,
            opts: ExactKlOptions::new(divergence).temperature(1e-9),
        };
        assert_eq!(err_of(ExactBackend::forward(be, &case)), row("exact_kl", 0, Overflow), "{divergence:?}");
        let case = ExactCase {
            policy: vec![0.0f32, 1.0],
            opts: ExactKlOptions::new(divergence).temperature(0.1),
            ..case
        };
        let f: ExactOut = ExactBackend::forward(be, &case).unwrap();
        for in_place in [false, true] {
            let r = ExactBackend::backward(be, &case, &f, &[3e38], in_place);
            assert_eq!(
                err_of(r),
                row("exact_kl_backward", 0, Overflow),
                "{divergence:?} in place: {in_place}"
            );
        }
    }
    // The exact KL's batch statistic over a row without a divergence names that row and the
    // exact KL (not the aggregation of the NaN it leaves there).
    let case = ExactCase {
        policy: vec![0.0f32, 1.0, f32::NAN, 0.0, 1.0, 2.0],
        policy_shape: RowShape::new(3, 2),
        reference: vec![0.0f32; 6],
        ref_shape: RowShape::new(3, 2),
        mask: None,
        opts: ExactKlOptions::new(ExactDivergence::PolicyRef),
    };
    let stat = ExactKlStatistic::masked_mean(RowShape::new(1, 3));
    for with_value in [false, true] {
        let r = ExactBackend::forward_with_statistic(be, &case, stat, with_value);
        assert_eq!(err_of(r), row("exact_kl", 1, RowProblem::NaN), "with the values: {with_value}");
    }
    // A NaN score in a group names the sequence that holds it, not the group's first member.
    let groups = Groups::new(&[0, 1, 0, 1], 2).unwrap();
    let r = be.group(&[1.0, 2.0, 3.0, f32::NAN], &groups, &GroupAdvantageOptions::grpo(), None);
    assert_eq!(err_of(r), row("group_advantages", 3, NonFinite));
    // A group without spread at ε = 0 has advantages 0, not 0/0.
    let (a, _) = be.group(&[2.0; 4], &groups, &GroupAdvantageOptions::grpo().eps(0.0), None).unwrap();
    assert_eq!(a, vec![0.0; 4]);
}
