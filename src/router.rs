//! The routing facade: the one place the server (and the simulator and benches) asks for a
//! decision and reports a request's lifecycle. Pure and synchronous: time and randomness are
//! passed in, no I/O happens here.
//!
//! It owns the KV cache state (the index fed by events through [`Router::apply`] and, in
//! approximate mode or with a predicted TTL, the router's own remembered decisions) and the
//! active sequences: the load of every request booked here or, with replica sync, by a peer.
//! A decision scores every eligible (worker, rank) with Dynamo's cost model
//! ([`crate::sched::cost`]), skips busy workers, and picks the cheapest (or samples by
//! temperature); with prefill workers in the fleet it picks a prefill worker first.

use std::{
    collections::{HashMap, HashSet},
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use rand::Rng;
use rustc_hash::FxHashMap;

use crate::{
    kv::{
        events::RouterEvent,
        hash::{hash_seed, local_block_hashes, seq_hashes, LocalBlockHash},
        index::{Applied, Index, Overlap},
        predicted::{ApproxCachePolicy, Predicted},
    },
    sched::{
        active::{ActiveSequences, Booking as ActiveBooking, RankLoad},
        admission::{rank_is_busy, Capacity},
        cost::{cost_terms, CandidateLoad, CostInput, CostTerms, CostWeights, TierOverlap},
        disagg::Stage,
        latency::{Inputs, LatencyModels, Prediction, RankModel, DEFAULT_BATCH_TOKENS},
        queue::{saturated as queue_saturated, Claims, LateRound, Ticket},
        select::select,
        RoutingPolicy, SchedSettings,
    },
    workers::{Fleet, Role, Worker, WorkerRank},
};

/// Router-minted key of one booked request (not the client's `x-request-id`, which can repeat).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BookingId(u64);

/// Where a request goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Target {
    pub worker: WorkerRank,
    pub endpoint: SocketAddr,
}

/// How the request is served; sent as `x-dynamo-routing-mode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RoutingMode {
    Aggregated,
    Disaggregated,
}

impl RoutingMode {
    pub fn as_str(self) -> &'static str {
        match self {
            RoutingMode::Aggregated => "aggregated",
            RoutingMode::Disaggregated => "disaggregated",
        }
    }
}

/// The router's answer for one request.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Decision {
    pub decode: Target,
    pub prefill: Option<Target>,
    pub mode: RoutingMode,
    pub booking: BookingId,
    /// Prompt tokens the chosen worker (the prefill worker when disaggregated) is expected to
    /// have cached: the prediction the engine's `cached_tokens` later confirms or not.
    pub predicted_cached_tokens: u64,
}

/// One entry of a gateway subset hint: `ip:port`, or a bare `ip` matching any port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EndpointMatch {
    Exact(SocketAddr),
    Host(IpAddr),
}

impl EndpointMatch {
    pub fn parse(s: &str) -> Option<Self> {
        let s = s.trim();
        s.parse()
            .map(EndpointMatch::Exact)
            .or_else(|_| s.parse().map(EndpointMatch::Host))
            .ok()
    }

    fn matches(&self, ep: SocketAddr) -> bool {
        match *self {
            EndpointMatch::Exact(a) => a == ep,
            EndpointMatch::Host(ip) => ip == ep.ip(),
        }
    }
}

/// What the router needs to know about a request.
#[derive(Clone, Debug, Default)]
pub struct RoutingRequest {
    /// The prompt's token ids; empty when no tokenizer is configured (then load alone decides).
    pub tokens: Vec<u32>,
    /// Tenant / cache namespace: salts the block hashes.
    pub cache_salt: Option<String>,
    /// LoRA adapter name: salts the block hashes.
    pub lora: Option<String>,
    /// Gateway subset hint; `None` = every worker is eligible.
    pub subset: Option<Vec<EndpointMatch>>,
    /// Expected output tokens (`nvext.agent_hints.osl`): decays output-block growth.
    pub osl: Option<u32>,
}

impl RoutingRequest {
    fn allows(&self, ep: SocketAddr) -> bool {
        self.subset.as_ref().is_none_or(|s| s.iter().any(|m| m.matches(ep)))
    }
}

/// When a decision binds a request to the rank it picks (late binding at the router queue,
/// `DYN_EPP_QUEUE_LATE_BINDING`: a request waits for the rank it prefers, not for any).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Bind {
    /// At once (every request without late binding).
    Now,
    /// Arriving while others wait or every worker is saturated: only if its prompt joins the
    /// last pass of the prompts booked there.
    Joining,
    /// Released from the queue: if it joins, or the rank has room at the queue's `threshold`
    /// (scored as released: see [`RELEASED_LONG_DECODE_STALL_WEIGHT`]).
    Released { threshold: f64 },
}

/// Why no target could be chosen.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    #[error("no workers are known yet")]
    NoWorkers,
    /// Workers are known but none can run the request: the fleet has prefill workers only.
    #[error("no worker can serve the request: the fleet has prefill workers only")]
    NoDecodeWorkers,
    #[error("the gateway's endpoint subset matches no known worker")]
    SubsetMatchesNone,
    #[error("every eligible worker is at capacity; retry shortly")]
    Overloaded,
    #[error("prefill routing is unavailable: no prefill workers, and DYN_ENFORCE_DISAGG=true")]
    PrefillUnavailable,
}

/// One candidate as the cost model saw it (for the decision, the Explain RPC and benches).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Scored {
    pub target: Target,
    pub load: CandidateLoad,
    /// Dynamo's cost terms; `logit` is the score selection reads (under `predicted-ttft` the
    /// predicted latency in ms, not Dynamo's cost).
    pub terms: CostTerms,
    /// The predicted latency and its parts (`predicted-ttft` only).
    pub prediction: Option<Prediction>,
    /// The rank's pass size (its worker's `max_num_batched_tokens`, else the configured
    /// default, else [`DEFAULT_BATCH_TOKENS`]): the prediction schedules prompt work in it.
    pub batch_tokens: u64,
    /// Skipped by admission control: the worker is over a threshold on every rank.
    pub busy: bool,
    /// Our requests on the rank whose prompt is still being prefilled.
    pub prefilling: u32,
    /// The rank's long-decode sum (`predicted-ttft`'s E2E guard).
    pub long_decodes: f64,
}

/// A first response chunk compared with the prediction made at dispatch (for the metrics).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TtftSample {
    /// The rank that prefilled the prompt.
    pub worker: WorkerRank,
    pub predicted_ms: f64,
    pub actual_ms: f64,
}

/// What the latency models learn from one request, kept from dispatch to its end.
#[derive(Clone, Copy, Debug)]
struct Observation {
    dispatched: Instant,
    /// The rank that prefills, its inputs at dispatch and the prediction then.
    prefill: (WorkerRank, Inputs, Prediction),
    /// The rank that decodes and its inputs at dispatch.
    decode: (WorkerRank, Inputs),
    first_token: Option<Instant>,
    generated: u64,
}

/// What one booked request holds in the active sequences.
#[derive(Clone, Copy, Debug)]
struct Booking {
    /// Active-sequence id of the decode (or aggregated) part.
    decode: u64,
    /// Active-sequence id of the prefill part, freed at the first response chunk.
    prefill: Option<u64>,
    osl: Option<u32>,
    /// The prompt's blocks pinned in the `lru` cache model (keyed by the booking id).
    lease: Option<Lease>,
    /// What the latency models learn from it (`predicted-ttft` only: the default policy pays
    /// for no prediction, booking or fit).
    seen: Option<Observation>,
}

#[derive(Clone, Copy, Debug)]
struct Lease {
    /// The rank that prefills the prompt.
    rank: WorkerRank,
    isl: u64,
}

/// A change to this replica's active sequences, for its peers (replica sync).
#[derive(Clone, Debug, PartialEq)]
pub struct PeerEvent {
    /// Unique per sending replica.
    pub request_id: String,
    pub worker: WorkerRank,
    pub data: PeerEventData,
}

#[derive(Clone, Debug, PartialEq)]
pub enum PeerEventData {
    Add {
        /// Sequence hashes of the booked prompt blocks (`None` = none tracked).
        blocks: Option<Vec<u64>>,
        /// Prompt tokens the worker still has to prefill.
        prefill_tokens: u64,
        expected_output_tokens: Option<u32>,
    },
    PrefillCompleted,
    Free,
}

/// How the router learns what the workers have cached.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct KvSettings {
    /// Tokens per block when the fleet source does not say.
    pub default_block_size: u32,
    /// false = approximate mode: only the router's own decisions, kept by `approx_policy`.
    pub use_kv_events: bool,
    pub approx_policy: ApproxCachePolicy,
    /// `ttl` policy (and `lru` for ranks of unknown capacity): how long a decision is kept.
    pub approx_ttl: Duration,
    /// With events on: also remember decisions for this long (bursts before events arrive).
    pub predicted_ttl: Option<Duration>,
    /// Bound on remembered (worker rank, block) pairs (`lru`: on each rank's capacity).
    pub max_predicted_blocks: usize,
}

impl Default for KvSettings {
    fn default() -> Self {
        KvSettings {
            default_block_size: 16,
            use_kv_events: true,
            approx_policy: ApproxCachePolicy::Ttl,
            approx_ttl: Duration::from_secs(120),
            predicted_ttl: None,
            max_predicted_blocks: 4_000_000,
        }
    }
}

struct KvState {
    settings: KvSettings,
    block_size: u32,
    index: Index,
    predicted: Option<Predicted>,
}

impl KvState {
    fn new(settings: KvSettings) -> Self {
        // The capacity model stands in for events; with events on, predictions only bridge
        // the moments before they arrive.
        let (policy, ttl) = if settings.use_kv_events {
            (ApproxCachePolicy::Ttl, settings.predicted_ttl)
        } else {
            (settings.approx_policy, Some(settings.approx_ttl))
        };
        KvState {
            settings,
            block_size: settings.default_block_size,
            index: Index::new(),
            predicted: ttl.map(|t| Predicted::new(policy, t, settings.max_predicted_blocks)),
        }
    }

    /// Unpins a booking's blocks in the cache model.
    fn release(&mut self, booking: BookingId, lease: Option<Lease>) {
        if let (Some(l), Some(p)) = (lease, &mut self.predicted) {
            p.release(l.rank, booking.0);
        }
    }
}

/// `predicted-ttft`: the share of the decode stall a prefill imposes on the requests running
/// on its rank that counts against the rank (beside the join delay and the E2E guard, 0.05,
/// 0.15 and 0.2 measured worse on E2E p99; a TPOT-based guard worse: docs/routing-policy.md).
pub(crate) const STALL_WEIGHT: f64 = 0.1;

/// `predicted-ttft`: the share of that stall counted again for each request there with a
/// long decode left (the E2E tail is long decodes stalled by prefills placed beside them;
/// beside the join delay 0.2 and 0.4 measured worse: docs/routing-policy.md, tenth session).
const LONG_DECODE_STALL_WEIGHT: f64 = 0.3;

/// `predicted-ttft`, a request released from the router queue under late binding: the E2E
/// guard's weight, and its stall guard counts only the requests decoding there (not those
/// still prefilling, which a joining prompt does not stall). Released requests are placed when
/// every rank is busy; with the arrival weights late binding's E2E p99 was 1.022–1.029×
/// `kv-events`' at the conversation trace's rate (target ≤ 1.02; docs/routing-policy.md,
/// twelfth and thirteenth sessions).
const RELEASED_LONG_DECODE_STALL_WEIGHT: f64 = 1.0;

