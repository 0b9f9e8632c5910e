//! The router queue end to end: a real Envoy (ext_proc `message_timeout` at Envoy's 200 ms
//! default, `max_message_timeout` set, the gRPC service timeout at 1 s), the real binary with
//! the Qwen3 tokenizer, mock workers.
//! One worker with a batch budget and `DYN_ROUTER_QUEUE_THRESHOLD=0`: any request still in
//! prefill saturates it, so requests are dispatched one at a time, in queue order.

mod common;

use std::time::{Duration, Instant};

use common::*;

struct Setup {
    worker: MockWorker,
    epp: Epp,
    envoy: Envoy,
    client: reqwest::Client,
}

impl Setup {
    async fn start(extra_env: &[(&str, &str)]) -> Setup {
        let worker = MockWorker::start("a").await;
        let yaml = format!("block_size: 16\nworkers:\n  - name: a\n    address: {}\n    id: 1\n    max_num_batched_tokens: 1\n", worker.addr);
        let mut env = vec![
            ("DYN_MODEL_PATH".to_string(), tokenizer_fixtures().join("qwen3").display().to_string()),
            ("DYN_MODEL_NAME".to_string(), "qwen".to_string()),
            ("DYN_ROUTER_QUEUE_THRESHOLD".to_string(), "0".to_string()),
        ];
        env.extend(extra_env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        let epp = Epp::start(&yaml, EppOptions { env, ..Default::default() }).await;
        // Envoy's default message timeout and a gRPC timeout far below the queue waits here:
        // neither may cut a queued request off.
        let envoy = Envoy::start_with_ext_proc_timeouts(&EppLink { port: epp.grpc_port, tls: false }, "1s", "0.2s").await;
        let client = reqwest::Client::builder().pool_max_idle_per_host(512).build().unwrap();
        Setup { worker, epp, envoy, client }
    }

    /// A request the worker holds (in prefill, so the worker stays saturated) until released.
    async fn block(&self) -> tokio::task::JoinHandle<reqwest::Response> {
        let h = self.send("blocker", &[("x-mock-mode", "hold")]);
        self.wait_seen(1).await;
        h
    }

    fn send(&self, content: &str, headers: &[(&str, &str)]) -> tokio::task::JoinHandle<reqwest::Response> {
        let mut rb = self.client.post(self.envoy.url("/v1/chat/completions")).body(chat_body(content));
        for (k, v) in headers {
            rb = rb.header(*k, *v);
        }
        tokio::spawn(async move { rb.send().await.unwrap() })
    }

    async fn wait_seen(&self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.worker.seen().len() < n {
            assert!(Instant::now() < deadline, "only {} of {n} requests reached the worker", self.worker.seen().len());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn queued(&self) -> f64 {
        queue_depth(&self.epp).await
    }

    async fn wait_queued(&self, n: f64) {
        wait_queue_depth(&self.epp, n).await
    }

    /// Sends one request and waits until it is queued, so arrival order is the sending order.
    async fn enqueue(&self, content: &str, headers: &[(&str, &str)]) -> tokio::task::JoinHandle<reqwest::Response> {
        let before = self.queued().await;
        let h = self.send(content, headers);
        self.wait_queued(before + 1.0).await;
        h
    }

    /// The markers the worker saw, in the order it saw them.
    fn order(&self) -> Vec<String> {
        self.worker
            .seen()
            .iter()
            .map(|r| {
                let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
                v["messages"][0]["content"].as_str().unwrap().to_string()
            })
            .collect()
    }

    /// Holds the worker with a blocker, queues `n` requests per group in turn (marker
    /// `"{prefix} {i:03}"`, one header), releases the blocker, checks every answer is 200, and
    /// returns the markers in the order the worker then saw them.
    async fn queue_behind_blocker(&self, groups: &[(&str, usize, (&str, &str))]) -> Vec<String> {
        let blocker = self.block().await;
        let mut handles = Vec::new();
        for (prefix, n, header) in groups {
            for i in 0..*n {
                handles.push(self.enqueue(&format!("{prefix} {i:03}"), &[*header]).await);
            }
        }
        self.worker.release(1);
        assert_eq!(blocker.await.unwrap().status(), 200);
        for h in handles {
            assert_eq!(h.await.unwrap().status(), 200);
        }
        let order = self.order();
        assert_eq!(order[0], "blocker");
        order[1..].to_vec()
    }

    async fn counter(&self, name: &str) -> f64 {
        self.epp.metric(name).await.unwrap_or(0.0)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_hundred_requests_wait_for_capacity_and_go_in_priority_order() {
    let s = Setup::start(&[]).await;
    let blocker = s.block().await;
    // Strict priority 0/1, priority 0/1000 (1000 s ahead: beyond any arrival spread here), by
    // header or in nvext.agent_hints; the expected order is computed from these alone.
    let mut sent = Vec::new();
    for i in 0..200u32 {
        let strict = u32::from(i % 7 == 3);
        let jump = if i % 3 == 1 { 1000 } else { 0 };
        let content = format!("queued request {i:03}");
        let h = if i % 2 == 0 {
            let (st, j) = (strict.to_string(), jump.to_string());
            s.enqueue(&content, &[("x-dynamo-request-strict-priority", st.as_str()), ("x-dynamo-request-priority", j.as_str())]).await
        } else {
            let body = serde_json::json!({"model": "qwen", "messages": [{"role": "user", "content": content}],
                "nvext": {"agent_hints": {"priority": jump, "strict_priority": strict}}});
            let before = s.queued().await;
            let c = s.client.post(s.envoy.url("/v1/chat/completions")).body(body.to_string());
            let h = tokio::spawn(async move { c.send().await.unwrap() });
            s.wait_queued(before + 1.0).await;
            h
        };
        sent.push((strict, jump, i, content, h));
    }
    assert_eq!(s.worker.seen().len(), 1, "nothing passes a saturated worker");
    // Several seconds in the queue, far past Envoy's 200 ms message timeout.
    tokio::time::sleep(Duration::from_secs(3)).await;
    s.worker.release(1);
    assert_eq!(blocker.await.unwrap().status(), 200);
    let mut expected: Vec<_> = sent.iter().map(|(st, j, i, c, _)| (std::cmp::Reverse(*st), std::cmp::Reverse(*j), *i, c.clone())).collect();
    expected.sort();
    for (.., h) in sent {
        let r = h.await.unwrap();
        assert_eq!(r.status(), 200, "{:?}", r.text().await);
    }
    let order = s.order();
    assert_eq!(order[0], "blocker");
    assert_eq!(order[1..], expected.into_iter().map(|e| e.3).collect::<Vec<_>>()[..]);
    assert_eq!(s.counter("dynamo_epp_queue_dispatched_total{class=\"default\"}").await, 200.0);
    assert_eq!(s.counter("dynamo_epp_queue_wait_seconds_count{class=\"default\"}").await, 200.0);
    assert_eq!(s.queued().await, 0.0);
    assert_eq!(s.epp.wait_metric("dynamo_epp_active_requests", Duration::from_secs(5), |v| v == 0.0).await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tenant_sending_ten_times_more_gets_no_more_than_its_share() {
    let s = Setup::start(&[]).await;
    // The heavy tenant's burst arrives first: first come first served would serve all of it
    // before the light tenant's first request.
    let served = s.queue_behind_blocker(&[("heavy", 100, ("x-tenant-id", "heavy")), ("light", 10, ("x-tenant-id", "light"))]).await;
    assert_eq!(served.len(), 110);
    // While both are backlogged (until the light tenant's tenth request), dispatches alternate:
    // the heavy tenant gets at most half plus the turn it started with.
    let last_light = served.iter().rposition(|m| m.starts_with("light")).unwrap();
    let heavy_meanwhile = served[..=last_light].iter().filter(|m| m.starts_with("heavy")).count();
    assert!(heavy_meanwhile <= 11, "heavy got {heavy_meanwhile} of {} dispatches: {served:?}", last_light + 1);
    // Each tenant's own requests keep their arrival order.
    for tenant in ["heavy", "light"] {
        let mine: Vec<_> = served.iter().filter(|m| m.starts_with(tenant)).collect();
        assert!(mine.windows(2).all(|w| w[0] < w[1]), "{tenant}: {mine:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_queue_is_bounded_leaves_on_disconnect_and_evicts_after_its_wait() {
    let s = Setup::start(&[("DYN_EPP_QUEUE_MAX_REQUESTS", "2"), ("DYN_EPP_QUEUE_MAX_WAIT_SECS", "5")]).await;
    let blocker = s.block().await;
    // A client that gives up while queued leaves the queue at once. (2 s: long enough to be
    // seen queued on a loaded machine.)
    let impatient = reqwest::Client::builder().timeout(Duration::from_secs(2)).build().unwrap();
    let c = impatient.post(s.envoy.url("/v1/chat/completions")).body(chat_body("impatient"));
    let gone = tokio::spawn(async move { c.send().await });
    s.wait_queued(1.0).await;
    assert!(gone.await.unwrap().is_err(), "the client timed out");
    s.wait_queued(0.0).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while s.counter("dynamo_epp_queue_evicted_total{reason=\"disconnected\"}").await != 1.0 {
        assert!(Instant::now() < deadline, "no disconnect eviction counted");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Two wait; the third is refused with Dynamo's overload status and an OpenAI error.
    let waiting = [s.enqueue("first", &[]).await, s.enqueue("second", &[]).await];
    let started = Instant::now();
    let r = s.send("third", &[]).await.unwrap();
    assert_eq!(r.status().as_u16(), 529);
    assert_eq!(r.headers()["retry-after"], "1");
    let v: serde_json::Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
    assert_eq!(v["error"]["code"], "queue_full", "{v}");
    assert_eq!(s.counter("dynamo_epp_queue_rejected_total{reason=\"queue_requests_limit\"}").await, 1.0);
    // The two waiting are evicted after DYN_EPP_QUEUE_MAX_WAIT_SECS with 429, not cut off by
    // Envoy's 200 ms message timeout.
    for h in waiting {
        let r = h.await.unwrap();
        assert_eq!(r.status(), 429);
        let v: serde_json::Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
        assert_eq!(v["error"]["code"], "evicted", "{v}");
        assert!(v["error"]["message"].as_str().unwrap().contains("evicted by flow control"));
    }
    assert!(started.elapsed() >= Duration::from_millis(4500), "evicted after {:?}", started.elapsed());
    assert_eq!(s.counter("dynamo_epp_queue_evicted_total{reason=\"timeout\"}").await, 2.0);
    assert_eq!(s.worker.seen().len(), 1, "no queued request reached the worker");
    s.worker.release(1);
    assert_eq!(blocker.await.unwrap().status(), 200);
    // Capacity is back: a new request goes straight through.
    assert_eq!(s.send("after", &[]).await.unwrap().status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn policy_classes_share_dispatches_by_quantum() {
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.yaml");
    std::fs::write(&policy, "classes:\n  - name: batch\n  - name: interactive\n    quantum: 3\n").unwrap();
    let s = Setup::start(&[("DYN_ROUTER_POLICY_CONFIG", policy.to_str().unwrap())]).await;
    let order = s.queue_behind_blocker(&[("batch", 8, ("x-dynamo-meta-policy-class", "batch")), ("interactive", 8, ("x-dynamo-meta-policy-class", "interactive"))]).await;
    let classes: String = order.iter().map(|m| m.chars().next().unwrap()).collect();
    // One batch, three interactive, … (deficit round robin, quantum 1 : 3).
    assert_eq!(classes, "biiibiiibiibbbbb");
    assert_eq!(s.counter("dynamo_epp_queue_dispatched_total{class=\"interactive\"}").await, 8.0);
}

/// Two workers with a 1,024-token pass, both held in prefill by a blocker (worker "short"'s
/// about 70 tokens, the other's about 400): every worker is saturated. A short prompt fits
/// the rest of the short blocker's pass — with late binding (`DYN_EPP_QUEUE_LATE_BINDING`) it
/// joins that pass at once, without it waits; a prompt longer than a pass waits either way,
/// and goes when a worker frees. Nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn late_binding_sends_a_prompt_that_joins_a_booked_pass_past_the_queue() {
    for late in [true, false] {
        let workers = [MockWorker::start("a").await, MockWorker::start("b").await];
        let yaml = format!(
            "block_size: 16\nworkers:\n  - name: a\n    address: {}\n    id: 1\n    max_num_batched_tokens: 1024\n  - name: b\n    address: {}\n    id: 2\n    max_num_batched_tokens: 1024\n",
            workers[0].addr, workers[1].addr
        );
        let env = [
            ("DYN_MODEL_PATH", tokenizer_fixtures().join("qwen3").display().to_string()),
            ("DYN_MODEL_NAME", "qwen".into()),
            ("DYN_ROUTER_QUEUE_THRESHOLD", "0".into()),
            ("DYN_EPP_QUEUE_LATE_BINDING", late.to_string()),
        ];
        let epp = Epp::start(&yaml, EppOptions { env: env.iter().map(|(k, v)| (k.to_string(), v.clone())).collect(), ..Default::default() }).await;
        let envoy = Envoy::start_with_ext_proc_timeouts(&EppLink { port: epp.grpc_port, tls: false }, "1s", "0.2s").await;
        let client = reqwest::Client::new();
        let send = |content: String, hold: bool| {
            let mut rb = client.post(envoy.url("/v1/chat/completions")).body(chat_body(&content));
            if hold {
                rb = rb.header("x-mock-mode", "hold");
            }
            tokio::spawn(async move { rb.send().await.unwrap() })
        };
        let seen = || workers.iter().map(|w| w.seen().len()).sum::<usize>();
        let short = send("alpha ".repeat(60), true);
        wait_until("the short blocker reached a worker", || seen() == 1).await;
        let long = send("beta ".repeat(400), true);
        wait_until("the long blocker reached a worker", || seen() == 2).await;
        let short_worker = workers.iter().position(|w| w.seen().len() == 1 && w.seen()[0].body.windows(5).any(|b| b == b"alpha")).expect("a worker has the short blocker");
        assert_eq!(workers[1 - short_worker].seen().len(), 1, "the blockers are on different workers");

        let mut joining = Some(send("gamma ".repeat(20), false));
        if late {
            let r = tokio::time::timeout(Duration::from_secs(20), joining.take().unwrap()).await.expect("it was not sent past the queue").unwrap();
            assert_eq!(r.status(), 200);
            assert_eq!(workers[short_worker].seen().len(), 2, "it joined the short blocker's pass");
            assert_eq!(queue_depth(&epp).await, 0.0);
        } else {
            // The joining prompt waits.
            wait_queue_depth(&epp, 1.0).await;
        }
        // Longer than a pass: it joins nothing and waits, then goes when the long blocker ends.
        let waiting = send("delta ".repeat(1500), false);
        wait_queue_depth(&epp, if late { 1.0 } else { 2.0 }).await;
        assert_eq!(seen(), if late { 3 } else { 2 });
        workers[1 - short_worker].release(1);
        assert_eq!(long.await.unwrap().status(), 200);
        assert_eq!(waiting.await.unwrap().status(), 200);
        if let Some(j) = joining {
            assert_eq!(j.await.unwrap().status(), 200);
        }
        workers[short_worker].release(1);
        assert_eq!(short.await.unwrap().status(), 200);
        assert_eq!(seen(), 4, "late binding {late}: every request reached a worker once");
        assert_eq!(epp.metric("dynamo_epp_queue_joined_total").await.unwrap_or(0.0), if late { 1.0 } else { 0.0 });
        assert_eq!(queue_depth(&epp).await, 0.0);
        assert_eq!(epp.wait_metric("dynamo_epp_active_requests", Duration::from_secs(5), |v| v == 0.0).await, 0.0);
    }
}

/// Waiting requests, summed over classes and priorities.
async fn queue_depth(epp: &Epp) -> f64 {
    epp.metrics().await.lines().filter(|l| l.starts_with("dynamo_epp_queue_depth{")).filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok()).sum()
}

async fn wait_queue_depth(epp: &Epp, n: f64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let q = queue_depth(epp).await;
        if q == n {
            return;
        }
        assert!(Instant::now() < deadline, "queue depth {q}, expected {n}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn wait_until(what: &str, f: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !f() {
        assert!(Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
