//! CPU advantage estimation (MATH.md §3): GAE, the group estimators, masked moments and
//! whitening, DAPO's overlong shaping of the scores. Deterministic for any thread count.

mod gae;
mod groups;
mod moments;
mod overlong;

pub use gae::gae;
pub use groups::group_advantages;
pub use moments::{masked_moments, whiten};
pub use overlong::overlong_shaping;
