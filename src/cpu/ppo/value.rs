//! The CPU clipped value loss (MATH.md §4): per token in f32, with its aggregation, gradient
//! and statistics in one pass over the batch (rayon over sequences, row sums in f64 merged in
//! row order: deterministic).

use rayon::prelude::*;

use crate::aggregation::valid_in_row;
use crate::cpu::rows_mut;
use crate::error::Op;
use crate::{
    BatchCounts, Result, RowProblem, ValueLossInputs, ValueLossOptions, ValueLossOutputs, ValueLossStats,
};

/// One token's value loss, `∂L_v/∂v` and whether the clipped error is the larger, in f32. The
/// errors are compared by magnitude and halved before they are squared, `(½·d)·d`, so the loss
/// overflows f32 only when its value does (`|v − R| > 2.6e19`), not already at `d² > 3.4e38`.
pub(crate) fn value_token(clip: Option<f32>, v: f32, old: f32, ret: f32) -> (f32, f32, bool) {
    let half_square = |d: f32| (0.5 * d) * d;
    let d = v - ret;
    match clip {
        None => (half_square(d), d, false),
        Some(eps) => {
            let v_clip = old + (v - old).clamp(-eps, eps);
            let dc = v_clip - ret;
            let g = if d.abs() >= dc.abs() {
                d
            } else if (v - old).abs() < eps {
                dc
            } else {
                0.0
            };
            (half_square(if d.abs() >= dc.abs() { d } else { dc }), g, dc.abs() > d.abs())
        }
    }
}

/// The clipped value loss (MATH.md §4) of a `[B, T]` batch: per token `L_v`, the aggregate
/// `coef·Σ mask·w·L_v`, the gradient `coef·w·∂L_v/∂v` and the clip fraction, in one pass.
///
/// Errors: shape and option errors; [`RowProblem::NonFinite`](crate::RowProblem::NonFinite)
/// for the lowest sequence with a non-finite input at a valid token,
/// [`RowProblem::Overflow`](crate::RowProblem::Overflow) for the lowest one whose finite
/// inputs give a loss or gradient beyond f32 (`½·(v − R)²` passes 3.4e38 at
/// `|v − R| > 2.6e19`).
///
/// ```
/// use rlhf_kernels::{cpu, RowShape, ValueLossInputs, ValueLossOptions, ValueLossOutputs};
/// let inputs = ValueLossInputs::new(RowShape::new(1, 2), &[1.0, 0.1], &[0.0, 0.0], &[2.0, 0.0]);
/// let mut grad = [0.0f32; 2];
/// let stats = cpu::value_loss(&inputs, ValueLossOutputs::default().grad_values(&mut grad), &ValueLossOptions::default().clip(Some(0.5)))?;
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
    out.check(shape)?;
    let ValueLossOutputs { loss, grad_values, stats, .. } = out;
    let local = BatchCounts::of(shape, mask);
    let counts = opts.normaliser.counts(local);
    let coef = opts.coef as f64;
    let rows: Vec<(f64, f64, f64, Option<RowProblem>)> = rows_mut(loss, shape)
        .zip(rows_mut(grad_values, shape))
        .enumerate()
        .map(|(i, (mut loss, mut grad))| {
            let w = coef * opts.aggregation.token_weight(counts, valid_in_row(shape, mask, i));
            let (mut sum, mut clipped, mut bad, mut overflow) = (0.0f64, 0.0f64, false, false);
            for (j, t) in shape.row_range(i).enumerate() {
                let (mut l_out, mut g_out) = (0.0, 0.0);
                if mask.is_none_or(|m| m[t] != 0) {
                    let (v, old, ret) = (inputs.values[t], inputs.old_values[t], inputs.returns[t]);
                    bad |= !(v.is_finite() && old.is_finite() && ret.is_finite());
                    let (l, g, c) = value_token(opts.clip, v, old, ret);
                    (l_out, g_out) = (l, (w * g as f64) as f32);
                    overflow |= !(l_out.is_finite() && g_out.is_finite());
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
            let problem =
                if bad { Some(RowProblem::NonFinite) } else { overflow.then_some(RowProblem::Overflow) };
            (w, sum, clipped, problem)
        })
        .collect();
    if let Some((i, p)) = rows.iter().enumerate().find_map(|(i, r)| r.3.map(|p| (i, p))) {
        return Err(Op::ValueLoss.invalid_row(i, p));
    }
    let loss = rows.iter().map(|r| r.0 * r.1).sum();
    let clipped: f64 = rows.iter().map(|r| r.2).sum();
    let n = local.valid_tokens;
    let st = ValueLossStats { loss, clip_fraction: if n > 0.0 { clipped / n } else { 0.0 }, counts: local };
    if let Some(slot) = stats {
        *slot = st;
    }
    Ok(st)
}
