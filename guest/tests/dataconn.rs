//! Data connections (`aemp-dataconn`) between a node and a plain transport peer that
//! plays AnyEvent::MP::DataConn: the requests it sends and expects, byte for byte where
//! the wire fixes them, the greeting of the connection that carries the stream, and what
//! kills the requesting port.

mod support;

use aemp_engine::{
    Config, ConnId, Connection, Framing, NONCE_LEN, NodeError, NodeOutput, Output, Value, Verdict,
};
use support::net::{SECRET, args, node_config, t};
use support::wire::Wire;

const PEER: usize = 0;
const EXPECT: &str = "AnyEvent::MP::DataConn::_expect";
const CONNECT: &str = "AnyEvent::MP::DataConn::_connect";

/// Node `n`, with `perl` connected: dialled by the node (it listens at `perl:1`) or
/// dialled in (then only the node listens).
fn wire(node_dials: bool, tls: bool) -> Wire {
    let mut config = node_config("n", &[]);
    config.transport.tls = tls;
    let mut w = Wire::new(config, Framing::Cbor);
    if node_dials {
        w.node.connect_addr("perl:1", w.now);
        w.dialled("perl");
    } else {
        w.connect("perl");
    }
    w
}

/// The far end of a data connection: a transport with the reference's settings.
struct DataPeer {
    raw: Connection,
    conn: ConnId,
    /// Every byte the node sent it before the hand-over.
    got: Vec<u8>,
    /// The node started TLS on this connection.
    node_tls: bool,
    outputs: Vec<Output>,
}

impl DataPeer {
    fn new(config: Config, conn: ConnId) -> DataPeer {
        DataPeer {
            raw: Connection::new(config, [42; NONCE_LEN], 0).unwrap(),
            conn,
            got: Vec::new(),
            node_tls: false,
            outputs: Vec::new(),
        }
    }

    fn handed_over(&self) -> Option<&[u8]> {
        self.outputs.iter().find_map(|o| match o {
            Output::HandedOver { leftover } => Some(&leftover[..]),
            _ => None,
        })
    }

    fn closed(&self) -> bool {
        self.outputs.iter().any(|o| matches!(o, Output::Closed(_)))
    }
}

/// The peer announces data connection `b@perl` for its port `perl#p1`, as connect_to
/// does: `_expect ID PORT TIMEOUT HANDLER ARGS...`.
fn expect(w: &mut Wire, timeout: Value, handler: &str, args: &[Value]) {
    let mut request = vec![t(EXPECT), t("b@perl"), t("perl#p1"), timeout, t(handler)];
    request.extend_from_slice(args);
    w.request(PEER, request);
}

/// The reference's transport settings for peer `perl` (`protocol` `aemp` when it
/// listens, `aemp-dataconn` with the id when it dials).
fn perl_config(secret: &[u8], tls: bool, dataconn_id: Option<&str>) -> Config {
    let mut c = Config::new("perl");
    c.secret = Some(secret.to_vec());
    c.tls = tls;
    c.greeting.push(("provider".into(), "AE-2.02".into()));
    if let Some(id) = dataconn_id {
        c.protocol = "aemp-dataconn".into();
        c.greeting.push(("dataconn_id".into(), id.into()));
    }
    c
}

/// Moves bytes between the node (and its AEMP peers) and the data peer until quiet;
/// TLS is a pass-through, as everywhere in these tests.
fn drive(w: &mut Wire, d: &mut DataPeer) {
    loop {
        w.pump();
        let mut moved = false;
        for e in std::mem::take(&mut w.events) {
            match e {
                NodeOutput::Transmit { conn, bytes } if conn == d.conn => {
                    moved = true;
                    d.got.extend_from_slice(&bytes);
                    d.raw.handle_input(&bytes);
                }
                NodeOutput::StartTls { conn, leftover, .. } if conn == d.conn => {
                    moved = true;
                    d.node_tls = true;
                    w.node.handle_input(conn, &leftover, w.now);
                }
                other => w.events.push(other),
            }
        }
        while let Some(o) = d.raw.poll_output() {
            moved = true;
            match o {
                Output::Transmit(bytes) if !d.closed() && d.handed_over().is_none() => {
                    w.node.handle_input(d.conn, &bytes, w.now)
                }
                Output::Greeting(_) => d.raw.handle_verdict(Verdict::Accept),
                Output::StartTls { leftover, .. } => d.raw.handle_input(&leftover),
                other => d.outputs.push(other),
            }
        }
        if !moved {
            return;
        }
    }
}

