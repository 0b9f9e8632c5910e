//! Full-path load bench (issue 7): real Envoy + the release EPP (real Qwen3 tokenizer, KV events
//! on) + mock workers that publish KV events to a real nats-server (JetStream) the way an engine
//! does, driven open-loop by a Mooncake trace's arrival times.
//!
//! Phases, one after the other on the same processes (sequential, not interleaved: the two
//! paths would otherwise compete for the same two cores):
//! 1. **baseline**: the schedule's first `FULL_PATH_BASE_SECS` (default min(secs, 120)) through
//!    an Envoy without ext_proc; the client names the worker (round-robin).
//! 2. **null**: the baseline's requests through an Envoy whose ext_proc filter (the same config)
//!    points at a do-nothing ext_proc server in this process, on a runtime of its own
//!    (`in_process::NullExtProc`): it answers the headers once the body has ended, names the
//!    worker round-robin, and sends the body back in the EPP's chunks with `nvext.token_data`
//!    of about the EPP's length spliced in (the client tells it the prompt's token count in a
//!    header; every id the same, so the workers find those blocks cached and publish little).
//!    Null-added latency = this phase's p50/p99 minus the baseline's: the floor of what Envoy,
//!    gRPC and carrying the ids cost with no EPP work. `FULL_PATH_NULL_SECS` (default the
//!    baseline's; 0 skips the phase).
//! 3. **epp**: the schedule's first `FULL_PATH_SECS` (default 60) through an Envoy with the
//!    ext_proc filter. EPP CPU (utime+stime from /proc) and RSS (every second) are taken here.
//!    EPP-added latency = this phase's p50/p99 minus the baseline's over the same requests
//!    (those scheduled within the baseline window).
//! 4. **long**: ~100k-token multi-turn prompts alone, one at a time, for their CPU per request:
//!    first sends of fresh conversations (cold) and resends with one new turn (warm).
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
//! Run (needs scripts/setup.sh): `cargo bench --bench full_path`; `FULL_PATH_SECS=600 nice -n 5
//! cargo bench --bench full_path` is the 10-minute run. Options after `--`: `--trace PATH`
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
    base_secs: f64,
    null_secs: f64,
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
            base_secs: env_or("FULL_PATH_BASE_SECS", secs.min(120.0)),
            null_secs: 0.0,
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
        o.null_secs = env_or("FULL_PATH_NULL_SECS", o.base_secs);
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
    long: bool,
    ok: bool,
    latency: Duration,
    /// How late the request left against its scheduled arrival.
    lag: Duration,
}

/// Which ext_proc server (if any) the Envoy a phase sends to consults.
#[derive(Clone, Copy)]
enum Via<'a> {
    /// None: the client names the worker itself, round-robin over these.
    Direct(&'a [String]),
    Epp,
    /// `NullExtProc`, told each prompt's token count in [`TOKENS_HEADER`].
    Null,
}

const TOKENS_HEADER: &str = "x-bench-prompt-tokens";

/// Sends every planned request at its arrival time (not waiting for earlier answers).
async fn replay(client: &reqwest::Client, url: &str, plan: &[Planned], until: f64, words: &Arc<Words>, via: Via<'_>) -> Vec<Outcome> {
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for (index, p) in plan.iter().enumerate().take_while(|(_, p)| p.at.as_secs_f64() < until) {
        tokio::time::sleep_until((t0 + p.at).into()).await;
        let (client, url, words, p) = (client.clone(), url.to_string(), words.clone(), p.clone());
        let header = match via {
            Via::Direct(d) => Some(("x-gateway-destination-endpoint", d[index % d.len()].clone())),
            Via::Epp => None,
            Via::Null => Some((TOKENS_HEADER, p.prompt_tokens().to_string())),
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
            Outcome { index, long: p.long, ok, latency: t.elapsed(), lag }
        }));
    }
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

/// p50 / p99 latency in ms of the successful outcomes that pass `keep`.
fn lat(outs: &[Outcome], keep: impl Fn(&Outcome) -> bool) -> (f64, f64, usize) {
    let mut v: Vec<f64> = outs.iter().filter(|o| o.ok && keep(o)).map(|o| o.latency.as_secs_f64() * 1e3).collect();
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return (f64::NAN, f64::NAN, 0);
    }
    (percentile(&v, 50.0), percentile(&v, 99.0), v.len())
}

/// Least-squares slope of (seconds, MiB), in MiB per minute.
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

