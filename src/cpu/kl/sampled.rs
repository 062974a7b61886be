//! CPU sampled KL estimators (MATH.md §2) and KL-in-reward shaping: elementwise over a
//! `[B, T]` batch, sequences in parallel, statistics summed in row order (deterministic).

use rayon::prelude::*;

use crate::aggregation::{BatchCounts, valid_in_row};
use crate::cpu::first_problem;
use crate::cpu::simd::{self, LANES, LOG2E, dispatch};
use crate::error::Op;
use crate::{
    KlEstimator, KlRewardsInputs, KlRewardsOptions, Result, RowProblem, RowShape, SampledKlInputs,
    SampledKlOptions, SampledKlOutputs, SampledKlStats,
};

/// The chosen estimator as a type, so that each row kernel is compiled for one estimator and
/// its inner loop has no branch on it (and vectorises).
trait Chosen {
    const E: KlEstimator;
}

macro_rules! chosen {
    ($($name:ident => $e:ident),*) => {$(
        struct $name;
        impl Chosen for $name {
            const E: KlEstimator = KlEstimator::$e;
        }
    )*};
}
chosen!(EK1 => K1, EK2 => K2, EK3 => K3, EAbs => Abs, EK1Rev => K1Rev, EK3Rev => K3Rev,
        EGradPr => GradPolicyRef, EGradRp => GradRefPolicy);

/// Every estimator at one `log r` (one `exp`), the chosen one's gradient, and whether a clamp
/// was active for it. Branch-free (selects only); NaN propagates through the clamps.
#[inline(always)]
fn estimates<E: Chosen>(log_r: f32, lr_clamp: f32, v_clamp: f32) -> ([f32; 8], f32, bool) {
    let lr = log_r.clamp(-lr_clamp, lr_clamp);
    let lr_active = lr != log_r && !log_r.is_nan();
    let r = simd::exp2(lr * LOG2E);
    let vc = |v: f32| v.clamp(-v_clamp, v_clamp);
    let k3 = (r - 1.0) - lr;
    let r_zero = r == 0.0;
    let k1_rev = if r_zero { 0.0 } else { r * lr };
    let k3_rev = if r_zero { 1.0 } else { r * lr - (r - 1.0) };
    let values =
        [-log_r, 0.5 * log_r * log_r, vc(k3), log_r.abs(), vc(k1_rev), vc(k3_rev), vc(k3), vc(k3_rev)];
    let k3_clamped = lr_active || (!k3.is_nan() && vc(k3) != k3);
    let k1r_clamped = !r_zero && (lr_active || (!k1_rev.is_nan() && vc(k1_rev) != k1_rev));
    let k3r_clamped = lr_active || (!k3_rev.is_nan() && vc(k3_rev) != k3_rev);
    let sign = if log_r < 0.0 {
        1.0
    } else if log_r > 0.0 {
        -1.0
    } else {
        0.0
    };
    let g_k3 = if k3_clamped { 0.0 } else { 1.0 - r };
    let (grad, clamped) = match E::E {
        KlEstimator::K1 => (1.0, false),
        KlEstimator::K2 => (-log_r, false),
        KlEstimator::K3 => (g_k3, k3_clamped),
        KlEstimator::Abs => (sign, false),
        KlEstimator::K1Rev => (if k1r_clamped || r_zero { 0.0 } else { -r * (lr + 1.0) }, k1r_clamped),
        KlEstimator::K3Rev => (if k3r_clamped || r_zero { 0.0 } else { -r * lr }, k3r_clamped),
        KlEstimator::GradPolicyRef => (-log_r, k3_clamped),
        KlEstimator::GradRefPolicy => (g_k3, k3r_clamped),
    };
    (values, grad, clamped)
}

/// Whether a row kernel instance weights the estimates by `ρ = π/π_old` (a type, so that the
/// unweighted instance has no trace of it).
trait Weighting {
    const ON: bool;
}
struct Plain;
struct BiasCorrected;
impl Weighting for Plain {
    const ON: bool = false;
}
impl Weighting for BiasCorrected {
    const ON: bool = true;
}

