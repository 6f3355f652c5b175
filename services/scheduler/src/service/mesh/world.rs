//! A simulated mesh around one [`MeshScheduler`], for its tests: executors that decode every
//! step against their own mirror and run it on a [`ShadowExecutor`] (which refuses any plan
//! that would read stale K/V), detokenizers that apply events as the real one does (skipping
//! what they have, resuming from a moved stream's acknowledged point) and acknowledge them,
//! and clients that see what the detokenizers publish. Time is simulated; nothing is lost on
//! the way unless a test says so.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::{Duration, Instant};

use pagemesh_shared::limits::ModelLimits;
use pagemesh_shared::link::LinkState;
use pagemesh_shared::protocol::{
    DetokenizerAck, DetokenizerEvent, DetokenizerMessage, ErrorReply, ExecutorRegistration, Heartbeat, StepReply,
    StepRequest, StepResponse, StreamAsk, SubmitRequest, TextOptions, INTERNAL_PROTOCOL_VERSION,
};
use pagemesh_shared::sessions::{SessionCheck, SessionHistory};
use pagemesh_shared::step_delta::PlanMirror;
use pagemesh_shared::{EngineConfig, FinishReason, PreemptionMode, SamplingParams};

use super::{Effect, Event, Identity, MeshScheduler, SchedulerConfig, StepDone};
use crate::testing::{fake_token, ShadowExecutor};

/// The model's name in the simulated mesh.
pub(super) const MODEL: &str = "sim-model";
/// Its vocabulary.
pub(super) const VOCAB: u32 = 50;
/// Its end-of-sequence token.
pub(super) const EOS: u32 = 7;
/// Silence after which a peer is gone.
pub(super) const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(2);

/// The scheduler's configuration in the simulated mesh.
pub(super) fn config() -> SchedulerConfig {
    SchedulerConfig {
        model: MODEL.into(),
        eos_token_ids: vec![EOS],
        engine: EngineConfig {
            block_size: 4,
            max_num_seqs: 4,
            max_num_batched_tokens: 32,
            preemption_mode: PreemptionMode::Swap,
            enable_prefix_caching: true,
            max_waiting_requests: 64,
            max_model_len: 64,
            ..EngineConfig::default()
        },
        heartbeat_timeout: HEARTBEAT_TIMEOUT,
        step_timeout: Duration::from_secs(5),
        unplaced_timeout: Duration::from_secs(6),
        limits: ModelLimits { vocab_size: VOCAB as usize, max_model_len: 64 },
        max_executor_blocks: 1 << 20,
        admission_window: 4,
    }
}

/// A request as a client submits it.
pub(super) fn submit(id: &str, prompt: Vec<u32>, n: usize, max_tokens: usize, seed: u64) -> SubmitRequest {
    let params = SamplingParams { n, max_tokens, temperature: 1.0, seed: Some(seed), ..SamplingParams::default() };
    SubmitRequest {
        request_id: id.into(),
        reply_to: format!("_INBOX.{id}"),
        prompt_token_ids: prompt,
        params,
        seed,
        stop: Vec::new(),
        stream: true,
        text: TextOptions::default(),
        owner: None,
        user: None,
        max_tokens_is_default: false,
    }
}

/// The tokens a sample of a request with `seed` must end with (the fake model's, up to EOS
/// or `max_tokens`), whichever executors ran it.
pub(super) fn expected_tokens(seed: u64, sample: u32, max_tokens: usize) -> Vec<u32> {
    let mut out = Vec::new();
    while out.len() < max_tokens {
        let t = fake_token(seed, sample, out.len(), &[], VOCAB);
        out.push(t);
        if t == EOS {
            break;
        }
    }
    out
}

/// One executor process.
pub(super) struct FakeExecutor {
    pub(super) incarnation: u64,
    /// Heartbeats and answers; a dead one does neither.
    pub(super) alive: bool,
    device_blocks: usize,
    host_blocks: usize,
    /// The session it serves: what it was told, and its KV cache.
    session: Option<(u64, PlanMirror, ShadowExecutor)>,
    taken: Option<(u64, u64)>,
    /// The session served now, and those left.
    sessions: SessionHistory,
    /// The last answer, given again to the same step sent again.
    last_answer: Option<(u64, StepResponse)>,
}

