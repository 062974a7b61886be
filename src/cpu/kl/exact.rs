//! CPU exact full-vocabulary divergences between two logits rows (MATH.md §2): `KL[π‖π_ref]`
//! and `KL[π_ref‖π]` in one online pass over both rows, the JSD in two, and the backward into
//! the policy logits (optionally in place). Never an `[N, V]` temporary.

use rayon::prelude::*;

use crate::cpu::simd::{self, BLOCK, Blocks, LANES, LOG2E, dispatch};
use crate::cpu::{first_problem, rows_per_task};
use crate::error::Op;
use crate::logprobs::check_len;
use crate::reference::check_pair;
use crate::{
    Aggregated, BatchCounts, Element, Error, ExactDivergence, ExactKlGrads, ExactKlOptions, ExactKlOutputs,
    ReferenceRows, Result, RowProblem, RowShape,
};

/// One row's statistics of both sides: running max (raw units) and `Σ exp((x − m)/τ)`, and
/// `a_pr = Σ e_p·(z_p − z_q)`, `a_rp = Σ e_q·(z_q − z_p)` scaled like the sums they ride on.
#[derive(Debug, Clone, Copy)]
pub(super) struct PairStats {
    pub(super) mp: f32,
    pub(super) sp: f32,
    pub(super) a_pr: f32,
    pub(super) mq: f32,
    pub(super) sq: f32,
    pub(super) a_rp: f32,
}

impl PairStats {
    pub(super) fn lse(m: f32, s: f32, inv_tau: f32) -> f32 {
        m * inv_tau + s.ln()
    }

    /// `KL[π‖π_ref] = a_pr/s_p + (m_q − m_p)/τ + ln s_q − ln s_p` (small terms only; ≥ 0).
    pub(super) fn kl_pr(&self, inv_tau: f32) -> f32 {
        (self.a_pr / self.sp + (self.mq - self.mp) * inv_tau + (self.sq.ln() - self.sp.ln())).max(0.0)
    }

    pub(super) fn kl_rp(&self, inv_tau: f32) -> f32 {
        (self.a_rp / self.sq + (self.mp - self.mq) * inv_tau + (self.sp.ln() - self.sq.ln())).max(0.0)
    }
}

