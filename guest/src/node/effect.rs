//! How the node's parts talk to the node. The node port (`kernel`), the global client
//! (`global`) and the global service (`seed`) each own their state; they see the rest of
//! the node only through a [`View`] and answer with [`Effect`]s, which `Node` carries out
//! in order, depth first: what one effect causes is done before the effects queued after
//! it, as if the parts had called the node. A message a part sends to its own node comes
//! back through the node port like any other.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use super::{LogLevel, NodeConfig, NodeOutput, Peer, msg};
use crate::value::Value;

/// Something a part asks the node to do.
#[derive(Debug)]
pub(super) enum Effect {
    /// Send the node-port message `message` (an encoded `["", ...]`) to `node`, ourselves
    /// included; a refusal is logged as "`what` to NODE dropped".
    Send {
        node: String,
        message: Vec<u8>,
        what: &'static str,
    },
    /// One node-port message for each of `nodes`, encoded once.
    Broadcast {
        nodes: Vec<String>,
        message: Vec<u8>,
    },
    /// A message a peer asked us to pass on to `port_id` (`snd`); a refusal is a
    /// warning about `src`.
    Relay {
        src: String,
        port_id: String,
        message: Vec<u8>,
    },
    /// For the host (database replies and changes, requests, ports down).
    Output(NodeOutput),
    Log(LogLevel, String),
    /// A warning about a request from `peer`, within that peer's warning budget.
    WarnPeer {
        peer: String,
        message: String,
    },
    /// The master's answer to `g_find`: dial `addrs` if `node` is still being looked for.
    Found {
        node: String,
        addrs: Vec<String>,
    },
    /// Start reaching `node` (a global node to keep connected).
    Reach(String),
    /// The global service forgets what `node` held (its entries, monitors, slavery),
    /// after the effects before.
    Forget(String),
    /// The global service checks which global nodes to keep connected.
    Keep,
    /// `node` is a global node (`g_global`).
    IsGlobal(String),
    /// Send `node` the entries of all our slaves (`g_set`), as they are when this effect
    /// is carried out.
    ShareDb(String),
    /// Kill `port_id` (local or remote) with `reason`.
    Kill {
        port_id: String,
        reason: Vec<Value>,
    },
    /// Open data connection `id` to `addr`.
    DataDial {
        id: String,
        addr: String,
    },
    /// Close connection `conn` (a data connection given up).
    CloseConn {
        conn: super::ConnId,
        reason: String,
    },
    /// Set our own database entry (`Some`) or delete it (`None`).
    Own {
        family: String,
        key: String,
        value: Option<Value>,
    },
}

/// Effects in the order they are to be carried out.
#[derive(Debug, Default)]
pub(super) struct Effects(VecDeque<Effect>);

impl Effects {
    pub(super) fn push(&mut self, effect: Effect) {
        self.0.push_back(effect);
    }

    pub(super) fn pop(&mut self) -> Option<Effect> {
        self.0.pop_front()
    }

    pub(super) fn len(&self) -> usize {
        self.0.len()
    }

    /// Moves the effects queued since the queue was `len` long to its front.
    pub(super) fn first_since(&mut self, len: usize) {
        let new = self.0.len().saturating_sub(len);
        self.0.rotate_right(new);
    }

    /// Sends `["", items...]` to `node`.
    pub(super) fn send(&mut self, node: &str, items: Vec<Value>, what: &'static str) {
        self.send_message(node, msg::build("", items), what);
    }

    /// Sends a node-port message, already encoded, to `node`.
    pub(super) fn send_message(&mut self, node: &str, message: Vec<u8>, what: &'static str) {
        self.push(Effect::Send {
            node: node.to_owned(),
            message,
            what,
        });
    }

    pub(super) fn log(&mut self, level: LogLevel, message: String) {
        self.push(Effect::Log(level, message));
    }

    pub(super) fn warn_peer(&mut self, peer: &str, message: String) {
        self.push(Effect::WarnPeer {
            peer: peer.to_owned(),
            message,
        });
    }

    pub(super) fn output(&mut self, output: NodeOutput) {
        self.push(Effect::Output(output));
    }
}

/// What a part may know of the rest of the node.
pub(super) struct View<'a> {
    pub(super) config: &'a NodeConfig,
    pub(super) node_id: &'a str,
    pub(super) peers: &'a BTreeMap<String, Peer>,
    /// Nodes that announced themselves as global (`g_global`) and are up.
    pub(super) globals: &'a BTreeSet<String>,
    /// Whether this node is a global node.
    pub(super) global: bool,
    pub(super) now: u64,
}

impl View<'_> {
    /// Whether `node` has a working connection.
    pub(super) fn is_up(&self, node: &str) -> bool {
        self.peers.get(node).is_some_and(|p| p.conn.is_some())
    }

    /// The nodes with a working connection.
    pub(super) fn up(&self) -> Vec<String> {
        self.peers
            .iter()
            .filter(|(_, p)| p.conn.is_some())
            .map(|(n, _)| n.clone())
            .collect()
    }
}

/// What the global service works with: the view, the jitter for its timers, and where
/// its effects go.
pub(super) struct Cx<'c, 'a> {
    pub(super) view: &'c View<'a>,
    pub(super) jitter: &'c mut Jitter,
    pub(super) fx: &'c mut Effects,
}

/// A small generator for timer jitter (xorshift; timing only, not secret), seeded by
/// the host.
#[derive(Debug)]
pub(super) struct Jitter(u64);

impl Jitter {
    pub(super) fn new(seed: [u8; 8]) -> Jitter {
        Jitter(u64::from_le_bytes(seed) | 1)
    }

    /// `ms` times a factor in [1, 2).
    pub(super) fn scale(&mut self, ms: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        ms * (1000 + self.0 % 1000) / 1000
    }
}
