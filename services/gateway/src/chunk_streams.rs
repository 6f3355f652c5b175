//! The chunks of one HTTP generation request: each mesh request's reply inbox as an ordered
//! stream, merged into one stream when a request fans out into several (one per prompt).
//!
//! The merged stream renumbers samples prompt by prompt (`k * n + sample`), gives every chunk the
//! HTTP request's id, and marks only the very last chunk `done`, with the summed usage. It ends
//! after that chunk or after the first error. Dropped before then (a client that went away, an
//! error in one sub-request), it aborts every sub-request still running.

use std::pin::Pin;
use std::time::Duration;

use futures::stream::{self, SelectAll};
use futures::{Stream, StreamExt};
use pagemesh_shared::protocol::{AbortRequest, Chunk, ErrorKind, ErrorReply, GenerateRequest, ReplyMessage, Usage};

use pagemesh_bus::bus::Bus;

/// Longest wait for a request's next chunk.
const CHUNK_TIMEOUT: Duration = Duration::from_secs(600);

/// A stream of chunks (or one final error).
pub type ChunkStream = Pin<Box<dyn Stream<Item = Result<Chunk, ErrorReply>>>>;

/// The chunks of sub-request `k`, tagged with `k`.
type TaggedChunkStream = Pin<Box<dyn Stream<Item = (usize, Result<Chunk, ErrorReply>)>>>;

/// Sends `<prefix>.generate` for `request` and returns its chunks, in order, ending after the
/// `done` chunk (or an error).
async fn open_one(bus: &Bus, request: &GenerateRequest) -> Result<ChunkStream, ErrorReply> {
    let unavailable = |message: String| ErrorReply::new(None, ErrorKind::Unavailable, message);
    let inbox = bus.client.new_inbox();
    let subscriber = bus.client.subscribe(inbox.clone()).await.map_err(|e| unavailable(format!("NATS: {e}")))?;
    let id = request.request_id.as_deref().unwrap_or_default();
    bus.publish_with_reply_about(&bus.subjects.generate(), inbox, request, id)
        .await
        .map_err(|e| unavailable(e.to_string()))?;
    let mut next_index = 0u64;
    let chunks = stream::unfold((subscriber, false), move |(mut sub, done)| async move {
        if done {
            return None;
        }
        let msg = match tokio::time::timeout(CHUNK_TIMEOUT, sub.next()).await {
            Ok(Some(msg)) => msg,
            Ok(None) => return None,
            Err(_) => {
                let e = ErrorReply::new(None, ErrorKind::Unavailable, "timed out waiting for the model");
                return Some((Err(e), (sub, true)));
            }
        };
        if msg.status == Some(async_nats::StatusCode::NO_RESPONDERS) {
            let e = ErrorReply::new(None, ErrorKind::Unavailable, "no tokenizer is running to take the request");
            return Some((Err(e), (sub, true)));
        }
        match serde_json::from_slice::<ReplyMessage>(&msg.payload) {
            Ok(ReplyMessage::Error(e)) => Some((Err(e), (sub, true))),
            Ok(ReplyMessage::Chunk(c)) => {
                let done = c.done;
                Some((Ok(c), (sub, done)))
            }
            Err(e) => {
                let e = ErrorReply::new(None, ErrorKind::Internal, format!("malformed chunk: {e}"));
                Some((Err(e), (sub, true)))
            }
        }
    })
    // Chunks arrive in order; an index can come again after a fault (a detokenizer lost, or
    // its link to NATS restored): drop what was had.
    .filter(move |item| {
        let keep = match item {
            Ok(c) if c.index < next_index => false,
            Ok(c) => {
                next_index = c.index + 1;
                true
            }
            Err(_) => true,
        };
        futures::future::ready(keep)
    });
    Ok(Box::pin(chunks))
}

/// How the merged stream renumbers and closes its sub-requests' chunks. Dropped with
/// sub-requests unfinished, it aborts them over `bus`.
struct Merger {
    bus: Option<Bus>,
    ids: Vec<String>,
    finished: Vec<bool>,
    request_id: String,
    samples_per_prompt: u32,
    usage: Usage,
    next_index: u64,
    ended: bool,
}

impl Merger {
    fn new(bus: Option<Bus>, request_id: &str, ids: Vec<String>, samples_per_prompt: usize) -> Self {
        Self {
            bus,
            finished: vec![false; ids.len()],
            ids,
            request_id: request_id.to_string(),
            samples_per_prompt: samples_per_prompt.max(1) as u32,
            usage: Usage::default(),
            next_index: 0,
            ended: false,
        }
    }

