//! Hash maps keyed by integer ids the scheduler assigns itself (request, sequence and block
//! ids) or by block hashes that are already hashes: they hash with one multiply–xorshift round
//! instead of SipHash, which took a fifth of the scheduler's time per step. No key here is
//! chosen by a client, so SipHash's protection against crafted keys is not needed.

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};

/// A `HashMap` keyed by scheduler-assigned ids.
pub(crate) type IdMap<K, V> = HashMap<K, V, BuildHasherDefault<IdHasher>>;
/// A `HashSet` of scheduler-assigned ids.
pub(crate) type IdSet<K> = HashSet<K, BuildHasherDefault<IdHasher>>;

/// Hashes integers with the SplitMix64 finalizer.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct IdHasher(u64);

impl Hasher for IdHasher {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(b as u64);
        }
    }

    fn write_u32(&mut self, x: u32) {
        self.write_u64(x as u64);
    }

    fn write_u64(&mut self, x: u64) {
        let mut z = (self.0 ^ x).wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        self.0 = z ^ (z >> 31);
    }

    fn write_u128(&mut self, x: u128) {
        self.write_u64(x as u64);
        self.write_u64((x >> 64) as u64);
    }

    fn write_usize(&mut self, x: usize) {
        self.write_u64(x as u64);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequential_ids_spread_over_the_buckets() {
        let hash = |x: u64| {
            let mut h = IdHasher::default();
            h.write_u64(x);
            h.finish()
        };
        // The low 8 bits (what a small table indexes by) of 4096 consecutive ids fill all 256
        // buckets about evenly.
        let mut buckets = [0u32; 256];
        for id in 0..4096 {
            buckets[(hash(id) & 255) as usize] += 1;
        }
        assert!(buckets.iter().all(|&n| (4..=32).contains(&n)), "{buckets:?}");
        let mut map: IdMap<u64, u64> = IdMap::default();
        map.extend((0..1000).map(|i| (i, i * 2)));
        assert_eq!(map.get(&500), Some(&1000));
    }
}
