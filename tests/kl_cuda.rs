//! The CUDA KL family held to the f64 reference: the same cases as the CPU, plus both launch
//! paths of the exact divergences (bitwise batch invariance) and status reports. Skips visibly
//! without a GPU; `RLHF_KERNELS_REQUIRE_GPU=1` makes that a failure.

#[macro_use]
mod common;

use rlhf_kernels::cuda_or_skip;

#[cfg(feature = "cuda")]
mod gpu {
    use super::common::gpu::Gpu;

    use super::common::kl::{self, ExactBackend, ExactCase, SampledBackend, SampledCase};
    use rlhf_kernels::cuda::raw::{self, ExactKlArgs, ExactKlBackwardArgs, PairArgs, RawStream};

    use rlhf_kernels::cudarc::driver::{DevicePtr, DevicePtrMut};
    use rlhf_kernels::testing::{Tolerance, assert_close};
    use rlhf_kernels::{
        DType, Error, ExactDivergence, Normaliser, RowProblem, RowShape, bf16, f16, reference,
    };

    pub fn sampled(gpu: &Gpu) {
        kl::sampled_sweep(gpu);
        // A NaN on a valid token is reported through the status word.
        let mut c = SampledCase::random(RowShape::new(4, 10), 1);
        c.mask = None;
        c.logp[25] = f32::NAN;
        let err = gpu.sampled(&c).unwrap_err();
        assert_eq!(err, Error::InvalidRow { op: "sampled_kl", row: 2, problem: RowProblem::NaN });
        // One kernel with global denominators and no statistics: values and gradient only.
        let mut c = SampledCase::random(RowShape::new(8, 300), 2);
        c.opts = c.opts.normaliser(Normaliser::Global {
            valid_tokens: 900.0,
            valid_sequences: 8.0,
            sequences: 8.0,
        });
        kl::check_sampled(gpu, &c);
    }

    pub fn sampled_infinities(gpu: &Gpu) {
        kl::sampled_infinities(gpu);
    }

    pub fn sampled_bias_correction(gpu: &Gpu) {
        kl::sampled_bias_correction(gpu);
    }

    pub fn rewards(gpu: &Gpu) {
        kl::rewards_sweep(gpu);
        kl::rewards_problems(gpu);
    }

    /// Every pair of dtypes: each is a kernel of its own on the GPU.
    pub fn exact(gpu: &Gpu) {
        kl::exact_sweep::<f32, f32>(gpu);
        kl::exact_sweep::<f32, f16>(gpu);
        kl::exact_sweep::<f32, bf16>(gpu);
        kl::exact_sweep::<f16, f32>(gpu);
        kl::exact_sweep::<f16, f16>(gpu);
        kl::exact_sweep::<f16, bf16>(gpu);
        kl::exact_sweep::<bf16, f32>(gpu);
        kl::exact_sweep::<bf16, f16>(gpu);
        kl::exact_sweep::<bf16, bf16>(gpu);
    }

    pub fn exact_shards(gpu: &Gpu) {
        kl::exact_shards(gpu);
    }

    pub fn exact_shard_problems(gpu: &Gpu) {
        kl::exact_shard_problems(gpu);
    }

