//! Synthetic serving workloads: prompt and output lengths and arrival times.
//!
//! * `sharegpt`: lengths like the ShareGPT conversations used to evaluate PagedAttention
//!   (mean about 161 prompt and 338 output tokens, long-tailed): log-normal draws.
//! * `alpaca`: short instructions (mean about 19 prompt and 58 output tokens).
//! * a JSONL dataset: one request per line, `{"prompt_len": N, "output_len": M}` or
//!   `{"prompt": "text", "output_len": M}` (`max_tokens` is accepted for `output_len`).
//!
//! Arrivals are a Poisson process at `request_rate` requests/s (all at time 0 when the
//! rate is infinite).

use std::path::Path;

use serde::Deserialize;

use crate::rng::Rng;

/// One request of a workload.
#[derive(Debug, Clone, PartialEq)]
pub struct RequestSpec {
    /// Seconds after the start at which it arrives.
    pub arrival_s: f64,
    /// Prompt tokens.
    pub prompt_len: usize,
    /// Tokens to generate.
    pub output_len: usize,
    /// The prompt's text, when the dataset gives one.
    pub prompt: Option<String>,
}

/// A named synthetic length distribution.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LengthDistribution {
    /// Mean prompt length.
    pub prompt_mean: f64,
    /// Log-normal shape of prompt lengths.
    pub prompt_sigma: f64,
    /// Mean output length.
    pub output_mean: f64,
    /// Log-normal shape of output lengths.
    pub output_sigma: f64,
}

/// ShareGPT-like lengths.
pub const SHAREGPT: LengthDistribution =
    LengthDistribution { prompt_mean: 161.0, prompt_sigma: 1.0, output_mean: 338.0, output_sigma: 0.9 };
/// Alpaca-like lengths.
pub const ALPACA: LengthDistribution =
    LengthDistribution { prompt_mean: 19.3, prompt_sigma: 0.6, output_mean: 58.5, output_sigma: 0.8 };

/// Where a workload's lengths come from.
#[derive(Debug, Clone, PartialEq)]
pub enum WorkloadSource {
    /// Drawn from a distribution.
    Synthetic(LengthDistribution),
    /// Read from a JSONL file (cycled when more requests are asked for than it holds).
    Dataset(Vec<DatasetEntry>),
}

impl WorkloadSource {
    /// `sharegpt`, `alpaca`, or a path to a JSONL file.
    pub fn parse(name: &str) -> Result<Self, String> {
        match name {
            "sharegpt" => Ok(Self::Synthetic(SHAREGPT)),
            "alpaca" => Ok(Self::Synthetic(ALPACA)),
            path => load_jsonl(Path::new(path)).map(Self::Dataset),
        }
    }
}

/// One line of a JSONL dataset.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetEntry {
    /// The prompt's text.
    #[serde(default)]
    pub prompt: Option<String>,
    /// The prompt's length in tokens (required when there is no text).
    #[serde(default)]
    pub prompt_len: Option<usize>,
    /// Tokens to generate.
    #[serde(alias = "max_tokens")]
    pub output_len: usize,
}

/// Reads a JSONL dataset; errors name the line.
pub fn load_jsonl(path: &Path) -> Result<Vec<DatasetEntry>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        format!("cannot read workload '{}' (expected sharegpt, alpaca or a JSONL file): {e}", path.display())
    })?;
    let mut entries = Vec::new();
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let entry: DatasetEntry =
            serde_json::from_str(line).map_err(|e| format!("{} line {}: {e}", path.display(), i + 1))?;
        if entry.prompt.is_none() && entry.prompt_len.is_none() {
            return Err(format!("{} line {}: needs `prompt` or `prompt_len`", path.display(), i + 1));
        }
        if entry.output_len == 0 || entry.prompt_len == Some(0) || entry.prompt.as_deref() == Some("") {
            return Err(format!("{} line {}: empty prompt or output_len 0", path.display(), i + 1));
        }
        entries.push(entry);
    }
    if entries.is_empty() {
        return Err(format!("{} holds no requests", path.display()));
    }
    Ok(entries)
}

