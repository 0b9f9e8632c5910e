//! The router queue in the simulator: the same arrivals routed by our router at once, or held
//! in the router queue (`sched::queue`, the server's order and gate) until a worker has room,
//! with a share of the requests in a high strict priority. Reports TTFT and queue wait per
//! priority class.

use std::cmp::Reverse;

use rand::{rngs::SmallRng, Rng, SeedableRng};
use rustc_hash::FxHashSet;
use serde::Serialize;

use super::{fleet, prepare, report, Event, SimConfig, State};
use crate::{
    router::{Bind, Decision, KvSettings, Lookup, RouteError, Router, RoutingRequest},
    sched::{
        queue::{Arrival, Claims, Priority, Queue, QueuePolicy, QueueSettings},
        SchedSettings,
    },
};

/// One configuration to compare: the router, with or without a queue.
#[derive(Clone, Debug)]
pub struct QueueRun {
    pub name: String,
    pub kv: KvSettings,
    pub sched: SchedSettings,
    pub queue: Option<QueueSettings>,
}

/// TTFT and wait of one priority class under one configuration (ms).
#[derive(Clone, Debug, Serialize)]
pub struct ClassReport {
    pub class: &'static str,
    pub requests: usize,
    pub ttft_ms: report::Latency,
    pub e2e_ms: report::Latency,
    pub wait_ms: report::Latency,
    /// Each request's prefill alone on an idle engine, with the prefix it reused: the floor
    /// under its TTFT.
    pub prefill_floor_ms: report::Latency,
}

#[derive(Clone, Debug, Serialize)]
pub struct QueueReport {
    pub run: String,
    /// Requests that waited in the router queue.
    pub queued: usize,
    /// Requests sent to a worker that still had prompt tokens to prefill (the router's view):
    /// they wait in that engine's queue instead.
    pub behind_prefill: usize,
    pub overall: report::PolicyReport,
    pub classes: Vec<ClassReport>,
}

/// Which requests are high priority: a `share` of them, drawn with the run's seed (the same
/// requests in every configuration).
pub fn high_priority(n: usize, share: f64, seed: u64) -> Vec<bool> {
    let mut rng = SmallRng::seed_from_u64(seed ^ 0x9e37_79b9);
    (0..n).map(|_| rng.random::<f64>() < share).collect()
}

/// Runs each configuration over the same arrivals.
pub fn run(trace: &[super::trace::TraceRequest], cfg: &SimConfig, runs: &[QueueRun], high: &[bool]) -> Vec<QueueReport> {
    let prepared = prepare(trace, cfg);
    let ideal = super::trace::ideal_reuse(trace, cfg.engine.block_tokens);
    runs.iter()
        .map(|r| {
            let started = std::time::Instant::now();
            let (outcomes, waits, counts) = run_one(&prepared, cfg, r, high);
            let overall = report::PolicyReport::new(&r.name, &outcomes, ideal, started.elapsed());
            let class = |name, want: bool| {
                let ms = |us: u64| us as f64 / 1000.0;
                let idx: Vec<usize> = (0..outcomes.len()).filter(|&i| high[i] == want).collect();
                ClassReport {
                    class: name,
                    requests: idx.len(),
                    ttft_ms: report::latency(idx.iter().filter_map(|&i| outcomes[i].first_token_us.map(|t| ms(t - outcomes[i].arrival_us))).collect()),
                    e2e_ms: report::latency(idx.iter().filter_map(|&i| outcomes[i].finished_us.map(|t| ms(t - outcomes[i].arrival_us))).collect()),
                    wait_ms: report::latency(idx.iter().map(|&i| ms(waits[i])).collect()),
                    prefill_floor_ms: report::latency(idx.iter().map(|&i| cfg.engine.prefill_alone_ms((outcomes[i].isl - outcomes[i].reused_tokens.min(outcomes[i].isl)) as u64)).collect()),
                }
            };
            QueueReport { run: r.name.clone(), queued: counts.queued, behind_prefill: counts.behind_prefill, overall, classes: vec![class("high", true), class("normal", false)] }
        })
        .collect()
}

#[derive(Default)]
struct Counts {
    queued: usize,
    behind_prefill: usize,
}

