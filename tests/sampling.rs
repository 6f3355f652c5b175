//! Sampling through `pagemesh generate`: seeded streams do not depend on the batch, top_k = 1
//! is greedy, parallel samples share their prompt, and stop tokens, min_tokens and penalties
//! act as defined.

mod support;

use serde_json::{json, Value};
use support::{assert_all_blocks_free, generate, ids, model_dir, reference_cases};

fn tokens(output: &Value, sample: usize) -> Vec<u32> {
    ids(&output["outputs"][sample]["token_ids"])
}

fn seeded(prompt: &str, seed: u64) -> Value {
    json!({"prompt": prompt, "max_tokens": 48, "temperature": 0.9, "top_p": 0.95, "seed": seed, "n": 2})
}

#[test]
fn seeded_sampling_is_identical_across_batch_compositions() {
    let target = seeded("Lily and Tom went to the park", 7);
    let alone = generate(&model_dir(), std::slice::from_ref(&target), &[]);
    let mut crowd: Vec<Value> = reference_cases()
        .iter()
        .map(|c| json!({"prompt": c["prompt"], "max_tokens": 30, "temperature": 1.0, "seed": 99}))
        .collect();
    crowd.insert(3, target.clone());
    crowd.push(seeded("Lily and Tom went to the park", 8));
    let together = generate(&model_dir(), &crowd, &[]);
    let squeezed = generate(&model_dir(), &crowd, &["--num-device-blocks", "12", "--preemption-mode", "recompute"]);
    assert!(squeezed.stats["preemptions_recompute"].as_u64().expect("count") > 0, "{}", squeezed.stats);
    for sample in 0..2 {
        assert_eq!(tokens(&alone.outputs[0], sample), tokens(&together.outputs[3], sample));
        assert_eq!(tokens(&alone.outputs[0], sample), tokens(&squeezed.outputs[3], sample));
    }
    assert_ne!(tokens(&alone.outputs[0], 0), tokens(&alone.outputs[0], 1), "the two samples should differ");
    assert_ne!(tokens(&together.outputs[3], 0), tokens(&together.outputs[7], 0), "another seed gives another stream");
    assert_all_blocks_free(&together.stats);
    assert_all_blocks_free(&squeezed.stats);
}

#[test]
fn top_k_one_is_greedy() {
    let cases = reference_cases();
    let lines: Vec<Value> = cases
        .iter()
        .map(|c| {
            json!({"prompt": c["prompt"], "max_tokens": c["generated_ids"].as_array().expect("ids").len(),
                   "temperature": 1.3, "top_k": 1, "seed": 5})
        })
        .collect();
    let run = generate(&model_dir(), &lines, &[]);
    for (case, output) in cases.iter().zip(&run.outputs) {
        assert_eq!(tokens(output, 0), ids(&case["generated_ids"]));
    }
}

#[test]
fn parallel_samples_share_the_prompt_blocks() {
    let line = json!({"prompt": "Tom said, \"Look at the big tree!\" Mia smiled.", "max_tokens": 20,
                      "temperature": 1.0, "seed": 1, "n": 4});
    let run = generate(&model_dir(), &[line], &["--block-size", "8"]);
    let outputs = run.outputs[0]["outputs"].as_array().expect("outputs");
    assert_eq!(outputs.len(), 4);
    // 26 prompt tokens fill 3 blocks of 8 and part of a 4th: that partial block is copied on
    // write by three of the four samples; the full ones are shared.
    assert_eq!(run.stats["blocks_copied"], 3, "{}", run.stats);
    assert!(run.stats["peak_device_blocks_used"].as_u64().expect("count") < 4 * 6, "{}", run.stats);
    assert_all_blocks_free(&run.stats);
}

#[test]
fn stop_tokens_end_a_sample_unless_min_tokens_holds_them_back() {
    // Greedy "Once upon a time" continues 432, 383, 286, 261, 376, 298, ...
    let stop_first = json!({"prompt": "Once upon a time", "max_tokens": 30, "temperature": 0, "stop_token_ids": [432]});
    let held = json!({"prompt": "Once upon a time", "max_tokens": 30, "temperature": 0, "stop_token_ids": [261],
                      "min_tokens": 5});
    let run = generate(&model_dir(), &[stop_first, held], &[]);
    assert_eq!(tokens(&run.outputs[0], 0), vec![432]);
    assert_eq!(run.outputs[0]["outputs"][0]["finish_reason"], "stop");
    let second = tokens(&run.outputs[1], 0);
    assert!(second.len() >= 5, "{second:?}");
    assert!(!second[..4].contains(&261), "{second:?}");
    assert_eq!(*second.last().expect("tokens"), 261);
    assert_eq!(run.outputs[1]["outputs"][0]["finish_reason"], "stop");
}

#[test]
fn penalties_change_a_repetitive_greedy_continuation() {
    let plain = json!({"prompt": "Once upon a time", "max_tokens": 60, "temperature": 0});
    let penalized =
        json!({"prompt": "Once upon a time", "max_tokens": 60, "temperature": 0, "repetition_penalty": 1.5});
    let frequent = json!({"prompt": "Once upon a time", "max_tokens": 60, "temperature": 0, "frequency_penalty": 1.0});
    let run = generate(&model_dir(), &[plain, penalized, frequent], &[]);
    let count_repeats = |t: &[u32]| t.len() - t.iter().collect::<std::collections::HashSet<_>>().len();
    let base = tokens(&run.outputs[0], 0);
    for i in 1..3 {
        let other = tokens(&run.outputs[i], 0);
        assert_ne!(other, base);
        assert!(count_repeats(&other) < count_repeats(&base), "{other:?} vs {base:?}");
    }
}
