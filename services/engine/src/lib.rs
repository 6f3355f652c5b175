//! In-process wiring of the scheduler and one executor, on any backend (the CPU executor, a
//! CUDA GPU, the `sim` backend).
//!
//! [`Engine`] is the thin layer between the pure scheduler and an executor: it resolves seeds,
//! submits requests, hands each [`StepPlan`](pagemesh_shared::StepPlan) to the executor and
//! feeds the result back, and collects each request's samples into a [`RequestOutput`].
//! The mesh puts NATS between the same two parts.

use std::collections::HashMap;

use pagemesh_executor::backends::{DeviceArgs, StepBackend};
use pagemesh_executor::engine_args::{eos_token_ids, EngineArgs};
use pagemesh_executor::{CpuExecutor, ModelConfig};
use pagemesh_scheduler::{AdmissionError, BlockUsage, NewRequest, RequestEvent, Scheduler, SchedulerStats};
use pagemesh_shared::{EngineConfig, FinishReason, SampledToken, SamplingParams};
use serde::Serialize;
use thiserror::Error;

/// Engine failures.
#[derive(Debug, Error)]
pub enum EngineError {
    /// The scheduler refused the request.
    #[error(transparent)]
    Admission(#[from] AdmissionError),
    /// The executor failed a step.
    #[error("{0}")]
    Executor(String),
}

/// One sample's result.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct SampleOutput {
    /// Generated token ids (a stop token included).
    pub token_ids: Vec<u32>,
    /// Per generated token, its log-probability and top alternatives (when asked for).
    pub logprobs: Vec<SampledToken>,
    /// Why it finished.
    pub finish_reason: Option<FinishReason>,
}

/// A finished request.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RequestOutput {
    /// The engine's id of the request.
    pub request_id: u64,
    /// The prompt.
    pub prompt_token_ids: Vec<u32>,
    /// One entry per sample, by sample index.
    pub outputs: Vec<SampleOutput>,
}

impl RequestOutput {
    fn is_finished(&self) -> bool {
        self.outputs.iter().all(|o| o.finish_reason.is_some())
    }
}

/// Counters of an engine run.
#[derive(Debug, Clone, Serialize)]
pub struct EngineStats {
    /// The scheduler's counters.
    #[serde(flatten)]
    pub scheduler: SchedulerStats,
    /// Free blocks now.
    pub free_device_blocks: usize,
    /// Free host blocks now.
    pub free_host_blocks: usize,
    /// Device pool size.
    pub num_device_blocks: usize,
    /// Host pool size.
    pub num_host_blocks: usize,
}

/// The scheduler and one executor (the CPU executor unless said otherwise) in one process.
pub struct Engine<B: StepBackend = CpuExecutor> {
    scheduler: Scheduler,
    executor: B,
    vocab_size: usize,
    next_request_id: u64,
    pending: HashMap<u64, RequestOutput>,
    want_logprobs: HashMap<u64, bool>,
    last_step: Option<StepShape>,
}

/// The size of the last step run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepShape {
    /// Sequences in it.
    pub seqs: usize,
    /// Tokens fed.
    pub tokens: usize,
}

impl Engine {
    /// An engine driving the CPU `executor` (whose cache must have the config's pool sizes).
    pub fn new(executor: CpuExecutor, config: EngineConfig, eos_token_ids: Vec<u32>) -> Self {
        let vocab_size = executor.model().config.vocab_size;
        Engine::on(executor, config, eos_token_ids, vocab_size)
    }
}

impl<B: StepBackend> Engine<B> {
    /// An engine driving `executor`, any backend (whose pools must have the config's sizes),
    /// for a model of `vocab_size` tokens.
    pub fn on(executor: B, config: EngineConfig, eos_token_ids: Vec<u32>, vocab_size: usize) -> Self {
        Self {
            scheduler: Scheduler::new(config, eos_token_ids),
            executor,
            vocab_size,
            next_request_id: 0,
            pending: HashMap::new(),
            want_logprobs: HashMap::new(),
            last_step: None,
        }
    }

    /// The executor.
    pub fn executor(&self) -> &B {
        &self.executor
    }

    /// Tokens in the model's vocabulary.
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// Submits a request; its seed is drawn at random when the params have none.
    pub fn add_request(&mut self, prompt_token_ids: Vec<u32>, params: SamplingParams) -> Result<u64, EngineError> {
        let vocab = self.vocab_size;
        if let Some(bad) = prompt_token_ids.iter().find(|&&t| t as usize >= vocab) {
            return Err(AdmissionError::Invalid(format!(
                "prompt token id {bad} is outside the vocabulary (size {vocab})"
            ))
            .into());
        }
        let request_id = self.next_request_id;
        let seed = params.seed.unwrap_or_else(rand::random);
        let n = params.n;
        let logprobs = params.logprobs.is_some();
        self.scheduler.add_request(NewRequest {
            request_id,
            prompt_token_ids: prompt_token_ids.clone(),
            params,
            seed,
            resumed_output: Vec::new(),
        })?;
        self.next_request_id += 1;
        self.pending.insert(
            request_id,
            RequestOutput { request_id, prompt_token_ids, outputs: vec![SampleOutput::default(); n] },
        );
        self.want_logprobs.insert(request_id, logprobs);
        Ok(request_id)
    }

