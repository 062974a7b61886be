//! Options, buffers and the vocabulary-shard merge shared by the three backends of the
//! logprobs family (MATH.md §1).

use crate::memory::{Buffer, Host, IntoView, IntoViewMut, Memory};
use crate::{Error, Result, RowProblem, TargetIndex};

/// Checks a temperature and returns 1/τ.
fn inv_temperature(t: f32) -> Result<f32> {
    let inv = 1.0 / t;
    if !(t.is_finite() && t > 0.0 && inv.is_finite()) {
        return Err(Error::InvalidOption {
            name: "temperature",
            value: t.to_string(),
            expected: "a finite temperature > 0 whose inverse is finite (e.g. 1.0 or 0.7)",
        });
    }
    Ok(inv)
}

/// Options of [`log_softmax`](crate::cpu::log_softmax) and its backward, on every backend.
///
/// ```
/// use rlhf_kernels::LogSoftmaxOptions;
/// let opts = LogSoftmaxOptions::default().temperature(0.7);
/// assert_eq!(opts.temperature, 0.7);
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub struct LogSoftmaxOptions {
    /// Sampling temperature τ > 0: the op works on `z = logits / τ`. Default 1.
    pub temperature: f32,
}

impl Default for LogSoftmaxOptions {
    fn default() -> Self {
        LogSoftmaxOptions { temperature: 1.0 }
    }
}

impl LogSoftmaxOptions {
    /// Sets the temperature τ (finite, > 0, and 1/τ finite).
    pub fn temperature(mut self, temperature: f32) -> Self {
        self.temperature = temperature;
        self
    }

    /// Checks the options and returns 1/τ.
    pub(crate) fn inv_temperature(&self) -> Result<f32> {
        inv_temperature(self.temperature)
    }
}

/// Options of the token log-probability ops ([`token_logprobs`](crate::cpu::token_logprobs),
/// its backward and the vocabulary-shard partials), on every backend.
///
/// ```
/// use rlhf_kernels::TokenLogprobsOptions;
/// let opts = TokenLogprobsOptions::default().temperature(0.7).ignore_index(None);
/// assert_eq!((opts.temperature, opts.ignore_index), (0.7, None));
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub struct TokenLogprobsOptions {
    /// Sampling temperature τ > 0: log-probabilities are those of `softmax(logits / τ)`.
    /// Default 1.
    pub temperature: f32,
    /// A target equal to this id marks its row as padding (outputs 0, gradient 0, logits not
    /// read), like PyTorch's `ignore_index`. Default `Some(-100)`.
    pub ignore_index: Option<i64>,
}

impl Default for TokenLogprobsOptions {
    fn default() -> Self {
        TokenLogprobsOptions { temperature: 1.0, ignore_index: Some(-100) }
    }
}

impl TokenLogprobsOptions {
    /// Sets the temperature τ (finite, > 0, and 1/τ finite).
    pub fn temperature(mut self, temperature: f32) -> Self {
        self.temperature = temperature;
        self
    }

    /// Sets (or, with `None`, disables) the ignore index.
    pub fn ignore_index(mut self, ignore_index: Option<i64>) -> Self {
        self.ignore_index = ignore_index;
        self
    }

    /// Checks the options and returns 1/τ.
    pub(crate) fn inv_temperature(&self) -> Result<f32> {
        inv_temperature(self.temperature)
    }
}

/// The sampled token of every row, and which rows are real: a row is padding when its mask
/// byte is 0 or its target equals the ignore index. `M` is where the buffers live
/// ([`Host`](crate::Host) by default; `Cuda` for device views): the same struct serves every
/// backend.
///
/// ```
/// use rlhf_kernels::Tokens;
/// let targets = [5i64, 17, -100];
/// let mask = [1u8, 0, 1];
/// let tokens = Tokens::new(&targets).with_mask(&mask);
/// assert_eq!(tokens.targets.len(), 3);
/// ```
#[derive(Debug, Clone, Copy)]
pub struct Tokens<'a, I: 'a, M: Memory = Host> {
    /// One target id per row (`i32`, `u32` or `i64`).
    pub targets: M::View<'a, I>,
    /// Optional mask, one byte per row (0 = padding; a `bool` tensor's bytes).
    pub mask: Option<M::View<'a, u8>>,
}

