// Per-row kernels of the Llama block: embedding gather, RMSNorm (plain and with a fused
// residual add), rotate-half RoPE, SiLU·mul, and the bias add of projections with biases.
#include "common.cuh"

namespace pm {

// out[row] = table[tokens[row]]; grid (rows), any block size.
template <class T>
PM_DEVICE void embedding(T* out, const T* table, const int* tokens, int d) {
  const pm_i64 row = blockIdx.x;
  const pm_i64 token = tokens[row];
  for (int i = threadIdx.x; i < d; i += blockDim.x) out[row * d + i] = table[token * d + i];
}

// out = x / sqrt(mean(x²) + eps) · w, one row per block; grid (rows), block a multiple of 32.
template <class T>
PM_DEVICE void rms_norm(T* out, const T* x, const T* w, float eps, int d) {
  __shared__ float scratch[32];
  const pm_i64 base = static_cast<pm_i64>(blockIdx.x) * d;
  float ss = 0.0f;
  for (int i = threadIdx.x; i < d; i += blockDim.x) {
    const float v = to_float(x[base + i]);
    ss += v * v;
  }
  ss = block_sum(ss, scratch);
  const float inv = rsqrtf(ss / static_cast<float>(d) + eps);
  for (int i = threadIdx.x; i < d; i += blockDim.x) {
    out[base + i] = from_float<T>(to_float(w[i]) * (to_float(x[base + i]) * inv));
  }
}

// residual += delta, then out = rms_norm(residual) · w; grid (rows), block a multiple of 32.
template <class T>
PM_DEVICE void fused_add_rms_norm(T* out, T* residual, const T* delta, const T* w, float eps, int d) {
  __shared__ float scratch[32];
  const pm_i64 base = static_cast<pm_i64>(blockIdx.x) * d;
  float ss = 0.0f;
  for (int i = threadIdx.x; i < d; i += blockDim.x) {
    const T sum = from_float<T>(to_float(residual[base + i]) + to_float(delta[base + i]));
    residual[base + i] = sum;
    const float v = to_float(sum);
    ss += v * v;
  }
  ss = block_sum(ss, scratch);
  const float inv = rsqrtf(ss / static_cast<float>(d) + eps);
  for (int i = threadIdx.x; i < d; i += blockDim.x) {
    out[base + i] = from_float<T>(to_float(w[i]) * (to_float(residual[base + i]) * inv));
  }
}

// Rotate-half RoPE of one row's query and key heads at positions[row], in place.
// inv_freq holds head_dim / 2 inverse frequencies (any scaling, llama3 included, is already in
// them). Grid (rows), any block size.
template <class T>
PM_DEVICE void rope(T* q, T* k, const int* positions, const float* inv_freq, int num_heads, int num_kv_heads,
                    int head_dim) {
  const pm_i64 row = blockIdx.x;
  const float pos = static_cast<float>(positions[row]);
  const int half = head_dim / 2;
  const int pairs = (num_heads + num_kv_heads) * half;
  for (int p = threadIdx.x; p < pairs; p += blockDim.x) {
    const int head = p / half;
    const int i = p % half;
    T* x = head < num_heads ? q + (row * num_heads + head) * head_dim
                            : k + (row * num_kv_heads + (head - num_heads)) * head_dim;
    const float angle = pos * inv_freq[i];
    const float c = cosf(angle);
    const float s = sinf(angle);
    const float x0 = to_float(x[i]);
    const float x1 = to_float(x[i + half]);
    x[i] = from_float<T>(x0 * c - x1 * s);
    x[i + half] = from_float<T>(x1 * c + x0 * s);
  }
}

// out[i] = silu(gate[i]) · up[i]; out may be gate. Grid (ceil(n / blockDim)).
template <class T>
PM_DEVICE void silu_mul(T* out, const T* gate, const T* up, pm_i64 n) {
  const pm_i64 i = static_cast<pm_i64>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const float g = to_float(gate[i]);
  out[i] = from_float<T>((g / (1.0f + expf(-g))) * to_float(up[i]));
}

// x[i] += bias[i % n] over `total` elements (rows of n); grid (ceil(total / blockDim)).
template <class T>
PM_DEVICE void add_bias(T* x, const T* bias, int n, pm_i64 total) {
  const pm_i64 i = static_cast<pm_i64>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= total) return;
  x[i] = from_float<T>(to_float(x[i]) + to_float(bias[i % n]));
}

}  // namespace pm

#define PM_LAYER_KERNELS(S, T)                                                                              \
  extern "C" __global__ void __launch_bounds__(PM_ROW_THREADS)                                              \
      embedding_##S(T* out, const T* table, const int* tokens, int d) {                                     \
    pm::embedding<T>(out, table, tokens, d);                                                                \
  }                                                                                                         \
  extern "C" __global__ void __launch_bounds__(PM_ROW_THREADS)                                              \
      rms_norm_##S(T* out, const T* x, const T* w, float eps, int d) {                                      \
    pm::rms_norm<T>(out, x, w, eps, d);                                                                     \
  }                                                                                                         \
  extern "C" __global__ void __launch_bounds__(PM_ROW_THREADS)                                              \
      fused_add_rms_norm_##S(T* out, T* residual, const T* delta, const T* w, float eps, int d) {           \
    pm::fused_add_rms_norm<T>(out, residual, delta, w, eps, d);                                             \
  }                                                                                                         \
  extern "C" __global__ void __launch_bounds__(PM_ROW_THREADS)                                              \
      rope_##S(T* q, T* k, const int* positions, const float* inv_freq, int num_heads, int num_kv_heads,    \
               int head_dim) {                                                                              \
    pm::rope<T>(q, k, positions, inv_freq, num_heads, num_kv_heads, head_dim);                              \
  }                                                                                                         \
  extern "C" __global__ void __launch_bounds__(PM_ROW_THREADS) silu_mul_##S(T* out, const T* gate,          \
                                                                            const T* up, pm_i64 n) {        \
    pm::silu_mul<T>(out, gate, up, n);                                                                      \
  }                                                                                                         \
  extern "C" __global__ void __launch_bounds__(PM_ROW_THREADS) add_bias_##S(T* x, const T* bias, int n,     \
                                                                            pm_i64 total) {                 \
    pm::add_bias<T>(x, bias, n, total);                                                                     \
  }

PM_FOR_EACH_DTYPE(PM_LAYER_KERNELS)
