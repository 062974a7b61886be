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
//! `E_{π_old}[ρ·k] = E_π[k]`: the value is the KL of the current policy again, and the gradient
//! `∂(ρ·k)/∂logp = ρ·(k + ∂k/∂logp)` (the first term is the score-function term that sampling
//! from `π` would contribute; it is 0 where the clamp on `ρ` is active) is, in expectation, the
//! full gradient of `E_π[k]` — for k3, `∇KL[π‖ref]`, the penalty's own direction. This is not
//! PPO's importance weighting of the rewards: `ρ` is exact, never clipped to a trust region,
//! and it only undoes the sampling. With it every statistic is a mean of `ρ·k`.
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

use crate::{Aggregation, Error, Normaliser, Result, RowProblem, RowShape};

mod buffers;
pub use buffers::{ExactKlGrads, ExactKlOutputs, ReferenceRows, SampledKlInputs, SampledKlOutputs};
// The CUDA launches and the candle adapter check the bias correction's input on their own.
#[cfg_attr(not(any(feature = "cuda", feature = "candle")), allow(unused_imports))]
pub(crate) use buffers::check_bias_correction;
pub(crate) use buffers::{jsd_beta, shard_count};

mod controller;
pub use controller::KlController;

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
    /// Share of valid tokens where a clamp was active for the chosen estimator.
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

/// The batch statistic an exact divergence call computes along with its per-token values:
/// the `N` values (one per token row) viewed as `sequences` (`[B, T]`, dense, `B·T = N`) and
/// aggregated with `aggregation` under `normaliser`, the row mask of the reference side being
/// the token mask. [`Aggregation::TokenMean`] with [`Normaliser::Local`] is the masked mean.
///
/// ```
/// use rlhf_kernels::{cpu, Aggregated, ExactDivergence, ExactKlOptions, ExactKlOutputs, ExactKlStatistic,
///                    ReferenceRows, RowShape};
/// let (policy, reference) = ([1.0f32, 0.0, 0.0, 0.0], [0.0f32, 0.0, 0.0, 0.0]);
/// let shape = RowShape::new(2, 2); // two tokens of one sequence
/// let (mut kl, mut mean) = ([0.0f32; 2], Aggregated::default());
/// let stat = ExactKlStatistic::masked_mean(RowShape::new(1, 2));
/// let out = ExactKlOutputs::default().value(&mut kl).statistic(&mut mean, stat);
/// let opts = ExactKlOptions::new(ExactDivergence::PolicyRef);
/// cpu::exact_kl(&policy, shape, &ReferenceRows::new(&reference, shape), out, &opts)?;
/// assert!((mean.value - (kl[0] + kl[1]) as f64 / 2.0).abs() < 1e-7);
/// assert_eq!(mean.counts.valid_tokens, 2.0);
/// # Ok::<(), rlhf_kernels::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ExactKlStatistic {
    /// The `[B, T]` view of the token rows.
    pub sequences: RowShape,
    /// How the values become one scalar.
    pub aggregation: Aggregation,
    /// Its denominators.
    pub normaliser: Normaliser,
}

impl ExactKlStatistic {
    /// The masked mean over the valid tokens of `sequences`.
    pub fn masked_mean(sequences: RowShape) -> Self {
        ExactKlStatistic { sequences, aggregation: Aggregation::TokenMean, normaliser: Normaliser::Local }
    }

    /// Checks that `sequences` views `rows` token rows densely, and the options.
    pub(crate) fn validate(&self, rows: usize) -> Result<()> {
        let s = self.sequences;
        s.validate("statistic sequences")?;
        if s.row_stride != s.cols || s.len() != rows {
            return Err(Error::ShapeMismatch {
                what: "statistic sequences",
                min: rows,
                max: rows,
                actual: s.len(),
            });
        }
        self.aggregation.validate()?;
        self.normaliser.validate()
    }
}