/// The node's `DataConnection` outputs.
fn handed(w: &Wire) -> Vec<&NodeOutput> {
    w.events
        .iter()
        .filter(|e| matches!(e, NodeOutput::DataConnection { .. }))
        .collect()
}

/// The `Connect` the node output for `addr`, taken out of the events.
fn take_connect(w: &mut Wire, addr: &str) -> ConnId {
    let at = w
        .events
        .iter()
        .position(|e| matches!(e, NodeOutput::Connect { addr: a, .. } if a == addr))
        .unwrap_or_else(|| panic!("the node dials {addr}"));
    let NodeOutput::Connect { conn, .. } = w.events.remove(at) else {
        unreachable!()
    };
    conn
}

/// A local port of the node, monitored, as an application asking for a data connection
/// holds it.
/// The node's dial to `addr`, answered by a Perl listener: the peer, and the node's first
/// greeting line.
fn dialled(w: &mut Wire, addr: &str) -> (DataPeer, String) {
    let conn = take_connect(w, addr);
    // The reference's listener greets as `aemp`, and learns the protocol from us.
    let mut d = DataPeer::new(perl_config(SECRET, false, None), conn);
    w.node.handle_connected(conn, [1; NONCE_LEN], w.now);
    drive(w, &mut d);
    let line1 = String::from_utf8_lossy(&d.got)
        .lines()
        .next()
        .unwrap()
        .to_owned();
    (d, line1)
}

fn port(w: &mut Wire) -> String {
    let port = w.node.new_port();
    w.node.monitor(&port, w.now).unwrap();
    port
}

fn name_of(port_id: &str) -> String {
    port_id.split_once('#').unwrap().1.to_owned()
}

/// The node asks `perl` for a data connection to `pkg::receiver` with `[1, "x"]`; returns
/// the id and the round-trip port the node asked `perl` to answer.
fn request(w: &mut Wire, port: &str) -> (String, String) {
    let id = w
        .node
        .data_connect(
            port,
            "perl",
            5_000,
            "pkg::receiver",
            &args(vec![Value::Int(1), t("x")]),
            w.now,
        )
        .unwrap();
    w.pump();
    let got = w.take(PEER);
    assert_eq!(got.len(), 2, "{got:?}");
    // connect_to's `snd_to_func $node, _expect => $id, $port, $timeout, $initfunc,
    // @initdata`, then `snd_on $node, $rpcport`.
    assert_eq!(
        got[0],
        Value::Array(vec![
            t(""),
            t(EXPECT),
            t(&id),
            t(port),
            Value::Int(5),
            t("pkg::receiver"),
            Value::Int(1),
            t("x"),
        ])
    );
    let Value::Array(snd) = &got[1] else {
        panic!("an array")
    };
    assert_eq!(snd[..2], [t(""), t("snd")]);
    let rpc = snd[2].as_name().unwrap().into_owned();
    assert!(rpc.starts_with("n#"), "{rpc}");
    (id, name_of(&rpc))
}

