//! Replica sync's transport (`DYN_ROUTER_REPLICA_SYNC`, contracts §8.4): several EPP replicas
//! share their bookings over NATS core so each one's load view counts the others' requests.
//!
//! - A publisher task drains the router's outbox ([`Router::take_peer_events`]) whenever a
//!   booking changed ([`App::peer_events`]) and sends each change as Dynamo's
//!   `ActiveSequenceEvent`; every second it also sends a heartbeat on `{subject}.heartbeat`.
//! - A subscriber task applies other replicas' changes ([`Router::apply_peer`]) and forgets a
//!   replica whose heartbeats stopped for `DYN_EPP_REPLICA_TIMEOUT_SECS`
//!   ([`Router::forget_peer`]). Dynamo's own routers send no heartbeat: their bookings are
//!   only aged out by the router's expiry.
//!
//! Best-effort and off the request path: nothing is sent under the router lock, and while
//! NATS is away changes are counted as dropped (the client reconnects by itself).
//!
//! [`Router::take_peer_events`]: crate::router::Router::take_peer_events
//! [`Router::apply_peer`]: crate::router::Router::apply_peer
//! [`Router::forget_peer`]: crate::router::Router::forget_peer

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use async_nats::{connection::State, Client};
use futures_util::StreamExt;
use rand::Rng;

use super::App;
use crate::{
    config::Config,
    kv::events::nats::{subject, Gaps, Header},
    sched::replica::{decode, decode_heartbeat, encode, heartbeat, TOPIC},
};

const HEARTBEAT_EVERY: Duration = Duration::from_secs(1);
/// How often silent peers are looked for.
const SWEEP_EVERY: Duration = Duration::from_millis(250);
/// A publish the client cannot queue within this long (NATS away) is dropped.
const PUBLISH_WAIT: Duration = Duration::from_millis(100);
/// Router ids stay below 2^53, as Dynamo keeps its publisher ids JSON-safe.
const MAX_ROUTER_ID: u64 = (1 << 53) - 1;

pub fn start(cfg: &Config, app: Arc<App>) {
    let router_id = rand::rng().random_range(1..=MAX_ROUTER_ID);
    let events = subject(cfg.event_namespace(), &cfg.component, "generate", TOPIC);
    let beats = format!("{events}.heartbeat");
    let timeout = Duration::from_secs_f64(cfg.replica_timeout_secs);
    let nats = cfg.nats();
    tracing::info!(router_id, subject = %events, nats = %nats.shown_url(), "replica sync on");
    tokio::spawn(async move {
        let client = match connect(&nats).await {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, url = %nats.shown_url(), "replica sync off: bad NATS address or credentials file");
                return;
            }
        };
        tokio::spawn(publish(client.clone(), app.clone(), router_id, events.clone(), beats.clone()));
        subscribe(client, app, router_id, events, beats, timeout).await;
    });
}

/// Connects (and later reconnects) in the background; routing never waits for it.
async fn connect(nats: &crate::nats::NatsConnect) -> Result<Client, crate::nats::ConnectError> {
    nats.connect(|o| {
        // Our own messages are not delivered back to us.
        o.no_echo().event_callback(|ev| async move {
            match ev {
                async_nats::Event::Connected => tracing::info!("replica sync: NATS connected"),
                async_nats::Event::Disconnected => {
                    tracing::warn!("replica sync: NATS disconnected; routing on this replica's view until it is back")
                }
                _ => {}
            }
        })
    })
    .await
}

fn unix_ms() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

async fn publish(client: Client, app: Arc<App>, router_id: u64, events: String, beats: String) {
    let mut heartbeats = tokio::time::interval(HEARTBEAT_EVERY);
    heartbeats.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let (mut seq, mut beat_seq) = (0u64, 0u64);
    loop {
        let beat = tokio::select! {
            _ = app.peer_events.notified() => false,
            _ = heartbeats.tick() => true,
        };
        // Taken whether or not NATS is up: the outbox must not grow while it is away.
        let changes = app.router.lock().take_peer_events();
        let mut up = client.connection_state() == State::Connected;
        for ev in &changes {
            if !up {
                app.metrics.replica_dropped("not_connected", 1);
                continue;
            }
            let msg = encode(Header { publisher_id: router_id, sequence: seq, published_at: unix_ms() }, router_id, ev);
            seq += 1;
            match tokio::time::timeout(PUBLISH_WAIT, client.publish(events.clone(), msg.into())).await {
                Ok(Ok(())) => {
                    app.metrics.replica_events_published.inc();
                }
                _ => {
                    up = false;
                    app.metrics.replica_dropped("not_connected", 1);
                }
            }
        }
        if beat && up {
            let msg = heartbeat(Header { publisher_id: router_id, sequence: beat_seq, published_at: unix_ms() });
            beat_seq += 1;
            let _ = tokio::time::timeout(PUBLISH_WAIT, client.publish(beats.clone(), msg.into())).await;
        }
    }
}

