//! What requests produce.

use serde::{Deserialize, Serialize};

/// Why a sequence stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    /// It produced a stop token (the model's eos or one of `stop_token_ids`) or a stop string.
    Stop,
    /// It reached `max_tokens` or the model's context length.
    Length,
    /// It was aborted (client disconnect, stop string found downstream).
    Abort,
    /// It failed.
    Error,
}

impl FinishReason {
    /// The OpenAI-style name (`stop`, `length`, `abort`, `error`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stop => "stop",
            Self::Length => "length",
            Self::Abort => "abort",
            Self::Error => "error",
        }
    }
}

/// One sampled token with its log-probability and, when asked for, the top alternatives.
///
/// Log-probabilities are those of the model's raw distribution (log-softmax of the logits
/// before temperature, penalties and truncation), as vLLM reports them by default.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SampledToken {
    /// The token id.
    pub token: u32,
    /// Its log-probability; present when logprobs were asked for.
    pub logprob: Option<f32>,
    /// The `logprobs` most likely tokens with their log-probabilities, most likely first.
    pub top_logprobs: Vec<(u32, f32)>,
}
