//! Every error path of the protocol notes, each with the reference's wording.

mod support;

use aemp_engine::{Config, Connection, Error, Framing, Limits, MessageError, Output, Verdict};
use support::*;

const ACCEPT: &str = "tls_sha3_512,hmac_sha3_512,tls_anon,cleartext";

/// Feeds `remote` to a fresh `alpha` engine, accepting its greeting; returns the error.
fn fail_with(config: Config, remote: &[u8]) -> (Error, Vec<Output>) {
    let mut conn = Connection::new(config, nonce_a(), 0).unwrap();
    conn.handle_input(remote);
    conn.handle_verdict(Verdict::Accept);
    let outputs: Vec<Output> = std::iter::from_fn(|| conn.poll_output()).collect();
    let Some(Output::Closed(e)) = outputs.last() else {
        panic!("no error: {outputs:?}")
    };
    assert!(conn.is_closed());
    (e.clone(), outputs)
}

fn text(config: Config, remote: &str) -> String {
    fail_with(config, remote.as_bytes()).0.to_string()
}

/// Side A's bytes of a completed handshake with B, and the pair itself.
fn connected_pair(framing: Framing, limits: Limits) -> Pair {
    let mut a = config("alpha");
    let mut b = config("beta");
    a.framings = vec![framing];
    b.framings = vec![framing];
    b.limits = limits;
    let mut pair = Pair::new(a, b);
    pair.drive();
    assert!(pair.connected());
    pair
}

#[test]
fn greeting_checks() {
    assert_eq!(
        text(config("alpha"), "foo;1;beta;cleartext;json\nn\n"),
        "unparsable greeting, expected 'aemp', got 'foo'"
    );
    let mut upgraded = config("alpha");
    upgraded.protocol = "aemp-dataconn".into();
    assert_eq!(
        text(upgraded, "aemp-other;1;beta;cleartext;json\nn\n"),
        "unparsable greeting, expected 'aemp-dataconn', got 'aemp-other'"
    );
    assert_eq!(
        text(config("alpha"), "aemp;2;beta;cleartext;json\nn\n"),
        "version mismatch (we: 1, they: 2)"
    );
    assert_eq!(
        text(config("alpha"), "aemp\n"),
        "version mismatch (we: 1, they: )"
    );
    assert_eq!(
        text(config("alpha"), "aemp;1;alpha;cleartext;json\nn\n"),
        "I refuse to talk to myself"
    );
}

#[test]
fn host_refuses_an_already_connected_node() {
    let mut b = config("beta");
    b.framings = vec![Framing::Json];
    let mut pair = Pair::new(config("alpha"), b);
    pair.a.verdict = Verdict::AlreadyConnected;
    pair.drive();
    assert_eq!(
        pair.a.error().unwrap().to_string(),
        "beta already connected, not connecting again."
    );
    // Nothing but the greeting left A: no auth line.
    assert_eq!(pair.a.sent.iter().filter(|&&b| b == b'\n').count(), 2);
}

#[test]
fn echo_attack() {
    // The remote repeats our own greeting lines.
    let mut conn = Connection::new(config("alpha"), nonce_a(), 0).unwrap();
    let Some(Output::Transmit(ours)) = conn.poll_output() else {
        panic!()
    };
    let mut other = config("beta");
    other.greeting.clear();
    // Line 1 naming another node, but our nonce: still an echo.
    let (e, _) = fail_with(
        config("alpha"),
        &[
            b"aemp;1;beta;cleartext;json\n".as_slice(),
            &ours[ours.len() - 89..],
        ]
        .concat(),
    );
    assert_eq!(e, Error::EchoAttack);
    // Both lines ours: refused as ourselves first, as the reference does.
    let (e, _) = fail_with(config("alpha"), &ours);
    assert_eq!(e, Error::SelfConnection);
    // With a node id check that cannot catch it (an upgraded protocol skips it).
    let mut up = config("alpha");
    up.protocol = "aemp-x".into();
    let mut conn = Connection::new(up.clone(), nonce_a(), 0).unwrap();
    let Some(Output::Transmit(ours)) = conn.poll_output() else {
        panic!()
    };
    let (e, _) = fail_with(up, &ours);
    assert_eq!(e.to_string(), "authentication error, echo attack?");
}

