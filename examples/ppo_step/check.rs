//! The report of `ppo_step`: every stage held to the f64 reference from the inputs the backend
//! produced for it, the timings table and the bytes each stage must move.

use std::time::Instant;

use rlhf_kernels::testing::{Tolerance, check_close};
use rlhf_kernels::{
    DType, Element, Error, GroupAdvantageOptions, PolicyLossInputs, RowShape, SampledKlInputs, Tokens,
    ValueLossInputs, WhitenOptions, gae_error_bound_factor, gae_error_scale, reference,
};

use crate::{Batch, ENTROPY_COEF, Estimator, KlPlacement, Produced, gae_options, value_options};

/// One row of the report.
pub struct Stage {
    name: &'static str,
    millis: f64,
    bytes: usize,
    extra_bytes: usize,
}

/// A named comparison with the reference.
type Check = (&'static str, Result<(), rlhf_kernels::testing::Mismatch>);

/// Holds every stage to the f64 reference, each from the inputs this backend produced for it
/// (a spread of rows, all of them for small batches, for the stages that read logits), and
/// prints the table.
pub fn check<T: Element>(batch: &Batch<T>, p: &Produced<T>, iters: usize) -> Result<bool, Error> {
    let shape = batch.shape;
    let rows: Vec<usize> = (0..shape.rows).step_by(shape.rows.div_ceil(256)).collect();
    let sub = RowShape::new(rows.len(), shape.cols);
    let pick = |v: &[T]| rows.iter().flat_map(|&r| v[shape.row_range(r)].iter().copied()).collect::<Vec<T>>();
    let per_row = |v: &[f32]| rows.iter().map(|&r| v[r]).collect::<Vec<f32>>();
    let (targets, mask): (Vec<i64>, Vec<u8>) =
        rows.iter().map(|&r| (batch.targets[r], batch.mask[r])).unzip();
    let tokens = Tokens::new(&targets).with_mask(&mask);
    let started = Instant::now();
    let exp_policy = reference::token_logprobs(&pick(&batch.policy), sub, &tokens, &batch.opts)?;
    let exp_ref = reference::token_logprobs(&pick(&batch.reference), sub, &tokens, &batch.opts)?;
    let (gl, gh) = (per_row(&p.grad_logp), per_row(&p.grad_entropy));
    let exp_grad = reference::token_logprobs_backward(
        &pick(&batch.policy),
        sub,
        &tokens,
        Some(&gl),
        Some(&gh),
        &batch.opts,
    )?;
    let (seqs, seq_mask) = (batch.seq_shape, Some(batch.mask.as_slice()));
    let kl_opts = batch.kl.options();
    let exp_kl = reference::sampled_kl(
        &SampledKlInputs { mask: seq_mask, ..SampledKlInputs::new(seqs, &p.logp, &p.ref_logp) },
        &kl_opts,
    )?;
    let mut checks = advantage_checks(batch, p)?;
    // Losses, from this backend's log-probs, entropies and advantages.
    let inputs = PolicyLossInputs::new(seqs, &p.logp, &p.old_logp, p.loss_advantages())
        .mask(&batch.mask)
        .entropy(&p.entropy);
    let exp_loss = reference::policy_loss(&inputs, &batch.loss)?;
    let exp_grad_logp: Vec<f64> = match batch.kl {
        KlPlacement::Loss => exp_loss.grad_logp.iter().zip(&exp_kl.grad_logp).map(|(a, b)| a + b).collect(),
        KlPlacement::Reward => exp_loss.grad_logp.clone(),
    };
    let grad_tol =
        |v: &[f64]| Tolerance { rel: 1e-4, abs: 1e-5 * v.iter().fold(1e-30f64, |m, x| m.max(x.abs())) };
    // Scalars to f32 rounding and a few ulps of summation order.
    let stat = |a: f64, b: f64| check_close(&[a as f32], &[b], Tolerance { rel: 1e-5, abs: 1e-6 });
    checks.push(("loss grad_logp", check_close(&p.grad_logp, &exp_grad_logp, grad_tol(&exp_grad_logp))));
    checks.push((
        "loss grad_entropy",
        check_close(&p.grad_entropy, &exp_loss.grad_entropy, grad_tol(&exp_loss.grad_entropy)),
    ));
    checks.push(("loss value", stat(p.policy_stats.loss, exp_loss.stats.loss)));
    checks.push((
        "clip fraction",
        stat(
            p.policy_stats.clip_fraction_high + p.policy_stats.clip_fraction_low,
            exp_loss.stats.clip_fraction_high + exp_loss.stats.clip_fraction_low,
        ),
    ));
    if let Some(vs) = &p.value_stats {
        let inputs = ValueLossInputs {
            mask: seq_mask,
            ..ValueLossInputs::new(seqs, &batch.values, &batch.old_values, &p.returns)
        };
        let exp = reference::value_loss(&inputs, &value_options())?;
        checks
            .push(("value grad", check_close(&p.grad_values, &exp.grad_values, grad_tol(&exp.grad_values))));
        checks.push(("value loss", stat(vs.loss, exp.stats.loss)));
    }
    let reference_ms = started.elapsed().as_secs_f64() * 1e3;

    let scale = 12.0 * 3.0 / batch.opts.temperature as f64; // |logit/τ| of N(0, 3²) logits, generously
    let f32_tol = Tolerance::for_dtype(DType::F32).scaled(scale);
    let grad_scale = exp_grad.iter().fold(0.0f64, |m, x| m.max(x.abs()));
    let mut all = vec![
        ("policy logp", check_close(&per_row(&p.logp), &exp_policy.logp, f32_tol)),
        ("policy entropy", check_close(&per_row(&p.entropy), &exp_policy.entropy, f32_tol)),
        ("reference logp", check_close(&per_row(&p.ref_logp), &exp_ref.logp, f32_tol)),
        ("kl", check_close(&p.kl, &exp_kl.values, f32_tol)),
    ];
    all.extend(checks);
    all.push((
        "policy grad",
        check_close(&pick(&p.grad), &exp_grad, Tolerance::for_dtype(T::DTYPE).scaled(grad_scale)),
    ));

    println!();
    println!("{:<36} {:>10} {:>10} {:>12}", "stage", "ms", "GB/s", "extra MiB");
    for s in &p.stages {
        let gbps = s.bytes as f64 / s.millis / 1e6;
        println!(
            "{:<36} {:>10.3} {:>10.1} {:>12.1}",
            s.name,
            s.millis,
            gbps,
            s.extra_bytes as f64 / (1 << 20) as f64
        );
    }
    let st = &p.policy_stats;
    println!();
    println!(
        "policy loss {:.5} (entropy bonus {:.5}); clipped low {:.3} high {:.3} dual {:.3}; approx KL k1 {:.5} k3 {:.5}; \
         ratio mean {:.4} in [{:.4}, {:.4}]; entropy {:.4}",
        st.loss,
        -ENTROPY_COEF as f64 * st.entropy_loss,
        st.clip_fraction_low,
        st.clip_fraction_high,
        st.dual_clip_fraction,
        st.approx_kl_k1,
        st.approx_kl_k3,
        st.ratio_mean,
        st.ratio_min,
        st.ratio_max,
        st.entropy_mean
    );
    if let Some(vs) = &p.value_stats {
        println!("value loss {:.5}; value clip fraction {:.3}", vs.loss, vs.clip_fraction);
    }
    println!();
    for (what, r) in &all {
        match r {
            Ok(()) => println!("check {what:<18} ok"),
            Err(m) => println!("check {what:<18} FAIL: {m}"),
        }
    }
    println!();
    println!(
        "ms: median of {iters} runs; GB/s: bytes each stage must move (logits read once, gradient written once, \
         per-token vectors) / time; extra MiB: device or host memory a stage allocates beyond its inputs and \
         outputs; checked {} of {} rows of the logits stages, every token of the others, against the f64 \
         reference in {reference_ms:.0} ms",
        rows.len(),
        shape.rows
    );
    Ok(all.iter().all(|(_, r)| r.is_ok()))
}

/// The advantages stage against the reference, from this backend's own KL: GAE within its
/// documented error bound, whitening and GRPO to f32 rounding.
fn advantage_checks<T: Element>(batch: &Batch<T>, p: &Produced<T>) -> Result<Vec<Check>, Error> {
    let (seqs, mask) = (batch.seq_shape, Some(batch.mask.as_slice()));
    let max_abs = |v: &[f64]| v.iter().fold(1.0f64, |m, x| m.max(x.abs()));
    match batch.estimator {
        Estimator::Gae => {
            let inputs = batch.gae_inputs(&p.kl);
            let exp = reference::gae(&inputs, &gae_options())?;
            let bound = gae_error_bound_factor(seqs.cols) * f64::from(f32::EPSILON) / 2.0
                * max_abs(&gae_error_scale(&inputs, &gae_options())?);
            let gae_tol = Tolerance { rel: 0.0, abs: bound };
            let white = reference::whiten(&p.advantages, seqs, mask, &WhitenOptions::default())?;
            let white_tol = Tolerance::for_dtype(DType::F32).scaled(max_abs(&white));
            Ok(vec![
                ("gae advantages", check_close(&p.advantages, &exp.advantages, gae_tol)),
                ("gae returns", check_close(&p.returns, &exp.returns, gae_tol)),
                ("whitened", check_close(&p.whitened, &white, white_tol)),
            ])
        }
        Estimator::Grpo => {
            let per_seq =
                reference::group_advantages(&batch.scores, &batch.groups, &GroupAdvantageOptions::grpo())?;
            let exp: Vec<f64> = (0..seqs.len())
                .map(|t| if batch.mask[t] != 0 { per_seq[t / seqs.cols] } else { 0.0 })
                .collect();
            let tol = Tolerance::for_dtype(DType::F32).scaled(max_abs(&exp));
            Ok(vec![("grpo advantages", check_close(&p.advantages, &exp, tol))])
        }
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Bytes of (forward with entropy, forward logp only, KL, advantages, losses, backward).
fn bytes<T: Element>(shape: RowShape, kl: KlPlacement, estimator: Estimator) -> [usize; 6] {
    let (n, rows, t) = (shape.len(), shape.rows, T::DTYPE.size_bytes());
    let (advantages, losses) = match estimator {
        // GAE reads (kl,) values and mask, writes advantages and returns; whitening reads the
        // advantages and mask twice and writes them once. The policy loss reads logp, old_logp,
        // advantages, mask, entropy and writes two gradients (reading one to accumulate);
        // the value loss reads three arrays and the mask and writes one.
        Estimator::Gae => (
            rows * (4 * usize::from(kl == KlPlacement::Reward) + 4 + 1 + 8) + rows * (5 + 9),
            rows * (4 * 4 + 1 + 8 + 4 * usize::from(kl == KlPlacement::Loss)) + rows * (12 + 1 + 4),
        ),
        // The scores and group lists are tiny; the mask read and the broadcast write dominate.
        Estimator::Grpo => (rows * (1 + 4), rows * (4 * 4 + 1 + 8 + 4)),
    };
    [
        n * t + rows * (8 + 1 + 12),
        n * t + rows * (8 + 1 + 4),
        rows * (4 + 4 + 1 + 4 + 4),
        advantages,
        losses,
        2 * n * t + rows * (8 + 1 + 16),
    ]
}

pub fn stages<T: Element>(
    shape: RowShape,
    kl: KlPlacement,
    estimator: Estimator,
    times: [Vec<f64>; 6],
    extra: [usize; 6],
) -> Vec<Stage> {
    let kl_name = match kl {
        KlPlacement::Loss => "KL loss term + grad (k3 / k2 grad)",
        KlPlacement::Reward => "KL estimate for the rewards (k1)",
    };
    let (advantages_name, losses_name) = match estimator {
        Estimator::Gae => ("GAE + returns, whitened", "PPO loss + stats, value loss"),
        Estimator::Grpo => ("GRPO advantages (groups of 4)", "PPO loss + stats"),
    };
    let names = [
        "policy logp + entropy + lse",
        "reference logp",
        kl_name,
        advantages_name,
        losses_name,
        "policy backward (in place)",
    ];
    let b = bytes::<T>(shape, kl, estimator);
    names
        .into_iter()
        .zip(times)
        .enumerate()
        .map(|(i, (name, t))| Stage { name, millis: median(t), bytes: b[i], extra_bytes: extra[i] })
        .collect()
}
