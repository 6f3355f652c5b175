//! Identity of a full KV block for automatic prefix caching.
//!
//! A block's hash is SHA-256 over a per-process random salt, its parent block's hash and its
//! own token ids, cut to 128 bits: collision-resistant (no one can craft two prefixes that
//! share a hash, and the salt keeps hashes from being computed outside the process), and
//! chained, so that a block's identity depends on the whole prefix before it. The cache also
//! compares a block's own tokens before it reuses the block, so a hash match alone never
//! shares KV data.

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::sync::OnceLock;

use sha2::{Digest, Sha256};

/// The identity of a full block and of the whole prefix before it.
pub type BlockHash = u128;

/// Random bytes drawn once per process.
fn process_salt() -> &'static [u8; 16] {
    static SALT: OnceLock<[u8; 16]> = OnceLock::new();
    SALT.get_or_init(|| {
        // `RandomState` keys come from the operating system's random source.
        let (a, b) = (RandomState::new().hash_one(1u8), RandomState::new().hash_one(2u8));
        let mut salt = [0u8; 16];
        salt[..8].copy_from_slice(&a.to_le_bytes());
        salt[8..].copy_from_slice(&b.to_le_bytes());
        salt
    })
}

/// Hash of a full block: SHA-256 of (salt, parent block's hash, the block's token ids).
///
/// Chaining the parent's hash makes a block's identity depend on the whole prefix before
/// it, so two blocks with the same tokens after different prefixes never collide by design.
/// Deterministic within a process.
pub fn block_hash(parent: Option<BlockHash>, tokens: &[u32]) -> BlockHash {
    let mut hasher = Sha256::new();
    hasher.update(process_salt());
    match parent {
        Some(p) => {
            hasher.update([1u8]);
            hasher.update(p.to_le_bytes());
        }
        None => hasher.update([0u8]),
    }
    for t in tokens {
        hasher.update(t.to_le_bytes());
    }
    let digest = hasher.finalize();
    let mut first = [0u8; 16];
    first.copy_from_slice(&digest[..16]);
    BlockHash::from_le_bytes(first)
}

/// Extends `hashes` (the chain hashes of the first `hashes.len()` full blocks of `tokens`)
/// until it covers `up_to` blocks or the full blocks of `tokens` run out.
pub(crate) fn extend_chain(hashes: &mut Vec<BlockHash>, tokens: &[u32], up_to: usize, block_size: usize) {
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
        assert_ne!(block_hash(None, &[3, 4]), block_hash(Some(0), &[3, 4]), "a root block is not a child of 0");

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

    #[test]
    fn hashes_are_salted_sha256_not_a_fixed_key_hash() {
        let unsalted = {
            let digest = Sha256::new().chain_update([0u8]).chain_update(1u32.to_le_bytes()).finalize();
            let mut first = [0u8; 16];
            first.copy_from_slice(&digest[..16]);
            BlockHash::from_le_bytes(first)
        };
        assert_ne!(block_hash(None, &[1]), unsalted, "the salt must enter the hash");
        assert_ne!(process_salt(), &[0u8; 16]);
    }
}
