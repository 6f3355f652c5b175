//! What the executor's integration tests share: the stories260K model and its reference.
// Each test crate includes this module and uses some of it.
#![allow(dead_code)]

use std::path::PathBuf;

use serde_json::Value;

/// The stories260K model directory ($PAGEMESH_TEST_MODEL, else the repository's copy).
pub fn model_dir() -> PathBuf {
    std::env::var_os("PAGEMESH_TEST_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/stories260K"))
}

/// Each reference case's prompt and greedy output as one token sequence, cut at `max_len`.
pub fn reference_sequences(max_len: usize) -> Vec<Vec<u32>> {
    let text = std::fs::read_to_string(model_dir().join("reference.json")).expect("reference");
    let reference: Value = serde_json::from_str(&text).expect("json");
    let ids = |v: &Value| v.as_array().expect("ids").iter().map(|x| x.as_u64().expect("id") as u32).collect::<Vec<_>>();
    reference["cases"]
        .as_array()
        .expect("cases")
        .iter()
        .map(|c| {
            let mut all = ids(&c["prompt_ids"]);
            all.extend(ids(&c["generated_ids"]));
            all.truncate(max_len);
            all
        })
        .collect()
}
