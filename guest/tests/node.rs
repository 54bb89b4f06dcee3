//! Several node engines wired together in memory with a simulated clock.

mod support;

use aemp_engine::{NodeError, NodeOutput, Value};
use support::net::*;

/// A seed and three nodes slaved to it; returns (net, a, b, c).
fn three() -> (Net, usize, usize, usize) {
    let mut net = Net::new();
    net.add_seed();
    let a = net.add(node_config("a", &["seed:4040"]));
    let b = net.add(node_config("b", &["seed:4040"]));
    let c = net.add(node_config("c", &["seed:4040"]));
    net.run();
    (net, a, b, c)
}

#[test]
fn nodes_slave_to_the_seed_with_their_listeners() {
    let (net, a, _, _) = three();
    assert!(net.nodes[a].is_up("seed"));
    let (_, seed) = net.seed.as_ref().unwrap();
    let l = &seed.db["'l"];
    assert_eq!(l["a"], Value::Array(vec![t("a:4040")]));
    assert_eq!(l.len(), 3);
    // Each node announced itself with ["", "g_slave"] and then its database.
    let slaves: Vec<_> = seed
        .seen
        .iter()
        .filter(|(n, tag, _)| n == "a" && tag == "g_slave")
        .collect();
    assert_eq!(slaves.len(), 2);
}

#[test]
fn messages_between_ports_on_three_nodes_found_through_the_seed() {
    let (mut net, a, b, c) = three();
    let pb = net.nodes[b].new_port();
    let pc = net.nodes[c].register_port("inbox").unwrap();
    assert_eq!(pc, "c#inbox");
    let now = net.now;
    net.nodes[a]
        .send(&pb, &args(vec![t("hello"), Value::Int(1)]), now)
        .unwrap();
    net.nodes[a].send(&pc, &args(vec![t("hi c")]), now).unwrap();
    net.run();
    // a asked the seed for b and c, dialled their addresses and delivered the queue.
    assert!(net.nodes[a].is_up("b") && net.nodes[a].is_up("c"));
    assert_eq!(
        net.delivered(b),
        [(pb.clone(), Value::Array(vec![t("hello"), Value::Int(1)]))]
    );
    assert_eq!(
        net.delivered(c),
        [(pc.clone(), Value::Array(vec![t("hi c")]))]
    );
    // b answers a on a port of a's; the connection exists already.
    let pa = net.nodes[a].new_port();
    net.nodes[b].send(&pa, &args(vec![t("back")]), now).unwrap();
    net.run();
    assert_eq!(net.delivered(a), [(pa, Value::Array(vec![t("back")]))]);
    assert!(net.has(
        a,
        |e| matches!(e, NodeOutput::NodeUp { node, .. } if node == "b")
    ));
    // Local delivery needs no connection.
    let local = net.nodes[c].new_port();
    net.nodes[c].send(&local, &args(vec![]), now).unwrap();
    assert!(
        net.nodes[c]
            .poll_output()
            .is_some_and(|o| matches!(o, NodeOutput::Deliver(b) if b.len() == 1))
    );
}

/// Consecutive messages for one port leave in one delivery (the port named once), and a
/// message for another port starts the next: a host hands each to its port as it is.
#[test]
fn deliveries_are_grouped_by_port() {
    let mut node = aemp_engine::Node::new(node_config("n", &[]), [7; 16], 0).unwrap();
    let (p, q) = (node.new_port(), node.register_port("q").unwrap());
    for (port, n) in [(&p, 1), (&p, 2), (&q, 3), (&p, 4)] {
        node.send(port, &args(vec![Value::Int(n)]), 0).unwrap();
    }
    let mut deliveries = Vec::new();
    while let Some(o) = node.poll_output() {
        if let NodeOutput::Deliver(d) = o {
            let messages: Vec<Value> = d.messages().map(|m| Value::decode(m).unwrap()).collect();
            assert_eq!(d.data.len(), d.sizes.iter().sum::<u32>() as usize);
            deliveries.push((d.port, messages));
        }
    }
    let one = |n| Value::Array(vec![Value::Int(n)]);
    assert_eq!(
        deliveries,
        [
            (p.clone(), vec![one(1), one(2)]),
            (q, vec![one(3)]),
            (p, vec![one(4)])
        ]
    );
}

