// Loss aggregation: a [B, T] batch of masked per-token values reduced to one scalar with any
// of the four modes (MATH.md §4), deterministic (fixed orders, no float atomics). The twin of
// `Aggregation::aggregate`: f32 sums within a sequence, f64 across sequences.
#include "aggregation.cuh"

using namespace rk;

constexpr unsigned OP_AGGREGATE = 15;

// A sequence's record: the sum of its valid values, the sum of the finite ones, its valid
// count, and whether the row kernel reported it (src/cuda/aggregation/launch.rs
// `aggregate_workspace_bytes`: 16 bytes).
struct AggregateRow {
  float sum, finite_sum, valid;
  unsigned reported;
};
static_assert(sizeof(AggregateRow) == 16, "AggregateRow: aggregate_workspace_bytes of src/cuda/aggregation/launch.rs");

// One block of 256 threads per sequence: its record. A NaN at a valid token is
// PROBLEM_NON_FINITE; finite values whose f32 sum overflows are PROBLEM_OVERFLOW (the host sums
// in f64). A null `status` reports nothing (an op aggregating rows it reported itself). Reads
// values, mask, ld, rows, cols; writes `rows` AggregateRow records.
extern "C" __global__ void __launch_bounds__(256) aggregate_rows(ReductionParams P, unsigned long long* status) {
  const float* __restrict__ values = P.values;
  const unsigned char* __restrict__ mask = P.mask;
  AggregateRow* __restrict__ records = static_cast<AggregateRow*>(P.records);
  const int rows = P.rows, cols = P.cols;
  __shared__ float scratch[32];
  const long long row = blockIdx.x;
  if (row >= rows) return;
  const long long base = row * P.ld;
  float sum = 0.0f, finite_sum = 0.0f, valid = 0.0f;
  bool has_nan = false;
  for (long long t = threadIdx.x; t < cols; t += blockDim.x) {
    if (token_valid(mask, base + t)) {
      const float v = values[base + t];
      sum = __fadd_rn(sum, v);
      if (isfinite(v)) finite_sum = __fadd_rn(finite_sum, v);
      has_nan |= isnan(v);
      valid += 1.0f;
    }
  }
  sum = block_sum(sum, scratch);
  finite_sum = block_sum(finite_sum, scratch);
  valid = block_sum(valid, scratch);
  const bool any_nan = __syncthreads_or(has_nan);
  if (threadIdx.x == 0) {
    const unsigned problem = any_nan ? PROBLEM_NON_FINITE : !isfinite(finite_sum) ? PROBLEM_OVERFLOW : 0u;
    if (problem != 0 && status != nullptr) report(status, row, OP_AGGREGATE, problem);
    records[row] = AggregateRow{sum, finite_sum, valid, problem};
  }
}

// One block of 256 threads: out = [Σ_rows weight(row)·sum(row), valid tokens, valid
// sequences, sequences] in f64, thread i taking rows i, i + 256, ... then a fixed tree. Reads
// rows, records, aggregation; writes the four f64 of out.
extern "C" __global__ void __launch_bounds__(256) aggregate_finalize(ReductionParams P, unsigned long long* status) {
  const AggregateRow* __restrict__ records = static_cast<const AggregateRow*>(P.records);
  double* __restrict__ out = P.out;
  const int rows = P.rows;
  const AggregationParams& p = P.aggregation;
  __shared__ double sh[256];
  __shared__ double denominators[3];
  const double2 local = finalize_counts(records, rows, p, sh, denominators);
  double acc = 0.0;
#pragma unroll 1  // one reciprocal at a time: unrolled, the refinement spills
  for (long long r = threadIdx.x; r < rows; r += 256)
    acc += weight_of(p, denominators, records[r].valid) * static_cast<double>(records[r].sum);
  const double total = block_sum_f64(acc, sh);
  if (threadIdx.x == 0) {
    out[0] = total;
    out[1] = local.x;
    out[2] = local.y;
    out[3] = static_cast<double>(rows);
    // With no row reported, a NaN total is +inf meeting -inf, within a row or across rows: the
    // host names the first row holding an infinity.
    if (isnan(total) && status != nullptr) {
      long long first_inf = -1;
      bool any_reported = false;
      for (long long r = 0; r < rows; ++r) {
        any_reported |= records[r].reported != 0;
        if (first_inf < 0 && !isfinite(records[r].sum)) first_inf = r;
      }
      if (!any_reported && first_inf >= 0) report(status, first_inf, OP_AGGREGATE, PROBLEM_NON_FINITE);
    }
  }
}

// ---- the mask count ------------------------------------------------------------------------
// The batch's own denominators, counted from the mask before an op's one pass when its
// gradients need them (a local normaliser with a mask): the valid tokens of every row, then
// counts = [valid tokens, valid sequences, sequences] (f64) as the ops' finalize kernels count
// them (the same f32 row counts, summed in the same order). Both read mask, ld, rows, cols;
// the records are the rows' f32 valid counts, `out` the three counts.

// One block of 256 threads per row.
extern "C" __global__ void __launch_bounds__(256) mask_counts_rows(ReductionParams P) {
  float* __restrict__ row_valid = static_cast<float*>(P.records);
  __shared__ float scratch[32];
  const long long row = blockIdx.x;
  if (row >= P.rows) return;
  const float valid = row_valid_count(P.mask, row * P.ld, P.cols, scratch);
  if (threadIdx.x == 0) row_valid[row] = valid;
}

// One block of 256 threads: thread i takes rows i, i + 256, ..., then a fixed tree.
extern "C" __global__ void __launch_bounds__(256) mask_counts_finalize(ReductionParams P) {
  const float* __restrict__ row_valid = static_cast<const float*>(P.records);
  double* __restrict__ counts = P.out;
  const int rows = P.rows;
  __shared__ double sh[256];
  double tokens = 0.0, seqs = 0.0;
  for (long long r = threadIdx.x; r < rows; r += 256) {
    tokens += row_valid[r];
    seqs += row_valid[r] > 0.0f ? 1.0 : 0.0;
  }
  const double t = block_sum_f64(tokens, sh), s = block_sum_f64(seqs, sh);
  if (threadIdx.x == 0) {
    counts[0] = t;
    counts[1] = s;
    counts[2] = static_cast<double>(rows);
  }
}
