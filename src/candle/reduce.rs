//! Batch reductions over the valid tokens of a `[B, T]` candle batch: the loss aggregation of
//! any per-token values (with candle autograd), masked moments and whitening.

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Result, Shape, Storage, Tensor, bail};

use super::losses::batch_dims;
use super::storage::{cpu_side, flat, guard, per_row, tensor};
use super::to_candle;
use crate::{Aggregation, BatchCounts, Moments, Normaliser, RowShape, WhitenOptions, cpu};

/// Aggregates the per-token `values` (f32, `[B, T]`) over the valid tokens (`mask`, `u8`) as
/// the losses do: `Σ_{i,t} mask·w_i·values[i, t]` with the weight `w_i` of `aggregation` under
/// `norm` ([`Aggregation::token_weight`]): the token mean, the mean over sequences of their sum
/// or mean, or each sequence's sum over `max_len`. An f32 scalar (shape `[]`), differentiable
/// in `values` (each valid token's gradient is its weight). A NaN value is an error; infinities
/// of one sign give that infinity.
///
/// ```
/// use candle_core::{Device, Tensor, Var};
/// use rlhf_kernels::{Aggregation, Normaliser};
/// let dev = Device::Cpu;
/// let values = Var::new(&[[1.0f32, 3.0], [2.0, 0.0]], &dev)?;
/// let mask = Tensor::new(&[[1u8, 1], [1, 0]], &dev)?;
/// let mean = rlhf_kernels::candle::aggregate(&values, Some(&mask), Aggregation::SeqMeanTokenMean, Normaliser::Local)?;
/// assert_eq!(mean.to_scalar::<f32>()?, 2.0); // (2 + 2) / 2 sequences
/// let grads = mean.backward()?;
/// assert_eq!(grads.get(&values).unwrap().to_vec2::<f32>()?, vec![vec![0.25, 0.25], vec![0.5, 0.0]]);
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn aggregate(
    values: &Tensor,
    mask: Option<&Tensor>,
    aggregation: Aggregation,
    norm: Normaliser,
) -> Result<Tensor> {
    let dims = batch_dims(values, "values")?;
    let values = per_row(values, &dims, values, &[DType::F32], "values")?;
    let mask = mask.map(|m| per_row(m, &dims, &values, &[DType::U8], "mask")).transpose()?;
    let op = AggregateOp {
        aggregation,
        norm,
        shape: RowShape::new(dims[0], dims[1]),
        mask,
        counts: Arc::default(),
    };
    values.apply_op1(op)
}

pub(super) struct AggregateOp {
    aggregation: Aggregation,
    norm: Normaliser,
    shape: RowShape,
    mask: Option<Tensor>,
    /// The batch's own counts, from the forward (the backward's denominators).
    counts: Arc<Mutex<Option<BatchCounts>>>,
}

impl CustomOp1 for AggregateOp {
    fn name(&self) -> &'static str {
        "rlhf-kernels-aggregate"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let n = self.shape.len();
        let mask_guard = guard(self.mask.as_ref());
        let m = cpu_side::<u8>(&mask_guard, n, "mask")?;
        let v = flat::<f32>(s, l, n, "values")?;
        let value = self.aggregation.aggregate(v, self.shape, m, self.norm).map_err(to_candle)?;
        *self.counts.lock().unwrap_or_else(|e| e.into_inner()) = Some(BatchCounts::of(self.shape, m));
        Ok((CpuStorage::F32(vec![value as f32]), Shape::from(())))
    }

    #[cfg(feature = "candle-cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        Ok((gpu::aggregate(self, (s, l))?, Shape::from(())))
    }

    /// `mask·w_i` per token (candle ops on the tensors' device), scaled by the upstream gradient.
    fn bwd(&self, values: &Tensor, _out: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let Some(local) = *self.counts.lock().unwrap_or_else(|e| e.into_inner()) else {
            bail!("aggregate: the forward left no counts")
        };
        let c = self.norm.counts(local);
        let m = match &self.mask {
            Some(m) => m.to_dtype(DType::F32)?,
            None => values.ones_like()?,
        };
        let inv = |d: f64| if d > 0.0 { 1.0 / d } else { 0.0 };
        let w = match self.aggregation {
            Aggregation::TokenMean => (m * inv(c.valid_tokens))?,
            Aggregation::SeqMeanTokenSum => (m * inv(c.valid_sequences))?,
            Aggregation::SeqMeanTokenMean => {
                // 1/(valid sequences · the row's valid tokens); an empty row has mask 0.
                let row_valid = m.sum_keepdim(1)?.maximum(1.0)?;
                (m.broadcast_div(&row_valid)? * inv(c.valid_sequences))?
            }
            Aggregation::SeqMeanTokenSumNorm { max_len } => (m * inv(c.sequences * max_len as f64))?,
        };
        Ok(Some(w.broadcast_mul(grad)?))
    }
}

