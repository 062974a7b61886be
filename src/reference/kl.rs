//! Reference KL family (MATH.md §2): sampled estimators, KL-in-reward shaping, exact
//! full-vocabulary divergences, in f64.

use crate::aggregation::{BatchCounts, valid_in_row};
use crate::error::Op;
use crate::logprobs::check_len;
use crate::{
    Element, ExactDivergence, ExactKlOptions, KlEstimator, KlRewardsInputs, KlRewardsOptions, ReferenceRows,
    Result, RowProblem, RowShape, SampledKlInputs, SampledKlOptions, SampledKlStats,
};

/// Per-token values of a sampled estimator, the gradient of the loss, and the statistics.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct SampledKl {
    /// Value of the chosen estimator per token (`[B, T]` dense; 0 where masked).
    pub values: Vec<f64>,
    /// `∂loss/∂logp` per token, `loss = β·aggregate(values)` (0 where masked).
    pub grad_logp: Vec<f64>,
    /// The loss and every estimator aggregated.
    pub stats: SampledKlStats,
}

/// One estimator at `log r`, in f64: (value, ∂/∂logp, clamp active). See the table in the
/// [`kl`](crate::KlEstimator) docs.
fn estimate(e: KlEstimator, log_r: f64, lr_clamp: f64, v_clamp: f64) -> (f64, f64, bool) {
    let lr = log_r.clamp(-lr_clamp, lr_clamp);
    let r = lr.exp();
    let exp_based = |v: f64, g: f64| {
        let c = v.clamp(-v_clamp, v_clamp);
        let clamped = lr != log_r || c != v;
        (c, if clamped { 0.0 } else { g }, clamped)
    };
    match e {
        KlEstimator::K1 => (-log_r, 1.0, false),
        KlEstimator::K2 => (0.5 * log_r * log_r, -log_r, false),
        KlEstimator::K3 => exp_based((r - 1.0) - lr, 1.0 - r),
        KlEstimator::Abs => (log_r.abs(), -log_r.signum() * f64::from(u8::from(log_r != 0.0)), false),
        KlEstimator::K1Rev if r == 0.0 => (0.0, 0.0, false),
        KlEstimator::K1Rev => exp_based(r * lr, -r * (lr + 1.0)),
        KlEstimator::K3Rev if r == 0.0 => exp_based(1.0, 0.0),
        KlEstimator::K3Rev => exp_based(r * lr - (r - 1.0), -r * lr),
        KlEstimator::GradPolicyRef => {
            let (v, _, c) = estimate(KlEstimator::K3, log_r, lr_clamp, v_clamp);
            (v, -log_r, c)
        }
        KlEstimator::GradRefPolicy => {
            let (v, _, c) = estimate(KlEstimator::K3Rev, log_r, lr_clamp, v_clamp);
            (v, estimate(KlEstimator::K3, log_r, lr_clamp, v_clamp).1, c)
        }
    }
}

/// [`estimate`] times the importance ratio `ρ = exp(log_rho)` (`log_rho` already clamped;
/// `rho_clamped`: the clamp was active), `ρ` not detached: value `ρ·k`, gradient
/// `ρ·∂k + ρ·k` (the second term 0 under the clamp), except for the gradient-correct
/// estimators, whose gradient `ρ·g` keeps their expected gradient (module docs of `kl`).
/// `None`: the plain estimate.
fn weighted(
    e: KlEstimator,
    log_r: f64,
    rho: Option<(f64, bool)>,
    lr_clamp: f64,
    v_clamp: f64,
) -> (f64, f64, bool) {
    let (v, g, c) = estimate(e, log_r, lr_clamp, v_clamp);
    match rho {
        None => (v, g, c),
        Some((log_rho, clamped)) => {
            let rho = log_rho.exp();
            let score = !clamped && !e.is_straight_through();
            (rho * v, rho * g + if score { rho * v } else { 0.0 }, c)
        }
    }
}

