//! Real NVIDIA Dynamo 1.6.1 for the interop tests: nats-server (core), `dynamo.mocker` workers and
//! one `dynamo.frontend --router-mode direct` (the sidecar our EPP talks to through the gateway),
//! Dynamo from `.venv-dynamo` (scripts/setup-dynamo.sh), all bound to 127.0.0.1 on free ports.
//!
//! Discovery is `file` (a temp dir), the event plane NATS core. Worker instance ids are random per
//! start; each worker's id is read from its own Prometheus endpoint (`worker_id` label, hex) and
//! checked against the file-discovery registry the frontend reads.
#![allow(dead_code)] // each test binary uses a different part of the harness

use std::{
    collections::{BTreeSet, HashMap},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

use tokio::process::{Child, Command};

use crate::common::{free_port, repo_root, tokenizer_fixtures, Envoy, Epp, EppLink, EppOptions, NatsServer};

/// The served model name every worker registers.
pub const MODEL: &str = "qwen";

/// How long any one Dynamo process may take to come up (a loaded 2-core CI machine included).
const START_DEADLINE: Duration = Duration::from_secs(90);

pub fn dynamo_venv() -> PathBuf {
    let venv = repo_root().join(".venv-dynamo");
    assert!(venv.join("bin/python").exists(), "{} is missing; run scripts/setup-dynamo.sh", venv.display());
    venv
}

/// A model directory the mocker accepts: the tokenizer fixture plus a `config.json` (Qwen3-0.6B's
/// shape; the mocker only needs it to exist and parse, it loads no weights).
fn write_model_dir(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let tok = tokenizer_fixtures().join("qwen3");
    assert!(tok.join("tokenizer.json").exists(), "no Qwen3 tokenizer at {} (set TOKENIZER_FIXTURES)", tok.display());
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::os::unix::fs::symlink(tok.join(f), dir.join(f)).unwrap();
    }
    let config = serde_json::json!({
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        "head_dim": 128,
        "hidden_size": 1024,
        "intermediate_size": 3072,
        "max_position_embeddings": 40960,
        "num_attention_heads": 16,
        "num_hidden_layers": 28,
        "num_key_value_heads": 8,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000,
        "tie_word_embeddings": true,
        "torch_dtype": "bfloat16",
        "vocab_size": 151936
    });
    std::fs::write(dir.join("config.json"), serde_json::to_vec_pretty(&config).unwrap()).unwrap();
}

/// What a mocker serves (`--disaggregation-mode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Prefill and decode: registers chat + completions on `{ns}/backend/generate`.
    Agg,
    /// Prefill only, on `{ns}/prefill/generate`.
    Prefill,
    /// Decode only, on `{ns}/backend/generate`; publishes no KV events.
    Decode,
}

impl Mode {
    fn component(self) -> &'static str {
        if self == Mode::Prefill {
            "prefill"
        } else {
            "backend"
        }
    }

    fn flag(self) -> &'static str {
        match self {
            Mode::Agg => "agg",
            Mode::Prefill => "prefill",
            Mode::Decode => "decode",
        }
    }

    /// The role in our workers file.
    fn fleet_role(self) -> &'static str {
        match self {
            Mode::Agg => "worker",
            Mode::Prefill => "prefill",
            Mode::Decode => "decode",
        }
    }
}

pub struct DynamoOptions {
    /// One mocker process per entry.
    pub workers: Vec<Mode>,
    pub namespace: String,
    /// Tokens per KV block on the mockers (their `--block-size`).
    pub block_size: u32,
    /// Mocker simulation speed; 1.0 = the real engine's timing model (~6 ms per decoded token
    /// here), higher = faster.
    pub speedup_ratio: f64,
    /// KV capacity per worker in blocks (mocker default 16384); small values force evictions.
    pub num_gpu_blocks: Option<u32>,
    /// (worker index, factor): that mocker runs this many times slower (its `--speedup-ratio`
    /// divided by the factor).
    pub slower: Option<(usize, f64)>,
}

