//! The KL family's shared vocabulary (MATH.md §2): directions, sampled estimators, options,
//! batch statistics and the KL-coefficient controllers.
//!
//! # Which KL, and where it goes
//!
//! The RLHF objective `E[r − β·log(π/π_ref)]` penalises, token by token, a *single-sample*
//! estimate of `KL[π ‖ π_ref]`: averaged over tokens sampled from the current policy it is the
//! KL with the policy first. Two consequences shape this module:
//!
//! - **Placement.** The penalty can be folded into the per-token rewards
//!   (`r_t = −β·kl_t`, the sequence score on the last valid token: see
//!   [`cpu::kl_rewards`](crate::cpu::kl_rewards)), where it enters the advantages; or kept as a
//!   loss term of its own (GRPO style: [`cpu::sampled_kl`](crate::cpu::sampled_kl) with its
//!   gradient). As a loss term it must *not* be multiplied by PPO's importance ratio
//!   `π/π_old`: the KL is a property of the current policy, differentiated where the policy
//!   is now, not a reward collected by the old one. Folding it into rewards is equivalent only
//!   for the plain on-policy gradient.
//! - **Direction.** PPO's trust region is `KL[π_old ‖ π]` (old first); the penalty above is
//!   `KL[π ‖ π_ref]` (new first). `KL[π ‖ π_ref]` grows when the policy puts mass where the
//!   reference has little: it keeps the policy from inventing improbable tokens
//!   (conservative). `KL[π_ref ‖ π]` grows when the policy drops mass the reference has: it
//!   lets the policy add new tokens (mass-covering, exploring). Every entry point names its
//!   direction by argument order — [`KlDirection::PolicyRef`] or [`KlDirection::RefPolicy`] —
//!   never "forward" or "reverse", words the literature uses both ways.
//!
//! # Sampled estimators and their gradients
//!
//! With `r = π_ref(y)/π(y)` for a token `y` sampled from `π` (`log r = ref_logp − logp`):
//!
//! | estimator | value | ∂/∂logp | unbiased for | its gradient as a loss, in expectation |
//! | --- | --- | --- | --- | --- |
//! | `K1` | `−log r` | `1` | KL[π‖ref] | `0`: no gradient at all |
//! | `K2` | `½(log r)²` | `−log r` | (biased) | `∇KL[π‖ref]` |
//! | `K3` | `(r − 1) − log r` | `1 − r` | KL[π‖ref] | `∇KL[ref‖π]`: the *other* direction |
//! | `Abs` | `|log r|` | `sign(logp − ref_logp)` | (biased) | `∇‖π − π_ref‖₁` |
//! | `K1Rev` | `r·log r` | `−r(log r + 1)` | KL[ref‖π] | `∇(KL[ref‖π] + ½E_ref[log² r])` |
//! | `K3Rev` | `r·log r − (r − 1)` | `−r·log r` | KL[ref‖π] | `∇½E_ref[log² r]` |
//!
//! The last column is what autograd yields for a KL loss term with the samples held fixed:
//! `E_π[∂k/∂logp · ∇logp]`. For k3, `E_π[(1 − r)∇logp] = Σ_y (π − π_ref)∇logπ = ∇KL[ref‖π]`
//! (using `Σ π_ref ∇log π = −∇KL[ref‖π]` and `Σ π∇log π = 0`): the popular "k3 in the loss"
//! optimises the mass-covering direction although its value estimates the conservative one.
//!
//! **Gradient-correct estimators.** Name the KL whose gradient you want and
//! [`KlEstimator::gradient_of`] picks the matching pair (a straight-through estimator, verl's
//! `k3+`): for `KL[π‖ref]` the value of k3 (unbiased, low variance) with the gradient of k2
//! (`−log r`, whose expectation is `∇KL[π‖ref]`); for `KL[ref‖π]` the value of k3_rev
//! (unbiased for that direction) with the gradient of k3 (`1 − r`, expectation
//! `∇KL[ref‖π]`).
//!
//! **Bias correction** ([`SampledKlOptions::bias_correction`], DeepSeek-V3.2's unbiased KL
//! estimate, TRL's `use_bias_correction_kl`). The tokens of a PPO mini-batch were sampled by
//! `π_old` (or the inference engine's μ), not by the current `π`, so `E[k]` over them estimates
//! the KL at the wrong policy once `π` has moved. Weighting each token by the importance ratio
//! `ρ = π(y)/π_old(y) = exp(clamp(logp − old_logp, ±log_ratio_clamp))`, *not* detached, gives
//! `E_{π_old}[ρ·k] = E_π[k]`: the value is the KL of the current policy again. The gradient
//! written is `∂(ρ·k)/∂logp = ρ·(k + ∂k/∂logp)` (the first term is the score-function term
//! that sampling from `π` would contribute; it is 0 where the clamp on `ρ` is active), whose
//! expectation is the full gradient `∇E_π[k]`: for the unbiased estimators k1 and k3 that is
//! `∇KL[π‖ref]`, the penalty's own direction, for k1_rev and k3_rev `∇KL[ref‖π]` (the last
//! column of the table above describes the uncorrected estimators; k2 and abs give the
//! gradients of `E_π[½(log r)²]` and `E_π[|log r|]`). The gradient-correct pairs keep their
//! promise instead: their surrogate gradient already is a score-function estimate, so it is
//! weighted, `ρ·g`, without the extra term, and `E_{π_old}[ρ·g·∇log π] = E_π[g·∇log π]` is
//! `∇KL[π‖ref]` (`GradPolicyRef`) or `∇KL[ref‖π]` (`GradRefPolicy`) as without the
//! correction. This is not PPO's importance weighting of the rewards: `ρ` is exact, never
//! clipped to a trust region, and it only undoes the sampling. With it every statistic is a
//! mean of `ρ·k`; the clamped fraction counts the estimator's clamps, not `ρ`'s.
//!
//! **Clamps.** `log r` is clamped to `±log_ratio_clamp` (default 20, as verl) before any
//! `exp`, and the exp-based values (k3, k1_rev, k3_rev) to `±value_clamp` (default 10, verl's
//! k3 clamp); the gradient is 0 where a clamp is active. k1, k2 and abs take `log r` as it is.
//! The clamps stabilise training but bias the estimates where they are active (a policy far
//! from the reference: k3's mean then falls below the KL); `None` turns them off.
//!
//! # Exact divergences and their batch statistics
//!
//! [`ExactKlOptions`] configures the full-vocabulary divergences between two logits rows
//! (`cpu::exact_kl`, `cuda::exact_kl`: one value per token, rows = tokens), and
//! [`ExactKlPartial`] their tensor-parallel form. Their batch statistic comes out of the same
//! call when the outputs ask for it with an [`ExactKlStatistic`]: the per-token values viewed
//! as `[B, T]` and aggregated like any loss (same modes and normalisers as the sampled
//! statistics; on the GPU two small kernels over the `B·T` values, after the pass over the
//! `B·T·V` logits).

