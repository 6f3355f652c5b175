//! `--device`: what runs an executor's steps (the CPU backend, a CUDA GPU, or the `sim`
//! backend), and the backend built from it.

use crate::ModelConfig;
use clap::Args;
use pagemesh_shared::EngineConfig;

use super::actor::StepBackend;
use super::sim_executor::{sim_backend, SimArgs};
use crate::engine_args::EngineArgs;

/// The device flags of `pagemesh executor` and `pagemesh serve`.
#[derive(Args, Debug, Clone)]
pub struct DeviceArgs {
    /// Backend: cpu, cuda (an NVIDIA GPU; see docs/cuda.md), or sim (a simulated GPU: no
    /// weights, cost-model step times).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    #[command(flatten)]
    pub sim: SimArgs,
}

impl DeviceArgs {
    /// The backend of an executor for `args`' model on this device, and its engine config.
    pub fn executor_backend(&self, args: &EngineArgs) -> Result<(Box<dyn StepBackend>, EngineConfig), String> {
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
            "cuda" => super::cuda_device::cuda_executor(args),
            other => Err(format!("unknown --device {other} (this build supports: cpu, cuda, sim)")),
        }
    }
}
