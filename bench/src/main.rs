//! `aemp-bench`: prints how fast the engine is, natively and inside wasmtime, and how fast
//! two nodes talk over loopback TCP. `--json` prints the same figures as one JSON object,
//! `--quick` runs tiny counts (a smoke run), `--only engine|e2e|dataconn|memory` one group of
//! figures, `--only scaling` what work costs as it grows (see [`scaling`]; `--plot DIR`
//! draws its curves). Figure names are documented in the README.

mod scaling;

use std::time::{Duration, Instant};

use aemp_engine::{
    Config, ConnId, Connection, Framing, NodeConfig, NodeOutput, Output, Value, Verdict,
};
use aemp_host::raw::{Instance, ResourceAny, wit, wit_node};
use aemp_host::{Node, Sandbox, SendBatch, TlsConfig};
use serde_json::json;

/// How much work each measurement does.
struct Counts {
    handshakes: usize,
    small: usize,
    large: usize,
    e2e: usize,
    pings: usize,
    idle: usize,
}

const SECRET: &[u8] = b"bench secret";
/// How long a run waits for a message before it calls the connection lost.
const STALL: Duration = Duration::from_secs(30);

fn small_message() -> Vec<u8> {
    // ["port", "ping", 123]
    Value::Array(vec![
        Value::text("port"),
        Value::text("ping"),
        Value::Int(123),
    ])
    .encode()
}

fn large_message() -> Vec<u8> {
    // ["port", <64 KiB of text>]: text so json and cbor carry the same bytes.
    Value::Array(vec![
        Value::text("port"),
        Value::Text("x".repeat(64 * 1024 - 16)),
    ])
    .encode()
}

fn config(node: &str, framing: Framing) -> Config {
    let mut c = Config::new(node);
    c.secret = Some(SECRET.to_vec());
    c.framings = vec![framing];
    c
}

// ---- the engine natively --------------------------------------------------------------

/// Moves everything one native connection transmits into the other; counts messages.
fn native_pump(from: &mut Connection, to: &mut Connection) -> usize {
    let mut messages = 0;
    while let Some(o) = from.poll_output() {
        match o {
            Output::Transmit(bytes) => to.handle_input(&bytes),
            Output::Greeting(_) => from.handle_verdict(Verdict::Accept),
            Output::Message(_) => messages += 1,
            Output::Closed(e) => panic!("{e}"),
            _ => {}
        }
    }
    messages
}

fn native_pair(framing: Framing) -> (Connection, Connection) {
    let mut a = Connection::new(config("a", framing), [1; 66], 0).expect("config");
    let mut b = Connection::new(config("b", framing), [2; 66], 0).expect("config");
    while a.session().is_none() || b.session().is_none() {
        native_pump(&mut a, &mut b);
        native_pump(&mut b, &mut a);
    }
    (a, b)
}

fn native_handshakes(n: usize) -> f64 {
    let start = Instant::now();
    for _ in 0..n {
        native_pair(Framing::Cbor);
    }
    n as f64 / start.elapsed().as_secs_f64()
}

/// Messages per batch: 1000, or as many as fill 1 MiB (16 of 64 KiB): the order of what
/// one round of the host's reads hands the engine (64 KiB per connection, 4 MiB at most
/// over all). Batches of 64 MiB measured the page faults of their buffers more than the
/// engine. The end-to-end runs use it too (1000 of their small and 1 KiB messages).
fn batch(message: &[u8]) -> usize {
    ((1 << 20) / message.len()).clamp(1, 1000)
}

/// Seconds per message, sending in batches (see [`batch`]).
fn native_messages(framing: Framing, message: &[u8], n: usize) -> f64 {
    let (mut a, mut b) = native_pair(framing);
    native_pump(&mut b, &mut a);
    let start = Instant::now();
    let mut received = 0;
    while received < n {
        for _ in 0..batch(message).min(n - received) {
            a.send(message).expect("send");
        }
        native_pump(&mut a, &mut b);
        received += native_pump(&mut b, &mut a);
    }
    start.elapsed().as_secs_f64() / n as f64
}

// ---- the engine inside wasmtime -------------------------------------------------------

struct WasmSide {
    conn: ResourceAny,
}

fn wasm_open(inst: &mut Instance, node: &str, framing: Framing) -> WasmSide {
    let mut c = inst.default_config(node).expect("call");
    c.secret = Some(SECRET.to_vec());
    c.framings = vec![if framing == Framing::Cbor {
        wit::Framing::Cbor
    } else {
        wit::Framing::Json
    }];
    WasmSide {
        conn: inst.open(&c, 0).expect("call").expect("config"),
    }
}

/// Moves what `from` transmits into `to` (both in `inst`); counts messages.
fn wasm_pump(inst: &mut Instance, from: &WasmSide, to: &WasmSide) -> (usize, bool) {
    let mut messages = 0;
    let mut connected = false;
    for o in inst.poll_outputs(from.conn).expect("call") {
        match o {
            wit::Output::Transmit(bytes) => inst.handle_input(to.conn, &bytes).expect("call"),
            wit::Output::Greeting(_) => {
                inst.handle_verdict(from.conn, wit::Verdict::Accept)
                    .expect("call");
                let (m, c) = wasm_pump(inst, from, to);
                messages += m;
                connected |= c;
            }
            wit::Output::Messages(seq) => messages += seq.sizes.len(),
            wit::Output::Connected(_) => connected = true,
            wit::Output::Closed(e) => panic!("{}", e.message),
            _ => {}
        }
    }
    (messages, connected)
}

