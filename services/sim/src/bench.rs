//! `bench sim`: the real scheduler and a [`SimExecutor`] in one process, on a simulated
//! clock.
//!
//! Requests arrive at their workload times; each step's plan is run by the sim executor and
//! the clock advances by its simulated duration; tokens are stamped with the clock. Nothing
//! sleeps, so hours of traffic take seconds. The scheduler's own time (schedule +
//! process_output) is measured on the wall clock.

use std::time::Instant;

use pagemesh_scheduler::{NewRequest, Scheduler};
use pagemesh_shared::{EngineConfig, SamplingParams};
use serde::Serialize;

use crate::executor::SimExecutor;
use crate::rng::Rng;
use crate::stats::{summarize, Summary};
use crate::workload::RequestSpec;

/// Steps with at least this many running requests are timed separately.
pub const FULL_BATCH: usize = 256;

/// Token id the simulated model ends sequences with (requests ignore it).
const EOS: u32 = 2;

/// The outcome of a simulation.
#[derive(Debug, Clone, Serialize)]
pub struct SimReport {
    /// Requests that finished.
    pub completed: usize,
    /// Requests refused at admission.
    pub failed: usize,
    /// Device KV blocks.
    pub num_device_blocks: usize,
    /// Host (swap) KV blocks.
    pub num_host_blocks: usize,
    /// Tokens the device pool holds.
    pub kv_capacity_tokens: usize,
    /// Mean prompt length of the completed requests.
    pub mean_prompt_len: f64,
    /// Mean output length of the completed requests.
    pub mean_output_len: f64,
    /// Simulated seconds from the first arrival to the last token.
    pub duration_s: f64,
    /// Completed requests per simulated second.
    pub request_throughput: f64,
    /// Generated tokens per simulated second.
    pub output_tokens_per_s: f64,
    /// Prompt and generated tokens per simulated second.
    pub total_tokens_per_s: f64,
    /// Time-averaged share of allocated KV token slots that hold a token.
    pub kv_utilization: f64,
    /// Time-averaged share of the device pool's slots that hold a token.
    pub kv_pool_usage: f64,
    /// Most requests running in one step.
    pub peak_running: usize,
    /// Time-averaged running requests.
    pub mean_running: f64,
    /// Preemptions (swap + recompute).
    pub preemptions: u64,
    /// Preemptions by swapping.
    pub preemptions_swap: u64,
    /// Preemptions by recomputation.
    pub preemptions_recompute: u64,
    /// Blocks copied to host.
    pub blocks_swapped_out: u64,
    /// Blocks copied back to the device.
    pub blocks_swapped_in: u64,
    /// Prefix-cache hit tokens over queried tokens.
    pub prefix_cache_hit_rate: f64,
    /// Time to first token.
    pub ttft_mean_s: f64,
    /// Median time to first token.
    pub ttft_p50_s: f64,
    /// 99th percentile time to first token.
    pub ttft_p99_s: f64,
    /// Mean time per output token after the first.
    pub tpot_mean_s: f64,
    /// Median time per output token.
    pub tpot_p50_s: f64,
    /// 99th percentile time per output token.
    pub tpot_p99_s: f64,
    /// Mean gap between consecutive tokens.
    pub itl_mean_s: f64,
    /// Median gap between consecutive tokens.
    pub itl_p50_s: f64,
    /// 99th percentile gap between consecutive tokens.
    pub itl_p99_s: f64,
    /// Mean end-to-end latency.
    pub e2e_mean_s: f64,
    /// Median end-to-end latency.
    pub e2e_p50_s: f64,
    /// 99th percentile end-to-end latency.
    pub e2e_p99_s: f64,
    /// Steps run.
    pub steps: u64,
    /// Wall-clock microseconds the scheduler spent per step (schedule + process_output).
    pub scheduler_us_per_step: f64,
    /// The same over steps with at least [`FULL_BATCH`] requests running (none: null).
    pub scheduler_us_per_step_at_256_running: Option<f64>,
    /// Steps with at least [`FULL_BATCH`] requests running.
    pub steps_at_256_running: u64,
}

