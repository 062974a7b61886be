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
//! ```
//! use rlhf_kernels::{cpu, reference, LogSoftmaxOptions, RowShape};
//! let shape = RowShape::new(2, 3);
//! let logits = [1.0f32, 2.0, 3.0, 0.0, f32::NEG_INFINITY, 0.0];
//! let opts = LogSoftmaxOptions::default().temperature(0.5);
//! let mut out = vec![0.0f32; 6];
//! cpu::log_softmax(&logits, shape, &mut out, &opts)?;
//! let exact = reference::log_softmax(&logits, shape, &opts)?;
//! assert!(out.iter().zip(&exact).all(|(&a, &e)| a as f64 == e || (a as f64 - e).abs() < 1e-6));
//! # Ok::<(), rlhf_kernels::Error>(())
//! ```
#![warn(missing_docs)]

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
mod kl;
mod logprobs;
mod ppo;
pub mod reference;
mod shape;
pub mod testing;

pub use advantages::{
    GaeInputs, GaeOptions, GroupAdvantageOptions, GroupEstimator, GroupStd, Groups, MaskedSteps, Moments,
    SingletonGroups, WhitenOptions, gae_error_bound_factor, gae_error_scale,
};
pub use aggregation::{Aggregation, BatchCounts, Normaliser};
pub use backend::{Backend, CudaUnavailable};
#[cfg(feature = "cuda")]
pub use cudarc;
pub use dtype::{DType, Element, IndexType, TargetIndex, validate_targets};
pub use error::{Error, Result, RowProblem};
pub use half::{bf16, f16};
pub use kl::{
    ExactDivergence, ExactKlOptions, ExactKlPartial, ExactKlStatistic, ExactKlStats, KlController,
    KlDirection, KlEstimator, SampledKlOptions, SampledKlStats, merge_exact_kl_partials,
};
pub use logprobs::{
    LogSoftmaxOptions, TokenGrads, TokenLogprobsOptions, TokenOutputs, TokenStats, Tokens, VocabPartial,
    merge_vocab_partials,
};
pub use ppo::{
    FusedPolicyInputs, FusedPolicyStats, PolicyLossInputs, PolicyLossOptions, PolicyLossStats,
    PolicyObjective, ValueLossInputs, ValueLossOptions, ValueLossStats,
};
pub use shape::{MAX_DIM, RowBlocks, RowShape};

/// The README's code runs as a doctest, so it cannot drift from the API.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
