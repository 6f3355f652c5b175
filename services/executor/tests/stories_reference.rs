//! The CPU backend against the stories260K reference (numpy float32, token-exact with
//! llama2.c): greedy tokens of every case, decoded one token per step through the paged cache,
//! and the raw logits listed for the first decode positions.

use std::path::PathBuf;

use pagemesh_executor::{CacheConfig, CpuExecutor};
use pagemesh_shared::{SampleSpec, SamplingParams, ScheduledSeq, StepPlan};
use serde_json::Value;

fn model_dir() -> PathBuf {
    std::env::var_os("PAGEMESH_TEST_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/stories260K"))
}

fn reference() -> Value {
    let text = std::fs::read_to_string(model_dir().join("reference.json")).expect("reference.json");
    serde_json::from_str(&text).expect("reference.json parses")
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().expect("id list").iter().map(|x| x.as_u64().expect("id") as u32).collect()
}

/// Greedy decoding with a hand-made block table (blocks in reverse order, to make sure the
/// table is honoured), block size 4.
fn greedy(executor: &mut CpuExecutor, prompt: &[u32], steps: usize) -> Vec<u32> {
    let bs = 4;
    let total = prompt.len() + steps;
    let blocks = total.div_ceil(bs) as u32;
    let table: Vec<u32> = (0..blocks).rev().collect();
    let spec = SampleSpec {
        params: SamplingParams::greedy(steps).into(),
        seed: 0,
        sample_index: 0,
        num_samples: 1,
        prompt_len: prompt.len(),
        output_len: 0,
        banned_tokens: vec![],
    };
    let mut out = Vec::new();
    let mut feed = prompt.to_vec();
    let mut pos = 0;
    for step in 0..steps {
        let plan = StepPlan {
            step_id: step as u64,
            seqs: vec![ScheduledSeq {
                seq_id: 1,
                tokens: feed.clone(),
                start_pos: pos,
                block_table: table.clone(),
                history: None,
                sample: Some(SampleSpec { output_len: step, ..spec.clone() }),
            }],
            ..Default::default()
        };
        let result = executor.execute(&plan).expect("step runs");
        pos += feed.len();
        let token = result.results[0].samples[0].token;
        out.push(token);
        feed = vec![token];
    }
    out
}

#[test]
fn greedy_tokens_match_the_reference_for_every_case() {
    let reference = reference();
    let cache = CacheConfig { block_size: 4, num_device_blocks: 128, num_host_blocks: 0 };
    let mut executor = CpuExecutor::load(&model_dir(), None, cache).expect("model loads");
    for case in reference["cases"].as_array().expect("cases") {
        let prompt = ids(&case["prompt_ids"]);
        let expected = ids(&case["generated_ids"]);
        let got = greedy(&mut executor, &prompt, expected.len());
        assert_eq!(got, expected, "case {:?}", case["prompt"]);
    }
}

#[test]
fn raw_logits_match_the_reference_top5() {
    let reference = reference();
    let cache = CacheConfig { block_size: 16, num_device_blocks: 1, num_host_blocks: 0 };
    let executor = CpuExecutor::load(&model_dir(), None, cache).expect("model loads");
    let mut max_diff = 0.0f32;
    for case in reference["cases"].as_array().expect("cases") {
        let mut all = ids(&case["prompt_ids"]);
        all.extend(ids(&case["generated_ids"]));
        for entry in case["first_decode_positions_top5"].as_array().expect("top5") {
            let pos = entry["position"].as_u64().expect("position") as usize;
            let logits = executor.logits_for_prompt(&all[..=pos]).expect("forward");
            let last = logits.last().expect("logits");
            for pair in entry["top5"].as_array().expect("pairs") {
                let id = pair[0].as_u64().expect("id") as usize;
                let want = pair[1].as_f64().expect("logit") as f32;
                max_diff = max_diff.max((last[id] - want).abs());
            }
        }
    }
    assert!(max_diff < 1e-4, "max |logit diff| {max_diff}");
}
