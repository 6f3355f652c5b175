//! The scheduler service: the single owner of KV state for one model.
//!
//! It keeps one pure [`Scheduler`] (block manager + queues) per registered executor and one
//! continuous-batching loop per executor: schedule a step, send it, feed the answer back, send
//! the sampled tokens to the request's detokenizer, repeat. New requests go to the executor
//! with the most free blocks. An executor that misses its heartbeats or a step's deadline is
//! dropped and its requests move to the others, re-prefilled from prompt + tokens so far, so
//! the client's stream goes on. With no executor, requests wait (bounded in count and time).
//! An abort that arrives before its request is remembered ([`EarlyAborts`]), so that a request
//! whose client is already gone never runs.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use crate::{AdmissionError, NewRequest, RequestEvent, Scheduler};
use actix::prelude::*;
use pagemesh_shared::limits::{self, ModelLimits};
use pagemesh_shared::protocol::{
    AbortRequest, DetokenizerAck, DetokenizerEvent, DetokenizerMessage, ErrorKind, ErrorReply, ExecutorRegistration,
    Heartbeat, OpenRequest, ResumePoint, SchedulerHeartbeat, StepReply, StepRequest, StepResponse, StreamAsk,
    StreamReport, StreamReportRequest, StreamState, SubmitAck, SubmitRequest, TokenEvent,
};
use pagemesh_shared::SeqId;
use pagemesh_shared::{EngineConfig, FinishReason};
use serde_json::json;

use super::early_aborts::EarlyAborts;
use super::fair_queue::FairQueue;
use super::leadership::{Decision, Leadership, Rank};
use super::metrics::{ExecutorMetrics, ModelMetrics, RequestTiming};
use super::stream_sync::{self, ResendClock};
use pagemesh_bus::bus::{Bus, BusError, OrderedPublisher};
use pagemesh_bus::listen::{listen, Subscription};
use pagemesh_bus::refusals::refuse;
use pagemesh_shared::step_delta::PlanMirror;
use pagemesh_shared::wire::{Endpoint, Topic};
use serde::de::DeserializeOwned;
use serde::Serialize;

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
    pub limits: ModelLimits,
    /// Most blocks an executor may declare in one pool (larger registrations are refused).
    pub max_executor_blocks: usize,
    /// Most requests waiting in one executor's own queue; the rest wait their turn here,
    /// round robin across clients.
    pub admission_window: usize,
}

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

struct RequestState {
    submit: SubmitRequest,
    executor: Option<String>,
    core_id: u64,
    detokenizer: String,
    generated: Vec<Vec<u32>>,
    finished: Vec<Option<FinishReason>>,
    /// How far the detokenizer's published chunks got (from its acks).
    acked: DetokenizerAck,
    /// When the stream last moved on (an ack that got further, or the end on the executor):
    /// a finished request whose last ack does not come is sent again.
    stream_progress: Instant,
    /// Spaces the times its events are sent again.
    resends: ResendClock,
    timing: RequestTiming,
}

impl RequestState {
    fn all_finished(&self) -> bool {
        self.finished.iter().all(Option::is_some)
    }

    /// What a detokenizer needs to open (or, with `resume`, take over) this request's stream.
    fn open_request(&self, resume: Option<ResumePoint>) -> OpenRequest {
        OpenRequest {
            request_id: self.submit.request_id.clone(),
            reply_to: self.submit.reply_to.clone(),
            prompt_token_ids: self.submit.prompt_token_ids.clone(),
            n: self.submit.params.n,
            stop: self.submit.stop.clone(),
            stream: self.submit.stream,
            logprobs: self.submit.params.logprobs.is_some(),
            text: self.submit.text,
            resume,
            params: self.submit.params.clone(),
            seed: self.submit.seed,
            owner: self.submit.owner.clone(),
        }
    }

    /// A request as a detokenizer reported it to a scheduler taking over.
    fn from_stream(stream: StreamState, detokenizer: &str) -> Self {
        let open = stream.open;
        let submit = SubmitRequest {
            request_id: open.request_id,
            reply_to: open.reply_to,
            prompt_token_ids: open.prompt_token_ids,
            params: open.params,
            seed: open.seed,
            stop: open.stop,
            stream: open.stream,
            text: open.text,
            owner: open.owner,
            user: None,
        };
        Self {
            submit,
            executor: None,
            core_id: 0,
            detokenizer: detokenizer.to_string(),
            generated: stream.generated,
            finished: stream.finished,
            acked: stream.ack,
            stream_progress: Instant::now(),
            resends: ResendClock::default(),
            timing: RequestTiming::arrived(),
        }
    }
}

/// How often a scheduler announces itself.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_millis(500);

/// The scheduler service.
pub struct SchedulerService {
    /// This instance's id (in its heartbeats).
    id: String,
    bus: Bus,
    /// Every message but step requests goes out through it, in order.
    outbox: Option<OrderedPublisher>,
    config: SchedulerConfig,
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
    /// Step answers dropped as late so far.
    stale_replies: u64,
    /// Streams whose events were sent again so far.
    stream_resends: u64,
    /// Requests moved off lost executors so far.
    migrated: u64,
    /// Aborts that came before their request.
    early_aborts: EarlyAborts,
    /// Submits answered lately (id and reply subject): one sent again is acknowledged only.
    recent_submits: EarlyAborts,
    /// Whether this scheduler serves or stands by.
    leadership: Leadership,
    /// When it started (milliseconds since the Unix epoch).
    started_ms: u64,
    /// Since when it serves (none while it stands by).
    serving_since: Option<Instant>,
    metrics: ModelMetrics,
}

enum Incoming {
    Submit(async_nats::Message),
    Abort(async_nats::Message),
    PublicAbort(async_nats::Message),
    ExecutorBeat(async_nats::Message),
    DetokenizerBeat(async_nats::Message),
    DetokenizerAck(async_nats::Message),
    Stats(async_nats::Message),
    Health(async_nats::Message),
    SchedulerBeat(async_nats::Message),
}

/// The streams a detokenizer reported to this scheduler taking over.
#[derive(Message)]
#[rtype(result = "()")]
struct StreamsReported {
    detokenizer: String,
    streams: Result<Vec<StreamState>, BusError>,
}

/// Who sent an abort: `None` for a service (the internal subject), else the client's account
/// (the public subject).
fn abort_authority(
    msg: &async_nats::Message,
    subjects: &pagemesh_shared::subjects::Subjects,
) -> Option<Option<String>> {
    let public = msg.subject.as_str() == subjects.abort().subject();
    public.then(|| pagemesh_bus::bus::requester_account(msg))
}

