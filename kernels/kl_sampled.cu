// kl family, sampled: per-token KL estimators (values, loss gradient, batch statistics) and
// KL-in-reward shaping. Formulas: MATH.md §2; the Rust side (src/cuda/kl/sampled.rs) checks
// every shape before launching and documents each kernel's launch contract next to its launch.
#include "aggregation.cuh"

using namespace rk;

namespace {

constexpr unsigned OP_SAMPLED_KL = 5;
constexpr unsigned OP_KL_REWARDS = 14;

// ---- sampled estimators ---------------------------------------------------------------------
// Estimator codes, in src/kl.rs `KlEstimator::ALL` order.
enum Estimator : int { K1 = 0, K2, K3, ABS, K1_REV, K3_REV, GRAD_POLICY_REF, GRAD_REF_POLICY };

struct Estimates {
  float values[8];  // every estimator, for the statistics
  float value;      // the chosen one's value
  float grad;       // ∂k/∂logp of the chosen one (0 where a clamp is active)
  bool clamped;     // a clamp was active for the chosen one
};

// The table of src/kl.rs, in f32: log r is clamped before exp, the exp-based values (k3,
// k1_rev, k3_rev) to ±v_clamp, and the gradient is 0 where a clamp is active.
// Clamp that keeps NaN (fminf/fmaxf would turn it into a bound).
__device__ __forceinline__ float clamp_keep_nan(float v, float c) { return v != v ? v : fminf(fmaxf(v, -c), c); }

// With the bias correction every value is ρ·k and the gradient ρ·∂k, plus ρ·k with `score`
// for all but the gradient-correct pairs (ρ = 1 and no score otherwise: the products are
// exact).
__device__ __forceinline__ Estimates estimates(int chosen, float log_r, float lr_clamp, float v_clamp, float rho,
                                               bool score) {
  const float lr = clamp_keep_nan(log_r, lr_clamp);
  const bool lr_active = lr != log_r && log_r == log_r;
  const float r = exp2f(__fmul_rn(lr, LOG2E));
  const float k3 = __fsub_rn(__fsub_rn(r, 1.0f), lr);
  const float k1_rev = r == 0.0f ? 0.0f : __fmul_rn(r, lr);
  const float k3_rev = r == 0.0f ? 1.0f : __fsub_rn(__fmul_rn(r, lr), __fsub_rn(r, 1.0f));
  auto vc = [v_clamp](float v) { return clamp_keep_nan(v, v_clamp); };
  auto wt = [rho](float v) { return __fmul_rn(rho, v); };
  Estimates e;
  e.values[K1] = wt(-log_r);
  e.values[K2] = wt(__fmul_rn(0.5f, __fmul_rn(log_r, log_r)));
  e.values[K3] = wt(vc(k3));
  e.values[ABS] = wt(fabsf(log_r));
  e.values[K1_REV] = wt(vc(k1_rev));
  e.values[K3_REV] = wt(vc(k3_rev));
  e.values[GRAD_POLICY_REF] = wt(vc(k3));
  e.values[GRAD_REF_POLICY] = wt(vc(k3_rev));
  // (NaN != NaN: compare through the clamp only for numbers.)
  const bool k3_clamped = lr_active || (k3 == k3 && vc(k3) != k3);
  const bool k1r_clamped = r != 0.0f && (lr_active || (k1_rev == k1_rev && vc(k1_rev) != k1_rev));
  const bool k3r_clamped = lr_active || (k3_rev == k3_rev && vc(k3_rev) != k3_rev);
  const float g_k3 = k3_clamped ? 0.0f : __fsub_rn(1.0f, r);
  const float sign = log_r < 0.0f ? 1.0f : (log_r > 0.0f ? -1.0f : 0.0f);
  switch (chosen) {
    case K1: e.grad = 1.0f; e.clamped = false; break;
    case K2: e.grad = -log_r; e.clamped = false; break;
    case K3: e.grad = g_k3; e.clamped = k3_clamped; break;
    case ABS: e.grad = sign; e.clamped = false; break;
    case K1_REV:
      e.grad = (k1r_clamped || r == 0.0f) ? 0.0f : -__fmul_rn(r, __fadd_rn(lr, 1.0f));
      e.clamped = k1r_clamped;
      break;
    case K3_REV:
      e.grad = (k3r_clamped || r == 0.0f) ? 0.0f : -__fmul_rn(r, lr);
      e.clamped = k3r_clamped;
      break;
    case GRAD_POLICY_REF: e.grad = -log_r; e.clamped = k3_clamped; break;
    default: e.grad = g_k3; e.clamped = k3r_clamped; break;  // GRAD_REF_POLICY
  }
  // A switch on named values: indexing the array at run time would put it in local memory.
  switch (chosen) {
    case K1: e.value = e.values[K1]; break;
    case K2: e.value = e.values[K2]; break;
    case K3: case GRAD_POLICY_REF: e.value = e.values[K3]; break;
    case ABS: e.value = e.values[ABS]; break;
    case K1_REV: e.value = e.values[K1_REV]; break;
    default: e.value = e.values[K3_REV]; break;  // K3_REV, GRAD_REF_POLICY
  }
  // The gradient-correct pairs keep their expected gradient: no score term (src/kl.rs).
  const bool straight_through = chosen == GRAD_POLICY_REF || chosen == GRAD_REF_POLICY;
  e.grad = (score && !straight_through) ? __fadd_rn(wt(e.grad), e.value) : wt(e.grad);
  return e;
}

// Per-sequence record: the 8 estimator sums over valid tokens, the valid-token count and the
// clamped count (f32 within a row, combined in f64 across rows by sampled_kl_finalize).
struct SampledRow {
  float sums[8];
  float valid;
  float clamped;
};
static_assert(sizeof(SampledRow) == 40, "SampledRow: RECORD_BYTES of src/cuda/kl/sampled.rs");

// Statistics layout (f64): loss, means[8], clamped fraction, valid tokens, valid sequences,
// sequences (src/cuda/kl/sampled.rs `DeviceKlStats`).
constexpr int STAT_LOSS = 0, STAT_MEANS = 1, STAT_CLAMPED = 9, STAT_COUNTS = 10;

}  // namespace

