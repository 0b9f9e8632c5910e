//! Start-up of the KV side: the event plane subscriber feeding the router, and the periodic
//! expiry of remembered decisions.

use std::{
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use super::App;
use crate::{
    config::Config,
    kv::events::RouterEvent,
    kv_plane::{self, EventSink},
    workers::Worker,
};

/// How often remembered decisions are expired besides lazily on every route.
const EXPIRE_EVERY: Duration = Duration::from_secs(1);

pub fn start(cfg: &Config, app: Arc<App>) {
    {
        let app = app.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(EXPIRE_EVERY);
            loop {
                tick.tick().await;
                app.router.lock().expire(Instant::now());
            }
        });
    }
    kv_plane::start(cfg, app);
}

impl EventSink for App {
    fn apply(&self, events: &[RouterEvent], published: Option<SystemTime>) {
        if let Some(lag) = published.and_then(|p| SystemTime::now().duration_since(p).ok()) {
            self.metrics.kv_event_lag_seconds.observe(lag.as_secs_f64());
        }
        let mut router = self.router.lock();
        for ev in events {
            let a = router.apply(ev);
            if a.lost > 0 {
                tracing::warn!(worker = %ev.worker_id, dp_rank = ev.event.dp_rank, lost = a.lost, "KV events lost (event id gap)");
                self.metrics.kv_events_lost.inc_by(a.lost);
            }
            match a.rejected {
                Some(reason) => {
                    tracing::debug!(worker = %ev.worker_id, reason, "KV event not applied");
                    self.metrics.kv_rejected(reason);
                }
                None => {
                    self.metrics.kv_events_applied.inc();
                }
            }
        }
        self.metrics.kv_blocks.set(router.kv_blocks() as i64);
    }

    fn rejected(&self, reason: &'static str) {
        self.metrics.kv_rejected(reason);
    }

    fn lost(&self, n: u64) {
        self.metrics.kv_events_lost.inc_by(n);
    }

    fn block_size(&self) -> u32 {
        self.router.lock().block_size()
    }

    fn workers(&self) -> Vec<Worker> {
        self.router.lock().workers().to_vec()
    }
}
