//! Messages that cross NATS.
//!
//! Public messages ([`GenerateRequest`], [`Chunk`], [`ErrorBody`], …) are JSON for clients in
//! any language. Internal ones (scheduler ↔ executor, scheduler → detokenizer) are versioned by
//! their subject (`v1`).

use serde::{Deserialize, Serialize};

use crate::chat_message::ChatMessage;
use crate::output::{FinishReason, SampledToken};
use crate::sampling::SamplingParams;
use crate::sampling_overrides::SamplingOverrides;
use crate::step::StepOutput;

/// The prompt of a generation request: text, token ids, or chat messages.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Prompt {
    /// Text, tokenized with the model's special tokens (BOS).
    Text(String),
    /// Token ids, used as they are.
    Ids(Vec<u32>),
}

/// Stop strings: one or several.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum StopStrings {
    /// One string.
    One(String),
    /// Several.
    Many(Vec<String>),
}

impl StopStrings {
    /// As a list.
    pub fn into_vec(self) -> Vec<String> {
        match self {
            Self::One(s) => vec![s],
            Self::Many(v) => v,
        }
    }
}

/// A generation request published to `<prefix>.generate` (public, JSON).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenerateRequest {
    /// The client's id for the request (one is made when absent).
    #[serde(default)]
    pub request_id: Option<String>,
    /// The model name (checked when given).
    #[serde(default)]
    pub model: Option<String>,
    /// Text or token ids.
    #[serde(default)]
    pub prompt: Option<Prompt>,
    /// Chat messages, rendered with the model's chat template.
    #[serde(default)]
    pub messages: Option<Vec<ChatMessage>>,
    /// With `messages`: end the rendered prompt with the assistant's turn (default true).
    #[serde(default)]
    pub add_generation_prompt: Option<bool>,
    /// Stop strings (the text is cut before them).
    #[serde(default)]
    pub stop: Option<StopStrings>,
    /// Stream chunks as tokens come (default true); false: one final chunk with everything.
    #[serde(default)]
    pub stream: Option<bool>,
    /// Leave special tokens (BOS, EOS, …) out of the text (default true).
    #[serde(default)]
    pub skip_special_tokens: Option<bool>,
    /// End the text with the stop string that ended it (default false: cut before it).
    #[serde(default)]
    pub include_stop_str_in_output: Option<bool>,
    /// Who the request is for: waiting requests are taken round robin across users (a NATS
    /// client account counts as one user, whatever it puts here). The gateway sets it to the
    /// API key's (or the client address's) identity.
    #[serde(default)]
    pub user: Option<String>,
    /// More variables for the chat template (`enable_thinking`, ...), as vLLM's
    /// `chat_template_kwargs`; with `messages` only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chat_template_kwargs: Option<serde_json::Map<String, serde_json::Value>>,
    /// Sampling parameters, named as in the OpenAI API; those left out take the server's
    /// defaults (`max_tokens`: 16 for a prompt, the rest of the context for `messages`).
    #[serde(flatten)]
    pub sampling: SamplingOverrides,
}

/// Token counts of a request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Generated tokens (all samples).
    pub completion_tokens: usize,
    /// Both.
    pub total_tokens: usize,
}

impl Usage {
    /// The usage of `prompt_tokens` in and `completion_tokens` out.
    pub fn new(prompt_tokens: usize, completion_tokens: usize) -> Self {
        Self { prompt_tokens, completion_tokens, total_tokens: prompt_tokens + completion_tokens }
    }
}

impl std::ops::AddAssign for Usage {
    fn add_assign(&mut self, other: Self) {
        *self = Self::new(self.prompt_tokens + other.prompt_tokens, self.completion_tokens + other.completion_tokens);
    }
}

/// One output chunk on a request's reply inbox (public, JSON).
///
/// Chunks of a request carry `index` 0, 1, 2, … with no gap; the last one has `done: true`,
/// the usage, and (like every sample's last chunk) a `finish_reason`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Chunk {
    /// The request's id.
    pub request_id: String,
    /// Position of this chunk in the request's stream.
    pub index: u64,
    /// Which sample (0 unless `n` > 1).
    pub sample_index: u32,
    /// New text.
    pub text: String,
    /// New token ids.
    pub token_ids: Vec<u32>,
    /// Log-probabilities of the new tokens, when asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logprobs: Option<Vec<SampledToken>>,
    /// With `logprobs`: what each of those tokens and its alternatives read as in context,
    /// entry for entry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logprob_texts: Option<Vec<TokenTexts>>,
    /// Set on a sample's last chunk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finish_reason: Option<FinishReason>,
    /// Set on the request's last chunk.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub done: bool,
    /// On the last chunk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
    /// The prompt's token ids, on the first chunk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_token_ids: Option<Vec<u32>>,
}

