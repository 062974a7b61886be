// ppo family: the policy loss (clipped surrogate with asymmetric and dual clip, PPO-KL,
// GSPO-token, CISPO, SAPO, GMPO) and the clipped value loss, per token with their aggregation weights,
// gradients and statistics (MATH.md §4). One block per sequence writes the per-token outputs,
// the gradients and a row record in one pass; one block reduces the records in a fixed order
// (f64). The gradients' denominators are the caller's (global normaliser), or the batch's own:
// from the shape when there is no mask, else counted from the mask first (aggregation.cu's
// mask_counts_*, into `counts`).
#include "aggregation.cuh"

using namespace rk;

namespace {

constexpr unsigned OP_POLICY_LOSS = 12;
constexpr unsigned OP_VALUE_LOSS = 13;

// Objective codes (src/ppo.rs `PolicyObjective::code`): clip, PPO-KL, GSPO, CISPO, SAPO, GMPO.
enum Objective : int { CLIP = 0, KL_PENALTY = 1, GSPO = 2, CISPO = 3, SAPO = 4, GMPO = 5 };

// The policy kernels' parameters (src/cuda/ppo/loss.rs `PolicyParams`, same layout).
struct PolicyParams {
  const float* logp;
  const float* old_logp;
  const float* advantages;
  const unsigned char* mask;  // may be null
  const float* entropy;       // may be null
  float* loss;                // each output may be null
  float* grad_logp;
  float* grad_entropy;
  long long ld;
  int rows, cols, objective;
  float clip_low, clip_high, dual, lr_clamp, beta, entropy_coef;
  int aggregation;
  double max_len;
  int weights_known;  // the three counts below are the denominators (given by the host)
  int accumulate;     // add ∂loss/∂logp to grad_logp at valid tokens
  double tokens, valid_sequences, sequences;
  const double* counts;  // or the denominators on the device (the mask count); else null
  void* records;         // one PolicyRow per sequence for the statistics, or null
  float tau_pos, tau_neg;  // SAPO's temperatures (1 for the other objectives)
};
static_assert(RK_FIELDS(PolicyParams, 29) && sizeof(PolicyParams) == 176 &&
                  offsetof(PolicyParams, logp) == 0 && offsetof(PolicyParams, old_logp) == 8 &&
                  offsetof(PolicyParams, advantages) == 16 && offsetof(PolicyParams, mask) == 24 &&
                  offsetof(PolicyParams, entropy) == 32 && offsetof(PolicyParams, loss) == 40 &&
                  offsetof(PolicyParams, grad_logp) == 48 && offsetof(PolicyParams, grad_entropy) == 56 &&
                  offsetof(PolicyParams, ld) == 64 && offsetof(PolicyParams, rows) == 72 &&
                  offsetof(PolicyParams, cols) == 76 && offsetof(PolicyParams, objective) == 80 &&
                  offsetof(PolicyParams, clip_low) == 84 && offsetof(PolicyParams, clip_high) == 88 &&
                  offsetof(PolicyParams, dual) == 92 && offsetof(PolicyParams, lr_clamp) == 96 &&
                  offsetof(PolicyParams, beta) == 100 && offsetof(PolicyParams, entropy_coef) == 104 &&
                  offsetof(PolicyParams, aggregation) == 108 && offsetof(PolicyParams, max_len) == 112 &&
                  offsetof(PolicyParams, weights_known) == 120 && offsetof(PolicyParams, accumulate) == 124 &&
                  offsetof(PolicyParams, tokens) == 128 && offsetof(PolicyParams, valid_sequences) == 136 &&
                  offsetof(PolicyParams, sequences) == 144 && offsetof(PolicyParams, counts) == 152 &&
                  offsetof(PolicyParams, records) == 160 && offsetof(PolicyParams, tau_pos) == 168 &&
                  offsetof(PolicyParams, tau_neg) == 172,
              "PolicyParams: every field where src/cuda/ppo/loss.rs `PolicyParams` has it");

// One sequence's sums over its valid tokens (f32 within the row, f64 across rows).
struct PolicyRow {
  float loss, entropy, low, high, dual, k1, k3, ratio, ratio_min, ratio_max, valid, pad;
};
static_assert(sizeof(PolicyRow) == 48, "PolicyRow: POLICY_RECORD_BYTES of src/cuda/ppo/loss.rs");

// Statistics layout (f64; src/cuda/ppo/loss.rs `policy_stats_from_words`).
enum PolicyStat : int {
  PS_LOSS = 0, PS_POLICY, PS_ENTROPY, PS_LOW, PS_HIGH, PS_DUAL, PS_K1, PS_K3, PS_RATIO_MEAN, PS_RATIO_MIN,
  PS_RATIO_MAX, PS_ENTROPY_MEAN, PS_COUNTS  // three counts: valid tokens, valid sequences, sequences
};

struct TokenTerms {
  float loss, grad;
  bool low, high, dual;
};

// One token's loss and ∂L/∂logp (src/cpu/ppo/policy.rs `policy_row`, in the same f32 operations);
// `seq_loss` is GMPO's row loss.
__device__ __forceinline__ TokenTerms policy_token(const PolicyParams& P, float logp, float lr, bool clamped, float a,
                                                   float seq_loss) {
  const float r = expf(lr);
  const float lo = __fsub_rn(1.0f, P.clip_low), hi = __fadd_rn(1.0f, P.clip_high);
  const float clip = fminf(fmaxf(r, lo), hi);
  TokenTerms t{0.0f, 0.0f, false, false, false};
  switch (P.objective) {
    case KL_PENALTY: {
      const float k3 = __fsub_rn(__fsub_rn(r, 1.0f), lr);
      t.loss = __fadd_rn(__fmul_rn(-a, r), __fmul_rn(P.beta, k3));
      t.grad = clamped ? 0.0f : __fadd_rn(__fmul_rn(-a, r), __fmul_rn(P.beta, __fsub_rn(r, 1.0f)));
      break;
    }
    case CISPO:
      t.loss = __fmul_rn(__fmul_rn(-clip, a), logp);
      t.grad = __fmul_rn(-clip, a);
      t.low = r < lo;
      t.high = r > hi;
      break;
    case SAPO: {  // σ(x) and σ(x)·σ(−x)·r from e = e^{−|x|} (r·e is 0 where e underflows)
      const bool pos = a > 0.0f;
      const float tau = pos ? P.tau_pos : P.tau_neg;
      const float x = __fmul_rn(tau, __fsub_rn(r, 1.0f));
      const float e = expf(-fabsf(x));
      const float inv = __fdiv_rn(1.0f, __fadd_rn(1.0f, e));
      const float sigmoid = x >= 0.0f ? inv : __fmul_rn(e, inv);
      t.loss = __fmul_rn(__fmul_rn(-a, __fdiv_rn(4.0f, tau)), sigmoid);
      const float re = e > 0.0f ? __fmul_rn(r, e) : 0.0f;
      t.grad = clamped ? 0.0f : __fmul_rn(__fmul_rn(__fmul_rn(__fmul_rn(-a, 4.0f), re), inv), inv);
      break;
    }
    case GMPO: {  // one-sided log-space clip of the token's log-ratio
      const bool low = a < 0.0f && lr < -P.clip_low, high = a > 0.0f && lr > P.clip_high;
      const bool free = (a > 0.0f && lr <= P.clip_high) || (a < 0.0f && lr >= -P.clip_low);
      t.loss = seq_loss;
      t.grad = (free && !clamped) ? seq_loss : 0.0f;
      t.low = low;
      t.high = high;
      break;
    }
    default: {  // CLIP, GSPO (P.dual is +inf unless CLIP with a dual clip)
      const float c = P.dual;
      float l = fmaxf(__fmul_rn(-a, r), __fmul_rn(-a, clip));
      if (a < 0.0f) l = fminf(l, __fmul_rn(-a, c));
      const bool active = (a > 0.0f && r <= hi) || (a < 0.0f && lo <= r && r <= c);
      t.loss = l;
      t.grad = (active && !clamped) ? __fmul_rn(-a, r) : 0.0f;
      t.low = a < 0.0f && r < lo;
      t.high = a > 0.0f && r > hi;
      t.dual = a < 0.0f && r > c;
    }
  }
  return t;
}

__device__ __forceinline__ float clamp_lr(float x, float c) { return fminf(fmaxf(x, -c), c); }

__device__ __forceinline__ float block_min(float v, float* scratch) {
  for (int o = 16; o > 0; o >>= 1) v = fminf(v, __shfl_xor_sync(0xffffffffu, v, o));
  if ((threadIdx.x & 31) == 0) scratch[threadIdx.x >> 5] = v;
  __syncthreads();
  float m = (threadIdx.x & 31) < (blockDim.x >> 5) ? scratch[threadIdx.x & 31] : pos_inf();
  for (int o = 16; o > 0; o >>= 1) m = fminf(m, __shfl_xor_sync(0xffffffffu, m, o));
  __syncthreads();
  return m;
}

__device__ __forceinline__ float block_max(float v, float* scratch) {
  return -block_min(-v, scratch);
}

// The block's f64 sum of one value per thread (warp trees, then a tree over ≤ 32 warps), the
// same at every thread. `dscratch` holds 32 doubles.
__device__ __forceinline__ double block_sum_f64_32(double s, double* dscratch) {
  for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
  if ((threadIdx.x & 31) == 0) dscratch[threadIdx.x >> 5] = s;
  __syncthreads();
  double total = (threadIdx.x & 31) < (blockDim.x >> 5) ? dscratch[threadIdx.x & 31] : 0.0;
  for (int o = 16; o > 0; o >>= 1) total += __shfl_xor_sync(0xffffffffu, total, o);
  __syncthreads();
  return total;
}

// The GSPO sequence log-ratio (f64 sum, one rounding, as the CPU): the clamp is applied by
// the caller. `dscratch` holds 32 doubles.
__device__ __forceinline__ float sequence_log_ratio(const PolicyParams& P, long long base, float valid,
                                                    double* dscratch) {
  double s = 0.0;
  for (long long t = threadIdx.x; t < P.cols; t += blockDim.x)
    if (token_valid(P.mask, base + t)) s += static_cast<double>(__fsub_rn(P.logp[base + t], P.old_logp[base + t]));
  return static_cast<float>(block_sum_f64_32(s, dscratch) / static_cast<double>(fmaxf(valid, 1.0f)));
}

// GMPO's row loss −Ā·exp(mean_t c_t), c_t the token log-ratio clipped one-sided in log space
// (f64 sums, as the CPU). `dscratch` holds 32 doubles.
__device__ __forceinline__ float gmpo_sequence_loss(const PolicyParams& P, long long base, float valid,
                                                    double* dscratch) {
  double c_sum = 0.0, a_sum = 0.0;
  for (long long t = threadIdx.x; t < P.cols; t += blockDim.x) {
    if (!token_valid(P.mask, base + t)) continue;
    const float lr = clamp_lr(__fsub_rn(P.logp[base + t], P.old_logp[base + t]), P.lr_clamp);
    const float a = P.advantages[base + t];
    const float c = a > 0.0f ? fminf(lr, P.clip_high) : a < 0.0f ? fmaxf(lr, -P.clip_low) : 0.0f;
    c_sum += static_cast<double>(c);
    a_sum += static_cast<double>(a);
  }
  const double n = static_cast<double>(fmaxf(valid, 1.0f));
  const double c_total = block_sum_f64_32(c_sum, dscratch), a_total = block_sum_f64_32(a_sum, dscratch);
  return static_cast<float>(-(a_total / n) * exp(c_total / n));
}

// One pass over a row: per-token outputs (the gradients only with a weight, `w_known`), the
// report of non-finite inputs, and the row's sums when `rec` is not null.
__device__ __forceinline__ void policy_row(const PolicyParams& P, long long row, float valid, float w, bool w_known,
                                           PolicyRow* rec, unsigned long long* status, float* scratch) {
  const long long base = row * P.ld;
  __shared__ double dscratch[32];
  const float seq_lr = P.objective == GSPO ? sequence_log_ratio(P, base, valid, dscratch) : 0.0f;
  const float seq_loss = P.objective == GMPO ? gmpo_sequence_loss(P, base, valid, dscratch) : 0.0f;
  const float gh = -__fmul_rn(P.entropy_coef, w);
  float loss = 0.0f, ent = 0.0f, low = 0.0f, high = 0.0f, dual = 0.0f, k1 = 0.0f, k3 = 0.0f, ratio = 0.0f;
  float rmin = pos_inf(), rmax = neg_inf();
  bool bad = false, over = false;  // a non-finite input; a finite input's output beyond f32
  for (long long t = threadIdx.x; t < P.cols; t += blockDim.x) {
    const long long i = base + t;
    float l_out = 0.0f, g_out = 0.0f, h_out = 0.0f;
    if (token_valid(P.mask, i)) {
      const float lp = P.logp[i], old = P.old_logp[i], a = P.advantages[i];
      const float h = P.entropy ? P.entropy[i] : 0.0f;
      bad |= !(isfinite(lp) && isfinite(old) && isfinite(a) && isfinite(h));
      const float token_raw = __fsub_rn(lp, old);
      const float token_lr = clamp_lr(token_raw, P.lr_clamp);
      const float raw = P.objective == GSPO ? seq_lr : token_raw;
      const float lr = clamp_lr(raw, P.lr_clamp);
      const TokenTerms terms = policy_token(P, lp, lr, lr != raw, a, seq_loss);
      l_out = terms.loss;
      g_out = __fmul_rn(w, terms.grad);
      h_out = gh;
      const float r = expf(token_lr);
      loss = __fadd_rn(loss, terms.loss);
      ent = __fadd_rn(ent, h);
      low += terms.low ? 1.0f : 0.0f;
      high += terms.high ? 1.0f : 0.0f;
      dual += terms.dual ? 1.0f : 0.0f;
      k1 = __fsub_rn(k1, token_lr);
      k3 = __fadd_rn(k3, __fsub_rn(__fsub_rn(r, 1.0f), token_lr));
      ratio = __fadd_rn(ratio, r);
      rmin = fminf(rmin, r);
      rmax = fmaxf(rmax, r);
    }
    over |= !(isfinite(l_out) && (!w_known || isfinite(g_out)));
    if (P.loss) P.loss[i] = l_out;
    if (w_known && P.grad_logp) {
      if (!P.accumulate) {
        P.grad_logp[i] = g_out;
      } else if (token_valid(P.mask, i)) {
        P.grad_logp[i] = __fadd_rn(P.grad_logp[i], g_out);
        over |= !isfinite(P.grad_logp[i]);
      }
    }
    if (w_known && P.grad_entropy) P.grad_entropy[i] = h_out;
  }
  over |= !(isfinite(loss) && isfinite(ent) && isfinite(k1) && isfinite(k3) && isfinite(ratio));
  // Reported whether or not records are kept: uniform over the block.
  const bool any_bad = __syncthreads_or(bad);
  bool any_over = __syncthreads_or(over);
  if (threadIdx.x == 0 && any_bad) report(status, row, OP_POLICY_LOSS, PROBLEM_NON_FINITE);
  if (rec == nullptr) {
    if (threadIdx.x == 0 && any_over && !any_bad) report(status, row, OP_POLICY_LOSS, PROBLEM_OVERFLOW);
    return;
  }
  PolicyRow out;
  out.loss = block_sum(loss, scratch);
  out.entropy = block_sum(ent, scratch);
  out.low = block_sum(low, scratch);
  out.high = block_sum(high, scratch);
  out.dual = block_sum(dual, scratch);
  out.k1 = block_sum(k1, scratch);
  out.k3 = block_sum(k3, scratch);
  out.ratio = block_sum(ratio, scratch);
  out.ratio_min = block_min(rmin, scratch);
  out.ratio_max = block_max(rmax, scratch);
  out.valid = valid;
  out.pad = 0.0f;
  // A row sum beyond f32, from finite per-token terms.
  any_over |= !(isfinite(out.loss) && isfinite(out.entropy) && isfinite(out.k1) && isfinite(out.k3) &&
                isfinite(out.ratio));
  if (threadIdx.x == 0 && any_over && !any_bad) report(status, row, OP_POLICY_LOSS, PROBLEM_OVERFLOW);
  if (threadIdx.x == 0) rec[row] = out;
}

__device__ __forceinline__ float policy_weight(const PolicyParams& P, double tokens, double valid_sequences,
                                               double sequences, float valid) {
  return token_weight_f(P.aggregation, static_cast<float>(P.max_len), static_cast<float>(tokens),
                        static_cast<float>(valid_sequences), static_cast<float>(sequences), valid);
}

}  // namespace

