//! Counters and pool occupancy reported by the scheduler.

use serde::Serialize;

/// Cumulative scheduler counters.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct SchedulerStats {
    /// Plans emitted.
    pub steps: u64,
    /// Requests preempted by swapping to host blocks.
    pub preemptions_swap: u64,
    /// Requests preempted by freeing their blocks for later recomputation.
    pub preemptions_recompute: u64,
    /// Blocks copied device → host.
    pub blocks_swapped_out: u64,
    /// Blocks copied host → device.
    pub blocks_swapped_in: u64,
    /// Blocks copied device → device (copy-on-write).
    pub blocks_copied: u64,
    /// Tokens of admitted sequences looked up in the prefix cache.
    pub prefix_cache_queried_tokens: u64,
    /// Tokens found there (their blocks were shared instead of computed).
    pub prefix_cache_hit_tokens: u64,
    /// Most device blocks in use after any step was scheduled.
    pub peak_device_blocks_used: usize,
}

/// Pool occupancy now. "Free" counts evictable cached blocks as free.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct BlockUsage {
    /// Device pool size.
    pub device_total: usize,
    /// Device blocks free or evictable.
    pub device_free: usize,
    /// Host pool size.
    pub host_total: usize,
    /// Host blocks free.
    pub host_free: usize,
}

/// Device KV slots in use and how many of them hold tokens (see
/// [`Scheduler::kv_occupancy`](crate::Scheduler::kv_occupancy)).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct KvOccupancy {
    /// Slots of device blocks that are in use (referenced), `blocks × block_size`.
    pub allocated_slots: usize,
    /// Those slots holding a token's K/V (computed or being computed).
    pub filled_slots: usize,
}
