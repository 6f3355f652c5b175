//! The gateway: the OpenAI-compatible HTTP API (actix-web) in front of the mesh.
//!
//! Each HTTP request becomes public `<prefix>.generate` requests ([`crate::openai_request`]: one,
//! or one per prompt of a batched completion) whose chunks stream back on fresh inboxes
//! ([`crate::chunk_streams`]); they are relayed as server-sent events (ending with
//! `data: [DONE]`) or gathered into one response. A client that goes away aborts its requests.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::StatusCode;
use actix_web::middleware::Next;
use actix_web::web::{self, Bytes};
use actix_web::{HttpRequest, HttpResponse};
use futures::StreamExt;
use pagemesh_shared::metrics::{self as names, labels};
use pagemesh_shared::protocol::{Chunk, ErrorReply, Usage};
use pagemesh_shared::wire::Endpoint as BusEndpoint;
use pagemesh_shared::FinishReason;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use tracing::Instrument;

use crate::chunk_streams::{self, ChunkStream};
use crate::http_guard;
use crate::openai_logprobs::{chat_logprobs, completion_logprobs};
use crate::openai_request::{parse_object, to_generate, ApiError, Endpoint};
use pagemesh_bus::bus::{new_id, Bus};

/// Longest wait for a control answer (models, tokenize, health).
const CONTROL_TIMEOUT: Duration = Duration::from_secs(10);
/// How long `/ready` waits for the tokenizer's and the scheduler's answers: a readiness probe
/// must answer within its own timeout (1 s by default in Kubernetes), and a scheduler that is
/// not serving yet (starting, or a standby) does not answer at all.
const READY_TIMEOUT: Duration = Duration::from_millis(900);

/// What every handler shares.
#[derive(Clone)]
pub struct GatewayState {
    /// The bus.
    pub bus: Bus,
    /// Accepted API keys (none: no authentication).
    pub api_keys: Vec<String>,
    /// Longest a request body may take to arrive.
    pub body_timeout: Duration,
    /// Most sequences (prompts × `n`) one request may ask for.
    pub max_fanout: usize,
}

/// An OpenAI-style error response.
pub fn error_response(status: u16, kind: &str, message: impl Into<String>, param: Option<&str>) -> HttpResponse {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = HttpResponse::build(status);
    if status == StatusCode::TOO_MANY_REQUESTS {
        // The waiting queue drains step by step: a retry a second later usually fits.
        response.insert_header(("Retry-After", "1"));
    }
    response.json(json!({
        "error": {"message": message.into(), "type": kind, "param": param, "code": status.as_u16()}
    }))
}

fn api_error(e: &ApiError) -> HttpResponse {
    error_response(e.status, e.kind, &e.message, e.param.as_deref())
}

