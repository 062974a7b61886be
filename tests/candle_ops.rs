//! The candle adapter against candle's own composition of primitives (in f64): values and
//! gradients through candle's autograd, on every layout the adapter reads in place, and every
//! error path. Runs on the CPU; with `candle-cuda`, again on `cuda:0` (skipped visibly
//! without a GPU).
#![cfg(feature = "candle")]

mod common;

use candle_core::{D, DType, IndexOp, Result, Tensor, Var};
use common::candle::{devices, f32s, f64s, ids, normals};
use rlhf_kernels::candle::{
    GaeTensors, KlTensors, PolicyTensors, exact_kl, gae, group_advantages, policy_loss, token_logprobs,
};
use rlhf_kernels::testing::{Rng, Tolerance, assert_close};
use rlhf_kernels::{
    ExactDivergence, ExactKlOptions, GaeInputs, GaeOptions, GroupAdvantageOptions, Groups, PolicyLossOptions,
    PolicyObjective, RowShape, TokenLogprobsOptions, reference,
};

/// `log softmax(z/τ)[y]` and `H` by candle's primitives.
fn composed_tokens(logits: &Tensor, targets: &Tensor, tau: f64) -> Result<(Tensor, Tensor)> {
    let z = (logits.to_dtype(DType::F64)? / tau)?;
    let lse = z.log_sum_exp(D::Minus1)?.unsqueeze(D::Minus1)?;
    let logp_all = z.broadcast_sub(&lse)?;
    let logp = logp_all
        .gather(&targets.to_dtype(DType::U32)?.unsqueeze(D::Minus1)?, D::Minus1)?
        .squeeze(D::Minus1)?;
    let entropy = (logp_all.exp()? * &logp_all)?.sum(D::Minus1)?.neg()?;
    Ok((logp, entropy))
}

/// A view of a base tensor.
type View = Box<dyn Fn(&Tensor) -> Tensor>;

/// The logits views the adapter reads in place: a contiguous batch, the causal shift of a
/// `[B, T, V]` batch (one block per sequence), and a vocabulary-padded `[N, V + 5]` narrowed
/// to `V` (rows strided).
fn logits_views(base_dims: &[usize], v: usize) -> Vec<(&'static str, Vec<usize>, View)> {
    let b = base_dims[0];
    vec![
        ("contiguous", vec![b, 5, v], Box::new(|t: &Tensor| t.clone())),
        ("shifted", vec![b, 6, v], Box::new(|t: &Tensor| t.narrow(1, 0, 5).unwrap())),
        ("padded vocab", vec![b * 5, v + 5], Box::new(move |t: &Tensor| t.narrow(1, 0, v).unwrap())),
    ]
}

#[test]
fn token_logprobs_matches_candle_composition_values_and_gradients() {
    for dev in devices("token_logprobs_matches_candle_composition_values_and_gradients") {
        let mut rng = Rng::new(7);
        for dtype in [DType::F32, DType::BF16] {
            for v in [1, 3, 129, 1000] {
                for (name, base_dims, view) in logits_views(&[3], v) {
                    for tau in [1.0, 0.7] {
                        let base = Var::from_tensor(
                            &normals(&mut rng, &base_dims, 3.0, &dev).to_dtype(dtype).unwrap(),
                        )
                        .unwrap();
                        let logits = view(base.as_tensor());
                        let lead = &logits.dims()[..logits.rank() - 1];
                        let targets = ids(&mut rng, lead, v, &dev);
                        let (w1, w2) =
                            (normals(&mut rng, lead, 1.0, &dev), normals(&mut rng, lead, 1.0, &dev));
                        let opts = TokenLogprobsOptions::default().temperature(tau as f32);
                        let ours = token_logprobs(&logits, &targets, None, &opts).unwrap();
                        let objective = ((&ours.logp * &w1).unwrap().sum_all().unwrap()
                            + (&ours.entropy * &w2).unwrap().sum_all().unwrap())
                        .unwrap();
                        let grad = f32s(objective.backward().unwrap().get(&base).unwrap());

                        let exact = Var::from_tensor(&base.to_dtype(DType::F64).unwrap()).unwrap();
                        let (logp, entropy) =
                            composed_tokens(&view(exact.as_tensor()), &targets, tau).unwrap();
                        let w = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
                        let objective = ((&logp * w(&w1)).unwrap().sum_all().unwrap()
                            + (&entropy * w(&w2)).unwrap().sum_all().unwrap())
                        .unwrap();
                        let expected_grad = f64s(objective.backward().unwrap().get(&exact).unwrap());

                        let what = format!("{dev:?} {dtype:?} V={v} {name} τ={tau}");
                        let scale = 3.0 * 6.0 / tau;
                        let tol = Tolerance::for_dtype(rlhf_kernels::DType::F32).scaled(scale);
                        assert_eq!(ours.logp.dims(), lead, "{what}");
                        assert_close(&f32s(&ours.logp), &f64s(&logp), tol, &format!("logp {what}"));
                        assert_close(&f32s(&ours.entropy), &f64s(&entropy), tol, &format!("entropy {what}"));
                        let grad_tol = match dtype {
                            DType::BF16 => Tolerance::for_dtype(rlhf_kernels::DType::BF16),
                            _ => tol,
                        };
                        assert_close(&grad, &expected_grad, grad_tol, &format!("grad {what}"));
                    }
                }
            }
        }
    }
}

