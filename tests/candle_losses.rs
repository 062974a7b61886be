//! The candle adapter's loss terms and reductions (sampled KL, the value loss, the SAPO and
//! GMPO policy losses, the aggregation with their gradients; KL-in-reward shaping, moments, whitening) against candle's own
//! composition of primitives in f64 or the crate's f64 reference. Runs on the CPU; with
//! `candle-cuda`, again on `cuda:0` (skipped visibly without a GPU).
#![cfg(feature = "candle")]

mod common;

use candle_core::{D, DType, Device, Result, Tensor, Var};
use common::candle::{devices, f32s, f64s, normals};
use rlhf_kernels::candle::{
    KlTensors, PolicyTensors, ValueTensors, aggregate, kl_rewards, masked_moments, overlong_shaping,
    policy_loss, sampled_kl, value_loss, whiten,
};
use rlhf_kernels::testing::{Rng, Tolerance, assert_close};
use rlhf_kernels::{
    Aggregation, KlEstimator, KlRewardsInputs, KlRewardsOptions, Normaliser, PolicyLossOptions,
    PolicyObjective, RowShape, SampledKlOptions, ValueLossOptions, WhitenOptions, reference,
};

const MODES: [Aggregation; 4] = [
    Aggregation::TokenMean,
    Aggregation::SeqMeanTokenSum,
    Aggregation::SeqMeanTokenMean,
    Aggregation::SeqMeanTokenSumNorm { max_len: 12 },
];

/// A ragged `[B, T]` mask with one empty sequence.
fn ragged_mask(b: usize, t: usize, rng: &mut Rng, dev: &Device) -> (Vec<u8>, Tensor) {
    let mut m = vec![0u8; b * t];
    for i in 0..b {
        let len = if i == 1 { 0 } else { 1 + rng.below(t) };
        m[i * t..i * t + len].fill(1);
    }
    let tensor = Tensor::from_vec(m.clone(), (b, t), dev).unwrap();
    (m, tensor)
}

/// `Σ mask·w·x` of `mode` by candle's primitives (f64): the aggregation the losses use.
fn composed_aggregate(x: &Tensor, mask: &Tensor, mode: Aggregation) -> Result<Tensor> {
    let m = mask.to_dtype(DType::F64)?;
    let x = (x.to_dtype(DType::F64)? * &m)?;
    let rows = m.sum(D::Minus1)?;
    let valid: f64 = rows.gt(0.0)?.to_dtype(DType::F64)?.sum_all()?.to_scalar()?;
    match mode {
        Aggregation::TokenMean => x.sum_all()? / m.sum_all()?.to_scalar::<f64>()?,
        Aggregation::SeqMeanTokenSum => x.sum_all()? / valid,
        Aggregation::SeqMeanTokenMean => x.sum(D::Minus1)?.div(&rows.maximum(1.0)?)?.sum_all()? / valid,
        Aggregation::SeqMeanTokenSumNorm { max_len } => x.sum_all()? / (x.dims()[0] * max_len) as f64,
    }
}

fn composed_k(logp: &Tensor, ref_logp: &Tensor, e: KlEstimator) -> Result<Tensor> {
    let lr = (ref_logp.to_dtype(DType::F64)? - logp)?;
    let r = lr.exp()?;
    match e {
        KlEstimator::K1 => lr.neg(),
        KlEstimator::K2 => lr.sqr()? * 0.5,
        KlEstimator::K3 => (&r - 1.0)? - &lr,
        KlEstimator::Abs => lr.abs(),
        KlEstimator::K1Rev => &r * &lr,
        KlEstimator::K3Rev => (&r * &lr)? - (&r - 1.0)?,
        _ => unreachable!("not composed here"),
    }
}

