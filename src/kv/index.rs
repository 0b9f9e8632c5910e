//! The KV index: which (worker, dp_rank, tier) holds which block of which prefix.
//!
//! Synchronous and pure. Blocks form a prefix tree keyed by local hash (`tokens_hash`) along
//! the chain from the root; the engine's `block_hash` is only an opaque name, kept per holder,
//! to find a stored block's parent and to remove it.
//!
//! Layout (chosen by measurement, see `benches/index.rs` and the notes):
//! - Every block is 12 bytes in one slab: its local hash and one `meta` word holding either its
//!   single holder inline or an index into `spill` (sorted holder lists of shared blocks).
//! - A block stored right after its parent in the slab is that parent's *implicit* child (flag
//!   `CONT`): long chains, the common case, need no per-block map entry, and walking them is a
//!   sequential scan. Other parent → child links (branch points, the roots) live in `side`.
//! - Each holder maps engine hashes to slab slots ([`ExtMap`], 12-byte entries), for parents
//!   and removals.
//!
//! Invariants: a live block has holders or children (empty leaves are freed at once, up the
//! chain); `CONT` is set only on live blocks whose parent is the previous slot; every `side`
//! entry has its reverse in `side_parent` and is counted in `side_children`, and a block's
//! `SIDE` flag says that count is not zero (so appending a chain needs no map probe).

use rustc_hash::FxHashMap;

use super::{
    ext_map::ExtMap,
    events::{ExternalBlockHash, KvCacheEventData, ResidencyDomain, RouterEvent, StorageTier},
    hash::LocalBlockHash,
};
use crate::workers::{DpRank, WorkerId, WorkerRank};

/// Parent id of the roots' links.
const ROOT: u32 = u32::MAX;
/// `meta`: this block is the implicit child of the previous slot.
const CONT: u32 = 1 << 31;
/// `meta`: the payload is an index into `spill`.
const MANY: u32 = 1 << 30;
/// `meta`: this block has children linked through `side`.
const SIDE: u32 = 1 << 29;
const PAYLOAD: u32 = SIDE - 1;
/// Payload of a live block nobody holds (an interior node kept for its children).
const NONE: u32 = PAYLOAD;
/// `meta` of a free slot.
const FREE: u32 = PAYLOAD - 1;
/// Holder ids are `rank_slot << 2 | tier`, below `FREE`.
const MAX_RANK_SLOTS: u32 = FREE >> 2;
/// Stores and removals fetch the engine-hash entry this many blocks ahead.
const PREFETCH: usize = 16;

#[derive(Clone, Copy)]
struct Block {
    /// The local hash, split so the block packs into 12 bytes (alignment 4).
    hash: [u32; 2],
    meta: u32,
}

impl Block {
    fn new(hash: u64, cont: bool) -> Block {
        Block { hash: [hash as u32, (hash >> 32) as u32], meta: NONE | if cont { CONT } else { 0 } }
    }
    fn hash(&self) -> u64 {
        self.hash[0] as u64 | (self.hash[1] as u64) << 32
    }
    fn is_free(&self) -> bool {
        self.meta == FREE
    }
    fn cont(&self) -> bool {
        self.meta & CONT != 0
    }
    /// The holder, `NONE`, or `MANY | list index`.
    fn payload(&self) -> u32 {
        self.meta & (MANY | PAYLOAD)
    }
}

/// One (worker, rank, tier): id = `rank_slot << 2 | tier`.
type Holder = u32;

/// Leading blocks of a request that one worker rank holds, per storage tier
/// (indexed by [`StorageTier::index`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Overlap {
    pub worker: WorkerRank,
    pub blocks: [u32; 4],
}

/// What applying one event did, beyond changing the index.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Applied {
    /// Event ids skipped since the last one seen for this (worker, rank): events were lost.
    pub lost: u64,
    /// The event could not be applied (and changed nothing).
    pub rejected: Option<&'static str>,
}

#[derive(Default)]
struct HolderState {
    ext: ExtMap,
}

#[derive(Default)]
pub struct Index {
    blocks: Vec<Block>,
    /// Free slots; may hold stale entries (slots reused since), skipped when popped.
    free: Vec<u32>,
    free_count: usize,
    side: FxHashMap<(u32, u64), u32>,
    side_parent: FxHashMap<u32, u32>,
    side_children: FxHashMap<u32, u32>,
    spill: Vec<HolderSet>,
    spill_free: Vec<u32>,
    ranks: Vec<Option<WorkerRank>>,
    rank_slots: FxHashMap<WorkerRank, u32>,
    rank_free: Vec<u32>,
    /// Indexed by holder id.
    holders: Vec<Option<Box<HolderState>>>,
    last_event: FxHashMap<WorkerRank, u64>,
}

impl Index {
    pub fn new() -> Self {
        Self::default()
    }

    /// Blocks in the tree (held or interior).
    pub fn block_count(&self) -> usize {
        self.blocks.len() - self.free_count
    }

