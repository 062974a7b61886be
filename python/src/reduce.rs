//! Batch reductions over the valid tokens of a `[B, T]` batch: the loss aggregation of any
//! per-token values, masked moments and whitening.

use pyo3::prelude::*;
use rlhf_kernels::cpu;
use rlhf_kernels::{BatchCounts, RowShape, WhitenOptions};

use crate::batch::{batch_dims, parse_aggregation, parse_normaliser};
use crate::cuda;
use crate::dl::{Dl, Kind, Place, check_together, err};

/// The `[B, T]` float32 `values`, its optional byte mask, and a float64 output of `words`.
fn import<'a>(
    values: &Bound<'a, PyAny>,
    mask: Option<&Bound<'a, PyAny>>,
    out: &Bound<'a, PyAny>,
    words: usize,
    stream: usize,
) -> PyResult<(Dl, Option<Dl>, Dl, RowShape)> {
    let values = Dl::import(values, stream, "values")?;
    let dims = batch_dims(&values)?;
    values.per_row(&dims)?.expect(&[Kind::F32])?;
    let mask = Dl::maybe(mask, stream, "mask")?;
    if let Some(m) = &mask {
        m.per_row(&dims)?.expect(&[Kind::Byte])?;
    }
    let out = Dl::import(out, stream, "out")?;
    out.per_row(&[words])?.expect(&[Kind::F64])?;
    Ok((values, mask, out, RowShape::new(dims[0], dims[1])))
}

/// Aggregates the masked float32 `[B, T]` `values` with `aggregation` (the loss aggregation
/// modes of the policy loss) into `out`: float64 `[value, valid tokens, valid sequences,
/// sequences]`. A NaN value is an error; infinities of one sign give that infinity.
#[pyfunction]
#[pyo3(signature = (values, out, *, mask=None, aggregation="token_mean", max_len=0, global_counts=None, status=None, stream=0))]
#[allow(clippy::too_many_arguments)]
pub fn aggregate(
    py: Python<'_>,
    values: &Bound<'_, PyAny>,
    out: &Bound<'_, PyAny>,
    mask: Option<&Bound<'_, PyAny>>,
    aggregation: &str,
    max_len: usize,
    global_counts: Option<(f64, f64, f64)>,
    status: Option<&Bound<'_, PyAny>>,
    stream: usize,
) -> PyResult<()> {
    let agg = parse_aggregation(aggregation, max_len)?;
    let norm = parse_normaliser(global_counts);
    let (values, mask, out, shape) = import(values, mask, out, 4, stream)?;
    let place = check_together(&[Some(&values), mask.as_ref()], &[Some(&out)])?;
    match place {
        Place::Cpu => {
            // SAFETY: dtypes and shapes checked above; `out` overlaps no other tensor.
            let (v, m, o) =
                unsafe { (values.elems::<f32>(), mask.as_ref().map(|m| m.bytes()), out.elems_mut()) };
            let value = py.detach(move || agg.aggregate(v, shape, m, norm)).map_err(err)?;
            let c = BatchCounts::of(shape, m);
            o.copy_from_slice(&[value, c.valid_tokens, c.valid_sequences, c.sequences]);
            Ok(())
        }
        Place::Cuda(ordinal) => {
            let op = cuda::Reduction::Aggregate(agg, norm);
            cuda::reduction(ordinal, stream, status, shape, &values, mask.as_ref(), &out, op)
        }
    }
}

/// Count, mean, unbiased variance, min and max of the valid tokens of the float32 `[B, T]`
/// `values` into `out` (float64 `[5]`), deterministic.
#[pyfunction]
#[pyo3(signature = (values, out, *, mask=None, status=None, stream=0))]
pub fn masked_moments(
    py: Python<'_>,
    values: &Bound<'_, PyAny>,
    out: &Bound<'_, PyAny>,
    mask: Option<&Bound<'_, PyAny>>,
    status: Option<&Bound<'_, PyAny>>,
    stream: usize,
) -> PyResult<()> {
    let (values, mask, out, shape) = import(values, mask, out, 5, stream)?;
    let place = check_together(&[Some(&values), mask.as_ref()], &[Some(&out)])?;
    match place {
        Place::Cpu => {
            // SAFETY: dtypes and shapes checked above; `out` overlaps no other tensor.
            let (v, m, o) =
                unsafe { (values.elems::<f32>(), mask.as_ref().map(|m| m.bytes()), out.elems_mut()) };
            let mo = py.detach(move || cpu::masked_moments(v, shape, m)).map_err(err)?;
            o.copy_from_slice(&[mo.count, mo.mean, mo.var, mo.min, mo.max]);
            Ok(())
        }
        Place::Cuda(ordinal) => cuda::reduction(
            ordinal,
            stream,
            status,
            shape,
            &values,
            mask.as_ref(),
            &out,
            cuda::Reduction::Moments,
        ),
    }
}

/// Whitens the valid tokens of the float32 `[B, T]` `values` in place (`(x − mean)/sqrt(var +
/// eps)`, the mean added back with `keep_mean`; masked tokens become 0), with the moments it
/// used into `moments` (float64 `[5]`).
#[pyfunction]
#[pyo3(signature = (values, moments, *, mask=None, keep_mean=false, eps=1e-8, status=None, stream=0))]
#[allow(clippy::too_many_arguments)]
pub fn whiten(
    py: Python<'_>,
    values: &Bound<'_, PyAny>,
    moments: &Bound<'_, PyAny>,
    mask: Option<&Bound<'_, PyAny>>,
    keep_mean: bool,
    eps: f32,
    status: Option<&Bound<'_, PyAny>>,
    stream: usize,
) -> PyResult<()> {
    let opts = WhitenOptions::default().keep_mean(keep_mean).eps(eps);
    let (values, mask, out, shape) = import(values, mask, moments, 5, stream)?;
    // `values` is written in place: an output that overlaps nothing but itself.
    let place = check_together(&[mask.as_ref()], &[Some(&values), Some(&out)])?;
    match place {
        Place::Cpu => {
            // SAFETY: dtypes and shapes checked above; `values` and `out` overlap no other
            // tensor, and each is one mutable slice.
            let (v, m, o) =
                unsafe { (values.elems_mut::<f32>(), mask.as_ref().map(|m| m.bytes()), out.elems_mut()) };
            let mo = py.detach(move || cpu::whiten(v, shape, m, &opts)).map_err(err)?;
            o.copy_from_slice(&[mo.count, mo.mean, mo.var, mo.min, mo.max]);
            Ok(())
        }
        Place::Cuda(ordinal) => {
            let op = cuda::Reduction::Whiten(&opts);
            cuda::reduction(ordinal, stream, status, shape, &values, mask.as_ref(), &out, op)
        }
    }
}
