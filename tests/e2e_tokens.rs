//! End-to-end tokenization: a real Envoy, the real binary with real tokenizer files, mock
//! workers. Expected ids come from the golden corpus, i.e. from Python `transformers`.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

fn model_env(model: &str, extra: &[(&str, &str)]) -> EppOptions {
    let mut env = vec![
        ("DYN_MODEL_PATH".to_string(), tokenizer_fixtures().join(model).display().to_string()),
        ("DYN_MODEL_NAME".to_string(), "m".to_string()),
    ];
    env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    EppOptions { env, ..Default::default() }
}

fn golden_ids(case: &Value, model: &str) -> Vec<u64> {
    case["expected"][model]["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect()
}

fn token_data(body: &[u8]) -> Option<Vec<u64>> {
    let v: Value = serde_json::from_slice(body).unwrap();
    v["nvext"].get("token_data").map(|t| t.as_array().unwrap().iter().map(|x| x.as_u64().unwrap()).collect())
}

async fn post(chain: &Chain, path: &str, body: String) -> (u16, Value) {
    let r = chain.client.post(chain.envoy.url(path)).body(body).send().await.unwrap();
    let status = r.status().as_u16();
    (status, serde_json::from_slice(&r.bytes().await.unwrap()).unwrap_or(Value::Null))
}

/// The one request a worker saw whose body carries `marker`.
fn seen_body(chain: &Chain, marker: &str) -> Vec<u8> {
    let seen = chain.who_saw(marker);
    assert_eq!(seen.len(), 1, "exactly one worker request should carry {marker}");
    seen[0].1.body.to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn workers_receive_transformers_token_ids_and_the_body_otherwise_unchanged() {
    // The default (`auto`: our own `epp` for both fixtures), and fastokens and HF `tokenizers`
    // asked for by name.
    for (model, tokenizer, backend) in
        [("qwen3", "auto", "epp"), ("llama3_1", "auto", "epp"), ("qwen3", "fastokens", "fastokens"), ("qwen3", "default", "default")]
    {
        let chain = Chain::start(&[("w0", None)], model_env(model, &[("DYN_TOKENIZER", tokenizer)])).await;
        let info = format!("dynamo_epp_tokenizer_backend{{backend=\"{backend}\",requested=\"{tokenizer}\",reason=");
        assert!(chain.epp.metrics().await.lines().any(|l| l.starts_with(&info) && l.ends_with(" 1")), "{model}: no {info}");
        for name in ["hello", "tools", "tool_call_roundtrip", "unicode_mix", "special_lookalikes_in_user", "chat_32k", "completion_hello", "completion_single_in_array"] {
            let case = golden_case(name);
            let api = if case["api"] == "chat" { "/v1/chat/completions" } else { "/v1/completions" };
            // A marker field the worker can be found by, and an nvext to merge into; unknown
            // fields must pass untouched. Spliced as text: the body's key order must not change.
            let text = golden_body(case);
            let text = format!(
                r#"{}, "x_marker": "{model}-{name}", "nvext": {{"cache_salt": "tenant-a", "agent_hints": {{"priority": 2, "latency_sensitivity": 0.25}}}}}}"#,
                &text[..text.len() - 1]
            );
            let body: Value = serde_json::from_str(&text).unwrap();
            let (status, _) = post(&chain, api, text.clone()).await;
            assert_eq!(status, 200, "{model} {name}");
            let got = seen_body(&chain, &format!("\"{model}-{name}\""));
            assert_eq!(token_data(&got), Some(golden_ids(case, model)), "{model} {name}");
            let mut got: Value = serde_json::from_slice(&got).unwrap();
            got["nvext"].as_object_mut().unwrap().remove("token_data");
            assert_eq!(got, body, "{model} {name}: only nvext.token_data may be added");
        }
        // Every body was tokenized once (HF and epp: small ones inline and chat_32k in the work
        // pool; fastokens: all in the pool's warmed threads).
        assert_eq!(chain.epp.metric("dynamo_epp_tokenize_seconds_count").await, Some(8.0), "{model}");
        let sum = chain.epp.metric("dynamo_epp_tokenize_seconds_sum").await.unwrap();
        assert!(sum > 0.0 && sum < 8.0 * 5.0, "{model}: {sum}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn batches_are_not_injected_and_injection_can_be_turned_off() {
    let chain = Chain::start(&[("w0", None)], model_env("llama3_1", &[])).await;
    let body = json!({"model": "m", "prompt": ["batch-marker one", "two"]}).to_string();
    assert_eq!(post(&chain, "/v1/completions", body.clone()).await.0, 200);
    assert_eq!(seen_body(&chain, "batch-marker"), body.as_bytes(), "a batch is forwarded byte for byte");

    let chain = Chain::start(&[("w0", None)], model_env("qwen3", &[("DYN_EPP_INJECT_TOKENS", "false")])).await;
    let body = "{ \"model\":\"m\", \"messages\":[{\"role\":\"user\",\"content\":\"off-marker\"}], \"seed\": 1.0e0 }";
    assert_eq!(post(&chain, "/v1/chat/completions", body.into()).await.0, 200);
    assert_eq!(seen_body(&chain, "off-marker"), body.as_bytes());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn wrong_model_is_404_and_template_errors_are_400_with_the_templates_message() {
    // A model dir whose template refuses system messages, beside the real tokenizer.
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(tokenizer_fixtures().join("qwen3/tokenizer.json"), dir.path().join("tokenizer.json")).unwrap();
    std::fs::write(
        dir.path().join("tokenizer_config.json"),
        json!({"eos_token": "<|im_end|>", "chat_template": "{% for m in messages %}{% if m.role == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}{{ m.content }}{% endfor %}"}).to_string(),
    )
    .unwrap();
    let opts = EppOptions {
        env: vec![
            ("DYN_MODEL_PATH".into(), dir.path().display().to_string()),
            ("DYN_MODEL_NAME".into(), "m".into()),
            ("DYN_EPP_LORA_ADAPTERS".into(), "my-lora".into()),
        ],
        ..Default::default()
    };
    let chain = Chain::start(&[("w0", None)], opts).await;
    let chat = |model: &str, role: &str| json!({"model": model, "messages": [{"role": role, "content": "hi"}]}).to_string();

    let (status, err) = post(&chain, "/v1/chat/completions", chat("other-model", "user")).await;
    assert_eq!(status, 404, "{err}");
    assert_eq!(err["error"]["code"], "model_not_found");
    assert!(err["error"]["message"].as_str().unwrap().contains("other-model"));

    let (status, err) = post(&chain, "/v1/chat/completions", chat("m", "system")).await;
    assert_eq!(status, 400, "{err}");
    assert_eq!(err["error"]["code"], "chat_template_error");
    assert!(err["error"]["message"].as_str().unwrap().contains("System role not supported"), "{err}");

    let (status, err) = post(&chain, "/v1/chat/completions", r#"{"model":"m","messages":[{"role":"user","content":7}]}"#.into()).await;
    assert_eq!((status, err["error"]["param"].as_str()), (400, Some("messages[0].content")));
    assert_eq!(chain.total_seen(), 0, "refused requests reach no worker");

    // A LoRA adapter name is a valid model.
    assert_eq!(post(&chain, "/v1/chat/completions", chat("my-lora", "user")).await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tokenization_past_its_deadline_is_504_and_the_server_keeps_serving() {
    let chain = Chain::start(&[("w0", None)], model_env("qwen3", &[("DYN_EPP_TOKENIZATION_TIMEOUT_MS", "1")])).await;
    let huge = golden_body(golden_case("chat_100k_tokens")).to_string();
    let (status, err) = post(&chain, "/v1/chat/completions", huge).await;
    assert_eq!(status, 504, "{err}");
    assert_eq!(err["error"]["code"], "tokenizer_timeout");
    assert_eq!(chain.total_seen(), 0);
}

/// Huge bodies tokenize in the work pool (one thread here, so they queue there) while small
/// requests on other streams are served inline: each small one finishes fast, long before the
/// first huge one. Tokenizing on the reactor would stall them behind the huge ones (2 cores),
/// and so would queueing small ones in the pool.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn huge_bodies_do_not_stall_small_requests() {
    let chain = Chain::start(
        &[("w0", None)],
        // HF's encoder: the huge bodies must take long enough (seconds) for a stall to show;
        // fastokens tokenizes them in about the time the ten small requests take.
        model_env(
            "qwen3",
            &[("DYN_TOKENIZER", "default"), ("DYN_EPP_TOKENIZER_THREADS", "1"), ("DYN_EPP_TOKENIZATION_TIMEOUT_MS", "60000"), ("DYN_EPP_TOKEN_CACHE_BYTES", "0")],
        ),
    )
    .await;
    let body: Value = serde_json::from_str(golden_body(golden_case("chat_100k_tokens"))).unwrap();
    // ~2 MB of varied text (~400k tokens) each: hundreds of milliseconds of tokenization.
    let big = body["messages"][1]["content"].as_str().unwrap().repeat(3);
    let small = |i: usize| json!({"model": "m", "messages": [{"role": "user", "content": format!("small {i}")}]}).to_string();
    // Warm up connections so the measurement is the EPP's doing.
    assert_eq!(post(&chain, "/v1/chat/completions", small(0)).await.0, 200);

    let started = Instant::now();
    let mut huge = Vec::new();
    for i in 0..3 {
        let (c, url) = (chain.client.clone(), chain.envoy.url("/v1/chat/completions"));
        let body = json!({"model": "m", "messages": [{"role": "user", "content": &big}], "x_marker": format!("huge-{i}")}).to_string();
        huge.push(tokio::spawn(async move {
            let r = c.post(url).body(body).send().await.unwrap();
            let status = r.status().as_u16();
            (status, started.elapsed(), r.text().await.unwrap())
        }));
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut small_latencies = Vec::new();
    for i in 1..=10 {
        let t = Instant::now();
        assert_eq!(post(&chain, "/v1/chat/completions", small(i)).await.0, 200);
        small_latencies.push(t.elapsed());
    }
    let small_done = started.elapsed();
    let mut first_huge = Duration::MAX;
    for h in huge {
        let (status, took, text) = h.await.unwrap();
        assert_eq!(status, 200, "{text}");
        first_huge = first_huge.min(took);
    }
    let worst = *small_latencies.iter().max().unwrap();
    eprintln!("small latencies {small_latencies:?}; small done at {small_done:?}; first huge done at {first_huge:?}");
    assert!(small_done < first_huge, "small requests finished at {small_done:?}, after the first huge one ({first_huge:?})");
    assert!(worst * 4 < first_huge, "worst small latency {worst:?} vs first huge {first_huge:?}");
    let n = token_data(&seen_body(&chain, "\"huge-0\"")).unwrap().len();
    assert!(n > 300_000, "{n} tokens");
}

#[tokio::test]
async fn a_repo_id_missing_from_an_offline_cache_stops_start_up_naming_it_and_hf_home() {
    let home = tempfile::tempdir().unwrap();
    let out = epp_start_failure(&[
        ("DYN_MODEL_PATH", "Org/Absent-0.6B".as_ref()),
        ("HF_HOME", home.path().as_os_str()),
        ("HF_HUB_OFFLINE", "1".as_ref()),
    ])
    .await;
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("Org/Absent-0.6B") && err.contains(&format!("HF_HOME={}", home.path().display())), "{err}");
}

#[tokio::test]
async fn a_missing_tokenizer_stops_start_up_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let out = epp_start_failure(&[("DYN_MODEL_PATH", dir.path().as_os_str())]).await;
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&dir.path().join("tokenizer.json").display().to_string()), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_segment_token_cache_stays_within_its_budget() {
    // 64 KiB holds about seven of these ~2,000-token messages; twenty distinct ones go through.
    const BUDGET: f64 = 65536.0;
    let chain = Chain::start(&[("w0", None)], model_env("qwen3", &[("DYN_EPP_TOKEN_CACHE_BYTES", "65536")])).await;
    for i in 0..20 {
        let body = json!({"model": "m", "messages": [{"role": "user", "content": format!("{i} {}", "lorem ipsum dolor ".repeat(700))}]});
        assert_eq!(post(&chain, "/v1/chat/completions", body.to_string()).await.0, 200);
    }
    let used = chain.epp.metric("dynamo_epp_token_cache_bytes").await.expect("gauge exported");
    assert!(used > BUDGET / 2.0 && used <= BUDGET, "{used}");
}
