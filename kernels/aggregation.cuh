// Loss aggregation (MATH.md §4) on the device, shared by the families that reduce per-token
// values to a scalar: the per-token weight of each mode and deterministic f64 block sums.
#pragma once

#include <stddef.h>

#include "common.cuh"

namespace rk {

// 1/d correctly rounded in f64, for d a positive integer up to 2^53 (a count or a product of
// counts), as the CPU's `1.0 / d`: an f32 approximation refined by two Newton steps with fused
// multiply-adds. The approximation's error (at most 2^-21) squares at each step, so the last
// step is off by about 2^-84 before it rounds, far closer than 1/d can come to a rounding
// boundary for the counts that occur (emulator/tests/arith.cpp checks every d up to 2^25 and
// random d up to 2^40 against 1.0 / d). No f64 division or __drcp_rn: their slow paths make
// the finalize kernels spill.
__device__ __forceinline__ double rcp_f64(double d) {
  double r = static_cast<double>(__fdividef(1.0f, static_cast<float>(d)));
  double e = fma(-d, r, 1.0);
  r = fma(r, e, r);
  e = fma(-d, r, 1.0);
  return fma(r, e, r);
}

// a/d correctly rounded in f64 (d as for rcp_f64, 0 <= a), as the CPU's `a / d`: the quotient
// through the reciprocal, then one exact residual correction (Markstein).
__device__ __forceinline__ double div_f64(double a, double d) {
  const double r = rcp_f64(d);
  const double q = a * r;
  return fma(fma(-d, q, a), r, q);
}

// Aggregation codes (src/aggregation.rs `Aggregation::code`): token-mean, seq-mean-token-sum,
// seq-mean-token-mean, seq-mean-token-sum-norm. The weight ∂loss/∂L of every valid token of
// a row with `row_valid` valid tokens; 0 for a zero denominator.
__device__ __forceinline__ double token_weight(int aggregation, double max_len, double tokens, double valid_sequences,
                                               double sequences, double row_valid) {
  double d = aggregation == 0   ? tokens
             : aggregation == 1 ? valid_sequences
             : aggregation == 2 ? valid_sequences * row_valid
                                : sequences * max_len;
  return d > 0.0 ? rcp_f64(d) : 0.0;
}

// token_weight in f32, for per-token gradients.
__device__ __forceinline__ float token_weight_f(int aggregation, float max_len, float tokens, float valid_sequences,
                                                float sequences, float row_valid) {
  const float d = aggregation == 0   ? tokens
                  : aggregation == 1 ? valid_sequences
                  : aggregation == 2 ? __fmul_rn(valid_sequences, row_valid)
                                     : __fmul_rn(sequences, max_len);
  return d > 0.0f ? __frcp_rn(d) : 0.0f;
}

// The aggregation a finalize kernel applies, one parameter block built on the host from an
// `Aggregation` and the known denominators (src/cuda/aggregation/launch.rs
// `AggregationParams`: the same fields at the same offsets, asserted on both sides).
struct AggregationParams {
  int aggregation;  // token_weight's code
  int use_global;   // 1: divide by the three counts below, 0: by the batch's own
  double max_len;   // seq-mean-token-sum-norm's constant
  double tokens;
  double valid_sequences;
  double sequences;
};
static_assert(RK_FIELDS(AggregationParams, 6) && sizeof(AggregationParams) == 40 &&
                  offsetof(AggregationParams, aggregation) == 0 && offsetof(AggregationParams, use_global) == 4 &&
                  offsetof(AggregationParams, max_len) == 8 && offsetof(AggregationParams, tokens) == 16 &&
                  offsetof(AggregationParams, valid_sequences) == 24 &&
                  offsetof(AggregationParams, sequences) == 32,
              "AggregationParams: every field where src/cuda/aggregation/launch.rs `AggregationParams` has it");

// The one parameter block of a loss's finalize kernel (policy, value, sampled KL): its row
// records, its statistics and the aggregation (src/cuda/aggregation/launch.rs
// `FinalizeParams`: the same fields at the same offsets, asserted on both sides).
struct FinalizeParams {
  const void* records;  // one record per sequence, written by the loss's rows kernel
  double* stats;        // the loss's statistics words
  int rows;
  float coef;   // the loss's coefficient (entropy, value or KL)
  int chosen;   // the sampled KL's estimator code (unused by the others)
  AggregationParams aggregation;
};
static_assert(RK_FIELDS(FinalizeParams, 6) && sizeof(FinalizeParams) == 72 &&
                  offsetof(FinalizeParams, records) == 0 && offsetof(FinalizeParams, stats) == 8 &&
                  offsetof(FinalizeParams, rows) == 16 && offsetof(FinalizeParams, coef) == 20 &&
                  offsetof(FinalizeParams, chosen) == 24 && offsetof(FinalizeParams, aggregation) == 32,
              "FinalizeParams: every field where src/cuda/aggregation/launch.rs `FinalizeParams` has it");

// A masked [B, T] batch reduced to a few f64 (the aggregation, the moments, whitening, the
// mask count): one parameter block for their kernels (src/cuda/aggregation/launch.rs
// `ReductionParams`: the same fields at the same offsets, asserted on both sides). Each kernel
// says which fields it reads; the others may be anything.
struct ReductionParams {
  float* values;              // f32 per-token values, row stride `ld` (whitening writes them)
  const unsigned char* mask;  // one byte per token in the same layout, 0 = padding; may be null
  void* records;              // the row records (the workspace)
  double* out;                // the f64 result
  long long ld;
  int rows, cols;
  AggregationParams aggregation;  // the aggregation's mode and denominators
  double eps;                     // whitening's ε
  int keep_mean;                  // whitening adds the mean back
};
static_assert(RK_FIELDS(ReductionParams, 10) && sizeof(ReductionParams) == 104 &&
                  offsetof(ReductionParams, values) == 0 && offsetof(ReductionParams, mask) == 8 &&
                  offsetof(ReductionParams, records) == 16 && offsetof(ReductionParams, out) == 24 &&
                  offsetof(ReductionParams, ld) == 32 && offsetof(ReductionParams, rows) == 40 &&
                  offsetof(ReductionParams, cols) == 44 && offsetof(ReductionParams, aggregation) == 48 &&
                  offsetof(ReductionParams, eps) == 88 && offsetof(ReductionParams, keep_mean) == 96,
              "ReductionParams: every field where src/cuda/aggregation/launch.rs `ReductionParams` has it");

__device__ __forceinline__ bool token_valid(const unsigned char* mask, long long t) {
  return mask == nullptr || mask[t] != 0;
}

// Sum over a block of exactly 256 threads in a fixed tree; every thread returns the total.
__device__ __forceinline__ double block_sum_f64(double v, double* sh) {
  sh[threadIdx.x] = v;
  __syncthreads();
  for (int s = 128; s > 0; s >>= 1) {
    if (threadIdx.x < s) sh[threadIdx.x] += sh[threadIdx.x + s];
    __syncthreads();
  }
  const double total = sh[0];
  __syncthreads();
  return total;
}

// The prologue every finalize kernel shares (one block of 256 threads): this batch's own
// valid tokens and valid sequences from its row records (`Row::valid`, f32 per sequence),
// returned in every thread, and the denominators the weights divide by — `p`'s counts or the
// batch's own — parked in the shared `denominators[3]` (rather than kept live in registers).
template <typename Row>
__device__ __forceinline__ double2 finalize_counts(const Row* __restrict__ records, int rows,
                                                   const AggregationParams& p, double* sh, double* denominators) {
  double tokens = 0.0, seqs = 0.0;
  for (long long r = threadIdx.x; r < rows; r += 256) {
    tokens += records[r].valid;
    seqs += records[r].valid > 0.0f ? 1.0 : 0.0;
  }
  const double local_tokens = block_sum_f64(tokens, sh), local_seqs = block_sum_f64(seqs, sh);
  if (threadIdx.x == 0) {
    denominators[0] = p.use_global ? p.tokens : local_tokens;
    denominators[1] = p.use_global ? p.valid_sequences : local_seqs;
    denominators[2] = p.use_global ? p.sequences : static_cast<double>(rows);
  }
  __syncthreads();
  return make_double2(local_tokens, local_seqs);
}

// token_weight of `p` over the finalize prologue's denominators.
__device__ __forceinline__ double weight_of(const AggregationParams& p, const double* d, double row_valid) {
  return token_weight(p.aggregation, p.max_len, d[0], d[1], d[2], row_valid);
}

// Valid tokens of one row, identical in every thread.
__device__ __forceinline__ float row_valid_count(const unsigned char* mask, long long base, int cols, float* scratch) {
  float n = 0.0f;
  for (long long t = threadIdx.x; t < cols; t += blockDim.x) n += token_valid(mask, base + t) ? 1.0f : 0.0f;
  return block_sum(n, scratch);
}

}  // namespace rk
