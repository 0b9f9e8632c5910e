//! Dynamo's event plane on NATS core (contracts §5.2, observed with Dynamo 1.6.1 in §13):
//! subject `namespace.{ns}.component.{comp}.endpoint.{ep}.{topic}`, each message a msgpack map
//! `{publisher_id, sequence, published_at, topic, payload}` whose `payload` (bin) is the topic's
//! own msgpack: for `kv-events` a `Vec<RouterEvent>`. The envelope is shared with replica sync
//! (`crate::sched::replica`).

use std::{collections::HashMap, fmt};

use serde::{de, Deserialize, Deserializer, Serialize, Serializer};

use super::{from_msgpack, DecodeError, RouterEvent};

/// The topic KV events are published under.
pub const KV_TOPIC: &str = "kv-events";

/// The subject a component's endpoint publishes `topic` on. Segments are percent-encoded
/// except `[A-Za-z0-9_-]`, as Dynamo's `encode_event_segment` does.
pub fn subject(namespace: &str, component: &str, endpoint: &str, topic: &str) -> String {
    format!(
        "namespace.{}.component.{}.endpoint.{}.{topic}",
        encode_segment(namespace),
        encode_segment(component),
        encode_segment(endpoint)
    )
}

fn encode_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b == b'_' || b == b'-' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Who sent a message, and when.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// Random per publisher process (not the worker id).
    pub publisher_id: u64,
    /// Counts messages per publisher from 0: a jump means messages were lost.
    pub sequence: u64,
    /// Unix milliseconds.
    pub published_at: u64,
}

/// One decoded KV-event message.
#[derive(Clone, Debug, PartialEq)]
pub struct Envelope {
    pub header: Header,
    pub events: Vec<RouterEvent>,
}

#[derive(Deserialize)]
struct Wire {
    publisher_id: u64,
    sequence: u64,
    #[serde(default)]
    published_at: u64,
    #[serde(default)]
    topic: String,
    payload: Payload,
}

#[derive(Serialize)]
struct WireOut<'a> {
    publisher_id: u64,
    sequence: u64,
    published_at: u64,
    topic: &'a str,
    payload: Bin<'a>,
}

/// Serialized as msgpack bin, as Dynamo's `Vec<u8>` payload is.
struct Bin<'a>(&'a [u8]);

impl Serialize for Bin<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(self.0)
    }
}

/// `payload` is msgpack bin; an array of byte values is accepted too.
struct Payload(Vec<u8>);

impl<'de> Deserialize<'de> for Payload {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> de::Visitor<'de> for V {
            type Value = Payload;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("bytes")
            }
            fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Payload, E> {
                Ok(Payload(v.to_vec()))
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Payload, A::Error> {
                let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1 << 16));
                while let Some(b) = seq.next_element::<u8>()? {
                    out.push(b);
                }
                Ok(Payload(out))
            }
        }
        d.deserialize_any(V)
    }
}

/// Unwraps one envelope of `topic` (a missing topic is accepted): its header and payload bytes.
pub fn open(msg: &[u8], topic: &str) -> Result<(Header, Vec<u8>), DecodeError> {
    let w: Wire = from_msgpack(msg).map_err(|e| DecodeError::Msgpack(format!("envelope: {e}")))?;
    if !w.topic.is_empty() && w.topic != topic {
        return Err(DecodeError::Shape(format!("topic {:?} is not {topic}", w.topic)));
    }
    Ok((Header { publisher_id: w.publisher_id, sequence: w.sequence, published_at: w.published_at }, w.payload.0))
}

/// Wraps `payload` in an envelope of `topic`, as Dynamo's publishers do (a named msgpack map).
pub fn seal(h: Header, topic: &str, payload: &[u8]) -> Vec<u8> {
    let w = WireOut {
        publisher_id: h.publisher_id,
        sequence: h.sequence,
        published_at: h.published_at,
        topic,
        payload: Bin(payload),
    };
    rmp_serde::to_vec_named(&w).expect("an envelope always serializes")
}

pub fn decode(msg: &[u8]) -> Result<Envelope, DecodeError> {
    let (header, payload) = open(msg, KV_TOPIC)?;
    let events: Vec<RouterEvent> =
        from_msgpack(&payload).map_err(|e| DecodeError::Msgpack(format!("payload: {e}")))?;
    Ok(Envelope { header, events })
}

/// The last sequence seen per publisher, to count messages lost in between.
#[derive(Debug, Default)]
pub struct Gaps(HashMap<u64, u64>);

impl Gaps {
    /// Messages missed before this one (0 for a publisher's first message, or a restart that
    /// went back).
    pub fn missed(&mut self, h: &Header) -> u64 {
        match self.0.insert(h.publisher_id, h.sequence) {
            // Saturating: a publisher's sequence may be anything, u64::MAX included.
            Some(prev) if h.sequence > prev.saturating_add(1) => h.sequence - prev - 1,
            _ => 0,
        }
    }

