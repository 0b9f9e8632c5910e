//! One worker rank's physical KV cache as the router models it under Dynamo's
//! `DYN_ROUTER_APPROXIMATE_CACHE_POLICY=lru` (approximate mode without events).
//!
//! A request booked on the rank *acquires* its prompt's full blocks (keyed by sequence hash):
//! the leading blocks the rank already holds are referenced, every block from the first miss
//! on is a new copy (a prefix cache recomputes them into fresh blocks, even when the same
//! content sits elsewhere), and a partial last block is occupancy without content (`private`).
//! Blocks a running request references are pinned. At the request's end they are *released*:
//! a copy nobody references any more becomes inactive, stamped with that release's epoch.
//! While the rank holds more blocks (copies + private) than its capacity, inactive copies are
//! evicted: the oldest release first and, within one release, the suffix before the prefix.
//! A hash leaves the rank when its last copy does; those hashes are reported so the caller
//! keeps its index in step. Pinned blocks beyond the capacity stay (an engine would preempt
//! or queue) and are reconciled once released.
//!
//! Output: the router sees how many tokens were generated, not which, so a completed output
//! block is an anonymous copy: it takes capacity and is evicted in turn, but no later prompt
//! can hit it (Dynamo hashes output blocks and can).

use std::{cmp::Reverse, collections::BTreeSet};

use rustc_hash::FxHashMap;

/// No next copy.
const NIL: u32 = u32::MAX;

struct Slot {
    /// Sequence hash; `None` for an output block, whose content the router does not know.
    hash: Option<u64>,
    /// Next copy of the same hash, or `NIL`.
    next: u32,
    refs: u32,
    /// Place in its sequence (0 = first block): within one release, later places go first.
    pos: u32,
    /// The release that left it unreferenced.
    epoch: u64,
}

/// Eviction order of an inactive copy: (release epoch, reversed place, slot).
type EvictKey = (u64, Reverse<u32>, u32);

/// What one request holds on the rank.
struct Lease {
    copies: Vec<u32>,
    private: usize,
}

pub struct RankLru {
    capacity: usize,
    slots: Vec<Slot>,
    free: Vec<u32>,
    /// The oldest copy of every resident hash; younger ones chain through `Slot::next`.
    by_hash: FxHashMap<u64, u32>,
    inactive: BTreeSet<EvictKey>,
    leases: FxHashMap<u64, Lease>,
    /// Partial blocks of the running requests.
    private: usize,
    epoch: u64,
}

impl RankLru {
    pub fn new(capacity: usize) -> Self {
        RankLru {
            capacity,
            slots: Vec::new(),
            free: Vec::new(),
            by_hash: FxHashMap::default(),
            inactive: BTreeSet::new(),
            leases: FxHashMap::default(),
            private: 0,
            epoch: 0,
        }
    }

    /// Blocks the rank holds: copies (pinned or not) and private blocks.
    pub fn resident(&self) -> usize {
        self.slots.len() - self.free.len() + self.private
    }

    /// Distinct hashes the rank holds.
    pub fn hashes(&self) -> usize {
        self.by_hash.len()
    }

    /// Books `hashes` (a prompt's full blocks from the root) and `private` partial blocks for
    /// request `lease`, a key not in use on this rank. Hashes evicted to make room are
    /// appended to `evicted`.
    pub fn acquire(&mut self, lease: u64, hashes: &[u64], private: usize, evicted: &mut Vec<u64>) {
        debug_assert!(!self.leases.contains_key(&lease), "lease {lease} acquired twice");
        let mut copies = Vec::with_capacity(hashes.len());
        let mut hit = true;
        for (pos, &h) in hashes.iter().enumerate() {
            let cached = if hit { self.by_hash.get(&h).copied() } else { None };
            copies.push(match cached {
                Some(s) => {
                    let slot = &mut self.slots[s as usize];
                    if slot.refs == 0 {
                        self.inactive.remove(&(slot.epoch, Reverse(slot.pos), s));
                    }
                    slot.refs += 1;
                    s
                }
                None => {
                    hit = false;
                    self.new_copy(Some(h), pos)
                }
            });
        }
        self.private += private;
        self.leases.insert(lease, Lease { copies, private });
        self.reconcile(evicted);
    }

    /// Request `lease` has generated output: it now fills `full_blocks` blocks in all (prompt
    /// and output) plus `private` partial ones. Unknown leases are ignored.
    pub fn grow(&mut self, lease: u64, full_blocks: usize, private: usize, evicted: &mut Vec<u64>) {
        let Some(l) = self.leases.get(&lease) else { return };
        let (held, was) = (l.copies.len(), l.private);
        let new: Vec<u32> = (held..full_blocks).map(|pos| self.new_copy(None, pos)).collect();
        let l = self.leases.get_mut(&lease).expect("lease was just found");
        l.copies.extend(new);
        l.private = private;
        self.private = self.private - was + private;
        self.reconcile(evicted);
    }

