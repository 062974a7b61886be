//! The CUDA advantages family held to the f64 reference with the same cases as the CPU: the
//! GAE scan within its documented bound (warp path, block path, chunked 128k sequences), the
//! group estimators, moments and whitening, errors through the status word. Skips visibly
//! without a GPU; `RLHF_KERNELS_REQUIRE_GPU=1` makes that a failure.

#[macro_use]
mod common;

use rlhf_kernels::cuda_or_skip;

#[cfg(feature = "cuda")]
mod gpu {
    use super::common::gpu::Gpu;

    use super::common::advantages::{self as adv, AdvantagesBackend, GaeCase};
    use rlhf_kernels::cuda::{self, LaunchContext};
    use rlhf_kernels::{GaeInputs, GaeOutputs, GroupAdvantageOutputs};

    use rlhf_kernels::{GaeOptions, RowShape};

    pub fn gae(gpu: &Gpu) {
        adv::gae_sweep(gpu);
        adv::gae_by_hand(gpu);
    }

    pub fn gae_long(gpu: &Gpu) {
        adv::gae_long(gpu);
    }

    pub fn gae_errors(gpu: &Gpu) {
        adv::gae_errors(gpu);
    }

    pub fn gae_batch_invariance(gpu: &Gpu) {
        adv::gae_batch_invariance(gpu);
    }

    pub fn groups(gpu: &Gpu) {
        adv::groups_by_hand(gpu);
        adv::groups_random(gpu);
        adv::group_errors(gpu);
    }

    pub fn overlong(gpu: &Gpu) {
        adv::overlong(gpu);
    }

    pub fn moments(gpu: &Gpu) {
        adv::moments_and_whitening(gpu);
    }

    /// The raw layer from plain cudarc allocations (one buffer, inputs at offsets) equals the
    /// safe function bit for bit, on the warp and the chunked paths.
    pub fn gae_raw_layer(gpu: &Gpu) {
        use rlhf_kernels::cuda::raw::{self, GaeArgs, RawStream};
        use rlhf_kernels::cudarc::driver::{DevicePtr, DevicePtrMut};
        let s = &gpu.0;
        for cols in [100, 3000] {
            let c = GaeCase::random(RowShape::new(5, cols), adv::MaskKind::Holes, 61);
            let opts = GaeOptions::new(0.99, 0.95);
            let (want_a, want_r) = gpu.gae(&c, &opts).unwrap();
            let n = c.shape.len();
            let mut packed = vec![0.0f32];
            for v in [&c.rewards, &c.kl, &c.values] {
                packed.extend_from_slice(v.as_ref().unwrap());
            }
            packed.extend_from_slice(c.scores.as_ref().unwrap());
            let inputs = s.clone_htod(&packed).unwrap();
            let mask = s.clone_htod(c.mask.as_ref().unwrap()).unwrap();
            let mut outs = s.alloc_zeros::<f32>(2 * n).unwrap();
            let mut st = s.clone_htod(&[raw::STATUS_CLEAR]).unwrap();
            let stream = RawStream { ordinal: s.context().ordinal(), stream: s.cu_stream() };
            {
                let (ip, _a) = inputs.device_ptr(s);
                let (mp, _b) = mask.device_ptr(s);
                let (op, _c) = outs.device_ptr_mut(s);
                let (sp, _d) = st.device_ptr_mut(s);
                let at = |k: u64| ip + 4 + k * 4 * n as u64;
                let args = GaeArgs {
                    shape: c.shape,
                    rewards: at(0),
                    kl: at(1),
                    beta: c.beta,
                    scores: at(3),
                    values: at(2),
                    mask: mp,
                    advantages: op,
                    returns: op + 4 * n as u64,
                    workspace: 0,
                    status: sp,
                };
                // SAFETY: the buffers were allocated above on this context, cover the offsets
                // plus the shape, and live until the synchronising copies below.
                unsafe { raw::gae(stream, &args, &opts) }.unwrap();
                let none = GaeArgs { rewards: 0, kl: 0, scores: 0, ..args };
                // SAFETY: refused before any launch.
                assert!(unsafe { raw::gae(stream, &none, &opts) }.is_err());
            }
            assert_eq!(raw::decode_status(s.clone_dtoh(&st).unwrap()[0]), Ok(()));
            let got = s.clone_dtoh(&outs).unwrap();
            let same = |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
            assert!(
                same(&got[..n], &want_a) && same(&got[n..], &want_r),
                "T = {cols}: raw differs from safe"
            );
        }
    }

