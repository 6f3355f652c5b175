//! Publishing in order through one queue, and, for messages to clients, holding them while
//! the link to NATS is down and publishing the last seconds' messages again once it is back
//! (core NATS loses what was on the wire when a link drops).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use pagemesh_shared::wire::{Endpoint, Topic};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::bus::Bus;

/// How long after NATS comes back a publisher to clients holds its messages
/// ([`OrderedPublisher::start_for_clients`]): clients reconnect on their own schedule (nats-py
/// retries every 2 s by default), and what reaches the server before a client has subscribed
/// again is lost.
pub const CLIENT_REJOIN_GRACE: Duration = Duration::from_secs(3);

/// Messages a publisher to clients sent this long before its link to NATS was lost are
/// published again once the link is back: they may have been on the wire when it dropped.
/// Receivers drop what they already have (chunks by their index, acks by their position).
pub const REPLAY_WINDOW: Duration = Duration::from_secs(5);

/// At most this many recent messages are kept for publishing again.
pub const MAX_REPLAYED_MESSAGES: usize = 4096;

/// At most this many bytes of recent messages are kept for publishing again.
pub const MAX_REPLAYED_BYTES: usize = 16 << 20;

/// A message queued for publishing.
#[derive(Clone)]
struct Outgoing {
    subject: String,
    headers: Option<async_nats::HeaderMap>,
    payload: bytes::Bytes,
}

/// Publishes messages strictly in the order they are handed over (one task drains a queue),
/// for senders whose messages to one subscriber must not overtake each other.
#[derive(Clone)]
pub struct OrderedPublisher {
    queue: tokio::sync::mpsc::UnboundedSender<Outgoing>,
}

/// What woke the draining task.
enum Wake {
    /// A message to publish (None: every sender is gone).
    Message(Option<Outgoing>),
    /// The link to NATS was lost.
    LinkLost,
    /// The bus that reports losses is gone.
    LossesGone,
}

impl OrderedPublisher {
    /// Starts the draining task on the current runtime.
    pub fn start(bus: &Bus) -> Self {
        Self::start_gated(bus, None)
    }

    /// [`start`](Self::start), for messages to clients' inboxes (and what must follow them):
    /// after the link to NATS was lost, nothing goes out before it has been back for `grace`
    /// ([`Bus::wait_until_rejoined`]); meanwhile messages wait here, in order. Then what was
    /// published in the [`REPLAY_WINDOW`] before the loss goes out again, ahead of the rest.
    pub fn start_for_clients(bus: &Bus, grace: Duration) -> Self {
        Self::start_gated(bus, Some(grace))
    }

    fn start_gated(bus: &Bus, grace: Option<Duration>) -> Self {
        let (queue, mut receiver) = tokio::sync::mpsc::unbounded_channel::<Outgoing>();
        let client = bus.client.clone();
        let gate = grace.map(|grace| (bus.clone(), grace));
        let mut losses = gate.as_ref().map(|(bus, _)| bus.last_loss());
        actix_rt::spawn(async move {
            let mut recent = RecentMessages::new(REPLAY_WINDOW, MAX_REPLAYED_MESSAGES, MAX_REPLAYED_BYTES);
            loop {
                let wake = match losses.as_mut() {
                    Some(watch) => tokio::select! {
                        biased;
                        changed = watch.changed() => if changed.is_ok() { Wake::LinkLost } else { Wake::LossesGone },
                        message = receiver.recv() => Wake::Message(message),
                    },
                    None => Wake::Message(receiver.recv().await),
                };
                let (message, lost_at) = match wake {
                    Wake::Message(None) => break,
                    Wake::LossesGone => {
                        losses = None;
                        continue;
                    }
                    Wake::LinkLost => (None, losses.as_mut().and_then(|w| *w.borrow_and_update())),
                    Wake::Message(Some(message)) => {
                        let lost = losses.as_mut().filter(|w| w.has_changed().unwrap_or(false));
                        (Some(message), lost.and_then(|w| *w.borrow_and_update()))
                    }
                };
                if let Some((bus, grace)) = &gate {
                    bus.wait_until_rejoined(*grace).await;
                }
                if let Some(lost_at) = lost_at {
                    let again: Vec<Outgoing> = recent.sent_before(lost_at).cloned().collect();
                    if !again.is_empty() {
                        tracing::info!("the link to NATS came back: {} recent messages published again", again.len());
                    }
                    for message in again {
                        send(&client, message).await;
                    }
                }
                if let Some(message) = message {
                    if gate.is_some() {
                        recent.push(Instant::now(), message.clone());
                    }
                    send(&client, message).await;
                }
            }
        });
        Self { queue }
    }

    /// Queues a message for its topic.
    pub fn publish<M: Serialize + DeserializeOwned>(&self, topic: &Topic<M>, message: &M) {
        match topic.encode(message) {
            Ok(payload) => self.publish_bytes(topic.subject().to_string(), None, payload),
            Err(e) => tracing::warn!("{e}"),
        }
    }

