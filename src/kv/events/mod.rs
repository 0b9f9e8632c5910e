//! KV events: the one [`RouterEvent`] type, with Dynamo's field names (contracts §5.5), and the
//! pure decoders that turn every wire format into it. No sockets here: the transports in
//! `crate::kv_plane` hand bytes in and `RouterEvent`s out.
//!
//! - [`jetstream`]: legacy NATS JetStream, one JSON `RouterEvent` per message.
//! - [`nats`]: Dynamo's event plane on NATS core, a msgpack envelope around `Vec<RouterEvent>`.
//! - [`zmq`]: engine-native ZMQ batches (vLLM, SGLang, TensorRT-LLM), converted like Dynamo does.

#[cfg(test)]
pub(crate) mod examples;
pub mod jetstream;
pub mod nats;
pub mod zmq;

use std::fmt;

use serde::{de, Deserialize, Deserializer, Serialize, Serializer};

use super::hash::LocalBlockHash;
use crate::workers::WorkerId;

/// The engine's opaque id of a stored block (Dynamo's `ExternalSequenceBlockHash`): used only to
/// find a block's parent and to remove it, never compared across workers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ExternalBlockHash(pub u64);

impl ExternalBlockHash {
    /// Engines send u64, i64 (bit-cast) or bytes (the low 64 bits, big-endian, as vLLM does).
    pub fn from_bytes(b: &[u8]) -> Self {
        let tail = &b[b.len().saturating_sub(8)..];
        let mut buf = [0u8; 8];
        buf[8 - tail.len()..].copy_from_slice(tail);
        ExternalBlockHash(u64::from_be_bytes(buf))
    }
}

impl Serialize for ExternalBlockHash {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(self.0)
    }
}

impl<'de> Deserialize<'de> for ExternalBlockHash {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl de::Visitor<'_> for V {
            type Value = ExternalBlockHash;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a block hash (u64, i64 or bytes)")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
                Ok(ExternalBlockHash(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
                Ok(ExternalBlockHash(v as u64))
            }
            fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Self::Value, E> {
                Ok(ExternalBlockHash::from_bytes(v))
            }
        }
        d.deserialize_any(V)
    }
}

/// Where a cached block lives; the index keeps a prefix length per tier.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StorageTier {
    #[default]
    Device,
    HostPinned,
    Disk,
    External,
}

impl StorageTier {
    pub const ALL: [StorageTier; 4] = [StorageTier::Device, StorageTier::HostPinned, StorageTier::Disk, StorageTier::External];

    pub fn index(self) -> usize {
        self as usize
    }
}

/// Who owns the cache an event describes (`WireResidencyDomain`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResidencyDomain {
    Worker,
    CacheOwner,
}

/// One cache change on one worker (Dynamo's `RouterEvent`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RouterEvent {
    pub worker_id: WorkerId,
    #[serde(default)]
    pub storage_tier: StorageTier,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub residency_domain: Option<ResidencyDomain>,
    pub event: KvCacheEvent,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct KvCacheEvent {
    /// Publisher-local counter of accepted events; a jump means events were lost.
    pub event_id: u64,
    pub data: KvCacheEventData,
    #[serde(default)]
    pub dp_rank: u32,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KvCacheEventData {
    Stored(KvCacheStoreData),
    Removed(KvCacheRemoveData),
    /// Every block of the worker's DP rank is gone.
    Cleared,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct KvCacheStoreData {
    /// The engine hash of the block the first new block follows; `None` = from the root.
    pub parent_hash: Option<ExternalBlockHash>,
    #[serde(default)]
    pub start_position: Option<u32>,
    pub blocks: Vec<KvCacheStoredBlockData>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct KvCacheStoredBlockData {
    pub block_hash: ExternalBlockHash,
    pub tokens_hash: LocalBlockHash,
    #[serde(default)]
    pub mm_extra_info: Option<BlockExtraInfo>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BlockExtraInfo {
    pub mm_objects: Vec<BlockMmObjectInfo>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BlockMmObjectInfo {
    pub mm_hash: u64,
    pub offsets: Vec<(usize, usize)>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct KvCacheRemoveData {
    pub block_hashes: Vec<ExternalBlockHash>,
}

/// Deepest msgpack nesting a message may have. Dynamo's and the engines' events nest about
/// ten levels; the libraries' default (1024) recurses deep enough to overflow a 2 MiB thread
/// stack (found by tests/fuzz: 500 one-element arrays abort a debug build).
pub const MAX_MSGPACK_DEPTH: usize = 64;

/// `rmp_serde::from_slice` with [`MAX_MSGPACK_DEPTH`].
pub fn from_msgpack<'a, T: serde::Deserialize<'a>>(b: &'a [u8]) -> Result<T, rmp_serde::decode::Error> {
    let mut de = rmp_serde::Deserializer::from_read_ref(b);
    de.set_max_depth(MAX_MSGPACK_DEPTH);
    T::deserialize(&mut de)
}

/// Why a message (or one event in it) was not applied. Each variant is one value of the
/// `reason` label of `dynamo_epp_kv_events_rejected_total`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("invalid JSON event: {0}")]
    Json(String),
    #[error("invalid msgpack: {0}")]
    Msgpack(String),
    #[error("unexpected message shape: {0}")]
    Shape(String),
    #[error("block size {got} differs from the router's {want}: the engine and the router must agree")]
    BlockSizeMismatch { got: u32, want: u32 },
    #[error("unknown storage medium {0:?}")]
    UnknownMedium(String),
}

impl DecodeError {
    pub fn reason(&self) -> &'static str {
        match self {
            DecodeError::Json(_) => "invalid_json",
            DecodeError::Msgpack(_) => "invalid_msgpack",
            DecodeError::Shape(_) => "bad_shape",
            DecodeError::BlockSizeMismatch { .. } => "block_size_mismatch",
            DecodeError::UnknownMedium(_) => "unknown_medium",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn external_hashes_accept_u64_i64_and_bytes() {
        let j: Vec<ExternalBlockHash> = serde_json::from_str("[18446744073709551615, -1, 5]").unwrap();
        assert_eq!(j, vec![ExternalBlockHash(u64::MAX), ExternalBlockHash(u64::MAX), ExternalBlockHash(5)]);
        // vLLM bytes hashes: the low 64 bits are the last 8 bytes, big-endian.
        let mut b = vec![0xAAu8; 24];
        b.extend(0x0102030405060708u64.to_be_bytes());
        assert_eq!(ExternalBlockHash::from_bytes(&b), ExternalBlockHash(0x0102030405060708));
        assert_eq!(ExternalBlockHash::from_bytes(&[1, 2]), ExternalBlockHash(0x0102));
    }
}
