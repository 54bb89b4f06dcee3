//! Sockets for a node: listeners, outgoing connections, and one task per connection that
//! reads, writes and switches to TLS where the engine says.
//!
//! A connection task reads once, hands the bytes to the node, and reads again only when
//! the node says so ([`ConnCmd::Read`], sent after the engine has seen the bytes): the
//! engine may answer them with "start TLS", and bytes read after that point belong to TLS,
//! not to the node. (Reading ahead would hand the peer's first TLS records to the engine
//! as plaintext.) Each read takes up to 64 KiB, so this costs one message per read.
//!
//! Backpressure: writes to one connection are queued for its task; the bytes not yet
//! written are counted ([`ConnHandle::pending`]) and the node closes a connection whose
//! queue grows past its limit (a peer that does not read), so a slow peer costs at most
//! that much memory and never stalls the node or other peers.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};
use tokio::task::JoinHandle;

use crate::tls::{Role, TlsConfig};

/// Size of one read from a socket.
const READ_CHUNK: usize = 64 * 1024;

/// What socket tasks tell the node.
#[derive(Debug)]
pub(crate) enum SocketEvent {
    Accepted(TcpStream, String),
    Connected(u64, TcpStream),
    ConnectFailed(u64, String),
    Data(u64, Vec<u8>),
    Eof(u64),
    Failed(u64, String),
}

/// What the node tells a connection task.
#[derive(Debug)]
pub(crate) enum ConnCmd {
    Write(Vec<u8>),
    /// The bytes read last were handed to the engine: read again.
    Read,
    StartTls(Role, Vec<u8>),
    Close,
}

/// The node's side of a connection task.
#[derive(Debug)]
pub(crate) struct ConnHandle {
    pub(crate) tx: UnboundedSender<ConnCmd>,
    /// Bytes queued but not written yet.
    pub(crate) pending: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl ConnHandle {
    /// Queues bytes; returns how many bytes are now waiting to be written.
    pub(crate) fn write(&self, bytes: Vec<u8>) -> usize {
        let total = self.pending.fetch_add(bytes.len(), Ordering::AcqRel) + bytes.len();
        // A send error means the task ended; its end is reported separately.
        let _ = self.tx.send(ConnCmd::Write(bytes));
        total
    }

    /// Ends the task at once, dropping unwritten bytes.
    pub(crate) fn abort(&self) {
        self.task.abort();
    }
}

/// Sets the socket options every connection gets: no Nagle delay, TCP keepalive.
fn tune(stream: &TcpStream) {
    // Both are optimisations; a socket that refuses them still works.
    let _ = stream.set_nodelay(true);
    let _ = socket2::SockRef::from(stream).set_keepalive(true);
}

/// Accepts connections on `listener` until the node goes away.
pub(crate) fn spawn_listener(
    listener: TcpListener,
    events: UnboundedSender<SocketEvent>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((stream, peer)) => {
                    tune(&stream);
                    if events
                        .send(SocketEvent::Accepted(stream, peer.to_string()))
                        .is_err()
                    {
                        return;
                    }
                }
                Err(e) => {
                    tracing::warn!("accept failed: {e}");
                    // Out of file descriptors and similar: back off instead of spinning.
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            }
        }
    })
}

/// Opens an outgoing connection for `conn`.
pub(crate) fn spawn_connect(
    conn: u64,
    addr: String,
    timeout: std::time::Duration,
    events: UnboundedSender<SocketEvent>,
) {
    tokio::spawn(async move {
        let event = match tokio::time::timeout(timeout, TcpStream::connect(&addr)).await {
            Ok(Ok(stream)) => {
                tune(&stream);
                SocketEvent::Connected(conn, stream)
            }
            Ok(Err(e)) => SocketEvent::ConnectFailed(conn, format!("{addr}: {e}")),
            Err(_) => SocketEvent::ConnectFailed(conn, format!("{addr}: connect timeout")),
        };
        let _ = events.send(event);
    });
}

/// Starts the task that owns connection `conn`'s socket.
pub(crate) fn spawn_conn(
    conn: u64,
    stream: TcpStream,
    tls: Option<TlsConfig>,
    events: UnboundedSender<SocketEvent>,
) -> ConnHandle {
    let (tx, rx) = unbounded_channel();
    let pending = Arc::new(AtomicUsize::new(0));
    let task = tokio::spawn(run_conn(conn, stream, tls, rx, events, pending.clone()));
    ConnHandle { tx, pending, task }
}

trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

async fn run_conn(
    conn: u64,
    stream: TcpStream,
    tls: Option<TlsConfig>,
    mut rx: UnboundedReceiver<ConnCmd>,
    events: UnboundedSender<SocketEvent>,
    pending: Arc<AtomicUsize>,
) {
    let mut stream: Box<dyn Stream> = Box::new(stream);
    let mut buf = vec![0; READ_CHUNK];
    let mut may_read = true;
    let end = loop {
        tokio::select! {
            cmd = rx.recv() => match cmd {
                Some(ConnCmd::Read) => may_read = true,
                Some(ConnCmd::Write(bytes)) => {
                    let result = stream.write_all(&bytes).await;
                    pending.fetch_sub(bytes.len(), Ordering::AcqRel);
                    if let Err(e) = result {
                        break Some(SocketEvent::Failed(conn, e.to_string()));
                    }
                }
                Some(ConnCmd::StartTls(role, leftover)) => {
                    let Some(tls) = &tls else {
                        break Some(SocketEvent::Failed(conn, "TLS requested but no certificate configured".into()));
                    };
                    match tls.start(Prefixed { prefix: leftover, at: 0, inner: stream }, role).await {
                        Ok(s) => stream = Box::new(s),
                        Err(e) => break Some(SocketEvent::Failed(conn, format!("TLS handshake failed: {e}"))),
                    }
                }
                Some(ConnCmd::Close) | None => {
                    let _ = stream.shutdown().await;
                    break None;
                }
            },
            read = stream.read(&mut buf), if may_read => match read {
                Ok(0) => break Some(SocketEvent::Eof(conn)),
                Ok(n) => {
                    may_read = false;
                    if events.send(SocketEvent::Data(conn, buf[..n].to_vec())).is_err() {
                        break None;
                    }
                }
                Err(e) => break Some(SocketEvent::Failed(conn, e.to_string())),
            },
        }
    };
    if let Some(event) = end {
        let _ = events.send(event);
    }
}

/// A stream that first yields bytes already read from it (the TLS records the engine
/// received together with the greeting), then reads on.
struct Prefixed<S> {
    prefix: Vec<u8>,
    at: usize,
    inner: S,
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if let Some(rest) = this.prefix.get(this.at..).filter(|r| !r.is_empty()) {
            let n = rest.len().min(buf.remaining());
            buf.put_slice(&rest[..n]);
            this.at += n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, data)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
