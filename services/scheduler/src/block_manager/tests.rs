//! Unit tests of the block manager on its own.

use std::collections::HashMap;

use super::*;

fn check(bm: &BlockManager) {
    if let Err(e) = bm.check_invariants() {
        panic!("block manager invariant broken: {e}");
    }
}

fn table(bm: &BlockManager, seq: SeqId) -> Vec<BlockId> {
    bm.block_table(seq).expect("sequence has a table").to_vec()
}

#[test]
fn allocate_and_free_track_ref_counts() {
    let mut bm = BlockManager::new(4, 10, 0, false);
    assert_eq!(bm.allocate(1, &[1; 9]), Ok(0));
    assert_eq!(table(&bm, 1), vec![0, 1, 2]);
    assert_eq!(bm.num_free_device_blocks(), 7);
    assert!(table(&bm, 1).iter().all(|&b| bm.device_ref_count(b) == 1));
    assert_eq!(bm.allocate(1, &[1]), Err(BlockError::SeqExists(1)));
    bm.allocate(2, &[1; 4]).expect("fits");
    assert_eq!(table(&bm, 2), vec![3]);
    check(&bm);
    assert!(bm.free(1));
    assert!(!bm.free(1));
    assert_eq!(bm.num_free_device_blocks(), 9);
    assert!(bm.free(2));
    assert_eq!(bm.num_free_device_blocks(), 10);
    assert_eq!(bm.device_ref_count(0), 0);
    check(&bm);
}

#[test]
fn out_of_blocks_leaves_state_unchanged() {
    let mut bm = BlockManager::new(4, 2, 0, false);
    assert_eq!(bm.allocate(1, &[1; 9]), Err(BlockError::OutOfDeviceBlocks { needed: 3, free: 2 }));
    assert_eq!(bm.num_free_device_blocks(), 2);
    assert_eq!(bm.block_table(1), None);
    bm.allocate(1, &[1; 8]).expect("exactly fits");
    let mut copies = Vec::new();
    assert_eq!(bm.append_slots(1, 8, 9, &mut copies), Err(BlockError::OutOfDeviceBlocks { needed: 1, free: 0 }));
    assert_eq!(table(&bm, 1).len(), 2);
    assert!(copies.is_empty());
    assert_eq!(bm.append_slots(7, 0, 1, &mut copies), Err(BlockError::UnknownSeq(7)));
    check(&bm);
}

#[test]
fn append_allocates_only_at_block_boundaries() {
    let mut bm = BlockManager::new(4, 8, 0, false);
    bm.allocate(1, &[5; 3]).expect("fits");
    let mut copies = Vec::new();
    assert_eq!(bm.append_cost(&[(1, 3, 4)]), 0);
    bm.append_slots(1, 3, 4, &mut copies).expect("in place");
    assert_eq!(table(&bm, 1).len(), 1);
    assert_eq!(bm.append_cost(&[(1, 4, 5)]), 1);
    bm.append_slots(1, 4, 5, &mut copies).expect("new block");
    assert_eq!(table(&bm, 1).len(), 2);
    assert!(copies.is_empty());
    check(&bm);
}

#[test]
fn fork_shares_blocks_and_copy_on_write_emits_the_copy() {
    let mut bm = BlockManager::new(4, 10, 0, false);
    bm.allocate(1, &[7; 6]).expect("fits");
    assert_eq!(table(&bm, 1), vec![0, 1]);
    bm.fork(1, 2).expect("fork");
    bm.fork(1, 3).expect("fork");
    assert_eq!(table(&bm, 2), vec![0, 1]);
    assert_eq!(bm.device_ref_count(0), 3);
    assert_eq!(bm.device_ref_count(1), 3);
    assert_eq!(bm.fork(1, 2), Err(BlockError::SeqExists(2)));
    check(&bm);

    // Three sequences write position 6 into shared block 1: two copies, the last writes in place.
    assert_eq!(bm.append_cost(&[(2, 6, 7), (3, 6, 7), (1, 6, 7)]), 2);
    let mut copies = Vec::new();
    bm.append_slots(2, 6, 7, &mut copies).expect("cow");
    assert_eq!(copies, vec![(1, 2)]);
    assert_eq!(table(&bm, 2), vec![0, 2]);
    assert_eq!(bm.device_ref_count(1), 2);
    bm.append_slots(3, 6, 7, &mut copies).expect("cow");
    assert_eq!(copies, vec![(1, 2), (1, 3)]);
    bm.append_slots(1, 6, 7, &mut copies).expect("in place");
    assert_eq!(copies.len(), 2, "the last owner writes in place");
    assert_eq!(table(&bm, 1), vec![0, 1]);
    assert_eq!(bm.device_ref_count(1), 1);
    assert_eq!(bm.device_ref_count(0), 3, "full shared blocks stay shared");
    check(&bm);

    // Appending past a full shared block needs no copy.
    bm.append_slots(2, 7, 9, &mut copies).expect("new block");
    assert_eq!(copies.len(), 2);
    assert_eq!(table(&bm, 2).len(), 3);
    for s in [1, 2, 3] {
        bm.free(s);
    }
    assert_eq!(bm.num_free_device_blocks(), 10);
    check(&bm);
}

