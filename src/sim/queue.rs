//! The router queue in the simulator: a [`Waitlist`] holds requests as the server does
//! (`sched::queue`'s order, the saturation gate or late binding) for any router policy given a
//! queue (`--extra` with `--router-queue-threshold`), and the queue experiment compares the
//! same arrivals routed at once or held, with a share of the requests in a high strict
//! priority, reporting TTFT, E2E and queue wait per priority class.

use rand::{rngs::SmallRng, Rng, SeedableRng};
use serde::Serialize;

use super::{engine::EngineRequest, prepare, report, NamedPolicy, Prepared, SimConfig, State};
use crate::{
    router::{Lookup, RouteError, RoutingRequest},
    sched::queue::{Arrival, Claims, LateRound, Priority, Queue, QueuePolicy, QueueSettings},
};

/// The router queue of one simulated run. One pool and no subsets: a blocked head blocks
/// every request, so the saturation gate is checked once per release.
pub(super) struct Waitlist {
    queue: Queue<usize>,
    threshold: f64,
    /// The lookup a `wspt` request was keyed by is the one its decision uses (as in the server).
    wspt: bool,
    late: bool,
    lookups: Vec<Option<Lookup>>,
}

impl Waitlist {
    pub(super) fn new(settings: QueueSettings, requests: usize) -> Self {
        let wspt = settings.classes.iter().any(|c| c.policy.unwrap_or(settings.policy) == QueuePolicy::Wspt);
        Waitlist { threshold: settings.threshold, wspt, late: settings.late_binding, queue: Queue::new(settings), lookups: (0..requests).map(|_| None).collect() }
    }

    /// Request `i` arrives: routed at once when no one waits and a worker has room (late
    /// binding: also when its prompt joins a pass), else it waits (a full queue rejects it).
    /// Whether it was routed at once: then, as in the server, no dispatch round follows.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn arrive(&mut self, st: &mut State, i: usize, req: &RoutingRequest, kept: Option<Lookup>, engine: &EngineRequest, high: bool, now: u64, rng: &mut SmallRng) -> bool {
        let at = st.instant(now);
        let router = st.router.as_mut().expect("router");
        if let Some(bind) = router.arrival_bind(req, !self.queue.is_empty(), self.threshold, self.late) {
            match router.route_binding(req, kept.as_ref(), bind, at, rng) {
                Err(RouteError::Overloaded) => {}
                d => {
                    st.place(i, d, engine, now);
                    return true;
                }
            }
        }
        let uncached_tokens = if self.wspt {
            let l = kept.unwrap_or_else(|| router.lookup(req));
            let u = router.uncached_tokens(req, &l);
            self.lookups[i] = Some(l);
            u
        } else {
            0
        };
        let a = Arrival { priority: Priority { strict: high as u32, jump: 0.0 }, uncached_tokens, ..Default::default() };
        match self.queue.push(i, a, at) {
            Ok(_) => {
                st.queued += 1;
                st.max_waiting = st.max_waiting.max(self.queue.len());
            }
            Err(_) => st.outcomes[i].rejected = true,
        }
        false
    }

    /// Dispatches waiting requests as the server's dispatch round does: in the queue's order
    /// while a worker has room, or (late binding) in one pass, each whose pick takes it.
    pub(super) fn release(&mut self, st: &mut State, prepared: &[Prepared], req: &impl Fn(usize) -> RoutingRequest, now: u64, rng: &mut SmallRng) {
        if self.queue.is_empty() {
            return;
        }
        let at = st.instant(now);
        let router = st.router.as_ref().expect("router");
        for t in self.queue.stale(at) {
            let i = *self.queue.item_mut(t).expect("stale entry");
            if let Some(l) = &mut self.lookups[i] {
                router.refresh(l);
                self.queue.rekey(t, router.uncached_tokens(&req(i), l), at);
            }
        }
        let mut late_round = LateRound::default();
        let any = RoutingRequest::default();
        loop {
            let router = st.router.as_mut().expect("router");
            let mut decided = None;
            let lookups = &self.lookups;
            let popped = if self.late {
                self.queue.pop_first(at, |t, &i| {
                    decided = router.release_late(&mut late_round, t, &req(i), lookups[i].as_ref(), self.threshold, at, rng);
                    decided.is_some()
                })
            } else if router.queue_saturated(&any, self.threshold) {
                None
            } else {
                self.queue.pop(at)
            };
            let Some(d) = popped else { break };
            let i = d.item;
            let kept = self.lookups[i].take();
            let decided = decided.unwrap_or_else(|| router.route_waiting(&req(i), kept.as_ref(), &Claims::default(), at, rng));
            st.outcomes[i].queued_us = d.waited.as_micros() as u64;
            st.place(i, decided, &prepared[i].engine, now);
        }
    }
}

