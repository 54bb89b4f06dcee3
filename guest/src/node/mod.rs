//! The node kernel: one AEMP node with many connections, local ports, monitors, the node
//! port and the global protocol (client side in `global`, global node side in `seed`).
//! Sans-IO like the transport: every input names the connection it concerns and carries
//! the time; everything the host must do comes out of [`Node::poll_output`].
//!
//! Connection ids are chosen by the node: [`Node::handle_accept`] returns one for an
//! incoming socket, [`NodeOutput::Connect`] names one for an outgoing socket.

mod dataconn;
mod deferred;
mod effect;
mod global;
mod handshakes;
mod ids;
mod kernel;
mod msg;
mod request;
mod seed;
mod stats;

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};

pub use ids::{PortId, expand_node_id};
pub use request::REQUEST_TAGS;
pub use seed::GlobalLimits;
pub use stats::{ConnInfo, Limit, NodeInfo, Traffic};

use crate::batch::Delivery;
use crate::config::Config;
use crate::connection::{Connection, Output, Session, TlsRole, Verdict};
use crate::error::{ConfigError, Error, MessageError, RefusalKind};
use crate::framing::Checker;
use crate::greeting::NONCE_LEN;
use crate::value::Value;
use dataconn::{DataConns, Link};
use deferred::{Deferred, Shared};
use effect::{Cx, Effect, Effects, Jitter, View};
use global::{Global, Seeds};
use handshakes::Handshakes;
use kernel::{Kernel, Monitored};
use request::{DataRequest, GlobalRequest, Query, Request};
use stats::{Counters, bump};

/// The [`View`] of `node` for its parts, borrowing only the fields it names, so that a
/// part (another field) can be borrowed mutably beside it.
macro_rules! view {
    ($node:expr) => {
        view!($node, $node.service.is_some())
    };
    // For the global service, borrowed mutably meanwhile.
    ($node:expr, $global:expr) => {
        View {
            config: &$node.config,
            node_id: &$node.node_id,
            peers: &$node.peers,
            globals: &$node.globals,
            global: $global,
            now: $node.now,
        }
    };
}

/// Identifies one connection (socket) of a node: chosen by the node, never reused by it.
/// Hosts carry it as the number [`ConnId::get`] gives (WIT's `conn-id`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ConnId(u64);

impl ConnId {
    /// The id as a number.
    pub fn get(self) -> u64 {
        self.0
    }
}

/// A host hands back the number it was given.
impl From<u64> for ConnId {
    fn from(id: u64) -> ConnId {
        ConnId(id)
    }
}

impl std::fmt::Display for ConnId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// How a node is set up.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// The transport settings for every connection (its `node_id` is ours; `peer_addr`
    /// and the `mproto`/`gproto` greeting pairs are filled in per connection).
    pub transport: Config,
    /// Our listening addresses (`host:port`), announced to the network under `'l`.
    pub binds: Vec<String>,
    /// Seed addresses (`host:port`) to keep connected; the first seed up becomes master.
    pub seeds: Vec<String>,
    /// Spacing of connection attempts to one node's addresses (default 2 s).
    pub connect_interval_ms: u64,
    /// Bytes of messages queued for one node that is not connected yet (default 16 MiB).
    pub max_queue_bytes: usize,
    /// Bytes the node may hold on behalf of peers, all together (default 64 MiB, well
    /// under the host's 256 MiB sandbox, which also needs room for the copies of a
    /// message in flight): every connection's handshake input, partial message and
    /// unpolled outputs, every queue for a node that is not connected, and the node's
    /// own unpolled outputs. Input that would pass it closes its connection
    /// ([`Error::NodeBudgetExhausted`]); a message that would pass it is refused
    /// ([`NodeError::BudgetExhausted`]). See [`Node::buffered_bytes`].
    pub max_buffered_bytes: usize,
    /// Other nodes the node keeps state for at once (default 65 536): connected, with
    /// messages queued, or being reached. Peers name node ids (in relayed messages, say),
    /// so this table needs a total beside the byte budget of the queues, which would let
    /// millions of tiny queues through; a message for one more node is refused
    /// ([`NodeError::TooManyNodes`]).
    pub max_nodes: usize,
    /// Accepted connections that may be in their handshake at once (default 256). At the
    /// cap a newly accepted connection makes room: the oldest handshake of the source
    /// address holding the most is closed, so whoever fills the table cannot keep a peer
    /// that completes its handshake quickly from getting through.
    pub max_handshakes: usize,
    /// Added to `now` to get milliseconds since the UNIX epoch (for `time` requests).
    pub wall_clock_offset_ms: i64,
    /// Whether this node becomes a global node when asked (`g_slave`) or when it finds
    /// itself among its seeds (default true, as in AnyEvent::MP). When false, `g_slave`
    /// is an unknown request like any other.
    pub serve_global: bool,
    /// What peers can make this node hold once it is global.
    pub global_limits: GlobalLimits,
    /// Data connections announced and not yet handed over, both ways together (default
    /// 256): a request past it is refused (the requesting port is killed, or
    /// [`Node::data_connect`] fails with [`NodeError::TooManyDataConns`]).
    pub max_data_conns: usize,
}

impl NodeConfig {
    /// Defaults for a node named `node_id` (after any `%n`/`%u` expansion).
    pub fn new(node_id: impl Into<String>) -> NodeConfig {
        NodeConfig {
            transport: Config::new(node_id),
            binds: Vec::new(),
            seeds: Vec::new(),
            connect_interval_ms: 2_000,
            max_queue_bytes: 16 << 20,
            max_buffered_bytes: 64 << 20,
            max_nodes: 65_536,
            max_handshakes: 256,
            wall_clock_offset_ms: 0,
            serve_global: true,
            global_limits: GlobalLimits::default(),
            max_data_conns: 256,
        }
    }
}

/// How important a log line is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum LogLevel {
    Error,
    Warn,
    Info,
    Debug,
}

/// Something the host must act on, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum NodeOutput {
    /// Write bytes on a connection (through TLS once it has started there).
    Transmit { conn: ConnId, bytes: Vec<u8> },
    /// Open a TCP connection to `addr`; report [`Node::handle_connected`] or
    /// [`Node::handle_connect_failed`] for `conn`.
    Connect { conn: ConnId, addr: String },
    /// Start TLS on `conn` in `role`; `leftover` are bytes already received that are TLS.
    StartTls {
        conn: ConnId,
        role: TlsRole,
        leftover: Vec<u8>,
    },
    /// Close `conn` after writing what was transmitted before; the id is free again.
    Close { conn: ConnId, reason: String },
    /// Messages for one local port: consecutive deliveries to the same port share one,
    /// built in place as they arrive.
    Deliver(Delivery),
    /// A node completed a handshake; `conn` is its working connection (where what is
    /// sent to it goes) until it is reported down.
    NodeUp { node: String, conn: ConnId },
    /// A node's working connection is gone.
    NodeDown { node: String, reason: String },
    /// A port we monitor died; `reason` is a CBOR array (empty for a normal exit).
    PortDown { port: String, reason: Vec<u8> },
    /// A node-port request with a tag the application registered. `message` is the CBOR
    /// array `[NODE, ARGS...]`: the sender's node id, then the arguments after the tag.
    Request { tag: String, message: Vec<u8> },
    /// The answer to a `db_family`/`db_keys`/`db_values` query (CBOR).
    DbReply { id: String, result: Vec<u8> },
    /// A monitored database family changed. `change` is the CBOR array `[SET, DEL]`: a
    /// map of the new or changed keys and their values, an array of the deleted keys. The
    /// first report holds the whole family.
    DbChange { family: String, change: Vec<u8> },
    /// Something worth logging.
    Log { level: LogLevel, message: String },
    /// Data connection `id` with `node` is authenticated (inside TLS if `StartTls` came
    /// for `conn`): the socket of `conn` is the host's from here, a plain byte stream,
    /// and the node forgets `conn`. `leftover` are bytes already received that belong to
    /// the stream. `requested`: this node asked for it ([`Node::data_connect`], and
    /// `port` is that call's port); else `node` did, and the host runs the data handler
    /// `handler` (one registered with [`Node::register_data_handler`]) with `init_args`,
    /// a CBOR array.
    DataConnection {
        conn: ConnId,
        id: String,
        node: String,
        port: String,
        handler: String,
        init_args: Vec<u8>,
        requested: bool,
        leftover: Vec<u8>,
    },
}

impl NodeOutput {
    /// The message bytes this output holds (what counts toward `max_buffered_bytes`).
    fn buffered_bytes(&self) -> usize {
        match self {
            NodeOutput::Transmit { bytes, .. }
            | NodeOutput::StartTls {
                leftover: bytes, ..
            }
            | NodeOutput::PortDown { reason: bytes, .. }
            | NodeOutput::Request { message: bytes, .. }
            | NodeOutput::DbReply { result: bytes, .. }
            | NodeOutput::DbChange { change: bytes, .. } => bytes.capacity(),
            NodeOutput::Deliver(delivery) => delivery.capacity_bytes(),
            NodeOutput::DataConnection {
                init_args,
                leftover,
                ..
            } => init_args.capacity().saturating_add(leftover.capacity()),
            NodeOutput::Connect { .. }
            | NodeOutput::Close { .. }
            | NodeOutput::NodeUp { .. }
            | NodeOutput::NodeDown { .. }
            | NodeOutput::Log { .. } => 0,
        }
    }
}