#[test]
fn negotiation_failures() {
    let mut clear_only = config("alpha");
    clear_only.auth_offer = vec![aemp_engine::AuthMethod::HmacSha3_512];
    assert_eq!(
        text(clear_only, "aemp;1;beta;tls_anon,cleartext;json\nn\n"),
        "tls_anon,cleartext: no common auth type supported"
    );
    assert_eq!(
        text(config("alpha"), "aemp;1;beta;hmac_sha3_512;storable\nn\n"),
        "storable: no common framing method supported"
    );
    let mut tls = config("alpha");
    tls.tls = true;
    assert_eq!(
        text(tls, "aemp;1;beta;hmac_sha3_512;json;tls=1.0\nn\n"),
        "hmac_sha3_512: fatal, selected unsupported snd auth method"
    );
    let mut no_secret = config("alpha");
    no_secret.secret = None;
    assert_eq!(
        text(no_secret, "aemp;1;beta;hmac_sha3_512;json\nn\n"),
        "unable to handshake TLS and no shared secret configured"
    );
    let mut empty_secret = config("alpha");
    empty_secret.secret = Some(Vec::new());
    assert_eq!(
        text(empty_secret, "aemp;1;beta;hmac_sha3_512;json\nn\n"),
        "unable to handshake TLS and no shared secret configured"
    );
}

#[test]
fn auth_line_failures() {
    let hello = format!("aemp;1;beta;{ACCEPT};json\nn\n");
    assert_eq!(
        text(
            config("alpha"),
            &format!("{hello}hmac_md6_64_256;00;json\n")
        ),
        "hmac_md6_64_256: fatal, selected unsupported rcv auth method"
    );
    assert_eq!(
        text(config("alpha"), &format!("{hello}hmac_sha3_512;00;json\n")),
        "authentication failure/shared secret mismatch"
    );
    // tls_* without TLS never authenticates.
    assert_eq!(
        text(config("alpha"), &format!("{hello}tls_anon;;json\n")),
        "authentication failure/shared secret mismatch"
    );
    let mut no_clear = config("alpha");
    no_clear
        .auth_accept
        .retain(|m| *m != aemp_engine::AuthMethod::Cleartext);
    assert_eq!(
        text(
            no_clear,
            &format!("{hello}cleartext;{};json\n", hex::encode(SECRET))
        ),
        "cleartext: fatal, selected unsupported rcv auth method"
    );
    assert_eq!(
        text(
            config("alpha"),
            &format!("{hello}cleartext;{};storable\n", hex::encode(SECRET))
        ),
        "storable: unusable remote framing"
    );
}

#[test]
fn wrong_secret_fails_on_both_sides() {
    let mut b = config("beta");
    b.secret = Some(b"other".to_vec());
    let mut pair = Pair::new(config("alpha"), b);
    pair.drive();
    for side in [&pair.a, &pair.b] {
        assert_eq!(
            side.error().unwrap().to_string(),
            "authentication failure/shared secret mismatch"
        );
        assert!(side.session().is_none());
    }
}

#[test]
fn line_limit_before_authentication() {
    let long = vec![b'a'; 4096];
    let (e, _) = fail_with(config("alpha"), &long);
    assert_eq!(e, Error::LineTooLong(4096));
    assert_eq!(e.to_string(), "greeting line longer than 4096 bytes");
    // 4095 bytes and LF fit.
    let mut line = format!("aemp;1;beta;{ACCEPT};json;pad=");
    line.push_str(&"x".repeat(4095 - line.len()));
    line.push('\n');
    let mut conn = Connection::new(config("alpha"), nonce_a(), 0).unwrap();
    conn.handle_input(line.as_bytes());
    let outputs: Vec<Output> = std::iter::from_fn(|| conn.poll_output()).collect();
    assert!(
        matches!(outputs[..], [Output::Transmit(_), Output::Greeting(_)]),
        "{outputs:?}"
    );
    // While the host decides, a peer cannot make the engine buffer without bound.
    conn.handle_input(&vec![b'b'; 9000]);
    assert!(matches!(
        conn.poll_output(),
        Some(Output::Closed(Error::LineTooLong(4096)))
    ));
}

#[test]
fn handshake_deadline() {
    let mut c = config("alpha");
    c.monitor_timeout_ms = 5000;
    let mut conn = Connection::new(c, nonce_a(), 1000).unwrap();
    assert_eq!(conn.poll_timeout(), Some(6000));
    conn.handle_timeout(5999);
    conn.poll_output();
    assert!(conn.poll_output().is_none());
    conn.handle_timeout(6000);
    assert_eq!(
        conn.poll_output().map(|o| format!("{o:?}")),
        Some("Closed(HandshakeTimeout)".into())
    );
    assert_eq!(Error::HandshakeTimeout.to_string(), "Connection timed out");
    assert_eq!(conn.poll_timeout(), None);
}