    /// (block, holder) pairs.
    pub fn residency_count(&self) -> usize {
        self.holders.iter().flatten().map(|h| h.ext.len()).sum()
    }

    /// Heap bytes the index has allocated (capacities, not the allocator's own overhead);
    /// walks every holder list, so it is for metrics scrapes, not the hot path.
    pub fn heap_bytes(&self) -> usize {
        use std::mem::size_of;
        fn vec<T>(v: &Vec<T>) -> usize {
            v.capacity() * size_of::<T>()
        }
        // hashbrown: one control byte per bucket, buckets ≥ capacity (load ≤ 7/8).
        fn map<K, V>(m: &FxHashMap<K, V>) -> usize {
            m.capacity() * 8 / 7 * (size_of::<(K, V)>() + 1)
        }
        vec(&self.blocks)
            + vec(&self.free)
            + map(&self.side)
            + map(&self.side_parent)
            + map(&self.side_children)
            + vec(&self.spill)
            + self.spill.iter().map(|s| vec(&s.list)).sum::<usize>()
            + vec(&self.spill_free)
            + vec(&self.ranks)
            + map(&self.rank_slots)
            + vec(&self.rank_free)
            + vec(&self.holders)
            + self.holders.iter().flatten().map(|h| size_of::<HolderState>() + h.ext.heap_bytes()).sum::<usize>()
            + map(&self.last_event)
    }

    /// Applies one event; never fails as a whole (bad events change nothing and say why).
    pub fn apply(&mut self, ev: &RouterEvent) -> Applied {
        let wr = WorkerRank { id: ev.worker_id, dp_rank: DpRank(ev.event.dp_rank) };
        let mut out = Applied::default();
        // Ids count accepted events per publisher; a jump = loss. A step back = the publisher
        // restarted (or a redelivery): applied anyway, stores and removals are idempotent.
        let last = self.last_event.insert(wr, ev.event.event_id);
        if let Some(l) = last {
            // Saturating: ids are the publisher's, and u64::MAX must not overflow (tests/fuzz).
            out.lost = ev.event.event_id.saturating_sub(l).saturating_sub(1);
        }
        if ev.residency_domain == Some(ResidencyDomain::CacheOwner) {
            out.rejected = Some("cache_owner_residency");
            return out;
        }
        match &ev.event.data {
            KvCacheEventData::Stored(s) => {
                let b = &s.blocks;
                if let Err(r) = self.store_with(wr, ev.storage_tier, s.parent_hash, b.len(), |i| (b[i].block_hash.0, b[i].tokens_hash.0)) {
                    out.rejected = Some(r);
                }
            }
            KvCacheEventData::Removed(r) => self.remove(wr, ev.storage_tier, &r.block_hashes),
            KvCacheEventData::Cleared => self.clear_rank(wr),
        }
        out
    }

