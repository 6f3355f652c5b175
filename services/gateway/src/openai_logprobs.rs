//! The OpenAI API's `logprobs` objects, built from the mesh's per-token log-probabilities
//! ([`SampledToken`]) and the texts the detokenizer gave them ([`TokenTexts`]).

use pagemesh_shared::protocol::TokenTexts;
use pagemesh_shared::SampledToken;
use serde_json::{json, Map, Value};

/// A log-probability as the shortest decimal that reads back as the same `f32` (-0.1, not
/// -0.10000000149011612).
fn number(logprob: f32) -> Value {
    logprob.to_string().parse::<f64>().map_or(Value::Null, |v| json!(v))
}

/// The texts of token `i`, empty when a chunk carries none.
fn texts_of(texts: Option<&[TokenTexts]>, i: usize) -> TokenTexts {
    texts.and_then(|t| t.get(i)).cloned().unwrap_or_default()
}

/// A completion choice's `logprobs`: `tokens`, `token_logprobs`, `top_logprobs` (token text
/// → log-probability) and `text_offset`. `offset` is the sample's text length in characters
/// before these tokens; it is advanced past them, so that streamed chunks continue the count.
pub fn completion_logprobs(tokens: &[SampledToken], texts: Option<&[TokenTexts]>, offset: &mut usize) -> Value {
    let mut token_texts = Vec::with_capacity(tokens.len());
    let mut token_logprobs = Vec::with_capacity(tokens.len());
    let mut top_logprobs = Vec::with_capacity(tokens.len());
    let mut text_offset = Vec::with_capacity(tokens.len());
    for (i, token) in tokens.iter().enumerate() {
        let texts = texts_of(texts, i);
        let mut top = Map::new();
        for (k, &(_, logprob)) in token.top_logprobs.iter().enumerate() {
            let text = texts.top.get(k).cloned().unwrap_or_default();
            top.entry(text).or_insert(number(logprob));
        }
        text_offset.push(*offset);
        *offset += texts.text.chars().count();
        token_logprobs.push(token.logprob.map_or(Value::Null, number));
        top_logprobs.push(Value::Object(top));
        token_texts.push(texts.text);
    }
    json!({"tokens": token_texts, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs,
           "text_offset": text_offset})
}

/// A chat choice's `logprobs`: `content`, one `{token, logprob, bytes, top_logprobs}` per token.
pub fn chat_logprobs(tokens: &[SampledToken], texts: Option<&[TokenTexts]>) -> Value {
    let content: Vec<Value> = tokens
        .iter()
        .enumerate()
        .map(|(i, token)| {
            let texts = texts_of(texts, i);
            let top: Vec<Value> = token
                .top_logprobs
                .iter()
                .enumerate()
                .map(|(k, &(_, logprob))| {
                    let text = texts.top.get(k).cloned().unwrap_or_default();
                    json!({"token": text, "logprob": number(logprob), "bytes": text.as_bytes()})
                })
                .collect();
            let logprob = token.logprob.map_or(Value::Null, number);
            json!({"token": texts.text, "logprob": logprob, "bytes": texts.text.as_bytes(), "top_logprobs": top})
        })
        .collect();
    json!({"content": content})
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(id: u32, logprob: f32, top: &[(u32, f32)]) -> SampledToken {
        SampledToken { token: id, logprob: Some(logprob), top_logprobs: top.to_vec() }
    }

    fn texts(text: &str, top: &[&str]) -> TokenTexts {
        TokenTexts { text: text.into(), top: top.iter().map(|t| t.to_string()).collect() }
    }

    #[test]
    fn completion_logprobs_list_texts_offsets_and_alternatives() {
        let tokens = [token(7, -0.5, &[(7, -0.5), (9, -1.0)]), token(8, -2.0, &[(3, -0.1), (8, -2.0)])];
        let texts = [texts(" a", &[" a", " the"]), texts("é", &["x", "é"])];
        let mut offset = 4;
        let v = completion_logprobs(&tokens, Some(&texts), &mut offset);
        assert_eq!(v["tokens"], json!([" a", "é"]));
        assert_eq!(v["token_logprobs"], json!([-0.5, -2.0]));
        assert_eq!(v["top_logprobs"], json!([{" a": -0.5, " the": -1.0}, {"x": -0.1, "é": -2.0}]));
        // Offsets count characters, and continue from where the last chunk ended.
        assert_eq!(v["text_offset"], json!([4, 6]));
        assert_eq!(offset, 7);
    }

    #[test]
    fn chat_logprobs_carry_bytes_and_alternatives() {
        let v = chat_logprobs(&[token(8, -2.0, &[(8, -2.0)])], Some(&[texts("é", &["é"])]));
        assert_eq!(
            v,
            json!({"content": [{"token": "é", "logprob": -2.0, "bytes": [195, 169],
                                "top_logprobs": [{"token": "é", "logprob": -2.0, "bytes": [195, 169]}]}]})
        );
    }

    #[test]
    fn missing_texts_give_empty_strings_not_a_panic() {
        let mut offset = 0;
        let v = completion_logprobs(&[token(1, -1.0, &[(1, -1.0)])], None, &mut offset);
        assert_eq!(v["tokens"], json!([""]));
        assert_eq!(chat_logprobs(&[token(1, -1.0, &[])], Some(&[]))["content"][0]["token"], json!(""));
    }
}
