//! The ext_proc service in process over loopback gRPC, as the ext_proc bench and the fuzz
//! target stand it up: a fleet on addresses nothing connects to, the server, a client; and
//! [`NullExtProc`], the protocol with none of the EPP's work, for the benches' floors.

use std::{
    net::SocketAddr,
    pin::Pin,
    sync::atomic::{AtomicUsize, Ordering::Relaxed},
};

use dynamo_epp::{
    request::inject::inject_token_data,
    server::{envoy, listener},
    workers::{Fleet, Role, Worker, WorkerId},
};
use envoy_types::pb::envoy::service::ext_proc::v3::{
    external_processor_client::ExternalProcessorClient,
    external_processor_server::{ExternalProcessor, ExternalProcessorServer},
    processing_request::Request,
    ProcessingRequest, ProcessingResponse,
};
use futures_util::{Stream, StreamExt};
use tonic::{transport::Channel, Status, Streaming};

/// Largest gRPC message either side takes (bodies with their injected token ids).
pub const MAX_MESSAGE: usize = 64 << 20;

/// `n` one-rank workers, ids 1..=n, at 10.0.0.<i>:8000; blocks of 16 tokens.
pub fn fleet(n: u8) -> Fleet {
    let worker = |i: u8| Worker {
        id: WorkerId(u64::from(i) + 1),
        name: format!("w{i}"),
        endpoint: SocketAddr::from(([10, 0, 0, i], 8000)),
        role: Role::Worker,
        dp_start_rank: 0,
        dp_size: 1,
        total_kv_blocks: None,
        max_num_batched_tokens: None,
        kv_events: None,
    };
    Fleet { block_size: Some(16), workers: (0..n).map(worker).collect() }
}

/// Serves `svc` on a loopback port on the current runtime, with the EPP binary's HTTP/2 windows
/// and stream limit, Nagle off.
pub async fn serve<S: ExternalProcessor>(svc: S) -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .initial_stream_window_size(Some(listener::STREAM_WINDOW_BYTES))
            .initial_connection_window_size(Some(listener::CONNECTION_WINDOW_BYTES))
            .max_concurrent_streams(listener::MAX_STREAMS_PER_CONNECTION)
            .add_service(ExternalProcessorServer::new(svc).max_decoding_message_size(MAX_MESSAGE).max_encoding_message_size(usize::MAX))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(l).with_nodelay(Some(true))),
    );
    addr
}

pub async fn client(addr: SocketAddr) -> ExternalProcessorClient<Channel> {
    ExternalProcessorClient::connect(format!("http://{addr}")).await.unwrap().max_decoding_message_size(MAX_MESSAGE)
}

/// The ext_proc protocol with none of the EPP's work: what the gateway, gRPC and carrying the
/// bodies cost on their own. As the EPP must, it answers a request's headers only once the body
/// has ended, naming the worker (round-robin over `dests`, one per stream) with the EPP's header
/// response, then sends the body back in the EPP's chunks. Response messages pass (bodies
/// echoed, as full-duplex mode requires).
pub struct NullExtProc {
    dests: Vec<String>,
    next: AtomicUsize,
    /// A request header saying how many ids to splice into the body as `nvext.token_data`
    /// (the EPP's rewrite at its size, any ids); `None`: bodies go back unchanged.
    tokens_header: Option<&'static str>,
}

/// The id spliced: five digits, about the width of the full-path prompts' ids.
const NULL_TOKEN_ID: u32 = 10_000;

impl NullExtProc {
    pub fn new(dests: Vec<String>, tokens_header: Option<&'static str>) -> Self {
        assert!(!dests.is_empty());
        NullExtProc { dests, next: AtomicUsize::new(0), tokens_header }
    }
}

/// One stream's request side so far.
#[derive(Default)]
struct Held {
    body: Vec<u8>,
    tokens: Option<usize>,
}

#[tonic::async_trait]
impl ExternalProcessor for NullExtProc {
    type ProcessStream = Pin<Box<dyn Stream<Item = Result<ProcessingResponse, Status>> + Send>>;

    async fn process(&self, req: tonic::Request<Streaming<ProcessingRequest>>) -> Result<tonic::Response<Self::ProcessStream>, Status> {
        let dest = self.dests[self.next.fetch_add(1, Relaxed) % self.dests.len()].clone();
        let tokens_header = self.tokens_header;
        let answer = move |held: &mut Held, m: ProcessingRequest| -> Vec<ProcessingResponse> {
            match m.request {
                Some(Request::RequestHeaders(h)) => {
                    held.tokens = tokens_header.and_then(|name| {
                        envoy::headers_of(h.headers.as_ref()).into_iter().find(|(k, _)| k == name).and_then(|(_, v)| v.parse().ok())
                    });
                    if h.end_of_stream {
                        vec![envoy::route_headers(&dest, &[])]
                    } else {
                        vec![]
                    }
                }
                Some(Request::RequestBody(b)) => {
                    held.body.extend_from_slice(&b.body);
                    if !b.end_of_stream {
                        return vec![];
                    }
                    let body = match held.tokens {
                        Some(n) => inject_token_data(&held.body, &vec![NULL_TOKEN_ID; n], false).unwrap(),
                        None => std::mem::take(&mut held.body),
                    };
                    std::iter::once(envoy::route_headers(&dest, &[])).chain(envoy::request_body_chunks(&body)).collect()
                }
                Some(Request::RequestTrailers(_)) => vec![envoy::pass_trailers(true)],
                Some(Request::ResponseHeaders(_)) => vec![envoy::pass_response_headers()],
                Some(Request::ResponseBody(b)) => vec![envoy::body_chunk(false, b.body, b.end_of_stream)],
                Some(Request::ResponseTrailers(_)) => vec![envoy::pass_trailers(false)],
                None => vec![],
            }
        };
        let s = req
            .into_inner()
            .scan(Held::default(), move |held, m| std::future::ready(m.ok().map(|m| answer(held, m))))
            .flat_map(|out| futures_util::stream::iter(out.into_iter().map(Ok)));
        Ok(tonic::Response::new(Box::pin(s)))
    }
}
