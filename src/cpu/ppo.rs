//! CPU PPO losses (MATH.md §4): the policy loss (every objective) and the clipped value loss,
//! per token in f32, with their aggregation, gradients and statistics in one pass over the
//! batch (rayon over sequences, row sums in f64 merged in row order: deterministic).

use rayon::prelude::*;

use crate::advantages::non_finite;
use crate::aggregation::valid_in_row;
use crate::cpu::rows_mut;
use crate::error::Op;
use crate::{
    BatchCounts, PolicyLossInputs, PolicyLossOptions, PolicyLossStats, PolicyObjective, Result,
    ValueLossInputs, ValueLossOptions, ValueLossStats,
};

/// Where [`policy_loss`] writes (each optional, laid out as the inputs; masked tokens get 0):
/// the per-token loss `L`, `∂loss/∂logp` and `∂loss/∂H` (the upstream gradients of the
/// logprobs backward).
#[derive(Debug, Default)]
pub struct PolicyLossOutputs<'a> {
    /// Per-token `L` (unweighted, without the entropy bonus).
    pub loss: Option<&'a mut [f32]>,
    /// `w·∂L/∂logp`.
    pub grad_logp: Option<&'a mut [f32]>,
    /// `−c_H·w`.
    pub grad_entropy: Option<&'a mut [f32]>,
    /// Add `∂loss/∂logp` to what `grad_logp` holds (at valid tokens; masked ones keep their
    /// value) instead of overwriting it: several loss terms (e.g. a KL term from
    /// `sampled_kl`) into one upstream gradient. `grad_entropy` is always overwritten (the
    /// entropy bonus lives here).
    pub accumulate: bool,
}

impl<'a> PolicyLossOutputs<'a> {
    /// Adds `∂loss/∂logp` to `grad_logp`'s contents instead of overwriting them.
    pub fn accumulate(self, accumulate: bool) -> Self {
        PolicyLossOutputs { accumulate, ..self }
    }
    /// Requests the per-token loss.
    pub fn loss(self, l: &'a mut [f32]) -> Self {
        PolicyLossOutputs { loss: Some(l), ..self }
    }
    /// Requests `∂loss/∂logp`.
    pub fn grad_logp(self, g: &'a mut [f32]) -> Self {
        PolicyLossOutputs { grad_logp: Some(g), ..self }
    }
    /// Requests `∂loss/∂H`.
    pub fn grad_entropy(self, g: &'a mut [f32]) -> Self {
        PolicyLossOutputs { grad_entropy: Some(g), ..self }
    }
}

/// One token's loss, `∂L/∂logp` and clip flags (low, high, dual), in f32.
pub(crate) fn policy_token(
    opts: &PolicyLossOptions,
    logp: f32,
    lr: f32,
    clamped: bool,
    a: f32,
) -> (f32, f32, [bool; 3]) {
    let r = lr.exp();
    let (lo, hi) = (1.0 - opts.clip_low, 1.0 + opts.clip_high);
    let clip = r.clamp(lo, hi);
    match opts.objective {
        PolicyObjective::Clip | PolicyObjective::Gspo => {
            let c = opts.dual_bound();
            let mut l = (-a * r).max(-a * clip);
            if a < 0.0 {
                l = l.min(-a * c);
            }
            let active = (a > 0.0 && r <= hi) || (a < 0.0 && lo <= r && r <= c);
            let g = if active && !clamped { -a * r } else { 0.0 };
            (l, g, [a < 0.0 && r < lo, a > 0.0 && r > hi, a < 0.0 && r > c])
        }
        PolicyObjective::KlPenalty { beta } => {
            let l = -a * r + beta * ((r - 1.0) - lr);
            (l, if clamped { 0.0 } else { -a * r + beta * (r - 1.0) }, [false; 3])
        }
        PolicyObjective::Cispo => (-clip * a * logp, -clip * a, [r < lo, r > hi, false]),
    }
}

/// One row's sums (f64) for the statistics.
#[derive(Debug, Clone, Copy, Default)]
struct RowSums {
    loss: f64,
    entropy: f64,
    low: f64,
    high: f64,
    dual: f64,
    k1: f64,
    k3: f64,
    ratio: f64,
    ratio_min: f64,
    ratio_max: f64,
    bad: bool,
}