#[test]
fn relay_through_snd() {
    let (mut net, a, b, c) = three();
    let pc = net.nodes[c].register_port("inbox").unwrap();
    let now = net.now;
    net.nodes[a]
        .send(
            "b#",
            &args(vec![t("snd"), t(&pc), t("relayed"), Value::Int(7)]),
            now,
        )
        .unwrap();
    net.run();
    assert_eq!(
        net.delivered(c),
        [(pc, Value::Array(vec![t("relayed"), Value::Int(7)]))]
    );
    assert!(net.nodes[b].is_up("c"));
}

#[test]
fn a_monitor_of_a_node_port_reaches_the_node() {
    // Even when the node is not connected (or went down just before): the monitor fires
    // once it cannot be reached, instead of never.
    let mut net = Net::new();
    let a = net.add(node_config("a", &[]));
    let now = net.now;
    net.nodes[a].monitor("x#", now).unwrap();
    net.run();
    net.advance(30_000);
    assert_eq!(
        net.port_downs(a),
        [(
            "x#".into(),
            Value::Array(vec![t("transport_error"), t("x"), t("no known address")])
        )]
    );
    // Through a seed, at once: the seed knows no address for it.
    let (mut net, a, _, _) = three();
    let now = net.now;
    net.nodes[a].monitor("ghost#", now).unwrap();
    net.run();
    assert_eq!(
        net.port_downs(a),
        [(
            "ghost#".into(),
            Value::Array(vec![
                t("transport_error"),
                t("ghost"),
                t("no known address")
            ])
        )]
    );
}

#[test]
fn monitors_fire_on_kill_on_missing_ports_and_on_connection_loss() {
    let (mut net, a, b, _) = three();
    let p1 = net.nodes[b].new_port();
    let p2 = net.nodes[b].new_port();
    let now = net.now;
    net.nodes[a].monitor(&p1, now).unwrap();
    net.nodes[a].monitor(&p2, now).unwrap();
    net.nodes[a].monitor("b#missing", now).unwrap();
    net.nodes[a].monitor("b#", now).unwrap();
    net.run();
    assert_eq!(
        net.port_downs(a),
        [(
            "b#missing".into(),
            Value::Array(vec![
                t("no_such_port"),
                t("cannot monitor nonexistent port"),
                t("b#missing")
            ])
        )]
    );
    // Killed on its node with a reason: the monitor fires with that reason.
    net.nodes[b]
        .kill(&p1, &args(vec![t("die"), t("oops")]), now)
        .unwrap();
    net.run();
    assert_eq!(
        net.port_downs(a)[1],
        (p1.clone(), Value::Array(vec![t("die"), t("oops")]))
    );
    // Killed remotely (kil1) from a.
    let p3 = net.nodes[b].new_port();
    net.nodes[a].monitor(&p3, now).unwrap();
    net.nodes[a].kill(&p3, &args(vec![]), now).unwrap();
    net.run();
    assert_eq!(net.port_downs(a)[2], (p3, Value::Array(vec![])));
    // The connection to b is lost: the remaining monitors fire with transport_error.
    net.cut(b);
    let downs = net.port_downs(a);
    let reason = |p: &str| {
        downs
            .iter()
            .find(|(port, _)| port == p)
            .map(|(_, r)| r.clone())
    };
    let Some(Value::Array(r)) = reason(&p2) else {
        panic!("{downs:?}")
    };
    assert_eq!(r[..2], [t("transport_error"), t("b")]);
    assert!(
        reason("b#").is_some(),
        "a monitor on the node port fires too"
    );
    assert!(net.has(
        a,
        |e| matches!(e, NodeOutput::NodeDown { node, .. } if node == "b")
    ));
}