    /// Request `lease` ended: its blocks are unpinned (a second release is a no-op).
    pub fn release(&mut self, lease: u64, evicted: &mut Vec<u64>) {
        let Some(l) = self.leases.remove(&lease) else { return };
        self.epoch += 1;
        self.private -= l.private;
        for s in l.copies {
            let slot = &mut self.slots[s as usize];
            slot.refs -= 1;
            if slot.refs == 0 {
                slot.epoch = self.epoch;
                self.inactive.insert((self.epoch, Reverse(slot.pos), s));
            }
        }
        self.reconcile(evicted);
    }

    pub fn set_capacity(&mut self, capacity: usize, evicted: &mut Vec<u64>) {
        self.capacity = capacity;
        self.reconcile(evicted);
    }

    fn new_copy(&mut self, hash: Option<u64>, pos: usize) -> u32 {
        let slot = Slot { hash, next: NIL, refs: 1, pos: pos.min(u32::MAX as usize) as u32, epoch: 0 };
        let s = crate::slab::put(&mut self.slots, &mut self.free, slot);
        if let Some(h) = hash {
            // Copies chain in creation order, so prompts reuse the oldest one still resident
            // (chains longer than one are rare: a miss before a block cached elsewhere).
            match self.by_hash.get(&h) {
                Some(&first) => {
                    let mut last = first;
                    while self.slots[last as usize].next != NIL {
                        last = self.slots[last as usize].next;
                    }
                    self.slots[last as usize].next = s;
                }
                None => {
                    self.by_hash.insert(h, s);
                }
            }
        }
        s
    }

    /// Evicts inactive copies, oldest first, while over capacity.
    fn reconcile(&mut self, evicted: &mut Vec<u64>) {
        while self.resident() > self.capacity {
            let Some((_, _, s)) = self.inactive.pop_first() else { break };
            let (hash, next) = (self.slots[s as usize].hash, self.slots[s as usize].next);
            self.free.push(s);
            let Some(h) = hash else { continue };
            let first = self.by_hash[&h];
            if first == s {
                if next == NIL {
                    self.by_hash.remove(&h);
                    evicted.push(h);
                } else {
                    self.by_hash.insert(h, next);
                }
            } else {
                let mut cur = first;
                while self.slots[cur as usize].next != s {
                    cur = self.slots[cur as usize].next;
                }
                self.slots[cur as usize].next = next;
            }
        }
    }

    /// (resident, pinned, inactive, leases), for tests against the contract's counts.
    #[cfg(test)]
    pub fn counts(&self) -> (usize, usize, usize, usize) {
        (self.resident(), self.resident() - self.inactive.len(), self.inactive.len(), self.leases.len())
    }

