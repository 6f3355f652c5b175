//! The block manager: paged KV pools (device and host), per-sequence block tables,
//! reference-counted sharing (forks, prefix caching), copy-on-write and swapping.
//!
//! It is a pure state machine: it decides which physical block holds which positions and
//! reports the block copies the executor must perform; it never touches KV data.
//!
//! * A sequence's *block table* maps its positions to blocks: position `p` lives in
//!   `table[p / block_size]` at offset `p % block_size`.
//! * [`BlockManager::fork`] shares all of a parent's blocks with a child; writing into a
//!   shared block later triggers copy-on-write in [`BlockManager::append_slots`].
//! * With prefix caching, every full block whose tokens have been computed is registered
//!   under [`block_hash`] of its prefix; [`BlockManager::allocate`] reuses registered blocks
//!   for a new sequence's leading full blocks (never the block holding its last token).
//!   Unreferenced cached blocks stay valid and are evicted least recently used first.
//! * [`BlockManager::swap_out`] / [`BlockManager::swap_in`] move a set of sequences between
//!   the pools, sharing preserved.

mod hash;
mod lru;
mod pool;
#[cfg(test)]
mod tests;

use pagemesh_shared::{BlockId, SeqId};

use crate::id_map::{IdMap, IdSet};

use hash::extend_chain;
pub use hash::{block_hash, BlockHash};
use pool::BlockPool;

/// Which pool a sequence's blocks are in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Location {
    /// The accelerator's pool; the sequence can run.
    Device,
    /// The host (swap) pool; the sequence is swapped out.
    Host,
}

/// Why a block-manager operation was refused (the state is unchanged).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BlockError {
    /// The device pool has too few free blocks.
    #[error("out of device blocks: need {needed}, {free} free")]
    OutOfDeviceBlocks {
        /// Blocks the operation needs.
        needed: usize,
        /// Blocks free (including evictable cached ones).
        free: usize,
    },
    /// The host pool has too few free blocks.
    #[error("out of host blocks: need {needed}, {free} free")]
    OutOfHostBlocks {
        /// Blocks the operation needs.
        needed: usize,
        /// Blocks free.
        free: usize,
    },
    /// The sequence has no block table.
    #[error("sequence {0} has no block table")]
    UnknownSeq(SeqId),
    /// The sequence already has a block table.
    #[error("sequence {0} already has a block table")]
    SeqExists(SeqId),
    /// The sequence's blocks are in the other pool.
    #[error("sequence {seq} is in the {actual:?} pool, expected the {expected:?} pool")]
    WrongLocation {
        /// The sequence.
        seq: SeqId,
        /// Where it must be.
        expected: Location,
        /// Where it is.
        actual: Location,
    },
}

/// One sequence's blocks.
#[derive(Debug, Clone)]
struct SeqBlocks {
    blocks: Vec<BlockId>,
    location: Location,
    /// Chain hashes of the sequence's first full blocks (prefix caching only).
    hashes: Vec<BlockHash>,
    /// Blocks `0 .. registered` have been offered to the prefix cache.
    registered: usize,
}

/// Device and host KV pools plus every sequence's block table.
#[derive(Debug, Clone)]
pub struct BlockManager {
    block_size: usize,
    enable_prefix_caching: bool,
    device: BlockPool,
    host: BlockPool,
    tables: IdMap<SeqId, SeqBlocks>,
}

impl BlockManager {
    /// Empty pools of `num_device_blocks` and `num_host_blocks` blocks of `block_size`
    /// tokens.
    ///
    /// # Panics
    /// If `block_size` is 0 or a pool has `u32::MAX` blocks or more.
    pub fn new(
        block_size: usize,
        num_device_blocks: usize,
        num_host_blocks: usize,
        enable_prefix_caching: bool,
    ) -> Self {
        assert!(block_size > 0, "block_size must be at least 1");
        Self {
            block_size,
            enable_prefix_caching,
            device: BlockPool::new(num_device_blocks),
            host: BlockPool::new(num_host_blocks),
            tables: IdMap::default(),
        }
    }

