//! The CPU log-softmax held to the f64 reference: every listed shape and dtype, hostile
//! values, errors, determinism and batch invariance.

mod common;

use common::cpu::Cpu;
use common::{Backward, Forward};
use proptest::prelude::*;
use rlhf_kernels::testing::{Rng, Tolerance, assert_close};
use rlhf_kernels::{DType, Error, LogSoftmaxOptions, RowProblem, RowShape, bf16, cpu, f16, reference};

#[test]
fn sweep_f32() {
    common::sweep::<f32>(&Cpu, &Cpu);
}

#[test]
fn sweep_f16() {
    common::sweep::<f16>(&Cpu, &Cpu);
}

#[test]
fn sweep_bf16() {
    common::sweep::<bf16>(&Cpu, &Cpu);
}

#[test]
fn hostile_but_valid_rows_match_the_reference() {
    let (logits, shape) = common::hostile_rows();
    for tau in [1.0f32, 0.5, 3.0] {
        let opts = LogSoftmaxOptions::default().temperature(tau);
        let expected = reference::log_softmax(&logits, shape, &opts).unwrap();
        let out = Cpu.forward(&logits, shape, &opts).unwrap();
        assert_eq!(out[1], 0.0, "a single allowed token has log-probability 0");
        assert_eq!(out[0], f32::NEG_INFINITY, "a banned token has log-probability -inf");
        let tol = Tolerance::for_dtype(DType::F32).scaled(90.0 / tau as f64);
        // Row 1 mixes ±1e30: compare it on its own scale.
        assert_close(&out[..5], &expected[..5], tol, "row 0");
        assert_close(&out[5..7], &expected[5..7], tol, "row 1, the two 1e30 logits");
        assert_close(&out[10..], &expected[10..], tol, "rows 2 and 3");
        approx::assert_relative_eq!(out[7] as f64, expected[7], max_relative = 1e-6);
    }
}

#[test]
fn gap_between_huge_logits_overflows_to_minus_infinity_not_nan() {
    // (x - max) is -6e38 here: beyond f32, so the log-probability rounds to -inf.
    let logits = [3e38f32, 0.0, -3e38];
    let out = Cpu.forward(&logits, RowShape::new(1, 3), &LogSoftmaxOptions::default()).unwrap();
    assert_eq!(out, vec![0.0, -3e38, f32::NEG_INFINITY]);
}

#[test]
fn rows_without_a_defined_result_are_reported() {
    for (logits, row, problem) in common::bad_batches() {
        let err = Cpu.forward(&logits, RowShape::new(4, 3), &LogSoftmaxOptions::default()).unwrap_err();
        assert_eq!(err, Error::InvalidRow { op: "log_softmax", row, problem });
        let err =
            reference::log_softmax(&logits, RowShape::new(4, 3), &LogSoftmaxOptions::default()).unwrap_err();
        assert_eq!(err, Error::InvalidRow { op: "log_softmax", row, problem });
    }
}

#[test]
fn the_lowest_bad_row_is_reported() {
    let shape = RowShape::new(300, 7);
    let mut logits: Vec<f32> = Rng::new(5).logits(shape, 1.0);
    for r in [250, 97, 180] {
        logits[shape.row_range(r)].fill(f32::NEG_INFINITY);
    }
    let err = Cpu.forward(&logits, shape, &LogSoftmaxOptions::default()).unwrap_err();
    assert_eq!(err, Error::InvalidRow { op: "log_softmax", row: 97, problem: RowProblem::AllNegInf });
}

#[test]
fn non_finite_upstream_gradients_are_reported() {
    let shape = RowShape::new(3, 4);
    let out =
        Cpu.forward(&Rng::new(1).logits::<f32>(shape, 1.0), shape, &LogSoftmaxOptions::default()).unwrap();
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let mut g = vec![0.25f32; 12];
        g[9] = bad;
        let err = Cpu.backward::<f32>(&out, &g, shape, &LogSoftmaxOptions::default()).unwrap_err();
        let expected =
            Error::InvalidRow { op: "log_softmax_backward", row: 2, problem: RowProblem::GradNonFinite };
        assert_eq!(err, expected);
    }
    let mut nan_out = out.clone();
    nan_out[5] = f32::NAN;
    let err = Cpu.backward::<bf16>(&nan_out, &[0.0; 12], shape, &LogSoftmaxOptions::default()).unwrap_err();
    assert_eq!(err, Error::InvalidRow { op: "log_softmax_backward", row: 1, problem: RowProblem::NaN });
}

#[test]
fn banned_tokens_get_the_upstream_gradient_only() {
    // p = 0 for a -inf logit, so its gradient is g / τ exactly (no 0·inf).
    let logits = [0.0f32, f32::NEG_INFINITY, 1.0];
    let opts = LogSoftmaxOptions::default().temperature(2.0);
    let out = Cpu.forward(&logits, RowShape::new(1, 3), &opts).unwrap();
    let grad: Vec<f32> = Cpu.backward(&out, &[0.5, 3.0, -1.0], RowShape::new(1, 3), &opts).unwrap();
    assert_eq!(grad[1], 1.5);
    assert!(grad.iter().all(|g| g.is_finite()));
}

#[test]
fn bitwise_deterministic_and_batch_invariant() {
    for v in [129usize, 32000, 151936] {
        let shape = RowShape::new(33, v);
        let logits: Vec<bf16> = Rng::new(v as u64).logits(shape, 3.0);
        let opts = LogSoftmaxOptions::default();
        let a = Cpu.forward(&logits, shape, &opts).unwrap();
        let b = Cpu.forward(&logits, shape, &opts).unwrap();
        assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()), "two runs differ at V={v}");
        let alone = Cpu.forward(&logits[shape.row_range(17)], RowShape::new(1, v), &opts).unwrap();
        let in_batch = &a[17 * v..18 * v];
        assert!(
            alone.iter().zip(in_batch).all(|(x, y)| x.to_bits() == y.to_bits()),
            "row 17 alone differs at V={v}"
        );
    }
}

#[test]
fn padding_is_never_written() {
    let shape = RowShape::new(5, 10).with_row_stride(16);
    let mut grad = vec![f16::from_f32(7.0); shape.rows * shape.row_stride];
    let out = vec![-(10f32).ln(); shape.len()];
    cpu::log_softmax_backward(&out, &vec![1.0; shape.len()], shape, &mut grad, &LogSoftmaxOptions::default())
        .unwrap();
    for r in 0..5 {
        assert!(grad[r * 16 + 10..r * 16 + 16].iter().all(|g| g.to_f32() == 7.0));
        assert!(grad[shape.row_range(r)].iter().all(|g| g.to_f32().abs() < 1e-3));
    }
}

fn dtype_strategy() -> impl Strategy<Value = DType> {
    prop_oneof![Just(DType::F32), Just(DType::F16), Just(DType::BF16)]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, .. ProptestConfig::default() })]

    #[test]
    fn random_shapes_match_the_reference(
        rows in 1usize..9, cols in 1usize..3000, pad in 0usize..9, tau in 0.25f32..4.0,
        dtype in dtype_strategy(), seed in any::<u64>(),
    ) {
        let shape = RowShape::new(rows, cols).with_row_stride(cols + pad);
        match dtype {
            DType::F32 => common::check_shape::<f32>(&Cpu, &Cpu, shape, tau, seed),
            DType::F16 => common::check_shape::<f16>(&Cpu, &Cpu, shape, tau, seed),
            DType::BF16 => common::check_shape::<bf16>(&Cpu, &Cpu, shape, tau, seed),
        }
    }
}