#[test]
fn the_node_asks_and_dials_a_listening_peer() {
    let mut w = wire(true, false);
    let port = port(&mut w);
    let (id, rpc) = request(&mut w, &port);
    // Ids name their node, as the reference's `++$ID . "@$NODE"`.
    assert_eq!(id, "b@n");
    assert!(w.node.poll_timeout().is_some());
    // The peer read the request; its `snd` sends the round-trip port an empty message.
    w.send(PEER, vec![t(&rpc)]);
    let (d, line1) = dialled(&mut w, "perl:1");
    let conn = d.conn;
    assert!(line1.starts_with("aemp-dataconn;1;n;"), "{line1}");
    assert!(line1.contains(";dataconn_id=b@n"), "{line1}");
    // The node protocols' pairs are for AEMP connections only.
    assert!(!line1.contains("mproto"), "{line1}");
    let session = d.outputs.iter().find_map(|o| match o {
        Output::Connected(s) => Some(s.clone()),
        _ => None,
    });
    assert_eq!(session.unwrap().protocol, "aemp-dataconn");
    assert_eq!(d.handed_over(), Some(&b""[..]));
    assert_eq!(
        handed(&w),
        [&NodeOutput::DataConnection {
            conn,
            id: id.clone(),
            node: "perl".into(),
            port: port.clone(),
            handler: "pkg::receiver".into(),
            init_args: args(vec![Value::Int(1), t("x")]),
            requested: true,
            leftover: Vec::new(),
        }]
    );
    // The connection is the host's: no close, no timer, the port lives on, and the AEMP
    // connection is untouched.
    assert!(w.closes.is_empty(), "{:?}", w.closes);
    assert_eq!(w.node.poll_timeout(), None);
    w.now += 60_000;
    w.node.handle_timeout(w.now);
    w.pump();
    assert!(
        !w.events
            .iter()
            .any(|e| matches!(e, NodeOutput::PortDown { .. })),
        "{:?}",
        w.events
    );
    assert!(w.node.is_up("perl"));
    assert_eq!(w.node.info().conns.len(), 1);
}

#[test]
fn a_peer_that_dialled_in_is_asked_to_connect() {
    let mut w = wire(false, false);
    let port = port(&mut w);
    let (id, rpc) = request(&mut w, &port);
    w.send(PEER, vec![t(&rpc)]);
    // It reached us, so we listen: `_connect ID NODE`, as connect_to sends it.
    assert_eq!(
        w.take(PEER),
        [Value::Array(vec![t(""), t(CONNECT), t(&id), t("n")])]
    );
    // The peer dials in with the id.
    let conn = w.node.handle_accept("perl:50000", [1; NONCE_LEN], w.now);
    let mut d = DataPeer::new(perl_config(SECRET, false, Some(&id)), conn);
    drive(&mut w, &mut d);
    // Bytes the peer sent right after its auth line belong to the stream.
    assert!(d.handed_over().is_some());
    let [
        NodeOutput::DataConnection {
            conn: c,
            requested: true,
            port: p,
            ..
        },
    ] = handed(&w)[..]
    else {
        panic!("one data connection: {:?}", w.events)
    };
    assert_eq!((*c, p.as_str()), (conn, port.as_str()));
}

#[test]
fn the_node_expects_a_data_connection_from_a_requesting_peer() {
    for tls in [false, true] {
        let mut w = wire(false, tls);
        w.node.register_data_handler("echo");
        // As the reference's connect_to: `_expect`, then the round trip.
        expect(&mut w, Value::Float(2.5), "echo", &[t("a"), Value::Int(2)]);
        w.request(PEER, vec![t("snd"), t("perl#rpc")]);
        assert_eq!(w.take(PEER), [Value::Array(vec![t("rpc")])]);
        // The peer dials in as `aemp-dataconn` with the id; with TLS, inside TLS.
        let conn = w.node.handle_accept("perl:50000", [1; NONCE_LEN], w.now);
        let mut d = DataPeer::new(perl_config(SECRET, tls, Some("b@perl")), conn);
        // The reference writes right after its auth line; those bytes are the stream's.
        drive(&mut w, &mut d);
        assert!(d.handed_over().is_some(), "{:?}", d.outputs);
        assert_eq!(d.node_tls, tls);
        let session = d.outputs.iter().find_map(|o| match o {
            Output::Connected(s) => Some(s.clone()),
            _ => None,
        });
        assert_eq!(session.map(|s| s.tls), Some(tls));
        let [
            NodeOutput::DataConnection {
                id,
                node,
                port,
                handler,
                init_args,
                requested,
                ..
            },
        ] = handed(&w)[..]
        else {
            panic!("one data connection: {:?}", w.events)
        };
        assert_eq!(
            (id.as_str(), node.as_str(), port.as_str(), handler.as_str()),
            ("b@perl", "perl", "perl#p1", "echo")
        );
        assert_eq!(*init_args, args(vec![t("a"), Value::Int(2)]));
        assert!(!requested);
        assert!(w.closes.is_empty(), "{:?}", w.closes);
        // Nothing was killed, and nothing times out later.
        w.now += 10_000;
        w.node.handle_timeout(w.now);
        w.pump();
        assert!(w.take(PEER).is_empty());
    }
}