#[test]
fn prefix_cache_hits_full_blocks_but_never_the_last_tokens_block() {
    let mut bm = BlockManager::new(2, 16, 0, true);
    let prompt = [1, 2, 3, 4, 5];
    assert_eq!(bm.allocate(1, &prompt), Ok(0), "empty cache: miss");
    assert_eq!(bm.num_cached_blocks(), 0, "nothing is cached before it is computed");
    bm.mark_computed(1, &prompt, 3);
    assert_eq!(bm.num_cached_blocks(), 1);
    bm.mark_computed(1, &prompt, 5);
    assert_eq!(bm.num_cached_blocks(), 2, "the partial last block is never cached");
    let t1 = table(&bm, 1);

    // Same prompt while the first is still running: shares both full blocks.
    assert_eq!(bm.allocation_cost(&prompt), 1);
    assert_eq!(bm.allocate(2, &prompt), Ok(4));
    let t2 = table(&bm, 2);
    assert_eq!(&t2[..2], &t1[..2]);
    assert_ne!(t2[2], t1[2]);
    assert_eq!(bm.device_ref_count(t1[0]), 2);

    // Four tokens: the block holding the last token is not taken from the cache.
    assert_eq!(bm.allocate(3, &[1, 2, 3, 4]), Ok(2));
    assert_eq!(table(&bm, 3)[0], t1[0]);
    assert_ne!(table(&bm, 3)[1], t1[1]);

    // Same second block after a different first block: miss (the hash chains the prefix).
    assert_eq!(bm.allocate(4, &[9, 9, 3, 4, 5]), Ok(0));
    check(&bm);

    // Freed cached blocks stay cached and evictable, and still hit.
    for s in [1, 2, 3, 4] {
        bm.free(s);
    }
    assert_eq!(bm.num_free_device_blocks(), 16, "evictable blocks count as free");
    assert_eq!(bm.num_cached_blocks(), 2);
    assert_eq!(bm.allocation_cost(&prompt), 3, "one new block plus two revived evictable ones");
    assert_eq!(bm.allocate(5, &prompt), Ok(4));
    assert_eq!(&table(&bm, 5)[..2], &t1[..2]);
    check(&bm);
}

#[test]
fn eviction_takes_uncached_blocks_first_then_least_recently_used() {
    let mut bm = BlockManager::new(2, 4, 0, true);
    let a = [1, 2, 9];
    let b = [3, 4, 9];
    bm.allocate(1, &a).expect("fits");
    bm.allocate(2, &b).expect("fits");
    bm.mark_computed(1, &a, 3);
    bm.mark_computed(2, &b, 3);
    let (a0, b0) = (table(&bm, 1)[0], table(&bm, 2)[0]);
    bm.free(1);
    bm.free(2);
    assert_eq!(bm.evictable_blocks(), vec![a0, b0], "a was released first");
    check(&bm);

    // Three new blocks: the two uncached free ones, then the LRU cached block (a's).
    bm.allocate(3, &[5, 6, 7, 8, 9]).expect("fits");
    assert!(table(&bm, 3).contains(&a0));
    assert!(!table(&bm, 3).contains(&b0));
    assert_eq!(bm.evictable_blocks(), vec![b0]);
    assert_eq!(bm.num_cached_blocks(), 1);
    check(&bm);
    bm.free(3);
    assert_eq!(bm.allocate(4, &b), Ok(2), "b's block survived");
    assert_eq!(bm.allocate(5, &a), Ok(0), "a's block was evicted");
    check(&bm);
}

#[test]
fn freeing_releases_tail_blocks_first_and_hits_refresh_recency() {
    let mut bm = BlockManager::new(2, 8, 0, true);
    let t = [1, 2, 3, 4, 5, 6, 7];
    bm.allocate(1, &t).expect("fits");
    bm.mark_computed(1, &t, 7);
    let blocks = table(&bm, 1);
    bm.free(1);
    assert_eq!(bm.evictable_blocks(), vec![blocks[2], blocks[1], blocks[0]]);

    let other = [8, 8, 9];
    bm.allocate(2, &other).expect("fits");
    bm.mark_computed(2, &other, 3);
    let o0 = table(&bm, 2)[0];
    bm.free(2);
    // A hit on the first block takes it out of the LRU list; releasing makes it the newest.
    bm.allocate(3, &[1, 2, 0]).expect("fits");
    assert_eq!(bm.evictable_blocks(), vec![blocks[2], blocks[1], o0]);
    bm.free(3);
    assert_eq!(bm.evictable_blocks(), vec![blocks[2], blocks[1], o0, blocks[0]]);
    check(&bm);
}

