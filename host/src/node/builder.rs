//! How to start a node: [`NodeBuilder`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aemp_engine::{AuthMethod, Framing};
use tokio::net::TcpListener;
use tokio::sync::mpsc::channel;

use super::driver::{Driver, Limits};
use super::engine::{self, Engine};
use super::io::Io;
use super::{CMD_QUEUE, Node, NodeError};
use crate::config::Profile;
use crate::sandbox::{self, Sandbox, wit};
use crate::tls::TlsConfig;

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
    max_depth: Option<usize>,
    keepalive_interval: Option<Duration>,
    max_queue_bytes: Option<usize>,
    monitor_timeout: Duration,
    connect_interval: Duration,
    max_write_queue: usize,
    max_write_total: usize,
    max_buffered_bytes: Option<usize>,
    max_handshakes: Option<usize>,
    write_timeout: Option<Duration>,
    port_capacity: usize,
    port_bytes: usize,
    port_stall: Duration,
    sandbox_limits: Option<sandbox::Limits>,
    sandbox: Option<Arc<Sandbox>>,
    info_requests: bool,
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
            max_depth: None,
            keepalive_interval: None,
            max_queue_bytes: None,
            monitor_timeout: Duration::from_secs(30),
            connect_interval: Duration::from_secs(2),
            max_write_queue: 64 << 20,
            max_write_total: 128 << 20,
            max_buffered_bytes: None,
            max_handshakes: None,
            write_timeout: None,
            port_capacity: 1024,
            port_bytes: 16 << 20,
            port_stall: Duration::from_secs(10),
            sandbox_limits: None,
            sandbox: None,
            info_requests: true,
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
        b.info_requests = profile.node_info;
        Ok(b)
    }

    /// Whether other nodes may ask this one for its [`NodeInfo`](super::NodeInfo) with
    /// an [`INFO_TAG`](super::INFO_TAG) request (default true; profile key
    /// `node_info`). Off, the node does not understand the request (`can aemp_info` is
    /// false), as the reference's nodes do not; [`Node::info`](super::Node::info)
    /// still works.
    pub fn info_requests(mut self, on: bool) -> Self {
        self.info_requests = on;
        self
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

    /// Deepest nesting of arrays, maps and tags in a message (default 512, the most the
    /// engine supports; a larger value is a configuration error at start).
    pub fn max_depth(mut self, levels: usize) -> Self {
        self.max_depth = Some(levels);
        self
    }

    /// Sends a keepalive after this long without sending anything (default: none, as
    /// the reference, which relies on TCP keepalive).
    pub fn keepalive_interval(mut self, interval: Duration) -> Self {
        self.keepalive_interval = Some(interval);
        self
    }

    /// Bytes of messages queued for one node that is not connected yet (default 16 MiB);
    /// past it `send` is refused with [`crate::Refusal::QueueFull`].
    pub fn max_queue_bytes(mut self, bytes: usize) -> Self {
        self.max_queue_bytes = Some(bytes);
        self
    }

    /// Spacing of connection attempts to one node's addresses (default 2 s).
    pub fn connect_interval(mut self, interval: Duration) -> Self {
        self.connect_interval = interval;
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

    /// Bytes queued for all connections together (default 128 MiB): past it the
    /// connection holding the most is closed as too slow. Past half of it the
    /// application's sends to every peer wait, as sends to one peer wait while that
    /// peer's connection has more than [`super::HIGH_WATER`] waiting.
    pub fn max_write_total(mut self, bytes: usize) -> Self {
        self.max_write_total = bytes;
        self
    }

    /// Bytes the engine may hold on behalf of peers, all together (default 64 MiB): input
    /// past it closes its connection, a message past it is refused.
    pub fn max_buffered_bytes(mut self, bytes: usize) -> Self {
        self.max_buffered_bytes = Some(bytes);
        self
    }

    /// Accepted connections that may be in their handshake at once (default 256); at it
    /// a new connection pushes out the oldest handshake (of the source address holding
    /// the most).
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

    /// Bytes of messages a port's inbox holds (default 16 MiB; an empty inbox takes one
    /// message of any size). Past it, as past `port_capacity`, the node stops reading
    /// from its connections until the port has room.
    pub fn port_bytes(mut self, bytes: usize) -> Self {
        self.port_bytes = bytes;
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
        let mut instance = sandbox.instantiate_with(self.sandbox_limits)?;
        let hostname = hostname::get()
            .map(|h| h.to_string_lossy().into_owned())
            .unwrap_or_else(|_| "localhost".into());
        let template = self
            .node_id
            .clone()
            .unwrap_or_else(|| format!("{hostname}/"));
        let node_id = engine::expand_node_id(&mut instance, &template, &hostname)?;
        let mut config = engine::default_config(&mut instance, &node_id)?;
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
        if let Some(depth) = self.max_depth {
            config.transport.limits.max_depth = u32::try_from(depth).unwrap_or(u32::MAX);
        }
        if let Some(interval) = self.keepalive_interval {
            config.transport.keepalive_interval_ms = Some(interval.as_millis() as u64);
        }
        if let Some(bytes) = self.max_queue_bytes {
            config.max_queue_bytes = bytes as u64;
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
        let epoch_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0);
        config.wall_clock_offset_ms = epoch_ms;
        let engine = Engine::create(instance, &config)?;

        let (tx, rx) = channel(CMD_QUEUE);
        let io = Io::new(
            listeners,
            self.tls.clone(),
            self.write_timeout.unwrap_or(self.monitor_timeout),
        );
        let limits = Limits {
            monitor_timeout: self.monitor_timeout,
            max_write_queue: self.max_write_queue,
            max_write_total: self.max_write_total,
            port_capacity: self.port_capacity,
            port_bytes: self.port_bytes,
            port_stall: self.port_stall,
            info_requests: self.info_requests,
        };
        let (driver, shared) = Driver::new(engine, io, limits, &tx);
        // Every log line of this node carries its id.
        let span = tracing::info_span!("node", id = %node_id);
        tokio::spawn(tracing::Instrument::instrument(driver.run(rx), span));
        Ok(Node {
            id: node_id,
            listen: bound,
            tx,
            events: shared.events,
            status: shared.status,
            unwritten: shared.unwritten,
            send_bytes: Arc::new(tokio::sync::Semaphore::new(super::SEND_QUEUE_BYTES)),
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
