//! Per-request sampling parameters (named as in the OpenAI API and vLLM) and their validation.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// How tokens are chosen for one request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SamplingParams {
    /// Number of parallel samples; they share the prompt's KV blocks.
    pub n: usize,
    /// Most tokens to generate per sample.
    pub max_tokens: usize,
    /// Fewest tokens to generate before a stop token may end a sample.
    pub min_tokens: usize,
    /// 0 means greedy (ties go to the lowest id).
    pub temperature: f32,
    /// Keep only the k most likely tokens; 0 or -1 turns it off.
    pub top_k: i64,
    /// Keep the smallest set of most likely tokens whose probability reaches `top_p`.
    pub top_p: f32,
    /// Drop tokens whose probability is below `min_p` times the top probability.
    pub min_p: f32,
    /// Multiplicative penalty (> 1 discourages) on tokens seen in the prompt or output.
    pub repetition_penalty: f32,
    /// Additive penalty on tokens present in the output.
    pub presence_penalty: f32,
    /// Penalty per occurrence of a token in the output.
    pub frequency_penalty: f32,
    /// Seed of this request's random stream: the same seed gives the same tokens whatever
    /// else is in the batch.
    pub seed: Option<u64>,
    /// Number of most likely alternatives to return with each token (`Some(0)`: only the
    /// chosen token's log-probability).
    pub logprobs: Option<usize>,
    /// Tokens that end a sample besides the model's eos.
    pub stop_token_ids: Vec<u32>,
    /// Keep going past the model's eos.
    pub ignore_eos: bool,
    /// Added to the logits of these token ids before sampling (-100 all but bans a token,
    /// 100 all but forces it), as in the OpenAI API. JSON keys are the ids as strings.
    #[serde(skip_serializing_if = "BTreeMap::is_empty", deserialize_with = "logit_bias_from_json")]
    pub logit_bias: BTreeMap<u32, f32>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            n: 1,
            max_tokens: 16,
            min_tokens: 0,
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: None,
            logprobs: None,
            stop_token_ids: Vec::new(),
            ignore_eos: false,
            logit_bias: BTreeMap::new(),
        }
    }
}

/// Reads `logit_bias` keys as token ids, whether the map comes straight from JSON or through
/// a flattened request (where serde hands keys over as strings).
/// (MessagePack, on internal subjects, keeps them as integers).
pub(crate) fn logit_bias_from_json<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<BTreeMap<u32, f32>, D::Error> {
    /// A key as it arrives: a token id, or its decimal text.
    #[derive(Deserialize, PartialEq, Eq, PartialOrd, Ord)]
    #[serde(untagged)]
    enum TokenKey {
        Id(u32),
        Text(String),
    }
    let by_key = BTreeMap::<TokenKey, f32>::deserialize(deserializer)?;
    by_key
        .into_iter()
        .map(|(key, bias)| match key {
            TokenKey::Id(token) => Ok((token, bias)),
            TokenKey::Text(text) => match text.trim().parse::<u32>() {
                Ok(token) => Ok((token, bias)),
                Err(_) => Err(serde::de::Error::custom(format!("logit_bias keys must be token ids, got `{text}`"))),
            },
        })
        .collect()
}

/// Most alternatives `logprobs` may ask for.
pub const MAX_LOGPROBS: usize = 20;
/// Most parallel samples per request.
pub const MAX_N: usize = 128;
/// Most tokens `logit_bias` may name.
pub const MAX_LOGIT_BIAS: usize = 1024;
/// The largest bias `logit_bias` may give, either way.
pub const LOGIT_BIAS_LIMIT: f32 = 100.0;

impl SamplingParams {
    /// Greedy decoding of `max_tokens` tokens.
    pub fn greedy(max_tokens: usize) -> Self {
        Self { temperature: 0.0, max_tokens, ..Self::default() }
    }