#[test]
fn sampled_kl_matches_candle_composition_values_and_gradients() {
    for dev in devices("sampled_kl_matches_candle_composition_values_and_gradients") {
        let mut rng = Rng::new(7);
        let (b, t) = (5, 9);
        let logp_t = (normals(&mut rng, &[b, t], 1.0, &dev).abs().unwrap() * -2.0).unwrap();
        let ref_logp = (&logp_t + normals(&mut rng, &[b, t], 0.5, &dev)).unwrap();
        let (_, mask) = ragged_mask(b, t, &mut rng, &dev);
        for e in [
            KlEstimator::K1,
            KlEstimator::K2,
            KlEstimator::K3,
            KlEstimator::Abs,
            KlEstimator::K1Rev,
            KlEstimator::K3Rev,
        ] {
            for mode in MODES {
                let logp = Var::from_tensor(&logp_t).unwrap();
                let opts = SampledKlOptions::new(e)
                    .coef(0.3)
                    .aggregation(mode)
                    .log_ratio_clamp(None)
                    .value_clamp(None);
                let out = sampled_kl(&logp, &KlTensors::new(&ref_logp).mask(&mask), &opts).unwrap();
                let grads = out.loss.backward().unwrap();
                let exact = Var::from_tensor(&logp_t.to_dtype(DType::F64).unwrap()).unwrap();
                let k = composed_k(exact.as_tensor(), &ref_logp, e).unwrap();
                let loss = (composed_aggregate(&k, &mask, mode).unwrap() * 0.3).unwrap();
                let exact_grads = loss.backward().unwrap();
                let tol = Tolerance::for_dtype(rlhf_kernels::DType::F32).scaled(8.0);
                let what = format!("{e:?} {mode:?} on {:?}", dev.location());
                assert_close(
                    &f32s(&out.loss.unsqueeze(0).unwrap()),
                    &f64s(&loss.unsqueeze(0).unwrap()),
                    tol,
                    &what,
                );
                let masked_k = (k * mask.to_dtype(DType::F64).unwrap()).unwrap();
                assert_close(&f32s(&out.values), &f64s(&masked_k), tol, &format!("{what}: values"));
                let (g, eg) = (grads.get(&logp).unwrap(), exact_grads.get(&exact).unwrap());
                assert_close(&f32s(g), &f64s(eg), tol, &format!("{what}: gradient"));
                assert_eq!(out.stats.loss as f32, out.loss.to_scalar::<f32>().unwrap());
            }
        }
        // The reference is a constant, and the options are checked.
        let bad = SampledKlOptions::new(KlEstimator::K3).log_ratio_clamp(Some(-1.0));
        assert!(sampled_kl(&logp_t, &KlTensors::new(&ref_logp).mask(&mask), &bad).is_err());
        let narrow = ref_logp.narrow(1, 0, 3).unwrap();
        assert!(
            sampled_kl(&logp_t, &KlTensors::new(&narrow), &SampledKlOptions::new(KlEstimator::K1)).is_err()
        );
    }
}

/// The bias-corrected k3 (TRL's `use_bias_correction_kl`: `k3·exp(logp − old_logp)`, the
/// ratio not detached) against candle's composition, value and gradient.
#[test]
fn bias_corrected_kl_matches_candle_composition() {
    for dev in devices("bias_corrected_kl_matches_candle_composition") {
        let mut rng = Rng::new(8);
        let (b, t) = (4, 7);
        let logp_t = (normals(&mut rng, &[b, t], 1.0, &dev).abs().unwrap() * -2.0).unwrap();
        let ref_logp = (&logp_t + normals(&mut rng, &[b, t], 0.5, &dev)).unwrap();
        let old_logp = (&logp_t + normals(&mut rng, &[b, t], 0.3, &dev)).unwrap();
        let (_, mask) = ragged_mask(b, t, &mut rng, &dev);
        for mode in MODES {
            let logp = Var::from_tensor(&logp_t).unwrap();
            let opts = SampledKlOptions::new(KlEstimator::K3)
                .bias_correction(true)
                .aggregation(mode)
                .log_ratio_clamp(None)
                .value_clamp(None);
            let inputs = KlTensors::new(&ref_logp).mask(&mask).old_logp(&old_logp);
            let out = sampled_kl(&logp, &inputs, &opts).unwrap();
            let grads = out.loss.backward().unwrap();
            let exact = Var::from_tensor(&logp_t.to_dtype(DType::F64).unwrap()).unwrap();
            let ratio = (exact.as_tensor() - old_logp.to_dtype(DType::F64).unwrap()).unwrap().exp().unwrap();
            let k = (composed_k(exact.as_tensor(), &ref_logp, KlEstimator::K3).unwrap() * ratio).unwrap();
            let loss = composed_aggregate(&k, &mask, mode).unwrap();
            let exact_grads = loss.backward().unwrap();
            let tol = Tolerance::for_dtype(rlhf_kernels::DType::F32).scaled(8.0);
            let what = format!("{mode:?} on {:?}", dev.location());
            assert_close(
                &f32s(&out.loss.unsqueeze(0).unwrap()),
                &f64s(&loss.unsqueeze(0).unwrap()),
                tol,
                &what,
            );
            let (g, eg) = (grads.get(&logp).unwrap(), exact_grads.get(&exact).unwrap());
            assert_close(&f32s(g), &f64s(eg), tol, &format!("{what}: gradient"));
        }
        // old_logp exactly when the option asks for it.
        let plain = SampledKlOptions::new(KlEstimator::K3);
        let with_old = KlTensors::new(&ref_logp).old_logp(&old_logp);
        assert!(sampled_kl(&logp_t, &with_old, &plain).is_err());
        assert!(sampled_kl(&logp_t, &KlTensors::new(&ref_logp), &plain.bias_correction(true)).is_err());
    }
}

