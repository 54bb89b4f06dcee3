//! The global node side of the global protocol (what AnyEvent::MP's `Global` module does).
//!
//! A node becomes global when it receives `g_slave` or finds itself among its seeds, and
//! stays global. From then on it:
//!
//! - is its own master: its own database reaches its service through `g_slave`/`g_upd`
//!   sent to itself, and its own requests (`g_find`, `g_db_*`, `g_mon1`) are answered by
//!   itself;
//! - sends `g_global` to every node that comes up, and keeps a connection to every node
//!   listed in the `'g` family (the global nodes);
//! - holds the database: one shard per source node (a slave's own entries, or everything
//!   another global node told us), merged into one view that queries read;
//! - relays its slaves' changes to the other global nodes (`g_upd`), tells monitors
//!   (`g_chg2`), and on meeting another global node sends it all its slaves' entries
//!   (`g_set`);
//! - forgets a node's shard, monitors and `'g`/`'l` mirrors when the node goes down.

use std::collections::{BTreeMap, BTreeSet};

use super::global::{entries, map_value};
use super::{LogLevel, Node};
use crate::value::Value;

/// Node-port tags a global node serves (`g_slave` is served by every node that may
/// become global).
pub(super) const TAGS: &[&str] = &[
    "g_slave",
    "g_set",
    "g_upd",
    "g_find",
    "g_db_family",
    "g_db_keys",
    "g_db_values",
    "g_mon0",
    "g_mon1",
    "g_global",
];

/// What one peer can make a global node hold. At a limit, the entries or monitors that do
/// not fit are ignored (not stored, relayed or reported) with a warning in the log; what
/// was held before stays.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GlobalLimits {
    /// Entries (keys, over all families) held for one source node (default 100 000).
    pub max_entries_per_node: usize,
    /// Bytes of family names, keys and CBOR-encoded values held for one source node
    /// (default 16 MiB).
    pub max_bytes_per_node: usize,
    /// Families one node may monitor (default 1000).
    pub max_monitors_per_node: usize,
    /// Other global nodes kept connected (default 256); more names in `'g` are not dialled.
    pub max_global_nodes: usize,
}

impl Default for GlobalLimits {
    fn default() -> Self {
        GlobalLimits {
            max_entries_per_node: 100_000,
            max_bytes_per_node: 16 << 20,
            max_monitors_per_node: 1_000,
            max_global_nodes: 256,
        }
    }
}

/// Key -> value of one family.
type Family = BTreeMap<String, Value>;

/// The entries one source node gave us, with their count and size for the limits.
#[derive(Debug, Default)]
struct Shard {
    families: BTreeMap<String, Family>,
    entries: usize,
    bytes: usize,
}

fn entry_size(family: &str, key: &str, value: &Value) -> usize {
    family.len() + key.len() + value.encode().len()
}

impl Shard {
    fn remove(&mut self, family: &str, key: &str) -> Option<Value> {
        let fam = self.families.get_mut(family)?;
        let old = fam.remove(key)?;
        if fam.is_empty() {
            self.families.remove(family);
        }
        self.entries -= 1;
        self.bytes -= entry_size(family, key, &old);
        Some(old)
    }

    fn get(&self, family: &str, key: &str) -> Option<&Value> {
        self.families.get(family)?.get(key)
    }
}

/// The state of a global node.
#[derive(Debug, Default)]
pub(super) struct Service {
    /// Per source node: what it holds (the reference's per-node local databases).
    shards: BTreeMap<String, Shard>,
    /// All shards merged: what queries and monitors see.
    db: BTreeMap<String, Family>,
    /// Nodes that slaved to us (ourselves included), with the families they monitor.
    slaves: BTreeMap<String, BTreeSet<String>>,
    /// Family -> nodes monitoring it.
    mons: BTreeMap<String, BTreeSet<String>>,
    /// Global nodes to keep connected (the keys of `'g` but us).
    keep: BTreeSet<String>,
    keep_retry: u64,
    /// When to dial the kept nodes that are down again.
    pub(super) keep_at: Option<u64>,
}

/// The effects of one update of a family, to be sent by the node.
#[derive(Debug, Default)]
struct Effects {
    /// For the other global nodes (`g_upd`): set and deleted keys.
    relay: Option<(Family, Vec<String>)>,
    /// For monitors (`g_chg2`): set and deleted keys.
    notify: Option<(Family, Vec<String>)>,
    /// Entries ignored at a limit.
    dropped: usize,
}

