//! Several nodes wired together in memory with a simulated clock. Addresses are
//! `NODE:4040`; TLS is a pass-through. A scripted global node (`FakeSeed`) answers the
//! global protocol through request handlers, so normal nodes can be tested against it.

use std::collections::{BTreeMap, HashMap};

use aemp_engine::{ConnId, Node, NodeConfig, NodeOutput, Value};

pub const SECRET: &[u8] = b"node secret";

pub fn node_config(id: &str, seeds: &[&str]) -> NodeConfig {
    let mut c = NodeConfig::new(id);
    c.transport.secret = Some(SECRET.to_vec());
    c.binds = vec![format!("{id}:4040")];
    c.seeds = seeds.iter().map(|s| s.to_string()).collect();
    c
}

/// A global node made of the public API: it answers g_* requests from its handlers.
#[derive(Default)]
pub struct FakeSeed {
    /// family -> key -> value, merged from every slave.
    pub db: BTreeMap<String, BTreeMap<String, Value>>,
    /// family -> nodes monitoring it.
    pub mons: BTreeMap<String, Vec<String>>,
    /// Every request received: (node, tag, args).
    pub seen: Vec<(String, String, Value)>,
}

const SEED_TAGS: &[&str] = &[
    "g_slave",
    "g_find",
    "g_upd",
    "g_db_family",
    "g_db_keys",
    "g_db_values",
    "g_mon1",
    "g_mon0",
];

fn name(v: Option<&Value>) -> String {
    v.and_then(Value::as_name)
        .map(|n| n.into_owned())
        .unwrap_or_default()
}

fn map_of(entries: &BTreeMap<String, Value>) -> Value {
    Value::Map(
        entries
            .iter()
            .map(|(k, v)| (Value::text(k.as_str()), v.clone()))
            .collect(),
    )
}

impl FakeSeed {
    fn merge(&mut self, family: &str, set: &Value) -> Vec<(Value, Value)> {
        let Value::Map(pairs) = set else {
            return Vec::new();
        };
        let fam = self.db.entry(family.to_owned()).or_default();
        for (k, v) in pairs {
            fam.insert(name(Some(k)), v.clone());
        }
        pairs.clone()
    }

    fn handle(&mut self, node: &mut Node, src: &str, tag: &str, args: Value, now: u64) {
        self.seen
            .push((src.to_owned(), tag.to_owned(), args.clone()));
        let Value::Array(args) = args else { return };
        let reply = |node: &mut Node, items: Vec<Value>| {
            node.send(&format!("{src}#"), &Value::Array(items).encode(), now)
                .unwrap();
        };
        match tag {
            "g_slave" => {
                if let Some(Value::Map(families)) = args.first() {
                    for (family, set) in families {
                        self.merge(&name(Some(family)), set);
                    }
                }
            }
            "g_find" => {
                let wanted = name(args.first());
                let addrs = self
                    .db
                    .get("'l")
                    .and_then(|l| l.get(&wanted))
                    .cloned()
                    .unwrap_or(Value::Null);
                reply(
                    node,
                    vec![Value::text("g_found"), Value::text(wanted), addrs],
                );
            }
            "g_upd" => {
                let family = name(args.first());
                let set = self.merge(&family, args.get(1).unwrap_or(&Value::Null));
                let mut del = Vec::new();
                if let Some(Value::Array(keys)) = args.get(2) {
                    for k in keys {
                        self.db
                            .entry(family.clone())
                            .or_default()
                            .remove(&name(Some(k)));
                        del.push(k.clone());
                    }
                }
                for watcher in self.mons.get(&family).cloned().unwrap_or_default() {
                    let items = vec![
                        Value::text("g_chg2"),
                        Value::text(family.as_str()),
                        Value::Map(set.clone()),
                        Value::Array(del.clone()),
                    ];
                    node.send(&format!("{watcher}#"), &Value::Array(items).encode(), now)
                        .unwrap();
                }
            }
            "g_db_family" | "g_db_keys" | "g_db_values" => {
                let family = self
                    .db
                    .get(&name(args.first()))
                    .cloned()
                    .unwrap_or_default();
                let result = match tag {
                    "g_db_family" => map_of(&family),
                    "g_db_keys" => {
                        Value::Array(family.keys().map(|k| Value::text(k.as_str())).collect())
                    }
                    _ => Value::Array(family.values().cloned().collect()),
                };
                reply(
                    node,
                    vec![
                        Value::text("g_reply"),
                        args.get(1).cloned().unwrap_or(Value::Null),
                        result,
                    ],
                );
            }
            "g_mon1" => {
                let family = name(args.first());
                self.mons
                    .entry(family.clone())
                    .or_default()
                    .push(src.to_owned());
                let current = self.db.get(&family).map(map_of).unwrap_or(Value::Null);
                reply(
                    node,
                    vec![Value::text("g_chg1"), Value::text(family), current],
                );
            }
            "g_mon0" => {
                let family = name(args.first());
                if let Some(m) = self.mons.get_mut(&family) {
                    m.retain(|n| n != src);
                }
            }
            _ => {}
        }
    }
}

