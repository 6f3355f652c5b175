//! A GGUF file as a model's weights: its tensors under the Hugging Face names the model loader
//! asks for, read in place from the memory map (quantized ones stay in their blocks), with the
//! query/key rows of Llama and Mistral files put back in Hugging Face order (llama.cpp's
//! converter interleaves each head's two RoPE halves; the executor's RoPE rotates halves).

use std::path::Path;

use crate::error::{ExecutorError, Result};
use crate::gguf::{GgufFile, TensorInfo};
use crate::quant::QuantKind;
use crate::weights::{GgufTensor, WeightStore};

pub use crate::gguf::model_file;

/// Which heads' rows a tensor's RoPE interleaving spans.
#[derive(Clone, Copy)]
enum Heads {
    Query,
    KeyValue,
}

/// The Hugging Face name of a GGUF tensor, and whether its rows are in RoPE-interleaved order.
fn hf_name(name: &str) -> Option<(String, Option<Heads>)> {
    let fixed = match name {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(n) = fixed {
        return Some((n.to_string(), None));
    }
    let rest = name.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (part, suffix) = rest.rsplit_once('.')?;
    let (hf, heads) = match part {
        "attn_norm" => ("input_layernorm", None),
        "ffn_norm" => ("post_attention_layernorm", None),
        "attn_q" => ("self_attn.q_proj", Some(Heads::Query)),
        "attn_k" => ("self_attn.k_proj", Some(Heads::KeyValue)),
        "attn_v" => ("self_attn.v_proj", None),
        "attn_output" => ("self_attn.o_proj", None),
        "ffn_gate" => ("mlp.gate_proj", None),
        "ffn_up" => ("mlp.up_proj", None),
        "ffn_down" => ("mlp.down_proj", None),
        _ => return None,
    };
    Some((format!("model.layers.{layer}.{hf}.{suffix}"), heads))
}

/// The tensor as the weight store keeps it, or an error naming it.
fn entry(info: &TensorInfo, heads: Option<usize>) -> Result<GgufTensor> {
    let kind = QuantKind::from_tensor_type(info.kind).ok_or_else(|| {
        let known: Vec<&str> = QuantKind::ALL.iter().map(|k| k.name()).collect();
        ExecutorError::Weights(format!(
            "tensor {} has type {}, which the executor does not compute with (it does: {})",
            info.name,
            info.kind.name,
            known.join(", ")
        ))
    })?;
    let shape: Vec<usize> = info.dims.iter().rev().map(|&d| d as usize).collect();
    if shape.len() > 2 || shape.is_empty() {
        return Err(ExecutorError::Weights(format!("tensor {} has {} dimensions", info.name, shape.len())));
    }
    Ok(GgufTensor { offset: info.offset as usize, bytes: info.bytes as usize, kind, shape, rope_heads: heads })
}

impl WeightStore {
    /// The tensors of a GGUF file, under Hugging Face names (tensors with no such name, such as
    /// `rope_freqs.weight`, are left out).
    pub fn open_gguf(path: &Path) -> Result<Self> {
        let file = GgufFile::open(path)?;
        let meta = |key: &str| file.header.metadata.get(key).and_then(|v| v.as_u64());
        let arch = file.header.metadata.get("general.architecture").and_then(|v| v.as_str()).unwrap_or("");
        // llama.cpp's converter interleaves q/k rows for these architectures only.
        let interleaved = matches!(arch, "llama" | "mistral");
        let q_heads = meta(&format!("{arch}.attention.head_count")).unwrap_or(0) as usize;
        let kv_heads = meta(&format!("{arch}.attention.head_count_kv")).map_or(q_heads, |h| h as usize);
        let mut store = WeightStore::empty();
        let map = store.add_map(file.map().clone());
        for info in &file.header.tensors {
            let Some((name, heads)) = hf_name(&info.name) else { continue };
            let heads = match heads {
                Some(Heads::Query) if interleaved => Some(q_heads),
                Some(Heads::KeyValue) if interleaved => Some(kv_heads),
                _ => None,
            };
            store.insert_gguf(name, map, entry(info, heads)?);
        }
        Ok(store)
    }
}

/// Puts the rows of a RoPE-interleaved query/key matrix (or bias) back in Hugging Face order:
/// within each head of `head_dim` rows, GGUF row `2i + j` is Hugging Face row `j·head_dim/2 + i`.
pub fn unpermute_rows(bytes: &[u8], rows: usize, heads: usize) -> Result<Vec<u8>> {
    if heads == 0
        || rows == 0
        || !rows.is_multiple_of(heads)
        || !(rows / heads).is_multiple_of(2)
        || !bytes.len().is_multiple_of(rows)
    {
        return Err(ExecutorError::Weights(format!("{rows} rows cannot be {heads} heads of RoPE pairs")));
    }
    let row_bytes = bytes.len() / rows;
    let head_dim = rows / heads;
    let half = head_dim / 2;
    let mut out = vec![0u8; bytes.len()];
    for h in 0..heads {
        for j in 0..2 {
            for i in 0..half {
                let hf = h * head_dim + j * half + i;
                let gguf = h * head_dim + 2 * i + j;
                out[hf * row_bytes..(hf + 1) * row_bytes]
                    .copy_from_slice(&bytes[gguf * row_bytes..(gguf + 1) * row_bytes]);
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    #[test]
    fn gguf_names_map_to_hugging_face_names() {
        assert_eq!(hf_name("token_embd.weight").map(|n| n.0), Some("model.embed_tokens.weight".into()));
        assert_eq!(hf_name("blk.12.ffn_down.weight").map(|n| n.0), Some("model.layers.12.mlp.down_proj.weight".into()));
        assert!(
            matches!(hf_name("blk.0.attn_k.bias"), Some((n, Some(Heads::KeyValue))) if n == "model.layers.0.self_attn.k_proj.bias")
        );
        assert!(hf_name("rope_freqs.weight").is_none());
        assert!(hf_name("blk.x.attn_q.weight").is_none());
    }

    /// A GGUF file of a llama with one query head (four q rows: head_dim 4), written to a
    /// temporary path.
    fn written(name: &str, q_dims: &[u64], q_code: u32, q_data: Vec<u8>) -> PathBuf {
        use crate::gguf::writer::{string, Writer};
        let mut w = Writer::default();
        let mut arch = Vec::new();
        string(&mut arch, "llama");
        w.kv("general.architecture", 8, &arch)
            .kv("llama.attention.head_count", 4, &1u32.to_le_bytes())
            .tensor("blk.0.attn_q.weight", q_dims, q_code, q_data)
            .tensor("rope_freqs.weight", &[1], 0, vec![0; 4]);
        let path = std::env::temp_dir().join(format!("pagemesh-{}-{name}.gguf", std::process::id()));
        std::fs::write(&path, w.bytes()).expect("written");
        path
    }

    #[test]
    fn query_rows_load_in_hugging_face_order_and_bad_tensors_are_named() {
        // Row r holds the value r everywhere (F32): GGUF order (0, 1, 2, 3) is HF (0, 2, 1, 3).
        let q: Vec<u8> = (0..4u32).flat_map(|r| std::iter::repeat_n(r as f32, 32)).flat_map(f32::to_le_bytes).collect();
        let path = written("q", &[32, 4], 0, q);
        let store = WeightStore::open_gguf(&path).expect("opens");
        assert!(!store.contains("rope_freqs.weight"));
        let t = store.get("model.layers.0.self_attn.q_proj.weight", &[4, 32]).expect("loads");
        let firsts: Vec<f32> = (0..4).map(|r| t.data.to_f32()[r * 32]).collect();
        assert_eq!(firsts, vec![0.0, 2.0, 1.0, 3.0]);
        let wrong = store.get("model.layers.0.self_attn.q_proj.weight", &[32, 4]).err().expect("refused");
        assert!(wrong.to_string().contains("has shape [4, 32]"), "{wrong}");
        std::fs::remove_file(&path).ok();
        // Q2_K (code 10) is a format GGUF files have but the executor does not compute with.
        let path = written("q2k", &[256, 1], 10, vec![0; 84]);
        let refused = WeightStore::open_gguf(&path).err().expect("refused");
        assert!(refused.to_string().contains("blk.0.attn_q.weight has type Q2_K"), "{refused}");
        std::fs::remove_file(&path).ok();
    }

    #[test]
    fn interleaved_rows_go_back_to_halves() {
        // Two heads of four rows, one byte each: GGUF order per head is (0, 2, 1, 3) of HF's.
        let gguf = [0u8, 2, 1, 3, 4, 6, 5, 7];
        assert_eq!(unpermute_rows(&gguf, 8, 2).unwrap(), vec![0, 1, 2, 3, 4, 5, 6, 7]);
        assert!(unpermute_rows(&gguf, 8, 3).is_err());
        assert!(unpermute_rows(&gguf, 8, 0).is_err());
        assert!(unpermute_rows(&[], 0, 2).is_err());
    }
}
