//! The tokenizer service: a NATS queue group on the public request subjects. It validates
//! generation requests (types, ranges, prompt + max_tokens within the context), renders chat
//! prompts, tokenizes, and hands the request to the scheduler; an invalid request gets an
//! error on its reply inbox at once. It also answers tokenize, detokenize and models.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::TextTokenizer;
use actix::prelude::*;
use pagemesh_shared::field_errors::field_error;
use pagemesh_shared::generation_defaults::GenerationDefaults;
use pagemesh_shared::limits::{self, ModelLimits};
use pagemesh_shared::metrics::{self as names, labels};
use pagemesh_shared::protocol::{ErrorKind, ErrorReply, GenerateRequest, Prompt, SubmitRequest, TextOptions};
use pagemesh_shared::sampling::SamplingParams;
use pagemesh_shared::subjects::TOKENIZER_QUEUE;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::prompt_renderer::PromptRenderer;
use pagemesh_bus::bus::{new_id, Bus, BusError};
use pagemesh_bus::listen::{listen, Subscription};
use pagemesh_bus::metrics_endpoint::request_error;
use pagemesh_bus::refusals::refuse;
use pagemesh_shared::wire::Topic;
use tracing::Instrument;

/// What the tokenizer knows of the model.
pub struct ModelInfo {
    /// Served name.
    pub name: String,
    /// Longest prompt + output.
    pub max_model_len: usize,
    /// Vocabulary size of the model.
    pub vocab_size: usize,
    /// The model's sampling defaults (`generation_config.json`).
    pub generation: GenerationDefaults,
    /// Most logprobs a request may ask for (`--max-logprobs`).
    pub max_logprobs: usize,
    /// Seed of the seeds drawn for requests that name none (`--seed`; none: from the OS).
    pub seed: Option<u64>,
}

/// The tokenizer service.
pub struct TokenizerService {
    bus: Bus,
    work: Arc<Tokenizing>,
    /// Bounds the CPU work running at once on the blocking pool.
    permits: Arc<tokio::sync::Semaphore>,
}

/// The CPU side of the service: validation, chat templates and tokenization. It runs on the
/// runtime's blocking pool, never on the event loop, so that a long prompt cannot stall the
/// other services of a process (`pagemesh serve` runs the scheduler on the same loop).
struct Tokenizing {
    tokenizer: Arc<TextTokenizer>,
    renderer: PromptRenderer,
    model: ModelInfo,
    /// Draws the seeds of requests that name none.
    seeds: std::sync::Mutex<StdRng>,
    /// When the service started (Unix seconds): the model card's `created`, as vLLM's.
    created: u64,
}

/// Most messages tokenized at once by one tokenizer service (the others wait their turn).
const MAX_CONCURRENT_WORK: usize = 8;

/// Which public subject a message came on.
enum Incoming {
    Generate(async_nats::Message),
    Tokenize(async_nats::Message),
    Detokenize(async_nats::Message),
    Models(async_nats::Message),
}

impl Message for Incoming {
    type Result = ();
}

/// `<prefix>.tokenize` request.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenizeRequest {
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    prompt: Option<String>,
    #[serde(default)]
    messages: Option<Vec<pagemesh_shared::ChatMessage>>,
    #[serde(default)]
    add_special_tokens: Option<bool>,
    #[serde(default)]
    add_generation_prompt: Option<bool>,
}

/// `<prefix>.detokenize` request.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DetokenizeRequest {
    #[serde(default)]
    model: Option<String>,
    tokens: Vec<u32>,
}

#[derive(Serialize)]
struct TokenizeReply {
    tokens: Vec<u32>,
    count: usize,
    max_model_len: usize,
}

/// A request rejected before it reaches the scheduler.
pub struct Rejection {
    /// Kind.
    pub kind: ErrorKind,
    /// Message.
    pub message: String,
}

fn invalid(message: impl Into<String>) -> Rejection {
    Rejection { kind: ErrorKind::InvalidRequest, message: message.into() }
}

impl TokenizerService {
    /// A tokenizer service for one model.
    pub fn new(bus: Bus, tokenizer: Arc<TextTokenizer>, renderer: PromptRenderer, model: ModelInfo) -> Self {
        let seeds = std::sync::Mutex::new(match model.seed {
            Some(seed) => StdRng::seed_from_u64(seed),
            None => StdRng::from_entropy(),
        });
        let created = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let work = Arc::new(Tokenizing { tokenizer, renderer, model, seeds, created });
        Self { bus, work, permits: Arc::new(tokio::sync::Semaphore::new(MAX_CONCURRENT_WORK)) }
    }
}

