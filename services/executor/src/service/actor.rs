//! The executor service: loads the model, announces itself (registration doubles as the
//! heartbeat), and runs exactly the steps the scheduler sends on its step subject.
//!
//! The forward pass is blocking work: it runs on a [`StepWorker`] in a `SyncArbiter` thread,
//! so the NATS-facing actor keeps heartbeating while a step runs.

use std::time::{Duration, Instant};

use crate::backends::StepBackend;
use actix::prelude::*;
use pagemesh_shared::metrics::{self as names, labels};
use pagemesh_shared::protocol::{ExecutorRegistration, StepReply, StepRequest, StepResponse};
use pagemesh_shared::StepPlan;

use pagemesh_bus::bus::Bus;
use pagemesh_bus::listen::{listen, Subscription};
use pagemesh_bus::parts::{Assembled, Assembler};
use pagemesh_shared::limits;
use pagemesh_shared::sessions::{SessionCheck, SessionHistory};
use pagemesh_shared::step_delta::PlanMirror;

/// How often an executor announces itself.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_millis(500);

/// Runs steps on the model, one at a time, off the event loop.
pub struct StepWorker {
    executor: Box<dyn StepBackend>,
    duration: metrics::Histogram,
    failures: metrics::Counter,
}

impl Actor for StepWorker {
    type Context = SyncContext<Self>;
}

/// Run one step.
#[derive(Message)]
#[rtype(result = "StepReply")]
pub struct RunStep(pub StepPlan);

impl Handler<RunStep> for StepWorker {
    type Result = MessageResult<RunStep>;

    fn handle(&mut self, msg: RunStep, _: &mut Self::Context) -> Self::Result {
        let started = Instant::now();
        let reply = match self.executor.execute(&msg.0) {
            Ok(output) => StepReply::Done(output),
            Err(message) => {
                self.failures.increment(1);
                let seq_ids = self.executor.culprits(&msg.0);
                if seq_ids.is_empty() {
                    StepReply::Failed(message)
                } else {
                    StepReply::Refused { message, seq_ids }
                }
            }
        };
        self.duration.record(started.elapsed().as_secs_f64());
        MessageResult(reply)
    }
}

/// The NATS side of an executor.
pub struct ExecutorService {
    bus: Bus,
    registration: ExecutorRegistration,
    worker: Addr<StepWorker>,
    /// Step messages sent in parts, put together.
    assembler: Assembler,
    /// The scheduler session the mirror belongs to, and those left before it.
    sessions: SessionHistory,
    /// What this executor has been told per sequence in that session.
    mirror: PlanMirror,
    /// The last step answered (session and answer): asked again (its answer was lost on the
    /// bus), it is answered again without running.
    answered: Option<(u64, StepResponse)>,
}

/// Largest step message put together from parts.
const MAX_STEP_BYTES: usize = 256 << 20;

impl ExecutorService {
    /// An executor service for a loaded executor; `registration` describes its pools.
    pub fn start(bus: Bus, executor: Box<dyn StepBackend>, registration: ExecutorRegistration) -> Addr<Self> {
        let slot = std::sync::Mutex::new(Some(executor));
        let series =
            [(labels::MODEL, registration.model.clone()), (labels::EXECUTOR, registration.executor_id.clone())];
        let (duration, failures) = (
            metrics::histogram!(names::EXECUTOR_STEP_DURATION, &series),
            metrics::counter!(names::EXECUTOR_STEP_FAILURES, &series),
        );
        let worker = SyncArbiter::start(1, move || StepWorker {
            executor: slot
                .lock()
                .ok()
                .and_then(|mut s| s.take())
                .expect("the step worker is started once, with the executor"),
            duration: duration.clone(),
            failures: failures.clone(),
        });
        Self {
            bus,
            registration,
            worker,
            assembler: Assembler::new(MAX_STEP_BYTES),
            sessions: SessionHistory::default(),
            mirror: PlanMirror::new(),
            answered: None,
        }
        .start()
    }
}

/// A step request as received.
struct IncomingStep(async_nats::Message);

impl Actor for ExecutorService {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        let subject = self.bus.subjects.executor_step(&self.registration.executor_id);
        let subscriptions = vec![Subscription::new(subject.subject(), IncomingStep)];
        listen(self, ctx, self.bus.client.clone(), subscriptions, "executor");
        ctx.run_interval(HEARTBEAT_INTERVAL, |act, ctx| act.announce(ctx));
        self.announce(ctx);
        pagemesh_bus::refusals::register("executor", &["step"]);
    }
}

impl ExecutorService {
    fn announce(&self, ctx: &mut Context<Self>) {
        let bus = self.bus.clone();
        let registration = self.registration.clone();
        ctx.spawn(
            async move {
                if let Err(e) = bus.publish(&bus.subjects.executor_heartbeat(), &registration).await {
                    tracing::warn!("executor: heartbeat failed: {e}");
                }
            }
            .into_actor(self),
        );
    }
}