#[test]
fn eof() {
    let (e, _) = {
        let mut conn = Connection::new(config("alpha"), nonce_a(), 0).unwrap();
        conn.handle_input(b"aemp;1;be");
        conn.handle_eof();
        let outputs: Vec<Output> = std::iter::from_fn(|| conn.poll_output()).collect();
        let Some(Output::Closed(e)) = outputs.last().cloned() else {
            panic!()
        };
        (e, outputs)
    };
    assert_eq!(e.to_string(), "connection closed by peer");
    let mut pair = connected_pair(Framing::Json, Limits::default());
    pair.b.conn.handle_input(b"[\"p\",1][\"q\"");
    pair.b.conn.handle_eof();
    pair.b.pump();
    assert_eq!(
        pair.b.messages().len(),
        1,
        "the complete message is not lost"
    );
    assert_eq!(
        pair.b.error().unwrap().to_string(),
        "connection closed by peer inside a message"
    );
}

#[test]
fn data_phase_limits_and_garbage() {
    let limits = Limits {
        max_message_size: 64,
        max_depth: 4,
    };
    let cases: [(Framing, &[u8], MessageError); 7] = [
        (
            Framing::Json,
            br#"["p","#.as_slice(),
            MessageError::TooLarge(64),
        ),
        (Framing::Json, b"[[[[[]]]]]", MessageError::TooDeep(4)),
        (Framing::Json, b"{\"a\":1}", MessageError::NotAnArray),
        (
            Framing::Json,
            b"[1,}",
            MessageError::Malformed {
                framing: "json",
                detail: String::new(),
            },
        ),
        (
            Framing::Cbor,
            b"\x81\x5a\x00\x01\x00\x00",
            MessageError::TooLarge(64),
        ),
        (
            Framing::Cbor,
            b"\x81\x81\x81\x81\x80",
            MessageError::TooDeep(4),
        ),
        (Framing::Cbor, b"\xa0", MessageError::NotAnArray),
    ];
    for (framing, garbage, expected) in cases {
        let mut pair = connected_pair(framing, limits);
        let good: &[u8] = if framing == Framing::Json {
            b"[\"ok\"]"
        } else {
            b"\x81\x62ok"
        };
        let mut input = good.to_vec();
        input.extend_from_slice(garbage);
        if expected == MessageError::TooLarge(64) && framing == Framing::Json {
            input.extend_from_slice(&[b'x'; 100]);
        }
        pair.b.conn.handle_input(&input);
        pair.b.pump();
        assert_eq!(
            pair.b.messages(),
            [b"\x81\x62ok".to_vec()],
            "{framing:?} {garbage:?}"
        );
        let Some(Error::Message(got)) = pair.b.error() else {
            panic!("{:?}", pair.b.error())
        };
        match expected {
            MessageError::Malformed { .. } => assert!(matches!(
                got,
                MessageError::Malformed {
                    framing: "json",
                    ..
                }
            )),
            _ => assert_eq!(got, &expected),
        }
        assert!(
            pair.b
                .error()
                .unwrap()
                .to_string()
                .starts_with("received message rejected: ")
        );
        // Closed is final: later input changes nothing.
        pair.b.conn.handle_input(good);
        assert!(pair.b.conn.poll_output().is_none());
    }
}

#[test]
fn depth_128_passes_and_129_fails_by_default() {
    for framing in Framing::ALL {
        let nested = |depth: usize| -> Vec<u8> {
            match framing {
                Framing::Json => [vec![b'['; depth], vec![b']'; depth]].concat(),
                Framing::Cbor => [vec![0x81; depth - 1], vec![0x80]].concat(),
            }
        };
        let mut pair = connected_pair(framing, Limits::default());
        pair.b.conn.handle_input(&nested(128));
        pair.b.pump();
        assert_eq!(pair.b.messages().len(), 1, "{framing:?}");
        pair.b.conn.handle_input(&nested(129));
        pair.b.pump();
        assert_eq!(
            pair.b.error(),
            Some(&Error::Message(MessageError::TooDeep(128))),
            "{framing:?}"
        );
    }
}
