//! Detokenizers and the streams on them: membership, acks, aborts, events sent again when
//! they were lost, and streams moved off a lost detokenizer.

use std::time::Duration;

use pagemesh_shared::protocol::{DetokenizerAck, DetokenizerEvent, ErrorReply, Heartbeat, StreamAsk};
use pagemesh_shared::FinishReason;

use super::placement::abort_key;
use super::requests::Placement;
use super::{Effect, MeshScheduler};
use crate::service::stream_sync;

/// How long after taking over a scheduler leaves asks for streams it does not hold alone (they
/// may still be adopted from the detokenizers' reports).
pub(super) const ADOPTION_GRACE: Duration = Duration::from_secs(10);

impl MeshScheduler {
    pub(super) fn on_detokenizer_beat(&mut self, beat: Heartbeat) {
        let new = self.detokenizers.insert(beat.id.clone(), self.now).is_none();
        if new {
            tracing::info!("scheduler: detokenizer {} registered", beat.id);
            self.admit();
        }
    }

    /// An abort from a service (`None`: allowed for any request) or from the account of a
    /// client (`Some(account)`: only for requests that account sent; `Some(None)` on a bus
    /// without accounts).
    pub(super) fn on_abort(&mut self, request_id: &str, from: Option<Option<String>>) {
        let Some(state) = self.requests.get(request_id) else {
            let owner = from.flatten();
            self.early_aborts.remember(&abort_key(owner.as_deref(), request_id), self.now);
            return;
        };
        if let Some(account) = &from {
            if *account != state.submit.owner {
                self.refuse("abort", format!("an abort of {request_id} from another client"));
                return;
            }
        }
        match state.placed.clone() {
            Some(Placement { executor, core_id }) => {
                if let Some(slot) = self.executors.get_mut(&executor) {
                    let events = slot.core.abort_request(core_id);
                    self.route(events);
                    self.drive(&executor);
                }
            }
            None if !state.all_finished() => {
                // Waiting for an executor: it ends here.
                self.fail(request_id, "aborted");
            }
            None => {}
        }
    }

    pub(super) fn on_ack(&mut self, mut ack: DetokenizerAck) {
        let id = ack.request_id.clone();
        let ask = ack.ask.take();
        let now = self.now;
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
            if !state.detokenizer.is_empty() && state.resends.allow(now) {
                let target = state.detokenizer.clone();
                self.reopen_stream(&id, &target);
            }
            return;
        }
        if ack.consumed.len() != n || ack.closed.len() != n {
            self.refuse("detokenizer_ack", format!("an ack for {id} names the wrong number of samples"));
            return;
        }
        if ack.next_index >= state.acked.next_index {
            if ack != state.acked {
                state.stream_progress = now;
            }
            state.acked = ack;
        }
        if let Some(StreamAsk { received: Some(received), .. }) = ask {
            if state.resends.allow(now) {
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
        let now = self.now;
        let adopting = self.serving_since.is_none_or(|since| now.saturating_duration_since(since) < ADOPTION_GRACE);
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

    /// Counts a stream whose events are sent again.
    fn count_resend(&mut self) {
        self.recoveries.stream_resends += 1;
        self.metrics.stream_resent();
    }

    /// Sends a request's detokenizer its tokens after `from` (per sample) again (the end of
    /// its stream, if it failed).
    fn resend_tokens(&mut self, request_id: &str, from: &[usize]) {
        let Some(state) = self.requests.get(request_id) else { return };
        if let Some(event) = state.failure_event() {
            let target = state.detokenizer.clone();
            self.count_resend();
            self.send_event(&target, event);
            return;
        }
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
        let failure = state.failure_event();
        self.count_resend();
        self.send_event(target, DetokenizerEvent::Open(Box::new(open)));
        if let Some(event) = failure {
            self.send_event(target, event);
        } else if !tokens.is_empty() {
            self.send_event(target, DetokenizerEvent::Tokens { request_id: request_id.to_string(), tokens });
        }
    }

    /// Requests done on their executor whose detokenizer has not acknowledged the end for
    /// [`stream_sync::RESEND_AFTER`]: their last events (or its ack) were lost, so their tokens
    /// go again (the detokenizer skips what it has, and acknowledges).
    pub(super) fn resend_stalled_streams(&mut self) {
        let now = self.now;
        let stalled: Vec<String> = self
            .requests
            .iter()
            .filter(|(_, s)| {
                s.placed.is_none()
                    && s.all_finished()
                    && !s.detokenizer.is_empty()
                    && !s.all_closed()
                    && now.saturating_duration_since(s.stream_progress) >= stream_sync::RESEND_AFTER
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
    pub(super) fn release_if_done(&mut self, request_id: &str) {
        let done =
            self.requests.get(request_id).is_some_and(|s| s.placed.is_none() && s.all_finished() && s.all_closed());
        if done {
            self.requests.remove(request_id);
        }
    }

    /// Moves the streams of a lost detokenizer to another one, from where their published
    /// chunks had got.
    pub(super) fn lose_detokenizer(&mut self, lost: &str) {
        let moved: Vec<String> =
            self.requests.iter().filter(|(_, s)| s.detokenizer == lost).map(|(id, _)| id.clone()).collect();
        for id in moved {
            if self.detokenizers.is_empty() {
                // Nobody can finish the stream: the client hears it from here.
                let Some(mut state) = self.requests.remove(&id) else { continue };
                if let Some((kind, message)) = state.failure.take() {
                    // It had failed already (and was counted): its client hears why.
                    let error = ErrorReply::new(Some(id), kind, message);
                    self.effects.push(Effect::Error { reply_to: state.submit.reply_to, error });
                    continue;
                }
                state.detokenizer.clear();
                self.requests.insert(id.clone(), state);
                self.fail(&id, "the detokenizer serving this request was lost and no other is running");
                continue;
            }
            let Some(target) = self.pick_detokenizer() else { continue };
            tracing::info!(request_id = %id, "scheduler: stream of {id} moves to detokenizer {target}");
            self.reopen_stream(&id, &target);
        }
    }
}
