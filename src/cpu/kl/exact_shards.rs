//! Vocabulary shards of the exact divergences on the CPU: per-row partial statistics of a
//! shard (and the JSD's second-round sums), for tensor-parallel trainers.

use rayon::prelude::*;

use crate::cpu::{first_problem, rows_per_task};
use crate::error::Op;
use crate::kl::{jsd_beta, shard_count};
use crate::logprobs::check_len;
use crate::reference::check_pair;
use crate::{
    Element, Error, ExactDivergence, ExactKlOptions, ExactKlOutputs, ExactKlPartial, ReferenceRows, Result,
    RowProblem, RowShape,
};

use super::exact::{Saved, classify, jsd_terms, pair_stats_row};

/// Per-row [`ExactKlPartial`]s of a vocabulary shard: `policy` and `reference.logits` hold the
/// same columns of the full vocabulary. Padding rows give [`ExactKlPartial::EMPTY`]; row
/// problems travel in the flags (reported by [`ExactKlPartial::finish`]). See
/// [`ExactKlPartial`] for the tensor-parallel recipe.
pub fn exact_kl_shard_partials<P: Element, Q: Element>(
    policy: &[P],
    policy_shape: RowShape,
    reference: &ReferenceRows<'_, Q>,
    partials: &mut [ExactKlPartial],
    opts: &ExactKlOptions,
) -> Result<()> {
    let ReferenceRows { logits: reference, shape: ref_shape, mask } = *reference;
    check_pair(policy.len(), policy_shape, reference.len(), ref_shape, mask)?;
    check_len("partials", partials.len(), policy_shape.rows)?;
    let inv_tau = opts.inv_temperature()?;
    partials.par_iter_mut().enumerate().with_min_len(rows_per_task(policy_shape.cols)).for_each(
        |(r, out)| {
            *out = if mask.is_some_and(|m| m[r] == 0) {
                ExactKlPartial::EMPTY
            } else {
                let (p, q) = (&policy[policy_shape.row_range(r)], &reference[ref_shape.row_range(r)]);
                let st = pair_stats_row(p, q, inv_tau);
                let side_flags = |problem: Option<RowProblem>, nan: u32, inf: u32| match problem {
                    Some(RowProblem::NaN) => nan,
                    Some(RowProblem::PosInf) => inf,
                    _ => 0,
                };
                let flags =
                    side_flags(
                        classify(p, st.mp),
                        ExactKlPartial::POLICY_NAN,
                        ExactKlPartial::POLICY_POS_INF,
                    ) | side_flags(classify(q, st.mq), ExactKlPartial::REF_NAN, ExactKlPartial::REF_POS_INF);
                ExactKlPartial {
                    policy_max: st.mp,
                    policy_sum_exp: st.sp,
                    policy_term: st.a_pr,
                    ref_max: st.mq,
                    ref_sum_exp: st.sq,
                    ref_term: st.a_rp,
                    flags,
                }
            };
        },
    );
    Ok(())
}

/// The JSD's second round on a vocabulary shard: per row `[Σ p·log(p/m), Σ q·log(q/m)]` over
/// the shard's columns, given the rows' full log-sum-exps (from the merged
/// [`ExactKlPartial`]s). Sum them over shards in shard order and combine as
/// `β·s_p + (1 − β)·s_q`. Padding rows give `[0, 0]`; an unmasked row whose log-sum-exps
/// are not finite (the merge refused it) is an error.
pub fn jsd_shard_sums<P: Element, Q: Element>(
    policy: &[P],
    policy_shape: RowShape,
    reference: &ReferenceRows<'_, Q>,
    policy_lse: &[f32],
    ref_lse: &[f32],
    sums: &mut [[f32; 2]],
    opts: &ExactKlOptions,
) -> Result<()> {
    let ReferenceRows { logits: reference, shape: ref_shape, mask } = *reference;
    check_pair(policy.len(), policy_shape, reference.len(), ref_shape, mask)?;
    for (what, len) in [("policy_lse", policy_lse.len()), ("ref_lse", ref_lse.len()), ("sums", sums.len())] {
        check_len(what, len, policy_shape.rows)?;
    }
    let ExactDivergence::Jsd { beta } = opts.divergence else {
        return Err(Error::InvalidOption {
            name: "divergence",
            value: format!("{:?}", opts.divergence),
            expected: "ExactDivergence::Jsd (the two KLs need one round only)",
        });
    };
    let inv_tau = opts.inv_temperature()?;
    let problem = sums
        .par_iter_mut()
        .enumerate()
        .with_min_len(rows_per_task(policy_shape.cols))
        .map(|(r, out)| {
            *out = [0.0; 2];
            let (lse_p, lse_q) = (policy_lse[r], ref_lse[r]);
            if mask.is_some_and(|m| m[r] == 0) {
                return None;
            }
            if !(lse_p.is_finite() && lse_q.is_finite()) {
                // The merge refused this row already; its sums stay 0.
                return Some((r, RowProblem::NaN));
            }
            let (p, q) = (&policy[policy_shape.row_range(r)], &reference[ref_shape.row_range(r)]);
            *out = jsd_terms(p, q, Saved { inv_tau, lse_p, lse_q, beta });
            None
        })
        .reduce(|| None, first_problem);
    match problem {
        Some((r, p)) => Err(Op::ExactKl.invalid_row(r, p)),
        None => Ok(()),
    }
}