/// Count, mean, unbiased variance, min and max of the valid tokens of `values` (f32, `[B, T]`;
/// `mask` `u8`), in f64 and a fixed order (deterministic); read to the host.
///
/// ```
/// use candle_core::{Device, Tensor};
/// let values = Tensor::new(&[[1.0f32, 3.0], [5.0, 100.0]], &Device::Cpu)?;
/// let mask = Tensor::new(&[[1u8, 1], [1, 0]], &Device::Cpu)?;
/// let m = rlhf_kernels::candle::masked_moments(&values, Some(&mask))?;
/// assert_eq!((m.count, m.mean, m.var, m.max), (3.0, 3.0, 4.0, 5.0));
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn masked_moments(values: &Tensor, mask: Option<&Tensor>) -> Result<Moments> {
    let (values, mask, shape) = inputs(values, mask)?;
    let guards = [guard(Some(&values)), guard(mask.as_ref())];
    match values.device() {
        Device::Cpu => {
            let n = shape.len();
            let Some(v) = cpu_side::<f32>(&guards[0], n, "values")? else { bail!("values: missing") };
            cpu::masked_moments(v, shape, cpu_side::<u8>(&guards[1], n, "mask")?).map_err(to_candle)
        }
        #[cfg(feature = "candle-cuda")]
        Device::Cuda(_) => gpu::moments(&guards, shape, None).map(|(m, _)| m),
        other => bail!("masked_moments: unsupported device {:?}", other.location()),
    }
}

/// Whitening over the valid tokens (verl's `masked_whiten`): `(x − mean)/sqrt(var + ε)` with
/// the unbiased variance, the mean added back with `opts.keep_mean`; padding becomes 0. A new
/// f32 tensor (no autograd: advantages are constants of the update), and the moments it used.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use rlhf_kernels::WhitenOptions;
/// let values = Tensor::new(&[[1.0f32, 3.0]], &Device::Cpu)?;
/// let (w, m) = rlhf_kernels::candle::whiten(&values, None, &WhitenOptions::default().eps(0.0))?;
/// assert_eq!(m.mean, 2.0);
/// let w = w.to_vec2::<f32>()?;
/// assert!((w[0][0] + 0.70710677).abs() < 1e-6 && (w[0][1] - 0.70710677).abs() < 1e-6);
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn whiten(values: &Tensor, mask: Option<&Tensor>, opts: &WhitenOptions) -> Result<(Tensor, Moments)> {
    let (values, mask, shape) = inputs(values, mask)?;
    let guards = [guard(Some(&values)), guard(mask.as_ref())];
    match values.device() {
        Device::Cpu => {
            let n = shape.len();
            let Some(v) = cpu_side::<f32>(&guards[0], n, "values")? else { bail!("values: missing") };
            let mut out = v.to_vec();
            let m = cpu::whiten(&mut out, shape, cpu_side::<u8>(&guards[1], n, "mask")?, opts)
                .map_err(to_candle)?;
            Ok((tensor(Storage::Cpu(CpuStorage::F32(out)), (shape.rows, shape.cols)), m))
        }
        #[cfg(feature = "candle-cuda")]
        Device::Cuda(_) => {
            let (m, t) = gpu::moments(&guards, shape, Some(opts))?;
            Ok((t.expect("whitened"), m))
        }
        other => bail!("whiten: unsupported device {:?}", other.location()),
    }
}

