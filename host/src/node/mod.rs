//! A node running in the sandbox: the Rust API.
//!
//! ```
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! use std::time::Duration;
//! use aemp_host::{Node, Value};
//!
//! let a = Node::builder().node_id("a").secret("s3cret").bind("127.0.0.1:0").start().await?;
//! let b = Node::builder().node_id("b").secret("s3cret").start().await?;
//! b.connect(&a.listen_addrs()[0].to_string()).await?;
//! b.wait_up("a", Duration::from_secs(10)).await?;
//!
//! let mut inbox = a.named_port("inbox").await?;
//! b.send("a#inbox", vec![Value::text("hello"), Value::Int(1)]).await?;
//! assert_eq!(inbox.recv().await, Some(vec![Value::text("hello"), Value::Int(1)]));
//! b.shutdown(Duration::from_secs(1)).await?;
//! # Ok::<(), aemp_host::NodeError>(())
//! # }).unwrap();
//! ```
//!
//! Every call that talks to the node is `async`: it waits for room in the node's command
//! queue, then for the node's answer. Cancelling a call (dropping its future) after it
//! was queued does not undo it: the node still carries it out. Calls that wait for
//! something outside the node have a timeout argument ([`Node::wait_up`],
//! [`Node::flush`], [`Node::shutdown`]) or are cancel-safe and say so ([`Port::recv`],
//! [`Monitor`], the database queries, which wait for the master's answer).
//!
//! One tokio task per node (the driver, `driver`) owns the engine instance and every
//! socket of the node (`io`): listeners, connections, TLS sessions. Every call into the
//! sandbox is made by that task, so the engine needs no locks, and no read or write of a
//! socket costs a task switch or a channel hop. A round: read what every ready socket has
//! (up to 64 KiB each), hand it all to the engine in one call, act on every output, then
//! write each connection's output at once.
//!
//! Every queue is bounded, in messages and in bytes. Every call that talks to the node is
//! `async` and waits for room in the node's command queue (1024 commands); a send also
//! waits for its share of [`SEND_QUEUE_BYTES`]. A send to a node whose connection has
//! more than [`HIGH_WATER`] bytes waiting to be written waits until it is back under the
//! mark, while sends to other nodes go on (backpressure per peer; `parked`); a connection
//! whose bytes exceed [`NodeBuilder::max_write_queue`] is closed as a peer that does not
//! read, and one whose writes make no progress for [`NodeBuilder::write_timeout`] fails.
//!
//! A port's inbox holds [`NodeBuilder::port_capacity`] messages and
//! [`NodeBuilder::port_bytes`] bytes (as raw CBOR; they are decoded by the port's reader);
//! a message for a full inbox is held by the driver, the connections whose reads filled
//! it read no more until nothing is held (TCP pushes back to those senders), and the
//! application's messages wait once a port's worth of its own is held. A port that takes
//! nothing for [`NodeBuilder::port_stall`] is stalled: what is held for it is dropped,
//! with a warning, and so is every message that finds its inbox full until it reads
//! again, so one port that is never read cannot stop the node serving the others.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use aemp_engine::Value;

use crate::sandbox::wit_node::Batch;
use tokio::sync::mpsc::Sender;
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{Semaphore, broadcast, oneshot, watch};

mod builder;
mod datastream;
mod deliver;
mod driver;
mod engine;
mod inbox;
mod info;
mod io;
mod parked;
mod subscribe;

pub use builder::NodeBuilder;
pub use datastream::{DataConnections, DataStream};
pub use inbox::Messages;
pub use info::{ConnInfo, INFO_LISTED, INFO_TAG, NodeInfo, PortInfo};
use subscribe::Topic;
pub use subscribe::{DbChange, DbMonitor, Monitor, Request, Requests};

/// Bytes waiting for one connection above which the application's sends to that node
/// wait (see the module docs). 1 MiB keeps a fast peer's pipe full (it is far more than
/// a socket buffer) while bounding what a slow one costs.
pub const HIGH_WATER: usize = 1 << 20;

/// Bytes of messages the application's sends may have waiting for the node at once (in
/// its command queue or waiting for a slow peer); a send waits for its share before it is
/// queued. A batch larger than this waits until it is alone.
pub const SEND_QUEUE_BYTES: usize = 16 << 20;

