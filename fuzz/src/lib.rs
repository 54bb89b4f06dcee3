//! What the fuzz targets share: engines wired back to back in memory (as in the engine's
//! own tests), so a target can start from a completed handshake.

use aemp_engine::{Config, Connection, Framing, Node, NodeConfig, NodeOutput, Output, Verdict};

pub const SECRET: &[u8] = b"fuzz secret";

/// A configuration with the shared secret, asking to be sent `framing` (and
/// understanding the other one too).
pub fn config(node: &str, framing: Framing) -> Config {
    let mut c = Config::new(node);
    c.secret = Some(SECRET.to_vec());
    c.framings = vec![framing, other(framing)];
    c
}

fn other(framing: Framing) -> Framing {
    match framing {
        Framing::Json => Framing::Cbor,
        Framing::Cbor => Framing::Json,
    }
}

/// Drains `conn`'s outputs: accepts greetings, returns what it transmits.
pub fn pump(conn: &mut Connection) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(o) = conn.poll_output() {
        match o {
            Output::Transmit(bytes) => out.extend_from_slice(&bytes),
            Output::Greeting(_) => conn.handle_verdict(Verdict::Accept),
            _ => {}
        }
    }
    out
}

/// Two connections after a completed handshake, each asking to be sent its framing.
pub fn connected(local_framing: Framing, remote_framing: Framing) -> (Connection, Connection) {
    let mut local = Connection::new(config("local", local_framing), [1; 66], 0).expect("config");
    let mut remote = Connection::new(config("remote", remote_framing), [2; 66], 0).expect("config");
    loop {
        let to_remote = pump(&mut local);
        let to_local = pump(&mut remote);
        if to_remote.is_empty() && to_local.is_empty() {
            break;
        }
        remote.handle_input(&to_remote);
        local.handle_input(&to_local);
    }
    assert!(local.session().is_some() && remote.session().is_some());
    (local, remote)
}

/// A node with a plain transport peer `peer` connected to it, both drained.
pub fn node_with_peer(peer_framing: Framing) -> (Node, Connection, aemp_engine::ConnId) {
    let mut config = NodeConfig::new("n");
    config.transport.secret = Some(SECRET.to_vec());
    let mut node = Node::new(config, [7; 16], 0).expect("config");
    let _ = node.register_port("inbox");
    let (peer, id) = connect_peer(&mut node, "peer", peer_framing, 0);
    (node, peer, id)
}

/// A plain transport peer `name` dials in to `node` and completes its handshake (unless
/// the node refuses it); both are drained. Other connections' outputs are dropped.
pub fn connect_peer(
    node: &mut Node,
    name: &str,
    framing: Framing,
    now: u64,
) -> (Connection, aemp_engine::ConnId) {
    let mut peer = Connection::new(config(name, framing), [9; 66], now).expect("config");
    let id = node.handle_accept(&format!("{name}:1"), [8; 66], now);
    loop {
        let mut moved = false;
        while let Some(o) = node.poll_output() {
            if let NodeOutput::Transmit { conn, bytes } = o
                && conn == id
            {
                moved = true;
                peer.handle_input(&bytes);
            }
        }
        let bytes = pump(&mut peer);
        if !bytes.is_empty() {
            moved = true;
            node.handle_input(id, &bytes, now);
        }
        if !moved {
            break;
        }
    }
    (peer, id)
}

/// Cuts `data` into pieces whose sizes come from `sizes` (cycled), so that every target
/// also exercises resuming at arbitrary points.
pub fn chunks<'a>(data: &'a [u8], sizes: &'a [u8]) -> impl Iterator<Item = &'a [u8]> {
    let mut rest = data;
    let mut i = 0;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let size = sizes
            .get(i % sizes.len().max(1))
            .map_or(rest.len(), |&s| usize::from(s) + 1);
        i += 1;
        let (chunk, tail) = rest.split_at(size.min(rest.len()));
        rest = tail;
        Some(chunk)
    })
}
