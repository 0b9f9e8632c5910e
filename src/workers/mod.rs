//! Who is in the fleet: worker identity, roles, DP ranks and endpoints.
//!
//! Sources (the workers file, the Kubernetes API) only produce a whole [`Fleet`]; the router
//! takes it whole through `Router::set_fleet`.

pub mod file;
pub mod kube;

use std::{fmt, net::SocketAddr};

use serde::{Deserialize, Serialize};
use siphasher::sip::SipHasher13;
use std::hash::Hasher;

/// A Dynamo worker instance id (decimal u64 in `x-dynamo-worker-instance-id`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize, Serialize)]
#[serde(transparent)]
pub struct WorkerId(pub u64);

impl fmt::Display for WorkerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A data-parallel rank inside a worker.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DpRank(pub u32);

/// One schedulable unit: a worker and one of its DP ranks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WorkerRank {
    pub id: WorkerId,
    pub dp_rank: DpRank,
}

#[cfg(test)]
impl WorkerRank {
    /// Rank 0 of worker `id`: the unit tests' usual candidate.
    pub fn rank0(id: u64) -> Self {
        WorkerRank { id: WorkerId(id), dp_rank: DpRank(0) }
    }
}

/// What a worker does in the serving graph.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Aggregated: prefill and decode on the same worker.
    #[default]
    Worker,
    Prefill,
    Decode,
}

/// A worker as the router sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct Worker {
    pub id: WorkerId,
    /// Pod name (or any operator-facing name); the id derives from it unless given.
    pub name: String,
    /// Where the gateway forwards requests for this worker (`ip:port`).
    pub endpoint: SocketAddr,
    pub role: Role,
    pub dp_start_rank: u32,
    pub dp_size: u32,
    pub total_kv_blocks: Option<u64>,
    pub max_num_batched_tokens: Option<u64>,
    /// The engine's own ZMQ KV-event socket, for `DYN_EVENT_PLANE=zmq`.
    pub kv_events: Option<KvEventSource>,
}

/// Where an engine publishes its KV events (vLLM `--kv-events-config`): a PUB endpoint
/// (`tcp://host:port`; DP rank r publishes on port + r − dp_start_rank) and optionally the
/// ROUTER endpoint that replays missed batches.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KvEventSource {
    pub endpoint: String,
    pub replay: Option<String>,
}

impl Worker {
    pub fn ranks(&self) -> impl Iterator<Item = WorkerRank> + '_ {
        (self.dp_start_rank..self.dp_start_rank + self.dp_size)
            .map(|r| WorkerRank { id: self.id, dp_rank: DpRank(r) })
    }
}

/// The whole fleet at one moment.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Fleet {
    /// Tokens per KV block, when the source knows it.
    pub block_size: Option<u32>,
    pub workers: Vec<Worker>,
}

/// Dynamo's Kubernetes instance id for a pod: std `DefaultHasher` (SipHash-1-3, keys 0/0) over
/// `str::hash` input (UTF-8 bytes then 0xFF), masked to 53 bits so it survives JSON numbers.
/// Spelled out with `siphasher` because std's hasher is not stable across Rust releases.
pub fn hash_pod_name(name: &str) -> WorkerId {
    const INSTANCE_ID_MASK: u64 = 0x001F_FFFF_FFFF_FFFF;
    let mut h = SipHasher13::new_with_keys(0, 0);
    h.write(name.as_bytes());
    h.write_u8(0xFF);
    WorkerId(h.finish() & INSTANCE_ID_MASK)
}

#[cfg(test)]
mod tests {
    use super::*;

    // Vectors from the reference (contracts §6.1).
    #[test]
    fn hash_pod_name_matches_dynamo_vectors() {
        assert_eq!(hash_pod_name(""), WorkerId(121655548788207));
        assert_eq!(hash_pod_name("qwen-vllmdecodeworker-0"), WorkerId(2152695600563388));
    }

    #[test]
    fn hash_pod_name_is_53_bits() {
        for n in ["a", "b", "worker-17", "ü"] {
            assert!(hash_pod_name(n).0 < (1 << 53));
        }
    }
}
