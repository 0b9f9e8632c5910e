//! The routing facade: the one place the server (and later the simulator and benches) asks for
//! a decision and reports a request's lifecycle. Pure and synchronous: time and randomness are
//! passed in, no I/O happens here.
//!
//! It also owns the KV cache state: the index fed by events ([`Router::apply`]) and, in
//! approximate mode or with a predicted TTL, the router's own remembered decisions.
//!
//! Until the scheduler lands, a decision is overlap-first: the eligible worker rank holding
//! the longest prefix of the request's blocks (host and disk tiers weighted 0.75 and 0.25
//! beyond the device prefix, as Dynamo weighs them), then the fewest in-flight requests, then
//! uniformly at random.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use rand::Rng;

use crate::{
    kv::{
        events::RouterEvent,
        hash::{hash_seed, local_block_hashes, LocalBlockHash},
        index::{Applied, Index, Overlap},
        predicted::Predicted,
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
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision {
    pub decode: Target,
    pub prefill: Option<Target>,
    pub mode: RoutingMode,
    pub booking: BookingId,
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
    /// The prompt's token ids (empty until tokenization is wired in).
    pub tokens: Vec<u32>,
    /// Tenant / cache namespace: salts the block hashes.
    pub cache_salt: Option<String>,
    /// LoRA adapter name: salts the block hashes.
    pub lora: Option<String>,
    /// Gateway subset hint; `None` = every worker is eligible.
    pub subset: Option<Vec<EndpointMatch>>,
}

impl RoutingRequest {
    fn allows(&self, ep: SocketAddr) -> bool {
        self.subset.as_ref().is_none_or(|s| s.iter().any(|m| m.matches(ep)))
    }
}

/// Why no target could be chosen.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    #[error("no workers are known yet")]
    NoWorkers,
    #[error("the gateway's endpoint subset matches no known worker")]
    SubsetMatchesNone,
}

#[derive(Clone, Copy, Debug)]
struct Booking {
    worker: WorkerRank,
}

/// How the router learns what the workers have cached.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct KvSettings {
    /// Tokens per block when the fleet source does not say.
    pub default_block_size: u32,
    /// false = approximate mode: only the router's own decisions, for `approx_ttl`.
    pub use_kv_events: bool,
    pub approx_ttl: Duration,
    /// With events on: also remember decisions for this long (bursts before events arrive).
    pub predicted_ttl: Option<Duration>,
    /// Bound on remembered (worker rank, block) pairs.
    pub max_predicted_blocks: usize,
}

impl Default for KvSettings {
    fn default() -> Self {
        KvSettings {
            default_block_size: 16,
            use_kv_events: true,
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
        let ttl = if settings.use_kv_events { settings.predicted_ttl } else { Some(settings.approx_ttl) };
        KvState {
            settings,
            block_size: settings.default_block_size,
            index: Index::new(),
            predicted: ttl.map(|t| Predicted::new(t, settings.max_predicted_blocks)),
        }
    }
}

impl Default for KvState {
    fn default() -> Self {
        KvState::new(KvSettings::default())
    }
}

/// The routing state shared by every stream.
#[derive(Default)]
pub struct Router {
    workers: Vec<Worker>,
    loaded: bool,
    in_flight: HashMap<WorkerRank, u32>,
    bookings: HashMap<BookingId, Booking>,
    next_booking: u64,
    kv: KvState,
}

impl Router {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn with_kv(settings: KvSettings) -> Self {
        Router { kv: KvState::new(settings), ..Self::default() }
    }

