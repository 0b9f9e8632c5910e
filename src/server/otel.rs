//! OpenTelemetry traces of ext_proc requests (docs/tracing.md).
//!
//! Off unless an OTLP endpoint is configured: then `App::tracing` is `None`, every stream's
//! [`RequestTrace`] is `None` and the request path pays one `Option` check per phase. On, each
//! request gets a server span continuing the client's W3C `traceparent`, children for its
//! phases (`tokenize`, `queue_wait`, `route`, `first_chunk`), and the worker receives a
//! `traceparent` naming our span as its parent. Spans carry what was decided, never header
//! values or bodies.

use std::{sync::Arc, time::Duration};

use opentelemetry::{
    propagation::{Extractor, Injector, TextMapPropagator},
    trace::{Span as _, SpanKind, Status, TraceContextExt, Tracer as _, TracerProvider as _},
    Context, KeyValue, StringValue,
};
use opentelemetry_http::{hyper::HyperClient, Bytes, HttpClient, HttpError, Request, Response};
use opentelemetry_otlp::{Compression, Protocol, SpanExporter, WithExportConfig, WithHttpConfig, WithTonicConfig};
use opentelemetry_sdk::{
    propagation::TraceContextPropagator,
    resource::TelemetryResourceDetector,
    trace::{BatchConfigBuilder, BatchSpanProcessor, Sampler, SdkTracer, SdkTracerProvider, Span},
    Resource,
};
use tonic::codegen::http::{HeaderMap, HeaderName, HeaderValue};

use crate::{
    config::{OtlpProtocol, TraceSampler},
    router::Decision,
    secret::Secret,
};

/// What `Config::trace_settings` hands the server when export is on.
#[derive(Clone, Debug, PartialEq)]
pub struct TraceSettings {
    pub protocol: OtlpProtocol,
    /// Where spans go, `http://` or `https://` (system roots): the gRPC collector, or the whole
    /// OTLP/HTTP URL (`…/v1/traces`).
    pub endpoint: String,
    /// Sent with every export (a collector's API key): secret values.
    pub headers: Vec<(String, Secret)>,
    /// How long one export may take.
    pub timeout: Duration,
    pub gzip: bool,
    pub service_name: String,
    /// Further resource attributes (`OTEL_RESOURCE_ATTRIBUTES` without `service.name`).
    pub resource: Vec<(String, String)>,
    pub sampler: TraceSampler,
    /// The ratio of the `*traceidratio` samplers.
    pub ratio: f64,
    /// How long finished spans wait to be sent in a batch (`OTEL_BSP_SCHEDULE_DELAY`).
    pub batch_delay: Duration,
    /// `DYN_ROUTER_POLICY`, recorded on every `route` span.
    pub policy: String,
}

/// The process's tracer and exporter.
pub struct Tracing {
    provider: SdkTracerProvider,
    tracer: SdkTracer,
    policy: Arc<str>,
}

/// The exporter could not be built from the settings.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[error("OTLP trace exporter: {0}")]
    Exporter(#[from] opentelemetry_otlp::ExporterBuildError),
    #[error("OTLP trace exporter: the system's root certificates for the https collector: {0}")]
    Roots(std::io::Error),
    /// Names the header, never its value.
    #[error("OTLP trace exporter: header {0:?} is not a valid HTTP header")]
    Header(String),
}

