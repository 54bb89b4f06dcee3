//! A node running in the sandbox: the Rust API.
//!
//! ```no_run
//! # async fn example() -> Result<(), aemp_host::NodeError> {
//! use aemp_host::{Node, Value};
//! let node = Node::builder().node_id("me/").secret("s3cret").bind("127.0.0.1:4040").start().await?;
//! let mut port = node.port().await?;
//! node.send("other#inbox", vec![Value::text(port.id()), Value::Int(1)]).await?;
//! let reply = port.recv().await;
//! # Ok(()) }
//! ```
//!
//! One tokio task drives the engine instance of a node; socket tasks feed it (see
//! `net`). Every call into the sandbox is made by that task, so the engine needs no locks.
//!
//! Every queue is bounded. Commands from the application wait for room ([`Node::send`])
//! or are refused with [`NodeError::Busy`] (the calls that do not wait). A port's inbox
//! holds [`NodeBuilder::port_capacity`] messages; a message for a full inbox is held by
//! the driver, and while anything is held no connection reads on (TCP pushes back to the
//! senders) and the application's messages wait once a port's worth of its own is held.
//! A port that takes nothing for [`NodeBuilder::port_stall`] is stalled: what is held for
//! it is dropped, with a warning, and so is every message that finds its inbox full until
//! it reads again, so one port that is never read cannot stop the node serving the others.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use aemp_engine::{AuthMethod, Framing, Value, printable};
use tokio::net::TcpListener;
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::mpsc::{Receiver, Sender, WeakSender, channel};
use tokio::sync::{broadcast, oneshot, watch};
use wasmtime::component::ResourceAny;

use crate::config::Profile;
use crate::net::{self, ConnCmd, ConnHandle, SocketEvent};
use crate::sandbox::{self, Instance, Sandbox, wit, wit_node};
use crate::tls::{Role, TlsConfig};

