//! Two engines back to back in memory: every auth method with every framing combination,
//! messages both ways, keepalives, protocol upgrade.

mod support;

use aemp_engine::{AuthMethod, Framing, Output, TlsRole};
use support::*;

/// Configurations where A sends in `a_sends` and B in `b_sends`.
fn framed(a_sends: Framing, b_sends: Framing) -> (aemp_engine::Config, aemp_engine::Config) {
    let mut a = config("alpha");
    let mut b = config("beta");
    // Each side sends in the first framing of the *other* side's list that it supports.
    let other = |f: Framing| {
        if f == Framing::Cbor {
            Framing::Json
        } else {
            Framing::Cbor
        }
    };
    b.framings = vec![a_sends, other(a_sends)];
    a.framings = vec![b_sends, other(b_sends)];
    (a, b)
}

fn exchange(pair: &mut Pair, a_sends: Framing, b_sends: Framing) {
    let for_b = if a_sends == Framing::Cbor {
        [json_safe_messages(), cbor_only_messages()].concat()
    } else {
        json_safe_messages()
    };
    let for_a = if b_sends == Framing::Cbor {
        [cbor_only_messages(), json_safe_messages()].concat()
    } else {
        json_safe_messages()
    };
    for m in &for_b {
        pair.a.conn.send(m).unwrap();
    }
    for m in &for_a {
        pair.b.conn.send(m).unwrap();
    }
    pair.drive();
    assert_eq!(pair.b.messages(), for_b);
    assert_eq!(pair.a.messages(), for_a);
}

#[test]
fn every_auth_method_with_every_framing_combination() {
    let methods = [
        AuthMethod::HmacSha3_512,
        AuthMethod::TlsSha3_512,
        AuthMethod::TlsAnon,
    ];
    for method in methods {
        for a_sends in Framing::ALL {
            for b_sends in Framing::ALL {
                let (mut a, mut b) = framed(a_sends, b_sends);
                for c in [&mut a, &mut b] {
                    c.tls = method.needs_tls();
                    c.auth_offer = vec![method];
                }
                let mut pair = Pair::new(a, b);
                pair.drive();
                assert!(
                    pair.connected(),
                    "{method:?} {a_sends:?}/{b_sends:?}: {:?} {:?}",
                    pair.a.error(),
                    pair.b.error()
                );
                let (sa, sb) = (
                    pair.a.session().unwrap().clone(),
                    pair.b.session().unwrap().clone(),
                );
                assert_eq!((sa.send_auth, sa.recv_auth), (method, method));
                assert_eq!((sa.send_framing, sa.recv_framing), (a_sends, b_sends));
                assert_eq!((sb.send_framing, sb.recv_framing), (b_sends, a_sends));
                assert_eq!(sa.remote_node, "beta");
                assert_eq!(sb.remote_node, "alpha");
                assert_eq!(sa.tls, method.needs_tls());
                assert_eq!(sa.untrusted, method == AuthMethod::TlsAnon);
                if method.needs_tls() {
                    // A's nonce line sorts lower, so A is the TLS client.
                    assert_eq!(pair.a.tls, Some(TlsRole::Client));
                    assert_eq!(pair.b.tls, Some(TlsRole::Server));
                }
                exchange(&mut pair, a_sends, b_sends);
            }
        }
    }
}

#[test]
fn tls_is_used_only_when_both_sides_want_it() {
    let mut a = config("alpha");
    a.tls = true;
    let mut pair = Pair::new(a, config("beta"));
    pair.drive();
    assert!(pair.connected());
    assert_eq!(pair.a.tls, None);
    assert_eq!(
        pair.a.session().unwrap().send_auth,
        AuthMethod::HmacSha3_512
    );
}

#[test]
fn greeting_event_comes_before_the_handshake_goes_on() {
    let mut pair = Pair::new(config("alpha"), config("beta"));
    pair.drive();
    let Output::Greeting(g) = &pair.a.events[0] else {
        panic!("{:?}", pair.a.events)
    };
    assert_eq!(g.node_id, "beta");
    assert_eq!(g.get("provider"), Some("test"));
    assert!(matches!(pair.a.events[1], Output::Connected(_)));
}

