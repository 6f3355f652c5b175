//! Synthetic models: a Llama model directory with random weights of a named shape, for
//! benchmarks and tests.

use std::collections::HashMap;
use std::path::Path;

use half::{bf16, f16};
use safetensors::tensor::{Dtype, TensorView};
use serde_json::{json, Value};

use crate::weights::WeightDtype;

/// Model shapes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preset {
    /// dim 768, 12 layers, 12 heads, MLP 2048, vocab 32000, tied embeddings (≈110M parameters).
    Llama110m,
    /// TinyLlama 1.1B: dim 2048, 22 layers, 32 heads, 4 KV heads, MLP 5632, vocab 32000.
    TinyLlama,
    /// dim 64, 2 layers, 4 heads, 2 KV heads, MLP 160, vocab 512: for quick tests.
    Tiny,
}

/// A model's shape.
pub struct Shape {
    /// Model width.
    pub dim: usize,
    /// Layers.
    pub layers: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// MLP width.
    pub hidden: usize,
    /// Vocabulary size.
    pub vocab: usize,
    /// Context length.
    pub max_len: usize,
    /// Tied embeddings.
    pub tied: bool,
}

impl std::str::FromStr for Preset {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "llama-110m" => Ok(Self::Llama110m),
            "tinyllama-1.1b" => Ok(Self::TinyLlama),
            "tiny" => Ok(Self::Tiny),
            other => Err(format!("unknown preset '{other}' (llama-110m, tinyllama-1.1b, tiny)")),
        }
    }
}

impl Preset {
    /// The preset's shape.
    pub fn shape(self) -> Shape {
        match self {
            Self::Llama110m => Shape {
                dim: 768,
                layers: 12,
                heads: 12,
                kv_heads: 12,
                hidden: 2048,
                vocab: 32000,
                max_len: 1024,
                tied: true,
            },
            Self::TinyLlama => Shape {
                dim: 2048,
                layers: 22,
                heads: 32,
                kv_heads: 4,
                hidden: 5632,
                vocab: 32000,
                max_len: 2048,
                tied: false,
            },
            Self::Tiny => {
                Shape { dim: 64, layers: 2, heads: 4, kv_heads: 2, hidden: 160, vocab: 512, max_len: 512, tied: true }
            }
        }
    }
}

struct Rng(u64);

impl Rng {
    fn next_f32(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 40) as f32 / (1u64 << 24) as f32
    }

    /// Roughly normal with standard deviation `std` (sum of four uniforms).
    fn normal(&mut self, std: f32) -> f32 {
        let s: f32 = (0..4).map(|_| self.next_f32()).sum::<f32>() - 2.0;
        s * std * (3.0f32).sqrt()
    }
}

fn tensor_bytes(values: impl Iterator<Item = f32>, dtype: WeightDtype) -> Vec<u8> {
    match dtype {
        WeightDtype::F32 => values.flat_map(f32::to_le_bytes).collect(),
        WeightDtype::F16 => values.flat_map(|v| f16::from_f32(v).to_le_bytes()).collect(),
        WeightDtype::BF16 => values.flat_map(|v| bf16::from_f32(v).to_le_bytes()).collect(),
    }
}

fn st_dtype(dtype: WeightDtype) -> Dtype {
    match dtype {
        WeightDtype::F32 => Dtype::F32,
        WeightDtype::F16 => Dtype::F16,
        WeightDtype::BF16 => Dtype::BF16,
    }
}

fn tensor_specs(s: &Shape) -> Vec<(String, Vec<usize>, bool)> {
    let hd = s.dim / s.heads;
    let mut specs = vec![("model.embed_tokens.weight".to_string(), vec![s.vocab, s.dim], false)];
    for i in 0..s.layers {
        let p = format!("model.layers.{i}");
        specs.push((format!("{p}.input_layernorm.weight"), vec![s.dim], true));
        specs.push((format!("{p}.self_attn.q_proj.weight"), vec![s.heads * hd, s.dim], false));
        specs.push((format!("{p}.self_attn.k_proj.weight"), vec![s.kv_heads * hd, s.dim], false));
        specs.push((format!("{p}.self_attn.v_proj.weight"), vec![s.kv_heads * hd, s.dim], false));
        specs.push((format!("{p}.self_attn.o_proj.weight"), vec![s.dim, s.heads * hd], false));
        specs.push((format!("{p}.post_attention_layernorm.weight"), vec![s.dim], true));
        specs.push((format!("{p}.mlp.gate_proj.weight"), vec![s.hidden, s.dim], false));
        specs.push((format!("{p}.mlp.up_proj.weight"), vec![s.hidden, s.dim], false));
        specs.push((format!("{p}.mlp.down_proj.weight"), vec![s.dim, s.hidden], false));
    }
    specs.push(("model.norm.weight".to_string(), vec![s.dim], true));
    if !s.tied {
        specs.push(("lm_head.weight".to_string(), vec![s.vocab, s.dim], false));
    }
    specs
}

