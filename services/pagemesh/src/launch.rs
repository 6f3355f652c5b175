//! The service commands: each builds its actors in an actix system and runs until stopped.
//! `serve` runs all five in one process (still talking over NATS), starting a loopback
//! `nats-server` when none is reachable.

use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use actix_web::{web, App, HttpServer};
use clap::Args;
use pagemesh_executor::ModelConfig;
use pagemesh_shared::generation_defaults::{GenerationConfigSource, GenerationDefaults};
use pagemesh_shared::limits::ModelLimits;
use pagemesh_shared::protocol::ExecutorRegistration;
use pagemesh_shared::sampling::MAX_LOGPROBS;
use pagemesh_shared::EngineConfig;
use pagemesh_tokenizer::TextTokenizer;

use pagemesh_bus::bus::{new_id, Bus, NatsOptions};
use pagemesh_bus::metrics_endpoint::MetricsArgs;
use pagemesh_bus::nats_auth::{self, Role};
use pagemesh_detokenizer::service::DetokenizerService;
use pagemesh_executor::backends::DeviceArgs;
use pagemesh_executor::engine_args::{eos_token_ids, EngineArgs};
use pagemesh_executor::service::actor::ExecutorService;
use pagemesh_gateway::service::{configure, count_requests, GatewayState};
use pagemesh_scheduler::service::{SchedulerConfig, SchedulerService};
use pagemesh_tokenizer::service::actor::{ModelInfo, TokenizerService};
use pagemesh_tokenizer::service::prompt_renderer::PromptRenderer;

/// How to reach NATS.
#[derive(Args, Debug, Clone)]
pub struct NatsArgs {
    /// NATS server URL.
    #[arg(long, env = "PAGEMESH_NATS_URL", default_value = "nats://127.0.0.1:4222")]
    pub nats_url: String,
    /// NATS user (with --nats-password).
    #[arg(long, env = "PAGEMESH_NATS_USER")]
    pub nats_user: Option<String>,
    /// NATS password.
    #[arg(long, env = "PAGEMESH_NATS_PASSWORD", hide_env_values = true)]
    pub nats_password: Option<String>,
    /// NATS token.
    #[arg(long, env = "PAGEMESH_NATS_TOKEN", hide_env_values = true)]
    pub nats_token: Option<String>,
    /// NATS credentials file.
    #[arg(long, env = "PAGEMESH_NATS_CREDS")]
    pub nats_creds: Option<PathBuf>,
    /// File holding this service's (or client's) NKey user seed.
    #[arg(long, env = "PAGEMESH_NATS_NKEY")]
    pub nats_nkey: Option<PathBuf>,
    /// Folder written by `pagemesh nats-config`: each service connects with its role's seed
    /// (`<role>.nk`), a client with `client.nk`.
    #[arg(long, env = "PAGEMESH_NATS_AUTH_DIR")]
    pub nats_auth_dir: Option<PathBuf>,
    /// Prefix of every subject.
    #[arg(long, env = "PAGEMESH_SUBJECT_PREFIX", default_value = "pagemesh")]
    pub subject_prefix: String,
}

impl NatsArgs {
    /// The connection options these flags describe, for a service of `role` (none: a client).
    pub fn options(&self, role: Option<Role>) -> Result<NatsOptions, String> {
        let seed_file = match (&self.nats_nkey, &self.nats_auth_dir) {
            (Some(file), _) => Some(file.clone()),
            (None, Some(dir)) => Some(nats_auth::seed_path(dir, role.map_or("client", Role::name))),
            (None, None) => None,
        };
        let nkey_seed = match seed_file {
            Some(path) => Some(nats_auth::read_seed(&path)?.0),
            None => None,
        };
        Ok(NatsOptions {
            url: self.nats_url.clone(),
            user: self.nats_user.clone(),
            password: self.nats_password.clone(),
            token: self.nats_token.clone(),
            creds: self.nats_creds.clone(),
            nkey_seed,
            inbox_prefix: role.map_or("_INBOX", Role::inbox_prefix).to_string(),
            prefix: self.subject_prefix.clone(),
        })
    }
}

