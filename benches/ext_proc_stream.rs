//! One complete ext_proc stream in-process over loopback gRPC: request headers, a 32 KB chat body
//! (end of stream), response headers, one response body chunk with end of stream — the message
//! pattern Envoy sends in FULL_DUPLEX_STREAMED mode.
//!
//! Baseline in the same run: a do-nothing ext_proc server (`in_process::NullExtProc`) answering
//! the same message pattern in the EPP's order (headers answered once the body ended, bodies
//! echoed, as full-duplex requires), so the ratio is what picking costs on top of bare tonic.
//! `dynamo_epp_traced` is the same EPP with OpenTelemetry export on (every request sampled,
//! spans batched to an OTLP receiver in this process): its ratio to `dynamo_epp` is what traces
//! cost (docs/tracing.md).

#[path = "../tests/common/in_process.rs"]
mod in_process;

use std::{sync::Arc, time::Duration};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use dynamo_epp::{
    config::Config,
    request::{pool::WorkPool, Preprocessor},
    router::Router,
    server::{ext_proc::ExtProc, otel::Tracing, App},
};
use envoy_types::pb::envoy::{
    config::core::v3::{HeaderMap, HeaderValue},
    service::ext_proc::v3::{
        external_processor_client::ExternalProcessorClient, processing_request::Request, HttpBody, HttpHeaders,
        ProcessingRequest,
    },
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    trace_service_server::{TraceService, TraceServiceServer},
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use tokio_stream::StreamExt;
use tonic::{transport::Channel, Status};

/// An OTLP trace receiver that accepts and drops every export.
struct SpanSink;

#[tonic::async_trait]
impl TraceService for SpanSink {
    async fn export(&self, _: tonic::Request<ExportTraceServiceRequest>) -> Result<tonic::Response<ExportTraceServiceResponse>, Status> {
        Ok(tonic::Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

fn headers(pairs: &[(&str, &str)], end_of_stream: bool) -> HttpHeaders {
    HttpHeaders {
        headers: Some(HeaderMap {
            headers: pairs
                .iter()
                .map(|(k, v)| HeaderValue { key: k.to_string(), value: String::new(), raw_value: v.as_bytes().to_vec() })
                .collect(),
        }),
        end_of_stream,
        ..Default::default()
    }
}

fn msg(r: Request) -> ProcessingRequest {
    ProcessingRequest { request: Some(r), ..Default::default() }
}

fn stream_messages(body: &[u8]) -> Vec<ProcessingRequest> {
    vec![
        msg(Request::RequestHeaders(headers(
            &[(":method", "POST"), (":path", "/v1/chat/completions"), ("content-type", "application/json")],
            false,
        ))),
        msg(Request::RequestBody(HttpBody { body: body.to_vec(), end_of_stream: true, ..Default::default() })),
        msg(Request::ResponseHeaders(headers(&[(":status", "200")], false))),
        msg(Request::ResponseBody(HttpBody {
            body: br#"{"choices":[{"message":{"content":"hi"}}]}"#.to_vec(),
            end_of_stream: true,
            ..Default::default()
        })),
    ]
}

/// One stream: send the messages (headers response only comes after the body), read all replies.
async fn one_stream(client: &mut ExternalProcessorClient<Channel>, msgs: &[ProcessingRequest]) {
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    let mut replies = client.process(tokio_stream::wrappers::ReceiverStream::new(rx)).await.unwrap().into_inner();
    // Request side: headers + body; expect headers response + body chunk(s).
    tx.send(msgs[0].clone()).await.unwrap();
    tx.send(msgs[1].clone()).await.unwrap();
    let mut n = 0;
    while let Some(r) = replies.next().await {
        n += 1;
        if matches!(
            r.unwrap().response,
            Some(envoy_types::pb::envoy::service::ext_proc::v3::processing_response::Response::RequestBody(_))
        ) {
            break;
        }
    }
    assert!(n >= 2);
    tx.send(msgs[2].clone()).await.unwrap();
    tx.send(msgs[3].clone()).await.unwrap();
    drop(tx);
    while let Some(r) = replies.next().await {
        r.unwrap();
    }
}

/// The EPP as the binary runs without DYN_MODEL_PATH (bodies checked, not tokenized), 8 workers.
fn epp(tracing: Option<Tracing>) -> Arc<App> {
    let prep = Preprocessor { model: None, served_model: None, lora_adapters: vec![], inject: false };
    let mut app = App::new(Router::default(), 16 << 20, prep, WorkPool::new(0, Duration::from_secs(30)));
    app.tracing = tracing;
    app.set_fleet(in_process::fleet(8));
    Arc::new(app)
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let content: String = "lorem ipsum dolor sit amet ".repeat(32 * 1024 / 27);
    let body = serde_json::json!({"model": "m", "messages": [{"role": "user", "content": content}]}).to_string();
    let msgs = stream_messages(body.as_bytes());
    let (ours, traced, base) = rt.block_on(async {
        let sink = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let sink_addr = sink.local_addr().unwrap();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(TraceServiceServer::new(SpanSink))
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(sink)),
        );
        // Through `Config`, as the binary gets them: every request sampled, batches every 100 ms.
        let endpoint = format!("http://{sink_addr}");
        let args = ["dynamo-epp", "--otel-exporter-otlp-traces-endpoint", &endpoint, "--otel-service-name", "bench", "--otel-traces-sampler", "always_on", "--otel-bsp-schedule-delay", "100"];
        let trace = Config::from_args(args).unwrap().trace_settings().unwrap();
        let ours = in_process::serve(ExtProc::new(epp(None))).await;
        let traced = in_process::serve(ExtProc::new(epp(Some(Tracing::start(&trace).unwrap())))).await;
        let base = in_process::serve(in_process::NullExtProc::new(vec!["127.0.0.1:1".into()], None)).await;
        (in_process::client(ours).await, in_process::client(traced).await, in_process::client(base).await)
    });
    let mut g = c.benchmark_group("ext_proc_stream_32k");
    g.throughput(Throughput::Bytes(body.len() as u64));
    for (name, client) in [("dynamo_epp", ours), ("dynamo_epp_traced", traced), ("baseline_passthrough", base)] {
        g.bench_function(name, |b| {
            b.to_async(&rt).iter_batched(
                || client.clone(),
                |mut cl| {
                    let msgs = &msgs;
                    async move { one_stream(&mut cl, msgs).await }
                },
                criterion::BatchSize::SmallInput,
            )
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
