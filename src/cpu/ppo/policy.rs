//! The CPU policy loss (MATH.md §4, every objective): per token in f32, with its aggregation,
//! gradients and statistics in one pass over the batch (rayon over sequences, row sums merged
//! in row order: deterministic).

use rayon::prelude::*;

use crate::aggregation::valid_in_row;
use crate::cpu::rows_mut;
use crate::cpu::simd::{self, LANES, LOG2E, dispatch};
use crate::error::Op;
use crate::{
    BatchCounts, Element, PolicyLossInputs, PolicyLossOptions, PolicyLossOutputs, PolicyLossStats,
    PolicyObjective, Result, RowProblem,
};

/// The per-row constants of the policy kernel.
#[derive(Debug, Clone, Copy)]
struct RowParams {
    /// 0 clip, 1 PPO-KL, 2 GSPO, 3 CISPO, 4 SAPO, 5 GMPO (the kernels' codes too).
    objective: u8,
    lo: f32,
    hi: f32,
    /// GMPO's log-space bounds `−ε_low`, `ε_high`.
    log_lo: f32,
    log_hi: f32,
    /// SAPO's `τ₊`, `τ₋` and gate scales `4/τ₊`, `4/τ₋`.
    tau: [f32; 2],
    gate: [f32; 2],
    /// Dual clip bound (`+inf` without one).
    dual: f32,
    clamp: f32,
    beta: f32,
    /// Aggregation weight of the row's tokens and `∂loss/∂H = −c_H·w`.
    w: f32,
    grad_h: f32,
    /// GSPO: the row's raw mean log-ratio.
    seq_lr: f32,
    /// The row's valid tokens.
    n_valid: usize,
    accumulate: bool,
}

/// One row's sums for the statistics (f32 lanes reduced in a fixed tree, then f64).
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
    /// A non-finite input at a valid token.
    bad: bool,
    /// Finite inputs, but a per-token loss or gradient, or a row sum, beyond f32.
    overflow: bool,
}

/// One row of each per-token input.
struct RowInputs<'a, T> {
    lp: &'a [T],
    old: &'a [T],
    adv: &'a [T],
    ent: Option<&'a [T]>,
    mask: Option<&'a [u8]>,
}

/// One row of each requested output.
struct RowOutputs<'a> {
    loss: Option<&'a mut [f32]>,
    grad: Option<&'a mut [f32]>,
    grad_h: Option<&'a mut [f32]>,
}

/// Tokens per step of the row kernel (one [`LANES`] vector of each quantity).
const STEP: usize = LANES;

/// The stat accumulators of [`policy_row_generic`], one lane array each: loss, entropy, low,
/// high, dual, k1, k3, ratio, the non-finite input check and the overflow check (then min and
/// max of the ratio).
const SUMS: usize = 10;

