//! The gateway: the OpenAI-compatible HTTP API (actix-web) in front of the mesh.
//!
//! Each HTTP request becomes a public `<prefix>.generate` request whose chunks stream back on
//! a fresh inbox; they are relayed as server-sent events (ending with `data: [DONE]`) or
//! gathered into one response. A client that goes away aborts its request.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::StatusCode;
use actix_web::middleware::Next;
use actix_web::web::{self, Bytes};
use actix_web::{HttpRequest, HttpResponse};
use futures::{Stream, StreamExt};
use pagemesh_shared::metrics::{self as names, labels};
use pagemesh_shared::protocol::{AbortRequest, Chunk, ErrorKind, ErrorReply, ReplyMessage, Usage};
use pagemesh_shared::FinishReason;
use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::bus::{new_id, Bus};
use crate::openai_logprobs::{chat_logprobs, completion_logprobs};

/// Longest wait for a request's next chunk.
const CHUNK_TIMEOUT: Duration = Duration::from_secs(600);
/// Longest wait for a control answer (models, tokenize, health).
const CONTROL_TIMEOUT: Duration = Duration::from_secs(10);

/// What every handler shares.
#[derive(Clone)]
pub struct GatewayState {
    /// The bus.
    pub bus: Bus,
    /// Accepted API keys (none: no authentication).
    pub api_keys: Vec<String>,
}

/// An OpenAI-style error response.
pub fn error_response(status: u16, kind: &str, message: impl Into<String>, param: Option<&str>) -> HttpResponse {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    HttpResponse::build(status).json(json!({
        "error": {"message": message.into(), "type": kind, "param": param, "code": status.as_u16()}
    }))
}

/// A request refused before it reaches the mesh.
pub struct ApiError {
    status: u16,
    kind: &'static str,
    message: String,
    param: Option<String>,
}

impl ApiError {
    fn response(&self) -> HttpResponse {
        error_response(self.status, self.kind, &self.message, self.param.as_deref())
    }
}

fn from_reply(error: &ErrorReply) -> HttpResponse {
    error_response(
        error.error.kind.http_status(),
        error.error.kind.openai_type(),
        &error.error.message,
        error.error.param.as_deref(),
    )
}

fn bad_request(message: impl Into<String>, param: Option<&str>) -> ApiError {
    ApiError { status: 400, kind: "invalid_request_error", message: message.into(), param: param.map(str::to_string) }
}

fn check_auth(state: &GatewayState, req: &HttpRequest) -> Result<(), ApiError> {
    if state.api_keys.is_empty() {
        return Ok(());
    }
    let given = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match given {
        Some(key) if state.api_keys.iter().any(|k| k == key) => Ok(()),
        _ => Err(ApiError {
            status: 401,
            kind: "authentication_error",
            message: "missing or invalid API key".into(),
            param: None,
        }),
    }
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// Parses a JSON object body, with OpenAI-style errors.
fn parse_object(body: &Bytes) -> Result<Map<String, Value>, ApiError> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(bad_request("the request body must be a JSON object", None)),
        Err(e) => Err(bad_request(format!("the request body is not valid JSON: {e}"), None)),
    }
}

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
];
/// Fields accepted and ignored (OpenAI fields without effect here).
const IGNORED_FIELDS: &[&str] =
    &["user", "stream_options", "logit_bias", "skip_special_tokens", "spaces_between_special_tokens"];

enum Endpoint {
    Completions,
    Chat,
}