    /// Replaces the fleet. Bookings and cached blocks of workers that left are dropped with
    /// them; a new block size invalidates every hash, so the cache state starts over.
    pub fn set_fleet(&mut self, fleet: Fleet) {
        self.workers = fleet.workers;
        self.loaded = true;
        let live: std::collections::HashSet<WorkerRank> =
            self.workers.iter().flat_map(Worker::ranks).collect();
        self.bookings.retain(|_, b| live.contains(&b.worker));
        self.in_flight.retain(|w, _| live.contains(w));
        let block_size = fleet.block_size.unwrap_or(self.kv.settings.default_block_size);
        if block_size != self.kv.block_size {
            self.kv = KvState::new(self.kv.settings);
            self.kv.block_size = block_size;
        }
        let ids: std::collections::HashSet<_> = self.workers.iter().map(|w| w.id).collect();
        for gone in self.kv.index.workers().into_iter().filter(|w| !ids.contains(w)) {
            self.kv.index.remove_worker(gone);
            if let Some(p) = &mut self.kv.predicted {
                p.remove_worker(gone);
            }
        }
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

    /// Forgets remembered decisions whose time is up (also done lazily on every route).
    pub fn expire(&mut self, now: Instant) {
        if let Some(p) = &mut self.kv.predicted {
            p.expire(now);
        }
    }

    /// The request's block hashes under the current block size and its LoRA / salt seed.
    fn request_hashes(&self, req: &RoutingRequest) -> Vec<LocalBlockHash> {
        let seed = hash_seed(req.lora.as_deref(), req.cache_salt.as_deref());
        local_block_hashes(&req.tokens, self.kv.block_size as usize, seed)
    }

    /// Effective cached blocks per worker rank: the larger of indexed and predicted.
    fn overlap_scores(&self, hashes: &[LocalBlockHash]) -> HashMap<WorkerRank, f64> {
        let mut out = HashMap::new();
        if hashes.is_empty() {
            return out;
        }
        let mut add = |os: Vec<Overlap>| {
            for o in os {
                let e = out.entry(o.worker).or_insert(0.0f64);
                *e = e.max(effective_blocks(&o));
            }
        };
        if self.kv.settings.use_kv_events {
            add(self.kv.index.overlaps(hashes));
        }
        if let Some(p) = &self.kv.predicted {
            add(p.overlaps(hashes));
        }
        out
    }

    /// True once a fleet source has delivered its first complete view.
    pub fn is_ready(&self) -> bool {
        self.loaded
    }

    pub fn worker_count(&self) -> usize {
        self.workers.len()
    }

    /// Requests booked and not yet ended.
    pub fn active_requests(&self) -> usize {
        self.bookings.len()
    }

    /// Picks and books a worker for a request that carries a body.
    pub fn route(&mut self, req: &RoutingRequest, now: Instant, rng: &mut impl Rng) -> Result<Decision, RouteError> {
        self.expire(now);
        let hashes = self.request_hashes(req);
        let scores = self.overlap_scores(&hashes);
        let decode = self.select(req, rng, |w| scores.get(&w).copied().unwrap_or(0.0))?;
        let booking = BookingId(self.next_booking);
        self.next_booking += 1;
        *self.in_flight.entry(decode.worker).or_default() += 1;
        self.bookings.insert(booking, Booking { worker: decode.worker });
        if let Some(p) = &mut self.kv.predicted {
            p.record(decode.worker, &hashes, now);
        }
        Ok(Decision { decode, prefill: None, mode: RoutingMode::Aggregated, booking })
    }

    /// Picks a worker for a body-less request (`GET /v1/models`); nothing is booked.
    pub fn pick_any(&self, req: &RoutingRequest, rng: &mut impl Rng) -> Result<Target, RouteError> {
        self.select(req, rng, |_| 0.0)
    }

    /// The first non-empty response chunk arrived: prefill is done.
    pub fn on_first_token(&mut self, _booking: BookingId, _now: Instant) {}

    /// The response ended, failed or was cancelled: release everything the request held.
    pub fn on_end(&mut self, booking: BookingId, _now: Instant) {
        if let Some(b) = self.bookings.remove(&booking) {
            if let Some(n) = self.in_flight.get_mut(&b.worker) {
                *n -= 1;
                if *n == 0 {
                    self.in_flight.remove(&b.worker);
                }
            }
        }
    }

    /// The eligible rank with the highest `overlap`, then the fewest in-flight requests.
    fn select(&self, req: &RoutingRequest, rng: &mut impl Rng, overlap: impl Fn(WorkerRank) -> f64) -> Result<Target, RouteError> {
        if self.workers.is_empty() {
            return Err(RouteError::NoWorkers);
        }
        // Prefill-only workers never take a whole request.
        let mut best: Option<(f64, u32, Target)> = None;
        let mut ties = 0u32;
        for w in self.workers.iter().filter(|w| w.role != Role::Prefill && req.allows(w.endpoint)) {
            for rank in w.ranks() {
                let load = self.in_flight.get(&rank).copied().unwrap_or(0);
                let score = overlap(rank);
                let t = Target { worker: rank, endpoint: w.endpoint };
                match best {
                    Some((s, l, _)) if score < s || (score == s && load > l) => {}
                    Some((s, l, _)) if score == s && load == l => {
                        // Reservoir sampling keeps every tied rank equally likely.
                        ties += 1;
                        if rng.random_range(0..ties) == 0 {
                            best = Some((score, load, t));
                        }
                    }
                    _ => {
                        best = Some((score, load, t));
                        ties = 1;
                    }
                }
            }
        }
        best.map(|(_, _, t)| t).ok_or(if req.subset.is_some() {
            RouteError::SubsetMatchesNone
        } else {
            RouteError::NoWorkers
        })
    }
}

/// Cached blocks a rank offers, tiers beyond the device prefix counting 0.75 (host) and
/// 0.25 (disk), as Dynamo's default weights do; external storage is not counted yet.
fn effective_blocks(o: &Overlap) -> f64 {
    let [dev, host, disk, _] = o.blocks.map(f64::from);
    let host_extra = (host - dev).max(0.0);
    let disk_extra = (disk - dev.max(host)).max(0.0);
    dev + 0.75 * host_extra + 0.25 * disk_extra
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
        let mut r = Router::new();
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
        assert!(r.in_flight.is_empty());
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
        assert_eq!(Router::new().pick_any(&RoutingRequest::default(), &mut rng), Err(RouteError::NoWorkers));
        let r = router(vec![worker(1, 1, Role::Prefill, 1), worker(2, 2, Role::Decode, 1)]);
        for _ in 0..10 {
            let t = r.pick_any(&RoutingRequest::default(), &mut rng).unwrap();
            assert_eq!(t.worker, WorkerRank { id: WorkerId(2), dp_rank: DpRank(0) });
        }
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
        let mut r = Router::with_kv(settings);
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
}
