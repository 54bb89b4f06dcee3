//! A global node fed arbitrary global-protocol requests (`g_slave`, `g_set`, `g_upd`,
//! `g_find`, `g_db_*`, `g_mon0/1`, `g_global`) by several authenticated members, which
//! come and go; timers fire as the clock moves. The node must never panic, and what it
//! holds must stay within its totals (small here, so that they are reached).

#![no_main]

use aemp_engine::{ConnId, Connection, Framing, GlobalLimits, Node, NodeConfig, NodeOutput, Value};
use aemp_fuzz::{SECRET, connect_peer, pump};
use libfuzzer_sys::fuzz_target;

const MEMBERS: usize = 4;

const LIMITS: GlobalLimits = GlobalLimits {
    max_entries_per_node: 20,
    max_bytes_per_node: 16 << 10,
    max_entries: 40,
    max_bytes: 24 << 10,
    max_monitors_per_node: 3,
    max_monitors: 6,
    max_global_nodes: 2,
    max_slaves: 3,
};

/// A name from a small set, so that members collide on families, keys and node ids.
fn name(kind: &str, i: u8) -> Value {
    Value::text(format!("{kind}{}", i % 6))
}

/// A value chosen by `i`, of up to `len` bytes.
fn value(i: u8, len: u8) -> Value {
    match i % 4 {
        0 => Value::Null,
        1 => Value::Int(i128::from(len)),
        2 => Value::Bytes(vec![i; usize::from(len) * 8]),
        _ => Value::Array(vec![Value::text("127.0.0.1:1"); usize::from(len % 8)]),
    }
}

/// A family of `n` entries chosen by `seed`.
fn family(seed: u8, n: u8) -> Value {
    Value::Map(
        (0..n % 8)
            .map(|k| {
                (
                    name("k", seed.wrapping_add(k)),
                    value(seed ^ k, seed.wrapping_mul(k)),
                )
            })
            .collect(),
    )
}

/// One request, from five bytes of input.
fn request(op: &[u8]) -> Vec<Value> {
    let [kind, a, b, c, ..] = *op else {
        return Vec::new();
    };
    let tag = |t: &str| Value::text(t);
    let mut m = vec![Value::text("")];
    m.extend(match kind % 10 {
        0 => vec![
            tag("g_slave"),
            Value::Map(vec![(name("f", a), family(b, c))]),
        ],
        1 => vec![tag("g_set"), Value::Map(vec![(name("f", a), family(b, c))])],
        2 => vec![
            tag("g_upd"),
            name("f", a),
            family(b, c),
            Value::Array(vec![name("k", c)]),
        ],
        3 => vec![tag("g_find"), name("m", a)],
        4 => vec![tag("g_db_family"), name("f", a), Value::Int(b.into())],
        5 => vec![tag("g_db_keys"), name("f", a), Value::Int(b.into())],
        6 => vec![tag("g_db_values"), name("f", a), Value::Int(b.into())],
        7 => vec![tag("g_mon1"), name("f", a)],
        8 => vec![tag("g_mon0"), name("f", a)],
        _ => vec![tag("g_global")],
    });
    m
}

fuzz_target!(|data: &[u8]| {
    let mut config = NodeConfig::new("g");
    config.transport.secret = Some(SECRET.to_vec());
    config.global_limits = LIMITS;
    let Ok(mut node) = Node::new(config, [7; 16], 0) else {
        return;
    };
    let mut members: Vec<Option<(Connection, ConnId)>> = (0..MEMBERS).map(|_| None).collect();
    let mut now = 0u64;
    for op in data.chunks(5) {
        let Some(&who) = op.first() else { break };
        let m = usize::from(who >> 4) % MEMBERS;
        now += u64::from(who & 0x0f) * 100;
        match op.get(1).map(|k| k % 16) {
            // Members come and go.
            Some(14) => {
                if let Some((_, id)) = members[m].take() {
                    node.handle_eof(id, now);
                }
            }
            Some(15) => node.handle_timeout(now),
            _ => {
                if members[m].is_none() {
                    let framing = if who & 1 == 0 {
                        Framing::Cbor
                    } else {
                        Framing::Json
                    };
                    members[m] = Some(connect_peer(&mut node, &format!("m{m}"), framing, now));
                }
                if let Some((peer, id)) = members[m].as_mut() {
                    let message = Value::Array(request(&op[1..])).encode();
                    if peer.send(&message).is_ok() {
                        let bytes = pump(peer);
                        node.handle_input(*id, &bytes, now);
                    }
                }
            }
        }
        let (entries, bytes) = node.global_db_usage();
        assert!(entries <= LIMITS.max_entries, "{entries} entries");
        assert!(bytes <= LIMITS.max_bytes, "{bytes} bytes");
        while let Some(o) = node.poll_output() {
            match o {
                // Dials fail at once, so the retry paths run too.
                NodeOutput::Connect { conn, .. } => node.handle_connect_failed(conn, "fuzz", now),
                NodeOutput::Transmit { conn, bytes } => {
                    if let Some((peer, _)) =
                        members.iter_mut().flatten().find(|(_, id)| *id == conn)
                    {
                        peer.handle_input(&bytes);
                        pump(peer);
                    }
                }
                _ => {}
            }
        }
    }
    node.handle_timeout(now + 3_600_000);
    while node.poll_output().is_some() {}
});