    /// Tokens per block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Whether prefix caching is on.
    pub fn prefix_caching(&self) -> bool {
        self.enable_prefix_caching
    }

    /// Blocks needed to hold `num_tokens` positions.
    pub fn blocks_for(&self, num_tokens: usize) -> usize {
        num_tokens.div_ceil(self.block_size)
    }

    /// Size of the device pool.
    pub fn num_device_blocks(&self) -> usize {
        self.device.num_blocks()
    }

    /// Size of the host pool.
    pub fn num_host_blocks(&self) -> usize {
        self.host.num_blocks()
    }

    /// Device blocks that can be allocated now (evictable cached blocks count as free).
    pub fn num_free_device_blocks(&self) -> usize {
        self.device.num_free()
    }

    /// Host blocks that can be allocated now.
    pub fn num_free_host_blocks(&self) -> usize {
        self.host.num_free()
    }

    /// Device blocks registered in the prefix cache (referenced or evictable).
    pub fn num_cached_blocks(&self) -> usize {
        self.device.num_cached()
    }

    /// Evictable cached device blocks, next to be evicted first.
    pub fn evictable_blocks(&self) -> Vec<BlockId> {
        self.device.evictable_blocks().collect()
    }

    /// Reference count of a device block.
    pub fn device_ref_count(&self, block: BlockId) -> u32 {
        self.device.ref_count(block)
    }

    /// Reference count of a host block.
    pub fn host_ref_count(&self, block: BlockId) -> u32 {
        self.host.ref_count(block)
    }

    /// A sequence's block table.
    pub fn block_table(&self, seq: SeqId) -> Option<&[BlockId]> {
        self.tables.get(&seq).map(|t| t.blocks.as_slice())
    }

    /// Which pool a sequence's blocks are in.
    pub fn location(&self, seq: SeqId) -> Option<Location> {
        self.tables.get(&seq).map(|t| t.location)
    }

    /// Number of sequences with a block table.
    pub fn num_seqs(&self) -> usize {
        self.tables.len()
    }

    /// Full blocks of a `len`-token sequence that may come from the prefix cache: all
    /// full blocks before the one holding the last token.
    fn cacheable_blocks(&self, len: usize) -> usize {
        if self.enable_prefix_caching && len > 0 {
            (len - 1) / self.block_size
        } else {
            0
        }
    }

    /// Prefix-cache hits for `tokens`: the leading blocks found and how many of them are
    /// evictable (they leave the free space when taken).
    fn probe(&self, hashes: &[BlockHash], tokens: &[u32]) -> (Vec<BlockId>, usize) {
        let mut hits = Vec::new();
        let mut evictable = 0;
        let blocks = tokens.chunks_exact(self.block_size);
        for (&h, block_tokens) in hashes.iter().zip(blocks) {
            match self.device.lookup(h, block_tokens) {
                Some(b) => {
                    if self.device.ref_count(b) == 0 {
                        evictable += 1;
                    }
                    hits.push(b);
                }
                None => break,
            }
        }
        (hits, evictable)
    }

    fn prefix_hashes(&self, tokens: &[u32]) -> Vec<BlockHash> {
        let mut hashes = Vec::new();
        extend_chain(&mut hashes, tokens, self.cacheable_blocks(tokens.len()), self.block_size);
        hashes
    }

    /// Leading full blocks of `tokens` that [`allocate`](Self::allocate) would find in the
    /// prefix cache now (0 with caching off).
    pub fn cached_prefix_blocks(&self, tokens: &[u32]) -> usize {
        if self.cacheable_blocks(tokens.len()) == 0 {
            return 0;
        }
        self.probe(&self.prefix_hashes(tokens), tokens).0.len()
    }

