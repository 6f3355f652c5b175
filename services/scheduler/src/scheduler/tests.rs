//! Scheduler unit tests. Most drive the scheduler through [`Harness`], whose shadow
//! executor checks every plan against a simulated KV cache.

use std::collections::BTreeMap;

use pagemesh_shared::{
    EngineConfig, FinishReason, KvAllocation, PreemptionMode, SampledToken, SamplingParams, ScheduledSeq, SeqResult,
    StepOutput, StepPlan,
};

use crate::testing::{Harness, SampleOutput};
use crate::{AdmissionError, NewRequest, Scheduler};

const VOCAB: u32 = 1000;

fn config(block_size: usize, device: usize, host: usize, max_seqs: usize, max_tokens: usize) -> EngineConfig {
    EngineConfig {
        block_size,
        num_device_blocks: device,
        num_host_blocks: host,
        max_num_seqs: max_seqs,
        max_num_batched_tokens: max_tokens,
        preemption_mode: PreemptionMode::Swap,
        enable_prefix_caching: false,
        max_waiting_requests: 100,
        max_waiting_tokens: 10_000,
        max_model_len: 256,
        kv_allocation: KvAllocation::Paged,
    }
}

/// `max_tokens` tokens, never stopping early.
fn params(max_tokens: usize) -> SamplingParams {
    SamplingParams { max_tokens, ignore_eos: true, ..SamplingParams::default() }
}

fn prompt(seed: u32, len: usize) -> Vec<u32> {
    (0..len as u32).map(|i| 1 + (seed * 131 + i * 17) % (VOCAB - 1)).collect()
}

fn seq_ids(plan: &StepPlan) -> Vec<u64> {
    plan.seqs.iter().map(|s| s.seq_id).collect()
}

fn new_req(request_id: u64, prompt: Vec<u32>, params: SamplingParams) -> NewRequest {
    NewRequest { request_id, prompt_token_ids: prompt, params, seed: request_id, resumed_output: Vec::new() }
}

/// Answers `plan`, choosing each sample's token with `f(seq, sample offset)`.
fn respond(plan: &StepPlan, mut f: impl FnMut(&ScheduledSeq, u32) -> u32) -> StepOutput {
    let results = plan
        .seqs
        .iter()
        .filter_map(|s| {
            let spec = s.sample.as_ref()?;
            let samples = (0..spec.num_samples)
                .map(|i| SampledToken { token: f(s, i), logprob: None, top_logprobs: Vec::new() })
                .collect();
            Some(SeqResult { seq_id: s.seq_id, samples })
        })
        .collect();
    StepOutput { step_id: plan.step_id, results }
}

/// Runs `requests` on a pool large enough that nothing is ever preempted.
fn reference_outputs(requests: &[(u64, Vec<u32>, SamplingParams)]) -> BTreeMap<(u64, u32), SampleOutput> {
    let mut h = Harness::new(config(4, 4096, 0, 256, 4096), vec![0], VOCAB);
    for (id, p, sp) in requests {
        h.add(*id, p.clone(), sp.clone()).expect("the reference pool fits everything");
    }
    h.drain();
    assert_eq!(h.sched.stats().preemptions_swap + h.sched.stats().preemptions_recompute, 0);
    h.outputs
}

fn check(s: &Scheduler) {
    if let Err(e) = s.check_invariants() {
        panic!("invariant broken: {e}");
    }
}

#[test]
fn the_most_admissible_output_is_exactly_the_edge_of_admission() {
    for cfg in [config(4, 10, 0, 8, 64), contiguous_config(KvAllocation::Contiguous), config(4, 100, 0, 8, 64)] {
        for (prompt_len, n) in [(1, 1), (7, 1), (7, 2), (30, 1), (39, 1), (40, 1), (70, 1)] {
            if n > 1 && cfg.kv_allocation.is_contiguous() {
                continue; // the contiguous allocators take n = 1 only
            }
            let mut h = Harness::new(cfg.clone(), vec![0], VOCAB);
            let most = h.sched.max_admissible_output(prompt_len, n);
            let request =
                |id, max_tokens| new_req(id, prompt(id as u32, prompt_len), SamplingParams { n, ..params(max_tokens) });
            if most > 0 {
                assert!(h.sched.add_request(request(1, most)).is_ok(), "{prompt_len}+{most} (n={n}) fits");
            }
            assert!(h.sched.add_request(request(2, most + 1)).is_err(), "{prompt_len}+{} (n={n}) must not", most + 1);
        }
    }
}