    /// Stores a chain of `(engine hash, local hash)` blocks after `parent` (an engine hash the
    /// same worker rank stored before, in any tier; `None` = from the root).
    pub fn store(
        &mut self,
        wr: WorkerRank,
        tier: StorageTier,
        parent: Option<ExternalBlockHash>,
        blocks: &[(ExternalBlockHash, LocalBlockHash)],
    ) -> Result<(), &'static str> {
        self.store_with(wr, tier, parent, blocks.len(), |i| (blocks[i].0 .0, blocks[i].1 .0))
    }

    /// [`Index::store`] of `n` blocks given as `block(i)` = (engine hash, local hash), so an
    /// event's blocks need no copy.
    fn store_with(
        &mut self,
        wr: WorkerRank,
        tier: StorageTier,
        parent: Option<ExternalBlockHash>,
        n: usize,
        block: impl Fn(usize) -> (u64, u64),
    ) -> Result<(), &'static str> {
        let Some(holder) = self.holder_id(wr, tier) else { return Err("too_many_workers") };
        let mut p = match parent {
            None => ROOT,
            Some(ph) => match self.find_parent(holder, ph.0) {
                Some(s) => s,
                None => return Err("unknown_parent"),
            },
        };
        // The holder's engine-hash table is far larger than the caches and each key lands at
        // random in it: sized once for the event, then each entry is fetched `PREFETCH`
        // blocks ahead, so the cache misses overlap instead of coming one per block.
        let st = self.holders[holder as usize].as_mut().expect("holder state exists");
        st.ext.reserve(n);
        for i in 0..n.min(PREFETCH) {
            st.ext.prefetch(block(i).0);
        }
        let mut memo = None;
        for i in 0..n {
            if i + PREFETCH < n {
                let st = self.holders[holder as usize].as_ref().expect("holder state exists");
                st.ext.prefetch(block(i + PREFETCH).0);
            }
            let (ext, local) = block(i);
            if p != ROOT && p as usize + 1 == self.blocks.len() && self.blocks[p as usize].meta & SIDE == 0 {
                // The slab's last block, childless: the rest of the chain is new, each block
                // the implicit child of the one before and held by this holder alone (the
                // bulk of a new sequence; no lookup, no holder-list change).
                self.push_block(Block { hash: [local as u32, (local >> 32) as u32], meta: CONT | holder });
                p += 1;
                let st = self.holders[holder as usize].as_mut().expect("holder state exists");
                if let Some(old) = st.ext.insert(ext, p) {
                    self.drop_holding(old, holder, &mut None);
                }
                continue;
            }
            let child = match self.find_child(p, local) {
                Some(c) => c,
                None => self.add_child(p, local),
            };
            let st = self.holders[holder as usize].as_mut().expect("holder state exists");
            match st.ext.insert(ext, child) {
                Some(old) if old == child => {}
                prev => {
                    // One holding per engine hash: a block two engine hashes name is held
                    // twice (holder lists are multisets) and stays until both are removed.
                    self.change_holders(child, holder, true, &mut memo);
                    if let Some(old) = prev {
                        // The engine reused a hash for other content: that block is gone.
                        self.drop_holding(old, holder, &mut None);
                    }
                }
            }
            p = child;
        }
        Ok(())
    }

    /// Removes blocks by engine hash; unknown hashes are ignored (already gone).
    pub fn remove(&mut self, wr: WorkerRank, tier: StorageTier, hashes: &[ExternalBlockHash]) {
        let Some(&rs) = self.rank_slots.get(&wr) else { return };
        let holder = rs << 2 | tier.index() as u32;
        let Some(st) = self.holders[holder as usize].as_ref() else { return };
        for h in hashes.iter().take(PREFETCH) {
            st.ext.prefetch(h.0);
        }
        let mut memo = None;
        for (i, &h) in hashes.iter().enumerate() {
            let Some(st) = self.holders[holder as usize].as_mut() else { return };
            if let Some(ahead) = hashes.get(i + PREFETCH) {
                st.ext.prefetch(ahead.0);
            }
            if let Some(slot) = st.ext.remove(h.0) {
                self.drop_holding(slot, holder, &mut memo);
            }
        }
    }

    /// Drops every block of one worker rank, in every tier.
    pub fn clear_rank(&mut self, wr: WorkerRank) {
        let Some(rs) = self.rank_slots.remove(&wr) else { return };
        for tier in 0..4 {
            let holder = rs << 2 | tier;
            if let Some(st) = self.holders[holder as usize].take() {
                let mut memo = None;
                for slot in st.ext.values() {
                    self.drop_holding(slot, holder, &mut memo);
                }
            }
        }
        self.ranks[rs as usize] = None;
        self.rank_free.push(rs);
    }

    /// Drops every block of a worker (all ranks): it left the fleet.
    pub fn remove_worker(&mut self, id: WorkerId) {
        let ranks: Vec<WorkerRank> = self.rank_slots.keys().filter(|w| w.id == id).copied().collect();
        for wr in ranks {
            self.clear_rank(wr);
        }
        self.last_event.retain(|w, _| w.id != id);
    }

    /// Workers with anything in the index (or an event id on record).
    pub fn workers(&self) -> Vec<WorkerId> {
        let mut w: Vec<WorkerId> = self.rank_slots.keys().chain(self.last_event.keys()).map(|w| w.id).collect();
        w.sort_unstable();
        w.dedup();
        w
    }

    /// For a request's local hashes: how many leading blocks each worker rank holds, per tier.
    /// The walk stops as soon as no holder continues.
    pub fn overlaps(&self, hashes: &[LocalBlockHash]) -> Vec<Overlap> {
        // Whoever matches at all holds the first block: `reach` lists those holders (sorted,
        // as holder lists are, so a rank's tiers are adjacent) with how many leading blocks
        // each holds, filled in as they drop out; `active` indexes the ones still matching.
        let mut reach: Vec<(Holder, u32)> = Vec::new();
        if let Some(mut slot) = hashes.first().and_then(|h| self.find_child(ROOT, h.0)) {
            let mut cur = self.holders_of(slot);
            reach = cur.to_vec().into_iter().map(|h| (h, 0)).collect();
            let mut active: Vec<u32> = (0..reach.len() as u32).collect();
            let mut depth = 1;
            while depth < hashes.len() && !active.is_empty() {
                // Implicit children with the holders of `slot` keep `active` as it is: one
                // comparison of hash and meta word per block, the bulk of a long match.
                let run = self.same_holder_run(slot, &hashes[depth..]);
                slot += run as u32;
                depth += run;
                let Some(&h) = hashes.get(depth) else { break };
                let Some(next) = self.find_child(slot, h.0) else { break };
                let next_holders = self.holders_of(next);
                if active.len() == 1 {
                    if !next_holders.contains(reach[active[0] as usize].0) {
                        break;
                    }
                } else if self.blocks[next as usize].payload() != self.blocks[slot as usize].payload() && !next_holders.same_as(&cur) {
                    // (Equal holder lists, as along a shared prefix, keep `active` as is;
                    // lists shared by both blocks compare by id.)
                    let mut from = 0;
                    active.retain(|&k| {
                        let (holder, held) = &mut reach[k as usize];
                        let keep = next_holders.contains_ascending(*holder, &mut from);
                        if !keep {
                            *held = depth as u32;
                        }
                        keep
                    });
                }
                slot = next;
                cur = next_holders;
                depth += 1;
            }
            for &k in &active {
                reach[k as usize].1 = depth as u32;
            }
        }
        let mut out = Vec::with_capacity(reach.len());
        for tiers in reach.chunk_by(|a, b| a.0 >> 2 == b.0 >> 2) {
            let Some(worker) = self.ranks[(tiers[0].0 >> 2) as usize] else { continue };
            // The tiers' depths gathered in a register, not written one by one into the
            // entry: reading an entry back whole after narrow writes stalls on store
            // forwarding, which cost more than the walk when a hundred workers matched.
            let bits = tiers.iter().fold(0u128, |b, &(holder, depth)| b | (depth as u128) << (32 * (holder & 3)));
            let blocks = [bits as u32, (bits >> 32) as u32, (bits >> 64) as u32, (bits >> 96) as u32];
            out.push(Overlap { worker, blocks });
        }
        out
    }

    // ------------------------------------------------------------------ internals

    fn holder_id(&mut self, wr: WorkerRank, tier: StorageTier) -> Option<Holder> {
        let rs = match self.rank_slots.get(&wr) {
            Some(&rs) => rs,
            None => {
                let rs = match self.rank_free.pop() {
                    Some(rs) => rs,
                    None if (self.ranks.len() as u32) < MAX_RANK_SLOTS => {
                        self.ranks.push(None);
                        self.holders.extend((0..4).map(|_| None));
                        self.ranks.len() as u32 - 1
                    }
                    None => return None,
                };
                self.ranks[rs as usize] = Some(wr);
                self.rank_slots.insert(wr, rs);
                rs
            }
        };
        let id = rs << 2 | tier.index() as u32;
        self.holders[id as usize].get_or_insert_with(Default::default);
        Some(id)
    }

    /// A parent is looked up in the same tier first, then in the rank's other tiers (an
    /// offloaded block's parent may still be on the device).
    fn find_parent(&self, holder: Holder, ph: u64) -> Option<u32> {
        let base = holder & !3;
        std::iter::once(holder)
            .chain((0..4).map(|t| base | t).filter(|&h| h != holder))
            .find_map(|h| self.holders[h as usize].as_ref()?.ext.get(ph))
    }

    fn find_child(&self, parent: u32, hash: u64) -> Option<u32> {
        if parent != ROOT {
            if let Some(b) = self.blocks.get(parent as usize + 1) {
                if b.cont() && b.hash() == hash {
                    return Some(parent + 1);
                }
            }
            if self.blocks[parent as usize].meta & SIDE == 0 {
                return None;
            }
        }
        self.side.get(&(parent, hash)).copied()
    }

    /// How many of `hashes` the implicit chain after `slot` matches with `slot`'s holders
    /// (the same payload: one holder or one shared list).
    fn same_holder_run(&self, slot: u32, hashes: &[LocalBlockHash]) -> usize {
        let want = CONT | self.blocks[slot as usize].payload();
        let after = &self.blocks[slot as usize + 1..];
        after.iter().zip(hashes).take_while(|(b, h)| b.meta & !SIDE == want && b.hash() == h.0).count()
    }

    fn has_implicit_child(&self, slot: u32) -> bool {
        self.blocks.get(slot as usize + 1).is_some_and(|b| b.cont())
    }

    /// Grows the slab by a quarter at a time: doubling would leave a third of it unused on
    /// average, and the slab is most of the index.
    fn push_block(&mut self, b: Block) {
        if self.blocks.len() == self.blocks.capacity() {
            self.blocks.reserve_exact((self.blocks.len() / 4).max(1024));
        }
        self.blocks.push(b);
    }

    fn add_child(&mut self, parent: u32, hash: u64) -> u32 {
        if parent != ROOT && !self.has_implicit_child(parent) {
            let next = parent as usize + 1;
            if next == self.blocks.len() {
                self.push_block(Block::new(hash, true));
                return next as u32;
            }
            if self.blocks[next].is_free() {
                self.blocks[next] = Block::new(hash, true);
                self.free_count -= 1;
                return next as u32;
            }
        }
        let slot = loop {
            match self.free.pop() {
                Some(s) if self.blocks[s as usize].is_free() => {
                    self.free_count -= 1;
                    break s;
                }
                Some(_) => continue,
                None => {
                    self.push_block(Block::new(hash, false));
                    break self.blocks.len() as u32 - 1;
                }
            }
        };
        self.blocks[slot as usize] = Block::new(hash, false);
        self.side.insert((parent, hash), slot);
        self.side_parent.insert(slot, parent);
        *self.side_children.entry(parent).or_default() += 1;
        if parent != ROOT {
            self.blocks[parent as usize].meta |= SIDE;
        }
        slot
    }

    fn holders_of(&self, slot: u32) -> Holders<'_> {
        let b = &self.blocks[slot as usize];
        match b.payload() {
            NONE => Holders::None,
            p if p & MANY != 0 => Holders::Many(&self.spill[(p & PAYLOAD) as usize].list),
            p => Holders::One(p),
        }
    }

    fn set_payload(&mut self, slot: u32, payload: u32) {
        let b = &mut self.blocks[slot as usize];
        b.meta = (b.meta & (CONT | SIDE)) | payload;
    }

    /// Adds (`add`) or takes off one holding of `holder` on `slot`. Holder lists of several
    /// holders are shared by consecutive blocks with the same holders (copy on write): a
    /// store or removal along a chain makes each distinct change once and `memo` replays it
    /// for the next block, and lookups compare list ids instead of lists.
    fn change_holders(&mut self, slot: u32, holder: Holder, add: bool, memo: &mut Option<Memo>) {
        let from = self.blocks[slot as usize].payload();
        if let Some(m) = *memo {
            if m.from == from && m.holder == holder && m.add == add {
                self.retain_set(m.to);
                self.release_set(from);
                self.set_payload(slot, m.to);
                return;
            }
        }
        let to = match (self.holders_of(slot), add) {
            (Holders::None, true) => holder,
            (Holders::None, false) => from,
            (Holders::One(a), true) => self.new_set(if a < holder { vec![a, holder] } else { vec![holder, a] }),
            (Holders::One(a), false) => if a == holder { NONE } else { from },
            (Holders::Many(list), _) => {
                let pos = if add { Ok(list.partition_point(|&x| x <= holder)) } else { list.binary_search(&holder).map_err(|_| ()) };
                match pos {
                    Err(()) => from,
                    Ok(_) if !add && list.len() == 2 => list[usize::from(list[0] == holder)],
                    Ok(pos) => {
                        let idx = (from & PAYLOAD) as usize;
                        if self.spill[idx].refs == 1 {
                            let list = &mut self.spill[idx].list;
                            if add { list.insert(pos, holder) } else { list.remove(pos); }
                            from
                        } else {
                            let mut list = self.spill[idx].list.clone();
                            if add { list.insert(pos, holder) } else { list.remove(pos); }
                            self.new_set(list)
                        }
                    }
                }
            }
        };
        // An in-place change (`to == from`) touched a list no other block has: nothing to
        // replay.
        *memo = None;
        if to != from {
            self.release_set(from);
            self.set_payload(slot, to);
            *memo = Some(Memo { from, holder, add, to });
        }
    }

    /// A new shared list (one user), as a payload.
    fn new_set(&mut self, list: Vec<Holder>) -> u32 {
        let set = HolderSet { refs: 1, list };
        let idx = match self.spill_free.pop() {
            Some(i) => {
                self.spill[i as usize] = set;
                i
            }
            None => {
                self.spill.push(set);
                self.spill.len() as u32 - 1
            }
        };
        MANY | idx
    }

    fn retain_set(&mut self, payload: u32) {
        if payload & MANY != 0 {
            self.spill[(payload & PAYLOAD) as usize].refs += 1;
        }
    }

    fn release_set(&mut self, payload: u32) {
        if payload & MANY != 0 {
            let idx = payload & PAYLOAD;
            let set = &mut self.spill[idx as usize];
            set.refs -= 1;
            if set.refs == 0 {
                set.list = Vec::new();
                self.spill_free.push(idx);
            }
        }
    }

    /// Takes one holding of `holder` off a block and frees whatever that leaves empty.
    fn drop_holding(&mut self, slot: u32, holder: Holder, memo: &mut Option<Memo>) {
        self.change_holders(slot, holder, false, memo);
        self.prune(slot);
    }

    /// Frees `slot` if it is an empty leaf, then its parent if that became one, and so on.
    fn prune(&mut self, mut slot: u32) {
        while slot != ROOT {
            let b = self.blocks[slot as usize];
            if b.is_free() || b.payload() != NONE || b.meta & SIDE != 0 || self.has_implicit_child(slot) {
                return;
            }
            let parent = if b.cont() {
                slot - 1
            } else {
                let parent = self.side_parent.remove(&slot).expect("side-linked block has a parent");
                self.side.remove(&(parent, b.hash()));
                let n = self.side_children.get_mut(&parent).expect("parent counts its side children");
                *n -= 1;
                if *n == 0 {
                    self.side_children.remove(&parent);
                    if parent != ROOT {
                        self.blocks[parent as usize].meta &= !SIDE;
                    }
                }
                parent
            };
            self.blocks[slot as usize] = Block { hash: [0, 0], meta: FREE };
            self.free.push(slot);
            self.free_count += 1;
            if self.free.len() > 2 * self.free_count + 1024 {
                let blocks = &self.blocks;
                self.free.retain(|&s| blocks[s as usize].is_free());
                self.free.sort_unstable();
                self.free.dedup();
            }
            slot = parent;
        }
    }
}

