//! What a scheduler sends a detokenizer again when events of a stream went missing on the bus
//! (a detokenizer reconnecting late never got them): the tokens after a given point, each with
//! its position so that the detokenizer skips the ones it has and sees any gap, and the point a
//! stream resumes from when the detokenizer holds nothing of it. Pure functions of the
//! request's state; the actor decides when.

use std::time::{Duration, Instant};

use pagemesh_shared::protocol::{DetokenizerAck, ResumePoint, TokenEvent};
use pagemesh_shared::{FinishReason, SampledToken};

/// How long a request finished on its executor may wait for the detokenizer's last ack before
/// its tokens are sent again (the last events, or the ack, were lost).
pub const RESEND_AFTER: Duration = Duration::from_secs(2);

/// Shortest time between two resends of one stream (asks come once per gap, but a burst of
/// lost messages makes several gaps).
pub const RESEND_INTERVAL: Duration = Duration::from_millis(250);

/// The token events of every sample after its first `from[i]` tokens (all of them where
/// `from` has no entry), each with its position, the sample's last one carrying how it ended;
/// a sample that ended with no token left to send gets a finish of its own.
pub fn tokens_after(generated: &[Vec<u32>], finished: &[Option<FinishReason>], from: &[usize]) -> Vec<TokenEvent> {
    let mut events = Vec::new();
    for (i, tokens) in generated.iter().enumerate() {
        let start = from.get(i).copied().unwrap_or(0).min(tokens.len());
        let finish = finished.get(i).copied().flatten();
        let rest = &tokens[start..];
        for (k, &token) in rest.iter().enumerate() {
            let last = k + 1 == rest.len();
            events.push(TokenEvent {
                sample_index: i as u32,
                position: (start + k) as u32,
                token: Some(SampledToken { token, logprob: None, top_logprobs: Vec::new() }),
                finish: if last { finish } else { None },
            });
        }
        if rest.is_empty() && finish.is_some() {
            events.push(TokenEvent { sample_index: i as u32, position: tokens.len() as u32, token: None, finish });
        }
    }
    events
}

/// Where a stream resumes on a detokenizer that holds nothing of it: after the chunks the
/// scheduler knows were published (its last ack).
pub fn resume_point(generated: &[Vec<u32>], acked: &DetokenizerAck) -> ResumePoint {
    let consumed = generated.iter().zip(&acked.consumed).map(|(g, &n)| g[..n.min(g.len())].to_vec()).collect();
    ResumePoint { next_index: acked.next_index, consumed, closed: acked.closed.clone() }
}

/// When a stream's events were last sent again, to keep resends [`RESEND_INTERVAL`] apart.
#[derive(Debug, Clone, Copy, Default)]
pub struct ResendClock {
    last: Option<Instant>,
}

impl ResendClock {
    /// Whether a resend may go out at `now` (and if so, counts it as sent).
    pub fn allow(&mut self, now: Instant) -> bool {
        let allowed = self.last.is_none_or(|last| now.duration_since(last) >= RESEND_INTERVAL);
        if allowed {
            self.last = Some(now);
        }
        allowed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(events: &[TokenEvent]) -> Vec<(u32, u32, Option<u32>, Option<FinishReason>)> {
        events.iter().map(|e| (e.sample_index, e.position, e.token.as_ref().map(|t| t.token), e.finish)).collect()
    }

    #[test]
    fn sends_the_tokens_after_each_samples_point_with_their_positions() {
        let generated = vec![vec![10, 11, 12], vec![20]];
        let events = tokens_after(&generated, &[None, Some(FinishReason::Length)], &[1, 0]);
        assert_eq!(
            ids(&events),
            vec![(0, 1, Some(11), None), (0, 2, Some(12), None), (1, 0, Some(20), Some(FinishReason::Length))]
        );
    }

    #[test]
    fn a_sample_with_nothing_left_sends_only_how_it_ended() {
        let generated = vec![vec![10, 11], vec![20]];
        let events = tokens_after(&generated, &[Some(FinishReason::Stop), None], &[2, 1]);
        assert_eq!(ids(&events), vec![(0, 2, None, Some(FinishReason::Stop))]);
        // A point past the end (a hostile ask) is clamped.
        assert_eq!(ids(&tokens_after(&generated, &[None, None], &[9, 9])), vec![]);
    }

    #[test]
    fn resumes_after_the_acknowledged_tokens() {
        let acked = DetokenizerAck {
            request_id: "r".into(),
            next_index: 3,
            consumed: vec![1, 5],
            closed: vec![false, true],
            ask: None,
        };
        let point = resume_point(&[vec![1, 2], vec![3]], &acked);
        assert_eq!(point, ResumePoint { next_index: 3, consumed: vec![vec![1], vec![3]], closed: vec![false, true] });
    }

    #[test]
    fn resends_are_spaced() {
        let mut clock = ResendClock::default();
        let t0 = Instant::now();
        assert!(clock.allow(t0));
        assert!(!clock.allow(t0 + RESEND_INTERVAL / 2));
        assert!(clock.allow(t0 + RESEND_INTERVAL));
    }
}