/// What happened to one request.
#[derive(Debug, Clone, Default)]
struct Track {
    arrival: f64,
    first_token: Option<f64>,
    last_token: f64,
    tokens: usize,
    done: bool,
}

/// Time integrals accumulated over steps.
#[derive(Debug, Default)]
struct Integrals {
    filled: f64,
    allocated: f64,
    running: f64,
    time: f64,
}

/// Runs `requests` through a scheduler configured by `engine` and `executor`.
pub fn run(
    engine: EngineConfig,
    mut executor: SimExecutor,
    requests: &[RequestSpec],
    seed: u64,
) -> Result<SimReport, String> {
    pagemesh_scheduler::validate_config(&engine)?;
    let vocab = executor.cost_model().model.vocab_size as u32;
    let (num_device_blocks, num_host_blocks, block_size) =
        (engine.num_device_blocks, engine.num_host_blocks, engine.block_size);
    let mut sched = Scheduler::new(engine, vec![EOS]);
    let mut tracks: Vec<Track> = vec![Track::default(); requests.len()];
    let mut itl = Vec::new();
    let mut rng = Rng::new(seed ^ 0x5EED);
    let (mut now, mut next, mut failed) = (0.0f64, 0usize, 0usize);
    let (mut sched_s, mut full_s, mut full_steps, mut steps) = (0.0f64, 0.0f64, 0u64, 0u64);
    let mut peak_running = 0;
    let mut acc = Integrals::default();
    loop {
        while next < requests.len() && requests[next].arrival_s <= now {
            let spec = &requests[next];
            tracks[next].arrival = spec.arrival_s;
            let prompt = (0..spec.prompt_len).map(|_| 3 + (rng.next_u64() % (vocab as u64 - 3)) as u32).collect();
            let params = SamplingParams { max_tokens: spec.output_len, ignore_eos: true, ..SamplingParams::default() };
            let req = NewRequest {
                request_id: next as u64,
                prompt_token_ids: prompt,
                params,
                seed: next as u64,
                resumed_output: Vec::new(),
            };
            if sched.add_request(req).is_err() {
                failed += 1;
                tracks[next].done = true;
            }
            next += 1;
        }
        let started = Instant::now();
        let plan = sched.schedule();
        let mut spent = started.elapsed().as_secs_f64();
        let Some(plan) = plan else {
            if next < requests.len() {
                now = now.max(requests[next].arrival_s);
                continue;
            }
            if sched.has_unfinished_requests() {
                return Err("the scheduler stalled with unfinished requests".into());
            }
            break;
        };
        let running = sched.num_running();
        peak_running = peak_running.max(running);
        let occupancy = sched.kv_occupancy();
        let (output, cost) = executor.execute(&plan)?;
        now += cost.seconds;
        acc.filled += occupancy.filled_slots as f64 * cost.seconds;
        acc.allocated += occupancy.allocated_slots as f64 * cost.seconds;
        acc.running += running as f64 * cost.seconds;
        acc.time += cost.seconds;
        let started = Instant::now();
        let events = sched.process_output(&output);
        spent += started.elapsed().as_secs_f64();
        steps += 1;
        sched_s += spent;
        if running >= FULL_BATCH {
            full_s += spent;
            full_steps += 1;
        }
        for event in events {
            let t = &mut tracks[event.request_id as usize];
            if event.token.is_some() {
                match t.first_token {
                    None => t.first_token = Some(now),
                    Some(_) => itl.push(now - t.last_token),
                }
                t.last_token = now;
                t.tokens += 1;
            }
            if event.finish.is_some() {
                t.done = true;
            }
        }
    }
    sched.check_invariants()?;
    let usage = sched.block_usage();
    if usage.device_free != usage.device_total || usage.host_free != usage.host_total {
        return Err(format!("blocks leaked: {usage:?}"));
    }
    let done: Vec<(usize, &Track)> = tracks.iter().enumerate().filter(|(_, t)| t.first_token.is_some()).collect();
    let completed = done.len();
    let output_tokens: usize = done.iter().map(|(_, t)| t.tokens).sum();
    let prompt_tokens: usize = done.iter().map(|(i, _)| requests[*i].prompt_len).sum();
    let duration = done.iter().map(|(_, t)| t.last_token).fold(0.0, f64::max);
    let ttft = summarize(done.iter().filter_map(|(_, t)| t.first_token.map(|f| f - t.arrival)).collect());
    let tpot = summarize(
        done.iter()
            .filter(|(_, t)| t.tokens > 1)
            .filter_map(|(_, t)| t.first_token.map(|f| (t.last_token - f) / (t.tokens - 1) as f64))
            .collect(),
    );
    let e2e = summarize(done.iter().map(|(_, t)| t.last_token - t.arrival).collect());
    let itl = summarize(itl);
    let stats = sched.stats();
    let per_s = |x: f64| if duration > 0.0 { x / duration } else { 0.0 };
    let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { 0.0 };
    let Summary { mean: ttft_mean_s, p50: ttft_p50_s, p99: ttft_p99_s, .. } = ttft;
    Ok(SimReport {
        completed,
        failed,
        num_device_blocks,
        num_host_blocks,
        kv_capacity_tokens: num_device_blocks * block_size,
        mean_prompt_len: ratio(prompt_tokens as f64, completed as f64),
        mean_output_len: ratio(output_tokens as f64, completed as f64),
        duration_s: duration,
        request_throughput: per_s(completed as f64),
        output_tokens_per_s: per_s(output_tokens as f64),
        total_tokens_per_s: per_s((output_tokens + prompt_tokens) as f64),
        kv_utilization: ratio(acc.filled, acc.allocated),
        kv_pool_usage: ratio(acc.filled, acc.time * (num_device_blocks * block_size) as f64),
        peak_running,
        mean_running: ratio(acc.running, acc.time),
        preemptions: stats.preemptions_swap + stats.preemptions_recompute,
        preemptions_swap: stats.preemptions_swap,
        preemptions_recompute: stats.preemptions_recompute,
        blocks_swapped_out: stats.blocks_swapped_out,
        blocks_swapped_in: stats.blocks_swapped_in,
        prefix_cache_hit_rate: ratio(stats.prefix_cache_hit_tokens as f64, stats.prefix_cache_queried_tokens as f64),
        ttft_mean_s,
        ttft_p50_s,
        ttft_p99_s,
        tpot_mean_s: tpot.mean,
        tpot_p50_s: tpot.p50,
        tpot_p99_s: tpot.p99,
        itl_mean_s: itl.mean,
        itl_p50_s: itl.p50,
        itl_p99_s: itl.p99,
        e2e_mean_s: e2e.mean,
        e2e_p50_s: e2e.p50,
        e2e_p99_s: e2e.p99,
        steps,
        scheduler_us_per_step: ratio(sched_s * 1e6, steps as f64),
        scheduler_us_per_step_at_256_running: (full_steps > 0).then(|| full_s * 1e6 / full_steps as f64),
        steps_at_256_running: full_steps,
    })
}

