//! The KL family on the CPU: sampled per-token estimators with their loss gradient and batch
//! statistics, KL-in-reward shaping, and the exact full-vocabulary divergences.

mod exact;
mod exact_shards;
mod sampled;

pub use exact::{exact_kl, exact_kl_backward, exact_kl_backward_in_place};
pub use exact_shards::{exact_kl_shard_partials, finish_exact_kl_partials, finish_jsd_sums, jsd_shard_sums};
pub use sampled::{kl_rewards, sampled_kl};