pub struct Net {
    pub nodes: Vec<Node>,
    pub names: Vec<String>,
    pub events: Vec<Vec<NodeOutput>>,
    pub seed: Option<(usize, FakeSeed)>,
    listen: HashMap<String, usize>,
    links: HashMap<(usize, ConnId), (usize, ConnId)>,
    /// Nodes whose listener is down (connects are refused).
    pub unreachable: Vec<usize>,
    /// Nodes that crashed: unreachable, and nothing they do has any effect.
    pub dead: Vec<usize>,
    /// Per node, the most bytes of transmits one poll returned.
    pub most_polled: Vec<usize>,
    pub now: u64,
    nonce: u8,
}

impl Net {
    pub fn new() -> Net {
        Net {
            nodes: Vec::new(),
            names: Vec::new(),
            events: Vec::new(),
            seed: None,
            listen: HashMap::new(),
            links: HashMap::new(),
            unreachable: Vec::new(),
            dead: Vec::new(),
            most_polled: Vec::new(),
            now: 1_000,
            nonce: 0,
        }
    }

    pub fn add(&mut self, config: NodeConfig) -> usize {
        let i = self.nodes.len();
        let id = config.transport.node_id.clone();
        self.listen.insert(format!("{id}:4040"), i);
        self.nodes
            .push(Node::new(config, [i as u8 + 1; 16], self.now).unwrap());
        self.names.push(id);
        self.events.push(Vec::new());
        self.most_polled.push(0);
        i
    }

    /// Adds the scripted global node `seed`.
    pub fn add_seed(&mut self) -> usize {
        let mut config = node_config("seed", &[]);
        // The script, not the engine, plays the global node.
        config.serve_global = false;
        let i = self.add(config);
        for tag in SEED_TAGS {
            self.nodes[i].register_handler(tag);
        }
        self.seed = Some((i, FakeSeed::default()));
        i
    }

    fn nonce(&mut self) -> [u8; 66] {
        self.nonce = self.nonce.wrapping_add(1);
        [self.nonce; 66]
    }

    /// Processes outputs everywhere until nothing moves, in rounds: everything the nodes
    /// said in one round is delivered before anything said in reaction to it, as on a
    /// network where all links have the same delay.
    pub fn run(&mut self) {
        loop {
            let mut round = Vec::new();
            for x in 0..self.nodes.len() {
                // As a host polls: everything at once, one release of waiting messages.
                let outputs = self.nodes[x].poll_outputs();
                let transmitted = outputs
                    .iter()
                    .map(|o| match o {
                        NodeOutput::Transmit { bytes, .. } => bytes.len(),
                        _ => 0,
                    })
                    .sum();
                self.most_polled[x] = self.most_polled[x].max(transmitted);
                if !self.dead.contains(&x) {
                    round.extend(outputs.into_iter().map(|o| (x, o)));
                }
            }
            if round.is_empty() {
                return;
            }
            for (x, o) in round {
                self.apply(x, o);
            }
        }
    }

    /// Acts on output `o` of node `x` as [`run`](Self::run) does.
    pub fn apply(&mut self, x: usize, o: NodeOutput) {
        let now = self.now;
        match o {
            NodeOutput::Transmit { conn, bytes } => {
                if let Some(&(y, c)) = self.links.get(&(x, conn)) {
                    self.nodes[y].handle_input(c, &bytes, now);
                }
            }
            NodeOutput::Connect { conn, addr } => match self.listen.get(&addr).copied() {
                Some(y) if !self.unreachable.contains(&y) => {
                    let (n1, n2) = (self.nonce(), self.nonce());
                    let from = format!("{}:50000", self.names[x]);
                    let c = self.nodes[y].handle_accept(&from, n1, now);
                    self.links.insert((x, conn), (y, c));
                    self.links.insert((y, c), (x, conn));
                    self.nodes[x].handle_connected(conn, n2, now);
                }
                _ => self.nodes[x].handle_connect_failed(conn, "Connection refused", now),
            },
            NodeOutput::StartTls { conn, leftover, .. } => {
                self.nodes[x].handle_input(conn, &leftover, now)
            }
            NodeOutput::Close { conn, reason } => {
                if let Some((y, c)) = self.links.remove(&(x, conn)) {
                    self.links.remove(&(y, c));
                    self.nodes[y].handle_eof(c, now);
                }
                self.events[x].push(NodeOutput::Close { conn, reason });
            }
            NodeOutput::Request { tag, message }
                if self.seed.as_ref().is_some_and(|(s, _)| *s == x) =>
            {
                let (_, mut seed) = self.seed.take().unwrap();
                let (node, args) = request_parts(&message);
                seed.handle(&mut self.nodes[x], &node, &tag, args, now);
                self.seed = Some((x, seed));
            }
            other => self.events[x].push(other),
        }
    }

