//! Engine flags shared by the commands that run a model (`generate`, `bench`, `executor`,
//! `scheduler`, `serve`).

use std::path::{Path, PathBuf};

use crate::cpu::model::LlamaModel;
use crate::quant::QuantKind;
use crate::{CacheConfig, CpuExecutor, ModelConfig, WeightDtype};
use clap::Args;
use pagemesh_shared::{EngineConfig, KvAllocation, PreemptionMode};

/// How to load the model and size the engine.
#[derive(Args, Debug, Clone)]
pub struct EngineArgs {
    /// Hugging Face model directory (config.json, *.safetensors, tokenizer.json), a GGUF file
    /// (or a directory holding one), or a Hub id (`owner/name[@revision]`, or
    /// `owner/name[@revision]:FILE.gguf` for one GGUF file) fetched into the Hugging Face cache.
    #[arg(long)]
    pub model: PathBuf,
    /// Weight dtype to compute with: f32, f16 or bf16 (default: as stored).
    #[arg(long)]
    pub dtype: Option<WeightDtype>,
    /// Quantize the dense layers' weights at load into GGUF blocks: q8_0 (8 bits, 34 bytes per 32
    /// weights) or q4_0 (4 bits, 18 bytes per 32). For Hugging Face f32/f16/bf16 models on the
    /// CPU backend; already quantized GGUF tensors stay as they are.
    #[arg(long, value_parser = parse_quantization)]
    pub quantization: Option<QuantKind>,
    /// Tokens per KV block.
    #[arg(long, default_value_t = 16)]
    pub block_size: usize,
    /// KV blocks in the device pool (default: what 2 GiB holds, at most what max-num-seqs
    /// full-length sequences need).
    #[arg(long)]
    pub num_device_blocks: Option<usize>,
    /// KV blocks in the host (swap) pool (default: as many as the device pool).
    #[arg(long)]
    pub num_host_blocks: Option<usize>,
    /// What preemption does: swap or recompute.
    #[arg(long, default_value = "swap")]
    pub preemption_mode: PreemptionMode,
    /// Most sequences per step.
    #[arg(long, default_value_t = 256)]
    pub max_num_seqs: usize,
    /// Most tokens per step (chunked prefill splits longer prompts).
    #[arg(long, default_value_t = 2048)]
    pub max_num_batched_tokens: usize,
    /// Turn automatic prefix caching off.
    #[arg(long)]
    pub no_prefix_caching: bool,
    /// Longest sequence (default: the model's context length).
    #[arg(long)]
    pub max_model_len: Option<usize>,
    /// Most requests waiting; more are refused.
    #[arg(long, default_value_t = 65536)]
    pub max_waiting_requests: usize,
    /// How KV blocks are reserved: paged, or (as a baseline for comparison) contiguous
    /// (prompt + max_tokens reserved at admission) or contiguous-max-len.
    #[arg(long, default_value = "paged")]
    pub kv_allocation: KvAllocation,
    /// Compute threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// With `--device cuda`: fraction of the GPU's memory the executor may use; the KV pool gets
    /// what is left of it after the weights are loaded (unless --num-device-blocks is given).
    #[arg(long, default_value_t = 0.9)]
    pub gpu_memory_utilization: f64,
}

/// Bytes the default device pool may take.
const DEFAULT_KV_BYTES: usize = 2 << 30;

impl EngineArgs {
    /// Sets the number of compute threads (once per process).
    pub fn set_threads(&self) -> Result<(), String> {
        if let Some(threads) = self.threads {
            rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build_global()
                .map_err(|e| format!("cannot set {threads} threads: {e}"))?;
        }
        Ok(())
    }

    /// The longest sequence for a model: `--max-model-len`, checked against the model's.
    pub fn max_model_len(&self, config: &ModelConfig) -> Result<usize, String> {
        match self.max_model_len {
            Some(len) if len > config.max_model_len() => {
                Err(format!("--max-model-len {len} exceeds the model's {}", config.max_model_len()))
            }
            Some(0) => Err("--max-model-len must be positive".into()),
            Some(len) => Ok(len),
            None => Ok(config.max_model_len()),
        }
    }

    /// The engine configuration (pool sizes from the flags or the defaults).
    pub fn engine_config(&self, config: &ModelConfig) -> Result<EngineConfig, String> {
        if self.block_size == 0 {
            return Err("--block-size must be positive".into());
        }
        let max_model_len = self.max_model_len(config)?;
        let kv_bytes_per_block = 2 * config.num_layers * config.kv_width() * 4 * self.block_size;
        let needed = self.max_num_seqs * max_model_len.div_ceil(self.block_size);
        let num_device_blocks =
            self.num_device_blocks.unwrap_or_else(|| (DEFAULT_KV_BYTES / kv_bytes_per_block).clamp(1, needed.max(1)));
        let num_host_blocks = self.num_host_blocks.unwrap_or(num_device_blocks);
        Ok(EngineConfig {
            block_size: self.block_size,
            num_device_blocks,
            num_host_blocks,
            max_num_seqs: self.max_num_seqs,
            max_num_batched_tokens: self.max_num_batched_tokens,
            preemption_mode: self.preemption_mode,
            enable_prefix_caching: !self.no_prefix_caching,
            max_waiting_requests: self.max_waiting_requests,
            max_waiting_tokens: usize::MAX,
            max_model_len,
            kv_allocation: self.kv_allocation,
        })
    }

    /// Loads the model and sizes its executor.
    pub fn load_executor(&self) -> Result<(CpuExecutor, EngineConfig), String> {
        let model =
            LlamaModel::load_quantized(&self.model, self.dtype, self.quantization).map_err(|e| e.to_string())?;
        let config = self.engine_config(&model.config)?;
        let cache = CacheConfig {
            block_size: config.block_size,
            num_device_blocks: config.num_device_blocks,
            num_host_blocks: config.num_host_blocks,
        };
        Ok((CpuExecutor::new(model, cache), config))
    }
}

/// Reads `--quantization`: q8_0 or q4_0, in any case.
fn parse_quantization(text: &str) -> Result<QuantKind, String> {
    crate::quant::quantize::TARGETS
        .into_iter()
        .find(|k| k.name().eq_ignore_ascii_case(text))
        .ok_or_else(|| format!("`{text}` is not a quantization this executor makes (q8_0, q4_0)"))
}

/// The model's eos ids: generation_config.json's, else config.json's.
pub fn eos_token_ids(model_dir: &Path, from_config: &[u32]) -> Result<Vec<u32>, String> {
    let from_generation = crate::config::generation_eos_ids(model_dir).map_err(|e| e.to_string())?;
    Ok(from_generation.filter(|ids| !ids.is_empty()).unwrap_or_else(|| from_config.to_vec()))
}
