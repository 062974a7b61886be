// kl family, exact: the full-vocabulary KL in both directions and the JSD between two logits
// rows, their vocabulary-shard merges and their backward. Formulas: MATH.md §2; the Rust side
// (src/cuda/kl/exact.rs, exact_backward.rs, shards.rs) checks every shape before launching.
#include "aggregation.cuh"

using namespace rk;

namespace {

constexpr unsigned OP_EXACT_KL = 7;
constexpr unsigned OP_EXACT_KL_BACKWARD = 8;

}  // namespace

// ---- exact divergences between two logits rows -----------------------------------------------
// A row is cut into chunks of EXACT_BLOCK threads × EXACT_SLOTS slots × 8 logits (8192 logits
// whatever the two dtypes). As for the token kernels, one block walking a row and one block
// per chunk plus a merge run the same operations in the same order.

namespace {

constexpr int EXACT_BLOCK = 256;
constexpr int EXACT_SLOTS = 4;
constexpr long long EXACT_CHUNK = static_cast<long long>(EXACT_BLOCK) * EXACT_SLOTS * 8;

// Divergence codes (src/kl.rs `ExactDivergence::code`).
enum Divergence : int { POLICY_REF = 0, REF_POLICY = 1, JSD = 2 };
constexpr unsigned PAIR_P_NAN = 1, PAIR_P_POS_INF = 2, PAIR_Q_NAN = 4, PAIR_Q_POS_INF = 8;

// One chunk's (or row's, or shard's) statistics of both sides: 28 bytes, the layout of
// `ExactKlPartial` (src/kl.rs, whose test checks the flags above), field for field: mp, sp, apr
// are policy_max, policy_sum_exp, policy_term; mq, sq, arp are ref_max, ref_sum_exp, ref_term.
struct PairPartial {
  float mp, sp, apr;  // policy: max (raw), Σ e_p, Σ e_p·(z_p − z_q)
  float mq, sq, arp;  // reference: max (raw), Σ e_q, Σ e_q·(z_q − z_p)
  unsigned flags;
};
static_assert(RK_FIELDS(PairPartial, 7) && sizeof(PairPartial) == 28 && offsetof(PairPartial, mp) == 0 &&
                  offsetof(PairPartial, sp) == 4 && offsetof(PairPartial, apr) == 8 &&
                  offsetof(PairPartial, mq) == 12 && offsetof(PairPartial, sq) == 16 &&
                  offsetof(PairPartial, arp) == 20 && offsetof(PairPartial, flags) == 24,
              "PairPartial: every field where src/kl.rs `ExactKlPartial` has it");

__device__ __forceinline__ PairPartial empty_pair() { return PairPartial{neg_inf(), 0.0f, 0.0f, neg_inf(), 0.0f, 0.0f, 0u}; }

// Rescales one side's (m, s, a) to the larger max and adds; an empty side adds nothing and a
// side rescaled to 0 contributes exactly 0 (a may be +inf).
__device__ __forceinline__ void merge_side(float& m, float& s, float& a, float m2, float s2, float a2, float c) {
  if (m2 == neg_inf()) return;
  if (m == neg_inf()) {
    m = m2;
    s = s2;
    a = a2;
    return;
  }
  const float M = fmaxf(m, m2);
  const float f1 = exp2f(__fmul_rn(__fsub_rn(m, M), c));
  const float f2 = exp2f(__fmul_rn(__fsub_rn(m2, M), c));
  s = __fadd_rn(__fmul_rn(f1, s), __fmul_rn(f2, s2));
  a = __fadd_rn(f1 > 0.0f ? __fmul_rn(f1, a) : 0.0f, f2 > 0.0f ? __fmul_rn(f2, a2) : 0.0f);
  m = M;
}

__device__ __forceinline__ void merge_pair(PairPartial& x, const PairPartial& y, float c) {
  merge_side(x.mp, x.sp, x.apr, y.mp, y.sp, y.apr, c);
  merge_side(x.mq, x.sq, x.arp, y.mq, y.sq, y.arp, c);
  x.flags |= y.flags;
}

__device__ __forceinline__ PairPartial shfl_pair(const PairPartial& p, int o) {
  PairPartial q;
  q.mp = __shfl_xor_sync(0xffffffffu, p.mp, o);
  q.sp = __shfl_xor_sync(0xffffffffu, p.sp, o);
  q.apr = __shfl_xor_sync(0xffffffffu, p.apr, o);
  q.mq = __shfl_xor_sync(0xffffffffu, p.mq, o);
  q.sq = __shfl_xor_sync(0xffffffffu, p.sq, o);
  q.arp = __shfl_xor_sync(0xffffffffu, p.arp, o);
  q.flags = __shfl_xor_sync(0xffffffffu, p.flags, o);
  return q;
}

// Block-wide merge, every thread returns the result. `scratch`: 7 × 32 floats; ends with a
// __syncthreads.
__device__ __forceinline__ PairPartial block_merge_pair(PairPartial p, float c, float* scratch) {
  const int warps = blockDim.x >> 5, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) merge_pair(p, shfl_pair(p, o), c);
  if (lane == 0) {
    float* w = scratch + warp;
    w[0] = p.mp, w[32] = p.sp, w[64] = p.apr, w[96] = p.mq, w[128] = p.sq, w[160] = p.arp;
    w[192] = __uint_as_float(p.flags);
  }
  __syncthreads();
  PairPartial t = empty_pair();
  if (lane < warps) {
    const float* w = scratch + lane;
    t = PairPartial{w[0], w[32], w[64], w[96], w[128], w[160], __float_as_uint(w[192])};
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) merge_pair(t, shfl_pair(t, o), c);
  __syncthreads();
  return t;
}

