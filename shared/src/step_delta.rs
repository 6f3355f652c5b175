//! Step plans on the wire, incrementally: what an executor already knows of a sequence is not
//! sent again.
//!
//! The scheduler's core makes whole [`StepPlan`]s; the executor runs whole plans. Between them,
//! each side keeps a [`PlanMirror`] of what the executor has been told per sequence (its block
//! table, sampling parameters and seed). The sender turns a plan into a [`PlanDelta`] against
//! its mirror — a sequence's parameters and seed go once (and again only if they change), its
//! block table as the ids appended since the last step (or whole, when it changed otherwise:
//! a swap-in, a recompute, a copy-on-write) — and the receiver rebuilds the same plan from the delta
//! against its own mirror. Both apply `released` first, then the sequences in order, so the two
//! mirrors stay equal as long as every delta sent is received once, in order; a sender starts
//! a fresh mirror (a new session) whenever that may not hold (a lost or failed step).

use std::collections::HashMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::sampling::SamplingParams;
use crate::step::{BlockId, SampleSpec, ScheduledSeq, SeqId, StepPlan};

/// A [`SampleSpec`] without the parameters the executor already has.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SampleDelta {
    /// The request's parameters, when the executor does not have them yet (or they changed);
    /// `None`: as last sent for this sequence.
    pub params: Option<SamplingParams>,
    /// See [`SampleSpec::seed`]; `None`: as last sent for this sequence.
    pub seed: Option<u64>,
    /// See [`SampleSpec::sample_index`].
    pub sample_index: u32,
    /// See [`SampleSpec::num_samples`].
    pub num_samples: u32,
    /// See [`SampleSpec::prompt_len`].
    pub prompt_len: usize,
    /// See [`SampleSpec::output_len`].
    pub output_len: usize,
    /// See [`SampleSpec::banned_tokens`].
    pub banned_tokens: Vec<u32>,
}

/// A [`ScheduledSeq`] as sent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SeqDelta {
    /// Which sequence.
    pub seq_id: SeqId,
    /// Tokens fed this step.
    pub tokens: Vec<u32>,
    /// Position of `tokens[0]`.
    pub start_pos: usize,
    /// The whole block table, when it changed other than by appending (or the executor does
    /// not have it yet); `None`: the table the executor has, with `new_blocks` appended.
    pub block_table: Option<Vec<BlockId>>,
    /// Blocks appended to the table (after `block_table`, when that is sent).
    pub new_blocks: Vec<BlockId>,
    /// See [`ScheduledSeq::history`].
    pub history: Option<Vec<u32>>,
    /// How to sample, if this step samples.
    pub sample: Option<SampleDelta>,
}

/// A [`StepPlan`] as sent.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PlanDelta {
    /// See [`StepPlan::step_id`].
    pub step_id: u64,
    /// See [`StepPlan::swap_out`].
    pub swap_out: Vec<(BlockId, BlockId)>,
    /// See [`StepPlan::swap_in`].
    pub swap_in: Vec<(BlockId, BlockId)>,
    /// See [`StepPlan::copy`].
    pub copy: Vec<(BlockId, BlockId)>,
    /// See [`StepPlan::released`].
    pub released: Vec<SeqId>,
    /// The sequences that run.
    pub seqs: Vec<SeqDelta>,
}

/// A delta that does not fit the receiver's mirror (it names what it does not know).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{message}")]
pub struct DeltaError {
    /// Why.
    pub message: String,
    /// The sequences at fault.
    pub seq_ids: Vec<SeqId>,
}

/// What the executor knows of one sequence.
#[derive(Debug, Clone, Default, PartialEq)]
struct Known {
    block_table: Vec<BlockId>,
    params: Option<Arc<SamplingParams>>,
    seed: Option<u64>,
}

/// What an executor has been told, per sequence (kept alike on both ends).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PlanMirror {
    seqs: HashMap<SeqId, Known>,
}

impl PlanMirror {
    /// An empty mirror (a new session).
    pub fn new() -> Self {
        Self::default()
    }

    /// Sequences remembered.
    pub fn len(&self) -> usize {
        self.seqs.len()
    }

    /// Whether no sequence is remembered.
    pub fn is_empty(&self) -> bool {
        self.seqs.is_empty()
    }

