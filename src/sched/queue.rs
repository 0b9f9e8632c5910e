//! The router queue's order and dispatch rule (Dynamo's `DYN_ROUTER_QUEUE_*`), pure: time comes
//! in as an argument, and the waiting itself lives at the server edge (`server/queue.rs`).
//!
//! A request waits while every eligible worker is saturated ([`saturated`]) or others are
//! already waiting. Which waiting request goes next, in three levels:
//! 1. **Classes** (`DYN_ROUTER_POLICY_CONFIG`, header `x-dynamo-meta-policy-class`) share
//!    dispatches by deficit round robin: a class's turn lasts `quantum` dispatches.
//! 2. Inside a class, the highest **strict priority** waiting goes first; among requests of that
//!    strict priority, **flows** (tenants: `x-tenant-id`, else the cache salt) take turns — the
//!    flow served least since it joined goes next — so one tenant's burst cannot starve
//!    another's requests of the same priority.
//! 3. Inside a flow, the **policy key** decides (highest first, then arrival): `fcfs` =
//!    `priority_jump − arrival offset (s)`, `wspt` = `(1 + priority_jump) / max(1, isl − cached)`.
//!
//! With one flow (no tenants) and one class this is Dynamo's order, `(strict_priority, key)`.
//!
//! **Dispatch** ([`Queue::pop_first`], [`Claims`]): the first request in that order that can run
//! goes. A request that cannot (every worker it may use is saturated) does not hold the ones
//! behind it, but it *claims* its workers: a request behind it may only run on workers that no
//! blocked request ahead of it could use. Requests competing for the same workers keep their
//! order; a blocked head starves no one who can run elsewhere (another subset hint, pool or
//! class).

use std::{
    cmp::{Ordering, Reverse},
    collections::{BTreeMap, BTreeSet, HashMap},
    time::{Duration, Instant},
};

use rustc_hash::FxHashSet;

use super::{active::RankLoad, admission::Capacity};
use crate::workers::WorkerId;

/// `DYN_ROUTER_QUEUE_POLICY`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QueuePolicy {
    /// First come first served, shifted by `priority_jump` seconds: bounds the tail wait.
    #[default]
    Fcfs,
    /// Weighted shortest processing time: short uncached prompts first; lowers the mean wait.
    Wspt,
}

/// One class of `DYN_ROUTER_POLICY_CONFIG`.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClassSpec {
    pub name: String,
    /// Dispatches per deficit-round-robin turn (≥ 1).
    #[serde(default = "one")]
    pub quantum: u32,
    /// This class's order; unset = `DYN_ROUTER_QUEUE_POLICY`.
    #[serde(default)]
    pub policy: Option<QueuePolicy>,
}

fn one() -> u32 {
    1
}

#[derive(serde::Deserialize)]
#[serde(untagged)]
enum PolicyFile {
    Classes { classes: Vec<ClassSpec> },
    List(Vec<ClassSpec>),
}

/// Reads a policy file: a list of classes, or `classes:` holding one. The first class is where
/// requests without (or with an unknown) class header go.
pub fn parse_policy_config(yaml: &str) -> Result<Vec<ClassSpec>, String> {
    let file: PolicyFile = serde_saphyr::from_str(yaml).map_err(|e| e.to_string().lines().next().unwrap_or("invalid YAML").to_string())?;
    let classes = match file {
        PolicyFile::Classes { classes } | PolicyFile::List(classes) => classes,
    };
    if classes.is_empty() {
        return Err("no classes".into());
    }
    for (i, c) in classes.iter().enumerate() {
        if c.name.trim().is_empty() {
            return Err(format!("class {i} has an empty name"));
        }
        if c.quantum == 0 {
            return Err(format!("class {:?}: quantum must be ≥ 1", c.name));
        }
        if classes[..i].iter().any(|o| o.name == c.name) {
            return Err(format!("class {:?} is listed twice", c.name));
        }
    }
    Ok(classes)
}