/// An abort as it arrived: JSON on the public subject, MessagePack on the internal one.
fn decode_abort(
    msg: &async_nats::Message,
    subjects: &pagemesh_shared::subjects::Subjects,
) -> Result<AbortRequest, pagemesh_shared::wire::WireError> {
    let public = subjects.abort();
    if msg.subject.as_str() == public.subject() {
        public.decode(&msg.payload)
    } else {
        subjects.scheduler_abort().decode(&msg.payload)
    }
}

/// How an abort for a request that has not arrived yet is remembered: with the account it
/// came from, so that it ends only that account's request.
fn abort_key(owner: Option<&str>, request_id: &str) -> String {
    format!("{}\n{request_id}", owner.unwrap_or_default())
}

/// How long after taking over a scheduler leaves asks for streams it does not hold alone (they
/// may still be adopted from the detokenizers' reports).
const ADOPTION_GRACE: Duration = Duration::from_secs(10);

/// How long after sending a step the executor's heartbeats may show that it has not taken it,
/// or that its answer went out, before the step (or answer) is taken as lost.
const STEP_LOST_AFTER: Duration = Duration::from_secs(1);

/// A random first executor-slot generation (the session executors know a scheduler's steps
/// by): two schedulers (a standby taking over) never share sessions, so an executor never
/// takes a new scheduler's steps for repeats of the old one's.
fn first_session() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    std::collections::hash_map::RandomState::new().build_hasher().finish() >> 1
}

/// Most pages of streams one detokenizer may report.
const MAX_REPORT_PAGES: usize = 4096;
/// Most streams adopted from one detokenizer (what one detokenizer holds at most).
const MAX_ADOPTED_STREAMS: usize = pagemesh_shared::limits::MAX_OPEN_STREAMS;
/// Longest wait for one page of a stream report.
const REPORT_TIMEOUT: Duration = Duration::from_secs(5);

/// Asks a detokenizer for every stream it holds, page by page, keeping the streams that pass
/// [`ModelLimits::check_stream`] (at most [`MAX_ADOPTED_STREAMS`]).
async fn collect_streams(
    bus: &Bus,
    detokenizer: &str,
    term: u64,
    limits: ModelLimits,
) -> Result<Vec<StreamState>, BusError> {
    let subject = bus.subjects.detokenizer_report(detokenizer);
    let mut streams: Vec<StreamState> = Vec::new();
    let mut after: Option<String> = None;
    for _ in 0..MAX_REPORT_PAGES {
        let request = StreamReportRequest { term, after: after.clone() };
        let page: StreamReport = bus.request(&subject, &request, REPORT_TIMEOUT).await?;
        let Some(last) = page.streams.last().map(|s| s.open.request_id.clone()) else { break };
        for stream in page.streams {
            match limits.check_stream(&stream) {
                Ok(()) if streams.len() < MAX_ADOPTED_STREAMS => streams.push(stream),
                Ok(()) => refuse("scheduler", "stream_report", "more streams than one detokenizer holds"),
                Err(e) => refuse("scheduler", "stream_report", &e),
            }
        }
        if !page.more || after.as_ref().is_some_and(|a| *a >= last) {
            break;
        }
        after = Some(last);
    }
    Ok(streams)
}

/// A step's answer (or failure), back from the executor.
#[derive(Message)]
#[rtype(result = "()")]
struct StepDone {
    executor: String,
    /// The slot generation the step was sent to.
    generation: u64,
    /// The step's number.
    step: u64,
    result: Result<StepResponse, BusError>,
}

impl SchedulerService {
    /// A scheduler service.
    pub fn new(bus: Bus, config: SchedulerConfig) -> Self {
        let id = pagemesh_bus::bus::new_id();
        let heartbeat_timeout = config.heartbeat_timeout;
        let started_ms =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
        Self {
            metrics: ModelMetrics::new(&config.model),
            bus,
            outbox: None,
            config,
            executors: BTreeMap::new(),
            detokenizers: BTreeMap::new(),
            requests: HashMap::new(),
            by_core: HashMap::new(),
            next_core_id: 0,
            unplaced: FairQueue::default(),
            next_detokenizer: 0,
            lost: HashMap::new(),
            next_generation: first_session(),
            next_step: 0,
            stale_replies: 0,
            stream_resends: 0,
            migrated: 0,
            early_aborts: EarlyAborts::default(),
            recent_submits: EarlyAborts::default(),
            leadership: Leadership::new(Rank { started_ms, id: id.clone() }, heartbeat_timeout, Instant::now()),
            started_ms,
            serving_since: None,
            id,
        }
    }

    /// Publishes in order: what is published to one subscriber arrives in the order sent.
    fn publish<M: Serialize + DeserializeOwned>(&mut self, topic: Topic<M>, message: M) {
        self.outbox().publish(&topic, &message);
    }

    /// Answers a request of `endpoint`, in order with what is published.
    fn respond<Req, Resp>(&mut self, endpoint: Endpoint<Req, Resp>, reply: String, response: Resp)
    where
        Req: Serialize + DeserializeOwned,
        Resp: Serialize + DeserializeOwned,
    {
        self.outbox().respond(&endpoint, reply, &response);
    }

    fn outbox(&mut self) -> &OrderedPublisher {
        let bus = &self.bus;
        self.outbox.get_or_insert_with(|| OrderedPublisher::start(bus))
    }

    /// Sends an event to a detokenizer, under this scheduler's term.
    fn send_event(&mut self, detokenizer: &str, event: DetokenizerEvent) {
        self.send_events(detokenizer, vec![event]);
    }

    /// Sends events to a detokenizer in one message, under this scheduler's term.
    fn send_events(&mut self, detokenizer: &str, events: Vec<DetokenizerEvent>) {
        let topic = self.bus.subjects.detokenizer_events(detokenizer);
        self.publish(topic, DetokenizerMessage { term: self.leadership.term(), events });
    }

    fn reply_error(&mut self, reply_to: &str, request_id: &str, kind: ErrorKind, message: String) {
        self.metrics.error(kind);
        self.publish(Topic::json(reply_to), ErrorReply::new(Some(request_id.to_string()), kind, message));
    }

    fn engine_config(&self, registration: &ExecutorRegistration) -> EngineConfig {
        EngineConfig {
            block_size: registration.block_size,
            num_device_blocks: registration.num_device_blocks,
            num_host_blocks: registration.num_host_blocks,
            ..self.config.engine.clone()
        }
    }

    /// Handles a submit (unless it was handled already) and acknowledges it on `ack_to`.
    fn on_submit_message(&mut self, submit: SubmitRequest, ack_to: Option<String>, ctx: &mut Context<Self>) {
        let key = format!("{}\n{}", submit.request_id, submit.reply_to);
        let ack = SubmitAck { request_id: submit.request_id.clone() };
        if !self.recent_submits.contains(&key, Instant::now()) {
            self.recent_submits.remember(&key, Instant::now());
            self.on_submit(submit, ctx);
        }
        if let Some(reply) = ack_to.filter(|r| limits::check_reply_subject(r).is_ok()) {
            self.respond(self.bus.subjects.submit(), reply, ack);
        }
    }

