//! The model's `config.json`: architecture, shapes and RoPE settings of the Llama family.

use std::path::Path;

use serde::Deserialize;

use crate::error::{ExecutorError, Result};

/// Architectures this executor runs.
pub const SUPPORTED_ARCHITECTURES: &[&str] = &["LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"];

/// RoPE frequency scaling.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE.
    None,
    /// Positions divided by `factor`.
    Linear {
        /// The divisor.
        factor: f64,
    },
    /// Llama 3.1's wavelength-dependent scaling.
    Llama3 {
        /// Scale of low frequencies.
        factor: f64,
        /// Wavelength boundary factor for low frequencies.
        low_freq_factor: f64,
        /// Wavelength boundary factor for high frequencies.
        high_freq_factor: f64,
        /// Context length the model was trained with before scaling.
        original_max_position_embeddings: f64,
    },
}

/// The parsed and checked model configuration.
#[derive(Debug, Clone)]
pub struct ModelConfig {
    /// The architecture named in `architectures`.
    pub architecture: String,
    /// Model width.
    pub hidden_size: usize,
    /// MLP width.
    pub intermediate_size: usize,
    /// Transformer layers.
    pub num_layers: usize,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads (GQA when fewer than `num_heads`).
    pub num_kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Longest context the model was trained for.
    pub max_position_embeddings: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f32,
    /// RoPE base.
    pub rope_theta: f64,
    /// RoPE scaling.
    pub rope_scaling: RopeScaling,
    /// Whether the output projection is the embedding matrix.
    pub tie_word_embeddings: bool,
    /// Whether q/k/v projections have biases (Qwen2, or `attention_bias`).
    pub qkv_bias: bool,
    /// Sliding attention window, when the model has one (Mistral); contexts are capped to it.
    pub sliding_window: Option<usize>,
    /// `torch_dtype` as written.
    pub torch_dtype: Option<String>,
    /// BOS id.
    pub bos_token_id: Option<u32>,
    /// EOS ids from config.json.
    pub eos_token_ids: Vec<u32>,
}

#[derive(Deserialize)]
struct RawRopeScaling {
    #[serde(alias = "type")]
    rope_type: Option<String>,
    factor: Option<f64>,
    low_freq_factor: Option<f64>,
    high_freq_factor: Option<f64>,
    original_max_position_embeddings: Option<f64>,
}

#[derive(Deserialize)]
struct RawConfig {
    architectures: Option<Vec<String>>,
    model_type: Option<String>,
    hidden_size: Option<usize>,
    intermediate_size: Option<usize>,
    num_hidden_layers: Option<usize>,
    num_attention_heads: Option<usize>,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    vocab_size: Option<usize>,
    max_position_embeddings: Option<usize>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_scaling: Option<RawRopeScaling>,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
    hidden_act: Option<String>,
    sliding_window: Option<serde_json::Value>,
    use_sliding_window: Option<bool>,
    torch_dtype: Option<String>,
    bos_token_id: Option<serde_json::Value>,
    eos_token_id: Option<serde_json::Value>,
}

/// Reads a token id field that may be one id, a list of ids, or null.
pub fn token_ids(value: Option<&serde_json::Value>) -> Vec<u32> {
    match value {
        Some(serde_json::Value::Number(n)) => n.as_u64().map(|v| vec![v as u32]).unwrap_or_default(),
        Some(serde_json::Value::Array(items)) => items.iter().filter_map(|v| v.as_u64().map(|v| v as u32)).collect(),
        _ => Vec::new(),
    }
}

fn required(value: Option<usize>, name: &str) -> Result<usize> {
    match value {
        Some(v) if v > 0 => Ok(v),
        Some(_) => Err(ExecutorError::Config(format!("{name} must be positive"))),
        None => Err(ExecutorError::Config(format!("missing {name}"))),
    }
}

impl ModelConfig {
    /// Reads `config.json` from a model directory, or the metadata of the GGUF file the path
    /// names ([`crate::gguf_weights::model_file`]).
    pub fn load(model_dir: &Path) -> Result<Self> {
        if let Some(file) = crate::gguf_weights::model_file(model_dir) {
            let header = crate::gguf::GgufFile::open(&file)?.header;
            let config = header.hf_config().map_err(|e| ExecutorError::Config(format!("{}: {e}", file.display())))?;
            return Self::parse(&config.to_string());
        }
        let path = model_dir.join("config.json");
        let text = std::fs::read_to_string(&path)
            .map_err(|source| ExecutorError::Io { path: path.display().to_string(), source })?;
        Self::parse(&text)
    }

