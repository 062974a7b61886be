//! The CUDA PPO family held to the f64 reference with the same cases as the CPU (every
//! objective × aggregation × normaliser, branches against finite differences, micro-batches,
//! value loss, errors through the status word). Skips visibly without a GPU;
//! `RLHF_KERNELS_REQUIRE_GPU=1` makes that a failure.

mod common;

use rlhf_kernels::cuda_or_skip;

#[cfg(feature = "cuda")]
mod gpu {
    use std::sync::Arc;

    use super::common::ppo::{self, FusedBackend, FusedCase, PolicyCase, PolicyOut, PpoBackend, ValueCase};
    use rlhf_kernels::cuda::{
        self, CudaStatus, DevicePolicyLossInputs, DevicePolicyLossOutputs, DevicePolicyStats,
        DeviceValueLossInputs, DeviceValueLossOutputs, DeviceValueStats,
    };
    use rlhf_kernels::cuda::{DeviceFusedPolicyInputs, DeviceFusedStats, DeviceTokens};
    use rlhf_kernels::cudarc::driver::{CudaSlice, CudaStream, DeviceRepr, ValidAsZeroBits};
    use rlhf_kernels::{
        Element, FusedPolicyStats, PolicyLossOptions, Result, RowShape, TokenLogprobsOptions,
        ValueLossOptions, ValueLossStats, bf16,
    };

    pub struct Gpu(pub Arc<CudaStream>);

    impl Gpu {
        /// Uploads `v` (at least one element, so empty inputs reach the op's own checks).
        fn up<T: DeviceRepr + ValidAsZeroBits + Copy>(&self, v: &[T]) -> (CudaSlice<T>, usize) {
            let s = &self.0;
            let buf = if v.is_empty() { s.alloc_zeros::<T>(1).unwrap() } else { s.clone_htod(v).unwrap() };
            (buf, v.len())
        }

        fn dense(&self, b: &CudaSlice<f32>, shape: RowShape) -> Vec<f32> {
            let v = self.0.clone_dtoh(b).unwrap();
            (0..shape.rows).flat_map(|r| v[shape.row_range(r)].iter().copied()).collect()
        }
    }

    impl PpoBackend for Gpu {
        fn policy(&self, c: &PolicyCase, opts: &PolicyLossOptions) -> Result<PolicyOut> {
            let s = &self.0;
            let (lp, n) = self.up(&c.logp);
            let (old, n_old) = self.up(&c.old_logp);
            let (adv, n_adv) = self.up(&c.advantages);
            let mask = c.mask.as_ref().map(|m| self.up(m));
            let entropy = c.entropy.as_ref().map(|h| self.up(h));
            let len = c.shape.min_len();
            let nan = vec![f32::NAN; len.max(1)];
            let (mut l, mut g, mut h) = (self.up(&nan).0, self.up(&nan).0, self.up(&nan).0);
            let (mut stats, mut status) = (DevicePolicyStats::new(s)?, CudaStatus::new(s)?);
            let inputs = DevicePolicyLossInputs {
                shape: c.shape,
                logp: lp.slice(0..n),
                old_logp: old.slice(0..n_old),
                advantages: adv.slice(0..n_adv),
                mask: mask.as_ref().map(|(m, n)| m.slice(0..*n)),
                entropy: entropy.as_ref().map(|(e, n)| e.slice(0..*n)),
            };
            let out = DevicePolicyLossOutputs {
                loss: Some(l.slice_mut(0..len)),
                grad_logp: Some(g.slice_mut(0..len)),
                grad_entropy: Some(h.slice_mut(0..len)),
                stats: Some(&mut stats),
                workspace: None,
                accumulate: false,
            };
            cuda::policy_loss(s, &inputs, out, &mut status, opts)?;
            status.check(s)?;
            Ok(PolicyOut {
                loss: self.dense(&l, c.shape),
                grad_logp: self.dense(&g, c.shape),
                grad_entropy: self.dense(&h, c.shape),
                stats: stats.read(s)?,
            })
        }

        fn policy_onto(
            &self,
            c: &PolicyCase,
            opts: &PolicyLossOptions,
            start: &[f32],
        ) -> Result<(Vec<f32>, Vec<f32>)> {
            let s = &self.0;
            let (lp, old, adv) = (self.up(&c.logp).0, self.up(&c.old_logp).0, self.up(&c.advantages).0);
            let mask = c.mask.as_ref().map(|m| self.up(m).0);
            let entropy = c.entropy.as_ref().map(|h| self.up(h).0);
            let (mut g, mut h) = (self.up(start).0, self.up(start).0);
            let mut status = CudaStatus::new(s)?;
            let inputs = DevicePolicyLossInputs {
                shape: c.shape,
                logp: lp.as_view(),
                old_logp: old.as_view(),
                advantages: adv.as_view(),
                mask: mask.as_ref().map(|m| m.as_view()),
                entropy: entropy.as_ref().map(|e| e.as_view()),
            };
            let out = DevicePolicyLossOutputs {
                grad_logp: Some(g.as_view_mut()),
                grad_entropy: Some(h.as_view_mut()),
                accumulate: true,
                ..Default::default()
            };
            cuda::policy_loss(s, &inputs, out, &mut status, opts)?;
            status.check(s)?;
            Ok((self.dense(&g, c.shape), self.dense(&h, c.shape)))
        }

