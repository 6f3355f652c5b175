//! A whole forward pass of stories260K through the emulated CUDA kernels (the GPU path's
//! orchestration, `gpu::model`, over `EmulatedBackend`: the kernels of `kernels/cuda` built for
//! the CPU, a CPU GEMM standing in for cuBLAS) reproduces the reference greedy tokens.
//!
//! All cases run together as one continuously batched stream: each prompt is fed in two
//! chunks (the second starting mid-sequence, as after chunked prefill or a prefix-cache hit),
//! through the prefill kernel, then one token per step through the decode kernel, with block
//! tables scattered over a shared pool. In f16 and bf16, the prompts' logits stay close to the
//! CPU backend's.

use std::path::PathBuf;

use pagemesh_executor::cpu::attention::SeqSpan;
use pagemesh_executor::cpu::model::ForwardBatch;
use pagemesh_executor::gpu::{EmulatedBackend, GpuModel};
use pagemesh_executor::sampling::sample;
use pagemesh_shared::{SampleSpec, SamplingParams};
use serde_json::Value;

mod support;
use support::*;

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().expect("id list").iter().map(|x| x.as_u64().expect("id") as u32).collect()
}

struct Seq {
    prompt: Vec<u32>,
    expected: Vec<u32>,
    table: Vec<u32>,
    /// Tokens in the cache.
    pos: usize,
    generated: Vec<u32>,
}

impl Seq {
    /// The tokens this step feeds: the first half of the prompt, the rest of it, then the last
    /// generated token; and whether the step samples.
    fn feed(&self) -> Option<(Vec<u32>, bool)> {
        if self.generated.len() == self.expected.len() {
            return None;
        }
        let half = self.prompt.len().div_ceil(2);
        Some(if self.pos == 0 && half < self.prompt.len() {
            (self.prompt[..half].to_vec(), false)
        } else if self.pos < self.prompt.len() {
            (self.prompt[self.pos..].to_vec(), true)
        } else {
            (vec![*self.generated.last().expect("a generated token")], true)
        })
    }
}

#[test]
fn stories260k_greedy_tokens_match_the_reference_through_the_emulated_kernels() {
    let text = std::fs::read_to_string(model_dir().join("reference.json")).expect("reference.json");
    let reference: Value = serde_json::from_str(&text).expect("reference.json parses");
    let model = GpuModel::<f32, _>::load(EmulatedBackend, &model_dir()).expect("model loads");
    let block_size = 16;
    let mut seqs: Vec<Seq> = reference["cases"]
        .as_array()
        .expect("cases")
        .iter()
        .map(|case| {
            let prompt = ids(&case["prompt_ids"]);
            let expected = ids(&case["generated_ids"]);
            Seq { prompt, expected, table: Vec::new(), pos: 0, generated: Vec::new() }
        })
        .collect();
    // Interleaved blocks, in reverse order: sequence i owns blocks i, i + n, i + 2n, ... from the
    // end of the pool.
    let blocks_per_seq =
        seqs.iter().map(|s| (s.prompt.len() + s.expected.len()).div_ceil(block_size)).max().unwrap_or(1);
    let total = blocks_per_seq * seqs.len();
    let n = seqs.len();
    for (i, s) in seqs.iter_mut().enumerate() {
        s.table = (0..blocks_per_seq).map(|j| (total - 1 - (j * n + i)) as u32).collect();
    }
    let mut cache = model.new_cache(block_size, total, 0).expect("cache");
    let greedy = SampleSpec {
        params: SamplingParams::greedy(1).into(),
        seed: 0,
        sample_index: 0,
        num_samples: 1,
        prompt_len: 0,
        output_len: 0,
        banned_tokens: vec![],
    };
    let (mut prefill_steps, mut decode_rows) = (0, 0);
    loop {
        let feeds: Vec<(usize, Vec<u32>, bool)> =
            seqs.iter().enumerate().filter_map(|(i, s)| s.feed().map(|(t, smp)| (i, t, smp))).collect();
        if feeds.is_empty() {
            break;
        }
        let (mut tokens, mut positions, mut slots, mut logit_rows, mut firsts) =
            (vec![], vec![], vec![], vec![], vec![]);
        for (i, feed, samples) in &feeds {
            let s = &seqs[*i];
            firsts.push(tokens.len());
            for (j, &t) in feed.iter().enumerate() {
                let p = s.pos + j;
                tokens.push(t);
                positions.push(p);
                slots.push(s.table[p / block_size] as usize * block_size + p % block_size);
            }
            if *samples {
                logit_rows.push(tokens.len() - 1);
            }
            if feed.len() > 1 {
                prefill_steps += 1;
            } else {
                decode_rows += 1;
            }
        }
        let spans: Vec<SeqSpan<'_>> = feeds
            .iter()
            .zip(&firsts)
            .map(|((i, feed, _), &first_row)| SeqSpan {
                first_row,
                len: feed.len(),
                start_pos: seqs[*i].pos,
                block_table: &seqs[*i].table,
            })
            .collect();
        let batch = ForwardBatch {
            tokens: &tokens,
            positions: &positions,
            slots: &slots,
            spans: &spans,
            logit_rows: &logit_rows,
        };
        let logits = model.forward(&batch, &mut cache).expect("forward runs");
        let vocab = model.config.vocab_size;
        assert_eq!(logits.len(), logit_rows.len() * vocab);
        let mut row = logits.chunks(vocab);
        for (i, feed, samples) in feeds {
            let s = &mut seqs[i];
            s.pos += feed.len();
            if samples {
                let token = sample(row.next().expect("a logit row"), &greedy, &[], 0).token;
                s.generated.push(token);
            }
        }
    }
    for s in &seqs {
        assert_eq!(s.generated, s.expected, "prompt {:?}", s.prompt);
    }
    let tokens: usize = seqs.iter().map(|s| s.generated.len()).sum();
    eprintln!(
        "{} sequences, {tokens} tokens match ({prefill_steps} prefill chunks, {decode_rows} decode rows)",
        seqs.len()
    );
    assert!(prefill_steps > 0 && decode_rows > 0, "both attention kernels ran");
}

