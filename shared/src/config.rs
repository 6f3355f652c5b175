//! Engine configuration shared by the scheduler and the executors.

use serde::{Deserialize, Serialize};

/// What the scheduler does with the newest running request when a block is needed and none is free.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum PreemptionMode {
    /// Move its blocks to host (swap) blocks; it resumes before any waiting request.
    #[default]
    Swap,
    /// Free its blocks; it is later re-prefilled from prompt + generated tokens.
    Recompute,
}

impl std::str::FromStr for PreemptionMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "swap" => Ok(Self::Swap),
            "recompute" => Ok(Self::Recompute),
            other => Err(format!("unknown preemption mode '{other}' (expected swap or recompute)")),
        }
    }
}

/// How a request's KV blocks are reserved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum KvAllocation {
    /// PagedAttention: blocks are taken as tokens are written.
    #[default]
    Paged,
    /// A baseline of the systems before paging: at admission a request reserves blocks for
    /// prompt + `max_tokens` tokens and holds them until it finishes (no prefix caching, `n` = 1).
    Contiguous,
    /// Like `Contiguous`, but reserving the longest sequence the model accepts
    /// (`max_model_len`), as systems that do not know the output length did.
    ContiguousMaxLen,
}

impl KvAllocation {
    /// Whether blocks are reserved up front.
    pub fn is_contiguous(self) -> bool {
        self != Self::Paged
    }
}

impl std::str::FromStr for KvAllocation {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "paged" => Ok(Self::Paged),
            "contiguous" => Ok(Self::Contiguous),
            "contiguous-max-len" => Ok(Self::ContiguousMaxLen),
            other => Err(format!("unknown allocator '{other}' (expected paged, contiguous or contiguous-max-len)")),
        }
    }
}

/// Cache geometry and batching limits of one model's engine.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EngineConfig {
    /// Tokens per KV block.
    pub block_size: usize,
    /// KV blocks in the executor's device pool.
    pub num_device_blocks: usize,
    /// KV blocks in the executor's host (swap) pool.
    pub num_host_blocks: usize,
    /// Most sequences in one step.
    pub max_num_seqs: usize,
    /// Most tokens (prefill chunks + decode tokens) in one step.
    pub max_num_batched_tokens: usize,
    /// What preemption does.
    pub preemption_mode: PreemptionMode,
    /// Whether full blocks are shared between requests with the same prefix.
    pub enable_prefix_caching: bool,
    /// Most requests in the waiting queue; more are refused.
    pub max_waiting_requests: usize,
    /// Most prompt tokens in the waiting queue; more are refused.
    pub max_waiting_tokens: usize,
    /// Longest sequence (prompt + output) the model accepts.
    pub max_model_len: usize,
    /// How KV blocks are reserved (paged, or a contiguous baseline for comparison).
    #[serde(default)]
    pub kv_allocation: KvAllocation,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            block_size: 16,
            num_device_blocks: 1024,
            num_host_blocks: 1024,
            max_num_seqs: 256,
            max_num_batched_tokens: 2048,
            preemption_mode: PreemptionMode::Swap,
            enable_prefix_caching: true,
            max_waiting_requests: 4096,
            max_waiting_tokens: 1 << 22,
            max_model_len: 2048,
            kv_allocation: KvAllocation::Paged,
        }
    }
}
