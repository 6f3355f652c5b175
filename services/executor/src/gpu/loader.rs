//! Loading a model onto a GPU backend in the chosen dtype, sizing the KV pool, and running step
//! plans: [`CudaExecutor`] on an NVIDIA GPU, [`EmulatedExecutor`] over the emulated kernels
//! (`--device emulated`: the same code path on the CPU, for tests and the device check's dry run).

use std::path::PathBuf;

use half::{bf16, f16};
use pagemesh_shared::limits::DEFAULT_MAX_EXECUTOR_BLOCKS;
use pagemesh_shared::{StepOutput, StepPlan};

use super::backend::{GpuElement, KernelBackend};
use super::cuda::CudaBackend;
use super::device::kv_pool_blocks;
use super::emulated::EmulatedBackend;
use super::executor::GpuExecutor;
use super::model::GpuModel;
use crate::config::ModelConfig;
use crate::error::{ExecutorError, Result};
use crate::weights::{WeightDtype, WeightStore};

/// Host (swap) pool when none is given: 4 GiB of blocks, like vLLM's default swap space.
const DEFAULT_SWAP_BYTES: usize = 4 << 30;

/// How to load a model onto a GPU.
#[derive(Debug, Clone)]
pub struct GpuLoadConfig {
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
    /// Which GPU (`--cuda-device`).
    pub cuda_device: usize,
    /// Where CUDA's libraries are looked for first (`--cuda-lib-dir`).
    pub cuda_lib_dir: Option<PathBuf>,
}

/// A GPU executor in one of the three compute dtypes, over backend `B`.
pub enum DtypeExecutor<B: KernelBackend<f32> + KernelBackend<f16> + KernelBackend<bf16>> {
    /// Computing in f32.
    F32(GpuExecutor<f32, B>),
    /// Computing in f16.
    F16(GpuExecutor<f16, B>),
    /// Computing in bf16.
    BF16(GpuExecutor<bf16, B>),
}

/// The executor on an NVIDIA GPU.
pub type CudaExecutor = DtypeExecutor<CudaBackend>;

/// The executor over the emulated kernels.
pub type EmulatedExecutor = DtypeExecutor<EmulatedBackend>;

/// The pools a GPU executor was given.
#[derive(Debug, Clone, Copy)]
pub struct PoolSizes {
    /// KV blocks on the GPU.
    pub device_blocks: usize,
    /// Pinned host blocks.
    pub host_blocks: usize,
}

/// A backend that can be opened for a load, and may report its memory for sizing the pool.
pub trait LoadableBackend: Sized {
    /// Opens the backend for `cfg`.
    fn open(cfg: &GpuLoadConfig) -> Result<Self>;
    /// `(free, total)` device memory in bytes, where the backend has device memory.
    fn memory_budget(&self) -> Result<Option<(usize, usize)>>;
}

impl LoadableBackend for CudaBackend {
    fn open(cfg: &GpuLoadConfig) -> Result<Self> {
        CudaBackend::new(cfg.cuda_device, cfg.cuda_lib_dir.as_deref())
    }

    fn memory_budget(&self) -> Result<Option<(usize, usize)>> {
        self.memory().map(Some)
    }
}

impl LoadableBackend for EmulatedBackend {
    fn open(_cfg: &GpuLoadConfig) -> Result<Self> {
        Ok(EmulatedBackend)
    }

    fn memory_budget(&self) -> Result<Option<(usize, usize)>> {
        Ok(None)
    }
}

impl<B> DtypeExecutor<B>
where
    B: KernelBackend<f32> + KernelBackend<f16> + KernelBackend<bf16> + LoadableBackend,
{
    /// Opens the backend, uploads the model and allocates the pools. `default_device_blocks`
    /// sizes the KV pool of a backend without device memory when `cfg` gives no size.
    pub fn load(cfg: &GpuLoadConfig, default_device_blocks: usize) -> Result<(Self, PoolSizes)> {
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
                let (e, p) = build::<f32, B>(cfg, config, &store, default_device_blocks)?;
                (Self::F32(e), p)
            }
            WeightDtype::F16 => {
                let (e, p) = build::<f16, B>(cfg, config, &store, default_device_blocks)?;
                (Self::F16(e), p)
            }
            WeightDtype::BF16 => {
                let (e, p) = build::<bf16, B>(cfg, config, &store, default_device_blocks)?;
                (Self::BF16(e), p)
            }
        })
    }
}

impl<B: KernelBackend<f32> + KernelBackend<f16> + KernelBackend<bf16>> DtypeExecutor<B> {
    /// Runs one step.
    pub fn execute(&mut self, plan: &StepPlan) -> Result<StepOutput> {
        match self {
            Self::F32(e) => e.execute(plan),
            Self::F16(e) => e.execute(plan),
            Self::BF16(e) => e.execute(plan),
        }
    }
}

fn build<E: GpuElement, B: KernelBackend<E> + LoadableBackend>(
    cfg: &GpuLoadConfig,
    config: ModelConfig,
    store: &WeightStore,
    default_device_blocks: usize,
) -> Result<(GpuExecutor<E, B>, PoolSizes)> {
    let backend = B::open(cfg)?;
    let model = GpuModel::<E, _>::from_store(backend, config, store)?;
    let per_block = model.bytes_per_block(cfg.block_size);
    let device_blocks = match (cfg.num_device_blocks, model.backend().memory_budget()?) {
        (Some(n), _) => n,
        (None, Some((free, total))) => {
            let blocks = kv_pool_blocks(total as u64, free as u64, cfg.gpu_memory_utilization, per_block as u64);
            if blocks == 0 {
                return Err(ExecutorError::Device(format!(
                    "no memory left for the KV cache ({} MiB free of {} MiB after the weights): raise \
                     --gpu-memory-utilization or use a smaller model or dtype",
                    free >> 20,
                    total >> 20
                )));
            }
            blocks
        }
        (None, None) => default_device_blocks,
    };
    let host_blocks = cfg
        .num_host_blocks
        .unwrap_or((DEFAULT_SWAP_BYTES / per_block.max(1)).min(DEFAULT_MAX_EXECUTOR_BLOCKS as usize));
    let executor = GpuExecutor::new(model, cfg.block_size, device_blocks, host_blocks)?;
    Ok((executor, PoolSizes { device_blocks, host_blocks }))
}