/// Scalars of one row.
#[derive(Clone, Copy)]
struct RowParams {
    /// β times the row's aggregation weight.
    w: f32,
    lr_clamp: f32,
    v_clamp: f32,
}

/// What one row gives: sums of every estimator and of the clamp flags over its valid tokens,
/// and whether a NaN, an infinity of the chosen estimator from an infinite input, or an
/// overflow of f32 from finite inputs was met.
#[derive(Clone, Copy, Default)]
struct RowSums {
    estimators: [f64; 8],
    clamped: f64,
    /// A non-finite `old_logp` at a valid token (bias correction).
    bad_old: bool,
    nan: bool,
    inf: bool,
    overflow: bool,
}

dispatch!(fn sampled_row<E: Chosen, W: Weighting>(lp: &[f32], rlp: &[f32], old: &[f32], mask: Option<&[u8]>, values: Option<&mut [f32]>, grads: Option<&mut [f32]>, p: RowParams) -> RowSums = sampled_row_generic);

/// One row in pieces of [`LANES`] tokens: masks as 0/1 lanes, every quantity computed for
/// every lane and selected, sums in [`LANES`] f32 accumulators per estimator. With `W::ON`
/// every estimate is weighted by `ρ = exp(clamp(logp − old))` and the gradient gains `ρ·k`
/// (0 where the clamp on `ρ` is active, and for the gradient-correct pairs); `old` is not read
/// otherwise.
#[inline(always)]
fn sampled_row_generic<E: Chosen, W: Weighting>(
    lp: &[f32],
    rlp: &[f32],
    old: &[f32],
    mask: Option<&[u8]>,
    mut values: Option<&mut [f32]>,
    mut grads: Option<&mut [f32]>,
    p: RowParams,
) -> RowSums {
    let mut acc = [[0.0f32; LANES]; 9];
    let (mut nan, mut inf, mut overflow, mut inf_input, mut bad_old) =
        ([false; LANES], [false; LANES], [false; LANES], [false; LANES], [false; LANES]);
    let (mut a, mut b, mut c, mut valid) =
        ([0.0f32; LANES], [0.0f32; LANES], [0.0f32; LANES], [false; LANES]);
    let (mut v_out, mut g_out) = ([0.0f32; LANES], [0.0f32; LANES]);
    let mut start = 0;
    while start < lp.len() {
        let m = LANES.min(lp.len() - start);
        let range = start..start + m;
        a[..m].copy_from_slice(&lp[range.clone()]);
        b[..m].copy_from_slice(&rlp[range.clone()]);
        if W::ON {
            c[..m].copy_from_slice(&old[range.clone()]);
        }
        for j in 0..LANES {
            valid[j] = j < m && mask.is_none_or(|mk| mk[start + j] != 0);
        }
        for j in 0..LANES {
            let (mut vals, mut g, clamped) = estimates::<E>(b[j] - a[j], p.lr_clamp, p.v_clamp);
            let ok = valid[j];
            if W::ON {
                let raw = a[j] - c[j];
                let log_rho = raw.clamp(-p.lr_clamp, p.lr_clamp);
                let rho = simd::exp2(log_rho * LOG2E);
                // The gradient-correct pairs keep their expected gradient: no score term.
                let score_on = log_rho == raw && !E::E.is_straight_through();
                let score = if score_on { rho * vals[E::E as usize] } else { 0.0 };
                g = rho * g + score;
                vals = vals.map(|v| rho * v);
                bad_old[j] |= ok && !c[j].is_finite();
            }
            let v = vals[E::E as usize];
            let finite_in = a[j].is_finite() && b[j].is_finite();
            nan[j] |= ok && (a[j].is_nan() || b[j].is_nan() || v.is_nan() || g.is_nan());
            inf[j] |= ok && !finite_in && (v.is_infinite() || g.is_infinite());
            inf_input[j] |= ok && !finite_in;
            // Finite inputs: every estimate (the statistics hold all eight) and the weighted
            // gradient must fit f32.
            overflow[j] |= ok
                && finite_in
                && !(vals.iter().all(|x| x.is_finite()) && g.is_finite() && (p.w * g).is_finite());
            for k in 0..8 {
                acc[k][j] += if ok { vals[k] } else { 0.0 };
            }
            acc[8][j] += if ok && clamped { 1.0 } else { 0.0 };
            v_out[j] = if ok { v } else { 0.0 };
            g_out[j] = if ok { p.w * g } else { 0.0 };
        }
        if let Some(o) = values.as_deref_mut() {
            o[range.clone()].copy_from_slice(&v_out[..m]);
        }
        if let Some(o) = grads.as_deref_mut() {
            o[range].copy_from_slice(&g_out[..m]);
        }
        start += m;
    }
    let mut out = RowSums {
        bad_old: bad_old.contains(&true),
        nan: nan.contains(&true),
        inf: inf.contains(&true),
        ..Default::default()
    };
    for (s, lanes) in out.estimators.iter_mut().zip(&acc) {
        *s = simd::sum_lanes(lanes) as f64;
    }
    // A row sum past f32 from finite inputs overflowed too.
    let sums_overflow = !inf_input.contains(&true) && out.estimators.iter().any(|s| !s.is_finite());
    out.overflow = overflow.contains(&true) || sums_overflow;
    out.clamped = simd::sum_lanes(&acc[8]) as f64;
    out
}

