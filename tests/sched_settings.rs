//! One test per scheduler variable (contracts §9 A and C): each shows the variable, set through
//! the real `Config` parser, changing a decision the defaults make differently. Expected picks
//! follow from Dynamo's cost formula (contracts §8.1), worked out by hand in each test's comment.
//!
//! Fleet: workers 1 and 2, block size 16. Prompt P = 256 tokens = 16 blocks.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use dynamo_epp::{
    config::Config,
    kv::{
        events::{ExternalBlockHash, KvCacheEvent, KvCacheEventData, KvCacheStoreData, KvCacheStoredBlockData, RouterEvent, StorageTier},
        hash::{local_block_hashes, XXH3_SEED},
        predicted::ApproxCachePolicy,
    },
    router::{BookingId, EndpointMatch, RouteError, Router, RoutingMode, RoutingRequest},
    workers::{Fleet, Role, Worker, WorkerId},
};
use rand::{rngs::SmallRng, SeedableRng};

const BS: usize = 16;

fn worker(id: u64, role: Role) -> Worker {
    Worker {
        id: WorkerId(id),
        name: format!("w{id}"),
        endpoint: SocketAddr::from(([127, 0, 0, 1], id as u16)),
        role,
        dp_start_rank: 0,
        dp_size: 1,
        total_kv_blocks: None,
        max_num_batched_tokens: None,
        kv_events: None,
    }
}

struct Bench {
    router: Router,
    rng: SmallRng,
    t0: Instant,
}

impl Bench {
    fn new(args: &[&str]) -> Self {
        Self::with(args, vec![worker(1, Role::Worker), worker(2, Role::Worker)])
    }

    fn with(args: &[&str], workers: Vec<Worker>) -> Self {
        let cfg = Config::from_args(std::iter::once("dynamo-epp").chain(args.iter().copied())).unwrap();
        let mut router = Router::new(cfg.kv_settings(), cfg.sched_settings());
        router.set_fleet(Fleet { block_size: Some(BS as u32), workers });
        Bench { router, rng: SmallRng::seed_from_u64(5), t0: Instant::now() }
    }

    /// Worker `w` reports the first `blocks` blocks of `tokens` cached in `tier`.
    fn cache(&mut self, w: u64, tokens: &[u32], blocks: usize, tier: StorageTier) {
        let hashes = local_block_hashes(&tokens[..blocks * BS], BS, XXH3_SEED);
        let blocks = hashes
            .into_iter()
            .enumerate()
            .map(|(i, h)| KvCacheStoredBlockData { block_hash: ExternalBlockHash(w * 1000 + i as u64), tokens_hash: h, mm_extra_info: None })
            .collect();
        let ev = RouterEvent {
            worker_id: WorkerId(w),
            storage_tier: tier,
            residency_domain: None,
            event: KvCacheEvent { event_id: 1, data: KvCacheEventData::Stored(KvCacheStoreData { parent_hash: None, start_position: None, blocks }), dp_rank: 0 },
        };
        assert!(self.router.apply(&ev).rejected.is_none());
    }

    /// Books `tokens` on worker `w` (through a subset hint); `first_token` ends its prefill.
    fn load(&mut self, w: u64, tokens: Vec<u32>, first_token: bool) -> BookingId {
        let ep = SocketAddr::from(([127, 0, 0, 1], w as u16));
        let req = RoutingRequest { tokens, subset: Some(vec![EndpointMatch::Exact(ep)]), ..Default::default() };
        let d = self.router.route(&req, self.t0, &mut self.rng).unwrap();
        assert_eq!(d.decode.worker.id, WorkerId(w));
        if first_token {
            self.router.on_first_token(d.booking, self.t0);
        }
        d.booking
    }

    /// Where P goes (then its booking is released, so the state is unchanged).
    fn pick(&mut self, tokens: &[u32]) -> u64 {
        let req = RoutingRequest { tokens: tokens.to_vec(), ..Default::default() };
        let d = self.router.route(&req, self.t0, &mut self.rng).unwrap();
        self.router.on_end(d.booking, self.t0);
        d.decode.worker.id.0
    }
}

