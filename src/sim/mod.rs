//! The routing-quality simulator: replays a Mooncake trace against N simulated engines
//! (`engine.rs`) in virtual time, with the same [`Router`] the server uses deciding where each
//! request goes, fed by the engines' KV events. Baseline policies (round-robin, random,
//! least-loaded) run on the same arrivals. Deterministic for a seed.
//!
//! The oracle (`Policy::Oracle`) is a bound, not a policy: it copies every candidate engine
//! and runs the copy forward to read this request's exact TTFT there — knowledge no router
//! has. It exists only here (never selectable in the EPP) to measure what a greedy
//! per-request router with a perfect TTFT prediction reaches.

pub mod engine;
pub mod queue;
pub mod report;
pub mod trace;

use std::{
    cmp::Reverse,
    collections::BinaryHeap,
    net::SocketAddr,
    time::{Duration, Instant},
};

use rand::{rngs::SmallRng, Rng, SeedableRng};

use crate::{
    kv::{
        events::{
            ExternalBlockHash, KvCacheEvent, KvCacheEventData, KvCacheRemoveData, KvCacheStoreData, KvCacheStoredBlockData,
            RouterEvent, StorageTier,
        },
        hash::{local_block_hashes, seq_hashes, XXH3_SEED},
        predicted::ApproxCachePolicy,
    },
    router::{Bind, BookingId, EndpointMatch, KvSettings, Lookup, RouteError, Router, RoutingRequest, STALL_WEIGHT},
    sched::{queue::QueueSettings, RoutingPolicy, SchedSettings},
    workers::{Fleet, Role, Worker, WorkerId},
};
use engine::{Engine, EngineEvent, EngineParams, EngineRequest};
use report::{PolicyReport, RequestOutcome};
use trace::TraceRequest;

/// How a policy picks a worker. (A few per run, built once: their size does not matter.)
#[derive(Clone, Debug)]
#[allow(clippy::large_enum_variant)]
pub enum Policy {
    /// Our router with these settings (KV events on or off per `kv`), with the router queue
    /// when `queue` is set (`queue.rs`: the server's order, gate and late binding).
    Router { kv: KvSettings, sched: SchedSettings, queue: Option<QueueSettings> },
    RoundRobin,
    Random,
    /// Fewest queued + running requests, ties at random.
    LeastLoaded,
    /// The oracle bound: a perfect TTFT prediction per candidate, chosen by this rule (ties:
    /// Dynamo's lower cost, then the lower index). Our router (`kv-events`, Dynamo's
    /// defaults) runs beside it only to book the pick and give each candidate's cost.
    Oracle(OracleRule),
}

/// How the oracle chooses once it knows each worker's exact TTFT for the request.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum OracleRule {
    /// The lowest TTFT.
    Ttft,
    /// The lowest TTFT + `predicted-ttft`'s stall guard (its weight × requests on the engine
    /// × this prompt's prefill time there).
    StallGuard,
    /// The lowest TTFT among the workers whose Dynamo cost is within this many × the
    /// prompt's blocks of the best.
    CostMargin(f64),
}

/// A named policy to compare.
#[derive(Clone, Debug)]
pub struct NamedPolicy {
    pub name: String,
    pub policy: Policy,
}

#[derive(Clone, Debug)]
pub struct SimConfig {
    pub workers: usize,
    pub engine: EngineParams,
    /// Arrival times are divided by this.
    pub speedup: f64,
    /// Delay before a KV event reaches the router, ms (0 = at once).
    pub event_delay_ms: f64,
    pub seed: u64,
    /// Heterogeneous fleet: this share of the workers (the last ones) runs every pass
    /// `slow_factor` times slower.
    pub slow_share: f64,
    pub slow_factor: f64,
    /// Each request tells the router its output length (as a client sending
    /// `nvext.agent_hints.osl` would); off, the router is told nothing of it.
    pub osl_hints: bool,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig { workers: 8, engine: EngineParams::default(), speedup: 1.0, event_delay_ms: 0.0, seed: 42, slow_share: 0.0, slow_factor: 1.0, osl_hints: true }
    }
}