/// How the queue behaves (from the `Config`).
#[derive(Clone, Debug, PartialEq)]
pub struct QueueSettings {
    /// `DYN_ROUTER_QUEUE_THRESHOLD`: saturated above `threshold × max_num_batched_tokens`.
    pub threshold: f64,
    pub policy: QueuePolicy,
    /// Never empty: without a policy file, one class named `default`.
    pub classes: Vec<ClassSpec>,
    /// Waiting requests at most; one more is rejected.
    pub max_requests: usize,
    /// Bytes of waiting requests (bodies and token ids) at most.
    pub max_bytes: u64,
    /// `DYN_ROUTER_OVERLAP_REFRESH_AFTER_SECS`: `wspt` keys older than this are recomputed
    /// from the current cache state before a dispatch; `None` = never.
    pub refresh_after: Option<Duration>,
    /// `DYN_EPP_QUEUE_LATE_BINDING`: a request waits for the worker it would pick (`router::Bind`).
    pub late_binding: bool,
}

impl QueueSettings {
    pub fn single_class(threshold: f64, policy: QueuePolicy) -> Self {
        QueueSettings {
            threshold,
            policy,
            classes: vec![ClassSpec { name: "default".into(), quantum: 1, policy: None }],
            max_requests: 10_000,
            max_bytes: 1 << 30,
            refresh_after: Some(Duration::from_secs(10)),
            late_binding: false,
        }
    }
}

/// Late binding stops a dispatch round's scoring (a decision per waiting request, in the
/// queue's order) once this many requests have stayed, so a round holds the router lock for a
/// bounded time however deep the queue; the requests further back go in their turn. (In the
/// simulator at most 10 waited at once at 1–2× the conversation trace's rate: docs/queue.md.)
pub const LATE_BINDING_SCAN: usize = 32;

/// One late-binding dispatch round: the requests whose pick did not take them (not scored
/// again this round), up to [`LATE_BINDING_SCAN`].
#[derive(Debug, Default)]
pub struct LateRound {
    stayed: FxHashSet<Ticket>,
}

impl LateRound {
    /// Whether the request `ticket` is scored: it has not stayed this round, and the round's
    /// bound is not reached.
    pub fn scores(&self, ticket: Ticket) -> bool {
        self.stayed.len() < LATE_BINDING_SCAN && !self.stayed.contains(&ticket)
    }

    pub fn stay(&mut self, ticket: Ticket) {
        self.stayed.insert(ticket);
    }
}

/// Dynamo's queue gate for one rank: saturated when its prefill tokens exceed `threshold ×
/// max_num_batched_tokens`. A rank whose batch budget is unknown never saturates.
pub fn saturated(threshold: f64, cap: &Capacity, load: &RankLoad) -> bool {
    cap.max_num_batched_tokens.is_some_and(|b| load.active_prefill_tokens as f64 > threshold * b as f64)
}

/// Workers claimed by blocked requests ahead in the queue during one dispatch round: a
/// request further back may not take them (the head-of-line rule).
#[derive(Debug, Default)]
pub struct Claims {
    workers: FxHashSet<WorkerId>,
}

impl Claims {
    /// A blocked request claims every worker it may use.
    pub fn claim(&mut self, workers: impl IntoIterator<Item = WorkerId>) {
        self.workers.extend(workers);
    }

    pub fn holds(&self, w: WorkerId) -> bool {
        !self.workers.is_empty() && self.workers.contains(&w)
    }

    pub fn len(&self) -> usize {
        self.workers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.workers.is_empty()
    }
}

/// A request's priority as Dynamo reads it.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Priority {
    /// `strict_priority`: higher always goes first.
    pub strict: u32,
    /// `priority_jump` (seconds ahead in `fcfs`, weight in `wspt`), ≥ 0.
    pub jump: f64,
}

