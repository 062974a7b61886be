//! The PPO family's shared vocabulary (MATH.md §4): the policy objectives (clipped surrogate
//! with asymmetric and dual clip, PPO-KL, GSPO, CISPO, SAPO, GMPO), the clipped value loss,
//! their options and the statistics trainers log.
//!
//! # Per-token policy losses
//!
//! With `lr = clamp(logp − old_logp, ±log_ratio_clamp)`, `r = exp(lr)` and advantage `A`:
//!
//! | [`PolicyObjective`] | per-token loss `L` | `∂L/∂logp` |
//! | --- | --- | --- |
//! | `Clip` | `max(−A·r, −A·clip(r, 1 − ε_low, 1 + ε_high))`, then `min(·, −A·c)` where `A < 0` with dual clip `c` | `−A·r` where `(A > 0 ∧ r ≤ 1 + ε_high) ∨ (A < 0 ∧ 1 − ε_low ≤ r ≤ c)`, else 0 |
//! | `KlPenalty { beta }` | `−A·r + β·((r − 1) − lr)` (k3 estimate of `KL[π_old ‖ π]`) | `−A·r + β·(r − 1)` |
//! | `Gspo` | as `Clip` with the sequence ratio `s = exp(mean_t lr_t)` for `r` (no dual clip) | `−A·s` where unclipped, else 0 |
//! | `Cispo` | `−sg(clip(r, 1 − ε_low, 1 + ε_high))·A·logp` | `−clip(r, …)·A` |
//! | `Sapo { τ₊, τ₋ }` | `−A·(4/τ)·σ(τ·(r − 1))`, `τ = τ₊` where `A > 0`, else `τ₋` | `−A·4·σ(x)·σ(−x)·r`, `x = τ·(r − 1)` |
//! | `Gmpo` | `−Ā·g`, `g = exp(mean_t c_t)`, `c_t` = `lr_t` clipped one-sided in log space | `−Ā·g` where `c_t = lr_t`, else 0 |
//!
//! Where the log-ratio clamp is active the gradient is 0 (except CISPO, whose weight carries
//! no gradient anyway). `Gspo` is the GSPO-token form (verl's): each token's loss uses the
//! sequence ratio, its gradient flows through its own `logp` only; with a per-sequence
//! advantage and [`Aggregation::SeqMeanTokenMean`] this is exactly GSPO's sequence-level
//! gradient `−A_i·s_i/|y_i|`.
//!
//! **SAPO** (Gao et al. 2025, arXiv:2511.20347) replaces the hard clip by a soft gate: at
//! `r = 1` the gate's slope is 1 (the gradient is the plain `−A`), and it decays smoothly as
//! the ratio leaves 1, faster for negative advantages (`τ₋ > τ₊`; defaults 1 and 1.05, TRL's
//! and verl's). σ is the logistic function; `σ(x)·σ(−x) = e^{−|x|}/(1 + e^{−|x|})²` is how
//! the backends evaluate the slope, so it is finite for every ratio. No clip fraction is
//! counted. TRL applies no log-ratio clamp, verl clamps at ±20 (our default): set
//! [`PolicyLossOptions::log_ratio_clamp`] to `None` for TRL's values. The statistics still
//! sum the token ratios in f32, so without a clamp a log-ratio past ~88.7 (a ratio beyond
//! f32) is [`RowProblem::Overflow`](crate::RowProblem::Overflow) on every objective, SAPO's
//! finite loss notwithstanding.
//!
//! **GMPO** (Zhao et al. 2025, arXiv:2507.20673; verl's `geo_mean`) is a sequence objective on
//! the geometric mean of the token ratios, clipped per token in log space with `ε_low`,
//! `ε_high` as *log* bounds: `c_t = min(lr_t, ε_high)` where `A_t > 0`, `max(lr_t, −ε_low)`
//! where `A_t < 0`, and `0` where `A_t = 0` (verl's `sign(A)·min(sign(A)·lr, …)`). With
//! `|y|` valid tokens, `g = exp(Σ_t c_t / |y|)` and `Ā = Σ_t A_t / |y|` (the sequence's mean
//! advantage), every valid token carries the sequence loss `L_t = −Ā·g`; the written
//! gradient `−Ā·g` at the unclipped tokens is exact for every aggregation, because the
//! aggregation weight `w` is the same for all tokens of a sequence: `∂(w·Σ_t L_t)/∂logp_t =
//! w·|y|·(−Ā·g/|y|)`. Under [`Aggregation::SeqMeanTokenMean`] the loss is verl's mean of
//! `−Ā·g` over sequences. The clip fractions count tokens the one-sided clip moved (`A_t > 0`
//! with `lr_t > ε_high`, `A_t < 0` with `lr_t < −ε_low`); verl's metric also counts the
//! untouched side.
//!
//! # Aggregation and the global normaliser
//!
//! The loss is `Σ mask·w·L` with the per-token weight `w` of the [`Aggregation`] under a
//! [`Normaliser`] (see the `aggregation` module docs for the gradient-accumulation trap); the
//! gradient written per token is `w·∂L/∂logp`, so summing the gradients of micro-batches that
//! all use the mini-batch's [`Normaliser::Global`] counts gives the full-batch gradient. The
//! entropy bonus `−c_H·H` is aggregated the same way and its upstream gradient `−c_H·w` is
//! written for the logprobs backward.
//!
//! # Value loss
//!
//! `v_clip = old_v + clip(v − old_v, ±ε_v)`, `L_v = ½·max((v − R)², (v_clip − R)²)`,
//! `∂L_v/∂v = (v − R)` where the unclipped error is the larger, else `(v_clip − R)` inside the
//! clip band and 0 outside.

