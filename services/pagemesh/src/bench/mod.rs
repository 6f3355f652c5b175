//! `pagemesh bench`: the project's measuring instruments.
//!
//! * `engine`: decode and prefill tokens/s of the engine in process.
//! * `sim`: the scheduler with the `sim` executor on a simulated GPU.
//! * `serve`: a load generator against a running mesh (HTTP or NATS).

mod engine;
mod serve;
mod serve_client;
mod sim;

use clap::Subcommand;

/// Benchmarks.
#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// Decode tokens/s at several batch sizes and prefill tokens/s, in process.
    Engine(engine::EngineBenchArgs),
    /// The real scheduler and a simulated GPU (cost model, simulated clock) on a serving
    /// workload: throughput, latencies, KV utilization, preemptions.
    Sim(sim::SimBenchArgs),
    /// Load against a running mesh over HTTP (OpenAI API) or NATS: throughput and TTFT,
    /// TPOT, inter-token and end-to-end latency.
    Serve(serve::ServeBenchArgs),
}

/// Runs a benchmark.
pub fn run(cmd: BenchCommand) -> Result<(), String> {
    match cmd {
        BenchCommand::Engine(args) => engine::run(args),
        BenchCommand::Sim(args) => sim::run(args),
        BenchCommand::Serve(args) => serve::run(args),
    }
}
