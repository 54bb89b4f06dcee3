//! Test harness: two engines wired back to back in memory, with a simulated clock and
//! TLS simulated as a pass-through (so only where TLS starts is tested, not TLS itself).
//! `net` wires whole nodes together; `wire` wires one node to plain transport peers.

#![allow(dead_code)] // each test file uses its own part of the harness

pub mod net;
pub mod wire;

use aemp_engine::{Config, Connection, Error, NONCE_LEN, Output, Session, TlsRole, Verdict};
use minicbor::Encoder;

pub const SECRET: &[u8] =
    b"8ugxrtw6H5tKnfPWfaSr4HGhE8MoJXmzTT1BWq7sLutNcD0IbXprQlZjIbl7MBKoeklG3IEfY9GlJthC0pENzk";

/// The fixed nonces of side A and side B.
pub fn nonce_a() -> [u8; NONCE_LEN] {
    std::array::from_fn(|i| i as u8)
}

pub fn nonce_b() -> [u8; NONCE_LEN] {
    std::array::from_fn(|i| 100 + i as u8)
}

/// A configuration with a secret and a fixed provider, so lines are byte-stable.
pub fn config(node: &str) -> Config {
    let mut c = Config::new(node);
    c.secret = Some(SECRET.to_vec());
    c.greeting.push(("provider".into(), "test".into()));
    c
}

/// One side: its engine and everything it reported except transmits.
pub struct Side {
    pub conn: Connection,
    pub events: Vec<Output>,
    pub tls: Option<TlsRole>,
    pub verdict: Verdict,
    /// Every byte this side transmitted, in order.
    pub sent: Vec<u8>,
}

impl Side {
    pub fn new(config: Config, nonce: [u8; NONCE_LEN]) -> Side {
        Side {
            conn: Connection::new(config, nonce, 0).expect("valid config"),
            events: Vec::new(),
            tls: None,
            verdict: Verdict::Accept,
            sent: Vec::new(),
        }
    }

    /// Drains outputs: returns bytes to transmit, answers greetings, simulates TLS.
    pub fn pump(&mut self) -> Vec<u8> {
        let mut out = Vec::new();
        while let Some(o) = self.conn.poll_output() {
            match o {
                Output::Transmit(bytes) => out.extend_from_slice(&bytes),
                Output::Greeting(_) => {
                    self.events.push(o);
                    self.conn.handle_verdict(self.verdict);
                }
                Output::StartTls { role, leftover } => {
                    self.tls = Some(role);
                    self.events.push(Output::StartTls {
                        role,
                        leftover: Vec::new(),
                    });
                    // Pass-through "TLS": records are the plaintext itself.
                    self.conn.handle_input(&leftover);
                }
                other => self.events.push(other),
            }
        }
        self.sent.extend_from_slice(&out);
        out
    }

    pub fn session(&self) -> Option<&Session> {
        self.events.iter().find_map(|e| match e {
            Output::Connected(s) => Some(s),
            _ => None,
        })
    }

    pub fn error(&self) -> Option<&Error> {
        self.events.iter().find_map(|e| match e {
            Output::Closed(e) => Some(e),
            _ => None,
        })
    }

    pub fn messages(&self) -> Vec<Vec<u8>> {
        self.events
            .iter()
            .filter_map(|e| match e {
                Output::Message(m) => Some(m.clone()),
                _ => None,
            })
            .collect()
    }
}

pub struct Pair {
    pub a: Side,
    pub b: Side,
}

impl Pair {
    pub fn new(a: Config, b: Config) -> Pair {
        Pair {
            a: Side::new(a, nonce_a()),
            b: Side::new(b, nonce_b()),
        }
    }

    /// Moves bytes both ways until neither side has anything more to say.
    pub fn drive(&mut self) {
        loop {
            let to_b = self.a.pump();
            let to_a = self.b.pump();
            if to_a.is_empty() && to_b.is_empty() {
                break;
            }
            self.b.conn.handle_input(&to_b);
            self.a.conn.handle_input(&to_a);
        }
    }

    /// Both sides connected and without error.
    pub fn connected(&self) -> bool {
        self.a.session().is_some()
            && self.b.session().is_some()
            && self.a.error().is_none()
            && self.b.error().is_none()
    }
}

/// A message as CBOR, built with an encoder.
pub fn cbor(build: impl FnOnce(&mut Encoder<&mut Vec<u8>>)) -> Vec<u8> {
    let mut buf = Vec::new();
    build(&mut Encoder::new(&mut buf));
    buf
}

/// Messages that survive JSON unchanged (text strings, integers, floats with a fraction,
/// booleans, null, arrays, maps with text keys).
pub fn json_safe_messages() -> Vec<Vec<u8>> {
    vec![
        cbor(|e| {
            e.array(3)
                .unwrap()
                .str("port")
                .unwrap()
                .str("ping")
                .unwrap()
                .u32(123)
                .unwrap();
        }),
        cbor(|e| {
            e.array(6)
                .unwrap()
                .str("p#x")
                .unwrap()
                .i64(-5)
                .unwrap()
                .f64(1.5)
                .unwrap();
            e.bool(true)
                .unwrap()
                .null()
                .unwrap()
                .str("ünïcødé \"quoted\" \\ ;%")
                .unwrap();
        }),
        cbor(|e| {
            e.array(2).unwrap().str("").unwrap().map(2).unwrap();
            e.str("z")
                .unwrap()
                .array(2)
                .unwrap()
                .u64(u64::MAX)
                .unwrap()
                .i64(i64::MIN)
                .unwrap();
            e.str("a").unwrap().map(0).unwrap();
        }),
    ]
}

/// Messages only CBOR carries as they are: byte strings, tags, undefined.
pub fn cbor_only_messages() -> Vec<Vec<u8>> {
    vec![
        cbor(|e| {
            e.array(3)
                .unwrap()
                .bytes(b"port")
                .unwrap()
                .bytes(&[0, 255, 10, 13])
                .unwrap()
                .str("text")
                .unwrap();
        }),
        cbor(|e| {
            e.array(2)
                .unwrap()
                .str("p")
                .unwrap()
                .tag(minicbor::data::Tag::new(26))
                .unwrap()
                .undefined()
                .unwrap();
        }),
    ]
}