/// The divergence per row between the policy's and the reference's logits rows (dtypes may
/// differ, e.g. bf16 policy and f16 reference; each with its own row stride), temperature τ on
/// both, for any subset of outputs. Padding rows (mask 0) give 0 and are not read.
///
/// - `KL[π‖π_ref]` and `KL[π_ref‖π]`: one online pass over the two rows (running max and sum
///   of each side, plus the running `Σ e·(z_p − z_q)` rescaled with them).
/// - JSD: a first pass for both log-sum-exps, a second for `Σ p·log(p/m)` and `Σ q·log(q/m)`
///   (`log m` needs both normalisers inside a per-element log).
///
/// Errors: shape errors; [`Error::InvalidRow`] for the lowest row whose either side has a NaN,
/// a `+inf` or only `-inf`, or whose `KL[π‖π_ref]` is infinite ([`RowProblem::InfiniteKl`]).
/// `KL[π_ref‖π]` may be `+inf` (returned; its gradient stays finite).
///
/// ```
/// use rlhf_kernels::{cpu, ExactDivergence, ExactKlOptions, ExactKlOutputs, ReferenceRows, RowShape, bf16, f16};
/// let policy = [bf16::from_f32(1.0), bf16::from_f32(0.0)];
/// let reference = [f16::from_f32(0.0), f16::from_f32(0.0)];
/// let shape = RowShape::new(1, 2);
/// let mut kl = [0.0f32];
/// cpu::exact_kl(&policy, shape, &ReferenceRows::new(&reference, shape),
///               ExactKlOutputs::default().value(&mut kl), &ExactKlOptions::new(ExactDivergence::PolicyRef))?;
/// assert!((kl[0] - 0.1109).abs() < 1e-4); // 0.731·ln(0.731/0.5) + 0.269·ln(0.269/0.5)
/// # Ok::<(), rlhf_kernels::Error>(())
/// ```
pub fn exact_kl<P: Element, Q: Element>(
    policy: &[P],
    policy_shape: RowShape,
    reference: &ReferenceRows<'_, Q>,
    out: ExactKlOutputs<'_>,
    opts: &ExactKlOptions,
) -> Result<()> {
    let ReferenceRows { logits: reference, shape: ref_shape, mask } = *reference;
    check_pair(policy.len(), policy_shape, reference.len(), ref_shape, mask)?;
    let rows = policy_shape.rows;
    let ExactKlOutputs { value, policy_lse, ref_lse, policy_term, statistic, .. } = out;
    let mut own_values = Vec::new();
    let value = match (value, &statistic) {
        (Some(v), _) => Some(v),
        (None, Some(_)) => {
            own_values.resize(rows, 0.0);
            Some(&mut own_values[..])
        }
        (None, None) => None,
    };
    if let Some((_, stat)) = &statistic {
        stat.validate(rows)?;
    }
    let outs = [value, policy_lse, ref_lse, policy_term];
    if outs.iter().all(Option::is_none) {
        return Err(Error::InvalidOption {
            name: "outputs",
            value: "none requested".into(),
            expected: "at least one of value, policy_lse, ref_lse, policy_term",
        });
    }
    for (what, o) in ["value", "policy_lse", "ref_lse", "policy_term"].into_iter().zip(&outs) {
        o.as_deref().map_or(Ok(()), |o| check_len(what, o.len(), rows))?;
    }
    let inv_tau = opts.inv_temperature()?;
    let results: Vec<Result<[f32; 4], RowProblem>> = (0..rows)
        .into_par_iter()
        .with_min_len(rows_per_task(policy_shape.cols))
        .map(|r| {
            if mask.is_some_and(|m| m[r] == 0) {
                return Ok([0.0; 4]);
            }
            let (p, q) = (&policy[policy_shape.row_range(r)], &reference[ref_shape.row_range(r)]);
            let st = pair_stats(p, q, inv_tau)?;
            let (lse_p, lse_q) =
                (PairStats::lse(st.mp, st.sp, inv_tau), PairStats::lse(st.mq, st.sq, inv_tau));
            if !(lse_p.is_finite() && lse_q.is_finite()) {
                return Err(RowProblem::Overflow); // finite logits, max/τ beyond f32
            }
            let (value, term) = match opts.divergence {
                ExactDivergence::PolicyRef => {
                    let kl = st.kl_pr(inv_tau);
                    if kl == f32::INFINITY {
                        return Err(RowProblem::InfiniteKl);
                    }
                    (kl, kl)
                }
                ExactDivergence::RefPolicy => {
                    let kl = st.kl_rp(inv_tau);
                    (kl, kl)
                }
                ExactDivergence::Jsd { beta } => {
                    let [tp, tq] = jsd_terms(p, q, Saved { inv_tau, lse_p, lse_q, beta });
                    ((beta * tp + (1.0 - beta) * tq).max(0.0), tp.max(0.0))
                }
            };
            Ok([value, lse_p, lse_q, term])
        })
        .collect();
    let mut problem = None;
    let mut outs = outs;
    for (r, res) in results.into_iter().enumerate() {
        match res {
            Ok(vals) => {
                for (o, v) in outs.iter_mut().zip(vals) {
                    if let Some(o) = o {
                        o[r] = v;
                    }
                }
            }
            Err(p) => problem = first_problem(problem, Some((r, p))),
        }
    }
    if let Some((r, p)) = problem {
        return Err(Op::ExactKl.invalid_row(r, p));
    }
    if let (Some((out, stat)), [Some(values), ..]) = (statistic, &outs) {
        let value = stat.aggregation.aggregate(values, stat.sequences, mask, stat.normaliser)?;
        *out = Aggregated { value, counts: BatchCounts::of(stat.sequences, mask) };
    }
    Ok(())
}