impl SimConfig {
    /// Engine parameters of worker `w`: a slow worker's every pass takes `slow_factor` times
    /// as long (all time coefficients scaled).
    pub fn engine_of(&self, w: usize) -> EngineParams {
        let slow = (self.slow_share * self.workers as f64).round() as usize;
        if w < self.workers - slow.min(self.workers) {
            return self.engine;
        }
        let f = self.slow_factor;
        let scale = |c: [f64; 3]| c.map(|x| x * f);
        EngineParams { prefill_ms: scale(self.engine.prefill_ms), decode_ms: scale(self.engine.decode_ms), ..self.engine }
    }
}

/// The policies every run compares: Dynamo-compatible defaults with KV events, the
/// predicted-TTFT policy (with KV events), approximate mode (`ttl` and `lru` cache policies),
/// and the baselines.
pub fn standard_policies() -> Vec<NamedPolicy> {
    let kv = |use_kv_events| KvSettings { use_kv_events, ..KvSettings::default() };
    let lru = KvSettings { approx_policy: ApproxCachePolicy::Lru, ..kv(false) };
    let predicted = SchedSettings { policy: RoutingPolicy::PredictedTtft, ..SchedSettings::default() };
    vec![
        NamedPolicy { name: "kv-events".into(), policy: Policy::Router { kv: kv(true), sched: SchedSettings::default(), queue: None } },
        NamedPolicy { name: "predicted-ttft".into(), policy: Policy::Router { kv: kv(true), sched: predicted, queue: None } },
        NamedPolicy { name: "approximate".into(), policy: Policy::Router { kv: kv(false), sched: SchedSettings::default(), queue: None } },
        NamedPolicy { name: "approximate-lru".into(), policy: Policy::Router { kv: lru, sched: SchedSettings::default(), queue: None } },
        NamedPolicy { name: "round-robin".into(), policy: Policy::RoundRobin },
        NamedPolicy { name: "random".into(), policy: Policy::Random },
        NamedPolicy { name: "least-loaded".into(), policy: Policy::LeastLoaded },
    ]
}

/// The oracle bounds (`--only oracle-…` in `dynamo-epp-sim`; not in a default run: each
/// decision runs every candidate engine forward).
pub fn oracle_policies() -> Vec<NamedPolicy> {
    let o = |name: &str, rule| NamedPolicy { name: name.into(), policy: Policy::Oracle(rule) };
    vec![
        o("oracle-ttft", OracleRule::Ttft),
        o("oracle-ttft-guard", OracleRule::StallGuard),
        o("oracle-ttft-cost0.25", OracleRule::CostMargin(0.25)),
        o("oracle-ttft-cost1", OracleRule::CostMargin(1.0)),
    ]
}

/// A request prepared once for every policy: its tokens are only needed by the router, its
/// block hashes by the engines.
struct Prepared {
    arrival_us: u64,
    tokens: Vec<u32>,
    engine: EngineRequest,
}

fn prepare(trace: &[TraceRequest], cfg: &SimConfig) -> Vec<Prepared> {
    let bt = cfg.engine.block_tokens as usize;
    trace
        .iter()
        .enumerate()
        .map(|(id, r)| {
            let tokens = r.tokens();
            let local = local_block_hashes(&tokens, bt, XXH3_SEED);
            let seq = seq_hashes(&local);
            let blocks = seq.iter().zip(&local).map(|(s, l)| (s.0, l.0)).collect();
            Prepared {
                arrival_us: (r.timestamp as f64 * 1000.0 / cfg.speedup) as u64,
                tokens,
                engine: EngineRequest { id, isl: r.input_length, osl: r.output_length.max(1), blocks },
            }
        })
        .collect()
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Event {
    /// Ordered so that at equal times KV events arrive first, then passes end, then arrivals
    /// are routed (or join the decision window, which closes after them), and only then does
    /// an idle engine start its pass: requests arriving in the same instant share the first
    /// pass, as in Dynamo's replay.
    Kv(usize),
    PassEnd(usize),
    Arrival(usize),
    WindowEnd,
    Start(usize),
}

/// Runs every policy over the same arrivals and returns one report each.
pub fn run(trace: &[TraceRequest], cfg: &SimConfig, policies: &[NamedPolicy]) -> Vec<PolicyReport> {
    let prepared = prepare(trace, cfg);
    let ideal = trace::ideal_reuse(trace, cfg.engine.block_tokens);
    policies.iter().map(|p| run_policy(&prepared, cfg, p, ideal)).collect()
}

struct State<'a> {
    cfg: &'a SimConfig,
    engines: Vec<Engine>,
    router: Option<Router>,
    bookings: Vec<Option<BookingId>>,
    outcomes: Vec<RequestOutcome>,
    queue: BinaryHeap<Reverse<(u64, Event, u64)>>,
    kv_batches: Vec<(usize, Vec<EngineEvent>)>,
    seq: u64,
    epoch: Instant,
    event_ids: Vec<u64>,
    /// When each busy engine's pass ends (µs).
    pass_end: Vec<u64>,
    /// The oracle's TTFT for its pick (µs), per request.
    oracle_ttft_us: Vec<Option<u64>>,
    /// Requests that waited in the router queue, and the most waiting at once.
    queued: usize,
    max_waiting: usize,
    /// Requests our router sent to a rank that still had prompt tokens to prefill (its view):
    /// they wait in that engine's queue instead.
    behind_prefill: usize,
}