/// The policy loss (MATH.md §4, crate docs of [`PolicyObjective`]) of a `[B, T]` batch: per
/// token `L` and `∂L/∂logp` in f32, the aggregate `Σ mask·w·L − c_H·Σ mask·w·H` under the
/// options' aggregation and normaliser, `w·∂L/∂logp` and `−c_H·w` per token, and the
/// statistics — one pass over the batch. Returns the statistics.
///
/// Errors: shape and option errors; [`RowProblem::NonFinite`](crate::RowProblem::NonFinite)
/// for the lowest sequence with a non-finite input at a valid token (inputs at masked tokens
/// are not read). An all-masked batch has loss 0.
///
/// ```
/// use rlhf_kernels::{cpu, PolicyLossInputs, PolicyLossOptions, RowShape};
/// let (logp, old, adv) = ([-1.0f32, -0.5], [-1.0f32, -1.0], [1.0f32, 1.0]);
/// let inputs = PolicyLossInputs::new(RowShape::new(1, 2), &logp, &old, &adv);
/// let mut grad = [0.0f32; 2];
/// let stats = cpu::policy_loss(&inputs, cpu::PolicyLossOutputs::default().grad_logp(&mut grad), &PolicyLossOptions::default())?;
/// // Token 0: ratio 1, unclipped, ∂/∂logp = −A·r / 2 tokens; token 1: ratio 1.65 clipped at 1.2.
/// assert_eq!(grad, [-0.5, 0.0]);
/// assert!((stats.loss - (-1.0 - 1.2) / 2.0).abs() < 1e-6 && stats.clip_fraction_high == 0.5);
/// # Ok::<(), rlhf_kernels::Error>(())
/// ```
pub fn policy_loss(
    inputs: &PolicyLossInputs<'_>,
    out: PolicyLossOutputs<'_>,
    opts: &PolicyLossOptions,
) -> Result<PolicyLossStats> {
    inputs.validate()?;
    opts.validate()?;
    let (shape, mask) = (inputs.shape, inputs.mask);
    for (what, o) in [("loss", &out.loss), ("grad_logp", &out.grad_logp), ("grad_entropy", &out.grad_entropy)]
    {
        if let Some(o) = o {
            shape.check_buffer(what, o.len())?;
        }
    }
    let local = BatchCounts::of(shape, mask);
    let counts = opts.normaliser.counts(local);
    let clamp = opts.log_ratio_clamp;
    let gspo = opts.objective == PolicyObjective::Gspo;
    let accumulate = out.accumulate;
    let rows: Vec<(f64, RowSums)> = rows_mut(out.loss, shape)
        .zip(rows_mut(out.grad_logp, shape))
        .zip(rows_mut(out.grad_entropy, shape))
        .enumerate()
        .map(|(i, ((mut loss, mut grad), mut grad_h))| {
            let range = shape.row_range(i);
            let valid = |t: usize| mask.is_none_or(|m| m[t] != 0);
            let n_valid = valid_in_row(shape, mask, i);
            let w = opts.aggregation.token_weight(counts, n_valid);
            let seq_lr = if gspo {
                let sum: f64 = range
                    .clone()
                    .filter(|&t| valid(t))
                    .map(|t| (inputs.logp[t] - inputs.old_logp[t]) as f64)
                    .sum();
                (sum / n_valid.max(1) as f64) as f32
            } else {
                0.0
            };
            let mut s =
                RowSums { ratio_min: f64::INFINITY, ratio_max: f64::NEG_INFINITY, ..Default::default() };
            for (j, t) in range.enumerate() {
                let (mut l_out, mut g_out, mut h_out) = (0.0, 0.0, 0.0);
                if valid(t) {
                    let (lp, old, a) = (inputs.logp[t], inputs.old_logp[t], inputs.advantages[t]);
                    let h = inputs.entropy.map_or(0.0, |h| h[t]);
                    s.bad |= !(lp.is_finite() && old.is_finite() && a.is_finite() && h.is_finite());
                    let token_raw = lp - old;
                    let token_lr = token_raw.clamp(-clamp, clamp);
                    let raw = if gspo { seq_lr } else { token_raw };
                    let lr = raw.clamp(-clamp, clamp);
                    let (l, g, [lo, hi, du]) = policy_token(opts, lp, lr, lr != raw, a);
                    (l_out, g_out, h_out) =
                        (l, (w * g as f64) as f32, (-(opts.entropy_coef as f64) * w) as f32);
                    let r = token_lr.exp() as f64;
                    s.loss += l as f64;
                    s.entropy += h as f64;
                    s.low += f64::from(u8::from(lo));
                    s.high += f64::from(u8::from(hi));
                    s.dual += f64::from(u8::from(du));
                    s.k1 -= token_lr as f64;
                    s.k3 += (r - 1.0) - token_lr as f64;
                    s.ratio += r;
                    s.ratio_min = s.ratio_min.min(r);
                    s.ratio_max = s.ratio_max.max(r);
                }
                if let Some(o) = loss.as_deref_mut() {
                    o[j] = l_out;
                }
                if let Some(o) = grad.as_deref_mut() {
                    if !accumulate {
                        o[j] = g_out;
                    } else if valid(t) {
                        o[j] += g_out;
                    }
                }
                if let Some(o) = grad_h.as_deref_mut() {
                    o[j] = h_out;
                }
            }
            (w, s)
        })
        .collect();
    if let Some(i) = rows.iter().position(|(_, s)| s.bad) {
        return Err(non_finite(Op::PolicyLoss, i));
    }
    let mut st =
        PolicyLossStats { ratio_min: f64::INFINITY, ratio_max: f64::NEG_INFINITY, ..Default::default() };
    let (mut low, mut high, mut dual, mut k1, mut k3, mut ratio, mut h) = (0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0);
    for (w, s) in &rows {
        st.policy_loss += w * s.loss;
        st.entropy_loss += w * s.entropy;
        (low, high, dual) = (low + s.low, high + s.high, dual + s.dual);
        (k1, k3, ratio, h) = (k1 + s.k1, k3 + s.k3, ratio + s.ratio, h + s.entropy);
        st.ratio_min = st.ratio_min.min(s.ratio_min);
        st.ratio_max = st.ratio_max.max(s.ratio_max);
    }
    let n = local.valid_tokens;
    let mean = |x: f64| if n > 0.0 { x / n } else { 0.0 };
    st.loss = st.policy_loss - opts.entropy_coef as f64 * st.entropy_loss;
    (st.clip_fraction_low, st.clip_fraction_high, st.dual_clip_fraction) =
        (mean(low), mean(high), mean(dual));
    (st.approx_kl_k1, st.approx_kl_k3, st.ratio_mean, st.entropy_mean) =
        (mean(k1), mean(k3), mean(ratio), mean(h));
    st.counts = local;
    Ok(st)
}