impl<'a, I: TargetIndex, M: Memory> Tokens<'a, I, M> {
    /// Targets without a mask (`&[I]`, `&Vec<I>`, a `CudaView`, …).
    pub fn new(targets: impl IntoView<'a, I, Memory = M>) -> Self {
        Tokens { targets: targets.into_view(), mask: None }
    }

    /// Adds a mask, in the targets' memory.
    pub fn with_mask(self, mask: impl IntoView<'a, u8, Memory = M>) -> Self {
        Tokens { mask: Some(mask.into_view()), ..self }
    }

    /// Checks the lengths against `rows`.
    pub(crate) fn check(&self, rows: usize) -> Result<()> {
        check_len("targets", self.targets.len(), rows)?;
        self.mask.as_ref().map_or(Ok(()), |m| check_len("mask", m.len(), rows))
    }
}

impl<I: TargetIndex> Tokens<'_, I> {
    /// True when row `r` is padding.
    #[inline]
    pub(crate) fn masked(&self, r: usize, ignore_index: Option<i64>) -> bool {
        self.mask.is_some_and(|m| m[r] == 0) || Some(self.targets[r].to_i64()) == ignore_index
    }

    /// The first real row whose target is outside `[0, vocab)`.
    pub(crate) fn validate(&self, vocab: usize, ignore_index: Option<i64>) -> Result<()> {
        for r in 0..self.targets.len() {
            let t = self.targets[r].to_i64();
            if !self.masked(r, ignore_index) && !(0..vocab as i64).contains(&t) {
                return Err(Error::TargetOutOfRange { row: r, target: t, vocab });
            }
        }
        Ok(())
    }
}

/// Checks that a per-row buffer has exactly `rows` elements.
/// A vocabulary shard's first global token id as the kernels take it: `vocab_offset + cols`
/// must fit an i64 (token ids are i64), or the offset would wrap and alias another column.
pub(crate) fn check_vocab_offset(vocab_offset: usize, cols: usize) -> Result<i64> {
    const MAX: usize = i64::MAX as usize;
    match vocab_offset.checked_add(cols) {
        Some(end) if end <= MAX => Ok(vocab_offset as i64),
        _ => Err(Error::TooLarge { what: "vocab_offset + cols", value: vocab_offset, max: MAX - cols }),
    }
}

pub(crate) fn check_len(what: &'static str, len: usize, rows: usize) -> Result<()> {
    if len != rows {
        return Err(Error::ShapeMismatch { what, min: rows, max: rows, actual: len });
    }
    Ok(())
}

/// Where the forward writes: any subset of the per-row log-probability of the target, the
/// entropy and the log-sum-exp (each `rows` f32; at least one). Asking for `logp` alone skips
/// the entropy's extra arithmetic. `M` is where the buffers live, as for [`Tokens`].
///
/// ```
/// use rlhf_kernels::TokenOutputs;
/// let (mut logp, mut entropy) = (vec![0.0f32; 8], vec![0.0f32; 8]);
/// let out = TokenOutputs::default().logp(&mut logp).entropy(&mut entropy);
/// assert!(out.lse.is_none());
/// ```
#[derive(Debug)]
pub struct TokenOutputs<'a, M: Memory = Host> {
    /// `log softmax(z)[y]` in nats (≤ 0; `-inf` when the target's logit is `-inf`).
    pub logp: Option<M::ViewMut<'a, f32>>,
    /// `H = lse − Σ_v p_v·z_v` in nats.
    pub entropy: Option<M::ViewMut<'a, f32>>,
    /// `lse = ln Σ_v exp(z_v)` (the backward needs it).
    pub lse: Option<M::ViewMut<'a, f32>>,
    /// Scratch of the CUDA backend's split path for few long rows
    /// (`cuda::token_logprobs_workspace_bytes`, 16-byte aligned; allocated on the stream when
    /// needed and absent). The host backends need none and leave it untouched.
    pub workspace: Option<M::ViewMut<'a, u8>>,
}

impl<M: Memory> Default for TokenOutputs<'_, M> {
    fn default() -> Self {
        TokenOutputs { logp: None, entropy: None, lse: None, workspace: None }
    }
}

