//! The decision window (`DYN_EPP_DECISION_WINDOW_MS`): a request ready to be decided joins the
//! open group (or opens one); the group ends as soon as no other request is still arriving
//! (headers in, body or tokenization not done), at the latest when the window has passed since
//! it opened, and is then decided together — the request that loses most by not getting its
//! best worker first (`Router::most_constrained`), each after those before it are booked —
//! through the router queue when there is one. A lone request waits for nothing. A request
//! whose stream ends meanwhile is skipped, or its decision undone.
//!
//! Lock order: the window's group alone (never held with the queue or the router).

use std::{
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
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
    router::{Lookup, RouteError, RoutingRequest},
    sched::queue::Arrival,
};

/// The open group, how long a group stays open at most, and the requests still arriving.
pub struct Window {
    span: Duration,
    group: Mutex<Group>,
    arriving: AtomicUsize,
}

/// The open group's requests; its number tells a group's timer from a later group's.
#[derive(Default)]
struct Group {
    id: u64,
    members: Vec<Pending>,
}

/// A request still arriving while the window is on (its headers are in; its body or its
/// tokenization is not done): an open group waits for it. Dropped when it joins the group or
/// leaves; the last one dropped ends the open group.
pub struct Arriving {
    app: Arc<App>,
}

impl Arriving {
    /// `None` without a window.
    pub fn new(app: &Arc<App>) -> Option<Self> {
        app.window.as_ref()?.arriving.fetch_add(1, Ordering::SeqCst);
        Some(Arriving { app: app.clone() })
    }
}

impl Drop for Arriving {
    fn drop(&mut self) {
        let window = self.app.window.as_ref().expect("counted only with a window");
        if window.arriving.fetch_sub(1, Ordering::SeqCst) == 1 {
            close(&self.app, None);
        }
    }
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
        Window { span, group: Mutex::new(Group::default()), arriving: AtomicUsize::new(0) }
    }
}

/// Joins the open group (or opens one, whose latest end is then scheduled), stops counting as
/// arriving (the last to arrive ends the group) and waits for the group's decision.
pub async fn decide(app: &Arc<App>, window: &Window, req: RoutingRequest, arrival: Option<Arrival>, arriving: Option<Arriving>) -> Result<Admitted, EppError> {
    let (reply, rx) = oneshot::channel();
    let opened = {
        let mut group = window.group.lock();
        group.members.push(Pending { req, arrival, reply });
        (group.members.len() == 1).then_some(group.id)
    };
    if let Some(id) = opened {
        // Its own task: the group is decided even if the request that opened it goes away.
        let (app, span) = (app.clone(), window.span);
        tokio::spawn(async move {
            tokio::time::sleep(span).await;
            close(&app, Some(id));
        });
    }
    drop(arriving);
    match rx.await {
        Ok(handoff) => handoff.take(),
        // The group was dropped undecided: only on shutdown of the process.
        Err(_) => Err(EppError::NoRoute(RouteError::NoWorkers)),
    }
}

/// Ends the open group (`only`: if it is still that one) and decides its requests, most
/// constrained first.
fn close(app: &Arc<App>, only: Option<u64>) {
    let Some(window) = &app.window else { return };
    let pending = {
        let mut group = window.group.lock();
        if group.members.is_empty() || only.is_some_and(|id| id != group.id) {
            return;
        }
        group.id += 1;
        std::mem::take(&mut group.members)
    };
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
        let admitted = queue::admit(app, p.req, p.arrival, Some(lookup), Instant::now());
        // A closed receiver hands the decision back: the handoff's drop undoes it.
        let _ = p.reply.send(Handoff { app: app.clone(), admitted: Some(admitted) });
    }
    app.dispatch_waiting();
}