#[test]
fn local_monitors_and_unmonitor() {
    let mut net = Net::new();
    let a = net.add(node_config("a", &[]));
    let p = net.nodes[a].new_port();
    let now = net.now;
    net.nodes[a].monitor(&p, now).unwrap();
    net.nodes[a].monitor("a#nope", now).unwrap();
    net.nodes[a].kill(&p, &args(vec![t("bye")]), now).unwrap();
    net.run();
    assert_eq!(net.port_downs(a).len(), 2);
    assert_eq!(
        net.port_downs(a)[1],
        (p.clone(), Value::Array(vec![t("bye")]))
    );
    let q = net.nodes[a].new_port();
    net.nodes[a].monitor(&q, now).unwrap();
    net.nodes[a].unmonitor(&q, now).unwrap();
    net.nodes[a].kill(&q, &args(vec![]), now).unwrap();
    net.run();
    assert_eq!(net.port_downs(a).len(), 2);
    // Only an empty node id is invalid: a bare node id names the node port (next test).
    assert_eq!(
        net.nodes[a].send("#nohash", &args(vec![]), now),
        Err(NodeError::InvalidPortId("#nohash".into()))
    );
    assert_eq!(
        net.nodes[a].send("", &args(vec![]), now),
        Err(NodeError::InvalidPortId(String::new()))
    );
}

#[test]
fn bare_node_id_is_the_node_port() {
    let (mut net, a, b, c) = three();
    let pc = net.nodes[c].register_port("inbox").unwrap();
    let now = net.now;
    // As the reference's `snd`: no `#` means the node port, here relaying with `snd`.
    net.nodes[a]
        .send("b", &args(vec![t("snd"), t(&pc), t("bare")]), now)
        .unwrap();
    net.run();
    assert_eq!(net.delivered(c), [(pc, Value::Array(vec![t("bare")]))]);
    // A monitor of a bare node id watches that node's node port, reported as `NODE#`.
    net.nodes[a].monitor("b", now).unwrap();
    net.run();
    net.cut(b);
    let downs = net.port_downs(a);
    assert_eq!(downs.len(), 1, "{downs:?}");
    assert_eq!(downs[0].0, "b#");
}

#[test]
fn database_operations_and_monitoring() {
    let (mut net, a, b, _) = three();
    let now = net.now;
    net.nodes[b].db_mon("fam", now);
    net.run();
    net.nodes[a]
        .db_set("fam", "k1", &Value::Int(1).encode(), now)
        .unwrap();
    net.run();
    let id = net.nodes[b].db_family("fam", now);
    let keys = net.nodes[b].db_keys("fam", now);
    net.run();
    let replies: Vec<(String, Value)> = net.events[b]
        .iter()
        .filter_map(|e| match e {
            NodeOutput::DbReply { id, result } => {
                Some((id.clone(), Value::decode(result).unwrap()))
            }
            _ => None,
        })
        .collect();
    assert_eq!(
        replies,
        [
            (id, Value::Map(vec![(t("k1"), Value::Int(1))])),
            (keys, Value::Array(vec![t("k1")]))
        ]
    );
    net.nodes[a]
        .db_set("fam", "k2", &Value::Int(2).encode(), now)
        .unwrap();
    net.nodes[a]
        .db_set("fam", "k2", &Value::Int(2).encode(), now)
        .unwrap(); // unchanged: not sent
    net.nodes[a].db_del("fam", &["k1", "never"], now);
    net.run();
    let changes: Vec<(Value, Vec<String>)> = net.events[b]
        .iter()
        .filter_map(|e| match e {
            NodeOutput::DbChange { family, change } if family == "fam" => {
                Some(db_change_parts(change))
            }
            _ => None,
        })
        .collect();
    assert_eq!(
        changes,
        [
            (Value::Map(vec![]), vec![]),
            (Value::Map(vec![(t("k1"), Value::Int(1))]), vec![]),
            (Value::Map(vec![(t("k2"), Value::Int(2))]), vec![]),
            (Value::Map(vec![]), vec!["k1".to_string()]),
        ]
    );
    let (_, seed) = net.seed.as_ref().unwrap();
    assert_eq!(
        seed.seen
            .iter()
            .filter(|(_, tag, _)| tag == "g_upd")
            .count(),
        3
    );
}

