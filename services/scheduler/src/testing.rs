//! Test support: a shadow executor that checks every plan against a simulated KV cache
//! and answers with deterministic tokens, and a harness that drives a scheduler with it
//! while checking scheduling properties.

use std::collections::{BTreeMap, HashMap, HashSet};

use pagemesh_shared::{
    BlockId, EngineConfig, FinishReason, SampledToken, SamplingParams, SeqId, SeqResult, StepOutput, StepPlan,
};

use crate::{AdmissionError, NewRequest, RequestEvent, Scheduler};

/// The token the fake model samples for sample `sample_index` of the request with `seed`
/// at output position `output_len`: a function of those alone (so it does not depend on
/// batching, chunking, preemption or caching), skipping banned tokens.
pub(crate) fn fake_token(seed: u64, sample_index: u32, output_len: usize, banned: &[u32], vocab: u32) -> u32 {
    let mut x = seed
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add(u64::from(sample_index).wrapping_mul(0xC2B2_AE3D_27D4_EB4F))
        .wrapping_add((output_len as u64).wrapping_mul(0x1656_67B1_9E37_79F9));
    x ^= x >> 31;
    x = x.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x ^= x >> 29;
    let mut t = (x % u64::from(vocab)) as u32;
    while banned.contains(&t) {
        t = (t + 1) % vocab;
    }
    t
}

/// K/V stand-in for position `p` of a sequence: a hash of its tokens `..= p`.
fn kv_after(prev: u64, token: u32) -> u64 {
    let mut x = prev ^ u64::from(token).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 33)).wrapping_mul(0xFF51_AFD7_ED55_8CCD);
    x ^ (x >> 29) ^ 1
}

#[derive(Debug, Default)]
struct ShadowSeq {
    history: Vec<u32>,
    kv: Vec<u64>,
}

impl ShadowSeq {
    fn push(&mut self, token: u32) {
        let prev = self.kv.last().copied().unwrap_or(0);
        self.history.push(token);
        self.kv.push(kv_after(prev, token));
    }
}

/// A fake executor that simulates the paged KV cache slot by slot and rejects any plan
/// that would read stale K/V, write a slot another sequence reads or writes in the same
/// step, lacks a sequence's history, or misstates a sample's position.
#[derive(Debug)]
pub(crate) struct ShadowExecutor {
    block_size: usize,
    device: Vec<Option<u64>>,
    host: Vec<Option<u64>>,
    seqs: HashMap<SeqId, ShadowSeq>,
    vocab: u32,
}

impl ShadowExecutor {
    pub(crate) fn new(config: &EngineConfig, vocab: u32) -> Self {
        Self {
            block_size: config.block_size,
            device: vec![None; config.num_device_blocks * config.block_size],
            host: vec![None; config.num_host_blocks * config.block_size],
            seqs: HashMap::new(),
            vocab,
        }
    }

    fn copy_blocks(&mut self, pairs: &[(BlockId, BlockId)], from_device: bool, to_device: bool) -> Result<(), String> {
        let bs = self.block_size;
        let mut dests = HashSet::new();
        for &(src, dst) in pairs {
            if !dests.insert(dst) {
                return Err(format!("block {dst} is the destination of two copies"));
            }
            let data: Vec<Option<u64>> = {
                let pool = if from_device { &self.device } else { &self.host };
                let range = src as usize * bs..(src as usize + 1) * bs;
                pool.get(range).ok_or_else(|| format!("copy source {src} out of range"))?.to_vec()
            };
            let pool = if to_device { &mut self.device } else { &mut self.host };
            let range = dst as usize * bs..(dst as usize + 1) * bs;
            pool.get_mut(range).ok_or_else(|| format!("copy destination {dst} out of range"))?.copy_from_slice(&data);
        }
        Ok(())
    }

    fn slot(&self, table: &[BlockId], pos: usize) -> Result<usize, String> {
        let b = *table.get(pos / self.block_size).ok_or_else(|| format!("position {pos} is not covered"))?;
        let slot = b as usize * self.block_size + pos % self.block_size;
        if slot >= self.device.len() {
            return Err(format!("block {b} out of range"));
        }
        Ok(slot)
    }

