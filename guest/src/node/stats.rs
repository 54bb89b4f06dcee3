//! What a node counts about itself for its operator ([`super::Node::info`]): bytes and
//! messages each way per connection, handshakes, why connections failed and which
//! limits were hit. Nothing here changes what the node does. Peers move the counters,
//! so every addition saturates instead of overflowing.

use std::collections::BTreeMap;

use super::ConnId;
use crate::connection::Session;

/// Bytes and messages one connection moved (or all of them together).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Traffic {
    /// Bytes received from the peer (after TLS).
    pub bytes_in: u64,
    /// Bytes handed to the host for the peer (before TLS).
    pub bytes_out: u64,
    /// Messages received, keepalives not counted.
    pub messages_in: u64,
    /// Messages sent.
    pub messages_out: u64,
}

impl Traffic {
    /// Both counts added up, saturating.
    fn add(&mut self, other: &Traffic) {
        self.bytes_in = self.bytes_in.saturating_add(other.bytes_in);
        self.bytes_out = self.bytes_out.saturating_add(other.bytes_out);
        self.messages_in = self.messages_in.saturating_add(other.messages_in);
        self.messages_out = self.messages_out.saturating_add(other.messages_out);
    }
}

/// Adds `n` to a counter, saturating.
pub(super) fn bump(counter: &mut u64, n: usize) {
    *counter = counter.saturating_add(u64::try_from(n).unwrap_or(u64::MAX));
}

/// A limit of the node that was hit, counted in [`NodeInfo::limits`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Limit {
    /// An accepted connection found `max_handshakes` in their handshake.
    Handshakes,
    /// A peer's input would have taken the node past `max_buffered_bytes`.
    BudgetInput,
    /// A message would have been queued past `max_buffered_bytes`.
    BudgetMessage,
    /// A node's queue was full (`max_queue_bytes`).
    QueueFull,
    /// A message named one node more than `max_nodes`.
    TooManyNodes,
    /// A connection had more than `max_queue_bytes` waiting for room.
    PeerSlow,
    /// As a global node, a change of a node's entries did not fit its database limits
    /// (counted once per change, however many entries it ignored).
    GlobalDb,
    /// As a global node, a `g_mon1` past the monitor limits.
    GlobalMonitors,
}

impl Limit {
    /// Every limit, in the order [`NodeInfo::limits`] lists them.
    pub const ALL: [Limit; 8] = [
        Limit::Handshakes,
        Limit::BudgetInput,
        Limit::BudgetMessage,
        Limit::QueueFull,
        Limit::TooManyNodes,
        Limit::PeerSlow,
        Limit::GlobalDb,
        Limit::GlobalMonitors,
    ];

    /// Its name in [`NodeInfo`] maps and metric labels.
    pub fn name(self) -> &'static str {
        match self {
            Limit::Handshakes => "max_handshakes",
            Limit::BudgetInput => "max_buffered_bytes_input",
            Limit::BudgetMessage => "max_buffered_bytes_message",
            Limit::QueueFull => "max_queue_bytes",
            Limit::TooManyNodes => "max_nodes",
            Limit::PeerSlow => "peer_does_not_keep_up",
            Limit::GlobalDb => "global_database",
            Limit::GlobalMonitors => "global_monitors",
        }
    }
}

/// How often limits were hit.
#[derive(Debug, Default)]
pub(super) struct Hits(BTreeMap<Limit, u64>);

impl Hits {
    /// Counts a hit of `limit`.
    pub(super) fn hit(&mut self, limit: Limit) {
        bump(self.0.entry(limit).or_default(), 1);
    }

    fn get(&self, limit: Limit) -> u64 {
        self.0.get(&limit).copied().unwrap_or(0)
    }
}

/// The node's own counters.
#[derive(Debug, Default)]
pub(super) struct Counters {
    /// What connections that are gone moved (the live ones count in their [`Conn`]s).
    ///
    /// [`Conn`]: super::Conn
    pub(super) closed: Traffic,
    pub(super) handshakes: u64,
    /// Connections their transport ended, by the error's name.
    pub(super) ends: BTreeMap<&'static str, u64>,
    pub(super) limits: Hits,
}

impl Counters {
    /// Counts a hit of `limit`.
    pub(super) fn hit(&mut self, limit: Limit) {
        self.limits.hit(limit);
    }

    /// Counts a connection that its transport ended with the error named `name`.
    pub(super) fn ended(&mut self, name: &'static str) {
        bump(self.ends.entry(name).or_default(), 1);
    }