/// TTFT and wait of one priority class under one configuration (ms).
#[derive(Clone, Debug, Serialize)]
pub struct ClassReport {
    pub class: &'static str,
    pub requests: usize,
    pub ttft_ms: report::Latency,
    pub e2e_ms: report::Latency,
    pub wait_ms: report::Latency,
    /// Each request's prefill alone on an idle engine of its worker's speed, with the prefix it
    /// reused: the floor under its TTFT.
    pub prefill_floor_ms: report::Latency,
}

#[derive(Clone, Debug, Serialize)]
pub struct QueueReport {
    pub run: String,
    /// Requests that waited in the router queue, and the most waiting at once.
    pub queued: usize,
    pub max_waiting: usize,
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

/// Runs each configuration (our router, with or without a queue) over the same arrivals.
pub fn run(trace: &[super::trace::TraceRequest], cfg: &SimConfig, runs: &[NamedPolicy], high: &[bool]) -> Vec<QueueReport> {
    let prepared = prepare(trace, cfg);
    let ideal = super::trace::ideal_reuse(trace, cfg.engine.block_tokens);
    runs.iter()
        .map(|r| {
            let started = std::time::Instant::now();
            let st = super::simulate(&prepared, cfg, r, high);
            let outcomes = &st.outcomes;
            let overall = report::PolicyReport::new(&r.name, outcomes, ideal, started.elapsed());
            let class = |name, want: bool| {
                let ms = |us: u64| us as f64 / 1000.0;
                let idx: Vec<usize> = (0..outcomes.len()).filter(|&i| high[i] == want).collect();
                ClassReport {
                    class: name,
                    requests: idx.len(),
                    ttft_ms: report::latency(idx.iter().filter_map(|&i| outcomes[i].first_token_us.map(|t| ms(t - outcomes[i].arrival_us))).collect()),
                    e2e_ms: report::latency(idx.iter().filter_map(|&i| outcomes[i].finished_us.map(|t| ms(t - outcomes[i].arrival_us))).collect()),
                    wait_ms: report::latency(idx.iter().map(|&i| ms(outcomes[i].queued_us)).collect()),
                    prefill_floor_ms: report::latency(idx.iter().map(|&i| outcomes[i].prefill_alone_ms).collect()),
                }
            };
            QueueReport { run: r.name.clone(), queued: st.queued, max_waiting: st.max_waiting, behind_prefill: st.behind_prefill, overall, classes: vec![class("high", true), class("normal", false)] }
        })
        .collect()
}

/// A Markdown table: each run's TTFT, E2E and queue wait per class, and overall.
pub fn markdown(reports: &[QueueReport]) -> String {
    let mut s = String::from("| run | class | requests | TTFT mean / p50 / p99 (ms) | E2E mean / p99 (ms) | queue wait mean / p99 (ms) | prefill floor p99 (ms) |\n|---|---|---:|---|---|---|---:|\n");
    let mut waited = String::from("\n| run | waited in the router queue | most waiting at once | sent behind another prompt's prefill |\n|---|---:|---:|---:|\n");
    for r in reports {
        for c in &r.classes {
            s.push_str(&format!(
                "| {} | {} | {} | {:.0} / {:.0} / {:.0} | {:.0} / {:.0} | {:.0} / {:.0} | {:.0} |\n",
                r.run, c.class, c.requests, c.ttft_ms.mean, c.ttft_ms.p50, c.ttft_ms.p99, c.e2e_ms.mean, c.e2e_ms.p99, c.wait_ms.mean, c.wait_ms.p99, c.prefill_floor_ms.p99
            ));
        }
        let (t, e) = (&r.overall.ttft_ms, &r.overall.e2e_ms);
        waited.push_str(&format!("| {} | {} | {} | {} |\n", r.run, r.queued, r.max_waiting, r.behind_prefill));
        s.push_str(&format!("| {} | all | {} | {:.0} / {:.0} / {:.0} | {:.0} / {:.0} | | |\n", r.run, r.overall.requests, t.mean, t.p50, t.p99, e.mean, e.p99));
    }
    s + &waited
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::router::KvSettings;
    use crate::sched::{RoutingPolicy, SchedSettings};
    use crate::sim::{trace::TraceRequest, Policy};

    /// Three prefix families, prompts of 1–6 blocks, about one request in four a long decode
    /// (the E2E guard's input; sizes from a scrambled index so they do not move in lockstep),
    /// arrivals 30 ms apart: three workers overlap prefills and decodes.
    fn trace() -> Vec<TraceRequest> {
        (0..150u64)
            .map(|i| {
                let r = i.wrapping_mul(2_654_435_761) >> 7;
                let blocks = 1 + r % 6;
                let ids = (0..blocks).map(|b| if b < 2 { 100 * (r % 3) + b } else { 10_000 + 10 * i + b }).collect();
                TraceRequest { timestamp: 30 * i, input_length: 512 * blocks as u32, output_length: if r % 4 == 0 { 2_000 } else { 10 + (r % 50) as u32 }, hash_ids: ids }
            })
            .collect()
    }

    fn router(policy: RoutingPolicy, queue: Option<QueueSettings>) -> NamedPolicy {
        let kv = KvSettings { use_kv_events: true, ..KvSettings::default() };
        NamedPolicy { name: "p".into(), policy: Policy::Router { kv, sched: SchedSettings { policy, ..SchedSettings::default() }, queue } }
    }

    /// A queue no worker ever saturates routes every request at once, as no queue does —
    /// under either policy, with or without late binding and `osl` hints (the E2E guard reads
    /// them): the queue's path builds the same request and decision as the plain one.
    #[test]
    fn a_queue_that_never_fills_routes_as_no_queue() {
        let trace = trace();
        for policy in [RoutingPolicy::Cost, RoutingPolicy::PredictedTtft] {
            for osl_hints in [true, false] {
                let cfg = SimConfig { workers: 3, osl_hints, ..SimConfig::default() };
                let plain = &super::super::run(&trace, &cfg, &[router(policy, None)])[0];
                assert_eq!(plain.completed, 150);
                for late_binding in [false, true] {
                    let queue = QueueSettings { late_binding, ..QueueSettings::single_class(1e9, QueuePolicy::Fcfs) };
                    let q = &run(&trace, &cfg, &[router(policy, Some(queue))], &[false; 150])[0];
                    assert_eq!(q.queued, 0);
                    let o = &q.overall;
                    assert_eq!((&o.ttft_cdf_ms, o.e2e_ms.mean, &o.per_worker), (&plain.ttft_cdf_ms, plain.e2e_ms.mean, &plain.per_worker), "{policy:?}, osl hints {osl_hints}, late {late_binding}");
                }
            }
        }
    }

    /// At threshold 0 requests wait, by the gate or bound late, and every one is served; late
    /// binding sends fewer of them to wait than the gate (a prompt that joins a pass passes).
    #[test]
    fn requests_held_at_threshold_zero_are_all_served() {
        let trace = trace();
        // Ten times the rate: all three workers prefill at once now and then.
        let cfg = SimConfig { workers: 3, speedup: 10.0, ..SimConfig::default() };
        let queued: Vec<usize> = [false, true]
            .map(|late_binding| {
                let queue = QueueSettings { late_binding, ..QueueSettings::single_class(0.0, QueuePolicy::Fcfs) };
                let q = &run(&trace, &cfg, &[router(RoutingPolicy::PredictedTtft, Some(queue))], &[false; 150])[0];
                assert_eq!((q.overall.completed, q.overall.rejected), (150, 0), "late {late_binding}");
                assert!(q.classes[1].wait_ms.mean > 0.0, "late {late_binding}: {:?}", q.classes[1].wait_ms);
                q.queued
            })
            .to_vec();
        assert!(queued[0] > queued[1] && queued[1] > 0, "queued (gate, late): {queued:?}");
    }
}
