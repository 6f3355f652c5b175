//! The pagemesh scheduler core: a paged-KV-cache block manager and an FCFS
//! continuous-batching scheduler, both pure state machines (no I/O, clock, threads or
//! randomness).
//!
//! * [`block_manager`]: device and host block pools, block tables, reference-counted
//!   sharing, copy-on-write, automatic prefix caching (LRU eviction) and swapping.
//! * [`Scheduler`]: queues (waiting, running, swapped), iteration-level batching with
//!   chunked prefill, `n > 1` sampling by forking, preemption by swap or recompute, and the
//!   [`StepPlan`](pagemesh_shared::StepPlan) protocol of `pagemesh_shared::step`.
//!
//! Scheduling policy in brief (details in the `scheduler` module's docs):
//!
//! * Admission gives a sequence blocks for *all* its known tokens at once (prompt, or
//!   prompt + output after a recompute), minus prefix-cache hits; prefill chunks then never
//!   need blocks, and only decode tokens can run out of them and trigger preemption. While
//!   other requests run, admission also keeps 1% of the device pool free (vLLM's
//!   watermark) so that running decodes are not preempted at once.
//! * `add_request` refuses any request that could not run to completion alone (its `n`
//!   samples of prompt + `max_tokens` tokens, without sharing, exceed the device pool), and
//!   preemption always takes the newest running request; so the oldest running request can
//!   always proceed, and every `schedule()` call with unfinished requests returns a plan
//!   that makes progress.
//! * Within a step, running requests are served oldest first, decode tokens before prefill
//!   chunks, then swapped requests resume, then waiting ones are admitted; a step that
//!   preempted resumes and admits nothing.
//!
//! The driver loop, with a stand-in executor that always samples token 9:
//!
//! ```
//! use pagemesh_scheduler::{NewRequest, Scheduler};
//! use pagemesh_shared::{EngineConfig, SampledToken, SamplingParams, SeqResult, StepOutput, StepPlan};
//!
//! fn execute(plan: &StepPlan) -> StepOutput {
//!     let results = plan
//!         .seqs
//!         .iter()
//!         .filter_map(|s| s.sample.as_ref().map(|spec| (s.seq_id, spec.num_samples)))
//!         .map(|(seq_id, n)| SeqResult {
//!             seq_id,
//!             samples: (0..n).map(|_| SampledToken { token: 9, logprob: None, top_logprobs: vec![] }).collect(),
//!         })
//!         .collect();
//!     StepOutput { step_id: plan.step_id, results }
//! }
//!
//! let mut sched = Scheduler::new(EngineConfig::default(), vec![2]);
//! let params = SamplingParams::greedy(4);
//! sched.add_request(NewRequest { request_id: 1, prompt_token_ids: vec![5, 6, 7], params, seed: 0, resumed_output: vec![] })?;
//! let mut tokens = Vec::new();
//! while sched.has_unfinished_requests() {
//!     if let Some(plan) = sched.schedule() {
//!         let out = execute(&plan);
//!         for event in sched.process_output(&out) {
//!             tokens.extend(event.token.map(|t| t.token));
//!         }
//!     }
//! }
//! assert_eq!(tokens, vec![9, 9, 9, 9]);
//! # Ok::<(), pagemesh_scheduler::AdmissionError>(())
//! ```

#![warn(missing_docs)]

pub mod block_manager;
mod id_map;
#[cfg(test)]
mod proptests;
mod request;
mod scheduler;
#[cfg(feature = "service")]
pub mod service;
mod stats;
#[cfg(test)]
mod testing;

pub use block_manager::{BlockError, BlockManager, Location};
pub use request::{AdmissionError, NewRequest, RequestEvent};
pub use scheduler::{validate_config, Scheduler};
pub use stats::{BlockUsage, KvOccupancy, SchedulerStats};