impl Service {
    /// Adds, replaces and deletes `node`'s entries of `family` (`del` must not name keys in
    /// `set`), keeping the merged view right: a deleted key another shard still holds
    /// takes that shard's value (a slave's first).
    fn update(
        &mut self,
        limits: &GlobalLimits,
        node: &str,
        family: &str,
        mut set: Family,
        del: Vec<String>,
    ) -> Effects {
        let mut effects = Effects::default();
        let shard = self.shards.entry(node.to_owned()).or_default();
        let merged = self.db.entry(family.to_owned()).or_default();
        set.retain(|key, value| {
            let old = shard.get(family, key).map(|v| entry_size(family, key, v));
            let size = entry_size(family, key, value);
            let entries = shard.entries + usize::from(old.is_none());
            let bytes = shard.bytes - old.unwrap_or(0) + size;
            if entries > limits.max_entries_per_node || bytes > limits.max_bytes_per_node {
                effects.dropped += 1;
                return false;
            }
            shard.entries = entries;
            shard.bytes = bytes;
            let fam = shard.families.entry(family.to_owned()).or_default();
            fam.insert(key.clone(), value.clone());
            merged.insert(key.clone(), value.clone());
            true
        });
        let mut local_set = Family::new();
        let (mut del_local, mut del_global) = (Vec::new(), Vec::new());
        let from_slave = self.slaves.contains_key(node);
        for key in del {
            if let Some(shard) = self.shards.get_mut(node) {
                shard.remove(family, &key);
            }
            let holders = || {
                self.shards
                    .iter()
                    .filter(|(n, s)| n.as_str() != node && s.get(family, &key).is_some())
            };
            let slave = holders().find(|(n, _)| self.slaves.contains_key(*n));
            let other = slave.or_else(|| holders().next());
            let merged = self.db.entry(family.to_owned()).or_default();
            match other {
                Some((holder, shard)) => {
                    let value = shard.get(family, &key).cloned().unwrap_or(Value::Null);
                    let changed = merged.get(&key) != Some(&value);
                    if changed {
                        merged.insert(key.clone(), value.clone());
                    }
                    if self.slaves.contains_key(holder) {
                        if changed {
                            set.insert(key, value);
                        }
                    } else {
                        del_global.push(key.clone());
                        if changed {
                            local_set.insert(key, value);
                        }
                    }
                }
                None => {
                    merged.remove(&key);
                    if from_slave {
                        del_global.push(key.clone());
                    }
                    del_local.push(key);
                }
            }
        }
        if self.db.get(family).is_some_and(BTreeMap::is_empty) {
            self.db.remove(family);
        }
        // No empty family or shard is kept (a node that only deleted holds nothing).
        if self.shards.get(node).is_some_and(|s| s.families.is_empty()) {
            self.shards.remove(node);
        }
        if from_slave && (!set.is_empty() || !del_global.is_empty()) {
            effects.relay = Some((set.clone(), del_global));
        }
        if !set.is_empty() || !local_set.is_empty() || !del_local.is_empty() {
            set.extend(local_set);
            effects.notify = Some((set, del_local));
        }
        effects
    }

    /// The entries of every slave (ourselves included), merged: what `g_set` carries.
    fn slaves_db(&self) -> Value {
        let mut db: BTreeMap<String, Family> = BTreeMap::new();
        for (_, shard) in self
            .shards
            .iter()
            .filter(|(n, _)| self.slaves.contains_key(*n))
        {
            for (family, entries) in &shard.families {
                let fam = db.entry(family.clone()).or_default();
                fam.extend(entries.iter().map(|(k, v)| (k.clone(), v.clone())));
            }
        }
        Value::Map(
            db.iter()
                .map(|(f, entries)| (Value::text(f.as_str()), map_value(entries)))
                .collect(),
        )
    }
}

/// Keys of a CBOR array (items that are not names are skipped).
fn keys(value: Option<&Value>) -> Vec<String> {
    match value {
        Some(Value::Array(items)) => items
            .iter()
            .filter_map(|k| Some(k.as_name()?.into_owned()))
            .collect(),
        _ => Vec::new(),
    }
}

impl Node {
    /// Whether this node serves `tag` as a global node now (`g_slave` whenever it may
    /// become one).
    pub(super) fn serves(&self, tag: &str) -> bool {
        TAGS.contains(&tag)
            && (self.service.is_some() || (tag == "g_slave" && self.config.serve_global))
    }

