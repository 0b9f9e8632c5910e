//! Replica sync on the wire (contracts §8.4): Dynamo's `ActiveSequenceEvent`, one per NATS
//! message inside the event plane's envelope ([`crate::kv::events::nats`]), published on the
//! workers' endpoint under topic `active_sequences_events`. Pure: the transport is
//! `crate::server::replica`.
//!
//! Serde shapes follow `dynamo-kv-router` 1.6.1 `protocols.rs` as `rmp_serde::to_vec_named`
//! writes them: structs are maps by field name, `data` is externally tagged with the variant
//! names as written (`{"AddRequest": {..}}`, `"Free"`, `"MarkPrefillCompleted"`), `Duration` is
//! `{secs, nanos}`.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::{
    kv::events::{
        nats::{open, seal, Header},
        from_msgpack, DecodeError,
    },
    router::{PeerEvent, PeerEventData},
    workers::{DpRank, WorkerId, WorkerRank},
};

/// The event-plane topic (and last subject segment) of replica sync.
pub const TOPIC: &str = "active_sequences_events";
/// Our liveness beacon's topic, on its own subject (`{events subject}.heartbeat`) so Dynamo's
/// subscribers never see it. Dynamo has none: its replicas' bookings only expire.
pub const HEARTBEAT_TOPIC: &str = "active_sequences_heartbeat";

/// One replica's booking change as decoded: who sent it, and what changed.
#[derive(Clone, Debug, PartialEq)]
pub struct PeerMessage {
    pub header: Header,
    /// The sending router (Dynamo's `router_id`); its own messages are ignored.
    pub router_id: u64,
    pub event: PeerEvent,
}

#[derive(Serialize, Deserialize)]
struct ActiveSequenceEvent {
    request_id: String,
    worker: WorkerWithDpRank,
    data: ActiveSequenceEventData,
    router_id: u64,
    lora_name: Option<String>,
}

#[derive(Serialize, Deserialize)]
struct WorkerWithDpRank {
    worker_id: u64,
    dp_rank: u32,
}

#[derive(Serialize, Deserialize)]
enum ActiveSequenceEventData {
    AddRequest {
        token_sequence: Option<Vec<u64>>,
        #[serde(default = "yes")]
        track_prefill_tokens: bool,
        expected_output_tokens: Option<u32>,
        prefill_load_hint: Option<PrefillLoadHint>,
    },
    Free,
    MarkPrefillCompleted,
}

fn yes() -> bool {
    true
}

#[derive(Serialize, Deserialize)]
struct PrefillLoadHint {
    initial_effective_prefill_tokens: u64,
    expected_prefill_duration: Option<Duration>,
}

/// One message carrying `ev`. Request ids go out as `{router_id:x}-{id}`: Dynamo's routers key
/// peer requests by id alone, and ours are only unique per replica.
pub fn encode(header: Header, router_id: u64, ev: &PeerEvent) -> Vec<u8> {
    let data = match &ev.data {
        PeerEventData::Add { blocks, prefill_tokens, expected_output_tokens } => ActiveSequenceEventData::AddRequest {
            token_sequence: blocks.clone(),
            track_prefill_tokens: true,
            expected_output_tokens: *expected_output_tokens,
            // Dynamo books a hint's tokens only when non-zero.
            prefill_load_hint: (*prefill_tokens > 0).then_some(PrefillLoadHint {
                initial_effective_prefill_tokens: *prefill_tokens,
                expected_prefill_duration: None,
            }),
        },
        PeerEventData::PrefillCompleted => ActiveSequenceEventData::MarkPrefillCompleted,
        PeerEventData::Free => ActiveSequenceEventData::Free,
    };
    let wire = ActiveSequenceEvent {
        request_id: format!("{router_id:x}-{}", ev.request_id),
        worker: WorkerWithDpRank { worker_id: ev.worker.id.0, dp_rank: ev.worker.dp_rank.0 },
        data,
        router_id,
        lora_name: None,
    };
    let payload = rmp_serde::to_vec_named(&wire).expect("an event always serializes");
    seal(header, TOPIC, &payload)
}

