//! The CUDA log-softmax held to the f64 reference through the safe cudarc layer and the raw
//! pointer layer. Every test skips visibly without a GPU; `RLHF_KERNELS_REQUIRE_GPU=1`
//! turns the skip into a failure.

#[macro_use]
mod common;

use rlhf_kernels::cuda_or_skip;

#[cfg(feature = "cuda")]
mod gpu {
    use super::common::gpu::Gpu;

    use super::common::{self, Backward, Forward};
    use rlhf_kernels::cuda::raw::{self, LogSoftmaxArgs, LogSoftmaxBackwardArgs, RawStream};
    use rlhf_kernels::cuda::{self, LaunchContext};
    use rlhf_kernels::cudarc::driver::{DevicePtr, DevicePtrMut};
    use rlhf_kernels::testing::{Rng, Tolerance, assert_close};
    use rlhf_kernels::{
        DType, Element, Error, LogSoftmaxOptions, RowProblem, RowShape, bf16, f16, reference,
    };

    pub fn sweep<T: Element>(gpu: &Gpu) {
        common::sweep::<T>(gpu, gpu);
    }

    pub fn sweep_all(gpu: &Gpu) {
        sweep::<f32>(gpu);
        sweep::<f16>(gpu);
        sweep::<bf16>(gpu);
    }

    pub fn hostile(gpu: &Gpu) {
        let (logits, shape) = common::hostile_rows();
        for tau in [1.0f32, 0.5, 3.0] {
            let opts = LogSoftmaxOptions::default().temperature(tau);
            let expected = reference::log_softmax(&logits, shape, &opts).unwrap();
            let out = gpu.forward(&logits, shape, &opts).unwrap();
            assert_eq!(out[1], 0.0);
            assert_eq!(out[0], f32::NEG_INFINITY);
            let tol = Tolerance::for_dtype(DType::F32).scaled(90.0 / tau as f64);
            assert_close(&out[..7], &expected[..7], tol, "rows 0-1");
            assert_close(&out[10..], &expected[10..], tol, "rows 2-3");
        }
    }

    pub fn bad_rows(gpu: &Gpu) {
        for (logits, row, problem) in common::bad_batches() {
            for dtype in DType::ALL {
                let err = match dtype {
                    DType::F32 => gpu.forward(&logits, RowShape::new(4, 3), &LogSoftmaxOptions::default()),
                    DType::F16 => gpu.forward(
                        &convert::<f16>(&logits),
                        RowShape::new(4, 3),
                        &LogSoftmaxOptions::default(),
                    ),
                    DType::BF16 => gpu.forward(
                        &convert::<bf16>(&logits),
                        RowShape::new(4, 3),
                        &LogSoftmaxOptions::default(),
                    ),
                };
                assert_eq!(
                    err.unwrap_err(),
                    Error::InvalidRow { op: "log_softmax", row, problem },
                    "{dtype}"
                );
            }
        }
        let shape = RowShape::new(3, 4);
        let out = gpu
            .forward(&Rng::new(1).logits::<f32>(shape, 1.0), shape, &LogSoftmaxOptions::default())
            .unwrap();
        let mut g = vec![0.25f32; 12];
        g[9] = f32::INFINITY;
        let err = gpu.backward::<bf16>(&out, &g, shape, &LogSoftmaxOptions::default()).unwrap_err();
        assert_eq!(
            err,
            Error::InvalidRow { op: "log_softmax_backward", row: 2, problem: RowProblem::GradNonFinite }
        );
    }

    fn convert<T: Element>(v: &[f32]) -> Vec<T> {
        v.iter().map(|&x| T::from_f32(x)).collect()
    }

