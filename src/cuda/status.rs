//! The device-side status word through which kernels report rows without a defined result.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, DevicePtrMut, SyncOnDrop, sys};

use super::driver_error;
use crate::error::Op;
use crate::{Error, Result, RowProblem};

/// Value of a status word with nothing to report.
pub const STATUS_CLEAR: u64 = u64::MAX;

/// A device-side record of the first input problem the kernels met (lowest row wins), e.g. a
/// row of only `-inf`, held by a [`LaunchContext`](crate::cuda::LaunchContext). Ops enqueue
/// their reports without synchronising; [`check`](Self::check) synchronises the stream once
/// and turns a report into an [`Error::InvalidRow`].
#[derive(Debug)]
pub(crate) struct CudaStatus {
    word: CudaSlice<u64>,
}

impl CudaStatus {
    /// Allocates a clear status word on `stream`'s device.
    pub fn new(stream: &Arc<CudaStream>) -> Result<Self> {
        let word = stream.clone_htod(&[STATUS_CLEAR]).map_err(driver_error("allocating the status word"))?;
        Ok(CudaStatus { word })
    }

    /// Synchronises `stream`, reads the word and clears it. Returns the first problem
    /// reported since the last check as an error.
    pub fn check(&mut self, stream: &Arc<CudaStream>) -> Result<()> {
        let word = stream.clone_dtoh(&self.word).map_err(driver_error("reading the status word"))?[0];
        if word != STATUS_CLEAR {
            stream
                .memcpy_htod(&[STATUS_CLEAR], &mut self.word)
                .map_err(driver_error("clearing the status word"))?;
        }
        decode_status(word)
    }

    /// The device pointer, with cudarc's read/write tracking for `stream`.
    pub(crate) fn device_ptr<'a>(&'a mut self, stream: &'a CudaStream) -> (sys::CUdeviceptr, SyncOnDrop<'a>) {
        self.word.device_ptr_mut(stream)
    }
}

/// Turns a status word read back from the device into `Ok(())` or the error it records.
/// For raw-layer callers who keep their own 8-byte status buffer (initialised to
/// [`STATUS_CLEAR`]).
///
/// ```
/// use rlhf_kernels::cuda::raw::{decode_status, STATUS_CLEAR};
/// assert!(decode_status(STATUS_CLEAR).is_ok());
/// // row 7, op 1 (log_softmax), problem 3 (only -inf):
/// let err = decode_status((7 << 16) | (1 << 8) | 3).unwrap_err();
/// assert!(err.to_string().contains("row 7"));
/// ```
pub fn decode_status(word: u64) -> Result<()> {
    if word == STATUS_CLEAR {
        return Ok(());
    }
    let row = (word >> 16) as usize;
    let op = Op::from_id((word >> 8) as u8);
    let problem = RowProblem::from_code(word as u8);
    match (op, problem) {
        (Some(op), Some(problem)) => Err(op.invalid_row(row, problem)),
        _ => Err(Error::Driver {
            during: "decoding the status word",
            message: format!("unknown report {word:#x}: the word was not initialised to STATUS_CLEAR"),
        }),
    }
}
