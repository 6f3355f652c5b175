//! The scheduler service's actor: a thin adapter between NATS and the pure
//! [`MeshScheduler`]. It subscribes to the scheduler's subjects, decodes and checks each
//! message into an [`Event`], hands it to the core with the time, and carries out the
//! [`Effect`]s it returns (publishing in order, sending steps and stream reports as
//! requests whose answers come back as events).

use std::time::{Duration, Instant};

use actix::prelude::*;
use pagemesh_shared::limits::{self, ModelLimits};
use pagemesh_shared::protocol::{ErrorKind, ErrorReply, StepRequest, StreamReport, StreamReportRequest, StreamState};
use pagemesh_shared::wire::Topic;

use super::mesh::{Effect, Event, Identity, MeshScheduler, SchedulerConfig, StepDone};
use pagemesh_bus::bus::{Bus, BusError, OrderedPublisher};
use pagemesh_bus::listen::{listen, Subscription};
use pagemesh_bus::refusals::refuse;

/// How often a scheduler announces itself.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_millis(500);

/// How often the scheduler's clock ticks (silence, stalled streams, expired waits).
const TICK_INTERVAL: Duration = Duration::from_millis(200);

/// The scheduler service.
pub struct SchedulerService {
    bus: Bus,
    /// Every message but step requests goes out through it, in order.
    outbox: Option<OrderedPublisher>,
    step_timeout: Duration,
    limits: ModelLimits,
    core: MeshScheduler,
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

/// An event that comes back to the actor: a step's answer, or a detokenizer's streams.
#[derive(Message)]
#[rtype(result = "()")]
struct Returned(Event);

/// A random first executor-slot generation (see [`Identity::first_session`]).
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

impl SchedulerService {
    /// A scheduler service.
    pub fn new(bus: Bus, config: SchedulerConfig) -> Self {
        let started_ms =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
        let identity = Identity { id: pagemesh_bus::bus::new_id(), started_ms, first_session: first_session() };
        Self {
            bus,
            outbox: None,
            step_timeout: config.step_timeout,
            limits: config.limits,
            core: MeshScheduler::new(identity, config, Instant::now()),
        }
    }

    fn outbox(&mut self) -> &OrderedPublisher {
        let bus = &self.bus;
        self.outbox.get_or_insert_with(|| OrderedPublisher::start(bus))
    }

    /// Hands an event to the core and carries out what it asks for.
    fn handle_event(&mut self, event: Event, ctx: &mut Context<Self>) {
        for effect in self.core.handle(Instant::now(), event) {
            self.carry_out(effect, ctx);
        }
    }

    fn carry_out(&mut self, effect: Effect, ctx: &mut Context<Self>) {
        match effect {
            Effect::Events { detokenizer, message } => {
                let topic = self.bus.subjects.detokenizer_events(&detokenizer);
                self.outbox().publish(&topic, &message);
            }
            Effect::Error { reply_to, error } => {
                let about = error.request_id.clone().unwrap_or_default();
                self.outbox().publish_about(&Topic::json(reply_to), &error, &about);
            }
            Effect::SubmitAck { reply_to, ack } => {
                let endpoint = self.bus.subjects.submit();
                self.outbox().respond(&endpoint, reply_to, &ack);
            }
            Effect::Heartbeat(beat) => {
                let topic = self.bus.subjects.scheduler_heartbeat();
                self.outbox().publish(&topic, &beat);
            }
            Effect::Refused { message, reason } => refuse("scheduler", message, &reason),
            Effect::Step { executor, generation, request } => self.send_step(executor, generation, request, ctx),
            Effect::AskStreams { detokenizer, term } => {
                let (bus, limits) = (self.bus.clone(), self.limits);
                ctx.spawn(
                    async move {
                        let streams =
                            collect_streams(&bus, &detokenizer, term, limits).await.map_err(|e| e.to_string());
                        Returned(Event::StreamsReported { detokenizer, streams })
                    }
                    .into_actor(self)
                    .map(|returned, _, ctx| ctx.notify(returned)),
                );
            }
        }
    }

    /// Sends a step to an executor; its answer (or the deadline) comes back as
    /// [`Event::StepDone`].
    fn send_step(&mut self, executor: String, generation: u64, request: StepRequest, ctx: &mut Context<Self>) {
        let bus = self.bus.clone();
        let endpoint = bus.subjects.executor_step(&executor);
        let timeout = self.step_timeout;
        let step = request.step;
        ctx.spawn(
            async move {
                let result = bus.request(&endpoint, &request, timeout).await.map_err(|e| e.to_string());
                Returned(Event::StepDone(StepDone { executor, generation, step, result }))
            }
            .into_actor(self)
            .map(|returned, _, ctx| ctx.notify(returned)),
        );
    }

