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
//! that much memory and never stalls the node or other peers. A write that makes no
//! progress for the write timeout fails the connection: a peer that stops reading while
//! it sends nothing more (so the queue never grows) is cut off too. A close does not wait
//! behind a blocked write: what is still queued gets [`CLOSE_GRACE`], then the socket goes.
//!
//! Socket events reach the node through one bounded channel. Data events are bounded by
//! the read gating (one per connection); when the channel is full, the listener stops
//! accepting (the kernel's backlog pushes back) and connection tasks wait before reading.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio::sync::mpsc::{Sender, UnboundedReceiver, UnboundedSender, unbounded_channel};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::tls::{Role, TlsConfig};

/// Size of one read from a socket.
const READ_CHUNK: usize = 64 * 1024;

/// How long a closing connection may still spend writing what is queued for it.
pub(crate) const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// Socket events waiting for the node, at most.
pub(crate) const EVENT_QUEUE: usize = 256;

/// First and longest pause after a failed accept.
const ACCEPT_BACKOFF: (Duration, Duration) = (Duration::from_millis(10), Duration::from_secs(1));

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
///
/// Its command channel is unbounded but bounded in fact: `Write`s are counted in
/// `pending`, which the node keeps under its write-queue limit, and the node sends at most
/// one `Read` per data event, one `StartTls` per handshake and one `Close`.
#[derive(Debug)]
pub(crate) struct ConnHandle {
    pub(crate) tx: UnboundedSender<ConnCmd>,
    /// Bytes queued but not written yet.
    pub(crate) pending: Arc<AtomicUsize>,
    /// Signalled on close, so that a write in progress stops waiting for a stuck peer.
    closing: Arc<Notify>,
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

    /// Writes what is queued (for at most [`CLOSE_GRACE`]), then closes the socket.
    pub(crate) fn close(&self) {
        self.closing.notify_one();
        let _ = self.tx.send(ConnCmd::Close);
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
pub(crate) fn spawn_listener(listener: TcpListener, events: Sender<SocketEvent>) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut backoff = ACCEPT_BACKOFF.0;
        loop {
            match listener.accept().await {
                Ok((stream, peer)) => {
                    backoff = ACCEPT_BACKOFF.0;
                    tune(&stream);
                    // Waits while the node is behind: connections wait in the backlog.
                    if events
                        .send(SocketEvent::Accepted(stream, peer.to_string()))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
                Err(e) => {
                    // Out of file descriptors and similar: the condition lasts, so back
                    // off (doubling, capped) instead of spinning and flooding the log.
                    tracing::warn!("accept failed: {e}; retrying in {backoff:?}");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(ACCEPT_BACKOFF.1);
                }
            }
        }
    })
}

/// Opens an outgoing connection for `conn`.
pub(crate) fn spawn_connect(
    conn: u64,
    addr: String,
    timeout: Duration,
    events: Sender<SocketEvent>,
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
        let _ = events.send(event).await;
    });
}

/// Starts the task that owns connection `conn`'s socket.
pub(crate) fn spawn_conn(
    conn: u64,
    stream: TcpStream,
    tls: Option<TlsConfig>,
    write_timeout: Duration,
    events: Sender<SocketEvent>,
) -> ConnHandle {
    let (tx, rx) = unbounded_channel();
    let pending = Arc::new(AtomicUsize::new(0));
    let closing = Arc::new(Notify::new());
    let task = tokio::spawn(run_conn(
        Conn {
            id: conn,
            tls,
            write_timeout,
            pending: pending.clone(),
            closing: closing.clone(),
        },
        stream,
        rx,
        events,
    ));
    ConnHandle {
        tx,
        pending,
        closing,
        task,
    }
}

/// What a connection task knows besides its socket and channels.
struct Conn {
    id: u64,
    tls: Option<TlsConfig>,
    write_timeout: Duration,
    pending: Arc<AtomicUsize>,
    closing: Arc<Notify>,
}

trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

async fn run_conn(
    c: Conn,
    stream: TcpStream,
    mut rx: UnboundedReceiver<ConnCmd>,
    events: Sender<SocketEvent>,
) {
    let conn = c.id;
    let mut stream: Box<dyn Stream> = Box::new(stream);
    let mut buf = vec![0; READ_CHUNK];
    let mut may_read = true;
    // Set once the node closes the connection: when the last write must be done.
    let mut close_by = None;
    let end = loop {
        tokio::select! {
            cmd = rx.recv() => match cmd {
                Some(ConnCmd::Read) => may_read = true,
                Some(ConnCmd::Write(bytes)) => {
                    if let Err(reason) = write_out(&mut stream, &bytes, &c, &mut close_by).await {
                        break Some(SocketEvent::Failed(conn, reason));
                    }
                }
                Some(ConnCmd::StartTls(role, leftover)) => {
                    let Some(tls) = &c.tls else {
                        break Some(SocketEvent::Failed(conn, "TLS requested but no certificate configured".into()));
                    };
                    // The engine's handshake deadline closes a stuck handshake: the close
                    // must not wait for it.
                    tokio::select! {
                        started = tls.start(Prefixed { prefix: leftover, at: 0, inner: stream }, role) => match started {
                            Ok(s) => stream = Box::new(s),
                            Err(e) => break Some(SocketEvent::Failed(conn, format!("TLS handshake failed: {e}"))),
                        },
                        () = c.closing.notified() => break None,
                    }
                }
                Some(ConnCmd::Close) | None => {
                    let _ = tokio::time::timeout(CLOSE_GRACE, stream.shutdown()).await;
                    break None;
                }
            },
            read = stream.read(&mut buf), if may_read => match read {
                Ok(0) => break Some(SocketEvent::Eof(conn)),
                Ok(n) => {
                    may_read = false;
                    if events.send(SocketEvent::Data(conn, buf[..n].to_vec())).await.is_err() {
                        break None;
                    }
                }
                Err(e) => break Some(SocketEvent::Failed(conn, e.to_string())),
            },
        }
    };
    if let Some(event) = end {
        let _ = events.send(event).await;
    }
}

/// Writes `bytes`, counting them off `pending` as they go. Fails when the peer takes
/// nothing for the write timeout, or once the connection is closing and [`CLOSE_GRACE`]
/// has passed.
async fn write_out(
    stream: &mut Box<dyn Stream>,
    mut bytes: &[u8],
    c: &Conn,
    close_by: &mut Option<Instant>,
) -> Result<(), String> {
    while !bytes.is_empty() {
        let stall = Instant::now() + c.write_timeout;
        let deadline = close_by.map_or(stall, |close| close.min(stall));
        tokio::select! {
            written = tokio::time::timeout_at(deadline, stream.write(bytes)) => match written {
                Ok(Ok(0)) => return Err("connection closed while writing".into()),
                Ok(Ok(n)) => {
                    c.pending.fetch_sub(n, Ordering::AcqRel);
                    bytes = bytes.get(n..).unwrap_or_default();
                }
                Ok(Err(e)) => return Err(e.to_string()),
                Err(_) if close_by.is_some() => return Err("closed with unwritten data".into()),
                Err(_) => {
                    return Err(format!(
                        "peer does not read: nothing written for {} ms",
                        c.write_timeout.as_millis()
                    ));
                }
            },
            () = c.closing.notified(), if close_by.is_none() => {
                *close_by = Some(Instant::now() + CLOSE_GRACE);
            }
        }
    }
    Ok(())
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