/// The row kernel of the `chosen` estimator.
#[allow(clippy::too_many_arguments)]
fn row_of<W: Weighting>(
    chosen: KlEstimator,
    lp: &[f32],
    rlp: &[f32],
    old: &[f32],
    m: Option<&[u8]>,
    v: Option<&mut [f32]>,
    g: Option<&mut [f32]>,
    p: RowParams,
) -> RowSums {
    match chosen {
        KlEstimator::K1 => sampled_row::<EK1, W>(lp, rlp, old, m, v, g, p),
        KlEstimator::K2 => sampled_row::<EK2, W>(lp, rlp, old, m, v, g, p),
        KlEstimator::K3 => sampled_row::<EK3, W>(lp, rlp, old, m, v, g, p),
        KlEstimator::Abs => sampled_row::<EAbs, W>(lp, rlp, old, m, v, g, p),
        KlEstimator::K1Rev => sampled_row::<EK1Rev, W>(lp, rlp, old, m, v, g, p),
        KlEstimator::K3Rev => sampled_row::<EK3Rev, W>(lp, rlp, old, m, v, g, p),
        KlEstimator::GradPolicyRef => sampled_row::<EGradPr, W>(lp, rlp, old, m, v, g, p),
        KlEstimator::GradRefPolicy => sampled_row::<EGradRp, W>(lp, rlp, old, m, v, g, p),
    }
}

/// One mutable slice per row (`None`s when the output is absent).
fn row_slices(o: Option<&mut [f32]>, shape: RowShape) -> Vec<Option<&mut [f32]>> {
    match o {
        Some(o) => o.chunks_mut(shape.row_stride).map(Some).collect(),
        None => (0..shape.rows).map(|_| None).collect(),
    }
}

