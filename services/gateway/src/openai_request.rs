//! OpenAI request bodies turned into mesh generation requests (`<prefix>.generate`), with
//! OpenAI-style errors for anything the mesh would not accept.
//!
//! A completion whose `prompt` is a list of prompts fans out into one mesh request per
//! prompt; their choices are numbered prompt by prompt, `n` per prompt (as vLLM does).

use actix_web::web::Bytes;
use pagemesh_shared::ChatMessage;
use serde_json::{json, Map, Value};

/// Most prompts one completion request may carry.
pub const MAX_PROMPTS_PER_REQUEST: usize = 1024;

/// Fields both endpoints pass through to the mesh under the same name.
const SAMPLING_FIELDS: &[&str] = &[
    "n",
    "max_tokens",
    "min_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "seed",
    "stop_token_ids",
    "ignore_eos",
    "logit_bias",
];
/// Fields both endpoints pass through to the mesh that shape the text (vLLM's names).
const TEXT_FIELDS: &[&str] = &["skip_special_tokens", "include_stop_str_in_output"];
/// Fields accepted and ignored (OpenAI fields without effect here).
const IGNORED_FIELDS: &[&str] = &["user", "stream_options", "spaces_between_special_tokens"];

/// A request refused before it reaches the mesh.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// The HTTP status.
    pub status: u16,
    /// The OpenAI error type.
    pub kind: &'static str,
    /// What is wrong.
    pub message: String,
    /// The offending field.
    pub param: Option<String>,
}

/// A 400 `invalid_request_error` about `param`.
pub fn bad_request(message: impl Into<String>, param: Option<&str>) -> ApiError {
    ApiError { status: 400, kind: "invalid_request_error", message: message.into(), param: param.map(str::to_string) }
}

/// Parses a JSON object body, with OpenAI-style errors.
pub fn parse_object(body: &Bytes) -> Result<Map<String, Value>, ApiError> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(bad_request("the request body must be a JSON object", None)),
        Err(e) => Err(bad_request(format!("the request body is not valid JSON: {e}"), None)),
    }
}

/// The two generating endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// `/v1/completions`.
    Completions,
    /// `/v1/chat/completions`.
    Chat,
}

/// What one HTTP generation request becomes.
#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    /// One mesh request per prompt (a chat has one), each with its own `request_id`.
    pub requests: Vec<Value>,
    /// Whether the answer streams as server-sent events.
    pub stream: bool,
    /// Samples per prompt (`n`).
    pub samples_per_prompt: usize,
    /// Whether log-probabilities were asked for.
    pub with_logprobs: bool,
}

impl Generation {
    /// Choices in the answer: `n` per prompt.
    pub fn num_choices(&self) -> usize {
        self.requests.len() * self.samples_per_prompt
    }
}

/// Translates an OpenAI body into mesh generation requests. With one prompt the mesh request
/// carries `request_id` itself; with several, `<request_id>-<k>` for prompt `k`.
pub fn to_generate(endpoint: Endpoint, body: &Map<String, Value>, request_id: &str) -> Result<Generation, ApiError> {
    let mut out = Map::new();
    let own: &[&str] = match endpoint {
        Endpoint::Completions => &["model", "prompt", "stream", "stop", "echo", "logprobs", "best_of", "suffix"],
        Endpoint::Chat => &[
            "model",
            "messages",
            "stream",
            "stop",
            "max_completion_tokens",
            "add_generation_prompt",
            "logprobs",
            "top_logprobs",
        ],
    };
    for (key, value) in body {
        let passed = SAMPLING_FIELDS.contains(&key.as_str()) || TEXT_FIELDS.contains(&key.as_str());
        let known = passed || own.contains(&key.as_str()) || IGNORED_FIELDS.contains(&key.as_str());
        if !known {
            return Err(bad_request(format!("unknown field `{key}`"), Some(key)));
        }
        if passed && !value.is_null() {
            out.insert(key.clone(), value.clone());
        }
    }
    if let Some(model) = body.get("model").filter(|v| !v.is_null()) {
        if !model.is_string() {
            return Err(bad_request("`model` must be a string", Some("model")));
        }
        out.insert("model".into(), model.clone());
    }
    if let Some(stop) = body.get("stop").filter(|v| !v.is_null()) {
        out.insert("stop".into(), stop.clone());
    }
    let stream = match body.get("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(bad_request("`stream` must be a boolean", Some("stream"))),
    };
    let prompts = match endpoint {
        Endpoint::Completions => {
            completion_fields(body, &mut out)?;
            prompts(body.get("prompt"))?
        }
        Endpoint::Chat => {
            chat_fields(body, &mut out)?;
            Vec::new()
        }
    };
    let samples_per_prompt = body.get("n").and_then(Value::as_u64).unwrap_or(1).max(1) as usize;
    let with_logprobs = out.contains_key("logprobs");
    let requests = if prompts.is_empty() {
        out.insert("request_id".into(), json!(request_id));
        vec![Value::Object(out)]
    } else {
        let single = prompts.len() == 1;
        prompts
            .into_iter()
            .enumerate()
            .map(|(k, prompt)| {
                let mut request = out.clone();
                let id = if single { request_id.to_string() } else { format!("{request_id}-{k}") };
                request.insert("request_id".into(), json!(id));
                request.insert("prompt".into(), prompt);
                Value::Object(request)
            })
            .collect()
    };
    Ok(Generation { requests, stream, samples_per_prompt, with_logprobs })
}

