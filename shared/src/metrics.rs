//! The Prometheus metrics of every pagemesh service, in one place: names (all prefixed
//! `pagemesh_`), label keys, help texts and histogram buckets.
//!
//! The services record them through the `metrics` facade and expose them on `/metrics`; the
//! Grafana dashboard and the alert rules in `monitoring/` refer to these names. Counters end in
//! `_total`, durations are in seconds (`_seconds`).
//!
//! Labels: `model` (the served model name) wherever a model applies, `executor` (the executor
//! instance id) on everything the scheduler keeps per executor and on the executor's own
//! metrics.

/// Label keys.
pub mod labels {
    /// The served model name.
    pub const MODEL: &str = "model";
    /// An executor instance id.
    pub const EXECUTOR: &str = "executor";
    /// Preemption mode: `swap` or `recompute`.
    pub const MODE: &str = "mode";
    /// A request's finish reason: `stop`, `length`, `abort` or `error`.
    pub const FINISH_REASON: &str = "finish_reason";
    /// An error kind (`invalid_request`, `model_not_found`, `overloaded`, `unavailable`,
    /// `internal`).
    pub const KIND: &str = "kind";
    /// An HTTP route of the gateway.
    pub const ENDPOINT: &str = "endpoint";
    /// An HTTP status code.
    pub const STATUS: &str = "status";
    /// A tokenizer operation: `generate`, `tokenize` or `detokenize`.
    pub const OPERATION: &str = "operation";
    /// Which service (or `serve` for all in one process) a NATS client or build belongs to.
    pub const SERVICE: &str = "service";
    /// The pagemesh version.
    pub const VERSION: &str = "version";
    /// A kind of NATS message (`submit`, `abort`, `executor_heartbeat`, `step`, …).
    pub const MESSAGE: &str = "message";
}

/// What kind of Prometheus metric a name is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricKind {
    /// Only goes up.
    Counter,
    /// A value now.
    Gauge,
    /// Observations in buckets.
    Histogram,
}

/// One metric: its name, kind, help text and (for histograms) bucket upper bounds.
#[derive(Debug, Clone, Copy)]
pub struct MetricDef {
    /// Full name, `pagemesh_…`.
    pub name: &'static str,
    /// Counter, gauge or histogram.
    pub kind: MetricKind,
    /// The `# HELP` text.
    pub help: &'static str,
    /// Bucket upper bounds (histograms only; empty otherwise).
    pub buckets: &'static [f64],
}

/// Latencies from a GPU's milliseconds to a CPU's minutes (seconds).
pub const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0,
    7.5, 10.0, 20.0, 30.0, 60.0, 120.0,
];
/// Whole-request durations (seconds): up to 20 minutes.
pub const REQUEST_BUCKETS: &[f64] = &[
    0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 45.0, 60.0, 90.0, 120.0, 180.0, 300.0,
    600.0, 1200.0,
];
/// Tokenizer and detokenizer work (seconds): microseconds to a second.
pub const CODEC_BUCKETS: &[f64] =
    &[0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0];
/// Tokens per request: 1 to a million.
pub const REQUEST_TOKEN_BUCKETS: &[f64] = &[
    1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0, 10000.0, 20000.0, 50000.0, 100000.0,
    200000.0, 500000.0, 1000000.0,
];
/// Sequences per step.
pub const BATCH_SEQUENCE_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0];
/// Tokens per step.
pub const BATCH_TOKEN_BUCKETS: &[f64] =
    &[1.0, 4.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0, 16384.0];

/// Requests running on an executor (gauge; model, executor).
pub const REQUESTS_RUNNING: &str = "pagemesh_requests_running";
/// Requests waiting to be scheduled on an executor (gauge; model, executor).
pub const REQUESTS_WAITING: &str = "pagemesh_requests_waiting";
/// Requests preempted to host memory (gauge; model, executor).
pub const REQUESTS_SWAPPED: &str = "pagemesh_requests_swapped";
/// Requests waiting for any executor or detokenizer to exist (gauge; model).
pub const REQUESTS_UNPLACED: &str = "pagemesh_requests_unplaced";
/// Executors registered with the scheduler (gauge; model).
pub const EXECUTORS: &str = "pagemesh_executors";
/// Detokenizers registered with the scheduler (gauge; model).
pub const DETOKENIZERS: &str = "pagemesh_detokenizers";
/// Device KV blocks in use (gauge; model, executor).
pub const KV_BLOCKS_USED: &str = "pagemesh_kv_blocks_used";
/// Device KV blocks in the pool (gauge; model, executor).
pub const KV_BLOCKS_CAPACITY: &str = "pagemesh_kv_blocks_capacity";
/// Fraction of device KV blocks in use, 0 to 1 (gauge; model, executor).
pub const KV_USAGE_RATIO: &str = "pagemesh_kv_usage_ratio";
/// Host (swap) blocks in use (gauge; model, executor).
pub const SWAP_BLOCKS_USED: &str = "pagemesh_swap_blocks_used";
/// Host (swap) blocks in the pool (gauge; model, executor).
pub const SWAP_BLOCKS_CAPACITY: &str = "pagemesh_swap_blocks_capacity";
/// Fraction of host (swap) blocks in use, 0 to 1 (gauge; model, executor).
pub const SWAP_USAGE_RATIO: &str = "pagemesh_swap_usage_ratio";

