//! The services' logs: `tracing` events on standard error, as text for people or as one JSON
//! object per line for log collectors (`--log-format human|json`), filtered by `PAGEMESH_LOG`
//! (`info,async_nats=warn` by default; `RUST_LOG` syntax, e.g. `pagemesh_scheduler=debug,warn`). Events about
//! one request carry its id in a `request_id` field, so one request can be followed across
//! services.

use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::EnvFilter;

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// One line of text per event (the default).
    #[default]
    Human,
    /// One JSON object per event: `timestamp`, `level`, `target`, `fields` (with `message`),
    /// and the enclosing `span` and its fields.
    Json,
}

/// The filter when `PAGEMESH_LOG` is unset: the services' own events, and only the NATS
/// client's warnings (it logs every connection at `info`).
pub const DEFAULT_FILTER: &str = "info,async_nats=warn";

/// The environment variable holding the filter.
pub const LOG_FILTER_ENV: &str = "PAGEMESH_LOG";

fn filter() -> EnvFilter {
    EnvFilter::try_from_env(LOG_FILTER_ENV).unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER))
}

/// A subscriber writing to `writer` in `format` (what [`init`] installs, with standard error).
pub fn subscriber<W>(format: LogFormat, writer: W) -> Box<dyn tracing::Subscriber + Send + Sync>
where
    W: for<'a> MakeWriter<'a> + Send + Sync + 'static,
{
    let builder = tracing_subscriber::fmt().with_env_filter(filter()).with_writer(writer);
    match format {
        LogFormat::Human => Box::new(builder.with_ansi(false).with_target(false).finish()),
        LogFormat::Json => Box::new(builder.json().with_current_span(true).with_span_list(false).finish()),
    }
}

/// Installs the process's logger (once; later calls keep the first).
pub fn init(format: LogFormat) {
    let _ = tracing::subscriber::set_global_default(subscriber(format, std::io::stderr));
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buffer {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().map_err(|_| std::io::Error::other("poisoned"))?.extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Buffer {
        type Writer = Buffer;
        fn make_writer(&'a self) -> Buffer {
            self.clone()
        }
    }

    fn logged(format: LogFormat) -> String {
        let buffer = Buffer::default();
        tracing::subscriber::with_default(subscriber(format, buffer.clone()), || {
            let span = tracing::info_span!("request", request_id = "cmpl-7");
            let _entered = span.enter();
            tracing::warn!(executor = "e1", "moved to another executor");
        });
        let bytes = buffer.0.lock().expect("buffer").clone();
        String::from_utf8(bytes).expect("utf-8")
    }

    #[test]
    fn json_lines_carry_the_request_id_of_their_span() {
        let text = logged(LogFormat::Json);
        let line: serde_json::Value = serde_json::from_str(text.trim()).expect("one JSON object per line");
        assert_eq!(line["level"], "WARN");
        assert_eq!(line["fields"]["message"], "moved to another executor");
        assert_eq!(line["fields"]["executor"], "e1");
        assert_eq!(line["span"]["request_id"], "cmpl-7");
    }

    #[test]
    fn human_lines_name_the_request_and_the_message() {
        let text = logged(LogFormat::Human);
        assert!(text.contains("WARN") && text.contains("request{request_id=\"cmpl-7\"}"), "{text}");
        assert!(text.contains("moved to another executor") && text.contains("executor=\"e1\""), "{text}");
    }
}
