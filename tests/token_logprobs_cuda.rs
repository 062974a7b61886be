//! The CUDA token log-probs, entropy and lse held to the f64 reference through the safe
//! layer and the raw layer: the same sweep and checks as the CPU, plus both launch paths,
//! status reports and shards. Skips visibly without a GPU (`RLHF_KERNELS_REQUIRE_GPU=1` makes
//! that a failure).

#[macro_use]
mod common;

use rlhf_kernels::cuda_or_skip;

#[cfg(feature = "cuda")]
mod gpu {
    use super::common::gpu::Gpu;

    use super::common::tokens::{self, Case, Fwd, TokenBackend, bits_equal};
    use rlhf_kernels::TokenOutputs;
    use rlhf_kernels::cuda::raw::{self, RawStream, TokenLogprobsArgs, TokenLogprobsBackwardArgs};
    use rlhf_kernels::cuda::{self, LaunchContext};
    use rlhf_kernels::cudarc::driver::{DevicePtr, DevicePtrMut};
    use rlhf_kernels::testing::{Tolerance, assert_close};
    use rlhf_kernels::{
        DType, Error, IndexType, RowProblem, RowShape, TokenGrads, TokenLogprobsOptions, VocabPartial, bf16,
        cpu, f16,
    };

    pub fn sweep_f32(gpu: &Gpu) {
        tokens::sweep::<f32>(gpu);
    }

    pub fn sweep_f16(gpu: &Gpu) {
        tokens::sweep::<f16>(gpu);
    }

    pub fn sweep_bf16(gpu: &Gpu) {
        tokens::sweep::<bf16>(gpu);
    }

    pub fn a_million_rows(gpu: &Gpu) {
        let rows = if super::common::small() { 10_000 } else { 1_000_000 };
        for (v, tau) in [(2usize, 1.3f32), (3, 0.7)] {
            tokens::check_case(gpu, &Case::<bf16>::random(RowShape::new(rows, v), tau, 3), 3);
        }
    }

    /// A row alone (split path: few rows) equals the same row in 4096 rows (one block per
    /// row), bit for bit; and the GPU agrees with the CPU within f32 rounding.
    pub fn batch_invariance(gpu: &Gpu) {
        if super::common::small() {
            tokens::batch_invariance::<bf16>(gpu, 9000, 1100);
            tokens::batch_invariance::<f32>(gpu, 20000, 64);
        } else {
            tokens::batch_invariance::<bf16>(gpu, 32000, 4096);
            tokens::batch_invariance::<f32>(gpu, 151936, 64);
        }
    }

    pub fn shards(gpu: &Gpu) {
        let s = &gpu.0;
        let case = Case::<bf16>::random(RowShape::new(16, 50_000), 0.7, 11);
        let whole = gpu.forward(&case, true).unwrap();
        let up = gpu.upload(&case);
        let bounds = [0usize, 1, 12_345, 30_000, 49_999, 50_000];
        let shards = bounds.len() - 1;
        let mut partials = s.alloc_zeros::<VocabPartial>(shards * 16).unwrap();
        let mut ctx = LaunchContext::new(s).unwrap();
        for k in 0..shards {
            let (lo, hi) = (bounds[k], bounds[k + 1]);
            // The shard is a strided view into the full rows: offset lo, stride 50_000.
            let view = up.x.slice(lo..);
            let shape = RowShape::new(16, hi - lo).with_row_stride(50_000);
            let mut dst = partials.slice_mut(k * 16..(k + 1) * 16);
            cuda::vocab_shard_partials(&mut ctx, &view, shape, &up.tokens(), lo, &mut dst, &case.opts)
                .unwrap();
        }
        let (mut logp, mut entropy) = (s.alloc_zeros::<f32>(16).unwrap(), s.alloc_zeros::<f32>(16).unwrap());
        let out = TokenOutputs::default().logp(logp.as_view_mut()).entropy(entropy.as_view_mut());
        cuda::finish_vocab_partials(&mut ctx, &partials, shards, &up.tokens(), out, &case.opts).unwrap();
        ctx.check().unwrap();
        let tol = Tolerance { rel: 1e-5, abs: 1e-5 * case.scale() };
        let as_f64 = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<_>>();
        assert_close(&s.clone_dtoh(&logp).unwrap(), &as_f64(&whole.logp), tol, "logp from shards");
        assert_close(&s.clone_dtoh(&entropy).unwrap(), &as_f64(&whole.entropy), tol, "entropy from shards");
        // The host finish of the device partials agrees too.
        let host: Vec<VocabPartial> = s.clone_dtoh(&partials).unwrap();
        let mut lp = vec![0.0f32; 16];
        let mask = case.mask.clone().unwrap();
        let tokens = rlhf_kernels::Tokens::new(&case.targets).with_mask(&mask);
        cpu::finish_vocab_partials(
            &host,
            shards,
            &tokens,
            rlhf_kernels::TokenOutputs::default().logp(&mut lp),
            &case.opts,
        )
        .unwrap();
        assert_close(&lp, &as_f64(&whole.logp), tol, "host finish of device partials");
    }

