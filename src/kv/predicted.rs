//! Predicted cache state: the router's own decisions, remembered.
//!
//! Approximate mode (`DYN_USE_KV_EVENTS=false`) has nothing else. Under the `ttl` policy
//! (Dynamo's default) every routed request's full blocks count as cached on the chosen worker
//! rank for `DYN_ROUTER_TTL_SECS`. Under `lru` (`DYN_ROUTER_APPROXIMATE_CACHE_POLICY`) a rank
//! with a known capacity (`total_kv_blocks`) is modelled as a cache of that many blocks
//! ([`RankLru`]): blocks stay until capacity pressure evicts them, least recently released
//! first, and running requests' blocks are pinned; a rank without a capacity stays under the
//! TTL. With events on and `DYN_ROUTER_PREDICTED_TTL_SECS` set, the TTL state bridges the
//! moments before the engine's events arrive (bursts of one prefix); the router takes, per
//! worker rank, the larger of the real and the predicted overlap, so a confirming event makes
//! the prediction moot and an unconfirmed one simply expires.
//!
//! TTL: each touch of a (worker rank, block) sets its deadline; expiry is lazy (on every
//! routing call) and periodic (the server's tick), in deadline order. Memory is bounded: past
//! `max_entries` pending deadlines the oldest entries expire early. LRU: a rank holds at most
//! its capacity (capped at `max_entries`) plus the blocks of its running requests.
//!
//! Invariant: a (rank, block) is in the index exactly when the TTL state or the rank's model
//! holds it (a rank is under one or the other, never both).

use std::{
    collections::VecDeque,
    time::{Duration, Instant},
};

use rustc_hash::{FxHashMap, FxHashSet};

use super::{
    events::{ExternalBlockHash, StorageTier},
    hash::{seq_hashes, LocalBlockHash},
    index::{Index, Overlap},
    lru::RankLru,
};
use crate::workers::{WorkerId, WorkerRank};

/// Deadlines are kept in ticks of this length (Dynamo rounds expiry to 100 ms buckets too).
const TICK: Duration = Duration::from_millis(100);

/// How approximate mode retains the router's decisions (`DYN_ROUTER_APPROXIMATE_CACHE_POLICY`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ApproxCachePolicy {
    /// Forget a decision's blocks after the TTL.
    #[default]
    Ttl,
    /// Keep them until the rank's capacity forces LRU eviction (TTL for ranks of unknown capacity).
    Lru,
}

pub struct Predicted {
    /// Blocks keyed by their sequence hash, which stands in for the engine hash.
    index: Index,
    ttl_ticks: u32,
    max_entries: usize,
    epoch: Option<Instant>,
    deadline: FxHashMap<(WorkerRank, u64), u32>,
    /// (deadline, worker rank, sequence hash) in deadline order; entries whose key was touched
    /// again since are stale and skipped.
    queue: VecDeque<(u32, WorkerRank, u64)>,
    policy: ApproxCachePolicy,
    /// `lru`: the ranks with a known capacity.
    lru: FxHashMap<WorkerRank, RankLru>,
}

impl Predicted {
    pub fn new(policy: ApproxCachePolicy, ttl: Duration, max_entries: usize) -> Self {
        Predicted {
            index: Index::new(),
            ttl_ticks: ttl.as_millis().div_ceil(TICK.as_millis()).clamp(1, u32::MAX as u128 / 2) as u32,
            max_entries: max_entries.max(1),
            epoch: None,
            deadline: FxHashMap::default(),
            queue: VecDeque::new(),
            policy,
            lru: FxHashMap::default(),
        }
    }

    fn tick(&mut self, now: Instant) -> u32 {
        let epoch = *self.epoch.get_or_insert(now);
        (now.saturating_duration_since(epoch).as_millis() / TICK.as_millis()).min(u32::MAX as u128 / 2) as u32
    }

