//! Vectorisable building blocks of the CPU backend and the runtime CPU-feature dispatch.
//!
//! The inner loops are plain Rust written so that LLVM vectorises them (fixed lane arrays,
//! no early exits, no libm calls). [`dispatch!`] compiles each row kernel three times —
//! baseline x86-64, AVX2 + FMA and AVX-512 — and picks one at run time, once per process
//! (as the `gemm` crate does). The exp2 polynomial uses `mul_add`, a fused multiply-add on
//! every CPU this dispatch targets (and on aarch64), so results are bitwise reproducible on a
//! given machine; machines with and without FMA may differ in the last bit.

use std::sync::OnceLock;

/// Number of independent accumulators in every reduction: four AVX-512 registers of f32
/// (eight AVX2 registers), enough to hide the latency of the adds. The summation order
/// depends on this constant only.
pub(crate) const LANES: usize = 64;

/// log2(e).
pub(crate) const LOG2E: f32 = std::f32::consts::LOG2_E;

/// The instruction-set level the row kernels run at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Level {
    Baseline,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

/// Detected once per process.
pub(crate) fn level() -> Level {
    static LEVEL: OnceLock<Level> = OnceLock::new();
    *LEVEL.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            if std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("avx512bw") {
                return Level::Avx512;
            }
            if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                return Level::Avx2;
            }
        }
        Level::Baseline
    })
}

/// Short description for backend reports ("avx512", "avx2", "baseline").
pub(crate) fn level_name() -> &'static str {
    match level() {
        Level::Baseline => "baseline",
        #[cfg(target_arch = "x86_64")]
        Level::Avx2 => "avx2",
        #[cfg(target_arch = "x86_64")]
        Level::Avx512 => "avx512",
    }
}

/// Defines `$name` as a dispatcher over three compilations of the `#[inline(always)]`
/// function `$generic` with the same signature.
macro_rules! dispatch {
    ($vis:vis fn $name:ident<$($T:ident: $bound:path),+>($($arg:ident: $ty:ty),* $(,)?) -> $ret:ty = $generic:ident) => {
        $vis fn $name<$($T: $bound),+>($($arg: $ty),*) -> $ret {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma,f16c")]
                fn avx2<$($T: $bound),+>($($arg: $ty),*) -> $ret {
                    $generic::<$($T),+>($($arg),*)
                }
                #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
                fn avx512<$($T: $bound),+>($($arg: $ty),*) -> $ret {
                    $generic::<$($T),+>($($arg),*)
                }
                match $crate::cpu::simd::level() {
                    // SAFETY: `level()` returned Avx512 only after detecting avx512f and
                    // avx512bw at run time (and AVX-512 implies avx2, fma and f16c).
                    $crate::cpu::simd::Level::Avx512 => return unsafe { avx512::<$($T),+>($($arg),*) },
                    // SAFETY: `level()` returned Avx2 only after detecting avx2 and fma; every
                    // x86-64 CPU with AVX2 has F16C.
                    $crate::cpu::simd::Level::Avx2 => return unsafe { avx2::<$($T),+>($($arg),*) },
                    $crate::cpu::simd::Level::Baseline => {}
                }
            }
            $generic::<$($T),+>($($arg),*)
        }
    };
}
pub(crate) use dispatch;

/// 2^x for x in [-127, 127.5) (relative error about 2e-7), written to vectorise.
///
/// Below -127 it returns 0 (the true value is under 2^-127, which never matters next to a
/// running maximum of 2^0); from 127.5 up, `+inf`. NaN gives NaN: callers flag NaN inputs
/// separately. Polynomial: Cephes `exp2f`, degree 6 on [-1/2, 1/2].
#[inline(always)]
pub(crate) fn exp2(x: f32) -> f32 {
    const ROUND: f32 = 12_582_912.0; // 1.5 * 2^23: adding it rounds to an integer
    let x = x.clamp(-127.0, 128.0);
    let t = x + ROUND;
    let n = t.to_bits() as i32 - ROUND.to_bits() as i32;
    let f = x - (t - ROUND);
    let p = 1.535_336_2e-4f32.mul_add(f, 1.339_887_4e-3);
    let p = p.mul_add(f, 9.618_437e-3);
    let p = p.mul_add(f, 5.550_332_5e-2);
    let p = p.mul_add(f, 2.402_264_8e-1);
    let p = p.mul_add(f, 6.931_472e-1);
    let p = p.mul_add(f, 1.0);
    p * f32::from_bits(((n + 127) as u32) << 23)
}

