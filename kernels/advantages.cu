// Advantage estimation (MATH.md §3): GAE as a parallel suffix scan of affine maps, the group
// estimators (one warp per group), masked moments / whitening, DAPO's overlong score shaping.
// Deterministic: every reduction and composition runs in an order fixed by the shape alone.
#include "aggregation.cuh"

using namespace rk;

namespace {

constexpr unsigned OP_GAE = 9;
constexpr unsigned OP_GROUP_ADVANTAGES = 10;
constexpr unsigned OP_MASKED_MOMENTS = 11;
constexpr unsigned OP_OVERLONG = 16;

// ---- GAE --------------------------------------------------------------------------------
// The state right of position t is (A, W, Y): the advantage and the value of the first valid
// step at or after t, and Y = 1 when there is none (so the score lands on the last valid
// step). Each position is the map x ↦ M·x + c with M = [[p, q, s], [0, w, 0], [0, 0, z]]:
//   valid:          A ← γλ·A + γ·W + score·Y + (r − V),  W ← V,  Y ← 0
//   masked, pass:   identity
//   masked, reset:  A ← 0, W ← 0, Y unchanged
// The state beyond the end is (0, 0, 1). Maps compose associatively; `compose(f, g)` is f∘g
// with g the part to the right (applied first).
constexpr int GAE_ITEMS = 4;                  // consecutive positions per thread
constexpr int GAE_BLOCK = 256;                // threads per block
constexpr int GAE_CHUNK = GAE_BLOCK * GAE_ITEMS;  // positions per block (src/cuda/advantages/gae.rs)
// Sequences of at most 32·GAE_ITEMS = 128 positions take one warp each (gae_warp).

struct Affine {
  float p, q, s, w, z, c0, c1, c2;
};
static_assert(sizeof(Affine) == 32, "Affine: MAP_BYTES of src/cuda/advantages/gae.rs");

struct GaeState {
  float a, w, y;
};
static_assert(sizeof(GaeState) <= 16, "GaeState: within STATE_BYTES of src/cuda/advantages/gae.rs");

// The kernels' parameters (src/cuda/advantages/gae.rs `GaeParams`, same layout).
struct GaeParams {
  const float* rewards;  // each of these five may be null
  const float* kl;
  const float* scores;  // one per row
  const float* values;
  const unsigned char* mask;
  float* advantages;  // either may be null
  float* returns;
  long long ld;
  int rows, cols, nchunks;
  float gamma, gamma_lambda, beta;
  int reset;
  Affine* maps;       // the split scan's workspace: rows·nchunks chunk maps, then as many
  GaeState* carries;  // entering states (null for the one-pass kernels)
};
static_assert(RK_FIELDS(GaeParams, 17) && sizeof(GaeParams) == 112 &&
                  offsetof(GaeParams, rewards) == 0 && offsetof(GaeParams, kl) == 8 &&
                  offsetof(GaeParams, scores) == 16 && offsetof(GaeParams, values) == 24 &&
                  offsetof(GaeParams, mask) == 32 && offsetof(GaeParams, advantages) == 40 &&
                  offsetof(GaeParams, returns) == 48 && offsetof(GaeParams, ld) == 56 &&
                  offsetof(GaeParams, rows) == 64 && offsetof(GaeParams, cols) == 68 &&
                  offsetof(GaeParams, nchunks) == 72 && offsetof(GaeParams, gamma) == 76 &&
                  offsetof(GaeParams, gamma_lambda) == 80 && offsetof(GaeParams, beta) == 84 &&
                  offsetof(GaeParams, reset) == 88 && offsetof(GaeParams, maps) == 96 &&
                  offsetof(GaeParams, carries) == 104,
              "GaeParams: every field where src/cuda/advantages/gae.rs `GaeParams` has it");

__device__ __forceinline__ Affine identity_map() { return {1.0f, 0.0f, 0.0f, 1.0f, 1.0f, 0.0f, 0.0f, 0.0f}; }

__device__ __forceinline__ Affine compose(const Affine& f, const Affine& g) {
  Affine r;
  r.p = f.p * g.p;
  r.q = fmaf(f.p, g.q, f.q * g.w);
  r.s = fmaf(f.p, g.s, f.s * g.z);
  r.w = f.w * g.w;
  r.z = f.z * g.z;
  r.c0 = fmaf(f.p, g.c0, fmaf(f.q, g.c1, fmaf(f.s, g.c2, f.c0)));
  r.c1 = fmaf(f.w, g.c1, f.c1);
  r.c2 = fmaf(f.z, g.c2, f.c2);
  return r;
}

__device__ __forceinline__ GaeState apply(const Affine& f, GaeState x) {
  return {fmaf(f.p, x.a, fmaf(f.q, x.w, fmaf(f.s, x.y, f.c0))), fmaf(f.w, x.w, f.c1), fmaf(f.z, x.y, f.c2)};
}

__device__ __forceinline__ Affine shfl_down(const Affine& f, int d) {
  Affine r;
  r.p = __shfl_down_sync(0xffffffffu, f.p, d);
  r.q = __shfl_down_sync(0xffffffffu, f.q, d);
  r.s = __shfl_down_sync(0xffffffffu, f.s, d);
  r.w = __shfl_down_sync(0xffffffffu, f.w, d);
  r.z = __shfl_down_sync(0xffffffffu, f.z, d);
  r.c0 = __shfl_down_sync(0xffffffffu, f.c0, d);
  r.c1 = __shfl_down_sync(0xffffffffu, f.c1, d);
  r.c2 = __shfl_down_sync(0xffffffffu, f.c2, d);
  return r;
}

// GAE_ITEMS consecutive values of `p` (null: zeros) from element i, where the first n of them
// exist: one 16-byte load when they all exist and are 16-byte aligned, so that a warp reads 512
// consecutive bytes per load. Values at masked positions are read with their neighbours but
// never used.
__device__ __forceinline__ void load_items_f32(const float* p, long long i, long long n, float (&out)[GAE_ITEMS]) {
  static_assert(GAE_ITEMS == 4, "one float4 per thread");
  if (p == nullptr) {
#pragma unroll
    for (int j = 0; j < GAE_ITEMS; ++j) out[j] = 0.0f;
  } else if (n >= GAE_ITEMS && aligned16(p + i)) {
    const float4 q = *reinterpret_cast<const float4*>(p + i);
    out[0] = q.x, out[1] = q.y, out[2] = q.z, out[3] = q.w;
  } else {
#pragma unroll
    for (int j = 0; j < GAE_ITEMS; ++j) out[j] = j < n ? p[i + j] : 0.0f;
  }
}

// The mask bytes of the same positions (null mask: all valid), one 4-byte load when aligned.
__device__ __forceinline__ void load_items_mask(const unsigned char* m, long long i, long long n,
                                                bool (&out)[GAE_ITEMS]) {
  if (m == nullptr) {
#pragma unroll
    for (int j = 0; j < GAE_ITEMS; ++j) out[j] = true;
  } else if (n >= GAE_ITEMS && aligned_to(m + i, 4)) {
    const uchar4 q = *reinterpret_cast<const uchar4*>(m + i);
    out[0] = q.x != 0, out[1] = q.y != 0, out[2] = q.z != 0, out[3] = q.w != 0;
  } else {
#pragma unroll
    for (int j = 0; j < GAE_ITEMS; ++j) out[j] = j < n && m[i + j] != 0;
  }
}

// Stores GAE_ITEMS consecutive values from element i, the first n of which exist (as the loads).
__device__ __forceinline__ void store_items_f32(float* p, long long i, long long n, const float (&v)[GAE_ITEMS]) {
  if (p == nullptr) return;
  if (n >= GAE_ITEMS && aligned16(p + i)) {
    *reinterpret_cast<float4*>(p + i) = make_float4(v[0], v[1], v[2], v[3]);
  } else {
#pragma unroll
    for (int j = 0; j < GAE_ITEMS; ++j)
      if (j < n) p[i + j] = v[j];
  }
}

// This thread's positions [t0, t0 + GAE_ITEMS): their maps and their composition, validity and
// values. A valid position is the map of (r, V) above, with r = reward − β·kl; a masked one the
// identity (or the reset); positions past the end the identity.
struct Items {
  Affine f[GAE_ITEMS];
  float v[GAE_ITEMS];
  bool valid[GAE_ITEMS];
  bool bad_input;  // a NaN or infinite input at a valid position, or a non-finite score
  Affine total;
};

__device__ __forceinline__ void load_items(const GaeParams& P, long long row, long long t0, Items& it) {
  const long long i = row * P.ld + t0;
  const long long n = P.cols - t0;  // positions of this thread that exist (may be <= 0)
  float r[GAE_ITEMS], k[GAE_ITEMS];
  load_items_f32(P.rewards, i, n, r);
  load_items_f32(P.kl, i, n, k);
  load_items_f32(P.values, i, n, it.v);
  load_items_mask(P.mask, i, n, it.valid);
  const float score = P.scores ? P.scores[row] : 0.0f;
  it.bad_input = !isfinite(score);
#pragma unroll
  for (int j = 0; j < GAE_ITEMS; ++j) {
    if (j >= n) {
      it.valid[j] = false;
      it.v[j] = 0.0f;
      it.f[j] = identity_map();
    } else if (!it.valid[j]) {
      it.v[j] = 0.0f;
      it.f[j] = P.reset ? Affine{0.0f, 0.0f, 0.0f, 0.0f, 1.0f, 0.0f, 0.0f, 0.0f} : identity_map();
    } else {
      it.bad_input |= !(isfinite(r[j]) && isfinite(k[j]) && isfinite(it.v[j]));
      const float rew = P.kl ? fmaf(-P.beta, k[j], r[j]) : r[j];
      it.f[j] = {P.gamma_lambda, P.gamma, score, 0.0f, 0.0f, rew - it.v[j], it.v[j], 0.0f};
    }
  }
  it.total = it.f[GAE_ITEMS - 1];
#pragma unroll
  for (int j = GAE_ITEMS - 2; j >= 0; --j) it.total = compose(it.f[j], it.total);
}

// Inclusive suffix scan over the warp: lane l ends with F_l ∘ F_{l+1} ∘ … ∘ F_31.
__device__ __forceinline__ Affine warp_suffix_scan(Affine x) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int d = 1; d < 32; d <<= 1) {
    const Affine o = shfl_down(x, d);
    if (lane + d < 32) x = compose(x, o);
  }
  return x;
}

