//! What a global node sends, decoded from the wire by plain transport peers that act like
//! AnyEvent::MP 2.x nodes (a slave and another global node, in json and in cbor), checked
//! against the shapes the reference's global nodes send.

mod support;

use aemp_engine::{Framing, Value};
use support::net::{node_config, t};
use support::wire::Wire;

/// Node `n` (listening on `n:4040`, no seeds), for raw peers speaking `framing`.
fn wire(framing: Framing) -> Wire {
    Wire::new(node_config("n", &[]), framing)
}

/// `["", items...]`.
fn req(items: Vec<Value>) -> Value {
    let mut message = vec![t("")];
    message.extend(items);
    Value::Array(message)
}

fn map(pairs: Vec<(&str, Value)>) -> Value {
    Value::Map(pairs.into_iter().map(|(k, v)| (t(k), v)).collect())
}

fn arr(items: Vec<Value>) -> Value {
    Value::Array(items)
}

fn int(i: i128) -> Value {
    Value::Int(i)
}

/// The slave's database as a Perl slave sends it with `g_slave`.
fn slave_db() -> Value {
    map(vec![
        ("'l", map(vec![("s", arr(vec![t("s:1")]))])),
        ("fam", map(vec![("k", int(1))])),
    ])
}

#[test]
fn answers_to_a_slave() {
    answers_to_a_slave_in(Framing::Json);
    answers_to_a_slave_in(Framing::Cbor);
}

fn answers_to_a_slave_in(framing: Framing) {
    let mut w = wire(framing);
    let s = w.connect("s");
    assert!(w.take(s).is_empty(), "not global yet: nothing to say");
    // A Perl slave's first message to its seed, then its database.
    w.request(s, vec![t("g_slave")]);
    assert_eq!(w.take(s), [req(vec![t("g_global")])]);
    w.request(s, vec![t("g_slave"), slave_db()]);
    assert!(w.take(s).is_empty());

    w.request(s, vec![t("g_find"), t("s")]);
    w.request(s, vec![t("g_find"), t("n")]);
    w.request(s, vec![t("g_find"), t("unknown")]);
    assert_eq!(
        w.take(s),
        [
            req(vec![t("g_found"), t("s"), arr(vec![t("s:1")])]),
            req(vec![t("g_found"), t("n"), arr(vec![t("n:4040")])]),
            req(vec![t("g_found"), t("unknown"), Value::Null]),
        ]
    );

    for tag in ["g_db_family", "g_db_keys", "g_db_values"] {
        w.request(s, vec![t(tag), t("fam"), t("id1")]);
        w.request(s, vec![t(tag), t("none"), int(2)]);
    }
    assert_eq!(
        w.take(s),
        [
            req(vec![t("g_reply"), t("id1"), map(vec![("k", int(1))])]),
            req(vec![t("g_reply"), int(2), map(vec![])]),
            req(vec![t("g_reply"), t("id1"), arr(vec![t("k")])]),
            req(vec![t("g_reply"), int(2), arr(vec![])]),
            req(vec![t("g_reply"), t("id1"), arr(vec![int(1)])]),
            req(vec![t("g_reply"), int(2), arr(vec![])]),
        ]
    );

    w.request(s, vec![t("g_mon1"), t("fam")]);
    w.request(s, vec![t("g_mon1"), t("none")]);
    w.request(s, vec![t("g_mon1"), t("'g")]);
    assert_eq!(
        w.take(s),
        [
            req(vec![t("g_chg1"), t("fam"), map(vec![("k", int(1))])]),
            req(vec![t("g_chg1"), t("none"), Value::Null]),
            req(vec![t("g_chg1"), t("'g"), map(vec![("n", Value::Null)])]),
        ]
    );
    // Changes from the slave, and from the global node's own application.
    w.request(s, vec![t("g_upd"), t("fam"), map(vec![("k2", int(2))])]);
    w.request(
        s,
        vec![t("g_upd"), t("fam"), Value::Null, arr(vec![t("k")])],
    );
    w.node.db_set("fam", "own", &int(3).encode(), 0).unwrap();
    w.node.db_del("fam", &["own"], 0);
    w.pump();
    assert_eq!(
        w.take(s),
        [
            req(vec![
                t("g_chg2"),
                t("fam"),
                map(vec![("k2", int(2))]),
                arr(vec![])
            ]),
            req(vec![t("g_chg2"), t("fam"), map(vec![]), arr(vec![t("k")])]),
            req(vec![
                t("g_chg2"),
                t("fam"),
                map(vec![("own", int(3))]),
                arr(vec![])
            ]),
            req(vec![
                t("g_chg2"),
                t("fam"),
                map(vec![]),
                arr(vec![t("own")])
            ]),
        ]
    );
    w.request(s, vec![t("g_mon0"), t("fam")]);
    w.node.db_set("fam", "own", &int(4).encode(), 0).unwrap();
    w.pump();
    assert!(w.take(s).is_empty(), "no longer monitored");

    // `can` knows the global tags now.
    w.request(s, vec![t("can"), t("g_find"), t("s#r")]);
    assert_eq!(w.take(s), [arr(vec![t("r"), Value::Bool(true)])]);
}

