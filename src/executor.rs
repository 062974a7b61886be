//! Code written once for every backend. An [`Executor`] owns where buffers live and how ops
//! run: [`cpu::CpuExecutor`](crate::cpu::CpuExecutor) (host memory, the CPU ops) and, with the
//! `cuda` feature, `cuda::CudaExecutor` (device memory, the kernels on one stream, one status
//! word). A pipeline generic over `E: Executor` — allocate, upload, run the ops with the op
//! structs of `E::Memory`, read the statistics, [`finish`](Executor::finish) — runs on either;
//! [`Backend::run`](crate::Backend::run) hands it the best one.
//!
//! ```
//! use rlhf_kernels::{cpu::CpuExecutor, Executor, Result, RowShape, TokenLogprobsOptions, TokenOutputs, Tokens};
//!
//! /// The mean log-probability of the targets, on any backend.
//! fn mean_logp<E: Executor>(e: &mut E, logits: &[f32], shape: RowShape, targets: &[i64]) -> Result<f32> {
//!     let (logits, targets) = (e.upload(logits)?, e.upload(targets)?);
//!     let mut logp = e.zeros::<f32>(shape.rows)?;
//!     let tokens = Tokens::new(E::view(&targets));
//!     let out = TokenOutputs::default().logp(E::view_mut(&mut logp));
//!     e.token_logprobs(E::view(&logits), shape, &tokens, out, &TokenLogprobsOptions::default())?;
//!     e.finish()?; // on a GPU: wait, and report what the kernels found
//!     let logp = e.download(&logp)?;
//!     Ok(logp.iter().sum::<f32>() / logp.len() as f32)
//! }
//!
//! let m = mean_logp(&mut CpuExecutor, &[0.0, 0.0, 0.0, 0.0], RowShape::new(2, 2), &[0, 1])?;
//! assert!((m - 0.5f32.ln()).abs() < 1e-6);
//! # Ok::<(), rlhf_kernels::Error>(())
//! ```

use crate::ExactKlPartial;
use crate::memory::Memory;
use crate::{
    Aggregated, Aggregation, DType, Element, ExactDivergence, ExactKlGrads, ExactKlOptions, ExactKlOutputs,
    FusedPolicyInputs, FusedPolicyOptions, FusedPolicyStats, GaeInputs, GaeOptions, GaeOutputs,
    GroupAdvantageOptions, GroupAdvantageOutputs, Groups, KlRewardsInputs, KlRewardsOptions,
    LogSoftmaxOptions, Moments, Normaliser, OverlongInputs, OverlongOptions, PolicyLossInputs,
    PolicyLossOptions, PolicyLossOutputs, PolicyLossStats, ReferenceRows, Result, RowShape, SampledKlInputs,
    SampledKlOptions, SampledKlOutputs, SampledKlStats, TargetIndex, TokenGrads, TokenLogprobsOptions,
    TokenOutputs, Tokens, ValueLossInputs, ValueLossOptions, ValueLossOutputs, ValueLossStats, VocabPartial,
    WhitenOptions,
};

/// An element an [`Executor`] can allocate, upload and download: the logits' dtypes
/// (`f32`, `f16`, `bf16`), the target ids (`i32`, `u32`, `i64`), mask bytes (`u8`), `f64`,
/// and the shard records ([`VocabPartial`], [`ExactKlPartial`]).
/// Sealed.
pub trait Scalar:
    Copy + bytemuck::Zeroable + Send + Sync + 'static + sealed::Sealed + device::DeviceScalar
{
}

/// A batch statistic of an op: [`SampledKlStats`], [`PolicyLossStats`], [`ValueLossStats`],
/// [`Moments`] and [`Aggregated`]. The host ops return it; the kernels write it as f64 words
/// into a `cuda::DeviceStats`. Sealed.
pub trait Statistic: Copy + Default + std::fmt::Debug + sealed::Sealed + 'static {
    /// Number of f64 words the kernels write.
    #[cfg(feature = "cuda")]
    const WORDS: usize;
    /// Decodes the kernels' words.
    #[cfg(feature = "cuda")]
    fn from_words(words: &[f64]) -> Result<Self>;
}

