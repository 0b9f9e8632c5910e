//! The ext_proc port's accept loop, bounded as Dynamo's EPP (and the Go EPP) bound theirs: at
//! most [`MAX_CONNECTIONS`] connections at once, and each must finish its handshake — TLS (when
//! on) and the HTTP/2 connection preface — within [`HANDSHAKE_TIMEOUT`]. A connection is
//! accepted only once it has a slot, so past the bound clients wait in the kernel's backlog and
//! cost us no descriptor and no memory; a client that connects and stays silent loses its slot
//! at the deadline. The connections that made it are handed to tonic.

use std::{
    io,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use prometheus_client::metrics::{counter::Counter, family::Family, gauge::Gauge};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{mpsc, OwnedSemaphorePermit, Semaphore},
};
use tokio_rustls::{server::TlsStream, TlsAcceptor};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::{Connected, TcpConnectInfo};

use super::metrics::ReasonLabel;

/// Connections open at once on the ext_proc port, handshaking ones included.
pub const MAX_CONNECTIONS: usize = 1024;
/// From accept to the end of the HTTP/2 preface (TLS handshake included).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// HTTP/2 streams one connection may have open. Every ext_proc stream lives as long as its
/// LLM request (minutes when streaming), and a gateway may carry all of them on one connection
/// (Envoy opens another past this; a client that does not waits), so it is set far above a
/// replica's concurrency, only to stop one connection from holding unbounded state.
pub const MAX_STREAMS_PER_CONNECTION: u32 = 4096;
/// HTTP/2 flow-control windows: large request bodies arrive as single messages, and small
/// windows would throttle them.
pub const STREAM_WINDOW_BYTES: u32 = 4 << 20;
pub const CONNECTION_WINDOW_BYTES: u32 = 16 << 20;
/// Decoded size of one request's header list: ext_proc's gRPC metadata is a few hundred bytes
/// (the HTTP headers travel inside messages, bounded by `DYN_EPP_MAX_BODY_BYTES`).
pub const MAX_HEADER_LIST_BYTES: u32 = 16 * 1024;
/// An HTTP/2 PING after this much silence; no answer within [`KEEPALIVE_TIMEOUT`] closes the
/// connection, ending its streams (and freeing their bookings) when a gateway vanished.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// Streams a client may open and reset before we accept them, and streams our errors may
/// reset, before the connection is closed (rapid-reset floods). These are hyper's defaults,
/// set here because tonic passes "unset" through, which for the second means unlimited.
pub const MAX_PENDING_ACCEPT_RESETS: usize = 20;
pub const MAX_LOCAL_ERROR_RESETS: usize = 1024;
/// Pause after a failed accept (out of descriptors, say) before the next.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// Every HTTP/2 client starts with these bytes (RFC 9113 §3.4).
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// What the accept loop reports: `dynamo_epp_connections`, `dynamo_epp_handshake_failures_total`.
#[derive(Clone)]
pub struct ConnMetrics {
    pub open: Gauge,
    pub handshake_failures: Family<ReasonLabel, Counter>,
}

/// The stream tonic serves: accepted connections whose handshake finished, each holding its
/// slot until it closes. Dropping it (tonic stops accepting at shutdown) closes the listener.
pub fn incoming(listener: TcpListener, tls: Option<TlsAcceptor>, metrics: ConnMetrics) -> ReceiverStream<io::Result<Conn>> {
    let (tx, rx) = mpsc::channel(64);
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    tokio::spawn(async move {
        loop {
            let permit = tokio::select! {
                _ = tx.closed() => return,
                p = slots.clone().acquire_owned() => p.expect("never closed"),
            };
            let tcp = tokio::select! {
                _ = tx.closed() => return,
                r = listener.accept() => match r {
                    Ok((tcp, _)) => tcp,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(ACCEPT_BACKOFF).await;
                        continue;
                    }
                },
            };
            // Nagle off: a headers response followed by a body chunk would otherwise wait
            // ~40 ms for the peer's delayed ACK.
            let _ = tcp.set_nodelay(true);
            let slot = Slot::new(permit, metrics.open.clone());
            let (tx, tls, failures) = (tx.clone(), tls.clone(), metrics.handshake_failures.clone());
            tokio::spawn(async move {
                let reason = match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake(tcp, tls)).await {
                    Ok(Ok(io)) => {
                        let _ = tx.send(Ok(Conn { io, preface_sent: 0, _slot: slot })).await;
                        return;
                    }
                    Ok(Err(reason)) => reason,
                    Err(_) => "timeout",
                };
                failures.get_or_create(&ReasonLabel { reason }).inc();
                tracing::debug!(reason, "connection closed before its handshake finished");
            });
        }
    });
    ReceiverStream::new(rx)
}

