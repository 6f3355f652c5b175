//! What the scheduler service records: per executor (queues, KV and swap pools, steps, batch
//! sizes, preemptions, swaps, prefix cache, tokens), per model (requests received, refused,
//! lost executors) and per request (time to first token, inter-token latency, queue, prefill
//! and end-to-end time).
//!
//! Counters the pure scheduler keeps cumulatively ([`SchedulerStats`]) are exported as the
//! difference since the last look, so an executor that registers again starts no new series.

use std::time::Instant;

use crate::{Scheduler, SchedulerStats};
use metrics::{Counter, Gauge, Histogram, Label};
use pagemesh_shared::metrics::{self as names, labels};
use pagemesh_shared::protocol::ErrorKind;
use pagemesh_shared::StepPlan;

/// Metrics of one executor's pools, queues and steps, as the scheduler sees them.
pub struct ExecutorMetrics {
    labels: Vec<Label>,
    last: SchedulerStats,
    sent_at: Option<Instant>,
    running: Gauge,
    waiting: Gauge,
    swapped: Gauge,
    kv_used: Gauge,
    kv_total: Gauge,
    kv_usage: Gauge,
    swap_used: Gauge,
    swap_total: Gauge,
    swap_usage: Gauge,
    steps: Counter,
    preempt_swap: Counter,
    preempt_recompute: Counter,
    swapped_out: Counter,
    swapped_in: Counter,
    prefix_queried: Counter,
    prefix_hit: Counter,
    prompt_tokens: Counter,
    generation_tokens: Counter,
    step_duration: Histogram,
    batch_sequences: Histogram,
    batch_tokens: Histogram,
}

