//! The Llama-family transformer on the CPU: weights and the batched forward pass.

use std::path::Path;

use rayon::prelude::*;

use super::attention::{paged_attention, row_spans, SeqSpan};
use super::gemv::isa;
use super::kv_cache::KvCache;
use super::linear::Linear;
use super::ops::{rms_norm, silu_mul, RopeTable};
use crate::config::ModelConfig;
use crate::error::{ExecutorError, Result};
use crate::quant::QuantKind;
use crate::weights::{TensorData, WeightDtype, WeightStore};

struct Layer {
    input_norm: Vec<f32>,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    post_norm: Vec<f32>,
    gate: Linear,
    up: Linear,
    down: Linear,
}

/// A loaded model: configuration, weights and RoPE tables.
pub struct LlamaModel {
    /// The configuration.
    pub config: ModelConfig,
    embed: TensorData,
    layers: Vec<Layer>,
    norm: Vec<f32>,
    lm_head: Linear,
    rope: RopeTable,
    format: QuantKind,
}

/// One forward pass's input: a flat batch of rows from several sequences.
pub struct ForwardBatch<'a> {
    /// Token of every row.
    pub tokens: &'a [u32],
    /// Position of every row.
    pub positions: &'a [usize],
    /// Cache slot (`block * block_size + offset`) every row's K/V is written to.
    pub slots: &'a [usize],
    /// The sequences' spans of rows.
    pub spans: &'a [SeqSpan<'a>],
    /// Rows whose logits are wanted, in output order.
    pub logit_rows: &'a [usize],
}

struct Loader<'a> {
    store: &'a WeightStore,
    dtype: Option<WeightDtype>,
    quantization: Option<QuantKind>,
}

impl Loader<'_> {
    fn matrix(&self, name: &str, out: usize, inp: usize) -> Result<TensorData> {
        let data = self.store.get(name, &[out, inp])?.data;
        Ok(match self.dtype {
            Some(d) => data.convert(d),
            None => data,
        })
    }

    fn vector(&self, name: &str, len: usize) -> Result<Vec<f32>> {
        Ok(self.store.get(name, &[len])?.data.to_f32())
    }

    /// A dense layer's weight, quantized when asked and it is not already (a matrix whose rows
    /// are not whole blocks stays as it is, as llama.cpp's quantizer leaves such tensors).
    fn linear(&self, prefix: &str, out: usize, inp: usize, bias: bool) -> Result<Linear> {
        let mut weight = self.matrix(&format!("{prefix}.weight"), out, inp)?;
        if let Some(kind) = self.quantization {
            if weight.dtype().is_some() && inp.is_multiple_of(kind.block_elements()) {
                weight = weight.quantize(kind).map_err(|e| ExecutorError::Weights(format!("{prefix}.weight: {e}")))?;
            }
        }
        let bias = if bias { Some(self.vector(&format!("{prefix}.bias"), out)?) } else { None };
        Ok(Linear { out_features: out, in_features: inp, weight, bias })
    }
}

impl LlamaModel {
    /// Loads `config.json` and the safetensors weights of a model directory, converting
    /// weights to `dtype` when given (else keeping the stored types).
    pub fn load(model_dir: &Path, dtype: Option<WeightDtype>) -> Result<Self> {
        Self::load_quantized(model_dir, dtype, None)
    }

    /// As [`Self::load`], and with `quantization` (Q8_0 or Q4_0) the dense layers' unquantized
    /// weights are quantized into that block format (embeddings, norms and the output
    /// projection stay as loaded).
    pub fn load_quantized(
        model_dir: &Path,
        dtype: Option<WeightDtype>,
        quantization: Option<QuantKind>,
    ) -> Result<Self> {
        let config = ModelConfig::load(model_dir)?;
        let store = WeightStore::open(model_dir)?;
        Self::from_store_quantized(config, &store, dtype, quantization)
    }

    /// Builds the model from a parsed config and opened weights.
    pub fn from_store(config: ModelConfig, store: &WeightStore, dtype: Option<WeightDtype>) -> Result<Self> {
        Self::from_store_quantized(config, store, dtype, None)
    }

