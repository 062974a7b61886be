// The CUDA built-ins the kernels of kernels/*.cu use, for a host C++20 compiler.
//
// scripts/emulator.sh compiles every kernels/*.cu with this header force-included
// (-include rk_emu.h) and emulator/include first on the include path (so <cuda_fp16.h> and
// <cuda_bf16.h> are the ones beside this file). The kernels are the same sources nvcc builds;
// nothing here is a copy of a kernel.
//
// What each built-in becomes:
// - `threadIdx`, `blockIdx`, `blockDim`, `gridDim`: the running fiber's coordinates, read from
//   the SIMT runtime (emulator/src/builtins.cpp);
// - `__syncthreads*`, the warp shuffles and votes: calls into the runtime, which switches to
//   the other fibers of the block until the barrier or the warp collective completes;
// - `__shared__`: `static thread_local`. A block runs on one OS thread from start to end, so
//   every fiber of the block sees one copy and blocks running on other threads see theirs;
// - atomics: real atomic read-modify-writes in the runtime (blocks may run in parallel);
// - the `_rn` intrinsics: the IEEE operation they name in f32 (the library is built with
//   -ffp-contract=off, so nothing is fused behind the source's back), fmaf a correctly
//   rounded fused multiply-add.
#pragma once

#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include <math.h>
#include <stdint.h>

// ---- qualifiers ---------------------------------------------------------------------------
#ifdef RK_EMU_SCAN
// The scan pass (scripts/emulator.sh, emulator/scan_kernels.py) preprocesses each kernel file
// with these markers to list its kernels and their launch bounds.
#define __global__ __rk_global__
#define __launch_bounds__(...) __rk_bounds__(__VA_ARGS__)
#else
#define __global__
#define __launch_bounds__(...)
#endif
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __restrict__ __restrict
#define __shared__ static thread_local
#define __align__(n) alignas(n)

// ---- vector types -------------------------------------------------------------------------
struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
};
struct alignas(8) float2 {
  float x, y;
};
struct alignas(16) float4 {
  float x, y, z, w;
};
struct alignas(8) int2 {
  int x, y;
};
struct alignas(16) int4 {
  int x, y, z, w;
};
struct alignas(4) uchar4 {
  unsigned char x, y, z, w;
};
struct alignas(16) double2 {
  double x, y;
};
inline float2 make_float2(float x, float y) { return {x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline int2 make_int2(int x, int y) { return {x, y}; }
inline double2 make_double2(double x, double y) { return {x, y}; }

// ---- the SIMT runtime (emulator/src/builtins.cpp over simt.cpp; not instrumented) ------------
extern "C" {
uint3 rk_emu_thread_idx(void);
uint3 rk_emu_block_idx(void);
dim3 rk_emu_block_dim(void);
dim3 rk_emu_grid_dim(void);
// kind: 0 plain, 1 or, 2 and, 3 count. Returns the reduction (0 for plain).
int rk_emu_syncthreads(int kind, int predicate);
// kind: 0 idx, 1 up, 2 down, 3 xor. The value's 4 or 8 bytes travel in 64 bits.
unsigned long long rk_emu_shfl(int kind, unsigned mask, unsigned long long value, int arg, int width);
// kind: 0 ballot, 1 any, 2 all, 3 syncwarp.
unsigned rk_emu_vote(int kind, unsigned mask, int predicate);
// op: 0 add, 1 min, 2 max, 3 exch, 4 cas, 5 and, 6 or, 7 xor, 8 inc, 9 dec; ty: 0 i32, 1 u32,
// 2 u64, 3 i64, 4 f32, 5 f64. `compare` only for cas. Returns the old value's bits.
unsigned long long rk_emu_atomic(int op, int ty, void* address, unsigned long long value, unsigned long long compare);
void rk_emu_trap(const char* what);
}

#define threadIdx (rk_emu_thread_idx())
#define blockIdx (rk_emu_block_idx())
#define blockDim (rk_emu_block_dim())
#define gridDim (rk_emu_grid_dim())
#define warpSize 32

#define RK_EMU_INLINE inline __attribute__((always_inline))

RK_EMU_INLINE void __syncthreads() { rk_emu_syncthreads(0, 0); }
RK_EMU_INLINE int __syncthreads_or(int p) { return rk_emu_syncthreads(1, p != 0); }
RK_EMU_INLINE int __syncthreads_and(int p) { return rk_emu_syncthreads(2, p != 0); }
RK_EMU_INLINE int __syncthreads_count(int p) { return rk_emu_syncthreads(3, p != 0); }
RK_EMU_INLINE void __syncwarp(unsigned mask = 0xffffffffu) { rk_emu_vote(3, mask, 1); }
RK_EMU_INLINE unsigned __ballot_sync(unsigned mask, int p) { return rk_emu_vote(0, mask, p != 0); }
RK_EMU_INLINE int __any_sync(unsigned mask, int p) { return static_cast<int>(rk_emu_vote(1, mask, p != 0)); }
RK_EMU_INLINE int __all_sync(unsigned mask, int p) { return static_cast<int>(rk_emu_vote(2, mask, p != 0)); }
RK_EMU_INLINE void __trap() { rk_emu_trap("__trap()"); }

namespace rk_emu_detail {
template <typename T>
RK_EMU_INLINE T shfl(int kind, unsigned mask, T v, int arg, int width) {
  static_assert(std::is_trivially_copyable_v<T> && (sizeof(T) == 4 || sizeof(T) == 8), "shuffle of 4 or 8 bytes");
  unsigned long long bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  bits = rk_emu_shfl(kind, mask, bits, arg, width);
  T out;
  std::memcpy(&out, &bits, sizeof(T));
  return out;
}
}  // namespace rk_emu_detail

template <typename T>
RK_EMU_INLINE T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
  return rk_emu_detail::shfl(0, mask, v, src, width);
}
template <typename T>
RK_EMU_INLINE T __shfl_up_sync(unsigned mask, T v, unsigned d, int width = 32) {
  return rk_emu_detail::shfl(1, mask, v, static_cast<int>(d), width);
}
template <typename T>
RK_EMU_INLINE T __shfl_down_sync(unsigned mask, T v, unsigned d, int width = 32) {
  return rk_emu_detail::shfl(2, mask, v, static_cast<int>(d), width);
}
template <typename T>
RK_EMU_INLINE T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  return rk_emu_detail::shfl(3, mask, v, lane_mask, width);
}

