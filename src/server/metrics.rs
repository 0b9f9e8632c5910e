//! Prometheus metrics: what operators watch, and what the tests read back.


use std::sync::atomic::AtomicU64;

use crate::sched::active::RankLoad;
use prometheus_client::{
    encoding::{text::encode, EncodeLabelSet},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: &'static str,
}

/// The encoder start-up chose (`DYN_TOKENIZER`), what was asked for, and why.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TokenizerLabel {
    pub backend: &'static str,
    pub requested: &'static str,
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RankLabel {
    pub worker: String,
    pub dp_rank: u32,
}

pub struct Metrics {
    registry: Registry,
    /// Requests by how they ended at the picker: routed, passthrough, or an error code.
    pub requests: Family<OutcomeLabel, Counter>,
    /// Time from the body's end of stream to the routing headers being queued.
    pub decision_seconds: Histogram,
    /// Requests decided together by each decision window (`DYN_EPP_DECISION_WINDOW_MS`).
    pub decision_group_size: Histogram,
    /// Time to check, render and tokenize one body (the work itself, not the wait for a slot).
    pub tokenize_seconds: Histogram,
    /// ext_proc streams open right now.
    pub inflight_streams: Gauge,
    /// Requests booked on a worker and not yet finished.
    pub active_requests: Gauge,
    /// Workers in the current fleet.
    pub workers: Gauge,
    /// KV events applied to the index.
    pub kv_events_applied: Counter,
    /// KV events (or whole messages) not applied, by reason; never retried.
    pub kv_events_rejected: Family<ReasonLabel, Counter>,
    /// KV events or messages known lost (gaps in event ids or transport sequences).
    pub kv_events_lost: Counter,
    /// Blocks in the KV index.
    pub kv_blocks: Gauge,
    /// Heap bytes of the KV index, set at scrape.
    pub kv_index_bytes: Gauge,
    /// From a KV event's publication (the transport's or engine's timestamp) to its application.
    pub kv_event_lag_seconds: Histogram,
    /// Bytes charged to the segment token cache (bounded by DYN_EPP_TOKEN_CACHE_BYTES), set at scrape.
    pub token_cache_bytes: Gauge,
    /// 1 for the tokenizer backend in use (an info metric: the labels carry the value).
    pub tokenizer_backend: Family<TokenizerLabel, Gauge>,
    /// Active requests per worker rank as routing sees them (ours and the peers'), set at scrape.
    pub worker_active_requests: Family<RankLabel, Gauge>,
    /// Active KV blocks per worker rank (decode load), set at scrape.
    pub worker_active_blocks: Family<RankLabel, Gauge<f64, AtomicU64>>,
    /// Prompt tokens still to prefill per worker rank, set at scrape.
    pub worker_active_prefill_tokens: Family<RankLabel, Gauge>,
    /// Replica sync: our booking changes sent to the peers.
    pub replica_events_published: Counter,
    /// Replica sync: peers' booking changes applied to our view.
    pub replica_events_applied: Counter,
    /// Replica sync: changes not sent or not applied, by reason.
    pub replica_events_dropped: Family<ReasonLabel, Counter>,
    /// Replica sync: peer EPPs heard from recently (those sending heartbeats).
    pub replica_peers: Gauge,
    /// Prompt tokens each decision expected the chosen worker to have cached.
    pub predicted_cached_tokens: Histogram,
    /// Prompt tokens the engine reported served from cache (`usage.prompt_tokens_details`).
    pub actual_cached_tokens: Histogram,
    /// Summed over responses that report cached tokens: predicted and actual, so
    /// `rate(actual) / rate(predicted)` is the prediction's accuracy.
    pub cached_tokens_compared: Family<SourceLabel, Counter>,
    /// Connections open on the ext_proc port, handshaking ones included (≤ 1,024).
    pub connections: Gauge,
    /// Connections closed before their TLS handshake and HTTP/2 preface finished, by reason.
    pub handshake_failures: Family<ReasonLabel, Counter>,
    /// Changed certificate files (`DYN_EPP_CERT_PATH`) by outcome: `loaded` or `rejected`.
    pub certificate_reloads: Family<OutcomeLabel, Counter>,
    /// Predicted ÷ actual time to first token per prefilling worker rank (1 = exact).
    pub ttft_prediction_ratio: Family<RankLabel, Histogram, fn() -> Histogram>,
    /// The router queue (`DYN_ROUTER_QUEUE_THRESHOLD`).
    pub queue: QueueMetrics,
}

