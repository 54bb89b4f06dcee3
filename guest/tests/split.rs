//! Property test: the bytes a peer sends, cut at arbitrary points, give the same events
//! as the same bytes in one piece.

mod support;

use aemp_engine::{Config, Connection, Framing, Output, Verdict};
use proptest::prelude::*;
use support::*;

/// Feeds `chunks` to a fresh `alpha` and returns every output except transmits.
fn events(config: &Config, chunks: &[&[u8]]) -> Vec<Output> {
    events_with(config, chunks, |conn, chunk| conn.handle_input(chunk))
}

/// [`events`] with the chunks given away (`handle_input_owned`) and received messages
/// as sequences, each sequence's messages then reported one by one as [`events`] has
/// them.
fn owned_events(config: &Config, chunks: &[&[u8]]) -> Vec<Output> {
    let events = events_with(config, chunks, |conn, chunk| {
        conn.set_message_sequences(true);
        conn.handle_input_owned(chunk.to_vec());
    });
    events
        .into_iter()
        .flat_map(|e| match e {
            Output::Messages { data, sizes } => {
                let mut rest = &data[..];
                let mut each = Vec::new();
                for size in sizes {
                    let (m, tail) = rest.split_at(size as usize);
                    each.push(Output::Message(m.to_vec()));
                    rest = tail;
                }
                assert!(rest.is_empty(), "sizes cover the data");
                each
            }
            other => vec![other],
        })
        .collect()
}

fn events_with(
    config: &Config,
    chunks: &[&[u8]],
    mut input: impl FnMut(&mut Connection, &[u8]),
) -> Vec<Output> {
    let mut conn = Connection::new(config.clone(), nonce_a(), 0).unwrap();
    let mut events = Vec::new();
    let drain = |conn: &mut Connection, events: &mut Vec<Output>| {
        while let Some(o) = conn.poll_output() {
            match o {
                Output::Transmit(_) => {}
                Output::Greeting(_) => {
                    events.push(o);
                    conn.handle_verdict(Verdict::Accept);
                }
                other => events.push(other),
            }
        }
    };
    for chunk in chunks {
        input(&mut conn, chunk);
        drain(&mut conn, &mut events);
    }
    events
}

/// What `beta` sends `alpha` in a whole session: greeting, auth line, messages.
fn beta_stream(a: &Config, beta_sends: Framing) -> Vec<u8> {
    let mut b = config("beta");
    b.framings = vec![beta_sends];
    let mut a = a.clone();
    a.framings = vec![Framing::Cbor, Framing::Json];
    let mut pair = Pair::new(a, b);
    pair.drive();
    assert!(pair.connected());
    let messages = if beta_sends == Framing::Cbor {
        [json_safe_messages(), cbor_only_messages()].concat()
    } else {
        json_safe_messages()
    };
    for (i, m) in messages.iter().enumerate() {
        pair.b.conn.send(m).unwrap();
        if i == 1 {
            // A keepalive between messages, which no output shows.
            pair.b.conn.send(&[0x80]).unwrap();
        }
    }
    pair.drive();
    pair.b.sent.clone()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]
    #[test]
    fn split_points_do_not_change_events(
        json in any::<bool>(),
        cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..12),
    ) {
        let a = config("alpha");
        let stream = beta_stream(&a, if json { Framing::Json } else { Framing::Cbor });
        let whole = events(&a, &[&stream]);
        prop_assert!(matches!(whole.last(), Some(Output::Message(_))));
        let mut points: Vec<usize> = cuts.iter().map(|i| i.index(stream.len() + 1)).collect();
        points.sort_unstable();
        let mut chunks = Vec::new();
        let mut start = 0;
        for p in points {
            chunks.push(&stream[start..p]);
            start = p;
        }
        chunks.push(&stream[start..]);
        prop_assert_eq!(events(&a, &chunks), whole.clone());
        prop_assert_eq!(owned_events(&a, &chunks), whole);
    }
}

#[test]
fn byte_by_byte_gives_the_same_events() {
    let a = config("alpha");
    for framing in Framing::ALL {
        let stream = beta_stream(&a, framing);
        let chunks: Vec<&[u8]> = stream.chunks(1).collect();
        assert_eq!(events(&a, &chunks), events(&a, &[&stream]));
        assert_eq!(owned_events(&a, &chunks), events(&a, &[&stream]));
    }
}