/// Why an application call was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NodeError {
    /// Port ids are `NODE#NAME`.
    #[error("invalid port id '{0}': expected NODE#NAME")]
    InvalidPortId(String),
    /// The node is not connected and its queue is full.
    #[error("queue for node {0} is full")]
    QueueFull(String),
    /// Queueing the message would take the node past `max_buffered_bytes`.
    #[error("node memory budget for peers ({0} bytes) exhausted, message refused")]
    BudgetExhausted(usize),
    /// A local port of that name exists already.
    #[error("port {0} exists already")]
    PortExists(String),
    /// The node knows `max_nodes` other nodes already (connected, queued for or being
    /// reached): a message for one more is refused.
    #[error("too many nodes known ({0}), message for {1} refused")]
    TooManyNodes(usize, String),
    /// `max_data_conns` data connections are pending already.
    #[error("too many pending data connections ({0})")]
    TooManyDataConns(usize),
    /// A data connection to this node itself (the reference makes a socket pair; an
    /// engine has no sockets).
    #[error("data connections to the own node are not supported")]
    DataConnToSelf,
    /// The message is unacceptable.
    #[error(transparent)]
    Message(#[from] MessageError),
}

impl NodeError {
    /// The kind of refusal this is.
    pub fn refusal_kind(&self) -> RefusalKind {
        match self {
            NodeError::InvalidPortId(_) => RefusalKind::InvalidPortId,
            NodeError::QueueFull(_) => RefusalKind::QueueFull,
            NodeError::BudgetExhausted(_)
            | NodeError::TooManyNodes(..)
            | NodeError::TooManyDataConns(_) => RefusalKind::BudgetExhausted,
            NodeError::DataConnToSelf => RefusalKind::InvalidPortId,
            NodeError::PortExists(_) => RefusalKind::PortExists,
            NodeError::Message(m) => m.refusal_kind(),
        }
    }
}

/// Hashes connection ids for the node's table of connections. The node hands the ids
/// out itself (1, 2, 3...), peers choose none, so a multiply that spreads them does
/// (SipHash, built for keys an attacker picks, cost a lookup or two per message).
#[derive(Debug, Default, Clone, Copy)]
struct ConnIdHasher(u64);

impl Hasher for ConnIdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write_u64(&mut self, id: u64) {
        // 2^64 / golden ratio: consecutive ids land far apart in every bit.
        self.0 = (self.0 ^ id).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }
}

/// One connection and what it is for.
#[derive(Debug)]
struct Conn {
    /// `None` while an outgoing socket is being opened.
    transport: Option<Connection>,
    addr: String,
    /// The node this connection was dialled for.
    dialled_for: Option<String>,
    /// Index into the seed list when this is a seed connection.
    seed: Option<usize>,
    /// The remote node, once greeted.
    remote: Option<String>,
    /// Accepted from a listener and still in its handshake: its place in
    /// [`Node::handshakes`] (its accept order), until authenticated.
    handshake: Option<u64>,
    /// What its transport held at the last [`Node::recount`].
    held: usize,
    /// Its entry in [`Node::timers`].
    due: Option<u64>,
    /// Accepted from a listener (else dialled).
    incoming: bool,
    /// What the handshake settled, for [`Node::info`].
    session: Option<Session>,
    /// The data connection this connection carries (dialled for it, or accepted with
    /// its id), else an AEMP connection.
    dataconn: Option<String>,
    /// What it moved, for [`Node::info`].
    traffic: Traffic,
}

/// An attempt to reach a node through its addresses.
#[derive(Debug, Default)]
struct Dial {
    /// Addresses not tried yet.
    pending: VecDeque<String>,
    next_at: u64,
    interval: u64,
    /// Asked the master for addresses and waiting.
    finding: bool,
    /// Nobody to ask for addresses: only a connection from the node itself can help.
    no_address: bool,
}

/// What we know about another node.
#[derive(Debug, Default)]
struct Peer {
    /// The working connection.
    conn: Option<ConnId>,
    /// Messages waiting for a connection, and their size.
    queue: VecDeque<Vec<u8>>,
    queued_bytes: usize,
    /// Set while trying to connect; the attempt fails at `until`.
    connecting: Option<(Dial, u64)>,
}

/// One AEMP node. See the module documentation.
#[derive(Debug)]
pub struct Node {
    config: NodeConfig,
    node_id: String,
    conns: HashMap<ConnId, Conn, BuildHasherDefault<ConnIdHasher>>,
    next_conn: ConnId,
    /// Every connection's [`Connection::poll_timeout`] (as of its last
    /// [`pump`](Self::pump)) with its id, soonest first: a node with ten thousand idle
    /// connections finds its next deadline without looking at each.
    timers: BTreeSet<(u64, ConnId)>,
    /// Keyed by node ids that peers choose (in `snd` relays, say): ordered, not hashed, so
    /// that no choice of names makes lookups slow. std's SipHash keys would not help
    /// here: on wasm32-unknown-unknown (no OS randomness) std takes them from the
    /// addresses of a stack and a heap byte, the same in every fresh instance.
    peers: BTreeMap<String, Peer>,
    /// The peers being reached (`connecting` set), the only ones with deadlines.
    dialing: BTreeSet<String>,
    /// Local ports, monitors, the node port.
    kernel: Kernel,
    /// Data connections announced and not handed over yet.
    dataconn: DataConns,
    seeds: Seeds,
    global: Global,
    /// The global-node state, once this node is global.
    service: Option<seed::Service>,
    /// Nodes that announced themselves as global (`g_global`) and are up.
    globals: BTreeSet<String>,
    jitter: Jitter,
    /// What the parts asked for and [`run_effects`](Self::run_effects) has not done yet.
    effects: Effects,
    /// Set while effects are being carried out, so that effects queued meanwhile join
    /// that run instead of starting another.
    applying: bool,
    outputs: VecDeque<NodeOutput>,
    /// Checks the messages the application sends.
    checker: Checker,
    /// Where [`Node::send`] builds each message: reused, so sending allocates nothing.
    scratch: Vec<u8>,
    /// The node the last message went to and its working connection: a run of messages
    /// to one node looks it up once. Forgotten wherever a node's connection changes
    /// ([`Node::connected`], [`Node::transport_error`]).
    last_route: (String, Option<ConnId>),
    now: u64,
    /// Warnings about each connected peer's requests in the current window (ordered, as
    /// `peers`).
    warned: BTreeMap<String, WarnBudget>,
    /// The connections' share of [`Node::buffered_bytes`] (the sum of their `held`).
    conns_held: usize,
    /// The queues' share of [`Node::buffered_bytes`] (the sum of their `queued_bytes`).
    queued_held: usize,
    /// Accepted connections in their handshake, oldest first (see `max_handshakes`).
    handshakes: Handshakes,
    /// Bytes put into transmits since the host last took the outputs: what
    /// [`transmit`](Self::transmit) checks against the budget before it copies more.
    transmitted: usize,
    /// Messages for connections the outputs had no room for yet.
    deferred: Deferred,
    /// What [`Node::info`] reports beside the live state.
    counters: Counters,
}

/// A message to transmit: borrowed (copied into the transmit at once, or into a shared
/// buffer if it must wait), or shared already (one encoding for many connections).
#[derive(Clone, Copy)]
enum Outgoing<'a> {
    Bytes(&'a [u8]),
    Shared(&'a Shared),
}

impl Outgoing<'_> {
    fn bytes(&self) -> &[u8] {
        match self {
            Outgoing::Bytes(bytes) => bytes,
            Outgoing::Shared(shared) => shared,
        }
    }

    fn shared(&self) -> Shared {
        match self {
            Outgoing::Bytes(bytes) => Shared::from(*bytes),
            Outgoing::Shared(shared) => Shared::clone(shared),
        }
    }
}

/// The largest send buffer a node keeps between messages (larger ones are freed).
const SCRATCH_KEPT: usize = 64 << 10;

/// Warnings logged about one peer's requests per window; past it they are dropped, so a
/// peer sending junk cannot flood the log.
const PEER_WARNINGS: u32 = 10;
const PEER_WARNING_WINDOW_MS: u64 = 60_000;

/// One peer's warnings in the current window.
#[derive(Debug, Clone, Copy)]
struct WarnBudget {
    since: u64,
    count: u32,
}

impl Node {
    /// A node at time `now` (milliseconds, monotonic); `seed` is 16 random bytes from the
    /// host for fresh port names and timer jitter.
    pub fn new(config: NodeConfig, seed: [u8; 16], now: u64) -> Result<Node, ConfigError> {
        config.transport.validate()?;
        let node_id = config.transport.node_id.clone();
        let seeds = Seeds::new(&config.seeds);
        let jitter = Jitter::new(seed[8..16].try_into().unwrap_or_default());
        let mut node = Node {
            node_id: node_id.clone(),
            conns: HashMap::default(),
            next_conn: ConnId(1),
            timers: BTreeSet::new(),
            peers: BTreeMap::new(),
            dialing: BTreeSet::new(),
            kernel: Kernel::new(ids::alnum(&seed[..9])),
            dataconn: DataConns::new(config.max_data_conns),
            seeds,
            global: Global::default(),
            service: None,
            globals: BTreeSet::new(),
            jitter,
            effects: Effects::default(),
            applying: false,
            outputs: VecDeque::new(),
            checker: Checker::default(),
            scratch: Vec::new(),
            last_route: (String::new(), None),
            now,
            warned: BTreeMap::new(),
            conns_held: 0,
            queued_held: 0,
            handshakes: Handshakes::default(),
            transmitted: 0,
            deferred: Deferred::default(),
            counters: Counters::default(),
            config,
        };
        let binds = node
            .config
            .binds
            .iter()
            .map(|b| Value::text(b.as_str()))
            .collect();
        node.global
            .put("'l", &node_id, Value::Array(binds), &mut node.effects);
        node.seed_again(now);
        node.run_effects();
        Ok(node)
    }