impl ExecutorService {
    /// The plan a step request stands for, or the answer refusing it.
    fn plan_of(&mut self, request: StepRequest) -> Result<StepPlan, StepReply> {
        let incarnation = self.registration.incarnation;
        if request.incarnation != incarnation {
            // A step for an earlier life of this executor: its blocks are not here.
            let message = format!(
                "this step is for incarnation {}; this executor is incarnation {incarnation}",
                request.incarnation
            );
            return Err(StepReply::Failed(message));
        }
        if self.sessions.check(request.session) == SessionCheck::New {
            self.sessions.enter(request.session);
            self.mirror = PlanMirror::new();
        }
        self.mirror.decode(request.plan, limits::MAX_EXECUTOR_SEQUENCES).map_err(|e| {
            pagemesh_bus::refusals::refuse("executor", "step", &e.message);
            StepReply::Refused { message: e.message, seq_ids: e.seq_ids }
        })
    }
}

impl ExecutorService {
    /// Answers a step that does not run (a repeat, or a step of a left session).
    fn answer_without_running(&mut self, ctx: &mut Context<Self>, reply: String, answer: StepResponse) {
        let bus = self.bus.clone();
        let endpoint = self.bus.subjects.executor_step(&self.registration.executor_id);
        ctx.spawn(
            async move {
                if let Err(e) = bus.respond(&endpoint, reply, &answer).await {
                    tracing::warn!("executor: cannot answer a step: {e}");
                }
            }
            .into_actor(self),
        );
    }
}

impl StreamHandler<IncomingStep> for ExecutorService {
    fn handle(&mut self, IncomingStep(msg): IncomingStep, ctx: &mut Self::Context) {
        let bytes = match self.assembler.accept(msg.headers.as_ref(), &msg.payload) {
            Assembled::Complete(bytes) => Ok(bytes),
            Assembled::Partial => return,
            Assembled::Refused(message) => Err(message),
        };
        let Some(reply) = msg.reply.clone() else {
            let why = bytes.err().unwrap_or_else(|| "a step without a reply subject".to_string());
            pagemesh_bus::refusals::refuse("executor", "step", &why);
            return;
        };
        let endpoint = self.bus.subjects.executor_step(&self.registration.executor_id);
        let request = bytes.and_then(|bytes| endpoint.requests().decode(&bytes).map_err(|e| e.to_string()));
        let incarnation = self.registration.incarnation;
        if let Ok(request) = &request {
            if self.sessions.check(request.session) == SessionCheck::Left {
                // Late, from a session given up since: its blocks belong to the current one.
                let message =
                    format!("step {} is of session {}, which this executor has left", request.step, request.session);
                let answer = StepResponse { incarnation, step: request.step, reply: StepReply::Failed(message) };
                self.answer_without_running(ctx, reply.to_string(), answer);
                return;
            }
        }
        if let (Ok(request), Some((session, taken))) = (&request, self.registration.step_taken) {
            let answered = self.registration.step_answered == Some((request.session, request.step));
            if request.session == session && request.step <= taken && !answered {
                // Sent again while it runs (its answer is on the way), or an older step sent
                // again late (its answer is out of date): steps never run twice.
                return;
            }
        }
        if let (Ok(request), Some((session, answer))) = (&request, &self.answered) {
            if (request.session, request.step, request.incarnation) == (*session, answer.step, incarnation) {
                // Asked again: the answer went missing; the step already ran.
                let answer = answer.clone();
                self.answer_without_running(ctx, reply.to_string(), answer);
                return;
            }
        }
        let session = request.as_ref().map_or(0, |r| r.session);
        let (step, plan) = match request {
            Ok(request) => {
                self.registration.step_taken = Some((request.session, request.step));
                (request.step, self.plan_of(request))
            }
            Err(message) => {
                pagemesh_bus::refusals::refuse("executor", "step", &message);
                (0, Err(StepReply::Failed(message)))
            }
        };
        let bus = self.bus.clone();
        let worker = self.worker.clone();
        // The worker runs steps one at a time in arrival order; heartbeats go on meanwhile.
        ctx.spawn(
            async move {
                let outcome = match plan {
                    Ok(plan) => worker.send(RunStep(plan)).await.unwrap_or_else(|e| StepReply::Failed(e.to_string())),
                    Err(refusal) => refusal,
                };
                let answer = StepResponse { incarnation, step, reply: outcome };
                if let Err(e) = bus.respond(&endpoint, reply.to_string(), &answer).await {
                    tracing::warn!("executor: cannot answer a step: {e}");
                }
                answer
            }
            .into_actor(self)
            .map(move |answer, act, _| {
                // Heartbeats from now on say this step was answered.
                act.registration.step_answered = Some((session, answer.step));
                act.answered = Some((session, answer));
            }),
        );
    }

    fn finished(&mut self, ctx: &mut Self::Context) {
        ctx.stop();
    }
}
