//! `rlhf_kernels._native`: the crate's ops on any DLPack tensor (PyTorch, JAX, CuPy), on the
//! CPU or the GPU, reading inputs and writing outputs where the caller's framework allocated
//! them (nothing is copied), on the caller's CUDA stream (no host synchronisation). The
//! PyTorch autograd layer (`rlhf_kernels.torch`) allocates the outputs and calls these.
//!
//! Every function takes the CUDA stream handle as `stream` (`torch.cuda.current_stream()
//! .cuda_stream`; ignored on the CPU) and, on the GPU, a `status` tensor (one int64, filled
//! with -1) where the kernels report rows they could not process; `check_status` reads it.
//! On the CPU such rows raise at once, naming the tensor's row; on the GPU a view that runs as
//! several blocks reports the row within its block (the launches share the status word). The
//! GIL is released while the CPU kernels run.

use pyo3::prelude::*;

mod batch;
mod cuda;
mod dl;
mod fused;
mod logits;
mod losses;
mod reduce;

/// Runs `$body` with `$T` the Rust type of a logits dtype.
#[macro_export]
macro_rules! float_type {
    ($dtype:expr, $T:ident => $body:expr) => {
        match $dtype {
            rlhf_kernels::DType::F32 => {
                type $T = f32;
                $body
            }
            rlhf_kernels::DType::BF16 => {
                type $T = half::bf16;
                $body
            }
            rlhf_kernels::DType::F16 => {
                type $T = half::f16;
                $body
            }
        }
    };
}

/// Runs `$body` with `$I` the Rust type of a target-id dtype (checked before).
#[macro_export]
macro_rules! index_type {
    ($kind:expr, $I:ident => $body:expr) => {
        match $kind {
            $crate::dl::Kind::I32 => {
                type $I = i32;
                $body
            }
            $crate::dl::Kind::U32 => {
                type $I = u32;
                $body
            }
            _ => {
                type $I = i64;
                $body
            }
        }
    };
}

/// The leading dimensions of a `[..., V]` tensor (the shape of its per-row arrays).
pub(crate) fn lead(t: &dl::Dl) -> &[usize] {
    &t.dims[..t.dims.len().saturating_sub(1)]
}

/// Reinterprets bytes as elements: the import checked the dtype and the alignment, and the
/// byte count is `span · size`.
pub(crate) fn bytemuck_cast<T: bytemuck::Pod>(b: &[u8]) -> &[T] {
    bytemuck::cast_slice(&b[..b.len() - b.len() % std::mem::size_of::<T>()])
}

/// [`bytemuck_cast`], mutable.
pub(crate) fn bytemuck_cast_mut<T: bytemuck::Pod>(b: &mut [u8]) -> &mut [T] {
    let n = b.len() - b.len() % std::mem::size_of::<T>();
    bytemuck::cast_slice_mut(&mut b[..n])
}

/// Whether the module was built with the CUDA backend and its kernels.
#[pyfunction]
fn cuda_available() -> bool {
    cuda::available()
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(logits::token_logprobs, m)?)?;
    m.add_function(wrap_pyfunction!(logits::token_logprobs_backward, m)?)?;
    m.add_function(wrap_pyfunction!(logits::exact_kl, m)?)?;
    m.add_function(wrap_pyfunction!(logits::exact_kl_backward, m)?)?;
    m.add_function(wrap_pyfunction!(batch::policy_loss, m)?)?;
    m.add_function(wrap_pyfunction!(fused::policy_loss_from_logits, m)?)?;
    m.add_function(wrap_pyfunction!(fused::fused_workspace_bytes, m)?)?;
    m.add_function(wrap_pyfunction!(batch::gae, m)?)?;
    m.add_function(wrap_pyfunction!(batch::group_advantages, m)?)?;
    m.add_function(wrap_pyfunction!(losses::sampled_kl, m)?)?;
    m.add_function(wrap_pyfunction!(losses::kl_rewards, m)?)?;
    m.add_function(wrap_pyfunction!(losses::overlong_shaping, m)?)?;
    m.add_function(wrap_pyfunction!(losses::value_loss, m)?)?;
    m.add_function(wrap_pyfunction!(reduce::aggregate, m)?)?;
    m.add_function(wrap_pyfunction!(reduce::masked_moments, m)?)?;
    m.add_function(wrap_pyfunction!(reduce::whiten, m)?)?;
    m.add_function(wrap_pyfunction!(cuda::check_status, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_available, m)?)?;
    m.add("POLICY_STATS_WORDS", batch::STATS_WORDS)?;
    m.add("KL_STATS_WORDS", losses::KL_STATS_WORDS)?;
    m.add("VALUE_STATS_WORDS", losses::VALUE_STATS_WORDS)?;
    m.add("FUSED_STATS_WORDS", fused::FUSED_STATS_WORDS)?;
    Ok(())
}