    /// Becomes a global node (once): our own master, announced to every node that is up,
    /// connected to the global nodes we know.
    pub(super) fn become_global(&mut self, now: u64) {
        if self.service.is_some() || !self.config.serve_global {
            return;
        }
        self.service = Some(Service::default());
        self.log(LogLevel::Info, "acting as a global node".into());
        let me = self.node_id.clone();
        self.master_set(&me, now);
        self.db_put("'g", &me, Value::Null, now);
        let up: Vec<String> = self
            .peers
            .iter()
            .filter(|(_, p)| p.conn.is_some())
            .map(|(n, _)| n.clone())
            .collect();
        for node in up {
            self.send_node(&node, vec![Value::text("g_global")], now);
            if self.global.is_global(&node) {
                self.global_connect(&node, now);
            }
        }
    }

    /// A request `tag` (one of [`TAGS`]) from `src` for the global service.
    pub(super) fn seed_request(&mut self, src: &str, tag: &str, args: Vec<Value>, now: u64) {
        if tag == "g_slave" {
            self.become_global(now);
        }
        let name = |i: usize| args.get(i).and_then(Value::as_name).map(|n| n.into_owned());
        let Some(service) = self.service.as_mut() else {
            return;
        };
        match tag {
            "g_slave" => {
                // An empty g_slave only starts the service.
                let Some(db) = args.first() else { return };
                service.slaves.entry(src.to_owned()).or_default();
                self.seed_set(src, db, now);
            }
            "g_set" => {
                let Some(db) = args.first() else { return };
                let binds = entries(db)
                    .get("'l")
                    .map(entries)
                    .and_then(|l| l.get(src).cloned());
                self.seed_set(src, db, now);
                // A global node's listeners are mirrored as our own entry, so that every
                // global node can find every other.
                self.db_put("'l", src, binds.unwrap_or(Value::Null), now);
            }
            "g_upd" => {
                let Some(family) = name(0) else { return };
                let set = args.get(1).map(entries).unwrap_or_default();
                let del = keys(args.get(2));
                self.seed_update(src, &family, set, del, now);
            }
            "g_find" => {
                let Some(node) = name(0) else { return };
                let addrs = service
                    .db
                    .get("'l")
                    .and_then(|l| l.get(&node))
                    .cloned()
                    .unwrap_or(Value::Null);
                let reply = vec![Value::text("g_found"), Value::text(node), addrs];
                self.send_node(src, reply, now);
            }
            "g_db_family" | "g_db_keys" | "g_db_values" => {
                let Some(family) = name(0) else { return };
                let entries = service.db.get(&family);
                let all = entries.into_iter().flatten();
                let result = match tag {
                    "g_db_family" => entries.map(map_value).unwrap_or(Value::Map(Vec::new())),
                    "g_db_keys" => {
                        Value::Array(all.map(|(k, _)| Value::text(k.as_str())).collect())
                    }
                    _ => Value::Array(all.map(|(_, v)| v.clone()).collect()),
                };
                let id = args.get(1).cloned().unwrap_or(Value::Null);
                self.send_node(src, vec![Value::text("g_reply"), id, result], now);
            }
            "g_mon1" => {
                let Some(family) = name(0) else { return };
                let watched = service.slaves.entry(src.to_owned()).or_default();
                if !watched.contains(&family)
                    && watched.len() >= self.config.global_limits.max_monitors_per_node
                {
                    return self.warn_peer(
                        src,
                        format!("g_mon1 {family} from {src} ignored: too many monitors"),
                    );
                }
                watched.insert(family.clone());
                service
                    .mons
                    .entry(family.clone())
                    .or_default()
                    .insert(src.to_owned());
                let current = service.db.get(&family).map(map_value);
                let reply = vec![
                    Value::text("g_chg1"),
                    Value::text(family),
                    current.unwrap_or(Value::Null),
                ];
                self.send_node(src, reply, now);
            }
            "g_mon0" => {
                let Some(family) = name(0) else { return };
                if let Some(nodes) = service.mons.get_mut(&family) {
                    nodes.remove(src);
                    if nodes.is_empty() {
                        service.mons.remove(&family);
                    }
                }
                if let Some(watched) = service.slaves.get_mut(src) {
                    watched.remove(&family);
                }
            }
            "g_global" => {
                // Usually nothing to forget, but a slave may have become global.
                self.seed_disconnect(src, now);
                self.global.add_global(src);
                self.global_connect(src, now);
            }
            _ => {}
        }
    }