/// A sampled KL estimator per token of a `[B, T]` batch (`log r = ref_logp − logp`), the
/// gradient of `loss = β·aggregate(k)` with respect to `logp`, and the batch statistics; with
/// the bias correction every estimate weighted by `ρ = π/π_old` (module docs of `kl`).
///
/// Errors: shape and option errors; [`Error::InvalidRow`](crate::Error) (row = sequence) for a
/// non-finite `old_logp` ([`RowProblem::NonFinite`]), a NaN input or estimate on a valid
/// token, or an infinite value or gradient of the chosen estimator (as
/// [`cpu::sampled_kl`](crate::cpu::sampled_kl)).
///
/// ```
/// use rlhf_kernels::{reference, KlEstimator, RowShape, SampledKlInputs, SampledKlOptions};
/// let inputs = SampledKlInputs::new(RowShape::new(1, 2), &[-1.0, -2.0], &[-1.5, -2.0]);
/// let r = reference::sampled_kl(&inputs, &SampledKlOptions::new(KlEstimator::K1))?;
/// assert_eq!(r.values, vec![0.5, 0.0]);
/// assert_eq!(r.stats.loss, 0.25); // token-mean
/// # Ok::<(), rlhf_kernels::Error>(())
/// ```
pub fn sampled_kl(inputs: &SampledKlInputs<'_>, opts: &SampledKlOptions) -> Result<SampledKl> {
    inputs.validate(opts)?;
    let SampledKlInputs { shape, logp, ref_logp, mask, old_logp } = *inputs;
    let (lr_clamp, v_clamp) = opts.limits()?;
    let (lr_clamp, v_clamp) = (lr_clamp as f64, v_clamp as f64);
    let local = BatchCounts::of(shape, mask);
    let counts = opts.normaliser.counts(local);
    let mut out =
        SampledKl { stats: SampledKlStats { counts: local, ..Default::default() }, ..Default::default() };
    let mut clamped = 0.0;
    for i in 0..shape.rows {
        let w = opts.aggregation.token_weight(counts, valid_in_row(shape, mask, i));
        // A non-finite sampling log-prob at a valid token is the row's first problem.
        if let Some(o) = old_logp
            && shape.row_range(i).any(|t| mask.is_none_or(|m| m[t] != 0) && !o[t].is_finite())
        {
            return Err(Op::SampledKl.invalid_row(i, RowProblem::NonFinite));
        }
        for t in shape.row_range(i) {
            if mask.is_some_and(|m| m[t] == 0) {
                out.values.push(0.0);
                out.grad_logp.push(0.0);
                continue;
            }
            let (lp, rlp) = (logp[t] as f64, ref_logp[t] as f64);
            let log_r = rlp - lp;
            let rho = match old_logp.map(|o| o[t] as f64) {
                Some(o) => {
                    let raw = lp - o;
                    let log_rho = raw.clamp(-lr_clamp, lr_clamp);
                    Some((log_rho, log_rho != raw))
                }
                None => None,
            };
            let estimate = |e| weighted(e, log_r, rho, lr_clamp, v_clamp);
            let (v, g, _) = estimate(opts.estimator);
            if lp.is_nan() || rlp.is_nan() || v.is_nan() || g.is_nan() {
                return Err(Op::SampledKl.invalid_row(i, RowProblem::NaN));
            }
            let finite_in = lp.is_finite() && rlp.is_finite();
            if !finite_in && (v.is_infinite() || g.is_infinite()) {
                return Err(Op::SampledKl.invalid_row(i, RowProblem::InfiniteKl));
            }
            // Finite inputs: every estimate and the weighted gradient must fit the backends' f32.
            let all_fit = KlEstimator::ALL.into_iter().all(|e| super::fits_f32(estimate(e).0));
            if finite_in && !(all_fit && super::fits_f32(opts.coef as f64 * w * g)) {
                return Err(Op::SampledKl.invalid_row(i, RowProblem::Overflow));
            }
            for (k, e) in KlEstimator::ALL.into_iter().enumerate() {
                out.stats.means[k] += w * estimate(e).0;
            }
            let (v, g, c) = estimate(opts.estimator);
            out.values.push(v);
            out.grad_logp.push(opts.coef as f64 * w * g);
            clamped += f64::from(u8::from(c));
        }
    }
    out.stats.loss = opts.coef as f64 * out.stats.mean(opts.estimator);
    out.stats.clamped_fraction = if local.valid_tokens > 0.0 { clamped / local.valid_tokens } else { 0.0 };
    Ok(out)
}