impl Priority {
    /// `priority_jump = max(priority, 0)`, else `latency_sensitivity` (contracts §3.4).
    pub fn new(priority: Option<i32>, strict: Option<u32>, latency_sensitivity: Option<f64>) -> Self {
        let jump = match (priority, latency_sensitivity) {
            (Some(p), _) => p.max(0) as f64,
            (None, Some(l)) if l.is_finite() => l.max(0.0),
            _ => 0.0,
        };
        Priority { strict: strict.unwrap_or(0), jump }
    }
}

/// What the queue needs to know about a request.
#[derive(Clone, Debug, Default)]
pub struct Arrival {
    /// `x-dynamo-meta-policy-class`; unknown or absent = the first class.
    pub class: Option<String>,
    /// Tenant; absent = the anonymous flow.
    pub flow: Option<String>,
    pub priority: Priority,
    /// What the request holds while waiting (body and token ids).
    pub bytes: u64,
    /// Prompt tokens not cached on the best worker (`wspt`).
    pub uncached_tokens: u64,
}

/// Why a request was not queued.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Full {
    Requests,
    Bytes,
}

impl Full {
    pub fn as_str(self) -> &'static str {
        match self {
            Full::Requests => "queue_requests_limit",
            Full::Bytes => "queue_bytes_limit",
        }
    }
}

pub type Ticket = u64;

/// A policy key, highest first (`total_cmp`: keys are finite).
#[derive(Clone, Copy, Debug, PartialEq)]
struct Key(f64);

impl Eq for Key {}
impl Ord for Key {
    fn cmp(&self, o: &Self) -> Ordering {
        self.0.total_cmp(&o.0)
    }
}
impl PartialOrd for Key {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}

/// Best first: highest key, then earliest ticket.
type Slot = (Reverse<Key>, Ticket);

#[derive(Default)]
struct Flow {
    waiting: BTreeSet<Slot>,
    /// Dispatches since the flow joined its band (fair share across flows).
    served: u64,
}

#[derive(Default)]
struct Band {
    flows: HashMap<Option<String>, Flow>,
}

struct Class {
    name: String,
    quantum: u32,
    policy: QueuePolicy,
    /// Dispatches left in this class's current turn.
    deficit: u32,
    bands: BTreeMap<Reverse<u32>, Band>,
}

struct Entry<T> {
    item: T,
    class: usize,
    flow: Option<String>,
    priority: Priority,
    slot: Slot,
    bytes: u64,
    arrived: Instant,
    keyed: Instant,
}

/// A request that left the queue for a worker.
#[derive(Debug)]
pub struct Dispatched<T> {
    pub item: T,
    pub class: String,
    pub priority: Priority,
    pub waited: Duration,
}

/// The waiting requests, generic over what the edge keeps for each (its reply channel).
pub struct Queue<T> {
    settings: QueueSettings,
    classes: Vec<Class>,
    entries: HashMap<Ticket, Entry<T>>,
    next_ticket: Ticket,
    /// The class whose turn it is.
    cursor: usize,
    bytes: u64,
    /// Arrival offsets (`fcfs`) count from here.
    epoch: Option<Instant>,
}

impl<T> Queue<T> {
    pub fn new(settings: QueueSettings) -> Self {
        let classes = settings
            .classes
            .iter()
            .map(|c| Class { name: c.name.clone(), quantum: c.quantum, policy: c.policy.unwrap_or(settings.policy), deficit: 0, bands: BTreeMap::new() })
            .collect();
        Queue { settings, classes, entries: HashMap::new(), next_ticket: 0, cursor: 0, bytes: 0, epoch: None }
    }