#[cfg(test)]
mod tests {
    use pagemesh_shared::{KvAllocation, PreemptionMode};

    use super::*;
    use crate::cost::CostModel;
    use crate::presets::{gpu, model};
    use crate::workload::{generate, WorkloadSource, SHAREGPT};

    fn simulate(
        allocation: KvAllocation,
        blocks: usize,
        mode: PreemptionMode,
        rate: f64,
    ) -> (SimReport, Vec<RequestSpec>) {
        let cost = CostModel::new(gpu("a100-80gb").expect("preset"), model("llama-2-13b").expect("preset"), 16);
        let engine = EngineConfig {
            num_device_blocks: blocks,
            num_host_blocks: 64,
            preemption_mode: mode,
            kv_allocation: allocation,
            max_waiting_requests: usize::MAX,
            max_waiting_tokens: usize::MAX,
            max_model_len: 2048,
            ..EngineConfig::default()
        };
        let requests = generate(&WorkloadSource::Synthetic(SHAREGPT), 300, rate, 2048, 9);
        let executor = SimExecutor::new(cost, blocks, 64);
        (run(engine, executor, &requests, 9).expect("the simulation completes"), requests)
    }

    #[test]
    fn every_request_completes_and_the_report_adds_up() {
        let (r, requests) = simulate(KvAllocation::Paged, 1000, PreemptionMode::Swap, 4.0);
        assert_eq!((r.completed, r.failed), (300, 0));
        let outputs: usize = requests.iter().map(|q| q.output_len).sum();
        assert!((r.mean_output_len * 300.0 - outputs as f64).abs() < 1e-6, "every token was generated");
        assert!((r.output_tokens_per_s * r.duration_s - outputs as f64).abs() < 1e-3);
        for (p50, p99, mean) in [
            (r.ttft_p50_s, r.ttft_p99_s, r.ttft_mean_s),
            (r.tpot_p50_s, r.tpot_p99_s, r.tpot_mean_s),
            (r.itl_p50_s, r.itl_p99_s, r.itl_mean_s),
            (r.e2e_p50_s, r.e2e_p99_s, r.e2e_mean_s),
        ] {
            assert!(0.0 < p50 && p50 <= p99 && mean > 0.0, "{r:?}");
        }
        assert!(r.e2e_p50_s >= r.ttft_p50_s);
        assert!(r.kv_utilization > 0.9 && r.kv_utilization <= 1.0, "{}", r.kv_utilization);
        assert!(r.peak_running as f64 >= r.mean_running && r.peak_running <= 256);
    }

