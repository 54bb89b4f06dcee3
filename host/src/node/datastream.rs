//! Data connections on the Rust API: the stream a node hands over once a data connection
//! (`aemp-dataconn`) is authenticated, and the handle incoming ones come to.
//!
//! The socket and its TLS session leave the driver as they are (an [`io::Conn`]), so
//! the stream is read and written on the application's task, not the node's: bulk data
//! costs the node nothing. `tokio-rustls` cannot take over a session that is already
//! running (the engine's connection started it mid-stream), so the stream drives rustls
//! itself, with the same code the driver uses.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use aemp_engine::Value;
use tokio::io::{AsyncRead, AsyncWrite, DuplexStream, ReadBuf};
use tokio::sync::mpsc;

use super::io::{Conn, End};

/// Bytes a [`DataStream`] takes from writes before they reach the socket, at most: a
/// writer that outruns its peer waits.
const WRITE_AHEAD: usize = 256 * 1024;

/// Bytes one write takes at most (the rest is the caller's next write).
const WRITE_CHUNK: usize = 64 * 1024;

/// Bytes read from the socket in one go.
const READ_CHUNK: usize = 64 * 1024;

/// Incoming data connections waiting for their [`DataConnections`] handle, at most;
/// past it they are closed.
pub(super) const INCOMING_QUEUE: usize = 64;

/// One data connection: a raw byte stream to another node, authenticated (and inside
/// TLS when the network uses it) as the node's connections are. From
/// [`Node::data_connect`](super::Node::data_connect) or a [`DataConnections`] handle.
/// One to the node itself is an in-memory pipe, as the reference's is a socketpair.
///
/// Read and write it as any tokio stream (`tokio::io::split` or `copy_bidirectional`
/// for both at once). [`AsyncWriteExt::shutdown`](tokio::io::AsyncWriteExt::shutdown)
/// ends our side (the peer reads the end of the stream); dropping it closes the
/// connection.
pub struct DataStream {
    io: Inner,
    id: String,
    node: String,
    handler: String,
    args: Vec<Value>,
}

enum Inner {
    /// (Boxed: streams move through queues.)
    Socket(Box<Socket>),
    Local(DuplexStream),
}

/// A handed-over connection's socket with what was read and not taken yet.
struct Socket {
    conn: Conn,
    /// Bytes read and not taken yet: `head[at..]`.
    head: Vec<u8>,
    at: usize,
    /// How reading ended, once it has, for after `head` is taken.
    end: Option<End>,
    scratch: Vec<u8>,
    /// Our side is ended (close_notify queued).
    shut: bool,
}

impl std::fmt::Debug for DataStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataStream")
            .field("id", &self.id)
            .field("node", &self.node)
            .field("handler", &self.handler)
            .finish_non_exhaustive()
    }
}

impl DataStream {
    /// The stream of a handed-over connection.
    pub(super) fn new(conn: Conn, setup: Setup) -> Self {
        let socket = Socket {
            conn,
            head: Vec::new(),
            at: 0,
            end: None,
            scratch: vec![0; READ_CHUNK],
            shut: false,
        };
        DataStream::with(Inner::Socket(Box::new(socket)), setup)
    }

    /// Both ends of a data connection of node `setup.node` to itself: the asker's,
    /// then the handler's.
    pub(super) fn pair(setup: Setup) -> (DataStream, DataStream) {
        let (a, b) = tokio::io::duplex(WRITE_AHEAD);
        let other = Setup {
            requested: false,
            ..setup.clone()
        };
        (
            DataStream::with(Inner::Local(a), setup),
            DataStream::with(Inner::Local(b), other),
        )
    }

    fn with(io: Inner, setup: Setup) -> Self {
        DataStream {
            io,
            id: setup.id,
            node: setup.node,
            handler: setup.handler,
            args: setup.args,
        }
    }

    /// The data connection's id (`b@NODE`, as the reference makes them).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The node at the other end.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// The name of the data handler that serves it on the node that was asked.
    pub fn handler(&self) -> &str {
        &self.handler
    }

    /// The arguments the asking node gave its handler.
    pub fn args(&self) -> &[Value] {
        &self.args
    }
}

impl AsyncRead for DataStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Inner::Socket(s) => s.poll_read(cx, buf),
            Inner::Local(d) => Pin::new(d).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for DataStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().io {
            Inner::Socket(s) => s.poll_write(cx, buf),
            Inner::Local(d) => Pin::new(d).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Inner::Socket(s) => s.poll_flush(cx),
            Inner::Local(d) => Pin::new(d).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Inner::Socket(s) => s.poll_shutdown(cx),
            Inner::Local(d) => Pin::new(d).poll_shutdown(cx),
        }
    }
}

