//! CPU log-softmax (MATH.md §1): one online pass for (max, Σ exp) per row in blocks that stay
//! in L1, then one pass that writes the output.

use rayon::prelude::*;

use super::simd::{self, LANES, LOG2E, dispatch};
use super::{first_problem, rows_per_task};
use crate::error::Op;
use crate::{Element, LogSoftmaxOptions, Result, RowProblem, RowShape};

/// Elements converted to f32 and processed per step of a row (a multiple of [`LANES`]).
const BLOCK: usize = 512;

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
            backward_row(&out[row.clone()], &grad_out[row], &mut dx[..cols], inv_tau)
                .map(|p| (r, p))
        })
        .reduce(|| None, first_problem);
    match problem {
        Some((r, p)) => Err(Op::LogSoftmaxBackward.invalid_row(r, p)),
        None => Ok(()),
    }
}

dispatch!(fn forward_row<T: Element>(x: &[T], y: &mut [f32], inv_tau: f32) -> Option<RowProblem> = forward_row_generic);
dispatch!(fn backward_row<T: Element>(y: &[f32], g: &[f32], dx: &mut [T], inv_tau: f32) -> Option<RowProblem> = backward_row_generic);

/// Online (max, Σ 2^((x − max)·c)) over one row, c = log2(e)/τ, in blocks of [`BLOCK`]
/// elements and [`LANES`] accumulators. Returns (max, sum, nan seen, +inf seen).
#[inline(always)]
fn online_lse<T: Element>(x: &[T], c: f32) -> (f32, f32, bool, bool) {
    let mut buf = [0.0f32; BLOCK];
    let mut m = f32::NEG_INFINITY;
    let mut acc = [0.0f32; LANES];
    let (mut nan, mut pos_inf) = (false, false);
    for chunk in x.chunks(BLOCK) {
        let n = chunk.len();
        T::slice_to_f32(chunk, &mut buf[..n]);
        let padded = n.next_multiple_of(LANES);
        buf[n..padded].fill(f32::NEG_INFINITY);
        let block = &buf[..padded];

        let mut mx = [f32::NEG_INFINITY; LANES];
        let (mut any_nan, mut any_inf) = ([false; LANES], [false; LANES]);
        for v in block.chunks_exact(LANES) {
            for j in 0..LANES {
                mx[j] = mx[j].max(v[j]);
                any_nan[j] |= v[j].is_nan();
                any_inf[j] |= v[j] == f32::INFINITY;
            }
        }
        nan |= any_nan.contains(&true);
        pos_inf |= any_inf.contains(&true);
        let bm = simd::max_lanes(&mx);
        if bm == f32::NEG_INFINITY {
            continue; // the whole block is -inf: contributes 0
        }
        if bm > m {
            let scale = if m == f32::NEG_INFINITY {
                0.0
            } else {
                simd::exp2((m - bm) * c)
            };
            acc.iter_mut().for_each(|a| *a *= scale);
            m = bm;
        }
        for v in block.chunks_exact(LANES) {
            for j in 0..LANES {
                acc[j] += simd::exp2((v[j] - m) * c);
            }
        }
    }
    (m, simd::sum_lanes(&acc), nan, pos_inf)
}

#[inline(always)]
fn forward_row_generic<T: Element>(x: &[T], y: &mut [f32], inv_tau: f32) -> Option<RowProblem> {
    let (m, s, nan, pos_inf) = online_lse(x, inv_tau * LOG2E);
    let problem = if nan {
        Some(RowProblem::NaN)
    } else if pos_inf {
        Some(RowProblem::PosInf)
    } else if m == f32::NEG_INFINITY {
        Some(RowProblem::AllNegInf)
    } else {
        None
    };
    if problem.is_some() {
        return problem;
    }
    let ln_s = s.ln();
    let mut buf = [0.0f32; BLOCK];
    for (xs, ys) in x.chunks(BLOCK).zip(y.chunks_mut(BLOCK)) {
        let b = &mut buf[..xs.len()];
        T::slice_to_f32(xs, b);
        for (o, &v) in ys.iter_mut().zip(b.iter()) {
            *o = (v - m) * inv_tau - ln_s;
        }
    }
    None
}

#[inline(always)]
fn backward_row_generic<T: Element>(
    y: &[f32],
    g: &[f32],
    dx: &mut [T],
    inv_tau: f32,
) -> Option<RowProblem> {
    let mut acc = [0.0f32; LANES];
    let mut bad = [false; LANES];
    let (body, tail) = (g.chunks_exact(LANES), g.len() % LANES);
    let ys = y.chunks_exact(LANES);
    for (gv, yv) in body.zip(ys) {
        for j in 0..LANES {
            acc[j] += gv[j];
            bad[j] |= yv[j].is_nan() || yv[j] == f32::INFINITY;
        }
    }
    let start = g.len() - tail;
    for j in 0..tail {
        acc[j] += g[start + j];
        bad[j] |= y[start + j].is_nan() || y[start + j] == f32::INFINITY;
    }
    if bad.contains(&true) {
        return Some(RowProblem::NaN);
    }
    let total = simd::sum_lanes(&acc);
    if !total.is_finite() {
        return Some(RowProblem::GradNonFinite);
    }
    let mut buf = [0.0f32; BLOCK];
    for ((yb, gb), db) in y
        .chunks(BLOCK)
        .zip(g.chunks(BLOCK))
        .zip(dx.chunks_mut(BLOCK))
    {
        let b = &mut buf[..yb.len()];
        for ((o, &yv), &gv) in b.iter_mut().zip(yb).zip(gb) {
            *o = (gv - simd::exp2(yv * LOG2E) * total) * inv_tau;
        }
        T::slice_from_f32(b, db);
    }
    None
}