impl<'a, M: Memory> TokenOutputs<'a, M> {
    /// Requests the target's log-probability.
    pub fn logp(self, logp: impl IntoViewMut<'a, f32, Memory = M>) -> Self {
        TokenOutputs { logp: Some(logp.into_view_mut()), ..self }
    }
    /// Requests the entropy.
    pub fn entropy(self, entropy: impl IntoViewMut<'a, f32, Memory = M>) -> Self {
        TokenOutputs { entropy: Some(entropy.into_view_mut()), ..self }
    }
    /// Requests the log-sum-exp.
    pub fn lse(self, lse: impl IntoViewMut<'a, f32, Memory = M>) -> Self {
        TokenOutputs { lse: Some(lse.into_view_mut()), ..self }
    }
    /// Provides the CUDA split path's workspace.
    pub fn workspace(self, workspace: impl IntoViewMut<'a, u8, Memory = M>) -> Self {
        TokenOutputs { workspace: Some(workspace.into_view_mut()), ..self }
    }

    /// At least one output, each of `rows` elements.
    pub(crate) fn check(&self, rows: usize) -> Result<()> {
        if self.logp.is_none() && self.entropy.is_none() && self.lse.is_none() {
            return Err(Error::InvalidOption {
                name: "outputs",
                value: "none requested".into(),
                expected: "at least one of logp, entropy, lse",
            });
        }
        for (what, v) in [("logp", &self.logp), ("entropy", &self.entropy), ("lse", &self.lse)] {
            v.as_ref().map_or(Ok(()), |v| check_len(what, v.len(), rows))?;
        }
        Ok(())
    }
}

/// What the backward needs: the forward's saved `lse` (and `entropy` when there is an entropy
/// gradient) and the upstream gradients of `logp` and/or `entropy` (each `rows` f32; at least
/// one of the two). `M` is where the buffers live, as for [`Tokens`].
///
/// ```
/// use rlhf_kernels::TokenGrads;
/// let (lse, entropy, g) = ([1.0f32; 4], [0.5f32; 4], [1.0f32; 4]);
/// let grads = TokenGrads::new(&lse).grad_logp(&g).grad_entropy(&g, &entropy);
/// assert!(grads.grad_entropy.is_some());
/// ```
#[derive(Debug, Clone, Copy)]
pub struct TokenGrads<'a, M: Memory = Host> {
    /// `lse` from the forward.
    pub lse: M::View<'a, f32>,
    /// `entropy` from the forward (needed with `grad_entropy`).
    pub entropy: Option<M::View<'a, f32>>,
    /// Upstream gradient of `logp`.
    pub grad_logp: Option<M::View<'a, f32>>,
    /// Upstream gradient of `entropy`.
    pub grad_entropy: Option<M::View<'a, f32>>,
}

impl<'a, M: Memory> TokenGrads<'a, M> {
    /// Starts from the saved `lse`.
    pub fn new(lse: impl IntoView<'a, f32, Memory = M>) -> Self {
        TokenGrads { lse: lse.into_view(), entropy: None, grad_logp: None, grad_entropy: None }
    }
    /// Adds the upstream gradient of `logp`.
    pub fn grad_logp(self, grad_logp: impl IntoView<'a, f32, Memory = M>) -> Self {
        TokenGrads { grad_logp: Some(grad_logp.into_view()), ..self }
    }
    /// Adds the upstream gradient of the entropy, with the forward's entropy.
    pub fn grad_entropy(
        self,
        grad_entropy: impl IntoView<'a, f32, Memory = M>,
        entropy: impl IntoView<'a, f32, Memory = M>,
    ) -> Self {
        TokenGrads {
            grad_entropy: Some(grad_entropy.into_view()),
            entropy: Some(entropy.into_view()),
            ..self
        }
    }

    pub(crate) fn check(&self, rows: usize) -> Result<()> {
        check_len("lse", self.lse.len(), rows)?;
        check_grads_present(self.grad_logp.is_some(), self.grad_entropy.is_some(), self.entropy.is_some())?;
        for (what, b) in
            [("entropy", &self.entropy), ("grad_logp", &self.grad_logp), ("grad_entropy", &self.grad_entropy)]
        {
            b.as_ref().map_or(Ok(()), |b| check_len(what, b.len(), rows))?;
        }
        Ok(())
    }
}