/// Why a node could not start, or refused a call. Match on the variant (and on
/// [`Refusal`] for what the engine refused); the messages are for people.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum NodeError {
    /// The configuration is unusable.
    #[error("configuration: {0}")]
    Config(String),
    /// Listening on an address failed.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address as given.
        addr: String,
        /// What the operating system said.
        #[source]
        source: Arc<std::io::Error>,
    },
    /// Arguments given as a Rust value could not become a message.
    #[error(transparent)]
    Value(#[from] crate::ValueError),
    /// The sandbox could not be made or could not start the node's instance.
    #[error(transparent)]
    Sandbox(#[from] crate::SandboxError),
    /// The engine refused the call; `message` is its explanation.
    #[error("{message}")]
    Refused {
        /// What was wrong, to match on.
        kind: Refusal,
        /// The engine's words.
        message: String,
    },
    /// A batch was refused part way: the first `sent` messages went out, the rest did not.
    #[error("{sent} messages of the batch sent, then: {cause}")]
    Partial {
        /// How many messages, from the start of the batch, were sent.
        sent: usize,
        /// Why the next one was refused.
        #[source]
        cause: Box<NodeError>,
    },
    /// A reply from the network could not be decoded.
    #[error("undecodable reply: {0}")]
    Decode(#[from] aemp_engine::DecodeError),
    /// The sandbox trapped or hit a limit: the node is gone.
    #[error("node stopped: {0}")]
    Stopped(String),
    /// No answer in time.
    #[error("timed out")]
    Timeout,
    /// What was waited for was called off ([`Node::unmonitor`] for a [`Monitor`]).
    #[error("cancelled")]
    Cancelled,
    /// A data connection could not be made; the message is the reference's (`NODE:
    /// unable to establish connection within N seconds`, `HANDLER: no such data
    /// connection handler`, the handshake's failure...).
    #[error("data connection failed: {0}")]
    DataConnection(String),
}

/// What the engine refused a call for (the kinds of [`NodeError::Refused`]): the engine's
/// own [`aemp_engine::RefusalKind`].
pub use aemp_engine::RefusalKind as Refusal;

/// Something that happened to the node, for observers ([`Node::events`]). A subscriber
/// that falls more than 1024 events behind misses some (it is told so with
/// `RecvError::Lagged`); what must not be missed has its own handle: [`Monitor`],
/// [`Requests`], [`DbMonitor`], [`Node::wait_up`].
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Event {
    /// A node completed a handshake with us.
    NodeUp(String),
    /// A node's connection is gone.
    NodeDown { node: String, reason: String },
    /// A monitored port died; `reason` is empty for a normal exit.
    PortDown { port: String, reason: Vec<Value> },
    /// A connection closed before it was any node's working connection: its handshake
    /// failed (`reason` is the engine's, e.g. a wrong secret's), it was refused or cut
    /// off during it, or it was no longer needed (`NODE connected elsewhere`).
    ConnectionFailed { reason: String },
}

/// A running node. Cheap to clone; the node stops when every handle is dropped.
#[derive(Debug, Clone)]
pub struct Node {
    id: String,
    listen: Vec<SocketAddr>,
    tx: Sender<Cmd>,
    events: broadcast::Sender<Event>,
    status: watch::Receiver<Option<String>>,
    /// Bytes waiting to be written to the sockets, as of the driver's last round.
    unwritten: Arc<AtomicUsize>,
    /// Shares of [`SEND_QUEUE_BYTES`], one per byte of the sends queued or waiting.
    send_bytes: Arc<Semaphore>,
}

/// A local port: receives the messages sent to its id. Dropping it kills the port.
#[derive(Debug)]
pub struct Port {
    id: String,
    /// Each message's arguments as one CBOR array, decoded by the receiver.
    rx: inbox::Receiver,
    tx: Sender<Cmd>,
}

impl Port {
    /// The port id (`NODE#NAME`).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The next message's arguments; `None` once the port or the node is gone.
    /// Cancel-safe: a message is never lost to a cancelled `recv`.
    pub async fn recv(&mut self) -> Option<Vec<Value>> {
        self.rx.recv_with(decode_args).await
    }

    /// The next message's arguments undecoded, as the CBOR array the peer sent (for
    /// receivers that decode it themselves or pass it on); `None` once the port or the
    /// node is gone.
    pub async fn recv_raw(&mut self) -> Option<Vec<u8>> {
        self.rx.recv_with(<[u8]>::to_vec).await
    }

    /// Waits for a message, then takes it and every message already waiting, up to
    /// `limit` in all, appending their arguments to `buf`; returns how many were taken
    /// (0 only once the port or the node is gone, or when `limit` is 0), as tokio's
    /// `Receiver::recv_many` does.
    pub async fn recv_many(&mut self, buf: &mut Vec<Vec<Value>>, limit: usize) -> usize {
        if limit == 0 {
            return 0;
        }
        let Some(messages) = self.rx.take(limit).await else {
            return 0;
        };
        buf.extend(messages.decode());
        messages.len()
    }

    /// Waits for a message, then takes it and every message already waiting, up to
    /// `limit` in all (at least one), undecoded: the fastest way to receive, with no
    /// allocation per message (see [`Messages`]). `None` once the port or the node is
    /// gone. Cancel-safe.
    pub async fn recv_batch(&mut self, limit: usize) -> Option<Messages> {
        self.rx.take(limit).await
    }
}

impl Drop for Port {
    fn drop(&mut self) {
        let kill = Cmd::Kill {
            port: self.id.clone(),
            reason: Vec::new(),
            reply: None,
        };
        // A drop cannot wait: when the command queue is full, a task waits for room (one
        // per port, so this is bounded by the ports there are).
        if let Err(TrySendError::Full(kill)) = self.tx.try_send(kill)
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            let tx = self.tx.clone();
            runtime.spawn(async move {
                let _ = tx.send(kill).await;
            });
        }
    }
}

/// Messages for one call of [`Node::send_messages`], each encoded as it is pushed (on
/// the caller's task, not the node's), all in one buffer: a batch of many crosses into
/// the node as one.
///
/// ```no_run
/// # async fn example(node: aemp_host::Node) -> Result<(), aemp_host::NodeError> {
/// use aemp_host::{SendBatch, Value};
/// let mut batch = SendBatch::new();
/// for i in 0..1000 {
///     batch.push("other#inbox", &[Value::text("job"), Value::Int(i)]);
/// }
/// node.send_messages(batch).await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct SendBatch {
    batch: Batch,
}