impl FakeExecutor {
    fn registration(&self, id: &str) -> ExecutorRegistration {
        ExecutorRegistration {
            executor_id: id.into(),
            model: MODEL.into(),
            block_size: 4,
            num_device_blocks: self.device_blocks,
            num_host_blocks: self.host_blocks,
            incarnation: self.incarnation,
            protocol_version: INTERNAL_PROTOCOL_VERSION,
            step_taken: self.taken,
            step_answered: self.last_answer.as_ref().map(|(session, r)| (*session, r.step)),
        }
    }

    /// Runs a step as the real executor does; `None` when it does not answer (a repeat of a
    /// step older than the last it took).
    fn run(&mut self, request: &StepRequest) -> Option<StepResponse> {
        let answer = |reply| Some(StepResponse { incarnation: self.incarnation, step: request.step, reply });
        if request.incarnation != self.incarnation {
            return answer(StepReply::Failed("a step for another incarnation".into()));
        }
        if self.sessions.check(request.session) == SessionCheck::Left {
            return answer(StepReply::Failed("a step of a session this executor has left".into()));
        }
        if let Some((session, last)) = &self.last_answer {
            if (*session, last.step) == (request.session, request.step) {
                return Some(last.clone());
            }
        }
        if self.taken.is_some_and(|(session, step)| session == request.session && step >= request.step) {
            return None;
        }
        if self.sessions.check(request.session) == SessionCheck::New {
            self.sessions.enter(request.session);
            let engine = EngineConfig {
                block_size: 4,
                num_device_blocks: self.device_blocks,
                num_host_blocks: self.host_blocks,
                ..EngineConfig::default()
            };
            self.session = Some((request.session, PlanMirror::new(), ShadowExecutor::new(&engine, VOCAB)));
        }
        self.taken = Some((request.session, request.step));
        let (_, mirror, shadow) = self.session.as_mut()?;
        let reply = match mirror.decode(request.plan.clone(), 65_536) {
            Ok(plan) => StepReply::Done(shadow.execute(&plan).unwrap_or_else(|e| panic!("an invalid plan: {e}"))),
            Err(e) => StepReply::Refused { message: e.message, seq_ids: e.seq_ids },
        };
        let response = StepResponse { incarnation: self.incarnation, step: request.step, reply };
        self.last_answer = Some((request.session, response.clone()));
        Some(response)
    }
}

/// One detokenizer's stream of a request.
struct Stream {
    tokens: Vec<Vec<u32>>,
    closed: Vec<bool>,
    next_index: u64,
}

/// One detokenizer process: its open streams, and the last acks of those it closed (given
/// again when their tokens come again).
#[derive(Default)]
struct FakeDetokenizer {
    streams: HashMap<String, Stream>,
    closed: HashMap<String, DetokenizerAck>,
}

/// What a client saw of its request.
#[derive(Debug, Default)]
pub(super) struct ClientView {
    /// Per sample, the tokens published, in order.
    pub(super) tokens: Vec<Vec<u32>>,
    /// Per sample, every end published.
    pub(super) finishes: Vec<Vec<FinishReason>>,
    /// Errors ending the stream, and errors to the inbox (no stream).
    pub(super) errors: usize,
}

/// A step sent and not answered yet.
#[derive(Debug, Clone)]
pub(super) struct PendingStep {
    pub(super) executor: String,
    pub(super) generation: u64,
    pub(super) request: StepRequest,
}

/// The simulated mesh.
pub(super) struct World {
    pub(super) now: Instant,
    pub(super) sched: MeshScheduler,
    pub(super) executors: BTreeMap<String, FakeExecutor>,
    /// Live detokenizers.
    detokenizers: BTreeMap<String, FakeDetokenizer>,
    pub(super) pending: Vec<PendingStep>,
    /// Answers held back (a slow executor): delivered late, after their step timed out.
    pub(super) held: Vec<StepDone>,
    pub(super) clients: HashMap<String, ClientView>,
    pub(super) submitted: Vec<SubmitRequest>,
    /// Messages the scheduler refused.
    pub(super) refusals: Vec<String>,
    /// Events for the scheduler (acks), handled in order.
    queue: VecDeque<Event>,
    next_incarnation: u64,
    start: Instant,
}