fn prompt() -> Vec<u32> {
    (0..256).collect()
}

fn other(n: u32) -> Vec<u32> {
    (100_000..100_000 + n).collect()
}

/// Worker 1 caches 12 of P's 16 blocks in `tier` and runs a request of `load_tokens` (past its
/// prefill when `prefilled`); worker 2 is idle. Where does P go?
fn scenario(args: &[&str], tier: StorageTier, load_tokens: u32, prefilled: bool) -> u64 {
    let mut b = Bench::new(args);
    let p = prompt();
    b.cache(1, &p, 12, tier);
    b.load(1, other(load_tokens), prefilled);
    b.pick(&p)
}

/// The common case: a 4-block request past its prefill on worker 1.
/// Defaults: w1 = (16 − 12) + (4 + 16) = 24, w2 = 16 + 16 = 32 → worker 1.
fn cached_but_busier(args: &[&str]) -> u64 {
    scenario(args, StorageTier::Device, 64, true)
}

#[test]
fn defaults_prefer_the_cached_worker() {
    assert_eq!(cached_but_busier(&[]), 1);
}

#[test]
fn overlap_score_credit() {
    // Credit 0: w1 = 16 + 20 = 36 > w2 = 32.
    assert_eq!(cached_but_busier(&["--overlap-score-credit", "0"]), 2);
}

#[test]
fn prefill_load_scale() {
    // Scale 0: w1 = 0 + 20 > w2 = 0 + 16.
    assert_eq!(cached_but_busier(&["--prefill-load-scale", "0"]), 2);
}

#[test]
fn decode_active_request_weight() {
    // 10 per active request: w1 = 24 + 10 = 34 > w2 = 32.
    assert_eq!(cached_but_busier(&["--decode-active-request-weight", "10"]), 2);
}

#[test]
fn track_prefill_tokens() {
    // No prefill term: w1 = 20 > w2 = 16.
    assert_eq!(cached_but_busier(&["--track-prefill-tokens", "false"]), 2);
}

#[test]
fn deprecated_overlap_score_weight_maps_as_upstream() {
    // 0 zeroes both the prefill scale and the credit: w1 = 20 > w2 = 16.
    assert_eq!(cached_but_busier(&["--kv-overlap-score-weight", "0"]), 2);
    let cfg = Config::from_args(["dynamo-epp", "--kv-overlap-score-weight", "2.5"]).unwrap();
    let s = cfg.sched_settings();
    assert_eq!((s.weights.prefill_load_scale, s.weights.overlap_credit), (2.5, 1.0));
    assert!(cfg.warnings().iter().any(|w| w.contains("DYN_ROUTER_KV_OVERLAP_SCORE_WEIGHT") && w.contains("deprecated")));
    let old = Config::from_args(["dynamo-epp", "--overlap-score-weight", "0"]).unwrap().sched_settings();
    assert_eq!((old.weights.prefill_load_scale, old.weights.overlap_credit), (0.0, 0.0));
}

#[test]
fn overlap_score_credit_decay() {
    // Worker 1's request is still prefilling (64 tokens; the least-loaded has 0):
    // default w1 = (64 + 256)/16 − 12 + 20 = 28 < 32; decay 4 halves the credit
    // (1 / (1 + 4·(64/16)/16)) → 20 − 6 + 20 = 34 > 32.
    let run = |args: &[&str]| scenario(args, StorageTier::Device, 64, false);
    assert_eq!(run(&[]), 1);
    assert_eq!(run(&["--overlap-score-credit-decay", "4"]), 2);
}

