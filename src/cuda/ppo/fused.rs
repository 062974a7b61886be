//! The fused path from logits on the GPU: the twin of
//! [`cpu::policy_loss_from_logits`](crate::cpu::policy_loss_from_logits). Two passes over the
//! logits (the token forward, then the backward, optionally in place) and `O(N)` kernels in
//! between (the KL term, the policy loss), all on the caller's stream; five `f32` per token of
//! stream-ordered temporaries.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, CudaView, DevicePtr, DevicePtrMut};

use crate::cuda::kl::{DeviceKlStats, DeviceSampledKlOutputs, SampledKlInputs, sampled_kl};
use crate::cuda::logprobs::{
    DeviceTokenGrads, DeviceTokenOutputs, DeviceTokens, token_logprobs, token_logprobs_backward,
    token_logprobs_backward_in_place,
};
use crate::cuda::{CudaStatus, driver_error};
use crate::logprobs::check_len;
use crate::{
    Element, Error, FusedPolicyStats, PolicyLossOptions, Result, RowShape, SampledKlOptions, TargetIndex,
    TokenLogprobsOptions,
};

use super::loss::{DevicePolicyLossInputs, DevicePolicyLossOutputs, DevicePolicyStats, policy_loss};

/// The device inputs of the fused path besides the logits (see
/// [`FusedPolicyInputs`](crate::FusedPolicyInputs): padding from the tokens' mask only).
#[derive(Debug)]
pub struct DeviceFusedPolicyInputs<'a, I> {
    /// Sampled tokens and the token mask.
    pub tokens: DeviceTokens<'a, I>,
    /// The `[B, T]` view of the token rows (dense, `B·T` = the logits' rows).
    pub sequences: RowShape,
    /// `log π_old(y_t)`.
    pub old_logp: CudaView<'a, f32>,
    /// Advantages per token.
    pub advantages: CudaView<'a, f32>,
    /// A KL loss term: the reference log-probs and the estimator options.
    pub kl: Option<(CudaView<'a, f32>, SampledKlOptions)>,
}

/// The statistics of the fused path on the device.
#[derive(Debug)]
pub struct DeviceFusedStats {
    policy: DevicePolicyStats,
    kl: DeviceKlStats,
    with_kl: bool,
}

impl DeviceFusedStats {
    /// Allocates both statistics buffers on `stream`'s device.
    pub fn new(stream: &Arc<CudaStream>) -> Result<Self> {
        Ok(DeviceFusedStats {
            policy: DevicePolicyStats::new(stream)?,
            kl: DeviceKlStats::new(stream)?,
            with_kl: false,
        })
    }

    /// Synchronises `stream` and returns the statistics of the last call into `self`.
    pub fn read(&self, stream: &Arc<CudaStream>) -> Result<FusedPolicyStats> {
        Ok(FusedPolicyStats {
            policy: self.policy.read(stream)?,
            kl: if self.with_kl { Some(self.kl.read(stream)?) } else { None },
        })
    }
}

/// The per-token temporaries the backward reads.
struct Forward {
    lse: CudaSlice<f32>,
    entropy: CudaSlice<f32>,
    grad_logp: CudaSlice<f32>,
    grad_entropy: CudaSlice<f32>,
}

impl Forward {
    fn grads(&self) -> DeviceTokenGrads<'_> {
        DeviceTokenGrads::new(self.lse.as_view())
            .grad_logp(self.grad_logp.as_view())
            .grad_entropy(self.grad_entropy.as_view(), self.entropy.as_view())
    }
}

/// The token options of the fused path: padding from the mask only.
fn token_options(logprobs: &TokenLogprobsOptions) -> TokenLogprobsOptions {
    TokenLogprobsOptions { ignore_index: None, ..*logprobs }
}

