//! What a node sends on the node port, decoded from the wire by a plain transport peer
//! and checked against the shapes real AnyEvent::MP 2.x nodes send and expect.

mod support;

use aemp_engine::{Framing, LogLevel, NodeOutput, Value};
use support::net::{args, node_config, t};
use support::wire::Wire;

/// The raw transport peer `peer` (it speaks json), the only one.
const PEER: usize = 0;

/// Node `n` connected to `peer` at `peer:1`: with `as_seed`, the node dials the peer as
/// its seed; otherwise the peer dials in.
fn wire(as_seed: bool) -> Wire {
    let seeds: &[&str] = if as_seed { &["peer:1"] } else { &[] };
    let mut config = node_config("n", seeds);
    config.wall_clock_offset_ms = 1_700_000_000_000;
    let mut wire = Wire::new(config, Framing::Json);
    if as_seed {
        wire.dialled("peer");
    } else {
        wire.connect("peer");
    }
    wire
}

fn m(items: Vec<Value>) -> Value {
    Value::Array(items)
}

#[test]
fn monitor_requests_and_answers() {
    let mut w = wire(false);
    w.send(PEER, vec![t(""), t("mon1"), t("nope")]);
    assert_eq!(
        w.take(PEER),
        [m(vec![
            t(""),
            t("kil0"),
            t("nope"),
            t("no_such_port"),
            t("cannot monitor nonexistent port"),
            t("n#nope")
        ])]
    );
    let port = w.node.register_port("svc").unwrap();
    w.send(PEER, vec![t(""), t("mon1"), t("svc")]);
    assert!(w.take(PEER).is_empty());
    w.node
        .kill(&port, &args(vec![t("bye"), Value::Int(1)]), 0)
        .unwrap();
    w.pump();
    assert_eq!(
        w.take(PEER),
        [m(vec![t(""), t("kil0"), t("svc"), t("bye"), Value::Int(1)])]
    );

    // The node monitoring the peer's port, then the peer reporting its death.
    w.node.monitor("peer#p", 0).unwrap();
    w.node.monitor("peer#p", 0).unwrap();
    w.pump();
    assert_eq!(
        w.take(PEER),
        [m(vec![t(""), t("mon1"), t("p")])],
        "mon1 once per port"
    );
    w.node.unmonitor("peer#p", 0).unwrap();
    w.node.unmonitor("peer#p", 0).unwrap();
    w.pump();
    assert_eq!(w.take(PEER), [m(vec![t(""), t("mon0"), t("p")])]);
    w.node.monitor("peer#q", 0).unwrap();
    w.pump();
    w.take(PEER);
    w.send(PEER, vec![t(""), t("kil0"), t("q"), t("die"), t("reason")]);
    assert!(
        w.events
            .iter()
            .any(|e| matches!(e, NodeOutput::PortDown { port, reason }
        if port == "peer#q" && Value::decode(reason).unwrap() == m(vec![t("die"), t("reason")])))
    );
    w.node.kill("peer#r", &args(vec![t("x")]), 0).unwrap();
    w.pump();
    assert_eq!(w.take(PEER), [m(vec![t(""), t("kil1"), t("r"), t("x")])]);
}

#[test]
fn can_time_snd_and_refusals() {
    let mut w = wire(false);
    w.now = 2_500;
    w.send(
        PEER,
        vec![t(""), t("can"), t("mon1"), t("peer#r"), Value::Int(5)],
    );
    w.send(PEER, vec![t(""), t("can"), t("eval"), t("peer#r")]);
    w.send(PEER, vec![t(""), t("time"), t("peer#r"), t("x")]);
    w.send(PEER, vec![t(""), t("eval"), t("1"), t("peer#r"), t("id")]);
    w.send(PEER, vec![t(""), t("snd"), t("peer#back"), t("relayed")]);
    // Names may arrive as byte strings (Perl's default for strings).
    w.send(
        PEER,
        vec![
            Value::Bytes(vec![]),
            Value::Bytes(b"can".to_vec()),
            Value::Bytes(b"snd".to_vec()),
            Value::Bytes(b"peer#r".to_vec()),
        ],
    );
    w.send(PEER, vec![t(""), t("time")]); // no reply port: nothing, and no panic
    w.send(PEER, vec![t(""), t("can")]);
    w.send(PEER, vec![t(""), Value::Int(3)]);
    assert_eq!(
        w.take(PEER),
        [
            m(vec![t("r"), Value::Int(5), Value::Bool(true)]),
            m(vec![t("r"), Value::Bool(false)]),
            m(vec![t("r"), t("x"), Value::Float(1_700_000_002.5)]),
            m(vec![t("r"), t("id"), t("remote execution not allowed")]),
            m(vec![t("back"), t("relayed")]),
            m(vec![t("r"), Value::Bool(true)]),
        ]
    );
}

