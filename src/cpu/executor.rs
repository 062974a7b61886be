//! The CPU backend as an [`Executor`]: host vectors, the `cpu` ops, the wall clock.

use std::time::Instant;

use crate::executor::{Scalar, Statistic, ViewMutOf, ViewOf, Workspace};
use crate::{
    Aggregated, Aggregation, BatchCounts, Element, Error, ExactKlGrads, ExactKlOptions, ExactKlOutputs,
    ExactKlPartial, Executor, FusedPolicyInputs, FusedPolicyOptions, FusedPolicyStats, GaeInputs, GaeOptions,
    GaeOutputs, GroupAdvantageOptions, GroupAdvantageOutputs, Groups, Host, KlRewardsInputs,
    KlRewardsOptions, LogSoftmaxOptions, Moments, Normaliser, OverlongInputs, OverlongOptions,
    PolicyLossInputs, PolicyLossOptions, PolicyLossOutputs, ReferenceRows, Result, RowShape, SampledKlInputs,
    SampledKlOptions, SampledKlOutputs, TargetIndex, TokenGrads, TokenLogprobsOptions, TokenOutputs, Tokens,
    ValueLossInputs, ValueLossOptions, ValueLossOutputs, VocabPartial, WhitenOptions, cpu,
};

/// The CPU backend as an [`Executor`] (rayon over rows, the calling thread waits for each op).
///
/// ```
/// use rlhf_kernels::{cpu::CpuExecutor, Executor};
/// let e = CpuExecutor;
/// let buf = e.upload(&[1.0f32, 2.0])?;
/// assert_eq!(e.download(&buf)?, [1.0, 2.0]);
/// # Ok::<(), rlhf_kernels::Error>(())
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuExecutor;

impl Executor for CpuExecutor {
    type Memory = Host;
    type Buffer<T: Scalar> = Vec<T>;
    type Stats<S: Statistic> = S;
    type Groups = Groups;
    type Mark = Instant;
    type FusedStats = FusedPolicyStats;

    fn describe(&self) -> String {
        cpu::describe()
    }

    fn zeros<T: Scalar>(&self, len: usize) -> Result<Vec<T>> {
        Ok(vec![T::zeroed(); len])
    }

    fn upload<T: Scalar>(&self, host: &[T]) -> Result<Vec<T>> {
        Ok(host.to_vec())
    }

    fn download<T: Scalar>(&self, buf: &Vec<T>) -> Result<Vec<T>> {
        Ok(buf.clone())
    }

    fn copy<T: Scalar>(&self, from: &Vec<T>, to: &mut Vec<T>) -> Result<()> {
        crate::logprobs::check_len("copy destination", to.len(), from.len())?;
        to.copy_from_slice(from);
        Ok(())
    }

    fn view<T: Scalar>(buf: &Vec<T>) -> &[T] {
        buf
    }

    fn view_mut<T: Scalar>(buf: &mut Vec<T>) -> &mut [T] {
        buf
    }

    fn stats<S: Statistic>(&self) -> Result<S> {
        Ok(S::default())
    }

    fn fused_stats(&self) -> Result<FusedPolicyStats> {
        Ok(FusedPolicyStats::default())
    }

    fn read_fused(&self, stats: &FusedPolicyStats) -> Result<FusedPolicyStats> {
        Ok(*stats)
    }

    fn stats_out<S: Statistic>(stats: &mut S) -> &mut S {
        stats
    }

    fn read<S: Statistic>(&self, stats: &S) -> Result<S> {
        Ok(*stats)
    }

    fn groups(&self, groups: &Groups) -> Result<Groups> {
        Ok(groups.clone())
    }

    fn mark(&self) -> Result<Instant> {
        Ok(Instant::now())
    }

    fn elapsed_ms(&self, start: &Instant, end: &Instant) -> Result<f64> {
        Ok(end.saturating_duration_since(*start).as_secs_f64() * 1e3)
    }

    fn workspace_bytes(&self, _op: Workspace) -> usize {
        0
    }

    fn finish(&mut self) -> Result<()> {
        Ok(())
    }

    fn log_softmax<T: Element + Scalar>(
        &mut self,
        logits: &[T],
        shape: RowShape,
        out: &mut [f32],
        opts: &LogSoftmaxOptions,
    ) -> Result<()> {
        cpu::log_softmax(logits, shape, out, opts)
    }

    fn log_softmax_backward<T: Element + Scalar>(
        &mut self,
        out: &[f32],
        grad_out: &[f32],
        shape: RowShape,
        grad_logits: &mut [T],
        opts: &LogSoftmaxOptions,
    ) -> Result<()> {
        cpu::log_softmax_backward(out, grad_out, shape, grad_logits, opts)
    }

