//! The executor: owns the model and the KV cache, and runs exactly the steps it is sent.

use std::collections::HashMap;
use std::path::Path;

use pagemesh_shared::sampling::MAX_N;
use pagemesh_shared::{SampleSpec, SeqId, SeqResult, StepOutput, StepPlan};
use rayon::prelude::*;

use crate::cpu::attention::SeqSpan;
use crate::cpu::kv_cache::{BlockShape, KvCache};
use crate::cpu::model::{ForwardBatch, LlamaModel};
use crate::error::{ExecutorError, Result};
use crate::sampling::sample;
use crate::weights::WeightDtype;

/// Pool sizes of an executor's KV cache.
#[derive(Debug, Clone, Copy)]
pub struct CacheConfig {
    /// Tokens per block.
    pub block_size: usize,
    /// Blocks in the device pool.
    pub num_device_blocks: usize,
    /// Blocks in the host (swap) pool.
    pub num_host_blocks: usize,
}

/// A CPU executor.
pub struct CpuExecutor {
    model: LlamaModel,
    cache: KvCache,
    histories: HashMap<SeqId, Vec<u32>>,
}

fn invalid(msg: String) -> ExecutorError {
    ExecutorError::InvalidPlan(msg)
}

impl CpuExecutor {
    /// Loads a model directory and allocates the cache.
    pub fn load(model_dir: &Path, dtype: Option<WeightDtype>, cache: CacheConfig) -> Result<Self> {
        Ok(Self::new(LlamaModel::load(model_dir, dtype)?, cache))
    }

    /// An executor for a loaded model.
    pub fn new(model: LlamaModel, cache: CacheConfig) -> Self {
        let c = &model.config;
        let shape = BlockShape { block_size: cache.block_size, num_kv_heads: c.num_kv_heads, head_dim: c.head_dim };
        let kv = KvCache::new(c.num_layers, shape, cache.num_device_blocks, cache.num_host_blocks);
        Self { model, cache: kv, histories: HashMap::new() }
    }

    /// The model.
    pub fn model(&self) -> &LlamaModel {
        &self.model
    }

    /// Sequences whose token history this executor holds.
    pub fn num_tracked_sequences(&self) -> usize {
        self.histories.len()
    }

    fn limits(&self) -> PlanLimits {
        PlanLimits {
            device_blocks: self.cache.device.num_blocks,
            host_blocks: self.cache.host.num_blocks,
            block_size: self.cache.shape.block_size,
            vocab_size: self.model.config.vocab_size,
            max_model_len: self.model.config.max_model_len(),
        }
    }

    fn validate(&self, plan: &StepPlan) -> Result<()> {
        validate_plan(plan, &self.limits())
    }

    /// The sequences of a plan that are invalid on their own (see [`plan_culprits`]).
    pub fn culprits(&self, plan: &StepPlan) -> Vec<SeqId> {
        plan_culprits(plan, &self.limits())
    }

    /// Runs one step: swaps and copies, the forward pass, and sampling.
    pub fn execute(&mut self, plan: &StepPlan) -> Result<StepOutput> {
        self.validate(plan)?;
        for id in &plan.released {
            self.histories.remove(id);
        }
        for &(d, h) in &plan.swap_out {
            self.cache.swap_out(d as usize, h as usize);
        }
        for &(h, d) in &plan.swap_in {
            self.cache.swap_in(h as usize, d as usize);
        }
        for &(s, d) in &plan.copy {
            self.cache.copy(s as usize, d as usize);
        }
        if plan.seqs.is_empty() {
            return Ok(StepOutput { step_id: plan.step_id, results: Vec::new() });
        }
        let rows = StepRows::build(plan, self.cache.shape.block_size, &mut self.histories);
        let logits = self.model.forward(&rows.batch(), &mut self.cache);
        let results = sample_results(plan, &logits, self.model.config.vocab_size, &self.histories);
        Ok(StepOutput { step_id: plan.step_id, results })
    }

