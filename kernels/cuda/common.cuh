// Shared by every kernel: element types, conversions, launch constants and reductions.
//
// Under NVCC or NVRTC it uses CUDA's own headers; built as host C++ (the tests) it uses the
// SIMT emulation harness, emu/simt.h.
#pragma once

#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#else
#include "simt.h"
#endif

#define PM_DEVICE __device__ __forceinline__

// Threads of every attention block (four warps).
#define PM_ATTN_THREADS 128
// Tokens of one decode partition (one thread block of paged_attention_decode).
#define PM_PARTITION_SIZE 512
// Query rows of one prefill tile.
#define PM_PREFILL_ROWS 16
// Keys per step of the prefill kernel.
#define PM_PREFILL_KEYS 64
// Widest supported head.
#define PM_MAX_HEAD_DIM 256
// Threads of the row kernels (norms, RoPE, cache writes, copies).
#define PM_ROW_THREADS 256
// Smaller than any score: masked or not-yet-seen keys.
#define PM_NEG_BIG (-1.0e30f)

typedef long long pm_i64;

namespace pm {

PM_DEVICE float to_float(float x) { return x; }
PM_DEVICE float to_float(__half x) { return __half2float(x); }
PM_DEVICE float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <class T>
PM_DEVICE T from_float(float x);
template <>
PM_DEVICE float from_float<float>(float x) {
  return x;
}
template <>
PM_DEVICE __half from_float<__half>(float x) {
  return __float2half(x);
}
template <>
PM_DEVICE __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16(x);
}

PM_DEVICE float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

PM_DEVICE float warp_max(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

// Sum over the whole block (blockDim.x a multiple of 32); every thread gets the result.
// `scratch` holds 32 floats of shared memory, free again when this returns.
PM_DEVICE float block_sum(float v, float* scratch) {
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  const int warps = blockDim.x / 32;
  v = warp_sum(v);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float total = 0.0f;
  for (int w = 0; w < warps; ++w) total += scratch[w];
  __syncthreads();
  return total;
}

// Maximum over the whole block, as block_sum.
PM_DEVICE float block_max(float v, float* scratch) {
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  const int warps = blockDim.x / 32;
  v = warp_max(v);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float best = PM_NEG_BIG;
  for (int w = 0; w < warps; ++w) best = fmaxf(best, scratch[w]);
  __syncthreads();
  return best;
}

}  // namespace pm

// Declares `X(suffix, type)` for every element type.
#define PM_FOR_EACH_DTYPE(X) X(f32, float) X(f16, __half) X(bf16, __nv_bfloat16)
