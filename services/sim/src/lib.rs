//! The `sim` executor backend and the simulation benchmark.
//!
//! * [`presets`] holds GPU and model shapes (A100-80GB, H100-80GB, 24 GB cards; Llama-2-7B/13B,
//!   Llama-3-8B, ChatGLM3-6B).
//! * [`cost`] is the cost model: how long a step takes on a GPU (FLOPs over its matmul rate,
//!   weight and KV bytes over its memory bandwidth) and how many KV blocks fit in its memory.
//! * [`executor`] has [`SimExecutor`], which answers a [`StepPlan`](pagemesh_shared::StepPlan)
//!   with tokens from a fixed pseudo-random rule and the step's simulated duration.
//! * [`workload`] draws synthetic ShareGPT-like and Alpaca-like request streams (or a JSONL
//!   dataset) with Poisson arrivals.
//! * [`bench`] runs the scheduler and a sim executor in one process on a simulated clock, and
//!   its report.
//! * [`stats`] summarizes latencies (percentiles).
//! * [`rng`] is the seeded random source.

#![warn(missing_docs)]

pub mod bench;
pub mod cost;
pub mod executor;
pub mod presets;
pub mod rng;
pub mod stats;
pub mod workload;

pub use cost::CostModel;
pub use executor::SimExecutor;
pub use presets::{GpuSpec, ModelShape};
