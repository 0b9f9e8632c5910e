//! The simulator on the start of the real conversation trace: every policy completes every
//! request, KV-aware routing reuses more of the prompt than round-robin, the chart is a PNG, and
//! the engine model and router reproduce Dynamo's own offline replay (its mocker and its KV
//! router, ai-dynamo 1.6.1 from `.venv-dynamo`) on the same requests.

mod common;
#[path = "common/dynamo.rs"]
mod dynamo;

use dynamo_epp::{
    config::Config,
    sim::{self, report::PolicyReport, trace, NamedPolicy, Policy, SimConfig},
};

#[test]
fn kv_aware_routing_reuses_more_than_round_robin_on_the_conversation_trace() {
    let mut t = trace::load(&trace::traces_dir().join("mooncake_conversation.jsonl")).unwrap();
    t.truncate(400);
    let cfg = SimConfig { workers: 4, ..Default::default() };
    let reports = sim::run(&t, &cfg, &sim::standard_policies());
    let by = |n: &str| reports.iter().find(|r| r.policy == n).unwrap();
    for r in &reports {
        assert_eq!((r.completed, r.rejected), (400, 0), "{}", r.policy);
        assert!(r.prefix_reuse <= r.ideal_reuse + 1e-9, "{} beats the ideal", r.policy);
        assert_eq!(r.per_worker.iter().sum::<usize>(), 400);
        assert!(r.ttft_ms.p50 > 0.0 && r.ttft_ms.p99 >= r.ttft_ms.p50);
    }
    let (kv, rr) = (by("kv-events"), by("round-robin"));
    assert!(kv.prefix_reuse > 1.5 * rr.prefix_reuse, "kv {} vs rr {}", kv.prefix_reuse, rr.prefix_reuse);
    assert!(by("approximate").prefix_reuse > rr.prefix_reuse);
    assert!(by("approximate-lru").prefix_reuse > rr.prefix_reuse);
    // Same seed, same result.
    let again = sim::run(&t, &cfg, &sim::standard_policies()[..1]);
    assert_eq!(again[0].ttft_cdf_ms, kv.ttft_cdf_ms);

    let dir = tempfile::tempdir().unwrap();
    let png = dir.path().join("sim.png");
    sim::report::chart(&reports, &png).unwrap();
    let bytes = std::fs::read(&png).unwrap();
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
}

/// What Dynamo's replay reports for one policy (scripts/dynamo_replay.py).
#[derive(serde::Deserialize, Debug)]
struct DynamoReplay {
    policy: String,
    completed: usize,
    prefix_reuse: f64,
    ttft_mean: f64,
    ttft_p50: f64,
    ttft_p99: f64,
    e2e_p99: f64,
}

impl DynamoReplay {
    /// The mean of one policy's runs, field by field.
    fn mean<'a>(runs: impl Iterator<Item = &'a DynamoReplay>) -> DynamoReplay {
        let runs: Vec<&DynamoReplay> = runs.collect();
        let avg = |f: fn(&DynamoReplay) -> f64| runs.iter().map(|r| f(r)).sum::<f64>() / runs.len() as f64;
        DynamoReplay {
            policy: runs[0].policy.clone(),
            completed: runs.iter().map(|r| r.completed).min().unwrap(),
            prefix_reuse: avg(|r| r.prefix_reuse),
            ttft_mean: avg(|r| r.ttft_mean),
            ttft_p50: avg(|r| r.ttft_p50),
            ttft_p99: avg(|r| r.ttft_p99),
            e2e_p99: avg(|r| r.e2e_p99),
        }
    }
}

fn near(ours: f64, theirs: f64, rel: f64, what: &str) {
    eprintln!("{what}: ours {ours:.4}, Dynamo's {theirs:.4} ({:+.1} %)", (ours / theirs - 1.0) * 100.0);
    assert!((ours - theirs).abs() <= rel * theirs, "{what}: ours {ours:.4} vs Dynamo's {theirs:.4} (allowed ±{:.0} %)", rel * 100.0);
}

