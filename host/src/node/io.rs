//! The sockets of a node, owned by its driver task: listeners, connections, TLS.
//!
//! Nothing here runs on its own: the driver calls in once per round. Each connection has
//! its own [`Waker`], which puts the connection on a ready list and wakes the driver, so
//! a round touches only the sockets that became ready, with non-blocking reads and writes
//! (`try_read`/`try_write`; readiness is re-armed with `poll_read_ready`/
//! `poll_write_ready` when a socket has nothing more). Outgoing connects are the one
//! exception: each is a small task that reports through a bounded channel.
//!
//! TLS is rustls driven sans-IO in the same task: bytes read go through `read_tls`/
//! `process_new_packets`, plaintext for the peer through `writer`/`write_tls`. A
//! connection's bytes are handed to the engine and its outputs acted on (a start-TLS
//! among them) before that socket is read again, so bytes after the switch point never
//! reach the engine as plaintext: the engine returns them as the start-TLS `leftover`,
//! and they go to rustls first.
//!
//! Writes: the engine's output for a connection is appended to that connection's write
//! buffer and written once per round (one contiguous buffer). What is not written yet is
//! counted ([`Io::pending`]); the driver closes a connection whose buffer grows past its
//! limit, and [`Io::expire`] fails one whose writes make no progress for the write
//! timeout. A close writes what is queued for at most [`CLOSE_GRACE`], then drops.

use std::collections::{HashMap, HashSet};
use std::future::{Future, poll_fn};
use std::io::{self, Read, Write};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc::Sender;
use tokio::time::{Instant, Sleep};

use crate::tls::{Role, TlsConfig};

/// Bytes read from one connection in one round, at most.
const READ_CHUNK: usize = 64 * 1024;

/// Bytes read from all connections in one round, about (one read more): what one
/// round hands the engine stays small beside its memory budget for peers however many
/// connections are ready. The connections not read go first in the next round.
const READ_ROUND: usize = 4 << 20;

/// How long a closing connection may still spend writing what is queued for it.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// Connections accepted from one listener in one round, at most. Each new connection at
/// the engine's handshake cap pushes out the oldest handshake, and a peer's handshake
/// takes a few rounds (more with TLS): few accepts a round keep it well inside the
/// `max_handshakes` (256) arrivals it may take, however fast a flood reconnects.
const ACCEPTS_PER_ROUND: usize = 16;

/// First and longest pause after a failed accept.
const ACCEPT_BACKOFF: (Duration, Duration) = (Duration::from_millis(10), Duration::from_secs(1));

/// File descriptors left free when accepting: for the nodes' dials and listeners and the
/// process's files. Accepting stops this far short of the open-file limit.
const FD_HEADROOM: usize = 64;

/// Connections held by every node of this process (each is a file descriptor).
static OPEN_CONNS: AtomicUsize = AtomicUsize::new(0);

/// How many more connections may be accepted before the process is within
/// [`FD_HEADROOM`] of its open-file limit.
fn fd_room() -> usize {
    let limit = rlimit::getrlimit(rlimit::Resource::NOFILE).map_or(1024, |(soft, _)| {
        usize::try_from(soft).unwrap_or(usize::MAX)
    });
    limit
        .saturating_sub(FD_HEADROOM)
        .saturating_sub(OPEN_CONNS.load(Ordering::Relaxed))
}

/// A write buffer keeps at most this much room once it has been written out.
const KEEP_CAPACITY: usize = 256 * 1024;

/// Results of outgoing connects waiting for the driver, at most.
pub(super) const DIAL_QUEUE: usize = 256;

/// What an outgoing connect task reports.
#[derive(Debug)]
pub(super) enum Dialed {
    Connected(u64, TcpStream),
    Failed(u64, String),
}

/// How a connection ended on the host's side; the engine must be told.
#[derive(Debug)]
pub(super) enum End {
    /// The peer closed its side.
    Eof,
    /// A socket or TLS error.
    Failed(String),
}

/// What a round of reads produced.
#[derive(Debug, Default)]
pub(super) struct Polled {
    /// Sockets accepted, with the peer's address.
    pub(super) accepted: Vec<(TcpStream, String)>,
    /// Bytes read (decrypted) per connection, in the order the connections were read.
    pub(super) inputs: Vec<(u64, Vec<u8>)>,
}