/// The texts of one sampled token and of its `top_logprobs` alternatives, in the same order:
/// what each adds to the text at that point (held-back bytes it completes included).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct TokenTexts {
    /// The sampled token's text.
    pub text: String,
    /// The alternatives' texts.
    pub top: Vec<String>,
}

/// Kinds of errors, with the HTTP status a gateway maps them to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The request is malformed or out of range (400).
    InvalidRequest,
    /// The named model is not served (404).
    ModelNotFound,
    /// The waiting queue is full (429).
    Overloaded,
    /// No executor is available (503).
    Unavailable,
    /// Something failed inside (500).
    Internal,
}

impl ErrorKind {
    /// The HTTP status.
    pub fn http_status(self) -> u16 {
        match self {
            Self::InvalidRequest => 400,
            Self::ModelNotFound => 404,
            Self::Overloaded => 429,
            Self::Unavailable => 503,
            Self::Internal => 500,
        }
    }

    /// The OpenAI error `type`.
    pub fn openai_type(self) -> &'static str {
        match self {
            Self::InvalidRequest | Self::ModelNotFound => "invalid_request_error",
            Self::Overloaded => "rate_limit_exceeded",
            Self::Unavailable => "service_unavailable",
            Self::Internal => "internal_error",
        }
    }
}

/// An error sent in place of chunks: `{"error": {"message", "kind"}, "request_id"}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorReply {
    /// The request's id, when known.
    #[serde(default)]
    pub request_id: Option<String>,
    /// What went wrong.
    pub error: ErrorBody,
}

/// The error itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// Human-readable message.
    pub message: String,
    /// Kind.
    pub kind: ErrorKind,
    /// The parameter at fault, when one is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub param: Option<String>,
}

impl ErrorReply {
    /// An error of `kind` with `message`.
    pub fn new(request_id: Option<String>, kind: ErrorKind, message: impl Into<String>) -> Self {
        Self { request_id, error: ErrorBody { message: message.into(), kind, param: None } }
    }
}

/// Anything a request's reply inbox receives.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ReplyMessage {
    /// An error; nothing follows.
    Error(ErrorReply),
    /// An output chunk.
    Chunk(Chunk),
}

/// How a request's text is made from its tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct TextOptions {
    /// Leave special tokens out of the text.
    pub skip_special_tokens: bool,
    /// End the text with the stop string that ended it instead of cutting before it.
    pub include_stop_str_in_output: bool,
}

impl Default for TextOptions {
    fn default() -> Self {
        Self { skip_special_tokens: true, include_stop_str_in_output: false }
    }
}

/// Internal (v1): a validated, tokenized request, tokenizer → scheduler.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SubmitRequest {
    /// The request's id.
    pub request_id: String,
    /// Where chunks go.
    pub reply_to: String,
    /// The prompt's ids.
    pub prompt_token_ids: Vec<u32>,
    /// Sampling parameters (seed resolved).
    pub params: SamplingParams,
    /// The resolved seed.
    pub seed: u64,
    /// Stop strings.
    pub stop: Vec<String>,
    /// Stream chunks (else one final chunk).
    pub stream: bool,
    /// How the text is made.
    #[serde(default)]
    pub text: TextOptions,
    /// The NATS account of the client that sent the request (as NATS itself reports it), when
    /// it came from a client account: only that account may abort it on the public subject.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    /// Who the request is for, when it came from inside the services' account (the gateway).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// `params.max_tokens` is the server's default (the request named none): the scheduler
    /// lowers it to what the executor's KV pool can hold rather than refusing the request.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub max_tokens_is_default: bool,
}

impl SubmitRequest {
    /// Whose turn the request waits for: its client account, else its user.
    pub fn fairness_key(&self) -> &str {
        self.owner.as_deref().or(self.user.as_deref()).unwrap_or_default()
    }
}

/// Internal (v1): the scheduler's answer to a submit: it holds the request now (or has
/// answered the client with an error). A submit without an answer is sent again, then
/// refused as unavailable.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SubmitAck {
    /// The request's id.
    pub request_id: String,
}

/// Internal (v1): a scheduler announces itself every 500 ms; detokenizers end their streams
/// with an error when no active scheduler has been heard for a few seconds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SchedulerHeartbeat {
    /// The scheduler instance's id.
    pub id: String,
    /// Whether it serves (a standby only watches).
    pub active: bool,
    /// Its term: each takeover serves under a higher one.
    #[serde(default)]
    pub term: u64,
    /// When it started (milliseconds since the Unix epoch); the older one wins a tie.
    #[serde(default)]
    pub started_ms: u64,
}

/// Internal (v1): an abort, detokenizer or gateway → scheduler.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AbortRequest {
    /// The request's id.
    pub request_id: String,
}

