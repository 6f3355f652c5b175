//! The Llama forward pass over a [`KernelBackend`]: the same model as the CPU backend's
//! (`cpu::model`), as a sequence of kernel launches and GEMMs on device buffers.

use std::path::Path;

use pagemesh_kernels::geometry::{flatten_tiles, prefill_tiles};
use pagemesh_kernels::{AttentionShape, Element};

use super::backend::{DecodeMeta, GpuElement, KernelBackend, PrefillMeta};
use crate::config::ModelConfig;
use crate::cpu::attention::SeqSpan;
use crate::cpu::model::ForwardBatch;
use crate::cpu::ops::inv_frequencies;
use crate::error::{ExecutorError, Result};
use crate::weights::WeightStore;

type Buf<E, B, T> = <B as KernelBackend<E>>::Buffer<T>;

/// The q, k and v biases of a layer (Qwen2, `attention_bias`).
struct QkvBias<E: GpuElement, B: KernelBackend<E>> {
    q: Buf<E, B, E>,
    k: Buf<E, B, E>,
    v: Buf<E, B, E>,
}

struct Layer<E: GpuElement, B: KernelBackend<E>> {
    input_norm: Buf<E, B, E>,
    q: Buf<E, B, E>,
    k: Buf<E, B, E>,
    v: Buf<E, B, E>,
    bias: Option<QkvBias<E, B>>,
    o: Buf<E, B, E>,
    post_norm: Buf<E, B, E>,
    gate: Buf<E, B, E>,
    up: Buf<E, B, E>,
    down: Buf<E, B, E>,
}

/// A Llama-family model on a backend, computing in `E`.
pub struct GpuModel<E: GpuElement, B: KernelBackend<E>> {
    /// The configuration.
    pub config: ModelConfig,
    backend: B,
    embed: Buf<E, B, E>,
    layers: Vec<Layer<E, B>>,
    norm: Buf<E, B, E>,
    /// The output projection, `None` when tied to the embedding.
    lm_head: Option<Buf<E, B, E>>,
    inv_freq: Buf<E, B, f32>,
}

/// The paged KV cache on a backend: per layer, K and V pools in the CPU backend's layout.
pub struct GpuCache<E: GpuElement, B: KernelBackend<E>> {
    /// Per layer, the K pool.
    pub k: Vec<Buf<E, B, E>>,
    /// Per layer, the V pool.
    pub v: Vec<Buf<E, B, E>>,
    /// Per layer, the host (swap) pool of K.
    pub host_k: Vec<B::HostPool>,
    /// Per layer, the host (swap) pool of V.
    pub host_v: Vec<B::HostPool>,
    /// Heads and block geometry.
    pub shape: AttentionShape,
    /// Blocks of each device pool.
    pub num_blocks: usize,
    /// Blocks of each host pool.
    pub num_host_blocks: usize,
}

impl<E: GpuElement, B: KernelBackend<E>> GpuCache<E, B> {
    /// Copies block `src` to `dst` in every layer (copy-on-write).
    pub fn copy_blocks(&mut self, backend: &B, pairs: &[(u32, u32)]) -> Result<()> {
        if pairs.iter().any(|&(s, d)| s as usize >= self.num_blocks || d as usize >= self.num_blocks) {
            return Err(ExecutorError::InvalidPlan(format!("copy outside the device pool ({})", self.num_blocks)));
        }
        for (k, v) in self.k.iter_mut().zip(self.v.iter_mut()) {
            backend.copy_blocks(k, v, pairs, &self.shape)?;
        }
        Ok(())
    }

    /// Copies device blocks to host blocks, `(device, host)`, in every layer.
    pub fn swap_out(&mut self, backend: &B, pairs: &[(u32, u32)]) -> Result<()> {
        if pairs.iter().any(|&(d, h)| d as usize >= self.num_blocks || h as usize >= self.num_host_blocks) {
            return Err(ExecutorError::InvalidPlan("swap_out outside the pools".into()));
        }
        let len = self.shape.block_len();
        for (dev, host) in self.k.iter().zip(self.host_k.iter_mut()).chain(self.v.iter().zip(self.host_v.iter_mut())) {
            backend.swap_out(dev, host, pairs, len)?;
        }
        Ok(())
    }

