//! Types shared by every pagemesh service.
//!
//! * [`sampling`]: the per-request sampling parameters and their validation.
//! * [`sampling_overrides`]: sampling parameters as a request gives them (unset ones take
//!   the server's defaults).
//! * [`step`]: the scheduler → executor step protocol (what to run, which blocks to
//!   read, write, swap and copy) and the executor → scheduler step result.
//! * [`config`]: engine configuration (cache geometry, batching limits, preemption mode).
//! * [`output`]: what a request produces (tokens, logprobs, finish reasons).
//! * [`generation_defaults`]: a model's `generation_config.json` sampling defaults.
//! * [`field_errors`]: which field of a JSON object keeps it from reading as a type.
//! * [`limits`]: bounds every receiver checks on what arrives over NATS.
//! * [`link`]: whether a service's NATS link is up, to judge peers' silence.
//! * [`protocol`]: the messages that cross NATS, public (JSON) and internal (versioned).
//! * [`subjects`]: the NATS subjects, each with its message types ([`wire`]).
//! * [`wire`]: typed topics and endpoints, and their encodings (JSON, MessagePack).
//! * [`step_delta`]: the incremental form of step plans sent to executors.
//! * [`sessions`]: the scheduler sessions an executor has served and left.
//! * [`metrics`]: the Prometheus metric names, labels and histogram buckets.

pub mod chat_message;
pub mod config;
pub mod field_errors;
pub mod generation_defaults;
pub mod limits;
pub mod link;
pub mod metrics;
pub mod output;
pub mod protocol;
pub mod sampling;
pub mod sampling_overrides;
pub mod sessions;
pub mod step;
pub mod step_delta;
pub mod subjects;
pub mod wire;

pub use chat_message::ChatMessage;
pub use config::{EngineConfig, KvAllocation, PreemptionMode};
pub use output::{FinishReason, SampledToken};
pub use sampling::SamplingParams;
pub use step::{BlockId, SampleSpec, ScheduledSeq, SeqId, SeqResult, StepOutput, StepPlan};