/// KL folded into per-token rewards (InstructGPT placement, MATH.md §3): for every valid
/// token `r_t = −β·kl_t`, plus the sequence's score on its last valid token; padding gets 0 (a
/// sequence without valid tokens has nowhere to put its score: it is dropped). Dense `[B, T]`.
///
/// Errors: shape errors, a non-finite β, [`RowProblem::NonFinite`] for the lowest sequence with
/// a non-finite KL at a valid token or a non-finite score, [`RowProblem::Overflow`] for the
/// lowest sequence with a reward beyond f32's range.
///
/// ```
/// use rlhf_kernels::{reference, KlRewardsInputs, KlRewardsOptions, RowShape};
/// let (kl, scores) = ([0.5f32, 0.25, 9.0], [2.0f32]);
/// let inputs = KlRewardsInputs::new(RowShape::new(1, 3), &kl, &scores).mask(&[1, 1, 0]);
/// let r = reference::kl_rewards(&inputs, &KlRewardsOptions::new(0.5))?;
/// assert_eq!(r, vec![-0.25, 2.0 - 0.125, 0.0]);
/// # Ok::<(), rlhf_kernels::Error>(())
/// ```
pub fn kl_rewards(inputs: &KlRewardsInputs<'_>, opts: &KlRewardsOptions) -> Result<Vec<f64>> {
    inputs.validate(None, opts)?;
    let KlRewardsInputs { shape, kl, scores, mask } = *inputs;
    let beta = opts.beta;
    let mut out = Vec::with_capacity(shape.len());
    let mut problem = None;
    for (i, &score) in scores.iter().enumerate() {
        let row = shape.row_range(i);
        let valid = |t: usize| mask.is_none_or(|m| m[t] != 0);
        let last = row.clone().rev().find(|&t| valid(t));
        let mut row_problem = (!score.is_finite()).then_some(RowProblem::NonFinite);
        for t in row {
            if valid(t) && !kl[t].is_finite() {
                row_problem = Some(RowProblem::NonFinite);
            }
            let r = if valid(t) { -(beta as f64) * kl[t] as f64 } else { 0.0 };
            let r = if Some(t) == last { r + score as f64 } else { r };
            if !(r as f32).is_finite() {
                row_problem = row_problem.or(Some(RowProblem::Overflow));
            }
            out.push(r);
        }
        if let (None, Some(p)) = (problem, row_problem) {
            problem = Some((i, p));
        }
    }
    match problem {
        Some((i, p)) => Err(Op::KlRewards.invalid_row(i, p)),
        None => Ok(out),
    }
}

/// Per-token results of [`exact_kl`], in f64.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ExactKl {
    /// The divergence per row (0 for padding rows).
    pub value: Vec<f64>,
    /// `ln Σ exp(z_policy)` per row.
    pub policy_lse: Vec<f64>,
    /// `ln Σ exp(z_ref)` per row.
    pub ref_lse: Vec<f64>,
    /// For the JSD, `KL[p ‖ m]` (the backward needs it); otherwise equal to `value`.
    pub policy_term: Vec<f64>,
}

/// One row's two distributions in f64.
struct Pair {
    log_p: Vec<f64>,
    log_q: Vec<f64>,
    policy_lse: f64,
    ref_lse: f64,
}

impl Pair {
    fn new<P: Element, Q: Element>(p: &[P], q: &[Q], tau: f64, row: usize, op: Op) -> Result<Self> {
        let side = |x: Vec<f64>| -> Result<(Vec<f64>, f64)> {
            let (m, ln_sum) = super::logprobs::row_lse(&x).map_err(|e| op.invalid_row(row, e))?;
            Ok((x.iter().map(|z| (z - m) - ln_sum).collect(), m + ln_sum))
        };
        let (log_p, policy_lse) = side(p.iter().map(|x| x.to_f64() / tau).collect())?;
        let (log_q, ref_lse) = side(q.iter().map(|x| x.to_f64() / tau).collect())?;
        if !(super::fits_f32(policy_lse) && super::fits_f32(ref_lse)) {
            return Err(op.invalid_row(row, RowProblem::Overflow));
        }
        Ok(Pair { log_p, log_q, policy_lse, ref_lse })
    }