/// One configuration: outcomes, each request's wait in the router queue (µs), and where the
/// waiting happened.
fn run_one(prepared: &[super::Prepared], cfg: &SimConfig, run: &QueueRun, high: &[bool]) -> (Vec<report::RequestOutcome>, Vec<u64>, Counts) {
    let mut router = Router::new(run.kv, run.sched);
    router.set_fleet(fleet(cfg));
    let mut st = State::new(cfg, prepared, Some(router));
    let mut queue: Option<Queue<usize>> = run.queue.clone().map(Queue::new);
    let threshold = run.queue.as_ref().map_or(0.0, |q| q.threshold);
    let wspt = run.queue.as_ref().is_some_and(|q| q.policy == QueuePolicy::Wspt);
    let late = run.queue.as_ref().is_some_and(|q| q.late_binding);
    let mut waits = vec![0u64; prepared.len()];
    let mut counts = Counts::default();
    // `wspt`: the lookup a request was keyed by is the one its decision uses (as in the server).
    let mut lookups: Vec<Option<Lookup>> = (0..prepared.len()).map(|_| None).collect();
    let mut rng = SmallRng::seed_from_u64(cfg.seed);
    for (i, r) in prepared.iter().enumerate() {
        st.push(r.arrival_us, Event::Arrival(i));
    }
    let req = |i: usize| RoutingRequest { tokens: prepared[i].tokens.clone(), osl: cfg.osl_hints.then_some(prepared[i].engine.osl), ..Default::default() };
    let any = RoutingRequest::default();
    while let Some(Reverse((now, ev, _))) = st.queue.pop() {
        let at = st.instant(now);
        match ev {
            Event::Arrival(i) => {
                let router = st.router.as_mut().expect("router");
                match &mut queue {
                    Some(q) if !q.is_empty() || router.queue_saturated(&any, threshold) => {
                        // Late binding: it passes those waiting only by joining a pass.
                        if late {
                            match router.route_binding(&req(i), None, Bind::Joining, at, &mut rng) {
                                Err(RouteError::Overloaded) => {}
                                d => {
                                    place(&mut st, i, d, &prepared[i].engine, now, &mut counts);
                                    continue;
                                }
                            }
                        }
                        let uncached_tokens = if wspt {
                            let l = router.lookup(&req(i));
                            let u = router.uncached_tokens(&req(i), &l);
                            lookups[i] = Some(l);
                            u
                        } else {
                            0
                        };
                        let a = Arrival { priority: Priority { strict: high[i] as u32, jump: 0.0 }, uncached_tokens, ..Default::default() };
                        q.push(i, a, at).map_err(|_| "simulated queue is unbounded").unwrap();
                        counts.queued += 1;
                    }
                    _ => {
                        let d = router.route(&req(i), at, &mut rng);
                        place(&mut st, i, d, &prepared[i].engine, now, &mut counts);
                    }
                }
            }
            ev => st.step(ev, now),
        }
        // Capacity may have freed (a first token, an end) or a request arrived behind others.
        // (One pool, no subsets: a blocked head blocks every request, so the gate is checked once.)
        let Some(q) = &mut queue else { continue };
        let router = st.router.as_ref().expect("router");
        for t in q.stale(at) {
            let i = *q.item_mut(t).expect("stale entry");
            if let Some(l) = &mut lookups[i] {
                router.refresh(l);
                q.rekey(t, router.uncached_tokens(&req(i), l), at);
            }
        }
        // Late binding: one pass in the queue's order; each request goes if the rank it would
        // pick takes it (`Bind::Released`), else it is not scored again this round.
        let mut held = FxHashSet::default();
        loop {
            let router = st.router.as_mut().expect("router");
            let mut decided = None;
            let popped = if late {
                q.pop_first(at, |t, &i| {
                    if held.contains(&t) {
                        return false;
                    }
                    match router.route_binding(&req(i), lookups[i].as_ref(), Bind::Released { threshold }, at, &mut rng) {
                        Err(RouteError::Overloaded) => {
                            held.insert(t);
                            false
                        }
                        d => {
                            decided = Some(d);
                            true
                        }
                    }
                })
            } else if router.queue_saturated(&any, threshold) {
                None
            } else {
                q.pop(at)
            };
            let Some(d) = popped else { break };
            let i = d.item;
            waits[i] = d.waited.as_micros() as u64;
            let kept = lookups[i].take();
            let decided = decided.unwrap_or_else(|| router.route_waiting(&req(i), kept.as_ref(), &Claims::default(), at, &mut rng));
            place(&mut st, i, decided, &prepared[i].engine, now, &mut counts);
        }
    }
    (st.outcomes, waits, counts)
}