/// A sampled KL estimator for every valid token of a `[B, T]` batch (rows = sequences,
/// `log r = ref_logp − logp`), the gradient of `loss = β·aggregate(k)` with respect to `logp`,
/// and the batch statistics — in one pass over the tokens. The estimators, their gradients and
/// which KL each one's gradient minimises are tabulated in the [`KlEstimator`] docs.
///
/// Use it for the "KL as a loss term" placement: add `stats.loss` to the policy loss and
/// `grad_logp` to the policy loss's gradient — with no PPO ratio applied (the KL is a property
/// of the current policy). The one weight that belongs there is the exact `π/π_old` of the
/// bias correction ([`SampledKlOptions::bias_correction`], with `inputs.old_logp`), which only
/// undoes the sampling by `π_old`. For the reward placement see [`kl_rewards`].
///
/// Errors: shape and option errors (`old_logp` given exactly with the bias correction);
/// [`Error::InvalidRow`](crate::Error) (row = sequence) for the lowest sequence with, on a valid
/// token, a non-finite `old_logp` ([`RowProblem::NonFinite`], before the other problems), a NaN
/// input or estimate
/// ([`RowProblem::NaN`]: e.g. `logp = ref_logp = -inf`), or an infinite value or gradient of
/// the chosen estimator ([`RowProblem::InfiniteKl`]: e.g. k1 or k2 where `ref_logp = -inf`,
/// a token the reference forbids). The clamps keep k3, k1_rev and k3_rev finite. With finite
/// inputs, an estimate, a gradient or a row sum beyond f32 is [`RowProblem::Overflow`] (k2
/// of `|log r| > 1.8e19`, or a β so large that `β·w·∂k` overflows).
///
/// ```
/// use rlhf_kernels::{cpu, Aggregation, KlEstimator, RowShape, SampledKlInputs, SampledKlOptions, SampledKlOutputs};
/// let (logp, ref_logp) = ([-1.0f32, -2.0, -0.5, 0.0], [-1.2f32, -1.9, -0.5, 0.0]);
/// let mask = [1u8, 1, 1, 0];
/// let mut grad = [0.0f32; 4];
/// let opts = SampledKlOptions::new(KlEstimator::gradient_of(rlhf_kernels::KlDirection::PolicyRef))
///     .coef(0.01)
///     .aggregation(Aggregation::SeqMeanTokenMean);
/// let inputs = SampledKlInputs::new(RowShape::new(2, 2), &logp, &ref_logp).mask(&mask);
/// let stats = cpu::sampled_kl(&inputs, SampledKlOutputs::default().grad_logp(&mut grad), &opts)?;
/// assert!(stats.loss > 0.0 && grad[3] == 0.0);
/// # Ok::<(), rlhf_kernels::Error>(())
/// ```
pub fn sampled_kl(
    inputs: &SampledKlInputs<'_>,
    mut out: SampledKlOutputs<'_>,
    opts: &SampledKlOptions,
) -> Result<SampledKlStats> {
    inputs.validate(opts)?;
    let SampledKlInputs { shape, logp, ref_logp, mask, old_logp } = *inputs;
    out.check(shape)?;
    let (lr_clamp, v_clamp) = opts.limits()?;
    // Valid tokens per sequence, counted once (the weights and the counts need them).
    let row_valid: Vec<usize> =
        (0..shape.rows).into_par_iter().map(|i| valid_in_row(shape, mask, i)).collect();
    let local = BatchCounts {
        valid_tokens: row_valid.iter().sum::<usize>() as f64,
        valid_sequences: row_valid.iter().filter(|&&n| n > 0).count() as f64,
        sequences: shape.rows as f64,
    };
    let counts = opts.normaliser.counts(local);
    let chosen = opts.estimator;
    let coef = opts.coef;

    // Per-row output slices, so that rows can be written in parallel.
    let (values, grads) = (row_slices(out.values.take(), shape), row_slices(out.grad_logp.take(), shape));
    let per_row: Vec<Result<RowSums, (usize, RowProblem)>> = values
        .into_par_iter()
        .zip(grads)
        .enumerate()
        .map(|(i, (v_row, g_row))| {
            let w = (coef as f64 * opts.aggregation.token_weight(counts, row_valid[i])) as f32;
            let row = shape.row_range(i);
            let m = mask.map(|m| &m[row.clone()]);
            let (v_row, g_row) = (v_row.map(|v| &mut v[..shape.cols]), g_row.map(|g| &mut g[..shape.cols]));
            let p = RowParams { w, lr_clamp, v_clamp };
            let (lp, rlp) = (&logp[row.clone()], &ref_logp[row.clone()]);
            let sums = match old_logp {
                Some(o) => row_of::<BiasCorrected>(chosen, lp, rlp, &o[row], m, v_row, g_row, p),
                None => row_of::<Plain>(chosen, lp, rlp, lp, m, v_row, g_row, p),
            };
            if sums.bad_old {
                return Err((i, RowProblem::NonFinite));
            }
            if sums.nan {
                Err((i, RowProblem::NaN))
            } else if sums.inf {
                Err((i, RowProblem::InfiniteKl))
            } else if sums.overflow {
                Err((i, RowProblem::Overflow))
            } else {
                Ok(sums)
            }
        })
        .collect();

    let mut stats = SampledKlStats { counts: local, ..Default::default() };
    let mut clamped = 0.0;
    let mut problem = None;
    for (i, r) in per_row.into_iter().enumerate() {
        match r {
            Ok(sums) => {
                let w = opts.aggregation.token_weight(counts, row_valid[i]);
                for (m, s) in stats.means.iter_mut().zip(sums.estimators) {
                    *m += w * s;
                }
                clamped += sums.clamped;
            }
            Err(p) => problem = first_problem(problem, Some(p)),
        }
    }
    if let Some((i, p)) = problem {
        return Err(Op::SampledKl.invalid_row(i, p));
    }
    stats.loss = coef as f64 * stats.mean(chosen);
    stats.clamped_fraction = if local.valid_tokens > 0.0 { clamped / local.valid_tokens } else { 0.0 };
    if let Some(slot) = out.stats {
        *slot = stats;
    }
    Ok(stats)
}