impl State<'_> {
    fn push(&mut self, at: u64, ev: Event) {
        self.seq += 1;
        self.queue.push(Reverse((at, ev, self.seq)));
    }

    fn instant(&self, us: u64) -> Instant {
        self.epoch + Duration::from_micros(us)
    }

    /// Starts a pass on an idle engine if it has work.
    fn kick(&mut self, w: usize, now: u64) {
        if self.engines[w].is_busy() {
            return;
        }
        let mut evs = Vec::new();
        if let Some(ms) = self.engines[w].start_pass(&mut evs) {
            self.pass_end[w] = now + pass_us(ms);
            self.push(self.pass_end[w], Event::PassEnd(w));
        }
        self.deliver(w, evs, now);
    }

    /// The oracle's look-ahead: `req` queued at `now` on a copy of engine `w`, the copy run
    /// with no further arrivals until the request's first token. Returns (TTFT µs, prompt
    /// tokens reused), `None` if it would never start (larger than the cache).
    fn forward_ttft(&self, w: usize, req: &EngineRequest, now: u64) -> Option<(u64, u32)> {
        let mut e = self.engines[w].clone();
        let mut evs = Vec::new();
        let mut t = now;
        if e.is_busy() {
            t = self.pass_end[w];
            e.end_pass(&mut evs);
        }
        e.enqueue(req.clone());
        loop {
            evs.clear();
            t += pass_us(e.start_pass(&mut evs)?);
            e.end_pass(&mut evs);
            let first = evs.iter().find_map(|x| match x {
                EngineEvent::FirstToken { id, reused } if *id == req.id => Some(*reused),
                _ => None,
            });
            if let Some(reused) = first {
                return Some((t - now, reused));
            }
        }
    }

    /// The oracle's pick for request `i` (see [`OracleRule`]), and its TTFT there (µs).
    fn oracle_pick(&mut self, rule: OracleRule, req: &RoutingRequest, engine: &EngineRequest, now: u64) -> (usize, Option<u64>) {
        let router = self.router.as_ref().expect("the oracle books through a router");
        let mut cost = vec![f64::INFINITY; self.cfg.workers];
        for s in router.explain(req).0 {
            cost[s.target.worker.id.0 as usize] = s.terms.logit;
        }
        let best_cost = cost.iter().copied().fold(f64::INFINITY, f64::min);
        let margin = match rule {
            OracleRule::CostMargin(m) => m * engine.isl as f64 / self.cfg.engine.block_tokens as f64,
            _ => f64::INFINITY,
        };
        let mut best: Option<((f64, f64, usize), u64)> = None;
        for (w, &c) in cost.iter().enumerate() {
            if c > best_cost + margin {
                continue;
            }
            let Some((ttft, reused)) = self.forward_ttft(w, engine, now) else { continue };
            let e = &self.engines[w];
            let score = match rule {
                OracleRule::StallGuard => {
                    let prefill_ms = e.params().prefill_alone_ms((engine.isl - reused.min(engine.isl)) as u64);
                    ttft as f64 + 1e3 * STALL_WEIGHT * e.load() as f64 * prefill_ms
                }
                _ => ttft as f64,
            };
            let key = (score, c, w);
            if best.as_ref().is_none_or(|(b, _)| key.0 < b.0 || (key.0 == b.0 && key.1 < b.1)) {
                best = Some((key, ttft));
            }
        }
        match best {
            Some(((_, _, w), ttft)) => (w, Some(ttft)),
            // Fits nowhere: the lowest cost, as Dynamo would.
            None => ((0..self.cfg.workers).min_by(|&a, &b| cost[a].total_cmp(&cost[b])).unwrap_or(0), None),
        }
    }

    /// Hands engine events to the router (now or after the configured delay) and to the stats.
    fn deliver(&mut self, w: usize, evs: Vec<EngineEvent>, now: u64) {
        let at = self.instant(now);
        let mut kv = Vec::new();
        for e in evs {
            match e {
                EngineEvent::FirstToken { id, reused } => {
                    let o = &mut self.outcomes[id];
                    o.first_token_us = Some(now);
                    o.reused_tokens = reused;
                    o.prefill_alone_ms = self.cfg.engine_of(w).prefill_alone_ms((o.isl - reused.min(o.isl)) as u64);
                    if let (Some(r), Some(b)) = (&mut self.router, self.bookings[id]) {
                        r.on_first_token(b, at);
                    }
                }
                EngineEvent::Finished { id } => {
                    let o = &mut self.outcomes[id];
                    o.finished_us = Some(now);
                    if let (Some(r), Some(b)) = (&mut self.router, self.bookings[id].take()) {
                        // The server reports streamed tokens as they come; the TPOT model only
                        // needs the count at the end. (Other policies' rows stay as they were:
                        // the `lru` model is not fed output here.)
                        if r.settings().policy == RoutingPolicy::PredictedTtft {
                            r.on_output(b, o.osl as u64);
                        }
                        r.on_end(b, at);
                    }
                }
                e => kv.push(e),
            }
        }
        if kv.is_empty() || self.router.is_none() {
            return;
        }
        if self.cfg.event_delay_ms <= 0.0 {
            self.apply_kv(w, kv);
        } else {
            self.kv_batches.push((w, kv));
            let at = now + (self.cfg.event_delay_ms * 1000.0) as u64;
            self.push(at, Event::Kv(self.kv_batches.len() - 1));
        }
    }

    fn apply_kv(&mut self, w: usize, evs: Vec<EngineEvent>) {
        let Some(router) = &mut self.router else { return };
        for e in evs {
            self.event_ids[w] += 1;
            let data = match e {
                EngineEvent::Stored(blocks) => KvCacheEventData::Stored(KvCacheStoreData {
                    parent_hash: blocks.first().and_then(|b| b.2).map(ExternalBlockHash),
                    start_position: None,
                    blocks: blocks
                        .iter()
                        .map(|&(s, l, _)| KvCacheStoredBlockData {
                            block_hash: ExternalBlockHash(s),
                            tokens_hash: crate::kv::hash::LocalBlockHash(l),
                            mm_extra_info: None,
                        })
                        .collect(),
                }),
                EngineEvent::Removed(hashes) => {
                    KvCacheEventData::Removed(KvCacheRemoveData { block_hashes: hashes.into_iter().map(ExternalBlockHash).collect() })
                }
                _ => continue,
            };
            router.apply(&RouterEvent {
                worker_id: WorkerId(w as u64),
                storage_tier: StorageTier::Device,
                residency_domain: None,
                event: KvCacheEvent { event_id: self.event_ids[w], data, dp_rank: 0 },
            });
        }
    }
}