/// One row of the policy loss, [`STEP`] tokens at a time in branch-free f32 (every
/// objective's formula evaluated, the row's chosen by a select), so that it vectorises; the
/// tail is padded with masked tokens. Per token (MATH.md §4, `crate::ppo` docs): `r = e^lr`,
/// clip family `L = max(−A·r, −A·clip(r))` (then `min(·, −A·c)` where `A < 0`), gradient
/// `−A·r` where unclipped and the log-ratio clamp inactive; PPO-KL `−A·r + β·((r − 1) − lr)`;
/// CISPO `−clip(r)·A·logp`; SAPO `−A·(4/τ)·σ(τ(r − 1))`; GMPO the row's loss, its gradient at
/// the tokens the log-space clip leaves alone.
#[inline(always)]
#[allow(clippy::needless_range_loop)] // parallel lane arrays
fn policy_row_generic<T: Element, V: Variant>(
    p: &RowParams,
    x: RowInputs<'_, T>,
    out: RowOutputs<'_>,
) -> RowSums {
    let seq_loss = if V::GMPO { gmpo_row_loss(p, &x) } else { 0.0 };
    let RowInputs { lp, old, adv, ent, mask } = x;
    let RowOutputs { mut loss, mut grad, mut grad_h } = out;
    let cols = lp.len();
    let mut acc = [[0.0f32; STEP]; SUMS];
    let (mut rmin, mut rmax) = ([f32::INFINITY; STEP], [f32::NEG_INFINITY; STEP]);
    let seq_raw = p.seq_lr;
    let seq_lr = seq_raw.clamp(-p.clamp, p.clamp);
    let seq_r = simd::exp2(seq_lr * LOG2E);
    let gspo = p.objective == 2;
    for start in (0..cols).step_by(STEP) {
        let n = STEP.min(cols - start);
        let mut v = [[0.0f32; STEP]; 5]; // logp, old, adv, entropy, valid
        for k in 0..n {
            let t = start + k;
            if mask.is_none_or(|m| m[t] != 0) {
                v[0][k] = lp[t].to_f32();
                v[1][k] = old[t].to_f32();
                v[2][k] = adv[t].to_f32();
                v[3][k] = ent.map_or(0.0, |h| h[t].to_f32());
                v[4][k] = 1.0;
            }
        }
        let (mut l_out, mut g_out) = ([0.0f32; STEP], [0.0f32; STEP]);
        for k in 0..STEP {
            let (lpk, a, h, m) = (v[0][k], v[2][k], v[3][k], v[4][k] != 0.0);
            let raw_t = lpk - v[1][k];
            let lr_t = raw_t.clamp(-p.clamp, p.clamp);
            let r_t = simd::exp2(lr_t * LOG2E);
            let (lr, raw, r) = if gspo { (seq_lr, seq_raw, seq_r) } else { (lr_t, raw_t, r_t) };
            let clamped = lr != raw;
            let clip = r.clamp(p.lo, p.hi);
            let neg_a = -a;
            let l_max = (neg_a * r).max(neg_a * clip);
            let l_clip = if a < 0.0 { l_max.min(neg_a * p.dual) } else { l_max };
            let active = (a > 0.0 && r <= p.hi) || (a < 0.0 && p.lo <= r && r <= p.dual);
            let g_clip = if active && !clamped { neg_a * r } else { 0.0 };
            let l_kl = neg_a * r + p.beta * ((r - 1.0) - lr);
            let g_kl = if clamped { 0.0 } else { neg_a * r + p.beta * (r - 1.0) };
            let (l_ci, g_ci) = (-clip * a * lpk, -clip * a);
            // SAPO: σ(x) and σ(x)·σ(−x)·r from e = e^{−|x|} (r·e is 0 where e underflows);
            // compiled only into the SAPO instance (its exp costs the others ~10 %).
            let pos = a > 0.0;
            let (l_sa, g_sa) = if V::SAPO {
                let x = (if pos { p.tau[0] } else { p.tau[1] }) * (r - 1.0);
                let e = simd::exp2(-x.abs() * LOG2E);
                let inv = 1.0 / (1.0 + e);
                let sigmoid = if x >= 0.0 { inv } else { e * inv };
                let re = if e > 0.0 { r * e } else { 0.0 };
                let g = if clamped { 0.0 } else { neg_a * 4.0 * re * inv * inv };
                (neg_a * (if pos { p.gate[0] } else { p.gate[1] }) * sigmoid, g)
            } else {
                (0.0, 0.0)
            };
            // GMPO: one-sided log-space clip of the token's log-ratio.
            let (gm_low, gm_high) = (a < 0.0 && lr < p.log_lo, pos && lr > p.log_hi);
            let gm_free = (pos && lr <= p.log_hi) || (a < 0.0 && lr >= p.log_lo);
            let g_gm = if gm_free && !clamped { seq_loss } else { 0.0 };
            let (l, g, low, high, dual) = match p.objective {
                1 => (l_kl, g_kl, false, false, false),
                3 => (l_ci, g_ci, r < p.lo, r > p.hi, false),
                4 => (l_sa, g_sa, false, false, false),
                5 => (seq_loss, g_gm, gm_low, gm_high, false),
                _ => (l_clip, g_clip, a < 0.0 && r < p.lo, a > 0.0 && r > p.hi, a < 0.0 && r > p.dual),
            };
            let f = |b: bool| if b && m { 1.0 } else { 0.0 };
            l_out[k] = if m { l } else { 0.0 };
            g_out[k] = if m { p.w * g } else { 0.0 };
            acc[0][k] += l_out[k];
            acc[1][k] += h;
            acc[2][k] += f(low);
            acc[3][k] += f(high);
            acc[4][k] += f(dual);
            acc[5][k] -= lr_t;
            acc[6][k] += (r_t - 1.0) - lr_t;
            acc[7][k] += if m { r_t } else { 0.0 };
            acc[8][k] += lpk * 0.0 + v[1][k] * 0.0 + a * 0.0 + h * 0.0; // NaN if any input is not finite
            acc[9][k] += l_out[k] * 0.0 + g_out[k] * 0.0; // NaN if an output overflowed
            rmin[k] = rmin[k].min(if m { r_t } else { f32::INFINITY });
            rmax[k] = rmax[k].max(if m { r_t } else { f32::NEG_INFINITY });
        }
        if let Some(o) = loss.as_deref_mut() {
            o[start..start + n].copy_from_slice(&l_out[..n]);
        }
        if let Some(o) = grad.as_deref_mut() {
            let o = &mut o[start..start + n];
            if p.accumulate {
                o.iter_mut().zip(&g_out).for_each(|(o, g)| *o += g);
                acc[9][0] += o.iter().map(|o| o * 0.0).sum::<f32>();
            } else {
                o.copy_from_slice(&g_out[..n]);
            }
        }
        if let Some(o) = grad_h.as_deref_mut() {
            for k in 0..n {
                o[start + k] = if v[4][k] != 0.0 { p.grad_h } else { 0.0 };
            }
        }
    }
    let sum = |k: usize| simd::sum_lanes(&acc[k]) as f64;
    RowSums {
        loss: sum(0),
        entropy: sum(1),
        low: sum(2),
        high: sum(3),
        dual: sum(4),
        k1: sum(5),
        k3: sum(6),
        ratio: sum(7),
        ratio_min: rmin.iter().copied().fold(f32::INFINITY, f32::min) as f64,
        ratio_max: simd::max_lanes(&rmax) as f64,
        bad: !sum(8).is_finite(),
        overflow: (0..8).chain([9]).any(|k| !sum(k).is_finite()),
    }
}

