//! The I/O edge toward the gateway: the ext_proc gRPC server, health, reflection, metrics and
//! the shutdown sequence.

pub mod debug;
pub mod envoy;
pub mod error;
pub mod ext_proc;
mod group;
pub mod health;
mod kv;
pub mod listener;
pub mod metrics;
pub mod queue;
pub mod otel;
mod replica;
mod sse;
pub mod tls;

use std::{future::IntoFuture, net::SocketAddr, sync::Arc, time::Duration};

use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_server::ExternalProcessorServer;
use parking_lot::Mutex;
use tokio::{
    net::{TcpListener, TcpSocket},
    sync::{watch, Notify},
};
use tonic::transport::{server::TcpIncoming, Server};

use crate::{
    config::Config,
    request::{
        hub,
        model::{LoadError, Model},
        pool::{WorkPool, EPP_INLINE_BYTES, FAST_SMALL_BYTES},
        tokenize::{Backend, BackendChoice},
        Preprocessor,
    },
    router::{RouteError, Router},
    workers::{
        self,
        file::FleetFileError,
        kube::{KubeError, KubeSource, Selection},
        Fleet,
    },
};
use error::EppError;
use metrics::{Metrics, RankLabel};

/// Descriptor set of Envoy's ext_proc service (built by build.rs) for gRPC reflection.
pub const EXT_PROC_DESCRIPTOR: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/ext_proc_descriptor.bin"));

/// How often the workers file is checked for changes.
const FLEET_POLL: Duration = Duration::from_secs(1);

/// State shared by every stream.
pub struct App {
    pub router: Mutex<Router>,
    pub metrics: Metrics,
    pub max_body_bytes: u64,
    /// Checks and tokenizes bodies; its work runs in `pool`.
    pub prep: Arc<Preprocessor>,
    pub pool: WorkPool,
    /// Status of an answer when every worker is busy (`DYN_EPP_OVERLOAD_STATUS`).
    pub overload_status: u16,
    /// Count streamed response tokens for the router ([`Router::wants_output`]).
    pub count_output: bool,
    /// Signalled when our bookings changed: replica sync publishes them.
    pub peer_events: Notify,
    /// The router queue (`DYN_ROUTER_QUEUE_THRESHOLD`); `None` = requests never wait.
    pub queue: Option<queue::Waitlist>,
    /// The decision window (`DYN_EPP_DECISION_WINDOW_MS`); `None` = each decided on arrival.
    pub window: Option<group::Window>,
    /// Span export (OpenTelemetry); `None` = off, the default.
    pub tracing: Option<otel::Tracing>,
}

impl App {
    pub fn new(router: Router, max_body_bytes: u64, prep: Preprocessor, pool: WorkPool) -> Self {
        App {
            router: Mutex::new(router),
            metrics: Metrics::new(),
            max_body_bytes,
            prep: Arc::new(prep),
            pool,
            overload_status: 429,
            count_output: false,
            peer_events: Notify::new(),
            queue: None,
            window: None,
            tracing: None,
        }
    }

    /// The answer to a routing failure: every worker busy → 429 or 503 (`overload_status`).
    pub fn route_error(&self, e: RouteError) -> EppError {
        match e {
            RouteError::Overloaded => EppError::Overloaded { status: self.overload_status },
            e => e.into(),
        }
    }

    pub fn set_fleet(&self, fleet: Fleet) {
        let n = fleet.workers.len();
        let mut r = self.router.lock();
        r.set_fleet(fleet);
        self.metrics.workers.set(n as i64);
        self.note_active(&r);
        drop(r);
        self.dispatch_waiting();
    }

    /// Capacity may have freed: let waiting requests go (a no-op without a queue).
    pub fn dispatch_waiting(&self) {
        if let Some(wl) = &self.queue {
            queue::pump(self, wl, std::time::Instant::now());
        }
    }

    /// Mirrors the router's booked-request count into the gauge and wakes the replica-sync
    /// publisher; call with the lock held after a booking changed.
    pub fn note_active(&self, router: &Router) {
        self.metrics.active_requests.set(router.active_requests() as i64);
        self.peer_events.notify_one();
    }

