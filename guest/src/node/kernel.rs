//! The node's local ports, the monitors on both sides, and the node port: requests other
//! nodes send to port `""` (those of the global protocol go to `global` and `seed`).
//!
//! Nothing is ever executed: `eval` and unknown tags go to handlers the application
//! registered by name, or are refused with a log line.

use std::collections::{BTreeMap, BTreeSet};

use super::effect::{Effect, Effects, View};
use super::request::{DATA_CONNECT, DATA_EXPECT, ReplyTo, Request};
use super::{LogLevel, NodeOutput, PortId, ids, msg, seed};
use crate::value::Value;

/// Tags this node understands on its own (answered `true` by `can`).
const KNOWN: &[&str] = &[
    "",
    "mon0",
    "mon1",
    "kil0",
    "kil1",
    "snd",
    "can",
    "time",
    "devnull",
    "g_global",
    "g_reply",
    "g_found",
    "g_chg1",
    "g_chg2",
    DATA_EXPECT,
    DATA_CONNECT,
];

/// What replies are logged as when they cannot be sent.
const REPLY: &str = "reply";

/// Local ports and monitors.
#[derive(Debug)]
pub(super) struct Kernel {
    /// Local port names.
    ports: BTreeSet<String>,
    /// Prefix and counter for fresh port names.
    uniq: String,
    port_counter: String,
    /// Monitors the application holds, by port id, with their count.
    monitors: BTreeMap<String, usize>,
    /// Per remote node, its ports we asked to monitor (`mon1` sent).
    lmon: BTreeMap<String, BTreeSet<String>>,
    /// Remote nodes monitoring our local ports: port name -> nodes.
    rmon: BTreeMap<String, BTreeSet<String>>,
    /// Node-port tags the application handles.
    handlers: BTreeSet<String>,
}

/// What [`Kernel::monitor`] leaves for the node to do.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Monitored {
    /// Nothing more: counted, or (a local port) being watched already.
    Counted,
    /// The first monitor of a remote port: send `mon1`.
    AskRemote,
    /// A local port that does not exist: report it down at once with this reason.
    NoSuchPort(Vec<u8>),
}

impl Kernel {
    /// `uniq` prefixes fresh port names (random, from the host's seed).
    pub(super) fn new(uniq: String) -> Kernel {
        Kernel {
            ports: BTreeSet::new(),
            uniq,
            port_counter: "a".into(),
            monitors: BTreeMap::new(),
            lmon: BTreeMap::new(),
            rmon: BTreeMap::new(),
            handlers: BTreeSet::new(),
        }
    }

    pub(super) fn has_port(&self, port: &str) -> bool {
        self.ports.contains(port)
    }

    /// How many local ports there are (the node port not counted).
    pub(super) fn port_count(&self) -> usize {
        self.ports.len()
    }

    /// A local port with a fresh unique name; returns the name.
    pub(super) fn new_port(&mut self) -> String {
        let name = self.fresh_name();
        self.ports.insert(name.clone());
        name
    }

    /// A fresh unique port name, not made a port: for a port of the node's own (a data
    /// connection's round trip), whose messages never reach the application.
    pub(super) fn fresh_name(&mut self) -> String {
        loop {
            ids::increment(&mut self.port_counter);
            let name = format!("{}{}", self.uniq, self.port_counter);
            if !self.ports.contains(&name) {
                return name;
            }
        }
    }

    /// A local port named `name`; false if it exists already.
    pub(super) fn register_port(&mut self, name: &str) -> bool {
        self.ports.insert(name.to_owned())
    }

    pub(super) fn register_handler(&mut self, tag: &str) {
        self.handlers.insert(tag.to_owned());
    }

    /// One more monitor of port `port` of `node` by the application.
    pub(super) fn monitor(&mut self, me: &str, node: &str, port: &str) -> Monitored {
        // One spelling per port, so that a connection loss finds every monitor of its node.
        let port_id = format!("{node}#{port}");
        if node == me && !self.ports.contains(port) {
            return Monitored::NoSuchPort(Value::Array(no_such_port(&port_id)).encode());
        }
        let count = self.monitors.entry(port_id).or_default();
        *count = count.saturating_add(1);
        if node != me
            && !port.is_empty()
            && self
                .lmon
                .entry(node.to_owned())
                .or_default()
                .insert(port.to_owned())
        {
            return Monitored::AskRemote;
        }
        Monitored::Counted
    }

    /// One monitor fewer of port `port` of `node`; true when it was the last one of a
    /// remote port, so the remote is to be told (`mon0`).
    pub(super) fn unmonitor(&mut self, node: &str, port: &str) -> bool {
        let port_id = format!("{node}#{port}");
        let Some(count) = self.monitors.get_mut(&port_id) else {
            return false;
        };
        *count = count.saturating_sub(1);
        if *count > 0 {
            return false;
        }
        self.monitors.remove(&port_id);
        self.lmon
            .get_mut(node)
            .is_some_and(|ports| ports.remove(port))
    }

    /// `node` and everything about it is gone: the application's monitors of its ports
    /// fire (their port ids are returned) and what we asked it is forgotten; when its
    /// connection was up, its monitors of our ports go too (it fired them itself).
    pub(super) fn node_gone(&mut self, node: &str, was_up: bool) -> Vec<String> {
        self.lmon.remove(node);
        let prefix = format!("{node}#");
        let fired: Vec<String> = self
            .monitors
            .range(prefix.clone()..)
            .take_while(|(p, _)| p.starts_with(&prefix))
            .map(|(p, _)| p.clone())
            .collect();
        for port in &fired {
            self.monitors.remove(port);
        }
        if was_up {
            self.rmon.retain(|_, watchers| {
                watchers.remove(node);
                !watchers.is_empty()
            });
        }
        fired
    }

