//! Full-path load bench (issue 7): real Envoy + the release EPP (real Qwen3 tokenizer, KV events
//! on) + mock workers that publish KV events to a real nats-server (JetStream) the way an engine
//! does, driven open-loop by a Mooncake trace's arrival times.
//!
//! Paths, one Envoy each with the same config, all started before the first request:
//! - **baseline**: no ext_proc; the client names the worker (round-robin).
//! - **null**: the ext_proc filter points at a do-nothing ext_proc server in this process, on a
//!   runtime of its own (`in_process::NullExtProc`): it answers the headers once the body has
//!   ended, names the worker round-robin, and sends the body back in the EPP's chunks with
//!   `nvext.token_data` of about the EPP's length spliced in (the client tells it the prompt's
//!   token count in a header; every id the same, so the workers find those blocks cached and
//!   publish little). Its added latency is the floor of what Envoy, gRPC and carrying the ids
//!   cost with no EPP work.
//! - **epp**: the ext_proc filter points at the EPP.
//!
//! `FULL_PATH_PASSES` (default 3, a multiple of 3) passes over the schedule's first
//! `FULL_PATH_SECS` (default 60), each at the trace's rate; in pass k request i goes to path
//! (i + k) mod 3. Interleaved, not one path after another: minutes apart, every process's CPU
//! per request drifted 2× on an idle machine, so drift decided the comparison. Every three
//! passes each request goes every path once, so all paths' p50/p99 are over the same requests,
//! and request i's latencies pair up (paired differences). EPP CPU (utime+stime from /proc),
//! each Envoy's and the null server's threads' CPU, and the EPP's RSS (every second) are taken
//! over the passes; each Envoy's flow-control and ext_proc counters after them.
//! Then **long**: ~100k-token multi-turn prompts alone through the EPP, one at a time, for their
//! CPU per request: first sends of fresh conversations (cold) and resends with one new turn
//! (warm).
//!
//! Prompts. Every trace hash id (512 tokens) expands into 512 words drawn by a generator seeded
//! with the id, from Qwen3 vocabulary entries that are a space plus 3–9 lowercase letters and
//! encode alone to exactly that one token; Qwen3's pre-tokenizer splits text into such words, so
//! a block is exactly 512 tokens (checked at start) and equal ids give equal text. Hash ids are
//! grouped 8 to a message (4,096 tokens, roles alternating), so requests sharing a prefix of ids
//! share whole messages: the chat template's token prefix and the EPP's per-message segment cache
//! both see the sharing. A share of the trace's rows (`--long-share`, default 0.1) is replaced by
//! one of `--long-convs` ~100k-token conversations (24 messages of 4,096 tokens), resent each
//! time with a new 1,024-token user turn.
//!
//! Workers (`tests/common/kv_worker.rs`, shared with the demo) answer JSON a fixed decode delay
//! after arrival and, from the body's `nvext.token_data`, publish `stored` events for the prompt's full
//! 16-token blocks not yet cached and `removed` events when their LRU cache of
//! `FULL_PATH_WORKER_BLOCKS` blocks evicts.
//!
//! Run (needs scripts/setup.sh): `cargo bench --bench full_path` (3 × 60 s of passes);
//! `FULL_PATH_SECS=600 nice -n 5 cargo bench --bench full_path` is the 10-minute window
//! (30 minutes of passes). Options after `--`: `--trace PATH`
//! (default data/traces/mooncake_conversation.jsonl, or `$TRACES_DIR`), `--speedup X` (1), `--max-requests N`,
//! `--long-share F`, `--long-convs N` (4), `--workers N` (4). Env: `FULL_PATH_DECODE_MS` (20),
//! `FULL_PATH_WORKER_BLOCKS` (32768), `FULL_PATH_EPP_ENV=K=V,K=V` (extra EPP environment, e.g.
//! `MALLOC_ARENA_MAX=2`). Writes `target/full_path.json`.

#[path = "../tests/common/mod.rs"]
mod common;

use std::{
    path::PathBuf,
    sync::{
        atomic::Ordering::Relaxed,
        Arc,
    },
    time::{Duration, Instant},
};

use common::{
    in_process,
    kv_worker::{KvWorker, KvWorkerConfig, WorkerStats},
    *,
};
use dynamo_epp::{
    sim::trace::{self, TRACE_BLOCK},
    workers::WorkerId,
};
use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_server::ExternalProcessor;
use rand::{rngs::SmallRng, Rng, SeedableRng};
use serde_json::json;

const BLOCK_SIZE: usize = 16;
/// Trace hash ids per chat message.
const IDS_PER_MESSAGE: usize = 8;
/// A long conversation's history: 24 messages of 8 ids = 98,304 tokens, + a 2-id new turn.
const LONG_HISTORY_IDS: usize = 24 * IDS_PER_MESSAGE;
const LONG_TURN_IDS: usize = 2;
/// Long conversations' ids live far above the trace's (< 1e6).
const LONG_ID_BASE: u64 = 1 << 40;

// ---------------------------------------------------------------- options

struct Opts {
    trace: PathBuf,
    speedup: f64,
    max_requests: usize,
    long_share: f64,
    long_convs: u64,
    workers: usize,
    secs: f64,
    /// A multiple of 3: each request goes every path once per three passes.
    passes: usize,
    decode: Duration,
    worker_blocks: usize,
    epp_env: Vec<(String, String)>,
}

fn env_or<T: std::str::FromStr>(k: &str, d: T) -> T {
    std::env::var(k).ok().and_then(|v| v.parse().ok()).unwrap_or(d)
}

