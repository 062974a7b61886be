//! CPU GAE (MATH.md §3): one right-to-left pass per sequence, f64 state, rayon over sequences.

use rayon::prelude::*;

use crate::cpu::rows_mut;
use crate::{GaeInputs, GaeOptions, GaeOutputs, MaskedSteps, Result};

/// GAE advantages and returns (MATH.md §3) for a `[B, T]` batch: per-token rewards from
/// [`GaeInputs`] (dense rewards, `−β·kl_t`, the score on the last valid token), `V_t` (0 when
/// absent), discount γ and trace λ; masked positions pass the recurrence through or reset it
/// ([`MaskedSteps`]). One right-to-left pass per sequence with an f64 state, rounded once: the
/// result is within one f32 rounding of [`reference::gae`](crate::reference::gae).
///
/// Errors: shape or option errors (no reward source, γ or λ outside [0, 1], no output);
/// [`RowProblem::NonFinite`](crate::RowProblem::NonFinite) for the lowest sequence whose
/// advantages are not finite (a NaN or infinite input at a valid position, or an overflow;
/// inputs at masked positions are never read). Left-padded, right-padded and variable-length
/// sequences are just masks.
///
/// ```
/// use rlhf_kernels::{cpu, GaeInputs, GaeOptions, GaeOutputs, RowShape};
/// // One sequence, right-padded: score 1 on the last valid token, values from a critic.
/// let (values, scores, mask) = ([0.5f32, 0.5, 0.0], [1.0f32], [1u8, 1, 0]);
/// let inputs = GaeInputs::new(RowShape::new(1, 3)).scores(&scores).values(&values).mask(&mask);
/// let (mut adv, mut ret) = ([0.0f32; 3], [0.0f32; 3]);
/// cpu::gae(&inputs, GaeOutputs::default().advantages(&mut adv).returns(&mut ret), &GaeOptions::new(1.0, 1.0))?;
/// assert_eq!(adv, [0.5, 0.5, 0.0]); // A_1 = 1 − 0.5; A_0 = 0 + 0.5 − 0.5 + A_1
/// assert_eq!(ret, [1.0, 1.0, 0.0]);
/// # Ok::<(), rlhf_kernels::Error>(())
/// ```
pub fn gae(inputs: &GaeInputs<'_>, out: GaeOutputs<'_>, opts: &GaeOptions) -> Result<()> {
    inputs.validate()?;
    opts.validate()?;
    let shape = inputs.shape;
    out.check(shape)?;
    let (gamma, gl) = (opts.gamma as f64, opts.gamma as f64 * opts.lambda as f64);
    let problem = rows_mut(out.advantages, shape)
        .zip(rows_mut(out.returns, shape))
        .enumerate()
        .filter_map(|(i, (mut adv, mut ret))| {
            let row = shape.row_range(i);
            let valid = |t: usize| inputs.mask.is_none_or(|m| m[t] != 0);
            let last = row.clone().rev().find(|&t| valid(t));
            let (mut a, mut w) = (0.0f64, 0.0f64);
            let mut finite = true;
            for (j, t) in row.clone().enumerate().rev() {
                let (a_out, r_out) = if valid(t) {
                    let v = inputs.values.map_or(0.0, |v| v[t] as f64);
                    a = gl * a + gamma * w + inputs.reward(i, t, Some(t) == last) - v;
                    w = v;
                    let (a32, r32) = (a as f32, (a + v) as f32);
                    finite &= a32.is_finite() && r32.is_finite();
                    (a32, r32)
                } else {
                    if opts.masked == MaskedSteps::Reset {
                        (a, w) = (0.0, 0.0);
                    }
                    (0.0, 0.0)
                };
                if let Some(o) = adv.as_deref_mut() {
                    o[j] = a_out;
                }
                if let Some(o) = ret.as_deref_mut() {
                    o[j] = r_out;
                }
            }
            (!finite).then_some(i)
        })
        .min();
    match problem {
        Some(i) => Err(inputs.row_problem(i)),
        None => Ok(()),
    }
}