    /// Our node id.
    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    /// Whether `node` has a working connection.
    pub fn is_up(&self, node: &str) -> bool {
        self.peers.get(node).is_some_and(|p| p.conn.is_some())
    }

    // ---- sockets -------------------------------------------------------------------

    /// An incoming socket from `peer_addr` was accepted; `nonce` is 66 fresh random bytes.
    /// With `max_handshakes` accepted connections already in their handshake, one of them
    /// makes room (closed with [`NodeOutput::Close`]): the oldest of the source address
    /// that holds the most. A flood of silent or dripping connections then only shortens
    /// everyone's handshake window to the time `max_handshakes` newer ones take to
    /// arrive, and a peer that completes its handshake within it gets through.
    pub fn handle_accept(&mut self, peer_addr: &str, nonce: [u8; NONCE_LEN], now: u64) -> ConnId {
        self.now = now;
        let conn = self.alloc_conn(peer_addr, None, None);
        if self.handshakes.len() >= self.config.max_handshakes {
            self.counters.hit(Limit::Handshakes);
            if let Some(victim) = self.handshakes.victim() {
                let max = self.config.max_handshakes;
                self.close(
                    victim,
                    format!("too many connections in their handshake ({max}), oldest dropped"),
                );
            } else {
                // `max_handshakes` is 0: no handshake is allowed at all.
                self.close(conn, "no connections accepted (max_handshakes is 0)".into());
                return conn;
            }
        }
        let seq = self.handshakes.insert(conn, peer_addr);
        if let Some(c) = self.conns.get_mut(&conn) {
            c.handshake = Some(seq);
            c.incoming = true;
        }
        self.start_transport(conn, nonce, now);
        conn
    }

    /// An outgoing socket asked for by [`NodeOutput::Connect`] is open.
    pub fn handle_connected(&mut self, conn: ConnId, nonce: [u8; NONCE_LEN], now: u64) {
        self.now = now;
        if self.conns.get(&conn).is_some_and(|c| c.transport.is_none()) {
            self.start_transport(conn, nonce, now);
        }
    }

    /// An outgoing socket could not be opened.
    pub fn handle_connect_failed(&mut self, conn: ConnId, reason: &str, now: u64) {
        self.now = now;
        self.connection_gone(conn, reason.to_owned(), false);
    }

    /// Bytes received on `conn` (decrypted once TLS has started). When buffering them
    /// could take the node past `max_buffered_bytes`, the connection is closed instead
    /// ([`Error::NodeBudgetExhausted`]).
    pub fn handle_input(&mut self, conn: ConnId, data: &[u8], now: u64) {
        self.now = now;
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        bump(&mut c.traffic.bytes_in, data.len());
        let held = c.held;
        let max = self.config.max_buffered_bytes;
        let others = self.buffered_bytes().saturating_sub(held);
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        let Some(t) = c.transport.as_mut() else {
            return;
        };
        if others.saturating_add(t.buffered_after(data.len())) > max {
            t.abort(Error::NodeBudgetExhausted(max));
            self.counters.hit(Limit::BudgetInput);
            return self.pump(conn);
        }
        // Messages for local ports go from the input straight into the deliveries; from
        // the first that is anything else (a request, which may change the ports), the
        // rest of the input waits its turn behind it, in order.
        let (outputs, kernel, node_id) = (&mut self.outputs, &self.kernel, &self.node_id);
        let traffic = &mut c.traffic;
        let mut later: Vec<Vec<u8>> = Vec::new();
        t.handle_input_with(data, &mut |message| {
            if later.is_empty()
                && let Some(parts) = msg::split(message)
                && !parts.port.is_empty()
                && kernel.has_port(parts.port.as_ref())
            {
                bump(&mut traffic.messages_in, 1);
                return deliver(outputs, node_id, &parts);
            }
            later.push(message.to_vec());
        });
        self.count_in(conn, later.len());
        for message in later {
            self.received(conn, &message);
        }
        self.pump(conn);
    }

    /// Bytes of messages waiting for nodes that are not connected yet: sent by the
    /// application, not yet handed to a connection. A queue goes when its node comes up
    /// (the messages are sent) or is given up (they are dropped).
    pub fn queued_bytes(&self) -> usize {
        self.queued_held
    }

    /// Bytes the node holds on behalf of peers, the figure `max_buffered_bytes` limits:
    /// what every connection holds ([`Connection::buffered_bytes`]), the queues for
    /// nodes not connected yet, and outputs not polled yet (a host drains them after
    /// each call, so they are few).
    pub fn buffered_bytes(&self) -> usize {
        debug_assert_eq!(
            self.conns_held,
            self.conns.values().map(|c| c.held).sum::<usize>()
        );
        debug_assert_eq!(
            self.queued_held,
            self.peers.values().map(|p| p.queued_bytes).sum::<usize>()
        );
        let outputs: usize = self.outputs.iter().map(NodeOutput::buffered_bytes).sum();
        self.conns_held
            .saturating_add(self.queued_held)
            .saturating_add(self.deferred.held())
            .saturating_add(outputs)
    }

    /// The peer closed `conn`.
    pub fn handle_eof(&mut self, conn: ConnId, now: u64) {
        self.now = now;
        if let Some(t) = self.transport(conn) {
            t.handle_eof();
            self.pump(conn);
        }
    }

    /// `conn` failed in the host (socket error, TLS failure); the host has closed it.
    pub fn handle_conn_error(&mut self, conn: ConnId, reason: &str, now: u64) {
        self.now = now;
        self.connection_gone(conn, reason.to_owned(), false);
    }

    /// The clock reached `now`.
    pub fn handle_timeout(&mut self, now: u64) {
        self.now = now;
        let due: Vec<ConnId> = self
            .timers
            .range(..=(now, ConnId(u64::MAX)))
            .map(|&(_, conn)| conn)
            .collect();
        for conn in due {
            if let Some(t) = self.transport(conn) {
                t.handle_timeout(now);
                self.pump(conn);
            }
        }
        let nodes: Vec<String> = self.dialing.iter().cloned().collect();
        for node in nodes {
            self.dial_step(&node, now);
        }
        if self.seeds.next_at().is_some_and(|t| t <= now) {
            let due = self
                .seeds
                .due(now, self.config.transport.monitor_timeout_ms);
            self.dial_seeds(due);
        }
        if let Some(service) = self.service.as_mut()
            && service.keep_at.is_some_and(|t| t <= now)
        {
            let cx = &mut Cx {
                view: &view!(self, true),
                jitter: &mut self.jitter,
                fx: &mut self.effects,
            };
            service.keep_all(cx);
        }
        if self.dataconn.next_deadline().is_some_and(|t| t <= now) {
            self.dataconn.expire(&view!(self), &mut self.effects);
        }
        self.run_effects();
    }

    /// When [`handle_timeout`](Self::handle_timeout) must be called next, if ever.
    pub fn poll_timeout(&self) -> Option<u64> {
        debug_assert_eq!(
            self.timers.first().map(|&(t, _)| t),
            self.conns
                .values()
                .filter_map(|c| c.transport.as_ref()?.poll_timeout())
                .min()
        );
        debug_assert!(
            self.peers
                .iter()
                .all(|(n, p)| p.connecting.is_none() || self.dialing.contains(n))
        );
        let conns = self.timers.first().map(|&(t, _)| t);
        let dials = self.dialing.iter().filter_map(|node| {
            let (dial, until) = self.peers.get(node)?.connecting.as_ref()?;
            Some(if dial.pending.is_empty() {
                *until
            } else {
                dial.next_at.min(*until)
            })
        });
        let keep = self.service.as_ref().and_then(|s| s.keep_at);
        let data = self.dataconn.next_deadline();
        // Messages waiting for room: released by the next poll, so poll at once.
        let deferred = (!self.deferred.is_empty()).then_some(self.now);
        conns
            .into_iter()
            .chain(dials)
            .chain(self.seeds.next_at())
            .chain(keep)
            .chain(data)
            .chain(deferred)
            .min()
    }

    /// The next thing for the host to do. When the outputs run out, messages that
    /// waited for room are released into them (as much as the budget allows).
    pub fn poll_output(&mut self) -> Option<NodeOutput> {
        if self.outputs.is_empty() {
            self.release_deferred();
        }
        let output = self.outputs.pop_front();
        if self.outputs.is_empty() {
            self.transmitted = 0;
        }
        output
    }

    /// Everything to act on now, in order (what [`poll_output`](Self::poll_output) would
    /// return until `None`, but at most one release of waiting messages: what is still
    /// waiting after it shows in [`poll_timeout`](Self::poll_timeout) as due now).
    pub fn poll_outputs(&mut self) -> VecDeque<NodeOutput> {
        if self.outputs.is_empty() {
            self.release_deferred();
        }
        self.transmitted = 0;
        std::mem::take(&mut self.outputs)
    }

