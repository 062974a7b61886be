//! Loss aggregation on the GPU held to `Aggregation::aggregate` (f64): every mode, local and
//! global normalisers, masks with empty sequences, an all-masked batch, row strides, and the
//! errors. Skips visibly without a GPU; `RLHF_KERNELS_REQUIRE_GPU=1` makes that a failure.

#[macro_use]
mod common;

use rlhf_kernels::cuda_or_skip;

#[cfg(feature = "cuda")]
mod gpu {
    use super::common::gpu::Gpu;
    use std::sync::Arc;

    use rlhf_kernels::Aggregated;
    use rlhf_kernels::cuda::{self, DeviceStats, LaunchContext};
    use rlhf_kernels::cudarc::driver::CudaStream;
    use rlhf_kernels::testing::Rng;
    use rlhf_kernels::{Aggregation, BatchCounts, Error, Normaliser, RowProblem, RowShape};

    const MODES: [Aggregation; 4] = [
        Aggregation::TokenMean,
        Aggregation::SeqMeanTokenSum,
        Aggregation::SeqMeanTokenMean,
        Aggregation::SeqMeanTokenSumNorm { max_len: 300 },
    ];

    fn on_device(
        s: &Arc<CudaStream>,
        values: &[f32],
        shape: RowShape,
        mask: Option<&[u8]>,
        mode: Aggregation,
        norm: Normaliser,
    ) -> rlhf_kernels::Result<(f64, BatchCounts)> {
        let v = s.clone_htod(values).unwrap();
        let m = mask.map(|m| s.clone_htod(m).unwrap());
        let (mut out, mut ctx) = (DeviceStats::<Aggregated>::new(s)?, LaunchContext::new(s)?);
        let m = m.as_ref().map(|m| m.as_view());
        cuda::aggregate(&mut ctx, &v, shape, m.as_ref(), mode, norm, &mut out)?;
        ctx.check()?;
        let a = out.read(s)?;
        Ok((a.value, a.counts))
    }

    pub fn matches_the_host(gpu: &Gpu) {
        let s = &gpu.0;
        let mut rng = Rng::new(17);
        for shape in [
            RowShape::new(1, 1),
            RowShape::new(3, 5).with_row_stride(7),
            RowShape::new(64, 257),
            RowShape::new(1000, 33),
            RowShape::new(5, 4096),
        ] {
            let n = shape.rows * shape.row_stride;
            // Padding between rows is NaN: read it and the result is NaN.
            let mut values = vec![f32::NAN; n];
            let mut mask = vec![0u8; n];
            for r in 0..shape.rows {
                // Every fourth sequence is empty; the others have a random valid prefix.
                let valid = if r % 4 == 3 {
                    0
                } else {
                    1 + (rng.uniform() * shape.cols as f64) as usize % shape.cols
                };
                for t in shape.row_range(r) {
                    values[t] = (rng.normal() * 2.0) as f32;
                    mask[t] = u8::from(t - shape.row_start(r) < valid);
                }
            }
            for mode in MODES {
                for mask in [None, Some(&mask[..])] {
                    let local = BatchCounts::of(shape, mask);
                    let global = Normaliser::Global {
                        valid_tokens: local.valid_tokens * 3.0,
                        valid_sequences: local.valid_sequences * 2.0,
                        sequences: local.sequences * 2.0,
                    };
                    for norm in [Normaliser::Local, global] {
                        let expected = mode.aggregate(&values, shape, mask, norm).unwrap();
                        let (got, counts) = on_device(s, &values, shape, mask, mode, norm).unwrap();
                        // f32 sums within a sequence: error ≤ T·ε·Σ|w·v|.
                        let abs_sum = mode
                            .aggregate(&values.iter().map(|v| v.abs()).collect::<Vec<_>>(), shape, mask, norm)
                            .unwrap();
                        let tol = 1e-6 + (shape.cols as f64 + 8.0) * f32::EPSILON as f64 * abs_sum;
                        assert!(
                            (got - expected).abs() <= tol,
                            "{mode:?} {norm:?} {shape:?} masked={}: {got} vs {expected}",
                            mask.is_some()
                        );
                        assert_eq!(counts, local, "{mode:?} {shape:?}: the batch's own counts");
                        let (again, _) = on_device(s, &values, shape, mask, mode, norm).unwrap();
                        assert_eq!(got.to_bits(), again.to_bits(), "deterministic");
                    }
                }
            }
        }
    }

