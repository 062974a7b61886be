//! CPU log-softmax (MATH.md §1): one online pass for (max, Σ exp) per row in blocks that stay
//! in L1, then one pass that writes the output.

use rayon::prelude::*;

use crate::cpu::simd::{self, BLOCK, Blocks, LANES, LOG2E, dispatch};
use crate::cpu::{first_problem, rows_per_task};
use crate::error::Op;
use crate::{Element, LogSoftmaxOptions, Result, RowProblem, RowShape};

/// Log-softmax of every row of `logits` with temperature τ, into the dense `[rows, cols]` f32
/// buffer `out`:
///
/// `out_v = (x_v − max x)/τ − ln Σ_u exp((x_u − max x)/τ)` — the log-probability in nats of
/// token v under `softmax(x / τ)`. `-inf` logits (banned tokens) give `-inf`.
///
/// `logits` has `shape` (row stride may exceed cols; the padding is never read).
/// Errors: shape errors, an invalid temperature, and [`Error::InvalidRow`](crate::Error) for
/// the lowest row with a NaN, a `+inf` or only `-inf` (`out` is then unspecified).
///
/// ```
/// use rlhf_kernels::{cpu, LogSoftmaxOptions, RowShape};
/// let logits = [1.0f32, 2.0, 3.0, f32::NEG_INFINITY];
/// let mut out = [0.0f32; 4];
/// cpu::log_softmax(&logits, RowShape::new(1, 4), &mut out, &LogSoftmaxOptions::default())?;
/// let total: f32 = out.iter().map(|l| l.exp()).sum();
/// assert!((total - 1.0).abs() < 1e-6 && out[3] == f32::NEG_INFINITY);
/// # Ok::<(), rlhf_kernels::Error>(())
/// ```
pub fn log_softmax<T: Element>(
    logits: &[T],
    shape: RowShape,
    out: &mut [f32],
    opts: &LogSoftmaxOptions,
) -> Result<()> {
    shape.check_buffer("logits", logits.len())?;
    shape.dense().check_buffer("out", out.len())?;
    let inv_tau = opts.inv_temperature()?;
    let problem = out
        .par_chunks_mut(shape.cols)
        .enumerate()
        .with_min_len(rows_per_task(shape.cols))
        .map(|(r, y)| forward_row(&logits[shape.row_range(r)], y, inv_tau).map(|p| (r, p)))
        .reduce(|| None, first_problem);
    match problem {
        Some((r, p)) => Err(Op::LogSoftmax.invalid_row(r, p)),
        None => Ok(()),
    }
}

/// Backward of [`log_softmax`]: given its output `out` and the upstream gradient `grad_out`
/// (both dense `[rows, cols]` f32), writes
///
/// `grad_logits_v = (g_v − exp(out_v) · Σ_u g_u) / τ`
///
/// into `grad_logits`, which has `shape` (the logits' layout and dtype; f32 arithmetic, one
/// rounding at the store). Errors: shape errors, and [`Error::InvalidRow`](crate::Error) for
/// the lowest row whose `out` has a NaN or whose `grad_out` is not finite.
///
/// ```
/// use rlhf_kernels::{cpu, LogSoftmaxOptions, RowShape};
/// let out = [0.5f32.ln(), 0.5f32.ln()];
/// let mut grad = [0.0f32; 2];
/// cpu::log_softmax_backward(&out, &[1.0, 0.0], RowShape::new(1, 2), &mut grad,
///                           &LogSoftmaxOptions::default())?;
/// assert!((grad[0] - 0.5).abs() < 1e-6 && (grad[1] + 0.5).abs() < 1e-6);
/// # Ok::<(), rlhf_kernels::Error>(())
/// ```
pub fn log_softmax_backward<T: Element>(
    out: &[f32],
    grad_out: &[f32],
    shape: RowShape,
    grad_logits: &mut [T],
    opts: &LogSoftmaxOptions,
) -> Result<()> {
    shape.dense().check_buffer("out", out.len())?;
    shape.dense().check_buffer("grad_out", grad_out.len())?;
    shape.check_buffer("grad_logits", grad_logits.len())?;
    let inv_tau = opts.inv_temperature()?;
    let cols = shape.cols;
    let problem = grad_logits
        .par_chunks_mut(shape.row_stride)
        .enumerate()
        .with_min_len(rows_per_task(cols))
        .map(|(r, dx)| {
            let row = r * cols..(r + 1) * cols;
            backward_row(&out[row.clone()], &grad_out[row], &mut dx[..cols], inv_tau).map(|p| (r, p))
        })
        .reduce(|| None, first_problem);
    match problem {
        Some((r, p)) => Err(Op::LogSoftmaxBackward.invalid_row(r, p)),
        None => Ok(()),
    }
}

dispatch!(fn forward_row<T: Element>(x: &[T], y: &mut [f32], inv_tau: f32) -> Option<RowProblem> = forward_row_generic);
dispatch!(fn backward_row<T: Element>(y: &[f32], g: &[f32], dx: &mut [T], inv_tau: f32) -> Option<RowProblem> = backward_row_generic);

