//! [`SimExecutor`]: answers step plans with pseudo-random tokens and a simulated duration.

use std::collections::HashSet;

use pagemesh_shared::{SampledToken, SeqId, SeqResult, StepOutput, StepPlan};

use crate::cost::{CostModel, StepCost};
use crate::rng::mix;

/// Token ids below this are never emitted (padding, BOS, EOS in Llama vocabularies).
const FIRST_ORDINARY_TOKEN: u32 = 3;

/// The token the sim emits for sample `sample_index` of a request with random stream
/// `seed` after `output_len` generated tokens: a hash of the three, over the ordinary
/// tokens `3 .. vocab_size`, skipping `banned` ones. It never depends on the batch.
pub fn sim_token(seed: u64, sample_index: u32, output_len: usize, banned: &[u32], vocab_size: u32) -> u32 {
    let span = vocab_size.saturating_sub(FIRST_ORDINARY_TOKEN).max(1);
    let h = mix(seed ^ mix(((sample_index as u64) << 40) ^ output_len as u64));
    let mut token = FIRST_ORDINARY_TOKEN + (h % span as u64) as u32;
    for _ in 0..span {
        if !banned.contains(&token) {
            break;
        }
        token = FIRST_ORDINARY_TOKEN + (token - FIRST_ORDINARY_TOKEN + 1) % span;
    }
    token
}

/// A weightless executor: the scheduler's plans run for real (block tables, swaps and
/// copies are checked against the pool sizes), tokens follow [`sim_token`], and each step
/// takes the time the [`CostModel`] gives.
#[derive(Debug, Clone)]
pub struct SimExecutor {
    cost: CostModel,
    vocab_size: u32,
    num_device_blocks: usize,
    num_host_blocks: usize,
    /// Sequences the scheduler has fed and not released.
    known: HashSet<SeqId>,
}

impl SimExecutor {
    /// A sim executor for `cost`'s model and GPU with pools of the given sizes.
    pub fn new(cost: CostModel, num_device_blocks: usize, num_host_blocks: usize) -> Self {
        let vocab_size = cost.model.vocab_size as u32;
        Self { cost, vocab_size, num_device_blocks, num_host_blocks, known: HashSet::new() }
    }

    /// Emits ids of a vocabulary of `vocab_size` tokens instead of the simulated model's
    /// (so that a real tokenizer can decode them).
    pub fn with_vocab_size(mut self, vocab_size: usize) -> Self {
        self.vocab_size = vocab_size.min(u32::MAX as usize) as u32;
        self
    }

    /// The cost model.
    pub fn cost_model(&self) -> &CostModel {
        &self.cost
    }

    /// Sequences fed and not yet released.
    pub fn num_tracked_sequences(&self) -> usize {
        self.known.len()
    }

    /// Runs `plan`: its tokens and its simulated cost. Errors on a plan that names blocks
    /// outside the pools or positions its block table does not cover (a scheduler bug).
    pub fn execute(&mut self, plan: &StepPlan) -> Result<(StepOutput, StepCost), String> {
        let (dev, host) = (self.num_device_blocks as u32, self.num_host_blocks as u32);
        let in_pools = |pairs: &[(u32, u32)], src: u32, dst: u32| pairs.iter().all(|&(a, b)| a < src && b < dst);
        if !in_pools(&plan.swap_out, dev, host)
            || !in_pools(&plan.swap_in, host, dev)
            || !in_pools(&plan.copy, dev, dev)
        {
            return Err(format!("step {}: a block copy names a block outside the pools", plan.step_id));
        }
        for id in &plan.released {
            self.known.remove(id);
        }
        let block_size = self.cost.block_size;
        let mut results = Vec::new();
        for seq in &plan.seqs {
            let end = seq.start_pos + seq.tokens.len();
            if seq.block_table.len() * block_size < end || seq.block_table.iter().any(|&b| b >= dev) {
                return Err(format!("step {}: sequence {} has a bad block table", plan.step_id, seq.seq_id));
            }
            self.known.insert(seq.seq_id);
            if let Some(spec) = &seq.sample {
                let samples = (0..spec.num_samples)
                    .map(|i| SampledToken {
                        token: sim_token(
                            spec.seed,
                            spec.sample_index + i,
                            spec.output_len,
                            &spec.banned_tokens,
                            self.vocab_size,
                        ),
                        logprob: None,
                        top_logprobs: Vec::new(),
                    })
                    .collect();
                results.push(SeqResult { seq_id: seq.seq_id, samples });
            }
        }
        Ok((StepOutput { step_id: plan.step_id, results }, self.cost.step_cost(plan)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_depend_on_seed_sample_and_position_only_and_avoid_banned_and_special_ids() {
        let a: Vec<u32> = (0..50).map(|p| sim_token(11, 0, p, &[], 32000)).collect();
        let b: Vec<u32> = (0..50).map(|p| sim_token(11, 0, p, &[], 32000)).collect();
        let other: Vec<u32> = (0..50).map(|p| sim_token(11, 1, p, &[], 32000)).collect();
        assert_eq!(a, b);
        assert_ne!(a, other);
        assert!(a.iter().all(|&t| (3..32000).contains(&t)));
        let t = sim_token(5, 0, 0, &[], 10);
        let banned = sim_token(5, 0, 0, &[t], 10);
        assert_ne!(banned, t);
        assert!((3..10).contains(&banned));
    }
}
