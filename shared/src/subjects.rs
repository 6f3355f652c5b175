//! The NATS subjects, all under one prefix (default `pagemesh`), each declared once with the
//! types that travel on it ([`Topic`] for published messages, [`Endpoint`] for request/reply).
//!
//! Public subjects carry JSON and are documented in `docs/protocol.md`. Internal subjects carry
//! MessagePack and the version of their protocol in their name (`<prefix>.v1.…`); the two
//! that carry every step (steps and their answers, token events) go with fields by position.

use serde_json::Value;

use crate::protocol::{
    AbortRequest, DetokenizerAck, DetokenizerMessage, ExecutorRegistration, GenerateRequest, Heartbeat,
    SchedulerHeartbeat, StepRequest, StepResponse, StreamReport, StreamReportRequest, SubmitAck, SubmitRequest,
};
use crate::wire::{Encoding, Endpoint, Topic};

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

    /// Public: a generation request (JSON, as `docs/protocol.md` describes it); chunks, or an
    /// error, go to its reply inbox.
    pub fn generate(&self) -> Topic<GenerateRequest> {
        self.public("generate")
    }
    /// Public: abort a request by id.
    pub fn abort(&self) -> Topic<AbortRequest> {
        self.public("abort")
    }
    /// Public: text → ids.
    pub fn tokenize(&self) -> Endpoint<Value, Value> {
        self.public_endpoint("tokenize")
    }
    /// Public: ids → text.
    pub fn detokenize(&self) -> Endpoint<Value, Value> {
        self.public_endpoint("detokenize")
    }
    /// Public: the served models.
    pub fn models(&self) -> Endpoint<Value, Value> {
        self.public_endpoint("models")
    }
    /// Public: liveness and readiness.
    pub fn health(&self) -> Endpoint<Value, Value> {
        self.public_endpoint("health")
    }
    /// Public: scheduler statistics (queues, block usage per executor).
    pub fn stats(&self) -> Endpoint<Value, Value> {
        self.public_endpoint("stats")
    }
    /// Internal: tokenized requests for the scheduler, each acknowledged.
    pub fn submit(&self) -> Endpoint<SubmitRequest, SubmitAck> {
        self.internal_endpoint("scheduler.submit")
    }
    /// Internal: aborts for the scheduler (from detokenizers and gateways).
    pub fn scheduler_abort(&self) -> Topic<AbortRequest> {
        self.internal("scheduler.abort")
    }
    /// Internal: detokenizers' progress reports.
    pub fn detokenizer_ack(&self) -> Topic<DetokenizerAck> {
        self.internal("scheduler.detokenizer_ack")
    }
    /// Internal: scheduler heartbeats.
    pub fn scheduler_heartbeat(&self) -> Topic<SchedulerHeartbeat> {
        self.internal("scheduler.heartbeat")
    }
    /// Internal: executor heartbeats (each carries its registration).
    pub fn executor_heartbeat(&self) -> Topic<ExecutorRegistration> {
        self.internal("executor.heartbeat")
    }
    /// Internal: steps for one executor (request/reply).
    pub fn executor_step(&self, executor_id: &str) -> Endpoint<StepRequest, StepResponse> {
        Endpoint::new(format!("{}.v1.executor.{executor_id}.step", self.prefix), Encoding::MessagePackCompact)
    }
    /// Internal: a detokenizer's open streams, asked for by a scheduler taking over.
    pub fn detokenizer_report(&self, detokenizer_id: &str) -> Endpoint<StreamReportRequest, StreamReport> {
        self.internal_endpoint(&format!("detokenizer.{detokenizer_id}.report"))
    }
    /// Internal: detokenizer registration and heartbeats.
    pub fn detokenizer_heartbeat(&self) -> Topic<Heartbeat> {
        self.internal("detokenizer.heartbeat")
    }
    /// Internal: token events for one detokenizer.
    pub fn detokenizer_events(&self, detokenizer_id: &str) -> Topic<DetokenizerMessage> {
        Topic::new(format!("{}.v1.detokenizer.{detokenizer_id}.events", self.prefix), Encoding::MessagePackCompact)
    }

    fn public<M: serde::Serialize + serde::de::DeserializeOwned>(&self, name: &str) -> Topic<M> {
        Topic::new(format!("{}.{name}", self.prefix), Encoding::Json)
    }

    fn public_endpoint<Req, Resp>(&self, name: &str) -> Endpoint<Req, Resp>
    where
        Req: serde::Serialize + serde::de::DeserializeOwned,
        Resp: serde::Serialize + serde::de::DeserializeOwned,
    {
        Endpoint::new(format!("{}.{name}", self.prefix), Encoding::Json)
    }

    fn internal<M: serde::Serialize + serde::de::DeserializeOwned>(&self, name: &str) -> Topic<M> {
        Topic::new(format!("{}.v1.{name}", self.prefix), Encoding::MessagePack)
    }

    fn internal_endpoint<Req, Resp>(&self, name: &str) -> Endpoint<Req, Resp>
    where
        Req: serde::Serialize + serde::de::DeserializeOwned,
        Resp: serde::Serialize + serde::de::DeserializeOwned,
    {
        Endpoint::new(format!("{}.v1.{name}", self.prefix), Encoding::MessagePack)
    }
}