impl Default for DynamoOptions {
    fn default() -> Self {
        DynamoOptions {
            workers: vec![Mode::Agg; 3],
            namespace: "interop".into(),
            block_size: 16,
            speedup_ratio: 10.0,
            num_gpu_blocks: None,
            slower: None,
        }
    }
}

/// Worker `i`'s `--speedup-ratio`.
fn speedup_of(opts: &DynamoOptions, i: usize) -> f64 {
    match opts.slower {
        Some((w, factor)) if w == i => opts.speedup_ratio / factor,
        _ => opts.speedup_ratio,
    }
}

/// One `dynamo.mocker` process (one worker).
pub struct Mocker {
    /// Behind a lock so a test can crash a worker while the fleet is shared.
    child: parking_lot::Mutex<Child>,
    pub mode: Mode,
    /// Its runtime instance id: what `x-dynamo-worker-instance-id` (or, for a prefill worker,
    /// `x-dynamo-prefill-instance-id`) must carry.
    pub id: u64,
    /// Its system server (`/metrics`, `/health`).
    pub system_port: u16,
    pub log: PathBuf,
}

pub struct DynamoFleet {
    pub nats: NatsServer,
    pub workers: Vec<Mocker>,
    frontend: parking_lot::Mutex<Child>,
    pub frontend_port: u16,
    pub frontend_log: PathBuf,
    pub namespace: String,
    pub dir: tempfile::TempDir,
}

impl DynamoFleet {
    pub async fn start(opts: DynamoOptions) -> DynamoFleet {
        let t0 = Instant::now();
        let venv = dynamo_venv();
        let dir = tempfile::Builder::new().prefix("dynamo-interop-").tempdir().unwrap();
        let model = dir.path().join("model");
        write_model_dir(&model);

        // The event plane uses NATS core only (JetStream, on in this server, goes unused).
        let nats = NatsServer::start().await;
        let env = dynamo_env(dir.path(), &nats.url());
        let python = venv.join("bin/python");
        let mut workers = Vec::new();
        for (i, &mode) in opts.workers.iter().enumerate() {
            let system_port = free_port_below_32768();
            let log = dir.path().join(format!("mocker-{i}.log"));
            let (out, err) = log_file(&log);
            let mut cmd = Command::new(&python);
            cmd.args(["-m", "dynamo.mocker", "--model-path"])
                .arg(&model)
                .args(["--model-name", MODEL, "--endpoint"])
                .arg(format!("dyn://{}.{}.generate", opts.namespace, mode.component()))
                .args(["--disaggregation-mode", mode.flag()])
                .args(["--block-size", &opts.block_size.to_string()])
                .args(["--speedup-ratio", &speedup_of(&opts, i).to_string()]);
            if let Some(n) = opts.num_gpu_blocks {
                cmd.args(["--num-gpu-blocks-override", &n.to_string()]);
            }
            let child = cmd
                .env_clear()
                .envs(env.iter().map(|(k, v)| (k, v)))
                // The system server gives each worker its own /metrics: proof of who served.
                .env("DYN_SYSTEM_HOST", "127.0.0.1")
                .env("DYN_SYSTEM_PORT", system_port.to_string())
                .stdin(Stdio::null())
                .stdout(out)
                .stderr(err)
                .kill_on_drop(true)
                .spawn()
                .expect("spawn dynamo.mocker");
            workers.push(Mocker { child: parking_lot::Mutex::new(child), mode, id: 0, system_port, log });
        }

        let frontend_port = free_port();
        let frontend_log = dir.path().join("frontend.log");
        let (out, err) = log_file(&frontend_log);
        let frontend = Command::new(&python)
            .args(["-m", "dynamo.frontend", "--router-mode", "direct", "--namespace", &opts.namespace])
            .args(["--http-host", "127.0.0.1", "--http-port", &frontend_port.to_string()])
            .env_clear()
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .kill_on_drop(true)
            .spawn()
            .expect("spawn dynamo.frontend");

        let mut fleet = DynamoFleet {
            nats,
            workers,
            frontend: parking_lot::Mutex::new(frontend),
            frontend_port,
            frontend_log,
            namespace: opts.namespace,
            dir,
        };
        for i in 0..fleet.workers.len() {
            fleet.workers[i].id = fleet.learn_worker_id(i).await;
        }
        let ids: BTreeSet<u64> = fleet.workers.iter().map(|w| w.id).collect();
        assert_eq!(ids.len(), fleet.workers.len(), "worker ids collide: {ids:?}");
        fleet.wait_registered(&ids).await;
        fleet.wait_frontend_serves_every_worker().await;
        eprintln!("Dynamo up in {:.1?}: workers {:?}", t0.elapsed(), ids);
        fleet
    }