#[test]
fn leftover_bytes_after_the_auth_line_are_handed_over() {
    let mut w = wire(false, false);
    w.node.register_data_handler("echo");
    expect(&mut w, Value::Int(5), "echo", &[]);
    let conn = w.node.handle_accept("perl:50000", [1; NONCE_LEN], w.now);
    let mut d = DataPeer::new(perl_config(SECRET, false, Some("b@perl")), conn);
    // Hold back the peer's auth line and send it with stream bytes behind it.
    let mut held = Vec::new();
    loop {
        w.pump();
        let mut moved = false;
        for e in std::mem::take(&mut w.events) {
            match e {
                NodeOutput::Transmit { conn: c, bytes } if c == conn => {
                    moved = true;
                    d.raw.handle_input(&bytes);
                }
                other => w.events.push(other),
            }
        }
        while let Some(o) = d.raw.poll_output() {
            moved = true;
            match o {
                Output::Transmit(bytes) if bytes.starts_with(b"hmac_sha3_512;") => held = bytes,
                Output::Transmit(bytes) => w.node.handle_input(conn, &bytes, w.now),
                Output::Greeting(_) => d.raw.handle_verdict(Verdict::Accept),
                _ => {}
            }
        }
        if !moved {
            break;
        }
    }
    assert!(!held.is_empty());
    held.extend_from_slice(b"stream bytes");
    w.node.handle_input(conn, &held, w.now);
    w.pump();
    let [NodeOutput::DataConnection { leftover, .. }] = handed(&w)[..] else {
        panic!("one data connection: {:?}", w.events)
    };
    assert_eq!(leftover, b"stream bytes");
}

#[test]
fn the_node_opens_what_a_peer_asks_with_connect() {
    let mut w = wire(true, false);
    w.node.register_data_handler("echo");
    w.request(
        PEER,
        vec![
            t(EXPECT),
            t("c@perl"),
            t("perl#p1"),
            Value::Int(5),
            t("echo"),
        ],
    );
    // Only the node that announced the id may ask: a stranger's `_connect` is ignored.
    w.request(PEER, vec![t(CONNECT), t("zz@perl"), t("perl")]);
    assert!(
        w.events
            .iter()
            .all(|e| !matches!(e, NodeOutput::Connect { .. }))
    );
    w.request(PEER, vec![t(CONNECT), t("c@perl"), t("perl")]);
    let (_, line1) = dialled(&mut w, "perl:1");
    assert!(line1.starts_with("aemp-dataconn;1;n;"), "{line1}");
    assert!(line1.contains(";dataconn_id=c@perl"), "{line1}");
    let [
        NodeOutput::DataConnection {
            requested, handler, ..
        },
    ] = handed(&w)[..]
    else {
        panic!("one data connection: {:?}", w.events)
    };
    assert_eq!((*requested, handler.as_str()), (false, "echo"));
}