// Scans the WARPS·32·GAE_ITEMS positions from `start` of `row`, entering from the right with
// `carry`, and writes the outputs. WARPS = 1: one warp per sequence, no block barrier. With
// `left` (WARPS > 1), every thread returns the state the chunk leaves at `start`, the one the
// chunk to its left enters with (the block's thread 0 computes it); otherwise the return value
// is this thread's own.
template <int WARPS>
__device__ __forceinline__ GaeState scan_chunk(const GaeParams& P, long long row, long long start, GaeState carry,
                                               Affine* warp_totals, GaeState* left, unsigned long long* status) {
  const int lane = threadIdx.x & 31, warp = (threadIdx.x >> 5) % WARPS;
  const long long t0 = start + static_cast<long long>(warp * 32 + lane) * GAE_ITEMS;
  Items it;
  load_items(P, row, t0, it);
  const Affine incl = warp_suffix_scan(it.total);
  Affine excl = shfl_down(incl, 1);
  if (lane == 31) excl = identity_map();
  GaeState s = carry;
  if constexpr (WARPS > 1) {
    if (lane == 0) warp_totals[warp] = incl;
    __syncthreads();
    for (int k = WARPS - 1; k > warp; --k) s = apply(warp_totals[k], s);
  }
  s = apply(excl, s);
  bool bad = false;
  float adv[GAE_ITEMS], ret[GAE_ITEMS];
#pragma unroll
  for (int j = GAE_ITEMS - 1; j >= 0; --j) {
    s = apply(it.f[j], s);
    adv[j] = it.valid[j] ? s.a : 0.0f;
    ret[j] = it.valid[j] ? adv[j] + it.v[j] : 0.0f;
    if (t0 + j < P.cols) bad |= !(isfinite(adv[j]) && isfinite(ret[j]));
  }
  store_items_f32(P.advantages, row * P.ld + t0, P.cols - t0, adv);
  store_items_f32(P.returns, row * P.ld + t0, P.cols - t0, ret);
  // A thread that loaded a bad input names it; outputs that are not finite from finite inputs
  // overflowed. For one row the lower code (NON_FINITE) wins the status word's minimum.
  if (it.bad_input) report(status, row, OP_GAE, PROBLEM_NON_FINITE);
  else if (bad) report(status, row, OP_GAE, PROBLEM_OVERFLOW);
  if constexpr (WARPS > 1) {
    if (left != nullptr) {
      if (threadIdx.x == 0) *left = s;
      __syncthreads();
      s = *left;
      __syncthreads();  // the next chunk overwrites `left` and the warp totals
    }
  }
  return s;
}

}  // namespace

