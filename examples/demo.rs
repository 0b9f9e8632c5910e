//! The demo (`scripts/demo.sh`): the EPP doing its main job on one machine, through a real Envoy.
//!
//! nats-server with JetStream; dynamo-epp with the Qwen3 tokenizer and KV events over JetStream;
//! mock engines (tests/common/kv_worker.rs) that cache prompts in 16-token blocks and publish
//! Dynamo-format KV events for what they store and evict; Envoy with the ext_proc filter in
//! front. Then: a long chat sent twice (the second time to the worker that cached it), the
//! injected `token_data`, a completion, an SSE stream, a malformed body, a disaggregated pair,
//! Explain through grpcurl, and a metrics excerpt.
//!
//! `demo [AGGREGATED_FLEET] [DISAGGREGATED_FLEET]`, defaults deploy/demo/workers.yaml and
//! deploy/demo/workers-disagg.yaml.

#[path = "../tests/common/mod.rs"]
mod common;

use std::{sync::Arc, time::Duration};

use common::{
    kv_worker::{KvWorker, KvWorkerConfig, WorkerStats},
    *,
};
use dynamo_epp::workers::{file, Fleet};
use serde_json::{json, Value};

const MODEL: &str = "qwen3";
/// Each mock engine's KV cache, in blocks: small, so the longest chat makes one evict.
const ENGINE_BLOCKS: usize = 128;

struct Demo {
    client: reqwest::Client,
    envoy: Envoy,
    epp: Epp,
    workers: Vec<KvWorker>,
}

/// What one request through Envoy did.
struct Outcome {
    status: reqwest::StatusCode,
    text: String,
    /// The worker that served it and what it saw, if any did.
    served: Option<(String, common::kv_worker::Served)>,
}

impl Demo {
    async fn send(&self, path: &str, body: String) -> Outcome {
        let before: Vec<usize> = self.workers.iter().map(|w| w.served().len()).collect();
        let r = self.client.post(self.envoy.url(path)).header("content-type", "application/json").body(body).send().await.expect("request through Envoy");
        let status = r.status();
        let text = r.text().await.unwrap();
        let served = self.workers.iter().zip(before).find_map(|(w, n)| w.served().get(n).map(|s| (w.name().to_string(), s.clone())));
        Outcome { status, text, served }
    }

    /// The sum of a histogram's observations so far (e.g. predicted cached tokens).
    async fn sum(&self, metric: &str) -> f64 {
        self.epp.metric(&format!("{metric}_sum")).await.unwrap_or(0.0)
    }

    /// Waits until the EPP has applied every event the engines published; returns the count.
    async fn wait_events(&self, stats: &WorkerStats) -> f64 {
        let published = stats.produced.load(std::sync::atomic::Ordering::Relaxed) as f64;
        self.epp.wait_metric("dynamo_epp_kv_events_applied_total", Duration::from_secs(10), |v| v >= published).await
    }
}

fn header<'a>(s: &'a common::kv_worker::Served, k: &str) -> &'a str {
    s.headers.get(k).map_or("-", String::as_str)
}

/// A multi-turn support conversation of about `turns` × 150 tokens.
fn long_chat(turns: usize, last: &str) -> Value {
    let mut messages = vec![json!({"role": "system", "content": "You are the on-call assistant of a GPU inference fleet. Answer precisely, cite the runbook section, and never guess a metric you cannot see."})];
    for t in 0..turns {
        messages.push(json!({"role": "user", "content": format!("Turn {t}: worker qwen-{t} reports KV cache usage at {}% with {} running requests; the gateway shows p99 time to first token rising from {} ms. Which runbook step applies, and what should the router do with requests that share the long system prompt and tool schema of the agent session {}?", 60 + t % 40, 8 + t, 180 + 7 * t, 1000 + t)}));
        messages.push(json!({"role": "assistant", "content": format!("Step {t}.2 of the runbook: keep routing the session's follow-ups to the worker that holds its prefix (cache reuse saves prefill), but cap its queue; move new sessions to the least loaded worker, and page if usage stays above 95% for {} minutes.", 5 + t % 10)}));
    }
    messages.push(json!({"role": "user", "content": last}));
    json!({"model": MODEL, "messages": messages, "max_tokens": 64})
}