fn wasm_pair(inst: &mut Instance, framing: Framing) -> (WasmSide, WasmSide) {
    let a = wasm_open(inst, "a", framing);
    let b = wasm_open(inst, "b", framing);
    let (mut ca, mut cb) = (false, false);
    while !(ca && cb) {
        ca |= wasm_pump(inst, &a, &b).1;
        cb |= wasm_pump(inst, &b, &a).1;
    }
    (a, b)
}

fn wasm_handshakes(sandbox: &Sandbox, n: usize) -> f64 {
    let mut inst = sandbox.instantiate().expect("instance");
    let start = Instant::now();
    for _ in 0..n {
        let (a, b) = wasm_pair(&mut inst, Framing::Cbor);
        inst.drop_connection(a.conn).expect("drop");
        inst.drop_connection(b.conn).expect("drop");
    }
    n as f64 / start.elapsed().as_secs_f64()
}

fn wasm_messages(sandbox: &Sandbox, framing: Framing, message: &[u8], n: usize) -> f64 {
    let mut inst = sandbox.instantiate().expect("instance");
    let (a, b) = wasm_pair(&mut inst, framing);
    wasm_pump(&mut inst, &b, &a);
    // Built once, as the native run's messages are: the batch a host sends is in one
    // buffer already.
    let full = message.repeat(batch(message));
    let start = Instant::now();
    let mut received = 0;
    while received < n {
        let k = batch(message).min(n - received);
        inst.send(a.conn, &full[..k * message.len()])
            .expect("call")
            .expect("send");
        wasm_pump(&mut inst, &a, &b);
        received += wasm_pump(&mut inst, &b, &a).0;
    }
    start.elapsed().as_secs_f64() / n as f64
}

/// Nanoseconds for one call that does nothing (poll-timeout of a connected connection).
fn boundary_call(sandbox: &Sandbox, n: usize) -> f64 {
    let mut inst = sandbox.instantiate().expect("instance");
    let (a, _) = wasm_pair(&mut inst, Framing::Cbor);
    let start = Instant::now();
    for _ in 0..n {
        inst.poll_timeout(a.conn).expect("call");
    }
    start.elapsed().as_nanos() as f64 / n as f64
}

// ---- the node path in the engine -------------------------------------------------------

/// The arguments of the node figures' messages: `["ping",123]`.
fn ping_args() -> Vec<u8> {
    Value::Array(vec![Value::text("ping"), Value::Int(123)]).encode()
}

fn node_config(node: &str) -> NodeConfig {
    let mut c = NodeConfig::new(node);
    c.transport.secret = Some(SECRET.to_vec());
    c
}

/// Moves what node `from` outputs into `to` (its end of the connection is `to_conn`);
/// counts delivered messages and node-ups.
fn native_node_pump(
    from: &mut aemp_engine::Node,
    to: &mut aemp_engine::Node,
    to_conn: ConnId,
) -> (usize, bool) {
    let (mut delivered, mut up) = (0, false);
    while let Some(o) = from.poll_output() {
        match o {
            NodeOutput::Transmit { bytes, .. } => to.handle_input(to_conn, &bytes, 0),
            NodeOutput::Deliver(d) => delivered += d.len(),
            NodeOutput::NodeUp { .. } => up = true,
            NodeOutput::Close { reason, .. } => panic!("{reason}"),
            _ => {}
        }
    }
    (delivered, up)
}

/// Seconds per message from one native node to a port of another, wired back to back,
/// sent in batches of 1000.
fn native_node_messages(n: usize) -> f64 {
    let mut a = aemp_engine::Node::new(node_config("a"), [1; 16], 0).expect("config");
    let mut b = aemp_engine::Node::new(node_config("b"), [2; 16], 0).expect("config");
    let ab = a.connect_addr("b:4040", 0);
    let ba = b.handle_accept("a:50000", [2; 66], 0);
    a.handle_connected(ab, [1; 66], 0);
    let (mut up_a, mut up_b) = (false, false);
    while !(up_a && up_b) {
        up_a |= native_node_pump(&mut a, &mut b, ba).1;
        up_b |= native_node_pump(&mut b, &mut a, ab).1;
    }
    let port = b.register_port("inbox").expect("port");
    let args = ping_args();
    let start = Instant::now();
    let mut received = 0;
    while received < n {
        for _ in 0..1000.min(n - received) {
            a.send(&port, &args, 0).expect("send");
        }
        native_node_pump(&mut a, &mut b, ba);
        received += native_node_pump(&mut b, &mut a, ab).0;
    }
    start.elapsed().as_secs_f64() / n as f64
}