/// Backward of [`exact_kl`]: the gradient of `Σ_n g[n]·D[n]` with respect to the policy
/// logits, written into `grad_policy` (the policy's shape and dtype), each term divided by τ:
///
/// - `KL[π‖π_ref]`: `p_v·((log p_v − log q_v) − KL)`;
/// - `KL[π_ref‖π]`: `p_v − q_v`;
/// - `JSD_β`: `β·p_v·(log(p_v/m_v) − KL[p‖m])`.
///
/// One pass over both rows, from the saved log-sum-exps; terms with `p_v = 0` are 0; padding
/// rows get 0. Errors: shape errors, a missing saved value, and [`Error::InvalidRow`] for the
/// lowest real row with a non-finite saved statistic or upstream gradient.
pub fn exact_kl_backward<P: Element, Q: Element>(
    policy: &[P],
    policy_shape: RowShape,
    reference: &ReferenceRows<'_, Q>,
    grads: &ExactKlGrads<'_>,
    grad_policy: &mut [P],
    opts: &ExactKlOptions,
) -> Result<()> {
    policy_shape.check_buffer("grad_policy", grad_policy.len())?;
    backward(Some(policy), grad_policy, policy_shape, reference, grads, opts)
}

/// [`exact_kl_backward`] written over the policy logits themselves (no gradient buffer).
pub fn exact_kl_backward_in_place<P: Element, Q: Element>(
    policy: &mut [P],
    policy_shape: RowShape,
    reference: &ReferenceRows<'_, Q>,
    grads: &ExactKlGrads<'_>,
    opts: &ExactKlOptions,
) -> Result<()> {
    policy_shape.check_buffer("policy logits", policy.len())?;
    backward(None, policy, policy_shape, reference, grads, opts)
}

fn backward<P: Element, Q: Element>(
    policy: Option<&[P]>,
    grad_policy: &mut [P],
    policy_shape: RowShape,
    reference: &ReferenceRows<'_, Q>,
    grads: &ExactKlGrads<'_>,
    opts: &ExactKlOptions,
) -> Result<()> {
    let ReferenceRows { logits: reference, shape: ref_shape, mask } = *reference;
    let rows = policy_shape.rows;
    check_pair(policy.map_or(grad_policy.len(), <[P]>::len), policy_shape, reference.len(), ref_shape, mask)?;
    for (what, v) in [
        ("grad", Some(grads.grad)),
        ("policy_lse", Some(grads.policy_lse)),
        ("ref_lse", Some(grads.ref_lse)),
        ("value", grads.value),
        ("policy_term", grads.policy_term),
    ] {
        v.map_or(Ok(()), |v| check_len(what, v.len(), rows))?;
    }
    let needed = match opts.divergence {
        ExactDivergence::PolicyRef => grads.value.map(|_| ()).ok_or("value"),
        ExactDivergence::RefPolicy => Ok(()),
        ExactDivergence::Jsd { .. } => grads.policy_term.map(|_| ()).ok_or("policy_term"),
    };
    if let Err(name) = needed {
        return Err(Error::InvalidOption {
            name,
            value: "missing".into(),
            expected: "the forward's saved value (KL[policy||ref]) or policy_term (JSD)",
        });
    }
    let inv_tau = opts.inv_temperature()?;
    let cols = policy_shape.cols;
    let problem = grad_policy
        .par_chunks_mut(policy_shape.row_stride)
        .enumerate()
        .with_min_len(rows_per_task(cols))
        .map(|(r, dx)| {
            let dx = &mut dx[..cols];
            if mask.is_some_and(|m| m[r] == 0) {
                dx.fill(P::from_f32(0.0));
                return None;
            }
            let saved = match opts.divergence {
                ExactDivergence::PolicyRef => grads.value.map_or(0.0, |v| v[r]),
                ExactDivergence::RefPolicy => 0.0,
                ExactDivergence::Jsd { .. } => grads.policy_term.map_or(0.0, |v| v[r]),
            };
            let (lse_p, lse_q) = (grads.policy_lse[r], grads.ref_lse[r]);
            if !(lse_p.is_finite() && lse_q.is_finite() && saved.is_finite()) {
                return Some((
                    r,
                    if saved == f32::INFINITY { RowProblem::InfiniteKl } else { RowProblem::NaN },
                ));
            }
            let g = grads.grad[r];
            if !g.is_finite() {
                return Some((r, RowProblem::GradNonFinite));
            }
            let row =
                RowGrad { divergence: opts.divergence, inv_tau, lse_p, lse_q, saved, scale: g * inv_tau };
            let fits = backward_row(
                policy.map(|x| &x[policy_shape.row_range(r)]),
                &reference[ref_shape.row_range(r)],
                dx,
                row,
            );
            (!fits).then_some((r, RowProblem::Overflow))
        })
        .reduce(|| None, first_problem);
    match problem {
        Some((r, p)) => Err(Op::ExactKlBackward.invalid_row(r, p)),
        None => Ok(()),
    }
}