// One block of 256 threads per sequence: per-token loss, the gradients when the denominators
// are known (on the host or counted on the device), and the row record.
extern "C" __global__ void __launch_bounds__(256)
policy_loss_rows(PolicyParams P, unsigned long long* __restrict__ status) {
  PolicyRow* __restrict__ records = static_cast<PolicyRow*>(P.records);
  __shared__ float scratch[32];
  const long long row = blockIdx.x;
  if (row >= P.rows) return;
  const float valid = row_valid_count(P.mask, row * P.ld, P.cols, scratch);
  const bool known = P.counts != nullptr || P.weights_known;
  const float w = P.counts    ? policy_weight(P, P.counts[0], P.counts[1], P.counts[2], valid)
                  : known     ? policy_weight(P, P.tokens, P.valid_sequences, P.sequences, valid)
                              : 0.0f;
  policy_row(P, row, valid, w, known, records, status, scratch);
}

// One block of 256 threads: the statistics from the row records, f64, fixed order (thread i
// takes rows i, i + 256, …; then a fixed tree).
extern "C" __global__ void __launch_bounds__(256) policy_loss_finalize(FinalizeParams F) {
  const PolicyRow* __restrict__ records = static_cast<const PolicyRow*>(F.records);
  double* __restrict__ stats = F.stats;
  const int rows = F.rows;
  const float entropy_coef = F.coef;
  const AggregationParams& p = F.aggregation;
  __shared__ double sh[256];
  __shared__ double counts[3];
  const double2 local = finalize_counts(records, rows, p, sh, counts);
  const double local_tokens = local.x, local_seqs = local.y;
  double pol = 0.0;
#pragma unroll 1  // one reciprocal at a time: unrolled, the refinement spills
  for (long long r = threadIdx.x; r < rows; r += 256) pol += weight_of(p, counts, records[r].valid) * records[r].loss;
  const double policy = block_sum_f64(pol, sh);
  double ent = 0.0;
#pragma unroll 1  // one reciprocal at a time: unrolled, the refinement spills
  for (long long r = threadIdx.x; r < rows; r += 256) ent += weight_of(p, counts, records[r].valid) * records[r].entropy;
  const double entropy = block_sum_f64(ent, sh);
  if (threadIdx.x == 0) {  // written now: fewer values live through the loops below
    stats[PS_POLICY] = policy;
    stats[PS_ENTROPY] = entropy;
    stats[PS_LOSS] = policy - static_cast<double>(entropy_coef) * entropy;
    stats[PS_COUNTS] = local_tokens;
    stats[PS_COUNTS + 1] = local_seqs;
    stats[PS_COUNTS + 2] = static_cast<double>(rows);
  }
  const bool any_tokens = local_tokens > 0.0;
  // The plain sums, one field at a time (few live registers), as means over valid tokens.
  // Fields of PolicyRow by float index: entropy 1, low 2 … ratio 7 (slots PS_LOW … PS_RATIO_MEAN
  // are fields 2 … 7, PS_ENTROPY_MEAN is field 1).
  const float* fields = reinterpret_cast<const float*>(records);
  constexpr int FLOATS = sizeof(PolicyRow) / sizeof(float);
#pragma unroll 1
  for (int slot = PS_LOW; slot <= PS_ENTROPY_MEAN; ++slot) {
    if (slot == PS_RATIO_MIN || slot == PS_RATIO_MAX) continue;
    const int field = slot == PS_ENTROPY_MEAN ? 1 : slot - 1;
    double acc = 0.0;
    for (long long r = threadIdx.x; r < rows; r += 256) acc += fields[r * FLOATS + field];
    const double total = block_sum_f64(acc, sh);
    if (threadIdx.x == 0) stats[slot] = any_tokens ? div_f64(total, local_tokens) : 0.0;
  }
  // Ratio min and max: exact in f32 (the records are f32), fixed trees.
  __shared__ float fl[256];
  float lo = pos_inf(), hi = neg_inf();
  for (long long r = threadIdx.x; r < rows; r += 256) {
    lo = fminf(lo, records[r].ratio_min);
    hi = fmaxf(hi, records[r].ratio_max);
  }
  fl[threadIdx.x] = lo;
  __syncthreads();
  for (int s = 128; s > 0; s >>= 1) {
    if (threadIdx.x < s) fl[threadIdx.x] = fminf(fl[threadIdx.x], fl[threadIdx.x + s]);
    __syncthreads();
  }
  if (threadIdx.x == 0) stats[PS_RATIO_MIN] = fl[0];
  __syncthreads();
  fl[threadIdx.x] = hi;
  __syncthreads();
  for (int s = 128; s > 0; s >>= 1) {
    if (threadIdx.x < s) fl[threadIdx.x] = fmaxf(fl[threadIdx.x], fl[threadIdx.x + s]);
    __syncthreads();
  }
  if (threadIdx.x == 0) stats[PS_RATIO_MAX] = fl[0];
}