    /// `lru`: the fleet's ranks with their capacity in blocks (`None` = unknown: the TTL
    /// applies). A rank that changes between the two starts over empty; ranks not listed are
    /// forgotten. A no-op under `ttl`.
    pub fn set_capacities(&mut self, ranks: impl IntoIterator<Item = (WorkerRank, Option<u64>)>) {
        if self.policy != ApproxCachePolicy::Lru {
            return;
        }
        let mut listed = FxHashSet::default();
        for (rank, capacity) in ranks {
            listed.insert(rank);
            let capacity = capacity.filter(|&c| c > 0).map(|c| c.min(self.max_entries as u64) as usize);
            match (capacity, self.lru.get_mut(&rank)) {
                (Some(c), Some(m)) => {
                    let mut evicted = Vec::new();
                    m.set_capacity(c, &mut evicted);
                    self.unindex(rank, &evicted);
                }
                (Some(c), None) => {
                    self.clear_rank(rank);
                    self.lru.insert(rank, RankLru::new(c));
                }
                (None, Some(_)) => self.clear_rank(rank),
                (None, None) => {}
            }
        }
        let gone: Vec<WorkerRank> = self.lru.keys().filter(|r| !listed.contains(r)).copied().collect();
        for rank in gone {
            self.clear_rank(rank);
        }
    }

    /// Forgets everything about one rank, under either policy.
    fn clear_rank(&mut self, rank: WorkerRank) {
        self.index.clear_rank(rank);
        self.lru.remove(&rank);
        if self.deadline.keys().any(|(w, _)| *w == rank) {
            self.deadline.retain(|(w, _), _| *w != rank);
        }
    }

    fn unindex(&mut self, rank: WorkerRank, evicted: &[u64]) {
        if !evicted.is_empty() {
            let hashes: Vec<ExternalBlockHash> = evicted.iter().map(|&h| ExternalBlockHash(h)).collect();
            self.index.remove(rank, StorageTier::Device, &hashes);
        }
    }

    /// Request `lease` (a key unique to it) was booked on `worker` with the prompt blocks
    /// `hashes` (from the root) and `partial` more blocks not full. True when the rank's
    /// model now holds the blocks until [`Predicted::release`]; false when the TTL applies
    /// (nothing to release).
    pub fn acquire(&mut self, worker: WorkerRank, lease: u64, hashes: &[LocalBlockHash], partial: usize, now: Instant) -> bool {
        let seqs = seq_hashes(hashes);
        let blocks: Vec<_> = seqs.iter().zip(hashes).map(|(s, &l)| (ExternalBlockHash(s.0), l)).collect();
        let Some(m) = self.lru.get_mut(&worker) else {
            self.record(worker, &blocks, now);
            return false;
        };
        let keys: Vec<u64> = seqs.iter().map(|s| s.0).collect();
        let mut evicted = Vec::new();
        m.acquire(lease, &keys, partial, &mut evicted);
        // A chain from the root always has a parent: it cannot be rejected. The acquired
        // blocks are pinned, so none of them is among the evicted.
        let _ = self.index.store(worker, StorageTier::Device, None, &blocks);
        self.unindex(worker, &evicted);
        true
    }

    /// Request `lease` on `worker` now fills `full_blocks` blocks with its output (prompt
    /// included) and `partial` more: they take room in the rank's model.
    pub fn grow(&mut self, worker: WorkerRank, lease: u64, full_blocks: usize, partial: usize) {
        if let Some(m) = self.lru.get_mut(&worker) {
            let mut evicted = Vec::new();
            m.grow(lease, full_blocks, partial, &mut evicted);
            self.unindex(worker, &evicted);
        }
    }

    /// Request `lease` on `worker` ended: its blocks may be evicted from now on.
    pub fn release(&mut self, worker: WorkerRank, lease: u64) {
        if let Some(m) = self.lru.get_mut(&worker) {
            let mut evicted = Vec::new();
            m.release(lease, &mut evicted);
            self.unindex(worker, &evicted);
        }
    }

    /// TTL: remembers that `worker` now caches `blocks` (a prompt from the root).
    fn record(&mut self, worker: WorkerRank, blocks: &[(ExternalBlockHash, LocalBlockHash)], now: Instant) {
        if blocks.is_empty() {
            return;
        }
        let _ = self.index.store(worker, StorageTier::Device, None, blocks);
        let dl = self.tick(now) + self.ttl_ticks;
        for (s, _) in blocks {
            if self.deadline.insert((worker, s.0), dl) != Some(dl) {
                self.queue.push_back((dl, worker, s.0));
            }
        }
        while self.queue.len() > self.max_entries {
            let (dl, w, s) = self.queue.pop_front().expect("queue is not empty");
            self.forget(dl, w, s);
        }
    }

