//! The PPO family's op inputs and outputs, generic over the memory (host or device).

use crate::memory::{Buffer, Host, IntoView, IntoViewMut, Memory};
use crate::{Error, PolicyLossStats, Result, RowShape, TargetIndex, Tokens, ValueLossStats};

/// The per-token inputs of the policy loss, laid out as `shape` (`[B, T]`, rows = sequences).
///
/// ```
/// use rlhf_kernels::{PolicyLossInputs, RowShape};
/// let (logp, old, adv) = ([-1.0f32, -2.0], [-1.1f32, -2.0], [0.5f32, 0.5]);
/// let inputs = PolicyLossInputs::new(RowShape::new(1, 2), &logp, &old, &adv).mask(&[1, 1]);
/// # let _ = inputs;
/// ```
#[derive(Debug, Clone, Copy)]
pub struct PolicyLossInputs<'a, M: Memory = Host> {
    /// `[B, T]` of every array.
    pub shape: RowShape,
    /// `log π(y_t)` under the current policy.
    pub logp: M::View<'a, f32>,
    /// `log π_old(y_t)` from the rollout.
    pub old_logp: M::View<'a, f32>,
    /// Advantages per token.
    pub advantages: M::View<'a, f32>,
    /// Response mask, one byte per token; `None`: all valid.
    pub mask: Option<M::View<'a, u8>>,
    /// Per-token entropy `H` (for the bonus and the statistics).
    pub entropy: Option<M::View<'a, f32>>,
}

impl<'a, M: Memory> PolicyLossInputs<'a, M> {
    /// The three required arrays (host slices or device views, all in one memory).
    pub fn new(
        shape: RowShape,
        logp: impl IntoView<'a, f32, Memory = M>,
        old_logp: impl IntoView<'a, f32, Memory = M>,
        advantages: impl IntoView<'a, f32, Memory = M>,
    ) -> Self {
        PolicyLossInputs {
            shape,
            logp: logp.into_view(),
            old_logp: old_logp.into_view(),
            advantages: advantages.into_view(),
            mask: None,
            entropy: None,
        }
    }
    /// Adds the mask.
    pub fn mask(self, m: impl IntoView<'a, u8, Memory = M>) -> Self {
        PolicyLossInputs { mask: Some(m.into_view()), ..self }
    }
    /// Adds the entropies.
    pub fn entropy(self, h: impl IntoView<'a, f32, Memory = M>) -> Self {
        PolicyLossInputs { entropy: Some(h.into_view()), ..self }
    }

    pub(crate) fn validate(&self) -> Result<()> {
        let s = self.shape;
        s.check_buffer("logp", self.logp.len())?;
        s.check_buffer("old_logp", self.old_logp.len())?;
        s.check_buffer("advantages", self.advantages.len())?;
        if let Some(m) = &self.mask {
            s.check_buffer("mask", m.len())?;
        }
        if let Some(h) = &self.entropy {
            s.check_buffer("entropy", h.len())?;
        }
        Ok(())
    }
}

/// The per-token inputs of the value loss, laid out as `shape`.
#[derive(Debug, Clone, Copy)]
pub struct ValueLossInputs<'a, M: Memory = Host> {
    /// `[B, T]` of every array.
    pub shape: RowShape,
    /// Current value predictions `v`.
    pub values: M::View<'a, f32>,
    /// Rollout-time values `old_v`.
    pub old_values: M::View<'a, f32>,
    /// Value targets `R` (returns).
    pub returns: M::View<'a, f32>,
    /// Response mask; `None`: all valid.
    pub mask: Option<M::View<'a, u8>>,
}

impl<'a, M: Memory> ValueLossInputs<'a, M> {
    /// The three required arrays (host slices or device views, all in one memory).
    pub fn new(
        shape: RowShape,
        values: impl IntoView<'a, f32, Memory = M>,
        old_values: impl IntoView<'a, f32, Memory = M>,
        returns: impl IntoView<'a, f32, Memory = M>,
    ) -> Self {
        ValueLossInputs {
            shape,
            values: values.into_view(),
            old_values: old_values.into_view(),
            returns: returns.into_view(),
            mask: None,
        }
    }
    /// Adds the mask.
    pub fn mask(self, m: impl IntoView<'a, u8, Memory = M>) -> Self {
        ValueLossInputs { mask: Some(m.into_view()), ..self }
    }

    pub(crate) fn validate(&self) -> Result<()> {
        let s = self.shape;
        s.check_buffer("values", self.values.len())?;
        s.check_buffer("old_values", self.old_values.len())?;
        s.check_buffer("returns", self.returns.len())?;
        if let Some(m) = &self.mask {
            s.check_buffer("mask", m.len())?;
        }
        Ok(())
    }
}