/// The forward, the KL term and the policy loss, enqueued on `stream`.
#[allow(clippy::too_many_arguments)]
fn forward<T: Element, I: TargetIndex>(
    stream: &Arc<CudaStream>,
    logits: &impl DevicePtr<T>,
    shape: RowShape,
    inputs: &DeviceFusedPolicyInputs<'_, I>,
    stats: &mut DeviceFusedStats,
    status: &mut CudaStatus,
    logprobs: &TokenLogprobsOptions,
    opts: &PolicyLossOptions,
) -> Result<Forward> {
    shape.check_buffer("logits", logits.len())?;
    let n = shape.rows;
    let seqs = inputs.sequences;
    seqs.validate("sequences")?;
    if seqs.row_stride != seqs.cols || seqs.len() != n {
        return Err(Error::ShapeMismatch { what: "sequences", min: n, max: n, actual: seqs.len() });
    }
    check_len("old_logp", inputs.old_logp.len(), n)?;
    check_len("advantages", inputs.advantages.len(), n)?;
    if let Some((r, _)) = &inputs.kl {
        check_len("ref_logp", r.len(), n)?;
    }
    opts.validate()?;
    let alloc = || stream.alloc_zeros::<f32>(n).map_err(driver_error("allocating fused-path temporaries"));
    let mut f = Forward { lse: alloc()?, entropy: alloc()?, grad_logp: alloc()?, grad_entropy: alloc()? };
    let mut logp = alloc()?;
    let out = DeviceTokenOutputs::default()
        .logp(logp.as_view_mut())
        .entropy(f.entropy.as_view_mut())
        .lse(f.lse.as_view_mut());
    token_logprobs(stream, logits, shape, &inputs.tokens, out, status, &token_options(logprobs))?;
    let mask = || inputs.tokens.mask.as_ref().map(|m| m.slice(0..m.len()));
    stats.with_kl = inputs.kl.is_some();
    if let Some((ref_logp, kl_opts)) = &inputs.kl {
        let kl_in = SampledKlInputs { logp: logp.as_view(), ref_logp: ref_logp.slice(0..n), mask: mask() };
        let out = DeviceSampledKlOutputs {
            values: None,
            grad_logp: Some(f.grad_logp.as_view_mut()),
            stats: Some(&mut stats.kl),
            workspace: None,
        };
        sampled_kl(stream, &kl_in, seqs, out, status, kl_opts)?;
    }
    let loss_in = DevicePolicyLossInputs {
        shape: seqs,
        logp: logp.as_view(),
        old_logp: inputs.old_logp.slice(0..n),
        advantages: inputs.advantages.slice(0..n),
        mask: mask(),
        entropy: Some(f.entropy.as_view()),
    };
    let out = DevicePolicyLossOutputs {
        grad_logp: Some(f.grad_logp.as_view_mut()),
        grad_entropy: Some(f.grad_entropy.as_view_mut()),
        stats: Some(&mut stats.policy),
        accumulate: inputs.kl.is_some(),
        ..Default::default()
    };
    policy_loss(stream, &loss_in, out, status, opts)?;
    Ok(f)
}