impl Tokenizing {
    fn check_model(&self, model: Option<&str>) -> Result<(), Rejection> {
        match model {
            Some(name) if name != self.model.name => Err(Rejection {
                kind: ErrorKind::ModelNotFound,
                message: format!("the model `{name}` does not exist; this server serves `{}`", self.model.name),
            }),
            _ => Ok(()),
        }
    }

    /// Validates and tokenizes a generation request.
    pub fn prepare(&self, payload: &[u8], reply_to: &str) -> Result<SubmitRequest, (Option<String>, Rejection)> {
        let value: Value = serde_json::from_slice(payload)
            .map_err(|e| (None, invalid(format!("the request is not valid JSON: {e}"))))?;
        let request_id = value.get("request_id").and_then(Value::as_str).map(str::to_string);
        let request: GenerateRequest = serde_path_to_error::deserialize(&value).map_err(|e| {
            let path = e.path().to_string();
            // A sampling field is read through `flatten`, which loses its path.
            let named = match (path.as_str(), value.as_object().and_then(field_error::<GenerateRequest>)) {
                ("." | "?", Some((field, why))) => Some(format!("invalid value for `{field}`: {why}")),
                ("." | "?", None) => None,
                _ => Some(format!("invalid value for `{path}`: {}", e.inner())),
            };
            (request_id.clone(), invalid(named.unwrap_or_else(|| e.inner().to_string())))
        })?;
        let request_id = request.request_id.clone().unwrap_or_else(new_id);
        if let Err(message) = limits::check_request_id(&request_id) {
            return Err((None, invalid(message)));
        }
        let fail = |r: Rejection| (Some(request_id.clone()), r);
        self.check_model(request.model.as_deref()).map_err(fail)?;
        let prompt_token_ids = match (&request.prompt, &request.messages) {
            (Some(_), Some(_)) => return Err(fail(invalid("give either `prompt` or `messages`, not both"))),
            (Some(_), None) if request.chat_template_kwargs.is_some() => {
                return Err(fail(invalid("`chat_template_kwargs` goes with `messages`, not `prompt`")))
            }
            (None, None) => return Err(fail(invalid("missing `prompt` (or `messages`)"))),
            (Some(Prompt::Text(text)), None) => {
                self.tokenizer.encode(text).map_err(|e| fail(invalid(e.to_string())))?
            }
            (Some(Prompt::Ids(ids)), None) => ids.clone(),
            (None, Some(messages)) => {
                if messages.is_empty() {
                    return Err(fail(invalid("`messages` must not be empty")));
                }
                let add = request.add_generation_prompt.unwrap_or(true);
                let kwargs = request.chat_template_kwargs.as_ref();
                self.renderer.tokenize(&self.tokenizer, messages, add, kwargs).map_err(|m| fail(invalid(m)))?
            }
        };
        let mut defaults = SamplingParams::default();
        if request.messages.is_some() {
            // Chat without max_tokens: up to the end of the context.
            defaults.max_tokens = self.model.max_model_len.saturating_sub(prompt_token_ids.len()).max(1);
        }
        self.model.generation.lay_under(&mut defaults);
        let mut params = request.sampling.clone().over(defaults);
        self.model.generation.cap(&mut params);
        params.validate().map_err(|m| fail(invalid(m)))?;
        params.check_vocab(self.model.vocab_size).map_err(|m| fail(invalid(m)))?;
        let stop = request.stop.clone().map(|s| s.into_vec()).unwrap_or_default();
        if let Some(k) = params.logprobs.filter(|&k| k > self.model.max_logprobs) {
            let most = self.model.max_logprobs;
            return Err(fail(invalid(format!("logprobs ({k}) exceeds this server's --max-logprobs ({most})"))));
        }
        let seed = match params.seed {
            Some(seed) => seed,
            None => self.seeds.lock().map(|mut rng| rng.gen()).unwrap_or_else(|_| rand::random()),
        };
        let submit = SubmitRequest {
            request_id: request_id.clone(),
            reply_to: reply_to.to_string(),
            prompt_token_ids,
            params,
            seed,
            stop,
            owner: None,
            user: request.user.clone(),
            max_tokens_is_default: request.sampling.max_tokens.is_none(),
            stream: request.stream.unwrap_or(true),
            text: TextOptions {
                skip_special_tokens: request.skip_special_tokens.unwrap_or(true),
                include_stop_str_in_output: request.include_stop_str_in_output.unwrap_or(false),
            },
        };
        // The scheduler checks the same, as it checks every submit.
        let limits = ModelLimits { vocab_size: self.model.vocab_size, max_model_len: self.model.max_model_len };
        limits.check_submit(&submit).map_err(|m| fail(invalid(m)))?;
        Ok(submit)
    }

