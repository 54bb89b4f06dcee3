//! The memory budget: what peers can make a node (or a lone connection) hold, and what
//! happens at the limits. Plain transport peers talk to one node in memory.

mod support;

use aemp_engine::{
    ConnId, Error, Framing, Limits, NodeConfig, NodeError, NodeOutput, Output, Value,
};
use support::net::{args, node_config, t};
use support::wire::Wire;

const BUDGET: usize = 1 << 20;
const CHUNK: usize = 64 << 10;

/// A node and the plain transport peers that dial in to it (they send cbor).
fn hub(config: NodeConfig) -> Wire {
    Wire::new(config, Framing::Cbor)
}

/// The CBOR message `["inbox", BYTES]` with `len` bytes, split into the head and body.
fn big_message(len: usize) -> (Vec<u8>, Vec<u8>) {
    let mut head = vec![0x82, 0x65];
    head.extend_from_slice(b"inbox");
    head.push(0x5a);
    head.extend_from_slice(&(len as u32).to_be_bytes());
    (head, vec![b'x'; len])
}

fn budget_config(id: &str) -> NodeConfig {
    let mut config = node_config(id, &[]);
    config.max_buffered_bytes = BUDGET;
    config
}

#[test]
fn partial_messages_past_the_budget_close_only_their_connections() {
    let mut hub = hub(budget_config("n"));
    hub.node.register_port("inbox").unwrap();
    let peers: Vec<usize> = (0..5).map(|i| hub.connect(&format!("p{i}"))).collect();
    let (head, body) = big_message(400 << 10);
    // Each peer sends most of a 400 KiB message; the node never holds more than its budget.
    for &p in &peers {
        hub.feed(p, &head);
        for chunk in body[..300 << 10].chunks(CHUNK) {
            if hub.peers[p].closed.is_some() {
                break;
            }
            hub.feed(p, chunk);
            assert!(
                hub.node.buffered_bytes() <= BUDGET,
                "{}",
                hub.node.buffered_bytes()
            );
        }
    }
    let text =
        format!("node memory budget for peers ({BUDGET} bytes) exhausted, connection closed");
    assert_eq!(
        text,
        Error::NodeBudgetExhausted(BUDGET).to_string(),
        "the reason is the error's text"
    );
    let closed: Vec<usize> = peers
        .iter()
        .copied()
        .filter(|&p| hub.peers[p].closed.is_some())
        .collect();
    assert!(!closed.is_empty(), "some peer hit the budget");
    for &p in &closed {
        assert_eq!(hub.peers[p].closed.as_deref(), Some(text.as_str()));
        assert!(!hub.node.is_up(&format!("p{p}")));
    }
    // The first peer was within the budget: it finishes its message and it arrives.
    assert!(hub.peers[0].closed.is_none());
    hub.feed(0, &body[300 << 10..]);
    assert_eq!(
        hub.delivered(),
        [Value::Array(vec![Value::Bytes(body.clone())])]
    );
    // Its buffer went back down once the message was delivered.
    assert!(
        hub.node.buffered_bytes() < BUDGET / 2,
        "{}",
        hub.node.buffered_bytes()
    );
    // The node goes on: a new peer connects and is served.
    let fresh = hub.connect("fresh");
    let conn = hub.peers[fresh].conn;
    let message = Value::Array(vec![t("inbox"), t("hello")]).encode();
    hub.node.handle_input(conn, &message, 0);
    hub.pump();
    assert_eq!(
        hub.delivered().last(),
        Some(&Value::Array(vec![t("hello")]))
    );
}

#[test]
fn queues_for_nodes_that_never_connect_share_the_budget() {
    let mut hub = hub(budget_config("n"));
    let payload = args(vec![Value::Bytes(vec![1; 300 << 10])]);
    for i in 0..3 {
        hub.node
            .send(&format!("absent{i}#p"), &payload, 0)
            .unwrap_or_else(|e| panic!("message {i} refused: {e}"));
    }
    // Each queue is far below max_queue_bytes, but together they reach the budget.
    assert_eq!(
        hub.node.send("absent3#p", &payload, 0),
        Err(NodeError::BudgetExhausted(BUDGET))
    );
    assert_eq!(
        NodeError::BudgetExhausted(BUDGET).to_string(),
        format!("node memory budget for peers ({BUDGET} bytes) exhausted, message refused")
    );
    assert!(hub.node.buffered_bytes() <= BUDGET);
    // When the attempts to reach those nodes time out, the queues go and so does the
    // pressure.
    hub.node.handle_timeout(60_000);
    hub.pump();
    assert_eq!(hub.node.buffered_bytes(), 0);
    hub.node.send("absent3#p", &payload, 60_000).unwrap();
}

#[test]
fn at_the_handshake_cap_the_oldest_handshake_makes_room() {
    let mut config = node_config("n", &[]);
    config.max_handshakes = 2;
    let mut hub = hub(config);
    let silent: Vec<ConnId> = (0..2)
        .map(|i| hub.node.handle_accept(&format!("silent{i}:1"), [8; 66], 0))
        .collect();
    let newcomer = hub.node.handle_accept("newcomer:1", [8; 66], 0);
    hub.pump();
    // The oldest silent connection went, not the newcomer.
    assert_eq!(
        hub.closes,
        [(
            silent[0],
            "too many connections in their handshake (2), oldest dropped".to_owned()
        )]
    );
    // Every connection still open got its greeting.
    let greeted: Vec<ConnId> = hub
        .events
        .iter()
        .filter_map(|e| match e {
            NodeOutput::Transmit { conn, .. } => Some(*conn),
            _ => None,
        })
        .collect();
    assert!(
        greeted.contains(&newcomer) && greeted.contains(&silent[1]),
        "{greeted:?}"
    );
    // A real peer completes its handshake at the cap, and once it is authenticated it no
    // longer counts: the next newcomer pushes out a silent one, not the real peer.
    let real = hub.connect("real");
    let again = hub.node.handle_accept("another:1", [8; 66], 0);
    hub.pump();
    assert!(hub.peers[real].closed.is_none());
    assert!(hub.closes.iter().all(|(c, _)| *c != again));
    assert!(hub.node.is_up("real"));
}