impl Default for SendBatch {
    fn default() -> SendBatch {
        SendBatch::new()
    }
}

impl SendBatch {
    /// An empty batch.
    pub fn new() -> SendBatch {
        SendBatch::with_capacity(0)
    }

    /// An empty batch with room for the bookkeeping of `messages` messages.
    pub fn with_capacity(messages: usize) -> SendBatch {
        SendBatch {
            batch: Batch {
                data: Vec::new(),
                sizes: Vec::with_capacity(2 * messages),
            },
        }
    }

    /// Adds a message: `args` to `port_id`.
    pub fn push(&mut self, port_id: &str, args: &[Value]) {
        let b = &mut self.batch;
        aemp_engine::batch::push_with(&mut b.data, &mut b.sizes, port_id, |out| {
            Value::encode_array_into(args, out)
        });
    }

    /// Adds a message whose arguments are already encoded: `args` is one CBOR array (as
    /// [`Port::recv_raw`] returns them). The node checks it when the batch is sent.
    pub fn push_raw(&mut self, port_id: &str, args: &[u8]) {
        let b = &mut self.batch;
        aemp_engine::batch::push(&mut b.data, &mut b.sizes, port_id, args);
    }

    /// How many messages.
    pub fn len(&self) -> usize {
        self.batch.sizes.len() / 2
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.batch.sizes.is_empty()
    }
}

type Reply<T> = oneshot::Sender<Result<T, NodeError>>;