/// Where [`policy_loss`](crate::cpu::policy_loss) writes (each optional, laid out as the
/// inputs; masked tokens get 0): the per-token loss `L`, `∂loss/∂logp` and `∂loss/∂H` (the
/// upstream gradients of the logprobs backward), and the statistics. `M` is where the buffers
/// live ([`Host`] by default, `Cuda` for device views).
///
/// ```
/// use rlhf_kernels::PolicyLossOutputs;
/// let mut grad = [0.0f32; 4];
/// let out = PolicyLossOutputs::default().grad_logp(&mut grad).accumulate(true);
/// assert!(out.loss.is_none() && out.accumulate);
/// ```
#[derive(Debug)]
pub struct PolicyLossOutputs<'a, M: Memory = Host> {
    /// Per-token `L` (unweighted, without the entropy bonus).
    pub loss: Option<M::ViewMut<'a, f32>>,
    /// `w·∂L/∂logp`.
    pub grad_logp: Option<M::ViewMut<'a, f32>>,
    /// `−c_H·w`.
    pub grad_entropy: Option<M::ViewMut<'a, f32>>,
    /// The batch statistics (the host op also returns them).
    pub stats: Option<M::Stats<'a, PolicyLossStats>>,
    /// Scratch of the CUDA kernels (`cuda::policy_loss_workspace_bytes`, 16-byte aligned;
    /// allocated on the stream when needed and absent). The host backends need none.
    pub workspace: Option<M::ViewMut<'a, u8>>,
    /// Add `∂loss/∂logp` to what `grad_logp` holds (at valid tokens; masked ones keep their
    /// value) instead of overwriting it: several loss terms (e.g. a KL term from
    /// `sampled_kl`) into one upstream gradient. `grad_entropy` is always overwritten (the
    /// entropy bonus lives here).
    pub accumulate: bool,
}

impl<M: Memory> Default for PolicyLossOutputs<'_, M> {
    fn default() -> Self {
        PolicyLossOutputs {
            loss: None,
            grad_logp: None,
            grad_entropy: None,
            stats: None,
            workspace: None,
            accumulate: false,
        }
    }
}

impl<'a, M: Memory> PolicyLossOutputs<'a, M> {
    /// Adds `∂loss/∂logp` to `grad_logp`'s contents instead of overwriting them.
    pub fn accumulate(self, accumulate: bool) -> Self {
        PolicyLossOutputs { accumulate, ..self }
    }
    /// Requests the per-token loss.
    pub fn loss(self, l: impl IntoViewMut<'a, f32, Memory = M>) -> Self {
        PolicyLossOutputs { loss: Some(l.into_view_mut()), ..self }
    }
    /// Requests `∂loss/∂logp`.
    pub fn grad_logp(self, g: impl IntoViewMut<'a, f32, Memory = M>) -> Self {
        PolicyLossOutputs { grad_logp: Some(g.into_view_mut()), ..self }
    }
    /// Requests `∂loss/∂H`.
    pub fn grad_entropy(self, g: impl IntoViewMut<'a, f32, Memory = M>) -> Self {
        PolicyLossOutputs { grad_entropy: Some(g.into_view_mut()), ..self }
    }
    /// Requests the statistics into `stats`.
    pub fn stats(self, stats: M::Stats<'a, PolicyLossStats>) -> Self {
        PolicyLossOutputs { stats: Some(stats), ..self }
    }
    /// Provides the CUDA kernels' workspace.
    pub fn workspace(self, w: impl IntoViewMut<'a, u8, Memory = M>) -> Self {
        PolicyLossOutputs { workspace: Some(w.into_view_mut()), ..self }
    }

    /// Each requested per-token output holds the inputs' `shape`.
    pub(crate) fn check(&self, shape: RowShape) -> Result<()> {
        for (what, o) in
            [("loss", &self.loss), ("grad_logp", &self.grad_logp), ("grad_entropy", &self.grad_entropy)]
        {
            if let Some(o) = o {
                shape.check_buffer(what, o.len())?;
            }
        }
        Ok(())
    }
}

/// Where [`value_loss`](crate::cpu::value_loss) writes (each optional, laid out as the inputs;
/// masked tokens get 0), and the statistics. `M` as for [`PolicyLossOutputs`].
///
/// ```
/// use rlhf_kernels::ValueLossOutputs;
/// let mut grad = [0.0f32; 4];
/// let out = ValueLossOutputs::default().grad_values(&mut grad);
/// assert!(out.loss.is_none());
/// ```
#[derive(Debug)]
pub struct ValueLossOutputs<'a, M: Memory = Host> {
    /// Per-token `½·max((v − R)², (v_clip − R)²)`.
    pub loss: Option<M::ViewMut<'a, f32>>,
    /// `coef·w·∂L_v/∂v`.
    pub grad_values: Option<M::ViewMut<'a, f32>>,
    /// The batch statistics (the host op also returns them).
    pub stats: Option<M::Stats<'a, ValueLossStats>>,
    /// Scratch of the CUDA kernels (`cuda::value_loss_workspace_bytes`; allocated on the
    /// stream when needed and absent). The host backends need none.
    pub workspace: Option<M::ViewMut<'a, u8>>,
}

impl<M: Memory> Default for ValueLossOutputs<'_, M> {
    fn default() -> Self {
        ValueLossOutputs { loss: None, grad_values: None, stats: None, workspace: None }
    }
}