#[test]
fn eval_and_unknown_requests_are_refused_unless_registered() {
    let (mut net, a, b, _) = three();
    let reply = net.nodes[b].register_port("reply").unwrap();
    net.nodes[a].register_handler("my_service");
    let now = net.now;
    net.nodes[b]
        .send(
            "a#",
            &args(vec![
                t("eval"),
                t("system 'rm -rf /'"),
                t(&reply),
                Value::Int(1),
            ]),
            now,
        )
        .unwrap();
    net.nodes[b]
        .send(
            "a#",
            &args(vec![t("Some::Function::name"), t(&reply), Value::Int(2)]),
            now,
        )
        .unwrap();
    net.nodes[b]
        .send("a#", &args(vec![t("my_service"), Value::Int(3)]), now)
        .unwrap();
    net.run();
    assert_eq!(
        net.delivered(b),
        [(
            reply,
            Value::Array(vec![Value::Int(1), t("remote execution not allowed")])
        )]
    );
    let logs: Vec<&String> = net.events[a]
        .iter()
        .filter_map(|e| match e {
            NodeOutput::Log { message, .. }
                if message.starts_with("remote execution not allowed") =>
            {
                Some(message)
            }
            _ => None,
        })
        .collect();
    assert_eq!(logs.len(), 2, "{logs:?}");
    assert!(net.has(a, |e| matches!(e, NodeOutput::Request { tag, message }
        if tag == "my_service" && request_parts(message) == ("b".into(), Value::Array(vec![Value::Int(3)])))));
}

#[test]
fn queue_limit_for_a_node_that_is_not_connected() {
    let mut net = Net::new();
    let mut config = node_config("a", &["seed:4040"]); // the seed never answers
    config.max_queue_bytes = 100;
    let a = net.add(config);
    net.run();
    let now = net.now;
    let chunk = args(vec![Value::Bytes(vec![0; 30])]);
    let mut sent = 0;
    let err = loop {
        match net.nodes[a].send("x#p", &chunk, now) {
            Ok(()) => sent += 1,
            Err(e) => break e,
        }
    };
    assert_eq!(sent, 2);
    assert_eq!(err, NodeError::QueueFull("x".into()));
    assert_eq!(err.to_string(), "queue for node x is full");
    // Both messages wait, within the queue's limit.
    let queued = net.nodes[a].queued_bytes();
    assert!((2 * chunk.len()..=100).contains(&queued), "{queued}");
    // After the connect timeout the queue is dropped, and monitors learn why.
    net.nodes[a].monitor("x#p", now).unwrap();
    net.advance(31_000);
    assert_eq!(net.nodes[a].queued_bytes(), 0);
    let downs = net.port_downs(a);
    assert_eq!(
        downs,
        [(
            "x#p".into(),
            Value::Array(vec![t("transport_error"), t("x"), t("connect timeout")])
        )]
    );
    assert!(
        net.nodes[a].send("x#p", &chunk, net.now).is_ok(),
        "room again"
    );
}

#[test]
fn without_seeds_an_unknown_node_has_no_known_address() {
    let mut net = Net::new();
    let a = net.add(node_config("a", &[]));
    let now = net.now;
    net.nodes[a].monitor("x#p", now).unwrap();
    net.run();
    // Nobody to ask, but x might still connect to us: a waits until the deadline.
    assert!(net.port_downs(a).is_empty());
    net.advance(30_000);
    assert_eq!(
        net.port_downs(a),
        [(
            "x#p".into(),
            Value::Array(vec![t("transport_error"), t("x"), t("no known address")])
        )]
    );
}

#[test]
fn a_message_sent_while_the_peer_is_dialling_in_is_not_lost() {
    let mut net = Net::new();
    let a = net.add(node_config("a", &[]));
    let b = net.add(node_config("b", &[]));
    let pb = net.nodes[b].new_port();
    let now = net.now;
    // b dials a; before that handshake completes, a sends to b.
    net.nodes[b].connect_addr("a:4040", now);
    net.nodes[a]
        .send(&pb, &args(vec![t("early")]), now)
        .unwrap();
    net.run();
    assert_eq!(net.delivered(b), [(pb, Value::Array(vec![t("early")]))]);
}

