//! The PPO losses in f64 (MATH.md §4), written from the formulas: each branch spelled out,
//! aggregation weights from the counts, statistics by direct sums.

use crate::advantages::{first_non_finite, non_finite};
use crate::aggregation::valid_in_row;
use crate::error::Op;
use crate::reference::fits_f32;
use crate::{
    BatchCounts, PolicyLossInputs, PolicyLossOptions, PolicyLossStats, PolicyObjective, Result, RowProblem,
    ValueLossInputs, ValueLossOptions, ValueLossStats,
};

/// Per-token results of [`policy_loss`], dense `[B·T]` (0 at masked tokens).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct PolicyLoss {
    /// The per-token policy loss `L` (unweighted, without the entropy bonus).
    pub loss: Vec<f64>,
    /// `∂loss/∂logp`: the aggregation weight times `∂L/∂logp`.
    pub grad_logp: Vec<f64>,
    /// `∂loss/∂H = −c_H·w`.
    pub grad_entropy: Vec<f64>,
    /// The statistics.
    pub stats: PolicyLossStats,
}

/// One token's loss and `∂L/∂logp` for the log-ratio `lr` of its objective (`ratio_clamped`:
/// the log-ratio clamp was active), and whether it is clipped low, high or by the dual clip.
/// `gmpo`: the sequence's GMPO ratio and mean advantage.
fn token_terms(
    opts: &PolicyLossOptions,
    logp: f64,
    lr: f64,
    ratio_clamped: bool,
    a: f64,
    gmpo: [f64; 2],
) -> (f64, f64, [bool; 3]) {
    let r = lr.exp();
    let (lo, hi) = (1.0 - opts.clip_low as f64, 1.0 + opts.clip_high as f64);
    let clip = r.clamp(lo, hi);
    let c = opts.dual_bound() as f64;
    match opts.objective {
        PolicyObjective::Clip | PolicyObjective::Gspo => {
            let l1 = -a * r;
            let l2 = -a * clip;
            let mut l = l1.max(l2);
            let dual = a < 0.0 && r > c;
            if a < 0.0 {
                l = l.min(-a * c);
            }
            let active = (a > 0.0 && r <= hi) || (a < 0.0 && lo <= r && r <= c);
            let g = if active && !ratio_clamped { -a * r } else { 0.0 };
            (l, g, [a < 0.0 && r < lo, a > 0.0 && r > hi, dual])
        }
        PolicyObjective::KlPenalty { beta } => {
            let beta = beta as f64;
            let l = -a * r + beta * ((r - 1.0) - lr);
            let g = if ratio_clamped { 0.0 } else { -a * r + beta * (r - 1.0) };
            (l, g, [false; 3])
        }
        PolicyObjective::Cispo => (-clip * a * logp, -clip * a, [r < lo, r > hi, false]),
        PolicyObjective::Sapo { tau_pos, tau_neg } => {
            let tau = if a > 0.0 { tau_pos } else { tau_neg } as f64;
            let x = tau * (r - 1.0);
            let sigmoid = 1.0 / (1.0 + (-x).exp());
            // σ(x)·σ(−x)·r = e^{lr − |x|} / (1 + e^{−|x|})²: finite for every ratio.
            let e = (-x.abs()).exp();
            let slope = 4.0 * (lr - x.abs()).exp() / ((1.0 + e) * (1.0 + e));
            (-a * (4.0 / tau) * sigmoid, if ratio_clamped { 0.0 } else { -a * slope }, [false; 3])
        }
        PolicyObjective::Gmpo => {
            let ([ratio, mean_adv], (c, [low, high])) = (gmpo, gmpo_clip(opts, lr, a));
            let unclipped = a != 0.0 && c == lr && !ratio_clamped;
            let l = -mean_adv * ratio;
            (l, if unclipped { l } else { 0.0 }, [low, high, false])
        }
    }
}

/// GMPO's token log-ratio clipped one-sided in log space (`lr` already clamped): `min(lr,
/// ε_high)` where `A > 0`, `max(lr, −ε_low)` where `A < 0`, 0 where `A = 0`; and whether the
/// clip moved it below / above.
fn gmpo_clip(opts: &PolicyLossOptions, lr: f64, a: f64) -> (f64, [bool; 2]) {
    let (lo, hi) = (-(opts.clip_low as f64), opts.clip_high as f64);
    if a > 0.0 {
        (lr.min(hi), [false, lr > hi])
    } else if a < 0.0 {
        (lr.max(lo), [lr < lo, false])
    } else {
        (0.0, [false; 2])
    }
}

