//! Active sequences: the load each (worker, dp_rank) carries from requests we routed to it.
//!
//! Per rank: the distinct KV blocks its requests hold (their chains of block keys in one
//! [`PromptTrie`], so a shared prefix counts once), the prompt tokens still being prefilled, the
//! number of requests, and — when output tracking is on — placeholder blocks for generated
//! tokens. Lifecycle: `add` at the
//! pick, `mark_prefill_completed` at the first response chunk, `free` at the end; entries older
//! than the expiry are dropped by `expire` in case an end was never seen.

use std::time::{Duration, Instant};

use rustc_hash::FxHashMap;

use super::prompts::{NodeId, PromptTrie};
use crate::workers::WorkerRank;

/// Load of one (worker, rank) as the cost model reads it.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct RankLoad {
    pub active_decode_blocks: f64,
    pub active_prefill_tokens: u64,
    pub active_requests: u32,
    /// Of those, the ones whose prompt is still being prefilled.
    pub prefilling_requests: u32,
    /// `predicted-ttft`'s E2E guard: Σ of the long-decode weights the router gave its requests
    /// there (the output each has left; see [`ActiveSequences::set_long_decode`]).
    pub long_decodes: f64,
}

#[derive(Default)]
struct Rank {
    /// Distinct prompt blocks held (in the trie).
    blocks: u64,
    prefill_tokens: u64,
    requests: u32,
    /// Requests whose prompt is still being prefilled (prefill tokens booked, no first chunk).
    prefilling: u32,
    output_blocks: f64,
    long_decodes: f64,
}

impl Rank {
    fn is_idle(&self) -> bool {
        self.requests == 0
    }
}

struct Active {
    worker: WorkerRank,
    /// Where its prompt chain ends in the trie (`None`: no blocks tracked).
    chain_end: Option<NodeId>,
    prefill_tokens: u64,
    started: Instant,
    /// Prompt length, for output block boundaries.
    isl: u64,
    /// Tokens generated so far and the placeholder weight they added.
    generated: u64,
    output_weight: f64,
    /// What it adds to its rank's `long_decodes`.
    long_decode: f64,
}

/// What one booking holds, for `add`.
#[derive(Clone, Debug)]
pub struct Booking<'a> {
    pub worker: WorkerRank,
    /// Keys of the prompt's full blocks, from the first: hashes naming the prefix (random ones
    /// when KV reuse is not assumed).
    pub blocks: &'a [u64],
    /// Tokens the worker must prefill (`isl − cached`); 0 when prefill is not tracked.
    pub prefill_tokens: u64,
    pub isl: u64,
}

pub struct ActiveSequences {
    // Keys are router-made (ranks, sequential ids) or already uniform (xxh3 block hashes):
    // the cheap hasher is enough, and a decision does thousands of these lookups.
    ranks: FxHashMap<WorkerRank, Rank>,
    requests: FxHashMap<u64, Active>,
    prompts: PromptTrie,
    expiry: Duration,
}

impl ActiveSequences {
    pub fn new(expiry: Duration) -> Self {
        ActiveSequences { ranks: FxHashMap::default(), requests: FxHashMap::default(), prompts: PromptTrie::default(), expiry }
    }

    /// Books request `id`; a repeated id is ignored (returns false).
    pub fn add(&mut self, id: u64, b: Booking<'_>, now: Instant) -> bool {
        if self.requests.contains_key(&id) {
            return false;
        }
        let chain_end = (!b.blocks.is_empty()).then(|| self.prompts.insert(b.worker, b.blocks));
        let rank = self.ranks.entry(b.worker).or_default();
        rank.blocks += chain_end.map_or(0, |(_, added)| added);
        rank.prefill_tokens += b.prefill_tokens;
        rank.requests += 1;
        rank.prefilling += u32::from(b.prefill_tokens > 0);
        self.requests.insert(
            id,
            Active {
                worker: b.worker,
                chain_end: chain_end.map(|(end, _)| end),
                prefill_tokens: b.prefill_tokens,
                started: now,
                isl: b.isl,
                generated: 0,
                output_weight: 0.0,
                long_decode: 0.0,
            },
        );
        true
    }

    /// The first response chunk arrived: the request's prompt no longer loads prefill.
    pub fn mark_prefill_completed(&mut self, id: u64) {
        if let Some(a) = self.requests.get_mut(&id) {
            if let Some(r) = self.ranks.get_mut(&a.worker) {
                r.prefill_tokens -= a.prefill_tokens;
                r.prefilling -= u32::from(a.prefill_tokens > 0);
            }
            a.prefill_tokens = 0;
        }
    }

