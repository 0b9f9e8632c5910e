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
    assert_eq!(cfg.fields["tokenizer_backend"].kind, Some(Kind::StringValue("epp".into())));
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
async fn explain_under_predicted_ttft_shows_each_prediction_its_parts_and_the_models() {
    let env = vec![
        ("DYN_MODEL_PATH".to_string(), tokenizer_fixtures().join("qwen3").display().to_string()),
        ("DYN_MODEL_NAME".to_string(), "qwen".to_string()),
        ("DYN_ROUTER_POLICY".to_string(), "predicted-ttft".to_string()),
    ];
    let chain = Chain::start(&[("a", Some(1)), ("b", Some(2))], EppOptions { env, ..Default::default() }).await;
    let channel = tonic::transport::Channel::from_shared(format!("http://127.0.0.1:{}", chain.epp.grpc_port)).unwrap().connect().await.unwrap();
    let mut client = DebugClient::new(channel);
    for i in 0..3 {
        let r = chain.client.post(chain.envoy.url("/v1/chat/completions")).body(chat_body(&format!("request {i}"))).send().await.unwrap();
        assert_eq!(r.status(), 200);
        r.bytes().await.unwrap();
    }
    let e = client.explain(ExplainRequest { body: Some(chat_struct("where now?")), ..Default::default() }).await.unwrap().into_inner();
    assert_eq!((e.policy.as_str(), e.routing_mode.as_str()), ("predicted-ttft", "aggregated"));
    assert_eq!(e.candidates.len(), 2);
    for c in &e.candidates {
        assert!(c.predicted_ttft_ms > 0.0 && c.predicted_tpot_ms > 0.0 && c.predicted_speed_factor > 0.0, "{c:?}");
        assert!((c.predicted_queue_ms + c.predicted_prefill_ms + c.predicted_base_ms - c.predicted_ttft_ms).abs() < 1e-9, "{c:?}");
        // Nothing booked: no queue, and no stall guard on top of the TTFT.
        assert_eq!((c.active_requests, c.predicted_queue_ms, c.cost), (0, 0.0, c.predicted_ttft_ms), "{c:?}");
    }
    // One model per candidate rank, then the fleet's: the TTFT fit is the fleet's (every
    // first chunk so far), each rank's speed its own.
    let names: Vec<&str> = e.models.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(names, ["a", "b", "fleet"]);
    for m in &e.models {
        assert_eq!((m.ttft.len(), m.tpot.len(), m.ttft_samples), (5, 3, 3), "{m:?}");
        assert_eq!(m.ttft, e.models[2].ttft);
        assert!(m.speed_factor > 0.0, "{m:?}");
    }
    assert_eq!(e.models[2].speed_factor, 1.0);
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

/// `{"model": "qwen", "messages": [{"role": "user", "content": <n bytes of distinct words>}]}`.
fn big_chat(n: usize, seed: usize) -> Struct {
    let mut text = String::with_capacity(n + 16);
    let mut i = seed * 1_000_003;
    while text.len() < n {
        text.push_str(&format!("w{} ", i % 9973));
        i += 7;
    }
    chat_struct(&text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_debug_api_switched_off_is_neither_served_nor_listed() {
    let yaml = workers_yaml(&[("w", "127.0.0.1:9".parse().unwrap(), Some(7))]);
    let on = Epp::start(&yaml, EppOptions::default()).await;
    let off = Epp::start(&yaml, EppOptions { env: vec![("DYN_EPP_DEBUG_API".into(), "false".into())], ..Default::default() }).await;
    let grpcurl = |port: u16, args: &[&str]| {
        let mut cmd = tokio::process::Command::new(repo_root().join(".venv/bin/grpcurl"));
        cmd.args(["-plaintext", &format!("127.0.0.1:{port}")]).args(args);
        async move {
            let out = cmd.output().await.expect("grpcurl (scripts/setup.sh installs it)");
            (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned())
        }
    };
    let (ok, listed) = grpcurl(on.grpc_port, &["list"]).await;
    assert!(ok && listed.contains("dynamo.epp.v1.Debug") && listed.contains("envoy.service.ext_proc.v3.ExternalProcessor"), "{listed}");
    let (ok, listed) = grpcurl(off.grpc_port, &["list"]).await;
    assert!(ok && !listed.contains("dynamo.epp.v1.Debug") && listed.contains("envoy.service.ext_proc.v3.ExternalProcessor"), "{listed}");
    assert!(!grpcurl(off.grpc_port, &["describe", "dynamo.epp.v1.Debug"]).await.0);

    let client = |port: u16| async move {
        DebugClient::new(tonic::transport::Channel::from_shared(format!("http://127.0.0.1:{port}")).unwrap().connect().await.unwrap())
    };
    assert!(client(on.grpc_port).await.workers(WorkersRequest {}).await.is_ok());
    let err = client(off.grpc_port).await.workers(WorkersRequest {}).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unimplemented);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn explain_obeys_the_request_body_limit_and_deadline_and_runs_a_few_at_once() {
    let model = tokenizer_fixtures().join("qwen3").display().to_string();
    let env = |extra: &[(&str, &str)]| {
        let mut e = vec![("DYN_MODEL_PATH".to_string(), model.clone()), ("DYN_EPP_MAX_BODY_BYTES".to_string(), "1000000".to_string())];
        e.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        EppOptions { env: e, ..Default::default() }
    };
    // One tokenizer thread and a deadline loaded machines meet: admitted Explains finish.
    let chain = Chain::start(&[("w", Some(7))], env(&[("DYN_EPP_TOKENIZER_THREADS", "1"), ("DYN_EPP_TOKENIZATION_TIMEOUT_MS", "60000")])).await;
    let channel = tonic::transport::Channel::from_shared(format!("http://127.0.0.1:{}", chain.epp.grpc_port)).unwrap().connect().await.unwrap();
    let client = DebugClient::new(channel);

    // Over the requests' limit: refused by Explain as by the data path (413).
    let over = big_chat(1_100_000, 0);
    let err = client.clone().explain(ExplainRequest { body: Some(over), ..Default::default() }).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted);
    assert!(err.message().contains("exceeds the limit of 1000000 bytes"), "{}", err.message());
    let text = "x".repeat(1_100_000);
    let r = chain.client.post(chain.envoy.url("/v1/chat/completions")).body(chat_body(&text)).send().await.unwrap();
    assert_eq!(r.status(), 413);

    // Eight large Explains at once: two run, the others are turned away; routing goes on.
    let calls: Vec<_> = (0..8)
        .map(|i| {
            let mut c = client.clone();
            tokio::spawn(async move { c.explain(ExplainRequest { body: Some(big_chat(600_000, i + 1)), ..Default::default() }).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let t = Instant::now();
    let r = chain.client.post(chain.envoy.url("/v1/chat/completions")).body(chat_body("routed meanwhile")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let routed_in = t.elapsed();
    let (mut ok, mut busy) = (0, 0);
    for c in calls {
        match c.await.unwrap() {
            Ok(e) => {
                assert!(e.into_inner().prompt_tokens > 100_000);
                ok += 1;
            }
            Err(s) if s.code() == tonic::Code::ResourceExhausted && s.message().contains("already running") => busy += 1,
            Err(s) => panic!("{s}"),
        }
    }
    println!("{ok} explained, {busy} turned away; a routed request meanwhile took {} ms", routed_in.as_millis());
    assert!(ok >= 1 && busy >= 1 && ok + busy == 8, "{ok} {busy}");

    // Past the tokenization deadline: DEADLINE_EXCEEDED, as the data path's 504.
    let hurried = Epp::start(&workers_yaml(&[("w", chain.workers[0].addr, Some(7))]), env(&[("DYN_EPP_TOKENIZATION_TIMEOUT_MS", "1")])).await;
    let channel = tonic::transport::Channel::from_shared(format!("http://127.0.0.1:{}", hurried.grpc_port)).unwrap().connect().await.unwrap();
    let err = DebugClient::new(channel).explain(ExplainRequest { body: Some(big_chat(500_000, 99)), ..Default::default() }).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::DeadlineExceeded, "{err}");
    assert!(err.message().contains("within 1 ms"), "{}", err.message());
}
