//! The test kit: tolerant comparison against the f64 reference, seeded input generators and
//! the GPU skip rule. Used by the crate's own tests; public so that trainers built on the
//! crate can hold their code to the same standard.

use std::fmt;
use std::io::Write as _;

use crate::{DType, Element, RowShape};

/// `|actual − expected| ≤ abs + rel·|expected|`, element by element.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Tolerance {
    /// Relative part.
    pub rel: f64,
    /// Absolute part.
    pub abs: f64,
}

impl Tolerance {
    /// The tolerance for a result *stored* in `dtype` after f32 arithmetic: f32 1e-5,
    /// f16 1e-3 (≈ its epsilon), bf16 1e-2 (≈ its epsilon), relative and absolute.
    pub fn for_dtype(dtype: DType) -> Self {
        let t = match dtype {
            DType::F32 => 1e-5,
            DType::F16 => 1e-3,
            DType::BF16 => 1e-2,
        };
        Tolerance { rel: t, abs: t }
    }

    /// Scales the absolute part by the inputs' magnitude (at least 1): an error of a few ulps
    /// of the largest input is legitimate wherever such inputs were subtracted.
    pub fn scaled(self, scale: f64) -> Self {
        Tolerance { abs: self.abs * scale.abs().max(1.0), ..self }
    }
}

/// A failed comparison: how many elements are off, and the first one.
#[derive(Debug, Clone, PartialEq)]
pub struct Mismatch {
    /// Index of the first element out of tolerance.
    pub index: usize,
    /// Its value.
    pub actual: f64,
    /// The reference value.
    pub expected: f64,
    /// Elements out of tolerance in all.
    pub count: usize,
    /// Number of elements compared (or the length of `actual` when the lengths differ).
    pub len: usize,
}

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} of {} elements out of tolerance; first at index {}: actual {:e}, expected {:e} (diff {:e})",
            self.count,
            self.len,
            self.index,
            self.actual,
            self.expected,
            (self.actual - self.expected).abs()
        )
    }
}

fn equal_specials(a: f64, e: f64) -> Option<bool> {
    if a.is_nan() || e.is_nan() {
        return Some(a.is_nan() && e.is_nan());
    }
    if a.is_infinite() || e.is_infinite() {
        return Some(a == e);
    }
    None
}

/// Compares `actual` (any [`Element`]) to `expected` (f64). NaN equals NaN, ±inf equals
/// itself only.
pub fn check_close<A: Element>(actual: &[A], expected: &[f64], tol: Tolerance) -> Result<(), Mismatch> {
    if actual.len() != expected.len() {
        return Err(Mismatch {
            index: actual.len().min(expected.len()),
            actual: f64::NAN,
            expected: f64::NAN,
            count: 1,
            len: actual.len(),
        });
    }
    let mut first = None;
    let mut count = 0;
    for (i, (a, &e)) in actual.iter().zip(expected).enumerate() {
        let a = a.to_f64();
        let ok = equal_specials(a, e).unwrap_or_else(|| (a - e).abs() <= tol.abs + tol.rel * e.abs());
        if !ok {
            count += 1;
            first.get_or_insert((i, a, e));
        }
    }
    match first {
        None => Ok(()),
        Some((index, actual_v, expected_v)) => {
            Err(Mismatch { index, actual: actual_v, expected: expected_v, count, len: actual.len() })
        }
    }
}

/// Panics with the first mismatch (and where the assertion is) unless
/// [`check_close`] passes.
///
/// ```
/// use rlhf_kernels::testing::{assert_close, Tolerance};
/// use rlhf_kernels::DType;
/// assert_close(&[1.0f32, f32::NAN], &[1.000001, f64::NAN], Tolerance::for_dtype(DType::F32), "demo");
/// ```
#[track_caller]
pub fn assert_close<A: Element>(actual: &[A], expected: &[f64], tol: Tolerance, what: &str) {
    if let Err(m) = check_close(actual, expected, tol) {
        panic!("{what}: {m} (tolerance rel {:e}, abs {:e})", tol.rel, tol.abs);
    }
}

