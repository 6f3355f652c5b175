//! `pagemesh bench serve`: a load generator against a running mesh, like `vllm bench serve`.
//!
//! Requests of a workload (synthetic ShareGPT-like or Alpaca-like lengths, or a JSONL
//! dataset) are sent at Poisson arrival times (`--request-rate`) and/or under a
//! concurrency cap (`--max-concurrency`), over HTTP (OpenAI streaming completions) or NATS.
//! Each request asks for exactly its output length (eos ignored). The report gives request
//! and token throughput and mean / median / p99 of TTFT, TPOT (after the first token),
//! inter-token latency and end-to-end latency.

use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::launch::NatsArgs;
use clap::{Args, ValueEnum};
use indicatif::ProgressBar;
use pagemesh_sim::rng::Rng;
use pagemesh_sim::stats::{summarize, Summary};
use pagemesh_sim::workload::{self, WorkloadSource};
use serde_json::{json, Value};

use super::serve_client::{http_request, nats_request, BenchRequest, Outcome};

/// How requests reach the mesh.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Backend {
    /// The gateway's OpenAI-compatible HTTP API (streaming completions).
    Openai,
    /// Straight onto NATS (`<prefix>.generate`).
    Nats,
}

/// Flags of `pagemesh bench serve`.
#[derive(Args, Debug)]
pub struct ServeBenchArgs {
    /// Where requests go.
    #[arg(long, value_enum, default_value = "openai")]
    backend: Backend,
    /// Base URL of the gateway (openai backend).
    #[arg(long, default_value = "http://127.0.0.1:8000")]
    url: String,
    /// API key sent as a bearer token (openai backend).
    #[arg(long, env = "OPENAI_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Served model name (openai backend; default: the first one `/v1/models` lists).
    #[arg(long)]
    model: Option<String>,
    #[command(flatten)]
    nats: NatsArgs,
    /// Workload: sharegpt, alpaca, or a JSONL file (`{"prompt": "...", "output_len": M}` or
    /// `{"prompt_len": N, "output_len": M}` per line).
    #[arg(long, default_value = "sharegpt")]
    workload: String,
    /// Requests to send.
    #[arg(long, default_value_t = 200)]
    num_prompts: usize,
    /// Poisson arrival rate, requests/s (`inf`: all at once).
    #[arg(long, default_value_t = f64::INFINITY)]
    request_rate: f64,
    /// Most requests in flight at once (default: no limit).
    #[arg(long)]
    max_concurrency: Option<usize>,
    /// Seed of the workload (lengths, arrivals, prompt tokens).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Longest prompt + output a request may have (lengths are clipped to it).
    #[arg(long, default_value_t = 2048)]
    max_model_len: usize,
    /// Synthetic prompts are token ids drawn from `3 .. prompt_vocab` (valid for any model
    /// whose vocabulary is at least this large).
    #[arg(long, default_value_t = 500)]
    prompt_vocab: u32,
    /// Seconds a request may take before it counts as failed.
    #[arg(long, default_value_t = 600)]
    timeout_s: u64,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

/// Runs `pagemesh bench serve`.
pub fn run(args: ServeBenchArgs) -> Result<(), String> {
    if args.num_prompts == 0 || args.max_concurrency == Some(0) || args.prompt_vocab < 4 {
        return Err("--num-prompts and --max-concurrency must be at least 1, --prompt-vocab at least 4".into());
    }
    if args.request_rate.is_nan() || args.request_rate <= 0.0 {
        return Err("--request-rate must be positive (inf: all at once)".into());
    }
    let source = WorkloadSource::parse(&args.workload)?;
    let specs = workload::generate(&source, args.num_prompts, args.request_rate, args.max_model_len, args.seed);
    let mut rng = Rng::new(args.seed ^ 0x9E37);
    let requests: Vec<(f64, BenchRequest)> = specs
        .iter()
        .map(|s| {
            let prompt = match &s.prompt {
                Some(text) => Value::String(text.clone()),
                None => json!((0..s.prompt_len)
                    .map(|_| 3 + (rng.next_u64() % (args.prompt_vocab as u64 - 3)) as u32)
                    .collect::<Vec<_>>()),
            };
            (s.arrival_s, BenchRequest { prompt, max_tokens: s.output_len })
        })
        .collect();
    let progress = ProgressBar::new(requests.len() as u64);
    let started = Instant::now();
    let outcomes = match args.backend {
        Backend::Openai => run_http(&args, requests, &progress)?,
        Backend::Nats => run_nats(&args, requests, &progress)?,
    };
    let duration = started.elapsed().as_secs_f64();
    progress.finish_and_clear();
    let report = report(&args, &outcomes, duration);
    if args.json {
        println!("{report}");
    } else {
        print_table(&report);
    }
    Ok(())
}

/// A counting semaphore over a channel: `acquire` takes a permit, dropping it gives it back.
struct Permits(mpsc::SyncSender<()>, std::sync::Mutex<mpsc::Receiver<()>>);

impl Permits {
    fn new(n: usize) -> Arc<Self> {
        let (tx, rx) = mpsc::sync_channel(n);
        for _ in 0..n {
            let _ = tx.send(());
        }
        Arc::new(Self(tx, std::sync::Mutex::new(rx)))
    }

