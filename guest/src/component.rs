//! The WebAssembly component export: the `aemp:engine/transport` interface of `wit/`,
//! mapped one to one onto [`crate::Connection`]. Randomness comes from the world's only
//! import, `wasi:random/random`.

use std::cell::RefCell;

use exports::aemp::engine::node as wnode;
use exports::aemp::engine::transport as wit;

use crate::{
    AuthMethod, Config, ConfigError, Connection, Error, Framing, Limits, LogLevel, MessageError,
    NONCE_LEN, Node, NodeConfig, NodeError, NodeInfo, NodeOutput, Output, RefusalKind, SendError,
    Session, TlsRole, Traffic, Value, Verdict, batch,
};

wit_bindgen::generate!({
    world: "engine",
    path: "../wit",
    generate_all,
});

/// std's default allocator on this target is dlmalloc; talc, made for WebAssembly,
/// allocates and frees faster (see README, Performance).
#[global_allocator]
static ALLOCATOR: talc::wasm::WasmDynamicTalc = talc::wasm::new_wasm_dynamic_allocator();

struct Component;

export!(Component);

/// `N` random bytes from the host (the world's only import).
fn random<const N: usize>() -> [u8; N] {
    let bytes = wasi::random::random::get_random_bytes(N as u64);
    let mut out = [0; N];
    // A host that returns fewer bytes than asked leaves zeros: never out of bounds.
    for (o, b) in out.iter_mut().zip(bytes) {
        *o = b;
    }
    out
}

impl wit::Guest for Component {
    type Connection = ConnectionResource;

    fn default_config(node_id: String) -> wit::Config {
        Config::new(node_id).into()
    }
}

/// A [`Connection`] behind the resource handle (methods take `&self`).
struct ConnectionResource(RefCell<Connection>);

impl wit::GuestConnection for ConnectionResource {
    fn open(config: wit::Config, now_ms: u64) -> Result<wit::Connection, wit::Refusal> {
        let mut conn = Connection::new(config.into(), random::<NONCE_LEN>(), now_ms)
            .map_err(|e| refusal(Refused::Config(&e)))?;
        // Received messages cross the boundary as sequences anyway: build them in place.
        conn.set_message_sequences(true);
        Ok(wit::Connection::new(ConnectionResource(RefCell::new(conn))))
    }

    fn handle_input(&self, data: Vec<u8>) {
        self.0.borrow_mut().handle_input_owned(data);
    }

    fn handle_eof(&self) {
        self.0.borrow_mut().handle_eof();
    }

    fn handle_verdict(&self, verdict: wit::Verdict) {
        self.0.borrow_mut().handle_verdict(match verdict {
            wit::Verdict::Accept => Verdict::Accept,
            wit::Verdict::AlreadyConnected => Verdict::AlreadyConnected,
        });
    }

    fn handle_timeout(&self, now_ms: u64) {
        self.0.borrow_mut().handle_timeout(now_ms);
    }

    fn poll_timeout(&self) -> Option<u64> {
        self.0.borrow().poll_timeout()
    }

    fn poll_outputs(&self) -> Vec<wit::Output> {
        let mut conn = self.0.borrow_mut();
        let mut outputs: Vec<wit::Output> = Vec::new();
        while let Some(output) = conn.poll_output() {
            // Consecutive messages are one output already (`set_message_sequences`).
            outputs.push(output.into());
        }
        outputs
    }

    fn send(&self, messages: Vec<u8>) -> Result<(), wit::SendError> {
        let mut conn = self.0.borrow_mut();
        conn.send_sequence_owned(messages)
            .map(|_| ())
            .map_err(|(index, e)| send_error(index, Refused::Send(&e)))
    }
}

impl wnode::Guest for Component {
    type Node = NodeResource;

    fn default_node_config(node_id: String) -> wnode::NodeConfig {
        let c = NodeConfig::new(node_id);
        wnode::NodeConfig {
            transport: c.transport.into(),
            binds: c.binds,
            seeds: c.seeds,
            connect_interval_ms: c.connect_interval_ms,
            max_queue_bytes: c.max_queue_bytes as u64,
            wall_clock_offset_ms: c.wall_clock_offset_ms,
            max_buffered_bytes: c.max_buffered_bytes as u64,
            max_handshakes: u32::try_from(c.max_handshakes).unwrap_or(u32::MAX),
        }
    }

