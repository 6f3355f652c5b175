//! NATS subject names, all under one prefix (default `pagemesh`).
//!
//! Public subjects carry JSON and are documented in `docs/protocol.md`. Internal subjects carry
//! the version of their protocol in their name (`<prefix>.v1.…`).

/// The subjects of one deployment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subjects {
    prefix: String,
}

/// Queue group of tokenizer instances on the public request subjects.
pub const TOKENIZER_QUEUE: &str = "pagemesh-tokenizers";

impl Subjects {
    /// Subjects under `prefix`.
    pub fn new(prefix: &str) -> Self {
        Self { prefix: prefix.trim_end_matches('.').to_string() }
    }

    /// The prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Public: a generation request; chunks go to its reply inbox.
    pub fn generate(&self) -> String {
        format!("{}.generate", self.prefix)
    }
    /// Public: abort a request by id.
    pub fn abort(&self) -> String {
        format!("{}.abort", self.prefix)
    }
    /// Public: text → ids.
    pub fn tokenize(&self) -> String {
        format!("{}.tokenize", self.prefix)
    }
    /// Public: ids → text.
    pub fn detokenize(&self) -> String {
        format!("{}.detokenize", self.prefix)
    }
    /// Public: the served models.
    pub fn models(&self) -> String {
        format!("{}.models", self.prefix)
    }
    /// Public: liveness and readiness.
    pub fn health(&self) -> String {
        format!("{}.health", self.prefix)
    }
    /// Public: scheduler statistics (queues, block usage per executor).
    pub fn stats(&self) -> String {
        format!("{}.stats", self.prefix)
    }
    /// Internal: tokenized requests for the scheduler.
    pub fn submit(&self) -> String {
        format!("{}.v1.scheduler.submit", self.prefix)
    }
    /// Internal: aborts for the scheduler (from detokenizers and gateways).
    pub fn scheduler_abort(&self) -> String {
        format!("{}.v1.scheduler.abort", self.prefix)
    }
    /// Internal: detokenizers' progress reports.
    pub fn detokenizer_ack(&self) -> String {
        format!("{}.v1.scheduler.detokenizer_ack", self.prefix)
    }
    /// Internal: scheduler heartbeats.
    pub fn scheduler_heartbeat(&self) -> String {
        format!("{}.v1.scheduler.heartbeat", self.prefix)
    }
    /// Internal: executor heartbeats (each carries its registration).
    pub fn executor_heartbeat(&self) -> String {
        format!("{}.v1.executor.heartbeat", self.prefix)
    }
    /// Internal: steps for one executor (request/reply).
    pub fn executor_step(&self, executor_id: &str) -> String {
        format!("{}.v1.executor.{executor_id}.step", self.prefix)
    }
    /// Internal: a detokenizer's open streams, asked for by a scheduler taking over
    /// (request/reply).
    pub fn detokenizer_report(&self, detokenizer_id: &str) -> String {
        format!("{}.v1.detokenizer.{detokenizer_id}.report", self.prefix)
    }
    /// Internal: detokenizer registration and heartbeats.
    pub fn detokenizer_heartbeat(&self) -> String {
        format!("{}.v1.detokenizer.heartbeat", self.prefix)
    }
    /// Internal: token events for one detokenizer.
    pub fn detokenizer_events(&self, detokenizer_id: &str) -> String {
        format!("{}.v1.detokenizer.{detokenizer_id}.events", self.prefix)
    }
}