#[test]
fn a_finished_sequence_leaves_and_a_waiting_one_joins_the_next_step() {
    let mut h = Harness::new(config(4, 64, 0, 2, 64), vec![0], VOCAB);
    h.keep_plans = true;
    h.add(1, prompt(1, 3), params(2)).expect("accepted");
    h.add(2, prompt(2, 3), params(5)).expect("accepted");
    h.add(3, prompt(3, 3), params(3)).expect("accepted");
    assert!(h.step());
    assert_eq!(seq_ids(&h.plans[0]), vec![0, 1], "two slots: requests 1 and 2");
    assert_eq!(h.sched.num_waiting(), 1);
    assert!(h.step());
    assert_eq!(h.outputs[&(1, 0)].finish, Some(FinishReason::Length));
    assert_eq!(h.outputs[&(1, 0)].tokens.len(), 2);
    assert_eq!(h.block_usage_used(), 1, "request 1's block was freed at once");
    assert!(h.step());
    let plan = &h.plans[2];
    assert_eq!(seq_ids(plan), vec![1, 2], "request 3 took the freed slot");
    assert_eq!(plan.released, vec![0]);
    assert_eq!(plan.seqs[1].history, Some(vec![]), "a first step carries an (empty) history");
    h.drain();
    assert_eq!(h.outputs[&(2, 0)].tokens.len(), 5);
    assert_eq!(h.outputs[&(3, 0)].tokens.len(), 3);
}

#[test]
fn chunked_prefill_respects_the_token_budget_and_decodes_go_first() {
    let mut h = Harness::new(config(4, 64, 0, 8, 4), vec![0], VOCAB);
    h.keep_plans = true;
    let a = prompt(1, 2);
    let b = prompt(2, 9);
    h.add(1, a.clone(), params(10)).expect("accepted");
    h.add(2, b.clone(), params(2)).expect("accepted");

    assert!(h.step());
    let p = &h.plans[0];
    assert_eq!(p.num_tokens(), 4);
    assert_eq!((p.seqs[0].start_pos, p.seqs[0].tokens.clone()), (0, a.clone()));
    assert!(p.seqs[0].sample.is_some());
    assert_eq!((p.seqs[1].start_pos, p.seqs[1].tokens.clone()), (0, b[..2].to_vec()));
    assert!(p.seqs[1].sample.is_none(), "a chunk short of the last token does not sample");
    assert_eq!(p.seqs[1].block_table.len(), 1, "the table covers the positions fed so far");

    assert!(h.step());
    let p = &h.plans[1];
    assert_eq!(p.seqs.len(), 2);
    assert_eq!((p.seqs[0].seq_id, p.seqs[0].tokens.len()), (0, 1), "the decode token comes first");
    assert_eq!((p.seqs[1].start_pos, p.seqs[1].tokens.clone()), (2, b[2..5].to_vec()));
    assert_eq!(p.seqs[1].history, None, "later chunks extend the executor's history");

    assert!(h.step());
    assert_eq!((h.plans[2].seqs[1].start_pos, h.plans[2].seqs[1].tokens.len()), (5, 3));
    assert!(h.plans[2].seqs[1].sample.is_none());
    assert!(h.step());
    let last = &h.plans[3].seqs[1];
    assert_eq!((last.start_pos, last.tokens.len()), (8, 1));
    let spec = last.sample.as_ref().expect("the last prompt token samples");
    assert_eq!((spec.prompt_len, spec.output_len), (9, 0));
    h.drain();
    assert!(h.plans.iter().all(|p| p.num_tokens() <= 4));
}

#[test]
fn max_num_seqs_limits_the_batch_and_counts_all_samples() {
    let mut h = Harness::new(config(4, 64, 0, 3, 64), vec![0], VOCAB);
    h.keep_plans = true;
    h.add(1, prompt(1, 3), SamplingParams { n: 2, ..params(4) }).expect("accepted");
    h.add(2, prompt(2, 3), params(4)).expect("accepted");
    h.add(3, prompt(3, 3), params(4)).expect("accepted");
    assert!(h.step());
    assert_eq!(seq_ids(&h.plans[0]), vec![0, 1], "request 1 reserves two slots before it forks");
    assert_eq!(h.sched.num_running(), 2);
    assert_eq!(h.sched.num_waiting(), 1);
    assert!(h.step());
    assert_eq!(h.plans[1].seqs.len(), 3);
    assert_eq!(h.sched.num_waiting(), 1);
    assert!(matches!(h.add(4, prompt(4, 3), SamplingParams { n: 4, ..params(4) }), Err(AdmissionError::Invalid(_))));
    h.drain();
}

