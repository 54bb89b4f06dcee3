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
    other.connect(&addr(node)).unwrap();
    other.wait_up(node.id(), WAIT).await.unwrap();
    other.send(port.id(), vec![t("still here")]).await.unwrap();
    assert_eq!(recv(&mut port).await, [t("still here")]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_secret_is_refused_with_the_reference_text() {
    let a = builder("secret-a", "right").start().await.unwrap();
    let b = builder("secret-b", "wrong").start().await.unwrap();
    b.connect(&addr(&a)).unwrap();
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
    let limits = aemp_host::sandbox::Limits {
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
    tiny.connect(&addr(&big)).unwrap();
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
    let down = tokio::time::timeout(WAIT, async {
        loop {
            if let Ok(Event::NodeDown { node, .. }) = events.recv().await
                && node == "tiny"
            {
                return;
            }
        }
    });
    down.await.expect("big sees tiny go down");
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
