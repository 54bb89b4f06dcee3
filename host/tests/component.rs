//! The built component under wasmtime: the same back-to-back handshake as the engine's
//! native tests, through the WIT interface.

use aemp_host::raw::{Instance, wit, wit_node};
use aemp_host::{ENGINE_COMPONENT, Sandbox};
use wasmtime::component::{Component, ResourceAny};

const SECRET: &[u8] = b"geheim";

/// One compiled sandbox for all tests of this file (compiling is the slow part).
fn sandbox() -> &'static Sandbox {
    static SANDBOX: std::sync::OnceLock<Sandbox> = std::sync::OnceLock::new();
    SANDBOX.get_or_init(|| Sandbox::new().unwrap())
}

/// One side: an instance with one connection in it.
struct Side {
    instance: Instance,
    conn: ResourceAny,
    events: Vec<wit::Output>,
}

impl Side {
    /// A side that asks to receive in `framing` (first in its list) and understands both.
    fn new(sandbox: &Sandbox, node: &str, framing: wit::Framing, secret: &[u8]) -> Side {
        let mut instance = sandbox.instantiate().unwrap();
        let mut config = instance.default_config(node).unwrap();
        config.secret = Some(secret.to_vec());
        let other = if framing == wit::Framing::Cbor {
            wit::Framing::Json
        } else {
            wit::Framing::Cbor
        };
        config.framings = vec![framing, other];
        let conn = instance.open(&config, 0).unwrap().unwrap();
        Side {
            instance,
            conn,
            events: Vec::new(),
        }
    }

    fn pump(&mut self) -> Vec<u8> {
        let mut out = Vec::new();
        for o in self.instance.poll_outputs(self.conn).unwrap() {
            match o {
                wit::Output::Transmit(bytes) => out.extend_from_slice(&bytes),
                wit::Output::Greeting(g) => {
                    self.events.push(wit::Output::Greeting(g));
                    self.instance
                        .handle_verdict(self.conn, wit::Verdict::Accept)
                        .unwrap();
                    out.extend(self.pump());
                }
                other => self.events.push(other),
            }
        }
        out
    }
}

fn drive(a: &mut Side, b: &mut Side) {
    loop {
        let to_b = a.pump();
        let to_a = b.pump();
        if to_a.is_empty() && to_b.is_empty() {
            return;
        }
        b.instance.handle_input(b.conn, &to_b).unwrap();
        a.instance.handle_input(a.conn, &to_a).unwrap();
    }
}

#[test]
fn component_imports_only_randomness() {
    let engine = wasmtime::Engine::default();
    let component = Component::new(&engine, ENGINE_COMPONENT).unwrap();
    let ty = component.component_type();
    let imports: Vec<String> = ty
        .imports(&engine)
        .map(|(name, _)| name.to_owned())
        .collect();
    assert_eq!(imports, ["wasi:random/random@0.2.0"]);
    let exports: Vec<String> = ty
        .exports(&engine)
        .map(|(name, _)| name.to_owned())
        .collect();
    assert_eq!(
        exports,
        ["aemp:engine/transport@0.1.0", "aemp:engine/node@0.1.0"]
    );
}