/// Where [`value_loss`] writes (each optional, laid out as the inputs; masked tokens get 0).
#[derive(Debug, Default)]
pub struct ValueLossOutputs<'a> {
    /// Per-token `½·max((v − R)², (v_clip − R)²)`.
    pub loss: Option<&'a mut [f32]>,
    /// `coef·w·∂L_v/∂v`.
    pub grad_values: Option<&'a mut [f32]>,
}

impl<'a> ValueLossOutputs<'a> {
    /// Requests the per-token loss.
    pub fn loss(self, l: &'a mut [f32]) -> Self {
        ValueLossOutputs { loss: Some(l), ..self }
    }
    /// Requests `∂loss/∂v`.
    pub fn grad_values(self, g: &'a mut [f32]) -> Self {
        ValueLossOutputs { grad_values: Some(g), ..self }
    }
}

/// One token's value loss, `∂L_v/∂v` and whether the clipped error is the larger, in f32.
pub(crate) fn value_token(clip: Option<f32>, v: f32, old: f32, ret: f32) -> (f32, f32, bool) {
    match clip {
        None => (0.5 * (v - ret) * (v - ret), v - ret, false),
        Some(eps) => {
            let v_clip = old + (v - old).clamp(-eps, eps);
            let (e1, e2) = ((v - ret) * (v - ret), (v_clip - ret) * (v_clip - ret));
            let g = if e1 >= e2 {
                v - ret
            } else if (v - old).abs() < eps {
                v_clip - ret
            } else {
                0.0
            };
            (0.5 * e1.max(e2), g, e2 > e1)
        }
    }
}