/// A list of several holders, shared by the blocks that have exactly these holders.
#[derive(Default)]
struct HolderSet {
    refs: u32,
    /// Sorted; a holder appears once per engine hash naming the block.
    list: Vec<Holder>,
}

/// One holder-list change, replayed on the next block that starts from the same list.
#[derive(Clone, Copy)]
struct Memo {
    from: u32,
    holder: Holder,
    add: bool,
    to: u32,
}

/// The holders of one block.
#[derive(Clone, Copy)]
enum Holders<'a> {
    None,
    One(Holder),
    /// Sorted; a holder appears once per engine hash naming the block.
    Many(&'a [Holder]),
}

impl Holders<'_> {
    fn same_as(&self, other: &Holders) -> bool {
        match (self, other) {
            (Holders::None, Holders::None) => true,
            (Holders::One(a), Holders::One(b)) => a == b,
            (Holders::Many(a), Holders::Many(b)) => a == b,
            _ => false,
        }
    }

    fn contains(&self, h: Holder) -> bool {
        match *self {
            Holders::None => false,
            Holders::One(x) => x == h,
            Holders::Many(l) => l.binary_search(&h).is_ok(),
        }
    }

    /// [`Holders::contains`] for holders asked in ascending order: `from` keeps the place
    /// in the list where the previous one was looked for.
    fn contains_ascending(&self, h: Holder, from: &mut usize) -> bool {
        match *self {
            Holders::Many(l) => {
                while l.get(*from).is_some_and(|&x| x < h) {
                    *from += 1;
                }
                l.get(*from) == Some(&h)
            }
            _ => self.contains(h),
        }
    }

    fn to_vec(self) -> Vec<Holder> {
        match self {
            Holders::None => Vec::new(),
            Holders::One(x) => vec![x],
            Holders::Many(l) => {
                let mut v = l.to_vec();
                v.dedup();
                v
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::events::{KvCacheEvent, KvCacheRemoveData, KvCacheStoreData, KvCacheStoredBlockData};
    use proptest::prelude::*;
    use std::collections::{BTreeMap, HashSet};

    fn wr(id: u64, rank: u32) -> WorkerRank {
        WorkerRank { id: WorkerId(id), dp_rank: DpRank(rank) }
    }

    fn chain(ext0: u64, locals: &[u64]) -> Vec<(ExternalBlockHash, LocalBlockHash)> {
        locals.iter().enumerate().map(|(i, &l)| (ExternalBlockHash(ext0 + i as u64), LocalBlockHash(l))).collect()
    }

    fn q(locals: &[u64]) -> Vec<LocalBlockHash> {
        locals.iter().map(|&l| LocalBlockHash(l)).collect()
    }

    fn scores(ix: &Index, locals: &[u64]) -> BTreeMap<(u64, u32), [u32; 4]> {
        ix.overlaps(&q(locals)).into_iter().map(|o| ((o.worker.id.0, o.worker.dp_rank.0), o.blocks)).collect()
    }

    const D: StorageTier = StorageTier::Device;

    #[test]
    fn heap_bytes_cover_the_blocks_and_engine_hashes() {
        let mut ix = Index::new();
        let empty = ix.heap_bytes();
        let locals: Vec<u64> = (1..=1000).collect();
        ix.store(wr(1, 0), D, None, &chain(10_000, &locals)).unwrap();
        // At least a 12-byte slab block and a 12-byte engine-hash entry per stored block.
        assert!(ix.heap_bytes() >= empty + 1000 * 24, "{} bytes", ix.heap_bytes());
    }

    #[test]
    fn shared_prefix_then_divergence() {
        let mut ix = Index::new();
        ix.store(wr(1, 0), D, None, &chain(100, &[1, 2, 3, 4])).unwrap();
        ix.store(wr(2, 0), D, None, &chain(200, &[1, 2, 9])).unwrap();
        // Worker 2 continues its own chain from its engine hash 202 (block "9").
        ix.store(wr(2, 0), D, Some(ExternalBlockHash(202)), &chain(300, &[10])).unwrap();
        let s = scores(&ix, &[1, 2, 3, 4, 5]);
        assert_eq!(s[&(1, 0)], [4, 0, 0, 0]);
        assert_eq!(s[&(2, 0)], [2, 0, 0, 0]);
        assert_eq!(scores(&ix, &[1, 2, 9, 10])[&(2, 0)], [4, 0, 0, 0]);
        assert!(scores(&ix, &[7, 1, 2]).is_empty(), "contiguous from the first block only");
        assert_eq!(ix.block_count(), 6);
        assert_eq!(ix.residency_count(), 8);
    }

    #[test]
    fn removal_cuts_the_prefix_and_frees_leaves() {
        let mut ix = Index::new();
        ix.store(wr(1, 0), D, None, &chain(100, &[1, 2, 3, 4])).unwrap();
        ix.store(wr(2, 0), D, None, &chain(200, &[1, 2, 3, 4])).unwrap();
        ix.remove(wr(1, 0), D, &[ExternalBlockHash(102)]);
        let s = scores(&ix, &[1, 2, 3, 4]);
        assert_eq!((s[&(1, 0)], s[&(2, 0)]), ([2, 0, 0, 0], [4, 0, 0, 0]));
        ix.remove(wr(2, 0), D, &(200..204).map(ExternalBlockHash).collect::<Vec<_>>());
        ix.remove(wr(1, 0), D, &[ExternalBlockHash(103), ExternalBlockHash(999)]);
        assert_eq!(scores(&ix, &[1, 2, 3, 4])[&(1, 0)], [2, 0, 0, 0]);
        assert_eq!(ix.block_count(), 2, "blocks 3 and 4 are gone with their last holders");
        ix.remove(wr(1, 0), D, &[ExternalBlockHash(101), ExternalBlockHash(100)]);
        assert_eq!(ix.block_count(), 0);
        assert!(ix.overlaps(&q(&[1])).is_empty());
    }

    #[test]
    fn tiers_ranks_clear_and_worker_removal() {
        let mut ix = Index::new();
        ix.store(wr(1, 0), D, None, &chain(100, &[1, 2, 3])).unwrap();
        // Offloaded to host: the parent is found in the device tier.
        ix.store(wr(1, 0), StorageTier::HostPinned, Some(ExternalBlockHash(101)), &chain(102, &[3, 4])).unwrap();
        ix.store(wr(1, 1), D, None, &chain(100, &[1])).unwrap();
        ix.store(wr(2, 0), StorageTier::Disk, None, &chain(100, &[1, 2])).unwrap();
        let s = scores(&ix, &[1, 2, 3, 4]);
        assert_eq!(s[&(1, 0)], [3, 0, 0, 0], "host tier holds blocks 3..4 but not the leading ones");
        assert_eq!(s[&(1, 1)], [1, 0, 0, 0]);
        assert_eq!(s[&(2, 0)], [0, 0, 2, 0]);
        ix.store(wr(1, 0), StorageTier::HostPinned, None, &chain(500, &[1, 2])).unwrap();
        assert_eq!(scores(&ix, &[1, 2, 3, 4])[&(1, 0)], [3, 4, 0, 0]);

        ix.clear_rank(wr(1, 0));
        let s = scores(&ix, &[1, 2, 3, 4]);
        assert!(!s.contains_key(&(1, 0)));
        assert_eq!(s[&(1, 1)], [1, 0, 0, 0]);
        ix.remove_worker(WorkerId(1));
        ix.remove_worker(WorkerId(2));
        assert_eq!((ix.block_count(), ix.residency_count()), (0, 0));
        assert!(ix.workers().is_empty());
    }

    #[test]
    fn unknown_parent_is_rejected_and_changes_nothing() {
        let mut ix = Index::new();
        assert_eq!(ix.store(wr(1, 0), D, Some(ExternalBlockHash(5)), &chain(100, &[1])), Err("unknown_parent"));
        assert_eq!(ix.block_count(), 0);
        // Another worker's engine hash is not a parent for this one.
        ix.store(wr(2, 0), D, None, &chain(5, &[1])).unwrap();
        assert_eq!(ix.store(wr(1, 0), D, Some(ExternalBlockHash(5)), &chain(100, &[2])), Err("unknown_parent"));
    }

    fn event(worker: u64, id: u64, data: KvCacheEventData) -> RouterEvent {
        RouterEvent {
            worker_id: WorkerId(worker),
            storage_tier: D,
            residency_domain: None,
            event: KvCacheEvent { event_id: id, data, dp_rank: 0 },
        }
    }

    #[test]
    fn apply_tracks_event_ids_and_semantics() {
        let mut ix = Index::new();
        let stored = |ext: u64, l: u64| {
            KvCacheEventData::Stored(KvCacheStoreData {
                parent_hash: None,
                start_position: None,
                blocks: vec![KvCacheStoredBlockData { block_hash: ExternalBlockHash(ext), tokens_hash: LocalBlockHash(l), mm_extra_info: None }],
            })
        };
        assert_eq!(ix.apply(&event(1, 1, stored(10, 1))), Applied::default());
        assert_eq!(ix.apply(&event(1, 2, stored(11, 2))), Applied::default());
        assert_eq!(ix.apply(&event(1, 5, stored(12, 3))).lost, 2);
        assert_eq!(ix.apply(&event(1, 6, KvCacheEventData::Cleared)), Applied::default());
        assert!(ix.overlaps(&q(&[1])).is_empty());
        // After Cleared, ids continue; a publisher restart (ids from 1 again) still applies.
        assert_eq!(ix.apply(&event(1, 7, stored(10, 1))).lost, 0);
        assert_eq!(ix.apply(&event(1, 1, stored(13, 4))), Applied::default());
        assert_eq!(scores(&ix, &[4])[&(1, 0)], [1, 0, 0, 0]);
        let removed = KvCacheEventData::Removed(KvCacheRemoveData { block_hashes: vec![ExternalBlockHash(13)] });
        ix.apply(&event(1, 2, removed));
        assert!(ix.overlaps(&q(&[4])).is_empty());
        let mut owner = event(2, 1, stored(1, 1));
        owner.residency_domain = Some(ResidencyDomain::CacheOwner);
        assert_eq!(ix.apply(&owner).rejected, Some("cache_owner_residency"));
    }

    /// A naive model: each holder's set of stored prefixes (paths of local hashes).
    #[derive(Default)]
    struct Model {
        ext: BTreeMap<(u64, u32, usize), BTreeMap<u64, Vec<u64>>>,
    }

    impl Model {
        fn holds(&self, key: (u64, u32, usize), path: &[u64]) -> bool {
            self.ext.get(&key).is_some_and(|m| m.values().any(|p| p == path))
        }
        fn scores(&self, locals: &[u64]) -> BTreeMap<(u64, u32), [u32; 4]> {
            let mut out = BTreeMap::new();
            for &(w, r, t) in self.ext.keys() {
                let n = (1..=locals.len()).take_while(|&k| self.holds((w, r, t), &locals[..k])).count() as u32;
                if n > 0 {
                    out.entry((w, r)).or_insert([0; 4])[t] = n;
                }
            }
            out
        }
    }

    #[derive(Clone, Debug)]
    enum Op {
        Store { w: u64, t: usize, parent: Option<u64>, ext0: u64, locals: Vec<u64> },
        Remove { w: u64, t: usize, ext: Vec<u64> },
        Clear { w: u64 },
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0u64..5, 0usize..2, proptest::option::of(0u64..40), 0u64..40, proptest::collection::vec(0u64..4, 1..6))
                .prop_map(|(w, t, parent, ext0, locals)| Op::Store { w, t, parent, ext0, locals }),
            3 => (0u64..5, 0usize..2, proptest::collection::vec(0u64..45, 1..6)).prop_map(|(w, t, ext)| Op::Remove { w, t, ext }),
            1 => (0u64..5).prop_map(|w| Op::Clear { w }),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]
        // The index answers exactly like the naive model after any sequence of events, and
        // frees every block once nothing holds it.
        #[test]
        fn matches_a_naive_model(ops in proptest::collection::vec(op(), 1..60), queries in proptest::collection::vec(proptest::collection::vec(0u64..4, 1..8), 4)) {
            let mut ix = Index::new();
            let mut m = Model::default();
            for o in &ops {
                match o {
                    Op::Store { w, t, parent, ext0, locals } => {
                        let tier = StorageTier::ALL[*t];
                        let blocks: Vec<_> = locals.iter().enumerate().map(|(i, &l)| (ExternalBlockHash(ext0 + i as u64), LocalBlockHash(l))).collect();
                        let base = match parent {
                            None => Some(vec![]),
                            Some(p) => [*t, 1 - *t].iter().find_map(|&tt| m.ext.get(&(*w, 0, tt)).and_then(|e| e.get(p)).cloned()),
                        };
                        let r = ix.store(wr(*w, 0), tier, parent.map(ExternalBlockHash), &blocks);
                        match base {
                            None => prop_assert_eq!(r, Err("unknown_parent")),
                            Some(mut path) => {
                                prop_assert_eq!(r, Ok(()));
                                let e = m.ext.entry((*w, 0, *t)).or_default();
                                for (x, l) in &blocks {
                                    path.push(l.0);
                                    e.insert(x.0, path.clone());
                                }
                            }
                        }
                    }
                    Op::Remove { w, t, ext } => {
                        ix.remove(wr(*w, 0), StorageTier::ALL[*t], &ext.iter().map(|&x| ExternalBlockHash(x)).collect::<Vec<_>>());
                        if let Some(e) = m.ext.get_mut(&(*w, 0, *t)) {
                            for x in ext { e.remove(x); }
                        }
                    }
                    Op::Clear { w } => {
                        ix.clear_rank(wr(*w, 0));
                        m.ext.retain(|k, _| k.0 != *w);
                    }
                }
                m.ext.retain(|_, e| !e.is_empty());
                for qq in &queries {
                    prop_assert_eq!(scores(&ix, qq), m.scores(qq), "query {:?} after {:?}", qq, o);
                }
                let paths: HashSet<Vec<u64>> = m.ext.values().flat_map(|e| e.values().cloned()).collect();
                let nodes: HashSet<Vec<u64>> = paths.iter().flat_map(|p| (1..=p.len()).map(move |k| p[..k].to_vec())).collect();
                prop_assert_eq!(ix.block_count(), nodes.len(), "blocks leak or vanish");
            }
        }
    }
}
