//! The step runner of the GPU path: what [`CpuExecutor`](crate::CpuExecutor) does on the CPU —
//! swaps, copies, one forward pass, sampling — over a [`KernelBackend`].

use std::collections::HashMap;

use pagemesh_shared::{SeqId, StepOutput, StepPlan};

use super::backend::{GpuElement, KernelBackend};
use super::model::{GpuCache, GpuModel};
use crate::error::Result;
use crate::executor::{sample_results, validate_plan, PlanLimits, StepRows};

/// A model and its paged cache on a backend, running step plans.
pub struct GpuExecutor<E: GpuElement, B: KernelBackend<E>> {
    model: GpuModel<E, B>,
    cache: GpuCache<E, B>,
    histories: HashMap<SeqId, Vec<u32>>,
}

impl<E: GpuElement, B: KernelBackend<E>> GpuExecutor<E, B> {
    /// An executor with a cache of the given pool sizes.
    pub fn new(model: GpuModel<E, B>, block_size: usize, device_blocks: usize, host_blocks: usize) -> Result<Self> {
        let cache = model.new_cache(block_size, device_blocks, host_blocks)?;
        Ok(Self { model, cache, histories: HashMap::new() })
    }

    /// The model.
    pub fn model(&self) -> &GpuModel<E, B> {
        &self.model
    }

    /// Runs one step: swap-out, swap-in and copies (ordered before the forward pass on the
    /// backend), the forward pass, and sampling with the CPU backend's semantics.
    pub fn execute(&mut self, plan: &StepPlan) -> Result<StepOutput> {
        let c = &self.model.config;
        let limits = PlanLimits {
            device_blocks: self.cache.num_blocks,
            host_blocks: self.cache.num_host_blocks,
            block_size: self.cache.shape.block_size,
            vocab_size: c.vocab_size,
            max_model_len: c.max_model_len(),
        };
        validate_plan(plan, &limits)?;
        for id in &plan.released {
            self.histories.remove(id);
        }
        let backend = self.model.backend();
        if !plan.swap_out.is_empty() {
            self.cache.swap_out(backend, &plan.swap_out)?;
        }
        if !plan.swap_in.is_empty() {
            self.cache.swap_in(backend, &plan.swap_in)?;
        }
        if !plan.copy.is_empty() {
            self.cache.copy_blocks(backend, &plan.copy)?;
        }
        if plan.seqs.is_empty() {
            return Ok(StepOutput { step_id: plan.step_id, results: Vec::new() });
        }
        let rows = StepRows::build(plan, self.cache.shape.block_size, &mut self.histories);
        let logits = self.model.forward(&rows.batch(), &mut self.cache)?;
        let results = sample_results(plan, &logits, self.model.config.vocab_size, &self.histories);
        Ok(StepOutput { step_id: plan.step_id, results })
    }
}