// The parameters of `sampled_kl_rows` (src/cuda/kl/sampled.rs `SampledParams`: the same fields
// at the same offsets, asserted on both sides).
struct SampledParams {
  const float* logp;
  const float* ref_logp;
  const unsigned char* mask;  // may be null
  const double* counts;       // the denominators on the device (the mask count), or null
  float* values;              // each output may be null
  float* grad;
  long long ld;
  int rows, cols, chosen;
  float lr_clamp, v_clamp, coef;
  int aggregation;
  int weights_known;  // the three counts below are the denominators (given by the host)
  double max_len;
  double tokens, valid_sequences, sequences;
  void* records;  // one SampledRow per sequence for the statistics, or null
  const float* old_logp;  // the sampling policy's log-probs: weight by ρ = π/π_old; or null
};
static_assert(RK_FIELDS(SampledParams, 21) && sizeof(SampledParams) == 136 &&
                  offsetof(SampledParams, logp) == 0 && offsetof(SampledParams, ref_logp) == 8 &&
                  offsetof(SampledParams, mask) == 16 && offsetof(SampledParams, counts) == 24 &&
                  offsetof(SampledParams, values) == 32 && offsetof(SampledParams, grad) == 40 &&
                  offsetof(SampledParams, ld) == 48 && offsetof(SampledParams, rows) == 56 &&
                  offsetof(SampledParams, cols) == 60 && offsetof(SampledParams, chosen) == 64 &&
                  offsetof(SampledParams, lr_clamp) == 68 && offsetof(SampledParams, v_clamp) == 72 &&
                  offsetof(SampledParams, coef) == 76 && offsetof(SampledParams, aggregation) == 80 &&
                  offsetof(SampledParams, weights_known) == 84 && offsetof(SampledParams, max_len) == 88 &&
                  offsetof(SampledParams, tokens) == 96 && offsetof(SampledParams, valid_sequences) == 104 &&
                  offsetof(SampledParams, sequences) == 112 && offsetof(SampledParams, records) == 120 &&
                  offsetof(SampledParams, old_logp) == 128,
              "SampledParams: every field where src/cuda/kl/sampled.rs `SampledParams` has it");

