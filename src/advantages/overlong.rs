//! DAPO's overlong reward shaping: its inputs and options, generic over the memory, and the
//! checks every backend makes before it writes.

use crate::memory::{Buffer, Host, IntoView, Memory};
use crate::{Error, Result, RowShape};

/// The longest response the op counts (2^24 tokens: exact in the GPU's f32 count).
const MAX_RESPONSE: usize = 1 << 24;

/// The inputs of `overlong_shaping`: one outcome score per sequence of a `[B, T]` batch and
/// the token mask whose valid tokens are each response's length (`T` for every sequence
/// without a mask). `M` is where the buffers live ([`Host`] by default, `Cuda` for device
/// views).
///
/// ```
/// use rlhf_kernels::{OverlongInputs, RowShape};
/// let (scores, mask) = ([1.0f32, 0.0], [1u8, 1, 1, 1, 0, 0]);
/// let inputs = OverlongInputs::new(RowShape::new(2, 3), &scores).mask(&mask);
/// assert!(inputs.mask.is_some());
/// ```
#[derive(Debug, Clone, Copy)]
pub struct OverlongInputs<'a, M: Memory = Host> {
    /// `[B, T]` of the mask (row stride allowed).
    pub shape: RowShape,
    /// One score per sequence (`shape.rows`).
    pub scores: M::View<'a, f32>,
    /// One byte per token (0 = padding), or `None`.
    pub mask: Option<M::View<'a, u8>>,
}

impl<'a, M: Memory> OverlongInputs<'a, M> {
    /// The scores of `shape.rows` sequences, every token valid.
    pub fn new(shape: RowShape, scores: impl IntoView<'a, f32, Memory = M>) -> Self {
        OverlongInputs { shape, scores: scores.into_view(), mask: None }
    }
    /// Adds the token mask.
    pub fn mask(self, m: impl IntoView<'a, u8, Memory = M>) -> Self {
        OverlongInputs { mask: Some(m.into_view()), ..self }
    }

    /// The checks every backend makes before it writes: one score and one output per
    /// sequence, a mask covering the shape, valid options.
    pub(crate) fn validate(&self, shaped_len: usize, opts: &OverlongOptions) -> Result<()> {
        let s = self.shape;
        s.validate("overlong shaping")?;
        if let Some(m) = &self.mask {
            s.check_buffer("mask", m.len())?;
        }
        crate::logprobs::check_len("scores", self.scores.len(), s.rows)?;
        crate::logprobs::check_len("shaped scores", shaped_len, s.rows)?;
        // The GPU counts a row's valid tokens in f32, exact up to 2^24.
        if s.cols > MAX_RESPONSE {
            return Err(Error::InvalidOption {
                name: "cols",
                value: s.cols.to_string(),
                expected: "responses of at most 2^24 tokens",
            });
        }
        opts.validate()
    }
}

/// DAPO's overlong reward shaping (Yu et al. 2025, arXiv:2503.14476, §3.4; verl's
/// `overlong_buffer` in `verl/workers/reward_manager/dapo.py`): a response of `L` tokens, with
/// `L_max = max_len` the generation limit and `L_buf = buffer_len` the soft band before it,
/// gets its score plus
///
/// ```text
///                  0                                   L ≤ L_max − L_buf
/// R_len(L) = −penalty·(L − (L_max − L_buf))/L_buf      L_max − L_buf < L ≤ L_max
///                  −penalty                            L > L_max
/// ```
///
/// (`penalty` is verl's `penalty_factor`, 1 in the paper). verl computes the middle line
/// without the last one, capped at 0 only; the two agree because a response never exceeds
/// `L_max` there. The shaped scores feed [`cpu::group_advantages`](crate::cpu::group_advantages)
/// or GAE's per-sequence scores.
///
/// ```
/// use rlhf_kernels::OverlongOptions;
/// let opts = OverlongOptions::new(20480, 4096).penalty(1.0);
/// assert_eq!((opts.reward(16384), opts.reward(18432), opts.reward(20480)), (0.0, -0.5, -1.0));
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub struct OverlongOptions {
    /// `L_max`: the generation limit, in tokens (≥ `buffer_len`).
    pub max_len: usize,
    /// `L_buf`: the length of the soft band before it (≥ 1).
    pub buffer_len: usize,
    /// The penalty at and beyond `L_max` (finite, ≥ 0; default 1).
    pub penalty: f32,
}

impl OverlongOptions {
    /// The band `(max_len − buffer_len, max_len]`, penalty 1.
    pub fn new(max_len: usize, buffer_len: usize) -> Self {
        OverlongOptions { max_len, buffer_len, penalty: 1.0 }
    }
    /// Sets the penalty factor.
    pub fn penalty(self, penalty: f32) -> Self {
        OverlongOptions { penalty, ..self }
    }

    /// `R_len(len)` in f64 (the formula above; the backends round it once to f32). Options the
    /// ops would refuse (`buffer_len` 0 or past `max_len`) give a meaningless value, not a panic.
    pub fn reward(&self, len: usize) -> f64 {
        let start = self.max_len.saturating_sub(self.buffer_len);
        if len <= start {
            0.0
        } else if len <= self.max_len {
            -(self.penalty as f64) * (len - start) as f64 / self.buffer_len as f64
        } else {
            -(self.penalty as f64)
        }
    }

    pub(crate) fn validate(&self) -> Result<()> {
        let bad = |name, value: String, expected| Err(Error::InvalidOption { name, value, expected });
        if self.buffer_len == 0 || self.buffer_len > self.max_len {
            return bad("buffer_len", self.buffer_len.to_string(), "1 ≤ buffer_len ≤ max_len");
        }
        if self.max_len > i64::MAX as usize {
            return bad("max_len", self.max_len.to_string(), "max_len ≤ 2^63 − 1");
        }
        if !(self.penalty.is_finite() && self.penalty >= 0.0) {
            return bad("penalty", self.penalty.to_string(), "a finite penalty ≥ 0");
        }
        Ok(())
    }
}