    fn on_submit(&mut self, submit: SubmitRequest, ctx: &mut Context<Self>) {
        self.metrics.received();
        if let Err(message) = self.config.limits.check_submit(&submit) {
            refuse("scheduler", "submit", &message);
            if limits::check_reply_subject(&submit.reply_to).is_ok() {
                let id = submit.request_id.chars().take(limits::MAX_REQUEST_ID_LEN).collect::<String>();
                self.reply_error(&submit.reply_to, &id, ErrorKind::InvalidRequest, message);
            }
            return;
        }
        if self.requests.contains_key(&submit.request_id) {
            let message = format!("a request with id `{}` is already running", submit.request_id);
            self.reply_error(&submit.reply_to, &submit.request_id, ErrorKind::InvalidRequest, message);
            return;
        }
        if self.early_aborts.take(&abort_key(submit.owner.as_deref(), &submit.request_id), Instant::now()) {
            // Its client gave up while it was on its way: it ends before it takes any block.
            self.metrics.aborted();
            let message = format!("request `{}` was aborted before it started", submit.request_id);
            let error = ErrorReply::new(Some(submit.request_id), ErrorKind::InvalidRequest, message);
            self.publish(Topic::json(submit.reply_to), error);
            return;
        }
        if self.unplaced.len() >= self.config.engine.max_waiting_requests {
            let message = "the server is overloaded: too many requests are waiting".to_string();
            self.reply_error(&submit.reply_to, &submit.request_id, ErrorKind::Overloaded, message);
            return;
        }
        let id = submit.request_id.clone();
        let mut state = self.new_state(submit);
        // Its stream opens now, so that a scheduler taking over learns of it.
        if let Some(detokenizer) = self.pick_detokenizer() {
            state.detokenizer = detokenizer.clone();
            let open = state.open_request(None);
            self.send_event(&detokenizer, DetokenizerEvent::Open(Box::new(open)));
        }
        self.requests.insert(id.clone(), state);
        self.queue(&id);
        self.admit(ctx);
    }

    /// Queues a request for its turn.
    fn queue(&mut self, request_id: &str) {
        let key = self.requests.get(request_id).map(|s| s.submit.fairness_key().to_string()).unwrap_or_default();
        self.unplaced.push(&key, (request_id.to_string(), Instant::now()));
    }

    /// Most requests an executor's own waiting queue holds before more wait their turn here:
    /// small enough that the order across clients is decided here, never above half the
    /// waiting bound (so that the executor's queue never refuses an admitted request).
    fn admission_window(&self) -> usize {
        self.config.admission_window.min(self.config.engine.max_waiting_requests / 2).max(1)
    }

    fn has_room(&self, slot: &ExecutorSlot) -> bool {
        slot.core.num_waiting() < self.admission_window()
    }

    /// Moves queued requests onto executors, round robin across clients, while an executor
    /// has room.
    fn admit(&mut self, ctx: &mut Context<Self>) {
        if self.executors.is_empty() || self.detokenizers.is_empty() {
            return;
        }
        while !self.unplaced.is_empty() && self.executors.values().any(|slot| self.has_room(slot)) {
            let Some((id, _)) = self.unplaced.pop() else { break };
            self.place(&id, ctx);
        }
    }

    fn new_state(&self, submit: SubmitRequest) -> RequestState {
        let n = submit.params.n;
        let acked = DetokenizerAck {
            request_id: submit.request_id.clone(),
            next_index: 0,
            consumed: vec![0; n],
            closed: vec![false; n],
            ask: None,
        };
        RequestState {
            submit,
            executor: None,
            core_id: 0,
            detokenizer: String::new(),
            generated: vec![Vec::new(); n],
            finished: vec![None; n],
            acked,
            stream_progress: Instant::now(),
            resends: ResendClock::default(),
            timing: RequestTiming::arrived(),
        }
    }

    /// Puts a request (new, or moved from a lost executor) on the executor whose prefix cache
    /// holds most of its prompt, then with the most free blocks, and opens its stream on a
    /// detokenizer if it has none.
    fn place(&mut self, request_id: &str, ctx: &mut Context<Self>) {
        let Some(state) = self.requests.get(request_id) else { return };
        if state.detokenizer.is_empty() && self.detokenizers.is_empty() {
            // Nowhere to stream yet: wait like a request with no executor.
            self.queue(request_id);
            return;
        }
        let prompt = &state.submit.prompt_token_ids;
        let any_room = self.executors.values().any(|slot| self.has_room(slot));
        let Some(target) = self
            .executors
            .iter()
            .filter(|(_, slot)| !any_room || self.has_room(slot))
            .max_by_key(|(_, slot)| {
                (slot.core.block_manager().cached_prefix_blocks(prompt), slot.core.block_usage().device_free)
            })
            .map(|(id, _)| id.clone())
        else {
            return;
        };
        let submit = &state.submit;
        let done: usize = state.generated.first().map_or(0, Vec::len);
        let resumed = done > 0;
        if resumed && submit.params.n > 1 {
            let id = submit.request_id.clone();
            self.fail(&id, "the executor serving this request was lost and a request with n > 1 cannot move");
            return;
        }
        let resumed_output = if resumed { state.generated[0].clone() } else { Vec::new() };
        let core_id = self.next_core_id;
        self.next_core_id += 1;
        let new = NewRequest {
            request_id: core_id,
            prompt_token_ids: submit.prompt_token_ids.clone(),
            params: submit.params.clone(),
            seed: submit.seed,
            resumed_output,
        };
        let Some(slot) = self.executors.get_mut(&target) else { return };
        if let Err(e) = slot.core.add_request(new) {
            let kind = match e {
                AdmissionError::QueueFull { .. } => ErrorKind::Overloaded,
                _ => ErrorKind::InvalidRequest,
            };
            let (reply, id) = (submit.reply_to.clone(), submit.request_id.clone());
            if resumed {
                self.fail(&id, &format!("the request could not move to another executor: {e}"));
            } else if !state.detokenizer.is_empty() {
                // Its stream is open (it waited its turn): the detokenizer ends it.
                self.fail_with(&id, kind, &e.to_string());
            } else {
                self.requests.remove(&id);
                self.reply_error(&reply, &id, kind, e.to_string());
            }
            return;
        }
        if !resumed {
            slot.metrics.admitted(submit.prompt_token_ids.len());
        }
        self.by_core.insert(core_id, request_id.to_string());
        let needs_detokenizer = state.detokenizer.is_empty();
        let detokenizer = match needs_detokenizer {
            true => self.pick_detokenizer().unwrap_or_default(),
            false => state.detokenizer.clone(),
        };
        let Some(state) = self.requests.get_mut(request_id) else { return };
        state.executor = Some(target.clone());
        state.core_id = core_id;
        if needs_detokenizer {
            state.detokenizer = detokenizer.clone();
            let open = state.open_request(None);
            self.send_event(&detokenizer, DetokenizerEvent::Open(Box::new(open)));
        }
        self.drive(&target, ctx);
    }

