//! Which scheduler serves: a pure state machine over scheduler heartbeats.
//!
//! Every scheduler instance heartbeats with its *term* and its *rank* (start time, then id).
//! A scheduler starts as a standby. It becomes active when no active scheduler has been heard
//! for the heartbeat timeout (counting only time its own link to NATS was up), taking a term
//! above every term it has seen. An active scheduler that hears another active one with a
//! higher term (or the same term and an older rank) steps down: the other one owns the
//! requests. Detokenizers follow the highest term they have heard, so that events from a
//! scheduler that was replaced are dropped.

use std::time::{Duration, Instant};

use pagemesh_shared::link::LinkState;

/// A scheduler's place in the order: older start first, then the smaller id.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Rank {
    /// Start time, milliseconds since the Unix epoch.
    pub started_ms: u64,
    /// Instance id.
    pub id: String,
}

/// What the scheduler must do after an observation or a tick.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Nothing changes.
    Stay,
    /// Serve from now on, under this term: rebuild the requests from the detokenizers.
    Activate(u64),
    /// Another scheduler serves: forget every request and watch.
    StepDown,
}

/// One scheduler's view of who serves.
#[derive(Debug, Clone)]
pub struct Leadership {
    rank: Rank,
    timeout: Duration,
    active: bool,
    term: u64,
    /// The highest term heard from any scheduler.
    highest_term: u64,
    /// When another active scheduler was last heard (or this one started).
    last_active_heard: Instant,
}

impl Leadership {
    /// A standby that takes over after `timeout` without hearing an active scheduler.
    pub fn new(rank: Rank, timeout: Duration, now: Instant) -> Self {
        Self { rank, timeout, active: false, term: 0, highest_term: 0, last_active_heard: now }
    }

    /// Whether this scheduler serves.
    pub fn is_active(&self) -> bool {
        self.active
    }

    /// This scheduler's term (0 until it first serves).
    pub fn term(&self) -> u64 {
        self.term
    }

    /// Hears another scheduler's heartbeat.
    pub fn observe(&mut self, rank: &Rank, active: bool, term: u64, now: Instant) -> Decision {
        if *rank == self.rank {
            return Decision::Stay;
        }
        self.highest_term = self.highest_term.max(term);
        if !active {
            return Decision::Stay;
        }
        if !self.active {
            self.last_active_heard = now;
            return Decision::Stay;
        }
        let other_wins = term > self.term || (term == self.term && *rank < self.rank);
        if other_wins {
            self.active = false;
            self.last_active_heard = now;
            return Decision::StepDown;
        }
        Decision::Stay
    }

    /// Checks, now, whether a standby should take over.
    pub fn tick(&mut self, link: &LinkState, now: Instant) -> Decision {
        if self.active || !link.is_silent(self.last_active_heard, now, self.timeout) {
            return Decision::Stay;
        }
        self.active = true;
        self.term = self.highest_term.saturating_add(1);
        self.highest_term = self.term;
        Decision::Activate(self.term)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rank(started_ms: u64, id: &str) -> Rank {
        Rank { started_ms, id: id.into() }
    }

    fn up(since: Instant) -> LinkState {
        LinkState { connected: true, since }
    }

    const TIMEOUT: Duration = Duration::from_secs(2);

    #[test]
    fn a_lone_scheduler_activates_after_the_timeout() {
        let t0 = Instant::now();
        let mut l = Leadership::new(rank(1, "a"), TIMEOUT, t0);
        assert_eq!(l.tick(&up(t0), t0 + Duration::from_secs(1)), Decision::Stay);
        assert_eq!(l.tick(&up(t0), t0 + Duration::from_secs(3)), Decision::Activate(1));
        assert!(l.is_active());
        assert_eq!(l.tick(&up(t0), t0 + Duration::from_secs(9)), Decision::Stay);
    }

    #[test]
    fn a_standby_waits_while_the_active_one_beats_and_takes_over_with_a_higher_term() {
        let t0 = Instant::now();
        let mut standby = Leadership::new(rank(5, "b"), TIMEOUT, t0);
        for s in 0..10 {
            let now = t0 + Duration::from_millis(500 * s);
            assert_eq!(standby.observe(&rank(1, "a"), true, 3, now), Decision::Stay);
            assert_eq!(standby.tick(&up(t0), now), Decision::Stay);
        }
        let silent_since = t0 + Duration::from_millis(4500);
        assert_eq!(standby.tick(&up(t0), silent_since + Duration::from_millis(1900)), Decision::Stay);
        assert_eq!(standby.tick(&up(t0), silent_since + Duration::from_millis(2100)), Decision::Activate(4));
    }

    #[test]
    fn silence_while_the_link_is_down_never_causes_a_takeover() {
        let t0 = Instant::now();
        let mut standby = Leadership::new(rank(5, "b"), TIMEOUT, t0);
        standby.observe(&rank(1, "a"), true, 1, t0);
        let down = LinkState { connected: false, since: t0 + Duration::from_secs(1) };
        assert_eq!(standby.tick(&down, t0 + Duration::from_secs(30)), Decision::Stay);
        // Back up at 30 s: the active one gets the full timeout to be heard again.
        let back = up(t0 + Duration::from_secs(30));
        assert_eq!(standby.tick(&back, t0 + Duration::from_secs(31)), Decision::Stay);
        standby.observe(&rank(1, "a"), true, 1, t0 + Duration::from_millis(31_500));
        assert_eq!(standby.tick(&back, t0 + Duration::from_secs(33)), Decision::Stay);
    }

    #[test]
    fn of_two_active_schedulers_the_lower_term_steps_down_then_the_younger_one() {
        let t0 = Instant::now();
        let mut old = Leadership::new(rank(1, "a"), TIMEOUT, t0);
        assert_eq!(old.tick(&up(t0), t0 + Duration::from_secs(3)), Decision::Activate(1));
        // A scheduler that took over (term 2) while `old` was cut off: `old` steps down.
        assert_eq!(old.observe(&rank(9, "z"), true, 2, t0 + Duration::from_secs(4)), Decision::StepDown);
        assert!(!old.is_active());
        // Two started at once (same term): the younger one steps down, the older stays.
        let (mut first, mut second) =
            (Leadership::new(rank(1, "a"), TIMEOUT, t0), Leadership::new(rank(1, "b"), TIMEOUT, t0));
        let later = t0 + Duration::from_secs(3);
        assert_eq!(first.tick(&up(t0), later), Decision::Activate(1));
        assert_eq!(second.tick(&up(t0), later), Decision::Activate(1));
        assert_eq!(first.observe(&rank(1, "b"), true, 1, later), Decision::Stay);
        assert_eq!(second.observe(&rank(1, "a"), true, 1, later), Decision::StepDown);
        // Its own heartbeat echoed back changes nothing.
        assert_eq!(first.observe(&rank(1, "a"), true, 1, later), Decision::Stay);
    }
}