impl Tracing {
    /// Builds the exporter (it connects lazily, so no collector needs to be up yet). Must run
    /// inside the tokio runtime: tonic's channel spawns its worker there and OTLP/HTTP exports
    /// run there.
    pub fn start(s: &TraceSettings) -> Result<Tracing, TraceError> {
        let exporter = match s.protocol {
            OtlpProtocol::Grpc => grpc_exporter(s)?,
            OtlpProtocol::HttpProtobuf => http_exporter(s)?,
        };
        let batch = BatchConfigBuilder::default().with_scheduled_delay(s.batch_delay).build();
        let processor = BatchSpanProcessor::builder(exporter).with_batch_config(batch).build();
        // Only what `Config` says: the SDK's default detectors would read OTEL_SERVICE_NAME and
        // OTEL_RESOURCE_ATTRIBUTES from the environment again, behind a flag's back.
        let resource = Resource::builder_empty()
            .with_detector(Box::new(TelemetryResourceDetector))
            .with_attributes(s.resource.iter().map(|(k, v)| KeyValue::new(k.clone(), v.clone())))
            .with_service_name(s.service_name.clone())
            .build();
        let provider = SdkTracerProvider::builder()
            .with_span_processor(processor)
            .with_sampler(sampler(s.sampler, s.ratio))
            .with_resource(resource)
            .build();
        let tracer = provider.tracer("dynamo-epp");
        Ok(Tracing { provider, tracer, policy: s.policy.as_str().into() })
    }

    /// Starts the server span of one ext_proc request, as a child of the client's
    /// `traceparent` when the request headers carry a valid one.
    pub fn request(&self, headers: &[(String, String)]) -> RequestTrace {
        let client = TraceContextPropagator::new().extract_with_context(&Context::new(), &Headers(headers));
        let path = headers.iter().find(|(k, _)| k == ":path").map(|(_, v)| v.as_str()).unwrap_or("");
        let method = headers.iter().find(|(k, _)| k == ":method").map(|(_, v)| v.as_str()).unwrap_or("");
        // The path without its query: query strings may carry keys.
        let path = path.split('?').next().unwrap_or("").to_string();
        let root = self
            .tracer
            .span_builder("ext_proc")
            .with_kind(SpanKind::Server)
            .with_attributes([KeyValue::new("http.request.method", method.to_string()), KeyValue::new("url.path", path)])
            .start_with_context(&self.tracer, &client);
        RequestTrace { tracer: self.tracer.clone(), root: Context::new().with_span(root), policy: self.policy.clone(), first_chunk: None }
    }

    /// Sends what is still buffered and stops the exporter (off the reactor: the flush blocks).
    pub async fn shutdown(&self) {
        let provider = self.provider.clone();
        if let Ok(Err(e)) = tokio::task::spawn_blocking(move || provider.shutdown_with_timeout(Duration::from_secs(5))).await {
            tracing::warn!(error = %e, "trace exporter shutdown");
        }
    }
}

/// The settings' headers, values marked sensitive (h2 never indexes them, `Debug` hides them).
fn header_map(headers: &[(String, Secret)]) -> Result<HeaderMap, TraceError> {
    let mut map = HeaderMap::with_capacity(headers.len());
    for (k, v) in headers {
        let name = HeaderName::from_bytes(k.as_bytes()).map_err(|_| TraceError::Header(k.clone()))?;
        let mut value = HeaderValue::from_str(v.expose()).map_err(|_| TraceError::Header(k.clone()))?;
        value.set_sensitive(true);
        map.insert(name, value);
    }
    Ok(map)
}

fn grpc_exporter(s: &TraceSettings) -> Result<SpanExporter, TraceError> {
    use opentelemetry_otlp::tonic_types::transport::ClientTlsConfig;
    use tonic::metadata::{KeyAndValueRef, MetadataMap};
    let metadata = MetadataMap::from_headers(header_map(&s.headers)?);
    // Set on each request after the exporter's own metadata: ours replace any it read from
    // the environment itself.
    let set_headers = move |mut req: tonic::Request<()>| {
        for kv in metadata.iter() {
            match kv {
                KeyAndValueRef::Ascii(k, v) => {
                    req.metadata_mut().insert(k, v.clone());
                }
                KeyAndValueRef::Binary(k, v) => {
                    req.metadata_mut().insert_bin(k, v.clone());
                }
            }
        }
        Ok(req)
    };
    let mut exporter = SpanExporter::builder().with_tonic().with_endpoint(s.endpoint.clone()).with_timeout(s.timeout).with_interceptor(set_headers);
    if s.gzip {
        exporter = exporter.with_compression(Compression::Gzip);
    }
    if s.endpoint.starts_with("https://") {
        exporter = exporter.with_tls_config(ClientTlsConfig::new().with_native_roots());
    }
    Ok(exporter.build()?)
}

