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
use std::sync::Arc;

use super::effect::{Cx, Effect, Effects, View};
use super::msg;
use super::request::{Entries, GlobalRequest, Query};
use super::stats::{Hits, Limit};
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

/// What peers can make a global node hold, each and all together. At a limit, the entries,
/// monitors or slaves that do not fit are ignored (not stored, relayed or reported) with
/// a warning in the log; what was held before stays, and the node goes on serving.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GlobalLimits {
    /// Entries (keys, over all families) held for one source node (default 100 000).
    pub max_entries_per_node: usize,
    /// Bytes held for one source node (default 16 MiB), as [`entry_size`] and
    /// [`family_size`] count them: an estimate from above of the memory an entry takes,
    /// not only its encoding.
    pub max_bytes_per_node: usize,
    /// Entries held for all source nodes together (default 400 000).
    pub max_entries: usize,
    /// Bytes held for all source nodes together (default 64 MiB): with the node's 64 MiB
    /// budget for peers' buffers, well inside the host's 256 MiB sandbox, so that no
    /// number of members (or node ids of one member) can exhaust a global node.
    pub max_bytes: usize,
    /// Nodes that may be slaves of this node at once (default 10 000); a `g_slave` past
    /// it is ignored, with a warning.
    pub max_slaves: usize,
    /// Families one node may monitor (default 1000).
    pub max_monitors_per_node: usize,
    /// Monitors of all nodes together (default 100 000).
    pub max_monitors: usize,
    /// Other global nodes kept connected (default 256); more names in `'g` are not dialled.
    pub max_global_nodes: usize,
}

impl Default for GlobalLimits {
    fn default() -> Self {
        GlobalLimits {
            max_entries_per_node: 100_000,
            max_bytes_per_node: 16 << 20,
            max_entries: 400_000,
            max_bytes: 64 << 20,
            max_slaves: 10_000,
            max_monitors_per_node: 1_000,
            max_monitors: 100_000,
            max_global_nodes: 256,
        }
    }
}

/// A key, held once and shared by a shard and the merged view.
type Key = Arc<str>;

/// A value as its CBOR encoding, held once and shared by a shard, the merged view and
/// the replies and notifications that carry it (which splice it in as it is).
type Stored = Arc<[u8]>;

/// Key -> value of one family.
type Family = BTreeMap<Key, Stored>;

/// Entries of a request as stored.
fn family_of(entries: Entries) -> Family {
    entries
        .into_iter()
        .map(|(k, v)| (Key::from(k), Stored::from(v.encode())))
        .collect()
}

/// Appends `family` as a CBOR map.
fn write_family<'a>(
    family: impl ExactSizeIterator<Item = (&'a Key, &'a Stored)>,
    out: &mut Vec<u8>,
) {
    msg::map_header(family.len() as u64, out);
    for (key, value) in family {
        msg::text(key, out);
        out.extend_from_slice(value);
    }
}

/// The start of a node-port message `["", TAG, ...]` of `len` items in all.
fn node_message(len: u64, tag: &str) -> Vec<u8> {
    let mut out = Vec::new();
    msg::array_header(len, &mut out);
    msg::text("", &mut out);
    msg::text(tag, &mut out);
    out
}

/// CBOR null.
const NULL: u8 = 0xf6;

/// The entries one source node gave us, with their count and size for the limits.
#[derive(Debug, Default)]
struct Shard {
    families: BTreeMap<String, Family>,
    entries: usize,
    bytes: usize,
}

/// Per allocation: an `Arc`'s counts and the allocator's rounding and header.
const ALLOC: usize = 32;

/// What one entry costs, as the limits count it: its key and value (each one allocation,
/// shared by the shard and the merged view) and a slot in both B-trees with its share of
/// a node (B-tree nodes are half full at worst), from above; `tests/db_memory.rs` checks
/// it against what the allocator hands out.
fn entry_size(key: &str, value: &[u8]) -> usize {
    /// Key and value pointers with their share of a half-full B-tree node.
    const SLOT: usize = 80;
    key.len()
        .saturating_add(value.len())
        .saturating_add(2 * ALLOC + 2 * SLOT)
}

/// What a family costs a shard beside its entries: its name and a B-tree node of its own
/// in the shard and, at worst, in the merged view. Counted with the family's first entry,
/// so that a node cannot make one family per entry for free.
fn family_size(family: &str) -> usize {
    /// A B-tree leaf of `Key` -> `Stored` (11 slots of 32 bytes and its header).
    const LEAF: usize = 400;
    family.len().saturating_add(ALLOC + LEAF).saturating_mul(2)
}

