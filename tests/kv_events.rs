//! The KV event transports against real servers: a real nats-server with JetStream (durable
//! consumer, restarts, resets, malformed messages, 100k events), NATS core envelopes, and a
//! real ZMQ PUB socket with a replay ROUTER socket.

mod common;

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use async_nats::jetstream;
use bytes::Bytes;
use common::*;
use dynamo_epp::{
    kv::events::{KvCacheEventData, RouterEvent},
    kv_plane::{self, EventSink, PlaneSettings},
    workers::{KvEventSource, Role, Worker, WorkerId},
};
use parking_lot::Mutex;
use rmpv::Value;
use serde_json::json;
use zeromq::{PubSocket, RouterSocket, Socket, SocketRecv, SocketSend, ZmqMessage};

/// Records what the transport delivers.
#[derive(Default)]
struct Recorder {
    events: Mutex<Vec<RouterEvent>>,
    rejected: Mutex<HashMap<&'static str, u64>>,
    lost: AtomicU64,
    workers: Mutex<Vec<Worker>>,
    /// Per applied message, the publication time the transport reported.
    published: Mutex<Vec<Option<SystemTime>>>,
}

impl EventSink for Recorder {
    fn apply(&self, events: &[RouterEvent], published: Option<SystemTime>) {
        self.events.lock().extend_from_slice(events);
        self.published.lock().push(published);
    }
    fn rejected(&self, reason: &'static str) {
        *self.rejected.lock().entry(reason).or_default() += 1;
    }
    fn lost(&self, n: u64) {
        self.lost.fetch_add(n, Ordering::Relaxed);
    }
    fn block_size(&self) -> u32 {
        16
    }
    fn workers(&self) -> Vec<Worker> {
        self.workers.lock().clone()
    }
}

impl Recorder {
    fn ids(&self) -> Vec<u64> {
        self.events.lock().iter().map(|e| e.event.event_id).collect()
    }

