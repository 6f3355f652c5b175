//! A request's state inside the scheduler: its group of sequences (samples), the sampling
//! spec each step carries, and the stop checks.

use pagemesh_shared::{FinishReason, SampleSpec, SamplingParams, SeqId};

/// Which queue a group is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum GroupState {
    /// Waiting for admission (new, or preempted by recompute); holds no blocks.
    Waiting,
    /// Admitted; its sequences hold device blocks.
    Running,
    /// Preempted by swapping; its sequences hold host blocks.
    Swapped,
}

/// One sample's token stream.
#[derive(Debug, Clone)]
pub(crate) struct Sequence {
    pub(crate) seq_id: SeqId,
    pub(crate) sample_index: u32,
    /// Prompt followed by the tokens sampled so far.
    pub(crate) tokens: Vec<u32>,
    /// Leading positions whose K/V is computed.
    pub(crate) num_computed: usize,
    /// The next scheduled step must carry `history` (the executor lacks it).
    pub(crate) needs_history: bool,
    /// The executor holds state for it (so it must be `released` when dropped).
    pub(crate) executor_knows: bool,
    pub(crate) finished: bool,
}

impl Sequence {
    /// A sequence that has run on no executor yet.
    pub(crate) fn new(seq_id: SeqId, sample_index: u32, tokens: Vec<u32>) -> Self {
        Self {
            seq_id,
            sample_index,
            tokens,
            num_computed: 0,
            needs_history: true,
            executor_knows: false,
            finished: false,
        }
    }

    /// Known tokens whose K/V is not computed yet.
    pub(crate) fn remaining(&self) -> usize {
        self.tokens.len() - self.num_computed
    }
}

/// A request: `params.n` samples of one prompt.
///
/// Before its prompt's prefill completes ("pre-fork") the group has a single sequence that
/// samples all `n` first tokens at once; then it forks into one sequence per sample.
#[derive(Debug, Clone)]
pub(crate) struct Group {
    pub(crate) request_id: u64,
    /// Arrival order (monotonic over the scheduler's life).
    pub(crate) arrival: u64,
    pub(crate) prompt_len: usize,
    /// Shared with every plan that samples it (plans refer to it, they do not copy it).
    pub(crate) params: std::sync::Arc<SamplingParams>,
    pub(crate) seed: u64,
    /// Stop tokens (eos unless `ignore_eos`, plus `stop_token_ids`), sorted, deduplicated.
    pub(crate) stop_tokens: Vec<u32>,
    /// Its sequences; finished ones stay in place so that indices are stable.
    pub(crate) seqs: Vec<Sequence>,
    pub(crate) forked: bool,
    pub(crate) state: GroupState,
    /// Unfinished sequences.
    pub(crate) num_live: usize,
}

impl Group {
    /// Sequence slots it takes in a step's batch (a pre-fork group reserves all `n`).
    pub(crate) fn slots(&self) -> usize {
        if self.forked {
            self.num_live
        } else {
            self.params.n
        }
    }

    /// Indices of its unfinished sequences.
    pub(crate) fn live(&self) -> impl Iterator<Item = usize> + '_ {
        self.seqs.iter().enumerate().filter(|(_, s)| !s.finished).map(|(i, _)| i)
    }

    /// Ids of its unfinished sequences.
    pub(crate) fn live_ids(&self) -> Vec<SeqId> {
        self.seqs.iter().filter(|s| !s.finished).map(|s| s.seq_id).collect()
    }

    /// How to sample after the last known token of sequence `idx`.
    pub(crate) fn sample_spec(&self, idx: usize) -> SampleSpec {
        let seq = &self.seqs[idx];
        let output_len = seq.tokens.len() - self.prompt_len;
        SampleSpec {
            params: self.params.clone(),
            seed: self.seed,
            sample_index: seq.sample_index,
            num_samples: if self.forked { 1 } else { self.params.n as u32 },
            prompt_len: self.prompt_len,
            output_len,
            banned_tokens: if output_len < self.params.min_tokens { self.stop_tokens.clone() } else { Vec::new() },
        }
    }

    /// Whether a sample whose `len`-token stream (prompt included) just received `token`
    /// as its last token is finished.
    ///
    /// Stop tokens count only from output index `min_tokens` on (before that they are
    /// banned); the stop token itself stays in the output.
    pub(crate) fn finish_reason(&self, len: usize, token: u32, max_model_len: usize) -> Option<FinishReason> {
        let output_len = len - self.prompt_len;
        if output_len > self.params.min_tokens && self.stop_tokens.binary_search(&token).is_ok() {
            Some(FinishReason::Stop)
        } else if output_len >= self.params.max_tokens || len >= max_model_len {
            Some(FinishReason::Length)
        } else {
            None
        }
    }
}

/// The stop tokens of a request: `eos` unless `ignore_eos`, plus `stop_token_ids`.
pub(crate) fn stop_tokens(params: &SamplingParams, eos: &[u32]) -> Vec<u32> {
    let mut out: Vec<u32> = params.stop_token_ids.clone();
    if !params.ignore_eos {
        out.extend_from_slice(eos);
    }
    out.sort_unstable();
    out.dedup();
    out
}
