//! What a service knows of its own link to NATS, to judge its peers' silence fairly.

use std::time::{Duration, Instant};

/// Whether the connection to NATS is up, and since when it has been up or down.
#[derive(Debug, Clone, Copy)]
pub struct LinkState {
    /// Connected now.
    pub connected: bool,
    /// When the connection last came up or went down.
    pub since: Instant,
}

impl LinkState {
    /// Whether a peer last heard at `last_seen` has been silent for longer than `timeout` by
    /// `now`, counting only time this process was connected: while the link is down nothing
    /// can be heard, so nobody is judged silent; after it comes back, peers get `timeout`
    /// again to be heard.
    pub fn is_silent(&self, last_seen: Instant, now: Instant, timeout: Duration) -> bool {
        self.connected && now.saturating_duration_since(last_seen.max(self.since)) > timeout
    }
}
