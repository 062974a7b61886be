// Arithmetic the host build must get bit for bit right, checked on the host (the operations are
// IEEE operations, the same on the device):
//   - rk::rcp_f64 and rk::div_f64 (kernels/aggregation.cuh) against f64 division, which is what
//     the CPU backend computes for the aggregation weights and the statistics' means;
//   - the emulator's f16 and bf16 conversions (emulator/include/rk_emu_half.h) against
//     independent round-to-nearest-even references, over every exponent, the rounding
//     boundaries of every significand prefix and random bit patterns.
// Run by `scripts/emulator.sh selftest`. Exits non-zero on the first mismatch.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <initializer_list>

#include "aggregation.cuh"

namespace {

uint64_t state = 0x243f6a8885a308d3ull;
uint64_t next() {
  state += 0x9e3779b97f4a7c15ull;
  uint64_t z = state;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

int failures = 0;

void fail(const char* what, double a, double b, double got, double want) {
  if (failures++ < 10) std::printf("FAIL %s(%.17g, %.17g) = %.17g, want %.17g\n", what, a, b, got, want);
}

void check_reciprocals() {
  for (uint64_t d = 1; d <= (1ull << 25); ++d) {
    const double x = static_cast<double>(d);
    if (rk::rcp_f64(x) != 1.0 / x) fail("rcp_f64", x, 0, rk::rcp_f64(x), 1.0 / x);
  }
  for (int i = 0; i < 20000000; ++i) {
    const double d = static_cast<double>(1 + next() % (1ull << 40));
    if (rk::rcp_f64(d) != 1.0 / d) fail("rcp_f64", d, 0, rk::rcp_f64(d), 1.0 / d);
    // Counts over counts (fractions of tokens), sums over counts (means).
    const double a = static_cast<double>(next() % (static_cast<uint64_t>(d) + 1));
    if (rk::div_f64(a, d) != a / d) fail("div_f64", a, d, rk::div_f64(a, d), a / d);
    double s;
    const uint64_t bits = (next() & 0x000fffffffffffffull) | (static_cast<uint64_t>(1023 - 40 + next() % 80) << 52);
    std::memcpy(&s, &bits, 8);
    if (rk::div_f64(s, d) != s / d) fail("div_f64", s, d, rk::div_f64(s, d), s / d);
  }
  std::printf("%s rcp_f64 for every d <= 2^25 and 2e7 random d <= 2^40; div_f64 on 4e7 random pairs\n",
              failures ? "FAIL" : "ok  ");
}

// Round-to-nearest-even of x to a format with `man` significand bits and minimum normal
// exponent `emin` (no overflow handling: the callers stay in range or check infinity apart).
double round_to(double x, int man, int emin) {
  if (x == 0.0) return x;
  int e;
  std::frexp(std::fabs(x), &e);  // |x| in [2^(e-1), 2^e)
  const int exp = std::max(e - 1, emin);
  const double ulp = std::ldexp(1.0, exp - man);
  const double q = x / ulp;  // exact: a scaling by a power of two
  double r = std::nearbyint(q);  // the default rounding mode: to nearest, ties to even
  return r * ulp;
}

template <typename Convert, typename Back>
int check_format(const char* name, Convert convert, Back back, int man, int emin, double max_finite) {
  int bad = 0;
  auto one = [&](uint32_t bits) {
    float f;
    std::memcpy(&f, &bits, 4);
    const float got = back(convert(f));
    if (std::isnan(f)) {
      if (!std::isnan(got)) ++bad;
      return;
    }
    double want = round_to(static_cast<double>(f), man, emin);
    // Past the largest finite value by half an ulp or more: infinity.
    const double half_ulp = std::ldexp(1.0, static_cast<int>(std::floor(std::log2(max_finite))) - man - 1);
    if (std::isinf(f) || std::fabs(static_cast<double>(f)) >= max_finite + half_ulp)
      want = std::copysign(INFINITY, static_cast<double>(f));
    if (static_cast<double>(got) != want || std::signbit(got) != std::signbit(f)) {
      if (bad++ < 5)
        std::printf("FAIL %s(%a) = %a, want %a\n", name, static_cast<double>(f), static_cast<double>(got), want);
    }
  };
  // Every exponent and sign, every prefix of the significand the format keeps (as far as 2^10
  // prefixes), the low bits at and around the rounding boundary.
  const int keep = man < 10 ? man : 10;
  const uint32_t shift = 23 - man;
  for (uint32_t sign = 0; sign < 2; ++sign)
    for (uint32_t exp = 0; exp < 256; ++exp)
      for (uint32_t prefix = 0; prefix < (1u << keep); ++prefix) {
        const uint32_t base = (sign << 31) | (exp << 23) | (prefix << (23 - keep));
        const uint32_t half = 1u << (shift - 1);
        for (uint32_t low : {0u, 1u, half - 1, half, half + 1, (1u << shift) - 1})
          one(base | (low & ((1u << (23 - keep)) - 1)));
      }
  for (int i = 0; i < 20000000; ++i) one(static_cast<uint32_t>(next()));
  std::printf("%s %s conversions (round to nearest even, NaN kept a NaN)\n", bad ? "FAIL" : "ok  ", name);
  return bad;
}

}  // namespace

int main() {
  check_reciprocals();
  failures += check_format(
      "__float2half_rn", [](float f) { return __float2half_rn(f); }, [](__half h) { return __half2float(h); }, 10,
      -14, 65504.0);
  failures += check_format(
      "__float2bfloat16_rn", [](float f) { return __float2bfloat16_rn(f); },
      [](__nv_bfloat16 b) { return __bfloat162float(b); }, 7, -126, 3.3895313892515355e38);
  // The device's canonical NaN.
  if (__float2half_rn(NAN).__x != 0x7fff || __float2bfloat16_rn(NAN).__x != 0x7fff) {
    std::printf("FAIL NaN does not convert to the canonical 0x7fff\n");
    ++failures;
  }
  std::printf("%s\n", failures ? "arithmetic tests FAILED" : "all arithmetic tests passed");
  return failures ? 1 : 0;
}