#[test]
fn value_loss_matches_candle_composition() {
    for dev in devices("value_loss_matches_candle_composition") {
        let mut rng = Rng::new(8);
        let (b, t) = (4, 11);
        let values_t = normals(&mut rng, &[b, t], 1.0, &dev);
        let old = (&values_t + normals(&mut rng, &[b, t], 0.3, &dev)).unwrap();
        let returns = normals(&mut rng, &[b, t], 1.0, &dev);
        let (_, mask) = ragged_mask(b, t, &mut rng, &dev);
        for (clip, mode) in [(None, MODES[0]), (Some(0.2), MODES[1]), (Some(0.1), MODES[2]), (None, MODES[3])]
        {
            let values = Var::from_tensor(&values_t).unwrap();
            let opts = ValueLossOptions::default().clip(clip).coef(0.5).aggregation(mode);
            let out = value_loss(&values, &ValueTensors::new(&old, &returns).mask(&mask), &opts).unwrap();
            let grads = out.loss.backward().unwrap();
            let exact = Var::from_tensor(&values_t.to_dtype(DType::F64).unwrap()).unwrap();
            let (o, r) = (old.to_dtype(DType::F64).unwrap(), returns.to_dtype(DType::F64).unwrap());
            let mut err = (exact.as_tensor() - &r).unwrap().sqr().unwrap();
            if let Some(c) = clip {
                let clipped = (&o + (exact.as_tensor() - &o).unwrap().clamp(-c, c).unwrap()).unwrap();
                err = err.maximum(&(clipped - &r).unwrap().sqr().unwrap()).unwrap();
            }
            let loss = (composed_aggregate(&(err * 0.5).unwrap(), &mask, mode).unwrap() * 0.5).unwrap();
            let exact_grads = loss.backward().unwrap();
            let tol = Tolerance::for_dtype(rlhf_kernels::DType::F32).scaled(8.0);
            let what = format!("clip {clip:?} {mode:?} on {:?}", dev.location());
            assert_close(
                &f32s(&out.loss.unsqueeze(0).unwrap()),
                &f64s(&loss.unsqueeze(0).unwrap()),
                tol,
                &what,
            );
            let (g, eg) = (grads.get(&values).unwrap(), exact_grads.get(&exact).unwrap());
            assert_close(&f32s(g), &f64s(eg), tol, &format!("{what}: gradient"));
        }
    }
}

