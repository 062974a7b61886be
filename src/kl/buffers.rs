//! The KL family's op inputs and outputs, generic over the memory (host or device).

use crate::logprobs::check_len;
use crate::memory::{Buffer, Host, IntoView, IntoViewMut, Memory};
use crate::{
    Aggregated, Element, Error, ExactDivergence, ExactKlStatistic, Result, RowShape, SampledKlStats,
};

/// The reference side of an exact divergence: the reference policy's logits rows (their own
/// dtype and row stride; same rows and cols as the policy's) and the row mask that applies to
/// both sides (0 = padding row). `M` is where the buffers live ([`Host`] by default, `Cuda`
/// for device views).
///
/// ```
/// use rlhf_kernels::{ReferenceRows, RowShape};
/// let logits = [0.0f32; 6];
/// let reference = ReferenceRows::new(&logits, RowShape::new(2, 3)).with_mask(&[1, 0]);
/// assert_eq!(reference.shape.rows, 2);
/// ```
#[derive(Debug, Clone, Copy)]
pub struct ReferenceRows<'a, Q: 'a, M: Memory = Host> {
    /// Reference logits.
    pub logits: M::View<'a, Q>,
    /// Their shape.
    pub shape: RowShape,
    /// One byte per row, or `None` (every row real).
    pub mask: Option<M::View<'a, u8>>,
}

impl<'a, Q: Element, M: Memory> ReferenceRows<'a, Q, M> {
    /// The reference logits, every row real.
    pub fn new(logits: impl IntoView<'a, Q, Memory = M>, shape: RowShape) -> Self {
        ReferenceRows { logits: logits.into_view(), shape, mask: None }
    }
    /// Adds the row mask, in the logits' memory.
    pub fn with_mask(self, mask: impl IntoView<'a, u8, Memory = M>) -> Self {
        ReferenceRows { mask: Some(mask.into_view()), ..self }
    }
}

/// The per-token inputs of the sampled KL estimators, laid out as `shape` (`[B, T]`, rows =
/// sequences): the sampled tokens' log-probs under the policy and the reference, the optional
/// token mask, and, for the bias-corrected estimate
/// ([`SampledKlOptions::bias_correction`](crate::SampledKlOptions::bias_correction)), the
/// log-probs of the policy that sampled the tokens. `M` is where the buffers live ([`Host`] by default, `Cuda` for device
/// views).
///
/// ```
/// use rlhf_kernels::{RowShape, SampledKlInputs};
/// let (logp, ref_logp) = ([-1.0f32, -2.0], [-1.5f32, -2.0]);
/// let inputs = SampledKlInputs::new(RowShape::new(1, 2), &logp, &ref_logp).mask(&[1, 1]);
/// assert!(inputs.mask.is_some());
/// ```
#[derive(Debug, Clone, Copy)]
pub struct SampledKlInputs<'a, M: Memory = Host> {
    /// `[B, T]` of every array.
    pub shape: RowShape,
    /// `log π(y_t)`.
    pub logp: M::View<'a, f32>,
    /// `log π_ref(y_t)`.
    pub ref_logp: M::View<'a, f32>,
    /// One byte per token (0 = padding), or `None`.
    pub mask: Option<M::View<'a, u8>>,
    /// `log π_old(y_t)`, the policy that sampled the tokens (the rollout's old policy, or the
    /// inference engine's μ): present exactly when the options ask for the bias correction.
    pub old_logp: Option<M::View<'a, f32>>,
}

impl<'a, M: Memory> SampledKlInputs<'a, M> {
    /// Both log-probs, every token valid.
    pub fn new(
        shape: RowShape,
        logp: impl IntoView<'a, f32, Memory = M>,
        ref_logp: impl IntoView<'a, f32, Memory = M>,
    ) -> Self {
        SampledKlInputs {
            shape,
            logp: logp.into_view(),
            ref_logp: ref_logp.into_view(),
            mask: None,
            old_logp: None,
        }
    }
    /// Adds the token mask.
    pub fn mask(self, m: impl IntoView<'a, u8, Memory = M>) -> Self {
        SampledKlInputs { mask: Some(m.into_view()), ..self }
    }
    /// Adds the sampling policy's log-probs (for the bias-corrected estimate).
    pub fn old_logp(self, old: impl IntoView<'a, f32, Memory = M>) -> Self {
        SampledKlInputs { old_logp: Some(old.into_view()), ..self }
    }

