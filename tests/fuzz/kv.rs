//! KV events on the three planes (JetStream JSON, NATS-core msgpack envelopes, engine ZMQ
//! frames) and the replica-sync wire, decoded and applied to a real `Router`. Seeds: the
//! contract examples (§5.4, §5.5, §13) and Dynamo 1.6.1's own replica-sync encodings
//! (tests/golden/replica_sync/events.txt).

use std::{net::SocketAddr, time::Instant};

use dynamo_epp::{
    kv::events::{
        jetstream,
        nats::{self, Header},
        zmq::{split_frames, split_replay, EngineStream, ReplayItem},
        RouterEvent,
    },
    router::{Router, RoutingRequest},
    sched::{active::RankLoad, replica},
    workers::{Fleet, Role, Worker, WorkerId},
};
use proptest::{prelude::*, test_runner::TestCaseError};
use rmpv::Value;
use serde_json::json;

use crate::{
    common,
    gen_json::{self, J},
    gen_msgpack::{self as mp, enc, map, s},
    kv_examples::{ints, nats_cleared, nats_envelope, nats_removed, nats_stored, vllm_batch, vllm_block_stored},
    run,
};

/// The workers the seeds name: 7 (two DP ranks) and 8.
fn fleet() -> Fleet {
    let w = |id: u64, dp_size| Worker {
        id: WorkerId(id),
        name: format!("w{id}"),
        endpoint: SocketAddr::from(([10, 0, 0, id as u8], 8000)),
        role: Role::Worker,
        dp_start_rank: 0,
        dp_size,
        total_kv_blocks: None,
        max_num_batched_tokens: None,
        kv_events: None,
    };
    Fleet { block_size: Some(16), workers: vec![w(7, 2), w(8, 1)] }
}

/// Applies decoded events, routes and ends one request, then empties the fleet: nothing may
/// panic, the booking must be freed, and the index must hold nothing of departed workers.
fn apply_and_drain(events: &[RouterEvent]) -> Result<(), TestCaseError> {
    let mut r = Router::default();
    r.set_fleet(fleet());
    for ev in events {
        r.apply(ev);
    }
    let req = RoutingRequest { tokens: (0..64).collect(), ..Default::default() };
    let d = r.route(&req, Instant::now(), &mut rand::rng()).map_err(|e| TestCaseError::fail(format!("route: {e}")))?;
    r.on_end(d.booking, Instant::now());
    prop_assert_eq!(r.active_requests(), 0);
    r.set_fleet(Fleet { block_size: Some(16), workers: vec![] });
    prop_assert_eq!(r.kv_blocks(), 0, "blocks of departed workers stay in the index");
    Ok(())
}

fn jetstream_seeds() -> Vec<J> {
    [
        json!({"worker_id":7,"storage_tier":"device","residency_domain":"worker","event":{"event_id":42,"data":{"stored":{"parent_hash":null,"start_position":null,"blocks":[{"block_hash":456,"tokens_hash":16424679837386426330u64,"mm_extra_info":null},{"block_hash":457,"tokens_hash":12,"mm_extra_info":null}]}},"dp_rank":0}}),
        json!({"worker_id":7,"storage_tier":"device","residency_domain":"worker","event":{"event_id":42,"data":{"stored":{"parent_hash":123,"start_position":null,"blocks":[{"block_hash":456,"tokens_hash":789,"mm_extra_info":null}]}},"dp_rank":0}}),
        json!({"worker_id":7,"event":{"event_id":43,"data":{"removed":{"block_hashes":[456]}},"dp_rank":1}}),
        json!({"worker_id":8,"storage_tier":"host_pinned","event":{"event_id":44,"data":"cleared"}}),
        json!({"worker_id":8,"storage_tier":"disk","event":{"event_id":45,"data":{"stored":{"parent_hash":null,"blocks":[{"block_hash":1,"tokens_hash":2,"mm_extra_info":{"mm_objects":[{"mm_hash":3,"offsets":[[0,4]]}]}}]}}}}),
    ]
    .iter()
    .map(J::from_value)
    .collect()
}

#[test]
fn jetstream_json_events() {
    let seeds = jetstream_seeds();
    run("KV events: JetStream JSON", file!(), prop::collection::vec(gen_json::generated(seeds.len()), 1..6), |gs, tally| {
        let started = Instant::now();
        let mut events = Vec::new();
        let mut outcome = String::new();
        for g in &gs {
            match jetstream::decode(&g.build(&seeds, 1 << 20)) {
                Ok(e) => {
                    outcome.push('+');
                    events.push(e);
                }
                Err(e) => outcome.push_str(e.reason()),
            }
        }
        apply_and_drain(&events)?;
        tally.record(if events.is_empty() { "all rejected" } else { "some applied" }, started.elapsed())
    });
}

