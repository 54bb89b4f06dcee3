//! Data connections (AnyEvent::MP::DataConn, protocol `aemp-dataconn`): raw byte streams
//! between two nodes, authenticated (and inside TLS) like their AEMP connection, opened on
//! the same listeners and then handed to the host.
//!
//! The node that asks ([`DataConns::request`], the reference's `connect_to`) sends the
//! other node `["", "AnyEvent::MP::DataConn::_expect", ID, PORT, TIMEOUT, HANDLER,
//! ARGS...]`, then `["", "snd", OURPORT]`, a round trip that tells it the request has
//! been read. Then one of the two connects, greeting with protocol `aemp-dataconn` and
//! the pair `dataconn_id=ID`: the asking node itself when it reached the other on a
//! listener, else the other, told with `["", "AnyEvent::MP::DataConn::_connect", ID,
//! OURNODE]`. Once authenticated, each side hands the stream to its host; the other
//! node's host runs the data handler HANDLER (one its application registered: the name
//! is never code) with ARGS. Whatever goes wrong on either side before that (timeout,
//! refused connection, failed handshake) kills PORT with `["AnyEvent::MP::DataConn",
//! MESSAGE]`, as the reference does.

use std::collections::{BTreeMap, BTreeSet};

use super::effect::{Effect, Effects, View};
use super::ids;
use super::request::{DATA_CONNECT, DATA_EXPECT, DataRequest};
use super::{ConnId, LogLevel, NodeError};
use crate::value::Value;

/// The first word of every kill reason of a data connection (the reference's package).
pub(super) const KILL_TAG: &str = "AnyEvent::MP::DataConn";

/// The greeting key that names the data connection.
pub(super) const ID_KEY: &str = "dataconn_id";

/// The protocol word of a data connection's greeting.
pub(super) const PROTOCOL: &str = "aemp-dataconn";

/// The most bytes a peer's `_expect` may make us hold (its id, port, handler name and
/// encoded arguments): with `max_data_conns` at its default of 256 that is 16 MiB at
/// most, where 256 messages of 16 MiB would be 4 GiB.
pub(super) const MAX_EXPECT_BYTES: usize = 64 << 10;

/// How this node reaches another node, as its working connection tells.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Link {
    /// We dialled it at this address: it listens there.
    Dialled(String),
    /// It connected to us: we listen.
    Accepted,
}

/// Which side of a data connection this node is.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Role {
    /// We asked for it; `rpc` is the name of the local port the round trip answers.
    Requester { rpc: String },
    /// The other node asked us to expect it.
    Expecter,
}

/// A data connection announced and not yet handed over.
#[derive(Debug)]
struct Pending {
    role: Role,
    /// The other node.
    node: String,
    /// The port killed on failure: ours when we asked, the other node's otherwise.
    port_id: String,
    handler: String,
    /// The CBOR array of the handler's arguments.
    init_args: Vec<u8>,
    /// The timeout as asked, for the reference's message.
    timeout_ms: u64,
    deadline: u64,
    /// The connection that carries it, once there is one.
    conn: Option<ConnId>,
}

/// A data connection whose stream is the host's now.
#[derive(Debug, PartialEq)]
pub(super) struct HandedOver {
    pub(super) id: String,
    pub(super) node: String,
    pub(super) port_id: String,
    pub(super) handler: String,
    /// The CBOR array of the handler's arguments.
    pub(super) init_args: Vec<u8>,
    /// We asked for it (else the other node did, and the host runs `handler`).
    pub(super) requested: bool,
}

/// The node's data connections: the announced ones, their deadlines, the data handlers
/// the application registered.
#[derive(Debug)]
pub(super) struct DataConns {
    pending: BTreeMap<String, Pending>,
    /// Every pending connection's deadline with its id, soonest first.
    deadlines: BTreeSet<(u64, String)>,
    /// Round-trip port names -> the id they belong to.
    rpc: BTreeMap<String, String>,
    handlers: BTreeSet<String>,
    /// Perl-style counter for fresh ids (`b`, `c`, ...), as the reference's `$ID`.
    counter: String,
    /// At most this many pending at once (`NodeConfig::max_data_conns`).
    max: usize,
}

impl DataConns {
    pub(super) fn new(max: usize) -> DataConns {
        DataConns {
            pending: BTreeMap::new(),
            deadlines: BTreeSet::new(),
            rpc: BTreeMap::new(),
            handlers: BTreeSet::new(),
            counter: "a".into(),
            max,
        }
    }

    /// Lets peers ask for data connections handled by `name`.
    pub(super) fn register_handler(&mut self, name: &str) {
        self.handlers.insert(name.to_owned());
    }

    /// When the soonest one times out.
    pub(super) fn next_deadline(&self) -> Option<u64> {
        self.deadlines.first().map(|(t, _)| *t)
    }

    /// Whether `port` is the round-trip port of a pending request.
    pub(super) fn is_rpc_port(&self, port: &str) -> bool {
        self.rpc.contains_key(port)
    }

