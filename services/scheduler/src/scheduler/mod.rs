//! The continuous-batching scheduler: a pure state machine that turns requests into
//! [`StepPlan`]s and executor [`StepOutput`]s into per-token [`RequestEvent`]s.
//!
//! * `admission`: `add_request` checks.
//! * `step`: `schedule`, building one step (running decodes, prefill chunks, swap-ins,
//!   admissions, preemption).
//! * `output`: `process_output`, sampling results, forks and stop checks.
//! * `invariants`: `check_invariants`.
//!
//! [`StepPlan`]: pagemesh_shared::StepPlan
//! [`StepOutput`]: pagemesh_shared::StepOutput

mod admission;
mod group;
mod invariants;
mod output;
mod step;
#[cfg(test)]
mod tests;

use std::collections::VecDeque;

use pagemesh_shared::{EngineConfig, FinishReason, SeqId};

use crate::block_manager::BlockManager;
use crate::id_map::IdMap;
use crate::request::RequestEvent;
use crate::stats::{BlockUsage, KvOccupancy, SchedulerStats};
use group::{Group, GroupState};

/// What the plan in flight scheduled for one sequence.
#[derive(Debug, Clone)]
struct InFlightSeq {
    seq_id: SeqId,
    /// Positions `.. end` are computed once the step is done.
    end: usize,
    /// Whether it sampled.
    sampled: bool,
}

/// The plan handed out by `schedule` and not yet answered.
#[derive(Debug, Clone)]
struct InFlight {
    step_id: u64,
    seqs: Vec<InFlightSeq>,
}

/// FCFS continuous-batching scheduler over a paged KV cache (see the crate docs).
#[derive(Debug, Clone)]
pub struct Scheduler {
    config: EngineConfig,
    eos_token_ids: Vec<u32>,
    blocks: BlockManager,
    groups: IdMap<u64, Group>,
    /// Live sequence → (request id, index in its group).
    seq_owner: IdMap<SeqId, (u64, usize)>,
    /// Request ids, ordered by arrival.
    waiting: VecDeque<u64>,
    /// Request ids, ordered by arrival.
    running: Vec<u64>,
    /// Request ids, ordered by arrival.
    swapped: VecDeque<u64>,
    waiting_prompt_tokens: usize,
    next_seq_id: SeqId,
    next_arrival: u64,
    next_step_id: u64,
    /// Sequences to put in the next plan's `released`.
    pending_released: Vec<SeqId>,
    in_flight: Option<InFlight>,
    stats: SchedulerStats,
}

/// Checks the parts of an [`EngineConfig`] the scheduler cannot work without.
pub fn validate_config(config: &EngineConfig) -> Result<(), String> {
    if config.block_size == 0 {
        return Err("block_size must be at least 1".into());
    }
    if config.max_num_seqs == 0 {
        return Err("max_num_seqs must be at least 1".into());
    }
    if config.max_num_batched_tokens == 0 {
        return Err("max_num_batched_tokens must be at least 1".into());
    }
    if config.num_device_blocks >= u32::MAX as usize || config.num_host_blocks >= u32::MAX as usize {
        return Err("block pools must hold fewer than 2^32 - 1 blocks".into());
    }
    Ok(())
}

impl Scheduler {
    /// A scheduler with empty queues and pools; `eos_token_ids` are the model's end
    /// tokens.
    ///
    /// # Panics
    /// If [`validate_config`] rejects `config`.
    pub fn new(config: EngineConfig, eos_token_ids: Vec<u32>) -> Self {
        if let Err(e) = validate_config(&config) {
            panic!("invalid engine config: {e}");
        }
        // The contiguous baselines model systems without block sharing.
        let prefix_caching = config.enable_prefix_caching && !config.kv_allocation.is_contiguous();
        let blocks =
            BlockManager::new(config.block_size, config.num_device_blocks, config.num_host_blocks, prefix_caching);
        Self {
            config,
            eos_token_ids,
            blocks,
            groups: IdMap::default(),
            seq_owner: IdMap::default(),
            waiting: VecDeque::new(),
            running: Vec::new(),
            swapped: VecDeque::new(),
            waiting_prompt_tokens: 0,
            next_seq_id: 0,
            next_arrival: 0,
            next_step_id: 1,
            pending_released: Vec::new(),
            in_flight: None,
            stats: SchedulerStats::default(),
        }
    }

    /// The configuration it runs with.
    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    /// Whether any request is waiting, running or swapped.
    pub fn has_unfinished_requests(&self) -> bool {
        !self.groups.is_empty()
    }

    /// Requests waiting for admission (new or preempted by recompute).
    pub fn num_waiting(&self) -> usize {
        self.waiting.len()
    }

    /// Requests running (holding device blocks).
    pub fn num_running(&self) -> usize {
        self.running.len()
    }

    /// Requests swapped out to host blocks.
    pub fn num_swapped(&self) -> usize {
        self.swapped.len()
    }

    /// Cumulative counters.
    pub fn stats(&self) -> &SchedulerStats {
        &self.stats
    }

