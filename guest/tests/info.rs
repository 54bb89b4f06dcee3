//! `Node::info`: what a node reports about its connections and counters, with nodes
//! wired together in memory.

mod support;

use aemp_engine::{AuthMethod, Framing, Value};
use support::net::*;

#[test]
fn info_counts_each_connections_traffic_and_keeps_closed_ones_in_the_totals() {
    let mut net = Net::new();
    net.add_seed();
    let a = net.add(node_config("a", &["seed:4040"]));
    let b = net.add(node_config("b", &["seed:4040"]));
    net.run();
    let pb = net.nodes[b].register_port("inbox").unwrap();
    let before = net.nodes[b].info();
    let now = net.now;
    for i in 0..3 {
        net.nodes[a]
            .send(&pb, &args(vec![t("hello"), Value::Int(i)]), now)
            .unwrap();
    }
    net.run();
    assert_eq!(net.delivered(b).len(), 3);

    let info = net.nodes[b].info();
    assert_eq!(info.ports, 1);
    assert!(!info.global);
    assert_eq!(info.nodes_up, 2, "{info:?}");
    let from_a = info
        .conns
        .iter()
        .find(|c| c.remote.as_deref() == Some("a"))
        .expect("a's connection");
    assert!(from_a.working);
    let session = from_a.session.as_ref().expect("handshake completed");
    assert_eq!(session.send_auth, AuthMethod::HmacSha3_512);
    assert_eq!(session.send_framing, Framing::Cbor);
    // Exactly the three messages came in on it (keepalives and the handshake are not
    // messages), and their bytes.
    assert_eq!(from_a.traffic.messages_in, 3, "{from_a:?}");
    assert!(from_a.traffic.bytes_in > 3 * 8, "{from_a:?}");
    assert_eq!(
        info.traffic.messages_in - before.traffic.messages_in,
        3,
        "{info:?}"
    );
    // And a sent them on its connection to b.
    let a_info = net.nodes[a].info();
    let to_b = a_info
        .conns
        .iter()
        .find(|c| c.remote.as_deref() == Some("b"))
        .expect("the connection to b");
    assert_eq!(to_b.traffic.messages_out, 3, "{to_b:?}");
    assert_ne!(
        to_b.incoming, from_a.incoming,
        "one side dialled, the other accepted"
    );
    assert!(a_info.handshakes >= 2);

    // The connection goes; what it moved stays in the totals.
    let total = net.nodes[b].info().traffic;
    net.kill_node(a);
    net.run();
    let after = net.nodes[b].info();
    assert!(after.conns.iter().all(|c| c.remote.as_deref() != Some("a")));
    assert!(after.traffic.messages_in >= total.messages_in, "{after:?}");
    assert!(after.traffic.bytes_in >= total.bytes_in, "{after:?}");
}

#[test]
fn info_counts_limits_hit() {
    let mut net = Net::new();
    let mut config = node_config("a", &[]);
    config.max_queue_bytes = 64;
    let a = net.add(config);
    let now = net.now;
    let big = args(vec![Value::Bytes(vec![0; 100])]);
    assert!(net.nodes[a].send("ghost#p", &big, now).is_err());
    assert!(net.nodes[a].send("ghost#p", &big, now).is_err());
    let info = net.nodes[a].info();
    assert!(
        info.limits.contains(&("max_queue_bytes", 2)),
        "{:?}",
        info.limits
    );
    assert!(
        info.limits.contains(&("max_handshakes", 0)),
        "{:?}",
        info.limits
    );
}