mod sealed {
    pub trait Sealed {}
}

#[cfg(feature = "cuda")]
mod device {
    /// The cudarc bounds of an element that lives on the device.
    pub trait DeviceScalar: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits {}
    impl<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits> DeviceScalar for T {}
}

#[cfg(not(feature = "cuda"))]
mod device {
    /// No device: no extra bound.
    pub trait DeviceScalar {}
    impl<T> DeviceScalar for T {}
}

macro_rules! scalars {
    ($($t:ty),*) => {$(
        impl sealed::Sealed for $t {}
        impl Scalar for $t {}
    )*};
}
scalars!(f32, f64, half::f16, half::bf16, u8, i32, u32, i64, VocabPartial, ExactKlPartial);

macro_rules! statistics {
    ($($t:ty => $words:expr, $decode:expr;)*) => {$(
        impl sealed::Sealed for $t {}
        impl Statistic for $t {
            #[cfg(feature = "cuda")]
            const WORDS: usize = $words;
            #[cfg(feature = "cuda")]
            fn from_words(words: &[f64]) -> Result<Self> {
                $decode(words)
            }
        }
    )*};
}

statistics! {
    SampledKlStats => crate::cuda::raw::SAMPLED_KL_STATS_WORDS, crate::cuda::raw::sampled_kl_stats_from_words;
    PolicyLossStats => crate::cuda::raw::POLICY_STATS_WORDS, crate::cuda::raw::policy_stats_from_words;
    ValueLossStats => crate::cuda::raw::VALUE_STATS_WORDS, crate::cuda::raw::value_stats_from_words;
    Moments => 5, |w: &[f64]| {
        crate::logprobs::check_len("moments words", w.len(), 5)?;
        Ok(Moments { count: w[0], mean: w[1], var: w[2], min: w[3], max: w[4] })
    };
    Aggregated => 4, |w: &[f64]| {
        crate::logprobs::check_len("aggregate words", w.len(), 4)?;
        Ok(Aggregated {
            value: w[0],
            counts: crate::BatchCounts { valid_tokens: w[1], valid_sequences: w[2], sequences: w[3] },
        })
    };
}

/// An op whose scratch an executor can size ([`Executor::workspace_bytes`]).
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub enum Workspace {
    /// [`Executor::token_logprobs`] on logits of this shape and dtype.
    TokenLogprobs(RowShape, DType),
    /// [`Executor::exact_kl`] on logits rows of this shape, for this divergence.
    ExactKl(RowShape, ExactDivergence),
    /// [`Executor::sampled_kl`] on a `[B, T]` batch.
    SampledKl(RowShape),
    /// [`Executor::gae`] on a `[B, T]` batch.
    Gae(RowShape),
    /// [`Executor::policy_loss`] on a `[B, T]` batch.
    PolicyLoss(RowShape),
    /// [`Executor::value_loss`] on a `[B, T]` batch.
    ValueLoss(RowShape),
}

/// A read-only view of `T` in `E`'s memory.
pub type ViewOf<'a, E, T> = <<E as Executor>::Memory as Memory>::View<'a, T>;
/// A writable view of `T` in `E`'s memory.
pub type ViewMutOf<'a, E, T> = <<E as Executor>::Memory as Memory>::ViewMut<'a, T>;

/// A backend that runs the crate's ops on buffers of its own memory — the same ops, options and
/// input/output structs as the per-backend modules (each method's docs are those of
/// [`cpu`](crate::cpu)'s function of the same name), so a pipeline is written once. Ops are
/// asynchronous on a GPU: statistics and outputs are ready after [`finish`](Self::finish) (or a
/// download), and row problems the kernels find are reported by `finish`.
pub trait Executor {
    /// Where the buffers live.
    type Memory: Memory;
    /// An owned buffer of `T` (`Vec<T>` on the host, a `CudaSlice<T>` on the device).
    type Buffer<T: Scalar>;
    /// An owned batch statistic (`S` itself on the host, a `DeviceStats<S>` on the device).
    type Stats<S: Statistic>;
    /// Groups of sequences prepared for the group estimators (uploaded once on a device).
    type Groups;
    /// A point in the executor's timeline ([`mark`](Self::mark)).
    type Mark;
    /// The statistics of the fused path ([`policy_loss_from_logits`](Self::policy_loss_from_logits)),
    /// with its scratch on a device.
    type FusedStats;

