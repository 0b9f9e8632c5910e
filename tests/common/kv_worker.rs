//! A mock engine that caches prompts in blocks and publishes Dynamo-format KV events for what it
//! stores and evicts, on the legacy JetStream stream (`KV_STREAM`), as a prefix-caching engine
//! with Dynamo's publisher does. Used by the full-path bench and the demo.
//!
//! From the body's `nvext.token_data` it publishes `stored` events for the prompt's full blocks
//! not yet cached (parent chain = the previous block's engine hash, here its sequence hash) and
//! `removed` events when its LRU cache of `capacity_blocks` evicts; eviction is leaf-first, as
//! vLLM frees a request's blocks tail-first. It answers OpenAI-shaped JSON (or SSE when the body
//! asks `"stream": true`) `decode` after the request arrived, with `usage.prompt_tokens_details.cached_tokens` = the
//! prompt's prefix it already held.
//!
//! The events are computed while the "generation" runs (its time counts from arrival: an engine
//! hashes its blocks whether or not a router sent the ids, and only requests with `token_data`
//! make this mock do it, so counting it would charge its bookkeeping to the EPP) and published
//! by one task per worker, in event-id order, off the response path: an engine's KV publisher
//! runs beside its scheduler and no response waits for the event stream's acknowledgement.

use std::{
    collections::HashMap,
    net::SocketAddr,
    num::NonZeroUsize,
    sync::{
        atomic::{AtomicU64, Ordering::Relaxed},
        Arc,
    },
    time::Duration,
};

use axum::{
    body::{Body, Bytes},
    extract::State,
    http::HeaderMap,
    response::Response,
};
use dynamo_epp::{
    kv::{
        events::{ExternalBlockHash, KvCacheEvent, KvCacheEventData, KvCacheRemoveData, KvCacheStoreData, KvCacheStoredBlockData, RouterEvent},
        hash::{hash_seed, local_block_hashes, seq_hashes},
    },
    workers::WorkerId,
};
use parking_lot::Mutex;

use super::KV_STREAM;

/// Blocks per published `stored` event (JetStream messages stay well under 1 MB).
const BLOCKS_PER_EVENT: usize = 512;

/// Counters over all the workers that share them.
#[derive(Default)]
pub struct WorkerStats {
    pub requests: AtomicU64,
    pub with_tokens: AtomicU64,
    pub tokens: AtomicU64,
    pub stored_blocks: AtomicU64,
    pub removed_blocks: AtomicU64,
    /// Event messages computed and handed to the publishing tasks (final once a response is sent).
    pub produced: AtomicU64,
    /// Event messages the stream acknowledged.
    pub events: AtomicU64,
    pub publish_failures: AtomicU64,
}

pub struct KvWorkerConfig {
    pub id: WorkerId,
    pub name: String,
    /// Where to listen (port 0 = any).
    pub addr: SocketAddr,
    pub block_size: usize,
    pub capacity_blocks: usize,
    /// How long after the request's arrival the answer starts (the "generation").
    pub decode: Duration,
    /// Keep every request (headers, token_data length, reported cached tokens) for `served`.
    pub record: bool,
}

/// One request as the worker saw and answered it.
#[derive(Clone, Debug)]
pub struct Served {
    pub headers: HashMap<String, String>,
    /// `nvext.token_data` length (0 when absent).
    pub token_data: usize,
    /// Prompt tokens the worker had cached (what it reports in `usage`).
    pub cached_tokens: usize,
}

struct Cache {
    /// Engine block hash (= sequence hash) of every cached block.
    lru: lru::LruCache<u64, ()>,
    next_event: u64,
}

struct KvWorkerState {
    cfg: KvWorkerConfig,
    /// To this worker's publishing task, in event-id order.
    publish: tokio::sync::mpsc::UnboundedSender<Vec<RouterEvent>>,
    cache: Mutex<Cache>,
    stats: Arc<WorkerStats>,
    served: Mutex<Vec<Served>>,
}

#[derive(Clone)]
pub struct KvWorker {
    pub addr: SocketAddr,
    state: Arc<KvWorkerState>,
}

#[derive(serde::Deserialize)]
struct WorkerBody {
    nvext: Option<NvExt>,
    #[serde(default)]
    stream: bool,
}

#[derive(serde::Deserialize)]
struct NvExt {
    #[serde(default)]
    token_data: Vec<u32>,
}

impl KvWorker {
    pub async fn start(cfg: KvWorkerConfig, js: async_nats::jetstream::Context, stats: Arc<WorkerStats>) -> KvWorker {
        let listener = tokio::net::TcpListener::bind(cfg.addr).await.unwrap_or_else(|e| panic!("{} on {}: {e}", cfg.name, cfg.addr));
        let addr = listener.local_addr().unwrap();
        let lru = lru::LruCache::new(NonZeroUsize::new(cfg.capacity_blocks).unwrap());
        let (publish, events) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(publish_events(js, events, stats.clone()));
        let state = Arc::new(KvWorkerState { cfg, publish, cache: Mutex::new(Cache { lru, next_event: 0 }), stats, served: Mutex::default() });
        let app = axum::Router::new().fallback(worker_handle).layer(axum::extract::DefaultBodyLimit::max(64 << 20)).with_state(state.clone());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        KvWorker { addr, state }
    }

    pub fn id(&self) -> WorkerId {
        self.state.cfg.id
    }

    pub fn name(&self) -> &str {
        &self.state.cfg.name
    }

    /// Every request so far (with `record`).
    pub fn served(&self) -> Vec<Served> {
        self.state.served.lock().clone()
    }
}