#[test]
fn aggregate_matches_candle_composition_and_its_gradient() {
    for dev in devices("aggregate_matches_candle_composition_and_its_gradient") {
        let mut rng = Rng::new(9);
        let x_t = normals(&mut rng, &[6, 7], 2.0, &dev);
        let (_, mask) = ragged_mask(6, 7, &mut rng, &dev);
        for mode in MODES {
            let x = Var::from_tensor(&x_t).unwrap();
            let value = aggregate(&x, Some(&mask), mode, Normaliser::Local).unwrap();
            let grads = value.backward().unwrap();
            let exact = Var::from_tensor(&x_t.to_dtype(DType::F64).unwrap()).unwrap();
            let expected = composed_aggregate(exact.as_tensor(), &mask, mode).unwrap();
            let exact_grads = expected.backward().unwrap();
            let tol = Tolerance::for_dtype(rlhf_kernels::DType::F32).scaled(16.0);
            let what = format!("{mode:?} on {:?}", dev.location());
            assert_close(
                &f32s(&value.unsqueeze(0).unwrap()),
                &f64s(&expected.unsqueeze(0).unwrap()),
                tol,
                &what,
            );
            let (g, eg) = (grads.get(&x).unwrap(), exact_grads.get(&exact).unwrap());
            assert_close(&f32s(g), &f64s(eg), tol, &format!("{what}: gradient"));
        }
        // A global normaliser divides by the whole batch's counts, the gradient too.
        let x = Var::from_tensor(&x_t).unwrap();
        let global = Normaliser::Global { valid_tokens: 100.0, valid_sequences: 10.0, sequences: 12.0 };
        let value = aggregate(&x, Some(&mask), Aggregation::TokenMean, global).unwrap();
        let g = f64s(value.backward().unwrap().get(&x).unwrap());
        let m: Vec<f64> = f64s(&mask);
        assert!(g.iter().zip(&m).all(|(g, m)| (g - m / 100.0).abs() < 1e-9), "{g:?}");
        let nan = x_t.broadcast_mul(&Tensor::new(f32::NAN, &dev).unwrap()).unwrap();
        assert!(aggregate(&nan, None, Aggregation::TokenMean, Normaliser::Local).is_err());
    }
}

#[test]
fn rewards_moments_and_whitening_match_the_reference() {
    for dev in devices("rewards_moments_and_whitening_match_the_reference") {
        let mut rng = Rng::new(10);
        let (b, t) = (5, 8);
        let shape = RowShape::new(b, t);
        let x = normals(&mut rng, &[b, t], 1.5, &dev);
        let scores = normals(&mut rng, &[b], 1.0, &dev);
        let (m, mask) = ragged_mask(b, t, &mut rng, &dev);
        let host = |t: &Tensor| -> Vec<f32> { t.flatten_all().unwrap().to_vec1().unwrap() };
        let tol = Tolerance::for_dtype(rlhf_kernels::DType::F32).scaled(4.0);

        let opts = KlRewardsOptions::new(0.1);
        let r = kl_rewards(&x, &scores, Some(&mask), &opts).unwrap();
        let (hx, hs) = (host(&x), host(&scores));
        let expected = reference::kl_rewards(&KlRewardsInputs::new(shape, &hx, &hs).mask(&m), &opts).unwrap();
        assert_close(&f32s(&r), &expected, tol, "kl_rewards");

        let moments = masked_moments(&x, Some(&mask)).unwrap();
        let e = reference::masked_moments(&host(&x), shape, Some(&m)).unwrap();
        let ours = [moments.count, moments.mean, moments.var].map(|x| x as f32);
        assert_close(&ours, &[e.count, e.mean, e.var], tol, "moments");

        for keep_mean in [false, true] {
            let opts = WhitenOptions::default().keep_mean(keep_mean);
            let (w, used) = whiten(&x, Some(&mask), &opts).unwrap();
            let expected = reference::whiten(&host(&x), shape, Some(&m), &opts).unwrap();
            assert_close(&f32s(&w), &expected, tol, &format!("whiten keep_mean={keep_mean}"));
            assert_eq!(used.count, e.count);
        }
        assert!(kl_rewards(&x, &x, None, &opts).is_err(), "scores must be [B]");
    }
}

/// SAPO's per-token soft gate and GMPO's per-sequence loss (broadcast to its tokens) by candle's
/// primitives in f64, from `logp` and the constant inputs.
fn composed_variant(
    logp: &Tensor,
    old: &Tensor,
    adv: &Tensor,
    mask: &Tensor,
    objective: PolicyObjective,
) -> Result<Tensor> {
    let lr = (logp - old.to_dtype(DType::F64)?)?;
    let a = adv.to_dtype(DType::F64)?;
    match objective {
        PolicyObjective::Sapo { tau_pos, tau_neg } => {
            let positive = a.gt(0.0)?.to_dtype(DType::F64)?;
            let tau = ((&positive * tau_pos as f64)? + ((1.0 - &positive)? * tau_neg as f64)?)?;
            let x = (&tau * (lr.exp()? - 1.0)?)?;
            let sigmoid = (x.neg()?.exp()? + 1.0)?.recip()?;
            ((a.neg()? * 4.0)? / &tau)? * sigmoid
        }
        PolicyObjective::Gmpo => {
            let (lo, hi) = (0.3, 0.25);
            let sign = a.sign()?;
            let clipped = lr.clamp(-lo, hi)?;
            let c = (&sign * (&sign * &lr)?.minimum(&(&sign * clipped)?)?)?;
            let m = mask.to_dtype(DType::F64)?;
            let n = m.sum_keepdim(D::Minus1)?.maximum(1.0)?;
            let ratio = ((c * &m)?.sum_keepdim(D::Minus1)? / &n)?.exp()?;
            let mean_adv = ((&a * &m)?.sum_keepdim(D::Minus1)? / &n)?;
            (mean_adv * ratio)?.neg()?.broadcast_as(lr.dims())?.contiguous()
        }
        _ => unreachable!("not composed here"),
    }
}

