//! Global nodes run by the engine itself (no scripted seed), in memory with a simulated
//! clock: discovery, the shared database across nodes, global nodes replicating, and
//! slaves moving when their global node dies.

mod support;

use aemp_engine::Value;
use support::net::*;

/// A global node `seed` (it finds itself among its seeds) and nodes a, b, c slaved to it.
fn seed_and_three() -> (Net, usize, usize, usize, usize) {
    let mut net = Net::new();
    let s = net.add(node_config("seed", &["seed:4040"]));
    let a = net.add(node_config("a", &["seed:4040"]));
    let b = net.add(node_config("b", &["seed:4040"]));
    let c = net.add(node_config("c", &["seed:4040"]));
    net.run();
    (net, s, a, b, c)
}

fn int(i: i128) -> Value {
    Value::Int(i)
}

fn map(pairs: &[(&str, Value)]) -> Value {
    Value::Map(pairs.iter().map(|(k, v)| (t(k), v.clone())).collect())
}

#[test]
fn a_seed_finds_itself_becomes_global_and_nodes_find_each_other_through_it() {
    let (mut net, s, a, b, c) = seed_and_three();
    assert!(net.logged(s, "acting as a global node"));
    for x in [a, b, c] {
        assert!(net.nodes[x].is_up("seed"));
        assert!(net.logged(x, "global master is seed"));
    }
    // Nobody but the seed is connected yet: a finds b and c through it.
    assert!(!net.nodes[a].is_up("b") && !net.nodes[a].is_up("c"));
    let pb = net.nodes[b].new_port();
    let pc = net.nodes[c].register_port("inbox").unwrap();
    let now = net.now;
    net.nodes[a].send(&pb, &args(vec![t("to b")]), now).unwrap();
    net.nodes[a].send(&pc, &args(vec![t("to c")]), now).unwrap();
    net.run();
    assert_eq!(net.delivered(b), [(pb, Value::Array(vec![t("to b")]))]);
    assert_eq!(net.delivered(c), [(pc, Value::Array(vec![t("to c")]))]);
    // The seed holds every node's listeners, its own included.
    let id = net.nodes[a].db_family("'l", now);
    let g = net.nodes[a].db_keys("'g", now);
    net.run();
    assert_eq!(
        net.db_reply(a, &id),
        Some(map(&[
            ("a", Value::Array(vec![t("a:4040")])),
            ("b", Value::Array(vec![t("b:4040")])),
            ("c", Value::Array(vec![t("c:4040")])),
            ("seed", Value::Array(vec![t("seed:4040")])),
        ]))
    );
    assert_eq!(net.db_reply(a, &g), Some(Value::Array(vec![t("seed")])));
    // The seed never dials itself again.
    let closes = net.events[s].len();
    net.advance(120_000);
    assert!(net.events[s][closes..].iter().all(|e| !matches!(
        e,
        aemp_engine::NodeOutput::Close { reason, .. } if reason.contains("myself")
    )));
}

#[test]
fn a_node_receiving_g_slave_becomes_global() {
    let mut net = Net::new();
    let s = net.add(node_config("plain", &[]));
    let a = net.add(node_config("a", &["plain:4040"]));
    let b = net.add(node_config("b", &["plain:4040"]));
    net.run();
    assert!(net.logged(s, "acting as a global node"));
    let pb = net.nodes[b].new_port();
    let now = net.now;
    net.nodes[a].send(&pb, &args(vec![int(7)]), now).unwrap();
    net.run();
    assert_eq!(net.delivered(b), [(pb, Value::Array(vec![int(7)]))]);
}

