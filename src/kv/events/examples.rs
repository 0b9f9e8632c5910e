//! KV events as their publishers encode them (msgpack): Dynamo 1.6.1's NATS-core envelope and
//! events (contracts §13) and vLLM's ZMQ batches (§5.4). Test-only, one copy for two users: the
//! decoders' unit tests check them field by field (`#[cfg(test)]` in this crate) and the fuzz
//! targets mutate them (`#[path]` in tests/fuzz).
#![allow(dead_code)] // each user takes a part

use rmpv::Value;

pub fn enc(v: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    rmpv::encode::write_value(&mut out, v).expect("writing to a Vec");
    out
}

pub fn s(x: &str) -> Value {
    Value::from(x)
}

pub fn map(kv: Vec<(&str, Value)>) -> Value {
    Value::Map(kv.into_iter().map(|(k, v)| (s(k), v)).collect())
}

pub fn ints(xs: impl IntoIterator<Item = u64>) -> Value {
    Value::Array(xs.into_iter().map(Value::from).collect())
}

/// Worker 7, DP rank 1, event 2: blocks (12, tokens 13) and (14, tokens 15) under parent 11.
pub fn nats_stored() -> Value {
    let block = |hash: u64, tokens: u64| map(vec![("block_hash", Value::from(hash)), ("tokens_hash", Value::from(tokens)), ("mm_extra_info", Value::Nil)]);
    let stored = map(vec![
        ("parent_hash", Value::from(11u64)),
        ("start_position", Value::Nil),
        ("blocks", Value::Array(vec![block(12, 13), block(14, 15)])),
    ]);
    map(vec![
        ("worker_id", Value::from(7u64)),
        ("storage_tier", s("device")),
        ("residency_domain", s("worker")),
        ("event", map(vec![("event_id", Value::from(2u64)), ("data", map(vec![("stored", stored)])), ("dp_rank", Value::from(1u64))])),
    ])
}

/// Worker 7, DP rank 1, event 1: block 10 removed (no storage tier: device).
pub fn nats_removed() -> Value {
    let removed = map(vec![("removed", map(vec![("block_hashes", ints([10]))]))]);
    map(vec![
        ("worker_id", Value::from(7u64)),
        ("event", map(vec![("event_id", Value::from(1u64)), ("data", removed), ("dp_rank", Value::from(1u64))])),
    ])
}

/// Worker 8, event 1: everything cleared.
pub fn nats_cleared() -> Value {
    map(vec![("worker_id", Value::from(8u64)), ("event", map(vec![("event_id", Value::from(1u64)), ("data", s("cleared"))]))])
}

/// The envelope of publisher 99, sequence 5, around `payload` (the events, msgpack-encoded).
pub fn nats_envelope(payload: Vec<u8>) -> Value {
    map(vec![
        ("publisher_id", Value::from(99u64)),
        ("sequence", Value::from(5u64)),
        ("published_at", Value::from(1_760_000_000_000u64)),
        ("topic", s("kv-events")),
        ("payload", Value::Binary(payload)),
    ])
}

/// vLLM 0.26.0's map-form `BlockStored` (§5.4): blocks 15760518052499183552 and 7 holding
/// tokens 0..32 in blocks of 16, on the GPU, with these `extra_keys` (one entry per block).
pub fn vllm_block_stored(extra_keys: Value) -> Value {
    Value::Map(vec![
        (s("type"), s("BlockStored")),
        (s("block_hashes"), ints([15760518052499183552, 7])),
        (s("parent_block_hash"), Value::Nil),
        (s("token_ids"), ints(0..32)),
        (s("block_size"), Value::from(16)),
        (s("lora_id"), Value::Nil),
        (s("medium"), s("GPU")),
        (s("lora_name"), Value::Nil),
        (s("extra_keys"), extra_keys),
        (s("group_idx"), Value::from(0)),
        (s("kv_cache_spec_kind"), s("full_attention")),
    ])
}

/// vLLM's batch: `[timestamp, events, data_parallel_rank]`.
pub fn vllm_batch(events: Vec<Value>, dp_rank: u64) -> Value {
    Value::Array(vec![Value::F64(1789095808.83), Value::Array(events), Value::from(dp_rank)])
}