    /// Every buffer holds `shape`, and `old_logp` is there exactly when `opts` ask for the
    /// bias correction.
    pub(crate) fn validate(&self, opts: &crate::SampledKlOptions) -> Result<()> {
        let s = self.shape;
        s.check_buffer("logp", self.logp.len())?;
        s.check_buffer("ref_logp", self.ref_logp.len())?;
        if let Some(m) = &self.mask {
            s.check_buffer("mask", m.len())?;
        }
        if let Some(o) = &self.old_logp {
            s.check_buffer("old_logp", o.len())?;
        }
        check_bias_correction(opts.bias_correction, self.old_logp.is_some())
    }
}

/// The bias correction needs the sampling policy's log-probs, and they mean nothing without it.
pub(crate) fn check_bias_correction(asked: bool, has_old_logp: bool) -> Result<()> {
    if asked == has_old_logp {
        return Ok(());
    }
    Err(Error::InvalidOption {
        name: "bias_correction",
        value: if asked { "true without old_logp" } else { "false with old_logp" }.into(),
        expected: "SampledKlOptions::bias_correction exactly when the inputs carry old_logp",
    })
}

/// Where the sampled KL writes per token (`[B, T]` laid out as the inputs; each optional, 0
/// where masked), the batch statistics and the CUDA kernels' workspace. `M` as for
/// [`SampledKlInputs`].
///
/// ```
/// use rlhf_kernels::SampledKlOutputs;
/// let mut grad = [0.0f32; 2];
/// let out = SampledKlOutputs::default().grad_logp(&mut grad);
/// assert!(out.values.is_none());
/// ```
#[derive(Debug)]
pub struct SampledKlOutputs<'a, M: Memory = Host> {
    /// The chosen estimator's value per token.
    pub values: Option<M::ViewMut<'a, f32>>,
    /// `∂loss/∂logp` per token with `loss = β·aggregate(k)`.
    pub grad_logp: Option<M::ViewMut<'a, f32>>,
    /// The batch statistics (the host op also returns them).
    pub stats: Option<M::Stats<'a, SampledKlStats>>,
    /// Scratch of the CUDA kernels (`cuda::sampled_kl_workspace_bytes`, 16-byte aligned;
    /// allocated on the stream when needed and absent). The host backends need none.
    pub workspace: Option<M::ViewMut<'a, u8>>,
}

impl<M: Memory> Default for SampledKlOutputs<'_, M> {
    fn default() -> Self {
        SampledKlOutputs { values: None, grad_logp: None, stats: None, workspace: None }
    }
}

impl<'a, M: Memory> SampledKlOutputs<'a, M> {
    /// Requests the per-token values.
    pub fn values(self, v: impl IntoViewMut<'a, f32, Memory = M>) -> Self {
        SampledKlOutputs { values: Some(v.into_view_mut()), ..self }
    }
    /// Requests the gradient with respect to `logp`.
    pub fn grad_logp(self, g: impl IntoViewMut<'a, f32, Memory = M>) -> Self {
        SampledKlOutputs { grad_logp: Some(g.into_view_mut()), ..self }
    }
    /// Requests the statistics into `stats`.
    pub fn stats(self, stats: M::Stats<'a, SampledKlStats>) -> Self {
        SampledKlOutputs { stats: Some(stats), ..self }
    }
    /// Provides the CUDA kernels' workspace.
    pub fn workspace(self, w: impl IntoViewMut<'a, u8, Memory = M>) -> Self {
        SampledKlOutputs { workspace: Some(w.into_view_mut()), ..self }
    }

    /// Each requested per-token output holds `shape`.
    pub(crate) fn check(&self, shape: RowShape) -> Result<()> {
        for (what, o) in [("values", &self.values), ("grad_logp", &self.grad_logp)] {
            o.as_ref().map_or(Ok(()), |o| shape.check_buffer(what, o.len()))?;
        }
        Ok(())
    }
}