/// Moves what node `from` outputs into `to` (both in `inst`); counts delivered messages
/// and node-ups.
fn wasm_node_pump(
    inst: &mut Instance,
    from: ResourceAny,
    to: ResourceAny,
    to_conn: u64,
) -> (usize, bool) {
    let (mut delivered, mut up) = (0, false);
    let (store, api) = inst.parts();
    let outputs = api
        .aemp_engine_node()
        .node()
        .call_poll_outputs(&mut *store, from)
        .expect("call");
    for o in outputs {
        match o {
            wit_node::NodeOutput::Transmit(t) => {
                let (store, api) = inst.parts();
                api.aemp_engine_node()
                    .node()
                    .call_handle_input(store, to, to_conn, &t.bytes, 0)
                    .expect("call");
            }
            wit_node::NodeOutput::Deliver(d) => delivered += d.sizes.len(),
            wit_node::NodeOutput::NodeUp(_) => up = true,
            wit_node::NodeOutput::Close(c) => panic!("{}", c.reason),
            _ => {}
        }
    }
    (delivered, up)
}

/// [`native_node_messages`] through the component's `node` interface: one `send` per
/// batch of 1000, deliveries taken as `deliver` batches.
fn wasm_node_messages(sandbox: &Sandbox, n: usize) -> f64 {
    let mut inst = sandbox.instantiate().expect("instance");
    let create = |inst: &mut Instance, id: &str| {
        let (store, api) = inst.parts();
        let api = api.aemp_engine_node();
        let mut config = api.call_default_node_config(&mut *store, id).expect("call");
        config.transport.secret = Some(SECRET.to_vec());
        api.node()
            .call_create(store, &config, 0)
            .expect("call")
            .expect("config")
    };
    let a = create(&mut inst, "a");
    let b = create(&mut inst, "b");
    let (store, api) = inst.parts();
    let node = api.aemp_engine_node().node();
    let ab = node
        .call_connect_addr(&mut *store, a, "b:4040", 0)
        .expect("call");
    let ba = node
        .call_handle_accept(&mut *store, b, "a:50000", 0)
        .expect("call");
    node.call_handle_connected(&mut *store, a, ab, 0)
        .expect("call");
    let (mut up_a, mut up_b) = (false, false);
    while !(up_a && up_b) {
        up_a |= wasm_node_pump(&mut inst, a, b, ba).1;
        up_b |= wasm_node_pump(&mut inst, b, a, ab).1;
    }
    let (store, api) = inst.parts();
    let port = api
        .aemp_engine_node()
        .node()
        .call_register_port(store, b, "inbox")
        .expect("call")
        .expect("port");
    let args = ping_args();
    let start = Instant::now();
    let mut received = 0;
    while received < n {
        let mut batch = wit_node::Batch {
            data: Vec::new(),
            sizes: Vec::new(),
        };
        for _ in 0..1000.min(n - received) {
            aemp_engine::batch::push(&mut batch.data, &mut batch.sizes, &port, &args);
        }
        let (store, api) = inst.parts();
        api.aemp_engine_node()
            .node()
            .call_send(store, a, &batch, 0)
            .expect("call")
            .expect("send");
        wasm_node_pump(&mut inst, a, b, ba);
        received += wasm_node_pump(&mut inst, b, a, ab).0;
    }
    start.elapsed().as_secs_f64() / n as f64
}

// ---- nodes end to end ----------------------------------------------------------------

/// A receiving node and `senders` nodes connected to it, all up.
async fn nodes(
    sandbox: &std::sync::Arc<Sandbox>,
    tls: Option<&TlsConfig>,
    tag: &str,
    senders: usize,
) -> (Node, Vec<Node>) {
    let start = |name: String| {
        let mut b = listening(&name, sandbox);
        if let Some(tls) = tls {
            b = b.tls(tls.clone());
        }
        b.start()
    };
    let receiver = start(format!("recv-{tag}")).await.expect("node");
    let addr = receiver.listen_addrs()[0].to_string();
    let mut nodes = Vec::new();
    for i in 0..senders {
        let sender = start(format!("send{i}-{tag}")).await.expect("node");
        sender.connect(&addr).await.expect("connect");
        sender
            .wait_up(receiver.id(), Duration::from_secs(10))
            .await
            .expect("up");
        nodes.push(sender);
    }
    (receiver, nodes)
}

/// How the one-way runs send and receive.
#[derive(Clone, Copy, PartialEq)]
enum Api {
    /// `SendBatch` and `send_messages`; `recv_batch`, the arguments left undecoded.
    Batches,
    /// `send_batch` of `(String, Vec<Value>)` pairs; `recv_many`, decoded into `Value`s.
    Values,
}