#[test]
fn handshake_and_messages_through_the_component() {
    let sandbox = sandbox();
    for (fa, fb) in [
        (wit::Framing::Cbor, wit::Framing::Json),
        (wit::Framing::Json, wit::Framing::Cbor),
    ] {
        // A sends in `fa` (B asks for it), B in `fb`.
        let mut a = Side::new(sandbox, "alpha", fb, SECRET);
        let mut b = Side::new(sandbox, "beta", fa, SECRET);
        drive(&mut a, &mut b);
        let session = a
            .events
            .iter()
            .find_map(|e| {
                if let wit::Output::Connected(s) = e {
                    Some(s.clone())
                } else {
                    None
                }
            })
            .expect("a connected");
        assert_eq!(session.remote_node, "beta");
        assert_eq!(session.send_auth, wit::AuthMethod::HmacSha3512);
        assert_eq!((session.send_framing, session.recv_framing), (fa, fb));

        // ["port", "ping", 123] both ways, in one batch each.
        let ping = b"\x83\x64port\x64ping\x18\x7b".to_vec();
        let batch = vec![ping.clone(), ping.clone(), ping.clone()];
        a.instance.send(a.conn, &batch.concat()).unwrap().unwrap();
        b.instance.send(b.conn, &ping).unwrap().unwrap();
        drive(&mut a, &mut b);
        // Messages arrive as CBOR sequences, consecutive ones together, with their sizes
        // (the same split a scan of the sequence finds).
        let received = |side: &Side| -> Vec<Vec<u8>> {
            let mut all = Vec::new();
            for e in &side.events {
                if let wit::Output::Messages(seq) = e {
                    let scanned = aemp_engine::split_sequence(&seq.data).unwrap();
                    let mut rest = &seq.data[..];
                    for (size, item) in seq.sizes.iter().zip(&scanned) {
                        let (sliced, after) = rest.split_at(*size as usize);
                        assert_eq!(sliced, *item);
                        rest = after;
                    }
                    assert_eq!((seq.sizes.len(), rest.len()), (scanned.len(), 0));
                    all.extend(scanned.into_iter().map(<[u8]>::to_vec));
                }
            }
            all
        };
        assert_eq!(received(&b), batch);
        assert_eq!(received(&a), std::slice::from_ref(&ping));

        // A bad message in a batch: the ones before it are queued, the reason is given.
        let err = a
            .instance
            .send(a.conn, &[ping.clone(), b"\x01".to_vec()].concat())
            .unwrap()
            .unwrap_err();
        assert_eq!(err.index, 1);
        assert_eq!(err.message, "message is not an array");
    }
}

#[test]
fn wrong_secret_reports_the_reference_error_text() {
    let sandbox = sandbox();
    let mut a = Side::new(sandbox, "alpha", wit::Framing::Json, SECRET);
    let mut b = Side::new(sandbox, "beta", wit::Framing::Json, b"other");
    drive(&mut a, &mut b);
    let Some(wit::Output::Closed(e)) = a.events.last() else {
        panic!("{:?}", a.events)
    };
    assert_eq!(e.kind, wit::ErrorKind::AuthFailure);
    assert_eq!(e.message, "authentication failure/shared secret mismatch");
}

#[test]
fn invalid_config_and_timeouts() {
    let sandbox = sandbox();
    let mut instance = sandbox.instantiate().unwrap();
    let config = instance.default_config("a;b").unwrap();
    let err = instance.open(&config, 0).unwrap().unwrap_err();
    assert_eq!(err.kind, wit::RefusalKind::InvalidConfig);
    assert!(err.message.starts_with("invalid node id"), "{err:?}");
    let config = instance.default_config("alpha").unwrap();
    assert_eq!(config.monitor_timeout_ms, 30_000);
    assert_eq!(config.limits.max_message_size, 16 << 20);
    let conn = instance.open(&config, 500).unwrap().unwrap();
    assert_eq!(instance.poll_timeout(conn).unwrap(), Some(30_500));
    instance.handle_timeout(conn, 30_500).unwrap();
    let outputs = instance.poll_outputs(conn).unwrap();
    let Some(wit::Output::Closed(e)) = outputs.last() else {
        panic!("{outputs:?}")
    };
    assert_eq!(e.message, "Connection timed out");
    instance.drop_connection(conn).unwrap();
}

