//! Summaries of latency samples.

use serde::Serialize;

/// Mean, median and tail of a set of samples (seconds).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Summary {
    /// Arithmetic mean.
    pub mean: f64,
    /// 50th percentile.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Largest sample.
    pub max: f64,
}

/// The `q` quantile (0..=1) of sorted samples, by linear interpolation.
pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let pos = q.clamp(0.0, 1.0) * (sorted.len() - 1) as f64;
    let lo = pos.floor() as usize;
    let hi = pos.ceil() as usize;
    sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo as f64)
}

/// Summarizes `samples` (all zeros when empty).
pub fn summarize(mut samples: Vec<f64>) -> Summary {
    if samples.is_empty() {
        return Summary::default();
    }
    samples.sort_by(f64::total_cmp);
    Summary {
        mean: samples.iter().sum::<f64>() / samples.len() as f64,
        p50: quantile(&samples, 0.5),
        p90: quantile(&samples, 0.9),
        p99: quantile(&samples, 0.99),
        max: samples[samples.len() - 1],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_interpolate_between_samples() {
        let s = summarize((1..=101).rev().map(f64::from).collect());
        assert_eq!((s.p50, s.p90, s.p99, s.max, s.mean), (51.0, 91.0, 100.0, 101.0, 51.0));
        assert_eq!(quantile(&[1.0, 2.0], 0.5), 1.5);
        assert_eq!(summarize(Vec::new()), Summary::default());
    }
}