/// Flags of `pagemesh executor`.
#[derive(Args, Debug, Clone)]
pub struct ExecutorArgs {
    #[command(flatten)]
    nats: NatsArgs,
    #[command(flatten)]
    engine: EngineArgs,
    /// Name the model is served under (default: the model directory's name).
    #[arg(long)]
    served_model_name: Option<String>,
    /// Instance id (default: random).
    #[arg(long)]
    executor_id: Option<String>,
    #[command(flatten)]
    device: DeviceArgs,
    #[command(flatten)]
    metrics: MetricsArgs,
}

/// Flags of `pagemesh scheduler`.
#[derive(Args, Debug, Clone)]
pub struct SchedulerArgs {
    #[command(flatten)]
    nats: NatsArgs,
    #[command(flatten)]
    engine: EngineArgs,
    #[command(flatten)]
    limits: SchedulerLimits,
    /// Name the model is served under (default: the model directory's name).
    #[arg(long)]
    served_model_name: Option<String>,
    #[command(flatten)]
    metrics: MetricsArgs,
}

/// Queue bounds and timeouts of the scheduler.
#[derive(Args, Debug, Clone)]
pub struct SchedulerLimits {
    /// Most prompt tokens waiting per executor.
    #[arg(long, default_value_t = 1 << 20)]
    max_waiting_tokens: usize,
    /// Milliseconds without a heartbeat after which an executor or detokenizer is gone.
    #[arg(long, default_value_t = 2000)]
    heartbeat_timeout_ms: u64,
    /// Seconds a step may take before its executor is considered gone.
    #[arg(long, default_value_t = 60)]
    step_timeout_s: u64,
    /// Seconds a request waits for an executor when there is none.
    #[arg(long, default_value_t = 30)]
    unplaced_timeout_s: u64,
    /// Most KV blocks an executor may declare in one pool; registrations above it are refused.
    #[arg(long, default_value_t = pagemesh_shared::limits::DEFAULT_MAX_EXECUTOR_BLOCKS, value_parser = clap::value_parser!(u32).range(1..i64::from(u32::MAX)))]
    max_executor_blocks: u32,
    /// Most requests waiting in one executor's own queue; the others wait their turn at the
    /// scheduler, round robin across clients (API keys, NATS client accounts).
    #[arg(long, default_value_t = 32)]
    admission_window: usize,
}

/// Flags of `pagemesh tokenizer`.
#[derive(Args, Debug, Clone)]
pub struct TokenizerArgs {
    #[command(flatten)]
    nats: NatsArgs,
    /// Model directory (tokenizer.json, tokenizer_config.json, config.json), or a Hub id (`owner/name[@revision]`).
    #[arg(long)]
    model: PathBuf,
    /// Name the model is served under (default: the model directory's name).
    #[arg(long)]
    served_model_name: Option<String>,
    /// Longest prompt + output (default: the model's).
    #[arg(long)]
    max_model_len: Option<usize>,
    #[command(flatten)]
    requests: RequestArgs,
    #[command(flatten)]
    metrics: MetricsArgs,
}

/// How requests become token ids and sampling parameters (the tokenizer service's flags,
/// spelled as vLLM spells them).
#[derive(Args, Debug, Clone)]
pub struct RequestArgs {
    /// Tokenizer: a directory with tokenizer.json (and tokenizer_config.json), or a GGUF file
    /// (default: the model's own).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Chat template: a file, or the template's text itself (default: the model's own).
    #[arg(long)]
    chat_template: Option<String>,
    /// Sampling defaults for what a request leaves out: `auto` (the model's
    /// generation_config.json: temperature, top_p, top_k, min_p, repetition_penalty, and
    /// max_new_tokens as a cap on every request), `vllm` (none: the server's own), or a folder
    /// holding a generation_config.json.
    #[arg(long = "generation-config", default_value = "auto")]
    generation_config: GenerationConfigSource,
    /// Seed of the random seeds given to requests that name none, so that a server started
    /// with the same seed answers the same requests in the same order alike (default: random).
    #[arg(long)]
    seed: Option<u64>,
    /// Most logprobs a request may ask for.
    #[arg(long, default_value_t = MAX_LOGPROBS, value_parser = parse_max_logprobs)]
    max_logprobs: usize,
}

