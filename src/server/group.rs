//! The decision window (`DYN_EPP_DECISION_WINDOW_MS`): a request arriving when no group is
//! open opens one; every request arriving within the window joins it; when it ends the group
//! is decided together — the request that loses most by not getting its best worker first
//! (`Router::most_constrained`), each after those before it are booked — through the router
//! queue when there is one. A request whose stream ends meanwhile is skipped, or its decision
//! undone.
//!
//! Lock order: the window's list alone (never held with the queue or the router).

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use parking_lot::Mutex;
use tokio::sync::oneshot;

use super::{
    error::EppError,
    queue::{self, Admitted},
    App,
};
use crate::{
    router::{Bind, Lookup, RouteError, RoutingRequest},
    sched::queue::Arrival,
};

/// The open group and how long a group stays open.
pub struct Window {
    span: Duration,
    pending: Mutex<Vec<Pending>>,
}

/// A request waiting for its group's decision; `arrival` when the router queue is on.
struct Pending {
    req: RoutingRequest,
    arrival: Option<Arrival>,
    reply: oneshot::Sender<Handoff>,
}

/// A decision on its way to its request: dropped unclaimed (the stream ended after the group
/// was decided) it frees the booking; a queued request's own guard takes it out of the queue.
struct Handoff {
    app: Arc<App>,
    admitted: Option<Result<Admitted, EppError>>,
}

impl Handoff {
    fn take(mut self) -> Result<Admitted, EppError> {
        self.admitted.take().expect("a handoff is taken once")
    }
}

impl Drop for Handoff {
    fn drop(&mut self) {
        if let Some(Ok(Admitted::Routed(d))) = self.admitted.take() {
            let mut router = self.app.router.lock();
            router.on_end(d.booking, Instant::now());
            self.app.note_active(&router);
            drop(router);
            self.app.dispatch_waiting();
        }
    }
}

impl Window {
    pub fn new(span: Duration) -> Self {
        Window { span, pending: Mutex::new(Vec::new()) }
    }
}

/// Joins the open group (or opens one, whose end is then scheduled) and waits for its decision.
pub async fn decide(app: &Arc<App>, window: &Window, req: RoutingRequest, arrival: Option<Arrival>) -> Result<Admitted, EppError> {
    let (reply, rx) = oneshot::channel();
    let opens = {
        let mut pending = window.pending.lock();
        pending.push(Pending { req, arrival, reply });
        pending.len() == 1
    };
    if opens {
        // Its own task: the group is decided even if the request that opened it goes away.
        let (app, span) = (app.clone(), window.span);
        tokio::spawn(async move {
            tokio::time::sleep(span).await;
            close(&app);
        });
    }
    match rx.await {
        Ok(handoff) => handoff.take(),
        // The group was dropped undecided: only on shutdown of the process.
        Err(_) => Err(EppError::NoRoute(RouteError::NoWorkers)),
    }
}

/// Ends the open group: decides its requests, most constrained first.
fn close(app: &Arc<App>) {
    let Some(window) = &app.window else { return };
    let pending = std::mem::take(&mut *window.pending.lock());
    app.metrics.decision_group_size.observe(pending.len() as f64);
    // Each request's cache lookup, taken once for the group.
    let mut group: Vec<(Pending, Lookup)> = {
        let router = app.router.lock();
        pending
            .into_iter()
            .map(|p| {
                let l = router.lookup(&p.req);
                (p, l)
            })
            .collect()
    };
    while !group.is_empty() {
        let k = app.router.lock().most_constrained(group.iter().map(|(p, l)| (&p.req, l)));
        let (p, lookup) = group.remove(k);
        if p.reply.is_closed() {
            continue;
        }
        let admitted = match (&app.queue, p.arrival) {
            (Some(wl), Some(arrival)) => queue::admit(app, wl, p.req, arrival, Some(lookup), Instant::now()),
            _ => {
                let mut router = app.router.lock();
                let d = router.route_binding(&p.req, Some(&lookup), Bind::Now, Instant::now(), &mut rand::rng());
                app.note_active(&router);
                d.map(Admitted::Routed).map_err(|e| app.route_error(e))
            }
        };
        // A closed receiver hands the decision back: the handoff's drop undoes it.
        let _ = p.reply.send(Handoff { app: app.clone(), admitted: Some(admitted) });
    }
    app.dispatch_waiting();
}
