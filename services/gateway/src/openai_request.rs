//! OpenAI request bodies, read into typed structs ([`CompletionRequest`],
//! [`ChatCompletionRequest`]) and turned into the mesh's public generation requests
//! ([`GenerateRequest`]), with OpenAI-style errors naming the field for anything the mesh
//! would not accept.
//!
//! A completion whose `prompt` is a list of prompts fans out into one mesh request per
//! prompt; their choices are numbered prompt by prompt, `n` per prompt (as vLLM does).

use actix_web::web::Bytes;
use pagemesh_shared::field_errors::field_error;
use pagemesh_shared::protocol::{GenerateRequest, Prompt, StopStrings};
use pagemesh_shared::sampling_overrides::SamplingOverrides;
use pagemesh_shared::ChatMessage;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{Map, Value};

/// Most prompts one completion request may carry.
pub const MAX_PROMPTS_PER_REQUEST: usize = 1024;

/// `max_tokens` of a completion that does not say (OpenAI's default).
const DEFAULT_COMPLETION_TOKENS: usize = 16;

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

/// `stream_options` of either endpoint.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StreamOptions {
    /// A last chunk with the usage.
    pub include_usage: Option<bool>,
    /// vLLM's: the usage so far on every chunk.
    pub continuous_usage_stats: Option<bool>,
}

/// The prompt of a completion: one (text or token ids), or a list of them.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum CompletionPrompt {
    /// One prompt.
    One(Prompt),
    /// Several, each answered with its own `n` choices.
    Many(Vec<Prompt>),
}

/// The fields both endpoints take besides their prompt and sampling parameters.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct CommonFields {
    /// The model (checked by the mesh when given).
    pub model: Option<String>,
    /// Stream server-sent events.
    pub stream: Option<bool>,
    /// Usage in the stream.
    pub stream_options: Option<StreamOptions>,
    /// Stop strings.
    pub stop: Option<StopStrings>,
    /// vLLM's: leave special tokens out of the text.
    pub skip_special_tokens: Option<bool>,
    /// vLLM's: end the text with the stop string that ended it.
    pub include_stop_str_in_output: Option<bool>,
    /// OpenAI's end-user id (fairness goes by API key instead).
    pub user: Option<String>,
    /// vLLM's; without effect here.
    pub spaces_between_special_tokens: Option<bool>,
}

/// A `/v1/completions` body.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CompletionRequest {
    /// What to complete.
    pub prompt: Option<CompletionPrompt>,
    /// Echo the prompt (refused unless false).
    pub echo: Option<bool>,
    /// Log-probabilities of this many alternatives per token.
    pub logprobs: Option<usize>,
    /// Candidates to choose from (only `n` is served).
    pub best_of: Option<usize>,
    /// Text after the completion (refused).
    pub suffix: Option<String>,
    /// The fields both endpoints take.
    #[serde(flatten)]
    pub common: CommonFields,
    /// The sampling parameters given.
    #[serde(flatten)]
    pub sampling: SamplingOverrides,
}

/// A `/v1/chat/completions` body.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ChatCompletionRequest {
    /// The conversation.
    pub messages: Option<Vec<ChatMessage>>,
    /// OpenAI's newer name for `max_tokens`.
    pub max_completion_tokens: Option<usize>,
    /// End the rendered prompt with the assistant's turn (default true).
    pub add_generation_prompt: Option<bool>,
    /// Log-probabilities of the chosen tokens.
    pub logprobs: Option<bool>,
    /// With `logprobs`: this many alternatives per token.
    pub top_logprobs: Option<usize>,
    /// vLLM's: more variables for the chat template.
    pub chat_template_kwargs: Option<Map<String, Value>>,
    /// The fields both endpoints take.
    #[serde(flatten)]
    pub common: CommonFields,
    /// The sampling parameters given.
    #[serde(flatten)]
    pub sampling: SamplingOverrides,
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
    pub requests: Vec<GenerateRequest>,
    /// The model named (empty when none).
    pub model: String,
    /// Whether the answer streams as server-sent events.
    pub stream: bool,
    /// What the stream carries besides the chunks.
    pub stream_options: StreamOptions,
    /// Samples per prompt (`n`).
    pub samples_per_prompt: usize,
    /// Whether log-probabilities were asked for.
    pub with_logprobs: bool,
    /// Fields of the body this server does not know, left out (as vLLM leaves them out, with a
    /// warning in its log).
    pub ignored_fields: Vec<String>,
}

impl Generation {
    /// Choices in the answer: `n` per prompt.
    pub fn num_choices(&self) -> usize {
        self.requests.len() * self.samples_per_prompt
    }
}

