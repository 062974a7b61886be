//! DLPack tensors from Python: imported without a copy (dlpark), on the caller's stream, with
//! the checks that turn a wrong tensor into a `ValueError` / `TypeError` instead of a crash.

use std::ffi::c_void;

use dlpark::DlpackFlags;
use dlpark::ffi::{DLDataTypeCode, DLDevice, DLDeviceType};
use dlpark::python::consumer::stream::{StreamArg, cuda, none};
use dlpark::python::{DlpackStream, ImportRequest, ImportedDlpack};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use rlhf_kernels::{DType, RowBlocks};

/// Where a tensor lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Place {
    Cpu,
    Cuda(usize),
}

/// The element types the ops read or write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    F32,
    F16,
    BF16,
    F64,
    /// `uint8` or `bool` (one byte, 0 = false).
    Byte,
    I32,
    U32,
    I64,
    Other,
}

impl Kind {
    pub fn size(self) -> usize {
        match self {
            Kind::F64 | Kind::I64 => 8,
            Kind::F32 | Kind::I32 | Kind::U32 => 4,
            Kind::F16 | Kind::BF16 => 2,
            Kind::Byte | Kind::Other => 1,
        }
    }

    /// The crate's logits dtype.
    pub fn float(self, what: &str) -> PyResult<DType> {
        match self {
            Kind::F32 => Ok(DType::F32),
            Kind::F16 => Ok(DType::F16),
            Kind::BF16 => Ok(DType::BF16),
            other => Err(PyTypeError::new_err(format!(
                "{what}: dtype {other:?}, expected float32, bfloat16 or float16"
            ))),
        }
    }
}

/// The caller's CUDA stream, handed to the producer's `__dlpack__(stream=...)` so that the
/// data is ready on it (a no-op when the producer already works on that stream).
struct ConsumerStream(usize);

// SAFETY: the handle is the caller's live stream (`torch.cuda.current_stream().cuda_stream`)
// of the tensor's device, alive for the call, and `cuda` encodes it by the CUDA convention.
unsafe impl DlpackStream for ConsumerStream {
    fn as_python_arg(&self, _py: Python<'_>, device: DLDevice) -> PyResult<StreamArg> {
        Ok(if device.device_type == DLDeviceType::CUDA { cuda(self.0 as *mut c_void) } else { none() })
    }
}

/// An imported tensor: kept alive (the producer's memory stays valid) until dropped.
pub struct Dl {
    _owner: ImportedDlpack,
    pub what: &'static str,
    /// Address of element 0 (data pointer + byte offset).
    pub ptr: u64,
    pub place: Place,
    pub kind: Kind,
    pub dims: Vec<usize>,
    /// In elements.
    pub strides: Vec<usize>,
    /// Elements from element 0 to the last reachable one (at least 1: empty tensors are refused).
    span: usize,
    pub writable: bool,
}