/// At least one upstream gradient, and the saved entropy with an entropy gradient.
pub(crate) fn check_grads_present(grad_logp: bool, grad_entropy: bool, entropy: bool) -> Result<()> {
    if !grad_logp && !grad_entropy {
        return Err(Error::InvalidOption {
            name: "grads",
            value: "neither grad_logp nor grad_entropy".into(),
            expected: "at least one upstream gradient",
        });
    }
    if grad_entropy && !entropy {
        return Err(Error::InvalidOption {
            name: "grads.entropy",
            value: "missing".into(),
            expected: "the forward's entropy whenever grad_entropy is given",
        });
    }
    Ok(())
}

/// Per-row statistics of one slice of the vocabulary (a tensor-parallel shard, or a chunk of
/// a row), enough to finish `logp`, `H` and `lse` once the slices are merged.
///
/// With `m` the largest raw logit of the slice and `d_v = (x_v − m)/τ`:
/// `sum_exp = Σ_v exp(d_v)`, `sum_exp_d = Σ_v exp(d_v)·d_v` (terms with `exp(d_v) = 0` are
/// 0). Merging rescales both to the larger max (MATH.md §1's online merge, extended to the
/// second sum); finishing gives `lse = m/τ + ln s`, `logp = (x_y − m)/τ − ln s` and
/// `H = ln s − sum_exp_d / s`. The layout is `repr(C)`, 20 bytes, the same on the GPU, so a
/// trainer can all-gather partials as raw bytes.
///
/// Tensor-parallel recipe: every rank computes the partials of its shard
/// ([`cpu::vocab_shard_partials`](crate::cpu::vocab_shard_partials) or the CUDA equivalent)
/// with the shard's `vocab_offset`, the trainer all-gathers them, and every rank merges them in
/// shard order ([`merge_vocab_partials`]) and calls [`finish`](Self::finish). The merge is
/// pure and deterministic: all ranks get the same bits.
///
/// ```
/// use rlhf_kernels::{cpu, merge_vocab_partials, Tokens, TokenLogprobsOptions, TokenOutputs,
///                    RowShape, VocabPartial};
/// let vocab = 1000;
/// let row: Vec<f32> = (0..vocab).map(|v| ((v * 37 % 101) as f32).sin() * 4.0).collect();
/// let target = [733i64];
/// let opts = TokenLogprobsOptions::default();
///
/// // Four shards of 250 columns, as four tensor-parallel ranks would hold them.
/// let mut parts = Vec::new();
/// for shard in 0..4 {
///     let cols = &row[shard * 250..(shard + 1) * 250];
///     let mut p = [VocabPartial::EMPTY];
///     cpu::vocab_shard_partials(cols, RowShape::new(1, 250), &Tokens::new(&target),
///                               shard * 250, &mut p, &opts)?;
///     parts.push(p[0]); // ... all-gather across ranks here ...
/// }
/// let stats = merge_vocab_partials(&parts, &opts)?.finish(&opts).unwrap();
///
/// // The same as the whole row on one device.
/// let (mut logp, mut entropy) = ([0.0f32], [0.0f32]);
/// cpu::token_logprobs(&row, RowShape::new(1, vocab), &Tokens::new(&target),
///                     TokenOutputs::default().logp(&mut logp).entropy(&mut entropy), &opts)?;
/// assert!((stats.logp - logp[0]).abs() < 1e-5 && (stats.entropy - entropy[0]).abs() < 1e-5);
/// # Ok::<(), rlhf_kernels::Error>(())
/// ```
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct VocabPartial {
    /// Largest raw logit of the slice (`-inf` for an empty or all-`-inf` slice).
    pub max_logit: f32,
    /// `Σ exp((x − max_logit)/τ)`.
    pub sum_exp: f32,
    /// `Σ exp(d)·d` with `d = (x − max_logit)/τ`.
    pub sum_exp_d: f32,
    /// The target's raw logit, when the target lies in this slice.
    pub target_logit: f32,
    /// Bits: [`VocabPartial::NAN`], [`VocabPartial::POS_INF`], [`VocabPartial::HAS_TARGET`].
    pub flags: u32,
}

