//! The KL folded into per-token rewards: its inputs and options, generic over the memory, and
//! the checks every backend makes before it writes.

use crate::memory::{Buffer, Host, IntoView, Memory};
use crate::{Error, Result, RowShape};

/// The inputs of `kl_rewards`, laid out as `shape` (`[B, T]`, rows = sequences): the per-token
/// KL estimate (k1 for the InstructGPT penalty), one outcome score per sequence and the
/// optional token mask. `M` is where the buffers live ([`Host`] by default, `Cuda` for device
/// views).
///
/// ```
/// use rlhf_kernels::{KlRewardsInputs, RowShape};
/// let (kl, scores) = ([0.5f32, 0.25, 9.0], [2.0f32]);
/// let inputs = KlRewardsInputs::new(RowShape::new(1, 3), &kl, &scores).mask(&[1, 1, 0]);
/// assert!(inputs.mask.is_some());
/// ```
#[derive(Debug, Clone, Copy)]
pub struct KlRewardsInputs<'a, M: Memory = Host> {
    /// `[B, T]` of `kl`, `mask` and the rewards.
    pub shape: RowShape,
    /// The KL estimate per token (nats).
    pub kl: M::View<'a, f32>,
    /// One score per sequence (`shape.rows` of them), added on its last valid token.
    pub scores: M::View<'a, f32>,
    /// One byte per token (0 = padding), or `None`.
    pub mask: Option<M::View<'a, u8>>,
}

impl<'a, M: Memory> KlRewardsInputs<'a, M> {
    /// The KL estimate and the scores, every token valid.
    pub fn new(
        shape: RowShape,
        kl: impl IntoView<'a, f32, Memory = M>,
        scores: impl IntoView<'a, f32, Memory = M>,
    ) -> Self {
        KlRewardsInputs { shape, kl: kl.into_view(), scores: scores.into_view(), mask: None }
    }
    /// Adds the token mask.
    pub fn mask(self, m: impl IntoView<'a, u8, Memory = M>) -> Self {
        KlRewardsInputs { mask: Some(m.into_view()), ..self }
    }

    /// The checks every backend makes before it writes anything: `kl`, `mask` and `rewards`
    /// (when given) cover the shape, one score per sequence, valid options.
    pub(crate) fn validate(&self, rewards_len: Option<usize>, opts: &KlRewardsOptions) -> Result<()> {
        let s = self.shape;
        s.check_buffer("kl", self.kl.len())?;
        if let Some(n) = rewards_len {
            s.check_buffer("rewards", n)?;
        }
        if let Some(m) = &self.mask {
            s.check_buffer("mask", m.len())?;
        }
        crate::logprobs::check_len("scores", self.scores.len(), s.rows)?;
        opts.validate()
    }
}

/// Options of `kl_rewards`: the KL coefficient β of `r_t = −β·kl_t`.
///
/// ```
/// use rlhf_kernels::KlRewardsOptions;
/// assert_eq!(KlRewardsOptions::new(0.05).beta, 0.05);
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub struct KlRewardsOptions {
    /// The KL coefficient β (finite; 0 leaves only the scores).
    pub beta: f32,
}

impl KlRewardsOptions {
    /// The rewards with coefficient `beta`.
    pub fn new(beta: f32) -> Self {
        KlRewardsOptions { beta }
    }

    /// A finite β.
    pub(crate) fn validate(&self) -> Result<()> {
        if !self.beta.is_finite() {
            return Err(Error::InvalidOption {
                name: "beta",
                value: self.beta.to_string(),
                expected: "a finite β",
            });
        }
        Ok(())
    }
}