#[test]
fn keepalive_after_a_silent_interval() {
    let (mut a, b) = framed(Framing::Json, Framing::Json);
    a.keepalive_interval_ms = Some(1000);
    let mut pair = Pair::new(a, b);
    pair.drive();
    assert_eq!(pair.a.conn.poll_timeout(), Some(1000));
    // Something was sent (the auth line) during the first interval: no keepalive.
    pair.a.conn.handle_timeout(1000);
    assert_eq!(pair.a.pump(), b"");
    pair.a.conn.handle_timeout(2000);
    assert_eq!(pair.a.pump(), b"[]");
    pair.a.conn.send(&json_safe_messages()[0]).unwrap();
    pair.a.pump();
    pair.a.conn.handle_timeout(3000);
    assert_eq!(pair.a.pump(), b"");
    assert_eq!(pair.a.conn.poll_timeout(), Some(4000));
    // The receiver does not report keepalives.
    pair.b.conn.handle_input(b"[][\"\",\"\"]");
    pair.b.pump();
    assert!(pair.b.messages().is_empty());
}

#[test]
fn no_timeout_once_connected_without_keepalive() {
    let mut pair = Pair::new(config("alpha"), config("beta"));
    assert_eq!(pair.a.conn.poll_timeout(), Some(30_000));
    pair.drive();
    assert_eq!(pair.a.conn.poll_timeout(), None);
    pair.a.conn.handle_timeout(100_000);
    pair.a.pump();
    assert!(pair.a.error().is_none());
}

#[test]
fn upgraded_protocol_hands_the_stream_over() {
    let mut a = config("alpha");
    a.protocol = "aemp-dataconn".into();
    let mut pair = Pair::new(a, config("beta"));
    pair.drive();
    assert!(pair.connected());
    assert_eq!(pair.b.session().unwrap().protocol, "aemp-dataconn");
    assert_eq!(pair.a.session().unwrap().protocol, "aemp-dataconn");
    assert!(
        pair.b
            .events
            .iter()
            .any(|e| matches!(e, Output::HandedOver { .. }))
    );
    assert!(pair.b.conn.is_closed());
    assert!(pair.b.conn.send(&json_safe_messages()[0]).is_err());
}

#[test]
fn crlf_lines_are_accepted() {
    // B's bytes with every LF of the handshake turned into CR LF: same transcript.
    let mut pair = Pair::new(config("alpha"), config("beta"));
    let to_b = pair.a.pump();
    let to_a = pair.b.pump();
    let crlf: Vec<u8> = to_a
        .iter()
        .flat_map(|&b| {
            if b == b'\n' {
                vec![b'\r', b'\n']
            } else {
                vec![b]
            }
        })
        .collect();
    pair.a.conn.handle_input(&crlf);
    pair.b.conn.handle_input(&to_b);
    let auth_a = pair.a.pump();
    let auth_b = pair.b.pump();
    pair.b.conn.handle_input(&auth_a);
    let mut auth_b_crlf = auth_b[..auth_b.len() - 1].to_vec();
    auth_b_crlf.extend_from_slice(b"\r\n");
    pair.a.conn.handle_input(&auth_b_crlf);
    pair.drive();
    assert!(
        pair.connected(),
        "{:?} {:?}",
        pair.a.error(),
        pair.b.error()
    );
}

#[test]
fn send_before_connected_and_bad_messages_are_refused() {
    let mut pair = Pair::new(config("alpha"), config("beta"));
    assert_eq!(
        pair.a.conn.send(&json_safe_messages()[0]),
        Err(aemp_engine::SendError::NotConnected)
    );
    pair.drive();
    assert!(pair.a.conn.send(b"\x01").is_err());
    assert!(pair.a.conn.send(b"\x82\x01").is_err());
    assert_eq!(pair.a.pump(), b"", "nothing is queued by a refused send");
}

#[test]
fn a_cbor_sequence_is_sent_as_a_batch() {
    let (a, b) = framed(Framing::Json, Framing::Cbor);
    let mut pair = Pair::new(a, b);
    pair.drive();
    let messages = json_safe_messages();
    assert_eq!(
        pair.a.conn.send_sequence(&messages.concat()),
        Ok(messages.len())
    );
    // A bad item stops the batch at its index; the ones before it are queued.
    let mut bad = messages[0].clone();
    bad.extend_from_slice(b"\x01");
    bad.extend_from_slice(&messages[1]);
    let err = pair.a.conn.send_sequence(&bad).unwrap_err();
    assert_eq!(
        err,
        (
            1,
            aemp_engine::SendError::Message(aemp_engine::MessageError::NotAnArray)
        )
    );
    pair.drive();
    assert_eq!(
        pair.b.messages(),
        [messages.clone(), vec![messages[0].clone()]].concat()
    );
}