/// The clipped value loss (MATH.md §4) of a `[B, T]` batch: per token `L_v`, the aggregate
/// `coef·Σ mask·w·L_v`, the gradient `coef·w·∂L_v/∂v` and the clip fraction, in one pass.
///
/// Errors: shape and option errors; [`RowProblem::NonFinite`](crate::RowProblem::NonFinite)
/// for the lowest sequence with a non-finite input at a valid token.
///
/// ```
/// use rlhf_kernels::{cpu, RowShape, ValueLossInputs, ValueLossOptions};
/// let inputs = ValueLossInputs { shape: RowShape::new(1, 2), values: &[1.0, 0.1], old_values: &[0.0, 0.0], returns: &[2.0, 0.0], mask: None };
/// let mut grad = [0.0f32; 2];
/// let stats = cpu::value_loss(&inputs, cpu::ValueLossOutputs::default().grad_values(&mut grad), &ValueLossOptions::default().clip(Some(0.5)))?;
/// assert_eq!(grad, [0.0, 0.05]); // token 0 clipped (no gradient); token 1: (v − R)/2 tokens
/// assert_eq!(stats.clip_fraction, 0.5);
/// # Ok::<(), rlhf_kernels::Error>(())
/// ```
pub fn value_loss(
    inputs: &ValueLossInputs<'_>,
    out: ValueLossOutputs<'_>,
    opts: &ValueLossOptions,
) -> Result<ValueLossStats> {
    inputs.validate()?;
    opts.validate()?;
    let (shape, mask) = (inputs.shape, inputs.mask);
    for (what, o) in [("loss", &out.loss), ("grad_values", &out.grad_values)] {
        if let Some(o) = o {
            shape.check_buffer(what, o.len())?;
        }
    }
    let local = BatchCounts::of(shape, mask);
    let counts = opts.normaliser.counts(local);
    let coef = opts.coef as f64;
    let rows: Vec<(f64, f64, f64, bool)> = rows_mut(out.loss, shape)
        .zip(rows_mut(out.grad_values, shape))
        .enumerate()
        .map(|(i, (mut loss, mut grad))| {
            let w = coef * opts.aggregation.token_weight(counts, valid_in_row(shape, mask, i));
            let (mut sum, mut clipped, mut bad) = (0.0f64, 0.0f64, false);
            for (j, t) in shape.row_range(i).enumerate() {
                let (mut l_out, mut g_out) = (0.0, 0.0);
                if mask.is_none_or(|m| m[t] != 0) {
                    let (v, old, ret) = (inputs.values[t], inputs.old_values[t], inputs.returns[t]);
                    bad |= !(v.is_finite() && old.is_finite() && ret.is_finite());
                    let (l, g, c) = value_token(opts.clip, v, old, ret);
                    (l_out, g_out) = (l, (w * g as f64) as f32);
                    sum += l as f64;
                    clipped += f64::from(u8::from(c));
                }
                if let Some(o) = loss.as_deref_mut() {
                    o[j] = l_out;
                }
                if let Some(o) = grad.as_deref_mut() {
                    o[j] = g_out;
                }
            }
            (w, sum, clipped, bad)
        })
        .collect();
    if let Some(i) = rows.iter().position(|r| r.3) {
        return Err(non_finite(Op::ValueLoss, i));
    }
    let loss = rows.iter().map(|r| r.0 * r.1).sum();
    let clipped: f64 = rows.iter().map(|r| r.2).sum();
    let n = local.valid_tokens;
    Ok(ValueLossStats { loss, clip_fraction: if n > 0.0 { clipped / n } else { 0.0 }, counts: local })
}
