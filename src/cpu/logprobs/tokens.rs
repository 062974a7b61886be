//! CPU token log-probabilities, entropy and lse (MATH.md §1): one pass over each row with an
//! online (max, Σ e, Σ e·d), and a one-pass backward, optionally in place.

use std::marker::PhantomData;

use rayon::prelude::*;

use crate::cpu::simd::{self, BLOCK, Blocks, LANES, LOG2E, dispatch};
use crate::cpu::{first_problem, rows_per_task};
use crate::error::Op;
use crate::logprobs::check_len;
use crate::{
    Element, Error, Result, RowProblem, RowShape, TargetIndex, TokenGrads, TokenLogprobsOptions,
    TokenOutputs, TokenStats, Tokens, VocabPartial,
};

/// Log-probability of each row's target, the row's entropy and its log-sum-exp, for any subset
/// requested in `out`, with `z = logits / τ`:
///
/// `logp = z_y − lse`, `H = lse − Σ_v p_v·z_v`, `lse = ln Σ_v exp(z_v)` (nats).
///
/// One pass over each row (online max and sums in blocks that stay in L1), rows in parallel;
/// nothing of size `[N, V]` is allocated. Padding rows (mask 0 or ignore index) are not read
/// and give 0. A target whose logit is `-inf` gives `logp = -inf`. Requesting `logp` alone
/// skips the entropy's arithmetic.
///
/// Errors: shape errors; [`Error::TargetOutOfRange`] for the first real row whose target is
/// outside `[0, V)` (checked before any work); [`Error::InvalidRow`] for the lowest row with a
/// NaN, a `+inf` or only `-inf` (outputs then unspecified).
///
/// ```
/// use rlhf_kernels::{cpu, RowShape, TokenLogprobsOptions, TokenOutputs, Tokens};
/// let logits = [2.0f32, 1.0, 0.0, f32::NEG_INFINITY, /* row 1 */ 0.0, 0.0, 0.0, 0.0];
/// let targets = [0i64, -100]; // row 1 is padding
/// let (mut logp, mut entropy) = ([0.0f32; 2], [0.0f32; 2]);
/// cpu::token_logprobs(&logits, RowShape::new(2, 4), &Tokens::new(&targets),
///                     TokenOutputs::default().logp(&mut logp).entropy(&mut entropy),
///                     &TokenLogprobsOptions::default())?;
/// assert!((logp[0] - (-0.4076)).abs() < 1e-4 && logp[1] == 0.0 && entropy[1] == 0.0);
/// # Ok::<(), rlhf_kernels::Error>(())
/// ```
pub fn token_logprobs<T: Element, I: TargetIndex>(
    logits: &[T],
    shape: RowShape,
    tokens: &Tokens<'_, I>,
    out: TokenOutputs<'_>,
    opts: &TokenLogprobsOptions,
) -> Result<()> {
    shape.check_buffer("logits", logits.len())?;
    tokens.check(shape.rows)?;
    let writers = RowWriters::new(out, shape.rows)?;
    let inv_tau = opts.inv_temperature()?;
    tokens.validate(shape.cols, opts.ignore_index)?;
    let with_entropy = writers.entropy.is_some();
    let problem = (0..shape.rows)
        .into_par_iter()
        .with_min_len(rows_per_task(shape.cols))
        .map(|r| {
            let stats = if tokens.masked(r, opts.ignore_index) {
                TokenStats { logp: 0.0, entropy: 0.0, lse: 0.0 }
            } else {
                let x = &logits[shape.row_range(r)];
                let y = tokens.targets[r].to_i64() as usize;
                match with_target(partial(x, inv_tau, with_entropy), x, y).finish_with(inv_tau) {
                    Ok(stats) => stats,
                    Err(problem) => return Some((r, problem)),
                }
            };
            // SAFETY: the parallel iterator visits each row index exactly once.
            unsafe { writers.set(r, stats) };
            None
        })
        .reduce(|| None, first_problem);
    match problem {
        Some((r, p)) => Err(Op::TokenLogprobs.invalid_row(r, p)),
        None => Ok(()),
    }
}