// ---- value loss ---------------------------------------------------------------------------
namespace {

// The value kernels' parameters (src/cuda/ppo/value.rs `ValueParams`, same layout).
struct ValueParams {
  const float* values;
  const float* old_values;
  const float* returns;
  const unsigned char* mask;  // may be null
  float* loss;                // each output may be null
  float* grad_values;
  long long ld;
  int rows, cols;
  float clip;  // ε_v, or negative for no clip
  float coef;
  int aggregation;
  double max_len;
  int weights_known;  // the three counts below are the denominators (given by the host)
  double tokens, valid_sequences, sequences;
  const double* counts;  // or the denominators on the device (the mask count); else null
  void* records;         // one ValueRow per sequence for the statistics, or null
};
static_assert(RK_FIELDS(ValueParams, 19) && sizeof(ValueParams) == 136 &&
                  offsetof(ValueParams, values) == 0 && offsetof(ValueParams, old_values) == 8 &&
                  offsetof(ValueParams, returns) == 16 && offsetof(ValueParams, mask) == 24 &&
                  offsetof(ValueParams, loss) == 32 && offsetof(ValueParams, grad_values) == 40 &&
                  offsetof(ValueParams, ld) == 48 && offsetof(ValueParams, rows) == 56 &&
                  offsetof(ValueParams, cols) == 60 && offsetof(ValueParams, clip) == 64 &&
                  offsetof(ValueParams, coef) == 68 && offsetof(ValueParams, aggregation) == 72 &&
                  offsetof(ValueParams, max_len) == 80 && offsetof(ValueParams, weights_known) == 88 &&
                  offsetof(ValueParams, tokens) == 96 && offsetof(ValueParams, valid_sequences) == 104 &&
                  offsetof(ValueParams, sequences) == 112 && offsetof(ValueParams, counts) == 120 &&
                  offsetof(ValueParams, records) == 128,
              "ValueParams: every field where src/cuda/ppo/value.rs `ValueParams` has it");

// Loss sum, clipped count, valid count (and padding).
struct ValueRow {
  float loss, clipped, valid, pad;
};
static_assert(sizeof(ValueRow) == 16, "ValueRow: VALUE_RECORD_BYTES of src/cuda/ppo/value.rs");

enum ValueStat : int { VS_LOSS = 0, VS_CLIP, VS_COUNTS };

struct ValueTerms {
  float loss, grad;
  bool clipped;
};

// src/cpu/ppo/value.rs `value_token`, in the same f32 operations: errors compared by magnitude,
// the loss as (½·d)·d, which overflows only when ½·d² does.
__device__ __forceinline__ ValueTerms value_token(float clip, float v, float old, float ret) {
  const float d = __fsub_rn(v, ret);
  if (clip < 0.0f) return {__fmul_rn(__fmul_rn(0.5f, d), d), d, false};
  const float v_clip = __fadd_rn(old, fminf(fmaxf(__fsub_rn(v, old), -clip), clip));
  const float dc = __fsub_rn(v_clip, ret);
  const bool unclipped_larger = fabsf(d) >= fabsf(dc);
  const float g = unclipped_larger ? d : (fabsf(__fsub_rn(v, old)) < clip ? dc : 0.0f);
  const float e = unclipped_larger ? d : dc;
  return {__fmul_rn(__fmul_rn(0.5f, e), e), g, fabsf(dc) > fabsf(d)};
}

// One pass over a row: per-token outputs (the gradient with a weight, `w_known`), the report of
// non-finite inputs and the row's sums (when `rec` is not null).
__device__ __forceinline__ void value_row(const ValueParams& P, long long row, float valid, float w, bool w_known,
                                          ValueRow* rec, unsigned long long* status, float* scratch) {
  const long long base = row * P.ld;
  float loss = 0.0f, clipped = 0.0f;
  bool bad = false, over = false;  // a non-finite input; a finite input's output beyond f32
  for (long long t = threadIdx.x; t < P.cols; t += blockDim.x) {
    const long long i = base + t;
    float l_out = 0.0f, g_out = 0.0f;
    if (token_valid(P.mask, i)) {
      const float v = P.values[i], old = P.old_values[i], ret = P.returns[i];
      bad |= !(isfinite(v) && isfinite(old) && isfinite(ret));
      const ValueTerms terms = value_token(P.clip, v, old, ret);
      l_out = terms.loss;
      g_out = __fmul_rn(w, terms.grad);
      loss = __fadd_rn(loss, terms.loss);
      clipped += terms.clipped ? 1.0f : 0.0f;
    }
    over |= !(isfinite(l_out) && (!w_known || isfinite(g_out)));
    if (P.loss) P.loss[i] = l_out;
    if (w_known && P.grad_values) P.grad_values[i] = g_out;
  }
  over |= !isfinite(loss);
  const bool any_bad = __syncthreads_or(bad);
  bool any_over = __syncthreads_or(over);
  if (threadIdx.x == 0 && any_bad) report(status, row, OP_VALUE_LOSS, PROBLEM_NON_FINITE);
  if (rec == nullptr) {
    if (threadIdx.x == 0 && any_over && !any_bad) report(status, row, OP_VALUE_LOSS, PROBLEM_OVERFLOW);
    return;
  }
  const float l = block_sum(loss, scratch), c = block_sum(clipped, scratch);
  any_over |= !isfinite(l);  // a row sum beyond f32, from finite per-token losses
  if (threadIdx.x == 0 && any_over && !any_bad) report(status, row, OP_VALUE_LOSS, PROBLEM_OVERFLOW);
  if (threadIdx.x == 0) rec[row] = ValueRow{l, c, valid, 0.0f};
}

__device__ __forceinline__ float value_weight(const ValueParams& P, double tokens, double valid_sequences,
                                              double sequences, float valid) {
  return __fmul_rn(P.coef, token_weight_f(P.aggregation, static_cast<float>(P.max_len), static_cast<float>(tokens),
                                          static_cast<float>(valid_sequences), static_cast<float>(sequences), valid));
}

}  // namespace