/// Requests of a decision window weighed per pick: a group of k costs up to k × this many
/// scorings under the router lock (the largest group in the conversation trace is 28).
const MOST_CONSTRAINED_SCAN: usize = 32;

/// Output tokens left from which a request counts wholly as a long decode; fewer count in
/// proportion (the scale screened, not tuned).
const LONG_DECODE_TOKENS: f64 = 500.0;

/// A request's share in its rank's [`LongDecodes`] sum with `done` of its `osl` tokens out.
fn long_decode_weight(osl: u32, done: f64) -> f64 {
    ((osl as f64 - done).max(0.0) / LONG_DECODE_TOKENS).min(1.0)
}

/// How old the long-decode sums may get: a request's weight moves by a few percent in this
/// time (tens of tokens of its last 500), while starts and ends count at once.
const LONG_DECODE_REFRESH: Duration = Duration::from_millis(100);

/// Stale bookings are looked for at most this often (a sweep walks every active request).
const EXPIRY_SWEEP: Duration = Duration::from_secs(1);

/// A request as the scorer needs it, computed once per decision.
struct Query {
    hashes: Vec<LocalBlockHash>,
    /// Sequence hashes of the full prompt blocks, when replicas share bookings (their wire
    /// format keys active blocks by them); see [`Query::keys`].
    seq: Option<Vec<u64>>,
    isl: u64,
    overlaps: FxHashMap<WorkerRank, TierOverlap>,
}

impl Query {
    /// The keys active blocks are counted by, one per full prompt block: the sequence hashes
    /// when replicas share bookings, else the local hashes — in the prompt trie a path of
    /// local hashes names the prefix just as well, and the sequence-hash chain (a serial xxh3
    /// per block) is not computed.
    fn keys(&self) -> &[u64] {
        self.seq.as_deref().unwrap_or(LocalBlockHash::as_u64s(&self.hashes))
    }
}

/// A prompt's cache lookup (block hashes and each rank's cached prefix), kept by a request
/// waiting in the router queue under `wspt`: taken once at arrival for its key, and used again
/// for its decision unless refreshed (`DYN_ROUTER_OVERLAP_REFRESH_AFTER_SECS`), as Dynamo's
/// queue keeps the overlap scores computed at arrival.
pub struct Lookup(Query);

impl Lookup {
    /// What it holds while waiting (hashes, 8 bytes a block; the overlap map).
    pub fn bytes(&self) -> u64 {
        8 * self.0.hashes.len() as u64 + 8 * self.0.seq.as_ref().map_or(0, Vec::len) as u64 + 32 * self.0.overlaps.len() as u64
    }
}

/// The routing state shared by every stream.
pub struct Router {
    workers: Vec<Worker>,
    loaded: bool,
    sched: SchedSettings,
    active: ActiveSequences,
    bookings: FxHashMap<BookingId, Booking>,
    next_booking: u64,
    /// Next active-sequence id (ours and peers' share the space).
    next_seq: u64,
    last_sweep: Option<Instant>,
    kv: KvState,
    /// Replica sync: our changes waiting to be published (`None` = sync off), and the peers'
    /// bookings by (replica, request id).
    outbox: Option<Vec<PeerEvent>>,
    peer_seqs: HashMap<(u64, String), u64>,
    /// Latency models, learned from our own requests' first chunks and output spacing.
    latency: LatencyModels,
    /// `predicted-ttft`'s E2E guard: when the long-decode weights were last recomputed. Each
    /// of our requests with an expected output weighs in its decoding rank's sum by the output
    /// it has left ([`long_decode_weight`]); the sums live with the ranks' load
    /// ([`RankLoad::long_decodes`]), kept by each booking's start and end, and the weights are
    /// recomputed from every booking at most every [`LONG_DECODE_REFRESH`] of decision time, so
    /// a decision does not walk every request in flight (1,000 of them tripled a decision's
    /// time: docs/routing-policy.md).
    long_refreshed: Option<Instant>,
}

impl Default for Router {
    fn default() -> Self {
        Router::new(KvSettings::default(), SchedSettings::default())
    }
}

impl Router {
    pub fn new(kv: KvSettings, sched: SchedSettings) -> Self {
        Router {
            workers: Vec::new(),
            loaded: false,
            sched,
            active: ActiveSequences::new(sched.expiry),
            bookings: FxHashMap::default(),
            next_booking: 0,
            next_seq: 0,
            last_sweep: None,
            kv: KvState::new(kv),
            outbox: None,
            peer_seqs: HashMap::new(),
            latency: LatencyModels::default(),
            long_refreshed: None,
        }
    }

    /// Starts collecting our booking changes for the peers ([`Router::take_peer_events`]).
    /// Call before routing: from here on bookings are keyed by sequence hashes, as the peers'.
    pub fn enable_replica_sync(&mut self) {
        self.outbox.get_or_insert_with(Vec::new);
    }

    pub fn settings(&self) -> &SchedSettings {
        &self.sched
    }

    /// Replaces the fleet. Bookings and cached blocks of workers that left are dropped with
    /// them; a new block size invalidates every hash, so the cache state starts over.
    pub fn set_fleet(&mut self, fleet: Fleet) {
        self.workers = fleet.workers;
        self.loaded = true;
        let live: HashSet<WorkerRank> = self.workers.iter().flat_map(Worker::ranks).collect();
        self.active.retain_workers(|w| live.contains(w));
        self.latency.retain(|w| live.contains(w));
        self.forget_ended();
        let block_size = fleet.block_size.unwrap_or(self.kv.settings.default_block_size);
        if block_size != self.kv.block_size {
            self.kv = KvState::new(self.kv.settings);
            self.kv.block_size = block_size;
        }
        let ids: HashSet<_> = self.workers.iter().map(|w| w.id).collect();
        for gone in self.kv.index.workers().into_iter().filter(|w| !ids.contains(w)) {
            self.kv.index.remove_worker(gone);
            if let Some(p) = &mut self.kv.predicted {
                p.remove_worker(gone);
            }
        }
        let capacities: Vec<_> = self
            .workers
            .iter()
            .flat_map(|w| {
                let blocks = self.capacity(w).total_kv_blocks;
                w.ranks().map(move |r| (r, blocks))
            })
            .collect();
        if let Some(p) = &mut self.kv.predicted {
            p.set_capacities(capacities);
        }
    }

    /// Drops bookings and peer entries whose active sequences are gone (expired, or their
    /// worker left); a dropped booking's blocks are unpinned, as at its end.
    fn forget_ended(&mut self) {
        let (active, kv) = (&self.active, &mut self.kv);
        self.bookings.retain(|&id, b| {
            let live = active.contains(b.decode);
            if !live {
                kv.release(id, b.lease);
            }
            live
        });
        self.peer_seqs.retain(|_, s| active.contains(*s));
    }

    /// The fleet as last set.
    pub fn workers(&self) -> &[Worker] {
        &self.workers
    }

    /// Tokens per KV block: the fleet's, else the configured default.
    pub fn block_size(&self) -> u32 {
        self.kv.block_size
    }

    /// Applies one KV event to the index.
    pub fn apply(&mut self, ev: &RouterEvent) -> Applied {
        self.kv.index.apply(ev)
    }

    /// Blocks in the index (for the metrics).
    pub fn kv_blocks(&self) -> usize {
        self.kv.index.block_count()
    }

    /// Heap bytes of the KV index (for the metrics; walks the index).
    pub fn kv_index_bytes(&self) -> usize {
        self.kv.index.heap_bytes()
    }

    /// Forgets remembered decisions and bookings whose time is up (also done lazily on every
    /// route).
    pub fn expire(&mut self, now: Instant) {
        if let Some(p) = &mut self.kv.predicted {
            p.expire(now);
        }
        if self.last_sweep.is_none_or(|t| now.saturating_duration_since(t) >= EXPIRY_SWEEP) {
            self.last_sweep = Some(now);
            self.latency.refresh(now);
            if self.active.expire(now) > 0 {
                self.forget_ended();
            }
        }
    }

    /// True once a fleet source has delivered its first complete view.
    pub fn is_ready(&self) -> bool {
        self.loaded
    }

    pub fn worker_count(&self) -> usize {
        self.workers.len()
    }

    /// Requests booked here and not yet ended.
    pub fn active_requests(&self) -> usize {
        self.bookings.len()
    }

    /// A rank's load as the cost model reads it (ours and, with replica sync, the peers').
    pub fn load(&self, w: &WorkerRank) -> RankLoad {
        self.active.load(w)
    }

    /// The request's hashes and per-rank cached prefix, computed once per decision.
    fn query(&self, req: &RoutingRequest) -> Query {
        let seed = hash_seed(req.lora.as_deref(), req.cache_salt.as_deref());
        let hashes = local_block_hashes(&req.tokens, self.kv.block_size as usize, seed);
        let overlaps = self.overlaps(&hashes);
        let seq = self.outbox.is_some().then(|| seq_hashes(&hashes).into_iter().map(|s| s.0).collect());
        Query { hashes, seq, isl: req.tokens.len() as u64, overlaps }
    }

    /// Each rank's cached prefix of these blocks, per tier.
    fn overlaps(&self, hashes: &[LocalBlockHash]) -> FxHashMap<WorkerRank, TierOverlap> {
        let mut overlaps: FxHashMap<WorkerRank, TierOverlap> = FxHashMap::default();
        if !hashes.is_empty() {
            let mut add = |os: Vec<Overlap>| {
                overlaps.reserve(os.len());
                for o in os {
                    let t = tiers(&o);
                    let e = overlaps.entry(o.worker).or_default();
                    *e = TierOverlap { device: e.device.max(t.device), host: e.host.max(t.host), disk: e.disk.max(t.disk) };
                }
            };
            if self.kv.settings.use_kv_events {
                add(self.kv.index.overlaps(hashes));
            }
            if let Some(p) = &self.kv.predicted {
                add(p.overlaps(hashes));
            }
        }
        overlaps
    }