dispatch!(fn policy_row<T: Element, V: Variant>(p: &RowParams, x: RowInputs<'_, T>, out: RowOutputs<'_>) -> RowSums = policy_row_generic);

/// What a row kernel instance evaluates beyond the common objectives: SAPO's gate, GMPO's
/// pre-pass (types, so that the other instances skip both).
trait Variant {
    const SAPO: bool;
    const GMPO: bool;
}
struct Common;
struct SapoGate;
struct GmpoRow;
impl Variant for Common {
    const SAPO: bool = false;
    const GMPO: bool = false;
}
impl Variant for SapoGate {
    const SAPO: bool = true;
    const GMPO: bool = false;
}
impl Variant for GmpoRow {
    const SAPO: bool = false;
    const GMPO: bool = true;
}

/// GMPO's row loss `−Ā·exp(Σ c_t / n)` (module docs of `crate::ppo`): `c_t` the clamped token
/// log-ratio clipped one-sided in log space, `Ā` the mean advantage; f64 sums in [`LANES`]
/// lanes over the row, combined in a fixed order.
#[inline(always)]
#[allow(clippy::needless_range_loop)] // parallel lane arrays
fn gmpo_row_loss<T: Element>(p: &RowParams, x: &RowInputs<'_, T>) -> f32 {
    let RowInputs { lp, old, adv, mask, .. } = *x;
    let (clamp, lo, hi) = (p.clamp, p.log_lo, p.log_hi);
    let (mut c_sum, mut a_sum) = ([0.0f64; LANES], [0.0f64; LANES]);
    for start in (0..lp.len()).step_by(LANES) {
        let m = LANES.min(lp.len() - start);
        // Loads first, then branch-free selects (the advantages' signs are data: branches on
        // them mispredict).
        let (mut lr, mut a) = ([0.0f32; LANES], [0.0f32; LANES]);
        for k in 0..m {
            let t = start + k;
            let valid = mask.is_none_or(|mk| mk[t] != 0);
            lr[k] = (lp[t].to_f32() - old[t].to_f32()).clamp(-clamp, clamp);
            a[k] = if valid { adv[t].to_f32() } else { 0.0 };
        }
        for k in 0..LANES {
            let up = if a[k] > 0.0 { lr[k].min(hi) } else { 0.0 };
            let c = if a[k] < 0.0 { lr[k].max(lo) } else { up };
            c_sum[k] += c as f64;
            a_sum[k] += a[k] as f64;
        }
    }
    let per = p.n_valid.max(1) as f64;
    (-(a_sum.iter().sum::<f64>() / per) * (c_sum.iter().sum::<f64>() / per).exp()) as f32
}

