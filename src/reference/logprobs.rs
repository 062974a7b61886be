//! Reference log-softmax (MATH.md §1).

use crate::error::Op;
use crate::{Element, LogSoftmaxOptions, Result, RowProblem, RowShape};

/// Log-softmax of every row of `logits` with temperature τ, in f64, dense `[rows, cols]`:
///
/// `z = x / τ`, `m = max z`, `out_v = (z_v − m) − ln Σ_u exp(z_u − m)` (= `z_v − lse`; natural log,
/// so `out` is a log-probability in nats; `-inf` logits give `-inf`).
///
/// Errors: shape errors, and [`Error::InvalidRow`](crate::Error::InvalidRow) for the first row
/// with a NaN, a `+inf`, or only `-inf`.
///
/// ```
/// use rlhf_kernels::{reference, LogSoftmaxOptions, RowShape};
/// let out = reference::log_softmax(&[0.0f32, 0.0], RowShape::new(1, 2), &LogSoftmaxOptions::default())?;
/// assert!((out[0] - (0.5f64).ln()).abs() < 1e-15);
/// # Ok::<(), rlhf_kernels::Error>(())
/// ```
pub fn log_softmax<T: Element>(logits: &[T], shape: RowShape, opts: &LogSoftmaxOptions) -> Result<Vec<f64>> {
    shape.check_buffer("logits", logits.len())?;
    let tau = opts.inv_temperature().map(|_| opts.temperature as f64)?;
    let mut out = Vec::with_capacity(shape.len());
    for r in 0..shape.rows {
        let z: Vec<f64> = logits[shape.row_range(r)].iter().map(|x| x.to_f64() / tau).collect();
        let (m, ln_sum) = row_lse(&z).map_err(|p| Op::LogSoftmax.invalid_row(r, p))?;
        out.extend(z.iter().map(|z| (z - m) - ln_sum));
    }
    Ok(out)
}

/// Gradient of `Σ_v grad_out_v · log_softmax(x)_v` with respect to the logits, in f64,
/// dense `[rows, cols]`:
///
/// `grad_v = (g_v − softmax(z)_v · Σ_u g_u) / τ`.
///
/// Unlike the fast backends, which reuse the forward output, the reference recomputes the
/// softmax from the logits. `grad_out` is dense `[rows, cols]`.
///
/// Errors: those of [`log_softmax`], and [`RowProblem::GradNonFinite`] for a row whose
/// upstream gradient is not finite.
///
/// ```
/// use rlhf_kernels::{reference, LogSoftmaxOptions, RowShape};
/// // d/dx of log_softmax(x)_0 at x = (0, 0) is (1 - 1/2, -1/2).
/// let g = reference::log_softmax_backward(&[0.0f32, 0.0], RowShape::new(1, 2), &[1.0, 0.0],
///                                          &LogSoftmaxOptions::default())?;
/// assert_eq!(g, vec![0.5, -0.5]);
/// # Ok::<(), rlhf_kernels::Error>(())
/// ```
pub fn log_softmax_backward<T: Element>(
    logits: &[T],
    shape: RowShape,
    grad_out: &[f32],
    opts: &LogSoftmaxOptions,
) -> Result<Vec<f64>> {
    shape.check_buffer("logits", logits.len())?;
    shape.dense().check_buffer("grad_out", grad_out.len())?;
    let tau = opts.inv_temperature().map(|_| opts.temperature as f64)?;
    let mut grad = Vec::with_capacity(shape.len());
    for r in 0..shape.rows {
        let z: Vec<f64> = logits[shape.row_range(r)].iter().map(|x| x.to_f64() / tau).collect();
        let (m, ln_sum) = row_lse(&z).map_err(|p| Op::LogSoftmaxBackward.invalid_row(r, p))?;
        let g = &grad_out[r * shape.cols..(r + 1) * shape.cols];
        let total: f64 = g.iter().map(|&g| g as f64).sum();
        if !total.is_finite() {
            return Err(Op::LogSoftmaxBackward.invalid_row(r, RowProblem::GradNonFinite));
        }
        grad.extend(z.iter().zip(g).map(|(z, &g)| (g as f64 - ((z - m) - ln_sum).exp() * total) / tau));
    }
    Ok(grad)
}

/// `(m, ln Σ exp(z − m))` of one row with `m = max z` (so `lse = m + ln Σ exp(z − m)`), or
/// the row's problem (NaN first, then +inf, then all −inf). Callers form `(z − m) − ln Σ`
/// rather than `z − lse`, which would lose every digit when |m| ≫ 1.
pub(crate) fn row_lse(z: &[f64]) -> Result<(f64, f64), RowProblem> {
    if z.iter().any(|z| z.is_nan()) {
        return Err(RowProblem::NaN);
    }
    if z.contains(&f64::INFINITY) {
        return Err(RowProblem::PosInf);
    }
    let m = z.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if m == f64::NEG_INFINITY {
        return Err(RowProblem::AllNegInf);
    }
    Ok((m, z.iter().map(|z| (z - m).exp()).sum::<f64>().ln()))
}
