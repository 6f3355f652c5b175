//! Identity of a full KV block for automatic prefix caching.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};

/// Hash of a full block: `hash(parent block's hash, the block's token ids)`.
///
/// Chaining the parent's hash makes a block's identity depend on the whole prefix before
/// it, so two blocks with the same tokens after different prefixes never collide by design.
/// Uses `DefaultHasher::new()`, which is deterministic within a build.
pub fn block_hash(parent: Option<u64>, tokens: &[u32]) -> u64 {
    let mut hasher = DefaultHasher::new();
    parent.hash(&mut hasher);
    tokens.hash(&mut hasher);
    hasher.finish()
}

/// Extends `hashes` (the chain hashes of the first `hashes.len()` full blocks of `tokens`)
/// until it covers `up_to` blocks or the full blocks of `tokens` run out.
pub(crate) fn extend_chain(hashes: &mut Vec<u64>, tokens: &[u32], up_to: usize, block_size: usize) {
    while hashes.len() < up_to {
        let i = hashes.len();
        let end = (i + 1) * block_size;
        if end > tokens.len() {
            break;
        }
        let h = block_hash(hashes.last().copied(), &tokens[i * block_size..end]);
        hashes.push(h);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_depends_on_prefix_and_is_deterministic() {
        let a = block_hash(None, &[1, 2]);
        assert_eq!(a, block_hash(None, &[1, 2]));
        assert_ne!(a, block_hash(None, &[2, 1]));
        assert_ne!(block_hash(Some(a), &[3, 4]), block_hash(Some(a ^ 1), &[3, 4]));

        let mut chain = Vec::new();
        extend_chain(&mut chain, &[1, 2, 3, 4, 5], 10, 2);
        assert_eq!(chain.len(), 2, "only full blocks are hashed");
        assert_eq!(chain[0], a);
        assert_eq!(chain[1], block_hash(Some(a), &[3, 4]));
        let mut partial = Vec::new();
        extend_chain(&mut partial, &[1, 2, 3, 4, 5], 1, 2);
        assert_eq!(partial, vec![a]);
        extend_chain(&mut partial, &[1, 2, 3, 4, 5], 2, 2);
        assert_eq!(partial, chain);
    }
}