    /// The next detokenizer, round robin (none when none is registered).
    fn pick_detokenizer(&mut self) -> Option<String> {
        let count = self.detokenizers.len();
        let id = self.detokenizers.keys().nth(self.next_detokenizer % count.max(1)).cloned();
        self.next_detokenizer += 1;
        id
    }

    /// Ends a request with an error on its stream (or its inbox if no stream is open).
    fn fail(&mut self, request_id: &str, message: &str) {
        self.fail_with(request_id, ErrorKind::Unavailable, message);
    }

    /// [`fail`](Self::fail) with the kind of error a client that has no chunk yet is told.
    fn fail_with(&mut self, request_id: &str, kind: ErrorKind, message: &str) {
        let Some(state) = self.requests.remove(request_id) else { return };
        self.by_core.remove(&state.core_id);
        if let Some(executor) = &state.executor {
            if let Some(slot) = self.executors.get_mut(executor) {
                slot.core.abort_request(state.core_id);
            }
        }
        if state.detokenizer.is_empty() {
            self.reply_error(&state.submit.reply_to, request_id, kind, message.to_string());
        } else {
            self.metrics.error(kind);
            let event = DetokenizerEvent::Finish {
                request_id: request_id.to_string(),
                reason: FinishReason::Error,
                message: Some(message.to_string()),
                kind: Some(kind),
            };
            self.send_event(&state.detokenizer, event);
        }
    }

    /// Counts a stream whose events are sent again.
    fn count_resend(&mut self) {
        self.stream_resends += 1;
        self.metrics.stream_resent();
    }

    /// Counts a step answer dropped as late.
    fn stale_reply(&mut self) {
        self.stale_replies += 1;
        self.metrics.stale_step_reply();
    }

    /// Starts the executor's next step if it has none in flight and work to do.
    fn drive(&mut self, executor: &str, ctx: &mut Context<Self>) {
        let Some(slot) = self.executors.get_mut(executor) else { return };
        if slot.in_flight.is_some() {
            return;
        }
        let Some(plan) = slot.core.schedule() else { return };
        self.next_step += 1;
        let step = self.next_step;
        slot.in_flight = Some(step);
        let (generation, incarnation) = (slot.generation, slot.registration.incarnation);
        let delta = slot.mirror.encode(&plan);
        slot.metrics.step_sent(&plan);
        slot.in_flight_requests.clear();
        let now = Instant::now();
        for seq in &plan.seqs {
            let Some(core_id) = slot.core.request_of(seq.seq_id) else { continue };
            if let Some(state) = self.by_core.get(&core_id).and_then(|id| self.requests.get_mut(id)) {
                state.timing.scheduled(&self.metrics, now);
                slot.in_flight_requests.push(core_id);
            }
        }
        slot.in_flight_requests.sort_unstable();
        slot.in_flight_requests.dedup();
        let request = StepRequest { incarnation, step, session: generation, plan: delta };
        slot.in_flight_request = Some((request.clone(), now));
        self.send_step(executor, generation, request, ctx);
    }

    /// Sends a step to an executor; its answer (or the deadline) comes back as [`StepDone`].
    fn send_step(&mut self, executor: &str, generation: u64, request: StepRequest, ctx: &mut Context<Self>) {
        let bus = self.bus.clone();
        let endpoint = bus.subjects.executor_step(executor);
        let timeout = self.config.step_timeout;
        let executor = executor.to_string();
        let step = request.step;
        ctx.spawn(
            async move {
                let result = bus.request(&endpoint, &request, timeout).await;
                StepDone { executor, generation, step, result }
            }
            .into_actor(self)
            .map(|done, _, ctx| ctx.notify(done)),
        );
    }

    /// Sends the step in flight again when the executor's heartbeat shows, [`STEP_LOST_AFTER`]
    /// after it was sent, that the step or its answer was lost on the bus: it never took the
    /// step (it runs it now), or it answered and the answer never came (it answers again
    /// without running it twice).
    fn resend_lost_step(&mut self, registration: &ExecutorRegistration, ctx: &mut Context<Self>) {
        let executor = registration.executor_id.as_str();
        let Some(slot) = self.executors.get_mut(executor) else { return };
        let generation = slot.generation;
        let Some((request, sent)) = slot.in_flight_request.as_mut() else { return };
        let this = (generation, request.step);
        let not_taken =
            registration.step_taken.is_none_or(|(session, step)| session != generation || step < request.step);
        let answered = registration.step_answered == Some(this);
        if !(not_taken || answered) || sent.elapsed() < STEP_LOST_AFTER {
            return;
        }
        *sent = Instant::now();
        let request = request.clone();
        let what = if answered { "its answer" } else { "the step" };
        tracing::warn!("scheduler: step {} to executor {executor}: {what} was lost; sending it again", request.step);
        self.send_step(executor, generation, request, ctx);
    }

    fn route(&mut self, events: Vec<RequestEvent>) {
        let now = Instant::now();
        let mut batches: Vec<(String, Vec<TokenEvent>)> = Vec::new();
        let mut batch_of: HashMap<u64, usize> = HashMap::new();
        for event in events {
            let Some(request_id) = self.by_core.get(&event.request_id).cloned() else { continue };
            let Some(state) = self.requests.get_mut(&request_id) else { continue };
            let sample = event.sample_index as usize;
            let position = state.generated.get(sample).map_or(0, Vec::len) as u32;
            if let (Some(token), Some(generated)) = (&event.token, state.generated.get_mut(sample)) {
                generated.push(token.token);
            }
            if event.finish.is_some() {
                if let Some(f) = state.finished.get_mut(sample) {
                    *f = event.finish;
                }
            }
            let token_event =
                TokenEvent { sample_index: event.sample_index, position, token: event.token, finish: event.finish };
            match batch_of.get(&event.request_id) {
                Some(&i) => batches[i].1.push(token_event),
                None => {
                    batch_of.insert(event.request_id, batches.len());
                    batches.push((request_id, vec![token_event]));
                }
            }
        }
        // One message per detokenizer with every request's tokens, in the order they came.
        let mut outgoing: Vec<(String, Vec<DetokenizerEvent>)> = Vec::new();
        for (request_id, tokens) in batches {
            let Some(state) = self.requests.get_mut(&request_id) else { continue };
            if tokens.iter().any(|t| t.token.is_some()) {
                state.timing.tokens(&self.metrics, now);
            }
            let detokenizer = state.detokenizer.clone();
            if state.all_finished() {
                state.timing.finished(&self.metrics);
                // Done on the executor; the state stays until the detokenizer's last chunk is
                // out (its ack), so that a lost detokenizer's stream can still be finished.
                let core_id = state.core_id;
                self.by_core.remove(&core_id);
                if let Some(state) = self.requests.get_mut(&request_id) {
                    state.executor = None;
                    state.stream_progress = now;
                }
                self.release_if_done(&request_id);
            }
            let event = DetokenizerEvent::Tokens { request_id, tokens };
            match outgoing.iter_mut().find(|(d, _)| *d == detokenizer) {
                Some((_, events)) => events.push(event),
                None => outgoing.push((detokenizer, vec![event])),
            }
        }
        for (detokenizer, events) in outgoing {
            self.send_events(&detokenizer, events);
        }
    }