enum Cmd {
    Port {
        name: Option<String>,
        reply: Reply<Port>,
    },
    Send {
        /// The messages, encoded by the caller.
        batch: Batch,
        reply: Reply<()>,
        /// Its share of the send bytes, given back once the node carried it out.
        permit: Option<tokio::sync::OwnedSemaphorePermit>,
    },
    Kill {
        port: String,
        reason: Vec<Value>,
        reply: Option<Reply<()>>,
    },
    Monitor {
        port: String,
        reply: Reply<Monitor>,
    },
    Unmonitor {
        port: String,
        reply: Reply<()>,
    },
    WaitUp {
        node: String,
        reply: Reply<()>,
    },
    Subscribe {
        topic: Topic,
        reply: Reply<inbox::Receiver>,
    },
    Unsubscribe {
        topic: Topic,
    },
    Connect {
        addr: String,
    },
    DbSet {
        family: String,
        key: String,
        value: Value,
    },
    DbDel {
        family: String,
        keys: Vec<String>,
    },
    DbQuery {
        kind: DbQuery,
        family: String,
        reply: Reply<Value>,
    },
    IsUp {
        node: String,
        reply: Reply<bool>,
    },
    Memory {
        reply: Reply<usize>,
    },
    Pending {
        reply: Reply<usize>,
    },
    Info {
        reply: Reply<NodeInfo>,
    },
    DataConnect {
        node: String,
        timeout_ms: u64,
        handler: String,
        /// The handler's arguments, one CBOR array.
        args: Vec<u8>,
        reply: Reply<DataStream>,
    },
    DataHandle {
        name: String,
        reply: Reply<DataConnections>,
    },
    Shutdown {
        reply: Reply<()>,
    },
}