impl World {
    /// A mesh whose scheduler already serves (it heard no other scheduler for a while).
    pub(super) fn new() -> Self {
        let start = Instant::now();
        let identity = Identity { id: "sched-a".into(), started_ms: 1, first_session: 1000 };
        let mut world = Self {
            now: start,
            sched: MeshScheduler::new(identity, config(), start),
            executors: BTreeMap::new(),
            detokenizers: BTreeMap::new(),
            pending: Vec::new(),
            held: Vec::new(),
            clients: HashMap::new(),
            submitted: Vec::new(),
            refusals: Vec::new(),
            queue: VecDeque::new(),
            next_incarnation: 1,
            start,
        };
        world.advance(HEARTBEAT_TIMEOUT + Duration::from_millis(100));
        assert!(world.sched.is_active());
        world
    }

    /// Hands an event to the scheduler and plays out everything that follows.
    pub(super) fn send(&mut self, event: Event) {
        self.queue.push_back(event);
        while let Some(event) = self.queue.pop_front() {
            for effect in self.sched.handle(self.now, event) {
                self.carry_out(effect);
            }
        }
    }

    fn carry_out(&mut self, effect: Effect) {
        match effect {
            Effect::Events { detokenizer, message } => self.deliver_events(&detokenizer, message),
            Effect::Error { error, .. } => self.client_error(&error),
            Effect::SubmitAck { .. } | Effect::Heartbeat(_) => {}
            Effect::Step { executor, generation, request } => {
                self.pending.push(PendingStep { executor, generation, request })
            }
            Effect::AskStreams { detokenizer, .. } => {
                self.queue.push_back(Event::StreamsReported { detokenizer, streams: Ok(Vec::new()) })
            }
            Effect::Refused { message, reason } => self.refusals.push(format!("{message}: {reason}")),
        }
    }

    fn client_error(&mut self, error: &ErrorReply) {
        let id = error.request_id.clone().unwrap_or_default();
        self.clients.entry(id).or_default().errors += 1;
    }

    /// A detokenizer applies events as the real one does, publishes to the clients, and
    /// acknowledges each stream it touched.
    fn deliver_events(&mut self, detokenizer: &str, message: DetokenizerMessage) {
        let Some(FakeDetokenizer { streams, closed }) = self.detokenizers.get_mut(detokenizer) else { return };
        let mut touched: Vec<String> = Vec::new();
        for event in message.events {
            match event {
                DetokenizerEvent::Open(open) => {
                    let stream = match &open.resume {
                        Some(resume) => Stream {
                            tokens: resume.consumed.clone(),
                            closed: resume.closed.clone(),
                            next_index: resume.next_index,
                        },
                        None => Stream { tokens: vec![Vec::new(); open.n], closed: vec![false; open.n], next_index: 0 },
                    };
                    let view = self.clients.entry(open.request_id.clone()).or_default();
                    view.tokens.resize(open.n, Vec::new());
                    view.finishes.resize(open.n, Vec::new());
                    streams.insert(open.request_id.clone(), stream);
                }
                DetokenizerEvent::Tokens { request_id, tokens } => {
                    let Some(stream) = streams.get_mut(&request_id) else {
                        self.queue.push_back(Event::Ack(missing_stream(closed, detokenizer, &request_id)));
                        continue;
                    };
                    let view = self.clients.entry(request_id.clone()).or_default();
                    for t in tokens {
                        let s = t.sample_index as usize;
                        let had = stream.tokens[s].len();
                        let position = t.position as usize;
                        assert!(position <= had, "{request_id}: a gap in sample {s}: token {position} after {had}");
                        if stream.closed[s] || position < had {
                            continue;
                        }
                        if let Some(token) = t.token {
                            stream.tokens[s].push(token.token);
                            assert_eq!(view.tokens[s].len(), position, "{request_id}: the client has another count");
                            view.tokens[s].push(token.token);
                        }
                        if let Some(finish) = t.finish {
                            stream.closed[s] = true;
                            view.finishes[s].push(finish);
                        }
                    }
                    touched.push(request_id);
                }
                DetokenizerEvent::Finish { request_id, .. } => {
                    let Some(mut stream) = streams.remove(&request_id) else {
                        self.queue.push_back(Event::Ack(missing_stream(closed, detokenizer, &request_id)));
                        continue;
                    };
                    self.clients.entry(request_id.clone()).or_default().errors += 1;
                    stream.closed.iter_mut().for_each(|c| *c = true);
                    stream.next_index += 1;
                    let ack = ack_of(&request_id, &stream);
                    closed.insert(request_id, ack.clone());
                    self.queue.push_back(Event::Ack(ack));
                }
            }
        }
        for request_id in touched {
            let Some(stream) = streams.get_mut(&request_id) else { continue };
            stream.next_index += 1;
            let ack = ack_of(&request_id, stream);
            if stream.closed.iter().all(|c| *c) {
                streams.remove(&request_id);
                closed.insert(request_id, ack.clone());
            }
            self.queue.push_back(Event::Ack(ack));
        }
    }