/// What the exact full-vocabulary ops compute per token, from the policy's and the reference's
/// logits rows (`p = softmax(z_policy)`, `q = softmax(z_ref)`, `z = logits / τ`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ExactDivergence {
    /// `KL[π ‖ π_ref] = Σ_v p_v·(log p_v − log q_v)`; `+inf` (reported) when the policy puts mass
    /// on a token the reference forbids.
    PolicyRef,
    /// `KL[π_ref ‖ π] = Σ_v q_v·(log q_v − log p_v)`; `+inf` (returned, its gradient `p − q`
    /// stays finite) when the reference puts mass on a token the policy forbids.
    RefPolicy,
    /// Generalised Jensen–Shannon: with `m = β·p + (1 − β)·q`,
    /// `JSD_β = β·KL[p ‖ m] + (1 − β)·KL[q ‖ m]`, always finite. β ∈ (0, 1); ½ is the symmetric
    /// JSD. TRL and Liger mix `β'·teacher + (1 − β')·student`: their β' is `1 − β` here.
    Jsd {
        /// The policy's weight β in the mixture.
        beta: f32,
    },
}

impl ExactDivergence {
    /// The kernels' divergence code and the JSD's β (0 for the two KLs; `divergence` in
    /// kernels/kl_exact.cu).
    #[cfg(feature = "cuda")]
    pub(crate) fn code(self) -> (i32, f32) {
        match self {
            ExactDivergence::PolicyRef => (0, 0.0),
            ExactDivergence::RefPolicy => (1, 0.0),
            ExactDivergence::Jsd { beta } => (2, beta),
        }
    }
}

/// Options of the exact full-vocabulary divergence ops, on every backend.
///
/// ```
/// use rlhf_kernels::{ExactDivergence, ExactKlOptions};
/// let opts = ExactKlOptions::new(ExactDivergence::Jsd { beta: 0.5 }).temperature(0.7);
/// assert_eq!(opts.temperature, 0.7);
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub struct ExactKlOptions {
    /// Which divergence.
    pub divergence: ExactDivergence,
    /// Temperature τ applied to both rows. Default 1.
    pub temperature: f32,
}

impl ExactKlOptions {
    /// `divergence` at τ = 1.
    pub fn new(divergence: ExactDivergence) -> Self {
        ExactKlOptions { divergence, temperature: 1.0 }
    }
    /// Sets τ.
    pub fn temperature(mut self, t: f32) -> Self {
        self.temperature = t;
        self
    }

    /// Checks the options; returns 1/τ.
    pub(crate) fn inv_temperature(&self) -> Result<f32> {
        if let ExactDivergence::Jsd { beta } = self.divergence {
            if !(beta > 0.0 && beta < 1.0) {
                return Err(Error::InvalidOption {
                    name: "jsd beta",
                    value: beta.to_string(),
                    expected: "a mixing weight strictly between 0 and 1",
                });
            }
        }
        crate::TokenLogprobsOptions::default().temperature(self.temperature).inv_temperature()
    }
}