impl ExecutorMetrics {
    /// The series of executor `executor` serving `model` (counters start at 0).
    pub fn new(model: &str, executor: &str) -> Self {
        let labels =
            vec![Label::new(labels::MODEL, model.to_string()), Label::new(labels::EXECUTOR, executor.to_string())];
        let with_mode = |mode: &'static str| {
            let mut l = labels.clone();
            l.push(Label::new(labels::MODE, mode));
            metrics::counter!(names::PREEMPTIONS, l)
        };
        let l = || labels.clone();
        metrics::counter!(names::MIGRATIONS, l()).absolute(0);
        Self {
            last: SchedulerStats::default(),
            sent_at: None,
            running: metrics::gauge!(names::REQUESTS_RUNNING, l()),
            waiting: metrics::gauge!(names::REQUESTS_WAITING, l()),
            swapped: metrics::gauge!(names::REQUESTS_SWAPPED, l()),
            kv_used: metrics::gauge!(names::KV_BLOCKS_USED, l()),
            kv_total: metrics::gauge!(names::KV_BLOCKS_CAPACITY, l()),
            kv_usage: metrics::gauge!(names::KV_USAGE_RATIO, l()),
            swap_used: metrics::gauge!(names::SWAP_BLOCKS_USED, l()),
            swap_total: metrics::gauge!(names::SWAP_BLOCKS_CAPACITY, l()),
            swap_usage: metrics::gauge!(names::SWAP_USAGE_RATIO, l()),
            steps: metrics::counter!(names::STEPS, l()),
            preempt_swap: with_mode("swap"),
            preempt_recompute: with_mode("recompute"),
            swapped_out: metrics::counter!(names::BLOCKS_SWAPPED_OUT, l()),
            swapped_in: metrics::counter!(names::BLOCKS_SWAPPED_IN, l()),
            prefix_queried: metrics::counter!(names::PREFIX_CACHE_QUERIED_TOKENS, l()),
            prefix_hit: metrics::counter!(names::PREFIX_CACHE_HIT_TOKENS, l()),
            prompt_tokens: metrics::counter!(names::PROMPT_TOKENS, l()),
            generation_tokens: metrics::counter!(names::GENERATION_TOKENS, l()),
            step_duration: metrics::histogram!(names::STEP_DURATION, l()),
            batch_sequences: metrics::histogram!(names::STEP_BATCH_SEQUENCES, l()),
            batch_tokens: metrics::histogram!(names::STEP_BATCH_TOKENS, l()),
            labels,
        }
    }

    /// A step goes out.
    pub fn step_sent(&mut self, plan: &StepPlan, now: Instant) {
        self.sent_at = Some(now);
        self.batch_sequences.record(plan.seqs.len() as f64);
        self.batch_tokens.record(plan.num_tokens() as f64);
    }

    /// A step came back at `now` and was fed to `core`.
    pub fn step_done(&mut self, core: &Scheduler, now: Instant) {
        if let Some(sent) = self.sent_at.take() {
            self.step_duration.record(now.saturating_duration_since(sent).as_secs_f64());
        }
        self.sync(core);
    }

    /// A request was admitted with `prompt_tokens` new prompt tokens.
    pub fn admitted(&self, prompt_tokens: usize) {
        self.prompt_tokens.increment(prompt_tokens as u64);
    }

    /// Tokens were sampled.
    pub fn generated(&self, tokens: usize) {
        self.generation_tokens.increment(tokens as u64);
    }

    /// Brings the gauges to `core`'s queues and pools and the counters to its totals.
    pub fn sync(&mut self, core: &Scheduler) {
        self.running.set(core.num_running() as f64);
        self.waiting.set(core.num_waiting() as f64);
        self.swapped.set(core.num_swapped() as f64);
        let usage = core.block_usage();
        let device_used = usage.device_total.saturating_sub(usage.device_free);
        let host_used = usage.host_total.saturating_sub(usage.host_free);
        self.kv_used.set(device_used as f64);
        self.kv_total.set(usage.device_total as f64);
        self.kv_usage.set(ratio(device_used, usage.device_total));
        self.swap_used.set(host_used as f64);
        self.swap_total.set(usage.host_total as f64);
        self.swap_usage.set(ratio(host_used, usage.host_total));
        let now = core.stats();
        let last = &self.last;
        self.steps.increment(now.steps.saturating_sub(last.steps));
        self.preempt_swap.increment(now.preemptions_swap.saturating_sub(last.preemptions_swap));
        self.preempt_recompute.increment(now.preemptions_recompute.saturating_sub(last.preemptions_recompute));
        self.swapped_out.increment(now.blocks_swapped_out.saturating_sub(last.blocks_swapped_out));
        self.swapped_in.increment(now.blocks_swapped_in.saturating_sub(last.blocks_swapped_in));
        self.prefix_queried.increment(now.prefix_cache_queried_tokens.saturating_sub(last.prefix_cache_queried_tokens));
        self.prefix_hit.increment(now.prefix_cache_hit_tokens.saturating_sub(last.prefix_cache_hit_tokens));
        self.last = now.clone();
    }

    /// The executor is gone: its queues and pools read 0 until the series expire, and the
    /// requests moved off it are counted.
    pub fn lost(&self, moved: usize) {
        for gauge in [
            &self.running,
            &self.waiting,
            &self.swapped,
            &self.kv_used,
            &self.kv_total,
            &self.kv_usage,
            &self.swap_used,
            &self.swap_total,
            &self.swap_usage,
        ] {
            gauge.set(0.0);
        }
        metrics::counter!(names::MIGRATIONS, self.labels.clone()).increment(moved as u64);
    }
}

fn ratio(used: usize, total: usize) -> f64 {
    if total == 0 {
        0.0
    } else {
        used as f64 / total as f64
    }
}

/// Metrics of the scheduler as a whole, for one model.
pub struct ModelMetrics {
    model: String,
    received: Counter,
    aborted: Counter,
    rejected: Counter,
    executors_lost: Counter,
    stale_step_replies: Counter,
    stream_resends: Counter,
    executors: Gauge,
    detokenizers: Gauge,
    unplaced: Gauge,
    ttft: Histogram,
    itl: Histogram,
    e2e: Histogram,
    queue: Histogram,
    prefill: Histogram,
    decode: Histogram,
    prompt_tokens: Histogram,
    generation_tokens: Histogram,
    max_generation_tokens: Histogram,
}

