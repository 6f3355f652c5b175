//! pagemesh's series under vLLM's names as well, so that vLLM's Grafana dashboard and tools
//! that read vLLM's metrics (autoscalers, the Gateway API Inference Extension's endpoint
//! picker) work unchanged: each series of the table below is rendered a second time (or a
//! third) as `vllm:…`, with the `model` label named `model_name` and `finish_reason` named
//! `finished_reason`, as vLLM names them. Values are the same samples, so the two views never
//! disagree.

/// pagemesh's metric → vLLM's names for it.
const ALIASES: &[(&str, &[&str])] = &[
    ("pagemesh_requests_running", &["vllm:num_requests_running"]),
    ("pagemesh_requests_waiting", &["vllm:num_requests_waiting"]),
    ("pagemesh_requests_swapped", &["vllm:num_requests_swapped"]),
    ("pagemesh_kv_usage_ratio", &["vllm:gpu_cache_usage_perc", "vllm:kv_cache_usage_perc"]),
    ("pagemesh_swap_usage_ratio", &["vllm:cpu_cache_usage_perc"]),
    ("pagemesh_preemptions_total", &["vllm:num_preemptions_total"]),
    ("pagemesh_prompt_tokens_total", &["vllm:prompt_tokens_total"]),
    ("pagemesh_generation_tokens_total", &["vllm:generation_tokens_total"]),
    ("pagemesh_prefix_cache_queried_tokens_total", &["vllm:prefix_cache_queries_total"]),
    ("pagemesh_prefix_cache_hit_tokens_total", &["vllm:prefix_cache_hits_total"]),
    ("pagemesh_requests_finished_total", &["vllm:request_success_total"]),
    ("pagemesh_time_to_first_token_seconds", &["vllm:time_to_first_token_seconds"]),
    (
        "pagemesh_inter_token_latency_seconds",
        &["vllm:time_per_output_token_seconds", "vllm:inter_token_latency_seconds"],
    ),
    ("pagemesh_e2e_request_latency_seconds", &["vllm:e2e_request_latency_seconds"]),
    ("pagemesh_queue_time_seconds", &["vllm:request_queue_time_seconds"]),
    ("pagemesh_prefill_time_seconds", &["vllm:request_prefill_time_seconds"]),
    ("pagemesh_decode_time_seconds", &["vllm:request_decode_time_seconds"]),
    ("pagemesh_request_prompt_tokens", &["vllm:request_prompt_tokens"]),
    ("pagemesh_request_generation_tokens", &["vllm:request_generation_tokens"]),
    ("pagemesh_request_max_generation_tokens", &["vllm:request_max_num_generation_tokens"]),
];

/// Label names vLLM spells differently.
const LABELS: &[(&str, &str)] = &[("model", "model_name"), ("finish_reason", "finished_reason")];

/// Suffixes of a histogram's series.
const SUFFIXES: &[&str] = &["_bucket", "_sum", "_count", ""];

