//! The client side of the global protocol: keep seeds connected, slave to the first seed
//! that is up (the master; a global node is its own), find nodes through it, and share a
//! key/value database. The global node side is in `seed`.
//!
//! Requests to the master (`g_find`, `g_mon1`, `g_db_*`) are kept until answered and sent
//! again to every new master, as the reference does.

use std::collections::{BTreeMap, BTreeSet};

use super::request::{Entries, GlobalRequest};
use super::{ConnId, LogLevel, Node, NodeError, NodeOutput, Outgoing, Shared, ids, msg};
use crate::error::MessageError;
use crate::value::Value;

/// Global-protocol state of a normal node.
#[derive(Debug)]
pub(super) struct Global {
    master: Option<String>,
    /// Our own entries: family -> key -> value (sent with `g_slave`).
    local_db: BTreeMap<String, BTreeMap<String, Value>>,
    /// Requests waiting for an answer: key -> (message items after `""`, sent to the
    /// current master).
    pending: BTreeMap<String, (Vec<Value>, bool)>,
    next_id: String,
    /// Mirrors of monitored families.
    mirrors: BTreeMap<String, BTreeMap<String, Value>>,
    /// Nodes that announced themselves as global (`g_global`).
    globals: BTreeSet<String>,
}

impl Default for Global {
    fn default() -> Self {
        Global {
            master: None,
            local_db: BTreeMap::new(),
            pending: BTreeMap::new(),
            next_id: "a".into(),
            mirrors: BTreeMap::new(),
            globals: BTreeSet::new(),
        }
    }
}

impl Global {
    pub(super) fn master(&self) -> Option<&str> {
        self.master.as_deref()
    }

    pub(super) fn master_lost(&mut self) {
        self.master = None;
    }

    /// Sets a local entry; false when the value is unchanged.
    pub(super) fn set_local(&mut self, family: &str, key: &str, value: Value) -> bool {
        let entries = self.local_db.entry(family.to_owned()).or_default();
        if entries.get(key) == Some(&value) {
            return false;
        }
        entries.insert(key.to_owned(), value);
        true
    }

    /// Whether `node` announced itself as global and is still up.
    pub(super) fn is_global(&self, node: &str) -> bool {
        self.globals.contains(node)
    }

    /// Notes that `node` is a global node.
    pub(super) fn add_global(&mut self, node: &str) {
        self.globals.insert(node.to_owned());
    }

    /// `node` went down or is forgotten as a global node.
    pub(super) fn remove_global(&mut self, node: &str) {
        self.globals.remove(node);
    }

    /// The global nodes that are up.
    pub(super) fn globals(&self) -> Vec<String> {
        self.globals.iter().cloned().collect()
    }

    /// Drops a pending `g_find` for `node`.
    pub(super) fn forget_find(&mut self, node: &str) {
        self.pending.remove(&format!("g_find {node}"));
    }

    /// Records a request for the master under `key`.
    fn request(&mut self, key: String, items: Vec<Value>) {
        self.pending.insert(key, (items, false));
    }

    fn fresh_id(&mut self) -> String {
        ids::increment(&mut self.next_id);
        self.next_id.clone()
    }

    fn local_db_value(&self) -> Value {
        Value::Map(
            self.local_db
                .iter()
                .map(|(family, entries)| {
                    let entries = entries
                        .iter()
                        .map(|(k, v)| (Value::text(k.as_str()), v.clone()))
                        .collect();
                    (Value::text(family.as_str()), Value::Map(entries))
                })
                .collect(),
        )
    }
}

/// A [`NodeOutput::DbChange`]'s `[SET, DEL]`.
fn db_change(set: &BTreeMap<String, Value>, del: &[String]) -> Vec<u8> {
    let del = del.iter().map(|k| Value::text(k.as_str())).collect();
    Value::Array(vec![map_value(set), Value::Array(del)]).encode()
}

pub(super) fn map_value(entries: &BTreeMap<String, Value>) -> Value {
    Value::Map(
        entries
            .iter()
            .map(|(k, v)| (Value::text(k.as_str()), v.clone()))
            .collect(),
    )
}

impl Node {
    // ---- seeds and master --------------------------------------------------------------

    /// (Re)starts keeping the seeds connected, with a fresh backoff.
    pub(super) fn seed_again(&mut self, now: u64) {
        self.seed_retry = 600 * self.jitter_permille() / 1000;
        self.seed_all(now);
    }

    /// Dials every seed that is neither up nor being dialled; re-arms the retry timer
    /// (doubling up to `monitor_timeout`) while any seed is not up.
    pub(super) fn seed_all(&mut self, now: u64) {
        for i in 0..self.seeds.len() {
            if self.seeds[i].up || self.seeds[i].myself || self.seeds[i].conn.is_some() {
                continue;
            }
            let addr = self.seeds[i].addr.clone();
            let conn = self.alloc_conn(&addr, None, Some(i));
            self.seeds[i].conn = Some(conn);
            self.outputs.push_back(NodeOutput::Connect { conn, addr });
        }
        if self.seeds.iter().all(|s| s.up || s.myself) {
            self.next_seed_at = None;
        } else {
            self.next_seed_at = Some(now.saturating_add(self.seed_retry));
            self.seed_retry = (self.seed_retry * 2).min(self.config.transport.monitor_timeout_ms);
        }
    }