    /// Whether this request decodes greedily.
    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0 || self.top_k == 1
    }

    /// Checks every field's range; the error names the field.
    pub fn validate(&self) -> Result<(), String> {
        if self.n == 0 || self.n > MAX_N {
            return Err(format!("n must be in 1..={MAX_N}, got {}", self.n));
        }
        if self.max_tokens == 0 {
            return Err("max_tokens must be at least 1".into());
        }
        if self.min_tokens > self.max_tokens {
            return Err(format!("min_tokens ({}) must not exceed max_tokens ({})", self.min_tokens, self.max_tokens));
        }
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return Err(format!("temperature must be >= 0, got {}", self.temperature));
        }
        if self.top_k < -1 {
            return Err(format!("top_k must be -1, 0 (off) or positive, got {}", self.top_k));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(format!("top_p must be in (0, 1], got {}", self.top_p));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return Err(format!("min_p must be in [0, 1], got {}", self.min_p));
        }
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            return Err(format!("repetition_penalty must be > 0, got {}", self.repetition_penalty));
        }
        if !(-2.0..=2.0).contains(&self.presence_penalty) {
            return Err(format!("presence_penalty must be in [-2, 2], got {}", self.presence_penalty));
        }
        if !(-2.0..=2.0).contains(&self.frequency_penalty) {
            return Err(format!("frequency_penalty must be in [-2, 2], got {}", self.frequency_penalty));
        }
        if let Some(k) = self.logprobs {
            if k > MAX_LOGPROBS {
                return Err(format!("logprobs must be at most {MAX_LOGPROBS}, got {k}"));
            }
        }
        if self.logit_bias.len() > MAX_LOGIT_BIAS {
            return Err(format!("logit_bias may name at most {MAX_LOGIT_BIAS} tokens, got {}", self.logit_bias.len()));
        }
        if let Some((token, bias)) =
            self.logit_bias.iter().find(|(_, b)| !(-LOGIT_BIAS_LIMIT..=LOGIT_BIAS_LIMIT).contains(*b))
        {
            return Err(format!("logit_bias for token {token} must be in [-100, 100], got {bias}"));
        }
        Ok(())
    }

    /// Checks that every token id named (`stop_token_ids`, `logit_bias`) is in a vocabulary of
    /// `vocab_size` tokens.
    pub fn check_vocab(&self, vocab_size: usize) -> Result<(), String> {
        let named = self.stop_token_ids.iter().map(|t| ("stop_token_ids", t));
        let mut named = named.chain(self.logit_bias.keys().map(|t| ("logit_bias", t)));
        match named.find(|(_, &t)| t as usize >= vocab_size) {
            Some((field, t)) => Err(format!("{field}: token id {t} is outside the vocabulary (size {vocab_size})")),
            None => Ok(()),
        }
    }

    /// Whether any of the history-dependent penalties is active.
    pub fn has_penalties(&self) -> bool {
        self.repetition_penalty != 1.0 || self.presence_penalty != 0.0 || self.frequency_penalty != 0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_ranges_are_enforced() {
        assert!(SamplingParams::default().validate().is_ok());
        let bad = [
            SamplingParams { n: 0, ..Default::default() },
            SamplingParams { max_tokens: 0, ..Default::default() },
            SamplingParams { temperature: -0.5, ..Default::default() },
            SamplingParams { temperature: f32::NAN, ..Default::default() },
            SamplingParams { top_p: 0.0, ..Default::default() },
            SamplingParams { top_p: 1.5, ..Default::default() },
            SamplingParams { min_p: 2.0, ..Default::default() },
            SamplingParams { top_k: -3, ..Default::default() },
            SamplingParams { logprobs: Some(MAX_LOGPROBS + 1), ..Default::default() },
            SamplingParams { min_tokens: 20, max_tokens: 10, ..Default::default() },
            SamplingParams { repetition_penalty: 0.0, ..Default::default() },
            SamplingParams { logit_bias: [(3, 100.5)].into(), ..Default::default() },
            SamplingParams { logit_bias: [(3, f32::NAN)].into(), ..Default::default() },
            SamplingParams {
                logit_bias: (0..=MAX_LOGIT_BIAS as u32).map(|t| (t, 1.0)).collect(),
                ..Default::default()
            },
        ];
        for p in bad {
            assert!(p.validate().is_err(), "{p:?} should be rejected");
        }
    }

    #[test]
    fn unknown_fields_are_rejected() {
        let err = serde_json::from_str::<SamplingParams>(r#"{"max_tokens": 3, "bogus": 1}"#);
        assert!(err.is_err());
        let ok: SamplingParams = serde_json::from_str(r#"{"max_tokens": 3, "temperature": 0}"#).unwrap();
        assert_eq!(ok.max_tokens, 3);
        assert!(ok.is_greedy());
    }

    #[test]
    fn logit_bias_keys_are_token_ids_in_the_vocabulary() {
        let p: SamplingParams = serde_json::from_str(r#"{"logit_bias": {"7": -100, "12": 2.5}}"#).unwrap();
        assert_eq!(p.logit_bias, [(7, -100.0), (12, 2.5)].into());
        assert!(p.validate().is_ok() && p.check_vocab(13).is_ok());
        assert!(p.check_vocab(12).unwrap_err().contains("token id 12"));
        assert!(serde_json::from_str::<SamplingParams>(r#"{"logit_bias": {"seven": 1}}"#).is_err());
        let stop = SamplingParams { stop_token_ids: vec![40], ..Default::default() };
        assert!(stop.check_vocab(40).unwrap_err().starts_with("stop_token_ids"));
    }
}
