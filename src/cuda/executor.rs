//! The CUDA backend as an [`Executor`]: device buffers, the kernels on one stream, one status
//! word, CUDA events for the timeline.

use std::sync::Arc;

use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{CudaEvent, CudaSlice, CudaStream, CudaView, CudaViewMut};

use crate::cuda::{
    self, CudaDevice, DeviceFusedStats, DeviceGroups, DeviceStats, LaunchContext, driver_error,
};
use crate::executor::{Scalar, Statistic, Workspace};
use crate::{
    Aggregated, Aggregation, Cuda, Element, ExactKlGrads, ExactKlOptions, ExactKlOutputs, ExactKlPartial,
    Executor, FusedPolicyInputs, FusedPolicyOptions, FusedPolicyStats, GaeInputs, GaeOptions, GaeOutputs,
    GroupAdvantageOptions, GroupAdvantageOutputs, Groups, KlRewardsInputs, KlRewardsOptions,
    LogSoftmaxOptions, Moments, Normaliser, OverlongInputs, OverlongOptions, PolicyLossInputs,
    PolicyLossOptions, PolicyLossOutputs, ReferenceRows, Result, RowShape, SampledKlInputs, SampledKlOptions,
    SampledKlOutputs, TargetIndex, TokenGrads, TokenLogprobsOptions, TokenOutputs, Tokens, ValueLossInputs,
    ValueLossOptions, ValueLossOutputs, VocabPartial, WhitenOptions,
};

/// The CUDA backend as an [`Executor`]: every op is enqueued on the device's stream and
/// reports row problems into one [`LaunchContext`], checked by [`finish`](Executor::finish).
/// Nothing synchronises the host except `finish`, downloads, statistic reads and timings.
///
/// ```no_run
/// use rlhf_kernels::cuda::{CudaDevice, CudaExecutor};
/// use rlhf_kernels::Executor;
/// let mut e = CudaExecutor::new(&CudaDevice::new(0)?)?;
/// let buf = e.upload(&[1.0f32, 2.0])?;
/// e.finish()?;
/// assert_eq!(e.download(&buf)?, [1.0, 2.0]);
/// # Ok::<(), rlhf_kernels::Error>(())
/// ```
#[derive(Debug)]
pub struct CudaExecutor {
    ctx: LaunchContext,
    /// The moments behind [`Executor::whiten`], allocated on first use.
    moments: Option<DeviceStats<Moments>>,
    label: String,
}

impl CudaExecutor {
    /// An executor on `device`'s stream, with a fresh status word.
    pub fn new(device: &CudaDevice) -> Result<Self> {
        Ok(CudaExecutor { ctx: device.launch_context()?, moments: None, label: device.describe() })
    }

    /// The stream every op is enqueued on (for the caller's own work around them).
    pub fn stream(&self) -> &Arc<CudaStream> {
        self.ctx.stream()
    }
}

impl Executor for CudaExecutor {
    type Memory = Cuda;
    type Buffer<T: Scalar> = CudaSlice<T>;
    type Stats<S: Statistic> = DeviceStats<S>;
    type Groups = DeviceGroups;
    type Mark = CudaEvent;
    type FusedStats = DeviceFusedStats;

    fn describe(&self) -> String {
        self.label.clone()
    }

    fn zeros<T: Scalar>(&self, len: usize) -> Result<CudaSlice<T>> {
        self.ctx.stream().alloc_zeros::<T>(len).map_err(driver_error("allocating a buffer"))
    }

    fn upload<T: Scalar>(&self, host: &[T]) -> Result<CudaSlice<T>> {
        self.ctx.stream().clone_htod(host).map_err(driver_error("uploading a buffer"))
    }

    fn download<T: Scalar>(&self, buf: &CudaSlice<T>) -> Result<Vec<T>> {
        self.ctx.stream().clone_dtoh(buf).map_err(driver_error("downloading a buffer"))
    }

    fn copy<T: Scalar>(&self, from: &CudaSlice<T>, to: &mut CudaSlice<T>) -> Result<()> {
        crate::logprobs::check_len("copy destination", to.len(), from.len())?;
        self.ctx.stream().memcpy_dtod(from, to).map_err(driver_error("copying a buffer"))
    }