/// Messages per second into one port of `receiver`: each of `senders` sends its share of
/// `n` messages `args`, in batches of 1000, all at once. Senders and receiver are tasks
/// of the runtime (not the caller of `block_on`, which is not one of its threads).
async fn one_way(receiver: &Node, senders: &[Node], args: &[Value], n: usize, api: Api) -> f64 {
    let mut inbox = receiver.port().await.expect("port");
    let share = n / senders.len();
    let total = share * senders.len();
    let per_batch = batch(&Value::Array(args.to_vec()).encode());
    let start = Instant::now();
    let producers: Vec<_> = senders
        .iter()
        .map(|sender| {
            let (sender, target, args) = (sender.clone(), inbox.id().to_owned(), args.to_vec());
            tokio::spawn(async move {
                let mut sent = 0;
                while sent < share {
                    let k = per_batch.min(share - sent);
                    match api {
                        Api::Batches => {
                            let mut batch = SendBatch::with_capacity(k);
                            for _ in 0..k {
                                batch.push(&target, &args);
                            }
                            sender.send_messages(batch).await
                        }
                        Api::Values => {
                            sender
                                .send_batch(vec![(target.clone(), args.clone()); k])
                                .await
                        }
                    }
                    .expect("send");
                    sent += k;
                }
            })
        })
        .collect();
    // Taken as a receiver that wants throughput takes them: what waits, at once.
    let consumer = tokio::spawn(async move {
        let (mut got, mut values) = (0, Vec::new());
        while got < total {
            let taken = tokio::time::timeout(STALL, async {
                match api {
                    Api::Batches => {
                        let batch = inbox.recv_batch(1024).await.expect("port open");
                        batch.iter().filter(|args| !args.is_empty()).count()
                    }
                    Api::Values => {
                        values.clear();
                        inbox.recv_many(&mut values, 1024).await
                    }
                }
            })
            .await
            .unwrap_or_else(|_| panic!("no message for {STALL:?}: the connection was lost"));
            got += taken;
        }
    });
    consumer.await.expect("receiver");
    let rate = total as f64 / start.elapsed().as_secs_f64();
    for producer in producers {
        producer.await.expect("producer");
    }
    rate
}

/// Messages per second one way, and round-trip percentiles in microseconds.
async fn e2e(
    sandbox: &std::sync::Arc<Sandbox>,
    tls: Option<&TlsConfig>,
    tag: &str,
    n: usize,
    pings: usize,
) -> (f64, f64, f64) {
    let (receiver, senders) = nodes(sandbox, tls, tag, 1).await;
    let rate = one_way(
        &receiver,
        &senders,
        &[Value::text("ping"), Value::Int(123)],
        n,
        Api::Batches,
    )
    .await;
    let (p50, p99, _) = round_trips(&receiver, &senders[0], pings, Duration::MAX).await;
    stop(receiver, senders).await;
    (rate, p50, p99)
}

/// MB/s through one data connection between two nodes: the sender writes `bytes` (in
/// 1 MiB writes), the receiver's data handler reads them to the end; timed from the
/// first write to the last byte read.
async fn data_stream(
    sandbox: &std::sync::Arc<Sandbox>,
    tls: Option<&TlsConfig>,
    tag: &str,
    bytes: usize,
) -> f64 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (receiver, senders) = nodes(sandbox, tls, tag, 1).await;
    let mut incoming = receiver
        .handle_data_connections("sink")
        .await
        .expect("handler");
    let reader = tokio::spawn(async move {
        let mut stream = incoming.accept().await.expect("stream");
        let mut buf = vec![0; 1 << 20];
        let mut total = 0;
        loop {
            match stream.read(&mut buf).await.expect("read") {
                0 => return total,
                n => total += n,
            }
        }
    });
    let mut stream = senders[0]
        .data_connect(receiver.id(), Duration::from_secs(10), "sink", vec![])
        .await
        .expect("data connection");
    let chunk = vec![0x5a; 1 << 20];
    let start = Instant::now();
    let mut left = bytes;
    while left > 0 {
        let n = left.min(chunk.len());
        stream.write_all(&chunk[..n]).await.expect("write");
        left -= n;
    }
    stream.shutdown().await.expect("shutdown");
    let read = reader.await.expect("reader");
    let secs = start.elapsed().as_secs_f64();
    assert_eq!(read, bytes, "every byte arrives");
    stop(receiver, senders).await;
    bytes as f64 / secs / 1e6
}

/// Shuts the nodes down and waits until they are gone, so that the next figure does not
/// share the machine with their teardown.
async fn stop(receiver: Node, senders: Vec<Node>) {
    for node in senders.into_iter().chain([receiver]) {
        node.shutdown(Duration::from_secs(10))
            .await
            .expect("shutdown");
    }
}

/// Round-trip percentiles in microseconds, and how many round trips there were: a
/// ping-pong, cal-style: the receiver echoes to the sender's port, `pings` times or
/// until `limit` has passed, whichever comes first (at least once).
async fn round_trips(
    receiver: &Node,
    sender: &Node,
    pings: usize,
    limit: Duration,
) -> (f64, f64, usize) {
    let mut echo = receiver.port().await.expect("port");
    let mut back = sender.port().await.expect("port");
    let (echo_id, back_id) = (echo.id().to_owned(), back.id().to_owned());
    let echoer = receiver.clone();
    tokio::spawn(async move {
        while let Some(args) = echo.recv().await {
            if echoer.send(&back_id, args).await.is_err() {
                return;
            }
        }
    });
    // The pinging side is a task too, as the echoing side is: the caller of `block_on`
    // is not one of the runtime's threads, so waking it would add two thread switches
    // to every round trip.
    let sender = sender.clone();
    tokio::spawn(async move {
        let mut timer = Pings::new(pings, limit);
        while timer.more() {
            let t = Instant::now();
            sender
                .send(&echo_id, vec![Value::Int(1)])
                .await
                .expect("send");
            recv(&mut back).await;
            timer.took(t);
        }
        timer.percentiles()
    })
    .await
    .expect("pings")
}