// Sequences of at most 32·GAE_ITEMS positions: one warp each, 8 per block.
extern "C" __global__ void __launch_bounds__(GAE_BLOCK) gae_warp(GaeParams P, unsigned long long* status) {
  const long long row = static_cast<long long>(blockIdx.x) * (GAE_BLOCK / 32) + (threadIdx.x >> 5);
  if (row >= P.rows) return;  // whole warps leave; no block barrier follows
  scan_chunk<1>(P, row, 0, GaeState{0.0f, 0.0f, 1.0f}, nullptr, nullptr, status);
}

// Longer sequences, first of two passes when a sequence spans several chunks: the composed
// map of every chunk but the first, `maps[row·nchunks + chunk]`.
extern "C" __global__ void __launch_bounds__(GAE_BLOCK) gae_chunk_maps(GaeParams P) {
  Affine* __restrict__ maps = P.maps;
  __shared__ Affine totals[GAE_BLOCK / 32];
  const long long row = blockIdx.x / P.nchunks;
  const int chunk = static_cast<int>(blockIdx.x % P.nchunks);
  if (chunk == 0) return;  // whole block: nobody needs the first chunk's map
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  Items it;
  load_items(P, row, static_cast<long long>(chunk) * GAE_CHUNK + static_cast<long long>(threadIdx.x) * GAE_ITEMS, it);
  const Affine incl = warp_suffix_scan(it.total);
  if (lane == 0) totals[warp] = incl;
  __syncthreads();
  if (threadIdx.x == 0) {
    Affine g = totals[GAE_BLOCK / 32 - 1];
    for (int k = GAE_BLOCK / 32 - 2; k >= 0; --k) g = compose(totals[k], g);
    maps[row * P.nchunks + chunk] = g;
  }
}