#[test]
fn global_protocol_messages_to_the_master() {
    let mut w = wire(true);
    let mut l = Value::Map(vec![(t("n"), m(vec![t("n:4040")]))]);
    assert_eq!(
        w.take(PEER),
        [
            m(vec![t(""), t("g_slave")]),
            m(vec![
                t(""),
                t("g_slave"),
                Value::Map(vec![(t("'l"), l.clone())])
            ])
        ]
    );
    w.node.send("x#p", &args(vec![t("queued")]), 0).unwrap();
    w.pump();
    assert_eq!(w.take(PEER), [m(vec![t(""), t("g_find"), t("x")])]);
    w.send(
        PEER,
        vec![t(""), t("g_found"), t("x"), m(vec![t("x1:1"), t("x2:2")])],
    );
    let dials: Vec<String> = w
        .events
        .iter()
        .filter_map(|e| {
            if let NodeOutput::Connect { addr, .. } = e {
                Some(addr.clone())
            } else {
                None
            }
        })
        .collect();
    assert_eq!(
        dials,
        ["x1:1"],
        "the second address follows after connect_interval"
    );
    w.node.handle_timeout(2_000);
    w.pump();
    assert!(
        w.events
            .iter()
            .any(|e| matches!(e, NodeOutput::Connect { addr, .. } if addr == "x2:2"))
    );

    w.node
        .db_set("fam", "k", &Value::Int(1).encode(), 0)
        .unwrap();
    w.node.db_del("fam", &["k"], 0);
    let id = w.node.db_family("fam", 0);
    assert_eq!(id, "b");
    w.node.db_keys("fam", 0);
    w.node.db_values("fam", 0);
    w.node.db_mon("fam", 0);
    w.pump();
    assert_eq!(
        w.take(PEER),
        [
            m(vec![
                t(""),
                t("g_upd"),
                t("fam"),
                Value::Map(vec![(t("k"), Value::Int(1))])
            ]),
            m(vec![
                t(""),
                t("g_upd"),
                t("fam"),
                Value::Null,
                m(vec![t("k")])
            ]),
            m(vec![t(""), t("g_db_family"), t("fam"), t("b")]),
            m(vec![t(""), t("g_db_keys"), t("fam"), t("c")]),
            m(vec![t(""), t("g_db_values"), t("fam"), t("d")]),
            m(vec![t(""), t("g_mon1"), t("fam")]),
        ]
    );
    w.send(PEER, vec![t(""), t("g_reply"), t("b"), Value::Map(vec![])]);
    w.send(PEER, vec![t(""), t("g_chg1"), t("fam"), Value::Null]);
    w.send(
        PEER,
        vec![
            t(""),
            t("g_chg2"),
            t("fam"),
            Value::Map(vec![(t("a"), Value::Int(2))]),
            m(vec![]),
        ],
    );
    assert!(
        w.events
            .iter()
            .any(|e| matches!(e, NodeOutput::DbReply { id, .. } if id == "b"))
    );
    let changes = w
        .events
        .iter()
        .filter(|e| matches!(e, NodeOutput::DbChange { .. }))
        .count();
    assert_eq!(changes, 2);
    w.node.db_unmon("fam", 0);
    w.node.set_binds(vec!["n:5000".into()], 0);
    w.pump();
    l = Value::Map(vec![(t("n"), m(vec![t("n:5000")]))]);
    let Value::Map(l) = l else { unreachable!() };
    assert_eq!(
        w.take(PEER),
        [
            m(vec![t(""), t("g_mon0"), t("fam")]),
            m(vec![t(""), t("g_upd"), t("'l"), Value::Map(l)])
        ]
    );
}