    /// The raw group estimators (scores and outputs at offsets of plain allocations) equal
    /// the CPU backend, per sequence and per token.
    pub fn groups_raw_layer(gpu: &Gpu) {
        use rlhf_kernels::cuda::raw::{self, GroupAdvantageArgs, RawStream};
        use rlhf_kernels::cudarc::driver::{DevicePtr, DevicePtrMut};
        use rlhf_kernels::{GroupAdvantageOptions, Groups, cpu};
        let s = &gpu.0;
        let ids = [2u32, 0, 1, 0, 2, 1, 1, 0];
        let groups = Groups::new(&ids, 3).unwrap();
        let scores = [0.5f32, -1.0, 2.0, 0.25, 3.0, -0.5, 1.5, 0.0];
        let (b, t) = (ids.len(), 5);
        let shape = RowShape::new(b, t);
        let mask: Vec<u8> = (0..b * t).map(|i| u8::from(i % 4 != 1)).collect();
        for opts in [GroupAdvantageOptions::grpo(), GroupAdvantageOptions::rloo()] {
            let (mut want_seq, mut want_tok) = (vec![0f32; b], vec![0f32; b * t]);
            let out = GroupAdvantageOutputs::default().per_sequence(&mut want_seq).per_token(
                &mut want_tok,
                shape,
                Some(&mask),
            );
            cpu::group_advantages(&scores, &groups, out, &opts).unwrap();
            let mut packed = vec![9.0f32; 3];
            packed.extend_from_slice(&scores);
            let inputs = s.clone_htod(&packed).unwrap();
            let mask_dev = s.clone_htod(&mask).unwrap();
            let mut outs = s.alloc_zeros::<f32>(b + b * t).unwrap();
            let mut st = s.clone_htod(&[raw::STATUS_CLEAR]).unwrap();
            let stream = RawStream { ordinal: s.context().ordinal(), stream: s.cu_stream() };
            {
                let (ip, _a) = inputs.device_ptr(s);
                let (mp, _b) = mask_dev.device_ptr(s);
                let (op, _c) = outs.device_ptr_mut(s);
                let (sp, _d) = st.device_ptr_mut(s);
                let args = GroupAdvantageArgs {
                    scores: ip + 12,
                    per_sequence: op,
                    per_token: op + 4 * b as u64,
                    token_shape: shape,
                    mask: mp,
                    status: sp,
                };
                // SAFETY: the buffers were allocated above on this context, cover the offsets
                // plus the shapes, and live until the synchronising copies below.
                unsafe { raw::group_advantages(stream, &groups, &args, &opts) }.unwrap();
                let none = GroupAdvantageArgs { per_sequence: 0, per_token: 0, ..args };
                // SAFETY: refused before any launch.
                assert!(unsafe { raw::group_advantages(stream, &groups, &none, &opts) }.is_err());
            }
            assert_eq!(raw::decode_status(s.clone_dtoh(&st).unwrap()[0]), Ok(()));
            let got = s.clone_dtoh(&outs).unwrap();
            let close =
                |a: &[f32], e: &[f32]| a.iter().zip(e).all(|(x, y)| (x - y).abs() <= 1e-6 * (1.0 + y.abs()));
            assert!(
                close(&got[..b], &want_seq) && close(&got[b..], &want_tok),
                "{opts:?}: raw differs from the CPU"
            );
        }
    }

    /// A lent workspace gives the same bits as an internal one. Sequences of up to 4096
    /// positions are scanned in one pass and need none.
    pub fn gae_workspace(gpu: &Gpu) {
        let s = &gpu.0;
        assert_eq!(cuda::gae_workspace_bytes(RowShape::new(3, 4096)), 0);
        let c = GaeCase::random(RowShape::new(3, 5000), adv::MaskKind::Holes, 19);
        let opts = GaeOptions::new(1.0, 0.95);
        let (expected, _) = gpu.gae(&c, &opts).unwrap();
        let up = |v: &Option<Vec<f32>>| s.clone_htod(v.as_ref().unwrap()).unwrap();
        let (rewards, kl, values) = (up(&c.rewards), up(&c.kl), up(&c.values));
        let scores = up(&c.scores);
        let mask = s.clone_htod(c.mask.as_ref().unwrap()).unwrap();
        let mut a = s.alloc_zeros::<f32>(c.shape.len()).unwrap();
        let mut ws = s.alloc_zeros::<u8>(cuda::gae_workspace_bytes(c.shape)).unwrap();
        let mut ctx = LaunchContext::new(s).unwrap();
        let inputs = GaeInputs::new(c.shape)
            .rewards(rewards.as_view())
            .kl_penalty(kl.as_view(), c.beta)
            .scores(scores.as_view())
            .values(values.as_view())
            .mask(mask.as_view());
        let out = GaeOutputs::default().advantages(a.as_view_mut()).workspace(ws.as_view_mut());
        cuda::gae(&mut ctx, &inputs, out, &opts).unwrap();
        ctx.check().unwrap();
        let got = s.clone_dtoh(&a).unwrap();
        assert!(got.iter().zip(&expected).all(|(x, y)| x.to_bits() == y.to_bits()));
        let mut small = s.alloc_zeros::<u8>(16).unwrap();
        let out = GaeOutputs::default().advantages(a.as_view_mut()).workspace(small.as_view_mut());
        assert!(cuda::gae(&mut ctx, &inputs, out, &opts).is_err());
    }
}

gpu_test!(gae);
gpu_test!(gae_long);
gpu_test!(gae_errors);
gpu_test!(gae_batch_invariance);
gpu_test!(gae_workspace);
gpu_test!(gae_raw_layer);
gpu_test!(groups);
gpu_test!(groups_raw_layer);
gpu_test!(moments);
gpu_test!(overlong);
