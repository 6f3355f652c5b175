//! `schedule`: building one step.
//!
//! A step is built in four passes, each under the same token budget
//! (`max_num_batched_tokens`):
//!
//! 1. decode tokens of running sequences, oldest request first; a sequence whose next
//!    token needs a block that is not free preempts the newest running request (possibly
//!    its own) until it fits;
//! 2. prefill chunks of running sequences still prefilling, oldest first;
//! 3. swapped requests are swapped back in, oldest first, while blocks allow;
//! 4. when nothing is swapped, waiting requests are admitted FCFS while sequence slots,
//!    blocks and budget allow; the first that does not fit stops admission.
//!
//! Passes 3 and 4 are skipped in a step that preempted. Admission allocates blocks for
//! every known token of a sequence, so prefill chunks never need new blocks; only decode
//! tokens do, and only they trigger preemption.

use pagemesh_shared::{BlockId, PreemptionMode, ScheduledSeq, SeqId, StepPlan};

use crate::block_manager::BlockManager;

use super::group::{Group, GroupState};
use super::{InFlight, InFlightSeq, Scheduler};

/// The step being built.
struct StepBuilder {
    budget: usize,
    decodes: Vec<ScheduledSeq>,
    prefills: Vec<ScheduledSeq>,
    swap_out: Vec<(BlockId, BlockId)>,
    swap_in: Vec<(BlockId, BlockId)>,
    copy: Vec<(BlockId, BlockId)>,
    released: Vec<SeqId>,
    preempted: bool,
    /// Sequence slots taken by running requests.
    slots: usize,
}

/// One sequence's share of the step: positions `start .. end` of sequence `idx`.
#[derive(Debug, Clone, Copy)]
struct Pick {
    idx: usize,
    seq_id: SeqId,
    start: usize,
    end: usize,
}

impl Scheduler {
    /// Builds the next step, or `None` when there is nothing to run (or a plan is still in
    /// flight: every plan must be answered with [`process_output`](Self::process_output)
    /// before the next is scheduled).
    pub fn schedule(&mut self) -> Option<StepPlan> {
        if self.in_flight.is_some() {
            return None;
        }
        let slots = self.running.iter().map(|id| self.groups[id].slots()).sum();
        let mut b = StepBuilder {
            budget: self.config.max_num_batched_tokens,
            decodes: Vec::new(),
            prefills: Vec::new(),
            swap_out: Vec::new(),
            swap_in: Vec::new(),
            copy: Vec::new(),
            released: std::mem::take(&mut self.pending_released),
            preempted: false,
            slots,
        };
        self.schedule_decodes(&mut b);
        self.schedule_prefills(&mut b);
        if !b.preempted {
            self.schedule_swapped(&mut b);
            if self.swapped.is_empty() {
                self.schedule_waiting(&mut b);
            }
        }
        if b.decodes.is_empty() && b.prefills.is_empty() && b.swap_out.is_empty() && b.swap_in.is_empty() {
            debug_assert!(b.copy.is_empty(), "copies only come with scheduled sequences");
            self.pending_released = b.released;
            return None;
        }
        let mut seqs = b.decodes;
        seqs.append(&mut b.prefills);
        let step_id = self.next_step_id;
        self.next_step_id += 1;
        self.in_flight = Some(InFlight {
            step_id,
            seqs: seqs
                .iter()
                .map(|s| InFlightSeq {
                    seq_id: s.seq_id,
                    end: s.start_pos + s.tokens.len(),
                    sampled: s.sample.is_some(),
                })
                .collect(),
        });
        let st = &mut self.stats;
        st.steps += 1;
        st.blocks_swapped_out += b.swap_out.len() as u64;
        st.blocks_swapped_in += b.swap_in.len() as u64;
        st.blocks_copied += b.copy.len() as u64;
        let used = self.blocks.num_device_blocks() - self.blocks.num_free_device_blocks();
        st.peak_device_blocks_used = st.peak_device_blocks_used.max(used);
        Some(StepPlan { step_id, swap_out: b.swap_out, swap_in: b.swap_in, copy: b.copy, released: b.released, seqs })
    }