mod arbitrary_requests {
    use super::*;
    use proptest::prelude::*;

    const TAGS: &[&str] = &[
        "", "mon0", "mon1", "kil0", "kil1", "snd", "can", "time", "devnull", "eval", "g_global",
        "g_reply", "g_found", "g_chg1", "g_chg2", "g_slave", "other",
    ];

    fn value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(|i| Value::Int(i.into())),
            "[a-z#:]{0,6}".prop_map(Value::Text),
            proptest::collection::vec(any::<u8>(), 0..6).prop_map(Value::Bytes),
            Just(t("peer#r")),
            Just(t("fam")),
        ];
        leaf.prop_recursive(3, 16, 4, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                // The peer speaks json: map keys are strings.
                proptest::collection::vec(("[a-z]{0,4}".prop_map(Value::Text), inner), 0..3)
                    .prop_map(Value::Map),
            ]
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// Whatever a peer puts after a known tag, the node neither panics nor stops
        /// answering.
        #[test]
        fn node_port_survives_any_arguments(
            requests in proptest::collection::vec(
                (proptest::sample::select(TAGS), proptest::collection::vec(value(), 0..5)), 1..12),
        ) {
            let mut w = wire(true);
            w.node.db_mon("fam", 0);
            for (tag, args) in requests {
                let mut items = vec![t(""), t(tag)];
                items.extend(args);
                w.send(PEER, items);
            }
            w.take(PEER);
            w.send(PEER, vec![t(""), t("can"), t("snd"), t("peer#ok")]);
            let got = w.take(PEER);
            prop_assert_eq!(got.last(), Some(&m(vec![t("ok"), Value::Bool(true)])));
        }
    }
}

/// Peer text in log lines is escaped, and junk requests from one peer log a bounded
/// number of warnings per minute.
#[test]
fn peer_text_in_logs_is_escaped_and_rate_limited() {
    let mut w = wire(false);
    let warnings = |w: &mut Wire| -> Vec<String> {
        std::mem::take(&mut w.events)
            .into_iter()
            .filter_map(|e| match e {
                NodeOutput::Log {
                    level: LogLevel::Warn,
                    message,
                } => Some(message),
                _ => None,
            })
            .collect()
    };
    w.send(
        PEER,
        vec![t(""), t("junk\n2026-11-26 WARN forged line\u{1b}[2J")],
    );
    let logged = warnings(&mut w);
    assert_eq!(
        logged,
        [
            "remote execution not allowed: request 'junk\\n2026-11-26 WARN forged line\\u{1b}[2J' from peer dropped"
        ]
    );
    for _ in 0..100 {
        w.send(PEER, vec![t(""), t("junk")]);
    }
    let logged = warnings(&mut w);
    assert_eq!(logged.len(), 10, "{logged:?}");
    assert_eq!(
        logged.last().map(String::as_str),
        Some("more warnings about requests from peer suppressed for up to 60 s")
    );
    // A minute later the peer has a fresh budget.
    w.now += 60_000;
    w.node.handle_timeout(w.now);
    w.send(PEER, vec![t(""), t("junk")]);
    assert_eq!(warnings(&mut w).len(), 1);
}

/// A node's monitors of our ports go with its connection: nothing is kept (or sent) for
/// them once it is down, however many node ids come and go.
#[test]
fn remote_monitors_go_with_their_node() {
    let mut w = wire(false);
    let port = w.node.register_port("svc").unwrap();
    w.send(PEER, vec![t(""), t("mon1"), t("svc")]);
    w.drop_peer(PEER);
    let again = w.connect("peer");
    w.node.kill(&port, &args(vec![t("bye")]), 0).unwrap();
    w.pump();
    assert!(
        w.take(again).is_empty(),
        "no kil0 for a monitor of a gone connection"
    );
}