/// The floor under [`round_trips`]: the same ping-pong with the nodes taken out, two
/// tasks of the runtime echoing 4 bytes over one loopback TCP connection (`TCP_NODELAY`,
/// as the nodes' sockets). Percentiles in microseconds and the count, as there.
async fn tcp_round_trips(pings: usize) -> (f64, f64, usize) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("address");
    let echo = tokio::spawn(async move {
        let (mut socket, _) = listener.accept().await.expect("accept");
        socket.set_nodelay(true).expect("nodelay");
        let mut ping = [0; 4];
        while socket.read_exact(&mut ping).await.is_ok() {
            if socket.write_all(&ping).await.is_err() {
                return;
            }
        }
    });
    let figures = tokio::spawn(async move {
        let mut socket = tokio::net::TcpStream::connect(addr).await.expect("connect");
        socket.set_nodelay(true).expect("nodelay");
        let mut pong = [0; 4];
        let mut timer = Pings::new(pings, Duration::MAX);
        while timer.more() {
            let t = Instant::now();
            socket.write_all(&[1, 2, 3, 4]).await.expect("ping");
            socket.read_exact(&mut pong).await.expect("pong");
            timer.took(t);
        }
        timer.percentiles()
    })
    .await
    .expect("pings");
    echo.await.expect("echo");
    figures
}

/// The round trips of a ping-pong: `pings` of them, fewer once `limit` has passed, but at
/// least one.
struct Pings {
    rtts: Vec<f64>,
    pings: usize,
    limit: Duration,
    start: Instant,
}

impl Pings {
    fn new(pings: usize, limit: Duration) -> Pings {
        Pings {
            rtts: Vec::with_capacity(pings.min(100_000)),
            pings,
            limit,
            start: Instant::now(),
        }
    }

    /// Whether to ping again.
    fn more(&self) -> bool {
        self.rtts.is_empty() || (self.rtts.len() < self.pings && self.start.elapsed() < self.limit)
    }

    /// A round trip started at `t` is back.
    fn took(&mut self, t: Instant) {
        self.rtts.push(t.elapsed().as_secs_f64() * 1e6);
    }

    /// The median and 99th percentile in microseconds, and how many round trips.
    fn percentiles(mut self) -> (f64, f64, usize) {
        self.rtts.sort_by(f64::total_cmp);
        let pct = |p: f64| self.rtts[((self.rtts.len() - 1) as f64 * p) as usize];
        (pct(0.5), pct(0.99), self.rtts.len())
    }
}

/// The next message of `port`; a lost connection fails the run instead of hanging it.
async fn recv(port: &mut aemp_host::Port) -> Vec<Value> {
    tokio::time::timeout(STALL, port.recv())
        .await
        .unwrap_or_else(|_| panic!("no message for {STALL:?}: the connection was lost"))
        .expect("port open")
}

/// A node named `id` listening on a free loopback port, in the shared sandbox.
fn listening(id: &str, sandbox: &std::sync::Arc<Sandbox>) -> aemp_host::NodeBuilder {
    Node::builder()
        .node_id(id)
        .secret(SECRET)
        .bind("127.0.0.1:0")
        .sandbox(sandbox.clone())
}

/// Median milliseconds from `connect` to both sides up (hmac, loopback), fresh nodes.
async fn e2e_handshake(sandbox: &std::sync::Arc<Sandbox>, n: usize) -> f64 {
    let server = listening("hs-server", sandbox).start().await.expect("node");
    let addr = server.listen_addrs()[0].to_string();
    let mut times = Vec::new();
    for i in 0..n {
        let client = Node::builder()
            .node_id(&format!("hs-{i}"))
            .secret(SECRET)
            .sandbox(sandbox.clone())
            .start()
            .await
            .expect("node");
        let t = Instant::now();
        client.connect(&addr).await.expect("connect");
        client
            .wait_up("hs-server", Duration::from_secs(10))
            .await
            .expect("up");
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

/// Resident set size of this process, in bytes.
fn rss() -> f64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: f64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0.0);
    pages * 4096.0
}

/// Raises the soft limit on open files to `want`, and the hard limit too where we may
/// (`CAP_SYS_RESOURCE`, which root lacks in some containers, this project's among them):
/// a thousand connections with both ends here take 2,000 files, past the usual soft
/// limit of 1024. Returns the soft limit now in force.
fn raise_open_files(want: u64) -> u64 {
    use rlimit::Resource;
    if let Ok((soft, hard)) = Resource::NOFILE.get()
        && hard < want
    {
        // Refused without the privilege: then the hard limit is what we get.
        let _ = Resource::NOFILE.set(want.max(soft), want);
    }
    rlimit::increase_nofile_limit(want).unwrap_or(0)
}

