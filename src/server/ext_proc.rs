//! One Envoy ext_proc stream = one HTTP request = one small state machine.
//!
//! Request side: hold the headers response until the body's end of stream, then send the
//! routing headers followed by the body in streamed chunks. Response side: pass everything
//! through, telling the router about the first non-empty chunk and the end.

use std::{
    pin::Pin,
    sync::Arc,
    time::Instant,
};

use envoy_types::pb::envoy::{
    extensions::filters::http::ext_proc::v3::processing_mode::BodySendMode,
    service::ext_proc::v3::{
        external_processor_server::ExternalProcessor, processing_request::Request, HttpBody, HttpHeaders,
        ProcessingRequest, ProcessingResponse,
    },
};
use futures_util::Stream;
use tokio::sync::mpsc;
use tokio_stream::{wrappers::ReceiverStream, StreamExt};
use tonic::{Status, Streaming};

use super::{envoy, error::EppError, group, metrics::RankLabel, otel::{self, RequestTrace}, queue, sse::ResponseScan, App};
use crate::{
    request::{openai::{AgentHints, Api}, Prepared},
    router::{BookingId, Decision, EndpointMatch, RoutingRequest},
    sched::queue::{Arrival, Priority},
};

type Sent = Result<ProcessingResponse, Status>;

/// The ext_proc gRPC service.
#[derive(Clone)]
pub struct ExtProc {
    app: Arc<App>,
}

impl ExtProc {
    pub fn new(app: Arc<App>) -> Self {
        ExtProc { app }
    }
}

#[tonic::async_trait]
impl ExternalProcessor for ExtProc {
    type ProcessStream = Pin<Box<dyn Stream<Item = Sent> + Send + 'static>>;

    async fn process(
        &self,
        request: tonic::Request<Streaming<ProcessingRequest>>,
    ) -> Result<tonic::Response<Self::ProcessStream>, Status> {
        let inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(32);
        let mut s = StreamState::new(self.app.clone(), tx);
        // The state machine runs inside the response stream, so the server's own per-stream
        // task drives both directions: no task of ours and no cross-task wake-up per message
        // (measured: a spawned task cost ~3 extra thread wake-ups per request). A gateway reset
        // drops the response stream and, with it, the state (its Drop releases the booking).
        let driver = futures_util::stream::once(async move { s.run(inbound).await }).filter_map(|()| None);
        Ok(tonic::Response::new(Box::pin(ReceiverStream::new(rx).merge(driver))))
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Waiting for request headers.
    Start,
    /// Headers kept; buffering the body until its end of stream.
    Body,
    /// The request was forwarded (or answered); only response traffic follows.
    Forwarded,
}

struct StreamState {
    app: Arc<App>,
    tx: mpsc::Sender<Sent>,
    phase: Phase,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    subset: Option<Vec<String>>,
    /// Whether response bodies must be echoed as streamed mutations (FULL_DUPLEX_STREAMED).
    echo_response_body: bool,
    booking: Option<BookingId>,
    first_token_seen: bool,
    /// Token counts read from the response of a routed request.
    scan: Option<ResponseScan>,
    /// Cached prompt tokens the decision expected on the worker that runs the prompt.
    predicted_cached: u64,
    /// This request's spans when traces are exported.
    trace: Option<RequestTrace>,
    /// With a decision window: counted as arriving from its headers until it is decided.
    arriving: Option<group::Arriving>,
}

impl Drop for StreamState {
    // Whatever way the stream ends (completion, client cancel, gateway reset, our error),
    // the request's load is released exactly once.
    fn drop(&mut self) {
        self.finish();
        self.app.metrics.inflight_streams.dec();
    }
}

impl StreamState {
    fn new(app: Arc<App>, tx: mpsc::Sender<Sent>) -> Self {
        app.metrics.inflight_streams.inc();
        StreamState {
            app,
            tx,
            phase: Phase::Start,
            headers: Vec::new(),
            body: Vec::new(),
            subset: None,
            echo_response_body: true,
            booking: None,
            first_token_seen: false,
            scan: None,
            predicted_cached: 0,
            trace: None,
            arriving: None,
        }
    }