/// `text` (Prometheus text format) followed by the vLLM-named copies of the series in
/// [`ALIASES`].
pub fn with_vllm_names(text: &str) -> String {
    // One block of copies per vLLM name, in the table's order.
    let names: Vec<(&str, &str)> =
        ALIASES.iter().flat_map(|(base, names)| names.iter().map(move |name| (*base, *name))).collect();
    let mut copies: Vec<Vec<String>> = vec![Vec::new(); names.len()];
    for line in text.lines() {
        let Some((metric, rest, comment)) = split_name(line) else { continue };
        let Some((base, suffix)) = alias_of(metric) else { continue };
        for (block, (_, name)) in copies.iter_mut().zip(&names).filter(|(_, (b, _))| *b == base) {
            block.push(match comment {
                Some(kind) => format!("# {kind} {name}{suffix}{rest}"),
                None => format!("{name}{suffix}{}", rename_labels(rest)),
            });
        }
    }
    let mut out = String::with_capacity(text.len() * 2);
    out.push_str(text);
    if !text.is_empty() && !text.ends_with('\n') {
        out.push('\n');
    }
    for group in copies.iter().filter(|g| !g.is_empty()) {
        out.push('\n');
        for line in group {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// A line's metric name, what follows it, and `HELP`/`TYPE` for a comment line.
fn split_name(line: &str) -> Option<(&str, &str, Option<&str>)> {
    let (body, comment) = match line.strip_prefix("# ") {
        Some(rest) => {
            let (kind, body) = rest.split_once(' ')?;
            if kind != "HELP" && kind != "TYPE" {
                return None;
            }
            (body, Some(kind))
        }
        None => (line, None),
    };
    let end = body.find(['{', ' ']).unwrap_or(body.len());
    Some((&body[..end], &body[end..], comment))
}

/// The listed metric a series name belongs to, and its histogram suffix.
fn alias_of(metric: &str) -> Option<(&'static str, &'static str)> {
    for (base, _) in ALIASES {
        for suffix in SUFFIXES {
            if metric.strip_suffix(suffix) == Some(base) {
                return Some((base, suffix));
            }
        }
    }
    None
}

/// `{labels} value` with the label names of [`LABELS`] renamed; anything it cannot read is
/// left as it is.
fn rename_labels(rest: &str) -> String {
    let Some(inner) = rest.strip_prefix('{') else { return rest.to_string() };
    let mut out = String::from("{");
    let mut chars = inner.char_indices().peekable();
    let mut name_start = 0;
    while let Some((i, c)) = chars.next() {
        match c {
            '=' => {
                let name = &inner[name_start..i];
                let renamed = LABELS.iter().find(|(from, _)| *from == name).map_or(name, |(_, to)| to);
                out.push_str(renamed);
                out.push('=');
                // The quoted value, escapes and all.
                let (mut opened, mut escaped) = (false, false);
                for (_, v) in chars.by_ref() {
                    out.push(v);
                    match (escaped, v) {
                        (false, '\\') => escaped = true,
                        (false, '"') if !opened => opened = true,
                        (false, '"') => break,
                        _ => escaped = false,
                    }
                }
            }
            ',' => {
                out.push(',');
                name_start = i + 1;
            }
            '}' => {
                out.push_str(&inner[i..]);
                return out;
            }
            _ => {}
        }
    }
    rest.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    const RENDERED: &str = "\
# HELP pagemesh_requests_running Requests running on an executor.
# TYPE pagemesh_requests_running gauge
pagemesh_requests_running{model=\"m\",executor=\"e1\"} 3
# TYPE pagemesh_requests_finished_total counter
pagemesh_requests_finished_total{model=\"a \\\"quoted\\\", name\",finish_reason=\"length\"} 7
# TYPE pagemesh_time_to_first_token_seconds histogram
pagemesh_time_to_first_token_seconds_bucket{model=\"m\",le=\"0.5\"} 2
pagemesh_time_to_first_token_seconds_sum{model=\"m\"} 0.75
pagemesh_time_to_first_token_seconds_count{model=\"m\"} 2
pagemesh_kv_usage_ratio 0.25
pagemesh_steps_total{model=\"m\"} 9
";

    #[test]
    fn listed_series_come_again_under_vllm_names_and_labels() {
        let out = with_vllm_names(RENDERED);
        assert!(out.starts_with(RENDERED), "the original text stays first and unchanged");
        for line in [
            "# TYPE vllm:num_requests_running gauge",
            "vllm:num_requests_running{model_name=\"m\",executor=\"e1\"} 3",
            "vllm:request_success_total{model_name=\"a \\\"quoted\\\", name\",finished_reason=\"length\"} 7",
            "# TYPE vllm:time_to_first_token_seconds histogram",
            "vllm:time_to_first_token_seconds_bucket{model_name=\"m\",le=\"0.5\"} 2",
            "vllm:time_to_first_token_seconds_sum{model_name=\"m\"} 0.75",
            "vllm:time_to_first_token_seconds_count{model_name=\"m\"} 2",
            "vllm:gpu_cache_usage_perc 0.25",
            "vllm:kv_cache_usage_perc 0.25",
        ] {
            assert!(out.lines().any(|l| l == line), "missing {line:?} in\n{out}");
        }
        assert!(!out.contains("vllm:steps"), "only the listed series are copied");
    }

    #[test]
    fn each_vllm_metric_is_one_block_with_its_type_first() {
        let out = with_vllm_names(RENDERED);
        let type_line = out.lines().position(|l| l == "# TYPE vllm:time_to_first_token_seconds histogram");
        let first_sample = out.lines().position(|l| l.starts_with("vllm:time_to_first_token_seconds_"));
        assert!(type_line < first_sample, "{out}");
        let kv: Vec<&str> = out.lines().filter(|l| l.contains("cache_usage_perc")).collect();
        assert_eq!(kv, ["vllm:gpu_cache_usage_perc 0.25", "vllm:kv_cache_usage_perc 0.25"]);
    }

    #[test]
    fn unreadable_labels_are_copied_as_they_are() {
        assert_eq!(rename_labels("{model=\"m\" 1"), "{model=\"m\" 1");
        assert_eq!(rename_labels(" 5"), " 5");
        assert_eq!(rename_labels("{} 5"), "{} 5");
        assert_eq!(rename_labels("{model=\"\"} 5"), "{model_name=\"\"} 5");
        assert_eq!(
            rename_labels("{model=\"a=\",finish_reason=\"x\"} 5"),
            "{model_name=\"a=\",finished_reason=\"x\"} 5"
        );
    }
}