#[test]
fn token_logprobs_masks_ignored_and_banned_tokens() {
    for dev in devices("token_logprobs_masks_ignored_and_banned_tokens") {
        let mut rng = Rng::new(8);
        let (n, v) = (6, 50);
        let mut raw = rng.normals(n * v, 2.0);
        raw[3 * v + 7] = f32::NEG_INFINITY; // a banned token in a counted row
        raw[4 * v..5 * v].fill(f32::NAN); // a NaN row that is masked out
        let base = Var::from_tensor(&Tensor::from_vec(raw, (n, v), &dev).unwrap()).unwrap();
        let targets = Tensor::new(&[1i64, -100, 2, 3, 4, 5], &dev).unwrap();
        let mask = Tensor::new(&[1u8, 1, 1, 1, 0, 1], &dev).unwrap();
        let opts = TokenLogprobsOptions::default().ignore_index(Some(-100));
        let out = token_logprobs(base.as_tensor(), &targets, Some(&mask), &opts).unwrap();
        let logp = f32s(&out.logp);
        let entropy = f32s(&out.entropy);
        for r in [1, 4] {
            assert_eq!((logp[r], entropy[r]), (0.0, 0.0), "row {r}: ignored or masked rows give 0");
        }
        assert!(logp.iter().chain(&entropy).all(|x| x.is_finite()), "{logp:?} {entropy:?}");
        let grad = out.logp.sum_all().unwrap().backward().unwrap();
        let grad = f32s(grad.get(&base).unwrap());
        for r in [1, 4] {
            assert!(grad[r * v..(r + 1) * v].iter().all(|&g| g == 0.0), "row {r}: no gradient");
        }
        assert_eq!(grad[3 * v + 7], 0.0, "a banned token has p = 0");
        assert!(grad.iter().all(|g| g.is_finite()));
    }
}