// The layout the kernels write and every shard gathers (kernels/logprobs.cu pins the same): on
// every build, with or without the `cuda` feature.
pin_layout!(VocabPartial, 20, {
    max_logit: 0, sum_exp: 4, sum_exp_d: 8, target_logit: 12, flags: 16,
});

/// Logp, entropy and lse of one row.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TokenStats {
    /// Log-probability of the target, nats.
    pub logp: f32,
    /// Entropy, nats.
    pub entropy: f32,
    /// Log-sum-exp of `z = logits / τ`.
    pub lse: f32,
}

impl VocabPartial {
    /// The slice held a NaN.
    pub const NAN: u32 = 1;
    /// The slice held a `+inf`.
    pub const POS_INF: u32 = 2;
    /// The row's target lies in the slice; `target_logit` is set.
    pub const HAS_TARGET: u32 = 4;
    /// The partial of an empty slice: the identity of [`merge`](Self::merge).
    pub const EMPTY: VocabPartial = VocabPartial {
        max_logit: f32::NEG_INFINITY,
        sum_exp: 0.0,
        sum_exp_d: 0.0,
        target_logit: 0.0,
        flags: 0,
    };

    /// Combines two slices of the same row (self first, in vocabulary order).
    pub fn merge(&self, other: &VocabPartial, inv_tau: f32) -> VocabPartial {
        let flags = self.flags | other.flags;
        let target_logit =
            if self.flags & Self::HAS_TARGET != 0 { self.target_logit } else { other.target_logit };
        let mut out = if other.max_logit == f32::NEG_INFINITY {
            *self
        } else if self.max_logit == f32::NEG_INFINITY {
            *other
        } else {
            let m = self.max_logit.max(other.max_logit);
            let (d1, d2) = ((self.max_logit - m) * inv_tau, (other.max_logit - m) * inv_tau);
            let (a1, a2) = (d1.exp(), d2.exp());
            // A side rescaled to 0 contributes 0 to the second sum: never 0·(-inf).
            let t = |a: f32, d: f32, p: &VocabPartial| {
                if a > 0.0 { a * d.mul_add(p.sum_exp, p.sum_exp_d) } else { 0.0 }
            };
            VocabPartial {
                max_logit: m,
                sum_exp: a1 * self.sum_exp + a2 * other.sum_exp,
                sum_exp_d: t(a1, d1, self) + t(a2, d2, other),
                ..*self
            }
        };
        out.flags = flags;
        out.target_logit = target_logit;
        out
    }

    /// `logp`, `H` and `lse` of the row, or why it has none (NaN, `+inf`, only `-inf`, no
    /// slice held the target, or an `lse` beyond f32: [`RowProblem::Overflow`]).
    pub fn finish(&self, opts: &TokenLogprobsOptions) -> Result<TokenStats, RowProblem> {
        let inv_tau = opts.inv_temperature().map_err(|_| RowProblem::NaN)?;
        self.finish_with(inv_tau)
    }

    pub(crate) fn finish_with(&self, inv_tau: f32) -> Result<TokenStats, RowProblem> {
        if self.flags & Self::NAN != 0 {
            return Err(RowProblem::NaN);
        }
        if self.flags & Self::POS_INF != 0 {
            return Err(RowProblem::PosInf);
        }
        if self.max_logit == f32::NEG_INFINITY {
            return Err(RowProblem::AllNegInf);
        }
        if self.flags & Self::HAS_TARGET == 0 {
            return Err(RowProblem::TargetOutOfRange);
        }
        let ln_s = self.sum_exp.ln();
        let lse = self.max_logit * inv_tau + ln_s;
        if !lse.is_finite() {
            // Finite logits, but max/τ beyond f32.
            return Err(RowProblem::Overflow);
        }
        Ok(TokenStats {
            logp: (self.target_logit - self.max_logit) * inv_tau - ln_s,
            entropy: ln_s - self.sum_exp_d / self.sum_exp,
            lse,
        })
    }
}

/// Folds the partials of one row's slices, in order (shard 0 first). Pure and deterministic.
pub fn merge_vocab_partials(parts: &[VocabPartial], opts: &TokenLogprobsOptions) -> Result<VocabPartial> {
    let inv_tau = opts.inv_temperature()?;
    Ok(parts.iter().fold(VocabPartial::EMPTY, |acc, p| acc.merge(p, inv_tau)))
}