/// Starts a routed request on its engine (a rejected one is counted as such).
fn place(st: &mut State, i: usize, decided: Result<Decision, RouteError>, engine: &super::engine::EngineRequest, now: u64, counts: &mut Counts) {
    let router = st.router.as_ref().expect("router");
    match decided {
        Ok(d) => {
            // Its own booking is counted too: more than its uncached prompt means others'.
            let pending = router.load(&d.decode.worker).active_prefill_tokens;
            counts.behind_prefill += (pending > (engine.isl as u64).saturating_sub(d.predicted_cached_tokens)) as usize;
            st.bookings[i] = Some(d.booking);
            st.assign(i, d.decode.worker.id.0 as usize, engine, now);
        }
        Err(RouteError::Overloaded) => st.outcomes[i].rejected = true,
        Err(e) => panic!("simulated fleet cannot fail to route: {e}"),
    }
}

/// A Markdown table: each run's TTFT, E2E and queue wait per class, and overall.
pub fn markdown(reports: &[QueueReport]) -> String {
    let mut s = String::from("| run | class | requests | TTFT mean / p50 / p99 (ms) | E2E mean / p99 (ms) | queue wait mean / p99 (ms) | prefill floor p99 (ms) |\n|---|---|---:|---|---|---|---:|\n");
    let mut waited = String::from("\n| run | waited in the router queue | sent behind another prompt's prefill |\n|---|---:|---:|\n");
    for r in reports {
        for c in &r.classes {
            s.push_str(&format!(
                "| {} | {} | {} | {:.0} / {:.0} / {:.0} | {:.0} / {:.0} | {:.0} / {:.0} | {:.0} |\n",
                r.run, c.class, c.requests, c.ttft_ms.mean, c.ttft_ms.p50, c.ttft_ms.p99, c.e2e_ms.mean, c.e2e_ms.p99, c.wait_ms.mean, c.wait_ms.p99, c.prefill_floor_ms.p99
            ));
        }
        let (t, e) = (&r.overall.ttft_ms, &r.overall.e2e_ms);
        waited.push_str(&format!("| {} | {} | {} |\n", r.run, r.queued, r.behind_prefill));
        s.push_str(&format!("| {} | all | {} | {:.0} / {:.0} / {:.0} | {:.0} / {:.0} | | |\n", r.run, r.overall.requests, t.mean, t.p50, t.p99, e.mean, e.p99));
    }
    s + &waited
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sched::RoutingPolicy;
    use crate::sim::{trace::TraceRequest, NamedPolicy, Policy};

    /// The experiment's run without a queue replays a policy exactly as the simulator's own
    /// comparison does — under either policy, with or without `osl` hints (the E2E guard reads
    /// them: a queue run that always sent them would differ under `predicted-ttft`).
    #[test]
    fn without_a_queue_the_experiment_routes_as_the_simulator_does() {
        // Three prefix families, prompts of 1–6 blocks, about one request in four a long decode
        // (the E2E guard's input; sizes from a scrambled index so they do not move in lockstep),
        // arrivals 30 ms apart: three workers overlap prefills and decodes. Checked to fail when
        // the queue run sends `osl` regardless of the hints.
        let trace: Vec<TraceRequest> = (0..150u64)
            .map(|i| {
                let r = i.wrapping_mul(2_654_435_761) >> 7;
                let blocks = 1 + r % 6;
                let ids = (0..blocks).map(|b| if b < 2 { 100 * (r % 3) + b } else { 10_000 + 10 * i + b }).collect();
                TraceRequest { timestamp: 30 * i, input_length: 512 * blocks as u32, output_length: if r % 4 == 0 { 2_000 } else { 10 + (r % 50) as u32 }, hash_ids: ids }
            })
            .collect();
        let kv = KvSettings { use_kv_events: true, ..KvSettings::default() };
        for policy in [RoutingPolicy::Cost, RoutingPolicy::PredictedTtft] {
            for osl_hints in [true, false] {
                let cfg = SimConfig { workers: 3, osl_hints, ..SimConfig::default() };
                let sched = SchedSettings { policy, ..SchedSettings::default() };
                let q = run(&trace, &cfg, &[QueueRun { name: "no-queue".into(), kv, sched, queue: None }], &vec![false; trace.len()]);
                let s = super::super::run(&trace, &cfg, &[NamedPolicy { name: "p".into(), policy: Policy::Router { kv, sched } }]);
                let (a, b) = (&q[0].overall, &s[0]);
                assert_eq!(a.completed, 150);
                assert_eq!((&a.ttft_cdf_ms, a.e2e_ms.mean, &a.per_worker), (&b.ttft_cdf_ms, b.e2e_ms.mean, &b.per_worker), "{policy:?}, osl hints {osl_hints}");
            }
        }
    }
}
