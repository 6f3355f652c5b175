//! `pagemesh`: offline generation, synthetic models and benchmarks.

mod bench;
mod engine_args;
mod generate;
mod synth;

use clap::{Parser, Subcommand};

/// An LLM inference server built like vLLM inside: paged KV cache, continuous batching,
/// FCFS scheduling with swap/recompute preemption.
#[derive(Parser)]
#[command(name = "pagemesh", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Offline batch generation: every line of a JSONL file through the scheduler and executor.
    Generate(generate::GenerateArgs),
    /// Write a Llama model directory with random weights of a named shape.
    SynthModel(synth::SynthArgs),
    /// Benchmarks.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Generate(args) => generate::run(args),
        Command::SynthModel(args) => synth::run(args),
        Command::Bench(cmd) => bench::run(cmd),
    };
    if let Err(message) = result {
        eprintln!("error: {message}");
        std::process::exit(1);
    }
}
