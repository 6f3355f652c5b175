//! How a detokenizer notices events it missed (lost on the bus while it was reconnecting) and
//! asks for them: every token event carries its position in its sample, so an event already
//! had is skipped and one past a gap is held until the scheduler sends the missing ones again;
//! tokens of a stream it never opened, or a stream silent for long, make it ask too. Streams
//! it closed are remembered for a while, so that a scheduler whose last ack was lost hears it
//! again instead of reopening the stream.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use pagemesh_shared::protocol::DetokenizerAck;

/// Shortest time between two asks for one stream.
pub const ASK_INTERVAL: Duration = Duration::from_millis(500);

/// How long a stream may hear nothing before its detokenizer asks whether anything was lost
/// (its end, e.g.): a request waiting its turn is silent too, so this is long.
pub const SILENCE_BEFORE_ASKING: Duration = Duration::from_secs(10);

/// Streams closed lately whose final ack is kept.
pub const REMEMBERED_CLOSED_STREAMS: usize = 4096;

/// Streams never opened here that tokens came for, remembered to space the asks for them.
pub const REMEMBERED_UNKNOWN_STREAMS: usize = 4096;

/// What to do with a token event of a sample that has received `received` tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arrival {
    /// The next one: apply it.
    Next,
    /// Had already (sent again): skip it.
    Repeat,
    /// Some before it are missing: hold it (it comes again with them) and ask.
    Gap,
}

/// Places an event at `position` in a sample that has `received` tokens (and is over when
/// `finished`).
pub fn arrival(position: u32, received: usize, finished: bool) -> Arrival {
    let position = position as usize;
    if finished || position < received {
        Arrival::Repeat
    } else if position == received {
        Arrival::Next
    } else {
        Arrival::Gap
    }
}

/// The final acks of streams closed lately (oldest forgotten first).
#[derive(Debug, Default)]
pub struct ClosedStreams {
    order: VecDeque<String>,
    acks: HashMap<String, DetokenizerAck>,
}

impl ClosedStreams {
    /// Remembers a stream's final ack.
    pub fn remember(&mut self, ack: DetokenizerAck) {
        if self.acks.insert(ack.request_id.clone(), ack.clone()).is_none() {
            self.order.push_back(ack.request_id);
        }
        while self.order.len() > REMEMBERED_CLOSED_STREAMS {
            if let Some(oldest) = self.order.pop_front() {
                self.acks.remove(&oldest);
            }
        }
    }

    /// The final ack of a stream closed lately.
    pub fn get(&self, request_id: &str) -> Option<&DetokenizerAck> {
        self.acks.get(request_id)
    }
}

/// When each stream not held here was last asked for, bounded.
#[derive(Debug, Default)]
pub struct UnknownStreams {
    asked: HashMap<String, Instant>,
}

impl UnknownStreams {
    /// Whether to ask for `request_id` at `now` (not asked within [`ASK_INTERVAL`], and room
    /// to remember it); if so, remembers it.
    pub fn should_ask(&mut self, request_id: &str, now: Instant) -> bool {
        if self.asked.get(request_id).is_some_and(|at| now.duration_since(*at) < ASK_INTERVAL) {
            return false;
        }
        if self.asked.len() >= REMEMBERED_UNKNOWN_STREAMS {
            self.asked.retain(|_, at| now.duration_since(*at) < ASK_INTERVAL);
            if self.asked.len() >= REMEMBERED_UNKNOWN_STREAMS {
                return false;
            }
        }
        self.asked.insert(request_id.to_string(), now);
        true
    }

    /// Forgets a stream that is held here now.
    pub fn opened(&mut self, request_id: &str) {
        self.asked.remove(request_id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_applied_in_order_repeats_skipped_gaps_held() {
        assert_eq!(arrival(3, 3, false), Arrival::Next);
        assert_eq!(arrival(2, 3, false), Arrival::Repeat);
        assert_eq!(arrival(5, 3, false), Arrival::Gap);
        assert_eq!(arrival(3, 3, true), Arrival::Repeat);
    }

    fn ack(id: &str) -> DetokenizerAck {
        DetokenizerAck { request_id: id.into(), next_index: 2, consumed: vec![1], closed: vec![true], ask: None }
    }

    #[test]
    fn closed_streams_are_remembered_up_to_a_bound() {
        let mut closed = ClosedStreams::default();
        for i in 0..REMEMBERED_CLOSED_STREAMS + 1 {
            closed.remember(ack(&format!("r{i}")));
        }
        assert!(closed.get("r0").is_none());
        assert_eq!(closed.get("r1"), Some(&ack("r1")));
        assert_eq!(closed.order.len(), REMEMBERED_CLOSED_STREAMS);
    }

    #[test]
    fn asks_for_unknown_streams_are_spaced_and_bounded() {
        let mut unknown = UnknownStreams::default();
        let t0 = Instant::now();
        assert!(unknown.should_ask("a", t0));
        assert!(!unknown.should_ask("a", t0 + ASK_INTERVAL / 2));
        assert!(unknown.should_ask("a", t0 + ASK_INTERVAL));
        for i in 0..REMEMBERED_UNKNOWN_STREAMS {
            unknown.should_ask(&format!("x{i}"), t0 + ASK_INTERVAL);
        }
        assert!(!unknown.should_ask("new", t0 + ASK_INTERVAL));
        assert!(unknown.should_ask("new", t0 + 3 * ASK_INTERVAL));
    }
}