/// Reads `--max-logprobs`: 0 to the protocol's bound.
fn parse_max_logprobs(text: &str) -> Result<usize, String> {
    match text.parse::<usize>() {
        Ok(k) if k <= MAX_LOGPROBS => Ok(k),
        _ => Err(format!("`{text}` is not a count from 0 to {MAX_LOGPROBS}")),
    }
}

impl RequestArgs {
    /// Where the tokenizer is read from.
    fn tokenizer_path<'a>(&'a self, model: &'a Path) -> &'a Path {
        self.tokenizer.as_deref().unwrap_or(model)
    }

    /// The prompt renderer: `--chat-template` (a file, or the text), else the tokenizer's.
    fn renderer(&self, model: &Path) -> Result<PromptRenderer, String> {
        let tokenizer = self.tokenizer_path(model);
        match &self.chat_template {
            None => PromptRenderer::load(tokenizer),
            Some(template) => {
                let source = match Path::new(template).is_file() {
                    true => std::fs::read_to_string(template)
                        .map_err(|e| format!("--chat-template: cannot read {template}: {e}"))?,
                    // Text with no template syntax is a file name that was mistyped, as vLLM judges.
                    false if !template.contains(['{', '}', '\n']) => {
                        return Err(format!("--chat-template: {template} is not a file (nor a template)"))
                    }
                    false => template.clone(),
                };
                PromptRenderer::with_template(tokenizer, &source).map_err(|e| format!("--chat-template: {e}"))
            }
        }
    }
}

/// Flags of `pagemesh detokenizer`.
#[derive(Args, Debug, Clone)]
pub struct DetokenizerArgs {
    #[command(flatten)]
    nats: NatsArgs,
    /// Model directory (tokenizer.json), or a Hub id (`owner/name[@revision]`).
    #[arg(long)]
    model: PathBuf,
    /// Tokenizer: a directory with tokenizer.json, or a GGUF file (default: the model's own).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Instance id (default: random).
    #[arg(long)]
    detokenizer_id: Option<String>,
    /// Name the model is served under, for its metrics (default: the model directory's name).
    #[arg(long)]
    served_model_name: Option<String>,
    #[command(flatten)]
    metrics: MetricsArgs,
}

/// Flags of `pagemesh gateway`.
#[derive(Args, Debug, Clone)]
pub struct GatewayArgs {
    #[command(flatten)]
    nats: NatsArgs,
    #[command(flatten)]
    http: HttpArgs,
    #[command(flatten)]
    metrics: MetricsArgs,
}

/// HTTP flags.
#[derive(Args, Debug, Clone)]
pub struct HttpArgs {
    /// Address to listen on.
    #[arg(long, default_value = "0.0.0.0")]
    host: String,
    /// HTTP port.
    #[arg(long, default_value_t = 8000)]
    port: u16,
    /// Accepted API key (repeatable; none: no authentication).
    #[arg(long = "api-key", env = "PAGEMESH_API_KEY", value_delimiter = ',')]
    api_keys: Vec<String>,
    /// Seconds a request body may take to arrive (slower ones get a 408).
    #[arg(long, default_value_t = 15)]
    http_body_timeout_s: u64,
    /// Most HTTP connections held at once (default: what the open-file limit allows, with
    /// room for the rest); more wait in the listen backlog.
    #[arg(long)]
    max_connections: Option<usize>,
    /// Most sequences (prompts × `n`) one HTTP request may ask for.
    #[arg(long, default_value_t = 256)]
    max_fanout: usize,
    #[command(flatten)]
    cors: pagemesh_gateway::cors::CorsArgs,
}