    /// Checks and runs `plan`.
    pub(crate) fn execute(&mut self, plan: &StepPlan) -> Result<StepOutput, String> {
        for id in &plan.released {
            if self.seqs.remove(id).is_none() {
                return Err(format!("released sequence {id} was never run"));
            }
        }
        self.copy_blocks(&plan.swap_out, true, false)?;
        self.copy_blocks(&plan.swap_in, false, true)?;
        self.copy_blocks(&plan.copy, true, true)?;

        let mut seen = HashSet::new();
        let mut reads = HashSet::new();
        let mut writes = HashSet::new();
        for s in &plan.seqs {
            if !seen.insert(s.seq_id) {
                return Err(format!("sequence {} scheduled twice", s.seq_id));
            }
            if s.tokens.is_empty() {
                return Err(format!("sequence {} scheduled with no tokens", s.seq_id));
            }
            let end = s.start_pos + s.tokens.len();
            if s.block_table.len() != end.div_ceil(self.block_size) {
                return Err(format!("sequence {}: {} blocks for {end} positions", s.seq_id, s.block_table.len()));
            }
            let known = match &s.history {
                Some(h) => {
                    if h.len() != s.start_pos {
                        return Err(format!("sequence {}: history of {} tokens at {}", s.seq_id, h.len(), s.start_pos));
                    }
                    let mut fresh = ShadowSeq::default();
                    for &t in h {
                        fresh.push(t);
                    }
                    fresh
                }
                None => {
                    let known = self
                        .seqs
                        .remove(&s.seq_id)
                        .ok_or_else(|| format!("sequence {} is new to the executor but has no history", s.seq_id))?;
                    if known.history.len() != s.start_pos {
                        return Err(format!(
                            "sequence {}: executor history has {} tokens but start_pos is {}",
                            s.seq_id,
                            known.history.len(),
                            s.start_pos
                        ));
                    }
                    known
                }
            };
            for p in 0..s.start_pos {
                let slot = self.slot(&s.block_table, p)?;
                if self.device[slot] != Some(known.kv[p]) {
                    return Err(format!(
                        "sequence {} reads stale K/V at position {p} (block {})",
                        s.seq_id,
                        s.block_table[p / self.block_size]
                    ));
                }
                reads.insert(slot);
            }
            for p in s.start_pos..end {
                let slot = self.slot(&s.block_table, p)?;
                if !writes.insert(slot) {
                    return Err(format!("two writes to slot {slot} in one step"));
                }
            }
            self.seqs.insert(s.seq_id, known);
        }
        if let Some(slot) = reads.intersection(&writes).next() {
            return Err(format!("slot {slot} is read and written in the same step"));
        }

        let mut results = Vec::new();
        for s in &plan.seqs {
            let state = self.seqs.get_mut(&s.seq_id).expect("inserted above");
            for (i, &t) in s.tokens.iter().enumerate() {
                state.push(t);
                let slot = {
                    let p = s.start_pos + i;
                    s.block_table[p / self.block_size] as usize * self.block_size + p % self.block_size
                };
                self.device[slot] = state.kv.last().copied();
            }
            if let Some(spec) = &s.sample {
                if spec.prompt_len > state.history.len() || spec.output_len != state.history.len() - spec.prompt_len {
                    return Err(format!(
                        "sequence {}: output_len {} with {} tokens of history and prompt_len {}",
                        s.seq_id,
                        spec.output_len,
                        state.history.len(),
                        spec.prompt_len
                    ));
                }
                let samples = (0..spec.num_samples)
                    .map(|i| SampledToken {
                        token: fake_token(
                            spec.seed,
                            spec.sample_index + i,
                            spec.output_len,
                            &spec.banned_tokens,
                            self.vocab,
                        ),
                        logprob: None,
                        top_logprobs: Vec::new(),
                    })
                    .collect();
                results.push(SeqResult { seq_id: s.seq_id, samples });
            }
        }
        Ok(StepOutput { step_id: plan.step_id, results })
    }
}

/// What one sample of a request produced.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct SampleOutput {
    pub(crate) tokens: Vec<u32>,
    pub(crate) finish: Option<FinishReason>,
}

/// Drives a scheduler with a [`ShadowExecutor`], checking after every operation the
/// scheduler's invariants, FCFS admission, swapped-before-waiting, the batch limits and
/// the event stream.
pub(crate) struct Harness {
    pub(crate) sched: Scheduler,
    pub(crate) exec: ShadowExecutor,
    pub(crate) outputs: BTreeMap<(u64, u32), SampleOutput>,
    /// Accepted requests in arrival order.
    accepted: Vec<u64>,
    /// Accepted requests not yet scheduled, and not aborted.
    unscheduled: HashSet<u64>,
    /// `accepted[.. cursor]` are all scheduled or aborted.
    cursor: usize,
    n_of: HashMap<u64, usize>,
    pub(crate) steps: usize,
    /// Prompt tokens plus `n * max_tokens` over accepted requests: each step computes at
    /// least one of these (a recompute adds the tokens it recomputes).
    pub(crate) work: usize,
    pub(crate) plans: Vec<StepPlan>,
    pub(crate) keep_plans: bool,
}

impl Harness {
    pub(crate) fn new(config: EngineConfig, eos: Vec<u32>, vocab: u32) -> Self {
        Self {
            exec: ShadowExecutor::new(&config, vocab),
            sched: Scheduler::new(config, eos),
            outputs: BTreeMap::new(),
            accepted: Vec::new(),
            unscheduled: HashSet::new(),
            cursor: 0,
            n_of: HashMap::new(),
            steps: 0,
            work: 0,
            plans: Vec::new(),
            keep_plans: false,
        }
    }

