//! One test per error variant: each is triggered for real, and its message says what to do.

use rlhf_kernels::{
    DType, Error, LogSoftmaxOptions, RowBlocks, RowProblem, RowShape, cpu, reference, validate_targets,
};

fn forward(logits: &[f32], shape: RowShape, out_len: usize, opts: LogSoftmaxOptions) -> Result<(), Error> {
    let mut out = vec![0.0f32; out_len];
    cpu::log_softmax(logits, shape, &mut out, &opts)
}

#[test]
fn shape_mismatch() {
    let err = forward(&[0.0; 5], RowShape::new(2, 3), 6, LogSoftmaxOptions::default()).unwrap_err();
    assert_eq!(err, Error::ShapeMismatch { what: "logits", min: 6, max: 6, actual: 5 });
    let err = forward(&[0.0; 6], RowShape::new(2, 3), 7, LogSoftmaxOptions::default()).unwrap_err();
    assert_eq!(err, Error::ShapeMismatch { what: "out", min: 6, max: 6, actual: 7 });
    // A strided buffer may stop right after the last row's cols.
    assert!(
        forward(&[0.0; 7], RowShape::new(2, 3).with_row_stride(4), 6, LogSoftmaxOptions::default()).is_ok()
    );
    let err = forward(&[0.0; 9], RowShape::new(2, 3).with_row_stride(4), 6, LogSoftmaxOptions::default())
        .unwrap_err();
    assert!(err.to_string().contains("(rows - 1) * row_stride + cols"), "{err}");
    let mut grad = [0.0f32; 6];
    let err = cpu::log_softmax_backward(
        &[0.0; 6],
        &[0.0; 5],
        RowShape::new(2, 3),
        &mut grad,
        &LogSoftmaxOptions::default(),
    );
    assert!(matches!(err, Err(Error::ShapeMismatch { what: "grad_out", .. })));
}

#[test]
fn row_stride_too_small() {
    let err = forward(&[0.0; 6], RowShape::new(2, 3).with_row_stride(2), 6, LogSoftmaxOptions::default())
        .unwrap_err();
    assert_eq!(err, Error::RowStrideTooSmall { what: "logits", row_stride: 2, cols: 3 });
    assert!(err.to_string().contains("must be at least cols"));
}

#[test]
fn empty_input() {
    for shape in [RowShape::new(0, 3), RowShape::new(3, 0)] {
        let err = forward(&[], shape, 0, LogSoftmaxOptions::default()).unwrap_err();
        assert!(matches!(err, Error::EmptyInput { what: "logits", .. }), "{err}");
        assert!(reference::log_softmax::<f32>(&[], shape, &LogSoftmaxOptions::default()).is_err());
    }
}

#[test]
fn too_large() {
    let shape = RowShape::new(1, i32::MAX as usize + 1);
    let err = forward(&[], shape, 0, LogSoftmaxOptions::default()).unwrap_err();
    assert!(matches!(err, Error::TooLarge { what: "cols", .. }), "{err}");
    let shape = RowShape::new(usize::MAX / 2, 4);
    assert!(matches!(forward(&[], shape, 0, LogSoftmaxOptions::default()), Err(Error::TooLarge { .. })));
}

#[test]
fn target_out_of_range() {
    assert!(validate_targets(&[0i32, 999, -100], 1000, Some(-100)).is_ok());
    assert_eq!(
        validate_targets(&[0i64, -1], 1000, None).unwrap_err(),
        Error::TargetOutOfRange { row: 1, target: -1, vocab: 1000 }
    );
    assert_eq!(
        validate_targets(&[3u32, 1000], 1000, Some(-100)).unwrap_err(),
        Error::TargetOutOfRange { row: 1, target: 1000, vocab: 1000 }
    );
}

#[test]
fn unsupported_dtype() {
    let err = "f64".parse::<DType>().unwrap_err();
    assert!(matches!(err, Error::UnsupportedDtype { .. }));
    assert!(err.to_string().contains("f32, f16, bf16"));
    assert_eq!("bfloat16".parse::<DType>().unwrap(), DType::BF16);
    assert!(matches!(DType::from_dlpack(0, 32, 1), Err(Error::UnsupportedDtype { .. }))); // int32
}

