//! The I/O edge toward the KV event planes: NATS JetStream, NATS core, or the engines' own ZMQ
//! sockets. Each transport only moves bytes: decoding is `crate::kv::events`, state is the
//! router's; they meet through [`EventSink`]. A transport never gives up: connection trouble
//! is logged and retried, a bad message is counted and skipped (acknowledged on JetStream).

pub mod jetstream;
pub mod nats;
pub mod zmq;

use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};

use crate::{
    config::{Config, EventPlane},
    kv::events::RouterEvent,
    workers::{Worker, WorkerId},
};

/// How long to wait before retrying a failed connection.
const RETRY: Duration = Duration::from_secs(1);

/// Where decoded events go (the server's router, or a test's recorder).
pub trait EventSink: Send + Sync + 'static {
    /// Applies the events of one message, in order; `published` is when the publisher sent
    /// it, if the transport says (for the event-lag metric).
    fn apply(&self, events: &[RouterEvent], published: Option<SystemTime>);
    /// A message or event was not applied (`reason` is a metric label).
    fn rejected(&self, reason: &'static str);
    /// `n` messages are known to be lost (transport sequence gap).
    fn lost(&self, n: u64);
    /// Tokens per block: engine (ZMQ) events are re-hashed with it.
    fn block_size(&self) -> u32;
    /// The fleet, for the ZMQ plane's per-worker sockets.
    fn workers(&self) -> Vec<Worker>;
}

/// The settings every plane needs, taken from the one `Config`.
#[derive(Clone, Debug)]
pub struct PlaneSettings {
    pub nats: crate::nats::NatsConnect,
    pub namespace: String,
    pub component: String,
    pub consumer: String,
    pub reset_states: bool,
}

impl PlaneSettings {
    pub fn from_config(cfg: &Config) -> Self {
        PlaneSettings {
            nats: cfg.nats(),
            namespace: cfg.event_namespace().to_string(),
            component: cfg.component.clone(),
            consumer: cfg.kv_consumer(),
            reset_states: cfg.router_reset_states,
        }
    }
}

/// Starts the configured event plane's subscriber; none when KV events are off.
pub fn start(cfg: &Config, sink: Arc<dyn EventSink>) -> Option<tokio::task::JoinHandle<()>> {
    if !cfg.use_kv_events {
        tracing::info!(ttl_secs = cfg.router_ttl_secs, "KV events off: approximate mode");
        return None;
    }
    let s = PlaneSettings::from_config(cfg);
    tracing::info!(plane = ?cfg.event_plane, nats = %s.nats.shown_url(), namespace = %s.namespace, component = %s.component, "subscribing to KV events");
    Some(match cfg.event_plane {
        EventPlane::Jetstream => tokio::spawn(jetstream::run(s, sink)),
        EventPlane::Nats => tokio::spawn(nats::run(s, sink)),
        EventPlane::Zmq => tokio::spawn(zmq::run(sink)),
    })
}

/// One engine socket to subscribe to: a worker's DP rank.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ZmqSource {
    pub worker: WorkerId,
    pub dp_rank: u32,
    pub endpoint: String,
    pub replay: Option<String>,
}

/// Engine sockets of a fleet: DP rank r of a worker publishes on its base port + (r − first
/// rank), as vLLM offsets ports per data-parallel rank; replay endpoints likewise.
pub fn zmq_sources(workers: &[Worker]) -> Vec<ZmqSource> {
    let offset = |ep: &str, by: u32| -> Option<String> {
        let (head, port) = ep.rsplit_once(':')?;
        let port = port.parse::<u16>().ok()?.checked_add(u16::try_from(by).ok()?)?;
        Some(format!("{head}:{port}"))
    };
    let mut out = Vec::new();
    for w in workers {
        let Some(src) = &w.kv_events else { continue };
        for (i, rank) in w.ranks().enumerate() {
            let Some(endpoint) = offset(&src.endpoint, i as u32) else { continue };
            let replay = src.replay.as_deref().and_then(|r| offset(r, i as u32));
            out.push(ZmqSource { worker: w.id, dp_rank: rank.dp_rank.0, endpoint, replay });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workers::{KvEventSource, Role};

    #[test]
    fn zmq_sources_offset_ports_per_rank() {
        let w = |id, dp, kv: Option<(&str, Option<&str>)>| Worker {
            id: WorkerId(id),
            name: String::new(),
            endpoint: "127.0.0.1:1".parse().unwrap(),
            role: Role::Worker,
            dp_start_rank: 2,
            dp_size: dp,
            total_kv_blocks: None,
            max_num_batched_tokens: None,
            kv_events: kv.map(|(e, r)| KvEventSource { endpoint: e.into(), replay: r.map(Into::into) }),
        };
        let s = zmq_sources(&[
            w(1, 2, Some(("tcp://10.0.0.1:5557", Some("tcp://10.0.0.1:6000")))),
            w(2, 1, None),
            w(3, 1, Some(("tcp://h:5557", None))),
        ]);
        let got: Vec<_> = s.iter().map(|s| (s.worker.0, s.dp_rank, s.endpoint.as_str(), s.replay.as_deref())).collect();
        assert_eq!(
            got,
            vec![
                (1, 2, "tcp://10.0.0.1:5557", Some("tcp://10.0.0.1:6000")),
                (1, 3, "tcp://10.0.0.1:5558", Some("tcp://10.0.0.1:6001")),
                (3, 2, "tcp://h:5557", None),
            ]
        );
    }
}