use crate::{Aggregation, Error, Normaliser, Result};

mod buffers;
pub use buffers::{ExactKlGrads, ExactKlOutputs, ReferenceRows, SampledKlInputs, SampledKlOutputs};
// The CUDA launches and the candle adapter check the bias correction's input on their own.
#[cfg_attr(not(any(feature = "cuda", feature = "candle")), allow(unused_imports))]
pub(crate) use buffers::check_bias_correction;
pub(crate) use buffers::{jsd_beta, shard_count};

mod controller;
pub use controller::KlController;

mod exact;
pub use exact::{
    ExactDivergence, ExactKlOptions, ExactKlPartial, ExactKlStatistic, ExactKlStats, merge_exact_kl_partials,
};

mod rewards;
pub use rewards::{KlRewardsInputs, KlRewardsOptions};

/// A KL divergence, named by argument order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KlDirection {
    /// `KL[π ‖ π_ref] = Σ π·log(π/π_ref)`: the RLHF penalty's direction (conservative).
    PolicyRef,
    /// `KL[π_ref ‖ π] = Σ π_ref·log(π_ref/π)` (mass-covering).
    RefPolicy,
}

/// A sampled per-token KL estimator (module docs: values, gradients, biases).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KlEstimator {
    /// `−log r`.
    K1,
    /// `½(log r)²`.
    K2,
    /// `(r − 1) − log r` (verl's `low_var_kl`).
    K3,
    /// `|log r|`.
    Abs,
    /// `r·log r`.
    K1Rev,
    /// `r·log r − (r − 1)`.
    K3Rev,
    /// Value of k3, gradient of k2: expected gradient `∇KL[π‖ref]` (verl's `k3+`).
    GradPolicyRef,
    /// Value of k3_rev, gradient of k3: expected gradient `∇KL[ref‖π]`.
    GradRefPolicy,
}

