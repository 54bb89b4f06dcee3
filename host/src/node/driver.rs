//! The task that drives one node: the loop that waits for commands from the application,
//! sockets, dials and timers, and acts on each through the engine ([`Engine`]), the
//! sockets ([`Io`]) and the inboxes ([`Deliveries`]).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use aemp_engine::{Value, printable};
use tokio::sync::mpsc::{self, Receiver, Sender, WeakSender, channel};
use tokio::sync::{broadcast, watch};

use super::datastream::{self, DataConnections, DataStream, Setup};
use super::deliver::{Deliveries, Target};
use super::engine::{Engine, Fatal};
use super::inbox::Chunk;
use super::info::{self, HostFigures, INFO_TAG, NodeInfo};
use super::io::{self, Dialed, End, Io};
use super::parked::{self, Parked};
use super::subscribe::{Topic, Waiters};
use super::{Cmd, Event, HIGH_WATER, NodeError, Port, Reply, decode_args};
use crate::sandbox::{self, wit, wit_node};
use crate::tls::Role;

/// The host's limits for one node (the builder's settings of the same names).
#[derive(Debug, Clone, Copy)]
pub(super) struct Limits {
    pub(super) monitor_timeout: Duration,
    pub(super) max_write_queue: usize,
    /// Bytes waiting for all connections together before the one holding most is cut off.
    pub(super) max_write_total: usize,
    pub(super) port_capacity: usize,
    /// Bytes of messages a port's inbox holds.
    pub(super) port_bytes: usize,
    pub(super) port_stall: Duration,
    /// Whether other nodes may ask for [`NodeInfo`] ([`INFO_TAG`]).
    pub(super) info_requests: bool,
}

/// What the node's handles share with its driver.
pub(super) struct Shared {
    pub(super) events: broadcast::Sender<Event>,
    /// Why the node stopped, once it has.
    pub(super) status: watch::Receiver<Option<String>>,
    /// What [`super::Node::pending_bytes`] reads.
    pub(super) unwritten: Arc<AtomicUsize>,
}

/// The task that owns the engine instance and the sockets of one node.
pub(super) struct Driver {
    engine: Engine,
    io: Io,
    deliveries: Deliveries,
    limits: Limits,
    /// Outgoing connects in progress.
    dialing: HashSet<u64>,
    dial_tx: Sender<Dialed>,
    dialed: Receiver<Dialed>,
    db_waiters: HashMap<String, Reply<Value>>,
    events: broadcast::Sender<Event>,
    /// The nodes that are up, with their working connections.
    up: HashMap<String, u64>,
    /// Connections that have been some node's working connection (until closed): a close
    /// of any other is reported as [`Event::ConnectionFailed`].
    worked: HashSet<u64>,
    /// Who waits for a port to die or a node to come up.
    waiters: Waiters,
    /// Set by [`Node::shutdown`](super::Node::shutdown): the driver ends after this round.
    shutdown: Option<Reply<()>>,
    /// The application's sends waiting for slow peers.
    parked: Parked,
    status: watch::Sender<Option<String>>,
    cmd_tx: WeakSender<Cmd>,
    unwritten: Arc<AtomicUsize>,
    /// When the node started, for [`NodeInfo::uptime`].
    started: tokio::time::Instant,
    /// Limits the host enforces that were hit, by name (for [`NodeInfo::limits`]).
    limits_hit: BTreeMap<&'static str, u64>,
    /// The application's calls the engine refused, by kind (for [`NodeInfo::refusals`]).
    refusals: BTreeMap<String, u64>,
    /// A tracing span per connection: a log line about a connection says which one,
    /// with its address and, once known, its node.
    spans: HashMap<u64, tracing::Span>,
    /// The application's data connection requests, by the local port the engine kills
    /// when one fails (at most the engine's `max_data_conns`).
    data_waiters: HashMap<String, Reply<DataStream>>,
    /// Where incoming data connections go, by data handler name.
    data_handlers: HashMap<String, mpsc::Sender<DataStream>>,
    /// Data connections made to this node itself, for their ids (digits, where the
    /// engine's are letters).
    local_data_conns: u64,
}

