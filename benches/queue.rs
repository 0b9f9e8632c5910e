//! What the router queue adds to a decision: the same decisions on the shared workload
//! (`benches/common/decision_workload.rs`, 100 × 1 and 32 × 8 fleets, 8192-token prompts),
//! once routed directly and once through the queue as the server does it when requests wait
//! (enqueue, the saturation gate, peek, route, pop; `wspt` also looks up the prompt's uncached
//! tokens at enqueue). Same run, so the difference is the queue's cost.
//!
//!   cargo bench --bench queue

#[path = "common/decision_workload.rs"]
mod decision_workload;

use decision_workload::{bench_decider, build, Decider, Ours, TOPOLOGIES};
use dynamo_epp::{
    router::RoutingRequest,
    sched::queue::{Arrival, Queue, QueuePolicy, QueueSettings},
    workers::WorkerRank,
};

/// Our router behind the queue: every decision waits once, then is dispatched.
struct Queued {
    ours: Ours,
    queue: Queue<()>,
    wspt: bool,
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
        let uncached_tokens = if self.wspt { router.uncached_tokens(req) } else { 0 };
        let a = Arrival { bytes: 4 * req.tokens.len() as u64, uncached_tokens, ..Default::default() };
        self.queue.push((), a, now).expect("room");
        assert!(self.queue.peek().is_some() && !router.queue_saturated(req, 1e9));
        let d = router.route(req, now, &mut self.ours.rng).expect("a worker is chosen");
        self.queue.pop(now).expect("queued");
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
        for (name, policy) in [("queued-fcfs", QueuePolicy::Fcfs), ("queued-wspt", QueuePolicy::Wspt)] {
            let mut q = Queued { ours: Ours::new(&w), queue: Queue::new(QueueSettings::single_class(1e9, policy)), wspt: policy == QueuePolicy::Wspt, name };
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
