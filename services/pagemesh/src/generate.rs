//! `pagemesh generate`: offline batch generation from a JSONL file.
//!
//! Every input line is a JSON object with `prompt` (text) or `prompt_token_ids`, plus sampling
//! fields named as in the OpenAI API. All lines are submitted at once; each output line, in
//! input order, is shaped like vLLM's `RequestOutput`, or `{"error": ...}` for a refused line.
//! A JSON line of statistics goes to stderr at the end.

use std::io::{BufRead, BufWriter, Write};
use std::path::PathBuf;
use std::time::Instant;

use clap::Args;
use pagemesh_engine::{RequestOutput, SampleOutput};
use pagemesh_shared::SamplingParams;
use pagemesh_tokenizer::TextTokenizer;
use serde_json::{json, Value};

use pagemesh_executor::backends::DeviceArgs;
use pagemesh_executor::engine_args::EngineArgs;

/// Flags of `pagemesh generate`.
#[derive(Args, Debug)]
pub struct GenerateArgs {
    #[command(flatten)]
    engine: EngineArgs,
    #[command(flatten)]
    device: DeviceArgs,
    /// JSONL file of requests.
    #[arg(long)]
    input: PathBuf,
    /// JSONL file the outputs are written to, in input order.
    #[arg(long)]
    output: PathBuf,
}

/// One parsed input line.
struct InputLine {
    prompt: Option<String>,
    prompt_token_ids: Vec<u32>,
    params: SamplingParams,
}

fn parse_line(line: &str, tokenizer: &TextTokenizer) -> Result<InputLine, String> {
    let mut object = match serde_json::from_str::<Value>(line) {
        Ok(Value::Object(o)) => o,
        Ok(_) => return Err("each line must be a JSON object".into()),
        Err(e) => return Err(format!("invalid JSON: {e}")),
    };
    let prompt = object.remove("prompt");
    let ids = object.remove("prompt_token_ids");
    let params: SamplingParams = serde_path_to_error::deserialize(Value::Object(object)).map_err(|e| {
        let field = e.path().to_string();
        if field == "." {
            format!("invalid sampling parameters: {}", e.inner())
        } else {
            format!("invalid value for {field}: {}", e.inner())
        }
    })?;
    params.validate()?;
    params.check_vocab(tokenizer.vocab_size())?;
    match (prompt, ids) {
        (Some(Value::String(text)), None) => {
            let ids = tokenizer.encode(&text).map_err(|e| e.to_string())?;
            Ok(InputLine { prompt: Some(text), prompt_token_ids: ids, params })
        }
        (None, Some(ids)) => {
            let ids: Vec<u32> = serde_json::from_value(ids)
                .map_err(|_| "prompt_token_ids must be a list of non-negative integers".to_string())?;
            Ok(InputLine { prompt: None, prompt_token_ids: ids, params })
        }
        (Some(_), None) => Err("prompt must be a string".into()),
        (Some(_), Some(_)) => Err("give either prompt or prompt_token_ids, not both".into()),
        (None, None) => Err("missing prompt (or prompt_token_ids)".into()),
    }
}

fn sample_json(index: usize, sample: &SampleOutput, text: String, with_logprobs: bool) -> Value {
    let logprobs = with_logprobs.then(|| {
        sample
            .logprobs
            .iter()
            .map(|t| json!({"token_id": t.token, "logprob": t.logprob, "top_logprobs": t.top_logprobs}))
            .collect::<Vec<_>>()
    });
    json!({
        "index": index,
        "token_ids": sample.token_ids,
        "text": text,
        "finish_reason": sample.finish_reason.map(|f| f.as_str()),
        "logprobs": logprobs,
    })
}

fn output_json(line: &InputLine, out: &RequestOutput, tokenizer: &TextTokenizer) -> Result<Value, String> {
    let outputs = out
        .outputs
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let text = tokenizer.generated_text(&out.prompt_token_ids, &s.token_ids).map_err(|e| e.to_string())?;
            Ok(sample_json(i, s, text, line.params.logprobs.is_some()))
        })
        .collect::<Result<Vec<_>, String>>()?;
    Ok(json!({"prompt": line.prompt, "prompt_token_ids": out.prompt_token_ids, "outputs": outputs}))
}

/// Runs the command.
pub fn run(mut args: GenerateArgs) -> Result<(), String> {
    args.engine.model = crate::model_hub::resolve(&args.engine.model)?;
    let tokenizer = TextTokenizer::load(&args.engine.model).map_err(|e| e.to_string())?;
    pagemesh_executor::backends::cuda::check_device(&args.device, &args.engine)?;
    let mut engine = pagemesh_engine::build_on(&args.engine, &args.device)?;
    let input = std::fs::File::open(&args.input).map_err(|e| format!("cannot open {}: {e}", args.input.display()))?;
    let mut lines = Vec::new();
    for (n, line) in std::io::BufReader::new(input).lines().enumerate() {
        let line = line.map_err(|e| format!("cannot read {}: {e}", args.input.display()))?;
        if line.trim().is_empty() {
            continue;
        }
        lines.push(parse_line(&line, &tokenizer).map_err(|e| format!("line {}: {e}", n + 1)));
    }
    let started = Instant::now();
    let requests: Vec<_> =
        lines.iter().filter_map(|l| l.as_ref().ok()).map(|l| (l.prompt_token_ids.clone(), l.params.clone())).collect();
    let mut results = engine.generate(requests).map_err(|e| e.to_string())?.into_iter();
    let elapsed = started.elapsed().as_secs_f64();
    let file =
        std::fs::File::create(&args.output).map_err(|e| format!("cannot create {}: {e}", args.output.display()))?;
    let mut writer = BufWriter::new(file);
    let mut generated_tokens = 0usize;
    for line in &lines {
        let value = match line {
            Err(e) => json!({"error": e}),
            Ok(parsed) => match results.next() {
                Some(Ok(out)) => {
                    generated_tokens += out.outputs.iter().map(|o| o.token_ids.len()).sum::<usize>();
                    output_json(parsed, &out, &tokenizer)?
                }
                Some(Err(e)) => json!({"error": e.to_string()}),
                None => json!({"error": "no result"}),
            },
        };
        writeln!(writer, "{value}").map_err(|e| format!("cannot write {}: {e}", args.output.display()))?;
    }
    writer.flush().map_err(|e| format!("cannot write {}: {e}", args.output.display()))?;
    engine.check_invariants()?;
    let stats = engine.stats();
    let mut summary = serde_json::to_value(&stats).map_err(|e| e.to_string())?;
    if let Value::Object(map) = &mut summary {
        map.insert("requests".into(), json!(lines.len()));
        map.insert("generated_tokens".into(), json!(generated_tokens));
        map.insert("elapsed_s".into(), json!(elapsed));
    }
    eprintln!("{summary}");
    Ok(())
}