/// What woke the driver.
enum Wake {
    Cmd(Option<Cmd>),
    Dialed(Dialed),
    Timer,
    Room,
    Io,
}

/// A failed data connection's error from the kill reason of its port:
/// `["AnyEvent::MP::DataConn", MESSAGE]` as the reference makes it.
fn data_failure(reason: &[u8]) -> NodeError {
    let message = match decode_args(reason).as_slice() {
        [_, Value::Text(message)] => message.clone(),
        other => format!("{other:?}"),
    };
    NodeError::DataConnection(message)
}

/// Why a node that was shut down stopped.
pub(super) const SHUT_DOWN: &str = "shut down";

/// Commands taken in one go, at most.
const BATCH: usize = 64;

/// Bytes of messages taken from the application in one go, about (one command more).
const BATCH_BYTES: usize = 64 * 1024;

impl Driver {
    /// A driver for the node in `engine`, with the sockets of `io`; `cmd_tx` is the
    /// sending side of the commands [`Driver::run`] takes (held weakly: the node stops
    /// once every handle and port is gone).
    pub(super) fn new(
        engine: Engine,
        io: Io,
        limits: Limits,
        cmd_tx: &Sender<Cmd>,
    ) -> (Driver, Shared) {
        let (dial_tx, dialed) = channel(io::DIAL_QUEUE);
        let (events, _) = broadcast::channel(1024);
        let (status, status_rx) = watch::channel(None);
        let unwritten = Arc::new(AtomicUsize::new(0));
        let shared = Shared {
            events: events.clone(),
            status: status_rx,
            unwritten: unwritten.clone(),
        };
        let driver = Driver {
            engine,
            io,
            deliveries: Deliveries::new(limits.port_capacity, limits.port_bytes, limits.port_stall),
            limits,
            dialing: HashSet::new(),
            dial_tx,
            dialed,
            db_waiters: HashMap::new(),
            events,
            up: HashMap::new(),
            worked: HashSet::new(),
            waiters: Waiters::default(),
            shutdown: None,
            parked: Parked::default(),
            status,
            cmd_tx: cmd_tx.downgrade(),
            unwritten,
            started: tokio::time::Instant::now(),
            // Listed from zero, as the engine's are.
            limits_hit: BTreeMap::from([("max_write_queue", 0), ("max_write_total", 0)]),
            refusals: BTreeMap::new(),
            spans: HashMap::new(),
            data_waiters: HashMap::new(),
            data_handlers: HashMap::new(),
            local_data_conns: 0,
        };
        (driver, shared)
    }