use crate::{Aggregation, BatchCounts, Error, Normaliser, Result, SampledKlOptions, SampledKlStats};

mod buffers;
pub use buffers::{
    FusedPolicyInputs, PolicyLossInputs, PolicyLossOutputs, ValueLossInputs, ValueLossOutputs,
};

/// Which policy loss (module docs for the formulas). More objectives will come: match with a
/// wildcard arm.
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub enum PolicyObjective {
    /// The clipped surrogate, asymmetric clip and optional dual clip.
    Clip,
    /// The KL-penalty form: `−A·r + β·KL[π_old ‖ π]` per token (β from a
    /// [`KlController`](crate::KlController)).
    KlPenalty {
        /// β.
        beta: f32,
    },
    /// GSPO (GSPO-token form): the clipped surrogate on the sequence's geometric-mean ratio.
    Gspo,
    /// CISPO: the clipped, stop-gradient importance weight times `logp`.
    Cispo,
    /// SAPO: the soft gate `(4/τ)·σ(τ·(r − 1))` in place of the clipped ratio, `τ₊` for
    /// positive advantages and `τ₋` otherwise ([`PolicyObjective::SAPO`] has the papers'
    /// defaults).
    Sapo {
        /// τ₊ > 0, the gate's temperature where `A > 0`.
        tau_pos: f32,
        /// τ₋ > 0, the gate's temperature where `A ≤ 0`.
        tau_neg: f32,
    },
    /// GMPO: the sequence's geometric-mean ratio, each token's log-ratio clipped one-sided in
    /// log space (`ε_low`, `ε_high` are log bounds: GMPO's paper uses 0.4).
    Gmpo,
}

impl PolicyObjective {
    /// The kernels' objective code (`PolicyParams::objective` in kernels/ppo.cu).
    #[cfg(feature = "cuda")]
    pub(crate) fn code(self) -> i32 {
        match self {
            PolicyObjective::Clip => 0,
            PolicyObjective::KlPenalty { .. } => 1,
            PolicyObjective::Gspo => 2,
            PolicyObjective::Cispo => 3,
            PolicyObjective::Sapo { .. } => 4,
            PolicyObjective::Gmpo => 5,
        }
    }

