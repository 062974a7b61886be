//! The CUDA PPO family held to the f64 reference with the same cases as the CPU (every
//! objective × aggregation × normaliser, branches against finite differences, micro-batches,
//! value loss, errors through the status word). Skips visibly without a GPU;
//! `RLHF_KERNELS_REQUIRE_GPU=1` makes that a failure.

#[macro_use]
mod common;

use rlhf_kernels::cuda_or_skip;

#[cfg(feature = "cuda")]
mod gpu {
    use super::common::gpu::Gpu;

    use super::common::ppo::{self, PolicyCase, PpoBackend, ValueCase};
    use rlhf_kernels::cuda::{self, LaunchContext};
    use rlhf_kernels::{PolicyLossInputs, ValueLossInputs};
    use rlhf_kernels::{PolicyLossOutputs, ValueLossOutputs};

    use rlhf_kernels::{PolicyLossOptions, RowShape, ValueLossOptions, bf16};

    /// The single-kernel paths (no statistics, global denominators or no gradient) still
    /// report bad input and still write the per-token loss.
    pub fn without_statistics(gpu: &Gpu) {
        let s = &gpu.0;
        let mut c = PolicyCase::random(RowShape::new(4, 9), 41);
        c.mask = None;
        c.entropy = None;
        for x in c.logp.iter_mut().chain(c.old_logp.iter_mut()).chain(c.advantages.iter_mut()) {
            *x = if x.is_finite() { *x } else { -1.0 };
        }
        c.advantages[2 * 9 + 4] = f32::NAN;
        let (lp, old, adv) = (gpu.up(&c.logp).0, gpu.up(&c.old_logp).0, gpu.up(&c.advantages).0);
        let mut g = s.alloc_zeros::<f32>(36).unwrap();
        let mut ctx = LaunchContext::new(s).unwrap();
        let inputs = PolicyLossInputs {
            shape: c.shape,
            logp: lp.as_view(),
            old_logp: old.as_view(),
            advantages: adv.as_view(),
            mask: None,
            entropy: None,
        };
        let global =
            rlhf_kernels::Normaliser::Global { valid_tokens: 36.0, valid_sequences: 4.0, sequences: 4.0 };
        let out = PolicyLossOutputs { grad_logp: Some(g.as_view_mut()), ..Default::default() };
        cuda::policy_loss(&mut ctx, &inputs, out, &PolicyLossOptions::default().normaliser(global)).unwrap();
        let err = ctx.check().unwrap_err();
        assert_eq!(
            err,
            rlhf_kernels::Error::InvalidRow {
                op: "policy_loss",
                row: 2,
                problem: rlhf_kernels::RowProblem::NonFinite
            }
        );
        let v = ValueCase::random(RowShape::new(5, 17), 42);
        let opts = ValueLossOptions::default().clip(Some(0.2));
        let want = rlhf_kernels::reference::value_loss(&v.inputs(), &opts).unwrap();
        let (values, old_v, ret) = (gpu.up(&v.values).0, gpu.up(&v.old_values).0, gpu.up(&v.returns).0);
        let mask = gpu.up(v.mask.as_ref().unwrap()).0;
        let mut loss = s.alloc_zeros::<f32>(v.shape.len()).unwrap();
        let inputs = ValueLossInputs {
            shape: v.shape,
            values: values.as_view(),
            old_values: old_v.as_view(),
            returns: ret.as_view(),
            mask: Some(mask.as_view()),
        };
        let out = ValueLossOutputs { loss: Some(loss.as_view_mut()), ..Default::default() };
        cuda::value_loss(&mut ctx, &inputs, out, &opts).unwrap();
        ctx.check().unwrap();
        let tol = rlhf_kernels::testing::Tolerance::for_dtype(rlhf_kernels::DType::F32).scaled(10.0);
        rlhf_kernels::testing::assert_close(
            &gpu.dense(&loss, v.shape),
            &want.loss,
            tol,
            "value loss without statistics",
        );
    }