#[test]
fn token_logprobs_rejects_bad_input() {
    for dev in devices("token_logprobs_rejects_bad_input") {
        let logits = Tensor::zeros((4, 10), DType::F32, &dev).unwrap();
        let targets = Tensor::new(&[0u32, 1, 2, 3], &dev).unwrap();
        let opts = TokenLogprobsOptions::default();
        let err = |r: Result<_>| r.err().map(|e| e.to_string()).unwrap_or_default();
        let out_of_range = Tensor::new(&[0u32, 1, 10, 3], &dev).unwrap();
        assert!(err(token_logprobs(&logits, &out_of_range, None, &opts)).contains("target"));
        let short = Tensor::new(&[0u32, 1, 2], &dev).unwrap();
        assert!(err(token_logprobs(&logits, &short, None, &opts)).contains("shape"));
        let floats = Tensor::zeros(4, DType::F32, &dev).unwrap();
        assert!(err(token_logprobs(&logits, &floats, None, &opts)).contains("dtype"));
        let transposed = Tensor::zeros((10, 4), DType::F32, &dev).unwrap().t().unwrap();
        assert!(err(token_logprobs(&transposed, &targets, None, &opts)).contains("unit stride"));
        // A NaN in the second sequence of a shifted view (two blocks): the error names the
        // tensor's row, not the block's.
        if dev.is_cpu() {
            let mut raw = vec![0.0f32; 2 * 3 * 4];
            raw[(3 + 1) * 4 + 2] = f32::NAN; // sequence 1, position 1
            let base = Tensor::from_vec(raw, (2, 3, 4), &dev).unwrap();
            let ids = Tensor::zeros((2, 2), DType::U32, &dev).unwrap();
            let message = err(token_logprobs(&base.narrow(1, 0, 2).unwrap(), &ids, None, &opts));
            assert!(message.contains("row 3"), "{message}");
        }
        let nan = Tensor::new(&[[0.0f32, f32::NAN], [0.0, 0.0]], &dev).unwrap();
        let two = Tensor::new(&[0u32, 1], &dev).unwrap();
        assert!(!err(token_logprobs(&nan, &two, None, &opts)).is_empty(), "a NaN row is an error");
        let banned = Tensor::new(&[[f32::NEG_INFINITY, f32::NEG_INFINITY], [0.0, 0.0]], &dev).unwrap();
        assert!(
            !err(token_logprobs(&banned, &two, None, &opts)).is_empty(),
            "a row of only -inf is an error"
        );
        let empty = Tensor::zeros((0, 10), DType::F32, &dev).unwrap();
        let none = Tensor::zeros(0, DType::U32, &dev).unwrap();
        assert!(!err(token_logprobs(&empty, &none, None, &opts)).is_empty(), "empty input is an error");
        let bad_mask = Tensor::new(&[1.0f32, 1.0, 1.0, 1.0], &dev).unwrap();
        assert!(err(token_logprobs(&logits, &targets, Some(&bad_mask), &opts)).contains("dtype"));
    }
}

/// Every divergence by candle's primitives.
fn composed_divergence(policy: &Tensor, reference: &Tensor, divergence: ExactDivergence) -> Result<Tensor> {
    let log_softmax = |t: &Tensor| -> Result<Tensor> {
        let t = t.to_dtype(DType::F64)?;
        t.broadcast_sub(&t.log_sum_exp(D::Minus1)?.unsqueeze(D::Minus1)?)
    };
    let (lp, lq) = (log_softmax(policy)?, log_softmax(reference)?);
    let kl = |la: &Tensor, lb: &Tensor| (la.exp()? * (la - lb)?)?.sum(D::Minus1);
    match divergence {
        ExactDivergence::PolicyRef => kl(&lp, &lq),
        ExactDivergence::RefPolicy => kl(&lq, &lp),
        ExactDivergence::Jsd { beta } => {
            let b = beta as f64;
            let lm = ((lp.exp()? * b)? + (lq.exp()? * (1.0 - b))?)?.log()?;
            (kl(&lp, &lm)? * b)? + (kl(&lq, &lm)? * (1.0 - b))?
        }
    }
}

#[test]
fn exact_kl_matches_candle_composition_in_every_direction() {
    for dev in devices("exact_kl_matches_candle_composition_in_every_direction") {
        let mut rng = Rng::new(9);
        for divergence in
            [ExactDivergence::PolicyRef, ExactDivergence::RefPolicy, ExactDivergence::Jsd { beta: 0.3 }]
        {
            for v in [2, 129, 1000] {
                for (name, base_dims, view) in logits_views(&[2], v) {
                    let policy_base = Var::from_tensor(&normals(&mut rng, &base_dims, 2.0, &dev)).unwrap();
                    // The reference in another layout than the policy: blocks must line up.
                    let reference =
                        normals(&mut rng, &[2 * 5 * v + 3], 2.0, &dev).narrow(0, 3, 2 * 5 * v).unwrap();
                    let reference = reference.reshape(view(policy_base.as_tensor()).dims()).unwrap();
                    let reference_var = Var::from_tensor(&reference).unwrap();
                    let policy = view(policy_base.as_tensor());
                    let w = normals(&mut rng, &policy.dims()[..policy.rank() - 1], 1.0, &dev);
                    let ours =
                        exact_kl(&policy, reference_var.as_tensor(), None, &ExactKlOptions::new(divergence))
                            .unwrap();
                    let grads = (&ours * &w).unwrap().sum_all().unwrap().backward().unwrap();
                    assert!(grads.get(&reference_var).is_none(), "the reference is a constant");
                    let grad = f32s(grads.get(&policy_base).unwrap());

                    let exact = Var::from_tensor(&policy_base.to_dtype(DType::F64).unwrap()).unwrap();
                    let expected =
                        composed_divergence(&view(exact.as_tensor()), &reference, divergence).unwrap();
                    let objective = (&expected * w.to_dtype(DType::F64).unwrap()).unwrap().sum_all().unwrap();
                    let expected_grad = f64s(objective.backward().unwrap().get(&exact).unwrap());
                    let what = format!("{dev:?} {divergence:?} V={v} {name}");
                    let tol = Tolerance::for_dtype(rlhf_kernels::DType::F32).scaled(12.0);
                    assert_close(&f32s(&ours), &f64s(&expected), tol, &format!("value {what}"));
                    assert_close(&grad, &expected_grad, tol, &format!("grad {what}"));
                }
            }
        }
        let a = Tensor::zeros((2, 3), DType::F32, &dev).unwrap();
        let b = Tensor::zeros((2, 4), DType::F32, &dev).unwrap();
        let opts = ExactKlOptions::new(ExactDivergence::PolicyRef);
        assert!(exact_kl(&a, &b, None, &opts).unwrap_err().to_string().contains("shape"));
        let bad = ExactKlOptions::new(ExactDivergence::Jsd { beta: 1.5 });
        assert!(exact_kl(&a, &a, None, &bad).is_err(), "β outside (0, 1)");
    }
}