    /// Every family of `db` (a map of maps) as `node`'s entries.
    fn seed_set(&mut self, node: &str, db: &Value, now: u64) {
        for (family, set) in entries(db) {
            self.seed_update(node, &family, entries(&set), Vec::new(), now);
        }
    }

    /// Applies an update of `node`'s entries and sends what follows from it.
    fn seed_update(&mut self, node: &str, family: &str, set: Family, del: Vec<String>, now: u64) {
        let limits = self.config.global_limits;
        let Some(service) = self.service.as_mut() else {
            return;
        };
        let effects = service.update(&limits, node, family, set, del);
        let watchers: Vec<String> = service
            .mons
            .get(family)
            .into_iter()
            .flatten()
            .cloned()
            .collect();
        if effects.dropped > 0 {
            self.warn_peer(
                node,
                format!(
                    "{} entries of {node} in family {family} ignored: database limit reached",
                    effects.dropped
                ),
            );
        }
        let update = |tag: &str, (set, del): (Family, Vec<String>)| {
            vec![
                Value::text(tag),
                Value::text(family),
                map_value(&set),
                Value::Array(del.into_iter().map(Value::text).collect()),
            ]
        };
        if let Some(relay) = effects.relay {
            let message = update("g_upd", relay);
            for global in self.global.globals() {
                self.send_node(&global, message.clone(), now);
            }
        }
        if let Some(notify) = effects.notify {
            let message = update("g_chg2", notify);
            for watcher in watchers {
                self.send_node(&watcher, message.clone(), now);
            }
        }
        if family == "'g" {
            self.keep_sync(now);
        }
    }

    /// A global node we met: note it as global in `'g` and send it our slaves' entries.
    fn global_connect(&mut self, node: &str, now: u64) {
        self.db_put("'g", node, Value::Null, now);
        let Some(service) = self.service.as_ref() else {
            return;
        };
        let db = service.slaves_db();
        self.send_node(node, vec![Value::text("g_set"), db], now);
    }

    /// `node` went down (or turned global): its entries, mirrors and monitors go.
    pub(super) fn seed_disconnect(&mut self, node: &str, now: u64) {
        self.global.remove_global(node);
        self.db_del("'g", &[node], now);
        self.db_del("'l", &[node], now);
        let Some(service) = self.service.as_mut() else {
            return;
        };
        let held: Vec<(String, Vec<String>)> = service
            .shards
            .get(node)
            .into_iter()
            .flat_map(|s| &s.families)
            .map(|(f, entries)| (f.clone(), entries.keys().cloned().collect()))
            .collect();
        // Deleted while `node` is still a slave, so other global nodes learn it too.
        for (family, keys) in held {
            self.seed_update(node, &family, Family::new(), keys, now);
        }
        let Some(service) = self.service.as_mut() else {
            return;
        };
        service.shards.remove(node);
        service.slaves.remove(node);
        service.mons.retain(|_, nodes| {
            nodes.remove(node);
            !nodes.is_empty()
        });
    }

    /// A node came up: tell it we are global.
    pub(super) fn seed_node_up(&mut self, node: &str, now: u64) {
        if self.service.is_some() {
            self.send_node(node, vec![Value::text("g_global")], now);
            self.keep_sync(now);
        }
    }

    /// A node went down: forget what it held; dial it again if it is a global node.
    pub(super) fn seed_node_down(&mut self, node: &str, now: u64) {
        if self.service.is_some() {
            self.seed_disconnect(node, now);
            self.keep_sync(now);
        }
    }

    // ---- keeping the global nodes connected ---------------------------------------------

    /// Recomputes the global nodes to keep connected from `'g`; when one of them is down
    /// and newly so, starts dialling with a fresh backoff (0.3-0.6 s, doubling up to
    /// `monitor_timeout`).
    fn keep_sync(&mut self, now: u64) {
        let me = self.node_id.clone();
        let max = self.config.global_limits.max_global_nodes;
        let Some(service) = self.service.as_mut() else {
            return;
        };
        let names = service.db.get("'g").into_iter().flat_map(BTreeMap::keys);
        let keep: BTreeSet<String> = names.filter(|n| **n != me).take(max).cloned().collect();
        let added = keep.difference(&service.keep).next().is_some();
        service.keep = keep;
        let down = self.kept_down();
        if down.is_empty() {
            if let Some(service) = self.service.as_mut() {
                service.keep_at = None;
            }
        } else if added || self.service.as_ref().is_some_and(|s| s.keep_at.is_none()) {
            let retry = 300 * self.jitter_permille() / 1000;
            if let Some(service) = self.service.as_mut() {
                service.keep_retry = retry;
            }
            self.keep_all(now);
        }
    }

