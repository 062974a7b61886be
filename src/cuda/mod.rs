//! The CUDA backend: kernels from `kernels/*.cu`, compiled by `build.rs` into fatbins that
//! are embedded in the binary and loaded once per CUDA context.
//!
//! Two layers per op:
//! - **safe** (this module): cudarc buffers ([`CudaSlice`](cudarc::driver::CudaSlice),
//!   [`CudaView`], [`CudaViewMut`]) and an `Arc<CudaStream>`. candle 0.11 uses the same cudarc 0.19, so its `CudaStorage`
//!   slices and `CudaDevice::cuda_stream()` pass straight in.
//! - **raw** ([`raw`]): `unsafe` functions taking device pointers, a device ordinal and a
//!   `CUstream`, for tch-rs, burn/cubecl and Python callers that own their memory.
//!
//! Every op is asynchronous: it enqueues kernels on the caller's stream and returns. Nothing
//! synchronises behind the caller's back. Input problems that only the kernel can see (a NaN
//! row, a row of only `-inf`) are recorded in the status word of the [`LaunchContext`] every op
//! takes first, which the caller checks when it chooses (once per training step is enough);
//! the outputs of such a row are NaN.

mod advantages;
mod aggregation;
mod context;
mod executor;
mod kl;
mod logprobs;
mod module;
mod ppo;
mod stats;
mod status;

use cudarc::driver::{CudaStream, CudaView, CudaViewMut, DevicePtr, DevicePtrMut, DriverError, SyncOnDrop};

pub use advantages::{
    DeviceGroups, gae, gae_workspace_bytes, group_advantages, masked_moments, moments_workspace_bytes,
    overlong_shaping, whiten,
};
pub use aggregation::{aggregate, aggregate_workspace_bytes};
pub(crate) use context::RawStream;
pub use context::{CudaDevice, LaunchContext};
pub use executor::CudaExecutor;
pub use kl::{
    exact_kl, exact_kl_backward, exact_kl_backward_in_place, exact_kl_shard_partials,
    exact_kl_workspace_bytes, finish_exact_kl_partials, finish_jsd_sums, jsd_shard_sums, kl_rewards,
    sampled_kl, sampled_kl_workspace_bytes,
};
pub use logprobs::{
    finish_vocab_partials, log_softmax, log_softmax_backward, token_logprobs, token_logprobs_backward,
    token_logprobs_backward_in_place, token_logprobs_workspace_bytes, vocab_shard_partials,
};
pub use module::kernels_built;
pub use ppo::{
    DeviceFusedStats, fused_workspace_bytes, policy_loss, policy_loss_from_logits,
    policy_loss_from_logits_in_place, policy_loss_workspace_bytes, value_loss, value_loss_workspace_bytes,
};
pub use stats::DeviceStats;
pub(crate) use status::CudaStatus;

/// The raw layer: device pointers, an ordinal and a `CUstream` (see each function's
/// contract). The safe functions of [`cuda`](crate::cuda) are built on the same launches.
pub mod raw {
    pub use super::advantages::raw::*;
    pub use super::aggregation::ReductionArgs;
    pub use super::aggregation::raw::*;
    pub use super::context::RawStream;
    pub use super::kl::raw::*;
    pub use super::logprobs::raw::*;
    pub use super::ppo::raw::*;
    pub use super::ppo::{
        POLICY_STATS_WORDS, PolicyLossArgs, policy_stats_from_words, policy_stats_to_words,
    };
    pub use super::status::{STATUS_CLEAR, decode_status};
}

/// Turns a driver error into [`Error::Driver`](crate::Error::Driver), naming what failed.
pub(crate) fn driver_error(during: &'static str) -> impl Fn(DriverError) -> crate::Error {
    move |e| crate::Error::Driver { during, message: format!("{e:?}") }
}

/// Rejects null device pointers of the raw layer before anything is launched.
pub(crate) fn non_null(ptrs: &[(&'static str, u64)]) -> crate::Result<()> {
    match ptrs.iter().find(|(_, p)| *p == 0) {
        Some((what, _)) => Err(crate::Error::InvalidOption {
            name: what,
            value: "null".into(),
            expected: "a device pointer",
        }),
        None => Ok(()),
    }
}

/// The device pointer of an optional view (0 when absent) and its event guard.
pub(crate) fn opt_ptr<'a, T>(
    v: &'a Option<CudaView<'_, T>>,
    s: &'a CudaStream,
) -> (u64, Option<SyncOnDrop<'a>>) {
    view_ptr(v.as_ref(), s)
}

/// [`opt_ptr`] for a borrowed optional view.
pub(crate) fn view_ptr<'a, T>(
    v: Option<&'a CudaView<'_, T>>,
    s: &'a CudaStream,
) -> (u64, Option<SyncOnDrop<'a>>) {
    match v {
        Some(v) => {
            let (p, g) = v.device_ptr(s);
            (p, Some(g))
        }
        None => (0, None),
    }
}

/// [`opt_ptr`] for an optional output.
pub(crate) fn opt_ptr_mut<'a, T>(
    v: &'a mut Option<CudaViewMut<'_, T>>,
    s: &'a CudaStream,
) -> (u64, Option<SyncOnDrop<'a>>) {
    match v {
        Some(v) => {
            let (p, g) = v.device_ptr_mut(s);
            (p, Some(g))
        }
        None => (0, None),
    }
}