async fn worker_handle(State(st): State<Arc<KvWorkerState>>, headers: HeaderMap, body: Bytes) -> Response {
    let arrived = tokio::time::Instant::now();
    st.stats.requests.fetch_add(1, Relaxed);
    let parsed = serde_json::from_slice::<WorkerBody>(&body).ok();
    let stream = parsed.as_ref().is_some_and(|b| b.stream);
    let tokens = parsed.and_then(|b| b.nvext).map(|n| n.token_data).unwrap_or_default();
    let mut cached = 0;
    if !tokens.is_empty() {
        st.stats.with_tokens.fetch_add(1, Relaxed);
        st.stats.tokens.fetch_add(tokens.len() as u64, Relaxed);
        cached = store_blocks(&st, &tokens);
    }
    if st.cfg.record {
        let headers = headers.iter().map(|(k, v)| (k.to_string(), String::from_utf8_lossy(v.as_bytes()).into_owned())).collect();
        st.served.lock().push(Served { headers, token_data: tokens.len(), cached_tokens: cached });
    }
    tokio::time::sleep_until(arrived + st.cfg.decode).await;
    let name = &st.cfg.name;
    let usage = format!(r#"{{"prompt_tokens":{},"completion_tokens":2,"total_tokens":{},"prompt_tokens_details":{{"cached_tokens":{cached}}}}}"#, tokens.len(), tokens.len() + 2);
    if stream {
        let mut sse = String::new();
        for word in ["o", "k"] {
            sse.push_str(&format!("data: {{\"object\":\"chat.completion.chunk\",\"worker\":\"{name}\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{word}\"}}}}]}}\n\n"));
        }
        sse.push_str(&format!("data: {{\"object\":\"chat.completion.chunk\",\"worker\":\"{name}\",\"choices\":[],\"usage\":{usage}}}\n\ndata: [DONE]\n\n"));
        return Response::builder().header("content-type", "text/event-stream").body(Body::from(sse)).unwrap();
    }
    let answer = format!(
        r#"{{"object":"chat.completion","worker":"{name}","choices":[{{"index":0,"message":{{"role":"assistant","content":"ok"}},"finish_reason":"stop"}}],"usage":{usage}}}"#
    );
    Response::builder().header("content-type", "application/json").body(answer.into()).unwrap()
}

/// What a prefix-caching engine reports after prefill: the new full blocks, then evictions,
/// handed to the publishing task. Returns the prompt tokens that were already cached (a prompt
/// ending on a block boundary recomputes its last block, as engines always compute at least
/// one token).
fn store_blocks(st: &KvWorkerState, tokens: &[u32]) -> usize {
    let bs = st.cfg.block_size;
    let local = local_block_hashes(tokens, bs, hash_seed(None, None));
    let seq: Vec<u64> = seq_hashes(&local).into_iter().map(|s| s.0).collect();
    // One lock over cache update, event ids and the hand-off keeps event ids in order.
    let mut c = st.cache.lock();
    let hit = seq.iter().take_while(|h| c.lru.contains(*h)).count();
    let cached = (hit * bs).min((tokens.len() - 1) / bs * bs);
    let mut events = Vec::new();
    for start in (hit..seq.len()).step_by(BLOCKS_PER_EVENT) {
        let end = (start + BLOCKS_PER_EVENT).min(seq.len());
        let blocks = (start..end)
            .map(|b| KvCacheStoredBlockData { block_hash: ExternalBlockHash(seq[b]), tokens_hash: local[b], mm_extra_info: None })
            .collect();
        let parent_hash = start.checked_sub(1).map(|p| ExternalBlockHash(seq[p]));
        events.push(KvCacheEventData::Stored(KvCacheStoreData { parent_hash, start_position: None, blocks }));
        st.stats.stored_blocks.fetch_add((end - start) as u64, Relaxed);
    }
    // Touch leaf first, root last: the root ends most recently used, so leaves go first.
    let mut evicted = Vec::new();
    for &h in seq.iter().rev() {
        if let Some((k, ())) = c.lru.push(h, ()) {
            if k != h {
                evicted.push(ExternalBlockHash(k));
            }
        }
    }
    if !evicted.is_empty() {
        st.stats.removed_blocks.fetch_add(evicted.len() as u64, Relaxed);
        events.push(KvCacheEventData::Removed(KvCacheRemoveData { block_hashes: evicted }));
    }
    let events: Vec<RouterEvent> = events
        .into_iter()
        .map(|data| {
            let event = KvCacheEvent { event_id: c.next_event, data, dp_rank: 0 };
            c.next_event += 1;
            RouterEvent { worker_id: st.cfg.id, storage_tier: Default::default(), residency_domain: None, event }
        })
        .collect();
    if !events.is_empty() {
        st.stats.produced.fetch_add(events.len() as u64, Relaxed);
        // The task lives as long as the runtime; a send after it ends has no one to tell.
        let _ = st.publish.send(events);
    }
    cached
}

/// One worker's KV publisher: its events in order, each batch's acknowledgements awaited
/// together.
async fn publish_events(js: async_nats::jetstream::Context, mut batches: tokio::sync::mpsc::UnboundedReceiver<Vec<RouterEvent>>, stats: Arc<WorkerStats>) {
    let subject = format!("{KV_STREAM}.kv-events");
    while let Some(batch) = batches.recv().await {
        let mut acks = Vec::new();
        for ev in batch {
            match js.publish(subject.clone(), serde_json::to_vec(&ev).unwrap().into()).await {
                Ok(ack) => acks.push(ack),
                Err(_) => {
                    stats.publish_failures.fetch_add(1, Relaxed);
                }
            }
        }
        for a in acks {
            let counter = if a.await.is_ok() { &stats.events } else { &stats.publish_failures };
            counter.fetch_add(1, Relaxed);
        }
    }
}