        fn value(
            &self,
            c: &ValueCase,
            opts: &ValueLossOptions,
        ) -> Result<(Vec<f32>, Vec<f32>, ValueLossStats)> {
            let s = &self.0;
            let (v, n) = self.up(&c.values);
            let (old, n_old) = self.up(&c.old_values);
            let (ret, n_ret) = self.up(&c.returns);
            let mask = c.mask.as_ref().map(|m| self.up(m));
            let len = c.shape.min_len();
            let nan = vec![f32::NAN; len.max(1)];
            let (mut l, mut g) = (self.up(&nan).0, self.up(&nan).0);
            let (mut stats, mut status) = (DeviceValueStats::new(s)?, CudaStatus::new(s)?);
            let inputs = DeviceValueLossInputs {
                shape: c.shape,
                values: v.slice(0..n),
                old_values: old.slice(0..n_old),
                returns: ret.slice(0..n_ret),
                mask: mask.as_ref().map(|(m, n)| m.slice(0..*n)),
            };
            let out = DeviceValueLossOutputs {
                loss: Some(l.slice_mut(0..len)),
                grad_values: Some(g.slice_mut(0..len)),
                stats: Some(&mut stats),
                workspace: None,
            };
            cuda::value_loss(s, &inputs, out, &mut status, opts)?;
            status.check(s)?;
            Ok((self.dense(&l, c.shape), self.dense(&g, c.shape), stats.read(s)?))
        }
    }

    impl FusedBackend for Gpu {
        fn fused<T: Element>(
            &self,
            c: &FusedCase<T>,
            opts: &PolicyLossOptions,
            in_place: bool,
        ) -> Result<(Vec<T>, FusedPolicyStats)> {
            let s = &self.0;
            let mut logits = s.clone_htod(&c.logits).unwrap();
            let (targets, mask) = (s.clone_htod(&c.targets).unwrap(), s.clone_htod(&c.mask).unwrap());
            let (old, adv) = (s.clone_htod(&c.old_logp).unwrap(), s.clone_htod(&c.advantages).unwrap());
            let ref_logp = c.ref_logp.as_ref().map(|r| s.clone_htod(r).unwrap());
            let inputs = DeviceFusedPolicyInputs {
                tokens: DeviceTokens::new(targets.as_view()).with_mask(mask.as_view()),
                sequences: c.sequences,
                old_logp: old.as_view(),
                advantages: adv.as_view(),
                kl: ref_logp.as_ref().map(|r| (r.as_view(), ppo::fused_kl())),
            };
            let (mut stats, mut status) = (DeviceFusedStats::new(s)?, CudaStatus::new(s)?);
            let lp = TokenLogprobsOptions::default();
            let grad = if in_place {
                cuda::policy_loss_from_logits_in_place(
                    s,
                    &mut logits,
                    c.shape,
                    &inputs,
                    &mut stats,
                    &mut status,
                    &lp,
                    opts,
                )?;
                logits
            } else {
                let mut grad = s.clone_htod(&vec![T::from_f32(f32::NAN); c.logits.len()]).unwrap();
                cuda::policy_loss_from_logits(
                    s,
                    &logits,
                    c.shape,
                    &inputs,
                    &mut grad,
                    &mut stats,
                    &mut status,
                    &lp,
                    opts,
                )?;
                grad
            };
            status.check(s)?;
            Ok((s.clone_dtoh(&grad).unwrap(), stats.read(s)?))
        }
    }

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
        let mut status = CudaStatus::new(s).unwrap();
        let inputs = DevicePolicyLossInputs {
            shape: c.shape,
            logp: lp.as_view(),
            old_logp: old.as_view(),
            advantages: adv.as_view(),
            mask: None,
            entropy: None,
        };
        let global =
            rlhf_kernels::Normaliser::Global { valid_tokens: 36.0, valid_sequences: 4.0, sequences: 4.0 };
        let out = DevicePolicyLossOutputs { grad_logp: Some(g.as_view_mut()), ..Default::default() };
        cuda::policy_loss(s, &inputs, out, &mut status, &PolicyLossOptions::default().normaliser(global))
            .unwrap();
        let err = status.check(s).unwrap_err();
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
        let inputs = DeviceValueLossInputs {
            shape: v.shape,
            values: values.as_view(),
            old_values: old_v.as_view(),
            returns: ret.as_view(),
            mask: Some(mask.as_view()),
        };
        let out = DeviceValueLossOutputs { loss: Some(loss.as_view_mut()), ..Default::default() };
        cuda::value_loss(s, &inputs, out, &mut status, &opts).unwrap();
        status.check(s).unwrap();
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
        let same = |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
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
        let mut status = CudaStatus::new(s).unwrap();
        let inputs = DevicePolicyLossInputs {
            shape: c.shape,
            logp: lp.as_view(),
            old_logp: old.as_view(),
            advantages: adv.as_view(),
            mask: Some(mask.as_view()),
            entropy: Some(entropy.as_view()),
        };
        let out = DevicePolicyLossOutputs { grad_logp: Some(g.as_view_mut()), ..Default::default() };
        cuda::policy_loss(s, &inputs, out, &mut status, &opts.normaliser(global)).unwrap();
        status.check(s).unwrap();
        let got = s.clone_dtoh(&g).unwrap();
        let same = got.iter().zip(&local.grad_logp).all(|(a, b)| (a - b).abs() <= 1e-7 * b.abs().max(1e-3));
        assert!(same, "global-count gradients differ from the local path's");
    }
}

macro_rules! gpu_test {
    ($name:ident) => {
        #[test]
        fn $name() {
            let device = cuda_or_skip!();
            #[cfg(feature = "cuda")]
            gpu::$name(&gpu::Gpu(device.stream().clone()));
            #[cfg(not(feature = "cuda"))]
            let _ = device;
        }
    };
}

gpu_test!(policy);
gpu_test!(policy_errors);
gpu_test!(value);
gpu_test!(single_kernel_path);
gpu_test!(fused);
gpu_test!(without_statistics);
gpu_test!(raw_layer);