/// The clipped surrogate with the entropy bonus, token-mean, by candle's primitives.
fn composed_clip_loss(
    logp: &Tensor,
    old: &Tensor,
    adv: &Tensor,
    mask: &Tensor,
    entropy: &Tensor,
    (eps, c_h): (f64, f64),
) -> Result<Tensor> {
    let ratio = (logp - old.to_dtype(DType::F64)?)?.exp()?;
    let adv = adv.to_dtype(DType::F64)?;
    let unclipped = (ratio.clone() * &adv)?.neg()?;
    let clipped = (ratio.clamp(1.0 - eps, 1.0 + eps)? * &adv)?.neg()?;
    let per_token = unclipped.maximum(&clipped)?;
    let m = mask.to_dtype(DType::F64)?;
    let count = m.sum_all()?;
    let policy = (per_token * &m)?.sum_all()?.div(&count)?;
    let entropy = (entropy * &m)?.sum_all()?.div(&count)?;
    policy - (entropy * c_h)?
}

#[test]
fn policy_loss_matches_candle_composition_and_chains_into_the_logits() {
    for dev in devices("policy_loss_matches_candle_composition_and_chains_into_the_logits") {
        let mut rng = Rng::new(10);
        let (b, t, v) = (4, 9, 300);
        let base = Var::from_tensor(&normals(&mut rng, &[b, t + 1, v], 2.0, &dev)).unwrap();
        let targets = ids(&mut rng, &[b, t], v, &dev);
        let mask_bytes: Vec<u8> = (0..b * t).map(|i| u8::from(i % t < t - i / t)).collect();
        let mask = Tensor::from_vec(mask_bytes, (b, t), &dev).unwrap();
        let adv = normals(&mut rng, &[b, t], 1.0, &dev);
        // The rollout policy: the current one perturbed, so that some ratios clip.
        let tokens =
            token_logprobs(&base.narrow(1, 0, t).unwrap(), &targets, None, &Default::default()).unwrap();
        let old = (tokens.logp.detach() + normals(&mut rng, &[b, t], 0.3, &dev)).unwrap();
        let (eps, c_h) = (0.2, 0.01);
        let opts = PolicyLossOptions::new(PolicyObjective::Clip)
            .clip(eps as f32, eps as f32)
            .entropy_coef(c_h as f32);

        let tokens =
            token_logprobs(&base.narrow(1, 0, t).unwrap(), &targets, Some(&mask), &Default::default())
                .unwrap();
        let inputs = PolicyTensors::new(&old, &adv).mask(&mask).entropy(&tokens.entropy);
        let ours = policy_loss(&tokens.logp, &inputs, &opts).unwrap();
        let grad = f32s(ours.loss.backward().unwrap().get(&base).unwrap());

        let exact = Var::from_tensor(&base.to_dtype(DType::F64).unwrap()).unwrap();
        let (logp, entropy) = composed_tokens(&exact.narrow(1, 0, t).unwrap(), &targets, 1.0).unwrap();
        let expected = composed_clip_loss(&logp, &old, &adv, &mask, &entropy, (eps, c_h)).unwrap();
        let expected_grad = f64s(expected.backward().unwrap().get(&exact).unwrap());
        let tol = Tolerance::for_dtype(rlhf_kernels::DType::F32).scaled(4.0);
        assert_eq!(ours.loss.dims(), &[] as &[usize]);
        assert_close(&f32s(&ours.loss), &f64s(&expected), tol, "loss");
        assert_close(&grad, &expected_grad, tol, "grad of the logits through logp and entropy");

        // Clip fractions from the same pass, counted here from the composed ratios.
        let ratio = f64s(&(logp.detach() - old.to_dtype(DType::F64).unwrap()).unwrap().exp().unwrap());
        let (a, m) = (f64s(&adv), f64s(&mask));
        let valid = m.iter().sum::<f64>();
        let high = (0..b * t).filter(|&i| m[i] > 0.0 && a[i] > 0.0 && ratio[i] > 1.0 + eps).count() as f64;
        let low = (0..b * t).filter(|&i| m[i] > 0.0 && a[i] < 0.0 && ratio[i] < 1.0 - eps).count() as f64;
        assert!(high + low > 0.0, "the test must clip some tokens");
        assert!((ours.stats.clip_fraction_high - high / valid).abs() < 1e-9, "{:?}", ours.stats);
        assert!((ours.stats.clip_fraction_low - low / valid).abs() < 1e-9, "{:?}", ours.stats);

        // Without entropies: a CustomOp1, gradient in logp only.
        let logp_var = Var::from_tensor(&tokens.logp.detach()).unwrap();
        let plain = PolicyLossOptions::new(PolicyObjective::Clip);
        let out =
            policy_loss(logp_var.as_tensor(), &PolicyTensors::new(&old, &adv).mask(&mask), &plain).unwrap();
        let grad = f32s(out.loss.affine(3.0, 0.0).unwrap().backward().unwrap().get(&logp_var).unwrap());
        let exact_logp = Var::from_tensor(&logp_var.to_dtype(DType::F64).unwrap()).unwrap();
        let zeros = Tensor::zeros((b, t), DType::F64, &dev).unwrap();
        let expected = composed_clip_loss(&exact_logp, &old, &adv, &mask, &zeros, (0.2, 0.0)).unwrap();
        let expected_grad =
            f64s(expected.affine(3.0, 0.0).unwrap().backward().unwrap().get(&exact_logp).unwrap());
        assert_close(&grad, &expected_grad, tol, "grad of logp, scaled upstream");

        // Bad input.
        let wrong = Tensor::zeros((b, t + 1), DType::F32, &dev).unwrap();
        assert!(policy_loss(logp_var.as_tensor(), &PolicyTensors::new(&wrong, &adv), &plain).is_err());
        let flat = logp_var.flatten_all().unwrap();
        assert!(policy_loss(&flat, &PolicyTensors::new(&old, &adv), &plain).is_err(), "logp must be [B, T]");
        let nan_adv = adv.i(0).unwrap().affine(0.0, f64::NAN).unwrap().unsqueeze(0).unwrap();
        let nan_adv = Tensor::cat(&[&nan_adv, &adv.narrow(0, 1, b - 1).unwrap()], 0).unwrap();
        assert!(policy_loss(logp_var.as_tensor(), &PolicyTensors::new(&old, &nan_adv), &plain).is_err());
    }
}