    /// Advances the clock by `ms`, firing due timers, and runs.
    pub fn advance(&mut self, ms: u64) {
        let end = self.now + ms;
        loop {
            let next = self
                .nodes
                .iter()
                .enumerate()
                .filter(|(i, _)| !self.dead.contains(i))
                .filter_map(|(_, n)| n.poll_timeout())
                .filter(|&t| t <= end)
                .min();
            let Some(t) = next else { break };
            self.now = self.now.max(t);
            for i in 0..self.nodes.len() {
                if self.nodes[i].poll_timeout().is_some_and(|d| d <= self.now)
                    && !self.dead.contains(&i)
                {
                    self.nodes[i].handle_timeout(self.now);
                }
            }
            self.run();
        }
        self.now = end;
        self.run();
    }

    /// Drops every connection of node `i` as if it crashed (peers see EOF).
    pub fn cut(&mut self, i: usize) {
        let ends: Vec<((usize, ConnId), (usize, ConnId))> = self
            .links
            .iter()
            .filter(|(k, _)| k.0 == i)
            .map(|(k, v)| (*k, *v))
            .collect();
        let now = self.now;
        for (mine, theirs) in ends {
            self.links.remove(&mine);
            self.links.remove(&theirs);
            self.nodes[theirs.0].handle_eof(theirs.1, now);
            self.nodes[i].handle_conn_error(mine.1, "cut", now);
        }
        self.run();
    }

    /// Node `i` crashes: its connections drop and it never comes back.
    pub fn kill_node(&mut self, i: usize) {
        self.dead.push(i);
        self.unreachable.push(i);
        self.cut(i);
    }

    /// Answers to database queries of node `i`: (id, result).
    pub fn db_replies(&self, i: usize) -> Vec<(String, Value)> {
        self.events[i]
            .iter()
            .filter_map(|e| match e {
                NodeOutput::DbReply { id, result } => {
                    Some((id.clone(), Value::decode(result).unwrap()))
                }
                _ => None,
            })
            .collect()
    }

    /// The answer to query `id` of node `i`.
    pub fn db_reply(&self, i: usize, id: &str) -> Option<Value> {
        self.db_replies(i)
            .into_iter()
            .find_map(|(r, v)| (r == id).then_some(v))
    }

    /// Changes of `family` reported to node `i`: (set, deleted keys).
    pub fn db_changes(&self, i: usize, family: &str) -> Vec<(Value, Vec<String>)> {
        self.events[i]
            .iter()
            .filter_map(|e| match e {
                NodeOutput::DbChange { family: f, change } if f == family => {
                    Some(db_change_parts(change))
                }
                _ => None,
            })
            .collect()
    }

    /// Whether node `i` logged a line containing `text`.
    pub fn logged(&self, i: usize, text: &str) -> bool {
        self.has(
            i,
            |e| matches!(e, NodeOutput::Log { message, .. } if message.contains(text)),
        )
    }

    pub fn delivered(&self, i: usize) -> Vec<(String, Value)> {
        self.events[i]
            .iter()
            .filter_map(|e| match e {
                NodeOutput::Deliver(d) => Some(
                    d.messages()
                        .map(|args| (d.port.clone(), Value::decode(args).unwrap())),
                ),
                _ => None,
            })
            .flatten()
            .collect()
    }

    pub fn port_downs(&self, i: usize) -> Vec<(String, Value)> {
        self.events[i]
            .iter()
            .filter_map(|e| match e {
                NodeOutput::PortDown { port, reason } => {
                    Some((port.clone(), Value::decode(reason).unwrap()))
                }
                _ => None,
            })
            .collect()
    }

    pub fn has(&self, i: usize, pred: impl Fn(&NodeOutput) -> bool) -> bool {
        self.events[i].iter().any(pred)
    }
}

/// A CBOR array of values.
pub fn args(items: Vec<Value>) -> Vec<u8> {
    Value::Array(items).encode()
}

pub fn t(s: &str) -> Value {
    Value::text(s)
}

/// A [`NodeOutput::Request`]'s message `[NODE, ARGS...]` as the sender and the arguments
/// (an array).
pub fn request_parts(message: &[u8]) -> (String, Value) {
    let Value::Array(mut items) = Value::decode(message).unwrap() else {
        panic!("a request is an array");
    };
    let node = items.remove(0).as_name().unwrap().into_owned();
    (node, Value::Array(items))
}

/// A [`NodeOutput::DbChange`]'s `[SET, DEL]` as the map and the deleted keys.
pub fn db_change_parts(change: &[u8]) -> (Value, Vec<String>) {
    let Value::Array(items) = Value::decode(change).unwrap() else {
        panic!("a change is an array");
    };
    let [set, Value::Array(del)] = <[Value; 2]>::try_from(items).unwrap() else {
        panic!("a change is [SET, DEL]");
    };
    let del = del
        .iter()
        .map(|k| k.as_name().unwrap().into_owned())
        .collect();
    (set, del)
}
