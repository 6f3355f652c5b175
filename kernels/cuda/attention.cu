// Attention over the paged KV cache (layout in cache.cu), GQA: query head h reads KV head
// h / (num_heads / num_kv_heads). Scores, softmax and sums are in f32 whatever the element type.
//
// Decode (one query row per sequence) follows vLLM's paged attention v2: the context is cut
// into partitions of PM_PARTITION_SIZE tokens, one thread block per (head, sequence,
// partition) writes that partition's normalized output, maximum score and sum of exponentials,
// and paged_attention_reduce combines the partitions.
//
// Prefill and chunked prefill: one thread block per (tile of up to PM_PREFILL_ROWS consecutive
// query rows of one sequence, head), walking the causal context in steps of PM_PREFILL_KEYS
// keys with an online softmax. Rows may start anywhere in the sequence (chunked prefill, a
// prefix-cache hit): the keys before them are read from the cache.
#include "common.cuh"

// Scores at or below this are masked.
#define PM_MASKED (0.5f * PM_NEG_BIG)

namespace pm {

// Grid (num_heads, num_seqs, max_partitions), block PM_ATTN_THREADS. Sequence s's query is row
// q_rows[s] of q ([rows][num_heads][head_dim]); its context is context_lens[s] tokens, read
// through block_tables[s] (max_blocks entries a row). part_out is
// [num_seqs][num_heads][max_partitions][head_dim]; part_sum and part_max
// [num_seqs][num_heads][max_partitions].
template <class T>
PM_DEVICE void paged_attention_decode(float* part_out, float* part_sum, float* part_max, const T* q,
                                      const int* q_rows, const T* k_cache, const T* v_cache,
                                      const int* block_tables, int max_blocks, const int* context_lens,
                                      int num_heads, int num_kv_heads, int head_dim, int block_size,
                                      float scale) {
  constexpr int NT = PM_ATTN_THREADS;
  __shared__ float qs[PM_MAX_HEAD_DIM];
  __shared__ float logits[PM_PARTITION_SIZE];
  __shared__ float partial[NT];
  __shared__ float scratch[32];
  const int head = blockIdx.x;
  const int seq = blockIdx.y;
  const int part = blockIdx.z;
  const int parts = gridDim.z;
  const int context = context_lens[seq];
  const int start = part * PM_PARTITION_SIZE;
  if (start >= context) return;
  const int n = min(PM_PARTITION_SIZE, context - start);
  const int kv_head = head / (num_heads / num_kv_heads);
  const pm_i64 row = q_rows[seq];
  const int* table = block_tables + static_cast<pm_i64>(seq) * max_blocks;
  const int tid = threadIdx.x;
  const pm_i64 head_len = static_cast<pm_i64>(head_dim) * block_size;

  for (int d = tid; d < head_dim; d += NT) qs[d] = to_float(q[(row * num_heads + head) * head_dim + d]) * scale;
  __syncthreads();

  // One key per thread: the dot over head_dim reads the block's transposed keys.
  float m = PM_NEG_BIG;
  for (int t = tid; t < n; t += NT) {
    const int pos = start + t;
    const pm_i64 block = table[pos / block_size];
    const T* k = k_cache + (block * num_kv_heads + kv_head) * head_len + pos % block_size;
    float dot = 0.0f;
    for (int d = 0; d < head_dim; ++d) dot += qs[d] * to_float(k[static_cast<pm_i64>(d) * block_size]);
    logits[t] = dot;
    m = fmaxf(m, dot);
  }
  m = block_max(m, scratch);
  float sum = 0.0f;
  for (int t = tid; t < n; t += NT) {
    const float e = expf(logits[t] - m);
    logits[t] = e;
    sum += e;
  }
  sum = block_sum(sum, scratch);

  // Weighted values: a thread owns dimension lane_d (and lane_d + NT for wide heads) of one
  // group of keys; narrow heads split the keys over NT / head_dim groups.
  const bool wide = head_dim >= NT;
  const int groups = wide ? 1 : NT / head_dim;
  const int group = wide ? 0 : tid / head_dim;
  const int lane_d = wide ? tid : tid % head_dim;
  float acc0 = 0.0f;
  float acc1 = 0.0f;
  if (group < groups) {
    for (int t = group; t < n; t += groups) {
      const int pos = start + t;
      const pm_i64 block = table[pos / block_size];
      const T* v = v_cache + ((block * num_kv_heads + kv_head) * block_size + pos % block_size) * head_dim;
      const float p = logits[t];
      acc0 += p * to_float(v[lane_d]);
      if (lane_d + NT < head_dim) acc1 += p * to_float(v[lane_d + NT]);
    }
  }
  const float inv = 1.0f / sum;
  const pm_i64 slot = (static_cast<pm_i64>(seq) * num_heads + head) * parts + part;
  float* out = part_out + slot * head_dim;
  if (groups > 1) {
    partial[tid] = acc0;
    __syncthreads();
    if (tid < head_dim) {
      float total = 0.0f;
      for (int g = 0; g < groups; ++g) total += partial[g * head_dim + tid];
      out[tid] = total * inv;
    }
  } else if (group < groups) {
    out[lane_d] = acc0 * inv;
    if (lane_d + NT < head_dim) out[lane_d + NT] = acc1 * inv;
  }
  if (tid == 0) {
    part_sum[slot] = sum;
    part_max[slot] = m;
  }
}

// Combines the partitions of paged_attention_decode into out ([rows][num_heads][head_dim],
// row q_rows[s]). Grid (num_heads, num_seqs), any block size; max_partitions as in the decode
// launch.
template <class T>
PM_DEVICE void paged_attention_reduce(T* out, const float* part_out, const float* part_sum,
                                      const float* part_max, const int* q_rows, const int* context_lens,
                                      int num_heads, int head_dim, int max_partitions) {
  const int head = blockIdx.x;
  const int seq = blockIdx.y;
  const int used = (context_lens[seq] + PM_PARTITION_SIZE - 1) / PM_PARTITION_SIZE;
  const pm_i64 base = (static_cast<pm_i64>(seq) * num_heads + head) * max_partitions;
  float m = PM_NEG_BIG;
  for (int p = 0; p < used; ++p) m = fmaxf(m, part_max[base + p]);
  float total = 0.0f;
  for (int p = 0; p < used; ++p) total += part_sum[base + p] * expf(part_max[base + p] - m);
  const float inv = 1.0f / total;
  const pm_i64 row = q_rows[seq];
  for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
    float acc = 0.0f;
    for (int p = 0; p < used; ++p) {
      acc += part_sum[base + p] * expf(part_max[base + p] - m) * part_out[(base + p) * head_dim + d];
    }
    out[(row * num_heads + head) * head_dim + d] = from_float<T>(acc * inv);
  }
}