    /// The device reports what only it can see, once per call, through the status word.
    pub fn status_reports(gpu: &Gpu) {
        let ninf = f32::NEG_INFINITY;
        let mut case = Case::<f32>::dense_random(RowShape::new(6, 5000), 1.0, 1);
        case.logits[case.shape.row_range(4)].fill(ninf);
        let err = gpu.forward(&case, true).unwrap_err();
        assert_eq!(err, Error::InvalidRow { op: "token_logprobs", row: 4, problem: RowProblem::AllNegInf });
        case.logits[7] = f32::NAN;
        let err = gpu.forward(&case, false).unwrap_err();
        assert_eq!(err, Error::InvalidRow { op: "token_logprobs", row: 0, problem: RowProblem::NaN });
        let mut case = Case::<bf16>::dense_random(RowShape::new(3, 100), 1.0, 2);
        case.targets[2] = 100;
        let err = gpu.forward(&case, true).unwrap_err();
        assert_eq!(
            err,
            Error::InvalidRow { op: "token_logprobs", row: 2, problem: RowProblem::TargetOutOfRange }
        );
        // Few long rows take the split path: same reports.
        let mut case = Case::<bf16>::dense_random(RowShape::new(2, 40_000), 1.0, 3);
        case.targets[1] = -5;
        case.opts = TokenLogprobsOptions::default().ignore_index(None);
        let err = gpu.forward(&case, true).unwrap_err();
        assert_eq!(
            err,
            Error::InvalidRow { op: "token_logprobs", row: 1, problem: RowProblem::TargetOutOfRange }
        );
        // Backward.
        let case = Case::<f16>::dense_random(RowShape::new(3, 10), 1.0, 4);
        let f = gpu.forward(&case, true).unwrap();
        let mut lse = f.lse.clone();
        lse[1] = f32::NAN;
        let err = gpu.backward(&case, &TokenGrads::new(&lse).grad_logp(&[1.0; 3]), false).unwrap_err();
        assert_eq!(
            err,
            Error::InvalidRow { op: "token_logprobs_backward", row: 1, problem: RowProblem::NaN }
        );
        let err = gpu
            .backward(&case, &TokenGrads::new(&f.lse).grad_logp(&[1.0, 1.0, f32::INFINITY]), true)
            .unwrap_err();
        assert_eq!(
            err,
            Error::InvalidRow { op: "token_logprobs_backward", row: 2, problem: RowProblem::GradNonFinite }
        );
        // Host-side errors come back before any launch.
        let err = gpu.backward(&case, &TokenGrads::new(&f.lse), false).unwrap_err();
        assert!(matches!(err, Error::InvalidOption { name: "grads", .. }));
    }

    /// The raw layer from plain cudarc allocations, i32 targets at a byte offset, in place.
    pub fn raw_layer(gpu: &Gpu) {
        let s = &gpu.0;
        let case = Case::<bf16>::random(RowShape::new(5, 9000).with_row_stride(9001), 0.7, 8);
        let expected = gpu.forward(&case, true).unwrap();
        let mut x = s.clone_htod(&case.logits).unwrap();
        let targets: Vec<i32> = [7].into_iter().chain(case.targets.iter().map(|&t| t as i32)).collect();
        let t = s.clone_htod(&targets).unwrap();
        let m = s.clone_htod(case.mask.as_ref().unwrap()).unwrap();
        let (mut lp, mut h, mut l) = (
            s.alloc_zeros::<f32>(5).unwrap(),
            s.alloc_zeros::<f32>(5).unwrap(),
            s.alloc_zeros::<f32>(5).unwrap(),
        );
        let mut st = s.clone_htod(&[raw::STATUS_CLEAR]).unwrap();
        let stream = RawStream { ordinal: s.context().ordinal(), stream: s.cu_stream() };
        {
            let (xp, _a) = x.device_ptr(s);
            let (tp, _b) = t.device_ptr(s);
            let (mp, _c) = m.device_ptr(s);
            let (lpp, _d) = lp.device_ptr_mut(s);
            let (hp, _e) = h.device_ptr_mut(s);
            let (lp2, _f) = l.device_ptr_mut(s);
            let (sp, _g) = st.device_ptr_mut(s);
            let args = TokenLogprobsArgs {
                logits: xp,
                dtype: DType::BF16,
                shape: case.shape,
                targets: tp + 4,
                index_type: IndexType::I32,
                mask: mp,
                logp: lpp,
                entropy: hp,
                lse: lp2,
                workspace: 0,
                status: sp,
            };
            // SAFETY: buffers allocated above on this context, sized for the shape, alive until
            // the synchronising copies below.
            unsafe { raw::token_logprobs(stream, &args, &case.opts) }.unwrap();
        }
        raw::decode_status(s.clone_dtoh(&st).unwrap()[0]).unwrap();
        assert!(bits_equal(&s.clone_dtoh(&lp).unwrap(), &expected.logp));
        assert!(bits_equal(&s.clone_dtoh(&h).unwrap(), &expected.entropy));

        let g = s.clone_htod(&[1.0f32, -0.5, 2.0, 0.25, 1.0]).unwrap();
        let grads = TokenGrads::new(&expected.lse).grad_logp(&[1.0, -0.5, 2.0, 0.25, 1.0]);
        let reference_grad = gpu.backward(&case, &grads, false).unwrap();
        {
            let (xp, _a) = x.device_ptr_mut(s);
            let (tp, _b) = t.device_ptr(s);
            let (mp, _c) = m.device_ptr(s);
            let (lp2, _d) = l.device_ptr(s);
            let (gp, _e) = g.device_ptr(s);
            let (sp, _f) = st.device_ptr_mut(s);
            let args = TokenLogprobsBackwardArgs {
                logits: xp,
                dtype: DType::BF16,
                shape: case.shape,
                targets: tp + 4,
                index_type: IndexType::I32,
                mask: mp,
                lse: lp2,
                entropy: 0,
                grad_logp: gp,
                grad_entropy: 0,
                grad_logits: xp,
                status: sp,
            };
            // SAFETY: as above; grad_logits == logits is the documented in-place mode.
            unsafe { raw::token_logprobs_backward(stream, &args, &case.opts) }.unwrap();
        }
        raw::decode_status(s.clone_dtoh(&st).unwrap()[0]).unwrap();
        let in_place = s.clone_dtoh(&x).unwrap();
        for r in 0..5 {
            let range = case.shape.row_range(r);
            assert!(
                in_place[range.clone()]
                    .iter()
                    .zip(&reference_grad[range])
                    .all(|(a, b)| a.to_bits() == b.to_bits())
            );
        }
    }

