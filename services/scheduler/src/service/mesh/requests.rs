//! What the scheduler knows of one request: its submit, where it runs and streams, its tokens
//! so far and how far its stream got.

use std::time::Instant;

use pagemesh_shared::protocol::{
    DetokenizerAck, DetokenizerEvent, ErrorKind, OpenRequest, ResumePoint, StreamState, SubmitRequest,
};
use pagemesh_shared::FinishReason;

use crate::service::metrics::RequestTiming;
use crate::service::stream_sync::ResendClock;

/// The executor a request runs on, and its id in that executor's core.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Placement {
    pub(super) executor: String,
    pub(super) core_id: u64,
}

/// One request's state.
pub(super) struct RequestState {
    pub(super) submit: SubmitRequest,
    /// Where it runs (none while it waits, or once it is done there).
    pub(super) placed: Option<Placement>,
    /// The detokenizer streaming it (empty until one is chosen).
    pub(super) detokenizer: String,
    pub(super) generated: Vec<Vec<u32>>,
    pub(super) finished: Vec<Option<FinishReason>>,
    /// How far the detokenizer's published chunks got (from its acks).
    pub(super) acked: DetokenizerAck,
    /// When the stream last moved on (an ack that got further, or the end on the executor):
    /// a finished request whose last ack does not come is sent again.
    pub(super) stream_progress: Instant,
    /// Spaces the times its events are sent again.
    pub(super) resends: ResendClock,
    pub(super) timing: RequestTiming,
    /// Why it failed, once it has: its stream's end is sent (again, to another detokenizer
    /// if need be) until the detokenizer acknowledges it.
    pub(super) failure: Option<(ErrorKind, String)>,
}

impl RequestState {
    /// A request just submitted at `now`.
    pub(super) fn new(submit: SubmitRequest, now: Instant) -> Self {
        let n = submit.params.n;
        let acked = DetokenizerAck {
            request_id: submit.request_id.clone(),
            next_index: 0,
            consumed: vec![0; n],
            closed: vec![false; n],
            ask: None,
        };
        Self {
            submit,
            placed: None,
            detokenizer: String::new(),
            generated: vec![Vec::new(); n],
            finished: vec![None; n],
            acked,
            stream_progress: now,
            resends: ResendClock::default(),
            timing: RequestTiming::arrived(now),
            failure: None,
        }
    }

    /// A request as a detokenizer reported it to a scheduler taking over at `now`.
    pub(super) fn from_stream(stream: StreamState, detokenizer: &str, now: Instant) -> Self {
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
            // The stream holds the length its first executor could hold.
            max_tokens_is_default: false,
        };
        Self {
            submit,
            placed: None,
            detokenizer: detokenizer.to_string(),
            generated: stream.generated,
            finished: stream.finished,
            acked: stream.ack,
            stream_progress: now,
            resends: ResendClock::default(),
            timing: RequestTiming::arrived(now),
            failure: None,
        }
    }

    /// The event that ends a failed request's stream (none while it has not failed).
    pub(super) fn failure_event(&self) -> Option<DetokenizerEvent> {
        self.failure.as_ref().map(|(kind, message)| DetokenizerEvent::Finish {
            request_id: self.submit.request_id.clone(),
            reason: FinishReason::Error,
            message: Some(message.clone()),
            kind: Some(*kind),
        })
    }

    /// Whether every sample has ended.
    pub(super) fn all_finished(&self) -> bool {
        self.finished.iter().all(Option::is_some)
    }

    /// Whether the detokenizer published every sample's last chunk.
    pub(super) fn all_closed(&self) -> bool {
        self.acked.closed.iter().all(|c| *c)
    }

    /// What a detokenizer needs to open (or, with `resume`, take over) this request's stream.
    pub(super) fn open_request(&self, resume: Option<ResumePoint>) -> OpenRequest {
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
}