/// Backward of [`token_logprobs`]: writes into `grad_logits` (the logits' shape and dtype)
///
/// `grad_v = (g_logp·(1[v = y] − p_v) − g_H·p_v·(z_v − Σ_u p_u·z_u)) / τ`,
///
/// with `p_v = exp(z_v − lse)` and `z_v − Σ p·z = (z_v − lse) + H` from the saved `lse` and
/// `H` (a term with `p_v = 0` contributes 0). One pass over each row; f32 arithmetic, one
/// rounding at the store; padding rows get 0; the padding between `cols` and the row stride
/// is never written.
///
/// Errors: shape errors, a missing upstream gradient, [`Error::TargetOutOfRange`], and
/// [`Error::InvalidRow`] for the lowest real row with a non-finite saved `lse`/`H` or a
/// non-finite upstream gradient.
///
/// ```
/// use rlhf_kernels::{cpu, RowShape, TokenGrads, TokenLogprobsOptions, Tokens};
/// let logits = [0.0f32, 0.0];
/// let lse = [2f32.ln()];
/// let mut grad = [0.0f32; 2];
/// cpu::token_logprobs_backward(&logits, RowShape::new(1, 2), &Tokens::new(&[0u32]),
///                              &TokenGrads::new(&lse).grad_logp(&[1.0]), &mut grad,
///                              &TokenLogprobsOptions::default())?;
/// assert!((grad[0] - 0.5).abs() < 1e-6 && (grad[1] + 0.5).abs() < 1e-6);
/// # Ok::<(), rlhf_kernels::Error>(())
/// ```
pub fn token_logprobs_backward<T: Element, I: TargetIndex>(
    logits: &[T],
    shape: RowShape,
    tokens: &Tokens<'_, I>,
    grads: &TokenGrads<'_>,
    grad_logits: &mut [T],
    opts: &TokenLogprobsOptions,
) -> Result<()> {
    shape.check_buffer("logits", logits.len())?;
    shape.check_buffer("grad_logits", grad_logits.len())?;
    backward(Some(logits), grad_logits, shape, tokens, grads, opts)
}

/// [`token_logprobs_backward`] written over the logits themselves: no gradient buffer at all.
/// Each row is read and overwritten block by block; the result equals the out-of-place
/// backward bit for bit.
///
/// ```
/// use rlhf_kernels::{cpu, RowShape, TokenGrads, TokenLogprobsOptions, Tokens};
/// let mut logits = [0.0f32, 0.0];
/// let lse = [2f32.ln()];
/// cpu::token_logprobs_backward_in_place(&mut logits, RowShape::new(1, 2), &Tokens::new(&[0u32]),
///                                       &TokenGrads::new(&lse).grad_logp(&[1.0]),
///                                       &TokenLogprobsOptions::default())?;
/// assert!((logits[0] - 0.5).abs() < 1e-6); // now the gradient
/// # Ok::<(), rlhf_kernels::Error>(())
/// ```
pub fn token_logprobs_backward_in_place<T: Element, I: TargetIndex>(
    logits: &mut [T],
    shape: RowShape,
    tokens: &Tokens<'_, I>,
    grads: &TokenGrads<'_>,
    opts: &TokenLogprobsOptions,
) -> Result<()> {
    shape.check_buffer("logits", logits.len())?;
    backward(None, logits, shape, tokens, grads, opts)
}

/// Per-row [`VocabPartial`]s of a vocabulary shard: `logits` holds columns
/// `[vocab_offset, vocab_offset + cols)` of the full vocabulary. Padding rows give
/// [`VocabPartial::EMPTY`]. Row problems are carried in the flags (reported by
/// [`finish_vocab_partials`] or [`VocabPartial::finish`]). See [`VocabPartial`] for the
/// tensor-parallel recipe.
pub fn vocab_shard_partials<T: Element, I: TargetIndex>(
    logits: &[T],
    shape: RowShape,
    tokens: &Tokens<'_, I>,
    vocab_offset: usize,
    partials: &mut [VocabPartial],
    opts: &TokenLogprobsOptions,
) -> Result<()> {
    shape.check_buffer("logits", logits.len())?;
    tokens.check(shape.rows)?;
    check_len("partials", partials.len(), shape.rows)?;
    let offset = crate::logprobs::check_vocab_offset(vocab_offset, shape.cols)?;
    let inv_tau = opts.inv_temperature()?;
    partials.par_iter_mut().enumerate().with_min_len(rows_per_task(shape.cols)).for_each(|(r, out)| {
        *out = if tokens.masked(r, opts.ignore_index) {
            VocabPartial::EMPTY
        } else {
            let x = &logits[shape.row_range(r)];
            let local = tokens.targets[r].to_i64() - offset;
            let p = partial(x, inv_tau, true);
            if (0..shape.cols as i64).contains(&local) { with_target(p, x, local as usize) } else { p }
        };
    });
    Ok(())
}