    /// Time passes: every live executor and detokenizer heartbeats, then the clock ticks.
    pub(super) fn advance(&mut self, by: Duration) {
        self.now += by;
        let beats: Vec<ExecutorRegistration> =
            self.executors.iter().filter(|(_, e)| e.alive).map(|(id, e)| e.registration(id)).collect();
        for registration in beats {
            self.send(Event::ExecutorBeat(registration));
        }
        for id in self.detokenizers.keys().cloned().collect::<Vec<_>>() {
            self.send(Event::DetokenizerBeat(Heartbeat { id }));
        }
        self.send(Event::Tick(LinkState { connected: true, since: self.start }));
    }

    /// Starts an executor (or restarts one: a new incarnation, its KV cache gone).
    pub(super) fn start_executor(&mut self, id: &str, device_blocks: usize) {
        let incarnation = self.next_incarnation;
        self.next_incarnation += 1;
        let executor = FakeExecutor {
            incarnation,
            alive: true,
            device_blocks,
            host_blocks: 8,
            session: None,
            taken: None,
            sessions: SessionHistory::default(),
            last_answer: None,
        };
        let registration = executor.registration(id);
        self.executors.insert(id.to_string(), executor);
        self.send(Event::ExecutorBeat(registration));
    }

    /// Starts a detokenizer.
    pub(super) fn start_detokenizer(&mut self, id: &str) {
        self.detokenizers.entry(id.to_string()).or_default();
        self.send(Event::DetokenizerBeat(Heartbeat { id: id.to_string() }));
    }

    /// Kills a detokenizer: its streams are gone with it.
    pub(super) fn kill_detokenizer(&mut self, id: &str) {
        self.detokenizers.remove(id);
    }

    /// Whether a detokenizer is running.
    pub(super) fn has_detokenizer(&self) -> bool {
        !self.detokenizers.is_empty()
    }

    /// A client submits a request.
    pub(super) fn submit(&mut self, request: SubmitRequest) {
        self.submitted.push(request.clone());
        let ack_to = Some(format!("{}.ack", request.reply_to));
        self.send(Event::Submit { submit: Box::new(request), ack_to });
    }

    /// The executor takes pending step `i` and answers it (a dead one never answers: the
    /// step times out).
    pub(super) fn answer(&mut self, i: usize) {
        let step = self.pending.remove(i);
        let response = match self.executors.get_mut(&step.executor) {
            Some(executor) if executor.alive => executor.run(&step.request),
            _ => None,
        };
        let result = response.ok_or_else(|| "no answer in time".to_string());
        self.send(Event::StepDone(done(&step, result)));
    }

    /// The executor runs pending step `i` but its answer comes after the deadline: the
    /// scheduler hears the timeout now and the answer later ([`deliver_held`](Self::deliver_held)).
    pub(super) fn answer_late(&mut self, i: usize) {
        let step = self.pending.remove(i);
        if let Some(response) =
            self.executors.get_mut(&step.executor).filter(|e| e.alive).and_then(|e| e.run(&step.request))
        {
            self.held.push(done(&step, Ok(response)));
        }
        self.send(Event::StepDone(done(&step, Err("no answer in time".into()))));
    }