fn http_exporter(s: &TraceSettings) -> Result<SpanExporter, TraceError> {
    let client: Arc<dyn HttpClient> = if s.endpoint.starts_with("https://") {
        let tls = hyper_rustls::HttpsConnectorBuilder::new()
            .with_provider_and_native_roots(rustls::crypto::ring::default_provider())
            .map_err(TraceError::Roots)?
            .https_only()
            .enable_http1()
            .build();
        Arc::new(HyperClient::new(tls, s.timeout, None))
    } else {
        Arc::new(HyperClient::new(hyper_util::client::legacy::connect::HttpConnector::new(), s.timeout, None))
    };
    let client = OnRuntime { client, runtime: tokio::runtime::Handle::current(), headers: header_map(&s.headers)? };
    let mut exporter = SpanExporter::builder()
        .with_http()
        .with_protocol(Protocol::HttpBinary)
        .with_endpoint(s.endpoint.clone())
        .with_timeout(s.timeout)
        .with_http_client(client);
    if s.gzip {
        exporter = exporter.with_compression(Compression::Gzip);
    }
    Ok(exporter.build()?)
}

/// The OTLP/HTTP client: hyper-util's, run on our tokio runtime (the batch span processor
/// exports from its own thread, where hyper could not spawn its connections), setting the
/// configured headers on every request.
#[derive(Debug)]
struct OnRuntime {
    client: Arc<dyn HttpClient>,
    runtime: tokio::runtime::Handle,
    headers: HeaderMap,
}

#[async_trait::async_trait]
impl HttpClient for OnRuntime {
    async fn send_bytes(&self, mut request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
        // Ours win over any the exporter read from the environment itself.
        for (k, v) in &self.headers {
            request.headers_mut().insert(k, v.clone());
        }
        let client = self.client.clone();
        self.runtime.spawn(async move { client.send_bytes(request).await }).await?
    }
}

fn sampler(s: TraceSampler, ratio: f64) -> Sampler {
    match s {
        TraceSampler::AlwaysOn => Sampler::AlwaysOn,
        TraceSampler::AlwaysOff => Sampler::AlwaysOff,
        TraceSampler::Traceidratio => Sampler::TraceIdRatioBased(ratio),
        TraceSampler::ParentbasedAlwaysOn => Sampler::ParentBased(Box::new(Sampler::AlwaysOn)),
        TraceSampler::ParentbasedAlwaysOff => Sampler::ParentBased(Box::new(Sampler::AlwaysOff)),
        TraceSampler::ParentbasedTraceidratio => Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(ratio))),
    }
}

/// Request headers as the propagator reads them (names are lower case already).
struct Headers<'a>(&'a [(String, String)]);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.iter().map(|(k, _)| k.as_str()).collect()
    }
}