/// Where the exact divergences write, per row (any subset, at least one), the batch statistic
/// if asked, and the CUDA kernels' workspace. The backward needs `policy_lse` and `ref_lse`,
/// plus `value` for `KL[π‖π_ref]` and `policy_term` for the JSD. `M` as for
/// [`ReferenceRows`].
///
/// ```
/// use rlhf_kernels::ExactKlOutputs;
/// let (mut kl, mut lse_p, mut lse_q) = ([0.0f32; 2], [0.0f32; 2], [0.0f32; 2]);
/// let out = ExactKlOutputs::default().value(&mut kl).lse(&mut lse_p, &mut lse_q);
/// assert!(out.policy_term.is_none());
/// ```
#[derive(Debug)]
pub struct ExactKlOutputs<'a, M: Memory = Host> {
    /// The divergence (nats).
    pub value: Option<M::ViewMut<'a, f32>>,
    /// `ln Σ exp(z_policy)`.
    pub policy_lse: Option<M::ViewMut<'a, f32>>,
    /// `ln Σ exp(z_ref)`.
    pub ref_lse: Option<M::ViewMut<'a, f32>>,
    /// For the JSD, `KL[p ‖ m]`; for the two KLs, the value again.
    pub policy_term: Option<M::ViewMut<'a, f32>>,
    /// The batch statistic of the values and where it goes (computed from them in the same
    /// call; the values go to a temporary when `value` is not requested).
    pub statistic: Option<(M::Stats<'a, Aggregated>, ExactKlStatistic)>,
    /// Scratch of the CUDA kernels (`cuda::exact_kl_workspace_bytes`, 16-byte aligned;
    /// allocated on the stream when needed and absent). The host backends need none.
    pub workspace: Option<M::ViewMut<'a, u8>>,
}

impl<M: Memory> Default for ExactKlOutputs<'_, M> {
    fn default() -> Self {
        ExactKlOutputs {
            value: None,
            policy_lse: None,
            ref_lse: None,
            policy_term: None,
            statistic: None,
            workspace: None,
        }
    }
}

impl<'a, M: Memory> ExactKlOutputs<'a, M> {
    /// Requests the divergence.
    pub fn value(self, v: impl IntoViewMut<'a, f32, Memory = M>) -> Self {
        ExactKlOutputs { value: Some(v.into_view_mut()), ..self }
    }
    /// Requests both log-sum-exps.
    pub fn lse(
        self,
        policy: impl IntoViewMut<'a, f32, Memory = M>,
        reference: impl IntoViewMut<'a, f32, Memory = M>,
    ) -> Self {
        ExactKlOutputs {
            policy_lse: Some(policy.into_view_mut()),
            ref_lse: Some(reference.into_view_mut()),
            ..self
        }
    }
    /// Requests the JSD's policy term.
    pub fn policy_term(self, v: impl IntoViewMut<'a, f32, Memory = M>) -> Self {
        ExactKlOutputs { policy_term: Some(v.into_view_mut()), ..self }
    }
    /// Requests the batch statistic of the values into `out`.
    pub fn statistic(self, out: M::Stats<'a, Aggregated>, stat: ExactKlStatistic) -> Self {
        ExactKlOutputs { statistic: Some((out, stat)), ..self }
    }
    /// Provides the CUDA kernels' workspace.
    pub fn workspace(self, w: impl IntoViewMut<'a, u8, Memory = M>) -> Self {
        ExactKlOutputs { workspace: Some(w.into_view_mut()), ..self }
    }
}

impl<M: Memory> ExactKlOutputs<'_, M> {
    /// At least one per-row output is requested and each holds `rows` f32 (`None`: as many as
    /// the first one present); returns `rows`.
    pub(crate) fn check_rows(&self, rows: Option<usize>) -> Result<usize> {
        let outs = [&self.value, &self.policy_lse, &self.ref_lse, &self.policy_term];
        let Some(first) = outs.iter().find_map(|o| o.as_ref()) else {
            return Err(Error::InvalidOption {
                name: "outputs",
                value: "none requested".into(),
                expected: "at least one of value, policy_lse, ref_lse, policy_term",
            });
        };
        let rows = rows.unwrap_or(first.len());
        for (what, o) in ["value", "policy_lse", "ref_lse", "policy_term"].into_iter().zip(outs) {
            o.as_ref().map_or(Ok(()), |o| check_len(what, o.len(), rows))?;
        }
        Ok(rows)
    }

    /// The outputs a merge of shard partials may write (`finish_exact_kl_partials`): no
    /// statistic, and for the JSD both log-sum-exps and nothing else (its value comes from
    /// `finish_jsd_sums`). Returns `rows`.
    pub(crate) fn check_merge(&self, divergence: ExactDivergence) -> Result<usize> {
        if self.statistic.is_some() {
            return Err(Error::InvalidOption {
                name: "statistic",
                value: "requested from finish_exact_kl_partials".into(),
                expected: "none: aggregate the finished values with aggregate",
            });
        }
        if matches!(divergence, ExactDivergence::Jsd { .. })
            && (self.value.is_some()
                || self.policy_term.is_some()
                || self.policy_lse.is_none()
                || self.ref_lse.is_none())
        {
            return Err(Error::InvalidOption {
                name: "outputs",
                value: "value or policy_term, or a missing log-sum-exp, for the JSD".into(),
                expected: "policy_lse and ref_lse only: the JSD's value comes from finish_jsd_sums",
            });
        }
        self.check_rows(None)
    }

    /// The outputs of the JSD's last step (`finish_jsd_sums`): the value, the policy term or
    /// both, each of `rows` f32, and nothing else (the log-sum-exps are its inputs).
    pub(crate) fn check_jsd_finish(&self, rows: usize) -> Result<()> {
        if (self.value.is_none() && self.policy_term.is_none())
            || self.policy_lse.is_some()
            || self.ref_lse.is_some()
            || self.statistic.is_some()
            || self.workspace.is_some()
        {
            return Err(Error::InvalidOption {
                name: "outputs",
                value: "none of value and policy_term, or a log-sum-exp, statistic or workspace".into(),
                expected: "value, policy_term or both (the log-sum-exps are inputs here)",
            });
        }
        self.check_rows(Some(rows)).map(|_| ())
    }
}