// Second pass when a sequence spans several chunks: one thread per sequence applies the
// chunk maps right to left from the end state, writing the state entering every chunk,
// `carries[row·nchunks + chunk]` (O(chunks) per sequence, in a fixed order).
extern "C" __global__ void __launch_bounds__(GAE_BLOCK) gae_carries(GaeParams P) {
  const Affine* __restrict__ maps = P.maps;
  GaeState* __restrict__ carries = P.carries;
  const long long row = static_cast<long long>(blockIdx.x) * GAE_BLOCK + threadIdx.x;
  if (row >= P.rows) return;
  const long long at = row * P.nchunks;
  GaeState s{0.0f, 0.0f, 1.0f};
  carries[at + P.nchunks - 1] = s;
  for (int k = P.nchunks - 1; k > 0; --k) {
    s = apply(maps[at + k], s);
    carries[at + k - 1] = s;
  }
}

// Second pass of the long sequences: one block per (sequence, chunk), the block scan entering
// from the right with the state gae_carries wrote.
extern "C" __global__ void __launch_bounds__(GAE_BLOCK) gae_block(GaeParams P, unsigned long long* status) {
  const GaeState* __restrict__ carries = P.carries;
  __shared__ Affine totals[GAE_BLOCK / 32];
  const long long row = blockIdx.x / P.nchunks;
  const int chunk = static_cast<int>(blockIdx.x % P.nchunks);
  scan_chunk<GAE_BLOCK / 32>(P, row, static_cast<long long>(chunk) * GAE_CHUNK, carries[row * P.nchunks + chunk],
                             totals, nullptr, status);
}

