//! Full routing decision (hash the prompt's tokens, query the KV index, score every
//! (worker, rank), select, book, then free at the end) on the shared workload
//! (`benches/common/decision_workload.rs`): 100 workers × 1 rank and 32 workers × 8 ranks,
//! 8192-token prompts over ~1 M indexed (rank, block) pairs. Dynamo's router does the same
//! decisions in `benches/dynamo-baseline` (decision_vs_dynamo). The `predicted-ttft` policy
//! decides the same requests in the same run; its ratio to the default (`cost`) is printed,
//! also with `OWN_DECODES` requests of our own in flight carrying an expected output (what
//! the E2E guard weighs; against `cost` with the same requests in flight), and as the last of a decision window's group of `GROUP` (each pick
//! of a group weighs the group's requests first).
//!
//!   cargo bench --bench decision

#[path = "common/decision_workload.rs"]
mod decision_workload;

use decision_workload::{bench_decider, build, print_rows, ratio_cells, Ours, TOPOLOGIES};
use dynamo_epp::sched::RoutingPolicy;

/// Our own requests decoding, each with `nvext.agent_hints.osl`, in the third row.
const OWN_DECODES: usize = 1000;

/// Requests a decision window groups in the fourth row (a conversation-trace group: 4–28).
const GROUP: usize = 8;

fn main() {
    let mut c = criterion::Criterion::default().configure_from_args();
    let rows: Vec<_> = TOPOLOGIES
        .into_iter()
        .flat_map(|t| {
            let w = build(t, 200);
            let cost = bench_decider(&mut c, &w, &mut Ours::new(&w));
            let cost_own = bench_decider(&mut c, &w, &mut Ours::new(&w).with_own_decodes(OWN_DECODES, COST_OWN));
            let predicted = bench_decider(&mut c, &w, &mut Ours::with_policy(&w, RoutingPolicy::PredictedTtft, "predicted-ttft"));
            let mut own = Ours::with_policy(&w, RoutingPolicy::PredictedTtft, "").with_own_decodes(OWN_DECODES, GUARDED);
            let guarded = bench_decider(&mut c, &w, &mut own);
            let grouped = bench_decider(&mut c, &w, &mut Ours::with_policy(&w, RoutingPolicy::PredictedTtft, "").in_groups_of(GROUP, &w, "predicted-ttft, group of 8"));
            [cost, cost_own, predicted, guarded, grouped]
        })
        .collect();
    c.final_summary();
    print_rows(&rows, ["dynamo-epp"]);
    // Like for like: the guard's row against `cost` with the same requests in flight (what
    // they cost any policy — more bookings to weigh and free — is not the guard's).
    println!("\n| fleet | {GUARDED} ÷ {COST_OWN} | full hit p50 / p99 | prefix+new p50 / p99 | miss p50 / p99 |");
    println!("|---|---|---:|---:|---:|");
    for g in rows.iter().filter(|r| r.name == GUARDED) {
        let Some(b) = rows.iter().find(|b| b.name == COST_OWN && b.topology.label() == g.topology.label()) else { continue };
        println!("| {} | | {} |", g.topology.label(), ratio_cells(g, b).join(" | "));
    }
}

/// The rows with `OWN_DECODES` requests of our own in flight: `cost`, and `predicted-ttft`.
const COST_OWN: &str = "dynamo-epp+own";
const GUARDED: &str = "predicted-ttft+osl";