#[test]
fn gae_matches_the_reference() {
    for dev in devices("gae_matches_the_reference") {
        let mut rng = Rng::new(11);
        let (b, t) = (5, 33);
        let rewards = rng.normals(b * t, 1.0);
        let values = rng.normals(b * t, 1.0);
        let scores = rng.normals(b, 1.0);
        let mask: Vec<u8> = (0..b * t).map(|i| u8::from(i % t >= i / t && i % t < t - 2 * (i / t))).collect();
        let opts = GaeOptions::new(0.99, 0.95);
        let to = |x: &[f32], dims: &[usize]| Tensor::from_vec(x.to_vec(), dims, &dev).unwrap();
        let (r, vt, s) = (to(&rewards, &[b, t]), to(&values, &[b, t]), to(&scores, &[b]));
        let m = Tensor::from_vec(mask.clone(), (b, t), &dev).unwrap();
        let inputs = GaeTensors {
            rewards: Some(&r),
            scores: Some(&s),
            values: Some(&vt),
            mask: Some(&m),
            ..Default::default()
        };
        let ours = gae(&inputs, &opts).unwrap();
        let shape = RowShape::new(b, t);
        let exact = reference::gae(
            &GaeInputs::new(shape).rewards(&rewards).scores(&scores).values(&values).mask(&mask),
            &opts,
        )
        .unwrap();
        let tol = Tolerance::for_dtype(rlhf_kernels::DType::F32).scaled(30.0);
        assert_close(&f32s(&ours.advantages), &exact.advantages, tol, "advantages");
        assert_close(&f32s(&ours.returns), &exact.returns, tol, "returns");
        assert!(gae(&GaeTensors::default(), &opts).is_err(), "no input");
        let wrong = to(&values[..b * (t - 1)], &[b, t - 1]);
        let bad = GaeTensors { rewards: Some(&r), values: Some(&wrong), ..Default::default() };
        assert!(gae(&bad, &opts).unwrap_err().to_string().contains("shape"));
    }
}