    /// Turns a message from NATS into an event for the core, checking it against the
    /// protocol's limits; a message that fails is refused (and, for an abort with a reply
    /// subject while serving, answered with the reason).
    fn decode(&mut self, item: Incoming) -> Option<Event> {
        let s = self.bus.subjects.clone();
        let decoded: Result<Event, (&'static str, String)> = match item {
            Incoming::Submit(msg) => s
                .submit()
                .requests()
                .decode(&msg.payload)
                .map(|submit| Event::Submit {
                    submit: Box::new(submit),
                    ack_to: msg.reply.map(|r| r.to_string()).filter(|r| limits::check_reply_subject(r).is_ok()),
                })
                .map_err(|e| ("submit", e.to_string())),
            Incoming::Abort(msg) | Incoming::PublicAbort(msg) => {
                let public = msg.subject.as_str() == s.abort().subject();
                let abort = match public {
                    true => s.abort().decode(&msg.payload),
                    false => s.scheduler_abort().decode(&msg.payload),
                };
                let abort = abort
                    .map_err(|e| e.to_string())
                    .and_then(|abort| limits::check_request_id(&abort.request_id).map(|()| abort));
                match abort {
                    Ok(abort) => {
                        let from = public.then(|| pagemesh_bus::bus::requester_account(&msg));
                        Ok(Event::Abort { request_id: abort.request_id, from })
                    }
                    Err(e) => {
                        let reply = msg.reply.filter(|r| limits::check_reply_subject(r).is_ok());
                        if let (Some(reply), true) = (reply, self.core.is_active()) {
                            let error = ErrorReply::new(None, ErrorKind::InvalidRequest, e.clone());
                            self.outbox().publish(&Topic::json(reply.to_string()), &error);
                        }
                        Err(("abort", e))
                    }
                }
            }
            Incoming::ExecutorBeat(msg) => s
                .executor_heartbeat()
                .decode(&msg.payload)
                .map(Event::ExecutorBeat)
                .map_err(|e| ("executor_heartbeat", e.to_string())),
            Incoming::DetokenizerBeat(msg) => s
                .detokenizer_heartbeat()
                .decode(&msg.payload)
                .map_err(|e| e.to_string())
                .and_then(|beat| limits::check_instance_id(&beat.id).map(|()| Event::DetokenizerBeat(beat)))
                .map_err(|e| ("detokenizer_heartbeat", e)),
            Incoming::DetokenizerAck(msg) => s
                .detokenizer_ack()
                .decode(&msg.payload)
                .map_err(|e| e.to_string())
                .and_then(|ack| limits::check_ack(&ack).map(|()| Event::Ack(ack)))
                .map_err(|e| ("detokenizer_ack", e)),
            Incoming::SchedulerBeat(msg) => s
                .scheduler_heartbeat()
                .decode(&msg.payload)
                .map_err(|e| e.to_string())
                .and_then(|beat| limits::check_instance_id(&beat.id).map(|()| Event::SchedulerBeat(beat)))
                .map_err(|e| ("scheduler_heartbeat", e)),
            Incoming::Stats(msg) => {
                if let (Some(reply), true) = (msg.reply, self.core.is_active()) {
                    let mut stats = self.core.stats();
                    stats["steps_sent_in_parts"] = self.bus.split_requests().into();
                    self.outbox().respond(&s.stats(), reply.to_string(), &stats);
                }
                return None;
            }
            Incoming::Health(msg) => {
                if let (Some(reply), true) = (msg.reply, self.core.is_active()) {
                    let health = self.core.health();
                    self.outbox().respond(&s.health(), reply.to_string(), &health);
                }
                return None;
            }
        };
        decoded.map_err(|(message, reason)| refuse("scheduler", message, &reason)).ok()
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
        ctx.run_interval(TICK_INTERVAL, |act, ctx| {
            let link = act.bus.link();
            act.handle_event(Event::Tick(link), ctx);
        });
        ctx.run_interval(HEARTBEAT_INTERVAL, |act, ctx| act.handle_event(Event::Announce, ctx));
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

impl Handler<Returned> for SchedulerService {
    type Result = ();

    fn handle(&mut self, msg: Returned, ctx: &mut Self::Context) {
        self.handle_event(msg.0, ctx);
    }
}

impl StreamHandler<Incoming> for SchedulerService {
    fn handle(&mut self, item: Incoming, ctx: &mut Self::Context) {
        let Some(event) = self.decode(item) else { return };
        // A submit or an abort is handled in the span of its request.
        let request_id = match &event {
            Event::Submit { submit, .. } => Some(submit.request_id.as_str()),
            Event::Abort { request_id, .. } => Some(request_id.as_str()),
            _ => None,
        };
        let span = request_id
            .filter(|id| limits::check_request_id(id).is_ok())
            .map_or_else(tracing::Span::none, |id| pagemesh_bus::request_span!(id));
        let _entered = span.enter();
        self.handle_event(event, ctx);
    }
}
