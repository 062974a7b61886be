//! Element types: logits in f32, f16 or bf16; target ids in i32, u32 or i64.

use std::fmt;
use std::str::FromStr;

use half::{bf16, f16};

use crate::{Error, Result};

/// The floating-point dtypes the kernels read and write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    /// IEEE binary32.
    F32,
    /// IEEE binary16.
    F16,
    /// bfloat16 (8-bit exponent, 7-bit mantissa).
    BF16,
}

const SUPPORTED: &str = "f32, f16, bf16";

impl DType {
    /// All dtypes, in a fixed order (handy for test sweeps).
    pub const ALL: [DType; 3] = [DType::F32, DType::F16, DType::BF16];

    /// Size of one element in bytes.
    pub const fn size_bytes(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }

    /// The suffix of the kernels' entry points (`log_softmax_forward_bf16`, …).
    pub const fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
        }
    }

    /// Machine epsilon (distance from 1 to the next value).
    pub const fn epsilon(self) -> f64 {
        match self {
            DType::F32 => f32::EPSILON as f64,
            DType::F16 => 0.0009765625,
            DType::BF16 => 0.0078125,
        }
    }

    /// The dtype of a DLPack tensor (`DLDataType`: type code, bits, lanes), as PyTorch, JAX
    /// and CuPy hand it over.
    ///
    /// ```
    /// use rlhf_kernels::DType;
    /// assert_eq!(DType::from_dlpack(4, 16, 1).unwrap(), DType::BF16);
    /// assert!(DType::from_dlpack(2, 64, 1).is_err()); // f64 is not a kernel dtype
    /// ```
    pub fn from_dlpack(code: u8, bits: u8, lanes: u16) -> Result<DType> {
        const FLOAT: u8 = 2;
        const BFLOAT: u8 = 4;
        match (code, bits, lanes) {
            (FLOAT, 32, 1) => Ok(DType::F32),
            (FLOAT, 16, 1) => Ok(DType::F16),
            (BFLOAT, 16, 1) => Ok(DType::BF16),
            _ => Err(Error::UnsupportedDtype {
                what: "DLPack tensor",
                dtype: format!("code {code}, {bits} bits, {lanes} lanes"),
                supported: SUPPORTED,
            }),
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for DType {
    type Err = Error;

    /// Parses `f32`/`float32`/`fp32`/`float`, `f16`/`float16`/`fp16`/`half`,
    /// `bf16`/`bfloat16`.
    fn from_str(s: &str) -> Result<DType> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "float32" | "fp32" | "float" => Ok(DType::F32),
            "f16" | "float16" | "fp16" | "half" => Ok(DType::F16),
            "bf16" | "bfloat16" => Ok(DType::BF16),
            _ => Err(Error::UnsupportedDtype { what: "dtype name", dtype: s.into(), supported: SUPPORTED }),
        }
    }
}

mod sealed {
    /// With the `cuda` feature every element type is also a cudarc device type, so generic
    /// code can move `T: Element` buffers to and from the GPU.
    #[cfg(feature = "cuda")]
    pub trait Sealed: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits {}
    #[cfg(not(feature = "cuda"))]
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for half::f16 {}
    impl Sealed for half::bf16 {}
    impl Sealed for i32 {}
    impl Sealed for u32 {}
    impl Sealed for i64 {}
}