    /// Drops everything whose deadline has passed.
    pub fn expire(&mut self, now: Instant) {
        let t = self.tick(now);
        while let Some(&(dl, w, s)) = self.queue.front() {
            if dl > t {
                break;
            }
            self.queue.pop_front();
            self.forget(dl, w, s);
        }
    }

    /// Expires one queue entry, unless the key was touched again since (a stale entry).
    fn forget(&mut self, dl: u32, w: WorkerRank, s: u64) {
        let key = (w, s);
        match self.deadline.get(&key) {
            Some(&d) if d == dl => {
                self.deadline.remove(&key);
                self.index.remove(w, StorageTier::Device, &[ExternalBlockHash(s)]);
            }
            _ => {}
        }
    }

    pub fn overlaps(&self, hashes: &[LocalBlockHash]) -> Vec<Overlap> {
        self.index.overlaps(hashes)
    }

    pub fn remove_worker(&mut self, id: WorkerId) {
        self.index.remove_worker(id);
        self.deadline.retain(|(w, _), _| w.id != id);
        self.lru.retain(|w, _| w.id != id);
    }

    /// (worker rank, block) pairs currently predicted.
    pub fn len(&self) -> usize {
        self.deadline.len() + self.lru.values().map(RankLru::hashes).sum::<usize>()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{HashMap, HashSet};

    fn hs(xs: &[u64]) -> Vec<LocalBlockHash> {
        xs.iter().map(|&x| LocalBlockHash(x)).collect()
    }

    fn device(p: &Predicted, q: &[u64]) -> Vec<(u64, u32)> {
        let mut v: Vec<_> = p.overlaps(&hs(q)).iter().map(|o| (o.worker.id.0, o.blocks[0])).collect();
        v.sort();
        v
    }

    /// Books `xs` on worker `w` under the TTL (nothing to release).
    fn ttl(p: &mut Predicted, w: u64, xs: &[u64], at: Instant) {
        assert!(!p.acquire(WorkerRank::rank0(w), 0, &hs(xs), 0, at));
    }

    #[test]
    fn decisions_expire_after_the_ttl_unless_touched_again() {
        let t0 = Instant::now();
        let mut p = Predicted::new(ApproxCachePolicy::Ttl, Duration::from_secs(120), 1000);
        ttl(&mut p, 1, &[1, 2, 3], t0);
        ttl(&mut p, 2, &[1, 2], t0 + Duration::from_secs(60));
        assert_eq!(device(&p, &[1, 2, 3, 4]), vec![(1, 3), (2, 2)]);
        p.expire(t0 + Duration::from_secs(119));
        assert_eq!(device(&p, &[1, 2, 3]), vec![(1, 3), (2, 2)]);
        // Worker 1 touches its shared prefix again at 100 s: only block 3 expires at 120 s.
        ttl(&mut p, 1, &[1, 2], t0 + Duration::from_secs(100));
        p.expire(t0 + Duration::from_secs(121));
        assert_eq!(device(&p, &[1, 2, 3]), vec![(1, 2), (2, 2)]);
        p.expire(t0 + Duration::from_secs(181));
        assert_eq!(device(&p, &[1, 2, 3]), vec![(1, 2)]);
        p.expire(t0 + Duration::from_secs(221));
        assert!(p.is_empty());
        assert!(device(&p, &[1]).is_empty());
    }

    #[test]
    fn memory_is_bounded_by_expiring_the_oldest_early() {
        let t0 = Instant::now();
        let mut p = Predicted::new(ApproxCachePolicy::Ttl, Duration::from_secs(120), 10);
        for i in 0..5u64 {
            ttl(&mut p, i, &[100 + i, 200 + i, 300 + i], t0 + Duration::from_secs(i));
        }
        assert!(p.len() <= 10, "{}", p.len());
        assert!(device(&p, &[100]).is_empty(), "the oldest decision went first");
        assert_eq!(device(&p, &[104, 204, 304]), vec![(4, 3)]);
    }

    #[test]
    fn a_departed_worker_is_forgotten() {
        let t0 = Instant::now();
        let mut p = Predicted::new(ApproxCachePolicy::Ttl, Duration::from_secs(5), 100);
        ttl(&mut p, 1, &[1, 2], t0);
        p.remove_worker(WorkerId(1));
        assert!(p.is_empty());
        assert!(device(&p, &[1]).is_empty());
        p.expire(t0 + Duration::from_secs(10));
    }

    #[test]
    fn lru_keeps_blocks_past_the_ttl_until_capacity_evicts_them_and_unknown_capacity_uses_the_ttl() {
        let t0 = Instant::now();
        let mut p = Predicted::new(ApproxCachePolicy::Lru, Duration::from_secs(120), 1000);
        p.set_capacities([(WorkerRank::rank0(1), Some(4)), (WorkerRank::rank0(2), None)]);
        assert!(p.acquire(WorkerRank::rank0(1), 1, &hs(&[1, 2, 3]), 0, t0));
        ttl(&mut p, 2, &[1, 2, 3], t0);
        p.release(WorkerRank::rank0(1), 1);
        p.expire(t0 + Duration::from_secs(3600));
        assert_eq!(device(&p, &[1, 2, 3]), vec![(1, 3)]);
        // Two more blocks on worker 1 (capacity 4): the oldest release's suffix, block 3, goes.
        assert!(p.acquire(WorkerRank::rank0(1), 2, &hs(&[7, 8]), 0, t0));
        assert_eq!(device(&p, &[1, 2, 3]), vec![(1, 2)]);
        assert_eq!(device(&p, &[7, 8]), vec![(1, 2)]);
        // Pinned blocks stay over capacity; releasing them evicts from the old release first.
        assert!(p.acquire(WorkerRank::rank0(1), 3, &hs(&[9, 10, 11]), 1, t0));
        assert_eq!((device(&p, &[1]), device(&p, &[9, 10, 11])), (vec![], vec![(1, 3)]));
        p.release(WorkerRank::rank0(1), 3);
        p.release(WorkerRank::rank0(1), 2);
        // Resident: 9, 10, 11 (released first) and 7, 8 (last): 5 > 4 → 11 goes.
        assert_eq!((device(&p, &[9, 10, 11]), device(&p, &[7, 8])), (vec![(1, 2)], vec![(1, 2)]));
        assert_eq!(p.len(), 4);
    }

    #[test]
    fn a_rank_changing_policy_starts_over_and_unlisted_ranks_are_forgotten() {
        let t0 = Instant::now();
        let (w1, w2) = (WorkerRank::rank0(1), WorkerRank::rank0(2));
        let mut p = Predicted::new(ApproxCachePolicy::Lru, Duration::from_secs(120), 1000);
        p.set_capacities([(w1, None), (w2, Some(8))]);
        ttl(&mut p, 1, &[1, 2], t0);
        assert!(p.acquire(w2, 1, &hs(&[1, 2]), 0, t0));
        // Worker 1's capacity becomes known, worker 2's is lost: both start over empty.
        p.set_capacities([(w1, Some(8)), (w2, None)]);
        assert!(p.is_empty() && device(&p, &[1]).is_empty());
        p.release(w2, 1);
        p.expire(t0 + Duration::from_secs(1000));
        assert!(p.acquire(w1, 2, &hs(&[5]), 0, t0));
        assert_eq!(device(&p, &[5]), vec![(1, 1)]);
        // A smaller capacity evicts (nothing here: block 5 is pinned); then worker 1 leaves.
        p.set_capacities([(w1, Some(1))]);
        assert_eq!(device(&p, &[5]), vec![(1, 1)]);
        p.set_capacities([]);
        assert!(p.is_empty() && device(&p, &[5]).is_empty());
        // Under `ttl` capacities change nothing.
        let mut t = Predicted::new(ApproxCachePolicy::Ttl, Duration::from_secs(120), 1000);
        t.set_capacities([(w1, Some(8))]);
        ttl(&mut t, 1, &[1], t0);
    }

    /// The contract, as plainly as it can be written: resident copies in a list, eviction by
    /// a scan for the least (release epoch, reversed place) among unreferenced ones.
    #[derive(Default)]
    struct Naive {
        cap: usize,
        copies: Vec<NaiveCopy>,
        next_id: u64,
        epoch: u64,
        leases: HashMap<u64, (Vec<u64>, usize)>,
        private: usize,
    }

    struct NaiveCopy {
        id: u64,
        hash: Option<u64>,
        refs: u32,
        epoch: u64,
        pos: usize,
    }

    impl Naive {
        fn new_copy(&mut self, hash: Option<u64>, pos: usize) -> u64 {
            self.next_id += 1;
            self.copies.push(NaiveCopy { id: self.next_id, hash, refs: 1, epoch: 0, pos });
            self.next_id
        }

        fn acquire(&mut self, lease: u64, seqs: &[u64], private: usize) {
            let mut ids = Vec::new();
            let mut hit = true;
            for (pos, &h) in seqs.iter().enumerate() {
                let oldest = self.copies.iter_mut().filter(|c| c.hash == Some(h)).min_by_key(|c| c.id).filter(|_| hit);
                match oldest {
                    Some(c) => {
                        c.refs += 1;
                        ids.push(c.id);
                    }
                    None => {
                        hit = false;
                        ids.push(self.new_copy(Some(h), pos));
                    }
                }
            }
            self.private += private;
            self.leases.insert(lease, (ids, private));
            self.evict();
        }

        fn grow(&mut self, lease: u64, full: usize, private: usize) {
            let Some((ids, was)) = self.leases.get(&lease).cloned() else { return };
            let new: Vec<u64> = (ids.len()..full).map(|pos| self.new_copy(None, pos)).collect();
            self.leases.insert(lease, (ids.into_iter().chain(new).collect(), private));
            self.private = self.private - was + private;
            self.evict();
        }

        fn release(&mut self, lease: u64) {
            let Some((ids, private)) = self.leases.remove(&lease) else { return };
            self.epoch += 1;
            self.private -= private;
            for c in self.copies.iter_mut().filter(|c| ids.contains(&c.id)) {
                c.refs -= 1;
                if c.refs == 0 {
                    c.epoch = self.epoch;
                }
            }
            self.evict();
        }

        fn evict(&mut self) {
            while self.copies.len() + self.private > self.cap {
                let Some(i) = (0..self.copies.len())
                    .filter(|&i| self.copies[i].refs == 0)
                    .min_by_key(|&i| (self.copies[i].epoch, std::cmp::Reverse(self.copies[i].pos)))
                else {
                    break;
                };
                self.copies.remove(i);
            }
        }

        fn holds(&self, h: u64) -> bool {
            self.copies.iter().any(|c| c.hash == Some(h))
        }
    }

    #[derive(Clone, Debug)]
    enum Op {
        /// Rank, prompt (local hashes over a small alphabet, so prefixes are shared), partial block.
        Acquire(u64, Vec<u64>, bool),
        /// Lease, output blocks, partial block.
        Grow(usize, usize, bool),
        Release(usize),
        Capacity(u64, Option<u64>),
    }

    fn op() -> impl proptest::strategy::Strategy<Value = Op> {
        use proptest::prelude::*;
        prop_oneof![
            4 => (1..3u64, proptest::collection::vec(1..4u64, 0..6), any::<bool>()).prop_map(|(r, p, t)| Op::Acquire(r, p, t)),
            1 => (0..12usize, 0..4usize, any::<bool>()).prop_map(|(l, n, t)| Op::Grow(l, n, t)),
            3 => (0..12usize).prop_map(Op::Release),
            1 => (1..3u64, proptest::option::weighted(0.8, 0..10u64)).prop_map(|(r, c)| Op::Capacity(r, c)),
        ]
    }

    proptest::proptest! {
        // Whatever the sequence of bookings, output, ends and capacity changes on two ranks:
        // each rank's model evicts exactly what the plain model does, its pinned blocks stay,
        // it holds no more than its capacity beyond what is pinned, and the index a decision
        // reads says exactly what the model holds.
        #[test]
        fn lru_matches_the_plain_model_and_the_index_matches_both(ops in proptest::collection::vec(op(), 0..60)) {
            let t0 = Instant::now();
            let mut p = Predicted::new(ApproxCachePolicy::Lru, Duration::from_secs(120), 1000);
            let mut caps: HashMap<u64, Option<u64>> = HashMap::from([(1, Some(6)), (2, Some(3))]);
            p.set_capacities(caps.iter().map(|(&r, &c)| (WorkerRank::rank0(r), c)));
            let mut naive: HashMap<u64, Naive> = caps.iter().map(|(&r, &c)| (r, Naive { cap: c.unwrap() as usize, ..Default::default() })).collect();
            // Leases by booking order: (rank, lease key, prompt).
            let mut leases: Vec<(u64, u64, Vec<u64>)> = Vec::new();
            let mut prompts: HashSet<Vec<u64>> = HashSet::new();
            for o in &ops {
                match o.clone() {
                    Op::Acquire(r, prompt, tail) => {
                        let key = leases.len() as u64 + 100;
                        let seqs: Vec<u64> = seq_hashes(&hs(&prompt)).iter().map(|s| s.0).collect();
                        let held = p.acquire(WorkerRank::rank0(r), key, &hs(&prompt), tail as usize, t0);
                        proptest::prop_assert_eq!(held, naive.contains_key(&r));
                        if let Some(n) = naive.get_mut(&r) {
                            n.acquire(key, &seqs, tail as usize);
                        }
                        leases.push((r, key, prompt.clone()));
                        prompts.insert(prompt);
                    }
                    Op::Grow(i, out, tail) => if let Some((r, key, prompt)) = leases.get(i) {
                        p.grow(WorkerRank::rank0(*r), *key, prompt.len() + out, tail as usize);
                        if let Some(n) = naive.get_mut(r) {
                            n.grow(*key, prompt.len() + out, tail as usize);
                        }
                    },
                    Op::Release(i) => if let Some(&(r, key, _)) = leases.get(i) {
                        p.release(WorkerRank::rank0(r), key);
                        if let Some(n) = naive.get_mut(&r) {
                            n.release(key);
                        }
                    },
                    Op::Capacity(r, c) => {
                        // A capacity of 0 is unknown: the TTL applies.
                        let was = caps.insert(r, c).flatten().filter(|&c| c > 0);
                        p.set_capacities(caps.iter().map(|(&r, &c)| (WorkerRank::rank0(r), c)));
                        match (was, c.filter(|&c| c > 0)) {
                            (Some(_), Some(c)) => {
                                let n = naive.get_mut(&r).expect("an LRU rank");
                                n.cap = c as usize;
                                n.evict();
                            }
                            (None, Some(c)) => {
                                naive.insert(r, Naive { cap: c as usize, ..Default::default() });
                            }
                            (_, None) => {
                                naive.remove(&r);
                            }
                        }
                    }
                }
                for (&r, n) in &naive {
                    let m = &p.lru[&WorkerRank::rank0(r)];
                    let pinned = n.copies.iter().filter(|c| c.refs > 0).count() + n.private;
                    proptest::prop_assert_eq!(m.counts().0, n.copies.len() + n.private);
                    proptest::prop_assert_eq!(m.counts().1, pinned);
                    proptest::prop_assert!(m.counts().0 <= n.cap.max(pinned));
                    for prompt in &prompts {
                        let seqs = seq_hashes(&hs(prompt));
                        for s in &seqs {
                            proptest::prop_assert_eq!(m.holds(s.0), n.holds(s.0));
                        }
                        let lead = seqs.iter().take_while(|s| n.holds(s.0)).count() as u32;
                        let got = p.overlaps(&hs(prompt)).iter().find(|o| o.worker == WorkerRank::rank0(r)).map_or(0, |o| o.blocks[0]);
                        proptest::prop_assert_eq!(got, lead, "rank {} prompt {:?}", r, prompt);
                    }
                }
                // Every running request's prompt stays resident.
                for (r, key, prompt) in &leases {
                    if naive.get(r).is_some_and(|n| n.leases.contains_key(key)) {
                        let m = &p.lru[&WorkerRank::rank0(*r)];
                        proptest::prop_assert!(seq_hashes(&hs(prompt)).iter().all(|s| m.holds(s.0)));
                    }
                }
            }
        }
    }
}