impl KlEstimator {
    /// Every estimator, in the order of [`SampledKlStats::means`].
    pub const ALL: [KlEstimator; 8] = [
        KlEstimator::K1,
        KlEstimator::K2,
        KlEstimator::K3,
        KlEstimator::Abs,
        KlEstimator::K1Rev,
        KlEstimator::K3Rev,
        KlEstimator::GradPolicyRef,
        KlEstimator::GradRefPolicy,
    ];

    /// The estimator whose loss gradient is, in expectation, the gradient of `direction`.
    ///
    /// ```
    /// use rlhf_kernels::{KlDirection, KlEstimator};
    /// assert_eq!(KlEstimator::gradient_of(KlDirection::PolicyRef), KlEstimator::GradPolicyRef);
    /// ```
    pub fn gradient_of(direction: KlDirection) -> KlEstimator {
        match direction {
            KlDirection::PolicyRef => KlEstimator::GradPolicyRef,
            KlDirection::RefPolicy => KlEstimator::GradRefPolicy,
        }
    }

    /// The gradient-correct pairs (value of one estimator, gradient of another).
    pub(crate) const fn is_straight_through(self) -> bool {
        matches!(self, KlEstimator::GradPolicyRef | KlEstimator::GradRefPolicy)
    }

    /// The KL whose value this estimator estimates (with or without bias).
    pub fn value_direction(self) -> KlDirection {
        match self {
            KlEstimator::K1Rev | KlEstimator::K3Rev | KlEstimator::GradRefPolicy => KlDirection::RefPolicy,
            _ => KlDirection::PolicyRef,
        }
    }

    /// Code shared with the kernels (`kernels/kl_sampled.cu`).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub(crate) fn code(self) -> i32 {
        Self::ALL.iter().position(|&e| e == self).expect("listed in ALL") as i32
    }
}

/// Options of [`cpu::sampled_kl`](crate::cpu::sampled_kl) and its CUDA twin.
///
/// ```
/// use rlhf_kernels::{Aggregation, KlEstimator, Normaliser, SampledKlOptions};
/// let opts = SampledKlOptions::new(KlEstimator::K3)
///     .coef(0.001)
///     .aggregation(Aggregation::TokenMean)
///     .normaliser(Normaliser::Global { valid_tokens: 65536.0, valid_sequences: 64.0, sequences: 64.0 });
/// assert_eq!(opts.log_ratio_clamp, Some(20.0));
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub struct SampledKlOptions {
    /// The estimator whose values, loss and gradient are produced.
    pub estimator: KlEstimator,
    /// `|log r|` limit applied before any `exp` (default `Some(20.0)`, as verl).
    pub log_ratio_clamp: Option<f32>,
    /// Limit of the exp-based values k3, k1_rev, k3_rev (default `Some(10.0)`, verl's k3 clamp).
    pub value_clamp: Option<f32>,
    /// The loss coefficient β: `loss = β·aggregate(k)` and the gradient is scaled by it.
    /// Default 1.
    pub coef: f32,
    /// How per-token values become the loss and the statistics. Default token-mean.
    pub aggregation: Aggregation,
    /// Denominators of the aggregation. Default [`Normaliser::Local`].
    pub normaliser: Normaliser,
    /// Weight each token's estimate by `ρ = π/π_old`, not detached (module docs: the
    /// bias-corrected KL). The inputs then carry `old_logp`; `log ρ` is clamped with
    /// `log_ratio_clamp`. Default `false`.
    pub bias_correction: bool,
}

