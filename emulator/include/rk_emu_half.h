// __half and __nv_bfloat16 for the host build of the kernels: storage types with the device's
// conversions, bit for bit (round to nearest even; NaN becomes the canonical 0x7fff, as the
// device's cvt.rn.f16.f32 / cvt.rn.bf16.f32 and CUDA's own host conversions give).
#pragma once

#include <bit>
#include <cstdint>

struct alignas(2) __half {
  unsigned short __x;
};
struct alignas(2) __nv_bfloat16 {
  unsigned short __x;
};
typedef __half half;
typedef __nv_bfloat16 nv_bfloat16;

inline float __half2float(__half h) {
  const uint32_t sign = static_cast<uint32_t>(h.__x & 0x8000u) << 16;
  const uint32_t exp = (h.__x >> 10) & 0x1fu, man = h.__x & 0x3ffu;
  if (exp == 0x1f) return std::bit_cast<float>(sign | 0x7f800000u | (man << 13));  // inf, NaN
  if (exp != 0) return std::bit_cast<float>(sign | ((exp + 112u) << 23) | (man << 13));
  // Zero or subnormal: man · 2^-24, exact in f32.
  const float mag = static_cast<float>(man) * 0x1p-24f;
  return sign ? -mag : mag;
}

inline __half __float2half_rn(float f) {
  const uint32_t x = std::bit_cast<uint32_t>(f);
  const uint32_t sign = (x >> 16) & 0x8000u, ax = x & 0x7fffffffu;
  if (ax > 0x7f800000u) return __half{0x7fff};                                  // NaN
  if (ax >= 0x477ff000u) return __half{static_cast<unsigned short>(sign | 0x7c00u)};  // >= 65520: inf
  if (ax >= 0x38800000u) {                                                        // normal half
    const uint32_t r = ax - 0x38000000u;
    return __half{static_cast<unsigned short>(sign | ((r + 0xfffu + ((r >> 13) & 1u)) >> 13))};
  }
  if (ax <= 0x33000000u) return __half{static_cast<unsigned short>(sign)};  // <= 2^-25: ±0
  // Subnormal half: the 24-bit significand shifted right by 126 - e, rounded to nearest even.
  const uint32_t e = ax >> 23, m = (ax & 0x7fffffu) | 0x800000u, s = 126u - e;
  uint32_t q = m >> s;
  const uint32_t rem = m & ((1u << s) - 1u), halfway = 1u << (s - 1u);
  if (rem > halfway || (rem == halfway && (q & 1u))) ++q;
  return __half{static_cast<unsigned short>(sign | q)};
}
inline __half __float2half(float f) { return __float2half_rn(f); }

inline float __bfloat162float(__nv_bfloat16 b) { return std::bit_cast<float>(static_cast<uint32_t>(b.__x) << 16); }

inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  const uint32_t x = std::bit_cast<uint32_t>(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return __nv_bfloat16{0x7fff};
  return __nv_bfloat16{static_cast<unsigned short>((x + 0x7fffu + ((x >> 16) & 1u)) >> 16)};
}
inline __nv_bfloat16 __float2bfloat16(float f) { return __float2bfloat16_rn(f); }
