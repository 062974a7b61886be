//! Reading candle tensors where they lie: the rows of a `[..., V]` view as blocks of evenly
//! spaced rows, per-row arrays as contiguous ranges, outputs handed back to candle.

use std::ops::Range;

use candle_core::backend::BackendStorage;
use candle_core::op::BackpropOp;
use candle_core::{CpuStorage, DType, Layout, Result, Shape, Storage, Tensor, WithDType, bail};

use super::to_candle;
use crate::{Error, RowShape};

/// The rows of a `[..., V]` tensor: `offsets.len()` blocks of `shape.rows` rows, each block
/// evenly strided (`shape.row_stride`) and starting at element `offsets[k]` of the storage.
/// Row `k·shape.rows + i` of the tensor (row-major over the leading dimensions) is row `i` of
/// block `k`.
#[derive(Debug)]
pub(crate) struct RowBlocks {
    pub shape: RowShape,
    pub offsets: Vec<usize>,
}

impl RowBlocks {
    /// Splits a `[..., V]` layout into blocks; the last dimension must have unit stride.
    pub fn of(layout: &Layout, what: &'static str) -> Result<Self> {
        let (dims, strides) = (layout.dims(), layout.stride());
        let Some((&cols, lead_dims)) = dims.split_last() else {
            bail!("{what}: expected a tensor [..., V], got a scalar")
        };
        if cols > 1 && strides[dims.len() - 1] != 1 {
            bail!(
                "{what}: the last dimension must have unit stride (it has {}); call .contiguous() first",
                strides[dims.len() - 1]
            )
        }
        let rows: usize = lead_dims.iter().product();
        if rows == 0 || cols == 0 {
            return Err(to_candle(Error::EmptyInput { what, rows, cols }));
        }
        // Leading dimensions of size > 1 (a size-1 dimension's stride is meaningless).
        let lead: Vec<(usize, usize)> =
            lead_dims.iter().zip(strides).filter(|(d, _)| **d != 1).map(|(d, s)| (*d, *s)).collect();
        // The innermost run of dimensions that lays rows out evenly forms a block.
        let (mut block_rows, mut row_stride, mut outer) = (1, cols, lead.len());
        if let Some(&(d, s)) = lead.last() {
            (block_rows, row_stride, outer) = (d, s, lead.len() - 1);
            while outer > 0 && lead[outer - 1].1 == block_rows * row_stride {
                block_rows *= lead[outer - 1].0;
                outer -= 1;
            }
        }
        let shape = RowShape::new(block_rows, cols).with_row_stride(row_stride);
        shape.validate(what).map_err(to_candle)?;
        let mut offsets = vec![layout.start_offset()];
        for &(d, s) in &lead[..outer] {
            offsets = offsets.iter().flat_map(|&o| (0..d).map(move |i| o + i * s)).collect();
        }
        Ok(RowBlocks { shape, offsets })
    }

    /// The same rows as blocks of `rows` rows (`rows` divides `shape.rows`).
    fn split(&self, rows: usize) -> RowBlocks {
        let step = rows * self.shape.row_stride;
        let per = self.shape.rows / rows;
        RowBlocks {
            shape: RowShape::new(rows, self.shape.cols).with_row_stride(self.shape.row_stride),
            offsets: self.offsets.iter().flat_map(|&o| (0..per).map(move |i| o + i * step)).collect(),
        }
    }

    /// Two tensors' rows cut into the same blocks (of `gcd` of their block sizes rows), so that
    /// block `k` of each holds the same tensor rows.
    pub fn aligned(a: RowBlocks, b: RowBlocks) -> (RowBlocks, RowBlocks) {
        if a.shape.rows == b.shape.rows {
            return (a, b);
        }
        let (mut x, mut y) = (a.shape.rows, b.shape.rows);
        while y != 0 {
            (x, y) = (y, x % y);
        }
        (a.split(x), b.split(x))
    }

    /// All rows of the tensor.
    pub fn rows(&self) -> usize {
        self.shape.rows * self.offsets.len()
    }

    /// The tensor rows of block `k`.
    pub fn block_rows(&self, k: usize) -> Range<usize> {
        k * self.shape.rows..(k + 1) * self.shape.rows
    }

    /// The storage elements block `k` spans.
    pub fn block_range(&self, k: usize) -> Range<usize> {
        self.offsets[k]..self.offsets[k] + self.shape.min_len()
    }

    /// Where block `k` goes in a buffer laid out like the blocks but packed one after the other
    /// (`rows() · row_stride` elements): the layout of a gradient with the input's row stride.
    pub fn packed_range(&self, k: usize) -> Range<usize> {
        let len = self.shape.rows * self.shape.row_stride;
        k * len..(k + 1) * len
    }

    /// Turns a packed `[rows(), row_stride]` tensor into the input's shape `dims`, dropping
    /// the padding columns when the rows are strided (the only copy the adapter makes).
    pub fn unpack(&self, packed: Tensor, dims: &[usize]) -> Result<Tensor> {
        if self.shape.row_stride == self.shape.cols {
            packed.reshape(dims)
        } else {
            packed.narrow(1, 0, self.shape.cols)?.contiguous()?.reshape(dims)
        }
    }
}