/// Dynamo's publisher's events (msgpack, named fields), in three batches.
fn nats_events() -> Vec<Value> {
    let (stored, removed, cleared) = (nats_stored(), nats_removed(), nats_cleared());
    vec![Value::Array(vec![stored.clone(), removed.clone(), cleared.clone()]), Value::Array(vec![stored]), Value::Array(vec![removed, cleared])]
}

/// Mutates the envelope and, inside it, the payload; the payload's bytes go where the
/// (possibly moved or retyped) `payload` entry is still binary.
fn build_envelope(env: &Option<mp::Generated>, payload: &mp::Generated, payload_seeds: &[Value]) -> Vec<u8> {
    let bytes = payload.build(payload_seeds);
    let seed = nats_envelope(Vec::new());
    let mut v = env.as_ref().map(|e| e.value(std::slice::from_ref(&seed))).unwrap_or(seed);
    if let Value::Map(m) = &mut v {
        for (k, val) in m.iter_mut() {
            if k.as_str() == Some("payload") && matches!(val, Value::Binary(_)) {
                *val = Value::Binary(bytes.clone());
            }
        }
    }
    let mut b = enc(&v);
    if let Some(d) = env.as_ref().and_then(|e| e.damage.as_ref()) {
        d.apply(&mut b);
    }
    b
}

#[test]
fn nats_core_envelopes() {
    let payloads = nats_events();
    // Most envelopes intact, so the payloads inside get decoded.
    let strategy = prop::collection::vec((prop::option::weighted(0.3, mp::generated(1)), mp::generated(payloads.len())), 1..4);
    run("KV events: NATS-core msgpack", file!(), strategy, |msgs, tally| {
        let started = Instant::now();
        let mut events = Vec::new();
        let mut gaps = nats::Gaps::default();
        for (env, payload) in &msgs {
            if let Ok(e) = nats::decode(&build_envelope(env, payload, &payloads)) {
                gaps.missed(&e.header);
                events.extend(e.events);
            }
        }
        apply_and_drain(&events)?;
        tally.record(if events.is_empty() { "all rejected" } else { "some applied" }, started.elapsed())
    });
}

/// Engine batches: vLLM's map form (contracts §5.4) and the positional forms.
fn zmq_batches() -> Vec<Value> {
    let stored_map = vllm_block_stored(Value::Array(vec![Value::Nil, Value::Array(vec![s("dynamo-cache-salt:t")])]));
    let stored_pos = Value::Array(vec![s("BlockStored"), ints([1, 2]), Value::from(7), ints(16..48), Value::from(16), Value::Nil, s("CPU")]);
    let removed = Value::Array(vec![s("BlockRemoved"), ints([1]), s("GPU")]);
    let cleared = Value::Array(vec![s("AllBlocksCleared")]);
    vec![
        vllm_batch(vec![stored_map.clone()], 0),
        Value::Array(vec![Value::F64(1.0), Value::Array(vec![stored_pos, removed.clone(), cleared]), Value::from(1)]),
        map(vec![("ts", Value::F64(2.0)), ("events", Value::Array(vec![stored_map, removed])), ("data_parallel_rank", Value::from(1))]),
    ]
}

/// Frame-level damage: a frame dropped, added, or the sequence frame resized.
#[derive(Clone, Debug)]
enum FrameDamage {
    None,
    Drop(usize),
    Extra(Vec<u8>),
    Seq(Vec<u8>),
    EmptyDelimiter,
}

fn frame_damage() -> impl Strategy<Value = FrameDamage> {
    prop_oneof![
        8 => Just(FrameDamage::None),
        1 => any::<usize>().prop_map(FrameDamage::Drop),
        1 => prop::collection::vec(any::<u8>(), 0..4).prop_map(FrameDamage::Extra),
        1 => prop::collection::vec(any::<u8>(), 0..12).prop_map(FrameDamage::Seq),
        1 => Just(FrameDamage::EmptyDelimiter),
    ]
}

