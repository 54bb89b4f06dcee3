//! Node-port requests `["", TAG, ARGS...]` with every tag the node parses (and one it
//! does not), arguments made of arbitrary CBOR items, sent by an authenticated peer to a
//! node that may become global and has an application handler: the parser and every
//! handler behind it. The node must never panic.

#![no_main]

use aemp_engine::{Framing, NodeOutput, REQUEST_TAGS, Value};
use aemp_fuzz::node_with_peer;
use libfuzzer_sys::fuzz_target;

/// After the tags the node parses: one an application handles, one nobody does.
const OTHER_TAGS: [&str; 2] = ["handled", "other"];

/// The tag a fuzz byte picks.
fn pick_tag(n: u8) -> &'static str {
    let mut tags = REQUEST_TAGS.iter().chain(&OTHER_TAGS).cycle();
    tags.nth(usize::from(n)).copied().unwrap_or_default()
}

fuzz_target!(|data: &[u8]| {
    let (mut node, mut peer, id) = node_with_peer(Framing::Cbor);
    node.register_handler("handled");
    let mut now = 0;
    // Requests separated by 0xff bytes; each: a tag byte, then its arguments: the items
    // of a CBOR array, or one CBOR item, or (not CBOR) the bytes as integers.
    for request in data.split(|&b| b == 0xff) {
        let Some((tag, rest)) = request.split_first() else {
            continue;
        };
        let mut items = vec![
            Value::text(""),
            Value::text(pick_tag(*tag)),
        ];
        match Value::decode(rest) {
            Ok(Value::Array(args)) => items.extend(args),
            Ok(arg) => items.push(arg),
            Err(_) => items.extend(rest.iter().map(|&b| Value::Int(b.into()))),
        }
        if peer.send(&Value::Array(items).encode()).is_err() {
            return;
        }
        now += 100;
        node.handle_input(id, &aemp_fuzz::pump(&mut peer), now);
        node.handle_timeout(now);
        while let Some(o) = node.poll_output() {
            match o {
                NodeOutput::Connect { conn, .. } => node.handle_connect_failed(conn, "fuzz", now),
                NodeOutput::Transmit { conn, bytes } if conn == id => peer.handle_input(&bytes),
                _ => {}
            }
        }
    }
});
