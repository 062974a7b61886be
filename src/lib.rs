//! # rlhf-kernels
//!
//! Hand-written CUDA kernels for the hot path of RLHF / PPO / GRPO training, with safe Rust
//! wrappers, a fast multi-threaded CPU fallback and a float64 reference.
//!
//! Every op exists three times with one semantics (the formulas are those of the project's
//! `MATH.md`, restated in each function's docs):
//!
//! | module | what | precision |
//! | --- | --- | --- |
//! | [`reference`](mod@reference) | obvious code, the oracle for tests (yours too) | f64 |
//! | [`cpu`] | rayon over rows, vectorised inner loops, runtime SIMD dispatch | f32 |
//! | `cuda` (feature `cuda`) | kernels from `kernels/*.cu`, safe cudarc layer + raw pointer layer | f32 accumulation |
//!
//! Ops take caller-provided buffers plus an explicit [`RowShape`], allocate nothing in the
//! hot path, and never synchronise the GPU behind the caller's back. Bad input is an
//! [`Error`], never a panic or a silent NaN.
//!
//! Adapters: `candle` (feature `candle`, `candle-cuda` for GPU tensors) runs the ops on candle
//! tensors inside candle's autograd; the repository's `python/` package runs them on any
//! DLPack tensor with PyTorch autograd. Both read framework views in place through
//! [`RowBlocks`].
//!
//! # From logits to a PPO loss, in three steps
//!
//! The path a trainer follows on every micro-batch: the log-probabilities of the sampled tokens
//! (and their entropies) from the policy's logits, the policy loss and its gradient with
//! respect to those log-probabilities, then the backward into the logits, which never passes
//! through an `[N, V]` log-softmax. The same three calls exist on the GPU in `cuda` (with device
//! buffers and a [`LaunchContext`](crate::cuda::LaunchContext): the caller's stream and the
//! status word the kernels report into), and [`cpu::policy_loss_from_logits`] fuses them.
//!
//! ```
//! use rlhf_kernels::{cpu, PolicyLossInputs, PolicyLossOptions, PolicyLossOutputs, RowShape,
//!                    TokenGrads, TokenLogprobsOptions, TokenOutputs, Tokens};
//! // Two sequences of two tokens over a vocabulary of 3: one logits row per token.
//! let (logits, shape) = ([1.0f32, 2.0, 0.5, 0.0, 0.0, 3.0, 2.0, 1.0, 0.0, 0.5, 0.5, 0.5], RowShape::new(4, 3));
//! let (targets, mask) = ([1i64, 2, 0, 1], [1u8, 1, 1, 0]);
//! let tokens = Tokens::new(&targets).with_mask(&mask);
//! let lp_opts = TokenLogprobsOptions::default();
//!
//! // 1. Token log-probabilities, entropies and log-sum-exps (for the backward), one pass.
//! let (mut logp, mut entropy, mut lse) = ([0.0f32; 4], [0.0f32; 4], [0.0f32; 4]);
//! let out = TokenOutputs::default().logp(&mut logp).entropy(&mut entropy).lse(&mut lse);
//! cpu::token_logprobs(&logits, shape, &tokens, out, &lp_opts)?;
//!
//! // 2. The clipped surrogate over the [B, T] batch, with an entropy bonus: the loss, its
//! //    gradient in logp and in the entropies, and the statistics, one pass.
//! let (old_logp, advantages) = ([-1.0f32, -2.0, -0.5, 0.0], [1.0f32, 1.0, -1.0, 0.0]);
//! let inputs = PolicyLossInputs::new(RowShape::new(2, 2), &logp, &old_logp, &advantages)
//!     .mask(&mask)
//!     .entropy(&entropy);
//! let (mut grad_logp, mut grad_entropy) = ([0.0f32; 4], [0.0f32; 4]);
//! let out = PolicyLossOutputs::default().grad_logp(&mut grad_logp).grad_entropy(&mut grad_entropy);
//! let stats = cpu::policy_loss(&inputs, out, &PolicyLossOptions::default().entropy_coef(0.01))?;
//!
//! // 3. The backward into the logits (here in place: the logits become their gradient).
//! let grads = TokenGrads::new(&lse).grad_logp(&grad_logp).grad_entropy(&grad_entropy, &entropy);
//! let mut grad_logits = logits;
//! cpu::token_logprobs_backward_in_place(&mut grad_logits, shape, &tokens, &grads, &lp_opts)?;
//! assert!(stats.loss.is_finite() && grad_logits[9..].iter().all(|&g| g == 0.0)); // padding: no gradient
//! # Ok::<(), rlhf_kernels::Error>(())
//! ```
//!
//! What a user learns on the way: [`RowShape`] (rows, columns and the row stride of every
//! buffer), [`Tokens`] (targets and the mask), [`TokenOutputs`] and [`TokenGrads`],
//! [`PolicyLossInputs`] and the loss's outputs, and an options struct per op
//! ([`TokenLogprobsOptions`], [`PolicyLossOptions`]) with builder methods and defaults that
//! match verl.
#![warn(missing_docs)]