// Loads the 8 logits of slot `k` (elements 8k .. 8k+7) of a row as f32; past `cols` reads
// `fill`. Vector loads when the row start is 16-byte aligned.
template <typename T>
__device__ __forceinline__ void load8(const T* __restrict__ row, long long k, int cols, bool vec_ok, float fill,
                                      float (&out)[8]) {
  constexpr int N = VecOf<T>::N;  // 8 for 2-byte types, 4 for f32
  float part[N];
#pragma unroll
  for (int h = 0; h < 8 / N; ++h) {
    load_chunk(row, k * (8 / N) + h, cols, vec_ok, fill, part);
#pragma unroll
    for (int i = 0; i < N; ++i) out[h * N + i] = part[i];
  }
}

template <typename T>
__device__ __forceinline__ void store8(T* __restrict__ row, long long k, int cols, bool vec_ok, const float (&v)[8]) {
  constexpr int N = VecOf<T>::N;
#pragma unroll
  for (int h = 0; h < 8 / N; ++h) {
    float part[N];
#pragma unroll
    for (int i = 0; i < N; ++i) part[i] = v[h * N + i];
    store_chunk(row, k * (8 / N) + h, cols, vec_ok, part);
  }
}

__device__ __forceinline__ long long slot_of(long long c, int j) {
  return c * (EXACT_BLOCK * EXACT_SLOTS) + j * EXACT_BLOCK + threadIdx.x;
}

// The PairPartial of chunk `c` of both rows, identical in every thread.
template <typename P, typename Q>
__device__ __forceinline__ PairPartial chunk_pair(const P* xp, const Q* xq, long long c, int cols, bool vp, bool vq,
                                                  float inv_tau, float* scratch) {
  const float cc = __fmul_rn(inv_tau, LOG2E);
  float a[EXACT_SLOTS][8], b[EXACT_SLOTS][8];
#pragma unroll
  for (int j = 0; j < EXACT_SLOTS; ++j) {
    load8(xp, slot_of(c, j), cols, vp, neg_inf(), a[j]);
    load8(xq, slot_of(c, j), cols, vq, neg_inf(), b[j]);
  }
  PairPartial t = empty_pair();
  unsigned flags = 0;
#pragma unroll
  for (int j = 0; j < EXACT_SLOTS; ++j) {
    const unsigned fp = chunk_flags(a[j]), fq = chunk_flags(b[j]);
    flags |= ((fp & 1u) ? PAIR_P_NAN : 0u) | ((fp & 2u) ? PAIR_P_POS_INF : 0u) | ((fq & 1u) ? PAIR_Q_NAN : 0u) |
             ((fq & 2u) ? PAIR_Q_POS_INF : 0u);
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      t.mp = fmaxf(t.mp, a[j][i]);
      t.mq = fmaxf(t.mq, b[j][i]);
    }
  }
  // A side that is all -inf here shifts by 0: every exp is exactly 0.
  const float mp = t.mp == neg_inf() ? 0.0f : t.mp, mq = t.mq == neg_inf() ? 0.0f : t.mq;