    /// Every eligible rank of `stage`'s pool, with its cost terms and busy flag.
    fn score(&self, stage: Stage, req: &RoutingRequest, q: &Query, claims: &Claims, bind: Bind) -> Vec<Scored> {
        let rules = stage.rules(&self.sched);
        // Without token ids (no tokenizer configured) only the request count tells load apart.
        let weights = if q.isl == 0 {
            CostWeights { decode_active_request_weight: rules.weights.decode_active_request_weight.max(1.0), ..rules.weights }
        } else {
            rules.weights
        };
        let held = if rules.track_active_blocks && rules.assume_kv_reuse { self.active.held_prefixes(q.keys()) } else { FxHashMap::default() };
        let chain = q.keys().len() as u64;
        // One pass gathers each rank's load (a decision visits every rank: no per-rank
        // allocation), the next prices it against the least active prefill.
        let mut scored = Vec::with_capacity(self.workers.iter().map(|w| w.dp_size as usize).sum());
        // Workers claimed by blocked requests ahead in the router queue run no prompt of ours.
        let claimed = |w: &Worker| stage != Stage::Decode && claims.holds(w.id);
        for w in self.workers.iter().filter(|w| stage.admits(w.role) && req.allows(w.endpoint) && !claimed(w)) {
            let first = scored.len();
            let cap = self.capacity(w);
            let batch_tokens = cap.max_num_batched_tokens.unwrap_or(DEFAULT_BATCH_TOKENS);
            // `extend` over the ranks writes each candidate straight into the vector.
            scored.extend(w.ranks().map(|r| {
                let l = self.active.load(&r);
                let rank_busy = self.sched.admission.as_ref().is_some_and(|t| rank_is_busy(t, &cap, &l));
                let new_blocks = match (rules.track_active_blocks, rules.assume_kv_reuse) {
                    (false, _) => 0,
                    // Random tracking hashes are new everywhere.
                    (true, false) => chain,
                    // (Empty maps — a miss — are common: skip hashing the key.)
                    (true, true) => chain - if held.is_empty() { 0 } else { held.get(&r).copied().unwrap_or(0) },
                };
                let load = CandidateLoad {
                    overlap: if q.overlaps.is_empty() { TierOverlap::default() } else { q.overlaps.get(&r).copied().unwrap_or_default() },
                    active_prefill_tokens: l.active_prefill_tokens,
                    active_decode_blocks: if rules.track_active_blocks { l.active_decode_blocks } else { 0.0 },
                    new_blocks,
                    active_requests: l.active_requests,
                };
                Scored { target: Target { worker: r, endpoint: w.endpoint }, load, terms: CostTerms::default(), prefilling: l.prefilling_requests, long_decodes: l.long_decodes, prediction: None, batch_tokens, busy: rank_busy }
            }));
            // Admission control: a worker is busy only when every one of its ranks is.
            let worker_busy = scored[first..].iter().all(|s| s.busy);
            scored[first..].iter_mut().for_each(|s| s.busy = worker_busy);
        }
        let min_prefill = scored.iter().map(|s| s.load.active_prefill_tokens).min().unwrap_or(0);
        let input = CostInput { block_size: self.kv.block_size, isl: q.isl, min_active_prefill_tokens: min_prefill };
        for s in &mut scored {
            s.terms = cost_terms(&weights, &input, &s.load);
        }
        if self.sched.policy == RoutingPolicy::PredictedTtft {
            self.predict(stage, q, &held, bind, &mut scored);
        }
        scored
    }

    /// The latency model's inputs for a candidate as scored: the prompt tokens it holds are
    /// the longer of its cached prefix (index, remembered decisions) and the prefix that
    /// requests booked there are bringing (`held` blocks): a request sharing the prompt of
    /// one still queued there reuses its blocks, though no KV event has told of them yet.
    fn inputs(&self, s: &Scored, isl: u64, held: u64) -> Inputs {
        let held_tokens = held * self.kv.block_size as u64;
        Inputs {
            queued_tokens: s.load.active_prefill_tokens,
            new_tokens: isl - s.terms.cached_tokens.max(held_tokens).min(isl),
            decode_tokens: s.load.active_decode_blocks * self.kv.block_size as f64,
            own_tokens: isl,
            active_requests: s.load.active_requests,
            prefilling_requests: s.prefilling,
            batch_tokens: s.batch_tokens,
        }
    }

    /// `predicted-ttft`: each candidate's score becomes its predicted latency (ms): the TTFT
    /// (aggregated, prefill pool), or the time per output token (decode pool). The aggregated
    /// and prefill scores add a guard for the requests already there: while this prompt is
    /// prefilled, each of them waits (no token streams during the passes it takes), so a
    /// share of `active requests × predicted prefill time` is added — it keeps prompts off
    /// ranks with many requests decoding unless the rank holds the prompt's prefix (then the
    /// prefill, and the stall, are short). A request with a long decode left waits through
    /// every prefill placed beside it, so it counts more (the E2E guard). They also add the
    /// delay this prompt's first chunk brings to the prompts booked ahead whose last pass it
    /// joins (their predictions could not see it: a later prompt placed greedily shares their
    /// pass). Measured in docs/routing-policy.md.
    fn predict(&self, stage: Stage, q: &Query, held: &FxHashMap<WorkerRank, u64>, bind: Bind, scored: &mut [Scored]) {
        let released = matches!(bind, Bind::Released { .. });
        let long_weight = if released { RELEASED_LONG_DECODE_STALL_WEIGHT } else { LONG_DECODE_STALL_WEIGHT };
        for s in scored.iter_mut() {
            let h = if held.is_empty() { 0 } else { held.get(&s.target.worker).copied().unwrap_or(0) };
            let p = self.latency.predict(&s.target.worker, self.inputs(s, q.isl, h));
            let stalled = if released { p.inputs.active_requests.saturating_sub(p.inputs.prefilling_requests) } else { p.inputs.active_requests };
            let stall = STALL_WEIGHT * stalled as f64 * p.prefill_ms;
            let long_stall = long_weight * p.prefill_ms * s.long_decodes;
            s.terms.logit = if stage == Stage::Decode { p.tpot_ms } else { p.ttft_ms + stall + long_stall + p.join_ms };
            s.prediction = Some(p);
        }
    }

    /// Recomputes the long-decode sums when they are older than [`LONG_DECODE_REFRESH`]: left
    /// = expected − the more of the tokens streamed and the time since the first chunk at the
    /// TPOT predicted at dispatch.
    fn refresh_long_decodes(&mut self, now: Instant) {
        if self.long_refreshed.is_some_and(|at| now.saturating_duration_since(at) < LONG_DECODE_REFRESH) {
            return;
        }
        self.long_refreshed = Some(now);
        for b in self.bookings.values() {
            let (Some(seen), Some(osl)) = (&b.seen, b.osl) else { continue };
            let done = seen.first_token.map_or(0.0, |first| {
                let ms = now.saturating_duration_since(first).as_secs_f64() * 1e3;
                (ms / seen.prefill.2.tpot_ms.max(0.5)).max(seen.generated as f64)
            });
            self.active.set_long_decode(b.decode, long_decode_weight(osl, done));
        }
    }

