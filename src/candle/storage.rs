//! Reading candle tensors where they lie: the rows of a `[..., V]` view as blocks of evenly
//! spaced rows, per-row arrays as contiguous ranges, outputs handed back to candle.

use candle_core::backend::BackendStorage;
use candle_core::op::BackpropOp;
use candle_core::{CpuStorage, DType, Layout, Result, Shape, Storage, StorageRef, Tensor, WithDType, bail};

use super::to_candle;
use std::ops::Range;

use crate::RowBlocks;

/// The row blocks of a candle layout (see [`RowBlocks`]).
pub(crate) fn row_blocks(layout: &Layout, what: &'static str) -> Result<RowBlocks> {
    RowBlocks::new(layout.dims(), layout.stride(), layout.start_offset(), what).map_err(to_candle)
}

/// Turns a packed `[rows, row_stride]` gradient (see [`RowBlocks::packed_range`]) into the
/// input's shape `dims`, dropping the padding columns when the rows are strided (the only
/// copy the adapter makes).
pub(crate) fn unpack(blocks: &RowBlocks, packed: Tensor, dims: &[usize]) -> Result<Tensor> {
    if blocks.shape.row_stride == blocks.shape.cols {
        packed.reshape(dims)
    } else {
        packed.narrow(1, 0, blocks.shape.cols)?.contiguous()?.reshape(dims)
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

/// A read lock on an optional side input of an op (a mask, a captured tensor) and its layout.
pub(crate) type Guard<'a> = Option<(StorageRef<'a>, &'a Layout)>;

/// Locks an optional side input for reading.
pub(crate) fn guard(t: Option<&Tensor>) -> Guard<'_> {
    t.map(|t| t.storage_and_layout())
}

/// The contiguous CPU elements of a locked side input (`len` of them), or an error naming it
/// when it lives on another device.
pub(crate) fn cpu_side<'a, T: WithDType>(
    g: &'a Guard<'_>,
    len: usize,
    what: &'static str,
) -> Result<Option<&'a [T]>> {
    match g {
        Some((storage, layout)) => match &**storage {
            Storage::Cpu(s) => Ok(Some(flat::<T>(s, layout, len, what)?)),
            _ => bail!("{what}: on another device than the other inputs"),
        },
        None => Ok(None),
    }
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

    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::{CudaDType, CudaStorage};
    use candle_core::{Layout, Result};
    use cudarc::driver::{CudaStream, CudaView};

    use super::{contiguous, to_candle};
    use crate::cuda::{CudaDevice, LaunchContext};

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

    /// The CUDA storage of a locked side input, or an error naming it when it lives on
    /// another device.
    pub(crate) fn cuda_side<'a>(
        g: &'a super::Guard<'_>,
        what: &'static str,
    ) -> Result<Option<(&'a CudaStorage, &'a Layout)>> {
        match g {
            Some((storage, layout)) => match &**storage {
                candle_core::Storage::Cuda(s) => Ok(Some((s, *layout))),
                _ => candle_core::bail!("{what}: on another device than the other inputs"),
            },
            None => Ok(None),
        }
    }

    /// candle's stream for `storage`, with this crate's kernels loaded into its context, and a
    /// launch context on it (a fresh status word).
    pub(crate) fn stream_of(storage: &CudaStorage) -> Result<(Arc<CudaStream>, LaunchContext)> {
        let stream = storage.device.cuda_stream();
        CudaDevice::from_stream(stream.clone()).map_err(to_candle)?;
        let ctx = LaunchContext::new(&stream).map_err(to_candle)?;
        Ok((stream, ctx))
    }

    /// Reads the status word of an op (waits for its kernels) and turns a report into an error.
    pub(crate) fn check(mut ctx: LaunchContext) -> Result<()> {
        ctx.check().map_err(to_candle)
    }
}