#[test]
fn unknown_ids_and_other_nodes_are_refused() {
    let mut w = wire(false, false);
    w.node.register_data_handler("echo");
    expect(&mut w, Value::Int(5), "echo", &[]);
    let unknown = |w: &mut Wire, from: &str, id: &str| {
        let conn = w.node.handle_accept("x:1", [1; NONCE_LEN], w.now);
        let mut config = perl_config(SECRET, false, Some(id));
        config.node_id = from.into();
        let mut d = DataPeer::new(config, conn);
        drive(w, &mut d);
        assert!(d.handed_over().is_none());
        let reason = w
            .closes
            .iter()
            .find(|(c, _)| *c == conn)
            .map(|(_, r)| r.clone());
        reason.unwrap_or_default()
    };
    assert_eq!(
        unknown(&mut w, "perl", "x@perl"),
        "unknown or expired data connection x@perl"
    );
    // The id belongs to perl: another node cannot take it over.
    assert_eq!(
        unknown(&mut w, "mallory", "b@perl"),
        "unknown or expired data connection b@perl"
    );
    // Without an id at all.
    let conn = w.node.handle_accept("x:1", [1; NONCE_LEN], w.now);
    let mut config = perl_config(SECRET, false, None);
    config.protocol = "aemp-dataconn".into();
    let mut d = DataPeer::new(config, conn);
    drive(&mut w, &mut d);
    assert_eq!(
        w.closes.last().map(|(_, r)| r.as_str()),
        Some("aemp-dataconn greeting without dataconn_id")
    );
    // Another upgraded protocol is not spoken at all.
    let conn = w.node.handle_accept("x:1", [1; NONCE_LEN], w.now);
    let mut config = perl_config(SECRET, false, None);
    config.protocol = "aemp-other".into();
    let mut d = DataPeer::new(config, conn);
    drive(&mut w, &mut d);
    assert_eq!(
        w.closes.last().map(|(_, r)| r.as_str()),
        Some("upgraded protocol aemp-other is not supported by the node")
    );
    assert!(handed(&w).is_empty());
    // The real one still works, and only once.
    let conn = w.node.handle_accept("perl:50000", [1; NONCE_LEN], w.now);
    let mut d = DataPeer::new(perl_config(SECRET, false, Some("b@perl")), conn);
    drive(&mut w, &mut d);
    assert_eq!(handed(&w).len(), 1);
    assert_eq!(
        unknown(&mut w, "perl", "b@perl"),
        "unknown or expired data connection b@perl"
    );
}

#[test]
fn a_timeout_kills_the_requesting_port_as_the_reference_does() {
    let mut w = wire(true, false);
    let port = port(&mut w);
    let (_id, rpc) = request(&mut w, &port);
    // The peer never answers (a 2.02 node that cannot go on, say).
    let start = w.now;
    assert_eq!(w.node.poll_timeout(), Some(start + 5_000));
    w.now = start + 4_999;
    w.node.handle_timeout(w.now);
    w.pump();
    assert!(
        w.events
            .iter()
            .all(|e| !matches!(e, NodeOutput::PortDown { .. }))
    );
    w.now = start + 5_000;
    w.node.handle_timeout(w.now);
    w.pump();
    let downs: Vec<(String, Value)> = w
        .events
        .iter()
        .filter_map(|e| match e {
            NodeOutput::PortDown { port, reason } => {
                Some((port.clone(), Value::decode(reason).unwrap()))
            }
            _ => None,
        })
        .collect();
    assert_eq!(
        downs,
        [(
            port.clone(),
            Value::Array(vec![
                t("AnyEvent::MP::DataConn"),
                t("perl: unable to establish connection within 5 seconds"),
            ])
        )]
    );
    assert_eq!(w.node.poll_timeout(), None);
    // A late round trip finds nothing to do.
    w.send(PEER, vec![t(&rpc)]);
    assert!(
        w.events
            .iter()
            .all(|e| !matches!(e, NodeOutput::Connect { .. }))
    );
}

#[test]
fn a_timeout_while_connecting_closes_the_connection_too() {
    let mut w = wire(true, false);
    let port = port(&mut w);
    let (_id, rpc) = request(&mut w, &port);
    w.send(PEER, vec![t(&rpc)]);
    let conn = take_connect(&mut w, "perl:1");
    // The socket never opens.
    w.now += 5_000;
    w.node.handle_timeout(w.now);
    w.pump();
    assert!(
        w.closes.iter().any(
            |(c, r)| *c == conn && r == "perl: unable to establish connection within 5 seconds"
        )
    );
    assert_eq!(
        w.events
            .iter()
            .filter(|e| matches!(e, NodeOutput::PortDown { .. }))
            .count(),
        1
    );
}

#[test]
fn the_expecting_side_times_out_and_kills_the_remote_port() {
    let mut w = wire(false, false);
    w.node.register_data_handler("echo");
    expect(&mut w, Value::Float(2.5), "echo", &[]);
    w.now += 2_500;
    w.node.handle_timeout(w.now);
    w.pump();
    assert_eq!(
        w.take(PEER),
        [Value::Array(vec![
            t(""),
            t("kil1"),
            t("p1"),
            t("AnyEvent::MP::DataConn"),
            t("n: unable to establish connection within 2.5 seconds"),
        ])]
    );
    // Expired: the connection that comes too late is refused.
    let conn = w.node.handle_accept("perl:50000", [1; NONCE_LEN], w.now);
    let mut d = DataPeer::new(perl_config(SECRET, false, Some("b@perl")), conn);
    drive(&mut w, &mut d);
    assert!(handed(&w).is_empty());
    assert_eq!(
        w.closes.last().map(|(_, r)| r.as_str()),
        Some("unknown or expired data connection b@perl")
    );
}