    /// A rank's latency models (the fleet's TTFT fit, its speed, its TPOT fit else the
    /// fleet's), for the Explain RPC.
    pub fn latency_model(&self, w: &WorkerRank) -> RankModel<'_> {
        self.latency.model(w)
    }

    /// Whether a rank's latency models have samples of their own.
    pub fn has_latency_samples(&self, w: &WorkerRank) -> bool {
        self.latency.has(w)
    }

    /// The fleet-wide latency models (every rank's samples).
    pub fn fleet_latency_model(&self) -> RankModel<'_> {
        self.latency.fleet()
    }

    /// A worker's capacity (admission control, the `lru` cache model): its own, else the
    /// configured default.
    fn capacity(&self, w: &Worker) -> Capacity {
        Capacity {
            total_kv_blocks: w.total_kv_blocks.or(self.sched.default_capacity.total_kv_blocks),
            max_num_batched_tokens: w.max_num_batched_tokens.or(self.sched.default_capacity.max_num_batched_tokens),
        }
    }

    /// Chooses among the scored candidates: busy ones are skipped.
    fn choose(&self, req: &RoutingRequest, scored: &[Scored], rng: &mut impl Rng) -> Result<Scored, RouteError> {
        if scored.is_empty() {
            // Without a subset nothing is filtered: only the stage's roles can be missing.
            return Err(if self.workers.is_empty() {
                RouteError::NoWorkers
            } else if req.subset.is_none() {
                RouteError::NoDecodeWorkers
            } else {
                RouteError::SubsetMatchesNone
            });
        }
        let open: Vec<&Scored> = scored.iter().filter(|s| !s.busy).collect();
        let costs: Vec<f64> = open.iter().map(|s| s.terms.logit).collect();
        select(&costs, self.sched.temperature, rng).map(|i| *open[i]).ok_or(RouteError::Overloaded)
    }

    /// Whether this request is served disaggregated: prefill workers it may use exist.
    fn disaggregates(&self, req: &RoutingRequest) -> bool {
        self.workers.iter().any(|w| w.role == Role::Prefill && req.allows(w.endpoint))
    }

    /// Every candidate the decision would weigh, without booking anything: the decode (or
    /// aggregated) pool, and the prefill pool when disaggregated.
    pub fn explain(&self, req: &RoutingRequest) -> (Vec<Scored>, Vec<Scored>) {
        let q = self.query(req);
        if self.disaggregates(req) {
            (self.score(Stage::Decode, req, &q, &Claims::default(), Bind::Now), self.score(Stage::Prefill, req, &q, &Claims::default(), Bind::Now))
        } else {
            (self.score(Stage::Aggregated, req, &q, &Claims::default(), Bind::Now), Vec::new())
        }
    }

    /// Of requests arriving together, the one that loses most by not getting its best worker:
    /// the largest gap between its best and second-best open candidate's score (the prompt's
    /// pool: prefill when disaggregated; a single candidate has no gap). Deciding a group in
    /// this order, each after those before it are booked, gives a contested worker to the
    /// request that needs it (say, the holder of its prefix) rather than to whichever came
    /// first. Each request comes with its [`lookup`](Self::lookup), taken once for the group.
    /// Ties: the earlier; none: 0. Only the first [`MOST_CONSTRAINED_SCAN`] are weighed.
    pub fn most_constrained<'a>(&self, group: impl IntoIterator<Item = (&'a RoutingRequest, &'a Lookup)>) -> usize {
        let mut pick = (0, f64::NEG_INFINITY);
        for (i, (req, l)) in group.into_iter().take(MOST_CONSTRAINED_SCAN).enumerate() {
            let mut best = [f64::INFINITY; 2];
            for s in self.score(self.prompt_stage(req), req, &l.0, &Claims::default(), Bind::Now).iter().filter(|s| !s.busy) {
                let c = s.terms.logit;
                if c < best[0] {
                    best = [c, best[0]];
                } else if c < best[1] {
                    best[1] = c;
                }
            }
            let gap = if best[1].is_finite() { best[1] - best[0] } else { 0.0 };
            if gap > pick.1 {
                pick = (i, gap);
            }
        }
        pick.0
    }

    /// The stage that runs this prompt: prefill when disaggregated, else aggregated.
    fn prompt_stage(&self, req: &RoutingRequest) -> Stage {
        if self.disaggregates(req) {
            Stage::Prefill
        } else {
            Stage::Aggregated
        }
    }

    /// The workers that would run this prompt: the prefill pool when disaggregated, else the
    /// aggregated pool (the router queue's gate and claims are over these).
    fn prompt_pool<'a>(&'a self, req: &'a RoutingRequest) -> impl Iterator<Item = &'a Worker> + 'a {
        let stage = self.prompt_stage(req);
        self.workers.iter().filter(move |w| stage.admits(w.role) && req.allows(w.endpoint))
    }

    fn worker_saturated(&self, w: &Worker, threshold: f64) -> bool {
        let cap = self.capacity(w);
        w.ranks().all(|r| queue_saturated(threshold, &cap, &self.active.load(&r)))
    }

    /// The router queue's gate (`DYN_ROUTER_QUEUE_THRESHOLD`): every worker that would run this
    /// prompt (the prefill pool when disaggregated) has every rank saturated. No eligible
    /// worker is not saturation: `route` answers that.
    pub fn queue_saturated(&self, req: &RoutingRequest, threshold: f64) -> bool {
        let mut eligible = self.prompt_pool(req).peekable();
        eligible.peek().is_some() && eligible.all(|w| self.worker_saturated(w, threshold))
    }

    /// The gate for a request waiting behind blocked ones: whether a worker of its pool that
    /// no blocked request ahead claims has room. A pool wholly claimed is closed; an empty one
    /// open (`route` answers that).
    pub fn queue_gate_open(&self, req: &RoutingRequest, threshold: f64, claims: &Claims) -> bool {
        let mut any = false;
        let open = self.prompt_pool(req).any(|w| {
            any = true;
            !claims.holds(w.id) && !self.worker_saturated(w, threshold)
        });
        open || !any
    }

    /// A blocked request claims its pool (the head-of-line rule, `sched::queue::Claims`).
    pub fn claim_pool(&self, req: &RoutingRequest, claims: &mut Claims) {
        claims.claim(self.prompt_pool(req).map(|w| w.id));
    }

    /// The prompt's cache lookup, for a request that waits (`wspt`).
    pub fn lookup(&self, req: &RoutingRequest) -> Lookup {
        Lookup(self.query(req))
    }

    /// Recomputes a kept lookup's cached prefixes from the current cache state (its hashes
    /// do not change).
    pub fn refresh(&self, l: &mut Lookup) {
        l.0.overlaps = self.overlaps(&l.0.hashes);
    }

    /// Prompt tokens not on the device cache of the eligible rank holding the most (a waiting
    /// request's `wspt` weight), from its lookup.
    pub fn uncached_tokens(&self, req: &RoutingRequest, l: &Lookup) -> u64 {
        let q = &l.0;
        let bs = self.kv.block_size as u64;
        let best = if q.overlaps.is_empty() {
            0
        } else {
            self.workers
                .iter()
                .filter(|w| req.allows(w.endpoint))
                .flat_map(|w| w.ranks())
                .map(|r| q.overlaps.get(&r).map_or(0, |o| o.device as u64 * bs))
                .max()
                .unwrap_or(0)
        };
        q.isl - best.min(q.isl)
    }

    /// Picks and books a worker (and a prefill worker when disaggregated) for a request that
    /// carries a body. A rejected request books nothing.
    pub fn route(&mut self, req: &RoutingRequest, now: Instant, rng: &mut impl Rng) -> Result<Decision, RouteError> {
        self.route_waiting(req, None, &Claims::default(), now, rng)
    }

    /// [`route`](Self::route) for a request leaving the router queue: with the lookup it
    /// kept (else a fresh one), and not onto workers claimed by blocked requests ahead of it.
    pub fn route_waiting(&mut self, req: &RoutingRequest, kept: Option<&Lookup>, claims: &Claims, now: Instant, rng: &mut impl Rng) -> Result<Decision, RouteError> {
        self.route_kept(req, kept, claims, Bind::Now, now, rng)
    }

    /// Routes the request only if the rank it picks now (the one that would run its prompt)
    /// takes it as `bind` says (late binding, `DYN_EPP_QUEUE_LATE_BINDING`); else books
    /// nothing and answers [`RouteError::Overloaded`] (it waits in the router queue).
    pub fn route_binding(&mut self, req: &RoutingRequest, kept: Option<&Lookup>, bind: Bind, now: Instant, rng: &mut impl Rng) -> Result<Decision, RouteError> {
        self.route_kept(req, kept, &Claims::default(), bind, now, rng)
    }

    /// Late binding's step of a dispatch round for the waiting request `ticket`: its decision
    /// if its pick takes it (`Bind::Released`), `None` if it stays (then it is not scored again
    /// this round) or the round scores no more.
    #[allow(clippy::too_many_arguments)]
    pub fn release_late(&mut self, round: &mut LateRound, ticket: Ticket, req: &RoutingRequest, kept: Option<&Lookup>, threshold: f64, now: Instant, rng: &mut impl Rng) -> Option<Result<Decision, RouteError>> {
        if !round.scores(ticket) {
            return None;
        }
        match self.route_binding(req, kept, Bind::Released { threshold }, now, rng) {
            Err(RouteError::Overloaded) => {
                round.stay(ticket);
                None
            }
            d => Some(d),
        }
    }

    /// How a request arriving at the router queue may be routed at once: as usual when nobody
    /// waits and a worker of its pool has room; otherwise, under late binding, only by joining
    /// a pass; `None`: it waits.
    pub fn arrival_bind(&self, req: &RoutingRequest, others_wait: bool, threshold: f64, late: bool) -> Option<Bind> {
        if !others_wait && !self.queue_saturated(req, threshold) {
            Some(Bind::Now)
        } else {
            late.then_some(Bind::Joining)
        }
    }

    fn route_kept(&mut self, req: &RoutingRequest, kept: Option<&Lookup>, claims: &Claims, bind: Bind, now: Instant, rng: &mut impl Rng) -> Result<Decision, RouteError> {
        self.expire(now);
        let fresh;
        let q = match kept {
            Some(l) => &l.0,
            None => {
                fresh = self.query(req);
                &fresh
            }
        };
        self.route_query(req, q, claims, bind, now, rng)
    }

    /// Whether the rank that would run a prompt takes it now under `bind`: it *joins* when
    /// the prompts booked there end in a partial chunked-prefill pass with room for all its
    /// uncached tokens (it then delays none of them by a pass); a released request also goes
    /// to a rank with room (not saturated at the queue's threshold).
    fn binds(&self, s: &Scored, isl: u64, bind: Bind) -> bool {
        let (threshold, released) = match bind {
            Bind::Now => return true,
            Bind::Joining => (0.0, false),
            Bind::Released { threshold } => (threshold, true),
        };
        let new = s.prediction.map_or(isl - s.terms.cached_tokens.min(isl), |p| p.inputs.new_tokens);
        let tail = s.load.active_prefill_tokens % s.batch_tokens.max(1);
        let joins = tail > 0 && s.batch_tokens - tail >= new;
        joins || released && self.workers.iter().find(|w| w.id == s.target.worker.id).is_some_and(|w| !queue_saturated(threshold, &self.capacity(w), &self.active.load(&s.target.worker)))
    }

    fn route_query(&mut self, req: &RoutingRequest, q: &Query, claims: &Claims, bind: Bind, now: Instant, rng: &mut impl Rng) -> Result<Decision, RouteError> {
        if self.sched.policy == RoutingPolicy::PredictedTtft {
            self.refresh_long_decodes(now);
        }
        let disagg = self.disaggregates(req);
        if !disagg && self.sched.enforce_disagg {
            return Err(RouteError::PrefillUnavailable);
        }
        let prefill = if disagg { Some(self.choose(req, &self.score(Stage::Prefill, req, q, claims, bind), rng)?) } else { None };
        let stage = if disagg { Stage::Decode } else { Stage::Aggregated };
        let decode = self.choose(req, &self.score(stage, req, q, claims, bind), rng)?;
        if !self.binds(prefill.as_ref().unwrap_or(&decode), q.isl, bind) {
            return Err(RouteError::Overloaded);
        }

        // The worker that runs the prompt books its prefill tokens; the decode side of a
        // disaggregated request books only its blocks.
        let cached = |s: &Scored| s.terms.cached_tokens.min(q.isl);
        let sched = self.sched;
        let prefill_tokens = |s: &Scored, st: Stage| {
            if st.rules(&sched).weights.track_prefill_tokens { q.isl - cached(s) } else { 0 }
        };
        let rules = stage.rules(&self.sched);
        let random_blocks: Vec<u64>;
        let decode_blocks: &[u64] = match (rules.track_active_blocks, rules.assume_kv_reuse) {
            (false, _) => &[],
            (true, true) => q.keys(),
            (true, false) => {
                random_blocks = (0..q.keys().len()).map(|_| rng.random()).collect();
                &random_blocks
            }
        };
        let booking = BookingId(self.next_booking);
        self.next_booking += 1;
        let decode_seq = self.book(booking, "", decode.target.worker, decode_blocks, prefill_tokens(&decode, stage), q.isl, req.osl, now);
        let prefill_seq = prefill.map(|p| {
            self.book(booking, ":prefill", p.target.worker, &[], prefill_tokens(&p, Stage::Prefill), q.isl, None, now)
        });
        let cache_holder = prefill.unwrap_or(decode);
        let holder = cache_holder.target.worker;
        let bs = self.kv.block_size as u64;
        // Without token ids there is nothing to remember.
        let lease = match &mut self.kv.predicted {
            Some(p) if q.isl > 0 => p.acquire(holder, booking.0, &q.hashes, usize::from(!q.isl.is_multiple_of(bs)), now).then_some(Lease { rank: holder, isl: q.isl }),
            _ => None,
        };
        // Under `predicted-ttft` every candidate carries its prediction.
        let seen = cache_holder.prediction.zip(decode.prediction).map(|(predicted, d)| Observation {
            dispatched: now,
            prefill: (holder, predicted.inputs, predicted),
            decode: (decode.target.worker, d.inputs),
            first_token: None,
            generated: 0,
        });
        if let (Some(_), Some(osl)) = (&seen, req.osl) {
            self.active.set_long_decode(decode_seq, long_decode_weight(osl, 0.0));
        }
        self.bookings.insert(booking, Booking { decode: decode_seq, prefill: prefill_seq, osl: req.osl, lease, seen });
        Ok(Decision {
            decode: decode.target,
            prefill: prefill.map(|p| p.target),
            mode: if disagg { RoutingMode::Disaggregated } else { RoutingMode::Aggregated },
            booking,
            predicted_cached_tokens: cached(&cache_holder),
        })
    }

    /// Adds one active sequence (and tells the peers); returns its id.
    #[allow(clippy::too_many_arguments)]
    fn book(
        &mut self,
        booking: BookingId,
        part: &str,
        worker: WorkerRank,
        blocks: &[u64],
        prefill_tokens: u64,
        isl: u64,
        osl: Option<u32>,
        now: Instant,
    ) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.active.add(seq, ActiveBooking { worker, blocks, prefill_tokens, isl }, now);
        if let Some(out) = &mut self.outbox {
            out.push(PeerEvent {
                request_id: format!("{}{part}", booking.0),
                worker,
                data: PeerEventData::Add {
                    blocks: (!blocks.is_empty()).then(|| blocks.to_vec()),
                    prefill_tokens,
                    expected_output_tokens: osl,
                },
            });
        }
        seq
    }

    /// Tells the peers that our active sequence `seq` changed.
    fn publish(&mut self, booking: BookingId, part: &str, seq: u64, data: PeerEventData) {
        let Some(out) = &mut self.outbox else { return };
        if let Some(worker) = self.active.worker_of(seq) {
            out.push(PeerEvent { request_id: format!("{}{part}", booking.0), worker, data });
        }
    }

    /// Picks a worker for a body-less request (`GET /v1/models`): the least loaded; nothing
    /// is booked.
    pub fn pick_any(&self, req: &RoutingRequest, rng: &mut impl Rng) -> Result<Target, RouteError> {
        let q = Query { hashes: Vec::new(), seq: None, isl: 0, overlaps: FxHashMap::default() };
        self.choose(req, &self.score(Stage::Aggregated, req, &q, &Claims::default(), Bind::Now), rng).map(|s| s.target)
    }

    /// The first non-empty response chunk arrived: prefill is done (and a prefill worker's
    /// part of the request is over). The prefilling rank's TTFT model learns from it; the
    /// prediction made at dispatch is returned beside the actual time (first chunk only).
    pub fn on_first_token(&mut self, booking: BookingId, now: Instant) -> Option<TtftSample> {
        let b = self.bookings.get_mut(&booking)?;
        let sample = b.seen.as_mut().filter(|s| s.first_token.is_none()).map(|seen| {
            seen.first_token = Some(now);
            let (worker, inputs, predicted) = seen.prefill;
            let actual_ms = now.saturating_duration_since(seen.dispatched).as_secs_f64() * 1e3;
            // Isolated: nothing booked there at dispatch, nor since (this request is the
            // rank's only one): a later arrival shares its passes and slows it.
            let isolated = inputs.isolated() && self.active.load(&worker).active_requests <= 1;
            self.latency.observe_ttft(worker, &inputs, actual_ms, isolated, now);
            TtftSample { worker, predicted_ms: predicted.ttft_ms, actual_ms }
        });
        let (decode, prefill) = (b.decode, b.prefill.take());
        // The prefill worker's request is over: so is its hold on the prompt's blocks.
        let lease = if prefill.is_some() { b.lease.take() } else { None };
        self.publish(booking, "", decode, PeerEventData::PrefillCompleted);
        self.active.mark_prefill_completed(decode);
        if let Some(p) = prefill {
            self.publish(booking, ":prefill", p, PeerEventData::Free);
            self.active.free(p);
        }
        self.kv.release(booking, lease);
        sample
    }

    /// Whether [`Router::on_output`] does anything: the server then counts response tokens
    /// (and takes the router's lock per chunk) only when they matter.
    pub fn wants_output(&self) -> bool {
        let lru = !self.kv.settings.use_kv_events && self.kv.settings.approx_policy == ApproxCachePolicy::Lru;
        // The TPOT model learns from the count of streamed tokens.
        lru || self.tracks_output_blocks() || self.sched.policy == RoutingPolicy::PredictedTtft
    }

    /// Output blocks count as decode load (`DYN_ROUTER_TRACK_OUTPUT_BLOCKS`, with active blocks).
    fn tracks_output_blocks(&self) -> bool {
        self.sched.track_output_blocks && self.sched.track_active_blocks
    }

    /// `generated` response tokens have streamed so far: output blocks take room in the cache
    /// model, and count as load with output-block tracking.
    pub fn on_output(&mut self, booking: BookingId, generated: u64) {
        let tracks = self.tracks_output_blocks();
        let Some(b) = self.bookings.get_mut(&booking) else { return };
        if let Some(seen) = &mut b.seen {
            seen.generated = generated;
        }
        let bs = self.kv.block_size as u64;
        if let (Some(l), Some(p)) = (b.lease, &mut self.kv.predicted) {
            let tokens = l.isl + generated;
            p.grow(l.rank, booking.0, (tokens / bs) as usize, usize::from(!tokens.is_multiple_of(bs)));
        }
        if tracks {
            self.active.record_output(b.decode, generated, self.kv.block_size, b.osl);
        }
    }

    /// The response ended, failed or was cancelled: release everything the request held. The
    /// decoding rank's TPOT model learns from the spacing of what streamed.
    pub fn on_end(&mut self, booking: BookingId, now: Instant) {
        let Some(b) = self.bookings.remove(&booking) else { return };
        // (One that ended before its first chunk — cancelled, failed — teaches nothing.)
        if let Some(Observation { first_token: Some(first), decode: (worker, inputs), generated, .. }) = b.seen {
            let ms = now.saturating_duration_since(first).as_secs_f64() * 1e3;
            self.latency.observe_decode(worker, &inputs, generated, ms);
        }
        self.kv.release(booking, b.lease);
        if let Some(p) = b.prefill {
            self.publish(booking, ":prefill", p, PeerEventData::Free);
            self.active.free(p);
        }
        self.publish(booking, "", b.decode, PeerEventData::Free);
        self.active.free(b.decode);
    }

    /// Our booking changes since the last call, for the peers (empty when sync is off).
    pub fn take_peer_events(&mut self) -> Vec<PeerEvent> {
        self.outbox.as_mut().map(std::mem::take).unwrap_or_default()
    }

    /// Applies a peer replica's booking change to our view of the workers' load.
    pub fn apply_peer(&mut self, replica: u64, ev: PeerEvent, now: Instant) {
        let key = (replica, ev.request_id);
        match ev.data {
            PeerEventData::Add { blocks, prefill_tokens, .. } => {
                if self.peer_seqs.contains_key(&key) || !self.workers.iter().any(|w| w.ranks().any(|r| r == ev.worker)) {
                    return;
                }
                let seq = self.next_seq;
                self.next_seq += 1;
                let blocks = blocks.unwrap_or_default();
                let isl = blocks.len() as u64 * self.kv.block_size as u64;
                self.active.add(seq, ActiveBooking { worker: ev.worker, blocks: &blocks, prefill_tokens, isl }, now);
                self.peer_seqs.insert(key, seq);
            }
            PeerEventData::PrefillCompleted => {
                if let Some(&seq) = self.peer_seqs.get(&key) {
                    self.active.mark_prefill_completed(seq);
                }
            }
            PeerEventData::Free => {
                if let Some(seq) = self.peer_seqs.remove(&key) {
                    self.active.free(seq);
                }
            }
        }
    }

    /// A peer replica went silent (or away): its bookings no longer load our view.
    pub fn forget_peer(&mut self, replica: u64) {
        let gone: Vec<(u64, String)> = self.peer_seqs.keys().filter(|(r, _)| *r == replica).cloned().collect();
        for k in gone {
            if let Some(seq) = self.peer_seqs.remove(&k) {
                self.active.free(seq);
            }
        }
    }
}