// Grid (num_tiles, num_heads), block PM_ATTN_THREADS. tiles[4 t ..] = (sequence, first row,
// rows, position of the first row): rows first_row .. first_row + rows of q and out
// ([rows][num_heads][head_dim]) are consecutive positions of that sequence, and row r attends
// to positions 0 ..= first_pos + r, read through block_tables[sequence].
template <class T>
PM_DEVICE void paged_attention_prefill(T* out, const T* q, const T* k_cache, const T* v_cache,
                                       const int* block_tables, int max_blocks, const int* tiles, int num_heads,
                                       int num_kv_heads, int head_dim, int block_size, float scale) {
  constexpr int NT = PM_ATTN_THREADS;
  constexpr int R = PM_PREFILL_ROWS;
  constexpr int K = PM_PREFILL_KEYS;
  constexpr int ACC = R * PM_MAX_HEAD_DIM / NT;  // (row, dim) pairs a thread owns, at most
  constexpr int DOTS = R * K / NT;               // scores a thread computes per step
  constexpr int ROW_STEP = NT / K;
  static_assert(K == 64, "the softmax step reads two keys per lane");
  __shared__ float qs[R * PM_MAX_HEAD_DIM];
  __shared__ float probs[R * K];
  __shared__ float row_max[R];
  __shared__ float row_sum[R];
  __shared__ float row_scale[R];
  const int* tile = tiles + 4 * static_cast<pm_i64>(blockIdx.x);
  const int seq = tile[0];
  const pm_i64 first_row = tile[1];
  const int rows = tile[2];
  const int first_pos = tile[3];
  const int head = blockIdx.y;
  const int kv_head = head / (num_heads / num_kv_heads);
  const int* table = block_tables + static_cast<pm_i64>(seq) * max_blocks;
  const int tid = threadIdx.x;
  const int pairs = R * head_dim;
  const pm_i64 head_len = static_cast<pm_i64>(head_dim) * block_size;

  for (int i = tid; i < pairs; i += NT) {
    const int r = i / head_dim;
    const int d = i % head_dim;
    qs[i] = r < rows ? to_float(q[((first_row + r) * num_heads + head) * head_dim + d]) * scale : 0.0f;
  }
  if (tid < R) {
    row_max[tid] = PM_NEG_BIG;
    row_sum[tid] = 0.0f;
  }
  float acc[ACC];
#pragma unroll
  for (int a = 0; a < ACC; ++a) acc[a] = 0.0f;
  __syncthreads();

  const int context = first_pos + rows;
  const int key = tid % K;
  const int row0 = tid / K;
  const int warp = tid / 32;
  const int lane = tid % 32;
  for (int kstart = 0; kstart < context; kstart += K) {
    // Scores: a thread reads one key and dots it with DOTS query rows.
    const int kp = kstart + key;
    float dots[DOTS];
#pragma unroll
    for (int j = 0; j < DOTS; ++j) dots[j] = 0.0f;
    if (kp < context) {
      const pm_i64 block = table[kp / block_size];
      const T* k = k_cache + (block * num_kv_heads + kv_head) * head_len + kp % block_size;
      for (int d = 0; d < head_dim; ++d) {
        const float kd = to_float(k[static_cast<pm_i64>(d) * block_size]);
#pragma unroll
        for (int j = 0; j < DOTS; ++j) dots[j] += qs[(row0 + j * ROW_STEP) * head_dim + d] * kd;
      }
    }
#pragma unroll
    for (int j = 0; j < DOTS; ++j) {
      const int r = row0 + j * ROW_STEP;
      const bool live = kp < context && r < rows && kp <= first_pos + r;
      probs[r * K + key] = live ? dots[j] : PM_NEG_BIG;
    }
    __syncthreads();

    // Online softmax, a warp per row.
    for (int r = warp; r < R; r += NT / 32) {
      const float s0 = probs[r * K + lane];
      const float s1 = probs[r * K + lane + 32];
      const float old = row_max[r];
      const float m = fmaxf(old, warp_max(fmaxf(s0, s1)));
      const float p0 = s0 > PM_MASKED ? expf(s0 - m) : 0.0f;
      const float p1 = s1 > PM_MASKED ? expf(s1 - m) : 0.0f;
      const float step_sum = warp_sum(p0 + p1);
      probs[r * K + lane] = p0;
      probs[r * K + lane + 32] = p1;
      if (lane == 0) {
        const float rescale = expf(old - m);
        row_scale[r] = rescale;
        row_sum[r] = row_sum[r] * rescale + step_sum;
        row_max[r] = m;
      }
    }
    __syncthreads();

    // Weighted values: a thread owns (row, dim) pairs tid, tid + NT, ...
#pragma unroll
    for (int a = 0; a < ACC; ++a) {
      const int pair = tid + a * NT;
      if (pair < pairs) acc[a] *= row_scale[pair / head_dim];
    }
    const int keys = min(K, context - kstart);
    for (int t = 0; t < keys; ++t) {
      const int pos = kstart + t;
      const pm_i64 block = table[pos / block_size];
      const T* v = v_cache + ((block * num_kv_heads + kv_head) * block_size + pos % block_size) * head_dim;
#pragma unroll
      for (int a = 0; a < ACC; ++a) {
        const int pair = tid + a * NT;
        if (pair < pairs) acc[a] += probs[(pair / head_dim) * K + t] * to_float(v[pair % head_dim]);
      }
    }
    __syncthreads();
  }

#pragma unroll
  for (int a = 0; a < ACC; ++a) {
    const int pair = tid + a * NT;
    const int r = pair / head_dim;
    if (pair < pairs && r < rows) {
      out[((first_row + r) * num_heads + head) * head_dim + pair % head_dim] = from_float<T>(acc[a] / row_sum[r]);
    }
  }
}

}  // namespace pm