/// The policy loss straight from the policy logits on the GPU, the twin of
/// [`cpu::policy_loss_from_logits`](crate::cpu::policy_loss_from_logits): token forward, KL
/// term, policy loss with the entropy bonus, backward into `grad_logits`, all enqueued on
/// `stream` (read the statistics with [`DeviceFusedStats::read`]). Input problems go to
/// `status`.
///
/// ```no_run
/// use rlhf_kernels::cuda::{self, CudaDevice, CudaStatus, DeviceFusedPolicyInputs, DeviceFusedStats, DeviceTokens};
/// use rlhf_kernels::{PolicyLossOptions, RowShape, TokenLogprobsOptions};
/// let device = CudaDevice::new(0)?;
/// let s = device.stream();
/// let shape = RowShape::new(2, 4);
/// let logits = s.clone_htod(&[0.5f32, 1.0, -1.0, 0.0, 2.0, 0.0, 0.0, 0.0]).unwrap();
/// let targets = s.clone_htod(&[1i64, 0]).unwrap();
/// let (old, adv) = (s.clone_htod(&[-1.0f32, -0.5]).unwrap(), s.clone_htod(&[1.0f32, -1.0]).unwrap());
/// let mut grad = s.alloc_zeros::<f32>(8).unwrap();
/// let (mut stats, mut status) = (DeviceFusedStats::new(s)?, CudaStatus::new(s)?);
/// let inputs = DeviceFusedPolicyInputs { tokens: DeviceTokens::new(targets.as_view()), sequences: RowShape::new(1, 2),
///     old_logp: old.as_view(), advantages: adv.as_view(), kl: None };
/// cuda::policy_loss_from_logits(s, &logits, shape, &inputs, &mut grad, &mut stats, &mut status,
///                               &TokenLogprobsOptions::default(), &PolicyLossOptions::default())?;
/// status.check(s)?;
/// println!("loss {}", stats.read(s)?.total_loss());
/// # Ok::<(), rlhf_kernels::Error>(())
/// ```
#[allow(clippy::too_many_arguments)]
pub fn policy_loss_from_logits<T: Element, I: TargetIndex>(
    stream: &Arc<CudaStream>,
    logits: &impl DevicePtr<T>,
    shape: RowShape,
    inputs: &DeviceFusedPolicyInputs<'_, I>,
    grad_logits: &mut impl DevicePtrMut<T>,
    stats: &mut DeviceFusedStats,
    status: &mut CudaStatus,
    logprobs: &TokenLogprobsOptions,
    opts: &PolicyLossOptions,
) -> Result<()> {
    shape.check_buffer("grad_logits", grad_logits.len())?;
    let f = forward(stream, logits, shape, inputs, stats, status, logprobs, opts)?;
    let t = token_options(logprobs);
    token_logprobs_backward(stream, logits, shape, &inputs.tokens, &f.grads(), grad_logits, status, &t)
}

/// [`policy_loss_from_logits`] writing the gradient over the logits.
///
/// ```no_run
/// use rlhf_kernels::cuda::{self, CudaDevice, CudaStatus, DeviceFusedPolicyInputs, DeviceFusedStats, DeviceTokens};
/// use rlhf_kernels::{PolicyLossOptions, RowShape, TokenLogprobsOptions};
/// let device = CudaDevice::new(0)?;
/// let s = device.stream();
/// let mut logits = s.clone_htod(&[0.0f32, 1.0, 2.0]).unwrap();
/// let targets = s.clone_htod(&[2i64]).unwrap();
/// let (old, adv) = (s.clone_htod(&[-0.5f32]).unwrap(), s.clone_htod(&[1.0f32]).unwrap());
/// let (mut stats, mut status) = (DeviceFusedStats::new(s)?, CudaStatus::new(s)?);
/// let inputs = DeviceFusedPolicyInputs { tokens: DeviceTokens::new(targets.as_view()), sequences: RowShape::new(1, 1),
///     old_logp: old.as_view(), advantages: adv.as_view(), kl: None };
/// cuda::policy_loss_from_logits_in_place(s, &mut logits, RowShape::new(1, 3), &inputs, &mut stats, &mut status,
///                                        &TokenLogprobsOptions::default(), &PolicyLossOptions::default())?;
/// status.check(s)?;
/// # Ok::<(), rlhf_kernels::Error>(())
/// ```
#[allow(clippy::too_many_arguments)]
pub fn policy_loss_from_logits_in_place<T: Element, I: TargetIndex>(
    stream: &Arc<CudaStream>,
    logits: &mut (impl DevicePtr<T> + DevicePtrMut<T>),
    shape: RowShape,
    inputs: &DeviceFusedPolicyInputs<'_, I>,
    stats: &mut DeviceFusedStats,
    status: &mut CudaStatus,
    logprobs: &TokenLogprobsOptions,
    opts: &PolicyLossOptions,
) -> Result<()> {
    let f = forward(stream, &*logits, shape, inputs, stats, status, logprobs, opts)?;
    let t = token_options(logprobs);
    token_logprobs_backward_in_place(stream, logits, shape, &inputs.tokens, &f.grads(), status, &t)
}