    fn tokenize(&self, payload: &[u8]) -> Value {
        let request: TokenizeRequest = match serde_json::from_slice(payload) {
            Ok(r) => r,
            Err(e) => return error_value(invalid(format!("invalid tokenize request: {e}"))),
        };
        if let Err(r) = self.check_model(request.model.as_deref()) {
            return error_value(r);
        }
        let tokens = match (request.prompt, request.messages) {
            (Some(text), None) => {
                self.tokenizer.encode_with(&text, request.add_special_tokens.unwrap_or(true)).map_err(|e| e.to_string())
            }
            (None, Some(messages)) if !messages.is_empty() => {
                self.renderer.tokenize(&self.tokenizer, &messages, request.add_generation_prompt.unwrap_or(true), None)
            }
            _ => Err("give either a non-empty `prompt` or non-empty `messages`".to_string()),
        };
        match tokens {
            Ok(tokens) => json!(TokenizeReply { count: tokens.len(), tokens, max_model_len: self.model.max_model_len }),
            Err(m) => error_value(invalid(m)),
        }
    }

    fn detokenize(&self, payload: &[u8]) -> Value {
        let request: DetokenizeRequest = match serde_json::from_slice(payload) {
            Ok(r) => r,
            Err(e) => return error_value(invalid(format!("invalid detokenize request: {e}"))),
        };
        if let Err(r) = self.check_model(request.model.as_deref()) {
            return error_value(r);
        }
        if let Some(bad) = request.tokens.iter().find(|&&t| t as usize >= self.model.vocab_size) {
            return error_value(invalid(format!("token id {bad} is outside the vocabulary")));
        }
        match self.tokenizer.decode(&request.tokens) {
            Ok(prompt) => json!({ "prompt": prompt }),
            Err(e) => error_value(invalid(e.to_string())),
        }
    }

    /// Records how long an operation took.
    fn observe(&self, operation: &'static str, started: Instant) {
        let series = [(labels::MODEL, self.model.name.clone()), (labels::OPERATION, operation.to_string())];
        metrics::histogram!(names::TOKENIZER_DURATION, &series).record(started.elapsed().as_secs_f64());
    }

    fn models(&self) -> Value {
        json!({"object": "list", "data": [{"id": self.model.name, "object": "model", "created": self.created,
                                            "owned_by": "pagemesh", "root": self.model.name,
                                            "max_model_len": self.model.max_model_len}]})
    }
}

fn error_value(r: Rejection) -> Value {
    json!(ErrorReply::new(None, r.kind, r.message))
}

impl Actor for TokenizerService {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        pagemesh_bus::refusals::register("tokenizer", &["generate"]);
        let s = &self.bus.subjects;
        let subscriptions = vec![
            Subscription::in_queue(s.generate().subject(), TOKENIZER_QUEUE, Incoming::Generate),
            Subscription::in_queue(s.tokenize().subject(), TOKENIZER_QUEUE, Incoming::Tokenize),
            Subscription::in_queue(s.detokenize().subject(), TOKENIZER_QUEUE, Incoming::Detokenize),
            Subscription::in_queue(s.models().subject(), TOKENIZER_QUEUE, Incoming::Models),
        ];
        listen(self, ctx, self.bus.client.clone(), subscriptions, "tokenizer");
    }
}

/// Longest wait for one acknowledgement of a submit.
const SUBMIT_ACK_TIMEOUT: Duration = Duration::from_millis(1500);
/// Longest a submit is retried for before the client hears that no scheduler is there.
const SUBMIT_DEADLINE: Duration = Duration::from_secs(6);

/// Sends a request to the scheduler and waits for its acknowledgement, sending it again
/// (the scheduler ignores repeats) until one comes or [`SUBMIT_DEADLINE`] passes: a standby
/// scheduler taking over answers the repeat.
async fn hand_to_scheduler(bus: &Bus, submit: &SubmitRequest) -> Result<(), String> {
    let deadline = tokio::time::Instant::now() + SUBMIT_DEADLINE;
    loop {
        let answer = bus.request_about(&bus.subjects.submit(), submit, SUBMIT_ACK_TIMEOUT, &submit.request_id).await;
        let last = tokio::time::Instant::now() >= deadline;
        match answer {
            Ok(_) => return Ok(()),
            Err(BusError::NoResponders(_)) if !last => tokio::time::sleep(Duration::from_millis(250)).await,
            Err(BusError::Timeout(_)) if !last => {}
            Err(e) => return Err(format!("no scheduler accepted the request: {e}")),
        }
    }
}