/// Round-robin takes the router out, so it compares the engine models alone and must agree
/// almost exactly. KV-aware routing breaks cost ties at random in Dynamo (unseeded), so one replay
/// is a noisy reference: 40 runs of these requests spread 18.8–21.0 % reuse (sd 0.56 points),
/// 9.3–10.2 s E2E p99 and 1.79–1.84 s TTFT p99 — one CI run drew 18.3 %. The reference is
/// therefore the mean of several of Dynamo's runs, which moves about half as much.
#[test]
fn engine_model_and_router_reproduce_dynamos_own_replay() {
    const REQUESTS: usize = 2000;
    const WORKERS: usize = 8;
    const DYNAMO_RUNS: usize = 5;
    let path = trace::traces_dir().join("mooncake_conversation.jsonl");
    let dir = tempfile::tempdir().unwrap();
    let head = dir.path().join("head.jsonl");
    let text = std::fs::read_to_string(&path).unwrap();
    let lines: Vec<&str> = text.lines().take(REQUESTS).collect();
    std::fs::write(&head, lines.join("\n") + "\n").unwrap();

    let policies = ["round_robin", "kv_router", "kv_router:router_track_active_blocks=false"];
    let out = std::process::Command::new(dynamo::dynamo_venv().join("bin/python"))
        .arg(common::repo_root().join("scripts/dynamo_replay.py"))
        .arg(&head)
        .arg(WORKERS.to_string())
        .args(policies.iter().cycle().take(policies.len() * DYNAMO_RUNS))
        .env("DYN_LOG", "error")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let runs: Vec<DynamoReplay> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(runs.len(), policies.len() * DYNAMO_RUNS);
    let theirs: Vec<DynamoReplay> = policies.iter().map(|p| DynamoReplay::mean(runs.iter().filter(|r| r.policy == *p))).collect();
    assert_eq!(theirs.iter().map(|d| d.policy.as_str()).collect::<Vec<_>>(), policies);

    let mut t = trace::load(&path).unwrap();
    t.truncate(REQUESTS);
    let tuned = Config::from_args(["dynamo-epp", "--track-active-blocks", "false"]).map_err(|(m, _)| m).unwrap();
    let mut ours = sim::standard_policies();
    ours.retain(|p| p.name == "round-robin" || p.name == "kv-events");
    ours.push(NamedPolicy { name: "tuned".into(), policy: Policy::Router { kv: tuned.kv_settings(), sched: tuned.sched_settings(), queue: None } });
    let cfg = SimConfig { workers: WORKERS, ..Default::default() };
    let reports = sim::run(&t, &cfg, &ours);
    let by = |n: &str| -> &PolicyReport { reports.iter().find(|r| r.policy == n).unwrap() };

    for (name, d) in [("round-robin", &theirs[0]), ("kv-events", &theirs[1]), ("tuned", &theirs[2])] {
        let r = by(name);
        assert_eq!((r.completed, d.completed), (REQUESTS, REQUESTS), "{name}");
        // p99s of 2,000 requests are the 20th-largest value: the tails move more with ties.
        let (reuse, ttft, tail, e2e) = if name == "round-robin" { (0.01, 0.01, 0.01, 0.01) } else { (0.08, 0.04, 0.08, 0.15) };
        near(r.prefix_reuse, d.prefix_reuse, reuse, &format!("{name} prefix reuse"));
        near(r.ttft_ms.p50, d.ttft_p50, ttft, &format!("{name} TTFT p50"));
        near(r.ttft_ms.p99, d.ttft_p99, tail, &format!("{name} TTFT p99"));
        near(r.ttft_ms.mean, d.ttft_mean, ttft, &format!("{name} TTFT mean"));
        near(r.e2e_ms.p99, d.e2e_p99, e2e, &format!("{name} E2E p99"));
    }
}