/// The headers the worker receives: our `traceparent` (and the client's `tracestate`).
struct Outgoing(Vec<(&'static str, String)>);

impl Injector for Outgoing {
    fn set(&mut self, key: &str, value: String) {
        // The propagator writes an empty `tracestate` when the client sent none: not forwarded.
        match key {
            "traceparent" => self.0.push(("traceparent", value)),
            "tracestate" if !value.is_empty() => self.0.push(("tracestate", value)),
            _ => {}
        }
    }
}

/// One request's spans. Dropping it ends whatever is still open (client cancel, gateway reset).
pub struct RequestTrace {
    tracer: SdkTracer,
    /// Holds the server span; children are started under it.
    root: Context,
    policy: Arc<str>,
    /// From the forwarded request to its first non-empty response chunk.
    first_chunk: Option<Span>,
}

impl RequestTrace {
    fn child(&self, name: &'static str) -> Span {
        self.tracer.span_builder(name).with_kind(SpanKind::Internal).start_with_context(&self.tracer, &self.root)
    }

    /// Checking, tokenizing and rewriting the body (waiting for a work-pool slot included).
    pub fn tokenize(&self) -> Span {
        self.child("tokenize")
    }

    /// The router queue's wait, inside the `route` span whose decision it delays: started
    /// when the request is queued, ended (dropped) when it is dispatched or leaves the queue
    /// (`epp.queue.outcome` set then if it did not dispatch).
    pub fn queue_wait(&self, route: &Span) -> Span {
        let parent = self.root.with_remote_span_context(route.span_context().clone());
        self.tracer.span_builder("queue_wait").with_kind(SpanKind::Internal).start_with_context(&self.tracer, &parent)
    }

    /// The routing decision; [`RequestTrace::decided`] records its result.
    pub fn route(&self) -> Span {
        let mut s = self.child("route");
        s.set_attribute(KeyValue::new("epp.policy", StringValue::from(self.policy.clone())));
        s
    }

    /// `traceparent` (and `tracestate`) for the worker, naming our server span as the parent.
    pub fn outgoing_headers(&self) -> Vec<(&'static str, String)> {
        let mut out = Outgoing(Vec::with_capacity(2));
        TraceContextPropagator::new().inject_context(&self.root, &mut out);
        out.0
    }

    /// The request went to a worker: time to its first response chunk starts now.
    pub fn forwarded(&mut self) {
        self.first_chunk = Some(self.child("first_chunk"));
    }

    /// The first non-empty response chunk arrived.
    pub fn first_chunk(&mut self) {
        if let Some(mut s) = self.first_chunk.take() {
            s.end();
        }
    }

    /// How the request ended for us: `routed`, `passthrough`, or an error code with its status.
    pub fn outcome(&self, outcome: &'static str, rejected_with: Option<u16>) {
        let span = self.root.span();
        span.set_attribute(KeyValue::new("epp.outcome", outcome));
        if let Some(status) = rejected_with {
            span.set_attribute(KeyValue::new("http.response.status_code", i64::from(status)));
            span.set_status(Status::error(outcome));
        }
    }

    /// Ends the server span (and a `first_chunk` still open).
    pub fn end(&mut self) {
        self.first_chunk = None;
        self.root.span().end();
    }
}

/// Records the decision on its `route` span and ends it.
pub fn decided(mut span: Span, d: &Decision) {
    span.set_attributes([
        KeyValue::new("epp.worker.id", d.decode.worker.id.to_string()),
        KeyValue::new("epp.worker.dp_rank", i64::from(d.decode.worker.dp_rank.0)),
        KeyValue::new("epp.worker.endpoint", d.decode.endpoint.to_string()),
        KeyValue::new("epp.routing_mode", d.mode.as_str()),
        KeyValue::new("epp.predicted_cached_tokens", d.predicted_cached_tokens as i64),
    ]);
    if let Some(p) = &d.prefill {
        span.set_attributes([
            KeyValue::new("epp.prefill.worker.id", p.worker.id.to_string()),
            KeyValue::new("epp.prefill.dp_rank", i64::from(p.worker.dp_rank.0)),
        ]);
    }
    span.end();
}

/// Ends the `tokenize` span of a prompt of `tokens` ids.
pub fn tokenized(mut span: Span, tokens: usize) {
    span.set_attribute(KeyValue::new("epp.prompt_tokens", tokens as i64));
    span.end();
}

/// Marks a `queue_wait` span whose request left the queue without being dispatched
/// (`timeout`, `disconnected`); it ends when dropped.
pub fn left_queue(span: &mut Span, outcome: &'static str) {
    span.set_attribute(KeyValue::new("epp.queue.outcome", outcome));
}

/// Ends a phase span that failed, naming the error code.
pub fn failed(mut span: Span, code: &'static str) {
    span.set_attribute(KeyValue::new("error.type", code));
    span.set_status(Status::error(code));
    span.end();
}
