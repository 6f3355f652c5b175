//! Sampling parameters as a request gives them: every field optional, so that what the
//! request leaves out takes the server's default for it (16 tokens for a prompt, the rest of
//! the context for a chat, and later the model's `generation_config.json`), as vLLM does.
//! The public generation request and the gateway's OpenAI requests both carry this form.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::sampling::{logit_bias_from_json, SamplingParams};

/// The sampling fields a request set (named as in the OpenAI API and vLLM).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SamplingOverrides {
    /// See [`SamplingParams::n`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub n: Option<usize>,
    /// See [`SamplingParams::max_tokens`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<usize>,
    /// See [`SamplingParams::min_tokens`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_tokens: Option<usize>,
    /// See [`SamplingParams::temperature`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f32>,
    /// See [`SamplingParams::top_k`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top_k: Option<i64>,
    /// See [`SamplingParams::top_p`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f32>,
    /// See [`SamplingParams::min_p`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_p: Option<f32>,
    /// See [`SamplingParams::repetition_penalty`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub repetition_penalty: Option<f32>,
    /// See [`SamplingParams::presence_penalty`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub presence_penalty: Option<f32>,
    /// See [`SamplingParams::frequency_penalty`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub frequency_penalty: Option<f32>,
    /// See [`SamplingParams::seed`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// See [`SamplingParams::logprobs`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub logprobs: Option<usize>,
    /// See [`SamplingParams::stop_token_ids`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stop_token_ids: Option<Vec<u32>>,
    /// See [`SamplingParams::ignore_eos`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ignore_eos: Option<bool>,
    /// See [`SamplingParams::logit_bias`].
    #[serde(skip_serializing_if = "Option::is_none", deserialize_with = "optional_logit_bias")]
    pub logit_bias: Option<BTreeMap<u32, f32>>,
}

/// `logit_bias` as [`SamplingParams`] reads it, or null.
fn optional_logit_bias<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<BTreeMap<u32, f32>>, D::Error> {
    /// Null, or a map read as [`logit_bias_from_json`] reads it.
    #[derive(Deserialize)]
    struct Bias(#[serde(deserialize_with = "logit_bias_from_json")] BTreeMap<u32, f32>);
    Ok(Option::<Bias>::deserialize(deserializer)?.map(|b| b.0))
}

impl SamplingOverrides {
    /// `defaults` with every field this request set replaced.
    pub fn over(self, defaults: SamplingParams) -> SamplingParams {
        SamplingParams {
            n: self.n.unwrap_or(defaults.n),
            max_tokens: self.max_tokens.unwrap_or(defaults.max_tokens),
            min_tokens: self.min_tokens.unwrap_or(defaults.min_tokens),
            temperature: self.temperature.unwrap_or(defaults.temperature),
            top_k: self.top_k.unwrap_or(defaults.top_k),
            top_p: self.top_p.unwrap_or(defaults.top_p),
            min_p: self.min_p.unwrap_or(defaults.min_p),
            repetition_penalty: self.repetition_penalty.unwrap_or(defaults.repetition_penalty),
            presence_penalty: self.presence_penalty.unwrap_or(defaults.presence_penalty),
            frequency_penalty: self.frequency_penalty.unwrap_or(defaults.frequency_penalty),
            seed: self.seed.or(defaults.seed),
            logprobs: self.logprobs.or(defaults.logprobs),
            stop_token_ids: self.stop_token_ids.unwrap_or(defaults.stop_token_ids),
            ignore_eos: self.ignore_eos.unwrap_or(defaults.ignore_eos),
            logit_bias: self.logit_bias.unwrap_or(defaults.logit_bias),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_a_request_leaves_out_takes_the_default() {
        let set: SamplingOverrides =
            serde_json::from_str(r#"{"temperature": 0, "top_k": null, "logit_bias": {"5": -100}}"#).expect("valid");
        let params = set.over(SamplingParams { max_tokens: 99, ..SamplingParams::default() });
        assert_eq!(params.temperature, 0.0);
        assert_eq!(params.max_tokens, 99);
        assert_eq!(params.top_k, SamplingParams::default().top_k);
        assert_eq!(params.logit_bias, BTreeMap::from([(5, -100.0)]));
    }

    #[test]
    fn only_what_was_set_is_written() {
        let set = SamplingOverrides { max_tokens: Some(7), ..SamplingOverrides::default() };
        assert_eq!(serde_json::to_value(&set).expect("serializable"), serde_json::json!({"max_tokens": 7}));
        assert!(serde_json::from_str::<SamplingOverrides>(r#"{"bogus": 1}"#).is_err());
    }
}
