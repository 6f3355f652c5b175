//! The scheduler sessions an executor has served. A scheduler starts a new session on an
//! executor whenever it gives up on what the executor holds (a failed step, a new scheduler
//! taking over); the blocks of the session left behind then belong to the new one. A step of
//! a session the executor has left (delayed on the bus, or sent again by a scheduler that has
//! moved on) must therefore never run: it would write over the new session's K/V.

use std::collections::VecDeque;

/// How many left sessions are remembered (sessions change only on failures and takeovers).
pub const REMEMBERED_SESSIONS: usize = 64;

/// Where a step's session stands for an executor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionCheck {
    /// The session the executor serves now.
    Current,
    /// A session it has not seen: the scheduler started it, and the executor enters it.
    New,
    /// A session it has left: the step must not run.
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
        } else if self.left.contains(&session) {
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
    fn a_session_once_left_is_refused_and_a_new_one_is_entered() {
        let mut history = SessionHistory::default();
        assert_eq!(history.check(7), SessionCheck::New);
        history.enter(7);
        assert_eq!(history.check(7), SessionCheck::Current);
        history.enter(3);
        assert_eq!(history.check(7), SessionCheck::Left);
        assert_eq!(history.check(3), SessionCheck::Current);
        assert_eq!(history.check(9), SessionCheck::New);
    }

    #[test]
    fn only_the_latest_left_sessions_are_remembered() {
        let mut history = SessionHistory::default();
        for session in 0..=REMEMBERED_SESSIONS as u64 + 1 {
            history.enter(session);
        }
        assert_eq!(history.check(0), SessionCheck::New, "the oldest was forgotten");
        assert_eq!(history.check(1), SessionCheck::Left);
        assert_eq!(history.check(REMEMBERED_SESSIONS as u64 + 1), SessionCheck::Current);
    }
}