/// Flags of `pagemesh serve`.
#[derive(Args, Debug, Clone)]
pub struct ServeArgs {
    #[command(flatten)]
    nats: NatsArgs,
    #[command(flatten)]
    engine: EngineArgs,
    #[command(flatten)]
    http: HttpArgs,
    #[command(flatten)]
    limits: SchedulerLimits,
    /// Name the model is served under (default: the model directory's name).
    #[arg(long)]
    served_model_name: Option<String>,
    /// Executors to run in this process (0: run them with `pagemesh executor`).
    #[arg(long, default_value_t = 1)]
    num_executors: usize,
    /// Detokenizers to run in this process (0: run them with `pagemesh detokenizer`).
    #[arg(long, default_value_t = 1)]
    num_detokenizers: usize,
    /// Never start a nats-server, even when none is reachable.
    #[arg(long)]
    no_start_nats: bool,
    /// Start the nats-server (when none is reachable) without accounts or permissions: anyone
    /// who reaches it can read and forge every message. For development only.
    #[arg(long)]
    insecure_open_bus: bool,
    /// Backend of the executors in this process.
    #[command(flatten)]
    device: DeviceArgs,
    #[command(flatten)]
    requests: RequestArgs,
    #[command(flatten)]
    metrics: MetricsArgs,
}

fn served_name(name: &Option<String>, model_dir: &Path) -> String {
    name.clone().unwrap_or_else(|| crate::model_hub::default_name(model_dir))
}

async fn connect(nats: &NatsArgs, role: Role) -> Result<Bus, String> {
    let name = format!("pagemesh-{}", role.name());
    Bus::connect(&nats.options(Some(role))?, &name, Duration::from_secs(10)).await.map_err(|e| e.to_string())
}

/// Starts an executor; returns the longest sequence its pool holds.
fn start_executor(
    bus: Bus,
    args: &EngineArgs,
    device: &DeviceArgs,
    model: &str,
    id: Option<String>,
) -> Result<usize, String> {
    let (executor, config) = device.executor_backend(args)?;
    let executor_id = id.unwrap_or_else(new_id);
    pagemesh_shared::limits::check_instance_id(&executor_id).map_err(|e| format!("--executor-id: {e}"))?;
    let registration = ExecutorRegistration {
        executor_id,
        model: model.to_string(),
        block_size: config.block_size,
        num_device_blocks: config.num_device_blocks,
        num_host_blocks: config.num_host_blocks,
        incarnation: rand::random::<u64>(),
        protocol_version: pagemesh_shared::protocol::INTERNAL_PROTOCOL_VERSION,
        step_taken: None,
        step_answered: None,
    };
    tracing::info!(
        "executor {} serving {model} on {} ({} device blocks)",
        registration.executor_id,
        device.device,
        config.num_device_blocks
    );
    ExecutorService::start(bus, executor, registration);
    Ok(config.max_model_len)
}

fn scheduler_config(engine: &EngineArgs, limits: &SchedulerLimits, model: &str) -> Result<SchedulerConfig, String> {
    let config = ModelConfig::load(&engine.model).map_err(|e| e.to_string())?;
    let engine_config = engine.engine_config(&config)?;
    Ok(SchedulerConfig {
        model: model.to_string(),
        eos_token_ids: eos_token_ids(&engine.model, &config.eos_token_ids)?,
        engine: EngineConfig { max_waiting_tokens: limits.max_waiting_tokens, ..engine_config.clone() },
        heartbeat_timeout: Duration::from_millis(limits.heartbeat_timeout_ms),
        step_timeout: Duration::from_secs(limits.step_timeout_s),
        unplaced_timeout: Duration::from_secs(limits.unplaced_timeout_s),
        limits: ModelLimits { vocab_size: config.vocab_size, max_model_len: engine_config.max_model_len },
        max_executor_blocks: limits.max_executor_blocks as usize,
        admission_window: limits.admission_window.max(1),
    })
}

fn tokenizer_service(
    bus: Bus,
    model_dir: &Path,
    name: &str,
    max_len: Option<usize>,
    requests: &RequestArgs,
) -> Result<TokenizerService, String> {
    let tokenizer = Arc::new(TextTokenizer::load(requests.tokenizer_path(model_dir)).map_err(|e| e.to_string())?);
    let renderer = requests.renderer(model_dir)?;
    let config = ModelConfig::load(model_dir).map_err(|e| e.to_string())?;
    let max_model_len = match max_len {
        Some(len) if len > config.max_model_len() => {
            return Err(format!("--max-model-len {len} exceeds the model's {}", config.max_model_len()))
        }
        Some(len) => len,
        None => config.max_model_len(),
    };
    let generation = GenerationDefaults::load(&requests.generation_config, model_dir)?;
    if !generation.is_empty() {
        tracing::info!("sampling defaults from the model's generation config: {generation:?}");
    }
    let info = ModelInfo {
        name: name.to_string(),
        max_model_len,
        vocab_size: config.vocab_size,
        generation,
        max_logprobs: requests.max_logprobs,
        seed: requests.seed,
    };
    Ok(TokenizerService::new(bus, tokenizer, renderer, info))
}