    /// Aborts a request; its blocks are freed at once.
    pub fn abort(&mut self, request_id: u64) -> Option<RequestOutput> {
        let events = self.scheduler.abort_request(request_id);
        self.apply(events);
        self.take_if_finished(request_id)
    }

    /// The size of the last step run.
    pub fn last_step_shape(&self) -> Option<StepShape> {
        self.last_step
    }

    /// Whether requests are still running or waiting.
    pub fn has_unfinished_requests(&self) -> bool {
        self.scheduler.has_unfinished_requests()
    }

    /// Runs one step and returns the requests that finished in it.
    pub fn step(&mut self) -> Result<Vec<RequestOutput>, EngineError> {
        let Some(plan) = self.scheduler.schedule() else {
            return Ok(Vec::new());
        };
        self.last_step = Some(StepShape { seqs: plan.seqs.len(), tokens: plan.num_tokens() });
        let output = self.executor.execute(&plan).map_err(EngineError::Executor)?;
        let events = self.scheduler.process_output(&output);
        Ok(self.apply(events))
    }

    fn apply(&mut self, events: Vec<RequestEvent>) -> Vec<RequestOutput> {
        let mut finished = Vec::new();
        for event in events {
            let keep_logprobs = self.want_logprobs.get(&event.request_id).copied().unwrap_or(false);
            let Some(request) = self.pending.get_mut(&event.request_id) else { continue };
            let Some(sample) = request.outputs.get_mut(event.sample_index as usize) else { continue };
            if let Some(token) = event.token {
                sample.token_ids.push(token.token);
                if keep_logprobs {
                    sample.logprobs.push(token);
                }
            }
            if event.finish.is_some() {
                sample.finish_reason = event.finish;
                if request.is_finished() {
                    finished.push(event.request_id);
                }
            }
        }
        finished.into_iter().filter_map(|id| self.take_if_finished(id)).collect()
    }

    fn take_if_finished(&mut self, request_id: u64) -> Option<RequestOutput> {
        if self.pending.get(&request_id).is_some_and(RequestOutput::is_finished) {
            self.want_logprobs.remove(&request_id);
            self.pending.remove(&request_id)
        } else {
            None
        }
    }

    /// Submits all requests at once and steps until every one has finished; results are in
    /// input order, a refused request giving its error.
    pub fn generate(
        &mut self,
        requests: Vec<(Vec<u32>, SamplingParams)>,
    ) -> Result<Vec<Result<RequestOutput, AdmissionError>>, EngineError> {
        let mut ids = Vec::with_capacity(requests.len());
        for (prompt, params) in requests {
            ids.push(match self.add_request(prompt, params) {
                Ok(id) => Ok(id),
                Err(EngineError::Admission(e)) => Err(e),
                Err(e) => return Err(e),
            });
        }
        let mut done: HashMap<u64, RequestOutput> = HashMap::new();
        while self.has_unfinished_requests() {
            for out in self.step()? {
                done.insert(out.request_id, out);
            }
        }
        Ok(ids.into_iter().map(|id| id.map(|id| done.remove(&id).expect("every admitted request finishes"))).collect())
    }

    /// Counters and pool occupancy.
    pub fn stats(&self) -> EngineStats {
        let BlockUsage { device_total, device_free, host_total, host_free } = self.scheduler.block_usage();
        EngineStats {
            scheduler: self.scheduler.stats().clone(),
            free_device_blocks: device_free,
            free_host_blocks: host_free,
            num_device_blocks: device_total,
            num_host_blocks: host_total,
        }
    }

    /// Checks the block manager's invariants.
    pub fn check_invariants(&self) -> Result<(), String> {
        self.scheduler.check_invariants()
    }
}

/// Sets the threads, loads the model `args` names and builds an in-process engine.
pub fn build(args: &EngineArgs) -> Result<Engine, String> {
    args.set_threads()?;
    let (executor, config) = args.load_executor()?;
    let eos = eos_token_ids(&args.model, &executor.model().config.eos_token_ids)?;
    Ok(Engine::new(executor, config, eos))
}

/// Sets the threads and builds an in-process engine on the backend `device` names (the CPU
/// executor, a CUDA GPU or the `sim` backend).
pub fn build_on(args: &EngineArgs, device: &DeviceArgs) -> Result<Engine<Box<dyn StepBackend>>, String> {
    args.set_threads()?;
    let model = ModelConfig::load(&args.model).map_err(|e| e.to_string())?;
    let (backend, config) = device.executor_backend(args)?;
    let eos = eos_token_ids(&args.model, &model.eos_token_ids)?;
    Ok(Engine::on(backend, config, eos, model.vocab_size))
}