    /// Kept global nodes without a working connection (being dialled or not).
    fn kept_down(&self) -> Vec<String> {
        let Some(service) = self.service.as_ref() else {
            return Vec::new();
        };
        service
            .keep
            .iter()
            .filter(|n| !self.is_up(n))
            .cloned()
            .collect()
    }

    /// Dials every kept node that is down and re-arms the retry timer.
    pub(super) fn keep_all(&mut self, now: u64) {
        let down = self.kept_down();
        let max = self.config.transport.monitor_timeout_ms;
        let Some(service) = self.service.as_mut() else {
            return;
        };
        if down.is_empty() {
            service.keep_at = None;
            return;
        }
        service.keep_at = Some(now.saturating_add(service.keep_retry));
        service.keep_retry = (service.keep_retry * 2).min(max);
        for node in down {
            self.peers.entry(node.clone()).or_default();
            self.connect(&node, now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fam(pairs: &[(&str, i128)]) -> Family {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), Value::Int(*v)))
            .collect()
    }

    #[test]
    fn deleting_a_key_another_node_holds_keeps_its_value() {
        let limits = GlobalLimits::default();
        let mut s = Service::default();
        s.slaves.insert("slave1".into(), BTreeSet::new());
        s.slaves.insert("slave2".into(), BTreeSet::new());
        // A global node's shard and two slaves, all holding "k".
        s.update(&limits, "global", "f", fam(&[("k", 1)]), vec![]);
        s.update(&limits, "slave1", "f", fam(&[("k", 2)]), vec![]);
        let e = s.update(&limits, "slave2", "f", fam(&[("k", 3)]), vec![]);
        assert_eq!(e.relay, Some((fam(&[("k", 3)]), vec![])));
        assert_eq!(s.db["f"]["k"], Value::Int(3));
        // slave2 deletes: slave1's value wins over the global node's, and is relayed.
        let e = s.update(&limits, "slave2", "f", Family::new(), vec!["k".into()]);
        assert_eq!(e.relay, Some((fam(&[("k", 2)]), vec![])));
        assert_eq!(e.notify, Some((fam(&[("k", 2)]), vec![])));
        // slave1 deletes: only the global node holds it; other global nodes delete theirs.
        let e = s.update(&limits, "slave1", "f", Family::new(), vec!["k".into()]);
        assert_eq!(e.relay, Some((Family::new(), vec!["k".into()])));
        assert_eq!(e.notify, Some((fam(&[("k", 1)]), vec![])));
        // The global node's deletion is not relayed; the key is gone.
        let e = s.update(&limits, "global", "f", Family::new(), vec!["k".into()]);
        assert_eq!(e.relay, None);
        assert_eq!(e.notify, Some((Family::new(), vec!["k".into()])));
        assert!(s.db.is_empty() && s.shards.is_empty());
    }

    #[test]
    fn limits_count_entries_and_bytes_per_node() {
        let limits = GlobalLimits {
            max_entries_per_node: 2,
            max_bytes_per_node: 8,
            ..GlobalLimits::default()
        };
        let mut s = Service::default();
        // "f" + "a" + one CBOR byte = 3 bytes each.
        let e = s.update(
            &limits,
            "n",
            "f",
            fam(&[("a", 1), ("b", 2), ("c", 3)]),
            vec![],
        );
        assert_eq!(e.dropped, 1);
        assert_eq!((s.shards["n"].entries, s.shards["n"].bytes), (2, 6));
        // Replacing fits; a larger value does not.
        let e = s.update(&limits, "n", "f", fam(&[("a", 5)]), vec![]);
        assert_eq!(e.dropped, 0);
        let e = s.update(&limits, "n", "f", fam(&[("a", 1 << 40)]), vec![]);
        assert_eq!(e.dropped, 1);
        assert_eq!(s.db["f"]["a"], Value::Int(5));
        s.update(
            &limits,
            "n",
            "f",
            Family::new(),
            vec!["a".into(), "b".into()],
        );
        assert!(s.shards.is_empty());
    }
}
