//! The pagemesh services, each an actix actor talking only over NATS:
//!
//! * [`gateway`]: the OpenAI-compatible HTTP API;
//! * [`tokenizer_service`]: validation, chat templates and tokenization (a queue group);
//! * [`scheduler_service`]: the block tables and queues of every executor, one continuous
//!   batching loop per executor, failover;
//! * [`executor_service`]: the model, running the steps it is sent;
//! * [`detokenizer_service`]: incremental text, stop strings, ordered chunks to the client.
//!
//! [`launch`] builds them from command-line flags; `pagemesh serve` runs all five.
//! [`metrics_endpoint`] exposes each process's Prometheus metrics (names in
//! `pagemesh_shared::metrics`).

pub mod bus;
pub mod chat;
pub mod chunk_streams;
pub mod cuda_device;
pub mod detokenizer_service;
pub mod device_args;
pub mod early_aborts;
pub mod engine_args;
pub mod executor_service;
pub mod fair_queue;
pub mod gateway;
pub mod http_guard;
pub mod launch;
pub mod leadership;
pub mod metrics_endpoint;
pub mod model_hub;
pub mod nats_auth;
pub mod openai_logprobs;
pub mod openai_request;
pub mod refusals;
pub mod scheduler_metrics;
pub mod scheduler_service;
pub mod sim_executor;
pub mod tokenizer_service;