/// Per-row statistics of a vocabulary slice of both logits rows (a tensor-parallel shard):
/// enough to finish `KL[π‖π_ref]`, `KL[π_ref‖π]` and both log-sum-exps once the slices are
/// merged — the exact-KL counterpart of [`VocabPartial`](crate::VocabPartial).
///
/// With `m_p`, `m_q` the largest raw logits of the slice, `e_p = exp((x_p − m_p)/τ)` and
/// `e_q = exp((x_q − m_q)/τ)`: `policy_sum_exp = Σ e_p`, `policy_term = Σ e_p·(z_p − z_q)`,
/// and the same with the roles swapped for the reference. Merging rescales each side to the
/// larger max (the cross terms do not depend on the max, so they scale like the sums).
/// `repr(C)`, 28 bytes, the same layout as the GPU's records.
///
/// For the JSD, shards need two rounds: merge these partials to get both log-sum-exps, then
/// sum each shard's `[Σ p·log(p/m), Σ q·log(q/m)]`
/// ([`cpu::jsd_shard_sums`](crate::cpu::jsd_shard_sums)) in shard order:
/// `JSD_β = β·Σ_shards s_p + (1 − β)·Σ_shards s_q`. On the GPU the same recipe is
/// `cuda::exact_kl_shard_partials`, `cuda::finish_exact_kl_partials`, `cuda::jsd_shard_sums`
/// and `cuda::finish_jsd_sums`, over partials gathered as `[shards][rows]`.
///
/// ```
/// use rlhf_kernels::{cpu, merge_exact_kl_partials, ExactDivergence, ExactKlOptions, ExactKlOutputs, ExactKlPartial,
///                    ReferenceRows, RowShape};
/// let p: Vec<f32> = (0..600).map(|v| (v as f32 * 0.37).sin() * 3.0).collect();
/// let q: Vec<f32> = (0..600).map(|v| (v as f32 * 0.37).sin() * 3.0 + (v as f32 * 0.11).cos()).collect();
/// let opts = ExactKlOptions::new(ExactDivergence::PolicyRef);
/// let mut parts = Vec::new();
/// for s in 0..3 {
///     let cols = s * 200..(s + 1) * 200;
///     let shape = RowShape::new(1, 200);
///     let mut part = [ExactKlPartial::EMPTY];
///     cpu::exact_kl_shard_partials(&p[cols.clone()], shape, &ReferenceRows::new(&q[cols], shape), &mut part, &opts)?;
///     parts.push(part[0]); // ... all-gather across ranks here ...
/// }
/// let kl = merge_exact_kl_partials(&parts, &opts)?.finish(&opts).unwrap().value;
/// let mut whole = [0.0f32];
/// let shape = RowShape::new(1, 600);
/// cpu::exact_kl(&p, shape, &ReferenceRows::new(&q, shape), ExactKlOutputs::default().value(&mut whole), &opts)?;
/// assert!((kl - whole[0]).abs() < 1e-5);
/// # Ok::<(), rlhf_kernels::Error>(())
/// ```
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct ExactKlPartial {
    /// Largest raw policy logit of the slice.
    pub policy_max: f32,
    /// `Σ e_p`.
    pub policy_sum_exp: f32,
    /// `Σ e_p·(z_p − z_q)`.
    pub policy_term: f32,
    /// Largest raw reference logit of the slice.
    pub ref_max: f32,
    /// `Σ e_q`.
    pub ref_sum_exp: f32,
    /// `Σ e_q·(z_q − z_p)`.
    pub ref_term: f32,
    /// Bits: [`ExactKlPartial::POLICY_NAN`], `POLICY_POS_INF`, `REF_NAN`, `REF_POS_INF`.
    pub flags: u32,
}

// The layout the kernels write and every shard gathers (`PairPartial` in kernels/kl_exact.cu pins
// the same): on every build, with or without the `cuda` feature.
pin_layout!(ExactKlPartial, 28, {
    policy_max: 0, policy_sum_exp: 4, policy_term: 8, ref_max: 12, ref_sum_exp: 16, ref_term: 20,
    flags: 24,
});

/// Both log-sum-exps of a row and one exact divergence.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ExactKlStats {
    /// The divergence.
    pub value: f32,
    /// `ln Σ exp(z_policy)`.
    pub policy_lse: f32,
    /// `ln Σ exp(z_ref)`.
    pub ref_lse: f32,
}

impl ExactKlPartial {
    /// A NaN on the policy side.
    pub const POLICY_NAN: u32 = 1;
    /// A `+inf` on the policy side.
    pub const POLICY_POS_INF: u32 = 2;
    /// A NaN on the reference side.
    pub const REF_NAN: u32 = 4;
    /// A `+inf` on the reference side.
    pub const REF_POS_INF: u32 = 8;
    /// The partial of an empty slice: the identity of [`merge`](Self::merge).
    pub const EMPTY: ExactKlPartial = ExactKlPartial {
        policy_max: f32::NEG_INFINITY,
        policy_sum_exp: 0.0,
        policy_term: 0.0,
        ref_max: f32::NEG_INFINITY,
        ref_sum_exp: 0.0,
        ref_term: 0.0,
        flags: 0,
    };