#[test]
fn n_samples_prefill_once_then_fork_with_copy_on_write() {
    let mut h = Harness::new(config(4, 64, 0, 8, 64), vec![0], VOCAB);
    h.keep_plans = true;
    let p = prompt(5, 6);
    h.add(7, p.clone(), SamplingParams { n: 3, ..params(3) }).expect("accepted");
    assert!(h.step());
    let first = &h.plans[0];
    assert_eq!(first.seqs.len(), 1, "the prompt is prefilled once");
    let spec = first.seqs[0].sample.as_ref().expect("samples");
    assert_eq!((spec.sample_index, spec.num_samples, spec.output_len, spec.prompt_len), (0, 3, 0, 6));
    let prompt_table = first.seqs[0].block_table.clone();
    assert_eq!(h.outputs.len(), 3, "one event per sample");

    assert!(h.step());
    let plan = &h.plans[1];
    assert_eq!(plan.seqs.len(), 3);
    for (i, s) in plan.seqs.iter().enumerate() {
        let spec = s.sample.as_ref().expect("decodes sample");
        assert_eq!((spec.sample_index, spec.num_samples, spec.output_len), (i as u32, 1, 1));
        assert_eq!(s.start_pos, 6);
        assert_eq!(s.tokens, vec![h.outputs[&(7, i as u32)].tokens[0]]);
        assert_eq!(s.block_table[0], prompt_table[0], "the full prompt block stays shared");
        assert_eq!(s.history, if i == 0 { None } else { Some(p.clone()) }, "children get their history");
    }
    assert_eq!(plan.copy.len(), 2, "three writers of a shared block: two copies");
    assert!(plan.copy.iter().all(|&(src, _)| src == prompt_table[1]));
    let mut second: Vec<_> = plan.seqs.iter().map(|s| s.block_table[1]).collect();
    second.sort_unstable();
    second.dedup();
    assert_eq!(second.len(), 3, "each sample now owns its partial block");
    assert_eq!(h.sched.stats().blocks_copied, 2);
    h.drain();
    for i in 0..3 {
        assert_eq!(h.outputs[&(7, i)].tokens.len(), 3);
    }
}

/// Three requests that fill an 8-block pool, then a fourth that arrives later.
fn preemption_workload() -> Vec<(u64, Vec<u32>, SamplingParams)> {
    (1..=4).map(|id| (id, prompt(id as u32, 3), params(5))).collect()
}

#[test]
fn swap_preemption_takes_the_newest_and_resumes_it_before_waiting_requests() {
    let reqs = preemption_workload();
    let mut h = Harness::new(config(2, 8, 16, 8, 64), vec![0], VOCAB);
    h.keep_plans = true;
    for (id, p, sp) in &reqs[..3] {
        h.add(*id, p.clone(), sp.clone()).expect("accepted");
    }
    for _ in 0..3 {
        assert!(h.step());
    }
    // Third step: every sequence needs a new block for position 4; two are free.
    let p = &h.plans[2];
    assert_eq!(seq_ids(p), vec![0, 1], "the newest request (seq 2) was preempted");
    assert_eq!(p.swap_out.len(), 2, "its two blocks went to the host");
    assert_eq!(h.sched.num_swapped(), 1);
    assert_eq!(h.sched.stats().preemptions_swap, 1);
    let (id, pr, sp) = &reqs[3];
    h.add(*id, pr.clone(), sp.clone()).expect("accepted");
    h.drain();
    let resumed = h.plans.iter().position(|p| !p.swap_in.is_empty()).expect("swapped back in");
    let c = h.plans[resumed].seqs.iter().find(|s| s.seq_id == 2).expect("runs when swapped in");
    assert_eq!(c.history, None, "swapping keeps the executor's history");
    let d_first = h.plans.iter().position(|p| p.seqs.iter().any(|s| s.seq_id == 3)).expect("ran");
    assert!(d_first >= resumed, "the waiting request ran before the swapped one resumed");
    assert_eq!(h.sched.stats().blocks_swapped_in, 2);
    assert_eq!(h.sched.stats().preemptions_recompute, 0);
    assert_eq!(h.outputs, reference_outputs(&reqs), "preemption does not change the output");
}