    fn acquire(&self) {
        if let Ok(rx) = self.1.lock() {
            let _ = rx.recv();
        }
    }

    fn release(&self) {
        let _ = self.0.send(());
    }
}

fn run_http(
    args: &ServeBenchArgs,
    requests: Vec<(f64, BenchRequest)>,
    progress: &ProgressBar,
) -> Result<Vec<Outcome>, String> {
    let agent = ureq::AgentBuilder::new()
        .timeout_connect(Duration::from_secs(10))
        .timeout(Duration::from_secs(args.timeout_s))
        .max_idle_connections_per_host(1024)
        .build();
    let model = match &args.model {
        Some(m) => m.clone(),
        None => first_model(&agent, &args.url, args.api_key.as_deref())?,
    };
    let permits = Permits::new(args.max_concurrency.unwrap_or(requests.len()));
    let started = Instant::now();
    let mut handles = Vec::with_capacity(requests.len());
    for (arrival, req) in requests {
        if let Some(wait) = Duration::from_secs_f64(arrival).checked_sub(started.elapsed()) {
            std::thread::sleep(wait);
        }
        permits.acquire();
        let (agent, url, key, model, permits, progress) =
            (agent.clone(), args.url.clone(), args.api_key.clone(), model.clone(), permits.clone(), progress.clone());
        handles.push(std::thread::spawn(move || {
            let outcome = http_request(&agent, &url, key.as_deref(), &model, &req);
            permits.release();
            progress.inc(1);
            outcome
        }));
    }
    Ok(handles.into_iter().map(|h| h.join().unwrap_or_else(|_| failed("the request thread panicked"))).collect())
}

fn failed(message: &str) -> Outcome {
    Outcome { error: Some(message.to_string()), ..Outcome::default() }
}

fn first_model(agent: &ureq::Agent, url: &str, key: Option<&str>) -> Result<String, String> {
    let mut call = agent.get(&format!("{}/v1/models", url.trim_end_matches('/')));
    if let Some(key) = key {
        call = call.set("Authorization", &format!("Bearer {key}"));
    }
    let body: Value = call
        .call()
        .map_err(|e| format!("cannot list models at {url}: {e}"))?
        .into_json()
        .map_err(|e| format!("bad /v1/models answer: {e}"))?;
    body["data"][0]["id"].as_str().map(str::to_string).ok_or_else(|| format!("{url}/v1/models lists no model"))
}

fn run_nats(
    args: &ServeBenchArgs,
    requests: Vec<(f64, BenchRequest)>,
    progress: &ProgressBar,
) -> Result<Vec<Outcome>, String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start an async runtime: {e}"))?;
    let options = args.nats.options(None)?;
    let timeout = Duration::from_secs(args.timeout_s);
    let limit = args.max_concurrency.unwrap_or(requests.len());
    runtime.block_on(async move {
        let bus = pagemesh_bus::bus::Bus::connect(&options, "pagemesh-bench", Duration::from_secs(10))
            .await
            .map_err(|e| e.to_string())?;
        let subject = bus.subjects.generate().subject().to_string();
        let permits = Arc::new(tokio::sync::Semaphore::new(limit));
        let started = tokio::time::Instant::now();
        let mut tasks = Vec::with_capacity(requests.len());
        for (arrival, req) in requests {
            tokio::time::sleep_until(started + Duration::from_secs_f64(arrival)).await;
            let permit = permits.clone().acquire_owned().await.map_err(|e| e.to_string())?;
            let (client, subject, progress) = (bus.client.clone(), subject.clone(), progress.clone());
            tasks.push(tokio::spawn(async move {
                let outcome = nats_request(&client, &subject, &req, timeout).await;
                drop(permit);
                progress.inc(1);
                outcome
            }));
        }
        let mut outcomes = Vec::with_capacity(tasks.len());
        for task in tasks {
            outcomes.push(task.await.unwrap_or_else(|_| failed("the request task panicked")));
        }
        Ok(outcomes)
    })
}

