//! The scheduler sessions an executor has served. A scheduler starts a new session on an
//! executor whenever it gives up on what the executor holds (a failed step, a new scheduler
//! taking over); the blocks of the session left behind then belong to the new one. A step of
//! a session the executor has left (delayed on the bus, or sent again by a scheduler that has
//! moved on) must therefore never run: it would write over the new session's K/V.
//!
//! One scheduler numbers its sessions upwards, one by one, so a session is taken as left only
//! when it is below the current one, and either was served here or is close below (one the
//! scheduler gave up on before the executor saw it): a step of an unrelated session (another
//! scheduler's, whose numbers start elsewhere at random, or a forged one) never locks the
//! executor out of a session it served.

use std::collections::VecDeque;

/// How many left sessions are remembered (sessions change only on failures and takeovers).
pub const REMEMBERED_SESSIONS: usize = 64;

/// How far below the current session a session never seen here still counts as left: the
/// sessions one scheduler may have started and given up on in between.
pub const CLOSE_BELOW: u64 = 1 << 16;

/// Where a step's session stands for an executor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionCheck {
    /// The session the executor serves now.
    Current,
    /// A session it has not seen: the scheduler started it, and the executor enters it.
    New,
    /// A session it has left for a later one: the step must not run.
    Left,
}

/// The current session and the recently left ones.
#[derive(Debug, Default, Clone)]
pub struct SessionHistory {
    current: Option<u64>,
    left: VecDeque<u64>,
}

impl SessionHistory {
    /// Where `session` stands.
    pub fn check(&self, session: u64) -> SessionCheck {
        if self.current == Some(session) {
            SessionCheck::Current
        } else if self.current.is_some_and(|current| {
            session < current && (current - session <= CLOSE_BELOW || self.left.contains(&session))
        }) {
            SessionCheck::Left
        } else {
            SessionCheck::New
        }
    }

    /// Enters `session`, leaving the current one for good.
    pub fn enter(&mut self, session: u64) {
        if self.current == Some(session) {
            return;
        }
        if let Some(previous) = self.current.replace(session) {
            if self.left.len() == REMEMBERED_SESSIONS {
                self.left.pop_front();
            }
            self.left.push_back(previous);
        }
        self.left.retain(|&s| s != session);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_left_for_a_later_one_is_refused_and_a_new_one_is_entered() {
        let mut history = SessionHistory::default();
        assert_eq!(history.check(3), SessionCheck::New);
        history.enter(3);
        assert_eq!(history.check(3), SessionCheck::Current);
        history.enter(7);
        assert_eq!(history.check(3), SessionCheck::Left);
        assert_eq!(history.check(7), SessionCheck::Current);
        assert_eq!(history.check(9), SessionCheck::New);
    }

    #[test]
    fn an_unrelated_session_does_not_lock_out_the_one_served_before() {
        // Another scheduler's (or a forged) session, numbered below: the first one comes back.
        let mut history = SessionHistory::default();
        history.enter(1_000_000);
        history.enter(5);
        assert_eq!(history.check(1_000_000), SessionCheck::New);
        history.enter(1_000_000);
        assert_eq!(history.check(5), SessionCheck::Left);
    }

    #[test]
    fn a_session_just_below_the_current_one_is_left_even_if_never_seen() {
        let mut history = SessionHistory::default();
        history.enter(1_000_002);
        assert_eq!(history.check(1_000_000), SessionCheck::Left);
        assert_eq!(history.check(1_000_002 - CLOSE_BELOW - 1), SessionCheck::New);
    }

    #[test]
    fn only_the_latest_left_sessions_are_remembered() {
        // Sessions far apart (as after takeovers), so that only the memory of them counts.
        let session = |k: u64| k * 2 * CLOSE_BELOW;
        let mut history = SessionHistory::default();
        for k in 0..=REMEMBERED_SESSIONS as u64 + 1 {
            history.enter(session(k));
        }
        assert_eq!(history.check(session(0)), SessionCheck::New, "the oldest was forgotten");
        assert_eq!(history.check(session(1)), SessionCheck::Left);
        assert_eq!(history.check(session(REMEMBERED_SESSIONS as u64 + 1)), SessionCheck::Current);
    }
}
