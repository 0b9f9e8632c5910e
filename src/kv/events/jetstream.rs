//! Legacy NATS JetStream events (contracts §5.1): one JSON `RouterEvent` per message on stream
//! `namespace-{ns}-component-{comp}-kv-events`, subjects `{stream}.*`.

use super::{DecodeError, RouterEvent};

/// Dynamo's `Slug::slugify`: lowercase, every char outside `[a-z0-9_-]` → `_`; then `_` → `-`.
pub fn stream_name(namespace: &str, component: &str) -> String {
    format!("namespace.{namespace}.component.{component}.kv-events")
        .chars()
        .map(|c| c.to_ascii_lowercase())
        .map(|c| if c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' { c } else { '-' })
        .collect()
}

/// The subjects the stream captures; publishers write to `{stream}.kv-events`.
pub fn stream_subjects(stream: &str) -> String {
    format!("{stream}.*")
}

pub fn decode(payload: &[u8]) -> Result<RouterEvent, DecodeError> {
    serde_json::from_slice(payload).map_err(|e| DecodeError::Json(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::{
        events::{ExternalBlockHash, KvCacheEventData, ResidencyDomain, StorageTier},
        hash::LocalBlockHash,
    };
    use crate::workers::WorkerId;
    use proptest::prelude::*;

    #[test]
    fn stream_name_follows_the_slug_rule() {
        assert_eq!(stream_name("dynamo", "backend"), "namespace-dynamo-component-backend-kv-events");
        assert_eq!(stream_name("My.NS", "back_end"), "namespace-my-ns-component-back-end-kv-events");
        assert_eq!(stream_subjects("s"), "s.*");
    }

    // The JSON examples of contracts §5.5, verbatim.
    #[test]
    fn decodes_the_reference_examples() {
        let stored = r#"{"worker_id":7,"storage_tier":"device","residency_domain":"worker","event":{"event_id":42,"data":{"stored":{"parent_hash":123,"start_position":null,"blocks":[{"block_hash":456,"tokens_hash":789,"mm_extra_info":null}]}},"dp_rank":0}}"#;
        let e = decode(stored.as_bytes()).unwrap();
        assert_eq!(e.worker_id, WorkerId(7));
        assert_eq!(e.storage_tier, StorageTier::Device);
        assert_eq!(e.residency_domain, Some(ResidencyDomain::Worker));
        assert_eq!(e.event.event_id, 42);
        let KvCacheEventData::Stored(s) = &e.event.data else { panic!("{e:?}") };
        assert_eq!(s.parent_hash, Some(ExternalBlockHash(123)));
        assert_eq!(s.blocks[0].block_hash, ExternalBlockHash(456));
        assert_eq!(s.blocks[0].tokens_hash, LocalBlockHash(789));

        let removed = r#"{"worker_id":7,"event":{"event_id":43,"data":{"removed":{"block_hashes":[456]}},"dp_rank":1}}"#;
        let e = decode(removed.as_bytes()).unwrap();
        assert_eq!(e.storage_tier, StorageTier::Device, "storage_tier defaults to device");
        assert_eq!(e.event.dp_rank, 1);
        assert!(matches!(&e.event.data, KvCacheEventData::Removed(r) if r.block_hashes == [ExternalBlockHash(456)]));

        let cleared = r#"{"worker_id":7,"storage_tier":"host_pinned","event":{"event_id":44,"data":"cleared"}}"#;
        let e = decode(cleared.as_bytes()).unwrap();
        assert_eq!(e.event.data, KvCacheEventData::Cleared);
        assert_eq!((e.event.dp_rank, e.storage_tier), (0, StorageTier::HostPinned));
    }

    #[test]
    fn rejects_malformed_json_with_a_reason() {
        for bad in ["", "{", "[]", r#"{"worker_id":7}"#, r#"{"worker_id":7,"event":{"event_id":1,"data":"exploded"}}"#] {
            let e = decode(bad.as_bytes()).unwrap_err();
            assert_eq!(e.reason(), "invalid_json", "{bad}");
        }
    }

    proptest! {
        #[test]
        fn never_panics_on_arbitrary_bytes(b in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode(&b);
        }
    }
}