#[test]
fn a_failed_handshake_kills_the_port_with_its_reason() {
    let mut w = wire(true, false);
    let port = port(&mut w);
    let (_id, rpc) = request(&mut w, &port);
    w.send(PEER, vec![t(&rpc)]);
    let conn = take_connect(&mut w, "perl:1");
    let mut d = DataPeer::new(perl_config(b"another secret", false, None), conn);
    w.node.handle_connected(conn, [1; NONCE_LEN], w.now);
    drive(&mut w, &mut d);
    let downs: Vec<Value> = w
        .events
        .iter()
        .filter_map(|e| match e {
            NodeOutput::PortDown { reason, .. } => Some(Value::decode(reason).unwrap()),
            _ => None,
        })
        .collect();
    assert_eq!(
        downs,
        [Value::Array(vec![
            t("AnyEvent::MP::DataConn"),
            t("authentication failure/shared secret mismatch"),
        ])]
    );
    // A connection refused outright says so too.
    let port2 = self::port(&mut w);
    let (_id, rpc) = request(&mut w, &port2);
    w.send(PEER, vec![t(&rpc)]);
    let conn = take_connect(&mut w, "perl:1");
    w.node
        .handle_connect_failed(conn, "Connection refused", w.now);
    w.pump();
    assert!(w.events.iter().any(|e| matches!(e,
        NodeOutput::PortDown { port, reason } if *port == port2
            && Value::decode(reason).unwrap()
                == Value::Array(vec![t("AnyEvent::MP::DataConn"), t("Connection refused")]))));
}

#[test]
fn refusals_kill_the_remote_port() {
    let mut w = wire(false, false);
    w.node.register_data_handler("echo");
    // A handler nobody registered is a name, never code: refused.
    expect(&mut w, Value::Int(5), "Some::func", &[]);
    assert_eq!(
        w.take(PEER),
        [Value::Array(vec![
            t(""),
            t("kil1"),
            t("p1"),
            t("AnyEvent::MP::DataConn"),
            t("Some::func: no such data connection handler"),
        ])]
    );
    // A malformed request is dropped with a warning and kills nothing.
    w.request(PEER, vec![t(EXPECT), t("b@perl"), t("perl#p1"), t("later")]);
    assert!(w.take(PEER).is_empty());
    assert!(w.events.iter().any(|e| matches!(e,
        NodeOutput::Log { message, .. } if message.contains("_expect without a timeout"))));
    // What a peer can make the node hold is bounded: not a 16 MiB argument.
    w.request(
        PEER,
        vec![
            t(EXPECT),
            t("big@perl"),
            t("perl#p4"),
            Value::Int(5),
            t("echo"),
            Value::Bytes(vec![0; 70_000]),
        ],
    );
    assert_eq!(
        w.take(PEER),
        [Value::Array(vec![
            t(""),
            t("kil1"),
            t("p4"),
            t("AnyEvent::MP::DataConn"),
            t("data connection request too large (70025 bytes, at most 65536)"),
        ])]
    );
    // An id in use is not taken over.
    let expect = |id: &str, port: &str| vec![t(EXPECT), t(id), t(port), Value::Int(5), t("echo")];
    w.request(PEER, expect("c@perl", "perl#p2"));
    w.request(PEER, expect("c@perl", "perl#p3"));
    assert_eq!(
        w.take(PEER),
        [Value::Array(vec![
            t(""),
            t("kil1"),
            t("p3"),
            t("AnyEvent::MP::DataConn"),
            t("data connection c@perl exists already"),
        ])]
    );
}

