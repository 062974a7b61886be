//! The KL family on the GPU (kernels/kl_sampled.cu, kernels/kl_exact.cu): sampled estimators with their loss gradient and
//! batch statistics, KL-in-reward shaping, and the exact full-vocabulary divergences (whole rows or vocabulary
//! shards).

mod exact;
mod exact_backward;
pub mod raw;
mod sampled;
mod shards;

pub use exact::{exact_kl, exact_kl_workspace_bytes};
pub use exact_backward::{exact_kl_backward, exact_kl_backward_in_place};
pub(crate) use sampled::launch_sampled;
pub use sampled::{kl_rewards, sampled_kl, sampled_kl_workspace_bytes};
pub use shards::{exact_kl_shard_partials, finish_exact_kl_partials, finish_jsd_sums, jsd_shard_sums};