    /// Free device blocks [`allocate`](Self::allocate) would consume for `tokens` now
    /// (new blocks plus evictable cache hits).
    pub fn allocation_cost(&self, tokens: &[u32]) -> usize {
        let total = self.blocks_for(tokens.len());
        if self.cacheable_blocks(tokens.len()) == 0 {
            return total;
        }
        let (hits, evictable) = self.probe(&self.prefix_hashes(tokens), tokens);
        total - hits.len() + evictable
    }

    /// Gives a new sequence a device block table covering all of `tokens`, sharing leading
    /// full blocks found in the prefix cache. Returns the number of leading tokens whose
    /// K/V is already computed (cache hits), always less than `tokens.len()`.
    pub fn allocate(&mut self, seq: SeqId, tokens: &[u32]) -> Result<usize, BlockError> {
        if self.tables.contains_key(&seq) {
            return Err(BlockError::SeqExists(seq));
        }
        let total = self.blocks_for(tokens.len());
        let hashes = self.prefix_hashes(tokens);
        let (mut blocks, evictable) = self.probe(&hashes, tokens);
        let hits = blocks.len();
        let needed = total - hits + evictable;
        let free = self.device.num_free();
        if free < needed {
            return Err(BlockError::OutOfDeviceBlocks { needed, free });
        }
        for &b in &blocks {
            self.device.retain(b);
        }
        for _ in hits..total {
            blocks.push(self.device.allocate().expect("free device blocks were counted"));
        }
        self.tables.insert(seq, SeqBlocks { blocks, location: Location::Device, hashes, registered: hits });
        Ok(hits * self.block_size)
    }

    /// Extends the device table of `seq` with fresh blocks until it covers `num_tokens`
    /// positions (reservation up front, for the contiguous baseline allocator).
    pub fn reserve(&mut self, seq: SeqId, num_tokens: usize) -> Result<(), BlockError> {
        self.expect_location(seq, Location::Device)?;
        let want = self.blocks_for(num_tokens);
        let t = self.tables.get_mut(&seq).expect("location was checked");
        let needed = want.saturating_sub(t.blocks.len());
        let free = self.device.num_free();
        if free < needed {
            return Err(BlockError::OutOfDeviceBlocks { needed, free });
        }
        while t.blocks.len() < want {
            t.blocks.push(self.device.allocate().expect("free device blocks were counted"));
        }
        Ok(())
    }

    /// Free blocks (of each sequence's own pool) that appending positions `start .. end` to
    /// each listed sequence, in order, would consume: new blocks past the table's end plus
    /// copy-on-write copies of shared blocks written into.
    pub fn append_cost(&self, appends: &[(SeqId, usize, usize)]) -> usize {
        let mut cow_taken: Vec<(Location, BlockId, u32)> = Vec::new();
        let mut cost = 0;
        for &(seq, start, end) in appends {
            let Some(t) = self.tables.get(&seq) else {
                cost += self.blocks_for(end);
                continue;
            };
            let pool = self.pool(t.location);
            let last = self.blocks_for(end).min(t.blocks.len());
            for &b in t.blocks.get(start / self.block_size..last).unwrap_or(&[]) {
                let pos = match cow_taken.iter().position(|&(l, x, _)| l == t.location && x == b) {
                    Some(pos) => pos,
                    None => {
                        cow_taken.push((t.location, b, 0));
                        cow_taken.len() - 1
                    }
                };
                let taken = &mut cow_taken[pos].2;
                if pool.ref_count(b) - *taken > 1 {
                    *taken += 1;
                    cost += 1;
                }
            }
            cost += self.blocks_for(end).saturating_sub(t.blocks.len());
        }
        cost
    }

