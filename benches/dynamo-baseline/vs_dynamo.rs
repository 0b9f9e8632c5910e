//! dynamo-epp's KV index against Dynamo's own indexers (crates.io dynamo-kv-router 1.6.1) on
//! the identical workload, in one run: its single-threaded `RadixTree`, and
//! `ThreadPoolIndexer` (1 event thread, reads inline as in production) over the compressed
//! concurrent radix tree (Dynamo's default). (Its `PositionalIndexer` answered no overlap at
//! all for this workload through the same calls, so it is not measured.)
//! Dynamo's indexers take events by value: the per-event clone is part of their timing (a
//! memcpy of ~8 KB per 512-block event, small next to applying it).
//!
//!   cd benches/dynamo-baseline && nice cargo bench --features dynamo

#[path = "../common/kv_workload.rs"]
mod kv_workload;

use kv_workload::{bench_subject, build, print_rows, Counting, Ours};

#[global_allocator]
static ALLOC: Counting = Counting;

#[cfg(feature = "dynamo")]
mod dynamo {
    use super::kv_workload::Subject;
    use dynamo_epp::kv::{events::RouterEvent, hash::LocalBlockHash};
    use dynamo_kv_router::{
        protocols::{LocalBlockHash as DLocal, RouterEvent as DEvent},
        ConcurrentRadixTreeCompressed, RadixTree, SyncIndexer, ThreadPoolIndexer,
    };

    /// Our events in Dynamo's type, through the shared wire format (same field names).
    fn convert(evs: &[RouterEvent]) -> Vec<DEvent> {
        evs.iter().map(|e| serde_json::from_str(&serde_json::to_string(e).unwrap()).expect("Dynamo reads our RouterEvent JSON")).collect()
    }

    fn query(q: &[LocalBlockHash]) -> Vec<DLocal> {
        q.iter().map(|h| DLocal(h.0)).collect()
    }

    pub struct Radix;

    impl Subject for Radix {
        type Ix = RadixTree;
        type Ev = DEvent;
        fn name(&self) -> &'static str {
            "dynamo RadixTree"
        }
        fn prepare(&self, evs: &[RouterEvent]) -> Vec<DEvent> {
            convert(evs)
        }
        fn empty(&self) -> RadixTree {
            RadixTree::new()
        }
        fn ingest(&self, ix: &mut RadixTree, evs: &[DEvent]) {
            for e in evs {
                let _ = ix.apply_event(e.clone());
            }
        }
        fn lookup(&self, ix: &RadixTree, q: &[LocalBlockHash]) -> usize {
            ix.find_matches(query(q), false).scores.values().max().map_or(0, |&m| m as usize)
        }
    }

    /// `ThreadPoolIndexer` over a backend, one event thread.
    pub struct Pool<B> {
        pub name: &'static str,
        pub make: fn() -> B,
        pub rt: tokio::runtime::Runtime,
    }

    impl<B: SyncIndexer + 'static> Subject for Pool<B> {
        type Ix = ThreadPoolIndexer<B>;
        type Ev = DEvent;
        fn name(&self) -> &'static str {
            self.name
        }
        fn prepare(&self, evs: &[RouterEvent]) -> Vec<DEvent> {
            convert(evs)
        }
        fn empty(&self) -> Self::Ix {
            ThreadPoolIndexer::new((self.make)(), 1, 16)
        }
        fn ingest(&self, ix: &mut Self::Ix, evs: &[DEvent]) {
            for e in evs {
                ix.enqueue_event(e.clone()).expect("indexer running");
            }
            self.rt.block_on(ix.flush_and_wait()).expect("flushed");
        }
        fn lookup(&self, ix: &Self::Ix, q: &[LocalBlockHash]) -> usize {
            ix.backend().find_matches(&query(q), false).scores.values().max().map_or(0, |&m| m as usize)
        }
    }

    pub fn crtc() -> Pool<ConcurrentRadixTreeCompressed> {
        Pool { name: "dynamo ThreadPool<CRTC>", make: ConcurrentRadixTreeCompressed::new, rt: rt() }
    }

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
    }
}

fn main() {
    let mut c = criterion::Criterion::default().configure_from_args();
    let mut rows = Vec::new();
    for n in [512, 128] {
        let w = build(n, 500);
        rows.push(bench_subject(&mut c, &w, &Ours));
        #[cfg(feature = "dynamo")]
        {
            rows.push(bench_subject(&mut c, &w, &dynamo::Radix));
            rows.push(bench_subject(&mut c, &w, &dynamo::crtc()));
        }
    }
    c.final_summary();
    print_rows(&rows);
}