fn ms(summary: &Summary) -> (f64, f64, f64) {
    (summary.mean * 1e3, summary.p50 * 1e3, summary.p99 * 1e3)
}

fn report(args: &ServeBenchArgs, outcomes: &[Outcome], duration: f64) -> Value {
    let ok: Vec<&Outcome> = outcomes.iter().filter(|o| o.error.is_none()).collect();
    let errors: Vec<&str> = outcomes.iter().filter_map(|o| o.error.as_deref()).take(5).collect();
    let input: usize = ok.iter().map(|o| o.prompt_tokens).sum();
    let output: usize = ok.iter().map(|o| o.output_tokens).sum();
    let ttft = summarize(ok.iter().map(|o| o.ttft).collect());
    let tpot = summarize(
        ok.iter().filter(|o| o.output_tokens > 1).map(|o| (o.e2e - o.ttft) / (o.output_tokens - 1) as f64).collect(),
    );
    let itl = summarize(ok.iter().flat_map(|o| o.itl.iter().copied()).collect());
    let e2e = summarize(ok.iter().map(|o| o.e2e).collect());
    let mut out = json!({
        "backend": format!("{:?}", args.backend).to_lowercase(),
        "workload": args.workload,
        "num_prompts": outcomes.len(),
        "request_rate": if args.request_rate.is_finite() { json!(args.request_rate) } else { json!("inf") },
        "max_concurrency": args.max_concurrency,
        "seed": args.seed,
        "completed": ok.len(),
        "failed": outcomes.len() - ok.len(),
        "errors": errors,
        "duration_s": duration,
        "total_input_tokens": input,
        "total_output_tokens": output,
        "request_throughput": ok.len() as f64 / duration,
        "output_throughput": output as f64 / duration,
        "total_token_throughput": (input + output) as f64 / duration,
    });
    if let Some(obj) = out.as_object_mut() {
        for (name, s) in [("ttft", ttft), ("tpot", tpot), ("itl", itl), ("e2el", e2e)] {
            let (mean, median, p99) = ms(&s);
            obj.insert(format!("mean_{name}_ms"), json!(mean));
            obj.insert(format!("median_{name}_ms"), json!(median));
            obj.insert(format!("p99_{name}_ms"), json!(p99));
        }
    }
    out
}

fn print_table(r: &Value) {
    let f = |k: &str| r[k].as_f64().unwrap_or(0.0);
    println!("============ Serving Benchmark Result ============");
    println!("{:<40}{}", "Backend:", r["backend"].as_str().unwrap_or(""));
    println!("{:<40}{}", "Successful requests:", r["completed"]);
    println!("{:<40}{}", "Failed requests:", r["failed"]);
    println!("{:<40}{:.2}", "Benchmark duration (s):", f("duration_s"));
    println!("{:<40}{}", "Total input tokens:", r["total_input_tokens"]);
    println!("{:<40}{}", "Total generated tokens:", r["total_output_tokens"]);
    println!("{:<40}{:.2}", "Request throughput (req/s):", f("request_throughput"));
    println!("{:<40}{:.2}", "Output token throughput (tok/s):", f("output_throughput"));
    println!("{:<40}{:.2}", "Total token throughput (tok/s):", f("total_token_throughput"));
    for (title, name) in [
        ("Time to First Token", "ttft"),
        ("Time per Output Token (excl. 1st token)", "tpot"),
        ("Inter-token Latency", "itl"),
        ("End-to-end Latency", "e2el"),
    ] {
        println!("{:-^50}", title);
        let upper = name.to_uppercase();
        println!("{:<40}{:.2}", format!("Mean {upper} (ms):"), f(&format!("mean_{name}_ms")));
        println!("{:<40}{:.2}", format!("Median {upper} (ms):"), f(&format!("median_{name}_ms")));
        println!("{:<40}{:.2}", format!("P99 {upper} (ms):"), f(&format!("p99_{name}_ms")));
    }
    if let Some(errors) = r["errors"].as_array().filter(|e| !e.is_empty()) {
        println!("{:-^50}", "First errors");
        for e in errors {
            println!("{}", e.as_str().unwrap_or(""));
        }
    }
    println!("{}", "=".repeat(50));
}