    // ---- the application's side ----------------------------------------------------

    /// Dials `addr` without knowing which node listens there (the greeting tells).
    pub fn connect_addr(&mut self, addr: &str, now: u64) -> ConnId {
        self.now = now;
        let conn = self.alloc_conn(addr, None, None);
        self.outputs.push_back(NodeOutput::Connect {
            conn,
            addr: addr.to_owned(),
        });
        conn
    }

    /// Creates a local port with a fresh unique name; returns its port id.
    pub fn new_port(&mut self) -> String {
        let name = self.kernel.new_port();
        format!("{}#{name}", self.node_id)
    }

    /// Creates a local port with a chosen name (e.g. `echo`); returns its port id.
    pub fn register_port(&mut self, name: &str) -> Result<String, NodeError> {
        if name.is_empty() || name.contains('#') {
            return Err(NodeError::InvalidPortId(name.to_owned()));
        }
        if !self.kernel.register_port(name) {
            return Err(NodeError::PortExists(name.to_owned()));
        }
        Ok(format!("{}#{name}", self.node_id))
    }

    /// Sends `args` (a CBOR array) to `port_id`: delivered locally, sent, or queued until
    /// the node is connected (connecting to it if needed).
    pub fn send(&mut self, port_id: &str, args: &[u8], now: u64) -> Result<(), NodeError> {
        self.now = now;
        let PortId { node, name: port } = parse_port_id(port_id)?;
        let mut message = std::mem::take(&mut self.scratch);
        message.clear();
        let result = msg::join_into(port, args, &mut message)
            .and_then(|()| {
                self.checker
                    .check_item(&message, &self.config.transport.limits)
            })
            .map_err(NodeError::from)
            .and_then(|()| self.route(node, &message, true, now));
        // A rare large message does not keep its buffer.
        if message.capacity() <= SCRATCH_KEPT {
            self.scratch = message;
        }
        result
    }

    /// Kills local port `port_id` (or asks its node to kill it) with `reason` (a CBOR
    /// array; empty for a normal exit). Monitors fire.
    pub fn kill(&mut self, port_id: &str, reason: &[u8], now: u64) -> Result<(), NodeError> {
        self.now = now;
        parse_port_id(port_id)?;
        let reason = reason_values(reason)?;
        self.kill_with(port_id, reason, now)
    }

    /// [`kill`](Self::kill) with the reason decoded.
    fn kill_with(&mut self, port_id: &str, reason: Vec<Value>, now: u64) -> Result<(), NodeError> {
        let PortId { node, name: port } = parse_port_id(port_id)?;
        if node == self.node_id {
            self.kernel
                .kill_local(port, reason, &view!(self), &mut self.effects);
            self.run_effects();
            Ok(())
        } else {
            let mut args = vec![Value::text("kil1"), Value::text(port)];
            args.extend(reason);
            self.route(node, &msg::build("", args), false, now)
        }
    }

    /// Monitors `port_id`: a [`NodeOutput::PortDown`] reports its death (at once with
    /// `no_such_port` if a local port does not exist; with `transport_error` if its node's
    /// connection is lost). A bare node id is that node's node port, reported as `NODE#`.
    pub fn monitor(&mut self, port_id: &str, now: u64) -> Result<(), NodeError> {
        self.now = now;
        let id = parse_port_id(port_id)?;
        let PortId { node, name: port } = id;
        let remote = node != self.node_id;
        let max_nodes = self.config.max_nodes;
        if remote && self.peers.len() >= max_nodes && !self.peers.contains_key(node) {
            return Err(NodeError::TooManyNodes(max_nodes, node.to_owned()));
        }
        match self.kernel.monitor(&self.node_id, node, port) {
            Monitored::Counted => {
                // As in the reference, a monitor reaches the node, so that it fires when
                // the node cannot be reached (even if it went down just before).
                if remote && !self.is_up(node) {
                    self.peers.entry(node.to_owned()).or_default();
                    self.connect(node, now);
                }
                Ok(())
            }
            Monitored::AskRemote => {
                // The peer entry the monitor is tied to (gone when the node is).
                self.peers.entry(node.to_owned()).or_default();
                let message = msg::build("", [Value::text("mon1"), Value::text(port)]);
                self.route(node, &message, false, now)
            }
            Monitored::NoSuchPort(reason) => {
                self.outputs.push_back(NodeOutput::PortDown {
                    port: id.to_string(),
                    reason,
                });
                Ok(())
            }
        }
    }

    /// Drops one monitor of `port_id`; the last one tells a remote node to stop (`mon0`).
    pub fn unmonitor(&mut self, port_id: &str, now: u64) -> Result<(), NodeError> {
        self.now = now;
        let PortId { node, name: port } = parse_port_id(port_id)?;
        if self.kernel.unmonitor(node, port) && self.is_up(node) {
            let message = msg::build("", [Value::text("mon0"), Value::text(port)]);
            self.route(node, &message, false, now)?;
        }
        Ok(())
    }

    /// Asks `node` for a data connection (AnyEvent::MP::DataConn's `connect_to`): a byte
    /// stream, authenticated like the node's AEMP connection, that comes out as
    /// [`NodeOutput::DataConnection`] on both nodes; there the data handler `handler`
    /// gets it with `init_args` (a CBOR array). `port_id` is a local port: if the
    /// connection is not up within `timeout_ms` (`NODE: unable to establish connection
    /// within N seconds`), or fails before, it is killed with `["AnyEvent::MP::DataConn",
    /// MESSAGE]` (monitor it to learn why). Returns the connection's id.
    pub fn data_connect(
        &mut self,
        port_id: &str,
        node: &str,
        timeout_ms: u64,
        handler: &str,
        init_args: &[u8],
        now: u64,
    ) -> Result<String, NodeError> {
        self.now = now;
        let port = PortId::parse(port_id)
            .filter(|p| p.node == self.node_id && self.kernel.has_port(p.name))
            .ok_or_else(|| NodeError::InvalidPortId(port_id.to_owned()))?
            .name;
        let node = PortId::parse(node).map_or(node, |p| p.node);
        if node == self.node_id {
            return Err(NodeError::DataConnToSelf);
        }
        if node.is_empty() {
            return Err(NodeError::InvalidPortId(node.to_owned()));
        }
        let init_args = reason_values(init_args)?;
        let rpc = self.kernel.fresh_name();
        let (port, node) = (port.to_owned(), node.to_owned());
        let id = self.dataconn.request(
            &view!(self),
            &port,
            &node,
            timeout_ms,
            handler,
            init_args,
            rpc,
            &mut self.effects,
        )?;
        self.run_effects();
        Ok(id)
    }

    /// Lets other nodes ask for data connections handled by `name` (the `INITFUNC` of
    /// their `connect_to`); requests for any other name are refused.
    pub fn register_data_handler(&mut self, name: &str) {
        self.dataconn.register_handler(name);
    }

    /// Lets the application handle node-port requests tagged `tag` (as
    /// [`NodeOutput::Request`]); without a handler such requests are refused.
    pub fn register_handler(&mut self, tag: &str) {
        self.kernel.register_handler(tag);
    }

    /// Our listening addresses changed (e.g. after binding port 0): updates `'l`.
    pub fn set_binds(&mut self, binds: Vec<String>, now: u64) {
        self.now = now;
        let value = Value::Array(binds.iter().map(|b| Value::text(b.as_str())).collect());
        self.config.binds = binds;
        self.global
            .put("'l", &self.node_id, value, &mut self.effects);
        self.run_effects();
    }

    // ---- the shared database ----------------------------------------------------------

    /// Sets our entry `key` of `family` to `value` (CBOR) and tells the master.
    pub fn db_set(
        &mut self,
        family: &str,
        key: &str,
        value: &[u8],
        now: u64,
    ) -> Result<(), NodeError> {
        self.now = now;
        let value = Value::decode(value).map_err(|e| MessageError::Malformed {
            framing: "cbor",
            detail: e.to_string(),
        })?;
        self.global.put(family, key, value, &mut self.effects);
        self.run_effects();
        Ok(())
    }

    /// Deletes our entries `keys` of `family` and tells the master.
    pub fn db_del(&mut self, family: &str, keys: &[&str], now: u64) {
        self.now = now;
        self.global.delete(family, keys, &mut self.effects);
        self.run_effects();
    }

    /// Asks the master for the whole `family` (a map); the answer comes as
    /// [`NodeOutput::DbReply`] with the returned id.
    pub fn db_family(&mut self, family: &str, now: u64) -> String {
        self.db_query(Query::Family, family, now)
    }

    /// Asks the master for the keys of `family` (an array).
    pub fn db_keys(&mut self, family: &str, now: u64) -> String {
        self.db_query(Query::Keys, family, now)
    }

    /// Asks the master for the values of `family` (an array).
    pub fn db_values(&mut self, family: &str, now: u64) -> String {
        self.db_query(Query::Values, family, now)
    }

    fn db_query(&mut self, query: Query, family: &str, now: u64) -> String {
        self.now = now;
        let id = self
            .global
            .query(query, family, &view!(self), &mut self.effects);
        self.run_effects();
        id
    }