/// Natural log, written to vectorise (Cephes `logf`: degree-8 polynomial on [√½, √2),
/// about 1 ulp). `ln(0) = -inf`, `ln(+inf) = +inf`, negative or NaN inputs give NaN;
/// subnormal inputs are scaled up first, so they are exact too.
#[inline(always)]
pub(crate) fn ln(x: f32) -> f32 {
    const P: [f32; 9] = [
        7.037_683_6e-2,
        -1.151_461e-1,
        1.167_699_9e-1,
        -1.242_014_1e-1,
        1.424_932_3e-1,
        -1.666_805_8e-1,
        2.000_071_4e-1,
        -2.499_999_4e-1,
        3.333_333e-1,
    ];
    let sub = x < f32::MIN_POSITIVE;
    let xs = if sub { x * 8_388_608.0 } else { x }; // 2^23
    let bits = xs.to_bits();
    let mut e = ((bits >> 23) & 0xff) as i32 - 127 - if sub { 23 } else { 0 };
    let mut m = f32::from_bits((bits & 0x007f_ffff) | 0x3f80_0000); // [1, 2)
    let big = m > std::f32::consts::SQRT_2;
    m = if big { m * 0.5 } else { m };
    e += i32::from(big);
    let f = m - 1.0;
    let z = f * f;
    let mut poly = P[0];
    for &c in &P[1..] {
        poly = poly.mul_add(f, c);
    }
    let ef = e as f32;
    let mut y = f * z * poly;
    y = (-2.121_944_4e-4f32).mul_add(ef, y);
    y = (-0.5f32).mul_add(z, y);
    let r = 0.693_359_4f32.mul_add(ef, f + y);
    if x > 0.0 && x < f32::INFINITY {
        r
    } else if x == 0.0 {
        f32::NEG_INFINITY
    } else if x == f32::INFINITY {
        x
    } else {
        f32::NAN
    }
}

/// Sums `lanes` in a fixed pairwise order.
#[inline(always)]
pub(crate) fn sum_lanes(lanes: &[f32; LANES]) -> f32 {
    let mut v = *lanes;
    let mut width = LANES / 2;
    while width > 0 {
        for i in 0..width {
            v[i] += v[i + width];
        }
        width /= 2;
    }
    v[0]
}

/// Max of `lanes` (NaN-ignoring).
#[inline(always)]
pub(crate) fn max_lanes(lanes: &[f32; LANES]) -> f32 {
    lanes.iter().copied().fold(f32::NEG_INFINITY, f32::max)
}

/// Elements per block handed to [`for_each_block`]: small enough to stay in L1.
pub(crate) const BLOCK: usize = 16 * LANES;

/// Consecutive blocks of a row as f32, in order. Every block's length is a multiple of
/// [`LANES`], at most [`BLOCK`]; the last one is padded with `pad`. f32 input is passed
/// through without a copy; f16/bf16 are converted into a buffer that stays in L1.
///
/// A lending iterator (`while let Some(block) = blocks.next()`) rather than a closure, so that
/// the loop body is compiled inside the caller's `#[target_feature]` function.
pub(crate) struct Blocks<'a, T> {
    x: &'a [T],
    pos: usize,
    pad: f32,
    buf: [f32; BLOCK],
}

impl<'a, T: crate::Element> Blocks<'a, T> {
    #[inline(always)]
    pub(crate) fn new(x: &'a [T], pad: f32) -> Self {
        Blocks { x, pos: 0, pad, buf: [0.0; BLOCK] }
    }

    #[inline(always)]
    #[allow(clippy::should_implement_trait)] // lends from self: not an Iterator
    pub(crate) fn next(&mut self) -> Option<&[f32]> {
        let rest = self.x.len() - self.pos;
        if rest == 0 {
            return None;
        }
        let full = rest - rest % LANES;
        let start = self.pos;
        if full == 0 {
            let last = &mut self.buf[..LANES];
            last.fill(self.pad);
            T::slice_to_f32(&self.x[start..], &mut last[..rest]);
            self.pos = self.x.len();
            return Some(last);
        }
        let n = full.min(BLOCK);
        self.pos += n;
        let src = &self.x[start..start + n];
        match T::as_f32(src) {
            Some(direct) => Some(direct),
            None => {
                T::slice_to_f32(src, &mut self.buf[..n]);
                Some(&self.buf[..n])
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp2_is_accurate_on_the_domain_used() {
        let mut worst = 0.0f64;
        let mut x = -126.0f32;
        while x <= 20.0 {
            let exact = (x as f64).exp2();
            let rel = ((exp2(x) as f64 - exact) / exact).abs();
            worst = worst.max(rel);
            x += 0.001_37;
        }
        assert!(worst < 3e-7, "worst relative error {worst}");
        assert_eq!(exp2(0.0), 1.0);
        assert_eq!(exp2(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp2(-1000.0), 0.0);
        assert_eq!(exp2(f32::INFINITY), f32::INFINITY);
        assert!(exp2(f32::NAN).is_nan());
    }

    #[test]
    fn ln_is_accurate() {
        let mut worst = 0.0f64;
        let mut x = 1e-44f32;
        while x < 1e38 {
            let exact = (x as f64).ln();
            let err = (ln(x) as f64 - exact).abs() / exact.abs().max(1.0);
            worst = worst.max(err);
            x = (x * 1.000_37).max(f32::from_bits(x.to_bits() + 1)); // subnormals: at least one ulp
        }
        assert!(worst < 2.5e-7, "worst error {worst}");
        assert_eq!(ln(1.0), 0.0);
        assert_eq!(ln(0.0), f32::NEG_INFINITY);
        assert_eq!(ln(f32::INFINITY), f32::INFINITY);
        assert!(ln(-1.0).is_nan() && ln(f32::NAN).is_nan());
    }

    #[test]
    fn lane_reductions() {
        let mut l = [0.0f32; LANES];
        for (i, v) in l.iter_mut().enumerate() {
            *v = i as f32;
        }
        assert_eq!(sum_lanes(&l), (LANES * (LANES - 1) / 2) as f32);
        assert_eq!(max_lanes(&l), (LANES - 1) as f32);
    }
}
