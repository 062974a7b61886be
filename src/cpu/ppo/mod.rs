//! The CPU PPO family: the per-token losses (`loss`) and the fused path from logits (`fused`).

mod fused;
mod loss;

pub use fused::{policy_loss_from_logits, policy_loss_from_logits_in_place};
pub use loss::{PolicyLossOutputs, ValueLossOutputs, policy_loss, value_loss};