impl Opts {
    fn parse() -> Opts {
        let secs: f64 = env_or("FULL_PATH_SECS", 60.0);
        let mut o = Opts {
            trace: trace::traces_dir().join("mooncake_conversation.jsonl"),
            speedup: 1.0,
            max_requests: usize::MAX,
            long_share: 0.1,
            long_convs: 4,
            workers: 4,
            secs,
            passes: env_or("FULL_PATH_PASSES", 3),
            decode: Duration::from_millis(env_or("FULL_PATH_DECODE_MS", 20)),
            worker_blocks: env_or("FULL_PATH_WORKER_BLOCKS", 32768),
            epp_env: std::env::var("FULL_PATH_EPP_ENV")
                .unwrap_or_default()
                .split(',')
                .filter_map(|kv| kv.split_once('=').map(|(k, v)| (k.to_string(), v.to_string())))
                .collect(),
        };
        let mut args = std::env::args().skip(1);
        while let Some(a) = args.next() {
            let mut val = || args.next().unwrap_or_else(|| panic!("{a} needs a value"));
            match a.as_str() {
                "--bench" => {}
                "--trace" => o.trace = val().into(),
                "--speedup" => o.speedup = val().parse().expect("--speedup"),
                "--max-requests" => o.max_requests = val().parse().expect("--max-requests"),
                "--long-share" => o.long_share = val().parse().expect("--long-share"),
                "--long-convs" => o.long_convs = val().parse().expect("--long-convs"),
                "--workers" => o.workers = val().parse().expect("--workers"),
                other => panic!("unknown argument {other}"),
            }
        }
        assert!(o.passes > 0 && o.passes.is_multiple_of(3), "FULL_PATH_PASSES must be a multiple of 3");
        o
    }
}

// ---------------------------------------------------------------- prompts

/// Words that are exactly one Qwen3 token each, with their leading space.
struct Words(Vec<String>);

impl Words {
    fn from_tokenizer(tok: &tokenizers::Tokenizer) -> Words {
        let mut cands: Vec<(u32, String)> = tok
            .get_vocab(false)
            .into_iter()
            .filter_map(|(t, id)| {
                let w = t.strip_prefix('Ġ')?;
                ((3..=9).contains(&w.len()) && w.bytes().all(|b| b.is_ascii_lowercase())).then(|| (id, format!(" {w}")))
            })
            .collect();
        // Lowest ids first: the most frequent words of the tokenizer's corpus.
        cands.sort();
        let words: Vec<String> = cands
            .into_iter()
            .filter(|(id, w)| tok.encode_fast(w.as_str(), false).unwrap().get_ids() == [*id])
            .map(|(_, w)| w)
            .take(4096)
            .collect();
        assert!(words.len() >= 1024, "only {} one-token words", words.len());
        Words(words)
    }

    /// Appends the first `n` words of hash id `id`'s block.
    fn push_block(&self, id: u64, n: usize, out: &mut String) {
        let mut rng = SmallRng::seed_from_u64(id ^ 0x6675_6C6C_7061_7468);
        for _ in 0..n {
            out.push_str(&self.0[rng.random_range(0..self.0.len())]);
        }
    }
}

/// A request of the schedule: the trace row's ids (or a long conversation's), its arrival.
#[derive(Clone)]
struct Planned {
    at: Duration,
    ids: Arc<Vec<u64>>,
    input_length: usize,
    long: bool,
}

impl Planned {
    /// About the token count of the prompt the EPP renders: the text's, plus Qwen3's chat
    /// template (`<|im_start|>role\n` … `<|im_end|>\n` per message, the generation prompt).
    fn prompt_tokens(&self) -> usize {
        self.input_length + 5 * self.ids.len().div_ceil(IDS_PER_MESSAGE) + 3
    }

    /// The chat body: ids grouped into messages, the last id cut at `input_length`.
    fn body(&self, words: &Words) -> String {
        let mut messages = Vec::new();
        for (m, group) in self.ids.chunks(IDS_PER_MESSAGE).enumerate() {
            let mut text = String::with_capacity(group.len() * TRACE_BLOCK * 8);
            for (j, &id) in group.iter().enumerate() {
                let pos = m * IDS_PER_MESSAGE + j;
                let n = (self.input_length - pos * TRACE_BLOCK).min(TRACE_BLOCK);
                words.push_block(id, n, &mut text);
            }
            let role = if m % 2 == 0 { "user" } else { "assistant" };
            messages.push(json!({"role": role, "content": text}));
        }
        json!({"model": "qwen3", "messages": messages, "max_tokens": 16}).to_string()
    }
}

/// Conversation `conv`, resent the `k`-th time: its fixed history plus a new turn.
fn long_request(conv: u64, k: u64, at: Duration) -> Planned {
    let base = LONG_ID_BASE + conv * 1_000_000;
    let mut ids: Vec<u64> = (0..LONG_HISTORY_IDS as u64).map(|i| base + i).collect();
    ids.extend((0..LONG_TURN_IDS as u64).map(|i| base + 1000 + k * LONG_TURN_IDS as u64 + i));
    Planned { at, input_length: ids.len() * TRACE_BLOCK, ids: Arc::new(ids), long: true }
}

/// The trace's arrivals within `secs`, every `1/long_share`-th row replaced by a long request.
fn schedule(o: &Opts) -> Vec<Planned> {
    let rows = trace::load(&o.trace).unwrap_or_else(|e| panic!("{e}"));
    let every = if o.long_share > 0.0 { (1.0 / o.long_share).round() as usize } else { usize::MAX };
    let mut longs = 0u64;
    let mut out = Vec::new();
    for (i, r) in rows.iter().enumerate().take(o.max_requests) {
        let at = Duration::from_secs_f64(r.timestamp as f64 / 1000.0 / o.speedup);
        if at.as_secs_f64() >= o.secs {
            break;
        }
        if i % every == every - 1 {
            out.push(long_request(longs % o.long_convs, longs / o.long_convs, at));
            longs += 1;
        } else {
            out.push(Planned { at, ids: Arc::new(r.hash_ids.clone()), input_length: r.input_length as usize, long: false });
        }
    }
    out
}

