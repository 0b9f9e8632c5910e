//! Waiting at the edge for the router queue (`sched/queue.rs` holds its order and rule): a
//! queued request keeps its ext_proc stream open here until [`pump`] dispatches it with the
//! same `Router::route` decision, it waits too long, or its stream goes away.
//!
//! Lock order: the queue, then the router.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use parking_lot::Mutex;
use tokio::sync::{mpsc, oneshot};

use opentelemetry_sdk::trace::Span;

use super::{envoy, error::EppError, otel::{self, RequestTrace}, App};
use crate::{
    router::{Bind, Decision, EndpointMatch, Lookup, RouteError, RoutingRequest},
    sched::queue::{Arrival, Claims, LateRound, Queue, QueuePolicy, QueueSettings, Ticket},
};

type Reply = Result<Decision, RouteError>;

/// What a waiting request keeps in the queue: its routing input, its cache lookup (`wspt`:
/// taken once for its key and reused for its decision), and where its decision goes.
pub struct Waiter {
    req: RoutingRequest,
    lookup: Option<Lookup>,
    reply: oneshot::Sender<Reply>,
}

/// The router queue and how long a request may wait in it.
pub struct Waitlist {
    queue: Mutex<Queue<Waiter>>,
    threshold: f64,
    /// Any class orders by `wspt` (needs each prompt's uncached tokens).
    wspt: bool,
    /// `DYN_EPP_QUEUE_LATE_BINDING` (`router::Bind`).
    late: bool,
    pub max_wait: Duration,
    /// Status of a request refused by a full queue (`DYN_HTTP_OVERLOAD_STATUS_CODE`).
    pub full_status: u16,
}

impl Waitlist {
    pub fn new(settings: QueueSettings, max_wait: Duration, full_status: u16) -> Self {
        let wspt = settings.classes.iter().any(|c| c.policy.unwrap_or(settings.policy) == QueuePolicy::Wspt);
        Waitlist { threshold: settings.threshold, wspt, late: settings.late_binding, queue: Mutex::new(Queue::new(settings)), max_wait, full_status }
    }