/// Predicted ÷ actual: 1/16 .. 16 in steps of √2.
fn ratio_histogram() -> Histogram {
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(1.0 / 16.0, std::f64::consts::SQRT_2, 17))
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabel {
    pub source: &'static str,
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("dynamo_epp");
        let requests = Family::<OutcomeLabel, Counter>::default();
        // 10 µs .. ~80 ms: a decision is expected in the tens of microseconds.
        let decision_seconds = Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(1e-5, 2.0, 14));
        // 10 µs .. ~5 s: a short completion to a 400 KB chat near the tokenization deadline.
        let tokenize_seconds = Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(1e-5, 2.0, 20));
        // 1 .. 64 requests.
        let decision_group_size = Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(1.0, 2.0, 7));
        let inflight_streams = Gauge::default();
        let active_requests = Gauge::default();
        let workers = Gauge::default();
        let kv_events_applied = Counter::default();
        let kv_events_rejected = Family::<ReasonLabel, Counter>::default();
        let kv_events_lost = Counter::default();
        let kv_blocks = Gauge::default();
        let kv_index_bytes = Gauge::default();
        // 100 µs .. ~100 s: loopback delivery is sub-millisecond; a backlog after an outage
        // drains in seconds.
        let kv_event_lag_seconds = Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(1e-4, 4.0, 11));
        let token_cache_bytes = Gauge::default();
        let tokenizer_backend = Family::<TokenizerLabel, Gauge>::default();
        // 0, then 16 .. ~1 M tokens.
        let tokens = || Histogram::new(std::iter::once(0.0).chain(prometheus_client::metrics::histogram::exponential_buckets(16.0, 4.0, 9)));
        let predicted_cached_tokens = tokens();
        let actual_cached_tokens = tokens();
        let cached_tokens_compared = Family::<SourceLabel, Counter>::default();
        let worker_active_requests = Family::<RankLabel, Gauge>::default();
        let worker_active_blocks = Family::<RankLabel, Gauge<f64, AtomicU64>>::default();
        let worker_active_prefill_tokens = Family::<RankLabel, Gauge>::default();
        let replica_events_published = Counter::default();
        let replica_events_applied = Counter::default();
        let replica_events_dropped = Family::<ReasonLabel, Counter>::default();
        let replica_peers = Gauge::default();
        let connections = Gauge::default();
        let handshake_failures = Family::<ReasonLabel, Counter>::default();
        let certificate_reloads = Family::<OutcomeLabel, Counter>::default();
        let ttft_prediction_ratio = Family::<RankLabel, Histogram, fn() -> Histogram>::new_with_constructor(ratio_histogram as fn() -> Histogram);
        registry.register("requests", "Requests by outcome at the picker", requests.clone());
        registry.register("decision_seconds", "Time to pick a worker once the body is complete", decision_seconds.clone());
        registry.register("tokenize_seconds", "Time to check, render and tokenize one request body", tokenize_seconds.clone());
        registry.register("decision_group_size", "Requests decided together by a decision window", decision_group_size.clone());
        registry.register("inflight_streams", "Open ext_proc streams", inflight_streams.clone());
        registry.register("active_requests", "Requests booked on a worker and not yet finished", active_requests.clone());
        registry.register("workers", "Workers known in the fleet", workers.clone());
        registry.register("kv_events_applied", "KV events applied to the index", kv_events_applied.clone());
        registry.register("kv_events_rejected", "KV events or messages not applied, by reason", kv_events_rejected.clone());
        registry.register("kv_events_lost", "KV events or messages lost in transit (id or sequence gaps)", kv_events_lost.clone());
        registry.register("kv_blocks", "Blocks in the KV index", kv_blocks.clone());
        registry.register("kv_index_bytes", "Heap bytes of the KV index", kv_index_bytes.clone());
        registry.register("kv_event_lag_seconds", "Time from a KV event's publication to its application (publisher clock)", kv_event_lag_seconds.clone());
        registry.register("token_cache_bytes", "Bytes charged to the segment token cache", token_cache_bytes.clone());
        registry.register("tokenizer_backend", "Tokenizer backend in use (DYN_TOKENIZER), what was requested and why", tokenizer_backend.clone());
        registry.register("predicted_cached_tokens", "Prompt tokens each decision expected cached on the chosen worker", predicted_cached_tokens.clone());
        registry.register("actual_cached_tokens", "Prompt tokens the engine reported served from its cache", actual_cached_tokens.clone());
        registry.register(
            "cached_tokens_compared",
            "Cached prompt tokens, predicted and actual, over responses that report them",
            cached_tokens_compared.clone(),
        );
        registry.register("worker_active_blocks", "Active KV blocks per worker rank (decode load), this replica's and its peers'", worker_active_blocks.clone());
        registry.register(
            "worker_active_prefill_tokens",
            "Prompt tokens still to prefill per worker rank, this replica's and its peers'",
            worker_active_prefill_tokens.clone(),
        );
        registry.register(
            "worker_active_requests",
            "Active requests per worker rank, this replica's and its peers'",
            worker_active_requests.clone(),
        );
        registry.register("replica_events_published", "Booking changes published to peer replicas", replica_events_published.clone());
        registry.register("replica_events_applied", "Peer replicas' booking changes applied", replica_events_applied.clone());
        registry.register("replica_events_dropped", "Booking changes not published or not applied, by reason", replica_events_dropped.clone());
        registry.register("replica_peers", "Peer replicas heard from within DYN_EPP_REPLICA_TIMEOUT_SECS", replica_peers.clone());
        registry.register("connections", "Connections open on the ext_proc port, handshaking ones included", connections.clone());
        registry.register(
            "handshake_failures",
            "ext_proc connections closed before the TLS handshake and HTTP/2 preface finished, by reason (timeout, tls, preface)",
            handshake_failures.clone(),
        );
        registry.register("certificate_reloads", "Changed certificate files by outcome (loaded, rejected)", certificate_reloads.clone());
        registry.register(
            "ttft_prediction_ratio",
            "Predicted over actual time to first token per prefilling worker rank (the latency model's error)",
            ttft_prediction_ratio.clone(),
        );
        let queue = QueueMetrics::register(&mut registry);
        Metrics {
            queue,
            registry,
            requests,
            decision_seconds,
            decision_group_size,
            tokenize_seconds,
            inflight_streams,
            active_requests,
            workers,
            kv_events_applied,
            kv_events_rejected,
            kv_events_lost,
            kv_blocks,
            kv_index_bytes,
            kv_event_lag_seconds,
            token_cache_bytes,
            tokenizer_backend,
            predicted_cached_tokens,
            actual_cached_tokens,
            cached_tokens_compared,
            worker_active_requests,
            worker_active_blocks,
            worker_active_prefill_tokens,
            replica_events_published,
            replica_events_applied,
            replica_events_dropped,
            replica_peers,
            connections,
            handshake_failures,
            certificate_reloads,
            ttft_prediction_ratio,
        }
    }

    /// A first chunk arrived: how far the dispatch-time TTFT prediction was off.
    pub fn ttft_predicted(&self, worker: RankLabel, predicted_ms: f64, actual_ms: f64) {
        if actual_ms > 0.0 && predicted_ms.is_finite() {
            self.ttft_prediction_ratio.get_or_create(&worker).observe(predicted_ms / actual_ms);
        }
    }

    pub fn set_tokenizer(&self, s: &crate::request::tokenize::Selection) {
        let label = TokenizerLabel { backend: s.backend.name(), requested: s.requested.name(), reason: s.reason.clone() };
        self.tokenizer_backend.get_or_create(&label).set(1);
    }

    pub fn replica_dropped(&self, reason: &'static str, n: u64) {
        self.replica_events_dropped.get_or_create(&ReasonLabel { reason }).inc_by(n);
    }

    /// Replaces the per-rank active-request gauges (departed workers disappear).
    pub fn set_worker_loads(&self, loads: impl IntoIterator<Item = (RankLabel, RankLoad)>) {
        self.worker_active_requests.clear();
        self.worker_active_blocks.clear();
        self.worker_active_prefill_tokens.clear();
        for (label, l) in loads {
            self.worker_active_requests.get_or_create(&label).set(l.active_requests as i64);
            self.worker_active_blocks.get_or_create(&label).set(l.active_decode_blocks);
            self.worker_active_prefill_tokens.get_or_create(&label).set(l.active_prefill_tokens as i64);
        }
    }

    /// A response reported its cached prompt tokens: record them beside the prediction.
    pub fn cache_hit(&self, predicted: u64, actual: u64) {
        self.actual_cached_tokens.observe(actual as f64);
        self.cached_tokens_compared.get_or_create(&SourceLabel { source: "predicted" }).inc_by(predicted);
        self.cached_tokens_compared.get_or_create(&SourceLabel { source: "actual" }).inc_by(actual);
    }

    pub fn kv_rejected(&self, reason: &'static str) {
        self.kv_events_rejected.get_or_create(&ReasonLabel { reason }).inc();
    }

    pub fn outcome(&self, outcome: &'static str) {
        self.requests.get_or_create(&OutcomeLabel { outcome }).inc();
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String");
        out
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct QueueLabel {
    pub class: String,
    pub priority: u32,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClassLabel {
    pub class: String,
}

/// The router queue's metrics.
pub struct QueueMetrics {
    /// Waiting requests per class and strict priority, set when the queue changes.
    pub depth: Family<QueueLabel, Gauge>,
    /// Time from entering the queue to dispatch, per class.
    pub wait_seconds: Family<ClassLabel, Histogram, fn() -> Histogram>,
    /// Requests that left the queue for a worker, per class.
    pub dispatched: Family<ClassLabel, Counter>,
    /// Requests taken out of the queue before dispatch: `timeout` (DYN_EPP_QUEUE_MAX_WAIT_SECS)
    /// or `disconnected` (the client or gateway left).
    pub evicted: Family<ReasonLabel, Counter>,
    /// Requests refused at the queue's door: `queue_requests_limit`, `queue_bytes_limit`.
    pub rejected: Family<ReasonLabel, Counter>,
    /// Late binding: arrivals sent past those waiting because their prompt joined a prefill pass.
    pub joined: Counter,
}

/// 1 ms .. ~260 s.
fn wait_histogram() -> Histogram {
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(1e-3, 2.0, 19))
}

impl QueueMetrics {
    fn register(registry: &mut Registry) -> Self {
        let m = QueueMetrics {
            depth: Family::default(),
            wait_seconds: Family::new_with_constructor(wait_histogram as fn() -> Histogram),
            dispatched: Family::default(),
            evicted: Family::default(),
            rejected: Family::default(),
            joined: Counter::default(),
        };
        registry.register("queue_depth", "Requests waiting in the router queue, per class and strict priority", m.depth.clone());
        registry.register("queue_wait_seconds", "Time requests waited in the router queue before dispatch, per class", m.wait_seconds.clone());
        registry.register("queue_dispatched", "Requests dispatched from the router queue, per class", m.dispatched.clone());
        registry.register("queue_joined", "Late binding: arrivals routed past waiting requests because their prompt joined a prefill pass", m.joined.clone());
        registry.register("queue_evicted", "Requests taken out of the router queue before dispatch, by reason", m.evicted.clone());
        registry.register("queue_rejected", "Requests refused because the router queue was full, by reason", m.rejected.clone());
        m
    }

    /// Replaces the depth gauges with the queue's current state (every class reads, 0 if empty).
    pub fn set_depths<'a>(&self, classes: impl Iterator<Item = &'a str>, depths: &[(&str, u32, usize)]) {
        self.depth.clear();
        for c in classes {
            self.depth.get_or_create(&QueueLabel { class: c.to_string(), priority: 0 }).set(0);
        }
        for (c, p, n) in depths {
            self.depth.get_or_create(&QueueLabel { class: c.to_string(), priority: *p }).set(*n as i64);
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
