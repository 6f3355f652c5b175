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
    /// Weight dtype to compute with: auto (as stored), f32 / float32, f16 / float16 / half, or
    /// bf16 / bfloat16.
    #[arg(long, default_value = "auto")]
    pub dtype: DtypeChoice,
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
    #[arg(long, visible_alias = "num-gpu-blocks-override")]
    pub num_device_blocks: Option<usize>,
    /// KV blocks in the host (swap) pool (default: as many as the device pool).
    #[arg(long, conflicts_with = "swap_space")]
    pub num_host_blocks: Option<usize>,
    /// Host (swap) pool size in GiB, as vLLM's `--swap-space` (instead of --num-host-blocks).
    #[arg(long, value_parser = parse_swap_space)]
    pub swap_space: Option<f64>,
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
    #[arg(long, visible_alias = "no-enable-prefix-caching", overrides_with = "enable_prefix_caching")]
    pub no_prefix_caching: bool,
    /// Keep automatic prefix caching on (the default; vLLM's spelling).
    #[arg(long, overrides_with = "no_prefix_caching")]
    pub enable_prefix_caching: bool,
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

    /// `max_model_len`, held to what a pool of `num_device_blocks` can hold, so that one
    /// sequence of the longest length always fits (a request that leaves `max_tokens` out runs
    /// to the end of the context). A length the user chose with `--max-model-len` that does not
    /// fit stops the start with the numbers; the model's own is lowered, with a warning.
    pub fn fit_max_model_len(&self, max_model_len: usize, num_device_blocks: usize) -> Result<usize, String> {
        let pool_tokens = num_device_blocks.saturating_mul(self.block_size);
        if pool_tokens >= max_model_len {
            return Ok(max_model_len);
        }
        let needed = max_model_len.div_ceil(self.block_size);
        let numbers = format!(
            "one sequence of {max_model_len} tokens needs {needed} KV blocks of {} tokens and the KV pool \
             has {num_device_blocks}",
            self.block_size
        );
        match self.max_model_len {
            Some(_) => Err(format!(
                "--max-model-len {max_model_len} does not fit: {numbers}; raise --num-device-blocks (or \
                 --gpu-memory-utilization on a GPU) or lower --max-model-len"
            )),
            None => {
                tracing::warn!(
                    "the model's context of {max_model_len} tokens does not fit the KV pool ({numbers}): serving \
                     at most {pool_tokens} tokens per sequence (set --max-model-len, or give the pool more blocks)"
                );
                Ok(pool_tokens.max(1))
            }
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
        let num_host_blocks = match self.swap_space {
            Some(gib) => (gib * (1u64 << 30) as f64 / kv_bytes_per_block as f64) as usize,
            None => self.num_host_blocks.unwrap_or(num_device_blocks),
        };
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
            LlamaModel::load_quantized(&self.model, self.dtype.0, self.quantization).map_err(|e| e.to_string())?;
        let mut config = self.engine_config(&model.config)?;
        config.max_model_len = self.fit_max_model_len(config.max_model_len, config.num_device_blocks)?;
        let cache = CacheConfig {
            block_size: config.block_size,
            num_device_blocks: config.num_device_blocks,
            num_host_blocks: config.num_host_blocks,
        };
        Ok((CpuExecutor::new(model, cache), config))
    }
}

/// `--dtype`: a weight dtype, or none (`auto`: as stored).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DtypeChoice(pub Option<WeightDtype>);

impl std::str::FromStr for DtypeChoice {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "auto" => Ok(Self(None)),
            other => other.parse().map(|d| Self(Some(d))).map_err(|e: String| format!("{e}, or auto")),
        }
    }
}

/// Reads `--swap-space`: GiB, finite and not negative.
fn parse_swap_space(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(gib) if gib.is_finite() && (0.0..=1_048_576.0).contains(&gib) => Ok(gib),
        _ => Err(format!("`{text}` is not a size in GiB (0 to 1048576)")),
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

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Flags {
        #[command(flatten)]
        engine: EngineArgs,
    }

    fn flags(line: &str) -> EngineArgs {
        Flags::try_parse_from(std::iter::once("x").chain(line.split_whitespace())).expect("flags").engine
    }

    #[test]
    fn a_context_the_pool_cannot_hold_is_lowered_unless_the_user_chose_it() {
        let model_len = flags("--model m --block-size 16");
        assert_eq!(model_len.fit_max_model_len(512, 32), Ok(512));
        assert_eq!(model_len.fit_max_model_len(512, 8), Ok(128));
        let chosen = flags("--model m --block-size 16 --max-model-len 512");
        let error = chosen.fit_max_model_len(512, 8).expect_err("does not fit");
        assert!(error.contains("--max-model-len 512") && error.contains("32 KV blocks") && error.contains("has 8"));
        assert_eq!(chosen.fit_max_model_len(512, 32), Ok(512));
    }

    #[test]
    fn vllm_spellings_are_accepted() {
        let args = flags("--model m --dtype auto --num-gpu-blocks-override 40 --no-enable-prefix-caching");
        assert_eq!((args.dtype, args.num_device_blocks, args.no_prefix_caching), (DtypeChoice(None), Some(40), true));
        assert_eq!(flags("--model m --dtype bfloat16").dtype, DtypeChoice(Some(WeightDtype::BF16)));
        assert!(!flags("--model m --no-enable-prefix-caching --enable-prefix-caching").no_prefix_caching);
        let config = crate::ModelConfig {
            num_layers: 2,
            ..crate::ModelConfig::load(Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../../models/stories260K")))
                .expect("stories260K config")
        };
        let per_block = 2 * 2 * config.kv_width() * 4 * 16;
        let engine = flags("--model m --swap-space 0.5").engine_config(&config).expect("config");
        assert_eq!(engine.num_host_blocks, (1 << 29) / per_block);
        assert!(Flags::try_parse_from(["x", "--model", "m", "--swap-space", "-1"]).is_err());
        assert!(Flags::try_parse_from(["x", "--model", "m", "--swap-space", "1", "--num-host-blocks", "3"]).is_err());
        assert!(Flags::try_parse_from(["x", "--model", "m", "--dtype", "int3"]).is_err());
    }
}
