//! dynamo-epp-sim: replays a Mooncake trace against simulated engines and compares routing
//! policies (our router with KV events, approximate mode, baselines, and any extra router
//! configurations) on the same arrivals. Prints a Markdown table; writes JSON and a PNG chart.
//!
//!   dynamo-epp-sim --trace data/traces/mooncake_conversation.jsonl --workers 8

use std::path::PathBuf;

use clap::Parser;
use dynamo_epp::{
    config::Config,
    sched::RoutingPolicy,
    sim::{self, engine::EngineParams, report, NamedPolicy, Policy, SimConfig},
};

#[derive(Parser, Debug)]
#[command(name = "dynamo-epp-sim", about = "Trace-driven routing-quality simulator for dynamo-epp")]
struct Args {
    /// Mooncake-format trace (JSON lines).
    #[arg(long)]
    trace: PathBuf,
    #[arg(long, default_value_t = 8)]
    workers: usize,
    /// Replay only the first N requests.
    #[arg(long)]
    requests: Option<usize>,
    /// Divide arrival times by this (more load).
    #[arg(long, default_value_t = 1.0)]
    speedup: f64,
    /// KV blocks per worker.
    #[arg(long, default_value_t = 16_384)]
    kv_blocks: u32,
    /// Tokens per KV block (also the router's block size).
    #[arg(long, default_value_t = 64)]
    block_tokens: u32,
    /// Token budget of one scheduler pass.
    #[arg(long, default_value_t = 8_192)]
    max_batch_tokens: u32,
    /// Running requests per worker at most.
    #[arg(long, default_value_t = 256)]
    max_running: usize,
    /// Prefill time coefficients a,b,c (ms = a·T² + b·T + c).
    #[arg(long, value_delimiter = ',', num_args = 3, default_values_t = [4.209989e-07, 1.518344e-02, 16.50142])]
    prefill_ms: Vec<f64>,
    /// Decode time coefficients a,b,c (ms = max(1, a·p² + b·p + c)).
    #[arg(long, value_delimiter = ',', num_args = 3, default_values_t = [-25.74, 54.01, 5.74])]
    decode_ms: Vec<f64>,
    /// Decoding context (tokens) at which p = 1.
    #[arg(long, default_value_t = 1_048_576.0)]
    decode_context_norm: f64,
    /// Delay before KV events reach the router (ms).
    #[arg(long, default_value_t = 0.0)]
    event_delay_ms: f64,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Heterogeneous fleet: this share of the workers (the last ones) is slower...
    #[arg(long, default_value_t = 0.0)]
    slow_share: f64,
    /// ...by this factor (every pass takes this many times as long).
    #[arg(long, default_value_t = 2.0)]
    slow_factor: f64,
    /// Do not tell the router each request's output length (by default every request carries
    /// it, as a client sending `nvext.agent_hints.osl` would).
    #[arg(long)]
    no_osl_hints: bool,
    /// Another router configuration to compare: `NAME=FLAGS`, flags as dynamo-epp takes them,
    /// e.g. `tuned=--router-temperature 0.05`. Repeatable.
    #[arg(long = "extra")]
    extra: Vec<String>,
    /// Only these policies (names), in this order; default: all standard ones and extras.
    /// Also the oracle bounds, never in a default run (a perfect TTFT prediction per
    /// candidate, simulator only): `oracle-ttft`, `oracle-ttft-guard` (+ the stall guard),
    /// `oracle-ttft-cost0.25` / `oracle-ttft-cost1` (among workers within that many × the
    /// prompt's blocks of Dynamo's best cost).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Router queue experiment: our router (KV events, `--queue-router-policy`) without a queue, then with the router
    /// queue at this DYN_ROUTER_QUEUE_THRESHOLD in `fcfs` and in `wspt`, reported per priority
    /// class (instead of the policy comparison).
    #[arg(long)]
    queue_threshold: Option<f64>,
    /// In the queue experiment, the runs with the queue also skip saturated workers
    /// (`DYN_ACTIVE_PREFILL_TOKENS_THRESHOLD_FRAC` = the queue threshold, Dynamo's busy
    /// threshold): requests then wait in the router queue, in its order, instead of in the
    /// queue of a busy engine the cost model prefers.
    #[arg(long)]
    queue_skip_saturated: bool,
    /// In the queue experiment, the runs with the queue bind late (`DYN_EPP_QUEUE_LATE_BINDING`):
    /// a waiting request goes when the worker it would pick has room or its prompt joins the
    /// last prefill pass there.
    #[arg(long)]
    queue_late_binding: bool,
    /// The routing policy of every run in the queue experiment (`DYN_ROUTER_POLICY`).
    #[arg(long, value_enum, default_value_t = RoutingPolicy::Cost)]
    queue_router_policy: RoutingPolicy,
    /// Share of requests in the high (strict) priority class in the queue experiment.
    #[arg(long, default_value_t = 0.2)]
    high_priority_share: f64,
    /// Write the reports as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Draw TTFT CDFs and reuse into this PNG.
    #[arg(long)]
    chart: Option<PathBuf>,
}

