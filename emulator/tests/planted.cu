// Kernels with planted bugs, one per checker, and clean twins: emulator/tests/checkers.cpp
// launches each through the emulated driver and asserts what the checkers report. Built only
// by `scripts/emulator.sh selftest`, never into the crate.
#include <stdint.h>

#include "common.cuh"

// ---- memcheck ------------------------------------------------------------------------------
// Off by one: `<=` reads and writes element n of n-element buffers.
extern "C" __global__ void __launch_bounds__(256) planted_off_by_one(const float* in, float* out, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i <= n) out[i] = 2.0f * in[i];
}

// The clean twin.
extern "C" __global__ void __launch_bounds__(256) planted_scale(const float* in, float* out, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) out[i] = 2.0f * in[i];
}

// A 16-byte vector load from an address that is only 4-byte aligned.
extern "C" __global__ void __launch_bounds__(32) planted_misaligned(const float* in, float* out) {
  const float4 v = reinterpret_cast<const float4*>(in + 1)[threadIdx.x];
  out[threadIdx.x] = v.x + v.y + v.z + v.w;
}

// Indexing a local array out of its bounds.
extern "C" __global__ void __launch_bounds__(32) planted_local_overflow(float* out, int k) {
  float local[4] = {1.0f, 2.0f, 3.0f, 4.0f};
  out[threadIdx.x] = local[k + static_cast<int>(threadIdx.x % 2)];
}

// ---- racecheck -----------------------------------------------------------------------------------
// A block sum that forgets the __syncthreads between writing the partial sums and reading them.
extern "C" __global__ void __launch_bounds__(256) planted_missing_barrier(const float* in, float* out) {
  __shared__ float partial[256];
  partial[threadIdx.x] = in[blockIdx.x * blockDim.x + threadIdx.x];
  // missing: __syncthreads();
  if (threadIdx.x == 0) {
    float s = 0.0f;
    for (int k = 0; k < 256; ++k) s += partial[k];
    out[blockIdx.x] = s;
  }
}

// The clean twin.
extern "C" __global__ void __launch_bounds__(256) planted_block_sum(const float* in, float* out) {
  __shared__ float partial[256];
  partial[threadIdx.x] = in[blockIdx.x * blockDim.x + threadIdx.x];
  __syncthreads();
  if (threadIdx.x == 0) {
    float s = 0.0f;
    for (int k = 0; k < 256; ++k) s += partial[k];
    out[blockIdx.x] = s;
  }
}

// Shared memory read before any thread of the block wrote it (left over from another block).
extern "C" __global__ void __launch_bounds__(64) planted_stale_shared(float* out) {
  __shared__ float scratch[64];
  if (blockIdx.x == 0) scratch[threadIdx.x] = 1.0f;
  __syncthreads();
  out[blockIdx.x * 64 + threadIdx.x] = scratch[threadIdx.x];
}

// ---- synccheck ---------------------------------------------------------------------------------
// A butterfly whose mask leaves out lane 31, which lane 30 then reads.
extern "C" __global__ void __launch_bounds__(32) planted_shuffle_mask(const float* in, float* out) {
  float v = in[threadIdx.x];
  if (threadIdx.x < 31) v += __shfl_xor_sync(0x7fffffffu, v, 1);
  out[threadIdx.x] = v;
}

// A full-mask shuffle after lane 5 has returned.
extern "C" __global__ void __launch_bounds__(32) planted_shuffle_exited(const float* in, float* out) {
  float v = in[threadIdx.x];
  if (threadIdx.x == 5) return;
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  out[threadIdx.x] = v;
}

// The clean twin: the block-wide online-softmax merge of common.cuh.
extern "C" __global__ void __launch_bounds__(256) planted_warp_sum(const float* in, float* out) {
  __shared__ float scratch[32];
  const float v = in[blockIdx.x * blockDim.x + threadIdx.x];
  const float s = rk::block_sum(v, scratch);
  if (threadIdx.x == 0) out[blockIdx.x] = s;
}

// A barrier inside a branch that half of the block skips (and then leaves).
extern "C" __global__ void __launch_bounds__(64) planted_divergent_barrier(float* out) {
  if (threadIdx.x < 32) {
    __syncthreads();
    out[threadIdx.x] = 1.0f;
  }
}

// Threads that wait at a barrier for a warp that waits at a shuffle for them: a deadlock.
extern "C" __global__ void __launch_bounds__(64) planted_deadlock(float* out) {
  float v = static_cast<float>(threadIdx.x);
  if (threadIdx.x == 40) {
    __syncthreads();
  } else if (threadIdx.x >= 32) {
    v = __shfl_xor_sync(0xffffffffu, v, 1);
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = v;
}

// ---- initcheck ---------------------------------------------------------------------------------
// Reads a buffer that nothing wrote (the host allocated it without a copy or a memset).
extern "C" __global__ void __launch_bounds__(32) planted_uninitialised(const float* never_written, float* out) {
  out[threadIdx.x] = never_written[threadIdx.x] + 1.0f;
}

// ---- undefined behaviour -------------------------------------------------------------------------
// An int index that overflows for large rows (the bug `long long` index arithmetic prevents).
extern "C" __global__ void __launch_bounds__(32) planted_int_overflow(float* out, int row, int ld) {
  const int i = row * ld;  // row · ld > 2^31 - 1
  out[threadIdx.x] = static_cast<float>(i & 1);
}

// ---- atomics and traffic ------------------------------------------------------------------------
// Every thread reports its index with atomicMin; the lowest survives whatever the order.
extern "C" __global__ void __launch_bounds__(256) planted_atomic_min(unsigned long long* word) {
  atomicMin(word, static_cast<unsigned long long>(1000 + (blockIdx.x * blockDim.x + threadIdx.x) % 777));
}

// Coalesced (stride 1) and strided (stride 8) copies of 4-byte elements, for the sector counts.
extern "C" __global__ void __launch_bounds__(256) planted_copy(const float* in, float* out, int n, int stride) {
  const long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) out[i] = in[(i * stride) % n];
}