/// Scalars of one row's backward.
#[derive(Clone, Copy)]
struct RowGrad {
    divergence: ExactDivergence,
    inv_tau: f32,
    lse_p: f32,
    lse_q: f32,
    /// KL[π‖π_ref] for that divergence, KL[p‖m] for the JSD.
    saved: f32,
    /// g / τ.
    scale: f32,
}

/// Saved normalisers for a second pass.
#[derive(Clone, Copy)]
pub(super) struct Saved {
    pub(super) inv_tau: f32,
    pub(super) lse_p: f32,
    pub(super) lse_q: f32,
    pub(super) beta: f32,
}

pub(super) fn pair_stats<P: Element, Q: Element>(
    p: &[P],
    q: &[Q],
    inv_tau: f32,
) -> Result<PairStats, RowProblem> {
    let st = pair_stats_row(p, q, inv_tau);
    // A NaN or +inf turns a sum into NaN or a max into +inf; an all-NaN side leaves its max
    // at -inf: look closer only then. Problems rank NaN, +inf, only -inf across both sides.
    let suspicious =
        |m: f32, s: f32, a: f32| s.is_nan() || a.is_nan() || m == f32::INFINITY || m == f32::NEG_INFINITY;
    if suspicious(st.mp, st.sp, st.a_pr) || suspicious(st.mq, st.sq, st.a_rp) {
        let worst = [classify(p, st.mp), classify(q, st.mq)].into_iter().flatten().min_by_key(|p| p.code());
        if let Some(problem) = worst {
            return Err(problem);
        }
    }
    Ok(st)
}

pub(super) fn classify<T: Element>(x: &[T], m: f32) -> Option<RowProblem> {
    if x.iter().any(|v| v.to_f32().is_nan()) {
        Some(RowProblem::NaN)
    } else if m == f32::INFINITY {
        Some(RowProblem::PosInf)
    } else if m == f32::NEG_INFINITY {
        Some(RowProblem::AllNegInf)
    } else {
        None
    }
}

dispatch!(pub(super) fn pair_stats_row<P: Element, Q: Element>(p: &[P], q: &[Q], inv_tau: f32) -> PairStats = pair_stats_generic);

