//! The Prometheus side of a service process: one recorder per process (buckets and help texts
//! from [`pagemesh_shared::metrics`]) and the `/metrics` HTTP endpoint that renders it.
//!
//! Every service command installs the recorder at start, so the gateway (and `serve`) answer
//! `/metrics` on their API port too; `--metrics-port` adds a listener of its own.

use std::sync::OnceLock;
use std::time::Duration;

use actix_web::{web, App, HttpResponse, HttpServer};
use clap::Args;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder};
use metrics_util::MetricKindMask;
use pagemesh_shared::metrics::{self as names, labels, MetricKind};
use pagemesh_shared::protocol::ErrorKind;

/// Gauges not set for this long (those of a lost executor) leave the output.
const GAUGE_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// How often histograms are drained and the build info refreshed.
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// Flags of the metrics endpoint.
#[derive(Args, Debug, Clone, Default)]
pub struct MetricsArgs {
    /// Port of a Prometheus `/metrics` endpoint for this process (absent or 0: none; the
    /// gateway and `serve` also answer `/metrics` on their API port).
    #[arg(long, env = "PAGEMESH_METRICS_PORT")]
    pub metrics_port: Option<u16>,
    /// Address the metrics endpoint listens on.
    #[arg(long, env = "PAGEMESH_METRICS_HOST", default_value = "0.0.0.0")]
    pub metrics_host: String,
}

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// The exporter configuration: explicit buckets for every histogram, idle gauges dropped.
pub fn builder() -> Result<PrometheusBuilder, String> {
    let mut builder = PrometheusBuilder::new().idle_timeout(MetricKindMask::GAUGE, Some(GAUGE_IDLE_TIMEOUT));
    for metric in names::ALL.iter().filter(|m| m.kind == MetricKind::Histogram) {
        builder = builder
            .set_buckets_for_metric(Matcher::Full(metric.name.to_string()), metric.buckets)
            .map_err(|e| format!("metric {}: {e}", metric.name))?;
    }
    Ok(builder)
}

/// A recorder that is not installed globally (for tests and embedding).
pub fn local_recorder() -> Result<PrometheusRecorder, String> {
    Ok(builder()?.build_recorder())
}

/// Gives every metric its help text (on the current recorder).
pub fn describe_all() {
    for metric in names::ALL {
        match metric.kind {
            MetricKind::Counter => metrics::describe_counter!(metric.name, metric.help),
            MetricKind::Gauge => metrics::describe_gauge!(metric.name, metric.help),
            MetricKind::Histogram => metrics::describe_histogram!(metric.name, metric.help),
        }
    }
}

fn set_build_info(service: &str) {
    let labels = [(labels::VERSION, env!("CARGO_PKG_VERSION").to_string()), (labels::SERVICE, service.to_string())];
    metrics::gauge!(names::BUILD_INFO, &labels).set(1.0);
}

/// Installs the process's recorder (once; later calls return the same handle). `service`
/// names the process in `pagemesh_build_info`.
pub fn install(service: &str) -> Result<PrometheusHandle, String> {
    if let Some(handle) = HANDLE.get() {
        return Ok(handle.clone());
    }
    let handle = builder()?.install_recorder().map_err(|e| format!("cannot install the metrics recorder: {e}"))?;
    describe_all();
    set_build_info(service);
    Ok(HANDLE.get_or_init(|| handle).clone())
}

/// Renders the installed recorder's metrics (404 when none is installed).
pub async fn render() -> HttpResponse {
    match HANDLE.get() {
        Some(handle) => HttpResponse::Ok()
            .content_type("text/plain; version=0.0.4")
            .body(crate::vllm_names::with_vllm_names(&handle.render())),
        None => HttpResponse::NotFound().body("no metrics recorder in this process"),
    }
}

/// Drains histograms and refreshes the build info now and then (on the current actix runtime).
pub fn start_upkeep(service: &str) {
    let Some(handle) = HANDLE.get().cloned() else { return };
    let service = service.to_string();
    actix_rt::spawn(async move {
        let mut interval = tokio::time::interval(UPKEEP_INTERVAL);
        loop {
            interval.tick().await;
            handle.run_upkeep();
            set_build_info(&service);
        }
    });
}

/// Installs the recorder, starts its upkeep and, with a port, the `/metrics` listener (on the
/// current actix runtime).
pub fn start(args: &MetricsArgs, service: &str) -> Result<(), String> {
    install(service)?;
    start_upkeep(service);
    let Some(port) = args.metrics_port.filter(|p| *p != 0) else { return Ok(()) };
    let server = HttpServer::new(|| App::new().route("/metrics", web::get().to(render)))
        .workers(1)
        .disable_signals()
        .bind((args.metrics_host.as_str(), port))
        .map_err(|e| format!("cannot listen for metrics on {}:{port}: {e}", args.metrics_host))?
        .run();
    tracing::info!("metrics on http://{}:{port}/metrics", args.metrics_host);
    actix_rt::spawn(async move {
        if let Err(e) = server.await {
            tracing::warn!("the metrics endpoint stopped: {e}");
        }
    });
    Ok(())
}

/// The error counter of `model` for errors of `kind`.
pub fn error_counter(model: &str, kind: ErrorKind) -> metrics::Counter {
    let kind = serde_json::to_value(kind).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default();
    metrics::counter!(names::REQUEST_ERRORS, labels::MODEL => model.to_string(), labels::KIND => kind)
}

/// Counts an error reply of `kind` for `model`.
pub fn request_error(model: &str, kind: ErrorKind) {
    error_counter(model, kind).increment(1);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_render_with_the_shared_buckets_and_help() {
        let recorder = local_recorder().expect("valid buckets");
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, || {
            describe_all();
            metrics::histogram!(names::TIME_TO_FIRST_TOKEN, labels::MODEL => "m").record(0.03);
            metrics::counter!(names::GENERATION_TOKENS, labels::MODEL => "m", labels::EXECUTOR => "e1").increment(5);
        });
        let text = handle.render();
        assert!(text.contains("# TYPE pagemesh_time_to_first_token_seconds histogram"), "{text}");
        assert!(text.contains(r#"pagemesh_time_to_first_token_seconds_bucket{model="m",le="0.04"} 1"#), "{text}");
        assert!(text.contains(r#"pagemesh_time_to_first_token_seconds_bucket{model="m",le="0.02"} 0"#), "{text}");
        assert!(text.contains(r#"pagemesh_generation_tokens_total{model="m",executor="e1"} 5"#), "{text}");
        assert!(text.contains("# HELP pagemesh_generation_tokens_total Tokens generated."), "{text}");
    }
}