/// Pins the layout of a struct the kernels share (a parameter block or a record): its size, the
/// byte offset of every field, and that the list names every field (a pattern that must
/// mention them all). The kernel side pins the same size and offsets, and the field count, in
/// one `static_assert` beside its declaration, so any difference between the two declarations
/// (a field swapped, added, or put into padding on one side) is a build error.
macro_rules! pin_layout {
    ($t:ident, $size:expr, { $($field:ident: $offset:expr),* $(,)? }) => {
        const _: () = {
            assert!(::std::mem::size_of::<$t>() == $size);
            $(assert!(::std::mem::offset_of!($t, $field) == $offset);)*
        };
        const _: fn($t) = |v| {
            let $t { $($field: _),* } = v;
        };
    };
}

mod advantages;
mod aggregation;
mod backend;
#[cfg(feature = "candle")]
pub mod candle;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
mod dtype;
mod error;
mod executor;
mod kl;
mod logprobs;
mod memory;
mod ppo;
pub mod reference;
mod shape;
pub mod testing;

pub use advantages::{
    GaeInputs, GaeOptions, GaeOutputs, GroupAdvantageOptions, GroupAdvantageOutputs, GroupEstimator,
    GroupStd, Groups, MaskedSteps, Moments, OverlongInputs, OverlongOptions, SingletonGroups, TokenOutput,
    WhitenOptions, gae_error_bound_factor, gae_error_scale,
};
pub use aggregation::{Aggregated, Aggregation, BatchCounts, Normaliser};
pub use backend::{Backend, CudaUnavailable};
#[cfg(feature = "cuda")]
pub use cudarc;
pub use dtype::{DType, Element, IndexType, TargetIndex, validate_targets};
pub use error::{Error, Result, RowProblem};
pub use executor::{Executor, Job, Scalar, Statistic, ViewMutOf, ViewOf, Workspace};
pub use half::{bf16, f16};
pub use kl::{
    ExactDivergence, ExactKlGrads, ExactKlOptions, ExactKlOutputs, ExactKlPartial, ExactKlStatistic,
    ExactKlStats, KlController, KlDirection, KlEstimator, KlRewardsInputs, KlRewardsOptions, ReferenceRows,
    SampledKlInputs, SampledKlOptions, SampledKlOutputs, SampledKlStats, merge_exact_kl_partials,
};
pub use logprobs::{
    LogSoftmaxOptions, TokenGrads, TokenLogprobsOptions, TokenOutputs, TokenStats, Tokens, VocabPartial,
    merge_vocab_partials,
};
#[cfg(feature = "cuda")]
pub use memory::Cuda;
pub use memory::{Buffer, Host, IntoView, IntoViewMut, Memory};
pub use ppo::{
    FusedPolicyInputs, FusedPolicyOptions, FusedPolicyStats, PolicyLossInputs, PolicyLossOptions,
    PolicyLossOutputs, PolicyLossStats, PolicyObjective, ValueLossInputs, ValueLossOptions, ValueLossOutputs,
    ValueLossStats,
};
pub use shape::{MAX_DIM, RowBlocks, RowShape};

/// The README's code runs as a doctest, so it cannot drift from the API.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
