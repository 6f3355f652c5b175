//! Named GPUs and model shapes for the cost model.

use serde::Serialize;

/// What the cost model needs to know about a GPU.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GpuSpec {
    /// Preset name.
    pub name: &'static str,
    /// Device memory in bytes.
    pub memory_bytes: u64,
    /// Peak dense 16-bit tensor-core rate, FLOP/s.
    pub matmul_flops: f64,
    /// Peak memory bandwidth, bytes/s.
    pub memory_bandwidth: f64,
    /// Host ↔ device copy bandwidth (swap), bytes/s.
    pub host_bandwidth: f64,
}

const GIB: u64 = 1 << 30;

/// The GPU presets: datasheet figures (dense, no sparsity).
pub const GPUS: &[GpuSpec] = &[
    GpuSpec {
        name: "a100-80gb",
        memory_bytes: 80 * GIB,
        matmul_flops: 312e12,
        memory_bandwidth: 2.039e12,
        host_bandwidth: 25e9,
    },
    GpuSpec {
        name: "a100-40gb",
        memory_bytes: 40 * GIB,
        matmul_flops: 312e12,
        memory_bandwidth: 1.555e12,
        host_bandwidth: 25e9,
    },
    GpuSpec {
        name: "h100-80gb",
        memory_bytes: 80 * GIB,
        matmul_flops: 989e12,
        memory_bandwidth: 3.35e12,
        host_bandwidth: 50e9,
    },
    GpuSpec {
        name: "rtx4090-24gb",
        memory_bytes: 24 * GIB,
        matmul_flops: 165e12,
        memory_bandwidth: 1.008e12,
        host_bandwidth: 25e9,
    },
    GpuSpec {
        name: "a10-24gb",
        memory_bytes: 24 * GIB,
        matmul_flops: 125e12,
        memory_bandwidth: 600e9,
        host_bandwidth: 25e9,
    },
];

/// A transformer's shape: enough to count its FLOPs, weight bytes and KV bytes.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelShape {
    /// Preset name.
    pub name: &'static str,
    /// Decoder layers.
    pub num_layers: usize,
    /// Hidden size.
    pub hidden_size: usize,
    /// MLP intermediate size (gated MLP: three matrices of hidden × intermediate).
    pub intermediate_size: usize,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads (fewer than query heads with GQA/MQA).
    pub num_kv_heads: usize,
    /// Dimension of one head.
    pub head_dim: usize,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Context length.
    pub max_model_len: usize,
    /// Bytes per weight and per KV element (2 for f16/bf16).
    pub dtype_bytes: usize,
}

/// The model presets, from the models' published configurations.
pub const MODELS: &[ModelShape] = &[
    ModelShape {
        name: "llama-2-7b",
        num_layers: 32,
        hidden_size: 4096,
        intermediate_size: 11008,
        num_heads: 32,
        num_kv_heads: 32,
        head_dim: 128,
        vocab_size: 32000,
        max_model_len: 4096,
        dtype_bytes: 2,
    },
    ModelShape {
        name: "llama-2-13b",
        num_layers: 40,
        hidden_size: 5120,
        intermediate_size: 13824,
        num_heads: 40,
        num_kv_heads: 40,
        head_dim: 128,
        vocab_size: 32000,
        max_model_len: 4096,
        dtype_bytes: 2,
    },
    ModelShape {
        name: "llama-3-8b",
        num_layers: 32,
        hidden_size: 4096,
        intermediate_size: 14336,
        num_heads: 32,
        num_kv_heads: 8,
        head_dim: 128,
        vocab_size: 128256,
        max_model_len: 8192,
        dtype_bytes: 2,
    },
    ModelShape {
        name: "chatglm3-6b",
        num_layers: 28,
        hidden_size: 4096,
        intermediate_size: 13696,
        num_heads: 32,
        num_kv_heads: 2,
        head_dim: 128,
        vocab_size: 65024,
        max_model_len: 8192,
        dtype_bytes: 2,
    },
];

impl ModelShape {
    /// Weights of one decoder layer (attention projections, gated MLP, two norms).
    pub fn layer_params(&self) -> u64 {
        let q = self.hidden_size * self.num_heads * self.head_dim;
        let kv = 2 * self.hidden_size * self.num_kv_heads * self.head_dim;
        let o = self.num_heads * self.head_dim * self.hidden_size;
        let mlp = 3 * self.hidden_size * self.intermediate_size;
        (q + kv + o + mlp + 2 * self.hidden_size) as u64
    }

    /// All weights: layers, embedding and (untied) output head.
    pub fn num_params(&self) -> u64 {
        self.num_layers as u64 * self.layer_params() + 2 * (self.vocab_size * self.hidden_size) as u64
    }

    /// Bytes of all weights.
    pub fn weight_bytes(&self) -> u64 {
        self.num_params() * self.dtype_bytes as u64
    }

    /// Bytes of K and V for one token over all layers.
    pub fn kv_bytes_per_token(&self) -> u64 {
        (2 * self.num_layers * self.num_kv_heads * self.head_dim * self.dtype_bytes) as u64
    }
}

/// Looks a GPU preset up by name (case-insensitive; `24gb` means `rtx4090-24gb`).
pub fn gpu(name: &str) -> Result<&'static GpuSpec, String> {
    let name = name.to_ascii_lowercase();
    let name = if name == "24gb" { "rtx4090-24gb".to_string() } else { name };
    GPUS.iter().find(|g| g.name == name).ok_or_else(|| {
        let known: Vec<_> = GPUS.iter().map(|g| g.name).collect();
        format!("unknown GPU '{name}' (known: {}, 24gb)", known.join(", "))
    })
}

/// Looks a model preset up by name (case-insensitive).
pub fn model(name: &str) -> Result<&'static ModelShape, String> {
    let name = name.to_ascii_lowercase();
    MODELS.iter().find(|m| m.name == name).ok_or_else(|| {
        let known: Vec<_> = MODELS.iter().map(|m| m.name).collect();
        format!("unknown model '{name}' (known: {})", known.join(", "))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameter_counts_match_the_published_model_sizes() {
        let billions = |name: &str| model(name).expect("preset").num_params() as f64 / 1e9;
        assert!((billions("llama-2-7b") - 6.74).abs() < 0.02, "{}", billions("llama-2-7b"));
        assert!((billions("llama-2-13b") - 13.02).abs() < 0.02, "{}", billions("llama-2-13b"));
        assert!((billions("llama-3-8b") - 8.03).abs() < 0.02, "{}", billions("llama-3-8b"));
        assert!((billions("chatglm3-6b") - 6.24).abs() < 0.03, "{}", billions("chatglm3-6b"));
    }

    #[test]
    fn kv_bytes_per_token_follow_layers_kv_heads_and_head_dim() {
        assert_eq!(model("llama-2-13b").expect("preset").kv_bytes_per_token(), 819_200);
        assert_eq!(model("llama-3-8b").expect("preset").kv_bytes_per_token(), 131_072);
        assert_eq!(model("chatglm3-6b").expect("preset").kv_bytes_per_token(), 28_672);
    }

    #[test]
    fn unknown_names_list_the_presets() {
        let err = gpu("v100").expect_err("no such preset");
        assert!(err.contains("a100-80gb") && err.contains("h100-80gb"), "{err}");
        assert_eq!(gpu("24GB").expect("alias").name, "rtx4090-24gb");
        assert!(model("gpt-5").is_err());
    }
}