    fn on_step_done(&mut self, done: StepDone, ctx: &mut Context<Self>) {
        let awaited = self
            .executors
            .get(&done.executor)
            .is_some_and(|slot| slot.generation == done.generation && slot.in_flight == Some(done.step));
        if !awaited {
            // The answer (or the timeout) of a step sent to an executor slot that is gone: a
            // late answer must not touch the slot now under that name.
            self.stale_reply();
            return;
        }
        let Some(slot) = self.executors.get_mut(&done.executor) else { return };
        let result = match done.result {
            Ok(response) if response.incarnation != slot.registration.incarnation || response.step != done.step => {
                tracing::warn!(
                    "scheduler: executor {} answered as incarnation {} (registered as {}): it restarted",
                    done.executor,
                    response.incarnation,
                    slot.registration.incarnation
                );
                self.stale_reply();
                self.lose_executor(&done.executor, ctx);
                return;
            }
            Ok(response) => Ok(response.reply),
            Err(e) => Err(e),
        };
        match result {
            Ok(StepReply::Done(output)) => {
                slot.in_flight = None;
                slot.in_flight_request = None;
                let events = slot.core.process_output(&output);
                slot.metrics.step_done(&slot.core);
                slot.metrics.generated(output.results.iter().map(|r| r.samples.len()).sum());
                self.route(events);
                // Room may have opened: the next step takes whoever's turn it is.
                self.admit(ctx);
                self.drive(&done.executor, ctx);
            }
            Ok(StepReply::Failed(message)) => {
                tracing::warn!("scheduler: executor {} failed a step: {message}", done.executor);
                self.fail_step(&done.executor, &message, &[], ctx);
            }
            Ok(StepReply::Refused { message, seq_ids }) => {
                tracing::warn!("scheduler: executor {} refused a step: {message}", done.executor);
                self.fail_step(&done.executor, &message, &seq_ids, ctx);
            }
            Err(e) => {
                tracing::warn!("scheduler: executor {} did not answer a step: {e}", done.executor);
                self.lose_executor(&done.executor, ctx);
            }
        }
    }

    /// An executor answered that a step failed: the requests of the sequences it names end
    /// with an error (all the step's requests when it names none: they cannot be told apart
    /// from the one that caused it), and the executor goes on with a fresh core, its other
    /// requests re-placed as after a loss. It is not dropped: it is alive, and the step that
    /// failed is not sent again.
    fn fail_step(&mut self, executor: &str, message: &str, seq_ids: &[SeqId], ctx: &mut Context<Self>) {
        let Some(slot) = self.executors.get_mut(executor) else { return };
        let in_step: Vec<String> = std::mem::take(&mut slot.in_flight_requests)
            .iter()
            .filter_map(|core_id| self.by_core.get(core_id).cloned())
            .collect();
        let named: Vec<String> = seq_ids
            .iter()
            .filter_map(|&seq| slot.core.request_of(seq))
            .filter_map(|core_id| self.by_core.get(&core_id).cloned())
            .collect();
        let blamed = if named.is_empty() { in_step } else { named };
        let registration = slot.registration.clone();
        for id in &blamed {
            self.fail(id, &format!("the executor could not run this request: {message}"));
        }
        let Some(slot) = self.executors.remove(executor) else { return };
        let moved = self.requests_on(executor);
        slot.metrics.lost(moved.len());
        self.add_executor(registration, Instant::now());
        self.rehome(moved, ctx);
    }

    /// The requests placed on `executor`, oldest first.
    fn requests_on(&self, executor: &str) -> Vec<String> {
        let mut moved: Vec<String> = self
            .requests
            .iter()
            .filter(|(_, s)| s.executor.as_deref() == Some(executor))
            .map(|(id, _)| id.clone())
            .collect();
        moved.sort_by_key(|id| self.requests.get(id).map(|s| s.core_id));
        moved
    }

    /// Drops an executor and moves its requests to the others (or waits for one).
    fn lose_executor(&mut self, executor: &str, ctx: &mut Context<Self>) {
        let Some(slot) = self.executors.remove(executor) else { return };
        self.metrics.executor_lost();
        self.lost.insert(executor.to_string(), (Instant::now(), slot.registration.incarnation));
        tracing::warn!("scheduler: executor {executor} is gone; moving its requests");
        let moved = self.requests_on(executor);
        slot.metrics.lost(moved.len());
        self.rehome(moved, ctx);
    }

    /// Places requests taken off an executor again (from prompt + tokens so far).
    fn rehome(&mut self, moved: Vec<String>, ctx: &mut Context<Self>) {
        self.migrated += moved.len() as u64;
        for id in moved {
            if let Some(state) = self.requests.get_mut(&id) {
                self.by_core.remove(&state.core_id);
                state.executor = None;
            }
            if self.executors.is_empty() {
                self.queue(&id);
            } else {
                self.place(&id, ctx);
            }
        }
    }

    /// An abort from a service (`None`: allowed for any request) or from the account of a
    /// client (`Some(account)`: only for requests that account sent; `Some(None)` on a bus
    /// without accounts).
    fn on_abort(&mut self, request_id: &str, from: Option<Option<String>>, ctx: &mut Context<Self>) {
        let Some(state) = self.requests.get(request_id) else {
            let owner = from.flatten();
            self.early_aborts.remember(&abort_key(owner.as_deref(), request_id), Instant::now());
            return;
        };
        if let Some(account) = &from {
            if *account != state.submit.owner {
                refuse("scheduler", "abort", &format!("an abort of {request_id} from another client"));
                return;
            }
        }
        match state.executor.clone() {
            Some(executor) => {
                let core_id = state.core_id;
                if let Some(slot) = self.executors.get_mut(&executor) {
                    let events = slot.core.abort_request(core_id);
                    self.route(events);
                    self.drive(&executor, ctx);
                }
            }
            None if !state.all_finished() => {
                // Waiting for an executor: it ends here.
                self.unplaced.retain(|(id, _)| id != request_id);
                self.fail(request_id, "aborted");
            }
            None => {}
        }
    }