    /// Pass 1: one decode token per running sequence that has exactly one token left,
    /// oldest request first, preempting the newest requests when blocks run out.
    fn schedule_decodes(&mut self, b: &mut StepBuilder) {
        let mut picks = Vec::new();
        let mut appends = Vec::new();
        let mut i = 0;
        while i < self.running.len() && b.budget > 0 {
            let gid = self.running[i];
            let group = &self.groups[&gid];
            picks.clear();
            for idx in group.live() {
                if picks.len() == b.budget {
                    break;
                }
                let seq = &group.seqs[idx];
                if seq.remaining() == 1 {
                    let start = seq.num_computed;
                    picks.push(Pick { idx, seq_id: seq.seq_id, start, end: start + 1 });
                }
            }
            if picks.is_empty() {
                i += 1;
                continue;
            }
            appends.clear();
            appends.extend(picks.iter().map(|p| (p.seq_id, p.start, p.end)));
            let cost = self.blocks.append_cost(&appends);
            let mut preempted_self = false;
            while self.blocks.num_free_device_blocks() < cost {
                let victim = *self.running.last().expect("the running queue holds the request being scheduled");
                self.preempt(victim, b);
                if victim == gid {
                    preempted_self = true;
                    break;
                }
            }
            if preempted_self {
                // It was the newest: every older request has been visited.
                break;
            }
            let group = self.groups.get_mut(&gid).expect("running request exists");
            for p in &picks {
                self.blocks
                    .append_slots(p.seq_id, p.start, p.end, &mut b.copy)
                    .expect("blocks were reserved for these decode tokens");
                b.decodes.push(make_entry(group, p, &self.blocks));
                b.budget -= 1;
            }
            i += 1;
        }
    }

    /// Pass 2: prefill chunks of running sequences with more than one token left.
    fn schedule_prefills(&mut self, b: &mut StepBuilder) {
        for i in 0..self.running.len() {
            if b.budget == 0 {
                break;
            }
            let gid = self.running[i];
            let group = self.groups.get_mut(&gid).expect("running request exists");
            for idx in 0..group.seqs.len() {
                if b.budget == 0 {
                    break;
                }
                let seq = &group.seqs[idx];
                if seq.finished || seq.remaining() < 2 {
                    continue;
                }
                let start = seq.num_computed;
                let p = Pick { idx, seq_id: seq.seq_id, start, end: start + seq.remaining().min(b.budget) };
                self.blocks
                    .append_slots(p.seq_id, p.start, p.end, &mut b.copy)
                    .expect("a prefilling sequence's blocks are allocated at admission");
                b.prefills.push(make_entry(group, &p, &self.blocks));
                b.budget -= p.end - p.start;
            }
        }
    }

    /// Pass 3: swaps requests back in, oldest first, while slots, budget and blocks allow.
    fn schedule_swapped(&mut self, b: &mut StepBuilder) {
        while let Some(&gid) = self.swapped.front() {
            let group = &self.groups[&gid];
            if b.budget == 0 || b.slots + group.slots() > self.config.max_num_seqs {
                break;
            }
            let picks = pick_tokens(group, b.budget);
            let seq_ids = group.live_ids();
            let appends: Vec<_> = picks.iter().map(|p| (p.seq_id, p.start, p.end)).collect();
            let cost = self.blocks.swap_in_cost(&seq_ids) + self.blocks.append_cost(&appends);
            if self.blocks.num_free_device_blocks() < cost {
                break;
            }
            self.swapped.pop_front();
            let pairs = self.blocks.swap_in(&seq_ids).expect("device blocks for the swap-in were counted");
            b.swap_in.extend(pairs);
            self.run_group(gid, &picks, b);
        }
    }

    /// Pass 4: admits waiting requests FCFS while slots, budget and blocks allow.
    fn schedule_waiting(&mut self, b: &mut StepBuilder) {
        // Keep a little headroom for running decodes (as vLLM's watermark) unless the
        // device would otherwise sit idle.
        let watermark = if self.running.is_empty() { 0 } else { self.config.num_device_blocks / 100 };
        while let Some(&gid) = self.waiting.front() {
            let group = &self.groups[&gid];
            if b.budget == 0 || b.slots + group.slots() > self.config.max_num_seqs {
                break;
            }
            let reserved = self.reserved_len(group.prompt_len + group.params.max_tokens);
            let cost: usize = group
                .live()
                .map(|i| self.blocks.allocation_cost(&group.seqs[i].tokens).max(self.blocks.blocks_for(reserved)))
                .sum();
            if self.blocks.num_free_device_blocks() < cost + watermark || !self.allocate_group(gid) {
                break;
            }
            self.waiting.pop_front();
            let group = &self.groups[&gid];
            self.waiting_prompt_tokens -= group.prompt_len;
            let picks = pick_tokens(group, b.budget);
            self.run_group(gid, &picks, b);
        }
    }