/// Preemptions (counter; model, executor, mode).
pub const PREEMPTIONS: &str = "pagemesh_preemptions_total";
/// Blocks copied device → host (counter; model, executor).
pub const BLOCKS_SWAPPED_OUT: &str = "pagemesh_blocks_swapped_out_total";
/// Blocks copied host → device (counter; model, executor).
pub const BLOCKS_SWAPPED_IN: &str = "pagemesh_blocks_swapped_in_total";
/// Requests moved off a lost executor (counter; model, executor = the lost one).
pub const MIGRATIONS: &str = "pagemesh_migrations_total";
/// Executors dropped for missing heartbeats or steps (counter; model).
pub const EXECUTORS_LOST: &str = "pagemesh_executors_lost_total";
/// Generation requests the scheduler received (counter; model).
pub const REQUESTS_RECEIVED: &str = "pagemesh_requests_received_total";
/// Requests refused because the waiting queue is full, HTTP 429 (counter; model).
pub const REQUESTS_REJECTED: &str = "pagemesh_requests_rejected_total";
/// Error replies sent instead of a stream (counter; model, kind).
pub const REQUEST_ERRORS: &str = "pagemesh_request_errors_total";
/// Requests that ended aborted (client gone or an abort message) (counter; model).
pub const REQUESTS_ABORTED: &str = "pagemesh_requests_aborted_total";
/// Requests that ended, by finish reason (counter; model, finish_reason).
pub const REQUESTS_FINISHED: &str = "pagemesh_requests_finished_total";
/// Prompt tokens of admitted requests (counter; model, executor).
pub const PROMPT_TOKENS: &str = "pagemesh_prompt_tokens_total";
/// Tokens generated (counter; model, executor).
pub const GENERATION_TOKENS: &str = "pagemesh_generation_tokens_total";
/// Prompt tokens looked up in the prefix cache (counter; model, executor).
pub const PREFIX_CACHE_QUERIED_TOKENS: &str = "pagemesh_prefix_cache_queried_tokens_total";
/// Prompt tokens found in the prefix cache (counter; model, executor).
pub const PREFIX_CACHE_HIT_TOKENS: &str = "pagemesh_prefix_cache_hit_tokens_total";
/// Steps scheduled (counter; model, executor).
pub const STEPS: &str = "pagemesh_steps_total";

/// From a request's arrival at the scheduler to its first token (histogram; model).
pub const TIME_TO_FIRST_TOKEN: &str = "pagemesh_time_to_first_token_seconds";
/// Between a request's successive tokens (histogram; model).
pub const INTER_TOKEN_LATENCY: &str = "pagemesh_inter_token_latency_seconds";
/// From a request's arrival at the scheduler to its end on the executor (histogram; model).
pub const E2E_REQUEST_LATENCY: &str = "pagemesh_e2e_request_latency_seconds";
/// From arrival to the first step that runs the request (histogram; model).
pub const QUEUE_TIME: &str = "pagemesh_queue_time_seconds";
/// From a request's first token to its end on the executor (histogram; model).
pub const DECODE_TIME: &str = "pagemesh_decode_time_seconds";
/// Prompt tokens of each finished request (histogram; model).
pub const REQUEST_PROMPT_TOKENS: &str = "pagemesh_request_prompt_tokens";
/// Tokens each finished request generated, all its samples together (histogram; model).
pub const REQUEST_GENERATION_TOKENS: &str = "pagemesh_request_generation_tokens";
/// Tokens of each finished request's longest sample (histogram; model).
pub const REQUEST_MAX_GENERATION_TOKENS: &str = "pagemesh_request_max_generation_tokens";
/// From the first step that runs the request to its first token (histogram; model).
pub const PREFILL_TIME: &str = "pagemesh_prefill_time_seconds";
/// A step's round trip, scheduler → executor → scheduler (histogram; model, executor).
pub const STEP_DURATION: &str = "pagemesh_step_duration_seconds";
/// Sequences in a step (histogram; model, executor).
pub const STEP_BATCH_SEQUENCES: &str = "pagemesh_step_batch_sequences";
/// Tokens fed in a step (histogram; model, executor).
pub const STEP_BATCH_TOKENS: &str = "pagemesh_step_batch_tokens";

