//! `pagemesh bench engine`: decode and prefill speed of the engine in process.

use std::time::Instant;

use clap::Args;
use pagemesh_shared::SamplingParams;
use serde_json::json;

use pagemesh_executor::backends::{DeviceArgs, StepBackend};
use pagemesh_executor::engine_args::EngineArgs;
use pagemesh_executor::weights::WeightStore;

/// Flags of `pagemesh bench engine`.
#[derive(Args, Debug)]
pub struct EngineBenchArgs {
    #[command(flatten)]
    engine: EngineArgs,
    #[command(flatten)]
    device: DeviceArgs,
    /// Batch sizes to measure decode at.
    #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
    batch_sizes: Vec<usize>,
    /// Prompt length of every request.
    #[arg(long, default_value_t = 64)]
    prompt_len: usize,
    /// Tokens generated per request.
    #[arg(long, default_value_t = 64)]
    decode_tokens: usize,
    /// Prompts in the prefill measurement.
    #[arg(long, default_value_t = 8)]
    prefill_requests: usize,
}

/// Seconds spent in prefill steps and in decode-only steps, and tokens fed in each.
#[derive(Default)]
struct Split {
    prefill_s: f64,
    prefill_tokens: usize,
    decode_s: f64,
    decode_tokens: usize,
}

fn prompt(len: usize, salt: usize, vocab: usize) -> Vec<u32> {
    (0..len).map(|i| (3 + (i * 7919 + salt * 104_729 + salt * salt) % (vocab - 3)) as u32).collect()
}

fn run_batch<B: StepBackend>(
    engine: &mut pagemesh_engine::Engine<B>,
    args: &EngineBenchArgs,
    batch: usize,
    max_tokens: usize,
) -> Result<Split, String> {
    // Prompts never repeat across runs, so that no prefix-cache hit shortens a prefill.
    static RUNS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let run = RUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let vocab = engine.vocab_size();
    for b in 0..batch {
        let params = SamplingParams { max_tokens, ignore_eos: true, ..SamplingParams::greedy(max_tokens) };
        engine.add_request(prompt(args.prompt_len, b + run * 1000, vocab), params).map_err(|e| e.to_string())?;
    }
    let mut split = Split::default();
    while engine.has_unfinished_requests() {
        let started = Instant::now();
        engine.step().map_err(|e| e.to_string())?;
        let elapsed = started.elapsed().as_secs_f64();
        if let Some(shape) = engine.last_step_shape() {
            if shape.tokens == shape.seqs {
                split.decode_s += elapsed;
                split.decode_tokens += shape.tokens;
            } else {
                split.prefill_s += elapsed;
                split.prefill_tokens += shape.tokens;
            }
        }
    }
    Ok(split)
}

/// Runs `pagemesh bench engine`.
pub fn run(args: EngineBenchArgs) -> Result<(), String> {
    {
        {
            pagemesh_executor::backends::cuda::check_device(&args.device, &args.engine)?;
            let mut engine = pagemesh_engine::build_on(&args.engine, &args.device)?;
            let dtype = match args.engine.dtype.0 {
                Some(d) => format!("{d:?}"),
                None => {
                    let store = WeightStore::open(&args.engine.model).map_err(|e| e.to_string())?;
                    format!(
                        "{:?}",
                        store
                            .dtype_of("model.embed_tokens.weight")
                            .unwrap_or(pagemesh_executor::weights::WeightDtype::F32)
                    )
                }
            };
            let threads = rayon::current_num_threads();
            // Warm up caches and thread pools.
            run_batch(&mut engine, &args, 1, 4)?;
            let mut decode = Vec::new();
            for &batch in &args.batch_sizes {
                let split = run_batch(&mut engine, &args, batch, args.decode_tokens)?;
                let tok_s = split.decode_tokens as f64 / split.decode_s;
                eprintln!(
                    "decode batch {batch:>3}: {tok_s:9.1} tok/s ({} tokens in {:.2} s)",
                    split.decode_tokens, split.decode_s
                );
                decode.push(json!({"batch": batch, "tokens_per_s": tok_s, "tokens": split.decode_tokens, "seconds": split.decode_s}));
            }
            let split = run_batch(&mut engine, &args, args.prefill_requests, 1)?;
            let prefill_tok_s = split.prefill_tokens as f64 / split.prefill_s;
            eprintln!(
                "prefill: {prefill_tok_s:9.1} tok/s ({} tokens in {:.2} s)",
                split.prefill_tokens, split.prefill_s
            );
            println!(
                "{}",
                json!({"model": args.engine.model, "device": args.device.device, "dtype": dtype, "threads": threads, "prompt_len": args.prompt_len,
                       "decode": decode, "prefill_tokens_per_s": prefill_tok_s})
            );
            Ok(())
        }
    }
}