    /// Parses and checks the text of a `config.json`.
    pub fn parse(text: &str) -> Result<Self> {
        let raw: RawConfig =
            serde_json::from_str(text).map_err(|e| ExecutorError::Config(format!("config.json is not valid: {e}")))?;
        let architecture = raw
            .architectures
            .as_ref()
            .and_then(|a| a.first().cloned())
            .ok_or_else(|| ExecutorError::Config("missing architectures".into()))?;
        if !SUPPORTED_ARCHITECTURES.contains(&architecture.as_str()) {
            return Err(ExecutorError::Config(format!(
                "unsupported architecture {architecture} (model_type {}); supported: {}",
                raw.model_type.as_deref().unwrap_or("?"),
                SUPPORTED_ARCHITECTURES.join(", ")
            )));
        }
        if let Some(act) = raw.hidden_act.as_deref() {
            if act != "silu" {
                return Err(ExecutorError::Config(format!("unsupported hidden_act {act} (only silu)")));
            }
        }
        let hidden_size = required(raw.hidden_size, "hidden_size")?;
        let num_heads = required(raw.num_attention_heads, "num_attention_heads")?;
        let num_kv_heads = required(raw.num_key_value_heads.or(Some(num_heads)), "num_key_value_heads")?;
        if num_heads % num_kv_heads != 0 {
            return Err(ExecutorError::Config(format!(
                "num_attention_heads {num_heads} is not a multiple of num_key_value_heads {num_kv_heads}"
            )));
        }
        let head_dim = match raw.head_dim {
            Some(d) => required(Some(d), "head_dim")?,
            None if hidden_size % num_heads == 0 => hidden_size / num_heads,
            None => return Err(ExecutorError::Config("hidden_size is not a multiple of num_attention_heads".into())),
        };
        if head_dim % 2 != 0 {
            return Err(ExecutorError::Config(format!("head_dim {head_dim} must be even for RoPE")));
        }
        let rope_scaling = match raw.rope_scaling {
            None => RopeScaling::None,
            Some(s) => match s.rope_type.as_deref() {
                None | Some("default") => RopeScaling::None,
                Some("linear") => RopeScaling::Linear {
                    factor: s.factor.ok_or_else(|| ExecutorError::Config("linear rope_scaling needs factor".into()))?,
                },
                Some("llama3") => RopeScaling::Llama3 {
                    factor: s.factor.ok_or_else(|| ExecutorError::Config("llama3 rope_scaling needs factor".into()))?,
                    low_freq_factor: s.low_freq_factor.unwrap_or(1.0),
                    high_freq_factor: s.high_freq_factor.unwrap_or(4.0),
                    original_max_position_embeddings: s.original_max_position_embeddings.unwrap_or(8192.0),
                },
                Some(other) => return Err(ExecutorError::Config(format!("unsupported rope_scaling type {other}"))),
            },
        };
        let sliding_window = match (&raw.sliding_window, raw.use_sliding_window) {
            (_, Some(false)) => None,
            (Some(v), _) => v.as_u64().map(|w| w as usize),
            _ => None,
        };
        let is_qwen2 = architecture == "Qwen2ForCausalLM";
        Ok(Self {
            hidden_size,
            intermediate_size: required(raw.intermediate_size, "intermediate_size")?,
            num_layers: required(raw.num_hidden_layers, "num_hidden_layers")?,
            num_heads,
            num_kv_heads,
            head_dim,
            vocab_size: required(raw.vocab_size, "vocab_size")?,
            max_position_embeddings: raw.max_position_embeddings.unwrap_or(2048),
            rms_norm_eps: raw.rms_norm_eps.unwrap_or(1e-6) as f32,
            rope_theta: raw.rope_theta.unwrap_or(10000.0),
            rope_scaling,
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
            qkv_bias: raw.attention_bias.unwrap_or(is_qwen2),
            sliding_window,
            torch_dtype: raw.torch_dtype,
            bos_token_id: token_ids(raw.bos_token_id.as_ref()).first().copied(),
            eos_token_ids: token_ids(raw.eos_token_id.as_ref()),
            architecture,
        })
    }

