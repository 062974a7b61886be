//! Vocabulary shards of the exact divergences on the CPU: per-row partial statistics of a
//! shard (and the JSD's second-round sums), for tensor-parallel trainers.

use rayon::prelude::*;

use crate::cpu::{first_problem, rows_per_task};
use crate::error::Op;
use crate::logprobs::check_len;
use crate::reference::check_pair;
use crate::{Element, Error, ExactDivergence, ExactKlOptions, ExactKlPartial, Result, RowProblem, RowShape};

use super::exact::{Saved, classify, jsd_terms, pair_stats_row};
use crate::ReferenceRows;

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