// Sequences of a few chunks (src/cuda/advantages/gae.rs chooses by the length alone): one block
// per sequence walks its chunks right to left, each entering with the state the chunk to its
// right left at its start. One pass over the inputs, no workspace.
extern "C" __global__ void __launch_bounds__(GAE_BLOCK) gae_sequence(GaeParams P, unsigned long long* status) {
  __shared__ Affine totals[GAE_BLOCK / 32];
  __shared__ GaeState left;
  const long long row = blockIdx.x;
  GaeState carry{0.0f, 0.0f, 1.0f};
  for (int chunk = P.nchunks - 1; chunk >= 0; --chunk)
    carry = scan_chunk<GAE_BLOCK / 32>(P, row, static_cast<long long>(chunk) * GAE_CHUNK, carry, totals, &left, status);
}

// ---- group estimators -------------------------------------------------------------------
namespace {

__device__ __forceinline__ double warp_sum_f64(double v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// The parameters of `group_advantages` (src/cuda/advantages/groups.rs `GroupParams`: the same
// fields at the same offsets, asserted on both sides).
struct GroupParams {
  const float* scores;      // one per sequence
  const unsigned* offsets;  // groups + 1: where each group's members start in `members`
  const unsigned* members;  // the sequences of every group, group after group
  float* per_sequence;      // each output may be null
  float* tokens;            // [B, T] per-token advantages (row stride `ld`, `cols` columns)
  const unsigned char* mask;  // of `tokens`, may be null
  long long ld;
  int groups, estimator, cols;
  double eps;
};
static_assert(RK_FIELDS(GroupParams, 11) && sizeof(GroupParams) == 80 &&
                  offsetof(GroupParams, scores) == 0 && offsetof(GroupParams, offsets) == 8 &&
                  offsetof(GroupParams, members) == 16 && offsetof(GroupParams, per_sequence) == 24 &&
                  offsetof(GroupParams, tokens) == 32 && offsetof(GroupParams, mask) == 40 &&
                  offsetof(GroupParams, ld) == 48 && offsetof(GroupParams, groups) == 56 &&
                  offsetof(GroupParams, estimator) == 60 && offsetof(GroupParams, cols) == 64 &&
                  offsetof(GroupParams, eps) == 72,
              "GroupParams: every field where src/cuda/advantages/groups.rs `GroupParams` has it");

// Estimator codes (src/advantages/groups.rs `GroupEstimator::code`): GRPO unbiased std, GRPO biased
// std, s − mean (Dr. GRPO and the group-mean baseline), RLOO. Each is A = (s − center)·scale with
// one (center, scale) per group (RLOO: s − (sum − s)/(n − 1) = (s − mean)·n/(n − 1)); a group of
// one: mean 0 and std 1, RLOO 0.
__device__ __forceinline__ void group_affine(int estimator, double eps, unsigned n, double mean, double m2,
                                             double& center, double& scale) {
  const bool single = n == 1;
  const double nd = static_cast<double>(n);
  center = single ? 0.0 : mean;
  switch (estimator) {
    case 0:
    case 1: {
      const double sd = single ? 1.0 : sqrt(m2 / (estimator == 0 ? nd - 1.0 : nd));
      scale = sd + eps > 0.0 ? 1.0 / (sd + eps) : 0.0;  // no spread at ε = 0: every A is 0
      break;
    }
    case 2:
      scale = 1.0;
      break;
    default:
      scale = single ? 0.0 : nd / (nd - 1.0);
  }
}

}  // namespace

// One warp per group: f64 sums over the members (lane-strided, then a butterfly: the same in
// every lane), each member's advantage, written per sequence and/or to every valid token of
// its row. Reports a member with a non-finite score or advantage.
extern "C" __global__ void __launch_bounds__(256)
group_advantages(GroupParams P, unsigned long long* status) {
  const float* __restrict__ scores = P.scores;
  const unsigned* __restrict__ offsets = P.offsets;
  const unsigned* __restrict__ members = P.members;
  float* __restrict__ per_sequence = P.per_sequence;
  float* __restrict__ tokens = P.tokens;
  const unsigned char* __restrict__ mask = P.mask;
  const long long ld = P.ld;
  const int groups = P.groups, estimator = P.estimator, cols = P.cols;
  const double eps = P.eps;
  const long long g = static_cast<long long>(blockIdx.x) * 8 + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (g >= groups) return;  // whole warps
  const unsigned begin = offsets[g], end = offsets[g + 1], n = end - begin;
  if (n == 0) return;
  // Each lane's first member and score stay in registers through the three passes (all of a
  // group of up to 32); later members, if any, are read again in each pass.
  const bool has_first = begin + lane < end;
  const unsigned i0 = has_first ? members[begin + lane] : 0u;
  const float s0 = has_first ? scores[i0] : 0.0f;
  double sum = 0.0;
  if (has_first) sum += static_cast<double>(s0);
  for (unsigned k = begin + lane + 32; k < end; k += 32) sum += static_cast<double>(scores[members[k]]);
  sum = warp_sum_f64(sum);
  const double mean = sum / static_cast<double>(n);
  double m2 = 0.0;
  if (has_first) {
    const double d = static_cast<double>(s0) - mean;
    m2 = fma(d, d, m2);
  }
  for (unsigned k = begin + lane + 32; k < end; k += 32) {
    const double d = static_cast<double>(scores[members[k]]) - mean;
    m2 = fma(d, d, m2);
  }
  m2 = warp_sum_f64(m2);
  double center, scale;
  group_affine(estimator, eps, n, mean, m2, center, scale);
  auto write = [&](unsigned i, float s) {
    const float a = static_cast<float>((static_cast<double>(s) - center) * scale);
    // A member's own non-finite score, or an overflow in a finite group (a member beside a NaN
    // gets a NaN advantage and is not the one reported).
    if (!isfinite(s)) report(status, i, OP_GROUP_ADVANTAGES, PROBLEM_NON_FINITE);
    else if (!isfinite(a) && isfinite(mean)) report(status, i, OP_GROUP_ADVANTAGES, PROBLEM_OVERFLOW);
    if (per_sequence) per_sequence[i] = a;
  };
  if (has_first) write(i0, s0);
#pragma unroll 1
  for (unsigned k = begin + lane + 32; k < end; k += 32) write(members[k], scores[members[k]]);
  if (tokens == nullptr) return;
  for (unsigned k = begin; k < end; ++k) {
    const unsigned i = members[k];
    const float a = static_cast<float>((static_cast<double>(scores[i]) - center) * scale);
    const long long base = static_cast<long long>(i) * ld;
    for (long long t = lane; t < cols; t += 32) tokens[base + t] = token_valid(mask, base + t) ? a : 0.0f;
  }
}

// ---- masked moments and whitening ---------------------------------------------------------
namespace {

// f64 moments of a set of values: count, mean, sum of squared deviations, min, max (the row
// records and the final merge).
struct MomentsF64 {
  double n, mean, m2, lo, hi;
};
static_assert(sizeof(MomentsF64) == 40, "MomentsF64: MOMENT_RECORD_BYTES of src/cuda/advantages/moments.rs");

__device__ __forceinline__ MomentsF64 merge_f64(const MomentsF64& a, const MomentsF64& b) {
  if (b.n == 0.0) return a;
  if (a.n == 0.0) return b;
  const double n = a.n + b.n, d = b.mean - a.mean, wb = b.n / n;
  return {n, fma(d, wb, a.mean), a.m2 + b.m2 + d * d * a.n * wb, fmin(a.lo, b.lo), fmax(a.hi, b.hi)};
}

// Block sum of a double in a fixed order; every thread gets the total. `scratch`: 32 doubles.
__device__ __forceinline__ double block_sum_d(double v, double* scratch) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  if ((threadIdx.x & 31) == 0) scratch[threadIdx.x >> 5] = v;
  __syncthreads();
  double total = (threadIdx.x & 31) < (blockDim.x >> 5) ? scratch[threadIdx.x & 31] : 0.0;
  for (int o = 16; o > 0; o >>= 1) total += __shfl_xor_sync(0xffffffffu, total, o);
  __syncthreads();
  return total;
}

}  // namespace