/// One pass over both rows in L1-sized blocks, [`LANES`] accumulators per sum.
#[inline(always)]
fn pair_stats_generic<P: Element, Q: Element>(p: &[P], q: &[Q], inv_tau: f32) -> PairStats {
    let c = inv_tau * LOG2E;
    let (mut mp, mut mq) = (f32::NEG_INFINITY, f32::NEG_INFINITY);
    let (mut sp, mut apr, mut sq, mut arp) =
        ([0.0f32; LANES], [0.0f32; LANES], [0.0f32; LANES], [0.0f32; LANES]);
    let (mut bp, mut bq) = (Blocks::new(p, f32::NEG_INFINITY), Blocks::new(q, f32::NEG_INFINITY));
    while let (Some(xp), Some(xq)) = (bp.next(), bq.next()) {
        for (x, m, s, a) in [(xp, &mut mp, &mut sp, &mut apr), (xq, &mut mq, &mut sq, &mut arp)] {
            let mut mx = [f32::NEG_INFINITY; LANES];
            for v in x.chunks_exact(LANES) {
                for j in 0..LANES {
                    mx[j] = mx[j].max(v[j]);
                }
            }
            let bm = simd::max_lanes(&mx);
            if bm > *m {
                if *m != f32::NEG_INFINITY {
                    let scale = simd::exp2((*m - bm) * c);
                    for j in 0..LANES {
                        s[j] *= scale;
                        a[j] = if scale > 0.0 { a[j] * scale } else { 0.0 };
                    }
                }
                *m = bm;
            }
        }
        // With a side still all -inf, shifting by 0 keeps every exp at exactly 0.
        let (sp_m, sq_m) =
            (if mp == f32::NEG_INFINITY { 0.0 } else { mp }, if mq == f32::NEG_INFINITY { 0.0 } else { mq });
        for (vp, vq) in xp.chunks_exact(LANES).zip(xq.chunks_exact(LANES)) {
            for j in 0..LANES {
                let ep = simd::exp2((vp[j] - sp_m) * c);
                let eq = simd::exp2((vq[j] - sq_m) * c);
                let diff = (vp[j] - vq[j]) * inv_tau; // z_p − z_q
                sp[j] += ep;
                sq[j] += eq;
                // A term with e = 0 is 0, never 0·inf; e > 0 with the other side -inf is +inf.
                apr[j] += if ep > 0.0 { ep * diff } else { 0.0 };
                arp[j] += if eq > 0.0 { eq * -diff } else { 0.0 };
            }
        }
    }
    PairStats {
        mp,
        sp: simd::sum_lanes(&sp),
        a_pr: simd::sum_lanes(&apr),
        mq,
        sq: simd::sum_lanes(&sq),
        a_rp: simd::sum_lanes(&arp),
    }
}

/// `log m = log(β·p + (1 − β)·q)` from `log p`, `log q` and `[log β, log(1 − β)]`, in log
/// space (`max + ln(1 + e^{min − max})`): finite wherever `p` or `q` is > 0, however small
/// (NaN when both are 0, where the JSD's terms are skipped, or when either log is NaN).
#[inline(always)]
fn log_mix(lp: f32, lq: f32, [log_b, log_1b]: [f32; 2]) -> f32 {
    let (a, b) = (lp + log_b, lq + log_1b);
    // NaN-propagating max (f32::max would return the number).
    let (hi, lo) = if a.is_nan() || a > b { (a, b) } else { (b, a) };
    hi + simd::ln(1.0 + simd::exp2((lo - hi) * LOG2E))
}

/// A log-probability recomputed as `z − lse` is ≤ 0 up to rounding, which at `|z| ~ 1e11` (a
/// tiny temperature) is thousands: cap it at 0 so that `p ≤ 1` (NaN stays NaN).
#[inline(always)]
fn non_positive(lp: f32) -> f32 {
    if lp > 0.0 { 0.0 } else { lp }
}

/// `[log β, log(1 − β)]` of the JSD's mixture.
fn log_weights(beta: f32) -> [f32; 2] {
    [(beta as f64).ln() as f32, (1.0 - beta as f64).ln() as f32]
}

dispatch!(pub(super) fn jsd_terms<P: Element, Q: Element>(p: &[P], q: &[Q], saved: Saved) -> [f32; 2] = jsd_terms_generic);