#[test]
fn host_and_disk_cache_hit_weights() {
    // 12 blocks on the host tier only: credit 0.75·12 = 9 → w1 = 7 + 20 = 27 < 32;
    // host weight 0 → 16 + 20 = 36 > 32. The disk weight works the same way.
    let run = |tier, args: &[&str]| scenario(args, tier, 64, true);
    assert_eq!(run(StorageTier::HostPinned, &[]), 1);
    assert_eq!(run(StorageTier::HostPinned, &["--host-cache-hit-weight", "0"]), 2);
    // Disk at 0.25: credit 3 → 13 + 20 = 33 > 32; weight 1 → 4 + 20 = 24.
    assert_eq!(run(StorageTier::Disk, &[]), 2);
    assert_eq!(run(StorageTier::Disk, &["--disk-cache-hit-weight", "1"]), 1);
}

#[test]
fn track_active_blocks() {
    // Worker 1 runs a 16-block request: with blocks, w1 = 4 + 32 = 36 > w2 = 32;
    // without, w1 = 4 < w2 = 16.
    let run = |args: &[&str]| scenario(args, StorageTier::Device, 256, true);
    assert_eq!(run(&[]), 2);
    assert_eq!(run(&["--track-active-blocks", "false"]), 1);
}

#[test]
fn assume_kv_reuse() {
    // Worker 1 runs P's first 8 blocks, worker 2 one unrelated block; nothing cached.
    // Reuse: w1 = 16 + |8 ∪ 16| = 32 < w2 = 16 + 1 + 16 = 33. Without: w1 = 16 + 8 + 16 = 40.
    let run = |args: &[&str]| {
        let mut b = Bench::new(args);
        let p = prompt();
        b.load(1, p[..128].to_vec(), true);
        b.load(2, other(16), true);
        b.pick(&p)
    };
    assert_eq!(run(&[]), 1);
    assert_eq!(run(&["--assume-kv-reuse", "false"]), 2);
}

#[test]
fn router_temperature() {
    // Costs 24 vs 32: at 0 always worker 1; at 1, p(w2) = e^-1 / (1 + e^-1) ≈ 0.27.
    let picks = |args: &[&str]| {
        let mut b = Bench::new(args);
        let p = prompt();
        b.cache(1, &p, 12, StorageTier::Device);
        b.load(1, other(64), true);
        (0..400).filter(|_| b.pick(&p) == 2).count()
    };
    assert_eq!(picks(&[]), 0);
    let n = picks(&["--router-temperature", "1"]);
    assert!((70..150).contains(&n), "{n} of 400 went to worker 2");
}

#[test]
fn track_output_blocks() {
    // Both workers run one 64-token request past prefill; worker 1's has streamed 64 tokens
    // (4 more blocks). Off: tie → either; on: w1 = 16 + 8 + 16 > w2 = 16 + 4 + 16.
    let run = |args: &[&str]| {
        let mut b = Bench::new(args);
        let r = b.load(1, other(64), true);
        b.load(2, (200_000..200_064).collect(), true);
        b.router.on_output(r, 64);
        (0..40).map(|_| b.pick(&prompt())).collect::<std::collections::HashSet<_>>()
    };
    assert_eq!(run(&[]).len(), 2);
    assert_eq!(run(&["--track-output-blocks", "true"]), [2].into());
}

#[test]
fn active_request_expiry() {
    let mut b = Bench::new(&["--active-request-expiry-secs", "1"]);
    b.load(1, other(64), false);
    let w1 = b.router.workers()[0].ranks().next().unwrap();
    assert_eq!(b.router.load(&w1).active_requests, 1);
    // A decision two seconds later no longer sees the request whose end never came.
    let later = b.t0 + Duration::from_secs(2);
    let d = b.router.route(&RoutingRequest { tokens: prompt(), ..Default::default() }, later, &mut b.rng).unwrap();
    b.router.on_end(d.booking, later);
    assert_eq!(b.router.load(&w1).active_requests, 0);
    assert_eq!(b.router.active_requests(), 0);
    // The default (300 s) keeps it.
    let mut b = Bench::new(&[]);
    b.load(1, other(64), false);
    b.router.expire(b.t0 + Duration::from_secs(2));
    assert_eq!(b.router.load(&w1).active_requests, 1);
}