    /// The metrics text, with per-rank loads read now rather than on every request.
    pub fn render_metrics(&self) -> String {
        let loads: Vec<(RankLabel, crate::sched::active::RankLoad)> = {
            let r = self.router.lock();
            self.metrics.kv_index_bytes.set(r.kv_index_bytes() as i64);
            r.workers()
                .iter()
                .flat_map(|w| w.ranks().map(|rank| (RankLabel { worker: w.name.clone(), dp_rank: rank.dp_rank.0 }, r.load(&rank))))
                .collect()
        };
        self.metrics.set_worker_loads(loads);
        if let Some(m) = &self.prep.model {
            self.metrics.token_cache_bytes.set(m.tokenizer.cache_usage().1 as i64);
        }
        self.metrics.render()
    }
}

/// Why the EPP could not start or keep serving.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Fleet(#[from] FleetFileError),
    #[error(transparent)]
    Kube(#[from] KubeError),
    #[error("DYN_MODEL_PATH: {0}")]
    Model(#[from] LoadError),
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("gRPC server failed: {0}")]
    Grpc(#[from] tonic::transport::Error),
    #[error("gRPC reflection set-up failed: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("metrics server failed: {0}")]
    Metrics(std::io::Error),
    #[error(transparent)]
    Trace(#[from] otel::TraceError),
}

impl StartError {
    /// Configuration problems exit 2 like invalid variables; runtime failures exit 1.
    pub fn exit_code(&self) -> u8 {
        match self {
            StartError::Fleet(_) | StartError::Kube(_) | StartError::Model(_) | StartError::Trace(_) => 2,
            StartError::Tls(tls::TlsError::Read { .. } | tls::TlsError::Invalid { .. }) => 2,
            _ => 1,
        }
    }
}

/// Loads the model files (if configured) once, before serving.
fn preprocessor(cfg: &Config) -> Result<Preprocessor, StartError> {
    let model = match &cfg.model_path {
        None => {
            tracing::warn!("DYN_MODEL_PATH unset: requests are routed without tokens and forwarded unchanged");
            None
        }
        Some(spec) => {
            let dir = hub::model_dir(spec, &cfg.hub_settings())?;
            let m = Model::load(&dir, cfg.token_cache_bytes as usize, cfg.tokenizer)?;
            tracing::info!(path = %dir.display(), chat_template = m.template.is_some(), "model files loaded");
            let s = m.tokenizer.selection();
            if matches!(s.requested, BackendChoice::Fastokens | BackendChoice::Epp) && s.backend.name() != s.requested.name() {
                tracing::warn!(backend = s.backend.name(), requested = s.requested.name(), reason = %s.reason, "tokenizer backend: fell back to HF");
            } else {
                tracing::info!(backend = s.backend.name(), requested = s.requested.name(), reason = %s.reason, "tokenizer backend");
            }
            Some(Arc::new(m))
        }
    };
    Ok(Preprocessor {
        model,
        served_model: cfg.model_name.clone(),
        lora_adapters: cfg.lora_adapters.clone(),
        inject: cfg.inject_tokens,
    })
}

/// With the fast encoder every body goes to the pool's threads, each holding a warm copy of its
/// word table (made before serving): inline on a reactor thread, the first body there would pay
/// that copy (7–18 ms) and every reactor thread would keep one. `epp` keeps no per-thread
/// table to warm: bodies up to [`EPP_INLINE_BYTES`] stay inline, as small ones do with HF.
fn work_pool(cfg: &Config, prep: &Preprocessor) -> WorkPool {
    let timeout = Duration::from_millis(cfg.tokenization_timeout_ms);
    let pool = match &prep.model {
        Some(m) if m.tokenizer.selection().backend == Backend::Fastokens => {
            let m = m.clone();
            WorkPool::with_warm_up(cfg.tokenizer_threads, timeout, FAST_SMALL_BYTES, Arc::new(move || m.tokenizer.warm_thread()))
        }
        Some(m) if m.tokenizer.selection().backend == Backend::Epp => WorkPool::inline_up_to(cfg.tokenizer_threads, timeout, EPP_INLINE_BYTES),
        _ => WorkPool::new(cfg.tokenizer_threads, timeout),
    };
    pool.with_huge_budget(cfg.tokenization_budget_bytes)
}

/// Listen backlog: past the connection bound, clients wait here (the kernel caps it at
/// `net.core.somaxconn`).
const BACKLOG: u32 = 4096;

async fn bind(cfg: &Config, port: u16) -> Result<TcpListener, StartError> {
    let addr = SocketAddr::new(cfg.bind_address, port);
    let listen = || {
        let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        socket.listen(BACKLOG)
    };
    listen().map_err(|source| StartError::Bind { addr, source })
}

/// Lifts the soft open-file limit to the hard one, as Go's runtime does: 1,024 connections
/// plus everything else would not fit the common default soft limit of 1,024.
fn raise_fd_limit() {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            let soft = lim.rlim_cur;
            lim.rlim_cur = lim.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                tracing::warn!(soft, "cannot raise the open-file limit");
            }
        }
    }
}