    /// The delta that tells an executor with this mirror about `plan` (and the mirror updated).
    pub fn encode(&mut self, plan: &StepPlan) -> PlanDelta {
        for seq_id in &plan.released {
            self.seqs.remove(seq_id);
        }
        let seqs = plan
            .seqs
            .iter()
            .map(|seq| {
                let known = self.seqs.entry(seq.seq_id).or_default();
                let (block_table, new_blocks) = match seq.block_table.strip_prefix(known.block_table.as_slice()) {
                    Some(appended) if !known.block_table.is_empty() || seq.block_table.is_empty() => {
                        (None, appended.to_vec())
                    }
                    _ => (Some(seq.block_table.clone()), Vec::new()),
                };
                known.block_table.clone_from(&seq.block_table);
                let sample = seq.sample.as_ref().map(|spec| {
                    // The core's plans share one `Arc` per request: usually a pointer comparison.
                    let same =
                        known.params.as_ref().is_some_and(|p| Arc::ptr_eq(p, &spec.params) || **p == *spec.params);
                    let params = if same {
                        None
                    } else {
                        known.params = Some(spec.params.clone());
                        Some((*spec.params).clone())
                    };
                    let seed = (known.seed != Some(spec.seed)).then_some(spec.seed);
                    known.seed = Some(spec.seed);
                    SampleDelta {
                        params,
                        seed,
                        sample_index: spec.sample_index,
                        num_samples: spec.num_samples,
                        prompt_len: spec.prompt_len,
                        output_len: spec.output_len,
                        banned_tokens: spec.banned_tokens.clone(),
                    }
                });
                SeqDelta {
                    seq_id: seq.seq_id,
                    tokens: seq.tokens.clone(),
                    start_pos: seq.start_pos,
                    block_table,
                    new_blocks,
                    history: seq.history.clone(),
                    sample,
                }
            })
            .collect();
        PlanDelta {
            step_id: plan.step_id,
            swap_out: plan.swap_out.clone(),
            swap_in: plan.swap_in.clone(),
            copy: plan.copy.clone(),
            released: plan.released.clone(),
            seqs,
        }
    }

    /// The plan `delta` stands for (and the mirror updated), remembering at most `max_seqs`
    /// sequences. A delta that relies on what this mirror does not hold is refused, naming
    /// the sequences; the mirror is then emptied (the sender starts a new session after a
    /// refused step).
    pub fn decode(&mut self, delta: PlanDelta, max_seqs: usize) -> Result<StepPlan, DeltaError> {
        let decoded = self.apply(delta, max_seqs);
        if decoded.is_err() {
            self.seqs.clear();
        }
        decoded
    }