/// Thousands of silent connections from the same address come and go while the table is
/// full: every peer that completes its handshake before `max_handshakes` newer ones
/// arrive gets through.
#[test]
fn a_flood_of_silent_connections_does_not_lock_peers_out() {
    const CAP: usize = 16;
    let mut config = node_config("n", &[]);
    config.max_handshakes = CAP;
    let mut hub = hub(config);
    let flood = |hub: &mut Wire, n: usize| {
        for i in 0..n {
            hub.node
                .handle_accept(&format!("127.0.0.1:{i}"), [8; 66], 0);
        }
    };
    for round in 0..50 {
        flood(&mut hub, 100);
        // The peer's greeting reaches the node while silent ones keep arriving.
        let p = hub.accept(&format!("real{round}"), "127.0.0.1:4040");
        flood(&mut hub, CAP - 1);
        hub.pump();
        assert!(hub.peers[p].closed.is_none(), "real{round} got through");
        assert!(hub.node.is_up(&format!("real{round}")));
    }
    // Never more than the cap of silent ones left open.
    let accepted = 50 * (100 + CAP - 1);
    assert!(
        accepted - hub.closes.len() <= CAP,
        "{} closed",
        hub.closes.len()
    );
}

/// Where source addresses differ, the one holding the most handshakes makes room first.
#[test]
fn the_address_holding_most_handshakes_makes_room_first() {
    let mut config = node_config("n", &[]);
    config.max_handshakes = 4;
    let mut hub = hub(config);
    let lone = hub.node.handle_accept("10.0.0.1:1", [8; 66], 0);
    let flood: Vec<ConnId> = (0..3)
        .map(|i| hub.node.handle_accept(&format!("10.0.0.2:{i}"), [8; 66], 0))
        .collect();
    hub.node.handle_accept("10.0.0.3:1", [8; 66], 0);
    hub.pump();
    let closed: Vec<ConnId> = hub.closes.iter().map(|(c, _)| *c).collect();
    assert_eq!(closed, [flood[0]], "the lone older one {lone} stays");
}

/// A connection used alone bounds what it holds too: a host that never polls cannot be
/// made to pile up received messages.
#[test]
fn a_lone_connection_is_bounded_by_twice_the_message_size() {
    let limits = Limits {
        max_message_size: 1000,
        max_depth: 16,
    };
    let mut a_config = support::config("a");
    a_config.limits = limits;
    let mut b_config = support::config("b");
    b_config.limits = limits;
    let mut pair = support::Pair::new(a_config, b_config);
    pair.drive();
    assert!(pair.connected());
    let a = &mut pair.a.conn;
    let message = Value::Array(vec![t("p"), Value::Bytes(vec![0; 900])]).encode();
    let limit = limits.max_buffered_bytes();
    let mut fed = 0;
    while !a.is_closed() {
        a.handle_input(&message);
        fed += 1;
        assert!(fed * message.len() < 2 * limit, "never closed");
    }
    assert!(a.buffered_bytes() <= limit + message.len());
    let mut messages = 0;
    let mut error = None;
    while let Some(o) = a.poll_output() {
        match o {
            Output::Message(_) => messages += 1,
            Output::Closed(e) => error = Some(e),
            _ => {}
        }
    }
    // Messages received before the limit are still delivered, then the error.
    assert_eq!(messages, fed - 1);
    assert_eq!(error, Some(Error::ConnectionBufferFull(limit)));
    assert_eq!(
        Error::ConnectionBufferFull(limit).to_string(),
        format!("peer input would need more than {limit} bytes of buffers on this connection")
    );
}

/// After a big message the connection's buffer shrinks back.
#[test]
fn buffers_shrink_after_a_big_message() {
    let mut hub = hub(node_config("n", &[]));
    hub.node.register_port("inbox").unwrap();
    let p = hub.connect("p");
    let idle = hub.node.buffered_bytes();
    let (head, body) = big_message(4 << 20);
    hub.feed(p, &head);
    for chunk in body.chunks(CHUNK) {
        hub.feed(p, chunk);
    }
    assert_eq!(hub.delivered().len(), 1);
    let after = hub.node.buffered_bytes();
    assert!(after <= idle + (64 << 10), "idle {idle}, after {after}");
}

/// The table of nodes the node keeps state for has a total: messages for more node ids
/// than it may know are refused (and the ones before are kept), however small.
#[test]
fn messages_for_too_many_nodes_are_refused() {
    let mut config = node_config("n", &[]);
    config.max_nodes = 100;
    let mut hub = hub(config);
    let tiny = args(vec![]);
    for i in 0..100 {
        hub.node.send(&format!("absent{i}#p"), &tiny, 0).unwrap();
    }
    let refused = hub.node.send("one-more#p", &tiny, 0);
    assert_eq!(
        refused,
        Err(NodeError::TooManyNodes(100, "one-more".into()))
    );
    assert_eq!(
        refused.unwrap_err().to_string(),
        "too many nodes known (100), message for one-more refused"
    );
    // A node already known still takes messages, and once the attempts to reach the
    // others give up, there is room again.
    hub.node.send("absent0#p", &tiny, 0).unwrap();
    hub.node.handle_timeout(60_000);
    hub.pump();
    hub.node.send("one-more#p", &tiny, 60_000).unwrap();
}