    #[cfg(test)]
    pub fn holds(&self, hash: u64) -> bool {
        self.by_hash.contains_key(&hash)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `f` and returns the hashes it evicted.
    fn ev(m: &mut RankLru, f: impl FnOnce(&mut RankLru, &mut Vec<u64>)) -> Vec<u64> {
        let mut out = Vec::new();
        f(m, &mut out);
        out
    }

    #[test]
    fn within_one_release_the_suffix_goes_before_the_prefix() {
        let mut m = RankLru::new(3);
        assert!(ev(&mut m, |m, e| m.acquire(1, &[1, 2, 3], 0, e)).is_empty());
        assert!(ev(&mut m, |m, e| m.release(1, e)).is_empty());
        assert_eq!(ev(&mut m, |m, e| m.set_capacity(2, e)), vec![3]);
        assert_eq!(ev(&mut m, |m, e| m.set_capacity(0, e)), vec![2, 1]);
    }

    #[test]
    fn a_cached_prefix_is_referenced_and_only_the_missing_suffix_allocated() {
        let mut m = RankLru::new(4);
        ev(&mut m, |m, e| m.acquire(1, &[1, 2], 0, e));
        ev(&mut m, |m, e| m.release(1, e));
        assert_eq!(m.counts(), (2, 0, 2, 0));
        // 1 and 2 are referenced again, 3 is new: 3 blocks, all pinned.
        ev(&mut m, |m, e| m.acquire(2, &[1, 2, 3], 0, e));
        assert_eq!(m.counts(), (3, 3, 0, 1));
        ev(&mut m, |m, e| m.release(2, e));
        assert_eq!(m.counts(), (3, 0, 3, 0));
    }

    #[test]
    fn after_a_miss_every_later_block_is_a_new_copy() {
        // Block 2 is resident, but the prompt [9, 2'] misses at 9: 2' is a new copy even if
        // it had 2's hash (a prefix cache cannot use a block after a miss).
        let mut m = RankLru::new(10);
        ev(&mut m, |m, e| m.acquire(1, &[1, 2], 0, e));
        ev(&mut m, |m, e| m.acquire(2, &[9, 2], 0, e));
        assert_eq!(m.counts(), (4, 4, 0, 2));
        assert_eq!(m.hashes(), 3);
        // Hash 2 leaves only with its last copy: release both, keep room for 2 blocks.
        ev(&mut m, |m, e| m.release(1, e)); // epoch 1: 2 (place 1), then 1
        ev(&mut m, |m, e| m.release(2, e)); // epoch 2: the copy of 2, then 9
        assert_eq!(ev(&mut m, |m, e| m.set_capacity(2, e)), vec![1]); // evicts 2, 1: hash 2 stays
        assert!(m.holds(2));
        assert_eq!(ev(&mut m, |m, e| m.set_capacity(0, e)), vec![2, 9]);
    }

    #[test]
    fn the_oldest_release_is_evicted_first_and_a_shared_copy_takes_its_last_release() {
        let mut m = RankLru::new(2);
        ev(&mut m, |m, e| m.acquire(1, &[1], 0, e));
        ev(&mut m, |m, e| m.acquire(2, &[1], 0, e));
        ev(&mut m, |m, e| m.release(1, e)); // epoch 1: 1 is still referenced by lease 2
        ev(&mut m, |m, e| m.acquire(3, &[20], 0, e));
        ev(&mut m, |m, e| m.release(3, e)); // epoch 2: 20
        ev(&mut m, |m, e| m.release(2, e)); // epoch 3: 1
        assert_eq!(ev(&mut m, |m, e| m.set_capacity(1, e)), vec![20]);
    }

    #[test]
    fn pinned_blocks_over_capacity_are_reconciled_on_release() {
        let mut m = RankLru::new(1);
        assert!(ev(&mut m, |m, e| m.acquire(1, &[1, 2], 0, e)).is_empty());
        assert_eq!(m.counts(), (2, 2, 0, 1));
        assert_eq!(ev(&mut m, |m, e| m.release(1, e)), vec![2]);
        assert_eq!(m.counts(), (1, 0, 1, 0));
        assert!(m.holds(1));
    }

    #[test]
    fn partial_and_output_blocks_take_room_and_output_goes_first() {
        // vLLM's prefix-caching walkthrough, as Dynamo's test of the same contract, with
        // output blocks anonymous. Capacity 10.
        let mut m = RankLru::new(10);
        // Request 1: three full prompt blocks and a partial one → 4 resident.
        ev(&mut m, |m, e| m.acquire(1, &[10, 11, 12], 1, e));
        assert_eq!(m.counts(), (4, 4, 0, 1));
        // Its output completes the partial block and starts another: 4 full + 1 partial.
        ev(&mut m, |m, e| m.grow(1, 4, 1, e));
        assert_eq!(m.counts(), (5, 5, 0, 1));
        // Request 2 shares the first two blocks: [10, 11, 20] + partial → 7 resident.
        ev(&mut m, |m, e| m.acquire(2, &[10, 11, 20], 1, e));
        assert_eq!(m.counts(), (7, 7, 0, 2));
        // Request 1 ends: 12 and its output block are inactive, 10 and 11 still pinned.
        ev(&mut m, |m, e| m.release(1, e));
        assert_eq!(m.counts(), (6, 4, 2, 1));
        // Request 2 ends: everything inactive; order: output, 12 (epoch 1), 20, 11, 10 (epoch 2).
        ev(&mut m, |m, e| m.release(2, e));
        assert_eq!(m.counts(), (5, 0, 5, 0));
        // A 9-block prompt: 5 free slots, then 4 evictions in that order (the output block
        // has no hash to report).
        assert_eq!(ev(&mut m, |m, e| m.acquire(3, &(30..39).collect::<Vec<_>>(), 0, e)), vec![12, 20, 11]);
        assert_eq!(m.counts(), (10, 9, 1, 1));
        assert!(m.holds(10) && !m.holds(11));
        ev(&mut m, |m, e| m.release(3, e));
        assert_eq!(m.counts(), (10, 0, 10, 0));
    }

    #[test]
    fn release_and_grow_of_unknown_leases_change_nothing() {
        let mut m = RankLru::new(2);
        ev(&mut m, |m, e| m.acquire(1, &[1], 0, e));
        ev(&mut m, |m, e| m.release(7, e));
        ev(&mut m, |m, e| m.grow(7, 5, 1, e));
        assert_eq!(m.counts(), (1, 1, 0, 1));
        ev(&mut m, |m, e| m.release(1, e));
        ev(&mut m, |m, e| m.release(1, e));
        assert_eq!(m.counts(), (1, 0, 1, 0));
    }
}