    /// The executor fails pending step `i` without running it.
    pub(super) fn fail(&mut self, i: usize) {
        let step = self.pending.remove(i);
        let Some(executor) = self.executors.get(&step.executor).filter(|e| e.alive) else { return };
        let reply = StepReply::Failed("the device failed".into());
        let response = StepResponse { incarnation: executor.incarnation, step: step.request.step, reply };
        self.send(Event::StepDone(done(&step, Ok(response))));
    }

    /// An answer held back arrives.
    pub(super) fn deliver_held(&mut self, i: usize) {
        let done = self.held.remove(i);
        self.send(Event::StepDone(done));
    }

    /// Runs the mesh until nothing is left to do (at most `rounds` rounds of answering every
    /// pending step and letting time pass).
    pub(super) fn settle(&mut self, rounds: usize) {
        for _ in 0..rounds {
            while !self.pending.is_empty() {
                self.answer(0);
            }
            if self.sched.requests.is_empty() && self.pending.is_empty() {
                return;
            }
            self.advance(Duration::from_millis(300));
        }
    }

    /// Every block of every executor's core is free, and no request is held.
    pub(super) fn assert_all_free(&self) {
        assert!(
            self.sched.requests.is_empty(),
            "requests still held: {:?}",
            self.sched.requests.keys().collect::<Vec<_>>()
        );
        assert!(self.sched.unplaced.is_empty(), "requests still queued");
        assert!(self.sched.by_core.is_empty(), "core ids still mapped");
        for (id, slot) in &self.sched.executors {
            let usage = slot.core.block_usage();
            assert_eq!(usage.device_free, usage.device_total, "executor {id}: device blocks held");
            assert_eq!(usage.host_free, usage.host_total, "executor {id}: host blocks held");
            assert!(!slot.core.has_unfinished_requests(), "executor {id}: requests left in its core");
        }
    }

    /// Every submitted request ended exactly once for its client: each sample finished once
    /// with the fake model's tokens, or the request ended with one error.
    pub(super) fn assert_every_request_ended_once(&self) {
        for request in &self.submitted {
            let id = &request.request_id;
            let view = self.clients.get(id).unwrap_or_else(|| panic!("{id}: the client heard nothing"));
            for (s, tokens) in view.tokens.iter().enumerate() {
                let expected = expected_tokens(request.seed, s as u32, request.params.max_tokens);
                assert!(expected.starts_with(tokens), "{id}: sample {s}'s tokens {tokens:?}, not from {expected:?}");
            }
            if view.errors > 0 {
                assert_eq!(view.errors, 1, "{id}: ended with {} errors", view.errors);
                assert!(view.finishes.iter().all(|f| f.len() <= 1), "{id}: a sample ended twice");
                continue;
            }
            assert_eq!(view.finishes.len(), request.params.n, "{id}: samples");
            for (s, finishes) in view.finishes.iter().enumerate() {
                assert_eq!(finishes.len(), 1, "{id}: sample {s} ended {} times", finishes.len());
                if finishes[0] != FinishReason::Abort {
                    let expected = expected_tokens(request.seed, s as u32, request.params.max_tokens);
                    assert_eq!(view.tokens[s], expected, "{id}: sample {s}'s tokens");
                }
            }
        }
    }
}

fn done(step: &PendingStep, result: Result<StepResponse, String>) -> StepDone {
    StepDone { executor: step.executor.clone(), generation: step.generation, step: step.request.step, result }
}

/// A detokenizer's answer to events of a stream it does not hold: its final ack again if it
/// closed there, else an ask for the whole stream (the detokenizer restarted).
fn missing_stream(closed: &HashMap<String, DetokenizerAck>, detokenizer: &str, request_id: &str) -> DetokenizerAck {
    closed.get(request_id).cloned().unwrap_or_else(|| DetokenizerAck {
        request_id: request_id.to_string(),
        next_index: 0,
        consumed: Vec::new(),
        closed: Vec::new(),
        ask: Some(StreamAsk { detokenizer: detokenizer.to_string(), received: None }),
    })
}

fn ack_of(request_id: &str, stream: &Stream) -> DetokenizerAck {
    DetokenizerAck {
        request_id: request_id.to_string(),
        next_index: stream.next_index,
        consumed: stream.tokens.iter().map(Vec::len).collect(),
        closed: stream.closed.clone(),
        ask: None,
    }
}
