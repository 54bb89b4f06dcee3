//! What a node is doing, for its operator ([`super::Node::info`], `aemp info`, the
//! metrics): the engine's figures (connections, traffic, counters; WIT `info`) with the
//! host's own (bytes waiting to be written per connection, inbox depths, the uptime,
//! limits the host enforces).
//!
//! Other nodes ask for it with the node-port request `["", "aemp_info", REPLY...]`
//! ([`INFO_TAG`]); the answer `[REPLY..., INFO]` carries [`NodeInfo`] as a plain map
//! (through serde, field names as below), so a Perl node or any script can read it.
//! Only aemp nodes understand the tag: the reference's nodes answer `can aemp_info`
//! with false, as does an aemp node whose operator turned it off
//! ([`super::NodeBuilder::info_requests`], profile key `node_info`).

use std::collections::BTreeMap;
use std::time::Duration;

use aemp_engine::{AuthMethod, Framing, Value};
use serde::{Deserialize, Serialize};

use crate::sandbox::{wit, wit_node};

/// The node-port request tag that asks a node for its [`NodeInfo`]. While info requests
/// are on, the node answers them itself: [`super::Node::handle_requests`] for this tag
/// receives none.
pub const INFO_TAG: &str = "aemp_info";

/// Connections and ports listed, at most each, in an answer to another node: a small
/// request must not buy an answer of any size (the counts are complete).
pub const INFO_LISTED: usize = 256;

/// One connection of the node.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct ConnInfo {
    /// The connection's id on this node (as in its log lines).
    pub conn: u64,
    /// The address dialled, or the peer's address for an accepted connection.
    pub addr: String,
    /// Accepted from a listener (else dialled).
    pub incoming: bool,
    /// The remote node id, once its greeting came.
    pub node: Option<String>,
    /// Whether it is that node's working connection (else still in its handshake, or
    /// about to close).
    pub working: bool,
    /// The authentication methods, ours then the peer's (`hmac_sha3_512/hmac_sha3_512`),
    /// once the handshake completed.
    pub auth: Option<String>,
    /// The framings, ours then the peer's (`cbor/json`), once the handshake completed.
    pub framing: Option<String>,
    /// Whether it runs inside TLS.
    pub tls: bool,
    /// Bytes received (after TLS).
    pub bytes_in: u64,
    /// Bytes sent (before TLS).
    pub bytes_out: u64,
    /// Messages received (keepalives not counted).
    pub messages_in: u64,
    /// Messages sent.
    pub messages_out: u64,
    /// Bytes waiting to be written to its socket.
    pub queued_bytes: u64,
    /// Bytes the engine holds for it (partial messages, handshake input).
    pub held_bytes: u64,
}

/// One local port of the node.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct PortInfo {
    /// Its id (`NODE#NAME`).
    pub port: String,
    /// Messages in its inbox, not taken by the application yet (and held for it while
    /// the inbox is full).
    pub messages: u64,
    /// Bytes of the messages in its inbox.
    pub bytes: u64,
}

/// What a node is doing: read-only, cheap enough to ask every few seconds. Read back
/// from another node's answer with [`crate::from_value`] (fields it lacks stay empty,
/// so a newer or older node's answer still reads).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct NodeInfo {
    /// The node's id.
    pub node: String,
    /// Seconds since the node started.
    pub uptime: f64,
    /// Every connection, by id (the first [`INFO_LISTED`] in an answer to another node).
    pub connections: Vec<ConnInfo>,
    /// How many connections there are.
    pub connection_count: u64,
    /// Nodes with a working connection.
    pub nodes_up: u64,
    /// Every local port, by id (the first [`INFO_LISTED`] in an answer to another node).
    pub ports: Vec<PortInfo>,
    /// How many local ports there are.
    pub port_count: u64,
    /// Whether the node acts as a global node (a seed).
    pub global: bool,
    /// Entries of the network database it holds as a global node.
    pub db_entries: u64,
    /// Bytes of those entries (as the database limits count them).
    pub db_bytes: u64,
    /// Bytes all connections received, closed ones included.
    pub bytes_in: u64,
    /// Bytes all connections sent, closed ones included.
    pub bytes_out: u64,
    /// Messages all connections received, closed ones included.
    pub messages_in: u64,
    /// Messages all connections sent, closed ones included.
    pub messages_out: u64,
    /// Handshakes completed.
    pub handshakes: u64,
    /// Connections their transport ended, by reason (`auth_failure`,
    /// `handshake_timeout`, ...; `peer_closed` is a peer's normal close).
    pub connection_ends: BTreeMap<String, u64>,
    /// Limits hit, by name: the engine's (`max_handshakes`, `max_queue_bytes`,
    /// `max_buffered_bytes_input`, `max_buffered_bytes_message`, `max_nodes`,
    /// `peer_does_not_keep_up`, `global_database`, `global_monitors`) and the host's (`max_write_queue`, `max_write_total`).
    pub limits: BTreeMap<String, u64>,
    /// The application's calls the engine refused, by kind (`QueueFull`, ...; kinds
    /// that never happened are left out, as are reasons in `connection_ends`).
    pub refusals: BTreeMap<String, u64>,
    /// Bytes of messages waiting for nodes not connected yet.
    pub queued_bytes: u64,
    /// Bytes waiting to be written to the sockets, all connections together.
    pub write_queue_bytes: u64,
    /// Bytes the engine holds on behalf of peers (what `max_buffered_bytes` limits).
    pub buffered_bytes: u64,
    /// The size of the node's sandbox memory.
    pub sandbox_memory: u64,
}

impl NodeInfo {
    /// The map other nodes get in answer to [`INFO_TAG`].
    pub fn to_value(&self) -> Value {
        // Plain fields and maps with text keys: serde cannot fail on them.
        crate::to_value(self).unwrap_or(Value::Null)
    }
}