    pub fn settings(&self) -> &QueueSettings {
        &self.settings
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    fn key(&self, policy: QueuePolicy, p: Priority, uncached: u64, arrived: Instant) -> Key {
        Key(match policy {
            QueuePolicy::Fcfs => p.jump - self.epoch.map_or(0.0, |e| arrived.saturating_duration_since(e).as_secs_f64()),
            QueuePolicy::Wspt => (1.0 + p.jump) / uncached.max(1) as f64,
        })
    }

    /// Queues a request, or hands it back when a limit would be passed.
    pub fn push(&mut self, item: T, a: Arrival, now: Instant) -> Result<Ticket, (T, Full)> {
        if self.entries.len() >= self.settings.max_requests {
            return Err((item, Full::Requests));
        }
        if self.bytes + a.bytes > self.settings.max_bytes {
            return Err((item, Full::Bytes));
        }
        self.epoch.get_or_insert(now);
        let class = a.class.as_deref().and_then(|n| self.classes.iter().position(|c| c.name == n)).unwrap_or(0);
        let ticket = self.next_ticket;
        self.next_ticket += 1;
        let slot = (Reverse(self.key(self.classes[class].policy, a.priority, a.uncached_tokens, now)), ticket);
        let c = &mut self.classes[class];
        let band = c.bands.entry(Reverse(a.priority.strict)).or_default();
        if !band.flows.contains_key(&a.flow) {
            // A flow joining competes from the least-served flow's count: no banked credit.
            let served = band.flows.values().map(|f| f.served).min().unwrap_or(0);
            band.flows.insert(a.flow.clone(), Flow { waiting: BTreeSet::new(), served });
        }
        band.flows.get_mut(&a.flow).expect("inserted").waiting.insert(slot);
        self.bytes += a.bytes;
        self.entries.insert(ticket, Entry { item, class, flow: a.flow, priority: a.priority, slot, bytes: a.bytes, arrived: now, keyed: now });
        Ok(ticket)
    }

    /// Takes a request out of the queue (its client left, or it waited too long).
    pub fn remove(&mut self, ticket: Ticket) -> Option<T> {
        let e = self.entries.remove(&ticket)?;
        self.unlink(&e);
        Some(e.item)
    }

    fn unlink(&mut self, e: &Entry<T>) {
        self.bytes -= e.bytes;
        let c = &mut self.classes[e.class];
        let band_key = Reverse(e.priority.strict);
        let band = c.bands.get_mut(&band_key).expect("entry's band");
        let flow = band.flows.get_mut(&e.flow).expect("entry's flow");
        flow.waiting.remove(&e.slot);
        if flow.waiting.is_empty() {
            band.flows.remove(&e.flow);
            if band.flows.is_empty() {
                c.bands.remove(&band_key);
            }
        }
    }

    /// Takes the request that goes next, advancing the round robins.
    pub fn pop(&mut self, now: Instant) -> Option<Dispatched<T>> {
        self.pop_first(now, |_, _| true)
    }

    /// Takes the first request in the queue's order that `runs` accepts (the edge routes it
    /// there, or finds it blocked and claims its workers), advancing the round robins as if
    /// the rejected ones were not there: classes whose requests all stay lose the rest of
    /// their turn, and within a band the flow served least that has an accepted request goes
    /// (ties by the flows' heads). `runs` sees each request (with its ticket) at most once,
    /// in that order.
    pub fn pop_first(&mut self, now: Instant, mut runs: impl FnMut(Ticket, &T) -> bool) -> Option<Dispatched<T>> {
        let n = self.classes.len();
        let mut found = None;
        'classes: for ci in (0..n).map(|i| (self.cursor + i) % n) {
            for band in self.classes[ci].bands.values() {
                let mut flows: Vec<(&Option<String>, &Flow)> = band.flows.iter().collect();
                if flows.len() > 1 {
                    flows.sort_by(|a, b| a.1.served.cmp(&b.1.served).then(a.1.waiting.first().cmp(&b.1.waiting.first())));
                }
                for (flow, f) in flows {
                    if let Some(&(_, t)) = f.waiting.iter().find(|(_, t)| runs(*t, &self.entries[t].item)) {
                        found = Some((ci, flow.clone(), t));
                        break 'classes;
                    }
                }
            }
        }
        let (ci, flow, ticket) = found?;
        // Classes passed over (empty, or nothing in them could run) lose their turn's remainder.
        let mut i = self.cursor;
        while i != ci {
            self.classes[i].deficit = 0;
            i = (i + 1) % n;
        }
        self.cursor = ci;
        let c = &mut self.classes[ci];
        if c.deficit == 0 {
            c.deficit = c.quantum;
        }
        c.deficit -= 1;
        if c.deficit == 0 {
            self.cursor = (ci + 1) % n;
        }
        let e = self.entries.remove(&ticket).expect("queued entry");
        let band = self.classes[ci].bands.get_mut(&Reverse(e.priority.strict)).expect("entry's band");
        band.flows.get_mut(&flow).expect("entry's flow").served += 1;
        self.unlink(&e);
        Some(Dispatched { class: self.classes[ci].name.clone(), priority: e.priority, waited: now.saturating_duration_since(e.arrived), item: e.item })
    }