    /// Kills local port `port`: the application's monitors and remote watchers that are
    /// up learn `reason`.
    pub(super) fn kill_local(
        &mut self,
        port: &str,
        reason: Vec<Value>,
        view: &View<'_>,
        fx: &mut Effects,
    ) {
        if !self.ports.remove(port) {
            return;
        }
        let port_id = format!("{}#{port}", view.node_id);
        let watched = self.monitors.remove(&port_id).is_some();
        if watched {
            fx.output(NodeOutput::PortDown {
                port: port_id,
                reason: Value::Array(reason.clone()).encode(),
            });
        }
        let watchers = self.rmon.remove(port).unwrap_or_default();
        if !watched && watchers.is_empty() && !reason.is_empty() {
            fx.log(
                LogLevel::Info,
                format!("unmonitored local port {port} died with reason: {reason:?}"),
            );
        }
        for node in watchers.iter().filter(|n| view.is_up(n)) {
            let mut args = vec![Value::text("kil0"), Value::text(port)];
            args.extend(reason.iter().cloned());
            fx.send(node, args, "kil0");
        }
    }

    /// A node-port request from node `src` (any but the global protocol's); `args` is the
    /// CBOR array `[TAG, ARGS...]` it was parsed from.
    pub(super) fn request(
        &mut self,
        src: &str,
        request: Request,
        args: &[u8],
        view: &View<'_>,
        fx: &mut Effects,
    ) {
        match request {
            // The node hands the global and data connection requests to their parts.
            Request::Nothing | Request::Global(_) | Request::Data(_) => {}
            Request::Monitor { port } => {
                if self.ports.contains(&port) {
                    self.rmon.entry(port).or_default().insert(src.to_owned());
                } else {
                    let mut reply = vec![Value::text("kil0"), Value::text(port.as_str())];
                    reply.extend(no_such_port(&format!("{}#{port}", view.node_id)));
                    fx.send(src, reply, REPLY);
                }
            }
            Request::Unmonitor { port } => {
                if let Some(watchers) = self.rmon.get_mut(&port) {
                    watchers.remove(src);
                }
            }
            Request::PortDown { port, reason } => {
                if let Some(ports) = self.lmon.get_mut(src) {
                    ports.remove(&port);
                }
                let port_id = format!("{src}#{port}");
                if self.monitors.remove(&port_id).is_some() {
                    let reason = Value::Array(reason).encode();
                    fx.output(NodeOutput::PortDown {
                        port: port_id,
                        reason,
                    });
                }
            }
            Request::Kill { port, reason } => self.kill_local(&port, reason, view, fx),
            Request::Relay { port_id, args } => {
                let Some(PortId { name, .. }) = PortId::parse(&port_id) else {
                    return;
                };
                let message = msg::build(name, args);
                fx.push(Effect::Relay {
                    src: src.to_owned(),
                    port_id,
                    message,
                });
            }
            Request::Can { query, reply } => {
                let known = KNOWN.contains(&query.as_str())
                    || seed::serves(&query, view.global, view.config.serve_global)
                    || self.handlers.contains(&query);
                reply_to_port(reply, Value::Bool(known), fx);
            }
            Request::Time { reply } => {
                let wall = view.now as i128 + i128::from(view.config.wall_clock_offset_ms);
                reply_to_port(reply, Value::Float(wall as f64 / 1000.0), fx);
            }
            Request::Eval { reply } => {
                if !self.hand_to_handler(src, "eval", args, fx) {
                    let message = format!("remote execution not allowed: eval from {src} refused");
                    fx.warn_peer(src, message);
                    reply_to_port(reply, Value::text("remote execution not allowed"), fx);
                }
            }
            Request::Other { tag } => self.unserved(src, &tag, args, fx),
        }
    }

    /// A request nothing here serves: the application's handler's, or refused.
    pub(super) fn unserved(&self, src: &str, tag: &str, args: &[u8], fx: &mut Effects) {
        if !self.hand_to_handler(src, tag, args, fx) {
            fx.warn_peer(
                src,
                format!("remote execution not allowed: request '{tag}' from {src} dropped"),
            );
        }
    }

    /// Hands `request` (`[TAG, ARGS...]`) to the application's handler of `tag`, if it
    /// registered one; true if it did.
    fn hand_to_handler(&self, src: &str, tag: &str, request: &[u8], fx: &mut Effects) -> bool {
        if !self.handlers.contains(tag) {
            return false;
        }
        // The sender, then the arguments after the tag as they came.
        let Some(parts) = msg::split(request) else {
            return false;
        };
        fx.output(NodeOutput::Request {
            tag: tag.to_owned(),
            message: parts.renamed(src),
        });
        true
    }
}

/// Sends the asker's extra items and `answer` to the port it named, if it named one.
fn reply_to_port(reply: Option<ReplyTo>, answer: Value, fx: &mut Effects) {
    let Some(ReplyTo { port_id, mut extra }) = reply else {
        return;
    };
    let Some(PortId { node, name }) = PortId::parse(&port_id) else {
        return;
    };
    extra.push(answer);
    fx.send_message(node, msg::build(name, extra), REPLY);
}

/// The reason of a monitor on a port that does not exist.
fn no_such_port(port_id: &str) -> Vec<Value> {
    vec![
        Value::text("no_such_port"),
        Value::text("cannot monitor nonexistent port"),
        Value::text(port_id),
    ]
}
