// Shared device helpers for every op family: dtype conversion, 16-byte vector loads, the
// online (max, sum) softmax state and deterministic warp/block reductions.
//
// Conventions (every kernel follows them):
// - All arithmetic is in f32; inputs are converted in registers.
// - A row of `cols` elements is cut into chunks of `VecOf<T>::N` consecutive elements
//   (16 bytes). Chunk k belongs to thread k % blockDim.x, and each thread walks its chunks
//   in increasing order. The chunk assignment depends only on `cols`, the dtype and the block
//   size (itself chosen from `cols` alone), never on the row's address or on other rows, so
//   the reduction order is batch-invariant and bitwise deterministic. Alignment only decides
//   whether a full chunk is read with one 16-byte load or with scalar loads.
// - No floating-point atomics. Problems with the input are reported through one `u64` status
//   word with an integer atomicMin (see `report`), never by a silent NaN.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

namespace rk {

// The number of fields of an aggregate: the most initialisers `T{...}` takes, each converting
// to whatever its field is. Pinned beside every struct the host shares (with its size and
// offsets), so a field added on one side only, even into padding, is a build error. nvcc's front
// end cannot evaluate it (it crashes), so the count is checked where the kernels are built as
// plain C++: the emulated device, which CI builds; sizes and offsets are checked everywhere.
#ifdef __CUDACC__
#define RK_FIELDS(T, n) true
#else
#define RK_FIELDS(T, n) (::rk::field_count<T>(0) == (n))
struct AnyField {
  template <typename T>
  operator T() const;
};
template <typename T, typename... A>
constexpr int field_count(long) {  // T{A{}...} is the longest initialiser list that compiles
  return sizeof...(A);
}
template <typename T, typename... A>
constexpr auto field_count(int) -> decltype(T{A{}..., AnyField{}}, int()) {
  return field_count<T, A..., AnyField>(0);
}
#endif

constexpr float LOG2E = 1.4426950408889634f;
constexpr float LN2 = 0.6931471805599453f;
__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }
__device__ __forceinline__ float pos_inf() { return __int_as_float(0x7f800000); }
__device__ __forceinline__ float quiet_nan() { return __int_as_float(0x7fffffff); }

// ---- dtype conversion -----------------------------------------------------------------
__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_f32<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// Whether `x` converts to a finite T: |x| below the smallest magnitude that rounds to ±inf in T
// (+inf for f32, 65520 for f16, 0x7F7F8000 for bf16; src/dtype.rs Element::OVERFLOW_AT). False
// for NaN.
template <typename T> __device__ __forceinline__ float overflow_at();
template <> __device__ __forceinline__ float overflow_at<float>() { return pos_inf(); }
template <> __device__ __forceinline__ float overflow_at<__half>() { return 65520.0f; }
template <> __device__ __forceinline__ float overflow_at<__nv_bfloat16>() { return __int_as_float(0x7f7f8000); }
template <typename T> __device__ __forceinline__ bool fits(float x) { return fabsf(x) < overflow_at<T>(); }

// ---- vector chunks -----------------------------------------------------------------------
// N consecutive elements loaded or stored at once: 16 bytes by default (4 f32, 8 f16/bf16).
template <typename T, int N_ = 16 / sizeof(T)> struct alignas(N_ * sizeof(T)) VecOf {
  static constexpr int N = N_;
  T v[N];
};

__device__ __forceinline__ bool aligned16(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15u) == 0;
}

__device__ __forceinline__ bool aligned_to(const void* p, unsigned bytes) {
  return (reinterpret_cast<uintptr_t>(p) & (bytes - 1u)) == 0;
}

// Loads chunk `k` (N elements) of a row into `out` (f32). Elements past `cols` read as `fill`.
// `vec_ok` says the row start is aligned to N·sizeof(T) bytes, so a full chunk is one vector
// load.
template <typename T, int N>
__device__ __forceinline__ void load_chunk(const T* __restrict__ row, long long k, int cols,
                                           bool vec_ok, float fill, float (&out)[N]) {
  const long long start = k * N;
  if (vec_ok && start + N <= cols) {
    const VecOf<T, N> chunk = reinterpret_cast<const VecOf<T, N>*>(row)[k];
#pragma unroll
    for (int i = 0; i < N; ++i) out[i] = to_f32(chunk.v[i]);
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) out[i] = (start + i < cols) ? to_f32(row[start + i]) : fill;
  }
}

// Loads `N` floats (N a multiple of 4) starting at element `start` of an f32 row, with
// float4 loads when the row start is 16-byte aligned; elements past `cols` read as `fill`.
template <int N>
__device__ __forceinline__ void load_f32(const float* __restrict__ row, long long start, int cols,
                                         bool vec_ok, float fill, float (&out)[N]) {
  if (vec_ok && start + N <= cols) {
    const float4* src = reinterpret_cast<const float4*>(row + start);
#pragma unroll
    for (int i = 0; i < N / 4; ++i) {
      const float4 q = src[i];
      out[4 * i] = q.x;
      out[4 * i + 1] = q.y;
      out[4 * i + 2] = q.z;
      out[4 * i + 3] = q.w;
    }
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) out[i] = (start + i < cols) ? row[start + i] : fill;
  }
}