#define PM_ATTENTION_KERNELS(S, T)                                                                          \
  extern "C" __global__ void __launch_bounds__(PM_ATTN_THREADS) paged_attention_decode_##S(                \
      float* part_out, float* part_sum, float* part_max, const T* q, const int* q_rows, const T* k_cache,   \
      const T* v_cache, const int* block_tables, int max_blocks, const int* context_lens, int num_heads,    \
      int num_kv_heads, int head_dim, int block_size, float scale) {                                        \
    pm::paged_attention_decode<T>(part_out, part_sum, part_max, q, q_rows, k_cache, v_cache, block_tables, \
                                  max_blocks, context_lens, num_heads, num_kv_heads, head_dim, block_size,  \
                                  scale);                                                                   \
  }                                                                                                         \
  extern "C" __global__ void __launch_bounds__(PM_ATTN_THREADS) paged_attention_reduce_##S(                \
      T* out, const float* part_out, const float* part_sum, const float* part_max, const int* q_rows,       \
      const int* context_lens, int num_heads, int head_dim, int max_partitions) {                           \
    pm::paged_attention_reduce<T>(out, part_out, part_sum, part_max, q_rows, context_lens, num_heads,       \
                                  head_dim, max_partitions);                                                \
  }                                                                                                         \
  extern "C" __global__ void __launch_bounds__(PM_ATTN_THREADS) paged_attention_prefill_##S(               \
      T* out, const T* q, const T* k_cache, const T* v_cache, const int* block_tables, int max_blocks,      \
      const int* tiles, int num_heads, int num_kv_heads, int head_dim, int block_size, float scale) {       \
    pm::paged_attention_prefill<T>(out, q, k_cache, v_cache, block_tables, max_blocks, tiles, num_heads,   \
                                   num_kv_heads, head_dim, block_size, scale);                              \
  }

PM_FOR_EACH_DTYPE(PM_ATTENTION_KERNELS)