// One block of 256 threads per row, two passes in f64 (exact counts, no cancellation): the
// count and sum, then the squared deviations from the row mean; min and max. Reports a row
// with a non-finite valid value. Reads values, mask, ld, rows, cols; writes `rows` MomentsF64
// records.
extern "C" __global__ void __launch_bounds__(256) moments_rows(ReductionParams P, unsigned long long* status) {
  const float* __restrict__ values = P.values;
  const unsigned char* __restrict__ mask = P.mask;
  MomentsF64* __restrict__ records = static_cast<MomentsF64*>(P.records);
  const int rows = P.rows, cols = P.cols;
  const long long ld = P.ld;
  __shared__ double dscratch[32];
  __shared__ float fscratch[32];
  const long long row = blockIdx.x;
  if (row >= rows) return;
  const long long base = row * ld;
  double n = 0.0, sum = 0.0;
  float lo = pos_inf(), hi = neg_inf();
  bool bad = false;
  for (long long t = threadIdx.x; t < cols; t += 256) {
    if (!token_valid(mask, base + t)) continue;
    const float x = values[base + t];
    bad |= !isfinite(x);
    n += 1.0;
    sum += static_cast<double>(x);
    lo = fminf(lo, x);
    hi = fmaxf(hi, x);
  }
  n = block_sum_d(n, dscratch);
  sum = block_sum_d(sum, dscratch);
  const double mean = n > 0.0 ? sum / n : 0.0;
  double m2 = 0.0;
  for (long long t = threadIdx.x; t < cols; t += 256) {
    if (!token_valid(mask, base + t)) continue;
    const double d = static_cast<double>(values[base + t]) - mean;
    m2 = fma(d, d, m2);
  }
  m2 = block_sum_d(m2, dscratch);
  for (int o = 16; o > 0; o >>= 1) {
    lo = fminf(lo, __shfl_xor_sync(0xffffffffu, lo, o));
    hi = fmaxf(hi, __shfl_xor_sync(0xffffffffu, hi, o));
  }
  if ((threadIdx.x & 31) == 0) fscratch[threadIdx.x >> 5] = lo;
  bad = __syncthreads_or(bad);
  float row_lo = pos_inf();
  if (threadIdx.x == 0)
    for (int k = 0; k < 8; ++k) row_lo = fminf(row_lo, fscratch[k]);
  __syncthreads();
  if ((threadIdx.x & 31) == 0) fscratch[threadIdx.x >> 5] = hi;
  __syncthreads();
  if (threadIdx.x == 0) {
    float row_hi = neg_inf();
    for (int k = 0; k < 8; ++k) row_hi = fmaxf(row_hi, fscratch[k]);
    records[row] = MomentsF64{n, mean, m2, static_cast<double>(row_lo), static_cast<double>(row_hi)};
    if (bad) report(status, row, OP_MASKED_MOMENTS, PROBLEM_NON_FINITE);
  }
}