#[test]
fn enforce_disagg() {
    let mut b = Bench::new(&[]);
    let req = RoutingRequest { tokens: prompt(), ..Default::default() };
    assert_eq!(b.router.route(&req, b.t0, &mut b.rng).unwrap().mode, RoutingMode::Aggregated);
    let mut b = Bench::new(&["--enforce-disagg", "true"]);
    assert_eq!(b.router.route(&req, b.t0, &mut b.rng), Err(RouteError::PrefillUnavailable));
    assert_eq!(b.router.active_requests(), 0);
    // With a prefill worker present it serves disaggregated.
    let mut b = Bench::with(&["--enforce-disagg", "true"], vec![worker(1, Role::Prefill), worker(2, Role::Decode)]);
    let d = b.router.route(&req, b.t0, &mut b.rng).unwrap();
    assert_eq!((d.mode, d.prefill.unwrap().worker.id, d.decode.worker.id), (RoutingMode::Disaggregated, WorkerId(1), WorkerId(2)));
}

/// Worker 1 caches all of P and runs an 8-block request (still prefilling unless
/// `first_token`); worker 2 a 4-block one past prefill. Defaults:
/// prefilling: w1 = (128 + 256)/16 − 16 + (8 + 16) = 32 < w2 = 16 + 4 + 16 = 36;
/// prefilled:  w1 = 0 + 24 < 36. Either way worker 1, unless a threshold makes it busy.
fn loaded_cached_worker(args: &[&str], first_token: bool) -> u64 {
    let mut b = Bench::new(args);
    let p = prompt();
    b.cache(1, &p, 16, StorageTier::Device);
    b.load(1, other(128), first_token);
    b.load(2, (200_000..200_064).collect(), true);
    b.pick(&p)
}

#[test]
fn active_prefill_tokens_threshold() {
    assert_eq!(loaded_cached_worker(&[], false), 1);
    // 128 prefill tokens > 100: busy.
    assert_eq!(loaded_cached_worker(&["--active-prefill-tokens-threshold", "100"], false), 2);
    assert_eq!(loaded_cached_worker(&["--active-prefill-tokens-threshold", "200"], false), 1);
}

#[test]
fn active_prefill_tokens_threshold_frac() {
    // 128 > 0.5 · 192: busy. Without a declared batch budget the fraction limits nothing.
    assert_eq!(loaded_cached_worker(&["--active-prefill-tokens-threshold-frac", "0.5", "--max-num-batched-tokens", "192"], false), 2);
    assert_eq!(loaded_cached_worker(&["--active-prefill-tokens-threshold-frac", "0.5"], false), 1);
    assert_eq!(loaded_cached_worker(&["--active-prefill-tokens-threshold-frac", "0.8", "--max-num-batched-tokens", "192"], false), 1);
}

#[test]
fn active_decode_blocks_threshold() {
    assert_eq!(loaded_cached_worker(&["--total-kv-blocks", "10"], true), 1);
    // 8 active blocks > 0.5 · 10: busy; 0.9 · 10 is not exceeded.
    assert_eq!(loaded_cached_worker(&["--active-decode-blocks-threshold", "0.5", "--total-kv-blocks", "10"], true), 2);
    assert_eq!(loaded_cached_worker(&["--active-decode-blocks-threshold", "0.9", "--total-kv-blocks", "10"], true), 1);
}

#[test]
fn admission_control_rejects_when_all_are_busy_and_books_nothing() {
    let mut b = Bench::new(&["--admission-control", "token-capacity", "--active-prefill-tokens-threshold", "100"]);
    let r1 = b.load(1, other(256), false);
    b.load(2, (200_000..200_256).collect(), false);
    let req = RoutingRequest { tokens: prompt(), ..Default::default() };
    assert_eq!(b.router.route(&req, b.t0, &mut b.rng), Err(RouteError::Overloaded));
    assert_eq!(b.router.active_requests(), 2);
    // Capacity comes back when a prefill completes.
    b.router.on_first_token(r1, b.t0);
    assert_eq!(b.pick(&prompt()), 1);
    // token-capacity without thresholds limits nothing, and says so.
    let cfg = Config::from_args(["dynamo-epp", "--admission-control", "token-capacity"]).unwrap();
    assert!(cfg.warnings().iter().any(|w| w.contains("nothing is limited")));
    let mut b = Bench::new(&["--admission-control", "token-capacity"]);
    b.load(1, other(100_000), false);
    b.load(2, (200_000..300_000).collect(), false);
    assert!(b.router.route(&req, b.t0, &mut b.rng).is_ok());
}

