//! `pagemesh gguf-info`: what a GGUF file holds — version, metadata and tensor table — as JSON,
//! with the model configuration its metadata gives (as a Hugging Face `config.json`, checked by
//! the executor's config parser). Long arrays (a tokenizer's vocabulary) are shown by length and
//! first items. With `--dequantize NAME`, the first rows of one tensor as f32 instead (what the
//! executor computes with, to compare with any other GGUF reader).

use std::path::PathBuf;

use clap::Args;
use pagemesh_executor::gguf::{GgufFile, Value};
use pagemesh_executor::quant::dequant::dequantize_row;
use pagemesh_executor::quant::QuantKind;
use serde_json::{json, Map};

/// Items of an array shown in full.
const ARRAY_HEAD: usize = 8;

/// Flags of `pagemesh gguf-info`.
#[derive(Args, Debug)]
pub struct GgufInfoArgs {
    /// The GGUF file.
    file: PathBuf,
    /// Print the first rows of this tensor as f32 instead.
    #[arg(long, value_name = "TENSOR")]
    dequantize: Option<String>,
    /// Rows printed with `--dequantize`.
    #[arg(long, default_value_t = 4)]
    rows: usize,
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

/// The first `rows` rows of tensor `name` as f32, with its type and dimensions.
fn dequantized_rows(file: &GgufFile, name: &str, rows: usize) -> Result<serde_json::Value, String> {
    let info = file.tensor(name).ok_or_else(|| format!("no tensor named {name:?}"))?;
    let kind = QuantKind::from_tensor_type(info.kind)
        .ok_or_else(|| format!("tensor {name}: type {} is not one the executor computes with", info.kind.name))?;
    let width = usize::try_from(info.dims.first().copied().unwrap_or(1)).map_err(|e| e.to_string())?;
    let row_bytes = kind.row_bytes(width).map_err(|e| format!("tensor {name}: {e}"))?;
    let bytes = file.tensor_bytes(info);
    let values: Vec<Vec<f32>> = bytes
        .chunks_exact(row_bytes)
        .take(rows)
        .map(|row| {
            let mut out = vec![0.0; width];
            dequantize_row(kind, row, &mut out);
            out
        })
        .collect();
    Ok(json!({"name": name, "type": kind.name(), "dims": info.dims, "rows": values}))
}

/// Runs the command.
pub fn run(args: GgufInfoArgs) -> Result<(), String> {
    let file = GgufFile::open(&args.file).map_err(|e| e.to_string())?;
    if let Some(name) = &args.dequantize {
        println!("{}", dequantized_rows(&file, name, args.rows)?);
        return Ok(());
    }
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