    pub fn len(&self) -> usize {
        self.queue.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

type Gateway = mpsc::Sender<Result<envoy_types::pb::envoy::service::ext_proc::v3::ProcessingResponse, tonic::Status>>;

/// What became of an arriving request: routed now, or waiting in the queue (dropping the
/// guard takes it out; [`wait`] waits for its decision).
pub enum Admitted {
    Routed(Decision),
    Queued(Box<Waiting>),
}

/// An arriving request's decision, made now (no locks held across an await): without the
/// router queue it is routed; with it (`arrival` set), routed when no one waits and a worker
/// has room (late binding: when its pick takes it), else queued. `kept`: its cache lookup, if
/// one was taken (a decision window's group).
pub fn admit(app: &Arc<App>, req: RoutingRequest, arrival: Option<Arrival>, kept: Option<Lookup>, now: Instant) -> Result<Admitted, EppError> {
    let (Some(wl), Some(mut arrival)) = (&app.queue, arrival) else {
        let mut router = app.router.lock();
        let d = router.route_binding(&req, kept.as_ref(), Bind::Now, now, &mut rand::rng());
        app.note_active(&router);
        return d.map(Admitted::Routed).map_err(|e| app.route_error(e));
    };
    let (ticket, rx) = {
        let mut q = wl.queue.lock();
        let mut router = app.router.lock();
        if let Some(bind) = router.arrival_bind(&req, !q.is_empty(), wl.threshold, wl.late) {
            match router.route_binding(&req, kept.as_ref(), bind, now, &mut rand::rng()) {
                Ok(d) => {
                    app.note_active(&router);
                    if bind == Bind::Joining {
                        app.metrics.queue.joined.inc();
                    }
                    return Ok(Admitted::Routed(d));
                }
                // Busy by the admission thresholds (or not joining): wait too, rather than fail.
                Err(RouteError::Overloaded) => {}
                Err(e) => return Err(e.into()),
            }
        }
        let lookup = wl.wspt.then(|| {
            let l = kept.unwrap_or_else(|| router.lookup(&req));
            arrival.uncached_tokens = router.uncached_tokens(&req, &l);
            arrival.bytes += l.bytes();
            l
        });
        drop(router);
        let (tx, rx) = oneshot::channel();
        let pushed = q.push(Waiter { req, lookup, reply: tx }, arrival, now);
        app.metrics.queue.set_depths(q.class_names(), &q.depths());
        match pushed {
            Ok(t) => (t, rx),
            Err((_, full)) => {
                app.metrics.queue.rejected.get_or_create(&super::metrics::ReasonLabel { reason: full.as_str() }).inc();
                return Err(EppError::QueueFull { status: wl.full_status, reason: full.as_str() });
            }
        }
    };
    Ok(Admitted::Queued(Box::new(Waiting { app: app.clone(), ticket, rx, reason: "disconnected", done: false, span: None })))
}

/// A queued request's wait: tells the gateway to wait (`override_message_timeout`) and waits
/// for [`pump`]'s decision.
pub async fn wait(app: &Arc<App>, mut waiting: Box<Waiting>, gateway: &Gateway, trace: Option<(&RequestTrace, &Span)>) -> Result<Decision, EppError> {
    let wl = app.queue.as_ref().expect("a queued request has a queue");
    waiting.span = trace.map(|(t, route)| t.queue_wait(route));
    pump(app, wl, Instant::now());
    // Our answer may take up to the queue's limit; a second more lets our own eviction answer
    // arrive before the gateway gives up.
    if gateway.send(Ok(envoy::extend_message_timeout(wl.max_wait + Duration::from_secs(1)))).await.is_err() {
        return Err(EppError::NoRoute(RouteError::NoWorkers));
    }
    match tokio::time::timeout(wl.max_wait, &mut waiting.rx).await {
        Ok(Ok(reply)) => {
            waiting.done = true;
            reply.map_err(EppError::from)
        }
        // The queue dropped it without an answer: only on shutdown of the process.
        Ok(Err(_)) => {
            waiting.done = true;
            Err(EppError::NoRoute(RouteError::NoWorkers))
        }
        Err(_) => {
            waiting.reason = "timeout";
            Err(EppError::Evicted { secs: wl.max_wait.as_secs_f64() })
        }
    }
}

/// A request in the queue; dropping it (stream gone, eviction) takes it out at once, or frees
/// the booking of a decision that arrived too late to be used.
pub struct Waiting {
    app: Arc<App>,
    ticket: Ticket,
    rx: oneshot::Receiver<Reply>,
    reason: &'static str,
    done: bool,
    /// The `queue_wait` span: ends with the wait, however it ends.
    span: Option<Span>,
}

impl Drop for Waiting {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        if let Some(span) = self.span.as_mut() {
            otel::left_queue(span, self.reason);
        }
        let Some(wl) = &self.app.queue else { return };
        let removed = {
            let mut q = wl.queue.lock();
            let r = q.remove(self.ticket).is_some();
            self.app.metrics.queue.set_depths(q.class_names(), &q.depths());
            r
        };
        if removed {
            self.app.metrics.queue.evicted.get_or_create(&super::metrics::ReasonLabel { reason: self.reason }).inc();
        } else if let Ok(Ok(d)) = self.rx.try_recv() {
            let mut router = self.app.router.lock();
            router.on_end(d.booking, Instant::now());
            self.app.note_active(&router);
            drop(router);
            pump(&self.app, wl, Instant::now());
        }
    }
}

/// Dispatches waiting requests in the queue's order, each that can run (`sched::queue`'s
/// head-of-line rule: a blocked request claims its workers and holds only the requests that
/// would need them; late binding: each goes if the rank it would pick takes it, and claims
/// nothing): called when capacity may have freed (a first token, a booking's end, a fleet
/// change) and on a tick (load expiry, stale `wspt` keys).
pub fn pump(app: &App, wl: &Waitlist, now: Instant) {
    let mut q = wl.queue.lock();
    if q.is_empty() {
        return;
    }
    let mut router = app.router.lock();
    for t in q.stale(now) {
        let w = q.item_mut(t).expect("stale entry");
        let l = w.lookup.get_or_insert_with(|| router.lookup(&w.req));
        router.refresh(l);
        let uncached = router.uncached_tokens(&w.req, l);
        q.rekey(t, uncached, now);
    }
    let mut claims = Claims::default();
    // Subset hints found blocked this round (claims only grow: they stay blocked).
    let mut blocked: Vec<Option<Vec<EndpointMatch>>> = Vec::new();
    let mut rng = rand::rng();
    let mut late_round = LateRound::default();
    let mut dispatched = false;
    while claims.len() < router.worker_count() {
        let mut decided = None;
        let popped = q.pop_first(now, |t, w| {
            if w.reply.is_closed() {
                // Its stream is gone (its own drop counts the eviction): it leaves.
                return true;
            }
            if wl.late {
                decided = router.release_late(&mut late_round, t, &w.req, w.lookup.as_ref(), wl.threshold, now, &mut rng);
                return decided.is_some();
            }
            if blocked.contains(&w.req.subset) {
                return false;
            }
            let d = if router.queue_gate_open(&w.req, wl.threshold, &claims) {
                router.route_waiting(&w.req, w.lookup.as_ref(), &claims, now, &mut rng)
            } else {
                Err(RouteError::Overloaded)
            };
            if d == Err(RouteError::Overloaded) {
                router.claim_pool(&w.req, &mut claims);
                blocked.push(w.req.subset.clone());
                return false;
            }
            decided = Some(d);
            true
        });
        let Some(d) = popped else { break };
        let Some(decided) = decided else { continue };
        let class = super::metrics::ClassLabel { class: d.class };
        app.metrics.queue.dispatched.get_or_create(&class).inc();
        app.metrics.queue.wait_seconds.get_or_create(&class).observe(d.waited.as_secs_f64());
        if let Err(Ok(late)) = d.item.reply.send(decided) {
            router.on_end(late.booking, now);
        }
        dispatched = true;
    }
    if dispatched {
        app.note_active(&router);
    }
    drop(router);
    app.metrics.queue.set_depths(q.class_names(), &q.depths());
}
