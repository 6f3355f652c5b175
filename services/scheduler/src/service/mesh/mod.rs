//! The scheduler service's logic as a pure state machine: [`MeshScheduler`] takes [`Event`]s
//! (messages already decoded and checked, step answers, clock ticks) and returns the
//! [`Effect`]s the actor carries out on NATS. It holds no connection, spawns nothing and
//! reads no clock: the time comes with each event, so tests drive it like the engine core.
//!
//! It keeps one pure [`Scheduler`](crate::Scheduler) (block manager + queues) per registered
//! executor and one continuous-batching loop per executor: schedule a step, send it, feed the
//! answer back, send the sampled tokens to the request's detokenizer, repeat. New requests go
//! to the executor whose prefix cache holds most of their prompt, then the one with the most
//! free blocks. An executor that misses its heartbeats or a step's deadline is dropped and its
//! requests move to the others, re-prefilled from prompt + tokens so far, so the client's
//! stream goes on. With no executor, requests wait (bounded in count and time). An abort that
//! arrives before its request is remembered, so that a request whose client is already gone
//! never runs.
//!
//! * [`requests`]: what is known of one request.
//! * [`placement`]: submits, the round-robin admission queue, placing requests on executors.
//! * [`executors`]: executor membership and the step loop (send, answer, failure, loss).
//! * [`streams`]: detokenizers: acks, aborts, events sent again, streams moved.
//! * [`leader`]: the clock tick, heartbeats, taking over from another scheduler and standing by.

mod executors;
mod leader;
mod placement;
mod requests;
mod streams;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod world;

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use pagemesh_shared::link::LinkState;
use pagemesh_shared::protocol::{
    DetokenizerAck, DetokenizerEvent, DetokenizerMessage, ErrorKind, ErrorReply, ExecutorRegistration, Heartbeat,
    SchedulerHeartbeat, StepRequest, StepResponse, StreamState, SubmitAck, SubmitRequest,
};
use pagemesh_shared::step_delta::PlanMirror;
use pagemesh_shared::EngineConfig;
use serde_json::json;

use super::early_aborts::EarlyAborts;
use super::fair_queue::FairQueue;
use super::leadership::{Leadership, Rank};
use super::metrics::{ExecutorMetrics, ModelMetrics};
use crate::Scheduler;
use requests::RequestState;

/// Limits and timeouts of the scheduler service.
#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    /// The served model's name.
    pub model: String,
    /// Tokens that end a sample.
    pub eos_token_ids: Vec<u32>,
    /// Batching limits, queue bounds, preemption mode and prefix caching for every executor;
    /// the block size and pool sizes are replaced by each executor's own.
    pub engine: EngineConfig,
    /// An executor or detokenizer silent this long is gone.
    pub heartbeat_timeout: Duration,
    /// Longest a step may take.
    pub step_timeout: Duration,
    /// Longest a request waits for an executor when there is none.
    pub unplaced_timeout: Duration,
    /// What the model accepts: every submit is checked against it.
    pub limits: pagemesh_shared::limits::ModelLimits,
    /// Most blocks an executor may declare in one pool (larger registrations are refused).
    pub max_executor_blocks: usize,
    /// Most requests waiting in one executor's own queue; the rest wait their turn here,
    /// round robin across clients.
    pub admission_window: usize,
}

/// Who this scheduler is, fixed at its start (the actor draws them; tests choose them).
#[derive(Debug, Clone)]
pub struct Identity {
    /// This instance's id (in its heartbeats).
    pub id: String,
    /// When it started (milliseconds since the Unix epoch): the older scheduler serves.
    pub started_ms: u64,
    /// The first executor session's number: random, so that two schedulers (a standby taking
    /// over) never share sessions and an executor never takes a new scheduler's steps for
    /// repeats of the old one's.
    pub first_session: u64,
}

/// Something that happened, for the scheduler to act on. Messages from NATS arrive decoded
/// and checked against the protocol's limits; the scheduler checks what depends on its state.
#[derive(Debug)]
pub enum Event {
    /// A request to run, and where its acknowledgement goes.
    Submit {
        /// The request.
        submit: Box<SubmitRequest>,
        /// The reply subject of the submit (checked).
        ack_to: Option<String>,
    },
    /// An abort from a service (`from: None`: allowed for any request) or from a client's
    /// account (`Some(account)`: only for requests that account sent; `Some(None)` on a bus
    /// without accounts).
    Abort {
        /// The request to end.
        request_id: String,
        /// Who sent it.
        from: Option<Option<String>>,
    },
    /// An executor's heartbeat (its registration).
    ExecutorBeat(ExecutorRegistration),
    /// A detokenizer's heartbeat.
    DetokenizerBeat(Heartbeat),
    /// A detokenizer's acknowledgement of a stream's progress (checked).
    Ack(DetokenizerAck),
    /// Another scheduler's (or this one's own) heartbeat.
    SchedulerBeat(SchedulerHeartbeat),
    /// The answer to an [`Effect::Step`], or why none came.
    StepDone(StepDone),
    /// The answer to an [`Effect::AskStreams`] (each stream checked).
    StreamsReported {
        /// The detokenizer that was asked.
        detokenizer: String,
        /// Its streams, or why they did not come.
        streams: Result<Vec<StreamState>, String>,
    },
    /// Time passed: judge silence (with the state of this process's own link), resend stalled
    /// streams, expire waits.
    Tick(LinkState),
    /// Time to announce this scheduler (its heartbeat).
    Announce,
}

