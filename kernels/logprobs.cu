// logprobs family: log-softmax over rows (forward and backward).
//
// Launch contract (checked by src/cuda/logprobs/*.rs before every launch):
//   grid = (rows, 1, 1), block = (B, 1, 1) with B a multiple of 32, 32 <= B <= 1024, chosen
//   from `cols` and the dtype only; 0 < rows, 0 < cols <= 2^31 - 1; every row pointer
//   `base + row * ld` is valid for `cols` elements; `status` points to one u64.
// Formulas: MATH.md §1. z = x / τ; lse = max(z) + ln Σ exp(z - max z); out = z - lse.
#include <stddef.h>

#include "common.cuh"

using namespace rk;

namespace {

constexpr unsigned OP_LOG_SOFTMAX_FORWARD = 1;
constexpr unsigned OP_LOG_SOFTMAX_BACKWARD = 2;

// out[row, v] = (x[v] - max x) / τ - ln Σ_u 2^((x[u] - max x)·log2(e)/τ)
// The log-softmax kernels move 4 elements per thread and access: 16-byte f32 output stores and,
// for f16/bf16 logits, 8-byte loads, so that consecutive lanes touch consecutive bytes of both
// the logits and the f32 output (an 8-element chunk would write 32 bytes per lane, in two
// stores half a warp's width apart).
constexpr int LS_N = 4;
// Each thread keeps its first LS_RESIDENT chunks (32 floats) in registers between the reduction
// and the output pass, so a row of up to LS_RESIDENT · 4 · blockDim.x elements (32768 at 1024
// threads; src/cuda/logprobs/log_softmax.rs sizes the block for it) is read from global memory
// once. The chunks of a wider row past those are read a second time. Both loops visit the chunks
// in the same order, so the result does not depend on how much of the row stays resident.
constexpr int LS_RESIDENT = 8;
static_assert(LS_N == 4, "the backward sums a chunk as (g0 + g1) + (g2 + g3)");

template <typename T>
__device__ void log_softmax_forward(const T* __restrict__ logits, long long ld_logits,
                                    float* __restrict__ out, long long ld_out, int rows,
                                    int cols, float inv_tau,
                                    unsigned long long* __restrict__ status) {
  constexpr int N = LS_N;
  __shared__ float scratch[64];
  const long long row = blockIdx.x;
  if (row >= rows) return;
  const T* x = logits + row * ld_logits;
  float* y = out + row * ld_out;
  const long long nchunks = (static_cast<long long>(cols) + N - 1) / N;
  const bool x_vec = aligned_to(x, N * sizeof(T));
  const float c = inv_tau * LOG2E;
  const long long stride = blockDim.x;

  OnlineLse st;
  unsigned flags = 0;
  float kept[LS_RESIDENT][N];
#pragma unroll
  for (int r = 0; r < LS_RESIDENT; ++r) {
    const long long k = threadIdx.x + r * stride;
    if (k < nchunks) {
      load_chunk(x, k, cols, x_vec, neg_inf(), kept[r]);
      flags |= chunk_flags(kept[r]);
      st.add_chunk(kept[r], c);
    }
  }
  for (long long k = threadIdx.x + LS_RESIDENT * stride; k < nchunks; k += stride) {
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
#pragma unroll
  for (int r = 0; r < LS_RESIDENT; ++r) {
    const long long k = threadIdx.x + r * stride;
    if (k < nchunks) {
#pragma unroll
      for (int i = 0; i < N; ++i)
        kept[r][i] = problem != 0 ? quiet_nan() : (kept[r][i] - st.m) * inv_tau - ln_s;
      store_f32_chunk<N>(y, k * N, cols, y_vec, kept[r]);
    }
  }
  for (long long k = threadIdx.x + LS_RESIDENT * stride; k < nchunks; k += stride) {
    float v[N];
    load_chunk(x, k, cols, x_vec, neg_inf(), v);
#pragma unroll
    for (int i = 0; i < N; ++i) v[i] = problem != 0 ? quiet_nan() : (v[i] - st.m) * inv_tau - ln_s;
    store_f32_chunk<N>(y, k * N, cols, y_vec, v);
  }
}

// grad[row, v] = (g[v] - exp(out[v]) · Σ_u g[u]) / τ, written in the logits dtype. The first
// LS_RESIDENT chunks of `g` each thread sums stay in registers for the output pass, as in the
// forward.
template <typename T>
__device__ void log_softmax_backward(const float* __restrict__ out, long long ld_out,
                                     const float* __restrict__ grad_out, long long ld_grad_out,
                                     T* __restrict__ grad, long long ld_grad, int rows, int cols,
                                     float inv_tau, unsigned long long* __restrict__ status) {
  constexpr int N = LS_N;
  __shared__ float scratch[32];
  const long long row = blockIdx.x;
  if (row >= rows) return;
  const float* y = out + row * ld_out;
  const float* g = grad_out + row * ld_grad_out;
  T* dx = grad + row * ld_grad;
  const bool y_vec = aligned16(y), g_vec = aligned16(g), dx_vec = aligned_to(dx, N * sizeof(T));
  const long long nchunks = (static_cast<long long>(cols) + N - 1) / N;
  const long long stride = blockDim.x;

  // Σ g over the row, chunk by chunk.
  float partial = 0.0f;
  float kept[LS_RESIDENT][N];
#pragma unroll
  for (int r = 0; r < LS_RESIDENT; ++r) {
    const long long k = threadIdx.x + r * stride;
    if (k < nchunks) {
      load_f32<N>(g, k * N, cols, g_vec, 0.0f, kept[r]);
      partial += (kept[r][0] + kept[r][1]) + (kept[r][2] + kept[r][3]);
    }
  }
  for (long long k = threadIdx.x + LS_RESIDENT * stride; k < nchunks; k += stride) {
    float v[N];
    load_f32<N>(g, k * N, cols, g_vec, 0.0f, v);
    partial += (v[0] + v[1]) + (v[2] + v[3]);
  }
  const float total = block_sum(partial, scratch);
  const bool grad_bad = !isfinite(total);

  unsigned flags = 0;
  bool overflow = false;  // a finite input whose gradient does not fit T
  const auto output = [&](long long k, const float (&gv)[N]) {
    float yv[N], r[N];
    load_f32<N>(y, k * N, cols, y_vec, 0.0f, yv);
    flags |= chunk_flags(yv);
#pragma unroll
    for (int i = 0; i < N; ++i) {
      r[i] = grad_bad ? quiet_nan() : (gv[i] - exp2f(yv[i] * LOG2E) * total) * inv_tau;
      overflow |= k * N + i < cols && !fits<T>(r[i]);
    }
    store_chunk(dx, k, cols, dx_vec, r);
  };
#pragma unroll
  for (int r = 0; r < LS_RESIDENT; ++r) {
    const long long k = threadIdx.x + r * stride;
    if (k < nchunks) output(k, kept[r]);
  }
  for (long long k = threadIdx.x + LS_RESIDENT * stride; k < nchunks; k += stride) {
    float gv[N];
    load_f32<N>(g, k * N, cols, g_vec, 0.0f, gv);
    output(k, gv);
  }
  // A NaN or +inf in `out` cannot come from log_softmax_forward: report it as a NaN input (the
  // row's gradient is then meaningless).
  const bool out_bad = __syncthreads_or(flags);
  const bool any_overflow = __syncthreads_or(overflow);
  if (threadIdx.x == 0) {
    if (out_bad) report(status, row, OP_LOG_SOFTMAX_BACKWARD, PROBLEM_NAN);
    else if (grad_bad) report(status, row, OP_LOG_SOFTMAX_BACKWARD, PROBLEM_GRAD_NON_FINITE);
    else if (any_overflow) report(status, row, OP_LOG_SOFTMAX_BACKWARD, PROBLEM_OVERFLOW);
  }
}


// ---- token log-probabilities, entropy and lse ---------------------------------------------
// A row is cut into chunks of TOKEN_BLOCK · TOKEN_VPT vectors (4096 f32 or 8192 f16/bf16
// logits): thread i of a chunk owns vectors i, i + 256, i + 512, i + 768 of it. Each chunk
// gives one Partial (block-merged in a fixed tree), and a row is the fold of its chunks'
// Partials in chunk order. Whether one block walks the whole row (many rows) or one block
// per chunk writes its Partial for a merge kernel (few rows, to fill the GPU), the same
// operations run in the same order: the result depends on V and the dtype only.

constexpr int TOKEN_BLOCK = 256;
constexpr int TOKEN_VPT = 4;
constexpr unsigned OP_TOKEN_LOGPROBS = 3;
constexpr unsigned OP_TOKEN_LOGPROBS_BACKWARD = 4;

}  // namespace

// The record types below appear in the kernels' parameter blocks, so they have external
// linkage (outside the anonymous namespace).

// Mirrors src/logprobs.rs `VocabPartial` (repr(C), 20 bytes).
struct VocabPartial {
  float max_logit, sum_exp, sum_exp_d, target_logit;
  unsigned flags;
};
static_assert(RK_FIELDS(VocabPartial, 5) && sizeof(VocabPartial) == 20 &&
                  offsetof(VocabPartial, max_logit) == 0 && offsetof(VocabPartial, sum_exp) == 4 &&
                  offsetof(VocabPartial, sum_exp_d) == 8 && offsetof(VocabPartial, target_logit) == 12 &&
                  offsetof(VocabPartial, flags) == 16,
              "VocabPartial: every field where src/logprobs.rs `VocabPartial` has it");
constexpr unsigned PART_NAN = 1, PART_POS_INF = 2, PART_HAS_TARGET = 4;

// Target ids arrive as i32 (kind 0), u32 (1) or i64 (2).
__device__ __forceinline__ long long load_target(const void* targets, int kind, long long row) {
  if (kind == 0) return static_cast<const int*>(targets)[row];
  if (kind == 1) return static_cast<const unsigned*>(targets)[row];
  return static_cast<const long long*>(targets)[row];
}

// Row selection shared by every token kernel: mask byte 0, or the target equals the ignore
// index, means the row is padding: outputs 0, gradient 0, logits never read.
struct RowSelect {
  const void* targets;
  int index_kind;
  const unsigned char* mask;  // nullable
  int has_ignore;
  long long ignore_index;