#[test]
fn connection_switching_and_already_connected() {
    let mut net = Net::new();
    let a = net.add(node_config("a", &[]));
    let b = net.add(node_config("b", &[]));
    let now = net.now;
    // Both dial at once: both handshakes pass the greeting, the later one wins.
    net.nodes[a].connect_addr("b:4040", now);
    net.nodes[b].connect_addr("a:4040", now);
    net.run();
    assert!(net.nodes[a].is_up("b") && net.nodes[b].is_up("a"));
    let switched = |i: usize| {
        net.has(i, |e| matches!(e, NodeOutput::NodeDown { reason, .. } if reason == "switched connections"))
    };
    assert!(switched(a) || switched(b));
    let pb = net.nodes[b].new_port();
    net.nodes[a]
        .send(&pb, &args(vec![t("still works")]), now)
        .unwrap();
    net.run();
    assert_eq!(net.delivered(b).len(), 1);
    // A third connection is refused during the greeting.
    net.nodes[a].connect_addr("b:4040", now);
    net.run();
    assert!(net.has(a, |e| matches!(e, NodeOutput::Close { reason, .. } if reason == "b already connected, not connecting again.")));
    assert!(net.nodes[a].is_up("b"));
}

#[test]
fn seeds_are_retried_with_backoff_and_a_new_master_is_chosen() {
    let mut net = Net::new();
    let seed = net.add_seed();
    net.unreachable.push(seed);
    let a = net.add(node_config("a", &["seed:4040"]));
    net.run();
    let attempts = |net: &Net| {
        net.events[a]
            .iter()
            .filter(|e| matches!(e, NodeOutput::Close { .. }))
            .count()
    };
    assert!(!net.nodes[a].is_up("seed"));
    // Retries come at growing intervals: each gap doubles the one before.
    let mut retries = Vec::new();
    for _ in 0..100 {
        net.advance(100);
        let next = net.nodes[a].poll_timeout().unwrap();
        if retries.last() != Some(&next) {
            retries.push(next);
        }
    }
    let gaps: Vec<u64> = retries.windows(2).map(|w| w[1] - w[0]).collect();
    assert!(gaps.len() >= 2, "{retries:?}");
    assert!(gaps.windows(2).all(|g| g[1] == 2 * g[0]), "{gaps:?}");
    net.unreachable.clear();
    net.advance(30_000);
    assert!(net.nodes[a].is_up("seed"));
    assert_eq!(attempts(&net), 0, "refused connects never had a transport");
    // The master goes away and comes back: a slaves again.
    net.cut(seed);
    net.advance(60_000);
    assert!(net.nodes[a].is_up("seed"));
    let (_, s) = net.seed.as_ref().unwrap();
    assert!(
        s.seen
            .iter()
            .filter(|(n, tag, args)| n == "a" && tag == "g_slave" && *args != Value::Array(vec![]))
            .count()
            >= 2
    );
}

#[test]
fn consecutive_messages_to_one_node_leave_as_one_transmit() {
    let (mut net, a, b, _) = three();
    let pb = net.nodes[b].new_port();
    let now = net.now;
    net.nodes[a]
        .send(&pb, &args(vec![t("hello")]), now)
        .unwrap();
    net.run();
    assert!(net.nodes[a].is_up("b"));
    let name = pb.split_once('#').unwrap().1;
    let mut expected = Vec::new();
    for i in 0..100 {
        let message = args(vec![t("m"), Value::Int(i)]);
        net.nodes[a].send(&pb, &message, now).unwrap();
        Value::Array(vec![t(name), t("m"), Value::Int(i)]).encode_into(&mut expected);
    }
    // One output holds them all, encoded in order.
    let outputs: Vec<NodeOutput> = std::iter::from_fn(|| net.nodes[a].poll_output()).collect();
    let [NodeOutput::Transmit { bytes, .. }] = &outputs[..] else {
        panic!("expected one transmit, got {outputs:?}");
    };
    assert_eq!(bytes, &expected);
}