/// Opens `n` connections to the node at `addr`, one after another, each a native engine
/// `Connection` taken through its handshake; returns them (open, idle) and handshakes/s.
async fn open_peers(addr: &str, n: usize) -> (Vec<(tokio::net::TcpStream, Connection)>, f64) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut peers = Vec::new();
    let mut buf = vec![0; 4096];
    let start = Instant::now();
    for i in 0..n {
        let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let mut conn = Connection::new(config(&format!("peer{i}"), Framing::Cbor), [3; 66], 0)
            .expect("config");
        while conn.session().is_none() {
            while let Some(o) = conn.poll_output() {
                match o {
                    Output::Transmit(b) => stream.write_all(&b).await.expect("write"),
                    Output::Greeting(_) => conn.handle_verdict(Verdict::Accept),
                    Output::Closed(e) => panic!("{e}"),
                    _ => {}
                }
            }
            if conn.session().is_none() {
                let k = stream.read(&mut buf).await.expect("read");
                conn.handle_input(&buf[..k]);
            }
        }
        peers.push((stream, conn));
    }
    (peers, n as f64 / start.elapsed().as_secs_f64())
}

/// `--idle-peers ADDR N`: the peers of [`idle`] in a process of their own. Opens the
/// connections, prints handshakes/s, and holds them until standard input closes.
fn idle_peers(runtime: &tokio::runtime::Runtime, addr: &str, n: usize) {
    raise_open_files(2 * n as u64 + 256);
    let (peers, handshakes) = runtime.block_on(open_peers(addr, n));
    println!("{handshakes}");
    let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut Vec::new());
    drop(peers);
}

/// Where [`idle`]'s peers live.
#[derive(Clone, Copy, PartialEq)]
enum Peers {
    /// In this process: its RSS counts both ends of each connection.
    Here,
    /// In a child process ([`idle_peers`]): this process's RSS is the node's alone, and
    /// each process needs one file per connection, not two (10,000 connections in one
    /// process would pass a hard limit of 20,000 files).
    Apart,
}

/// Opens `n` idle connections (completed handshakes, one after another) to one node;
/// returns the node's sandbox bytes per connection, the process's RSS per connection,
/// the sandbox size at the end, and handshakes per second while opening them.
async fn idle(sandbox: &std::sync::Arc<Sandbox>, n: usize, peers: Peers) -> [f64; 4] {
    let ends = if peers == Peers::Here { 2 } else { 1 };
    let files = raise_open_files(4 * n as u64 + 256);
    // The node stops accepting 64 short of the limit: fail clearly instead of hanging.
    assert!(
        files > ends * n as u64 + 128,
        "{n} idle connections need {} open files, the limit is {files}",
        ends * n as u64 + 128
    );
    let node = listening("idle", sandbox).start().await.expect("node");
    let addr = node.listen_addrs()[0].to_string();
    let mem0 = node.sandbox_memory().await.expect("memory") as f64;
    let rss0 = rss();
    let (held, child, handshakes) = match peers {
        Peers::Here => {
            let (held, handshakes) = open_peers(&addr, n).await;
            (held, None, handshakes)
        }
        Peers::Apart => {
            use std::io::BufRead;
            let mut child = std::process::Command::new(std::env::current_exe().expect("bench"))
                .args(["--idle-peers", &addr, &n.to_string()])
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .spawn()
                .expect("peers");
            // Blocks this thread only: the node runs on the runtime's workers.
            let mut line = String::new();
            std::io::BufReader::new(child.stdout.take().expect("stdout"))
                .read_line(&mut line)
                .expect("peers' answer");
            let handshakes = line.trim().parse().expect("handshakes/s");
            (Vec::new(), Some(child), handshakes)
        }
    };
    node.wait_up(&format!("peer{}", n - 1), Duration::from_secs(10))
        .await
        .expect("up");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mem1 = node.sandbox_memory().await.expect("memory") as f64;
    let rss1 = rss();
    drop(held);
    if let Some(mut child) = child {
        drop(child.stdin.take());
        assert!(child.wait().expect("peers").success(), "peers failed");
    }
    // Gone before the next group starts (as `stop` does for the e2e nodes).
    node.shutdown(Duration::from_secs(10))
        .await
        .expect("shutdown");
    [
        (mem1 - mem0) / n as f64,
        (rss1 - rss0) / n as f64,
        mem1,
        handshakes,
    ]
}

/// The memory group's figures, in the order [`idle`] returns them, and their meanings.
const MEMORY: [(&str, &str); 4] = [
    (
        "idle_conn_engine_bytes",
        "sandbox memory per idle connection of one node",
    ),
    (
        "idle_conn_rss_bytes",
        "process RSS per idle connection (both ends in this process)",
    ),
    (
        "sandbox_memory_bytes",
        "the node's linear memory with those connections",
    ),
    (
        "idle_handshakes_per_s",
        "handshakes/s opening them one after another (native peer, loopback)",
    ),
];

/// The figures of this bench run again as a child process with `args` (and `--json`):
/// for measurements that need a fresh process (see the memory group).
fn child_figures(args: &[&str]) -> serde_json::Map<String, serde_json::Value> {
    serde_json::from_slice(&child_output(args, &[])).expect("child figures")
}

/// [`child_figures`] with `env` set in the child, and the figures' meanings (`--meanings`).
fn child_figures_with(args: &[&str], env: &[(&str, &str)]) -> Vec<Figure> {
    let figures: Vec<(String, f64, String)> =
        serde_json::from_slice(&child_output(args, env)).expect("child figures");
    figures
        .into_iter()
        .map(|(name, value, meaning)| Figure {
            name,
            value,
            meaning,
        })
        .collect()
}