  __device__ __forceinline__ bool masked(long long row, long long target) const {
    return (mask != nullptr && mask[row] == 0) || (has_ignore && target == ignore_index);
  }
};
static_assert(RK_FIELDS(RowSelect, 5) && sizeof(RowSelect) == 40 && offsetof(RowSelect, targets) == 0 &&
                  offsetof(RowSelect, index_kind) == 8 && offsetof(RowSelect, mask) == 16 &&
                  offsetof(RowSelect, has_ignore) == 24 && offsetof(RowSelect, ignore_index) == 32,
              "RowSelect: every field where src/cuda/logprobs/token_launch.rs `RowSelect` has it");

namespace {

template <typename T>
__device__ __forceinline__ long long token_chunk_len() {
  return static_cast<long long>(TOKEN_BLOCK) * TOKEN_VPT * VecOf<T>::N;
}

// The Partial of chunk `c` of row `x`, identical in every thread; `flags` gets bit 0 for a
// NaN and bit 1 for a +inf among this thread's elements.
template <typename T, bool ENTROPY>
__device__ __forceinline__ Partial chunk_partial(const T* __restrict__ x, long long c, int cols, bool vec_ok,
                                                 float inv_tau, float* scratch, unsigned& flags) {
  constexpr int N = VecOf<T>::N;
  float v[TOKEN_VPT][N];
#pragma unroll
  for (int j = 0; j < TOKEN_VPT; ++j) {
    const long long k = c * (TOKEN_BLOCK * TOKEN_VPT) + j * TOKEN_BLOCK + threadIdx.x;
    load_chunk(x, k, cols, vec_ok, neg_inf(), v[j]);
  }
  Partial p;
#pragma unroll
  for (int j = 0; j < TOKEN_VPT; ++j) {
    flags |= chunk_flags(v[j]);
#pragma unroll
    for (int i = 0; i < N; ++i) p.m = fmaxf(p.m, v[j][i]);
  }
  if (p.m != neg_inf()) {
#pragma unroll
    for (int j = 0; j < TOKEN_VPT; ++j) {
#pragma unroll
      for (int i = 0; i < N; ++i) {
        const float d = __fmul_rn(__fsub_rn(v[j][i], p.m), inv_tau);
        const float e = exp2f(__fmul_rn(d, LOG2E));
        p.s = __fadd_rn(p.s, e);
        if (ENTROPY) p.t = fmaf(e, fmaxf(d, -1.0e30f), p.t);  // exp(-inf)·(-inf) is 0, not NaN
      }
    }
  }
  return block_merge_partial(p, inv_tau, scratch);
}

// Writes logp, entropy and lse of one row from its folded Partial and the target's logit, or
// NaN and a report when the row has no defined result. Called by one thread.
__device__ __forceinline__ void finish_row(long long row, const Partial& p, unsigned flags, bool has_target,
                                           float target_logit, float inv_tau, float* logp, float* entropy,
                                           float* lse, unsigned long long* status) {
  unsigned problem = (flags & PART_NAN)       ? PROBLEM_NAN
                     : (flags & PART_POS_INF) ? PROBLEM_POS_INF
                     : p.m == neg_inf()       ? PROBLEM_ALL_NEG_INF
                     : !has_target            ? PROBLEM_TARGET_OUT_OF_RANGE
                                              : 0u;
  float lp = quiet_nan(), h = quiet_nan(), l = quiet_nan();
  if (problem == 0) {
    const float ln_s = logf(p.s);
    l = __fadd_rn(__fmul_rn(p.m, inv_tau), ln_s);
    if (isfinite(l)) {
      lp = __fsub_rn(__fmul_rn(__fsub_rn(target_logit, p.m), inv_tau), ln_s);
      h = __fsub_rn(ln_s, __fdiv_rn(p.t, p.s));
    } else {
      l = quiet_nan();
      problem = PROBLEM_OVERFLOW;  // finite logits, but max/τ beyond f32
    }
  }
  if (problem != 0) report(status, row, OP_TOKEN_LOGPROBS, problem);
  if (logp) logp[row] = lp;
  if (entropy) entropy[row] = h;
  if (lse) lse[row] = l;
}

__device__ __forceinline__ void write_zero_row(long long row, float* logp, float* entropy, float* lse) {
  if (logp) logp[row] = 0.0f;
  if (entropy) entropy[row] = 0.0f;
  if (lse) lse[row] = 0.0f;
}

// One block per row walks the whole row. With `partials` null it finishes the row
// (outputs + status); otherwise it writes the row's VocabPartial over this vocabulary shard,
// whose first column is global token `vocab_offset` (tensor-parallel building block).
template <typename T, bool ENTROPY>
__device__ void token_rows(const T* __restrict__ logits, long long ld, int rows, int cols, RowSelect sel,
                           float inv_tau, long long vocab_offset, float* logp, float* entropy, float* lse,
                           VocabPartial* partials, unsigned long long* status) {
  __shared__ float scratch[96];
  const long long row = blockIdx.x;
  if (row >= rows) return;
  const long long target = load_target(sel.targets, sel.index_kind, row);
  const long long local = target - vocab_offset;
  const bool has_target = local >= 0 && local < cols;
  if (sel.masked(row, target)) {
    if (threadIdx.x == 0) {
      if (partials != nullptr) {
        partials[row] = VocabPartial{neg_inf(), 0.0f, 0.0f, 0.0f, 0u};
      } else {
        write_zero_row(row, logp, entropy, lse);
      }
    }
    return;
  }
  // A real row is always walked, even with a target out of range, so that its problems are
  // ranked as in token_merge (NaN, +inf, only -inf, then the target).
  const T* x = logits + row * ld;
  const bool vec_ok = aligned16(x);
  const long long chunks = (cols + token_chunk_len<T>() - 1) / token_chunk_len<T>();
  Partial state;
  unsigned flags = 0;
  for (long long c = 0; c < chunks; ++c) state.merge(chunk_partial<T, ENTROPY>(x, c, cols, vec_ok, inv_tau, scratch, flags), inv_tau);
  const unsigned all = (__syncthreads_or(flags & 1u) ? PART_NAN : 0u) | (__syncthreads_or(flags & 2u) ? PART_POS_INF : 0u);
  if (threadIdx.x != 0) return;
  const float xt = has_target ? to_f32(x[local]) : 0.0f;
  if (partials != nullptr) {
    partials[row] = VocabPartial{state.m, state.s, state.t, xt, all | (has_target ? PART_HAS_TARGET : 0u)};
  } else {
    finish_row(row, state, all, has_target, xt, inv_tau, logp, entropy, lse, status);
  }
}

// One block per (row, chunk), for few long rows: writes the chunk's VocabPartial to
// `partials[row * chunks + c]`; token_merge finishes the rows.
template <typename T, bool ENTROPY>
__device__ void token_chunks(const T* __restrict__ logits, long long ld, int rows, int cols, RowSelect sel,
                             float inv_tau, VocabPartial* __restrict__ partials) {
  __shared__ float scratch[96];
  const long long chunks = (cols + token_chunk_len<T>() - 1) / token_chunk_len<T>();
  const long long row = blockIdx.x / chunks, c = blockIdx.x % chunks;
  if (row >= rows) return;
  const long long target = load_target(sel.targets, sel.index_kind, row);
  if (sel.masked(row, target)) {
    if (threadIdx.x == 0) partials[row * chunks + c] = VocabPartial{neg_inf(), 0.0f, 0.0f, 0.0f, 0u};
    return;
  }
  const T* x = logits + row * ld;
  unsigned flags = 0;
  const Partial p = chunk_partial<T, ENTROPY>(x, c, cols, aligned16(x), inv_tau, scratch, flags);
  const unsigned all = (__syncthreads_or(flags & 1u) ? PART_NAN : 0u) | (__syncthreads_or(flags & 2u) ? PART_POS_INF : 0u);
  if (threadIdx.x != 0) return;
  const long long len = token_chunk_len<T>();
  const bool has_target = target >= c * len && target < min((c + 1) * len, static_cast<long long>(cols));
  const float xt = has_target ? to_f32(x[target]) : 0.0f;
  partials[row * chunks + c] = VocabPartial{p.m, p.s, p.t, xt, all | (has_target ? PART_HAS_TARGET : 0u)};
}

}  // namespace

// The parameters of token_merge (src/cuda/logprobs/token_launch.rs `TokenMergeParams`: the
// same fields at the same offsets, asserted on both sides).
struct TokenMergeParams {
  const VocabPartial* partials;  // record (row, k) at partials[row * row_stride + k * part_stride]
  float* logp;                   // each output may be null
  float* entropy;
  float* lse;
  RowSelect sel;
  long long row_stride, part_stride;
  int parts, rows;
  float inv_tau;
};
static_assert(RK_FIELDS(TokenMergeParams, 10) && sizeof(TokenMergeParams) == 104 &&
                  offsetof(TokenMergeParams, partials) == 0 && offsetof(TokenMergeParams, logp) == 8 &&
                  offsetof(TokenMergeParams, entropy) == 16 && offsetof(TokenMergeParams, lse) == 24 &&
                  offsetof(TokenMergeParams, sel) == 32 && offsetof(TokenMergeParams, row_stride) == 72 &&
                  offsetof(TokenMergeParams, part_stride) == 80 && offsetof(TokenMergeParams, parts) == 88 &&
                  offsetof(TokenMergeParams, rows) == 92 && offsetof(TokenMergeParams, inv_tau) == 96,
              "TokenMergeParams: every field where src/cuda/logprobs/token_launch.rs `TokenMergeParams` has it");

// Folds `parts` VocabPartials per row, in order, and finishes the rows: the second half of the
// split forward, and the merge of vocabulary shards from a tensor-parallel all-gather. One
// thread per row.
extern "C" __global__ void __launch_bounds__(256) token_merge(TokenMergeParams P, unsigned long long* status) {
  const VocabPartial* __restrict__ partials = P.partials;
  float *logp = P.logp, *entropy = P.entropy, *lse = P.lse;
  const RowSelect& sel = P.sel;
  const long long row_stride = P.row_stride, part_stride = P.part_stride;
  const int parts = P.parts, rows = P.rows;
  const float inv_tau = P.inv_tau;
  const long long row = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (row >= rows) return;
  const long long target = load_target(sel.targets, sel.index_kind, row);
  if (sel.masked(row, target)) {
    write_zero_row(row, logp, entropy, lse);
    return;
  }
  Partial state;
  unsigned flags = 0;
  bool has_target = false;
  float xt = 0.0f;
  for (int k = 0; k < parts; ++k) {
    const VocabPartial r = partials[row * row_stride + k * part_stride];
    Partial p;
    p.m = r.max_logit;
    p.s = r.sum_exp;
    p.t = r.sum_exp_d;
    state.merge(p, inv_tau);
    flags |= r.flags;
    if ((r.flags & PART_HAS_TARGET) && !has_target) {
      has_target = true;
      xt = r.target_logit;
    }
  }
  finish_row(row, state, flags, has_target, xt, inv_tau, logp, entropy, lse, status);
}

namespace {

// grad[v] = (g_logp·(1[v = y] − p_v) − g_H·p_v·(z_v − Σ p·z)) / τ, p_v = exp(z_v − lse),
// with z_v − Σ p·z = (z_v − lse) + H. One block per (row, chunk); `grad` may be `logits`
// (in place): every element is read before the same thread overwrites it.
template <typename T>
__device__ void token_backward(const T* logits, long long ld, T* grad, long long ld_grad, int rows, int cols,
                               RowSelect sel, const float* __restrict__ lse, const float* __restrict__ entropy,
                               const float* __restrict__ g_logp, const float* __restrict__ g_entropy, float inv_tau,
                               unsigned long long* status) {
  constexpr int N = VecOf<T>::N;
  const long long chunks = (cols + token_chunk_len<T>() - 1) / token_chunk_len<T>();
  const long long row = blockIdx.x / chunks, c = blockIdx.x % chunks;
  if (row >= rows) return;
  const long long target = load_target(sel.targets, sel.index_kind, row);
  const bool masked = sel.masked(row, target);
  const float gl = g_logp ? g_logp[row] : 0.0f;
  const float gh = g_entropy ? g_entropy[row] : 0.0f;
  const float L = lse[row];
  const float H = g_entropy ? entropy[row] : 0.0f;
  unsigned problem = 0;
  if (!masked) {
    problem = !(isfinite(L) && isfinite(H))           ? PROBLEM_NAN
              : !(isfinite(gl) && isfinite(gh))        ? PROBLEM_GRAD_NON_FINITE
              : !(target >= 0 && target < cols)        ? PROBLEM_TARGET_OUT_OF_RANGE
                                                       : 0u;
    if (problem != 0 && c == 0 && threadIdx.x == 0) report(status, row, OP_TOKEN_LOGPROBS_BACKWARD, problem);
  }
  const T* x = logits + row * ld;
  T* dx = grad + row * ld_grad;
  const bool x_vec = aligned16(x), dx_vec = aligned16(dx);
  float v[TOKEN_VPT][N];
  bool overflow = false;
  if (!masked && problem == 0) {
#pragma unroll
    for (int j = 0; j < TOKEN_VPT; ++j)
      load_chunk(x, c * (TOKEN_BLOCK * TOKEN_VPT) + j * TOKEN_BLOCK + threadIdx.x, cols, x_vec, neg_inf(), v[j]);
  }
#pragma unroll
  for (int j = 0; j < TOKEN_VPT; ++j) {
    const long long k = c * (TOKEN_BLOCK * TOKEN_VPT) + j * TOKEN_BLOCK + threadIdx.x;
    float r[N];
#pragma unroll
    for (int i = 0; i < N; ++i) {
      if (masked) {
        r[i] = 0.0f;
      } else if (problem != 0) {
        r[i] = quiet_nan();
      } else {
        const float a = fmaf(v[j][i], inv_tau, -L);  // z_v − lse
        const float p = exp2f(__fmul_rn(a, LOG2E));
        const float hit = (k * N + i == target) ? 1.0f : 0.0f;
        const float h_term = p > 0.0f ? __fmul_rn(p, __fadd_rn(a, H)) : 0.0f;
        r[i] = __fmul_rn(inv_tau, __fsub_rn(__fmul_rn(gl, __fsub_rn(hit, p)), __fmul_rn(gh, h_term)));
        overflow |= !fits<T>(r[i]);  // past `cols` the fill -inf gives p = 0 and r = 0
      }
    }
    store_chunk(dx, k, cols, dx_vec, r);
  }
  // Finite inputs whose gradient does not fit T.
  if (__syncthreads_or(overflow) && threadIdx.x == 0) report(status, row, OP_TOKEN_LOGPROBS_BACKWARD, PROBLEM_OVERFLOW);
}

}  // namespace

// The parameters of the log-softmax kernels, forward and backward (src/cuda/logprobs/
// log_softmax.rs `LogSoftmaxParams`: the same fields at the same offsets, asserted on both
// sides). The forward reads `logits` and writes `out`; the backward reads `out` and `grad_out`
// and writes `grad` (in the kernel's dtype, as the logits).
struct LogSoftmaxParams {
  const void* logits;
  float* out;
  const float* grad_out;
  void* grad;
  long long ld_logits, ld_out, ld_grad_out, ld_grad;
  int rows, cols;
  float inv_tau;
};
static_assert(RK_FIELDS(LogSoftmaxParams, 11) && sizeof(LogSoftmaxParams) == 80 &&
                  offsetof(LogSoftmaxParams, logits) == 0 && offsetof(LogSoftmaxParams, out) == 8 &&
                  offsetof(LogSoftmaxParams, grad_out) == 16 && offsetof(LogSoftmaxParams, grad) == 24 &&
                  offsetof(LogSoftmaxParams, ld_logits) == 32 && offsetof(LogSoftmaxParams, ld_out) == 40 &&
                  offsetof(LogSoftmaxParams, ld_grad_out) == 48 && offsetof(LogSoftmaxParams, ld_grad) == 56 &&
                  offsetof(LogSoftmaxParams, rows) == 64 && offsetof(LogSoftmaxParams, cols) == 68 &&
                  offsetof(LogSoftmaxParams, inv_tau) == 72,
              "LogSoftmaxParams: every field where src/cuda/logprobs/log_softmax.rs `LogSoftmaxParams` has it");

#define RK_LOG_SOFTMAX(SUFFIX, T)                                                                         \
  extern "C" __global__ void __launch_bounds__(1024)                                                      \
      log_softmax_forward_##SUFFIX(LogSoftmaxParams P, unsigned long long* status) {                      \
    log_softmax_forward<T>(static_cast<const T*>(P.logits), P.ld_logits, P.out, P.ld_out, P.rows, P.cols, \
                           P.inv_tau, status);                                                            \
  }                                                                                                       \
  extern "C" __global__ void __launch_bounds__(1024)                                                      \
      log_softmax_backward_##SUFFIX(LogSoftmaxParams P, unsigned long long* status) {                     \
    log_softmax_backward<T>(P.out, P.ld_out, P.grad_out, P.ld_grad_out, static_cast<T*>(P.grad), P.ld_grad, \
                            P.rows, P.cols, P.inv_tau, status);                                           \
  }