    fn view<T: Scalar>(buf: &CudaSlice<T>) -> CudaView<'_, T> {
        buf.as_view()
    }

    fn view_mut<T: Scalar>(buf: &mut CudaSlice<T>) -> CudaViewMut<'_, T> {
        buf.as_view_mut()
    }

    fn stats<S: Statistic>(&self) -> Result<DeviceStats<S>> {
        DeviceStats::new(self.ctx.stream())
    }

    fn fused_stats(&self) -> Result<DeviceFusedStats> {
        DeviceFusedStats::new(self.ctx.stream())
    }

    fn read_fused(&self, stats: &DeviceFusedStats) -> Result<FusedPolicyStats> {
        stats.read(self.ctx.stream())
    }

    fn stats_out<S: Statistic>(stats: &mut DeviceStats<S>) -> &mut DeviceStats<S> {
        stats
    }

    fn read<S: Statistic>(&self, stats: &DeviceStats<S>) -> Result<S> {
        stats.read(self.ctx.stream())
    }

    fn groups(&self, groups: &Groups) -> Result<DeviceGroups> {
        DeviceGroups::new(self.ctx.stream(), groups)
    }

    fn mark(&self) -> Result<CudaEvent> {
        self.ctx
            .stream()
            .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(driver_error("recording an event"))
    }

    fn elapsed_ms(&self, start: &CudaEvent, end: &CudaEvent) -> Result<f64> {
        start.elapsed_ms(end).map(f64::from).map_err(driver_error("timing between events"))
    }

    fn workspace_bytes(&self, op: Workspace) -> usize {
        match op {
            Workspace::TokenLogprobs(shape, dtype) => cuda::token_logprobs_workspace_bytes(shape, dtype),
            Workspace::ExactKl(shape, divergence) => cuda::exact_kl_workspace_bytes(shape, divergence),
            Workspace::SampledKl(shape) => cuda::sampled_kl_workspace_bytes(shape),
            Workspace::Gae(shape) => cuda::gae_workspace_bytes(shape),
            Workspace::PolicyLoss(shape) => cuda::policy_loss_workspace_bytes(shape),
            Workspace::ValueLoss(shape) => cuda::value_loss_workspace_bytes(shape),
        }
    }

    fn finish(&mut self) -> Result<()> {
        self.ctx.check()
    }

    fn log_softmax<T: Element + Scalar>(
        &mut self,
        logits: CudaView<'_, T>,
        shape: RowShape,
        mut out: CudaViewMut<'_, f32>,
        opts: &LogSoftmaxOptions,
    ) -> Result<()> {
        cuda::log_softmax(&mut self.ctx, &logits, shape, &mut out, opts)
    }

    fn log_softmax_backward<T: Element + Scalar>(
        &mut self,
        out: CudaView<'_, f32>,
        grad_out: CudaView<'_, f32>,
        shape: RowShape,
        mut grad_logits: CudaViewMut<'_, T>,
        opts: &LogSoftmaxOptions,
    ) -> Result<()> {
        cuda::log_softmax_backward(&mut self.ctx, &out, &grad_out, shape, &mut grad_logits, opts)
    }

    fn token_logprobs<T: Element + Scalar, I: TargetIndex + Scalar>(
        &mut self,
        logits: CudaView<'_, T>,
        shape: RowShape,
        tokens: &Tokens<'_, I, Cuda>,
        out: TokenOutputs<'_, Cuda>,
        opts: &TokenLogprobsOptions,
    ) -> Result<()> {
        cuda::token_logprobs(&mut self.ctx, &logits, shape, tokens, out, opts)
    }

    fn token_logprobs_backward<T: Element + Scalar, I: TargetIndex + Scalar>(
        &mut self,
        logits: CudaView<'_, T>,
        shape: RowShape,
        tokens: &Tokens<'_, I, Cuda>,
        grads: &TokenGrads<'_, Cuda>,
        mut grad_logits: CudaViewMut<'_, T>,
        opts: &TokenLogprobsOptions,
    ) -> Result<()> {
        cuda::token_logprobs_backward(&mut self.ctx, &logits, shape, tokens, grads, &mut grad_logits, opts)
    }

    fn token_logprobs_backward_in_place<T: Element + Scalar, I: TargetIndex + Scalar>(
        &mut self,
        mut logits: CudaViewMut<'_, T>,
        shape: RowShape,
        tokens: &Tokens<'_, I, Cuda>,
        grads: &TokenGrads<'_, Cuda>,
        opts: &TokenLogprobsOptions,
    ) -> Result<()> {
        cuda::token_logprobs_backward_in_place(&mut self.ctx, &mut logits, shape, tokens, grads, opts)
    }

    fn sampled_kl(
        &mut self,
        inputs: &SampledKlInputs<'_, Cuda>,
        out: SampledKlOutputs<'_, Cuda>,
        opts: &SampledKlOptions,
    ) -> Result<()> {
        cuda::sampled_kl(&mut self.ctx, inputs, out, opts)
    }

    fn exact_kl<P: Element + Scalar, Q: Element + Scalar>(
        &mut self,
        policy: CudaView<'_, P>,
        shape: RowShape,
        reference: &ReferenceRows<'_, Q, Cuda>,
        out: ExactKlOutputs<'_, Cuda>,
        opts: &ExactKlOptions,
    ) -> Result<()> {
        cuda::exact_kl(&mut self.ctx, &policy, shape, reference, out, opts)
    }

    fn exact_kl_backward<P: Element + Scalar, Q: Element + Scalar>(
        &mut self,
        policy: CudaView<'_, P>,
        shape: RowShape,
        reference: &ReferenceRows<'_, Q, Cuda>,
        grads: &ExactKlGrads<'_, Cuda>,
        mut grad_policy: CudaViewMut<'_, P>,
        opts: &ExactKlOptions,
    ) -> Result<()> {
        cuda::exact_kl_backward(&mut self.ctx, &policy, shape, reference, grads, &mut grad_policy, opts)
    }

    fn exact_kl_backward_in_place<P: Element + Scalar, Q: Element + Scalar>(
        &mut self,
        mut policy: CudaViewMut<'_, P>,
        shape: RowShape,
        reference: &ReferenceRows<'_, Q, Cuda>,
        grads: &ExactKlGrads<'_, Cuda>,
        opts: &ExactKlOptions,
    ) -> Result<()> {
        cuda::exact_kl_backward_in_place(&mut self.ctx, &mut policy, shape, reference, grads, opts)
    }

    fn vocab_shard_partials<T: Element + Scalar, I: TargetIndex + Scalar>(
        &mut self,
        logits: CudaView<'_, T>,
        shape: RowShape,
        tokens: &Tokens<'_, I, Cuda>,
        vocab_offset: usize,
        mut partials: CudaViewMut<'_, VocabPartial>,
        opts: &TokenLogprobsOptions,
    ) -> Result<()> {
        cuda::vocab_shard_partials(&mut self.ctx, &logits, shape, tokens, vocab_offset, &mut partials, opts)
    }

    fn finish_vocab_partials<I: TargetIndex + Scalar>(
        &mut self,
        partials: CudaView<'_, VocabPartial>,
        shards: usize,
        tokens: &Tokens<'_, I, Cuda>,
        out: TokenOutputs<'_, Cuda>,
        opts: &TokenLogprobsOptions,
    ) -> Result<()> {
        cuda::finish_vocab_partials(&mut self.ctx, &partials, shards, tokens, out, opts)
    }

    fn exact_kl_shard_partials<P: Element + Scalar, Q: Element + Scalar>(
        &mut self,
        policy: CudaView<'_, P>,
        shape: RowShape,
        reference: &ReferenceRows<'_, Q, Cuda>,
        mut partials: CudaViewMut<'_, ExactKlPartial>,
        opts: &ExactKlOptions,
    ) -> Result<()> {
        cuda::exact_kl_shard_partials(&mut self.ctx, &policy, shape, reference, &mut partials, opts)
    }

    fn finish_exact_kl_partials(
        &mut self,
        partials: CudaView<'_, ExactKlPartial>,
        mask: Option<CudaView<'_, u8>>,
        out: ExactKlOutputs<'_, Cuda>,
        opts: &ExactKlOptions,
    ) -> Result<()> {
        cuda::finish_exact_kl_partials(&mut self.ctx, &partials, mask.as_ref(), out, opts)
    }

    fn jsd_shard_sums<P: Element + Scalar, Q: Element + Scalar>(
        &mut self,
        policy: CudaView<'_, P>,
        shape: RowShape,
        reference: &ReferenceRows<'_, Q, Cuda>,
        policy_lse: CudaView<'_, f32>,
        ref_lse: CudaView<'_, f32>,
        mut sums: CudaViewMut<'_, f32>,
        opts: &ExactKlOptions,
    ) -> Result<()> {
        let ctx = &mut self.ctx;
        cuda::jsd_shard_sums(ctx, &policy, shape, reference, &policy_lse, &ref_lse, &mut sums, opts)
    }

    fn finish_jsd_sums(
        &mut self,
        sums: CudaView<'_, f32>,
        mask: Option<CudaView<'_, u8>>,
        [policy_lse, ref_lse]: [CudaView<'_, f32>; 2],
        out: ExactKlOutputs<'_, Cuda>,
        opts: &ExactKlOptions,
    ) -> Result<()> {
        cuda::finish_jsd_sums(&mut self.ctx, &sums, mask.as_ref(), [&policy_lse, &ref_lse], out, opts)
    }

    fn kl_rewards(
        &mut self,
        inputs: &KlRewardsInputs<'_, Cuda>,
        rewards: CudaViewMut<'_, f32>,
        opts: &KlRewardsOptions,
    ) -> Result<()> {
        cuda::kl_rewards(&mut self.ctx, inputs, rewards, opts)
    }

    fn overlong_shaping(
        &mut self,
        inputs: &OverlongInputs<'_, Cuda>,
        shaped: CudaViewMut<'_, f32>,
        opts: &OverlongOptions,
    ) -> Result<()> {
        cuda::overlong_shaping(&mut self.ctx, inputs, shaped, opts)
    }

    fn gae(
        &mut self,
        inputs: &GaeInputs<'_, Cuda>,
        out: GaeOutputs<'_, Cuda>,
        opts: &GaeOptions,
    ) -> Result<()> {
        cuda::gae(&mut self.ctx, inputs, out, opts)
    }

    fn masked_moments(
        &mut self,
        values: CudaView<'_, f32>,
        shape: RowShape,
        mask: Option<CudaView<'_, u8>>,
        out: &mut DeviceStats<Moments>,
    ) -> Result<()> {
        cuda::masked_moments(&mut self.ctx, &values, shape, mask.as_ref(), out)
    }

    fn whiten(
        &mut self,
        mut values: CudaViewMut<'_, f32>,
        shape: RowShape,
        mask: Option<CudaView<'_, u8>>,
        opts: &WhitenOptions,
    ) -> Result<()> {
        let moments = match &mut self.moments {
            Some(m) => m,
            slot => slot.insert(DeviceStats::new(self.ctx.stream())?),
        };
        cuda::whiten(&mut self.ctx, &mut values, shape, mask.as_ref(), moments, opts)
    }

    fn group_advantages(
        &mut self,
        scores: CudaView<'_, f32>,
        groups: &DeviceGroups,
        out: GroupAdvantageOutputs<'_, Cuda>,
        opts: &GroupAdvantageOptions,
    ) -> Result<()> {
        cuda::group_advantages(&mut self.ctx, &scores, groups, out, opts)
    }

    fn policy_loss(
        &mut self,
        inputs: &PolicyLossInputs<'_, Cuda>,
        out: PolicyLossOutputs<'_, Cuda>,
        opts: &PolicyLossOptions,
    ) -> Result<()> {
        cuda::policy_loss(&mut self.ctx, inputs, out, opts)
    }

    fn value_loss(
        &mut self,
        inputs: &ValueLossInputs<'_, Cuda>,
        out: ValueLossOutputs<'_, Cuda>,
        opts: &ValueLossOptions,
    ) -> Result<()> {
        cuda::value_loss(&mut self.ctx, inputs, out, opts)
    }

    fn policy_loss_from_logits<T: Element + Scalar, I: TargetIndex + Scalar>(
        &mut self,
        logits: CudaView<'_, T>,
        shape: RowShape,
        inputs: &FusedPolicyInputs<'_, I, Cuda>,
        mut grad_logits: CudaViewMut<'_, T>,
        stats: &mut DeviceFusedStats,
        opts: &FusedPolicyOptions,
    ) -> Result<()> {
        cuda::policy_loss_from_logits(&mut self.ctx, &logits, shape, inputs, &mut grad_logits, stats, opts)
    }

    fn policy_loss_from_logits_in_place<T: Element + Scalar, I: TargetIndex + Scalar>(
        &mut self,
        mut logits: CudaViewMut<'_, T>,
        shape: RowShape,
        inputs: &FusedPolicyInputs<'_, I, Cuda>,
        stats: &mut DeviceFusedStats,
        opts: &FusedPolicyOptions,
    ) -> Result<()> {
        cuda::policy_loss_from_logits_in_place(&mut self.ctx, &mut logits, shape, inputs, stats, opts)
    }

    fn aggregate(
        &mut self,
        values: CudaView<'_, f32>,
        shape: RowShape,
        mask: Option<CudaView<'_, u8>>,
        aggregation: Aggregation,
        norm: Normaliser,
        out: &mut DeviceStats<Aggregated>,
    ) -> Result<()> {
        cuda::aggregate(&mut self.ctx, &values, shape, mask.as_ref(), aggregation, norm, out)
    }
}
