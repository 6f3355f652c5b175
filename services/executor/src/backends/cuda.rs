//! `--device cuda` for `pagemesh executor` and `pagemesh serve`: the check that runs before
//! anything else (before NATS, before the model loads), so that a machine without an NVIDIA
//! driver, cuBLAS or a GPU gets a clear error and a non-zero exit, never a panic; and the
//! executor on the GPU as a step backend.

use crate::gpu::device::{probe_cuda, Device};
use crate::gpu::{CudaExecutor, CudaExecutorConfig};
use pagemesh_shared::{EngineConfig, StepOutput, StepPlan};

use super::StepBackend;
use crate::engine_args::EngineArgs;

/// Checks the device flags before anything starts: for `cuda`, the memory fraction and that
/// the driver, cuBLAS and a GPU are there.
pub fn check_device(device: &str, args: &EngineArgs) -> Result<(), String> {
    let Ok(Device::Cuda) = device.parse::<Device>() else {
        return Ok(());
    };
    check_utilization(args.gpu_memory_utilization)?;
    probe_cuda().map_err(|e| e.to_string())
}

fn check_utilization(fraction: f64) -> Result<(), String> {
    if fraction > 0.0 && fraction <= 1.0 {
        Ok(())
    } else {
        Err(format!("--gpu-memory-utilization {fraction} is not in (0, 1]"))
    }
}

impl StepBackend for CudaExecutor {
    fn execute(&mut self, plan: &StepPlan) -> Result<StepOutput, String> {
        CudaExecutor::execute(self, plan).map_err(|e| e.to_string())
    }
}

/// The executor on GPU 0 and its engine config (pool sizes as the GPU allows).
pub fn cuda_executor(args: &EngineArgs) -> Result<(Box<dyn StepBackend>, EngineConfig), String> {
    check_utilization(args.gpu_memory_utilization)?;
    let model_config = crate::ModelConfig::load(&args.model).map_err(|e| e.to_string())?;
    let base = args.engine_config(&model_config)?;
    let cfg = CudaExecutorConfig {
        model_dir: args.model.clone(),
        dtype: args.dtype,
        block_size: base.block_size,
        num_device_blocks: args.num_device_blocks,
        num_host_blocks: args.num_host_blocks,
        gpu_memory_utilization: args.gpu_memory_utilization,
    };
    let (executor, pools) = CudaExecutor::load(&cfg).map_err(|e| e.to_string())?;
    eprintln!("cuda: {} KV blocks on the GPU, {} pinned host blocks", pools.device_blocks, pools.host_blocks);
    let engine = EngineConfig { num_device_blocks: pools.device_blocks, num_host_blocks: pools.host_blocks, ..base };
    Ok((Box::new(executor), engine))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_fractions_are_refused() {
        assert!(check_utilization(0.9).is_ok());
        assert!(check_utilization(1.0).is_ok());
        let err = check_utilization(1.5).unwrap_err();
        assert!(err.contains("--gpu-memory-utilization"), "{err}");
        assert!(check_utilization(0.0).is_err());
    }

    #[test]
    fn without_a_gpu_cuda_is_an_error_not_a_panic() {
        // On a machine with no NVIDIA driver the probe fails with a message naming the flag.
        if let Err(e) = probe_cuda() {
            assert!(e.to_string().contains("--device cuda"), "{e}");
        }
    }
}