    /// What the edge keeps for a waiting request (to refresh its cache lookup).
    pub fn item_mut(&mut self, ticket: Ticket) -> Option<&mut T> {
        self.entries.get_mut(&ticket).map(|e| &mut e.item)
    }

    /// `wspt` entries keyed longer ago than `refresh_after`, for the edge to rekey.
    pub fn stale(&self, now: Instant) -> Vec<Ticket> {
        let Some(after) = self.settings.refresh_after else { return Vec::new() };
        self.entries
            .iter()
            .filter(|(_, e)| self.classes[e.class].policy == QueuePolicy::Wspt && now.saturating_duration_since(e.keyed) >= after)
            .map(|(t, _)| *t)
            .collect()
    }

    /// Recomputes a `wspt` key from the prompt's current uncached tokens.
    pub fn rekey(&mut self, ticket: Ticket, uncached_tokens: u64, now: Instant) {
        let Some(e) = self.entries.get(&ticket) else { return };
        let key = self.key(self.classes[e.class].policy, e.priority, uncached_tokens, e.arrived);
        let (class, strict, flow, old) = (e.class, e.priority.strict, e.flow.clone(), e.slot);
        let slot = (Reverse(key), ticket);
        let f = self.classes[class].bands.get_mut(&Reverse(strict)).and_then(|b| b.flows.get_mut(&flow)).expect("entry's flow");
        f.waiting.remove(&old);
        f.waiting.insert(slot);
        let e = self.entries.get_mut(&ticket).expect("checked");
        e.slot = slot;
        e.keyed = now;
    }

    /// Waiting requests per (class, strict priority), for the depth gauge.
    pub fn depths(&self) -> Vec<(&str, u32, usize)> {
        self.classes
            .iter()
            .flat_map(|c| c.bands.iter().map(move |(Reverse(p), b)| (c.name.as_str(), *p, b.flows.values().map(|f| f.waiting.len()).sum())))
            .collect()
    }