impl Tokenizing {
    /// A generate request checked, rendered and tokenized, ready for the scheduler.
    fn generate(&self, msg: &async_nats::Message, reply: &str) -> Result<SubmitRequest, (Option<String>, Rejection)> {
        let started = Instant::now();
        let prepared = self
            .prepare(&msg.payload, reply)
            .map(|submit| SubmitRequest { owner: pagemesh_bus::bus::requester_account(msg), ..submit });
        self.observe("generate", started);
        match &prepared {
            Ok(submit) => {
                tracing::debug!(prompt_tokens = submit.prompt_token_ids.len(), "tokenizer: request tokenized")
            }
            Err((_, rejection)) => {
                tracing::debug!(error = %rejection.message, "tokenizer: request refused");
                request_error(&self.model.name, rejection.kind);
            }
        }
        prepared
    }

    /// The answer to a tokenize, detokenize or models request (by the subject it came on).
    fn answer(&self, item: &Incoming) -> Value {
        let started = Instant::now();
        match item {
            Incoming::Tokenize(msg) => {
                let answer = self.tokenize(&msg.payload);
                self.observe("tokenize", started);
                answer
            }
            Incoming::Detokenize(msg) => {
                let answer = self.detokenize(&msg.payload);
                self.observe("detokenize", started);
                answer
            }
            Incoming::Models(_) | Incoming::Generate(_) => self.models(),
        }
    }
}

/// Runs `job` on the blocking pool once a permit is free.
async fn off_the_loop<T: Send + 'static>(
    permits: Arc<tokio::sync::Semaphore>,
    job: impl FnOnce() -> T + Send + 'static,
) -> Result<T, String> {
    let _permit = permits.acquire_owned().await.map_err(|e| e.to_string())?;
    tokio::task::spawn_blocking(job).await.map_err(|e| format!("the tokenizer's work failed: {e}"))
}

impl StreamHandler<Incoming> for TokenizerService {
    fn handle(&mut self, item: Incoming, ctx: &mut Self::Context) {
        let bus = self.bus.clone();
        let (work, permits) = (self.work.clone(), self.permits.clone());
        match item {
            Incoming::Generate(msg) => {
                let Some(reply) = msg.reply.as_ref().map(|r| r.to_string()) else {
                    tracing::warn!("tokenizer: a generate request without a reply inbox was dropped");
                    return;
                };
                if let Err(e) = limits::check_reply_subject(&reply) {
                    refuse("tokenizer", "generate", &e);
                    return;
                }
                // The work on it is logged under the request id its headers name.
                let span = pagemesh_bus::trace::request_id(msg.headers.as_ref())
                    .map_or_else(tracing::Span::none, |id| pagemesh_bus::request_span!(id));
                let in_span = span.clone();
                ctx.spawn(
                    async move {
                        let to = reply.clone();
                        let job = move || in_span.in_scope(|| work.generate(&msg, &to));
                        let prepared = off_the_loop(permits, job).await;
                        let prepared =
                            prepared.map_err(|m| (None, Rejection { kind: ErrorKind::Internal, message: m }));
                        let (request_id, error) = match prepared.and_then(|p| p) {
                            Ok(submit) => match hand_to_scheduler(&bus, &submit).await {
                                Ok(()) => return,
                                Err(message) => {
                                    (Some(submit.request_id), Rejection { kind: ErrorKind::Unavailable, message })
                                }
                            },
                            Err(refused) => refused,
                        };
                        let about = request_id.clone().unwrap_or_default();
                        let error = ErrorReply::new(request_id, error.kind, error.message);
                        let _ = bus.publish_about(&Topic::json(reply), &error, &about).await;
                    }
                    .instrument(span)
                    .into_actor(self),
                );
            }
            Incoming::Tokenize(ref msg) | Incoming::Detokenize(ref msg) | Incoming::Models(ref msg) => {
                let Some(reply) = msg.reply.as_ref().map(|r| r.to_string()) else { return };
                ctx.spawn(
                    async move {
                        let answer = off_the_loop(permits, move || work.answer(&item))
                            .await
                            .unwrap_or_else(|m| error_value(Rejection { kind: ErrorKind::Internal, message: m }));
                        let _ = bus.publish(&Topic::<Value>::json(reply), &answer).await;
                    }
                    .into_actor(self),
                );
            }
        }
    }
}