    /// Monitors `family`: [`NodeOutput::DbChange`] reports its contents, then each change.
    pub fn db_mon(&mut self, family: &str, now: u64) {
        self.now = now;
        self.global.watch(family, &view!(self), &mut self.effects);
        self.run_effects();
    }

    /// Stops monitoring `family`.
    pub fn db_unmon(&mut self, family: &str, now: u64) {
        self.now = now;
        self.global.unwatch(family, &view!(self), &mut self.effects);
        self.run_effects();
    }

    /// Entries and bytes (as [`GlobalLimits`] counts them) of the database this node holds
    /// as a global node, over all source nodes; zeros when it is not global.
    pub fn global_db_usage(&self) -> (usize, usize) {
        self.service.as_ref().map_or((0, 0), seed::Service::usage)
    }

    /// What the node is doing, for its operator: every connection (with what it moved),
    /// the database it holds, its counters. Read-only.
    pub fn info(&self) -> NodeInfo {
        let mut conns: Vec<ConnInfo> = self
            .conns
            .iter()
            .map(|(&id, c)| ConnInfo {
                conn: id,
                addr: c.addr.clone(),
                incoming: c.incoming,
                remote: c.remote.clone(),
                session: c.session.clone(),
                working: c
                    .remote
                    .as_ref()
                    .and_then(|node| self.peers.get(node))
                    .is_some_and(|p| p.conn == Some(id)),
                traffic: c.traffic,
                held: c.held,
            })
            .collect();
        conns.sort_by_key(|c| c.conn);
        let (db_entries, db_bytes) = self.global_db_usage();
        NodeInfo {
            ports: self.kernel.port_count(),
            global: self.service.is_some(),
            db_entries,
            db_bytes,
            queued_bytes: self.queued_bytes(),
            buffered_bytes: self.buffered_bytes(),
            ..NodeInfo::new(
                &self.counters,
                self.service.as_ref().map(|s| &s.hits),
                conns,
            )
        }
    }

    // ---- the global protocol -------------------------------------------------------

    /// Starts keeping the seeds connected, with a fresh backoff.
    fn seed_again(&mut self, now: u64) {
        let max = self.config.transport.monitor_timeout_ms;
        let due = self.seeds.again(&mut self.jitter, now, max);
        self.dial_seeds(due);
    }

    /// Dials seeds (index and address).
    fn dial_seeds(&mut self, due: Vec<(usize, String)>) {
        for (i, addr) in due {
            let conn = self.alloc_conn(&addr, None, Some(i));
            self.seeds.dialling(i, conn);
            self.outputs.push_back(NodeOutput::Connect { conn, addr });
        }
    }

    /// A connection reached ourselves: if it was dialled for a seed, that seed is us, so we
    /// become a global node (as every seed is).
    fn found_myself(&mut self, conn: ConnId) {
        let Some(i) = self.conns.get(&conn).and_then(|c| c.seed) else {
            return;
        };
        self.seeds.myself(i);
        self.become_global();
    }

    /// Whether this node serves `tag` as a global node now.
    fn serves(&self, tag: &str) -> bool {
        seed::serves(tag, self.service.is_some(), self.config.serve_global)
    }

    /// Becomes a global node (once): our own master, announced to every node that is up,
    /// connected to the global nodes we know.
    fn become_global(&mut self) {
        if self.service.is_some() || !self.config.serve_global {
            return;
        }
        self.service = Some(seed::Service::default());
        let fx = &mut self.effects;
        fx.log(LogLevel::Info, "acting as a global node".into());
        let view = view!(self);
        self.global.master_set(view.node_id, &view, fx);
        fx.push(Effect::Own {
            family: "'g".into(),
            key: view.node_id.to_owned(),
            value: Some(Value::Null),
        });
        for node in view.up() {
            fx.send(&node, vec![Value::text("g_global")], "global request");
            if self.globals.contains(&node) {
                seed::Service::meet(&node, fx);
            }
        }
        self.run_effects();
    }

    /// Handles `["", TAG, ARGS...]` from node `src`; `args` is the CBOR array
    /// `[TAG, ARGS...]`.
    fn node_request(&mut self, src: &str, args: &[u8]) {
        match request::parse(args) {
            Ok(Request::Global(request)) => self.global_request(src, request, args),
            Ok(Request::Data(request)) => self.data_request(src, request),
            Ok(request) => {
                let view = view!(self);
                self.kernel
                    .request(src, request, args, &view, &mut self.effects);
                self.run_effects();
            }
            Err(e) => self.warn_peer(src, format!("node-port request from {src} dropped: {e}")),
        }
    }

    /// A data connection request from `src`.
    fn data_request(&mut self, src: &str, request: DataRequest) {
        let link = self.link(src);
        self.dataconn
            .handle(src, request, link, &view!(self), &mut self.effects);
        self.run_effects();
    }

    /// A request of the global protocol from `src`: for the service if this node is (or
    /// now becomes) global and serves it, else for the client; `args` as it came, for an
    /// application handler when neither takes it.
    fn global_request(&mut self, src: &str, request: GlobalRequest, args: &[u8]) {
        let is_global = matches!(request, GlobalRequest::IsGlobal);
        if self.serves(request.tag()) {
            if matches!(request, GlobalRequest::Slave { .. }) {
                self.become_global();
            }
            if is_global {
                // Out while the service forgets `src` as a slave, so that it does not
                // hear of its own deletions.
                self.globals.remove(src);
            }
            if let Some(service) = self.service.as_mut() {
                let cx = &mut Cx {
                    view: &view!(self, true),
                    jitter: &mut self.jitter,
                    fx: &mut self.effects,
                };
                service.request(src, request, cx);
            }
        } else if is_global {
            self.globals.insert(src.to_owned());
        } else if !request.is_service() {
            self.global.answer(src, request, &mut self.effects);
        } else {
            let tag = request.tag();
            self.kernel.unserved(src, tag, args, &mut self.effects);
        }
        self.run_effects();
    }

    /// Carries out the parts' effects, in order, including those they cause.
    fn run_effects(&mut self) {
        if self.applying {
            return;
        }
        self.applying = true;
        while let Some(effect) = self.effects.pop() {
            let queued = self.effects.len();
            self.apply(effect);
            self.effects.first_since(queued);
        }
        self.applying = false;
    }

    fn apply(&mut self, effect: Effect) {
        let now = self.now;
        match effect {
            Effect::Send {
                node,
                message,
                what,
            } => {
                if let Err(e) = self.route(&node, &message, false, now) {
                    self.log(LogLevel::Warn, format!("{what} to {node} dropped: {e}"));
                }
            }
            Effect::Broadcast { nodes, message } => {
                // The connections share the one copy while it waits for room.
                let shared = Shared::from(message);
                for node in nodes {
                    match self.working_conn(&node) {
                        Some(conn) => self.transmit(conn, Outgoing::Shared(&shared), false),
                        None => {
                            if let Err(e) = self.route(&node, &shared, false, now) {
                                let message = format!("global request to {node} dropped: {e}");
                                self.log(LogLevel::Warn, message);
                            }
                        }
                    }
                }
            }
            Effect::Relay {
                src,
                port_id,
                message,
            } => {
                let Some(PortId { node, .. }) = PortId::parse(&port_id) else {
                    return;
                };
                if let Err(e) = self.route(node, &message, false, now) {
                    self.warn_peer(&src, format!("relay from {src} to {port_id} failed: {e}"));
                }
            }
            Effect::Output(output) => self.outputs.push_back(output),
            Effect::Log(level, message) => self.log(level, message),
            Effect::WarnPeer { peer, message } => self.warn_peer(&peer, message),
            Effect::Found { node, addrs } => {
                let finding = self
                    .peers
                    .get(&node)
                    .and_then(|p| p.connecting.as_ref())
                    .is_some_and(|(d, _)| d.finding);
                if finding {
                    self.connect_to(&node, addrs, now);
                }
            }
            Effect::Reach(node) => {
                self.peers.entry(node.clone()).or_default();
                self.connect(&node, now);
            }
            Effect::Forget(_) | Effect::Keep => {
                if let Some(service) = self.service.as_mut() {
                    let cx = &mut Cx {
                        view: &view!(self, true),
                        jitter: &mut self.jitter,
                        fx: &mut self.effects,
                    };
                    match effect {
                        Effect::Forget(node) => service.forget(&node, cx),
                        _ => service.keep_sync(cx),
                    }
                }
            }
            Effect::IsGlobal(node) => {
                self.globals.insert(node);
            }
            Effect::ShareDb(node) => {
                if let Some(message) = self.service.as_ref().map(seed::Service::g_set)
                    && let Err(e) = self.route(&node, &message, false, now)
                {
                    self.log(
                        LogLevel::Warn,
                        format!("global request to {node} dropped: {e}"),
                    );
                }
            }
            Effect::Kill { port_id, reason } => {
                if let Err(e) = self.kill_with(&port_id, reason, now) {
                    self.log(LogLevel::Warn, format!("kill of {port_id} dropped: {e}"));
                }
            }
            Effect::DataDial { id, addr } => {
                let conn = self.alloc_conn(&addr, None, None);
                if let Some(c) = self.conns.get_mut(&conn) {
                    c.dataconn = Some(id.clone());
                }
                self.dataconn.dialled(&id, conn);
                self.outputs.push_back(NodeOutput::Connect { conn, addr });
            }
            Effect::CloseConn { conn, reason } => self.close(conn, reason),
            Effect::Own { family, key, value } => match value {
                Some(value) => self.global.put(&family, &key, value, &mut self.effects),
                None => self.global.delete(&family, &[&key], &mut self.effects),
            },
        }
    }