/// The simulated fleet as the router sees it.
fn fleet(cfg: &SimConfig) -> Fleet {
    let workers = (0..cfg.workers)
        .map(|i| Worker {
            id: WorkerId(i as u64),
            name: format!("sim-{i}"),
            endpoint: SocketAddr::from(([10, 0, 0, 1], 8000 + i as u16)),
            role: Role::Worker,
            dp_start_rank: 0,
            dp_size: 1,
            total_kv_blocks: Some(cfg.engine.kv_blocks as u64),
            max_num_batched_tokens: Some(cfg.engine.max_batch_tokens as u64),
            kv_events: None,
        })
        .collect();
    Fleet { block_size: Some(cfg.engine.block_tokens), workers }
}

impl<'a> State<'a> {
    /// Everything but an arrival: KV events reach the router, engines start and end passes.
    fn step(&mut self, ev: Event, now: u64) {
        match ev {
            Event::Kv(b) => {
                let (w, evs) = std::mem::take(&mut self.kv_batches[b]);
                self.apply_kv(w, evs);
            }
            Event::Start(w) => self.kick(w, now),
            Event::PassEnd(w) => {
                let mut evs = Vec::new();
                self.engines[w].end_pass(&mut evs);
                self.deliver(w, evs, now);
                self.kick(w, now);
            }
            Event::Arrival(_) | Event::WindowEnd => unreachable!("arrivals are the policy's"),
        }
    }