    /// SAPO with TRL's and verl's default temperatures, `τ₊ = 1`, `τ₋ = 1.05`.
    pub const SAPO: PolicyObjective = PolicyObjective::Sapo { tau_pos: 1.0, tau_neg: 1.05 };

    /// SAPO's temperatures `(τ₊, τ₋)`, `(1, 1)` for the other objectives.
    pub(crate) fn sapo_taus(self) -> (f32, f32) {
        match self {
            PolicyObjective::Sapo { tau_pos, tau_neg } => (tau_pos, tau_neg),
            _ => (1.0, 1.0),
        }
    }
}

/// Options of the policy loss.
///
/// ```
/// use rlhf_kernels::{Aggregation, Normaliser, PolicyLossOptions, PolicyObjective};
/// let ppo = PolicyLossOptions::default();                       // ε = 0.2 both sides, token-mean
/// let dapo = PolicyLossOptions::default().clip(0.2, 0.28).dual_clip(Some(3.0));
/// let gspo = PolicyLossOptions::new(PolicyObjective::Gspo).clip(3e-4, 4e-4)
///     .aggregation(Aggregation::SeqMeanTokenMean);
/// let sapo = PolicyLossOptions::new(PolicyObjective::SAPO).aggregation(Aggregation::SeqMeanTokenMean);
/// let gmpo = PolicyLossOptions::new(PolicyObjective::Gmpo).clip(0.4, 0.4)   // log-space bounds
///     .aggregation(Aggregation::SeqMeanTokenMean);
/// let global = ppo.normaliser(Normaliser::Global { valid_tokens: 8192.0, valid_sequences: 64.0, sequences: 64.0 });
/// # let _ = (dapo, gspo, sapo, gmpo, global);
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub struct PolicyLossOptions {
    /// The objective.
    pub objective: PolicyObjective,
    /// ε_low: the ratio's lower clip is `1 − ε_low` (GMPO: the log-ratio's is `−ε_low`).
    pub clip_low: f32,
    /// ε_high: the ratio's upper clip is `1 + ε_high` (GMPO: the log-ratio's is `ε_high`).
    pub clip_high: f32,
    /// Dual clip `c > 1` (only where `A < 0`; `Clip` only).
    pub dual_clip: Option<f32>,
    /// Clamp of `logp − old_logp` before the exp, in (0, 80] (default `Some(20)`, verl's);
    /// `None`: no clamp (a ratio beyond f32 is then [`RowProblem::Overflow`](crate::RowProblem::Overflow)).
    pub log_ratio_clamp: Option<f32>,
    /// Entropy-bonus coefficient `c_H` (default 0): the loss gains `−c_H·H`.
    pub entropy_coef: f32,
    /// How per-token losses become one scalar.
    pub aggregation: Aggregation,
    /// Its denominators.
    pub normaliser: Normaliser,
}

impl Default for PolicyLossOptions {
    fn default() -> Self {
        PolicyLossOptions::new(PolicyObjective::Clip)
    }
}

impl PolicyLossOptions {
    /// `objective` with ε = 0.2 on both sides, no dual clip, log-ratio clamp 20, no entropy
    /// bonus, token-mean over this batch.
    pub fn new(objective: PolicyObjective) -> Self {
        PolicyLossOptions {
            objective,
            clip_low: 0.2,
            clip_high: 0.2,
            dual_clip: None,
            log_ratio_clamp: Some(20.0),
            entropy_coef: 0.0,
            aggregation: Aggregation::TokenMean,
            normaliser: Normaliser::Local,
        }
    }
    /// Sets the objective.
    pub fn objective(self, objective: PolicyObjective) -> Self {
        PolicyLossOptions { objective, ..self }
    }
    /// Sets ε_low and ε_high.
    pub fn clip(self, low: f32, high: f32) -> Self {
        PolicyLossOptions { clip_low: low, clip_high: high, ..self }
    }
    /// Sets the dual clip `c`.
    pub fn dual_clip(self, c: Option<f32>) -> Self {
        PolicyLossOptions { dual_clip: c, ..self }
    }
    /// Sets the log-ratio clamp.
    pub fn log_ratio_clamp(self, c: Option<f32>) -> Self {
        PolicyLossOptions { log_ratio_clamp: c, ..self }
    }