    /// A connection is gone: what it moved stays in the totals.
    pub(super) fn closed(&mut self, traffic: &Traffic) {
        self.closed.add(traffic);
    }
}

/// One connection, as [`super::Node::info`] shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnInfo {
    /// Its id (as in [`super::NodeOutput`]s).
    pub conn: ConnId,
    /// The address dialled, or the peer's address for an accepted connection.
    pub addr: String,
    /// Accepted from a listener (else dialled).
    pub incoming: bool,
    /// The remote node id, once its greeting came.
    pub remote: Option<String>,
    /// What the handshake settled, once it completed.
    pub session: Option<Session>,
    /// Whether this is its node's working connection.
    pub working: bool,
    /// What it moved.
    pub traffic: Traffic,
    /// Bytes its transport holds (what counts toward `max_buffered_bytes`).
    pub held: usize,
}

/// What a node is doing, for its operator: read-only, cheap enough to ask often.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeInfo {
    /// Every connection, by id.
    pub conns: Vec<ConnInfo>,
    /// Nodes with a working connection.
    pub nodes_up: usize,
    /// Local ports (the node port not counted).
    pub ports: usize,
    /// Whether this node acts as a global node.
    pub global: bool,
    /// Entries of the network database it holds as a global node.
    pub db_entries: usize,
    /// Bytes of those entries (as [`super::GlobalLimits`] counts them).
    pub db_bytes: usize,
    /// Bytes waiting for nodes not connected yet ([`super::Node::queued_bytes`]).
    pub queued_bytes: usize,
    /// [`super::Node::buffered_bytes`].
    pub buffered_bytes: usize,
    /// Everything every connection moved, the closed ones included.
    pub traffic: Traffic,
    /// Handshakes completed.
    pub handshakes: u64,
    /// Connections their transport ended, by the error's name ([`crate::Error::name`]):
    /// failed handshakes, broken messages, and `peer_closed` for a peer's normal close.
    /// (Connections the node or the host closed are not counted here.)
    pub ends: Vec<(&'static str, u64)>,
    /// How often each limit was hit, by [`Limit::name`], every limit listed (so that a
    /// monitoring system sees each one from zero).
    pub limits: Vec<(&'static str, u64)>,
}

impl NodeInfo {
    /// The node's figures, its connections and the global service's hits given.
    pub(super) fn new(
        counters: &Counters,
        service: Option<&Hits>,
        conns: Vec<ConnInfo>,
    ) -> NodeInfo {
        let mut traffic = counters.closed;
        for c in &conns {
            traffic.add(&c.traffic);
        }
        NodeInfo {
            nodes_up: conns.iter().filter(|c| c.working).count(),
            conns,
            ports: 0,
            global: false,
            db_entries: 0,
            db_bytes: 0,
            queued_bytes: 0,
            buffered_bytes: 0,
            traffic,
            handshakes: counters.handshakes,
            ends: counters.ends.iter().map(|(&k, &v)| (k, v)).collect(),
            limits: Limit::ALL
                .iter()
                .map(|&l| {
                    let hits = counters.limits.get(l);
                    (
                        l.name(),
                        hits.saturating_add(service.map_or(0, |s| s.get(l))),
                    )
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_saturate_and_totals_keep_closed_connections() {
        let mut counters = Counters::default();
        let mut big = Traffic {
            bytes_in: u64::MAX - 1,
            ..Traffic::default()
        };
        bump(&mut big.bytes_in, 5);
        assert_eq!(big.bytes_in, u64::MAX);
        counters.closed(&Traffic {
            messages_in: 2,
            ..Traffic::default()
        });
        counters.hit(Limit::QueueFull);
        counters.hit(Limit::QueueFull);
        counters.ended("auth_failure");
        let live = ConnInfo {
            conn: ConnId::from(1),
            addr: "a:1".into(),
            incoming: true,
            remote: None,
            session: None,
            working: false,
            traffic: Traffic {
                messages_in: 3,
                ..Traffic::default()
            },
            held: 0,
        };
        let mut service = Hits::default();
        service.hit(Limit::GlobalDb);
        let info = NodeInfo::new(&counters, Some(&service), vec![live]);
        assert_eq!(info.traffic.messages_in, 5);
        assert_eq!(info.limits.len(), Limit::ALL.len());
        assert!(info.limits.contains(&("max_queue_bytes", 2)));
        assert!(info.limits.contains(&("max_handshakes", 0)));
        assert!(info.limits.contains(&("global_database", 1)));
        assert_eq!(info.ends, vec![("auth_failure", 1)]);
        assert_eq!(info.nodes_up, 0);
    }
}
