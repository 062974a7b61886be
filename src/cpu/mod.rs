//! The fast CPU backend: f32 arithmetic, rayon over rows, vectorised inner loops with runtime
//! CPU-feature dispatch. Same online algorithms as the CUDA kernels.
//!
//! Every function writes into caller-provided buffers and is deterministic: the reduction
//! order inside a row depends only on the row length, never on the thread count, the batch
//! or the CPU's vector width.

mod advantages;
mod executor;
mod kl;
mod logprobs;
mod ppo;
pub(crate) mod simd;

use rayon::iter::Either;
use rayon::prelude::*;

use crate::RowShape;

pub use advantages::{gae, group_advantages, masked_moments, overlong_shaping, whiten};
pub use executor::CpuExecutor;
pub use kl::{
    exact_kl, exact_kl_backward, exact_kl_backward_in_place, exact_kl_shard_partials,
    finish_exact_kl_partials, finish_jsd_sums, jsd_shard_sums, kl_rewards, sampled_kl,
};
pub use logprobs::{
    finish_vocab_partials, log_softmax, log_softmax_backward, token_logprobs, token_logprobs_backward,
    token_logprobs_backward_in_place, vocab_shard_partials,
};
pub use ppo::{policy_loss, policy_loss_from_logits, policy_loss_from_logits_in_place, value_loss};

/// A short description of the CPU backend: worker threads and vector instruction set.
pub fn describe() -> String {
    format!("cpu ({} threads, {})", rayon::current_num_threads(), simd::level_name())
}

/// The lowest-row problem of a parallel map over rows (deterministic whatever the schedule).
pub(crate) fn first_problem<P: Copy>(a: Option<(usize, P)>, b: Option<(usize, P)>) -> Option<(usize, P)> {
    match (a, b) {
        (Some(x), Some(y)) => Some(if y.0 < x.0 { y } else { x }),
        (x, None) => x,
        (None, y) => y,
    }
}

/// Per-row mutable views of an optional `[B, T]` buffer (`None` for every row without one).
pub(crate) fn rows_mut(
    buf: Option<&mut [f32]>,
    shape: RowShape,
) -> impl IndexedParallelIterator<Item = Option<&mut [f32]>> {
    match buf {
        Some(b) => Either::Left(b.par_chunks_mut(shape.row_stride).map(move |c| Some(&mut c[..shape.cols]))),
        None => Either::Right((0..shape.rows).into_par_iter().map(|_| None)),
    }
}

/// Rows per rayon task so that each task touches at least ~32k elements.
pub(crate) fn rows_per_task(cols: usize) -> usize {
    (32 * 1024 / cols.max(1)).max(1)
}
