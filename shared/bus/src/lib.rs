//! The pagemesh services' side of NATS, shared by every service crate:
//!
//! * [`bus`]: the NATS client (connection, requests with explicit deadlines, ordered
//!   publishing, link state);
//! * [`ordered_publisher`]: publishing in order, held while the link is down and the last
//!   seconds published again when it is back;
//! * [`listen`]: an actor's subscriptions as one stream of its own messages;
//! * [`nats_auth`]: accounts, NKeys and per-role permissions (`pagemesh nats-config`);
//! * [`parts`]: messages over the server's `max_payload` sent in parts and put together;
//! * [`logging`]: the services' logs, as text or JSON lines;
//! * [`refusals`]: counting and logging invalid messages;
//! * [`trace`]: one request followed across services (its id in NATS headers, log spans);
//! * [`metrics_endpoint`]: each process's Prometheus recorder and `/metrics`;
//! * [`vllm_names`]: the same series under vLLM's metric names.

pub mod bus;
pub mod listen;
pub mod logging;
pub mod metrics_endpoint;
pub mod nats_auth;
pub mod ordered_publisher;
pub mod parts;
pub mod refusals;
pub mod trace;
pub mod vllm_names;