    fn expand_node_id(template: String, hostname: String) -> String {
        let bytes = random::<32>();
        let mut next = bytes.into_iter().cycle();
        crate::node::expand_node_id(&template, &hostname, &mut || {
            next.next().unwrap_or_default()
        })
    }
}

/// A [`Node`] behind the resource handle.
struct NodeResource(RefCell<Node>);

impl wnode::GuestNode for NodeResource {
    fn create(config: wnode::NodeConfig, now_ms: u64) -> Result<wnode::Node, wit::Refusal> {
        let config = NodeConfig {
            transport: config.transport.into(),
            binds: config.binds,
            seeds: config.seeds,
            connect_interval_ms: config.connect_interval_ms,
            max_queue_bytes: usize::try_from(config.max_queue_bytes).unwrap_or(usize::MAX),
            wall_clock_offset_ms: config.wall_clock_offset_ms,
            max_buffered_bytes: usize::try_from(config.max_buffered_bytes).unwrap_or(usize::MAX),
            max_handshakes: config.max_handshakes as usize,
            // Every node may become global, with the default limits, and knows at most
            // the default number of nodes (none of these is configurable through WIT).
            ..NodeConfig::new(String::new())
        };
        let node =
            Node::new(config, random::<16>(), now_ms).map_err(|e| refusal(Refused::Config(&e)))?;
        Ok(wnode::Node::new(NodeResource(RefCell::new(node))))
    }

    fn node_id(&self) -> String {
        self.0.borrow().node_id().to_owned()
    }

    fn is_up(&self, node: String) -> bool {
        self.0.borrow().is_up(&node)
    }

    fn buffered_bytes(&self) -> u64 {
        self.0.borrow().buffered_bytes() as u64
    }

    fn queued_bytes(&self) -> u64 {
        self.0.borrow().queued_bytes() as u64
    }

    fn info(&self) -> wnode::NodeInfo {
        self.0.borrow().info().into()
    }

    fn handle_accept(&self, peer_addr: String, now_ms: u64) -> u64 {
        self.0
            .borrow_mut()
            .handle_accept(&peer_addr, random::<NONCE_LEN>(), now_ms)
            .get()
    }

    fn handle_connected(&self, conn: u64, now_ms: u64) {
        self.0
            .borrow_mut()
            .handle_connected(conn.into(), random::<NONCE_LEN>(), now_ms);
    }

    fn handle_connect_failed(&self, conn: u64, reason: String, now_ms: u64) {
        self.0
            .borrow_mut()
            .handle_connect_failed(conn.into(), &reason, now_ms);
    }

    fn handle_input(&self, conn: u64, data: Vec<u8>, now_ms: u64) {
        self.0.borrow_mut().handle_input(conn.into(), &data, now_ms);
    }

    fn handle_inputs(&self, inputs: Vec<(u64, Vec<u8>)>, now_ms: u64) {
        let mut node = self.0.borrow_mut();
        for (conn, data) in inputs {
            node.handle_input(conn.into(), &data, now_ms);
        }
    }

    fn handle_eof(&self, conn: u64, now_ms: u64) {
        self.0.borrow_mut().handle_eof(conn.into(), now_ms);
    }

    fn handle_conn_error(&self, conn: u64, reason: String, now_ms: u64) {
        self.0
            .borrow_mut()
            .handle_conn_error(conn.into(), &reason, now_ms);
    }

    fn handle_timeout(&self, now_ms: u64) {
        self.0.borrow_mut().handle_timeout(now_ms);
    }

    fn poll_timeout(&self) -> Option<u64> {
        self.0.borrow().poll_timeout()
    }

    fn poll_outputs(&self) -> Vec<wnode::NodeOutput> {
        // Consecutive deliveries are one batch already, built in place by the node.
        let outputs = self.0.borrow_mut().poll_outputs();
        outputs.into_iter().map(Into::into).collect()
    }