/// Merges the partials of `shards` vocabulary shards (layout `[shards][rows]`, shard order)
/// and writes the requested outputs, as [`token_logprobs`] would for the whole vocabulary.
///
/// Errors: [`Error::InvalidRow`] for the lowest real row with a NaN, a `+inf`, only `-inf`,
/// or a target no shard holds ([`RowProblem::TargetOutOfRange`]).
pub fn finish_vocab_partials<I: TargetIndex>(
    partials: &[VocabPartial],
    shards: usize,
    tokens: &Tokens<'_, I>,
    out: TokenOutputs<'_>,
    opts: &TokenLogprobsOptions,
) -> Result<()> {
    let rows = tokens.targets.len();
    tokens.check(rows)?;
    let total = shards.checked_mul(rows).ok_or(Error::TooLarge {
        what: "shards * rows",
        value: usize::MAX,
        max: usize::MAX,
    })?;
    check_len("partials", partials.len(), total)?;
    let writers = RowWriters::new(out, rows)?;
    let inv_tau = opts.inv_temperature()?;
    let problem = (0..rows)
        .into_par_iter()
        .map(|r| {
            let stats = if tokens.masked(r, opts.ignore_index) {
                TokenStats { logp: 0.0, entropy: 0.0, lse: 0.0 }
            } else {
                let merged = (0..shards)
                    .fold(VocabPartial::EMPTY, |acc, s| acc.merge(&partials[s * rows + r], inv_tau));
                match merged.finish_with(inv_tau) {
                    Ok(stats) => stats,
                    Err(problem) => return Some((r, problem)),
                }
            };
            // SAFETY: the parallel iterator visits each row index exactly once.
            unsafe { writers.set(r, stats) };
            None
        })
        .reduce(|| None, first_problem);
    match problem {
        Some((r, p)) => Err(Op::TokenLogprobs.invalid_row(r, p)),
        None => Ok(()),
    }
}

fn with_target<T: Element>(mut p: VocabPartial, x: &[T], local: usize) -> VocabPartial {
    p.target_logit = x[local].to_f32();
    p.flags |= VocabPartial::HAS_TARGET;
    p
}

fn partial<T: Element>(x: &[T], inv_tau: f32, with_entropy: bool) -> VocabPartial {
    if with_entropy { row_partial_entropy(x, inv_tau) } else { row_partial_logp(x, inv_tau) }
}

dispatch!(fn row_partial_logp<T: Element>(x: &[T], inv_tau: f32) -> VocabPartial = row_partial_no_entropy);
dispatch!(fn row_partial_entropy<T: Element>(x: &[T], inv_tau: f32) -> VocabPartial = row_partial_with_entropy);

#[inline(always)]
fn row_partial_no_entropy<T: Element>(x: &[T], inv_tau: f32) -> VocabPartial {
    row_partial_generic::<T, false>(x, inv_tau)
}

#[inline(always)]
fn row_partial_with_entropy<T: Element>(x: &[T], inv_tau: f32) -> VocabPartial {
    row_partial_generic::<T, true>(x, inv_tau)
}