    /// One row alone and inside a batch of 4096 rows give the same bits; two runs too.
    pub fn batch_invariance(gpu: &Gpu) {
        for v in [1000usize, 32000] {
            let shape = RowShape::new(4096, v);
            let logits: Vec<bf16> = Rng::new(v as u64).logits(shape, 3.0);
            let opts = LogSoftmaxOptions::default();
            let a = gpu.forward(&logits, shape, &opts).unwrap();
            let b = gpu.forward(&logits, shape, &opts).unwrap();
            assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()), "two runs differ at V={v}");
            for r in [0usize, 1234, 4095] {
                let alone = gpu.forward(&logits[shape.row_range(r)], RowShape::new(1, v), &opts).unwrap();
                let same = alone.iter().zip(&a[r * v..(r + 1) * v]).all(|(x, y)| x.to_bits() == y.to_bits());
                assert!(same, "row {r} alone differs from the batch at V={v}");
            }
        }
    }

    /// The raw layer driven from plain cudarc allocations, at byte offsets into larger
    /// buffers, on the caller's own stream.
    pub fn raw_layer(gpu: &Gpu) {
        let s = &gpu.0;
        let shape = RowShape::new(9, 1001).with_row_stride(1003);
        let logits: Vec<f16> = Rng::new(9).logits(shape, 2.0);
        let opts = LogSoftmaxOptions::default().temperature(0.8);
        let mut padded = vec![f16::ZERO; 5];
        padded.extend_from_slice(&logits);
        let x = s.clone_htod(&padded).unwrap();
        let mut y = s.alloc_zeros::<f32>(shape.len() + 3).unwrap();
        let mut st = s.clone_htod(&[raw::STATUS_CLEAR]).unwrap();
        {
            let (xp, _gx) = x.device_ptr(s);
            let (yp, _gy) = y.device_ptr_mut(s);
            let (sp, _gs) = st.device_ptr_mut(s);
            let args =
                LogSoftmaxArgs { logits: xp + 5 * 2, dtype: DType::F16, shape, out: yp + 3 * 4, status: sp };
            let stream = RawStream { ordinal: s.context().ordinal(), stream: s.cu_stream() };
            // SAFETY: the buffers were allocated above on this context, cover the offsets plus
            // the shape, and live until the synchronising copies below.
            unsafe { raw::log_softmax(stream, &args, &opts) }.unwrap();
        }
        raw::decode_status(s.clone_dtoh(&st).unwrap()[0]).unwrap();
        let out = s.clone_dtoh(&y).unwrap();
        let expected = reference::log_softmax(&logits, shape, &opts).unwrap();
        let tol = Tolerance::for_dtype(DType::F32).scaled(common::input_scale(&logits, shape, 0.8));
        assert_close(&out[3..], &expected, tol, "raw forward");

        let g = Rng::new(10).normals(shape.len(), 1.0);
        let gd = s.clone_htod(&g).unwrap();
        let y_dense = s.clone_htod(&out[3..]).unwrap();
        let mut dx = s.alloc_zeros::<f16>(shape.rows * shape.row_stride).unwrap();
        {
            let (yp, _a) = y_dense.device_ptr(s);
            let (gp, _b) = gd.device_ptr(s);
            let (dp, _c) = dx.device_ptr_mut(s);
            let (sp, _d) = st.device_ptr_mut(s);
            let args = LogSoftmaxBackwardArgs {
                out: yp,
                grad_out: gp,
                grad_logits: dp,
                dtype: DType::F16,
                shape,
                status: sp,
            };
            let stream = RawStream { ordinal: s.context().ordinal(), stream: s.cu_stream() };
            // SAFETY: as above.
            unsafe { raw::log_softmax_backward(stream, &args, &opts) }.unwrap();
        }
        raw::decode_status(s.clone_dtoh(&st).unwrap()[0]).unwrap();
        let grad = s.clone_dtoh(&dx).unwrap();
        let dense: Vec<f16> =
            (0..shape.rows).flat_map(|r| grad[shape.row_range(r)].iter().copied()).collect();
        let expected = reference::log_softmax_backward(&logits, shape, &g, &opts).unwrap();
        let scale = expected.iter().fold(0.0f64, |m, x| m.max(x.abs()));
        assert_close(&dense, &expected, Tolerance::for_dtype(DType::F16).scaled(scale), "raw backward");
    }

    /// proptest over random shapes, strides, temperatures and dtypes, as on the CPU.
    pub fn random_shapes(gpu: &Gpu) {
        use proptest::prelude::*;
        use proptest::test_runner::{Config, TestRunner};
        let cases = if common::small() { 8 } else { 48 };
        let mut runner = TestRunner::new(Config { cases, ..Config::default() });
        let strategy = (1usize..9, 1usize..3000, 0usize..9, 0.25f32..4.0, 0usize..3, any::<u64>());
        runner
            .run(&strategy, |(rows, cols, pad, tau, dtype, seed)| {
                let shape = RowShape::new(rows, cols).with_row_stride(cols + pad);
                match DType::ALL[dtype] {
                    DType::F32 => common::check_shape::<f32>(gpu, gpu, shape, tau, seed),
                    DType::F16 => common::check_shape::<f16>(gpu, gpu, shape, tau, seed),
                    DType::BF16 => common::check_shape::<bf16>(gpu, gpu, shape, tau, seed),
                }
                Ok(())
            })
            .unwrap();
    }

    /// Shape errors come back before anything is launched; a status word that was never
    /// cleared is not mistaken for a report.
    pub fn errors(gpu: &Gpu) {
        let s = &gpu.0;
        let x = s.alloc_zeros::<f32>(10).unwrap();
        let mut y = s.alloc_zeros::<f32>(10).unwrap();
        let mut ctx = LaunchContext::new(s).unwrap();
        let err = cuda::log_softmax(&mut ctx, &x, RowShape::new(3, 4), &mut y, &LogSoftmaxOptions::default());
        assert!(matches!(err, Err(Error::ShapeMismatch { what: "logits", .. })));
        let opts = LogSoftmaxOptions::default().temperature(0.0);
        let err = cuda::log_softmax(&mut ctx, &x, RowShape::new(2, 5), &mut y, &opts);
        assert!(matches!(err, Err(Error::InvalidOption { name: "temperature", .. })));
        ctx.check().unwrap();
        let args =
            LogSoftmaxArgs { logits: 0, dtype: DType::F32, shape: RowShape::new(1, 1), out: 0, status: 0 };
        let stream = RawStream { ordinal: s.context().ordinal(), stream: s.cu_stream() };
        // SAFETY: the null pointer is rejected before any launch.
        let err = unsafe { raw::log_softmax(stream, &args, &LogSoftmaxOptions::default()) };
        assert!(matches!(err, Err(Error::InvalidOption { name: "logits", .. })));
    }
}

gpu_test!(sweep_all);
gpu_test!(hostile);
gpu_test!(bad_rows);
gpu_test!(batch_invariance);
gpu_test!(raw_layer);
gpu_test!(errors);
gpu_test!(random_shapes);