    pub fn forget(&mut self, publisher_id: u64) {
        self.0.remove(&publisher_id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::{
        events::{ExternalBlockHash, KvCacheEventData, StorageTier},
        hash::LocalBlockHash,
    };
    use crate::workers::WorkerId;
    use crate::kv::events::examples::*;
    use proptest::prelude::*;
    use rmpv::Value;

    /// A message shaped as Dynamo 1.6.1 publishes it (contracts §13).
    fn observed_message() -> Vec<u8> {
        let payload = enc(&Value::Array(vec![nats_removed(), nats_stored(), nats_cleared()]));
        enc(&nats_envelope(payload))
    }

    #[test]
    fn decodes_the_observed_envelope() {
        let env = decode(&observed_message()).unwrap();
        assert_eq!(env.header, Header { publisher_id: 99, sequence: 5, published_at: 1_760_000_000_000 });
        assert_eq!(env.events.len(), 3);
        let st = &env.events[1];
        assert_eq!((st.worker_id, st.event.event_id, st.event.dp_rank), (WorkerId(7), 2, 1));
        let KvCacheEventData::Stored(d) = &st.event.data else { panic!() };
        assert_eq!(d.parent_hash, Some(ExternalBlockHash(11)));
        assert_eq!((d.blocks[0].block_hash, d.blocks[0].tokens_hash), (ExternalBlockHash(12), LocalBlockHash(13)));
        assert!(matches!(&env.events[0].event.data, KvCacheEventData::Removed(r) if r.block_hashes == [ExternalBlockHash(10)]));
        assert_eq!(env.events[2].event.data, KvCacheEventData::Cleared);
        assert_eq!(env.events[2].storage_tier, StorageTier::Device);
    }

    #[test]
    fn subject_is_percent_encoded() {
        assert_eq!(subject("dynamo", "backend", "generate", KV_TOPIC), "namespace.dynamo.component.backend.endpoint.generate.kv-events");
        assert_eq!(subject("a.b", "c d", "e_f-g", KV_TOPIC), "namespace.a%2Eb.component.c%20d.endpoint.e_f-g.kv-events");
    }

    #[test]
    fn sealed_envelopes_have_dynamos_named_shape() {
        let h = Header { publisher_id: 3, sequence: 4, published_at: 5 };
        let m = seal(h, "active_sequences_events", &[1, 2]);
        let v = rmpv::decode::read_value(&mut &m[..]).unwrap();
        assert_eq!(
            v,
            map(vec![
                ("publisher_id", Value::from(3u64)),
                ("sequence", Value::from(4u64)),
                ("published_at", Value::from(5u64)),
                ("topic", s("active_sequences_events")),
                ("payload", Value::Binary(vec![1, 2])),
            ])
        );
        assert_eq!(open(&m, "active_sequences_events").unwrap(), (h, vec![1, 2]));
        assert_eq!(open(&m, KV_TOPIC).unwrap_err().reason(), "bad_shape");
    }

    #[test]
    fn gaps_count_missed_messages_per_publisher() {
        let h = |publisher_id, sequence| Header { publisher_id, sequence, published_at: 0 };
        let mut g = Gaps::default();
        assert_eq!([g.missed(&h(1, 0)), g.missed(&h(1, 1)), g.missed(&h(1, 4)), g.missed(&h(2, 9))], [0, 0, 2, 0]);
        // A restarted publisher counts from 0 again; a forgotten one starts over.
        assert_eq!(g.missed(&h(1, 0)), 0);
        g.forget(2);
        assert_eq!(g.missed(&h(2, 12)), 0);
    }

    #[test]
    fn malformed_messages_are_rejected_not_panicked_on() {
        assert_eq!(decode(b"{\"json\":1}").unwrap_err().reason(), "invalid_msgpack");
        let bad_payload = enc(&map(vec![
            ("publisher_id", Value::from(1u64)),
            ("sequence", Value::from(0u64)),
            ("payload", Value::Binary(vec![0xc1])),
        ]));
        assert_eq!(decode(&bad_payload).unwrap_err().reason(), "invalid_msgpack");
        let other_topic = enc(&map(vec![
            ("publisher_id", Value::from(1u64)),
            ("sequence", Value::from(0u64)),
            ("topic", s("kv_metrics")),
            ("payload", Value::Binary(enc(&Value::Array(vec![])))),
        ]));
        assert_eq!(decode(&other_topic).unwrap_err().reason(), "bad_shape");
    }

    proptest! {
        #[test]
        fn never_panics_on_arbitrary_bytes(b in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode(&b);
        }

        #[test]
        fn never_panics_on_a_valid_envelope_with_arbitrary_payload(p in proptest::collection::vec(any::<u8>(), 0..512)) {
            let m = enc(&map(vec![
                ("publisher_id", Value::from(1u64)),
                ("sequence", Value::from(0u64)),
                ("payload", Value::Binary(p)),
            ]));
            let _ = decode(&m);
        }
    }
}
