//! `pagemesh gguf-info`: what a GGUF file holds — version, metadata and tensor table — as JSON,
//! with the model configuration its metadata gives (as a Hugging Face `config.json`, checked by
//! the executor's config parser). Long arrays (a tokenizer's vocabulary) are shown by length and
//! first items.

use std::path::PathBuf;

use clap::Args;
use pagemesh_executor::gguf::{GgufFile, Value};
use serde_json::{json, Map};

/// Items of an array shown in full.
const ARRAY_HEAD: usize = 8;

/// Flags of `pagemesh gguf-info`.
#[derive(Args, Debug)]
pub struct GgufInfoArgs {
    /// The GGUF file.
    file: PathBuf,
}

fn to_json(value: &Value) -> serde_json::Value {
    match value {
        Value::Array(items) => json!({
            "len": items.len(),
            "head": items.iter().take(ARRAY_HEAD).map(to_json).collect::<Vec<_>>(),
        }),
        scalar => json!(scalar),
    }
}

/// Runs the command.
pub fn run(args: GgufInfoArgs) -> Result<(), String> {
    let file = GgufFile::open(&args.file).map_err(|e| e.to_string())?;
    let h = &file.header;
    let metadata: Map<String, serde_json::Value> = h.metadata.iter().map(|(k, v)| (k.clone(), to_json(v))).collect();
    let tensors: Vec<serde_json::Value> = h
        .tensors
        .iter()
        .map(|t| json!({"name": t.name, "type": t.kind.name, "dims": t.dims, "offset": t.offset, "bytes": t.bytes}))
        .collect();
    let config = h
        .hf_config()
        .and_then(|c| pagemesh_executor::ModelConfig::parse(&c.to_string()).map(|_| c).map_err(|e| e.to_string()));
    let (config, config_error) = match config {
        Ok(c) => (c, serde_json::Value::Null),
        Err(e) => (serde_json::Value::Null, json!(e)),
    };
    println!(
        "{}",
        json!({"version": h.version, "data_start": h.data_start, "metadata": metadata, "tensors": tensors,
               "config": config, "config_error": config_error})
    );
    Ok(())
}
