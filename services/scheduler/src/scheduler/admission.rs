//! `add_request`: validation and queueing of new requests.

use pagemesh_shared::KvAllocation;

use crate::request::{AdmissionError, NewRequest};

use super::group::{stop_tokens, Group, GroupState, Sequence};
use super::Scheduler;

impl Scheduler {
    /// Queues a request at the back of the waiting queue, or refuses it at once.
    ///
    /// Refused: an empty prompt or invalid parameters ([`AdmissionError::Invalid`], also
    /// when `n` exceeds `max_num_seqs` or the prompt alone exceeds `max_waiting_tokens`),
    /// an id in use by an unfinished request, prompt + `max_tokens` over `max_model_len`
    /// ([`AdmissionError::TooLong`]), a request whose `n` samples of prompt + `max_tokens`
    /// tokens, counted without any block sharing, exceed the device pool
    /// ([`AdmissionError::DoesNotFit`]), and, when the waiting queue already holds
    /// `max_waiting_requests` requests or would exceed `max_waiting_tokens` prompt tokens,
    /// [`AdmissionError::QueueFull`].
    pub fn add_request(&mut self, req: NewRequest) -> Result<(), AdmissionError> {
        self.check_admission(&req)?;
        let prompt_len = req.prompt_token_ids.len();
        let seq_id = self.next_seq_id;
        self.next_seq_id += 1;
        let arrival = self.next_arrival;
        self.next_arrival += 1;
        let group = Group {
            request_id: req.request_id,
            arrival,
            prompt_len,
            stop_tokens: stop_tokens(&req.params, &self.eos_token_ids),
            params: std::sync::Arc::new(req.params),
            seed: req.seed,
            seqs: vec![Sequence::new(seq_id, 0, [req.prompt_token_ids, req.resumed_output].concat())],
            forked: false,
            state: GroupState::Waiting,
            num_live: 1,
        };
        self.groups.insert(req.request_id, group);
        self.seq_owner.insert(seq_id, (req.request_id, 0));
        self.waiting.push_back(req.request_id);
        self.waiting_prompt_tokens += prompt_len;
        Ok(())
    }

    /// Positions a sequence of up to `max_len` tokens holds blocks for from admission on
    /// (0 for paged allocation, which takes blocks as tokens are written).
    pub(super) fn reserved_len(&self, max_len: usize) -> usize {
        match self.config.kv_allocation {
            KvAllocation::Paged => 0,
            KvAllocation::Contiguous => max_len,
            KvAllocation::ContiguousMaxLen => self.config.max_model_len,
        }
    }

    /// The most output tokens a request of `prompt_len` prompt tokens and `n` samples may ask
    /// for and still pass the length and pool checks of [`Scheduler::add_request`] (0: not
    /// even one).
    pub fn max_admissible_output(&self, prompt_len: usize, n: usize) -> usize {
        let cfg = &self.config;
        let blocks_each = cfg.num_device_blocks / n.max(1);
        if self.blocks.blocks_for(self.reserved_len(0)) > blocks_each {
            return 0;
        }
        let longest = cfg.max_model_len.min(blocks_each.saturating_mul(cfg.block_size));
        longest.saturating_sub(prompt_len)
    }

    fn check_admission(&self, req: &NewRequest) -> Result<(), AdmissionError> {
        if !req.resumed_output.is_empty() && (req.params.n != 1 || req.resumed_output.len() >= req.params.max_tokens) {
            return Err(AdmissionError::Invalid(
                "a resumed request needs n = 1 and fewer resumed tokens than max_tokens".into(),
            ));
        }
        let cfg = &self.config;
        let prompt_len = req.prompt_token_ids.len();
        if prompt_len == 0 {
            return Err(AdmissionError::Invalid("the prompt is empty".into()));
        }
        req.params.validate().map_err(AdmissionError::Invalid)?;
        if self.groups.contains_key(&req.request_id) {
            return Err(AdmissionError::DuplicateId(req.request_id));
        }
        let n = req.params.n;
        if n > 1 && cfg.kv_allocation.is_contiguous() {
            return Err(AdmissionError::Invalid("the contiguous allocators take n = 1 only".into()));
        }
        if n > cfg.max_num_seqs {
            return Err(AdmissionError::Invalid(format!(
                "n ({n}) exceeds the most sequences per step (max_num_seqs = {})",
                cfg.max_num_seqs
            )));
        }
        let max_tokens = req.params.max_tokens;
        let max_len = prompt_len.saturating_add(max_tokens);
        if max_len > cfg.max_model_len {
            return Err(AdmissionError::TooLong { prompt_len, max_tokens, max_model_len: cfg.max_model_len });
        }
        // Worst case with no sharing at all: after a recompute preemption the samples are
        // re-prefilled as independent sequences. Anything within this bound can always run
        // to completion alone, which is what guarantees progress.
        let needed_blocks = n.saturating_mul(self.blocks.blocks_for(max_len.max(self.reserved_len(max_len))));
        if needed_blocks > cfg.num_device_blocks {
            return Err(AdmissionError::DoesNotFit { needed_blocks, n, max_len, pool_blocks: cfg.num_device_blocks });
        }
        if prompt_len > cfg.max_waiting_tokens {
            return Err(AdmissionError::Invalid(format!(
                "the prompt has {prompt_len} tokens, more than the waiting queue's limit of {} tokens",
                cfg.max_waiting_tokens
            )));
        }
        if self.waiting.len() >= cfg.max_waiting_requests
            || self.waiting_prompt_tokens + prompt_len > cfg.max_waiting_tokens
        {
            return Err(AdmissionError::QueueFull {
                waiting_requests: self.waiting.len(),
                waiting_tokens: self.waiting_prompt_tokens,
                max_requests: cfg.max_waiting_requests,
                max_tokens: cfg.max_waiting_tokens,
            });
        }
        Ok(())
    }
}
