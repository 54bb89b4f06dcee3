//! Subscriptions that cannot lose what they subscribed to, one handle each: a [`Monitor`]
//! resolves when its port dies, [`Requests`] receives the node-port requests of one tag,
//! a [`DbMonitor`] the changes of one database family, and [`super::Node::wait_up`]
//! waits for one node. (The broadcast [`super::Node::events`] is for observing: a
//! subscriber that falls behind misses events.)
//!
//! Requests and database changes come from peers, so their queues are port inboxes: they
//! hold the node's port capacity, and when one is full the node holds what comes next
//! and stops reading from its connections (TCP pushes back) exactly as for a full port,
//! including the stall rule. The waiters of monitors and `wait_up` are one per call of
//! the application.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use aemp_engine::Value;
use tokio::sync::mpsc::Sender;
use tokio::sync::oneshot;

use super::{Cmd, NodeError, Reply, decode_args, inbox};

/// Resolves when its port dies: `Ok(reason)` (empty for a normal exit, `["transport_error",
/// ...]` and the like when its node went away), [`NodeError::Cancelled`] after
/// [`super::Node::unmonitor`], [`NodeError::Stopped`] when our node stops. Dropping it does
/// not stop the monitoring (`unmonitor` does). Cancel-safe: poll it again later.
#[derive(Debug)]
#[must_use = "a Monitor does nothing unless awaited"]
pub struct Monitor {
    port: String,
    rx: oneshot::Receiver<Vec<u8>>,
}

impl Monitor {
    /// The monitored port's id.
    pub fn port(&self) -> &str {
        &self.port
    }
}

impl Future for Monitor {
    type Output = Result<Vec<Value>, NodeError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.rx).poll(cx).map(|r| {
            r.map(|raw| decode_args(&raw))
                .map_err(|_| NodeError::Cancelled)
        })
    }
}

/// A node-port request: `node` sent `[tag, args...]` to our node port.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    /// The node it came from.
    pub node: String,
    /// The arguments after the tag.
    pub args: Vec<Value>,
}

/// The node-port requests of one tag, from [`super::Node::handle_requests`]. Dropping it
/// stops their delivery (requests of that tag are then dropped).
#[derive(Debug)]
pub struct Requests {
    tag: String,
    rx: inbox::Receiver,
    tx: Sender<Cmd>,
}

impl Requests {
    pub(super) fn new(tag: String, rx: inbox::Receiver, tx: Sender<Cmd>) -> Requests {
        Requests { tag, rx, tx }
    }

    /// The tag.
    pub fn tag(&self) -> &str {
        &self.tag
    }

    /// The next request; `None` once the node is gone (or another handler took the tag).
    pub async fn recv(&mut self) -> Option<Request> {
        let mut items = self.rx.recv_with(decode_args).await?.into_iter();
        let node = items.next()?.as_name()?.into_owned();
        Some(Request {
            node,
            args: items.collect(),
        })
    }
}

impl Drop for Requests {
    fn drop(&mut self) {
        unsubscribe(&self.tx, Topic::Requests(self.tag.clone()));
    }
}

/// A change of one database family.
#[derive(Debug, Clone, PartialEq)]
pub struct DbChange {
    /// New or changed keys and their values (a map).
    pub set: Value,
    /// Keys deleted.
    pub del: Vec<String>,
}

/// The changes of one database family, from [`super::Node::db_monitor`]. Dropping it
/// stops monitoring the family.
#[derive(Debug)]
pub struct DbMonitor {
    family: String,
    rx: inbox::Receiver,
    tx: Sender<Cmd>,
}

impl DbMonitor {
    pub(super) fn new(family: String, rx: inbox::Receiver, tx: Sender<Cmd>) -> DbMonitor {
        DbMonitor { family, rx, tx }
    }

    /// The family.
    pub fn family(&self) -> &str {
        &self.family
    }

    /// The next change; `None` once the node is gone.
    pub async fn recv(&mut self) -> Option<DbChange> {
        let mut items = self.rx.recv_with(decode_args).await?.into_iter();
        let set = items.next()?;
        let del = match items.next()? {
            Value::Array(keys) => keys
                .iter()
                .filter_map(|k| k.as_name().map(|k| k.into_owned()))
                .collect(),
            _ => Vec::new(),
        };
        Some(DbChange { set, del })
    }
}

impl Drop for DbMonitor {
    fn drop(&mut self) {
        unsubscribe(&self.tx, Topic::Db(self.family.clone()));
    }
}

/// What a [`Requests`] or [`DbMonitor`] subscribes to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) enum Topic {
    Requests(String),
    Db(String),
}

/// Tells the driver a handle is gone; a drop cannot wait, so when the command queue is
/// full a task waits for room (one per handle).
fn unsubscribe(tx: &Sender<Cmd>, topic: Topic) {
    let cmd = Cmd::Unsubscribe { topic };
    if let Err(tokio::sync::mpsc::error::TrySendError::Full(cmd)) = tx.try_send(cmd)
        && let Ok(runtime) = tokio::runtime::Handle::try_current()
    {
        let tx = tx.clone();
        runtime.spawn(async move {
            let _ = tx.send(cmd).await;
        });
    }
}

/// The driver's side: who waits for which port to die and which node to come up.
#[derive(Default)]
pub(super) struct Waiters {
    monitors: HashMap<String, Vec<oneshot::Sender<Vec<u8>>>>,
    up: HashMap<String, Vec<Reply<()>>>,
}

impl Waiters {
    /// A new [`Monitor`] of `port`.
    pub(super) fn monitor(&mut self, port: String) -> Monitor {
        let (tx, rx) = oneshot::channel();
        let waiting = self.monitors.entry(port.clone()).or_default();
        // Monitors dropped unresolved are forgotten here, so they cannot pile up.
        waiting.retain(|w| !w.is_closed());
        waiting.push(tx);
        Monitor { port, rx }
    }

    /// `port` died with `reason` (a CBOR array).
    pub(super) fn port_down(&mut self, port: &str, reason: &[u8]) {
        for waiter in self.monitors.remove(port).unwrap_or_default() {
            let _ = waiter.send(reason.to_vec());
        }
    }

    /// `port` is no longer monitored: its monitors resolve as cancelled.
    pub(super) fn unmonitor(&mut self, port: &str) {
        self.monitors.remove(port);
    }

    /// Answers `reply` once `node` is up (at once if `up`).
    pub(super) fn wait_up(&mut self, node: String, up: bool, reply: Reply<()>) {
        if up {
            let _ = reply.send(Ok(()));
            return;
        }
        let waiting = self.up.entry(node).or_default();
        waiting.retain(|w| !w.is_closed());
        waiting.push(reply);
    }

    /// `node` came up.
    pub(super) fn node_up(&mut self, node: &str) {
        for waiter in self.up.remove(node).unwrap_or_default() {
            let _ = waiter.send(Ok(()));
        }
    }
}
