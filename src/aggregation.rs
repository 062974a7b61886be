//! Turning per-token losses into the scalar loss (MATH.md §4), shared by the KL and PPO
//! families: four aggregation modes and explicit normalisers.
//!
//! The trap this module exists for: under gradient accumulation or data parallelism a
//! micro-batch sees only part of the mini-batch, and dividing by the micro-batch's own token
//! or sequence count gives a different loss *and gradient* than the full batch (TRL #3021,
//! verl #3741). Pass [`Normaliser::Global`] with the whole mini-batch's counts, summed across
//! micro-batches and ranks, and the accumulated gradients equal the full-batch gradient.
//!
//! ```
//! use rlhf_kernels::{Aggregation, Normaliser, RowShape};
//! // Two micro-batches of one sequence each, of 1 and 3 valid tokens, per-token loss 1.
//! let (a, b) = ([1.0f32, 0.0, 0.0], [1.0f32, 1.0, 1.0]);
//! let (ma, mb) = ([1u8, 0, 0], [1u8, 1, 1]);
//! let shape = RowShape::new(1, 3);
//! // Local token-mean: each micro-batch divides by its own count: 1/1 + 3/3 = 2 (wrong).
//! let local = |v: &[f32], m: &[u8]| Aggregation::TokenMean.aggregate(v, shape, Some(m), Normaliser::Local).unwrap();
//! assert_eq!(local(&a, &ma) + local(&b, &mb), 2.0);
//! // Global: both divide by the mini-batch's 4 valid tokens: 1/4 + 3/4 = 1, the full-batch loss.
//! let global = Normaliser::Global { valid_tokens: 4.0, valid_sequences: 2.0, sequences: 2.0 };
//! let g = |v: &[f32], m: &[u8]| Aggregation::TokenMean.aggregate(v, shape, Some(m), global).unwrap();
//! assert_eq!(g(&a, &ma) + g(&b, &mb), 1.0);
//! ```

use crate::{Error, Result, RowShape};

/// How masked per-token values `L[i, t]` of a `[B, T]` batch become one scalar.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Aggregation {
    /// `Σ mask·L / Σ mask`: every valid token weighs the same.
    TokenMean,
    /// `(1/B_valid)·Σ_i Σ_t mask·L`: sum over each sequence, mean over sequences.
    SeqMeanTokenSum,
    /// `(1/B_valid)·Σ_i (Σ_t mask·L / Σ_t mask)`: mean over each sequence, then over sequences.
    SeqMeanTokenMean,
    /// `Σ mask·L / (B·T_max)` (Dr. GRPO): a constant denominator, with `T_max` the configured
    /// maximum response length (not the padded width) and `B` the number of sequences. verl
    /// divides by `T_max` alone; multiply by `B` to compare.
    SeqMeanTokenSumNorm {
        /// The configured maximum response length `T_max`.
        max_len: usize,
    },
}

/// The denominators of an [`Aggregation`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Normaliser {
    /// Counted from this batch: right when this batch is the whole mini-batch.
    Local,
    /// The whole mini-batch's counts across micro-batches and ranks, supplied by the caller.
    Global {
        /// Valid tokens `Σ mask` (token-mean).
        valid_tokens: f64,
        /// Sequences with at least one valid token, `B_valid` (the seq-mean modes).
        valid_sequences: f64,
        /// All sequences, `B` (seq-mean-token-sum-norm).
        sequences: f64,
    },
}

/// An aggregated value and the batch's own counts: the batch statistic of
/// [`ExactKlOutputs::statistic`](crate::ExactKlOutputs) and of the CUDA `aggregate`.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Aggregated {
    /// The aggregated value (the loss, or the masked mean for [`Aggregation::TokenMean`]).
    pub value: f64,
    /// This batch's own counts (what [`Normaliser::Local`] divides by).
    pub counts: BatchCounts,
}

/// Counts of one batch: what [`Normaliser::Local`] divides by.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct BatchCounts {
    /// Valid tokens.
    pub valid_tokens: f64,
    /// Sequences with at least one valid token.
    pub valid_sequences: f64,
    /// All sequences.
    pub sequences: f64,
}

impl BatchCounts {
    /// Counts `mask` (`None`: every token valid) over `shape` (rows = sequences).
    pub fn of(shape: RowShape, mask: Option<&[u8]>) -> Self {
        let mut c = BatchCounts { sequences: shape.rows as f64, ..Default::default() };
        for i in 0..shape.rows {
            let n = valid_in_row(shape, mask, i);
            c.valid_tokens += n as f64;
            c.valid_sequences += f64::from(u8::from(n > 0));
        }
        c
    }
}

/// Valid tokens of row `i`.
pub(crate) fn valid_in_row(shape: RowShape, mask: Option<&[u8]>, i: usize) -> usize {
    match mask {
        Some(m) => m[shape.row_range(i)].iter().filter(|&&b| b != 0).count(),
        None => shape.cols,
    }
}

