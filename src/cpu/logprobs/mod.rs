//! The logprobs family on the CPU: full log-softmax, and token log-probabilities with entropy
//! and lse that never materialise the `[N, V]` log-softmax.

mod log_softmax;
mod tokens;

pub use log_softmax::{log_softmax, log_softmax_backward};
pub use tokens::{
    finish_vocab_partials, token_logprobs, token_logprobs_backward, token_logprobs_backward_in_place,
    vocab_shard_partials,
};