// ---------------------------------------------------------------- /proc

/// CPU seconds (user + system, all threads) a process has used so far.
fn cpu_secs(pid: u32) -> f64 {
    cpu_time(pid).as_secs_f64()
}

/// CPU seconds of `pid`'s live threads — all, or those named `name` — to the nanosecond
/// (`schedstat`): for rates too small for /proc's 10 ms ticks, and for one runtime's threads
/// apart from the rest of their process. Threads that have exited are not in it, so process
/// totals stay with `cpu_secs`.
fn threads_cpu_secs(pid: u32, name: Option<&str>) -> f64 {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).unwrap();
    let ns: u64 = tasks
        .filter_map(|t| {
            let dir = t.ok()?.path();
            if name.is_some_and(|n| std::fs::read_to_string(dir.join("comm")).map_or(true, |c| c.trim_end() != n)) {
                return None;
            }
            std::fs::read_to_string(dir.join("schedstat")).ok()?.split(' ').next()?.parse::<u64>().ok()
        })
        .sum();
    ns as f64 / 1e9
}

/// An Envoy's counters and gauges whose names match `filter` (a regex) and that were ever
/// touched, from its admin `/stats`.
async fn envoy_stats(envoy: &Envoy, filter: &str) -> std::collections::BTreeMap<String, f64> {
    let url = format!("http://127.0.0.1:{}/stats?usedonly&filter={filter}", envoy.admin_port);
    let text = reqwest::get(url).await.unwrap().text().await.unwrap();
    text.lines().filter_map(|l| l.split_once(": ")).filter_map(|(k, v)| Some((k.to_string(), v.trim().parse().ok()?))).collect()
}

/// (VmRSS, RssAnon) in KiB.
fn rss_kib(pid: u32) -> (u64, u64) {
    (status_kib(pid, "VmRSS"), status_kib(pid, "RssAnon"))
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg").unwrap_or_default().split(' ').take(3).collect::<Vec<_>>().join(" ")
}

// ---------------------------------------------------------------- the open-loop driver

#[derive(Clone)]
struct Outcome {
    index: usize,
    path: Path,
    long: bool,
    ok: bool,
    latency: Duration,
    /// How late the request left against its scheduled arrival.
    lag: Duration,
}

/// The ways a request can go, each through an Envoy of its own with the same config.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Path {
    /// No ext_proc filter: the client names the worker itself, round-robin.
    Base,
    /// ext_proc to `NullExtProc`, told each prompt's token count in [`TOKENS_HEADER`].
    Null,
    Epp,
}

/// In pass `k`, request `i` goes to `PATHS[(i + k) % 3]`.
const PATHS: [Path; 3] = [Path::Base, Path::Null, Path::Epp];

impl Path {
    fn name(self) -> &'static str {
        match self {
            Path::Base => "baseline",
            Path::Null => "null",
            Path::Epp => "epp",
        }
    }
}

const TOKENS_HEADER: &str = "x-bench-prompt-tokens";

/// Where each path's Envoy listens, and the workers for the baseline's client-side choice.
struct Targets {
    urls: [String; 3],
    dests: Vec<String>,
}

/// Sends every planned request at its arrival time (not waiting for earlier answers), request
/// `i` along `route(i)`.
async fn replay(client: &reqwest::Client, to: &Targets, plan: &[Planned], words: &Arc<Words>, route: impl Fn(usize) -> Path) -> Vec<Outcome> {
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for (index, p) in plan.iter().enumerate() {
        tokio::time::sleep_until((t0 + p.at).into()).await;
        let path = route(index);
        let url = to.urls[path as usize].clone();
        let (client, words, p) = (client.clone(), words.clone(), p.clone());
        let header = match path {
            Path::Base => Some(("x-gateway-destination-endpoint", to.dests[index % to.dests.len()].clone())),
            Path::Null => Some((TOKENS_HEADER, p.prompt_tokens().to_string())),
            Path::Epp => None,
        };
        tasks.push(tokio::spawn(async move {
            let lag = t0.elapsed().saturating_sub(p.at);
            let body = p.body(&words);
            let t = Instant::now();
            let mut rb = client.post(&url).header("content-type", "application/json").body(body);
            if let Some((k, v)) = header {
                rb = rb.header(k, v);
            }
            let ok = match rb.send().await {
                Ok(r) => r.status() == 200 && r.bytes().await.is_ok(),
                Err(_) => false,
            };
            Outcome { index, path, long: p.long, ok, latency: t.elapsed(), lag }
        }));
    }
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

/// p50 / p99 latency in ms of the successful outcomes that pass `keep`.
fn lat<'a>(outs: impl IntoIterator<Item = &'a Outcome>, keep: impl Fn(&Outcome) -> bool) -> (f64, f64, usize) {
    pcts(outs.into_iter().filter(|o| o.ok && keep(o)).map(|o| o.latency.as_secs_f64() * 1e3).collect())
}

/// p50 / p99 of `v` and its length.
fn pcts(mut v: Vec<f64>) -> (f64, f64, usize) {
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return (f64::NAN, f64::NAN, 0);
    }
    (percentile(&v, 50.0), percentile(&v, 99.0), v.len())
}