impl ModelMetrics {
    /// The series of `model` (counters start at 0).
    pub fn new(model: &str) -> Self {
        let l = || [(labels::MODEL, model.to_string())];
        for kind in [
            ErrorKind::InvalidRequest,
            ErrorKind::ModelNotFound,
            ErrorKind::Overloaded,
            ErrorKind::Unavailable,
            ErrorKind::Internal,
        ] {
            pagemesh_bus::metrics_endpoint::error_counter(model, kind).absolute(0);
        }
        let stale_step_replies = metrics::counter!(names::STALE_STEP_REPLIES, &l());
        stale_step_replies.absolute(0);
        let stream_resends = metrics::counter!(names::STREAM_RESENDS, &l());
        stream_resends.absolute(0);
        Self {
            model: model.to_string(),
            received: metrics::counter!(names::REQUESTS_RECEIVED, &l()),
            aborted: metrics::counter!(names::REQUESTS_ABORTED, &l()),
            rejected: metrics::counter!(names::REQUESTS_REJECTED, &l()),
            executors_lost: metrics::counter!(names::EXECUTORS_LOST, &l()),
            stale_step_replies,
            stream_resends,
            executors: metrics::gauge!(names::EXECUTORS, &l()),
            detokenizers: metrics::gauge!(names::DETOKENIZERS, &l()),
            unplaced: metrics::gauge!(names::REQUESTS_UNPLACED, &l()),
            ttft: metrics::histogram!(names::TIME_TO_FIRST_TOKEN, &l()),
            itl: metrics::histogram!(names::INTER_TOKEN_LATENCY, &l()),
            e2e: metrics::histogram!(names::E2E_REQUEST_LATENCY, &l()),
            queue: metrics::histogram!(names::QUEUE_TIME, &l()),
            prefill: metrics::histogram!(names::PREFILL_TIME, &l()),
            decode: metrics::histogram!(names::DECODE_TIME, &l()),
            prompt_tokens: metrics::histogram!(names::REQUEST_PROMPT_TOKENS, &l()),
            generation_tokens: metrics::histogram!(names::REQUEST_GENERATION_TOKENS, &l()),
            max_generation_tokens: metrics::histogram!(names::REQUEST_MAX_GENERATION_TOKENS, &l()),
        }
    }

    /// The served model.
    pub fn model(&self) -> &str {
        &self.model
    }

    /// A request arrived.
    pub fn received(&self) {
        self.received.increment(1);
    }

    /// An error reply went out instead of a stream (`overloaded` also counts as refused).
    pub fn error(&self, kind: ErrorKind) {
        if kind == ErrorKind::Overloaded {
            self.rejected.increment(1);
        }
        pagemesh_bus::metrics_endpoint::request_error(&self.model, kind);
    }

    /// A request ended aborted before it was scheduled (its abort came first).
    pub fn aborted(&self) {
        self.aborted.increment(1);
    }

    /// An executor was dropped.
    pub fn executor_lost(&self) {
        self.executors_lost.increment(1);
    }

    /// A step answer came too late (from an earlier slot or incarnation) and was dropped.
    pub fn stale_step_reply(&self) {
        self.stale_step_replies.increment(1);
    }

    /// A stream's events were sent to its detokenizer again.
    pub fn stream_resent(&self) {
        self.stream_resends.increment(1);
    }

    /// Registered executors and detokenizers, and requests with nowhere to run.
    pub fn population(&self, executors: usize, detokenizers: usize, unplaced: usize) {
        self.executors.set(executors as f64);
        self.detokenizers.set(detokenizers as f64);
        self.unplaced.set(unplaced as f64);
    }
}

/// A request's milestones, for its latency histograms.
#[derive(Debug, Clone, Copy)]
pub struct RequestTiming {
    arrival: Instant,
    first_scheduled: Option<Instant>,
    first_token: Option<Instant>,
    last_token: Option<Instant>,
}

impl RequestTiming {
    /// A request arriving at `now`.
    pub fn arrived(now: Instant) -> Self {
        Self { arrival: now, first_scheduled: None, first_token: None, last_token: None }
    }

