//! An intrusive least-recently-used list over block ids: O(1) push, removal and pop.

use pagemesh_shared::BlockId;

/// Marks the absence of a neighbour.
const NIL: BlockId = BlockId::MAX;

/// A doubly linked list of block ids of one pool, least recently used at the front.
///
/// Links live in arrays indexed by block id, so a block can be unlinked from the middle in
/// O(1) when a prefix-cache hit revives it.
#[derive(Debug, Clone)]
pub(crate) struct LruList {
    prev: Vec<BlockId>,
    next: Vec<BlockId>,
    linked: Vec<bool>,
    head: BlockId,
    tail: BlockId,
    len: usize,
}

impl LruList {
    /// An empty list for blocks `0 .. capacity`.
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            prev: vec![NIL; capacity],
            next: vec![NIL; capacity],
            linked: vec![false; capacity],
            head: NIL,
            tail: NIL,
            len: 0,
        }
    }

    /// Number of linked blocks.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Whether `block` is linked.
    #[cfg(test)]
    pub(crate) fn contains(&self, block: BlockId) -> bool {
        self.linked[block as usize]
    }

    /// Links `block` as the most recently used one.
    pub(crate) fn push_back(&mut self, block: BlockId) {
        let b = block as usize;
        assert!(!self.linked[b], "block {block} is already in the LRU list");
        self.linked[b] = true;
        self.prev[b] = self.tail;
        self.next[b] = NIL;
        if self.tail == NIL {
            self.head = block;
        } else {
            self.next[self.tail as usize] = block;
        }
        self.tail = block;
        self.len += 1;
    }

    /// Unlinks `block`; returns whether it was linked.
    pub(crate) fn remove(&mut self, block: BlockId) -> bool {
        let b = block as usize;
        if !self.linked[b] {
            return false;
        }
        let (prev, next) = (self.prev[b], self.next[b]);
        if prev == NIL {
            self.head = next;
        } else {
            self.next[prev as usize] = next;
        }
        if next == NIL {
            self.tail = prev;
        } else {
            self.prev[next as usize] = prev;
        }
        self.linked[b] = false;
        self.prev[b] = NIL;
        self.next[b] = NIL;
        self.len -= 1;
        true
    }

    /// Unlinks and returns the least recently used block.
    pub(crate) fn pop_front(&mut self) -> Option<BlockId> {
        let head = self.head;
        if head == NIL {
            return None;
        }
        self.remove(head);
        Some(head)
    }

    /// The linked blocks, least recently used first.
    pub(crate) fn iter(&self) -> impl Iterator<Item = BlockId> + '_ {
        let mut cur = self.head;
        std::iter::from_fn(move || {
            if cur == NIL {
                return None;
            }
            let out = cur;
            cur = self.next[cur as usize];
            Some(out)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_lru_order_through_removals() {
        let mut l = LruList::new(8);
        for b in [3, 1, 4, 5, 2] {
            l.push_back(b);
        }
        assert_eq!(l.iter().collect::<Vec<_>>(), vec![3, 1, 4, 5, 2]);
        assert!(l.remove(4));
        assert!(!l.remove(4));
        assert!(l.remove(2));
        assert_eq!(l.iter().collect::<Vec<_>>(), vec![3, 1, 5]);
        assert_eq!(l.pop_front(), Some(3));
        l.push_back(3);
        assert_eq!(l.iter().collect::<Vec<_>>(), vec![1, 5, 3]);
        assert_eq!(l.len(), 3);
        assert!(l.contains(5) && !l.contains(4));
        assert_eq!(l.pop_front(), Some(1));
        assert_eq!(l.pop_front(), Some(5));
        assert_eq!(l.pop_front(), Some(3));
        assert_eq!(l.pop_front(), None);
        assert_eq!(l.len(), 0);
    }
}