/// Two nodes, each in its own instance, wired in memory through the `node` interface.
#[test]
fn two_nodes_through_the_component() {
    let sandbox = sandbox();
    let mut insts = [
        sandbox.instantiate().unwrap(),
        sandbox.instantiate().unwrap(),
    ];
    let mut nodes = Vec::new();
    for (inst, name) in insts.iter_mut().zip(["a", "b"]) {
        let (store, b) = inst.parts();
        let api = b.aemp_engine_node();
        let mut config = api.call_default_node_config(&mut *store, name).unwrap();
        config.transport.secret = Some(SECRET.to_vec());
        nodes.push(
            api.node()
                .call_create(&mut *store, &config, 0)
                .unwrap()
                .unwrap(),
        );
    }
    let call = |insts: &mut [Instance; 2], i: usize| -> Vec<wit_node::NodeOutput> {
        let (store, b) = insts[i].parts();
        b.aemp_engine_node()
            .node()
            .call_poll_outputs(store, nodes[i])
            .unwrap()
    };
    let port = {
        let (store, b) = insts[1].parts();
        b.aemp_engine_node()
            .node()
            .call_register_port(store, nodes[1], "inbox")
            .unwrap()
            .unwrap()
    };
    assert_eq!(port, "b#inbox");
    // a dials b; b accepts; then bytes flow until both are quiet.
    let (a_conn, b_conn) = {
        let (store, b) = insts[0].parts();
        let a_conn = b
            .aemp_engine_node()
            .node()
            .call_connect_addr(&mut *store, nodes[0], "b:1", 0)
            .unwrap();
        b.aemp_engine_node()
            .node()
            .call_handle_connected(store, nodes[0], a_conn, 0)
            .unwrap();
        let (store, b) = insts[1].parts();
        let b_conn = b
            .aemp_engine_node()
            .node()
            .call_handle_accept(store, nodes[1], "a:2", 0)
            .unwrap();
        (a_conn, b_conn)
    };
    let message = b"\x82\x64ping\x18\x7b".to_vec(); // ["ping", 123]
    let mut sent = false;
    let mut delivered = Vec::new();
    for _ in 0..20 {
        for i in 0..2 {
            for o in call(&mut insts, i) {
                match o {
                    wit_node::NodeOutput::Transmit(t) => {
                        let (other, conn) = if i == 0 { (1, b_conn) } else { (0, a_conn) };
                        let (store, b) = insts[other].parts();
                        b.aemp_engine_node()
                            .node()
                            .call_handle_input(store, nodes[other], conn, &t.bytes, 0)
                            .unwrap();
                    }
                    wit_node::NodeOutput::NodeUp(wit_node::NodeUp { node, .. })
                        if i == 0 && !sent =>
                    {
                        assert_eq!(node, "b");
                        let (store, b) = insts[0].parts();
                        let mut batch = wit_node::Batch {
                            data: Vec::new(),
                            sizes: Vec::new(),
                        };
                        for _ in 0..2 {
                            aemp_engine::batch::push(
                                &mut batch.data,
                                &mut batch.sizes,
                                &port,
                                &message,
                            );
                        }
                        b.aemp_engine_node()
                            .node()
                            .call_send(store, nodes[0], &batch, 0)
                            .unwrap()
                            .unwrap();
                        sent = true;
                    }
                    wit_node::NodeOutput::Deliver(d) => {
                        let mut rest = &d.data[..];
                        for &size in &d.sizes {
                            let (args, after) = rest.split_at(size as usize);
                            delivered.push((d.port.clone(), args.to_vec()));
                            rest = after;
                        }
                        assert!(rest.is_empty(), "a delivery's sizes cover its data");
                    }
                    _ => {}
                }
            }
        }
    }
    assert_eq!(
        delivered,
        [
            ("b#inbox".to_owned(), message.clone()),
            ("b#inbox".to_owned(), message)
        ]
    );
    // A batch whose sizes do not fit its data is refused, not taken apart wrongly.
    let (store, b) = insts[0].parts();
    let bad = wit_node::Batch {
        data: b"a#p".to_vec(),
        sizes: vec![3, 9],
    };
    let err = b
        .aemp_engine_node()
        .node()
        .call_send(store, nodes[0], &bad, 0)
        .unwrap()
        .unwrap_err();
    assert_eq!((err.index, err.kind), (0, wit::RefusalKind::Malformed));
}
