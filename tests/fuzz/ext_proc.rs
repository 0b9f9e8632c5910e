//! ext_proc message sequences against the real gRPC service, in process over loopback (as
//! benches/ext_proc_stream.rs stands it up), with the Qwen3 model so bodies are parsed,
//! templated, tokenized and injected. Half the sequences are the pattern Envoy sends (with
//! generated bodies in generated chunks); the rest are anything: body before headers, headers
//! twice, trailers without a body, response messages before the request finished, thousands of
//! headers, invalid protocol reports; every stream is cut somewhere (half-close or reset).

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, OnceLock,
    },
    time::{Duration, Instant},
};

use dynamo_epp::{
    request::{openai::Api, pool::WorkPool},
    router::Router,
    server::{ext_proc::ExtProc, App},
};
use envoy_types::pb::envoy::{
    config::core::v3::{HeaderMap, HeaderValue},
    extensions::filters::http::ext_proc::v3::processing_mode::BodySendMode,
    service::ext_proc::v3::{
        body_mutation::Mutation as BodyMut, external_processor_client::ExternalProcessorClient,
        processing_request::Request, processing_response::Response,
        HttpBody, HttpHeaders, HttpTrailers, ProcessingRequest, ProcessingResponse, ProtocolConfiguration,
    },
};
use proptest::{prelude::*, test_runner::TestCaseError};
use tokio_stream::StreamExt;
use tonic::transport::Channel;

use crate::{common::in_process, gen_json, prepare, run, Tally, DEADLINE};

/// Bodies above this are refused with 413 (generated bodies reach 256 KiB).
const MAX_BODY: u64 = 128 * 1024;
const WORKERS: u8 = 4;

struct Service {
    rt: tokio::runtime::Runtime,
    app: Arc<App>,
    addr: SocketAddr,
    /// The client connection and the inputs sent over it.
    client: Mutex<(ExternalProcessorClient<Channel>, u32)>,
}

/// Inputs per client connection. The client's own `h2` closes a connection after 1,024 resets
/// it had to send for protocol errors (its rapid-reset defence, `too_many_internal_resets`);
/// half the inputs cut their stream mid-exchange, so one connection reached that after ~150k
/// inputs in a long run. A GOAWAY the *server* sends still fails the input it happens on.
const INPUTS_PER_CONNECTION: u32 = 10_000;

impl Service {
    fn client(&self) -> ExternalProcessorClient<Channel> {
        let mut c = self.client.lock().unwrap();
        if c.1 == INPUTS_PER_CONNECTION {
            *c = (self.rt.block_on(in_process::client(self.addr)), 0);
        }
        c.1 += 1;
        c.0.clone()
    }
}

/// Panics on the server's threads (tokio workers and blocking pool), which would otherwise only
/// kill one connection task.
static SERVER_PANICS: AtomicU64 = AtomicU64::new(0);

fn service() -> &'static Service {
    static S: OnceLock<Service> = OnceLock::new();
    S.get_or_init(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if std::thread::current().name().is_some_and(|n| n.starts_with("tokio-runtime")) {
                SERVER_PANICS.fetch_add(1, Ordering::Relaxed);
            }
            previous(info)
        }));
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let (app, addr, client) = rt.block_on(async {
            let mut app = App::new(Router::default(), MAX_BODY, prepare::preprocessor(), WorkPool::new(2, Duration::from_secs(5)));
            app.count_output = true;
            let app = Arc::new(app);
            app.set_fleet(in_process::fleet(WORKERS));
            let addr = in_process::serve(ExtProc::new(app.clone())).await;
            (app, addr, in_process::client(addr).await)
        });
        Service { rt, app, addr, client: Mutex::new((client, 0)) }
    })
}

const PATHS: &[&str] = &["/v1/chat/completions", "/v1/completions", "/v1/completions?x=1", "/v1/models", "/", "", "/v1/chat/completions/"];

