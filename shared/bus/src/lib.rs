//! The pagemesh services' side of NATS, shared by every service crate:
//!
//! * [`bus`]: the NATS client (connection, requests with explicit deadlines, ordered
//!   publishing, link state);
//! * [`listen`]: an actor's subscriptions as one stream of its own messages;
//! * [`nats_auth`]: accounts, NKeys and per-role permissions (`pagemesh nats-config`);
//! * [`parts`]: messages over the server's `max_payload` sent in parts and put together;
//! * [`refusals`]: counting and logging invalid messages;
//! * [`metrics_endpoint`]: each process's Prometheus recorder and `/metrics`.

pub mod bus;
pub mod listen;
pub mod logging;
pub mod metrics_endpoint;
pub mod nats_auth;
pub mod parts;
pub mod refusals;