/// Something that can become ready.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Token {
    Listener(usize),
    Conn(u64),
}

/// The ready list, shared with the wakers.
#[derive(Debug, Default)]
struct Ready {
    tokens: Vec<Token>,
    driver: Option<Waker>,
}

#[derive(Debug, Default)]
struct Shared(Mutex<Ready>);

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Ready> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn push(&self, token: Token) {
        let driver = {
            let mut ready = self.lock();
            ready.tokens.push(token);
            ready.driver.take()
        };
        if let Some(driver) = driver {
            driver.wake();
        }
    }
}

/// The waker of one socket: marks it ready and wakes the driver.
struct TokenWaker {
    token: Token,
    shared: Arc<Shared>,
}

impl Wake for TokenWaker {
    fn wake(self: Arc<Self>) {
        self.shared.push(self.token);
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.shared.push(self.token);
    }
}

struct Listener {
    socket: TcpListener,
    waker: Waker,
    backoff: Duration,
    /// Set after a failed accept: no accepts until it fires.
    paused: Option<Pin<Box<Sleep>>>,
}

/// One socket with its TLS session and buffers: the driver's while the engine speaks on
/// it, the application's [`super::DataStream`] once it is a data connection's.
pub(super) struct Conn {
    stream: TcpStream,
    waker: Waker,
    tls: Option<Box<rustls::Connection>>,
    /// Plaintext for the peer while the TLS handshake runs (counted as pending).
    early: Vec<u8>,
    /// Decrypted bytes not handed to the engine yet (from a start-TLS leftover).
    plain: Vec<u8>,
    /// Bytes for the socket; `out[sent..]` are not written yet.
    out: Vec<u8>,
    sent: usize,
    /// The last write progress, or when bytes started waiting.
    progress: Instant,
    /// Set once the engine closed the connection: when to drop it, written or not.
    closing: Option<Instant>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        OPEN_CONNS.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What one read of a connection gave.
pub(super) struct Got {
    pub(super) data: Vec<u8>,
    pub(super) end: Option<End>,
    /// The round's budget ran out before the socket was drained.
    more: bool,
}

impl Conn {
    fn unwritten(&self) -> usize {
        self.out.len().saturating_sub(self.sent)
    }

    /// Bytes for the peer not written yet.
    pub(super) fn pending(&self) -> usize {
        self.unwritten() + self.early.len()
    }

    /// When the connection must be given up if no write progresses before.
    fn deadline(&self, write_timeout: Duration) -> Option<Instant> {
        let stall = (self.unwritten() > 0).then(|| self.progress + write_timeout);
        match (stall, self.closing) {
            (Some(s), Some(c)) => Some(s.min(c)),
            (s, c) => s.or(c),
        }
    }