/// A step's answer (or failure), back from the executor.
#[derive(Debug)]
pub struct StepDone {
    /// The executor the step went to.
    pub executor: String,
    /// The slot generation the step was sent to.
    pub generation: u64,
    /// The step's number.
    pub step: u64,
    /// The answer, or why none came (no answer in time, no responder).
    pub result: Result<StepResponse, String>,
}

/// What the scheduler asks the world to do, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    /// Publish events to a detokenizer.
    Events {
        /// Its id.
        detokenizer: String,
        /// The events, under this scheduler's term.
        message: DetokenizerMessage,
    },
    /// Tell a client an error (on its reply subject, as JSON).
    Error {
        /// The client's reply subject.
        reply_to: String,
        /// The error.
        error: ErrorReply,
    },
    /// Acknowledge a submit.
    SubmitAck {
        /// The submit's reply subject.
        reply_to: String,
        /// The acknowledgement.
        ack: SubmitAck,
    },
    /// Send a step to an executor (within the step deadline); the answer comes back as
    /// [`Event::StepDone`] with this executor, generation and step number.
    Step {
        /// The executor.
        executor: String,
        /// The slot generation it goes to.
        generation: u64,
        /// The step.
        request: StepRequest,
    },
    /// Ask a detokenizer for the streams it holds (after taking over under `term`); the
    /// answer comes back as [`Event::StreamsReported`].
    AskStreams {
        /// The detokenizer.
        detokenizer: String,
        /// The new term.
        term: u64,
    },
    /// Publish this scheduler's heartbeat.
    Heartbeat(SchedulerHeartbeat),
    /// A message was refused (for the refusal counters and the log).
    Refused {
        /// Which kind of message.
        message: &'static str,
        /// Why.
        reason: String,
    },
}

/// One registered executor: its pure core and the state of its step loop.
struct ExecutorSlot {
    core: Scheduler,
    /// What the executor declared (to start its core afresh after a failed step).
    registration: ExecutorRegistration,
    last_seen: Instant,
    /// This slot's life within the scheduler (a fresh number each time an executor is added,
    /// even under the same id): answers to steps of an earlier slot are dropped.
    generation: u64,
    /// The step awaited (its number), if any.
    in_flight: Option<u64>,
    /// What the executor has been told per sequence in this slot's session (its generation).
    mirror: PlanMirror,
    /// The requests of the step in flight: a step that fails is blamed on them.
    in_flight_requests: Vec<u64>,
    /// The step in flight as sent, and when it was last sent: sent again when the executor's
    /// heartbeats show that the step, or its answer, was lost on the bus.
    in_flight_request: Option<(StepRequest, Instant)>,
    metrics: ExecutorMetrics,
}

/// Counters of what went wrong and was recovered, for `stats`.
#[derive(Debug, Default, Clone, Copy)]
struct Recoveries {
    /// Step answers dropped as late.
    stale_replies: u64,
    /// Streams whose events were sent again.
    stream_resends: u64,
    /// Requests moved off lost executors (or adopted after a takeover).
    migrated: u64,
}

/// The scheduler service's state and logic (see the module docs).
pub struct MeshScheduler {
    identity: Identity,
    config: SchedulerConfig,
    /// The time of the event being handled.
    now: Instant,
    /// What handling the current event asks for.
    effects: Vec<Effect>,
    executors: BTreeMap<String, ExecutorSlot>,
    detokenizers: BTreeMap<String, Instant>,
    requests: HashMap<String, RequestState>,
    by_core: HashMap<u64, String>,
    next_core_id: u64,
    /// Requests accepted but not on an executor yet (waiting for one, or for their turn),
    /// taken round robin across clients.
    unplaced: FairQueue<(String, Instant)>,
    next_detokenizer: usize,
    /// Executors recently dropped, with the incarnation dropped: its heartbeats still in
    /// flight are ignored for a while (a new incarnation is taken at once).
    lost: HashMap<String, (Instant, u64)>,
    /// The next executor slot's generation.
    next_generation: u64,
    /// The next step's number.
    next_step: u64,
    recoveries: Recoveries,
    /// Aborts that came before their request.
    early_aborts: EarlyAborts,
    /// Submits answered lately (id and reply subject): one sent again is acknowledged only.
    recent_submits: EarlyAborts,
    /// Whether this scheduler serves or stands by.
    leadership: Leadership,
    /// Since when it serves (none while it stands by).
    serving_since: Option<Instant>,
    metrics: ModelMetrics,
}