#[test]
fn pending_data_connections_are_bounded() {
    let mut config = node_config("n", &[]);
    config.max_data_conns = 2;
    let mut w = Wire::new(config, Framing::Cbor);
    w.node.connect_addr("perl:1", w.now);
    w.dialled("perl");
    w.node.register_data_handler("echo");
    let p = port(&mut w);
    let ask = |w: &mut Wire| {
        w.node
            .data_connect(&p, "perl", 5_000, "h", &args(vec![]), w.now)
    };
    assert!(ask(&mut w).is_ok());
    expect(&mut w, Value::Int(5), "echo", &[]);
    w.take(PEER);
    // Both ways count toward one total.
    assert_eq!(ask(&mut w), Err(NodeError::TooManyDataConns(2)));
    w.request(
        PEER,
        vec![
            t(EXPECT),
            t("c@perl"),
            t("perl#p2"),
            Value::Int(5),
            t("echo"),
        ],
    );
    assert_eq!(
        w.take(PEER),
        [Value::Array(vec![
            t(""),
            t("kil1"),
            t("p2"),
            t("AnyEvent::MP::DataConn"),
            t("too many pending data connections (2), c@perl refused"),
        ])]
    );
    // Room again once they time out (which killed `p`).
    w.now += 5_000;
    w.node.handle_timeout(w.now);
    w.pump();
    let p2 = port(&mut w);
    let again = w
        .node
        .data_connect(&p2, "perl", 5_000, "h", &args(vec![]), w.now);
    assert!(again.is_ok());
}

#[test]
fn what_data_connect_refuses() {
    let mut w = wire(true, false);
    let p = port(&mut w);
    let no_args = args(vec![]);
    let mut ask = |port: &str, node: &str, init: &[u8]| {
        w.node.data_connect(port, node, 1_000, "h", init, w.now)
    };
    assert_eq!(ask(&p, "n", &no_args), Err(NodeError::DataConnToSelf));
    assert_eq!(
        ask("perl#p", "perl", &no_args),
        Err(NodeError::InvalidPortId("perl#p".into()))
    );
    assert_eq!(
        ask("n#nosuch", "perl", &no_args),
        Err(NodeError::InvalidPortId("n#nosuch".into()))
    );
    assert!(matches!(
        ask(&p, "perl", &Value::Int(1).encode()),
        Err(NodeError::Message(_))
    ));
    // A port id names its node, as in the reference's `node_of`.
    assert!(ask(&p, "perl#somewhere", &no_args).is_ok());
}

/// Two engines back to back: `a` asks `b`, which runs handler `echo`; `a_dials` says who
/// opened their AEMP connection, and so which of them opens the data connection.
fn between_engines(a_dials: bool) {
    use support::net::Net;
    let mut net = Net::new();
    let a = net.add(node_config("a", &[]));
    let b = net.add(node_config("b", &[]));
    net.nodes[b].register_data_handler("echo");
    let now = net.now;
    if a_dials {
        net.nodes[a].connect_addr("b:4040", now);
    } else {
        net.nodes[b].connect_addr("a:4040", now);
    }
    net.run();
    assert!(net.nodes[a].is_up("b"));
    let port = net.nodes[a].new_port();
    net.nodes[a].monitor(&port, now).unwrap();
    let id = net.nodes[a]
        .data_connect(&port, "b", 5_000, "echo", &args(vec![t("file")]), now)
        .unwrap();
    net.run();
    let data = |i: usize| -> Vec<(String, String, String, Vec<u8>, bool)> {
        net.events[i]
            .iter()
            .filter_map(|e| match e {
                NodeOutput::DataConnection {
                    id,
                    node,
                    handler,
                    init_args,
                    requested,
                    ..
                } => Some((
                    id.clone(),
                    node.clone(),
                    handler.clone(),
                    init_args.clone(),
                    *requested,
                )),
                _ => None,
            })
            .collect()
    };
    let init = args(vec![t("file")]);
    assert_eq!(
        data(a),
        [(id.clone(), "b".into(), "echo".into(), init.clone(), true)]
    );
    assert_eq!(data(b), [(id, "a".into(), "echo".into(), init, false)]);
    // Nothing died, and the AEMP connection is still the only working one.
    assert!(net.port_downs(a).is_empty());
    assert!(net.nodes[a].is_up("b") && net.nodes[b].is_up("a"));
}

#[test]
fn two_engines_the_asking_one_dials() {
    between_engines(true);
}

#[test]
fn two_engines_the_asked_one_dials() {
    between_engines(false);
}