/// `len` shard records are `shards` whole records per row of `rows`, laid out
/// `[shards][rows]`, within the kernels' 32-bit counts; returns `shards`.
pub(crate) fn shard_count(what: &'static str, len: usize, rows: usize) -> Result<usize> {
    RowShape::new(rows, 1).validate(what)?;
    if len == 0 || len % rows != 0 {
        return Err(Error::InvalidOption {
            name: what,
            value: format!("{len} records for {rows} rows"),
            expected: "shards x rows records, laid out [shards][rows]",
        });
    }
    RowShape::new(rows, len / rows).validate(what)?;
    Ok(len / rows)
}

/// The JSD's β, or an error for the two KLs (which need one round only).
pub(crate) fn jsd_beta(divergence: ExactDivergence) -> Result<f32> {
    match divergence {
        ExactDivergence::Jsd { beta } => Ok(beta),
        d => Err(Error::InvalidOption {
            name: "divergence",
            value: format!("{d:?}"),
            expected: "ExactDivergence::Jsd (the two KLs need one round only)",
        }),
    }
}

/// What the exact divergences' backward needs: the upstream gradient of each row's divergence
/// and the forward's saved statistics (each `rows` f32). `M` is where the buffers live, as for
/// [`ReferenceRows`].
///
/// ```
/// use rlhf_kernels::ExactKlGrads;
/// let (g, lse_p, lse_q, kl) = ([1.0f32; 2], [0.5f32; 2], [0.7f32; 2], [0.1f32; 2]);
/// let grads = ExactKlGrads::new(&g, &lse_p, &lse_q).value(&kl);
/// assert!(grads.policy_term.is_none());
/// ```
#[derive(Debug, Clone, Copy)]
pub struct ExactKlGrads<'a, M: Memory = Host> {
    /// Upstream gradient per row.
    pub grad: M::View<'a, f32>,
    /// `ln Σ exp(z_policy)` from the forward.
    pub policy_lse: M::View<'a, f32>,
    /// `ln Σ exp(z_ref)` from the forward.
    pub ref_lse: M::View<'a, f32>,
    /// The forward's value (needed for `KL[π‖π_ref]`).
    pub value: Option<M::View<'a, f32>>,
    /// The forward's policy term (needed for the JSD).
    pub policy_term: Option<M::View<'a, f32>>,
}

impl<'a, M: Memory> ExactKlGrads<'a, M> {
    /// The upstream gradient and both saved log-sum-exps.
    pub fn new(
        grad: impl IntoView<'a, f32, Memory = M>,
        policy_lse: impl IntoView<'a, f32, Memory = M>,
        ref_lse: impl IntoView<'a, f32, Memory = M>,
    ) -> Self {
        ExactKlGrads {
            grad: grad.into_view(),
            policy_lse: policy_lse.into_view(),
            ref_lse: ref_lse.into_view(),
            value: None,
            policy_term: None,
        }
    }
    /// Adds the forward's value (`KL[π‖π_ref]` needs it).
    pub fn value(self, value: impl IntoView<'a, f32, Memory = M>) -> Self {
        ExactKlGrads { value: Some(value.into_view()), ..self }
    }
    /// Adds the forward's policy term (the JSD needs it).
    pub fn policy_term(self, policy_term: impl IntoView<'a, f32, Memory = M>) -> Self {
        ExactKlGrads { policy_term: Some(policy_term.into_view()), ..self }
    }
}