    /// `generated` tokens have been streamed so far. Each time the sequence crosses a block
    /// boundary a placeholder block is added, weighted `max(0, 1 − generated/osl)` when the
    /// expected output length is known (a request near its end will soon free its blocks).
    pub fn record_output(&mut self, id: u64, generated: u64, block_size: u32, osl: Option<u32>) {
        let Some(a) = self.requests.get_mut(&id) else { return };
        if generated <= a.generated {
            return;
        }
        let bs = block_size.max(1) as u64;
        let crossed = (a.isl + generated).div_ceil(bs) - (a.isl + a.generated).div_ceil(bs);
        a.generated = generated;
        if crossed == 0 {
            return;
        }
        let w = osl.map_or(1.0, |osl| (1.0 - generated as f64 / osl.max(1) as f64).max(0.0));
        let add = crossed as f64 * w;
        a.output_weight += add;
        if let Some(r) = self.ranks.get_mut(&a.worker) {
            r.output_blocks += add;
        }
    }

    /// Request `id`'s weight in its rank's long-decode sum (kept here, beside the rest of the
    /// rank's load, so a decision reads it with the load it already looks up).
    pub fn set_long_decode(&mut self, id: u64, weight: f64) {
        let Some(a) = self.requests.get_mut(&id) else { return };
        if let Some(r) = self.ranks.get_mut(&a.worker) {
            r.long_decodes += weight - a.long_decode;
        }
        a.long_decode = weight;
    }

    /// The request ended (completion, error, cancel): release everything it held.
    pub fn free(&mut self, id: u64) {
        let Some(a) = self.requests.remove(&id) else { return };
        let released = a.chain_end.map_or(0, |end| self.prompts.remove(a.worker, end));
        let Some(r) = self.ranks.get_mut(&a.worker) else { return };
        r.blocks -= released;
        r.prefill_tokens -= a.prefill_tokens;
        r.prefilling -= u32::from(a.prefill_tokens > 0);
        r.requests -= 1;
        r.output_blocks -= a.output_weight;
        r.long_decodes -= a.long_decode;
        if r.is_idle() {
            self.ranks.remove(&a.worker);
        }
    }

    /// Drops requests booked longer ago than the expiry (their end was never seen).
    pub fn expire(&mut self, now: Instant) -> usize {
        let stale: Vec<u64> = self
            .requests
            .iter()
            .filter(|(_, a)| now.saturating_duration_since(a.started) > self.expiry)
            .map(|(id, _)| *id)
            .collect();
        for id in &stale {
            self.free(*id);
        }
        stale.len()
    }

    /// Drops every booking on ranks of a worker that left the fleet.
    pub fn retain_workers(&mut self, keep: impl Fn(&WorkerRank) -> bool) {
        let gone: Vec<u64> = self.requests.iter().filter(|(_, a)| !keep(&a.worker)).map(|(id, _)| *id).collect();
        for id in gone {
            self.free(id);
        }
    }

    pub fn load(&self, w: &WorkerRank) -> RankLoad {
        self.ranks.get(w).map_or_else(RankLoad::default, |r| RankLoad {
            active_decode_blocks: r.blocks as f64 + r.output_blocks,
            active_prefill_tokens: r.prefill_tokens,
            active_requests: r.requests,
            prefilling_requests: r.prefilling,
            long_decodes: r.long_decodes,
        })
    }

    /// Per rank, how many leading blocks of `blocks` (a prompt's chain of block keys) its
    /// requests hold already: the rest is what booking the request there would add. Ranks
    /// holding none are absent.
    pub fn held_prefixes(&self, blocks: &[u64]) -> FxHashMap<WorkerRank, u64> {
        self.prompts.held_prefixes(blocks)
    }

    pub fn len(&self) -> usize {
        self.requests.len()
    }

    pub fn is_empty(&self) -> bool {
        self.requests.is_empty()
    }

    pub fn contains(&self, id: u64) -> bool {
        self.requests.contains_key(&id)
    }