    /// One line for logs: "cpu (2 threads, avx512)" or "cuda:0 NVIDIA H100 (sm_90)".
    fn describe(&self) -> String;
    /// A buffer of `len` elements of all-zero bits on every backend (for the shard records
    /// that is not their `EMPTY` identity: upload `EMPTY` records where a merge needs one).
    fn zeros<T: Scalar>(&self, len: usize) -> Result<Self::Buffer<T>>;
    /// A copy of `host` in this memory.
    fn upload<T: Scalar>(&self, host: &[T]) -> Result<Self::Buffer<T>>;
    /// A host copy of `buf` (waits for the work that writes it).
    fn download<T: Scalar>(&self, buf: &Self::Buffer<T>) -> Result<Vec<T>>;
    /// Copies `from` into `to` (same length).
    fn copy<T: Scalar>(&self, from: &Self::Buffer<T>, to: &mut Self::Buffer<T>) -> Result<()>;
    /// A view of the whole buffer, for the op structs.
    fn view<T: Scalar>(buf: &Self::Buffer<T>) -> ViewOf<'_, Self, T>;
    /// A writable view of the whole buffer.
    fn view_mut<T: Scalar>(buf: &mut Self::Buffer<T>) -> ViewMutOf<'_, Self, T>;
    /// A statistic holder, for an op's outputs ([`stats_out`](Self::stats_out)).
    fn stats<S: Statistic>(&self) -> Result<Self::Stats<S>>;
    /// A holder for the fused path's statistics.
    fn fused_stats(&self) -> Result<Self::FusedStats>;
    /// The statistics of the last fused call that wrote `stats` (waits for it on a GPU).
    fn read_fused(&self, stats: &Self::FusedStats) -> Result<FusedPolicyStats>;
    /// Where an op writes into `stats` (the `stats` field of its outputs).
    fn stats_out<S: Statistic>(stats: &mut Self::Stats<S>) -> <Self::Memory as Memory>::Stats<'_, S>;
    /// The statistic of the last op that wrote `stats` (waits for it on a GPU).
    fn read<S: Statistic>(&self, stats: &Self::Stats<S>) -> Result<S>;
    /// `groups` ready for [`group_advantages`](Self::group_advantages).
    fn groups(&self, groups: &Groups) -> Result<Self::Groups>;
    /// The current point of the timeline (an event on a GPU stream, the clock on the host).
    fn mark(&self) -> Result<Self::Mark>;
    /// Milliseconds between two marks (waits for `end` on a GPU).
    fn elapsed_ms(&self, start: &Self::Mark, end: &Self::Mark) -> Result<f64>;
    /// Bytes of scratch `op` uses (0 on the host); ops allocate it themselves when not given.
    fn workspace_bytes(&self, op: Workspace) -> usize;
    /// Waits for the queued work and returns the first row problem it found (a no-op on the
    /// host, whose ops return their errors directly).
    fn finish(&mut self) -> Result<()>;