/// One Prometheus histogram's observations between two scrapes of the EPP's /metrics.
struct HistogramDelta {
    sum: f64,
    count: f64,
    /// (upper bound s, cumulative count), ascending.
    buckets: Vec<(f64, f64)>,
}

impl HistogramDelta {
    fn between(before: &str, after: &str, name: &str) -> HistogramDelta {
        let value = |text: &str, key: &str| metric_value(text, key).unwrap_or(0.0);
        let les = after.lines().filter_map(|l| l.strip_prefix(&format!("{name}_bucket{{le=\"")).and_then(|r| r.split_once('"')).map(|(le, _)| le.to_string()));
        let buckets = les
            .map(|le| {
                let key = format!("{name}_bucket{{le=\"{le}\"}}");
                (le.parse::<f64>().unwrap_or(f64::INFINITY), value(after, &key) - value(before, &key))
            })
            .collect();
        let delta = |suffix: &str| value(after, &format!("{name}_{suffix}")) - value(before, &format!("{name}_{suffix}"));
        HistogramDelta { sum: delta("sum"), count: delta("count"), buckets }
    }

    fn mean_ms(&self) -> f64 {
        1e3 * self.sum / self.count
    }

    /// The upper bound of the bucket holding the median.
    fn p50_bound_ms(&self) -> f64 {
        1e3 * self.buckets.iter().find(|(_, n)| *n >= self.count / 2.0).map_or(f64::NAN, |b| b.0)
    }
}

/// Least-squares slope of (seconds, MiB), in MiB per minute.
fn slope_mib_per_min(pts: &[(f64, f64)]) -> f64 {
    let n = pts.len() as f64;
    if n < 2.0 {
        return f64::NAN;
    }
    let (mx, my) = (pts.iter().map(|p| p.0).sum::<f64>() / n, pts.iter().map(|p| p.1).sum::<f64>() / n);
    let sxy: f64 = pts.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    let sxx: f64 = pts.iter().map(|p| (p.0 - mx).powi(2)).sum();
    sxy / sxx * 60.0
}

/// What fills the EPP's memory at one moment of the epp phase.
struct Part {
    t: f64,
    rss_mib: f64,
    anon_mib: f64,
    index_blocks: f64,
    token_cache_mib: f64,
}

// ---------------------------------------------------------------- main

/// The null server's threads, whose CPU is counted apart from the rest of the bench process.
const NULL_THREADS: &str = "null-extproc";

/// Serves `svc` (as `in_process::serve` does) on a runtime of its own with two threads, as the
/// EPP's process has, so it does not share the generator's and workers' threads.
fn serve_apart<S: ExternalProcessor>(svc: S) -> std::net::SocketAddr {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new().name(NULL_THREADS.into()).spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).thread_name(NULL_THREADS).enable_all().build().unwrap();
        rt.block_on(async move {
            tx.send(in_process::serve(svc).await).unwrap();
            std::future::pending::<()>().await
        })
    })
    .unwrap();
    rx.recv().unwrap()
}

fn main() {
    let o = Opts::parse();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(run(o));
}

