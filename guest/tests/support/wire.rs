//! One node in memory with plain transport peers (`Connection`s) wired to it, so tests see
//! exactly what the node puts on the wire and can send it anything a peer could. Peer
//! `NAME` is at `NAME:1`, whether it dials in or the node dials it; all peers speak the
//! harness's framing. The clock is `now`, set by the test.

use aemp_engine::{
    Config, ConnId, Connection, Framing, NONCE_LEN, Node, NodeConfig, NodeOutput, Output, Value,
    Verdict,
};

use super::net::{SECRET, t};

/// The nonce of the node's end of every connection.
const NODE_NONCE: [u8; NONCE_LEN] = [8; NONCE_LEN];

/// One plain transport peer of the node under test.
pub struct Peer {
    pub raw: Connection,
    /// The node's id for this connection.
    pub conn: ConnId,
    /// Messages the peer received, decoded, not yet taken.
    pub got: Vec<Value>,
    /// Why the node closed this connection, if it did: from then on the peer's bytes no
    /// longer reach the node (a host has closed the socket).
    pub closed: Option<String>,
    /// The peer went away (`drop_peer`): nothing moves either way any more.
    pub gone: bool,
}

/// The node and its peers. Peers keep their index for the whole test.
pub struct Wire {
    pub node: Node,
    pub framing: Framing,
    pub peers: Vec<Peer>,
    /// Everything else the node output, in order: all but transmits to peers and closes.
    pub events: Vec<NodeOutput>,
    /// Every `Close` the node output, in order.
    pub closes: Vec<(ConnId, String)>,
    pub now: u64,
}

impl Wire {
    pub fn new(config: NodeConfig, framing: Framing) -> Wire {
        Wire {
            node: Node::new(config, [7; 16], 0).expect("valid node config"),
            framing,
            peers: Vec::new(),
            events: Vec::new(),
            closes: Vec::new(),
            now: 0,
        }
    }

    /// Peer `name` dials in from `name:1` and completes its handshake; returns its index.
    pub fn connect(&mut self, name: &str) -> usize {
        let p = self.accept(name, &format!("{name}:1"));
        self.pump();
        assert!(self.node.is_up(name), "{name} is up");
        p
    }

    /// Peer `name` dials in from `addr`; nothing moves until the next [`Wire::pump`].
    pub fn accept(&mut self, name: &str, addr: &str) -> usize {
        let conn = self.node.handle_accept(addr, NODE_NONCE, self.now);
        self.add_peer(name, conn)
    }

    /// The node dials peer `name` (its `Connect` to `name:1`, taken out of `events`), the
    /// socket opens and the handshake completes; returns the peer's index.
    pub fn dialled(&mut self, name: &str) -> usize {
        self.pump();
        let addr = format!("{name}:1");
        let at = self
            .events
            .iter()
            .position(|e| matches!(e, NodeOutput::Connect { addr: a, .. } if *a == addr))
            .unwrap_or_else(|| panic!("the node dials {addr}"));
        let NodeOutput::Connect { conn, .. } = self.events.remove(at) else {
            unreachable!()
        };
        self.node.handle_connected(conn, NODE_NONCE, self.now);
        let p = self.add_peer(name, conn);
        self.pump();
        assert!(self.node.is_up(name), "{name} is up");
        p
    }

    /// A peer for the node's connection `conn`, not yet pumped.
    fn add_peer(&mut self, name: &str, conn: ConnId) -> usize {
        let mut config = Config::new(name);
        config.secret = Some(SECRET.to_vec());
        config.framings = vec![self.framing];
        let nonce = [9 + self.peers.len() as u8; NONCE_LEN];
        self.peers.push(Peer {
            raw: Connection::new(config, nonce, 0).expect("valid peer config"),
            conn,
            got: Vec::new(),
            closed: None,
            gone: false,
        });
        self.peers.len() - 1
    }

    /// Moves bytes both ways until neither the node nor a peer has anything to say. A peer
    /// whose own engine closes (it got something it cannot take) panics the test, unless
    /// the node had closed that connection.
    pub fn pump(&mut self) {
        loop {
            let mut moved = false;
            while let Some(o) = self.node.poll_output() {
                moved = true;
                match o {
                    NodeOutput::Transmit { conn, bytes } => {
                        match self.peers.iter_mut().find(|p| p.conn == conn && !p.gone) {
                            Some(p) => p.raw.handle_input(&bytes),
                            None => self.events.push(NodeOutput::Transmit { conn, bytes }),
                        }
                    }
                    NodeOutput::Close { conn, reason } => {
                        if let Some(p) = self.peers.iter_mut().find(|p| p.conn == conn) {
                            p.closed = Some(reason.clone());
                        }
                        self.closes.push((conn, reason));
                    }
                    other => self.events.push(other),
                }
            }
            for (i, p) in self.peers.iter_mut().enumerate() {
                while let Some(o) = p.raw.poll_output() {
                    moved = true;
                    let open = p.closed.is_none() && !p.gone;
                    match o {
                        Output::Transmit(bytes) if open => {
                            self.node.handle_input(p.conn, &bytes, self.now)
                        }
                        Output::Greeting(_) => p.raw.handle_verdict(Verdict::Accept),
                        Output::Message(m) => p.got.push(Value::decode(&m).expect("decodes")),
                        Output::Closed(e) if open => panic!("peer {i} closed: {e}"),
                        _ => {}
                    }
                }
            }
            if !moved {
                return;
            }
        }
    }

    /// Peer `p` sends the message `items` to the node.
    pub fn send(&mut self, p: usize, items: Vec<Value>) {
        self.peers[p]
            .raw
            .send(&Value::Array(items).encode())
            .expect("peer can send");
        self.pump();
    }

    /// Peer `p` sends `["", items...]` (a request to the node port) to the node.
    pub fn request(&mut self, p: usize, items: Vec<Value>) {
        let mut message = vec![t("")];
        message.extend(items);
        self.send(p, message);
    }

    /// Raw bytes from peer `p` to the node, as a host would feed a socket read.
    pub fn feed(&mut self, p: usize, bytes: &[u8]) {
        self.node.handle_input(self.peers[p].conn, bytes, self.now);
        self.pump();
    }

    /// What peer `p` received since the last call.
    pub fn take(&mut self, p: usize) -> Vec<Value> {
        std::mem::take(&mut self.peers[p].got)
    }

    /// Peer `p` goes away (the node sees the end of its stream).
    pub fn drop_peer(&mut self, p: usize) {
        self.peers[p].gone = true;
        self.node.handle_eof(self.peers[p].conn, self.now);
        self.pump();
    }

    /// The messages the node delivered to its ports, decoded, in order.
    pub fn delivered(&self) -> Vec<Value> {
        self.events
            .iter()
            .filter_map(|e| match e {
                NodeOutput::Deliver(d) => Some(
                    d.messages()
                        .map(|args| Value::decode(args).expect("decodes")),
                ),
                _ => None,
            })
            .flatten()
            .collect()
    }
}