/// The JSD's second pass: `[Σ p·log(p/m), Σ q·log(q/m)]` with `m = β·p + (1 − β)·q`, its log
/// taken in log space (`log m = logaddexp(log β + log p, log(1 − β) + log q)`): in linear space
/// `β·p` underflows to 0 for a tiny `p` or `β`, and `p·log(p/0)` would be `+inf`.
#[inline(always)]
fn jsd_terms_generic<P: Element, Q: Element>(p: &[P], q: &[Q], s: Saved) -> [f32; 2] {
    let [log_b, log_1b] = log_weights(s.beta);
    let (mut tp, mut tq) = ([0.0f32; LANES], [0.0f32; LANES]);
    let (mut bp, mut bq) = (Blocks::new(p, f32::NEG_INFINITY), Blocks::new(q, f32::NEG_INFINITY));
    while let (Some(xp), Some(xq)) = (bp.next(), bq.next()) {
        for (vp, vq) in xp.chunks_exact(LANES).zip(xq.chunks_exact(LANES)) {
            for j in 0..LANES {
                let lp = non_positive(vp[j].mul_add(s.inv_tau, -s.lse_p));
                let lq = non_positive(vq[j].mul_add(s.inv_tau, -s.lse_q));
                let (pv, qv) = (simd::exp2(lp * LOG2E), simd::exp2(lq * LOG2E));
                let lm = log_mix(lp, lq, [log_b, log_1b]);
                tp[j] += if pv > 0.0 { pv * (lp - lm) } else { 0.0 };
                tq[j] += if qv > 0.0 { qv * (lq - lm) } else { 0.0 };
            }
        }
    }
    [simd::sum_lanes(&tp), simd::sum_lanes(&tq)]
}

dispatch!(fn backward_row<P: Element, Q: Element>(x: Option<&[P]>, y: &[Q], dx: &mut [P], g: RowGrad) -> bool = backward_row_generic);

/// One row of the backward in [`BLOCK`]s; `x = None` reads the policy logits from `dx`
/// (in place: each block is read before it is overwritten). Returns whether every gradient fits
/// `P`.
#[inline(always)]
fn backward_row_generic<P: Element, Q: Element>(x: Option<&[P]>, y: &[Q], dx: &mut [P], g: RowGrad) -> bool {
    let (mut zp, mut zq, mut out) = ([0.0f32; BLOCK], [0.0f32; BLOCK], [0.0f32; BLOCK]);
    let mut fits = true;
    let jsd_logs = match g.divergence {
        ExactDivergence::Jsd { beta } => log_weights(beta),
        _ => [0.0; 2],
    };
    let mut start = 0;
    while start < dx.len() {
        let n = BLOCK.min(dx.len() - start);
        let range = start..start + n;
        match x {
            Some(x) => P::slice_to_f32(&x[range.clone()], &mut zp[..n]),
            None => P::slice_to_f32(&dx[range.clone()], &mut zp[..n]),
        }
        Q::slice_to_f32(&y[range.clone()], &mut zq[..n]);
        for ((o, &a), &b) in out[..n].iter_mut().zip(&zp[..n]).zip(&zq[..n]) {
            let (lp, lq) =
                (non_positive(a.mul_add(g.inv_tau, -g.lse_p)), non_positive(b.mul_add(g.inv_tau, -g.lse_q)));
            let pv = simd::exp2(lp * LOG2E);
            let term = match g.divergence {
                ExactDivergence::PolicyRef => {
                    if pv > 0.0 {
                        pv * ((lp - lq) - g.saved)
                    } else {
                        0.0
                    }
                }
                ExactDivergence::RefPolicy => pv - simd::exp2(lq * LOG2E),
                ExactDivergence::Jsd { beta } => {
                    let lm = log_mix(lp, lq, jsd_logs);
                    if pv > 0.0 { beta * pv * ((lp - lm) - g.saved) } else { 0.0 }
                }
            };
            *o = g.scale * term;
            fits &= P::fits(*o);
        }
        P::slice_from_f32(&out[..n], &mut dx[range]);
        start += n;
    }
    fits
}