/// Time the executor spends running a step (histogram; model, executor).
pub const EXECUTOR_STEP_DURATION: &str = "pagemesh_executor_step_seconds";
/// Steps an executor failed (counter; model, executor).
pub const EXECUTOR_STEP_FAILURES: &str = "pagemesh_executor_step_failures_total";

/// Tokenizer work per message (histogram; model, operation).
pub const TOKENIZER_DURATION: &str = "pagemesh_tokenizer_duration_seconds";
/// Detokenizer work per event batch (histogram; model).
pub const DETOKENIZER_DURATION: &str = "pagemesh_detokenizer_duration_seconds";

/// HTTP requests answered by the gateway (counter; endpoint, status).
pub const HTTP_REQUESTS: &str = "pagemesh_http_requests_total";
/// NATS reconnections after the first connection (counter; service).
pub const NATS_RECONNECTS: &str = "pagemesh_nats_reconnects_total";
/// Messages refused by their receiver as malformed or out of bounds (counter; service, message).
pub const INVALID_MESSAGES: &str = "pagemesh_invalid_messages_total";
/// Step answers a scheduler dropped because they came from an executor's earlier life (one
/// dropped and registered again, or restarted) or for a step no longer awaited (counter; model).
pub const STALE_STEP_REPLIES: &str = "pagemesh_stale_step_replies_total";
/// Streams whose events a scheduler sent a detokenizer again because some were lost on the bus
/// (counter; model).
pub const STREAM_RESENDS: &str = "pagemesh_stream_resends_total";
/// Always 1; labels carry the version and the service (gauge; version, service).
pub const BUILD_INFO: &str = "pagemesh_build_info";

const fn counter(name: &'static str, help: &'static str) -> MetricDef {
    MetricDef { name, kind: MetricKind::Counter, help, buckets: &[] }
}

const fn gauge(name: &'static str, help: &'static str) -> MetricDef {
    MetricDef { name, kind: MetricKind::Gauge, help, buckets: &[] }
}

const fn histogram(name: &'static str, help: &'static str, buckets: &'static [f64]) -> MetricDef {
    MetricDef { name, kind: MetricKind::Histogram, help, buckets }
}