/// The [`VocabPartial`] of a whole row (no target): block max, rescale of the [`LANES`]
/// accumulators when the max grows, then `Σ e` (and `Σ e·d`) over the block.
///
/// The hot loop carries no NaN/inf flags: a NaN or `+inf` turns `Σ e` into NaN (or the max
/// into `+inf`), and only then is the row scanned again to tell which.
#[inline(always)]
fn row_partial_generic<T: Element, const ENTROPY: bool>(x: &[T], inv_tau: f32) -> VocabPartial {
    let mut m = f32::NEG_INFINITY;
    let (mut acc_s, mut acc_t) = ([0.0f32; LANES], [0.0f32; LANES]);
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
            if m != f32::NEG_INFINITY {
                let shift = (m - bm) * inv_tau;
                let scale = simd::exp2(shift * LOG2E);
                for j in 0..LANES {
                    if ENTROPY {
                        // Rescaled to 0: contributes 0 (never 0·(-inf) when shift·s overflows).
                        acc_t[j] = if scale > 0.0 { scale * shift.mul_add(acc_s[j], acc_t[j]) } else { 0.0 };
                    }
                    acc_s[j] *= scale;
                }
            }
            m = bm;
        }
        if m == f32::NEG_INFINITY {
            continue; // all -inf so far: contributes 0
        }
        for v in block.chunks_exact(LANES) {
            for j in 0..LANES {
                let d = (v[j] - m) * inv_tau;
                let e = simd::exp2(d * LOG2E);
                acc_s[j] += e;
                if ENTROPY {
                    acc_t[j] = e.mul_add(d.max(-1e30), acc_t[j]); // exp(-inf)·(-inf) is 0, not NaN
                }
            }
        }
    }
    let (s, t) = (simd::sum_lanes(&acc_s), simd::sum_lanes(&acc_t));
    // An all-NaN row leaves m at -inf (max ignores NaN): scan those too.
    let flags = if s.is_nan() || m == f32::INFINITY || m == f32::NEG_INFINITY {
        if x.iter().any(|v| v.to_f32().is_nan()) {
            VocabPartial::NAN
        } else if m == f32::INFINITY {
            VocabPartial::POS_INF
        } else {
            0 // only -inf: finish reports it
        }
    } else {
        0
    };
    VocabPartial { max_logit: m, sum_exp: s, sum_exp_d: t, target_logit: 0.0, flags }
}

/// The scalars one row's backward needs.
#[derive(Clone, Copy)]
struct RowGrad {
    target: usize,
    lse: f32,
    entropy: f32,
    grad_logp: f32,
    grad_entropy: f32,
    inv_tau: f32,
}

fn backward<T: Element, I: TargetIndex>(
    logits: Option<&[T]>,
    grad_logits: &mut [T],
    shape: RowShape,
    tokens: &Tokens<'_, I>,
    grads: &TokenGrads<'_>,
    opts: &TokenLogprobsOptions,
) -> Result<()> {
    tokens.check(shape.rows)?;
    grads.check(shape.rows)?;
    let inv_tau = opts.inv_temperature()?;
    tokens.validate(shape.cols, opts.ignore_index)?;
    let cols = shape.cols;
    let problem = grad_logits
        .par_chunks_mut(shape.row_stride)
        .enumerate()
        .with_min_len(rows_per_task(cols))
        .map(|(r, dx)| {
            let dx = &mut dx[..cols];
            if tokens.masked(r, opts.ignore_index) {
                dx.fill(T::from_f32(0.0));
                return None;
            }
            let g = RowGrad {
                target: tokens.targets[r].to_i64() as usize,
                lse: grads.lse[r],
                entropy: grads.grad_entropy.and(grads.entropy).map_or(0.0, |h| h[r]),
                grad_logp: grads.grad_logp.map_or(0.0, |g| g[r]),
                grad_entropy: grads.grad_entropy.map_or(0.0, |g| g[r]),
                inv_tau,
            };
            if !(g.lse.is_finite() && g.entropy.is_finite()) {
                return Some((r, RowProblem::NaN));
            }
            if !(g.grad_logp.is_finite() && g.grad_entropy.is_finite()) {
                return Some((r, RowProblem::GradNonFinite));
            }
            let fits = backward_row(logits.map(|x| &x[shape.row_range(r)]), dx, g);
            (!fits).then_some((r, RowProblem::Overflow))
        })
        .reduce(|| None, first_problem);
    match problem {
        Some((r, p)) => Err(Op::TokenLogprobsBackward.invalid_row(r, p)),
        None => Ok(()),
    }
}

dispatch!(fn backward_row<T: Element>(x: Option<&[T]>, dx: &mut [T], g: RowGrad) -> bool = backward_row_generic);