#[test]
fn recompute_preemption_requeues_in_front_and_resumes_identically() {
    let reqs = preemption_workload();
    let mut cfg = config(2, 8, 0, 8, 64);
    cfg.preemption_mode = PreemptionMode::Recompute;
    let mut h = Harness::new(cfg, vec![0], VOCAB);
    h.keep_plans = true;
    for (id, p, sp) in &reqs[..3] {
        h.add(*id, p.clone(), sp.clone()).expect("accepted");
    }
    for _ in 0..3 {
        assert!(h.step());
    }
    assert_eq!(seq_ids(&h.plans[2]), vec![0, 1]);
    assert!(h.plans[2].swap_out.is_empty());
    assert_eq!(h.plans[2].released, vec![2], "the executor drops the preempted sequence");
    assert_eq!(h.sched.stats().preemptions_recompute, 1);
    let (id, pr, sp) = &reqs[3];
    h.add(*id, pr.clone(), sp.clone()).expect("accepted");
    assert_eq!(h.sched.num_waiting(), 2);
    h.drain();
    let again = h.plans[3..].iter().find_map(|p| p.seqs.iter().find(|s| s.seq_id == 2)).expect("re-admitted");
    let before = &h.outputs[&(3, 0)].tokens[..2];
    let mut expected_tokens = reqs[2].1.clone();
    expected_tokens.extend_from_slice(before);
    assert_eq!(again.start_pos, 0);
    assert_eq!(again.tokens, expected_tokens, "re-prefills prompt + generated tokens");
    assert_eq!(again.history, Some(vec![]));
    let spec = again.sample.as_ref().expect("samples where it left off");
    assert_eq!((spec.output_len, spec.sample_index), (2, 0));
    let c_again = h.plans.iter().enumerate().skip(3).find(|(_, p)| p.seqs.iter().any(|s| s.seq_id == 2));
    let d_first = h.plans.iter().position(|p| p.seqs.iter().any(|s| s.seq_id == 3)).expect("ran");
    assert!(d_first >= c_again.expect("found").0, "the newer request overtook the preempted one");
    assert_eq!(h.outputs, reference_outputs(&reqs));
}

#[test]
fn swap_mode_falls_back_to_recompute_without_host_room() {
    let reqs = preemption_workload();
    let mut h = Harness::new(config(2, 8, 1, 8, 64), vec![0], VOCAB);
    for (id, p, sp) in &reqs {
        h.add(*id, p.clone(), sp.clone()).expect("accepted");
    }
    h.drain();
    assert_eq!(h.sched.stats().preemptions_swap, 0);
    assert!(h.sched.stats().preemptions_recompute > 0);
    assert_eq!(h.outputs, reference_outputs(&reqs));
}

#[test]
fn queue_full_is_refused_at_once() {
    let mut cfg = config(4, 64, 0, 8, 64);
    cfg.max_waiting_requests = 2;
    cfg.max_waiting_tokens = 10;
    let mut s = Scheduler::new(cfg, vec![0]);
    s.add_request(new_req(1, prompt(1, 4), params(2))).expect("accepted");
    s.add_request(new_req(2, prompt(2, 4), params(2))).expect("accepted");
    let err = s.add_request(new_req(3, prompt(3, 1), params(2))).expect_err("request limit");
    assert!(matches!(err, AdmissionError::QueueFull { waiting_requests: 2, .. }), "{err}");
    assert!(err.to_string().contains("retry later"));
    s.abort_request(2);
    let err = s.add_request(new_req(3, prompt(3, 7), params(2))).expect_err("token limit");
    assert!(matches!(err, AdmissionError::QueueFull { waiting_tokens: 4, .. }), "{err}");
    s.add_request(new_req(3, prompt(3, 6), params(2))).expect("exactly at the token limit");
    assert!(s.schedule().is_some());
    assert_eq!(s.num_waiting(), 0);
    s.add_request(new_req(4, prompt(4, 6), params(2))).expect("the queue drained");
    check(&s);
}