    /// The clamp the backends apply: `+inf` without one.
    pub(crate) fn lr_clamp(&self) -> f32 {
        self.log_ratio_clamp.unwrap_or(f32::INFINITY)
    }
    /// Sets the entropy coefficient `c_H`.
    pub fn entropy_coef(self, c: f32) -> Self {
        PolicyLossOptions { entropy_coef: c, ..self }
    }
    /// Sets the aggregation.
    pub fn aggregation(self, a: Aggregation) -> Self {
        PolicyLossOptions { aggregation: a, ..self }
    }
    /// Sets the normaliser.
    pub fn normaliser(self, n: Normaliser) -> Self {
        PolicyLossOptions { normaliser: n, ..self }
    }

    /// The dual clip as a bound on the ratio (`+inf` without one, or for other objectives).
    pub(crate) fn dual_bound(&self) -> f32 {
        match (self.objective, self.dual_clip) {
            (PolicyObjective::Clip, Some(c)) => c,
            _ => f32::INFINITY,
        }
    }

    pub(crate) fn validate(&self) -> Result<()> {
        let bad = |name: &'static str, v: f32, expected: &'static str| {
            Err(Error::InvalidOption { name, value: v.to_string(), expected })
        };
        if self.objective == PolicyObjective::Gmpo {
            if !(self.clip_low.is_finite() && self.clip_low >= 0.0) {
                return bad("clip_low", self.clip_low, "a finite log-space ε_low ≥ 0 (GMPO)");
            }
        } else if !(self.clip_low.is_finite() && (0.0..=1.0).contains(&self.clip_low)) {
            return bad("clip_low", self.clip_low, "ε_low in [0, 1]");
        }
        if !(self.clip_high.is_finite() && self.clip_high >= 0.0) {
            return bad("clip_high", self.clip_high, "a finite ε_high ≥ 0");
        }
        if let Some(c) = self.dual_clip
            && !(c.is_finite() && c > 1.0 && c >= 1.0 + self.clip_high)
        {
            return bad("dual_clip", c, "a finite c > 1 + ε_high");
        }
        if let Some(c) = self.log_ratio_clamp
            && !(c.is_finite() && c > 0.0 && c <= 80.0)
        {
            return bad("log_ratio_clamp", c, "a clamp in (0, 80] (exp must stay finite), or None");
        }
        if !self.entropy_coef.is_finite() {
            return bad("entropy_coef", self.entropy_coef, "a finite c_H");
        }
        if let PolicyObjective::KlPenalty { beta } = self.objective
            && !beta.is_finite()
        {
            return bad("beta", beta, "a finite β");
        }
        if let PolicyObjective::Sapo { tau_pos, tau_neg } = self.objective {
            for (name, tau) in [("tau_pos", tau_pos), ("tau_neg", tau_neg)] {
                if !(tau.is_finite() && tau > 0.0) {
                    return bad(name, tau, "a finite SAPO temperature τ > 0");
                }
            }
        }
        self.aggregation.validate()?;
        self.normaliser.validate()
    }
}

