//! Requests accepted but not yet on an executor, served round robin across clients: one
//! client's thousand requests cannot push another client's one to the back.
//!
//! A client is an API key at the gateway or a NATS client account (as the server reports it).
//! Within one client, requests keep their order.

use std::collections::{HashMap, VecDeque};

/// FIFO queues per client, taken from round robin.
#[derive(Debug)]
pub struct FairQueue<T> {
    queues: HashMap<String, VecDeque<T>>,
    /// Clients with something queued, in the order they are served next.
    ring: VecDeque<String>,
    len: usize,
}

impl<T> Default for FairQueue<T> {
    fn default() -> Self {
        Self { queues: HashMap::new(), ring: VecDeque::new(), len: 0 }
    }
}

impl<T> FairQueue<T> {
    /// Queues `item` for `client`.
    pub fn push(&mut self, client: &str, item: T) {
        let queue = self.queues.entry(client.to_string()).or_default();
        if queue.is_empty() {
            self.ring.push_back(client.to_string());
        }
        queue.push_back(item);
        self.len += 1;
    }

    /// The next item: the oldest of the client whose turn it is.
    pub fn pop(&mut self) -> Option<T> {
        let client = self.ring.pop_front()?;
        let queue = self.queues.get_mut(&client)?;
        let item = queue.pop_front();
        if queue.is_empty() {
            self.queues.remove(&client);
        } else {
            self.ring.push_back(client);
        }
        if item.is_some() {
            self.len -= 1;
        }
        item
    }

    /// Keeps only the items for which `keep` holds (order and turns kept).
    pub fn retain(&mut self, mut keep: impl FnMut(&T) -> bool) {
        for queue in self.queues.values_mut() {
            queue.retain(&mut keep);
        }
        self.queues.retain(|_, q| !q.is_empty());
        let queues = &self.queues;
        self.ring.retain(|c| queues.contains_key(c));
        self.len = self.queues.values().map(VecDeque::len).sum();
    }

    /// Every item, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = &T> {
        self.queues.values().flatten()
    }

    /// Items queued.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clients_take_turns_and_each_keeps_its_order() {
        let mut q = FairQueue::default();
        for i in 0..5 {
            q.push("flood", format!("f{i}"));
        }
        q.push("one", "o0".to_string());
        q.push("two", "t0".to_string());
        q.push("two", "t1".to_string());
        let order: Vec<String> = std::iter::from_fn(|| q.pop()).collect();
        assert_eq!(order, ["f0", "o0", "t0", "f1", "t1", "f2", "f3", "f4"]);
        assert!(q.is_empty());
        assert_eq!(q.len(), 0);
    }

    #[test]
    fn retain_drops_items_and_empty_clients() {
        let mut q = FairQueue::default();
        q.push("a", 1);
        q.push("a", 2);
        q.push("b", 3);
        q.retain(|&x| x != 1 && x != 3);
        assert_eq!(q.len(), 1);
        assert_eq!(q.iter().copied().collect::<Vec<_>>(), vec![2]);
        assert_eq!(q.pop(), Some(2));
        assert_eq!(q.pop(), None);
        q.push("b", 4);
        assert_eq!(q.pop(), Some(4), "a client that left the ring comes back");
    }
}