#[test]
fn invalid_requests_are_rejected_with_clear_errors() {
    let mut s = Scheduler::new(config(4, 8, 0, 8, 64), vec![0]);
    let err = s.add_request(new_req(1, vec![], params(2))).expect_err("empty");
    assert_eq!(err.to_string(), "invalid request: the prompt is empty");
    let err = s.add_request(new_req(1, prompt(1, 3), SamplingParams { top_p: 0.0, ..params(2) })).expect_err("bad");
    assert!(err.to_string().contains("top_p"), "{err}");
    let err = s.add_request(new_req(1, prompt(1, 250), params(7))).expect_err("too long");
    assert_eq!(err, AdmissionError::TooLong { prompt_len: 250, max_tokens: 7, max_model_len: 256 });
    assert!(err.to_string().contains("context length of 256"));
    // 30 + 3 tokens = 9 blocks of 4 > 8.
    let err = s.add_request(new_req(1, prompt(1, 30), params(3))).expect_err("never fits");
    assert!(matches!(err, AdmissionError::DoesNotFit { needed_blocks: 9, pool_blocks: 8, .. }), "{err}");
    // Two samples of 16 tokens: 8 blocks fit exactly; three do not.
    s.add_request(new_req(1, prompt(1, 13), SamplingParams { n: 2, ..params(3) })).expect("fits");
    let err = s.add_request(new_req(2, prompt(1, 13), SamplingParams { n: 3, ..params(3) })).expect_err("no fit");
    assert!(matches!(err, AdmissionError::DoesNotFit { needed_blocks: 12, n: 3, .. }), "{err}");
    let err = s.add_request(new_req(1, prompt(1, 3), params(2))).expect_err("duplicate");
    assert_eq!(err, AdmissionError::DuplicateId(1));
    assert_eq!(s.num_waiting(), 1);
    check(&s);
}

#[test]
fn abort_frees_blocks_at_once_and_releases_sequences() {
    let mut h = Harness::new(config(4, 16, 0, 8, 64), vec![0], VOCAB);
    h.keep_plans = true;
    h.add(1, prompt(1, 6), SamplingParams { n: 2, ..params(10) }).expect("accepted");
    h.add(2, prompt(2, 3), params(10)).expect("accepted");
    h.add(3, prompt(3, 3), params(10)).expect("accepted");
    assert!(h.step());
    assert!(h.step());
    let used = h.block_usage_used();
    let events = h.abort(1);
    assert_eq!(events.len(), 2);
    assert!(events.iter().all(|e| e.finish == Some(FinishReason::Abort) && e.token.is_none()));
    assert_eq!(h.block_usage_used(), used - 3, "the shared prompt block and two partial blocks");
    assert!(h.abort(1).is_empty(), "already gone");
    assert!(h.sched.abort_request(99).is_empty(), "unknown");

    // Abort while a plan is in flight: its results are ignored.
    let plan = h.sched.schedule().expect("work left");
    let mut released = plan.released.clone();
    released.sort_unstable();
    assert_eq!(released, vec![0, 3], "the parent and the forked child");
    let events = h.sched.abort_request(2);
    assert_eq!(events.len(), 1);
    let out = respond(&plan, |_, _| 5);
    let events = h.sched.process_output(&out);
    assert!(events.iter().all(|e| e.request_id == 3), "no events for the aborted request");
    check(&h.sched);
    assert!(h.sched.abort_request(3).len() == 1);
    assert!(!h.sched.has_unfinished_requests());
    let u = h.sched.block_usage();
    assert_eq!((u.device_free, u.host_free), (u.device_total, u.host_total));
    check(&h.sched);
}

#[test]
fn aborting_a_waiting_request_before_it_forks_reports_every_sample() {
    let mut s = Scheduler::new(config(4, 16, 0, 8, 64), vec![0]);
    s.add_request(new_req(1, prompt(1, 6), SamplingParams { n: 3, ..params(4) })).expect("accepted");
    let events = s.abort_request(1);
    assert_eq!(events.iter().map(|e| e.sample_index).collect::<Vec<_>>(), vec![0, 1, 2]);
    assert_eq!(s.num_waiting(), 0);
    assert!(s.schedule().is_none(), "nothing to run");
    check(&s);
}

#[test]
fn stop_tokens_are_banned_until_min_tokens() {
    let mut s = Scheduler::new(config(4, 16, 0, 8, 64), vec![0]);
    let sp = SamplingParams { min_tokens: 2, stop_token_ids: vec![9, 5], ..SamplingParams::default() };
    s.add_request(new_req(1, prompt(1, 3), sp.clone())).expect("accepted");
    s.add_request(new_req(2, prompt(2, 3), SamplingParams { ignore_eos: true, ..sp })).expect("accepted");
    let mut banned = Vec::new();
    for _ in 0..3 {
        let plan = s.schedule().expect("work");
        banned.push(
            plan.seqs.iter().map(|x| x.sample.as_ref().expect("samples").banned_tokens.clone()).collect::<Vec<_>>(),
        );
        // An executor that ignored the ban: stop tokens before min_tokens do not stop.
        let events = s.process_output(&respond(&plan, |_, _| 5));
        assert!(events.iter().all(|e| e.finish.is_none()) || banned.len() == 3);
    }
    assert_eq!(banned[0], vec![vec![0, 5, 9], vec![5, 9]], "eos unless ignore_eos, plus stop_token_ids");
    assert_eq!(banned[1], banned[0]);
    assert_eq!(banned[2], vec![Vec::<u32>::new(), vec![]], "free to stop from output index min_tokens");
    assert!(!s.has_unfinished_requests(), "the third token (a stop token) finished both");
}