// Stores `N` floats of a chunk that starts at element `start` of an f32 row. `vec_ok` says
// the row start is 16-byte aligned (N is a multiple of 4 for every dtype we load).
template <int N>
__device__ __forceinline__ void store_f32_chunk(float* __restrict__ row, long long start,
                                                int cols, bool vec_ok, const float (&v)[N]) {
  if (vec_ok && start + N <= cols) {
    float4* dst = reinterpret_cast<float4*>(row + start);
#pragma unroll
    for (int i = 0; i < N / 4; ++i) dst[i] = make_float4(v[4 * i], v[4 * i + 1], v[4 * i + 2], v[4 * i + 3]);
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i)
      if (start + i < cols) row[start + i] = v[i];
  }
}

// Stores `N` values (converted to T) of a chunk that starts at element `k * N` of a T row;
// `vec_ok` as for load_chunk.
template <typename T, int N>
__device__ __forceinline__ void store_chunk(T* __restrict__ row, long long k, int cols,
                                            bool vec_ok, const float (&v)[N]) {
  const long long start = k * N;
  if (vec_ok && start + N <= cols) {
    VecOf<T, N> chunk;
#pragma unroll
    for (int i = 0; i < N; ++i) chunk.v[i] = from_f32<T>(v[i]);
    reinterpret_cast<VecOf<T, N>*>(row)[k] = chunk;
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i)
      if (start + i < cols) row[start + i] = from_f32<T>(v[i]);
  }
}

// ---- online softmax state ---------------------------------------------------------------
// Running max `m` of the raw inputs and `s` = Σ 2^((x - m)·c), with c = log2(e)/τ, so
// lse = m/τ + ln(s). Working on raw inputs means no overflow for huge finite logits.
// The merge follows MATH.md §1: (m, s) ⊕ (m', s') = (M, s·2^((m-M)c) + s'·2^((m'-M)c)),
// and M = -inf gives (-inf, 0) without evaluating -inf - (-inf).
struct OnlineLse {
  float m;
  float s;
  __device__ __forceinline__ OnlineLse() : m(neg_inf()), s(0.0f) {}

  // Folds a chunk of values in, in index order. NaN and +inf are not handled here: the
  // caller flags them (see RowFlags) and the row's result is discarded.
  template <int N>
  __device__ __forceinline__ void add_chunk(const float (&x)[N], float c) {
    float cm = x[0];
#pragma unroll
    for (int i = 1; i < N; ++i) cm = fmaxf(cm, x[i]);
    if (cm == neg_inf()) return;  // the whole chunk is -inf: contributes 0
    if (cm > m) {
      s = (m == neg_inf()) ? 0.0f : s * exp2f((m - cm) * c);
      m = cm;
    }
#pragma unroll
    for (int i = 0; i < N; ++i) s += exp2f((x[i] - m) * c);
  }

  __device__ __forceinline__ void merge(float m2, float s2, float c) {
    const float M = fmaxf(m, m2);
    if (M == neg_inf()) return;  // both empty: stays (-inf, 0)
    const float a = (m == neg_inf()) ? 0.0f : s * exp2f((m - M) * c);
    const float b = (m2 == neg_inf()) ? 0.0f : s2 * exp2f((m2 - M) * c);
    m = M;
    s = a + b;
  }
};

// ---- online (max, Σe, Σe·d) state for log-probabilities and entropy ---------------------
// For raw logits x with running max m (x units) and d = (x - m)/τ (z units, <= 0):
//   s = Σ exp(d),  t = Σ exp(d)·d   (terms with exp(d) = 0 contribute 0, never 0·(-inf)),
// so ln Σ exp(z) = m/τ + ln s and Σ p·(z - m/τ) = t/s, i.e. entropy H = ln s - t/s.
// Every operation uses explicit round-to-nearest intrinsics or fmaf (and the files are built
// with --fmad=false), so the same inputs give the same bits in every kernel that inlines it.
struct Partial {
  float m, s, t;
  __device__ __forceinline__ Partial() : m(neg_inf()), s(0.0f), t(0.0f) {}

  // (m1, s1, t1) ⊕ (m2, s2, t2) at M = max(m1, m2):
  //   s = a1·s1 + a2·s2,  t = a1·(t1 + δ1·s1) + a2·(t2 + δ2·s2),  a_i = exp(δ_i), δ_i = (m_i - M)/τ.
  // An empty side (m = -inf) contributes nothing.
  __device__ __forceinline__ void merge(const Partial& o, float inv_tau) {
    if (o.m == neg_inf()) return;  // nothing to add
    if (m == neg_inf()) {          // nothing here yet: take the other side as it is
      *this = o;
      return;
    }
    const float M = fmaxf(m, o.m);
    const float d1 = __fmul_rn(__fsub_rn(m, M), inv_tau);
    const float d2 = __fmul_rn(__fsub_rn(o.m, M), inv_tau);
    const float a1 = exp2f(__fmul_rn(d1, LOG2E));
    const float a2 = exp2f(__fmul_rn(d2, LOG2E));
    // A side rescaled to 0 contributes 0 to t: never 0·(-inf) when d·s overflows.
    const float t1 = a1 > 0.0f ? __fmul_rn(a1, fmaf(d1, s, t)) : 0.0f;
    const float t2 = a2 > 0.0f ? __fmul_rn(a2, fmaf(d2, o.s, o.t)) : 0.0f;
    const float t_new = __fadd_rn(t1, t2);
    s = __fadd_rn(__fmul_rn(a1, s), __fmul_rn(a2, o.s));
    t = t_new;
    m = M;
  }
};