async fn subscribe(client: Client, app: Arc<App>, router_id: u64, events: String, beats: String, timeout: Duration) {
    // The client resubscribes by itself after a reconnect; these fail only once it is closed.
    let (mut event_sub, mut beat_sub) = match (client.subscribe(events).await, client.subscribe(beats).await) {
        (Ok(e), Ok(b)) => (e, b),
        (Err(e), _) | (_, Err(e)) => {
            tracing::error!(error = %e, "replica sync: cannot subscribe; peers' load is not seen");
            return;
        }
    };
    let mut peers = Peers::new(timeout);
    let mut gaps = Gaps::default();
    let mut sweep = tokio::time::interval(SWEEP_EVERY);
    loop {
        tokio::select! {
            Some(m) = event_sub.next() => {
                let msg = match decode(&m.payload) {
                    Ok(msg) => msg,
                    Err(e) => {
                        tracing::debug!(error = %e, "replica sync message rejected");
                        app.metrics.replica_dropped(e.reason(), 1);
                        continue;
                    }
                };
                if msg.router_id == router_id {
                    continue;
                }
                let lost = gaps.missed(&msg.header);
                if lost > 0 {
                    tracing::debug!(peer = msg.router_id, lost, "replica sync messages lost");
                    app.metrics.replica_dropped("lost", lost);
                }
                let now = Instant::now();
                peers.touch(msg.router_id, now);
                app.router.lock().apply_peer(msg.router_id, msg.event, now);
                app.metrics.replica_events_applied.inc();
            }
            Some(m) = beat_sub.next() => {
                match decode_heartbeat(&m.payload) {
                    Ok(id) if id != router_id => {
                        if peers.heartbeat(id, Instant::now()) {
                            tracing::info!(peer = id, "replica sync: peer replica joined");
                        }
                    }
                    Ok(_) => {}
                    Err(e) => app.metrics.replica_dropped(e.reason(), 1),
                }
            }
            _ = sweep.tick() => {
                for id in peers.silent(Instant::now()) {
                    tracing::info!(peer = id, timeout_secs = timeout.as_secs_f64(), "replica sync: peer replica silent; its bookings are dropped");
                    app.router.lock().forget_peer(id);
                    gaps.forget(id);
                }
                app.metrics.replica_peers.set(peers.len() as i64);
            }
            else => return,
        }
    }
}

/// The peer replicas that send heartbeats, and when each was last heard.
struct Peers {
    timeout: Duration,
    last: HashMap<u64, Instant>,
}

impl Peers {
    fn new(timeout: Duration) -> Self {
        Peers { timeout, last: HashMap::new() }
    }

    /// A heartbeat; true for a peer not known before.
    fn heartbeat(&mut self, id: u64, now: Instant) -> bool {
        self.last.insert(id, now).is_none()
    }

    /// Any other message: a sign of life only from a peer that sends heartbeats (one that
    /// never does must not be timed out).
    fn touch(&mut self, id: u64, now: Instant) {
        if let Some(t) = self.last.get_mut(&id) {
            *t = now;
        }
    }

    /// Peers silent for longer than the timeout, now forgotten.
    fn silent(&mut self, now: Instant) -> Vec<u64> {
        let timeout = self.timeout;
        let gone: Vec<u64> = self.last.iter().filter(|(_, t)| now.saturating_duration_since(**t) > timeout).map(|(id, _)| *id).collect();
        for id in &gone {
            self.last.remove(id);
        }
        gone
    }

    fn len(&self) -> usize {
        self.last.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peers_time_out_only_after_heartbeating() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut p = Peers::new(s(5));
        assert!(p.heartbeat(1, t0));
        assert!(!p.heartbeat(1, t0 + s(1)));
        p.touch(2, t0); // never sent a heartbeat: not tracked
        p.touch(1, t0 + s(4));
        assert_eq!(p.len(), 1);
        assert!(p.silent(t0 + s(9)).is_empty());
        assert_eq!(p.silent(t0 + s(10)), vec![1]);
        assert_eq!(p.len(), 0);
        assert!(p.heartbeat(1, t0 + s(11)), "a returning peer joins again");
    }
}