/// The contiguous elements of a per-row array, checking its length and dtype.
pub(crate) fn flat<'a, T: WithDType>(
    storage: &'a CpuStorage,
    layout: &Layout,
    len: usize,
    what: &'static str,
) -> Result<&'a [T]> {
    Ok(&storage_slice::<T>(storage, what)?[contiguous(layout, len, what)?])
}

/// The whole storage as `T`, or an error naming the input and both dtypes.
pub(crate) fn storage_slice<'a, T: WithDType>(
    storage: &'a CpuStorage,
    what: &'static str,
) -> Result<&'a [T]> {
    check_dtype(storage.dtype(), T::DTYPE, what)?;
    storage.as_slice::<T>()
}

/// The range of a contiguous layout holding exactly `len` elements.
pub(crate) fn contiguous(layout: &Layout, len: usize, what: &'static str) -> Result<Range<usize>> {
    let Some((start, end)) = layout.contiguous_offsets() else {
        bail!("{what}: expected a contiguous tensor")
    };
    if end - start != len {
        bail!("{what}: {} elements, expected {len} (one per row)", end - start)
    }
    Ok(start..end)
}

pub(crate) fn check_dtype(actual: DType, expected: DType, what: &'static str) -> Result<()> {
    if actual != expected {
        bail!("{what}: dtype {actual:?}, expected {expected:?}")
    }
    Ok(())
}

/// Checks that a per-row input has the leading shape of the rows, is on `device` and has
/// `dtype`, and makes it contiguous.
pub(crate) fn per_row(
    t: &Tensor,
    lead: &[usize],
    like: &Tensor,
    dtypes: &[DType],
    what: &'static str,
) -> Result<Tensor> {
    if t.dims() != lead {
        bail!("{what}: shape {:?}, expected {lead:?} (one per row of {:?})", t.dims(), like.dims())
    }
    if !t.device().same_device(like.device()) {
        bail!("{what}: on {:?}, the other inputs on {:?}", t.device().location(), like.device().location())
    }
    if !dtypes.contains(&t.dtype()) {
        bail!("{what}: dtype {:?}, expected one of {dtypes:?}", t.dtype())
    }
    t.contiguous()
}

/// A new tensor (no autograd history) from storage this adapter filled.
pub(crate) fn tensor(storage: Storage, shape: impl Into<Shape>) -> Tensor {
    Tensor::from_storage(storage, shape, BackpropOp::none(), false)
}

/// Runs `$body` with `$T` the Rust type of a floating-point candle dtype this crate computes
/// on (f32, bf16, f16).
macro_rules! with_float {
    ($dtype:expr, $what:expr, $T:ident => $body:expr) => {
        match $dtype {
            candle_core::DType::F32 => {
                type $T = f32;
                $body
            }
            candle_core::DType::BF16 => {
                type $T = half::bf16;
                $body
            }
            candle_core::DType::F16 => {
                type $T = half::f16;
                $body
            }
            other => candle_core::bail!("{}: dtype {other:?}, expected f32, bf16 or f16", $what),
        }
    };
}

/// Runs `$body` with `$I` the Rust type of an integer candle dtype used for token ids.
macro_rules! with_index {
    ($dtype:expr, $what:expr, $I:ident => $body:expr) => {
        match $dtype {
            candle_core::DType::U32 => {
                type $I = u32;
                $body
            }
            candle_core::DType::I64 => {
                type $I = i64;
                $body
            }
            candle_core::DType::I32 => {
                type $I = i32;
                $body
            }
            other => candle_core::bail!("{}: dtype {other:?}, expected u32, i64 or i32", $what),
        }
    };
}

pub(crate) use {with_float, with_index};

/// The token-id dtypes.
pub(crate) const INDEX_DTYPES: [DType; 3] = [DType::U32, DType::I64, DType::I32];

#[cfg(feature = "candle-cuda")]
pub(crate) use gpu::*;

#[cfg(feature = "candle-cuda")]
mod gpu {
    use std::sync::Arc;

    use candle_core::cuda_backend::{CudaDType, CudaStorage};
    use candle_core::{Layout, Result};
    use cudarc::driver::{CudaStream, CudaView};

    use super::{contiguous, to_candle};
    use crate::cuda::{CudaDevice, CudaStatus};

    /// The contiguous elements of a per-row array on the GPU.
    pub(crate) fn flat_view<'a, T: CudaDType + candle_core::WithDType>(
        storage: &'a CudaStorage,
        layout: &Layout,
        len: usize,
        what: &'static str,
    ) -> Result<CudaView<'a, T>> {
        super::check_dtype(storage.dtype(), T::DTYPE, what)?;
        Ok(storage.as_cuda_slice::<T>()?.slice(contiguous(layout, len, what)?))
    }

    /// candle's stream for `storage`, with this crate's kernels loaded into its context, and
    /// a fresh status word.
    pub(crate) fn stream_of(storage: &CudaStorage) -> Result<(Arc<CudaStream>, CudaStatus)> {
        let stream = storage.device.cuda_stream();
        CudaDevice::from_stream(stream.clone()).map_err(to_candle)?;
        let status = CudaStatus::new(&stream).map_err(to_candle)?;
        Ok((stream, status))
    }

    /// Reads the status word of an op (waits for its kernels) and turns a report into an error.
    pub(crate) fn check(stream: &Arc<CudaStream>, mut status: CudaStatus) -> Result<()> {
        status.check(stream).map_err(to_candle)
    }
}
