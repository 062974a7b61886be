//! The advantages family's shared vocabulary (MATH.md §3): GAE options and inputs, the
//! outcome-reward estimators over groups, masked moments for whitening, and DAPO's overlong
//! shaping of the outcome scores ([`OverlongOptions`]).
//!
//! # GAE as a scan
//!
//! For one sequence with a response mask, only valid steps take part; `next(t)` is the next
//! valid step after `t`:
//!
//! ```text
//! δ_t = r_t + γ·V_next(t) − V_t        A_t = δ_t + γλ·A_next(t)        R_t = A_t + V_t
//! ```
//!
//! (`V_next` and `A_next` are 0 after the last valid step; outputs at masked positions are 0.)
//! Written over *all* positions, right to left, the state `(A, W, Y)` — the advantage and the
//! value of the first valid step at or after `t`, and `Y = 1` while there is none — obeys an
//! affine map per position: a valid step sets `A ← γλ·A + γ·W + score·Y + r_t − V_t`,
//! `W ← V_t`, `Y ← 0` (so the sequence score lands on the last valid step inside the same
//! scan); a masked step leaves the state alone ([`MaskedSteps::PassThrough`], verl's and
//! NeMo-RL's loop) or resets `A` and `W` there ([`MaskedSteps::Reset`], the OpenRLHF
//! convention). The state beyond the end is `(0, 0, 1)`. Affine maps compose associatively, so
//! the GPU scans long sequences in parallel (per-thread runs, warp and block scans, then the
//! state entering each 1024-position chunk).
//!
//! **Precision.** The CPU runs the recurrence in f64 and rounds once: within one f32 rounding
//! of the f64 reference. The GPU composes in f32; its error at `t` is at most
//! `K(T)·2⁻²⁴·Ā_t`, where `Ā_t` is the same recurrence run on absolute values
//! (`|r_k| + |V_k| + γ·|V_next(k)|` discounted by `(γλ)^j`, see [`gae_error_scale`]) and
//! `K(T) = 2·(24 + ⌈T/1024⌉)` counts the roundings on the longest composition path (4 steps
//! per thread, 5 warp and 8 block levels, 7 warp carries, one carry per 1024-step chunk).
//!
//! # Outcome estimators
//!
//! `G` responses to one prompt share a group; groups are given by an index per sequence
//! ([`Groups`]: any order, any sizes). With scores `s_1..s_G` of a group:
//!
//! | [`GroupEstimator`] | advantage of response `i` | a group of one |
//! | --- | --- | --- |
//! | `Grpo { std: Unbiased, eps }` (verl) | `(s_i − mean)/(std + ε)` | mean 0, std 1 |
//! | `Grpo { std: NoStd, .. }` (Dr. GRPO) | `s_i − mean` | `s_i` |
//! | `Rloo` | `s_i − (Σ_{j≠i} s_j)/(G − 1)` | 0 |
//! | `GroupMean` (REINFORCE++-baseline, before whitening) | `s_i − mean` | `s_i` |
//!
//! A group whose scores are all equal has `std = 0`; at `ε = 0` its advantages are 0 (not
//! `0/0`). An advantage beyond f32's range (RLOO of scores near ±3.4e38) is the error
//! [`RowProblem::Overflow`]; a non-finite score is [`RowProblem::NonFinite`] for that sequence.
//!
//! [`SingletonGroups::Error`] refuses a group of one instead. The advantage is written to
//! every valid token of the response. The REINFORCE++ variants follow with batch whitening:
//!
//! - REINFORCE++: token rewards → `gae` with no values, `λ = 1` ([`GaeOptions::discounted_returns`],
//!   [`MaskedSteps::Reset`] as verl) → `whiten` over the batch's valid tokens;
//! - REINFORCE++-baseline: `group_advantages` with `GroupMean` → `whiten`.
//!
//! # Whitening
//!
//! `x ← (x − mean)/sqrt(var + ε)` over the valid tokens of the whole batch, `var` with the
//! `n/(n − 1)` correction (verl's `masked_whiten`; `n = 1` gives variance 0), `ε = 1e-8`;
//! [`WhitenOptions::keep_mean`] adds the mean back. [`Moments`] are the reduction it uses:
//! count, mean, variance, min and max over valid tokens, in a fixed order (deterministic).