    fn on_ack(&mut self, mut ack: DetokenizerAck) {
        let id = ack.request_id.clone();
        let ask = ack.ask.take();
        let Some(state) = self.requests.get_mut(&id) else {
            if let Some(ask) = ask {
                self.on_ask_for_unknown(&id, &ask);
            }
            return;
        };
        let n = state.submit.params.n;
        if let Some(StreamAsk { received: None, .. }) = ask {
            // The detokenizer holds nothing of this stream: open it there again (if it was
            // opened anywhere yet).
            if !state.detokenizer.is_empty() && state.resends.allow(Instant::now()) {
                let target = state.detokenizer.clone();
                self.reopen_stream(&id, &target);
            }
            return;
        }
        if ack.consumed.len() != n || ack.closed.len() != n {
            refuse("scheduler", "detokenizer_ack", &format!("an ack for {id} names the wrong number of samples"));
            return;
        }
        if ack.next_index >= state.acked.next_index {
            if ack != state.acked {
                state.stream_progress = Instant::now();
            }
            state.acked = ack;
        }
        if let Some(StreamAsk { received: Some(received), .. }) = ask {
            if state.resends.allow(Instant::now()) {
                let from: Vec<usize> = received.iter().map(|&r| r as usize).collect();
                self.resend_tokens(&id, &from);
            }
        }
        self.release_if_done(&id);
    }

    /// A detokenizer asks for a stream this scheduler does not hold: it ended here (its end
    /// was lost on the way) and the detokenizer is told to end it. Not while streams may still
    /// be adopted after a takeover.
    fn on_ask_for_unknown(&mut self, request_id: &str, ask: &StreamAsk) {
        let adopting = self.serving_since.is_none_or(|since| since.elapsed() < ADOPTION_GRACE);
        if !self.leadership.is_active() || adopting || ask.received.is_none() {
            return;
        }
        let event = DetokenizerEvent::Finish {
            request_id: request_id.to_string(),
            reason: FinishReason::Error,
            message: Some("the scheduler no longer holds this request".into()),
            kind: None,
        };
        self.send_event(&ask.detokenizer, event);
    }

    /// Sends a request's detokenizer its tokens after `from` (per sample) again.
    fn resend_tokens(&mut self, request_id: &str, from: &[usize]) {
        let Some(state) = self.requests.get(request_id) else { return };
        let tokens = stream_sync::tokens_after(&state.generated, &state.finished, from);
        if state.detokenizer.is_empty() || tokens.is_empty() {
            return;
        }
        let target = state.detokenizer.clone();
        self.count_resend();
        self.send_event(&target, DetokenizerEvent::Tokens { request_id: request_id.to_string(), tokens });
    }

    /// Opens a request's stream on `target` from where its published chunks got, with every
    /// token after them.
    fn reopen_stream(&mut self, request_id: &str, target: &str) {
        let Some(state) = self.requests.get_mut(request_id) else { return };
        state.detokenizer = target.to_string();
        let open = state.open_request(Some(stream_sync::resume_point(&state.generated, &state.acked)));
        let tokens = stream_sync::tokens_after(&state.generated, &state.finished, &state.acked.consumed);
        self.count_resend();
        self.send_event(target, DetokenizerEvent::Open(Box::new(open)));
        if !tokens.is_empty() {
            self.send_event(target, DetokenizerEvent::Tokens { request_id: request_id.to_string(), tokens });
        }
    }

    /// Requests done on their executor whose detokenizer has not acknowledged the end for
    /// [`stream_sync::RESEND_AFTER`]: their last events (or its ack) were lost, so their tokens
    /// go again (the detokenizer skips what it has, and acknowledges).
    fn resend_stalled_streams(&mut self, now: Instant) {
        let stalled: Vec<String> = self
            .requests
            .iter()
            .filter(|(_, s)| {
                s.executor.is_none()
                    && s.all_finished()
                    && !s.detokenizer.is_empty()
                    && !s.acked.closed.iter().all(|c| *c)
                    && now.duration_since(s.stream_progress) >= stream_sync::RESEND_AFTER
            })
            .map(|(id, _)| id.clone())
            .collect();
        for id in stalled {
            let Some(state) = self.requests.get_mut(&id) else { continue };
            state.stream_progress = now;
            let from = state.acked.consumed.clone();
            self.resend_tokens(&id, &from);
        }
    }

    /// Forgets a request once the executor is done with it and its last chunk is out.
    fn release_if_done(&mut self, request_id: &str) {
        let done = self
            .requests
            .get(request_id)
            .is_some_and(|s| s.executor.is_none() && s.all_finished() && s.acked.closed.iter().all(|c| *c));
        if done {
            self.requests.remove(request_id);
        }
    }

    /// Moves the streams of a lost detokenizer to another one, from where their published
    /// chunks had got.
    fn lose_detokenizer(&mut self, lost: &str) {
        let moved: Vec<String> =
            self.requests.iter().filter(|(_, s)| s.detokenizer == lost).map(|(id, _)| id.clone()).collect();
        for id in moved {
            if self.detokenizers.is_empty() {
                // Nobody can finish the stream: the client hears it from here.
                if let Some(state) = self.requests.get_mut(&id) {
                    state.detokenizer.clear();
                }
                self.fail(&id, "the detokenizer serving this request was lost and no other is running");
                continue;
            }
            let Some(target) = self.pick_detokenizer() else { continue };
            tracing::info!(request_id = %id, "scheduler: stream of {id} moves to detokenizer {target}");
            self.reopen_stream(&id, &target);
        }
    }

    fn on_executor_beat(&mut self, registration: ExecutorRegistration, ctx: &mut Context<Self>) {
        if registration.model != self.config.model {
            return;
        }
        if let Err(e) = limits::check_registration(&registration, self.config.max_executor_blocks) {
            refuse("scheduler", "executor_heartbeat", &e);
            return;
        }
        let now = Instant::now();
        match self.executors.get_mut(&registration.executor_id) {
            Some(slot) if slot.registration.incarnation == registration.incarnation => {
                slot.last_seen = now;
                self.resend_lost_step(&registration, ctx);
                return;
            }
            Some(_) => {
                // The same id, another life: the executor restarted and its KV cache is gone.
                tracing::warn!("scheduler: executor {} restarted", registration.executor_id);
                self.lose_executor(&registration.executor_id, ctx);
            }
            None => {}
        }
        let quarantine = 2 * self.config.heartbeat_timeout;
        let quarantined = self
            .lost
            .get(&registration.executor_id)
            .is_some_and(|(at, incarnation)| *incarnation == registration.incarnation && now - *at < quarantine);
        if quarantined {
            return;
        }
        let config = self.engine_config(&registration);
        if let Err(e) = crate::validate_config(&config) {
            refuse("scheduler", "executor_heartbeat", &format!("executor {}: {e}", registration.executor_id));
            return;
        }
        tracing::info!(
            "scheduler: executor {} registered ({} device / {} host blocks of {})",
            registration.executor_id,
            registration.num_device_blocks,
            registration.num_host_blocks,
            registration.block_size
        );
        self.add_executor(registration, now);
        self.admit(ctx);
    }

