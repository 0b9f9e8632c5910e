//! Interoperability with real NVIDIA Dynamo 1.6.1 (contracts §13): client → Envoy 1.40 →
//! dynamo-epp → `dynamo.frontend --router-mode direct` → `dynamo.mocker` workers, with
//! nats-server (core) as the event plane and file discovery, all on 127.0.0.1.
//!
//! Who served a request is proven from Dynamo's side: the frontend's direct router logs the
//! worker it sent each `x-request-id` to, and every mocker counts the requests it served on its
//! own `/metrics`. Needs `.venv-dynamo` (scripts/setup-dynamo.sh) and the Qwen3 tokenizer fixture.

mod common;
#[path = "common/dynamo.rs"]
mod dynamo;

use std::time::{Duration, Instant};

use dynamo::*;
use serde_json::json;

/// Upper bound for any one exchange: a hung request fails the test instead of stalling CI.
const T: Duration = Duration::from_secs(30);

fn delta(before: &[u64], after: &[u64]) -> Vec<u64> {
    before.iter().zip(after).map(|(b, a)| a - b).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chat_and_completions_through_the_chain_are_served_by_the_worker_our_epp_named() {
    // The fleet file names only the last worker, so the id our EPP puts in
    // x-dynamo-worker-instance-id is known; the direct-mode frontend must serve exactly it.
    let named = 2;
    let chain = InteropChain::start(DynamoOptions::default(), &[named]).await;
    let dy = &chain.dynamo;
    for (path, body) in [
        (
            "/v1/chat/completions",
            json!({"model": MODEL, "messages": [{"role": "user", "content": "Name three rivers."}], "max_tokens": 8}),
        ),
        ("/v1/completions", json!({"model": MODEL, "prompt": "The three longest rivers are", "max_tokens": 8})),
    ] {
        let before = dy.served_all().await;
        let r = chain.post(path, &body, T).await;
        assert_eq!(r.status, 200, "{path}: {}", r.body);
        let j = r.json();
        assert!(!j["choices"].as_array().unwrap().is_empty(), "{path}: {j}");
        assert!((1..=8).contains(&j["usage"]["completion_tokens"].as_u64().unwrap()), "{path}: {j}");
        assert!(j["usage"]["prompt_tokens"].as_u64().unwrap() > 0, "{path}: {j}");
        assert_eq!(dy.wait_frontend_routed_to(&r.x_request_id).await, Some(dy.workers[named].id), "{path}");
        let mut want = vec![0; dy.workers.len()];
        want[named] = 1;
        assert_eq!(delta(&before, &dy.served_all().await), want, "{path}: only the named worker serves");
    }
    // Both went through our EPP, not around it.
    assert_eq!(chain.epp.metric("dynamo_epp_requests_total{outcome=\"routed\"}").await, Some(2.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_frontend_takes_nvext_token_data_as_the_prompt_and_skips_tokenization() {
    // Sent to the frontend directly, as our EPP will once it injects token_data.
    let dy = DynamoFleet::start(DynamoOptions { workers: vec![Mode::Agg; 2], ..Default::default() }).await;
    let client = reqwest::Client::new();
    // 40 ids = 2 full blocks of 16 + 8; nothing like what the chat template makes of "hello".
    let tokens: Vec<u32> = (0..40).map(|i| 1000 + 7 * i).collect();
    let send = |path: &'static str, worker: usize, rid: &'static str, body: serde_json::Value| {
        let (client, url, id) = (client.clone(), dy.frontend_url(path), dy.workers[worker].id);
        async move {
            let h = [("x-dynamo-worker-instance-id", id.to_string()), ("x-request-id", rid.to_string())];
            post_json(&client, &url, &h, &body, T).await
        }
    };
    let chat = json!({"model": MODEL, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4});
    let mut with_tokens = chat.clone();
    with_tokens["nvext"] = json!({"token_data": tokens});

    let before = dy.served_all().await;
    let r = send("/v1/chat/completions", 1, "tok-chat", with_tokens).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["usage"]["prompt_tokens"], 40, "{}", r.body);
    assert_eq!(delta(&before, &dy.served_all().await), vec![0, 1]);
    assert_eq!(dy.wait_frontend_routed_to("tok-chat").await, Some(dy.workers[1].id));
    let skip = dy.wait_frontend_line("tok-chat", "[SIDECAR-SKIP-TOKENIZE]").await;
    let skip = skip.unwrap_or_else(|| panic!("no [SIDECAR-SKIP-TOKENIZE] line for tok-chat:\n{}", dy.frontend_log()));
    assert_eq!(field(&skip, "token_count"), Some("40"), "{skip}");
    assert!(skip.contains("first_tokens=[1000, 1007, 1014, 1021, 1028]"), "{skip}");

    // The same ids as a completion on the same worker: its two full blocks are cached there now…
    let completion = json!({"model": MODEL, "prompt": "ignored", "max_tokens": 4, "nvext": {"token_data": tokens}});
    let again = send("/v1/completions", 1, "tok-again", completion.clone()).await.json();
    assert_eq!(again["usage"]["prompt_tokens"], 40, "{again}");
    let cached = again["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap();
    assert!(cached > 0 && cached % 16 == 0 && cached < 40, "cached_tokens {cached}: {again}");
    // …and not on the other worker.
    let elsewhere = send("/v1/completions", 0, "tok-elsewhere", completion).await.json();
    assert_eq!(elsewhere["usage"]["prompt_tokens_details"]["cached_tokens"], 0, "{elsewhere}");

    // Control: without token_data the frontend tokenizes itself (and says so).
    let r = send("/v1/chat/completions", 1, "tok-none", chat).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_ne!(r.json()["usage"]["prompt_tokens"], 40, "{}", r.body);
    let warned =
        dy.wait_frontend_line("tok-none", "backend_instance_id provided but no token_data; tokenizing prompt").await;
    assert!(warned.is_some(), "{}", dy.frontend_log());
    let log = dy.frontend_log();
    assert!(!log.lines().any(|l| l.contains("x_request_id=\"tok-none\"") && l.contains("[SIDECAR-SKIP-TOKENIZE]")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kv_aware_a_prompt_sent_again_goes_where_the_real_kv_events_put_it() {
    // The EPP indexes the mockers' own KV events (NATS core, msgpack) and routes overlap-first.
    let chain = InteropChain::start_kv_aware(DynamoOptions::default(), &[0, 1, 2]).await;
    let dy = &chain.dynamo;
    let metric = |name: &'static str| {
        let epp = &chain.epp;
        async move { epp.metric(name).await.unwrap_or(0.0) }
    };
    // The EPP subscribes in the background: prime until a real event has been applied.
    let deadline = Instant::now() + T;
    for k in 0u32.. {
        if metric("dynamo_epp_kv_events_applied_total").await >= 1.0 {
            break;
        }
        assert!(Instant::now() < deadline, "no KV event from the mockers reached the EPP");
        let primer: Vec<u32> = (0..32).map(|i| 90_000 + 100 * k + i).collect();
        let r = chain.post("/v1/completions", &json!({"model": MODEL, "prompt": primer, "max_tokens": 1}), T).await;
        assert_eq!(r.status, 200, "{}", r.body);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Three prompts of 8 full blocks each (token ids: the EPP and Dynamo hash the same ids).
    for p in 0..3u32 {
        let prompt: Vec<u32> = (0..128).map(|i| 10_000 + 1_000 * p + i).collect();
        let body = json!({"model": MODEL, "prompt": prompt, "max_tokens": 1});
        let blocks = metric("dynamo_epp_kv_blocks").await;
        let first = chain.post("/v1/completions", &body, T).await;
        assert_eq!(first.status, 200, "{}", first.body);
        assert_eq!(first.json()["usage"]["prompt_tokens_details"]["cached_tokens"], 0, "{}", first.body);
        let cached_on = dy.wait_frontend_routed_to(&first.x_request_id).await.unwrap();
        // Its 8 blocks reach our index from the worker that cached them…
        let now = chain.epp.wait_metric("dynamo_epp_kv_blocks", T, |v| v >= blocks + 8.0).await;
        assert!(now >= blocks + 8.0, "index grew from {blocks} to {now} only");
        // …so the same prompt goes there again, although all three are idle, and hits the cache.
        let again = chain.post("/v1/completions", &body, T).await;
        assert_eq!(again.status, 200, "{}", again.body);
        assert_eq!(dy.wait_frontend_routed_to(&again.x_request_id).await, Some(cached_on), "prompt {p}");
        let hit = again.json()["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap();
        assert!(hit >= 112 && hit % 16 == 0, "cached_tokens {hit}: {}", again.body);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn load_spreads_across_the_real_workers_under_concurrency() {
    let chain = InteropChain::start(DynamoOptions { speedup_ratio: 1.0, ..Default::default() }, &[0, 1, 2]).await;
    let dy = &chain.dynamo;
    let before = dy.served_all().await;
    const N: usize = 30;
    // ~200 decode steps (~1 s at the mocker's real timing): all 30 are in flight together.
    let tasks: Vec<_> = (0..N)
        .map(|i| {
            let (client, url) = (chain.client.clone(), chain.envoy.url("/v1/chat/completions"));
            let body = json!({"model": MODEL, "messages": [{"role": "user", "content": format!("request {i}")}],
                              "max_tokens": 200, "stream": true});
            tokio::spawn(async move { post_json(&client, &url, &[], &body, Duration::from_secs(60)).await })
        })
        .collect();
    let mut replies = Vec::new();
    for t in tasks {
        replies.push(t.await.unwrap());
    }
    let mut per_worker = vec![0u64; dy.workers.len()];
    for r in &replies {
        assert_eq!(r.status, 200, "{}", r.body);
        assert!(r.body.trim_end().ends_with("data: [DONE]") && !r.body.contains("\"error\""), "{}", r.body);
        let id = dy.wait_frontend_routed_to(&r.x_request_id).await.expect("frontend logged no worker");
        per_worker[dy.worker_index(id).expect("a worker outside the fleet served")] += 1;
    }
    // The frontend's log and the workers' own counters agree.
    assert_eq!(delta(&before, &dy.served_all().await), per_worker);
    assert!(per_worker.iter().all(|&n| n >= 5), "not spread: {per_worker:?}");
    let all_overlapped = replies.iter().filter_map(|r| r.first_chunk_at).max().unwrap()
        < replies.iter().map(|r| r.ended_at).min().unwrap();
    if all_overlapped {
        // Least-in-flight with every request open at once can only end even.
        assert_eq!(per_worker, vec![10, 10, 10]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_worker_fails_fast_and_leaves_routing_once_the_fleet_file_drops_it() {
    let chain = InteropChain::start(DynamoOptions { speedup_ratio: 1.0, ..Default::default() }, &[0, 1, 2]).await;
    let victim = 1;
    // Nine long streams (500 decode steps, ~3 s): least-in-flight puts three on each worker.
    // Each is open once its headers arrive, i.e. once its first token exists.
    let opening: Vec<_> = (0..9)
        .map(|i| {
            let (client, url) = (chain.client.clone(), chain.envoy.url("/v1/completions"));
            let body = json!({"model": MODEL, "prompt": format!("long {i}"), "max_tokens": 500, "stream": true});
            tokio::spawn(async move { open_json(&client, &url, &[], &body, Duration::from_secs(60)).await })
        })
        .collect();
    let mut streams = Vec::new();
    for o in opening {
        let r = o.await.unwrap();
        assert_eq!(r.status(), 200);
        streams.push(tokio::spawn(read_reply(r)));
    }
    let dy = &chain.dynamo;
    assert_eq!(
        [dy.in_flight(0).await, dy.in_flight(1).await, dy.in_flight(2).await],
        [3, 3, 3],
        "least-in-flight spreads nine concurrent streams evenly"
    );

    let victim_id = dy.workers[victim].id;
    let killed_at = Instant::now();
    dy.kill_worker(victim).await;
    // Its three streams end (the EPP frees their bookings) quickly.
    let left = chain.epp.wait_metric("dynamo_epp_active_requests", T, |v| v == 6.0).await;
    assert_eq!(left, 6.0);
    let failed_within = killed_at.elapsed();
    assert!(failed_within < Duration::from_secs(5), "streams on the dead worker took {failed_within:?} to fail");

    // The fleet file still lists the victim, now the least loaded: our EPP names it, and the
    // frontend answers at once instead of hanging.
    let sent = Instant::now();
    let probe = chain
        .post("/v1/completions", &json!({"model": MODEL, "prompt": "probe", "max_tokens": 4}), Duration::from_secs(10))
        .await;
    assert_eq!(probe.status, 503, "{}", probe.body);
    assert!(
        probe.ended_at - sent < Duration::from_secs(2),
        "the dead worker's request took {:?}",
        probe.ended_at - sent
    );
    assert_eq!(dy.wait_frontend_routed_to(&probe.x_request_id).await, Some(victim_id));

    // Once the file drops it, nothing is routed there any more.
    chain.set_fleet(&[0, 2]).await;
    for i in 0..6 {
        let r = chain
            .post("/v1/completions", &json!({"model": MODEL, "prompt": format!("after {i}"), "max_tokens": 4}), T)
            .await;
        assert_eq!(r.status, 200, "{}", r.body);
        let id = dy.wait_frontend_routed_to(&r.x_request_id).await.unwrap();
        assert_ne!(id, victim_id);
    }

    // Every stream ended (none hung): the victim's with an error event soon after the kill, the
    // others whole.
    let mut on_victim = 0;
    for s in streams {
        let r = s.await.unwrap();
        if dy.frontend_routed_to(&r.x_request_id) == Some(victim_id) {
            on_victim += 1;
            assert!(r.body.contains("\"error\""), "{}", r.body);
            assert!(r.ended_at - killed_at < Duration::from_secs(5), "a victim stream ended late");
        } else {
            assert_eq!(r.status, 200, "{}", r.body);
            assert!(r.body.trim_end().ends_with("data: [DONE]") && !r.body.contains("\"error\""), "{}", r.body);
        }
    }
    assert_eq!(on_victim, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn disaggregated_the_frontend_runs_prefill_and_decode_where_the_headers_say() {
    // The sidecar side of disaggregation, sent to the frontend directly as our EPP will send it.
    use Mode::{Decode, Prefill};
    let dy =
        DynamoFleet::start(DynamoOptions { workers: vec![Prefill, Prefill, Decode, Decode], ..Default::default() })
            .await;
    let (client, url) = (reqwest::Client::new(), dy.frontend_url("/v1/completions"));
    let body = json!({"model": MODEL, "prompt": "split me in two", "max_tokens": 4});
    let id = |i: usize| dy.workers[i].id.to_string();
    for (prefill, decode) in [(1, 2), (0, 3)] {
        let before = dy.served_all().await;
        let h = [("x-dynamo-prefill-instance-id", id(prefill)), ("x-dynamo-worker-instance-id", id(decode))];
        let r = post_json(&client, &url, &h, &body, T).await;
        assert_eq!(r.status, 200, "{}", r.body);
        let mut want = vec![0; 4];
        want[prefill] = 1;
        want[decode] = 1;
        assert_eq!(delta(&before, &dy.served_all().await), want, "prefill {prefill}, decode {decode}");
    }
    // A decode id alone is refused before any worker runs: always send both (contracts §13).
    let before = dy.served_all().await;
    let h = [("x-dynamo-worker-instance-id", id(2)), ("x-request-id", "decode-only".to_string())];
    let r = post_json(&client, &url, &h, &body, T).await;
    assert_eq!(r.status, 500, "{}", r.body);
    let why = dy.wait_frontend_line("decode-only", "Prefill worker ID required").await;
    assert!(why.is_some(), "{}", dy.frontend_log());
    assert_eq!(delta(&before, &dy.served_all().await), vec![0; 4]);
}

/// Our NATS-core decoder on the real payloads in tests/fixtures/dynamo-1.6.1, against Python
/// msgpack's reading of the same bytes (kv-events.json); our block hashes of the token ids that
/// produced them against the engine's.
#[test]
fn the_nats_decoder_reads_real_dynamo_kv_events() {
    use dynamo_epp::kv::{
        events::{nats, KvCacheEventData, ResidencyDomain, StorageTier},
        hash,
    };
    let dir = common::repo_root().join("tests/fixtures/dynamo-1.6.1");
    let read = |f: &str| std::fs::read(dir.join(f)).unwrap();
    let messages: Vec<serde_json::Value> = serde_json::from_slice(&read("kv-events.json")).unwrap();
    let scenario: serde_json::Value = serde_json::from_slice(&read("scenario.json")).unwrap();
    let u = |v: &serde_json::Value| v.as_u64().unwrap_or_else(|| panic!("not a u64: {v}"));
    let (mut stored, mut removed) = (std::collections::HashMap::new(), 0);
    for m in &messages {
        let env = nats::decode(&read(m["file"].as_str().unwrap())).unwrap();
        let e = &m["envelope"];
        assert_eq!(
            (env.header.publisher_id, env.header.sequence, env.header.published_at),
            (u(&e["publisher_id"]), u(&e["sequence"]), u(&e["published_at"]))
        );
        let want = m["payload"].as_array().unwrap();
        assert_eq!(env.events.len(), want.len(), "{}", m["file"]);
        for (got, want) in env.events.iter().zip(want) {
            assert_eq!(got.worker_id.0, u(&want["worker_id"]));
            assert_eq!((got.storage_tier, got.residency_domain), (StorageTier::Device, Some(ResidencyDomain::Worker)));
            assert_eq!(
                (got.event.event_id, got.event.dp_rank as u64),
                (u(&want["event"]["event_id"]), u(&want["event"]["dp_rank"]))
            );
            let data = &want["event"]["data"];
            match &got.event.data {
                KvCacheEventData::Stored(s) => {
                    let w = &data["stored"];
                    assert_eq!(s.parent_hash.map(|p| p.0), w["parent_hash"].as_u64());
                    let blocks = w["blocks"].as_array().unwrap();
                    assert_eq!(s.blocks.len(), blocks.len());
                    for (b, wb) in s.blocks.iter().zip(blocks) {
                        assert_eq!((b.block_hash.0, b.tokens_hash.0), (u(&wb["block_hash"]), u(&wb["tokens_hash"])));
                        stored.insert(b.block_hash.0, b.tokens_hash.0);
                    }
                }
                KvCacheEventData::Removed(r) => {
                    let w: Vec<u64> = data["removed"]["block_hashes"].as_array().unwrap().iter().map(u).collect();
                    assert_eq!(r.block_hashes.iter().map(|h| h.0).collect::<Vec<_>>(), w);
                    removed += 1;
                }
                other => panic!("unexpected {other:?} for {data}"),
            }
        }
    }
    assert_eq!((stored.len(), removed), (16, 1), "the fixtures' stored blocks and removals");
    // Every full block of every prompt sent is in the engine's events under our hashes:
    // tokens_hash = our local hash, block_hash = our sequence hash.
    let block_size = u(&scenario["block_size"]) as usize;
    for r in scenario["requests"].as_array().unwrap() {
        let tokens: Vec<u32> = r["token_ids"].as_array().unwrap().iter().map(|t| u(t) as u32).collect();
        let local = hash::local_block_hashes(&tokens, block_size, hash::XXH3_SEED);
        for (l, s) in local.iter().zip(hash::seq_hashes(&local)) {
            assert_eq!(stored.get(&s.0), Some(&l.0), "{}", r["what"]);
        }
    }
}

/// Regenerates tests/fixtures/dynamo-1.6.1 (README.md there): real KV-event messages from real
/// mockers over NATS core, with the exact token ids that produced them.
/// `.venv-dynamo/bin/pip install nats-py==2.16.0 msgpack==1.2.4`, then
/// `cargo test --test interop_dynamo -- --ignored capture_kv_event_fixtures`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "regenerates fixtures; needs nats-py and msgpack in .venv-dynamo"]
async fn capture_kv_event_fixtures() {
    use tokio::io::{AsyncBufReadExt, BufReader};

    let out = common::repo_root().join("tests/fixtures/dynamo-1.6.1");
    let opts = DynamoOptions { num_gpu_blocks: Some(8), ..Default::default() };
    let (block_size, namespace) = (opts.block_size, opts.namespace.clone());
    let dy = DynamoFleet::start(opts).await;
    let mut capture = tokio::process::Command::new(dynamo_venv().join("bin/python"))
        .arg(out.join("capture_kv_events.py"))
        .arg(dy.nats.url())
        .arg(&namespace)
        .arg(&out)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(capture.stdout.take().unwrap()).lines();
    assert_eq!(lines.next_line().await.unwrap().as_deref(), Some("ready"), "needs nats-py and msgpack");

    let a: Vec<u32> = (0..40).map(|i| 1000 + 7 * i).collect(); // 2 full blocks + 8
    let a_longer: Vec<u32> = a.iter().copied().chain((0..24).map(|i| 5000 + 3 * i)).collect(); // 4 full blocks
    let b: Vec<u32> = (0..100).map(|i| 20000 + i).collect(); // 6 full blocks
    let c: Vec<u32> = (0..100).map(|i| 30000 + i).collect(); // 6 more: 8-block capacity evicts b's
    let steps = [
        ("prefix A on worker 0: stored, no parent", 0, &a),
        ("A extended on worker 0: two more blocks, parent = A's last full block", 0, &a_longer),
        ("A on worker 1: the same block hashes from another worker", 1, &a),
        ("B on worker 2", 2, &b),
        ("C on worker 2: capacity 8 blocks, so B's blocks are removed", 2, &c),
    ];
    let client = reqwest::Client::new();
    let mut requests = Vec::new();
    for (what, worker, tokens) in steps {
        let body = json!({"model": MODEL, "prompt": "fixture", "max_tokens": 1, "nvext": {"token_data": tokens}});
        let h = [("x-dynamo-worker-instance-id", dy.workers[worker].id.to_string())];
        let r = post_json(&client, &dy.frontend_url("/v1/completions"), &h, &body, T).await;
        assert_eq!(r.status, 200, "{}", r.body);
        requests.push(
            json!({"what": what, "worker": worker, "token_ids": tokens, "max_tokens": 1, "usage": r.json()["usage"]}),
        );
        tokio::time::sleep(Duration::from_millis(300)).await; // keeps the messages in step order
    }
    drop(capture.stdin.take());
    let said = lines.next_line().await.unwrap().unwrap_or_default();
    assert!(capture.wait().await.unwrap().success() && said.starts_with("captured"), "{said}");
    let scenario = json!({
        "dynamo": "ai-dynamo 1.6.1 / ai-dynamo-runtime 1.6.1, dynamo.mocker",
        "namespace": namespace,
        "block_size": block_size,
        "num_gpu_blocks": 8,
        "workers": dy.workers.iter().enumerate().map(|(i, w)| json!({"index": i, "instance_id": w.id})).collect::<Vec<_>>(),
        "requests": requests,
    });
    std::fs::write(out.join("scenario.json"), serde_json::to_string_pretty(&scenario).unwrap() + "\n").unwrap();
}