    // ---- internals -----------------------------------------------------------------

    fn alloc_conn(
        &mut self,
        addr: &str,
        dialled_for: Option<String>,
        seed: Option<usize>,
    ) -> ConnId {
        let id = self.next_conn;
        self.next_conn = ConnId(id.0.saturating_add(1));
        self.conns.insert(
            id,
            Conn {
                transport: None,
                addr: addr.to_owned(),
                dialled_for,
                seed,
                remote: None,
                handshake: None,
                held: 0,
                due: None,
                incoming: false,
                session: None,
                dataconn: None,
                traffic: Traffic::default(),
            },
        );
        id
    }

    fn start_transport(&mut self, conn: ConnId, nonce: [u8; NONCE_LEN], now: u64) {
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        let mut config = self.config.transport.clone();
        config.peer_addr = Some(c.addr.clone());
        match &c.dataconn {
            // A data connection we open asks for the upgraded protocol and names itself;
            // the node protocols' pairs are for AEMP connections only, as in the reference.
            Some(id) => {
                config.protocol = dataconn::PROTOCOL.into();
                config.greeting.push((dataconn::ID_KEY.into(), id.clone()));
            }
            None => {
                config.greeting.push(("mproto".into(), "1".into()));
                config.greeting.push(("gproto".into(), "1".into()));
            }
        }
        match Connection::new(config, nonce, now) {
            Ok(mut t) => {
                // A run of received messages in one buffer, not one allocation each.
                t.set_message_sequences(true);
                c.transport = Some(t)
            }
            // The same configuration was validated in `Node::new`.
            Err(e) => unreachable!("validated configuration refused: {e}"),
        }
        self.pump(conn);
    }

    fn transport(&mut self, conn: ConnId) -> Option<&mut Connection> {
        self.conns.get_mut(&conn)?.transport.as_mut()
    }

    /// Acts on everything the connection's transport has to say.
    fn pump(&mut self, conn: ConnId) {
        while let Some(output) = self.transport(conn).and_then(Connection::poll_output) {
            match output {
                Output::Transmit(bytes) => {
                    if let Some(c) = self.conns.get_mut(&conn) {
                        bump(&mut c.traffic.bytes_out, bytes.len());
                    }
                    self.outputs.push_back(NodeOutput::Transmit { conn, bytes })
                }
                Output::StartTls { role, leftover } => {
                    self.outputs.push_back(NodeOutput::StartTls {
                        conn,
                        role,
                        leftover,
                    })
                }
                Output::Greeting(g) if g.protocol != "aemp" || self.is_data(conn) => {
                    self.data_greeting(conn, &g)
                }
                Output::Greeting(g) => {
                    let verdict = if self.is_up(&g.node_id) {
                        Verdict::AlreadyConnected
                    } else {
                        Verdict::Accept
                    };
                    if let Some(c) = self.conns.get_mut(&conn) {
                        c.remote = Some(g.node_id.clone());
                        if let Some(t) = c.transport.as_mut() {
                            t.handle_verdict(verdict);
                        }
                    }
                }
                Output::Connected(session) if self.is_data(conn) => {
                    if let Some(c) = self.conns.get_mut(&conn) {
                        c.session = Some(session);
                        if let Some(seq) = c.handshake.take() {
                            self.handshakes.remove(seq);
                        }
                    }
                    bump(&mut self.counters.handshakes, 1);
                }
                Output::Connected(session) => {
                    let tls = if session.tls { ", tls" } else { "" };
                    let how = format!(
                        "{}/{} {}/{}{tls}",
                        session.send_auth.name(),
                        session.recv_auth.name(),
                        session.send_framing.name(),
                        session.recv_framing.name()
                    );
                    if let Some(c) = self.conns.get_mut(&conn) {
                        c.session = Some(session.clone());
                    }
                    self.connected(conn, session.remote_node, &how)
                }
                // (Not asked for: the node's connections report sequences.)
                Output::Message(message) => {
                    self.count_in(conn, 1);
                    self.received(conn, &message)
                }
                Output::Messages { data, sizes } => {
                    self.count_in(conn, sizes.len());
                    let mut rest = &data[..];
                    for size in sizes {
                        let (message, after) = rest.split_at((size as usize).min(rest.len()));
                        self.received(conn, message);
                        rest = after;
                    }
                }
                Output::HandedOver { leftover } if self.is_data(conn) => {
                    self.hand_over(conn, leftover)
                }
                Output::HandedOver { .. } => {
                    // Not reached: other upgraded protocols are closed at their greeting.
                    self.close(
                        conn,
                        "upgraded protocols are not supported by the node".into(),
                    );
                }
                Output::Closed(error) => {
                    self.counters.ended(error.name());
                    if error == Error::SelfConnection {
                        self.found_myself(conn);
                    }
                    self.connection_gone(conn, error.to_string(), true)
                }
            }
        }
        self.recount(conn);
        self.retime(conn);
    }

    /// Whether `conn` carries a data connection.
    fn is_data(&self, conn: ConnId) -> bool {
        self.conns.get(&conn).is_some_and(|c| c.dataconn.is_some())
    }

    /// The remote's greeting on a data connection: accepted when it is one we dialled
    /// (the node needs no working connection check: its AEMP connection is up, that is
    /// how the data connection was announced) or one the remote node announced; else
    /// closed with the reason.
    fn data_greeting(&mut self, conn: ConnId, g: &crate::greeting::Greeting) {
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        c.remote = None;
        if c.dataconn.is_none() && g.protocol != dataconn::PROTOCOL {
            let reason = format!(
                "upgraded protocol {} is not supported by the node",
                g.protocol
            );
            return self.close(conn, reason);
        }
        if c.dataconn.is_none() {
            let id = g
                .pairs
                .iter()
                .find(|(k, _)| k == dataconn::ID_KEY)
                .and_then(|(_, v)| v.clone());
            let Some(id) = id else {
                let reason = format!(
                    "{} greeting without {}",
                    dataconn::PROTOCOL,
                    dataconn::ID_KEY
                );
                return self.close(conn, reason);
            };
            if let Err(reason) = self.dataconn.accept(&id, &g.node_id, conn) {
                return self.close(conn, reason);
            }
            if let Some(c) = self.conns.get_mut(&conn) {
                c.dataconn = Some(id);
            }
        }
        if let Some(t) = self.transport(conn) {
            t.handle_verdict(Verdict::Accept);
        }
    }

    /// `conn` finished the handshake of its data connection: it is the host's now.
    fn hand_over(&mut self, conn: ConnId, leftover: Vec<u8>) {
        let id = self
            .conns
            .get(&conn)
            .and_then(|c| c.dataconn.clone())
            .unwrap_or_default();
        let Some(done) = self.dataconn.hand_over(&id, conn) else {
            // Given up meanwhile (it timed out, say): nobody waits for it.
            return self.close(conn, format!("unknown or expired data connection {id}"));
        };
        if let Some(c) = self.remove_conn(conn) {
            self.log(
                LogLevel::Debug,
                format!(
                    "{} data connection {id} with {} established.",
                    c.addr, done.node
                ),
            );
        }
        self.outputs.push_back(NodeOutput::DataConnection {
            conn,
            id: done.id,
            node: done.node,
            port: done.port_id,
            handler: done.handler,
            init_args: done.init_args,
            requested: done.requested,
            leftover,
        });
    }

    /// How we reach `node` on its working connection, for a data connection.
    fn link(&self, node: &str) -> Option<Link> {
        let conn = self.peers.get(node)?.conn?;
        let c = self.conns.get(&conn)?;
        Some(if c.incoming {
            Link::Accepted
        } else {
            Link::Dialled(c.addr.clone())
        })
    }

    /// Brings `conn`'s entry in [`Node::timers`] up to date (after every change to its
    /// transport, as [`recount`](Self::recount) is).
    fn retime(&mut self, conn: ConnId) {
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        let due = c.transport.as_ref().and_then(Connection::poll_timeout);
        if due != c.due {
            if let Some(old) = c.due {
                self.timers.remove(&(old, conn));
            }
            if let Some(new) = due {
                self.timers.insert((new, conn));
            }
            c.due = due;
        }
    }

    /// Counts `n` messages received on `conn`.
    fn count_in(&mut self, conn: ConnId, n: usize) {
        if let Some(c) = self.conns.get_mut(&conn) {
            bump(&mut c.traffic.messages_in, n);
        }
    }

    /// Brings `conn`'s share of [`Node::buffered_bytes`] up to date. Every change to a
    /// transport is followed by [`pump`](Self::pump), which ends here, so the total is
    /// kept without a pass over all connections on every input.
    fn recount(&mut self, conn: ConnId) {
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        let now = c.transport.as_ref().map_or(0, Connection::buffered_bytes);
        self.conns_held = self.conns_held.saturating_sub(c.held).saturating_add(now);
        c.held = now;
    }