/// What this bench prints on stdout run as a child with `args`, `--json` and `env`.
fn child_output(args: &[&str], env: &[(&str, &str)]) -> Vec<u8> {
    let out = std::process::Command::new(std::env::current_exe().expect("bench"))
        .args(args)
        .arg("--json")
        .envs(env.iter().copied())
        .stderr(std::process::Stdio::inherit())
        .output()
        .expect("child bench");
    assert!(out.status.success(), "bench {args:?} failed");
    out.stdout
}

/// glibc's heap settings for the engine group, which runs in a process of its own under
/// them: no trimming of the heap's top and no fresh mapping below 32 MiB. With glibc's
/// defaults a loop that allocates and frees a few MiB per batch gives the pages back to
/// the kernel and faults them in again every round; for 64 KiB messages that was most of
/// the time natively and in the host around the sandbox, and the figures moved threefold
/// between runs with the heap's state. The engine figures are the engine's cost; the
/// other groups run with the defaults, as the `aemp` binary does.
const ENGINE_HEAP: &str =
    "glibc.malloc.trim_threshold=1073741824:glibc.malloc.mmap_threshold=33554432";

/// The transport and node figures of the engine, native and in the sandbox, in one thread.
fn engine_group(sandbox: &Sandbox, c: &Counts, add: &mut dyn FnMut(&str, f64, &str)) {
    let small = small_message();
    let large = large_message();
    add(
        "engine_native_handshakes_per_s",
        native_handshakes(c.handshakes),
        "hmac handshakes/s, both sides in one thread, native",
    );
    add(
        "engine_wasm_handshakes_per_s",
        wasm_handshakes(sandbox, c.handshakes),
        "the same inside wasmtime",
    );
    for framing in Framing::ALL {
        let f = framing.name();
        let native = native_messages(framing, &small, c.small);
        let wasm = wasm_messages(sandbox, framing, &small, c.small);
        add(
            &format!("engine_native_small_msgs_per_s_{f}"),
            1.0 / native,
            "[\"port\",\"ping\",123] sent and received, batches of 1000, native",
        );
        add(
            &format!("engine_wasm_small_msgs_per_s_{f}"),
            1.0 / wasm,
            "the same inside wasmtime",
        );
        add(
            &format!("wasm_native_time_ratio_small_{f}"),
            wasm / native,
            "wasm time per message / native time per message",
        );
        if framing == Framing::Cbor {
            add(
                "boundary_ns_per_message",
                (wasm - native) * 1e9,
                "extra ns per message in wasm (lowering/lifting, copies), cbor",
            );
        }
        let mb = large.len() as f64 / 1e6;
        add(
            &format!("engine_native_64k_mb_per_s_{f}"),
            mb / native_messages(framing, &large, c.large),
            "64 KiB messages, MB/s, native",
        );
        add(
            &format!("engine_wasm_64k_mb_per_s_{f}"),
            mb / wasm_messages(sandbox, framing, &large, c.large),
            "the same inside wasmtime",
        );
    }
    add(
        "engine_native_node_msgs_per_s",
        1.0 / native_node_messages(c.small),
        "[\"ping\",123] from a node to a port of another, batches of 1000, native",
    );
    add(
        "engine_wasm_node_msgs_per_s",
        1.0 / wasm_node_messages(sandbox, c.small),
        "the same through the component's node interface in wasmtime",
    );
    add(
        "boundary_ns_per_call",
        boundary_call(sandbox, c.small),
        "ns for one call into the component that does nothing",
    );
}

/// One figure: its name (the JSON key), value, and what it means.
struct Figure {
    name: String,
    value: f64,
    meaning: String,
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    let as_json = args.iter().any(|a| a == "--json");
    let c = if quick {
        Counts {
            handshakes: 5,
            small: 2_000,
            large: 20,
            e2e: 2_000,
            pings: 20,
            idle: 20,
        }
    } else {
        Counts {
            handshakes: 500,
            small: 1_000_000,
            large: 2_000,
            e2e: 300_000,
            pings: 5_000,
            idle: 1_000,
        }
    };
    let mut figures = Vec::new();
    let mut add = |name: &str, value: f64, meaning: &str| {
        if !as_json {
            eprintln!("{name:<36} {value:>14.2}  {meaning}");
        }
        figures.push(Figure {
            name: name.into(),
            value,
            meaning: meaning.into(),
        });
    };
    let flag = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    // `--only engine|e2e|dataconn|memory|scaling` runs one group (to profile it alone).
    let only = flag("--only");
    let run = |group: &str| only.as_deref().is_none_or(|o| o == group);
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    if let Some(addr) = flag("--idle-peers") {
        let n = args
            .last()
            .and_then(|n| n.parse().ok())
            .expect("--idle-peers ADDR N");
        return idle_peers(&runtime, &addr, n);
    }
    let sandbox = std::sync::Arc::new(Sandbox::new().expect("sandbox"));
    if run("engine") {
        if cfg!(all(target_os = "linux", target_env = "gnu"))
            && std::env::var_os("GLIBC_TUNABLES").is_none()
        {
            let mut args = vec!["--only", "engine", "--meanings"];
            if quick {
                args.push("--quick");
            }
            for f in child_figures_with(&args, &[("GLIBC_TUNABLES", ENGINE_HEAP)]) {
                add(&f.name, f.value, &f.meaning);
            }
        } else {
            engine_group(&sandbox, &c, &mut add);
        }
    }