    /// Copies host blocks to device blocks, `(host, device)`, in every layer.
    pub fn swap_in(&mut self, backend: &B, pairs: &[(u32, u32)]) -> Result<()> {
        if pairs.iter().any(|&(h, d)| d as usize >= self.num_blocks || h as usize >= self.num_host_blocks) {
            return Err(ExecutorError::InvalidPlan("swap_in outside the pools".into()));
        }
        let len = self.shape.block_len();
        for (host, dev) in self.host_k.iter().zip(self.k.iter_mut()).chain(self.host_v.iter().zip(self.v.iter_mut())) {
            backend.swap_in(host, dev, pairs, len)?;
        }
        Ok(())
    }
}

fn convert<E: Element>(v: &[f32]) -> Vec<E> {
    v.iter().map(|&x| E::from_f32(x)).collect()
}

impl<E: GpuElement, B: KernelBackend<E>> GpuModel<E, B> {
    /// Loads a model directory onto the backend.
    pub fn load(backend: B, model_dir: &Path) -> Result<Self> {
        let config = ModelConfig::load(model_dir)?;
        let store = WeightStore::open(model_dir)?;
        Self::from_store(backend, config, &store)
    }

    /// Uploads the weights of an opened store.
    pub fn from_store(backend: B, config: ModelConfig, store: &WeightStore) -> Result<Self> {
        let c = &config;
        let shape = Self::shape_of(c, 16);
        shape.validate().map_err(ExecutorError::Config)?;
        let (d, hd) = (c.hidden_size, c.head_dim);
        let get = |name: &str, dims: &[usize]| -> Result<Buf<E, B, E>> {
            let data = store.get(name, dims)?.data.to_f32();
            backend.upload(&convert::<E>(&data))
        };
        let embed = get("model.embed_tokens.weight", &[c.vocab_size, d])?;
        let mut layers = Vec::with_capacity(c.num_layers);
        for i in 0..c.num_layers {
            let p = format!("model.layers.{i}");
            layers.push(Layer {
                input_norm: get(&format!("{p}.input_layernorm.weight"), &[d])?,
                q: get(&format!("{p}.self_attn.q_proj.weight"), &[c.num_heads * hd, d])?,
                k: get(&format!("{p}.self_attn.k_proj.weight"), &[c.num_kv_heads * hd, d])?,
                v: get(&format!("{p}.self_attn.v_proj.weight"), &[c.num_kv_heads * hd, d])?,
                bias: if c.qkv_bias {
                    Some(QkvBias {
                        q: get(&format!("{p}.self_attn.q_proj.bias"), &[c.num_heads * hd])?,
                        k: get(&format!("{p}.self_attn.k_proj.bias"), &[c.num_kv_heads * hd])?,
                        v: get(&format!("{p}.self_attn.v_proj.bias"), &[c.num_kv_heads * hd])?,
                    })
                } else {
                    None
                },
                o: get(&format!("{p}.self_attn.o_proj.weight"), &[d, c.num_heads * hd])?,
                post_norm: get(&format!("{p}.post_attention_layernorm.weight"), &[d])?,
                gate: get(&format!("{p}.mlp.gate_proj.weight"), &[c.intermediate_size, d])?,
                up: get(&format!("{p}.mlp.up_proj.weight"), &[c.intermediate_size, d])?,
                down: get(&format!("{p}.mlp.down_proj.weight"), &[d, c.intermediate_size])?,
            });
        }
        let norm = get("model.norm.weight", &[d])?;
        let lm_head = if c.tie_word_embeddings { None } else { Some(get("lm_head.weight", &[c.vocab_size, d])?) };
        let inv_freq = backend.upload(&inv_frequencies(c))?;
        Ok(Self { config, backend, embed, layers, norm, lm_head, inv_freq })
    }

    fn shape_of(c: &ModelConfig, block_size: usize) -> AttentionShape {
        AttentionShape { num_heads: c.num_heads, num_kv_heads: c.num_kv_heads, head_dim: c.head_dim, block_size }
    }

