//! The node port: requests other nodes send to port `""`.
//!
//! Nothing is ever executed: `eval` and unknown tags go to handlers the application
//! registered by name, or are refused with a log line.

use super::request::{self, GlobalRequest, ReplyTo, Request};
use super::{LogLevel, Node, NodeOutput, msg, no_such_port};
use crate::value::Value;

/// Tags this node understands on its own (answered `true` by `can`).
const KNOWN: &[&str] = &[
    "", "mon0", "mon1", "kil0", "kil1", "snd", "can", "time", "devnull", "g_global", "g_reply",
    "g_found", "g_chg1", "g_chg2",
];

impl Node {
    /// Handles `["", TAG, ARGS...]` from node `src`; `args` is the CBOR array `[TAG, ARGS...]`.
    pub(super) fn node_request(&mut self, src: &str, args: &[u8], now: u64) {
        let request = match request::parse(args) {
            Ok(request) => request,
            Err(e) => {
                return self.warn_peer(src, format!("node-port request from {src} dropped: {e}"));
            }
        };
        match request {
            Request::Nothing => {}
            Request::Monitor { port } => {
                if self.ports.contains(&port) {
                    self.rmon.entry(port).or_default().insert(src.to_owned());
                } else {
                    let mut reply = vec![Value::text("kil0"), Value::text(port.as_str())];
                    reply.extend(no_such_port(&format!("{}#{port}", self.node_id)));
                    self.reply(src, msg::build("", reply), now);
                }
            }
            Request::Unmonitor { port } => {
                if let Some(watchers) = self.rmon.get_mut(&port) {
                    watchers.remove(src);
                }
            }
            Request::PortDown { port, reason } => {
                if let Some(peer) = self.peers.get_mut(src) {
                    peer.lmon.remove(&port);
                }
                let port_id = format!("{src}#{port}");
                if self.monitors.remove(&port_id).is_some() {
                    let reason = Value::Array(reason).encode();
                    self.outputs.push_back(NodeOutput::PortDown {
                        port: port_id,
                        reason,
                    });
                }
            }
            Request::Kill { port, reason } => self.kill_local(&port, reason, now),
            Request::Relay { port_id, args } => {
                let Some((node, port)) = super::split_port_id(&port_id) else {
                    return;
                };
                let relayed = msg::build(port, args);
                let node = node.to_owned();
                if let Err(e) = self.route(&node, &relayed, false, now) {
                    self.warn_peer(src, format!("relay from {src} to {port_id} failed: {e}"));
                }
            }
            Request::Can { query, reply } => {
                let known = KNOWN.contains(&query.as_str())
                    || self.serves(&query)
                    || self.handlers.contains(&query);
                self.reply_to_port(reply, Value::Bool(known), now);
            }
            Request::Time { reply } => {
                let wall = self.now as i128 + i128::from(self.config.wall_clock_offset_ms);
                self.reply_to_port(reply, Value::Float(wall as f64 / 1000.0), now);
            }
            Request::Global(request) if self.serves(request.tag()) => {
                self.seed_request(src, request, now)
            }
            Request::Global(request)
                if !request.is_service() || matches!(request, GlobalRequest::IsGlobal) =>
            {
                self.global_request(src, request, now)
            }
            Request::Eval { reply } => {
                if !self.hand_to_handler(src, "eval", args) {
                    self.warn_peer(
                        src,
                        format!("remote execution not allowed: eval from {src} refused"),
                    );
                    self.reply_to_port(reply, Value::text("remote execution not allowed"), now);
                }
            }
            Request::Global(request) => self.unserved(src, request.tag(), args),
            Request::Other { tag } => self.unserved(src, &tag, args),
        }
    }

    /// Hands `request` (`[TAG, ARGS...]`) to the application's handler of `tag`, if it
    /// registered one; true if it did.
    fn hand_to_handler(&mut self, src: &str, tag: &str, request: &[u8]) -> bool {
        if !self.handlers.contains(tag) {
            return false;
        }
        // The sender, then the arguments after the tag as they came.
        let Some(parts) = msg::split(request) else {
            return false;
        };
        self.outputs.push_back(NodeOutput::Request {
            tag: tag.to_owned(),
            message: parts.renamed(src),
        });
        true
    }

    /// A request nothing here serves: the application's handler's, or refused.
    fn unserved(&mut self, src: &str, tag: &str, request: &[u8]) {
        if !self.hand_to_handler(src, tag, request) {
            self.warn_peer(
                src,
                format!("remote execution not allowed: request '{tag}' from {src} dropped"),
            );
        }
    }

    /// Sends the asker's extra items and `answer` to the port it named, if it named one.
    fn reply_to_port(&mut self, reply: Option<ReplyTo>, answer: Value, now: u64) {
        let Some(ReplyTo { port_id, mut extra }) = reply else {
            return;
        };
        let Some((node, port)) = super::split_port_id(&port_id) else {
            return;
        };
        extra.push(answer);
        let (node, message) = (node.to_owned(), msg::build(port, extra));
        self.reply(&node, message, now);
    }

    fn reply(&mut self, node: &str, message: Vec<u8>, now: u64) {
        if let Err(e) = self.route(node, &message, false, now) {
            self.log(LogLevel::Warn, format!("reply to {node} dropped: {e}"));
        }
    }
}