    /// A seed connection ended. After a working connection the backoff starts afresh;
    /// a failed attempt waits for the retry timer that is already armed.
    pub(super) fn seed_lost(&mut self, i: usize) {
        let Some(seed) = self.seeds.get_mut(i) else {
            return;
        };
        let was_up = seed.up;
        seed.conn = None;
        seed.up = false;
        let now = self.now;
        if was_up {
            self.seed_again(now);
        } else if self.next_seed_at.is_none() {
            self.next_seed_at = Some(now.saturating_add(self.seed_retry));
        }
    }

    /// A connection reached ourselves: if it was dialled for a seed, that seed is us, so we
    /// become a global node (as every seed is).
    pub(super) fn found_myself(&mut self, conn: ConnId) {
        let Some(i) = self.conns.get(&conn).and_then(|c| c.seed) else {
            return;
        };
        if let Some(seed) = self.seeds.get_mut(i) {
            seed.myself = true;
        }
        let now = self.now;
        self.become_global(now);
    }

    /// A seed completed its handshake as `node`.
    pub(super) fn seed_up(&mut self, i: usize, node: &str) {
        if let Some(seed) = self.seeds.get_mut(i) {
            seed.up = true;
            seed.node = Some(node.to_owned());
        }
        let now = self.now;
        self.send_node(node, vec![Value::text("g_slave")], now);
        if self.global.master.is_none() {
            self.master_set(node, now);
        }
    }

    /// Picks the first seed that is up as master, if any.
    pub(super) fn master_search(&mut self) {
        // The seed just lost may still be marked up: skip nodes that are not.
        let up = self
            .seeds
            .iter()
            .filter(|s| s.up)
            .filter_map(|s| s.node.clone())
            .find(|n| self.is_up(n));
        if let Some(node) = up {
            let now = self.now;
            self.master_set(&node, now);
        }
    }

    /// Makes `node` our master: sends it our database and every pending request.
    pub(super) fn master_set(&mut self, node: &str, now: u64) {
        self.global.master = Some(node.to_owned());
        self.log(LogLevel::Info, format!("global master is {node}"));
        let db = self.global.local_db_value();
        self.send_node(node, vec![Value::text("g_slave"), db], now);
        for (_, sent) in self.global.pending.values_mut() {
            *sent = false;
        }
        self.flush_global(now);
    }

    /// The master, when it can be reached now (a global node is its own master).
    fn master_up(&self) -> Option<String> {
        let master = self.global.master.as_ref()?;
        (*master == self.node_id || self.is_up(master)).then(|| master.clone())
    }

    /// Sends requests the current master has not seen yet.
    pub(super) fn flush_global(&mut self, now: u64) {
        let Some(master) = self.master_up() else {
            return;
        };
        let unsent: Vec<Vec<Value>> = self
            .global
            .pending
            .values_mut()
            .filter(|(_, sent)| !*sent)
            .map(|(items, sent)| {
                *sent = true;
                items.clone()
            })
            .collect();
        for items in unsent {
            self.send_node(&master, items, now);
        }
    }

    /// Sends `["", items...]` to `node`.
    pub(super) fn send_node(&mut self, node: &str, items: Vec<Value>, now: u64) {
        self.send_node_message(node, &msg::build("", items), now);
    }

    /// Sends a node-port message `["", ...]`, already encoded, to `node`.
    pub(super) fn send_node_message(&mut self, node: &str, message: &[u8], now: u64) {
        if let Err(e) = self.route(node, message, false, now) {
            self.log(
                LogLevel::Warn,
                format!("global request to {node} dropped: {e}"),
            );
        }
    }

    /// Sends a node-port message, encoded once, to each of `nodes`: their connections
    /// share the one copy while it waits for room in the outputs.
    pub(super) fn broadcast(&mut self, nodes: Vec<String>, message: Vec<u8>, now: u64) {
        let shared = Shared::from(message);
        for node in nodes {
            match self.working_conn(&node) {
                Some(conn) => self.transmit(conn, Outgoing::Shared(&shared), false),
                None => self.send_node_message(&node, &shared, now),
            }
        }
    }

    /// Asks the master where `node` listens; false when there is nobody to ask.
    pub(super) fn find(&mut self, node: &str) -> bool {
        if self.seeds.is_empty() && self.service.is_none() {
            return false;
        }
        self.global.request(
            format!("g_find {node}"),
            vec![Value::text("g_find"), Value::text(node)],
        );
        true
    }

    // ---- answers from global nodes ----------------------------------------------------