    /// Starts a request our router routed on its engine (a rejected one is counted as such).
    fn place(&mut self, i: usize, decided: Result<crate::router::Decision, RouteError>, engine: &EngineRequest, now: u64) {
        match decided {
            Ok(d) => {
                // Its own booking is counted too: more than its uncached prompt means others'.
                let pending = self.router.as_ref().expect("router").load(&d.decode.worker).active_prefill_tokens;
                self.behind_prefill += (pending > (engine.isl as u64).saturating_sub(d.predicted_cached_tokens)) as usize;
                self.bookings[i] = Some(d.booking);
                self.assign(i, d.decode.worker.id.0 as usize, engine, now);
            }
            Err(RouteError::Overloaded) => self.outcomes[i].rejected = true,
            Err(e) => panic!("simulated fleet cannot fail to route: {e}"),
        }
    }

    /// Request `i` goes to engine `w`.
    fn assign(&mut self, i: usize, w: usize, req: &EngineRequest, now: u64) {
        self.outcomes[i].worker = w;
        self.engines[w].enqueue(req.clone());
        self.push(now, Event::Start(w));
    }

    fn new(cfg: &'a SimConfig, prepared: &[Prepared], router: Option<Router>) -> Self {
        State {
            cfg,
            engines: (0..cfg.workers).map(|w| Engine::new(cfg.engine_of(w))).collect(),
            router,
            bookings: vec![None; prepared.len()],
            outcomes: prepared.iter().map(|r| RequestOutcome::new(r.arrival_us, r.engine.isl, r.engine.osl)).collect(),
            queue: BinaryHeap::new(),
            kv_batches: Vec::new(),
            seq: 0,
            epoch: Instant::now(),
            event_ids: vec![0; cfg.workers],
            pass_end: vec![0; cfg.workers],
            oracle_ttft_us: vec![None; prepared.len()],
            queued: 0,
            max_waiting: 0,
            behind_prefill: 0,
        }
    }
}

/// A pass of `ms` as the event queue schedules it (µs, at least 1).
fn pass_us(ms: f64) -> u64 {
    (ms * 1000.0).round().max(1.0) as u64
}

fn run_policy(prepared: &[Prepared], cfg: &SimConfig, p: &NamedPolicy, ideal: f64) -> PolicyReport {
    let started = std::time::Instant::now();
    let st = simulate(prepared, cfg, p, &[]);
    let mut report = PolicyReport::new(&p.name, &st.outcomes, ideal, started.elapsed());
    if matches!(p.policy, Policy::Oracle(_)) {
        let exact = st.outcomes.iter().zip(&st.oracle_ttft_us).filter(|(o, t)| o.first_token_us.zip(**t).is_some_and(|(f, t)| f - o.arrival_us == t));
        report.oracle_exact = Some(exact.count() as f64 / prepared.len().max(1) as f64);
    }
    report
}

