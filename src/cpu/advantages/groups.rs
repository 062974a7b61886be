//! CPU group estimators (MATH.md §3): per-group sums in member order, deterministic for any
//! thread count.

use rayon::prelude::*;

use crate::error::Op;
use crate::{GroupAdvantageOptions, GroupAdvantageOutputs, Groups, Result, TokenOutput};

/// Outcome advantages over groups of responses (GRPO, Dr. GRPO, RLOO, the group mean of
/// REINFORCE++-baseline; formulas in the crate-level docs of [`GroupEstimator`](crate::GroupEstimator)):
/// group sums in f64 over members in sequence order, one value per sequence, broadcast to
/// every valid token if asked.
///
/// Errors: lengths (`scores` and the token rows must match the groups' sequences), no output,
/// a singleton group under [`SingletonGroups::Error`](crate::SingletonGroups::Error),
/// [`RowProblem::NonFinite`](crate::RowProblem::NonFinite) for the lowest sequence with a
/// non-finite score or advantage.
///
/// ```
/// use rlhf_kernels::{cpu, GroupAdvantageOptions, GroupAdvantageOutputs, Groups, RowShape};
/// // Two prompts, groups out of order and of unequal sizes.
/// let groups = Groups::new(&[0, 1, 0, 1, 1], 2)?;
/// let scores = [1.0f32, 0.0, 0.0, 1.0, 2.0];
/// let mut a = [0.0f32; 5];
/// let out = GroupAdvantageOutputs::default().per_sequence(&mut a);
/// cpu::group_advantages(&scores, &groups, out, &GroupAdvantageOptions::grpo())?;
/// // Group 0: mean 0.5, unbiased std 0.7071; group 1: mean 1, std 1.
/// assert!((a[0] - 0.7071).abs() < 1e-4 && (a[1] + 1.0).abs() < 1e-5 && a[3].abs() < 1e-6);
/// # Ok::<(), rlhf_kernels::Error>(())
/// ```
pub fn group_advantages(
    scores: &[f32],
    groups: &Groups,
    out: GroupAdvantageOutputs<'_>,
    opts: &GroupAdvantageOptions,
) -> Result<()> {
    let b = groups.sequences();
    crate::logprobs::check_len("scores", scores.len(), b)?;
    opts.validate()?;
    groups.check_singletons(opts)?;
    out.check(b)?;
    let mut owned = Vec::new();
    let per_seq: &mut [f32] = match out.per_sequence {
        Some(o) => o,
        None => {
            owned.resize(b, 0.0);
            &mut owned
        }
    };
    // Each group's (center, scale) from f64 sums over its members in sequence order, then every
    // sequence's advantage: both passes parallel, neither order depends on the thread count.
    let affine: Vec<(f64, f64)> = (0..groups.count())
        .into_par_iter()
        .with_min_len(256)
        .map(|g| {
            let members = groups.members(g);
            if members.is_empty() {
                return (0.0, 0.0);
            }
            let n = members.len();
            let mean = members.iter().map(|&i| scores[i as usize] as f64).sum::<f64>() / n as f64;
            let m2: f64 = members.iter().map(|&i| (scores[i as usize] as f64 - mean).powi(2)).sum();
            opts.group_affine(n, mean, m2)
        })
        .collect();
    let problem = per_seq
        .par_iter_mut()
        .with_min_len(4096)
        .enumerate()
        .filter_map(|(i, a)| {
            let s = scores[i];
            let (center, scale) = affine[groups.ids[i] as usize];
            *a = ((s as f64 - center) * scale) as f32;
            group_problem(s, center, *a).map(|p| (i, p))
        })
        .min_by_key(|&(i, _)| i);
    if let Some((i, p)) = problem {
        return Err(Op::GroupAdvantages.invalid_row(i, p));
    }
    if let Some(TokenOutput { out: o, shape, mask }) = out.per_token {
        let per_seq = &*per_seq;
        o.par_chunks_mut(shape.row_stride).enumerate().for_each(|(i, row)| {
            let start = shape.row_start(i);
            for (j, x) in row[..shape.cols].iter_mut().enumerate() {
                *x = if mask.is_none_or(|m| m[start + j] != 0) { per_seq[i] } else { 0.0 };
            }
        });
    }
    Ok(())
}

/// A member's problem: its own non-finite score, or a finite score whose advantage overflows
/// f32 in a group of finite scores (a member beside a NaN gets a NaN advantage but is not the
/// one reported).
pub(crate) fn group_problem(score: f32, center: f64, advantage: f32) -> Option<crate::RowProblem> {
    if !score.is_finite() {
        Some(crate::RowProblem::NonFinite)
    } else if !advantage.is_finite() && center.is_finite() {
        Some(crate::RowProblem::Overflow)
    } else {
        None
    }
}