impl Dl {
    /// Imports `obj` (anything with `__dlpack__`) without a copy; `stream` is the caller's
    /// CUDA stream handle (used only for CUDA tensors).
    pub fn import(obj: &Bound<'_, PyAny>, stream: usize, what: &'static str) -> PyResult<Dl> {
        let request = ImportRequest::new(obj.as_borrowed())
            .map_err(|e| PyTypeError::new_err(format!("{what}: not a DLPack tensor ({e})")))?;
        let on_gpu = request.device().is_ok_and(|d| d.device_type == DLDeviceType::CUDA);
        let consumer = ConsumerStream(stream);
        let owner = request
            .import(on_gpu.then_some(&consumer as &dyn DlpackStream), Some(false))
            .map_err(|e| PyValueError::new_err(format!("{what}: DLPack import failed ({e})")))?;
        let writable = !owner.flags().contains(DlpackFlags::READ_ONLY);
        let t = owner.validate().map_err(|e| PyValueError::new_err(format!("{what}: {e}")))?;
        let dev = t.device();
        let place = match dev.device_type {
            DLDeviceType::CPU => Place::Cpu,
            DLDeviceType::CUDA => Place::Cuda(
                usize::try_from(dev.device_id)
                    .map_err(|_| PyValueError::new_err(format!("{what}: device id {}", dev.device_id)))?,
            ),
            other => {
                return Err(PyValueError::new_err(format!(
                    "{what}: device type {} is neither CPU nor CUDA",
                    other.0
                )));
            }
        };
        let dt = t.dtype();
        let kind = match (dt.code, dt.bits, dt.lanes) {
            (DLDataTypeCode::FLOAT, 32, 1) => Kind::F32,
            (DLDataTypeCode::FLOAT, 16, 1) => Kind::F16,
            (DLDataTypeCode::BFLOAT, 16, 1) => Kind::BF16,
            (DLDataTypeCode::FLOAT, 64, 1) => Kind::F64,
            (DLDataTypeCode::UINT, 8, 1) | (DLDataTypeCode::BOOL, 8, 1) => Kind::Byte,
            (DLDataTypeCode::INT, 32, 1) => Kind::I32,
            (DLDataTypeCode::UINT, 32, 1) => Kind::U32,
            (DLDataTypeCode::INT, 64, 1) => Kind::I64,
            _ => Kind::Other,
        };
        let negative = || PyValueError::new_err(format!("{what}: negative strides are not supported"));
        let dims: Vec<usize> =
            t.shape().iter().map(|&d| usize::try_from(d).map_err(|_| negative())).collect::<PyResult<_>>()?;
        let strides = t.strides_or_compact().map_err(|e| PyValueError::new_err(format!("{what}: {e}")))?;
        let strides: Vec<usize> =
            strides.iter().map(|&s| usize::try_from(s).map_err(|_| negative())).collect::<PyResult<_>>()?;
        if dims.contains(&0) {
            return Err(PyValueError::new_err(format!(
                "{what}: shape {dims:?} is empty; every op needs at least one element"
            )));
        }
        let span = dims
            .iter()
            .zip(&strides)
            .try_fold(1usize, |acc, (d, s)| (d - 1).checked_mul(*s).and_then(|x| x.checked_add(acc)))
            .filter(|&n| n.checked_mul(kind.size()).is_some_and(|b| b <= isize::MAX as usize))
            .ok_or_else(|| {
                PyValueError::new_err(format!("{what}: shape {dims:?} and strides {strides:?} overflow"))
            })?;
        let ptr = t.data_ptr() as u64 + t.byte_offset();
        if !ptr.is_multiple_of(kind.size() as u64) {
            return Err(PyValueError::new_err(format!(
                "{what}: address {ptr:#x} is not aligned to its element size"
            )));
        }
        Ok(Dl { _owner: owner, what, ptr, place, kind, dims, strides, span, writable })
    }

    /// Imports an optional argument.
    pub fn maybe(obj: Option<&Bound<'_, PyAny>>, stream: usize, what: &'static str) -> PyResult<Option<Dl>> {
        obj.filter(|o| !o.is_none()).map(|o| Dl::import(o, stream, what)).transpose()
    }

    pub fn expect(&self, kinds: &[Kind]) -> PyResult<&Self> {
        if kinds.contains(&self.kind) {
            Ok(self)
        } else {
            Err(PyTypeError::new_err(format!(
                "{}: dtype {:?}, expected one of {kinds:?}",
                self.what, self.kind
            )))
        }
    }

    /// Checks a per-row array: shape `dims`, densely packed.
    pub fn per_row(&self, dims: &[usize]) -> PyResult<&Self> {
        if self.dims != dims {
            return Err(PyValueError::new_err(format!(
                "{}: shape {:?}, expected {dims:?}",
                self.what, self.dims
            )));
        }
        let mut expected = 1;
        for (d, s) in self.dims.iter().zip(&self.strides).rev() {
            if *d != 1 && *s != expected {
                return Err(PyValueError::new_err(format!(
                    "{}: must be contiguous (call .contiguous())",
                    self.what
                )));
            }
            expected *= d;
        }
        Ok(self)
    }

    /// Checks that the tensor may be written: not read-only, and no two of its elements share
    /// an address (an expanded tensor, stride 0, would have its rows overwrite each other).
    pub fn output(&self) -> PyResult<&Self> {
        if !self.writable {
            return Err(PyValueError::new_err(format!("{}: the tensor is read-only", self.what)));
        }
        // Sufficient: with the dimensions sorted by stride, each stride exceeds the span of
        // all smaller-strided dimensions together.
        let mut dims: Vec<(usize, usize)> =
            self.dims.iter().zip(&self.strides).filter(|(d, _)| **d > 1).map(|(d, s)| (*s, *d)).collect();
        dims.sort_unstable();
        let mut reach = 0usize;
        for (s, d) in dims {
            if s <= reach {
                return Err(PyValueError::new_err(format!(
                    "{}: strides {:?} make elements share memory; write into a tensor without overlap",
                    self.what, self.strides
                )));
            }
            reach += (d - 1) * s;
        }
        Ok(self)
    }

    /// Elements from element 0 to the last reachable one.
    pub fn span(&self) -> usize {
        self.span
    }

    /// The row blocks of a `[..., V]` tensor.
    pub fn rows(&self) -> PyResult<RowBlocks> {
        RowBlocks::new(&self.dims, &self.strides, 0, self.what).map_err(err)
    }

    /// The address of element `index`.
    pub fn at(&self, index: usize) -> u64 {
        self.ptr + (index * self.kind.size()) as u64
    }