    /// Every class name (so gauges of emptied classes read 0).
    pub fn class_names(&self) -> impl Iterator<Item = &str> {
        self.classes.iter().map(|c| c.name.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(policy: QueuePolicy) -> QueueSettings {
        QueueSettings::single_class(0.0, policy)
    }

    /// An `fcfs` queue with the classes of this policy file.
    fn with_classes<T>(yaml: &str) -> Queue<T> {
        Queue::new(QueueSettings { classes: parse_policy_config(yaml).unwrap(), ..settings(QueuePolicy::Fcfs) })
    }

    fn arrival(strict: u32, jump: f64) -> Arrival {
        Arrival { priority: Priority { strict, jump }, bytes: 10, ..Default::default() }
    }

    fn drain<T: Copy + PartialEq + std::fmt::Debug>(q: &mut Queue<T>, now: Instant) -> Vec<T> {
        std::iter::from_fn(|| q.pop(now).map(|d| d.item)).collect()
    }

    #[test]
    fn fcfs_orders_by_strict_priority_then_jump_minus_arrival() {
        let t0 = Instant::now();
        let mut q = Queue::new(settings(QueuePolicy::Fcfs));
        let s = Duration::from_secs(1);
        q.push('a', arrival(0, 0.0), t0).unwrap();
        // Arrives 2 s later with a 5 s jump: key 3 > a's 0.
        q.push('b', arrival(0, 5.0), t0 + 2 * s).unwrap();
        // Arrives 3 s later with a 1 s jump: key −2.
        q.push('c', arrival(0, 1.0), t0 + 3 * s).unwrap();
        // Strict priority beats every key.
        q.push('d', arrival(1, 0.0), t0 + 9 * s).unwrap();
        q.push('e', arrival(0, 0.0), t0 + 3 * s).unwrap();
        assert_eq!(drain(&mut q, t0), vec!['d', 'b', 'a', 'c', 'e']);
        assert!(q.is_empty() && q.bytes() == 0);
    }

    #[test]
    fn wspt_prefers_short_uncached_prompts_weighted_by_jump() {
        let t0 = Instant::now();
        let mut q = Queue::new(settings(QueuePolicy::Wspt));
        let push = |q: &mut Queue<char>, c, jump, uncached| q.push(c, Arrival { uncached_tokens: uncached, ..arrival(0, jump) }, t0).unwrap();
        push(&mut q, 'a', 0.0, 1000); // 1/1000
        push(&mut q, 'b', 0.0, 100); // 1/100
        push(&mut q, 'c', 9.0, 1000); // 10/1000 = 1/100, later ticket
        push(&mut q, 'd', 0.0, 0); // 1/1
        assert_eq!(drain(&mut q, t0), vec!['d', 'b', 'c', 'a']);
    }

    #[test]
    fn a_burst_from_one_tenant_does_not_starve_another() {
        let t0 = Instant::now();
        let mut q = Queue::new(settings(QueuePolicy::Fcfs));
        let tenant = |name: &str| Some(name.to_string());
        for i in 0..30 {
            q.push(('a', i), Arrival { flow: tenant("a"), ..arrival(0, 0.0) }, t0).unwrap();
        }
        for i in 0..3 {
            q.push(('b', i), Arrival { flow: tenant("b"), ..arrival(0, 0.0) }, t0 + Duration::from_secs(1)).unwrap();
        }
        let order: Vec<char> = drain(&mut q, t0).into_iter().map(|(t, _)| t).collect();
        // b's three requests go within the first six dispatches, not after a's thirty.
        assert_eq!(order[..6].iter().filter(|&&t| t == 'b').count(), 3, "{order:?}");
        // A flow that joins late does not bank credit: a returning tenant takes turns, no more.
        let mut q = Queue::new(settings(QueuePolicy::Fcfs));
        for i in 0..10 {
            q.push(('a', i), Arrival { flow: tenant("a"), ..arrival(0, 0.0) }, t0).unwrap();
        }
        for _ in 0..6 {
            q.pop(t0);
        }
        for i in 0..4 {
            q.push(('b', i), Arrival { flow: tenant("b"), ..arrival(0, 0.0) }, t0).unwrap();
        }
        let order: Vec<char> = drain(&mut q, t0).into_iter().map(|(t, _)| t).collect();
        assert_eq!(order, vec!['a', 'b', 'a', 'b', 'a', 'b', 'a', 'b']);
        // Strict priority still outranks fairness.
        let mut q = Queue::new(settings(QueuePolicy::Fcfs));
        q.push('x', Arrival { flow: tenant("a"), ..arrival(0, 0.0) }, t0).unwrap();
        q.push('y', Arrival { flow: tenant("a"), ..arrival(2, 0.0) }, t0).unwrap();
        q.push('z', Arrival { flow: tenant("b"), ..arrival(1, 0.0) }, t0).unwrap();
        assert_eq!(drain(&mut q, t0), vec!['y', 'z', 'x']);
    }

    /// One dispatch round over workers 1..=3 as the server runs it: a request runs on the
    /// first worker it may use that is neither full nor claimed (taking it), else it claims
    /// every worker it may use. Returns (request, worker) in dispatch order.
    fn round(q: &mut Queue<(char, Vec<u64>)>, full: &mut Vec<u64>, now: Instant) -> Vec<(char, u64)> {
        let mut claims = Claims::default();
        let mut ran = Vec::new();
        while let Some(d) = q.pop_first(now, |_, (name, may)| match may.iter().find(|w| !full.contains(w) && !claims.holds(WorkerId(**w))) {
            Some(&w) => {
                full.push(w);
                ran.push((*name, w));
                true
            }
            None => {
                claims.claim(may.iter().map(|&w| WorkerId(w)));
                false
            }
        }) {
            assert_eq!(d.item.0, ran.last().unwrap().0, "the accepted request is the one taken");
        }
        ran
    }

    #[test]
    fn a_blocked_head_holds_only_the_requests_that_need_its_workers() {
        let t0 = Instant::now();
        let ms = Duration::from_millis(1);
        let mut q = Queue::new(settings(QueuePolicy::Fcfs));
        q.push(('a', vec![1, 2]), arrival(1, 0.0), t0).unwrap();
        q.push(('b', vec![1]), arrival(0, 0.0), t0).unwrap();
        q.push(('c', vec![2, 3]), arrival(0, 0.0), t0 + ms).unwrap();
        q.push(('d', vec![3]), arrival(0, 0.0), t0 + 2 * ms).unwrap();
        q.push(('e', vec![3]), arrival(0, 0.0), t0 + 3 * ms).unwrap();
        // 1 and 2 are full: a (the head) and b wait; c runs, but on 3 — 2 is a's —; d and e,
        // needing 3, then wait behind c.
        let mut full = vec![1, 2];
        assert_eq!(round(&mut q, &mut full, t0), vec![('c', 3)]);
        // 1 frees: a, ahead, takes it, though b was waiting for that very worker.
        full.retain(|&w| w != 1);
        assert_eq!(round(&mut q, &mut full, t0), vec![('a', 1)]);
        // 1 and 3 free: b and d (in order), not e.
        full.retain(|&w| w == 2);
        assert_eq!(round(&mut q, &mut full, t0), vec![('b', 1), ('d', 3)]);
        full.clear();
        assert_eq!(round(&mut q, &mut full, t0), vec![('e', 3)]);
        assert!(q.is_empty());
    }

    #[test]
    fn a_class_whose_requests_cannot_run_does_not_hold_the_others() {
        let t0 = Instant::now();
        let mut q = with_classes("- name: gold\n  quantum: 2\n- name: bronze\n");
        for (name, class, may) in [('g', "gold", 1), ('G', "gold", 1), ('b', "bronze", 2), ('B', "bronze", 3)] {
            q.push((name, vec![may]), Arrival { class: Some(class.into()), ..arrival(0, 0.0) }, t0).unwrap();
        }
        // gold's turn, but worker 1 is full: bronze's requests go meanwhile.
        let mut full = vec![1];
        assert_eq!(round(&mut q, &mut full, t0), vec![('b', 2), ('B', 3)]);
        full.clear();
        assert_eq!(round(&mut q, &mut full, t0), vec![('g', 1)]);
        full.clear();
        assert_eq!(round(&mut q, &mut full, t0), vec![('G', 1)]);
    }

    #[test]
    fn classes_share_dispatches_by_quantum() {
        let t0 = Instant::now();
        let mut q = with_classes("classes:\n  - name: batch\n  - name: interactive\n    quantum: 3\n");
        for i in 0..10 {
            q.push(('b', i), Arrival { class: Some("batch".into()), ..arrival(0, 0.0) }, t0).unwrap();
            q.push(('i', i), Arrival { class: Some("interactive".into()), ..arrival(0, 0.0) }, t0).unwrap();
        }
        // Unknown class → the first.
        q.push(('b', 99), Arrival { class: Some("nope".into()), ..arrival(0, 0.0) }, t0).unwrap();
        let order: String = drain(&mut q, t0).into_iter().map(|(c, _)| c).collect();
        assert_eq!(order, "biiibiiibiiibibbbbbbb");
    }

    #[test]
    fn limits_refuse_and_removal_frees() {
        let t0 = Instant::now();
        let mut s = settings(QueuePolicy::Fcfs);
        s.max_requests = 2;
        s.max_bytes = 25;
        let mut q = Queue::new(s);
        let a = q.push(1, arrival(0, 0.0), t0).unwrap();
        q.push(2, arrival(0, 0.0), t0).unwrap();
        assert_eq!(q.push(3, arrival(0, 0.0), t0).unwrap_err(), (3, Full::Requests));
        assert_eq!(q.remove(a), Some(1));
        assert_eq!(q.remove(a), None);
        assert_eq!(q.push(4, Arrival { bytes: 16, ..arrival(0, 0.0) }, t0).unwrap_err(), (4, Full::Bytes));
        assert_eq!(q.depths(), vec![("default", 0, 1)]);
        assert_eq!(drain(&mut q, t0), vec![2]);
        assert!(q.depths().is_empty());
    }

    #[test]
    fn stale_wspt_keys_are_recomputed() {
        let t0 = Instant::now();
        let mut q = Queue::new(settings(QueuePolicy::Wspt));
        let a = q.push('a', Arrival { uncached_tokens: 10, ..arrival(0, 0.0) }, t0).unwrap();
        q.push('b', Arrival { uncached_tokens: 100, ..arrival(0, 0.0) }, t0).unwrap();
        assert!(q.stale(t0 + Duration::from_secs(9)).is_empty());
        assert_eq!(q.stale(t0 + Duration::from_secs(10)).len(), 2);
        // a's prompt is no longer cached anywhere: it now costs more than b.
        q.rekey(a, 1000, t0 + Duration::from_secs(10));
        assert_eq!(q.stale(t0 + Duration::from_secs(10)).len(), 1);
        assert_eq!(drain(&mut q, t0), vec!['b', 'a']);
    }

    #[test]
    fn priorities_from_hints() {
        assert_eq!(Priority::new(Some(-4), None, Some(3.0)), Priority { strict: 0, jump: 0.0 });
        assert_eq!(Priority::new(None, Some(2), Some(1.5)), Priority { strict: 2, jump: 1.5 });
        assert_eq!(Priority::new(Some(7), None, None), Priority { strict: 0, jump: 7.0 });
    }

    #[test]
    fn saturation_needs_a_known_batch_budget() {
        let load = RankLoad { active_decode_blocks: 0.0, active_prefill_tokens: 100, active_requests: 1, prefilling_requests: 1, long_decodes: 0.0 };
        assert!(!saturated(0.0, &Capacity::default(), &load));
        let cap = Capacity { total_kv_blocks: None, max_num_batched_tokens: Some(50) };
        assert!(saturated(1.5, &cap, &load));
        assert!(!saturated(2.0, &cap, &load));
    }

    #[test]
    fn policy_files_are_checked() {
        assert_eq!(parse_policy_config("- name: a\n  quantum: 2\n  policy: wspt\n").unwrap()[0].policy, Some(QueuePolicy::Wspt));
        for bad in ["[]", "- name: a\n  quantum: 0\n", "- name: a\n- name: a\n", "- name: a\n  weight: 2\n", "nope"] {
            assert!(parse_policy_config(bad).is_err(), "{bad}");
        }
    }
}