    fn token_logprobs<T: Element + Scalar, I: TargetIndex + Scalar>(
        &mut self,
        logits: ViewOf<'_, Self, T>,
        shape: RowShape,
        tokens: &Tokens<'_, I>,
        out: TokenOutputs<'_>,
        opts: &TokenLogprobsOptions,
    ) -> Result<()> {
        cpu::token_logprobs(logits, shape, tokens, out, opts)
    }

    fn token_logprobs_backward<T: Element + Scalar, I: TargetIndex + Scalar>(
        &mut self,
        logits: &[T],
        shape: RowShape,
        tokens: &Tokens<'_, I>,
        grads: &TokenGrads<'_>,
        grad_logits: &mut [T],
        opts: &TokenLogprobsOptions,
    ) -> Result<()> {
        cpu::token_logprobs_backward(logits, shape, tokens, grads, grad_logits, opts)
    }

    fn token_logprobs_backward_in_place<T: Element + Scalar, I: TargetIndex + Scalar>(
        &mut self,
        logits: ViewMutOf<'_, Self, T>,
        shape: RowShape,
        tokens: &Tokens<'_, I>,
        grads: &TokenGrads<'_>,
        opts: &TokenLogprobsOptions,
    ) -> Result<()> {
        cpu::token_logprobs_backward_in_place(logits, shape, tokens, grads, opts)
    }

    fn sampled_kl(
        &mut self,
        inputs: &SampledKlInputs<'_>,
        out: SampledKlOutputs<'_>,
        opts: &SampledKlOptions,
    ) -> Result<()> {
        cpu::sampled_kl(inputs, out, opts).map(|_| ())
    }

    fn exact_kl<P: Element + Scalar, Q: Element + Scalar>(
        &mut self,
        policy: &[P],
        shape: RowShape,
        reference: &ReferenceRows<'_, Q>,
        out: ExactKlOutputs<'_>,
        opts: &ExactKlOptions,
    ) -> Result<()> {
        cpu::exact_kl(policy, shape, reference, out, opts)
    }

    fn exact_kl_backward<P: Element + Scalar, Q: Element + Scalar>(
        &mut self,
        policy: &[P],
        shape: RowShape,
        reference: &ReferenceRows<'_, Q>,
        grads: &ExactKlGrads<'_>,
        grad_policy: &mut [P],
        opts: &ExactKlOptions,
    ) -> Result<()> {
        cpu::exact_kl_backward(policy, shape, reference, grads, grad_policy, opts)
    }

    fn exact_kl_backward_in_place<P: Element + Scalar, Q: Element + Scalar>(
        &mut self,
        policy: &mut [P],
        shape: RowShape,
        reference: &ReferenceRows<'_, Q>,
        grads: &ExactKlGrads<'_>,
        opts: &ExactKlOptions,
    ) -> Result<()> {
        cpu::exact_kl_backward_in_place(policy, shape, reference, grads, opts)
    }

    fn vocab_shard_partials<T: Element + Scalar, I: TargetIndex + Scalar>(
        &mut self,
        logits: &[T],
        shape: RowShape,
        tokens: &Tokens<'_, I>,
        vocab_offset: usize,
        partials: &mut [VocabPartial],
        opts: &TokenLogprobsOptions,
    ) -> Result<()> {
        cpu::vocab_shard_partials(logits, shape, tokens, vocab_offset, partials, opts)
    }

    fn finish_vocab_partials<I: TargetIndex + Scalar>(
        &mut self,
        partials: &[VocabPartial],
        shards: usize,
        tokens: &Tokens<'_, I>,
        out: TokenOutputs<'_>,
        opts: &TokenLogprobsOptions,
    ) -> Result<()> {
        cpu::finish_vocab_partials(partials, shards, tokens, out, opts)
    }

    fn exact_kl_shard_partials<P: Element + Scalar, Q: Element + Scalar>(
        &mut self,
        policy: &[P],
        shape: RowShape,
        reference: &ReferenceRows<'_, Q>,
        partials: &mut [ExactKlPartial],
        opts: &ExactKlOptions,
    ) -> Result<()> {
        cpu::exact_kl_shard_partials(policy, shape, reference, partials, opts)
    }

    fn finish_exact_kl_partials(
        &mut self,
        partials: &[ExactKlPartial],
        mask: Option<&[u8]>,
        out: ExactKlOutputs<'_>,
        opts: &ExactKlOptions,
    ) -> Result<()> {
        cpu::finish_exact_kl_partials(partials, mask, out, opts)
    }

    fn jsd_shard_sums<P: Element + Scalar, Q: Element + Scalar>(
        &mut self,
        policy: &[P],
        shape: RowShape,
        reference: &ReferenceRows<'_, Q>,
        policy_lse: &[f32],
        ref_lse: &[f32],
        sums: &mut [f32],
        opts: &ExactKlOptions,
    ) -> Result<()> {
        // The device layout (2·rows f32) read as the host's pairs; an odd length is refused.
        let pairs = as_pairs_mut(sums)?;
        cpu::jsd_shard_sums(policy, shape, reference, policy_lse, ref_lse, pairs, opts)
    }