/// A SentencePiece-style byte-fallback BPE tokenizer (no merges: one token per character,
/// bytes for the rest) padded to `vocab` entries.
pub fn byte_fallback_tokenizer(vocab: usize) -> Value {
    let mut pieces: Vec<String> = vec!["<unk>".into(), "<s>".into(), "</s>".into()];
    pieces.extend((0..=255u32).map(|b| format!("<0x{b:02X}>")));
    pieces.push("\u{2581}".into());
    pieces.extend((0x21u8..0x7f).map(|c| (c as char).to_string()));
    let mut filler = 0;
    while pieces.len() < vocab {
        pieces.push(format!("\u{2581}w{filler}"));
        filler += 1;
    }
    pieces.truncate(vocab.max(3 + 256));
    let vocab_map: serde_json::Map<String, Value> =
        pieces.iter().enumerate().map(|(i, p)| (p.clone(), json!(i))).collect();
    let special = |id: usize, content: &str| json!({"id": id, "content": content, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true});
    json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [special(0, "<unk>"), special(1, "<s>"), special(2, "</s>")],
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": "\u{2581}"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"}]},
        "pre_tokenizer": null,
        "post_processor": {"type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": "<s>", "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}},
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "},
            {"type": "ByteFallback"}, {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
        "model": {"type": "BPE", "dropout": null, "unk_token": "<unk>", "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
            "vocab": vocab_map, "merges": []}
    })
}

fn write(path: &Path, contents: &[u8]) -> Result<(), String> {
    std::fs::write(path, contents).map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// Writes `config.json`, `generation_config.json`, `model.safetensors` (random weights, norms
/// of one) and `tokenizer.json` (the given file's bytes, or a generated byte-fallback one).
pub fn write_model(
    dir: &Path,
    preset: Preset,
    dtype: WeightDtype,
    seed: u64,
    tokenizer: Option<&[u8]>,
) -> Result<(), String> {
    let s = preset.shape();
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let specs = tensor_specs(&s);
    let data: Vec<(String, Vec<usize>, Vec<u8>)> = specs
        .into_iter()
        .map(|(name, shape, is_norm)| {
            let count: usize = shape.iter().product();
            let bytes = if is_norm {
                tensor_bytes(std::iter::repeat_n(1.0, count), dtype)
            } else {
                tensor_bytes((0..count).map(|_| rng.normal(0.02)), dtype)
            };
            (name, shape, bytes)
        })
        .collect();
    let views: Vec<(String, TensorView<'_>)> = data
        .iter()
        .map(|(name, shape, bytes)| {
            TensorView::new(st_dtype(dtype), shape.clone(), bytes)
                .map(|v| (name.clone(), v))
                .map_err(|e| format!("tensor {name}: {e}"))
        })
        .collect::<Result<_, _>>()?;
    let metadata: Option<HashMap<String, String>> = Some([("format".to_string(), "pt".to_string())].into());
    safetensors::serialize_to_file(views, metadata, &dir.join("model.safetensors"))
        .map_err(|e| format!("cannot write weights: {e}"))?;
    let dtype_name = match dtype {
        WeightDtype::F32 => "float32",
        WeightDtype::F16 => "float16",
        WeightDtype::BF16 => "bfloat16",
    };
    let config = json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": s.dim, "intermediate_size": s.hidden, "num_hidden_layers": s.layers,
        "num_attention_heads": s.heads, "num_key_value_heads": s.kv_heads, "vocab_size": s.vocab,
        "max_position_embeddings": s.max_len, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "hidden_act": "silu", "tie_word_embeddings": s.tied, "bos_token_id": 1, "eos_token_id": 2,
        "torch_dtype": dtype_name,
    });
    write(&dir.join("config.json"), config.to_string().as_bytes())?;
    write(&dir.join("generation_config.json"), br#"{"bos_token_id": 1, "eos_token_id": 2}"#)?;
    match tokenizer {
        Some(bytes) => write(&dir.join("tokenizer.json"), bytes),
        None => write(&dir.join("tokenizer.json"), byte_fallback_tokenizer(s.vocab).to_string().as_bytes()),
    }
}
