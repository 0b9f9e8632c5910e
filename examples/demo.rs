//! The local demo chain: three mock OpenAI workers from deploy/demo/workers.yaml, the real
//! dynamo-epp (plaintext), and a real Envoy with the ext_proc filter in front. Sends a few
//! requests and prints where each went and which routing headers the worker saw.
//!
//! Run with `scripts/demo.sh` (installs Envoy first).

#[path = "../tests/common/mod.rs"]
mod common;

use common::*;

#[tokio::main]
async fn main() {
    let path = std::env::args().nth(1).unwrap_or_else(|| format!("{}/deploy/demo/workers.yaml", env!("CARGO_MANIFEST_DIR")));
    let yaml = std::fs::read_to_string(&path).expect("read workers file");
    let fleet = dynamo_epp::workers::file::parse(&yaml).expect("valid workers file");
    let mut workers = Vec::new();
    for w in &fleet.workers {
        workers.push(MockWorker::start_on(&w.name, w.endpoint).await);
    }
    let epp = Epp::start(&yaml, EppOptions { env: vec![("RUST_LOG".into(), "info".into())], ..Default::default() }).await;
    let envoy = Envoy::start(Some(&EppLink { port: epp.grpc_port, tls: false })).await;
    println!("fleet from {path}:");
    for w in &fleet.workers {
        println!("  {:<26} {:<16} instance id {}", w.name, w.endpoint, w.id);
    }
    println!("envoy on 127.0.0.1:{} → ext_proc dynamo-epp on 127.0.0.1:{} (health {}, metrics {})\n", envoy.port, epp.grpc_port, epp.health_port, epp.metrics_port);

    let client = reqwest::Client::new();
    let chat = |s: &str| serde_json::json!({"model": "qwen", "messages": [{"role": "user", "content": s}]}).to_string();
    let sends: Vec<(&str, &str, Option<String>, &str)> = vec![
        ("POST", "/v1/chat/completions", Some(chat("hello")), "json"),
        ("POST", "/v1/completions", Some(r#"{"model":"qwen","prompt":"Once upon a time"}"#.into()), "json"),
        ("POST", "/v1/chat/completions", Some(chat("stream please")), "sse"),
        ("GET", "/v1/models", None, "json"),
        ("POST", "/v1/chat/completions", Some(r#"{"model":"qwen","messages":"oops"}"#.into()), "json"),
    ];
    for (i, (method, path, body, mode)) in sends.into_iter().enumerate() {
        let before: Vec<usize> = workers.iter().map(|w| w.seen().len()).collect();
        let mut rb = client.request(method.parse().unwrap(), envoy.url(path)).header("x-mock-mode", mode);
        if let Some(b) = body {
            rb = rb.header("content-type", "application/json").body(b);
        }
        let r = rb.send().await.expect("request through envoy");
        let status = r.status();
        let text = r.text().await.unwrap();
        println!("#{i} {method} {path} ({mode}) → HTTP {status}");
        match workers.iter().enumerate().find(|(j, w)| w.seen().len() > before[*j]) {
            Some((_, w)) => {
                let seen = w.seen().pop().unwrap();
                println!("   served by {} at {}", w.name(), w.addr);
                let mut hs: Vec<_> = seen.headers.iter().filter(|(k, _)| k.starts_with("x-dynamo-") || k.starts_with("x-gateway-")).collect();
                hs.sort();
                for (k, v) in hs {
                    println!("   {k}: {v}");
                }
            }
            None => println!("   reached no worker; answer: {}", text.trim()),
        }
    }
    println!("\nmetrics (excerpt):");
    for l in epp.metrics().await.lines().filter(|l| l.starts_with("dynamo_epp_requests_total") || l.starts_with("dynamo_epp_workers")) {
        println!("  {l}");
    }
}