#[test]
fn database_set_delete_and_monitor_across_nodes() {
    let (mut net, s, a, b, c) = seed_and_three();
    let now = net.now;
    net.nodes[b].db_mon("fam", now);
    net.nodes[s].db_mon("fam", now);
    net.run();
    net.nodes[a]
        .db_set("fam", "k1", &int(1).encode(), now)
        .unwrap();
    net.nodes[c]
        .db_set("fam", "k2", &int(2).encode(), now)
        .unwrap();
    net.nodes[s]
        .db_set("fam", "own", &int(0).encode(), now)
        .unwrap();
    net.run();
    let fam = net.nodes[b].db_family("fam", now);
    let keys = net.nodes[b].db_keys("fam", now);
    let values = net.nodes[b].db_values("fam", now);
    let empty = net.nodes[b].db_family("nothing", now);
    let on_seed = net.nodes[s].db_family("fam", now);
    net.run();
    let all = map(&[("k1", int(1)), ("k2", int(2)), ("own", int(0))]);
    assert_eq!(net.db_reply(b, &fam), Some(all.clone()));
    assert_eq!(net.db_reply(s, &on_seed), Some(all));
    assert_eq!(
        net.db_reply(b, &keys),
        Some(Value::Array(vec![t("k1"), t("k2"), t("own")]))
    );
    assert_eq!(
        net.db_reply(b, &values),
        Some(Value::Array(vec![int(1), int(2), int(0)]))
    );
    assert_eq!(net.db_reply(b, &empty), Some(Value::Map(vec![])));
    // Two nodes setting the same key: the last one wins; when it deletes its entry the
    // other node's value comes back.
    net.nodes[c]
        .db_set("fam", "k1", &int(10).encode(), now)
        .unwrap();
    net.run();
    net.nodes[c].db_del("fam", &["k1"], now);
    net.run();
    net.nodes[a].db_del("fam", &["k1"], now);
    net.run();
    // The global node's own entry is applied at once, before the others arrive.
    let expected = vec![
        (Value::Map(vec![]), vec![]),
        (map(&[("own", int(0))]), vec![]),
        (map(&[("k1", int(1))]), vec![]),
        (map(&[("k2", int(2))]), vec![]),
        (map(&[("k1", int(10))]), vec![]),
        (map(&[("k1", int(1))]), vec![]),
        (Value::Map(vec![]), vec!["k1".to_string()]),
    ];
    assert_eq!(net.db_changes(b, "fam"), expected);
    // The global node's own monitor sees the same, answered by itself.
    assert_eq!(net.db_changes(s, "fam"), expected);
    // Unmonitored: no more changes.
    net.nodes[b].db_unmon("fam", now);
    net.run();
    net.nodes[a]
        .db_set("fam", "k3", &int(3).encode(), now)
        .unwrap();
    net.run();
    assert_eq!(net.db_changes(b, "fam").len(), expected.len());
    assert_eq!(net.db_changes(s, "fam").len(), expected.len() + 1);
}

#[test]
fn a_node_s_entries_vanish_when_it_goes_down() {
    let (mut net, _s, a, b, _c) = seed_and_three();
    let now = net.now;
    net.nodes[b].db_mon("fam", now);
    net.nodes[b].db_mon("'l", now);
    net.run();
    net.nodes[a]
        .db_set("fam", "a1", &int(1).encode(), now)
        .unwrap();
    net.nodes[a]
        .db_set("fam", "a2", &int(2).encode(), now)
        .unwrap();
    net.run();
    net.kill_node(a);
    let fam = net.nodes[b].db_family("fam", now);
    let l = net.nodes[b].db_keys("'l", now);
    net.run();
    assert_eq!(net.db_reply(b, &fam), Some(Value::Map(vec![])));
    assert_eq!(
        net.db_reply(b, &l),
        Some(Value::Array(vec![t("b"), t("c"), t("seed")]))
    );
    let changes = net.db_changes(b, "fam");
    assert_eq!(
        changes.last(),
        Some(&(Value::Map(vec![]), vec!["a1".to_string(), "a2".to_string()]))
    );
    assert_eq!(
        net.db_changes(b, "'l").last(),
        Some(&(Value::Map(vec![]), vec!["a".to_string()]))
    );
}

/// Global nodes g1 and g2 (each lists both as seeds), x slaved to g1, y to g2.
fn two_globals() -> (Net, usize, usize, usize, usize) {
    let mut net = Net::new();
    let seeds = ["g1:4040", "g2:4040"];
    let g1 = net.add(node_config("g1", &seeds));
    let g2 = net.add(node_config("g2", &seeds));
    let x = net.add(node_config("x", &["g1:4040"]));
    let y = net.add(node_config("y", &["g2:4040"]));
    net.run();
    (net, g1, g2, x, y)
}