fn inputs(values: &Tensor, mask: Option<&Tensor>) -> Result<(Tensor, Option<Tensor>, RowShape)> {
    let dims = batch_dims(values, "values")?;
    let values = per_row(values, &dims, values, &[DType::F32], "values")?;
    let mask = mask.map(|m| per_row(m, &dims, &values, &[DType::U8], "mask")).transpose()?;
    Ok((values, mask, RowShape::new(dims[0], dims[1])))
}

#[cfg(feature = "candle-cuda")]
mod gpu {
    use candle_core::cuda_backend::CudaStorage;
    use candle_core::{Layout, Result, Storage, Tensor, bail};

    use super::super::storage::{Guard, check, cuda_side, flat_view, guard, stream_of, tensor};
    use super::super::to_candle;
    use super::AggregateOp;
    use crate::cuda::{self, DeviceStats};
    use crate::{Aggregated, Moments, RowShape, WhitenOptions};

    pub(super) fn aggregate(op: &AggregateOp, (values, vl): (&CudaStorage, &Layout)) -> Result<CudaStorage> {
        let n = op.shape.len();
        let (stream, mut ctx) = stream_of(values)?;
        let mask_guard = guard(op.mask.as_ref());
        let mask =
            cuda_side(&mask_guard, "mask")?.map(|(m, l)| flat_view::<u8>(m, l, n, "mask")).transpose()?;
        let v = flat_view::<f32>(values, vl, n, "values")?;
        let mut out = DeviceStats::<Aggregated>::new(&stream).map_err(to_candle)?;
        cuda::aggregate(&mut ctx, &v, op.shape, mask.as_ref(), op.aggregation, op.norm, &mut out)
            .map_err(to_candle)?;
        check(ctx)?;
        let a = out.read(&stream).map_err(to_candle)?;
        *op.counts.lock().unwrap_or_else(|e| e.into_inner()) = Some(a.counts);
        let dev = &values.device;
        let s = dev.cuda_stream().clone_htod(&[a.value as f32]).map_err(|e| {
            candle_core::Error::msg(format!("aggregate: copying the value to the device: {e:?}"))
        })?;
        Ok(CudaStorage::wrap_cuda_slice(s, dev.clone()))
    }

    /// The moments of the values, and with `whiten` a whitened copy of them.
    pub(super) fn moments(
        guards: &[Guard<'_>; 2],
        shape: RowShape,
        whiten: Option<&WhitenOptions>,
    ) -> Result<(Moments, Option<Tensor>)> {
        let n = shape.len();
        let Some((v, vl)) = cuda_side(&guards[0], "values")? else { bail!("values: missing") };
        let mask =
            cuda_side(&guards[1], "mask")?.map(|(m, l)| flat_view::<u8>(m, l, n, "mask")).transpose()?;
        let (stream, mut ctx) = stream_of(v)?;
        let view = flat_view::<f32>(v, vl, n, "values")?;
        let mut m = DeviceStats::<Moments>::new(&stream).map_err(to_candle)?;
        let whitened = match whiten {
            Some(opts) => {
                let mut out = stream
                    .clone_dtod(&view)
                    .map_err(|e| candle_core::Error::msg(format!("whiten: copying the values: {e:?}")))?;
                cuda::whiten(&mut ctx, &mut out, shape, mask.as_ref(), &mut m, opts).map_err(to_candle)?;
                Some(out)
            }
            None => {
                cuda::masked_moments(&mut ctx, &view, shape, mask.as_ref(), &mut m).map_err(to_candle)?;
                None
            }
        };
        check(ctx)?;
        let moments = m.read(&stream).map_err(to_candle)?;
        let dev = &v.device;
        let t = whitened.map(|w| {
            tensor(Storage::Cuda(CudaStorage::wrap_cuda_slice(w, dev.clone())), (shape.rows, shape.cols))
        });
        Ok((moments, t))
    }
}