use crate::memory::{Buffer, Host, IntoView, IntoViewMut, Memory};
use crate::{Error, Result, RowProblem, RowShape};

mod overlong;
pub use overlong::{OverlongInputs, OverlongOptions};

mod groups;
pub use groups::{
    GroupAdvantageOptions, GroupAdvantageOutputs, GroupEstimator, GroupStd, Groups, SingletonGroups,
    TokenOutput,
};

/// What a masked position inside a sequence does to the GAE recurrence.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MaskedSteps {
    /// The recurrence passes through it unchanged: the next valid step's value and advantage
    /// reach the previous valid step (MATH.md; verl and NeMo-RL carry `nextvalues` and
    /// `lastgaelam` this way).
    #[default]
    PassThrough,
    /// The state resets to 0 there, as if the episode ended (the OpenRLHF convention; its loop
    /// zeroes rewards and values at masked positions). Equal to `PassThrough` when padding
    /// only follows the last valid token; differs on holes inside a response.
    Reset,
}

/// Discount and trace of GAE.
///
/// ```
/// use rlhf_kernels::{GaeOptions, MaskedSteps};
/// let verl = GaeOptions::new(1.0, 0.95);
/// let openrlhf = GaeOptions::new(1.0, 0.95).masked_steps(MaskedSteps::Reset);
/// let returns = GaeOptions::discounted_returns(0.99); // λ = 1, for inputs without values
/// assert_eq!(returns.lambda, 1.0);
/// # let _ = (verl, openrlhf);
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub struct GaeOptions {
    /// Discount γ ∈ [0, 1].
    pub gamma: f32,
    /// GAE trace λ ∈ [0, 1].
    pub lambda: f32,
    /// What masked positions do.
    pub masked: MaskedSteps,
}

impl GaeOptions {
    /// GAE with discount `gamma` and trace `lambda`, masked positions passing through.
    pub fn new(gamma: f32, lambda: f32) -> Self {
        GaeOptions { gamma, lambda, masked: MaskedSteps::PassThrough }
    }

    /// Discounted returns `G_t = r_t + γ·G_next(t)` (λ = 1; give no values).
    pub fn discounted_returns(gamma: f32) -> Self {
        GaeOptions::new(gamma, 1.0)
    }

    /// Sets the masked-position convention.
    pub fn masked_steps(self, masked: MaskedSteps) -> Self {
        GaeOptions { masked, ..self }
    }

    pub(crate) fn validate(&self) -> Result<()> {
        for (name, v) in [("gamma", self.gamma), ("lambda", self.lambda)] {
            if !(0.0..=1.0).contains(&v) {
                return Err(Error::InvalidOption {
                    name,
                    value: v.to_string(),
                    expected: "a value in [0, 1]",
                });
            }
        }
        Ok(())
    }
}

/// The inputs of GAE over a `[B, T]` batch (rows = sequences, one shape for every per-token
/// array). The per-token reward is
/// `r_t = rewards_t − β·kl_t (+ score on the sequence's last valid token)`, from whichever of
/// the three sources are given (at least one): dense rewards, a KL penalty (the InstructGPT
/// placement, fused into the scan) and per-sequence scores.
///
/// ```
/// use rlhf_kernels::{GaeInputs, RowShape};
/// let (kl, values, scores, mask) = ([0.1f32, 0.2, 0.0], [0.5f32, 0.4, 0.0], [1.0f32], [1u8, 1, 0]);
/// let inputs = GaeInputs::new(RowShape::new(1, 3)).kl_penalty(&kl, 0.05).scores(&scores).values(&values).mask(&mask);
/// # let _ = inputs;
/// ```
#[derive(Debug, Clone, Copy)]
pub struct GaeInputs<'a, M: Memory = Host> {
    /// `[B, T]` (row stride allowed) of every per-token array.
    pub shape: RowShape,
    /// Dense per-token rewards.
    pub rewards: Option<M::View<'a, f32>>,
    /// Per-token KL estimates and β: adds `−β·kl_t`.
    pub kl_penalty: Option<(M::View<'a, f32>, f32)>,
    /// One score per sequence, added to its last valid token.
    pub scores: Option<M::View<'a, f32>>,
    /// Value estimates `V_t`; `None` means 0 (discounted returns).
    pub values: Option<M::View<'a, f32>>,
    /// Response mask, one byte per token (0 = padding or prompt); `None`: all valid.
    pub mask: Option<M::View<'a, u8>>,
}