    /// Combines two slices of the same row (self first, in vocabulary order).
    pub fn merge(&self, other: &ExactKlPartial, inv_tau: f32) -> ExactKlPartial {
        let side = |(m1, s1, a1): (f32, f32, f32), (m2, s2, a2): (f32, f32, f32)| {
            if m2 == f32::NEG_INFINITY {
                return (m1, s1, a1);
            }
            if m1 == f32::NEG_INFINITY {
                return (m2, s2, a2);
            }
            let m = m1.max(m2);
            let (f1, f2) = (((m1 - m) * inv_tau).exp(), ((m2 - m) * inv_tau).exp());
            // A side rescaled to 0 contributes exactly 0 (its term may be +inf).
            let term = |f: f32, a: f32| if f > 0.0 { f * a } else { 0.0 };
            (m, f1 * s1 + f2 * s2, term(f1, a1) + term(f2, a2))
        };
        let (policy_max, policy_sum_exp, policy_term) = side(
            (self.policy_max, self.policy_sum_exp, self.policy_term),
            (other.policy_max, other.policy_sum_exp, other.policy_term),
        );
        let (ref_max, ref_sum_exp, ref_term) = side(
            (self.ref_max, self.ref_sum_exp, self.ref_term),
            (other.ref_max, other.ref_sum_exp, other.ref_term),
        );
        ExactKlPartial {
            policy_max,
            policy_sum_exp,
            policy_term,
            ref_max,
            ref_sum_exp,
            ref_term,
            flags: self.flags | other.flags,
        }
    }

    /// The row's divergence (`KL[π‖π_ref]` or `KL[π_ref‖π]`; for the JSD the two
    /// log-sum-exps with `value` 0, see the type's docs) or why it has none.
    pub fn finish(&self, opts: &ExactKlOptions) -> Result<ExactKlStats, RowProblem> {
        let inv_tau = opts.inv_temperature().map_err(|_| RowProblem::NaN)?;
        let f = self.flags;
        if f & (Self::POLICY_NAN | Self::REF_NAN) != 0 {
            return Err(RowProblem::NaN);
        }
        if f & (Self::POLICY_POS_INF | Self::REF_POS_INF) != 0 {
            return Err(RowProblem::PosInf);
        }
        if self.policy_max == f32::NEG_INFINITY || self.ref_max == f32::NEG_INFINITY {
            return Err(RowProblem::AllNegInf);
        }
        let (ln_p, ln_q) = (self.policy_sum_exp.ln(), self.ref_sum_exp.ln());
        let policy_lse = self.policy_max * inv_tau + ln_p;
        let ref_lse = self.ref_max * inv_tau + ln_q;
        if !(policy_lse.is_finite() && ref_lse.is_finite()) {
            return Err(RowProblem::Overflow);
        }
        let value = match opts.divergence {
            ExactDivergence::PolicyRef => {
                let kl = (self.policy_term / self.policy_sum_exp
                    + (self.ref_max - self.policy_max) * inv_tau
                    + (ln_q - ln_p))
                    .max(0.0);
                if kl == f32::INFINITY {
                    return Err(RowProblem::InfiniteKl);
                }
                kl
            }
            ExactDivergence::RefPolicy => (self.ref_term / self.ref_sum_exp
                + (self.policy_max - self.ref_max) * inv_tau
                + (ln_p - ln_q))
                .max(0.0),
            ExactDivergence::Jsd { .. } => 0.0,
        };
        Ok(ExactKlStats { value, policy_lse, ref_lse })
    }
}

/// Folds the exact-KL partials of one row's slices, in order (shard 0 first). Pure and
/// deterministic.
pub fn merge_exact_kl_partials(parts: &[ExactKlPartial], opts: &ExactKlOptions) -> Result<ExactKlPartial> {
    let inv_tau = opts.inv_temperature()?;
    Ok(parts.iter().fold(ExactKlPartial::EMPTY, |acc, p| acc.merge(p, inv_tau)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The GPU writes `ExactKlPartial` records itself: its flag bits must be ours.
    #[test]
    fn partial_flags_match_the_kernels() {
        let kernel = include_str!("../kernels/kl_exact.cu");
        let line = format!(
            "PAIR_P_NAN = {}, PAIR_P_POS_INF = {}, PAIR_Q_NAN = {}, PAIR_Q_POS_INF = {};",
            ExactKlPartial::POLICY_NAN,
            ExactKlPartial::POLICY_POS_INF,
            ExactKlPartial::REF_NAN,
            ExactKlPartial::REF_POS_INF
        );
        assert!(kernel.contains(&line), "kernels/kl_exact.cu lacks `{line}`");
        assert_eq!(std::mem::size_of::<ExactKlPartial>(), 28, "PairPartial is 6 f32 and a u32");
    }
}