    /// Makes the device table of `seq` cover positions `.. end` and gives it exclusive
    /// blocks for the positions `start .. end` it is about to write: blocks past the
    /// table's end are allocated, shared blocks written into are copied (copy-on-write;
    /// each `(old, new)` pair is pushed to `copies`).
    pub fn append_slots(
        &mut self,
        seq: SeqId,
        start: usize,
        end: usize,
        copies: &mut Vec<(BlockId, BlockId)>,
    ) -> Result<(), BlockError> {
        self.expect_location(seq, Location::Device)?;
        let needed = self.append_cost(&[(seq, start, end)]);
        let free = self.device.num_free();
        if free < needed {
            return Err(BlockError::OutOfDeviceBlocks { needed, free });
        }
        let bs = self.block_size;
        let want = self.blocks_for(end);
        let t = self.tables.get_mut(&seq).expect("location was checked");
        let last = want.min(t.blocks.len());
        for i in (start / bs).min(last)..last {
            let old = t.blocks[i];
            if self.device.ref_count(old) > 1 {
                let new = self.device.allocate().expect("copy-on-write blocks were counted");
                self.device.release(old);
                t.blocks[i] = new;
                copies.push((old, new));
            }
        }
        while t.blocks.len() < want {
            t.blocks.push(self.device.allocate().expect("new blocks were counted"));
        }
        Ok(())
    }

    /// Gives `child` a table sharing every block of `parent` (which must be on the device).
    pub fn fork(&mut self, parent: SeqId, child: SeqId) -> Result<(), BlockError> {
        if self.tables.contains_key(&child) {
            return Err(BlockError::SeqExists(child));
        }
        self.expect_location(parent, Location::Device)?;
        let p = self.tables.get(&parent).expect("location was checked");
        let t = SeqBlocks {
            blocks: p.blocks.clone(),
            location: Location::Device,
            hashes: p.hashes.clone(),
            registered: p.registered,
        };
        for &b in &t.blocks {
            self.device.retain(b);
        }
        self.tables.insert(child, t);
        Ok(())
    }

    /// Drops a sequence's table, releasing its blocks (last block first, so that a cached
    /// prefix outlives its tails in the LRU order). Returns whether it had one.
    pub fn free(&mut self, seq: SeqId) -> bool {
        let Some(t) = self.tables.remove(&seq) else {
            return false;
        };
        let pool = match t.location {
            Location::Device => &mut self.device,
            Location::Host => &mut self.host,
        };
        for &b in t.blocks.iter().rev() {
            pool.release(b);
        }
        true
    }

    /// Records that positions `.. num_computed` of `seq` (whose tokens are `tokens`) hold
    /// computed K/V: with prefix caching, the full blocks among them are registered.
    pub fn mark_computed(&mut self, seq: SeqId, tokens: &[u32], num_computed: usize) {
        if !self.enable_prefix_caching {
            return;
        }
        let bs = self.block_size;
        let Some(t) = self.tables.get_mut(&seq) else {
            return;
        };
        if t.location != Location::Device {
            return;
        }
        let full = (num_computed.min(tokens.len()) / bs).min(t.blocks.len());
        if full <= t.registered {
            return;
        }
        extend_chain(&mut t.hashes, tokens, full, bs);
        for i in t.registered..full.min(t.hashes.len()) {
            self.device.register(t.blocks[i], t.hashes[i], &tokens[i * bs..(i + 1) * bs]);
        }
        t.registered = full.min(t.hashes.len());
    }

    /// Distinct device blocks referenced by `seqs` (host blocks a swap-out needs).
    pub fn swap_out_cost(&self, seqs: &[SeqId]) -> usize {
        self.distinct_blocks(seqs).len()
    }

    /// Distinct host blocks referenced by `seqs` (device blocks a swap-in needs, before
    /// any appends).
    pub fn swap_in_cost(&self, seqs: &[SeqId]) -> usize {
        self.distinct_blocks(seqs).len()
    }

    /// Moves `seqs` (all on the device) to the host pool: each distinct device block gets
    /// one host block, so sharing within the set is preserved; the device references are
    /// released. Returns the `(device, host)` copies to perform.
    pub fn swap_out(&mut self, seqs: &[SeqId]) -> Result<Vec<(BlockId, BlockId)>, BlockError> {
        self.move_seqs(seqs, Location::Device)
    }

