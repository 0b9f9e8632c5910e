//! KV index: ingest (store and removal block-ops/s, one thread), lookup latency (p50/p99) and
//! bytes per (block, worker) residency on the shared workload (`benches/common/kv_workload.rs`).
//! Dynamo's own indexer runs the identical workload in `benches/dynamo-baseline`.
//!
//!   cargo bench --bench index

#[path = "common/kv_workload.rs"]
mod kv_workload;

use kv_workload::{bench_subject, build, print_rows, Counting, Ours};

#[global_allocator]
static ALLOC: Counting = Counting;

fn main() {
    let mut c = criterion::Criterion::default().configure_from_args();
    let rows: Vec<_> = [512, 128].into_iter().map(|n| bench_subject(&mut c, &build(n, 500), &Ours)).collect();
    c.final_summary();
    print_rows(&rows);
}
