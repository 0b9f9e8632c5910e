//! End-to-end KV-aware routing: a real Envoy, the real `dynamo-epp` binary, mock workers, and
//! KV events published to a real nats-server with JetStream — or none (approximate mode).
//!
//! Requests are `/v1/completions` with the prompt given as token ids, so the block hashes are
//! known without a tokenizer.

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;
use xxhash_rust::xxh3::xxh3_64_with_seed;

const STREAM: &str = KV_STREAM;

/// Dynamo's local block hash, straight from the reference definition (contracts §6): xxh3-64,
/// seed 1337, over the block's token ids as u32 little-endian.
fn reference_block_hash(tokens: &[u32]) -> u64 {
    let bytes: Vec<u8> = tokens.iter().flat_map(|t| t.to_le_bytes()).collect();
    xxh3_64_with_seed(&bytes, 1337)
}

fn completion(tokens: &[u32]) -> String {
    json!({"model": "qwen", "prompt": tokens, "max_tokens": 1}).to_string()
}

fn worker_of(r: &Recorded) -> String {
    r.headers["x-dynamo-worker-instance-id"].clone()
}

async fn send(chain: &Chain, body: String) {
    let r = chain.client.post(chain.envoy.url("/v1/completions")).body(body).send().await.unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_request_goes_to_the_worker_whose_cache_holds_its_prefix() {
    let nats = NatsServer::start().await;
    // The worker publishes before the EPP starts (the stream is Dynamo's, created by it).
    let js = kv_event_publisher(&nats.url()).await;
    let prompt: Vec<u32> = (1000..1000 + 16 * 8).collect();
    let blocks: Vec<_> = prompt
        .chunks(16)
        .enumerate()
        .map(|(i, b)| json!({"block_hash": 5000 + i, "tokens_hash": reference_block_hash(b), "mm_extra_info": null}))
        .collect();
    let ev = json!({"worker_id": 1002, "storage_tier": "device", "event": {"event_id": 1, "data": {"stored": {"parent_hash": null, "blocks": blocks}}, "dp_rank": 0}});
    js.publish(format!("{STREAM}.kv-events"), ev.to_string().into()).await.unwrap().await.unwrap();

    let opts = EppOptions {
        env: vec![
            ("NATS_SERVER".into(), nats.url()),
            ("DYN_EVENT_PLANE".into(), "jetstream".into()),
            ("DYN_EPP_KV_CONSUMER_NAME".into(), "e2e".into()),
        ],
        ..Default::default()
    };
    let chain = Chain::start(&[("w1", Some(1001)), ("w2", Some(1002)), ("w3", Some(1003))], opts).await;
    let applied = chain.epp.wait_metric("dynamo_epp_kv_events_applied_total", Duration::from_secs(20), |v| v >= 1.0).await;
    assert_eq!(applied, 1.0);
    // The operator's view of the event plane: one lag observation, a non-empty index.
    assert_eq!(chain.epp.metric("dynamo_epp_kv_event_lag_seconds_count").await, Some(1.0));
    assert!(chain.epp.metric("dynamo_epp_kv_index_bytes").await.is_some_and(|b| b > 0.0));

    // The cached prompt, plus a tail of its own, goes to worker 1002 every time, although
    // the other two are idle (the requests are sequential: equal load).
    for i in 0..6u32 {
        let mut p = prompt.clone();
        p.extend([7, 8, 9, i]);
        send(&chain, completion(&p)).await;
    }
    let seen: Vec<String> = chain.who_saw("1000,1001,1002").iter().map(|(_, r)| worker_of(r)).collect();
    assert_eq!(seen, vec!["1002"; 6]);

    // Events keep flowing: worker 1002 drops the blocks, worker 1003 caches the prompt.
    let removed = json!({"worker_id": 1002, "event": {"event_id": 2, "data": {"removed": {"block_hashes": (5000..5008).collect::<Vec<_>>()}}}});
    let blocks3: Vec<_> = prompt
        .chunks(16)
        .enumerate()
        .map(|(i, b)| json!({"block_hash": 9000 + i, "tokens_hash": reference_block_hash(b)}))
        .collect();
    let stored3 = json!({"worker_id": 1003, "event": {"event_id": 1, "data": {"stored": {"parent_hash": null, "blocks": blocks3}}}});
    for ev in [removed, stored3] {
        js.publish(format!("{STREAM}.kv-events"), ev.to_string().into()).await.unwrap().await.unwrap();
    }
    chain.epp.wait_metric("dynamo_epp_kv_events_applied_total", Duration::from_secs(20), |v| v >= 3.0).await;
    send(&chain, completion(&prompt)).await;
    let all: Vec<String> = chain.who_saw("1000,1001,1002").iter().map(|(_, r)| worker_of(r)).collect();
    assert_eq!(all.len(), 7);
    assert_eq!(all.iter().filter(|w| *w == "1003").count(), 1, "{all:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn approximate_mode_sends_a_repeated_long_prompt_to_the_same_worker() {
    let opts = EppOptions { env: vec![("DYN_USE_KV_EVENTS".into(), "false".into())], ..Default::default() };
    let chain = Chain::start(&[("w1", Some(11)), ("w2", Some(12)), ("w3", Some(13)), ("w4", Some(14))], opts).await;
    let long: Vec<u32> = (0..2048).map(|i| (i * 7919) % 150_000).collect();
    for _ in 0..8 {
        send(&chain, completion(&long)).await;
    }
    let seen: Vec<String> = chain.who_saw(&format!("[{},{},{}", long[0], long[1], long[2])).iter().map(|(_, r)| worker_of(r)).collect();
    assert_eq!(seen.len(), 8);
    assert!(seen.iter().all(|w| *w == seen[0]), "{seen:?}");
    // Different prompts spread over the idle workers (no false sharing).
    for i in 0..12u32 {
        send(&chain, completion(&(i * 10_000..i * 10_000 + 64).collect::<Vec<_>>())).await;
    }
    let used: std::collections::HashSet<usize> = chain.workers.iter().enumerate().filter(|(_, w)| !w.seen().is_empty()).map(|(i, _)| i).collect();
    assert!(used.len() > 1, "{used:?}");
}