// One block of 256 threads: thread k merges rows k, k + 256, … in f64, then a fixed tree.
// out = [count, mean, unbiased variance (0 for count ≤ 1), min, max]. Reads rows, records.
extern "C" __global__ void __launch_bounds__(256) moments_finalize(ReductionParams P) {
  const MomentsF64* __restrict__ records = static_cast<const MomentsF64*>(P.records);
  double* __restrict__ out = P.out;
  const int rows = P.rows;
  __shared__ MomentsF64 sh[256];
  MomentsF64 m{0.0, 0.0, 0.0, static_cast<double>(pos_inf()), static_cast<double>(neg_inf())};
  for (long long r = threadIdx.x; r < rows; r += 256) m = merge_f64(m, records[r]);
  sh[threadIdx.x] = m;
  __syncthreads();
  for (int s = 128; s > 0; s >>= 1) {
    if (threadIdx.x < s) sh[threadIdx.x] = merge_f64(sh[threadIdx.x], sh[threadIdx.x + s]);
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    const MomentsF64 t = sh[0];
    out[0] = t.n;
    out[1] = t.n > 0.0 ? t.mean : 0.0;
    out[2] = t.n > 1.0 ? t.m2 / (t.n - 1.0) : 0.0;
    out[3] = t.lo;
    out[4] = t.hi;
  }
}