impl SampledKlOptions {
    /// Defaults for `estimator`: clamps 20 and 10, β = 1, token-mean, local denominators, no
    /// bias correction.
    pub fn new(estimator: KlEstimator) -> Self {
        SampledKlOptions {
            estimator,
            log_ratio_clamp: Some(20.0),
            value_clamp: Some(10.0),
            coef: 1.0,
            aggregation: Aggregation::TokenMean,
            normaliser: Normaliser::Local,
            bias_correction: false,
        }
    }
    /// Sets the bias correction (the inputs must then carry `old_logp`).
    ///
    /// ```
    /// use rlhf_kernels::{cpu, KlEstimator, RowShape, SampledKlInputs, SampledKlOptions};
    /// // TRL's use_bias_correction_kl: k3 times the unclamped ratio π/π_old.
    /// let opts = SampledKlOptions::new(KlEstimator::K3).bias_correction(true).log_ratio_clamp(None).value_clamp(None);
    /// let (logp, ref_logp, old) = ([-1.0f32], [-1.5f32], [-1.2f32]);
    /// let inputs = SampledKlInputs::new(RowShape::new(1, 1), &logp, &ref_logp).old_logp(&old);
    /// let stats = cpu::sampled_kl(&inputs, Default::default(), &opts)?;
    /// let k3 = (-0.5f64).exp() - 1.0 + 0.5;
    /// assert!((stats.loss - 0.2f64.exp() * k3).abs() < 1e-6);
    /// assert!(cpu::sampled_kl(&SampledKlInputs::new(RowShape::new(1, 1), &logp, &ref_logp), Default::default(), &opts).is_err());
    /// # Ok::<(), rlhf_kernels::Error>(())
    /// ```
    pub fn bias_correction(mut self, on: bool) -> Self {
        self.bias_correction = on;
        self
    }
    /// Sets the `|log r|` clamp (`None`: no clamp).
    pub fn log_ratio_clamp(mut self, c: Option<f32>) -> Self {
        self.log_ratio_clamp = c;
        self
    }
    /// Sets the clamp of the exp-based values (`None`: no clamp).
    pub fn value_clamp(mut self, c: Option<f32>) -> Self {
        self.value_clamp = c;
        self
    }
    /// Sets β.
    pub fn coef(mut self, coef: f32) -> Self {
        self.coef = coef;
        self
    }
    /// Sets the aggregation.
    pub fn aggregation(mut self, a: Aggregation) -> Self {
        self.aggregation = a;
        self
    }
    /// Sets the normaliser.
    pub fn normaliser(mut self, n: Normaliser) -> Self {
        self.normaliser = n;
        self
    }

    /// Clamps as finite positive limits (`+inf` when off), after checking every option.
    pub(crate) fn limits(&self) -> Result<(f32, f32)> {
        let check = |name, c: Option<f32>| match c {
            None => Ok(f32::INFINITY),
            Some(v) if v > 0.0 && !v.is_nan() => Ok(v),
            Some(v) => {
                Err(Error::InvalidOption { name, value: v.to_string(), expected: "a clamp > 0, or None" })
            }
        };
        if !self.coef.is_finite() {
            return Err(Error::InvalidOption {
                name: "coef",
                value: self.coef.to_string(),
                expected: "a finite β",
            });
        }
        self.aggregation.validate()?;
        self.normaliser.validate()?;
        Ok((check("log_ratio_clamp", self.log_ratio_clamp)?, check("value_clamp", self.value_clamp)?))
    }
}

/// Batch statistics of a sampled-KL call: the loss and every estimator aggregated with the
/// call's aggregation and normaliser (all in the same pass).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct SampledKlStats {
    /// `β·aggregate(k)` of the chosen estimator.
    pub loss: f64,
    /// `aggregate` of each estimator, in [`KlEstimator::ALL`] order.
    pub means: [f64; 8],
    /// Share of valid tokens where a clamp was active for the chosen estimator (the clamp of
    /// the bias correction's `ρ` is not counted).
    pub clamped_fraction: f64,
    /// The counts of this batch (whatever the normaliser).
    pub counts: crate::BatchCounts,
}

impl SampledKlStats {
    /// The aggregated value of `e`.
    pub fn mean(&self, e: KlEstimator) -> f64 {
        self.means[e.code() as usize]
    }
}
