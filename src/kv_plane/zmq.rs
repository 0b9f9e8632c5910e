//! The engines' own ZMQ PUB sockets, one subscription per worker DP rank listed with
//! `kv_events` in the fleet; on a sequence gap, missed batches are replayed from the engine's
//! replay socket when one is configured.

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, UNIX_EPOCH},
};

use bytes::Bytes;
use tokio::task::JoinHandle;
use zeromq::{DealerSocket, Socket, SocketRecv, SocketSend, SubSocket, ZmqMessage};

use super::{zmq_sources, EventSink, ZmqSource, RETRY};
use crate::kv::events::zmq::{split_frames, split_replay, EngineStream, ReplayItem, SeqCheck};

/// How often the fleet is checked for sockets to add or drop.
const RECONCILE: Duration = Duration::from_secs(1);
/// Longest wait for one replay reply.
const REPLAY_TIMEOUT: Duration = Duration::from_secs(2);

/// Keeps one subscriber task per engine socket in the fleet.
pub async fn run(sink: Arc<dyn EventSink>) {
    let mut tasks: HashMap<ZmqSource, JoinHandle<()>> = HashMap::new();
    let mut tick = tokio::time::interval(RECONCILE);
    loop {
        tick.tick().await;
        let want = zmq_sources(&sink.workers());
        tasks.retain(|src, t| {
            let keep = want.contains(src);
            if !keep {
                t.abort();
            }
            keep
        });
        for src in want {
            if !tasks.contains_key(&src) {
                tracing::info!(worker = %src.worker, dp_rank = src.dp_rank, endpoint = %src.endpoint, "subscribing to engine KV events");
                let t = tokio::spawn(subscribe(src.clone(), sink.clone()));
                tasks.insert(src, t);
            }
        }
    }
}

async fn subscribe(src: ZmqSource, sink: Arc<dyn EventSink>) {
    let mut socket = loop {
        let mut s = SubSocket::new();
        match s.connect(&src.endpoint).await {
            Ok(()) => break s,
            Err(e) => {
                tracing::debug!(error = %e, endpoint = %src.endpoint, "engine KV event socket not reachable yet");
                tokio::time::sleep(RETRY).await;
            }
        }
    };
    // The socket reconnects by itself (and resubscribes) if the engine restarts.
    if let Err(e) = socket.subscribe("").await {
        tracing::warn!(error = %e, "ZMQ subscribe failed");
    }
    let mut stream = EngineStream::new(src.worker);
    loop {
        let msg = match socket.recv().await {
            Ok(m) => m,
            Err(e) => {
                tracing::debug!(error = %e, endpoint = %src.endpoint, "engine KV event socket error");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let frames = msg.into_vec();
        let f = match split_frames(&frames) {
            Ok(f) => f,
            Err(e) => {
                sink.rejected(e.reason());
                continue;
            }
        };
        if let SeqCheck::Gap { expected, got } = stream.check_seq(f.seq) {
            let mut missing = got - expected;
            if let Some(replay) = &src.replay {
                missing -= replay_range(replay, expected, got, &mut stream, &*sink).await;
            }
            if missing > 0 {
                tracing::warn!(worker = %src.worker, dp_rank = src.dp_rank, lost = missing, "engine KV event batches lost");
                sink.lost(missing);
            }
        }
        apply(&mut stream, f.payload, &*sink);
    }
}

fn apply(stream: &mut EngineStream, payload: &[u8], sink: &dyn EventSink) {
    let c = stream.convert(payload, sink.block_size());
    for e in &c.rejected {
        tracing::warn!(worker = %stream.worker, error = %e, "engine KV event rejected");
        sink.rejected(e.reason());
    }
    let published = c.ts.filter(|t| t.is_finite() && *t > 0.0).and_then(|t| UNIX_EPOCH.checked_add(Duration::from_secs_f64(t)));
    sink.apply(&c.events, published);
}

/// Asks the engine's replay socket for batches `from..to` and applies them; returns how many
/// arrived.
async fn replay_range(endpoint: &str, from: u64, to: u64, stream: &mut EngineStream, sink: &dyn EventSink) -> u64 {
    let mut got = 0;
    let mut dealer = DealerSocket::new();
    let asked = async {
        dealer.connect(endpoint).await?;
        let req = ZmqMessage::try_from(vec![Bytes::new(), Bytes::copy_from_slice(&from.to_be_bytes())]).expect("two frames");
        dealer.send(req).await
    };
    if let Err(e) = tokio::time::timeout(REPLAY_TIMEOUT, asked).await.map_err(|_| "timed out".to_string()).and_then(|r| r.map_err(|e| e.to_string())) {
        tracing::warn!(error = %e, endpoint, "KV event replay request failed");
        return 0;
    }
    loop {
        let reply = match tokio::time::timeout(REPLAY_TIMEOUT, dealer.recv()).await {
            Ok(Ok(r)) => r.into_vec(),
            _ => break,
        };
        match split_replay(&reply) {
            Ok(ReplayItem::Message { seq, payload }) if (from..to).contains(&seq) => {
                apply(stream, payload, sink);
                got += 1;
            }
            Ok(ReplayItem::Message { seq, .. }) if seq >= to => break,
            Ok(ReplayItem::Message { .. }) => {}
            Ok(ReplayItem::End) => break,
            Err(e) => {
                sink.rejected(e.reason());
                break;
            }
        }
    }
    tracing::info!(endpoint, from, to, replayed = got, "KV event replay done");
    got
}