    /// The JSD's last step writes the value or the policy term: no outputs at all, or the
    /// log-sum-exps (its inputs) or a statistic asked of it, are refused before any launch.
    pub fn jsd_sums_outputs(gpu: &Gpu) {
        use rlhf_kernels::{Aggregated, ExactKlOptions, ExactKlOutputs, ExactKlStatistic, cuda};
        let s = &gpu.0;
        let rows = 3;
        let sums = s.alloc_zeros::<f32>(2 * 2 * rows).unwrap();
        let lse = s.alloc_zeros::<f32>(rows).unwrap();
        let zeros = || s.alloc_zeros::<f32>(rows).unwrap();
        let (mut value, mut other, mut other2) = (zeros(), zeros(), zeros());
        let mut stat = cuda::DeviceStats::<Aggregated>::new(s).unwrap();
        let opts = ExactKlOptions::new(ExactDivergence::Jsd { beta: 0.5 });
        let (sv, lv) = (sums.as_view(), lse.as_view());
        let mut ctx = cuda::LaunchContext::new(s).unwrap();
        macro_rules! finish {
            ($out:expr) => {
                cuda::finish_jsd_sums(&mut ctx, &sv, None, [&lv, &lv], $out, &opts)
            };
        }
        let refused =
            |r: rlhf_kernels::Result<()>| matches!(r, Err(Error::InvalidOption { name: "outputs", .. }));
        assert!(refused(finish!(ExactKlOutputs::default())));
        assert!(refused(finish!(ExactKlOutputs::default().value(&mut value).lse(&mut other, &mut other2))));
        let statistic = ExactKlStatistic::masked_mean(RowShape::new(1, rows));
        assert!(refused(finish!(
            ExactKlOutputs::default().value(&mut value).statistic(&mut stat, statistic)
        )));
        let mut bytes = s.alloc_zeros::<u8>(16).unwrap();
        assert!(refused(finish!(ExactKlOutputs::default().value(&mut value).workspace(&mut bytes))));
        finish!(ExactKlOutputs::default().value(&mut value).policy_term(&mut other)).unwrap();
        assert_eq!(s.clone_dtoh(&value).unwrap(), vec![0.0; rows], "zero sums: zero JSD");
    }

    /// The raw layer (device addresses at byte offsets, the caller's stream): forward, then
    /// the backward in place, held to the reference; null and missing buffers refused.
    pub fn exact_raw_layer(gpu: &Gpu) {
        let s = &gpu.0;
        let c = ExactCase::<bf16, f16>::random(9, 3000, ExactDivergence::PolicyRef, 0.9, 12);
        let rows = c.policy_shape.rows;
        let expected = reference::exact_kl(&c.policy, c.policy_shape, &c.reference_rows(), &c.opts).unwrap();
        // The policy starts 3 elements into its buffer (6 bytes: not 16-byte aligned).
        let mut padded = vec![bf16::ZERO; 3];
        padded.extend_from_slice(&c.policy);
        let mut p = s.clone_htod(&padded).unwrap();
        let q = s.clone_htod(&c.reference).unwrap();
        let m = s.clone_htod(c.mask.as_ref().unwrap()).unwrap();
        let mut outs = s.alloc_zeros::<f32>(3 * rows).unwrap();
        let mut st = s.clone_htod(&[raw::STATUS_CLEAR]).unwrap();
        let stream = RawStream { ordinal: s.context().ordinal(), stream: s.cu_stream() };
        {
            let (pp, _a) = p.device_ptr_mut(s);
            let (qp, _b) = q.device_ptr(s);
            let (mp, _c) = m.device_ptr(s);
            let (op, _d) = outs.device_ptr_mut(s);
            let (sp, _e) = st.device_ptr_mut(s);
            let (policy, out_at) = (pp + 3 * 2, |k: u64| op + k * 4 * rows as u64);
            let pair = PairArgs {
                policy,
                policy_dtype: DType::BF16,
                policy_shape: c.policy_shape,
                reference: qp,
                ref_dtype: DType::F16,
                ref_shape: c.ref_shape,
                mask: mp,
            };
            let fwd = ExactKlArgs {
                pair,
                value: out_at(0),
                policy_lse: out_at(1),
                ref_lse: out_at(2),
                policy_term: 0,
                workspace: 0,
                status: sp,
            };
            // SAFETY: the buffers were allocated above on this context, cover the offsets plus
            // the shapes, and live until the synchronising copies below.
            unsafe { raw::exact_kl(stream, &fwd, &c.opts) }.unwrap();
            let missing = ExactKlBackwardArgs {
                pair,
                grad: out_at(0),
                policy_lse: out_at(1),
                ref_lse: out_at(2),
                value: 0,
                policy_term: 0,
                grad_policy: policy,
                status: sp,
            };
            // SAFETY: refused before any launch (KL[π‖ref] needs the saved value).
            let err = unsafe { raw::exact_kl_backward(stream, &missing, &c.opts) }.unwrap_err();
            assert!(matches!(err, Error::InvalidOption { name: "value", .. }), "{err}");
            // The upstream gradient is the value itself (any per-row numbers will do).
            let args = ExactKlBackwardArgs { value: out_at(0), ..missing };
            // SAFETY: as above; in place over the policy.
            unsafe { raw::exact_kl_backward(stream, &args, &c.opts) }.unwrap();
            let null = ExactKlArgs { pair: PairArgs { reference: 0, ..pair }, ..fwd };
            // SAFETY: the null pointer is refused before any launch.
            let err = unsafe { raw::exact_kl(stream, &null, &c.opts) }.unwrap_err();
            assert!(matches!(err, Error::InvalidOption { name: "reference", .. }), "{err}");
        }
        raw::decode_status(s.clone_dtoh(&st).unwrap()[0]).unwrap();
        let o = s.clone_dtoh(&outs).unwrap();
        let tol = Tolerance::for_dtype(DType::F32).scaled(c.scale());
        assert_close(&o[..rows], &expected.value, tol, "raw value");
        assert_close(&o[rows..2 * rows], &expected.policy_lse, tol, "raw policy lse");
        assert_close(&o[2 * rows..], &expected.ref_lse, tol, "raw ref lse");
        let g: Vec<f32> = o[..rows].to_vec();
        let grad = reference::exact_kl_backward(&c.policy, c.policy_shape, &c.reference_rows(), &g, &c.opts)
            .unwrap();
        let got = s.clone_dtoh(&p).unwrap();
        let shape = c.policy_shape;
        let dense: Vec<bf16> = (0..rows).flat_map(|r| got[3..][shape.row_range(r)].iter().copied()).collect();
        let scale = grad.iter().fold(0.0f64, |m, x| m.max(x.abs()));
        assert_close(&dense, &grad, Tolerance::for_dtype(DType::BF16).scaled(scale), "raw backward in place");
    }