#[test]
fn group_advantages_match_candle_composition() {
    for dev in devices("group_advantages_match_candle_composition") {
        let mut rng = Rng::new(12);
        let (groups, size, t) = (6, 4, 7);
        let scores = normals(&mut rng, &[groups * size], 1.0, &dev);
        let ids: Vec<u32> = (0..groups * size).map(|i| (i / size) as u32).collect();
        let mask = Tensor::from_vec(
            (0..groups * size * t).map(|i| u8::from(i % 3 != 0)).collect::<Vec<u8>>(),
            (groups * size, t),
            &dev,
        )
        .unwrap();
        let opts = GroupAdvantageOptions::grpo();
        let ours =
            group_advantages(&scores, &Groups::new(&ids, groups).unwrap(), Some(&mask), &opts).unwrap();

        let s = scores.to_dtype(DType::F64).unwrap().reshape((groups, size)).unwrap();
        let mean = s.mean_keepdim(1).unwrap();
        let centred = s.broadcast_sub(&mean).unwrap();
        let std =
            (centred.sqr().unwrap().sum_keepdim(1).unwrap() / (size as f64 - 1.0)).unwrap().sqrt().unwrap();
        let expected = centred.broadcast_div(&(std + 1e-6).unwrap()).unwrap().flatten_all().unwrap();
        let per_token =
            expected.unsqueeze(1).unwrap().broadcast_mul(&mask.to_dtype(DType::F64).unwrap()).unwrap();
        let tol = Tolerance::for_dtype(rlhf_kernels::DType::F32);
        assert_close(&f32s(&ours.per_sequence), &f64s(&expected), tol, "per sequence");
        assert_close(&f32s(ours.per_token.as_ref().unwrap()), &f64s(&per_token), tol, "per token");

        let short = scores.narrow(0, 0, 5).unwrap();
        assert!(group_advantages(&short, &Groups::new(&ids, groups).unwrap(), None, &opts).is_err());
        let no_tokens = group_advantages(&scores, &Groups::new(&ids, groups).unwrap(), None, &opts).unwrap();
        assert!(no_tokens.per_token.is_none());
    }
}