impl Socket {
    /// Writes what waits for the socket, as far as it takes it now.
    fn flush_some(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        self.conn.write_with(cx).map_err(io::Error::other)
    }

    fn poll_read(&mut self, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        loop {
            if let Some(rest) = self.head.get(self.at..).filter(|r| !r.is_empty()) {
                let n = rest.len().min(buf.remaining());
                buf.put_slice(rest.get(..n).unwrap_or_default());
                self.at += n;
                return Poll::Ready(Ok(()));
            }
            match &self.end {
                Some(End::Eof) => return Poll::Ready(Ok(())),
                Some(End::Failed(reason)) => {
                    return Poll::Ready(Err(io::Error::other(reason.clone())));
                }
                None => {}
            }
            // The engine's last handshake bytes (and TLS's answers) leave even when the
            // application only reads: the peer may wait for them.
            self.flush_some(cx)?;
            if let Some(socket) = self.conn.bare() {
                // No copy through our buffers: the usual case without TLS.
                return Pin::new(socket).poll_read(cx, buf);
            }
            let got = self.conn.read(&mut self.scratch, cx);
            self.head = got.data;
            self.at = 0;
            self.end = got.end;
            if self.head.is_empty() && self.end.is_none() {
                return Poll::Pending;
            }
        }
    }

    fn poll_write(&mut self, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        if self.shut {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        if let Some(socket) = self.conn.bare() {
            return Pin::new(socket).poll_write(cx, buf);
        }
        if self.conn.pending() >= WRITE_AHEAD {
            self.flush_some(cx)?;
            if self.conn.pending() >= WRITE_AHEAD {
                return Poll::Pending;
            }
        }
        let n = buf.len().min(WRITE_CHUNK);
        let bytes = buf.get(..n).unwrap_or_default().to_vec();
        self.conn.queue(bytes).map_err(io::Error::other)?;
        self.flush_some(cx)?;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.flush_some(cx)?;
        if self.conn.pending() > 0 {
            Poll::Pending
        } else {
            Poll::Ready(Ok(()))
        }
    }

    fn poll_shutdown(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.shut {
            self.conn.close_notify().map_err(io::Error::other)?;
            self.shut = true;
        }
        self.flush_some(cx)?;
        if self.conn.pending() > 0 {
            return Poll::Pending;
        }
        Poll::Ready(self.conn.shut_down())
    }
}

/// Incoming data connections for one data handler, from
/// [`Node::handle_data_connections`](super::Node::handle_data_connections). Up to 64
/// wait for [`DataConnections::accept`]; more are closed (with a warning) until it
/// takes them.
#[derive(Debug)]
pub struct DataConnections {
    name: String,
    rx: mpsc::Receiver<DataStream>,
}

impl DataConnections {
    pub(super) fn new(name: String, rx: mpsc::Receiver<DataStream>) -> Self {
        DataConnections { name, rx }
    }

    /// The data handler's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The next incoming data connection; `None` once the node is gone or another
    /// handle took this handler's over. Cancel-safe.
    pub async fn accept(&mut self) -> Option<DataStream> {
        self.rx.recv().await
    }
}

/// What the engine says about a handed-over data connection (its `setup`).
#[derive(Debug, Clone)]
pub(super) struct Setup {
    pub(super) id: String,
    pub(super) node: String,
    /// The requesting port (ours when `requested`).
    pub(super) port: String,
    pub(super) handler: String,
    pub(super) args: Vec<Value>,
    /// We asked for it (else the other node did and our handler `handler` serves it).
    pub(super) requested: bool,
}

impl Setup {
    /// From the CBOR array `[ID, NODE, PORT, HANDLER, INIT-ARGS, REQUESTED]`.
    pub(super) fn decode(bytes: &[u8]) -> Option<Setup> {
        let Ok(Value::Array(items)) = Value::decode(bytes) else {
            return None;
        };
        let mut items = items.into_iter();
        let mut text = || match items.next() {
            Some(Value::Text(t)) => Some(t),
            _ => None,
        };
        let (id, node, port, handler) = (text()?, text()?, text()?, text()?);
        let Some(Value::Array(args)) = items.next() else {
            return None;
        };
        let Some(Value::Bool(requested)) = items.next() else {
            return None;
        };
        Some(Setup {
            id,
            node,
            port,
            handler,
            args,
            requested,
        })
    }
}