    runtime.block_on(async {
        let tls = TlsConfig::from_pem(
            aemp_host::tls::generate_network_pem()
                .expect("cert")
                .as_bytes(),
        )
        .expect("tls");
        if run("dataconn") {
            let bytes = if quick { 16 << 20 } else { 1 << 30 };
            for (tag, tls) in [("plain", None), ("tls", Some(&tls))] {
                add(
                    &format!("dataconn_mb_per_s_{tag}"),
                    data_stream(&sandbox, tls, &format!("dc-{tag}"), bytes).await,
                    "MB/s through one data connection between two nodes, loopback TCP",
                );
            }
        }
        if run("e2e") {
            add(
                "e2e_handshake_ms",
                e2e_handshake(&sandbox, if quick { 3 } else { 50 }).await,
                "median ms from connect to node up, hmac, loopback",
            );
            let kib = [Value::text("data"), Value::Bytes(vec![7; 1024])];
            let small = [Value::text("ping"), Value::Int(123)];
            for (name, senders, args, api, meaning) in [
                (
                    "e2e_msgs_per_s_1k_plain",
                    1,
                    &kib,
                    Api::Batches,
                    "1 KiB messages/s one way between two nodes, loopback TCP",
                ),
                (
                    "e2e_msgs_per_s_8_senders_plain",
                    8,
                    &small,
                    Api::Batches,
                    "small messages/s from eight nodes into one port of one node, loopback TCP",
                ),
                (
                    "e2e_msgs_per_s_values_plain",
                    1,
                    &small,
                    Api::Values,
                    "the plain one-way run with send_batch and recv_many (Values)",
                ),
            ] {
                let (receiver, senders) = nodes(&sandbox, None, name, senders).await;
                add(
                    name,
                    one_way(&receiver, &senders, args, c.e2e, api).await,
                    meaning,
                );
                stop(receiver, senders).await;
            }
            for (tag, tls) in [("plain", None), ("tls", Some(&tls))] {
                let (rate, p50, p99) = e2e(&sandbox, tls, tag, c.e2e, c.pings).await;
                add(
                    &format!("e2e_msgs_per_s_{tag}"),
                    rate,
                    "messages/s one way between two nodes over loopback TCP",
                );
                add(
                    &format!("e2e_rtt_p50_us_{tag}"),
                    p50,
                    "round trip (ping/pong between ports), median, µs",
                );
                add(
                    &format!("e2e_rtt_p99_us_{tag}"),
                    p99,
                    "round trip, 99th percentile, µs",
                );
            }
            let (p50, p99, _) = tcp_round_trips(c.pings).await;
            add(
                "tcp_rtt_p50_us",
                p50,
                "the floor: 4 bytes echoed between two tasks over loopback TCP, no nodes, median, µs",
            );
            add("tcp_rtt_p99_us", p99, "the same, 99th percentile, µs");
        }
    });
    // In a fresh process of its own: here, new connections would reuse memory that the
    // other groups freed (understating RSS), and its thousand connections would leave the
    // heap in a state that slows the native engine figures.
    if run("memory") {
        if only.is_none() {
            let figures = child_figures(if quick {
                &["--only", "memory", "--quick"]
            } else {
                &["--only", "memory"]
            });
            for (name, meaning) in MEMORY {
                let value = figures.get(name).and_then(|v| v.as_f64());
                add(name, value.expect("memory figure"), meaning);
            }
        } else {
            // `--idle N`: the scaling group's runs with N connections, their peers in a
            // process of their own.
            let (n, peers) = match flag("--idle") {
                Some(n) => (n.parse().expect("--idle N"), Peers::Apart),
                None => (c.idle, Peers::Here),
            };
            let figures = runtime.block_on(idle(&sandbox, n, peers));
            for ((name, meaning), value) in MEMORY.iter().zip(figures) {
                add(name, value, meaning);
            }
        }
    }
    // `--only scaling-senders|scaling-sizes|scaling-idle`: one of its curves.
    let part = only.as_deref().and_then(|o| o.strip_prefix("scaling-"));
    if run("scaling") || part.is_some() {
        let levels = scaling::Levels::new(quick);
        let curves = scaling::run(&runtime, &sandbox, &levels, part, &mut add);
        if let Some(dir) = flag("--plot") {
            scaling::plot(std::path::Path::new(&dir), &curves).expect("plots");
            eprintln!("plots written to {dir}");
        }
    }
    if as_json && args.iter().any(|a| a == "--meanings") {
        let list: Vec<_> = figures
            .iter()
            .map(|f| (&f.name, f.value, &f.meaning))
            .collect();
        println!("{}", json!(list));
    } else if as_json {
        let mut map = serde_json::Map::new();
        for f in &figures {
            map.insert(f.name.clone(), json!(f.value));
        }
        println!("{}", serde_json::Value::Object(map));
    } else {
        println!("{:<36} {:>14}  meaning", "figure", "value");
        for f in &figures {
            println!("{:<36} {:>14.2}  {}", f.name, f.value, f.meaning);
        }
    }
}