    /// The raw layer from plain cudarc allocations (inputs at a 1-element offset) equals the
    /// safe function bit for bit, statistics included; a null input is refused.
    pub fn raw_layer(gpu: &Gpu) {
        use rlhf_kernels::cuda::raw::{self, POLICY_STATS_WORDS, PolicyLossArgs, RawStream};
        use rlhf_kernels::cudarc::driver::{DevicePtr, DevicePtrMut};
        let s = &gpu.0;
        let c = PolicyCase::random(RowShape::new(6, 70).with_row_stride(73), 51);
        let opts = PolicyLossOptions::default().entropy_coef(0.01).dual_clip(Some(3.0));
        let safe = gpu.policy(&c, &opts).unwrap();
        let n = c.shape.min_len();
        let mut packed = vec![0.0f32];
        for v in [&c.logp, &c.old_logp, &c.advantages, c.entropy.as_ref().unwrap()] {
            packed.extend_from_slice(v);
        }
        let inputs = s.clone_htod(&packed).unwrap();
        let mask = s.clone_htod(c.mask.as_ref().unwrap()).unwrap();
        let mut grads = s.alloc_zeros::<f32>(2 * n).unwrap();
        let mut stats = s.alloc_zeros::<f64>(POLICY_STATS_WORDS).unwrap();
        let mut st = s.clone_htod(&[raw::STATUS_CLEAR]).unwrap();
        let stream = RawStream { ordinal: s.context().ordinal(), stream: s.cu_stream() };
        {
            let (ip, _a) = inputs.device_ptr(s);
            let (mp, _b) = mask.device_ptr(s);
            let (gp, _c) = grads.device_ptr_mut(s);
            let (sp, _d) = stats.device_ptr_mut(s);
            let (stp, _e) = st.device_ptr_mut(s);
            let at = |k: u64| ip + 4 + k * 4 * n as u64;
            let args = PolicyLossArgs {
                shape: c.shape,
                logp: at(0),
                old_logp: at(1),
                advantages: at(2),
                mask: mp,
                entropy: at(3),
                loss: 0,
                grad_logp: gp,
                grad_entropy: gp + 4 * n as u64,
                accumulate: false,
                stats: sp,
                workspace: 0,
                status: stp,
            };
            // SAFETY: the buffers were allocated above on this context, cover the offsets plus
            // the shape, and live until the synchronising copies below.
            unsafe { raw::policy_loss(stream, &args, &opts) }.unwrap();
            let null = PolicyLossArgs { logp: 0, ..args };
            // SAFETY: refused before any launch.
            assert!(unsafe { raw::policy_loss(stream, &null, &opts) }.is_err());
        }
        assert_eq!(raw::decode_status(s.clone_dtoh(&st).unwrap()[0]), Ok(()));
        let g = s.clone_dtoh(&grads).unwrap();
        let dense = |v: &[f32]| -> Vec<f32> {
            (0..c.shape.rows).flat_map(|r| v[c.shape.row_range(r)].to_vec()).collect()
        };
        let same = |a: &[f32], b: &[f32]| {
            a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
        };
        assert!(same(&dense(&g[..n]), &safe.grad_logp), "raw grad_logp differs from the safe path");
        assert!(same(&dense(&g[n..]), &safe.grad_entropy), "raw grad_entropy differs from the safe path");
        let stats = raw::policy_stats_from_words(&s.clone_dtoh(&stats).unwrap()).unwrap();
        assert_eq!(stats, safe.stats);
    }

    pub fn fused(gpu: &Gpu) {
        ppo::fused_path::<f32>(gpu);
        ppo::fused_path::<bf16>(gpu);
    }

    pub fn policy(gpu: &Gpu) {
        ppo::policy_sweep(gpu);
        ppo::policy_branches(gpu);
        ppo::micro_batches(gpu);
    }

    pub fn policy_errors(gpu: &Gpu) {
        ppo::policy_errors(gpu);
        ppo::accumulate(gpu);
    }

    pub fn value(gpu: &Gpu) {
        ppo::value_cases(gpu);
    }

    /// Gradients only, global denominators: the single-kernel path equals the three-kernel one.
    pub fn single_kernel_path(gpu: &Gpu) {
        let s = &gpu.0;
        let c = PolicyCase::random(RowShape::new(12, 257), 21);
        let counts = rlhf_kernels::BatchCounts::of(c.shape, c.mask.as_deref());
        let global = rlhf_kernels::Normaliser::Global {
            valid_tokens: counts.valid_tokens,
            valid_sequences: counts.valid_sequences,
            sequences: counts.sequences,
        };
        let opts = PolicyLossOptions::default().entropy_coef(0.01);
        let local = gpu.policy(&c, &opts).unwrap();
        let (lp, old, adv) = (gpu.up(&c.logp).0, gpu.up(&c.old_logp).0, gpu.up(&c.advantages).0);
        let (mask, entropy) = (gpu.up(c.mask.as_ref().unwrap()).0, gpu.up(c.entropy.as_ref().unwrap()).0);
        let mut g = s.alloc_zeros::<f32>(c.shape.len()).unwrap();
        let mut ctx = LaunchContext::new(s).unwrap();
        let inputs = PolicyLossInputs {
            shape: c.shape,
            logp: lp.as_view(),
            old_logp: old.as_view(),
            advantages: adv.as_view(),
            mask: Some(mask.as_view()),
            entropy: Some(entropy.as_view()),
        };
        let out = PolicyLossOutputs { grad_logp: Some(g.as_view_mut()), ..Default::default() };
        cuda::policy_loss(&mut ctx, &inputs, out, &opts.normaliser(global)).unwrap();
        ctx.check().unwrap();
        let got = s.clone_dtoh(&g).unwrap();
        let same = got.len() == local.grad_logp.len()
            && got.iter().zip(&local.grad_logp).all(|(a, b)| (a - b).abs() <= 1e-7 * b.abs().max(1e-3));
        assert!(same, "global-count gradients differ from the local path's");
    }
}

gpu_test!(policy);
gpu_test!(policy_errors);
gpu_test!(value);
gpu_test!(single_kernel_path);
gpu_test!(fused);
gpu_test!(without_statistics);
gpu_test!(raw_layer);
