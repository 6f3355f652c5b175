//! What runs an executor's steps ([`StepBackend`]): the CPU executor, a CUDA GPU ([`cuda`]) or
//! the simulated GPU ([`sim`]), chosen with `--device` ([`DeviceArgs`]). The in-process engine
//! and the executor service run any of them.

pub mod cuda;
pub mod sim;

use clap::Args;
use pagemesh_shared::{EngineConfig, SeqId, StepOutput, StepPlan};

use crate::engine_args::EngineArgs;
use crate::{CpuExecutor, ModelConfig};
use sim::{sim_backend, SimArgs};

/// What runs an executor's steps: the model on a device, or a simulation.
pub trait StepBackend: Send {
    /// Runs one step.
    fn execute(&mut self, plan: &StepPlan) -> Result<StepOutput, String>;

    /// After a failed step: the sequences that made it fail, when the backend can tell
    /// (none: the whole step is blamed).
    fn culprits(&self, _plan: &StepPlan) -> Vec<SeqId> {
        Vec::new()
    }
}

impl StepBackend for CpuExecutor {
    fn execute(&mut self, plan: &StepPlan) -> Result<StepOutput, String> {
        CpuExecutor::execute(self, plan).map_err(|e| e.to_string())
    }

    fn culprits(&self, plan: &StepPlan) -> Vec<SeqId> {
        CpuExecutor::culprits(self, plan)
    }
}

impl StepBackend for Box<dyn StepBackend> {
    fn execute(&mut self, plan: &StepPlan) -> Result<StepOutput, String> {
        (**self).execute(plan)
    }

    fn culprits(&self, plan: &StepPlan) -> Vec<SeqId> {
        (**self).culprits(plan)
    }
}

/// The device flags of `pagemesh executor`, `pagemesh serve` and `pagemesh generate`.
#[derive(Args, Debug, Clone)]
pub struct DeviceArgs {
    /// Backend: cpu, cuda (an NVIDIA GPU; see docs/cuda.md), emulated (the CUDA code path with
    /// its kernels emulated on the CPU: slow, for tests), or sim (a simulated GPU: no weights,
    /// cost-model step times).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// With `--device cuda`: which GPU, numbered as the driver does.
    #[arg(long, default_value_t = 0)]
    pub cuda_device: usize,
    /// With `--device cuda`: a directory holding cuBLAS and NVRTC (CUDA 13 or 12), searched
    /// before the usual places (also `PAGEMESH_CUDA_LIB_DIR`).
    #[arg(long)]
    pub cuda_lib_dir: Option<std::path::PathBuf>,
    #[command(flatten)]
    pub sim: SimArgs,
}

impl DeviceArgs {
    /// The backend of an executor for `args`' model on this device, and its engine config.
    /// Its `max_model_len` fits the pool it got (see [`EngineArgs::fit_max_model_len`]).
    pub fn executor_backend(&self, args: &EngineArgs) -> Result<(Box<dyn StepBackend>, EngineConfig), String> {
        let (backend, mut config) = self.unfitted_backend(args)?;
        config.max_model_len = args.fit_max_model_len(config.max_model_len, config.num_device_blocks)?;
        Ok((backend, config))
    }

    fn unfitted_backend(&self, args: &EngineArgs) -> Result<(Box<dyn StepBackend>, EngineConfig), String> {
        if let Some(kind) = args.quantization.filter(|_| self.device != "cpu") {
            return Err(format!(
                "--quantization {} runs on the CPU backend only (--device {} loads weights as f32/f16/bf16)",
                kind.name().to_ascii_lowercase(),
                self.device
            ));
        }
        match self.device.as_str() {
            "cpu" => {
                let (executor, config) = args.load_executor()?;
                Ok((Box::new(executor), config))
            }
            "sim" => {
                let model_config = ModelConfig::load(&args.model).map_err(|e| e.to_string())?;
                let base = args.engine_config(&model_config)?;
                let (backend, num_device_blocks, num_host_blocks) = sim_backend(
                    &self.sim,
                    base.block_size,
                    args.num_device_blocks,
                    base.max_num_batched_tokens,
                    model_config.vocab_size,
                )?;
                let num_host_blocks = args.num_host_blocks.unwrap_or(num_host_blocks);
                Ok((Box::new(backend), EngineConfig { num_device_blocks, num_host_blocks, ..base }))
            }
            "cuda" => cuda::cuda_executor(args, self),
            "emulated" => cuda::emulated_executor(args, self),
            other => Err(format!("unknown --device {other} (this build supports: cpu, cuda, emulated, sim)")),
        }
    }
}