pub fn decode(msg: &[u8]) -> Result<PeerMessage, DecodeError> {
    let (header, payload) = open(msg, TOPIC)?;
    let w: ActiveSequenceEvent =
        from_msgpack(&payload).map_err(|e| DecodeError::Msgpack(format!("payload: {e}")))?;
    let data = match w.data {
        ActiveSequenceEventData::AddRequest { token_sequence, track_prefill_tokens, expected_output_tokens, prefill_load_hint } => {
            PeerEventData::Add {
                blocks: token_sequence,
                prefill_tokens: match (track_prefill_tokens, prefill_load_hint) {
                    (true, Some(h)) => h.initial_effective_prefill_tokens,
                    _ => 0,
                },
                expected_output_tokens,
            }
        }
        ActiveSequenceEventData::MarkPrefillCompleted => PeerEventData::PrefillCompleted,
        ActiveSequenceEventData::Free => PeerEventData::Free,
    };
    let worker = WorkerRank { id: WorkerId(w.worker.worker_id), dp_rank: DpRank(w.worker.dp_rank) };
    Ok(PeerMessage { header, router_id: w.router_id, event: PeerEvent { request_id: w.request_id, worker, data } })
}

/// A heartbeat: an empty envelope from `header.publisher_id` (our router id).
pub fn heartbeat(header: Header) -> Vec<u8> {
    seal(header, HEARTBEAT_TOPIC, &[])
}

