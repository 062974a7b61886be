//! The CPU PPO family: the policy loss (`policy`), the value loss (`value`) and the fused path
//! from logits (`fused`).

mod fused;
mod policy;
mod value;

pub use fused::{policy_loss_from_logits, policy_loss_from_logits_in_place};
pub use policy::policy_loss;
pub use value::value_loss;