    /// Gives every live sequence of a waiting request its device blocks (sharing cached
    /// prefixes), or nothing at all.
    fn allocate_group(&mut self, gid: u64) -> bool {
        let group = &self.groups[&gid];
        let reserved = self.reserved_len(group.prompt_len + group.params.max_tokens);
        let group = self.groups.get_mut(&gid).expect("waiting request exists");
        let live: Vec<usize> = group.live().collect();
        let (mut queried, mut hit) = (0, 0);
        for (n, &idx) in live.iter().enumerate() {
            let seq = &mut group.seqs[idx];
            let allocated = self.blocks.allocate(seq.seq_id, &seq.tokens);
            let reservation = match allocated {
                Ok(_) => self.blocks.reserve(seq.seq_id, reserved),
                Err(_) => Ok(()),
            };
            if reservation.is_err() {
                self.blocks.free(seq.seq_id);
            }
            match allocated.and_then(|cached| reservation.map(|()| cached)) {
                Ok(cached) => {
                    seq.num_computed = cached;
                    queried += seq.tokens.len() as u64;
                    hit += cached as u64;
                }
                Err(_) => {
                    for &done in &live[..n] {
                        let seq = &mut group.seqs[done];
                        self.blocks.free(seq.seq_id);
                        seq.num_computed = 0;
                    }
                    return false;
                }
            }
        }
        if self.blocks.prefix_caching() {
            self.stats.prefix_cache_queried_tokens += queried;
            self.stats.prefix_cache_hit_tokens += hit;
        }
        true
    }

    /// Moves a request that now holds device blocks into the running queue and schedules
    /// `picks` for it.
    fn run_group(&mut self, gid: u64, picks: &[Pick], b: &mut StepBuilder) {
        self.insert_running(gid);
        let group = self.groups.get_mut(&gid).expect("request exists");
        group.state = GroupState::Running;
        b.slots += group.slots();
        for p in picks {
            self.blocks
                .append_slots(p.seq_id, p.start, p.end, &mut b.copy)
                .expect("blocks for these tokens were counted");
            let entry = make_entry(group, p, &self.blocks);
            if p.end - p.start == 1 {
                b.decodes.push(entry);
            } else {
                b.prefills.push(entry);
            }
            b.budget -= p.end - p.start;
        }
    }

    /// Preempts running request `gid`: swaps it out when the mode is swap and the host
    /// pool has room, else frees its blocks and sends it back to the waiting queue.
    fn preempt(&mut self, gid: u64, b: &mut StepBuilder) {
        let pos = self.running.iter().rposition(|&r| r == gid).expect("the victim is running");
        self.running.remove(pos);
        b.preempted = true;
        let group = self.groups.get_mut(&gid).expect("running request exists");
        b.slots -= group.slots();
        let seq_ids = group.live_ids();
        let swap = self.config.preemption_mode == PreemptionMode::Swap
            && self.blocks.swap_out_cost(&seq_ids) <= self.blocks.num_free_host_blocks();
        if swap {
            let pairs = self.blocks.swap_out(&seq_ids).expect("host blocks for the swap-out were counted");
            b.swap_out.extend(pairs);
            group.state = GroupState::Swapped;
            self.stats.preemptions_swap += 1;
            self.insert_swapped(gid);
        } else {
            for seq in group.seqs.iter_mut().filter(|s| !s.finished) {
                self.blocks.free(seq.seq_id);
                seq.num_computed = 0;
                seq.needs_history = true;
                if seq.executor_knows {
                    seq.executor_knows = false;
                    b.released.push(seq.seq_id);
                }
            }
            group.state = GroupState::Waiting;
            self.waiting_prompt_tokens += group.prompt_len;
            self.stats.preemptions_recompute += 1;
            self.insert_waiting(gid);
        }
    }
}

/// What a request joining the step runs: decode tokens first, then prefill chunks, within
/// `budget` tokens.
fn pick_tokens(group: &Group, mut budget: usize) -> Vec<Pick> {
    let mut picks = Vec::new();
    for decode in [true, false] {
        for idx in group.live() {
            let seq = &group.seqs[idx];
            if budget == 0 || (seq.remaining() == 1) != decode {
                continue;
            }
            let n = seq.remaining().min(budget);
            picks.push(Pick { idx, seq_id: seq.seq_id, start: seq.num_computed, end: seq.num_computed + n });
            budget -= n;
        }
    }
    picks
}

/// The plan entry for `p`: the tokens fed, the block table covering them, the history
/// when the executor lacks it, and a sample spec when the chunk ends at the last known
/// token.
fn make_entry(group: &mut Group, p: &Pick, blocks: &BlockManager) -> ScheduledSeq {
    let sample = (p.end == group.seqs[p.idx].tokens.len()).then(|| group.sample_spec(p.idx));
    let seq = &mut group.seqs[p.idx];
    let history = if seq.needs_history {
        seq.needs_history = false;
        Some(seq.tokens[..p.start].to_vec())
    } else {
        None
    };
    seq.executor_knows = true;
    let table = blocks.block_table(p.seq_id).expect("a scheduled sequence has a block table");
    ScheduledSeq {
        seq_id: p.seq_id,
        tokens: seq.tokens[p.start..p.end].to_vec(),
        start_pos: p.start,
        block_table: table[..blocks.blocks_for(p.end)].to_vec(),
        history,
        sample,
    }
}