    fn check(&self) {
        if let Err(e) = self.sched.check_invariants() {
            panic!("scheduler invariant broken: {e}");
        }
        let u = self.sched.block_usage();
        assert!(u.device_free <= u.device_total && u.host_free <= u.host_total);
    }

    pub(crate) fn add(
        &mut self,
        request_id: u64,
        prompt: Vec<u32>,
        params: SamplingParams,
    ) -> Result<(), AdmissionError> {
        let n = params.n;
        let (prompt_len, max_tokens) = (prompt.len(), params.max_tokens);
        let r = self.sched.add_request(NewRequest {
            request_id,
            prompt_token_ids: prompt,
            params,
            seed: request_id,
            resumed_output: Vec::new(),
        });
        if r.is_ok() {
            self.accepted.push(request_id);
            self.unscheduled.insert(request_id);
            self.n_of.insert(request_id, n);
            self.work += prompt_len + n * max_tokens;
        }
        self.check();
        r
    }

    pub(crate) fn abort(&mut self, request_id: u64) -> Vec<RequestEvent> {
        let events = self.sched.abort_request(request_id);
        self.unscheduled.remove(&request_id);
        let open = (0..self.n_of.get(&request_id).copied().unwrap_or(0) as u32)
            .filter(|&i| !matches!(self.outputs.get(&(request_id, i)), Some(o) if o.finish.is_some()))
            .count();
        assert_eq!(events.len(), open, "one abort event per unfinished sample");
        self.record(&events);
        self.check();
        events
    }

    fn record(&mut self, events: &[RequestEvent]) {
        for e in events {
            let out = self.outputs.entry((e.request_id, e.sample_index)).or_default();
            assert!(out.finish.is_none(), "event after the finish of {e:?}");
            if let Some(t) = &e.token {
                out.tokens.push(t.token);
            }
            out.finish = e.finish;
        }
    }

    /// One `schedule` (+ execute + `process_output`); returns whether a plan ran.
    pub(crate) fn step(&mut self) -> bool {
        let waiting_before = self.sched.num_waiting();
        let Some(plan) = self.sched.schedule() else {
            assert!(!self.sched.has_unfinished_requests(), "schedule returned nothing with unfinished requests");
            self.check();
            return false;
        };
        self.steps += 1;
        let cfg = self.sched.config().clone();
        assert!(plan.seqs.len() <= cfg.max_num_seqs, "too many sequences in a step");
        assert!(plan.num_tokens() <= cfg.max_num_batched_tokens, "token budget exceeded");
        if self.sched.num_waiting() < waiting_before {
            assert_eq!(self.sched.num_swapped(), 0, "a waiting request was admitted while one is swapped");
        }
        // FCFS: the requests scheduled for the first time are exactly the oldest
        // accepted requests not yet scheduled (and not aborted).
        let mut newly: Vec<u64> = plan
            .seqs
            .iter()
            .filter_map(|s| self.sched.request_of(s.seq_id))
            .filter(|r| self.unscheduled.contains(r))
            .collect();
        newly.sort_unstable();
        newly.dedup();
        let mut expected = Vec::new();
        let mut i = self.cursor;
        while expected.len() < newly.len() && i < self.accepted.len() {
            let r = self.accepted[i];
            if self.unscheduled.contains(&r) {
                expected.push(r);
            }
            i += 1;
        }
        expected.sort_unstable();
        assert_eq!(newly, expected, "requests were first scheduled out of arrival order");
        for r in &newly {
            self.unscheduled.remove(r);
        }
        while self.cursor < self.accepted.len() && !self.unscheduled.contains(&self.accepted[self.cursor]) {
            self.cursor += 1;
        }
        self.check();

        let out = match self.exec.execute(&plan) {
            Ok(out) => out,
            Err(e) => panic!("bad plan: {e}\n{plan:#?}"),
        };
        if self.keep_plans {
            self.plans.push(plan);
        }
        let events = self.sched.process_output(&out);
        self.record(&events);
        self.check();
        true
    }

    /// Steps until nothing is unfinished, within `2 * work + 16` steps in all (every
    /// step computes at least one token of work; the slack covers preemption steps and
    /// recomputation).
    pub(crate) fn drain(&mut self) {
        let bound = 2 * self.work + 16;
        while self.sched.has_unfinished_requests() {
            self.step();
            assert!(self.steps <= bound, "no completion within {bound} steps");
        }
        let u = self.sched.block_usage();
        assert_eq!(u.device_free, u.device_total, "device blocks leaked");
        assert_eq!(u.host_free, u.host_total, "host blocks leaked");
        for (&(r, i), out) in &self.outputs {
            assert!(out.finish.is_some(), "request {r} sample {i} never finished");
        }
    }
}