/// Internal (v1): an executor announces itself; sent as its heartbeat, the first one registers it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExecutorRegistration {
    /// Unique id of this executor instance.
    pub executor_id: String,
    /// The model it serves.
    pub model: String,
    /// Tokens per block.
    pub block_size: usize,
    /// Device pool.
    pub num_device_blocks: usize,
    /// Host pool.
    pub num_host_blocks: usize,
    /// This executor process's life: random, fresh at every start. A scheduler that sees the
    /// same id with another incarnation knows the executor restarted (its KV cache is gone).
    pub incarnation: u64,
    /// The internal protocol the executor speaks ([`INTERNAL_PROTOCOL_VERSION`]).
    pub protocol_version: u32,
    /// The newest step it took, as (scheduler session, step number): a scheduler whose step
    /// was lost on the bus sends it again instead of waiting out the step's deadline.
    #[serde(default)]
    pub step_taken: Option<(u64, u64)>,
    /// The newest step it answered, likewise: a lost answer is asked for again (and given
    /// again without running the step twice).
    #[serde(default)]
    pub step_answered: Option<(u64, u64)>,
}

/// The version of the internal (scheduler ↔ executor ↔ detokenizer) protocol. A registration
/// with another version is refused: every service of a mesh must run the same release.
pub const INTERNAL_PROTOCOL_VERSION: u32 = 3;

/// Internal (v1): a heartbeat of an executor or detokenizer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Heartbeat {
    /// The instance's id.
    pub id: String,
}

/// Internal: a step for an executor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepRequest {
    /// The executor incarnation the step is for (from its registration): a restarted executor
    /// refuses steps meant for its previous life.
    pub incarnation: u64,
    /// The step's number, unique within the scheduler; the answer repeats it.
    pub step: u64,
    /// The scheduler's session with this executor: the plan is a delta against what the
    /// executor was told earlier in the same session ([`crate::step_delta`]); a new session
    /// starts from nothing.
    pub session: u64,
    /// The plan, as a delta.
    pub plan: crate::step_delta::PlanDelta,
}

/// Internal: an executor's answer to a [`StepRequest`], naming the incarnation that ran it
/// and the step it answers, so that a scheduler can drop answers that arrive too late.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepResponse {
    /// The answering executor's incarnation.
    pub incarnation: u64,
    /// The step answered.
    pub step: u64,
    /// The answer.
    pub reply: StepReply,
}

/// Internal (v1): an executor's answer to a step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum StepReply {
    /// The step ran.
    Done(StepOutput),
    /// The step failed; the executor's state is unchanged for the sequences it names.
    Failed(String),
    /// The step was refused before it ran because of these sequences (the others are fine).
    Refused {
        /// Why.
        message: String,
        /// The sequences at fault.
        seq_ids: Vec<crate::step::SeqId>,
    },
}

/// Internal (v1): what a detokenizer is sent for a request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum DetokenizerEvent {
    /// A request starts on this detokenizer (or moves to it, with the tokens so far).
    Open(Box<OpenRequest>),
    /// New tokens.
    Tokens {
        /// The request's id.
        request_id: String,
        /// In order.
        tokens: Vec<TokenEvent>,
    },
    /// The request failed or was aborted upstream: end its stream.
    Finish {
        /// The request's id.
        request_id: String,
        /// Why.
        reason: FinishReason,
        /// A message for `error` finishes.
        message: Option<String>,
        /// For an `error` finish before any chunk: the kind of error the client is told
        /// (`unavailable` when absent).
        #[serde(default)]
        kind: Option<ErrorKind>,
    },
}

impl DetokenizerEvent {
    /// The request it is about.
    pub fn request_id(&self) -> &str {
        match self {
            Self::Open(open) => &open.request_id,
            Self::Tokens { request_id, .. } | Self::Finish { request_id, .. } => request_id,
        }
    }
}

/// Internal (v1): everything a detokenizer needs to serve a request's stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OpenRequest {
    /// The request's id.
    pub request_id: String,
    /// Where chunks go.
    pub reply_to: String,
    /// The prompt's ids.
    pub prompt_token_ids: Vec<u32>,
    /// Number of samples.
    pub n: usize,
    /// Stop strings.
    pub stop: Vec<String>,
    /// Stream chunks (else one final chunk).
    pub stream: bool,
    /// Whether chunks carry logprobs.
    pub logprobs: bool,
    /// How the text is made.
    #[serde(default)]
    pub text: TextOptions,
    /// Set when the stream moves from a lost detokenizer: what that one had already published.
    #[serde(default)]
    pub resume: Option<ResumePoint>,
    /// The request's sampling parameters and seed, kept by the detokenizer so that a
    /// scheduler taking over can run the request on.
    #[serde(default)]
    pub params: SamplingParams,
    /// The resolved seed.
    #[serde(default)]
    pub seed: u64,
    /// The client account that sent the request, if any.
    #[serde(default)]
    pub owner: Option<String>,
}

