//! Reference log-softmax (MATH.md §1).

use crate::error::Op;
use crate::logprobs::check_grads_present;
use crate::logprobs::check_len;
use crate::{
    Element, LogSoftmaxOptions, Result, RowProblem, RowShape, TargetIndex, TokenLogprobsOptions, Tokens,
};

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

/// Per-row results of [`token_logprobs`], in f64.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct TokenLogprobs {
    /// `log softmax(z)[y]` per row (0 for padding rows).
    pub logp: Vec<f64>,
    /// Entropy `H = lse − Σ_v p_v·z_v` per row (0 for padding rows).
    pub entropy: Vec<f64>,
    /// `lse = ln Σ_v exp(z_v)` per row (0 for padding rows).
    pub lse: Vec<f64>,
}

/// Log-probability of each row's target, the row's entropy and its log-sum-exp, in f64, with
/// `z = logits / τ`:
///
/// `logp = z_y − lse`, `H = lse − Σ_v p_v·z_v` (terms with `p_v = 0` are 0), `lse = ln Σ_v exp(z_v)`
/// (all in nats). Padding rows (mask 0 or ignore index) give 0. A target whose logit is `-inf`
/// gives `logp = -inf`.
///
/// Errors: shape errors; [`Error::TargetOutOfRange`](crate::Error::TargetOutOfRange) for the
/// first real row with a target outside `[0, V)`; [`Error::InvalidRow`](crate::Error) for
/// the first real row with a NaN, a `+inf` or only `-inf`.
///
/// ```
/// use rlhf_kernels::{reference, RowShape, TokenLogprobsOptions, Tokens};
/// let r = reference::token_logprobs(&[0.0f32, 0.0], RowShape::new(1, 2), &Tokens::new(&[1i64]),
///                                   &TokenLogprobsOptions::default())?;
/// assert!((r.logp[0] - 0.5f64.ln()).abs() < 1e-15 && (r.entropy[0] - 2f64.ln()).abs() < 1e-15);
/// # Ok::<(), rlhf_kernels::Error>(())
/// ```
pub fn token_logprobs<T: Element, I: TargetIndex>(
    logits: &[T],
    shape: RowShape,
    tokens: &Tokens<'_, I>,
    opts: &TokenLogprobsOptions,
) -> Result<TokenLogprobs> {
    shape.check_buffer("logits", logits.len())?;
    tokens.check(shape.rows)?;
    let tau = opts.inv_temperature().map(|_| opts.temperature as f64)?;
    tokens.validate(shape.cols, opts.ignore_index)?;
    let mut out = TokenLogprobs::default();
    for r in 0..shape.rows {
        let (logp, entropy, lse) = if tokens.masked(r, opts.ignore_index) {
            (0.0, 0.0, 0.0)
        } else {
            let row = RowF64::new(&logits[shape.row_range(r)], tau)
                .map_err(|p| Op::TokenLogprobs.invalid_row(r, p))?;
            let y = tokens.targets[r].to_i64() as usize;
            if !super::fits_f32(row.m + row.ln_sum) {
                return Err(Op::TokenLogprobs.invalid_row(r, RowProblem::Overflow));
            }
            ((row.z[y] - row.m) - row.ln_sum, row.ln_sum - row.mean_shifted_z, row.m + row.ln_sum)
        };
        out.logp.push(logp);
        out.entropy.push(entropy);
        out.lse.push(lse);
    }
    Ok(out)
}

/// Gradient with respect to the logits of `Σ_n g_logp[n]·logp[n] + g_H[n]·H[n]`, in f64,
/// dense `[rows, cols]`:
///
/// `grad_v = (g_logp·(1[v = y] − p_v) − g_H·p_v·(z_v − Σ_u p_u·z_u)) / τ`
///
/// (a term with `p_v = 0` contributes 0). Padding rows get 0. At least one of `grad_logp`,
/// `grad_entropy` (each `rows` f32) is required.
///
/// ```
/// use rlhf_kernels::{reference, RowShape, TokenLogprobsOptions, Tokens};
/// // d logp / d logits at z = (0, 0), target 0: (1 - 1/2, -1/2).
/// let g = reference::token_logprobs_backward(&[0.0f32, 0.0], RowShape::new(1, 2), &Tokens::new(&[0i32]),
///                                            Some(&[1.0]), None, &TokenLogprobsOptions::default())?;
/// assert_eq!(g, vec![0.5, -0.5]);
/// # Ok::<(), rlhf_kernels::Error>(())
/// ```
pub fn token_logprobs_backward<T: Element, I: TargetIndex>(
    logits: &[T],
    shape: RowShape,
    tokens: &Tokens<'_, I>,
    grad_logp: Option<&[f32]>,
    grad_entropy: Option<&[f32]>,
    opts: &TokenLogprobsOptions,
) -> Result<Vec<f64>> {
    shape.check_buffer("logits", logits.len())?;
    tokens.check(shape.rows)?;
    check_grads_present(grad_logp.is_some(), grad_entropy.is_some(), true)?;
    for (what, g) in [("grad_logp", grad_logp), ("grad_entropy", grad_entropy)] {
        g.map_or(Ok(()), |g| check_len(what, g.len(), shape.rows))?;
    }
    let tau = opts.inv_temperature().map(|_| opts.temperature as f64)?;
    tokens.validate(shape.cols, opts.ignore_index)?;
    let mut grad = Vec::with_capacity(shape.len());
    for r in 0..shape.rows {
        if tokens.masked(r, opts.ignore_index) {
            grad.extend(std::iter::repeat_n(0.0, shape.cols));
            continue;
        }
        let bad = |p| Op::TokenLogprobsBackward.invalid_row(r, p);
        let row = RowF64::new(&logits[shape.row_range(r)], tau).map_err(bad)?;
        let gl = grad_logp.map_or(0.0, |g| g[r] as f64);
        let gh = grad_entropy.map_or(0.0, |g| g[r] as f64);
        if !(gl.is_finite() && gh.is_finite()) {
            return Err(bad(RowProblem::GradNonFinite));
        }
        let y = tokens.targets[r].to_i64() as usize;
        grad.extend(row.z.iter().enumerate().map(|(v, &z)| {
            let p = row.p(z);
            let hit = if v == y { 1.0 } else { 0.0 };
            let h_term = if p > 0.0 { p * ((z - row.m) - row.mean_shifted_z) } else { 0.0 };
            (gl * (hit - p) - gh * h_term) / tau
        }));
    }
    Ok(grad)
}

/// One row in f64: `z = x / τ`, `m = max z`, `ln Σ exp(z − m)` and `Σ p·(z − m)`.
struct RowF64 {
    z: Vec<f64>,
    m: f64,
    ln_sum: f64,
    mean_shifted_z: f64,
}

impl RowF64 {
    fn new<T: Element>(x: &[T], tau: f64) -> Result<Self, RowProblem> {
        let z: Vec<f64> = x.iter().map(|x| x.to_f64() / tau).collect();
        let (m, ln_sum) = row_lse(&z)?;
        let mut row = RowF64 { z, m, ln_sum, mean_shifted_z: 0.0 };
        row.mean_shifted_z = row
            .z
            .iter()
            .map(|&z| row.p(z))
            .zip(&row.z)
            .filter(|(p, _)| *p > 0.0)
            .map(|(p, z)| p * (z - m))
            .sum();
        Ok(row)
    }

    /// softmax probability of a logit `z` of this row.
    fn p(&self, z: f64) -> f64 {
        ((z - self.m) - self.ln_sum).exp()
    }
}