    pub fn a_fully_masked_batch_gives_zeros(gpu: &Gpu) {
        for cols in [3000usize, 40_000] {
            let mut case = Case::<bf16>::random(RowShape::new(8, cols), 1.0, 4);
            case.mask = Some(vec![0; 8]);
            let f = gpu.forward(&case, true).unwrap();
            assert!(f.logp.iter().chain(&f.entropy).chain(&f.lse).all(|&x| x == 0.0));
            let grads = TokenGrads::new(&f.lse).grad_logp(&[1.0; 8]).grad_entropy(&[1.0; 8], &f.entropy);
            for in_place in [false, true] {
                let g = gpu.backward(&case, &grads, in_place).unwrap();
                assert!(g.iter().all(|x| x.to_f32() == 0.0));
            }
        }
    }

    /// Chunks whose maxima are far apart rescale to exactly 0: finite entropy, on both paths.
    pub fn huge_logit_gaps(gpu: &Gpu) {
        for rows in [1usize, 1100] {
            let cols = 20_000;
            let mut logits = vec![-3e38f32; rows * cols];
            for r in 0..rows {
                logits[r * cols + 15_000] = 3e38;
            }
            let case = Case {
                logits,
                shape: RowShape::new(rows, cols),
                targets: vec![15_000; rows],
                mask: None,
                opts: TokenLogprobsOptions::default(),
            };
            let f = gpu.forward(&case, true).unwrap();
            assert!(f.logp.iter().chain(&f.entropy).all(|&x| x == 0.0), "rows={rows}");
        }
    }

    /// Both forward paths against the CPU backend on a long row (same maths, f32 rounding apart).
    pub fn agrees_with_cpu(gpu: &Gpu) {
        let case = Case::<bf16>::random(RowShape::new(3, 256_000), 1.0, 21);
        let g = gpu.forward(&case, true).unwrap();
        let mut c = Fwd { logp: vec![0.0; 3], entropy: vec![0.0; 3], lse: vec![0.0; 3] };
        let mask = case.mask.clone().unwrap();
        let tokens = rlhf_kernels::Tokens::new(&case.targets).with_mask(&mask);
        let out =
            rlhf_kernels::TokenOutputs::default().logp(&mut c.logp).entropy(&mut c.entropy).lse(&mut c.lse);
        cpu::token_logprobs(&case.logits, case.shape, &tokens, out, &case.opts).unwrap();
        let tol = Tolerance::for_dtype(DType::F32).scaled(case.scale());
        let as_f64 = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<_>>();
        assert_close(&g.logp, &as_f64(&c.logp), tol, "logp gpu vs cpu");
        assert_close(&g.entropy, &as_f64(&c.entropy), tol, "entropy gpu vs cpu");
    }
}

gpu_test!(sweep_f32);
gpu_test!(sweep_f16);
gpu_test!(sweep_bf16);
gpu_test!(a_million_rows);
gpu_test!(batch_invariance);
gpu_test!(shards);
gpu_test!(status_reports);
gpu_test!(raw_layer);
gpu_test!(agrees_with_cpu);
gpu_test!(huge_logit_gaps);
gpu_test!(a_fully_masked_batch_gives_zeros);
