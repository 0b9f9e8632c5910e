//! Load bench: the same requests through Envoy with the ext_proc filter (→ dynamo-epp) and
//! without it (the client names the destination itself), interleaved in one run, at
//! concurrency 1, 20 and 150 with 32 KB and 220 KB chat bodies. Prints per-cell p50/p99 for
//! both paths and the EPP-added latency as a difference and a ratio.
//!
//! Also prints, per path, the CPU time each process spent per request (Envoy, the EPP, and this
//! process = load generator + mock workers): on a shared 2-core machine latency at c=20 is mostly
//! queueing for CPU, so CPU per request is the figure that says where the added time goes.
//!
//! Run: `cargo bench --bench envoy_load` (needs scripts/setup.sh for Envoy).
//! `LOAD_REQUESTS` sets requests per path per cell (default 2000); `LOAD_CELLS=20x32,1x220`
//! keeps only those concurrency×KB cells; `LOAD_JSON=path` also writes the table as JSON.

#[path = "../tests/common/mod.rs"]
mod common;

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use common::*;

/// CPU time per request of each process over one path's runs.
#[derive(Default)]
struct CpuPerRequest {
    used: Vec<Duration>,
}

impl CpuPerRequest {
    fn add(&mut self, before: &[Duration], after: &[Duration]) {
        self.used.resize(before.len(), Duration::ZERO);
        for (u, (b, a)) in self.used.iter_mut().zip(before.iter().zip(after)) {
            *u += *a - *b;
        }
    }
    fn micros(&self, requests: usize) -> Vec<f64> {
        self.used.iter().map(|d| d.as_secs_f64() * 1e6 / requests as f64).collect()
    }
}

/// Sends `n` requests with `concurrency` in flight; returns each request's latency.
async fn drive(client: &reqwest::Client, url: &str, body: Arc<String>, dest: Option<Vec<String>>, n: usize, concurrency: usize) -> Vec<Duration> {
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (client, url, body, dest, next) = (client.clone(), url.to_string(), body.clone(), dest.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= n {
                    return lat;
                }
                let mut rb = client.post(&url).header("content-type", "application/json").body(body.as_bytes().to_vec());
                if let Some(d) = &dest {
                    rb = rb.header("x-gateway-destination-endpoint", &d[i % d.len()]);
                }
                let t = Instant::now();
                let r = rb.send().await.expect("request");
                assert_eq!(r.status(), 200);
                r.bytes().await.unwrap();
                lat.push(t.elapsed());
            }
        }));
    }
    let mut all = Vec::with_capacity(n);
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all.sort();
    all
}

fn main() {
    // `cargo bench` passes `--bench`; nothing to filter here.
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        let n: usize = std::env::var("LOAD_REQUESTS").ok().and_then(|v| v.parse().ok()).unwrap_or(2000);
        let mut workers = Vec::new();
        for i in 0..3 {
            let w = MockWorker::start(&format!("w{i}")).await;
            w.stop_recording();
            workers.push(w);
        }
        let entries: Vec<_> = workers.iter().map(|w| (w.name(), w.addr, None)).collect();
        let epp = Epp::start(&workers_yaml(&entries), EppOptions { env: vec![("RUST_LOG".into(), "error".into())], ..Default::default() }).await;
        let with = Envoy::start(Some(&EppLink { port: epp.grpc_port, tls: false })).await;
        let without = Envoy::start(None).await;
        let dests: Vec<String> = workers.iter().map(|w| w.addr.to_string()).collect();
        let client = reqwest::Client::builder().pool_max_idle_per_host(512).build().unwrap();
        println!("requests per path per cell: {n}");
        println!("{:>5} {:>6} | {:>9} {:>9} | {:>9} {:>9} | {:>9} {:>9} | {:>6} {:>6}", "conc", "body", "base p50", "base p99", "epp p50", "epp p99", "+p50", "+p99", "x p50", "x p99");
        let cells: Option<Vec<String>> = std::env::var("LOAD_CELLS").ok().map(|v| v.split(',').map(str::to_string).collect());
        let me = std::process::id();
        let (with_pid, without_pid, epp_pid) = (with.child.id().unwrap(), without.child.id().unwrap(), epp.child.id().unwrap());
        let mut rows = Vec::new();
        let mut cpu_lines = Vec::new();
        for kb in [32usize, 220] {
            let content = "lorem ipsum dolor sit amet ".repeat(kb * 1024 / 27);
            let body = Arc::new(serde_json::json!({"model": "m", "messages": [{"role": "user", "content": content}]}).to_string());
            for conc in [1usize, 20, 150] {
                if cells.as_ref().is_some_and(|c| !c.contains(&format!("{conc}x{kb}"))) {
                    continue;
                }
                // Warm both paths, then alternate halves so drift hits both equally.
                drive(&client, &with.url("/v1/chat/completions"), body.clone(), None, conc * 4, conc).await;
                drive(&client, &without.url("/v1/chat/completions"), body.clone(), Some(dests.clone()), conc * 4, conc).await;
                let mut base = Vec::new();
                let mut ours = Vec::new();
                let (mut base_cpu, mut ours_cpu) = (CpuPerRequest::default(), CpuPerRequest::default());
                for _ in 0..2 {
                    let b = [cpu_time(without_pid), cpu_time(me)];
                    base.extend(drive(&client, &without.url("/v1/chat/completions"), body.clone(), Some(dests.clone()), n / 2, conc).await);
                    base_cpu.add(&b, &[cpu_time(without_pid), cpu_time(me)]);
                    let b = [cpu_time(with_pid), cpu_time(me), cpu_time(epp_pid)];
                    ours.extend(drive(&client, &with.url("/v1/chat/completions"), body.clone(), None, n / 2, conc).await);
                    ours_cpu.add(&b, &[cpu_time(with_pid), cpu_time(me), cpu_time(epp_pid)]);
                }
                let (bc, oc) = (base_cpu.micros(base.len()), ours_cpu.micros(ours.len()));
                cpu_lines.push(format!(
                    "{conc:>5} {kb:>5}K | envoy {:>6.0} client+workers {:>6.0} | envoy {:>6.0} client+workers {:>6.0} epp {:>6.0}",
                    bc[0], bc[1], oc[0], oc[1], oc[2]
                ));
                base.sort();
                ours.sort();
                let ms = |d: Duration| d.as_secs_f64() * 1e3;
                let (b50, b99, o50, o99) = (ms(percentile(&base, 50.0)), ms(percentile(&base, 99.0)), ms(percentile(&ours, 50.0)), ms(percentile(&ours, 99.0)));
                println!(
                    "{conc:>5} {:>5}K | {b50:>7.3}ms {b99:>7.3}ms | {o50:>7.3}ms {o99:>7.3}ms | {:>7.3}ms {:>7.3}ms | {:>6.2} {:>6.2}",
                    kb, o50 - b50, o99 - b99, o50 / b50, o99 / b99
                );
                rows.push(serde_json::json!({"concurrency": conc, "body_kb": kb, "base_p50_ms": b50, "base_p99_ms": b99, "epp_p50_ms": o50, "epp_p99_ms": o99,
                    "base_cpu_us_per_req": bc, "epp_path_cpu_us_per_req": oc}));
            }
        }
        println!("\nCPU µs per request (user+sys, 10 ms ticks) | without ext_proc | with ext_proc");
        for l in cpu_lines {
            println!("{l}");
        }
        if let Ok(path) = std::env::var("LOAD_JSON") {
            std::fs::write(path, serde_json::to_string_pretty(&rows).unwrap()).unwrap();
        }
    });
}
