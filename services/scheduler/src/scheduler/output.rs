//! `process_output`: applying a step's results — computed positions, sampled tokens,
//! forks of `n > 1` requests after their prefill, and stop checks.

use crate::id_map::IdMap;

use pagemesh_shared::{FinishReason, SampledToken, SeqId, SeqResult, StepOutput};

use crate::request::RequestEvent;

use super::group::{GroupState, Sequence};
use super::Scheduler;

impl Scheduler {
    /// Applies the executor's answer to the plan in flight and returns one event per
    /// sampled token (with `finish` set on a sample's last one).
    ///
    /// Every scheduled position becomes computed (full blocks enter the prefix cache);
    /// sampled tokens are appended and checked for stop tokens and length limits;
    /// finished sequences free their blocks at once. A request with `n > 1` forks into
    /// its samples when its prompt's prefill samples. An output whose `step_id` is not the
    /// plan in flight is ignored (empty result); results for sequences aborted meanwhile
    /// are ignored; a sampling sequence missing from the results (or short of samples)
    /// finishes with [`FinishReason::Error`].
    pub fn process_output(&mut self, output: &StepOutput) -> Vec<RequestEvent> {
        let Some(in_flight) = self.in_flight.take() else {
            return Vec::new();
        };
        if output.step_id != in_flight.step_id {
            self.in_flight = Some(in_flight);
            return Vec::new();
        }
        let results: IdMap<SeqId, &SeqResult> = output.results.iter().map(|r| (r.seq_id, r)).collect();
        let mut events = Vec::new();
        let mut finished_any = false;
        for s in &in_flight.seqs {
            let Some(&(gid, idx)) = self.seq_owner.get(&s.seq_id) else {
                continue; // aborted while in flight
            };
            let group = self.groups.get_mut(&gid).expect("a live sequence's request exists");
            if group.state != GroupState::Running {
                continue;
            }
            let seq = &mut group.seqs[idx];
            seq.num_computed = s.end.min(seq.tokens.len());
            self.blocks.mark_computed(s.seq_id, &seq.tokens, seq.num_computed);
            if s.sampled {
                let samples = results.get(&s.seq_id).map(|r| r.samples.as_slice()).unwrap_or(&[]);
                self.apply_samples(gid, idx, samples, &mut events);
                finished_any |= self.groups[&gid].num_live == 0;
            }
        }
        if finished_any {
            let groups = &mut self.groups;
            self.running.retain(|id| {
                let done = groups[id].num_live == 0;
                if done {
                    groups.remove(id);
                }
                !done
            });
        }
        events
    }

    /// Appends the sampled token(s) of sequence `idx` of request `gid`.
    fn apply_samples(&mut self, gid: u64, idx: usize, samples: &[SampledToken], events: &mut Vec<RequestEvent>) {
        let max_model_len = self.config.max_model_len;
        let group = self.groups.get_mut(&gid).expect("a live sequence's request exists");
        let expected = if group.forked { 1 } else { group.params.n };
        if samples.len() < expected {
            let indices: Vec<u32> =
                if group.forked { vec![group.seqs[idx].sample_index] } else { (0..expected as u32).collect() };
            for sample_index in indices {
                events.push(RequestEvent {
                    request_id: gid,
                    sample_index,
                    token: None,
                    finish: Some(FinishReason::Error),
                });
            }
            self.finish_seq(gid, idx);
            return;
        }
        let parent = group.seqs[idx].seq_id;
        let len = group.seqs[idx].tokens.len() + 1;
        let first_finish = group.finish_reason(len, samples[0].token, max_model_len);
        events.push(RequestEvent {
            request_id: gid,
            sample_index: group.seqs[idx].sample_index,
            token: Some(samples[0].clone()),
            finish: first_finish,
        });
        if !group.forked {
            // The prompt's prefill sampled all n first tokens: fork the other samples off it.
            group.forked = true;
            for (i, sample) in samples.iter().enumerate().take(expected).skip(1) {
                let finish = group.finish_reason(len, sample.token, max_model_len);
                events.push(RequestEvent {
                    request_id: gid,
                    sample_index: i as u32,
                    token: Some(sample.clone()),
                    finish,
                });
                if finish.is_some() {
                    continue;
                }
                let child_id = self.next_seq_id;
                self.next_seq_id += 1;
                self.blocks.fork(parent, child_id).expect("the forking sequence is running on the device");
                let parent_seq = &group.seqs[idx];
                let mut tokens = Vec::with_capacity(group.prompt_len + group.params.max_tokens);
                tokens.extend_from_slice(&parent_seq.tokens);
                tokens.push(sample.token);
                let mut child = Sequence::new(child_id, i as u32, tokens);
                child.num_computed = parent_seq.num_computed;
                group.seqs.push(child);
                group.num_live += 1;
                self.seq_owner.insert(child_id, (gid, group.seqs.len() - 1));
            }
        }
        group.seqs[idx].tokens.push(samples[0].token);
        if first_finish.is_some() {
            self.finish_seq(gid, idx);
        }
    }
}
