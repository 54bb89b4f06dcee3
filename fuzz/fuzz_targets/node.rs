//! A whole node fed arbitrary messages by an authenticated peer: routing, the node port,
//! the global protocol; timers fire as the clock moves.

#![no_main]

use aemp_engine::{Framing, NodeOutput};
use aemp_fuzz::{chunks, node_with_peer};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let [mode, sizes @ ..] = data else { return };
    let (sizes, stream) = sizes.split_at(sizes.len().min(4));
    let framing = if mode & 1 != 0 {
        Framing::Json
    } else {
        Framing::Cbor
    };
    let (mut node, _peer, id) = node_with_peer(framing);
    let mut now = 0;
    for chunk in chunks(stream, sizes) {
        now += 500;
        node.handle_input(id, chunk, now);
        node.handle_timeout(now);
        while let Some(o) = node.poll_output() {
            // Dialling requests fail at once, so the node's retry paths run too.
            if let NodeOutput::Connect { conn, .. } = o {
                node.handle_connect_failed(conn, "fuzz", now);
            }
        }
    }
    node.handle_eof(id, now);
    node.handle_timeout(now + 3_600_000);
    while node.poll_output().is_some() {}
});