    /// Removes `conn`, with its share of [`Node::buffered_bytes`].
    fn remove_conn(&mut self, conn: ConnId) -> Option<Conn> {
        let c = self.conns.remove(&conn)?;
        if let Some(due) = c.due {
            self.timers.remove(&(due, conn));
        }
        self.counters.closed(&c.traffic);
        self.deferred.remove(conn);
        self.conns_held = self.conns_held.saturating_sub(c.held);
        if let Some(seq) = c.handshake {
            self.handshakes.remove(seq);
        }
        Some(c)
    }

    fn close(&mut self, conn: ConnId, reason: String) {
        self.connection_gone(conn, reason, true);
    }

    /// A connection is over: frees it and handles what depended on it. `tell_host` is
    /// false when the host reported the end itself.
    fn connection_gone(&mut self, conn: ConnId, reason: String, tell_host: bool) {
        let Some(c) = self.remove_conn(conn) else {
            return;
        };
        if tell_host {
            self.outputs.push_back(NodeOutput::Close {
                conn,
                reason: reason.clone(),
            });
        }
        self.log(
            LogLevel::Debug,
            format!("{} disconnected - {reason}.", c.addr),
        );
        if let Some(node) = &c.remote
            && self.peers.get(node).is_some_and(|p| p.conn == Some(conn))
        {
            self.transport_error(node, &reason, true);
        }
        if let Some(id) = &c.dataconn {
            self.dataconn
                .conn_failed(id, conn, &reason, &mut self.effects);
            self.run_effects();
        }
        if let Some(i) = c.seed
            && self.seeds.lost(i, self.now)
        {
            self.seed_again(self.now);
        }
    }

    /// The reference's `transport_error`: the node's connection (or the attempt to get
    /// one) failed. Drops the queue, fires monitors of its ports, reports the node down.
    fn transport_error(&mut self, node: &str, reason: &str, was_up: bool) {
        // Nothing of the peer survives (queue, monitors, attempts), so the entry goes:
        // nodes a peer merely named (in `snd` relays, say) cannot pile up.
        let Some(peer) = self.peers.remove(node) else {
            return;
        };
        self.dialing.remove(node);
        self.last_route.1 = None;
        self.queued_held = self.queued_held.saturating_sub(peer.queued_bytes);
        self.global.forget_find(node);
        let fired = self.kernel.node_gone(node, was_up);
        let why = Value::Array(vec![
            Value::text("transport_error"),
            Value::text(node),
            Value::text(reason),
        ])
        .encode();
        for port in fired {
            self.outputs.push_back(NodeOutput::PortDown {
                port,
                reason: why.clone(),
            });
        }
        if was_up {
            self.warned.remove(node);
            self.outputs.push_back(NodeOutput::NodeDown {
                node: node.to_owned(),
                reason: reason.to_owned(),
            });
            self.globals.remove(node);
            if self.global.master() == Some(node) {
                self.global.master_lost();
                if let Some(seed) = self.seeds.first_up(&view!(self)) {
                    self.global
                        .master_set(&seed, &view!(self), &mut self.effects);
                }
            }
            if self.service.is_some() {
                seed::Service::node_down(node, &mut self.effects);
            }
            self.run_effects();
        }
    }

    /// A handshake completed on `conn` with `node`.
    fn connected(&mut self, conn: ConnId, node: String, how: &str) {
        if let Some(seq) = self.conns.get_mut(&conn).and_then(|c| c.handshake.take()) {
            self.handshakes.remove(seq);
        }
        bump(&mut self.counters.handshakes, 1);
        let old = self.peers.get(&node).and_then(|p| p.conn);
        if let Some(old) = old.filter(|&o| o != conn) {
            self.transport_error(&node, "switched connections", true);
            if self.remove_conn(old).is_some() {
                self.outputs.push_back(NodeOutput::Close {
                    conn: old,
                    reason: "switched connections".into(),
                });
            }
        }
        let addr = self
            .conns
            .get(&conn)
            .map(|c| c.addr.as_str())
            .unwrap_or_default();
        self.log(
            LogLevel::Debug,
            format!("{addr} connected as {node} ({how})."),
        );
        let peer = self.peers.entry(node.clone()).or_default();
        peer.conn = Some(conn);
        self.last_route.1 = None;
        peer.connecting = None;
        self.dialing.remove(node.as_str());
        let queue = std::mem::take(&mut peer.queue);
        self.queued_held = self
            .queued_held
            .saturating_sub(std::mem::take(&mut peer.queued_bytes));
        self.outputs.push_back(NodeOutput::NodeUp {
            node: node.clone(),
            conn,
        });
        // Other attempts to reach this node are no longer needed.
        let stale: Vec<ConnId> = self
            .conns
            .iter()
            .filter(|&(&id, c)| {
                id != conn && c.dialled_for.as_deref() == Some(node.as_str()) && c.remote.is_none()
            })
            .map(|(&id, _)| id)
            .collect();
        for id in stale {
            self.close(id, format!("{node} connected elsewhere"));
        }
        if let Some(i) = self.conns.get(&conn).and_then(|c| c.seed) {
            self.seeds.up(i, &node);
            self.global.seed_up(&node, &view!(self), &mut self.effects);
            self.run_effects();
        }
        for message in queue {
            self.transmit(conn, Outgoing::Bytes(&message), false);
        }
        if let Some(service) = self.service.as_mut() {
            let cx = &mut Cx {
                view: &view!(self, true),
                jitter: &mut self.jitter,
                fx: &mut self.effects,
            };
            service.node_up(&node, cx);
            self.run_effects();
        }
    }

    /// Sends `message` on `conn`'s transport; `checked`: the node has checked it
    /// already (against the same limits), so the transport need not again. When the
    /// outputs have no room for it within `max_buffered_bytes` (or messages wait for
    /// `conn` already), it waits for the host's next poll instead.
    fn transmit(&mut self, conn: ConnId, message: Outgoing<'_>, checked: bool) {
        if self.must_wait(conn, message.bytes().len()) {
            return self.defer(conn, message.shared());
        }
        self.transmit_now(conn, message.bytes(), checked);
    }

    /// Whether a message of `len` bytes for `conn` must wait: messages wait for it
    /// already, or the outputs have no room for it (the first since the host's last poll
    /// always has room, so that messages move on).
    fn must_wait(&self, conn: ConnId, len: usize) -> bool {
        self.deferred.waits(conn) || (self.transmitted > 0 && len > self.output_room())
    }

    /// Room left in the budget for more transmits before the host polls.
    fn output_room(&self) -> usize {
        let held = self
            .conns_held
            .saturating_add(self.queued_held)
            .saturating_add(self.deferred.held());
        self.config
            .max_buffered_bytes
            .saturating_sub(held)
            .saturating_sub(self.transmitted)
    }

    /// Makes `message` wait for `conn`; a connection with more waiting than a queue for
    /// a node may hold (`max_queue_bytes`) is closed: its peer does not keep up.
    fn defer(&mut self, conn: ConnId, message: Shared) {
        let bound = self.config.max_queue_bytes;
        if self.deferred.push(conn, message, bound).is_err() {
            self.counters.hit(Limit::PeerSlow);
            self.close(
                conn,
                format!("peer does not keep up: more than {bound} bytes wait for its connection"),
            );
        }
    }

    /// Moves waiting messages into the outputs, round robin over their connections, as
    /// far as the budget allows (at least one, so that they always move on).
    fn release_deferred(&mut self) {
        if self.deferred.is_empty() {
            return;
        }
        self.transmitted = 0;
        self.deferred.recount();
        while let Some((conn, message)) =
            self.deferred.pop(self.output_room(), self.transmitted == 0)
        {
            self.transmit_now(conn, &message, false);
        }
        self.deferred.recount();
    }

    /// [`transmit`](Self::transmit) without the check for room.
    fn transmit_now(&mut self, conn: ConnId, message: &[u8], checked: bool) {
        self.transmitted = self.transmitted.saturating_add(message.len());
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        let traffic = &mut c.traffic;
        let Some(t) = c.transport.as_mut() else {
            return;
        };
        if t.has_outputs() {
            // Behind what the transport has to say: queued there, in order (its bytes
            // are counted when the transport hands them out).
            match t.send(message) {
                Ok(()) => bump(&mut traffic.messages_out, 1),
                Err(e) => self.log(LogLevel::Warn, format!("message dropped: {e}")),
            }
            return self.pump(conn);
        }
        // Consecutive messages on one connection go out as one transmit, each encoded
        // straight into it. The transport keeps nothing of them, so there is nothing to
        // pump and what it holds is unchanged.
        if !matches!(self.outputs.back(), Some(NodeOutput::Transmit { conn: last, .. }) if *last == conn)
        {
            self.outputs.push_back(NodeOutput::Transmit {
                conn,
                bytes: Vec::with_capacity(message.len()),
            });
        }
        let Some(NodeOutput::Transmit { bytes, .. }) = self.outputs.back_mut() else {
            unreachable!("a transmit for the connection was just made sure of")
        };
        let before = bytes.len();
        let sent = t.send_into(message, bytes, checked);
        bump(&mut traffic.bytes_out, bytes.len().saturating_sub(before));
        if bytes.is_empty() {
            self.outputs.pop_back();
        }
        match sent {
            Ok(()) => bump(&mut traffic.messages_out, 1),
            Err(e) => self.log(LogLevel::Warn, format!("message dropped: {e}")),
        }
    }