/// What fields of several forms must be, for errors about them.
const FORMS: &[(&str, &str)] = &[
    ("prompt", "`prompt` must be a string, a list of token ids, or a list of those"),
    ("stop", "`stop` must be a string or a list of strings"),
];

/// Most unknown fields left out of one body; a body with more is refused.
const MAX_IGNORED_FIELDS: usize = 64;

/// Fields vLLM serves and this server does not yet: refused rather than left out, since an
/// answer that ignored them would look right and be wrong (unconstrained text where JSON or a
/// tool call was asked for).
const NOT_YET_SUPPORTED: &[&str] = &[
    "response_format",
    "guided_json",
    "guided_regex",
    "guided_choice",
    "guided_grammar",
    "guided_decoding_backend",
    "structured_outputs",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "functions",
    "function_call",
    "prompt_logprobs",
    "use_beam_search",
];

/// Whether a field's value asks for nothing (absent in effect): null, an empty list, `"none"`
/// for `tool_choice`, or the plain-text `response_format`.
fn asks_nothing(field: &str, value: &Value) -> bool {
    match (field, value) {
        (_, Value::Null) => true,
        (_, Value::Array(items)) => items.is_empty(),
        (_, Value::Bool(false)) => true,
        ("tool_choice" | "function_call", Value::String(s)) => s == "none",
        ("response_format", Value::Object(format)) => format.get("type").and_then(Value::as_str) == Some("text"),
        _ => false,
    }
}

/// Reads a body as `T`, leaving out the top-level fields `T` does not know (named in the
/// answer's second part), as vLLM's OpenAI server does; any other error names its field.
fn read<T: DeserializeOwned>(body: &Map<String, Value>) -> Result<(T, Vec<String>), ApiError> {
    if let Some((field, _)) = body.iter().find(|(k, v)| NOT_YET_SUPPORTED.contains(&k.as_str()) && !asks_nothing(k, v))
    {
        return Err(bad_request(format!("`{field}` is not supported by this server yet"), Some(field)));
    }
    let mut body = body.clone();
    let mut ignored = Vec::new();
    loop {
        match read_strictly(&body) {
            Ok(value) => return Ok((value, ignored)),
            Err(Unread::Unknown(field)) if body.contains_key(&field) && ignored.len() < MAX_IGNORED_FIELDS => {
                body.remove(&field);
                ignored.push(field);
            }
            Err(Unread::Unknown(field)) => {
                let message = match body.contains_key(&field) {
                    true => format!("more than {MAX_IGNORED_FIELDS} unknown fields"),
                    false => format!("unknown field `{field}`"),
                };
                return Err(bad_request(message, Some(&field)));
            }
            Err(Unread::Invalid(e)) => return Err(e),
        }
    }
}

/// Why a body does not read as a type.
enum Unread {
    /// A field the type does not have.
    Unknown(String),
    /// Anything else, as the client's error.
    Invalid(ApiError),
}

/// Reads a body as `T`, every field known; an error names the field it is about.
fn read_strictly<T: DeserializeOwned>(body: &Map<String, Value>) -> Result<T, Unread> {
    serde_path_to_error::deserialize(Value::Object(body.clone())).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.inner().to_string();
        let unknown = inner.strip_prefix("unknown field `").and_then(|rest| rest.split('`').next());
        if let Some(field) = unknown {
            return Unread::Unknown(field.to_string());
        }
        Unread::Invalid(invalid_field::<T>(body, &path, &inner))
    })
}

/// The client's error for a field of `body` that does not read as `T` says (`path`, `inner`).
fn invalid_field<T: DeserializeOwned>(body: &Map<String, Value>, path: &str, inner: &str) -> ApiError {
    {
        let inner = inner.to_string();
        let field = path.split(['.', '[']).next().unwrap_or_default().to_string();
        if let Some((_, form)) = FORMS.iter().find(|(name, _)| *name == field) {
            return bad_request(*form, Some(&field));
        }
        if path == "." || path == "?" {
            // A field read through `flatten`, which loses its path.
            return match field_error::<T>(body) {
                Some((field, why)) => bad_request(format!("{field}: {why}"), Some(&field)),
                None => bad_request(inner, None),
            };
        }
        bad_request(format!("{path}: {inner}"), Some(&field))
    }
}

