//! The NATS connection every service shares: connection options from the command line, the
//! subjects, and publishing and requests on typed topics and endpoints
//! (`pagemesh_shared::wire`).

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pagemesh_shared::metrics::{self as names, labels};
use pagemesh_shared::subjects::Subjects;
use pagemesh_shared::wire::{Endpoint, Topic, WireError};
use serde::de::DeserializeOwned;
use serde::Serialize;

/// How to reach NATS.
#[derive(Debug, Clone)]
pub struct NatsOptions {
    /// Server URL, e.g. `nats://127.0.0.1:4222`.
    pub url: String,
    /// User (with `password`).
    pub user: Option<String>,
    /// Password (with `user`).
    pub password: Option<String>,
    /// Token.
    pub token: Option<String>,
    /// A `.creds` file.
    pub creds: Option<PathBuf>,
    /// An NKey user seed (`SU…`).
    pub nkey_seed: Option<String>,
    /// Prefix of this client's reply inboxes.
    pub inbox_prefix: String,
    /// Subject prefix.
    pub prefix: String,
}

/// Bus failures.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// Could not connect.
    #[error("cannot connect to NATS at {url}: {message}")]
    Connect {
        /// Where.
        url: String,
        /// Why.
        message: String,
    },
    /// Publishing, subscribing or a request failed.
    #[error("NATS: {0}")]
    Nats(String),
    /// A message could not be encoded or decoded.
    #[error("bad message on {subject}: {message}")]
    Codec {
        /// Where.
        subject: String,
        /// Why.
        message: String,
    },
    /// A request got no answer in time.
    #[error("no answer on {0} in time")]
    Timeout(String),
    /// Nobody listens on a request's subject.
    #[error("no responders on {0}")]
    NoResponders(String),
}

pub use pagemesh_shared::link::LinkState;

/// A connected client with the deployment's subjects.
#[derive(Clone)]
pub struct Bus {
    /// The client.
    pub client: async_nats::Client,
    /// The subjects.
    pub subjects: Subjects,
    /// Reconnections seen since start.
    pub reconnects: Arc<AtomicU64>,
    link: Arc<Mutex<LinkState>>,
    /// Whether the link was lost since it was first established.
    ever_lost: Arc<AtomicBool>,
    /// When the link was last lost (after it was first established).
    last_loss: Arc<tokio::sync::watch::Sender<Option<Instant>>>,
    /// Requests sent in parts so far.
    split_requests: Arc<AtomicU64>,
}