    /// [`Self::from_store`] with [`Self::load_quantized`]'s `quantization`.
    pub fn from_store_quantized(
        config: ModelConfig,
        store: &WeightStore,
        dtype: Option<WeightDtype>,
        quantization: Option<QuantKind>,
    ) -> Result<Self> {
        if let Some(kind) = quantization.filter(|k| !crate::quant::quantize::TARGETS.contains(k)) {
            return Err(ExecutorError::Config(format!("cannot quantize to {} (q8_0, q4_0)", kind.name())));
        }
        let c = &config;
        let loader = Loader { store, dtype, quantization };
        let (d, hd) = (c.hidden_size, c.head_dim);
        let embed = loader.matrix("model.embed_tokens.weight", c.vocab_size, d)?;
        let mut layers = Vec::with_capacity(c.num_layers);
        for i in 0..c.num_layers {
            let p = format!("model.layers.{i}");
            layers.push(Layer {
                input_norm: loader.vector(&format!("{p}.input_layernorm.weight"), d)?,
                q: loader.linear(&format!("{p}.self_attn.q_proj"), c.num_heads * hd, d, c.qkv_bias)?,
                k: loader.linear(&format!("{p}.self_attn.k_proj"), c.num_kv_heads * hd, d, c.qkv_bias)?,
                v: loader.linear(&format!("{p}.self_attn.v_proj"), c.num_kv_heads * hd, d, c.qkv_bias)?,
                o: loader.linear(&format!("{p}.self_attn.o_proj"), d, c.num_heads * hd, false)?,
                post_norm: loader.vector(&format!("{p}.post_attention_layernorm.weight"), d)?,
                gate: loader.linear(&format!("{p}.mlp.gate_proj"), c.intermediate_size, d, false)?,
                up: loader.linear(&format!("{p}.mlp.up_proj"), c.intermediate_size, d, false)?,
                down: loader.linear(&format!("{p}.mlp.down_proj"), d, c.intermediate_size, false)?,
            });
        }
        let norm = loader.vector("model.norm.weight", d)?;
        let lm_head = if c.tie_word_embeddings {
            Linear { out_features: c.vocab_size, in_features: d, weight: embed.clone(), bias: None }
        } else {
            loader.linear("lm_head", c.vocab_size, d, false)?
        };
        let format = lm_head.weight.format();
        let rope = RopeTable::new(c, c.max_model_len());
        Ok(Self { config, embed, layers, norm, lm_head, rope, format })
    }

    /// The weights' storage format (of the output projection).
    pub fn format(&self) -> QuantKind {
        self.format
    }

    /// The storage format of every dense layer's weight, by its Hugging Face name (without
    /// `.weight`), layer by layer.
    pub fn dense_formats(&self) -> Vec<(String, QuantKind)> {
        let mut out = Vec::new();
        for (i, l) in self.layers.iter().enumerate() {
            let named = [
                ("self_attn.q_proj", &l.q),
                ("self_attn.k_proj", &l.k),
                ("self_attn.v_proj", &l.v),
                ("self_attn.o_proj", &l.o),
                ("mlp.gate_proj", &l.gate),
                ("mlp.up_proj", &l.up),
                ("mlp.down_proj", &l.down),
            ];
            out.extend(named.iter().map(|(name, linear)| (format!("model.layers.{i}.{name}"), linear.weight.format())));
        }
        out
    }

    /// Runs the batch through the model, writing every row's K/V into `cache`, and returns the
    /// logits `[logit_rows.len(), vocab]`.
    pub fn forward(&self, batch: &ForwardBatch<'_>, cache: &mut KvCache) -> Vec<f32> {
        let c = &self.config;
        let rows = batch.tokens.len();
        let (d, hd) = (c.hidden_size, c.head_dim);
        let (qw, kvw) = (c.num_heads * hd, c.num_kv_heads * hd);
        let mut x = vec![0.0f32; rows * d];
        for (r, &t) in batch.tokens.iter().enumerate() {
            self.embed.row_to_f32(t as usize, d, &mut x[r * d..(r + 1) * d]);
        }
        let owner = row_spans(batch.spans, rows);
        let mut h = vec![0.0f32; rows * d];
        let mut q = vec![0.0f32; rows * qw];
        let mut k = vec![0.0f32; rows * kvw];
        let mut v = vec![0.0f32; rows * kvw];
        let mut attn = vec![0.0f32; rows * qw];
        let mut proj = vec![0.0f32; rows * d];
        let mut gate = vec![0.0f32; rows * c.intermediate_size];
        let mut up = vec![0.0f32; rows * c.intermediate_size];
        for (li, layer) in self.layers.iter().enumerate() {
            rms_norm(&x, &layer.input_norm, c.rms_norm_eps, &mut h);
            layer.q.forward(&h, rows, &mut q);
            layer.k.forward(&h, rows, &mut k);
            layer.v.forward(&h, rows, &mut v);
            q.par_chunks_mut(qw).zip(k.par_chunks_mut(kvw)).enumerate().for_each(|(r, (qr, kr))| {
                self.rope.apply(qr, batch.positions[r]);
                self.rope.apply(kr, batch.positions[r]);
            });
            for r in 0..rows {
                cache.write(li, batch.slots[r], &k[r * kvw..][..kvw], &v[r * kvw..][..kvw]);
            }
            paged_attention(isa(), &q, cache, li, batch.spans, &owner, c.num_heads, &mut attn);
            layer.o.forward(&attn, rows, &mut proj);
            add_in_place(&mut x, &proj);
            rms_norm(&x, &layer.post_norm, c.rms_norm_eps, &mut h);
            layer.gate.forward(&h, rows, &mut gate);
            layer.up.forward(&h, rows, &mut up);
            silu_mul(&mut gate, &up);
            layer.down.forward(&gate, rows, &mut proj);
            add_in_place(&mut x, &proj);
        }
        let n = batch.logit_rows.len();
        let mut last = vec![0.0f32; n * d];
        for (i, &r) in batch.logit_rows.iter().enumerate() {
            rms_norm(&x[r * d..(r + 1) * d], &self.norm, c.rms_norm_eps, &mut last[i * d..(i + 1) * d]);
        }
        let mut logits = vec![0.0f32; n * c.vocab_size];
        self.lm_head.forward(&last, n, &mut logits);
        logits
    }
}

fn add_in_place(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}
