//! The scheduler → executor step protocol.
//!
//! The scheduler is the only writer of block tables. Each [`StepPlan`] tells an executor
//! exactly what to do: which blocks to swap out, swap in and copy *before* the forward pass,
//! then which sequences run, the tokens they feed, their positions, and the block tables that
//! say where every position's K/V lives (slot of position `p` = `block_table[p / block_size]`
//! × `block_size` + `p % block_size`). The executor answers with a [`StepOutput`].
//!
//! The executor keeps, per sequence, the token history it has been fed (for repetition,
//! presence and frequency penalties). A [`ScheduledSeq`] with `history` set replaces that
//! history (first run on an executor, after a prefix-cache hit, a fork, a recompute or a
//! migration); otherwise the fed tokens are appended to it. `released` sequences are dropped.

use serde::{Deserialize, Serialize};

use crate::output::SampledToken;
use crate::sampling::SamplingParams;

/// Version of this protocol; bumped on any incompatible change.
pub const STEP_PROTOCOL_VERSION: u32 = 1;

/// A sequence's id, unique within a scheduler.
pub type SeqId = u64;
/// A physical block index in a device or host pool.
pub type BlockId = u32;

/// Everything an executor does in one step.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StepPlan {
    /// Monotonic step number.
    pub step_id: u64,
    /// Device block → host block copies, done first.
    pub swap_out: Vec<(BlockId, BlockId)>,
    /// Host block → device block copies, done after `swap_out`.
    pub swap_in: Vec<(BlockId, BlockId)>,
    /// Device block → device block copies (copy-on-write), done after the swaps.
    pub copy: Vec<(BlockId, BlockId)>,
    /// Sequences whose executor-side state can be dropped.
    pub released: Vec<SeqId>,
    /// Sequences that run this step (may be empty when the step only swaps).
    pub seqs: Vec<ScheduledSeq>,
}

impl StepPlan {
    /// Total tokens fed this step.
    pub fn num_tokens(&self) -> usize {
        self.seqs.iter().map(|s| s.tokens.len()).sum()
    }
}

/// One sequence's part of a step: a prefill chunk or a single decode token.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScheduledSeq {
    /// Which sequence.
    pub seq_id: SeqId,
    /// Tokens fed this step, at positions `start_pos ..`.
    pub tokens: Vec<u32>,
    /// Position of `tokens[0]`; positions before it already have K/V in the cache.
    pub start_pos: usize,
    /// Physical device blocks covering positions `0 .. start_pos + tokens.len()`.
    pub block_table: Vec<BlockId>,
    /// When set, the executor's token history for this sequence becomes these tokens
    /// (positions `0 .. start_pos`) before `tokens` are appended.
    pub history: Option<Vec<u32>>,
    /// Present when the step's last token is the sequence's last known token, so that the
    /// next token is sampled from its logits.
    pub sample: Option<SampleSpec>,
}

/// How to sample the next token(s) of a sequence.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SampleSpec {
    /// The request's parameters (shared: a plan refers to them, it does not copy them).
    pub params: std::sync::Arc<SamplingParams>,
    /// The resolved seed of the request's random stream.
    pub seed: u64,
    /// Index of the first sample drawn here among the request's `n` samples.
    pub sample_index: u32,
    /// How many samples to draw from these logits (more than one only when a prompt with
    /// `n > 1` finishes its prefill; sample `i` uses index `sample_index + i`).
    pub num_samples: u32,
    /// Prompt length (history before it is prompt, after it is output, for penalties).
    pub prompt_len: usize,
    /// Tokens generated so far by this sample (its position in its random stream).
    pub output_len: usize,
    /// Tokens that must not be sampled this step (stop tokens before `min_tokens`).
    pub banned_tokens: Vec<u32>,
}

/// What an executor returns for one step.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StepOutput {
    /// The plan's `step_id`.
    pub step_id: u64,
    /// One entry per scheduled sequence that had a [`SampleSpec`], in plan order.
    pub results: Vec<SeqResult>,
}

/// The tokens sampled for one sequence in one step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SeqResult {
    /// Which sequence.
    pub seq_id: SeqId,
    /// `num_samples` tokens, in sample-index order.
    pub samples: Vec<SampledToken>,
}
