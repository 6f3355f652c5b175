//! Helpers of the end-to-end tests: the reference model, and running `pagemesh generate`.

#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

use serde_json::Value;

/// The stories260K model directory (`PAGEMESH_TEST_MODEL` overrides).
pub fn model_dir() -> PathBuf {
    std::env::var_os("PAGEMESH_TEST_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/stories260K"))
}

/// The reference cases.
pub fn reference_cases() -> Vec<Value> {
    let text = std::fs::read_to_string(model_dir().join("reference.json")).expect("reference.json is readable");
    let value: Value = serde_json::from_str(&text).expect("reference.json parses");
    value["cases"].as_array().expect("cases").clone()
}

/// A list of ids from JSON.
pub fn ids(v: &Value) -> Vec<u32> {
    v.as_array().expect("id list").iter().map(|x| x.as_u64().expect("id") as u32).collect()
}

/// A fresh scratch directory.
pub fn scratch_dir(tag: &str) -> PathBuf {
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    let n = COUNTER.fetch_add(1, Ordering::SeqCst);
    let dir = std::env::temp_dir().join(format!("pagemesh-test-{}-{tag}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

/// What one `pagemesh generate` run produced.
pub struct GenerateRun {
    /// Output lines, in input order.
    pub outputs: Vec<Value>,
    /// The stats line from stderr.
    pub stats: Value,
}

/// Runs `pagemesh generate` on JSON request lines with extra flags.
pub fn generate(model: &std::path::Path, lines: &[Value], flags: &[&str]) -> GenerateRun {
    let dir = scratch_dir("generate");
    let input = dir.join("in.jsonl");
    let output = dir.join("out.jsonl");
    let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
    std::fs::write(&input, text).expect("write input");
    let result = Command::new(env!("CARGO_BIN_EXE_pagemesh"))
        .arg("generate")
        .arg("--model")
        .arg(model)
        .arg("--input")
        .arg(&input)
        .arg("--output")
        .arg(&output)
        .args(flags)
        .output()
        .expect("pagemesh runs");
    let stderr = String::from_utf8_lossy(&result.stderr).to_string();
    assert!(result.status.success(), "pagemesh generate failed: {stderr}");
    let stats_line = stderr.lines().rev().find(|l| l.starts_with('{')).expect("a stats line on stderr");
    let stats: Value = serde_json::from_str(stats_line).expect("stats line is JSON");
    let outputs = std::fs::read_to_string(&output)
        .expect("output written")
        .lines()
        .map(|l| serde_json::from_str(l).expect("output line is JSON"))
        .collect();
    let _ = std::fs::remove_dir_all(&dir);
    GenerateRun { outputs, stats }
}

/// Asserts that every device and host block is free after a run.
pub fn assert_all_blocks_free(stats: &Value) {
    assert_eq!(stats["free_device_blocks"], stats["num_device_blocks"], "device blocks leaked: {stats}");
    assert_eq!(stats["free_host_blocks"], stats["num_host_blocks"], "host blocks leaked: {stats}");
}