// The parameters of the token rows kernels and of the token backward (src/cuda/logprobs/
// token_launch.rs `TokenRowsParams`, `TokenBackwardParams`: the same fields at the same offsets,
// asserted on both sides). The logits (and the gradient) are in the kernel's dtype.
struct TokenRowsParams {
  const void* logits;
  float* logp;  // each output may be null
  float* entropy;
  float* lse;
  VocabPartial* partials;  // the shard mode's records, or null
  RowSelect sel;
  long long ld;
  long long vocab_offset;  // the shard's first column (shard mode)
  int rows, cols;
  float inv_tau;
};
static_assert(RK_FIELDS(TokenRowsParams, 11) && sizeof(TokenRowsParams) == 112 &&
                  offsetof(TokenRowsParams, logits) == 0 && offsetof(TokenRowsParams, logp) == 8 &&
                  offsetof(TokenRowsParams, entropy) == 16 && offsetof(TokenRowsParams, lse) == 24 &&
                  offsetof(TokenRowsParams, partials) == 32 && offsetof(TokenRowsParams, sel) == 40 &&
                  offsetof(TokenRowsParams, ld) == 80 && offsetof(TokenRowsParams, vocab_offset) == 88 &&
                  offsetof(TokenRowsParams, rows) == 96 && offsetof(TokenRowsParams, cols) == 100 &&
                  offsetof(TokenRowsParams, inv_tau) == 104,
              "TokenRowsParams: every field where src/cuda/logprobs/token_launch.rs `TokenRowsParams` has it");