#[test]
fn engine_zmq_frames() {
    let batches = zmq_batches();
    let strategy = prop::collection::vec((mp::generated(batches.len()), any::<u64>(), prop::bool::weighted(0.8), frame_damage()), 1..5);
    run("KV events: engine ZMQ frames", file!(), strategy, |msgs, tally| {
        let started = Instant::now();
        let mut stream = EngineStream::new(WorkerId(7));
        let mut events = Vec::new();
        let mut seq = 0u64;
        for (g, jump, in_order, damage) in &msgs {
            seq = if *in_order { seq.wrapping_add(1) } else { *jump };
            let mut frames: Vec<Vec<u8>> = vec![b"kv-events".to_vec(), seq.to_be_bytes().to_vec(), g.build(&batches)];
            match damage {
                FrameDamage::None => {}
                FrameDamage::Drop(i) => {
                    frames.remove(i % 3);
                }
                FrameDamage::Extra(b) => frames.push(b.clone()),
                FrameDamage::Seq(b) => frames[1] = b.clone(),
                FrameDamage::EmptyDelimiter => frames.insert(0, Vec::new()),
            }
            // The live socket and the replay socket read the same frames differently.
            let payload = match split_frames(&frames) {
                Ok(f) => {
                    stream.check_seq(f.seq);
                    Some(f.payload)
                }
                Err(_) => match split_replay(&frames) {
                    Ok(ReplayItem::Message { payload, .. }) => Some(payload),
                    _ => None,
                },
            };
            if let Some(p) = payload {
                let c = stream.convert(p, 16);
                prop_assert!(c.events.len() + c.rejected.len() <= p.len().max(1), "more events than bytes");
                events.extend(c.events);
            }
        }
        apply_and_drain(&events)?;
        tally.record(if events.is_empty() { "all rejected" } else { "some applied" }, started.elapsed())
    });
}

/// Dynamo 1.6.1's `ActiveSequenceEvent` payloads (msgpack), as its own code encoded them.
fn replica_payloads() -> Vec<Value> {
    let text = std::fs::read_to_string(common::repo_root().join("tests/golden/replica_sync/events.txt")).unwrap();
    text.lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(_, hex)| {
            let b: Vec<u8> = (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap()).collect();
            rmpv::decode::read_value(&mut &b[..]).unwrap()
        })
        .collect()
}

#[test]
fn replica_sync_wire() {
    let payloads = replica_payloads();
    assert!(payloads.len() >= 4, "the golden replica-sync events");
    let strategy = prop::collection::vec((mp::generated(payloads.len()), prop::option::weighted(0.1, mp::byte_damage()), 1u64..4), 1..8);
    run("replica-sync wire", file!(), strategy, |msgs, tally| {
        let started = Instant::now();
        let mut r = Router::default();
        r.enable_replica_sync();
        r.set_fleet(fleet());
        let mut peers = Vec::new();
        for (i, (g, damage, publisher)) in msgs.iter().enumerate() {
            let header = Header { publisher_id: *publisher, sequence: i as u64, published_at: 0 };
            let mut msg = nats::seal(header, replica::TOPIC, &g.build(&payloads));
            if let Some(d) = damage {
                d.apply(&mut msg);
            }
            if let Ok(m) = replica::decode(&msg) {
                peers.push(m.router_id);
                r.apply_peer(m.router_id, m.event, Instant::now());
            }
        }
        // However the peers' events went, forgetting every peer leaves no load behind.
        for p in &peers {
            r.forget_peer(*p);
        }
        for w in fleet().workers.iter().flat_map(|w| w.ranks()) {
            prop_assert_eq!(r.load(&w), RankLoad::default(), "load left on {:?}", w);
        }
        prop_assert_eq!(r.active_requests(), 0);
        tally.record(if peers.is_empty() { "all rejected" } else { "some applied" }, started.elapsed())
    });
}

/// Inputs that once failed, kept as explicit cases.
#[test]
fn regressions() {
    // 500 nested one-element arrays overflowed a 2 MiB stack (debug build) in every msgpack
    // decoder: the libraries' depth limit was 1024. Now refused without recursing that far.
    for d in [500usize, 1023, 12_000] {
        let mut b = vec![0x91u8; d];
        b.push(0xc0);
        let c = EngineStream::new(WorkerId(7)).convert(&b, 16);
        assert!(c.events.is_empty() && c.rejected.len() == 1, "{d}: {c:?}");
        assert!(nats::decode(&b).is_err());
        let env = nats::seal(Header { publisher_id: 1, sequence: 0, published_at: 0 }, nats::KV_TOPIC, &b);
        assert_eq!(nats::decode(&env).unwrap_err().reason(), "invalid_msgpack");
        let msg = nats::seal(Header { publisher_id: 1, sequence: 0, published_at: 0 }, replica::TOPIC, &b);
        assert_eq!(replica::decode(&msg).unwrap_err().reason(), "invalid_msgpack");
    }
    // An event id of u64::MAX followed by any other overflowed the loss count (`l + 1`): a
    // panic in debug builds, a bogus count in release. Ids going back count no loss.
    let mut r = Router::default();
    r.set_fleet(fleet());
    let ev = |id: u64| jetstream::decode(format!(r#"{{"worker_id":7,"event":{{"event_id":{id},"data":"cleared"}}}}"#).as_bytes()).unwrap();
    assert_eq!(r.apply(&ev(u64::MAX)).lost, 0);
    assert_eq!(r.apply(&ev(u64::MAX)).lost, 0);
    assert_eq!(r.apply(&ev(3)).lost, 0);
    assert_eq!(r.apply(&ev(u64::MAX)).lost, u64::MAX - 4);
}