/// One row of the backward; `x = None` reads the logits from `dx` itself (in place: every
/// element is read before it is overwritten). f32 rows are computed straight into `dx`;
/// f16/bf16 rows go through L1-sized f32 blocks.
#[inline(always)]
fn backward_row_generic<T: Element>(x: Option<&[T]>, dx: &mut [T], g: RowGrad) -> bool {
    #[inline(always)]
    fn grad_of(z: f32, g: &RowGrad, hit: f32) -> f32 {
        let a = z.mul_add(g.inv_tau, -g.lse); // z_v − lse
        let p = simd::exp2(a * LOG2E);
        let h = if p > 0.0 { p * (a + g.entropy) } else { 0.0 };
        g.inv_tau * (g.grad_logp * (hit - p) - g.grad_entropy * h)
    }
    let target_z = match x {
        Some(x) => x[g.target].to_f32(),
        None => dx[g.target].to_f32(),
    };
    // Whether every gradient fits the logits' dtype (a finite upstream gradient times a large
    // 1/τ need not).
    let mut fits = true;
    if T::CHEAP_SCALAR_CONVERT {
        let mut put = |o: &mut T, z: f32| {
            let v = grad_of(z, &g, 0.0);
            fits &= T::fits(v);
            *o = T::from_f32(v);
        };
        match x {
            Some(src) => dx.iter_mut().zip(src).for_each(|(o, z)| put(o, z.to_f32())),
            None => dx.iter_mut().for_each(|o| put(o, o.to_f32())),
        }
    } else {
        let (mut z, mut out) = ([0.0f32; BLOCK], [0.0f32; BLOCK]);
        let mut start = 0;
        while start < dx.len() {
            let n = BLOCK.min(dx.len() - start);
            let range = start..start + n;
            match x {
                Some(x) => T::slice_to_f32(&x[range.clone()], &mut z[..n]),
                None => T::slice_to_f32(&dx[range.clone()], &mut z[..n]),
            }
            for (o, &zv) in out[..n].iter_mut().zip(&z[..n]) {
                *o = grad_of(zv, &g, 0.0);
                fits &= T::fits(*o);
            }
            T::slice_from_f32(&out[..n], &mut dx[range]);
            start += n;
        }
    }
    // The target's own term, 1[v = y]: recomputed from its logit, read before the row was
    // overwritten.
    let target = grad_of(target_z, &g, 1.0);
    dx[g.target] = T::from_f32(target);
    fits && T::fits(target)
}

/// The per-row outputs of a forward, written from parallel tasks.
struct RowWriters<'a> {
    logp: Option<RowWriter<'a>>,
    entropy: Option<RowWriter<'a>>,
    lse: Option<RowWriter<'a>>,
}

impl<'a> RowWriters<'a> {
    fn new(out: TokenOutputs<'a>, rows: usize) -> Result<Self> {
        out.check(rows)?;
        let wrap = |what, o: Option<&'a mut [f32]>| o.map(|s| RowWriter::new(what, s, rows)).transpose();
        Ok(RowWriters {
            logp: wrap("logp", out.logp)?,
            entropy: wrap("entropy", out.entropy)?,
            lse: wrap("lse", out.lse)?,
        })
    }

    /// # Safety
    /// No other thread writes row `r` at the same time.
    unsafe fn set(&self, r: usize, s: TokenStats) {
        for (w, v) in [(&self.logp, s.logp), (&self.entropy, s.entropy), (&self.lse, s.lse)] {
            if let Some(w) = w {
                // SAFETY: forwarded from the caller.
                unsafe { w.set(r, v) };
            }
        }
    }
}

/// One `rows`-long f32 output, shared by the tasks of a parallel loop over rows.
struct RowWriter<'a> {
    ptr: *mut f32,
    len: usize,
    _borrow: PhantomData<&'a mut [f32]>,
}

// SAFETY: a RowWriter is a `&'a mut [f32]` in disguise; sending or sharing it across threads
// is sound because every write goes through `set`, whose contract forbids two concurrent
// writes to the same element.
unsafe impl Send for RowWriter<'_> {}
// SAFETY: as above.
unsafe impl Sync for RowWriter<'_> {}

impl<'a> RowWriter<'a> {
    fn new(what: &'static str, s: &'a mut [f32], rows: usize) -> Result<Self> {
        check_len(what, s.len(), rows)?;
        Ok(RowWriter { ptr: s.as_mut_ptr(), len: s.len(), _borrow: PhantomData })
    }

    /// # Safety
    /// No other thread writes element `r` at the same time.
    unsafe fn set(&self, r: usize, v: f32) {
        assert!(r < self.len, "row {r} out of {}", self.len);
        // SAFETY: r < len, the slice is mutably borrowed for 'a, and the caller guarantees
        // that no other write to element r races with this one.
        unsafe { self.ptr.add(r).write(v) };
    }
}