#[test]
fn replication_with_another_global_node() {
    replication_with_another_global_node_in(Framing::Json);
    replication_with_another_global_node_in(Framing::Cbor);
}

fn replication_with_another_global_node_in(framing: Framing) {
    let mut w = wire(framing);
    let s = w.connect("s");
    w.request(s, vec![t("g_slave"), slave_db()]);
    assert_eq!(w.take(s), [req(vec![t("g_global")])]);
    // Global now: a node that comes up is told so at once.
    let g = w.connect("g");
    assert_eq!(w.take(g), [req(vec![t("g_global")])]);
    w.request(g, vec![t("g_global")]);
    // It is noted in 'g (relayed as our own change), then gets our slaves' entries, ours
    // included.
    let slaves = map(vec![
        ("'g", map(vec![("g", Value::Null), ("n", Value::Null)])),
        (
            "'l",
            map(vec![
                ("n", arr(vec![t("n:4040")])),
                ("s", arr(vec![t("s:1")])),
            ]),
        ),
        ("fam", map(vec![("k", int(1))])),
    ]);
    assert_eq!(
        w.take(g),
        [
            req(vec![
                t("g_upd"),
                t("'g"),
                map(vec![("g", Value::Null)]),
                arr(vec![])
            ]),
            req(vec![t("g_set"), slaves]),
        ]
    );
    // Its own database: its listeners are mirrored as our entry (and relayed).
    let theirs = map(vec![
        ("'g", map(vec![("g", Value::Null)])),
        (
            "'l",
            map(vec![
                ("g", arr(vec![t("g:1")])),
                ("gs", arr(vec![t("gs:1")])),
            ]),
        ),
    ]);
    w.request(g, vec![t("g_set"), theirs]);
    assert_eq!(
        w.take(g),
        [req(vec![
            t("g_upd"),
            t("'l"),
            map(vec![("g", arr(vec![t("g:1")]))]),
            arr(vec![])
        ])]
    );
    w.request(s, vec![t("g_find"), t("gs")]);
    assert_eq!(
        w.take(s),
        [req(vec![t("g_found"), t("gs"), arr(vec![t("gs:1")])])]
    );
    // A slave's change is relayed; another global node's change is not sent back.
    w.request(s, vec![t("g_upd"), t("fam"), map(vec![("k", int(5))])]);
    w.request(
        g,
        vec![t("g_upd"), t("fam"), map(vec![("k", int(6))]), arr(vec![])],
    );
    assert_eq!(
        w.take(g),
        [req(vec![
            t("g_upd"),
            t("fam"),
            map(vec![("k", int(5))]),
            arr(vec![])
        ])]
    );
    w.request(s, vec![t("g_db_family"), t("fam"), t("q")]);
    assert_eq!(
        w.take(s),
        [req(vec![t("g_reply"), t("q"), map(vec![("k", int(6))])])]
    );
    // The slave deletes its key: the global node still holds one, so the deletion is
    // relayed and the value stays.
    w.request(
        s,
        vec![t("g_upd"), t("fam"), Value::Null, arr(vec![t("k")])],
    );
    assert_eq!(
        w.take(g),
        [req(vec![
            t("g_upd"),
            t("fam"),
            map(vec![]),
            arr(vec![t("k")])
        ])]
    );
    w.request(s, vec![t("g_db_keys"), t("fam"), t("q2")]);
    assert_eq!(
        w.take(s),
        [req(vec![t("g_reply"), t("q2"), arr(vec![t("k")])])]
    );
    // The slave goes away: its remaining entries are deleted everywhere.
    w.request(s, vec![t("g_upd"), t("fam"), map(vec![("left", int(0))])]);
    w.take(g);
    w.drop_peer(s);
    assert_eq!(
        w.take(g),
        [
            req(vec![t("g_upd"), t("'l"), map(vec![]), arr(vec![t("s")])]),
            req(vec![
                t("g_upd"),
                t("fam"),
                map(vec![]),
                arr(vec![t("left")])
            ]),
        ]
    );
    // A new slave monitors 'l and sees the global node's entries go.
    let s2 = w.connect("s2");
    assert_eq!(w.take(s2), [req(vec![t("g_global")])]);
    w.request(s2, vec![t("g_mon1"), t("'l")]);
    w.take(s2);
    w.drop_peer(g);
    assert_eq!(
        w.take(s2),
        [req(vec![
            t("g_chg2"),
            t("'l"),
            map(vec![]),
            arr(vec![t("g"), t("gs")])
        ])]
    );
}