#[test]
fn received_messages_can_come_as_one_sequence() {
    for framing in Framing::ALL {
        let (a, b) = framed(framing, framing);
        let mut pair = Pair::new(a, b);
        pair.drive();
        pair.b.conn.set_message_sequences(true);
        let messages = json_safe_messages();
        pair.a.conn.send_sequence(&messages.concat()).unwrap();
        pair.drive();
        let got: Vec<_> = pair
            .b
            .events
            .iter()
            .filter_map(|e| match e {
                Output::Messages { data, sizes } => Some((data, sizes)),
                _ => None,
            })
            .collect();
        assert_eq!(got.len(), 1, "{framing:?}: one output");
        let (data, sizes) = got[0];
        let items: Vec<Vec<u8>> = aemp_engine::split_sequence(data)
            .unwrap()
            .into_iter()
            .map(<[u8]>::to_vec)
            .collect();
        assert_eq!(items, messages, "{framing:?}");
        // The sizes are the items' lengths.
        let lens: Vec<u32> = items.iter().map(|m| m.len() as u32).collect();
        assert_eq!(sizes, &lens, "{framing:?}");
    }
}

/// Two sides connected, each sending CBOR.
fn cbor_pair() -> Pair {
    let (a, b) = framed(Framing::Cbor, Framing::Cbor);
    let mut pair = Pair::new(a, b);
    pair.drive();
    pair
}

#[test]
fn given_away_cbor_goes_out_and_comes_in_without_a_copy() {
    let mut pair = cbor_pair();
    pair.b.conn.set_message_sequences(true);
    let messages = [json_safe_messages(), cbor_only_messages()].concat();

    // Sent: the sequence given away is the transmit itself.
    let sequence = messages.concat();
    let at = sequence.as_ptr();
    assert_eq!(
        pair.a.conn.send_sequence_owned(sequence),
        Ok(messages.len())
    );
    let Some(Output::Transmit(wire)) = pair.a.conn.poll_output() else {
        panic!("a transmit");
    };
    assert_eq!(wire.as_ptr(), at);
    assert_eq!(wire, messages.concat());

    // Received, with a partial message after them: the input is the messages' data.
    let mut input = wire.clone();
    input.extend_from_slice(&messages[0][..2]);
    let at = input.as_ptr();
    pair.b.conn.handle_input_owned(input);
    let Some(Output::Messages { data, sizes }) = pair.b.conn.poll_output() else {
        panic!("messages");
    };
    assert_eq!(data.as_ptr(), at);
    assert_eq!(data, wire);
    let lens: Vec<u32> = messages.iter().map(|m| m.len() as u32).collect();
    assert_eq!(sizes, lens);
    // The partial message completes from the decoder's copy.
    pair.b.conn.handle_input_owned(messages[0][2..].to_vec());
    let Some(Output::Messages { data, .. }) = pair.b.conn.poll_output() else {
        panic!("the completed message");
    };
    assert_eq!(data, messages[0]);
}

#[test]
fn given_away_input_reports_its_messages_before_its_error() {
    let mut pair = cbor_pair();
    pair.b.conn.set_message_sequences(true);
    let messages = json_safe_messages();
    // Two messages, a keepalive between them, then an item that is not an array.
    let mut input = messages[0].clone();
    input.push(0x80);
    input.extend_from_slice(&messages[1]);
    input.push(0x01);
    pair.b.conn.handle_input_owned(input);
    let Some(Output::Messages { data, sizes }) = pair.b.conn.poll_output() else {
        panic!("messages");
    };
    assert_eq!(data, [messages[0].clone(), messages[1].clone()].concat());
    assert_eq!(sizes.len(), 2);
    assert!(matches!(pair.b.conn.poll_output(), Some(Output::Closed(_))));
    assert!(pair.b.conn.poll_output().is_none());
}

#[test]
fn a_given_away_sequence_refused_half_way_sends_what_came_before() {
    let mut pair = cbor_pair();
    let messages = json_safe_messages();
    let mut bad = messages[0].clone();
    bad.push(0x01);
    bad.extend_from_slice(&messages[1]);
    assert_eq!(
        pair.a.conn.send_sequence_owned(bad),
        Err((
            1,
            aemp_engine::SendError::Message(aemp_engine::MessageError::NotAnArray)
        ))
    );
    // Behind a transmit still waiting, a sequence is appended to it (the copying path).
    pair.a
        .conn
        .send_sequence_owned(messages[1].clone())
        .unwrap();
    pair.drive();
    assert_eq!(
        pair.b.messages(),
        vec![messages[0].clone(), messages[1].clone()]
    );
}
