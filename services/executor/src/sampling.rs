//! Choosing the next token from logits: bans, logit bias, penalties, greedy, temperature, top-k, top-p, min-p,
//! seeded randomness and log-probabilities.
//!
//! Randomness is a pure function of (request seed, sample index, output position), so the same
//! seed gives the same tokens whatever else is in the batch, and a preempted, recomputed or
//! migrated sequence continues its stream exactly.

use pagemesh_shared::{SampleSpec, SampledToken, SamplingParams};

/// SplitMix64: a small, fast, well-mixed generator.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// The uniform draw in `[0, 1)` of one sample's token at one output position.
pub fn uniform(seed: u64, sample_index: u32, output_pos: usize) -> f64 {
    let mut rng = SplitMix64(seed ^ 0x5851_F42D_4C95_7F2D);
    let a = rng.next();
    let mut rng = SplitMix64(a ^ (sample_index as u64).wrapping_mul(0xD6E8_FEB8_6659_FD93));
    let b = rng.next();
    let mut rng = SplitMix64(b ^ (output_pos as u64).wrapping_mul(0xA076_1D64_78BD_642F));
    (rng.next() >> 11) as f64 / (1u64 << 53) as f64
}

/// Applies repetition (prompt + output), presence and frequency (output) penalties in place.
pub fn apply_penalties(logits: &mut [f32], params: &SamplingParams, history: &[u32], prompt_len: usize) {
    if !params.has_penalties() {
        return;
    }
    let vocab = logits.len();
    if params.repetition_penalty != 1.0 {
        let mut seen = vec![false; vocab];
        for &t in history {
            if let Some(s) = seen.get_mut(t as usize) {
                *s = true;
            }
        }
        let p = params.repetition_penalty;
        for (l, s) in logits.iter_mut().zip(seen) {
            if s {
                *l = if *l > 0.0 { *l / p } else { *l * p };
            }
        }
    }
    if params.presence_penalty != 0.0 || params.frequency_penalty != 0.0 {
        let mut counts = vec![0u32; vocab];
        for &t in history.iter().skip(prompt_len) {
            if let Some(c) = counts.get_mut(t as usize) {
                *c += 1;
            }
        }
        for (l, c) in logits.iter_mut().zip(counts) {
            if c > 0 {
                *l -= params.frequency_penalty * c as f32 + params.presence_penalty;
            }
        }
    }
}

/// Index of the largest value; the lowest index among equal maxima.
pub fn argmax(values: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in values.iter().enumerate() {
        if v > values[best] {
            best = i;
        }
    }
    best
}

/// `log_softmax(logits)` (computed in f64 for accuracy, returned as f32).
pub fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = logits.iter().map(|&l| (l as f64 - max).exp()).sum();
    let log_sum = sum.ln() + max;
    logits.iter().map(|&l| (l as f64 - log_sum) as f32).collect()
}

/// The candidate probabilities after temperature, top-k, top-p and min-p, renormalized.
///
/// Candidates are in id order when no top-p cut is asked for, else most likely first (ties by
/// lower id); either order is a pure function of the logits and the parameters. Only the
/// head of the distribution that top-p needs is sorted.
pub fn filtered_distribution(logits: &[f32], params: &SamplingParams) -> Vec<(u32, f64)> {
    let t = params.temperature as f64;
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let mut probs: Vec<(u32, f64)> = logits
        .iter()
        .enumerate()
        .filter(|(_, &l)| l != f32::NEG_INFINITY)
        .map(|(i, &l)| (i as u32, ((l as f64 - max) / t).exp()))
        .collect();
    let total: f64 = probs.iter().map(|p| p.1).sum();
    for p in &mut probs {
        p.1 /= total;
    }
    let by_prob_then_id = |a: &(u32, f64), b: &(u32, f64)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
    if params.top_k > 0 && (params.top_k as usize) < probs.len() {
        let k = params.top_k as usize;
        probs.select_nth_unstable_by(k - 1, by_prob_then_id);
        probs.truncate(k);
        probs.sort_unstable_by_key(|p| p.0);
    }
    if params.top_p < 1.0 {
        let kept_mass: f64 = probs.iter().map(|p| p.1).sum();
        let target = params.top_p as f64 * kept_mass;
        let mut head = 64.min(probs.len());
        loop {
            if head < probs.len() {
                probs.select_nth_unstable_by(head - 1, by_prob_then_id);
            }
            probs[..head].sort_unstable_by(by_prob_then_id);
            let mut cumulative = 0.0;
            let cut = probs[..head].iter().position(|p| {
                cumulative += p.1;
                cumulative >= target
            });
            match cut {
                Some(i) => {
                    probs.truncate(i + 1);
                    break;
                }
                None if head == probs.len() => break,
                None => head = (head * 4).min(probs.len()),
            }
        }
    }
    if params.min_p > 0.0 {
        let top = probs.iter().map(|p| p.1).fold(0.0, f64::max);
        let threshold = params.min_p as f64 * top;
        probs.retain(|p| p.1 >= threshold);
    }
    let total: f64 = probs.iter().map(|p| p.1).sum();
    for p in &mut probs {
        p.1 /= total;
    }
    probs
}