#pragma unroll
  for (int j = 0; j < EXACT_SLOTS; ++j) {
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const float ep = exp2f(__fmul_rn(__fsub_rn(a[j][i], mp), cc));
      const float eq = exp2f(__fmul_rn(__fsub_rn(b[j][i], mq), cc));
      const float diff = __fmul_rn(__fsub_rn(a[j][i], b[j][i]), inv_tau);  // z_p − z_q
      t.sp = __fadd_rn(t.sp, ep);
      t.sq = __fadd_rn(t.sq, eq);
      // e = 0 contributes 0 (never 0·inf); e > 0 against a -inf on the other side gives +inf.
      t.apr = __fadd_rn(t.apr, ep > 0.0f ? __fmul_rn(ep, diff) : 0.0f);
      t.arp = __fadd_rn(t.arp, eq > 0.0f ? __fmul_rn(eq, -diff) : 0.0f);
    }
  }
  t.flags = flags;
  return block_merge_pair(t, cc, scratch);
}

// log m = log(β·p + (1 − β)·q) from log p, log q, log β and log(1 − β), in log space (max +
// ln(1 + e^{min − max})): finite wherever p or q > 0 (NaN when both are 0, where the JSD's terms
// are skipped, or when either log is NaN). src/cpu/kl/exact.rs `log_mix`.
__device__ __forceinline__ float log_mix(float lp, float lq, float log_b, float log_1b) {
  const float ma = __fadd_rn(lp, log_b), mb = __fadd_rn(lq, log_1b);
  const bool a_hi = ma != ma || ma > mb;  // NaN-propagating (fmaxf would return the number)
  const float hi = a_hi ? ma : mb, lo = a_hi ? mb : ma;
  return __fadd_rn(hi, logf(__fadd_rn(1.0f, exp2f(__fmul_rn(__fsub_rn(lo, hi), LOG2E)))));
}
// A log-probability recomputed as z − lse is ≤ 0 up to rounding, which at |z| ~ 1e11 (a tiny
// temperature) is thousands: capped at 0 so that p ≤ 1 (NaN stays NaN). src/cpu/kl/exact.rs.
__device__ __forceinline__ float non_positive(float lp) { return lp > 0.0f ? 0.0f : lp; }

// (log β, log(1 − β)) in f64, rounded once (each call of the JSD's passes computes it).
__device__ __forceinline__ float2 mix_weights(float beta) {
  const double b = static_cast<double>(beta);
  return make_float2(static_cast<float>(log(b)), static_cast<float>(log(1.0 - b)));
}

// The JSD's second pass over chunk `c`: (Σ p·log(p/m), Σ q·log(q/m)), m = β·p + (1 − β)·q,
// identical in every thread, log m in log space (src/cpu/kl/exact.rs `jsd_terms`: β·p underflows
// for a tiny p or β, and p·log(p/0) would be +inf). `scratch`: 32 floats.
template <typename P, typename Q>
__device__ __forceinline__ float2 chunk_jsd(const P* xp, const Q* xq, long long c, int cols, bool vp, bool vq, float inv_tau,
                                            float lse_p, float lse_q, float beta, float* scratch) {
  float tp = 0.0f, tq = 0.0f;
  const float2 w = mix_weights(beta);
#pragma unroll
  for (int j = 0; j < EXACT_SLOTS; ++j) {
    float a[8], b[8];
    load8(xp, slot_of(c, j), cols, vp, neg_inf(), a);
    load8(xq, slot_of(c, j), cols, vq, neg_inf(), b);
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const float lp = non_positive(fmaf(a[i], inv_tau, -lse_p)), lq = non_positive(fmaf(b[i], inv_tau, -lse_q));
      const float p = exp2f(__fmul_rn(lp, LOG2E)), q = exp2f(__fmul_rn(lq, LOG2E));
      const float lm = log_mix(lp, lq, w.x, w.y);
      tp = __fadd_rn(tp, p > 0.0f ? __fmul_rn(p, __fsub_rn(lp, lm)) : 0.0f);
      tq = __fadd_rn(tq, q > 0.0f ? __fmul_rn(q, __fsub_rn(lq, lm)) : 0.0f);
    }
  }
  const float sp = block_sum(tp, scratch);
  const float sq = block_sum(tq, scratch);
  return make_float2(sp, sq);
}