// x ← (x − mean)·scale + offset at valid tokens (0 at masked ones), in f64 with the CPU's roundings
// (no fma: build.rs compiles with --fmad=false), then to f32: scale = 1/sqrt(var + ε) (0 if that is
// not finite), offset = mean with keep_mean, else 0. The deviation comes first: x·scale −
// mean·scale cancels catastrophically when the scale is large (and can overflow f32 from a finite
// batch). One block per row. Reads the moments from `out`, eps and keep_mean; writes values.
extern "C" __global__ void __launch_bounds__(256) whiten_apply(ReductionParams P) {
  float* __restrict__ values = P.values;
  const unsigned char* __restrict__ mask = P.mask;
  const double* __restrict__ moments = P.out;
  const int cols = P.cols;
  const long long row = blockIdx.x;
  if (row >= P.rows) return;
  const double mean = moments[1];
  double scale = 1.0 / sqrt(moments[2] + P.eps);
  if (!isfinite(scale)) scale = 0.0;
  const double offset = P.keep_mean ? mean : 0.0;
  const long long base = row * P.ld;
  for (long long t = threadIdx.x; t < cols; t += 256) {
    const double x = static_cast<double>(values[base + t]);
    values[base + t] = token_valid(mask, base + t) ? static_cast<float>((x - mean) * scale + offset) : 0.0f;
  }
}

// DAPO's overlong shaping (src/cuda/advantages/overlong.rs `OverlongParams`, same layout): each score
// plus R_len(L) of its row's valid-token count L, in f64 as `OverlongOptions::reward`, rounded once.
struct OverlongParams {
  const float* scores;
  const unsigned char* mask;  // may be null
  float* shaped;
  long long ld, max_len, buffer_len;
  int rows, cols;
  float penalty;
};
static_assert(RK_FIELDS(OverlongParams, 9) && sizeof(OverlongParams) == 64 && offsetof(OverlongParams, scores) == 0 &&
                  offsetof(OverlongParams, mask) == 8 && offsetof(OverlongParams, shaped) == 16 &&
                  offsetof(OverlongParams, ld) == 24 && offsetof(OverlongParams, max_len) == 32 &&
                  offsetof(OverlongParams, buffer_len) == 40 && offsetof(OverlongParams, rows) == 48 &&
                  offsetof(OverlongParams, cols) == 52 && offsetof(OverlongParams, penalty) == 56,
              "OverlongParams: every field where src/cuda/advantages/overlong.rs `OverlongParams` has it");

// One block of 256 threads per sequence. Reports a non-finite score, else an overflowed result.
extern "C" __global__ void __launch_bounds__(256) overlong_shaping(OverlongParams P, unsigned long long* status) {
  __shared__ float scratch[32];
  const long long row = blockIdx.x;
  if (row >= P.rows) return;
  const long long len = static_cast<long long>(row_valid_count(P.mask, row * P.ld, P.cols, scratch));
  if (threadIdx.x != 0) return;
  const long long start = P.max_len - P.buffer_len;
  const double penalty = static_cast<double>(P.penalty);
  const double reward = len <= start      ? 0.0
                        : len <= P.max_len ? -penalty * static_cast<double>(len - start) / static_cast<double>(P.buffer_len)
                                           : -penalty;
  const float s = P.scores[row], out = __fadd_rn(s, static_cast<float>(reward));
  P.shaped[row] = out;
  if (!isfinite(s)) report(status, row, OP_OVERLONG, PROBLEM_NON_FINITE);
  else if (!isfinite(out)) report(status, row, OP_OVERLONG, PROBLEM_OVERFLOW);
}
