//! The float64 reference: every op written for obviousness, not speed.
//!
//! It reads exactly the values the fast backends read (inputs converted to f64 exactly) and
//! computes in f64, so `cpu` and `cuda` results are held to it with tolerances scaled to the
//! dtype (see [`testing`](crate::testing)). It is public so that downstream trainers can test
//! their own code against it too.

mod advantages;
mod kl;
mod logprobs;
mod ppo;

pub use advantages::{Gae, gae, group_advantages, masked_moments, overlong_shaping, whiten};
pub(crate) use kl::check_pair;
pub use kl::{ExactKl, SampledKl, exact_kl, exact_kl_backward, kl_rewards, sampled_kl};
pub use logprobs::{
    TokenLogprobs, log_softmax, log_softmax_backward, token_logprobs, token_logprobs_backward,
};
pub use ppo::{PolicyLoss, ValueLoss, policy_loss, value_loss};

/// Whether an f64 result is representable in the backends' f32 outputs (finite after the
/// conversion); one that is not is [`RowProblem::Overflow`](crate::RowProblem::Overflow).
pub(crate) fn fits_f32(x: f64) -> bool {
    (x as f32).is_finite()
}
