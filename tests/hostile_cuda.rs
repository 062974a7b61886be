//! The hostile-input property tests and named cases of `tests/common/hostile.rs` on the CUDA
//! backend: random finite inputs across the whole f32 range into every CUDA entry point, each
//! returning a typed error (decoded from the status word) or finite outputs. Skips visibly
//! without a GPU; `RLHF_KERNELS_REQUIRE_GPU=1` makes that a failure.

#[macro_use]
mod common;

use rlhf_kernels::cuda_or_skip;

#[cfg(feature = "cuda")]
mod gpu {
    use super::common::gpu::Gpu;
    use super::common::{hostile, small};

    /// Fewer cases on the emulated device (each case is some fifty launches).
    fn cases() -> u32 {
        if small() { 150 } else { 400 }
    }

    pub fn logprobs_family(gpu: &Gpu) {
        hostile::logprobs_family(gpu, cases());
    }

    pub fn kl_family(gpu: &Gpu) {
        hostile::kl_family(gpu, cases());
    }

    pub fn advantages_family(gpu: &Gpu) {
        hostile::advantages_family(gpu, cases());
    }

    pub fn ppo_family(gpu: &Gpu) {
        hostile::ppo_family(gpu, cases());
    }

    pub fn named_cases(gpu: &Gpu) {
        hostile::named_cases(gpu);
    }
}

gpu_test!(logprobs_family);
gpu_test!(kl_family);
gpu_test!(advantages_family);
gpu_test!(ppo_family);
gpu_test!(named_cases);