/// A logits element type: `f32`, [`half::f16`] or [`half::bf16`]. Arithmetic is always f32.
pub trait Element:
    Copy + Default + PartialEq + fmt::Debug + Send + Sync + bytemuck::Pod + 'static + sealed::Sealed
{
    /// The runtime dtype tag.
    const DTYPE: DType;
    /// Widens to f32 (exact).
    fn to_f32(self) -> f32;
    /// Rounds an f32 to nearest-even.
    fn from_f32(x: f32) -> Self;
    /// Widens to f64 (exact).
    fn to_f64(self) -> f64 {
        self.to_f32() as f64
    }
    /// True when [`to_f32`](Self::to_f32) and [`from_f32`](Self::from_f32) are a few
    /// branch-free instructions that vectorise inside a loop (f32, bf16); false when slice
    /// conversions are faster (f16, whose hardware conversion is used through the slices).
    const CHEAP_SCALAR_CONVERT: bool;
    /// Converts a slice to f32; `dst.len()` must equal `src.len()`.
    fn slice_to_f32(src: &[Self], dst: &mut [f32]);
    /// The slice itself when `Self` is f32 (no conversion needed), else `None`.
    fn as_f32(src: &[Self]) -> Option<&[f32]> {
        let _ = src;
        None
    }
    /// The slice itself when `Self` is f32, else `None`.
    fn as_f32_mut(dst: &mut [Self]) -> Option<&mut [f32]> {
        let _ = dst;
        None
    }
    /// Converts f32 to this type (nearest-even); `dst.len()` must equal `src.len()`.
    fn slice_from_f32(src: &[f32], dst: &mut [Self]);
    /// The smallest magnitude that rounds to ±inf in this type (`+inf` for f32: 65520 for f16,
    /// `0x7F7F8000` for bf16): a finite `x` with `|x| <` it converts to a finite value.
    const OVERFLOW_AT: f32;
    /// Whether `x` converts to a finite value of this type (false for NaN and ±inf).
    #[inline(always)]
    fn fits(x: f32) -> bool {
        x.abs() < Self::OVERFLOW_AT
    }
}

impl Element for f32 {
    const DTYPE: DType = DType::F32;
    const CHEAP_SCALAR_CONVERT: bool = true;
    const OVERFLOW_AT: f32 = f32::INFINITY;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        x
    }
    #[inline(always)]
    fn slice_to_f32(src: &[Self], dst: &mut [f32]) {
        dst.copy_from_slice(src);
    }
    #[inline(always)]
    fn as_f32(src: &[Self]) -> Option<&[f32]> {
        Some(src)
    }
    #[inline(always)]
    fn as_f32_mut(dst: &mut [Self]) -> Option<&mut [f32]> {
        Some(dst)
    }
    #[inline(always)]
    fn slice_from_f32(src: &[f32], dst: &mut [Self]) {
        dst.copy_from_slice(src);
    }
}

impl Element for f16 {
    const DTYPE: DType = DType::F16;
    const CHEAP_SCALAR_CONVERT: bool = false;
    const OVERFLOW_AT: f32 = 65520.0;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        f16::from_f32(x)
    }
    #[inline(always)]
    fn slice_to_f32(src: &[Self], dst: &mut [f32]) {
        use half::slice::HalfFloatSliceExt;
        src.convert_to_f32_slice(dst);
    }
    #[inline(always)]
    fn slice_from_f32(src: &[f32], dst: &mut [Self]) {
        use half::slice::HalfFloatSliceExt;
        dst.convert_from_f32_slice(src);
    }
}

impl Element for bf16 {
    const DTYPE: DType = DType::BF16;
    const CHEAP_SCALAR_CONVERT: bool = false;
    const OVERFLOW_AT: f32 = f32::from_bits(0x7F7F_8000);
    #[inline(always)]
    fn to_f32(self) -> f32 {
        // A bf16 is the top half of an f32: widening is a shift (and vectorises).
        f32::from_bits((self.to_bits() as u32) << 16)
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        // Round to nearest-even on the bits, NaN kept quiet (as bf16::from_f32 and the GPU's
        // __float2bfloat16_rn do), branch-free so that it vectorises.
        let b = x.to_bits();
        let rounded = (b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16) as u16;
        let nan = (b & 0x7fff_ffff) > 0x7f80_0000;
        bf16::from_bits(if nan { ((b >> 16) | 0x40) as u16 } else { rounded })
    }
    #[inline(always)]
    fn slice_to_f32(src: &[Self], dst: &mut [f32]) {
        for (d, &s) in dst.iter_mut().zip(src) {
            *d = <bf16 as Element>::to_f32(s);
        }
    }
    #[inline(always)]
    fn slice_from_f32(src: &[f32], dst: &mut [Self]) {
        for (d, &s) in dst.iter_mut().zip(src) {
            *d = <bf16 as Element>::from_f32(s);
        }
    }
}

