//! The pagemesh gateway: the OpenAI-compatible HTTP API in front of the mesh.
//!
//! * [`service`]: the routes, server-sent events and error bodies;
//! * [`openai_request`]: OpenAI request bodies checked and turned into mesh requests;
//! * [`openai_logprobs`]: the mesh's log-probabilities as OpenAI's objects;
//! * [`chunk_streams`]: each mesh request's chunks, merged when a request fans out;
//! * [`cors`]: cross-origin requests, with vLLM's flags and defaults;
//! * [`http_guard`]: bounds against hostile HTTP clients (bodies, connections, open files).

pub mod chunk_streams;
pub mod cors;
pub mod http_guard;
pub mod openai_logprobs;
pub mod openai_request;
pub mod service;

pub use service::{configure, count_requests, GatewayState};