    /// Raw logits of the last position of a token sequence run from scratch through a
    /// scratch cache (for tests and tools; does not touch the executor's cache).
    pub fn logits_for_prompt(&self, tokens: &[u32]) -> Result<Vec<Vec<f32>>> {
        let c = &self.model.config;
        let bs = 16;
        let blocks = tokens.len().div_ceil(bs).max(1);
        let shape = BlockShape { block_size: bs, num_kv_heads: c.num_kv_heads, head_dim: c.head_dim };
        let mut cache = KvCache::new(c.num_layers, shape, blocks, 0);
        let table: Vec<u32> = (0..blocks as u32).collect();
        let positions: Vec<usize> = (0..tokens.len()).collect();
        let spans = [SeqSpan { first_row: 0, len: tokens.len(), start_pos: 0, block_table: &table }];
        let rows: Vec<usize> = positions.clone();
        if tokens.iter().any(|&t| t as usize >= c.vocab_size) || tokens.len() > c.max_model_len() {
            return Err(invalid("tokens outside the vocabulary or longer than the model".into()));
        }
        let batch = ForwardBatch { tokens, positions: &positions, slots: &positions, spans: &spans, logit_rows: &rows };
        let logits = self.model.forward(&batch, &mut cache);
        Ok(logits.chunks(c.vocab_size).map(<[f32]>::to_vec).collect())
    }
}

/// What a step plan is checked against.
#[derive(Debug, Clone, Copy)]
pub struct PlanLimits {
    /// Blocks of the device pool.
    pub device_blocks: usize,
    /// Blocks of the host pool.
    pub host_blocks: usize,
    /// Tokens per block.
    pub block_size: usize,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Longest sequence.
    pub max_model_len: usize,
}

/// The sequences of a plan that fail validation on their own (their tokens, positions,
/// blocks or sampling), so that a refused step is blamed on them and not on the others.
pub fn plan_culprits(plan: &StepPlan, limits: &PlanLimits) -> Vec<SeqId> {
    plan.seqs
        .iter()
        .filter(|seq| {
            let alone = StepPlan {
                step_id: plan.step_id,
                swap_out: Vec::new(),
                swap_in: Vec::new(),
                copy: Vec::new(),
                released: Vec::new(),
                seqs: vec![(*seq).clone()],
            };
            validate_plan(&alone, limits).is_err()
        })
        .map(|seq| seq.seq_id)
        .collect()
}

/// Checks that every block, token and position of a plan is inside the limits.
pub fn validate_plan(plan: &StepPlan, limits: &PlanLimits) -> Result<()> {
    let device = limits.device_blocks;
    let host = limits.host_blocks;
    let bs = limits.block_size;
    let vocab = limits.vocab_size as u32;
    let max_len = limits.max_model_len;
    for &(d, h) in &plan.swap_out {
        if d as usize >= device || h as usize >= host {
            return Err(invalid(format!("swap_out ({d}, {h}) outside the pools ({device}, {host})")));
        }
    }
    for &(h, d) in &plan.swap_in {
        if d as usize >= device || h as usize >= host {
            return Err(invalid(format!("swap_in ({h}, {d}) outside the pools ({host}, {device})")));
        }
    }
    for &(s, d) in &plan.copy {
        if s as usize >= device || d as usize >= device {
            return Err(invalid(format!("copy ({s}, {d}) outside the device pool ({device})")));
        }
    }
    let mut seen = std::collections::HashSet::new();
    for seq in &plan.seqs {
        if !seen.insert(seq.seq_id) {
            return Err(invalid(format!("sequence {} appears twice", seq.seq_id)));
        }
        if seq.tokens.is_empty() {
            return Err(invalid(format!("sequence {} feeds no tokens", seq.seq_id)));
        }
        let end = seq.start_pos.saturating_add(seq.tokens.len());
        if end > max_len {
            return Err(invalid(format!(
                "sequence {} reaches position {end} > max model length {max_len}",
                seq.seq_id
            )));
        }
        if seq.block_table.len() * bs < end {
            return Err(invalid(format!("sequence {}: block table too short for {end} tokens", seq.seq_id)));
        }
        if let Some(b) = seq.block_table.iter().find(|&&b| b as usize >= device) {
            return Err(invalid(format!("sequence {}: block {b} outside the device pool ({device})", seq.seq_id)));
        }
        if let Some(t) = seq.tokens.iter().find(|&&t| t >= vocab) {
            return Err(invalid(format!("sequence {}: token {t} outside the vocabulary ({vocab})", seq.seq_id)));
        }
        if let Some(h) = &seq.history {
            if let Some(t) = h.iter().find(|&&t| t >= vocab) {
                return Err(invalid(format!("sequence {}: history token {t} outside the vocabulary", seq.seq_id)));
            }
            if h.len() != seq.start_pos {
                return Err(invalid(format!(
                    "sequence {}: history of {} tokens for start {}",
                    seq.seq_id,
                    h.len(),
                    seq.start_pos
                )));
            }
        }
        if let Some(s) = &seq.sample {
            validate_sample(seq.seq_id, s, limits)?;
        }
    }
    Ok(())
}