    /// Pool occupancy now.
    pub fn block_usage(&self) -> BlockUsage {
        BlockUsage {
            device_total: self.blocks.num_device_blocks(),
            device_free: self.blocks.num_free_device_blocks(),
            host_total: self.blocks.num_host_blocks(),
            host_free: self.blocks.num_free_host_blocks(),
        }
    }

    /// Token slots of device blocks in use, and how many of them hold a token whose K/V is
    /// computed or being computed by the plan in flight (shared blocks counted once).
    pub fn kv_occupancy(&self) -> KvOccupancy {
        let bs = self.config.block_size;
        let in_flight: IdMap<SeqId, usize> =
            self.in_flight.iter().flat_map(|f| f.seqs.iter().map(|s| (s.seq_id, s.end))).collect();
        let mut filled_per_block = vec![0u32; self.blocks.num_device_blocks()];
        for gid in &self.running {
            let group = &self.groups[gid];
            for seq in group.live().map(|i| &group.seqs[i]) {
                let filled = in_flight.get(&seq.seq_id).copied().unwrap_or(seq.num_computed);
                let table = self.blocks.block_table(seq.seq_id).unwrap_or(&[]);
                for (i, &block) in table.iter().enumerate() {
                    let in_block = filled.saturating_sub(i * bs).min(bs) as u32;
                    let slot = &mut filled_per_block[block as usize];
                    *slot = (*slot).max(in_block);
                }
            }
        }
        let used_blocks = self.blocks.num_device_blocks() - self.blocks.num_free_device_blocks();
        KvOccupancy {
            allocated_slots: used_blocks * bs,
            filled_slots: filled_per_block.iter().map(|&n| n as usize).sum(),
        }
    }

    /// The block manager (read-only), for inspection.
    pub fn block_manager(&self) -> &BlockManager {
        &self.blocks
    }

    /// The request an unfinished sequence belongs to.
    pub fn request_of(&self, seq_id: SeqId) -> Option<u64> {
        self.seq_owner.get(&seq_id).map(|&(r, _)| r)
    }

    /// Aborts a request: one `Abort` event per unfinished sample, its blocks are freed at
    /// once and its sequences are released in the next plan. Empty if the request is
    /// unknown or finished. Results for it in the output of a plan already in flight are
    /// ignored.
    pub fn abort_request(&mut self, request_id: u64) -> Vec<RequestEvent> {
        let Some(group) = self.groups.remove(&request_id) else {
            return Vec::new();
        };
        let event =
            |sample_index| RequestEvent { request_id, sample_index, token: None, finish: Some(FinishReason::Abort) };
        let events: Vec<RequestEvent> = if group.forked {
            group.seqs.iter().filter(|s| !s.finished).map(|s| event(s.sample_index)).collect()
        } else {
            (0..group.params.n as u32).map(event).collect()
        };
        for seq in group.seqs.iter().filter(|s| !s.finished) {
            self.blocks.free(seq.seq_id);
            self.seq_owner.remove(&seq.seq_id);
            if seq.executor_knows {
                self.pending_released.push(seq.seq_id);
            }
        }
        match group.state {
            GroupState::Waiting => {
                self.waiting.retain(|&r| r != request_id);
                self.waiting_prompt_tokens -= group.prompt_len;
            }
            GroupState::Running => self.running.retain(|&r| r != request_id),
            GroupState::Swapped => self.swapped.retain(|&r| r != request_id),
        }
        events
    }

    /// Marks sequence `idx` of request `gid` finished: frees its blocks and releases it.
    fn finish_seq(&mut self, gid: u64, idx: usize) {
        let group = self.groups.get_mut(&gid).expect("finishing a sequence of a live request");
        let seq = &mut group.seqs[idx];
        if seq.finished {
            return;
        }
        seq.finished = true;
        group.num_live -= 1;
        self.blocks.free(seq.seq_id);
        self.seq_owner.remove(&seq.seq_id);
        if seq.executor_knows {
            seq.executor_knows = false;
            self.pending_released.push(seq.seq_id);
        }
    }

    /// Inserts request `gid` into the running queue, keeping it ordered by arrival.
    fn insert_running(&mut self, gid: u64) {
        let arrival = self.groups[&gid].arrival;
        let pos = self.running.partition_point(|id| self.groups[id].arrival < arrival);
        self.running.insert(pos, gid);
    }

    /// Inserts request `gid` into the waiting queue, keeping it ordered by arrival.
    fn insert_waiting(&mut self, gid: u64) {
        let arrival = self.groups[&gid].arrival;
        let pos = self.waiting.partition_point(|id| self.groups[id].arrival < arrival);
        self.waiting.insert(pos, gid);
    }

    /// Inserts request `gid` into the swapped queue, keeping it ordered by arrival.
    fn insert_swapped(&mut self, gid: u64) {
        let arrival = self.groups[&gid].arrival;
        let pos = self.swapped.partition_point(|id| self.groups[id].arrival < arrival);
        self.swapped.insert(pos, gid);
    }
}