/// The policy loss (MATH.md §4, crate docs of [`PolicyObjective`]) of a `[B, T]` batch: per
/// token `L` and `∂L/∂logp` in f32, the aggregate `Σ mask·w·L − c_H·Σ mask·w·H` under the
/// options' aggregation and normaliser, `w·∂L/∂logp` and `−c_H·w` per token, and the
/// statistics — one pass over the batch. Returns the statistics.
///
/// Errors: shape and option errors; [`RowProblem::NonFinite`](crate::RowProblem::NonFinite)
/// for the lowest sequence with a non-finite input at a valid token (inputs at masked tokens
/// are not read), [`RowProblem::Overflow`](crate::RowProblem::Overflow) for the lowest one
/// whose finite inputs give a loss, a gradient or a row sum beyond f32 (say `|A|·e^clamp`
/// > 3.4e38; outputs are then partly written). An all-masked batch has loss 0.
///
/// ```
/// use rlhf_kernels::{cpu, PolicyLossInputs, PolicyLossOptions, PolicyLossOutputs, RowShape};
/// let (logp, old, adv) = ([-1.0f32, -0.5], [-1.0f32, -1.0], [1.0f32, 1.0]);
/// let inputs = PolicyLossInputs::new(RowShape::new(1, 2), &logp, &old, &adv);
/// let mut grad = [0.0f32; 2];
/// let stats = cpu::policy_loss(&inputs, PolicyLossOutputs::default().grad_logp(&mut grad), &PolicyLossOptions::default())?;
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
    out.check(shape)?;
    let PolicyLossOutputs { loss, grad_logp, grad_entropy, stats, accumulate, .. } = out;
    let local = BatchCounts::of(shape, mask);
    let counts = opts.normaliser.counts(local);
    let objective = match opts.objective {
        PolicyObjective::Clip => 0,
        PolicyObjective::KlPenalty { .. } => 1,
        PolicyObjective::Gspo => 2,
        PolicyObjective::Cispo => 3,
        PolicyObjective::Sapo { .. } => 4,
        PolicyObjective::Gmpo => 5,
    };
    let beta = if let PolicyObjective::KlPenalty { beta } = opts.objective { beta } else { 0.0 };
    let (tau_pos, tau_neg) = opts.objective.sapo_taus();
    let clamp = opts.lr_clamp();
    let rows: Vec<(f64, RowSums)> = rows_mut(loss, shape)
        .zip(rows_mut(grad_logp, shape))
        .zip(rows_mut(grad_entropy, shape))
        .enumerate()
        .map(|(i, ((loss, grad), grad_h))| {
            let range = shape.row_range(i);
            let row_mask = mask.map(|m| &m[range.clone()]);
            let n_valid = valid_in_row(shape, mask, i);
            let w = opts.aggregation.token_weight(counts, n_valid);
            let (lp, old) = (&inputs.logp[range.clone()], &inputs.old_logp[range.clone()]);
            let adv = &inputs.advantages[range.clone()];
            let valid = || (0..shape.cols).filter(|&j| row_mask.is_none_or(|m| m[j] != 0));
            let per_valid = n_valid.max(1) as f64;
            let seq_lr = if objective == 2 {
                let sum: f64 = valid().map(|j| (lp[j] - old[j]) as f64).sum();
                (sum / per_valid) as f32
            } else {
                0.0
            };
            let p = RowParams {
                objective,
                lo: 1.0 - opts.clip_low,
                hi: 1.0 + opts.clip_high,
                log_lo: -opts.clip_low,
                log_hi: opts.clip_high,
                tau: [tau_pos, tau_neg],
                gate: [4.0 / tau_pos, 4.0 / tau_neg],
                dual: opts.dual_bound(),
                clamp,
                beta,
                w: w as f32,
                grad_h: (-(opts.entropy_coef as f64) * w) as f32,
                seq_lr,
                n_valid,
                accumulate,
            };
            let ent = inputs.entropy.map(|h| &h[range.clone()]);
            let x = RowInputs { lp, old, adv, ent, mask: row_mask };
            let out = RowOutputs { loss, grad, grad_h };
            let sums = match objective {
                4 => policy_row::<_, SapoGate>(&p, x, out),
                5 => policy_row::<_, GmpoRow>(&p, x, out),
                _ => policy_row::<_, Common>(&p, x, out),
            };
            (w, sums)
        })
        .collect();
    if let Some(i) = rows.iter().position(|(_, s)| s.bad || s.overflow) {
        let problem = if rows[i].1.bad { RowProblem::NonFinite } else { RowProblem::Overflow };
        return Err(Op::PolicyLoss.invalid_row(i, problem));
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
    if let Some(slot) = stats {
        *slot = st;
    }
    Ok(st)
}