/// Checks a sequence's sampling instructions: sample counts, parameters, token ids.
fn validate_sample(seq: SeqId, s: &SampleSpec, limits: &PlanLimits) -> Result<()> {
    if s.num_samples == 0 || s.num_samples as usize > MAX_N || (s.sample_index as usize) >= MAX_N {
        return Err(invalid(format!(
            "sequence {seq}: samples {}..+{} outside 0..{MAX_N}",
            s.sample_index, s.num_samples
        )));
    }
    s.params.validate().map_err(|e| invalid(format!("sequence {seq}: {e}")))?;
    s.params.check_vocab(limits.vocab_size).map_err(|e| invalid(format!("sequence {seq}: {e}")))?;
    if let Some(t) = s.banned_tokens.iter().find(|&&t| t as usize >= limits.vocab_size) {
        return Err(invalid(format!("sequence {seq}: banned token {t} outside the vocabulary")));
    }
    if s.prompt_len > limits.max_model_len || s.output_len > limits.max_model_len {
        return Err(invalid(format!("sequence {seq}: prompt or output length beyond the model's")));
    }
    Ok(())
}

/// A plan's sequences as one flat batch of rows (the spans borrow the plan's block tables).
pub struct StepRows<'a> {
    /// Token of every row.
    pub tokens: Vec<u32>,
    /// Position of every row.
    pub positions: Vec<usize>,
    /// Cache slot of every row.
    pub slots: Vec<usize>,
    /// Every sequence's rows.
    pub spans: Vec<SeqSpan<'a>>,
    /// Rows whose logits are sampled, in the order of the plan's sampled sequences.
    pub logit_rows: Vec<usize>,
}

impl<'a> StepRows<'a> {
    /// Lays out the plan's sequences and records their tokens in `histories`.
    pub fn build(plan: &'a StepPlan, block_size: usize, histories: &mut HashMap<SeqId, Vec<u32>>) -> Self {
        let bs = block_size;
        let rows = plan.num_tokens();
        let mut tokens = Vec::with_capacity(rows);
        let mut positions = Vec::with_capacity(rows);
        let mut slots = Vec::with_capacity(rows);
        let mut spans = Vec::with_capacity(plan.seqs.len());
        let mut logit_rows = Vec::new();
        for seq in &plan.seqs {
            let first_row = tokens.len();
            for (i, &t) in seq.tokens.iter().enumerate() {
                let pos = seq.start_pos + i;
                tokens.push(t);
                positions.push(pos);
                slots.push(seq.block_table[pos / bs] as usize * bs + pos % bs);
            }
            spans.push(SeqSpan {
                first_row,
                len: seq.tokens.len(),
                start_pos: seq.start_pos,
                block_table: &seq.block_table,
            });
            if seq.sample.is_some() {
                logit_rows.push(tokens.len() - 1);
            }
            let history = histories.entry(seq.seq_id).or_default();
            if let Some(h) = &seq.history {
                history.clone_from(h);
            }
            history.truncate(seq.start_pos);
            history.extend_from_slice(&seq.tokens);
        }
        Self { tokens, positions, slots, spans, logit_rows }
    }

    /// The rows as a forward pass's input.
    pub fn batch(&self) -> ForwardBatch<'_> {
        ForwardBatch {
            tokens: &self.tokens,
            positions: &self.positions,
            slots: &self.slots,
            spans: &self.spans,
            logit_rows: &self.logit_rows,
        }
    }
}

/// Samples every sampled sequence of a plan from its row of `logits` (`[sampled, vocab]`).
pub fn sample_results(
    plan: &StepPlan,
    logits: &[f32],
    vocab: usize,
    histories: &HashMap<SeqId, Vec<u32>>,
) -> Vec<SeqResult> {
    let sampled: Vec<_> = plan.seqs.iter().filter(|s| s.sample.is_some()).collect();
    sampled
        .par_iter()
        .zip(logits.par_chunks(vocab))
        .map(|(seq, row)| {
            let spec = seq.sample.as_ref().expect("filtered on sample");
            let history = histories.get(&seq.seq_id).map(Vec::as_slice).unwrap_or(&[]);
            let samples = (0..spec.num_samples).map(|i| sample(row, spec, history, spec.sample_index + i)).collect();
            SeqResult { seq_id: seq.seq_id, samples }
        })
        .collect()
}