    fn connect_addr(&self, addr: String, now_ms: u64) -> u64 {
        self.0.borrow_mut().connect_addr(&addr, now_ms).get()
    }

    fn new_port(&self) -> String {
        self.0.borrow_mut().new_port()
    }

    fn register_port(&self, name: String) -> Result<String, wit::Refusal> {
        self.0
            .borrow_mut()
            .register_port(&name)
            .map_err(|e| refusal(Refused::Node(&e)))
    }

    fn send(&self, messages: wnode::Batch, now_ms: u64) -> Result<(), wit::SendError> {
        let mut node = self.0.borrow_mut();
        for (index, pair) in batch::pairs(&messages.data, &messages.sizes).enumerate() {
            let (port, args) = pair.map_err(|e| {
                let e = MessageError::Malformed {
                    framing: "batch",
                    detail: e.to_string(),
                };
                send_error(index, Refused::Node(&NodeError::Message(e)))
            })?;
            node.send(port, args, now_ms)
                .map_err(|e| send_error(index, Refused::Node(&e)))?;
        }
        Ok(())
    }

    fn kill(&self, port_id: String, reason: Vec<u8>, now_ms: u64) -> Result<(), wit::Refusal> {
        self.0
            .borrow_mut()
            .kill(&port_id, &reason, now_ms)
            .map_err(|e| refusal(Refused::Node(&e)))
    }

    fn monitor(&self, port_id: String, now_ms: u64) -> Result<(), wit::Refusal> {
        self.0
            .borrow_mut()
            .monitor(&port_id, now_ms)
            .map_err(|e| refusal(Refused::Node(&e)))
    }

    fn unmonitor(&self, port_id: String, now_ms: u64) -> Result<(), wit::Refusal> {
        self.0
            .borrow_mut()
            .unmonitor(&port_id, now_ms)
            .map_err(|e| refusal(Refused::Node(&e)))
    }

    fn register_handler(&self, tag: String) {
        self.0.borrow_mut().register_handler(&tag);
    }

    fn data_connect(
        &self,
        port_id: String,
        node: String,
        timeout_ms: u64,
        handler: String,
        init_args: Vec<u8>,
        now_ms: u64,
    ) -> Result<String, wit::Refusal> {
        self.0
            .borrow_mut()
            .data_connect(&port_id, &node, timeout_ms, &handler, &init_args, now_ms)
            .map_err(|e| refusal(Refused::Node(&e)))
    }

    fn register_data_handler(&self, name: String) {
        self.0.borrow_mut().register_data_handler(&name);
    }

    fn set_binds(&self, binds: Vec<String>, now_ms: u64) {
        self.0.borrow_mut().set_binds(binds, now_ms);
    }

    fn db_set(
        &self,
        family: String,
        key: String,
        value: Vec<u8>,
        now_ms: u64,
    ) -> Result<(), wit::Refusal> {
        self.0
            .borrow_mut()
            .db_set(&family, &key, &value, now_ms)
            .map_err(|e| refusal(Refused::Node(&e)))
    }

    fn db_del(&self, family: String, keys: Vec<String>, now_ms: u64) {
        let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
        self.0.borrow_mut().db_del(&family, &keys, now_ms);
    }

    fn db_family(&self, family: String, now_ms: u64) -> String {
        self.0.borrow_mut().db_family(&family, now_ms)
    }

    fn db_keys(&self, family: String, now_ms: u64) -> String {
        self.0.borrow_mut().db_keys(&family, now_ms)
    }

    fn db_values(&self, family: String, now_ms: u64) -> String {
        self.0.borrow_mut().db_values(&family, now_ms)
    }

    fn db_mon(&self, family: String, now_ms: u64) {
        self.0.borrow_mut().db_mon(&family, now_ms);
    }

    fn db_unmon(&self, family: String, now_ms: u64) {
        self.0.borrow_mut().db_unmon(&family, now_ms);
    }
}