/// What the host knows beside the engine's figures.
pub(super) struct HostFigures<'a> {
    pub(super) node: &'a str,
    pub(super) uptime: Duration,
    /// Bytes waiting to be written, per connection.
    pub(super) unwritten: &'a dyn Fn(u64) -> usize,
    pub(super) ports: Vec<PortInfo>,
    pub(super) limits: &'a BTreeMap<&'static str, u64>,
    pub(super) refusals: &'a BTreeMap<String, u64>,
    pub(super) write_queue_bytes: usize,
    pub(super) sandbox_memory: usize,
}

/// A size as a `u64`.
fn wide(n: usize) -> u64 {
    u64::try_from(n).unwrap_or(u64::MAX)
}

/// Our methods and framings, then the peer's, as one word each.
fn pair(ours: &str, theirs: &str) -> String {
    format!("{ours}/{theirs}")
}

/// The engine's method, back from its WIT form (for its wire name).
fn auth_method(m: wit::AuthMethod) -> AuthMethod {
    use wit::AuthMethod as A;
    match m {
        A::TlsSha3512 => AuthMethod::TlsSha3_512,
        A::HmacSha3512 => AuthMethod::HmacSha3_512,
        A::TlsAnon => AuthMethod::TlsAnon,
        A::Cleartext => AuthMethod::Cleartext,
    }
}

/// The engine's framing, back from its WIT form (for its wire name).
fn framing(f: wit::Framing) -> Framing {
    match f {
        wit::Framing::Cbor => Framing::Cbor,
        wit::Framing::Json => Framing::Json,
    }
}

/// The node's info from the engine's `info` and the host's figures.
pub(super) fn gather(engine: wit_node::NodeInfo, host: HostFigures<'_>) -> NodeInfo {
    let connections: Vec<ConnInfo> = engine
        .conns
        .into_iter()
        .map(|c| ConnInfo {
            conn: c.conn,
            addr: c.addr,
            incoming: c.incoming,
            node: c.remote,
            working: c.working,
            auth: c.session.as_ref().map(|s| {
                pair(
                    auth_method(s.send_auth).name(),
                    auth_method(s.recv_auth).name(),
                )
            }),
            framing: c.session.as_ref().map(|s| {
                pair(
                    framing(s.send_framing).name(),
                    framing(s.recv_framing).name(),
                )
            }),
            tls: c.session.as_ref().is_some_and(|s| s.tls),
            bytes_in: c.traffic.bytes_in,
            bytes_out: c.traffic.bytes_out,
            messages_in: c.traffic.messages_in,
            messages_out: c.traffic.messages_out,
            queued_bytes: wide((host.unwritten)(c.conn)),
            held_bytes: c.held,
        })
        .collect();
    let mut limits: BTreeMap<String, u64> = engine.limits.into_iter().collect();
    for (&name, &count) in host.limits {
        limits.insert(name.to_owned(), count);
    }
    NodeInfo {
        node: host.node.to_owned(),
        uptime: host.uptime.as_secs_f64(),
        connection_count: wide(connections.len()),
        connections,
        port_count: wide(host.ports.len()),
        nodes_up: u64::from(engine.nodes_up),
        ports: host.ports,
        global: engine.global,
        db_entries: engine.db_entries,
        db_bytes: engine.db_bytes,
        bytes_in: engine.traffic.bytes_in,
        bytes_out: engine.traffic.bytes_out,
        messages_in: engine.traffic.messages_in,
        messages_out: engine.traffic.messages_out,
        handshakes: engine.handshakes,
        connection_ends: engine.ends.into_iter().collect(),
        limits,
        refusals: host.refusals.clone(),
        queued_bytes: engine.queued_bytes,
        write_queue_bytes: wide(host.write_queue_bytes),
        buffered_bytes: engine.buffered_bytes,
        sandbox_memory: wide(host.sandbox_memory),
    }
}

/// The answer to an [`INFO_TAG`] request `message` (`[NODE, REPLY_PORT, EXTRA...]`):
/// the reply port and the arguments `[EXTRA..., INFO]` (at most [`INFO_LISTED`]
/// connections and ports), or `None` when the request names no reply port.
pub(super) fn answer(message: Vec<Value>, mut info: NodeInfo) -> Option<(String, Vec<Value>)> {
    let mut items = message.into_iter().skip(1);
    let port = items.next()?.as_name()?.into_owned();
    let mut args: Vec<Value> = items.collect();
    info.connections.truncate(INFO_LISTED);
    info.ports.truncate(INFO_LISTED);
    args.push(info.to_value());
    Some((port, args))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_answer_goes_to_the_reply_port_with_its_extra_arguments_and_bounded_lists() {
        let info = NodeInfo {
            node: "n".into(),
            connections: vec![ConnInfo::default(); INFO_LISTED + 5],
            connection_count: wide(INFO_LISTED + 5),
            ..NodeInfo::default()
        };
        let message = vec![Value::text("asker"), Value::text("asker#r"), Value::Int(7)];
        let (port, args) = answer(message, info).unwrap();
        assert_eq!(port, "asker#r");
        assert_eq!(args[0], Value::Int(7));
        let back: NodeInfo = crate::from_value(&args[1]).unwrap();
        assert_eq!(back.node, "n");
        assert_eq!(back.connections.len(), INFO_LISTED);
        assert_eq!(back.connection_count, wide(INFO_LISTED + 5));
        // No reply port, no answer.
        assert_eq!(
            answer(vec![Value::text("asker")], NodeInfo::default()),
            None
        );
        assert_eq!(
            answer(
                vec![Value::text("asker"), Value::Int(1)],
                NodeInfo::default()
            ),
            None
        );
    }
}