fn main() -> std::process::ExitCode {
    let a = Args::parse();
    match run(a) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("dynamo-epp-sim: {e}");
            std::process::ExitCode::from(2)
        }
    }
}

fn run(a: Args) -> Result<(), String> {
    let mut trace = sim::trace::load(&a.trace).map_err(|e| e.to_string())?;
    if let Some(n) = a.requests {
        trace.truncate(n);
    }
    if a.workers == 0 || a.speedup <= 0.0 || a.block_tokens == 0 || 512 % a.block_tokens != 0 {
        return Err("--workers and --speedup must be positive and --block-tokens must divide 512".into());
    }
    if !(0.0..=1.0).contains(&a.slow_share) || a.slow_factor <= 0.0 {
        return Err("--slow-share must be within 0..=1 and --slow-factor positive".into());
    }
    let cfg = SimConfig {
        workers: a.workers,
        engine: EngineParams {
            kv_blocks: a.kv_blocks,
            block_tokens: a.block_tokens,
            max_batch_tokens: a.max_batch_tokens,
            max_running: a.max_running,
            prefill_ms: [a.prefill_ms[0], a.prefill_ms[1], a.prefill_ms[2]],
            decode_ms: [a.decode_ms[0], a.decode_ms[1], a.decode_ms[2]],
            decode_context_norm: a.decode_context_norm,
        },
        speedup: a.speedup,
        event_delay_ms: a.event_delay_ms,
        seed: a.seed,
        slow_share: a.slow_share,
        slow_factor: a.slow_factor,
        osl_hints: !a.no_osl_hints,
    };
    if let Some(threshold) = a.queue_threshold {
        return queue_experiment(&a, &trace, &cfg, threshold);
    }
    let mut policies = sim::standard_policies();
    for e in &a.extra {
        let (name, flags) = e.split_once('=').ok_or_else(|| format!("--extra {e:?}: expected NAME=FLAGS"))?;
        let c = Config::from_args(std::iter::once("dynamo-epp").chain(flags.split_whitespace())).map_err(|(m, _)| m)?;
        policies.push(NamedPolicy { name: name.into(), policy: Policy::Router { kv: c.kv_settings(), sched: c.sched_settings(), queue: c.queue_settings() } });
    }
    if !a.only.is_empty() {
        let known: Vec<NamedPolicy> = policies.into_iter().chain(sim::oracle_policies()).collect();
        policies = a
            .only
            .iter()
            .map(|n| known.iter().find(|p| &p.name == n).cloned().ok_or_else(|| format!("--only: no policy named {n:?}")))
            .collect::<Result<_, _>>()?;
    }
    let reports = sim::run(&trace, &cfg, &policies);
    print!("{}", report::markdown(&reports));
    for r in reports.iter().filter_map(|r| Some((&r.policy, r.oracle_exact?))) {
        println!("{}: TTFT as looked ahead for {:.1} % of requests (the rest changed by later arrivals)", r.0, 100.0 * r.1);
    }
    print!("\nWhere the TTFT goes (means):\n\n{}", report::ttft_parts_markdown(&reports));
    let wall: f64 = reports.iter().map(|r| r.wall_seconds).sum();
    println!("\n{} requests, {} workers, ideal reuse {:.1} %, simulated in {wall:.1} s", trace.len(), cfg.workers, 100.0 * reports[0].ideal_reuse);
    let fleet_blocks = cfg.workers * cfg.engine.kv_blocks as usize;
    let bounds = [report::CacheBound::new(&trace, &cfg.engine, Some(fleet_blocks)), report::CacheBound::new(&trace, &cfg.engine, None)];
    for b in &bounds {
        let f = &b.prefill_floor_ms;
        let cache = b.capacity_blocks.map_or("one infinite cache".into(), |n| format!("one LRU cache of the fleet's {n} blocks"));
        println!("bound, {cache}: reuse {:.1} %, TTFT floor (prefill alone) mean / p50 / p99 {:.0} / {:.0} / {:.0} ms", 100.0 * b.reuse, f.mean, f.p50, f.p99);
    }
    if let Some(p) = &a.json {
        let doc = serde_json::json!({ "trace": a.trace, "requests": trace.len(), "config": {
            "workers": cfg.workers, "engine": cfg.engine, "speedup": cfg.speedup, "event_delay_ms": cfg.event_delay_ms, "seed": cfg.seed,
            "slow_share": cfg.slow_share, "slow_factor": cfg.slow_factor, "osl_hints": cfg.osl_hints,
        }, "bounds": bounds, "policies": reports });
        std::fs::write(p, serde_json::to_string_pretty(&doc).expect("JSON")).map_err(|e| format!("{}: {e}", p.display()))?;
    }
    if let Some(p) = &a.chart {
        if !report::chart(&reports, p).map_err(|e| e.to_string())? {
            eprintln!("dynamo-epp-sim: no DejaVu font found; the chart has no labels");
        }
    }
    Ok(())
}