    /// Runs the node until every handle is gone, it is shut down, or its instance fails.
    pub(super) async fn run(mut self, mut cmds: Receiver<Cmd>) {
        let result = self.serve(&mut cmds).await;
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

    async fn serve(&mut self, cmds: &mut Receiver<Cmd>) -> Result<(), Fatal> {
        if self.limits.info_requests {
            self.engine.register_handler(INFO_TAG)?;
        }
        self.round()?;
        loop {
            let engine_due = self.engine.deadline()?;
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
            let room = self.deliveries.room();
            // Commands wait while the application's messages for its own ports fill a
            // port's inbox, or too many sends wait for slow peers.
            let take_cmds =
                self.deliveries.takes_commands() && self.parked.len() < parked::MAX_PARKED;
            let ready = self.io.ready();
            let wake = tokio::select! {
                cmd = cmds.recv(), if take_cmds => Wake::Cmd(cmd),
                Some(d) = self.dialed.recv() => Wake::Dialed(d),
                () = sleep => Wake::Timer,
                () = room => Wake::Room,
                () = ready => Wake::Io,
            };
            match wake {
                Wake::Cmd(None) => return Ok(()),
                Wake::Cmd(Some(cmd)) => {
                    self.deliveries.set_from_app(true);
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
                    let now = tokio::time::Instant::now();
                    if engine_due.is_some_and(|at| at <= now) {
                        self.engine.handle_timeout()?;
                    }
                    self.io.expire(now);
                }
                Wake::Room => self.deliveries.deliver_held(),
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
    /// is read (unless messages are held: full inboxes push back), each connection's
    /// input goes to the engine in a call of its own, its outputs are acted on and the
    /// connections written.
    fn round(&mut self) -> Result<(), Fatal> {
        self.settle()?;
        if self.deliveries.begin_round() {
            self.io.ready_all();
        }
        let deliveries = &self.deliveries;
        let polled = self.io.poll(|conn| deliveries.may_read(conn));
        for (stream, peer) in polled.accepted {
            let conn = self.engine.handle_accept(&peer)?;
            self.spans.insert(conn, conn_span(conn, &peer));
            self.io.add(conn, stream);
        }
        // One call per connection's input, its outputs acted on before the next: what
        // fills an inbox then pauses the connection that brought it, not every connection
        // of the round, so a peer writing to another port is read on while one port is
        // behind (a ping among a hundred senders waited for the backlog to drain).
        for input in &polled.inputs {
            self.deliveries.read(input.0);
            self.engine.handle_inputs(std::slice::from_ref(input))?;
            self.act()?;
        }
        self.settle()?;
        let max_total = self.limits.max_write_total;
        let mut pending = self.io.pending();
        while pending > max_total {
            // The connection holding most is the likeliest not to read.
            let Some(conn) = self.io.largest() else { break };
            let reason = format!(
                "peer does not read: the node's connections have more than {max_total} bytes \
                 waiting, this one the most"
            );
            self.cut_off(conn, "max_write_total", &reason)?;
            self.settle()?;
            pending = self.io.pending();
        }
        self.unwritten.store(pending, Ordering::Relaxed);
        Ok(())
    }

    /// Drops connection `conn` as a peer that does not read (past the host's limit
    /// `limit`), and tells the engine.
    fn cut_off(&mut self, conn: u64, limit: &'static str, reason: &str) -> Result<(), Fatal> {
        let count = self.limits_hit.entry(limit).or_default();
        *count = count.saturating_add(1);
        self.closed_span(conn)
            .in_scope(|| tracing::warn!("connection {conn}: {reason}"));
        if self.io.drop_conn(conn) {
            self.engine.handle_conn_error(conn, reason)?;
        }
        Ok(())
    }

    /// Carries out the application's send now.
    fn send_now(&mut self, send: parked::Send) -> Result<(), Fatal> {
        let result = self.engine.send(&send.batch)?;
        if let Err(e) = &result {
            self.refused(e);
        }
        let _ = send.reply.send(result);
        Ok(())
    }

    /// Carries out the waiting sends whose peers caught up, then acts on the outputs.
    fn unpark(&mut self) -> Result<(), Fatal> {
        let ready =
            self.parked
                .release(slow_nodes(&self.up, &self.io, self.limits.max_write_total));
        if ready.is_empty() {
            return Ok(());
        }
        // Their messages for local ports count as the application's, as when sent at once.
        self.deliveries.set_from_app(true);
        for send in ready {
            self.send_now(send)?;
        }
        self.settle()?;
        self.deliveries.set_from_app(false);
        Ok(())
    }

    /// Acts on the engine's outputs and writes the connections, until the engine has
    /// nothing more to say and every connection that ended was reported.
    fn settle(&mut self) -> Result<(), Fatal> {
        loop {
            self.act()?;
            self.io.write_all();
            if !self.io.has_ended() {
                return Ok(());
            }
            for (conn, end) in self.io.take_ended() {
                match end {
                    End::Eof => self.engine.handle_eof(conn)?,
                    End::Failed(reason) => {
                        // The host closed it: the engine does not say so again.
                        self.closed_span(conn)
                            .in_scope(|| tracing::debug!("connection {conn} failed: {reason}"));
                        self.engine.handle_conn_error(conn, &reason)?;
                    }
                }
            }
        }
    }

    /// Acts on the engine's outputs until it has nothing more to say.
    fn act(&mut self) -> Result<(), Fatal> {
        // Each poll takes all the engine has; acting on it may call the engine again.
        while let Some(outputs) = self.engine.poll_outputs()? {
            for output in outputs {
                self.output(output)?;
            }
        }
        Ok(())
    }

    fn dialed(&mut self, dialed: Dialed) -> Result<(), Fatal> {
        match dialed {
            Dialed::Connected(conn, stream) => {
                if self.dialing.remove(&conn) {
                    if let Ok(peer) = stream.peer_addr() {
                        self.spans.insert(conn, conn_span(conn, &peer.to_string()));
                    }
                    self.io.add(conn, stream);
                    self.engine.handle_connected(conn)?;
                }
            }
            Dialed::Failed(conn, reason) => {
                if self.dialing.remove(&conn) {
                    tracing::debug!("connect {conn} failed: {reason}");
                    self.engine.handle_connect_failed(conn, &reason)?;
                }
            }
        }
        Ok(())
    }

    fn command(&mut self, cmd: Cmd) -> Result<(), Fatal> {
        match cmd {
            Cmd::Port { name, reply } => {
                let port = self.engine.port(name.as_deref())?.map(|id| Port {
                    rx: self.deliveries.open(Target::Port(id.clone())),
                    id,
                    tx: self.command_sender(),
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
                    let slow = slow_nodes(&self.up, &self.io, self.limits.max_write_total);
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
                let result = self.engine.kill(&port, &Value::Array(reason).encode())?;
                if let Err(e) = &result {
                    self.refused(e);
                }
                self.deliveries.close(&Target::Port(port));
                if let Some(reply) = reply {
                    let _ = reply.send(result);
                }
            }
            Cmd::Monitor { port, reply } => {
                let monitor = self
                    .engine
                    .monitor(&port)?
                    .map(|()| self.waiters.monitor(port));
                let _ = reply.send(monitor);
            }
            Cmd::Unmonitor { port, reply } => {
                let result = self.engine.unmonitor(&port)?;
                self.waiters.unmonitor(&port);
                let _ = reply.send(result);
            }
            Cmd::WaitUp { node, reply } => {
                let up = self.up.contains_key(&node);
                self.waiters.wait_up(node, up, reply);
            }
            Cmd::Subscribe { topic, reply } => {
                match &topic {
                    Topic::Requests(tag) => self.engine.register_handler(tag)?,
                    Topic::Db(family) => self.engine.db_mon(family)?,
                }
                // A new handle for the same topic takes over; what was held for the old
                // one goes to the new one.
                let rx = self.deliveries.open(Target::Topic(topic));
                let _ = reply.send(Ok(rx));
            }
            Cmd::Unsubscribe { topic } => {
                // A handle replaced by a newer one leaves the newer one in place.
                if self.deliveries.close_if_gone(&topic)
                    && let Topic::Db(family) = &topic
                {
                    self.engine.db_unmon(family)?;
                }
            }
            Cmd::Connect { addr } => self.engine.connect_addr(&addr)?,
            Cmd::DbSet { family, key, value } => {
                self.engine.db_set(&family, &key, &value.encode())?;
            }
            Cmd::DbDel { family, keys } => self.engine.db_del(&family, &keys)?,
            Cmd::DbQuery {
                kind,
                family,
                reply,
            } => {
                let id = self.engine.db_query(kind, &family)?;
                // Queries whose caller gave up waiting are forgotten here.
                self.db_waiters.retain(|_, w| !w.is_closed());
                self.db_waiters.insert(id, reply);
            }
            Cmd::IsUp { node, reply } => {
                let _ = reply.send(Ok(self.up.contains_key(&node)));
            }
            Cmd::Memory { reply } => {
                let _ = reply.send(Ok(self.engine.memory_bytes()));
            }
            Cmd::DataConnect {
                node,
                timeout_ms,
                handler,
                args,
                reply,
            } => self.data_connect(&node, timeout_ms, &handler, &args, reply)?,
            Cmd::DataHandle { name, reply } => {
                self.engine.register_data_handler(&name)?;
                let (tx, rx) = mpsc::channel(datastream::INCOMING_QUEUE);
                // A newer handle takes over: the older one's `accept` ends.
                self.data_handlers.insert(name.clone(), tx);
                let _ = reply.send(Ok(DataConnections::new(name, rx)));
            }
            Cmd::Info { reply } => {
                let _ = reply.send(
                    self.info()
                        .map_err(|e| NodeError::Stopped(sandbox::describe(&e))),
                );
            }
            Cmd::Pending { reply } => {
                let queued = self.engine.queued_bytes()?;
                let queued = usize::try_from(queued).unwrap_or(usize::MAX);
                let _ = reply.send(Ok(self.io.pending().saturating_add(queued)));
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

    fn output(&mut self, output: wit_node::NodeOutput) -> Result<(), Fatal> {
        use wit_node::NodeOutput as O;
        match output {
            O::Transmit(t) => {
                let conn = t.conn;
                let max = self.limits.max_write_queue;
                let over = |q: usize| q > max;
                // Past the limit, what the socket takes now may still bring it under.
                if self.io.queue(conn, t.bytes).is_some_and(over) && over(self.io.write_now(conn)) {
                    let reason = format!("peer does not read: more than {max} bytes waiting");
                    self.cut_off(conn, "max_write_queue", &reason)?;
                }
            }
            O::Connect(c) => {
                self.dialing.insert(c.conn);
                io::spawn_connect(
                    c.conn,
                    c.addr,
                    self.limits.monitor_timeout,
                    self.dial_tx.clone(),
                );
            }
            O::StartTls(t) => {
                let role = match t.role {
                    wit::TlsRole::Client => Role::Client,
                    wit::TlsRole::Server => Role::Server,
                };
                let io = &mut self.io;
                // Its TLS log lines in its span (a clone: `io` is borrowed mutably meanwhile).
                let span = self
                    .spans
                    .get(&t.conn)
                    .cloned()
                    .unwrap_or_else(tracing::Span::none);
                span.in_scope(|| io.start_tls(t.conn, role, t.leftover));
            }
            O::Close(c) => {
                self.dialing.remove(&c.conn);
                let span = self.closed_span(c.conn);
                if self.io.close(c.conn) {
                    span.in_scope(|| {
                        tracing::debug!("closing connection {}: {}", c.conn, printable(&c.reason))
                    });
                }
                if !self.worked.remove(&c.conn) {
                    let _ = self
                        .events
                        .send(Event::ConnectionFailed { reason: c.reason });
                }
            }
            O::DataConnection(d) => self.data_connection(d)?,
            O::Deliver(d) => {
                let chunk = Chunk::from_sizes(d.data, &d.sizes);
                self.deliveries.deliver_port(&d.port, chunk);
            }
            O::NodeUp(wit_node::NodeUp { node, conn }) => {
                if let Some(span) = self.spans.get(&conn) {
                    span.record("node", tracing::field::display(printable(&node)));
                }
                self.in_span(conn, || tracing::info!("{} is up", printable(&node)));
                self.up.insert(node.clone(), conn);
                self.worked.insert(conn);
                self.waiters.node_up(&node);
                let _ = self.events.send(Event::NodeUp(node));
            }
            O::NodeDown(d) => {
                // Its connection's span was kept for this line (see `closed_span`).
                let conn = self.up.remove(&d.node);
                let span = conn.and_then(|c| self.spans.remove(&c));
                span.unwrap_or_else(tracing::Span::none).in_scope(|| {
                    tracing::info!("{} is down: {}", printable(&d.node), printable(&d.reason))
                });
                let _ = self.events.send(Event::NodeDown {
                    node: d.node,
                    reason: d.reason,
                });
            }
            O::PortDown(p) if self.data_waiters.contains_key(&p.port) => {
                // The request's own port: the data connection failed, and why.
                if let Some(reply) = self.data_waiters.remove(&p.port) {
                    let _ = reply.send(Err(data_failure(&p.reason)));
                }
            }
            O::PortDown(p) => {
                self.waiters.port_down(&p.port, &p.reason);
                let _ = self.events.send(Event::PortDown {
                    port: p.port,
                    reason: decode_args(&p.reason),
                });
            }
            O::Request(r) if r.tag == INFO_TAG && self.limits.info_requests => {
                self.answer_info(&r.message)?;
            }
            O::Request(r) => {
                let topic = Topic::Requests(r.tag);
                self.deliveries
                    .deliver_topic(&topic, Chunk::single(r.message));
            }
            O::DbReply(r) => {
                if let Some(waiter) = self.db_waiters.remove(&r.id) {
                    let _ = waiter.send(Value::decode(&r.result).map_err(NodeError::from));
                }
            }
            O::DbChange(c) => {
                let topic = Topic::Db(c.family);
                self.deliveries
                    .deliver_topic(&topic, Chunk::single(c.change));
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

impl Driver {
    /// What the node is doing: the engine's figures and the host's.
    fn info(&mut self) -> Result<NodeInfo, Fatal> {
        let engine = self.engine.info()?;
        let node = self.engine.node_id()?;
        let io = &self.io;
        Ok(info::gather(
            engine,
            HostFigures {
                node: &node,
                uptime: self.started.elapsed(),
                unwritten: &|conn| io.pending_of(conn),
                ports: self.deliveries.ports(),
                limits: &self.limits_hit,
                refusals: &self.refusals,
                write_queue_bytes: io.pending(),
                sandbox_memory: self.engine.memory_bytes(),
            },
        ))
    }

    /// Answers another node's [`INFO_TAG`] request (`message` the CBOR array `[NODE,
    /// REPLY...]`) with `[REPLY..., INFO]`.
    fn answer_info(&mut self, message: &[u8]) -> Result<(), Fatal> {
        let info = self.info()?;
        let Some((port, args)) = info::answer(decode_args(message), info) else {
            return Ok(());
        };
        let mut batch = super::SendBatch::new();
        batch.push(&port, &args);
        if let Err(e) = self.engine.send(&batch.batch)? {
            tracing::warn!("info answer to {} dropped: {e}", printable(&port));
        }
        Ok(())
    }

    /// Counts a refusal of the application's call.
    /// Asks the engine for a data connection; `reply` gets the stream, or why not.
    fn data_connect(
        &mut self,
        node: &str,
        timeout_ms: u64,
        handler: &str,
        args: &[u8],
        reply: Reply<DataStream>,
    ) -> Result<(), Fatal> {
        let own = self.engine.node_id()?;
        if node.split_once('#').map_or(node, |(n, _)| n) == own {
            let result = self.data_connect_self(own, handler, args);
            let _ = reply.send(result);
            return Ok(());
        }
        // A port of its own that the engine kills with the reason if it fails, monitored
        // so that the kill is reported.
        let port = match self.engine.port(None)? {
            Ok(port) => port,
            Err(e) => {
                let _ = reply.send(Err(e));
                return Ok(());
            }
        };
        let asked = match self.engine.monitor(&port)? {
            Ok(()) => self
                .engine
                .data_connect(&port, node, timeout_ms, handler, args)?,
            Err(e) => Err(e),
        };
        match asked {
            Ok(_id) => {
                self.data_waiters.insert(port, reply);
            }
            Err(e) => {
                self.refused(&e);
                self.free_port(&port)?;
                let _ = reply.send(Err(e));
            }
        }
        Ok(())
    }

    /// A data connection to this node itself: an in-memory pipe whose other end goes to
    /// the data handler at once, as the reference makes a socketpair (no engine, no
    /// socket).
    fn data_connect_self(
        &mut self,
        own: String,
        handler: &str,
        args: &[u8],
    ) -> Result<DataStream, NodeError> {
        self.local_data_conns = self.local_data_conns.wrapping_add(1);
        let setup = Setup {
            id: format!("{}@{own}", self.local_data_conns),
            node: own,
            port: String::new(),
            handler: handler.to_owned(),
            args: decode_args(args),
            requested: true,
        };
        let (ours, theirs) = DataStream::pair(setup);
        let message = match self.offer(handler, theirs) {
            Ok(()) => return Ok(ours),
            Err(true) => format!(
                "{handler}: {} data connections wait for it already",
                datastream::INCOMING_QUEUE
            ),
            Err(false) => format!("{handler}: no such data connection handler"),
        };
        Err(NodeError::DataConnection(message))
    }

    /// Removes a port of the host's own without a word to monitors or peers.
    fn free_port(&mut self, port: &str) -> Result<(), Fatal> {
        // Neither can be refused for a local port that exists; nothing to report if so.
        let _ = self.engine.unmonitor(port)?;
        let _ = self.engine.kill(port, &Value::Array(Vec::new()).encode())?;
        Ok(())
    }

    /// The engine handed a data connection's socket over: it goes to whoever asked for
    /// it, or to its data handler's [`DataConnections`]; with nobody to take it, it is
    /// closed.
    fn data_connection(&mut self, d: wit_node::DataConnection) -> Result<(), Fatal> {
        self.dialing.remove(&d.conn);
        let span = self
            .spans
            .remove(&d.conn)
            .unwrap_or_else(tracing::Span::none);
        let _entered = span.enter();
        let Some(setup) = Setup::decode(&d.setup) else {
            tracing::warn!("closing data connection {}: undecodable setup", d.conn);
            self.io.close(d.conn);
            return Ok(());
        };
        let Some(conn) = self.io.take(d.conn, d.leftover) else {
            tracing::debug!("data connection {} ended before its hand-over", setup.id);
            return Ok(());
        };
        tracing::debug!(
            "data connection {} with {} established",
            setup.id,
            setup.node
        );
        if setup.requested {
            let port = setup.port.clone();
            // (Given up by its caller meanwhile: the stream is dropped, which closes it.)
            if let Some(reply) = self.data_waiters.remove(&port) {
                let _ = reply.send(Ok(DataStream::new(conn, setup)));
                self.free_port(&port)?;
            }
            return Ok(());
        }
        let (id, handler) = (setup.id.clone(), setup.handler.clone());
        let stream = DataStream::new(conn, setup);
        match self.offer(&handler, stream) {
            Ok(()) => {}
            Err(true) => tracing::warn!(
                "closing data connection {id}: {} wait for data handler {handler} already",
                datastream::INCOMING_QUEUE
            ),
            Err(false) => {
                self.data_handlers.remove(&handler);
                tracing::warn!("closing data connection {id}: data handler {handler} is gone");
            }
        }
        Ok(())
    }

    /// Gives an incoming data connection to data handler `handler`'s handle.
    /// `Err(true)`: its queue is full; `Err(false)`: it has no handle (and the stream
    /// is dropped, which closes it, either way).
    fn offer(&self, handler: &str, stream: DataStream) -> Result<(), bool> {
        match self.data_handlers.get(handler) {
            Some(tx) => tx
                .try_send(stream)
                .map_err(|e| matches!(e, mpsc::error::TrySendError::Full(_))),
            None => Err(false),
        }
    }

    fn refused(&mut self, e: &NodeError) {
        let kind = match e {
            NodeError::Refused { kind, .. } => kind,
            NodeError::Partial { cause, .. } => match cause.as_ref() {
                NodeError::Refused { kind, .. } => kind,
                _ => return,
            },
            _ => return,
        };
        let count = self.refusals.entry(format!("{kind:?}")).or_default();
        *count = count.saturating_add(1);
    }

    /// The span of `conn`, which is closing: forgotten, unless the connection is still
    /// a node's working one, whose `node-down` comes next and is logged in it.
    fn closed_span(&mut self, conn: u64) -> tracing::Span {
        let span = if self.up.values().any(|&c| c == conn) {
            self.spans.get(&conn).cloned()
        } else {
            self.spans.remove(&conn)
        };
        span.unwrap_or_else(tracing::Span::none)
    }

    /// Runs `f` inside connection `conn`'s span (none if it has none).
    fn in_span<T>(&self, conn: u64, f: impl FnOnce() -> T) -> T {
        match self.spans.get(&conn) {
            Some(span) => span.in_scope(f),
            None => f(),
        }
    }
}

/// The span of connection `conn` to or from `addr`; its `node` is recorded once the
/// handshake tells it.
fn conn_span(conn: u64, addr: &str) -> tracing::Span {
    tracing::info_span!("conn", id = conn, addr = %printable(addr), node = tracing::field::Empty)
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

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    /// What the subscriber wrote, shared with the test.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_connections_log_lines_name_it_its_address_and_its_node() {
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            let span = conn_span(7, "10.0.0.1:4040");
            span.in_scope(|| tracing::info!("in the handshake"));
            span.record("node", tracing::field::display(printable("srv\n")));
            span.in_scope(|| tracing::info!("srv is up"));
        });
        let text = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert!(
            lines[0].contains("conn{id=7 addr=10.0.0.1:4040}: "),
            "{text}"
        );
        // The peer's node id, control characters escaped, once the handshake told it.
        assert!(
            lines[1].contains("conn{id=7 addr=10.0.0.1:4040 node=srv\\n}: "),
            "{text}"
        );
    }
}
