//! The task that drives one node: commands from the application, rounds of socket I/O
//! through the engine, timers, and the port inboxes with the messages held for them.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use aemp_engine::{Value, printable};
use tokio::sync::mpsc::{Receiver, Sender, WeakSender, channel};
use tokio::sync::{broadcast, watch};
use wasmtime::component::ResourceAny;

use super::inbox::{self, Chunk, Inbox, Offer};
use super::io::{self, Dialed, End, Io};
use super::parked::{self, Parked};
use super::subscribe::{Topic, Waiters};
use super::{Cmd, DbQuery, Event, HIGH_WATER, NodeError, Port, Refusal, Reply, decode_args};
use crate::sandbox::{self, Instance, wit, wit_node};
use crate::tls::Role;

/// The task that owns the engine instance and the sockets of one node.
pub(super) struct Driver {
    pub(super) instance: Instance,
    pub(super) node: ResourceAny,
    pub(super) started: Instant,
    pub(super) io: Io,
    /// Outgoing connects in progress.
    pub(super) dialing: HashSet<u64>,
    pub(super) dial_tx: Sender<Dialed>,
    /// Each port's inbox: the arguments of each message, as a CBOR array.
    pub(super) ports: HashMap<String, Inbox>,
    pub(super) db_waiters: HashMap<String, Reply<Value>>,
    pub(super) events: broadcast::Sender<Event>,
    /// The nodes that are up, with their working connections.
    pub(super) up: HashMap<String, u64>,
    /// Who waits for a port to die or a node to come up.
    pub(super) waiters: Waiters,
    /// Set by [`Node::shutdown`](super::Node::shutdown): the driver ends after this round.
    pub(super) shutdown: Option<Reply<()>>,
    pub(super) monitor_timeout: Duration,
    pub(super) max_write_queue: usize,
    /// Bytes waiting for all connections together before the one holding most is cut off.
    pub(super) max_write_total: usize,
    pub(super) port_capacity: usize,
    /// Bytes of messages a port's inbox holds.
    pub(super) port_bytes: usize,
    pub(super) port_stall: Duration,
    /// Messages for ports whose inbox was full, in arrival order. The connections read in
    /// a round that had messages held read no more until nothing is held; past
    /// [`HELD_MAX`] bytes no connection reads.
    pub(super) held: VecDeque<Held>,
    /// What `held` counts toward [`HELD_MAX`] (the chunks' bytes).
    pub(super) held_bytes: usize,
    /// The connections not read while messages are held (see `held`).
    pub(super) paused: HashSet<u64>,
    /// The connections read in the current round.
    pub(super) round_reads: Vec<u64>,
    /// How many of `held` came from the application's commands, and their bytes; at a
    /// port's capacity (in either) the driver takes no more commands.
    pub(super) held_app: usize,
    pub(super) held_app_bytes: usize,
    /// The application's sends waiting for slow peers.
    pub(super) parked: Parked,
    /// Whether the outputs being handled answer the application's commands.
    pub(super) app_round: bool,
    /// Whether the last round read every connection (nothing was held).
    pub(super) reading: bool,
    /// The ports messages are held for.
    pub(super) held_ports: HashMap<String, HeldPort>,
    /// Ports that took nothing for `port_stall`: messages finding them full are dropped.
    pub(super) stalled: HashSet<String>,
    pub(super) status: watch::Sender<Option<String>>,
    pub(super) cmd_tx: WeakSender<Cmd>,
    /// What [`super::Node::pending_bytes`] reads.
    pub(super) unwritten: Arc<AtomicUsize>,
    /// When the engine wants `handle-timeout`, as of `due_stale` last cleared.
    pub(super) engine_due: Option<tokio::time::Instant>,
    /// The engine was called since its outputs were last taken: it may have some. (Every
    /// call counts in a round trip's time, so the driver asks only when this is set.)
    pub(super) dirty: bool,
    /// The engine was called since `engine_due` was asked.
    pub(super) due_stale: bool,
}

/// Messages waiting for room in their port's inbox.
pub(super) struct Held {
    port: String,
    chunk: Chunk,
    from_app: bool,
}

/// A port messages are held for.
pub(super) struct HeldPort {
    /// How many messages.
    count: usize,
    /// When it last took a message (or the first was held).
    progress: tokio::time::Instant,
}

/// What woke the driver.
enum Wake {
    Cmd(Option<Cmd>),
    Dialed(Dialed),
    Timer,
    Room,
    Io,
}

