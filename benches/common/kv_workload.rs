//! The KV index workload shared by `benches/index.rs` (ours alone, any machine) and
//! `benches/dynamo-baseline` (ours and Dynamo's indexers in one run), so both measure the
//! identical events and queries.
//!
//! Block size 16, 100 workers, sequences of `seq_blocks` blocks (512 or 128) until ~1 M
//! (worker, block) pairs; sequence i lives on worker i mod 100; its first 25 % is the shared
//! prefix of one of 4 seeded prefix groups, the rest unique. Each sequence is one Stored event.
//! Queries: a stored sequence (full hit), a group prefix then new blocks, and unknown blocks
//! (miss). Every subject must answer a full hit, a shared prefix and a miss correctly first.
#![allow(dead_code)] // each bench uses a different part

use std::{
    alloc::{GlobalAlloc, Layout, System},
    collections::HashSet,
    sync::atomic::{AtomicIsize, Ordering},
    time::{Duration, Instant},
};

use dynamo_epp::{
    kv::{
        events::{
            ExternalBlockHash, KvCacheEvent, KvCacheEventData, KvCacheRemoveData, KvCacheStoreData, KvCacheStoredBlockData,
            RouterEvent, StorageTier,
        },
        hash::LocalBlockHash,
    },
    workers::WorkerId,
};
use rand::{rngs::SmallRng, Rng, SeedableRng};

pub const WORKERS: u64 = 100;
pub const GROUPS: usize = 4;
pub const TARGET_PAIRS: usize = 1_000_000;

/// Live heap bytes, for bytes per residency.
pub static ALLOCATED: AtomicIsize = AtomicIsize::new(0);

/// The system allocator, counting.
pub struct Counting;

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        ALLOCATED.fetch_add(l.size() as isize, Ordering::Relaxed);
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        ALLOCATED.fetch_sub(l.size() as isize, Ordering::Relaxed);
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        ALLOCATED.fetch_add(new as isize - l.size() as isize, Ordering::Relaxed);
        unsafe { System.realloc(p, l, new) }
    }
}

pub fn allocated() -> isize {
    ALLOCATED.load(Ordering::Relaxed)
}

pub struct Workload {
    pub seq_blocks: usize,
    /// One whole-sequence Stored event per sequence.
    pub stores: Vec<RouterEvent>,
    /// One Removed event per sequence (all its engine hashes), newest first.
    pub removals: Vec<RouterEvent>,
    /// Distinct (worker, block) residencies after all stores.
    pub residencies: usize,
    pub full_hit: Vec<Vec<LocalBlockHash>>,
    pub prefix_then_new: Vec<Vec<LocalBlockHash>>,
    pub miss: Vec<Vec<LocalBlockHash>>,
}

impl Workload {
    pub fn block_ops(events: &[RouterEvent]) -> u64 {
        events
            .iter()
            .map(|e| match &e.event.data {
                KvCacheEventData::Stored(s) => s.blocks.len() as u64,
                KvCacheEventData::Removed(r) => r.block_hashes.len() as u64,
                KvCacheEventData::Cleared => 0,
            })
            .sum()
    }
}