    async fn run(&mut self, mut inbound: Streaming<ProcessingRequest>) {
        let mut first = true;
        while let Some(msg) = inbound.next().await {
            let msg = match msg {
                Ok(m) => m,
                Err(status) => {
                    tracing::debug!(%status, "ext_proc stream ended by the gateway");
                    break;
                }
            };
            if first {
                first = false;
                if let Err(status) = self.check_protocol(&msg) {
                    let _ = self.tx.send(Err(status)).await;
                    return;
                }
            }
            if self.subset.is_none() {
                self.subset = envoy::subset_hint(msg.metadata_context.as_ref());
            }
            let keep_going = match msg.request {
                Some(Request::RequestHeaders(h)) => self.on_request_headers(h).await,
                Some(Request::RequestBody(b)) => self.on_request_body(b).await,
                Some(Request::RequestTrailers(_)) => self.on_request_trailers().await,
                Some(Request::ResponseHeaders(_)) => self.send(envoy::pass_response_headers()).await,
                Some(Request::ResponseBody(b)) => self.on_response_body(b).await,
                Some(Request::ResponseTrailers(_)) => {
                    self.finish();
                    self.send(envoy::pass_trailers(false)).await
                }
                None => true,
            };
            if !keep_going {
                break;
            }
        }
    }

    /// Accepts FULL_DUPLEX_STREAMED request bodies (or no protocol report, as older Envoys send).
    /// `send_body_without_waiting_for_header_response` is deliberately ignored: Envoy ≥ 1.38 and
    /// agentgateway report it false, and it means nothing in full-duplex mode.
    fn check_protocol(&mut self, msg: &ProcessingRequest) -> Result<(), Status> {
        let Some(pc) = &msg.protocol_config else { return Ok(()) };
        let full = BodySendMode::FullDuplexStreamed as i32;
        if pc.request_body_mode != full {
            return Err(Status::failed_precondition(format!(
                "request_body_mode must be FULL_DUPLEX_STREAMED, got {}",
                BodySendMode::try_from(pc.request_body_mode).map(|m| m.as_str_name()).unwrap_or("unknown")
            )));
        }
        self.echo_response_body = pc.response_body_mode == full;
        Ok(())
    }