/// Messages sent in a run, to ports of several nodes, leave in the order sent: one
/// transmit per run of messages to one connection.
#[test]
fn a_run_of_sends_to_several_nodes_keeps_its_order() {
    let (mut net, a, b, c) = three();
    let (pb, pb2) = (net.nodes[b].new_port(), net.nodes[b].new_port());
    let pc = net.nodes[c].new_port();
    let now = net.now;
    // Connect first, so the run below goes straight out.
    net.nodes[a].send(&pb, &args(vec![]), now).unwrap();
    net.nodes[a].send(&pc, &args(vec![]), now).unwrap();
    net.run();
    assert!(net.nodes[a].is_up("b") && net.nodes[a].is_up("c"));
    for i in [b, c] {
        net.events[i].clear();
    }
    let to = [(&pb, 1), (&pb2, 2), (&pc, 3), (&pb, 4), (&pc, 5), (&pc, 6)];
    for (port, n) in to {
        net.nodes[a]
            .send(port, &args(vec![Value::Int(n)]), now)
            .unwrap();
    }
    let mut outputs = Vec::new();
    while let Some(o) = net.nodes[a].poll_output() {
        outputs.push(o);
    }
    let conns: Vec<_> = outputs
        .iter()
        .map(|o| match o {
            NodeOutput::Transmit { conn, .. } => *conn,
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    // b, c, b, c: four transmits, the two to one node on one connection.
    assert_eq!(conns.len(), 4);
    assert_eq!((conns[0], conns[1]), (conns[2], conns[3]));
    assert_ne!(conns[0], conns[1]);
    for o in outputs {
        net.apply(a, o);
    }
    net.run();
    let one = |port: &String, n| (port.clone(), Value::Array(vec![Value::Int(n)]));
    assert_eq!(net.delivered(b), [one(&pb, 1), one(&pb2, 2), one(&pb, 4)]);
    assert_eq!(net.delivered(c), [one(&pc, 3), one(&pc, 5), one(&pc, 6)]);
}

/// Consecutive deliveries share one batch, built as they arrive; anything else the node
/// says between them starts a new one, so the order of outputs stays.
#[test]
fn deliveries_coalesce_into_one_batch_in_order() {
    let (mut net, a, b, _) = three();
    let (p1, p2) = (net.nodes[b].new_port(), net.nodes[b].new_port());
    let now = net.now;
    net.nodes[a].send(&p1, &args(vec![]), now).unwrap();
    net.run();
    net.events[b].clear();
    let gone = format!("{}x", net.nodes[b].new_port());
    for (port, n) in [(&p1, 1), (&p2, 2), (&gone, 3), (&p1, 4)] {
        net.nodes[a]
            .send(port, &args(vec![Value::Int(n)]), now)
            .unwrap();
    }
    net.run();
    let deliveries: Vec<(String, Vec<Value>)> = net.events[b]
        .iter()
        .filter_map(|o| match o {
            NodeOutput::Deliver(d) => Some((
                d.port.clone(),
                d.messages()
                    .map(|args| Value::decode(args).unwrap())
                    .collect(),
            )),
            _ => None,
        })
        .collect();
    let one = |port: &String, n| (port.clone(), vec![Value::Array(vec![Value::Int(n)])]);
    // One delivery per run of messages for one port.
    assert_eq!(deliveries, [one(&p1, 1), one(&p2, 2), one(&p1, 4)]);
    // The message for the missing port was logged between p2's and p1's deliveries.
    let kinds: Vec<_> = net.events[b]
        .iter()
        .filter_map(|o| match o {
            NodeOutput::Deliver(_) => Some("deliver"),
            NodeOutput::Log { message, .. } if message.contains("nonexistent port") => Some("log"),
            _ => None,
        })
        .collect();
    assert_eq!(kinds, ["deliver", "deliver", "log", "deliver"]);
}

/// The node remembers the connection of the last node it sent to; losing it and
/// connecting again must not leave messages on the old one.
#[test]
fn a_message_after_reconnecting_takes_the_new_connection() {
    let (mut net, a, b, _) = three();
    let pb = net.nodes[b].new_port();
    let now = net.now;
    net.nodes[a]
        .send(&pb, &args(vec![Value::Int(1)]), now)
        .unwrap();
    net.run();
    net.cut(a);
    assert!(!net.nodes[a].is_up("b"));
    net.nodes[a]
        .send(&pb, &args(vec![Value::Int(2)]), now)
        .unwrap();
    net.run();
    assert!(net.nodes[a].is_up("b"));
    net.nodes[a]
        .send(&pb, &args(vec![Value::Int(3)]), now)
        .unwrap();
    net.run();
    let got: Vec<_> = net.delivered(b).into_iter().map(|(_, v)| v).collect();
    let one = |n| Value::Array(vec![Value::Int(n)]);
    assert_eq!(got, [one(1), one(2), one(3)]);
}