/// The router id a heartbeat announces.
pub fn decode_heartbeat(msg: &[u8]) -> Result<u64, DecodeError> {
    open(msg, HEARTBEAT_TOPIC).map(|(h, _)| h.publisher_id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rmpv::Value;

    fn hex_of(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
    }

    /// `payload` wrapped as Dynamo's event plane does, built by hand.
    fn envelope(payload: Vec<u8>) -> Vec<u8> {
        let m = Value::Map(vec![
            ("publisher_id".into(), Value::from(77u64)),
            ("sequence".into(), Value::from(3u64)),
            ("published_at".into(), Value::from(1_760_000_000_000u64)),
            ("topic".into(), "active_sequences_events".into()),
            ("payload".into(), Value::Binary(payload)),
        ]);
        let mut out = Vec::new();
        rmpv::encode::write_value(&mut out, &m).unwrap();
        out
    }

    fn rank(id: u64, dp: u32) -> WorkerRank {
        WorkerRank { id: WorkerId(id), dp_rank: DpRank(dp) }
    }

    /// Dynamo 1.6.1's own encoding of an event, by name: `rmp_serde::to_vec_named` of
    /// `dynamo_kv_router::protocols` values (tests/golden/replica_sync).
    fn dynamo(name: &str) -> Vec<u8> {
        let all = include_str!("../../tests/golden/replica_sync/events.txt");
        hex(all.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')).unwrap())
    }

    #[test]
    fn decodes_dynamos_own_encoding() {
        // add_full: AddRequest{token_sequence [1, 2, u64::MAX], track_prefill_tokens, osl 128,
        // hint {300, 1.5 s}} on worker 7 rank 1 from router 0x1234, lora `sql-lora`.
        let m = decode(&envelope(dynamo("add_full"))).unwrap();
        assert_eq!(m.header, Header { publisher_id: 77, sequence: 3, published_at: 1_760_000_000_000 });
        assert_eq!(m.router_id, 0x1234);
        assert_eq!(
            m.event,
            PeerEvent {
                request_id: "r-1".into(),
                worker: rank(7, 1),
                data: PeerEventData::Add { blocks: Some(vec![1, 2, u64::MAX]), prefill_tokens: 300, expected_output_tokens: Some(128) },
            }
        );
        // add_untracked: no blocks, track_prefill_tokens false, hint {50}, worker 2^53 + 1,
        // router 1. Untracked, the hint books nothing (as Dynamo's `add_request_with_prefill_tracking`).
        let m = decode(&envelope(dynamo("add_untracked"))).unwrap();
        assert_eq!((m.router_id, m.event.worker), (1, rank(9_007_199_254_740_993, 0)));
        assert_eq!(m.event.data, PeerEventData::Add { blocks: None, prefill_tokens: 0, expected_output_tokens: None });
        assert_eq!(decode(&envelope(dynamo("free"))).unwrap().event.data, PeerEventData::Free);
        let m = decode(&envelope(dynamo("prefill_completed"))).unwrap();
        assert_eq!((m.event.request_id.as_str(), m.event.data), ("r-1", PeerEventData::PrefillCompleted));
    }

    #[test]
    fn track_prefill_tokens_defaults_to_true() {
        // An AddRequest without the field, written by hand from the serde definition.
        let ev = Value::Map(vec![
            ("request_id".into(), "x".into()),
            ("worker".into(), Value::Map(vec![("worker_id".into(), 5.into()), ("dp_rank".into(), 0.into())])),
            (
                "data".into(),
                Value::Map(vec![(
                    "AddRequest".into(),
                    Value::Map(vec![
                        ("token_sequence".into(), Value::Array(vec![9.into()])),
                        ("expected_output_tokens".into(), Value::Nil),
                        (
                            "prefill_load_hint".into(),
                            Value::Map(vec![
                                ("initial_effective_prefill_tokens".into(), 40.into()),
                                ("expected_prefill_duration".into(), Value::Nil),
                            ]),
                        ),
                    ]),
                )]),
            ),
            ("router_id".into(), 2.into()),
            ("lora_name".into(), Value::Nil),
        ]);
        let mut payload = Vec::new();
        rmpv::encode::write_value(&mut payload, &ev).unwrap();
        let m = decode(&envelope(payload)).unwrap();
        assert_eq!(m.event.data, PeerEventData::Add { blocks: Some(vec![9]), prefill_tokens: 40, expected_output_tokens: None });
    }

    #[test]
    fn encodes_what_dynamo_writes() {
        // Our Free for router 0x1234's request "r-1" is Dynamo's with the id made unique.
        let ev = PeerEvent { request_id: "r-1".into(), worker: rank(7, 1), data: PeerEventData::Free };
        let h = Header { publisher_id: 0x1234, sequence: 0, published_at: 1 };
        let (_, payload) = open(&encode(h, 0x1234, &ev), TOPIC).unwrap();
        let unique = |b: Vec<u8>| hex(&hex_of(&b).replace("a3722d31", "a8313233342d722d31"));
        assert_eq!(payload, unique(dynamo("free")));
        let done = PeerEvent { data: PeerEventData::PrefillCompleted, ..ev };
        let (_, payload) = open(&encode(h, 0x1234, &done), TOPIC).unwrap();
        assert_eq!(payload, unique(dynamo("prefill_completed")));
    }

    #[test]
    fn round_trips() {
        let h = Header { publisher_id: 9, sequence: 41, published_at: 5 };
        let evs = [
            PeerEventData::Add { blocks: Some(vec![3, u64::MAX]), prefill_tokens: 1000, expected_output_tokens: Some(64) },
            PeerEventData::Add { blocks: None, prefill_tokens: 0, expected_output_tokens: None },
            PeerEventData::PrefillCompleted,
            PeerEventData::Free,
        ];
        for data in evs {
            let ev = PeerEvent { request_id: "12:prefill".into(), worker: rank(u64::MAX, 3), data };
            let m = decode(&encode(h, 9, &ev)).unwrap();
            assert_eq!((m.header, m.router_id), (h, 9));
            assert_eq!(m.event, PeerEvent { request_id: "9-12:prefill".into(), ..ev });
        }
        assert_eq!(decode_heartbeat(&heartbeat(h)), Ok(9));
    }

    #[test]
    fn other_messages_are_rejected() {
        let h = Header { publisher_id: 9, sequence: 0, published_at: 0 };
        assert_eq!(decode(&heartbeat(h)).unwrap_err().reason(), "bad_shape");
        let ev = PeerEvent { request_id: "1".into(), worker: rank(1, 0), data: PeerEventData::Free };
        assert_eq!(decode_heartbeat(&encode(h, 9, &ev)).unwrap_err().reason(), "bad_shape");
        assert_eq!(decode(&envelope(vec![0x81, 0xa1, b'x', 0x01])).unwrap_err().reason(), "invalid_msgpack");
        assert_eq!(decode(b"not msgpack").unwrap_err().reason(), "invalid_msgpack");
    }
}