async fn run_gateway(bus: Bus, http: &HttpArgs) -> Result<(), String> {
    http.cors.check()?;
    let cors = http.cors.clone();
    let state = web::Data::new(GatewayState {
        bus,
        api_keys: http.api_keys.clone(),
        body_timeout: Duration::from_secs(http.http_body_timeout_s.max(1)),
        max_fanout: http.max_fanout.max(1),
    });
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
    let fd_limit = pagemesh_gateway::http_guard::raise_fd_limit();
    let per_worker = match http.max_connections {
        Some(total) => total.div_ceil(workers).max(1),
        None => pagemesh_gateway::http_guard::connections_per_worker(fd_limit, workers),
    };
    let server = HttpServer::new(move || {
        App::new()
            .app_data(state.clone())
            .wrap(actix_web::middleware::from_fn(count_requests))
            .wrap(cors.middleware())
            .configure(configure)
    })
    .workers(workers)
    .max_connections(per_worker)
    .backlog(4096)
    .client_request_timeout(Duration::from_secs(5))
    .client_disconnect_timeout(Duration::from_secs(2))
    .keep_alive(Duration::from_secs(15))
    .on_connect(pagemesh_gateway::http_guard::record_socket)
    .bind((http.host.as_str(), http.port))
    .map_err(|e| format!("cannot listen on {}:{}: {e}", http.host, http.port))?;
    tracing::info!("gateway listening on http://{}:{}", http.host, http.port);
    server.run().await.map_err(|e| e.to_string())
}

async fn wait_forever() -> Result<(), String> {
    futures::future::pending::<()>().await;
    Ok(())
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => futures::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate => {}
    }
}

/// Runs a service in an actix system until it ends or the process is told to stop; exits the
/// process from inside the system, so that nothing is torn down outside its runtime.
fn in_system(future: impl std::future::Future<Output = Result<(), String>>) -> Result<(), String> {
    in_system_then(future, || {})
}

/// [`in_system`], running `cleanup` before the process exits.
fn in_system_then(
    future: impl std::future::Future<Output = Result<(), String>>,
    cleanup: impl FnOnce(),
) -> Result<(), String> {
    actix_rt::System::new().block_on(async move {
        let result = tokio::select! {
            r = future => r,
            _ = shutdown_signal() => Ok(()),
        };
        cleanup();
        match result {
            Ok(()) => std::process::exit(0),
            Err(e) => Err(e),
        }
    })
}

/// `pagemesh executor`.
pub fn executor(mut args: ExecutorArgs) -> Result<(), String> {
    pagemesh_executor::backends::cuda::check_device(&args.device, &args.engine)?;
    args.engine.set_threads()?;
    let name = served_name(&args.served_model_name, &args.engine.model);
    args.engine.model = crate::model_hub::resolve(&args.engine.model)?;
    in_system(async move {
        pagemesh_bus::metrics_endpoint::start(&args.metrics, "executor")?;
        let bus = connect(&args.nats, Role::Executor).await?;
        start_executor(bus, &args.engine, &args.device, &name, args.executor_id.clone())?;
        wait_forever().await
    })
}

/// `pagemesh scheduler`.
pub fn scheduler(mut args: SchedulerArgs) -> Result<(), String> {
    let name = served_name(&args.served_model_name, &args.engine.model);
    args.engine.model = crate::model_hub::resolve(&args.engine.model)?;
    let config = scheduler_config(&args.engine, &args.limits, &name)?;
    in_system(async move {
        pagemesh_bus::metrics_endpoint::start(&args.metrics, "scheduler")?;
        let bus = connect(&args.nats, Role::Scheduler).await?;
        SchedulerService::new(bus, config).start();
        wait_forever().await
    })
}

