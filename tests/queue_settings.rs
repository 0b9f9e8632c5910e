//! The router queue's variables through the real `Config` parser: each changes what the queue
//! or its gate does, as Dynamo documents it (contracts §8.5, the variables table).

mod common;

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use dynamo_epp::{
    config::Config,
    router::{EndpointMatch, Router, RoutingRequest},
    sched::queue::{Arrival, Claims, Priority, Queue, QueuePolicy},
    workers::{Fleet, Role, Worker, WorkerId},
};
use rand::{rngs::SmallRng, SeedableRng};

fn cfg(args: &[&str]) -> Config {
    Config::from_args(std::iter::once("dynamo-epp").chain(args.iter().copied())).unwrap()
}

fn worker(id: u64, budget: Option<u64>) -> Worker {
    Worker {
        id: WorkerId(id),
        name: format!("w{id}"),
        endpoint: SocketAddr::from(([127, 0, 0, 1], id as u16)),
        role: Role::Worker,
        dp_start_rank: 0,
        dp_size: 1,
        total_kv_blocks: None,
        max_num_batched_tokens: budget,
        kv_events: None,
    }
}

#[test]
fn router_queue_threshold_unset_means_no_queue() {
    assert!(cfg(&[]).queue_settings().is_none());
    let s = cfg(&["--router-queue-threshold", "1.5"]).queue_settings().unwrap();
    assert_eq!((s.threshold, s.policy, s.classes.len(), s.refresh_after), (1.5, QueuePolicy::Fcfs, 1, Some(Duration::from_secs(10))));
    assert_eq!(cfg(&[]).queue_full_status, 529, "Dynamo's DYN_HTTP_OVERLOAD_STATUS_CODE default");
}

#[test]
fn router_queue_threshold_gates_on_prefill_tokens_over_the_batch_budget() {
    // Budget 100 per worker (DYN_EPP_MAX_NUM_BATCHED_TOKENS), threshold 0.5: a worker is
    // saturated above 50 active prefill tokens; requests wait only when both are.
    let c = cfg(&["--router-queue-threshold", "0.5", "--max-num-batched-tokens", "100"]);
    let thr = c.queue_settings().unwrap().threshold;
    let mut router = Router::new(c.kv_settings(), c.sched_settings());
    router.set_fleet(Fleet { block_size: Some(16), workers: vec![worker(1, None), worker(2, None)] });
    let mut rng = SmallRng::seed_from_u64(1);
    let t0 = Instant::now();
    let prompt = |n: u32, salt: u32| RoutingRequest { tokens: (0..n).map(|t| t + salt * 100_000).collect(), ..Default::default() };
    assert!(!router.queue_saturated(&prompt(1, 0), thr));
    // 51 prefill tokens on one worker, then on the other.
    router.route(&prompt(51, 1), t0, &mut rng).unwrap();
    assert!(!router.queue_saturated(&prompt(1, 0), thr));
    router.route(&prompt(51, 2), t0, &mut rng).unwrap();
    assert!(router.queue_saturated(&prompt(1, 0), thr));
    // A worker declaring no budget never saturates.
    let c = cfg(&["--router-queue-threshold", "0"]);
    let mut router = Router::new(c.kv_settings(), c.sched_settings());
    router.set_fleet(Fleet { block_size: Some(16), workers: vec![worker(3, None), worker(4, Some(10))] });
    router.route(&prompt(40, 3), t0, &mut rng).unwrap();
    router.route(&prompt(40, 4), t0, &mut rng).unwrap();
    assert!(!router.queue_saturated(&prompt(1, 0), 0.0));
}