// ---- atomics ------------------------------------------------------------------------------
namespace rk_emu_detail {
template <typename T>
constexpr int atomic_type() {
  if constexpr (std::is_same_v<T, int>) return 0;
  else if constexpr (std::is_same_v<T, unsigned>) return 1;
  else if constexpr (std::is_same_v<T, unsigned long long>) return 2;
  else if constexpr (std::is_same_v<T, long long>) return 3;
  else if constexpr (std::is_same_v<T, float>) return 4;
  else if constexpr (std::is_same_v<T, double>) return 5;
  else static_assert(sizeof(T) == 0, "atomic on an unsupported type");
}
template <typename T>
inline T atomic(int op, T* p, T v, T compare = T{}) {
  unsigned long long bits = 0, cmp = 0;
  std::memcpy(&bits, &v, sizeof(T));
  std::memcpy(&cmp, &compare, sizeof(T));
  bits = rk_emu_atomic(op, atomic_type<T>(), p, bits, cmp);
  T out;
  std::memcpy(&out, &bits, sizeof(T));
  return out;
}
}  // namespace rk_emu_detail

template <typename T> inline T atomicAdd(T* p, T v) { return rk_emu_detail::atomic(0, p, v); }
template <typename T> inline T atomicSub(T* p, T v) { return rk_emu_detail::atomic(0, p, static_cast<T>(-v)); }
template <typename T> inline T atomicMin(T* p, T v) { return rk_emu_detail::atomic(1, p, v); }
template <typename T> inline T atomicMax(T* p, T v) { return rk_emu_detail::atomic(2, p, v); }
template <typename T> inline T atomicExch(T* p, T v) { return rk_emu_detail::atomic(3, p, v); }
template <typename T> inline T atomicCAS(T* p, T compare, T v) { return rk_emu_detail::atomic(4, p, v, compare); }
template <typename T> inline T atomicAnd(T* p, T v) { return rk_emu_detail::atomic(5, p, v); }
template <typename T> inline T atomicOr(T* p, T v) { return rk_emu_detail::atomic(6, p, v); }
template <typename T> inline T atomicXor(T* p, T v) { return rk_emu_detail::atomic(7, p, v); }

// ---- f32 / f64 intrinsics (exact IEEE operations) -------------------------------------------
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __frcp_rn(float a) { return 1.0f / a; }
// The device's is an approximation (2 ulp); exact here. Kernels use it only where the result is
// refined (rcp_f64 in aggregation.cuh), so both give the same bits.
inline float __fdividef(float a, float b) { return a / b; }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dsub_rn(double a, double b) { return a - b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __ddiv_rn(double a, double b) { return a / b; }
inline double __drcp_rn(double a) { return 1.0 / a; }
inline double __fma_rn(double a, double b, double c) { return std::fma(a, b, c); }
inline float __int_as_float(int x) { return std::bit_cast<float>(x); }
inline int __float_as_int(float x) { return std::bit_cast<int>(x); }
inline float __uint_as_float(unsigned x) { return std::bit_cast<float>(x); }
inline unsigned __float_as_uint(float x) { return std::bit_cast<unsigned>(x); }
inline double __longlong_as_double(long long x) { return std::bit_cast<double>(x); }
inline long long __double_as_longlong(double x) { return std::bit_cast<long long>(x); }

// The device's math library by the same names comes from <math.h>: the host's libm, within the
// device's documented error bounds but not bit-identical to it (see docs/emulator.md).
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }

// CUDA's integer min / max overloads (the device headers declare them for every integer type).
template <typename A, typename B>
  requires std::is_integral_v<A> && std::is_integral_v<B>
inline std::common_type_t<A, B> min(A a, B b) {
  using C = std::common_type_t<A, B>;
  return static_cast<C>(a) < static_cast<C>(b) ? static_cast<C>(a) : static_cast<C>(b);
}
template <typename A, typename B>
  requires std::is_integral_v<A> && std::is_integral_v<B>
inline std::common_type_t<A, B> max(A a, B b) {
  using C = std::common_type_t<A, B>;
  return static_cast<C>(a) < static_cast<C>(b) ? static_cast<C>(b) : static_cast<C>(a);
}
inline float min(float a, float b) { return std::fmin(a, b); }
inline float max(float a, float b) { return std::fmax(a, b); }
inline double min(double a, double b) { return std::fmin(a, b); }
inline double max(double a, double b) { return std::fmax(a, b); }
