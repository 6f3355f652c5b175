//! `pagemesh generate` reproduces the stories260K reference token for token and text for
//! text, however the engine is configured: all cases in one batch, each alone, under
//! preemption by swap and by recompute, with tiny prefill chunks, and with prefix-cache hits.
//! After every run every block is free.

mod support;

use serde_json::{json, Value};
use support::{assert_all_blocks_free, generate, ids, model_dir, reference_cases};

fn greedy_line(case: &Value) -> Value {
    json!({
        "prompt": case["prompt"],
        "max_tokens": case["generated_ids"].as_array().expect("ids").len(),
        "temperature": 0.0,
    })
}

fn assert_matches_reference(output: &Value, case: &Value) {
    assert_eq!(ids(&output["prompt_token_ids"]), ids(&case["prompt_ids"]), "prompt ids of {:?}", case["prompt"]);
    let sample = &output["outputs"][0];
    assert_eq!(ids(&sample["token_ids"]), ids(&case["generated_ids"]), "tokens of {:?}", case["prompt"]);
    assert_eq!(sample["text"], case["generated_text"], "text of {:?}", case["prompt"]);
    assert_eq!(sample["finish_reason"], "length");
}

fn check_run(flags: &[&str], repeat: usize) -> Value {
    let cases = reference_cases();
    let lines: Vec<Value> = (0..repeat).flat_map(|_| cases.iter().map(greedy_line)).collect();
    let run = generate(&model_dir(), &lines, flags);
    assert_eq!(run.outputs.len(), lines.len());
    for (i, output) in run.outputs.iter().enumerate() {
        assert_matches_reference(output, &cases[i % cases.len()]);
    }
    assert_all_blocks_free(&run.stats);
    eprintln!("flags {flags:?} x{repeat}: {}", run.stats);
    run.stats
}

#[test]
fn all_cases_in_one_run() {
    let stats = check_run(&[], 1);
    assert_eq!(stats["preemptions_swap"], 0);
    assert_eq!(stats["preemptions_recompute"], 0);
}

#[test]
fn each_case_alone() {
    for case in reference_cases() {
        let run = generate(&model_dir(), &[greedy_line(&case)], &[]);
        assert_matches_reference(&run.outputs[0], &case);
        assert_all_blocks_free(&run.stats);
    }
}

#[test]
fn swap_preemption_gives_the_same_tokens() {
    let stats = check_run(&["--num-device-blocks", "30", "--num-host-blocks", "64", "--preemption-mode", "swap"], 1);
    assert!(stats["preemptions_swap"].as_u64().expect("count") > 0, "no swap preemption happened: {stats}");
    assert!(stats["blocks_swapped_out"].as_u64().expect("count") > 0, "{stats}");
    assert!(stats["blocks_swapped_in"].as_u64().expect("count") > 0, "{stats}");
}

#[test]
fn recompute_preemption_gives_the_same_tokens() {
    let stats = check_run(&["--num-device-blocks", "30", "--preemption-mode", "recompute"], 1);
    assert!(stats["preemptions_recompute"].as_u64().expect("count") > 0, "no recompute preemption happened: {stats}");
    assert_eq!(stats["preemptions_swap"], 0, "{stats}");
    let cold = check_run(&["--num-device-blocks", "30", "--preemption-mode", "recompute", "--no-prefix-caching"], 1);
    assert!(cold["preemptions_recompute"].as_u64().expect("count") > 0, "no recompute preemption happened: {cold}");
    assert_eq!(cold["prefix_cache_hit_tokens"], 0, "{cold}");
}

#[test]
fn tiny_prefill_chunks_give_the_same_tokens() {
    let stats = check_run(&["--max-num-batched-tokens", "8"], 1);
    // Prompts of up to 35 tokens fed 8 at a time (beside decodes) take extra steps.
    assert!(stats["steps"].as_u64().expect("count") > 200, "{stats}");
}

#[test]
fn prefix_cache_hits_give_the_same_tokens() {
    let stats = check_run(&["--max-num-seqs", "6", "--block-size", "4"], 2);
    assert!(stats["prefix_cache_hit_tokens"].as_u64().expect("count") > 0, "no prefix-cache hit: {stats}");
    let off = check_run(&["--max-num-seqs", "6", "--block-size", "4", "--no-prefix-caching"], 2);
    assert_eq!(off["prefix_cache_hit_tokens"], 0, "{off}");
}

#[test]
fn logprobs_of_the_first_decode_positions_match_the_reference_logits() {
    let cases = reference_cases();
    let lines: Vec<Value> = cases
        .iter()
        .map(|c| json!({"prompt": c["prompt"], "max_tokens": 3, "temperature": 0.0, "logprobs": 5}))
        .collect();
    let run = generate(&model_dir(), &lines, &[]);
    let mut worst = 0.0f64;
    for (case, output) in cases.iter().zip(&run.outputs) {
        let logprobs = output["outputs"][0]["logprobs"].as_array().expect("logprobs returned");
        for entry in case["first_decode_positions_top5"].as_array().expect("top5") {
            let k = entry["predicts_generated_index"].as_u64().expect("index") as usize;
            let top: Vec<(u64, f64)> = logprobs[k]["top_logprobs"]
                .as_array()
                .expect("top_logprobs")
                .iter()
                .map(|p| (p[0].as_u64().expect("id"), p[1].as_f64().expect("logprob")))
                .collect();
            let want: Vec<(u64, f64)> = entry["top5"]
                .as_array()
                .expect("pairs")
                .iter()
                .map(|p| (p[0].as_u64().expect("id"), p[1].as_f64().expect("logit")))
                .collect();
            assert_eq!(top.iter().map(|t| t.0).collect::<Vec<_>>(), want.iter().map(|w| w.0).collect::<Vec<_>>());
            // log-softmax shifts every logit by the same normalizer: differences are kept.
            for (t, w) in top.iter().zip(&want) {
                assert!(t.1 <= 0.0);
                worst = worst.max(((t.1 - top[0].1) - (w.1 - want[0].1)).abs());
            }
            let chosen = logprobs[k]["logprob"].as_f64().expect("logprob");
            assert!((chosen - top[0].1).abs() < 1e-9, "greedy token is the top one");
        }
    }
    eprintln!("largest logprob difference from the reference: {worst:e}");
    assert!(worst < 1e-4, "largest logprob difference {worst}");
}