    pub fn exact_edges(gpu: &Gpu) {
        kl::exact_edge_cases(gpu);
        kl::exact_errors(gpu);
    }

    pub fn exact_statistic(gpu: &Gpu) {
        kl::exact_statistic(gpu);
    }

    /// A row pair alone (split path) equals the same pair inside 1100 rows (one block per
    /// row), bit for bit, for every divergence.
    pub fn exact_batch_invariance(gpu: &Gpu) {
        let cols = 20_000;
        for divergence in kl::DIVERGENCES {
            let batch = ExactCase::<bf16, bf16>::random(1100, cols, divergence, 1.0, 8);
            let whole = gpu.forward(&ExactCase { mask: None, ..batch.clone() }).unwrap();
            let r = 777;
            let one = ExactCase {
                policy: batch.policy[batch.policy_shape.row_range(r)].to_vec(),
                policy_shape: RowShape::new(1, cols),
                reference: batch.reference[batch.ref_shape.row_range(r)].to_vec(),
                ref_shape: RowShape::new(1, cols),
                mask: None,
                opts: batch.opts,
            };
            let alone = gpu.forward(&one).unwrap();
            for (name, a, b) in [
                ("value", &alone.value, &whole.value),
                ("policy_lse", &alone.policy_lse, &whole.policy_lse),
                ("policy_term", &alone.policy_term, &whole.policy_term),
            ] {
                assert_eq!(
                    a[0].to_bits(),
                    b[r].to_bits(),
                    "{name} of a row alone differs inside 1100 rows ({divergence:?})"
                );
            }
        }
    }
}

gpu_test!(sampled);
gpu_test!(sampled_infinities);
gpu_test!(sampled_bias_correction);
gpu_test!(rewards);
gpu_test!(exact);
gpu_test!(exact_statistic);
gpu_test!(exact_edges);
gpu_test!(exact_batch_invariance);
gpu_test!(exact_shards);
gpu_test!(exact_raw_layer);
gpu_test!(exact_shard_problems);
gpu_test!(jsd_sums_outputs);