/// Logits of every reference prompt's last position through the emulated kernels in `E`,
/// against the CPU backend in f32: the worst `max |got - want| / max |want|` over the prompts,
/// and how many prompts agree on the most likely token.
fn half_precision_logits<E: pagemesh_executor::gpu::GpuElement>() -> (f64, usize, usize) {
    logits_against_the_cpu::<E>(&model_dir())
}

/// Like [`half_precision_logits`] for the model in `dir` (the reference prompts' ids).
fn logits_against_the_cpu<E: pagemesh_executor::gpu::GpuElement>(dir: &std::path::Path) -> (f64, usize, usize) {
    use pagemesh_executor::{CacheConfig, CpuExecutor};
    let text = std::fs::read_to_string(model_dir().join("reference.json")).expect("reference.json");
    let reference: Value = serde_json::from_str(&text).expect("reference.json parses");
    let cpu = CpuExecutor::load(dir, None, CacheConfig { block_size: 16, num_device_blocks: 1, num_host_blocks: 0 })
        .expect("cpu model");
    let model = GpuModel::<E, _>::load(EmulatedBackend, dir).expect("model loads");
    let (mut worst, mut agree, mut total) = (0.0f64, 0, 0);
    for case in reference["cases"].as_array().expect("cases") {
        let prompt = ids(&case["prompt_ids"]);
        let want = cpu.logits_for_prompt(&prompt).expect("cpu logits").pop().expect("a row");
        let blocks = prompt.len().div_ceil(16);
        let mut cache = model.new_cache(16, blocks, 0).expect("cache");
        let table: Vec<u32> = (0..blocks as u32).rev().collect();
        let positions: Vec<usize> = (0..prompt.len()).collect();
        let slots: Vec<usize> = positions.iter().map(|&p| table[p / 16] as usize * 16 + p % 16).collect();
        let spans = [SeqSpan { first_row: 0, len: prompt.len(), start_pos: 0, block_table: &table }];
        let last = [prompt.len() - 1];
        let batch =
            ForwardBatch { tokens: &prompt, positions: &positions, slots: &slots, spans: &spans, logit_rows: &last };
        let got = model.forward(&batch, &mut cache).expect("forward runs");
        let scale = want.iter().fold(0.0f64, |m, w| m.max(w.abs() as f64));
        let err = got.iter().zip(&want).fold(0.0f64, |m, (g, w)| m.max((*g as f64 - *w as f64).abs())) / scale;
        worst = worst.max(err);
        let argmax = |v: &[f32]| v.iter().enumerate().fold(0, |b, (i, x)| if *x > v[b] { i } else { b });
        agree += usize::from(argmax(&got) == argmax(&want));
        total += 1;
    }
    (worst, agree, total)
}