impl<'a, M: Memory> GaeInputs<'a, M> {
    /// No input yet, for a batch of `shape`.
    pub fn new(shape: RowShape) -> Self {
        GaeInputs { shape, rewards: None, kl_penalty: None, scores: None, values: None, mask: None }
    }
    /// Adds dense per-token rewards.
    pub fn rewards(self, r: impl IntoView<'a, f32, Memory = M>) -> Self {
        GaeInputs { rewards: Some(r.into_view()), ..self }
    }
    /// Adds the KL penalty `−β·kl_t` to every valid token.
    pub fn kl_penalty(self, kl: impl IntoView<'a, f32, Memory = M>, beta: f32) -> Self {
        GaeInputs { kl_penalty: Some((kl.into_view(), beta)), ..self }
    }
    /// Adds each sequence's score to its last valid token.
    pub fn scores(self, s: impl IntoView<'a, f32, Memory = M>) -> Self {
        GaeInputs { scores: Some(s.into_view()), ..self }
    }
    /// Adds the value estimates.
    pub fn values(self, v: impl IntoView<'a, f32, Memory = M>) -> Self {
        GaeInputs { values: Some(v.into_view()), ..self }
    }
    /// Adds the response mask.
    pub fn mask(self, m: impl IntoView<'a, u8, Memory = M>) -> Self {
        GaeInputs { mask: Some(m.into_view()), ..self }
    }

    /// Checks lengths, β and that some reward is given.
    pub(crate) fn validate(&self) -> Result<()> {
        let shape = self.shape;
        let kl = self.kl_penalty.as_ref().map(|k| &k.0);
        for (what, buf) in [("rewards", self.rewards.as_ref()), ("kl", kl), ("values", self.values.as_ref())]
        {
            if let Some(b) = buf {
                shape.check_buffer(what, b.len())?;
            }
        }
        if let Some(m) = &self.mask {
            shape.check_buffer("mask", m.len())?;
        }
        if let Some(s) = &self.scores {
            crate::logprobs::check_len("scores", s.len(), shape.rows)?;
        }
        let beta = self.kl_penalty.as_ref().map(|k| k.1);
        check_gae_sources(shape, self.rewards.is_some(), beta, self.scores.is_some())
    }
}

/// Where GAE writes: advantages and/or returns (at least one), laid out as the inputs
/// (`[B, T]`, same row stride; masked positions get 0), and the CUDA kernels' workspace. `M`
/// as for [`GaeInputs`].
///
/// ```
/// use rlhf_kernels::GaeOutputs;
/// let (mut adv, mut ret) = ([0.0f32; 3], [0.0f32; 3]);
/// let out = GaeOutputs::default().advantages(&mut adv).returns(&mut ret);
/// assert!(out.workspace.is_none());
/// ```
#[derive(Debug)]
pub struct GaeOutputs<'a, M: Memory = Host> {
    /// `A_t`.
    pub advantages: Option<M::ViewMut<'a, f32>>,
    /// `R_t = A_t + V_t`.
    pub returns: Option<M::ViewMut<'a, f32>>,
    /// Scratch of the CUDA scan for long sequences (`cuda::gae_workspace_bytes`, 16-byte
    /// aligned; allocated on the stream when needed and absent). The host backends need none.
    pub workspace: Option<M::ViewMut<'a, u8>>,
}

impl<M: Memory> Default for GaeOutputs<'_, M> {
    fn default() -> Self {
        GaeOutputs { advantages: None, returns: None, workspace: None }
    }
}

impl<'a, M: Memory> GaeOutputs<'a, M> {
    /// Requests the advantages.
    pub fn advantages(self, a: impl IntoViewMut<'a, f32, Memory = M>) -> Self {
        GaeOutputs { advantages: Some(a.into_view_mut()), ..self }
    }
    /// Requests the returns.
    pub fn returns(self, r: impl IntoViewMut<'a, f32, Memory = M>) -> Self {
        GaeOutputs { returns: Some(r.into_view_mut()), ..self }
    }
    /// Provides the CUDA scan's workspace.
    pub fn workspace(self, w: impl IntoViewMut<'a, u8, Memory = M>) -> Self {
        GaeOutputs { workspace: Some(w.into_view_mut()), ..self }
    }

