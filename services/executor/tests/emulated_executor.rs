//! The GPU path's step runner (`gpu::GpuExecutor` over the emulated kernels) against the CPU
//! `CpuExecutor`, plan by plan: chunked prefill, decode, swap-out and swap-in to other blocks
//! (preemption), and a fork through a copy-on-write block copy. Both get the same plans; every
//! sampled token must be the same and every log-probability within 1e-4.

use pagemesh_executor::gpu::{EmulatedBackend, GpuExecutor, GpuModel};
use pagemesh_executor::{CacheConfig, CpuExecutor};
use pagemesh_shared::{SampleSpec, SamplingParams, ScheduledSeq, StepOutput, StepPlan};

mod support;
use support::*;

const BS: usize = 4;

fn spec(prompt_len: usize) -> SampleSpec {
    let mut params = SamplingParams::greedy(64);
    params.logprobs = Some(3);
    SampleSpec {
        params: params.into(),
        seed: 7,
        sample_index: 0,
        num_samples: 1,
        prompt_len,
        output_len: 0,
        banned_tokens: vec![],
    }
}

fn seq(id: u64, tokens: &[u32], start: usize, table: &[u32], sample: bool, history: Option<Vec<u32>>) -> ScheduledSeq {
    ScheduledSeq {
        seq_id: id,
        tokens: tokens.to_vec(),
        start_pos: start,
        block_table: table.to_vec(),
        history,
        sample: sample.then(|| spec(start + tokens.len())),
    }
}

struct Pair {
    cpu: CpuExecutor,
    gpu: GpuExecutor<f32, EmulatedBackend>,
    steps: u64,
}

impl Pair {
    /// Runs the plan on both, checks they agree, and returns the sampled tokens by sequence.
    fn run(&mut self, mut plan: StepPlan) -> Vec<(u64, u32)> {
        plan.step_id = self.steps;
        self.steps += 1;
        let a: StepOutput = self.cpu.execute(&plan).expect("cpu step");
        let b: StepOutput = self.gpu.execute(&plan).expect("emulated gpu step");
        assert_eq!(a.results.len(), b.results.len(), "step {}", plan.step_id);
        for (x, y) in a.results.iter().zip(&b.results) {
            assert_eq!(x.seq_id, y.seq_id);
            let (sx, sy) = (&x.samples[0], &y.samples[0]);
            assert_eq!(sx.token, sy.token, "step {} seq {}", plan.step_id, x.seq_id);
            let (lx, ly) = (sx.logprob.expect("logprob"), sy.logprob.expect("logprob"));
            assert!((lx - ly).abs() < 1e-4, "step {} seq {}: logprob {lx} vs {ly}", plan.step_id, x.seq_id);
        }
        a.results.iter().map(|r| (r.seq_id, r.samples[0].token)).collect()
    }
}

#[test]
fn the_emulated_gpu_executor_runs_plans_like_the_cpu_executor() {
    let cpu = CpuExecutor::load(
        &model_dir(),
        None,
        CacheConfig { block_size: BS, num_device_blocks: 24, num_host_blocks: 8 },
    )
    .expect("cpu model");
    let model = GpuModel::<f32, _>::load(EmulatedBackend, &model_dir()).expect("emulated model");
    let gpu = GpuExecutor::new(model, BS, 24, 8).expect("emulated executor");
    let mut p = Pair { cpu, gpu, steps: 0 };

    let a_prompt = [1u32, 403, 407, 261, 378, 284];
    let b_prompt = [1u32, 365, 271, 280, 449, 330, 285, 305, 288];
    let mut a_table = vec![3u32, 0, 9, 14];
    let b_table = vec![5u32, 7, 1, 2, 11];
    // A's whole prompt; B's first chunk (no sample).
    let out = p.run(StepPlan {
        seqs: vec![seq(1, &a_prompt, 0, &a_table, true, None), seq(2, &b_prompt[..5], 0, &b_table, false, None)],
        ..Default::default()
    });
    let mut a_last = out[0].1;
    // B's second chunk starts mid-block; A decodes.
    let out = p.run(StepPlan {
        seqs: vec![seq(1, &[a_last], 6, &a_table, true, None), seq(2, &b_prompt[5..], 5, &b_table, true, None)],
        ..Default::default()
    });
    a_last = out[0].1;
    let mut b_last = out[1].1;
    let (mut a_pos, mut b_pos) = (7, 9);
    // Every token in B's cache, for the fork's history.
    let mut b_history = b_prompt.to_vec();
    for _ in 0..3 {
        let out = p.run(StepPlan {
            seqs: vec![seq(1, &[a_last], a_pos, &a_table, true, None), seq(2, &[b_last], b_pos, &b_table, true, None)],
            ..Default::default()
        });
        b_history.push(b_last);
        (a_last, b_last) = (out[0].1, out[1].1);
        a_pos += 1;
        b_pos += 1;
    }
    // Preempt A: its three used blocks go to host blocks 6, 2, 4; B goes on.
    let a_used = a_pos.div_ceil(BS);
    let host: Vec<u32> = vec![6, 2, 4];
    let swap_out: Vec<(u32, u32)> = a_table[..a_used].iter().copied().zip(host.iter().copied()).collect();
    let out =
        p.run(StepPlan { swap_out, seqs: vec![seq(2, &[b_last], b_pos, &b_table, true, None)], ..Default::default() });
    b_history.push(b_last);
    b_last = out[0].1;
    b_pos += 1;
    // Overwrite A's old device blocks through a new sequence C, then bring A back elsewhere.
    let c_table = vec![3u32, 0, 9];
    p.run(StepPlan { seqs: vec![seq(3, &b_prompt, 0, &c_table, true, None)], released: vec![], ..Default::default() });
    let new_blocks = [17u32, 20, 13, 22];
    let swap_in: Vec<(u32, u32)> = host.iter().copied().zip(new_blocks.iter().copied()).collect();
    a_table = new_blocks.to_vec();
    let out = p.run(StepPlan {
        swap_in,
        released: vec![3],
        seqs: vec![seq(1, &[a_last], a_pos, &a_table, true, None), seq(2, &[b_last], b_pos, &b_table, true, None)],
        ..Default::default()
    });
    b_history.push(b_last);
    (a_last, b_last) = (out[0].1, out[1].1);
    a_pos += 1;
    b_pos += 1;
    // Fork B into D: full blocks shared, the partial last block copied (copy-on-write).
    let last = (b_pos - 1) / BS;
    let mut d_table = b_table.clone();
    d_table[last] = 23;
    assert_eq!(b_history.len(), b_pos);
    let history = b_history.clone();
    let out = p.run(StepPlan {
        copy: vec![(b_table[last], 23)],
        seqs: vec![
            seq(2, &[b_last], b_pos, &b_table, true, None),
            seq(4, &[b_last], b_pos, &d_table, true, Some(history)),
            seq(1, &[a_last], a_pos, &a_table, true, None),
        ],
        ..Default::default()
    });
    assert_eq!(out[0].1, out[1].1, "a greedy fork continues like its parent");
    assert!(p.steps >= 9);
}
