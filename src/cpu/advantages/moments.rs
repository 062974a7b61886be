//! CPU masked moments and whitening (MATH.md §3): Chan's running moments in f64, rows merged
//! in a fixed order (deterministic for any thread count).

use rayon::prelude::*;

use crate::advantages::non_finite;
use crate::error::Op;
use crate::{Moments, Result, RowShape, WhitenOptions};

/// Chan's running moments of a set of values, in f64.
#[derive(Debug, Clone, Copy)]
struct Running {
    n: f64,
    mean: f64,
    m2: f64,
    min: f64,
    max: f64,
}

impl Running {
    const EMPTY: Running = Running { n: 0.0, mean: 0.0, m2: 0.0, min: f64::INFINITY, max: f64::NEG_INFINITY };

    /// Two passes over one row's valid values.
    fn of_row(values: &[f32], mask: Option<&[u8]>) -> Running {
        let valid = || {
            values.iter().enumerate().filter(|(j, _)| mask.is_none_or(|m| m[*j] != 0)).map(|(_, &x)| x as f64)
        };
        let n = valid().count() as f64;
        if n == 0.0 {
            return Running::EMPTY;
        }
        let mean = valid().sum::<f64>() / n;
        let m2 = valid().map(|x| (x - mean) * (x - mean)).sum();
        let (min, max) =
            valid().fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), x| (lo.min(x), hi.max(x)));
        Running { n, mean, m2, min, max }
    }

    fn merge(self, o: Running) -> Running {
        if o.n == 0.0 {
            return self;
        }
        if self.n == 0.0 {
            return o;
        }
        let n = self.n + o.n;
        let d = o.mean - self.mean;
        Running {
            n,
            mean: self.mean + d * (o.n / n),
            m2: self.m2 + o.m2 + d * d * (self.n * o.n / n),
            min: self.min.min(o.min),
            max: self.max.max(o.max),
        }
    }
}

/// Count, mean, unbiased variance, min and max over the valid tokens of a `[B, T]` batch
/// (rows = sequences; mask one byte per token, `None`: all valid). Each row in two f64
/// passes, rows merged in order (Chan): deterministic for any thread count. An empty batch
/// gives [`Moments::EMPTY`].
///
/// Errors: shape errors; [`RowProblem::NonFinite`](crate::RowProblem::NonFinite) for the
/// lowest sequence with a non-finite valid value.
///
/// ```
/// use rlhf_kernels::{cpu, RowShape};
/// let m = cpu::masked_moments(&[1.0, 9.0, 3.0, 5.0], RowShape::new(2, 2), Some(&[1, 0, 1, 1]))?;
/// assert_eq!((m.count, m.mean, m.var, m.min, m.max), (3.0, 3.0, 4.0, 1.0, 5.0));
/// # Ok::<(), rlhf_kernels::Error>(())
/// ```
pub fn masked_moments(values: &[f32], shape: RowShape, mask: Option<&[u8]>) -> Result<Moments> {
    shape.check_buffer("values", values.len())?;
    if let Some(m) = mask {
        shape.check_buffer("mask", m.len())?;
    }
    let rows: Vec<(Running, bool)> = (0..shape.rows)
        .into_par_iter()
        .map(|i| {
            let range = shape.row_range(i);
            let m = mask.map(|m| &m[range.clone()]);
            let r = Running::of_row(&values[range], m);
            (r, r.n == 0.0 || (r.mean.is_finite() && r.m2.is_finite()))
        })
        .collect();
    if let Some(i) = rows.iter().position(|(_, ok)| !ok) {
        return Err(non_finite(Op::Moments, i));
    }
    let r = rows.iter().fold(Running::EMPTY, |acc, (r, _)| acc.merge(*r));
    Ok(if r.n == 0.0 { Moments::EMPTY } else { Moments::from_m2(r.n, r.mean, r.m2, r.min, r.max) })
}

/// Whitens the valid tokens of a `[B, T]` batch in place: `x ← (x − mean)/sqrt(var + ε)`
/// (+ mean with [`WhitenOptions::keep_mean`]) with the batch's [`masked_moments`]; masked
/// tokens become 0. Returns the moments it used. A constant batch with ε = 0 whitens to 0.
///
/// Errors: those of [`masked_moments`], and an invalid ε.
///
/// ```
/// use rlhf_kernels::{cpu, RowShape, WhitenOptions};
/// let mut a = [1.0f32, 7.0, 3.0];
/// let m = cpu::whiten(&mut a, RowShape::new(1, 3), Some(&[1, 0, 1]), &WhitenOptions::default())?;
/// assert_eq!((m.mean, m.var), (2.0, 2.0));
/// assert!((a[0] + 0.70710677).abs() < 1e-6 && a[1] == 0.0 && (a[2] - 0.70710677).abs() < 1e-6);
/// # Ok::<(), rlhf_kernels::Error>(())
/// ```
pub fn whiten(
    values: &mut [f32],
    shape: RowShape,
    mask: Option<&[u8]>,
    opts: &WhitenOptions,
) -> Result<Moments> {
    opts.validate()?;
    let m = masked_moments(values, shape, mask)?;
    let (center, scale, offset) = opts.affine(&m);
    values.par_chunks_mut(shape.row_stride).enumerate().for_each(|(i, row)| {
        let start = shape.row_start(i);
        for (j, x) in row[..shape.cols].iter_mut().enumerate() {
            let valid = mask.is_none_or(|m| m[start + j] != 0);
            *x = if valid { ((*x as f64 - center) * scale + offset) as f32 } else { 0.0 };
        }
    });
    Ok(m)
}