    /// A step runs the request (queue time, the first time).
    pub fn scheduled(&mut self, metrics: &ModelMetrics, now: Instant) {
        if self.first_scheduled.is_none() {
            self.first_scheduled = Some(now);
            metrics.queue.record(now.duration_since(self.arrival).as_secs_f64());
        }
    }

    /// A step gave the request tokens (time to first token and prefill time the first time,
    /// inter-token latency after).
    pub fn tokens(&mut self, metrics: &ModelMetrics, now: Instant) {
        match self.last_token {
            None => {
                self.first_token = Some(now);
                metrics.ttft.record(now.duration_since(self.arrival).as_secs_f64());
                let started = self.first_scheduled.unwrap_or(self.arrival);
                metrics.prefill.record(now.duration_since(started).as_secs_f64());
            }
            Some(last) => metrics.itl.record(now.duration_since(last).as_secs_f64()),
        }
        self.last_token = Some(now);
    }

    /// The request ended on its executor at `now`, with `prompt_len` prompt tokens and its
    /// samples' generated token counts.
    pub fn finished(&self, metrics: &ModelMetrics, now: Instant, prompt_len: usize, generated: &[usize]) {
        metrics.e2e.record(now.saturating_duration_since(self.arrival).as_secs_f64());
        if let Some(first) = self.first_token {
            metrics.decode.record(now.saturating_duration_since(first).as_secs_f64());
        }
        metrics.prompt_tokens.record(prompt_len as f64);
        metrics.generation_tokens.record(generated.iter().sum::<usize>() as f64);
        metrics.max_generation_tokens.record(generated.iter().copied().max().unwrap_or(0) as f64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pagemesh_bus::metrics_endpoint::local_recorder;

    #[test]
    fn request_milestones_feed_the_latency_histograms() {
        let recorder = local_recorder().expect("recorder");
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, || {
            let model = ModelMetrics::new("m");
            let t0 = Instant::now();
            let mut timing = RequestTiming::arrived(t0);
            timing.scheduled(&model, t0);
            timing.scheduled(&model, t0);
            timing.tokens(&model, t0 + std::time::Duration::from_millis(30));
            timing.tokens(&model, t0 + std::time::Duration::from_millis(40));
            timing.tokens(&model, t0 + std::time::Duration::from_millis(50));
            timing.finished(&model, t0 + std::time::Duration::from_millis(50), 7, &[3, 5]);
            model.error(ErrorKind::Overloaded);
            model.error(ErrorKind::InvalidRequest);
        });
        let text = handle.render();
        for line in [
            r#"pagemesh_queue_time_seconds_count{model="m"} 1"#,
            r#"pagemesh_time_to_first_token_seconds_count{model="m"} 1"#,
            r#"pagemesh_prefill_time_seconds_count{model="m"} 1"#,
            r#"pagemesh_inter_token_latency_seconds_count{model="m"} 2"#,
            r#"pagemesh_e2e_request_latency_seconds_count{model="m"} 1"#,
            r#"pagemesh_decode_time_seconds_count{model="m"} 1"#,
            r#"pagemesh_request_prompt_tokens_sum{model="m"} 7"#,
            r#"pagemesh_request_generation_tokens_sum{model="m"} 8"#,
            r#"pagemesh_request_max_generation_tokens_sum{model="m"} 5"#,
            r#"pagemesh_requests_rejected_total{model="m"} 1"#,
            r#"pagemesh_request_errors_total{model="m",kind="overloaded"} 1"#,
            r#"pagemesh_request_errors_total{model="m",kind="invalid_request"} 1"#,
            r#"pagemesh_executors_lost_total{model="m"} 0"#,
        ] {
            assert!(text.contains(line), "missing {line} in\n{text}");
        }
        // Prefill took 30 ms: it is in the 0.04 bucket, not the 0.02 one.
        assert!(text.contains(r#"pagemesh_prefill_time_seconds_bucket{model="m",le="0.02"} 0"#), "{text}");
        assert!(text.contains(r#"pagemesh_prefill_time_seconds_bucket{model="m",le="0.04"} 1"#), "{text}");
    }
}