/// The completion-only fields (everything but the prompt).
fn completion_fields(body: &Map<String, Value>, out: &mut Map<String, Value>) -> Result<(), ApiError> {
    if body.get("echo").is_some_and(|v| v.as_bool() == Some(true)) {
        return Err(bad_request("`echo` is not supported", Some("echo")));
    }
    if body.get("suffix").is_some_and(|v| !v.is_null()) {
        return Err(bad_request("`suffix` is not supported", Some("suffix")));
    }
    if let Some(best_of) = body.get("best_of").filter(|v| !v.is_null()) {
        let n = body.get("n").and_then(Value::as_u64).unwrap_or(1);
        if best_of.as_u64() != Some(n) {
            return Err(bad_request("`best_of` other than `n` is not supported", Some("best_of")));
        }
    }
    match body.get("logprobs") {
        None | Some(Value::Null) => {}
        Some(v) if v.is_u64() => {
            out.insert("logprobs".into(), v.clone());
        }
        Some(_) => return Err(bad_request("`logprobs` must be a non-negative integer", Some("logprobs"))),
    }
    if !out.contains_key("max_tokens") {
        out.insert("max_tokens".into(), json!(16));
    }
    Ok(())
}

/// The prompts of a completion: a string, a list of token ids, or a non-empty list of either.
fn prompts(prompt: Option<&Value>) -> Result<Vec<Value>, ApiError> {
    let wrong = || bad_request("`prompt` must be a string, a list of token ids, or a list of those", Some("prompt"));
    let is_token_ids = |items: &[Value]| !items.is_empty() && items.iter().all(Value::is_u64);
    match prompt {
        Some(Value::String(s)) => Ok(vec![json!(s)]),
        Some(Value::Array(items)) if is_token_ids(items) => Ok(vec![Value::Array(items.clone())]),
        Some(Value::Array(items)) if items.is_empty() => Err(bad_request("`prompt` is an empty list", Some("prompt"))),
        Some(Value::Array(items)) if items.len() > MAX_PROMPTS_PER_REQUEST => Err(bad_request(
            format!("{} prompts in one request; at most {MAX_PROMPTS_PER_REQUEST} are accepted", items.len()),
            Some("prompt"),
        )),
        Some(Value::Array(items)) => items
            .iter()
            .map(|item| match item {
                Value::String(_) => Ok(item.clone()),
                Value::Array(ids) if is_token_ids(ids) => Ok(item.clone()),
                _ => Err(wrong()),
            })
            .collect(),
        None | Some(Value::Null) => Err(bad_request("missing `prompt`", Some("prompt"))),
        Some(_) => Err(wrong()),
    }
}

/// The chat-only fields.
fn chat_fields(body: &Map<String, Value>, out: &mut Map<String, Value>) -> Result<(), ApiError> {
    match body.get("messages") {
        Some(Value::Array(items)) => {
            let mut messages = Vec::with_capacity(items.len());
            for (i, m) in items.iter().enumerate() {
                messages
                    .push(chat_message(m).map_err(|e| bad_request(format!("messages[{i}]: {e}"), Some("messages")))?);
            }
            out.insert("messages".into(), Value::Array(messages));
        }
        None | Some(Value::Null) => return Err(bad_request("missing `messages`", Some("messages"))),
        Some(_) => return Err(bad_request("`messages` must be a list", Some("messages"))),
    }
    if let Some(v) = body.get("max_completion_tokens").filter(|v| !v.is_null()) {
        out.insert("max_tokens".into(), v.clone());
    }
    if let Some(v) = body.get("add_generation_prompt").filter(|v| !v.is_null()) {
        out.insert("add_generation_prompt".into(), v.clone());
    }
    if body.get("logprobs").and_then(Value::as_bool) == Some(true) {
        let top = body.get("top_logprobs").and_then(Value::as_u64).unwrap_or(0);
        out.insert("logprobs".into(), json!(top));
    }
    Ok(())
}

