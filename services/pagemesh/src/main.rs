//! `pagemesh`: the command line — the mesh services (`serve` runs them all), offline generation,
//! synthetic models, benchmarks and model fetching.

mod bench;
mod generate;
mod gguf_info;
mod launch;
mod model_hub;
mod synth;

use clap::{Parser, Subcommand};

/// An LLM inference server built like vLLM inside: paged KV cache, continuous batching,
/// FCFS scheduling with swap/recompute preemption.
#[derive(Parser)]
#[command(name = "pagemesh", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log lines as text (`human`) or one JSON object per line (`json`); the filter is
    /// `PAGEMESH_LOG` (default `info,async_nats=warn`).
    #[arg(long, global = true, env = "PAGEMESH_LOG_FORMAT", value_enum, default_value = "human")]
    log_format: pagemesh_bus::logging::LogFormat,
}

#[derive(Subcommand)]
enum Command {
    /// Offline batch generation: every line of a JSONL file through the scheduler and executor.
    Generate(generate::GenerateArgs),
    /// Write a Llama model directory with random weights of a named shape.
    SynthModel(synth::SynthArgs),
    /// Show what a GGUF file holds: version, metadata and tensor table, as JSON.
    GgufInfo(gguf_info::GgufInfoArgs),
    /// Benchmarks.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Serve a model: gateway, tokenizer, scheduler, executor(s) and detokenizer in one process,
    /// talking over NATS (a loopback nats-server is started when none is reachable).
    Serve(Box<launch::ServeArgs>),
    /// The OpenAI-compatible HTTP gateway.
    Gateway(launch::GatewayArgs),
    /// The tokenizer service (validation, chat templates, tokenization; a NATS queue group).
    Tokenizer(launch::TokenizerArgs),
    /// The scheduler service (one per model: block tables, queues, batching, failover).
    Scheduler(launch::SchedulerArgs),
    /// An executor (the model; runs the steps it is sent).
    Executor(launch::ExecutorArgs),
    /// A detokenizer (incremental text, stop strings, chunks to the client).
    Detokenizer(launch::DetokenizerArgs),
    /// Write the bus's accounts and permissions: an NKey seed per service role and per client,
    /// and the nats-server configuration that confines each to its own subjects.
    NatsConfig(launch::NatsConfigArgs),
    /// Make sure a model is on this machine (fetch a Hugging Face Hub id into the cache) and
    /// print its directory.
    Fetch(crate::model_hub::FetchArgs),
}

fn main() {
    let cli = Cli::parse_from(model_as_flag(std::env::args_os().collect()));
    pagemesh_bus::logging::init(cli.log_format);
    let result = match cli.command {
        Command::Generate(args) => generate::run(args),
        Command::SynthModel(args) => synth::run(args),
        Command::GgufInfo(args) => gguf_info::run(args),
        Command::Bench(cmd) => bench::run(cmd),
        Command::Serve(args) => launch::serve(*args),
        Command::Gateway(args) => launch::gateway(args),
        Command::Tokenizer(args) => launch::tokenizer(args),
        Command::Scheduler(args) => launch::scheduler(args),
        Command::Executor(args) => launch::executor(args),
        Command::Detokenizer(args) => launch::detokenizer(args),
        Command::NatsConfig(args) => launch::nats_config(args),
        Command::Fetch(args) => crate::model_hub::fetch(args),
    };
    if let Err(message) = result {
        eprintln!("error: {message}");
        std::process::exit(1);
    }
}

/// `pagemesh serve MODEL [flags]`, as `vllm serve MODEL` is written: the model named first,
/// without `--model`, becomes `--model MODEL`.
fn model_as_flag(mut args: Vec<std::ffi::OsString>) -> Vec<std::ffi::OsString> {
    let names_model = |arg: &std::ffi::OsString| !arg.to_string_lossy().starts_with('-');
    if args.get(1).is_some_and(|a| a == "serve") && args.get(2).is_some_and(names_model) {
        args.insert(2, "--model".into());
    }
    args
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(line: &str) -> Vec<std::ffi::OsString> {
        line.split(' ').map(Into::into).collect()
    }

    #[test]
    fn a_model_named_first_after_serve_becomes_the_model_flag() {
        assert_eq!(model_as_flag(words("pagemesh serve m --port 1")), words("pagemesh serve --model m --port 1"));
        assert_eq!(model_as_flag(words("pagemesh serve --model m")), words("pagemesh serve --model m"));
        assert_eq!(model_as_flag(words("pagemesh generate m")), words("pagemesh generate m"));
        let parsed = Cli::try_parse_from(model_as_flag(words("pagemesh serve owner/name --port 9")));
        assert!(parsed.is_ok(), "{}", parsed.err().map(|e| e.to_string()).unwrap_or_default());
    }
}