fn mix(mut x: u64) -> u64 {
    // splitmix64 finalizer
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

pub fn build(seq_blocks: usize, queries: usize) -> Workload {
    let mut rng = SmallRng::seed_from_u64(0x5EED_0000 + seq_blocks as u64);
    let prefix_len = seq_blocks / 4;
    let groups: Vec<Vec<u64>> = (0..GROUPS).map(|_| (0..prefix_len).map(|_| rng.random()).collect()).collect();
    let n_seqs = TARGET_PAIRS / seq_blocks;
    let mut stores = Vec::with_capacity(n_seqs);
    let mut removals = Vec::with_capacity(n_seqs);
    let mut seqs = Vec::with_capacity(n_seqs);
    let mut distinct = HashSet::new();
    let mut event_ids = vec![0u64; WORKERS as usize];
    for i in 0..n_seqs {
        let worker = i as u64 % WORKERS;
        let g = rng.random_range(0..GROUPS);
        let mut locals = groups[g].clone();
        locals.extend((prefix_len..seq_blocks).map(|_| rng.random::<u64>()));
        // Engine hashes name a block's whole prefix, the same on every worker, as Dynamo's
        // publishers make them (contracts §13). Dynamo's compressed tree relies on that: with
        // per-worker hashes (vLLM's own) it loses the suffixes stored after a shared prefix.
        let ext: Vec<u64> = (0..seq_blocks)
            .map(|p| if p < prefix_len { mix(g as u64 * 1_000_003 + p as u64) } else { mix((i as u64) << 20 | p as u64) ^ 0xABCD })
            .collect();
        distinct.extend(ext.iter().map(|&e| (worker, e)));
        let blocks = ext
            .iter()
            .zip(&locals)
            .map(|(&e, &l)| KvCacheStoredBlockData { block_hash: ExternalBlockHash(e), tokens_hash: LocalBlockHash(l), mm_extra_info: None })
            .collect();
        event_ids[worker as usize] += 1;
        stores.push(event(worker, event_ids[worker as usize], KvCacheEventData::Stored(KvCacheStoreData { parent_hash: None, start_position: None, blocks })));
        removals.push((worker, ext));
        seqs.push(locals);
    }
    let removals = removals
        .into_iter()
        .rev()
        .map(|(w, ext)| {
            event_ids[w as usize] += 1;
            event(w, event_ids[w as usize], KvCacheEventData::Removed(KvCacheRemoveData { block_hashes: ext.into_iter().map(ExternalBlockHash).collect() }))
        })
        .collect();
    let hs = |v: &[u64]| v.iter().map(|&x| LocalBlockHash(x)).collect::<Vec<_>>();
    let full_hit = (0..queries).map(|_| hs(&seqs[rng.random_range(0..n_seqs)])).collect();
    let prefix_then_new = (0..queries)
        .map(|_| {
            let mut v = groups[rng.random_range(0..GROUPS)].clone();
            v.extend((prefix_len..seq_blocks).map(|_| rng.random::<u64>()));
            hs(&v)
        })
        .collect();
    let miss = (0..queries).map(|_| hs(&(0..seq_blocks).map(|_| rng.random::<u64>()).collect::<Vec<_>>())).collect();
    Workload { seq_blocks, stores, removals, residencies: distinct.len(), full_hit, prefix_then_new, miss }
}

fn event(worker: u64, id: u64, data: KvCacheEventData) -> RouterEvent {
    RouterEvent {
        worker_id: WorkerId(worker + 1),
        storage_tier: StorageTier::Device,
        residency_domain: None,
        event: KvCacheEvent { event_id: id, data, dp_rank: 0 },
    }
}

/// p50 and p99 of single lookups, timed one by one.
pub fn percentiles(queries: &[Vec<LocalBlockHash>], rounds: usize, mut lookup: impl FnMut(&[LocalBlockHash]) -> usize) -> (Duration, Duration) {
    let mut ts = Vec::with_capacity(queries.len() * rounds);
    let mut sink = 0usize;
    for _ in 0..rounds {
        for q in queries {
            let t = Instant::now();
            sink = sink.wrapping_add(lookup(q));
            ts.push(t.elapsed());
        }
    }
    std::hint::black_box(sink);
    ts.sort_unstable();
    (ts[ts.len() / 2], ts[ts.len() * 99 / 100])
}

/// An index under test, driven through its own public API.
pub trait Subject {
    type Ix;
    /// Events in the subject's own type, converted before any timing.
    type Ev;
    fn name(&self) -> &'static str;
    fn prepare(&self, evs: &[RouterEvent]) -> Vec<Self::Ev>;
    fn empty(&self) -> Self::Ix;
    /// Applies the events; everything is applied when it returns.
    fn ingest(&self, ix: &mut Self::Ix, evs: &[Self::Ev]);
    /// The longest overlap any worker has (checked once, so every subject is seen to have
    /// applied the workload).
    fn lookup(&self, ix: &Self::Ix, q: &[LocalBlockHash]) -> usize;
}

/// One subject's numbers on one workload.
#[derive(Debug)]
pub struct Row {
    pub name: &'static str,
    pub seq_blocks: usize,
    pub ingest_ops_per_s: f64,
    pub remove_ops_per_s: f64,
    /// (query kind, p50, p99)
    pub lookups: Vec<(&'static str, Duration, Duration)>,
    pub bytes_per_residency: f64,
}

/// Criterion benches (ingest, removal, lookups) plus a directly timed summary row with the
/// lookup percentiles and the memory per residency that criterion cannot report.
pub fn bench_subject<S: Subject>(c: &mut criterion::Criterion, w: &Workload, s: &S) -> Row {
    use criterion::{BatchSize, Throughput};
    let stores = s.prepare(&w.stores);
    let removals = s.prepare(&w.removals);
    let (store_ops, remove_ops) = (Workload::block_ops(&w.stores), Workload::block_ops(&w.removals));

    // Memory: live heap growth across the ingest, per distinct (worker, block).
    let before = allocated();
    let mut ix = s.empty();
    s.ingest(&mut ix, &stores);
    let bytes_per_residency = (allocated() - before) as f64 / w.residencies as f64;
    let (hit, partial, miss) = (s.lookup(&ix, &w.full_hit[0]), s.lookup(&ix, &w.prefix_then_new[0]), s.lookup(&ix, &w.miss[0]));
    assert_eq!((hit, partial, miss), (w.seq_blocks, w.seq_blocks / 4, 0), "{} did not apply the workload", s.name());

    let mut g = c.benchmark_group(format!("index-{}", w.seq_blocks));
    g.sample_size(10).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(6));
    g.throughput(Throughput::Elements(store_ops));
    g.bench_function(format!("ingest/{}", s.name()), |b| {
        b.iter_batched(|| s.empty(), |mut i| { s.ingest(&mut i, &stores); i }, BatchSize::PerIteration)
    });
    g.throughput(Throughput::Elements(remove_ops));
    g.bench_function(format!("remove/{}", s.name()), |b| {
        b.iter_batched(
            || {
                let mut i = s.empty();
                s.ingest(&mut i, &stores);
                i
            },
            |mut i| {
                s.ingest(&mut i, &removals);
                i
            },
            BatchSize::PerIteration,
        )
    });
    g.throughput(Throughput::Elements(1));
    let kinds: [(&'static str, &Vec<Vec<LocalBlockHash>>); 3] =
        [("full_hit", &w.full_hit), ("prefix_then_new", &w.prefix_then_new), ("miss", &w.miss)];
    for (kind, qs) in kinds {
        let mut k = 0;
        g.bench_function(format!("lookup_{kind}/{}", s.name()), |b| {
            b.iter(|| {
                k = (k + 1) % qs.len();
                s.lookup(&ix, &qs[k])
            })
        });
    }
    g.finish();

    let time = |evs: &[S::Ev], pre: &dyn Fn() -> S::Ix| {
        let mut best = Duration::MAX;
        for _ in 0..3 {
            let mut i = pre();
            let t = Instant::now();
            s.ingest(&mut i, evs);
            best = best.min(t.elapsed());
        }
        best
    };
    let ingest = time(&stores, &|| s.empty());
    let remove = time(&removals, &|| {
        let mut i = s.empty();
        s.ingest(&mut i, &stores);
        i
    });
    let lookups = kinds.iter().map(|(kind, qs)| {
        let (p50, p99) = percentiles(qs, 20, |q| s.lookup(&ix, q));
        (*kind, p50, p99)
    });
    Row {
        name: s.name(),
        seq_blocks: w.seq_blocks,
        ingest_ops_per_s: store_ops as f64 / ingest.as_secs_f64(),
        remove_ops_per_s: remove_ops as f64 / remove.as_secs_f64(),
        lookups: lookups.collect(),
        bytes_per_residency,
    }
}

pub fn print_rows(rows: &[Row]) {
    println!("\n| index | blocks/seq | ingest Mops/s | remove Mops/s | full hit p50/p99 µs | prefix+new p50/p99 µs | miss p50/p99 µs | B/residency |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    for r in rows {
        let l: Vec<String> = r.lookups.iter().map(|(_, a, b)| format!("{:.2} / {:.2}", a.as_secs_f64() * 1e6, b.as_secs_f64() * 1e6)).collect();
        println!(
            "| {} | {} | {:.2} | {:.2} | {} | {} | {} | {:.1} |",
            r.name,
            r.seq_blocks,
            r.ingest_ops_per_s / 1e6,
            r.remove_ops_per_s / 1e6,
            l[0],
            l[1],
            l[2],
            r.bytes_per_residency
        );
    }
}

/// dynamo-epp's index.
pub struct Ours;

impl Subject for Ours {
    type Ix = dynamo_epp::kv::index::Index;
    type Ev = RouterEvent;
    fn name(&self) -> &'static str {
        "dynamo-epp"
    }
    fn prepare(&self, evs: &[RouterEvent]) -> Vec<RouterEvent> {
        evs.to_vec()
    }
    fn empty(&self) -> Self::Ix {
        Self::Ix::new()
    }
    fn ingest(&self, ix: &mut Self::Ix, evs: &[RouterEvent]) {
        for e in evs {
            ix.apply(e);
        }
    }
    fn lookup(&self, ix: &Self::Ix, q: &[LocalBlockHash]) -> usize {
        ix.overlaps(q).iter().map(|o| o.blocks[0] as usize).max().unwrap_or(0)
    }
}