    pub fn edge_cases(gpu: &Gpu) {
        let s = &gpu.0;
        let shape = RowShape::new(4, 8);
        let values = vec![1.5f32; 32];
        // Every token masked: 0 for every mode, never 0/0.
        for mode in MODES {
            let (v, counts) =
                on_device(s, &values, shape, Some(&[0u8; 32]), mode, Normaliser::Local).unwrap();
            assert_eq!(v, 0.0, "{mode:?}: an empty batch aggregates to 0");
            assert_eq!((counts.valid_tokens, counts.valid_sequences, counts.sequences), (0.0, 0.0, 4.0));
        }
        // Masked NaN and inf are never read.
        let mut hostile = values.clone();
        let mut mask = [1u8; 32];
        (hostile[3], hostile[9], mask[3], mask[9]) = (f32::NAN, f32::INFINITY, 0, 0);
        let (v, _) =
            on_device(s, &hostile, shape, Some(&mask), Aggregation::TokenMean, Normaliser::Local).unwrap();
        assert_eq!(v, 1.5);
    }

    /// Non-finite values at valid tokens: the error the host returns, for the same row.
    pub fn non_finite_values(gpu: &Gpu) {
        let s = &gpu.0;
        let shape = RowShape::new(4, 3);
        let row_of = |e: Error| match e {
            Error::InvalidRow { op: "aggregate", row, problem } => (row, problem),
            e => panic!("{e}"),
        };
        // (planted values, the error: its row and problem, or None for a +inf aggregate)
        type Case<'a> = (&'a [(usize, f32)], Option<(usize, RowProblem)>);
        let cases: [Case; 5] = [
            (&[(7, f32::NAN)], Some((2, RowProblem::NonFinite))),
            (&[(1, f32::INFINITY), (10, f32::NEG_INFINITY)], Some((0, RowProblem::NonFinite))),
            (&[(4, f32::INFINITY), (5, f32::NEG_INFINITY)], Some((1, RowProblem::NonFinite))),
            (&[(4, f32::INFINITY), (9, f32::NAN), (10, f32::NEG_INFINITY)], Some((3, RowProblem::NonFinite))),
            (&[(4, f32::INFINITY), (11, f32::INFINITY)], None),
        ];
        for (planted, expected) in cases {
            let mut values = vec![0.5f32; 12];
            for &(i, v) in planted {
                values[i] = v;
            }
            for mode in MODES {
                let host = mode.aggregate(&values, shape, None, Normaliser::Local);
                let device = on_device(s, &values, shape, None, mode, Normaliser::Local);
                match expected {
                    Some(e) => {
                        assert_eq!(row_of(host.unwrap_err()), e, "{planted:?} {mode:?} host");
                        assert_eq!(row_of(device.unwrap_err()), e, "{planted:?} {mode:?} device");
                    }
                    None => {
                        assert_eq!(host.unwrap(), f64::INFINITY);
                        assert_eq!(device.unwrap().0, f64::INFINITY, "{mode:?}: one sign of inf");
                    }
                }
            }
        }
        // Finite values whose f32 sum within a sequence overflows: the host sums in f64.
        let values = [3e38f32, 3e38, 1.0, 1.0];
        let shape = RowShape::new(2, 2);
        let err = on_device(s, &values, shape, None, Aggregation::SeqMeanTokenSum, Normaliser::Local);
        assert_eq!(row_of(err.unwrap_err()), (0, RowProblem::Overflow));
        assert!(
            Aggregation::SeqMeanTokenSum.aggregate(&values, shape, None, Normaliser::Local).unwrap() > 1e38
        );
    }

    pub fn errors(gpu: &Gpu) {
        let s = &gpu.0;
        let shape = RowShape::new(2, 3);
        let values = vec![0.0f32; 6];
        let local = Normaliser::Local;
        let err = on_device(s, &values[..5], shape, None, Aggregation::TokenMean, local).unwrap_err();
        assert!(matches!(err, Error::ShapeMismatch { .. }), "{err}");
        let err = on_device(s, &values, shape, Some(&[1u8; 4]), Aggregation::TokenMean, local).unwrap_err();
        assert!(matches!(err, Error::ShapeMismatch { .. }), "{err}");
        let norm0 = Aggregation::SeqMeanTokenSumNorm { max_len: 0 };
        let err = on_device(s, &values, shape, None, norm0, local).unwrap_err();
        assert!(matches!(err, Error::InvalidOption { .. }), "{err}");
        let bad = Normaliser::Global { valid_tokens: f64::NAN, valid_sequences: 1.0, sequences: 1.0 };
        let err = on_device(s, &values, shape, None, Aggregation::TokenMean, bad).unwrap_err();
        assert!(matches!(err, Error::InvalidOption { .. }), "{err}");
        let err =
            on_device(s, &values, RowShape::new(0, 3), None, Aggregation::TokenMean, local).unwrap_err();
        assert!(matches!(err, Error::EmptyInput { .. }), "{err}");
    }
}

gpu_test!(matches_the_host);
gpu_test!(edge_cases);
gpu_test!(non_finite_values);
gpu_test!(errors);