impl Shard {
    /// Takes `key` out of `family`, with the bytes it freed (the family's too when it
    /// was the last key).
    fn remove(&mut self, family: &str, key: &str) -> Option<(Stored, usize)> {
        let fam = self.families.get_mut(family)?;
        let old = fam.remove(key)?;
        let mut freed = entry_size(key, &old);
        if fam.is_empty() {
            self.families.remove(family);
            freed = freed.saturating_add(family_size(family));
        }
        self.entries = self.entries.saturating_sub(1);
        self.bytes = self.bytes.saturating_sub(freed);
        Some((old, freed))
    }

    fn get(&self, family: &str, key: &str) -> Option<(&Key, &Stored)> {
        self.families.get(family)?.get_key_value(key)
    }
}

/// The state of a global node.
#[derive(Debug, Default)]
pub(super) struct Service {
    /// Per source node: what it holds (the reference's per-node local databases).
    shards: BTreeMap<String, Shard>,
    /// Entries and bytes of all shards together (for the totals of [`GlobalLimits`]).
    entries: usize,
    bytes: usize,
    /// All shards merged: what queries and monitors see.
    db: BTreeMap<String, Family>,
    /// Nodes that slaved to us (ourselves included), with the families they monitor.
    slaves: BTreeMap<String, BTreeSet<String>>,
    /// Family -> nodes monitoring it.
    mons: BTreeMap<String, BTreeSet<String>>,
    /// Monitors in `mons`, all together.
    monitors: usize,
    /// Global nodes to keep connected (the keys of `'g` but us).
    keep: BTreeSet<String>,
    keep_retry: u64,
    /// When to dial the kept nodes that are down again.
    pub(super) keep_at: Option<u64>,
    /// Its limits hit, for [`super::Node::info`].
    pub(super) hits: Hits,
}