/// `pagemesh tokenizer`.
pub fn tokenizer(mut args: TokenizerArgs) -> Result<(), String> {
    let name = served_name(&args.served_model_name, &args.model);
    args.model = crate::model_hub::resolve(&args.model)?;
    in_system(async move {
        pagemesh_bus::metrics_endpoint::start(&args.metrics, "tokenizer")?;
        let bus = connect(&args.nats, Role::Tokenizer).await?;
        tokenizer_service(bus, &args.model, &name, args.max_model_len, &args.requests)?.start();
        wait_forever().await
    })
}

/// `pagemesh detokenizer`.
pub fn detokenizer(mut args: DetokenizerArgs) -> Result<(), String> {
    let name = served_name(&args.served_model_name, &args.model);
    args.model = crate::model_hub::resolve(&args.model)?;
    let tokenizer =
        Arc::new(TextTokenizer::load(args.tokenizer.as_ref().unwrap_or(&args.model)).map_err(|e| e.to_string())?);
    in_system(async move {
        pagemesh_bus::metrics_endpoint::start(&args.metrics, "detokenizer")?;
        let bus = connect(&args.nats, Role::Detokenizer).await?;
        let id = args.detokenizer_id.clone().unwrap_or_else(new_id);
        pagemesh_shared::limits::check_instance_id(&id).map_err(|e| format!("--detokenizer-id: {e}"))?;
        tracing::info!("detokenizer {id}");
        DetokenizerService::new(bus, id, tokenizer, name).start();
        wait_forever().await
    })
}

/// `pagemesh gateway`.
pub fn gateway(args: GatewayArgs) -> Result<(), String> {
    in_system(async move {
        pagemesh_bus::metrics_endpoint::start(&args.metrics, "gateway")?;
        let bus = connect(&args.nats, Role::Gateway).await?;
        run_gateway(bus, &args.http).await
    })
}

/// Flags of `pagemesh nats-config`.
#[derive(Args, Debug, Clone)]
pub struct NatsConfigArgs {
    /// Folder for the seeds and `nats.conf` (existing seeds are kept).
    #[arg(long)]
    out: PathBuf,
    /// Where nats-server listens.
    #[arg(long, default_value = "0.0.0.0:4222")]
    listen: String,
    /// Prefix of every subject.
    #[arg(long, default_value = "pagemesh")]
    subject_prefix: String,
    /// A client (its own account and seed, `<name>.nk`); repeatable.
    #[arg(long = "client", default_value = "client", value_delimiter = ',')]
    clients: Vec<String>,
}

/// `pagemesh nats-config`.
pub fn nats_config(args: NatsConfigArgs) -> Result<(), String> {
    let layout = nats_auth::write_auth_dir(&args.out, &args.listen, &args.subject_prefix, &args.clients)?;
    println!("wrote {}", nats_auth::config_path(&args.out).display());
    for (role, _) in &layout.roles {
        println!("  {:<12} {}", role.name(), nats_auth::seed_path(&args.out, role.name()).display());
    }
    for (client, _) in &layout.clients {
        println!("  client {:<5} {}", client, nats_auth::seed_path(&args.out, client).display());
    }
    println!("start the server with: nats-server -c {}", nats_auth::config_path(&args.out).display());
    Ok(())
}

/// Where `pagemesh serve` keeps the bus's keys when it starts its own nats-server.
fn default_auth_dir(address: &SocketAddr) -> PathBuf {
    let base = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(std::env::temp_dir);
    base.join(".pagemesh").join(format!("nats-{}", address.port()))
}

/// The address of a `nats://host:port` URL.
fn nats_address(url: &str) -> Option<SocketAddr> {
    let rest = url.split("://").nth(1).unwrap_or(url);
    let host_port = rest.rsplit('@').next().unwrap_or(rest).trim_end_matches('/');
    let host_port = if host_port.contains(':') { host_port.to_string() } else { format!("{host_port}:4222") };
    host_port.to_socket_addrs().ok()?.next()
}

/// A nats-server this process started; stopped when dropped.
struct OwnNatsServer(std::process::Child);