struct TokenBackwardParams {
  const void* logits;
  void* grad;  // equal to logits in place
  const float* lse;
  const float* entropy;    // null without g_entropy
  const float* g_logp;     // each upstream gradient may be null
  const float* g_entropy;
  RowSelect sel;
  long long ld, ld_grad;
  int rows, cols;
  float inv_tau;
};
static_assert(RK_FIELDS(TokenBackwardParams, 12) && sizeof(TokenBackwardParams) == 120 &&
                  offsetof(TokenBackwardParams, logits) == 0 && offsetof(TokenBackwardParams, grad) == 8 &&
                  offsetof(TokenBackwardParams, lse) == 16 && offsetof(TokenBackwardParams, entropy) == 24 &&
                  offsetof(TokenBackwardParams, g_logp) == 32 && offsetof(TokenBackwardParams, g_entropy) == 40 &&
                  offsetof(TokenBackwardParams, sel) == 48 && offsetof(TokenBackwardParams, ld) == 88 &&
                  offsetof(TokenBackwardParams, ld_grad) == 96 && offsetof(TokenBackwardParams, rows) == 104 &&
                  offsetof(TokenBackwardParams, cols) == 108 && offsetof(TokenBackwardParams, inv_tau) == 112,
              "TokenBackwardParams: every field where src/cuda/logprobs/token_launch.rs `TokenBackwardParams` has it");

