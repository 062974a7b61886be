//! Advantage estimation in f64 (MATH.md §3), written from the definitions: GAE with an
//! explicit `next(t)`, group statistics by direct sums, two-pass moments.

use crate::advantages::non_finite;
use crate::error::Op;
use crate::{
    GaeInputs, GaeOptions, GroupAdvantageOptions, GroupEstimator, GroupStd, Groups, MaskedSteps, Moments,
    OverlongInputs, OverlongOptions, Result, RowShape, WhitenOptions,
};

/// GAE advantages and returns in f64, dense `[B·T]` (0 at masked positions).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Gae {
    /// `A_t`.
    pub advantages: Vec<f64>,
    /// `R_t = A_t + V_t`.
    pub returns: Vec<f64>,
}

/// GAE over each sequence from MATH.md's definition: `δ_t = r_t + γ·V_next(t) − V_t`,
/// `A_t = δ_t + γλ·A_next(t)`, `R_t = A_t + V_t`, where `next(t)` is the next valid step
/// ([`MaskedSteps::PassThrough`]) or `t + 1` if that one is valid ([`MaskedSteps::Reset`]).
///
/// Errors: shape or option errors; [`RowProblem::NonFinite`](crate::RowProblem::NonFinite)
/// for the lowest sequence whose advantages are not finite (a NaN or infinite input at a valid
/// position, or an overflow).
///
/// ```
/// use rlhf_kernels::{reference, GaeInputs, GaeOptions, RowShape};
/// let (r, v) = ([0.0f32, 1.0], [0.5f32, 0.25]);
/// let inputs = GaeInputs::new(RowShape::new(1, 2)).rewards(&r).values(&v);
/// let gae = reference::gae(&inputs, &GaeOptions::new(1.0, 1.0))?;
/// assert_eq!(gae.advantages, [0.5, 0.75]); // A_1 = 1 − 0.25; A_0 = 0 + 0.25 − 0.5 + A_1
/// # Ok::<(), rlhf_kernels::Error>(())
/// ```
pub fn gae(inputs: &GaeInputs<'_>, opts: &GaeOptions) -> Result<Gae> {
    inputs.validate()?;
    opts.validate()?;
    let shape = inputs.shape;
    let (gamma, lambda) = (opts.gamma as f64, opts.lambda as f64);
    let mut out = Gae { advantages: vec![0.0; shape.len()], returns: vec![0.0; shape.len()] };
    for i in 0..shape.rows {
        let row = shape.row_range(i);
        let valid = |t: usize| inputs.mask.is_none_or(|m| m[t] != 0);
        let last = row.clone().rev().find(|&t| valid(t));
        let value = |t: usize| inputs.values.map_or(0.0, |v| v[t] as f64);
        let next = |t: usize| match opts.masked {
            MaskedSteps::PassThrough => (t + 1..row.end).find(|&k| valid(k)),
            MaskedSteps::Reset => Some(t + 1).filter(|&k| k < row.end && valid(k)),
        };
        let base = i * shape.cols;
        for t in row.clone().rev().filter(|&t| valid(t)) {
            let (v_next, a_next) = match next(t) {
                Some(k) => (value(k), out.advantages[base + k - row.start]),
                None => (0.0, 0.0),
            };
            let delta = inputs.reward(i, t, Some(t) == last) + gamma * v_next - value(t);
            let a = delta + gamma * lambda * a_next;
            out.advantages[base + t - row.start] = a;
            out.returns[base + t - row.start] = a + value(t);
        }
        let row_out = &out.advantages[base..base + shape.cols];
        if row_out
            .iter()
            .chain(&out.returns[base..base + shape.cols])
            .any(|a| !(a.is_finite() && (*a as f32).is_finite()))
        {
            return Err(inputs.row_problem(i));
        }
    }
    Ok(out)
}

