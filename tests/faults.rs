//! Peers that misbehave: the node refuses them with clear errors and keeps serving the
//! others.

use std::time::Duration;

use aemp_engine::Framing;
use aemp_host::{Event, Node, Value};
use aemp_tests::*;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

/// `node` still talks to a fresh, well-behaved node.
async fn still_serves(node: &Node, secret: &str) {
    let other = builder(&format!("check-{}", node.id()), secret)
        .start()
        .await
        .unwrap();
    let mut port = node.port().await.unwrap();
    other.connect(&addr(node)).await.unwrap();
    other.wait_up(node.id(), WAIT).await.unwrap();
    other.send(port.id(), vec![t("still here")]).await.unwrap();
    assert_eq!(recv(&mut port).await, [t("still here")]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_secret_is_refused_with_the_reference_text() {
    let a = builder("secret-a", "right").start().await.unwrap();
    let b = builder("secret-b", "wrong").start().await.unwrap();
    b.connect(&addr(&a)).await.unwrap();
    assert!(logged_by("secret-a", "authentication failure/shared secret mismatch").await);
    assert!(!a.is_up(b.id()).await.unwrap());
    still_serves(&a, "right").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_peer() {
    let a = builder("garbage-a", "s").start().await.unwrap();
    let mut sock = tokio::net::TcpStream::connect(addr(&a)).await.unwrap();
    sock.write_all(b"GET / HTTP/1.0\r\n\r\n").await.unwrap();
    assert!(
        logged_by(
            "garbage-a",
            "unparsable greeting, expected 'aemp', got 'GET / HTTP/1.0'"
        )
        .await
    );
    // The node closed the connection after its own greeting.
    let mut rest = Vec::new();
    tokio::time::timeout(WAIT, sock.read_to_end(&mut rest))
        .await
        .unwrap()
        .unwrap();
    assert!(rest.starts_with(b"aemp;1;garbage-a;"));
    let mut flood = tokio::net::TcpStream::connect(addr(&a)).await.unwrap();
    let _ = flood.write_all(&vec![b'x'; 100_000]).await;
    assert!(logged_by("garbage-a", "greeting line longer than 4096 bytes").await);
    still_serves(&a, "s").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_vanishes_mid_message() {
    let a = builder("vanish-a", "s").start().await.unwrap();
    let mut port = a.named_port("inbox").await.unwrap();
    let mut raw = RawPeer::connect(&addr(&a), "vanisher", "s").await;
    raw.handshake().await.unwrap();
    raw.send(vec![t("inbox"), t("complete")]).await;
    raw.stream
        .write_all(b"[\"inbox\",\"never fini")
        .await
        .unwrap();
    drop(raw);
    assert_eq!(recv(&mut port).await, [t("complete")]);
    assert!(logged_by("vanish-a", "connection closed by peer inside a message").await);
    still_serves(&a, "s").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_that_never_reads_is_cut_off() {
    let a = builder("slow-a", "s")
        .max_write_queue(1 << 20)
        .start()
        .await
        .unwrap();
    let mut events = a.events();
    let mut raw = RawPeer::connect(&addr(&a), "sloth", "s").await;
    raw.handshake().await.unwrap();
    a.wait_up("sloth", WAIT).await.unwrap();
    let big = Value::Bytes(vec![b'z'; 256 * 1024]);
    let reason = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            // Sending never blocks the node, whatever the peer does.
            a.send("sloth#p", vec![big.clone()]).await.unwrap();
            while let Ok(event) = events.try_recv() {
                if let Event::NodeDown { node, reason } = event
                    && node == "sloth"
                {
                    return reason;
                }
            }
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("the slow peer is cut off");
    assert!(reason.starts_with("peer does not read"), "{reason}");
    drop(raw);
    still_serves(&a, "s").await;
}

/// Nested CBOR tags count toward the depth limit like arrays: thousands of them (which
/// once overflowed the stack of the process, or trapped the engine) close only the
/// peer's connection, whether the message goes to a port or to the node port.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deeply_nested_tags_close_only_that_connection() {
    let a = builder("tags-a", "s").start().await.unwrap();
    let _inbox = a.named_port("inbox").await.unwrap();
    for (i, (port, tags)) in [("inbox", 6000), ("", 100_000), ("inbox", 4000)]
        .into_iter()
        .enumerate()
    {
        let mut raw =
            RawPeer::connect_framing(&addr(&a), &format!("tagger{i}"), "s", Framing::Cbor).await;
        raw.handshake().await.unwrap();
        // [PORT, 6(6(...6([])...))]
        let mut message = Value::Array(vec![t(port)]).encode();
        message[0] = 0x82;
        message.extend(std::iter::repeat_n(0xc6, tags));
        message.push(0x80);
        raw.stream.write_all(&message).await.unwrap();
        let mut rest = Vec::new();
        tokio::time::timeout(WAIT, raw.stream.read_to_end(&mut rest))
            .await
            .expect("the node closes the connection")
            .unwrap();
    }
    assert!(logged_by("tags-a", "message nested deeper than 128 levels").await);
    still_serves(&a, "s").await;
}

/// Peer text reaches the log escaped: a tag with a newline cannot forge a log line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_text_cannot_forge_log_lines() {
    let a = builder("inject-a", "s").start().await.unwrap();
    let mut raw = RawPeer::connect(&addr(&a), "inject\u{1b}[2J", "s").await;
    raw.handshake().await.unwrap();
    raw.send(vec![t(""), t("x\nWARN forged")]).await;
    assert!(
        logged_by(
            "inject-a",
            "request 'x\\nWARN forged' from inject\\u{1b}[2J dropped"
        )
        .await
    );
    let lines = logs();
    let lines = lines.lock().unwrap();
    assert!(
        lines
            .iter()
            .all(|l| !l.contains("\nWARN forged") && !l.contains('\u{1b}')),
        "raw peer text in the log"
    );
}

/// The spec's "simple handshake": three lines of text, cleartext auth, json.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simple_handshake_from_a_minimal_peer() {
    let secret = "geheim";
    let a = builder("simple-a", secret).start().await.unwrap();
    let mut svc = a.named_port("svc").await.unwrap();
    let sock = tokio::net::TcpStream::connect(addr(&a)).await.unwrap();
    let (read, mut write) = sock.into_split();
    let mut lines = BufReader::new(read);
    let hello = format!(
        "aemp;1;simple;hmac_sha3_512;json\n\ncleartext;{};json\n",
        hex::encode(secret)
    );
    write.write_all(hello.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    for _ in 0..3 {
        let mut line = String::new();
        tokio::time::timeout(WAIT, lines.read_line(&mut line))
            .await
            .unwrap()
            .unwrap();
        got.push(line);
    }
    assert!(got[0].starts_with("aemp;1;simple-a;"), "{got:?}");
    assert!(
        got[2].starts_with("hmac_sha3_512;") && got[2].ends_with(";json\n"),
        "{got:?}"
    );
    write
        .write_all(br#"["svc","ping","simple#reply"]"#)
        .await
        .unwrap();
    let msg = recv(&mut svc).await;
    assert_eq!(msg, [t("ping"), t("simple#reply")]);
    a.send("simple#reply", vec![t("pong"), Value::Int(42)])
        .await
        .unwrap();
    let mut reply = vec![0; 256];
    let n = tokio::time::timeout(WAIT, lines.read(&mut reply))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&reply[..n], br#"["reply","pong",42]"#);
}

/// A sandbox limit stops that node with a clear error; the process and other nodes go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_over_its_memory_limit_stops_alone() {
    let limits = aemp_host::SandboxLimits {
        max_memory: 3 << 20,
        ..Default::default()
    };
    let tiny = Node::builder()
        .node_id("tiny")
        .secret("s")
        .bind("127.0.0.1:0")
        .sandbox_limits(limits)
        .start()
        .await
        .unwrap();
    let big = builder("big", "s").start().await.unwrap();
    tiny.connect(&addr(&big)).await.unwrap();
    tiny.wait_up("big", WAIT).await.unwrap();
    let _port = tiny.named_port("inbox").await.unwrap();
    let mut events = big.events();
    // 8 MiB cannot fit in 3 MiB of linear memory.
    big.send("tiny#inbox", vec![Value::Bytes(vec![7; 8 << 20])])
        .await
        .unwrap();
    let closed = tokio::time::timeout(WAIT, tiny.closed())
        .await
        .expect("the tiny node stopped");
    assert_eq!(
        closed.to_string(),
        "node stopped: the engine ran out of sandbox memory"
    );
    let reason = tiny.stopped().expect("the tiny node stopped");
    assert_eq!(reason, "the engine ran out of sandbox memory");
    let err = tiny.port().await.unwrap_err();
    assert!(err.to_string().starts_with("node stopped: "), "{err}");
    // The other node saw it go and still serves.
    node_down(&mut events, "tiny", "big sees tiny go down").await;
    still_serves(&big, "s").await;
}

/// The issue's scenario: many peers each sending most of a big message. Under the
/// default sandbox (256 MiB) and budget (64 MiB) the node refuses the connections that
/// would pass the budget with a clear error, keeps the others, and goes on serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_holding_big_partial_messages_cannot_exhaust_the_node() {
    let a = builder("hoard-a", "s").start().await.unwrap();
    let _inbox = a.named_port("inbox").await.unwrap();
    // ["inbox", BYTES] declaring 15 MiB of bytes, of which 14 MiB are sent.
    let mut head = vec![0x82, 0x65];
    head.extend_from_slice(b"inbox");
    head.push(0x5a);
    head.extend_from_slice(&(15u32 << 20).to_be_bytes());
    let body = vec![b'x'; 14 << 20];
    let mut peers = Vec::new();
    for i in 0..15 {
        let mut raw =
            RawPeer::connect_framing(&addr(&a), &format!("hoarder{i}"), "s", Framing::Cbor).await;
        raw.handshake().await.unwrap();
        // Once the node closes this connection, writing fails: that is expected.
        if raw.stream.write_all(&head).await.is_ok() {
            let _ = raw.stream.write_all(&body).await;
        }
        peers.push(raw);
    }
    assert!(
        logged_by(
            "hoard-a",
            "node memory budget for peers (67108864 bytes) exhausted, connection closed"
        )
        .await
    );
    assert_eq!(a.stopped(), None, "the node is still running");
    still_serves(&a, "s").await;
    drop(peers);
}

// ---------------------------------------------------------------------------------------
// Host bounds: bounded port inboxes push back on the sockets, writes have a deadline, the
// open-file limit is raised.
// ---------------------------------------------------------------------------------------

/// Resident memory of this process, in bytes.
fn rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// What the raw peer's engine has to send, as bytes.
fn transmitted(raw: &mut RawPeer) -> Vec<u8> {
    let mut bytes = Vec::new();
    while let Some(o) = raw.conn.poll_output() {
        if let aemp_engine::Output::Transmit(b) = o {
            bytes.extend_from_slice(&b);
        }
    }
    bytes
}

/// A flood of small messages at a port that reads slowly: the process's memory stays
/// bounded, the sender is held back once the port stops reading, and every message
/// arrives, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_port_pushes_back_on_a_flood() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    /// How much the process may grow while flooded.
    const MAX_GROWTH: u64 = 100 << 20;
    let a = builder("flood-a", "s")
        .port_stall(Duration::from_secs(120))
        .start()
        .await
        .unwrap();
    let mut inbox = a.named_port("inbox").await.unwrap();
    let mut raw = RawPeer::connect_framing(&addr(&a), "flooder", "s", Framing::Cbor).await;
    raw.handshake().await.unwrap();
    let base = rss();
    let peak = Arc::new(AtomicU64::new(base));
    let sent = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let sender = tokio::spawn({
        let (sent, stop) = (sent.clone(), stop.clone());
        async move {
            let mut next = 0i128;
            while !stop.load(Ordering::Acquire) {
                for _ in 0..1000 {
                    let message = Value::Array(vec![t("inbox"), Value::Int(next)]).encode();
                    raw.conn.send(&message).unwrap();
                    next += 1;
                }
                let bytes = transmitted(&mut raw);
                raw.stream.write_all(&bytes).await.unwrap();
                sent.store(next as u64, Ordering::Release);
            }
            raw
        }
    });
    let watcher = tokio::spawn({
        let (peak, stop) = (peak.clone(), stop.clone());
        async move {
            while !stop.load(Ordering::Acquire) {
                peak.fetch_max(rss(), Ordering::AcqRel);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    });
    let mut expect = 0i128;
    async fn take(inbox: &mut aemp_host::Port, expect: &mut i128) {
        let msg = recv(inbox).await;
        assert_eq!(msg, [Value::Int(*expect)], "lost or out of order");
        *expect += 1;
    }
    // Read slowly for a few seconds.
    let slow = tokio::time::Instant::now() + Duration::from_secs(4);
    while tokio::time::Instant::now() < slow {
        for _ in 0..50 {
            take(&mut inbox, &mut expect).await;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    // Stop reading: the sender must come to a standstill (the node stops reading it).
    let held_back = standstill(
        &sent,
        WAIT,
        "the sender is held back while the port reads nothing",
    )
    .await;
    // And stays held back (a node merely behind would catch up and read on).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        sent.load(Ordering::Acquire),
        held_back,
        "the sender went on"
    );
    stop.store(true, Ordering::Release);
    // Read everything: nothing was dropped.
    tokio::time::timeout(Duration::from_secs(60), async {
        while !sender.is_finished() || (expect as u64) < sent.load(Ordering::Acquire) {
            take(&mut inbox, &mut expect).await;
        }
    })
    .await
    .expect("every message arrives");
    let _raw = sender.await.unwrap();
    watcher.await.unwrap();
    let total = sent.load(Ordering::Acquire);
    assert_eq!(expect as u64, total);
    let growth = peak.load(Ordering::Acquire).saturating_sub(base);
    eprintln!(
        "flood: {total} messages, sender held at {held_back}, memory grew {} KiB",
        growth >> 10
    );
    assert!(growth < MAX_GROWTH, "memory grew by {growth} bytes");
    still_serves(&a, "s").await;
}

/// A port nobody reads cannot stop the node: after `port_stall`, messages for it are
/// dropped with a warning and everything else goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_port_never_read_is_dropped_from_after_its_stall() {
    let a = builder("deaf-a", "s")
        .port_capacity(4)
        .port_stall(Duration::from_millis(300))
        .start()
        .await
        .unwrap();
    let _deaf = a.named_port("deaf").await.unwrap();
    let mut raw = RawPeer::connect_framing(&addr(&a), "shouter", "s", Framing::Cbor).await;
    raw.handshake().await.unwrap();
    for i in 0..100 {
        raw.conn
            .send(&Value::Array(vec![t("deaf"), Value::Int(i)]).encode())
            .unwrap();
    }
    let bytes = transmitted(&mut raw);
    raw.stream.write_all(&bytes).await.unwrap();
    assert!(
        logged_by(
            "deaf-a",
            "port deaf-a#deaf took no message for 300 ms: dropped"
        )
        .await
    );
    still_serves(&a, "s").await;
}

/// A peer that sends requests and never reads the replies is cut off when a write makes
/// no progress for the write timeout (its queue never reaches the write-queue limit),
/// and the node serves the others.
/// Node `id` with an `echo` port (it sends the arguments after the first to the port the
/// first names) and a raw peer `lazy` connected to it, which the test makes read nothing.
async fn echo_with_lazy_peer(
    id: &str,
    write_timeout: Duration,
) -> (Node, tokio::sync::broadcast::Receiver<Event>, RawPeer) {
    let a = builder(id, "s")
        .write_timeout(write_timeout)
        .start()
        .await
        .unwrap();
    let mut echo = a.named_port("echo").await.unwrap();
    let echoer = a.clone();
    tokio::spawn(async move {
        while let Some(mut args) = echo.recv().await {
            let to = args.remove(0);
            let _ = echoer.send(&to.as_name().unwrap_or_default(), args).await;
        }
    });
    let events = a.events();
    let mut lazy = RawPeer::connect_framing(&addr(&a), "lazy", "s", Framing::Cbor).await;
    lazy.handshake().await.unwrap();
    a.wait_up("lazy", WAIT).await.unwrap();
    (a, events, lazy)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_stops_reading_replies_is_cut_off_at_the_write_deadline() {
    let timeout = Duration::from_secs(1);
    let (a, mut events, mut raw) = echo_with_lazy_peer("deadline-a", timeout).await;
    let payload = Value::Bytes(vec![b'r'; 64 * 1024]);
    for _ in 0..400 {
        raw.conn
            .send(&Value::Array(vec![t("echo"), t("lazy#r"), payload.clone()]).encode())
            .unwrap();
    }
    let bytes = transmitted(&mut raw);
    let mut stream = raw.stream;
    // Writes until the node stops reading us (or cuts us off); never reads.
    tokio::spawn(async move {
        let _ = stream.write_all(&bytes).await;
        tokio::time::sleep(WAIT * 2).await;
        drop(stream);
    });
    let reason = node_down(
        &mut events,
        "lazy",
        "the peer is cut off within the write deadline",
    )
    .await;
    assert!(
        reason.contains("peer does not read: nothing written for 1000 ms"),
        "{reason}"
    );
    still_serves(&a, "s").await;
}

/// The soft open-file limit is raised to the hard limit.
#[test]
fn the_open_file_limit_is_raised() {
    fn limits() -> (u64, u64) {
        let text = std::fs::read_to_string("/proc/self/limits").unwrap();
        let line = text
            .lines()
            .find(|l| l.starts_with("Max open files"))
            .unwrap();
        let mut nums = line
            .split_whitespace()
            .filter_map(|w| w.parse::<u64>().ok());
        (nums.next().unwrap(), nums.next().unwrap())
    }
    let (_, hard) = limits();
    let low = (hard / 2).max(64);
    let pid = std::process::id().to_string();
    let status = std::process::Command::new("prlimit")
        .args(["--pid", &pid, &format!("--nofile={low}:")])
        .status()
        .expect("run prlimit (util-linux)");
    assert!(status.success());
    assert_eq!(limits().0, low);
    let raised = aemp_host::raise_open_file_limit().unwrap();
    assert_eq!(raised, hard);
    assert_eq!(limits(), (hard, hard));
}

/// A close does not wait behind a stuck TLS handshake: a peer that asks for TLS and then
/// sends nothing is closed at the handshake deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_tls_handshake_is_closed_at_the_handshake_deadline() {
    let pem = aemp_host::tls::generate_network_pem().unwrap();
    let a = builder("stucktls-a", "s")
        .tls(aemp_host::TlsConfig::from_pem(pem.as_bytes()).unwrap())
        .monitor_timeout(Duration::from_secs(1))
        .start()
        .await
        .unwrap();
    let mut stream = tokio::net::TcpStream::connect(addr(&a)).await.unwrap();
    let mut config = aemp_engine::Config::new("stuck");
    config.tls = true;
    // A nonce whose base64 is all '+', the lowest: we are the TLS client, and never start.
    let lowest: [u8; 66] = std::array::from_fn(|i| [0xfb, 0xef, 0xbe][i % 3]);
    let mut conn = aemp_engine::Connection::new(config, lowest, 0).unwrap();
    let mut buf = vec![0; 65536];
    'handshake: loop {
        while let Some(o) = conn.poll_output() {
            match o {
                aemp_engine::Output::Transmit(b) => stream.write_all(&b).await.unwrap(),
                aemp_engine::Output::Greeting(_) => {
                    conn.handle_verdict(aemp_engine::Verdict::Accept)
                }
                aemp_engine::Output::StartTls { .. } => break 'handshake,
                other => panic!("{other:?}"),
            }
        }
        let n = stream.read(&mut buf).await.unwrap();
        conn.handle_input(&buf[..n]);
    }
    // The node, waiting for our TLS hello, must close the socket at its deadline.
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the socket stayed open");
    assert!(logged_by("stucktls-a", "Connection timed out").await);
    still_serves(&a, "s").await;
}

// ---------------------------------------------------------------------------------------
// Attacks that must not win: a full handshake table, big messages at a held-up port, a
// global node's database (each asserts the legitimate peer is served during the attack).
// ---------------------------------------------------------------------------------------

/// Hundreds of connections that never speak, closed by the node and opened again as fast
/// as it closes them, keep the handshake table full: a peer that completes its handshake
/// in milliseconds is still served, every time, and the node's descriptors do not run out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_handshake_table_does_not_lock_peers_out() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    /// More silent connections than the node's `max_handshakes` (256).
    const SILENT: usize = 320;
    aemp_host::raise_open_file_limit().unwrap();
    let a = builder("lockout-a", "s").start().await.unwrap();
    let target = addr(&a);
    let stop = Arc::new(AtomicBool::new(false));
    let dropped = Arc::new(AtomicU64::new(0));
    let mut attackers = Vec::new();
    for _ in 0..SILENT {
        let (target, stop, dropped) = (target.clone(), stop.clone(), dropped.clone());
        attackers.push(tokio::spawn(async move {
            let mut buf = vec![0; 4096];
            while !stop.load(Ordering::Relaxed) {
                let Ok(mut sock) = tokio::net::TcpStream::connect(&target).await else {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    continue;
                };
                // Silent: reads the greeting and waits for the node to give up on us.
                loop {
                    match tokio::time::timeout(Duration::from_millis(200), sock.read(&mut buf))
                        .await
                    {
                        Ok(Ok(0)) | Ok(Err(_)) => {
                            dropped.fetch_add(1, Ordering::Relaxed);
                            break;
                        }
                        Ok(Ok(_)) => {}
                        Err(_) if stop.load(Ordering::Relaxed) => return,
                        Err(_) => {}
                    }
                }
            }
        }));
    }
    // The table fills up and turns over.
    tokio::time::timeout(WAIT, async {
        while dropped.load(Ordering::Relaxed) < SILENT as u64 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the node makes room by dropping silent connections");
    for n in 0..5 {
        served_within(&a, "s", n, Duration::from_secs(2)).await;
    }
    assert!(
        logged_by(
            "lockout-a",
            "too many connections in their handshake (256), oldest dropped"
        )
        .await
    );
    stop.store(true, Ordering::Relaxed);
    for attacker in attackers {
        attacker.await.unwrap();
    }
    assert_eq!(a.stopped(), None, "the node is still running");
    still_serves(&a, "s").await;
}

/// The issue's scenario: messages of several MiB to an echo port whose replies go to a
/// peer that never reads. The replies wait for that peer alone, the echo port's inbox
/// fills up in bytes long before it does in messages, the node stops reading the flooder,
/// and the process stays far under the stated worst case; the peer that does not read is
/// cut off at the write deadline, and everyone else is served throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn big_messages_to_a_held_up_port_stay_within_the_byte_bounds() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    /// Far below what 1024 inbox slots of these messages would hold (4 GiB), and below
    /// the README's worst case for one node.
    const MAX_GROWTH: u64 = 400 << 20;
    const BIG: usize = 4 << 20;
    // The peer the replies go to completes its handshake and never reads again.
    let (a, mut events, lazy) = echo_with_lazy_peer("bytes-a", Duration::from_secs(4)).await;
    let mut flooder = RawPeer::connect_framing(&addr(&a), "flooder", "s", Framing::Cbor).await;
    flooder.handshake().await.unwrap();
    let base = rss();
    let peak = Arc::new(AtomicU64::new(base));
    let sent = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let payload = Value::Bytes(vec![b'b'; BIG]);
    let message = Value::Array(vec![t("echo"), t("lazy#r"), payload]).encode();
    let sender = tokio::spawn({
        let (sent, stop) = (sent.clone(), stop.clone());
        async move {
            while !stop.load(Ordering::Acquire) {
                flooder.conn.send(&message).unwrap();
                let bytes = transmitted(&mut flooder);
                if flooder.stream.write_all(&bytes).await.is_err() {
                    break;
                }
                sent.fetch_add(1, Ordering::AcqRel);
            }
            flooder
        }
    });
    let watcher = tokio::spawn({
        let (peak, stop) = (peak.clone(), stop.clone());
        async move {
            while !stop.load(Ordering::Acquire) {
                peak.fetch_max(rss(), Ordering::AcqRel);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    });
    // The flooder is held back, and a legitimate peer is served while it is.
    let held_back = standstill(&sent, WAIT, "the flooder is held back").await;
    served_within(&a, "s", 0, Duration::from_secs(2)).await;
    // The peer that does not read is cut off at the write deadline (nothing else went
    // wrong: the node is still up and serving).
    let reason = node_down(&mut events, "lazy", "the reader of the replies is cut off").await;
    assert!(reason.contains("peer does not read"), "{reason}");
    served_within(&a, "s", 1, Duration::from_secs(2)).await;
    stop.store(true, Ordering::Release);
    watcher.await.unwrap();
    sender.abort();
    let growth = peak.load(Ordering::Acquire).saturating_sub(base);
    eprintln!(
        "big messages: {held_back} of {} MiB sent before the flooder was held back, \
         memory grew {} MiB",
        BIG >> 20,
        growth >> 20
    );
    assert!(
        held_back < 64,
        "{held_back} messages went in before the push-back"
    );
    assert!(growth < MAX_GROWTH, "memory grew by {growth} bytes");
    assert_eq!(a.stopped(), None, "the node is still running");
    drop(lazy);
}

/// Backpressure is per peer: while one peer does not read (and the application's sends
/// to it wait), sends to a peer that reads go out at their usual pace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_does_not_read_holds_back_only_the_sends_to_it() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};
    let a = builder("perpeer-a", "s").start().await.unwrap();
    let fast = builder("perpeer-fast", "s").start().await.unwrap();
    let mut inbox = fast.named_port("inbox").await.unwrap();
    a.connect(&addr(&fast)).await.unwrap();
    a.wait_up("perpeer-fast", WAIT).await.unwrap();
    let mut lazy = RawPeer::connect_framing(&addr(&a), "lazy", "s", Framing::Cbor).await;
    lazy.handshake().await.unwrap();
    a.wait_up("lazy", WAIT).await.unwrap();
    // One task sends to the peer that does not read until its sends wait.
    let sent_lazy = Arc::new(AtomicU64::new(0));
    let lazy_sender = tokio::spawn({
        let (a, sent) = (a.clone(), sent_lazy.clone());
        async move {
            let payload = Value::Bytes(vec![b'l'; 64 << 10]);
            loop {
                if a.send("lazy#r", vec![payload.clone()]).await.is_err() {
                    return;
                }
                sent.fetch_add(1, Ordering::AcqRel);
            }
        }
    });
    let held = standstill(
        &sent_lazy,
        WAIT,
        "sends to the peer that does not read wait",
    )
    .await;
    // Meanwhile 2000 messages to the fast peer go out and arrive, in far less than the
    // write deadline (30 s) that would free a node-wide mark.
    let started = tokio::time::Instant::now();
    let receiver = tokio::spawn(async move {
        for i in 0..2000i128 {
            assert_eq!(recv(&mut inbox).await, [Value::Int(i)]);
        }
    });
    for i in 0..2000i128 {
        a.send("perpeer-fast#inbox", vec![Value::Int(i)])
            .await
            .unwrap();
    }
    tokio::time::timeout(Duration::from_secs(5), receiver)
        .await
        .expect("the fast peer's messages keep their pace")
        .unwrap();
    let took = started.elapsed();
    eprintln!("per-peer: lazy held at {held} sends; 2000 to the fast peer took {took:?}");
    assert!(took < Duration::from_secs(5), "{took:?}");
    // The sends to the lazy peer still wait.
    assert_eq!(sent_lazy.load(Ordering::Acquire), held);
    lazy_sender.abort();
    drop(lazy);
}

/// Many members, each well within its own database limit (16 MiB), together try to fill
/// a global node past its total (64 MiB): the updates past the total are refused, the
/// node lives, answers lookups and queries, and what it stored stays intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_together_cannot_exhaust_a_global_node() {
    const MEMBERS: usize = 8;
    const KEYS: usize = 1200;
    let seed = builder("exhaust-seed", "s").start().await.unwrap();
    let at = addr(&seed);
    let before = seed.sandbox_memory().await.unwrap();
    let value = Value::Bytes(vec![b'v'; 8 << 10]);
    let mut members = Vec::new();
    for m in 0..MEMBERS {
        let member = builder(&format!("exhaust-m{m}"), "s")
            .seed(&at)
            .start()
            .await
            .unwrap();
        member.wait_up(seed.id(), WAIT).await.unwrap();
        let family = format!("f{m}");
        for k in 0..KEYS {
            member
                .db_set(&family, &format!("k{k}"), value.clone())
                .await
                .unwrap();
        }
        if m == 0 {
            // The first member's entries are all stored before anyone else's come.
            tokio::time::timeout(WAIT, async {
                while keys_of(&member, &family).await < KEYS {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            })
            .await
            .expect("the first member's entries are stored");
        }
        members.push(member);
    }
    assert!(logged_by("exhaust-seed", "ignored: database limit reached").await);
    assert_eq!(seed.stopped(), None, "the global node is still running");
    served_within(&seed, "s", 0, Duration::from_secs(2)).await;
    // Lookups and queries are answered; the first member's entries are all there.
    let probe = builder("exhaust-probe", "s")
        .seed(&at)
        .start()
        .await
        .unwrap();
    probe.wait_up(seed.id(), WAIT).await.unwrap();
    assert_eq!(keys_of(&probe, "f0").await, KEYS);
    let mut stored = 0;
    for m in 0..MEMBERS {
        stored += keys_of(&probe, &format!("f{m}")).await;
    }
    assert!(stored < MEMBERS * KEYS, "some updates were refused");
    let mut inbox = members[MEMBERS - 1].port().await.unwrap();
    probe.send(inbox.id(), vec![t("found")]).await.unwrap();
    assert_eq!(recv(&mut inbox).await, [t("found")]);
    let grown = seed.sandbox_memory().await.unwrap().saturating_sub(before);
    let entry_bytes = stored * (8 << 10);
    eprintln!(
        "global: {stored} of {} entries stored ({} MiB of values), sandbox grew {} MiB: \
         {:.2} bytes of sandbox per byte of entries",
        MEMBERS * KEYS,
        entry_bytes >> 20,
        grown >> 20,
        grown as f64 / entry_bytes as f64
    );
    assert!(grown < 200 << 20, "the sandbox grew by {grown} bytes");
}

/// Messages of millions of tiny items, where the engine decodes them (a node-port request,
/// a port that is not a string): decoded, each item would take dozens of bytes of sandbox
/// memory per byte on the wire. The node refuses them and serves on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_of_millions_of_tiny_items_cannot_exhaust_the_sandbox() {
    const ITEMS: u32 = 15 << 20;
    // A CBOR array head for ITEMS (+ n) items.
    let array = |n: u32| [&[0x9a][..], &(ITEMS + n).to_be_bytes()].concat();
    let a = builder("tiny-a", "s").start().await.unwrap();
    let messages = [
        // ["", "snd", 1, 1, ...]
        [array(2), b"\x60\x63snd".to_vec()].concat(),
        // [[1, 1, ...]]: the port is the array.
        [vec![0x81], array(0)].concat(),
    ];
    for (i, head) in messages.into_iter().enumerate() {
        let mut raw =
            RawPeer::connect_framing(&addr(&a), &format!("tiny{i}"), "s", Framing::Cbor).await;
        raw.handshake().await.unwrap();
        let mut message = head;
        message.resize(message.len() + ITEMS as usize, 0x01);
        raw.stream.write_all(&message).await.unwrap();
        served_within(&a, "s", i, Duration::from_secs(5)).await;
    }
    assert!(logged_by("tiny-a", "dropped: decode error: more than 2097152 items").await);
    assert_eq!(a.stopped(), None, "the node is still running");
}