impl From<NodeOutput> for wnode::NodeOutput {
    fn from(o: NodeOutput) -> Self {
        use wnode::NodeOutput as W;
        match o {
            NodeOutput::Transmit { conn, bytes } => W::Transmit(wnode::Transmit {
                conn: conn.get(),
                bytes,
            }),
            NodeOutput::Connect { conn, addr } => W::Connect(wnode::Connect {
                conn: conn.get(),
                addr,
            }),
            NodeOutput::StartTls {
                conn,
                role,
                leftover,
            } => W::StartTls(wnode::StartTls {
                conn: conn.get(),
                role: role.into(),
                leftover,
            }),
            NodeOutput::Close { conn, reason } => W::Close(wnode::Close {
                conn: conn.get(),
                reason,
            }),
            NodeOutput::Deliver(d) => W::Deliver(wnode::Delivery {
                port: d.port,
                data: d.data,
                sizes: d.sizes,
            }),
            NodeOutput::NodeUp { node, conn } => W::NodeUp(wnode::NodeUp {
                node,
                conn: conn.get(),
            }),
            NodeOutput::NodeDown { node, reason } => W::NodeDown(wnode::NodeDown { node, reason }),
            NodeOutput::PortDown { port, reason } => W::PortDown(wnode::PortDown { port, reason }),
            NodeOutput::Request { tag, message } => W::Request(wnode::Request { tag, message }),
            NodeOutput::DbReply { id, result } => W::DbReply(wnode::DbReply { id, result }),
            NodeOutput::DbChange { family, change } => {
                W::DbChange(wnode::DbChange { family, change })
            }
            NodeOutput::Log { level, message } => W::Log(wnode::Log {
                level: match level {
                    LogLevel::Error => wnode::LogLevel::Error,
                    LogLevel::Warn => wnode::LogLevel::Warn,
                    LogLevel::Info => wnode::LogLevel::Info,
                    LogLevel::Debug => wnode::LogLevel::Debug,
                },
                message,
            }),
            NodeOutput::DataConnection {
                conn,
                id,
                node,
                port,
                handler,
                init_args,
                requested,
                leftover,
            } => W::DataConnection(wnode::DataConnection {
                conn: conn.get(),
                setup: Value::Array(vec![
                    Value::Text(id),
                    Value::Text(node),
                    Value::Text(port),
                    Value::Text(handler),
                    // The node encoded it from values: it decodes.
                    Value::decode(&init_args).unwrap_or(Value::Array(Vec::new())),
                    Value::Bool(requested),
                ])
                .encode(),
                leftover,
            }),
        }
    }
}

impl From<TlsRole> for wit::TlsRole {
    fn from(role: TlsRole) -> Self {
        match role {
            TlsRole::Client => wit::TlsRole::Client,
            TlsRole::Server => wit::TlsRole::Server,
        }
    }
}

impl From<AuthMethod> for wit::AuthMethod {
    fn from(m: AuthMethod) -> Self {
        match m {
            AuthMethod::TlsSha3_512 => wit::AuthMethod::TlsSha3512,
            AuthMethod::HmacSha3_512 => wit::AuthMethod::HmacSha3512,
            AuthMethod::TlsAnon => wit::AuthMethod::TlsAnon,
            AuthMethod::Cleartext => wit::AuthMethod::Cleartext,
        }
    }
}

impl From<wit::AuthMethod> for AuthMethod {
    fn from(m: wit::AuthMethod) -> Self {
        match m {
            wit::AuthMethod::TlsSha3512 => AuthMethod::TlsSha3_512,
            wit::AuthMethod::HmacSha3512 => AuthMethod::HmacSha3_512,
            wit::AuthMethod::TlsAnon => AuthMethod::TlsAnon,
            wit::AuthMethod::Cleartext => AuthMethod::Cleartext,
        }
    }
}

impl From<Framing> for wit::Framing {
    fn from(f: Framing) -> Self {
        match f {
            Framing::Cbor => wit::Framing::Cbor,
            Framing::Json => wit::Framing::Json,
        }
    }
}

impl From<wit::Framing> for Framing {
    fn from(f: wit::Framing) -> Self {
        match f {
            wit::Framing::Cbor => Framing::Cbor,
            wit::Framing::Json => Framing::Json,
        }
    }
}