/// Each sequence's outcome advantage (module docs of the estimators), from the group sums
/// computed directly.
///
/// Errors: `scores.len()` differs from the groups' sequences; a singleton group refused by
/// the options; [`RowProblem::NonFinite`](crate::RowProblem::NonFinite) for the lowest
/// sequence with a non-finite score or advantage.
///
/// ```
/// use rlhf_kernels::{reference, GroupAdvantageOptions, Groups};
/// let groups = Groups::new(&[0, 1, 0], 2)?;
/// let a = reference::group_advantages(&[1.0, 5.0, 3.0], &groups, &GroupAdvantageOptions::rloo())?;
/// assert_eq!(a, [-2.0, 0.0, 2.0]); // 1 − 3, a singleton, 3 − 1
/// # Ok::<(), rlhf_kernels::Error>(())
/// ```
pub fn group_advantages(scores: &[f32], groups: &Groups, opts: &GroupAdvantageOptions) -> Result<Vec<f64>> {
    crate::logprobs::check_len("scores", scores.len(), groups.sequences())?;
    opts.validate()?;
    groups.check_singletons(opts)?;
    let mut out = vec![0.0; scores.len()];
    for g in 0..groups.count() {
        let members = groups.members(g);
        let n = members.len();
        if n == 0 {
            continue;
        }
        let sum: f64 = members.iter().map(|&i| scores[i as usize] as f64).sum();
        let mean = sum / n as f64;
        let m2: f64 = members.iter().map(|&i| (scores[i as usize] as f64 - mean).powi(2)).sum();
        for &i in members {
            let s = scores[i as usize] as f64;
            out[i as usize] = match (opts.estimator, n) {
                (GroupEstimator::Rloo, 1) => 0.0,
                (GroupEstimator::Rloo, _) => s - (sum - s) / (n - 1) as f64,
                (GroupEstimator::GroupMean | GroupEstimator::Grpo { std: GroupStd::NoStd, .. }, 1) => s,
                (GroupEstimator::GroupMean | GroupEstimator::Grpo { std: GroupStd::NoStd, .. }, _) => {
                    s - mean
                }
                (GroupEstimator::Grpo { eps, .. }, 1) => s / (1.0 + eps as f64),
                (GroupEstimator::Grpo { std, eps }, _) => {
                    let d = if std == GroupStd::Unbiased { n - 1 } else { n } as f64;
                    let spread = (m2 / d).sqrt() + eps as f64;
                    if spread > 0.0 { (s - mean) / spread } else { 0.0 }
                }
            };
        }
    }
    if let Some(i) = scores.iter().position(|s| !s.is_finite()) {
        return Err(non_finite(Op::GroupAdvantages, i));
    }
    if let Some(i) = out.iter().position(|&a| !(a as f32).is_finite()) {
        return Err(Op::GroupAdvantages.invalid_row(i, crate::RowProblem::Overflow));
    }
    Ok(out)
}

/// DAPO's overlong shaping in f64: each score plus
/// `−penalty·clamp((L − (L_max − L_buf))/L_buf, 0, 1)` for a response of `L` valid tokens (the
/// piecewise form of [`OverlongOptions`] as one clamp).
///
/// Errors: shape and option errors; [`RowProblem::NonFinite`](crate::RowProblem::NonFinite)
/// for the lowest sequence with a non-finite score, [`RowProblem::Overflow`](crate::RowProblem::Overflow)
/// for the lowest one whose shaped score is beyond f32.
///
/// ```
/// use rlhf_kernels::{reference, OverlongInputs, OverlongOptions, RowShape};
/// let inputs = OverlongInputs::new(RowShape::new(2, 4), &[1.0, 1.0]).mask(&[1, 1, 0, 0, 1, 1, 1, 1]);
/// let shaped = reference::overlong_shaping(&inputs, &OverlongOptions::new(4, 2))?;
/// assert_eq!(shaped, [1.0, 0.0]); // 2 tokens: inside the limit; 4: the full penalty
/// # Ok::<(), rlhf_kernels::Error>(())
/// ```
pub fn overlong_shaping(inputs: &OverlongInputs<'_>, opts: &OverlongOptions) -> Result<Vec<f64>> {
    inputs.validate(inputs.shape.rows, opts)?;
    let (shape, mask) = (inputs.shape, inputs.mask);
    let (max_len, band) = (opts.max_len as f64, opts.buffer_len as f64);
    let mut out = Vec::with_capacity(shape.rows);
    for i in 0..shape.rows {
        let len = shape.row_range(i).filter(|&t| mask.is_none_or(|m| m[t] != 0)).count() as f64;
        let s = inputs.scores[i] as f64;
        if !s.is_finite() {
            return Err(non_finite(Op::Overlong, i));
        }
        let shaped = s - opts.penalty as f64 * ((len - (max_len - band)) / band).clamp(0.0, 1.0);
        if !(shaped as f32).is_finite() {
            return Err(Op::Overlong.invalid_row(i, crate::RowProblem::Overflow));
        }
        out.push(shaped);
    }
    Ok(out)
}