#[test]
fn stop_eos_and_length_finish_sequences() {
    let mut s = Scheduler::new(config(4, 16, 0, 8, 64), vec![0, 1]);
    let sp = SamplingParams { max_tokens: 3, stop_token_ids: vec![7], ..SamplingParams::default() };
    s.add_request(new_req(1, prompt(1, 3), sp.clone())).expect("accepted"); // stop token
    s.add_request(new_req(2, prompt(2, 3), sp.clone())).expect("accepted"); // eos
    s.add_request(new_req(3, prompt(3, 3), SamplingParams { ignore_eos: true, ..sp.clone() })).expect("accepted");
    s.add_request(new_req(4, prompt(4, 3), sp)).expect("accepted"); // length
    let mut finishes = BTreeMap::new();
    let mut outputs: BTreeMap<u64, Vec<u32>> = BTreeMap::new();
    let mut steps = 0;
    while s.has_unfinished_requests() {
        let plan = s.schedule().expect("work");
        steps += 1;
        let events = s.process_output(&respond(&plan, |seq, _| {
            let out = seq.sample.as_ref().map_or(0, |sp| sp.output_len);
            match (s.request_of(seq.seq_id), out) {
                (Some(1), 1) => 7,
                (Some(2), 0) => 1,
                (Some(3), _) => 0,
                _ => 42,
            }
        }));
        for e in events {
            outputs.entry(e.request_id).or_default().push(e.token.expect("token").token);
            if let Some(f) = e.finish {
                finishes.insert(e.request_id, f);
            }
        }
        check(&s);
    }
    assert_eq!(steps, 3);
    assert_eq!(outputs[&1], vec![42, 7], "the stop token is part of the output");
    assert_eq!(outputs[&2], vec![1], "any eos id stops");
    assert_eq!(outputs[&3], vec![0, 0, 0], "eos is ignored with ignore_eos");
    assert_eq!(outputs[&4], vec![42, 42, 42]);
    assert_eq!(finishes[&1], FinishReason::Stop);
    assert_eq!(finishes[&2], FinishReason::Stop);
    assert_eq!(finishes[&3], FinishReason::Length);
    assert_eq!(finishes[&4], FinishReason::Length);
}

#[test]
fn prefix_cache_hits_skip_computed_blocks() {
    let mut cfg = config(4, 32, 0, 8, 64);
    cfg.enable_prefix_caching = true;
    let mut h = Harness::new(cfg, vec![0], VOCAB);
    h.keep_plans = true;
    let p = prompt(3, 9);
    h.add(1, p.clone(), params(2)).expect("accepted");
    h.drain();
    assert_eq!(h.sched.stats().prefix_cache_queried_tokens, 9);
    assert_eq!(h.sched.stats().prefix_cache_hit_tokens, 0);
    let mut longer = p.clone();
    longer.extend_from_slice(&[5, 6, 7]);
    h.add(2, longer.clone(), params(2)).expect("accepted");
    assert!(h.step());
    let s = &h.plans.last().expect("plan").seqs[0];
    assert_eq!(s.start_pos, 8, "two full blocks were cached");
    assert_eq!(s.tokens, longer[8..].to_vec());
    assert_eq!(s.history, Some(longer[..8].to_vec()), "a cache hit carries the skipped history");
    assert_eq!(s.block_table[..2], h.plans[0].seqs[0].block_table[..2]);
    assert_eq!(h.sched.stats().prefix_cache_queried_tokens, 21);
    assert_eq!(h.sched.stats().prefix_cache_hit_tokens, 8);
    h.drain();
}

#[test]
fn odd_outputs_are_ignored_or_fail_the_sequence() {
    let mut s = Scheduler::new(config(4, 16, 0, 8, 64), vec![0]);
    s.add_request(new_req(1, prompt(1, 3), SamplingParams { n: 2, ..params(4) })).expect("accepted");
    assert!(s.process_output(&StepOutput::default()).is_empty(), "nothing in flight");
    let plan = s.schedule().expect("work");
    assert!(s.schedule().is_none(), "one plan in flight at a time");
    let wrong = StepOutput { step_id: plan.step_id + 1, results: vec![] };
    assert!(s.process_output(&wrong).is_empty(), "another step's output is ignored");
    let events = s.process_output(&StepOutput { step_id: plan.step_id, results: vec![] });
    assert_eq!(events.len(), 2, "both samples fail");
    assert!(events.iter().all(|e| e.finish == Some(FinishReason::Error)));
    assert!(!s.has_unfinished_requests());
    let plan = s.schedule();
    assert!(plan.is_none(), "the released sequence waits for the next plan");
    check(&s);
}

