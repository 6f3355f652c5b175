//! The `sim` device of `pagemesh executor`: a [`SimExecutor`] behind the executor service.
//!
//! It registers and answers steps like any executor, without weights: tokens follow the sim
//! rule (valid ids of the served model's vocabulary), and each step sleeps the time the
//! cost model gives for the named model on the named GPU, times `--sim-time-scale`.

use std::time::Duration;

use clap::Args;
use pagemesh_shared::{StepOutput, StepPlan};
use pagemesh_sim::{presets, CostModel, SimExecutor};

use super::StepBackend;

/// Flags of the `sim` device.
#[derive(Args, Debug, Clone)]
pub struct SimArgs {
    /// With `--device sim`: the model shape whose step times are simulated (llama-2-7b,
    /// llama-2-13b, llama-3-8b, chatglm3-6b).
    #[arg(long, default_value = "llama-2-7b")]
    pub sim_model: String,
    /// With `--device sim`: the GPU simulated (a100-80gb, a100-40gb, h100-80gb, rtx4090-24gb, a10-24gb).
    #[arg(long, default_value = "a100-80gb")]
    pub sim_gpu: String,
    /// With `--device sim`: real seconds slept per simulated second (0: answer at once).
    #[arg(long, default_value_t = 1.0)]
    pub sim_time_scale: f64,
    /// With `--device sim`: share of the simulated GPU's memory for weights and KV blocks.
    #[arg(long, default_value_t = 0.9)]
    pub sim_gpu_memory_utilization: f64,
}

/// A sim executor that sleeps its simulated step times.
pub struct SimBackend {
    executor: SimExecutor,
    time_scale: f64,
}

impl StepBackend for SimBackend {
    fn execute(&mut self, plan: &StepPlan) -> Result<StepOutput, String> {
        let (output, cost) = self.executor.execute(plan)?;
        let sleep = cost.seconds * self.time_scale;
        if sleep > 0.0 {
            std::thread::sleep(Duration::from_secs_f64(sleep));
        }
        Ok(output)
    }
}

/// Pool sizes and the backend for `args`: `block_size` tokens per block, `num_device_blocks`
/// when given (else what the simulated GPU holds), tokens drawn from `vocab_size` ids.
pub fn sim_backend(
    args: &SimArgs,
    block_size: usize,
    num_device_blocks: Option<usize>,
    max_num_batched_tokens: usize,
    vocab_size: usize,
) -> Result<(SimBackend, usize, usize), String> {
    if !(args.sim_time_scale >= 0.0 && args.sim_time_scale.is_finite()) {
        return Err("--sim-time-scale must be a finite number of at least 0".into());
    }
    if !(args.sim_gpu_memory_utilization > 0.0 && args.sim_gpu_memory_utilization <= 1.0) {
        return Err("--sim-gpu-memory-utilization must be in (0, 1]".into());
    }
    let cost = CostModel::new(presets::gpu(&args.sim_gpu)?, presets::model(&args.sim_model)?, block_size);
    let pools = cost.pool_sizes(args.sim_gpu_memory_utilization, max_num_batched_tokens, 4 << 30)?;
    let device = num_device_blocks.unwrap_or(pools.num_device_blocks);
    let executor = SimExecutor::new(cost, device, pools.num_host_blocks).with_vocab_size(vocab_size);
    Ok((SimBackend { executor, time_scale: args.sim_time_scale }, device, pools.num_host_blocks))
}