/// Count, mean, unbiased variance, min and max over the valid tokens (two passes in f64).
///
/// Errors: shape errors; [`RowProblem::NonFinite`](crate::RowProblem::NonFinite) for the
/// lowest sequence with a non-finite valid value.
///
/// ```
/// use rlhf_kernels::{reference, RowShape};
/// let m = reference::masked_moments(&[1.0, 9.0, 3.0], RowShape::new(1, 3), Some(&[1, 0, 1]))?;
/// assert_eq!((m.count, m.mean, m.var, m.min, m.max), (2.0, 2.0, 2.0, 1.0, 3.0));
/// # Ok::<(), rlhf_kernels::Error>(())
/// ```
pub fn masked_moments(values: &[f32], shape: RowShape, mask: Option<&[u8]>) -> Result<Moments> {
    let valid = valid_values(values, shape, mask, Op::Moments)?;
    let n = valid.len() as f64;
    if valid.is_empty() {
        return Ok(Moments::EMPTY);
    }
    let mean = valid.iter().sum::<f64>() / n;
    let m2 = valid.iter().map(|x| (x - mean).powi(2)).sum();
    let min = valid.iter().copied().fold(f64::INFINITY, f64::min);
    let max = valid.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    Ok(Moments::from_m2(n, mean, m2, min, max))
}

/// Whitened values, dense `[B·T]`: `(x − mean)/sqrt(var + ε)` (+ mean with `keep_mean`) at
/// valid tokens, 0 at masked ones.
///
/// ```
/// use rlhf_kernels::{reference, RowShape, WhitenOptions};
/// let w = reference::whiten(&[1.0, 3.0], RowShape::new(1, 2), None, &WhitenOptions::default().eps(0.0))?;
/// assert_eq!(w, [-1.0 / 2f64.sqrt(), 1.0 / 2f64.sqrt()]); // mean 2, unbiased variance 2
/// # Ok::<(), rlhf_kernels::Error>(())
/// ```
pub fn whiten(
    values: &[f32],
    shape: RowShape,
    mask: Option<&[u8]>,
    opts: &WhitenOptions,
) -> Result<Vec<f64>> {
    opts.validate()?;
    let m = masked_moments(values, shape, mask)?;
    let (center, scale, offset) = opts.affine(&m);
    let mut out = vec![0.0; shape.len()];
    for i in 0..shape.rows {
        for (j, t) in shape.row_range(i).enumerate() {
            if mask.is_none_or(|mk| mk[t] != 0) {
                out[i * shape.cols + j] = (values[t] as f64 - center) * scale + offset;
            }
        }
    }
    Ok(out)
}

/// The valid values in order, after the shape and finiteness checks.
fn valid_values(values: &[f32], shape: RowShape, mask: Option<&[u8]>, op: Op) -> Result<Vec<f64>> {
    shape.check_buffer("values", values.len())?;
    if let Some(m) = mask {
        shape.check_buffer("mask", m.len())?;
    }
    if let Some(i) = crate::advantages::first_non_finite(shape, mask, &[values]) {
        return Err(non_finite(op, i));
    }
    Ok((0..shape.rows)
        .flat_map(|i| shape.row_range(i))
        .filter(|&t| mask.is_none_or(|m| m[t] != 0))
        .map(|t| values[t] as f64)
        .collect())
}
