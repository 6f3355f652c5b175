//! Submits, the round-robin admission queue and placing requests on executors.

use pagemesh_shared::limits;
use pagemesh_shared::protocol::{DetokenizerEvent, ErrorKind, ErrorReply, SubmitAck, SubmitRequest};
use pagemesh_shared::FinishReason;

use super::requests::{Placement, RequestState};
use super::{Effect, ExecutorSlot, MeshScheduler};
use crate::{AdmissionError, NewRequest};

/// How an abort for a request that has not arrived yet is remembered: with the account it
/// came from, so that it ends only that account's request.
pub(super) fn abort_key(owner: Option<&str>, request_id: &str) -> String {
    format!("{}\n{request_id}", owner.unwrap_or_default())
}

impl MeshScheduler {
    /// Handles a submit (unless it was handled already) and acknowledges it on `ack_to`.
    pub(super) fn on_submit_message(&mut self, submit: SubmitRequest, ack_to: Option<String>) {
        let key = format!("{}\n{}", submit.request_id, submit.reply_to);
        let ack = SubmitAck { request_id: submit.request_id.clone() };
        if !self.recent_submits.contains(&key, self.now) {
            self.recent_submits.remember(&key, self.now);
            self.on_submit(submit);
        }
        if let Some(reply_to) = ack_to.filter(|r| limits::check_reply_subject(r).is_ok()) {
            self.effects.push(Effect::SubmitAck { reply_to, ack });
        }
    }

    fn on_submit(&mut self, submit: SubmitRequest) {
        self.metrics.received();
        if let Err(message) = self.config.limits.check_submit(&submit) {
            self.refuse("submit", message.clone());
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
        if self.take_early_abort(submit.owner.as_deref(), &submit.request_id) {
            // Its client gave up while it was on its way: it ends before it takes any block.
            self.metrics.aborted();
            let message = format!("request `{}` was aborted before it started", submit.request_id);
            let error = ErrorReply::new(Some(submit.request_id), ErrorKind::InvalidRequest, message);
            self.effects.push(Effect::Error { reply_to: submit.reply_to, error });
            return;
        }
        if self.unplaced.len() >= self.config.engine.max_waiting_requests {
            let message = "the server is overloaded: too many requests are waiting".to_string();
            self.reply_error(&submit.reply_to, &submit.request_id, ErrorKind::Overloaded, message);
            return;
        }
        let id = submit.request_id.clone();
        tracing::debug!(request_id = %id, prompt_tokens = submit.prompt_token_ids.len(), "scheduler: request accepted");
        let mut state = RequestState::new(submit, self.now);
        // Its stream opens now, so that a scheduler taking over learns of it.
        if let Some(detokenizer) = self.pick_detokenizer() {
            state.detokenizer = detokenizer.clone();
            let open = state.open_request(None);
            self.send_event(&detokenizer, DetokenizerEvent::Open(Box::new(open)));
        }
        self.requests.insert(id.clone(), state);
        self.queue(&id);
        self.admit();
    }

    /// Queues a request for its turn.
    pub(super) fn queue(&mut self, request_id: &str) {
        let key = self.requests.get(request_id).map(|s| s.submit.fairness_key().to_string()).unwrap_or_default();
        self.unplaced.push(&key, (request_id.to_string(), self.now));
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
    pub(super) fn admit(&mut self) {
        if self.executors.is_empty() || self.detokenizers.is_empty() {
            return;
        }
        while !self.unplaced.is_empty() && self.executors.values().any(|slot| self.has_room(slot)) {
            let Some((id, _)) = self.unplaced.pop() else { break };
            self.place(&id);
        }
    }

    /// Puts a request (new, or moved from a lost executor) on the executor whose prefix cache
    /// holds most of its prompt, then with the most free blocks, and opens its stream on a
    /// detokenizer if it has none.
    pub(super) fn place(&mut self, request_id: &str) {
        let Some(state) = self.requests.get(request_id).filter(|s| s.failure.is_none()) else { return };
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
        let Some(slot) = self.executors.get_mut(&target) else { return };
        let mut params = submit.params.clone();
        if submit.max_tokens_is_default {
            // The request did not choose this length: hold it to what this executor can hold.
            let fits = slot.core.max_admissible_output(submit.prompt_token_ids.len(), params.n);
            params.max_tokens = params.max_tokens.min(fits.max(1));
            params.min_tokens = params.min_tokens.min(params.max_tokens);
        }
        let lengths = (params.max_tokens, params.min_tokens);
        let new = NewRequest {
            request_id: core_id,
            prompt_token_ids: submit.prompt_token_ids.clone(),
            params,
            seed: submit.seed,
            resumed_output,
        };
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
        // What its stream (and a scheduler taking it over) knows is the length it runs with.
        (state.submit.params.max_tokens, state.submit.params.min_tokens) = lengths;
        tracing::debug!(request_id, executor = %target, resumed, "scheduler: request placed");
        state.placed = Some(Placement { executor: target.clone(), core_id });
        if needs_detokenizer {
            state.detokenizer = detokenizer.clone();
            let open = state.open_request(None);
            self.send_event(&detokenizer, DetokenizerEvent::Open(Box::new(open)));
        }
        self.drive(&target);
    }

    /// The next detokenizer, round robin (none when none is registered).
    pub(super) fn pick_detokenizer(&mut self) -> Option<String> {
        let count = self.detokenizers.len();
        let id = self.detokenizers.keys().nth(self.next_detokenizer % count.max(1)).cloned();
        self.next_detokenizer += 1;
        id
    }

    /// Ends a request with an error on its stream (or its inbox if no stream is open).
    pub(super) fn fail(&mut self, request_id: &str, message: &str) {
        self.fail_with(request_id, ErrorKind::Unavailable, message);
    }

    /// [`fail`](Self::fail) with the kind of error a client that has no chunk yet is told.
    /// A request with a stream is held until its detokenizer acknowledges the end, so that the
    /// end reaches the client even if that detokenizer is lost meanwhile.
    pub(super) fn fail_with(&mut self, request_id: &str, kind: ErrorKind, message: &str) {
        let Some(mut state) = self.requests.remove(request_id) else { return };
        // Not waiting any more (a stale queue entry would count against the queue's bound).
        self.unplaced.retain(|(id, _)| id != request_id);
        if state.failure.is_some() {
            self.requests.insert(request_id.to_string(), state);
            return;
        }
        if let Some(placed) = state.placed.take() {
            self.by_core.remove(&placed.core_id);
            if let Some(slot) = self.executors.get_mut(&placed.executor) {
                slot.core.abort_request(placed.core_id);
            }
        }
        if state.detokenizer.is_empty() {
            self.reply_error(&state.submit.reply_to, request_id, kind, message.to_string());
            return;
        }
        self.metrics.error(kind);
        tracing::debug!(request_id, error = message, "scheduler: request failed");
        state.failure = Some((kind, message.to_string()));
        for finish in state.finished.iter_mut().filter(|f| f.is_none()) {
            *finish = Some(FinishReason::Error);
        }
        state.stream_progress = self.now;
        let detokenizer = state.detokenizer.clone();
        let event = state.failure_event();
        self.requests.insert(request_id.to_string(), state);
        self.send_events(&detokenizer, event.into_iter().collect());
    }
}
