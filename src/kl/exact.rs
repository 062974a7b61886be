//! The exact full-vocabulary divergences' vocabulary: which divergence, its options, the
//! batch statistic a call computes along with its per-token values, and the tensor-parallel
//! shard partials with their merge.

use crate::{Aggregation, Error, Normaliser, Result, RowProblem, RowShape};

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
        let kernel = include_str!("../../kernels/kl_exact.cu");
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