impl Drop for OwnNatsServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Makes sure a nats-server answers at the URL of `nats`: starts one on a loopback address
/// when none does (and `allowed`), with the bus's accounts and permissions unless `insecure`;
/// the services then connect with their roles' seeds, and the client seed is printed.
fn ensure_nats(nats: &mut NatsArgs, allowed: bool, insecure: bool) -> Result<Option<OwnNatsServer>, String> {
    let url = nats.nats_url.clone();
    let Some(address) = nats_address(&url) else {
        return Err(format!("cannot resolve the NATS URL {url}"));
    };
    if TcpStream::connect_timeout(&address, Duration::from_millis(500)).is_ok() {
        return Ok(None);
    }
    if !allowed || !address.ip().is_loopback() {
        return Err(format!("no NATS server answers at {url}"));
    }
    let mut server_args =
        vec!["-a".to_string(), address.ip().to_string(), "-p".to_string(), address.port().to_string()];
    if !insecure {
        let dir = nats.nats_auth_dir.clone().unwrap_or_else(|| default_auth_dir(&address));
        nats_auth::write_auth_dir(&dir, &address.to_string(), &nats.subject_prefix, &["client".to_string()])?;
        server_args = vec!["-c".to_string(), nats_auth::config_path(&dir).display().to_string()];
        tracing::info!(
            "the bus has accounts and permissions: NATS clients connect to {url} with the NKey seed in {} \
             (nats-py: nats.connect(url, nkeys_seed=...); the nats CLI: --nkey ...)",
            nats_auth::seed_path(&dir, "client").display()
        );
        nats.nats_auth_dir = Some(dir);
    }
    let child = std::process::Command::new("nats-server")
        .args(&server_args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .map_err(|e| {
            format!(
                "no NATS server answers at {url}, and nats-server could not be started ({e}). \
                 Install it (Debian/Ubuntu: `apt-get install nats-server`; or see https://nats.io) \
                 or point --nats-url at a running server"
            )
        })?;
    tracing::info!("started nats-server on {address} (no NATS server was reachable at {url})");
    let server = OwnNatsServer(child);
    for _ in 0..50 {
        if TcpStream::connect_timeout(&address, Duration::from_millis(100)).is_ok() {
            return Ok(Some(server));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Err(format!("the nats-server started on {address} does not answer"))
}

/// `pagemesh serve`: all five services in one process.
pub fn serve(mut args: ServeArgs) -> Result<(), String> {
    pagemesh_executor::backends::cuda::check_device(&args.device, &args.engine)?;
    let nats_server = ensure_nats(&mut args.nats, !args.no_start_nats, args.insecure_open_bus)?;
    args.engine.set_threads()?;
    let name = served_name(&args.served_model_name, &args.engine.model);
    args.engine.model = crate::model_hub::resolve(&args.engine.model)?;
    let config = scheduler_config(&args.engine, &args.limits, &name)?;
    let detok_tokenizer =
        Arc::new(TextTokenizer::load(args.requests.tokenizer_path(&args.engine.model)).map_err(|e| e.to_string())?);
    let services = async move {
        pagemesh_bus::metrics_endpoint::start(&args.metrics, "serve")?;
        // One connection per role, each with its own permissions when the bus has them.
        SchedulerService::new(connect(&args.nats, Role::Scheduler).await?, config).start();
        // Executors first: the tokenizer's default output length stops where their pools do.
        let mut max_model_len = args.engine.max_model_len;
        if args.num_executors > 0 {
            let bus = connect(&args.nats, Role::Executor).await?;
            for _ in 0..args.num_executors {
                let fits = start_executor(bus.clone(), &args.engine, &args.device, &name, None)?;
                max_model_len = Some(max_model_len.map_or(fits, |len| len.min(fits)));
            }
        }
        let bus = connect(&args.nats, Role::Tokenizer).await?;
        tokenizer_service(bus, &args.engine.model, &name, max_model_len, &args.requests)?.start();
        if args.num_detokenizers > 0 {
            let bus = connect(&args.nats, Role::Detokenizer).await?;
            for _ in 0..args.num_detokenizers {
                DetokenizerService::new(bus.clone(), new_id(), detok_tokenizer.clone(), name.clone()).start();
            }
        }
        run_gateway(connect(&args.nats, Role::Gateway).await?, &args.http).await
    };
    in_system_then(services, move || drop(nats_server))
}
