//! What the router queue adds to a decision: the same decisions on the shared workload
//! (`benches/common/decision_workload.rs`, 100 × 1 and 32 × 8 fleets, 8192-token prompts),
//! once routed directly and once through the queue as the server does it when requests wait
//! (enqueue; `wspt` also looks up the prompt's cache at enqueue for its key; then the
//! dispatch round: the head-of-line rule's gate, the route — `wspt` with the lookup kept from
//! enqueue — and the pop; `late`: late binding's decision, released, in place of the gate and
//! the route). Same run, so the difference is the queue's cost.
//!
//!   cargo bench --bench queue

#[path = "common/decision_workload.rs"]
mod decision_workload;

use decision_workload::{bench_decider, build, Decider, Ours, TOPOLOGIES};
use dynamo_epp::{
    router::{Bind, RoutingRequest},
    sched::queue::{Arrival, Claims, Queue, QueuePolicy, QueueSettings},
    workers::WorkerRank,
};

/// Our router behind the queue: every decision waits once, then is dispatched.
struct Queued {
    ours: Ours,
    queue: Queue<Option<dynamo_epp::router::Lookup>>,
    wspt: bool,
    /// Late binding (`DYN_EPP_QUEUE_LATE_BINDING`).
    late: bool,
    name: &'static str,
}

impl Decider for Queued {
    type Req = RoutingRequest;
    fn name(&self) -> &'static str {
        self.name
    }
    fn prepare(&self, tokens: &[u32]) -> Self::Req {
        self.ours.prepare(tokens)
    }
    fn decide(&mut self, req: &Self::Req) -> WorkerRank {
        let now = self.ours.now;
        let router = &mut self.ours.router;
        let mut a = Arrival { bytes: 4 * req.tokens.len() as u64, ..Default::default() };
        let lookup = self.wspt.then(|| {
            let l = router.lookup(req);
            a.uncached_tokens = router.uncached_tokens(req, &l);
            l
        });
        self.queue.push(lookup, a, now).unwrap_or_else(|_| panic!("the queue has room"));
        let claims = Claims::default();
        let mut decided = None;
        let rng = &mut self.ours.rng;
        self.queue
            .pop_first(now, |_, kept| {
                let d = if self.late {
                    router.route_binding(req, kept.as_ref(), Bind::Released { threshold: 1e9 }, now, rng)
                } else {
                    assert!(router.queue_gate_open(req, 1e9, &claims));
                    router.route_waiting(req, kept.as_ref(), &claims, now, rng)
                };
                decided = Some(d.expect("a worker is chosen"));
                true
            })
            .expect("queued");
        let d = decided.expect("routed");
        router.on_end(d.booking, now);
        d.decode.worker
    }
}

fn main() {
    let mut c = criterion::Criterion::default().configure_from_args();
    let mut lines = Vec::new();
    for t in TOPOLOGIES {
        let w = build(t, 200);
        let direct = bench_decider(&mut c, &w, &mut Ours::new(&w));
        let mut rows = vec![];
        for (name, policy, late) in [("queued-fcfs", QueuePolicy::Fcfs, false), ("queued-wspt", QueuePolicy::Wspt, false), ("queued-late", QueuePolicy::Fcfs, true)] {
            let mut q = Queued { ours: Ours::new(&w), queue: Queue::new(QueueSettings::single_class(1e9, policy)), wspt: policy == QueuePolicy::Wspt, late, name };
            rows.push(bench_decider(&mut c, &w, &mut q));
        }
        for r in rows {
            for ((kind, a50, a99), (_, b50, b99)) in r.decisions.iter().zip(&direct.decisions) {
                let us = |d: std::time::Duration| d.as_secs_f64() * 1e6;
                lines.push(format!(
                    "| {} | {} | {kind} | {:.2} / {:.2} | {:.2} / {:.2} | {:+.2} / {:+.2} |",
                    t.label(),
                    r.name,
                    us(*b50),
                    us(*b99),
                    us(*a50),
                    us(*a99),
                    us(*a50) - us(*b50),
                    us(*a99) - us(*b99)
                ));
            }
        }
    }
    c.final_summary();
    println!("\n| fleet | path | prompt | direct p50 / p99 µs | queued p50 / p99 µs | added p50 / p99 µs |");
    println!("|---|---|---|---:|---:|---:|");
    for l in lines {
        println!("{l}");
    }
}