#[test]
fn sapo_and_gmpo_match_candle_compositions() {
    for dev in devices("sapo_and_gmpo_match_candle_compositions") {
        let mut rng = Rng::new(21);
        let (b, t) = (5, 13);
        let (_, mask) = ragged_mask(b, t, &mut rng, &dev);
        let old = (normals(&mut rng, &[b, t], 0.5, &dev) - 2.0).unwrap();
        let logp = Var::from_tensor(&(&old + normals(&mut rng, &[b, t], 0.4, &dev)).unwrap()).unwrap();
        let adv = normals(&mut rng, &[b, t], 1.0, &dev);
        let objectives = [
            PolicyObjective::SAPO,
            PolicyObjective::Sapo { tau_pos: 0.6, tau_neg: 2.5 },
            PolicyObjective::Gmpo,
        ];
        for objective in objectives {
            for mode in MODES {
                let opts = PolicyLossOptions::new(objective).clip(0.3, 0.25).aggregation(mode);
                let inputs = PolicyTensors::new(&old, &adv).mask(&mask);
                let ours = policy_loss(logp.as_tensor(), &inputs, &opts).unwrap();
                let grad = f32s(ours.loss.backward().unwrap().get(&logp).unwrap());
                let exact = Var::from_tensor(&logp.to_dtype(DType::F64).unwrap()).unwrap();
                let per_token = composed_variant(exact.as_tensor(), &old, &adv, &mask, objective).unwrap();
                let expected = composed_aggregate(&per_token, &mask, mode).unwrap();
                let expected_grad = f64s(expected.backward().unwrap().get(&exact).unwrap());
                let tol = Tolerance::for_dtype(rlhf_kernels::DType::F32).scaled(4.0);
                let what = format!("{objective:?} {mode:?}");
                assert_close(&f32s(&ours.loss), &f64s(&expected), tol, &what);
                assert_close(&grad, &expected_grad, tol, &what);
            }
        }
        let bad = PolicyLossOptions::new(PolicyObjective::Sapo { tau_pos: -1.0, tau_neg: 1.0 });
        let err = policy_loss(logp.as_tensor(), &PolicyTensors::new(&old, &adv), &bad).unwrap_err();
        assert!(err.to_string().contains("tau_pos"), "{err}");
    }
}

/// DAPO's overlong shaping on candle tensors equals the reference, and its errors surface.
#[test]
fn overlong_shaping_matches_the_reference() {
    for dev in devices("overlong_shaping_matches_the_reference") {
        let mut rng = Rng::new(23);
        let (b, t) = (9, 50);
        let (m, mask) = ragged_mask(b, t, &mut rng, &dev);
        let hs = rng.normals(b, 1.0);
        let scores = Tensor::from_vec(hs.clone(), b, &dev).unwrap();
        let opts = rlhf_kernels::OverlongOptions::new(40, 15).penalty(0.8);
        let got = overlong_shaping(&scores, &mask, &opts).unwrap();
        let inputs = rlhf_kernels::OverlongInputs::new(RowShape::new(b, t), &hs).mask(&m);
        let want = reference::overlong_shaping(&inputs, &opts).unwrap();
        assert_close(&f32s(&got), &want, Tolerance::for_dtype(rlhf_kernels::DType::F32), "overlong");
        assert!(overlong_shaping(&scores, &mask, &rlhf_kernels::OverlongOptions::new(10, 20)).is_err());
        assert!(
            overlong_shaping(&scores.narrow(0, 0, 3).unwrap(), &mask, &opts).is_err(),
            "one score per row"
        );
    }
}