fn from_reply(error: &ErrorReply) -> HttpResponse {
    error_response(
        error.error.kind.http_status(),
        error.error.kind.openai_type(),
        &error.error.message,
        error.error.param.as_deref(),
    )
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

/// Who a request counts as for round-robin admission: its API key (hashed, never the key
/// itself), or the client's address when the gateway takes no keys.
fn fairness_identity(state: &GatewayState, req: &HttpRequest) -> String {
    use std::hash::{Hash, Hasher};
    let key = req.headers().get("authorization").and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
    match key {
        Some(key) if !state.api_keys.is_empty() => {
            let mut hasher = std::collections::hash_map::DefaultHasher::new();
            key.trim().hash(&mut hasher);
            format!("key-{:016x}", hasher.finish())
        }
        _ => format!("ip-{}", req.peer_addr().map(|a| a.ip().to_string()).unwrap_or_default()),
    }
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
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

/// What the answer to one generation request needs besides its chunks.
struct Answer {
    request_id: String,
    model: String,
    created: u64,
    endpoint: Endpoint,
    num_choices: usize,
    with_logprobs: bool,
    /// `stream_options.include_usage`: a last chunk with the usage.
    include_usage: bool,
    /// `stream_options.continuous_usage_stats` (vLLM): the usage so far on every chunk.
    continuous_usage: bool,
}

/// Largest body accepted when the NATS server does not say how large a message may be.
const DEFAULT_BODY_LIMIT: usize = 1 << 20;
/// Room left in a NATS message for what the gateway adds to a body (request ids, defaults).
const ENVELOPE_BYTES: usize = 1024;

/// Reads a request body of at most what one NATS message can carry (the server's
/// `max_payload`), with an OpenAI-style 413 above it (before reading anything when the
/// declared `Content-Length` is over it), and a 408 when it takes longer than the body timeout.
async fn read_body(state: &GatewayState, req: &HttpRequest, mut payload: web::Payload) -> Result<Bytes, HttpResponse> {
    let max_payload = state.bus.client.server_info().max_payload;
    let limit = if max_payload == 0 { DEFAULT_BODY_LIMIT } else { max_payload.saturating_sub(ENVELOPE_BYTES) };
    let too_large = || {
        let message = format!(
            "the request body is over {limit} bytes, the most one NATS message carries here \
             (raise the NATS server's max_payload for larger requests)"
        );
        error_response(413, "invalid_request_error", message, None)
    };
    if http_guard::declared_length(req).is_some_and(|n| n > limit as u64) {
        return Err(too_large());
    }
    let read = async {
        let mut body = web::BytesMut::new();
        while let Some(piece) = payload.next().await {
            let piece = piece.map_err(|e| error_response(400, "invalid_request_error", e.to_string(), None))?;
            if body.len() + piece.len() > limit {
                return Err(too_large());
            }
            body.extend_from_slice(&piece);
        }
        Ok(body.freeze())
    };
    match tokio::time::timeout(state.body_timeout, read).await {
        Ok(result) => result,
        Err(_) => {
            let message = format!("the request body did not arrive within {} s", state.body_timeout.as_secs());
            Err(error_response(408, "invalid_request_error", message, None))
        }
    }
}

/// Checks the API key, then reads the body as a JSON object.
async fn authorized_object(
    state: &GatewayState,
    req: &HttpRequest,
    payload: web::Payload,
) -> Result<Map<String, Value>, HttpResponse> {
    check_auth(state, req).map_err(|e| api_error(&e))?;
    if !http_guard::is_json(req) {
        let message = "the request body must be JSON, sent with `Content-Type: application/json`";
        return Err(error_response(415, "invalid_request_error", message, None));
    }
    let body = read_body(state, req, payload).await?;
    parse_object(&body).map_err(|e| api_error(&e))
}

/// A generation request, handled in the span of its id (which every service it reaches logs
/// it under).
async fn generate(
    state: web::Data<GatewayState>,
    req: HttpRequest,
    payload: web::Payload,
    endpoint: Endpoint,
) -> HttpResponse {
    let prefix = match endpoint {
        Endpoint::Completions => "cmpl",
        Endpoint::Chat => "chatcmpl",
    };
    let request_id = format!("{prefix}-{}", new_id());
    let span = pagemesh_bus::request_span!(request_id);
    generate_request(state, req, payload, endpoint, request_id).instrument(span).await
}

async fn generate_request(
    state: web::Data<GatewayState>,
    req: HttpRequest,
    payload: web::Payload,
    endpoint: Endpoint,
    request_id: String,
) -> HttpResponse {
    let body = match authorized_object(&state, &req, payload).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let mut generation = match to_generate(endpoint, &body, &request_id) {
        Ok(g) => g,
        Err(r) => {
            tracing::debug!(error = %r.message, "gateway: request refused");
            return api_error(&r);
        }
    };
    if !generation.ignored_fields.is_empty() {
        tracing::warn!(fields = ?generation.ignored_fields, "gateway: fields of the request not known here were ignored");
    }
    tracing::debug!(
        ?endpoint,
        choices = generation.num_choices(),
        stream = generation.stream,
        "gateway: request accepted"
    );
    // Waiting requests are taken round robin across API keys (or client addresses).
    let user = fairness_identity(&state, &req);
    for request in &mut generation.requests {
        request.user = Some(user.clone());
    }
    if generation.num_choices() > state.max_fanout {
        let message = format!(
            "this request asks for {} sequences (prompts × n); at most {} are served per request",
            generation.num_choices(),
            state.max_fanout
        );
        return error_response(400, "invalid_request_error", message, Some("n"));
    }
    let mut chunks =
        match chunk_streams::open(&state.bus, &request_id, &generation.requests, generation.samples_per_prompt).await {
            Ok(s) => s,
            Err(e) => return from_reply(&e),
        };
    // The first message decides the status: an error before any chunk is an HTTP error.
    let first = match chunks.next().await {
        Some(Ok(c)) => c,
        Some(Err(e)) => return from_reply(&e),
        None => return error_response(503, "service_unavailable", "the mesh closed the stream", None),
    };
    let model = if generation.model.is_empty() { "pagemesh".to_string() } else { generation.model.clone() };
    let answer = Answer {
        request_id,
        model,
        created: now(),
        endpoint,
        num_choices: generation.num_choices(),
        with_logprobs: generation.with_logprobs,
        include_usage: generation.stream_options.include_usage.unwrap_or(false),
        continuous_usage: generation.stream_options.continuous_usage_stats.unwrap_or(false),
    };
    if generation.stream {
        stream_answer(answer, first, chunks)
    } else {
        // A client that goes away while the answer is gathered drops it (and so aborts it).
        let peer = http_guard::PeerWatch::of(&req);
        let gone = async {
            match &peer {
                Some(watch) => watch.closed().await,
                None => futures::future::pending().await,
            }
        };
        tokio::select! {
            response = gather_answer(answer, first, chunks) => response,
            () = gone => error_response(499, "invalid_request_error", "the client closed the connection", None),
        }
    }
}

/// Relays the chunks as server-sent events, ending with `data: [DONE]`. Dropping the body (a
/// client that went away) drops `chunks`, which aborts what is still running.
fn stream_answer(answer: Answer, first: Chunk, chunks: ChunkStream) -> HttpResponse {
    let is_chat = answer.endpoint == Endpoint::Chat;
    let object = if is_chat { "chat.completion.chunk" } else { "text_completion" };
    let head = futures::stream::iter(std::iter::once(Ok::<_, ErrorReply>(first)));
    let mut role_sent = vec![false; answer.num_choices];
    let mut text_offsets = vec![0usize; answer.num_choices];
    let mut so_far = Usage::default();
    let events = head.chain(chunks).map(move |item| -> Result<Bytes, actix_web::Error> {
        let mut out = String::new();
        match item {
            Ok(chunk) => {
                so_far += Usage::new(chunk.prompt_token_ids.as_ref().map_or(0, Vec::len), chunk.token_ids.len());
                let i = chunk.sample_index as usize;
                let mut choice = if is_chat {
                    let mut delta = Map::new();
                    if let Some(sent @ false) = role_sent.get_mut(i) {
                        delta.insert("role".into(), json!("assistant"));
                        *sent = true;
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
                let mut payload = json!({"id": answer.request_id, "object": object, "created": answer.created,
                                         "model": answer.model, "choices": [choice]});
                if answer.continuous_usage {
                    payload["usage"] = usage_json(&so_far);
                }
                out.push_str(&format!("data: {payload}\n\n"));
                if chunk.done {
                    if let (true, Some(u)) = (answer.include_usage, chunk.usage) {
                        let payload = json!({"id": answer.request_id, "object": object, "created": answer.created,
                                             "model": answer.model, "choices": [], "usage": usage_json(&u)});
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
    HttpResponse::Ok().content_type("text/event-stream").insert_header(("Cache-Control", "no-cache")).streaming(events)
}

/// Gathers every chunk into one response with a choice per prompt and sample.
async fn gather_answer(answer: Answer, first: Chunk, mut chunks: ChunkStream) -> HttpResponse {
    let n = answer.num_choices;
    let mut texts = vec![String::new(); n];
    let mut finish = vec![None; n];
    let mut logprobs = vec![(Vec::new(), Vec::new()); n];
    let mut usage = None;
    let mut item = Some(Ok(first));
    while let Some(next) = item {
        let chunk = match next {
            Ok(chunk) => chunk,
            Err(e) => return from_reply(&e),
        };
        let i = chunk.sample_index as usize;
        if let Some(t) = texts.get_mut(i) {
            t.push_str(&chunk.text);
        }
        if let (Some(l), Some(new)) = (logprobs.get_mut(i), chunk.logprobs) {
            l.0.extend(new);
            l.1.extend(chunk.logprob_texts.unwrap_or_default());
        }
        if let (Some(f), Some(reason)) = (finish.get_mut(i), chunk.finish_reason) {
            *f = Some(reason);
        }
        if chunk.done {
            usage = chunk.usage;
            break;
        }
        item = chunks.next().await;
    }
    let choices: Vec<Value> = texts
        .into_iter()
        .zip(finish)
        .zip(logprobs)
        .enumerate()
        .map(|(i, ((text, f), (tokens, token_texts)))| match answer.endpoint {
            Endpoint::Completions => {
                let logprobs = answer.with_logprobs.then(|| completion_logprobs(&tokens, Some(&token_texts), &mut 0));
                json!({"index": i, "text": text, "logprobs": logprobs, "finish_reason": finish_name(f)})
            }
            Endpoint::Chat => {
                let logprobs = answer.with_logprobs.then(|| chat_logprobs(&tokens, Some(&token_texts)));
                json!({"index": i, "message": {"role": "assistant", "content": text},
                       "logprobs": logprobs, "finish_reason": finish_name(f)})
            }
        })
        .collect();
    let object = match answer.endpoint {
        Endpoint::Completions => "text_completion",
        Endpoint::Chat => "chat.completion",
    };
    let usage = usage.map(|u| usage_json(&u)).unwrap_or(Value::Null);
    HttpResponse::Ok().json(json!({"id": answer.request_id, "object": object, "created": answer.created,
                                   "model": answer.model, "choices": choices, "usage": usage}))
}

async fn completions(state: web::Data<GatewayState>, req: HttpRequest, payload: web::Payload) -> HttpResponse {
    generate(state, req, payload, Endpoint::Completions).await
}

async fn chat_completions(state: web::Data<GatewayState>, req: HttpRequest, payload: web::Payload) -> HttpResponse {
    generate(state, req, payload, Endpoint::Chat).await
}

async fn control(state: &GatewayState, endpoint: BusEndpoint<Value, Value>, body: &Value) -> HttpResponse {
    match state.bus.request(&endpoint, body, CONTROL_TIMEOUT).await {
        Ok(answer) => match serde_json::from_value::<ErrorReply>(answer.clone()) {
            Ok(e) => from_reply(&e),
            Err(_) => HttpResponse::Ok().json(answer),
        },
        Err(e) => error_response(503, "service_unavailable", e.to_string(), None),
    }
}

async fn models(state: web::Data<GatewayState>, req: HttpRequest) -> HttpResponse {
    if let Err(r) = check_auth(&state, &req) {
        return api_error(&r);
    }
    control(&state, state.bus.subjects.models(), &json!({})).await
}

async fn tokenize(state: web::Data<GatewayState>, req: HttpRequest, payload: web::Payload) -> HttpResponse {
    match authorized_object(&state, &req, payload).await {
        Ok(map) => control(&state, state.bus.subjects.tokenize(), &Value::Object(map)).await,
        Err(r) => r,
    }
}

async fn detokenize(state: web::Data<GatewayState>, req: HttpRequest, payload: web::Payload) -> HttpResponse {
    match authorized_object(&state, &req, payload).await {
        Ok(map) => control(&state, state.bus.subjects.detokenize(), &Value::Object(map)).await,
        Err(r) => r,
    }
}

/// pagemesh's version, as vLLM's `/version` answers (`{"version": ...}`).
async fn version() -> HttpResponse {
    HttpResponse::Ok().json(json!({"version": env!("CARGO_PKG_VERSION")}))
}

async fn health() -> HttpResponse {
    HttpResponse::Ok().json(json!({"status": "ok"}))
}

#[derive(Deserialize)]
struct HealthAnswer {
    ready: bool,
}

async fn ready(state: web::Data<GatewayState>) -> HttpResponse {
    // The tokenizer answers `models`: without one, no request gets in.
    if let Err(e) = state.bus.request(&state.bus.subjects.models(), &json!({}), READY_TIMEOUT).await {
        let message = format!("no tokenizer answers: {e}");
        return HttpResponse::ServiceUnavailable().json(json!({"live": true, "ready": false, "error": message}));
    }
    match state.bus.request(&state.bus.subjects.health(), &json!({}), READY_TIMEOUT).await {
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

async fn stats(state: web::Data<GatewayState>, req: HttpRequest) -> HttpResponse {
    if let Err(r) = check_auth(&state, &req) {
        return api_error(&r);
    }
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
        .route("/metrics", web::get().to(pagemesh_bus::metrics_endpoint::render))
        .route("/v1/chat/completions", web::post().to(chat_completions))
        .route("/v1/models", web::get().to(models))
        .route("/tokenize", web::post().to(tokenize))
        .route("/detokenize", web::post().to(detokenize))
        .route("/health", web::get().to(health))
        .route("/version", web::get().to(version))
        .route("/ready", web::get().to(ready))
        .route("/stats", web::get().to(stats))
        .default_service(web::to(not_found));
}