#[test]
fn fused_path_equals_the_adapters_composition() {
    use rlhf_kernels::candle::{FusedTensors, policy_loss_from_logits, sampled_kl};
    use rlhf_kernels::{
        Aggregation, FusedPolicyOptions, KlDirection, KlEstimator, SampledKlOptions, TokenLogprobsOptions,
    };
    for dev in devices("fused_path_equals_the_adapters_composition") {
        let mut rng = Rng::new(31);
        let (b, t, v) = (3, 5, 41);
        // The views the fused path meets: one contiguous block, rows padded to a stride (read in
        // place), and the causal shift of [B, T + 1, V] (rows of two strides: copied first).
        type View = fn(&Tensor, usize, usize) -> Tensor;
        let views: [(&str, Vec<usize>, View); 3] = [
            ("contiguous", vec![b, t, v], |x, _, _| x.clone()),
            ("padded vocabulary", vec![b, t, v + 3], |x, _, v| x.narrow(2, 0, v).unwrap()),
            ("causal shift", vec![b, t + 1, v], |x, t, _| x.narrow(1, 0, t).unwrap()),
        ];
        let targets = common::candle::ids(&mut rng, &[b, t], v, &dev);
        let mask_host: Vec<u8> = (0..b * t).map(|i| u8::from(i % t < 4 - i / t)).collect();
        let mask = Tensor::from_vec(mask_host, (b, t), &dev).unwrap();
        let (old, adv) = (
            normals(&mut rng, &[b, t], 0.3, &dev).affine(1.0, -4.0).unwrap(),
            normals(&mut rng, &[b, t], 1.0, &dev),
        );
        let ref_logp = normals(&mut rng, &[b, t], 0.3, &dev).affine(1.0, -4.0).unwrap();
        let loss_opts =
            PolicyLossOptions::default().entropy_coef(0.01).aggregation(Aggregation::SeqMeanTokenMean);
        let kl_opts = SampledKlOptions::new(KlEstimator::gradient_of(KlDirection::PolicyRef))
            .coef(0.1)
            .aggregation(Aggregation::SeqMeanTokenMean);
        for ((name, dims, view), dtype) in
            views.into_iter().flat_map(|w| [(w.clone(), DType::F32), (w, DType::BF16)])
        {
            let base =
                Var::from_tensor(&normals(&mut rng, &dims, 2.0, &dev).to_dtype(dtype).unwrap()).unwrap();
            let logits = view(base.as_tensor(), t, v);
            for with_kl in [false, true] {
                let mut inputs = FusedTensors::new(&old, &adv).mask(&mask);
                let mut opts = FusedPolicyOptions::new(loss_opts).temperature(0.8);
                if with_kl {
                    (inputs, opts) = (inputs.ref_logp(&ref_logp), opts.kl(kl_opts));
                }
                // An upstream gradient of 3: the backward scales the saved gradient by it.
                let fused = policy_loss_from_logits(&logits, &targets, &inputs, &opts).unwrap();
                let grads = fused.loss.affine(3.0, 0.0).unwrap().backward().unwrap();
                let fused_grad = grads.get(base.as_tensor()).unwrap().clone();

                let lp_opts = TokenLogprobsOptions::default().temperature(0.8);
                let tokens = token_logprobs(&logits, &targets, Some(&mask), &lp_opts).unwrap();
                let policy = PolicyTensors::new(&old, &adv).mask(&mask).entropy(&tokens.entropy);
                let mut total = policy_loss(&tokens.logp, &policy, &loss_opts).unwrap().loss;
                if with_kl {
                    let kl_inputs = KlTensors::new(&ref_logp).mask(&mask);
                    let kl = sampled_kl(&tokens.logp, &kl_inputs, &kl_opts).unwrap().loss;
                    total = (total + kl).unwrap();
                }
                let grads = total.affine(3.0, 0.0).unwrap().backward().unwrap();
                let composed_grad = grads.get(base.as_tensor()).unwrap().clone();

                let what = format!("{dev:?} {name} {dtype:?} kl={with_kl}");
                let (got, want) = (fused.loss.to_scalar::<f32>().unwrap(), total.to_scalar::<f32>().unwrap());
                assert!((got - want).abs() <= 1e-5 * want.abs().max(1.0), "{what}: loss {got} vs {want}");
                assert_eq!(fused.stats.kl.is_some(), with_kl, "{what}");
                assert_eq!(fused_grad.dims(), base.as_tensor().dims(), "{what}");
                let want = f64s(&composed_grad);
                let scale = want.iter().fold(0.0f64, |m, x| m.max(x.abs()));
                let dt =
                    if dtype == DType::F32 { rlhf_kernels::DType::F32 } else { rlhf_kernels::DType::BF16 };
                let tol = Tolerance::for_dtype(dt).scaled(8.0 * scale);
                assert_close(&f32s(&fused_grad), &want, tol, &format!("{what}: gradient"));
            }
        }
        let logits = normals(&mut rng, &[b, t, v], 2.0, &dev);
        // A KL term needs both its options and the reference log-probs.
        let only_ref = FusedTensors::new(&old, &adv).ref_logp(&ref_logp);
        assert!(
            policy_loss_from_logits(&logits, &targets, &only_ref, &FusedPolicyOptions::default()).is_err()
        );
        let flat = logits.flatten_to(1).unwrap();
        assert!(
            policy_loss_from_logits(
                &flat,
                &targets,
                &FusedTensors::new(&old, &adv),
                &FusedPolicyOptions::default()
            )
            .is_err(),
            "logits must be [B, T, V]"
        );
    }
}