/// Accepted connections with Nagle off (see `listener::incoming`). (`Server::tcp_nodelay` only
/// applies to listeners tonic binds itself.)
fn incoming(l: TcpListener) -> TcpIncoming {
    TcpIncoming::from(l).with_nodelay(Some(true))
}

/// Resolves once shutdown has been requested and propagated.
fn stopped(rx: &watch::Receiver<bool>) -> impl std::future::Future<Output = ()> + Send + 'static {
    let mut rx = rx.clone();
    async move {
        let _ = rx.wait_for(|stop| *stop).await;
    }
}

/// Runs the EPP until SIGTERM (or Ctrl-C) has been handled and every stream has drained.
pub async fn run(cfg: Config) -> Result<(), StartError> {
    for w in cfg.warnings() {
        tracing::warn!("{w}");
    }
    raise_fd_limit();
    let sched = cfg.sched_settings();
    let mut router = Router::new(cfg.kv_settings(), sched);
    if cfg.replica_sync {
        router.enable_replica_sync();
    }
    let count_output = router.wants_output();
    let window = router.settings().decision_window;
    let prep = preprocessor(&cfg)?;
    let pool = work_pool(&cfg, &prep);
    let mut app = App::new(router, cfg.max_body_bytes, prep, pool);
    app.overload_status = cfg.overload_status;
    app.count_output = count_output;
    app.window = (!window.is_zero()).then(|| group::Window::new(window));
    if let Some(q) = cfg.queue_settings() {
        app.queue = Some(queue::Waitlist::new(q, cfg.queue_max_wait(), cfg.queue_full_status));
        app.metrics.queue.set_depths(cfg.policy_classes.iter().flatten().map(|c| c.name.as_str()).chain(cfg.policy_classes.is_none().then_some("default")), &[]);
    }
    if let Some(t) = cfg.trace_settings() {
        let header_names: Vec<&str> = t.headers.iter().map(|(k, _)| k.as_str()).collect();
        tracing::info!(endpoint = %crate::secret::redact_urls(&t.endpoint), protocol = ?t.protocol, ?header_names, gzip = t.gzip, service = %t.service_name, sampler = ?t.sampler, "exporting traces over OTLP");
        app.tracing = Some(otel::Tracing::start(&t)?);
    }
    if let Some(m) = &app.prep.model {
        app.metrics.set_tokenizer(m.tokenizer.selection());
    }
    let app = Arc::new(app);
    // Certificates are checked before anything starts: a missing pair stops start-up.
    let acceptor: Option<tokio_rustls::TlsAcceptor> = match cfg.secure_serving {
        true => {
            let reloads = app.metrics.certificate_reloads.clone();
            Some(tls::server_config(cfg.cert_path.as_deref(), cfg.client_ca_file.as_deref(), reloads)?.into())
        }
        false => None,
    };
    let (reporter, health_service) = tonic_health::server::health_reporter();
    health::set(&reporter, false).await;

    for (setting, value) in cfg.operator.given() {
        tracing::info!(setting, value = %value, "accepted for the Dynamo operator; ignored");
    }
    kv::start(&cfg, app.clone());
    if app.queue.is_some() {
        // Load also frees without an event of ours (expiry, peers' bookings): look again often.
        let app = app.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            loop {
                tick.tick().await;
                app.dispatch_waiting();
            }
        });
    }
    if cfg.replica_sync {
        replica::start(&cfg, app.clone());
    }
    start_fleet_source(&cfg, &app).await?;

    let grpc = bind(&cfg, cfg.grpc_port).await?;
    let health_listener = bind(&cfg, cfg.health_port).await?;
    let metrics_listener = match cfg.metrics_port {
        0 => None,
        p => Some(bind(&cfg, p).await?),
    };

    let (stop_tx, stop_rx) = watch::channel(false);
    let (draining_tx, draining_rx) = watch::channel(false);

    // Health follows readiness every 500 ms until shutdown starts.
    {
        let (app, reporter, draining) = (app.clone(), reporter.clone(), draining_rx.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(500));
            loop {
                tick.tick().await;
                if *draining.borrow() {
                    break;
                }
                let ready = app.router.lock().is_ready();
                health::set(&reporter, ready).await;
            }
        });
    }

    // SIGTERM → NOT_SERVING → wait for the gateways to notice → stop accepting, drain streams.
    {
        let propagation = cfg.shutdown_propagation();
        let reporter = reporter.clone();
        tokio::spawn(async move {
            shutdown_signal().await;
            tracing::info!(propagation_secs = propagation.as_secs(), "shutdown requested: health NOT_SERVING");
            let _ = draining_tx.send(true);
            health::set(&reporter, false).await;
            tokio::time::sleep(propagation).await;
            tracing::info!("closing listeners and draining open streams");
            let _ = stop_tx.send(true);
        });
    }

    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(EXT_PROC_DESCRIPTOR)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    // The gRPC port also serves the debug API, unless it is switched off.
    let grpc_reflection = || match cfg.debug_api {
        true => reflection().register_encoded_file_descriptor_set(debug::DEBUG_DESCRIPTOR),
        false => reflection(),
    };

    let health_server = Server::builder()
        .add_service(health_service)
        .add_service(reflection().build_v1()?)
        .add_service(reflection().build_v1alpha()?)
        .serve_with_incoming_shutdown(incoming(health_listener), stopped(&stop_rx));
    let health_task = tokio::spawn(health_server);

    let metrics_task = metrics_listener.map(|l| {
        let app = app.clone();
        let router = axum::Router::new().route(
            "/metrics",
            axum::routing::get(move || {
                let app = app.clone();
                async move {
                    ([("content-type", "application/openmetrics-text; version=1.0.0; charset=utf-8")], app.render_metrics())
                }
            }),
        );
        tokio::spawn(axum::serve(l, router).with_graceful_shutdown(stopped(&stop_rx)).into_future())
    });

    let mut builder = Server::builder()
        .initial_stream_window_size(Some(listener::STREAM_WINDOW_BYTES))
        .initial_connection_window_size(Some(listener::CONNECTION_WINDOW_BYTES))
        .max_concurrent_streams(listener::MAX_STREAMS_PER_CONNECTION)
        .http2_max_header_list_size(listener::MAX_HEADER_LIST_BYTES)
        .http2_keepalive_interval(Some(listener::KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(listener::KEEPALIVE_TIMEOUT))
        .http2_max_pending_accept_reset_streams(Some(listener::MAX_PENDING_ACCEPT_RESETS))
        .http2_max_local_error_reset_streams(Some(listener::MAX_LOCAL_ERROR_RESETS));
    let conn_metrics = listener::ConnMetrics { open: app.metrics.connections.clone(), handshake_failures: app.metrics.handshake_failures.clone() };
    // Explain bodies are held to the requests' limit (the slack is the protobuf framing).
    let message_limit = cfg.max_body_bytes as usize + (1 << 20);
    let ext_proc = ExternalProcessorServer::new(ext_proc::ExtProc::new(app.clone()))
        .max_decoding_message_size(message_limit)
        .max_encoding_message_size(usize::MAX);
    let debug = cfg.debug_api.then(|| {
        debug::proto::debug_server::DebugServer::new(debug::DebugService::new(app.clone(), &cfg)).max_decoding_message_size(message_limit)
    });
    tracing::info!(
        grpc = cfg.grpc_port,
        health = cfg.health_port,
        metrics = cfg.metrics_port,
        tls = cfg.secure_serving,
        cert = cfg.cert_path.as_ref().map(|p| p.display().to_string()),
        client_ca = cfg.client_ca_file.as_ref().map(|p| p.display().to_string()),
        debug_api = cfg.debug_api,
        "dynamo-epp serving"
    );
    builder
        .add_service(ext_proc)
        .add_optional_service(debug)
        .add_service(grpc_reflection().build_v1()?)
        .add_service(grpc_reflection().build_v1alpha()?)
        .serve_with_incoming_shutdown(listener::incoming(grpc, acceptor, conn_metrics), stopped(&stop_rx))
        .await?;
    let _ = health_task.await;
    if let Some(t) = metrics_task {
        if let Ok(Err(e)) = t.await {
            return Err(StartError::Metrics(e));
        }
    }
    if let Some(t) = &app.tracing {
        t.shutdown().await;
    }
    tracing::info!("all streams drained; exiting");
    Ok(())
}

