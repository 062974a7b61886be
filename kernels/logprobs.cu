// logprobs family: log-softmax over rows (forward and backward).
//
// Launch contract (checked by src/cuda/logprobs.rs before every launch):
//   grid = (rows, 1, 1), block = (B, 1, 1) with B a multiple of 32, 32 <= B <= 1024, chosen
//   from `cols` and the dtype only; 0 < rows, 0 < cols <= 2^31 - 1; every row pointer
//   `base + row * ld` is valid for `cols` elements; `status` points to one u64.
// Formulas: MATH.md §1. z = x / τ; lse = max(z) + ln Σ exp(z - max z); out = z - lse.
#include "common.cuh"

using namespace rk;

namespace {

constexpr unsigned OP_LOG_SOFTMAX_FORWARD = 1;
constexpr unsigned OP_LOG_SOFTMAX_BACKWARD = 2;

// out[row, v] = (x[v] - max x) / τ - ln Σ_u 2^((x[u] - max x)·log2(e)/τ)
template <typename T>
__device__ void log_softmax_forward(const T* __restrict__ logits, long long ld_logits,
                                    float* __restrict__ out, long long ld_out, int rows,
                                    int cols, float inv_tau,
                                    unsigned long long* __restrict__ status) {
  constexpr int N = VecOf<T>::N;
  __shared__ float scratch[64];
  const long long row = blockIdx.x;
  if (row >= rows) return;
  const T* x = logits + row * ld_logits;
  float* y = out + row * ld_out;
  const long long nchunks = (cols + N - 1) / N;
  const bool x_vec = aligned16(x);
  const float c = inv_tau * LOG2E;

  OnlineLse st;
  unsigned flags = 0;
  for (long long k = threadIdx.x; k < nchunks; k += blockDim.x) {
    float v[N];
    load_chunk(x, k, cols, x_vec, neg_inf(), v);
    flags |= chunk_flags(v);
    st.add_chunk(v, c);
  }
  const bool has_nan = __syncthreads_or(flags & 1u);
  const bool has_inf = __syncthreads_or(flags & 2u);
  st = block_merge_lse(st, c, scratch);
  const unsigned problem = has_nan               ? PROBLEM_NAN
                           : has_inf             ? PROBLEM_POS_INF
                           : st.m == neg_inf()   ? PROBLEM_ALL_NEG_INF
                                                 : 0u;
  if (problem != 0 && threadIdx.x == 0) report(status, row, OP_LOG_SOFTMAX_FORWARD, problem);

  const float ln_s = logf(st.s);
  const bool y_vec = aligned16(y);
  for (long long k = threadIdx.x; k < nchunks; k += blockDim.x) {
    float v[N];
    load_chunk(x, k, cols, x_vec, neg_inf(), v);
#pragma unroll
    for (int i = 0; i < N; ++i) v[i] = problem != 0 ? quiet_nan() : (v[i] - st.m) * inv_tau - ln_s;
    store_f32_chunk<N>(y, k * N, cols, y_vec, v);
  }
}

// grad[row, v] = (g[v] - exp(out[v]) · Σ_u g[u]) / τ, written in the logits dtype.
template <typename T>
__device__ void log_softmax_backward(const float* __restrict__ out, long long ld_out,
                                     const float* __restrict__ grad_out, long long ld_grad_out,
                                     T* __restrict__ grad, long long ld_grad, int rows, int cols,
                                     float inv_tau, unsigned long long* __restrict__ status) {
  constexpr int N = VecOf<T>::N;
  __shared__ float scratch[32];
  const long long row = blockIdx.x;
  if (row >= rows) return;
  const float* y = out + row * ld_out;
  const float* g = grad_out + row * ld_grad_out;
  T* dx = grad + row * ld_grad;
  const bool y_vec = aligned16(y), g_vec = aligned16(g), dx_vec = aligned16(dx);

  // Σ g over the row, in chunks of 4 floats.
  const long long nchunks4 = (cols + 3) / 4;
  float partial = 0.0f;
  for (long long k = threadIdx.x; k < nchunks4; k += blockDim.x) {
    float v[4];
    load_f32<4>(g, k * 4, cols, g_vec, 0.0f, v);
    partial += (v[0] + v[1]) + (v[2] + v[3]);
  }
  const float total = block_sum(partial, scratch);
  const bool grad_bad = !isfinite(total);

  const long long nchunks = (cols + N - 1) / N;
  unsigned flags = 0;
  for (long long k = threadIdx.x; k < nchunks; k += blockDim.x) {
    float yv[N], gv[N], r[N];
    load_f32<N>(y, k * N, cols, y_vec, 0.0f, yv);
    load_f32<N>(g, k * N, cols, g_vec, 0.0f, gv);
    flags |= chunk_flags(yv);
#pragma unroll
    for (int i = 0; i < N; ++i)
      r[i] = grad_bad ? quiet_nan() : (gv[i] - exp2f(yv[i] * LOG2E) * total) * inv_tau;
    store_chunk(dx, k, cols, dx_vec, r);
  }
  // A NaN or +inf in `out` cannot come from log_softmax_forward: report it as a NaN input.
  const bool out_bad = __syncthreads_or(flags);
  if (threadIdx.x == 0) {
    if (out_bad) report(status, row, OP_LOG_SOFTMAX_BACKWARD, PROBLEM_NAN);
    else if (grad_bad) report(status, row, OP_LOG_SOFTMAX_BACKWARD, PROBLEM_GRAD_NON_FINITE);
  }
}

}  // namespace

#define RK_LOG_SOFTMAX(SUFFIX, T)                                                              \
  extern "C" __global__ void __launch_bounds__(1024) log_softmax_forward_##SUFFIX(            \
      const T* logits, long long ld_logits, float* out, long long ld_out, int rows, int cols,  \
      float inv_tau, unsigned long long* status) {                                             \
    log_softmax_forward<T>(logits, ld_logits, out, ld_out, rows, cols, inv_tau, status);       \
  }                                                                                            \
  extern "C" __global__ void __launch_bounds__(1024) log_softmax_backward_##SUFFIX(           \
      const float* out, long long ld_out, const float* grad_out, long long ld_grad_out,        \
      T* grad, long long ld_grad, int rows, int cols, float inv_tau,                           \
      unsigned long long* status) {                                                            \
    log_softmax_backward<T>(out, ld_out, grad_out, ld_grad_out, grad, ld_grad, rows, cols,     \
                            inv_tau, status);                                                  \
  }

RK_LOG_SOFTMAX(f32, float)
RK_LOG_SOFTMAX(f16, __half)
RK_LOG_SOFTMAX(bf16, __nv_bfloat16)