/// Why a node could not start, or refused a call. Match on the variant (and on
/// [`Refusal`] for what the engine refused); the messages are for people.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum NodeError {
    /// The configuration is unusable.
    #[error("configuration: {0}")]
    Config(String),
    /// Listening on an address failed.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address as given.
        addr: String,
        /// What the operating system said.
        #[source]
        source: Arc<std::io::Error>,
    },
    /// Arguments given as a Rust value could not become a message.
    #[error(transparent)]
    Value(#[from] crate::ValueError),
    /// The sandbox could not be made or could not start the node's instance.
    #[error(transparent)]
    Sandbox(#[from] crate::SandboxError),
    /// The engine refused the call; `message` is its explanation.
    #[error("{message}")]
    Refused {
        /// What was wrong, to match on.
        kind: Refusal,
        /// The engine's words.
        message: String,
    },
    /// A batch was refused part way: the first `sent` messages went out, the rest did not.
    #[error("{sent} messages of the batch sent, then: {cause}")]
    Partial {
        /// How many messages, from the start of the batch, were sent.
        sent: usize,
        /// Why the next one was refused.
        #[source]
        cause: Box<NodeError>,
    },
    /// A reply from the network could not be decoded.
    #[error("undecodable reply: {0}")]
    Decode(#[from] aemp_engine::DecodeError),
    /// The sandbox trapped or hit a limit: the node is gone.
    #[error("node stopped: {0}")]
    Stopped(String),
    /// No answer in time.
    #[error("timed out")]
    Timeout,
    /// The node's command queue is full: a call that does not wait was refused; try again.
    #[error("node is busy: command queue full")]
    Busy,
}

/// What the engine refused a call for (the kinds of [`NodeError::Refused`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Refusal {
    /// Port ids are `NODE#NAME`.
    InvalidPortId,
    /// A local port of that name exists already.
    PortExists,
    /// The destination node is not connected and its queue is full.
    QueueFull,
    /// Queueing would take the node past its memory budget for peers.
    BudgetExhausted,
    /// The connection has not completed its handshake.
    NotConnected,
    /// The connection is closed.
    Closed,
    /// The message is larger than the maximum message size.
    TooLarge,
    /// The message is nested deeper than the limit.
    TooDeep,
    /// A message must be an array `[PORT, ARGS...]`.
    NotAnArray,
    /// Not one well-formed CBOR item.
    Malformed,
    /// The value has no JSON form, for a peer that speaks json.
    NotJson,
    /// The configuration is invalid.
    InvalidConfig,
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
fn refused(r: wit::Refusal) -> NodeError {
    NodeError::Refused {
        kind: Refusal::from_wit(r.kind),
        message: r.message,
    }
}

/// The engine's refusal of a batch: partial when some messages went out first.
fn send_refused(e: wit::SendError) -> NodeError {
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

/// Something that happened to the node.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A node completed a handshake with us.
    NodeUp(String),
    /// A node's connection is gone.
    NodeDown { node: String, reason: String },
    /// A monitored port died; `reason` is empty for a normal exit.
    PortDown { port: String, reason: Vec<Value> },
    /// A node-port request with a tag registered by [`Node::handle_requests`].
    Request {
        node: String,
        tag: String,
        args: Vec<Value>,
    },
    /// A monitored database family changed.
    DbChange {
        family: String,
        set: Value,
        del: Vec<String>,
    },
}

/// How to start a node. Defaults: node id `<hostname>/<random>`, no secret, no TLS,
/// framings cbor and json, no listener, no seeds.
#[derive(Debug, Clone)]
pub struct NodeBuilder {
    node_id: Option<String>,
    secret: Option<Vec<u8>>,
    tls: Option<TlsConfig>,
    binds: Vec<String>,
    seeds: Vec<String>,
    framings: Vec<Framing>,
    auth_offer: Option<Vec<AuthMethod>>,
    auth_accept: Option<Vec<AuthMethod>>,
    max_message_size: Option<usize>,
    monitor_timeout: Duration,
    connect_interval: Duration,
    max_write_queue: usize,
    max_buffered_bytes: Option<usize>,
    max_handshakes: Option<usize>,
    write_timeout: Option<Duration>,
    port_capacity: usize,
    port_stall: Duration,
    sandbox_limits: Option<sandbox::Limits>,
    sandbox: Option<Arc<Sandbox>>,
}

impl Default for NodeBuilder {
    fn default() -> Self {
        NodeBuilder {
            node_id: None,
            secret: None,
            tls: None,
            binds: Vec::new(),
            seeds: Vec::new(),
            framings: Framing::ALL.to_vec(),
            auth_offer: None,
            auth_accept: None,
            max_message_size: None,
            monitor_timeout: Duration::from_secs(30),
            connect_interval: Duration::from_secs(2),
            max_write_queue: 64 << 20,
            max_buffered_bytes: None,
            max_handshakes: None,
            write_timeout: None,
            port_capacity: 1024,
            port_stall: Duration::from_secs(10),
            sandbox_limits: None,
            sandbox: None,
        }
    }
}

fn auth_list(names: &[String]) -> Result<Vec<AuthMethod>, NodeError> {
    names
        .iter()
        .map(|n| {
            AuthMethod::from_name(n)
                .ok_or_else(|| NodeError::Config(format!("unknown auth method '{n}'")))
        })
        .collect()
}

impl NodeBuilder {
    /// A builder with everything taken from a resolved configuration profile.
    pub fn from_profile(profile: &Profile) -> Result<NodeBuilder, NodeError> {
        let mut b = NodeBuilder::default().node_id(&profile.nodeid);
        if let Some(secret) = &profile.secret {
            b = b.secret(secret);
        }
        if let Some(cert) = &profile.cert {
            b.tls = Some(
                TlsConfig::from_pem(cert.as_bytes())
                    .map_err(|e| NodeError::Config(e.to_string()))?,
            );
        }
        b.binds = profile.binds.clone();
        b.seeds = profile.seeds.clone();
        b.framings = profile
            .framing_format
            .iter()
            .filter_map(|f| Framing::from_name(f))
            .collect();
        b.auth_offer = Some(auth_list(&profile.auth_offer)?);
        b.auth_accept = Some(auth_list(&profile.auth_accept)?);
        b.monitor_timeout = Duration::from_secs_f64(profile.monitor_timeout);
        b.connect_interval = Duration::from_secs_f64(profile.connect_interval);
        Ok(b)
    }

    /// The node id (`%n`, `%u` and a trailing `/` are expanded).
    pub fn node_id(mut self, id: &str) -> Self {
        self.node_id = Some(id.to_owned());
        self
    }

    /// The shared secret of the network.
    pub fn secret(mut self, secret: impl AsRef<[u8]>) -> Self {
        self.secret = Some(secret.as_ref().to_vec());
        self
    }

    /// TLS with this node's certificate (see [`TlsConfig`]).
    pub fn tls(mut self, tls: TlsConfig) -> Self {
        self.tls = Some(tls);
        self
    }

    /// Listens on `addr` (`host:port`; `*` for all interfaces, port 0 for any).
    pub fn bind(mut self, addr: &str) -> Self {
        self.binds.push(addr.to_owned());
        self
    }

    /// Keeps a connection to the seed at `addr` and joins the network through it.
    pub fn seed(mut self, addr: &str) -> Self {
        self.seeds.push(addr.to_owned());
        self
    }

    /// The framings we understand, in preference order.
    pub fn framings(mut self, framings: &[Framing]) -> Self {
        self.framings = framings.to_vec();
        self
    }

    /// The auth methods we may send.
    pub fn auth_offer(mut self, methods: &[AuthMethod]) -> Self {
        self.auth_offer = Some(methods.to_vec());
        self
    }

    /// The auth methods we accept, in preference order.
    pub fn auth_accept(mut self, methods: &[AuthMethod]) -> Self {
        self.auth_accept = Some(methods.to_vec());
        self
    }

    /// Largest message in either direction (default 16 MiB).
    pub fn max_message_size(mut self, bytes: usize) -> Self {
        self.max_message_size = Some(bytes);
        self
    }

    /// Handshake deadline and connect timeout (default 30 s).
    pub fn monitor_timeout(mut self, timeout: Duration) -> Self {
        self.monitor_timeout = timeout;
        self
    }

    /// Bytes queued for one connection before it is closed as too slow (default 64 MiB).
    pub fn max_write_queue(mut self, bytes: usize) -> Self {
        self.max_write_queue = bytes;
        self
    }

    /// Bytes the engine may hold on behalf of peers, all together (default 64 MiB): input
    /// past it closes its connection, a message past it is refused.
    pub fn max_buffered_bytes(mut self, bytes: usize) -> Self {
        self.max_buffered_bytes = Some(bytes);
        self
    }

    /// Accepted connections that may be in their handshake at once (default 256); past
    /// it a new connection is closed at once.
    pub fn max_handshakes(mut self, count: usize) -> Self {
        self.max_handshakes = Some(count);
        self
    }

    /// How long a write may make no progress before the connection fails as a peer that
    /// does not read (default: the monitor timeout).
    pub fn write_timeout(mut self, timeout: Duration) -> Self {
        self.write_timeout = Some(timeout);
        self
    }

    /// Messages a port's inbox holds (default 1024, at least 1). When an inbox is full the
    /// node stops reading from its connections until it has room.
    pub fn port_capacity(mut self, messages: usize) -> Self {
        self.port_capacity = messages.max(1);
        self
    }

    /// How long a port with a full inbox may take nothing before messages for it are
    /// dropped and the node reads on (default 10 s).
    pub fn port_stall(mut self, timeout: Duration) -> Self {
        self.port_stall = timeout;
        self
    }

    /// Memory and CPU limits of this node's instance (default: the sandbox's, 256 MiB and
    /// 2 s per call).
    pub fn sandbox_limits(mut self, limits: sandbox::Limits) -> Self {
        self.sandbox_limits = Some(limits);
        self
    }

    /// Runs in this sandbox instead of the process's shared one ([`Sandbox::shared`]).
    pub fn sandbox(mut self, sandbox: Arc<Sandbox>) -> Self {
        self.sandbox = Some(sandbox);
        self
    }

    /// Binds the listeners, starts the node and returns its handle.
    pub async fn start(self) -> Result<Node, NodeError> {
        let sandbox = match &self.sandbox {
            Some(s) => s.clone(),
            None => Sandbox::shared()?,
        };
        let mut listeners = Vec::new();
        let mut bound = Vec::new();
        for addr in &self.binds {
            let host_port = bind_address(addr);
            let listener = TcpListener::bind(&host_port)
                .await
                .map_err(|e| NodeError::Bind {
                    addr: addr.clone(),
                    source: Arc::new(e),
                })?;
            let local = listener.local_addr().map_err(|e| NodeError::Bind {
                addr: addr.clone(),
                source: Arc::new(e),
            })?;
            bound.push(local);
            listeners.push(listener);
        }
        let trap = |e: wasmtime::Error| NodeError::Stopped(sandbox::describe(&e));
        let mut instance = sandbox.instantiate_with(self.sandbox_limits)?;
        let hostname = hostname::get()
            .map(|h| h.to_string_lossy().into_owned())
            .unwrap_or_else(|_| "localhost".into());
        let template = self
            .node_id
            .clone()
            .unwrap_or_else(|| format!("{hostname}/"));
        let (store, b) = instance.parts();
        let api = b.aemp_engine_node();
        let node_id = api
            .call_expand_node_id(&mut *store, &template, &hostname)
            .map_err(trap)?;
        let mut config = api
            .call_default_node_config(&mut *store, &node_id)
            .map_err(trap)?;
        config.transport.secret = self.secret.clone();
        config.transport.tls = self.tls.is_some();
        config.transport.framings = self.framings.iter().map(|f| wit_framing(*f)).collect();
        if let Some(offer) = &self.auth_offer {
            config.transport.auth_offer = offer.iter().map(|m| wit_auth(*m)).collect();
        }
        if let Some(accept) = &self.auth_accept {
            config.transport.auth_accept = accept.iter().map(|m| wit_auth(*m)).collect();
        }
        if let Some(size) = self.max_message_size {
            config.transport.limits.max_message_size = u32::try_from(size).unwrap_or(u32::MAX);
        }
        config.transport.monitor_timeout_ms = self.monitor_timeout.as_millis() as u64;
        config.connect_interval_ms = self.connect_interval.as_millis() as u64;
        if let Some(bytes) = self.max_buffered_bytes {
            config.max_buffered_bytes = bytes as u64;
        }
        if let Some(count) = self.max_handshakes {
            config.max_handshakes = u32::try_from(count).unwrap_or(u32::MAX);
        }
        config.binds = announced(&bound, &hostname);
        config.seeds = self.seeds.clone();
        let started = Instant::now();
        let epoch_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0);
        config.wall_clock_offset_ms = epoch_ms;
        let node = api
            .node()
            .call_create(&mut *store, &config, 0)
            .map_err(trap)?
            .map_err(|r| NodeError::Config(r.message))?;

        let (tx, rx) = channel(CMD_QUEUE);
        let (sock_tx, sock_rx) = channel(net::EVENT_QUEUE);
        let listeners = listeners
            .into_iter()
            .map(|l| net::spawn_listener(l, sock_tx.clone()))
            .collect();
        let (events, _) = broadcast::channel(1024);
        let (status_tx, status) = watch::channel(None);
        let driver = Driver {
            instance,
            node,
            started,
            conns: HashMap::new(),
            dialing: HashSet::new(),
            ports: HashMap::new(),
            db_waiters: HashMap::new(),
            events: events.clone(),
            up: HashSet::new(),
            tls: self.tls.clone(),
            sock_tx,
            monitor_timeout: self.monitor_timeout,
            max_write_queue: self.max_write_queue,
            write_timeout: self.write_timeout.unwrap_or(self.monitor_timeout),
            port_capacity: self.port_capacity,
            port_stall: self.port_stall,
            held: VecDeque::new(),
            held_app: 0,
            app_round: false,
            held_ports: HashMap::new(),
            stalled: HashSet::new(),
            status: status_tx,
            cmd_tx: tx.downgrade(),
            listeners,
            read_again: Vec::new(),
        };
        // Every log line of this node carries its id.
        let span = tracing::info_span!("node", id = %node_id);
        tokio::spawn(tracing::Instrument::instrument(
            driver.run(rx, sock_rx),
            span,
        ));
        Ok(Node {
            id: node_id,
            listen: bound,
            tx,
            events,
            status,
        })
    }
}

/// `*` hosts and missing ports the way AnyEvent::MP writes binds.
fn bind_address(addr: &str) -> String {
    let (host, port) = match addr.rsplit_once(':') {
        Some((h, p)) => (h, if p == "*" { "0" } else { p }),
        None if addr.chars().all(|c| c.is_ascii_digit()) && !addr.is_empty() => ("*", addr),
        None => (addr, "0"),
    };
    let host = if host == "*" || host.is_empty() {
        "0.0.0.0"
    } else {
        host
    };
    format!("{host}:{port}")
}

/// The addresses to announce under `'l` (an unspecified address becomes the host name).
fn announced(bound: &[SocketAddr], hostname: &str) -> Vec<String> {
    bound
        .iter()
        .map(|a| {
            if a.ip().is_unspecified() {
                format!("{hostname}:{}", a.port())
            } else {
                a.to_string()
            }
        })
        .collect()
}

fn wit_framing(f: Framing) -> wit::Framing {
    match f {
        Framing::Cbor => wit::Framing::Cbor,
        Framing::Json => wit::Framing::Json,
    }
}

fn wit_auth(m: AuthMethod) -> wit::AuthMethod {
    match m {
        AuthMethod::TlsSha3_512 => wit::AuthMethod::TlsSha3512,
        AuthMethod::HmacSha3_512 => wit::AuthMethod::HmacSha3512,
        AuthMethod::TlsAnon => wit::AuthMethod::TlsAnon,
        AuthMethod::Cleartext => wit::AuthMethod::Cleartext,
    }
}

/// A running node. Cheap to clone; the node stops when every handle is dropped.
#[derive(Debug, Clone)]
pub struct Node {
    id: String,
    listen: Vec<SocketAddr>,
    tx: Sender<Cmd>,
    events: broadcast::Sender<Event>,
    status: watch::Receiver<Option<String>>,
}

/// A local port: receives the messages sent to its id. Dropping it kills the port.
#[derive(Debug)]
pub struct Port {
    id: String,
    rx: Receiver<Vec<Value>>,
    tx: Sender<Cmd>,
}

impl Port {
    /// The port id (`NODE#NAME`).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The next message's arguments; `None` once the port or the node is gone.
    pub async fn recv(&mut self) -> Option<Vec<Value>> {
        self.rx.recv().await
    }
}

impl Drop for Port {
    fn drop(&mut self) {
        let kill = Cmd::Kill {
            port: self.id.clone(),
            reason: Vec::new(),
            reply: None,
        };
        // A drop cannot wait: when the command queue is full, a task waits for room (one
        // per port, so this is bounded by the ports there are).
        if let Err(TrySendError::Full(kill)) = self.tx.try_send(kill)
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            let tx = self.tx.clone();
            runtime.spawn(async move {
                let _ = tx.send(kill).await;
            });
        }
    }
}

