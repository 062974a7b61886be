//! The PPO family on the GPU: the policy loss and the launch sequence both losses share
//! (`loss`), the value loss (`value`), both in kernels/ppo.cu; the raw layer (`raw`); and the
//! fused path from logits (`fused`), which chains the logprobs, KL and loss kernels.

mod fused;
mod loss;
pub mod raw;
mod value;

pub use fused::{
    DeviceFusedStats, fused_workspace_bytes, policy_loss_from_logits, policy_loss_from_logits_in_place,
};
pub use loss::{
    POLICY_STATS_WORDS, PolicyLossArgs, policy_loss, policy_loss_workspace_bytes, policy_stats_from_words,
    policy_stats_to_words,
};
pub use value::{value_loss, value_loss_workspace_bytes};
