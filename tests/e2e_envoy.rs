//! End-to-end: a real Envoy 1.40 with the ext_proc filter in FULL_DUPLEX_STREAMED mode, the real
//! `dynamo-epp` binary, and mock workers behind an ORIGINAL_DST cluster.

mod common;

use std::time::Duration;

use common::*;

// hash_pod_name("qwen-vllmdecodeworker-0") from the reference vectors (contracts §6.1).
const REF_POD: &str = "qwen-vllmdecodeworker-0";
const REF_POD_ID: &str = "2152695600563388";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn routes_with_destination_and_dynamo_headers_for_both_id_forms() {
    let chain = Chain::start(&[(REF_POD, None), ("explicit", Some(1001))], EppOptions::default()).await;
    // Hold requests open so the least-loaded pick must use both workers.
    let mut pending = Vec::new();
    for i in 0..2 {
        let c = chain.client.clone();
        let url = chain.envoy.url("/v1/chat/completions");
        pending.push(tokio::spawn(async move {
            c.post(url).header("x-mock-mode", "hold").body(chat_body(&format!("req-{i}"))).send().await.unwrap()
        }));
        let booked = chain.epp.wait_metric("dynamo_epp_active_requests", Duration::from_secs(10), |v| v == (i + 1) as f64).await;
        assert_eq!(booked, (i + 1) as f64);
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while chain.total_seen() < 2 {
        assert!(std::time::Instant::now() < deadline, "held requests never reached the workers");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let want_ids = [REF_POD_ID, "1001"];
    for (i, w) in chain.workers.iter().enumerate() {
        let seen = w.seen();
        assert_eq!(seen.len(), 1, "worker {i} should hold exactly one request: {seen:?}");
        let h = &seen[0].headers;
        assert_eq!(h["x-dynamo-worker-instance-id"], want_ids[i]);
        assert_eq!(h["x-dynamo-dp-rank"], "0");
        assert_eq!(h["x-dynamo-routing-mode"], "aggregated");
        assert_eq!(h["x-gateway-destination-endpoint"], w.addr.to_string());
        assert!(!h.contains_key("x-dynamo-prefill-instance-id"));
    }
    for w in &chain.workers {
        w.release(1);
    }
    for p in pending {
        let r = p.await.unwrap();
        assert_eq!(r.status(), 200);
    }
    let routed = chain.epp.metric("dynamo_epp_requests_total{outcome=\"routed\"}").await;
    assert_eq!(routed, Some(2.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_one_megabyte_body_arrives_byte_identical() {
    let chain = Chain::start(&[("w0", None), ("w1", None)], EppOptions::default()).await;
    // Unusual but valid JSON: odd spacing, unicode escapes, big numbers; must not be re-serialized.
    let filler: String = (0..1_000_000).map(|i| (b'a' + (i % 26) as u8) as char).collect();
    let body = format!(
        "{{ \"model\" :\"qwen\",\"messages\":[{{\"role\":\"user\",\"content\":\"\\u00e9{filler}\"}}], \"seed\": 12345678901234567890123, \"temperature\":1.0e0 }}"
    );
    assert!(body.len() > 1_000_000);
    let r = chain.client.post(chain.envoy.url("/v1/chat/completions")).body(body.clone()).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let seen = chain.who_saw("\\u00e9");
    assert_eq!(seen.len(), 1);
    assert!(seen[0].1.body == body.as_bytes(), "body changed in transit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sse_responses_stream_through_unchanged() {
    let chain = Chain::start(&[("w0", None)], EppOptions::default()).await;
    let mut r = chain
        .client
        .post(chain.envoy.url("/v1/chat/completions"))
        .header("x-mock-mode", "hold-sse")
        .body(chat_body("stream me"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "text/event-stream");
    // The first event arrives while the worker is still holding the rest: it really streams.
    let first = tokio::time::timeout(Duration::from_secs(10), r.chunk()).await.expect("first event").unwrap().unwrap();
    assert_eq!(&first[..], b"data: {\"worker\":\"w0\",\"i\":0}\n\n");
    chain.workers[0].release(1);
    let mut rest = Vec::new();
    while let Some(c) = r.chunk().await.unwrap() {
        rest.extend_from_slice(&c);
    }
    let want: String = (1..5).map(|i| format!("data: {{\"worker\":\"w0\",\"i\":{i}}}\n\n")).collect::<String>() + "data: [DONE]\n\n";
    assert_eq!(String::from_utf8(rest).unwrap(), want);
    let active = chain.epp.wait_metric("dynamo_epp_active_requests", Duration::from_secs(5), |v| v == 0.0).await;
    assert_eq!(active, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn get_requests_pass_through_without_dynamo_headers() {
    let chain = Chain::start(&[("w0", None), ("w1", None)], EppOptions::default()).await;
    let r = chain.client.get(chain.envoy.url("/v1/models?probe=1")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let seen = chain.who_saw("/v1/models?probe=1");
    assert_eq!(seen.len(), 1);
    let h = &seen[0].1.headers;
    assert_eq!(seen[0].1.method, "GET");
    assert!(h.keys().all(|k| !k.starts_with("x-dynamo-")), "{h:?}");
    assert_eq!(h["x-gateway-destination-endpoint"], chain.workers[seen[0].0].addr.to_string());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn malformed_bodies_get_openai_errors_and_reach_no_worker() {
    let chain = Chain::start(
        &[("w0", None)],
        EppOptions { env: vec![("DYN_EPP_MAX_BODY_BYTES".into(), "100000".into())], ..Default::default() },
    )
    .await;
    let cases: Vec<(&str, String, u16, Option<&str>)> = vec![
        ("/v1/chat/completions", "{not json".into(), 400, None),
        ("/v1/chat/completions", r#"{"model":"m"}"#.into(), 400, Some("messages")),
        ("/v1/chat/completions", r#"{"model":7,"messages":[]}"#.into(), 400, Some("model")),
        ("/v1/completions", r#"{"model":"m","prompt":{"a":1}}"#.into(), 400, Some("prompt")),
        ("/v1/chat/completions", chat_body(&"x".repeat(200_000)), 413, None),
    ];
    for (path, body, status, param) in cases {
        let r = chain.client.post(chain.envoy.url(path)).body(body.clone()).send().await.unwrap();
        assert_eq!(r.status().as_u16(), status, "{path} {}", &body[..body.len().min(40)]);
        assert!(r.headers()["content-type"].to_str().unwrap().contains("application/json"));
        let v: serde_json::Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
        let msg = v["error"]["message"].as_str().expect("error.message");
        assert!(v["error"]["type"].is_string());
        if let Some(p) = param {
            assert_eq!(v["error"]["param"], p);
            assert!(msg.contains(p), "{msg}");
        }
    }
    assert_eq!(chain.total_seen(), 0, "a worker received a rejected request");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tls_to_the_epp_works_with_an_unverified_upstream_tls_context() {
    let chain = Chain::start(&[("w0", None)], EppOptions { tls: true, ..Default::default() }).await;
    let r = chain.client.post(chain.envoy.url("/v1/completions")).body(r#"{"model":"m","prompt":"tls"}"#).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(chain.who_saw("tls").len(), 1);
    // And plaintext gRPC to the TLS port fails: it really is TLS.
    let plain = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{}", chain.epp.grpc_port))
        .unwrap()
        .connect()
        .await;
    if let Ok(ch) = plain {
        let mut c = tonic_health::pb::health_client::HealthClient::new(ch);
        assert!(c.check(tonic_health::pb::HealthCheckRequest { service: String::new() }).await.is_err());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn subset_hints_are_honoured_and_spoofed_routing_headers_ignored() {
    let chain = Chain::start(&[("w0", None), ("w1", None), ("w2", None)], EppOptions::default()).await;
    let (w1, w2) = (chain.workers[1].addr.to_string(), chain.workers[2].addr.to_string());
    for i in 0..6 {
        let marker = format!("subset-{i}");
        let r = chain
            .client
            .post(chain.envoy.url("/v1/chat/completions"))
            .header("x-test-subset-hint", &w1)
            .header("x-gateway-destination-endpoint", &w2) // spoof
            .header("x-dynamo-worker-instance-id", "42") // spoof
            .header("x-dynamo-prefill-instance-id", "43") // spoof
            .body(chat_body(&marker))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let seen = chain.who_saw(&marker);
        assert_eq!(seen.len(), 1);
        assert_eq!(seen[0].0, 1, "went outside the subset");
        let h = &seen[0].1.headers;
        assert_ne!(h["x-dynamo-worker-instance-id"], "42");
        assert!(!h.contains_key("x-dynamo-prefill-instance-id"));
    }
    // A bare-IP entry matches any port on that host.
    let r = chain
        .client
        .post(chain.envoy.url("/v1/chat/completions"))
        .header("x-test-subset-hint", "127.0.0.1")
        .body(chat_body("bare-ip"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // A subset matching no worker is a 503, and nothing is forwarded.
    let before = chain.total_seen();
    let r = chain
        .client
        .post(chain.envoy.url("/v1/chat/completions"))
        .header("x-test-subset-hint", "10.255.255.1:8000")
        .body(chat_body("nowhere"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(chain.total_seen(), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_hundred_concurrent_streams() {
    let chain = Chain::start(&[("w0", None), ("w1", None), ("w2", None)], EppOptions::default()).await;
    let mut tasks = Vec::new();
    for i in 0..200 {
        let c = chain.client.clone();
        let url = chain.envoy.url("/v1/chat/completions");
        tasks.push(tokio::spawn(async move {
            let r = c.post(url).header("x-mock-mode", "sse").body(chat_body(&format!("conc-{i}"))).send().await.unwrap();
            let status = r.status();
            let text = r.text().await.unwrap();
            (status, text)
        }));
    }
    for t in tasks {
        let (status, text) = t.await.unwrap();
        assert_eq!(status, 200);
        assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    }
    let per: Vec<usize> = chain.workers.iter().map(|w| w.seen().len()).collect();
    assert_eq!(per.iter().sum::<usize>(), 200);
    assert!(per.iter().all(|&n| n >= 40), "load not spread: {per:?}");
    assert_eq!(chain.epp.wait_metric("dynamo_epp_active_requests", Duration::from_secs(5), |v| v == 0.0).await, 0.0);
    assert_eq!(chain.epp.wait_metric("dynamo_epp_inflight_streams", Duration::from_secs(5), |v| v == 0.0).await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_that_disconnects_leaves_no_state_behind() {
    use tokio::io::AsyncWriteExt;
    let chain = Chain::start(&[("w0", None)], EppOptions::default()).await;
    // Mid-body: announce 100 kB, send 1 kB, hang up.
    {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", chain.envoy.port)).await.unwrap();
        s.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 100000\r\n\r\n").await.unwrap();
        s.write_all(&[b' '; 1000]).await.unwrap();
        let streams = chain.epp.wait_metric("dynamo_epp_inflight_streams", Duration::from_secs(5), |v| v == 1.0).await;
        assert_eq!(streams, 1.0, "the EPP never saw the half-sent request");
    }
    assert_eq!(chain.epp.wait_metric("dynamo_epp_inflight_streams", Duration::from_secs(10), |v| v == 0.0).await, 0.0);
    // Mid-response: the worker holds, the client gives up; the booking must be freed.
    let c = chain.client.clone();
    let url = chain.envoy.url("/v1/chat/completions");
    let req = tokio::spawn(async move { c.post(url).header("x-mock-mode", "hold").body(chat_body("abandon")).send().await });
    assert_eq!(chain.epp.wait_metric("dynamo_epp_active_requests", Duration::from_secs(5), |v| v == 1.0).await, 1.0);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while chain.who_saw("abandon").is_empty() {
        assert!(std::time::Instant::now() < deadline, "the held request never reached the worker");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    req.abort();
    assert_eq!(chain.epp.wait_metric("dynamo_epp_active_requests", Duration::from_secs(10), |v| v == 0.0).await, 0.0);
    assert_eq!(chain.epp.wait_metric("dynamo_epp_inflight_streams", Duration::from_secs(10), |v| v == 0.0).await, 0.0);
    assert_eq!(chain.total_seen(), 1, "the half-sent body must not reach the worker");
    chain.workers[0].release(1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn health_is_not_serving_until_the_fleet_exists() {
    let w = MockWorker::start("late").await;
    let epp = Epp::start("", EppOptions { write_workers_first: false, ..Default::default() }).await;
    for svc in ["", "inference-extension", "envoy.service.ext_proc.v3.ExternalProcessor", "liveness", "readiness"] {
        assert_eq!(epp.health(svc).await, "NOT_SERVING", "{svc}");
    }
    let envoy = Envoy::start(Some(&EppLink { port: epp.grpc_port, tls: false })).await;
    let r = reqwest::Client::new().post(envoy.url("/v1/chat/completions")).body(chat_body("early")).send().await.unwrap();
    assert_eq!(r.status(), 503);
    std::fs::write(&epp.workers_file, workers_yaml(&[("late", w.addr, None)])).unwrap();
    assert_eq!(epp.wait_health("inference-extension", "SERVING", Duration::from_secs(10)).await, "SERVING");
    let r = reqwest::Client::new().post(envoy.url("/v1/chat/completions")).body(chat_body("late")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(epp.metric("dynamo_epp_workers").await, Some(1.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_workers_file_reloads_and_a_bad_version_keeps_the_old_fleet() {
    let chain = Chain::start(&[("a", None)], EppOptions::default()).await;
    let b = MockWorker::start("b").await;
    std::fs::write(&chain.epp.workers_file, workers_yaml(&[("b", b.addr, None)])).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let r = chain.client.post(chain.envoy.url("/v1/chat/completions")).body(chat_body("reload")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        if !b.seen().is_empty() {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "new fleet never used");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    std::fs::write(&chain.epp.workers_file, "workers: [oops").unwrap();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let r = chain.client.post(chain.envoy.url("/v1/chat/completions")).body(chat_body("after-bad")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(b.seen().len() >= 2, true, "old fleet not kept after an invalid file");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_turns_health_off_then_drains_open_streams_and_exits_zero() {
    let mut chain = Chain::start(&[("w0", None)], EppOptions::default()).await;
    let c = chain.client.clone();
    let url = chain.envoy.url("/v1/chat/completions");
    let held = tokio::spawn(async move { c.post(url).header("x-mock-mode", "hold").body(chat_body("drain")).send().await });
    assert_eq!(chain.epp.wait_metric("dynamo_epp_active_requests", Duration::from_secs(5), |v| v == 1.0).await, 1.0);
    assert_eq!(chain.epp.health("inference-extension").await, "SERVING");
    let t0 = std::time::Instant::now();
    unsafe_kill(chain.epp.pid(), 15);
    assert_eq!(chain.epp.wait_health("inference-extension", "NOT_SERVING", Duration::from_secs(2)).await, "NOT_SERVING");
    // Propagation (1 s in tests) passes; the open stream keeps the process alive.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(chain.epp.child.try_wait().unwrap().is_none(), "exited with a stream still open");
    chain.workers[0].release(1);
    let r = held.await.unwrap().unwrap();
    assert_eq!(r.status(), 200);
    let status = tokio::time::timeout(Duration::from_secs(10), chain.epp.child.wait()).await.expect("exit after drain").unwrap();
    assert!(status.success(), "{status:?}");
    assert!(t0.elapsed() >= Duration::from_secs(1));
}

fn unsafe_kill(pid: i32, sig: i32) {
    let ok = std::process::Command::new("kill").arg(format!("-{sig}")).arg(pid.to_string()).status().unwrap().success();
    assert!(ok);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn grpcurl_lists_the_services_through_reflection() {
    let epp = Epp::start(&workers_yaml(&[]), EppOptions::default()).await;
    let grpcurl = repo_root().join(".venv/bin/grpcurl");
    for port in [epp.grpc_port, epp.health_port] {
        let out = tokio::process::Command::new(&grpcurl)
            .args(["-plaintext", &format!("localhost:{port}"), "list"])
            .output()
            .await
            .expect("grpcurl (scripts/setup.sh installs it)");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{text} {}", String::from_utf8_lossy(&out.stderr));
        assert!(text.contains("grpc.reflection"), "{text}");
        if port == epp.grpc_port {
            assert!(text.contains("envoy.service.ext_proc.v3.ExternalProcessor"), "{text}");
        } else {
            assert!(text.contains("grpc.health.v1.Health"), "{text}");
        }
    }
}

#[tokio::test]
async fn invalid_configuration_stops_start_up_with_one_line_and_exit_2() {
    for (var, val, needle) in [
        ("DYN_EPP_GRPC_PORT", "ninety", "DYN_EPP_GRPC_PORT"),
        ("DYN_SECURE_SERVING", "sometimes", "DYN_SECURE_SERVING"),
        ("DYN_EPP_MAX_BODY_BYTES", "-1", "DYN_EPP_MAX_BODY_BYTES"),
        ("RUST_LOG", "info,[[", "RUST_LOG"),
        // With KV events on (the default), as in Dynamo.
        ("DYN_ROUTER_APPROXIMATE_CACHE_POLICY", "lru", "DYN_USE_KV_EVENTS=false"),
    ] {
        let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_dynamo-epp")).env(var, val).output().await.unwrap();
        assert_eq!(out.status.code(), Some(2), "{var}={val}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.trim_end().lines().count(), 1, "{err}");
        assert!(err.contains(needle) && err.contains(val.trim_start_matches('-')), "{err}");
    }
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("w.yaml");
    std::fs::write(&bad, "workers:\n  - name: a\n    address: not-an-address\n").unwrap();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_dynamo-epp"))
        .env("DYN_EPP_WORKERS_FILE", &bad)
        .env("DYN_EPP_GRPC_PORT", free_port().to_string())
        .env("DYN_EPP_HEALTH_PORT", free_port().to_string())
        .env("DYN_EPP_METRICS_PORT", "0")
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not an ip:port"));
}
