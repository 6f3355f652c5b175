// KV cache kernels: writing new keys and values into their slots, and copying whole blocks
// (copy-on-write).
//
// Layout of one layer's cache (the CPU backend's): K is [blocks][kv_heads][head_dim][block_size]
// (a block's keys transposed), V is [blocks][kv_heads][block_size][head_dim]. Slot s is block
// s / block_size, offset s % block_size.
#include "common.cuh"

namespace pm {

// Writes row `blockIdx.x` of k and v ([rows][kv_heads][head_dim]) into slot slots[row]; a
// negative slot is skipped (padding). Grid (rows), any block size.
template <class T>
PM_DEVICE void reshape_and_cache(const T* k, const T* v, T* k_cache, T* v_cache, const pm_i64* slots,
                                 int num_kv_heads, int head_dim, int block_size) {
  const pm_i64 row = blockIdx.x;
  const pm_i64 slot = slots[row];
  if (slot < 0) return;
  const pm_i64 block = slot / block_size;
  const pm_i64 offset = slot % block_size;
  const int width = num_kv_heads * head_dim;
  for (int i = threadIdx.x; i < width; i += blockDim.x) {
    const int head = i / head_dim;
    const int d = i % head_dim;
    const pm_i64 head_base = (block * num_kv_heads + head) * head_dim * block_size;
    k_cache[head_base + static_cast<pm_i64>(d) * block_size + offset] = k[row * width + i];
    v_cache[head_base + offset * head_dim + d] = v[row * width + i];
  }
}

// Copies block pairs[2p] to block pairs[2p + 1] in both pools of one layer; block_len is the
// elements of one block. Grid (pairs), any block size.
template <class T>
PM_DEVICE void copy_blocks(T* k_cache, T* v_cache, const int* pairs, pm_i64 block_len) {
  const pm_i64 src = pairs[2 * blockIdx.x] * block_len;
  const pm_i64 dst = pairs[2 * blockIdx.x + 1] * block_len;
  for (pm_i64 i = threadIdx.x; i < block_len; i += blockDim.x) {
    k_cache[dst + i] = k_cache[src + i];
    v_cache[dst + i] = v_cache[src + i];
  }
}

}  // namespace pm

#define PM_CACHE_KERNELS(S, T)                                                                              \
  extern "C" __global__ void __launch_bounds__(PM_ROW_THREADS)                                              \
      reshape_and_cache_##S(const T* k, const T* v, T* k_cache, T* v_cache, const pm_i64* slots,            \
                            int num_kv_heads, int head_dim, int block_size) {                               \
    pm::reshape_and_cache<T>(k, v, k_cache, v_cache, slots, num_kv_heads, head_dim, block_size);            \
  }                                                                                                         \
  extern "C" __global__ void __launch_bounds__(PM_ROW_THREADS)                                              \
      copy_blocks_##S(T* k_cache, T* v_cache, const int* pairs, pm_i64 block_len) {                         \
    pm::copy_blocks<T>(k_cache, v_cache, pairs, block_len);                                                 \
  }

PM_FOR_EACH_DTYPE(PM_CACHE_KERNELS)