/// A small seeded generator (SplitMix64): the same seed gives the same inputs everywhere.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator with a fixed seed.
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform integer in [0, n).
    pub fn below(&mut self, n: usize) -> usize {
        (self.uniform() * n as f64) as usize % n.max(1)
    }

    /// Standard normal (Box–Muller).
    pub fn normal(&mut self) -> f64 {
        let u = 1.0 - self.uniform();
        (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * self.uniform()).cos()
    }

    /// Logits laid out as `shape`: normal with standard deviation `scale`, in `T`. The
    /// padding between `cols` and `row_stride` is filled with NaN, so a kernel that reads
    /// it is caught by its NaN check.
    pub fn logits<T: Element>(&mut self, shape: RowShape, scale: f64) -> Vec<T> {
        let len = shape.rows * shape.row_stride;
        let mut v = vec![T::from_f32(f32::NAN); len];
        for r in 0..shape.rows {
            for x in &mut v[shape.row_range(r)] {
                *x = T::from_f32((self.normal() * scale) as f32);
            }
        }
        v
    }

    /// `n` f32 values, normal with standard deviation `scale`.
    pub fn normals(&mut self, n: usize, scale: f64) -> Vec<f32> {
        (0..n).map(|_| (self.normal() * scale) as f32).collect()
    }
}

/// True when `RLHF_KERNELS_REQUIRE_GPU=1`: a test that cannot find a GPU fails instead of
/// skipping.
pub fn gpu_required() -> bool {
    std::env::var("RLHF_KERNELS_REQUIRE_GPU").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"))
}

/// Reports a skipped test on stderr, past the test harness's capture so that it shows in
/// `cargo test` output, or panics when [`gpu_required`].
#[track_caller]
pub fn skip(test: &str, reason: &str) {
    // The test harness names each test's thread after the test.
    let thread = std::thread::current();
    let test = thread.name().filter(|n| *n != "main").unwrap_or(test);
    if gpu_required() {
        panic!("{test}: RLHF_KERNELS_REQUIRE_GPU=1 but the GPU test cannot run: {reason}");
    }
    // One write of the whole line, so that parallel tests do not interleave their reports.
    let line = format!("\nskipped: {test}: {reason}\n");
    let _ = std::io::stderr().write_all(line.as_bytes());
}

/// The GPU the CUDA tests run on (`RLHF_KERNELS_DEVICE`, default 0), opened once, or why there
/// is none.
#[cfg(feature = "cuda")]
pub fn test_device() -> Result<crate::cuda::CudaDevice, String> {
    use std::sync::OnceLock;
    static DEVICE: OnceLock<Result<crate::cuda::CudaDevice, String>> = OnceLock::new();
    DEVICE
        .get_or_init(|| {
            let ordinal = std::env::var("RLHF_KERNELS_DEVICE").ok().and_then(|v| v.parse().ok()).unwrap_or(0);
            crate::cuda::CudaDevice::new(ordinal).map_err(|e| e.to_string())
        })
        .clone()
}

/// Without the `cuda` feature there is never a test device.
#[cfg(not(feature = "cuda"))]
pub fn test_device() -> Result<std::convert::Infallible, String> {
    Err("built without the `cuda` feature".to_string())
}

/// Evaluates to the test GPU, or returns from the enclosing test after reporting the skip
/// ([`skip`]: a failure when `RLHF_KERNELS_REQUIRE_GPU=1`).
///
/// ```
/// # fn demo() {
/// let device = rlhf_kernels::cuda_or_skip!();
/// // ... use device.stream() ...
/// # }
/// ```
#[macro_export]
macro_rules! cuda_or_skip {
    () => {
        match $crate::testing::test_device() {
            Ok(device) => device,
            Err(reason) => {
                $crate::testing::skip(concat!(module_path!(), ":", line!()), &reason);
                return;
            }
        }
    };
}