/// One run of a policy over the arrivals; `high` marks the requests of the router queue's high
/// strict priority (empty: none).
fn simulate<'a>(prepared: &[Prepared], cfg: &'a SimConfig, p: &NamedPolicy, high: &[bool]) -> State<'a> {
    let router = match &p.policy {
        Policy::Router { kv, sched, .. } => Some(Router::new(*kv, *sched)),
        Policy::Oracle(_) => Some(Router::new(KvSettings { use_kv_events: true, ..KvSettings::default() }, SchedSettings::default())),
        _ => None,
    };
    let router = router.map(|mut r| {
        r.set_fleet(fleet(cfg));
        r
    });
    let mut waitlist = match &p.policy {
        Policy::Router { queue: Some(q), .. } => Some(queue::Waitlist::new(q.clone(), prepared.len())),
        _ => None,
    };
    let mut st = State::new(cfg, prepared, router);
    let mut rng = SmallRng::seed_from_u64(cfg.seed);
    let mut rr = 0usize;
    for (i, r) in prepared.iter().enumerate() {
        st.push(r.arrival_us, Event::Arrival(i));
    }
    let routed = |i: usize| RoutingRequest { tokens: prepared[i].tokens.clone(), osl: cfg.osl_hints.then_some(prepared[i].engine.osl), ..Default::default() };
    // Our router's decision for request `i` (through the queue, if any; with its lookup if
    // one was taken): whether it was routed at once.
    let decide = |st: &mut State, waitlist: &mut Option<queue::Waitlist>, i: usize, req: &RoutingRequest, kept: Option<Lookup>, now: u64, rng: &mut SmallRng| match waitlist {
        Some(wl) => wl.arrive(st, i, req, kept, &prepared[i].engine, high.get(i).copied().unwrap_or(false), now, rng),
        None => {
            let at = st.instant(now);
            let d = st.router.as_mut().expect("router policy").route_binding(req, kept.as_ref(), Bind::Now, at, rng);
            st.place(i, d, &prepared[i].engine, now);
            true
        }
    };
    let window_on = matches!(&p.policy, Policy::Router { sched, .. } if !sched.decision_window.is_zero());
    // Arrivals held by the decision window, in arrival order.
    let mut group: Vec<usize> = Vec::new();
    while let Some(Reverse((now, ev, _))) = st.queue.pop() {
        // Capacity may have freed (a first token, an end) or a request arrived behind others.
        let mut dispatch_round = true;
        match ev {
            Event::Arrival(i) if window_on => {
                group.push(i);
                // A simulated request is ready at its arrival (no body to receive, no tokens to
                // compute): the group ends once the instant's arrivals have joined — before the
                // window could pass, as in the server when no other request is still arriving.
                if group.len() == 1 {
                    st.push(now, Event::WindowEnd);
                }
                dispatch_round = false;
            }
            Event::WindowEnd => {
                let router = st.router.as_ref().expect("router policy");
                let mut reqs: Vec<(usize, RoutingRequest, Lookup)> = group
                    .drain(..)
                    .map(|i| {
                        let r = routed(i);
                        let l = router.lookup(&r);
                        (i, r, l)
                    })
                    .collect();
                let mut all_routed = true;
                while !reqs.is_empty() {
                    let k = st.router.as_ref().expect("router policy").most_constrained(reqs.iter().map(|(_, r, l)| (r, l)));
                    let (i, req, l) = reqs.remove(k);
                    all_routed &= decide(&mut st, &mut waitlist, i, &req, Some(l), now, &mut rng);
                }
                dispatch_round = !all_routed;
            }
            Event::Arrival(i) => {
                let r = &prepared[i];
                let w = match &p.policy {
                    Policy::Router { .. } => {
                        dispatch_round = !decide(&mut st, &mut waitlist, i, &routed(i), None, now, &mut rng);
                        None
                    }
                    Policy::RoundRobin => {
                        rr = (rr + 1) % cfg.workers;
                        Some(rr)
                    }
                    Policy::Random => Some(rng.random_range(0..cfg.workers)),
                    Policy::LeastLoaded => {
                        let min = st.engines.iter().map(Engine::load).min().unwrap_or(0);
                        let tied: Vec<usize> = (0..cfg.workers).filter(|&w| st.engines[w].load() == min).collect();
                        Some(tied[rng.random_range(0..tied.len())])
                    }
                    Policy::Oracle(rule) => {
                        let mut req = routed(i);
                        let (w, ttft) = st.oracle_pick(*rule, &req, &r.engine, now);
                        st.oracle_ttft_us[i] = ttft;
                        // Booked on the pick alone, so the router's load view follows the oracle.
                        let at = st.instant(now);
                        let router = st.router.as_mut().expect("oracle router");
                        let ep = router.workers().iter().find(|x| x.id.0 as usize == w).expect("simulated worker").endpoint;
                        req.subset = Some(vec![EndpointMatch::Exact(ep)]);
                        let d = router.route(&req, at, &mut rng).expect("the simulated fleet has no admission limits");
                        st.bookings[i] = Some(d.booking);
                        Some(w)
                    }
                };
                if let Some(w) = w {
                    st.assign(i, w, &r.engine, now);
                }
            }
            ev => st.step(ev, now),
        }
        if let Some(wl) = waitlist.as_mut().filter(|_| dispatch_round) {
            wl.release(&mut st, prepared, &routed, now, &mut rng);
        }
    }
    st
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_arriving_in_the_same_instant_share_an_idle_engines_first_pass() {
        let row = |id: u64| TraceRequest { timestamp: 5, input_length: 512, output_length: 1, hash_ids: vec![id] };
        let cfg = SimConfig { workers: 1, ..Default::default() };
        let r = &run(&[row(1), row(2)], &cfg, &[NamedPolicy { name: "rr".into(), policy: Policy::RoundRobin }])[0];
        // One pass prefills both 512-token prompts (T = 1024) and yields both first tokens.
        let pass = EngineParams::default().pass_ms(1024, 0, 0);
        assert!((r.ttft_ms.p50 - pass).abs() < 0.01 && (r.ttft_ms.p99 - pass).abs() < 0.01, "{:?} vs {pass}", r.ttft_ms);
    }

    #[test]
    fn the_oracle_picks_the_lowest_ttft_and_the_simulation_then_reports_that_ttft() {
        let row = |timestamp, osl, ids: std::ops::Range<u64>| TraceRequest { timestamp, input_length: 512 * (ids.end - ids.start) as u32, output_length: osl, hash_ids: ids.collect() };
        let mut c = row(200, 1, 1..18);
        c.hash_ids[16] = 200; // a's 16 blocks, then one of its own
        let trace = [
            row(0, 2000, 1..17), // a: 8,192 tokens, then a long decode (its prefix stays pinned)
            row(1, 1, 101..133), // b: 16,384 tokens, while a's prefill still runs on worker 0
            c,                   // c: a's prefix + 512 tokens, while b's second chunk runs
        ];
        let cfg = SimConfig { workers: 2, ..Default::default() };
        let prepared = prepare(&trace, &cfg);
        let st = simulate(&prepared, &cfg, &oracle_policies()[0], &[]);
        let worker: Vec<usize> = st.outcomes.iter().map(|o| o.worker).collect();
        // a: both idle and equal, the lower index; b: the idle worker (worker 0 is busy until
        // 169 ms, then decodes a alongside b's chunks); c: worker 0 holds its prefix and
        // prefills 512 tokens at once, worker 1 must finish b and then prefill 8,704.
        assert_eq!(worker, [0, 1, 0]);
        let p = EngineParams::default();
        let ms = |us: u64| us as f64 / 1e3;
        let ttft: Vec<f64> = st.outcomes.iter().map(|o| ms(o.first_token_us.unwrap() - o.arrival_us)).collect();
        // Hand-scheduled: a alone in one 8,192-token pass; b in two from 1 ms on an idle engine.
        assert!((ttft[0] - p.pass_ms(8192, 0, 0)).abs() < 0.002, "{ttft:?}");
        assert!((ttft[1] - 2.0 * p.pass_ms(8192, 0, 0)).abs() < 0.003, "{ttft:?}");
        // c on worker 0: the decode pass running at 200 ms ends, then one pass of its 512
        // new tokens beside a's decode: well under one 8,192-token pass.
        assert!(ttft[2] < p.pass_ms(8192, 0, 0) / 2.0, "{ttft:?}");
        assert_eq!(st.outcomes[2].reused_tokens, 8192);
        // Where each TTFT went: a and b waited for nothing (all prefill alone, no router
        // queue), c's 512 new tokens alone take one small pass and the rest of its TTFT was on
        // the engine (the decode pass it arrived in, a's decode batched into its pass).
        let alone: Vec<f64> = st.outcomes.iter().map(|o| o.prefill_alone_ms).collect();
        assert!((alone[0] - ttft[0]).abs() < 0.002 && (alone[1] - ttft[1]).abs() < 0.003, "{alone:?} vs {ttft:?}");
        assert!((alone[2] - p.pass_ms(512, 0, 0)).abs() < 1e-9 && ttft[2] - alone[2] > 1.0, "{alone:?} vs {ttft:?}");
        assert!(st.outcomes.iter().all(|o| o.queued_us == 0));
        // And each pick's looked-ahead TTFT is the one the simulation then produced.
        for (i, o) in st.outcomes.iter().enumerate() {
            assert_eq!(st.oracle_ttft_us[i], Some(o.first_token_us.unwrap() - o.arrival_us), "request {i}");
        }
    }

    #[test]
    fn a_decision_window_gives_a_contested_cache_holder_to_the_request_that_needs_it() {
        let row = |timestamp, ids: Vec<u64>| TraceRequest { timestamp, input_length: 512 * ids.len() as u32, output_length: 1, hash_ids: ids };
        let cfg = SimConfig { workers: 2, ..Default::default() };
        for policy in [RoutingPolicy::Cost, RoutingPolicy::PredictedTtft] {
            let run = |window_ms: u64| {
                let trace = [
                    row(0, (1..17).collect()),                                 // a: 8,192 tokens
                    row(2000, std::iter::once(1).chain(300..308).collect()),  // x: a's first block + 4,096 new
                    row(2000, (1..17).chain([200]).collect()),                // y: a's prompt + 512 new
                ];
                let sched = SchedSettings { policy, decision_window: Duration::from_millis(window_ms), ..SchedSettings::default() };
                let p = NamedPolicy { name: "p".into(), policy: Policy::Router { kv: KvSettings { use_kv_events: true, ..KvSettings::default() }, sched, queue: None } };
                let st = simulate(&prepare(&trace, &cfg), &cfg, &p, &[]);
                let ttft: Vec<f64> = st.outcomes.iter().map(|o| (o.first_token_us.unwrap() - o.arrival_us) as f64 / 1e3).collect();
                (st.outcomes.iter().map(|o| o.worker).collect::<Vec<_>>(), ttft)
            };
            // a goes to worker 0 (both idle; at this seed).
            let ((at_once, ttft_at_once), (grouped, ttft_grouped)) = (run(0), run(1));
            // Decided as they come, x takes the holder of a's prompt (it holds x's first block)
            // and y either queues behind x's 4,096 new tokens there or recomputes all 8,704
            // on worker 1.
            assert_eq!(at_once[..2], [0, 0], "{policy:?}");
            assert!(ttft_at_once[2] > EngineParams::default().pass_ms(4096, 0, 0), "{policy:?}: {ttft_at_once:?}");
            // Grouped by a window, y loses most without the holder (8,192 cached tokens against
            // x's 512): it is decided first and prefills its 512 new tokens in one pass there,
            // x its 4,608 on worker 1. (Simulated requests arrive ready: nothing waits for the
            // window to pass.)
            assert_eq!(grouped, [0, 1, 0], "{policy:?}");
            let p = EngineParams::default();
            let expected = [p.pass_ms(8192, 0, 0), p.pass_ms(4608, 0, 0), p.pass_ms(512, 0, 0)];
            for (t, e) in ttft_grouped.iter().zip(expected) {
                assert!((t - e).abs() < 0.002, "{policy:?}: {ttft_grouped:?} vs {expected:?}");
            }
            assert!(ttft_grouped[1] + ttft_grouped[2] < ttft_at_once[1] + ttft_at_once[2]);
        }
    }

    #[test]
    fn the_oracle_sends_a_prompt_to_the_faster_of_two_idle_workers_and_kv_events_does_not() {
        let row = |timestamp, id| TraceRequest { timestamp, input_length: 4096, output_length: 1, hash_ids: (id..id + 8).collect() };
        let trace: Vec<TraceRequest> = (0..6).map(|i| row(1000 * i, 100 * i)).collect();
        let cfg = SimConfig { workers: 2, slow_share: 0.5, slow_factor: 3.0, ..Default::default() };
        let prepared = prepare(&trace, &cfg);
        let oracle = simulate(&prepared, &cfg, &oracle_policies()[0], &[]);
        assert!(oracle.outcomes.iter().all(|o| o.worker == 0), "worker 1 is 3× slower");
        let kv = standard_policies().remove(0);
        let cost = simulate(&prepared, &cfg, &kv, &[]);
        assert!(cost.outcomes.iter().any(|o| o.worker == 1), "Dynamo's cost sees no speed");
        // A prompt's prefill alone is priced at its worker's speed: 4,096 new tokens in one pass.
        let pass = EngineParams::default().pass_ms(4096, 0, 0);
        for o in &cost.outcomes {
            let speed = if o.worker == 1 { 3.0 } else { 1.0 };
            assert!((o.prefill_alone_ms - speed * pass).abs() < 1e-9, "worker {}: {} vs {}", o.worker, o.prefill_alone_ms, speed * pass);
        }
    }
}
