//! `check_invariants`: consistency of queues, sequences and block tables.

use crate::block_manager::Location;

use super::group::GroupState;
use super::Scheduler;

impl Scheduler {
    /// Checks the scheduler's and the block manager's invariants (O(pool + sequences);
    /// meant for tests and debugging):
    ///
    /// * every block is free (or evictable-cached with reference count 0) or referenced,
    ///   never both, and its reference count equals its block-table references;
    /// * every request is in exactly the queue its state names, each queue ordered by
    ///   arrival; the waiting-token tally is exact;
    /// * waiting sequences hold no blocks; running ones hold device blocks and swapped
    ///   ones host blocks covering every known token but possibly the newest (whose slot
    ///   is taken when it is fed), with at least one token left to compute;
    /// * running requests take at most `max_num_seqs` sequence slots;
    /// * with nothing unfinished, every device and host block is free and nothing is held.
    pub fn check_invariants(&self) -> Result<(), String> {
        self.blocks.check_invariants()?;
        let queues = [
            (GroupState::Waiting, self.waiting.iter().copied().collect::<Vec<_>>()),
            (GroupState::Running, self.running.clone()),
            (GroupState::Swapped, self.swapped.iter().copied().collect::<Vec<_>>()),
        ];
        let mut queued = 0;
        for (state, queue) in &queues {
            let mut last_arrival = None;
            for id in queue {
                let g = self.groups.get(id).ok_or_else(|| format!("queued request {id} does not exist"))?;
                if g.state != *state {
                    return Err(format!("request {id} is {:?} but queued as {state:?}", g.state));
                }
                if last_arrival.is_some_and(|a| a >= g.arrival) {
                    return Err(format!("{state:?} queue is not ordered by arrival at request {id}"));
                }
                last_arrival = Some(g.arrival);
            }
            queued += queue.len();
        }
        if queued != self.groups.len() {
            return Err(format!("{} requests but {queued} queue entries", self.groups.len()));
        }
        let waiting_tokens: usize = self.waiting.iter().map(|id| self.groups[id].prompt_len).sum();
        if waiting_tokens != self.waiting_prompt_tokens {
            return Err(format!(
                "waiting token tally {} but the queue holds {waiting_tokens}",
                self.waiting_prompt_tokens
            ));
        }
        let slots: usize = self.running.iter().map(|id| self.groups[id].slots()).sum();
        if slots > self.config.max_num_seqs {
            return Err(format!("running requests take {slots} sequence slots, over max_num_seqs"));
        }
        let mut live_total = 0;
        for (&id, g) in &self.groups {
            if g.request_id != id {
                return Err(format!("request {} is stored under id {id}", g.request_id));
            }
            let live = g.live().count();
            if live != g.num_live || live == 0 {
                return Err(format!("request {id}: {live} live sequences, tally {}", g.num_live));
            }
            if !g.forked && g.seqs.len() != 1 {
                return Err(format!("request {id} has not forked but has {} sequences", g.seqs.len()));
            }
            live_total += live;
            for idx in g.live() {
                let seq = &g.seqs[idx];
                let sid = seq.seq_id;
                if self.seq_owner.get(&sid) != Some(&(id, idx)) {
                    return Err(format!("sequence {sid} of request {id} is not indexed"));
                }
                if seq.tokens.len() < g.prompt_len || seq.remaining() == 0 {
                    return Err(format!("sequence {sid}: {} tokens, {} computed", seq.tokens.len(), seq.num_computed));
                }
                let location = self.blocks.location(sid);
                let expected = match g.state {
                    GroupState::Waiting => None,
                    GroupState::Running => Some(Location::Device),
                    GroupState::Swapped => Some(Location::Host),
                };
                if location != expected {
                    return Err(format!("sequence {sid} of a {:?} request has blocks in {location:?}", g.state));
                }
                if g.state == GroupState::Waiting {
                    if seq.num_computed != 0 {
                        return Err(format!("waiting sequence {sid} has computed tokens"));
                    }
                    continue;
                }
                let table = self.blocks.block_table(sid).map_or(0, <[u32]>::len);
                let covered = table * self.config.block_size;
                // A prefilling sequence's blocks cover all its known tokens (admission
                // allocates them); a decoding one's may lack the newest token's slot.
                let must_cover = if seq.remaining() > 1 { seq.tokens.len() } else { seq.tokens.len() - 1 };
                if covered < must_cover {
                    return Err(format!("sequence {sid}: {table} blocks do not cover its {} tokens", seq.tokens.len()));
                }
            }
        }
        if live_total != self.seq_owner.len() || live_total != self.blocks.num_seqs() + self.waiting_seqs() {
            return Err(format!(
                "{live_total} live sequences, {} indexed, {} with blocks",
                self.seq_owner.len(),
                self.blocks.num_seqs()
            ));
        }
        if self.swapped.is_empty() && self.blocks.num_free_host_blocks() != self.blocks.num_host_blocks() {
            return Err("nothing is swapped but host blocks are in use".into());
        }
        if self.groups.is_empty() && self.blocks.num_free_device_blocks() != self.blocks.num_device_blocks() {
            return Err("nothing is unfinished but device blocks are in use".into());
        }
        Ok(())
    }

    fn waiting_seqs(&self) -> usize {
        self.waiting.iter().map(|id| self.groups[id].num_live).sum()
    }
}
