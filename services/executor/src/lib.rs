//! The pagemesh executor.
//!
//! It loads a Llama-family model (Llama 2/3, Mistral, Qwen2) from a Hugging Face directory
//! and runs the [`StepPlan`](pagemesh_shared::StepPlan)s the scheduler sends: block swaps and
//! copies, one forward pass over a flat batch of prefill chunks and decode tokens reading and
//! writing the paged KV cache, and sampling. It never allocates KV blocks itself.

pub mod backends;
pub mod config;
pub mod cpu;
pub mod engine_args;
pub mod error;
pub mod executor;
/// GGUF files ([`pagemesh_gguf`]), re-exported where the executor's loaders use them.
pub use pagemesh_gguf as gguf;
pub mod gguf_weights;
pub mod gpu;
pub mod quant;
pub mod sampling;
#[cfg(feature = "service")]
pub mod service;
pub mod synth;
pub mod weights;

pub use config::ModelConfig;
pub use error::{ExecutorError, Result};
pub use executor::{CacheConfig, CpuExecutor};
pub use weights::WeightDtype;