    /// The full log-softmax, `[N, V]` f32 out ([`cpu::log_softmax`](crate::cpu::log_softmax)).
    fn log_softmax<T: Element + Scalar>(
        &mut self,
        logits: ViewOf<'_, Self, T>,
        shape: RowShape,
        out: ViewMutOf<'_, Self, f32>,
        opts: &LogSoftmaxOptions,
    ) -> Result<()>;
    /// Its backward ([`cpu::log_softmax_backward`](crate::cpu::log_softmax_backward)).
    fn log_softmax_backward<T: Element + Scalar>(
        &mut self,
        out: ViewOf<'_, Self, f32>,
        grad_out: ViewOf<'_, Self, f32>,
        shape: RowShape,
        grad_logits: ViewMutOf<'_, Self, T>,
        opts: &LogSoftmaxOptions,
    ) -> Result<()>;
    /// Token log-probabilities, entropy and log-sum-exp ([`cpu::token_logprobs`](crate::cpu::token_logprobs)).
    fn token_logprobs<T: Element + Scalar, I: TargetIndex + Scalar>(
        &mut self,
        logits: ViewOf<'_, Self, T>,
        shape: RowShape,
        tokens: &Tokens<'_, I, Self::Memory>,
        out: TokenOutputs<'_, Self::Memory>,
        opts: &TokenLogprobsOptions,
    ) -> Result<()>;
    /// The backward of [`token_logprobs`](Self::token_logprobs) into `grad_logits`
    /// ([`cpu::token_logprobs_backward`](crate::cpu::token_logprobs_backward)).
    fn token_logprobs_backward<T: Element + Scalar, I: TargetIndex + Scalar>(
        &mut self,
        logits: ViewOf<'_, Self, T>,
        shape: RowShape,
        tokens: &Tokens<'_, I, Self::Memory>,
        grads: &TokenGrads<'_, Self::Memory>,
        grad_logits: ViewMutOf<'_, Self, T>,
        opts: &TokenLogprobsOptions,
    ) -> Result<()>;
    /// The backward of [`token_logprobs`](Self::token_logprobs) over the logits themselves
    /// ([`cpu::token_logprobs_backward_in_place`](crate::cpu::token_logprobs_backward_in_place)).
    fn token_logprobs_backward_in_place<T: Element + Scalar, I: TargetIndex + Scalar>(
        &mut self,
        logits: ViewMutOf<'_, Self, T>,
        shape: RowShape,
        tokens: &Tokens<'_, I, Self::Memory>,
        grads: &TokenGrads<'_, Self::Memory>,
        opts: &TokenLogprobsOptions,
    ) -> Result<()>;
    /// The sampled KL estimators ([`cpu::sampled_kl`](crate::cpu::sampled_kl)); the
    /// statistics go to `out.stats`.
    fn sampled_kl(
        &mut self,
        inputs: &SampledKlInputs<'_, Self::Memory>,
        out: SampledKlOutputs<'_, Self::Memory>,
        opts: &SampledKlOptions,
    ) -> Result<()>;
    /// The exact divergence between two logits rows ([`cpu::exact_kl`](crate::cpu::exact_kl));
    /// its statistic goes to `out.statistic`.
    fn exact_kl<P: Element + Scalar, Q: Element + Scalar>(
        &mut self,
        policy: ViewOf<'_, Self, P>,
        shape: RowShape,
        reference: &ReferenceRows<'_, Q, Self::Memory>,
        out: ExactKlOutputs<'_, Self::Memory>,
        opts: &ExactKlOptions,
    ) -> Result<()>;
    /// Its backward into `grad_policy` ([`cpu::exact_kl_backward`](crate::cpu::exact_kl_backward)).
    fn exact_kl_backward<P: Element + Scalar, Q: Element + Scalar>(
        &mut self,
        policy: ViewOf<'_, Self, P>,
        shape: RowShape,
        reference: &ReferenceRows<'_, Q, Self::Memory>,
        grads: &ExactKlGrads<'_, Self::Memory>,
        grad_policy: ViewMutOf<'_, Self, P>,
        opts: &ExactKlOptions,
    ) -> Result<()>;
    /// Its backward over the policy logits themselves
    /// ([`cpu::exact_kl_backward_in_place`](crate::cpu::exact_kl_backward_in_place)).
    fn exact_kl_backward_in_place<P: Element + Scalar, Q: Element + Scalar>(
        &mut self,
        policy: ViewMutOf<'_, Self, P>,
        shape: RowShape,
        reference: &ReferenceRows<'_, Q, Self::Memory>,
        grads: &ExactKlGrads<'_, Self::Memory>,
        opts: &ExactKlOptions,
    ) -> Result<()>;
    /// Per-row [`VocabPartial`]s of one vocabulary shard of the logits (global token id of its
    /// first column `vocab_offset`; [`cpu::vocab_shard_partials`](crate::cpu::vocab_shard_partials)).
    #[allow(clippy::too_many_arguments)] // the token op's arguments, the shard's offset and records
    fn vocab_shard_partials<T: Element + Scalar, I: TargetIndex + Scalar>(
        &mut self,
        logits: ViewOf<'_, Self, T>,
        shape: RowShape,
        tokens: &Tokens<'_, I, Self::Memory>,
        vocab_offset: usize,
        partials: ViewMutOf<'_, Self, VocabPartial>,
        opts: &TokenLogprobsOptions,
    ) -> Result<()>;
    /// The token outputs from the gathered partials of `shards` shards (`[shards][rows]`;
    /// [`cpu::finish_vocab_partials`](crate::cpu::finish_vocab_partials)).
    fn finish_vocab_partials<I: TargetIndex + Scalar>(
        &mut self,
        partials: ViewOf<'_, Self, VocabPartial>,
        shards: usize,
        tokens: &Tokens<'_, I, Self::Memory>,
        out: TokenOutputs<'_, Self::Memory>,
        opts: &TokenLogprobsOptions,
    ) -> Result<()>;
    /// Per-row [`ExactKlPartial`]s of one vocabulary shard of both logits rows
    /// ([`cpu::exact_kl_shard_partials`](crate::cpu::exact_kl_shard_partials)).
    fn exact_kl_shard_partials<P: Element + Scalar, Q: Element + Scalar>(
        &mut self,
        policy: ViewOf<'_, Self, P>,
        shape: RowShape,
        reference: &ReferenceRows<'_, Q, Self::Memory>,
        partials: ViewMutOf<'_, Self, ExactKlPartial>,
        opts: &ExactKlOptions,
    ) -> Result<()>;
    /// The exact divergence from the gathered partials (`[shards][rows]`;
    /// [`cpu::finish_exact_kl_partials`](crate::cpu::finish_exact_kl_partials)).
    fn finish_exact_kl_partials(
        &mut self,
        partials: ViewOf<'_, Self, ExactKlPartial>,
        mask: Option<ViewOf<'_, Self, u8>>,
        out: ExactKlOutputs<'_, Self::Memory>,
        opts: &ExactKlOptions,
    ) -> Result<()>;
    /// The JSD's second round on one shard: `2·rows` f32 (`[Σ p·log(p/m), Σ q·log(q/m)]` per
    /// row) from the full rows' log-sum-exps ([`cpu::jsd_shard_sums`](crate::cpu::jsd_shard_sums)).
    #[allow(clippy::too_many_arguments)] // the two sides, both normalisers, the sums, options
    fn jsd_shard_sums<P: Element + Scalar, Q: Element + Scalar>(
        &mut self,
        policy: ViewOf<'_, Self, P>,
        shape: RowShape,
        reference: &ReferenceRows<'_, Q, Self::Memory>,
        policy_lse: ViewOf<'_, Self, f32>,
        ref_lse: ViewOf<'_, Self, f32>,
        sums: ViewMutOf<'_, Self, f32>,
        opts: &ExactKlOptions,
    ) -> Result<()>;
    /// The JSD's value and/or policy term from the gathered sums (`[shards][rows][2]` f32;
    /// [`cpu::finish_jsd_sums`](crate::cpu::finish_jsd_sums)).
    fn finish_jsd_sums(
        &mut self,
        sums: ViewOf<'_, Self, f32>,
        mask: Option<ViewOf<'_, Self, u8>>,
        lse: [ViewOf<'_, Self, f32>; 2],
        out: ExactKlOutputs<'_, Self::Memory>,
        opts: &ExactKlOptions,
    ) -> Result<()>;
    /// The KL folded into per-token rewards ([`cpu::kl_rewards`](crate::cpu::kl_rewards)).
    fn kl_rewards(
        &mut self,
        inputs: &KlRewardsInputs<'_, Self::Memory>,
        rewards: ViewMutOf<'_, Self, f32>,
        opts: &KlRewardsOptions,
    ) -> Result<()>;
    /// DAPO's overlong shaping of the scores
    /// ([`cpu::overlong_shaping`](crate::cpu::overlong_shaping)).
    fn overlong_shaping(
        &mut self,
        inputs: &OverlongInputs<'_, Self::Memory>,
        shaped: ViewMutOf<'_, Self, f32>,
        opts: &OverlongOptions,
    ) -> Result<()>;
    /// GAE ([`cpu::gae`](crate::cpu::gae)).
    fn gae(
        &mut self,
        inputs: &GaeInputs<'_, Self::Memory>,
        out: GaeOutputs<'_, Self::Memory>,
        opts: &GaeOptions,
    ) -> Result<()>;
    /// Count, mean, variance, min and max over the valid values
    /// ([`cpu::masked_moments`](crate::cpu::masked_moments)), into `out`.
    fn masked_moments(
        &mut self,
        values: ViewOf<'_, Self, f32>,
        shape: RowShape,
        mask: Option<ViewOf<'_, Self, u8>>,
        out: <Self::Memory as Memory>::Stats<'_, Moments>,
    ) -> Result<()>;
    /// Whitening in place ([`cpu::whiten`](crate::cpu::whiten)).
    fn whiten(
        &mut self,
        values: ViewMutOf<'_, Self, f32>,
        shape: RowShape,
        mask: Option<ViewOf<'_, Self, u8>>,
        opts: &WhitenOptions,
    ) -> Result<()>;
    /// The group estimators ([`cpu::group_advantages`](crate::cpu::group_advantages)).
    fn group_advantages(
        &mut self,
        scores: ViewOf<'_, Self, f32>,
        groups: &Self::Groups,
        out: GroupAdvantageOutputs<'_, Self::Memory>,
        opts: &GroupAdvantageOptions,
    ) -> Result<()>;
    /// The policy loss and its gradients ([`cpu::policy_loss`](crate::cpu::policy_loss)); the
    /// statistics go to `out.stats`.
    fn policy_loss(
        &mut self,
        inputs: &PolicyLossInputs<'_, Self::Memory>,
        out: PolicyLossOutputs<'_, Self::Memory>,
        opts: &PolicyLossOptions,
    ) -> Result<()>;
    /// The value loss and its gradient ([`cpu::value_loss`](crate::cpu::value_loss)); the
    /// statistics go to `out.stats`.
    fn value_loss(
        &mut self,
        inputs: &ValueLossInputs<'_, Self::Memory>,
        out: ValueLossOutputs<'_, Self::Memory>,
        opts: &ValueLossOptions,
    ) -> Result<()>;
    /// The policy loss straight from the logits, with the gradient into `grad_logits`
    /// ([`cpu::policy_loss_from_logits`](crate::cpu::policy_loss_from_logits)).
    fn policy_loss_from_logits<T: Element + Scalar, I: TargetIndex + Scalar>(
        &mut self,
        logits: ViewOf<'_, Self, T>,
        shape: RowShape,
        inputs: &FusedPolicyInputs<'_, I, Self::Memory>,
        grad_logits: ViewMutOf<'_, Self, T>,
        stats: &mut Self::FusedStats,
        opts: &FusedPolicyOptions,
    ) -> Result<()>;
    /// The same, the gradient over the logits themselves
    /// ([`cpu::policy_loss_from_logits_in_place`](crate::cpu::policy_loss_from_logits_in_place)).
    fn policy_loss_from_logits_in_place<T: Element + Scalar, I: TargetIndex + Scalar>(
        &mut self,
        logits: ViewMutOf<'_, Self, T>,
        shape: RowShape,
        inputs: &FusedPolicyInputs<'_, I, Self::Memory>,
        stats: &mut Self::FusedStats,
        opts: &FusedPolicyOptions,
    ) -> Result<()>;
    /// A masked batch of per-token values to one scalar
    /// ([`Aggregation::aggregate`](crate::Aggregation::aggregate)), with the batch's counts, into `out`.
    fn aggregate(
        &mut self,
        values: ViewOf<'_, Self, f32>,
        shape: RowShape,
        mask: Option<ViewOf<'_, Self, u8>>,
        aggregation: Aggregation,
        norm: Normaliser,
        out: <Self::Memory as Memory>::Stats<'_, Aggregated>,
    ) -> Result<()>;
}

/// A pipeline to run on whichever backend [`Backend::run`](crate::Backend::run) picks.
pub trait Job {
    /// What the pipeline returns.
    type Output;
    /// Runs the pipeline on `e`.
    fn run<E: Executor>(self, e: &mut E) -> Result<Self::Output>;
}
