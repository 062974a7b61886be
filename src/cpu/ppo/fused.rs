//! The fused path from logits: policy logits + targets + old log-probs + advantages (+ a KL
//! term) → loss, statistics and the gradient w.r.t. the logits, in two passes over the logits
//! (the forward's log-probs, entropy and lse; then the backward, optionally in place) with
//! `O(N)` temporaries and never an `[N, V]` one.

use crate::SampledKlInputs;
use crate::cpu::{sampled_kl, token_logprobs, token_logprobs_backward, token_logprobs_backward_in_place};
use crate::logprobs::check_len;
use crate::{
    Element, FusedPolicyInputs, FusedPolicyOptions, FusedPolicyStats, PolicyLossInputs, PolicyLossOutputs,
    Result, RowShape, TargetIndex, TokenGrads, TokenOutputs,
};

use super::policy_loss;

/// The forward and the losses: per-token temporaries the backward reads.
struct Forward {
    lse: Vec<f32>,
    entropy: Vec<f32>,
    grad_logp: Vec<f32>,
    grad_entropy: Vec<f32>,
    stats: FusedPolicyStats,
}

fn forward<T: Element, I: TargetIndex>(
    logits: &[T],
    shape: RowShape,
    inputs: &FusedPolicyInputs<'_, I>,
    opts: &FusedPolicyOptions,
) -> Result<Forward> {
    shape.check_buffer("logits", logits.len())?;
    let n = shape.rows;
    inputs.check_sequences(n)?;
    check_len("old_logp", inputs.old_logp.len(), n)?;
    check_len("advantages", inputs.advantages.len(), n)?;
    if let Some(r) = inputs.ref_logp {
        check_len("ref_logp", r.len(), n)?;
    }
    let kl_opts = opts.validate(inputs.ref_logp.is_some())?;
    let lp_opts = opts.logprobs();
    let (mut logp, mut entropy, mut lse) = (vec![0.0f32; n], vec![0.0f32; n], vec![0.0f32; n]);
    let out = TokenOutputs::default().logp(&mut logp).entropy(&mut entropy).lse(&mut lse);
    token_logprobs(logits, shape, &inputs.tokens, out, &lp_opts)?;
    let (seqs, mask) = (inputs.sequences, inputs.tokens.mask);
    let mut grad_logp = vec![0.0f32; n];
    let kl = match (inputs.ref_logp, kl_opts) {
        (Some(ref_logp), Some(kl_opts)) => {
            let out = crate::SampledKlOutputs::default().grad_logp(&mut grad_logp);
            // The bias correction weights by π/π_old with the loss's own old log-probs.
            let old_logp = kl_opts.bias_correction.then_some(inputs.old_logp);
            Some(sampled_kl(
                &SampledKlInputs { mask, old_logp, ..SampledKlInputs::new(seqs, &logp, ref_logp) },
                out,
                kl_opts,
            )?)
        }
        _ => None,
    };
    let mut grad_entropy = vec![0.0f32; n];
    let loss_inputs = PolicyLossInputs {
        shape: seqs,
        logp: &logp[..],
        old_logp: inputs.old_logp,
        advantages: inputs.advantages,
        mask,
        entropy: Some(&entropy[..]),
    };
    let out = PolicyLossOutputs::default()
        .grad_logp(&mut grad_logp)
        .grad_entropy(&mut grad_entropy)
        .accumulate(kl.is_some());
    let policy = policy_loss(&loss_inputs, out, &opts.loss)?;
    Ok(Forward { lse, entropy, grad_logp, grad_entropy, stats: FusedPolicyStats { policy, kl } })
}

/// The policy loss straight from the policy logits (one row per token, any of f32/f16/bf16,
/// temperature `opts.temperature`): the forward's `logp`, entropy and lse, the KL term if given
/// (its gradient w.r.t. `logp` first), the policy loss with the entropy bonus accumulated onto
/// it, then the backward of the total into `grad_logits` (the logits' shape and dtype).
/// Temporaries are five `f32` per token. Returns the statistics; the scalar loss is
/// [`FusedPolicyStats::total_loss`].
///
/// Errors: those of each stage (shapes, options, targets out of range at unmasked rows, rows
/// without a defined log-softmax, non-finite loss inputs); nothing is written to
/// `grad_logits` when a stage before the backward fails.
///
/// ```
/// use rlhf_kernels::{cpu, FusedPolicyInputs, FusedPolicyOptions, RowShape, Tokens};
/// let shape = RowShape::new(2, 4); // two tokens of one response, vocabulary 4
/// let logits = [0.5f32, 1.0, -1.0, 0.0, 2.0, 0.0, 0.0, 0.0];
/// let (targets, mask, old, adv) = ([1i64, 0], [1u8, 1], [-1.0f32, -0.5], [1.0f32, -1.0]);
/// let inputs = FusedPolicyInputs::new(Tokens::new(&targets).with_mask(&mask), RowShape::new(1, 2), &old, &adv);
/// let mut grad = [0.0f32; 8];
/// let stats = cpu::policy_loss_from_logits(&logits, shape, &inputs, &mut grad, &FusedPolicyOptions::default())?;
/// assert!(stats.total_loss().is_finite() && grad.iter().any(|&g| g != 0.0));
/// # Ok::<(), rlhf_kernels::Error>(())
/// ```
pub fn policy_loss_from_logits<T: Element, I: TargetIndex>(
    logits: &[T],
    shape: RowShape,
    inputs: &FusedPolicyInputs<'_, I>,
    grad_logits: &mut [T],
    opts: &FusedPolicyOptions,
) -> Result<FusedPolicyStats> {
    shape.check_buffer("grad_logits", grad_logits.len())?;
    let f = forward(logits, shape, inputs, opts)?;
    let grads = TokenGrads::new(&f.lse).grad_logp(&f.grad_logp).grad_entropy(&f.grad_entropy, &f.entropy);
    token_logprobs_backward(logits, shape, &inputs.tokens, &grads, grad_logits, &opts.logprobs())?;
    Ok(f.stats)
}

/// [`policy_loss_from_logits`] writing the gradient over the logits (no `[N, V]` buffer at
/// all, as Liger's fused losses do).
///
/// ```
/// use rlhf_kernels::{cpu, FusedPolicyInputs, FusedPolicyOptions, RowShape, Tokens};
/// let shape = RowShape::new(1, 3);
/// let mut logits = [0.0f32, 1.0, 2.0];
/// let inputs = FusedPolicyInputs::new(Tokens::new(&[2i64]), RowShape::new(1, 1), &[-0.5], &[1.0]);
/// cpu::policy_loss_from_logits_in_place(&mut logits, shape, &inputs, &FusedPolicyOptions::default())?;
/// assert!(logits[2] < 0.0); // raising the sampled token's logit lowers the loss
/// # Ok::<(), rlhf_kernels::Error>(())
/// ```
pub fn policy_loss_from_logits_in_place<T: Element, I: TargetIndex>(
    logits: &mut [T],
    shape: RowShape,
    inputs: &FusedPolicyInputs<'_, I>,
    opts: &FusedPolicyOptions,
) -> Result<FusedPolicyStats> {
    let f = forward(logits, shape, inputs, opts)?;
    let grads = TokenGrads::new(&f.lse).grad_logp(&f.grad_logp).grad_entropy(&f.grad_entropy, &f.entropy);
    token_logprobs_backward_in_place(logits, shape, &inputs.tokens, &grads, &opts.logprobs())?;
    Ok(f.stats)
}