type Reply<T> = oneshot::Sender<Result<T, NodeError>>;

enum Cmd {
    Port {
        name: Option<String>,
        reply: Reply<Port>,
    },
    Send {
        /// (port id, CBOR array of arguments), encoded by the caller.
        batch: Vec<(String, Vec<u8>)>,
        reply: Reply<()>,
    },
    Kill {
        port: String,
        reason: Vec<Value>,
        reply: Option<Reply<()>>,
    },
    Monitor {
        port: String,
        on: bool,
        reply: Reply<()>,
    },
    Connect {
        addr: String,
    },
    Handle {
        tag: String,
    },
    DbSet {
        family: String,
        key: String,
        value: Value,
    },
    DbDel {
        family: String,
        keys: Vec<String>,
    },
    DbQuery {
        kind: DbQuery,
        family: String,
        reply: Reply<Value>,
    },
    DbMon {
        family: String,
        on: bool,
    },
    IsUp {
        node: String,
        reply: Reply<bool>,
    },
    Memory {
        reply: Reply<usize>,
    },
    Pending {
        reply: Reply<usize>,
    },
}

#[derive(Debug, Clone, Copy)]
enum DbQuery {
    Family,
    Keys,
    Values,
}

impl Node {
    /// How to start one.
    pub fn builder() -> NodeBuilder {
        NodeBuilder::default()
    }