    /// Adds an executor with a fresh core (its configuration was validated).
    fn add_executor(&mut self, registration: ExecutorRegistration, now: Instant) {
        let slot = ExecutorSlot {
            core: Scheduler::new(self.engine_config(&registration), self.config.eos_token_ids.clone()),
            last_seen: now,
            generation: self.next_generation,
            in_flight: None,
            mirror: PlanMirror::new(),
            in_flight_requests: Vec::new(),
            in_flight_request: None,
            metrics: ExecutorMetrics::new(&self.config.model, &registration.executor_id),
            registration: registration.clone(),
        };
        self.next_generation += 1;
        self.executors.insert(registration.executor_id, slot);
    }

    fn on_detokenizer_beat(&mut self, beat: Heartbeat, ctx: &mut Context<Self>) {
        let new = self.detokenizers.insert(beat.id.clone(), Instant::now()).is_none();
        if new {
            tracing::info!("scheduler: detokenizer {} registered", beat.id);
            self.admit(ctx);
        }
    }

    fn tick(&mut self, ctx: &mut Context<Self>) {
        let now = Instant::now();
        let timeout = self.config.heartbeat_timeout;
        // Silence while this scheduler's own link to NATS was down does not count.
        let link = self.bus.link();
        if let Decision::Activate(term) = self.leadership.tick(&link, now) {
            self.take_over(term, ctx);
        }
        if !self.leadership.is_active() {
            self.detokenizers.retain(|_, seen| !link.is_silent(*seen, now, timeout));
            return;
        }
        let lost: Vec<String> = self
            .executors
            .iter()
            .filter(|(_, s)| link.is_silent(s.last_seen, now, timeout))
            .map(|(id, _)| id.clone())
            .collect();
        for id in lost {
            self.lose_executor(&id, ctx);
        }
        let quarantine = 2 * timeout;
        self.lost.retain(|_, (at, _)| now - *at < quarantine);
        self.resend_stalled_streams(now);
        let gone: Vec<String> = self
            .detokenizers
            .iter()
            .filter(|(_, seen)| link.is_silent(**seen, now, timeout))
            .map(|(id, _)| id.clone())
            .collect();
        for id in gone {
            tracing::warn!("scheduler: detokenizer {id} is gone; moving its streams");
            self.detokenizers.remove(&id);
            self.lose_detokenizer(&id);
        }
        // Requests wait for their turn as long as it takes, but for an executor (or a
        // detokenizer) to exist only up to the unplaced timeout.
        if self.executors.is_empty() || self.detokenizers.is_empty() {
            let limit = self.config.unplaced_timeout;
            let expired: Vec<String> =
                self.unplaced.iter().filter(|(_, since)| now - *since > limit).map(|(id, _)| id.clone()).collect();
            self.unplaced.retain(|(_, since)| now - *since <= limit);
            for id in expired {
                self.fail(&id, "no executor is available to serve this request");
            }
        }
        self.admit(ctx);
        for slot in self.executors.values_mut() {
            slot.metrics.sync(&slot.core);
        }
        self.metrics.population(self.executors.len(), self.detokenizers.len(), self.unplaced.len());
    }

    /// Starts serving under `term`: asks every known detokenizer for the streams it holds and
    /// runs their requests on from there (re-prefilled from prompt + tokens so far, like a
    /// request moved off a lost executor). Executors register on their next heartbeat.
    fn take_over(&mut self, term: u64, ctx: &mut Context<Self>) {
        tracing::info!("scheduler {}: serving (term {term})", self.id);
        self.serving_since = Some(Instant::now());
        self.announce();
        for detokenizer in self.detokenizers.keys().cloned().collect::<Vec<_>>() {
            let (bus, limits) = (self.bus.clone(), self.config.limits);
            ctx.spawn(
                async move {
                    let streams = collect_streams(&bus, &detokenizer, term, limits).await;
                    StreamsReported { detokenizer, streams }
                }
                .into_actor(self)
                .map(|reported, _, ctx| ctx.notify(reported)),
            );
        }
    }

    /// Adopts the streams a detokenizer reported after a takeover.
    fn on_streams_reported(&mut self, reported: StreamsReported, ctx: &mut Context<Self>) {
        let streams = match reported.streams {
            Ok(streams) => streams,
            Err(e) => {
                tracing::warn!("scheduler: detokenizer {} did not report its streams: {e}", reported.detokenizer);
                return;
            }
        };
        let mut adopted = 0;
        for stream in streams {
            // Checked as they were collected.
            let state = RequestState::from_stream(stream, &reported.detokenizer);
            let id = state.submit.request_id.clone();
            if self.requests.contains_key(&id) || state.acked.closed.iter().all(|c| *c) {
                continue;
            }
            let unfinished = !state.all_finished();
            self.requests.insert(id.clone(), state);
            adopted += 1;
            if unfinished && self.early_aborts.take(&id, Instant::now()) {
                // Aborted while no scheduler served.
                self.fail(&id, "aborted");
            } else if unfinished {
                self.queue(&id);
            }
        }
        self.migrated += adopted;
        tracing::info!("scheduler: adopted {adopted} streams from detokenizer {}", reported.detokenizer);
        self.admit(ctx);
    }

    /// Another scheduler serves now: forget every request (it owns them) and stand by.
    fn step_down(&mut self) {
        tracing::info!("scheduler {}: another scheduler serves; standing by", self.id);
        self.requests.clear();
        self.by_core.clear();
        self.unplaced = FairQueue::default();
        self.executors.clear();
    }

    fn on_scheduler_beat(&mut self, beat: SchedulerHeartbeat) {
        let rank = Rank { started_ms: beat.started_ms, id: beat.id };
        if self.leadership.observe(&rank, beat.active, beat.term, Instant::now()) == Decision::StepDown {
            self.step_down();
        }
    }

    /// Publishes this scheduler's heartbeat.
    fn announce(&mut self) {
        let beat = SchedulerHeartbeat {
            id: self.id.clone(),
            active: self.leadership.is_active(),
            term: self.leadership.term(),
            started_ms: self.started_ms,
        };
        self.publish(self.bus.subjects.scheduler_heartbeat(), beat);
    }

    fn stats(&self) -> serde_json::Value {
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
        json!({"model": self.config.model, "scheduler": self.id, "term": self.leadership.term(),
               "executors": executors, "detokenizers": self.detokenizers.len(),
               "requests": self.requests.len(), "unplaced": self.unplaced.len(), "migrated_requests": self.migrated,
               "stale_step_replies": self.stale_replies, "stream_resends": self.stream_resends, "steps_sent_in_parts": self.bus.split_requests()})
    }
}