/// Translates an OpenAI body into mesh generation requests. With one prompt the mesh request
/// carries `request_id` itself; with several, `<request_id>-<k>` for prompt `k`.
pub fn to_generate(endpoint: Endpoint, body: &Map<String, Value>, request_id: &str) -> Result<Generation, ApiError> {
    let (generation, ignored_fields) = match endpoint {
        Endpoint::Completions => read(body).and_then(|(b, ignored)| Ok((completion(b, request_id)?, ignored)))?,
        Endpoint::Chat => read(body).and_then(|(b, ignored)| Ok((chat(b, request_id)?, ignored)))?,
    };
    Ok(Generation { ignored_fields, ..generation })
}

impl CommonFields {
    /// A mesh request with these fields (no prompt yet).
    fn mesh_request(&self, request_id: String, sampling: SamplingOverrides) -> GenerateRequest {
        GenerateRequest {
            request_id: Some(request_id),
            model: self.model.clone(),
            prompt: None,
            messages: None,
            add_generation_prompt: None,
            stop: self.stop.clone(),
            stream: None,
            skip_special_tokens: self.skip_special_tokens,
            include_stop_str_in_output: self.include_stop_str_in_output,
            user: None,
            chat_template_kwargs: None,
            sampling,
        }
    }

    /// What the HTTP request becomes, with these fields.
    fn generation(self, requests: Vec<GenerateRequest>, samples_per_prompt: usize, with_logprobs: bool) -> Generation {
        Generation {
            requests,
            model: self.model.unwrap_or_default(),
            stream: self.stream.unwrap_or(false),
            stream_options: self.stream_options.unwrap_or_default(),
            samples_per_prompt: samples_per_prompt.max(1),
            with_logprobs,
            ignored_fields: Vec::new(),
        }
    }
}

/// The mesh requests of a completion.
fn completion(body: CompletionRequest, request_id: &str) -> Result<Generation, ApiError> {
    if body.echo == Some(true) {
        return Err(bad_request("`echo` is not supported", Some("echo")));
    }
    if body.suffix.is_some() {
        return Err(bad_request("`suffix` is not supported", Some("suffix")));
    }
    let n = body.sampling.n.unwrap_or(1);
    if body.best_of.is_some_and(|best_of| best_of != n) {
        return Err(bad_request("`best_of` other than `n` is not supported", Some("best_of")));
    }
    let prompts = prompts(body.prompt)?;
    let mut sampling = body.sampling;
    sampling.logprobs = body.logprobs;
    sampling.max_tokens = sampling.max_tokens.or(Some(DEFAULT_COMPLETION_TOKENS));
    let single = prompts.len() == 1;
    let requests = prompts
        .into_iter()
        .enumerate()
        .map(|(k, prompt)| {
            let id = if single { request_id.to_string() } else { format!("{request_id}-{k}") };
            GenerateRequest { prompt: Some(prompt), ..body.common.mesh_request(id, sampling.clone()) }
        })
        .collect();
    Ok(body.common.generation(requests, n, body.logprobs.is_some()))
}

/// The prompts of a completion: a string, a list of token ids, or a non-empty list of either.
fn prompts(prompt: Option<CompletionPrompt>) -> Result<Vec<Prompt>, ApiError> {
    let prompts = match prompt {
        None => return Err(bad_request("missing `prompt`", Some("prompt"))),
        Some(CompletionPrompt::One(one)) => vec![one],
        Some(CompletionPrompt::Many(many)) if many.is_empty() => {
            return Err(bad_request("`prompt` is an empty list", Some("prompt")))
        }
        Some(CompletionPrompt::Many(many)) if many.len() > MAX_PROMPTS_PER_REQUEST => {
            let message =
                format!("{} prompts in one request; at most {MAX_PROMPTS_PER_REQUEST} are accepted", many.len());
            return Err(bad_request(message, Some("prompt")));
        }
        Some(CompletionPrompt::Many(many)) => many,
    };
    if prompts.iter().any(|p| matches!(p, Prompt::Ids(ids) if ids.is_empty())) {
        return Err(bad_request("`prompt` is an empty list", Some("prompt")));
    }
    Ok(prompts)
}

