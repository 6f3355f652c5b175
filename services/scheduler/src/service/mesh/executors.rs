//! Executor membership and the step loop: registration, sending steps, feeding their answers
//! to the executor's core and routing the tokens, and what happens when a step fails or an
//! executor is lost (its requests move to the others).

use std::collections::HashMap;
use std::time::Duration;

use pagemesh_shared::limits;
use pagemesh_shared::protocol::{DetokenizerEvent, ExecutorRegistration, StepReply, StepRequest, TokenEvent};
use pagemesh_shared::step_delta::PlanMirror;
use pagemesh_shared::SeqId;

use super::{Effect, ExecutorSlot, MeshScheduler, StepDone};
use crate::service::metrics::ExecutorMetrics;
use crate::{RequestEvent, Scheduler};

/// How long after sending a step the executor's heartbeats may show that it has not taken it,
/// or that its answer went out, before the step (or answer) is taken as lost.
pub(super) const STEP_LOST_AFTER: Duration = Duration::from_secs(1);

impl MeshScheduler {
    pub(super) fn on_executor_beat(&mut self, registration: ExecutorRegistration) {
        if registration.model != self.config.model {
            return;
        }
        if let Err(e) = limits::check_registration(&registration, self.config.max_executor_blocks) {
            self.refuse("executor_heartbeat", e);
            return;
        }
        let now = self.now;
        match self.executors.get_mut(&registration.executor_id) {
            Some(slot) if slot.registration.incarnation == registration.incarnation => {
                slot.last_seen = now;
                self.resend_lost_step(&registration);
                return;
            }
            Some(_) => {
                // The same id, another life: the executor restarted and its KV cache is gone.
                tracing::warn!("scheduler: executor {} restarted", registration.executor_id);
                self.lose_executor(&registration.executor_id);
            }
            None => {}
        }
        let quarantine = 2 * self.config.heartbeat_timeout;
        let quarantined = self.lost.get(&registration.executor_id).is_some_and(|(at, incarnation)| {
            *incarnation == registration.incarnation && now.saturating_duration_since(*at) < quarantine
        });
        if quarantined {
            return;
        }
        let config = self.engine_config(&registration);
        if let Err(e) = crate::validate_config(&config) {
            self.refuse("executor_heartbeat", format!("executor {}: {e}", registration.executor_id));
            return;
        }
        tracing::info!(
            "scheduler: executor {} registered ({} device / {} host blocks of {})",
            registration.executor_id,
            registration.num_device_blocks,
            registration.num_host_blocks,
            registration.block_size
        );
        self.add_executor(registration);
        self.admit();
    }