    /// At least one output, each of the inputs' `shape`.
    pub(crate) fn check(&self, shape: RowShape) -> Result<()> {
        for (what, b) in [("advantages", &self.advantages), ("returns", &self.returns)] {
            if let Some(b) = b {
                shape.check_buffer(what, b.len())?;
            }
        }
        if self.advantages.is_none() && self.returns.is_none() {
            return Err(Error::InvalidOption {
                name: "outputs",
                value: "none".into(),
                expected: "advantages and/or returns",
            });
        }
        Ok(())
    }
}

impl GaeInputs<'_> {
    /// Whether sequence `row` has a NaN or infinite input at a valid position (its score counts
    /// whether or not it has a valid token).
    pub(crate) fn row_has_non_finite(&self, row: usize) -> bool {
        let arrays: Vec<&[f32]> =
            [self.rewards, self.kl_penalty.map(|k| k.0), self.values].into_iter().flatten().collect();
        let inputs = self.shape.row_range(row).filter(|&t| self.mask.is_none_or(|m| m[t] != 0));
        let bad_token = inputs.into_iter().any(|t| arrays.iter().any(|a| !a[t].is_finite()));
        bad_token || self.scores.is_some_and(|s| !s[row].is_finite())
    }

    /// The problem of a sequence whose advantages or returns are not finite: a non-finite input,
    /// or an overflow of f32 from finite ones.
    pub(crate) fn row_problem(&self, row: usize) -> Error {
        let problem = if self.row_has_non_finite(row) { RowProblem::NonFinite } else { RowProblem::Overflow };
        crate::error::Op::Gae.invalid_row(row, problem)
    }

    /// The reward of token `t` of row `row`, given whether it is the row's last valid token.
    pub(crate) fn reward(&self, row: usize, t: usize, last: bool) -> f64 {
        let mut r = self.rewards.map_or(0.0, |r| r[t] as f64);
        if let Some((kl, beta)) = self.kl_penalty {
            r -= beta as f64 * kl[t] as f64;
        }
        if last && let Some(s) = self.scores {
            r += s[row] as f64;
        }
        r
    }
}

/// The checks on GAE's reward sources shared by the host and device entry points.
pub(crate) fn check_gae_sources(
    shape: RowShape,
    rewards: bool,
    beta: Option<f32>,
    scores: bool,
) -> Result<()> {
    shape.validate("gae inputs")?;
    if let Some(b) = beta
        && !b.is_finite()
    {
        return Err(Error::InvalidOption { name: "beta", value: b.to_string(), expected: "a finite β" });
    }
    if !rewards && beta.is_none() && !scores {
        return Err(Error::InvalidOption {
            name: "rewards",
            value: "none".into(),
            expected: "at least one of dense rewards, a KL penalty or sequence scores",
        });
    }
    Ok(())
}

/// The error scale `Ā_t` of the GPU scan at every position (row-major, dense `[B, T]`): the
/// GAE recurrence run on `|r_t| + |V_t| + γ·|V_next(t)|` (f64). The GPU's advantages are
/// within `gae_error_bound_factor(T)·2⁻²⁴·Ā_t` of the exact ones (module docs).
///
/// Errors: those of GAE's inputs and options, [`RowProblem::NonFinite`] for the lowest sequence
/// with a NaN or infinite input at a valid position (its scale is not defined).
pub fn gae_error_scale(inputs: &GaeInputs<'_>, opts: &GaeOptions) -> Result<Vec<f64>> {
    inputs.validate()?;
    opts.validate()?;
    if let Some(row) = (0..inputs.shape.rows).find(|&i| inputs.row_has_non_finite(i)) {
        return Err(crate::error::Op::Gae.invalid_row(row, RowProblem::NonFinite));
    }
    let shape = inputs.shape;
    let (g, gl) = (opts.gamma as f64, opts.gamma as f64 * opts.lambda as f64);
    let mut out = vec![0.0; shape.len()];
    for i in 0..shape.rows {
        let row = shape.row_range(i);
        let valid = |t: usize| inputs.mask.is_none_or(|m| m[t] != 0);
        let last = row.clone().rev().find(|&t| valid(t));
        let (mut a, mut w) = (0.0f64, 0.0f64);
        for (j, t) in row.clone().enumerate().rev() {
            if valid(t) {
                let v = inputs.values.map_or(0.0, |v| (v[t] as f64).abs());
                let r = inputs.rewards.map_or(0.0, |r| (r[t] as f64).abs())
                    + inputs.kl_penalty.map_or(0.0, |(k, b)| (b as f64 * k[t] as f64).abs())
                    + inputs.scores.filter(|_| Some(t) == last).map_or(0.0, |s| (s[i] as f64).abs());
                a = gl * a + g * w + r + v;
                w = v;
                out[i * shape.cols + j] = a + v;
            } else if opts.masked == MaskedSteps::Reset {
                (a, w) = (0.0, 0.0);
            }
        }
    }
    Ok(out)
}

