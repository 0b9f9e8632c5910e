//! Dynamo's event plane on NATS core: a plain subscription (no persistence; the transport
//! sequence of each publisher reveals what was lost while disconnected).

use std::{
    sync::Arc,
    time::{Duration, UNIX_EPOCH},
};

use futures_util::StreamExt;

use super::{EventSink, PlaneSettings, RETRY};
use crate::kv::events::nats::{decode, subject, Gaps, KV_TOPIC};

pub async fn run(s: PlaneSettings, sink: Arc<dyn EventSink>) {
    loop {
        if let Err(e) = session(&s, &*sink).await {
            tracing::warn!(error = %e, url = %s.nats.shown_url(), "NATS KV events unavailable; retrying");
        }
        tokio::time::sleep(RETRY).await;
    }
}

async fn session(s: &PlaneSettings, sink: &dyn EventSink) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let client = s.nats.connect(|o| o).await?;
    // The client resubscribes by itself after a reconnect.
    let subj = subject(&s.namespace, &s.component, "generate", KV_TOPIC);
    let mut sub = client.subscribe(subj.clone()).await?;
    tracing::info!(subject = %subj, "consuming NATS KV events");
    let mut gaps = Gaps::default();
    while let Some(m) = sub.next().await {
        match decode(&m.payload) {
            Ok(env) => {
                let n = gaps.missed(&env.header);
                if n > 0 {
                    tracing::warn!(publisher = env.header.publisher_id, lost = n, "NATS KV event messages lost");
                    sink.lost(n);
                }
                sink.apply(&env.events, Some(UNIX_EPOCH + Duration::from_millis(env.header.published_at)));
            }
            Err(e) => {
                tracing::debug!(error = %e, "KV event message rejected");
                sink.rejected(e.reason());
            }
        }
    }
    Ok(())
}