/// The router queue against no queue on the same arrivals, per priority class.
fn queue_experiment(a: &Args, trace: &[sim::trace::TraceRequest], cfg: &SimConfig, threshold: f64) -> Result<(), String> {
    use dynamo_epp::{
        router::KvSettings,
        sched::{
            admission::Thresholds,
            queue::{QueuePolicy, QueueSettings},
            SchedSettings,
        },
        sim::queue,
    };
    if !(0.0..=1.0).contains(&a.high_priority_share) || threshold < 0.0 {
        return Err("--high-priority-share must be within 0..=1 and --queue-threshold ≥ 0".into());
    }
    let kv = KvSettings { use_kv_events: true, ..KvSettings::default() };
    let skip = a.queue_skip_saturated.then_some(Thresholds { prefill_tokens_frac: Some(threshold), ..Thresholds::default() });
    let run = |name: &str, policy: Option<QueuePolicy>| NamedPolicy {
        name: name.into(),
        policy: Policy::Router {
            kv,
            sched: SchedSettings { policy: a.queue_router_policy, admission: policy.and(skip), ..SchedSettings::default() },
            queue: policy.map(|p| QueueSettings { max_requests: usize::MAX, max_bytes: u64::MAX, late_binding: a.queue_late_binding, ..QueueSettings::single_class(threshold, p) }),
        },
    };
    let runs = [run("no-queue", None), run("queue-fcfs", Some(QueuePolicy::Fcfs)), run("queue-wspt", Some(QueuePolicy::Wspt))];
    let high = queue::high_priority(trace.len(), a.high_priority_share, cfg.seed);
    let reports = queue::run(trace, cfg, &runs, &high);
    print!("{}", queue::markdown(&reports));
    if let Some(p) = &a.json {
        let doc = serde_json::json!({ "trace": a.trace, "requests": trace.len(), "queue_threshold": threshold,
            "high_priority_share": a.high_priority_share, "queue_skip_saturated": a.queue_skip_saturated, "queue_late_binding": a.queue_late_binding, "router_policy": a.queue_router_policy, "osl_hints": cfg.osl_hints, "speedup": cfg.speedup, "workers": cfg.workers, "runs": reports });
        std::fs::write(p, serde_json::to_string_pretty(&doc).expect("JSON")).map_err(|e| format!("{}: {e}", p.display()))?;
    }
    Ok(())
}