/// Every metric, with its kind, help and buckets.
pub const ALL: &[MetricDef] = &[
    gauge(REQUESTS_RUNNING, "Requests running on an executor."),
    gauge(REQUESTS_WAITING, "Requests waiting to be scheduled on an executor."),
    gauge(REQUESTS_SWAPPED, "Requests preempted to host (swap) memory."),
    gauge(REQUESTS_UNPLACED, "Requests accepted but not on an executor yet (waiting for one, or for their turn)."),
    gauge(EXECUTORS, "Executors registered with the scheduler."),
    gauge(DETOKENIZERS, "Detokenizers registered with the scheduler."),
    gauge(KV_BLOCKS_USED, "Device KV blocks in use."),
    gauge(KV_BLOCKS_CAPACITY, "Device KV blocks in the pool."),
    gauge(KV_USAGE_RATIO, "Fraction of device KV blocks in use (0 to 1)."),
    gauge(SWAP_BLOCKS_USED, "Host (swap) blocks in use."),
    gauge(SWAP_BLOCKS_CAPACITY, "Host (swap) blocks in the pool."),
    gauge(SWAP_USAGE_RATIO, "Fraction of host (swap) blocks in use (0 to 1)."),
    counter(PREEMPTIONS, "Preemptions, by mode (swap or recompute)."),
    counter(BLOCKS_SWAPPED_OUT, "KV blocks copied from device to host memory."),
    counter(BLOCKS_SWAPPED_IN, "KV blocks copied from host to device memory."),
    counter(MIGRATIONS, "Requests moved off a lost executor (executor: the lost one)."),
    counter(EXECUTORS_LOST, "Executors dropped for missed heartbeats or steps."),
    counter(REQUESTS_RECEIVED, "Generation requests received by the scheduler."),
    counter(REQUESTS_REJECTED, "Requests refused because the waiting queue is full (HTTP 429)."),
    counter(REQUEST_ERRORS, "Error replies sent instead of a stream, by kind."),
    counter(REQUESTS_ABORTED, "Requests that ended aborted (client gone or an abort message)."),
    counter(REQUESTS_FINISHED, "Requests that ended, by finish reason."),
    counter(PROMPT_TOKENS, "Prompt tokens of admitted requests."),
    counter(GENERATION_TOKENS, "Tokens generated."),
    counter(PREFIX_CACHE_QUERIED_TOKENS, "Prompt tokens looked up in the prefix cache."),
    counter(PREFIX_CACHE_HIT_TOKENS, "Prompt tokens found in the prefix cache."),
    counter(STEPS, "Steps scheduled."),
    histogram(TIME_TO_FIRST_TOKEN, "Seconds from arrival at the scheduler to the first token.", LATENCY_BUCKETS),
    histogram(INTER_TOKEN_LATENCY, "Seconds between a request's successive tokens.", LATENCY_BUCKETS),
    histogram(E2E_REQUEST_LATENCY, "Seconds from arrival at the scheduler to the end of the request.", REQUEST_BUCKETS),
    histogram(QUEUE_TIME, "Seconds from arrival to the first step that runs the request.", REQUEST_BUCKETS),
    histogram(PREFILL_TIME, "Seconds from the first step that runs the request to its first token.", LATENCY_BUCKETS),
    histogram(DECODE_TIME, "Seconds from a request's first token to its end on the executor.", REQUEST_BUCKETS),
    histogram(REQUEST_PROMPT_TOKENS, "Prompt tokens of each finished request.", REQUEST_TOKEN_BUCKETS),
    histogram(
        REQUEST_GENERATION_TOKENS,
        "Tokens each finished request generated (its samples together).",
        REQUEST_TOKEN_BUCKETS,
    ),
    histogram(
        REQUEST_MAX_GENERATION_TOKENS,
        "Tokens of each finished request's longest sample.",
        REQUEST_TOKEN_BUCKETS,
    ),
    histogram(STEP_DURATION, "Seconds of a step's round trip, scheduler to executor and back.", LATENCY_BUCKETS),
    histogram(STEP_BATCH_SEQUENCES, "Sequences in a step.", BATCH_SEQUENCE_BUCKETS),
    histogram(STEP_BATCH_TOKENS, "Tokens fed in a step.", BATCH_TOKEN_BUCKETS),
    histogram(EXECUTOR_STEP_DURATION, "Seconds the executor spends running a step.", LATENCY_BUCKETS),
    counter(EXECUTOR_STEP_FAILURES, "Steps the executor failed."),
    histogram(TOKENIZER_DURATION, "Seconds the tokenizer spends on a message, by operation.", CODEC_BUCKETS),
    histogram(DETOKENIZER_DURATION, "Seconds the detokenizer spends on a batch of tokens.", CODEC_BUCKETS),
    counter(HTTP_REQUESTS, "HTTP requests answered by the gateway, by endpoint and status."),
    counter(NATS_RECONNECTS, "NATS reconnections after the first connection."),
    counter(INVALID_MESSAGES, "Messages refused as malformed or out of bounds, by service and message kind."),
    counter(
        STALE_STEP_REPLIES,
        "Step answers dropped as late: from an executor's earlier life or for a step no longer awaited.",
    ),
    counter(STREAM_RESENDS, "Times a stream's events were sent to a detokenizer again (some were lost on the bus)."),
    gauge(BUILD_INFO, "Always 1; the labels carry the version and the service."),
];

/// The definition of a metric by name.
pub fn find(name: &str) -> Option<&'static MetricDef> {
    ALL.iter().find(|m| m.name == name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_prefixed_and_well_formed() {
        let mut seen = std::collections::HashSet::new();
        for m in ALL {
            assert!(seen.insert(m.name), "{} listed twice", m.name);
            assert!(m.name.starts_with("pagemesh_"), "{}", m.name);
            assert!(m.name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'), "{}", m.name);
            assert_eq!(m.kind == MetricKind::Counter, m.name.ends_with("_total"), "{}", m.name);
            assert!(!m.help.is_empty());
        }
    }

    #[test]
    fn histograms_have_increasing_buckets() {
        for m in ALL {
            match m.kind {
                MetricKind::Histogram => {
                    assert!(m.buckets.len() >= 8, "{}", m.name);
                    assert!(m.buckets.windows(2).all(|w| w[0] < w[1]), "{}", m.name);
                }
                _ => assert!(m.buckets.is_empty(), "{}", m.name),
            }
        }
        let ttft = find(TIME_TO_FIRST_TOKEN).map(|m| m.buckets).unwrap_or_default();
        // Fine enough for a GPU, long enough for a CPU.
        assert!(ttft.first().is_some_and(|b| *b <= 0.005) && ttft.last().is_some_and(|b| *b >= 60.0));
    }
}
