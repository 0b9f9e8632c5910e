//! The routing facade: the one place the server (and later the simulator and benches) asks for
//! a decision and reports a request's lifecycle. Pure and synchronous: time and randomness are
//! passed in, no I/O happens here.
//!
//! Until the scheduler lands, a decision is the eligible worker rank with the fewest in-flight
//! requests, ties broken uniformly at random.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    time::Instant,
};

use rand::Rng;

use crate::workers::{Fleet, Role, Worker, WorkerRank};

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

/// The routing state shared by every stream.
#[derive(Default)]
pub struct Router {
    workers: Vec<Worker>,
    loaded: bool,
    in_flight: HashMap<WorkerRank, u32>,
    bookings: HashMap<BookingId, Booking>,
    next_booking: u64,
}

impl Router {
    pub fn new() -> Self {
        Self::default()
    }

    /// Replaces the fleet. Bookings on workers that left are dropped with them.
    pub fn set_fleet(&mut self, fleet: Fleet) {
        self.workers = fleet.workers;
        self.loaded = true;
        let live: std::collections::HashSet<WorkerRank> =
            self.workers.iter().flat_map(Worker::ranks).collect();
        self.bookings.retain(|_, b| live.contains(&b.worker));
        self.in_flight.retain(|w, _| live.contains(w));
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
    pub fn route(&mut self, req: &RoutingRequest, _now: Instant, rng: &mut impl Rng) -> Result<Decision, RouteError> {
        let decode = self.least_loaded(req, rng)?;
        let booking = BookingId(self.next_booking);
        self.next_booking += 1;
        *self.in_flight.entry(decode.worker).or_default() += 1;
        self.bookings.insert(booking, Booking { worker: decode.worker });
        Ok(Decision { decode, prefill: None, mode: RoutingMode::Aggregated, booking })
    }

    /// Picks a worker for a body-less request (`GET /v1/models`); nothing is booked.
    pub fn pick_any(&self, req: &RoutingRequest, rng: &mut impl Rng) -> Result<Target, RouteError> {
        self.least_loaded(req, rng)
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

    fn least_loaded(&self, req: &RoutingRequest, rng: &mut impl Rng) -> Result<Target, RouteError> {
        if self.workers.is_empty() {
            return Err(RouteError::NoWorkers);
        }
        // Prefill-only workers never take a whole request.
        let mut best: Option<(u32, Target)> = None;
        let mut ties = 0u32;
        for w in self.workers.iter().filter(|w| w.role != Role::Prefill && req.allows(w.endpoint)) {
            for rank in w.ranks() {
                let load = self.in_flight.get(&rank).copied().unwrap_or(0);
                let t = Target { worker: rank, endpoint: w.endpoint };
                match best {
                    Some((b, _)) if load > b => {}
                    Some((b, _)) if load == b => {
                        // Reservoir sampling keeps every tied rank equally likely.
                        ties += 1;
                        if rng.random_range(0..ties) == 0 {
                            best = Some((load, t));
                        }
                    }
                    _ => {
                        best = Some((load, t));
                        ties = 1;
                    }
                }
            }
        }
        best.map(|(_, t)| t).ok_or(if req.subset.is_some() {
            RouteError::SubsetMatchesNone
        } else {
            RouteError::NoWorkers
        })
    }
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
}