    pub fn frontend_addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.frontend_port))
    }

    pub fn frontend_url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.frontend_port)
    }

    /// The model directory every Dynamo process loads (the Qwen3 tokenizer fixture); our EPP
    /// tokenizes with the same files.
    pub fn model_dir(&self) -> PathBuf {
        self.dir.path().join("model")
    }

    pub fn worker_name(i: usize) -> String {
        format!("mocker-{i}")
    }

    /// A workers file for our EPP naming the given workers: explicit ids (Dynamo's, random per
    /// start), roles from the mockers' modes, every address the frontend (it is the sidecar for
    /// all of them).
    pub fn fleet_yaml(&self, which: &[usize]) -> String {
        let mut s = String::from("workers:\n");
        for &i in which {
            let w = &self.workers[i];
            s.push_str(&format!(
                "  - name: {}\n    address: {}\n    id: {}\n    role: {}\n",
                Self::worker_name(i),
                self.frontend_addr(),
                w.id,
                w.mode.fleet_role()
            ));
        }
        s
    }

    pub fn worker_index(&self, id: u64) -> Option<usize> {
        self.workers.iter().position(|w| w.id == id)
    }

    /// The worker's own count of `generate` requests it served (its system server's
    /// `dynamo_component_requests_total{dynamo_endpoint="generate"}`).
    pub async fn served(&self, i: usize) -> u64 {
        let m = self.worker_metrics(i).await.unwrap_or_else(|| panic!("worker {i} /metrics unreachable"));
        metric_value(&m, "dynamo_component_requests_total", &[("dynamo_endpoint", "generate")]).unwrap_or(0.0) as u64
    }

    /// `served` for every worker still running (0 for a killed one).
    pub async fn served_all(&self) -> Vec<u64> {
        let mut v = Vec::new();
        for i in 0..self.workers.len() {
            v.push(if self.is_running(i) { self.served(i).await } else { 0 });
        }
        v
    }

    /// Requests the worker is serving right now (`dynamo_component_inflight_requests`).
    pub async fn in_flight(&self, i: usize) -> u64 {
        let m = self.worker_metrics(i).await.unwrap_or_else(|| panic!("worker {i} /metrics unreachable"));
        metric_value(&m, "dynamo_component_inflight_requests", &[("dynamo_endpoint", "generate")]).unwrap_or(0.0) as u64
    }

    pub fn is_running(&self, i: usize) -> bool {
        self.workers[i].child.lock().try_wait().unwrap().is_none()
    }

    async fn worker_metrics(&self, i: usize) -> Option<String> {
        let url = format!("http://127.0.0.1:{}/metrics", self.workers[i].system_port);
        let r = reqwest::Client::new().get(url).timeout(Duration::from_secs(5)).send().await.ok()?;
        r.text().await.ok()
    }

    /// SIGKILL one worker: a crash, no deregistration. Returns once it is gone.
    pub async fn kill_worker(&self, i: usize) {
        self.workers[i].child.lock().start_kill().unwrap();
        while self.is_running(i) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The frontend's log without colour codes (1.6.1 writes them even to a file).
    pub fn frontend_log(&self) -> String {
        strip_ansi(&std::fs::read_to_string(&self.frontend_log).unwrap_or_default())
    }

    /// Which worker the frontend's direct router sent the request with this `x-request-id` to:
    /// its `Selected worker router_mode="direct" worker_id=…` line, or for a request that failed
    /// before that (worker unreachable) its `route request failed … worker_id=…` line.
    pub fn frontend_routed_to(&self, x_request_id: &str) -> Option<u64> {
        let tag = format!("x_request_id=\"{x_request_id}\"");
        self.frontend_log()
            .lines()
            .filter(|l| l.contains(&tag) && (l.contains("Selected worker") || l.contains("route request")))
            .find_map(|l| field(l, "worker_id")?.parse().ok())
    }

    /// `frontend_routed_to` once the line is written (logging is asynchronous); `None` after 10 s.
    pub async fn wait_frontend_routed_to(&self, x_request_id: &str) -> Option<u64> {
        self.poll(|| self.frontend_routed_to(x_request_id)).await
    }

    /// Every worker the frontend's direct router sent the request to, in order (a disaggregated
    /// request: its prefill worker, then its decode worker), once `n` are logged; fewer after 10 s.
    pub async fn wait_frontend_workers(&self, x_request_id: &str, n: usize) -> Vec<u64> {
        let tag = format!("x_request_id=\"{x_request_id}\"");
        let selected = || -> Vec<u64> {
            let log = self.frontend_log();
            let lines = log.lines().filter(|l| l.contains(&tag) && l.contains("Selected worker"));
            lines.filter_map(|l| field(l, "worker_id")?.parse().ok()).collect()
        };
        self.poll(|| Some(selected()).filter(|ids| ids.len() >= n)).await.unwrap_or_else(selected)
    }

    /// The frontend's log line for this `x-request-id` that contains `needle`, once written;
    /// `None` after 10 s.
    pub async fn wait_frontend_line(&self, x_request_id: &str, needle: &str) -> Option<String> {
        let tag = format!("x_request_id=\"{x_request_id}\"");
        self.poll(|| self.frontend_log().lines().find(|l| l.contains(&tag) && l.contains(needle)).map(str::to_string))
            .await
    }

    async fn poll<T>(&self, f: impl Fn() -> Option<T>) -> Option<T> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let v = f();
            if v.is_some() || Instant::now() > deadline {
                return v;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The worker's instance id, from the `worker_id` label (hex) its system server puts on
    /// every component metric.
    async fn learn_worker_id(&self, i: usize) -> u64 {
        let deadline = Instant::now() + START_DEADLINE;
        loop {
            if let Some(m) = self.worker_metrics(i).await {
                let id = m
                    .lines()
                    .filter(|l| l.starts_with("dynamo_component_uptime_seconds{"))
                    .find_map(|l| label(l, "worker_id").and_then(|h| u64::from_str_radix(h, 16).ok()));
                if let Some(id) = id {
                    return id;
                }
            }
            self.assert_alive(i);
            assert!(Instant::now() < deadline, "mocker {i} never reported its id: {}", tail(&self.workers[i].log));
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Every worker's `generate` endpoint is in the file-discovery registry under the same id.
    async fn wait_registered(&self, ids: &BTreeSet<u64>) {
        let deadline = Instant::now() + START_DEADLINE;
        loop {
            let found = self.registered_ids();
            if &found == ids {
                return;
            }
            assert!(Instant::now() < deadline, "discovery lists {found:?}, the workers say {ids:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Instance ids of `generate` endpoints in `$DYN_FILE_KV/v1/instances`: JSON files named
    /// `{ns}%2F{backend|prefill}%2Fgenerate%2F{id:x}` holding `{"instance_id": …}`.
    pub fn registered_ids(&self) -> BTreeSet<u64> {
        let prefixes = ["backend", "prefill"].map(|c| format!("{}%2F{c}%2Fgenerate%2F", self.namespace));
        let Ok(entries) = std::fs::read_dir(self.dir.path().join("kv/v1/instances")) else {
            return BTreeSet::new();
        };
        entries
            .flatten()
            .filter(|e| prefixes.iter().any(|p| e.file_name().to_string_lossy().starts_with(p.as_str())))
            .filter_map(|e| {
                let v: serde_json::Value = serde_json::from_slice(&std::fs::read(e.path()).ok()?).ok()?;
                v["instance_id"].as_u64()
            })
            .collect()
    }

    /// The frontend discovers workers asynchronously; it is ready once a request pinned to each
    /// worker succeeds (with prefill workers: each prefill and each decode worker in some pair).
    async fn wait_frontend_serves_every_worker(&self) {
        let of = |m: Mode| -> Vec<u64> { self.workers.iter().filter(|w| w.mode == m).map(|w| w.id).collect() };
        let (prefill, decode) = (of(Mode::Prefill), of(Mode::Decode));
        let mut pins: Vec<Vec<(&str, String)>> =
            of(Mode::Agg).into_iter().map(|id| vec![("x-dynamo-worker-instance-id", id.to_string())]).collect();
        for k in 0..prefill.len().max(decode.len()) {
            pins.push(vec![
                ("x-dynamo-prefill-instance-id", prefill[k % prefill.len()].to_string()),
                ("x-dynamo-worker-instance-id", decode[k % decode.len()].to_string()),
            ]);
        }
        let client = reqwest::Client::new();
        let deadline = Instant::now() + START_DEADLINE;
        let body = serde_json::json!({"model": MODEL, "prompt": "warm up", "max_tokens": 1});
        for pin in pins {
            loop {
                let mut req = client
                    .post(self.frontend_url("/v1/completions"))
                    .header("content-type", "application/json")
                    .body(body.to_string())
                    .timeout(Duration::from_secs(10));
                for (k, v) in &pin {
                    req = req.header(*k, v);
                }
                if matches!(req.send().await, Ok(r) if r.status() == 200) {
                    break;
                }
                assert!(
                    self.frontend.lock().try_wait().unwrap().is_none(),
                    "dynamo.frontend exited: {}",
                    tail(&self.frontend_log)
                );
                assert!(Instant::now() < deadline, "the frontend never served {pin:?}: {}", tail(&self.frontend_log));
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }

    fn assert_alive(&self, i: usize) {
        assert!(self.is_running(i), "dynamo.mocker {i} exited: {}", tail(&self.workers[i].log));
    }
}

impl Drop for DynamoFleet {
    /// A failed test keeps the Dynamo logs (the temp dir goes away with the fleet).
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        let keep = repo_root().join("target/dynamo-interop-logs").join(self.dir.path().file_name().unwrap());
        let _ = std::fs::create_dir_all(&keep);
        for e in std::fs::read_dir(self.dir.path()).into_iter().flatten().flatten() {
            if e.path().extension().is_some_and(|x| x == "log") {
                let _ = std::fs::copy(e.path(), keep.join(e.file_name()));
            }
        }
        eprintln!("Dynamo logs kept in {}", keep.display());
    }
}

/// The whole interop chain: client → Envoy → dynamo-epp → dynamo.frontend (direct) → mockers.
pub struct InteropChain {
    pub dynamo: DynamoFleet,
    pub epp: Epp,
    pub envoy: Envoy,
    pub client: reqwest::Client,
}

/// One HTTP exchange as the client saw it.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    /// The id the frontend logged the request under (Envoy sets one; the frontend echoes it).
    pub x_request_id: String,
    pub body: String,
    pub first_chunk_at: Option<Instant>,
    pub ended_at: Instant,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
}

impl InteropChain {
    /// Dynamo per `opts`; our EPP's fleet file names the workers in `fleet` (indices).
    pub async fn start(opts: DynamoOptions, fleet: &[usize]) -> InteropChain {
        Self::start_with(opts, fleet, |_| vec![]).await
    }

    /// Like `start`, and our EPP learns the workers' caches from their real KV events on the
    /// fleet's NATS core event plane.
    pub async fn start_kv_aware(opts: DynamoOptions, fleet: &[usize]) -> InteropChain {
        let block_size = opts.block_size.to_string();
        Self::start_with(opts, fleet, |dy| {
            vec![
                ("DYN_EVENT_PLANE".into(), "nats".into()),
                ("NATS_SERVER".into(), dy.nats.url()),
                ("DYN_NAMESPACE".into(), dy.namespace.clone()),
                ("DYN_COMPONENT_NAME".into(), "backend".into()),
                ("DYN_KV_CACHE_BLOCK_SIZE".into(), block_size),
            ]
        })
        .await
    }

    async fn start_with(
        opts: DynamoOptions,
        fleet: &[usize],
        epp_env: impl FnOnce(&DynamoFleet) -> Vec<(String, String)>,
    ) -> InteropChain {
        let dynamo = DynamoFleet::start(opts).await;
        let (epp, envoy) = front(&dynamo, fleet, epp_env(&dynamo)).await;
        let client = reqwest::Client::builder().pool_max_idle_per_host(64).build().unwrap();
        InteropChain { dynamo, epp, envoy, client }
    }

    /// Another EPP (configured by `env` on top of the chain's) and Envoy in front of the same
    /// Dynamo fleet: two router configurations compared on the same workers.
    pub async fn another_front(&self, fleet: &[usize], env: Vec<(String, String)>) -> (Epp, Envoy) {
        front(&self.dynamo, fleet, env).await
    }

    /// Rewrites our EPP's fleet file and waits until it serves exactly that many workers.
    pub async fn set_fleet(&self, fleet: &[usize]) {
        std::fs::write(&self.epp.workers_file, self.dynamo.fleet_yaml(fleet)).unwrap();
        let n = fleet.len() as f64;
        let got = self.epp.wait_metric("dynamo_epp_workers", Duration::from_secs(10), |v| v == n).await;
        assert_eq!(got, n, "the EPP did not reload the fleet file");
    }

    /// POSTs every body through Envoy at once; the replies in the bodies' order.
    pub async fn post_concurrently(
        &self,
        path: &str,
        bodies: impl IntoIterator<Item = serde_json::Value>,
        timeout: Duration,
    ) -> Vec<Reply> {
        let tasks: Vec<_> = bodies
            .into_iter()
            .map(|body| {
                let (client, url) = (self.client.clone(), self.envoy.url(path));
                tokio::spawn(async move { post_json(&client, &url, &[], &body, timeout).await })
            })
            .collect();
        let mut replies = Vec::new();
        for t in tasks {
            replies.push(t.await.unwrap());
        }
        replies
    }

    /// POSTs JSON through Envoy; the whole exchange is bounded by `timeout`.
    pub async fn post(&self, path: &str, body: &serde_json::Value, timeout: Duration) -> Reply {
        post_json(&self.client, &self.envoy.url(path), &[], body, timeout).await
    }
}

/// Our EPP (its fleet file naming `fleet`) and an Envoy asking it, in front of `dynamo`.
async fn front(dynamo: &DynamoFleet, fleet: &[usize], extra_env: Vec<(String, String)>) -> (Epp, Envoy) {
    // As deployed: our EPP tokenizes with the served model's files and injects
    // nvext.token_data, so the frontend skips its own tokenization.
    let mut env = vec![
        ("DYN_MODEL_PATH".into(), dynamo.model_dir().display().to_string()),
        ("DYN_MODEL_NAME".into(), MODEL.into()),
    ];
    env.extend(extra_env);
    let epp = Epp::start(&dynamo.fleet_yaml(fleet), EppOptions { env, ..Default::default() }).await;
    let envoy = Envoy::start(Some(&EppLink { port: epp.grpc_port, tls: false })).await;
    (epp, envoy)
}

/// POSTs JSON and reads the whole answer, within `timeout` (a hung request fails the test).
pub async fn post_json(
    client: &reqwest::Client,
    url: &str,
    headers: &[(&str, String)],
    body: &serde_json::Value,
    timeout: Duration,
) -> Reply {
    read_reply(open_json(client, url, headers, body, timeout).await).await
}

/// POSTs JSON and returns once the response headers are in: for an SSE answer from the
/// frontend, that is when the first token exists (errors before it are plain HTTP statuses).
pub async fn open_json(
    client: &reqwest::Client,
    url: &str,
    headers: &[(&str, String)],
    body: &serde_json::Value,
    timeout: Duration,
) -> reqwest::Response {
    let mut req = client.post(url).header("content-type", "application/json").body(body.to_string()).timeout(timeout);
    for (k, v) in headers {
        req = req.header(*k, v);
    }
    req.send().await.unwrap_or_else(|e| panic!("POST {url}: {e}"))
}

/// Reads a response to its end.
pub async fn read_reply(mut r: reqwest::Response) -> Reply {
    let status = r.status().as_u16();
    let x_request_id = r.headers().get("x-request-id").map(|v| v.to_str().unwrap().to_string()).unwrap_or_default();
    let (mut body, mut first_chunk_at) = (Vec::new(), None);
    while let Some(chunk) = r.chunk().await.unwrap_or_else(|e| panic!("reading {}: {e}", r.url())) {
        first_chunk_at.get_or_insert_with(Instant::now);
        body.extend_from_slice(&chunk);
    }
    let body = String::from_utf8(body).unwrap();
    Reply { status, x_request_id, body, first_chunk_at, ended_at: Instant::now() }
}

/// Environment shared by the frontend and the mockers. Everything Dynamo listens on is pinned to
/// loopback (its defaults bind 0.0.0.0); HOME is the temp dir so the frontend's model-card cache
/// stays per test.
fn dynamo_env(dir: &Path, nats_url: &str) -> HashMap<&'static str, String> {
    HashMap::from([
        ("PATH", std::env::var("PATH").unwrap_or_default()),
        ("HOME", dir.display().to_string()),
        ("DYN_DISCOVERY_BACKEND", "file".into()),
        ("DYN_FILE_KV", dir.join("kv").display().to_string()),
        ("DYN_EVENT_PLANE", "nats".into()),
        ("NATS_SERVER", nats_url.to_string()),
        ("DYN_REQUEST_PLANE", "tcp".into()),
        ("DYN_TCP_RPC_HOST", "127.0.0.1".into()),
        ("DYN_TCP_RESPONSE_STREAM_HOST", "127.0.0.1".into()),
        ("DYN_EVENT_PLANE_HOST", "127.0.0.1".into()),
        ("DYN_LOG", "info".into()),
    ])
}

/// Dynamo 1.6.1 parses `DYN_SYSTEM_PORT` as an i16 ("invalid value unsigned int `36547`, expected
/// i16"), so its system server needs a port below 32768, outside Linux's ephemeral range.
fn free_port_below_32768() -> u16 {
    use rand::Rng;
    let mut rng = rand::rng();
    loop {
        let port = rng.random_range(20_000..32_768);
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// stdout and stderr of a process, both into one log file.
fn log_file(path: &Path) -> (Stdio, Stdio) {
    let f = std::fs::File::create(path).unwrap();
    (Stdio::from(f.try_clone().unwrap()), Stdio::from(f))
}

fn tail(path: &Path) -> String {
    let s = std::fs::read(path).unwrap_or_default();
    strip_ansi(&String::from_utf8_lossy(&s[s.len().saturating_sub(3000)..]))
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ parameters final-byte (a letter).
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// `key=value` or `key="value"` from a tracing text log line.
pub fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let at = line.find(&format!(" {key}="))? + key.len() + 2;
    let rest = &line[at..];
    match rest.strip_prefix('"') {
        Some(q) => q.split('"').next(),
        None => rest.split(' ').next(),
    }
}

/// A label's value in a Prometheus text line: `name{a="x",b="y"} v`.
fn label<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let at = line.find(&format!("{key}=\""))? + key.len() + 2;
    line[at..].split('"').next()
}

/// The value of the first sample of `name` whose labels include all of `labels`.
pub fn metric_value(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines().find_map(|l| {
        let rest = l.strip_prefix(name)?;
        if !rest.starts_with('{') && !rest.starts_with(' ') {
            return None;
        }
        if !labels.iter().all(|(k, v)| label(l, k) == Some(*v)) {
            return None;
        }
        l.rsplit_once(' ')?.1.parse().ok()
    })
}