    #[test]
    fn paged_allocation_wastes_less_and_runs_more_requests_than_the_contiguous_baseline() {
        let (paged, _) = simulate(KvAllocation::Paged, 1000, PreemptionMode::Swap, f64::INFINITY);
        let (contiguous, _) = simulate(KvAllocation::Contiguous, 1000, PreemptionMode::Swap, f64::INFINITY);
        assert!(paged.kv_utilization > 0.96, "paged {}", paged.kv_utilization);
        assert!(contiguous.kv_utilization < 0.8, "contiguous {}", contiguous.kv_utilization);
        assert!(
            paged.mean_running > 1.3 * contiguous.mean_running,
            "{} vs {}",
            paged.mean_running,
            contiguous.mean_running
        );
        assert!(paged.output_tokens_per_s > contiguous.output_tokens_per_s);
        assert_eq!(contiguous.preemptions, 0, "reserved blocks never run out");
    }

    #[test]
    fn a_small_pool_preempts_by_swap_or_recompute_and_still_finishes_everything() {
        for mode in [PreemptionMode::Swap, PreemptionMode::Recompute] {
            let (r, _) = simulate(KvAllocation::Paged, 200, mode, f64::INFINITY);
            assert_eq!(r.completed, 300);
            assert!(r.preemptions > 0, "{mode:?}: {r:?}");
            match mode {
                PreemptionMode::Swap => {
                    assert!(r.blocks_swapped_out > 0 && r.blocks_swapped_in == r.blocks_swapped_out)
                }
                PreemptionMode::Recompute => assert_eq!(r.preemptions, r.preemptions_recompute),
            }
        }
    }

    #[test]
    fn the_same_seed_gives_the_same_simulation() {
        let (a, _) = simulate(KvAllocation::Paged, 400, PreemptionMode::Swap, 8.0);
        let (b, _) = simulate(KvAllocation::Paged, 400, PreemptionMode::Swap, 8.0);
        assert_eq!(
            (a.duration_s, a.steps, a.preemptions, a.ttft_p99_s),
            (b.duration_s, b.steps, b.preemptions, b.ttft_p99_s)
        );
    }
}
