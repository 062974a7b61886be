//! CPU advantage estimation (MATH.md §3): GAE as one right-to-left pass per sequence (f64
//! state, rayon over sequences), group estimators from per-group sums in member order, masked
//! moments and whitening with a fixed merge order. Deterministic for any thread count.

use rayon::prelude::*;

use crate::advantages::non_finite;
use crate::cpu::rows_mut;
use crate::error::Op;
use crate::{
    GaeInputs, GaeOptions, GroupAdvantageOptions, Groups, MaskedSteps, Moments, Result, RowShape,
    WhitenOptions,
};

/// Where [`gae`] writes: advantages and/or returns, laid out as the inputs (`[B, T]`, same
/// row stride). Masked positions get 0.
#[derive(Debug, Default)]
pub struct GaeOutputs<'a> {
    /// `A_t`.
    pub advantages: Option<&'a mut [f32]>,
    /// `R_t = A_t + V_t`.
    pub returns: Option<&'a mut [f32]>,
}

impl<'a> GaeOutputs<'a> {
    /// Requests the advantages.
    pub fn advantages(self, a: &'a mut [f32]) -> Self {
        GaeOutputs { advantages: Some(a), ..self }
    }
    /// Requests the returns.
    pub fn returns(self, r: &'a mut [f32]) -> Self {
        GaeOutputs { returns: Some(r), ..self }
    }
}

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
/// use rlhf_kernels::{cpu, GaeInputs, GaeOptions, RowShape};
/// // One sequence, right-padded: score 1 on the last valid token, values from a critic.
/// let (values, scores, mask) = ([0.5f32, 0.5, 0.0], [1.0f32], [1u8, 1, 0]);
/// let inputs = GaeInputs::new(RowShape::new(1, 3)).scores(&scores).values(&values).mask(&mask);
/// let (mut adv, mut ret) = ([0.0f32; 3], [0.0f32; 3]);
/// cpu::gae(&inputs, cpu::GaeOutputs::default().advantages(&mut adv).returns(&mut ret), &GaeOptions::new(1.0, 1.0))?;
/// assert_eq!(adv, [0.5, 0.5, 0.0]); // A_1 = 1 − 0.5; A_0 = 0 + 0.5 − 0.5 + A_1
/// assert_eq!(ret, [1.0, 1.0, 0.0]);
/// # Ok::<(), rlhf_kernels::Error>(())
/// ```
pub fn gae(inputs: &GaeInputs<'_>, out: GaeOutputs<'_>, opts: &GaeOptions) -> Result<()> {
    inputs.validate()?;
    opts.validate()?;
    let shape = inputs.shape;
    for (what, b) in [("advantages", &out.advantages), ("returns", &out.returns)] {
        if let Some(b) = b {
            shape.check_buffer(what, b.len())?;
        }
    }
    if out.advantages.is_none() && out.returns.is_none() {
        return Err(crate::Error::InvalidOption {
            name: "outputs",
            value: "none".into(),
            expected: "advantages and/or returns",
        });
    }
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

/// A `[B, T]` per-token output (rows = sequences) and its mask (masked tokens get 0).
#[derive(Debug)]
pub struct TokenOutput<'a> {
    /// The buffer.
    pub out: &'a mut [f32],
    /// Its shape.
    pub shape: RowShape,
    /// One byte per token (0 = padding), or `None`.
    pub mask: Option<&'a [u8]>,
}

/// Where [`group_advantages`] writes: one value per sequence and/or every valid token of each
/// sequence's response.
#[derive(Debug, Default)]
pub struct GroupAdvantageOutputs<'a> {
    /// One advantage per sequence.
    pub per_sequence: Option<&'a mut [f32]>,
    /// The advantage broadcast to the tokens.
    pub per_token: Option<TokenOutput<'a>>,
}

impl<'a> GroupAdvantageOutputs<'a> {
    /// Requests one advantage per sequence.
    pub fn per_sequence(self, out: &'a mut [f32]) -> Self {
        GroupAdvantageOutputs { per_sequence: Some(out), ..self }
    }
    /// Requests the advantage on every valid token of `shape` (mask: one byte per token).
    pub fn per_token(self, out: &'a mut [f32], shape: RowShape, mask: Option<&'a [u8]>) -> Self {
        GroupAdvantageOutputs { per_token: Some(TokenOutput { out, shape, mask }), ..self }
    }
}

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
/// use rlhf_kernels::{cpu, GroupAdvantageOptions, Groups, RowShape};
/// // Two prompts, groups out of order and of unequal sizes.
/// let groups = Groups::new(&[0, 1, 0, 1, 1], 2)?;
/// let scores = [1.0f32, 0.0, 0.0, 1.0, 2.0];
/// let mut a = [0.0f32; 5];
/// let out = cpu::GroupAdvantageOutputs::default().per_sequence(&mut a);
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
    if let Some(o) = &out.per_sequence {
        crate::logprobs::check_len("per-sequence advantages", o.len(), b)?;
    }
    if let Some(TokenOutput { out: o, shape, mask }) = &out.per_token {
        shape.check_buffer("per-token advantages", o.len())?;
        crate::logprobs::check_len("per-token advantage rows", shape.rows, b)?;
        if let Some(m) = mask {
            shape.check_buffer("mask", m.len())?;
        }
    }
    if out.per_sequence.is_none() && out.per_token.is_none() {
        return Err(crate::Error::InvalidOption {
            name: "outputs",
            value: "none".into(),
            expected: "per-sequence and/or per-token advantages",
        });
    }
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