    /// Queues a message about one request, naming it in its headers ([`crate::trace`]).
    pub fn publish_about<M: Serialize + DeserializeOwned>(&self, topic: &Topic<M>, message: &M, request_id: &str) {
        match topic.encode(message) {
            Ok(payload) => {
                let headers = Some(crate::trace::headers(request_id)).filter(|h| !h.is_empty());
                self.publish_bytes(topic.subject().to_string(), headers, payload)
            }
            Err(e) => tracing::warn!("{e}"),
        }
    }

    /// Queues the answer to a request of `endpoint`, for its reply subject.
    pub fn respond<Req, Resp>(&self, endpoint: &Endpoint<Req, Resp>, reply: String, response: &Resp)
    where
        Req: Serialize + DeserializeOwned,
        Resp: Serialize + DeserializeOwned,
    {
        match endpoint.encode_response(response) {
            Ok(payload) => self.publish_bytes(reply, None, payload),
            Err(e) => tracing::warn!("{e}"),
        }
    }

    fn publish_bytes(&self, subject: String, headers: Option<async_nats::HeaderMap>, payload: Vec<u8>) {
        let message = Outgoing { subject, headers, payload: payload.into() };
        if self.queue.send(message).is_err() {
            tracing::warn!("the publisher has stopped");
        }
    }
}

async fn send(client: &async_nats::Client, message: Outgoing) {
    let Outgoing { subject, headers, payload } = message;
    let sent = match headers {
        Some(headers) => client.publish_with_headers(subject.clone(), headers, payload).await,
        None => client.publish(subject.clone(), payload).await,
    };
    if let Err(e) = sent {
        tracing::warn!("publish on {subject} failed: {e}");
    }
}

/// The messages published in the last `window`, oldest first, bounded in count and bytes.
struct RecentMessages<T = Outgoing> {
    window: Duration,
    max_messages: usize,
    max_bytes: usize,
    bytes: usize,
    messages: VecDeque<(Instant, usize, T)>,
}

/// A message's size, as it counts against [`RecentMessages`]'s byte bound.
trait MessageSize {
    fn size(&self) -> usize;
}

impl MessageSize for Outgoing {
    fn size(&self) -> usize {
        self.subject.len() + self.payload.len()
    }
}

impl<T: MessageSize> RecentMessages<T> {
    fn new(window: Duration, max_messages: usize, max_bytes: usize) -> Self {
        Self { window, max_messages, max_bytes, bytes: 0, messages: VecDeque::new() }
    }

    /// Records a message published at `at` and forgets those older than the window before
    /// it, and the oldest beyond the bounds.
    fn push(&mut self, at: Instant, message: T) {
        let size = message.size();
        self.bytes += size;
        self.messages.push_back((at, size, message));
        while let Some((oldest, size, _)) = self.messages.front() {
            let expired = at.saturating_duration_since(*oldest) > self.window;
            if !expired && self.messages.len() <= self.max_messages && self.bytes <= self.max_bytes {
                break;
            }
            self.bytes -= size;
            self.messages.pop_front();
        }
    }

    /// The messages published in the window before `lost_at` (or after it), oldest first.
    fn sent_before(&self, lost_at: Instant) -> impl Iterator<Item = &T> {
        self.messages
            .iter()
            .filter(move |(at, _, _)| lost_at.saturating_duration_since(*at) <= self.window)
            .map(|m| &m.2)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    impl MessageSize for &'static str {
        fn size(&self) -> usize {
            self.len()
        }
    }

    fn kept(recent: &RecentMessages<&'static str>, lost_at: Instant) -> Vec<&'static str> {
        recent.sent_before(lost_at).copied().collect()
    }

    #[test]
    fn what_was_sent_in_the_window_before_a_loss_is_kept_in_order() {
        let start = Instant::now();
        let mut recent = RecentMessages::new(Duration::from_secs(5), 100, 1000);
        for (second, message) in [(0, "a"), (3, "b"), (6, "c"), (7, "d")] {
            recent.push(start + Duration::from_secs(second), message);
        }
        // "a" fell out when "c" came (6 s > 5 s); a loss at 10 s covers what came from 5 s on.
        assert_eq!(kept(&recent, start + Duration::from_secs(10)), ["c", "d"]);
        assert_eq!(kept(&recent, start + Duration::from_secs(8)), ["b", "c", "d"]);
        // A loss long after the last message (nothing recent): nothing goes out again.
        assert!(kept(&recent, start + Duration::from_secs(60)).is_empty());
    }

    #[test]
    fn the_oldest_messages_go_beyond_the_count_or_byte_bound() {
        let now = Instant::now();
        let mut by_count = RecentMessages::new(Duration::from_secs(5), 2, 1000);
        for message in ["a", "b", "c"] {
            by_count.push(now, message);
        }
        assert_eq!(kept(&by_count, now), ["b", "c"]);

        let mut by_bytes = RecentMessages::new(Duration::from_secs(5), 100, 5);
        for message in ["aa", "bb", "cc"] {
            by_bytes.push(now, message);
        }
        assert_eq!(kept(&by_bytes, now), ["bb", "cc"]);
        assert_eq!(by_bytes.bytes, 4);
    }
}