// Outputs of an exact forward (each nullable) and where the JSD keeps its normalisers.
struct ExactOut {
  float* value;
  float* policy_lse;
  float* ref_lse;
  float* policy_term;
  float* jsd_lse_p;  // rows f32 each: the normalisers the JSD's second pass reads, else null
  float* jsd_lse_q;
};
static_assert(RK_FIELDS(ExactOut, 6) && sizeof(ExactOut) == 48 && offsetof(ExactOut, value) == 0 &&
                  offsetof(ExactOut, policy_lse) == 8 && offsetof(ExactOut, ref_lse) == 16 &&
                  offsetof(ExactOut, policy_term) == 24 && offsetof(ExactOut, jsd_lse_p) == 32 &&
                  offsetof(ExactOut, jsd_lse_q) == 40,
              "ExactOut: every field where src/cuda/kl/exact.rs `ExactOut` has it");

// The one parameter block of every exact-divergence kernel (src/cuda/kl/exact.rs
// `ExactParams`: the same fields at the same offsets, asserted on both sides). Each kernel reads
// what its comment names; the rest may be anything.
struct ExactParams {
  const void* policy;          // [rows, cols] in P's dtype, row stride ldp
  const void* reference;       // [rows, cols] in Q's dtype, row stride ldq
  void* grad;                  // the backward's policy gradient (P's dtype, stride ldp; may be policy)
  const unsigned char* mask;   // rows bytes, 0 = padding; may be null
  const float* lse_p;          // rows f32: the JSD's second pass and the backward read these
  const float* lse_q;          //   normalisers (the policy's and the reference's)
  const float* saved;          // the backward: the forward's policy term
  const float* g;              // the backward: the upstream gradient
  void* partials;              // PairPartial (the KLs) or float2 (the JSD) records, or null
  ExactOut out;                // the forward's outputs
  long long ldp, ldq;
  long long row_stride, part_stride;  // the merges: record (row, k) at row·row_stride + k·part_stride
  int rows, cols, parts, divergence;
  float beta, inv_tau;
};
static_assert(RK_FIELDS(ExactParams, 20) && sizeof(ExactParams) == 176 &&
                  offsetof(ExactParams, policy) == 0 && offsetof(ExactParams, reference) == 8 &&
                  offsetof(ExactParams, grad) == 16 && offsetof(ExactParams, mask) == 24 &&
                  offsetof(ExactParams, lse_p) == 32 && offsetof(ExactParams, lse_q) == 40 &&
                  offsetof(ExactParams, saved) == 48 && offsetof(ExactParams, g) == 56 &&
                  offsetof(ExactParams, partials) == 64 && offsetof(ExactParams, out) == 72 &&
                  offsetof(ExactParams, ldp) == 120 && offsetof(ExactParams, ldq) == 128 &&
                  offsetof(ExactParams, row_stride) == 136 && offsetof(ExactParams, part_stride) == 144 &&
                  offsetof(ExactParams, rows) == 152 && offsetof(ExactParams, cols) == 156 &&
                  offsetof(ExactParams, parts) == 160 && offsetof(ExactParams, divergence) == 164 &&
                  offsetof(ExactParams, beta) == 168 && offsetof(ExactParams, inv_tau) == 172,
              "ExactParams: every field where src/cuda/kl/exact.rs `ExactParams` has it");

__device__ __forceinline__ void write_row(const ExactOut& o, long long row, float v, float lp, float lq, float term) {
  if (o.value) o.value[row] = v;
  if (o.policy_lse) o.policy_lse[row] = lp;
  if (o.ref_lse) o.ref_lse[row] = lq;
  if (o.policy_term) o.policy_term[row] = term;
}

