// Host entry points of the emulated kernels: pm_emu_<kernel>(grid x, y, z, block x, args...)
// runs the kernel of the same name from ../cuda through the SIMT harness (simt.h).
#include "../cuda/attention.cu"
#include "../cuda/cache.cu"
#include "../cuda/layers.cu"

#define PM_EMU(kernel, params, args)                                                             \
  extern "C" void pm_emu_##kernel(unsigned gx, unsigned gy, unsigned gz, unsigned bx, params) { \
    simt::launch(dim3(gx, gy, gz), dim3(bx), [&] { kernel(args); });                            \
  }
#define PM_P(...) __VA_ARGS__

#define PM_EMU_ALL(S, T)                                                                                           \
  PM_EMU(embedding_##S, PM_P(T* out, const T* table, const int* tokens, int d), PM_P(out, table, tokens, d))       \
  PM_EMU(rms_norm_##S, PM_P(T* out, const T* x, const T* w, float eps, int d), PM_P(out, x, w, eps, d))            \
  PM_EMU(fused_add_rms_norm_##S, PM_P(T* out, T* residual, const T* delta, const T* w, float eps, int d),         \
         PM_P(out, residual, delta, w, eps, d))                                                                    \
  PM_EMU(rope_##S,                                                                                                 \
         PM_P(T* q, T* k, const int* positions, const float* inv_freq, int num_heads, int num_kv_heads,           \
              int head_dim),                                                                                       \
         PM_P(q, k, positions, inv_freq, num_heads, num_kv_heads, head_dim))                                       \
  PM_EMU(silu_mul_##S, PM_P(T* out, const T* gate, const T* up, pm_i64 n), PM_P(out, gate, up, n))                 \
  PM_EMU(add_bias_##S, PM_P(T* x, const T* bias, int n, pm_i64 total), PM_P(x, bias, n, total))                    \
  PM_EMU(reshape_and_cache_##S,                                                                                    \
         PM_P(const T* k, const T* v, T* k_cache, T* v_cache, const pm_i64* slots, int num_kv_heads, int head_dim, \
              int block_size),                                                                                     \
         PM_P(k, v, k_cache, v_cache, slots, num_kv_heads, head_dim, block_size))                                  \
  PM_EMU(copy_blocks_##S, PM_P(T* k_cache, T* v_cache, const int* pairs, pm_i64 block_len),                        \
         PM_P(k_cache, v_cache, pairs, block_len))                                                                 \
  PM_EMU(paged_attention_decode_##S,                                                                               \
         PM_P(float* part_out, float* part_sum, float* part_max, const T* q, const int* q_rows, const T* k_cache,  \
              const T* v_cache, const int* block_tables, int max_blocks, const int* context_lens, int num_heads,   \
              int num_kv_heads, int head_dim, int block_size, float scale),                                        \
         PM_P(part_out, part_sum, part_max, q, q_rows, k_cache, v_cache, block_tables, max_blocks, context_lens,   \
              num_heads, num_kv_heads, head_dim, block_size, scale))                                               \
  PM_EMU(paged_attention_reduce_##S,                                                                               \
         PM_P(T* out, const float* part_out, const float* part_sum, const float* part_max, const int* q_rows,      \
              const int* context_lens, int num_heads, int head_dim, int max_partitions),                           \
         PM_P(out, part_out, part_sum, part_max, q_rows, context_lens, num_heads, head_dim, max_partitions))       \
  PM_EMU(paged_attention_prefill_##S,                                                                              \
         PM_P(T* out, const T* q, const T* k_cache, const T* v_cache, const int* block_tables, int max_blocks,     \
              const int* tiles, int num_heads, int num_kv_heads, int head_dim, int block_size, float scale),       \
         PM_P(out, q, k_cache, v_cache, block_tables, max_blocks, tiles, num_heads, num_kv_heads, head_dim,        \
              block_size, scale))

PM_FOR_EACH_DTYPE(PM_EMU_ALL)