    /// The backend.
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// A zeroed cache of `num_blocks` device blocks and `num_host_blocks` host blocks of
    /// `block_size` tokens per layer.
    pub fn new_cache(&self, block_size: usize, num_blocks: usize, num_host_blocks: usize) -> Result<GpuCache<E, B>> {
        let shape = Self::shape_of(&self.config, block_size);
        shape.validate().map_err(ExecutorError::Config)?;
        let (len, host_len) = (num_blocks * shape.block_len(), num_host_blocks * shape.block_len());
        let layers = self.layers.len();
        let (mut k, mut v) = (Vec::with_capacity(layers), Vec::with_capacity(layers));
        let (mut host_k, mut host_v) = (Vec::with_capacity(layers), Vec::with_capacity(layers));
        for _ in 0..layers {
            k.push(self.backend.zeros(len)?);
            v.push(self.backend.zeros(len)?);
            host_k.push(self.backend.host_pool(host_len)?);
            host_v.push(self.backend.host_pool(host_len)?);
        }
        Ok(GpuCache { k, v, host_k, host_v, shape, num_blocks, num_host_blocks })
    }

    /// Bytes of one KV block (K and V of every layer).
    pub fn bytes_per_block(&self, block_size: usize) -> usize {
        2 * self.layers.len() * Self::shape_of(&self.config, block_size).block_len() * E::DTYPE.size()
    }

