//! `pagemesh bench sim`: the scheduler and a `sim` executor in process, on a workload.

use std::time::Instant;

use clap::Args;
use pagemesh_shared::{EngineConfig, KvAllocation, PreemptionMode};
use pagemesh_sim::workload::{self, WorkloadSource};
use pagemesh_sim::{presets, CostModel, SimExecutor};
use serde_json::json;

/// Flags of `pagemesh bench sim`.
#[derive(Args, Debug)]
pub struct SimBenchArgs {
    /// Model shape: llama-2-7b, llama-2-13b, llama-3-8b or chatglm3-6b.
    #[arg(long)]
    model: String,
    /// GPU: a100-80gb, a100-40gb, h100-80gb, rtx4090-24gb (or 24gb) or a10-24gb.
    #[arg(long)]
    gpu: String,
    /// Workload: sharegpt, alpaca, or a JSONL file (`{"prompt_len": N, "output_len": M}` per line).
    #[arg(long, default_value = "sharegpt")]
    workload: String,
    /// Requests to send.
    #[arg(long, default_value_t = 1000)]
    num_requests: usize,
    /// Poisson arrival rate in requests per simulated second (`inf`: all at once).
    #[arg(long, default_value_t = f64::INFINITY)]
    request_rate: f64,
    /// KV allocation: paged, contiguous (prompt + max_tokens reserved at admission) or
    /// contiguous-max-len (the whole context reserved).
    #[arg(long, default_value = "paged")]
    allocator: KvAllocation,
    /// Seed of the workload.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Tokens per KV block.
    #[arg(long, default_value_t = 16)]
    block_size: usize,
    /// Share of GPU memory for weights, activations and the KV pool.
    #[arg(long, default_value_t = 0.9)]
    gpu_memory_utilization: f64,
    /// Host memory for swapped-out blocks, GiB.
    #[arg(long, default_value_t = 4.0)]
    swap_space: f64,
    /// KV blocks in the device pool (default: what the GPU's memory holds).
    #[arg(long)]
    num_device_blocks: Option<usize>,
    /// Most sequences per step.
    #[arg(long, default_value_t = 256)]
    max_num_seqs: usize,
    /// Most tokens per step.
    #[arg(long, default_value_t = 2048)]
    max_num_batched_tokens: usize,
    /// What preemption does: swap or recompute.
    #[arg(long, default_value = "swap")]
    preemption_mode: PreemptionMode,
    /// Turn automatic prefix caching off.
    #[arg(long)]
    no_prefix_caching: bool,
    /// Longest sequence (default: the model's context length).
    #[arg(long)]
    max_model_len: Option<usize>,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

/// Runs `pagemesh bench sim`.
pub fn run(args: SimBenchArgs) -> Result<(), String> {
    let gpu = presets::gpu(&args.gpu)?;
    let model = presets::model(&args.model)?;
    if args.block_size == 0 || args.num_requests == 0 {
        return Err("--block-size and --num-requests must be at least 1".into());
    }
    if args.request_rate.is_nan() || args.request_rate <= 0.0 {
        return Err("--request-rate must be positive (inf: all at once)".into());
    }
    let utilization = args.gpu_memory_utilization;
    if utilization.is_nan()
        || utilization <= 0.0
        || utilization > 1.0
        || args.swap_space.is_nan()
        || args.swap_space < 0.0
    {
        return Err("--gpu-memory-utilization must be in (0, 1] and --swap-space at least 0".into());
    }
    let max_model_len = args.max_model_len.unwrap_or(model.max_model_len);
    let cost = CostModel::new(gpu, model, args.block_size);
    let pools = cost.pool_sizes(
        args.gpu_memory_utilization,
        args.max_num_batched_tokens,
        (args.swap_space * (1u64 << 30) as f64) as u64,
    )?;
    let num_device_blocks = args.num_device_blocks.unwrap_or(pools.num_device_blocks);
    let engine = EngineConfig {
        block_size: args.block_size,
        num_device_blocks,
        num_host_blocks: pools.num_host_blocks,
        max_num_seqs: args.max_num_seqs,
        max_num_batched_tokens: args.max_num_batched_tokens,
        preemption_mode: args.preemption_mode,
        enable_prefix_caching: !args.no_prefix_caching,
        max_waiting_requests: usize::MAX,
        max_waiting_tokens: usize::MAX,
        max_model_len,
        kv_allocation: args.allocator,
    };
    let source = WorkloadSource::parse(&args.workload)?;
    let requests = workload::generate(&source, args.num_requests, args.request_rate, max_model_len, args.seed);
    let executor = SimExecutor::new(cost, num_device_blocks, pools.num_host_blocks);
    let started = Instant::now();
    let report = pagemesh_sim::bench::run(engine, executor, &requests, args.seed)?;
    let wall_s = started.elapsed().as_secs_f64();
    let mut out = json!({
        "model": model.name,
        "gpu": gpu.name,
        "workload": args.workload,
        "allocator": args.allocator,
        "num_requests": args.num_requests,
        "request_rate": if args.request_rate.is_finite() { json!(args.request_rate) } else { json!("inf") },
        "seed": args.seed,
        "block_size": args.block_size,
        "max_num_seqs": args.max_num_seqs,
        "max_model_len": max_model_len,
        "wall_s": wall_s,
    });
    if let (Some(obj), Ok(serde_json::Value::Object(fields))) = (out.as_object_mut(), serde_json::to_value(&report)) {
        obj.extend(fields);
    }
    if args.json {
        println!("{out}");
        return Ok(());
    }
    println!(
        "{} on {} ({} allocation), {} requests of {}",
        model.name,
        gpu.name,
        args.allocator_name(),
        args.num_requests,
        args.workload
    );
    println!(
        "  KV pool             {} blocks ({} tokens), {} host blocks",
        report.num_device_blocks, report.kv_capacity_tokens, report.num_host_blocks
    );
    println!("  completed / failed  {} / {}", report.completed, report.failed);
    println!("  mean prompt/output  {:.1} / {:.1} tokens", report.mean_prompt_len, report.mean_output_len);
    println!("  simulated time      {:.1} s ({} steps)", report.duration_s, report.steps);
    println!(
        "  throughput          {:.2} req/s, {:.1} output tok/s, {:.1} total tok/s",
        report.request_throughput, report.output_tokens_per_s, report.total_tokens_per_s
    );
    println!(
        "  KV utilization      {:.1}% of allocated slots hold tokens ({:.1}% of the pool)",
        report.kv_utilization * 100.0,
        report.kv_pool_usage * 100.0
    );
    println!("  running             peak {}, mean {:.1}", report.peak_running, report.mean_running);
    println!(
        "  preemptions         {} ({} swap, {} recompute; {} blocks out, {} in)",
        report.preemptions,
        report.preemptions_swap,
        report.preemptions_recompute,
        report.blocks_swapped_out,
        report.blocks_swapped_in
    );
    println!("  TTFT  mean/p50/p99  {:.3} / {:.3} / {:.3} s", report.ttft_mean_s, report.ttft_p50_s, report.ttft_p99_s);
    println!("  TPOT  mean/p50/p99  {:.4} / {:.4} / {:.4} s", report.tpot_mean_s, report.tpot_p50_s, report.tpot_p99_s);
    println!("  ITL   mean/p50/p99  {:.4} / {:.4} / {:.4} s", report.itl_mean_s, report.itl_p50_s, report.itl_p99_s);
    println!("  E2E   mean/p50/p99  {:.2} / {:.2} / {:.2} s", report.e2e_mean_s, report.e2e_p50_s, report.e2e_p99_s);
    let at_full = report.scheduler_us_per_step_at_256_running.map_or("n/a".to_string(), |us| format!("{us:.1} µs"));
    println!(
        "  scheduler           {:.1} µs/step; at 256 running: {at_full} ({} steps)",
        report.scheduler_us_per_step, report.steps_at_256_running
    );
    println!("  wall time           {wall_s:.2} s");
    Ok(())
}

impl SimBenchArgs {
    fn allocator_name(&self) -> &'static str {
        match self.allocator {
            KvAllocation::Paged => "paged",
            KvAllocation::Contiguous => "contiguous",
            KvAllocation::ContiguousMaxLen => "contiguous-max-len",
        }
    }
}