impl MeshScheduler {
    /// A scheduler started at `now`, standing by until its leadership says it serves.
    pub fn new(identity: Identity, config: SchedulerConfig, now: Instant) -> Self {
        let rank = Rank { started_ms: identity.started_ms, id: identity.id.clone() };
        Self {
            metrics: ModelMetrics::new(&config.model),
            leadership: Leadership::new(rank, config.heartbeat_timeout, now),
            now,
            effects: Vec::new(),
            executors: BTreeMap::new(),
            detokenizers: BTreeMap::new(),
            requests: HashMap::new(),
            by_core: HashMap::new(),
            next_core_id: 0,
            unplaced: FairQueue::default(),
            next_detokenizer: 0,
            lost: HashMap::new(),
            next_generation: identity.first_session,
            next_step: 0,
            recoveries: Recoveries::default(),
            early_aborts: EarlyAborts::default(),
            recent_submits: EarlyAborts::default(),
            serving_since: None,
            config,
            identity,
        }
    }

    /// Handles one event at `now` and returns what to do, in order.
    pub fn handle(&mut self, now: Instant, event: Event) -> Vec<Effect> {
        self.now = now.max(self.now);
        if !self.leadership.is_active() {
            self.stand_by(event);
        } else {
            self.serve(event);
        }
        std::mem::take(&mut self.effects)
    }

    /// Whether this scheduler serves (else it stands by and answers nothing).
    pub fn is_active(&self) -> bool {
        self.leadership.is_active()
    }

    fn serve(&mut self, event: Event) {
        match event {
            Event::Submit { submit, ack_to } => self.on_submit_message(*submit, ack_to),
            Event::Abort { request_id, from } => self.on_abort(&request_id, from),
            Event::ExecutorBeat(registration) => self.on_executor_beat(registration),
            Event::DetokenizerBeat(beat) => self.on_detokenizer_beat(beat),
            Event::Ack(ack) => self.on_ack(ack),
            Event::SchedulerBeat(beat) => self.on_scheduler_beat(beat),
            Event::StepDone(done) => self.on_step_done(done),
            Event::StreamsReported { detokenizer, streams } => self.on_streams_reported(&detokenizer, streams),
            Event::Tick(link) => self.tick(&link),
            Event::Announce => self.announce(),
        }
    }

    /// Sends events to a detokenizer in one message, under this scheduler's term.
    fn send_events(&mut self, detokenizer: &str, events: Vec<DetokenizerEvent>) {
        let message = DetokenizerMessage { term: self.leadership.term(), events };
        self.effects.push(Effect::Events { detokenizer: detokenizer.to_string(), message });
    }

    /// Sends one event to a detokenizer, under this scheduler's term.
    fn send_event(&mut self, detokenizer: &str, event: DetokenizerEvent) {
        self.send_events(detokenizer, vec![event]);
    }

    /// Tells a client an error on its reply subject.
    fn reply_error(&mut self, reply_to: &str, request_id: &str, kind: ErrorKind, message: String) {
        self.metrics.error(kind);
        tracing::debug!(request_id, error = %message, "scheduler: request refused");
        let error = ErrorReply::new(Some(request_id.to_string()), kind, message);
        self.effects.push(Effect::Error { reply_to: reply_to.to_string(), error });
    }

    /// Records a refused message.
    fn refuse(&mut self, message: &'static str, reason: impl Into<String>) {
        self.effects.push(Effect::Refused { message, reason: reason.into() });
    }

    /// The engine configuration of an executor's core.
    fn engine_config(&self, registration: &ExecutorRegistration) -> EngineConfig {
        EngineConfig {
            block_size: registration.block_size,
            num_device_blocks: registration.num_device_blocks,
            num_host_blocks: registration.num_host_blocks,
            ..self.config.engine.clone()
        }
    }

    /// What the `stats` subject answers.
    pub fn stats(&self) -> serde_json::Value {
        let executors: Vec<_> = self
            .executors
            .iter()
            .map(|(id, slot)| {
                let u = slot.core.block_usage();
                json!({"executor_id": id, "device_blocks_total": u.device_total, "device_blocks_free": u.device_free,
                       "host_blocks_total": u.host_total, "host_blocks_free": u.host_free,
                       "running": slot.core.num_running(), "waiting": slot.core.num_waiting(),
                       "swapped": slot.core.num_swapped(), "stats": slot.core.stats()})
            })
            .collect();
        let r = self.recoveries;
        json!({"model": self.config.model, "scheduler": self.identity.id, "term": self.leadership.term(),
               "executors": executors, "detokenizers": self.detokenizers.len(),
               "requests": self.requests.len(), "unplaced": self.unplaced.len(), "migrated_requests": r.migrated,
               "stale_step_replies": r.stale_replies, "stream_resends": r.stream_resends})
    }

    /// What the `health` subject answers.
    pub fn health(&self) -> serde_json::Value {
        let ready = !self.executors.is_empty() && !self.detokenizers.is_empty();
        json!({"live": true, "ready": ready, "executors": self.executors.len(),
               "detokenizers": self.detokenizers.len(), "scheduler": self.identity.id})
    }
}