#[test]
fn two_global_nodes_replicate_the_database() {
    let (mut net, g1, g2, x, y) = two_globals();
    assert!(net.logged(g1, "acting as a global node") && net.logged(g2, "acting as a global node"));
    assert!(net.nodes[g1].is_up("g2"));
    let now = net.now;
    net.nodes[y].db_mon("fam", now);
    net.run();
    net.nodes[x]
        .db_set("fam", "kx", &int(1).encode(), now)
        .unwrap();
    net.run();
    let fam = net.nodes[y].db_family("fam", now);
    let g = net.nodes[y].db_keys("'g", now);
    net.run();
    assert_eq!(net.db_reply(y, &fam), Some(map(&[("kx", int(1))])));
    assert_eq!(
        net.db_reply(y, &g),
        Some(Value::Array(vec![t("g1"), t("g2")]))
    );
    // y finds x through g2, which learnt x's listeners from g1.
    let px = net.nodes[x].new_port();
    net.nodes[y].send(&px, &args(vec![t("hi x")]), now).unwrap();
    net.run();
    assert_eq!(net.delivered(x), [(px, Value::Array(vec![t("hi x")]))]);
    net.nodes[x].db_del("fam", &["kx"], now);
    net.run();
    net.nodes[x]
        .db_set("fam", "gone", &int(2).encode(), now)
        .unwrap();
    net.run();
    net.kill_node(x);
    assert_eq!(
        net.db_changes(y, "fam"),
        [
            (Value::Map(vec![]), vec![]),
            (map(&[("kx", int(1))]), vec![]),
            (Value::Map(vec![]), vec!["kx".to_string()]),
            (map(&[("gone", int(2))]), vec![]),
            (Value::Map(vec![]), vec!["gone".to_string()]),
        ]
    );
}

#[test]
fn a_global_node_meets_the_others_through_one() {
    let (mut net, g1, g2, _x, _y) = two_globals();
    // g3 knows only g1 (and itself) but learns g2 from g1's 'g and keeps it connected.
    let g3 = net.add(node_config("g3", &["g3:4040", "g1:4040"]));
    net.advance(5_000);
    assert!(net.nodes[g3].is_up("g1"));
    assert!(net.nodes[g3].is_up("g2"));
    // After g2 lost every connection, it is back in 'g (through g1) and connected again.
    let now = net.now;
    net.cut(g2);
    net.advance(60_000);
    assert!(net.nodes[g3].is_up("g2") && net.nodes[g1].is_up("g2"));
    let ids = net.nodes[g3].db_keys("'g", now);
    net.run();
    assert_eq!(
        net.db_reply(g3, &ids),
        Some(Value::Array(vec![t("g1"), t("g2"), t("g3")]))
    );
}

#[test]
fn slaves_of_a_dying_global_node_move_to_another() {
    let mut net = Net::new();
    let seeds = ["g1:4040", "g2:4040"];
    let g1 = net.add(node_config("g1", &seeds));
    net.add(node_config("g2", &seeds));
    let x = net.add(node_config("x", &seeds));
    let y = net.add(node_config("y", &["g2:4040"]));
    net.run();
    assert!(net.logged(x, "global master is g1"));
    let now = net.now;
    net.nodes[x].db_mon("fam", now);
    net.nodes[x]
        .db_set("fam", "kx", &int(1).encode(), now)
        .unwrap();
    net.run();
    net.kill_node(g1);
    net.advance(1_000);
    assert!(net.logged(x, "global master is g2"));
    // x's entries were dropped with g1 and are back from x itself; its monitor moved.
    let fam = net.nodes[y].db_family("fam", now);
    net.run();
    assert_eq!(net.db_reply(y, &fam), Some(map(&[("kx", int(1))])));
    net.nodes[y]
        .db_set("fam", "ky", &int(2).encode(), now)
        .unwrap();
    net.run();
    assert_eq!(
        net.db_changes(x, "fam").last(),
        Some(&(map(&[("ky", int(2))]), vec![]))
    );
}

