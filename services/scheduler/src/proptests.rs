//! Property tests: random workloads on random small pools, driven through the checking
//! [`Harness`] (invariants after every operation, FCFS admission, swapped requests before
//! waiting ones, batch limits, a shadow KV cache validating every plan), drained to
//! completion within a step bound, and compared with an unconstrained run.

use std::collections::BTreeMap;

use pagemesh_shared::{EngineConfig, KvAllocation, PreemptionMode, SamplingParams};
use proptest::prelude::*;

use crate::testing::{Harness, SampleOutput};
use crate::AdmissionError;

/// Small vocabulary so that eos (0) and stop tokens are sampled now and then.
const VOCAB: u32 = 48;
const EOS: u32 = 0;

#[derive(Debug, Clone)]
struct Req {
    /// Prompts of one family share a prefix (exercises the prefix cache).
    family: u32,
    shared_len: usize,
    tail: Vec<u32>,
    n: usize,
    max_tokens: usize,
    min_tokens: usize,
    ignore_eos: bool,
    stop: Option<u32>,
}

impl Req {
    fn prompt(&self) -> Vec<u32> {
        let mut p: Vec<u32> =
            (0..self.shared_len as u32).map(|i| 1 + (self.family * 7919 + i * 104_729) % (VOCAB - 1)).collect();
        p.extend_from_slice(&self.tail);
        p
    }

    fn params(&self) -> SamplingParams {
        SamplingParams {
            n: self.n,
            max_tokens: self.max_tokens,
            min_tokens: self.min_tokens.min(self.max_tokens),
            ignore_eos: self.ignore_eos,
            stop_token_ids: self.stop.into_iter().collect(),
            ..SamplingParams::default()
        }
    }
}

fn req() -> impl Strategy<Value = Req> {
    (
        0..3u32,
        0..10usize,
        prop::collection::vec(1..VOCAB, 1..7),
        1..=3usize,
        1..16usize,
        0..3usize,
        any::<bool>(),
        prop::option::of(1..VOCAB),
    )
        .prop_map(|(family, shared_len, tail, n, max_tokens, min_tokens, ignore_eos, stop)| Req {
            family,
            shared_len,
            tail,
            n,
            max_tokens,
            min_tokens,
            ignore_eos,
            stop,
        })
}

#[derive(Debug, Clone)]
enum Op {
    Add(Req),
    Step(u8),
    Abort(usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => req().prop_map(Op::Add),
        4 => (1..4u8).prop_map(Op::Step),
        1 => any::<usize>().prop_map(Op::Abort),
    ]
}

#[derive(Debug, Clone)]
struct Pools {
    block_size: usize,
    device: usize,
    host: usize,
    max_seqs: usize,
    budget: usize,
}

fn pools() -> impl Strategy<Value = Pools> {
    (1..=4usize, 4..32usize, 0..24usize, 1..12usize, 1..32usize)
        .prop_map(|(block_size, device, host, max_seqs, budget)| Pools { block_size, device, host, max_seqs, budget })
}

fn config(p: &Pools, mode: PreemptionMode, caching: bool, max_waiting: usize) -> EngineConfig {
    EngineConfig {
        block_size: p.block_size,
        num_device_blocks: p.device,
        num_host_blocks: p.host,
        max_num_seqs: p.max_seqs,
        max_num_batched_tokens: p.budget,
        preemption_mode: mode,
        enable_prefix_caching: caching,
        max_waiting_requests: max_waiting,
        max_waiting_tokens: 40 * max_waiting,
        max_model_len: 40,
        kv_allocation: KvAllocation::Paged,
    }
}

fn mode(recompute: bool) -> PreemptionMode {
    if recompute {
        PreemptionMode::Recompute
    } else {
        PreemptionMode::Swap
    }
}

/// Runs `workload` (each request added after `gap` steps) and drains it; returns the
/// accepted request ids and every sample's output.
fn run(cfg: EngineConfig, workload: &[(Req, u8)]) -> (Vec<u64>, BTreeMap<(u64, u32), SampleOutput>) {
    let mut h = Harness::new(cfg, vec![EOS], VOCAB);
    let mut accepted = Vec::new();
    for (id, (r, gap)) in workload.iter().enumerate() {
        for _ in 0..*gap {
            h.step();
        }
        match h.add(id as u64, r.prompt(), r.params()) {
            Ok(()) => accepted.push(id as u64),
            Err(AdmissionError::DoesNotFit { .. }) | Err(AdmissionError::Invalid(_)) => {}
            Err(e) => panic!("unexpected refusal: {e}"),
        }
    }
    h.drain();
    (accepted, h.outputs)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Random adds, steps and aborts keep every invariant (checked by the harness after
    /// each operation) and always drain, leaving every block free.
    #[test]
    fn random_operations_keep_invariants_and_drain(
        p in pools(),
        recompute in any::<bool>(),
        caching in any::<bool>(),
        max_waiting in 1..12usize,
        ops in prop::collection::vec(op(), 1..60),
    ) {
        let mut h = Harness::new(config(&p, mode(recompute), caching, max_waiting), vec![EOS], VOCAB);
        let mut accepted = Vec::new();
        for (id, op) in ops.iter().enumerate() {
            match op {
                Op::Add(r) => match h.add(id as u64, r.prompt(), r.params()) {
                    Ok(()) => accepted.push(id as u64),
                    Err(AdmissionError::QueueFull { waiting_requests, waiting_tokens, .. }) => {
                        prop_assert!(waiting_requests >= max_waiting || waiting_tokens + r.prompt().len() > 40 * max_waiting);
                    }
                    Err(AdmissionError::DoesNotFit { needed_blocks, .. }) => prop_assert!(needed_blocks > p.device),
                    Err(AdmissionError::Invalid(_)) => prop_assert!(r.n > p.max_seqs),
                    Err(e) => prop_assert!(false, "unexpected refusal: {}", e),
                },
                Op::Step(k) => {
                    for _ in 0..*k {
                        h.step();
                    }
                }
                Op::Abort(i) => {
                    if !accepted.is_empty() {
                        h.abort(accepted[i % accepted.len()]);
                    }
                }
            }
        }
        h.drain();
        prop_assert!(!h.sched.has_unfinished_requests());
        prop_assert_eq!(h.sched.num_running() + h.sched.num_waiting() + h.sched.num_swapped(), 0);
    }

    /// The tokens every request ends with depend neither on the pool size, the budget or
    /// the batch limit, nor on the preemption mode or prefix caching.
    #[test]
    fn outputs_do_not_depend_on_pools_preemption_or_caching(
        p in pools(),
        workload in prop::collection::vec((req(), 0..3u8), 1..14),
    ) {
        let huge = Pools { block_size: 4, device: 4096, host: 0, max_seqs: 64, budget: 4096 };
        let (_, reference) = run(config(&huge, PreemptionMode::Swap, false, 1000), &workload);
        for (recompute, caching) in [(false, false), (false, true), (true, false), (true, true)] {
            let (accepted, outputs) = run(config(&p, mode(recompute), caching, 1000), &workload);
            let expected: BTreeMap<_, _> = reference
                .iter()
                .filter(|((r, _), _)| accepted.contains(r))
                .map(|(k, v)| (*k, v.clone()))
                .collect();
            prop_assert_eq!(&outputs, &expected, "recompute={} caching={}", recompute, caching);
        }
    }
}
