//! The candle adapter (feature `candle`; `candle-cuda` adds candle's CUDA tensors): the ops of
//! this crate on [`candle_core::Tensor`]s, wired into candle's autograd.
//!
//! | function | differentiable in | output |
//! | --- | --- | --- |
//! | [`token_logprobs`] | the logits | `log p(y)` and the entropy per row |
//! | [`exact_kl`] | the policy's logits | the full-vocabulary divergence per row |
//! | [`policy_loss`] | `logp` (and the entropies) | the scalar loss, plus the statistics |
//! | [`policy_loss_from_logits`] | the logits | the scalar policy loss (+ KL term), plus the statistics |
//! | [`sampled_kl`] | `logp` (the reference is a constant) | the scalar KL loss, per-token values, statistics |
//! | [`value_loss`] | the values | the scalar loss, plus the statistics |
//! | [`aggregate`] | the values | the aggregated scalar |
//! | [`kl_rewards`], [`overlong_shaping`], [`whiten`], [`masked_moments`] | — (rewards and advantages are constants) | shaped rewards and scores, whitened values, moments |
//! | [`gae`], [`group_advantages`] | — (advantages are constants) | advantages (and returns) |
//!
//! The differentiable ops are candle custom ops ([`CustomOp1`](candle_core::CustomOp1) /
//! [`CustomOp2`](candle_core::CustomOp2)): their outputs carry the op, so `loss.backward()` runs this crate's backward kernels. Each op reads the tensors where
//! they lie, honouring candle's layouts: a logits tensor `[..., V]` needs a unit stride on its
//! last dimension (anything else is an error that says so) and may otherwise be any view,
//! e.g. `logits.narrow(1, 0, T - 1)` of a `[B, T, V]` tensor or a vocabulary-padded
//! `[N, V_padded]` narrowed to `V`: no copy is made (except by the fused path, which reads one
//! block of evenly spaced rows and copies other views). Rows that do not share one stride run as
//! one launch per block of evenly spaced rows. The per-row tensors (targets, masks, `logp`, …)
//! are made contiguous first (a no-op when they already are).
//!
//! Outputs are allocated through candle (`CpuStorage` vectors; on the GPU the candle device's
//! allocator) and, on the GPU, every kernel runs on the candle device's own stream. A problem
//! only the kernels can see (a NaN logit, a row of only `-inf`) is an error here as on the CPU:
//! the GPU path reads the kernels' status word after each op, which waits for the op's kernels
//! (candle itself waits at every read of a tensor to the host). Errors name the tensor's row;
//! on the GPU, for a view that runs as several blocks, the row is counted within its block
//! (the blocks' launches share one status word).
//!
//! ```
//! use candle_core::{Device, Tensor};
//! use rlhf_kernels::TokenLogprobsOptions;
//! let logits = Tensor::new(&[[1.0f32, 2.0, 3.0], [0.5, 0.5, 0.5]], &Device::Cpu)?;
//! let targets = Tensor::new(&[2u32, 0], &Device::Cpu)?;
//! let out = rlhf_kernels::candle::token_logprobs(&logits, &targets, None, &TokenLogprobsOptions::default())?;
//! let expected = candle_core::Tensor::new(&[-0.40760596f32, -1.0986123], &Device::Cpu)?;
//! assert!(out.logp.sub(&expected)?.abs()?.max(0)?.to_scalar::<f32>()? < 1e-6);
//! # Ok::<(), candle_core::Error>(())
//! ```

mod advantages;
mod fused;
mod kl;
mod logprobs;
mod losses;
mod ppo;
mod reduce;
mod storage;

pub use advantages::{GaeAdvantages, GaeTensors, GroupAdvantages, gae, group_advantages, overlong_shaping};
pub use fused::{FusedPolicyLoss, FusedTensors, policy_loss_from_logits};
pub use kl::exact_kl;
pub use logprobs::{TokenLogprobs, token_logprobs};
pub use losses::{KlTensors, SampledKl, ValueLoss, ValueTensors, kl_rewards, sampled_kl, value_loss};
pub use ppo::{PolicyLoss, PolicyTensors, policy_loss};
pub use reduce::{aggregate, masked_moments, whiten};

/// Turns this crate's error into candle's (the message is kept).
pub(crate) fn to_candle(e: crate::Error) -> candle_core::Error {
    candle_core::Error::wrap(e)
}