impl<'a, M: Memory> ValueLossOutputs<'a, M> {
    /// Requests the per-token loss.
    pub fn loss(self, l: impl IntoViewMut<'a, f32, Memory = M>) -> Self {
        ValueLossOutputs { loss: Some(l.into_view_mut()), ..self }
    }
    /// Requests `∂loss/∂v`.
    pub fn grad_values(self, g: impl IntoViewMut<'a, f32, Memory = M>) -> Self {
        ValueLossOutputs { grad_values: Some(g.into_view_mut()), ..self }
    }
    /// Requests the statistics into `stats`.
    pub fn stats(self, stats: M::Stats<'a, ValueLossStats>) -> Self {
        ValueLossOutputs { stats: Some(stats), ..self }
    }
    /// Provides the CUDA kernels' workspace.
    pub fn workspace(self, w: impl IntoViewMut<'a, u8, Memory = M>) -> Self {
        ValueLossOutputs { workspace: Some(w.into_view_mut()), ..self }
    }

    /// Each requested per-token output holds the inputs' `shape`.
    pub(crate) fn check(&self, shape: RowShape) -> Result<()> {
        for (what, o) in [("loss", &self.loss), ("grad_values", &self.grad_values)] {
            if let Some(o) = o {
                shape.check_buffer(what, o.len())?;
            }
        }
        Ok(())
    }
}

/// The inputs of the fused path from logits besides the logits themselves: one row of logits
/// per token, viewed as `sequences` (`[B, T]`, dense, `B·T` = the logits' rows) for the loss.
/// Padding comes from the tokens' mask only (the fused path does not use an ignore index:
/// every unmasked target must be a vocabulary id).
///
/// ```
/// use rlhf_kernels::{FusedPolicyInputs, RowShape, Tokens};
/// let (targets, mask) = ([3i64, 1], [1u8, 1]);
/// let (old, adv) = ([-1.2f32, -0.7], [0.5f32, 0.5]);
/// let inputs = FusedPolicyInputs::new(Tokens::new(&targets).with_mask(&mask), RowShape::new(1, 2), &old, &adv);
/// # let _ = inputs;
/// ```
pub struct FusedPolicyInputs<'a, I: 'a, M: Memory = Host> {
    /// Sampled tokens and the token mask.
    pub tokens: Tokens<'a, I, M>,
    /// The `[B, T]` view of the token rows (dense, `B·T` = the logits' rows).
    pub sequences: RowShape,
    /// `log π_old(y_t)`.
    pub old_logp: M::View<'a, f32>,
    /// Advantages per token.
    pub advantages: M::View<'a, f32>,
    /// `log π_ref(y_t)` for a KL loss term to the reference policy (its estimator in
    /// [`FusedPolicyOptions::kl`](crate::FusedPolicyOptions::kl); the gradient joins the policy
    /// loss's, with no importance ratio).
    pub ref_logp: Option<M::View<'a, f32>>,
}

// By hand: a derive would not see through the tokens' views.
impl<'a, I, M: Memory> std::fmt::Debug for FusedPolicyInputs<'a, I, M>
where
    Tokens<'a, I, M>: std::fmt::Debug,
    M::View<'a, f32>: std::fmt::Debug,
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FusedPolicyInputs")
            .field("tokens", &self.tokens)
            .field("sequences", &self.sequences)
            .field("old_logp", &self.old_logp)
            .field("advantages", &self.advantages)
            .field("ref_logp", &self.ref_logp)
            .finish()
    }
}

impl<I: Copy> Clone for FusedPolicyInputs<'_, I> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<I: Copy> Copy for FusedPolicyInputs<'_, I> {}

impl<'a, I: TargetIndex, M: Memory> FusedPolicyInputs<'a, I, M> {
    /// The required inputs (host slices or device views, all in the tokens' memory).
    pub fn new(
        tokens: Tokens<'a, I, M>,
        sequences: RowShape,
        old_logp: impl IntoView<'a, f32, Memory = M>,
        advantages: impl IntoView<'a, f32, Memory = M>,
    ) -> Self {
        FusedPolicyInputs {
            tokens,
            sequences,
            old_logp: old_logp.into_view(),
            advantages: advantages.into_view(),
            ref_logp: None,
        }
    }
    /// Adds the reference log-probs of a KL loss term (with [`FusedPolicyOptions::kl`](crate::FusedPolicyOptions::kl)).
    pub fn ref_logp(self, ref_logp: impl IntoView<'a, f32, Memory = M>) -> Self {
        FusedPolicyInputs { ref_logp: Some(ref_logp.into_view()), ..self }
    }

    /// Checks that `sequences` views `rows` token rows densely.
    pub(crate) fn check_sequences(&self, rows: usize) -> Result<()> {
        let s = self.sequences;
        s.validate("sequences")?;
        if s.row_stride != s.cols || s.len() != rows {
            return Err(Error::ShapeMismatch { what: "sequences", min: rows, max: rows, actual: s.len() });
        }
        Ok(())
    }
}
