//! OpenTelemetry traces from the real binary behind the real Envoy, received by collectors built
//! here on the official protobuf definitions (`opentelemetry-proto`): OTLP/gRPC on their tonic
//! service, OTLP/HTTP on a small axum (hyper) server decoding the same messages with prost.
//! Expected ids come from the client's `traceparent` and the workers file, expected prompt
//! lengths from the golden corpus (Python `transformers`), header and attribute values from the
//! variables as written here, decoded by hand.

mod common;

use std::{
    io::Read,
    sync::Arc,
    time::{Duration, Instant},
};

use axum::{
    body::Bytes,
    extract::State,
    http::{header::CONTENT_TYPE, HeaderMap, StatusCode, Uri},
};
use common::*;
use dynamo_epp::{
    config::Config,
    server::{
        debug::proto::{debug_client::DebugClient, ConfigRequest},
        otel::{TraceSettings, Tracing},
    },
};
use opentelemetry_proto::tonic::{
    collector::trace::v1::{
        trace_service_server::{TraceService, TraceServiceServer},
        ExportTraceServiceRequest, ExportTraceServiceResponse,
    },
    common::v1::{any_value::Value as Any, KeyValue},
    trace::v1::{span::SpanKind, status::StatusCode as SpanStatus, Span},
};
use parking_lot::Mutex;
use prost::Message;

/// How spans travel to the collector (`OTEL_EXPORTER_OTLP_PROTOCOL`).
#[derive(Clone, Copy, Debug, PartialEq)]
enum Transport {
    Grpc,
    HttpProtobuf,
}

/// One export request, whole, as the collector received it.
struct Export {
    request: ExportTraceServiceRequest,
    /// The HTTP request's headers (over gRPC: its metadata).
    headers: HeaderMap,
    /// The request path (OTLP/HTTP only; gRPC's is the service's).
    path: Option<String>,
}