    /// Reads what the socket has, up to the round's budget; `cx` is woken when it has
    /// more.
    pub(super) fn read(&mut self, scratch: &mut [u8], cx: &mut Context<'_>) -> Got {
        let mut data = std::mem::take(&mut self.plain);
        let mut budget = READ_CHUNK.min(scratch.len());
        let end = loop {
            if budget == 0 {
                return Got {
                    data,
                    end: None,
                    more: true,
                };
            }
            let buf = scratch.get_mut(..budget).unwrap_or_default();
            match self.stream.try_read(buf) {
                Ok(0) => break Some(End::Eof),
                Ok(n) => {
                    budget -= n;
                    match self.take_in(buf.get(..n).unwrap_or_default(), &mut data) {
                        Ok(true) => {}
                        Ok(false) => break Some(End::Eof),
                        Err(reason) => break Some(End::Failed(reason)),
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    match self.stream.poll_read_ready(cx) {
                        Poll::Pending => break None,
                        Poll::Ready(Ok(())) => {}
                        Poll::Ready(Err(e)) => break Some(End::Failed(e.to_string())),
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => break Some(End::Failed(e.to_string())),
            }
        };
        Got {
            data,
            end,
            more: false,
        }
    }

    /// Takes bytes from the socket: as they are, or through TLS. False once the peer
    /// closed its TLS session.
    fn take_in(&mut self, mut bytes: &[u8], data: &mut Vec<u8>) -> Result<bool, String> {
        let Some(tls) = &mut self.tls else {
            data.extend_from_slice(bytes);
            return Ok(true);
        };
        let mut open = true;
        while !bytes.is_empty() {
            if tls.read_tls(&mut bytes).map_err(|e| e.to_string())? == 0 {
                // rustls takes nothing more (it would have said why): no endless loop.
                return Err("TLS takes no more input".into());
            }
            let state = match tls.process_new_packets() {
                Ok(state) => state,
                Err(e) => {
                    let reason = if tls.is_handshaking() {
                        format!("TLS handshake failed: {e}")
                    } else {
                        e.to_string()
                    };
                    // The alert rustls queued tells the peer why; best effort.
                    let _ = tls.write_tls(&mut self.out);
                    let _ = self.write();
                    return Err(reason);
                }
            };
            let n = state.plaintext_bytes_to_read();
            if n > 0 {
                let start = data.len();
                data.resize(start + n, 0);
                let dest = data.get_mut(start..).unwrap_or_default();
                tls.reader().read_exact(dest).map_err(|e| e.to_string())?;
            }
            open &= !state.peer_has_closed();
        }
        self.tls_out()?;
        Ok(open)
    }

    /// Moves what rustls has for the peer into the write buffer; once the handshake is
    /// done, the plaintext that waited for it goes first.
    fn tls_out(&mut self) -> Result<(), String> {
        let idle = self.unwritten() == 0;
        let Some(tls) = &mut self.tls else {
            return Ok(());
        };
        if !tls.is_handshaking() && !self.early.is_empty() {
            tls.writer()
                .write_all(&self.early)
                .map_err(|e| e.to_string())?;
            self.early = Vec::new();
        }
        if idle && tls.wants_write() {
            self.progress = Instant::now();
        }
        while tls.wants_write() {
            tls.write_tls(&mut self.out).map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    /// Queues bytes for the peer.
    pub(super) fn queue(&mut self, bytes: Vec<u8>) -> Result<(), String> {
        let idle = self.unwritten() == 0;
        match &mut self.tls {
            Some(tls) if tls.is_handshaking() => self.early.extend_from_slice(&bytes),
            Some(tls) => {
                tls.writer().write_all(&bytes).map_err(|e| e.to_string())?;
                self.tls_out()?;
            }
            None if idle => {
                self.progress = Instant::now();
                self.out = bytes;
                self.sent = 0;
            }
            None => self.out.extend_from_slice(&bytes),
        }
        Ok(())
    }

    /// Writes what the socket takes now.
    fn write(&mut self) -> Result<(), String> {
        let waker = self.waker.clone();
        self.write_with(&mut Context::from_waker(&waker))
    }

    /// Writes what the socket takes now; `cx` is woken when it takes more.
    pub(super) fn write_with(&mut self, cx: &mut Context<'_>) -> Result<(), String> {
        while let Some(rest) = self.out.get(self.sent..).filter(|r| !r.is_empty()) {
            match self.stream.try_write(rest) {
                Ok(0) => return Err("connection closed while writing".into()),
                Ok(n) => {
                    self.sent += n;
                    self.progress = Instant::now();
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    match self.stream.poll_write_ready(cx) {
                        Poll::Pending => break,
                        Poll::Ready(Ok(())) => {}
                        Poll::Ready(Err(e)) => return Err(e.to_string()),
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.to_string()),
            }
        }
        if self.sent >= self.out.len() {
            self.out.clear();
            self.sent = 0;
            self.out.shrink_to(KEEP_CAPACITY);
        } else if self.sent > self.out.len() / 2 {
            // Keeps the buffer from growing by what was written already.
            self.out.drain(..self.sent);
            self.sent = 0;
        }
        Ok(())
    }

    /// Ends our side: a TLS close_notify queued, then (once everything queued is
    /// written, see [`Conn::shut_down`]) the socket's write side.
    pub(super) fn close_notify(&mut self) -> Result<(), String> {
        if let Some(tls) = &mut self.tls {
            tls.send_close_notify();
        }
        self.tls_out()
    }

    /// The socket itself, when no TLS wraps it and no bytes wait before the next ones
    /// either way (a data connection's stream then reads and writes it directly).
    pub(super) fn bare(&mut self) -> Option<&mut TcpStream> {
        let idle = self.tls.is_none() && self.plain.is_empty() && self.pending() == 0;
        idle.then_some(&mut self.stream)
    }

    /// Shuts the socket's write side: the peer reads the end of the stream.
    pub(super) fn shut_down(&self) -> io::Result<()> {
        socket2::SockRef::from(&self.stream).shutdown(std::net::Shutdown::Write)
    }
}

/// The sockets of one node.
pub(super) struct Io {
    shared: Arc<Shared>,
    listeners: Vec<Listener>,
    conns: HashMap<u64, Conn>,
    tls: Option<TlsConfig>,
    write_timeout: Duration,
    /// Connections with bytes waiting or closing.
    writing: HashSet<u64>,
    scratch: Vec<u8>,
    /// Connections that ended on the host's side since the driver last looked.
    ended: Vec<(u64, End)>,
    /// The sockets of connections whose peer ended its side in this round, kept until
    /// the engine is told: a data connection's handshake, its bytes and their end can
    /// come in one read, and its stream still needs the socket to write back.
    finished: HashMap<u64, Conn>,
    /// The connection a round starts reading at (after a round cut short by
    /// [`READ_ROUND`]).
    read_next: u64,
}

impl Io {
    /// Takes over the listeners.
    pub(super) fn new(
        listeners: Vec<TcpListener>,
        tls: Option<TlsConfig>,
        write_timeout: Duration,
    ) -> Io {
        let shared = Arc::new(Shared::default());
        let listeners = listeners
            .into_iter()
            .enumerate()
            .map(|(i, socket)| {
                // Accepts start with the first round.
                shared.push(Token::Listener(i));
                Listener {
                    socket,
                    waker: Waker::from(Arc::new(TokenWaker {
                        token: Token::Listener(i),
                        shared: shared.clone(),
                    })),
                    backoff: ACCEPT_BACKOFF.0,
                    paused: None,
                }
            })
            .collect();
        Io {
            shared,
            listeners,
            conns: HashMap::new(),
            tls,
            write_timeout,
            writing: HashSet::new(),
            scratch: vec![0; READ_CHUNK],
            ended: Vec::new(),
            finished: HashMap::new(),
            read_next: 0,
        }
    }

    /// Resolves once some socket is ready (or was put on the ready list).
    pub(super) fn ready(&self) -> impl Future<Output = ()> + use<> {
        let shared = self.shared.clone();
        poll_fn(move |cx| {
            let mut ready = shared.lock();
            if ready.tokens.is_empty() {
                ready.driver = Some(cx.waker().clone());
                Poll::Pending
            } else {
                Poll::Ready(())
            }
        })
    }

    /// Takes a new socket for connection `conn`; it is read from the next round on.
    pub(super) fn add(&mut self, conn: u64, stream: TcpStream) {
        let waker = Waker::from(Arc::new(TokenWaker {
            token: Token::Conn(conn),
            shared: self.shared.clone(),
        }));
        OPEN_CONNS.fetch_add(1, Ordering::Relaxed);
        self.conns.insert(
            conn,
            Conn {
                stream,
                waker,
                tls: None,
                early: Vec::new(),
                plain: Vec::new(),
                out: Vec::new(),
                sent: 0,
                progress: Instant::now(),
                closing: None,
            },
        );
        self.shared.push(Token::Conn(conn));
    }

    /// Puts every connection on the ready list: reading resumes after a pause, and a
    /// socket's readiness is only watched while it is being read.
    pub(super) fn ready_all(&self) {
        let mut ready = self.shared.lock();
        ready
            .tokens
            .extend(self.conns.keys().map(|&c| Token::Conn(c)));
    }

    /// One round over the ready sockets: accepts, writes, and reads up to [`READ_CHUNK`]
    /// from each open connection that `read` allows (the others are read again after
    /// [`Io::ready_all`]).
    pub(super) fn poll(&mut self, read: impl Fn(u64) -> bool) -> Polled {
        let mut tokens = std::mem::take(&mut self.shared.lock().tokens);
        tokens.sort_unstable();
        tokens.dedup();
        // Listeners first, then the connections from the one a round cut short stopped
        // at, so that every ready connection gets its turn.
        let conns_at = tokens.partition_point(|t| matches!(t, Token::Listener(_)));
        let split = tokens.partition_point(|&t| t < Token::Conn(self.read_next));
        if let Some(conns) = tokens.get_mut(conns_at..) {
            conns.rotate_left(split.saturating_sub(conns_at));
        }
        let mut polled = Polled::default();
        let mut again = Vec::new();
        let mut read_bytes = 0usize;
        let mut cut_at = None;
        for token in tokens {
            match token {
                Token::Listener(i) => {
                    if self.accept(i, &mut polled.accepted) {
                        again.push(token);
                    }
                }
                Token::Conn(id) => {
                    let Some(conn) = self.conns.get_mut(&id) else {
                        continue;
                    };
                    if conn.unwritten() > 0 {
                        self.writing.insert(id);
                    }
                    if !read(id) || conn.closing.is_some() {
                        continue;
                    }
                    if read_bytes >= READ_ROUND {
                        // Next round, first.
                        cut_at.get_or_insert(id);
                        again.push(token);
                        continue;
                    }
                    let waker = conn.waker.clone();
                    let got = conn.read(&mut self.scratch, &mut Context::from_waker(&waker));
                    read_bytes += got.data.len();
                    if got.more {
                        again.push(token);
                    }
                    if conn.unwritten() > 0 {
                        // TLS handshake messages.
                        self.writing.insert(id);
                    }
                    if !got.data.is_empty() {
                        polled.inputs.push((id, got.data));
                    }
                    if let Some(end) = got.end {
                        let conn = self.conns.remove(&id);
                        self.writing.remove(&id);
                        if let (Some(conn), End::Eof) = (conn, &end) {
                            self.finished.insert(id, conn);
                        }
                        self.ended.push((id, end));
                    }
                }
            }
        }
        if let Some(id) = cut_at {
            self.read_next = id;
        }
        if !again.is_empty() {
            self.shared.lock().tokens.extend(again);
        }
        polled
    }

    /// Accepts from listener `i`; true when more may be waiting.
    fn accept(&mut self, i: usize, accepted: &mut Vec<(TcpStream, String)>) -> bool {
        let Some(l) = self.listeners.get_mut(i) else {
            return false;
        };
        let mut cx = Context::from_waker(&l.waker);
        if let Some(paused) = &mut l.paused {
            if paused.as_mut().poll(&mut cx).is_pending() {
                return false;
            }
            l.paused = None;
        }
        // Accepting up to the open-file limit would leave the node unable to dial out or
        // listen: short of it, the kernel's backlog holds the rest.
        let room = fd_room()
            .saturating_sub(accepted.len())
            .min(ACCEPTS_PER_ROUND);
        if room == 0 {
            tracing::debug!("not accepting: within {FD_HEADROOM} of the open-file limit");
            let mut pause = Box::pin(tokio::time::sleep(ACCEPT_BACKOFF.0));
            if pause.as_mut().poll(&mut cx).is_pending() {
                l.paused = Some(pause);
                return false;
            }
            return true;
        }
        for _ in 0..room {
            match l.socket.poll_accept(&mut cx) {
                Poll::Pending => return false,
                Poll::Ready(Ok((stream, peer))) => {
                    l.backoff = ACCEPT_BACKOFF.0;
                    tune(&stream);
                    accepted.push((stream, peer.to_string()));
                }
                Poll::Ready(Err(e)) => {
                    // Out of file descriptors and similar: the condition lasts, so back
                    // off (doubling, capped) instead of spinning and flooding the log.
                    tracing::warn!("accept failed: {e}; retrying in {:?}", l.backoff);
                    let mut pause = Box::pin(tokio::time::sleep(l.backoff));
                    l.backoff = (l.backoff * 2).min(ACCEPT_BACKOFF.1);
                    if pause.as_mut().poll(&mut cx).is_pending() {
                        l.paused = Some(pause);
                        return false;
                    }
                }
            }
        }
        true
    }

    /// Queues bytes for connection `conn`; returns how many bytes now wait for it (None
    /// when the connection is gone).
    pub(super) fn queue(&mut self, conn: u64, bytes: Vec<u8>) -> Option<usize> {
        let c = self.conns.get_mut(&conn)?;
        if c.closing.is_some() {
            return Some(c.pending());
        }
        if let Err(reason) = c.queue(bytes) {
            self.fail(conn, reason);
            return None;
        }
        self.writing.insert(conn);
        self.conns.get(&conn).map(Conn::pending)
    }

    /// Writes what connection `conn`'s socket takes now; returns what still waits.
    pub(super) fn write_now(&mut self, conn: u64) -> usize {
        let Some(c) = self.conns.get_mut(&conn) else {
            return 0;
        };
        match c.write() {
            Ok(()) => c.pending(),
            Err(reason) => {
                self.fail(conn, reason);
                0
            }
        }
    }

    /// Writes every connection with bytes waiting, once; drops closing connections that
    /// are done.
    pub(super) fn write_all(&mut self) {
        let ids: Vec<u64> = self.writing.iter().copied().collect();
        for id in ids {
            let Some(c) = self.conns.get_mut(&id) else {
                self.writing.remove(&id);
                continue;
            };
            let written = c.write();
            let closing = c.closing.is_some();
            match written {
                Err(reason) if closing => {
                    tracing::debug!("closed connection {id}: {reason}");
                    self.drop_conn(id);
                }
                Err(reason) => self.fail(id, reason),
                // Plaintext waiting for the TLS handshake counts as pending too.
                Ok(()) if c.pending() > 0 => {}
                Ok(()) if closing => {
                    // Done: the peer sees the end of the stream.
                    let _ = socket2::SockRef::from(&c.stream).shutdown(std::net::Shutdown::Write);
                    self.drop_conn(id);
                }
                Ok(()) => {
                    self.writing.remove(&id);
                }
            }
        }
    }

    /// Switches connection `conn` to TLS; `leftover` are its first TLS bytes, already read.
    pub(super) fn start_tls(&mut self, conn: u64, role: Role, leftover: Vec<u8>) {
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        let Some(config) = &self.tls else {
            self.fail(conn, "TLS requested but no certificate configured".into());
            return;
        };
        let mut session = match config.session(role) {
            Ok(s) => Box::new(s),
            Err(e) => {
                self.fail(conn, format!("TLS handshake failed: {e}"));
                return;
            }
        };
        if !leftover.is_empty() {
            tracing::debug!(
                "connection {conn}: TLS starts with {} bytes read ahead",
                leftover.len()
            );
        }
        // Our own write buffer bounds what waits for the peer.
        session.set_buffer_limit(None);
        c.tls = Some(session);
        let mut plain = std::mem::take(&mut c.plain);
        let started = c.take_in(&leftover, &mut plain).and_then(|open| {
            c.tls_out()?;
            Ok(open)
        });
        c.plain = plain;
        match started {
            Ok(true) => {
                self.writing.insert(conn);
                // Reads on (and hands over what the leftover decrypted to).
                self.shared.push(Token::Conn(conn));
            }
            Ok(false) => {
                self.conns.remove(&conn);
                self.writing.remove(&conn);
                self.ended.push((conn, End::Eof));
            }
            Err(reason) => self.fail(conn, reason),
        }
    }

    /// Takes connection `conn` out of the node: it is a data connection's stream now,
    /// `leftover` (bytes the engine read past its handshake) its first bytes; what the
    /// engine queued for the peer is still written first.
    pub(super) fn take(&mut self, conn: u64, leftover: Vec<u8>) -> Option<Conn> {
        self.writing.remove(&conn);
        // (A finished one reads its end again: a socket's end of stream lasts.)
        let mut c = self
            .conns
            .remove(&conn)
            .or_else(|| self.finished.remove(&conn))?;
        if c.closing.is_some() {
            return None;
        }
        let mut plain = leftover;
        plain.append(&mut c.plain);
        c.plain = plain;
        // The engine's last handshake bytes leave now: the other end waits for them
        // before its side of the stream starts, and the application may not touch its
        // side until then. What the socket does not take yet, the stream writes first.
        if let Err(reason) = c.write() {
            tracing::debug!("data connection {conn} failed at its hand-over: {reason}");
            return None;
        }
        Some(c)
    }

    /// The connections that ended since the last call, for the engine; their sockets
    /// are dropped now.
    pub(super) fn take_ended(&mut self) -> Vec<(u64, End)> {
        self.finished.clear();
        std::mem::take(&mut self.ended)
    }

    /// Whether some connection ended and the engine was not told yet.
    pub(super) fn has_ended(&self) -> bool {
        !self.ended.is_empty()
    }

    /// The engine closed connection `conn`: what is queued is written for at most
    /// [`CLOSE_GRACE`]. False when there is no such connection.
    pub(super) fn close(&mut self, conn: u64) -> bool {
        let Some(c) = self.conns.get_mut(&conn) else {
            return false;
        };
        c.closing = Some(Instant::now() + CLOSE_GRACE);
        c.early = Vec::new();
        c.plain = Vec::new();
        if let Some(tls) = &mut c.tls {
            tls.send_close_notify();
            let _ = c.tls_out();
        }
        self.writing.insert(conn);
        true
    }

    /// Drops connection `conn` and reports it to the engine as failed.
    pub(super) fn fail(&mut self, conn: u64, reason: String) {
        if self.conns.contains_key(&conn) {
            self.drop_conn(conn);
            self.ended.push((conn, End::Failed(reason)));
        }
    }

    /// Drops connection `conn`'s socket without a word to the engine. True if it existed.
    pub(super) fn drop_conn(&mut self, conn: u64) -> bool {
        self.writing.remove(&conn);
        self.conns.remove(&conn).is_some()
    }

    /// Bytes waiting to be written, over all connections.
    pub(super) fn pending(&self) -> usize {
        self.writing
            .iter()
            .filter_map(|id| self.conns.get(id))
            .map(Conn::pending)
            .sum()
    }

    /// Bytes waiting to be written to connection `conn`.
    pub(super) fn pending_of(&self, conn: u64) -> usize {
        self.conns.get(&conn).map_or(0, Conn::pending)
    }

    /// The open connection with the most bytes waiting to be written.
    pub(super) fn largest(&self) -> Option<u64> {
        self.writing
            .iter()
            .filter_map(|&id| Some((id, self.conns.get(&id)?)))
            .filter(|(_, c)| c.closing.is_none())
            .max_by_key(|(_, c)| c.pending())
            .map(|(id, _)| id)
    }

    /// Whether some connection has more than `mark` bytes waiting.
    pub(super) fn above(&self, mark: usize) -> bool {
        self.writing
            .iter()
            .filter_map(|id| self.conns.get(id))
            .any(|c| c.pending() > mark)
    }

    /// When the next write deadline or close grace runs out.
    pub(super) fn deadline(&self) -> Option<Instant> {
        self.writing
            .iter()
            .filter_map(|id| self.conns.get(id))
            .filter_map(|c| c.deadline(self.write_timeout))
            .min()
    }

    /// Gives up the connections whose writes made no progress for the write timeout
    /// (reported to the engine) and the closing ones past their grace (dropped).
    pub(super) fn expire(&mut self, now: Instant) {
        let expired: Vec<(u64, bool)> = self
            .writing
            .iter()
            .filter_map(|&id| {
                let c = self.conns.get(&id)?;
                let due = c.deadline(self.write_timeout)?;
                (due <= now).then_some((id, c.closing.is_some()))
            })
            .collect();
        for (id, closing) in expired {
            if closing {
                tracing::debug!("closed connection {id} with unwritten data");
                self.drop_conn(id);
            } else {
                let reason = format!(
                    "peer does not read: nothing written for {} ms",
                    self.write_timeout.as_millis()
                );
                self.fail(id, reason);
            }
        }
    }
}

/// Sets the socket options every connection gets: no Nagle delay, TCP keepalive.
fn tune(stream: &TcpStream) {
    // Both are optimisations; a socket that refuses them still works.
    let _ = stream.set_nodelay(true);
    let _ = socket2::SockRef::from(stream).set_keepalive(true);
}

/// Opens an outgoing connection for `conn` in a task of its own (connects are rare, and
/// may take up to `timeout`).
pub(super) fn spawn_connect(conn: u64, addr: String, timeout: Duration, done: Sender<Dialed>) {
    tokio::spawn(async move {
        let dialed = match tokio::time::timeout(timeout, TcpStream::connect(&addr)).await {
            Ok(Ok(stream)) => {
                tune(&stream);
                Dialed::Connected(conn, stream)
            }
            Ok(Err(e)) => Dialed::Failed(conn, format!("{addr}: {e}")),
            Err(_) => Dialed::Failed(conn, format!("{addr}: connect timeout")),
        };
        let _ = done.send(dialed).await;
    });
}