/// The policy loss of MATH.md §4 per token, its aggregate under the options' aggregation and
/// normaliser, the gradients and the statistics.
///
/// Errors: shape and option errors; [`RowProblem::NonFinite`](crate::RowProblem::NonFinite)
/// for the lowest sequence with a non-finite input at a valid token,
/// [`RowProblem::Overflow`](crate::RowProblem::Overflow) for the lowest one with a per-token
/// loss or gradient, or a row sum of the loss, entropy, k1, k3 or ratio, beyond f32 (the
/// backends' accumulators).
///
/// ```
/// use rlhf_kernels::{reference, PolicyLossInputs, PolicyLossOptions, RowShape};
/// // ratio e^0.5 ≈ 1.65 > 1.2 with A > 0: clipped, no gradient.
/// let inputs = PolicyLossInputs::new(RowShape::new(1, 1), &[-0.5], &[-1.0], &[1.0]);
/// let out = reference::policy_loss(&inputs, &PolicyLossOptions::default())?;
/// assert!((out.loss[0] + 1.2).abs() < 1e-6 && out.grad_logp[0] == 0.0);
/// assert_eq!(out.stats.clip_fraction_high, 1.0);
/// # Ok::<(), rlhf_kernels::Error>(())
/// ```
pub fn policy_loss(inputs: &PolicyLossInputs<'_>, opts: &PolicyLossOptions) -> Result<PolicyLoss> {
    inputs.validate()?;
    opts.validate()?;
    let (shape, mask) = (inputs.shape, inputs.mask);
    let mut arrays = vec![inputs.logp, inputs.old_logp, inputs.advantages];
    arrays.extend(inputs.entropy);
    if let Some(i) = first_non_finite(shape, mask, &arrays) {
        return Err(non_finite(Op::PolicyLoss, i));
    }
    let local = BatchCounts::of(shape, mask);
    let counts = opts.normaliser.counts(local);
    let clamp = opts.lr_clamp() as f64;
    let mut out = PolicyLoss {
        loss: vec![0.0; shape.len()],
        grad_logp: vec![0.0; shape.len()],
        grad_entropy: vec![0.0; shape.len()],
        stats: PolicyLossStats {
            ratio_min: f64::INFINITY,
            ratio_max: f64::NEG_INFINITY,
            ..Default::default()
        },
    };
    let st = &mut out.stats;
    let (mut low, mut high, mut dual, mut k1, mut k3, mut ratios, mut h_sum) =
        (0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0);
    for i in 0..shape.rows {
        let valid: Vec<usize> = shape.row_range(i).filter(|&t| mask.is_none_or(|m| m[t] != 0)).collect();
        let w = opts.aggregation.token_weight(counts, valid_in_row(shape, mask, i));
        let lr_of = |t: usize| inputs.logp[t] as f64 - inputs.old_logp[t] as f64;
        let adv = |t: usize| inputs.advantages[t] as f64;
        let n_valid = valid.len().max(1) as f64;
        // GSPO: the sequence's mean log-ratio, clamped.
        let seq_lr = valid.iter().map(|&t| lr_of(t)).sum::<f64>() / n_valid;
        // GMPO: the geometric-mean ratio of the clipped log-ratios and the mean advantage.
        let gmpo_ratio =
            (valid.iter().map(|&t| gmpo_clip(opts, lr_of(t).clamp(-clamp, clamp), adv(t)).0).sum::<f64>()
                / n_valid)
                .exp();
        let mean_adv = valid.iter().map(|&t| adv(t)).sum::<f64>() / n_valid;
        // The row's sums the backends keep in f32 (loss, entropy, k1, k3, ratio).
        let mut row_sums = [0.0f64; 5];
        for &t in &valid {
            let raw = if opts.objective == PolicyObjective::Gspo { seq_lr } else { lr_of(t) };
            let lr = raw.clamp(-clamp, clamp);
            let (l, g, [lo, hi, du]) =
                token_terms(opts, inputs.logp[t] as f64, lr, lr != raw, adv(t), [gmpo_ratio, mean_adv]);
            let j = i * shape.cols + (t - shape.row_start(i));
            out.loss[j] = l;
            out.grad_logp[j] = w * g;
            out.grad_entropy[j] = -(opts.entropy_coef as f64) * w;
            st.policy_loss += w * l;
            let h = inputs.entropy.map_or(0.0, |h| h[t] as f64);
            st.entropy_loss += w * h;
            h_sum += h;
            low += f64::from(u8::from(lo));
            high += f64::from(u8::from(hi));
            dual += f64::from(u8::from(du));
            let token_lr = lr_of(t).clamp(-clamp, clamp);
            let r = token_lr.exp();
            k1 -= token_lr;
            k3 += (r - 1.0) - token_lr;
            ratios += r;
            st.ratio_min = st.ratio_min.min(r);
            st.ratio_max = st.ratio_max.max(r);
            for (sum, x) in row_sums.iter_mut().zip([l, h, -token_lr, (r - 1.0) - token_lr, r]) {
                *sum += x;
            }
        }
        let row = i * shape.cols..(i + 1) * shape.cols;
        // A loss or gradient beyond f32, or a row sum of the statistics (a ratio past f32
        // without the log-ratio clamp, say), as the backends report it.
        let outputs_fit = out.loss[row.clone()].iter().chain(&out.grad_logp[row]).all(|&x| fits_f32(x));
        if !(outputs_fit && row_sums.iter().all(|&x| fits_f32(x))) {
            return Err(Op::PolicyLoss.invalid_row(i, RowProblem::Overflow));
        }
    }
    let n = local.valid_tokens;
    let mean = |x: f64| if n > 0.0 { x / n } else { 0.0 };
    st.loss = st.policy_loss - opts.entropy_coef as f64 * st.entropy_loss;
    (st.clip_fraction_low, st.clip_fraction_high, st.dual_clip_fraction) =
        (mean(low), mean(high), mean(dual));
    (st.approx_kl_k1, st.approx_kl_k3, st.ratio_mean, st.entropy_mean) =
        (mean(k1), mean(k3), mean(ratios), mean(h_sum));
    st.counts = local;
    Ok(out)
}