// Finishes one row from its folded PairPartial (one thread). For the JSD it writes the two
// normalisers (and the lse outputs) and leaves value/term to the second pass.
__device__ __forceinline__ void finish_pair(long long row, const PairPartial& t, int divergence, float inv_tau,
                                            const ExactOut& o, unsigned long long* status) {
  const unsigned f = t.flags;
  unsigned problem = (f & (PAIR_P_NAN | PAIR_Q_NAN))             ? PROBLEM_NAN
                     : (f & (PAIR_P_POS_INF | PAIR_Q_POS_INF))   ? PROBLEM_POS_INF
                     : (t.mp == neg_inf() || t.mq == neg_inf())  ? PROBLEM_ALL_NEG_INF
                                                                 : 0u;
  const float ln_sp = logf(t.sp), ln_sq = logf(t.sq);
  const float lp = __fadd_rn(__fmul_rn(t.mp, inv_tau), ln_sp), lq = __fadd_rn(__fmul_rn(t.mq, inv_tau), ln_sq);
  if (problem == 0 && !(isfinite(lp) && isfinite(lq))) problem = PROBLEM_OVERFLOW;  // finite logits, max/τ beyond f32
  float v = 0.0f;
  if (problem == 0 && divergence == POLICY_REF) {
    v = __fadd_rn(__fadd_rn(__fdiv_rn(t.apr, t.sp), __fmul_rn(__fsub_rn(t.mq, t.mp), inv_tau)), __fsub_rn(ln_sq, ln_sp));
    if (v == pos_inf()) problem = PROBLEM_INFINITE_KL;
  } else if (problem == 0 && divergence == REF_POLICY) {
    v = __fadd_rn(__fadd_rn(__fdiv_rn(t.arp, t.sq), __fmul_rn(__fsub_rn(t.mp, t.mq), inv_tau)), __fsub_rn(ln_sp, ln_sq));
  }
  v = fmaxf(v, 0.0f);
  if (problem == PROBLEM_INFINITE_KL) {
    // The value is +inf (and stays so, for the backward to refuse); the normalisers are fine.
    report(status, row, OP_EXACT_KL, problem);
    write_row(o, row, pos_inf(), lp, lq, pos_inf());
  } else if (problem != 0) {
    report(status, row, OP_EXACT_KL, problem);
    write_row(o, row, quiet_nan(), quiet_nan(), quiet_nan(), quiet_nan());
    if (o.jsd_lse_p) o.jsd_lse_p[row] = o.jsd_lse_q[row] = quiet_nan();
  } else if (divergence == JSD) {
    if (o.policy_lse) o.policy_lse[row] = lp;
    if (o.ref_lse) o.ref_lse[row] = lq;
    if (o.jsd_lse_p) {
      o.jsd_lse_p[row] = lp;
      o.jsd_lse_q[row] = lq;
    }
  } else {
    write_row(o, row, v, lp, lq, v);
  }
}

__device__ __forceinline__ bool row_masked(const unsigned char* mask, long long row) {
  return mask != nullptr && mask[row] == 0;
}

__device__ __forceinline__ long long exact_chunks(int cols) { return (static_cast<long long>(cols) + EXACT_CHUNK - 1) / EXACT_CHUNK; }

// One block per row walks both rows. With `partials_out` null it finishes the row; otherwise
// it writes the row's PairPartial over this vocabulary shard (tensor-parallel building block).
template <typename P, typename Q>
__device__ void exact_rows(const P* __restrict__ policy, long long ldp, const Q* __restrict__ reference, long long ldq,
                           int rows, int cols, const unsigned char* __restrict__ mask, int divergence, float inv_tau,
                           ExactOut o, PairPartial* __restrict__ partials_out, unsigned long long* status) {
  __shared__ float scratch[224];
  const long long row = blockIdx.x;
  if (row >= rows) return;
  if (row_masked(mask, row)) {
    if (threadIdx.x == 0) {
      if (partials_out) {
        partials_out[row] = empty_pair();
      } else {
        write_row(o, row, 0.0f, 0.0f, 0.0f, 0.0f);
        if (o.jsd_lse_p) o.jsd_lse_p[row] = o.jsd_lse_q[row] = 0.0f;
      }
    }
    return;
  }
  const P* xp = policy + row * ldp;
  const Q* xq = reference + row * ldq;
  const bool vp = aligned16(xp), vq = aligned16(xq);
  const float cc = __fmul_rn(inv_tau, LOG2E);
  PairPartial state = empty_pair();
  for (long long c = 0; c < exact_chunks(cols); ++c) merge_pair(state, chunk_pair(xp, xq, c, cols, vp, vq, inv_tau, scratch), cc);
  if (threadIdx.x != 0) return;
  if (partials_out) {
    partials_out[row] = state;  // a shard's partial: problems travel in the flags
  } else {
    finish_pair(row, state, divergence, inv_tau, o, status);
  }
}

template <typename P, typename Q>
__device__ void exact_chunks_kernel(const P* __restrict__ policy, long long ldp, const Q* __restrict__ reference,
                                    long long ldq, int rows, int cols, const unsigned char* __restrict__ mask,
                                    float inv_tau, PairPartial* __restrict__ partials) {
  __shared__ float scratch[224];
  const long long chunks = exact_chunks(cols);
  const long long row = blockIdx.x / chunks, c = blockIdx.x % chunks;
  if (row >= rows) return;
  if (row_masked(mask, row)) {
    if (threadIdx.x == 0) partials[row * chunks + c] = empty_pair();
    return;
  }
  const P* xp = policy + row * ldp;
  const Q* xq = reference + row * ldq;
  const PairPartial t = chunk_pair(xp, xq, c, cols, aligned16(xp), aligned16(xq), inv_tau, scratch);
  if (threadIdx.x == 0) partials[row * chunks + c] = t;
}