// Butterfly merge across a warp, then across the warps of the block: every thread returns the
// same block-wide Partial. `scratch` holds 96 floats; ends with a __syncthreads.
__device__ __forceinline__ Partial block_merge_partial(Partial p, float inv_tau, float* scratch) {
  const int warps = blockDim.x >> 5;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    Partial q;
    q.m = __shfl_xor_sync(0xffffffffu, p.m, o);
    q.s = __shfl_xor_sync(0xffffffffu, p.s, o);
    q.t = __shfl_xor_sync(0xffffffffu, p.t, o);
    p.merge(q, inv_tau);
  }
  if (warps == 1) return p;
  if (lane == 0) {
    scratch[warp] = p.m;
    scratch[32 + warp] = p.s;
    scratch[64 + warp] = p.t;
  }
  __syncthreads();
  Partial total;
  if (lane < warps) {
    total.m = scratch[lane];
    total.s = scratch[32 + lane];
    total.t = scratch[64 + lane];
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    Partial q;
    q.m = __shfl_xor_sync(0xffffffffu, total.m, o);
    q.s = __shfl_xor_sync(0xffffffffu, total.s, o);
    q.t = __shfl_xor_sync(0xffffffffu, total.t, o);
    total.merge(q, inv_tau);
  }
  __syncthreads();
  return total;
}

// ---- input problems ---------------------------------------------------------------------
// Problem codes shared with src/error.rs (RowProblem). Lower code wins within a row.
enum Problem : unsigned {
  PROBLEM_NAN = 1,
  PROBLEM_POS_INF = 2,
  PROBLEM_ALL_NEG_INF = 3,
  PROBLEM_GRAD_NON_FINITE = 4,
  PROBLEM_TARGET_OUT_OF_RANGE = 5,
  PROBLEM_INFINITE_KL = 6,
  PROBLEM_NON_FINITE = 7,
  PROBLEM_OVERFLOW = 8,
};

// Records the lowest (row, op, problem) seen into the status word. Integer atomicMin:
// the surviving value does not depend on the order in which blocks run.
__device__ __forceinline__ void report(unsigned long long* status, long long row, unsigned op,
                                       unsigned problem) {
  const unsigned long long word =
      (static_cast<unsigned long long>(row) << 16) | (static_cast<unsigned long long>(op) << 8) |
      problem;
  atomicMin(status, word);
}

template <int N>
__device__ __forceinline__ unsigned chunk_flags(const float (&x)[N]) {
  unsigned f = 0;
#pragma unroll
  for (int i = 0; i < N; ++i) {
    f |= (x[i] != x[i]) ? 1u : 0u;
    f |= (x[i] == pos_inf()) ? 2u : 0u;
  }
  return f;
}

// ---- reductions -------------------------------------------------------------------------
// Butterfly reductions: every lane ends with the same value, combined in a fixed order.
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ void warp_merge_lse(OnlineLse& st, float c) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float m2 = __shfl_xor_sync(0xffffffffu, st.m, o);
    const float s2 = __shfl_xor_sync(0xffffffffu, st.s, o);
    st.merge(m2, s2, c);
  }
}

// Block-wide merge of the online state; every thread returns the row's (m, s). The block
// size is a multiple of 32 and at most 1024; `scratch` holds 64 floats. Ends with a
// __syncthreads, so the scratch can be reused right after.
__device__ __forceinline__ OnlineLse block_merge_lse(OnlineLse st, float c, float* scratch) {
  const int warps = blockDim.x >> 5;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  warp_merge_lse(st, c);
  if (warps == 1) return st;
  if (lane == 0) {
    scratch[warp] = st.m;
    scratch[32 + warp] = st.s;
  }
  __syncthreads();
  OnlineLse total;
  if (lane < warps) {
    total.m = scratch[lane];
    total.s = scratch[32 + lane];
  }
  warp_merge_lse(total, c);  // lanes >= warps hold (-inf, 0), the identity
  __syncthreads();
  return total;
}

// Block-wide sum in a fixed order; every thread returns the total. `scratch`: 32 floats.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
  const int warps = blockDim.x >> 5;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = warp_sum(v);
  if (warps == 1) return v;
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float total = (lane < warps) ? scratch[lane] : 0.0f;
  total = warp_sum(total);
  __syncthreads();
  return total;
}

}  // namespace rk