/// A message as the project's one chat-message type reads it (role, and content as a string,
/// null or text parts), written back as the mesh's JSON.
fn chat_message(m: &Value) -> Result<Value, String> {
    let message: ChatMessage = serde_json::from_value(m.clone()).map_err(|e| e.to_string())?;
    serde_json::to_value(message).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn completion(body: Value) -> Result<Generation, ApiError> {
        let Value::Object(map) = body else { panic!("test bodies are objects") };
        to_generate(Endpoint::Completions, &map, "cmpl-1")
    }

    #[test]
    fn chat_messages_are_read_as_the_one_chat_message_type() {
        let body = json!({"messages": [
            {"role": "system", "content": null},
            {"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}], "name": "x"},
        ]});
        let Value::Object(map) = body else { unreachable!() };
        let g = to_generate(Endpoint::Chat, &map, "chat-1").expect("valid");
        assert_eq!(
            g.requests[0]["messages"],
            json!([{"role": "system", "content": ""}, {"role": "user", "content": "Hi there"}])
        );
        for (bad, why) in [
            (json!([{"content": "no role"}]), "role"),
            (json!([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]), "image_url"),
            (json!([{"role": "user", "content": 7}]), "a string, null, or a list"),
        ] {
            let Value::Object(map) = json!({"messages": bad}) else { unreachable!() };
            let e = to_generate(Endpoint::Chat, &map, "chat-1").expect_err("refused");
            assert!(e.message.starts_with("messages[0]: ") && e.message.contains(why), "{}", e.message);
            assert_eq!(e.param.as_deref(), Some("messages"));
        }
    }

    #[test]
    fn one_prompt_keeps_the_request_id() {
        for prompt in [json!("Once"), json!([1, 2, 3]), json!(["Once"]), json!([[1, 2, 3]])] {
            let g = completion(json!({"prompt": prompt, "n": 2})).expect("valid");
            assert_eq!(g.requests.len(), 1);
            assert_eq!(g.requests[0]["request_id"], "cmpl-1");
            assert_eq!(g.num_choices(), 2);
        }
    }

    #[test]
    fn a_list_of_prompts_fans_out_with_numbered_ids_and_shared_sampling() {
        let g = completion(json!({"prompt": ["a", [5, 6], "c"], "n": 2, "max_tokens": 7, "temperature": 0.5}))
            .expect("valid");
        let ids: Vec<_> = g.requests.iter().map(|r| r["request_id"].clone()).collect();
        assert_eq!(ids, [json!("cmpl-1-0"), json!("cmpl-1-1"), json!("cmpl-1-2")]);
        let prompts: Vec<_> = g.requests.iter().map(|r| r["prompt"].clone()).collect();
        assert_eq!(prompts, [json!("a"), json!([5, 6]), json!("c")]);
        assert!(g.requests.iter().all(|r| r["max_tokens"] == 7 && r["temperature"] == 0.5 && r["n"] == 2));
        assert_eq!(g.num_choices(), 6);
        // Text options pass through; ignored fields do not.
        let text = completion(json!({"prompt": "a", "skip_special_tokens": false, "include_stop_str_in_output": true,
                                  "user": "ignored"}))
        .expect("valid");
        assert_eq!(text.requests[0]["skip_special_tokens"], false);
        assert_eq!(text.requests[0]["include_stop_str_in_output"], true);
        assert!(text.requests[0].get("user").is_none());
    }

    #[test]
    fn malformed_prompt_lists_are_refused() {
        let too_many = vec![json!("x"); MAX_PROMPTS_PER_REQUEST + 1];
        for prompt in [json!([]), json!(["a", 3]), json!([["a"]]), json!([[]]), json!([-1]), json!(too_many)] {
            let e = completion(json!({ "prompt": prompt })).expect_err("refused");
            assert_eq!((e.status, e.param.as_deref()), (400, Some("prompt")), "{prompt}");
        }
    }
}