async fn run(o: Opts) {
    let model = tokenizer_fixtures().join("qwen3");
    let tok = tokenizers::Tokenizer::from_file(model.join("tokenizer.json")).unwrap();
    let words = Arc::new(Words::from_tokenizer(&tok));
    // A block is exactly 512 tokens, and two blocks exactly 1,024 (words never merge).
    let mut two = String::new();
    words.push_block(7, TRACE_BLOCK, &mut two);
    assert_eq!(tok.encode_fast(two.as_str(), false).unwrap().len(), TRACE_BLOCK);
    words.push_block(8, TRACE_BLOCK, &mut two);
    assert_eq!(tok.encode_fast(two.as_str(), false).unwrap().len(), 2 * TRACE_BLOCK);
    drop(tok);

    let plan = schedule(&o);
    let planned_tokens: usize = plan.iter().map(|p| p.input_length).sum();
    println!(
        "schedule: {} requests in {:.0} s ({} long), mean {:.0} prompt tokens; {} words of one token each; load average {}",
        plan.len(),
        o.secs,
        plan.iter().filter(|p| p.long).count(),
        planned_tokens as f64 / plan.len().max(1) as f64,
        words.0.len(),
        loadavg()
    );

    let nats = NatsServer::start().await;
    let js = kv_event_publisher(&nats.url()).await;
    let stats = Arc::new(WorkerStats::default());
    let mut workers = Vec::new();
    for i in 0..o.workers {
        let cfg = KvWorkerConfig {
            id: WorkerId(1001 + i as u64),
            name: format!("w{i}"),
            addr: "127.0.0.1:0".parse().unwrap(),
            block_size: BLOCK_SIZE,
            capacity_blocks: o.worker_blocks,
            decode: o.decode,
            record: false,
        };
        workers.push(KvWorker::start(cfg, js.clone(), stats.clone()).await);
    }
    let entries: Vec<_> = workers.iter().map(|w| (w.name(), w.addr, Some(w.id().0))).collect();
    let yaml = format!("block_size: {BLOCK_SIZE}\n{}", workers_yaml(&entries));
    let mut env: Vec<(String, String)> = vec![
        ("RUST_LOG".into(), "error".into()),
        ("DYN_MODEL_PATH".into(), model.display().to_string()),
        ("DYN_EVENT_PLANE".into(), "jetstream".into()),
        ("NATS_SERVER".into(), nats.url()),
        ("DYN_EPP_KV_CONSUMER_NAME".into(), "full-path".into()),
    ];
    env.extend(o.epp_env.iter().cloned());
    let epp = Epp::start(&yaml, EppOptions { env, ..Default::default() }).await;
    let dests: Vec<String> = workers.iter().map(|w| w.addr.to_string()).collect();
    let null_port = serve_apart(in_process::NullExtProc::new(dests.clone(), Some(TOKENS_HEADER))).port();
    // One Envoy per path (indexed as `PATHS`), so each one's CPU is its path's.
    let envoys = [
        Envoy::start(None).await,
        Envoy::start(Some(&EppLink { port: null_port, tls: false })).await,
        Envoy::start(Some(&EppLink { port: epp.grpc_port, tls: false })).await,
    ];
    let to = Targets { urls: envoys.each_ref().map(|e| e.url("/v1/chat/completions")), dests };
    let client = reqwest::Client::builder().pool_max_idle_per_host(1024).timeout(Duration::from_secs(120)).build().unwrap();
    let epp_pid = epp.child.id().unwrap();
    let me = std::process::id();
    let envoy_pids = envoys.each_ref().map(|e| e.child.id().unwrap());

    // Warm every path (connections, the EPP's thread pools) with requests outside the schedule.
    let warm: Vec<Planned> = (0..8).map(|i| Planned { at: Duration::ZERO, ids: Arc::new(vec![900_000_000 + i]), input_length: 512, long: false }).collect();
    for path in PATHS {
        replay(&client, &to, &warm, &words, |_| path).await;
    }

    // ---- the interleaved passes, with the EPP's CPU and memory sampled throughout
    let rss_start = rss_kib(epp_pid);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // RSS every second; every 10 s also what the EPP says fills memory (index, token cache).
    let sampler = {
        let (stop, port) = (stop.clone(), epp.metrics_port);
        tokio::spawn(async move {
            let t0 = Instant::now();
            let (mut pts, mut parts) = (Vec::new(), Vec::new());
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            while !stop.load(Relaxed) {
                tick.tick().await;
                let (rss, anon) = rss_kib(epp_pid);
                let t = t0.elapsed().as_secs_f64();
                pts.push((t, rss, anon, cpu_secs(epp_pid)));
                if pts.len() % 10 == 0 {
                    let m = reqwest::get(format!("http://127.0.0.1:{port}/metrics")).await.unwrap().text().await.unwrap();
                    let get = |name: &str| metric_value(&m, name).unwrap_or(f64::NAN);
                    parts.push(Part { t: t.round(), rss_mib: rss as f64 / 1024.0, anon_mib: anon as f64 / 1024.0, index_blocks: get("dynamo_epp_kv_blocks"), token_cache_mib: get("dynamo_epp_token_cache_bytes") / (1 << 20) as f64 });
                }
            }
            (pts, parts)
        })
    };
    // The EPP's idle CPU rate (timers, sweeps), before any scheduled request: the passes also
    // give it the other paths' requests to idle through, and that time is not its requests' cost.
    const IDLE_SECS: f64 = 10.0;
    let idle0 = threads_cpu_secs(epp_pid, None);
    tokio::time::sleep(Duration::from_secs_f64(IDLE_SECS)).await;
    let epp_idle_per_sec = (threads_cpu_secs(epp_pid, None) - idle0) / IDLE_SECS;
    let (t0_with, t0_tokens) = (stats.with_tokens.load(Relaxed), stats.tokens.load(Relaxed));
    let steps0 = epp.metrics().await;
    // CPU seconds so far of [the EPP, the Envoys as `PATHS`, the null server, the whole bench process].
    let cpu_now = || [cpu_secs(epp_pid), cpu_secs(envoy_pids[0]), cpu_secs(envoy_pids[1]), cpu_secs(envoy_pids[2]), threads_cpu_secs(me, Some(NULL_THREADS)), cpu_secs(me)];
    let load_before = loadavg();
    println!(
        "{} passes of {} requests over {:.0} s each, request i of pass k through {} (load average {load_before}) …",
        o.passes,
        plan.len(),
        o.secs,
        PATHS.map(Path::name).join(" / ") + " for (i + k) mod 3"
    );
    let (c0, passes_t0) = (cpu_now(), Instant::now());
    let mut passes: Vec<Vec<Outcome>> = Vec::new();
    for k in 0..o.passes {
        if k > 0 {
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
        passes.push(replay(&client, &to, &plan, &words, |i| PATHS[(i + k) % 3]).await);
    }
    let (c1, passes_secs) = (cpu_now(), passes_t0.elapsed().as_secs_f64());
    let load_after = loadavg();
    stop.store(true, Relaxed);
    let (rss_pts, parts) = sampler.await.unwrap();
    // Where the added latency goes: the EPP's tokenize and its whole routing step (body complete
    // → decision made: prepare, a pool hop, the router lock, the pick).
    let steps1 = epp.metrics().await;
    let (tokenize_ms, decision_ms) = (HistogramDelta::between(&steps0, &steps1, "dynamo_epp_tokenize_seconds"), HistogramDelta::between(&steps0, &steps1, "dynamo_epp_decision_seconds"));
    // With a decision window (`FULL_PATH_EPP_ENV=DYN_EPP_DECISION_WINDOW_MS=…`): its groups.
    let groups = HistogramDelta::between(&steps0, &steps1, "dynamo_epp_decision_group_size");
    let kv_applied = epp.metric("dynamo_epp_kv_events_applied_total").await.unwrap_or(f64::NAN);
    let kv_lost = epp.metric("dynamo_epp_kv_events_lost_total").await.unwrap_or(f64::NAN);
    // Whether Envoy waits on flow control or buffer limits carrying the bodies (cumulative since
    // start: the warm-up's 8 requests per path are in them).
    let mut envoy_counters = Vec::new();
    for e in &envoys {
        envoy_counters.push(envoy_stats(e, "flow_control|watermark|buffer|overflow|ext_proc|http2|rq_too_large|cx_(rx|tx)_bytes_total").await);
    }
    // The workers cannot tell a null request's ids from the EPP's; the null server's are the
    // counts it was told, so the EPP's are the rest.
    let all_outs = || passes.iter().flatten();
    let null_told: Vec<usize> = all_outs().filter(|x| x.path == Path::Null && x.ok).map(|x| plan[x.index].prompt_tokens()).collect();
    let null_tokens = null_told.iter().sum::<usize>() as f64 / null_told.len().max(1) as f64;
    let epp_with_tokens = (stats.with_tokens.load(Relaxed) - t0_with).saturating_sub(null_told.len() as u64);
    let epp_tokens = (stats.tokens.load(Relaxed) - t0_tokens).saturating_sub(null_told.iter().sum::<usize>() as u64) as f64 / epp_with_tokens.max(1) as f64;

    // ---- then ~100k-token conversations alone, one request at a time, through the EPP
    tokio::time::sleep(Duration::from_secs(3)).await;
    let fresh: Vec<u64> = (0..2).map(|c| 10_000 + c).collect();
    let one_by_one = |reqs: Vec<Planned>| {
        let (client, to, words) = (&client, &to, words.clone());
        async move {
            let (c0, t0) = (cpu_secs(epp_pid), Instant::now());
            let mut outs = Vec::new();
            for p in reqs {
                outs.extend(replay(client, to, &[p], &words, |_| Path::Epp).await);
            }
            // Events the workers publish after answering are the request's cost too.
            tokio::time::sleep(Duration::from_secs(1)).await;
            (cpu_secs(epp_pid) - c0, t0.elapsed().as_secs_f64(), outs)
        }
    };
    let (cold_cpu, _, cold) = one_by_one(fresh.iter().map(|&c| long_request(c, 0, Duration::ZERO)).collect()).await;
    let warm_n = 10;
    let (warm_cpu, warm_secs, warm) = one_by_one((1..=warm_n).flat_map(|k| fresh.iter().map(move |&c| long_request(c, k, Duration::ZERO))).collect()).await;
    let rss_end = rss_kib(epp_pid);

    // ---- report
    let by_path = |path: Path| all_outs().filter(move |x| x.path == path);
    let ok = |path: Path| by_path(path).filter(|x| x.ok).count();
    let sent = |path: Path| by_path(path).count();
    // Per path: (p50, p99, long p50, long p99, max send lag), all over the same requests.
    let summary = PATHS.map(|path| {
        let (p50, p99, _) = lat(by_path(path), |_| true);
        let (l50, l99, _) = lat(by_path(path), |x| x.long);
        (p50, p99, l50, l99, by_path(path).map(|x| x.lag.as_secs_f64() * 1e3).fold(0.0, f64::max))
    });
    let [base, null, ours] = summary;
    // Paired: request i's latency along one path minus along another, within a round of three
    // passes (where it went every path once), both answered.
    let mut pairs: [Vec<f64>; 3] = Default::default();
    for round in passes.chunks(3) {
        let mut ms = vec![[f64::NAN; 3]; plan.len()];
        for x in round.iter().flatten().filter(|x| x.ok) {
            ms[x.index][x.path as usize] = x.latency.as_secs_f64() * 1e3;
        }
        for m in &ms {
            let [b, nl, e] = *m;
            for (v, d) in pairs.iter_mut().zip([e - b, e - nl, nl - b]) {
                if !d.is_nan() {
                    v.push(d);
                }
            }
        }
    }
    let [epp_base, epp_null, null_base] = pairs.map(pcts);
    // The p50 per path in each pass: how far the machine drifted while they ran.
    let per_pass: Vec<[f64; 3]> = passes.iter().map(|outs| PATHS.map(|path| lat(outs, |x| x.path == path).0)).collect();
    // Process `p`'s CPU seconds over the passes per request of `n`. Each path's processes also
    // idle through the other paths' requests; the EPP's idle rate is subtracted below (measured
    // to the nanosecond), the others' are too small for /proc's 10 ms ticks.
    let cpu_per = |p: usize, n: usize| (c1[p] - c0[p]) / n.max(1) as f64;
    let epp_cpu = cpu_per(0, sent(Path::Epp));
    let epp_cpu_less_idle = ((c1[0] - c0[0]) - epp_idle_per_sec * passes_secs).max(0.0) / sent(Path::Epp).max(1) as f64;
    let envoy_cpu = PATHS.map(|path| cpu_per(1 + path as usize, sent(path)));
    let null_cpu = cpu_per(4, sent(Path::Null));
    // The bench process less the null server: the generator and the workers, over every request.
    let me_cpu = ((c1[5] - c0[5]) - (c1[4] - c0[4])) / all_outs().count().max(1) as f64;
    let (cl50, _, _) = lat(&cold, |_| true);
    let (wl50, wl99, _) = lat(&warm, |_| true);
    let mib = |k: u64| k as f64 / 1024.0;
    let mut rss_sorted: Vec<f64> = rss_pts.iter().map(|p| mib(p.1)).collect();
    rss_sorted.sort_by(f64::total_cmp);
    let rss_series: Vec<(f64, f64)> = rss_pts.iter().map(|p| (p.0, mib(p.1))).collect();
    let half = rss_series.len() / 2;
    let (slope_all, slope_2nd) = (slope_mib_per_min(&rss_series), slope_mib_per_min(&rss_series[half..]));
    let anon_series: Vec<(f64, f64)> = rss_pts.iter().map(|p| (p.0, mib(p.2))).collect();
    // Idle CPU (timers, metrics) is not the requests' cost.
    let warm_per = (warm_cpu - epp_idle_per_sec * warm_secs).max(0.0) / warm.len() as f64;
    let cold_per = cold_cpu / cold.len() as f64;
    // RSS less the token cache: what the rest of the process holds.
    let rest: Vec<(f64, f64)> = parts.iter().map(|p| (p.t, p.rss_mib - p.token_cache_mib)).collect();
    let slope_rest_2nd = slope_mib_per_min(&rest[rest.len() / 2..]);

    println!("\n== full path: {} workers, trace {} ×{}, long share {}, decode {} ms, {} interleaved passes", o.workers, o.trace.display(), o.speedup, o.long_share, o.decode.as_millis(), o.passes);
    println!("load average: before the passes {load_before}; after {load_after}");
    println!("{:<36} {:>12} {:>12} {:>12}", "", "baseline", "null", "epp");
    let counts = PATHS.map(|p| format!("{} / {}", sent(p), ok(p)));
    println!("{:<36} {:>12} {:>12} {:>12}", "requests sent / ok", counts[0], counts[1], counts[2]);
    for (label, f) in [("latency p50 ms", 0), ("latency p99 ms", 1), ("long prompts p50 ms", 2), ("long prompts p99 ms", 3), ("max send lag ms (open loop)", 4)] {
        let v = summary.map(|s| [s.0, s.1, s.2, s.3, s.4][f]);
        println!("{label:<36} {:>12.1} {:>12.1} {:>12.1}", v[0], v[1], v[2]);
    }
    println!("{:<36} {:>12} {:>+12.1} {:>+12.1}", "added p50 ms (path − baseline)", "", null.0 - base.0, ours.0 - base.0);
    println!("{:<36} {:>12} {:>+12.1} {:>+12.1}", "added p99 ms", "", null.1 - base.1, ours.1 - base.1);
    println!("EPP-added latency: p50 {:+.1} ms, p99 {:+.1} ms", ours.0 - base.0, ours.1 - base.1);
    println!(
        "paired per request (p50 / p99 ms, n): epp − baseline {:+.1} / {:+.1} ({}); epp − null {:+.1} / {:+.1} ({}); null − baseline {:+.1} / {:+.1} ({})",
        epp_base.0, epp_base.1, epp_base.2, epp_null.0, epp_null.1, epp_null.2, null_base.0, null_base.1, null_base.2
    );
    for (k, p) in per_pass.iter().enumerate() {
        println!("pass {k}: p50 ms baseline {:.1}, null {:.1}, epp {:.1}", p[0], p[1], p[2]);
    }
    println!("token_data ids per request: null server {null_tokens:.0} (told), EPP {epp_tokens:.0} (workers' count less the null server's)");
    println!(
        "of which (EPP histograms, ms): tokenize mean {:.2}, p50 ≤ {:.2}; body complete → decision made mean {:.2}, p50 ≤ {:.2}",
        tokenize_ms.mean_ms(),
        tokenize_ms.p50_bound_ms(),
        decision_ms.mean_ms(),
        decision_ms.p50_bound_ms()
    );
    if groups.count > 0.0 {
        let alone = groups.buckets.first().map_or(0.0, |b| b.1);
        println!(
            "decision window: {:.0} groups, mean size {:.2}; {:.0} of {:.0} requests decided beside another",
            groups.count,
            groups.sum / groups.count,
            groups.sum - alone,
            groups.sum
        );
    }
    println!(
        "CPU ms per request on its path (idle time between its requests included): EPP {:.2} (= {:.0} req/s per core); null server {:.2}; Envoy baseline {:.2}, null {:.2}, epp {:.2}; generator+workers {:.2} (every request)",
        epp_cpu * 1e3,
        1.0 / epp_cpu,
        null_cpu * 1e3,
        envoy_cpu[0] * 1e3,
        envoy_cpu[1] * 1e3,
        envoy_cpu[2] * 1e3,
        me_cpu * 1e3
    );
    println!(
        "EPP CPU ms per request less its idle rate ({:.2} ms/s, measured over {IDLE_SECS:.0} s before the passes) × the passes' {passes_secs:.0} s: {:.2} (= {:.0} req/s per core)",
        epp_idle_per_sec * 1e3,
        epp_cpu_less_idle * 1e3,
        1.0 / epp_cpu_less_idle
    );
    for (path, counters) in PATHS.iter().zip(&envoy_counters) {
        let waits: Vec<String> = counters.iter().filter(|(k, v)| **v != 0.0 && (k.contains("flow_control") || k.contains("overflow") || k.contains("too_large"))).map(|(k, v)| format!("{k} {v}")).collect();
        println!("Envoy {} flow control / overflow counters: {}", path.name(), if waits.is_empty() { "none".to_string() } else { waits.join(", ") });
    }
    println!(
        "~100k-token conversations alone: cold first send {:.4} CPU s/req (p50 {:.0} ms); resend with a new turn {:.4} CPU s/req = {:.3} core per req/s (p50 {:.0} / p99 {:.0} ms) — target ≤ 0.05",
        cold_per, cl50, warm_per, warm_per, wl50, wl99
    );
    println!(
        "EPP RSS MiB: idle {:.1}; passes start {:.1} / median {:.1} / max {:.1} / end {:.1}; after long phase {:.1}; slope {:.2} MiB/min (second half {:.2}); RssAnon slope {:.2}",
        mib(rss_start.0),
        rss_series.first().map_or(f64::NAN, |p| p.1),
        percentile(&rss_sorted, 50.0),
        rss_sorted.last().copied().unwrap_or(f64::NAN),
        rss_series.last().map_or(f64::NAN, |p| p.1),
        mib(rss_end.0),
        slope_all,
        slope_2nd,
        slope_mib_per_min(&anon_series)
    );
    println!(
        "workers: {} requests, {} with token_data from the EPP, stored {} / removed {} blocks, {} publish failures; EPP applied {} events, lost {}; the schedule asked {:.0} tokens + template",
        stats.requests.load(Relaxed),
        epp_with_tokens,
        stats.stored_blocks.load(Relaxed),
        stats.removed_blocks.load(Relaxed),
        stats.publish_failures.load(Relaxed),
        kv_applied,
        kv_lost,
        planned_tokens as f64 / plan.len().max(1) as f64,
    );
    println!("RSS less token cache: slope over the second half {slope_rest_2nd:.2} MiB/min");
    println!("{:>6} {:>9} {:>9} {:>14} {:>13}", "s", "RSS MiB", "anon MiB", "token cache MiB", "index blocks");
    let every = (parts.len() / 12).max(1);
    for p in parts.iter().filter(|p| (p.t as usize / 10) % every == 0 || p.t == parts.last().unwrap().t) {
        println!("{:>6.0} {:>9.1} {:>9.1} {:>14.1} {:>13.0}", p.t, p.rss_mib, p.anon_mib, p.token_cache_mib, p.index_blocks);
    }

    // One path's figures, and `extra` (an object) for what only that path has.
    let path_report = |i: usize, extra: serde_json::Value| {
        let path = PATHS[i];
        let (p50, p99, l50, l99, lag) = summary[i];
        let mut r = json!({"sent": sent(path), "ok": ok(path), "p50_ms": p50, "p99_ms": p99, "long_p50_ms": l50, "long_p99_ms": l99, "max_lag_ms": lag,
            "added_p50_ms": p50 - base.0, "added_p99_ms": p99 - base.1, "envoy_cpu_s_per_req": envoy_cpu[i],
            "envoy_stats": envoy_counters[i]});
        r.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        r
    };
    let paired = |(p50, p99, n): (f64, f64, usize)| json!({"p50_ms": p50, "p99_ms": p99, "n": n});
    let report = json!({
        "options": {"trace": o.trace, "speedup": o.speedup, "secs": o.secs, "passes": o.passes, "long_share": o.long_share,
            "long_convs": o.long_convs, "workers": o.workers, "decode_ms": o.decode.as_millis() as u64, "worker_blocks": o.worker_blocks,
            "epp_env": o.epp_env.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>()},
        "load_average": {"before": load_before, "after": load_after},
        "baseline": path_report(0, json!({})),
        "null": path_report(1, json!({"mean_token_data": null_tokens, "null_server_cpu_s_per_req": null_cpu})),
        "epp": path_report(2, json!({"epp_cpu_s_per_req": epp_cpu, "req_per_s_per_core": 1.0 / epp_cpu,
            "epp_idle_cpu_s_per_s": epp_idle_per_sec, "epp_cpu_s_per_req_less_idle": epp_cpu_less_idle,
            "mean_token_data": epp_tokens, "mean_prompt_tokens": planned_tokens as f64 / plan.len().max(1) as f64,
            "kv_events_applied": kv_applied, "kv_events_lost": kv_lost,
            "tokenize_mean_ms": tokenize_ms.mean_ms(), "tokenize_p50_bound_ms": tokenize_ms.p50_bound_ms(),
            "body_to_decision_mean_ms": decision_ms.mean_ms(), "body_to_decision_p50_bound_ms": decision_ms.p50_bound_ms()})),
        "paired": {"epp_minus_baseline": paired(epp_base), "epp_minus_null": paired(epp_null), "null_minus_baseline": paired(null_base)},
        "per_pass_p50_ms": per_pass.iter().map(|p| json!({"baseline": p[0], "null": p[1], "epp": p[2]})).collect::<Vec<_>>(),
        "generator_workers_cpu_s_per_req": me_cpu,
        "long": {"cold_cpu_s_per_req": cold_per, "cold_p50_ms": cl50, "warm_cpu_s_per_req": warm_per, "warm_p50_ms": wl50, "warm_p99_ms": wl99,
            "cold_ok": cold.iter().filter(|x| x.ok).count(), "warm_ok": warm.iter().filter(|x| x.ok).count(), "prompt_tokens": (LONG_HISTORY_IDS + LONG_TURN_IDS) * TRACE_BLOCK},
        "rss": {"idle_mib": mib(rss_start.0), "max_mib": rss_sorted.last(), "median_mib": percentile(&rss_sorted, 50.0), "after_long_mib": mib(rss_end.0),
            "slope_mib_per_min": slope_all, "slope_second_half_mib_per_min": slope_2nd,
            "samples": rss_pts.iter().map(|p| json!([p.0.round(), mib(p.1), mib(p.2), p.3])).collect::<Vec<_>>()},
        "memory_parts": parts.iter().map(|p| json!({"t": p.t, "rss_mib": p.rss_mib, "anon_mib": p.anon_mib, "index_blocks": p.index_blocks, "token_cache_mib": p.token_cache_mib})).collect::<Vec<_>>(),
        "rss_less_token_cache_slope_second_half_mib_per_min": slope_rest_2nd,
        "workers": {"requests": stats.requests.load(Relaxed), "epp_with_token_data": epp_with_tokens,
            "stored_blocks": stats.stored_blocks.load(Relaxed), "removed_blocks": stats.removed_blocks.load(Relaxed),
            "publish_failures": stats.publish_failures.load(Relaxed)},
    });
    let target = std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| repo_root().join("target"));
    let path = target.join("full_path.json");
    std::fs::write(&path, serde_json::to_string_pretty(&report).unwrap()).unwrap();
    println!("wrote {}", path.display());
}