    /// Adds an executor with a fresh core (its configuration was validated).
    fn add_executor(&mut self, registration: ExecutorRegistration) {
        let slot = ExecutorSlot {
            core: Scheduler::new(self.engine_config(&registration), self.config.eos_token_ids.clone()),
            last_seen: self.now,
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

    /// Starts the executor's next step if it has none in flight and work to do.
    pub(super) fn drive(&mut self, executor: &str) {
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
        let now = self.now;
        slot.metrics.step_sent(&plan, now);
        slot.in_flight_requests.clear();
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
        self.effects.push(Effect::Step { executor: executor.to_string(), generation, request });
    }

    /// Sends the step in flight again when the executor's heartbeat shows, [`STEP_LOST_AFTER`]
    /// after it was sent, that the step or its answer was lost on the bus: it never took the
    /// step (it runs it now), or it answered and the answer never came (it answers again
    /// without running it twice).
    fn resend_lost_step(&mut self, registration: &ExecutorRegistration) {
        let executor = registration.executor_id.as_str();
        let now = self.now;
        let Some(slot) = self.executors.get_mut(executor) else { return };
        let generation = slot.generation;
        let Some((request, sent)) = slot.in_flight_request.as_mut() else { return };
        let this = (generation, request.step);
        let not_taken =
            registration.step_taken.is_none_or(|(session, step)| session != generation || step < request.step);
        let answered = registration.step_answered == Some(this);
        if !(not_taken || answered) || now.saturating_duration_since(*sent) < STEP_LOST_AFTER {
            return;
        }
        *sent = now;
        let request = request.clone();
        let what = if answered { "its answer" } else { "the step" };
        tracing::warn!("scheduler: step {} to executor {executor}: {what} was lost; sending it again", request.step);
        self.effects.push(Effect::Step { executor: executor.to_string(), generation, request });
    }

    /// Sends the tokens (and ends) of a step to the requests' detokenizers, one message per
    /// detokenizer, and notes requests done on their executor.
    pub(super) fn route(&mut self, events: Vec<RequestEvent>) {
        let now = self.now;
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
                tracing::debug!(request_id = %request_id, "scheduler: request done on its executor");
                let generated: Vec<usize> = state.generated.iter().map(Vec::len).collect();
                state.timing.finished(&self.metrics, now, state.submit.prompt_token_ids.len(), &generated);
                // Done on the executor; the state stays until the detokenizer's last chunk is
                // out (its ack), so that a lost detokenizer's stream can still be finished.
                if let Some(placed) = state.placed.take() {
                    self.by_core.remove(&placed.core_id);
                }
                state.stream_progress = now;
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

    pub(super) fn on_step_done(&mut self, done: StepDone) {
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
                self.lose_executor(&done.executor);
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
                slot.metrics.step_done(&slot.core, self.now);
                slot.metrics.generated(output.results.iter().map(|r| r.samples.len()).sum());
                self.route(events);
                // Room may have opened: the next step takes whoever's turn it is.
                self.admit();
                self.drive(&done.executor);
            }
            Ok(StepReply::Failed(message)) => {
                tracing::warn!("scheduler: executor {} failed a step: {message}", done.executor);
                self.fail_step(&done.executor, &message, &[]);
            }
            Ok(StepReply::Refused { message, seq_ids }) => {
                tracing::warn!("scheduler: executor {} refused a step: {message}", done.executor);
                self.fail_step(&done.executor, &message, &seq_ids);
            }
            Err(e) => {
                tracing::warn!("scheduler: executor {} did not answer a step: {e}", done.executor);
                self.lose_executor(&done.executor);
            }
        }
    }

    /// Counts a step answer dropped as late.
    fn stale_reply(&mut self) {
        self.recoveries.stale_replies += 1;
        self.metrics.stale_step_reply();
    }

    /// An executor answered that a step failed: the requests of the sequences it names end
    /// with an error (all the step's requests when it names none: they cannot be told apart
    /// from the one that caused it), and the executor goes on with a fresh core, its other
    /// requests re-placed as after a loss. It is not dropped: it is alive, and the step that
    /// failed is not sent again.
    fn fail_step(&mut self, executor: &str, message: &str, seq_ids: &[SeqId]) {
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
        self.add_executor(registration);
        self.rehome(moved);
    }

    /// The requests placed on `executor`, oldest first.
    pub(super) fn requests_on(&self, executor: &str) -> Vec<String> {
        let mut moved: Vec<String> = self
            .requests
            .iter()
            .filter(|(_, s)| s.placed.as_ref().is_some_and(|p| p.executor == executor))
            .map(|(id, _)| id.clone())
            .collect();
        moved.sort_by_key(|id| self.requests.get(id).and_then(|s| s.placed.as_ref()).map(|p| p.core_id));
        moved
    }

    /// Drops an executor and moves its requests to the others (or waits for one).
    pub(super) fn lose_executor(&mut self, executor: &str) {
        let Some(slot) = self.executors.remove(executor) else { return };
        self.metrics.executor_lost();
        self.lost.insert(executor.to_string(), (self.now, slot.registration.incarnation));
        tracing::warn!("scheduler: executor {executor} is gone; moving its requests");
        let moved = self.requests_on(executor);
        slot.metrics.lost(moved.len());
        self.rehome(moved);
    }

    /// Places requests taken off an executor again (from prompt + tokens so far).
    fn rehome(&mut self, moved: Vec<String>) {
        self.recoveries.migrated += moved.len() as u64;
        for id in moved {
            if let Some(placed) = self.requests.get_mut(&id).and_then(|s| s.placed.take()) {
                self.by_core.remove(&placed.core_id);
            }
            if self.executors.is_empty() {
                self.queue(&id);
            } else {
                self.place(&id);
            }
        }
    }
}
