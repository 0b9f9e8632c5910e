//! The simulator on the start of the real conversation trace: every policy completes every
//! request, KV-aware routing reuses more of the prompt than round-robin, and the chart is a PNG.

use dynamo_epp::sim::{self, trace, SimConfig};

fn traces() -> std::path::PathBuf {
    std::env::var_os("TRACES_DIR")
        .map(Into::into)
        .unwrap_or_else(|| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/traces"))
}

#[test]
fn kv_aware_routing_reuses_more_than_round_robin_on_the_conversation_trace() {
    let mut t = trace::load(&traces().join("mooncake_conversation.jsonl")).unwrap();
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
    // Same seed, same result.
    let again = sim::run(&t, &cfg, &sim::standard_policies()[..1]);
    assert_eq!(again[0].ttft_cdf_ms, kv.ttft_cdf_ms);

    let dir = tempfile::tempdir().unwrap();
    let png = dir.path().join("sim.png");
    sim::report::chart(&reports, &png).unwrap();
    let bytes = std::fs::read(&png).unwrap();
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
}