/// What follows from one update of a family, for the node to send.
#[derive(Debug, Default)]
struct Outcome {
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
    ) -> Outcome {
        let mut effects = Outcome::default();
        let shard = self.shards.entry(node.to_owned()).or_default();
        let merged = self.db.entry(family.to_owned()).or_default();
        let (total_entries, total_bytes) = (&mut self.entries, &mut self.bytes);
        set.retain(|key, value| {
            let old = shard.get(family, key).map(|(_, v)| entry_size(key, v));
            let mut size = entry_size(key, value);
            if !shard.families.contains_key(family) {
                size = size.saturating_add(family_size(family));
            }
            let added = usize::from(old.is_none());
            let grow = |held: usize| held.saturating_sub(old.unwrap_or(0)).saturating_add(size);
            let (entries, bytes) = (shard.entries.saturating_add(added), grow(shard.bytes));
            let (all_entries, all_bytes) =
                (total_entries.saturating_add(added), grow(*total_bytes));
            if entries > limits.max_entries_per_node
                || bytes > limits.max_bytes_per_node
                || all_entries > limits.max_entries
                || all_bytes > limits.max_bytes
            {
                effects.dropped = effects.dropped.saturating_add(1);
                return false;
            }
            shard.entries = entries;
            shard.bytes = bytes;
            *total_entries = all_entries;
            *total_bytes = all_bytes;
            // One allocation of the key and of the value, shared by both maps.
            let key = merged
                .get_key_value(&**key)
                .map_or_else(|| key.clone(), |(k, _)| k.clone());
            let fam = shard.families.entry(family.to_owned()).or_default();
            fam.insert(key.clone(), value.clone());
            merged.insert(key, value.clone());
            true
        });
        let mut local_set = Family::new();
        let (mut del_local, mut del_global) = (Vec::new(), Vec::new());
        let from_slave = self.slaves.contains_key(node);
        for key in del {
            if let Some(shard) = self.shards.get_mut(node)
                && let Some((_, freed)) = shard.remove(family, &key)
            {
                self.entries = self.entries.saturating_sub(1);
                self.bytes = self.bytes.saturating_sub(freed);
            }
            let holders = || {
                self.shards
                    .iter()
                    .filter(|(n, s)| n.as_str() != node && s.get(family, &key).is_some())
            };
            let slave = holders().find(|(n, _)| self.slaves.contains_key(*n));
            let other = slave.or_else(|| holders().next());
            let merged = self.db.entry(family.to_owned()).or_default();
            match other.and_then(|(holder, shard)| Some((holder, shard.get(family, &key)?))) {
                Some((holder, (k, value))) => {
                    let (k, value) = (k.clone(), value.clone());
                    let changed = merged.get(&*key) != Some(&value);
                    if changed {
                        merged.insert(k.clone(), value.clone());
                    }
                    if self.slaves.contains_key(holder) {
                        if changed {
                            set.insert(k, value);
                        }
                    } else {
                        del_global.push(key.clone());
                        if changed {
                            local_set.insert(k, value);
                        }
                    }
                }
                None => {
                    merged.remove(&*key);
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

    /// `["", "g_set", DB]`: the entries of every slave (ourselves included), merged.
    pub(super) fn g_set(&self) -> Vec<u8> {
        let mut db: BTreeMap<&str, BTreeMap<&Key, &Stored>> = BTreeMap::new();
        for (_, shard) in self
            .shards
            .iter()
            .filter(|(n, _)| self.slaves.contains_key(*n))
        {
            for (family, entries) in &shard.families {
                db.entry(family).or_default().extend(entries);
            }
        }
        let mut out = node_message(3, "g_set");
        msg::map_header(db.len() as u64, &mut out);
        for (family, entries) in db {
            msg::text(family, &mut out);
            write_family(entries.into_iter(), &mut out);
        }
        out
    }
}

/// Whether a node serves `tag` as a global node: when it is one (`global`), or for
/// `g_slave` when it may become one.
pub(super) fn serves(tag: &str, global: bool, may_become: bool) -> bool {
    TAGS.contains(&tag) && (global || (tag == "g_slave" && may_become))
}

/// What the service's messages are logged as when they cannot be sent.
const WHAT: &str = "global request";

impl Service {
    /// Entries and bytes (as [`GlobalLimits`] counts them) of the database held, over
    /// all source nodes.
    pub(super) fn usage(&self) -> (usize, usize) {
        (self.entries, self.bytes)
    }

    /// A request (one of [`TAGS`]) from `src`. For `g_global` the node has taken `src`
    /// out of its globals; [`Effect::IsGlobal`] puts it back.
    pub(super) fn request(&mut self, src: &str, request: GlobalRequest, cx: &mut Cx<'_, '_>) {
        let limits = cx.view.config.global_limits;
        match request {
            GlobalRequest::Slave { db } => {
                // An empty g_slave only starts the service.
                let Some(db) = db else { return };
                let max = limits.max_slaves;
                if !self.slaves.contains_key(src) && self.slaves.len() >= max {
                    return cx.fx.warn_peer(
                        src,
                        format!("g_slave from {src} ignored: {max} slaves already"),
                    );
                }
                self.slaves.entry(src.to_owned()).or_default();
                self.set(src, db, cx);
            }
            GlobalRequest::Set { db } => {
                let binds = db.get("'l").and_then(|l| l.get(src).cloned());
                self.set(src, db, cx);
                // A global node's listeners are mirrored as our own entry, so that every
                // global node can find every other.
                cx.fx.push(Effect::Own {
                    family: "'l".into(),
                    key: src.to_owned(),
                    value: Some(binds.unwrap_or(Value::Null)),
                });
            }
            GlobalRequest::Update { family, set, del } => {
                self.update_and_tell(src, &family, family_of(set), del, cx);
            }
            GlobalRequest::Find { node } => {
                let mut reply = node_message(4, "g_found");
                msg::text(&node, &mut reply);
                match self.db.get("'l").and_then(|l| l.get(&*node)) {
                    Some(addrs) => reply.extend_from_slice(addrs),
                    None => reply.push(NULL),
                }
                cx.fx.send_message(src, reply, WHAT);
            }
            GlobalRequest::Query { query, family, id } => {
                let empty = Family::new();
                let entries = self.db.get(&family).unwrap_or(&empty);
                let mut reply = node_message(4, "g_reply");
                id.encode_into(&mut reply);
                match query {
                    Query::Family => write_family(entries.iter(), &mut reply),
                    Query::Keys => {
                        msg::array_header(entries.len() as u64, &mut reply);
                        for key in entries.keys() {
                            msg::text(key, &mut reply);
                        }
                    }
                    Query::Values => {
                        msg::array_header(entries.len() as u64, &mut reply);
                        for value in entries.values() {
                            reply.extend_from_slice(value);
                        }
                    }
                }
                cx.fx.send_message(src, reply, WHAT);
            }
            GlobalRequest::Watch { family } => {
                let new_slave = !self.slaves.contains_key(src);
                let watched = self.slaves.get(src).map_or(0, BTreeSet::len);
                let known = self.slaves.get(src).is_some_and(|w| w.contains(&family));
                let refused = if new_slave && self.slaves.len() >= limits.max_slaves {
                    Some(format!("{} slaves already", limits.max_slaves))
                } else if !known && watched >= limits.max_monitors_per_node {
                    Some("too many monitors".to_owned())
                } else if !known && self.monitors >= limits.max_monitors {
                    Some(format!("{} monitors already", limits.max_monitors))
                } else {
                    None
                };
                if let Some(why) = refused {
                    self.hits.hit(Limit::GlobalMonitors);
                    return cx
                        .fx
                        .warn_peer(src, format!("g_mon1 {family} from {src} ignored: {why}"));
                }
                let watched = self.slaves.entry(src.to_owned()).or_default();
                if watched.insert(family.clone()) {
                    self.monitors = self.monitors.saturating_add(1);
                }
                self.mons
                    .entry(family.clone())
                    .or_default()
                    .insert(src.to_owned());
                let mut reply = node_message(4, "g_chg1");
                msg::text(&family, &mut reply);
                match self.db.get(&family) {
                    Some(entries) => write_family(entries.iter(), &mut reply),
                    None => reply.push(NULL),
                }
                cx.fx.send_message(src, reply, WHAT);
            }
            GlobalRequest::Unwatch { family } => {
                if let Some(nodes) = self.mons.get_mut(&family) {
                    nodes.remove(src);
                    if nodes.is_empty() {
                        self.mons.remove(&family);
                    }
                }
                if let Some(watched) = self.slaves.get_mut(src)
                    && watched.remove(&family)
                {
                    self.monitors = self.monitors.saturating_sub(1);
                }
            }
            GlobalRequest::IsGlobal => {
                // Usually nothing to forget, but a slave may have become global.
                Service::disconnect(src, cx.fx);
                cx.fx.push(Effect::IsGlobal(src.to_owned()));
                Service::meet(src, cx.fx);
            }
            // Answers to a slave: not served (see `serves`).
            GlobalRequest::Reply { .. }
            | GlobalRequest::Found { .. }
            | GlobalRequest::Whole { .. }
            | GlobalRequest::Changed { .. } => {}
        }
    }

    /// Every family of `db` (a map of maps) as `node`'s entries.
    fn set(&mut self, node: &str, db: BTreeMap<String, Entries>, cx: &mut Cx<'_, '_>) {
        for (family, set) in db {
            self.update_and_tell(node, &family, family_of(set), Vec::new(), cx);
        }
    }

    /// Applies an update of `node`'s entries and sends what follows from it.
    fn update_and_tell(
        &mut self,
        node: &str,
        family: &str,
        set: Family,
        del: Vec<String>,
        cx: &mut Cx<'_, '_>,
    ) {
        let effects = self.update(&cx.view.config.global_limits, node, family, set, del);
        if effects.dropped > 0 {
            self.hits.hit(Limit::GlobalDb);
            cx.fx.warn_peer(
                node,
                format!(
                    "{} entries of {node} in family {family} ignored: database limit reached",
                    effects.dropped
                ),
            );
        }
        // Each message is encoded once, whoever it goes to.
        let update = |tag: &str, (set, del): (Family, Vec<String>)| {
            let mut out = node_message(5, tag);
            msg::text(family, &mut out);
            write_family(set.iter(), &mut out);
            msg::array_header(del.len() as u64, &mut out);
            for key in &del {
                msg::text(key, &mut out);
            }
            out
        };
        if let Some(relay) = effects.relay {
            let nodes = cx.view.globals.iter().cloned().collect();
            let message = update("g_upd", relay);
            cx.fx.push(Effect::Broadcast { nodes, message });
        }
        if let Some(notify) = effects.notify {
            let nodes = self
                .mons
                .get(family)
                .into_iter()
                .flatten()
                .cloned()
                .collect();
            let message = update("g_chg2", notify);
            cx.fx.push(Effect::Broadcast { nodes, message });
        }
        if family == "'g" {
            self.keep_sync(cx);
        }
    }

    /// A global node we met: note it as global in `'g` and send it our slaves' entries.
    pub(super) fn meet(node: &str, fx: &mut Effects) {
        fx.push(Effect::Own {
            family: "'g".into(),
            key: node.to_owned(),
            value: Some(Value::Null),
        });
        // After the entry above reached our own shard, so that it is in what is sent.
        fx.push(Effect::ShareDb(node.to_owned()));
    }

    /// `node` went down (or turned global): our mirrors of its `'g` and `'l` entries go,
    /// then ([`Effect::Forget`]) what it held.
    fn disconnect(node: &str, fx: &mut Effects) {
        for family in ["'g", "'l"] {
            fx.push(Effect::Own {
                family: family.into(),
                key: node.to_owned(),
                value: None,
            });
        }
        fx.push(Effect::Forget(node.to_owned()));
    }

    /// Forgets `node`'s entries (deleted while it is still a slave, so that other global
    /// nodes learn it too), monitors and slavery.
    pub(super) fn forget(&mut self, node: &str, cx: &mut Cx<'_, '_>) {
        let held: Vec<(String, Vec<String>)> = self
            .shards
            .get(node)
            .into_iter()
            .flat_map(|s| &s.families)
            .map(|(f, entries)| (f.clone(), entries.keys().map(|k| k.to_string()).collect()))
            .collect();
        for (family, keys) in held {
            self.update_and_tell(node, &family, Family::new(), keys, cx);
        }
        if let Some(shard) = self.shards.remove(node) {
            self.entries = self.entries.saturating_sub(shard.entries);
            self.bytes = self.bytes.saturating_sub(shard.bytes);
        }
        if let Some(watched) = self.slaves.remove(node) {
            self.monitors = self.monitors.saturating_sub(watched.len());
        }
        self.mons.retain(|_, nodes| {
            nodes.remove(node);
            !nodes.is_empty()
        });
    }

    /// A node came up: tell it we are global.
    pub(super) fn node_up(&mut self, node: &str, cx: &mut Cx<'_, '_>) {
        cx.fx.send(node, vec![Value::text("g_global")], WHAT);
        self.keep_sync(cx);
    }

    /// A node went down: forget what it held; dial it again if it is a global node.
    pub(super) fn node_down(node: &str, fx: &mut Effects) {
        Service::disconnect(node, fx);
        fx.push(Effect::Keep);
    }

    // ---- keeping the global nodes connected ---------------------------------------------

    /// Recomputes the global nodes to keep connected from `'g`; when one of them is down
    /// and newly so, starts dialling with a fresh backoff (0.3-0.6 s, doubling up to
    /// `monitor_timeout`).
    pub(super) fn keep_sync(&mut self, cx: &mut Cx<'_, '_>) {
        let max = cx.view.config.global_limits.max_global_nodes;
        let names = self.db.get("'g").into_iter().flat_map(BTreeMap::keys);
        let keep: BTreeSet<String> = names
            .filter(|n| ***n != *cx.view.node_id)
            .take(max)
            .map(|n| n.to_string())
            .collect();
        let added = keep.difference(&self.keep).next().is_some();
        self.keep = keep;
        if self.kept_down(cx.view).is_empty() {
            self.keep_at = None;
        } else if added || self.keep_at.is_none() {
            self.keep_retry = cx.jitter.scale(300);
            self.keep_all(cx);
        }
    }

    /// Kept global nodes without a working connection (being dialled or not).
    fn kept_down(&self, view: &View<'_>) -> Vec<String> {
        self.keep
            .iter()
            .filter(|n| !view.is_up(n))
            .cloned()
            .collect()
    }

    /// Dials every kept node that is down and re-arms the retry timer.
    pub(super) fn keep_all(&mut self, cx: &mut Cx<'_, '_>) {
        let down = self.kept_down(cx.view);
        if down.is_empty() {
            self.keep_at = None;
            return;
        }
        let max = cx.view.config.transport.monitor_timeout_ms;
        self.keep_at = Some(cx.view.now.saturating_add(self.keep_retry));
        self.keep_retry = self.keep_retry.saturating_mul(2).min(max);
        for node in down {
            cx.fx.push(Effect::Reach(node));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fam(pairs: &[(&str, i128)]) -> Family {
        pairs
            .iter()
            .map(|(k, v)| (Key::from(*k), Stored::from(Value::Int(*v).encode())))
            .collect()
    }

    /// The merged view's value of `key` in `family`.
    fn held(s: &Service, family: &str, key: &str) -> Value {
        Value::decode(&s.db[family][key]).unwrap()
    }

    fn bytes(key: &str, len: usize) -> Family {
        Family::from([(
            Key::from(key),
            Stored::from(Value::Bytes(vec![0; len]).encode()),
        )])
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
        assert_eq!(held(&s, "f", "k"), Value::Int(3));
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
        let one = entry_size("a", &Value::Int(1).encode());
        let family = family_size("f");
        let limits = GlobalLimits {
            max_entries_per_node: 2,
            max_bytes_per_node: family + 2 * one + one / 2,
            ..GlobalLimits::default()
        };
        let mut s = Service::default();
        let e = s.update(
            &limits,
            "n",
            "f",
            fam(&[("a", 1), ("b", 2), ("c", 3)]),
            vec![],
        );
        assert_eq!(e.dropped, 1);
        assert_eq!(
            (s.shards["n"].entries, s.shards["n"].bytes),
            (2, family + 2 * one)
        );
        // Replacing fits; a larger value does not.
        let e = s.update(&limits, "n", "f", fam(&[("a", 5)]), vec![]);
        assert_eq!(e.dropped, 0);
        let e = s.update(&limits, "n", "f", bytes("a", one), vec![]);
        assert_eq!(e.dropped, 1);
        assert_eq!(held(&s, "f", "a"), Value::Int(5));
        s.update(
            &limits,
            "n",
            "f",
            Family::new(),
            vec!["a".into(), "b".into()],
        );
        assert!(s.shards.is_empty());
        assert_eq!((s.entries, s.bytes), (0, 0));
    }

    /// Many nodes, each well within its own limits, cannot take the database past its
    /// totals; what was stored stays, and deletions make room again.
    #[test]
    fn the_totals_bound_all_nodes_together() {
        let one = entry_size("k00", &Value::Int(1).encode());
        let limits = GlobalLimits {
            max_entries: 25,
            max_bytes: 1000 * one,
            ..GlobalLimits::default()
        };
        let mut s = Service::default();
        let mut dropped = 0;
        for n in 0..10 {
            let set = (0..5)
                .map(|k| {
                    (
                        Key::from(format!("k{n}{k}")),
                        Stored::from(Value::Int(1).encode()),
                    )
                })
                .collect();
            dropped += s
                .update(&limits, &format!("n{n}"), "f", set, vec![])
                .dropped;
        }
        assert_eq!((s.entries, dropped), (25, 25));
        assert_eq!(s.db["f"].len(), 25);
        // Replacing a held key needs no room.
        let e = s.update(&limits, "n0", "f", fam(&[("k00", 7)]), vec![]);
        assert_eq!(e.dropped, 0);
        // In bytes too.
        let big = bytes("k00", one);
        let bytes = GlobalLimits {
            max_bytes: s.bytes + one / 2,
            ..limits
        };
        let e = s.update(&bytes, "n0", "f", fam(&[("k00", 8)]), vec![]);
        assert_eq!(e.dropped, 0, "same size");
        assert_eq!(s.update(&bytes, "n0", "f", big, vec![]).dropped, 1);
        assert_eq!(held(&s, "f", "k00"), Value::Int(8));
        // A node's deletions give its room back to everyone.
        s.update(
            &limits,
            "n1",
            "f",
            Family::new(),
            (0..5).map(|k| format!("k1{k}")).collect(),
        );
        assert_eq!(s.entries, 20);
        let e = s.update(&limits, "n9", "f", fam(&[("late", 1)]), vec![]);
        assert_eq!(e.dropped, 0);
    }

    /// Every key and value is held once: the shard's and the merged view's entries share
    /// one allocation each (`tests/db_memory.rs` measures what an entry takes).
    #[test]
    fn entries_are_held_once() {
        let limits = GlobalLimits::default();
        let mut s = Service::default();
        s.update(&limits, "n", "f", bytes("k", 100), vec![]);
        let (shard_key, shard_value) = s.shards["n"].get("f", "k").unwrap();
        let (merged_key, merged_value) = s.db["f"].get_key_value("k").unwrap();
        assert!(Arc::ptr_eq(shard_key, merged_key));
        assert!(Arc::ptr_eq(shard_value, merged_value));
        assert_eq!(s.bytes, family_size("f") + entry_size("k", shard_value));
    }
}
