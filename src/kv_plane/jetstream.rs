//! The legacy JetStream plane: a durable pull consumer on the KV-event stream. A new process
//! starts with an empty index, so it replays what the stream retains (what an earlier process
//! acknowledged died with that process's index); a session that reconnects within the process
//! resumes at the consumer's position and misses nothing published meanwhile.

use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};

use async_nats::jetstream::{
    self,
    consumer::{pull, AckPolicy, DeliverPolicy},
    stream,
};
use futures_util::StreamExt;

use super::{EventSink, PlaneSettings, RETRY};
use crate::kv::events::jetstream::{decode, stream_name, stream_subjects};

/// How long the server keeps an idle durable consumer (Dynamo's value).
const INACTIVE_THRESHOLD: Duration = Duration::from_secs(300);
/// Events older than this leave the stream (Dynamo's `DYN_NATS_STREAM_MAX_AGE` default).
const STREAM_MAX_AGE: Duration = Duration::from_secs(3600);
/// A message delivered but not acknowledged (say, we crashed) is redelivered after this.
const ACK_WAIT: Duration = Duration::from_secs(10);

/// Consumes forever, reconnecting as needed.
pub async fn run(s: PlaneSettings, sink: Arc<dyn EventSink>) {
    let mut fresh = true;
    loop {
        match session(&s, &*sink, &mut fresh).await {
            Ok(()) => tracing::warn!("JetStream KV event stream ended; resubscribing"),
            Err(e) => tracing::warn!(error = %e, url = %s.nats.shown_url(), "JetStream KV events unavailable; retrying"),
        }
        tokio::time::sleep(RETRY).await;
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// `fresh`: the first session of this process, whose index is empty.
async fn session(s: &PlaneSettings, sink: &dyn EventSink, fresh: &mut bool) -> Result<(), BoxError> {
    let client = s.nats.connect(|o| o).await?;
    let js = jetstream::new(client);
    let name = stream_name(&s.namespace, &s.component);
    // Create-or-get, so the EPP and the workers may start in any order.
    let stream = js
        .get_or_create_stream(stream::Config {
            name: name.clone(),
            subjects: vec![stream_subjects(&name)],
            max_age: STREAM_MAX_AGE,
            ..Default::default()
        })
        .await?;
    let deliver_policy = if *fresh {
        // This replica's consumer is recreated (others keep theirs): from the stream's start,
        // or with DYN_ROUTER_RESET_STATES from its end. Its old position only counted what a
        // previous process applied (found by tests/faults.rs: a SIGKILLed and restarted EPP
        // missed every event before the kill).
        match stream.delete_consumer(&s.consumer).await {
            Ok(_) => tracing::info!(consumer = %s.consumer, reset = s.reset_states, "durable consumer recreated for a new process"),
            Err(e) => tracing::debug!(error = %e, "no durable consumer to recreate"),
        }
        if s.reset_states {
            DeliverPolicy::New
        } else {
            DeliverPolicy::All
        }
    } else {
        DeliverPolicy::All
    };
    let consumer: jetstream::consumer::PullConsumer = stream
        .get_or_create_consumer(
            &s.consumer,
            pull::Config {
                durable_name: Some(s.consumer.clone()),
                deliver_policy,
                ack_policy: AckPolicy::Explicit,
                ack_wait: ACK_WAIT,
                inactive_threshold: INACTIVE_THRESHOLD,
                ..Default::default()
            },
        )
        .await?;
    *fresh = false;
    tracing::info!(stream = %name, consumer = %s.consumer, "consuming JetStream KV events");
    let mut messages = consumer.messages().await?;
    while let Some(m) = messages.next().await {
        let m = match m {
            Ok(m) => m,
            // A missed heartbeat (e.g. the server restarting) ends this session; the durable
            // consumer keeps the position for the next one.
            Err(e) => return Err(e.into()),
        };
        match decode(&m.payload) {
            Ok(ev) => sink.apply(std::slice::from_ref(&ev), m.info().ok().map(|i| SystemTime::from(i.published))),
            Err(e) => {
                tracing::debug!(error = %e, subject = %m.subject, "KV event rejected");
                sink.rejected(e.reason());
            }
        }
        // Bad messages are acknowledged too: redelivering them could never help.
        m.ack().await?;
    }
    Ok(())
}