/// `K(T)` of the GPU scan's error bound for sequences of `T` positions (module docs).
pub fn gae_error_bound_factor(cols: usize) -> f64 {
    2.0 * (24 + cols.div_ceil(1024)) as f64
}

/// Count, mean, variance (with the `n/(n − 1)` correction; 0 for `n ≤ 1`), min and max of the
/// valid tokens of a batch. An empty batch has count 0, mean 0, variance 0, min `+inf` and max
/// `−inf` (the identities of the reductions).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Moments {
    /// Valid tokens.
    pub count: f64,
    /// Their mean.
    pub mean: f64,
    /// Their variance, unbiased.
    pub var: f64,
    /// Smallest value.
    pub min: f64,
    /// Largest value.
    pub max: f64,
}

impl Default for Moments {
    /// [`Moments::EMPTY`].
    fn default() -> Self {
        Moments::EMPTY
    }
}

impl Moments {
    /// The moments of no value.
    pub const EMPTY: Moments =
        Moments { count: 0.0, mean: 0.0, var: 0.0, min: f64::INFINITY, max: f64::NEG_INFINITY };

    /// From a count, mean and sum of squared deviations `m2` (Chan's form).
    pub(crate) fn from_m2(count: f64, mean: f64, m2: f64, min: f64, max: f64) -> Self {
        let var = if count > 1.0 { m2 / (count - 1.0) } else { 0.0 };
        Moments { count, mean: if count > 0.0 { mean } else { 0.0 }, var, min, max }
    }
}

/// Options of whitening.
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub struct WhitenOptions {
    /// Add the mean back after scaling (verl's `shift_mean = False`).
    pub keep_mean: bool,
    /// ε inside the square root (default 1e-8).
    pub eps: f32,
}

impl Default for WhitenOptions {
    fn default() -> Self {
        WhitenOptions { keep_mean: false, eps: 1e-8 }
    }
}

impl WhitenOptions {
    /// Keeps the mean.
    pub fn keep_mean(self, keep_mean: bool) -> Self {
        WhitenOptions { keep_mean, ..self }
    }
    /// Sets ε.
    pub fn eps(self, eps: f32) -> Self {
        WhitenOptions { eps, ..self }
    }

    pub(crate) fn validate(&self) -> Result<()> {
        if !(self.eps.is_finite() && self.eps >= 0.0) {
            return Err(Error::InvalidOption {
                name: "eps",
                value: self.eps.to_string(),
                expected: "a finite ε ≥ 0",
            });
        }
        Ok(())
    }

    /// `(center, scale, offset)` such that the whitened value is `(x − center)·scale + offset`
    /// (the deviation first: `x·scale − mean·scale` would cancel catastrophically when the
    /// scale is large, and overflow f32 from a finite batch).
    pub(crate) fn affine(&self, m: &Moments) -> (f64, f64, f64) {
        let scale = 1.0 / (m.var + self.eps as f64).sqrt();
        let scale = if scale.is_finite() { scale } else { 0.0 };
        (m.mean, scale, if self.keep_mean { m.mean } else { 0.0 })
    }
}

/// The lowest sequence whose valid positions hold a non-finite value in any of `arrays`.
pub(crate) fn first_non_finite(shape: RowShape, mask: Option<&[u8]>, arrays: &[&[f32]]) -> Option<usize> {
    (0..shape.rows).find(|&i| {
        shape
            .row_range(i)
            .filter(|&t| mask.is_none_or(|m| m[t] != 0))
            .any(|t| arrays.iter().any(|a| !a[t].is_finite()))
    })
}

/// The error for a non-finite input in sequence `row` of `op`.
pub(crate) fn non_finite(op: crate::error::Op, row: usize) -> Error {
    op.invalid_row(row, RowProblem::NonFinite)
}
