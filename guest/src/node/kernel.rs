//! The node port: requests other nodes send to port `""`.
//!
//! Nothing is ever executed: `eval` and unknown tags go to handlers the application
//! registered by name, or are refused with a log line.

use super::{LogLevel, Node, NodeOutput, msg, no_such_port};
use crate::value::Value;

/// Tags this node understands on its own (answered `true` by `can`).
const KNOWN: &[&str] = &[
    "", "mon0", "mon1", "kil0", "kil1", "snd", "can", "time", "devnull", "g_global", "g_reply",
    "g_found", "g_chg1", "g_chg2",
];

/// Items a node-port request may hold, all nested items counted: decoded, each takes at
/// least a `Value` (32 bytes), so this bounds a request's tree to about 64 MiB of the
/// sandbox, while a 16 MiB message of one-byte items would take 512 MiB. The largest
/// requests real nodes send, `g_set` with a whole database, stay well below it.
pub(super) const MAX_REQUEST_ITEMS: usize = 1 << 21;

impl Node {
    /// Handles `["", TAG, ARGS...]` from node `src`; `args` is the CBOR array `[TAG, ARGS...]`.
    pub(super) fn node_request(&mut self, src: &str, args: &[u8], now: u64) {
        let items = match Value::decode_within(args, MAX_REQUEST_ITEMS) {
            Ok(Value::Array(items)) => items,
            Ok(_) => return,
            Err(e) => {
                return self.warn_peer(src, format!("node-port request from {src} dropped: {e}"));
            }
        };
        let mut items = items.into_iter();
        let Some(tag) = items.next() else { return };
        let Some(tag) = tag.as_name().map(|t| t.into_owned()) else {
            return self.warn_peer(
                src,
                format!("node-port request from {src} without a tag dropped"),
            );
        };
        let args: Vec<Value> = items.collect();
        let name = |i: usize| args.get(i).and_then(Value::as_name).map(|n| n.into_owned());
        // The arguments from `i` on (none if there are fewer): peers decide the count.
        let rest = |i: usize| args.get(i..).map(<[Value]>::to_vec).unwrap_or_default();
        match tag.as_str() {
            "" | "devnull" => {}
            "mon1" => {
                let Some(port) = name(0) else { return };
                if self.ports.contains(&port) {
                    self.rmon.entry(port).or_default().insert(src.to_owned());
                } else {
                    let mut reply = vec![Value::text("kil0"), Value::text(port.as_str())];
                    reply.extend(no_such_port(&format!("{}#{port}", self.node_id)));
                    self.reply(src, msg::build("", reply), now);
                }
            }
            "mon0" => {
                if let Some(port) = name(0)
                    && let Some(watchers) = self.rmon.get_mut(&port)
                {
                    watchers.remove(src);
                }
            }
            "kil0" => {
                let Some(port) = name(0) else { return };
                if let Some(peer) = self.peers.get_mut(src) {
                    peer.lmon.remove(&port);
                }
                let port_id = format!("{src}#{port}");
                if self.monitors.remove(&port_id).is_some() {
                    let reason = Value::Array(rest(1)).encode();
                    self.outputs.push_back(NodeOutput::PortDown {
                        port: port_id,
                        reason,
                    });
                }
            }
            "kil1" => {
                let Some(port) = name(0) else { return };
                self.kill_local(&port, rest(1), now);
            }
            "snd" => {
                let Some(port_id) = name(0) else { return };
                let Some((node, port)) = super::split_port_id(&port_id) else {
                    return;
                };
                let (node, port) = (node.to_owned(), port.to_owned());
                let relayed = msg::build(&port, rest(1));
                if let Err(e) = self.route(&node, &relayed, false, now) {
                    self.warn_peer(src, format!("relay from {src} to {port_id} failed: {e}"));
                }
            }
            "can" => {
                let Some(query) = name(0) else { return };
                let known = KNOWN.contains(&query.as_str())
                    || self.serves(&query)
                    || self.handlers.contains(&query);
                let mut reply = rest(2);
                reply.push(Value::Bool(known));
                self.reply_to_port(args.get(1), reply, now);
            }
            "time" => {
                let wall = self.now as i128 + i128::from(self.config.wall_clock_offset_ms);
                let mut reply = rest(1);
                reply.push(Value::Float(wall as f64 / 1000.0));
                self.reply_to_port(args.first(), reply, now);
            }
            _ if self.serves(&tag) => self.seed_request(src, &tag, args, now),
            "g_global" | "g_reply" | "g_found" | "g_chg1" | "g_chg2" => {
                self.global_request(src, &tag, args, now)
            }
            _ if self.handlers.contains(&tag) => {
                let args = Value::Array(args).encode();
                self.outputs.push_back(NodeOutput::Request {
                    node: src.to_owned(),
                    tag,
                    args,
                });
            }
            "eval" => {
                self.warn_peer(
                    src,
                    format!("remote execution not allowed: eval from {src} refused"),
                );
                if args.len() > 1 {
                    let mut reply = rest(2);
                    reply.push(Value::text("remote execution not allowed"));
                    self.reply_to_port(args.get(1), reply, now);
                }
            }
            _ => self.warn_peer(
                src,
                format!("remote execution not allowed: request '{tag}' from {src} dropped"),
            ),
        }
    }

    /// Sends `reply` (the items after the port) to the port id in `port`, if it is one.
    fn reply_to_port(&mut self, port: Option<&Value>, reply: Vec<Value>, now: u64) {
        let Some(port_id) = port.and_then(Value::as_name) else {
            return;
        };
        let Some((node, port)) = super::split_port_id(&port_id) else {
            return;
        };
        let (node, message) = (node.to_owned(), msg::build(port, reply));
        self.reply(&node, message, now);
    }

    fn reply(&mut self, node: &str, message: Vec<u8>, now: u64) {
        if let Err(e) = self.route(node, &message, false, now) {
            self.log(LogLevel::Warn, format!("reply to {node} dropped: {e}"));
        }
    }
}