/// The statistics of one policy-loss call, over the valid tokens of the batch (means use this
/// batch's own token count; the losses use the options' normaliser).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct PolicyLossStats {
    /// `policy_loss − c_H·entropy_loss`: the scalar whose gradient the call wrote.
    pub loss: f64,
    /// The aggregated per-token policy loss.
    pub policy_loss: f64,
    /// The aggregated entropy (same aggregation; 0 without entropies).
    pub entropy_loss: f64,
    /// Share of valid tokens clipped below (`A < 0`, ratio `< 1 − ε_low`; GSPO: the sequence
    /// ratio; CISPO: any `A`; GMPO: `A < 0`, `lr < −ε_low`; SAPO: 0).
    pub clip_fraction_low: f64,
    /// Share clipped above (`A > 0`, ratio `> 1 + ε_high`; CISPO: any `A`; GMPO: `A > 0`,
    /// `lr > ε_high`; SAPO: 0).
    pub clip_fraction_high: f64,
    /// Share under the dual clip (`A < 0`, ratio `> c`).
    pub dual_clip_fraction: f64,
    /// Mean of `old_logp − logp` (k1 estimate of `KL[π_old ‖ π]`).
    pub approx_kl_k1: f64,
    /// Mean of `(r − 1) − log r` (k3 estimate of `KL[π_old ‖ π]`).
    pub approx_kl_k3: f64,
    /// Mean token ratio `r` (the clamped one).
    pub ratio_mean: f64,
    /// Smallest token ratio (`+inf` for an empty batch).
    pub ratio_min: f64,
    /// Largest token ratio (`−inf` for an empty batch).
    pub ratio_max: f64,
    /// Masked mean of the entropy (0 without entropies).
    pub entropy_mean: f64,
    /// This batch's counts.
    pub counts: BatchCounts,
}

/// Options of the value loss.
///
/// ```
/// use rlhf_kernels::ValueLossOptions;
/// let verl = ValueLossOptions::default().clip(Some(0.5));
/// # let _ = verl;
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub struct ValueLossOptions {
    /// ε_v of the value clip around the old values; `None`: no clip.
    pub clip: Option<f32>,
    /// Coefficient of the loss (and its gradient).
    pub coef: f32,
    /// How per-token losses become one scalar.
    pub aggregation: Aggregation,
    /// Its denominators.
    pub normaliser: Normaliser,
}

impl Default for ValueLossOptions {
    fn default() -> Self {
        ValueLossOptions {
            clip: Some(0.2),
            coef: 1.0,
            aggregation: Aggregation::TokenMean,
            normaliser: Normaliser::Local,
        }
    }
}

impl ValueLossOptions {
    /// Sets ε_v.
    pub fn clip(self, clip: Option<f32>) -> Self {
        ValueLossOptions { clip, ..self }
    }
    /// Sets the coefficient.
    pub fn coef(self, coef: f32) -> Self {
        ValueLossOptions { coef, ..self }
    }
    /// Sets the aggregation.
    pub fn aggregation(self, a: Aggregation) -> Self {
        ValueLossOptions { aggregation: a, ..self }
    }
    /// Sets the normaliser.
    pub fn normaliser(self, n: Normaliser) -> Self {
        ValueLossOptions { normaliser: n, ..self }
    }

    pub(crate) fn validate(&self) -> Result<()> {
        if let Some(c) = self.clip
            && !(c.is_finite() && c >= 0.0)
        {
            return Err(Error::InvalidOption {
                name: "clip",
                value: c.to_string(),
                expected: "a finite ε_v ≥ 0",
            });
        }
        if !self.coef.is_finite() {
            return Err(Error::InvalidOption {
                name: "coef",
                value: self.coef.to_string(),
                expected: "a finite coefficient",
            });
        }
        self.aggregation.validate()?;
        self.normaliser.validate()
    }
}

/// The statistics of one value-loss call.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct ValueLossStats {
    /// `coef ·` the aggregated value loss.
    pub loss: f64,
    /// Share of valid tokens where the clipped error is the larger one.
    pub clip_fraction: f64,
    /// This batch's counts.
    pub counts: BatchCounts,
}

/// What the fused path reports: the policy loss's statistics (the loss includes the entropy
/// bonus) and, with a KL term, its statistics (its loss is separate: add the two).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct FusedPolicyStats {
    /// The policy loss.
    pub policy: PolicyLossStats,
    /// The KL term.
    pub kl: Option<SampledKlStats>,
}