/// Starts the one fleet source the configuration picks. Each source hands whole fleets to
/// `App::set_fleet` from its own task; until the first one, health stays NOT_SERVING.
async fn start_fleet_source(cfg: &Config, app: &Arc<App>) -> Result<(), StartError> {
    let apply = {
        let app = app.clone();
        move |fleet| app.set_fleet(fleet)
    };
    if cfg.uses_kubernetes() {
        if let Some(path) = &cfg.workers_file {
            tracing::warn!(path = %path.display(), "DYN_EPP_WORKERS_FILE ignored: discovery is kubernetes");
        }
        let selection = match &cfg.pool_name {
            Some(pool) => Selection::Pool(pool.clone()),
            None => Selection::DynamoNamespace(cfg.worker_namespace().to_string()),
        };
        let namespace = cfg.pool_namespace.clone().or_else(|| cfg.pod_namespace.clone());
        let source = KubeSource::connect(namespace, selection.clone(), Duration::from_secs(cfg.kube_api_timeout_secs)).await?;
        tracing::info!(namespace = source.namespace(), ?selection, "discovering worker pods: NOT_SERVING until the first complete list");
        tokio::spawn(source.run(apply));
        return Ok(());
    }
    if let Some(pool) = &cfg.pool_name {
        tracing::info!(pool = %pool, "pool name ignored: discovery is file");
    }
    let Some(path) = &cfg.workers_file else {
        tracing::warn!("no fleet source (DYN_EPP_WORKERS_FILE unset, not in a cluster): health stays NOT_SERVING");
        return Ok(());
    };
    // A file that exists must be valid now (fail fast on a typo); one that does not
    // exist yet (a volume still being mounted) is waited for with health NOT_SERVING.
    let first = if path.exists() {
        let fleet = workers::file::load(path)?;
        tracing::info!(
            workers = fleet.workers.len(),
            block_size = fleet.block_size.or(cfg.block_size),
            path = %path.display(),
            "fleet loaded"
        );
        app.set_fleet(fleet.clone());
        Some(fleet)
    } else {
        tracing::warn!(path = %path.display(), "workers file does not exist yet: NOT_SERVING until it does");
        None
    };
    tokio::spawn(workers::file::watch(path.clone(), FLEET_POLL, first, apply));
    Ok(())
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("install SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
