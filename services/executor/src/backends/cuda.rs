//! `--device cuda` (and `--device emulated`, the same GPU code path over the emulated kernels)
//! for `pagemesh executor`, `pagemesh serve`, `pagemesh generate` and `pagemesh bench engine`:
//! the check that runs before anything else (before NATS, before the model loads), so that a
//! machine without an NVIDIA driver, cuBLAS or a GPU gets a clear error and a non-zero exit,
//! never a panic; and the GPU executors as step backends.

use crate::gpu::device::{probe_cuda, Device};
use crate::gpu::{CudaExecutor, DtypeExecutor, EmulatedExecutor, GpuLoadConfig, KernelBackend};
use half::{bf16, f16};
use pagemesh_shared::{EngineConfig, StepOutput, StepPlan};

use super::{DeviceArgs, StepBackend};
use crate::engine_args::EngineArgs;

/// Checks the device flags before anything starts: for `cuda`, the memory fraction and that
/// the driver, cuBLAS, NVRTC and a GPU are there.
pub fn check_device(device: &DeviceArgs, args: &EngineArgs) -> Result<(), String> {
    let Ok(Device::Cuda) = device.device.parse::<Device>() else {
        return Ok(());
    };
    check_utilization(args.gpu_memory_utilization)?;
    probe_cuda(device.cuda_lib_dir.as_deref()).map_err(|e| e.to_string())
}

fn check_utilization(fraction: f64) -> Result<(), String> {
    if fraction > 0.0 && fraction <= 1.0 {
        Ok(())
    } else {
        Err(format!("--gpu-memory-utilization {fraction} is not in (0, 1]"))
    }
}

impl<B> StepBackend for DtypeExecutor<B>
where
    B: KernelBackend<f32> + KernelBackend<f16> + KernelBackend<bf16> + Send,
    DtypeExecutor<B>: Send,
{
    fn execute(&mut self, plan: &StepPlan) -> Result<StepOutput, String> {
        DtypeExecutor::execute(self, plan).map_err(|e| e.to_string())
    }
}

fn load_config(args: &EngineArgs, device: &DeviceArgs, block_size: usize) -> GpuLoadConfig {
    GpuLoadConfig {
        model_dir: args.model.clone(),
        dtype: args.dtype.0,
        block_size,
        num_device_blocks: args.num_device_blocks,
        num_host_blocks: args.num_host_blocks,
        gpu_memory_utilization: args.gpu_memory_utilization,
        cuda_device: device.cuda_device,
        cuda_lib_dir: device.cuda_lib_dir.clone(),
    }
}

/// The executor on the GPU `--cuda-device` names and its engine config (pool sizes as the GPU
/// allows).
pub fn cuda_executor(args: &EngineArgs, device: &DeviceArgs) -> Result<(Box<dyn StepBackend>, EngineConfig), String> {
    check_utilization(args.gpu_memory_utilization)?;
    let model_config = crate::ModelConfig::load(&args.model).map_err(|e| e.to_string())?;
    let base = args.engine_config(&model_config)?;
    let cfg = load_config(args, device, base.block_size);
    let (executor, pools) = CudaExecutor::load(&cfg, base.num_device_blocks).map_err(|e| e.to_string())?;
    tracing::info!(
        "cuda: GPU {}: {} KV blocks on the GPU, {} pinned host blocks",
        device.cuda_device,
        pools.device_blocks,
        pools.host_blocks
    );
    let engine = EngineConfig { num_device_blocks: pools.device_blocks, num_host_blocks: pools.host_blocks, ..base };
    Ok((Box::new(executor), engine))
}

/// The GPU code path over the emulated kernels (`--device emulated`): pools as the CPU
/// executor's unless the flags size them.
pub fn emulated_executor(
    args: &EngineArgs,
    device: &DeviceArgs,
) -> Result<(Box<dyn StepBackend>, EngineConfig), String> {
    let model_config = crate::ModelConfig::load(&args.model).map_err(|e| e.to_string())?;
    let base = args.engine_config(&model_config)?;
    let mut cfg = load_config(args, device, base.block_size);
    cfg.num_host_blocks = Some(args.num_host_blocks.unwrap_or(base.num_host_blocks));
    let (executor, pools) = EmulatedExecutor::load(&cfg, base.num_device_blocks).map_err(|e| e.to_string())?;
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
        if let Err(e) = probe_cuda(None) {
            assert!(e.to_string().contains("--device cuda"), "{e}");
        }
    }
}