impl Bus {
    /// Connects (retrying for up to `wait`), with the options' credentials. Reconnections
    /// after the first connection count in `pagemesh_nats_reconnects_total`, labelled with
    /// `name` less its `pagemesh-` prefix.
    pub async fn connect(options: &NatsOptions, name: &str, wait: Duration) -> Result<Self, BusError> {
        let reconnects = Arc::new(AtomicU64::new(0));
        let established = Arc::new(AtomicBool::new(false));
        let link = Arc::new(Mutex::new(LinkState { connected: false, since: Instant::now() }));
        let ever_lost = Arc::new(AtomicBool::new(false));
        let last_loss = Arc::new(tokio::sync::watch::Sender::new(None));
        let service = name.strip_prefix("pagemesh-").unwrap_or(name).to_string();
        let reconnect_metric = metrics::counter!(names::NATS_RECONNECTS, labels::SERVICE => service);
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let counter = reconnects.clone();
            let (established_now, metric) = (established.clone(), reconnect_metric.clone());
            let (link_now, lost_now, loss_now) = (link.clone(), ever_lost.clone(), last_loss.clone());
            let mut connect = match (&options.nkey_seed, &options.creds, &options.token, &options.user) {
                (Some(seed), _, _, _) => async_nats::ConnectOptions::with_nkey(seed.clone()),
                (None, Some(path), _, _) => async_nats::ConnectOptions::with_credentials_file(path.clone())
                    .await
                    .map_err(|e| BusError::Connect { url: options.url.clone(), message: e.to_string() })?,
                (None, None, Some(token), _) => async_nats::ConnectOptions::with_token(token.clone()),
                (None, None, None, Some(user)) => async_nats::ConnectOptions::with_user_and_password(
                    user.clone(),
                    options.password.clone().unwrap_or_default(),
                ),
                (None, None, None, None) => async_nats::ConnectOptions::new(),
            };
            connect = connect
                .name(name)
                .custom_inbox_prefix(&options.inbox_prefix)
                // Each request bounds its own wait (a step may take longer than any default).
                .request_timeout(None)
                .retry_on_initial_connect()
                .max_reconnects(None)
                .event_callback(move |event| {
                    let counter = counter.clone();
                    let (established, metric) = (established_now.clone(), metric.clone());
                    let (link, lost, loss) = (link_now.clone(), lost_now.clone(), loss_now.clone());
                    async move {
                        let up = match event {
                            async_nats::Event::Connected => Some(true),
                            async_nats::Event::Disconnected => Some(false),
                            _ => None,
                        };
                        if let (Some(connected), Ok(mut state)) = (up, link.lock()) {
                            *state = LinkState { connected, since: Instant::now() };
                        }
                        if up == Some(false) && established.load(Ordering::Relaxed) {
                            lost.store(true, Ordering::Relaxed);
                            loss.send_replace(Some(Instant::now()));
                        }
                        if matches!(event, async_nats::Event::Connected) {
                            counter.fetch_add(1, Ordering::Relaxed);
                            if established.load(Ordering::Relaxed) {
                                metric.increment(1);
                            }
                        }
                    }
                });
            let attempt = tokio::time::timeout(Duration::from_secs(2), connect.connect(options.url.as_str())).await;
            match attempt {
                Ok(Ok(client)) => {
                    // Wait for the first connection to be established.
                    let flushed = tokio::time::timeout(Duration::from_secs(2), client.flush()).await;
                    if let Ok(Ok(())) = flushed {
                        reconnects.store(0, Ordering::Relaxed);
                        established.store(true, Ordering::Relaxed);
                        if let Ok(mut state) = link.lock() {
                            *state = LinkState { connected: true, since: Instant::now() };
                        }
                        return Ok(Self {
                            client,
                            subjects: Subjects::new(&options.prefix),
                            reconnects,
                            link,
                            ever_lost,
                            last_loss,
                            split_requests: Arc::default(),
                        });
                    }
                }
                Ok(Err(e)) if tokio::time::Instant::now() >= deadline => {
                    return Err(BusError::Connect { url: options.url.clone(), message: e.to_string() })
                }
                _ => {}
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(BusError::Connect { url: options.url.clone(), message: "timed out".into() });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Requests this connection sent in parts (larger than the server's `max_payload`).
    pub fn split_requests(&self) -> u64 {
        self.split_requests.load(Ordering::Relaxed)
    }

    /// Waits until the link is up and, if it came back after a loss, has been back for
    /// `grace`: core NATS drops what is published to a subscription that is not back yet, and
    /// other clients reconnect on their own schedule.
    pub async fn wait_until_rejoined(&self, grace: Duration) {
        // Never lost since it was established: up (the common case, checked without a lock).
        if !self.ever_lost.load(Ordering::Relaxed) {
            return;
        }
        loop {
            let link = self.link();
            let up_for = link.since.elapsed();
            if link.connected && up_for >= grace {
                return;
            }
            let pause = if link.connected { grace - up_for } else { Duration::from_millis(100) };
            tokio::time::sleep(pause).await;
        }
    }

    /// When the link was last lost after it was first established (None: never), watched:
    /// it changes at each loss.
    pub fn last_loss(&self) -> tokio::sync::watch::Receiver<Option<Instant>> {
        self.last_loss.subscribe()
    }

    /// The connection's state now.
    pub fn link(&self) -> LinkState {
        self.link.lock().map(|s| *s).unwrap_or(LinkState { connected: true, since: Instant::now() })
    }

    /// Publishes a message on its topic.
    pub async fn publish<M: Serialize + DeserializeOwned>(
        &self,
        topic: &Topic<M>,
        message: &M,
    ) -> Result<(), BusError> {
        let payload = topic.encode(message)?;
        self.publish_bytes(topic.subject().to_string(), payload).await
    }

    /// Publishes a message about one request on its topic, naming the request in its headers
    /// ([`crate::trace`]).
    pub async fn publish_about<M: Serialize + DeserializeOwned>(
        &self,
        topic: &Topic<M>,
        message: &M,
        request_id: &str,
    ) -> Result<(), BusError> {
        let payload = topic.encode(message)?;
        let headers = crate::trace::headers(request_id);
        if headers.is_empty() {
            return self.publish_bytes(topic.subject().to_string(), payload).await;
        }
        self.client
            .publish_with_headers(topic.subject().to_string(), headers, payload.into())
            .await
            .map_err(|e| BusError::Nats(e.to_string()))
    }

    /// Publishes a message about one request on its topic, asking for answers on `reply` and
    /// naming the request in its headers ([`crate::trace`]).
    pub async fn publish_with_reply_about<M: Serialize + DeserializeOwned>(
        &self,
        topic: &Topic<M>,
        reply: String,
        message: &M,
        request_id: &str,
    ) -> Result<(), BusError> {
        let payload = topic.encode(message)?;
        let headers = crate::trace::headers(request_id);
        self.client
            .publish_with_reply_and_headers(topic.subject().to_string(), reply, headers, payload.into())
            .await
            .map_err(|e| BusError::Nats(e.to_string()))
    }

    /// Answers a request of `endpoint` on its reply subject.
    pub async fn respond<Req, Resp>(
        &self,
        endpoint: &Endpoint<Req, Resp>,
        reply: String,
        response: &Resp,
    ) -> Result<(), BusError>
    where
        Req: Serialize + DeserializeOwned,
        Resp: Serialize + DeserializeOwned,
    {
        let payload = endpoint.encode_response(response)?;
        self.publish_bytes(reply, payload).await
    }

    async fn publish_bytes(&self, subject: String, payload: Vec<u8>) -> Result<(), BusError> {
        self.client.publish(subject, payload.into()).await.map_err(|e| BusError::Nats(e.to_string()))
    }

    /// Sends a request and decodes its answer, waiting at most `timeout`. A request larger
    /// than the server takes in one message (its `max_payload`) goes in parts
    /// ([`crate::parts`]): the receiver must put them together.
    pub async fn request<Req, Resp>(
        &self,
        endpoint: &Endpoint<Req, Resp>,
        request: &Req,
        timeout: Duration,
    ) -> Result<Resp, BusError>
    where
        Req: Serialize + DeserializeOwned,
        Resp: Serialize + DeserializeOwned,
    {
        self.request_with(endpoint, request, timeout, None).await
    }

    /// [`request`](Self::request) for a message about one request, named in its headers
    /// ([`crate::trace`]).
    pub async fn request_about<Req, Resp>(
        &self,
        endpoint: &Endpoint<Req, Resp>,
        request: &Req,
        timeout: Duration,
        request_id: &str,
    ) -> Result<Resp, BusError>
    where
        Req: Serialize + DeserializeOwned,
        Resp: Serialize + DeserializeOwned,
    {
        self.request_with(endpoint, request, timeout, Some(request_id)).await
    }

    async fn request_with<Req, Resp>(
        &self,
        endpoint: &Endpoint<Req, Resp>,
        request: &Req,
        timeout: Duration,
        about: Option<&str>,
    ) -> Result<Resp, BusError>
    where
        Req: Serialize + DeserializeOwned,
        Resp: Serialize + DeserializeOwned,
    {
        let subject = endpoint.subject().to_string();
        let payload = endpoint.requests().encode(request)?;
        let max_payload = self.client.server_info().max_payload;
        let mut parts = crate::parts::split(payload, max_payload);
        if parts.len() > 1 {
            self.split_requests.fetch_add(1, Ordering::Relaxed);
        }
        let mut last = parts.pop().unwrap_or_default();
        if let Some(id) = about.filter(|id| pagemesh_shared::limits::check_request_id(id).is_ok()) {
            last.headers.insert(crate::trace::REQUEST_ID_HEADER, id);
        }
        for part in parts {
            self.client
                .publish_with_headers(subject.clone(), part.headers, part.payload.into())
                .await
                .map_err(|e| BusError::Nats(e.to_string()))?;
        }
        let mut request = async_nats::Request::new().payload(last.payload.into());
        if !last.headers.is_empty() {
            request = request.headers(last.headers);
        }
        let answer = tokio::time::timeout(timeout, self.client.send_request(subject.clone(), request))
            .await
            .map_err(|_| BusError::Timeout(subject.clone()))?
            .map_err(|e| match e.kind() {
                async_nats::RequestErrorKind::NoResponders => BusError::NoResponders(subject.clone()),
                async_nats::RequestErrorKind::TimedOut => BusError::Timeout(subject.clone()),
                _ => BusError::Nats(e.to_string()),
            })?;
        Ok(endpoint.decode_response(&answer.payload)?)
    }
}

impl From<WireError> for BusError {
    fn from(e: WireError) -> Self {
        BusError::Codec { subject: e.subject, message: e.message }
    }
}

pub use crate::ordered_publisher::{OrderedPublisher, CLIENT_REJOIN_GRACE};

/// The NATS account a message was sent from, as the server reports it in the
/// `Nats-Request-Info` header of a request imported from another account (clients' accounts
/// import the public subjects with `share: true`). None for messages from the same account.
pub fn requester_account(msg: &async_nats::Message) -> Option<String> {
    let info = msg.headers.as_ref()?.get("Nats-Request-Info")?;
    let info: serde_json::Value = serde_json::from_str(info.as_str()).ok()?;
    let account = info.get("acc")?.as_str()?;
    (!account.is_empty() && account.len() <= 256).then(|| account.to_string())
}

/// A fresh random id (hex), for instances and requests.
pub fn new_id() -> String {
    format!("{:016x}", rand::random::<u64>())
}