extern "C" __global__ void __launch_bounds__(256)
value_loss_rows(ValueParams P, unsigned long long* __restrict__ status) {
  ValueRow* __restrict__ records = static_cast<ValueRow*>(P.records);
  __shared__ float scratch[32];
  const long long row = blockIdx.x;
  if (row >= P.rows) return;
  const float valid = row_valid_count(P.mask, row * P.ld, P.cols, scratch);
  const bool known = P.counts != nullptr || P.weights_known;
  const float w = P.counts    ? value_weight(P, P.counts[0], P.counts[1], P.counts[2], valid)
                  : known     ? value_weight(P, P.tokens, P.valid_sequences, P.sequences, valid)
                              : 0.0f;
  value_row(P, row, valid, w, known, records, status, scratch);
}

// One block of 256 threads: [coef·loss, clip fraction, valid tokens, valid sequences,
// sequences] in f64, fixed order.
extern "C" __global__ void __launch_bounds__(256) value_loss_finalize(FinalizeParams F) {
  const ValueRow* __restrict__ records = static_cast<const ValueRow*>(F.records);
  double* __restrict__ stats = F.stats;
  const int rows = F.rows;
  const float coef = F.coef;
  const AggregationParams& p = F.aggregation;
  __shared__ double sh[256];
  __shared__ double counts[3];
  const double2 local = finalize_counts(records, rows, p, sh, counts);
  const double local_tokens = local.x, local_seqs = local.y;
  double acc = 0.0;
#pragma unroll 1  // one reciprocal at a time: unrolled, the refinement spills
  for (long long r = threadIdx.x; r < rows; r += 256) acc += weight_of(p, counts, records[r].valid) * records[r].loss;
  const double loss = block_sum_f64(acc, sh);
  double clipped = 0.0;
  for (long long r = threadIdx.x; r < rows; r += 256) clipped += records[r].clipped;
  const double clipped_total = block_sum_f64(clipped, sh);
  if (threadIdx.x == 0) {
    stats[VS_LOSS] = static_cast<double>(coef) * loss;
    stats[VS_CLIP] = local_tokens > 0.0 ? div_f64(clipped_total, local_tokens) : 0.0;
    stats[VS_COUNTS] = local_tokens;
    stats[VS_COUNTS + 1] = local_seqs;
    stats[VS_COUNTS + 2] = static_cast<double>(rows);
  }
}