    /// Delivers, sends or queues a complete message for `node`; `checked` as for
    /// [`transmit`](Self::transmit).
    fn route(
        &mut self,
        node: &str,
        message: &[u8],
        checked: bool,
        now: u64,
    ) -> Result<(), NodeError> {
        if node == self.node_id {
            self.deliver_local(node, message);
            return Ok(());
        }
        // The common case first, without allocating a key.
        if let Some(conn) = self.working_conn(node) {
            // The application's messages (checked) are refused rather than kept waiting:
            // its sender learns of it and tries again, instead of having the connection
            // closed once too much waits.
            if checked && self.must_wait(conn, message.len()) {
                self.counters.hit(Limit::BudgetMessage);
                return Err(NodeError::BudgetExhausted(self.config.max_buffered_bytes));
            }
            self.transmit(conn, Outgoing::Bytes(message), checked);
            return Ok(());
        }
        let max_nodes = self.config.max_nodes;
        if self.peers.len() >= max_nodes && !self.peers.contains_key(node) {
            self.counters.hit(Limit::TooManyNodes);
            return Err(NodeError::TooManyNodes(max_nodes, node.to_owned()));
        }
        let max = self.config.max_queue_bytes;
        let peer = self.peers.entry(node.to_owned()).or_default();
        if peer.queued_bytes.saturating_add(message.len()) > max {
            self.counters.hit(Limit::QueueFull);
            return Err(NodeError::QueueFull(node.to_owned()));
        }
        let budget = self.config.max_buffered_bytes;
        if self.buffered_bytes().saturating_add(message.len()) > budget {
            self.counters.hit(Limit::BudgetMessage);
            return Err(NodeError::BudgetExhausted(budget));
        }
        let peer = self.peers.entry(node.to_owned()).or_default();
        peer.queued_bytes = peer.queued_bytes.saturating_add(message.len());
        self.queued_held = self.queued_held.saturating_add(message.len());
        peer.queue.push_back(message.to_vec());
        self.connect(node, now);
        Ok(())
    }

    /// `node`'s working connection, if any (remembered for the next message).
    fn working_conn(&mut self, node: &str) -> Option<ConnId> {
        let (last, conn) = &mut self.last_route;
        if conn.is_some() && last == node {
            return *conn;
        }
        let found = self.peers.get(node)?.conn?;
        last.clear();
        last.push_str(node);
        *conn = Some(found);
        Some(found)
    }

    /// A message arrived on `conn`.
    fn received(&mut self, conn: ConnId, message: &[u8]) {
        let Some(src) = self.conns.get(&conn).and_then(|c| c.remote.as_deref()) else {
            return;
        };
        let Some(parts) = msg::split(message) else {
            return;
        };
        // A message for a local port, the common case, needs no copy of the sender's name.
        if !parts.port.is_empty() && self.kernel.has_port(parts.port.as_ref()) {
            return deliver(&mut self.outputs, &self.node_id, &parts);
        }
        let src = src.to_owned();
        self.deliver_parts(&src, &parts);
    }

    /// Delivers a message addressed to this node, sent by `src`.
    fn deliver_local(&mut self, src: &str, message: &[u8]) {
        if let Some(parts) = msg::split(message) {
            self.deliver_parts(src, &parts);
        }
    }

    /// Delivers a message from `src` for its local port (the node port when empty).
    fn deliver_parts(&mut self, src: &str, parts: &msg::Parts<'_>) {
        let port = parts.port.as_ref();
        if port.is_empty() {
            self.node_request(src, &parts.args());
        } else if self.kernel.has_port(port) {
            deliver(&mut self.outputs, &self.node_id, parts);
        } else if self.dataconn.is_rpc_port(port) {
            let link = self.link(src);
            self.dataconn
                .round_trip(port, link, &view!(self), &mut self.effects);
            self.run_effects();
        } else {
            self.log(
                LogLevel::Debug,
                format!("message from {src} for nonexistent port {port} dropped"),
            );
        }
    }

    /// Starts connecting to `node` unless connected or already trying.
    fn connect(&mut self, node: &str, now: u64) {
        let timeout = self.config.transport.monitor_timeout_ms;
        let Some(peer) = self.peers.get_mut(node) else {
            return;
        };
        if peer.conn.is_some() || peer.connecting.is_some() {
            return;
        }
        let mut dial = Dial::default();
        // Without seeds there is nobody to ask; the node may still connect to us (its
        // handshake may be under way), so wait for that until the deadline.
        let ask = !self.seeds.is_empty() || self.service.is_some();
        dial.finding = ask;
        dial.no_address = !ask;
        peer.connecting = Some((dial, now.saturating_add(timeout)));
        self.dialing.insert(node.to_owned());
        if ask {
            self.global.find(node, &view!(self), &mut self.effects);
            self.run_effects();
        }
    }

    /// Tries `addrs` for `node` in order, spaced so all fit in the connect timeout.
    fn connect_to(&mut self, node: &str, addrs: Vec<String>, now: u64) {
        if addrs.is_empty() {
            return self.transport_error(node, "no known address", false);
        }
        let ci = self.config.connect_interval_ms;
        let spread =
            self.config.transport.monitor_timeout_ms.saturating_sub(ci) / addrs.len() as u64;
        let interval = ci.min(spread).max(400);
        let Some((dial, _)) = self.peers.get_mut(node).and_then(|p| p.connecting.as_mut()) else {
            return;
        };
        dial.pending = addrs.into();
        dial.interval = interval;
        dial.next_at = now;
        dial.finding = false;
        self.dial_step(node, now);
    }

    /// Starts the next address of a dial when due; fails the attempt at its deadline.
    fn dial_step(&mut self, node: &str, now: u64) {
        let Some((dial, until)) = self.peers.get_mut(node).and_then(|p| p.connecting.as_mut())
        else {
            return;
        };
        if now >= *until {
            let reason = if dial.no_address {
                "no known address"
            } else {
                "connect timeout"
            };
            return self.transport_error(node, reason, false);
        }
        if dial.pending.is_empty() || dial.next_at > now {
            return;
        }
        let Some(addr) = dial.pending.pop_front() else {
            return;
        };
        dial.next_at = now.saturating_add(dial.interval);
        let conn = self.alloc_conn(&addr, Some(node.to_owned()), None);
        self.outputs.push_back(NodeOutput::Connect { conn, addr });
    }

    /// Every log line goes through here. Lines quote peer text (node ids, tags, reasons):
    /// control characters in it are escaped, so a peer can neither forge a line with a
    /// newline nor send a terminal escape sequence through the log.
    fn log(&mut self, level: LogLevel, message: String) {
        let message = match crate::error::printable(&message) {
            std::borrow::Cow::Borrowed(_) => message,
            std::borrow::Cow::Owned(escaped) => escaped,
        };
        self.outputs.push_back(NodeOutput::Log { level, message });
    }

    /// A warning about a request from `peer`: at most [`PEER_WARNINGS`] per peer and
    /// window, then one line saying the rest are suppressed.
    fn warn_peer(&mut self, peer: &str, message: String) {
        let now = self.now;
        let budget = self.warned.entry(peer.to_owned()).or_insert(WarnBudget {
            since: now,
            count: 0,
        });
        if now.saturating_sub(budget.since) >= PEER_WARNING_WINDOW_MS {
            *budget = WarnBudget {
                since: now,
                count: 0,
            };
        }
        budget.count = budget.count.saturating_add(1);
        match budget.count {
            n if n <= PEER_WARNINGS => self.log(LogLevel::Warn, message),
            n if n == PEER_WARNINGS + 1 => self.log(
                LogLevel::Warn,
                format!(
                    "more warnings about requests from {peer} suppressed for up to {} s",
                    PEER_WARNING_WINDOW_MS / 1000
                ),
            ),
            _ => {}
        }
    }
}

/// `id` split into node id and port name, or the refusal of an id that names no node.
#[inline]
fn parse_port_id(id: &str) -> Result<PortId<'_>, NodeError> {
    PortId::parse(id).ok_or_else(|| NodeError::InvalidPortId(id.to_owned()))
}

/// The items of a CBOR array of reasons.
fn reason_values(reason: &[u8]) -> Result<Vec<Value>, NodeError> {
    match Value::decode(reason) {
        Ok(Value::Array(items)) => Ok(items),
        Ok(_) => Err(MessageError::NotAnArray.into()),
        Err(e) => Err(MessageError::Malformed {
            framing: "cbor",
            detail: e.to_string(),
        }
        .into()),
    }
}

/// Hands a message for an existing local port of node `node_id` to the application:
/// appended to the delivery at the end of `outputs` if it is for the same port, else in
/// a new one.
fn deliver(outputs: &mut VecDeque<NodeOutput>, node_id: &str, parts: &msg::Parts<'_>) {
    let port = parts.port.as_ref();
    // Every delivery is for a port of this node, `{node_id}#{name}`: the name alone tells
    // them apart (one comparison per message fewer).
    let same_port = |d: &Delivery| {
        debug_assert!(d.port.starts_with(node_id));
        d.port.len() == node_id.len() + 1 + port.len() && d.port.ends_with(port)
    };
    if !matches!(outputs.back(), Some(NodeOutput::Deliver(d)) if same_port(d)) {
        outputs.push_back(NodeOutput::Deliver(Delivery::new(format!(
            "{node_id}#{port}"
        ))));
    }
    if let Some(NodeOutput::Deliver(d)) = outputs.back_mut() {
        d.push_with(|out| parts.write_args(out));
    }
}