    /// `Σ_v a_v·(log a_v − log b_v)` with `a = exp(log_a)`; a term with `a_v = 0` is 0.
    fn kl(log_a: &[f64], log_b: &[f64]) -> f64 {
        log_a.iter().zip(log_b).filter(|(a, _)| a.exp() > 0.0).map(|(a, b)| a.exp() * (a - b)).sum()
    }

    /// `log m_v` for the mixture `m = β·p + (1 − β)·q`.
    fn log_mix(&self, beta: f64) -> Vec<f64> {
        self.log_p
            .iter()
            .zip(&self.log_q)
            .map(|(p, q)| (beta * p.exp() + (1.0 - beta) * q.exp()).ln())
            .collect()
    }
}

/// The exact divergence per row between the policy's and the reference's logits rows
/// (dtypes may differ), with temperature τ on both, in f64. Padding rows (mask 0) give 0.
///
/// Errors: shapes that differ in rows or cols; [`Error::InvalidRow`](crate::Error) for a row
/// of either side with a NaN, a `+inf` or only `-inf`, and [`RowProblem::InfiniteKl`] when
/// `KL[π ‖ π_ref]` is infinite. `KL[π_ref ‖ π]` may be `+inf` (returned as such).
///
/// ```
/// use rlhf_kernels::{reference, ExactDivergence, ExactKlOptions, ReferenceRows, RowShape};
/// let (p, q, shape) = ([0.0f32, 0.0], [0.0f32, f32::NEG_INFINITY], RowShape::new(1, 2));
/// let opts = ExactKlOptions::new(ExactDivergence::PolicyRef);
/// assert!(reference::exact_kl(&q, shape, &ReferenceRows::new(&p, shape), &opts)?.value[0] > 0.69);
/// # Ok::<(), rlhf_kernels::Error>(())
/// ```
pub fn exact_kl<P: Element, Q: Element>(
    policy: &[P],
    policy_shape: RowShape,
    reference: &ReferenceRows<'_, Q>,
    opts: &ExactKlOptions,
) -> Result<ExactKl> {
    let ReferenceRows { logits: reference, shape: ref_shape, mask } = *reference;
    check_pair(policy.len(), policy_shape, reference.len(), ref_shape, mask)?;
    let tau = opts.inv_temperature().map(|_| opts.temperature as f64)?;
    let mut out = ExactKl::default();
    for r in 0..policy_shape.rows {
        if mask.is_some_and(|m| m[r] == 0) {
            for v in [&mut out.value, &mut out.policy_lse, &mut out.ref_lse, &mut out.policy_term] {
                v.push(0.0);
            }
            continue;
        }
        let pair = Pair::new(
            &policy[policy_shape.row_range(r)],
            &reference[ref_shape.row_range(r)],
            tau,
            r,
            Op::ExactKl,
        )?;
        let (value, term) = match opts.divergence {
            ExactDivergence::PolicyRef => {
                let kl = Pair::kl(&pair.log_p, &pair.log_q);
                if kl == f64::INFINITY {
                    return Err(Op::ExactKl.invalid_row(r, RowProblem::InfiniteKl));
                }
                (kl, kl)
            }
            ExactDivergence::RefPolicy => {
                let kl = Pair::kl(&pair.log_q, &pair.log_p);
                (kl, kl)
            }
            ExactDivergence::Jsd { beta } => {
                let log_m = pair.log_mix(beta as f64);
                let (kp, kq) = (Pair::kl(&pair.log_p, &log_m), Pair::kl(&pair.log_q, &log_m));
                (beta as f64 * kp + (1.0 - beta as f64) * kq, kp)
            }
        };
        out.value.push(value);
        out.policy_lse.push(pair.policy_lse);
        out.ref_lse.push(pair.ref_lse);
        out.policy_term.push(term);
    }
    Ok(out)
}