    /// This node's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The addresses the node listens on.
    pub fn listen_addrs(&self) -> &[SocketAddr] {
        &self.listen
    }

    /// Why the node stopped, once it has.
    pub fn stopped(&self) -> Option<String> {
        self.status.borrow().clone()
    }

    /// Waits until the node stops on its own (a trap, a sandbox limit) and returns why, as
    /// [`NodeError::Stopped`]. A program that runs a node should wait on this beside its
    /// other work, so that a stopped node ends it instead of lingering. Cancel-safe.
    pub async fn closed(&self) -> NodeError {
        let mut status = self.status.clone();
        match status.wait_for(Option::is_some).await {
            Ok(reason) => NodeError::Stopped(reason.clone().unwrap_or_default()),
            Err(_) => self.gone(),
        }
    }

    /// Events: node up/down, monitors firing, registered requests, database changes.
    pub fn events(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    async fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Cmd) -> Result<T, NodeError> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(make(reply)).await.map_err(|_| self.gone())?;
        rx.await.map_err(|_| self.gone())?
    }

    fn gone(&self) -> NodeError {
        NodeError::Stopped(self.stopped().unwrap_or_else(|| "node is gone".into()))
    }

    fn tell(&self, cmd: Cmd) -> Result<(), NodeError> {
        self.tx.try_send(cmd).map_err(|e| match e {
            TrySendError::Full(_) => NodeError::Busy,
            TrySendError::Closed(_) => self.gone(),
        })
    }

    /// A new local port with a fresh unique name.
    pub async fn port(&self) -> Result<Port, NodeError> {
        self.call(|reply| Cmd::Port { name: None, reply }).await
    }

    /// A new local port with a chosen name (e.g. `echo`).
    pub async fn named_port(&self, name: &str) -> Result<Port, NodeError> {
        self.call(|reply| Cmd::Port {
            name: Some(name.to_owned()),
            reply,
        })
        .await
    }

    /// Sends `args` to `port_id` (queued if its node is not connected yet). Waits while
    /// the node's command queue is full.
    pub async fn send(&self, port_id: &str, args: Vec<Value>) -> Result<(), NodeError> {
        self.send_batch(vec![(port_id.to_owned(), args)]).await
    }

    /// Sends many messages with one call into the engine. On a refusal the messages
    /// before the refused one are sent, the rest are not: [`NodeError::Partial`] says how
    /// many went out (a refusal of the first is [`NodeError::Refused`]).
    pub async fn send_batch(&self, messages: Vec<(String, Vec<Value>)>) -> Result<(), NodeError> {
        // Encoding happens here, on the caller's task, not on the node's.
        let batch = messages
            .into_iter()
            .map(|(port, args)| (port, Value::Array(args).encode()))
            .collect();
        self.call(|reply| Cmd::Send { batch, reply }).await
    }

    /// Sends a serializable Rust value as the arguments of a message: a tuple, array or
    /// `Vec` whose items become the arguments (see [`crate::to_value`] for how types map).
    /// Waits like [`Node::send`].
    ///
    /// ```no_run
    /// # async fn example(node: aemp_host::Node) -> Result<(), aemp_host::NodeError> {
    /// node.send_ser("other#inbox", &("job", 7, vec!["a", "b"])).await?;
    /// # Ok(()) }
    /// ```
    pub async fn send_ser<T: serde::Serialize + ?Sized>(
        &self,
        port_id: &str,
        args: &T,
    ) -> Result<(), NodeError> {
        let batch = vec![(port_id.to_owned(), crate::convert::to_args(args)?)];
        self.call(|reply| Cmd::Send { batch, reply }).await
    }

    /// Kills a port (local or remote) with `reason` (empty for a normal exit).
    pub async fn kill(&self, port_id: &str, reason: Vec<Value>) -> Result<(), NodeError> {
        self.call(|reply| Cmd::Kill {
            port: port_id.to_owned(),
            reason,
            reply: Some(reply),
        })
        .await
    }

    /// Monitors a port: its death comes as [`Event::PortDown`].
    pub async fn monitor(&self, port_id: &str) -> Result<(), NodeError> {
        self.call(|reply| Cmd::Monitor {
            port: port_id.to_owned(),
            on: true,
            reply,
        })
        .await
    }

    /// Drops a monitor.
    pub async fn unmonitor(&self, port_id: &str) -> Result<(), NodeError> {
        self.call(|reply| Cmd::Monitor {
            port: port_id.to_owned(),
            on: false,
            reply,
        })
        .await
    }

    /// Connects to the node listening at `addr` (no seed needed).
    pub fn connect(&self, addr: &str) -> Result<(), NodeError> {
        self.tell(Cmd::Connect {
            addr: addr.to_owned(),
        })
    }

    /// Whether `node` has a working connection.
    pub async fn is_up(&self, node: &str) -> Result<bool, NodeError> {
        self.call(|reply| Cmd::IsUp {
            node: node.to_owned(),
            reply,
        })
        .await
    }

    /// Waits until `node` is up, at most `timeout`.
    pub async fn wait_up(&self, node: &str, timeout: Duration) -> Result<(), NodeError> {
        let mut events = self.events();
        if self.is_up(node).await? {
            return Ok(());
        }
        tokio::time::timeout(timeout, async {
            loop {
                match events.recv().await {
                    Ok(Event::NodeUp(n)) if n == node => return Ok(()),
                    Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                    Err(broadcast::error::RecvError::Closed) => return Err(self.gone()),
                }
            }
        })
        .await
        .map_err(|_| NodeError::Timeout)?
    }

    /// The size of the node's sandbox memory (the engine's linear memory), in bytes.
    pub async fn sandbox_memory(&self) -> Result<usize, NodeError> {
        self.call(|reply| Cmd::Memory { reply }).await
    }

    /// Waits until everything sent so far has been written to the sockets (for programs
    /// that exit right after sending), at most `timeout`.
    pub async fn flush(&self, timeout: Duration) -> Result<(), NodeError> {
        tokio::time::timeout(timeout, async {
            while self.call(|reply| Cmd::Pending { reply }).await? > 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Ok(())
        })
        .await
        .map_err(|_| NodeError::Timeout)?
    }

    /// Node-port requests tagged `tag` come to this application as [`Event::Request`].
    pub fn handle_requests(&self, tag: &str) -> Result<(), NodeError> {
        self.tell(Cmd::Handle {
            tag: tag.to_owned(),
        })
    }

    /// Sets our entry `key` of database `family`.
    pub fn db_set(&self, family: &str, key: &str, value: Value) -> Result<(), NodeError> {
        self.tell(Cmd::DbSet {
            family: family.to_owned(),
            key: key.to_owned(),
            value,
        })
    }

    /// Deletes our entries `keys` of `family`.
    pub fn db_del(&self, family: &str, keys: &[&str]) -> Result<(), NodeError> {
        let keys = keys.iter().map(|k| k.to_string()).collect();
        self.tell(Cmd::DbDel {
            family: family.to_owned(),
            keys,
        })
    }

    /// The whole `family` (a map), from the master.
    pub async fn db_family(&self, family: &str) -> Result<Value, NodeError> {
        self.call(|reply| Cmd::DbQuery {
            kind: DbQuery::Family,
            family: family.to_owned(),
            reply,
        })
        .await
    }

    /// The keys of `family`, from the master.
    pub async fn db_keys(&self, family: &str) -> Result<Value, NodeError> {
        self.call(|reply| Cmd::DbQuery {
            kind: DbQuery::Keys,
            family: family.to_owned(),
            reply,
        })
        .await
    }

    /// The values of `family`, from the master.
    pub async fn db_values(&self, family: &str) -> Result<Value, NodeError> {
        self.call(|reply| Cmd::DbQuery {
            kind: DbQuery::Values,
            family: family.to_owned(),
            reply,
        })
        .await
    }

    /// Monitors `family`: changes come as [`Event::DbChange`].
    pub fn db_mon(&self, family: &str, on: bool) -> Result<(), NodeError> {
        self.tell(Cmd::DbMon {
            family: family.to_owned(),
            on,
        })
    }
}

