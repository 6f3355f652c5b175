//! One pool of physical KV blocks: reference counts, the free list and (device pool only)
//! the prefix cache with its evictable LRU list.

use crate::id_map::IdMap;

use pagemesh_shared::BlockId;

use super::hash::BlockHash;
use super::lru::LruList;

/// What a cached block is registered as: its chain hash and its own tokens, compared on
/// every lookup.
#[derive(Debug, Clone, PartialEq, Eq)]
struct CacheEntry {
    hash: BlockHash,
    tokens: Box<[u32]>,
}

/// A fixed pool of blocks.
///
/// A block with reference count 0 is either *free* (never cached, or uncached) or
/// *evictable* (registered in the prefix cache; its contents stay valid until it is
/// reused). Both count as free space; allocation takes free blocks first, then evicts the
/// least recently released evictable block.
#[derive(Debug, Clone)]
pub(crate) struct BlockPool {
    ref_counts: Vec<u32>,
    /// Reference count 0 and not cached; a stack, lowest ids on top initially.
    free: Vec<BlockId>,
    /// The prefix-cache entry a block is registered under.
    hash_of: Vec<Option<CacheEntry>>,
    /// Prefix-cache index: block hash → block.
    cache: IdMap<BlockHash, BlockId>,
    /// Reference count 0 and cached, least recently released first.
    evictable: LruList,
}

impl BlockPool {
    /// A pool of `num_blocks` free blocks.
    pub(crate) fn new(num_blocks: usize) -> Self {
        assert!(
            num_blocks < BlockId::MAX as usize,
            "a pool holds fewer than {} blocks, got {num_blocks}",
            BlockId::MAX
        );
        Self {
            ref_counts: vec![0; num_blocks],
            free: (0..num_blocks as BlockId).rev().collect(),
            hash_of: vec![None; num_blocks],
            cache: IdMap::default(),
            evictable: LruList::new(num_blocks),
        }
    }

    /// Pool size.
    pub(crate) fn num_blocks(&self) -> usize {
        self.ref_counts.len()
    }

    /// Blocks that can be allocated now (free plus evictable).
    pub(crate) fn num_free(&self) -> usize {
        self.free.len() + self.evictable.len()
    }

    /// Reference count of `block`.
    pub(crate) fn ref_count(&self, block: BlockId) -> u32 {
        self.ref_counts[block as usize]
    }

    /// Takes a block with reference count 1: a never-cached free block if any, else the
    /// least recently used evictable block (which leaves the cache).
    pub(crate) fn allocate(&mut self) -> Option<BlockId> {
        let block = match self.free.pop() {
            Some(b) => b,
            None => {
                let b = self.evictable.pop_front()?;
                if let Some(entry) = self.hash_of[b as usize].take() {
                    self.cache.remove(&entry.hash);
                }
                b
            }
        };
        self.ref_counts[block as usize] = 1;
        Some(block)
    }

    /// Adds a reference to an in-use or evictable block.
    pub(crate) fn retain(&mut self, block: BlockId) {
        let b = block as usize;
        if self.ref_counts[b] == 0 {
            let revived = self.evictable.remove(block);
            assert!(revived, "block {block} is free and uncached: it cannot be shared");
        }
        self.ref_counts[b] += 1;
    }

    /// Drops a reference; at 0 the block becomes evictable if cached, else free.
    pub(crate) fn release(&mut self, block: BlockId) {
        let b = block as usize;
        assert!(self.ref_counts[b] > 0, "block {block} released more often than referenced");
        self.ref_counts[b] -= 1;
        if self.ref_counts[b] == 0 {
            if self.hash_of[b].is_some() {
                self.evictable.push_back(block);
            } else {
                self.free.push(block);
            }
        }
    }

    /// The cached block registered under `hash`, if it holds exactly `tokens`.
    pub(crate) fn lookup(&self, hash: BlockHash, tokens: &[u32]) -> Option<BlockId> {
        let block = *self.cache.get(&hash)?;
        let entry = self.hash_of[block as usize].as_ref()?;
        (*entry.tokens == *tokens).then_some(block)
    }

    /// Registers an in-use block holding `tokens` under `hash`; does nothing (returns false)
    /// when the block is already registered or another block holds that hash.
    pub(crate) fn register(&mut self, block: BlockId, hash: BlockHash, tokens: &[u32]) -> bool {
        let b = block as usize;
        debug_assert!(self.ref_counts[b] > 0, "only in-use blocks are registered");
        if self.hash_of[b].is_some() || self.cache.contains_key(&hash) {
            return false;
        }
        self.hash_of[b] = Some(CacheEntry { hash, tokens: tokens.into() });
        self.cache.insert(hash, block);
        true
    }

    /// Number of blocks registered in the prefix cache (in use or evictable).
    pub(crate) fn num_cached(&self) -> usize {
        self.cache.len()
    }

    /// Evictable blocks, least recently used first.
    pub(crate) fn evictable_blocks(&self) -> impl Iterator<Item = BlockId> + '_ {
        self.evictable.iter()
    }

    /// Checks the pool's bookkeeping against `expected` reference counts (one per block).
    pub(crate) fn check(&self, name: &str, expected: &[u32]) -> Result<(), String> {
        let n = self.num_blocks();
        for (b, (&have, &want)) in self.ref_counts.iter().zip(expected).enumerate() {
            if have != want {
                return Err(format!("{name} block {b}: ref count {have}, but {want} table references"));
            }
        }
        let mut seen = vec![false; n];
        for &b in &self.free {
            let i = b as usize;
            if i >= n || seen[i] {
                return Err(format!("{name} free list holds block {b} twice or out of range"));
            }
            seen[i] = true;
            if self.ref_counts[i] != 0 {
                return Err(format!("{name} block {b} is both free and referenced"));
            }
            if self.hash_of[i].is_some() {
                return Err(format!("{name} block {b} is on the free list but cached"));
            }
        }
        for b in self.evictable.iter() {
            let i = b as usize;
            if seen[i] {
                return Err(format!("{name} block {b} is both free and evictable"));
            }
            seen[i] = true;
            if self.ref_counts[i] != 0 {
                return Err(format!("{name} block {b} is both evictable and referenced"));
            }
            if self.hash_of[i].is_none() {
                return Err(format!("{name} block {b} is evictable but not cached"));
            }
        }
        for (b, (&rc, &listed)) in self.ref_counts.iter().zip(&seen).enumerate() {
            if rc == 0 && !listed {
                return Err(format!("{name} block {b} is unreferenced but neither free nor evictable"));
            }
        }
        let registered = self.hash_of.iter().filter(|h| h.is_some()).count();
        if registered != self.cache.len() {
            return Err(format!(
                "{name} prefix cache has {} entries but {registered} blocks are registered",
                self.cache.len()
            ));
        }
        for (&h, &b) in &self.cache {
            if self.hash_of[b as usize].as_ref().map(|e| e.hash) != Some(h) {
                return Err(format!("{name} prefix cache maps a hash to block {b}, which is registered differently"));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hash_match_alone_never_reuses_a_block_its_tokens_must_match_too() {
        let mut pool = BlockPool::new(4);
        let block = pool.allocate().expect("a free block");
        let hash: BlockHash = 0xfeed;
        assert!(pool.register(block, hash, &[1, 2, 3, 4]));
        assert_eq!(pool.lookup(hash, &[1, 2, 3, 4]), Some(block));
        assert_eq!(pool.lookup(hash, &[1, 2, 3, 5]), None, "a colliding hash with other tokens must miss");
        assert_eq!(pool.lookup(hash + 1, &[1, 2, 3, 4]), None);
    }
}