/// Integer types accepted for target token ids: `i32`, `u32`, `i64` (PyTorch's default).
pub trait TargetIndex: Copy + Send + Sync + fmt::Debug + bytemuck::Pod + 'static + sealed::Sealed {
    /// The runtime tag.
    const INDEX_TYPE: IndexType;
    /// The id as i64 (exact for all three types).
    fn to_i64(self) -> i64;
}

/// Runtime tag of a [`TargetIndex`] type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IndexType {
    /// `i32`.
    I32,
    /// `u32`.
    U32,
    /// `i64`.
    I64,
}

impl IndexType {
    /// Suffix used in kernel entry-point names.
    pub const fn name(self) -> &'static str {
        match self {
            IndexType::I32 => "i32",
            IndexType::U32 => "u32",
            IndexType::I64 => "i64",
        }
    }
}

impl TargetIndex for i32 {
    const INDEX_TYPE: IndexType = IndexType::I32;
    fn to_i64(self) -> i64 {
        self as i64
    }
}
impl TargetIndex for u32 {
    const INDEX_TYPE: IndexType = IndexType::U32;
    fn to_i64(self) -> i64 {
        self as i64
    }
}
impl TargetIndex for i64 {
    const INDEX_TYPE: IndexType = IndexType::I64;
    fn to_i64(self) -> i64 {
        self
    }
}

/// Checks that every target is in `[0, vocab)` or equals `ignore_index`; reports the first
/// offending row. The CPU ops call this before computing; the GPU kernels check in place.
///
/// ```
/// use rlhf_kernels::{validate_targets, Error};
/// assert!(validate_targets(&[0i64, 5, -100], 6, Some(-100)).is_ok());
/// assert!(matches!(
///     validate_targets(&[0u32, 6], 6, None),
///     Err(Error::TargetOutOfRange { row: 1, target: 6, vocab: 6 })
/// ));
/// ```
pub fn validate_targets<I: TargetIndex>(
    targets: &[I],
    vocab: usize,
    ignore_index: Option<i64>,
) -> Result<()> {
    for (row, &t) in targets.iter().enumerate() {
        let t = t.to_i64();
        if Some(t) != ignore_index && !(0..vocab as i64).contains(&t) {
            return Err(Error::TargetOutOfRange { row, target: t, vocab });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The branch-free bf16 conversions agree with the `half` crate bit for bit, on every
    /// class of value (the GPU's __float2bfloat16_rn rounds the same way).
    #[test]
    fn bf16_conversion_matches_half() {
        let specials =
            [0.0f32, -0.0, 1.0, -1.5, f32::MAX, f32::MIN_POSITIVE, 1e-40, f32::INFINITY, f32::NEG_INFINITY];
        let mut x = 0x0000_0001u32;
        let mut values: Vec<f32> = specials.to_vec();
        while x < 0xffff_0000 {
            values.push(f32::from_bits(x));
            x = x.wrapping_mul(3).wrapping_add(0x8001);
        }
        for v in values {
            let ours = <bf16 as Element>::from_f32(v);
            let theirs = bf16::from_f32(v);
            if v.is_nan() {
                assert!(ours.is_nan());
            } else {
                assert_eq!(ours.to_bits(), theirs.to_bits(), "{v:e}");
            }
            assert_eq!(<bf16 as Element>::to_f32(theirs).to_bits(), theirs.to_f32().to_bits());
        }
        assert!(<bf16 as Element>::from_f32(f32::NAN).is_nan());
    }
}