/// Online (max, Σ 2^((x − max)·c)) over one row, c = log2(e)/τ, [`LANES`] accumulators.
///
/// The hot loop carries no NaN/inf flags: a NaN or `+inf` input always turns the sum into
/// NaN (NaN directly, `+inf` through `inf − inf`), and only then is the row scanned again to
/// name the problem.
#[inline(always)]
fn online_lse<T: Element>(x: &[T], c: f32) -> Result<(f32, f32), RowProblem> {
    let mut m = f32::NEG_INFINITY;
    let mut acc = [0.0f32; LANES];
    let mut blocks = Blocks::new(x, f32::NEG_INFINITY);
    while let Some(block) = blocks.next() {
        let mut mx = [f32::NEG_INFINITY; LANES];
        for v in block.chunks_exact(LANES) {
            for j in 0..LANES {
                mx[j] = mx[j].max(v[j]);
            }
        }
        let bm = simd::max_lanes(&mx);
        if bm > m {
            let scale = if m == f32::NEG_INFINITY { 0.0 } else { simd::exp2((m - bm) * c) };
            acc.iter_mut().for_each(|a| *a *= scale);
            m = bm;
        }
        if m != f32::NEG_INFINITY {
            for v in block.chunks_exact(LANES) {
                for j in 0..LANES {
                    acc[j] += simd::exp2((v[j] - m) * c);
                }
            }
        }
    }
    let s = simd::sum_lanes(&acc);
    // An all-NaN row leaves m at -inf (max ignores NaN): scan those too.
    if s.is_nan() || m == f32::INFINITY || m == f32::NEG_INFINITY {
        return Err(classify(x, m));
    }
    Ok((m, s))
}

/// Names the problem of a row whose sum is NaN or whose max is ±inf: NaN first, then +inf,
/// then only -inf.
#[cold]
fn classify<T: Element>(x: &[T], m: f32) -> RowProblem {
    if x.iter().any(|v| v.to_f32().is_nan()) {
        RowProblem::NaN
    } else if m == f32::INFINITY {
        RowProblem::PosInf
    } else {
        RowProblem::AllNegInf
    }
}

#[inline(always)]
fn forward_row_generic<T: Element>(x: &[T], y: &mut [f32], inv_tau: f32) -> Option<RowProblem> {
    let (m, s) = match online_lse(x, inv_tau * LOG2E) {
        Ok(ms) => ms,
        Err(problem) => return Some(problem),
    };
    let ln_s = s.ln();
    let mut done = 0;
    let mut blocks = Blocks::new(x, f32::NEG_INFINITY);
    while let Some(block) = blocks.next() {
        let n = block.len().min(y.len() - done);
        for (o, &v) in y[done..done + n].iter_mut().zip(block) {
            *o = (v - m) * inv_tau - ln_s;
        }
        done += n;
    }
    None
}

#[inline(always)]
fn backward_row_generic<T: Element>(y: &[f32], g: &[f32], dx: &mut [T], inv_tau: f32) -> Option<RowProblem> {
    let mut acc = [0.0f32; LANES];
    let mut gs = g.chunks_exact(LANES);
    for gv in &mut gs {
        for j in 0..LANES {
            acc[j] += gv[j];
        }
    }
    for (a, &gv) in acc.iter_mut().zip(gs.remainder()) {
        *a += gv;
    }
    let total = simd::sum_lanes(&acc);
    // Σ y as a NaN/+inf detector, accumulated while the gradient is written: it is NaN or
    // +inf exactly when y holds a NaN or a +inf (-inf entries, banned tokens, only drive it
    // to -inf). Such a row is reported and its output discarded.
    let mut check = [0.0f32; LANES];
    let mut fits = true; // every gradient fits T (a large 1/τ can overflow it)
    let mut buf = [0.0f32; BLOCK];
    for ((yb, gb), db) in y.chunks(BLOCK).zip(g.chunks(BLOCK)).zip(dx.chunks_mut(BLOCK)) {
        let direct = T::as_f32(db).is_some();
        {
            let out = match T::as_f32_mut(db) {
                Some(direct) => direct,
                None => &mut buf[..yb.len()],
            };
            let (mut os, mut ys, mut gs) =
                (out.chunks_exact_mut(LANES), yb.chunks_exact(LANES), gb.chunks_exact(LANES));
            for ((o, yv), gv) in (&mut os).zip(&mut ys).zip(&mut gs) {
                for j in 0..LANES {
                    o[j] = (gv[j] - simd::exp2(yv[j] * LOG2E) * total) * inv_tau;
                    check[j] += yv[j];
                    fits &= T::fits(o[j]);
                }
            }
            let tail = os.into_remainder().iter_mut().zip(ys.remainder()).zip(gs.remainder());
            for (j, ((o, &yv), &gv)) in tail.enumerate() {
                *o = (gv - simd::exp2(yv * LOG2E) * total) * inv_tau;
                check[j] += yv;
                fits &= T::fits(*o);
            }
        }
        if !direct {
            T::slice_from_f32(&buf[..yb.len()], db);
        }
    }
    let check = simd::sum_lanes(&check);
    if check.is_nan() || check == f32::INFINITY {
        return Some(RowProblem::NaN);
    }
    if !total.is_finite() {
        return Some(RowProblem::GradNonFinite);
    }
    (!fits).then_some(RowProblem::Overflow)
}