    /// `g_global`, `g_reply`, `g_found`, `g_chg1`, `g_chg2` from `src`.
    pub(super) fn global_request(&mut self, src: &str, request: GlobalRequest, now: u64) {
        let from_master = self.global.master.as_deref() == Some(src);
        match request {
            GlobalRequest::IsGlobal => self.global.add_global(src),
            GlobalRequest::Reply { id, result } => {
                if self.global.pending.remove(&id).is_some() {
                    let result = result.encode();
                    self.outputs.push_back(NodeOutput::DbReply { id, result });
                }
            }
            GlobalRequest::Found { node, addrs } => {
                self.global.pending.remove(&format!("g_find {node}"));
                let finding = self
                    .peers
                    .get(&node)
                    .and_then(|p| p.connecting.as_ref())
                    .is_some_and(|(d, _)| d.finding);
                if finding {
                    self.connect_to(&node, addrs, now);
                }
            }
            GlobalRequest::Whole { family, entries } if from_master => {
                let Some(mirror) = self.global.mirrors.get_mut(&family) else {
                    return;
                };
                let del: Vec<String> = mirror
                    .keys()
                    .filter(|k| !entries.contains_key(*k))
                    .cloned()
                    .collect();
                let set: Entries = entries
                    .iter()
                    .filter(|(k, v)| mirror.get(*k) != Some(v))
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect();
                *mirror = entries;
                let change = db_change(&set, &del);
                self.outputs
                    .push_back(NodeOutput::DbChange { family, change });
            }
            GlobalRequest::Changed { family, set, del } if from_master => {
                let Some(mirror) = self.global.mirrors.get_mut(&family) else {
                    return;
                };
                let change = db_change(&set, &del);
                mirror.extend(set);
                for key in &del {
                    mirror.remove(key);
                }
                self.outputs
                    .push_back(NodeOutput::DbChange { family, change });
            }
            other => self.log(
                LogLevel::Debug,
                format!("{} from {src} ignored", other.tag()),
            ),
        }
    }

    // ---- the shared database ------------------------------------------------------------

    /// Sets our entry `key` of `family` to `value` (CBOR) and tells the master.
    pub fn db_set(
        &mut self,
        family: &str,
        key: &str,
        value: &[u8],
        now: u64,
    ) -> Result<(), NodeError> {
        let value = Value::decode(value).map_err(|e| MessageError::Malformed {
            framing: "cbor",
            detail: e.to_string(),
        })?;
        self.db_put(family, key, value, now);
        Ok(())
    }

    pub(super) fn db_put(&mut self, family: &str, key: &str, value: Value, now: u64) {
        self.now = now;
        if !self.global.set_local(family, key, value.clone()) {
            return;
        }
        if let Some(master) = self.global.master.clone() {
            let set = Value::Map(vec![(Value::text(key), value)]);
            self.send_node(
                &master,
                vec![Value::text("g_upd"), Value::text(family), set],
                now,
            );
        }
    }

    /// Deletes our entries `keys` of `family` and tells the master.
    pub fn db_del(&mut self, family: &str, keys: &[&str], now: u64) {
        self.now = now;
        let Some(entries) = self.global.local_db.get_mut(family) else {
            return;
        };
        let gone: Vec<Value> = keys
            .iter()
            .filter(|k| entries.remove(**k).is_some())
            .map(|k| Value::text(*k))
            .collect();
        if gone.is_empty() {
            return;
        }
        if let Some(master) = self.global.master.clone() {
            let items = vec![
                Value::text("g_upd"),
                Value::text(family),
                Value::Null,
                Value::Array(gone),
            ];
            self.send_node(&master, items, now);
        }
    }

    /// Asks the master for the whole `family` (a map); the answer comes as
    /// [`NodeOutput::DbReply`] with the returned id.
    pub fn db_family(&mut self, family: &str, now: u64) -> String {
        self.db_query("g_db_family", family, now)
    }

    /// Asks the master for the keys of `family` (an array).
    pub fn db_keys(&mut self, family: &str, now: u64) -> String {
        self.db_query("g_db_keys", family, now)
    }

    /// Asks the master for the values of `family` (an array).
    pub fn db_values(&mut self, family: &str, now: u64) -> String {
        self.db_query("g_db_values", family, now)
    }

    fn db_query(&mut self, tag: &str, family: &str, now: u64) -> String {
        self.now = now;
        let id = self.global.fresh_id();
        let items = vec![
            Value::text(tag),
            Value::text(family),
            Value::text(id.as_str()),
        ];
        self.global.request(id.clone(), items);
        self.flush_global(now);
        id
    }

    /// Monitors `family`: [`NodeOutput::DbChange`] reports its contents, then each change.
    pub fn db_mon(&mut self, family: &str, now: u64) {
        self.now = now;
        if self.global.mirrors.contains_key(family) {
            return;
        }
        self.global
            .mirrors
            .insert(family.to_owned(), BTreeMap::new());
        self.global.request(
            format!("mon1 {family}"),
            vec![Value::text("g_mon1"), Value::text(family)],
        );
        self.flush_global(now);
    }

    /// Stops monitoring `family`.
    pub fn db_unmon(&mut self, family: &str, now: u64) {
        self.now = now;
        if self.global.mirrors.remove(family).is_none() {
            return;
        }
        self.global.pending.remove(&format!("mon1 {family}"));
        if let Some(master) = self.master_up() {
            self.send_node(
                &master,
                vec![Value::text("g_mon0"), Value::text(family)],
                now,
            );
        }
    }
}
