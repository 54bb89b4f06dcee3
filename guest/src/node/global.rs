//! The client side of the global protocol: keep seeds connected, slave to the first seed
//! that is up (the master; a global node is its own), find nodes through it, and share a
//! key/value database. The global node side is in `seed`.
//!
//! Requests to the master (`g_find`, `g_mon1`, `g_db_*`) are kept until answered and sent
//! again to every new master, as the reference does.

use std::collections::BTreeMap;

use super::effect::{Effect, Effects, Jitter, View};
use super::request::{Entries, GlobalRequest, Query};
use super::{ConnId, LogLevel, NodeOutput, ids};
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
}

impl Default for Global {
    fn default() -> Self {
        Global {
            master: None,
            local_db: BTreeMap::new(),
            pending: BTreeMap::new(),
            next_id: "a".into(),
            mirrors: BTreeMap::new(),
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
    fn set_local(&mut self, family: &str, key: &str, value: Value) -> bool {
        let entries = self.local_db.entry(family.to_owned()).or_default();
        if entries.get(key) == Some(&value) {
            return false;
        }
        entries.insert(key.to_owned(), value);
        true
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

/// What global requests are logged as when they cannot be sent.
const WHAT: &str = "global request";

impl Global {
    /// Makes `node` our master: sends it our database and every pending request.
    pub(super) fn master_set(&mut self, node: &str, view: &View<'_>, fx: &mut Effects) {
        self.master = Some(node.to_owned());
        fx.log(LogLevel::Info, format!("global master is {node}"));
        fx.send(
            node,
            vec![Value::text("g_slave"), self.local_db_value()],
            WHAT,
        );
        for (_, sent) in self.pending.values_mut() {
            *sent = false;
        }
        self.flush(view, fx);
    }

    /// A seed completed its handshake as `node`: slave to it, and make it master if we
    /// have none.
    pub(super) fn seed_up(&mut self, node: &str, view: &View<'_>, fx: &mut Effects) {
        fx.send(node, vec![Value::text("g_slave")], WHAT);
        if self.master.is_none() {
            self.master_set(node, view, fx);
        }
    }

    /// The master, when it can be reached now (a global node is its own master).
    fn master_up(&self, view: &View<'_>) -> Option<String> {
        let master = self.master.as_ref()?;
        (master == view.node_id || view.is_up(master)).then(|| master.clone())
    }

    /// Sends requests the current master has not seen yet.
    pub(super) fn flush(&mut self, view: &View<'_>, fx: &mut Effects) {
        let Some(master) = self.master_up(view) else {
            return;
        };
        for (items, sent) in self.pending.values_mut().filter(|(_, sent)| !*sent) {
            *sent = true;
            fx.send(&master, items.clone(), WHAT);
        }
    }

    /// Asks the master where `node` listens.
    pub(super) fn find(&mut self, node: &str, view: &View<'_>, fx: &mut Effects) {
        self.request(
            format!("g_find {node}"),
            vec![Value::text("g_find"), Value::text(node)],
        );
        self.flush(view, fx);
    }

    /// `g_reply`, `g_found`, `g_chg1`, `g_chg2` from `src` (the answers to a slave).
    pub(super) fn answer(&mut self, src: &str, request: GlobalRequest, fx: &mut Effects) {
        let from_master = self.master.as_deref() == Some(src);
        match request {
            GlobalRequest::Reply { id, result } => {
                if self.pending.remove(&id).is_some() {
                    let result = result.encode();
                    fx.output(NodeOutput::DbReply { id, result });
                }
            }
            GlobalRequest::Found { node, addrs } => {
                self.pending.remove(&format!("g_find {node}"));
                fx.push(Effect::Found { node, addrs });
            }
            GlobalRequest::Whole { family, entries } if from_master => {
                let Some(mirror) = self.mirrors.get_mut(&family) else {
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
                fx.output(NodeOutput::DbChange { family, change });
            }
            GlobalRequest::Changed { family, set, del } if from_master => {
                let Some(mirror) = self.mirrors.get_mut(&family) else {
                    return;
                };
                let change = db_change(&set, &del);
                mirror.extend(set);
                for key in &del {
                    mirror.remove(key);
                }
                fx.output(NodeOutput::DbChange { family, change });
            }
            other => fx.log(
                LogLevel::Debug,
                format!("{} from {src} ignored", other.tag()),
            ),
        }
    }

    // ---- the shared database ------------------------------------------------------------

    /// Sets our entry `key` of `family` to `value` and tells the master.
    pub(super) fn put(&mut self, family: &str, key: &str, value: Value, fx: &mut Effects) {
        if !self.set_local(family, key, value.clone()) {
            return;
        }
        if let Some(master) = &self.master {
            let set = Value::Map(vec![(Value::text(key), value)]);
            let items = vec![Value::text("g_upd"), Value::text(family), set];
            fx.send(master, items, WHAT);
        }
    }

    /// Deletes our entries `keys` of `family` and tells the master.
    pub(super) fn delete(&mut self, family: &str, keys: &[&str], fx: &mut Effects) {
        let Some(entries) = self.local_db.get_mut(family) else {
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
        if let Some(master) = &self.master {
            let items = vec![
                Value::text("g_upd"),
                Value::text(family),
                Value::Null,
                Value::Array(gone),
            ];
            fx.send(master, items, WHAT);
        }
    }

    /// Asks the master for part of `family`; the answer comes as
    /// [`NodeOutput::DbReply`] with the returned id.
    pub(super) fn query(
        &mut self,
        query: Query,
        family: &str,
        view: &View<'_>,
        fx: &mut Effects,
    ) -> String {
        let id = self.fresh_id();
        let items = vec![
            Value::text(query.tag()),
            Value::text(family),
            Value::text(id.as_str()),
        ];
        self.request(id.clone(), items);
        self.flush(view, fx);
        id
    }

    /// Monitors `family`: [`NodeOutput::DbChange`] reports its contents, then each change.
    pub(super) fn watch(&mut self, family: &str, view: &View<'_>, fx: &mut Effects) {
        if self.mirrors.contains_key(family) {
            return;
        }
        self.mirrors.insert(family.to_owned(), BTreeMap::new());
        self.request(
            format!("mon1 {family}"),
            vec![Value::text("g_mon1"), Value::text(family)],
        );
        self.flush(view, fx);
    }

    /// Stops monitoring `family`.
    pub(super) fn unwatch(&mut self, family: &str, view: &View<'_>, fx: &mut Effects) {
        if self.mirrors.remove(family).is_none() {
            return;
        }
        self.pending.remove(&format!("mon1 {family}"));
        if let Some(master) = self.master_up(view) {
            fx.send(
                &master,
                vec![Value::text("g_mon0"), Value::text(family)],
                WHAT,
            );
        }
    }
}

/// A seed address and its connection state.
#[derive(Debug)]
struct Seed {
    addr: String,
    conn: Option<ConnId>,
    node: Option<String>,
    up: bool,
    /// The address is our own: not dialled again (and we are global).
    myself: bool,
}

/// The seeds, kept connected with a backoff: the node dials what [`Seeds::due`] returns.
#[derive(Debug)]
pub(super) struct Seeds {
    list: Vec<Seed>,
    retry: u64,
    next_at: Option<u64>,
}

impl Seeds {
    pub(super) fn new(addrs: &[String]) -> Seeds {
        let list = addrs
            .iter()
            .map(|addr| Seed {
                addr: addr.clone(),
                conn: None,
                node: None,
                up: false,
                myself: false,
            })
            .collect();
        Seeds {
            list,
            retry: 0,
            next_at: None,
        }
    }

    pub(super) fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// When [`Seeds::due`] has seeds to dial again.
    pub(super) fn next_at(&self) -> Option<u64> {
        self.next_at
    }

    /// Starts afresh with a new backoff (0.6-1.2 s); returns the seeds to dial.
    pub(super) fn again(
        &mut self,
        jitter: &mut Jitter,
        now: u64,
        max: u64,
    ) -> Vec<(usize, String)> {
        self.retry = jitter.scale(600);
        self.due(now, max)
    }

    /// The seeds (index and address) that are neither up nor being dialled, to dial
    /// now; re-arms the retry timer (doubling up to `max`) while any seed is not up.
    pub(super) fn due(&mut self, now: u64, max: u64) -> Vec<(usize, String)> {
        let due = self
            .list
            .iter()
            .enumerate()
            .filter(|(_, s)| !s.up && !s.myself && s.conn.is_none())
            .map(|(i, s)| (i, s.addr.clone()))
            .collect();
        if self.list.iter().all(|s| s.up || s.myself) {
            self.next_at = None;
        } else {
            self.next_at = Some(now.saturating_add(self.retry));
            self.retry = self.retry.saturating_mul(2).min(max);
        }
        due
    }

    /// Seed `i` is being dialled on `conn`.
    pub(super) fn dialling(&mut self, i: usize, conn: ConnId) {
        if let Some(seed) = self.list.get_mut(i) {
            seed.conn = Some(conn);
        }
    }

    /// Seed `i`'s connection ended; true if it was up, when the backoff is to start
    /// afresh ([`Seeds::again`]). A failed attempt waits for the retry timer.
    pub(super) fn lost(&mut self, i: usize, now: u64) -> bool {
        let Some(seed) = self.list.get_mut(i) else {
            return false;
        };
        let was_up = seed.up;
        seed.conn = None;
        seed.up = false;
        if !was_up && self.next_at.is_none() {
            self.next_at = Some(now.saturating_add(self.retry));
        }
        was_up
    }

    /// Seed `i` is this node itself.
    pub(super) fn myself(&mut self, i: usize) {
        if let Some(seed) = self.list.get_mut(i) {
            seed.myself = true;
        }
    }

    /// Seed `i` completed its handshake as `node`.
    pub(super) fn up(&mut self, i: usize, node: &str) {
        if let Some(seed) = self.list.get_mut(i) {
            seed.up = true;
            seed.node = Some(node.to_owned());
        }
    }

    /// The first seed that is up, by its node id.
    pub(super) fn first_up(&self, view: &View<'_>) -> Option<String> {
        // The seed just lost may still be marked up: skip nodes that are not.
        self.list
            .iter()
            .filter(|s| s.up)
            .filter_map(|s| s.node.clone())
            .find(|n| view.is_up(n))
    }
}