    async fn wait_for(&self, n: usize, within: Duration) -> usize {
        let deadline = Instant::now() + within;
        loop {
            let have = self.events.lock().len();
            if have >= n || Instant::now() > deadline {
                return have;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits for `n` distinct event ids (redeliveries after a restart repeat some).
    async fn wait_for_distinct(&self, n: usize, within: Duration) -> usize {
        let deadline = Instant::now() + within;
        loop {
            let have = self.ids().into_iter().collect::<std::collections::HashSet<_>>().len();
            if have >= n || Instant::now() > deadline {
                return have;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn rejected(&self, reason: &str) -> u64 {
        self.rejected.lock().get(reason).copied().unwrap_or(0)
    }
}

fn settings(url: &str, consumer: &str, reset: bool) -> PlaneSettings {
    PlaneSettings {
        nats: dynamo_epp::nats::NatsConnect::plain(url),
        namespace: "dynamo".into(),
        component: "backend".into(),
        consumer: consumer.into(),
        reset_states: reset,
    }
}

const STREAM: &str = KV_STREAM;

/// A Stored event in Dynamo's JSON (contracts §5.5), written out by hand.
fn stored_json(worker: u64, id: u64) -> Vec<u8> {
    json!({"worker_id": worker, "storage_tier": "device", "event": {"event_id": id, "data": {"stored": {
        "parent_hash": null, "blocks": [{"block_hash": id, "tokens_hash": 1000 + id, "mm_extra_info": null}]}}, "dp_rank": 0}})
    .to_string()
    .into_bytes()
}

async fn publish_all(js: &jetstream::Context, msgs: impl IntoIterator<Item = Vec<u8>>) {
    let mut acks = Vec::new();
    for m in msgs {
        acks.push(js.publish(format!("{STREAM}.kv-events"), m.into()).await.unwrap());
        if acks.len() >= 2000 {
            for a in acks.drain(..) {
                a.await.unwrap();
            }
        }
    }
    for a in acks {
        a.await.unwrap();
    }
}

/// Waits until the durable consumer has every delivered message acknowledged.
async fn wait_acked(js: &jetstream::Context, consumer: &str, through: u64) {
    let stream = js.get_stream(STREAM).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let info = stream.consumer_info(consumer).await.unwrap();
        if info.ack_floor.stream_sequence >= through && info.num_ack_pending == 0 {
            return;
        }
        assert!(Instant::now() < deadline, "acks stuck: {info:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_applies_earlier_events_acks_bad_ones_and_a_restart_replays_the_stream() {
    let nats = NatsServer::start().await;
    let js = kv_event_publisher(&nats.url()).await;
    // Published before the subscriber exists, with two malformed messages among them.
    let mut msgs: Vec<Vec<u8>> = (1..=30).map(|i| stored_json(7, i)).collect();
    msgs.insert(10, b"{not json".to_vec());
    msgs.insert(20, br#"{"worker_id":7,"event":{"event_id":99,"data":"exploded"}}"#.to_vec());
    publish_all(&js, msgs).await;

    let rec = Arc::new(Recorder::default());
    let task = tokio::spawn(kv_plane::jetstream::run(settings(&nats.url(), "epp-a", false), rec.clone()));
    assert_eq!(rec.wait_for(30, Duration::from_secs(20)).await, 30);
    assert_eq!(rec.ids(), (1..=30).collect::<Vec<_>>());
    // Each message carries the server's publication time, for the event-lag metric.
    let recent = |p: &Option<SystemTime>| p.is_some_and(|t| SystemTime::now().duration_since(t).is_ok_and(|d| d < Duration::from_secs(120)));
    assert!(rec.published.lock().iter().all(recent), "{:?}", rec.published.lock());
    assert_eq!(rec.rejected("invalid_json"), 2);
    // Every message, the malformed ones too, was acknowledged.
    wait_acked(&js, "epp-a", 32).await;
    let info = js.get_stream(STREAM).await.unwrap().consumer_info("epp-a").await.unwrap();
    assert_eq!(info.config.inactive_threshold, Duration::from_secs(300));
    assert_eq!(info.config.durable_name.as_deref(), Some("epp-a"));
    task.abort();
    let _ = task.await;

    // While the EPP is down, more events arrive. A restarted process has an empty index: it
    // replays the stream, so it holds every event, the ones before the restart too.
    publish_all(&js, (31..=40).map(|i| stored_json(7, i))).await;
    let rec2 = Arc::new(Recorder::default());
    let task = tokio::spawn(kv_plane::jetstream::run(settings(&nats.url(), "epp-a", false), rec2.clone()));
    assert_eq!(rec2.wait_for(40, Duration::from_secs(20)).await, 40);
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Messages a killed subscriber's pull had claimed come back after the ack wait, so the
    // order can differ after a restart; what must hold is each event exactly once.
    let mut ids = rec2.ids();
    ids.sort_unstable();
    assert_eq!(ids, (1..=40).collect::<Vec<_>>(), "nothing replayed twice, nothing missed");
    assert_eq!(rec2.rejected("invalid_json"), 2);
    task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_reset_states_starts_from_the_end() {
    let nats = NatsServer::start().await;
    let js = kv_event_publisher(&nats.url()).await;
    publish_all(&js, (1..=10).map(|i| stored_json(7, i))).await;
    // A consumer that read nothing yet, then reset: the 10 old events are skipped.
    let rec = Arc::new(Recorder::default());
    let task = tokio::spawn(kv_plane::jetstream::run(settings(&nats.url(), "epp-r", true), rec.clone()));
    // Wait until the consumer exists before publishing the new events.
    let stream = js.get_stream(STREAM).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while stream.consumer_info("epp-r").await.is_err() {
        assert!(Instant::now() < deadline, "consumer never created");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    publish_all(&js, (11..=15).map(|i| stored_json(7, i))).await;
    assert_eq!(rec.wait_for(5, Duration::from_secs(20)).await, 5);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(rec.ids(), (11..=15).collect::<Vec<_>>());
    task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_survives_a_nats_restart_without_losing_events() {
    let mut nats = NatsServer::start().await;
    let js = kv_event_publisher(&nats.url()).await;
    let rec = Arc::new(Recorder::default());
    let task = tokio::spawn(kv_plane::jetstream::run(settings(&nats.url(), "epp-x", false), rec.clone()));
    publish_all(&js, (1..=100).map(|i| stored_json(7, i))).await;
    assert_eq!(rec.wait_for(100, Duration::from_secs(20)).await, 100);

    nats.restart().await;
    // A fresh publisher connection after the restart (the old one reconnects on its own too).
    let js = kv_event_publisher(&nats.url()).await;
    publish_all(&js, (101..=200).map(|i| stored_json(7, i))).await;
    rec.wait_for_distinct(200, Duration::from_secs(60)).await;
    let mut ids = rec.ids();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids, (1..=200).collect::<Vec<_>>(), "log: {}", nats.log());
    task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_applies_100k_events_in_order() {
    let nats = NatsServer::start().await;
    let js = kv_event_publisher(&nats.url()).await;
    const N: u64 = 100_000;
    publish_all(&js, (1..=N).map(|i| stored_json(7, i))).await;
    let rec = Arc::new(Recorder::default());
    let task = tokio::spawn(kv_plane::jetstream::run(settings(&nats.url(), "epp-big", false), rec.clone()));
    assert_eq!(rec.wait_for(N as usize, Duration::from_secs(120)).await, N as usize);
    let ids = rec.ids();
    assert!(ids.iter().copied().eq(1..=N), "out of order or duplicated");
    task.abort();
}

// ---------------------------------------------------------------- NATS core

fn map(kv: Vec<(&str, Value)>) -> Value {
    Value::Map(kv.into_iter().map(|(k, v)| (Value::from(k), v)).collect())
}

fn enc(v: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    rmpv::encode::write_value(&mut out, v).unwrap();
    out
}

/// An envelope as Dynamo 1.6.1 publishes it (contracts §13), built by hand.
fn envelope(publisher: u64, seq: u64, event_ids: std::ops::RangeInclusive<u64>) -> Vec<u8> {
    let events: Vec<Value> = event_ids
        .map(|id| {
            map(vec![
                ("worker_id", Value::from(9u64)),
                ("storage_tier", Value::from("device")),
                ("residency_domain", Value::from("worker")),
                (
                    "event",
                    map(vec![
                        ("event_id", Value::from(id)),
                        ("data", map(vec![("removed", map(vec![("block_hashes", Value::Array(vec![Value::from(id)]))]))])),
                        ("dp_rank", Value::from(0u64)),
                    ]),
                ),
            ])
        })
        .collect();
    enc(&map(vec![
        ("publisher_id", Value::from(publisher)),
        ("sequence", Value::from(seq)),
        ("published_at", Value::from(1_760_000_000_000u64)),
        ("topic", Value::from("kv-events")),
        ("payload", Value::Binary(enc(&Value::Array(events)))),
    ]))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_core_envelopes_are_applied_bad_ones_counted_and_gaps_reported() {
    let nats = NatsServer::start().await;
    let rec = Arc::new(Recorder::default());
    let task = tokio::spawn(kv_plane::nats::run(settings(&nats.url(), "unused", false), rec.clone()));
    let client = async_nats::connect(nats.url()).await.unwrap();
    let subject = "namespace.dynamo.component.backend.endpoint.generate.kv-events";
    // The subscription may not exist yet: probe until the first envelope arrives.
    let deadline = Instant::now() + Duration::from_secs(20);
    while rec.events.lock().is_empty() {
        client.publish(subject, envelope(1, 0, 1..=1).into()).await.unwrap();
        client.flush().await.unwrap();
        assert!(Instant::now() < deadline, "subscriber never received anything");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    rec.events.lock().clear();
    rec.published.lock().clear();
    client.publish(subject, envelope(2, 0, 1..=3).into()).await.unwrap();
    client.publish(subject, Bytes::from_static(b"\xc1 not msgpack")).await.unwrap();
    client.publish(subject, envelope(2, 1, 4..=4).into()).await.unwrap();
    // Sequences 2..=4 of publisher 2 never arrive.
    client.publish(subject, envelope(2, 5, 5..=6).into()).await.unwrap();
    client.flush().await.unwrap();
    assert_eq!(rec.wait_for(6, Duration::from_secs(10)).await, 6);
    assert_eq!(rec.ids(), vec![1, 2, 3, 4, 5, 6]);
    assert!(rec.events.lock().iter().all(|e| matches!(e.event.data, KvCacheEventData::Removed(_))));
    // The envelope's `published_at` (ms) is the publication time.
    let at = Some(UNIX_EPOCH + Duration::from_millis(1_760_000_000_000));
    assert!(rec.published.lock().iter().all(|p| *p == at), "{:?}", rec.published.lock());
    assert_eq!(rec.rejected("invalid_msgpack"), 1);
    assert_eq!(rec.lost.load(Ordering::Relaxed), 3);
    task.abort();
}

// ---------------------------------------------------------------- engine ZMQ

fn zmq_worker(id: u64, endpoint: String, replay: Option<String>) -> Worker {
    Worker {
        id: WorkerId(id),
        name: format!("w{id}"),
        endpoint: "127.0.0.1:1".parse().unwrap(),
        role: Role::Worker,
        dp_start_rank: 0,
        dp_size: 1,
        total_kv_blocks: None,
        max_num_batched_tokens: None,
        kv_events: Some(KvEventSource { endpoint, replay }),
    }
}

fn frames(seq: u64, payload: Vec<u8>) -> ZmqMessage {
    ZmqMessage::try_from(vec![Bytes::new(), Bytes::copy_from_slice(&seq.to_be_bytes()), Bytes::from(payload)]).unwrap()
}

/// A vLLM batch `[ts, [events], dp_rank]` of one positional BlockStored of `n` blocks.
fn vllm_store(first_hash: u64, parent: Option<u64>, n: u64) -> Vec<u8> {
    let ev = Value::Array(vec![
        Value::from("BlockStored"),
        Value::Array((0..n).map(|i| Value::from(first_hash + i)).collect()),
        parent.map_or(Value::Nil, Value::from),
        Value::Array((0..16 * n).map(Value::from).collect()),
        Value::from(16),
        Value::Nil,
        Value::from("GPU"),
    ]);
    enc(&Value::Array(vec![Value::F64(1.0), Value::Array(vec![ev]), Value::from(0)]))
}

fn vllm_cleared_map() -> Vec<u8> {
    enc(&Value::Array(vec![Value::F64(1.0), Value::Array(vec![map(vec![("type", Value::from("AllBlocksCleared"))])]), Value::Nil]))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zmq_engine_events_with_replay_of_a_gap() {
    let (pub_port, replay_port) = (free_port(), free_port());
    let mut publ = PubSocket::new();
    publ.bind(&format!("tcp://127.0.0.1:{pub_port}")).await.unwrap();
    let mut router = RouterSocket::new();
    router.bind(&format!("tcp://127.0.0.1:{replay_port}")).await.unwrap();

    let rec = Arc::new(Recorder::default());
    *rec.workers.lock() = vec![zmq_worker(
        42,
        format!("tcp://127.0.0.1:{pub_port}"),
        Some(format!("tcp://127.0.0.1:{replay_port}")),
    )];
    let task = tokio::spawn(kv_plane::zmq::run(rec.clone()));

    // PUB drops messages until the subscription arrives: probe with seq 0 until one lands.
    let deadline = Instant::now() + Duration::from_secs(20);
    while rec.events.lock().is_empty() {
        publ.send(frames(0, vllm_cleared_map())).await.unwrap();
        assert!(Instant::now() < deadline, "subscriber never received anything");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    rec.events.lock().clear();
    rec.published.lock().clear();

    publ.send(frames(1, vllm_store(100, None, 2))).await.unwrap();
    publ.send(frames(2, b"\x93\x01".to_vec())).await.unwrap(); // truncated msgpack
    // Batches 3 and 4 are lost in transit; 5 arrives and triggers a replay of 3..5.
    publ.send(frames(5, vllm_store(400, Some(301), 1))).await.unwrap();

    let req = tokio::time::timeout(Duration::from_secs(10), router.recv()).await.expect("replay request").unwrap().into_vec();
    assert_eq!(req.len(), 3, "[identity, empty, start seq]: {req:?}");
    assert!(req[1].is_empty());
    assert_eq!(&req[2][..], &3u64.to_be_bytes());
    let id = req[0].clone();
    for (seq, payload) in [(3u64, vllm_store(300, Some(101), 2)), (4, vllm_store(500, None, 1))] {
        let m = vec![id.clone(), Bytes::new(), Bytes::copy_from_slice(&seq.to_be_bytes()), Bytes::from(payload)];
        router.send(ZmqMessage::try_from(m).unwrap()).await.unwrap();
    }
    let end = vec![id.clone(), Bytes::new(), Bytes::copy_from_slice(&u64::MAX.to_be_bytes()), Bytes::new()];
    router.send(ZmqMessage::try_from(end).unwrap()).await.unwrap();

    assert_eq!(rec.wait_for(4, Duration::from_secs(10)).await, 4);
    let evs = rec.events.lock().clone();
    // Applied in sequence order: 1, then the replayed 3 and 4, then 5.
    let firsts: Vec<u64> = evs
        .iter()
        .map(|e| match &e.event.data {
            KvCacheEventData::Stored(s) => s.blocks[0].block_hash.0,
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(firsts, vec![100, 300, 500, 400]);
    assert!(evs.iter().all(|e| e.worker_id == WorkerId(42)));
    // tokens 0..16 → the reference local hash (contracts §6.1).
    let KvCacheEventData::Stored(s) = &evs[0].event.data else { unreachable!() };
    assert_eq!(s.blocks[0].tokens_hash.0, 15310707395893867146);
    assert_eq!(rec.rejected("invalid_msgpack"), 1);
    assert_eq!(rec.lost.load(Ordering::Relaxed), 0, "the replay filled the gap");
    // The batch's `ts` (seconds) is the publication time; the truncated batch has none.
    let published: Vec<_> = rec.published.lock().iter().copied().filter(Option::is_some).collect();
    assert_eq!(published, vec![Some(UNIX_EPOCH + Duration::from_secs(1)); 4]);
    task.abort();
}