#[test]
fn database_limits_drop_what_does_not_fit() {
    let mut net = Net::new();
    let mut config = node_config("seed", &["seed:4040"]);
    config.global_limits.max_entries_per_node = 3;
    config.global_limits.max_monitors_per_node = 1;
    let s = net.add(config);
    let a = net.add(node_config("a", &["seed:4040"]));
    net.run();
    let now = net.now;
    // a's own 'l entry is one of its three.
    for k in ["k1", "k2", "k3"] {
        net.nodes[a]
            .db_set("fam", k, &int(1).encode(), now)
            .unwrap();
    }
    net.nodes[a].db_mon("m1", now);
    net.nodes[a].db_mon("m2", now);
    net.run();
    assert!(net.logged(
        s,
        "1 entries of a in family fam ignored: database limit reached"
    ));
    assert!(net.logged(s, "g_mon1 m2 from a ignored: too many monitors"));
    // And counted for the operator, with the database it holds.
    let info = net.nodes[s].info();
    assert!(info.global);
    assert!(info.db_entries >= 3, "{info:?}");
    assert!(info.limits.contains(&("global_database", 1)), "{info:?}");
    assert!(info.limits.contains(&("global_monitors", 1)), "{info:?}");
    let fam = net.nodes[a].db_keys("fam", now);
    net.run();
    assert_eq!(
        net.db_reply(a, &fam),
        Some(Value::Array(vec![t("k1"), t("k2")]))
    );
    // Replacing a held entry still works at the limit; a deleted one makes room.
    net.nodes[a]
        .db_set("fam", "k1", &int(5).encode(), now)
        .unwrap();
    net.nodes[a].db_del("fam", &["k2"], now);
    net.nodes[a]
        .db_set("fam", "k4", &int(4).encode(), now)
        .unwrap();
    net.run();
    let fam = net.nodes[a].db_family("fam", now);
    net.run();
    assert_eq!(
        net.db_reply(a, &fam),
        Some(map(&[("k1", int(5)), ("k4", int(4))]))
    );
}

/// A change of a family goes to every watcher, one copy each: the copies wait for room in
/// the global node's outputs instead of all being made at once (with twenty watchers of a
/// 12 MiB entry that was 240 MiB, past the sandbox). No poll returns much more than the
/// budget, and every watcher gets the change.
#[test]
fn a_change_for_many_watchers_waits_for_room_in_the_outputs() {
    const WATCHERS: usize = 8;
    const BUDGET: usize = 1 << 20;
    const BIG: usize = 300 << 10;
    let mut net = Net::new();
    let mut config = node_config("seed", &["seed:4040"]);
    config.max_buffered_bytes = BUDGET;
    let s = net.add(config);
    let member = net.add(node_config("m", &["seed:4040"]));
    let watchers: Vec<usize> = (0..WATCHERS)
        .map(|w| net.add(node_config(&format!("w{w}"), &["seed:4040"])))
        .collect();
    net.run();
    let now = net.now;
    for &w in &watchers {
        net.nodes[w].db_mon("big", now);
    }
    net.run();
    let value = Value::Bytes(vec![7; BIG]);
    net.nodes[member]
        .db_set("big", "k", &value.encode(), now)
        .unwrap();
    net.run();
    // All eight copies (2.4 MiB) did not come out at once; no poll went past the budget
    // by more than the one message that always moves on.
    assert!(net.most_polled[s] >= BIG, "{}", net.most_polled[s]);
    assert!(
        net.most_polled[s] <= BUDGET + BIG + 1024,
        "one poll returned {} bytes of transmits",
        net.most_polled[s]
    );
    for &w in &watchers {
        let changes = net.db_changes(w, "big");
        assert_eq!(
            changes.last().map(|(set, _)| set.clone()),
            Some(map(&[("k", value.clone())])),
            "watcher {w}"
        );
    }
    assert!(!net.logged(s, "does not keep up"));
}