    /// Longest sequence this model serves: the trained context, capped by a sliding window.
    pub fn max_model_len(&self) -> usize {
        match self.sliding_window {
            Some(w) if w < self.max_position_embeddings => w,
            _ => self.max_position_embeddings,
        }
    }

    /// Query heads served by each key/value head.
    pub fn gqa_group(&self) -> usize {
        self.num_heads / self.num_kv_heads
    }

    /// Floats of K (or V) per token per layer.
    pub fn kv_width(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }
}

/// Reads the eos ids of `generation_config.json` (one id or a list), if the file exists.
pub fn generation_eos_ids(model_dir: &Path) -> Result<Option<Vec<u32>>> {
    let path = model_dir.join("generation_config.json");
    if !path.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&path)
        .map_err(|source| ExecutorError::Io { path: path.display().to_string(), source })?;
    let value: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| ExecutorError::Config(format!("generation_config.json is not valid: {e}")))?;
    Ok(value.get("eos_token_id").map(|v| token_ids(Some(v))))
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"{"architectures":["LlamaForCausalLM"],"hidden_size":64,"intermediate_size":172,
        "num_hidden_layers":5,"num_attention_heads":8,"num_key_value_heads":4,"vocab_size":512,
        "rms_norm_eps":1e-5,"eos_token_id":[2,7]}"#;

    #[test]
    fn gguf_metadata_gives_a_config_this_parser_accepts() {
        let mut w = crate::gguf::writer::Writer::default();
        w.kv_str("general.architecture", "llama").kv_strings("tokenizer.ggml.tokens", &["a", "b"]);
        for (key, value) in [
            ("llama.block_count", 30u32),
            ("llama.embedding_length", 576),
            ("llama.feed_forward_length", 1536),
            ("llama.attention.head_count", 9),
            ("llama.attention.head_count_kv", 3),
            ("llama.context_length", 8192),
        ] {
            w.kv_u32(key, value);
        }
        let header = crate::gguf::parse(&w.bytes()).expect("parses");
        let config = header.hf_config().expect("a config");
        let parsed = ModelConfig::parse(&config.to_string()).expect("accepted");
        assert_eq!((parsed.num_layers, parsed.hidden_size, parsed.num_kv_heads, parsed.head_dim), (30, 576, 3, 64));
        assert_eq!(parsed.vocab_size, 2, "the vocabulary from the token list");
        assert!(parsed.tie_word_embeddings, "no output.weight: tied");
    }

    #[test]
    fn parses_defaults_and_eos_lists() {
        let c = ModelConfig::parse(BASE).unwrap();
        assert_eq!(c.head_dim, 8);
        assert_eq!(c.gqa_group(), 2);
        assert_eq!(c.eos_token_ids, vec![2, 7]);
        assert!(!c.qkv_bias);
        assert_eq!(c.rope_scaling, RopeScaling::None);
    }

    #[test]
    fn rejects_unknown_architecture_by_name() {
        let text = BASE.replace("LlamaForCausalLM", "GPT2LMHeadModel");
        let err = ModelConfig::parse(&text).unwrap_err().to_string();
        assert!(err.contains("GPT2LMHeadModel"), "{err}");
    }

    #[test]
    fn qwen2_has_qkv_bias_and_llama3_scaling_parses() {
        let text = BASE.replace("LlamaForCausalLM", "Qwen2ForCausalLM");
        assert!(ModelConfig::parse(&text).unwrap().qkv_bias);
        let text = BASE.replace(
            "\"rms_norm_eps\"",
            r#""rope_scaling":{"rope_type":"llama3","factor":8.0,"low_freq_factor":1.0,"high_freq_factor":4.0,"original_max_position_embeddings":8192},"rms_norm_eps""#,
        );
        assert!(matches!(ModelConfig::parse(&text).unwrap().rope_scaling, RopeScaling::Llama3 { .. }));
    }

    #[test]
    fn rejects_bad_shapes() {
        let text = BASE.replace("\"num_key_value_heads\":4", "\"num_key_value_heads\":3");
        assert!(ModelConfig::parse(&text).is_err());
        assert!(ModelConfig::parse("{not json").is_err());
    }
}