/// Gradient of `Σ_n g[n]·D[n]` with respect to the policy logits, in f64, dense `[rows, cols]`
/// (MATH.md §2, each divided by τ):
///
/// - `KL[π‖π_ref]`: `p_v·((log p_v − log q_v) − KL)`;
/// - `KL[π_ref‖π]`: `p_v − q_v` (finite even where the KL is `+inf`);
/// - `JSD_β`: `β·p_v·(log(p_v/m_v) − Σ_u p_u·log(p_u/m_u))`.
///
/// Terms with `p_v = 0` are 0. Padding rows get 0.
pub fn exact_kl_backward<P: Element, Q: Element>(
    policy: &[P],
    policy_shape: RowShape,
    reference: &ReferenceRows<'_, Q>,
    grad: &[f32],
    opts: &ExactKlOptions,
) -> Result<Vec<f64>> {
    let ReferenceRows { logits: reference, shape: ref_shape, mask } = *reference;
    check_pair(policy.len(), policy_shape, reference.len(), ref_shape, mask)?;
    check_len("grad", grad.len(), policy_shape.rows)?;
    let tau = opts.inv_temperature().map(|_| opts.temperature as f64)?;
    let mut out = Vec::with_capacity(policy_shape.len());
    for r in 0..policy_shape.rows {
        if mask.is_some_and(|m| m[r] == 0) {
            out.extend(std::iter::repeat_n(0.0, policy_shape.cols));
            continue;
        }
        let op = Op::ExactKlBackward;
        let pair =
            Pair::new(&policy[policy_shape.row_range(r)], &reference[ref_shape.row_range(r)], tau, r, op)?;
        let g = grad[r] as f64;
        if !g.is_finite() {
            return Err(op.invalid_row(r, RowProblem::GradNonFinite));
        }
        let p = |v: usize| pair.log_p[v].exp();
        let terms: Vec<f64> = match opts.divergence {
            ExactDivergence::PolicyRef => {
                let kl = Pair::kl(&pair.log_p, &pair.log_q);
                if kl == f64::INFINITY {
                    return Err(op.invalid_row(r, RowProblem::InfiniteKl));
                }
                (0..pair.log_p.len())
                    .map(|v| if p(v) > 0.0 { p(v) * ((pair.log_p[v] - pair.log_q[v]) - kl) } else { 0.0 })
                    .collect()
            }
            ExactDivergence::RefPolicy => (0..pair.log_p.len()).map(|v| p(v) - pair.log_q[v].exp()).collect(),
            ExactDivergence::Jsd { beta } => {
                let beta = beta as f64;
                let log_m = pair.log_mix(beta);
                let kp = Pair::kl(&pair.log_p, &log_m);
                (0..pair.log_p.len())
                    .map(|v| if p(v) > 0.0 { beta * p(v) * ((pair.log_p[v] - log_m[v]) - kp) } else { 0.0 })
                    .collect()
            }
        };
        out.extend(terms.into_iter().map(|t| g * t / tau));
    }
    Ok(out)
}

/// Same rows and cols on both sides, buffers and mask of the right sizes.
pub(crate) fn check_pair(
    policy_len: usize,
    policy_shape: RowShape,
    ref_len: usize,
    ref_shape: RowShape,
    mask: Option<&[u8]>,
) -> Result<()> {
    policy_shape.check_buffer("policy logits", policy_len)?;
    ref_shape.check_buffer("reference logits", ref_len)?;
    if (policy_shape.rows, policy_shape.cols) != (ref_shape.rows, ref_shape.cols) {
        let n = policy_shape.len();
        return Err(crate::Error::ShapeMismatch {
            what: "reference logits (rows x cols)",
            min: n,
            max: n,
            actual: ref_shape.len(),
        });
    }
    mask.map_or(Ok(()), |m| check_len("mask", m.len(), policy_shape.rows))
}
