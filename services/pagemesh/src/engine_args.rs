//! Engine flags shared by the commands that run a model.

use std::path::{Path, PathBuf};

use clap::Args;
use pagemesh_engine::Engine;
use pagemesh_executor::{CacheConfig, Executor, WeightDtype};
use pagemesh_shared::{EngineConfig, PreemptionMode};

/// How to load the model and size the engine.
#[derive(Args, Debug, Clone)]
pub struct EngineArgs {
    /// Hugging Face model directory (config.json, *.safetensors, tokenizer.json).
    #[arg(long)]
    pub model: PathBuf,
    /// Weight dtype to compute with: f32, f16 or bf16 (default: as stored).
    #[arg(long)]
    pub dtype: Option<WeightDtype>,
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
    /// Compute threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
}

/// Bytes the default device pool may take.
const DEFAULT_KV_BYTES: usize = 2 << 30;

impl EngineArgs {
    /// Sets the compute threads, loads the model and builds the engine.
    pub fn build(&self) -> Result<Engine, String> {
        if let Some(threads) = self.threads {
            rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build_global()
                .map_err(|e| format!("cannot set {threads} threads: {e}"))?;
        }
        if self.block_size == 0 {
            return Err("--block-size must be positive".into());
        }
        let model =
            pagemesh_executor::cpu::model::LlamaModel::load(&self.model, self.dtype).map_err(|e| e.to_string())?;
        let c = &model.config;
        let max_model_len = match self.max_model_len {
            Some(len) if len > c.max_model_len() => {
                return Err(format!("--max-model-len {len} exceeds the model's {}", c.max_model_len()))
            }
            Some(len) => len,
            None => c.max_model_len(),
        };
        let kv_bytes_per_block = 2 * c.num_layers * c.kv_width() * 4 * self.block_size;
        let needed = self.max_num_seqs * max_model_len.div_ceil(self.block_size);
        let num_device_blocks =
            self.num_device_blocks.unwrap_or_else(|| (DEFAULT_KV_BYTES / kv_bytes_per_block).clamp(1, needed.max(1)));
        let num_host_blocks = self.num_host_blocks.unwrap_or(num_device_blocks);
        let config = EngineConfig {
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
        };
        let eos = eos_token_ids(&self.model, &model.config.eos_token_ids)?;
        let cache = CacheConfig { block_size: self.block_size, num_device_blocks, num_host_blocks };
        Ok(Engine::new(Executor::new(model, cache), config, eos))
    }
}

/// The model's eos ids: generation_config.json's, else config.json's.
pub fn eos_token_ids(model_dir: &Path, from_config: &[u32]) -> Result<Vec<u32>, String> {
    let from_generation = pagemesh_executor::config::generation_eos_ids(model_dir).map_err(|e| e.to_string())?;
    Ok(from_generation.filter(|ids| !ids.is_empty()).unwrap_or_else(|| from_config.to_vec()))
}