fn saturate(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

impl From<Config> for wit::Config {
    fn from(c: Config) -> Self {
        wit::Config {
            node_id: c.node_id,
            protocol: c.protocol,
            secret: c.secret,
            tls: c.tls,
            auth_offer: c.auth_offer.into_iter().map(Into::into).collect(),
            auth_accept: c.auth_accept.into_iter().map(Into::into).collect(),
            framings: c.framings.into_iter().map(Into::into).collect(),
            greeting: c.greeting,
            peer_addr: c.peer_addr,
            monitor_timeout_ms: c.monitor_timeout_ms,
            keepalive_interval_ms: c.keepalive_interval_ms,
            limits: wit::Limits {
                max_message_size: saturate(c.limits.max_message_size),
                max_depth: saturate(c.limits.max_depth),
            },
        }
    }
}

impl From<wit::Config> for Config {
    fn from(c: wit::Config) -> Self {
        Config {
            node_id: c.node_id,
            protocol: c.protocol,
            secret: c.secret,
            tls: c.tls,
            auth_offer: c.auth_offer.into_iter().map(Into::into).collect(),
            auth_accept: c.auth_accept.into_iter().map(Into::into).collect(),
            framings: c.framings.into_iter().map(Into::into).collect(),
            greeting: c.greeting,
            peer_addr: c.peer_addr,
            monitor_timeout_ms: c.monitor_timeout_ms,
            keepalive_interval_ms: c.keepalive_interval_ms,
            limits: Limits {
                max_message_size: c.limits.max_message_size as usize,
                max_depth: c.limits.max_depth as usize,
            },
        }
    }
}

/// An error the engine refuses an API call with, from whichever of its enums.
enum Refused<'a> {
    Config(&'a ConfigError),
    Send(&'a SendError),
    Node(&'a NodeError),
}

/// The kind and message of a refusal, as the WIT carries them.
fn refusal(e: Refused) -> wit::Refusal {
    let (kind, message) = match e {
        Refused::Config(e) => (e.refusal_kind(), e.to_string()),
        Refused::Send(e) => (e.refusal_kind(), e.to_string()),
        Refused::Node(e) => (e.refusal_kind(), e.to_string()),
    };
    wit::Refusal {
        kind: kind.into(),
        message,
    }
}

impl From<RefusalKind> for wit::RefusalKind {
    fn from(kind: RefusalKind) -> wit::RefusalKind {
        use wit::RefusalKind as K;
        match kind {
            RefusalKind::InvalidConfig => K::InvalidConfig,
            RefusalKind::InvalidPortId => K::InvalidPortId,
            RefusalKind::PortExists => K::PortExists,
            RefusalKind::QueueFull => K::QueueFull,
            RefusalKind::BudgetExhausted => K::BudgetExhausted,
            RefusalKind::NotConnected => K::NotConnected,
            RefusalKind::Closed => K::Closed,
            RefusalKind::TooLarge => K::TooLarge,
            RefusalKind::TooDeep => K::TooDeep,
            RefusalKind::NotAnArray => K::NotAnArray,
            RefusalKind::Malformed => K::Malformed,
            RefusalKind::NotJson => K::NotJson,
        }
    }
}

/// `send` stopped at message `index`: the ones before it were queued.
fn send_error(index: usize, e: Refused) -> wit::SendError {
    let wit::Refusal { kind, message } = refusal(e);
    wit::SendError {
        index: u32::try_from(index).unwrap_or(u32::MAX),
        kind,
        message,
    }
}

fn error_kind(e: &Error) -> wit::ErrorKind {
    use wit::ErrorKind as K;
    match e {
        Error::UnparsableGreeting { .. } => K::UnparsableGreeting,
        Error::VersionMismatch(_) => K::VersionMismatch,
        Error::SelfConnection => K::SelfConnection,
        Error::AlreadyConnected(_) => K::AlreadyConnected,
        Error::EchoAttack => K::EchoAttack,
        Error::NoCommonAuth(_) => K::NoCommonAuth,
        Error::NoCommonFraming(_) => K::NoCommonFraming,
        Error::UnsupportedSendAuth(_) => K::UnsupportedSendAuth,
        Error::NoTlsNoSecret => K::NoTlsNoSecret,
        Error::UnsupportedRecvAuth(_) => K::UnsupportedRecvAuth,
        Error::AuthFailure => K::AuthFailure,
        Error::UnusableRemoteFraming(_) => K::UnusableRemoteFraming,
        Error::LineTooLong(_) => K::LineTooLong,
        Error::HandshakeTimeout => K::HandshakeTimeout,
        Error::PeerClosed => K::PeerClosed,
        Error::TruncatedMessage => K::TruncatedMessage,
        Error::InputAfterHandover => K::InputAfterHandover,
        Error::ConnectionBufferFull(_) => K::ConnectionBufferFull,
        Error::NodeBudgetExhausted(_) => K::NodeBudgetExhausted,
        Error::Message(_) => K::Message,
    }
}

impl From<Session> for wit::Session {
    fn from(s: Session) -> Self {
        wit::Session {
            remote_node: s.remote_node,
            protocol: s.protocol,
            tls: s.tls,
            send_auth: s.send_auth.into(),
            recv_auth: s.recv_auth.into(),
            untrusted: s.untrusted,
            send_framing: s.send_framing.into(),
            recv_framing: s.recv_framing.into(),
        }
    }
}

impl From<Traffic> for wnode::Traffic {
    fn from(t: Traffic) -> Self {
        wnode::Traffic {
            bytes_in: t.bytes_in,
            bytes_out: t.bytes_out,
            messages_in: t.messages_in,
            messages_out: t.messages_out,
        }
    }
}

/// A count or size as a WIT `u64` (saturating where `usize` is wider).
fn wide(n: usize) -> u64 {
    u64::try_from(n).unwrap_or(u64::MAX)
}

/// Named counters as WIT pairs.
fn named(counts: Vec<(&'static str, u64)>) -> Vec<(String, u64)> {
    counts.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()
}

impl From<NodeInfo> for wnode::NodeInfo {
    fn from(i: NodeInfo) -> Self {
        let conns = i
            .conns
            .into_iter()
            .map(|c| wnode::ConnInfo {
                conn: c.conn.get(),
                addr: c.addr,
                incoming: c.incoming,
                remote: c.remote,
                session: c.session.map(Into::into),
                working: c.working,
                traffic: c.traffic.into(),
                held: wide(c.held),
            })
            .collect();
        wnode::NodeInfo {
            conns,
            nodes_up: u32::try_from(i.nodes_up).unwrap_or(u32::MAX),
            ports: u32::try_from(i.ports).unwrap_or(u32::MAX),
            global: i.global,
            db_entries: wide(i.db_entries),
            db_bytes: wide(i.db_bytes),
            queued_bytes: wide(i.queued_bytes),
            buffered_bytes: wide(i.buffered_bytes),
            traffic: i.traffic.into(),
            handshakes: i.handshakes,
            ends: named(i.ends),
            limits: named(i.limits),
        }
    }
}

impl From<Output> for wit::Output {
    fn from(o: Output) -> Self {
        match o {
            Output::Transmit(bytes) => wit::Output::Transmit(bytes),
            Output::Greeting(g) => wit::Output::Greeting(wit::Greeting {
                protocol: g.protocol,
                version: g.version,
                node_id: g.node_id,
                auths: g.auths,
                framings: g.framings,
                pairs: g.pairs,
            }),
            Output::StartTls { role, leftover } => wit::Output::StartTls(wit::StartTls {
                role: role.into(),
                leftover,
            }),
            Output::Connected(s) => wit::Output::Connected(s.into()),
            Output::Message(m) => wit::Output::Messages(wit::Messages {
                sizes: vec![u32::try_from(m.len()).unwrap_or(u32::MAX)],
                data: m,
            }),
            Output::Messages { data, sizes } => {
                wit::Output::Messages(wit::Messages { data, sizes })
            }
            Output::HandedOver { leftover } => wit::Output::HandedOver(leftover),
            Output::Closed(e) => wit::Output::Closed(wit::Error {
                kind: error_kind(&e),
                message: e.to_string(),
            }),
        }
    }
}