#[test]
fn router_predicted_ttl_secs() {
    // Events on, none received yet, P served once by worker 1 (and finished). Without a
    // predicted TTL both workers cost 16 + 16 and P spreads; with one, worker 1 is predicted
    // to hold P's 16 blocks (cost 0 + 16) and keeps it.
    let run = |args: &[&str]| {
        let mut b = Bench::new(args);
        let p = prompt();
        let r = b.load(1, p.clone(), true);
        b.router.on_end(r, b.t0);
        (0..40).map(|_| b.pick(&p)).collect::<std::collections::HashSet<_>>()
    };
    assert_eq!(run(&[]).len(), 2);
    assert_eq!(run(&["--router-predicted-ttl-secs", "60"]), [1].into());
}

/// Worker 1's cached prefix of `tokens`, in blocks, as the next decision would see it.
fn overlap_on_1(b: &Bench, tokens: &[u32]) -> u32 {
    let (scored, _) = b.router.explain(&RoutingRequest { tokens: tokens.to_vec(), ..Default::default() });
    scored.iter().find(|s| s.target.worker.id == WorkerId(1)).unwrap().load.overlap.device
}

#[test]
fn router_approximate_cache_policy() {
    // Approximate mode: P (16 blocks) is served by worker 1 and ends; an hour later (past the
    // 120 s TTL) worker 1 still holds it under `lru` with a known capacity, and nowhere else.
    let approx = |extra: &[&'static str]| {
        let mut b = Bench::new(&[&["--use-kv-events", "false"], extra].concat());
        let r = b.load(1, prompt(), true);
        b.router.on_end(r, b.t0);
        b.t0 += Duration::from_secs(3600);
        b.router.expire(b.t0);
        b
    };
    assert_eq!(Config::from_args(["dynamo-epp"]).unwrap().kv_settings().approx_policy, ApproxCachePolicy::Ttl);
    assert_eq!(overlap_on_1(&approx(&["--total-kv-blocks", "40"]), &prompt()), 0);
    assert_eq!(overlap_on_1(&approx(&["--router-approximate-cache-policy", "lru"]), &prompt()), 0, "no capacity: the TTL applies");
    let mut b = approx(&["--router-approximate-cache-policy", "lru", "--total-kv-blocks", "40"]);
    assert_eq!(overlap_on_1(&b, &prompt()), 16);
    // w1 = 16 − 16 + 16 < w2 = 16 + 16. (P is booked and released again on worker 1.)
    assert_eq!(b.pick(&prompt()), 1);

    // Capacity pressure on worker 1 (40 blocks), A, B, C of 16 blocks each. A runs and ends:
    // 32 resident. B runs: 48 > 40 evicts P's last 8 blocks (the oldest release, suffix first).
    let (a, bb, c): (Vec<u32>, Vec<u32>, Vec<u32>) = ((100_000..100_256).collect(), (200_000..200_256).collect(), (300_000..300_256).collect());
    let r = b.load(1, a.clone(), true);
    b.router.on_end(r, b.t0);
    let r = b.load(1, bb.clone(), true);
    assert_eq!((overlap_on_1(&b, &prompt()), overlap_on_1(&b, &a)), (8, 16));
    // B's output fills 4 blocks (64 tokens): 4 more of P go.
    b.router.on_output(r, 64);
    assert_eq!(overlap_on_1(&b, &prompt()), 4);
    b.router.on_end(r, b.t0);
    // C: 56 > 40 evicts P's last 4, then 12 of A (released before B); B is untouched.
    let r = b.load(1, c.clone(), true);
    b.router.on_end(r, b.t0);
    assert_eq!([overlap_on_1(&b, &prompt()), overlap_on_1(&b, &a), overlap_on_1(&b, &bb), overlap_on_1(&b, &c)], [0, 4, 16, 16]);

    // As in Dynamo, `lru` needs approximate mode.
    let (msg, code) = Config::from_args(["dynamo-epp", "--router-approximate-cache-policy", "lru"]).unwrap_err();
    assert_eq!(code, 2);
    assert!(msg.contains("DYN_USE_KV_EVENTS=false") && msg.lines().count() == 1, "{msg}");
}