// JSD second pass, one block per row: folds the chunks' sums in chunk order and finishes —
// or, with `sums_out`, writes them (a shard's share, summed over shards by jsd_merge).
template <typename P, typename Q>
__device__ void jsd_rows(const P* __restrict__ policy, long long ldp, const Q* __restrict__ reference, long long ldq,
                         int rows, int cols, const unsigned char* __restrict__ mask, float beta, float inv_tau,
                         const float* __restrict__ lse_p_in, const float* __restrict__ lse_q_in, float* value,
                         float* policy_term, float2* __restrict__ sums_out) {
  __shared__ float scratch[32];
  const long long row = blockIdx.x;
  if (row >= rows) return;
  const float lse_p = lse_p_in[row], lse_q = lse_q_in[row];
  if (row_masked(mask, row) || !(isfinite(lse_p) && isfinite(lse_q))) {
    // Masked: the first pass wrote the zeros. Non-finite: reported by the first pass.
    if (sums_out && threadIdx.x == 0) sums_out[row] = make_float2(0.0f, 0.0f);
    return;
  }
  const P* xp = policy + row * ldp;
  const Q* xq = reference + row * ldq;
  const bool vp = aligned16(xp), vq = aligned16(xq);
  float tp = 0.0f, tq = 0.0f;
  for (long long c = 0; c < exact_chunks(cols); ++c) {
    const float2 s = chunk_jsd(xp, xq, c, cols, vp, vq, inv_tau, lse_p, lse_q, beta, scratch);
    tp = __fadd_rn(tp, s.x);
    tq = __fadd_rn(tq, s.y);
  }
  if (threadIdx.x != 0) return;
  if (sums_out) {
    sums_out[row] = make_float2(tp, tq);
  } else {
    const float v = fmaxf(__fadd_rn(__fmul_rn(beta, tp), __fmul_rn(__fsub_rn(1.0f, beta), tq)), 0.0f);
    if (value) value[row] = v;
    if (policy_term) policy_term[row] = fmaxf(tp, 0.0f);
  }
}

template <typename P, typename Q>
__device__ void jsd_chunks(const P* __restrict__ policy, long long ldp, const Q* __restrict__ reference, long long ldq,
                           int rows, int cols, const unsigned char* __restrict__ mask, float beta, float inv_tau,
                           const float* __restrict__ lse_p_in, const float* __restrict__ lse_q_in,
                           float2* __restrict__ sums) {
  __shared__ float scratch[32];
  const long long chunks = exact_chunks(cols);
  const long long row = blockIdx.x / chunks, c = blockIdx.x % chunks;
  if (row >= rows) return;
  const float lse_p = lse_p_in[row], lse_q = lse_q_in[row];
  if (row_masked(mask, row) || !(isfinite(lse_p) && isfinite(lse_q))) {
    if (threadIdx.x == 0) sums[row * chunks + c] = make_float2(0.0f, 0.0f);
    return;
  }
  const P* xp = policy + row * ldp;
  const Q* xq = reference + row * ldq;
  const float2 s = chunk_jsd(xp, xq, c, cols, aligned16(xp), aligned16(xq), inv_tau, lse_p, lse_q, beta, scratch);
  if (threadIdx.x == 0) sums[row * chunks + c] = s;
}

