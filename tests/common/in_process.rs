//! The ext_proc service in process over loopback gRPC, as the ext_proc bench and the fuzz
//! target stand it up: a fleet on addresses nothing connects to, the server, a client.

use std::net::SocketAddr;

use dynamo_epp::workers::{Fleet, Role, Worker, WorkerId};
use envoy_types::pb::envoy::service::ext_proc::v3::{
    external_processor_client::ExternalProcessorClient,
    external_processor_server::{ExternalProcessor, ExternalProcessorServer},
};
use tonic::transport::Channel;

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

/// Serves `svc` on a loopback port (Nagle off) on the current runtime.
pub async fn serve<S: ExternalProcessor>(svc: S) -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(ExternalProcessorServer::new(svc).max_decoding_message_size(MAX_MESSAGE))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(l).with_nodelay(Some(true))),
    );
    addr
}

pub async fn client(addr: SocketAddr) -> ExternalProcessorClient<Channel> {
    ExternalProcessorClient::connect(format!("http://{addr}")).await.unwrap().max_decoding_message_size(MAX_MESSAGE)
}