#[test]
fn a_blocked_request_claims_its_workers_from_the_requests_behind_it() {
    // Budget 100, threshold 0.5: saturated above 50 prefill tokens. Workers 1 and 2 are;
    // worker 3 is not, but carries more decode load than 2 (a prompt past its first token).
    let c = cfg(&["--router-queue-threshold", "0.5", "--max-num-batched-tokens", "100"]);
    let thr = c.queue_settings().unwrap().threshold;
    let mut router = Router::new(c.kv_settings(), c.sched_settings());
    router.set_fleet(Fleet { block_size: Some(16), workers: (1..=3).map(|i| worker(i, None)).collect() });
    let mut rng = SmallRng::seed_from_u64(1);
    let t0 = Instant::now();
    let on = |ids: &[u16], n: u32, salt: u32| RoutingRequest {
        tokens: (0..n).map(|t| t + salt * 100_000).collect(),
        subset: Some(ids.iter().map(|&i| EndpointMatch::Exact(SocketAddr::from(([127, 0, 0, 1], i)))).collect()),
        ..Default::default()
    };
    let decoding = router.route(&on(&[3], 2000, 1), t0, &mut rng).unwrap();
    router.on_first_token(decoding.booking, t0);
    router.route(&on(&[1], 51, 2), t0, &mut rng).unwrap();
    router.route(&on(&[2], 51, 3), t0, &mut rng).unwrap();
    let none = Claims::default();
    // Left alone, a request that may use 2 or 3 goes to 2, the cheaper.
    let b = on(&[2, 3], 16, 4);
    assert!(router.queue_gate_open(&b, thr, &none));
    assert_eq!(router.explain(&b).0.iter().min_by(|x, y| x.terms.logit.total_cmp(&y.terms.logit)).unwrap().target.worker.id, WorkerId(2));
    // A waiting request that may use 1 or 2 is blocked, and claims them.
    let a = on(&[1, 2], 16, 5);
    assert!(!router.queue_gate_open(&a, thr, &none));
    let mut claims = Claims::default();
    router.claim_pool(&a, &mut claims);
    // Behind it, the request that may use 2 or 3 still runs — on 3; one that needs 1 waits; one
    // without a subset runs on 3.
    assert!(router.queue_gate_open(&b, thr, &claims));
    assert_eq!(router.route_waiting(&b, None, &claims, t0, &mut rng).unwrap().decode.worker.id, WorkerId(3));
    assert!(!router.queue_gate_open(&on(&[1], 16, 6), thr, &claims));
    let any = RoutingRequest { tokens: vec![7; 16], ..Default::default() };
    assert!(router.queue_gate_open(&any, thr, &claims));
    assert_eq!(router.route_waiting(&any, None, &claims, t0, &mut rng).unwrap().decode.worker.id, WorkerId(3));
}

/// The order `n` requests leave a queue built from `args`, pushed at one instant with
/// (uncached tokens, priority hint) each.
fn order(args: &[&str], reqs: &[(u64, Option<i32>)]) -> Vec<usize> {
    let mut q = Queue::new(cfg(args).queue_settings().unwrap());
    let t0 = Instant::now();
    for (i, (uncached, p)) in reqs.iter().enumerate() {
        let a = Arrival { priority: Priority::new(*p, None, None), uncached_tokens: *uncached, ..Default::default() };
        q.push(i, a, t0 + Duration::from_millis(i as u64)).unwrap();
    }
    std::iter::from_fn(|| q.pop(t0).map(|d| d.item)).collect()
}

#[test]
fn router_queue_policy() {
    let reqs = [(4000, None), (100, None), (2000, Some(3)), (50, None)];
    // fcfs: arrival order, priority 3 jumps 3 s ahead.
    assert_eq!(order(&["--router-queue-threshold", "0"], &reqs), vec![2, 0, 1, 3]);
    // wspt: (1 + jump) / uncached, highest first: 1/50, 1/100, 4/2000, 1/4000.
    assert_eq!(order(&["--router-queue-threshold", "0", "--router-queue-policy", "wspt"], &reqs), vec![3, 1, 2, 0]);
}

#[test]
fn router_policy_config_and_refresh_and_limits() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("p.yaml");
    std::fs::write(&file, "- name: gold\n  quantum: 4\n  policy: wspt\n- name: bronze\n").unwrap();
    let c = cfg(&[
        "--router-queue-threshold", "2",
        "--router-policy-config", file.to_str().unwrap(),
        "--router-overlap-refresh-after-secs", "0",
        "--queue-max-requests", "7",
        "--queue-max-bytes", "4096",
        "--http-overload-status-code", "503",
    ]);
    let s = c.queue_settings().unwrap();
    let names: Vec<_> = s.classes.iter().map(|c| (c.name.as_str(), c.quantum, c.policy)).collect();
    assert_eq!(names, vec![("gold", 4, Some(QueuePolicy::Wspt)), ("bronze", 1, None)]);
    assert_eq!((s.refresh_after, s.max_requests, s.max_bytes, c.queue_full_status), (None, 7, 4096, 503));
}

#[tokio::test]
async fn invalid_queue_variables_stop_start_up_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.yaml");
    std::fs::write(&bad, "- name: a\n  quantum: 0\n").unwrap();
    for (var, value, expect) in [
        ("DYN_ROUTER_QUEUE_THRESHOLD", "-1", "DYN_ROUTER_QUEUE_THRESHOLD"),
        ("DYN_ROUTER_QUEUE_POLICY", "lifo", "DYN_ROUTER_QUEUE_POLICY"),
        ("DYN_HTTP_OVERLOAD_STATUS_CODE", "200", "DYN_HTTP_OVERLOAD_STATUS_CODE"),
        ("DYN_ROUTER_POLICY_CONFIG", bad.to_str().unwrap(), "quantum must be ≥ 1"),
        ("DYN_ROUTER_OVERLAP_REFRESH_AFTER_SECS", "soon", "DYN_ROUTER_OVERLAP_REFRESH_AFTER_SECS"),
    ] {
        let out = common::epp_start_failure(&[(var, std::ffi::OsStr::new(value))]).await;
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{var}={value}: {err}");
        assert!(err.contains(expect) && err.trim().lines().count() == 1, "{var}={value}: {err}");
    }
}