/// A rank's cached prefix per tier, lower tiers counting only the blocks beyond the faster
/// tiers' prefix (the cost model weighs them 0.75 and 0.25).
fn tiers(o: &Overlap) -> TierOverlap {
    let [dev, host, disk, _] = o.blocks;
    TierOverlap { device: dev, host: host.saturating_sub(dev), disk: disk.saturating_sub(dev.max(host)) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workers::{DpRank, WorkerId};
    use rand::{rngs::SmallRng, SeedableRng};

    fn worker(id: u64, port: u16, role: Role, dp: u32) -> Worker {
        Worker {
            id: WorkerId(id),
            name: format!("w{id}"),
            endpoint: SocketAddr::from(([127, 0, 0, 1], port)),
            role,
            dp_start_rank: 0,
            dp_size: dp,
            total_kv_blocks: None,
            max_num_batched_tokens: None,
            kv_events: None,
        }
    }

    fn router(ws: Vec<Worker>) -> Router {
        let mut r = Router::default();
        r.set_fleet(Fleet { block_size: None, workers: ws });
        r
    }

    #[test]
    fn spreads_by_in_flight_and_frees_on_end() {
        let mut r = router(vec![worker(1, 1, Role::Worker, 1), worker(2, 2, Role::Worker, 2)]);
        let mut rng = SmallRng::seed_from_u64(7);
        let now = Instant::now();
        let ds: Vec<_> = (0..3).map(|_| r.route(&RoutingRequest::default(), now, &mut rng).unwrap()).collect();
        let mut ranks: Vec<_> = ds.iter().map(|d| (d.decode.worker.id.0, d.decode.worker.dp_rank.0)).collect();
        ranks.sort();
        assert_eq!(ranks, vec![(1, 0), (2, 0), (2, 1)]);
        assert_eq!(r.active_requests(), 3);
        for d in &ds {
            r.on_end(d.booking, now);
            r.on_end(d.booking, now); // a second end is harmless
        }
        assert_eq!(r.active_requests(), 0);
        assert!(r.active.is_empty());
    }

    #[test]
    fn ties_are_broken_uniformly() {
        let r = router((1..=4).map(|i| worker(i, i as u16, Role::Worker, 1)).collect());
        let mut rng = SmallRng::seed_from_u64(1);
        let mut counts = HashMap::new();
        for _ in 0..4000 {
            *counts.entry(r.pick_any(&RoutingRequest::default(), &mut rng).unwrap().worker.id).or_insert(0) += 1;
        }
        assert_eq!(counts.len(), 4);
        assert!(counts.values().all(|&c| (800..1200).contains(&c)), "{counts:?}");
    }

    #[test]
    fn subset_restricts_and_empty_match_is_an_error() {
        let r = router(vec![worker(1, 1, Role::Worker, 1), worker(2, 2, Role::Worker, 1)]);
        let mut rng = SmallRng::seed_from_u64(1);
        let with = |s: &str| RoutingRequest { subset: Some(vec![EndpointMatch::parse(s).unwrap()]), ..Default::default() };
        let only2 = with("127.0.0.1:2");
        for _ in 0..20 {
            assert_eq!(r.pick_any(&only2, &mut rng).unwrap().worker.id, WorkerId(2));
        }
        let host = with("127.0.0.1");
        assert!(r.pick_any(&host, &mut rng).is_ok());
        let none = with("10.9.9.9:1");
        assert_eq!(r.pick_any(&none, &mut rng), Err(RouteError::SubsetMatchesNone));
    }

    #[test]
    fn prefill_workers_are_not_picked_and_empty_fleet_errors() {
        let mut rng = SmallRng::seed_from_u64(1);
        assert_eq!(Router::default().pick_any(&RoutingRequest::default(), &mut rng), Err(RouteError::NoWorkers));
        let r = router(vec![worker(1, 1, Role::Prefill, 1), worker(2, 2, Role::Decode, 1)]);
        for _ in 0..10 {
            let t = r.pick_any(&RoutingRequest::default(), &mut rng).unwrap();
            assert_eq!(t.worker, WorkerRank { id: WorkerId(2), dp_rank: DpRank(0) });
        }
        // Found by the workers-file long run: a prefill-only fleet was refused as "no workers
        // are known yet".
        let mut prefill_only = router(vec![worker(1, 1, Role::Prefill, 4)]);
        assert_eq!(prefill_only.route(&RoutingRequest::default(), Instant::now(), &mut rng).unwrap_err(), RouteError::NoDecodeWorkers);
        assert_eq!(prefill_only.active_requests(), 0);
    }

    #[test]
    fn fleet_change_drops_bookings_of_departed_workers() {
        let mut r = router(vec![worker(1, 1, Role::Worker, 1)]);
        let mut rng = SmallRng::seed_from_u64(1);
        r.route(&RoutingRequest::default(), Instant::now(), &mut rng).unwrap();
        r.set_fleet(Fleet { block_size: None, workers: vec![worker(2, 2, Role::Worker, 1)] });
        assert_eq!(r.active_requests(), 0);
    }

    // ---------------------------------------------------------------- KV-aware routing

    use crate::kv::events::{ExternalBlockHash, KvCacheEvent, KvCacheEventData, KvCacheStoreData, KvCacheStoredBlockData, StorageTier};
    use crate::kv::hash::XXH3_SEED;

    fn store_event(worker: u64, tier: StorageTier, tokens: &[u32], bs: usize) -> RouterEvent {
        let blocks = local_block_hashes(tokens, bs, XXH3_SEED)
            .into_iter()
            .enumerate()
            .map(|(i, h)| KvCacheStoredBlockData { block_hash: ExternalBlockHash(1000 + i as u64), tokens_hash: h, mm_extra_info: None })
            .collect();
        RouterEvent {
            worker_id: WorkerId(worker),
            storage_tier: tier,
            residency_domain: None,
            event: KvCacheEvent { event_id: 1, data: KvCacheEventData::Stored(KvCacheStoreData { parent_hash: None, start_position: None, blocks }), dp_rank: 0 },
        }
    }

    fn tokens(n: u32) -> RoutingRequest {
        RoutingRequest { tokens: (0..n).collect(), ..Default::default() }
    }

    #[test]
    fn overlap_beats_load_and_load_breaks_overlap_ties() {
        let mut r = router((1..=3).map(|i| worker(i, i as u16, Role::Worker, 1)).collect());
        let mut rng = SmallRng::seed_from_u64(3);
        let now = Instant::now();
        r.apply(&store_event(2, StorageTier::Device, &(0..64).collect::<Vec<_>>(), 16));
        r.apply(&store_event(3, StorageTier::Device, &(0..32).collect::<Vec<_>>(), 16));
        // Worker 2 holds all 4 blocks: it wins even while busier than the others.
        for _ in 0..5 {
            assert_eq!(r.route(&tokens(70), now, &mut rng).unwrap().decode.worker.id, WorkerId(2));
        }
        // A request of 2 blocks: workers 2 and 3 tie on overlap; 3 is idle.
        assert_eq!(r.route(&tokens(32), now, &mut rng).unwrap().decode.worker.id, WorkerId(3));
        // Another salt hashes differently: no overlap anywhere, least loaded wins.
        let salted = RoutingRequest { cache_salt: Some("tenant-a".into()), ..tokens(64) };
        assert_eq!(r.route(&salted, now, &mut rng).unwrap().decode.worker.id, WorkerId(1));
    }

    /// Late binding, by hand: two workers with a 64-token pass, worker 2 caching a 320-token
    /// prefix. A prompt joins the pass a booked prompt ends in when its uncached tokens fit the
    /// rest of that pass; one that does not fit waits for the rank it prefers though worker 1
    /// is idle, and goes there once that rank has room (threshold 0: nothing left to prefill).
    #[test]
    fn late_binding_joins_a_pass_or_waits_for_the_preferred_rank() {
        let batch = |id| Worker { max_num_batched_tokens: Some(64), ..worker(id, id as u16, Role::Worker, 1) };
        let mut r = router(vec![batch(1), batch(2)]);
        let mut rng = SmallRng::seed_from_u64(1);
        let now = Instant::now();
        r.apply(&store_event(2, StorageTier::Device, &(0..320).collect::<Vec<_>>(), 16));
        let w2 = WorkerRank { id: WorkerId(2), dp_rank: DpRank(0) };
        // 16 uncached tokens booked on worker 2: its last pass has 48 left.
        let a = r.route(&tokens(336), now, &mut rng).unwrap();
        assert_eq!((a.decode.worker, r.load(&w2).active_prefill_tokens), (w2, 16));
        // 49 uncached do not fit the 48; 32 do: it joins (16 + 32 booked, 16 left).
        assert_eq!(r.route_binding(&tokens(369), None, Bind::Joining, now, &mut rng), Err(RouteError::Overloaded));
        let j = r.route_binding(&tokens(352), None, Bind::Joining, now, &mut rng).unwrap();
        assert_eq!((j.decode.worker, r.load(&w2).active_prefill_tokens), (w2, 48));
        // 64 uncached do not fit the 16 left: it neither joins nor, released, binds — worker 2
        // is saturated and it is still the pick (routed at once it goes there).
        let k: RoutingRequest = RoutingRequest { tokens: (0..320).chain(1000..1064).collect(), ..Default::default() };
        assert_eq!(r.route_binding(&k, None, Bind::Joining, now, &mut rng), Err(RouteError::Overloaded));
        assert_eq!(r.route_binding(&k, None, Bind::Released { threshold: 0.0 }, now, &mut rng), Err(RouteError::Overloaded));
        assert_eq!(r.active_requests(), 2, "a request held books nothing");
        // Above a threshold of one pass (64 tokens) worker 2 has room: released, it goes.
        for bind in [Bind::Released { threshold: 1.0 }, Bind::Now] {
            let d = r.route_binding(&k, None, bind, now, &mut rng).unwrap();
            assert_eq!(d.decode.worker, w2, "{bind:?}");
            r.on_end(d.booking, now);
        }
        // Both booked prompts prefilled: worker 2 has room, and the held request binds there.
        r.on_first_token(a.booking, now);
        r.on_first_token(j.booking, now);
        assert_eq!(r.load(&w2).active_prefill_tokens, 0);
        assert_eq!(r.route_binding(&k, None, Bind::Joining, now, &mut rng), Err(RouteError::Overloaded), "nothing booked: no pass to join");
        assert_eq!(r.route_binding(&k, None, Bind::Released { threshold: 0.0 }, now, &mut rng).unwrap().decode.worker, w2);
    }

    #[test]
    fn the_most_constrained_of_a_group_loses_most_without_its_best_worker() {
        let mut r = router(vec![worker(1, 1, Role::Worker, 1), worker(2, 2, Role::Worker, 1)]);
        let a = tokens(128);
        let b = RoutingRequest { tokens: (1000..1032).collect(), ..Default::default() };
        let c = RoutingRequest { tokens: (2000..2032).collect(), ..Default::default() };
        r.apply(&store_event(1, StorageTier::Device, &a.tokens, 16));
        r.apply(&store_event(2, StorageTier::Device, &b.tokens[..16], 16));
        // Dynamo's cost on idle workers (blocks of 16): prompt blocks − cached + prompt blocks.
        // a: worker 1 8 − 8 + 8 = 8, worker 2 16: gap 8; b: worker 2 2 − 1 + 2 = 3 against 4:
        // gap 1; c: 4 and 4: gap 0.
        let pick = |g: &[&RoutingRequest]| {
            let lookups: Vec<Lookup> = g.iter().map(|q| r.lookup(q)).collect();
            r.most_constrained(g.iter().copied().zip(&lookups))
        };
        assert_eq!(pick(&[&c, &b, &a]), 2);
        assert_eq!(pick(&[&c, &b]), 1);
        assert_eq!(pick(&[&c, &c]), 0, "a tie: the earlier");
        assert_eq!(pick(&[]), 0);
        // Only the first 32 are weighed (bounded work under the lock).
        let many: Vec<&RoutingRequest> = std::iter::repeat_n(&c, 31).chain([&a]).collect();
        assert_eq!(pick(&many), 31);
        let more: Vec<&RoutingRequest> = std::iter::repeat_n(&c, 32).chain([&a]).collect();
        assert_eq!(pick(&more), 0);
        // One worker: no request has a second choice.
        let mut one = router(vec![worker(1, 1, Role::Worker, 1)]);
        one.apply(&store_event(1, StorageTier::Device, &a.tokens, 16));
        let (lc, la) = (one.lookup(&c), one.lookup(&a));
        assert_eq!(one.most_constrained([(&c, &lc), (&a, &la)]), 0);
    }

    #[test]
    fn lower_tiers_count_less_than_the_device() {
        let mut r = router((1..=2).map(|i| worker(i, i as u16, Role::Worker, 1)).collect());
        let mut rng = SmallRng::seed_from_u64(3);
        let t: Vec<u32> = (0..64).collect();
        r.apply(&store_event(1, StorageTier::Device, &t[..48], 16)); // 3 device blocks = 3
        r.apply(&store_event(2, StorageTier::HostPinned, &t, 16)); // 4 host blocks = 3.0
        r.apply(&store_event(2, StorageTier::Device, &t[..16], 16)); // + 1 device → 1 + 0.75·3 = 3.25
        assert_eq!(r.route(&tokens(64), Instant::now(), &mut rng).unwrap().decode.worker.id, WorkerId(2));
    }

    #[test]
    fn approximate_mode_sends_a_repeated_prompt_to_the_same_worker_until_the_ttl() {
        let settings = KvSettings { use_kv_events: false, approx_ttl: Duration::from_secs(120), ..Default::default() };
        let mut r = Router::new(settings, SchedSettings::default());
        r.set_fleet(Fleet { block_size: Some(16), workers: (1..=4).map(|i| worker(i, i as u16, Role::Worker, 1)).collect() });
        let mut rng = SmallRng::seed_from_u64(9);
        let t0 = Instant::now();
        let first = r.route(&tokens(256), t0, &mut rng).unwrap();
        r.on_end(first.booking, t0);
        for i in 1..20 {
            let d = r.route(&tokens(256), t0 + Duration::from_secs(i), &mut rng).unwrap();
            assert_eq!(d.decode.worker, first.decode.worker);
            r.on_end(d.booking, t0);
        }
        // Events are off: an event changes nothing.
        r.apply(&store_event(9, StorageTier::Device, &(0..256).collect::<Vec<_>>(), 16));
        // Long after the last decision, the memory is gone: choices spread again.
        let mut seen = std::collections::HashSet::new();
        for i in 0..40 {
            let later = t0 + Duration::from_secs(1000 + 1000 * i);
            let d = r.route(&tokens(256), later, &mut rng).unwrap();
            r.on_end(d.booking, later);
            seen.insert(d.decode.worker.id);
        }
        assert!(seen.len() > 1, "{seen:?}");
    }

    /// Approximate `lru` mode; every worker declares `blocks` of KV capacity.
    fn lru_router(ws: Vec<Worker>, blocks: u64, expiry: Duration) -> Router {
        let kv = KvSettings { use_kv_events: false, approx_policy: ApproxCachePolicy::Lru, ..Default::default() };
        let ws = ws.into_iter().map(|w| Worker { total_kv_blocks: Some(blocks), ..w }).collect();
        let mut r = Router::new(kv, SchedSettings { expiry, ..Default::default() });
        r.set_fleet(Fleet { block_size: Some(16), workers: ws });
        r
    }

    fn cached_on(r: &Router, id: u64, tokens: &[u32]) -> u32 {
        let q = RoutingRequest { tokens: tokens.to_vec(), ..Default::default() };
        let (decode, prefill) = r.explain(&q);
        decode.iter().chain(&prefill).find(|s| s.target.worker.id == WorkerId(id)).map_or(0, |s| s.load.overlap.device)
    }

    #[test]
    fn response_tokens_are_wanted_by_the_lru_model_and_by_output_tracking_only() {
        let lru = KvSettings { use_kv_events: false, approx_policy: ApproxCachePolicy::Lru, ..Default::default() };
        let tracking = SchedSettings { track_output_blocks: true, ..Default::default() };
        assert!(!Router::new(KvSettings::default(), SchedSettings::default()).wants_output());
        assert!(Router::new(lru, SchedSettings::default()).wants_output());
        assert!(!Router::new(KvSettings { use_kv_events: true, ..lru }, SchedSettings::default()).wants_output());
        assert!(Router::new(KvSettings::default(), tracking).wants_output());
        assert!(!Router::new(KvSettings::default(), SchedSettings { track_active_blocks: false, ..tracking }).wants_output());
    }

    #[test]
    fn lru_pins_a_prompt_until_its_prefill_worker_is_done_with_it() {
        // Prefill worker 1 holds 16 blocks: P and Q (16 each) both run there, pinned over
        // capacity. P's first chunk ends its prefill: P is released and evicted, Q stays.
        let mut r = lru_router(vec![worker(1, 1, Role::Prefill, 1), worker(2, 2, Role::Decode, 1)], 16, Duration::from_secs(300));
        let mut rng = SmallRng::seed_from_u64(1);
        let now = Instant::now();
        let (p, q): (Vec<u32>, Vec<u32>) = ((0..256).collect(), (1000..1256).collect());
        let dp = r.route(&RoutingRequest { tokens: p.clone(), ..Default::default() }, now, &mut rng).unwrap();
        let dq = r.route(&RoutingRequest { tokens: q.clone(), ..Default::default() }, now, &mut rng).unwrap();
        assert_eq!((cached_on(&r, 1, &p), cached_on(&r, 1, &q), cached_on(&r, 2, &p)), (16, 16, 0));
        r.on_first_token(dp.booking, now);
        assert_eq!((cached_on(&r, 1, &p), cached_on(&r, 1, &q)), (0, 16));
        // The end of a request whose prefill is over releases nothing more.
        r.on_end(dp.booking, now);
        r.on_end(dq.booking, now);
        assert_eq!((cached_on(&r, 1, &p), cached_on(&r, 1, &q)), (0, 16));
    }

    #[test]
    fn lru_releases_a_booking_that_expires_without_an_end() {
        // One worker of 16 blocks; P's end never comes. Until P's booking expires, Q cannot
        // evict it (Q goes itself at its end); after, the next decision's sweep releases P,
        // and Q's blocks push it out.
        let mut r = lru_router(vec![worker(1, 1, Role::Worker, 1)], 16, Duration::from_secs(1));
        let mut rng = SmallRng::seed_from_u64(1);
        let t0 = Instant::now();
        let (p, q): (Vec<u32>, Vec<u32>) = ((0..256).collect(), (1000..1256).collect());
        r.route(&RoutingRequest { tokens: p.clone(), ..Default::default() }, t0, &mut rng).unwrap();
        let dq = r.route(&RoutingRequest { tokens: q.clone(), ..Default::default() }, t0, &mut rng).unwrap();
        r.on_end(dq.booking, t0);
        assert_eq!((cached_on(&r, 1, &p), cached_on(&r, 1, &q)), (16, 0));
        let later = t0 + Duration::from_secs(2);
        let dq = r.route(&RoutingRequest { tokens: q.clone(), ..Default::default() }, later, &mut rng).unwrap();
        assert_eq!(r.active_requests(), 1);
        r.on_end(dq.booking, later);
        assert_eq!((cached_on(&r, 1, &p), cached_on(&r, 1, &q)), (0, 16));
    }

    #[test]
    fn fleet_changes_drop_departed_workers_blocks_and_block_size_changes_reset() {
        let mut r = router((1..=2).map(|i| worker(i, i as u16, Role::Worker, 1)).collect());
        r.apply(&store_event(1, StorageTier::Device, &(0..64).collect::<Vec<_>>(), 16));
        r.apply(&store_event(2, StorageTier::Device, &(100..164).collect::<Vec<_>>(), 16));
        assert_eq!(r.kv_blocks(), 8);
        r.set_fleet(Fleet { block_size: None, workers: vec![worker(2, 2, Role::Worker, 1)] });
        assert_eq!(r.kv_blocks(), 4);
        assert_eq!(r.block_size(), 16);
        r.set_fleet(Fleet { block_size: Some(32), workers: vec![worker(2, 2, Role::Worker, 1)] });
        assert_eq!((r.block_size(), r.kv_blocks()), (32, 0));
    }

    // ---------------------------------------------------------------- disaggregation, peers

    #[test]
    fn prefill_load_is_booked_until_the_first_chunk_so_prefills_spread() {
        // Upstream's EPP left the prefill pick unbooked and sent 83 prefills to one worker.
        let mut r = router(vec![worker(1, 1, Role::Prefill, 1), worker(2, 2, Role::Prefill, 1), worker(3, 3, Role::Decode, 1)]);
        let mut rng = SmallRng::seed_from_u64(4);
        let now = Instant::now();
        let mut per = HashMap::new();
        let mut ds = Vec::new();
        for i in 0..10u32 {
            let req = RoutingRequest { tokens: (i * 1000..i * 1000 + 64).collect(), ..Default::default() };
            let d = r.route(&req, now, &mut rng).unwrap();
            assert_eq!((d.mode, d.decode.worker.id), (RoutingMode::Disaggregated, WorkerId(3)));
            *per.entry(d.prefill.unwrap().worker.id).or_insert(0) += 1;
            ds.push(d);
        }
        assert_eq!(per.values().copied().collect::<Vec<_>>(), vec![5, 5], "{per:?}");
        let p1 = WorkerRank { id: WorkerId(1), dp_rank: DpRank(0) };
        let d3 = WorkerRank { id: WorkerId(3), dp_rank: DpRank(0) };
        assert_eq!(r.load(&p1).active_prefill_tokens, 5 * 64);
        // The decode side books blocks, never prefill tokens.
        assert_eq!((r.load(&d3).active_prefill_tokens, r.load(&d3).active_decode_blocks), (0, 40.0));
        for d in &ds {
            r.on_first_token(d.booking, now);
        }
        assert_eq!(r.load(&p1), RankLoad::default());
        assert_eq!(r.load(&d3).active_requests, 10);
        for d in &ds {
            r.on_end(d.booking, now);
        }
        assert_eq!(r.load(&d3), RankLoad::default());
        assert_eq!(r.active_requests(), 0);
    }

    #[test]
    fn the_cost_policy_predicts_and_learns_nothing() {
        // The default path pays for no latency model: no prediction to report, no samples.
        let mut r = router(vec![worker(1, 1, Role::Worker, 1), worker(2, 2, Role::Worker, 1)]);
        let mut rng = SmallRng::seed_from_u64(1);
        let now = Instant::now();
        for _ in 0..5 {
            let d = r.route(&tokens(64), now, &mut rng).unwrap();
            assert_eq!(r.on_first_token(d.booking, now + Duration::from_millis(50)), None);
            r.on_output(d.booking, 10);
            r.on_end(d.booking, now + Duration::from_millis(100));
        }
        assert!(r.workers().iter().flat_map(Worker::ranks).all(|w| !r.has_latency_samples(&w)));
        assert_eq!(r.fleet_latency_model().ttft.samples(), 0);
    }

    #[test]
    fn predicted_ttft_disaggregated_prefill_by_ttft_decode_by_time_per_output_token() {
        // Prefill worker 1 is 3× slower to a first token than 2; decode worker 3 is 3× slower
        // per output token than 4 (made-up timings, fed through the lifecycle calls). Requests
        // one at a time, so load never tells the workers apart.
        let sched = SchedSettings { policy: RoutingPolicy::PredictedTtft, ..Default::default() };
        let mut r = Router::new(KvSettings::default(), sched);
        let ws = vec![worker(1, 1, Role::Prefill, 1), worker(2, 2, Role::Prefill, 1), worker(3, 3, Role::Decode, 1), worker(4, 4, Role::Decode, 1)];
        r.set_fleet(Fleet { block_size: Some(16), workers: ws });
        let mut rng = SmallRng::seed_from_u64(11);
        let t0 = Instant::now();
        let ms = |x: f64| Duration::from_secs_f64(x / 1e3);
        let mut late = HashMap::new();
        for i in 0..200u32 {
            let now = t0 + Duration::from_secs(10 * i as u64);
            let d = r.route(&RoutingRequest { tokens: (i * 1000..i * 1000 + 512).collect(), ..Default::default() }, now, &mut rng).unwrap();
            let (p, dec) = (d.prefill.unwrap().worker.id.0, d.decode.worker.id.0);
            let ttft = if p == 1 { 150.0 } else { 50.0 };
            let tpot = if dec == 3 { 30.0 } else { 10.0 };
            r.on_first_token(d.booking, now + ms(ttft));
            r.on_output(d.booking, 100);
            r.on_end(d.booking, now + ms(ttft + 99.0 * tpot));
            if i >= 100 {
                *late.entry(p).or_insert(0) += 1;
                *late.entry(dec).or_insert(0) += 1;
            }
        }
        // After the first hundred, the faster of each pool takes (nearly) everything.
        assert!(late.get(&2).copied().unwrap_or(0) >= 95 && late.get(&4).copied().unwrap_or(0) >= 95, "{late:?}");
    }

    #[test]
    fn a_prompt_is_kept_out_of_the_pass_that_ends_a_booked_prompts_prefill() {
        // The prior model: 25 ms a pass, 400 ms per 4 k prompt tokens. Worker 2 runs ten
        // decoding requests; worker 1 one prompt of 1,000 tokens. A prompt of 3,000 tokens:
        // on 2, 325 ms + the stall guard 0.1 × 10 × 300 = 625; on 1 while the booked prompt is
        // prefilling, 425 + the guard 30 + the 300 ms its tokens add to that prompt's pass = 755;
        // once that prompt's first chunk came, 325 + 30 = 355.
        let sched = SchedSettings { policy: RoutingPolicy::PredictedTtft, ..Default::default() };
        let on = |port: u16, from: u32, n: u32| RoutingRequest {
            tokens: (from..from + n).collect(),
            subset: Some(vec![EndpointMatch::Exact(SocketAddr::from(([127, 0, 0, 1], port)))]),
            ..Default::default()
        };
        let prompt = RoutingRequest { tokens: (0..3000).collect(), ..Default::default() };
        let mut rng = SmallRng::seed_from_u64(5);
        let now = Instant::now();
        for prefilled in [false, true] {
            let mut r = Router::new(KvSettings::default(), sched);
            r.set_fleet(Fleet { block_size: Some(16), workers: vec![worker(1, 1, Role::Worker, 1), worker(2, 2, Role::Worker, 1)] });
            for i in 0..10 {
                let d = r.route(&on(2, 100_000 + i * 64, 64), now, &mut rng).unwrap();
                r.on_first_token(d.booking, now);
            }
            let d = r.route(&on(1, 200_000, 1000), now, &mut rng).unwrap();
            if prefilled {
                r.on_first_token(d.booking, now);
            }
            let (scored, _) = r.explain(&prompt);
            let join: Vec<f64> = scored.iter().map(|s| s.prediction.unwrap().join_ms).collect();
            assert_eq!(join, if prefilled { vec![0.0, 0.0] } else { vec![300.0, 0.0] }, "{scored:?}");
            let to = r.route(&prompt, now, &mut rng).unwrap().decode.worker.id.0;
            assert_eq!(to, if prefilled { 1 } else { 2 });
        }
    }

    #[test]
    fn a_speed_learns_only_from_prefills_alone_from_dispatch_to_first_token() {
        // One worker. Lone requests teach its speed; a request joined by another before its
        // first chunk shared its passes and teaches nothing (nor does the one that joined).
        let sched = SchedSettings { policy: RoutingPolicy::PredictedTtft, ..Default::default() };
        let mut r = Router::new(KvSettings::default(), sched);
        r.set_fleet(Fleet { block_size: Some(16), workers: vec![worker(1, 1, Role::Worker, 1)] });
        let w = WorkerRank::rank0(1);
        let mut rng = SmallRng::seed_from_u64(12);
        let t0 = Instant::now();
        let at = |s: u64, ms: u64| t0 + Duration::from_secs(s) + Duration::from_millis(ms);
        let prompt = |i: u32| RoutingRequest { tokens: (i * 1000..i * 1000 + 512).collect(), ..Default::default() };
        let lone = |r: &mut Router, rng: &mut SmallRng, i: u32| {
            let d = r.route(&prompt(i), at(i as u64, 0), rng).unwrap();
            r.on_first_token(d.booking, at(i as u64, 50));
            r.on_end(d.booking, at(i as u64, 100));
        };
        (0..12).for_each(|i| lone(&mut r, &mut rng, i));
        let learned = r.latency_model(&w).speed_samples;
        assert!(learned > 0, "lone prefills teach the speed");
        let a = r.route(&prompt(12), at(12, 0), &mut rng).unwrap();
        let b = r.route(&prompt(13), at(12, 10), &mut rng).unwrap();
        r.on_first_token(a.booking, at(12, 90));
        r.on_first_token(b.booking, at(12, 140));
        r.on_end(a.booking, at(12, 200));
        r.on_end(b.booking, at(12, 210));
        assert_eq!(r.latency_model(&w).speed_samples, learned);
        lone(&mut r, &mut rng, 14);
        assert_eq!(r.latency_model(&w).speed_samples, learned + 1);
    }

    #[test]
    fn a_prompt_goes_beside_a_long_decode_only_when_elsewhere_is_slower_by_more_than_the_stall() {
        // Two workers, each decoding one request of the same prompt length: worker 1's is
        // expected to run 2000 tokens, worker 2's 20. A new prompt's predicted TTFT is the same
        // on both (a tie without the E2E guard: each seed picks at random); the stall it would
        // impose on the long decode sends it to worker 2, for every seed. Once worker 1's has
        // streamed 1995 tokens it has less left than worker 2's: the prompt goes to worker 1.
        // With 8 k prompt tokens queued on worker 2 its first token is far later than the
        // stall costs: the prompt then goes beside the long decode.
        let sched = SchedSettings { policy: RoutingPolicy::PredictedTtft, ..Default::default() };
        let t0 = Instant::now();
        let ms = |x: u64| t0 + Duration::from_millis(x);
        let on = |w: &str, base: u32, n: u32, osl: u32| RoutingRequest {
            tokens: (base..base + n).collect(),
            osl: Some(osl),
            subset: Some(vec![EndpointMatch::parse(w).unwrap()]),
            ..Default::default()
        };
        let prompt = RoutingRequest { tokens: (50_000..54_096).collect(), osl: Some(100), ..Default::default() };
        // (streamed by worker 1's request, prompt queued on worker 2, the worker expected)
        for (streamed, queued, expected) in [(0, false, 2), (1995, false, 1), (0, true, 1)] {
            for seed in 0..20 {
                let mut r = Router::new(KvSettings::default(), sched);
                r.set_fleet(Fleet { block_size: Some(16), workers: vec![worker(1, 1, Role::Worker, 1), worker(2, 2, Role::Worker, 1)] });
                let mut rng = SmallRng::seed_from_u64(seed);
                let long = r.route(&on("127.0.0.1:1", 0, 512, 2000), ms(0), &mut rng).unwrap();
                let short = r.route(&on("127.0.0.1:2", 10_000, 512, 20), ms(0), &mut rng).unwrap();
                r.on_first_token(long.booking, ms(50));
                r.on_first_token(short.booking, ms(50));
                r.on_output(long.booking, streamed);
                if queued {
                    r.route(&on("127.0.0.1:2", 20_000, 8192, 20), ms(60), &mut rng).unwrap();
                }
                let d = r.route(&prompt, ms(100), &mut rng).unwrap();
                assert_eq!(d.decode.worker.id, WorkerId(expected), "streamed {streamed}, queued {queued}, seed {seed}");
            }
        }
    }

    #[test]
    fn a_cancel_before_the_first_chunk_frees_the_prefill_booking_too() {
        let mut r = router(vec![worker(1, 1, Role::Prefill, 1), worker(2, 2, Role::Decode, 1)]);
        let mut rng = SmallRng::seed_from_u64(4);
        let d = r.route(&tokens(64), Instant::now(), &mut rng).unwrap();
        r.on_end(d.booking, Instant::now());
        assert!(r.active.is_empty());
    }

    #[test]
    fn peer_bookings_load_our_view_until_freed_or_forgotten() {
        let mut r = router(vec![worker(1, 1, Role::Worker, 1), worker(2, 2, Role::Worker, 1)]);
        let now = Instant::now();
        let w1 = WorkerRank { id: WorkerId(1), dp_rank: DpRank(0) };
        let add = |id: &str| PeerEvent {
            request_id: id.into(),
            worker: w1,
            data: PeerEventData::Add { blocks: Some(vec![1, 2, 3]), prefill_tokens: 48, expected_output_tokens: None },
        };
        r.apply_peer(7, add("a"), now);
        r.apply_peer(7, add("a"), now); // a duplicate is ignored
        r.apply_peer(8, add("a"), now); // the same id from another replica is another request
        assert_eq!(r.load(&w1), RankLoad { active_decode_blocks: 3.0, active_prefill_tokens: 96, active_requests: 2, prefilling_requests: 2, long_decodes: 0.0 });
        // Our own decisions now avoid worker 1.
        let mut rng = SmallRng::seed_from_u64(1);
        for _ in 0..5 {
            let d = r.route(&tokens(32), now, &mut rng).unwrap();
            assert_eq!(d.decode.worker.id, WorkerId(2));
            r.on_end(d.booking, now);
        }
        r.apply_peer(7, PeerEvent { request_id: "a".into(), worker: w1, data: PeerEventData::PrefillCompleted }, now);
        assert_eq!(r.load(&w1).active_prefill_tokens, 48);
        r.apply_peer(7, PeerEvent { request_id: "a".into(), worker: w1, data: PeerEventData::Free }, now);
        assert_eq!(r.load(&w1).active_requests, 1);
        r.forget_peer(8);
        assert_eq!(r.load(&w1), RankLoad::default());
        // Unknown workers are not booked.
        let gone = WorkerRank { id: WorkerId(99), dp_rank: DpRank(0) };
        r.apply_peer(7, PeerEvent { worker: gone, ..add("b") }, now);
        assert_eq!(r.load(&gone), RankLoad::default());
    }

    #[test]
    fn our_changes_are_published_only_with_sync_on() {
        let mut r = router(vec![worker(1, 1, Role::Prefill, 1), worker(2, 2, Role::Decode, 1)]);
        let mut rng = SmallRng::seed_from_u64(1);
        let now = Instant::now();
        let d = r.route(&tokens(64), now, &mut rng).unwrap();
        r.on_end(d.booking, now);
        assert!(r.take_peer_events().is_empty());
        r.enable_replica_sync();
        let d = r.route(&tokens(64), now, &mut rng).unwrap();
        r.on_first_token(d.booking, now);
        r.on_end(d.booking, now);
        let evs = r.take_peer_events();
        let kinds: Vec<(&str, WorkerId, &PeerEventData)> = evs.iter().map(|e| (e.request_id.as_str(), e.worker.id, &e.data)).collect();
        let id = d.booking.0.to_string();
        let pid = format!("{id}:prefill");
        assert!(matches!(kinds[0], (i, WorkerId(2), PeerEventData::Add { prefill_tokens: 0, .. }) if i == id), "{kinds:?}");
        assert!(matches!(kinds[1], (i, WorkerId(1), PeerEventData::Add { prefill_tokens: 64, blocks: None, .. }) if i == pid), "{kinds:?}");
        assert_eq!(kinds[2..].iter().map(|k| (k.0, k.2.clone())).collect::<Vec<_>>(), vec![
            (id.as_str(), PeerEventData::PrefillCompleted),
            (pid.as_str(), PeerEventData::Free),
            (id.as_str(), PeerEventData::Free),
        ]);
        assert!(r.take_peer_events().is_empty());
    }

    #[derive(Clone, Debug)]
    enum Op {
        Route(u32),
        FirstToken(usize),
        Output(usize, u64),
        End(usize),
        PeerAdd(u64, u8, u64),
        PeerDone(u64, u8),
        PeerFree(u64, u8),
        Forget(u64),
    }

    fn op() -> impl proptest::strategy::Strategy<Value = Op> {
        use proptest::prelude::*;
        prop_oneof![
            (0..6u32).prop_map(Op::Route),
            (0..12usize).prop_map(Op::FirstToken),
            (0..12usize, 0..100u64).prop_map(|(i, g)| Op::Output(i, g)),
            (0..12usize).prop_map(Op::End),
            (0..3u64, 0..4u8, 1..4u64).prop_map(|(r, id, w)| Op::PeerAdd(r, id, w)),
            (0..3u64, 0..4u8).prop_map(|(r, id)| Op::PeerDone(r, id)),
            (0..3u64, 0..4u8).prop_map(|(r, id)| Op::PeerFree(r, id)),
            (0..3u64).prop_map(Op::Forget),
        ]
    }

    proptest::proptest! {
        // Whatever the interleaving of decisions (aggregated and disaggregated), first chunks,
        // output, ends, cancels and peers' changes: once all have ended, no load is left.
        #[test]
        fn every_counter_returns_to_zero(ops in proptest::collection::vec(op(), 0..80), disagg: bool) {
            let mut ws = vec![worker(1, 1, Role::Worker, 2), worker(2, 2, Role::Decode, 1)];
            if disagg {
                ws.push(worker(3, 3, Role::Prefill, 1));
            }
            let settings = SchedSettings { track_output_blocks: true, ..Default::default() };
            let mut r = Router::new(KvSettings::default(), settings);
            r.set_fleet(Fleet { block_size: Some(4), workers: ws });
            let mut rng = SmallRng::seed_from_u64(2);
            let now = Instant::now();
            let mut booked = Vec::new();
            for o in &ops {
                match *o {
                    Op::Route(p) => booked.push(r.route(&RoutingRequest { tokens: (0..p * 5).collect(), osl: Some(50), ..Default::default() }, now, &mut rng).unwrap().booking),
                    Op::FirstToken(i) => if let Some(b) = booked.get(i) { r.on_first_token(*b, now); },
                    Op::Output(i, g) => if let Some(b) = booked.get(i) { r.on_output(*b, g) },
                    Op::End(i) => if let Some(b) = booked.get(i) { r.on_end(*b, now) },
                    Op::PeerAdd(rep, id, w) => r.apply_peer(rep, PeerEvent {
                        request_id: id.to_string(),
                        worker: WorkerRank { id: WorkerId(w), dp_rank: DpRank(0) },
                        data: PeerEventData::Add { blocks: Some(vec![id as u64, 9]), prefill_tokens: 7, expected_output_tokens: None },
                    }, now),
                    Op::PeerDone(rep, id) | Op::PeerFree(rep, id) => {
                        let data = if matches!(o, Op::PeerDone(..)) { PeerEventData::PrefillCompleted } else { PeerEventData::Free };
                        for w in 1..4 {
                            r.apply_peer(rep, PeerEvent { request_id: id.to_string(), worker: WorkerRank { id: WorkerId(w), dp_rank: DpRank(0) }, data: data.clone() }, now);
                        }
                    }
                    Op::Forget(rep) => r.forget_peer(rep),
                }
            }
            for b in &booked {
                r.on_end(*b, now);
            }
            for rep in 0..3 {
                r.forget_peer(rep);
            }
            proptest::prop_assert_eq!(r.active_requests(), 0);
            proptest::prop_assert!(r.active.is_empty());
            for w in r.workers().to_vec().iter().flat_map(|w| w.ranks().collect::<Vec<_>>()) {
                let l = r.load(&w);
                proptest::prop_assert_eq!((l.active_prefill_tokens, l.active_requests), (0, 0));
                proptest::prop_assert!(l.active_decode_blocks.abs() < 1e-9, "{:?}", l);
            }
        }
    }
}
