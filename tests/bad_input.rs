//! Bad lines given to `pagemesh generate` get a clear error in their place; the other lines
//! are served and no block leaks.

mod support;

use serde_json::{json, Value};
use support::{assert_all_blocks_free, generate, model_dir};

#[test]
fn bad_lines_get_errors_and_the_rest_is_served() {
    let long_prompt: Vec<u32> = (0..600).map(|i| 3 + i % 500).collect();
    let lines = vec![
        json!({"prompt": "Once upon a time", "max_tokens": 5, "temperature": 0}),
        json!({"max_tokens": 5}),
        json!({"prompt": "x", "max_tokens": -3}),
        json!({"prompt": "x", "max_tokens": 5, "temperature": -1}),
        json!({"prompt": "x", "max_tokens": 5, "top_p": 1.5}),
        json!({"prompt": "x", "max_tokens": 5, "frobnicate": true}),
        json!({"prompt": 12}),
        json!({"prompt_token_ids": long_prompt, "max_tokens": 5}),
        json!({"prompt": "x", "max_tokens": 100000}),
        json!({"prompt_token_ids": [1, 99999], "max_tokens": 5}),
        json!({"prompt_token_ids": [], "max_tokens": 5}),
        json!([1, 2, 3]),
        json!({"prompt": "The little dog", "max_tokens": 5, "temperature": 0}),
    ];
    let run = generate(&model_dir(), &lines, &[]);
    assert_eq!(run.outputs.len(), lines.len());
    let expect_error = |i: usize, needle: &str| {
        let err =
            run.outputs[i]["error"].as_str().unwrap_or_else(|| panic!("line {i} should fail: {}", run.outputs[i]));
        assert!(err.contains(needle), "line {i}: {err:?} should mention {needle:?}");
    };
    expect_error(1, "prompt");
    expect_error(2, "max_tokens");
    expect_error(3, "temperature");
    expect_error(4, "top_p");
    expect_error(5, "frobnicate");
    expect_error(6, "prompt");
    expect_error(7, "512");
    expect_error(8, "512");
    expect_error(9, "99999");
    expect_error(10, "empty");
    expect_error(11, "object");
    for i in [0, 12] {
        assert_eq!(run.outputs[i]["outputs"][0]["token_ids"].as_array().map(Vec::len), Some(5), "line {i}");
    }
    assert_all_blocks_free(&run.stats);
}

#[test]
fn invalid_json_and_missing_files_are_reported() {
    let dir = support::scratch_dir("badjson");
    let input = dir.join("in.jsonl");
    std::fs::write(&input, "{\"prompt\": \"Once\", \"max_tokens\": 2}\n{not json\n").expect("write");
    let out = dir.join("out.jsonl");
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_pagemesh"))
        .args(["generate", "--model"])
        .arg(model_dir())
        .arg("--input")
        .arg(&input)
        .arg("--output")
        .arg(&out)
        .output()
        .expect("runs");
    assert!(status.status.success());
    let text = std::fs::read_to_string(&out).expect("output");
    let lines: Vec<Value> = text.lines().map(|l| serde_json::from_str(l).expect("json")).collect();
    assert!(lines[0]["outputs"].is_array());
    assert!(lines[1]["error"].as_str().expect("error").contains("invalid JSON"));
    let missing = std::process::Command::new(env!("CARGO_BIN_EXE_pagemesh"))
        .args(["generate", "--model", "/nonexistent/model", "--input"])
        .arg(&input)
        .arg("--output")
        .arg(&out)
        .output()
        .expect("runs");
    assert!(!missing.status.success());
    let stderr = String::from_utf8_lossy(&missing.stderr);
    assert!(stderr.contains("/nonexistent/model") && !stderr.contains("panicked"), "{stderr}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn generate_runs_on_the_sim_backend_and_refuses_cuda_without_a_gpu_clearly() {
    // The same engine on the simulated GPU: every request served to its length (the tokens are
    // the simulator's, not the model's), every block free after.
    let lines: Vec<Value> = (0..6)
        .map(|i| json!({"prompt_token_ids": [1, 3 + i, 40, 41], "max_tokens": 7 + i, "temperature": 0}))
        .collect();
    let run = generate(&model_dir(), &lines, &["--device", "sim", "--sim-time-scale", "0"]);
    for (i, output) in run.outputs.iter().enumerate() {
        assert_eq!(output["outputs"][0]["token_ids"].as_array().map(Vec::len), Some(7 + i), "line {i}: {output}");
    }
    assert_all_blocks_free(&run.stats);

    // With no NVIDIA driver here, `--device cuda` is an error naming the flag, not a panic.
    let cuda = std::process::Command::new(env!("CARGO_BIN_EXE_pagemesh"))
        .args(["generate", "--device", "cuda", "--input", "/nonexistent", "--output", "/dev/null", "--model"])
        .arg(model_dir())
        .output()
        .expect("pagemesh runs");
    let stderr = String::from_utf8_lossy(&cuda.stderr);
    if pagemesh_executor::gpu::device::probe_cuda(None).is_err() {
        assert!(!cuda.status.success() && stderr.contains("--device cuda") && !stderr.contains("panicked"), "{stderr}");
    }
}

#[test]
fn generate_on_the_emulated_gpu_path_reproduces_the_reference_and_swaps() {
    // `--device emulated`: the CUDA backend's code path (loader, pools, step runner) over the
    // emulated kernels, as the device check's dry run uses it. In a pool of 24 blocks the 12
    // requests cannot all stay: some are swapped out and back, and every one is still exact.
    let cases = support::reference_cases();
    let lines: Vec<Value> = cases
        .iter()
        .cycle()
        .take(2 * cases.len())
        .map(|c| json!({"prompt_token_ids": c["prompt_ids"], "max_tokens": 24, "temperature": 0, "ignore_eos": true}))
        .collect();
    let run = generate(
        &model_dir(),
        &lines,
        &["--device", "emulated", "--dtype", "f32", "--num-device-blocks", "24", "--block-size", "4"],
    );
    for (i, (output, case)) in run.outputs.iter().zip(cases.iter().cycle()).enumerate() {
        let want: Vec<Value> = case["generated_ids"].as_array().expect("ids")[..24].to_vec();
        assert_eq!(output["outputs"][0]["token_ids"].as_array(), Some(&want), "line {i}");
    }
    assert!(run.stats["preemptions_swap"].as_u64() > Some(0), "{}", run.stats);
    assert_all_blocks_free(&run.stats);
}