/// TLS if configured, then the client's HTTP/2 preface (read here, replayed to hyper, so a
/// silent client is under the deadline too: hyper starts its keep-alive pings only after it).
async fn handshake(tcp: TcpStream, tls: Option<TlsAcceptor>) -> Result<Io, &'static str> {
    let mut io = match tls {
        None => Io::Plain(tcp),
        Some(acceptor) => Io::Tls(Box::new(acceptor.accept(tcp).await.map_err(|_| "tls")?)),
    };
    let mut preface = [0u8; PREFACE.len()];
    io.read_exact(&mut preface).await.map_err(|_| "preface")?;
    if &preface != PREFACE {
        return Err("preface");
    }
    Ok(io)
}

/// One connection's place under [`MAX_CONNECTIONS`], counted while held.
struct Slot {
    _permit: OwnedSemaphorePermit,
    open: Gauge,
}

impl Slot {
    fn new(permit: OwnedSemaphorePermit, open: Gauge) -> Self {
        open.inc();
        Slot { _permit: permit, open }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.open.dec();
    }
}

pub enum Io {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

/// An accepted connection: its preface (already read) is replayed first.
pub struct Conn {
    io: Io,
    preface_sent: usize,
    _slot: Slot,
}

impl Connected for Conn {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        match &self.io {
            Io::Plain(t) => t.connect_info(),
            Io::Tls(t) => t.get_ref().0.connect_info(),
        }
    }
}

impl AsyncRead for Io {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(t) => Pin::new(t).poll_read(cx, buf),
            Io::Tls(t) => Pin::new(t).poll_read(cx, buf),
        }
    }
}

impl AsyncRead for Conn {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.preface_sent < PREFACE.len() {
            let rest = &PREFACE[this.preface_sent..];
            let n = rest.len().min(buf.remaining());
            buf.put_slice(&rest[..n]);
            this.preface_sent += n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Conn {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().io {
            Io::Plain(t) => Pin::new(t).poll_write(cx, data),
            Io::Tls(t) => Pin::new(t).poll_write(cx, data),
        }
    }

    fn poll_write_vectored(self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().io {
            Io::Plain(t) => Pin::new(t).poll_write_vectored(cx, bufs),
            Io::Tls(t) => Pin::new(t).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match &self.io {
            Io::Plain(t) => t.is_write_vectored(),
            Io::Tls(t) => t.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Plain(t) => Pin::new(t).poll_flush(cx),
            Io::Tls(t) => Pin::new(t).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Plain(t) => Pin::new(t).poll_shutdown(cx),
            Io::Tls(t) => Pin::new(t).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;
    use tokio_stream::StreamExt;

    fn metrics() -> ConnMetrics {
        ConnMetrics { open: Gauge::default(), handshake_failures: Family::default() }
    }

    #[tokio::test]
    async fn a_plaintext_connection_is_handed_over_after_its_preface_which_is_replayed() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let m = metrics();
        let mut conns = incoming(l, None, m.clone());
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(PREFACE).await.unwrap();
        c.write_all(b"settings").await.unwrap();
        let mut conn = conns.next().await.unwrap().unwrap();
        assert_eq!(m.open.get(), 1);
        let mut got = vec![0u8; PREFACE.len() + 8];
        conn.read_exact(&mut got).await.unwrap();
        assert_eq!(&got[..24], PREFACE);
        assert_eq!(&got[24..], b"settings");
        drop(conn);
        assert_eq!(m.open.get(), 0);
        // Not HTTP/2: dropped at the preface, never handed over.
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
        let mut buf = [0u8; 1];
        // Closed with bytes unread: a reset rather than an end of stream.
        assert!(matches!(c.read(&mut buf).await, Ok(0) | Err(_)), "closed");
        let failures = m.handshake_failures.get_or_create(&ReasonLabel { reason: "preface" });
        for _ in 0..100 {
            if failures.get() == 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(failures.get(), 1);
        assert_eq!(m.open.get(), 0);
    }
}