// Gradient with respect to the policy logits (MATH.md §2), one block per (row, chunk); `grad`
// may be `policy` (in place: each element is read before the same thread overwrites it).
template <typename P, typename Q>
__device__ void exact_backward(const P* policy, long long ldp, const Q* __restrict__ reference, long long ldq, P* grad,
                               int rows, int cols, const unsigned char* __restrict__ mask, int divergence, float beta,
                               float inv_tau, const float* __restrict__ policy_lse, const float* __restrict__ ref_lse,
                               const float* __restrict__ saved, const float* __restrict__ g,
                               unsigned long long* status) {
  const long long chunks = exact_chunks(cols);
  const long long row = blockIdx.x / chunks, c = blockIdx.x % chunks;
  if (row >= rows) return;
  const bool masked = row_masked(mask, row);
  const float lse_p = policy_lse[row], lse_q = ref_lse[row];
  const float s = divergence == REF_POLICY ? 0.0f : saved[row];  // KL[π‖ref], or KL[p‖m] for the JSD
  const float gr = g[row];
  unsigned problem = 0;
  if (!masked) {
    problem = s == pos_inf()                                         ? PROBLEM_INFINITE_KL
              : !(isfinite(lse_p) && isfinite(lse_q) && isfinite(s)) ? PROBLEM_NAN
              : !isfinite(gr)                                        ? PROBLEM_GRAD_NON_FINITE
                                                                     : 0u;
    if (problem != 0 && c == 0 && threadIdx.x == 0) report(status, row, OP_EXACT_KL_BACKWARD, problem);
  }
  const float scale = __fmul_rn(gr, inv_tau);
  const float2 w = divergence == JSD ? mix_weights(beta) : make_float2(0.0f, 0.0f);
  const P* xp = policy + row * ldp;
  const Q* xq = reference + row * ldq;
  P* dx = grad + row * ldp;
  const bool vp = aligned16(xp), vq = aligned16(xq), vd = aligned16(dx);
  bool overflow = false;
  // Slot by slot (load, compute, store): two rows of 32 logits held at once would spill.
#pragma unroll 1
  for (int j = 0; j < EXACT_SLOTS; ++j) {
    float a[8], b[8], r[8];
    if (!masked && problem == 0) {
      load8(xp, slot_of(c, j), cols, vp, neg_inf(), a);  // past `cols`: p = q = 0, r = 0
      load8(xq, slot_of(c, j), cols, vq, neg_inf(), b);
    }
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      if (masked) {
        r[i] = 0.0f;
      } else if (problem != 0) {
        r[i] = quiet_nan();
      } else {
        const float lp = non_positive(fmaf(a[i], inv_tau, -lse_p)), lq = non_positive(fmaf(b[i], inv_tau, -lse_q));
        const float p = exp2f(__fmul_rn(lp, LOG2E));
        float term;
        if (divergence == POLICY_REF) {
          term = p > 0.0f ? __fmul_rn(p, __fsub_rn(__fsub_rn(lp, lq), s)) : 0.0f;
        } else if (divergence == REF_POLICY) {
          term = __fsub_rn(p, exp2f(__fmul_rn(lq, LOG2E)));
        } else {
          const float lm = log_mix(lp, lq, w.x, w.y);
          term = p > 0.0f ? __fmul_rn(__fmul_rn(beta, p), __fsub_rn(__fsub_rn(lp, lm), s)) : 0.0f;
        }
        r[i] = __fmul_rn(scale, term);
        overflow |= !fits<P>(r[i]);
      }
    }
    store8(dx, slot_of(c, j), cols, vd, r);
  }
  // Finite inputs whose gradient does not fit P.
  if (__syncthreads_or(overflow) && threadIdx.x == 0) report(status, row, OP_EXACT_KL_BACKWARD, PROBLEM_OVERFLOW);
}

}  // namespace

// Folds `parts` records per row in order (record (row, k) at row·row_stride + k·part_stride)
// and finishes the rows, one thread per row: the second half of the split forward (strides
// (chunks, 1)) and the merge of tensor-parallel shards gathered as [shards][rows] (1, rows).
// Reads partials, the strides, parts, rows, mask, divergence, inv_tau; writes `out`.
extern "C" __global__ void __launch_bounds__(256) exact_kl_merge(ExactParams A, unsigned long long* status) {
  const PairPartial* __restrict__ partials = static_cast<const PairPartial*>(A.partials);
  const ExactOut& o = A.out;
  const long long row = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (row >= A.rows) return;
  if (row_masked(A.mask, row)) {
    write_row(o, row, 0.0f, 0.0f, 0.0f, 0.0f);
    if (o.jsd_lse_p) o.jsd_lse_p[row] = o.jsd_lse_q[row] = 0.0f;
    return;
  }
  const float cc = __fmul_rn(A.inv_tau, LOG2E);
  PairPartial state = empty_pair();
  for (int k = 0; k < A.parts; ++k) merge_pair(state, partials[row * A.row_stride + k * A.part_stride], cc);
  finish_pair(row, state, A.divergence, A.inv_tau, o, status);
}

