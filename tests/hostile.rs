//! Hostile but finite input, property-tested: random values across the whole f32 range (huge,
//! tiny, subnormal, of either sign, mixed within a row) and random options go into every public
//! entry point of the CPU backend and the f64 reference. Each call must return a typed error, or
//! outputs that are finite or the ±inf its docs name. Never a panic (proptest reports one as a
//! failure), never an undocumented NaN, never an overflow to ±inf that no doc names.

use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use rlhf_kernels::{
    Aggregation, Error, ExactDivergence, ExactKlOptions, GaeInputs, GaeOptions, GroupAdvantageOptions,
    GroupStd, Groups, KlController, KlEstimator, LogSoftmaxOptions, MaskedSteps, Normaliser,
    PolicyLossInputs, PolicyLossOptions, PolicyObjective, Result, RowShape, SampledKlOptions, TokenGrads,
    TokenLogprobsOptions, TokenOutputs, Tokens, ValueLossInputs, ValueLossOptions, VocabPartial,
    WhitenOptions, cpu, reference,
};

/// A finite f32 from anywhere in the range: ordinary values, any finite bit pattern (mostly huge
/// or tiny magnitudes), and the extremes.
fn wild() -> impl Strategy<Value = f32> {
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

#[derive(Debug, Clone)]
struct Batch {
    shape: RowShape,
    a: Vec<f32>,
    b: Vec<f32>,
    c: Vec<f32>,
    mask: Vec<u8>,
    targets: Vec<i64>,
    scores: Vec<f32>,
    scalars: Vec<f32>,
    pick: Vec<u8>,
}

/// rows × cols (row stride cols + pad) of three wild inputs, a mask, a target per row, a score
/// per row, eight wild scalars for the options and eight small choices.
fn batch() -> impl Strategy<Value = Batch> {
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
enum Allow {
    Finite,
    NegInf,
    PosInf,
}

fn check(what: &str, values: impl IntoIterator<Item = f64>, allow: Allow) -> Result<(), TestCaseError> {
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

fn f32s(v: &[f32]) -> impl Iterator<Item = f64> + '_ {
    v.iter().map(|&x| x as f64)
}

/// The valid positions of a `[B, T]` output: padding columns past `cols` are never written.
fn valid_cells(shape: RowShape, v: &[f32]) -> Vec<f64> {
    (0..shape.rows).flat_map(|r| v[shape.row_range(r)].iter().map(|&x| x as f64)).collect()
}

/// Runs `f` on `cases` random batches; an `Err` of the crate is a pass, its `Ok` is checked by `f`.
fn run(cases: u32, f: impl Fn(&Batch) -> Result<(), TestCaseError>) {
    let mut runner = TestRunner::new(Config { cases, ..Config::default() });
    runner.run(&batch(), |b| f(&b)).unwrap();
}

/// `Ok(value)` to check, or `None` for a typed error (which is a pass).
fn ok<T>(r: Result<T>) -> Option<T> {
    match r {
        Ok(v) => Some(v),
        Err(Error::InvalidRow { .. } | Error::InvalidOption { .. } | Error::TargetOutOfRange { .. }) => None,
        Err(e) => panic!("unexpected error kind for valid shapes: {e}"),
    }
}

fn temperature(b: &Batch) -> f32 {
    if b.pick[0] % 2 == 0 { 1.0 } else { b.scalars[0].abs().max(1e-30) }
}

#[test]
fn logprobs_family() {
    run(400, |b| {
        let s = b.shape;
        let dense = s.dense();
        let tau = temperature(b);
        let ls = LogSoftmaxOptions::default().temperature(tau);
        let mut out = vec![0.0f32; s.len()];
        if ok(cpu::log_softmax(&b.a, s, &mut out, &ls)).is_some() {
            check("log_softmax", f32s(&out), Allow::NegInf)?;
            let mut grad = vec![0.0f32; s.rows * s.row_stride];
            if ok(cpu::log_softmax_backward(&out, &b.b[..s.len()], dense, &mut grad[..s.len()], &ls))
                .is_some()
            {
                check("log_softmax_backward", f32s(&grad[..s.len()]), Allow::Finite)?;
            }
        }
        if let Some(r) = ok(reference::log_softmax(&b.a, s, &ls)) {
            check("reference::log_softmax", r, Allow::NegInf)?;
        }
        if let Some(r) = ok(reference::log_softmax_backward(&b.a, s, &b.b[..s.len()], &ls)) {
            check("reference::log_softmax_backward", r, Allow::Finite)?;
        }

        let opts = TokenLogprobsOptions::default().temperature(tau);
        let tokens = Tokens::new(&b.targets);
        let masked = Tokens::new(&b.targets).with_mask(&b.mask[..s.rows]);
        for tok in [&tokens, &masked] {
            let (mut logp, mut entropy, mut lse) =
                (vec![0.0f32; s.rows], vec![0.0f32; s.rows], vec![0.0f32; s.rows]);
            let out = TokenOutputs::default().logp(&mut logp).entropy(&mut entropy).lse(&mut lse);
            if ok(cpu::token_logprobs(&b.a, s, tok, out, &opts)).is_some() {
                check("logp", f32s(&logp), Allow::NegInf)?;
                check("entropy", f32s(&entropy), Allow::Finite)?;
                check("lse", f32s(&lse), Allow::Finite)?;
                let grads = TokenGrads::new(&lse).grad_logp(&b.scores).grad_entropy(&b.c[..s.rows], &entropy);
                let mut grad = vec![0.0f32; s.rows * s.row_stride];
                if ok(cpu::token_logprobs_backward(&b.a, s, tok, &grads, &mut grad, &opts)).is_some() {
                    check("token_logprobs_backward", valid_cells(s, &grad), Allow::Finite)?;
                }
                let mut inplace = b.a.clone();
                if ok(cpu::token_logprobs_backward_in_place(&mut inplace, s, tok, &grads, &opts)).is_some() {
                    check("token_logprobs_backward_in_place", valid_cells(s, &inplace), Allow::Finite)?;
                }
            }
            if let Some(r) = ok(reference::token_logprobs(&b.a, s, tok, &opts)) {
                check("reference logp", r.logp, Allow::NegInf)?;
                check("reference entropy", r.entropy, Allow::Finite)?;
                check("reference lse", r.lse, Allow::Finite)?;
            }
            if let Some(r) =
                ok(reference::token_logprobs_backward(&b.a, s, tok, Some(&b.scores), None, &opts))
            {
                check("reference token_logprobs_backward", r, Allow::Finite)?;
            }
            // Two vocabulary shards of the same rows, merged.
            if s.cols >= 2 {
                let half = s.cols / 2;
                let (left, right) =
                    (RowShape::new(s.rows, half).with_row_stride(s.row_stride), s.cols - half);
                let right_shape = RowShape::new(s.rows, right).with_row_stride(s.row_stride);
                let mut partials = vec![<VocabPartial as bytemuck::Zeroable>::zeroed(); 2 * s.rows];
                let (p0, p1) = partials.split_at_mut(s.rows);
                let first = ok(cpu::vocab_shard_partials(&b.a, left, tok, 0, p0, &opts));
                let second = ok(cpu::vocab_shard_partials(&b.a[half..], right_shape, tok, half, p1, &opts));
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
        }
        // An offset that would overflow the global token id is an error, not a wrap.
        let mut partials = vec![<VocabPartial as bytemuck::Zeroable>::zeroed(); s.rows];
        let r = cpu::vocab_shard_partials(&b.a, s, &tokens, usize::MAX - s.cols / 2, &mut partials, &opts);
        prop_assert!(r.is_err(), "vocab_offset near usize::MAX accepted");
        Ok(())
    });
}

fn estimator(pick: u8) -> KlEstimator {
    KlEstimator::ALL[pick as usize % KlEstimator::ALL.len()]
}

fn aggregation(pick: u8, cols: usize) -> Aggregation {
    match pick % 4 {
        0 => Aggregation::TokenMean,
        1 => Aggregation::SeqMeanTokenSum,
        2 => Aggregation::SeqMeanTokenMean,
        _ => Aggregation::SeqMeanTokenSumNorm { max_len: cols },
    }
}

#[test]
fn kl_family() {
    run(400, |b| {
        let s = b.shape;
        let mask = &b.mask[..s.rows * s.row_stride];
        let coef = if b.pick[1] % 2 == 0 { 0.1 } else { b.scalars[1] };
        let clamp = |x: f32| if b.pick[2] % 3 == 0 { None } else { Some(x.abs().max(1e-3)) };
        let opts = SampledKlOptions::new(estimator(b.pick[3]))
            .coef(coef)
            .log_ratio_clamp(clamp(b.scalars[2]))
            .value_clamp(clamp(b.scalars[3]))
            .aggregation(aggregation(b.pick[4], s.cols));
        let (mut values, mut grad) =
            (vec![0.0f32; s.rows * s.row_stride], vec![0.0f32; s.rows * s.row_stride]);
        let out = cpu::SampledKlOutputs::default().values(&mut values).grad_logp(&mut grad);
        if let Some(stats) = ok(cpu::sampled_kl(&b.a, &b.b, s, Some(mask), out, &opts)) {
            check("sampled_kl values", valid_cells(s, &values), Allow::Finite)?;
            check("sampled_kl grad", valid_cells(s, &grad), Allow::Finite)?;
            check(
                "sampled_kl stats",
                [stats.loss, stats.clamped_fraction].into_iter().chain(stats.means),
                Allow::Finite,
            )?;
        }
        if let Some(r) = ok(reference::sampled_kl(&b.a, &b.b, s, Some(mask), &opts)) {
            check("reference sampled_kl", r.values.into_iter().chain(r.grad_logp), Allow::Finite)?;
            check("reference sampled_kl loss", [r.stats.loss], Allow::Finite)?;
        }

        let beta = b.scalars[4];
        let mut rewards = vec![0.0f32; s.rows * s.row_stride];
        if ok(cpu::kl_rewards(&b.a, s, Some(mask), &b.scores, beta, &mut rewards)).is_some() {
            check("kl_rewards", valid_cells(s, &rewards), Allow::Finite)?;
        }
        if let Some(r) = ok(reference::kl_rewards(&b.a, s, Some(mask), &b.scores, beta)) {
            check("reference kl_rewards", r, Allow::Finite)?;
        }

        // The exact divergences, each token row against the reference row.
        let tau = temperature(b);
        let divergence = match b.pick[5] % 3 {
            0 => ExactDivergence::PolicyRef,
            1 => ExactDivergence::RefPolicy,
            _ => ExactDivergence::Jsd { beta: 0.5 },
        };
        let xopts = ExactKlOptions::new(divergence).temperature(tau);
        let refs = cpu::ReferenceRows::new(&b.b, s).with_mask(&b.mask[..s.rows]);
        let value_allow =
            if divergence == ExactDivergence::RefPolicy { Allow::PosInf } else { Allow::Finite };
        let (mut kl, mut plse, mut rlse, mut term) =
            (vec![0.0f32; s.rows], vec![0.0f32; s.rows], vec![0.0f32; s.rows], vec![0.0f32; s.rows]);
        let out =
            cpu::ExactKlOutputs::default().value(&mut kl).lse(&mut plse, &mut rlse).policy_term(&mut term);
        if ok(cpu::exact_kl(&b.a, s, &refs, out, &xopts)).is_some() {
            check("exact_kl", f32s(&kl), value_allow)?;
            check("exact_kl lse", f32s(&plse).chain(f32s(&rlse)), Allow::Finite)?;
            let grads = cpu::ExactKlGrads {
                grad: &b.scores,
                policy_lse: &plse,
                ref_lse: &rlse,
                value: Some(&kl),
                policy_term: Some(&term),
            };
            let mut grad = vec![0.0f32; s.rows * s.row_stride];
            if ok(cpu::exact_kl_backward(&b.a, s, &refs, &grads, &mut grad, &xopts)).is_some() {
                check("exact_kl_backward", valid_cells(s, &grad), Allow::Finite)?;
            }
        }
        if let Some(r) = ok(reference::exact_kl(&b.a, s, &b.b, s, Some(&b.mask[..s.rows]), &xopts)) {
            check("reference exact_kl", r.value, value_allow)?;
            check("reference exact_kl lse", r.policy_lse.into_iter().chain(r.ref_lse), Allow::Finite)?;
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

#[test]
fn advantages_family() {
    run(400, |b| {
        let s = b.shape.dense();
        let n = s.len();
        let (gamma, lambda) = if b.pick[0] % 2 == 0 {
            (1.0, 0.95)
        } else {
            (b.scalars[0].abs().min(1.0), b.scalars[1].abs().min(1.0))
        };
        let masked = if b.pick[1] % 2 == 0 { MaskedSteps::PassThrough } else { MaskedSteps::Reset };
        let opts = GaeOptions::new(gamma, lambda).masked_steps(masked);
        let inputs = GaeInputs::new(s)
            .rewards(&b.a[..n])
            .values(&b.b[..n])
            .kl_penalty(&b.c[..n], b.scalars[2])
            .scores(&b.scores)
            .mask(&b.mask[..n]);
        let (mut adv, mut ret) = (vec![0.0f32; n], vec![0.0f32; n]);
        if ok(cpu::gae(&inputs, cpu::GaeOutputs::default().advantages(&mut adv).returns(&mut ret), &opts))
            .is_some()
        {
            check("gae advantages", f32s(&adv), Allow::Finite)?;
            check("gae returns", f32s(&ret), Allow::Finite)?;
        }
        if let Some(r) = ok(reference::gae(&inputs, &opts)) {
            check("reference gae", r.advantages.into_iter().chain(r.returns), Allow::Finite)?;
        }
        if let Some(e) = ok(rlhf_kernels::gae_error_scale(&inputs, &opts)) {
            check("gae_error_scale", e, Allow::Finite)?;
        }

        // Groups of the rows' scores.
        let ids: Vec<u32> = (0..s.rows as u32).map(|i| i % 2).collect();
        let groups = Groups::new(&ids, 2).unwrap();
        let std = [GroupStd::Unbiased, GroupStd::Biased, GroupStd::NoStd][b.pick[2] as usize % 3];
        let gopts = match b.pick[3] % 3 {
            0 => GroupAdvantageOptions::grpo(),
            1 => GroupAdvantageOptions::rloo(),
            _ => GroupAdvantageOptions::group_mean(),
        }
        .std(std)
        .eps(b.scalars[3].abs())
        .singletons(rlhf_kernels::SingletonGroups::Neutral);
        let mut a = vec![0.0f32; s.rows];
        if ok(cpu::group_advantages(
            &b.scores,
            &groups,
            &gopts,
            cpu::GroupAdvantageOutputs::default().per_sequence(&mut a),
        ))
        .is_some()
        {
            check("group_advantages", f32s(&a), Allow::Finite)?;
        }
        if let Some(r) = ok(reference::group_advantages(&b.scores, &groups, &gopts)) {
            check("reference group_advantages", r, Allow::Finite)?;
        }

        // Moments and whitening of the first input.
        if let Some(m) = ok(cpu::masked_moments(&b.a[..n], s, Some(&b.mask[..n]))) {
            check("moments", [m.count, m.mean, m.var], Allow::Finite)?;
        }
        let wopts = WhitenOptions::default().keep_mean(b.pick[4] % 2 == 0).eps(b.scalars[4].abs());
        let mut w = b.a[..n].to_vec();
        if ok(cpu::whiten(&mut w, s, Some(&b.mask[..n]), &wopts)).is_some() {
            check("whiten", f32s(&w), Allow::Finite)?;
        }
        if let Some(r) = ok(reference::whiten(&b.a[..n], s, Some(&b.mask[..n]), &wopts)) {
            check("reference whiten", r, Allow::Finite)?;
        }
        // The aggregation of any [B, T] values.
        let agg = aggregation(b.pick[5], s.cols);
        if let Some(v) = ok(agg.aggregate(&b.a[..n], s, Some(&b.mask[..n]), Normaliser::Local)) {
            check("aggregate", [v], Allow::Finite)?;
        }
        Ok(())
    });
}

#[test]
fn ppo_family() {
    run(400, |b| {
        let s = b.shape.dense();
        let n = s.len();
        let mask = &b.mask[..n];
        let objective = match b.pick[0] % 4 {
            0 => PolicyObjective::Clip,
            1 => PolicyObjective::KlPenalty { beta: b.scalars[0] },
            2 => PolicyObjective::Gspo,
            _ => PolicyObjective::Cispo,
        };
        let clamp = if b.pick[1] % 2 == 0 { 20.0 } else { b.scalars[1].abs().clamp(1e-3, 80.0) };
        let dual = if b.pick[2] % 2 == 0 { None } else { Some(3.0) };
        let opts = PolicyLossOptions::new(objective)
            .log_ratio_clamp(clamp)
            .dual_clip(dual)
            .entropy_coef(if b.pick[3] % 2 == 0 { 0.0 } else { b.scalars[2] })
            .aggregation(aggregation(b.pick[4], s.cols));
        let inputs = PolicyLossInputs::new(s, &b.a[..n], &b.b[..n], &b.c[..n]).mask(mask);
        let with_entropy = inputs.entropy(&b.c[..n]);
        for inputs in [inputs, with_entropy] {
            let (mut loss, mut grad, mut grad_h) = (vec![0.0f32; n], vec![0.0f32; n], vec![0.0f32; n]);
            let out = cpu::PolicyLossOutputs::default().loss(&mut loss).grad_logp(&mut grad);
            let out = if inputs.entropy.is_some() { out.grad_entropy(&mut grad_h) } else { out };
            if let Some(st) = ok(cpu::policy_loss(&inputs, out, &opts)) {
                check("policy loss", f32s(&loss), Allow::Finite)?;
                check("policy grad", f32s(&grad).chain(f32s(&grad_h)), Allow::Finite)?;
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
            if let Some(r) = ok(reference::policy_loss(&inputs, &opts)) {
                check("reference policy loss", r.loss.into_iter().chain(r.grad_logp), Allow::Finite)?;
                check("reference policy stats", [r.stats.loss], Allow::Finite)?;
            }
        }

        let vopts = ValueLossOptions::default()
            .clip(if b.pick[5] % 2 == 0 { None } else { Some(b.scalars[3].abs()) })
            .coef(if b.pick[6] % 2 == 0 { 0.5 } else { b.scalars[4] })
            .aggregation(aggregation(b.pick[7], s.cols));
        let vin = ValueLossInputs {
            shape: s,
            values: &b.a[..n],
            old_values: &b.b[..n],
            returns: &b.c[..n],
            mask: Some(mask),
        };
        let (mut loss, mut grad) = (vec![0.0f32; n], vec![0.0f32; n]);
        if let Some(st) = ok(cpu::value_loss(
            &vin,
            cpu::ValueLossOutputs::default().loss(&mut loss).grad_values(&mut grad),
            &vopts,
        )) {
            check("value loss", f32s(&loss).chain(f32s(&grad)), Allow::Finite)?;
            check("value stats", [st.loss], Allow::Finite)?;
        }
        if let Some(r) = ok(reference::value_loss(&vin, &vopts)) {
            check("reference value loss", r.loss.into_iter().chain(r.grad_values), Allow::Finite)?;
        }
        Ok(())
    });
}

/// Each hostile input the API review found returning `Ok` with a NaN or ±inf, with the error
/// it now gives, on the CPU and the reference.
#[test]
fn named_cases() {
    use rlhf_kernels::RowProblem::{NonFinite, Overflow};
    let row = |op: &'static str, row: usize, problem| Error::InvalidRow { op, row, problem };
    let shape = RowShape::new(2, 2);
    let mut rewards = [0.0f32; 4];
    // kl_rewards with a NaN KL or score.
    let kl = [0.1f32, 0.2, f32::NAN, 0.3];
    assert_eq!(
        cpu::kl_rewards(&kl, shape, None, &[1.0, 1.0], 0.1, &mut rewards),
        Err(row("kl_rewards", 1, NonFinite))
    );
    assert_eq!(
        reference::kl_rewards(&kl, shape, None, &[1.0, 1.0], 0.1),
        Err(row("kl_rewards", 1, NonFinite))
    );
    let r = cpu::kl_rewards(&[0.1; 4], shape, None, &[f32::NAN, 1.0], 0.1, &mut rewards);
    assert_eq!(r, Err(row("kl_rewards", 0, NonFinite)));
    // Aggregation::aggregate with a NaN value (a masked one is not read).
    let values = [1.0f32, 2.0, f32::NAN, 3.0];
    let r = Aggregation::TokenMean.aggregate(&values, shape, None, Normaliser::Local);
    assert_eq!(r, Err(row("aggregate", 1, NonFinite)));
    let inf = [1.0f32, f32::INFINITY, 0.0, 0.0];
    assert_eq!(Aggregation::TokenMean.aggregate(&inf, shape, None, Normaliser::Local), Ok(f64::INFINITY));
    let both = [1.0f32, f32::INFINITY, f32::NEG_INFINITY, 0.0];
    let r = Aggregation::TokenMean.aggregate(&both, shape, None, Normaliser::Local);
    assert_eq!(r, Err(row("aggregate", 0, NonFinite)));
    let mean =
        Aggregation::TokenMean.aggregate(&values, shape, Some(&[1, 1, 0, 1]), Normaliser::Local).unwrap();
    assert_eq!(mean, 2.0);
    // KlController::adaptive with a NaN target.
    assert!(matches!(KlController::adaptive(0.1, f64::NAN, 1e4), Err(Error::InvalidOption { .. })));
    // gae_error_scale with a NaN.
    let inputs = GaeInputs::new(shape).rewards(&values);
    assert_eq!(
        rlhf_kernels::gae_error_scale(&inputs, &GaeOptions::new(1.0, 0.95)),
        Err(row("gae", 1, NonFinite))
    );
    // policy_loss with log_ratio_clamp(80) and |A| = 1e4: e^80·1e4 > 3.4e38.
    let (logp, old, adv) = ([0.0f32, 100.0], [0.0f32, 0.0], [1.0f32, -1e4]);
    let inputs = PolicyLossInputs::new(RowShape::new(1, 2), &logp, &old, &adv);
    let opts = PolicyLossOptions::new(PolicyObjective::KlPenalty { beta: 0.1 }).log_ratio_clamp(80.0);
    let mut grad = [0.0f32; 2];
    let r = cpu::policy_loss(&inputs, cpu::PolicyLossOutputs::default().grad_logp(&mut grad), &opts);
    assert_eq!(r.map(|_| ()), Err(row("policy_loss", 0, Overflow)));
    assert_eq!(reference::policy_loss(&inputs, &opts).map(|_| ()), Err(row("policy_loss", 0, Overflow)));
    // value_loss with ½·(v − R)² > 3.4e38 (|v − R| > 2.6e19; 2e19 fits, as the reference says).
    let vin = ValueLossInputs {
        shape,
        values: &[0.0, 0.0, 3e19, 0.0],
        old_values: &[0.0; 4],
        returns: &[0.0; 4],
        mask: None,
    };
    let r = cpu::value_loss(&vin, cpu::ValueLossOutputs::default(), &ValueLossOptions::default());
    assert_eq!(r.map(|_| ()), Err(row("value_loss", 1, Overflow)));
    let fits = ValueLossInputs { values: &[0.0, 0.0, 2e19, 0.0], ..vin };
    assert!(cpu::value_loss(&fits, cpu::ValueLossOutputs::default(), &ValueLossOptions::default()).is_ok());
    assert_eq!(
        reference::value_loss(&vin, &ValueLossOptions::default()).map(|_| ()),
        Err(row("value_loss", 1, Overflow))
    );
    // token_logprobs with logits 1e30 and τ = 1e-9: lse = 1e39.
    let opts = TokenLogprobsOptions::default().temperature(1e-9);
    let mut lse = [0.0f32; 1];
    let r = cpu::token_logprobs(
        &[1e30f32, 0.0],
        RowShape::new(1, 2),
        &Tokens::new(&[0i64]),
        TokenOutputs::default().lse(&mut lse),
        &opts,
    );
    assert_eq!(r, Err(row("token_logprobs", 0, Overflow)));
    let r = reference::token_logprobs(&[1e30f32, 0.0], RowShape::new(1, 2), &Tokens::new(&[0i64]), &opts);
    assert_eq!(r.map(|_| ()), Err(row("token_logprobs", 0, Overflow)));
    // sampled_kl with β = 3e38: k2's gradient −log r = −2 times β overflows to −inf.
    let opts = SampledKlOptions::new(KlEstimator::K2).coef(3e38);
    let (one, mut grad) = (RowShape::new(1, 1), [0.0f32; 1]);
    let out = cpu::SampledKlOutputs::default().grad_logp(&mut grad);
    let r = cpu::sampled_kl(&[-3.0], &[-1.0], one, None, out, &opts);
    assert_eq!(r.map(|_| ()), Err(row("sampled_kl", 0, Overflow)));
    let r = reference::sampled_kl(&[-3.0], &[-1.0], one, None, &opts);
    assert_eq!(r.map(|_| ()), Err(row("sampled_kl", 0, Overflow)));
    let out = cpu::SampledKlOutputs::default().grad_logp(&mut grad);
    assert!(cpu::sampled_kl(&[-3.0], &[-1.0], one, None, out, &opts.coef(1e38)).is_ok());
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
    // A NaN score in a group names the sequence that holds it, not the group's first member.
    let groups = Groups::new(&[0, 1, 0, 1], 2).unwrap();
    let mut a = [0.0f32; 4];
    let r = cpu::group_advantages(
        &[1.0, 2.0, 3.0, f32::NAN],
        &groups,
        &GroupAdvantageOptions::grpo(),
        cpu::GroupAdvantageOutputs::default().per_sequence(&mut a),
    );
    assert_eq!(r, Err(row("group_advantages", 3, NonFinite)));
    let r = reference::group_advantages(&[1.0, 2.0, 3.0, f32::NAN], &groups, &GroupAdvantageOptions::grpo());
    assert_eq!(r.map(|_| ()), Err(row("group_advantages", 3, NonFinite)));
    // A group without spread at ε = 0 has advantages 0, not 0/0.
    let r = reference::group_advantages(&[2.0; 4], &groups, &GroupAdvantageOptions::grpo().eps(0.0)).unwrap();
    assert_eq!(r, vec![0.0; 4]);
    cpu::group_advantages(
        &[2.0; 4],
        &groups,
        &GroupAdvantageOptions::grpo().eps(0.0),
        cpu::GroupAdvantageOutputs::default().per_sequence(&mut a),
    )
    .unwrap();
    assert_eq!(a, [0.0; 4]);
    // Element::fits: the last values that round to a finite f16 / bf16.
    use rlhf_kernels::{Element, bf16, f16};
    assert!(f16::fits(65519.996) && f16::from_f32(65519.996).to_f32().is_finite());
    assert!(!f16::fits(65520.0) && f16::from_f32(65520.0).to_f32().is_infinite());
    let (below, at) = (f32::from_bits(0x7F7F_7FFF), f32::from_bits(0x7F7F_8000));
    assert!(bf16::fits(below) && bf16::from_f32(below).to_f32().is_finite());
    assert!(!bf16::fits(at) && bf16::from_f32(at).to_f32().is_infinite());
    assert!(f32::fits(f32::MAX) && !f32::fits(f32::INFINITY) && !f32::fits(f32::NAN));
}