    /// Moves `seqs` (all on the host) into fresh device blocks. Returns the
    /// `(host, device)` copies to perform.
    pub fn swap_in(&mut self, seqs: &[SeqId]) -> Result<Vec<(BlockId, BlockId)>, BlockError> {
        self.move_seqs(seqs, Location::Host)
    }

    fn move_seqs(&mut self, seqs: &[SeqId], from: Location) -> Result<Vec<(BlockId, BlockId)>, BlockError> {
        for &s in seqs {
            self.expect_location(s, from)?;
        }
        let needed = self.distinct_blocks(seqs).len();
        let (to, free) = match from {
            Location::Device => (Location::Host, self.host.num_free()),
            Location::Host => (Location::Device, self.device.num_free()),
        };
        if free < needed {
            return Err(match to {
                Location::Host => BlockError::OutOfHostBlocks { needed, free },
                Location::Device => BlockError::OutOfDeviceBlocks { needed, free },
            });
        }
        let (src_pool, dst_pool) = match from {
            Location::Device => (&mut self.device, &mut self.host),
            Location::Host => (&mut self.host, &mut self.device),
        };
        let mut map: IdMap<BlockId, BlockId> = IdMap::default();
        let mut pairs = Vec::with_capacity(needed);
        for s in seqs {
            let t = self.tables.get_mut(s).expect("location was checked");
            if t.location == to {
                continue; // listed twice
            }
            let old = std::mem::take(&mut t.blocks);
            t.blocks = old
                .iter()
                .map(|&src| match map.get(&src) {
                    Some(&dst) => {
                        dst_pool.retain(dst);
                        dst
                    }
                    None => {
                        let dst = dst_pool.allocate().expect("destination blocks were counted");
                        map.insert(src, dst);
                        pairs.push((src, dst));
                        dst
                    }
                })
                .collect();
            for &b in old.iter().rev() {
                src_pool.release(b);
            }
            t.location = to;
            t.registered = 0;
        }
        Ok(pairs)
    }

    fn distinct_blocks(&self, seqs: &[SeqId]) -> IdSet<BlockId> {
        seqs.iter().filter_map(|s| self.tables.get(s)).flat_map(|t| t.blocks.iter().copied()).collect()
    }

    fn pool(&self, location: Location) -> &BlockPool {
        match location {
            Location::Device => &self.device,
            Location::Host => &self.host,
        }
    }

    fn expect_location(&self, seq: SeqId, expected: Location) -> Result<(), BlockError> {
        match self.tables.get(&seq) {
            None => Err(BlockError::UnknownSeq(seq)),
            Some(t) if t.location != expected => Err(BlockError::WrongLocation { seq, expected, actual: t.location }),
            Some(_) => Ok(()),
        }
    }

    /// Checks that every block's reference count equals its number of table references,
    /// that no block is both free and referenced, and the prefix-cache bookkeeping.
    pub fn check_invariants(&self) -> Result<(), String> {
        let mut device = vec![0u32; self.device.num_blocks()];
        let mut host = vec![0u32; self.host.num_blocks()];
        for (seq, t) in &self.tables {
            let counts = match t.location {
                Location::Device => &mut device,
                Location::Host => &mut host,
            };
            for &b in &t.blocks {
                let slot = counts
                    .get_mut(b as usize)
                    .ok_or_else(|| format!("sequence {seq} references block {b} outside its pool"))?;
                *slot += 1;
            }
            if t.registered > t.blocks.len() {
                return Err(format!("sequence {seq} registered more blocks than it has"));
            }
        }
        self.device.check("device", &device)?;
        self.host.check("host", &host)?;
        if !self.enable_prefix_caching && self.device.num_cached() > 0 {
            return Err("prefix caching is off but blocks are cached".into());
        }
        if self.host.num_cached() > 0 {
            return Err("host blocks are never cached".into());
        }
        Ok(())
    }
}
