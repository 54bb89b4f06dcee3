//! An aemp-only network on loopback sockets: a seed that becomes a global node and three
//! nodes that know only the seed. They find each other and share the database through it.

use std::time::Duration;

use aemp_host::{DbMonitor, Node, Value};
use aemp_tests::*;

fn map(pairs: &[(&str, Value)]) -> Value {
    Value::Map(pairs.iter().map(|(k, v)| (t(k), v.clone())).collect())
}

/// The next change reported to a database monitor: (set, deleted keys).
async fn next_change(changes: &mut DbMonitor) -> (Value, Vec<String>) {
    let change = tokio::time::timeout(WAIT, changes.recv())
        .await
        .expect("database change in time")
        .expect("monitor open");
    (change.set, change.del)
}

/// Asks `node` for `family` until the answer is `expected` (changes travel through the
/// seed while the question does too).
async fn family_becomes(node: &Node, family: &str, expected: &Value) {
    answer_becomes(node, family, expected, false).await
}

/// Asks `node` for the keys of `family` until they are `expected`.
async fn keys_become(node: &Node, family: &str, expected: &Value) {
    answer_becomes(node, family, expected, true).await
}

async fn answer_becomes(node: &Node, family: &str, expected: &Value, keys: bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let query = async {
            if keys {
                node.db_keys(family).await
            } else {
                node.db_family(family).await
            }
        };
        let got = tokio::time::timeout(WAIT, query)
            .await
            .expect("answer in time")
            .unwrap();
        if got == *expected {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{family} is {got:?}, expected {expected:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seed_and_three_nodes_find_each_other_and_share_the_database() {
    let seed = builder("gl-seed", "g").start().await.unwrap();
    let at = addr(&seed);
    let a = builder("gl-a", "g").seed(&at).start().await.unwrap();
    let b = builder("gl-b", "g").seed(&at).start().await.unwrap();
    let c = builder("gl-c", "g").seed(&at).start().await.unwrap();
    for n in [&a, &b, &c] {
        n.wait_up(seed.id(), WAIT).await.unwrap();
    }
    assert!(logged_by("gl-seed", "acting as a global node").await);
    // Each node's listeners reach the seed with its g_slave, which may still be on the way
    // when the node sees the seed up: wait until the seed knows all of them.
    let listeners = |names: &[&str]| Value::Array(names.iter().map(|n| t(n)).collect());
    keys_become(&a, "'l", &listeners(&["gl-a", "gl-b", "gl-c", "gl-seed"])).await;

    // a knows only the seed's address, yet reaches b and c.
    let mut pb = b.port().await.unwrap();
    let mut pc = c.port().await.unwrap();
    a.send(pb.id(), vec![t("to b")]).await.unwrap();
    a.send(pc.id(), vec![t("to c")]).await.unwrap();
    assert_eq!(recv(&mut pb).await, [t("to b")]);
    assert_eq!(recv(&mut pc).await, [t("to c")]);
    assert!(a.is_up(b.id()).await.unwrap() && a.is_up(c.id()).await.unwrap());

    // Set on b, seen by c's monitor and by a's queries.
    let mut changes = c.db_monitor("fam").await.unwrap();
    assert_eq!(next_change(&mut changes).await, (map(&[]), vec![]));
    b.db_set("fam", "kb", Value::Int(1)).await.unwrap();
    assert_eq!(
        next_change(&mut changes).await,
        (map(&[("kb", Value::Int(1))]), vec![])
    );
    family_becomes(&a, "fam", &map(&[("kb", Value::Int(1))])).await;
    assert_eq!(a.db_keys("fam").await.unwrap(), Value::Array(vec![t("kb")]));
    assert_eq!(
        a.db_values("fam").await.unwrap(),
        Value::Array(vec![Value::Int(1)])
    );
    b.db_del("fam", &["kb"]).await.unwrap();
    assert_eq!(
        next_change(&mut changes).await,
        (map(&[]), vec!["kb".to_string()])
    );

    // b's entries vanish when it leaves.
    b.db_set("fam", "leaving", t("soon")).await.unwrap();
    assert_eq!(
        next_change(&mut changes).await,
        (map(&[("leaving", t("soon"))]), vec![])
    );
    drop(pb);
    drop(b);
    assert_eq!(
        next_change(&mut changes).await,
        (map(&[]), vec!["leaving".to_string()])
    );
    family_becomes(&a, "fam", &map(&[])).await;
    keys_become(&a, "'l", &listeners(&["gl-a", "gl-c", "gl-seed"])).await;
}

/// One member's big entry (12 MiB, within its own database limit) in a family many nodes
/// monitor: the global node answers every new watcher with the whole family (`g_chg1`)
/// and sends every change to all of them (`g_chg2`). Copies for two dozen watchers would
/// take 288 MiB, past the sandbox (the node stopped with "the engine ran out of sandbox
/// memory"); they now wait for room in the outputs, so the node lives and every watcher
/// gets the entry and the change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_big_entry_for_many_watchers_cannot_exhaust_a_global_node() {
    const WATCHERS: usize = 24;
    const BIG: usize = 12 << 20;
    let seed = builder("fanout-seed", "s").start().await.unwrap();
    let at = addr(&seed);
    let member = builder("fanout-m", "s").seed(&at).start().await.unwrap();
    member.wait_up(seed.id(), WAIT).await.unwrap();
    member
        .db_set("big", "k", Value::Bytes(vec![b'1'; BIG]))
        .await
        .unwrap();
    tokio::time::timeout(WAIT, async {
        while keys_of(&member, "big").await < 1 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the entry is stored");
    let mut watchers = Vec::new();
    for w in 0..WATCHERS {
        let node = builder(&format!("fanout-w{w}"), "s")
            .seed(&at)
            .start()
            .await
            .unwrap();
        node.wait_up(seed.id(), WAIT).await.unwrap();
        watchers.push(node);
    }
    // All subscribe at once: their `g_mon1` reach the global node in the same rounds.
    let mut subscribing = tokio::task::JoinSet::new();
    for (w, node) in watchers.iter().enumerate() {
        let node = node.clone();
        subscribing.spawn(async move { (w, node.db_monitor("big").await.unwrap()) });
    }
    let mut monitors: Vec<_> = subscribing.join_all().await;
    monitors.sort_by_key(|(w, _)| *w);
    /// Every watcher's next change sets `k` to BIG bytes of `byte`.
    async fn all_get(monitors: &mut [(usize, DbMonitor)], byte: u8, what: &str) {
        for (w, changes) in monitors {
            let change = tokio::time::timeout(WAIT, changes.recv()).await;
            let change = change.unwrap_or_else(|_| panic!("watcher {w} got {what}"));
            let value = change.and_then(|c| match c.set {
                Value::Map(pairs) => pairs.into_iter().find(|(k, _)| *k == t("k")),
                _ => None,
            });
            assert_eq!(
                value.map(|(_, v)| v),
                Some(Value::Bytes(vec![byte; BIG])),
                "watcher {w}"
            );
        }
    }
    all_get(&mut monitors, b'1', "the family").await;
    // A change goes to all of them.
    member
        .db_set("big", "k", Value::Bytes(vec![b'2'; BIG]))
        .await
        .unwrap();
    all_get(&mut monitors, b'2', "the change").await;
    assert_eq!(seed.stopped(), None, "the global node is still running");
    served_within(&seed, "s", 0, Duration::from_secs(2)).await;
}