// One block per sequence (row of the [B, T] batch). Writes the chosen estimator's values, the
// loss gradient when the denominators are known (`P.counts`, the mask count on the device, or
// with `P.weights_known` the three counts given by the host), and the row's record.
// A NaN in a valid token is reported (the row's outputs are then meaningless).
extern "C" __global__ void __launch_bounds__(256)
sampled_kl_rows(SampledParams P, unsigned long long* __restrict__ status) {
  SampledRow* __restrict__ records = static_cast<SampledRow*>(P.records);
  __shared__ float scratch[32];
  const long long row = blockIdx.x;
  if (row >= P.rows) return;
  const long long base = row * P.ld;
  const float* __restrict__ logp = P.logp;
  const float* __restrict__ ref_logp = P.ref_logp;
  const unsigned char* __restrict__ mask = P.mask;
  float* __restrict__ values = P.values;
  float* __restrict__ grad = P.grad;
  const float valid = row_valid_count(mask, base, P.cols, scratch);
  const bool weights_known = P.counts != nullptr || P.weights_known;
  const double* c = P.counts;
  const double tokens = c ? c[0] : P.tokens, valid_sequences = c ? c[1] : P.valid_sequences;
  const double sequences = c ? c[2] : P.sequences;
  const float w = weights_known ? __fmul_rn(P.coef, token_weight_f(P.aggregation, static_cast<float>(P.max_len),
                                                                   static_cast<float>(tokens),
                                                                   static_cast<float>(valid_sequences),
                                                                   static_cast<float>(sequences), valid))
                                : 0.0f;
  float sums[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  float clamped = 0.0f;
  // bit 0: NaN input or estimate; bit 1: infinite estimate or gradient from an infinite input;
  // bit 2: an infinite input; bit 3: finite inputs whose estimates or gradient overflow f32;
  // bit 4: a non-finite old_logp (bias correction).
  const float* __restrict__ old_logp = P.old_logp;
  unsigned bad = 0;
  for (long long t = threadIdx.x; t < P.cols; t += blockDim.x) {
    const long long i = base + t;
    float value = 0.0f, g = 0.0f;
    if (token_valid(mask, i)) {
      const float lp = logp[i], rlp = ref_logp[i];
      float rho = 1.0f;
      bool score = false;  // the gradient gains ρ·k (bias correction, ρ's clamp inactive)
      if (old_logp) {
        const float old = old_logp[i];
        bad |= isfinite(old) ? 0u : 16u;
        const float raw = __fsub_rn(lp, old);
        const float log_rho = clamp_keep_nan(raw, P.lr_clamp);
        rho = exp2f(__fmul_rn(log_rho, LOG2E));
        score = log_rho == raw;
      }
      const Estimates e = estimates(P.chosen, __fsub_rn(rlp, lp), P.lr_clamp, P.v_clamp, rho, score);
      const bool finite_in = isfinite(lp) && isfinite(rlp);
      bad |= (lp != lp || rlp != rlp || e.value != e.value || e.grad != e.grad) ? 1u : 0u;
      bad |= (!finite_in && (fabsf(e.value) == pos_inf() || fabsf(e.grad) == pos_inf())) ? 2u : 0u;
      bad |= finite_in ? 0u : 4u;
      bool fits = true;
#pragma unroll
      for (int k = 0; k < 8; ++k) {
        sums[k] = __fadd_rn(sums[k], e.values[k]);
        fits &= isfinite(e.values[k]);
      }
      clamped += e.clamped ? 1.0f : 0.0f;
      value = e.value;
      g = __fmul_rn(w, e.grad);
      // The weighted gradient is checked only where it is written (the weights are known).
      bad |= (finite_in && !(fits && isfinite(e.grad) && (!weights_known || isfinite(g)))) ? 8u : 0u;
    }
    if (values) values[i] = value;
    if (grad && weights_known) grad[i] = g;
  }
  const bool any_nan = __syncthreads_or(bad & 1u), any_inf = __syncthreads_or(bad & 2u);
  const bool inf_input = __syncthreads_or(bad & 4u), overflow = __syncthreads_or(bad & 8u);
  const bool bad_old = __syncthreads_or(bad & 16u);
  if (threadIdx.x == 0 && (bad_old || any_nan || any_inf || overflow))
    report(status, row, OP_SAMPLED_KL,
           bad_old   ? PROBLEM_NON_FINITE
           : any_nan ? PROBLEM_NAN
           : any_inf ? PROBLEM_INFINITE_KL
                     : PROBLEM_OVERFLOW);
  if (records == nullptr) return;
  // The 8 sums: each thread parks its partials in shared memory, then warp k reduces sum k
  // (lanes add 8 partials each in order, then a butterfly): a fixed order, few live registers.
  __shared__ float partial[8][256];
#pragma unroll
  for (int k = 0; k < 8; ++k) partial[k][threadIdx.x] = sums[k];
  const float clamped_total = block_sum(clamped, scratch);  // contains the __syncthreads
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  float v = 0.0f;
#pragma unroll
  for (int i = 0; i < 8; ++i) v = __fadd_rn(v, partial[warp][lane * 8 + i]);
  v = warp_sum(v);
  if (lane == 0) records[row].sums[warp] = v;
  // A row sum past f32 from finite inputs overflowed (the lower codes above win the minimum).
  if (lane == 0 && !isfinite(v) && !inf_input) report(status, row, OP_SAMPLED_KL, PROBLEM_OVERFLOW);
  if (threadIdx.x == 0) {
    records[row].valid = valid;
    records[row].clamped = clamped_total;
  }
}

// One block of 256 threads: the batch statistics from the row records, in f64, in a fixed
// order (thread i takes rows i, i + 256, ...; then a fixed tree), over `p`'s denominators
// (finalize_counts: the host's counts, or this batch's own).
extern "C" __global__ void __launch_bounds__(256) sampled_kl_finalize(FinalizeParams F) {
  const SampledRow* __restrict__ records = static_cast<const SampledRow*>(F.records);
  double* __restrict__ stats = F.stats;
  const int rows = F.rows, chosen = F.chosen;
  const float coef = F.coef;
  const AggregationParams& p = F.aggregation;
  __shared__ double sh[256];
  // The denominators, then this batch's own token and sequence counts: parked in shared memory
  // rather than kept live through the loop below.
  __shared__ double counts[5];
  {
    const double2 local = finalize_counts(records, rows, p, sh, counts);
    if (threadIdx.x == 0) {
      counts[3] = local.x;
      counts[4] = local.y;
    }
  }
  __syncthreads();
  // One estimator at a time keeps the registers low.
#pragma unroll 1
  for (int k = 0; k < 8; ++k) {
    double acc = 0.0;
#pragma unroll 1  // one reciprocal at a time: unrolled, the refinement spills
    for (long long r = threadIdx.x; r < rows; r += 256)
      acc += weight_of(p, counts, records[r].valid) * records[r].sums[k];
    const double m = block_sum_f64(acc, sh);
    if (threadIdx.x == 0) stats[STAT_MEANS + k] = m;
  }
  double clamped = 0.0;
  for (long long r = threadIdx.x; r < rows; r += 256) clamped += records[r].clamped;
  const double c = block_sum_f64(clamped, sh);
  if (threadIdx.x == 0) {
    const double local_tokens = counts[3];
    stats[STAT_LOSS] = static_cast<double>(coef) * stats[STAT_MEANS + chosen];
    stats[STAT_CLAMPED] = local_tokens > 0.0 ? div_f64(c, local_tokens) : 0.0;
    stats[STAT_COUNTS] = local_tokens;
    stats[STAT_COUNTS + 1] = counts[4];
    stats[STAT_COUNTS + 2] = static_cast<double>(rows);
  }
}

// The parameters of `kl_rewards` (src/cuda/kl/sampled.rs `RewardsParams`: the same fields at
// the same offsets, asserted on both sides).
struct RewardsParams {
  const float* kl;
  const unsigned char* mask;  // may be null
  const float* scores;        // one per sequence
  float* rewards;
  long long ld;
  int rows, cols;
  float beta;
};
static_assert(RK_FIELDS(RewardsParams, 8) && sizeof(RewardsParams) == 56 &&
                  offsetof(RewardsParams, kl) == 0 && offsetof(RewardsParams, mask) == 8 &&
                  offsetof(RewardsParams, scores) == 16 && offsetof(RewardsParams, rewards) == 24 &&
                  offsetof(RewardsParams, ld) == 32 && offsetof(RewardsParams, rows) == 40 &&
                  offsetof(RewardsParams, cols) == 44 && offsetof(RewardsParams, beta) == 48,
              "RewardsParams: every field where src/cuda/kl/sampled.rs `RewardsParams` has it");

// r_t = −β·kl_t on valid tokens, plus the sequence's score on its last valid token; 0 on
// padding. One block per sequence. Reports a sequence with a non-finite KL at a valid token or a
// non-finite score (PROBLEM_NON_FINITE), else one whose reward overflows f32 (PROBLEM_OVERFLOW).
extern "C" __global__ void __launch_bounds__(256)
kl_rewards(RewardsParams P, unsigned long long* __restrict__ status) {
  const float* __restrict__ kl = P.kl;
  const unsigned char* __restrict__ mask = P.mask;
  const float* __restrict__ scores = P.scores;
  float* __restrict__ rewards = P.rewards;
  const long long ld = P.ld;
  const int rows = P.rows, cols = P.cols;
  const float beta = P.beta;
  __shared__ int last_valid[32];
  const long long row = blockIdx.x;
  if (row >= rows) return;
  const long long base = row * ld;
  int last = -1;
  for (long long t = threadIdx.x; t < cols; t += blockDim.x)
    if (token_valid(mask, base + t)) last = static_cast<int>(t);  // increasing t: the thread's last
  // Block max of `last`.
  for (int o = 16; o > 0; o >>= 1) last = max(last, __shfl_xor_sync(0xffffffffu, last, o));
  if ((threadIdx.x & 31) == 0) last_valid[threadIdx.x >> 5] = last;
  __syncthreads();
  if (threadIdx.x < 32) {
    int v = threadIdx.x < (blockDim.x >> 5) ? last_valid[threadIdx.x] : -1;
    for (int o = 16; o > 0; o >>= 1) v = max(v, __shfl_xor_sync(0xffffffffu, v, o));
    if (threadIdx.x == 0) last_valid[0] = v;
  }
  __syncthreads();
  last = last_valid[0];
  const float score = scores[row];
  bool bad_input = !isfinite(score), overflow = false;
  for (long long t = threadIdx.x; t < cols; t += blockDim.x) {
    const long long i = base + t;
    const bool valid = token_valid(mask, i);
    const float k = valid ? kl[i] : 0.0f;
    float r = valid ? -__fmul_rn(beta, k) : 0.0f;
    if (t == last) r = __fadd_rn(r, score);
    rewards[i] = r;
    bad_input |= !isfinite(k);
    overflow |= !isfinite(r);
  }
  bad_input = __syncthreads_or(bad_input);
  overflow = __syncthreads_or(overflow);
  if (threadIdx.x == 0 && (bad_input || overflow))
    report(status, row, OP_KL_REWARDS, bad_input ? PROBLEM_NON_FINITE : PROBLEM_OVERFLOW);
}
