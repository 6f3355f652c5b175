// Kernels that exercise the SIMT harness itself (barriers, early exits, warp shuffles and votes,
// atomics, 16-bit conversions), for kernels/tests/harness.rs. Written as CUDA, run on the CPU.
#include "simt.h"

// Each thread publishes t * t, then reads its neighbour's: right only if the barrier waits.
__global__ void rotate(int* out) {
  __shared__ int s[1024];
  const int t = threadIdx.x;
  const int n = blockDim.x;
  s[t] = t * t;
  __syncthreads();
  out[blockIdx.x * n + t] = s[(t + 1) % n];
  __syncthreads();
  s[t] = -1;  // poison for the next block
}

// The upper half of the block returns at once; the rest still meet at two barriers.
__global__ void early_exit(int* out) {
  __shared__ int s[1024];
  const int t = threadIdx.x;
  const int half = blockDim.x / 2;
  if (t >= half) return;
  s[t] = t + 1;
  __syncthreads();
  int total = 0;
  for (int i = 0; i < half; ++i) total += s[i];
  __syncthreads();
  out[t] = total;
}

// Per lane: xor-sum of lanes, shfl from lane 3, shfl_down 1, shfl_up 2, ballot, any, all.
__global__ void warp_ops(int* out) {
  const int t = threadIdx.x;
  const int lane = t % 32;
  int v = lane;
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  int* o = out + t * 7;
  o[0] = v;
  o[1] = __shfl_sync(0xffffffffu, lane * 10, 3);
  o[2] = __shfl_down_sync(0xffffffffu, lane, 1);
  o[3] = __shfl_up_sync(0xffffffffu, lane, 2);
  o[4] = static_cast<int>(__ballot_sync(0xffffffffu, lane % 3 == 0));
  o[5] = __any_sync(0xffffffffu, lane == 31 && t < 32);
  o[6] = __all_sync(0xffffffffu, lane < 32);
}

// Every thread of every block adds 1 and takes the maximum of its global index.
__global__ void atomics(int* counter, int* maximum) {
  atomicAdd(counter, 1);
  atomicMax(maximum, static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x));
}

extern "C" void pm_harness_rotate(int* out, unsigned blocks, unsigned threads) {
  simt::launch(dim3(blocks), dim3(threads), [&] { rotate(out); });
}
extern "C" void pm_harness_early_exit(int* out, unsigned threads) {
  simt::launch(dim3(1), dim3(threads), [&] { early_exit(out); });
}
extern "C" void pm_harness_warp_ops(int* out, unsigned threads) {
  simt::launch(dim3(1), dim3(threads), [&] { warp_ops(out); });
}
extern "C" void pm_harness_atomics(int* counter, int* maximum, unsigned blocks, unsigned threads) {
  simt::launch(dim3(blocks), dim3(threads), [&] { atomics(counter, maximum); });
}
extern "C" uint16_t pm_harness_float2half(float x) { return __float2half(x).bits; }
extern "C" float pm_harness_half2float(uint16_t x) { return __half2float(__half{x}); }
extern "C" uint16_t pm_harness_float2bfloat16(float x) { return __float2bfloat16(x).bits; }
