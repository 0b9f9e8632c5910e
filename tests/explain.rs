//! The debug API through a real gRPC client and through grpcurl (reflection only, no .proto):
//! Explain shows every candidate's cost terms and predicts the pick the next routed request
//! gets; Workers shows live load; Config the effective settings.

mod common;

use std::time::{Duration, Instant};

use common::*;
use dynamo_epp::server::debug::proto::{debug_client::DebugClient, ConfigRequest, ExplainRequest, WorkersRequest};
use prost_types::{value::Kind, Struct, Value};

fn string(s: &str) -> Value {
    Value { kind: Some(Kind::StringValue(s.into())) }
}

/// `{"model": "qwen", "messages": [{"role": "user", "content": content}]}` as a protobuf Struct.
fn chat_struct(content: &str) -> Struct {
    let msg = Struct { fields: [("role".to_string(), string("user")), ("content".to_string(), string(content))].into() };
    let messages = Value { kind: Some(Kind::ListValue(prost_types::ListValue { values: vec![Value { kind: Some(Kind::StructValue(msg)) }] })) };
    Struct { fields: [("model".to_string(), string("qwen")), ("messages".to_string(), messages)].into() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn explain_predicts_the_pick_and_shows_every_cost_term() {
    let env = vec![
        ("DYN_MODEL_PATH".to_string(), tokenizer_fixtures().join("qwen3").display().to_string()),
        ("DYN_MODEL_NAME".to_string(), "qwen".to_string()),
        ("DYN_ROUTER_DECODE_ACTIVE_REQUEST_WEIGHT".to_string(), "3".to_string()),
    ];
    let chain = Chain::start(&[("a", Some(1)), ("b", Some(2))], EppOptions { env, ..Default::default() }).await;
    let channel = tonic::transport::Channel::from_shared(format!("http://127.0.0.1:{}", chain.epp.grpc_port)).unwrap().connect().await.unwrap();
    let mut client = DebugClient::new(channel);

    // One held request loads a worker.
    let c = chain.client.clone();
    let url = chain.envoy.url("/v1/chat/completions");
    let held = tokio::spawn(async move { c.post(url).header("x-mock-mode", "hold").body(chat_body("a request that stays")).send().await.unwrap() });
    let deadline = Instant::now() + Duration::from_secs(10);
    while chain.total_seen() < 1 {
        assert!(Instant::now() < deadline, "the held request never arrived");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let busy = if chain.workers[0].seen().is_empty() { 2 } else { 1 };

    let e = client
        .explain(ExplainRequest { body: Some(chat_struct("which worker now?")), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((e.routing_mode.as_str(), e.error.as_str(), e.block_size), ("aggregated", "", 16));
    assert!(e.prompt_tokens > 5, "{e:?}");
    assert_eq!(e.candidates.len(), 2);
    for c in &e.candidates {
        // The terms add up to the cost (credit 1, scale 1, nothing cached).
        assert!((c.prefill_cost + c.decode_blocks + c.request_cost - c.cost).abs() < 1e-9, "{c:?}");
        assert_eq!(c.request_cost, 3.0 * c.active_requests as f64);
        assert!((c.prefill_blocks - (c.active_prefill_tokens + e.prompt_tokens as u64) as f64 / 16.0).abs() < 1e-9);
        assert_eq!(c.active_requests, u32::from(c.worker_id == busy));
    }
    let chosen = e.decode.clone().unwrap();
    assert_ne!(chosen.worker_id, busy);
    assert_eq!(chosen.probability, 1.0);
    // Explain booked nothing: the next request goes where it said.
    let r = chain.client.post(chain.envoy.url("/v1/chat/completions")).body(chat_body("which worker now?")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let seen = chain.who_saw("which worker now?");
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].1.headers["x-dynamo-worker-instance-id"], chosen.worker_id.to_string());

    let w = client.workers(WorkersRequest {}).await.unwrap().into_inner();
    let loads: Vec<(u64, u32)> = w.workers.iter().map(|w| (w.worker_id, w.active_requests)).collect();
    assert!(loads.contains(&(busy, 1)) && loads.len() == 2, "{loads:?}");
    assert!(w.workers.iter().all(|w| w.role == "worker"));

    let cfg = client.config(ConfigRequest {}).await.unwrap().into_inner().config.unwrap();
    let weight = &cfg.fields["decode_active_request_weight"];
    assert_eq!(weight.kind, Some(Kind::NumberValue(3.0)));
    assert_eq!(cfg.fields["grpc_port"].kind, Some(Kind::NumberValue(chain.epp.grpc_port as f64)));
    // DYN_TOKENIZER as asked (the default) and what it resolved to for the qwen3 files.
    assert_eq!(cfg.fields["tokenizer"].kind, Some(Kind::StringValue("auto".into())));
    assert_eq!(cfg.fields["tokenizer_backend"].kind, Some(Kind::StringValue("fastokens".into())));
    assert!(matches!(&cfg.fields["tokenizer_backend_reason"].kind, Some(Kind::StringValue(r)) if r.contains("verified")));

    // A body the picker refuses is an invalid argument, not a decision.
    let bad = Struct { fields: [("model".to_string(), string("qwen"))].into() };
    let err = client.explain(ExplainRequest { body: Some(bad), ..Default::default() }).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("messages"), "{}", err.message());

    chain.workers[(busy - 1) as usize].release(1);
    assert_eq!(held.await.unwrap().status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn grpcurl_explains_through_reflection() {
    let env = vec![
        ("DYN_MODEL_PATH".to_string(), tokenizer_fixtures().join("qwen3").display().to_string()),
        ("DYN_SECURE_SERVING".to_string(), "true".to_string()),
    ];
    let epp = Epp::start(&workers_yaml(&[("w", "127.0.0.1:9".parse().unwrap(), Some(7))]), EppOptions { env, tls: true, ..Default::default() }).await;
    let grpcurl = repo_root().join(".venv/bin/grpcurl");
    let body = r#"{"body": {"model": "m", "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 5}}"#;
    let mut child = tokio::process::Command::new(&grpcurl)
        .args(["-insecure", "-d", "@", &format!("localhost:{}", epp.grpc_port), "dynamo.epp.v1.Debug/Explain"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("grpcurl (scripts/setup.sh installs it)");
    use tokio::io::AsyncWriteExt;
    child.stdin.take().unwrap().write_all(body.as_bytes()).await.unwrap();
    let out = child.wait_with_output().await.unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text} {}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["routingMode"], "aggregated");
    assert_eq!(v["decode"]["workerId"], "7");
    assert_eq!(v["candidates"].as_array().unwrap().len(), 1);
    assert!(v["promptTokens"].as_u64().unwrap() > 3, "{v}");
}
