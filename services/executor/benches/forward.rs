//! Executor-only throughput: decode steps at several batch sizes and one prefill, on a
//! synthetic model (no scheduler in the loop).
//!
//! `cargo bench -p pagemesh-executor --bench forward -- [llama-110m|tiny] [f32|f16|bf16]`
//! (`RAYON_NUM_THREADS` sets the threads). The synthetic model is written once to the temp dir.

use std::time::Instant;

use pagemesh_executor::synth::{write_model, Preset};
use pagemesh_executor::{CacheConfig, CpuExecutor, WeightDtype};
use pagemesh_shared::{SampleSpec, SamplingParams, ScheduledSeq, StepPlan};

fn spec() -> SampleSpec {
    SampleSpec {
        params: SamplingParams::greedy(1).into(),
        seed: 0,
        sample_index: 0,
        num_samples: 1,
        prompt_len: 1,
        output_len: 0,
        banned_tokens: vec![],
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    let preset: Preset = args.first().map(|s| s.parse().expect("preset")).unwrap_or(Preset::Llama110m);
    let dtype: WeightDtype = args.get(1).map(|s| s.parse().expect("dtype")).unwrap_or(WeightDtype::BF16);
    let dir = std::env::temp_dir().join(format!("pagemesh-bench-{preset:?}-{dtype:?}"));
    if !dir.join("model.safetensors").exists() {
        write_model(&dir, preset, dtype, 0, None).expect("write model");
    }
    let bs = 16;
    let context = 128;
    let max_batch = 32;
    let blocks_per_seq = (context + 64) / bs + 1;
    let cache = CacheConfig { block_size: bs, num_device_blocks: max_batch * blocks_per_seq, num_host_blocks: 0 };
    let mut ex = CpuExecutor::load(&dir, None, cache).expect("load");
    let table =
        |s: usize| -> Vec<u32> { (0..blocks_per_seq as u32).map(|b| s as u32 * blocks_per_seq as u32 + b).collect() };
    // Prefill every sequence's context once (also the prefill measurement).
    let started = Instant::now();
    for s in 0..max_batch {
        let plan = StepPlan {
            seqs: vec![ScheduledSeq {
                seq_id: s as u64,
                tokens: (0..context as u32).map(|i| 3 + (i * 31 + s as u32) % 500).collect(),
                start_pos: 0,
                block_table: table(s),
                history: None,
                sample: Some(spec()),
            }],
            ..Default::default()
        };
        ex.execute(&plan).expect("prefill");
    }
    let prefill = (max_batch * context) as f64 / started.elapsed().as_secs_f64();
    println!("{preset:?} {dtype:?} threads={} prefill {prefill:.0} tok/s", rayon::current_num_threads());
    for batch in [1, 8, 32] {
        let steps = 16;
        let started = Instant::now();
        for step in 0..steps {
            let plan = StepPlan {
                seqs: (0..batch)
                    .map(|s| ScheduledSeq {
                        seq_id: s as u64,
                        tokens: vec![5],
                        start_pos: context + step,
                        block_table: table(s),
                        history: None,
                        sample: Some(spec()),
                    })
                    .collect(),
                ..Default::default()
            };
            ex.execute(&plan).expect("decode");
        }
        let secs = started.elapsed().as_secs_f64();
        println!("  decode batch {batch:>2}: {:8.1} tok/s", (batch * steps) as f64 / secs);
    }
}
