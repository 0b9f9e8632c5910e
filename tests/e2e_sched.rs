//! The scheduler end to end: a real Envoy, the real binary with the real Qwen3 tokenizer, mock
//! workers. Load spreading under held requests, disaggregated headers, DYN_ENFORCE_DISAGG, and
//! admission control (429 + Retry-After, then recovery).

mod common;

use std::time::{Duration, Instant};

use common::*;

fn env(extra: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut env = vec![
        ("DYN_MODEL_PATH".to_string(), tokenizer_fixtures().join("qwen3").display().to_string()),
        ("DYN_MODEL_NAME".to_string(), "qwen".to_string()),
    ];
    env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    env
}

/// Mock workers, the EPP over a workers file with the given extra YAML per worker, and Envoy.
struct Setup {
    workers: Vec<MockWorker>,
    epp: Epp,
    envoy: Envoy,
    client: reqwest::Client,
}

impl Setup {
    async fn start(workers: &[(&str, u64, &str)], extra_env: &[(&str, &str)]) -> Setup {
        let mut ws = Vec::new();
        let mut yaml = String::from("block_size: 16\nworkers:\n");
        for (name, id, more) in workers {
            let w = MockWorker::start(name).await;
            yaml.push_str(&format!("  - name: {name}\n    address: {}\n    id: {id}\n", w.addr));
            for line in more.lines().filter(|l| !l.is_empty()) {
                yaml.push_str(&format!("    {line}\n"));
            }
            ws.push(w);
        }
        let epp = Epp::start(&yaml, EppOptions { env: env(extra_env), ..Default::default() }).await;
        let envoy = Envoy::start(Some(&EppLink { port: epp.grpc_port, tls: false })).await;
        Setup { workers: ws, epp, envoy, client: reqwest::Client::new() }
    }

    fn hold(&self, content: String) -> tokio::task::JoinHandle<reqwest::Response> {
        let (c, url) = (self.client.clone(), self.envoy.url("/v1/chat/completions"));
        tokio::spawn(async move { c.post(url).header("x-mock-mode", "hold").body(chat_body(&content)).send().await.unwrap() })
    }

