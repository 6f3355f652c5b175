//! The cost model: the duration of a step on a GPU, and the KV pool its memory holds.
//!
//! A step's time is a roofline over the batch the scheduler sent:
//!
//! * **FLOPs**: 2 × (decoder weights) per token fed, 2 × vocab × hidden per sampled
//!   sequence (logits are computed for the last position only), and 4 × heads × head_dim ×
//!   context per token per layer for attention (QKᵀ and PV);
//! * **bytes**: every weight read once, each scheduled sequence's K/V read once over its
//!   context, the new tokens' K/V written;
//! * time = max(FLOPs / (matmul rate × [`MATMUL_EFFICIENCY`]), bytes / (bandwidth ×
//!   [`BANDWIDTH_EFFICIENCY`])) + [`STEP_OVERHEAD_S`], plus swapped blocks over the host
//!   link before the step.

use pagemesh_shared::StepPlan;
use serde::Serialize;

use crate::presets::{GpuSpec, ModelShape};

/// Fraction of the peak matmul rate dense layers reach.
pub const MATMUL_EFFICIENCY: f64 = 0.6;
/// Fraction of the peak memory bandwidth streaming kernels reach.
pub const BANDWIDTH_EFFICIENCY: f64 = 0.8;
/// Fixed time per step (kernel launches, sampling, scheduling), seconds.
pub const STEP_OVERHEAD_S: f64 = 1e-3;

/// What a step costs, and why.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct StepCost {
    /// Floating-point operations.
    pub flops: f64,
    /// Device memory traffic in bytes.
    pub bytes: f64,
    /// Host ↔ device bytes of swaps.
    pub swap_bytes: f64,
    /// Simulated duration, seconds.
    pub seconds: f64,
}

/// How large the KV pools are on a GPU.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct PoolSizes {
    /// Device KV blocks.
    pub num_device_blocks: usize,
    /// Host (swap) KV blocks.
    pub num_host_blocks: usize,
}

/// A model on a GPU.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CostModel {
    /// The GPU.
    pub gpu: GpuSpec,
    /// The model.
    pub model: ModelShape,
    /// Tokens per KV block.
    pub block_size: usize,
}

impl CostModel {
    /// The cost model of `model` on `gpu` with KV blocks of `block_size` tokens.
    pub fn new(gpu: &GpuSpec, model: &ModelShape, block_size: usize) -> Self {
        Self { gpu: gpu.clone(), model: model.clone(), block_size }
    }

    /// Bytes of one KV block.
    pub fn block_bytes(&self) -> u64 {
        self.model.kv_bytes_per_token() * self.block_size as u64
    }

    /// Pools sized as vLLM does: `gpu_memory_utilization` of device memory, less the
    /// weights and the activations of a `max_num_batched_tokens` step, holds device blocks;
    /// `swap_space_bytes` of host memory holds host blocks. Errors when the weights do not
    /// fit.
    pub fn pool_sizes(
        &self,
        gpu_memory_utilization: f64,
        max_num_batched_tokens: usize,
        swap_space_bytes: u64,
    ) -> Result<PoolSizes, String> {
        let m = &self.model;
        let budget = self.gpu.memory_bytes as f64 * gpu_memory_utilization;
        // Peak activations: the MLP's gate and up outputs and the logits, in f32.
        let activations = (max_num_batched_tokens * (2 * m.intermediate_size + m.vocab_size) * 4) as f64;
        let free = budget - m.weight_bytes() as f64 - activations;
        let block_bytes = self.block_bytes() as f64;
        if free < block_bytes {
            return Err(format!(
                "{} ({:.1} GB of weights) leaves no room for KV blocks in {:.0}% of the {} ({:.1} GB)",
                m.name,
                m.weight_bytes() as f64 / 1e9,
                gpu_memory_utilization * 100.0,
                self.gpu.name,
                self.gpu.memory_bytes as f64 / 1e9
            ));
        }
        Ok(PoolSizes {
            num_device_blocks: (free / block_bytes) as usize,
            num_host_blocks: (swap_space_bytes / self.block_bytes()) as usize,
        })
    }

    /// What running `plan` costs.
    pub fn step_cost(&self, plan: &StepPlan) -> StepCost {
        let m = &self.model;
        let kv_per_token = m.kv_bytes_per_token() as f64;
        let dense_per_token = 2.0 * (m.num_layers as u64 * m.layer_params()) as f64;
        let head = 2.0 * (m.vocab_size * m.hidden_size) as f64;
        let attn_per_context = 4.0 * (m.num_heads * m.head_dim * m.num_layers) as f64;
        let mut flops = 0.0;
        let mut bytes = 0.0;
        for seq in &plan.seqs {
            let n = seq.tokens.len() as f64;
            let start = seq.start_pos as f64;
            let end = start + n;
            flops += dense_per_token * n;
            if seq.sample.is_some() {
                flops += head;
            }
            // Token at position p attends to p + 1 positions: Σ over start..end.
            flops += attn_per_context * (n * (start + end + 1.0) / 2.0);
            bytes += kv_per_token * (end + n);
        }
        if !plan.seqs.is_empty() {
            // Weights are read once per step (the embedding table only for the fed rows).
            bytes += (m.weight_bytes() - (m.vocab_size * m.hidden_size * m.dtype_bytes) as u64) as f64;
        }
        let swap_bytes = ((plan.swap_in.len() + plan.swap_out.len()) as u64 * self.block_bytes()) as f64;
        let compute_s = flops / (self.gpu.matmul_flops * MATMUL_EFFICIENCY);
        let memory_s = bytes / (self.gpu.memory_bandwidth * BANDWIDTH_EFFICIENCY);
        let forward_s = if plan.seqs.is_empty() { 0.0 } else { compute_s.max(memory_s) + STEP_OVERHEAD_S };
        let seconds = forward_s + swap_bytes / self.gpu.host_bandwidth;
        StepCost { flops, bytes, swap_bytes, seconds }
    }
}

