//! The clock tick (silence, stalled streams, expired waits), this scheduler's heartbeat, and
//! the standby's life: watching the serving scheduler, taking over from it (adopting the
//! detokenizers' streams) and standing down.

use pagemesh_shared::link::LinkState;
use pagemesh_shared::protocol::{SchedulerHeartbeat, StreamState};

use super::placement::abort_key;
use super::requests::RequestState;
use super::{Effect, Event, MeshScheduler};
use crate::service::fair_queue::FairQueue;
use crate::service::leadership::{Decision, Rank};

impl MeshScheduler {
    /// What a standby does with an event: it watches the other schedulers and the
    /// detokenizers, keeps time, and remembers aborts (a request it adopts later may have been
    /// aborted meanwhile); it answers nothing.
    pub(super) fn stand_by(&mut self, event: Event) {
        match event {
            Event::SchedulerBeat(beat) => self.on_scheduler_beat(beat),
            Event::DetokenizerBeat(beat) => {
                self.detokenizers.insert(beat.id, self.now);
            }
            Event::Abort { request_id, from } => {
                let owner = from.flatten();
                self.early_aborts.remember(&abort_key(owner.as_deref(), &request_id), self.now);
            }
            Event::Tick(link) => self.tick(&link),
            Event::Announce => self.announce(),
            _ => {}
        }
    }

    /// Whether an abort came for this request before it did (from its client's account or
    /// from a service), forgetting it.
    pub(super) fn take_early_abort(&mut self, owner: Option<&str>, request_id: &str) -> bool {
        let by_owner = self.early_aborts.take(&abort_key(owner, request_id), self.now);
        let by_service = owner.is_some() && self.early_aborts.take(&abort_key(None, request_id), self.now);
        by_owner || by_service
    }

    pub(super) fn tick(&mut self, link: &LinkState) {
        let now = self.now;
        let timeout = self.config.heartbeat_timeout;
        // Silence while this scheduler's own link to NATS was down does not count.
        if let Decision::Activate(term) = self.leadership.tick(link, now) {
            self.take_over(term);
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
            self.lose_executor(&id);
        }
        let quarantine = 2 * timeout;
        self.lost.retain(|_, (at, _)| now.saturating_duration_since(*at) < quarantine);
        self.resend_stalled_streams();
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
            let expired = |since: &std::time::Instant| now.saturating_duration_since(*since) > limit;
            let ids: Vec<String> =
                self.unplaced.iter().filter(|(_, since)| expired(since)).map(|(id, _)| id.clone()).collect();
            self.unplaced.retain(|(_, since)| !expired(since));
            for id in ids {
                self.fail(&id, "no executor is available to serve this request");
            }
        }
        self.admit();
        for slot in self.executors.values_mut() {
            slot.metrics.sync(&slot.core);
        }
        self.metrics.population(self.executors.len(), self.detokenizers.len(), self.unplaced.len());
    }

    /// Starts serving under `term`: asks every known detokenizer for the streams it holds and
    /// runs their requests on from there (re-prefilled from prompt + tokens so far, like a
    /// request moved off a lost executor). Executors register on their next heartbeat.
    fn take_over(&mut self, term: u64) {
        tracing::info!("scheduler {}: serving (term {term})", self.identity.id);
        self.serving_since = Some(self.now);
        self.announce();
        for detokenizer in self.detokenizers.keys().cloned().collect::<Vec<_>>() {
            self.effects.push(Effect::AskStreams { detokenizer, term });
        }
    }

    /// Adopts the streams a detokenizer reported after a takeover.
    pub(super) fn on_streams_reported(&mut self, detokenizer: &str, streams: Result<Vec<StreamState>, String>) {
        let streams = match streams {
            Ok(streams) => streams,
            Err(e) => {
                tracing::warn!("scheduler: detokenizer {detokenizer} did not report its streams: {e}");
                return;
            }
        };
        let mut adopted = 0;
        for stream in streams {
            let state = RequestState::from_stream(stream, detokenizer, self.now);
            let id = state.submit.request_id.clone();
            if self.requests.contains_key(&id) || state.all_closed() {
                continue;
            }
            let unfinished = !state.all_finished();
            let owner = state.submit.owner.clone();
            self.requests.insert(id.clone(), state);
            adopted += 1;
            if unfinished && self.take_early_abort(owner.as_deref(), &id) {
                // Aborted while no scheduler served.
                self.fail(&id, "aborted");
            } else if unfinished {
                self.queue(&id);
            }
        }
        self.recoveries.migrated += adopted;
        tracing::info!("scheduler: adopted {adopted} streams from detokenizer {detokenizer}");
        self.admit();
    }

    /// Another scheduler serves now: forget every request (it owns them) and stand by.
    fn step_down(&mut self) {
        tracing::info!("scheduler {}: another scheduler serves; standing by", self.identity.id);
        self.requests.clear();
        self.by_core.clear();
        self.unplaced = FairQueue::default();
        self.executors.clear();
    }

    pub(super) fn on_scheduler_beat(&mut self, beat: SchedulerHeartbeat) {
        let rank = Rank { started_ms: beat.started_ms, id: beat.id };
        if self.leadership.observe(&rank, beat.active, beat.term, self.now) == Decision::StepDown {
            self.step_down();
        }
    }

    /// Publishes this scheduler's heartbeat.
    pub(super) fn announce(&mut self) {
        let beat = SchedulerHeartbeat {
            id: self.identity.id.clone(),
            active: self.leadership.is_active(),
            term: self.leadership.term(),
            started_ms: self.identity.started_ms,
        };
        self.effects.push(Effect::Heartbeat(beat));
    }
}