/// Internal: what a scheduler sends a detokenizer: events, in order, under the scheduler's
/// term (events of a term below the highest the detokenizer has heard are dropped). A step's
/// tokens for every request on one detokenizer go in one message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DetokenizerMessage {
    /// The sending scheduler's term.
    pub term: u64,
    /// The events, at most [`crate::limits::MAX_EVENTS_PER_MESSAGE`].
    pub events: Vec<DetokenizerEvent>,
}

/// Internal (v1): a scheduler taking over asks each detokenizer for its open streams, a page
/// at a time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StreamReportRequest {
    /// The new scheduler's term: from now on the detokenizer drops events of lower terms.
    pub term: u64,
    /// Report the streams whose request ids sort after this one (none: from the first).
    #[serde(default)]
    pub after: Option<String>,
}

/// Internal (v1): a page of a detokenizer's open streams.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StreamReport {
    /// The streams, by request id.
    pub streams: Vec<StreamState>,
    /// Whether more pages follow.
    pub more: bool,
}

/// Internal (v1): one stream as its detokenizer holds it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StreamState {
    /// The request (with its sampling parameters and seed).
    pub open: OpenRequest,
    /// Per sample, every token received so far.
    pub generated: Vec<Vec<u32>>,
    /// Per sample, how it ended (none: still running).
    pub finished: Vec<Option<FinishReason>>,
    /// How far its published chunks got.
    pub ack: DetokenizerAck,
}

/// Internal (v1): how far a request's stream had got on a lost detokenizer, so that another
/// one continues it with no gap and no repeat.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ResumePoint {
    /// Index of the next chunk to publish.
    pub next_index: u64,
    /// Per sample, the tokens already covered by published chunks (to replay silently).
    pub consumed: Vec<Vec<u32>>,
    /// Per sample, whether its last chunk is out.
    pub closed: Vec<bool>,
}

/// Internal (v1): a detokenizer's report, after publishing a request's chunks, of how far its
/// stream has got (detokenizer → scheduler).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DetokenizerAck {
    /// The request's id.
    pub request_id: String,
    /// Index of the next chunk it would publish.
    pub next_index: u64,
    /// Per sample, tokens covered by published chunks.
    pub consumed: Vec<usize>,
    /// Per sample, whether its last chunk is out.
    pub closed: Vec<bool>,
    /// Set when the detokenizer misses events of this stream (lost on the bus, e.g. while it
    /// was reconnecting): it asks for them again.
    #[serde(default)]
    pub ask: Option<StreamAsk>,
}

/// Internal (v1): a detokenizer's request for the events of a stream it missed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StreamAsk {
    /// The detokenizer asking.
    pub detokenizer: String,
    /// Per sample, how many tokens it has received (it wants the ones after them, and how the
    /// sample ended); `None` when it holds no such stream (it wants the opening too).
    pub received: Option<Vec<u32>>,
}

/// Internal (v1): one token of one sample.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenEvent {
    /// Which sample.
    pub sample_index: u32,
    /// How many tokens of the sample came before this one (for a finish without a token: how
    /// many came in all). A detokenizer skips events it has had and asks again on a gap.
    pub position: u32,
    /// The token (absent for a finish without a token, e.g. an abort).
    pub token: Option<SampledToken>,
    /// Set when the sample ends.
    pub finish: Option<FinishReason>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generate_requests_parse_openai_style_fields_and_refuse_unknown_ones() {
        let r: GenerateRequest =
            serde_json::from_str(r#"{"prompt": "Hi", "max_tokens": 4, "temperature": 0, "stop": "x"}"#).unwrap();
        assert_eq!(r.prompt, Some(Prompt::Text("Hi".into())));
        assert_eq!(r.sampling.max_tokens, Some(4));
        assert_eq!(r.sampling.top_p, None, "left to the server");
        assert_eq!(r.stop.map(StopStrings::into_vec), Some(vec!["x".to_string()]));
        let ids: GenerateRequest = serde_json::from_str(r#"{"prompt": [1, 2, 3]}"#).unwrap();
        assert_eq!(ids.prompt, Some(Prompt::Ids(vec![1, 2, 3])));
        assert!(serde_json::from_str::<GenerateRequest>(r#"{"prompt": "Hi", "bogus": 1}"#).is_err());
    }

    #[test]
    fn replies_round_trip_and_errors_are_told_apart() {
        let e = ReplyMessage::Error(ErrorReply::new(Some("r".into()), ErrorKind::Overloaded, "full"));
        let text = serde_json::to_string(&e).unwrap();
        assert!(text.contains("\"overloaded\""));
        assert_eq!(serde_json::from_str::<ReplyMessage>(&text).unwrap(), e);
        assert_eq!(ErrorKind::Overloaded.http_status(), 429);
    }
}
