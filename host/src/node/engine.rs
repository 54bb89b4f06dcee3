//! The node's engine instance as one typed value: every call of the WIT `node` resource
//! as a method, with the state that goes with calling it (whether it may have outputs,
//! when it wants its timeout), as [`crate::sandbox::Instance`] does for the transport.
//!
//! Refusals leave here as [`NodeError`]s; a `wasmtime::Error` means the instance itself
//! failed (a trap, a limit) and the node stops.

use std::time::{Duration, Instant};

use wasmtime::component::ResourceAny;

use super::{DbQuery, NodeError, Refusal};
use crate::sandbox::{self, Instance, wit, wit_node};

/// A call into the instance that failed: the node cannot go on.
pub(super) type Fatal = wasmtime::Error;

/// One node resource in its own instance.
pub(super) struct Engine {
    instance: Instance,
    node: ResourceAny,
    /// The origin of the engine's clock (its `now-ms` is milliseconds since).
    started: Instant,
    /// The engine was called since its outputs were last taken: it may have some. (Every
    /// call counts in a round trip's time, so outputs are asked for only when this is set.)
    dirty: bool,
    /// The engine was called since `due` was asked.
    due_stale: bool,
    /// When the engine wants `handle-timeout`, as of the last time it was asked.
    due: Option<tokio::time::Instant>,
}

/// The node id a template stands for on this host (`%n`, `%u`, a trailing `/`).
pub(super) fn expand_node_id(
    instance: &mut Instance,
    template: &str,
    hostname: &str,
) -> Result<String, NodeError> {
    let (store, b) = instance.parts();
    b.aemp_engine_node()
        .call_expand_node_id(store, template, hostname)
        .map_err(stopped)
}

/// The engine's defaults for a node called `node_id`.
pub(super) fn default_config(
    instance: &mut Instance,
    node_id: &str,
) -> Result<wit_node::NodeConfig, NodeError> {
    let (store, b) = instance.parts();
    b.aemp_engine_node()
        .call_default_node_config(store, node_id)
        .map_err(stopped)
}

/// A failed instance as the application sees it.
fn stopped(e: Fatal) -> NodeError {
    NodeError::Stopped(sandbox::describe(&e))
}

impl Engine {
    /// Creates the node in `instance`; its clock starts now.
    pub(super) fn create(
        mut instance: Instance,
        config: &wit_node::NodeConfig,
    ) -> Result<Engine, NodeError> {
        let (store, b) = instance.parts();
        let node = b
            .aemp_engine_node()
            .node()
            .call_create(store, config, 0)
            .map_err(stopped)?
            .map_err(|r| NodeError::Config(r.message))?;
        Ok(Engine {
            instance,
            node,
            started: Instant::now(),
            dirty: true,
            due_stale: true,
            due: None,
        })
    }

