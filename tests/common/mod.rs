//! Shared sweeps for the per-backend test files: the same shapes, inputs and tolerances for
//! the CPU and the CUDA backend, each held to the f64 reference.
#![allow(dead_code)] // each test file uses part of this module

pub mod advantages;
#[cfg(feature = "candle")]
pub mod candle;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod gpu;
pub mod hostile;
pub mod kl;
pub mod ppo;
pub mod tokens;

use rlhf_kernels::testing::{Rng, Tolerance, assert_close};
use rlhf_kernels::{DType, Element, LogSoftmaxOptions, Result, RowShape, reference};

/// Vocabulary sizes: tiny, odd, around the vector width and block sizes, real vocabularies.
pub const VOCABS: &[usize] = &[1, 2, 3, 31, 127, 128, 129, 1000, 32000, 151936];
pub const ROWS: &[usize] = &[1, 7, 64];

/// `RLHF_KERNELS_TEST_SHAPES=small` keeps the sweep short (sanitizer runs).
pub fn small() -> bool {
    std::env::var("RLHF_KERNELS_TEST_SHAPES").is_ok_and(|v| v == "small")
}

/// Every (rows, V) of the sweep, dense and with a row stride of V + 3 (rows then start at
/// addresses that are not 16-byte aligned, which exercises the kernels' scalar path). The small
/// set keeps a V wider than the 32768 elements a CUDA log-softmax block holds in registers.
pub fn shapes() -> Vec<RowShape> {
    let (vocabs, rows): (&[usize], &[usize]) =
        if small() { (&[1, 3, 129, 1000, 32000, 40001], &[1, 7]) } else { (VOCABS, ROWS) };
    let mut out = Vec::new();
    for &v in vocabs {
        for &n in rows {
            out.push(RowShape::new(n, v));
            out.push(RowShape::new(n, v).with_row_stride(v + 3));
        }
    }
    out
}

/// Largest |logit / τ| of the valid part of a batch: the scale of the absolute tolerance.
pub fn input_scale<T: Element>(logits: &[T], shape: RowShape, tau: f32) -> f64 {
    (0..shape.rows)
        .flat_map(|r| logits[shape.row_range(r)].iter())
        .map(|x| x.to_f64().abs() / tau as f64)
        .filter(|x| x.is_finite())
        .fold(0.0, f64::max)
}

/// A forward implementation under test: logits and shape in, dense f32 out.
pub trait Forward {
    fn forward<T: Element>(
        &self,
        logits: &[T],
        shape: RowShape,
        opts: &LogSoftmaxOptions,
    ) -> Result<Vec<f32>>;
}

/// A backward implementation under test: forward output, upstream gradient, grad shape.
pub trait Backward {
    fn backward<T: Element>(
        &self,
        out: &[f32],
        grad_out: &[f32],
        shape: RowShape,
        opts: &LogSoftmaxOptions,
    ) -> Result<Vec<T>>;
}

/// Forward and backward of `shape` in dtype `T` against the reference.
pub fn check_shape<T: Element>(
    fwd: &impl Forward,
    bwd: &impl Backward,
    shape: RowShape,
    tau: f32,
    seed: u64,
) {
    let mut rng = Rng::new(seed);
    let logits: Vec<T> = rng.logits(shape, 4.0);
    let opts = LogSoftmaxOptions::default().temperature(tau);
    let what = format!("{} {:?} tau={tau}", T::DTYPE, shape);

    let expected = reference::log_softmax(&logits, shape, &opts).unwrap();
    let out = fwd.forward(&logits, shape, &opts).unwrap();
    let tol = Tolerance::for_dtype(DType::F32).scaled(input_scale(&logits, shape, tau));
    assert_close(&out, &expected, tol, &format!("forward {what}"));

    let grad_out = rng.normals(shape.len(), 1.0);
    let expected = reference::log_softmax_backward(&logits, shape, &grad_out, &opts).unwrap();
    let grad: Vec<T> = bwd.backward(&out, &grad_out, shape, &opts).unwrap();
    let dense: Vec<T> = (0..shape.rows).flat_map(|r| grad[shape.row_range(r)].iter().copied()).collect();
    let scale = expected.iter().fold(0.0f64, |m, x| m.max(x.abs()));
    let tol = Tolerance::for_dtype(T::DTYPE).scaled(scale);
    assert_close(&dense, &expected, tol, &format!("backward {what}"));
}

/// The whole sweep for one dtype, with τ = 1 and a non-trivial τ on alternate shapes.
pub fn sweep<T: Element>(fwd: &impl Forward, bwd: &impl Backward) {
    for (i, shape) in shapes().into_iter().enumerate() {
        let tau = if i % 2 == 0 { 1.0 } else { 0.7 };
        check_shape::<T>(fwd, bwd, shape, tau, 1000 + i as u64);
    }
}

/// Rows with banned tokens, huge-but-finite logits and a temperature, against the reference.
pub fn hostile_rows() -> (Vec<f32>, RowShape) {
    let ninf = f32::NEG_INFINITY;
    #[rustfmt::skip]
    let rows = vec![
        ninf, 0.0, ninf, ninf, ninf,       // one allowed token: logp 0
        1e30, 1e30, -1e30, ninf, 0.0,      // huge logits: two tokens share the mass
        -50.0, -50.0, -50.0, -50.0, -50.0, // uniform, far from 0
        88.0, 89.0, 90.0, ninf, -88.0,     // exp would overflow without the max shift
    ];
    (rows, RowShape::new(4, 5))
}

/// Inputs whose only defect is in `bad_row` of a 4-row batch, and the problem it should give.
pub fn bad_batches() -> Vec<(Vec<f32>, usize, rlhf_kernels::RowProblem)> {
    use rlhf_kernels::RowProblem::*;
    let good = [0.5f32, -1.0, 2.0];
    let ninf = f32::NEG_INFINITY;
    let mut cases = Vec::new();
    for (bad, row, problem) in [
        ([ninf, ninf, ninf], 2, AllNegInf),
        ([0.0, f32::NAN, 1.0], 1, NaN),
        ([0.0, f32::INFINITY, 1.0], 3, PosInf),
        ([f32::NAN, f32::INFINITY, ninf], 0, NaN),
        ([f32::NAN, f32::NAN, f32::NAN], 1, NaN),
        ([f32::NAN, ninf, ninf], 2, NaN),
    ] {
        let mut v = Vec::new();
        for r in 0..4 {
            v.extend_from_slice(if r == row { &bad } else { &good });
        }
        cases.push((v, row, problem));
    }
    cases
}

/// One `#[test]` per shared CUDA test body `gpu::$name(&Gpu)` of the including file: it runs on
/// the device of `cuda_or_skip!` (which skips visibly without one, or fails under
/// `RLHF_KERNELS_REQUIRE_GPU=1`).
#[allow(unused_macros)] // the CPU test files include this module too
macro_rules! gpu_test {
    ($name:ident) => {
        #[test]
        fn $name() {
            let device = cuda_or_skip!();
            #[cfg(feature = "cuda")]
            gpu::$name(&common::gpu::Gpu(device.stream().clone()));
            #[cfg(not(feature = "cuda"))]
            let _ = device;
        }
    };
}