    pub fn worker_of(&self, id: u64) -> Option<WorkerRank> {
        self.requests.get(&id).map(|a| a.worker)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;


    #[test]
    fn shared_prefix_blocks_count_once_and_prefill_clears_at_first_token() {
        let mut a = ActiveSequences::new(Duration::from_secs(300));
        let t = Instant::now();
        assert!(a.add(1, Booking { worker: WorkerRank::rank0(1), blocks: &[10, 11, 12], prefill_tokens: 48, isl: 48 }, t));
        assert!(a.add(2, Booking { worker: WorkerRank::rank0(1), blocks: &[10, 11, 13], prefill_tokens: 16, isl: 48 }, t));
        assert!(!a.add(2, Booking { worker: WorkerRank::rank0(1), blocks: &[99], prefill_tokens: 1, isl: 1 }, t));
        assert_eq!(a.load(&WorkerRank::rank0(1)), RankLoad { active_decode_blocks: 4.0, active_prefill_tokens: 64, active_requests: 2, prefilling_requests: 2, long_decodes: 0.0 });
        let held = a.held_prefixes(&[10, 11, 14]);
        assert_eq!((held.get(&WorkerRank::rank0(1)), held.get(&WorkerRank::rank0(2))), (Some(&2), None));
        a.mark_prefill_completed(1);
        assert_eq!(a.load(&WorkerRank::rank0(1)).active_prefill_tokens, 16);
        assert_eq!(a.load(&WorkerRank::rank0(1)).prefilling_requests, 1);
        a.free(1);
        assert_eq!(a.load(&WorkerRank::rank0(1)), RankLoad { active_decode_blocks: 3.0, active_prefill_tokens: 16, active_requests: 1, prefilling_requests: 1, long_decodes: 0.0 });
        a.free(2);
        assert_eq!(a.load(&WorkerRank::rank0(1)).prefilling_requests, 0);
    }

    #[test]
    fn a_ranks_long_decode_sum_follows_its_requests_weights_and_ends() {
        let mut a = ActiveSequences::new(Duration::from_secs(300));
        let (t, w) = (Instant::now(), WorkerRank::rank0(1));
        a.add(1, Booking { worker: w, blocks: &[1], prefill_tokens: 0, isl: 16 }, t);
        a.add(2, Booking { worker: w, blocks: &[2], prefill_tokens: 0, isl: 16 }, t);
        a.set_long_decode(1, 1.0);
        a.set_long_decode(2, 0.5);
        assert_eq!(a.load(&w).long_decodes, 1.5);
        a.set_long_decode(1, 0.25); // its output is mostly out: the weight replaces the old one
        assert_eq!(a.load(&w).long_decodes, 0.75);
        a.free(2);
        assert_eq!(a.load(&w).long_decodes, 0.25);
        a.set_long_decode(9, 1.0); // not booked: nothing changes
        assert_eq!(a.load(&w).long_decodes, 0.25);
    }

    #[test]
    fn output_blocks_grow_at_boundaries_and_decay_towards_osl() {
        let mut a = ActiveSequences::new(Duration::from_secs(300));
        a.add(1, Booking { worker: WorkerRank::rank0(1), blocks: &[1], prefill_tokens: 0, isl: 16 }, Instant::now());
        a.record_output(1, 1, 16, None); // 17 tokens: a second block begins
        assert_eq!(a.load(&WorkerRank::rank0(1)).active_decode_blocks, 2.0);
        a.record_output(1, 16, 16, None); // still 2 blocks
        assert_eq!(a.load(&WorkerRank::rank0(1)).active_decode_blocks, 2.0);
        a.record_output(1, 24, 16, Some(32)); // third block at 3/4 of the expected output → 0.25
        assert_eq!(a.load(&WorkerRank::rank0(1)).active_decode_blocks, 2.25);
        a.free(1);
        assert_eq!(a.load(&WorkerRank::rank0(1)), RankLoad::default());
    }

    #[test]
    fn expiry_drops_only_stale_requests() {
        let mut a = ActiveSequences::new(Duration::from_secs(300));
        let t0 = Instant::now();
        a.add(1, Booking { worker: WorkerRank::rank0(1), blocks: &[1], prefill_tokens: 5, isl: 5 }, t0);
        a.add(2, Booking { worker: WorkerRank::rank0(1), blocks: &[2], prefill_tokens: 5, isl: 5 }, t0 + Duration::from_secs(200));
        assert_eq!(a.expire(t0 + Duration::from_secs(301)), 1);
        assert_eq!(a.worker_of(1), None);
        assert_eq!(a.worker_of(2), Some(WorkerRank::rank0(1)));
    }

    #[derive(Clone, Debug)]
    enum Op {
        Add { id: u64, worker: u64, blocks: Vec<u64>, prefill: u64 },
        FirstToken(u64),
        Output(u64, u64),
        Free(u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0..8u64, 0..3u64, proptest::collection::vec(0..6u64, 0..5), 0..100u64)
                .prop_map(|(id, worker, blocks, prefill)| Op::Add { id, worker, blocks, prefill }),
            (0..8u64).prop_map(Op::FirstToken),
            (0..8u64, 0..80u64).prop_map(|(id, g)| Op::Output(id, g)),
            (0..8u64).prop_map(Op::Free),
        ]
    }

    proptest! {
        // Whatever the interleaving, once every request has ended nothing is left.
        #[test]
        fn counters_return_to_zero(ops in proptest::collection::vec(op(), 0..60)) {
            let mut a = ActiveSequences::new(Duration::from_secs(300));
            let t = Instant::now();
            for o in &ops {
                match o {
                    Op::Add { id, worker, blocks, prefill } => {
                        a.add(*id, Booking { worker: WorkerRank::rank0(*worker), blocks, prefill_tokens: *prefill, isl: 40 }, t);
                    }
                    Op::FirstToken(id) => a.mark_prefill_completed(*id),
                    Op::Output(id, g) => a.record_output(*id, *g, 16, Some(64)),
                    Op::Free(id) => a.free(*id),
                }
                for w in 0..3 {
                    let l = a.load(&WorkerRank::rank0(w));
                    prop_assert!(l.active_decode_blocks >= -1e-9);
                }
            }
            for id in 0..8 {
                a.free(id);
            }
            prop_assert!(a.is_empty());
            prop_assert!(a.ranks.is_empty());
            prop_assert!(a.prompts.is_empty());
            for w in 0..3 {
                prop_assert_eq!(a.load(&WorkerRank::rank0(w)), RankLoad::default());
            }
        }
    }
}