/// Draws `num_requests` requests whose prompt + output fit `max_len` tokens, arriving at
/// `request_rate` per second (Poisson; `f64::INFINITY`: all at once). The lengths depend on
/// `seed` only, not on the rate.
pub fn generate(
    source: &WorkloadSource,
    num_requests: usize,
    request_rate: f64,
    max_len: usize,
    seed: u64,
) -> Vec<RequestSpec> {
    // Separate streams, so that the lengths do not depend on the arrival rate.
    let mut rng = Rng::new(seed);
    let mut arrivals = Rng::new(seed ^ 0xA55A_A55A_A55A_A55A);
    let mut arrival = 0.0;
    let max_len = max_len.max(2);
    (0..num_requests)
        .map(|i| {
            if request_rate.is_finite() && i > 0 {
                arrival += arrivals.exponential(request_rate);
            }
            let (prompt_len, output_len, prompt) = match source {
                WorkloadSource::Synthetic(d) => {
                    let p = rng.lognormal(d.prompt_mean, d.prompt_sigma).round() as usize;
                    let o = rng.lognormal(d.output_mean, d.output_sigma).round() as usize;
                    (p, o, None)
                }
                WorkloadSource::Dataset(entries) => {
                    let e = &entries[i % entries.len()];
                    let len = e.prompt_len.or_else(|| e.prompt.as_deref().map(estimate_tokens)).unwrap_or(1);
                    (len, e.output_len, e.prompt.clone())
                }
            };
            let prompt_len = prompt_len.clamp(1, max_len - 1);
            let output_len = output_len.clamp(1, max_len - prompt_len);
            RequestSpec { arrival_s: arrival, prompt_len, output_len, prompt }
        })
        .collect()
}

/// A rough token count of English text (4 characters a token), for datasets that give
/// text only.
pub fn estimate_tokens(text: &str) -> usize {
    text.chars().count().div_ceil(4).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mean(v: impl Iterator<Item = usize>) -> f64 {
        let v: Vec<usize> = v.collect();
        v.iter().sum::<usize>() as f64 / v.len() as f64
    }

    #[test]
    fn sharegpt_like_lengths_have_sharegpts_means_and_fit_the_context() {
        let reqs = generate(&WorkloadSource::Synthetic(SHAREGPT), 20_000, f64::INFINITY, 2048, 1);
        let p = mean(reqs.iter().map(|r| r.prompt_len));
        let o = mean(reqs.iter().map(|r| r.output_len));
        assert!((145.0..175.0).contains(&p), "prompt mean {p}");
        assert!((310.0..360.0).contains(&o), "output mean {o}");
        assert!(reqs.iter().all(|r| r.prompt_len + r.output_len <= 2048 && r.arrival_s == 0.0));
        let long = reqs.iter().filter(|r| r.output_len > 1000).count();
        assert!(long > 100, "a long tail: {long} outputs over 1000 tokens");
    }

    #[test]
    fn poisson_arrivals_come_at_the_requested_rate() {
        let reqs = generate(&WorkloadSource::Synthetic(ALPACA), 10_000, 20.0, 2048, 2);
        let span = reqs.last().map_or(0.0, |r| r.arrival_s);
        let rate = (reqs.len() - 1) as f64 / span;
        assert!((rate - 20.0).abs() < 1.0, "{rate} req/s");
        assert!(reqs.windows(2).all(|w| w[0].arrival_s <= w[1].arrival_s));
        assert_eq!(reqs, generate(&WorkloadSource::Synthetic(ALPACA), 10_000, 20.0, 2048, 2), "seeded");
        let at_once = generate(&WorkloadSource::Synthetic(ALPACA), 10_000, f64::INFINITY, 2048, 2);
        let lengths = |r: &[RequestSpec]| r.iter().map(|q| (q.prompt_len, q.output_len)).collect::<Vec<_>>();
        assert_eq!(lengths(&reqs), lengths(&at_once), "lengths do not depend on the rate");
    }

    #[test]
    fn jsonl_datasets_are_read_and_bad_lines_named() {
        let dir = std::env::temp_dir().join(format!("pagemesh-workload-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let good = dir.join("good.jsonl");
        std::fs::write(
            &good,
            "{\"prompt_len\": 10, \"output_len\": 5}\n\n{\"prompt\": \"Tell me a story\", \"max_tokens\": 7}\n",
        )
        .expect("write");
        let source = WorkloadSource::parse(good.to_str().expect("utf-8 path")).expect("valid dataset");
        let reqs = generate(&source, 3, f64::INFINITY, 2048, 0);
        assert_eq!(
            reqs.iter().map(|r| (r.prompt_len, r.output_len)).collect::<Vec<_>>(),
            vec![(10, 5), (4, 7), (10, 5)]
        );
        let bad = dir.join("bad.jsonl");
        std::fs::write(&bad, "{\"prompt_len\": 10, \"output_len\": 5}\n{\"output_len\": 5}\n").expect("write");
        let err = WorkloadSource::parse(bad.to_str().expect("utf-8 path")).expect_err("no prompt");
        assert!(err.contains("line 2"), "{err}");
        assert!(WorkloadSource::parse("/nonexistent/x.jsonl").expect_err("missing").contains("sharegpt"));
        std::fs::remove_dir_all(&dir).ok();
    }
}