    async fn wait_seen(&self, n: usize) {
        // Generous: five chains of Envoy + EPP start side by side on a loaded 2-core machine.
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.workers.iter().map(|w| w.seen().len()).sum::<usize>() < n {
            assert!(Instant::now() < deadline, "held requests never reached the workers");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn held_requests_spread_evenly_by_booked_load() {
    let s = Setup::start(&[("a", 1, ""), ("b", 2, ""), ("c", 3, "")], &[]).await;
    // Equal-length prompts with nothing cached: each held request adds the same prefill and
    // decode load to its worker, so the cheapest worker is always one with the fewest.
    let held: Vec<_> = (0..30).map(|i| s.hold(format!("held request number {i:03} please"))).collect();
    s.wait_seen(30).await;
    let per: Vec<usize> = s.workers.iter().map(|w| w.seen().len()).collect();
    assert_eq!(per, vec![10, 10, 10]);
    // Per-rank load gauges: every worker holds 10 requests still in prefill (no response yet).
    let text = s.epp.metrics().await;
    for name in ["a", "b", "c"] {
        let gauge = |metric: &str| -> f64 {
            let prefix = format!("dynamo_epp_{metric}{{worker=\"{name}\",dp_rank=\"0\"}} ");
            text.lines().find_map(|l| l.strip_prefix(prefix.as_str())).unwrap_or_else(|| panic!("{prefix} in {text}")).parse().unwrap()
        };
        assert_eq!(gauge("worker_active_requests"), 10.0);
        assert!(gauge("worker_active_prefill_tokens") >= 10.0 * 5.0);
        assert!(gauge("worker_active_blocks") >= 0.0);
    }
    for w in &s.workers {
        w.release(10);
    }
    for h in held {
        assert_eq!(h.await.unwrap().status(), 200);
    }
    assert_eq!(s.epp.wait_metric("dynamo_epp_active_requests", Duration::from_secs(5), |v| v == 0.0).await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn disaggregated_requests_carry_prefill_headers_and_spread_prefill_load() {
    let s = Setup::start(&[("p1", 11, "role: prefill"), ("p2", 12, "role: prefill"), ("d1", 21, "role: decode\ndp_size: 2")], &[]).await;
    // A few blocks each: the decode side books only whole blocks, so shorter prompts would tie
    // the decode ranks and leave their split to chance.
    let prompt = |i| format!("disaggregated prompt {i}: ") + &"decode load is counted in whole blocks. ".repeat(4);
    let held: Vec<_> = (0..4).map(|i| s.hold(prompt(i))).collect();
    s.wait_seen(4).await;
    // Only the decode worker receives traffic; the prefill worker is named in headers.
    assert!(s.workers[0].seen().is_empty() && s.workers[1].seen().is_empty());
    let seen = s.workers[2].seen();
    let mut prefill = std::collections::HashMap::new();
    let mut ranks = std::collections::HashMap::new();
    for r in &seen {
        let h = &r.headers;
        assert_eq!(h["x-dynamo-routing-mode"], "disaggregated");
        assert_eq!(h["x-dynamo-worker-instance-id"], "21");
        assert_eq!(h["x-gateway-destination-endpoint"], s.workers[2].addr.to_string());
        assert_eq!(h["x-dynamo-prefill-dp-rank"], "0");
        *prefill.entry(h["x-dynamo-prefill-instance-id"].clone()).or_insert(0) += 1;
        *ranks.entry(h["x-dynamo-dp-rank"].clone()).or_insert(0) += 1;
    }
    // Held requests never send a first chunk, so their prefill stays booked: 2 and 2.
    assert_eq!(prefill, [("11".to_string(), 2), ("12".to_string(), 2)].into());
    assert_eq!(ranks, [("0".to_string(), 2), ("1".to_string(), 2)].into());
    s.workers[2].release(4);
    for h in held {
        assert_eq!(h.await.unwrap().status(), 200);
    }
    assert_eq!(s.epp.wait_metric("dynamo_epp_active_requests", Duration::from_secs(5), |v| v == 0.0).await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn enforce_disagg_without_prefill_workers_refuses_with_503() {
    let s = Setup::start(&[("d1", 21, "role: decode")], &[("DYN_ENFORCE_DISAGG", "true")]).await;
    let r = s.client.post(s.envoy.url("/v1/chat/completions")).body(chat_body("needs prefill")).send().await.unwrap();
    assert_eq!(r.status(), 503);
    let v: serde_json::Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
    assert_eq!(v["error"]["code"], "prefill_unavailable");
    assert!(v["error"]["message"].as_str().unwrap().contains("prefill routing is unavailable"), "{v}");
    assert!(s.workers[0].seen().is_empty());
    // The default serves the same fleet aggregated.
    let s = Setup::start(&[("d1", 21, "role: decode")], &[]).await;
    let r = s.client.post(s.envoy.url("/v1/chat/completions")).body(chat_body("needs prefill")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(s.workers[0].seen()[0].headers["x-dynamo-routing-mode"], "aggregated");
}

async fn admission(status: &str) {
    // Any request still in prefill makes its worker busy.
    let s = Setup::start(&[("a", 1, ""), ("b", 2, "")], &[("DYN_ACTIVE_PREFILL_TOKENS_THRESHOLD", "1"), ("DYN_EPP_OVERLOAD_STATUS", status)]).await;
    let held: Vec<_> = (0..2).map(|i| s.hold(format!("fills worker {i}"))).collect();
    s.wait_seen(2).await;
    let r = s.client.post(s.envoy.url("/v1/chat/completions")).body(chat_body("one too many")).send().await.unwrap();
    assert_eq!(r.status().as_str(), status);
    assert_eq!(r.headers()["retry-after"], "1");
    let v: serde_json::Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
    assert_eq!(v["error"]["code"], "overloaded");
    assert_eq!(s.workers.iter().map(|w| w.seen().len()).sum::<usize>(), 2, "a rejected request reaches no worker");
    assert_eq!(s.epp.metric("dynamo_epp_active_requests").await, Some(2.0), "a rejected request books nothing");
    // Capacity returns when the held requests end.
    for w in &s.workers {
        w.release(1);
    }
    for h in held {
        assert_eq!(h.await.unwrap().status(), 200);
    }
    let r = s.client.post(s.envoy.url("/v1/chat/completions")).body(chat_body("room again")).send().await.unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn admission_answers_429_with_retry_after_and_recovers() {
    admission("429").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_overload_status_can_be_503() {
    admission("503").await;
}

/// `DYN_EPP_DECISION_WINDOW_MS`: a lone request is decided at once; a request ready while
/// another is still arriving (its body not all in) waits for it in the group, up to the window,
/// and one whose client leaves meanwhile is neither booked nor forwarded.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_decision_window_waits_only_for_requests_still_arriving_and_forwards_no_one_who_left() {
    let s = Setup::start(&[("a", 1, ""), ("b", 2, "")], &[("DYN_EPP_DECISION_WINDOW_MS", "20000")]).await;
    let url = s.envoy.url("/v1/chat/completions");
    let started = Instant::now();
    assert_eq!(s.client.post(&url).body(chat_body("alone")).send().await.unwrap().status(), 200);
    assert!(started.elapsed() < Duration::from_secs(10), "a lone request waited {:?}", started.elapsed());
    // A slow upload: its headers and half its body now, the rest once the next client gave up.
    let body = chat_body("slow to arrive");
    let (half, rest) = body.as_bytes().split_at(body.len() / 2);
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Vec<u8>, std::io::Error>>(2);
    tx.send(Ok(half.to_vec())).await.unwrap();
    let (c, u) = (s.client.clone(), url.clone());
    let slow = tokio::spawn(async move { c.post(u).body(reqwest::Body::wrap_stream(tokio_stream::wrappers::ReceiverStream::new(rx))).send().await.unwrap() });
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Ready while the slow one is still arriving: it waits in the group, and its client gives up.
    let impatient = reqwest::Client::builder().timeout(Duration::from_secs(2)).build().unwrap();
    assert!(impatient.post(&url).body(chat_body("gone before the group ends")).send().await.is_err());
    assert_eq!(s.epp.metric("dynamo_epp_decision_group_size_count").await, Some(1.0), "the group is still open");
    tx.send(Ok(rest.to_vec())).await.unwrap();
    drop(tx);
    assert_eq!(slow.await.unwrap().status(), 200);
    let text = s.epp.metrics().await;
    assert_eq!(metric_value(&text, "dynamo_epp_decision_group_size_count"), Some(2.0), "{text}");
    assert_eq!(metric_value(&text, "dynamo_epp_decision_group_size_sum"), Some(3.0), "one of 1, one of 2");
    let seen: Vec<String> = s.workers.iter().flat_map(|w| w.seen()).map(|r| String::from_utf8_lossy(&r.body).into_owned()).collect();
    assert_eq!(seen.len(), 2, "the one that left was not forwarded: {seen:?}");
    assert!(seen.iter().all(|b| !b.contains("gone before")), "{seen:?}");
    assert_eq!(s.epp.wait_metric("dynamo_epp_active_requests", Duration::from_secs(5), |v| v == 0.0).await, 0.0);
}

/// With the router queue too, a request the window decides may wait in the queue and goes
/// when its worker frees.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_request_the_window_decides_can_wait_in_the_router_queue() {
    let one_pass = "max_num_batched_tokens: 1";
    let env = [("DYN_EPP_DECISION_WINDOW_MS", "100"), ("DYN_ROUTER_QUEUE_THRESHOLD", "0"), ("DYN_EPP_QUEUE_LATE_BINDING", "true")];
    let s = Setup::start(&[("a", 1, one_pass), ("b", 2, one_pass)], &env).await;
    // Both workers hold a prompt in prefill: saturated at threshold 0.
    let held = [s.hold("held on one worker".into()), s.hold("held on the other".into())];
    s.wait_seen(2).await;
    let (c, url) = (s.client.clone(), s.envoy.url("/v1/chat/completions"));
    let waiting = tokio::spawn(async move { c.post(url).body(chat_body("waits its turn")).send().await.unwrap() });
    let depth = |text: &str| text.lines().filter(|l| l.starts_with("dynamo_epp_queue_depth{")).filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok()).sum::<f64>();
    let deadline = Instant::now() + Duration::from_secs(30);
    while depth(&s.epp.metrics().await) != 1.0 {
        assert!(Instant::now() < deadline, "never queued");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for w in &s.workers {
        w.release(1);
    }
    for h in held {
        assert_eq!(h.await.unwrap().status(), 200);
    }
    assert_eq!(waiting.await.unwrap().status(), 200);
    assert_eq!(s.workers.iter().map(|w| w.seen().len()).sum::<usize>(), 3);
    assert_eq!(depth(&s.epp.metrics().await), 0.0);
    assert_eq!(s.epp.wait_metric("dynamo_epp_active_requests", Duration::from_secs(5), |v| v == 0.0).await, 0.0);
}
