//! The PPO family on the GPU: the per-token losses (`loss`, kernels/ppo.cu) and the fused path
//! from logits (`fused`), which chains the logprobs, KL and loss kernels.

mod fused;
mod loss;
pub mod raw;

pub use fused::{
    DeviceFusedPolicyInputs, DeviceFusedStats, policy_loss_from_logits, policy_loss_from_logits_in_place,
};
pub use loss::{
    DevicePolicyLossInputs, DevicePolicyLossOutputs, DevicePolicyStats, DeviceValueLossInputs,
    DeviceValueLossOutputs, DeviceValueStats, POLICY_STATS_WORDS, PolicyLossArgs, policy_loss,
    policy_loss_workspace_bytes, policy_stats_from_words, value_loss, value_loss_workspace_bytes,
};
