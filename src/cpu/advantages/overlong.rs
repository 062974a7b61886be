//! DAPO's overlong shaping of the outcome scores on the CPU: the valid tokens of each response
//! counted in parallel, one f32 addition per sequence.

use rayon::prelude::*;

use crate::aggregation::valid_in_row;
use crate::error::Op;
use crate::{OverlongInputs, OverlongOptions, Result, RowProblem};

/// Each sequence's score plus DAPO's length penalty `R_len(L)` ([`OverlongOptions`]: 0 up to
/// `L_max − L_buf` valid tokens, then linear down to `−penalty` at `L_max`, `−penalty`
/// beyond), written to `shaped` (`[B]`; it may not alias the scores: copy them first to shape
/// in place). Feed the result to [`group_advantages`](crate::cpu::group_advantages) or to
/// GAE's per-sequence scores.
///
/// Errors: shape and option errors; [`RowProblem::NonFinite`] for the lowest sequence with a
/// non-finite score, [`RowProblem::Overflow`] for the lowest one whose shaped score is beyond
/// f32 (`shaped` is then partly written).
///
/// ```
/// use rlhf_kernels::{cpu, OverlongInputs, OverlongOptions, RowShape};
/// let mask = [1u8, 1, 1, 0, 0, 0, 1, 1, 1, 1, 1, 0];
/// let inputs = OverlongInputs::new(RowShape::new(2, 6), &[1.0, 1.0]).mask(&mask);
/// let mut shaped = [0.0f32; 2];
/// cpu::overlong_shaping(&inputs, &mut shaped, &OverlongOptions::new(6, 4))?;
/// assert_eq!(shaped, [0.75, 0.25]); // 3 tokens: 1 into the band of 4; 5 tokens: 3 into it
/// # Ok::<(), rlhf_kernels::Error>(())
/// ```
pub fn overlong_shaping(
    inputs: &OverlongInputs<'_>,
    shaped: &mut [f32],
    opts: &OverlongOptions,
) -> Result<()> {
    inputs.validate(shaped.len(), opts)?;
    let (shape, mask, scores) = (inputs.shape, inputs.mask, inputs.scores);
    let problem = shaped
        .par_iter_mut()
        .enumerate()
        .filter_map(|(i, out)| {
            let s = scores[i];
            *out = s + opts.reward(valid_in_row(shape, mask, i)) as f32;
            match (s.is_finite(), out.is_finite()) {
                (false, _) => Some((i, RowProblem::NonFinite)),
                (true, false) => Some((i, RowProblem::Overflow)),
                _ => None,
            }
        })
        .min_by_key(|&(i, _)| i);
    match problem {
        Some((i, p)) => Err(Op::Overlong.invalid_row(i, p)),
        None => Ok(()),
    }
}