    /// Asks `node` for a data connection handled there by `handler` with `init_args`;
    /// `port` (a local port name) dies if it fails, `rpc` is a fresh local port name for
    /// the round trip. Returns the id.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn request(
        &mut self,
        view: &View<'_>,
        port: &str,
        node: &str,
        timeout_ms: u64,
        handler: &str,
        init_args: Vec<Value>,
        rpc: String,
        fx: &mut Effects,
    ) -> Result<String, NodeError> {
        if self.pending.len() >= self.max {
            return Err(NodeError::TooManyDataConns(self.max));
        }
        // Fresh ids name this node, as the reference's do, so ids of different nodes
        // never meet; a peer's id that is taken already is refused (`expect`).
        let id = loop {
            ids::increment(&mut self.counter);
            let id = format!("{}@{}", self.counter, view.node_id);
            if !self.pending.contains_key(&id) {
                break id;
            }
        };
        let port_id = format!("{}#{port}", view.node_id);
        let mut expect = vec![
            Value::text(DATA_EXPECT),
            Value::text(id.as_str()),
            Value::text(port_id.as_str()),
            seconds(timeout_ms),
            Value::text(handler),
        ];
        // Held encoded: that is how the hand-over reports them.
        let encoded = Value::Array(init_args.clone()).encode();
        expect.extend(init_args);
        fx.send(node, expect, "data connection request");
        let rpc_id = format!("{}#{rpc}", view.node_id);
        fx.send(
            node,
            vec![Value::text("snd"), Value::text(rpc_id)],
            "data connection request",
        );
        self.rpc.insert(rpc.clone(), id.clone());
        self.insert(
            id.clone(),
            Pending {
                role: Role::Requester { rpc },
                node: node.to_owned(),
                port_id,
                handler: handler.to_owned(),
                init_args: encoded,
                timeout_ms,
                deadline: view.now.saturating_add(timeout_ms),
                conn: None,
            },
        );
        Ok(id)
    }

    /// A data connection request from node `src`.
    pub(super) fn handle(
        &mut self,
        src: &str,
        request: DataRequest,
        link: Option<Link>,
        view: &View<'_>,
        fx: &mut Effects,
    ) {
        match request {
            DataRequest::Expect {
                id,
                port,
                timeout_ms,
                handler,
                init_args,
            } => {
                let init_args = Value::Array(init_args).encode();
                let size = [id.len(), port.len(), handler.len(), init_args.len()]
                    .into_iter()
                    .fold(0usize, usize::saturating_add);
                if size > MAX_EXPECT_BYTES {
                    let message = format!(
                        "data connection request too large ({size} bytes, at most {MAX_EXPECT_BYTES})"
                    );
                    fx.warn_peer(src, format!("{DATA_EXPECT} from {src}: {message}"));
                    return kill(&port, &message, fx);
                }
                let refusal = if self.pending.contains_key(&id) {
                    Some(format!("data connection {id} exists already"))
                } else if !self.handlers.contains(&handler) {
                    Some(format!("{handler}: no such data connection handler"))
                } else if self.pending.len() >= self.max {
                    Some(format!(
                        "too many pending data connections ({}), {id} refused",
                        self.max
                    ))
                } else {
                    None
                };
                if let Some(message) = refusal {
                    fx.warn_peer(src, format!("{DATA_EXPECT} from {src}: {message}"));
                    return kill(&port, &message, fx);
                }
                self.insert(
                    id,
                    Pending {
                        role: Role::Expecter,
                        node: src.to_owned(),
                        port_id: port,
                        handler,
                        init_args,
                        timeout_ms,
                        deadline: view.now.saturating_add(timeout_ms),
                        conn: None,
                    },
                );
            }
            DataRequest::Connect { id, node } => {
                // Only the node that announced it may ask us to open it, and only once.
                let ours = self
                    .pending
                    .get(&id)
                    .is_some_and(|p| p.role == Role::Expecter && p.node == src && p.conn.is_none());
                if !ours {
                    return fx.warn_peer(
                        src,
                        format!("{DATA_CONNECT} from {src} for unknown data connection {id}"),
                    );
                }
                self.dial(&id, &node, link, fx);
            }
        }
    }

    /// The round trip after our `_expect` is back: the other node has read it, so the
    /// connection may come. We open it if the other node listens where we reached it,
    /// else we listen (it reached us) and ask it to.
    pub(super) fn round_trip(
        &mut self,
        rpc: &str,
        link: Option<Link>,
        view: &View<'_>,
        fx: &mut Effects,
    ) {
        let Some(id) = self.rpc.remove(rpc) else {
            return;
        };
        let Some(node) = self.pending.get(&id).map(|p| p.node.clone()) else {
            return;
        };
        match link {
            Some(Link::Accepted) => {
                let connect = vec![
                    Value::text(DATA_CONNECT),
                    Value::text(id.as_str()),
                    Value::text(view.node_id),
                ];
                fx.send(&node, connect, "data connection request");
            }
            link => self.dial(&id, &node, link, fx),
        }
    }

    /// Opens data connection `id` to `node` where we reached it, if we did.
    fn dial(&mut self, id: &str, node: &str, link: Option<Link>, fx: &mut Effects) {
        match link {
            Some(Link::Dialled(addr)) => fx.push(Effect::DataDial {
                id: id.to_owned(),
                addr,
            }),
            _ => self.fail(id, &format!("{node}: no listeners found"), fx),
        }
    }

    /// Connection `conn` greets as node `remote` for data connection `id`: `Err` with the
    /// reason to close it unless that node announced `id` and it has no connection yet.
    pub(super) fn accept(&mut self, id: &str, remote: &str, conn: ConnId) -> Result<(), String> {
        match self.pending.get_mut(id) {
            Some(p) if p.node == remote && p.conn.is_none() => {
                p.conn = Some(conn);
                Ok(())
            }
            Some(p) if p.node == remote => {
                Err(format!("data connection {id} is being established already"))
            }
            _ => Err(format!("unknown or expired data connection {id}")),
        }
    }

    /// Connection `conn` was opened for data connection `id`.
    pub(super) fn dialled(&mut self, id: &str, conn: ConnId) {
        if let Some(p) = self.pending.get_mut(id) {
            p.conn = Some(conn);
        }
    }

    /// Data connection `id` is authenticated on `conn`: it is the host's now.
    pub(super) fn hand_over(&mut self, id: &str, conn: ConnId) -> Option<HandedOver> {
        if self.pending.get(id)?.conn != Some(conn) {
            return None;
        }
        let p = self.remove(id)?;
        Some(HandedOver {
            id: id.to_owned(),
            node: p.node,
            port_id: p.port_id,
            handler: p.handler,
            init_args: p.init_args,
            requested: matches!(p.role, Role::Requester { .. }),
        })
    }

    /// The connection `conn` of data connection `id` ended before the hand-over.
    pub(super) fn conn_failed(&mut self, id: &str, conn: ConnId, reason: &str, fx: &mut Effects) {
        if self.pending.get(id).is_some_and(|p| p.conn == Some(conn)) {
            self.fail(id, reason, fx);
        }
    }

    /// Fails every data connection whose time is up.
    pub(super) fn expire(&mut self, view: &View<'_>, fx: &mut Effects) {
        while let Some((deadline, id)) = self.deadlines.first().cloned() {
            if deadline > view.now {
                break;
            }
            let Some(p) = self.pending.get(&id) else {
                self.deadlines.remove(&(deadline, id));
                continue;
            };
            // The requester's message as the reference words it; the expecting side
            // (which gives the reference's requester no reason) says the same of itself.
            let node = match p.role {
                Role::Requester { .. } => p.node.clone(),
                Role::Expecter => view.node_id.to_owned(),
            };
            let message = format!(
                "{node}: unable to establish connection within {} seconds",
                seconds_text(p.timeout_ms)
            );
            if let Some(conn) = p.conn {
                fx.push(Effect::CloseConn {
                    conn,
                    reason: message.clone(),
                });
            }
            self.fail(&id, &message, fx);
        }
    }

    /// Forgets `id` and kills its port with `message`.
    fn fail(&mut self, id: &str, message: &str, fx: &mut Effects) {
        if let Some(p) = self.remove(id) {
            fx.log(
                LogLevel::Debug,
                format!("data connection {id} with {} failed: {message}", p.node),
            );
            kill(&p.port_id, message, fx);
        }
    }

    fn insert(&mut self, id: String, pending: Pending) {
        self.deadlines.insert((pending.deadline, id.clone()));
        self.pending.insert(id, pending);
    }

    fn remove(&mut self, id: &str) -> Option<Pending> {
        let p = self.pending.remove(id)?;
        self.deadlines.remove(&(p.deadline, id.to_owned()));
        if let Role::Requester { rpc } = &p.role {
            self.rpc.remove(rpc);
        }
        Some(p)
    }
}

/// Kills `port_id` with the reference's reason `["AnyEvent::MP::DataConn", message]`.
fn kill(port_id: &str, message: &str, fx: &mut Effects) {
    fx.push(Effect::Kill {
        port_id: port_id.to_owned(),
        reason: vec![Value::text(KILL_TAG), Value::text(message)],
    });
}

/// A timeout on the wire: whole seconds as an integer, others as a float, as a Perl
/// number would be encoded.
fn seconds(ms: u64) -> Value {
    if ms.is_multiple_of(1000) {
        Value::Int(i128::from(ms / 1000))
    } else {
        Value::Float(ms as f64 / 1000.0)
    }
}

/// Seconds as Perl prints the number: `5`, `2.5`.
fn seconds_text(ms: u64) -> String {
    if ms.is_multiple_of(1000) {
        (ms / 1000).to_string()
    } else {
        (ms as f64 / 1000.0).to_string()
    }
}