/// Per-token results of [`value_loss`], dense `[B·T]`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ValueLoss {
    /// `½·max((v − R)², (v_clip − R)²)` per token (without the coefficient).
    pub loss: Vec<f64>,
    /// `∂loss/∂v`: `coef·w·∂L_v/∂v`.
    pub grad_values: Vec<f64>,
    /// The statistics.
    pub stats: ValueLossStats,
}

/// The clipped value loss of MATH.md §4, aggregated, with its gradient.
///
/// Errors: shape and option errors; [`RowProblem::NonFinite`](crate::RowProblem::NonFinite)
/// for the lowest sequence with a non-finite input at a valid token,
/// [`RowProblem::Overflow`](crate::RowProblem::Overflow) for the lowest one with a per-token
/// loss or gradient beyond f32.
///
/// ```
/// use rlhf_kernels::{reference, RowShape, ValueLossInputs, ValueLossOptions};
/// let inputs = ValueLossInputs::new(RowShape::new(1, 1), &[1.0], &[0.0], &[2.0]);
/// let out = reference::value_loss(&inputs, &ValueLossOptions::default().clip(Some(0.5)))?;
/// // v_clip = 0.5: ½·max(1², 1.5²) = 1.125; the clipped error wins and the clip is active.
/// assert_eq!((out.loss[0], out.grad_values[0], out.stats.clip_fraction), (1.125, 0.0, 1.0));
/// # Ok::<(), rlhf_kernels::Error>(())
/// ```
pub fn value_loss(inputs: &ValueLossInputs<'_>, opts: &ValueLossOptions) -> Result<ValueLoss> {
    inputs.validate()?;
    opts.validate()?;
    let (shape, mask) = (inputs.shape, inputs.mask);
    if let Some(i) = first_non_finite(shape, mask, &[inputs.values, inputs.old_values, inputs.returns]) {
        return Err(non_finite(Op::ValueLoss, i));
    }
    let local = BatchCounts::of(shape, mask);
    let counts = opts.normaliser.counts(local);
    let coef = opts.coef as f64;
    let mut out =
        ValueLoss { loss: vec![0.0; shape.len()], grad_values: vec![0.0; shape.len()], ..Default::default() };
    let mut clipped = 0.0;
    for i in 0..shape.rows {
        let w = opts.aggregation.token_weight(counts, valid_in_row(shape, mask, i));
        for (j, t) in shape.row_range(i).enumerate() {
            if mask.is_some_and(|m| m[t] == 0) {
                continue;
            }
            let (v, old, ret) =
                (inputs.values[t] as f64, inputs.old_values[t] as f64, inputs.returns[t] as f64);
            let (l, g, c) = match opts.clip {
                None => (0.5 * (v - ret).powi(2), v - ret, false),
                Some(eps) => {
                    let eps = eps as f64;
                    let v_clip = old + (v - old).clamp(-eps, eps);
                    let (e1, e2) = ((v - ret).powi(2), (v_clip - ret).powi(2));
                    let g = if e1 >= e2 {
                        v - ret
                    } else if (v - old).abs() < eps {
                        v_clip - ret
                    } else {
                        0.0
                    };
                    (0.5 * e1.max(e2), g, e2 > e1)
                }
            };
            out.loss[i * shape.cols + j] = l;
            out.grad_values[i * shape.cols + j] = coef * w * g;
            out.stats.loss += coef * w * l;
            clipped += f64::from(u8::from(c));
        }
        let row = i * shape.cols..(i + 1) * shape.cols;
        if !out.loss[row.clone()].iter().chain(&out.grad_values[row]).all(|&x| fits_f32(x)) {
            return Err(Op::ValueLoss.invalid_row(i, RowProblem::Overflow));
        }
    }
    out.stats.clip_fraction = if local.valid_tokens > 0.0 { clipped / local.valid_tokens } else { 0.0 };
    out.stats.counts = local;
    Ok(out)
}