    /// Milliseconds on the engine's clock.
    pub(super) fn now(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// Bytes of linear memory the instance holds.
    pub(super) fn memory_bytes(&self) -> usize {
        self.instance.memory_bytes()
    }

    /// Calls the node resource; afterwards it may have outputs and another deadline.
    fn call<T>(
        &mut self,
        f: impl FnOnce(
            &mut wasmtime::Store<sandbox::State>,
            ResourceAny,
            &wit_node::GuestNode,
        ) -> wasmtime::Result<T>,
    ) -> Result<T, Fatal> {
        self.call_for(1, f)
    }

    /// [`Engine::call`] for a call doing the work of `calls` calls, with the CPU budget
    /// of each ([`Instance::parts_for`]).
    fn call_for<T>(
        &mut self,
        calls: usize,
        f: impl FnOnce(
            &mut wasmtime::Store<sandbox::State>,
            ResourceAny,
            &wit_node::GuestNode,
        ) -> wasmtime::Result<T>,
    ) -> Result<T, Fatal> {
        self.dirty = true;
        self.due_stale = true;
        let node = self.node;
        let (store, b) = self.instance.parts_for(calls);
        f(store, node, &b.aemp_engine_node().node())
    }

    /// When the engine wants [`Engine::handle_timeout`], if ever (asked again only after a
    /// call since the last time).
    pub(super) fn deadline(&mut self) -> Result<Option<tokio::time::Instant>, Fatal> {
        if self.due_stale {
            let (store, b) = self.instance.parts();
            let due = b
                .aemp_engine_node()
                .node()
                .call_poll_timeout(store, self.node)?;
            self.due = due.map(|ms| (self.started + Duration::from_millis(ms)).into());
            self.due_stale = false;
        }
        Ok(self.due)
    }

    /// Everything the engine has to say since it was last asked, or `None` when it was
    /// not called since (and so has nothing).
    pub(super) fn poll_outputs(&mut self) -> Result<Option<Vec<wit_node::NodeOutput>>, Fatal> {
        if !self.dirty {
            return Ok(None);
        }
        self.dirty = false;
        let (store, b) = self.instance.parts();
        let outputs = b
            .aemp_engine_node()
            .node()
            .call_poll_outputs(store, self.node)?;
        Ok(Some(outputs))
    }

    /// The clock reached the engine's deadline.
    pub(super) fn handle_timeout(&mut self) -> Result<(), Fatal> {
        let now = self.now();
        self.call(|s, n, api| api.call_handle_timeout(s, n, now))
    }

    /// A socket from `peer` was accepted; returns its connection id.
    pub(super) fn handle_accept(&mut self, peer: &str) -> Result<u64, Fatal> {
        let now = self.now();
        self.call(|s, n, api| api.call_handle_accept(s, n, peer, now))
    }

    /// What one round read from the connections, in one call with one call's CPU budget
    /// per connection's input: a peer whose input is slow to handle is measured alone,
    /// never together with everyone who happened to send in the same round.
    pub(super) fn handle_inputs(&mut self, inputs: &[(u64, Vec<u8>)]) -> Result<(), Fatal> {
        let now = self.now();
        self.call_for(inputs.len(), |s, n, api| {
            api.call_handle_inputs(s, n, inputs, now)
        })
    }

    /// The peer of `conn` closed its side.
    pub(super) fn handle_eof(&mut self, conn: u64) -> Result<(), Fatal> {
        let now = self.now();
        self.call(|s, n, api| api.call_handle_eof(s, n, conn, now))
    }

    /// The host closed `conn` because its socket failed (or its peer does not read).
    pub(super) fn handle_conn_error(&mut self, conn: u64, reason: &str) -> Result<(), Fatal> {
        let now = self.now();
        self.call(|s, n, api| api.call_handle_conn_error(s, n, conn, reason, now))
    }

    /// The connect the engine asked for on `conn` succeeded.
    pub(super) fn handle_connected(&mut self, conn: u64) -> Result<(), Fatal> {
        let now = self.now();
        self.call(|s, n, api| api.call_handle_connected(s, n, conn, now))
    }

    /// The connect the engine asked for on `conn` failed.
    pub(super) fn handle_connect_failed(&mut self, conn: u64, reason: &str) -> Result<(), Fatal> {
        let now = self.now();
        self.call(|s, n, api| api.call_handle_connect_failed(s, n, conn, reason, now))
    }

    /// Dials `addr` without knowing the node there.
    pub(super) fn connect_addr(&mut self, addr: &str) -> Result<(), Fatal> {
        let now = self.now();
        self.call(|s, n, api| api.call_connect_addr(s, n, addr, now))?;
        Ok(())
    }

    /// A local port: a fresh unique one without `name`.
    pub(super) fn port(&mut self, name: Option<&str>) -> Result<Result<String, NodeError>, Fatal> {
        match name {
            None => self.call(|s, n, api| api.call_new_port(s, n)).map(Ok),
            Some(name) => Ok(self
                .call(|s, n, api| api.call_register_port(s, n, name))?
                .map_err(refused)),
        }
    }

    /// Sends a batch; stops at the first refusal.
    pub(super) fn send(&mut self, batch: &wit_node::Batch) -> Result<Result<(), NodeError>, Fatal> {
        let now = self.now();
        Ok(self
            .call(|s, n, api| api.call_send(s, n, batch, now))?
            .map_err(send_refused))
    }

    /// Kills a port with `reason` (a CBOR array).
    pub(super) fn kill(
        &mut self,
        port: &str,
        reason: &[u8],
    ) -> Result<Result<(), NodeError>, Fatal> {
        let now = self.now();
        Ok(self
            .call(|s, n, api| api.call_kill(s, n, port, reason, now))?
            .map_err(refused))
    }

    pub(super) fn monitor(&mut self, port: &str) -> Result<Result<(), NodeError>, Fatal> {
        let now = self.now();
        Ok(self
            .call(|s, n, api| api.call_monitor(s, n, port, now))?
            .map_err(refused))
    }

    pub(super) fn unmonitor(&mut self, port: &str) -> Result<Result<(), NodeError>, Fatal> {
        let now = self.now();
        Ok(self
            .call(|s, n, api| api.call_unmonitor(s, n, port, now))?
            .map_err(refused))
    }

    /// Node-port requests with `tag` go to the application from now on.
    pub(super) fn register_handler(&mut self, tag: &str) -> Result<(), Fatal> {
        self.call(|s, n, api| api.call_register_handler(s, n, tag))
    }

    /// Asks `node` for a data connection served there by `handler` with `args` (a CBOR
    /// array); local port `port` dies with the reason if it fails, else a
    /// `data-connection` output names it. Returns the data connection's id.
    pub(super) fn data_connect(
        &mut self,
        port: &str,
        node: &str,
        timeout_ms: u64,
        handler: &str,
        args: &[u8],
    ) -> Result<Result<String, NodeError>, Fatal> {
        let now = self.now();
        Ok(self
            .call(|s, n, api| {
                api.call_data_connect(s, n, port, node, timeout_ms, handler, args, now)
            })?
            .map_err(refused))
    }

    /// Other nodes may ask for data connections served by `name` from now on.
    pub(super) fn register_data_handler(&mut self, name: &str) -> Result<(), Fatal> {
        self.call(|s, n, api| api.call_register_data_handler(s, n, name))
    }

    /// Sets `key` of `family` to `value` (one CBOR item, as [`aemp_engine::Value`]
    /// encodes it, so the engine has no reason to refuse it).
    pub(super) fn db_set(&mut self, family: &str, key: &str, value: &[u8]) -> Result<(), Fatal> {
        let now = self.now();
        let refused = self.call(|s, n, api| api.call_db_set(s, n, family, key, value, now))?;
        if let Err(r) = refused {
            tracing::warn!("the engine refused a database value: {}", r.message);
        }
        Ok(())
    }

    pub(super) fn db_del(&mut self, family: &str, keys: &[String]) -> Result<(), Fatal> {
        let now = self.now();
        self.call(|s, n, api| api.call_db_del(s, n, family, keys, now))
    }

    /// Asks the database; the answer comes as a `db-reply` output with the id returned.
    pub(super) fn db_query(&mut self, kind: DbQuery, family: &str) -> Result<String, Fatal> {
        let now = self.now();
        self.call(|s, n, api| match kind {
            DbQuery::Family => api.call_db_family(s, n, family, now),
            DbQuery::Keys => api.call_db_keys(s, n, family, now),
            DbQuery::Values => api.call_db_values(s, n, family, now),
        })
    }

    /// Changes of `family` come as `db-change` outputs from now on.
    pub(super) fn db_mon(&mut self, family: &str) -> Result<(), Fatal> {
        let now = self.now();
        self.call(|s, n, api| api.call_db_mon(s, n, family, now))
    }

    pub(super) fn db_unmon(&mut self, family: &str) -> Result<(), Fatal> {
        let now = self.now();
        self.call(|s, n, api| api.call_db_unmon(s, n, family, now))
    }

    /// What the node is doing: its connections and counters (read-only).
    pub(super) fn info(&mut self) -> Result<wit_node::NodeInfo, Fatal> {
        let (store, b) = self.instance.parts();
        b.aemp_engine_node().node().call_info(store, self.node)
    }

    /// The node's id.
    pub(super) fn node_id(&mut self) -> Result<String, Fatal> {
        let (store, b) = self.instance.parts();
        b.aemp_engine_node().node().call_node_id(store, self.node)
    }

    /// Bytes of messages waiting for nodes that are not connected yet.
    pub(super) fn queued_bytes(&mut self) -> Result<u64, Fatal> {
        let (store, b) = self.instance.parts();
        b.aemp_engine_node()
            .node()
            .call_queued_bytes(store, self.node)
    }
}

/// The engine's kind of refusal, back from its WIT form.
fn refusal_kind(kind: wit::RefusalKind) -> Refusal {
    use wit::RefusalKind as K;
    match kind {
        K::InvalidPortId => Refusal::InvalidPortId,
        K::PortExists => Refusal::PortExists,
        K::QueueFull => Refusal::QueueFull,
        K::BudgetExhausted => Refusal::BudgetExhausted,
        K::NotConnected => Refusal::NotConnected,
        K::Closed => Refusal::Closed,
        K::TooLarge => Refusal::TooLarge,
        K::TooDeep => Refusal::TooDeep,
        K::NotAnArray => Refusal::NotAnArray,
        K::Malformed => Refusal::Malformed,
        K::NotJson => Refusal::NotJson,
        K::InvalidConfig => Refusal::InvalidConfig,
    }
}

/// The engine's refusal of one call.
fn refused(r: wit::Refusal) -> NodeError {
    NodeError::Refused {
        kind: refusal_kind(r.kind),
        message: r.message,
    }
}

/// The engine's refusal of a batch: partial when some messages went out first.
fn send_refused(e: wit::SendError) -> NodeError {
    let cause = refused(wit::Refusal {
        kind: e.kind,
        message: e.message,
    });
    match e.index {
        0 => cause,
        sent => NodeError::Partial {
            sent: sent as usize,
            cause: Box::new(cause),
        },
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use aemp_engine::node::{NodeConfig, NodeOutput};
    use aemp_engine::{ConnId, Framing, Node, Value};

    use super::*;
    use crate::sandbox::{Limits, Sandbox};

    const SECRET: &[u8] = b"secret";

    /// A node in a sandbox whose calls may take `budget` each, with a port `inbox`, and
    /// `peers` native nodes up with it that send JSON: (peer, its connection, the hub's).
    struct Hub {
        engine: Engine,
        port: String,
        peers: Vec<(Node, ConnId, u64)>,
    }

    impl Hub {
        fn new(budget: Duration, max_buffered_bytes: Option<u64>, peers: usize) -> Hub {
            let sandbox = Sandbox::with_limits(Limits {
                max_call_time: budget,
                ..Limits::default()
            })
            .expect("sandbox");
            let mut instance = sandbox.instantiate_with(None).expect("instance");
            let mut config = default_config(&mut instance, "hub").expect("config");
            config.transport.secret = Some(SECRET.to_vec());
            if let Some(max) = max_buffered_bytes {
                config.max_buffered_bytes = max;
            }
            let mut engine = Engine::create(instance, &config).expect("create");
            let port = engine.port(Some("inbox")).expect("call").expect("port");
            let peers = (0..peers)
                .map(|i| {
                    let mut c = NodeConfig::new(format!("peer{i}"));
                    c.transport.secret = Some(SECRET.to_vec());
                    c.transport.framings = vec![Framing::Json];
                    let mut peer = Node::new(c, [i as u8; 16], 0).expect("peer");
                    let own = peer.connect_addr("hub:4040", 0);
                    peer.handle_connected(own, [i as u8; 66], 0);
                    let hub_conn = engine.handle_accept("peer:50000").expect("call");
                    (peer, own, hub_conn)
                })
                .collect();
            let mut hub = Hub {
                engine,
                port,
                peers,
            };
            let mut up = 0;
            while up < hub.peers.len() {
                for (peer, _, conn) in &mut hub.peers {
                    let bytes = transmitted(peer);
                    if !bytes.is_empty() {
                        hub.engine.handle_inputs(&[(*conn, bytes)]).expect("call");
                    }
                }
                up += hub.answer_peers();
            }
            hub
        }

        /// Moves what the hub has to send to its peers; returns how many came up.
        fn answer_peers(&mut self) -> usize {
            let mut up = 0;
            for o in self
                .engine
                .poll_outputs()
                .expect("call")
                .unwrap_or_default()
            {
                match o {
                    wit_node::NodeOutput::Transmit(t) => {
                        let (peer, own, _) = self
                            .peers
                            .iter_mut()
                            .find(|(_, _, conn)| *conn == t.conn)
                            .expect("a peer's connection");
                        peer.handle_input(*own, &t.bytes, 0);
                    }
                    wit_node::NodeOutput::NodeUp(_) => up += 1,
                    wit_node::NodeOutput::Close(c) => panic!("hub closed: {}", c.reason),
                    _ => {}
                }
            }
            up
        }

        /// What each peer sends the hub's port when it sends `args`.
        fn inputs(&mut self, args: &[u8]) -> Vec<(u64, Vec<u8>)> {
            let port = &self.port;
            self.peers
                .iter_mut()
                .map(|(peer, _, conn)| {
                    peer.send(port, args, 0).expect("send");
                    (*conn, transmitted(peer))
                })
                .collect()
        }

        /// Messages delivered since the hub's outputs were last taken.
        fn delivered(&mut self) -> usize {
            let outputs = self
                .engine
                .poll_outputs()
                .expect("call")
                .unwrap_or_default();
            outputs
                .iter()
                .map(|o| match o {
                    wit_node::NodeOutput::Deliver(d) => d.sizes.len(),
                    _ => 0,
                })
                .sum()
        }
    }

    /// The bytes `peer` has to send.
    fn transmitted(peer: &mut Node) -> Vec<u8> {
        let mut bytes = Vec::new();
        for o in peer.poll_outputs() {
            match o {
                NodeOutput::Transmit { bytes: b, .. } => bytes.extend_from_slice(&b),
                NodeOutput::Close { reason, .. } => panic!("peer closed: {reason}"),
                _ => {}
            }
        }
        bytes
    }

    /// A round carrying many peers' input gets a CPU budget for each of them: a round of
    /// ten JSON messages, each well inside one call's budget, does not trap the node, as
    /// it did when the ten shared one call's budget.
    #[test]
    fn each_peers_input_has_its_own_cpu_budget() {
        let budget = Duration::from_millis(200);
        let mut hub = Hub::new(budget, Some(1 << 30), 10);
        // A quarter of a million items in JSON: about a sixth of one call's budget each
        // on this machine (a few tens of ms), so ten of them together take more than one.
        let inputs = hub.inputs(&Value::Array(vec![Value::Int(7); 1 << 18]).encode());
        let started = std::time::Instant::now();
        let result = hub.engine.handle_inputs(&inputs);
        let took = started.elapsed();
        assert!(
            result.is_ok(),
            "the round of 10 inputs trapped after {took:?} (budget {budget:?} each): {}",
            result
                .err()
                .map(|e| sandbox::describe(&e))
                .unwrap_or_default()
        );
        assert_eq!(hub.delivered(), 10);
    }

    /// The largest JSON message there is, of the smallest items (eight million), read as
    /// a socket hands it over, fits a node's sandbox and budgets at their defaults: it
    /// is converted as it is parsed, never held as a tree (which took over 256 MiB and
    /// stopped the node).
    #[test]
    fn a_largest_json_message_of_small_items_fits_the_sandbox() {
        let mut hub = Hub::new(Limits::default().max_call_time, None, 1);
        let items = vec![Value::Int(7); (16 << 20) / 2 - 64];
        let inputs = hub.inputs(&Value::Array(items).encode());
        let mut delivered = 0;
        for (conn, bytes) in &inputs {
            for chunk in bytes.chunks(64 << 10) {
                let result = hub.engine.handle_inputs(&[(*conn, chunk.to_vec())]);
                if let Err(e) = result {
                    panic!("the node stopped: {}", sandbox::describe(&e));
                }
                delivered += hub.delivered();
            }
        }
        assert_eq!(delivered, 1);
        assert!(
            hub.engine.memory_bytes() < 128 << 20,
            "{} bytes of sandbox memory",
            hub.engine.memory_bytes()
        );
    }

    /// The other way: the largest message there is for a peer that asked for JSON (eight
    /// million small items, sixteen MiB as JSON) is converted as it is read, and the
    /// node's sandbox stays well under what the tree it used to be decoded into took.
    #[test]
    fn a_largest_message_for_a_json_peer_fits_the_sandbox() {
        let mut hub = Hub::new(Limits::default().max_call_time, None, 1);
        let port = hub.peers[0].0.register_port("inbox").expect("port");
        let args = Value::Array(vec![Value::Int(0); (16 << 20) / 2 - 64]).encode();
        let mut batch = wit_node::Batch {
            data: Vec::new(),
            sizes: Vec::new(),
        };
        aemp_engine::batch::push(&mut batch.data, &mut batch.sizes, &port, &args);
        match hub.engine.send(&batch) {
            Ok(sent) => sent.expect("sent"),
            Err(e) => panic!("the node stopped: {}", sandbox::describe(&e)),
        }
        hub.answer_peers();
        let delivered: usize = hub.peers[0]
            .0
            .poll_outputs()
            .iter()
            .map(|o| match o {
                NodeOutput::Deliver(d) => d.len(),
                _ => 0,
            })
            .sum();
        assert_eq!(delivered, 1);
        assert!(
            hub.engine.memory_bytes() < 128 << 20,
            "{} bytes of sandbox memory",
            hub.engine.memory_bytes()
        );
    }
}