#define RK_TOKEN_FORWARD(NAME, SUFFIX, T, ENTROPY)                                                     \
  extern "C" __global__ void __launch_bounds__(TOKEN_BLOCK)                                              \
      NAME##_rows_##SUFFIX(TokenRowsParams P, unsigned long long* status) {                              \
    token_rows<T, ENTROPY>(static_cast<const T*>(P.logits), P.ld, P.rows, P.cols, P.sel, P.inv_tau,      \
                           P.vocab_offset, P.logp, P.entropy, P.lse, P.partials, status);                \
  }                                                                                                      \
  extern "C" __global__ void __launch_bounds__(TOKEN_BLOCK) NAME##_chunks_##SUFFIX(TokenRowsParams P) {  \
    token_chunks<T, ENTROPY>(static_cast<const T*>(P.logits), P.ld, P.rows, P.cols, P.sel, P.inv_tau,    \
                             P.partials);                                                                \
  }

#define RK_TOKEN(SUFFIX, T)                                                                              \
  RK_TOKEN_FORWARD(token_logprobs, SUFFIX, T, false)                                                     \
  RK_TOKEN_FORWARD(token_logprobs_entropy, SUFFIX, T, true)                                              \
  extern "C" __global__ void __launch_bounds__(TOKEN_BLOCK)                                              \
      token_logprobs_backward_##SUFFIX(TokenBackwardParams P, unsigned long long* status) {              \
    token_backward<T>(static_cast<const T*>(P.logits), P.ld, static_cast<T*>(P.grad), P.ld_grad, P.rows, \
                      P.cols, P.sel, P.lse, P.entropy, P.g_logp, P.g_entropy, P.inv_tau, status);        \
  }

RK_LOG_SOFTMAX(f32, float)
RK_LOG_SOFTMAX(f16, __half)
RK_LOG_SOFTMAX(bf16, __nv_bfloat16)
RK_TOKEN(f32, float)
RK_TOKEN(f16, __half)
RK_TOKEN(bf16, __nv_bfloat16)