    /// Folds chunk `chunk` of sub-request `k` into the merged stream.
    fn chunk(&mut self, k: usize, mut chunk: Chunk) -> Chunk {
        chunk.sample_index += k as u32 * self.samples_per_prompt;
        chunk.request_id.clone_from(&self.request_id);
        chunk.index = self.next_index;
        self.next_index += 1;
        if chunk.done {
            if let Some(done) = self.finished.get_mut(k) {
                *done = true;
            }
            if let Some(u) = chunk.usage.take() {
                self.usage += u;
            }
            self.ended = self.finished.iter().all(|done| *done);
            chunk.done = self.ended;
            chunk.usage = self.ended.then_some(self.usage);
        }
        chunk
    }

    /// Sub-request `k` failed: the merged stream ends with its error.
    fn error(&mut self, k: usize, error: ErrorReply) -> ErrorReply {
        if let Some(done) = self.finished.get_mut(k) {
            *done = true;
        }
        self.ended = true;
        error
    }

    /// The sub-requests not finished yet.
    fn unfinished(&self) -> Vec<String> {
        self.ids.iter().zip(&self.finished).filter(|(_, done)| !**done).map(|(id, _)| id.clone()).collect()
    }
}

impl Drop for Merger {
    fn drop(&mut self) {
        let unfinished = self.unfinished();
        let Some(bus) = self.bus.take().filter(|_| !unfinished.is_empty()) else { return };
        actix_web::rt::spawn(async move {
            for request_id in unfinished {
                let abort = AbortRequest { request_id: request_id.clone() };
                let _ = bus.publish_about(&bus.subjects.scheduler_abort(), &abort, &request_id).await;
            }
        });
    }
}

/// Sends every request (their `request_id`s are `ids`) and merges their chunks into one stream
/// under `request_id`, numbering samples `k * samples_per_prompt + sample` for request `k`.
pub async fn open(
    bus: &Bus,
    request_id: &str,
    requests: &[GenerateRequest],
    samples_per_prompt: usize,
) -> Result<ChunkStream, ErrorReply> {
    let ids = requests.iter().map(|r| r.request_id.clone().unwrap_or_else(|| request_id.to_string())).collect();
    // Built first, so that a failure half-way aborts what was already sent.
    let merger = Merger::new(Some(bus.clone()), request_id, ids, samples_per_prompt);
    let mut streams: SelectAll<TaggedChunkStream> = SelectAll::new();
    for (k, request) in requests.iter().enumerate() {
        let chunks = open_one(bus, request).await?;
        streams.push(Box::pin(chunks.map(move |item| (k, item))));
    }
    let merged = stream::unfold((streams, merger), |(mut streams, mut merger)| async move {
        if merger.ended {
            return None;
        }
        let item = match streams.next().await? {
            (k, Ok(chunk)) => Ok(merger.chunk(k, chunk)),
            (k, Err(e)) => Err(merger.error(k, e)),
        };
        Some((item, (streams, merger)))
    });
    Ok(Box::pin(merged))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(sample_index: u32, text: &str, done: bool, completion_tokens: usize) -> Chunk {
        Chunk {
            request_id: "sub".into(),
            index: 0,
            sample_index,
            text: text.into(),
            token_ids: vec![],
            logprobs: None,
            logprob_texts: None,
            finish_reason: None,
            done,
            usage: done.then_some(Usage::new(3, completion_tokens)),
            prompt_token_ids: None,
        }
    }

    #[test]
    fn samples_are_numbered_prompt_by_prompt_and_only_the_last_chunk_is_done() {
        let ids = vec!["r-0".to_string(), "r-1".to_string()];
        let mut merger = Merger::new(None, "r", ids, 2);
        let a = merger.chunk(1, chunk(1, "x", false, 0));
        assert_eq!((a.sample_index, a.request_id.as_str(), a.index), (3, "r", 0));
        let b = merger.chunk(1, chunk(0, "y", true, 4));
        assert_eq!((b.sample_index, b.done, b.usage, b.index), (2, false, None, 1));
        assert_eq!(merger.unfinished(), ["r-0"]);
        let c = merger.chunk(0, chunk(1, "z", true, 5));
        assert_eq!((c.sample_index, c.done), (1, true));
        assert_eq!(c.usage, Some(Usage { prompt_tokens: 6, completion_tokens: 9, total_tokens: 15 }));
        assert!(merger.ended && merger.unfinished().is_empty());
    }

    #[test]
    fn an_error_ends_the_stream_and_leaves_the_others_to_abort() {
        let ids = vec!["r-0".to_string(), "r-1".to_string(), "r-2".to_string()];
        let mut merger = Merger::new(None, "r", ids, 1);
        merger.chunk(2, chunk(0, "x", true, 1));
        merger.error(0, ErrorReply::new(None, ErrorKind::InvalidRequest, "prompt too long"));
        assert!(merger.ended);
        assert_eq!(merger.unfinished(), ["r-1"]);
    }
}