/// Why a node that was shut down stopped.
pub(super) const SHUT_DOWN: &str = "shut down";

/// Bytes of held messages past which no connection reads on, whoever sent them. Below
/// it only the connections whose reads had messages held wait, so a port that is behind
/// stops its senders, not the node: a new peer's handshake and messages for other ports
/// go on.
const HELD_MAX: usize = 32 << 20;

/// How often held messages are offered again to their ports.
const HELD_RETRY: Duration = Duration::from_millis(10);

/// Commands taken in one go, at most.
const BATCH: usize = 64;

/// Bytes of messages taken from the application in one go, about (one command more).
const BATCH_BYTES: usize = 64 * 1024;

impl Driver {
    fn now(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    pub(super) async fn run(mut self, mut cmds: Receiver<Cmd>, mut dialed: Receiver<Dialed>) {
        let result = self.serve(&mut cmds, &mut dialed).await;
        if let Err(e) = result {
            let reason = sandbox::describe(&e);
            tracing::error!("node stopped: {reason}");
            tracing::debug!("node stopped: {e:?}");
            let _ = self.status.send(Some(reason));
        }
        let shutdown = self.shutdown.take();
        if shutdown.is_some() {
            let _ = self.status.send(Some(SHUT_DOWN.into()));
        }
        // Dropping the driver closes the node's listeners and connections; a shutdown is
        // answered once they are closed.
        drop(self);
        if let Some(reply) = shutdown {
            let _ = reply.send(Ok(()));
        }
    }

    async fn serve(
        &mut self,
        cmds: &mut Receiver<Cmd>,
        dialed: &mut Receiver<Dialed>,
    ) -> wasmtime::Result<()> {
        self.round()?;
        loop {
            if self.due_stale {
                let (store, b) = self.instance.parts();
                self.engine_due = b
                    .aemp_engine_node()
                    .node()
                    .call_poll_timeout(store, self.node)?
                    .map(|ms| self.started + Duration::from_millis(ms))
                    .map(tokio::time::Instant::from);
                self.due_stale = false;
            }
            let engine_due = self.engine_due;
            let due = match (engine_due, self.io.deadline()) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            let sleep = async move {
                match due {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            // Room in the inbox of the port the first held message is for, or a moment
            // passed (for the other ports, and to notice stalls). Room for half an inbox
            // (or all that is held for it) at once: waking per message taken would cost
            // a task switch per message.
            let waiting = self.held.front().map(|h| {
                let held = self.held_ports.get(&h.port).map_or(1, |p| p.count);
                let want = held.min(self.port_capacity.div_ceil(2));
                self.ports.get(&h.port).map(|inbox| inbox.room(want))
            });
            let room = async move {
                match waiting {
                    Some(Some(room)) => {
                        let _ = tokio::time::timeout(HELD_RETRY, room).await;
                    }
                    Some(None) => {}
                    None => std::future::pending().await,
                }
            };
            // Commands wait while the application's messages for its own ports fill a
            // port's inbox, or too many sends wait for slow peers.
            let take_cmds = self.held_app < self.port_capacity
                && self.held_app_bytes < self.port_bytes
                && self.parked.len() < parked::MAX_PARKED;
            let ready = self.io.ready();
            let wake = tokio::select! {
                cmd = cmds.recv(), if take_cmds => Wake::Cmd(cmd),
                Some(d) = dialed.recv() => Wake::Dialed(d),
                () = sleep => Wake::Timer,
                () = room => Wake::Room,
                () = ready => Wake::Io,
            };
            match wake {
                Wake::Cmd(None) => return Ok(()),
                Wake::Cmd(Some(cmd)) => {
                    self.app_round = true;
                    // Bounded in bytes too, so that what one go adds to the write
                    // buffers stays small beside the high-water mark.
                    let mut bytes = cmd.bytes();
                    self.command(cmd)?;
                    for _ in 1..BATCH {
                        if bytes >= BATCH_BYTES {
                            break;
                        }
                        match cmds.try_recv() {
                            Ok(cmd) => {
                                bytes += cmd.bytes();
                                self.command(cmd)?;
                            }
                            Err(_) => break,
                        }
                    }
                }
                Wake::Dialed(d) => self.dialed(d)?,
                Wake::Timer => {
                    let now = self.now();
                    if engine_due.is_some_and(|at| at <= tokio::time::Instant::now()) {
                        self.node_api(|s, n, b| {
                            b.aemp_engine_node().node().call_handle_timeout(s, n, now)
                        })?;
                    }
                    self.io.expire(tokio::time::Instant::now());
                }
                Wake::Room => self.deliver_held(),
                Wake::Io => {}
            }
            self.round()?;
            if !self.parked.is_empty() {
                self.unpark()?;
            }
            if self.shutdown.is_some() {
                return Ok(());
            }
            // A busy node is always ready: let the other tasks of this thread run.
            tokio::task::coop::consume_budget().await;
        }
    }

    /// Acts on what woke the driver, then one round of socket I/O: every ready socket
    /// is read (unless messages are held: full ports push back), everything read goes to
    /// the engine in one call, its outputs are acted on and the connections written.
    fn round(&mut self) -> wasmtime::Result<()> {
        self.settle()?;
        self.app_round = false;
        let reading = self.held.is_empty();
        // (Paused connections may have been passed over since messages were held, even
        // when the last round saw nothing held: they are read again as soon as none is.)
        if reading && (!self.reading || !self.paused.is_empty()) {
            self.paused.clear();
            self.io.ready_all();
        }
        self.reading = reading;
        let polled = if self.held_bytes > HELD_MAX {
            self.io.poll(|_| false)
        } else {
            let paused = &self.paused;
            self.io.poll(|conn| !paused.contains(&conn))
        };
        self.round_reads.clear();
        self.round_reads
            .extend(polled.inputs.iter().map(|&(conn, _)| conn));
        let now = self.now();
        for (stream, peer) in polled.accepted {
            let conn = self.node_api(|s, n, b| {
                b.aemp_engine_node()
                    .node()
                    .call_handle_accept(s, n, &peer, now)
            })?;
            self.io.add(conn, stream);
        }
        if !polled.inputs.is_empty() {
            self.node_api(|s, n, b| {
                b.aemp_engine_node()
                    .node()
                    .call_handle_inputs(s, n, &polled.inputs, now)
            })?;
        }
        self.settle()?;
        let mut pending = self.io.pending();
        while pending > self.max_write_total {
            // The connection holding most is the likeliest not to read.
            let Some(conn) = self.io.largest() else { break };
            let reason = format!(
                "peer does not read: the node's connections have more than {} bytes \
                 waiting, this one the most",
                self.max_write_total
            );
            self.cut_off(conn, &reason)?;
            self.settle()?;
            pending = self.io.pending();
        }
        self.unwritten.store(pending, Ordering::Relaxed);
        Ok(())
    }

    /// Drops connection `conn` as a peer that does not read, and tells the engine.
    fn cut_off(&mut self, conn: u64, reason: &str) -> wasmtime::Result<()> {
        tracing::warn!("connection {conn}: {reason}");
        if self.io.drop_conn(conn) {
            let now = self.now();
            self.node_api(|s, n, b| {
                b.aemp_engine_node()
                    .node()
                    .call_handle_conn_error(s, n, conn, reason, now)
            })?;
        }
        Ok(())
    }

    /// Carries out the application's send now.
    fn send_now(&mut self, send: parked::Send) -> wasmtime::Result<()> {
        let now = self.now();
        let batch = &send.batch;
        let result =
            self.node_api(|s, n, b| b.aemp_engine_node().node().call_send(s, n, batch, now))?;
        let _ = send.reply.send(result.map_err(send_refused));
        Ok(())
    }

    /// Carries out the waiting sends whose peers caught up, then acts on the outputs.
    fn unpark(&mut self) -> wasmtime::Result<()> {
        let ready = self
            .parked
            .release(slow_nodes(&self.up, &self.io, self.max_write_total));
        if ready.is_empty() {
            return Ok(());
        }
        // Their messages for local ports count as the application's, as when sent at once.
        self.app_round = true;
        for send in ready {
            self.send_now(send)?;
        }
        self.settle()?;
        self.app_round = false;
        Ok(())
    }

    /// Acts on the engine's outputs and writes the connections, until the engine has
    /// nothing more to say and every connection that ended was reported.
    fn settle(&mut self) -> wasmtime::Result<()> {
        loop {
            self.flush()?;
            self.io.write_all();
            if self.io.ended.is_empty() {
                return Ok(());
            }
            let now = self.now();
            for (conn, end) in std::mem::take(&mut self.io.ended) {
                match end {
                    End::Eof => self.node_api(|s, n, b| {
                        b.aemp_engine_node().node().call_handle_eof(s, n, conn, now)
                    })?,
                    End::Failed(reason) => {
                        tracing::debug!("connection {conn} failed: {reason}");
                        self.node_api(|s, n, b| {
                            b.aemp_engine_node()
                                .node()
                                .call_handle_conn_error(s, n, conn, &reason, now)
                        })?
                    }
                }
            }
        }
    }

    fn dialed(&mut self, dialed: Dialed) -> wasmtime::Result<()> {
        let now = self.now();
        match dialed {
            Dialed::Connected(conn, stream) => {
                if self.dialing.remove(&conn) {
                    self.io.add(conn, stream);
                    self.node_api(|s, n, b| {
                        b.aemp_engine_node()
                            .node()
                            .call_handle_connected(s, n, conn, now)
                    })?;
                }
            }
            Dialed::Failed(conn, reason) => {
                if self.dialing.remove(&conn) {
                    tracing::debug!("connect {conn} failed: {reason}");
                    self.node_api(|s, n, b| {
                        b.aemp_engine_node()
                            .node()
                            .call_handle_connect_failed(s, n, conn, &reason, now)
                    })?;
                }
            }
        }
        Ok(())
    }

    /// Hands messages to their port; holds what does not fit when the inbox is full (and
    /// everything while messages for the port are held already, to keep their order);
    /// drops them when the port is stalled.
    fn deliver(&mut self, port: &str, mut chunk: Chunk) {
        let Some(inbox) = self.ports.get(port) else {
            return;
        };
        // (The emptiness checks spare a hash of the port id per round.)
        if self.held_ports.is_empty() || !self.held_ports.contains_key(port) {
            let offered = inbox.offer(&mut chunk);
            if !self.stalled.is_empty() && !matches!(offered, Offer::Full { taken: 0 }) {
                self.stalled.remove(port);
            }
            match offered {
                Offer::Taken | Offer::Closed => return,
                // Logged once, when the port stalled.
                Offer::Full { .. } if self.stalled.contains(port) => return,
                Offer::Full { .. } => {}
            }
        }
        self.hold(port.to_owned(), chunk);
    }

    fn hold(&mut self, port: String, chunk: Chunk) {
        let now = tokio::time::Instant::now();
        let n = chunk.len();
        self.held_ports
            .entry(port.clone())
            .or_insert(HeldPort {
                count: 0,
                progress: now,
            })
            .count += n;
        self.held_bytes = self.held_bytes.saturating_add(chunk.bytes());
        if self.app_round {
            self.held_app += n;
            self.held_app_bytes = self.held_app_bytes.saturating_add(chunk.bytes());
        } else {
            // What this round read filled a port: those connections wait.
            self.paused.extend(self.round_reads.iter().copied());
        }
        self.held.push_back(Held {
            port,
            chunk,
            from_app: self.app_round,
        });
    }

    /// Moves held messages into their inboxes, in order for each port, and stalls the
    /// ports that took nothing for `port_stall`.
    fn deliver_held(&mut self) {
        let now = tokio::time::Instant::now();
        let mut full = HashSet::new();
        let mut kept = VecDeque::new();
        for mut h in std::mem::take(&mut self.held) {
            if full.contains(&h.port) {
                kept.push_back(h);
                continue;
            }
            let (before, before_bytes) = (h.chunk.len(), h.chunk.bytes());
            let offered = match self.ports.get(&h.port) {
                Some(inbox) => inbox.offer(&mut h.chunk),
                None => Offer::Closed,
            };
            // Taken, or gone with the port: either way no longer held.
            let (done, done_bytes) = match offered {
                Offer::Taken | Offer::Closed => (before, before_bytes),
                Offer::Full { taken } => (taken, before_bytes - h.chunk.bytes()),
            };
            self.held_bytes = self.held_bytes.saturating_sub(done_bytes);
            if h.from_app {
                self.held_app -= done;
                self.held_app_bytes = self.held_app_bytes.saturating_sub(done_bytes);
            }
            if let Some(p) = self.held_ports.get_mut(&h.port) {
                p.count -= done;
                if done > 0 {
                    p.progress = now;
                }
                if p.count == 0 {
                    self.held_ports.remove(&h.port);
                }
            }
            if let Offer::Full { .. } = offered {
                full.insert(h.port.clone());
                kept.push_back(h);
            }
        }
        self.held = kept;
        let stalled: Vec<String> = self
            .held_ports
            .iter()
            .filter(|(_, p)| now >= p.progress + self.port_stall)
            .map(|(port, _)| port.clone())
            .collect();
        for port in stalled {
            let dropped: usize = self
                .held
                .iter()
                .filter(|h| h.port == port)
                .map(|h| h.chunk.len())
                .sum();
            self.held.retain(|h| h.port != port);
            tracing::warn!(
                "port {} took no message for {} ms: dropped {dropped} messages for it",
                printable(&port),
                self.port_stall.as_millis(),
            );
            self.held_ports.remove(&port);
            self.stalled.insert(port);
            let from_app = self.held.iter().filter(|h| h.from_app);
            self.held_app = from_app.clone().map(|h| h.chunk.len()).sum();
            self.held_app_bytes = from_app.map(|h| h.chunk.bytes()).sum();
            self.held_bytes = self.held.iter().map(|h| h.chunk.bytes()).sum();
        }
    }

    /// Calls into the engine with the store, the node resource and the bindings; the
    /// engine may have outputs and another timeout afterwards.
    fn node_api<T>(
        &mut self,
        f: impl FnOnce(
            &mut wasmtime::Store<sandbox::State>,
            ResourceAny,
            &crate::EngineBindings,
        ) -> wasmtime::Result<T>,
    ) -> wasmtime::Result<T> {
        self.dirty = true;
        self.due_stale = true;
        let node = self.node;
        let (store, b) = self.instance.parts();
        f(store, node, b)
    }

    fn command(&mut self, cmd: Cmd) -> wasmtime::Result<()> {
        let now = self.now();
        match cmd {
            Cmd::Port { name, reply } => {
                let id =
                    match &name {
                        None => Ok(self
                            .node_api(|s, n, b| b.aemp_engine_node().node().call_new_port(s, n))?),
                        Some(name) => self
                            .node_api(|s, n, b| {
                                b.aemp_engine_node().node().call_register_port(s, n, name)
                            })?
                            .map_err(refused),
                    };
                let port = id.map(|id| {
                    let (tx, rx) = inbox::inbox(self.port_capacity, self.port_bytes);
                    self.ports.insert(id.clone(), tx);
                    Port {
                        id,
                        rx,
                        tx: self.command_sender(),
                    }
                });
                let _ = reply.send(port);
            }
            Cmd::Send {
                batch,
                reply,
                permit,
            } => {
                let send = parked::Send {
                    batch,
                    reply,
                    _permit: permit,
                };
                // (Most rounds have no peer behind: no need to look at the batch.)
                let send = if self.parked.is_empty() && !self.io.above(HIGH_WATER) {
                    Err(send)
                } else {
                    let slow = slow_nodes(&self.up, &self.io, self.max_write_total);
                    self.parked.park(send, slow)
                };
                if let Err(send) = send {
                    self.send_now(send)?;
                }
            }
            Cmd::Kill {
                port,
                reason,
                reply,
            } => {
                self.ports.remove(&port);
                self.stalled.remove(&port);
                let reason = Value::Array(reason).encode();
                let result = self.node_api(|s, n, b| {
                    b.aemp_engine_node()
                        .node()
                        .call_kill(s, n, &port, &reason, now)
                })?;
                if let Some(reply) = reply {
                    let _ = reply.send(result.map_err(refused));
                }
            }
            Cmd::Monitor { port, reply } => {
                let result = self.node_api(|s, n, b| {
                    b.aemp_engine_node().node().call_monitor(s, n, &port, now)
                })?;
                let monitor = result.map(|()| self.waiters.monitor(port));
                let _ = reply.send(monitor.map_err(refused));
            }
            Cmd::Unmonitor { port, reply } => {
                let result = self.node_api(|s, n, b| {
                    b.aemp_engine_node().node().call_unmonitor(s, n, &port, now)
                })?;
                self.waiters.unmonitor(&port);
                let _ = reply.send(result.map_err(refused));
            }
            Cmd::WaitUp { node, reply } => {
                let up = self.up.contains_key(&node);
                self.waiters.wait_up(node, up, reply);
            }
            Cmd::Subscribe { topic, reply } => {
                self.node_api(|s, n, b| {
                    let api = b.aemp_engine_node().node();
                    match &topic {
                        Topic::Requests(tag) => api.call_register_handler(s, n, tag),
                        Topic::Db(family) => api.call_db_mon(s, n, family, now),
                    }
                })?;
                let (tx, rx) = inbox::inbox(self.port_capacity, self.port_bytes);
                let inbox = topic.inbox();
                // A new handle for the same topic takes over; what was held for the old
                // one goes to the new one.
                self.stalled.remove(&inbox);
                self.ports.insert(inbox, tx);
                let _ = reply.send(Ok(rx));
            }
            Cmd::Unsubscribe { topic } => {
                let inbox = topic.inbox();
                // A handle replaced by a newer one leaves the newer one in place.
                if self.ports.get(&inbox).is_some_and(Inbox::is_closed) {
                    self.ports.remove(&inbox);
                    self.stalled.remove(&inbox);
                    if let Topic::Db(family) = &topic {
                        self.node_api(|s, n, b| {
                            b.aemp_engine_node().node().call_db_unmon(s, n, family, now)
                        })?;
                    }
                }
            }
            Cmd::Connect { addr } => {
                self.node_api(|s, n, b| {
                    b.aemp_engine_node()
                        .node()
                        .call_connect_addr(s, n, &addr, now)
                })?;
            }
            Cmd::DbSet { family, key, value } => {
                let value = value.encode();
                // The value was encoded here, so the engine cannot refuse it.
                let _ = self.node_api(|s, n, b| {
                    b.aemp_engine_node()
                        .node()
                        .call_db_set(s, n, &family, &key, &value, now)
                })?;
            }
            Cmd::DbDel { family, keys } => {
                self.node_api(|s, n, b| {
                    b.aemp_engine_node()
                        .node()
                        .call_db_del(s, n, &family, &keys, now)
                })?;
            }
            Cmd::DbQuery {
                kind,
                family,
                reply,
            } => {
                let id = self.node_api(|s, n, b| {
                    let api = b.aemp_engine_node().node();
                    match kind {
                        DbQuery::Family => api.call_db_family(s, n, &family, now),
                        DbQuery::Keys => api.call_db_keys(s, n, &family, now),
                        DbQuery::Values => api.call_db_values(s, n, &family, now),
                    }
                })?;
                // Queries whose caller gave up waiting are forgotten here.
                self.db_waiters.retain(|_, w| !w.is_closed());
                self.db_waiters.insert(id, reply);
            }
            Cmd::IsUp { node, reply } => {
                let _ = reply.send(Ok(self.up.contains_key(&node)));
            }
            Cmd::Memory { reply } => {
                let _ = reply.send(Ok(self.instance.memory_bytes()));
            }
            Cmd::Pending { reply } => {
                let queued =
                    self.node_api(|s, n, b| b.aemp_engine_node().node().call_queued_bytes(s, n))?;
                let _ = reply.send(Ok(self.io.pending() + queued as usize));
            }
            Cmd::Shutdown { reply } => self.shutdown = Some(reply),
        }
        Ok(())
    }

    /// A sender for a port to report its drop. Ports keep the node alive like handles;
    /// the driver itself holds only a weak sender, so the node stops once every handle
    /// and port is gone.
    fn command_sender(&self) -> Sender<Cmd> {
        self.cmd_tx.upgrade().unwrap_or_else(|| channel(1).0)
    }

    /// Acts on everything the engine has to say, until it has nothing more. (Each
    /// `poll-outputs` takes all the engine has; acting on them may call it again.)
    fn flush(&mut self) -> wasmtime::Result<()> {
        while self.dirty {
            self.dirty = false;
            let (store, b) = self.instance.parts();
            let outputs = b
                .aemp_engine_node()
                .node()
                .call_poll_outputs(store, self.node)?;
            for output in outputs {
                self.output(output)?;
            }
        }
        Ok(())
    }

    fn output(&mut self, output: wit_node::NodeOutput) -> wasmtime::Result<()> {
        use wit_node::NodeOutput as O;
        match output {
            O::Transmit(t) => {
                let conn = t.conn;
                let over = |q: usize| q > self.max_write_queue;
                // Past the limit, what the socket takes now may still bring it under.
                if self.io.queue(conn, t.bytes).is_some_and(over) && over(self.io.write_now(conn)) {
                    let reason = format!(
                        "peer does not read: more than {} bytes waiting",
                        self.max_write_queue
                    );
                    self.cut_off(conn, &reason)?;
                }
            }
            O::Connect(c) => {
                self.dialing.insert(c.conn);
                io::spawn_connect(c.conn, c.addr, self.monitor_timeout, self.dial_tx.clone());
            }
            O::StartTls(t) => {
                let role = match t.role {
                    wit::TlsRole::Client => Role::Client,
                    wit::TlsRole::Server => Role::Server,
                };
                self.io.start_tls(t.conn, role, t.leftover);
            }
            O::Close(c) => {
                self.dialing.remove(&c.conn);
                if self.io.close(c.conn) {
                    tracing::debug!("closing connection {}: {}", c.conn, printable(&c.reason));
                }
            }
            O::Deliver(d) => {
                let chunk = Chunk::from_sizes(d.data, &d.sizes);
                self.deliver(&d.port, chunk);
            }
            O::NodeUp(wit_node::NodeUp { node, conn }) => {
                tracing::info!("{} is up", printable(&node));
                self.up.insert(node.clone(), conn);
                self.waiters.node_up(&node);
                let _ = self.events.send(Event::NodeUp(node));
            }
            O::NodeDown(d) => {
                tracing::info!("{} is down: {}", printable(&d.node), printable(&d.reason));
                self.up.remove(&d.node);
                let _ = self.events.send(Event::NodeDown {
                    node: d.node,
                    reason: d.reason,
                });
            }
            O::PortDown(p) => {
                self.waiters.port_down(&p.port, &p.reason);
                let _ = self.events.send(Event::PortDown {
                    port: p.port,
                    reason: decode_args(&p.reason),
                });
            }
            O::Request(r) => {
                let inbox = Topic::Requests(r.tag).inbox();
                self.deliver(&inbox, Chunk::single(r.message));
            }
            O::DbReply(r) => {
                if let Some(waiter) = self.db_waiters.remove(&r.id) {
                    let _ = waiter.send(Value::decode(&r.result).map_err(NodeError::from));
                }
            }
            O::DbChange(c) => {
                let inbox = Topic::Db(c.family).inbox();
                self.deliver(&inbox, Chunk::single(c.change));
            }
            O::Log(l) => match l.level {
                wit_node::LogLevel::Error => tracing::error!("{}", l.message),
                wit_node::LogLevel::Warn => tracing::warn!("{}", l.message),
                wit_node::LogLevel::Info => tracing::info!("{}", l.message),
                wit_node::LogLevel::Debug => tracing::debug!("{}", l.message),
            },
        }
        Ok(())
    }
}
/// Which nodes the application's sends must wait for: those whose connection has more
/// than [`HIGH_WATER`] bytes waiting, and every node while all connections together have
/// more than half of `max_write_total` waiting.
fn slow_nodes<'a>(
    up: &'a HashMap<String, u64>,
    io: &'a Io,
    max_write_total: usize,
) -> impl Fn(&str) -> bool + 'a {
    let all_behind = io.pending() > max_write_total / 2;
    move |node| {
        up.get(node)
            .is_some_and(|&conn| all_behind || io.pending_of(conn) > HIGH_WATER)
    }
}

impl Refusal {
    fn from_wit(kind: wit::RefusalKind) -> Refusal {
        use wit::RefusalKind as K;
        match kind {
            K::InvalidPortId => Refusal::InvalidPortId,
            K::PortExists => Refusal::PortExists,
            K::QueueFull => Refusal::QueueFull,
            K::BudgetExhausted => Refusal::BudgetExhausted,
            K::NotConnected => Refusal::NotConnected,
            K::Closed => Refusal::Closed,
            K::TooLarge => Refusal::TooLarge,
            K::TooDeep => Refusal::TooDeep,
            K::NotAnArray => Refusal::NotAnArray,
            K::Malformed => Refusal::Malformed,
            K::NotJson => Refusal::NotJson,
            K::InvalidConfig => Refusal::InvalidConfig,
        }
    }
}

/// The engine's refusal of one call.
pub(super) fn refused(r: wit::Refusal) -> NodeError {
    NodeError::Refused {
        kind: Refusal::from_wit(r.kind),
        message: r.message,
    }
}

/// The engine's refusal of a batch: partial when some messages went out first.
pub(super) fn send_refused(e: wit::SendError) -> NodeError {
    let cause = refused(wit::Refusal {
        kind: e.kind,
        message: e.message,
    });
    match e.index {
        0 => cause,
        sent => NodeError::Partial {
            sent: sent as usize,
            cause: Box::new(cause),
        },
    }
}
