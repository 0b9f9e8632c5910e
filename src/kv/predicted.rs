//! Predicted cache state: the router's own decisions, remembered for a while.
//!
//! Approximate mode (`DYN_USE_KV_EVENTS=false`) has nothing else: every routed request's full
//! blocks count as cached on the chosen worker rank for `DYN_ROUTER_TTL_SECS`. With events on
//! and `DYN_ROUTER_PREDICTED_TTL_SECS` set, the same structure bridges the moments before the
//! engine's events arrive (bursts of one prefix); the router takes, per worker rank, the larger
//! of the real and the predicted overlap, so a confirming event makes the prediction moot and
//! an unconfirmed one simply expires.
//!
//! Each touch of a (worker rank, block) sets its deadline; expiry is lazy (on every routing
//! call) and periodic (the server's tick), in deadline order. Memory is bounded: past
//! `max_entries` pending deadlines the oldest entries expire early.

use std::{
    collections::VecDeque,
    time::{Duration, Instant},
};

use rustc_hash::FxHashMap;

use super::{
    events::{ExternalBlockHash, StorageTier},
    hash::{seq_hashes, LocalBlockHash},
    index::{Index, Overlap},
};
use crate::workers::{WorkerId, WorkerRank};

/// Deadlines are kept in ticks of this length (Dynamo rounds expiry to 100 ms buckets too).
const TICK: Duration = Duration::from_millis(100);

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
}

impl Predicted {
    pub fn new(ttl: Duration, max_entries: usize) -> Self {
        Predicted {
            index: Index::new(),
            ttl_ticks: ttl.as_millis().div_ceil(TICK.as_millis()).clamp(1, u32::MAX as u128 / 2) as u32,
            max_entries: max_entries.max(1),
            epoch: None,
            deadline: FxHashMap::default(),
            queue: VecDeque::new(),
        }
    }

    fn tick(&mut self, now: Instant) -> u32 {
        let epoch = *self.epoch.get_or_insert(now);
        (now.saturating_duration_since(epoch).as_millis() / TICK.as_millis()).min(u32::MAX as u128 / 2) as u32
    }

    /// Remembers that `worker` now caches the blocks `hashes` (a prompt from the root).
    pub fn record(&mut self, worker: WorkerRank, hashes: &[LocalBlockHash], now: Instant) {
        if hashes.is_empty() {
            return;
        }
        let seqs = seq_hashes(hashes);
        let blocks: Vec<_> = seqs.iter().zip(hashes).map(|(s, &l)| (ExternalBlockHash(s.0), l)).collect();
        // A chain from the root always has a parent: it cannot be rejected.
        let _ = self.index.store(worker, StorageTier::Device, None, &blocks);
        let dl = self.tick(now) + self.ttl_ticks;
        for s in &seqs {
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
    }

    /// (worker rank, block) pairs currently predicted.
    pub fn len(&self) -> usize {
        self.deadline.len()
    }

    pub fn is_empty(&self) -> bool {
        self.deadline.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;


    fn hs(xs: &[u64]) -> Vec<LocalBlockHash> {
        xs.iter().map(|&x| LocalBlockHash(x)).collect()
    }

    fn device(p: &Predicted, q: &[u64]) -> Vec<(u64, u32)> {
        let mut v: Vec<_> = p.overlaps(&hs(q)).iter().map(|o| (o.worker.id.0, o.blocks[0])).collect();
        v.sort();
        v
    }

    #[test]
    fn decisions_expire_after_the_ttl_unless_touched_again() {
        let t0 = Instant::now();
        let mut p = Predicted::new(Duration::from_secs(120), 1000);
        p.record(WorkerRank::rank0(1), &hs(&[1, 2, 3]), t0);
        p.record(WorkerRank::rank0(2), &hs(&[1, 2]), t0 + Duration::from_secs(60));
        assert_eq!(device(&p, &[1, 2, 3, 4]), vec![(1, 3), (2, 2)]);
        p.expire(t0 + Duration::from_secs(119));
        assert_eq!(device(&p, &[1, 2, 3]), vec![(1, 3), (2, 2)]);
        // Worker 1 touches its shared prefix again at 100 s: only block 3 expires at 120 s.
        p.record(WorkerRank::rank0(1), &hs(&[1, 2]), t0 + Duration::from_secs(100));
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
        let mut p = Predicted::new(Duration::from_secs(120), 10);
        for i in 0..5u64 {
            p.record(WorkerRank::rank0(i), &hs(&[100 + i, 200 + i, 300 + i]), t0 + Duration::from_secs(i));
        }
        assert!(p.len() <= 10, "{}", p.len());
        assert!(device(&p, &[100]).is_empty(), "the oldest decision went first");
        assert_eq!(device(&p, &[104, 204, 304]), vec![(4, 3)]);
    }

    #[test]
    fn a_departed_worker_is_forgotten() {
        let t0 = Instant::now();
        let mut p = Predicted::new(Duration::from_secs(5), 100);
        p.record(WorkerRank::rank0(1), &hs(&[1, 2]), t0);
        p.remove_worker(WorkerId(1));
        assert!(p.is_empty());
        assert!(device(&p, &[1]).is_empty());
        p.expire(t0 + Duration::from_secs(10));
    }
}
