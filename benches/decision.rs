//! Full routing decision (hash the prompt's tokens, query the KV index, score every
//! (worker, rank), select, book, then free at the end) on the shared workload
//! (`benches/common/decision_workload.rs`): 100 workers × 1 rank and 32 workers × 8 ranks,
//! 8192-token prompts over ~1 M indexed (rank, block) pairs. Dynamo's router does the same
//! decisions in `benches/dynamo-baseline` (decision_vs_dynamo).
//!
//!   cargo bench --bench decision

#[path = "common/decision_workload.rs"]
mod decision_workload;

use decision_workload::{bench_decider, build, print_rows, Ours, TOPOLOGIES};

fn main() {
    let mut c = criterion::Criterion::default().configure_from_args();
    let rows: Vec<_> = TOPOLOGIES
        .into_iter()
        .map(|t| {
            let w = build(t, 200);
            bench_decider(&mut c, &w, &mut Ours::new(&w))
        })
        .collect();
    c.final_summary();
    print_rows(&rows, None);
}