#[test]
fn stories260k_logits_in_f16_and_bf16_stay_close_to_the_cpu() {
    let (f16_err, f16_agree, n) = half_precision_logits::<half::f16>();
    let (bf16_err, bf16_agree, _) = half_precision_logits::<half::bf16>();
    eprintln!("f16: worst relative error {f16_err:e}, {f16_agree}/{n} argmax agree");
    eprintln!("bf16: worst relative error {bf16_err:e}, {bf16_agree}/{n} argmax agree");
    assert!(f16_err < 1e-2 && f16_agree == n, "f16: {f16_err:e}, {f16_agree}/{n}");
    assert!(bf16_err < 5e-2 && bf16_agree == n, "bf16: {bf16_err:e}, {bf16_agree}/{n}");
}

/// stories260K with `attention_bias` and random q/k/v biases, written to a fresh directory.
fn biased_copy_of_stories260k() -> PathBuf {
    use safetensors::tensor::TensorView;
    let dir = std::env::temp_dir().join(format!("pagemesh-qkv-bias-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let mut config: Value =
        serde_json::from_str(&std::fs::read_to_string(model_dir().join("config.json")).expect("config")).expect("json");
    config["attention_bias"] = Value::Bool(true);
    std::fs::write(dir.join("config.json"), config.to_string()).expect("write config");
    let bytes = std::fs::read(model_dir().join("model.safetensors")).expect("weights");
    let tensors = safetensors::SafeTensors::deserialize(&bytes).expect("safetensors");
    let (heads, kv_heads, hd) = (8usize, 4usize, 8usize);
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut random = |n: usize| -> Vec<u8> {
        (0..n)
            .flat_map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                ((seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5).to_le_bytes()
            })
            .collect()
    };
    let mut biases = Vec::new();
    for layer in 0..5 {
        for (proj, n) in [("q", heads * hd), ("k", kv_heads * hd), ("v", kv_heads * hd)] {
            biases.push((format!("model.layers.{layer}.self_attn.{proj}_proj.bias"), n, random(n)));
        }
    }
    let mut views: Vec<(String, TensorView<'_>)> =
        tensors.tensors().into_iter().map(|(name, view)| (name.to_string(), view)).collect();
    for (name, n, data) in &biases {
        views.push((name.clone(), TensorView::new(safetensors::Dtype::F32, vec![*n], data).expect("bias view")));
    }
    let out = safetensors::serialize(views, None).expect("serialize");
    std::fs::write(dir.join("model.safetensors"), out).expect("write weights");
    dir
}

#[test]
fn qkv_biases_are_added_on_the_gpu_path_as_on_the_cpu() {
    // Qwen2-style projections with biases: the emulated GPU path's logits match the CPU
    // backend's, and the biases matter (the CPU's logits move by more than the tolerance).
    let dir = biased_copy_of_stories260k();
    let (err, agree, n) = logits_against_the_cpu::<f32>(&dir);
    eprintln!("f32 with qkv biases: worst relative error {err:e}, {agree}/{n} argmax agree");
    assert!(err < 1e-4 && agree == n, "with biases: {err:e}, {agree}/{n}");
    let plain = pagemesh_executor::CpuExecutor::load(
        &model_dir(),
        None,
        pagemesh_executor::CacheConfig { block_size: 16, num_device_blocks: 1, num_host_blocks: 0 },
    )
    .expect("cpu model");
    let biased = pagemesh_executor::CpuExecutor::load(
        &dir,
        None,
        pagemesh_executor::CacheConfig { block_size: 16, num_device_blocks: 1, num_host_blocks: 0 },
    )
    .expect("biased cpu model");
    let prompt = [1u32, 403, 407, 261, 378];
    let a = plain.logits_for_prompt(&prompt).expect("logits").pop().expect("row");
    let b = biased.logits_for_prompt(&prompt).expect("logits").pop().expect("row");
    let moved = a.iter().zip(&b).fold(0.0f32, |m, (x, y)| m.max((x - y).abs()));
    assert!(moved > 1e-2, "the biases change the logits (by {moved})");
    std::fs::remove_dir_all(&dir).expect("cleanup");
}