    fn apply(&mut self, delta: PlanDelta, max_seqs: usize) -> Result<StepPlan, DeltaError> {
        for seq_id in &delta.released {
            self.seqs.remove(seq_id);
        }
        let mut seqs = Vec::with_capacity(delta.seqs.len());
        for seq in delta.seqs {
            let fault = |message: String| DeltaError { message, seq_ids: vec![seq.seq_id] };
            let was_known = self.seqs.contains_key(&seq.seq_id);
            if !was_known && self.seqs.len() >= max_seqs {
                return Err(fault(format!("a step plan may name at most {max_seqs} live sequences")));
            }
            let known = self.seqs.entry(seq.seq_id).or_default();
            match seq.block_table {
                Some(table) => known.block_table = table,
                None if !was_known && !seq.new_blocks.is_empty() => {
                    return Err(fault(format!(
                        "sequence {} gets blocks appended to a table this executor never had",
                        seq.seq_id
                    )));
                }
                None => {}
            }
            known.block_table.extend_from_slice(&seq.new_blocks);
            let sample = match seq.sample {
                None => None,
                Some(sample) => {
                    if let Some(params) = sample.params {
                        known.params = Some(Arc::new(params));
                    }
                    if let Some(seed) = sample.seed {
                        known.seed = Some(seed);
                    }
                    let (Some(params), Some(seed)) = (known.params.clone(), known.seed) else {
                        return Err(fault(format!(
                            "sequence {} is sampled without parameters (or a seed) this executor was ever sent",
                            seq.seq_id
                        )));
                    };
                    Some(SampleSpec {
                        params,
                        seed,
                        sample_index: sample.sample_index,
                        num_samples: sample.num_samples,
                        prompt_len: sample.prompt_len,
                        output_len: sample.output_len,
                        banned_tokens: sample.banned_tokens,
                    })
                }
            };
            seqs.push(ScheduledSeq {
                seq_id: seq.seq_id,
                tokens: seq.tokens,
                start_pos: seq.start_pos,
                block_table: known.block_table.clone(),
                history: seq.history,
                sample,
            });
        }
        Ok(StepPlan {
            step_id: delta.step_id,
            swap_out: delta.swap_out,
            swap_in: delta.swap_in,
            copy: delta.copy,
            released: delta.released,
            seqs,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seq(seq_id: SeqId, table: &[BlockId], params: Option<SamplingParams>) -> ScheduledSeq {
        ScheduledSeq {
            seq_id,
            tokens: vec![7],
            start_pos: table.len() * 4 - 1,
            block_table: table.to_vec(),
            history: None,
            sample: params.map(|params| SampleSpec {
                params: Arc::new(params),
                seed: 3,
                sample_index: 0,
                num_samples: 1,
                prompt_len: 2,
                output_len: 1,
                banned_tokens: vec![],
            }),
        }
    }

    fn biased(tokens: u32) -> SamplingParams {
        SamplingParams { logit_bias: (0..tokens).map(|t| (t, 1.0)).collect(), ..SamplingParams::greedy(9) }
    }

    /// Sends `plans` through a sender's and a receiver's mirror and checks each arrives whole.
    fn round_trip(plans: &[StepPlan]) -> Vec<PlanDelta> {
        let (mut sender, mut receiver) = (PlanMirror::new(), PlanMirror::new());
        plans
            .iter()
            .map(|plan| {
                let delta = sender.encode(plan);
                assert_eq!(receiver.decode(delta.clone(), 1 << 10).as_ref(), Ok(plan));
                assert_eq!(sender, receiver);
                delta
            })
            .collect()
    }

    #[test]
    fn parameters_go_once_and_block_tables_as_what_was_appended() {
        let p = biased(512);
        let plans = vec![
            StepPlan {
                step_id: 1,
                seqs: vec![seq(1, &[4], Some(p.clone())), seq(2, &[9], None)],
                ..Default::default()
            },
            StepPlan {
                step_id: 2,
                seqs: vec![seq(1, &[4], Some(p.clone())), seq(2, &[9, 10], Some(p.clone()))],
                ..Default::default()
            },
            StepPlan { step_id: 3, seqs: vec![seq(1, &[4, 5], Some(p.clone()))], ..Default::default() },
        ];
        let deltas = round_trip(&plans);
        let first = &deltas[0].seqs[0];
        assert_eq!((first.block_table.clone(), first.new_blocks.clone()), (Some(vec![4]), vec![]));
        assert!(first.sample.as_ref().unwrap().params.is_some());
        let again = &deltas[1].seqs[0];
        assert_eq!((again.block_table.clone(), again.new_blocks.clone()), (None, vec![]));
        assert_eq!(again.sample.as_ref().unwrap().params, None, "the parameters went again");
        assert_eq!(again.sample.as_ref().unwrap().seed, None, "the seed went again");
        assert_eq!(deltas[1].seqs[1].new_blocks, vec![10]);
        assert!(deltas[1].seqs[1].sample.as_ref().unwrap().params.is_some(), "first sample of sequence 2");
        assert_eq!((deltas[2].seqs[0].block_table.clone(), deltas[2].seqs[0].new_blocks.clone()), (None, vec![5]));
        let whole = crate::wire::Encoding::MessagePackCompact.encode(&plans[2]).unwrap().len();
        let sent = crate::wire::Encoding::MessagePackCompact.encode(&deltas[2]).unwrap().len();
        assert!(sent * 10 < whole, "{sent} bytes sent for a {whole}-byte plan");
    }

    #[test]
    fn changed_tables_and_parameters_and_released_sequences_go_whole_again() {
        let plans = vec![
            StepPlan { step_id: 1, seqs: vec![seq(1, &[4, 5], Some(biased(3)))], ..Default::default() },
            // Copy-on-write replaced the last block; the parameters changed.
            StepPlan { step_id: 2, seqs: vec![seq(1, &[4, 6], Some(biased(4)))], ..Default::default() },
            // Released, and the id seen again later starts from nothing.
            StepPlan { step_id: 3, released: vec![1], ..Default::default() },
            StepPlan { step_id: 4, seqs: vec![seq(1, &[8], Some(biased(4)))], ..Default::default() },
        ];
        let deltas = round_trip(&plans);
        assert_eq!(deltas[1].seqs[0].block_table, Some(vec![4, 6]));
        assert!(deltas[1].seqs[0].sample.as_ref().unwrap().params.is_some());
        assert_eq!(deltas[3].seqs[0].block_table, Some(vec![8]));
        assert!(deltas[3].seqs[0].sample.as_ref().unwrap().params.is_some());
    }

    #[test]
    fn a_delta_relying_on_what_the_receiver_never_got_is_refused_naming_the_sequence() {
        let mut sender = PlanMirror::new();
        let plan = StepPlan { step_id: 1, seqs: vec![seq(5, &[1], Some(biased(2)))], ..Default::default() };
        sender.encode(&plan);
        let next = StepPlan { step_id: 2, seqs: vec![seq(5, &[1, 2], Some(biased(2)))], ..Default::default() };
        let delta = sender.encode(&next);
        let mut fresh = PlanMirror::new();
        let err = fresh.decode(delta, 16).unwrap_err();
        assert_eq!(err.seq_ids, vec![5]);
        assert!(fresh.is_empty());
        let unsampled = PlanDelta {
            seqs: vec![SeqDelta {
                seq_id: 6,
                tokens: vec![1],
                start_pos: 0,
                block_table: Some(vec![1]),
                new_blocks: vec![],
                history: None,
                sample: Some(SampleDelta {
                    params: None,
                    seed: Some(0),
                    sample_index: 0,
                    num_samples: 1,
                    prompt_len: 1,
                    output_len: 0,
                    banned_tokens: vec![],
                }),
            }],
            ..Default::default()
        };
        assert_eq!(fresh.decode(unsampled, 16).unwrap_err().seq_ids, vec![6]);
    }

    #[test]
    fn the_receiver_remembers_a_bounded_number_of_sequences() {
        let mut sender = PlanMirror::new();
        let plan = StepPlan { seqs: (0..5).map(|i| seq(i, &[i as u32], None)).collect(), ..Default::default() };
        let err = PlanMirror::new().decode(sender.encode(&plan), 4).unwrap_err();
        assert_eq!(err.seq_ids, vec![4]);
    }
}