/// Translates an OpenAI body into a mesh generation request.
fn to_generate(endpoint: &Endpoint, body: &Map<String, Value>, request_id: &str) -> Result<(Value, bool), ApiError> {
    let mut out = Map::new();
    out.insert("request_id".into(), json!(request_id));
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
        let known = own.contains(&key.as_str())
            || SAMPLING_FIELDS.contains(&key.as_str())
            || IGNORED_FIELDS.contains(&key.as_str());
        if !known {
            return Err(bad_request(format!("unknown field `{key}`"), Some(key)));
        }
        if SAMPLING_FIELDS.contains(&key.as_str()) && !value.is_null() {
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
    match endpoint {
        Endpoint::Completions => {
            match body.get("prompt") {
                Some(Value::String(s)) => {
                    out.insert("prompt".into(), json!(s));
                }
                Some(Value::Array(items)) if items.iter().all(Value::is_u64) && !items.is_empty() => {
                    out.insert("prompt".into(), Value::Array(items.clone()));
                }
                Some(Value::Array(items)) if items.len() == 1 => match &items[0] {
                    Value::String(s) => {
                        out.insert("prompt".into(), json!(s));
                    }
                    Value::Array(ids) if ids.iter().all(Value::is_u64) => {
                        out.insert("prompt".into(), Value::Array(ids.clone()));
                    }
                    _ => return Err(bad_request("`prompt` must be a string or a list of token ids", Some("prompt"))),
                },
                Some(Value::Array(_)) => {
                    return Err(bad_request(
                        "batched prompts are not supported: send one prompt per request",
                        Some("prompt"),
                    ))
                }
                None | Some(Value::Null) => return Err(bad_request("missing `prompt`", Some("prompt"))),
                Some(_) => return Err(bad_request("`prompt` must be a string or a list of token ids", Some("prompt"))),
            }
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
        }
        Endpoint::Chat => {
            match body.get("messages") {
                Some(Value::Array(items)) => {
                    let mut messages = Vec::with_capacity(items.len());
                    for (i, m) in items.iter().enumerate() {
                        messages.push(
                            chat_message(m)
                                .map_err(|e| bad_request(format!("messages[{i}]: {e}"), Some("messages")))?,
                        );
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
        }
    }
    Ok((Value::Object(out), stream))
}

fn chat_message(m: &Value) -> Result<Value, String> {
    let role = m.get("role").and_then(Value::as_str).ok_or("a message needs a string `role`")?;
    let content = match m.get("content") {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(parts)) => {
            let mut text = String::new();
            for part in parts {
                match (part.get("type").and_then(Value::as_str), part.get("text").and_then(Value::as_str)) {
                    (Some("text"), Some(t)) => text.push_str(t),
                    _ => return Err("only text content parts are supported".into()),
                }
            }
            text
        }
        None | Some(Value::Null) => String::new(),
        Some(_) => return Err("`content` must be a string or a list of text parts".into()),
    };
    Ok(json!({"role": role, "content": content}))
}

/// Sends an abort for a request when dropped while armed (client gone mid-request).
struct AbortGuard {
    bus: Bus,
    request_id: String,
    armed: bool,
}

impl Drop for AbortGuard {
    fn drop(&mut self) {
        if self.armed {
            let bus = self.bus.clone();
            let abort = AbortRequest { request_id: self.request_id.clone() };
            actix_web::rt::spawn(async move {
                let _ = bus.publish_json(bus.subjects.scheduler_abort(), &abort).await;
            });
        }
    }
}

/// The chunks of one request, in order, ending after the `done` chunk (or an error).
async fn open_stream(
    bus: &Bus,
    request: &Value,
) -> Result<impl Stream<Item = Result<Chunk, ErrorReply>> + Unpin + 'static, HttpResponse> {
    let inbox = bus.client.new_inbox();
    let subscriber = bus
        .client
        .subscribe(inbox.clone())
        .await
        .map_err(|e| error_response(503, "service_unavailable", format!("NATS: {e}"), None))?;
    bus.publish_json_with_reply(bus.subjects.generate(), inbox, request)
        .await
        .map_err(|e| error_response(503, "service_unavailable", e.to_string(), None))?;
    let mut next_index = 0u64;
    let stream = futures::stream::unfold((subscriber, false), move |(mut sub, done)| async move {
        if done {
            return None;
        }
        let msg = match tokio::time::timeout(CHUNK_TIMEOUT, sub.next()).await {
            Ok(Some(msg)) => msg,
            Ok(None) => return None,
            Err(_) => {
                let e = ErrorReply::new(None, ErrorKind::Unavailable, "timed out waiting for the model");
                return Some((Err(e), (sub, true)));
            }
        };
        match serde_json::from_slice::<ReplyMessage>(&msg.payload) {
            Ok(ReplyMessage::Error(e)) => Some((Err(e), (sub, true))),
            Ok(ReplyMessage::Chunk(c)) => {
                let done = c.done;
                Some((Ok(c), (sub, done)))
            }
            Err(e) => {
                let e = ErrorReply::new(None, ErrorKind::Internal, format!("malformed chunk: {e}"));
                Some((Err(e), (sub, true)))
            }
        }
    })
    // Chunks arrive in order; drop any repeated index (never expected, cheap to guard).
    .filter(move |item| {
        let keep = match item {
            Ok(c) if c.index < next_index => false,
            Ok(c) => {
                next_index = c.index + 1;
                true
            }
            Err(_) => true,
        };
        futures::future::ready(keep)
    });
    Ok(Box::pin(stream))
}

fn finish_name(reason: Option<FinishReason>) -> Value {
    match reason {
        None => Value::Null,
        Some(FinishReason::Abort) => json!("abort"),
        Some(r) => json!(r.as_str()),
    }
}

fn usage_json(u: &Usage) -> Value {
    json!({"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens, "total_tokens": u.total_tokens})
}

async fn generate(state: web::Data<GatewayState>, req: HttpRequest, body: Bytes, endpoint: Endpoint) -> HttpResponse {
    if let Err(r) = check_auth(&state, &req) {
        return r.response();
    }
    let body = match parse_object(&body) {
        Ok(b) => b,
        Err(r) => return r.response(),
    };
    let (prefix, object) = match endpoint {
        Endpoint::Completions => ("cmpl", "text_completion"),
        Endpoint::Chat => ("chatcmpl", "chat.completion"),
    };
    let request_id = format!("{prefix}-{}", new_id());
    let (request, stream) = match to_generate(&endpoint, &body, &request_id) {
        Ok(r) => r,
        Err(r) => return r.response(),
    };
    let include_usage =
        body.get("stream_options").and_then(|o| o.get("include_usage")).and_then(Value::as_bool).unwrap_or(false);
    let model = body.get("model").and_then(Value::as_str).unwrap_or("").to_string();
    let n = body.get("n").and_then(Value::as_u64).unwrap_or(1).max(1) as usize;
    let with_logprobs = request.get("logprobs").is_some();
    let mut chunks = match open_stream(&state.bus, &request).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    let mut guard = AbortGuard { bus: state.bus.clone(), request_id: request_id.clone(), armed: true };
    // The first message decides the status: an error before any chunk is an HTTP error.
    let first = match chunks.next().await {
        Some(Ok(c)) => c,
        Some(Err(e)) => {
            guard.armed = false;
            return from_reply(&e);
        }
        None => {
            guard.armed = false;
            return error_response(503, "service_unavailable", "the mesh closed the stream", None);
        }
    };
    let created = now();
    let model = if model.is_empty() { "pagemesh".to_string() } else { model };
    if stream {
        let is_chat = matches!(endpoint, Endpoint::Chat);
        let head = futures::stream::iter(std::iter::once(Ok::<_, ErrorReply>(first)));
        let mut role_sent = vec![false; n];
        let mut text_offsets = vec![0usize; n];
        // The guard lives as long as the response body: a client that goes away drops it armed.
        let events = head.chain(chunks).map(move |item| -> Result<Bytes, actix_web::Error> {
            // Borrowing the whole guard makes the closure own it (not just its field).
            let guard = &mut guard;
            guard.armed = !matches!(&item, Ok(c) if c.done) && item.is_ok();
            let mut out = String::new();
            match item {
                Ok(chunk) => {
                    let i = chunk.sample_index as usize;
                    let mut choice = if is_chat {
                        let mut delta = Map::new();
                        if !role_sent.get(i).copied().unwrap_or(true) {
                            delta.insert("role".into(), json!("assistant"));
                            if let Some(r) = role_sent.get_mut(i) {
                                *r = true;
                            }
                        }
                        if !chunk.text.is_empty() || delta.is_empty() {
                            delta.insert("content".into(), json!(chunk.text));
                        }
                        json!({"index": i, "delta": delta, "finish_reason": finish_name(chunk.finish_reason)})
                    } else {
                        json!({"index": i, "text": chunk.text, "logprobs": null, "finish_reason": finish_name(chunk.finish_reason)})
                    };
                    if let Some(logprobs) = &chunk.logprobs {
                        let texts = chunk.logprob_texts.as_deref();
                        choice["logprobs"] = if is_chat {
                            chat_logprobs(logprobs, texts)
                        } else {
                            let mut unused = 0;
                            completion_logprobs(logprobs, texts, text_offsets.get_mut(i).unwrap_or(&mut unused))
                        };
                    }
                    let object = if is_chat { "chat.completion.chunk" } else { "text_completion" };
                    let payload = json!({"id": chunk.request_id, "object": object, "created": created, "model": model,
                                         "choices": [choice]});
                    out.push_str(&format!("data: {payload}\n\n"));
                    if chunk.done {
                        if let (true, Some(u)) = (include_usage, chunk.usage) {
                            let payload = json!({"id": chunk.request_id, "object": object, "created": created,
                                                 "model": model, "choices": [], "usage": usage_json(&u)});
                            out.push_str(&format!("data: {payload}\n\n"));
                        }
                        out.push_str("data: [DONE]\n\n");
                    }
                }
                Err(e) => {
                    let payload = json!({"error": {"message": e.error.message, "type": e.error.kind.openai_type(),
                                                   "code": e.error.kind.http_status()}});
                    out.push_str(&format!("data: {payload}\n\ndata: [DONE]\n\n"));
                }
            }
            Ok(Bytes::from(out))
        });
        return HttpResponse::Ok()
            .content_type("text/event-stream")
            .insert_header(("Cache-Control", "no-cache"))
            .streaming(events);
    }
    let mut texts = vec![String::new(); n];
    let mut finish = vec![None; n];
    let mut logprobs = vec![(Vec::new(), Vec::new()); n];
    let mut usage = None;
    let mut item = Some(Ok(first));
    while let Some(next) = item {
        match next {
            Ok(chunk) => {
                if let Some(t) = texts.get_mut(chunk.sample_index as usize) {
                    t.push_str(&chunk.text);
                }
                if let (Some(l), Some(new)) = (logprobs.get_mut(chunk.sample_index as usize), chunk.logprobs) {
                    l.0.extend(new);
                    l.1.extend(chunk.logprob_texts.unwrap_or_default());
                }
                if chunk.finish_reason.is_some() {
                    if let Some(f) = finish.get_mut(chunk.sample_index as usize) {
                        *f = chunk.finish_reason;
                    }
                }
                if chunk.done {
                    usage = chunk.usage;
                    break;
                }
            }
            Err(e) => {
                guard.armed = false;
                return from_reply(&e);
            }
        }
        item = chunks.next().await;
    }
    guard.armed = false;
    let choices: Vec<Value> = texts
        .into_iter()
        .zip(finish)
        .zip(logprobs)
        .enumerate()
        .map(|(i, ((text, f), (tokens, token_texts)))| match endpoint {
            Endpoint::Completions => {
                let logprobs = with_logprobs.then(|| completion_logprobs(&tokens, Some(&token_texts), &mut 0));
                json!({"index": i, "text": text, "logprobs": logprobs, "finish_reason": finish_name(f)})
            }
            Endpoint::Chat => {
                let logprobs = with_logprobs.then(|| chat_logprobs(&tokens, Some(&token_texts)));
                json!({"index": i, "message": {"role": "assistant", "content": text},
                       "logprobs": logprobs, "finish_reason": finish_name(f)})
            }
        })
        .collect();
    let usage = usage.map(|u| usage_json(&u)).unwrap_or(Value::Null);
    HttpResponse::Ok().json(json!({"id": request_id, "object": object, "created": created, "model": model,
                                   "choices": choices, "usage": usage}))
}

async fn completions(state: web::Data<GatewayState>, req: HttpRequest, body: Bytes) -> HttpResponse {
    generate(state, req, body, Endpoint::Completions).await
}

async fn chat_completions(state: web::Data<GatewayState>, req: HttpRequest, body: Bytes) -> HttpResponse {
    generate(state, req, body, Endpoint::Chat).await
}

async fn control(state: &GatewayState, subject: String, body: &Value) -> HttpResponse {
    match state.bus.request_json::<_, Value>(subject, body, CONTROL_TIMEOUT).await {
        Ok(answer) => match serde_json::from_value::<ErrorReply>(answer.clone()) {
            Ok(e) => from_reply(&e),
            Err(_) => HttpResponse::Ok().json(answer),
        },
        Err(e) => error_response(503, "service_unavailable", e.to_string(), None),
    }
}

async fn models(state: web::Data<GatewayState>, req: HttpRequest) -> HttpResponse {
    if let Err(r) = check_auth(&state, &req) {
        return r.response();
    }
    control(&state, state.bus.subjects.models(), &json!({})).await
}

async fn tokenize(state: web::Data<GatewayState>, req: HttpRequest, body: Bytes) -> HttpResponse {
    if let Err(r) = check_auth(&state, &req) {
        return r.response();
    }
    match parse_object(&body) {
        Ok(map) => control(&state, state.bus.subjects.tokenize(), &Value::Object(map)).await,
        Err(r) => r.response(),
    }
}

async fn detokenize(state: web::Data<GatewayState>, req: HttpRequest, body: Bytes) -> HttpResponse {
    if let Err(r) = check_auth(&state, &req) {
        return r.response();
    }
    match parse_object(&body) {
        Ok(map) => control(&state, state.bus.subjects.detokenize(), &Value::Object(map)).await,
        Err(r) => r.response(),
    }
}

async fn health() -> HttpResponse {
    HttpResponse::Ok().json(json!({"status": "ok"}))
}

#[derive(Deserialize)]
struct HealthAnswer {
    ready: bool,
}

async fn ready(state: web::Data<GatewayState>) -> HttpResponse {
    match state.bus.request_json::<_, Value>(state.bus.subjects.health(), &json!({}), CONTROL_TIMEOUT).await {
        Ok(answer) => {
            let is_ready = serde_json::from_value::<HealthAnswer>(answer.clone()).map(|h| h.ready).unwrap_or(false);
            if is_ready {
                HttpResponse::Ok().json(answer)
            } else {
                HttpResponse::ServiceUnavailable().json(answer)
            }
        }
        Err(e) => error_response(503, "service_unavailable", e.to_string(), None),
    }
}

async fn stats(state: web::Data<GatewayState>) -> HttpResponse {
    control(&state, state.bus.subjects.stats(), &json!({})).await
}

async fn not_found() -> HttpResponse {
    error_response(404, "invalid_request_error", "no such endpoint", None)
}

/// Middleware (`actix_web::middleware::from_fn`): counts every answered request by route
/// pattern (`other` for unknown paths) and status.
pub async fn count_requests(
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let endpoint = req.match_pattern().unwrap_or_else(|| "other".to_string());
    let response = next.call(req).await?;
    let series = [(labels::ENDPOINT, endpoint), (labels::STATUS, response.status().as_str().to_string())];
    metrics::counter!(names::HTTP_REQUESTS, &series).increment(1);
    Ok(response)
}

/// Registers the routes.
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route("/v1/completions", web::post().to(completions))
        .route("/metrics", web::get().to(crate::metrics_endpoint::render))
        .route("/v1/chat/completions", web::post().to(chat_completions))
        .route("/v1/models", web::get().to(models))
        .route("/tokenize", web::post().to(tokenize))
        .route("/detokenize", web::post().to(detokenize))
        .route("/health", web::get().to(health))
        .route("/ready", web::get().to(ready))
        .route("/stats", web::get().to(stats))
        .default_service(web::to(not_found));
}