/// KL folded into per-token rewards (the InstructGPT placement): for every valid token
/// `r_t = −β·kl_t`, plus the sequence's `score` on its last valid token; padding gets 0 (a
/// sequence without a valid token drops its score). Writes `rewards` laid out as `kl`
/// (`[B, T]`, rows = sequences). These rewards feed the advantages (GAE); the KL then acts
/// through the return, not as a loss term.
///
/// Errors: shape errors, a non-finite β, [`RowProblem::NonFinite`] for the lowest sequence with
/// a non-finite KL at a valid token or a non-finite score, [`RowProblem::Overflow`] for the
/// lowest sequence whose reward overflows f32 (`rewards` is then partly written).
///
/// ```
/// use rlhf_kernels::{cpu, KlRewardsInputs, KlRewardsOptions, RowShape};
/// let (kl, scores, mut rewards) = ([0.5f32, 0.25, 9.0], [2.0f32], [0.0f32; 3]);
/// let inputs = KlRewardsInputs::new(RowShape::new(1, 3), &kl, &scores).mask(&[1, 1, 0]);
/// cpu::kl_rewards(&inputs, &mut rewards, &KlRewardsOptions::new(0.1))?;
/// assert_eq!(rewards, [-0.05, 2.0 - 0.025, 0.0]);
/// # Ok::<(), rlhf_kernels::Error>(())
/// ```
pub fn kl_rewards(inputs: &KlRewardsInputs<'_>, rewards: &mut [f32], opts: &KlRewardsOptions) -> Result<()> {
    inputs.validate(Some(rewards.len()), opts)?;
    let KlRewardsInputs { shape, kl, scores, mask } = *inputs;
    let beta = opts.beta;
    let problem = rewards
        .par_chunks_mut(shape.row_stride)
        .enumerate()
        .filter_map(|(i, out)| {
            let row = shape.row_range(i);
            let valid = |t: usize| mask.is_none_or(|m| m[t] != 0);
            let last = row.clone().rev().find(|&t| valid(t));
            let (mut bad_input, mut overflow) = (!scores[i].is_finite(), false);
            for (o, t) in out.iter_mut().zip(row) {
                let r = if valid(t) { -beta * kl[t] } else { 0.0 };
                *o = if Some(t) == last { r + scores[i] } else { r };
                bad_input |= valid(t) && !kl[t].is_finite();
                overflow |= !o.is_finite();
            }
            let p = if bad_input { RowProblem::NonFinite } else { RowProblem::Overflow };
            (bad_input || overflow).then_some((i, p))
        })
        .min_by_key(|&(i, _)| i);
    match problem {
        Some((i, p)) => Err(Op::KlRewards.invalid_row(i, p)),
        None => Ok(()),
    }
}
