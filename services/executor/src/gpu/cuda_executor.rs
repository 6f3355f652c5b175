//! The executor on a GPU: loading a model onto [`CudaBackend`] in the chosen dtype, sizing the
//! KV pool from the memory left after the weights, and running step plans.

use std::path::PathBuf;

use half::{bf16, f16};
use pagemesh_shared::{StepOutput, StepPlan};

use super::backend::GpuElement;
use super::cuda::CudaBackend;
use super::device::kv_pool_blocks;
use super::executor::GpuExecutor;
use super::model::GpuModel;
use crate::config::ModelConfig;
use crate::error::{ExecutorError, Result};
use crate::weights::{WeightDtype, WeightStore};

/// Host (swap) pool when none is given: 4 GiB of blocks, like vLLM's default swap space.
const DEFAULT_SWAP_BYTES: usize = 4 << 30;

/// How to load a model onto GPU 0.
#[derive(Debug, Clone)]
pub struct CudaExecutorConfig {
    /// The model directory.
    pub model_dir: PathBuf,
    /// Compute dtype (default: the stored one).
    pub dtype: Option<WeightDtype>,
    /// Tokens per KV block.
    pub block_size: usize,
    /// KV blocks on the GPU (default: from `gpu_memory_utilization`).
    pub num_device_blocks: Option<usize>,
    /// Blocks of pinned host memory for swapped-out sequences (default: 4 GiB of them).
    pub num_host_blocks: Option<usize>,
    /// Fraction of the GPU's memory the executor may use, weights included.
    pub gpu_memory_utilization: f64,
}

/// A GPU executor in one of the three compute dtypes.
pub enum CudaExecutor {
    /// Computing in f32.
    F32(GpuExecutor<f32, CudaBackend>),
    /// Computing in f16.
    F16(GpuExecutor<f16, CudaBackend>),
    /// Computing in bf16.
    BF16(GpuExecutor<bf16, CudaBackend>),
}

/// The pools a [`CudaExecutor`] was given.
#[derive(Debug, Clone, Copy)]
pub struct PoolSizes {
    /// KV blocks on the GPU.
    pub device_blocks: usize,
    /// Pinned host blocks.
    pub host_blocks: usize,
}

impl CudaExecutor {
    /// Opens GPU 0, uploads the model and allocates the pools.
    pub fn load(cfg: &CudaExecutorConfig) -> Result<(Self, PoolSizes)> {
        if !(cfg.gpu_memory_utilization > 0.0 && cfg.gpu_memory_utilization <= 1.0) {
            return Err(ExecutorError::Config(format!(
                "--gpu-memory-utilization {} is not in (0, 1]",
                cfg.gpu_memory_utilization
            )));
        }
        let config = ModelConfig::load(&cfg.model_dir)?;
        let store = WeightStore::open(&cfg.model_dir)?;
        let dtype = cfg.dtype.or_else(|| store.dtype_of("model.embed_tokens.weight")).unwrap_or(WeightDtype::BF16);
        Ok(match dtype {
            WeightDtype::F32 => {
                let (e, p) = build::<f32>(cfg, config, &store)?;
                (Self::F32(e), p)
            }
            WeightDtype::F16 => {
                let (e, p) = build::<f16>(cfg, config, &store)?;
                (Self::F16(e), p)
            }
            WeightDtype::BF16 => {
                let (e, p) = build::<bf16>(cfg, config, &store)?;
                (Self::BF16(e), p)
            }
        })
    }

    /// Runs one step.
    pub fn execute(&mut self, plan: &StepPlan) -> Result<StepOutput> {
        match self {
            Self::F32(e) => e.execute(plan),
            Self::F16(e) => e.execute(plan),
            Self::BF16(e) => e.execute(plan),
        }
    }
}

fn build<E: GpuElement>(
    cfg: &CudaExecutorConfig,
    config: ModelConfig,
    store: &WeightStore,
) -> Result<(GpuExecutor<E, CudaBackend>, PoolSizes)>
where
    cudarc::cublas::CudaBlas: cudarc::cublas::Gemm<E>,
{
    let backend = CudaBackend::new(0)?;
    let model = GpuModel::<E, _>::from_store(backend, config, store)?;
    let per_block = model.bytes_per_block(cfg.block_size);
    let (free, total) = model.backend().memory()?;
    let device_blocks = cfg
        .num_device_blocks
        .unwrap_or_else(|| kv_pool_blocks(total as u64, free as u64, cfg.gpu_memory_utilization, per_block as u64));
    if device_blocks == 0 {
        return Err(ExecutorError::Device(format!(
            "no memory left for the KV cache ({} MiB free of {} MiB after the weights): raise \
             --gpu-memory-utilization or use a smaller model or dtype",
            free >> 20,
            total >> 20
        )));
    }
    let host_blocks = cfg.num_host_blocks.unwrap_or(DEFAULT_SWAP_BYTES / per_block.max(1));
    let executor = GpuExecutor::new(model, cfg.block_size, device_blocks, host_blocks)?;
    Ok((executor, PoolSizes { device_blocks, host_blocks }))
}