impl Normaliser {
    /// The counts to divide by: the supplied ones, or `local`'s.
    pub fn counts(self, local: BatchCounts) -> BatchCounts {
        match self {
            Normaliser::Local => local,
            Normaliser::Global { valid_tokens, valid_sequences, sequences } => {
                BatchCounts { valid_tokens, valid_sequences, sequences }
            }
        }
    }

    pub(crate) fn validate(self) -> Result<()> {
        if let Normaliser::Global { valid_tokens, valid_sequences, sequences } = self {
            for (name, v) in [
                ("valid_tokens", valid_tokens),
                ("valid_sequences", valid_sequences),
                ("sequences", sequences),
            ] {
                if !(v.is_finite() && v >= 0.0) {
                    return Err(Error::InvalidOption {
                        name,
                        value: v.to_string(),
                        expected: "a finite count >= 0 of the whole mini-batch",
                    });
                }
            }
        }
        Ok(())
    }
}

impl Aggregation {
    /// The kernels' aggregation code and `max_len` (`token_weight` in kernels/aggregation.cuh).
    #[cfg(feature = "cuda")]
    pub(crate) fn code(self) -> (i32, f64) {
        match self {
            Aggregation::TokenMean => (0, 0.0),
            Aggregation::SeqMeanTokenSum => (1, 0.0),
            Aggregation::SeqMeanTokenMean => (2, 0.0),
            Aggregation::SeqMeanTokenSumNorm { max_len } => (3, max_len as f64),
        }
    }

    /// The weight `∂loss/∂L[i, t]` of every valid token of a row with `row_valid` valid tokens:
    /// the loss is `Σ_{i,t} mask·weight·L`. A zero denominator gives weight 0 (an empty batch
    /// has loss 0, never a division by zero).
    pub fn token_weight(self, counts: BatchCounts, row_valid: usize) -> f64 {
        let denominator = match self {
            Aggregation::TokenMean => counts.valid_tokens,
            Aggregation::SeqMeanTokenSum => counts.valid_sequences,
            Aggregation::SeqMeanTokenMean => counts.valid_sequences * row_valid as f64,
            Aggregation::SeqMeanTokenSumNorm { max_len } => counts.sequences * max_len as f64,
        };
        if denominator > 0.0 { 1.0 / denominator } else { 0.0 }
    }

    pub(crate) fn validate(self) -> Result<()> {
        if let Aggregation::SeqMeanTokenSumNorm { max_len: 0 } = self {
            return Err(Error::InvalidOption {
                name: "aggregation.max_len",
                value: "0".into(),
                expected: "the configured maximum response length, > 0",
            });
        }
        Ok(())
    }

    /// Aggregates the `[B, T]` values of `shape` (f64 sums, rows in order).
    ///
    /// Errors: shape errors, an invalid normaliser or `max_len = 0`,
    /// [`RowProblem::NonFinite`](crate::RowProblem::NonFinite) for the lowest sequence with a
    /// NaN at a valid token (masked values are never read), or, when `+inf` and `-inf` values
    /// cancel to NaN, the lowest sequence with an infinite one. An infinite value of one sign
    /// (say `KL[π_ref ‖ π]` where the policy bans a token the reference allows) gives that
    /// infinite aggregate.
    pub fn aggregate(
        self,
        values: &[f32],
        shape: RowShape,
        mask: Option<&[u8]>,
        norm: Normaliser,
    ) -> Result<f64> {
        shape.check_buffer("values", values.len())?;
        if let Some(m) = mask {
            shape.check_buffer("mask", m.len())?;
        }
        self.validate()?;
        norm.validate()?;
        let valid = |t: usize| mask.is_none_or(|m| m[t] != 0);
        let first_row = |bad: &dyn Fn(f32) -> bool| {
            (0..shape.rows).find(|&i| shape.row_range(i).any(|t| valid(t) && bad(values[t])))
        };
        if let Some(row) = first_row(&|v| v.is_nan()) {
            return Err(crate::advantages::non_finite(crate::error::Op::Aggregate, row));
        }
        let counts = norm.counts(BatchCounts::of(shape, mask));
        let mut total = 0.0;
        for i in 0..shape.rows {
            let w = self.token_weight(counts, valid_in_row(shape, mask, i));
            let row = shape.row_range(i);
            let sum: f64 = match mask {
                Some(m) => values[row.clone()]
                    .iter()
                    .zip(&m[row])
                    .filter(|(_, b)| **b != 0)
                    .map(|(&v, _)| v as f64)
                    .sum(),
                None => values[row].iter().map(|&v| v as f64).sum(),
            };
            total += w * sum;
        }
        if total.is_nan() {
            // +inf and -inf values (with nonzero weights) met: no defined aggregate.
            let row = first_row(&|v| v.is_infinite()).unwrap_or(0);
            return Err(crate::advantages::non_finite(crate::error::Op::Aggregate, row));
        }
        Ok(total)
    }
}