/// Every export received.
#[derive(Clone, Default)]
struct Collector {
    got: Arc<Mutex<Vec<Export>>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(&self, r: tonic::Request<ExportTraceServiceRequest>) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let headers = r.metadata().clone().into_headers();
        self.got.lock().push(Export { request: r.into_inner(), headers, path: None });
        Ok(tonic::Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

/// The OTLP/HTTP receiver on any path: a protobuf `ExportTraceServiceRequest`, gzipped when
/// the request says so; answers with a protobuf `ExportTraceServiceResponse`.
async fn http_export(State(c): State<Collector>, uri: Uri, headers: HeaderMap, body: Bytes) -> Result<([(axum::http::HeaderName, &'static str); 1], Vec<u8>), StatusCode> {
    let mut raw = body.to_vec();
    if headers.get("content-encoding").is_some_and(|v| v == "gzip") {
        raw.clear();
        flate2::read::GzDecoder::new(&body[..]).read_to_end(&mut raw).map_err(|_| StatusCode::BAD_REQUEST)?;
    }
    let request = ExportTraceServiceRequest::decode(raw.as_slice()).map_err(|_| StatusCode::BAD_REQUEST)?;
    c.got.lock().push(Export { request, headers, path: Some(uri.path().to_string()) });
    Ok(([(CONTENT_TYPE, "application/x-protobuf")], ExportTraceServiceResponse { partial_success: None }.encode_to_vec()))
}

impl Collector {
    /// A collector on a free loopback port; returns it and its `http://` address.
    async fn start(transport: Transport) -> (Collector, String) {
        let c = Collector::default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        match transport {
            Transport::Grpc => {
                let svc = TraceServiceServer::new(c.clone()).accept_compressed(tonic::codec::CompressionEncoding::Gzip);
                tokio::spawn(tonic::transport::Server::builder().add_service(svc).serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)));
            }
            Transport::HttpProtobuf => {
                let app = axum::Router::new().fallback(http_export).with_state(c.clone());
                tokio::spawn(async move { axum::serve(listener, app).await });
            }
        }
        (c, url)
    }

    fn spans(&self) -> Vec<Span> {
        let got = self.got.lock();
        got.iter().flat_map(|e| &e.request.resource_spans).flat_map(|rs| &rs.scope_spans).flat_map(|ss| ss.spans.clone()).collect()
    }

    /// The value of resource attribute `key` of every resource that sent spans.
    fn resource_attr(&self, key: &str) -> Vec<Option<String>> {
        let got = self.got.lock();
        got.iter().flat_map(|e| &e.request.resource_spans).map(|rs| attr(&rs.resource.as_ref()?.attributes, key)).collect()
    }

    /// Waits (bounded) until `n` spans of `trace_id` arrived.
    async fn wait_trace(&self, trace_id: &[u8], n: usize) -> Vec<Span> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let spans: Vec<Span> = self.spans().into_iter().filter(|s| s.trace_id == trace_id).collect();
            if spans.len() >= n {
                return spans;
            }
            assert!(Instant::now() < deadline, "only {} of {n} spans of trace {} arrived: {spans:#?}", spans.len(), hex(trace_id));
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Trace settings through the real `Config`, as the binary gets them.
fn trace_settings(args: &[&str]) -> TraceSettings {
    Config::from_args(std::iter::once("dynamo-epp").chain(args.iter().copied())).unwrap().trace_settings().expect("export on")
}

fn attr(attrs: &[KeyValue], key: &str) -> Option<String> {
    let v = attrs.iter().find(|kv| kv.key == key)?.value.as_ref()?.value.as_ref()?;
    Some(match v {
        Any::StringValue(s) => s.clone(),
        Any::IntValue(i) => i.to_string(),
        Any::BoolValue(b) => b.to_string(),
        Any::DoubleValue(d) => d.to_string(),
        other => format!("{other:?}"),
    })
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
}

fn named<'a>(spans: &'a [Span], name: &str) -> &'a Span {
    let found: Vec<&Span> = spans.iter().filter(|s| s.name == name).collect();
    assert_eq!(found.len(), 1, "one {name} span expected: {spans:#?}");
    found[0]
}

const CLIENT_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CLIENT_SPAN: &str = "00f067aa0ba902b7";
const SECRET: &str = "sk-SECRET-never-in-a-span";
const WORKER_ID: u64 = 4242;

fn epp_env(extra: &[(&str, &str)]) -> EppOptions {
    let mut env = vec![
        ("DYN_MODEL_PATH".to_string(), tokenizer_fixtures().join("qwen3").display().to_string()),
        ("DYN_MODEL_NAME".to_string(), "m".to_string()),
    ];
    env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    EppOptions { env, ..Default::default() }
}

async fn post(chain: &Chain, body: &str, headers: &[(&str, &str)]) -> (u16, String) {
    let mut req = chain.client.post(chain.envoy.url("/v1/chat/completions?api-key=QUERYSECRET")).body(body.to_string());
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let r = req.send().await.unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

/// The collector's credential, percent-encoded in OTEL_EXPORTER_OTLP_HEADERS as an operator writes it.
const COLLECTOR_KEY: &str = "COLLECTOR-S3CRET/key==";
const COLLECTOR_KEY_ENCODED: &str = "COLLECTOR-S3CRET%2Fkey%3D%3D";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn spans_continue_the_clients_trace_and_the_worker_continues_ours_over_grpc() {
    spans_continue_the_clients_trace_and_the_worker_continues_ours(Transport::Grpc).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn spans_continue_the_clients_trace_and_the_worker_continues_ours_over_http() {
    spans_continue_the_clients_trace_and_the_worker_continues_ours(Transport::HttpProtobuf).await;
}

/// One request chain, checked the same way whichever transport carries the spans; then what the
/// exports themselves carry (headers, resource, OTLP/HTTP's path and content type), and that the
/// collector's credential is in no log line and not in the Config RPC.
async fn spans_continue_the_clients_trace_and_the_worker_continues_ours(transport: Transport) {
    let (collector, url) = Collector::start(transport).await;
    let headers = format!("x-collector-key={COLLECTOR_KEY_ENCODED}, x-scope = epp%20test");
    let mut env = vec![
        ("OTEL_SERVICE_NAME", "epp-under-test"),
        ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ("OTEL_EXPORTER_OTLP_HEADERS", headers.as_str()),
        ("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=ci%20run,service.name=overridden"),
        ("RUST_LOG", "debug"),
    ];
    match transport {
        // The traces endpoint is used as it is.
        Transport::Grpc => env.push(("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", &url)),
        // The general endpoint is a base URL: spans go to `<it>/v1/traces`.
        Transport::HttpProtobuf => env.extend([("OTEL_EXPORTER_OTLP_ENDPOINT", url.as_str()), ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")]),
    }
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("epp.log");
    let chain = Chain::start(&[("w0", Some(WORKER_ID))], EppOptions { log: Some(log.clone()), ..epp_env(&env) }).await;
    let case = golden_case("hello");
    let prompt_ids = case["expected"]["qwen3"]["ids"].as_array().unwrap().len();
    let client_parent = format!("00-{CLIENT_TRACE}-{CLIENT_SPAN}-01");

    // 1. A streamed request inside the client's trace, with a credential the spans must not show.
    let (status, text) = post(
        &chain,
        golden_body(case),
        &[("traceparent", &client_parent), ("tracestate", "vendor=abc"), ("authorization", &format!("Bearer {SECRET}")), ("x-mock-mode", "sse")],
    )
    .await;
    assert_eq!(status, 200, "{text}");
    assert!(text.contains("[DONE]"), "{text}");

    let trace = unhex(CLIENT_TRACE);
    let spans = collector.wait_trace(&trace, 4).await;
    let root = named(&spans, "ext_proc");
    assert_eq!((hex(&root.parent_span_id), root.kind), (CLIENT_SPAN.to_string(), SpanKind::Server as i32), "{root:#?}");
    assert_eq!(attr(&root.attributes, "url.path").as_deref(), Some("/v1/chat/completions"));
    assert_eq!(attr(&root.attributes, "http.request.method").as_deref(), Some("POST"));
    assert_eq!(attr(&root.attributes, "epp.outcome").as_deref(), Some("routed"));
    for name in ["tokenize", "route", "first_chunk"] {
        let s = named(&spans, name);
        assert_eq!(s.parent_span_id, root.span_id, "{name} must be a child of the server span: {s:#?}");
        assert!(root.start_time_unix_nano <= s.start_time_unix_nano && s.end_time_unix_nano <= root.end_time_unix_nano, "{name} outside the request: {spans:#?}");
    }
    let (tokenize, route, first) = (named(&spans, "tokenize"), named(&spans, "route"), named(&spans, "first_chunk"));
    // The phases follow each other: tokenize, decide, then wait for the worker's first chunk.
    assert!(tokenize.end_time_unix_nano <= route.start_time_unix_nano && route.end_time_unix_nano <= first.start_time_unix_nano, "{spans:#?}");
    assert_eq!(attr(&tokenize.attributes, "epp.prompt_tokens"), Some(prompt_ids.to_string()));
    assert_eq!(attr(&route.attributes, "epp.worker.id"), Some(WORKER_ID.to_string()));
    assert_eq!(attr(&route.attributes, "epp.worker.dp_rank").as_deref(), Some("0"));
    assert_eq!(attr(&route.attributes, "epp.worker.endpoint"), Some(chain.workers[0].addr.to_string()));
    assert_eq!(attr(&route.attributes, "epp.policy").as_deref(), Some("cost"));
    assert_eq!(attr(&route.attributes, "epp.routing_mode").as_deref(), Some("aggregated"));
    // Nothing cached yet (no KV events, first request).
    assert_eq!(attr(&route.attributes, "epp.predicted_cached_tokens").as_deref(), Some("0"));

    // The worker was told to continue our trace, under our server span.
    let seen = chain.workers[0].seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].headers.get("traceparent"), Some(&format!("00-{CLIENT_TRACE}-{}-01", hex(&root.span_id))));
    assert_eq!(seen[0].headers.get("tracestate").map(String::as_str), Some("vendor=abc"));

    // 2. No client trace: a new one, rooted at our span, forwarded the same way.
    let (status, _) = post(&chain, golden_body(case), &[]).await;
    assert_eq!(status, 200);
    let second = &chain.workers[0].seen()[1];
    assert_eq!(second.headers.get("tracestate"), None, "no tracestate is made up");
    let forwarded = second.headers.get("traceparent").cloned().expect("traceparent to the worker");
    let parts: Vec<&str> = forwarded.split('-').collect();
    assert_eq!((parts.len(), parts[0], parts[3]), (4, "00", "01"), "{forwarded}");
    assert_ne!(parts[1], CLIENT_TRACE);
    let spans = collector.wait_trace(&unhex(parts[1]), 4).await;
    let root = named(&spans, "ext_proc");
    assert!(root.parent_span_id.is_empty(), "{root:#?}");
    assert_eq!(hex(&root.span_id), parts[2]);

    // 3. A rejected body: the server span says so, the tokenize span names the error, no worker.
    let rejected_trace = "0af7651916cd43dd8448eb211c80319c";
    let (status, _) = post(&chain, r#"{"model": "m", "messages": "not a list"}"#, &[("traceparent", &format!("00-{rejected_trace}-b7ad6b7169203331-01"))]).await;
    assert_eq!(status, 400);
    let spans = collector.wait_trace(&unhex(rejected_trace), 2).await;
    let root = named(&spans, "ext_proc");
    assert_eq!(attr(&root.attributes, "http.response.status_code").as_deref(), Some("400"));
    assert_eq!(root.status.as_ref().map(|s| s.code), Some(SpanStatus::Error as i32), "{root:#?}");
    let tokenize = named(&spans, "tokenize");
    assert_eq!(tokenize.status.as_ref().map(|s| s.code), Some(SpanStatus::Error as i32), "{tokenize:#?}");
    assert!(spans.iter().all(|s| s.name != "route" && s.name != "first_chunk"), "{spans:#?}");
    assert_eq!(chain.workers[0].seen().len(), 2);

    // Every span came from our service (OTEL_SERVICE_NAME wins over the service.name in
    // OTEL_RESOURCE_ATTRIBUTES) with the other resource attribute, and none shows a header value
    // or the query string.
    let names = collector.resource_attr("service.name");
    assert!(!names.is_empty() && names.iter().all(|n| n.as_deref() == Some("epp-under-test")), "{names:?}");
    assert!(collector.resource_attr("deployment.environment").iter().all(|v| v.as_deref() == Some("ci run")));
    let everything = format!("{:?}", collector.spans());
    assert!(!everything.contains(SECRET) && !everything.contains("QUERYSECRET") && !everything.contains("authorization"), "{everything}");

    // Every export carried the configured headers, percent-decoded; over HTTP as protobuf to /v1/traces.
    for e in collector.got.lock().iter() {
        // Once each: the exporter also reads the variable itself, ours replace its values.
        let values = |k: &str| e.headers.get_all(k).iter().map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned()).collect::<Vec<_>>();
        assert_eq!(values("x-collector-key"), [COLLECTOR_KEY], "{transport:?}");
        assert_eq!(values("x-scope"), ["epp test"], "{transport:?}");
        if transport == Transport::HttpProtobuf {
            assert_eq!(e.path.as_deref(), Some("/v1/traces"));
            assert_eq!(e.headers.get(CONTENT_TYPE).map(|v| v.as_bytes()), Some(&b"application/x-protobuf"[..]));
        }
    }

    // The credential is neither in the Config RPC nor in the output (at debug level).
    let channel = tonic::transport::Channel::from_shared(format!("http://127.0.0.1:{}", chain.epp.grpc_port)).unwrap().connect().await.unwrap();
    let config = format!("{:?}", DebugClient::new(channel).config(ConfigRequest {}).await.unwrap().into_inner().config.unwrap());
    assert!(config.contains("otlp_headers") && config.contains("<redacted>"), "the headers are set but hidden: {config}");
    let output = std::fs::read_to_string(&log).unwrap();
    assert!(output.contains("exporting traces over OTLP"), "{output}");
    for shown in [&config, &output] {
        assert!(!shown.contains("S3CRET") && !shown.contains(COLLECTOR_KEY_ENCODED), "{transport:?}: the collector's key is shown:\n{shown}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn export_off_sends_nothing_and_leaves_traceparent_alone() {
    let (collector, endpoint) = Collector::start(Transport::Grpc).await;
    // Off by default (no OTEL variable), and off by OTEL_SDK_DISABLED despite an endpoint.
    for env in [vec![], vec![("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()), ("OTEL_SDK_DISABLED", "true"), ("OTEL_BSP_SCHEDULE_DELAY", "100")]] {
        let mut chain = Chain::start(&[("w0", None)], epp_env(&env)).await;
        let client_parent = format!("00-{CLIENT_TRACE}-{CLIENT_SPAN}-01");
        let (status, _) = post(&chain, golden_body(golden_case("hello")), &[("traceparent", &client_parent)]).await;
        assert_eq!(status, 200);
        let (status, _) = post(&chain, golden_body(golden_case("hello")), &[]).await;
        assert_eq!(status, 200);
        let seen = chain.workers[0].seen();
        // The client's own header passes through untouched; none is made up.
        assert_eq!(seen[0].headers.get("traceparent"), Some(&client_parent), "{env:?}");
        assert_eq!(seen[1].headers.get("traceparent"), None, "{env:?}");
        // A graceful exit flushes whatever an exporter holds: after it, nothing may have come.
        let pid = chain.epp.pid();
        // SAFETY: signalling our own child process.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
        let exit = tokio::time::timeout(Duration::from_secs(30), chain.epp.child.wait()).await.expect("EPP exits on SIGTERM").unwrap();
        assert!(exit.success(), "{exit:?}");
        assert_eq!(collector.got.lock().len(), 0, "{env:?}: spans exported with export off");
    }
}

/// The queue's hook (`RequestTrace::queue_wait`) nests under the request's `route` span, and a client
/// that did not sample gets nothing recorded but still a `traceparent` (unsampled) forwarded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_wait_hook_nests_under_the_request_and_unsampled_clients_stay_unsampled() {
    let (collector, url) = Collector::start(Transport::Grpc).await;
    let tracing = Tracing::start(&trace_settings(&["--otel-exporter-otlp-traces-endpoint", &url, "--otel-service-name", "hook", "--otel-bsp-schedule-delay", "100"])).unwrap();
    let headers = |flags: &str| vec![(":path".to_string(), "/v1/completions".to_string()), ("traceparent".to_string(), format!("00-{CLIENT_TRACE}-{CLIENT_SPAN}-{flags}"))];

    let unsampled_trace = "11111111111111111111111111111111";
    let mut unsampled = tracing.request(&[(":path".to_string(), "/v1/completions".to_string()), ("traceparent".to_string(), format!("00-{unsampled_trace}-{CLIENT_SPAN}-00"))]);
    let out = unsampled.outgoing_headers();
    assert_eq!(out.len(), 1, "{out:?}");
    assert!(out[0].0 == "traceparent" && out[0].1.starts_with(&format!("00-{unsampled_trace}-")) && out[0].1.ends_with("-00"), "{out:?}");
    let route = unsampled.route();
    drop(unsampled.queue_wait(&route));
    drop(route);
    unsampled.end();

    let mut req = tracing.request(&headers("01"));
    let route = req.route();
    drop(req.queue_wait(&route));
    drop(route);
    req.end();
    // Shutdown flushes: after it every recorded span has arrived.
    tracing.shutdown().await;
    let spans = collector.wait_trace(&unhex(CLIENT_TRACE), 3).await;
    let root = named(&spans, "ext_proc");
    assert_eq!(hex(&root.parent_span_id), CLIENT_SPAN);
    let route = named(&spans, "route");
    assert_eq!(route.parent_span_id, root.span_id);
    assert_eq!(named(&spans, "queue_wait").parent_span_id, route.span_id);
    assert!(collector.spans().iter().all(|s| s.trace_id != unhex(unsampled_trace)), "an unsampled trace was recorded");
}

/// The settings as flags, with no OTEL variable in the environment (so the exporter cannot have
/// read them itself): over both transports every export carries the headers and the resource
/// attribute, gzipped (gRPC's `grpc-encoding`, HTTP's `content-encoding`) bodies that decode to
/// the recorded span.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flag_settings_reach_every_export_over_both_transports() {
    assert!(std::env::vars().all(|(k, _)| !k.starts_with("OTEL_")), "the test's environment sets OTEL variables");
    for (transport, protocol, encoding) in [(Transport::Grpc, "grpc", "grpc-encoding"), (Transport::HttpProtobuf, "http/protobuf", "content-encoding")] {
        let (collector, url) = Collector::start(transport).await;
        let args = [
            &["--otel-exporter-otlp-endpoint", &url, "--otel-exporter-otlp-protocol", protocol, "--otel-exporter-otlp-compression", "gzip"][..],
            &["--otel-exporter-otlp-traces-headers", "x-collector-key=flag%2Dkey", "--otel-resource-attributes", "k8s.pod.name=epp-0", "--otel-bsp-schedule-delay", "100"],
        ]
        .concat();
        let tracing = Tracing::start(&trace_settings(&args)).unwrap();
        let mut req = tracing.request(&[("traceparent".to_string(), format!("00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"))]);
        req.end();
        tracing.shutdown().await;
        let spans = collector.wait_trace(&unhex(CLIENT_TRACE), 1).await;
        assert_eq!(named(&spans, "ext_proc").parent_span_id, unhex(CLIENT_SPAN), "{transport:?}");
        assert_eq!(collector.resource_attr("k8s.pod.name"), vec![Some("epp-0".to_string())], "{transport:?}");
        for e in collector.got.lock().iter() {
            assert_eq!(e.headers.get(encoding).map(|v| v.as_bytes()), Some(&b"gzip"[..]), "{transport:?}");
            assert_eq!(e.headers.get("x-collector-key").map(|v| v.as_bytes()), Some(&b"flag-key"[..]), "{transport:?}");
        }
    }
}

/// With the router queue on, behind the real Envoy: a request that waits for a busy worker
/// shows its wait as `queue_wait` inside its `route` span (client span → `ext_proc` → `route`
/// → `queue_wait`), lasting at least as long as the worker was held; one that did not wait has
/// none.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_queued_request_shows_its_wait_inside_its_decision() {
    let (collector, url) = Collector::start(Transport::Grpc).await;
    let worker = MockWorker::start("a").await;
    // Budget 1 token and threshold 0: a request in prefill saturates the worker.
    let yaml = format!("block_size: 16\nworkers:\n  - name: a\n    address: {}\n    id: {WORKER_ID}\n    max_num_batched_tokens: 1\n", worker.addr);
    let mut opts = epp_env(&[
        ("DYN_ROUTER_QUEUE_THRESHOLD", "0"),
        ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", &url),
        ("OTEL_BSP_SCHEDULE_DELAY", "100"),
    ]);
    opts.env.retain(|(k, _)| k != "DYN_MODEL_NAME");
    opts.env.push(("DYN_MODEL_NAME".into(), "qwen".into()));
    let epp = Epp::start(&yaml, opts).await;
    let envoy = Envoy::start(Some(&EppLink { port: epp.grpc_port, tls: false })).await;
    let client = reqwest::Client::new();
    let send = |trace: &str, hold: bool| {
        let mut rb = client.post(envoy.url("/v1/chat/completions")).body(chat_body(trace)).header("traceparent", format!("00-{trace}-{CLIENT_SPAN}-01"));
        if hold {
            rb = rb.header("x-mock-mode", "hold");
        }
        tokio::spawn(async move { rb.send().await.unwrap() })
    };
    let (first, queued) = ("aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb");
    let blocker = send(first, true);
    let deadline = Instant::now() + Duration::from_secs(60);
    while worker.seen().is_empty() {
        assert!(Instant::now() < deadline, "the first request never reached the worker");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let waiter = send(queued, false);
    let queued_depth = || async { epp.metrics().await.lines().filter(|l| l.starts_with("dynamo_epp_queue_depth{")).filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok()).sum::<f64>() };
    while queued_depth().await != 1.0 {
        assert!(Instant::now() < deadline, "the second request was never queued");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let held = Instant::now();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(worker.seen().len(), 1, "the queued request must wait for the worker");
    worker.release(1);
    let held = held.elapsed();
    assert_eq!(blocker.await.unwrap().status(), 200);
    assert_eq!(waiter.await.unwrap().status(), 200);

    let spans = collector.wait_trace(&unhex(queued), 5).await;
    let root = named(&spans, "ext_proc");
    assert_eq!(hex(&root.parent_span_id), CLIENT_SPAN, "{root:#?}");
    let route = named(&spans, "route");
    assert_eq!(route.parent_span_id, root.span_id, "{spans:#?}");
    let wait = named(&spans, "queue_wait");
    assert_eq!(wait.parent_span_id, route.span_id, "queue_wait must be a child of route: {spans:#?}");
    assert!(route.start_time_unix_nano <= wait.start_time_unix_nano && wait.end_time_unix_nano <= route.end_time_unix_nano, "{spans:#?}");
    assert!(named(&spans, "tokenize").end_time_unix_nano <= wait.start_time_unix_nano, "{spans:#?}");
    assert!(wait.end_time_unix_nano <= named(&spans, "first_chunk").start_time_unix_nano, "{spans:#?}");
    let waited = Duration::from_nanos(wait.end_time_unix_nano - wait.start_time_unix_nano);
    assert!(waited >= held, "waited {waited:?}, held {held:?}");
    assert_eq!(attr(&wait.attributes, "epp.queue.outcome"), None, "dispatched: {wait:#?}");
    assert_eq!(attr(&route.attributes, "epp.worker.id"), Some(WORKER_ID.to_string()));
    // The request that found the worker free did not wait.
    let spans = collector.wait_trace(&unhex(first), 4).await;
    assert!(spans.iter().all(|s| s.name != "queue_wait"), "{spans:#?}");
}