impl Actor for SchedulerService {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        let s = &self.bus.subjects;
        let subscriptions = vec![
            Subscription::new(s.submit().subject(), Incoming::Submit),
            Subscription::new(s.scheduler_abort().subject(), Incoming::Abort),
            Subscription::new(s.abort().subject(), Incoming::PublicAbort),
            Subscription::new(s.executor_heartbeat().subject(), Incoming::ExecutorBeat),
            Subscription::new(s.detokenizer_heartbeat().subject(), Incoming::DetokenizerBeat),
            Subscription::new(s.detokenizer_ack().subject(), Incoming::DetokenizerAck),
            Subscription::new(s.stats().subject(), Incoming::Stats),
            Subscription::new(s.health().subject(), Incoming::Health),
            Subscription::new(s.scheduler_heartbeat().subject(), Incoming::SchedulerBeat),
        ];
        listen(self, ctx, self.bus.client.clone(), subscriptions, "scheduler");
        ctx.run_interval(Duration::from_millis(200), |act, ctx| act.tick(ctx));
        ctx.run_interval(HEARTBEAT_INTERVAL, |act, _| act.announce());
        pagemesh_bus::refusals::register(
            "scheduler",
            &[
                "submit",
                "abort",
                "executor_heartbeat",
                "detokenizer_heartbeat",
                "detokenizer_ack",
                "scheduler_heartbeat",
                "stream_report",
            ],
        );
    }
}

impl SchedulerService {
    /// What a standby does with a message: it watches the other schedulers and the
    /// detokenizers, and remembers aborts (a request it adopts later may have been aborted
    /// meanwhile); it answers nothing.
    fn stand_by(&mut self, item: Incoming) {
        match item {
            Incoming::SchedulerBeat(msg) => self.on_scheduler_beat_message(&msg),
            Incoming::DetokenizerBeat(msg) => {
                if let Ok(beat) = self.bus.subjects.detokenizer_heartbeat().decode(&msg.payload) {
                    if limits::check_instance_id(&beat.id).is_ok() {
                        self.detokenizers.insert(beat.id, Instant::now());
                    }
                }
            }
            Incoming::Abort(msg) | Incoming::PublicAbort(msg) => {
                if let Ok(abort) = decode_abort(&msg, &self.bus.subjects) {
                    if limits::check_request_id(&abort.request_id).is_ok() {
                        let owner = abort_authority(&msg, &self.bus.subjects).flatten();
                        self.early_aborts.remember(&abort_key(owner.as_deref(), &abort.request_id), Instant::now());
                    }
                }
            }
            _ => {}
        }
    }

    fn on_scheduler_beat_message(&mut self, msg: &async_nats::Message) {
        let beat = self
            .bus
            .subjects
            .scheduler_heartbeat()
            .decode(&msg.payload)
            .map_err(|e| e.to_string())
            .and_then(|beat| limits::check_instance_id(&beat.id).map(|()| beat));
        match beat {
            Ok(beat) => self.on_scheduler_beat(beat),
            Err(e) => refuse("scheduler", "scheduler_heartbeat", &e),
        }
    }
}

impl Handler<StreamsReported> for SchedulerService {
    type Result = ();

    fn handle(&mut self, msg: StreamsReported, ctx: &mut Self::Context) {
        if self.leadership.is_active() {
            self.on_streams_reported(msg, ctx);
        }
    }
}

impl Handler<StepDone> for SchedulerService {
    type Result = ();

    fn handle(&mut self, msg: StepDone, ctx: &mut Self::Context) {
        self.on_step_done(msg, ctx);
    }
}

impl StreamHandler<Incoming> for SchedulerService {
    fn handle(&mut self, item: Incoming, ctx: &mut Self::Context) {
        if !self.leadership.is_active() {
            self.stand_by(item);
            return;
        }
        match item {
            Incoming::Submit(msg) => match self.bus.subjects.submit().requests().decode(&msg.payload) {
                Ok(submit) => self.on_submit_message(submit, msg.reply.map(|r| r.to_string()), ctx),
                Err(e) => refuse("scheduler", "submit", &e.to_string()),
            },
            Incoming::Abort(msg) | Incoming::PublicAbort(msg) => {
                let abort = decode_abort(&msg, &self.bus.subjects)
                    .map_err(|e| e.to_string())
                    .and_then(|abort| limits::check_request_id(&abort.request_id).map(|()| abort));
                match abort {
                    Ok(abort) => self.on_abort(&abort.request_id, abort_authority(&msg, &self.bus.subjects), ctx),
                    Err(e) => {
                        refuse("scheduler", "abort", &e);
                        let reply = msg.reply.filter(|r| limits::check_reply_subject(r).is_ok());
                        if let Some(reply) = reply {
                            let error = ErrorReply::new(None, ErrorKind::InvalidRequest, e);
                            self.publish(Topic::json(reply.to_string()), error);
                        }
                    }
                }
            }
            Incoming::ExecutorBeat(msg) => match self.bus.subjects.executor_heartbeat().decode(&msg.payload) {
                Ok(registration) => self.on_executor_beat(registration, ctx),
                Err(e) => refuse("scheduler", "executor_heartbeat", &e.to_string()),
            },
            Incoming::DetokenizerBeat(msg) => {
                let beat = self
                    .bus
                    .subjects
                    .detokenizer_heartbeat()
                    .decode(&msg.payload)
                    .map_err(|e| e.to_string())
                    .and_then(|beat| limits::check_instance_id(&beat.id).map(|()| beat));
                match beat {
                    Ok(beat) => self.on_detokenizer_beat(beat, ctx),
                    Err(e) => refuse("scheduler", "detokenizer_heartbeat", &e),
                }
            }
            Incoming::DetokenizerAck(msg) => {
                let ack = self
                    .bus
                    .subjects
                    .detokenizer_ack()
                    .decode(&msg.payload)
                    .map_err(|e| e.to_string())
                    .and_then(|ack| limits::check_ack(&ack).map(|()| ack));
                match ack {
                    Ok(ack) => self.on_ack(ack),
                    Err(e) => refuse("scheduler", "detokenizer_ack", &e),
                }
            }
            Incoming::Stats(msg) => {
                if let Some(reply) = msg.reply {
                    let stats = self.stats();
                    self.respond(self.bus.subjects.stats(), reply.to_string(), stats);
                }
            }
            Incoming::SchedulerBeat(msg) => self.on_scheduler_beat_message(&msg),
            Incoming::Health(msg) => {
                if let Some(reply) = msg.reply {
                    let ready = !self.executors.is_empty() && !self.detokenizers.is_empty();
                    let health = json!({"live": true, "ready": ready, "executors": self.executors.len(),
                                        "detokenizers": self.detokenizers.len(), "scheduler": self.id});
                    self.respond(self.bus.subjects.health(), reply.to_string(), health);
                }
            }
        }
    }
}