/// The task that owns the engine instance of one node.
struct Driver {
    instance: Instance,
    node: ResourceAny,
    started: Instant,
    conns: HashMap<u64, ConnHandle>,
    dialing: HashSet<u64>,
    ports: HashMap<String, Sender<Vec<Value>>>,
    db_waiters: HashMap<String, Reply<Value>>,
    events: broadcast::Sender<Event>,
    up: HashSet<String>,
    tls: Option<TlsConfig>,
    sock_tx: Sender<SocketEvent>,
    monitor_timeout: Duration,
    max_write_queue: usize,
    write_timeout: Duration,
    port_capacity: usize,
    port_stall: Duration,
    /// Messages for ports whose inbox was full, in arrival order. While any is held, no
    /// connection reads on: bounded by one read per connection, plus `held_app`.
    held: VecDeque<Held>,
    /// How many of `held` came from the application's commands; at a port's capacity
    /// the driver takes no more commands.
    held_app: usize,
    /// Whether the outputs being handled answer the application's commands.
    app_round: bool,
    /// The ports messages are held for.
    held_ports: HashMap<String, HeldPort>,
    /// Ports that took nothing for `port_stall`: messages finding them full are dropped.
    stalled: HashSet<String>,
    status: watch::Sender<Option<String>>,
    cmd_tx: WeakSender<Cmd>,
    listeners: Vec<tokio::task::JoinHandle<()>>,
    /// Connections whose data was handed to the engine in this round.
    read_again: Vec<u64>,
}

