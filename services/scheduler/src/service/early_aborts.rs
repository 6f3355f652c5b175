//! Aborts that reach the scheduler before their request does (a client that gives up while its
//! prompt is still being tokenized, the other prompts of a batched request that failed): they
//! are remembered for a while, so that the request, when it arrives, ends at once instead of
//! running for a client that is gone. Bounded in time and in number: a flood of aborts for ids
//! that never come costs a fixed amount of memory.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

/// How long an abort for an unknown request is remembered.
pub const EARLY_ABORT_TTL: Duration = Duration::from_secs(60);
/// Most early aborts remembered at once (the oldest are forgotten first).
pub const EARLY_ABORT_CAPACITY: usize = 65_536;

/// Request ids aborted before they arrived.
#[derive(Debug)]
pub struct EarlyAborts {
    ttl: Duration,
    capacity: usize,
    /// When each remembered id was aborted.
    since: HashMap<String, Instant>,
    /// Ids in the order they were remembered (entries whose id was taken since are skipped).
    order: VecDeque<(String, Instant)>,
}

impl Default for EarlyAborts {
    fn default() -> Self {
        Self::new(EARLY_ABORT_TTL, EARLY_ABORT_CAPACITY)
    }
}

impl EarlyAborts {
    /// Remembers aborts for `ttl`, at most `capacity` of them.
    pub fn new(ttl: Duration, capacity: usize) -> Self {
        Self { ttl, capacity: capacity.max(1), since: HashMap::new(), order: VecDeque::new() }
    }

    /// Remembers that `request_id` was aborted at `now`.
    pub fn remember(&mut self, request_id: &str, now: Instant) {
        self.expire(now);
        if self.since.contains_key(request_id) {
            return;
        }
        while self.since.len() >= self.capacity {
            self.forget_oldest();
        }
        self.since.insert(request_id.to_string(), now);
        self.order.push_back((request_id.to_string(), now));
        if self.order.len() > 2 * self.capacity {
            // Entries of ids taken since: drop them so that the queue stays bounded too.
            let since = &self.since;
            self.order.retain(|(id, at)| since.get(id) == Some(at));
        }
    }

    /// Whether `id` is remembered (it stays remembered).
    pub fn contains(&mut self, id: &str, now: Instant) -> bool {
        self.expire(now);
        self.since.contains_key(id)
    }

    /// Whether `request_id` was aborted before it arrived; forgets it either way.
    pub fn take(&mut self, request_id: &str, now: Instant) -> bool {
        self.expire(now);
        self.since.remove(request_id).is_some()
    }

    /// Aborts remembered now.
    pub fn len(&self) -> usize {
        self.since.len()
    }

    /// Whether none is remembered.
    pub fn is_empty(&self) -> bool {
        self.since.is_empty()
    }

    fn expire(&mut self, now: Instant) {
        while self.order.front().is_some_and(|(_, at)| now.saturating_duration_since(*at) >= self.ttl) {
            self.forget_oldest();
        }
    }

    fn forget_oldest(&mut self) {
        if let Some((id, at)) = self.order.pop_front() {
            // Only if this entry is the live one (the id may have been taken and remembered again).
            if self.since.get(&id) == Some(&at) {
                self.since.remove(&id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_abort_is_taken_once_by_its_request() {
        let mut aborts = EarlyAborts::default();
        let now = Instant::now();
        aborts.remember("a", now);
        assert!(!aborts.take("b", now));
        assert!(aborts.take("a", now));
        assert!(!aborts.take("a", now), "taken once");
        assert!(aborts.is_empty());
    }

    #[test]
    fn aborts_expire_after_the_ttl() {
        let mut aborts = EarlyAborts::new(Duration::from_secs(10), 100);
        let start = Instant::now();
        aborts.remember("old", start);
        aborts.remember("new", start + Duration::from_secs(5));
        assert!(!aborts.take("old", start + Duration::from_secs(10)));
        assert!(aborts.take("new", start + Duration::from_secs(10)));
    }

    #[test]
    fn a_flood_keeps_only_the_newest_within_capacity() {
        let mut aborts = EarlyAborts::new(Duration::from_secs(60), 3);
        let now = Instant::now();
        for i in 0..10 {
            aborts.remember(&format!("r{i}"), now);
        }
        assert_eq!(aborts.len(), 3);
        assert!(aborts.order.len() <= 3);
        assert!(!aborts.take("r6", now));
        assert!(aborts.take("r9", now) && aborts.take("r7", now));
        // Remembered and taken over and over: the queue stays bounded.
        for i in 0..100 {
            aborts.remember(&format!("t{i}"), now);
            assert!(aborts.take(&format!("t{i}"), now));
        }
        assert!(aborts.order.len() <= 6);
    }

    #[test]
    fn an_id_taken_and_aborted_again_is_remembered_from_the_second_abort() {
        let mut aborts = EarlyAborts::new(Duration::from_secs(10), 100);
        let start = Instant::now();
        aborts.remember("a", start);
        assert!(aborts.take("a", start));
        aborts.remember("a", start + Duration::from_secs(8));
        // The first entry's expiry must not forget the second abort.
        assert!(aborts.take("a", start + Duration::from_secs(12)));
    }
}