/// Serves `svc` (as `in_process::serve` does) on a runtime of its own with two threads, as the
/// EPP's process has, so it does not share the generator's and workers' threads.
fn serve_apart<S: ExternalProcessor>(svc: S) -> std::net::SocketAddr {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        rt.block_on(async move {
            tx.send(in_process::serve(svc).await).unwrap();
            std::future::pending::<()>().await
        })
    });
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
    let base_n = plan.iter().take_while(|p| p.at.as_secs_f64() < o.base_secs).count();
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
    let with = Envoy::start(Some(&EppLink { port: epp.grpc_port, tls: false })).await;
    let without = Envoy::start(None).await;
    let dests: Vec<String> = workers.iter().map(|w| w.addr.to_string()).collect();
    let null_port = serve_apart(in_process::NullExtProc::new(dests.clone(), Some(TOKENS_HEADER))).port();
    let null = Envoy::start(Some(&EppLink { port: null_port, tls: false })).await;
    let client = reqwest::Client::builder().pool_max_idle_per_host(1024).timeout(Duration::from_secs(120)).build().unwrap();
    let epp_pid = epp.child.id().unwrap();
    let me = std::process::id();
    let (with_pid, without_pid, null_pid) = (with.child.id().unwrap(), without.child.id().unwrap(), null.child.id().unwrap());

    // Warm both paths (connections, the EPP's thread pools) with requests outside the schedule.
    let warm: Vec<Planned> = (0..8).map(|i| Planned { at: Duration::ZERO, ids: Arc::new(vec![900_000_000 + i]), input_length: 512, long: false }).collect();
    replay(&client, &without.url("/v1/chat/completions"), &warm, 1.0, &words, Via::Direct(&dests)).await;
    replay(&client, &null.url("/v1/chat/completions"), &warm, 1.0, &words, Via::Null).await;
    replay(&client, &with.url("/v1/chat/completions"), &warm, 1.0, &words, Via::Epp).await;

    // ---- phase 1: baseline
    let load_before_base = loadavg();
    println!("baseline: {base_n} requests over {:.0} s through Envoy without ext_proc …", o.base_secs);
    let (c0_env, c0_me) = (cpu_secs(without_pid), cpu_secs(me));
    let base = replay(&client, &without.url("/v1/chat/completions"), &plan, o.base_secs, &words, Via::Direct(&dests)).await;
    let base_cpu = (cpu_secs(without_pid) - c0_env, cpu_secs(me) - c0_me);

    // ---- phase 2: through the do-nothing ext_proc server
    let mut null_outs = Vec::new();
    let (mut null_cpu, mut null_tokens) = ((0.0, 0.0), f64::NAN);
    if o.null_secs > 0.0 {
        tokio::time::sleep(Duration::from_secs(2)).await;
        println!("null: requests over {:.0} s through Envoy + a do-nothing ext_proc server (load average {}) …", o.null_secs, loadavg());
        let (t0_with, t0_tokens) = (stats.with_tokens.load(Relaxed), stats.tokens.load(Relaxed));
        let (c0_env, c0_me) = (cpu_secs(null_pid), cpu_secs(me));
        null_outs = replay(&client, &null.url("/v1/chat/completions"), &plan, o.null_secs, &words, Via::Null).await;
        null_cpu = (cpu_secs(null_pid) - c0_env, cpu_secs(me) - c0_me);
        null_tokens = (stats.tokens.load(Relaxed) - t0_tokens) as f64 / (stats.with_tokens.load(Relaxed) - t0_with).max(1) as f64;
    }

    // ---- phase 3: through the EPP, with CPU and memory sampled
    tokio::time::sleep(Duration::from_secs(2)).await;
    let load_before_epp = loadavg();
    println!("epp: {} requests over {:.0} s through Envoy + ext_proc (load average {load_before_epp}) …", plan.len(), o.secs);
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
    let (t0_with, t0_tokens) = (stats.with_tokens.load(Relaxed), stats.tokens.load(Relaxed));
    let steps0 = epp.metrics().await;
    let (c1_epp, c1_env, c1_me) = (cpu_secs(epp_pid), cpu_secs(with_pid), cpu_secs(me));
    let ours = replay(&client, &with.url("/v1/chat/completions"), &plan, o.secs, &words, Via::Epp).await;
    let (epp_cpu, env_cpu, me_cpu) = (cpu_secs(epp_pid) - c1_epp, cpu_secs(with_pid) - c1_env, cpu_secs(me) - c1_me);
    let load_after_epp = loadavg();
    stop.store(true, Relaxed);
    let (rss_pts, parts) = sampler.await.unwrap();
    let epp_with_tokens = stats.with_tokens.load(Relaxed) - t0_with;
    let epp_tokens = (stats.tokens.load(Relaxed) - t0_tokens) as f64 / epp_with_tokens.max(1) as f64;
    // Where the added latency goes: the EPP's tokenize and its whole routing step (body complete
    // → decision made: prepare, a pool hop, the router lock, the pick).
    let steps1 = epp.metrics().await;
    let (tokenize_ms, decision_ms) = (HistogramDelta::between(&steps0, &steps1, "dynamo_epp_tokenize_seconds"), HistogramDelta::between(&steps0, &steps1, "dynamo_epp_decision_seconds"));
    let kv_applied = epp.metric("dynamo_epp_kv_events_applied_total").await.unwrap_or(f64::NAN);
    let kv_lost = epp.metric("dynamo_epp_kv_events_lost_total").await.unwrap_or(f64::NAN);

    // ---- phase 4: ~100k-token conversations alone, one request at a time
    tokio::time::sleep(Duration::from_secs(3)).await;
    let fresh: Vec<u64> = (0..2).map(|c| 10_000 + c).collect();
    let url = with.url("/v1/chat/completions");
    let one_by_one = |reqs: Vec<Planned>| {
        let (client, url, words) = (client.clone(), url.clone(), words.clone());
        async move {
            let (c0, t0) = (cpu_secs(epp_pid), Instant::now());
            let mut outs = Vec::new();
            for p in reqs {
                outs.extend(replay(&client, &url, &[p], 1.0, &words, Via::Epp).await);
            }
            // Events the workers publish after answering are the request's cost too.
            tokio::time::sleep(Duration::from_secs(1)).await;
            (cpu_secs(epp_pid) - c0, t0.elapsed().as_secs_f64(), outs)
        }
    };
    let idle0 = cpu_secs(epp_pid);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle_per_sec = (cpu_secs(epp_pid) - idle0) / 2.0;
    let (cold_cpu, _, cold) = one_by_one(fresh.iter().map(|&c| long_request(c, 0, Duration::ZERO)).collect()).await;
    let warm_n = 10;
    let (warm_cpu, warm_secs, warm) = one_by_one((1..=warm_n).flat_map(|k| fresh.iter().map(move |&c| long_request(c, k, Duration::ZERO))).collect()).await;
    let rss_end = rss_kib(epp_pid);

    // ---- report
    let ok = |v: &[Outcome]| v.iter().filter(|x| x.ok).count();
    let n = ours.len() as f64;
    let cpu_per_req = epp_cpu / n;
    let (b50, b99, _) = lat(&base, |_| true);
    let (m50, m99, _) = lat(&ours, |x| x.index < base_n);
    let (n50, n99, _) = lat(&null_outs, |x| x.index < base_n);
    let (a50, a99, _) = lat(&ours, |_| true);
    let (bl50, bl99, _) = lat(&base, |x| x.long);
    let (ml50, ml99, _) = lat(&ours, |x| x.long && x.index < base_n);
    let (cl50, _, _) = lat(&cold, |_| true);
    let (wl50, wl99, _) = lat(&warm, |_| true);
    let max_lag = |v: &[Outcome]| v.iter().map(|x| x.lag.as_secs_f64() * 1e3).fold(0.0, f64::max);
    let mib = |k: u64| k as f64 / 1024.0;
    let mut rss_sorted: Vec<f64> = rss_pts.iter().map(|p| mib(p.1)).collect();
    rss_sorted.sort_by(f64::total_cmp);
    let rss_series: Vec<(f64, f64)> = rss_pts.iter().map(|p| (p.0, mib(p.1))).collect();
    let half = rss_series.len() / 2;
    let (slope_all, slope_2nd) = (slope_mib_per_min(&rss_series), slope_mib_per_min(&rss_series[half..]));
    let anon_series: Vec<(f64, f64)> = rss_pts.iter().map(|p| (p.0, mib(p.2))).collect();
    // Idle CPU (timers, metrics) is not the requests' cost.
    let warm_per = (warm_cpu - idle_per_sec * warm_secs).max(0.0) / warm.len() as f64;
    let cold_per = cold_cpu / cold.len() as f64;
    // RSS less the token cache: what the rest of the process holds.
    let rest: Vec<(f64, f64)> = parts.iter().map(|p| (p.t, p.rss_mib - p.token_cache_mib)).collect();
    let slope_rest_2nd = slope_mib_per_min(&rest[rest.len() / 2..]);

    println!("\n== full path: {} workers, trace {} ×{}, long share {}, decode {} ms", o.workers, o.trace.display(), o.speedup, o.long_share, o.decode.as_millis());
    println!("load average: before baseline {load_before_base}; before epp phase {load_before_epp}; after {load_after_epp}");
    println!("{:<44} {:>12} {:>12}", "", "baseline", "epp");
    println!("{:<44} {:>12} {:>12}", "requests sent / ok", format!("{} / {}", base.len(), ok(&base)), format!("{} / {}", ours.len(), ok(&ours)));
    println!("{:<44} {:>12.1} {:>12.1}", "latency p50 ms (baseline window)", b50, m50);
    println!("{:<44} {:>12.1} {:>12.1}", "latency p99 ms (baseline window)", b99, m99);
    println!("{:<44} {:>12.1} {:>12.1}", "long prompts p50 ms (baseline window)", bl50, ml50);
    println!("{:<44} {:>12.1} {:>12.1}", "long prompts p99 ms (baseline window)", bl99, ml99);
    println!("{:<44} {:>12} {:>12.1}", "latency p50 / p99 ms (whole epp phase)", "", a50);
    println!("{:<44} {:>12} {:>12.1}", "", "", a99);
    println!("{:<44} {:>12.1} {:>12.1}", "max send lag ms (open loop)", max_lag(&base), max_lag(&ours));
    println!("EPP-added latency: p50 {:+.1} ms, p99 {:+.1} ms", m50 - b50, m99 - b99);
    println!(
        "null ext_proc server: {} / {} ok, p50 {:.1} / p99 {:.1} ms (baseline window) = added p50 {:+.1} ms, p99 {:+.1} ms; {:.0} token_data ids each; CPU s per request Envoy {:.4}, generator+workers+null server {:.4}",
        ok(&null_outs),
        null_outs.len(),
        n50,
        n99,
        n50 - b50,
        n99 - b99,
        null_tokens,
        null_cpu.0 / null_outs.len().max(1) as f64,
        null_cpu.1 / null_outs.len().max(1) as f64
    );
    println!(
        "of which (EPP histograms, ms): tokenize mean {:.2}, p50 ≤ {:.2}; body complete → decision made mean {:.2}, p50 ≤ {:.2}",
        tokenize_ms.mean_ms(),
        tokenize_ms.p50_bound_ms(),
        decision_ms.mean_ms(),
        decision_ms.p50_bound_ms()
    );
    println!(
        "CPU s per request: EPP {:.4} (= {:.0} req/s per core); Envoy {:.4} (alone {:.4}); generator+workers {:.4} (baseline {:.4})",
        cpu_per_req,
        1.0 / cpu_per_req,
        env_cpu / n,
        base_cpu.0 / base.len().max(1) as f64,
        me_cpu / n,
        base_cpu.1 / base.len().max(1) as f64
    );
    println!(
        "~100k-token conversations alone: cold first send {:.4} CPU s/req (p50 {:.0} ms); resend with a new turn {:.4} CPU s/req = {:.3} core per req/s (p50 {:.0} / p99 {:.0} ms) — target ≤ 0.05",
        cold_per, cl50, warm_per, warm_per, wl50, wl99
    );
    println!(
        "EPP RSS MiB: idle {:.1}; epp phase start {:.1} / median {:.1} / max {:.1} / end {:.1}; after long phase {:.1}; slope {:.2} MiB/min (second half {:.2}); RssAnon slope {:.2}",
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
        "workers: {} requests, {} with token_data in the epp phase ({:.0} tokens each; the schedule asked {:.0} + template), stored {} / removed {} blocks, {} publish failures; EPP applied {} events, lost {}",
        stats.requests.load(Relaxed),
        epp_with_tokens,
        epp_tokens,
        planned_tokens as f64 / plan.len().max(1) as f64,
        stats.stored_blocks.load(Relaxed),
        stats.removed_blocks.load(Relaxed),
        stats.publish_failures.load(Relaxed),
        kv_applied,
        kv_lost,
    );
    println!("RSS less token cache: slope over the second half {slope_rest_2nd:.2} MiB/min");
    println!("{:>6} {:>9} {:>9} {:>14} {:>13}", "s", "RSS MiB", "anon MiB", "token cache MiB", "index blocks");
    let every = (parts.len() / 12).max(1);
    for p in parts.iter().filter(|p| (p.t as usize / 10) % every == 0 || p.t == parts.last().unwrap().t) {
        println!("{:>6.0} {:>9.1} {:>9.1} {:>14.1} {:>13.0}", p.t, p.rss_mib, p.anon_mib, p.token_cache_mib, p.index_blocks);
    }

    let report = json!({
        "options": {"trace": o.trace, "speedup": o.speedup, "secs": o.secs, "base_secs": o.base_secs, "long_share": o.long_share,
            "long_convs": o.long_convs, "workers": o.workers, "decode_ms": o.decode.as_millis() as u64, "worker_blocks": o.worker_blocks,
            "null_secs": o.null_secs, "epp_env": o.epp_env.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>()},
        "load_average": {"before_baseline": load_before_base, "before_epp": load_before_epp, "after_epp": load_after_epp},
        "baseline": {"sent": base.len(), "ok": ok(&base), "p50_ms": b50, "p99_ms": b99, "long_p50_ms": bl50, "long_p99_ms": bl99,
            "envoy_cpu_s_per_req": base_cpu.0 / base.len().max(1) as f64, "generator_workers_cpu_s_per_req": base_cpu.1 / base.len().max(1) as f64},
        "null": {"secs": o.null_secs, "sent": null_outs.len(), "ok": ok(&null_outs), "window_p50_ms": n50, "window_p99_ms": n99,
            "added_p50_ms": n50 - b50, "added_p99_ms": n99 - b99, "mean_token_data": null_tokens,
            "envoy_cpu_s_per_req": null_cpu.0 / null_outs.len().max(1) as f64, "generator_workers_null_cpu_s_per_req": null_cpu.1 / null_outs.len().max(1) as f64},
        "epp": {"sent": ours.len(), "ok": ok(&ours), "window_p50_ms": m50, "window_p99_ms": m99, "long_window_p50_ms": ml50, "long_window_p99_ms": ml99,
            "p50_ms": a50, "p99_ms": a99, "added_p50_ms": m50 - b50, "added_p99_ms": m99 - b99,
            "epp_cpu_s_per_req": cpu_per_req, "req_per_s_per_core": 1.0 / cpu_per_req, "envoy_cpu_s_per_req": env_cpu / n,
            "generator_workers_cpu_s_per_req": me_cpu / n, "mean_prompt_tokens": planned_tokens as f64 / plan.len().max(1) as f64,
            "kv_events_applied": kv_applied, "kv_events_lost": kv_lost,
            "tokenize_mean_ms": tokenize_ms.mean_ms(), "tokenize_p50_bound_ms": tokenize_ms.p50_bound_ms(),
            "body_to_decision_mean_ms": decision_ms.mean_ms(), "body_to_decision_p50_bound_ms": decision_ms.p50_bound_ms()},
        "long": {"cold_cpu_s_per_req": cold_per, "cold_p50_ms": cl50, "warm_cpu_s_per_req": warm_per, "warm_p50_ms": wl50, "warm_p99_ms": wl99,
            "cold_ok": ok(&cold), "warm_ok": ok(&warm), "prompt_tokens": (LONG_HISTORY_IDS + LONG_TURN_IDS) * TRACE_BLOCK},
        "rss": {"idle_mib": mib(rss_start.0), "max_mib": rss_sorted.last(), "median_mib": percentile(&rss_sorted, 50.0), "after_long_mib": mib(rss_end.0),
            "slope_mib_per_min": slope_all, "slope_second_half_mib_per_min": slope_2nd,
            "samples": rss_pts.iter().map(|p| json!([p.0.round(), mib(p.1), mib(p.2), p.3])).collect::<Vec<_>>()},
        "memory_parts": parts.iter().map(|p| json!({"t": p.t, "rss_mib": p.rss_mib, "anon_mib": p.anon_mib, "index_blocks": p.index_blocks, "token_cache_mib": p.token_cache_mib})).collect::<Vec<_>>(),
        "rss_less_token_cache_slope_second_half_mib_per_min": slope_rest_2nd,
        "workers": {"requests": stats.requests.load(Relaxed), "epp_phase_with_token_data": epp_with_tokens, "epp_phase_mean_token_data": epp_tokens,
            "stored_blocks": stats.stored_blocks.load(Relaxed), "removed_blocks": stats.removed_blocks.load(Relaxed),
            "publish_failures": stats.publish_failures.load(Relaxed)},
    });
    let target = std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| repo_root().join("target"));
    let path = target.join("full_path.json");
    std::fs::write(&path, serde_json::to_string_pretty(&report).unwrap()).unwrap();
    println!("wrote {}", path.display());
}