/// Picks from a distribution (in its order) with a uniform draw `u` in `[0, 1)`.
pub fn pick(distribution: &[(u32, f64)], u: f64) -> u32 {
    let mut cumulative = 0.0;
    for &(id, p) in distribution {
        cumulative += p;
        if u < cumulative {
            return id;
        }
    }
    distribution.last().map(|d| d.0).unwrap_or(0)
}

/// Samples one token for sample `sample_index` of a sequence from its raw logits.
pub fn sample(logits: &[f32], spec: &SampleSpec, history: &[u32], sample_index: u32) -> SampledToken {
    let params = &spec.params;
    let mut processed = logits.to_vec();
    for &t in &spec.banned_tokens {
        if let Some(l) = processed.get_mut(t as usize) {
            *l = f32::NEG_INFINITY;
        }
    }
    for (&t, &bias) in &params.logit_bias {
        if let Some(l) = processed.get_mut(t as usize) {
            *l += bias;
        }
    }
    apply_penalties(&mut processed, params, history, spec.prompt_len);
    let token = if params.is_greedy() {
        argmax(&processed) as u32
    } else {
        let distribution = filtered_distribution(&processed, params);
        pick(&distribution, uniform(spec.seed, sample_index, spec.output_len))
    };
    let (logprob, top_logprobs) = match params.logprobs {
        None => (None, Vec::new()),
        Some(n) => {
            let lp = log_softmax(logits);
            let mut order: Vec<u32> = (0..lp.len() as u32).collect();
            let by_lp = |a: &u32, b: &u32| lp[*b as usize].total_cmp(&lp[*a as usize]).then(a.cmp(b));
            if n > 0 && n < order.len() {
                order.select_nth_unstable_by(n - 1, by_lp);
            }
            order.truncate(n);
            order.sort_unstable_by(by_lp);
            (Some(lp[token as usize]), order.into_iter().map(|i| (i, lp[i as usize])).collect())
        }
    };
    SampledToken { token, logprob, top_logprobs }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(params: SamplingParams) -> SampleSpec {
        SampleSpec {
            params: params.into(),
            seed: 42,
            sample_index: 0,
            num_samples: 1,
            prompt_len: 0,
            output_len: 0,
            banned_tokens: vec![],
        }
    }

    #[test]
    fn greedy_ties_go_to_the_lowest_id_and_bans_apply() {
        let logits = [1.0, 3.0, 3.0, 2.0];
        let s = sample(&logits, &spec(SamplingParams::greedy(1)), &[], 0);
        assert_eq!(s.token, 1);
        let mut sp = spec(SamplingParams::greedy(1));
        sp.banned_tokens = vec![1, 2];
        assert_eq!(sample(&logits, &sp, &[], 0).token, 3);
    }

    #[test]
    fn logit_bias_moves_the_pick_but_not_the_reported_logprobs() {
        let logits = [1.0, 3.0, 2.0, 0.5];
        let mut params = SamplingParams::greedy(1);
        params.logit_bias = [(1, -100.0), (3, 1.0)].into();
        params.logprobs = Some(1);
        let s = sample(&logits, &spec(params.clone()), &[], 0);
        assert_eq!(s.token, 2);
        // Log-probabilities are those of the model, before any processing.
        assert_eq!(s.logprob, Some(log_softmax(&logits)[2]));
        assert_eq!(s.top_logprobs[0].0, 1);
        params.logit_bias = [(3, 100.0)].into();
        assert_eq!(sample(&logits, &spec(params), &[], 0).token, 3);
        // A banned token stays banned whatever its bias.
        let mut sp = spec(SamplingParams { logit_bias: [(1, 100.0)].into(), ..SamplingParams::greedy(1) });
        sp.banned_tokens = vec![1];
        assert_eq!(sample(&logits, &sp, &[], 0).token, 2);
    }

    #[test]
    fn top_k_one_equals_greedy_at_any_temperature() {
        let logits: Vec<f32> = (0..50).map(|i| ((i * 37) % 11) as f32 * 0.3).collect();
        let greedy = argmax(&logits) as u32;
        for seed in 0..20 {
            let mut sp = spec(SamplingParams { temperature: 1.7, top_k: 1, ..Default::default() });
            sp.seed = seed;
            assert_eq!(sample(&logits, &sp, &[], 0).token, greedy);
        }
    }

    #[test]
    fn top_p_keeps_the_smallest_covering_set() {
        // probabilities 0.5, 0.25, 0.125, 0.125 at temperature 1
        let logits = [(0.5f32).ln(), (0.25f32).ln(), (0.125f32).ln(), (0.125f32).ln()];
        let params = SamplingParams { top_p: 0.7, ..Default::default() };
        let d = filtered_distribution(&logits, &params);
        assert_eq!(d.iter().map(|p| p.0).collect::<Vec<_>>(), vec![0, 1]);
        assert!((d[0].1 - 2.0 / 3.0).abs() < 1e-9 && (d[1].1 - 1.0 / 3.0).abs() < 1e-9);
        let params = SamplingParams { top_p: 0.75, ..Default::default() };
        assert_eq!(filtered_distribution(&logits, &params).len(), 2);
        let params = SamplingParams { top_p: 0.76, ..Default::default() };
        assert_eq!(filtered_distribution(&logits, &params).len(), 3);
    }

    #[test]
    fn top_p_over_a_large_vocabulary_matches_a_full_sort() {
        let logits: Vec<f32> = (0..5000).map(|i| ((i * 7919) % 1000) as f32 / 120.0).collect();
        for top_p in [0.05f32, 0.5, 0.9, 0.999] {
            let params = SamplingParams { top_p, top_k: 3000, ..Default::default() };
            let got = filtered_distribution(&logits, &params);
            let max = logits.iter().copied().fold(f32::MIN, f32::max) as f64;
            let mut all: Vec<(u32, f64)> =
                logits.iter().enumerate().map(|(i, &l)| (i as u32, (l as f64 - max).exp())).collect();
            all.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            all.truncate(3000);
            let mass: f64 = all.iter().map(|p| p.1).sum();
            let mut cumulative = 0.0;
            let keep = all.iter().position(|p| {
                cumulative += p.1 / mass;
                cumulative >= top_p as f64
            });
            let want: Vec<u32> = all[..=keep.expect("reached")].iter().map(|p| p.0).collect();
            assert_eq!(got.iter().map(|p| p.0).collect::<Vec<_>>(), want, "top_p {top_p}");
        }
    }

    #[test]
    fn min_p_drops_tokens_below_the_scaled_top_probability() {
        let logits = [(0.5f32).ln(), (0.25f32).ln(), (0.125f32).ln(), (0.125f32).ln()];
        let params = SamplingParams { min_p: 0.3, ..Default::default() };
        let d = filtered_distribution(&logits, &params);
        // threshold 0.15: keeps 0.5 and 0.25
        assert_eq!(d.iter().map(|p| p.0).collect::<Vec<_>>(), vec![0, 1]);
    }

    #[test]
    fn penalties_follow_their_definitions() {
        let params = SamplingParams {
            repetition_penalty: 2.0,
            presence_penalty: 0.5,
            frequency_penalty: 0.25,
            ..Default::default()
        };
        let mut logits = vec![4.0, -4.0, 4.0, 1.0];
        // prompt = [0], output = [1, 1, 3]
        apply_penalties(&mut logits, &params, &[0, 1, 1, 3], 1);
        assert_eq!(logits[0], 2.0); // repetition only (prompt): 4 / 2
        assert_eq!(logits[1], -8.0 - 0.5 - 0.5); // -4 * 2, then presence 0.5 + frequency 2 * 0.25
        assert_eq!(logits[2], 4.0); // unseen
        assert_eq!(logits[3], 0.5 - 0.75); // 1 / 2, then 0.5 + 0.25
    }

    #[test]
    fn seeded_draws_are_reproducible_and_vary_with_position() {
        assert_eq!(uniform(7, 0, 3), uniform(7, 0, 3));
        assert_ne!(uniform(7, 0, 3), uniform(7, 0, 4));
        assert_ne!(uniform(7, 0, 3), uniform(7, 1, 3));
        assert_ne!(uniform(7, 0, 3), uniform(8, 0, 3));
        let mean: f64 = (0..10_000).map(|i| uniform(1, 0, i)).sum::<f64>() / 10_000.0;
        assert!((mean - 0.5).abs() < 0.02, "{mean}");
    }

    #[test]
    fn sampling_frequencies_follow_the_distribution() {
        let logits = [(0.7f32).ln(), (0.2f32).ln(), (0.1f32).ln()];
        let mut counts = [0usize; 3];
        for pos in 0..20_000 {
            let mut sp = spec(SamplingParams::default());
            sp.output_len = pos;
            counts[sample(&logits, &sp, &[], 0).token as usize] += 1;
        }
        for (c, p) in counts.iter().zip([0.7, 0.2, 0.1]) {
            assert!((*c as f64 / 20_000.0 - p).abs() < 0.02, "{counts:?}");
        }
    }

    #[test]
    fn logprobs_are_log_softmax_of_raw_logits() {
        let logits = [2.0f32, 1.0, 0.0];
        let mut sp = spec(SamplingParams { logprobs: Some(2), temperature: 0.0, ..Default::default() });
        sp.banned_tokens = vec![0];
        let s = sample(&logits, &sp, &[], 0);
        let z = (2.0f64.exp() + 1.0f64.exp() + 1.0).ln();
        assert_eq!(s.token, 1);
        assert!((s.logprob.unwrap() as f64 - (1.0 - z)).abs() < 1e-6);
        assert_eq!(s.top_logprobs.len(), 2);
        assert_eq!(s.top_logprobs[0].0, 0);
        assert!((s.top_logprobs[0].1 as f64 - (2.0 - z)).abs() < 1e-6);
    }
}