/// The mesh request of a chat.
fn chat(body: ChatCompletionRequest, request_id: &str) -> Result<Generation, ApiError> {
    let messages = match body.messages {
        None => return Err(bad_request("missing `messages`", Some("messages"))),
        Some(messages) if messages.is_empty() => {
            return Err(bad_request("`messages` must not be empty", Some("messages")))
        }
        Some(messages) => messages,
    };
    let mut sampling = body.sampling;
    sampling.max_tokens = sampling.max_tokens.or(body.max_completion_tokens);
    let with_logprobs = body.logprobs == Some(true);
    sampling.logprobs = with_logprobs.then(|| body.top_logprobs.unwrap_or(0));
    let n = sampling.n.unwrap_or(1);
    let request = GenerateRequest {
        messages: Some(messages),
        add_generation_prompt: body.add_generation_prompt,
        chat_template_kwargs: body.chat_template_kwargs,
        ..body.common.mesh_request(request_id.to_string(), sampling)
    };
    Ok(body.common.generation(vec![request], n, with_logprobs))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn object(body: Value) -> Map<String, Value> {
        let Value::Object(map) = body else { panic!("test bodies are objects") };
        map
    }

    fn completion(body: Value) -> Result<Generation, ApiError> {
        to_generate(Endpoint::Completions, &object(body), "cmpl-1")
    }

    #[test]
    fn chat_messages_are_read_as_the_one_chat_message_type() {
        let body = json!({"messages": [
            {"role": "system", "content": null},
            {"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}], "name": "x"},
        ]});
        let g = to_generate(Endpoint::Chat, &object(body), "chat-1").expect("valid");
        let messages = g.requests[0].messages.as_ref().expect("messages");
        assert_eq!(
            serde_json::to_value(messages).expect("serializable"),
            json!([{"role": "system", "content": ""}, {"role": "user", "content": "Hi there"}])
        );
        for (bad, why) in [
            (json!([{"content": "no role"}]), "role"),
            (json!([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]), "image_url"),
            (json!([{"role": "user", "content": 7}]), "a string, null, or a list"),
        ] {
            let e = to_generate(Endpoint::Chat, &object(json!({"messages": bad})), "chat-1").expect_err("refused");
            assert!(e.message.starts_with("messages[0]") && e.message.contains(why), "{}", e.message);
            assert_eq!(e.param.as_deref(), Some("messages"));
        }
        let e = to_generate(Endpoint::Chat, &object(json!({"messages": []})), "chat-1").expect_err("refused");
        assert_eq!((e.message.as_str(), e.param.as_deref()), ("`messages` must not be empty", Some("messages")));
    }

    #[test]
    fn chat_sampling_fields_map_to_the_mesh_s() {
        let body = json!({"messages": [{"role": "user", "content": "Hi"}], "max_completion_tokens": 9,
                          "logprobs": true, "top_logprobs": 3, "temperature": 0, "stream": true,
                          "stream_options": {"include_usage": true}});
        let g = to_generate(Endpoint::Chat, &object(body), "chat-1").expect("valid");
        let sampling = &g.requests[0].sampling;
        assert_eq!((sampling.max_tokens, sampling.logprobs, sampling.temperature), (Some(9), Some(3), Some(0.0)));
        assert!(g.stream && g.with_logprobs && g.stream_options.include_usage == Some(true));
        // Without max_tokens the mesh decides (the rest of the context): nothing is sent.
        let g = to_generate(Endpoint::Chat, &object(json!({"messages": [{"role": "user", "content": "Hi"}]})), "c")
            .expect("valid");
        let wire = serde_json::to_value(&g.requests[0]).expect("serializable");
        assert!(wire.get("max_tokens").is_none(), "{wire}");
    }

    #[test]
    fn one_prompt_keeps_the_request_id() {
        for prompt in [json!("Once"), json!([1, 2, 3]), json!(["Once"]), json!([[1, 2, 3]])] {
            let g = completion(json!({"prompt": prompt, "n": 2})).expect("valid");
            assert_eq!(g.requests.len(), 1);
            assert_eq!(g.requests[0].request_id.as_deref(), Some("cmpl-1"));
            assert_eq!(g.num_choices(), 2);
            assert_eq!(g.requests[0].sampling.max_tokens, Some(DEFAULT_COMPLETION_TOKENS));
        }
    }

    #[test]
    fn a_list_of_prompts_fans_out_with_numbered_ids_and_shared_sampling() {
        let g = completion(json!({"prompt": ["a", [5, 6], "c"], "n": 2, "max_tokens": 7, "temperature": 0.5}))
            .expect("valid");
        let ids: Vec<_> = g.requests.iter().map(|r| r.request_id.clone().unwrap_or_default()).collect();
        assert_eq!(ids, ["cmpl-1-0", "cmpl-1-1", "cmpl-1-2"]);
        let prompts: Vec<_> = g.requests.iter().map(|r| r.prompt.clone()).collect();
        assert_eq!(
            prompts,
            [Some(Prompt::Text("a".into())), Some(Prompt::Ids(vec![5, 6])), Some(Prompt::Text("c".into()))]
        );
        assert!(g.requests.iter().all(|r| r.sampling.max_tokens == Some(7)
            && r.sampling.temperature == Some(0.5)
            && r.sampling.n == Some(2)));
        assert_eq!(g.num_choices(), 6);
        // Text options pass through; the client's `user` does not (fairness goes by API key).
        let text = completion(json!({"prompt": "a", "skip_special_tokens": false, "include_stop_str_in_output": true,
                                  "user": "someone"}))
        .expect("valid");
        assert_eq!(text.requests[0].skip_special_tokens, Some(false));
        assert_eq!(text.requests[0].include_stop_str_in_output, Some(true));
        assert!(text.requests[0].user.is_none());
    }

    #[test]
    fn malformed_prompt_lists_are_refused() {
        let too_many = vec![json!("x"); MAX_PROMPTS_PER_REQUEST + 1];
        for prompt in [json!([]), json!(["a", 3]), json!([["a"]]), json!([[]]), json!([-1]), json!(too_many), json!(7)]
        {
            let e = completion(json!({ "prompt": prompt })).expect_err("refused");
            assert_eq!((e.status, e.param.as_deref()), (400, Some("prompt")), "{prompt}: {}", e.message);
        }
        let e = completion(json!({})).expect_err("refused");
        assert_eq!((e.message.as_str(), e.param.as_deref()), ("missing `prompt`", Some("prompt")));
    }

    #[test]
    fn unknown_fields_are_left_out_and_named_as_vllm_does() {
        let g = completion(json!({"prompt": "a", "frobnicate": 1, "max_tokens": 3, "zz": {"a": 1}})).expect("served");
        assert_eq!(g.ignored_fields, ["frobnicate", "zz"]);
        assert_eq!(g.requests[0].sampling.max_tokens, Some(3));
        let mut many = json!({"prompt": "a"});
        for i in 0..=MAX_IGNORED_FIELDS {
            many[format!("x{i}")] = json!(i);
        }
        let e = completion(many).expect_err("refused");
        assert!(e.message.contains("more than 64 unknown fields"), "{}", e.message);
        let e = completion(json!({"prompt": "a", "stream_options": {"include_usage": true, "frob": 1}}))
            .expect_err("an unknown field inside a known one is refused");
        assert_eq!(e.param.as_deref(), Some("frob"), "{}", e.message);
    }

    #[test]
    fn what_vllm_serves_and_this_server_does_not_yet_is_refused_by_name() {
        let e = completion(json!({"prompt": "a", "response_format": {"type": "json_object"}})).expect_err("refused");
        assert_eq!(e.param.as_deref(), Some("response_format"), "{}", e.message);
        let chat = |extra: Value| {
            let mut body = json!({"messages": [{"role": "user", "content": "Hi"}]});
            body.as_object_mut().expect("object").extend(extra.as_object().expect("object").clone());
            to_generate(Endpoint::Chat, &object(body), "c")
        };
        let e = chat(json!({"tools": [{"type": "function", "function": {"name": "f"}}]})).expect_err("refused");
        assert_eq!(e.param.as_deref(), Some("tools"));
        let e = chat(json!({"guided_choice": ["a", "b"]})).expect_err("refused");
        assert_eq!(e.param.as_deref(), Some("guided_choice"));
        // Asking for nothing is fine, as clients send these by default.
        let g =
            chat(json!({"tools": [], "tool_choice": "none", "response_format": {"type": "text"}, "functions": null}))
                .expect("served");
        assert_eq!(g.ignored_fields, ["functions", "response_format", "tool_choice", "tools"]);
        let g = chat(json!({"chat_template_kwargs": {"enable_thinking": false}})).expect("served");
        let kwargs = g.requests[0].chat_template_kwargs.as_ref().expect("passed on");
        assert_eq!(kwargs["enable_thinking"], json!(false));
    }

    #[test]
    fn wrong_fields_are_named() {
        let e = completion(json!({"prompt": "a", "stream": "yes"})).expect_err("refused");
        assert_eq!(e.param.as_deref(), Some("stream"), "{}", e.message);
        let e = completion(json!({"prompt": "a", "temperature": "hot"})).expect_err("refused");
        assert!(e.message.contains("temperature"), "{}", e.message);
        let e = completion(json!({"prompt": "a", "echo": true})).expect_err("refused");
        assert_eq!(e.param.as_deref(), Some("echo"));
        let e = completion(json!({"prompt": "a", "n": 2, "best_of": 3})).expect_err("refused");
        assert_eq!(e.param.as_deref(), Some("best_of"));
    }
}