/// A message waiting for room in its port's inbox.
struct Held {
    port: String,
    args: Vec<Value>,
    from_app: bool,
}

/// A port messages are held for.
struct HeldPort {
    /// How many.
    count: usize,
    /// When it last took a message (or the first was held).
    progress: tokio::time::Instant,
}

/// How often held messages are offered again to their ports.
const HELD_RETRY: Duration = Duration::from_millis(10);

/// Inputs handled between two polls of the engine's outputs.
const BATCH: usize = 64;

/// Commands from the application waiting for the node, at most.
const CMD_QUEUE: usize = 1024;

fn decode_args(bytes: &[u8]) -> Vec<Value> {
    match Value::decode(bytes) {
        Ok(Value::Array(items)) => items,
        _ => Vec::new(),
    }
}

impl Driver {
    fn now(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    async fn run(mut self, mut cmds: Receiver<Cmd>, mut sockets: Receiver<SocketEvent>) {
        let result = self.serve(&mut cmds, &mut sockets).await;
        if let Err(e) = result {
            let reason = sandbox::describe(&e);
            tracing::error!("node stopped: {reason}");
            tracing::debug!("node stopped: {e:?}");
            let _ = self.status.send(Some(reason));
        }
        // The node is gone: free its ports (listening sockets) and connections now.
        for listener in &self.listeners {
            listener.abort();
        }
        for (_, conn) in self.conns.drain() {
            conn.abort();
        }
    }

    async fn serve(
        &mut self,
        cmds: &mut Receiver<Cmd>,
        sockets: &mut Receiver<SocketEvent>,
    ) -> wasmtime::Result<()> {
        self.flush()?;
        loop {
            let deadline =
                self.node_api(|s, n, b| b.aemp_engine_node().node().call_poll_timeout(s, n))?;
            let sleep = match deadline {
                Some(ms) => {
                    tokio::time::sleep_until((self.started + Duration::from_millis(ms)).into())
                }
                None => tokio::time::sleep(Duration::from_secs(3600)),
            };
            // Room in the inbox of the port the first held message is for, or a moment
            // passed (for the other ports, and to notice stalls).
            let waiting = self.held.front().map(|h| self.ports.get(&h.port).cloned());
            let room = async move {
                match waiting {
                    Some(Some(port)) => {
                        let _ = tokio::time::timeout(HELD_RETRY, port.reserve_owned()).await;
                    }
                    Some(None) => {}
                    None => std::future::pending().await,
                }
            };
            let take_cmds = self.held_app < self.port_capacity;
            self.app_round = false;
            tokio::select! {
                cmd = cmds.recv(), if take_cmds => {
                    let Some(cmd) = cmd else { return Ok(()) };
                    self.app_round = true;
                    self.command(cmd)?;
                    for _ in 0..BATCH {
                        match cmds.try_recv() {
                            Ok(cmd) => self.command(cmd)?,
                            Err(_) => break,
                        }
                    }
                }
                Some(event) = sockets.recv() => {
                    self.socket(event)?;
                    for _ in 0..BATCH {
                        match sockets.try_recv() {
                            Ok(event) => self.socket(event)?,
                            Err(_) => break,
                        }
                    }
                }
                () = sleep => {
                    let now = self.now();
                    self.node_api(|s, n, b| b.aemp_engine_node().node().call_handle_timeout(s, n, now))?;
                }
                () = room => self.deliver_held(),
            }
            self.flush()?;
            // Only now, after any StartTls the engine asked for in reply to that data has
            // been queued for the task, may a connection read on (see `net`); and only
            // when no message waits for room in a port, so that full ports push back.
            if self.held.is_empty() {
                for conn in self.read_again.drain(..) {
                    if let Some(handle) = self.conns.get(&conn) {
                        let _ = handle.tx.send(ConnCmd::Read);
                    }
                }
            }
        }
    }

    /// Hands a message to its port; holds it when the inbox is full or messages for the
    /// port are held already (to keep their order); drops it when the port is stalled.
    fn deliver(&mut self, port: String, args: Vec<Value>) {
        let Some(inbox) = self.ports.get(&port) else {
            return;
        };
        if !self.held_ports.contains_key(&port) {
            match inbox.try_send(args) {
                Ok(()) => {
                    self.stalled.remove(&port);
                    return;
                }
                Err(TrySendError::Closed(_)) => return,
                // Logged once, when the port stalled.
                Err(TrySendError::Full(_)) if self.stalled.contains(&port) => return,
                Err(TrySendError::Full(args)) => return self.hold(port, args),
            }
        }
        self.hold(port, args);
    }

    fn hold(&mut self, port: String, args: Vec<Value>) {
        let now = tokio::time::Instant::now();
        self.held_ports
            .entry(port.clone())
            .or_insert(HeldPort {
                count: 0,
                progress: now,
            })
            .count += 1;
        self.held_app += usize::from(self.app_round);
        self.held.push_back(Held {
            port,
            args,
            from_app: self.app_round,
        });
    }

    /// Moves held messages into their inboxes, in order for each port, and stalls the
    /// ports that took nothing for `port_stall`.
    fn deliver_held(&mut self) {
        let now = tokio::time::Instant::now();
        let mut full = HashSet::new();
        let mut kept = VecDeque::new();
        for h in std::mem::take(&mut self.held) {
            if full.contains(&h.port) {
                kept.push_back(h);
                continue;
            }
            let result = match self.ports.get(&h.port) {
                Some(inbox) => inbox.try_send(h.args),
                None => Ok(()),
            };
            match result {
                Ok(()) | Err(TrySendError::Closed(_)) => {
                    self.held_app -= usize::from(h.from_app);
                    if let Some(p) = self.held_ports.get_mut(&h.port) {
                        p.count -= 1;
                        p.progress = now;
                        if p.count == 0 {
                            self.held_ports.remove(&h.port);
                        }
                    }
                }
                Err(TrySendError::Full(args)) => {
                    full.insert(h.port.clone());
                    kept.push_back(Held { args, ..h });
                }
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
            let before = self.held.len();
            self.held.retain(|h| h.port != port);
            tracing::warn!(
                "port {} took no message for {} ms: dropped {} messages for it",
                printable(&port),
                self.port_stall.as_millis(),
                before - self.held.len()
            );
            self.held_ports.remove(&port);
            self.stalled.insert(port);
            self.held_app = self.held.iter().filter(|h| h.from_app).count();
        }
    }

    /// Calls into the engine with the store, the node resource and the bindings.
    fn node_api<T>(
        &mut self,
        f: impl FnOnce(
            &mut wasmtime::Store<sandbox::State>,
            ResourceAny,
            &crate::EngineBindings,
        ) -> wasmtime::Result<T>,
    ) -> wasmtime::Result<T> {
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
                    let (tx, rx) = channel(self.port_capacity);
                    self.ports.insert(id.clone(), tx);
                    Port {
                        id,
                        rx,
                        tx: self.command_sender(),
                    }
                });
                let _ = reply.send(port);
            }
            Cmd::Send { batch, reply } => {
                let result = self
                    .node_api(|s, n, b| b.aemp_engine_node().node().call_send(s, n, &batch, now))?;
                let _ = reply.send(result.map_err(send_refused));
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
            Cmd::Monitor { port, on, reply } => {
                let result = self.node_api(|s, n, b| {
                    let api = b.aemp_engine_node().node();
                    if on {
                        api.call_monitor(s, n, &port, now)
                    } else {
                        api.call_unmonitor(s, n, &port, now)
                    }
                })?;
                let _ = reply.send(result.map_err(refused));
            }
            Cmd::Connect { addr } => {
                self.node_api(|s, n, b| {
                    b.aemp_engine_node()
                        .node()
                        .call_connect_addr(s, n, &addr, now)
                })?;
            }
            Cmd::Handle { tag } => {
                self.node_api(|s, n, b| {
                    b.aemp_engine_node()
                        .node()
                        .call_register_handler(s, n, &tag)
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
                self.db_waiters.insert(id, reply);
            }
            Cmd::DbMon { family, on } => {
                self.node_api(|s, n, b| {
                    let api = b.aemp_engine_node().node();
                    if on {
                        api.call_db_mon(s, n, &family, now)
                    } else {
                        api.call_db_unmon(s, n, &family, now)
                    }
                })?;
            }
            Cmd::IsUp { node, reply } => {
                let _ = reply.send(Ok(self.up.contains(&node)));
            }
            Cmd::Memory { reply } => {
                let _ = reply.send(Ok(self.instance.memory_bytes()));
            }
            Cmd::Pending { reply } => {
                let pending = self
                    .conns
                    .values()
                    .map(|c| c.pending.load(std::sync::atomic::Ordering::Acquire))
                    .sum();
                let _ = reply.send(Ok(pending));
            }
        }
        Ok(())
    }

    /// A sender for a port to report its drop. Ports keep the node alive like handles;
    /// the driver itself holds only a weak sender, so the node stops once every handle
    /// and port is gone.
    fn command_sender(&self) -> Sender<Cmd> {
        self.cmd_tx.upgrade().unwrap_or_else(|| channel(1).0)
    }

    fn spawn_conn(&self, conn: u64, stream: tokio::net::TcpStream) -> ConnHandle {
        net::spawn_conn(
            conn,
            stream,
            self.tls.clone(),
            self.write_timeout,
            self.sock_tx.clone(),
        )
    }

    fn socket(&mut self, event: SocketEvent) -> wasmtime::Result<()> {
        let now = self.now();
        match event {
            SocketEvent::Accepted(stream, peer) => {
                let conn = self.node_api(|s, n, b| {
                    b.aemp_engine_node()
                        .node()
                        .call_handle_accept(s, n, &peer, now)
                })?;
                let handle = self.spawn_conn(conn, stream);
                self.conns.insert(conn, handle);
            }
            SocketEvent::Connected(conn, stream) => {
                if self.dialing.remove(&conn) {
                    let handle = self.spawn_conn(conn, stream);
                    self.conns.insert(conn, handle);
                    self.node_api(|s, n, b| {
                        b.aemp_engine_node()
                            .node()
                            .call_handle_connected(s, n, conn, now)
                    })?;
                }
            }
            SocketEvent::ConnectFailed(conn, reason) => {
                if self.dialing.remove(&conn) {
                    tracing::debug!("connect {conn} failed: {reason}");
                    self.node_api(|s, n, b| {
                        b.aemp_engine_node()
                            .node()
                            .call_handle_connect_failed(s, n, conn, &reason, now)
                    })?;
                }
            }
            SocketEvent::Data(conn, data) => {
                if self.conns.contains_key(&conn) {
                    self.node_api(|s, n, b| {
                        b.aemp_engine_node()
                            .node()
                            .call_handle_input(s, n, conn, &data, now)
                    })?;
                    self.read_again.push(conn);
                }
            }
            SocketEvent::Eof(conn) => {
                if self.conns.remove(&conn).is_some() {
                    self.node_api(|s, n, b| {
                        b.aemp_engine_node().node().call_handle_eof(s, n, conn, now)
                    })?;
                }
            }
            SocketEvent::Failed(conn, reason) => {
                if let Some(handle) = self.conns.remove(&conn) {
                    handle.abort();
                    tracing::debug!("connection {conn} failed: {reason}");
                    self.node_api(|s, n, b| {
                        b.aemp_engine_node()
                            .node()
                            .call_handle_conn_error(s, n, conn, &reason, now)
                    })?;
                }
            }
        }
        Ok(())
    }

    /// Acts on everything the engine has to say, until it has nothing more.
    fn flush(&mut self) -> wasmtime::Result<()> {
        loop {
            let outputs =
                self.node_api(|s, n, b| b.aemp_engine_node().node().call_poll_outputs(s, n))?;
            if outputs.is_empty() {
                return Ok(());
            }
            for output in outputs {
                self.output(output)?;
            }
        }
    }

    fn output(&mut self, output: wit_node::NodeOutput) -> wasmtime::Result<()> {
        use wit_node::NodeOutput as O;
        match output {
            O::Transmit(t) => {
                let overflow = self
                    .conns
                    .get(&t.conn)
                    .map(|c| c.write(t.bytes))
                    .is_some_and(|q| q > self.max_write_queue);
                if overflow {
                    let reason = format!(
                        "peer does not read: more than {} bytes waiting",
                        self.max_write_queue
                    );
                    tracing::warn!("connection {}: {reason}", t.conn);
                    if let Some(handle) = self.conns.remove(&t.conn) {
                        handle.abort();
                    }
                    let now = self.now();
                    self.node_api(|s, n, b| {
                        b.aemp_engine_node()
                            .node()
                            .call_handle_conn_error(s, n, t.conn, &reason, now)
                    })?;
                }
            }
            O::Connect(c) => {
                self.dialing.insert(c.conn);
                net::spawn_connect(c.conn, c.addr, self.monitor_timeout, self.sock_tx.clone());
            }
            O::StartTls(t) => {
                let role = match t.role {
                    wit::TlsRole::Client => Role::Client,
                    wit::TlsRole::Server => Role::Server,
                };
                if let Some(c) = self.conns.get(&t.conn) {
                    let _ = c.tx.send(ConnCmd::StartTls(role, t.leftover));
                }
            }
            O::Close(c) => {
                self.dialing.remove(&c.conn);
                if let Some(handle) = self.conns.remove(&c.conn) {
                    tracing::debug!("closing connection {}: {}", c.conn, printable(&c.reason));
                    handle.close();
                }
            }
            O::Deliver(d) => self.deliver(d.port, decode_args(&d.args)),
            O::NodeUp(node) => {
                tracing::info!("{} is up", printable(&node));
                self.up.insert(node.clone());
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
                let _ = self.events.send(Event::PortDown {
                    port: p.port,
                    reason: decode_args(&p.reason),
                });
            }
            O::Request(r) => {
                let _ = self.events.send(Event::Request {
                    node: r.node,
                    tag: r.tag,
                    args: decode_args(&r.args),
                });
            }
            O::DbReply(r) => {
                if let Some(waiter) = self.db_waiters.remove(&r.id) {
                    let _ = waiter.send(Value::decode(&r.result).map_err(NodeError::from));
                }
            }
            O::DbChange(c) => {
                let set = Value::decode(&c.set).unwrap_or(Value::Map(Vec::new()));
                let _ = self.events.send(Event::DbChange {
                    family: c.family,
                    set,
                    del: c.del,
                });
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