#[test]
fn peak_usage_and_stats_are_tracked() {
    let mut h = Harness::new(config(4, 64, 0, 8, 64), vec![0], VOCAB);
    h.add(1, prompt(1, 9), params(4)).expect("accepted");
    h.add(2, prompt(2, 5), params(4)).expect("accepted");
    h.drain();
    let st = h.sched.stats();
    // The last sampled token is never fed, so positions 0..12 and 0..8 get K/V.
    assert_eq!(st.peak_device_blocks_used, 3 + 2);
    assert_eq!(st.steps as usize, h.steps);
    assert_eq!(st.prefix_cache_queried_tokens, 0, "caching is off");
}

impl Harness {
    fn block_usage_used(&self) -> usize {
        let u = self.sched.block_usage();
        u.device_total - u.device_free
    }
}

/// Thousands of requests with 256 running sequences drain in a bounded number of steps;
/// each step stays cheap (checked loosely: the whole run must take well under a second of
/// scheduler time in the test profile). Uses the simplest executor, not the shadow one.
#[test]
fn a_large_workload_drains_with_full_batches() {
    let mut cfg = EngineConfig { num_device_blocks: 2048, num_host_blocks: 512, ..EngineConfig::default() };
    cfg.max_waiting_requests = 10_000;
    let mut s = Scheduler::new(cfg, vec![0]);
    let mut work = 0;
    for id in 0..3000u64 {
        let len = 16 + (id as usize * 37) % 200;
        let max_tokens = 8 + (id as usize * 13) % 120;
        let n = 1 + usize::from(id % 7 == 3);
        work += len + n * max_tokens;
        let sp = SamplingParams { n, ..params(max_tokens) };
        // Every fourth request shares a 64-token system prompt.
        let mut p = if id % 4 == 0 { prompt(0, 64) } else { Vec::new() };
        p.extend(prompt(id as u32 + 1, len));
        s.add_request(new_req(id, p, sp)).expect("accepted");
    }
    let start = std::time::Instant::now();
    let (mut steps, mut tokens, mut max_batch) = (0usize, 0usize, 0usize);
    while s.has_unfinished_requests() {
        let plan = s.schedule().expect("progress");
        steps += 1;
        tokens += plan.num_tokens();
        max_batch = max_batch.max(plan.seqs.len());
        let out = respond(&plan, |seq, i| 1 + (seq.seq_id as u32 * 7 + i) % 900);
        s.process_output(&out);
        assert!(steps <= work, "no progress");
    }
    let elapsed = start.elapsed();
    check(&s);
    assert_eq!(max_batch, 256, "batches fill up to max_num_seqs");
    assert!(s.stats().prefix_cache_hit_tokens > 0);
    assert!(tokens >= work / 2);
    assert!(elapsed.as_secs_f64() < 10.0, "{steps} steps took {elapsed:?}");
}

#[test]
fn a_resumed_request_continues_where_its_sample_stopped() {
    // The executor's token depends only on (seed, sample, output position), as seeded sampling does.
    let token_of = |s: &ScheduledSeq, i: u32| {
        let spec = s.sample.as_ref().expect("a sampling step");
        3 + ((spec.seed as usize * 31 + spec.output_len * 7 + (spec.sample_index + i) as usize) % 400) as u32
    };
    let run = |req: NewRequest| -> (Vec<u32>, Vec<usize>) {
        let mut s = Scheduler::new(config(4, 64, 0, 8, 64), vec![0]);
        s.add_request(req).expect("admitted");
        let (mut tokens, mut first_output_lens) = (Vec::new(), Vec::new());
        while s.has_unfinished_requests() {
            let plan = s.schedule().expect("progress");
            for seq in plan.seqs.iter().filter_map(|q| q.sample.as_ref()) {
                first_output_lens.push(seq.output_len);
            }
            for e in s.process_output(&respond(&plan, token_of)) {
                tokens.extend(e.token.map(|t| t.token));
            }
            check(&s);
        }
        (tokens, first_output_lens)
    };
    let whole = run(new_req(7, prompt(1, 6), params(20))).0;
    assert_eq!(whole.len(), 20);
    let resumed = NewRequest { resumed_output: whole[..8].to_vec(), ..new_req(7, prompt(1, 6), params(20)) };
    let (rest, output_lens) = run(resumed);
    assert_eq!(output_lens[0], 8, "sampling resumes at output position 8");
    assert_eq!(rest, whole[8..], "the rest of the sample is the same");
    let mut bad = new_req(8, prompt(1, 6), SamplingParams { n: 2, ..params(20) });
    bad.resumed_output = vec![5];
    assert!(matches!(
        Scheduler::new(config(4, 64, 0, 8, 64), vec![0]).add_request(bad),
        Err(AdmissionError::Invalid(_))
    ));
}