    async fn send(&self, r: ProcessingResponse) -> bool {
        self.tx.send(Ok(r)).await.is_ok()
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    async fn on_request_headers(&mut self, h: HttpHeaders) -> bool {
        if self.phase != Phase::Start {
            return true;
        }
        self.headers = envoy::headers_of(h.headers.as_ref());
        self.trace = self.app.tracing.as_ref().map(|t| t.request(&self.headers));
        if h.end_of_stream {
            self.phase = Phase::Forwarded;
            return self.route_headers_only().await;
        }
        self.phase = Phase::Body;
        self.arriving = group::Arriving::new(&self.app);
        true
    }

    async fn on_request_body(&mut self, b: HttpBody) -> bool {
        if self.phase != Phase::Body {
            return true;
        }
        if self.body.len() as u64 + b.body.len() as u64 > self.app.max_body_bytes {
            self.phase = Phase::Forwarded;
            self.arriving = None;
            return self.reject(EppError::BodyTooLarge { limit: self.app.max_body_bytes }).await;
        }
        self.body.extend_from_slice(&b.body);
        if b.end_of_stream {
            self.phase = Phase::Forwarded;
            return self.route_body().await;
        }
        true
    }

    /// Trailers end a body that never carried end_of_stream.
    async fn on_request_trailers(&mut self) -> bool {
        if self.phase == Phase::Body {
            self.phase = Phase::Forwarded;
            if !self.route_body().await {
                return false;
            }
        }
        self.send(envoy::pass_trailers(true)).await
    }

    fn routing_request(&self) -> RoutingRequest {
        RoutingRequest {
            subset: self.subset.as_ref().map(|s| s.iter().filter_map(|e| EndpointMatch::parse(e)).collect()),
            ..Default::default()
        }
    }

    /// What the router queue reads: class and priority headers (over the body's hints, as
    /// Dynamo's frontend applies them), the tenant as the flow.
    fn arrival(&self, hints: &AgentHints, bytes: u64, cache_salt: Option<&str>) -> Arrival {
        let header_num = |name| self.header(name).and_then(|v| v.trim().parse().ok());
        let priority = header_num("x-dynamo-request-priority").or(hints.priority);
        let strict = self.header("x-dynamo-request-strict-priority").and_then(|v| v.trim().parse().ok()).or(hints.strict_priority);
        Arrival {
            class: self.header("x-dynamo-meta-policy-class").map(|c| c.trim().to_string()).filter(|c| !c.is_empty()),
            flow: self.header("x-tenant-id").or(cache_salt).map(str::to_string),
            priority: Priority::new(priority, strict, hints.latency_sensitivity),
            bytes,
            uncached_tokens: 0,
        }
    }

    async fn route_headers_only(&mut self) -> bool {
        let req = self.routing_request();
        let picked = self.app.router.lock().pick_any(&req, &mut rand::rng());
        match picked {
            Ok(t) => {
                self.app.metrics.outcome("passthrough");
                let extra = self.trace_headers();
                self.forwarded("passthrough");
                self.send(envoy::route_headers(&t.endpoint.to_string(), &extra)).await
            }
            Err(e) => self.reject(self.app.route_error(e)).await,
        }
    }

    async fn route_body(&mut self) -> bool {
        let started = Instant::now();
        // Still arriving while it is checked and tokenized; no longer once decided or refused.
        let arriving = self.arriving.take();
        let api = Api::from_path(self.header(":path").unwrap_or(""));
        let mut req = self.routing_request();
        let mut body = std::mem::take(&mut self.body);
        let mut hints = AgentHints::default();
        if let Some(api) = api {
            let span = self.trace.as_ref().map(RequestTrace::tokenize);
            let prepared = self.prepare(api, body).await;
            match (span, &prepared) {
                (Some(span), Ok(p)) => otel::tokenized(span, p.tokens.len()),
                (Some(span), Err(e)) => otel::failed(span, e.code()),
                (None, _) => {}
            }
            match prepared {
                Ok(p) => {
                    req.tokens = p.tokens;
                    req.cache_salt = p.cache_salt;
                    req.lora = p.lora;
                    req.osl = p.hints.osl;
                    hints = p.hints;
                    body = p.body;
                }
                Err(e) => return self.reject(e).await,
            }
        }
        let span = self.trace.as_ref().map(RequestTrace::route);
        let arrival = self.app.queue.as_ref().map(|_| self.arrival(&hints, (body.len() + 4 * req.tokens.len()) as u64, req.cache_salt.as_deref()));
        let trace = self.trace.as_ref().zip(span.as_ref());
        let admitted = match &self.app.window {
            Some(window) => group::decide(&self.app, window, req, arrival, arriving).await,
            None => queue::admit(&self.app, req, arrival, None, started),
        };
        let decided = match admitted {
            Ok(queue::Admitted::Routed(d)) => Ok(d),
            Ok(queue::Admitted::Queued(waiting)) => queue::wait(&self.app, waiting, &self.tx, trace).await,
            Err(e) => Err(e),
        };
        let d = match decided {
            Ok(d) => d,
            Err(e) => {
                if let Some(span) = span {
                    otel::failed(span, e.code());
                }
                return self.reject(e).await;
            }
        };
        if let Some(span) = span {
            otel::decided(span, &d);
        }
        self.booking = Some(d.booking);
        if api.is_some() {
            self.scan = Some(ResponseScan::default());
            self.predicted_cached = d.predicted_cached_tokens;
            self.app.metrics.predicted_cached_tokens.observe(d.predicted_cached_tokens as f64);
        }
        let mut extra = if api.is_some() { dynamo_headers(&d) } else { Vec::new() };
        extra.extend(self.trace_headers());
        let headers = envoy::route_headers(&d.decode.endpoint.to_string(), &extra);
        self.app.metrics.decision_seconds.observe(started.elapsed().as_secs_f64());
        let outcome = if api.is_some() { "routed" } else { "passthrough" };
        self.app.metrics.outcome(outcome);
        self.forwarded(outcome);
        if !self.send(headers).await {
            return false;
        }
        for chunk in envoy::request_body_chunks(&body) {
            if !self.send(chunk).await {
                return false;
            }
        }
        true
    }

    /// Checks, tokenizes and rewrites the body (large bodies in the work pool, off the reactor).
    /// The work itself (not the wait for a pool slot) is timed for `tokenize_seconds`.
    async fn prepare(&self, api: Api, body: Vec<u8>) -> Result<Prepared, EppError> {
        let app = self.app.clone();
        let tenant = self.header("x-tenant-id").map(str::to_string);
        let bytes = body.len();
        let job = move || {
            let started = Instant::now();
            let prepared = app.prep.prepare(api, tenant, body);
            if app.prep.model.is_some() && prepared.is_ok() {
                app.metrics.tokenize_seconds.observe(started.elapsed().as_secs_f64());
            }
            prepared
        };
        Ok(self.app.pool.run(bytes, job).await??)
    }

    /// Our `traceparent` for the worker; nothing when traces are off (the client's passes on).
    fn trace_headers(&self) -> Vec<(&'static str, String)> {
        self.trace.as_ref().map(RequestTrace::outgoing_headers).unwrap_or_default()
    }

    fn forwarded(&mut self, outcome: &'static str) {
        if let Some(t) = &mut self.trace {
            t.outcome(outcome, None);
            t.forwarded();
        }
    }

    async fn on_response_body(&mut self, b: HttpBody) -> bool {
        if !b.body.is_empty() && !self.first_token_seen {
            self.first_token_seen = true;
            if let Some(t) = &mut self.trace {
                t.first_chunk();
            }
            if let Some(id) = self.booking {
                let sample = {
                    let mut router = self.app.router.lock();
                    router.on_first_token(id, Instant::now()).map(|s| {
                        let name = router.workers().iter().find(|w| w.id == s.worker.id).map(|w| w.name.clone()).unwrap_or_default();
                        (RankLabel { worker: name, dp_rank: s.worker.dp_rank.0 }, s)
                    })
                };
                self.app.peer_events.notify_one();
                // The prompt's prefill tokens are no longer booked.
                self.app.dispatch_waiting();
                if let Some((label, s)) = sample {
                    self.app.metrics.ttft_predicted(label, s.predicted_ms, s.actual_ms);
                }
            }
        }
        if let (Some(scan), Some(id)) = (&mut self.scan, self.booking) {
            if scan.feed(&b.body, b.end_of_stream) && self.app.count_output {
                self.app.router.lock().on_output(id, scan.tokens());
            }
        }
        if b.end_of_stream {
            self.finish();
        }
        let r = if self.echo_response_body {
            envoy::body_chunk(false, b.body, b.end_of_stream)
        } else {
            envoy::pass_response_body()
        };
        self.send(r).await
    }

    async fn reject(&mut self, e: EppError) -> bool {
        tracing::info!(status = e.status(), error = %e, path = self.header(":path").unwrap_or(""), "request rejected");
        self.app.metrics.outcome(e.code());
        if let Some(t) = &self.trace {
            t.outcome(e.code(), Some(e.status()));
        }
        self.send(envoy::immediate(e.status(), e.body(), e.code(), &e.headers())).await
    }

    /// Releases the booking and records the engine's actual cache hit, once.
    fn finish(&mut self) {
        if let Some(actual) = self.scan.take().and_then(|s| s.cached_tokens()) {
            self.app.metrics.cache_hit(self.predicted_cached, actual);
        }
        if let Some(id) = self.booking.take() {
            let mut router = self.app.router.lock();
            router.on_end(id, Instant::now());
            self.app.note_active(&router);
            drop(router);
            self.app.dispatch_waiting();
        }
        if let Some(mut t) = self.trace.take() {
            t.end();
        }
    }
}

/// The headers that tell Dynamo's sidecar what was decided.
fn dynamo_headers(d: &Decision) -> Vec<(&'static str, String)> {
    let mut h = vec![
        ("x-dynamo-worker-instance-id", d.decode.worker.id.to_string()),
        ("x-dynamo-dp-rank", d.decode.worker.dp_rank.0.to_string()),
        ("x-dynamo-routing-mode", d.mode.as_str().to_string()),
    ];
    if let Some(p) = &d.prefill {
        h.push(("x-dynamo-prefill-instance-id", p.worker.id.to_string()));
        h.push(("x-dynamo-prefill-dp-rank", p.worker.dp_rank.0.to_string()));
    }
    h
}