// Sums the JSD's per-chunk (or per-shard) float2 sums in order, record (row, k) at
// row·row_stride + k·part_stride, and writes out.value and out.policy_term (each may be null).
// Reads partials, the strides, parts, rows, mask, beta, lse_p, lse_q.
extern "C" __global__ void __launch_bounds__(256) jsd_merge(ExactParams A) {
  const float2* __restrict__ sums = static_cast<const float2*>(A.partials);
  float *value = A.out.value, *policy_term = A.out.policy_term;
  const long long row = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (row >= A.rows) return;
  if (row_masked(A.mask, row)) {
    if (value) value[row] = 0.0f;
    if (policy_term) policy_term[row] = 0.0f;
    return;
  }
  if (!(isfinite(A.lse_p[row]) && isfinite(A.lse_q[row]))) {
    // A row the first round refused (and reported): no value.
    if (value) value[row] = quiet_nan();
    if (policy_term) policy_term[row] = quiet_nan();
    return;
  }
  float tp = 0.0f, tq = 0.0f;
  for (int k = 0; k < A.parts; ++k) {
    const float2 v = sums[row * A.row_stride + k * A.part_stride];
    tp = __fadd_rn(tp, v.x);
    tq = __fadd_rn(tq, v.y);
  }
  const float beta = A.beta;
  const float v = fmaxf(__fadd_rn(__fmul_rn(beta, tp), __fmul_rn(__fsub_rn(1.0f, beta), tq)), 0.0f);
  if (value) value[row] = v;
  if (policy_term) policy_term[row] = fmaxf(tp, 0.0f);
}

// The kernels instantiated for every (policy, reference) dtype pair. rows: one block per row,
// finishing the rows into `out` or, with `partials`, writing one PairPartial per row (the shard
// mode); chunks: one block per (row, chunk) writing `partials`; jsd_rows / jsd_chunks: the
// JSD's second pass from lse_p / lse_q (value and policy term, or with `partials` float2 sums);
// backward: one block per (row, chunk) writing `grad` from lse_p, lse_q, saved and g.
#define RK_EXACT(PS, P, QS, Q)                                                                                  \
  extern "C" __global__ void __launch_bounds__(EXACT_BLOCK)                                                     \
      exact_kl_rows_##PS##_##QS(ExactParams A, unsigned long long* status) {                                    \
    exact_rows<P, Q>(static_cast<const P*>(A.policy), A.ldp, static_cast<const Q*>(A.reference), A.ldq, A.rows, \
                     A.cols, A.mask, A.divergence, A.inv_tau, A.out, static_cast<PairPartial*>(A.partials),     \
                     status);                                                                                   \
  }                                                                                                             \
  extern "C" __global__ void __launch_bounds__(EXACT_BLOCK) exact_kl_chunks_##PS##_##QS(ExactParams A) {        \
    exact_chunks_kernel<P, Q>(static_cast<const P*>(A.policy), A.ldp, static_cast<const Q*>(A.reference), A.ldq, \
                              A.rows, A.cols, A.mask, A.inv_tau, static_cast<PairPartial*>(A.partials));       \
  }                                                                                                             \
  extern "C" __global__ void __launch_bounds__(EXACT_BLOCK) jsd_rows_##PS##_##QS(ExactParams A) {               \
    jsd_rows<P, Q>(static_cast<const P*>(A.policy), A.ldp, static_cast<const Q*>(A.reference), A.ldq, A.rows,   \
                   A.cols, A.mask, A.beta, A.inv_tau, A.lse_p, A.lse_q, A.out.value, A.out.policy_term,         \
                   static_cast<float2*>(A.partials));                                                           \
  }                                                                                                             \
  extern "C" __global__ void __launch_bounds__(EXACT_BLOCK) jsd_chunks_##PS##_##QS(ExactParams A) {             \
    jsd_chunks<P, Q>(static_cast<const P*>(A.policy), A.ldp, static_cast<const Q*>(A.reference), A.ldq, A.rows, \
                     A.cols, A.mask, A.beta, A.inv_tau, A.lse_p, A.lse_q, static_cast<float2*>(A.partials));    \
  }                                                                                                             \
  extern "C" __global__ void __launch_bounds__(EXACT_BLOCK)                                                     \
      exact_kl_backward_##PS##_##QS(ExactParams A, unsigned long long* status) {                                \
    exact_backward<P, Q>(static_cast<const P*>(A.policy), A.ldp, static_cast<const Q*>(A.reference), A.ldq,     \
                         static_cast<P*>(A.grad), A.rows, A.cols, A.mask, A.divergence, A.beta, A.inv_tau,      \
                         A.lse_p, A.lse_q, A.saved, A.g, status);                                               \
  }

#define RK_EXACT_Q(PS, P)                 \
  RK_EXACT(PS, P, f32, float)             \
  RK_EXACT(PS, P, f16, __half)            \
  RK_EXACT(PS, P, bf16, __nv_bfloat16)

RK_EXACT_Q(f32, float)
RK_EXACT_Q(f16, __half)
RK_EXACT_Q(bf16, __nv_bfloat16)