#[cfg(test)]
mod tests {
    use pagemesh_shared::{SampleSpec, SamplingParams, ScheduledSeq};

    use super::*;
    use crate::presets::{gpu, model};

    fn seq(start_pos: usize, len: usize) -> ScheduledSeq {
        ScheduledSeq {
            seq_id: 0,
            tokens: vec![5; len],
            start_pos,
            block_table: Vec::new(),
            history: None,
            sample: Some(SampleSpec {
                params: SamplingParams::default().into(),
                seed: 0,
                sample_index: 0,
                num_samples: 1,
                prompt_len: 1,
                output_len: 0,
                banned_tokens: Vec::new(),
            }),
        }
    }

    fn cost_model() -> CostModel {
        CostModel::new(gpu("a100-80gb").expect("preset"), model("llama-2-13b").expect("preset"), 16)
    }

    #[test]
    fn a_small_decode_batch_is_bound_by_reading_the_weights() {
        let cm = cost_model();
        let plan = StepPlan { seqs: vec![seq(100, 1)], ..StepPlan::default() };
        let cost = cm.step_cost(&plan);
        let weights_s = 26.0e9 / (2.039e12 * BANDWIDTH_EFFICIENCY);
        assert!((cost.seconds - STEP_OVERHEAD_S - weights_s).abs() / weights_s < 0.02, "{cost:?}");
    }

    #[test]
    fn a_long_prefill_is_bound_by_compute_and_grows_with_its_length() {
        let cm = cost_model();
        let short = cm.step_cost(&StepPlan { seqs: vec![seq(0, 1024)], ..StepPlan::default() });
        let long = cm.step_cost(&StepPlan { seqs: vec![seq(0, 2048)], ..StepPlan::default() });
        let compute_s = long.flops / (312e12 * MATMUL_EFFICIENCY);
        assert!((long.seconds - STEP_OVERHEAD_S - compute_s).abs() < 1e-9, "compute-bound: {long:?}");
        assert!(long.seconds > 1.9 * (short.seconds - STEP_OVERHEAD_S), "{short:?} {long:?}");
    }

    #[test]
    fn decode_time_grows_with_the_context_read_from_the_kv_cache() {
        let cm = cost_model();
        let batch = |context| StepPlan { seqs: (0..64).map(|_| seq(context, 1)).collect(), ..StepPlan::default() };
        let short = cm.step_cost(&batch(100));
        let long = cm.step_cost(&batch(1000));
        let extra_bytes = 64.0 * 900.0 * 819_200.0;
        assert!((long.bytes - short.bytes - extra_bytes).abs() < 1.0, "{short:?} {long:?}");
        assert!(long.seconds > short.seconds);
    }

    #[test]
    fn pools_take_what_the_weights_leave_of_the_memory() {
        let cm = cost_model();
        let sizes = cm.pool_sizes(0.9, 2048, 4 << 30).expect("13B fits an 80 GB card");
        let kv_bytes = sizes.num_device_blocks as f64 * cm.block_bytes() as f64;
        let expected = 0.9 * 80.0 * (1u64 << 30) as f64 - cm.model.weight_bytes() as f64;
        assert!(kv_bytes < expected && kv_bytes > expected - 1.5e9, "{kv_bytes} vs {expected}");
        assert_eq!(sizes.num_host_blocks, (4usize << 30) / (819_200 * 16));
        // 40 GB: the same weights leave 40 GiB less for K/V.
        let half = CostModel::new(gpu("a100-40gb").expect("preset"), model("llama-2-13b").expect("preset"), 16);
        let half_sizes = half.pool_sizes(0.9, 2048, 4 << 30).expect("13B fits a 40 GB card");
        let lost_bytes = (sizes.num_device_blocks - half_sizes.num_device_blocks) as f64 * cm.block_bytes() as f64;
        assert!((lost_bytes - 0.9 * 40.0 * (1u64 << 30) as f64).abs() < 2.0 * cm.block_bytes() as f64, "{lost_bytes}");
        let small = CostModel::new(gpu("24gb").expect("preset"), model("llama-2-13b").expect("preset"), 16);
        let err = small.pool_sizes(0.9, 2048, 0).expect_err("26 GB of weights do not fit 24 GB");
        assert!(err.contains("no room"), "{err}");
    }
}