    /// The reachable bytes (`span()` elements).
    ///
    /// # Safety
    /// Nothing writes the memory while the slice lives.
    pub unsafe fn bytes(&self) -> &[u8] {
        // SAFETY: the producer guarantees `span()` elements from `ptr` for as long as the
        // imported tensor (owned by `self`) lives; the caller guarantees no writer.
        unsafe { std::slice::from_raw_parts(self.ptr as *const u8, self.span() * self.kind.size()) }
    }

    /// The reachable bytes, mutable.
    ///
    /// # Safety
    /// As [`bytes`](Self::bytes), and no other slice of this memory lives at the same time
    /// ([`check_together`] checked the tensors against each other).
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn bytes_mut(&self) -> &mut [u8] {
        // SAFETY: as `bytes`; exclusivity is the caller's promise.
        unsafe { std::slice::from_raw_parts_mut(self.ptr as *mut u8, self.span() * self.kind.size()) }
    }

    /// The reachable elements as `T` (the checked dtype).
    ///
    /// # Safety
    /// As [`bytes`](Self::bytes).
    pub unsafe fn elems<T: bytemuck::Pod>(&self) -> &[T] {
        // SAFETY: the caller's promise, passed on.
        crate::bytemuck_cast(unsafe { self.bytes() })
    }

    /// The reachable elements as mutable `T`.
    ///
    /// # Safety
    /// As [`bytes_mut`](Self::bytes_mut).
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn elems_mut<T: bytemuck::Pod>(&self) -> &mut [T] {
        // SAFETY: the caller's promise, passed on.
        crate::bytemuck_cast_mut(unsafe { self.bytes_mut() })
    }

    fn byte_range(&self) -> std::ops::Range<u64> {
        self.ptr..self.ptr + (self.span() * self.kind.size()) as u64
    }
}

/// Checks that every tensor is on `place` and that no output overlaps another tensor.
pub fn check_together(inputs: &[Option<&Dl>], outputs: &[Option<&Dl>]) -> PyResult<Place> {
    let all: Vec<&Dl> = inputs.iter().chain(outputs).flatten().copied().collect();
    let place = all[0].place;
    if let Some(other) = all.iter().find(|t| t.place != place) {
        return Err(PyValueError::new_err(format!(
            "{} is on {:?}, {} on {:?}: every tensor must be on the same device",
            all[0].what, place, other.what, other.place
        )));
    }
    for out in outputs.iter().flatten() {
        out.output()?;
        for other in &all {
            if std::ptr::eq(*other, *out) {
                continue;
            }
            let (a, b) = (out.byte_range(), other.byte_range());
            if a.start < b.end && b.start < a.end {
                return Err(PyValueError::new_err(format!("{} overlaps {} in memory", out.what, other.what)));
            }
        }
    }
    Ok(place)
}

/// This crate's error as a Python exception: bad shapes, values and options are `ValueError`,
/// dtypes `TypeError`, the driver and missing devices `RuntimeError`.
pub fn err(e: rlhf_kernels::Error) -> PyErr {
    use rlhf_kernels::Error as E;
    match e {
        E::UnsupportedDtype { .. } => PyTypeError::new_err(e.to_string()),
        E::NoDriver | E::NoDevice { .. } | E::KernelsNotBuilt | E::Driver { .. } => {
            pyo3::exceptions::PyRuntimeError::new_err(e.to_string())
        }
        _ => PyValueError::new_err(e.to_string()),
    }
}

/// The policy and reference logits with their row blocks cut alike.
pub(crate) struct Pair {
    pub policy: Dl,
    pub reference: Dl,
    pub p_rows: RowBlocks,
    pub q_rows: RowBlocks,
}

/// Imports both logits tensors (same shape, float dtypes) with their row blocks cut alike, and
/// the optional row mask.
pub(crate) fn import_pair(
    policy: &Bound<'_, PyAny>,
    reference: &Bound<'_, PyAny>,
    mask: Option<&Bound<'_, PyAny>>,
    stream: usize,
) -> PyResult<(Pair, Option<Dl>)> {
    let policy = Dl::import(policy, stream, "policy")?;
    let reference = Dl::import(reference, stream, "reference")?;
    if policy.dims != reference.dims {
        return Err(pyo3::exceptions::PyValueError::new_err(format!(
            "reference: shape {:?}, expected the policy's {:?}",
            reference.dims, policy.dims
        )));
    }
    policy.kind.float("policy")?;
    reference.kind.float("reference")?;
    let (p_rows, q_rows) = RowBlocks::aligned(policy.rows()?, reference.rows()?);
    let mask = Dl::maybe(mask, stream, "mask")?;
    for t in mask.iter() {
        t.per_row(crate::lead(&policy))?.expect(&[Kind::Byte])?;
    }
    Ok((Pair { policy, reference, p_rows, q_rows }, mask))
}