impl FusedPolicyStats {
    /// The scalar whose gradient the fused path wrote: policy loss (with the entropy bonus)
    /// plus the KL term.
    pub fn total_loss(&self) -> f64 {
        self.policy.loss + self.kl.map_or(0.0, |k| k.loss)
    }
}

/// Options of the fused path from logits (`policy_loss_from_logits`): the sampling
/// temperature τ of the token log-probs (the logits are divided by it), the policy loss's
/// options, and the KL term's estimator when the inputs carry reference log-probs. Padding
/// comes from the tokens' mask only: the fused path has no ignore index.
///
/// ```
/// use rlhf_kernels::{FusedPolicyOptions, KlDirection, KlEstimator, PolicyLossOptions, SampledKlOptions};
/// let kl = SampledKlOptions::new(KlEstimator::gradient_of(KlDirection::PolicyRef)).coef(0.05);
/// let opts = FusedPolicyOptions::new(PolicyLossOptions::default().entropy_coef(0.01)).temperature(0.7).kl(kl);
/// assert_eq!(opts.temperature, 0.7);
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub struct FusedPolicyOptions {
    /// Sampling temperature τ > 0 (1 by default).
    pub temperature: f32,
    /// The policy loss.
    pub loss: PolicyLossOptions,
    /// The KL loss term's estimator, coefficient and aggregation; required exactly when the
    /// inputs carry `ref_logp`. With [`SampledKlOptions::bias_correction`] the term is weighted
    /// by `π/π_old` with the loss's `old_logp`, `log(π/π_old)` clamped by the KL options'
    /// `log_ratio_clamp` (not the loss's).
    pub kl: Option<SampledKlOptions>,
}

impl Default for FusedPolicyOptions {
    fn default() -> Self {
        FusedPolicyOptions::new(PolicyLossOptions::default())
    }
}

impl FusedPolicyOptions {
    /// The policy loss `loss` at temperature 1, without a KL term.
    pub fn new(loss: PolicyLossOptions) -> Self {
        FusedPolicyOptions { temperature: 1.0, loss, kl: None }
    }
    /// Sets the sampling temperature.
    pub fn temperature(self, temperature: f32) -> Self {
        FusedPolicyOptions { temperature, ..self }
    }
    /// Adds the KL loss term's options (the inputs then carry `ref_logp`).
    pub fn kl(self, kl: SampledKlOptions) -> Self {
        FusedPolicyOptions { kl: Some(kl), ..self }
    }

    /// The token log-probs' options: this temperature and no ignore index (padding is the
    /// mask's; an unmasked target outside the vocabulary is an error).
    ///
    /// ```
    /// use rlhf_kernels::FusedPolicyOptions;
    /// let lp = FusedPolicyOptions::default().temperature(0.7).logprobs();
    /// assert_eq!((lp.temperature, lp.ignore_index), (0.7, None));
    /// ```
    pub fn logprobs(&self) -> crate::TokenLogprobsOptions {
        crate::TokenLogprobsOptions::default().temperature(self.temperature).ignore_index(None)
    }

    /// Checks the options, and that a KL term has both its options and `ref_logp`
    /// (`has_ref_logp`); returns the KL options when there is a term.
    pub(crate) fn validate(&self, has_ref_logp: bool) -> Result<Option<&SampledKlOptions>> {
        self.logprobs().inv_temperature()?;
        self.loss.validate()?;
        match (&self.kl, has_ref_logp) {
            (Some(kl), true) => Ok(Some(kl)),
            (None, false) => Ok(None),
            (kl, _) => Err(Error::InvalidOption {
                name: "kl",
                value: if kl.is_some() {
                    "KL options without ref_logp"
                } else {
                    "ref_logp without KL options"
                }
                .into(),
                expected: "FusedPolicyOptions::kl exactly when the inputs carry ref_logp",
            }),
        }
    }
}