    /// Block tables of `spans`, padded with block 0 to the longest.
    fn tables(spans: &[&SeqSpan<'_>]) -> (Vec<i32>, usize) {
        let max_blocks = spans.iter().map(|s| s.block_table.len()).max().unwrap_or(1).max(1);
        let flat =
            spans.iter().flat_map(|s| (0..max_blocks).map(|i| s.block_table.get(i).map_or(0, |&b| b as i32))).collect();
        (flat, max_blocks)
    }

    fn check_batch(batch: &ForwardBatch<'_>, cache: &GpuCache<E, B>, vocab: usize) -> Result<()> {
        let invalid = |m: String| Err(ExecutorError::InvalidPlan(m));
        let rows = batch.tokens.len();
        if batch.positions.len() != rows || batch.slots.len() != rows {
            return invalid("tokens, positions and slots differ in length".into());
        }
        if batch.tokens.iter().any(|&t| t as usize >= vocab) {
            return invalid("token outside the vocabulary".into());
        }
        let slots = cache.num_blocks * cache.shape.block_size;
        if batch.slots.iter().any(|&s| s >= slots) {
            return invalid(format!("slot outside the cache ({slots} slots)"));
        }
        for s in batch.spans {
            let end = s.start_pos + s.len;
            if s.first_row + s.len > rows || s.len == 0 || s.block_table.len() * cache.shape.block_size < end {
                return invalid("a sequence's rows or block table do not cover its tokens".into());
            }
            if s.block_table.iter().any(|&b| b as usize >= cache.num_blocks) {
                return invalid(format!("block outside the cache ({} blocks)", cache.num_blocks));
            }
        }
        if batch.logit_rows.iter().any(|&r| r >= rows) {
            return invalid("logit row outside the batch".into());
        }
        Ok(())
    }

    /// Runs the batch, writing every row's K/V into `cache`, and returns the logits of
    /// `logit_rows` (`[logit_rows.len(), vocab]`, in f32).
    pub fn forward(&self, batch: &ForwardBatch<'_>, cache: &mut GpuCache<E, B>) -> Result<Vec<f32>> {
        let c = &self.config;
        Self::check_batch(batch, cache, c.vocab_size)?;
        let b = &self.backend;
        let rows = batch.tokens.len();
        let shape = cache.shape;
        let (d, inter) = (c.hidden_size, c.intermediate_size);
        let (qw, kvw) = (c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim);
        let eps = c.rms_norm_eps;
        if rows == 0 {
            return Ok(Vec::new());
        }

        let tokens: Vec<i32> = batch.tokens.iter().map(|&t| t as i32).collect();
        let positions: Vec<i32> = batch.positions.iter().map(|&p| p as i32).collect();
        let slots: Vec<i64> = batch.slots.iter().map(|&s| s as i64).collect();
        let (tokens, positions, slots) = (b.upload(&tokens)?, b.upload(&positions)?, b.upload(&slots)?);

        // Single rows go through the decode kernel, longer spans through the prefill kernel.
        let (singles, chunks): (Vec<&SeqSpan<'_>>, Vec<&SeqSpan<'_>>) = batch.spans.iter().partition(|s| s.len == 1);
        let decode = if singles.is_empty() {
            None
        } else {
            let (tables, max_blocks) = Self::tables(&singles);
            let q_rows: Vec<i32> = singles.iter().map(|s| s.first_row as i32).collect();
            let context_lens: Vec<i32> = singles.iter().map(|s| (s.start_pos + 1) as i32).collect();
            Some(DecodeMeta {
                q_rows: b.upload(&q_rows)?,
                context_lens: b.upload(&context_lens)?,
                tables: b.upload(&tables)?,
                max_blocks,
                num_seqs: singles.len(),
                max_context: singles.iter().map(|s| s.start_pos + 1).max().unwrap_or(1),
            })
        };
        let prefill = if chunks.is_empty() {
            None
        } else {
            let (tables, max_blocks) = Self::tables(&chunks);
            let tiles = prefill_tiles(chunks.iter().enumerate().map(|(i, s)| (i, s.first_row, s.len, s.start_pos)));
            Some(PrefillMeta {
                tiles: b.upload(&flatten_tiles(&tiles))?,
                num_tiles: tiles.len(),
                tables: b.upload(&tables)?,
                max_blocks,
            })
        };

        let mut x = b.zeros::<E>(rows * d)?;
        let mut h = b.zeros::<E>(rows * d)?;
        let mut q = b.zeros::<E>(rows * qw)?;
        let mut k = b.zeros::<E>(rows * kvw)?;
        let mut v = b.zeros::<E>(rows * kvw)?;
        let mut attn = b.zeros::<E>(rows * qw)?;
        let mut proj = b.zeros::<E>(rows * d)?;
        let mut gate = b.zeros::<E>(rows * inter)?;
        let mut up = b.zeros::<E>(rows * inter)?;
        b.embedding(&mut x, &self.embed, &tokens, d)?;
        for (li, layer) in self.layers.iter().enumerate() {
            if li == 0 {
                b.rms_norm(&mut h, &x, &layer.input_norm, eps)?;
            } else {
                // The previous layer's MLP output joins the residual stream here.
                b.fused_add_rms_norm(&mut h, &mut x, &proj, &layer.input_norm, eps)?;
            }
            b.gemm(&mut q, &h, &layer.q, rows, qw, d)?;
            b.gemm(&mut k, &h, &layer.k, rows, kvw, d)?;
            b.gemm(&mut v, &h, &layer.v, rows, kvw, d)?;
            if let Some(bias) = &layer.bias {
                b.add_bias(&mut q, &bias.q)?;
                b.add_bias(&mut k, &bias.k)?;
                b.add_bias(&mut v, &bias.v)?;
            }
            b.rope(&mut q, &mut k, &positions, &self.inv_freq, &shape)?;
            b.reshape_and_cache(&k, &v, &mut cache.k[li], &mut cache.v[li], &slots, &shape)?;
            if let Some(meta) = &decode {
                b.paged_attention_decode(&mut attn, &q, &cache.k[li], &cache.v[li], meta, &shape)?;
            }
            if let Some(meta) = &prefill {
                b.paged_attention_prefill(&mut attn, &q, &cache.k[li], &cache.v[li], meta, &shape)?;
            }
            b.gemm(&mut proj, &attn, &layer.o, rows, d, qw)?;
            b.fused_add_rms_norm(&mut h, &mut x, &proj, &layer.post_norm, eps)?;
            b.gemm(&mut gate, &h, &layer.gate, rows, inter, d)?;
            b.gemm(&mut up, &h, &layer.up, rows, inter, d)?;
            b.silu_mul_in_place(&mut gate, &up)?;
            b.gemm(&mut proj, &gate, &layer.down, rows, d, inter)?;
        }
        b.fused_add_rms_norm(&mut h, &mut x, &proj, &self.norm, eps)?;
        let n = batch.logit_rows.len();
        if n == 0 {
            return Ok(Vec::new());
        }
        let picked: Vec<i32> = batch.logit_rows.iter().map(|&r| r as i32).collect();
        let mut last = b.zeros::<E>(n * d)?;
        b.embedding(&mut last, &h, &b.upload(&picked)?, d)?;
        let mut logits = b.zeros::<E>(n * c.vocab_size)?;
        let head = self.lm_head.as_ref().unwrap_or(&self.embed);
        b.gemm(&mut logits, &last, head, n, c.vocab_size, d)?;
        Ok(b.download(&logits)?.into_iter().map(Element::to_f32).collect())
    }
}