fn load_fleet(path: &str) -> (String, Fleet) {
    let yaml = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let fleet = file::parse(&yaml).unwrap_or_else(|e| panic!("{path}: {e}"));
    (yaml, fleet)
}

/// A path as the user would type it: relative to the repository when inside it.
fn shown(path: &std::path::Path) -> String {
    path.strip_prefix(env!("CARGO_MANIFEST_DIR")).unwrap_or(path).display().to_string()
}

fn section(title: &str) {
    println!("\n== {title}");
}

#[tokio::main]
async fn main() {
    let root = env!("CARGO_MANIFEST_DIR");
    let mut args = std::env::args().skip(1);
    let agg_path = args.next().unwrap_or_else(|| format!("{root}/deploy/demo/workers.yaml"));
    let disagg_path = args.next().unwrap_or_else(|| format!("{root}/deploy/demo/workers-disagg.yaml"));
    let (agg_yaml, agg) = load_fleet(&agg_path);
    let (disagg_yaml, disagg) = load_fleet(&disagg_path);
    let model = tokenizer_fixtures().join("qwen3");

    // ---- the chain
    let nats = NatsServer::start().await;
    let js = kv_event_publisher(&nats.url()).await;
    let stats = Arc::new(WorkerStats::default());
    let mut workers = Vec::new();
    for w in agg.workers.iter().chain(&disagg.workers) {
        let cfg = KvWorkerConfig {
            id: w.id,
            name: w.name.clone(),
            addr: w.endpoint,
            block_size: agg.block_size.unwrap_or(16) as usize,
            capacity_blocks: ENGINE_BLOCKS,
            decode: Duration::from_millis(20),
            record: true,
        };
        workers.push(KvWorker::start(cfg, js.clone(), stats.clone()).await);
    }
    let env = vec![
        ("RUST_LOG".to_string(), "warn".to_string()),
        ("DYN_MODEL_PATH".to_string(), model.display().to_string()),
        ("DYN_MODEL_NAME".to_string(), MODEL.to_string()),
        ("DYN_EVENT_PLANE".to_string(), "jetstream".to_string()),
        ("NATS_SERVER".to_string(), nats.url()),
        ("DYN_EPP_KV_CONSUMER_NAME".to_string(), "demo".to_string()),
    ];
    let epp = Epp::start(&agg_yaml, EppOptions { env, ..Default::default() }).await;
    epp.wait_health("", "SERVING", Duration::from_secs(30)).await;
    let envoy = Envoy::start(Some(&EppLink { port: epp.grpc_port, tls: false })).await;
    let d = Demo { client: reqwest::Client::new(), envoy, epp, workers };

    println!("dynamo-epp demo: client → Envoy (ext_proc) → dynamo-epp → mock engines; KV events over NATS JetStream");
    println!("  nats-server  {} (JetStream)", nats.url());
    println!("  dynamo-epp   ext_proc 127.0.0.1:{}, metrics :{}; tokenizer {}", d.epp.grpc_port, d.epp.metrics_port, shown(&model));
    println!("  envoy        http://127.0.0.1:{}", d.envoy.port);
    println!("  fleet        {}:", shown(agg_path.as_ref()));
    for w in &agg.workers {
        println!("               {:<26} {:<16} instance id {}", w.name, w.endpoint, w.id);
    }

    // ---- a long chat, twice
    section("a long chat, sent twice");
    let first = long_chat(12, "Summarize the incident so far in three bullet points.");
    let o = d.send("/v1/chat/completions", first.to_string()).await;
    let (w1, s1) = o.served.expect("the first chat reached a worker");
    println!("1st send → HTTP {}, worker {w1} (x-dynamo-worker-instance-id {})", o.status.as_u16(), header(&s1, "x-dynamo-worker-instance-id"));
    println!("          token_data injected by the EPP: {} ids; the worker had {} of them cached", s1.token_data, s1.cached_tokens);
    let events = d.wait_events(&stats).await;
    println!("          {w1} cached the prompt's blocks and published a KV event; the EPP has applied {events} so far");

    let second = long_chat(12, "Summarize the incident so far in three bullet points.").to_string();
    // Explain: what the EPP would decide now for the same chat (nothing is booked).
    let explained = grpcurl_explain(&d, &second);
    let predicted_sum = d.sum("dynamo_epp_predicted_cached_tokens").await;
    let o = d.send("/v1/chat/completions", second.clone()).await;
    let predicted = d.sum("dynamo_epp_predicted_cached_tokens").await - predicted_sum;
    let (w2, s2) = o.served.expect("the second chat reached a worker");
    println!(
        "2nd send → HTTP {}, worker {w2} ({}), predicted cached tokens {predicted} (Explain: {}), the worker reports {} cached of {}",
        o.status.as_u16(),
        if w2 == w1 { "the one that cached it" } else { "NOT the one that cached it" },
        explained.as_ref().map_or("-".to_string(), |e| e["decode"]["cachedTokens"].as_str().unwrap_or("0").to_string()),
        s2.cached_tokens,
        s2.token_data
    );
    let mut headers: Vec<_> = s2.headers.iter().filter(|(k, _)| k.starts_with("x-dynamo-") || k.starts_with("x-gateway-")).collect();
    headers.sort();
    for (k, v) in headers {
        println!("          {k}: {v}");
    }

    // ---- completions, SSE, malformed
    section("a completion, a stream, a malformed body");
    let o = d.send("/v1/completions", json!({"model": MODEL, "prompt": "Once upon a time, a router", "max_tokens": 8}).to_string()).await;
    let (w, s) = o.served.expect("the completion reached a worker");
    println!("POST /v1/completions → HTTP {}, worker {w}, token_data {} ids", o.status.as_u16(), s.token_data);
    let stream = json!({"model": MODEL, "stream": true, "messages": [{"role": "user", "content": "Stream a short greeting."}]}).to_string();
    let o = d.send("/v1/chat/completions", stream).await;
    let (w, _) = o.served.expect("the stream reached a worker");
    let events: Vec<&str> = o.text.lines().filter(|l| l.starts_with("data:")).collect();
    println!("POST /v1/chat/completions (stream) → HTTP {}, worker {w}, {} SSE events, last {:?}", o.status.as_u16(), events.len(), events.last().unwrap_or(&""));
    let o = d.send("/v1/chat/completions", json!({"model": MODEL, "messages": "not a list"}).to_string()).await;
    println!(
        "POST /v1/chat/completions, malformed → HTTP {}, {}; {}",
        o.status.as_u16(),
        o.text.trim(),
        if o.served.is_none() { "reached no worker" } else { "REACHED A WORKER" }
    );

    // ---- Explain (printed here: its call came before the second send)
    section("Explain for the long chat, through grpcurl (before its second send)");
    match &explained {
        Some(e) => {
            println!("routingMode {}, promptTokens {}, blockSize {}", e["routingMode"].as_str().unwrap_or("?"), e["promptTokens"], e["blockSize"]);
            println!("{:<26} {:>9} {:>8} {:>9} {:>8} {:>9} {:>7} {:>7} {:>6}", "worker", "overlap", "cached", "prefill", "credit", "decode", "cost", "p", "");
            for c in e["candidates"].as_array().into_iter().flatten() {
                let f = |k: &str| c[k].as_f64().or_else(|| c[k].as_str().and_then(|s| s.parse().ok())).unwrap_or(0.0);
                let pick = if c["workerId"] == e["decode"]["workerId"] { "← pick" } else { "" };
                println!(
                    "{:<26} {:>9} {:>8} {:>9.2} {:>8.2} {:>9.2} {:>7.2} {:>7.2} {pick}",
                    c["name"].as_str().unwrap_or("?"),
                    f("overlapDeviceBlocks"),
                    f("cachedTokens"),
                    f("prefillBlocks"),
                    f("creditBlocks"),
                    f("decodeBlocks"),
                    f("cost"),
                    f("probability")
                );
            }
            println!("(overlap in blocks; cost = prefill − credit + decode blocks, Dynamo's worker_logit; lowest wins)");
        }
        None => println!("grpcurl unavailable (run scripts/setup.sh)"),
    }

    // ---- disaggregated
    section(&format!("disaggregated: the workers file now holds {}", shown(disagg_path.as_ref())));
    std::fs::write(&d.epp.workers_file, &disagg_yaml).unwrap();
    d.epp.wait_metric("dynamo_epp_workers", Duration::from_secs(10), |v| v == disagg.workers.len() as f64).await;
    let o = d.send("/v1/chat/completions", long_chat(15, "And now in one sentence?").to_string()).await;
    let (w, s) = o.served.expect("the disaggregated request reached a worker");
    println!(
        "POST /v1/chat/completions ({} tokens) → HTTP {}, sent to {w}; its cache holds {ENGINE_BLOCKS} blocks of 16, so it evicts",
        s.token_data,
        o.status.as_u16()
    );
    for k in ["x-dynamo-routing-mode", "x-dynamo-prefill-instance-id", "x-dynamo-worker-instance-id", "x-gateway-destination-endpoint"] {
        let v = header(&s, k);
        let who = disagg.workers.iter().find(|w| v == w.id.to_string() || v == w.endpoint.to_string()).map_or(String::new(), |w| format!("  ({})", w.name));
        println!("          {k}: {v}{who}");
    }

    // ---- metrics
    section("metrics excerpt (curl :metrics/metrics)");
    d.wait_events(&stats).await;
    let m = d.epp.metrics().await;
    let get = |name: &str| common::metric_value(&m, name).unwrap_or(f64::NAN);
    let decisions = get("dynamo_epp_decision_seconds_count");
    println!("decisions {decisions}, mean decision latency {:.3} ms", 1e3 * get("dynamo_epp_decision_seconds_sum") / decisions);
    println!(
        "cached tokens over the responses that reported them: predicted {} vs actual {} (dynamo_epp_cached_tokens_compared_total)",
        get("dynamo_epp_cached_tokens_compared_total{source=\"predicted\"}"),
        get("dynamo_epp_cached_tokens_compared_total{source=\"actual\"}")
    );
    println!(
        "KV events applied {} (workers published {} stored / {} removed blocks), index {} blocks",
        get("dynamo_epp_kv_events_applied_total"),
        stats.stored_blocks.load(std::sync::atomic::Ordering::Relaxed),
        stats.removed_blocks.load(std::sync::atomic::Ordering::Relaxed),
        get("dynamo_epp_kv_blocks")
    );
    for l in m.lines().filter(|l| l.starts_with("dynamo_epp_requests_total")) {
        println!("{l}");
    }
}

/// `grpcurl -plaintext -d @ <epp> dynamo.epp.v1.Debug/Explain` for a chat body; None if grpcurl
/// is missing or fails.
fn grpcurl_explain(d: &Demo, body: &str) -> Option<Value> {
    use std::io::Write;
    let grpcurl = repo_root().join(".venv/bin/grpcurl");
    let request = format!(r#"{{"body": {body}}}"#);
    let mut child = std::process::Command::new(grpcurl)
        .args(["-plaintext", "-d", "@", &format!("127.0.0.1:{}", d.epp.grpc_port), "dynamo.epp.v1.Debug/Explain"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .ok()?;
    child.stdin.take()?.write_all(request.as_bytes()).ok()?;
    let out = child.wait_with_output().ok()?;
    if !out.status.success() {
        eprintln!("grpcurl: {}", String::from_utf8_lossy(&out.stderr).trim());
        return None;
    }
    serde_json::from_slice(&out.stdout).ok()
}