impl Cmd {
    /// Bytes of messages the command sends.
    fn bytes(&self) -> usize {
        match self {
            Cmd::Send { batch, .. } => batch.data.len(),
            _ => 0,
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum DbQuery {
    Family,
    Keys,
    Values,
}

impl Node {
    /// How to start one.
    pub fn builder() -> NodeBuilder {
        NodeBuilder::default()
    }

    /// This node's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The addresses the node listens on.
    pub fn listen_addrs(&self) -> &[SocketAddr] {
        &self.listen
    }

    /// Why the node stopped, once it has.
    pub fn stopped(&self) -> Option<String> {
        self.status.borrow().clone()
    }

    /// Waits until the node stops on its own (a trap, a sandbox limit) and returns why, as
    /// [`NodeError::Stopped`]. A program that runs a node should wait on this beside its
    /// other work, so that a stopped node ends it instead of lingering. Cancel-safe.
    pub async fn closed(&self) -> NodeError {
        let mut status = self.status.clone();
        match status.wait_for(Option::is_some).await {
            Ok(reason) => NodeError::Stopped(reason.clone().unwrap_or_default()),
            Err(_) => self.gone(),
        }
    }

    /// Events as they happen from now on: nodes up and down, monitored ports dying. For
    /// observing (logs, metrics): a slow subscriber misses events (see [`Event`]).
    pub fn events(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    async fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Cmd) -> Result<T, NodeError> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(make(reply)).await.map_err(|_| self.gone())?;
        rx.await.map_err(|_| self.gone())?
    }

    fn gone(&self) -> NodeError {
        NodeError::Stopped(self.stopped().unwrap_or_else(|| "node is gone".into()))
    }

    /// Queues a command that needs no answer, waiting for room like every call.
    async fn tell(&self, cmd: Cmd) -> Result<(), NodeError> {
        self.tx.send(cmd).await.map_err(|_| self.gone())
    }

    /// A new local port with a fresh unique name.
    pub async fn port(&self) -> Result<Port, NodeError> {
        self.call(|reply| Cmd::Port { name: None, reply }).await
    }

    /// A new local port with a chosen name (e.g. `echo`).
    pub async fn named_port(&self, name: &str) -> Result<Port, NodeError> {
        self.call(|reply| Cmd::Port {
            name: Some(name.to_owned()),
            reply,
        })
        .await
    }

    /// Sends `args` to `port_id` (queued if its node is not connected yet). Waits while
    /// the node's command queue is full.
    pub async fn send(&self, port_id: &str, args: Vec<Value>) -> Result<(), NodeError> {
        self.send_batch(vec![(port_id.to_owned(), args)]).await
    }

    /// Sends many messages with one call into the engine. On a refusal the messages
    /// before the refused one are sent, the rest are not: [`NodeError::Partial`] says how
    /// many went out (a refusal of the first is [`NodeError::Refused`]).
    pub async fn send_batch(&self, messages: Vec<(String, Vec<Value>)>) -> Result<(), NodeError> {
        let mut batch = SendBatch::with_capacity(messages.len());
        for (port, args) in &messages {
            batch.push(port, args);
        }
        self.send_messages(batch).await
    }

    /// Sends the messages of `batch` with one call into the engine, as
    /// [`Node::send_batch`] does (the same errors), without a `String` and a `Vec` per
    /// message: the fastest way to send many.
    pub async fn send_messages(&self, batch: SendBatch) -> Result<(), NodeError> {
        let batch = batch.batch;
        let bytes = batch.data.len().min(SEND_QUEUE_BYTES);
        // (Never closed: an error cannot happen, and would only mean no bound.)
        let permit = self
            .send_bytes
            .clone()
            .acquire_many_owned(u32::try_from(bytes).unwrap_or(u32::MAX))
            .await
            .ok();
        self.call(|reply| Cmd::Send {
            batch,
            reply,
            permit,
        })
        .await
    }

    /// Sends a serializable Rust value as the arguments of a message: a tuple, array or
    /// `Vec` whose items become the arguments (see [`crate::to_value`] for how types map).
    /// Waits like [`Node::send`].
    ///
    /// ```no_run
    /// # async fn example(node: aemp_host::Node) -> Result<(), aemp_host::NodeError> {
    /// node.send_ser("other#inbox", &("job", 7, vec!["a", "b"])).await?;
    /// # Ok(()) }
    /// ```
    pub async fn send_ser<T: serde::Serialize + ?Sized>(
        &self,
        port_id: &str,
        args: &T,
    ) -> Result<(), NodeError> {
        let args = crate::convert::to_args(args)?;
        let mut batch = SendBatch::with_capacity(1);
        batch.push_raw(port_id, &args);
        self.send_messages(batch).await
    }

    /// Kills a port (local or remote) with `reason` (empty for a normal exit).
    pub async fn kill(&self, port_id: &str, reason: Vec<Value>) -> Result<(), NodeError> {
        self.call(|reply| Cmd::Kill {
            port: port_id.to_owned(),
            reason,
            reply: Some(reply),
        })
        .await
    }

    /// Monitors a port (local or remote). The [`Monitor`] resolves with the kill reason
    /// when the port dies, whenever it is awaited; the death also comes as
    /// [`Event::PortDown`] to [`Node::events`] subscribers.
    ///
    /// ```no_run
    /// # async fn example(node: aemp_host::Node) -> Result<(), aemp_host::NodeError> {
    /// let down = node.monitor("other#worker").await?;
    /// let reason = down.await?; // empty for a normal exit
    /// # Ok(()) }
    /// ```
    pub async fn monitor(&self, port_id: &str) -> Result<Monitor, NodeError> {
        self.call(|reply| Cmd::Monitor {
            port: port_id.to_owned(),
            reply,
        })
        .await
    }

    /// Stops monitoring a port; its [`Monitor`]s resolve as [`NodeError::Cancelled`].
    pub async fn unmonitor(&self, port_id: &str) -> Result<(), NodeError> {
        self.call(|reply| Cmd::Unmonitor {
            port: port_id.to_owned(),
            reply,
        })
        .await
    }

    /// Connects to the node listening at `addr` (no seed needed).
    pub async fn connect(&self, addr: &str) -> Result<(), NodeError> {
        self.tell(Cmd::Connect {
            addr: addr.to_owned(),
        })
        .await
    }

    /// Whether `node` has a working connection.
    pub async fn is_up(&self, node: &str) -> Result<bool, NodeError> {
        self.call(|reply| Cmd::IsUp {
            node: node.to_owned(),
            reply,
        })
        .await
    }

    /// Waits until `node` is up, at most `timeout` ([`NodeError::Timeout`]). The node
    /// answers as soon as it is up, however busy the node is with other events.
    pub async fn wait_up(&self, node: &str, timeout: Duration) -> Result<(), NodeError> {
        tokio::time::timeout(
            timeout,
            self.call(|reply| Cmd::WaitUp {
                node: node.to_owned(),
                reply,
            }),
        )
        .await
        .map_err(|_| NodeError::Timeout)?
    }

    /// The size of the node's sandbox memory (the engine's linear memory), in bytes.
    pub async fn sandbox_memory(&self) -> Result<usize, NodeError> {
        self.call(|reply| Cmd::Memory { reply }).await
    }

    /// What the node is doing: its connections (peer, address, authentication, framing,
    /// TLS, bytes and messages each way, bytes waiting), its ports with their inbox
    /// depth, its global role and database, the limits hit, its uptime. The same
    /// figures other nodes get with an [`INFO_TAG`] request and `aemp run --metrics`
    /// serves.
    pub async fn info(&self) -> Result<NodeInfo, NodeError> {
        self.call(|reply| Cmd::Info { reply }).await
    }

    /// Waits until everything sent so far has left the node: written to the sockets,
    /// including messages still waiting for a node to come up, at most `timeout`
    /// ([`NodeError::Timeout`]). A message for a node that never comes up waits until
    /// the node gives it up (after the monitor timeout, 30 s by default), and is then
    /// dropped (monitors of its ports fire). Cancel-safe.
    pub async fn flush(&self, timeout: Duration) -> Result<(), NodeError> {
        tokio::time::timeout(timeout, async {
            while self.call(|reply| Cmd::Pending { reply }).await? > 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Ok(())
        })
        .await
        .map_err(|_| NodeError::Timeout)?
    }

    /// Stops the node cleanly: [`Node::flush`] (at most `timeout`), then closes its
    /// listeners and connections and waits until they are closed. Other handles then see
    /// the node stopped ([`Node::closed`] says `shut down`), ports end. Returns
    /// [`NodeError::Timeout`] when not everything could be written in time (the node is
    /// shut down all the same).
    pub async fn shutdown(self, timeout: Duration) -> Result<(), NodeError> {
        let flushed = self.flush(timeout).await;
        match self.call(|reply| Cmd::Shutdown { reply }).await {
            Ok(()) => flushed,
            // Stopped on its own meanwhile: nothing left to shut down.
            Err(NodeError::Stopped(_)) if flushed.is_ok() => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Bytes waiting to be written to the node's sockets, over all connections, as of
    /// the node's last round of I/O. Does not wait (it is read even while the node takes
    /// no commands because a peer is behind).
    pub fn pending_bytes(&self) -> usize {
        self.unwritten.load(Ordering::Relaxed)
    }

    /// Node-port requests tagged `tag` (a peer sending `[tag, args...]` to our node port)
    /// come to the returned [`Requests`], in order and none lost: when it is full the node
    /// reads no more from its connections, as for a full [`Port`]. A second call for the
    /// same tag takes the requests over from the first.
    pub async fn handle_requests(&self, tag: &str) -> Result<Requests, NodeError> {
        let topic = Topic::Requests(tag.to_owned());
        let rx = self.call(|reply| Cmd::Subscribe { topic, reply }).await?;
        Ok(Requests::new(tag.to_owned(), rx, self.tx.clone()))
    }

    /// Opens a data connection to `node`: a raw byte stream, authenticated (and inside
    /// TLS when the network uses it) as the node's connections are, served there by the
    /// data handler `handler` (registered with [`Node::handle_data_connections`], or a
    /// Perl node's `$initfunc`) called with `args`. This is AnyEvent::MP's
    /// `AnyEvent::MP::DataConn::connect_to`, and works with Perl nodes both ways.
    ///
    /// Whichever of the two nodes listens where the other reached it opens the
    /// connection. Fails with [`NodeError::DataConnection`] and the reference's message
    /// when it is not made within `timeout` (counted by both nodes; the request waits for
    /// `node` to come up within it), the handler does not exist there, or the handshake
    /// fails; with [`NodeError::Refused`] when the engine refuses the request (`node`
    /// is this node, too many data connections pending).
    ///
    /// ```no_run
    /// # async fn example(node: aemp_host::Node) -> Result<(), Box<dyn std::error::Error>> {
    /// use std::time::Duration;
    /// use tokio::io::AsyncWriteExt;
    /// use aemp_host::Value;
    ///
    /// let mut stream = node
    ///     .data_connect("other", Duration::from_secs(10), "upload", vec![Value::text("a.log")])
    ///     .await?;
    /// stream.write_all(b"the file's bytes").await?;
    /// stream.shutdown().await?;
    /// # Ok(()) }
    /// ```
    pub async fn data_connect(
        &self,
        node: &str,
        timeout: Duration,
        handler: &str,
        args: Vec<Value>,
    ) -> Result<DataStream, NodeError> {
        let args = Value::Array(args).encode();
        self.call(|reply| Cmd::DataConnect {
            node: node.to_owned(),
            timeout_ms: u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
            handler: handler.to_owned(),
            args,
            reply,
        })
        .await
    }

    /// Other nodes may open data connections served by `name` ([`Node::data_connect`]
    /// there, or a Perl node's `connect_to` with `name` as its `$initfunc`): they come
    /// to the returned [`DataConnections`] with the arguments the other node gave. A
    /// second call for the same name takes them over from the first.
    ///
    /// ```no_run
    /// # async fn example(node: aemp_host::Node) -> Result<(), aemp_host::NodeError> {
    /// let mut incoming = node.handle_data_connections("echo").await?;
    /// while let Some(stream) = incoming.accept().await {
    ///     tokio::spawn(async move {
    ///         let (mut rd, mut wr) = tokio::io::split(stream);
    ///         let _ = tokio::io::copy(&mut rd, &mut wr).await;
    ///     });
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn handle_data_connections(&self, name: &str) -> Result<DataConnections, NodeError> {
        self.call(|reply| Cmd::DataHandle {
            name: name.to_owned(),
            reply,
        })
        .await
    }

    /// Sets our entry `key` of database `family`.
    pub async fn db_set(&self, family: &str, key: &str, value: Value) -> Result<(), NodeError> {
        self.tell(Cmd::DbSet {
            family: family.to_owned(),
            key: key.to_owned(),
            value,
        })
        .await
    }

    /// Deletes our entries `keys` of `family`.
    pub async fn db_del(&self, family: &str, keys: &[&str]) -> Result<(), NodeError> {
        let keys = keys.iter().map(|k| k.to_string()).collect();
        self.tell(Cmd::DbDel {
            family: family.to_owned(),
            keys,
        })
        .await
    }

    /// The whole `family` (a map), from the master. Waits for the master's answer with no
    /// timeout of its own: cancel-safe, so wrap it in `tokio::time::timeout`.
    pub async fn db_family(&self, family: &str) -> Result<Value, NodeError> {
        self.db_query(DbQuery::Family, family).await
    }

    /// The keys of `family`, from the master (waits as [`Node::db_family`] does).
    pub async fn db_keys(&self, family: &str) -> Result<Value, NodeError> {
        self.db_query(DbQuery::Keys, family).await
    }

    /// The values of `family`, from the master (waits as [`Node::db_family`] does).
    pub async fn db_values(&self, family: &str) -> Result<Value, NodeError> {
        self.db_query(DbQuery::Values, family).await
    }

    async fn db_query(&self, kind: DbQuery, family: &str) -> Result<Value, NodeError> {
        let family = family.to_owned();
        self.call(|reply| Cmd::DbQuery {
            kind,
            family,
            reply,
        })
        .await
    }

    /// Monitors database `family`: its changes come to the returned [`DbMonitor`], in
    /// order and none lost (a full one holds the node's reading, as a full [`Port`]
    /// does). Dropping it stops the monitoring.
    pub async fn db_monitor(&self, family: &str) -> Result<DbMonitor, NodeError> {
        let topic = Topic::Db(family.to_owned());
        let rx = self.call(|reply| Cmd::Subscribe { topic, reply }).await?;
        Ok(DbMonitor::new(family.to_owned(), rx, self.tx.clone()))
    }
}

/// Commands from the application waiting for the node, at most.
const CMD_QUEUE: usize = 1024;

/// The arguments of a message from their CBOR array (none when it is not an array).
fn decode_args(bytes: &[u8]) -> Vec<Value> {
    match Value::decode(bytes) {
        Ok(Value::Array(items)) => items,
        _ => Vec::new(),
    }
}