#[derive(Clone, Debug)]
enum Op {
    Headers { eos: bool, path: &'static str, junk: u16, tenant: bool, raw: bool },
    /// The next `len` bytes of the body (all that is left when `eos`).
    Body { len: u16, eos: bool },
    Trailers,
    RespHeaders,
    RespBody { sse: bool, eos: bool },
    RespTrailers,
    Empty,
}

fn op() -> impl Strategy<Value = Op> {
    let junk = prop_oneof![20 => 0u16..4, 1 => 1_000u16..5_000];
    prop_oneof![
        3 => (any::<bool>(), prop::sample::select(PATHS), junk, any::<bool>(), any::<bool>())
            .prop_map(|(eos, path, junk, tenant, raw)| Op::Headers { eos, path, junk, tenant, raw }),
        4 => (any::<u16>(), any::<bool>()).prop_map(|(len, eos)| Op::Body { len, eos }),
        1 => Just(Op::Trailers),
        1 => Just(Op::RespHeaders),
        2 => (any::<bool>(), any::<bool>()).prop_map(|(sse, eos)| Op::RespBody { sse, eos }),
        1 => Just(Op::RespTrailers),
        1 => Just(Op::Empty),
    ]
}

/// How the client ends the stream.
#[derive(Clone, Copy, Debug)]
enum Cut {
    /// Close the sending side after the messages; read every reply to the end.
    HalfClose,
    /// Reset the stream after sending this many messages.
    Reset(usize),
}

#[derive(Clone, Debug)]
struct Case {
    /// The body's document, and which API seed it came from.
    body: gen_json::Generated,
    /// `None`: no protocol report (older Envoys); else (request, response) body modes.
    protocol: Option<(i32, i32)>,
    ops: Vec<Op>,
    cut: Cut,
    /// Envoy's own pattern: headers, the whole body, the response.
    canonical: bool,
}

fn case(apis: Vec<Api>) -> impl Strategy<Value = Case> {
    let full = BodySendMode::FullDuplexStreamed as i32;
    let protocol = prop_oneof![
        6 => Just(Some((full, full))),
        2 => Just(None),
        1 => Just(Some((full, BodySendMode::None as i32))),
        1 => (0i32..8, 0i32..8).prop_map(Some),
    ];
    let cut = prop_oneof![4 => Just(Cut::HalfClose), 1 => (0usize..12).prop_map(Cut::Reset)];
    (gen_json::generated(apis.len()), protocol, prop::collection::vec(op(), 0..10), cut, any::<bool>(), prop::collection::vec(1u16..40_000, 0..4))
        .prop_map(move |(body, protocol, ops, cut, canonical, chunks)| {
            if canonical {
                let protocol = protocol.filter(|(req, _)| *req == full);
                let mut ops = vec![Op::Headers { eos: false, path: if apis[body.seed] == Api::ChatCompletions { PATHS[0] } else { PATHS[1] }, junk: 2, tenant: body.seed % 3 == 0, raw: true }];
                ops.extend(chunks.iter().map(|&len| Op::Body { len, eos: false }));
                ops.push(Op::Body { len: 0, eos: true });
                ops.extend([Op::RespHeaders, Op::RespBody { sse: true, eos: false }, Op::RespBody { sse: true, eos: true }]);
                Case { body, protocol, ops, cut: Cut::HalfClose, canonical: true }
            } else {
                Case { body, protocol, ops, cut, canonical: false }
            }
        })
}

fn headers(pairs: Vec<(String, Vec<u8>)>, raw: bool, end_of_stream: bool) -> HttpHeaders {
    HttpHeaders {
        headers: Some(HeaderMap {
            headers: pairs
                .into_iter()
                .map(|(key, v)| {
                    if raw {
                        HeaderValue { key, value: String::new(), raw_value: v }
                    } else {
                        HeaderValue { key, value: String::from_utf8_lossy(&v).into_owned(), raw_value: Vec::new() }
                    }
                })
                .collect(),
        }),
        end_of_stream,
        ..Default::default()
    }
}

fn messages(c: &Case, body: &[u8]) -> Vec<ProcessingRequest> {
    let mut rest = body;
    let mut out = Vec::new();
    for op in &c.ops {
        let request = match op {
            Op::Headers { eos, path, junk, tenant, raw } => {
                let mut h = vec![
                    (":method".to_string(), b"POST".to_vec()),
                    (":path".to_string(), path.as_bytes().to_vec()),
                    ("content-type".to_string(), b"application/json".to_vec()),
                    ("x-gateway-destination-endpoint".to_string(), b"6.6.6.6:1".to_vec()),
                ];
                if *tenant {
                    h.push(("x-tenant-id".into(), b"tenant-\xff\x00".to_vec()));
                }
                h.extend((0..*junk).map(|i| (format!("x-junk-{i}"), vec![b'v'; (i % 64) as usize])));
                Some(Request::RequestHeaders(headers(h, *raw, *eos)))
            }
            Op::Body { len, eos } => {
                let n = if *eos { rest.len() } else { (*len as usize).min(rest.len()) };
                let (part, tail) = rest.split_at(n);
                rest = tail;
                Some(Request::RequestBody(HttpBody { body: part.to_vec(), end_of_stream: *eos, ..Default::default() }))
            }
            Op::Trailers => Some(Request::RequestTrailers(HttpTrailers::default())),
            Op::RespHeaders => Some(Request::ResponseHeaders(headers(vec![(":status".into(), b"200".to_vec())], true, false))),
            Op::RespBody { sse, eos } => {
                let b: &[u8] = if *sse {
                    b"data: {\"choices\":[{\"delta\":{\"content\":\"x\"}}]}\n\ndata: {\"usage\":{\"completion_tokens\":9,\"prompt_tokens_details\":{\"cached_tokens\":3}}}\n\ndata: [DONE]\n\n"
                } else {
                    b"{\"choices\":[{\"message\":{\"content\":\"hi\"}}],\"usage\":{\"completion_tokens\":-1}}"
                };
                Some(Request::ResponseBody(HttpBody { body: b.to_vec(), end_of_stream: *eos, ..Default::default() }))
            }
            Op::RespTrailers => Some(Request::ResponseTrailers(HttpTrailers::default())),
            Op::Empty => None,
        };
        out.push(ProcessingRequest { request, ..Default::default() });
    }
    if let (Some(first), Some((req, resp))) = (out.first_mut(), c.protocol) {
        first.protocol_config = Some(ProtocolConfiguration {
            request_body_mode: req,
            response_body_mode: resp,
            send_body_without_waiting_for_header_response: false,
        });
    }
    out
}

/// What the client got back, in order.
#[derive(Debug, Default)]
struct Replies {
    kinds: Vec<&'static str>,
    /// The request body as forwarded (concatenated chunks) and whether the last chunk ended it.
    forwarded: Vec<u8>,
    forwarded_end: Option<bool>,
    destination: Option<String>,
    immediate: Option<(i32, Vec<u8>)>,
    status: Option<tonic::Status>,
}

fn note(r: &mut Replies, p: ProcessingResponse) {
    let kind = match p.response {
        Some(Response::RequestHeaders(h)) => {
            r.destination = h
                .response
                .and_then(|c| c.header_mutation)
                .and_then(|m| m.set_headers.into_iter().find_map(|s| s.header.filter(|h| h.key == "x-gateway-destination-endpoint")))
                .map(|h| String::from_utf8_lossy(&h.raw_value).into_owned());
            "req_headers"
        }
        Some(Response::RequestBody(b)) => {
            if let Some(BodyMut::StreamedResponse(s)) = b.response.and_then(|c| c.body_mutation).and_then(|m| m.mutation) {
                r.forwarded.extend_from_slice(&s.body);
                r.forwarded_end = Some(s.end_of_stream);
            }
            "req_body"
        }
        Some(Response::RequestTrailers(_)) => "req_trailers",
        Some(Response::ResponseHeaders(_)) => "resp_headers",
        Some(Response::ResponseBody(_)) => "resp_body",
        Some(Response::ResponseTrailers(_)) => "resp_trailers",
        Some(Response::StreamedImmediateResponse(_)) => "streamed_immediate",
        Some(Response::ImmediateResponse(i)) => {
            r.immediate = Some((i.status.map(|s| s.code).unwrap_or(0), i.body));
            "immediate"
        }
        None => "none",
    };
    r.kinds.push(kind);
}

async fn exchange(client: &ExternalProcessorClient<Channel>, msgs: Vec<ProcessingRequest>, cut: Cut) -> Result<Replies, String> {
    let mut client = client.clone();
    let (tx, rx) = tokio::sync::mpsc::channel(msgs.len().max(1));
    let mut replies = Replies::default();
    let mut stream = client.process(tokio_stream::wrappers::ReceiverStream::new(rx)).await.map_err(|e| e.to_string())?.into_inner();
    match cut {
        Cut::HalfClose => {
            for m in msgs {
                // The server may have ended the stream (a refused protocol): read why.
                if tx.send(m).await.is_err() {
                    break;
                }
            }
            drop(tx);
            while let Some(r) = stream.next().await {
                match r {
                    Ok(p) => note(&mut replies, p),
                    Err(s) => {
                        replies.status = Some(s);
                        break;
                    }
                }
            }
        }
        Cut::Reset(k) => {
            for m in msgs.into_iter().take(k) {
                let _ = tx.send(m).await;
            }
            // Let the server act on them, then reset the stream.
            tokio::task::yield_now().await;
            drop((tx, stream));
        }
    }
    Ok(replies)
}

fn check(svc: &Service, c: &Case, body: &[u8], tally: &mut Tally) -> Result<(), TestCaseError> {
    let started = Instant::now();
    let msgs = messages(c, body);
    let client = svc.client();
    let replies = svc
        .rt
        .block_on(async { tokio::time::timeout(DEADLINE, exchange(&client, msgs, c.cut)).await })
        .map_err(|_| TestCaseError::fail("no answer within the deadline"))?
        .map_err(TestCaseError::fail)?;
    let took = started.elapsed();
    // Every booking and stream is released once the stream is gone. The server's own threads
    // release them, so this thread polls without the runtime, at a finer grain than tokio's 1 ms
    // timer (which added up to a millisecond or two of waiting to every input).
    let until = Instant::now() + DEADLINE;
    loop {
        let active = svc.app.router.lock().active_requests();
        let streams = svc.app.metrics.inflight_streams.get();
        if active == 0 && streams == 0 {
            break;
        }
        if Instant::now() > until {
            return Err(TestCaseError::fail(format!("{active} bookings and {streams} streams left")));
        }
        std::thread::sleep(Duration::from_micros(20));
    }
    prop_assert_eq!(SERVER_PANICS.load(Ordering::Relaxed), 0, "the server panicked");
    let k = &replies.kinds;
    let pos = |kind: &str| k.iter().position(|x| *x == kind);
    // The routing headers come before any request body, and a request is either forwarded or
    // answered, never both.
    if let Some(b) = pos("req_body") {
        prop_assert!(pos("req_headers").is_some_and(|h| h < b), "body before headers: {k:?}");
    }
    prop_assert!(!(pos("immediate").is_some() && pos("req_headers").is_some()), "forwarded and answered: {k:?}");
    prop_assert!(k.iter().filter(|x| **x == "req_headers" || **x == "immediate").count() <= 1, "two answers: {k:?}");
    if let Some(d) = &replies.destination {
        prop_assert!(d.starts_with("10.0.0.") && d.ends_with(":8000"), "routed to {d}");
    }
    if let Some((status, body)) = &replies.immediate {
        prop_assert!((400..600).contains(status));
        let v: serde_json::Value = serde_json::from_slice(body).map_err(|e| TestCaseError::fail(format!("error body: {e}")))?;
        prop_assert!(v["error"]["message"].is_string() && v["error"]["code"].is_string());
    }
    if replies.status.is_some() {
        let full = BodySendMode::FullDuplexStreamed as i32;
        prop_assert!(c.protocol.is_some_and(|(req, _)| req != full), "stream failed: {:?}", replies.status);
    }
    let outcome = if replies.status.is_some() {
        "grpc error"
    } else if let Some((s, _)) = &replies.immediate {
        if *s < 500 { "4xx" } else { "5xx" }
    } else if replies.destination.is_some() {
        "routed"
    } else {
        "no answer (cut)"
    };
    if c.canonical {
        // The exact answer: `prepare` on the same body decides it.
        prop_assert!(replies.status.is_none(), "{:?}", replies.status);
        let Op::Headers { path, tenant, .. } = &c.ops[0] else { unreachable!() };
        let api = Api::from_path(path).expect("canonical paths are APIs");
        let tenant = tenant.then(|| String::from_utf8_lossy(b"tenant-\xff\x00").into_owned());
        if body.len() as u64 > MAX_BODY {
            prop_assert_eq!(replies.immediate.as_ref().map(|i| i.0), Some(413));
        } else {
            match svc.app.prep.prepare(api, tenant, body.to_vec()) {
                Err(e) => {
                    let e = dynamo_epp::server::error::EppError::from(e);
                    prop_assert_eq!(replies.immediate.as_ref().map(|i| i.0), Some(e.status() as i32), "{}", e);
                    prop_assert!(replies.forwarded.is_empty(), "a bad request was forwarded");
                }
                Ok(p) => {
                    prop_assert!(replies.destination.is_some(), "{k:?}");
                    prop_assert!(replies.forwarded == p.body, "forwarded body differs from the prepared one");
                    prop_assert_eq!(replies.forwarded_end, Some(true));
                    prop_assert_eq!(k.iter().filter(|x| **x == "resp_body").count(), 2);
                }
            }
        }
    }
    tally.record(outcome, took)
}

#[test]
fn generated_stream_sequences() {
    let svc = service();
    let seeds = prepare::seeds();
    let js: Vec<gen_json::J> = seeds.iter().map(|(_, j)| j.clone()).collect();
    run("ext_proc sequences", file!(), case(seeds.iter().map(|(a, _)| *a).collect()), |c, tally| {
        let body = c.body.build(&js, 256 * 1024);
        check(svc, &c, &body, tally)
    });
}