    fn finish_jsd_sums(
        &mut self,
        sums: &[f32],
        mask: Option<&[u8]>,
        [policy_lse, ref_lse]: [&[f32]; 2],
        out: ExactKlOutputs<'_>,
        opts: &ExactKlOptions,
    ) -> Result<()> {
        cpu::finish_jsd_sums(as_pairs(sums)?, mask, [policy_lse, ref_lse], out, opts)
    }

    fn kl_rewards(
        &mut self,
        inputs: &KlRewardsInputs<'_>,
        rewards: &mut [f32],
        opts: &KlRewardsOptions,
    ) -> Result<()> {
        cpu::kl_rewards(inputs, rewards, opts)
    }

    fn overlong_shaping(
        &mut self,
        inputs: &OverlongInputs<'_>,
        shaped: &mut [f32],
        opts: &OverlongOptions,
    ) -> Result<()> {
        cpu::overlong_shaping(inputs, shaped, opts)
    }

    fn gae(&mut self, inputs: &GaeInputs<'_>, out: GaeOutputs<'_>, opts: &GaeOptions) -> Result<()> {
        cpu::gae(inputs, out, opts)
    }

    fn masked_moments(
        &mut self,
        values: &[f32],
        shape: RowShape,
        mask: Option<&[u8]>,
        out: &mut Moments,
    ) -> Result<()> {
        *out = cpu::masked_moments(values, shape, mask)?;
        Ok(())
    }

    fn whiten(
        &mut self,
        values: &mut [f32],
        shape: RowShape,
        mask: Option<&[u8]>,
        opts: &WhitenOptions,
    ) -> Result<()> {
        cpu::whiten(values, shape, mask, opts).map(|_| ())
    }

    fn group_advantages(
        &mut self,
        scores: &[f32],
        groups: &Groups,
        out: GroupAdvantageOutputs<'_>,
        opts: &GroupAdvantageOptions,
    ) -> Result<()> {
        cpu::group_advantages(scores, groups, out, opts)
    }

    fn policy_loss(
        &mut self,
        inputs: &PolicyLossInputs<'_>,
        out: PolicyLossOutputs<'_>,
        opts: &PolicyLossOptions,
    ) -> Result<()> {
        cpu::policy_loss(inputs, out, opts).map(|_| ())
    }

    fn value_loss(
        &mut self,
        inputs: &ValueLossInputs<'_>,
        out: ValueLossOutputs<'_>,
        opts: &ValueLossOptions,
    ) -> Result<()> {
        cpu::value_loss(inputs, out, opts).map(|_| ())
    }

    fn policy_loss_from_logits<T: Element + Scalar, I: TargetIndex + Scalar>(
        &mut self,
        logits: &[T],
        shape: RowShape,
        inputs: &FusedPolicyInputs<'_, I>,
        grad_logits: &mut [T],
        stats: &mut FusedPolicyStats,
        opts: &FusedPolicyOptions,
    ) -> Result<()> {
        *stats = cpu::policy_loss_from_logits(logits, shape, inputs, grad_logits, opts)?;
        Ok(())
    }

    fn policy_loss_from_logits_in_place<T: Element + Scalar, I: TargetIndex + Scalar>(
        &mut self,
        logits: &mut [T],
        shape: RowShape,
        inputs: &FusedPolicyInputs<'_, I>,
        stats: &mut FusedPolicyStats,
        opts: &FusedPolicyOptions,
    ) -> Result<()> {
        *stats = cpu::policy_loss_from_logits_in_place(logits, shape, inputs, opts)?;
        Ok(())
    }

    fn aggregate(
        &mut self,
        values: &[f32],
        shape: RowShape,
        mask: Option<&[u8]>,
        aggregation: Aggregation,
        norm: Normaliser,
        out: &mut Aggregated,
    ) -> Result<()> {
        let value = aggregation.aggregate(values, shape, mask, norm)?;
        *out = Aggregated { value, counts: BatchCounts::of(shape, mask) };
        Ok(())
    }
}

/// `2·n` f32 as `n` pairs (the JSD's shard sums), or a shape error for an odd length.
fn as_pairs(v: &[f32]) -> Result<&[[f32; 2]]> {
    check_even(v.len())?;
    Ok(bytemuck::cast_slice(v))
}

/// [`as_pairs`] for a writable buffer.
fn as_pairs_mut(v: &mut [f32]) -> Result<&mut [[f32; 2]]> {
    check_even(v.len())?;
    Ok(bytemuck::cast_slice_mut(v))
}

fn check_even(len: usize) -> Result<()> {
    if len % 2 != 0 {
        return Err(Error::ShapeMismatch {
            what: "sums (pairs of f32)",
            min: len - 1,
            max: len + 1,
            actual: len,
        });
    }
    Ok(())
}