/// Chan's running moments of a set of values, in f64.
#[derive(Debug, Clone, Copy)]
struct Running {
    n: f64,
    mean: f64,
    m2: f64,
    min: f64,
    max: f64,
}

impl Running {
    const EMPTY: Running = Running { n: 0.0, mean: 0.0, m2: 0.0, min: f64::INFINITY, max: f64::NEG_INFINITY };

    /// Two passes over one row's valid values.
    fn of_row(values: &[f32], mask: Option<&[u8]>) -> Running {
        let valid = || {
            values.iter().enumerate().filter(|(j, _)| mask.is_none_or(|m| m[*j] != 0)).map(|(_, &x)| x as f64)
        };
        let n = valid().count() as f64;
        if n == 0.0 {
            return Running::EMPTY;
        }
        let mean = valid().sum::<f64>() / n;
        let m2 = valid().map(|x| (x - mean) * (x - mean)).sum();
        let (min, max) =
            valid().fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), x| (lo.min(x), hi.max(x)));
        Running { n, mean, m2, min, max }
    }

    fn merge(self, o: Running) -> Running {
        if o.n == 0.0 {
            return self;
        }
        if self.n == 0.0 {
            return o;
        }
        let n = self.n + o.n;
        let d = o.mean - self.mean;
        Running {
            n,
            mean: self.mean + d * (o.n / n),
            m2: self.m2 + o.m2 + d * d * (self.n * o.n / n),
            min: self.min.min(o.min),
            max: self.max.max(o.max),
        }
    }
}

/// Count, mean, unbiased variance, min and max over the valid tokens of a `[B, T]` batch
/// (rows = sequences; mask one byte per token, `None`: all valid). Each row in two f64
/// passes, rows merged in order (Chan): deterministic for any thread count. An empty batch
/// gives [`Moments::EMPTY`].
///
/// Errors: shape errors; [`RowProblem::NonFinite`](crate::RowProblem::NonFinite) for the
/// lowest sequence with a non-finite valid value.
///
/// ```
/// use rlhf_kernels::{cpu, RowShape};
/// let m = cpu::masked_moments(&[1.0, 9.0, 3.0, 5.0], RowShape::new(2, 2), Some(&[1, 0, 1, 1]))?;
/// assert_eq!((m.count, m.mean, m.var, m.min, m.max), (3.0, 3.0, 4.0, 1.0, 5.0));
/// # Ok::<(), rlhf_kernels::Error>(())
/// ```
pub fn masked_moments(values: &[f32], shape: RowShape, mask: Option<&[u8]>) -> Result<Moments> {
    shape.check_buffer("values", values.len())?;
    if let Some(m) = mask {
        shape.check_buffer("mask", m.len())?;
    }
    let rows: Vec<(Running, bool)> = (0..shape.rows)
        .into_par_iter()
        .map(|i| {
            let range = shape.row_range(i);
            let m = mask.map(|m| &m[range.clone()]);
            let r = Running::of_row(&values[range], m);
            (r, r.n == 0.0 || (r.mean.is_finite() && r.m2.is_finite()))
        })
        .collect();
    if let Some(i) = rows.iter().position(|(_, ok)| !ok) {
        return Err(non_finite(Op::Moments, i));
    }
    let r = rows.iter().fold(Running::EMPTY, |acc, (r, _)| acc.merge(*r));
    Ok(if r.n == 0.0 { Moments::EMPTY } else { Moments::from_m2(r.n, r.mean, r.m2, r.min, r.max) })
}

/// Whitens the valid tokens of a `[B, T]` batch in place: `x ← (x − mean)/sqrt(var + ε)`
/// (+ mean with [`WhitenOptions::keep_mean`]) with the batch's [`masked_moments`]; masked
/// tokens become 0. Returns the moments it used. A constant batch with ε = 0 whitens to 0.
///
/// Errors: those of [`masked_moments`], and an invalid ε.
///
/// ```
/// use rlhf_kernels::{cpu, RowShape, WhitenOptions};
/// let mut a = [1.0f32, 7.0, 3.0];
/// let m = cpu::whiten(&mut a, RowShape::new(1, 3), Some(&[1, 0, 1]), &WhitenOptions::default())?;
/// assert_eq!((m.mean, m.var), (2.0, 2.0));
/// assert!((a[0] + 0.70710677).abs() < 1e-6 && a[1] == 0.0 && (a[2] - 0.70710677).abs() < 1e-6);
/// # Ok::<(), rlhf_kernels::Error>(())
/// ```
pub fn whiten(
    values: &mut [f32],
    shape: RowShape,
    mask: Option<&[u8]>,
    opts: &WhitenOptions,
) -> Result<Moments> {
    opts.validate()?;
    let m = masked_moments(values, shape, mask)?;
    let (scale, shift) = opts.affine(&m);
    values.par_chunks_mut(shape.row_stride).enumerate().for_each(|(i, row)| {
        let start = shape.row_start(i);
        for (j, x) in row[..shape.cols].iter_mut().enumerate() {
            *x =
                if mask.is_none_or(|m| m[start + j] != 0) { (*x as f64 * scale + shift) as f32 } else { 0.0 };
        }
    });
    Ok(m)
}