#[test]
fn without_prefix_caching_nothing_is_cached() {
    let mut bm = BlockManager::new(2, 8, 0, false);
    let t = [1, 2, 3, 4, 5];
    bm.allocate(1, &t).expect("fits");
    bm.mark_computed(1, &t, 5);
    assert_eq!(bm.num_cached_blocks(), 0);
    assert_eq!(bm.allocate(2, &t), Ok(0));
    bm.free(1);
    assert!(bm.evictable_blocks().is_empty());
    check(&bm);
}

#[test]
fn swap_out_and_in_preserve_sharing() {
    let mut bm = BlockManager::new(2, 8, 8, false);
    bm.allocate(1, &[1, 2, 3, 4, 5]).expect("fits");
    bm.fork(1, 2).expect("fork");
    let mut copies = Vec::new();
    bm.append_slots(2, 5, 6, &mut copies).expect("cow");
    let (t1, t2) = (table(&bm, 1), table(&bm, 2));
    assert_eq!(copies, vec![(t1[2], t2[2])]);
    assert_eq!(bm.swap_out_cost(&[1, 2]), 4);

    let out = bm.swap_out(&[1, 2]).expect("host has room");
    assert_eq!(out.len(), 4, "each distinct device block is copied once");
    let map: HashMap<BlockId, BlockId> = out.iter().copied().collect();
    assert_eq!(bm.location(1), Some(Location::Host));
    assert_eq!(table(&bm, 1), t1.iter().map(|b| map[b]).collect::<Vec<_>>());
    assert_eq!(table(&bm, 2), t2.iter().map(|b| map[b]).collect::<Vec<_>>());
    assert_eq!(bm.host_ref_count(map[&t1[0]]), 2);
    assert_eq!(bm.host_ref_count(map[&t1[2]]), 1);
    assert_eq!(bm.num_free_device_blocks(), 8);
    assert_eq!(bm.num_free_host_blocks(), 4);
    assert_eq!(
        bm.append_slots(1, 5, 6, &mut copies),
        Err(BlockError::WrongLocation { seq: 1, expected: Location::Device, actual: Location::Host })
    );
    check(&bm);

    let (h1, h2) = (table(&bm, 1), table(&bm, 2));
    assert_eq!(bm.swap_in_cost(&[1, 2]), 4);
    let back = bm.swap_in(&[1, 2]).expect("device has room");
    assert_eq!(back.len(), 4);
    let map: HashMap<BlockId, BlockId> = back.iter().copied().collect();
    assert_eq!(table(&bm, 1), h1.iter().map(|b| map[b]).collect::<Vec<_>>());
    assert_eq!(table(&bm, 2), h2.iter().map(|b| map[b]).collect::<Vec<_>>());
    assert_eq!(bm.device_ref_count(table(&bm, 1)[0]), 2);
    assert_eq!(bm.num_free_host_blocks(), 8);
    assert_eq!(bm.location(2), Some(Location::Device));
    check(&bm);
}

#[test]
fn swap_out_is_refused_without_host_room() {
    let mut bm = BlockManager::new(2, 8, 2, false);
    bm.allocate(1, &[1, 2, 3, 4, 5]).expect("fits");
    assert_eq!(bm.swap_out(&[1]), Err(BlockError::OutOfHostBlocks { needed: 3, free: 2 }));
    assert_eq!(bm.location(1), Some(Location::Device));
    assert_eq!(
        bm.swap_in(&[1]),
        Err(BlockError::WrongLocation { seq: 1, expected: Location::Host, actual: Location::Device })
    );
    check(&bm);
}

#[test]
fn swapped_in_blocks_are_registered_again_once_computed() {
    let mut bm = BlockManager::new(2, 4, 4, true);
    let t = [1, 2, 3];
    bm.allocate(1, &t).expect("fits");
    bm.mark_computed(1, &t, 2);
    bm.swap_out(&[1]).expect("room");
    // Fill the device so the original cached block is evicted.
    bm.allocate(2, &[9; 8]).expect("fits");
    assert_eq!(bm.num_cached_blocks(), 0);
    bm.free(2);
    bm.swap_in(&[1]).expect("room");
    bm.mark_computed(1, &t, 2);
    assert_eq!(bm.num_cached_blocks(), 1);
    assert_eq!(bm.allocate(3, &t), Ok(2));
    check(&bm);
}

#[test]
fn cached_prefix_blocks_counts_what_allocate_would_share() {
    let mut bm = BlockManager::new(4, 16, 0, true);
    let prompt: Vec<u32> = (1..=10).collect();
    assert_eq!(bm.cached_prefix_blocks(&prompt), 0);
    bm.allocate(1, &prompt).expect("room");
    bm.mark_computed(1, &prompt, prompt.len());
    // Blocks [1..4] and [5..8] are full and cached; the block of the last token never counts.
    assert_eq!(bm.cached_prefix_blocks(&prompt), 2);
    let other: Vec<u32> = (1..=4).chain(100..106).collect();
    assert_eq!(bm.cached_prefix_blocks(&other), 1);
    let hits = bm.allocate(2, &other).expect("room");
    assert_eq!(hits, 4, "allocate shares the one block counted");
}