/// Merges the [`ExactKlPartial`]s of all shards (`partials`: `[shards][rows]`, shard order;
/// `mask` one byte per row or `None`) and writes the requested outputs as
/// [`exact_kl`](crate::cpu::exact_kl) would for the whole vocabulary: the host twin of
/// `cuda::finish_exact_kl_partials`. For the JSD it writes only the two log-sum-exps (both
/// required: they feed [`jsd_shard_sums`]; its value comes from [`finish_jsd_sums`]).
/// Padding rows get 0. The first row without a defined result (its flags or
/// [`ExactKlPartial::finish`]) is an [`Error::InvalidRow`]. `out.workspace` is not used; a
/// statistic is refused (aggregate the finished values).
///
/// ```
/// use rlhf_kernels::{cpu, ExactDivergence, ExactKlOptions, ExactKlOutputs, ExactKlPartial, ReferenceRows, RowShape};
/// let opts = ExactKlOptions::new(ExactDivergence::PolicyRef);
/// let (p, q) = ([0.5f32, 1.0, -1.0, 2.0], [0.0f32, 1.0, 0.0, 0.5]);
/// // Two ranks, each with two of the four columns of one row.
/// let mut parts = [ExactKlPartial::EMPTY; 2];
/// for (k, part) in parts.iter_mut().enumerate() {
///     let cols = 2 * k..2 * k + 2;
///     let r = ReferenceRows::new(&q[cols.clone()], RowShape::new(1, 2));
///     cpu::exact_kl_shard_partials(&p[cols], RowShape::new(1, 2), &r, std::slice::from_mut(part), &opts)?;
/// }
/// let mut kl = [0.0f32];
/// cpu::finish_exact_kl_partials(&parts, None, ExactKlOutputs::default().value(&mut kl), &opts)?;
/// let mut whole = [0.0f32];
/// let r = ReferenceRows::new(&q, RowShape::new(1, 4));
/// cpu::exact_kl(&p, RowShape::new(1, 4), &r, ExactKlOutputs::default().value(&mut whole), &opts)?;
/// assert!((kl[0] - whole[0]).abs() < 1e-6);
/// # Ok::<(), rlhf_kernels::Error>(())
/// ```
pub fn finish_exact_kl_partials(
    partials: &[ExactKlPartial],
    mask: Option<&[u8]>,
    out: ExactKlOutputs<'_>,
    opts: &ExactKlOptions,
) -> Result<()> {
    let rows = out.check_merge(opts.divergence)?;
    let shards = shard_count("partials", partials.len(), rows)?;
    mask.map_or(Ok(()), |m| check_len("mask", m.len(), rows))?;
    let inv_tau = opts.inv_temperature()?;
    let ExactKlOutputs { mut value, mut policy_lse, mut ref_lse, mut policy_term, .. } = out;
    for r in 0..rows {
        let stats = if mask.is_some_and(|m| m[r] == 0) {
            crate::ExactKlStats { value: 0.0, policy_lse: 0.0, ref_lse: 0.0 }
        } else {
            let row =
                (0..shards).fold(ExactKlPartial::EMPTY, |acc, k| acc.merge(&partials[k * rows + r], inv_tau));
            row.finish(opts).map_err(|problem| Op::ExactKl.invalid_row(r, problem))?
        };
        let put = |o: &mut Option<&mut [f32]>, v: f32| {
            if let Some(o) = o {
                o[r] = v;
            }
        };
        put(&mut value, stats.value);
        put(&mut policy_lse, stats.policy_lse);
        put(&mut ref_lse, stats.ref_lse);
        // The two KLs' policy term is the value (the JSD writes none here).
        put(&mut policy_term, stats.value);
    }
    Ok(())
}

/// Sums the JSD's shard sums (`sums`: `[shards][rows]` pairs from [`jsd_shard_sums`], shard
/// order) and writes `out.value = max(0, β·Σ s_p + (1 − β)·Σ s_q)` and `out.policy_term =
/// max(0, Σ s_p)` (at least one of them, `rows` f32 each), given the rows' full log-sum-exps
/// from [`finish_exact_kl_partials`]: the host twin of `cuda::finish_jsd_sums`, the same f32
/// sums in the same order. Padding rows get 0; a valid row with a non-finite log-sum-exp (one
/// the merge refused) is an [`Error::InvalidRow`]. The log-sum-exps, statistic and workspace
/// of `out` are not used: passing them is an error.
pub fn finish_jsd_sums(
    sums: &[[f32; 2]],
    mask: Option<&[u8]>,
    [policy_lse, ref_lse]: [&[f32]; 2],
    out: ExactKlOutputs<'_>,
    opts: &ExactKlOptions,
) -> Result<()> {
    let rows = policy_lse.len();
    check_len("ref_lse", ref_lse.len(), rows)?;
    let shards = shard_count("sums", sums.len(), rows)?;
    mask.map_or(Ok(()), |m| check_len("mask", m.len(), rows))?;
    out.check_jsd_finish(rows)?;
    let beta = jsd_beta(opts.divergence)?;
    let ExactKlOutputs { mut value, mut policy_term, .. } = out;
    for r in 0..rows {
        let (v, term) = if mask.is_some_and(|m| m[r] == 0) {
            (0.0, 0.0)
        } else if !(policy_lse[r].is_finite() && ref_lse[r].is_finite()) {
            return Err(Op::ExactKl.invalid_row(r, RowProblem::NaN));
        } else {
            let (mut tp, mut tq) = (0.0f32, 0.0f32);
            for k in 0..shards {
                tp += sums[k * rows + r][0];
                tq += sums[k * rows + r][1];
            }
            ((beta * tp + (1.0 - beta) * tq).max(0.0), tp.max(0.0))
        };
        if let Some(o) = &mut value {
            o[r] = v;
        }
        if let Some(o) = &mut policy_term {
            o[r] = term;
        }
    }
    Ok(())
}