#[test]
fn invalid_option() {
    for tau in [0.0f32, -1.0, f32::NAN, f32::INFINITY, 1e-40] {
        let err = forward(&[0.0; 2], RowShape::new(1, 2), 2, LogSoftmaxOptions::default().temperature(tau))
            .unwrap_err();
        assert!(matches!(err, Error::InvalidOption { name: "temperature", .. }), "tau={tau}: {err}");
    }
}

#[test]
fn invalid_row() {
    let ninf = f32::NEG_INFINITY;
    for (row, problem) in [
        ([ninf, ninf], RowProblem::AllNegInf),
        ([f32::NAN, 0.0], RowProblem::NaN),
        ([f32::INFINITY, 0.0], RowProblem::PosInf),
    ] {
        let err = forward(&row, RowShape::new(1, 2), 2, LogSoftmaxOptions::default()).unwrap_err();
        assert_eq!(err, Error::InvalidRow { op: "log_softmax", row: 0, problem });
    }
    let mut grad = [0.0f32; 2];
    let err = cpu::log_softmax_backward(
        &[-0.5, -1.0],
        &[f32::NAN, 0.0],
        RowShape::new(1, 2),
        &mut grad,
        &LogSoftmaxOptions::default(),
    );
    assert!(matches!(err, Err(Error::InvalidRow { problem: RowProblem::GradNonFinite, .. })));
}

/// No driver, no device, kernels not built, driver error: which of them this machine can
/// show depends on the machine, so each branch asserts the variant it must produce.
#[cfg(feature = "cuda")]
#[test]
fn cuda_environment_errors() {
    use rlhf_kernels::cuda::{self, CudaDevice};
    use rlhf_kernels::{Backend, CudaUnavailable};
    let first = CudaDevice::new(0);
    if !cuda::kernels_built() {
        assert_eq!(first.unwrap_err(), Error::KernelsNotBuilt);
        assert_eq!(Backend::best_with_reason().1, Some(CudaUnavailable::KernelsNotBuilt));
        return;
    }
    match first {
        Err(Error::NoDriver) => {
            assert_eq!(Backend::best_with_reason().1, Some(CudaUnavailable::NoDriver));
            // The raw layer reports the missing driver as well, it does not panic.
            let args = cuda::raw::LogSoftmaxArgs {
                logits: 1,
                dtype: DType::F32,
                shape: RowShape::new(1, 1),
                out: 1,
                status: 1,
            };
            let stream = cuda::raw::RawStream { ordinal: 0, stream: std::ptr::null_mut() };
            // SAFETY: with no driver the call returns before touching any pointer.
            let err = unsafe { cuda::raw::log_softmax(stream, &args, &LogSoftmaxOptions::default()) };
            assert_eq!(err.unwrap_err(), Error::NoDriver);
        }
        Err(Error::NoDevice { ordinal: 0, count: 0 }) => {
            assert_eq!(Backend::best_with_reason().1, Some(CudaUnavailable::NoDevice));
        }
        Ok(_) => {
            let err = CudaDevice::new(999).unwrap_err();
            assert!(matches!(err, Error::NoDevice { ordinal: 999, .. }), "{err}");
            assert!(Backend::best().is_cuda());
        }
        Err(other) => panic!("unexpected error opening device 0: {other}"),
    }
}

#[cfg(feature = "cuda")]
#[test]
fn driver_error_from_a_corrupt_status_word() {
    let err = rlhf_kernels::cuda::raw::decode_status(0x1234_00ff).unwrap_err();
    assert!(matches!(err, Error::Driver { during: "decoding the status word", .. }), "{err}");
}

#[test]
fn layout() {
    let err = RowBlocks::new(&[4, 10], &[1, 4], 0, "logits").unwrap_err();
    assert!(matches!(err, Error::Layout { what: "logits", .. }), "{err}");
    assert!(err.to_string().contains("unit stride"), "{err}");
    let err = RowBlocks::new(&[], &[], 0, "logits").unwrap_err();
    assert!(err.to_string().contains("scalar"), "{err}");
    let err = RowBlocks::new(&[4, 10], &[10], 0, "logits").unwrap_err();
    assert!(matches!(err, Error::Layout { .. }), "{err}");
}