/// A made-up two-worker fleet (not the simulator's engine): each worker prefills FCFS at its
/// own speed, `ms_per_k` ms per thousand prompt tokens plus 10 ms per request; the first
/// chunk comes when a request's prefill ends, and the request ends right after. 2000-token
/// prompts, no shared prefixes, one every 25 ms (~60 % busy while both are equally fast).
/// Worker 2 turns 2× slower after request `slow_from`. Returns worker 2's share of each
/// window of `window` requests.
fn shares_when_worker_2_slows(args: &[&str], slow_from: usize, total: usize, window: usize) -> Vec<f64> {
    let mut b = Bench::new(args);
    let ms = |x: f64| Duration::from_secs_f64(x / 1e3);
    let mut free_at = [b.t0; 2];
    // (first chunk time, booking), delivered in time order before each arrival.
    let mut pending: Vec<(Instant, BookingId)> = Vec::new();
    let mut to_2 = Vec::new();
    for i in 0..total {
        let now = b.t0 + ms(25.0 * i as f64);
        pending.sort_by_key(|p| std::cmp::Reverse(p.0));
        while pending.last().is_some_and(|p| p.0 <= now) {
            let (t, id) = pending.pop().unwrap();
            b.router.on_first_token(id, t);
            b.router.on_end(id, t);
        }
        let tokens: Vec<u32> = (0..2000).map(|t| (i * 2000 + t) as u32 + 1_000_000).collect();
        let d = b.router.route(&RoutingRequest { tokens, ..Default::default() }, now, &mut b.rng).unwrap();
        let w = d.decode.worker.id.0 as usize - 1;
        let ms_per_k = if w == 1 && i >= slow_from { 40.0 } else { 20.0 };
        let done = free_at[w].max(now) + ms(10.0 + 2.0 * ms_per_k);
        free_at[w] = done;
        pending.push((done, d.booking));
        to_2.push(w == 1);
    }
    to_2.chunks(window).map(|c| c.iter().filter(|&&x| x).count() as f64 / c.len() as f64).collect()
}

#[test]
fn router_policy() {
    // Equal speeds: requests are shared evenly. After worker 2 turns 2× slower (request 200),
    // predicted-ttft learns it from the first chunks' timing and moves load away: within the
    // next 100 requests and every window after, worker 2 gets under 42 % (balanced waits give
    // the slower worker ~1/3).
    let predicted = shares_when_worker_2_slows(&["--router-policy", "predicted-ttft"], 200, 600, 100);
    assert!((0.4..0.6).contains(&predicted[1]), "{predicted:?}");
    assert!(predicted[2..].iter().all(|&s| s < 0.42), "{predicted:?}");
    let e = Config::from_args(["dynamo-epp", "--router-policy", "fastest"]).unwrap_err();
    assert_eq!(e.1, 2);
}

#[test]
fn decision_window() {
    let window = |args: &[&str]| Config::from_args(std::iter::once("dynamo-epp").chain(args.iter().copied())).map(|c| c.sched_settings().decision_window);
    assert_eq!(window(&[]).unwrap(), Duration::ZERO, "off by default: each request decided on arrival, as Dynamo");
    assert_eq!(window(&["--decision-window-ms", "2.5"]).unwrap(), Duration::from_micros(2500));
    assert!(window(&["--decision-window-ms", "-1"]).is_err());
}