fn contiguous_config(allocation: KvAllocation) -> EngineConfig {
    EngineConfig { kv_allocation: allocation, enable_prefix_caching: true, ..config(4, 40, 0, 16, 256) }
}

#[test]
fn the_contiguous_baseline_reserves_prompt_plus_max_tokens_at_admission() {
    let mut h = Harness::new(contiguous_config(KvAllocation::Contiguous), vec![0], VOCAB);
    // prompt 6 + max_tokens 10 = 16 positions = 4 blocks each: 10 requests fit 40 blocks, but
    // the watermark (1% of 40 = 0 blocks) aside, admission stops when the reservations do.
    for id in 1..=12 {
        h.add(id, prompt(id as u32, 6), params(10)).expect("accepted");
    }
    assert!(h.step());
    assert_eq!(h.sched.num_running(), 10, "40 blocks hold ten 4-block reservations");
    assert_eq!(h.block_usage_used(), 40);
    let occupancy = h.sched.kv_occupancy();
    assert_eq!(occupancy.allocated_slots, 160);
    assert_eq!(occupancy.filled_slots, 60, "ten prompts of 6 tokens are being written");
    for _ in 0..3 {
        assert!(h.step());
        assert_eq!(h.block_usage_used(), 40, "decodes take no blocks: they were reserved");
    }
    h.drain();
    assert_eq!(h.sched.stats().preemptions_swap + h.sched.stats().preemptions_recompute, 0);
    assert_eq!(h.sched.stats().prefix_cache_queried_tokens, 0, "no prefix caching in the baseline");
    let requests: Vec<_> = (1..=12).map(|id| (id, prompt(id as u32, 6), params(10))).collect();
    assert_eq!(h.outputs, reference_outputs(&requests), "same tokens as paged allocation");
}

#[test]
fn paged_allocation_admits_what_the_contiguous_baseline_must_hold_back() {
    let mut paged = Harness::new(EngineConfig { ..config(4, 40, 0, 16, 256) }, vec![0], VOCAB);
    for id in 1..=12 {
        paged.add(id, prompt(id as u32, 6), params(10)).expect("accepted");
    }
    assert!(paged.step());
    assert_eq!(paged.sched.num_running(), 12, "paged: 2 blocks per prompt");
    let occupancy = paged.sched.kv_occupancy();
    assert_eq!(occupancy.allocated_slots, 12 * 8);
    assert_eq!(occupancy.filled_slots, 12 * 6);
}

#[test]
fn the_max_len_baseline_reserves_the_whole_context_and_refuses_n_above_one() {
    let mut h = Harness::new(contiguous_config(KvAllocation::ContiguousMaxLen), vec![0], VOCAB);
    // max_model_len 256 = 64 blocks: more than the 40-block pool, so nothing fits at all.
    let err = h.add(1, prompt(1, 6), params(10)).expect_err("a 64-block reservation never fits 40 blocks");
    assert!(matches!(err, AdmissionError::DoesNotFit { needed_blocks: 64, .. }), "{err:?}");
    let cfg = EngineConfig { max_model_len: 32, ..contiguous_config(KvAllocation::ContiguousMaxLen) };
    let mut h = Harness::new(cfg, vec![0], VOCAB);
    for id in 1..=6 {
        h.add(id, prompt(id as u32, 6), params(10)).expect("accepted");
    }
    assert!(h.step());
    assert_eq!(h.sched.num_running(), 5, "8 blocks each: five fit in 40");
    let err = h
        .add(9, prompt(9, 6), SamplingParams { n: 2, ..params(4) })
        .expect_err("n = 2 is refused by the contiguous baselines");
    assert!(matches!(err, AdmissionError::Invalid(_)), "{err:?}");
    h.drain();
    check(&h.sched);
}
