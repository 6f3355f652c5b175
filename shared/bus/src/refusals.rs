//! Counting and logging messages a service refuses: every receiver validates what arrives over
//! NATS, and each refusal is counted in `pagemesh_invalid_messages_total{service, message}`.
//! Logging is rate-limited, so that a flood of hostile messages cannot flood the log too.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use pagemesh_shared::metrics::{self as names, labels};

/// Seconds between two logged refusals of one process.
const LOG_INTERVAL_S: u64 = 5;

static LAST_LOGGED: AtomicU64 = AtomicU64::new(0);

/// Exports the refusal counters of `service` at 0 for each message kind it receives, so that
/// their rates are defined before the first refusal.
pub fn register(service: &'static str, messages: &[&'static str]) {
    for &message in messages {
        metrics::counter!(names::INVALID_MESSAGES, labels::SERVICE => service, labels::MESSAGE => message).absolute(0);
    }
}

/// Counts a refused message of kind `message` received by `service`, and logs `why` unless
/// another refusal was logged in the last few seconds.
pub fn refuse(service: &'static str, message: &'static str, why: &str) {
    metrics::counter!(names::INVALID_MESSAGES, labels::SERVICE => service, labels::MESSAGE => message).increment(1);
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let last = LAST_LOGGED.load(Ordering::Relaxed);
    if now >= last + LOG_INTERVAL_S
        && LAST_LOGGED.compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed).is_ok()
    {
        let why: String = why.chars().take(200).collect();
        tracing::warn!("{service}: refused a {message} message: {why}");
    }
}
