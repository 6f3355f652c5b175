//! What goes into the scheduler (requests) and what comes out of it (per-token events),
//! plus admission errors.

use pagemesh_shared::{FinishReason, SampledToken, SamplingParams};

/// A request to generate `params.n` samples continuing a prompt.
#[derive(Debug, Clone, PartialEq)]
pub struct NewRequest {
    /// Caller-chosen id, unique among unfinished requests.
    pub request_id: u64,
    /// The prompt's token ids (not empty).
    pub prompt_token_ids: Vec<u32>,
    /// How to sample.
    pub params: SamplingParams,
    /// The resolved seed of the request's random stream (passed to the executor).
    pub seed: u64,
    /// Tokens its (single) sample already generated elsewhere — a request moved from a lost
    /// executor. They are re-prefilled after the prompt and count as output, so sampling goes
    /// on exactly where it stopped (same random stream position, penalties, `max_tokens`).
    /// Empty for a new request; only allowed with `n == 1`.
    pub resumed_output: Vec<u32>,
}

/// Something that happened to one sample of a request.
#[derive(Debug, Clone, PartialEq)]
pub struct RequestEvent {
    /// The request.
    pub request_id: u64,
    /// Which of its `n` samples.
    pub sample_index: u32,
    /// The token sampled, if this event carries one.
    pub token: Option<SampledToken>,
    /// Set when the sample is finished (on its last token, or alone on abort and error).
    pub finish: Option<FinishReason>,
}

/// Why [`Scheduler::add_request`](crate::Scheduler::add_request) refused a request.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum AdmissionError {
    /// The request itself is malformed (empty prompt, out-of-range parameters, ...).
    #[error("invalid request: {0}")]
    Invalid(String),
    /// An unfinished request already has this id.
    #[error("request id {0} is already in use by an unfinished request")]
    DuplicateId(u64),
    /// Prompt plus `max_tokens` exceeds the model's context length.
    #[error(
        "prompt ({prompt_len} tokens) plus max_tokens ({max_tokens}) exceeds the model's context length of {max_model_len} tokens"
    )]
    TooLong {
        /// Prompt tokens.
        prompt_len: usize,
        /// Requested `max_tokens`.
        max_tokens: usize,
        /// The model's context length.
        max_model_len: usize,
    },
    /// Even alone, the request could need more KV blocks than the device pool has.
    #[error(
        "request may need {needed_blocks} KV blocks ({n} samples of up to {max_len} tokens) but the device pool has only {pool_blocks}"
    )]
    DoesNotFit {
        /// Blocks needed in the worst case.
        needed_blocks: usize,
        /// Samples.
        n: usize,
        /// Prompt plus `max_tokens`.
        max_len: usize,
        /// Device pool size.
        pool_blocks: usize,
    },
    /// The waiting queue is at its request or token limit; retry later.
    #[error(
        "the waiting queue is full ({waiting_requests} requests and {waiting_tokens} prompt tokens queued; limits {max_requests} requests and {max_tokens} tokens), retry later"
    )]
    QueueFull {
        /// Requests waiting now.
        waiting_requests: usize,
        /// Prompt tokens waiting now.
        waiting_tokens: usize,
        /// `max_waiting_requests`.
        max_requests: usize,
        /// `max_waiting_tokens`.
        max_tokens: usize,
    },
}
