//! Backpressure end to end on real sockets: a slow reader slows the application that
//! sends to it, with bounded memory on the way; a peer that never reads is cut off; and
//! the switch to TLS holds when the peer's first TLS records come in the same read as its
//! greeting.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use aemp_engine::{Framing, Output, Verdict};
use aemp_host::node::HIGH_WATER;
use aemp_host::tls::Role;
use aemp_host::{TlsConfig, Value};
use aemp_tests::*;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

/// What a node's write buffers may hold at most beyond the high-water mark: one go of
/// commands (64 KiB and one message more).
const SLACK: usize = 256 * 1024;

/// Sandbox memory neither node may reach while flooded.
const MAX_SANDBOX: usize = 64 << 20;

/// A port that stops reading holds back the application of another node sending to it:
/// its `send` calls wait, its write buffers stay near the high-water mark, nothing is
/// lost, and both sandboxes stay small.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_port_slows_the_sending_application() {
    let receiver = builder("bp-recv", "s")
        .port_capacity(16)
        .port_stall(Duration::from_secs(120))
        .start()
        .await
        .unwrap();
    let sender = builder("bp-send", "s").start().await.unwrap();
    let mut inbox = receiver.named_port("inbox").await.unwrap();
    sender.connect(&addr(&receiver)).await.unwrap();
    sender.wait_up("bp-recv", WAIT).await.unwrap();

    let sent = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let flood = tokio::spawn({
        let (sender, sent, stop) = (sender.clone(), sent.clone(), stop.clone());
        async move {
            let payload = Value::Bytes(vec![b'x'; 1024]);
            let mut next = 0u64;
            let mut longest = Duration::ZERO;
            while !stop.load(Ordering::Acquire) {
                let t = tokio::time::Instant::now();
                sender
                    .send(
                        "bp-recv#inbox",
                        vec![Value::Int(next.into()), payload.clone()],
                    )
                    .await
                    .unwrap();
                longest = longest.max(t.elapsed());
                next += 1;
                sent.store(next, Ordering::Release);
            }
            longest
        }
    });

    // The port reads nothing: the sender must stop, and stay stopped.
    let held = standstill(&sent, WAIT * 2, "the sender comes to a standstill").await;
    let pending = sender.pending_bytes();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(sent.load(Ordering::Acquire), held, "the sender went on");
    assert!(
        pending <= HIGH_WATER + SLACK,
        "{pending} bytes wait to be written"
    );
    assert!(sender.pending_bytes() <= HIGH_WATER + SLACK);

    // Reading resumes: every message arrives, in order, and the sender moves on.
    stop.store(true, Ordering::Release);
    let mut expect = 0u64;
    tokio::time::timeout(Duration::from_secs(60), async {
        while !flood.is_finished() || expect < sent.load(Ordering::Acquire) {
            let msg = recv(&mut inbox).await;
            assert_eq!(
                msg.first(),
                Some(&Value::Int(expect.into())),
                "lost or out of order"
            );
            expect += 1;
        }
    })
    .await
    .expect("every message arrives");
    let longest = flood.await.unwrap();
    assert!(expect > held, "the sender went on once the port read");
    assert!(
        longest >= Duration::from_secs(1),
        "a send waited only {longest:?}"
    );
    for node in [&sender, &receiver] {
        let memory = node.sandbox_memory().await.unwrap();
        assert!(
            memory < MAX_SANDBOX,
            "{}: sandbox of {memory} bytes",
            node.id()
        );
    }
    eprintln!(
        "slow port: sender held at {held} messages, {pending} bytes waiting; \
         {expect} delivered; longest send {longest:?}"
    );
}

/// A port that stops reading holds back only the node that fills it: another node,
/// sending to another port of the same node all the while (so that both are read in the
/// same rounds), goes on being read and delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_port_holds_its_sender_and_not_a_sender_to_another_port() {
    let receiver = builder("hold-recv", "s")
        .port_capacity(16)
        .port_stall(Duration::from_secs(120))
        .start()
        .await
        .unwrap();
    let _inbox = receiver.named_port("inbox").await.unwrap();
    let mut other = receiver.named_port("other").await.unwrap();
    let flooder = builder("hold-flood", "s").start().await.unwrap();
    let talker = builder("hold-talk", "s").start().await.unwrap();
    for node in [&flooder, &talker] {
        node.connect(&addr(&receiver)).await.unwrap();
        node.wait_up("hold-recv", WAIT).await.unwrap();
    }

    // The talker sends to `other` throughout, its messages taken as they come.
    let talking = tokio::spawn({
        let talker = talker.clone();
        async move {
            for n in 0u64.. {
                if talker
                    .send("hold-recv#other", vec![Value::Int(n.into())])
                    .await
                    .is_err()
                {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
    });
    let sent = Arc::new(AtomicU64::new(0));
    let flood = tokio::spawn({
        let (flooder, sent) = (flooder.clone(), sent.clone());
        async move {
            let payload = Value::Bytes(vec![b'x'; 1024]);
            for n in 0u64.. {
                let message = vec![Value::Int(n.into()), payload.clone()];
                if flooder.send("hold-recv#inbox", message).await.is_err() {
                    return;
                }
                sent.store(n + 1, Ordering::Release);
            }
        }
    });
    let mut expect = 0u64;
    // While the flooder fills `inbox` and comes to a standstill...
    let filling = tokio::spawn({
        let sent = sent.clone();
        async move { standstill(&sent, WAIT * 2, "the flooder comes to a standstill").await }
    });
    while !filling.is_finished() {
        take_in_order(&mut other, &mut expect, Duration::from_millis(100)).await;
    }
    let held = filling.await.unwrap();
    // ...and after, for two seconds more, the talker's messages keep coming.
    let before = expect;
    take_in_order(&mut other, &mut expect, Duration::from_secs(2)).await;
    assert!(
        expect > before + 100,
        "only {} of the talker's messages came while the flooder was held",
        expect - before
    );
    assert_eq!(sent.load(Ordering::Acquire), held, "the flooder went on");
    eprintln!("held flooder at {held}; the talker's {expect} messages came meanwhile");
    talking.abort();
    flood.abort();
}

/// Takes `port`'s messages for `during`, each the counter `expect` (then counted on).
async fn take_in_order(port: &mut aemp_host::Port, expect: &mut u64, during: Duration) {
    let until = tokio::time::Instant::now() + during;
    while tokio::time::Instant::now() < until {
        let msg = recv(port).await;
        assert_eq!(
            msg.first(),
            Some(&Value::Int((*expect).into())),
            "lost or out of order"
        );
        *expect += 1;
    }
}

/// A peer that never reads: the application's sends to it wait once its buffer passes the
/// high-water mark, and the write timeout cuts it off (then sends go on).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_never_reads_holds_senders_until_the_write_timeout() {
    let node = builder("bp-deaf", "s")
        .write_timeout(Duration::from_secs(1))
        .start()
        .await
        .unwrap();
    let mut events = node.events();
    let mut raw = RawPeer::connect_framing(&addr(&node), "bp-sloth", "s", Framing::Cbor).await;
    raw.handshake().await.unwrap();
    node.wait_up("bp-sloth", WAIT).await.unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let peak = Arc::new(AtomicU64::new(0));
    let flood = tokio::spawn({
        let (node, stop, peak) = (node.clone(), stop.clone(), peak.clone());
        async move {
            let big = Value::Bytes(vec![b'z'; 64 * 1024]);
            while !stop.load(Ordering::Acquire) {
                // Refused once the peer is gone and the node's queue for it is full.
                let _ = node.send("bp-sloth#p", vec![big.clone()]).await;
                peak.fetch_max(node.pending_bytes() as u64, Ordering::AcqRel);
            }
        }
    });
    let reason = node_down(&mut events, "bp-sloth", "the peer is cut off").await;
    stop.store(true, Ordering::Release);
    tokio::time::timeout(WAIT, flood)
        .await
        .expect("sends go on once the peer is gone")
        .unwrap();
    assert!(
        reason.contains("peer does not read: nothing written for 1000 ms"),
        "{reason}"
    );
    let peak = peak.load(Ordering::Acquire) as usize;
    assert!(peak <= HIGH_WATER + SLACK, "{peak} bytes waited");
    drop(raw);
}

/// Writes `head` in the same write as the first bytes written through it (so the node
/// gets our greeting and our TLS ClientHello in one read), then passes everything on.
struct SameWrite {
    stream: tokio::net::TcpStream,
    head: Option<Vec<u8>>,
    /// Combined bytes not written yet.
    out: Vec<u8>,
}

impl SameWrite {
    fn drain(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        while !self.out.is_empty() {
            match Pin::new(&mut self.stream).poll_write(cx, &self.out) {
                Poll::Ready(Ok(n)) => {
                    self.out.drain(..n);
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncRead for SameWrite {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for SameWrite {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        if let Poll::Ready(Err(e)) = self.drain(cx) {
            return Poll::Ready(Err(e));
        }
        if !self.out.is_empty() {
            return Poll::Pending;
        }
        match self.head.take() {
            Some(mut head) => {
                head.extend_from_slice(data);
                self.out = head;
                let _ = self.drain(cx);
                Poll::Ready(Ok(data.len()))
            }
            None => Pin::new(&mut self.stream).poll_write(cx, data),
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.drain(cx) {
            Poll::Ready(Ok(())) => Pin::new(&mut self.stream).poll_flush(cx),
            other => other,
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.drain(cx) {
            Poll::Ready(Ok(())) => Pin::new(&mut self.stream).poll_shutdown(cx),
            other => other,
        }
    }
}

/// The peer's greeting and its TLS ClientHello arrive in one read: the node hands the
/// ClientHello (read with the greeting) to TLS, not to the protocol, and the connection
/// comes up and carries messages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn greeting_and_first_tls_records_in_one_read() {
    let pem = aemp_host::tls::generate_network_pem().unwrap();
    let tls = TlsConfig::from_pem(pem.as_bytes()).unwrap();
    let node = builder("bp-tls", "s")
        .tls(tls.clone())
        .start()
        .await
        .unwrap();
    let mut inbox = node.named_port("inbox").await.unwrap();
    let mut stream = tokio::net::TcpStream::connect(addr(&node)).await.unwrap();
    let mut config = aemp_engine::Config::new("bp-tlspeer");
    config.secret = Some(b"s".to_vec());
    config.tls = true;
    // A nonce whose base64 is all '+', the lowest: we are the TLS client.
    let lowest: [u8; 66] = std::array::from_fn(|i| [0xfb, 0xef, 0xbe][i % 3]);
    let mut conn = aemp_engine::Connection::new(config, lowest, 0).unwrap();
    let mut buf = vec![0; 65536];
    // Our greeting waits until we know TLS starts, to go out with the ClientHello.
    let mut greeting = Vec::new();
    'greeting: loop {
        while let Some(o) = conn.poll_output() {
            match o {
                Output::Transmit(b) => greeting.extend_from_slice(&b),
                Output::Greeting(_) => conn.handle_verdict(Verdict::Accept),
                Output::StartTls { role, leftover } => {
                    assert_eq!(role, aemp_engine::TlsRole::Client);
                    assert!(leftover.is_empty());
                    break 'greeting;
                }
                other => panic!("{other:?}"),
            }
        }
        let n = tokio::time::timeout(WAIT, stream.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "the node closed");
        conn.handle_input(&buf[..n]);
    }
    let joined = SameWrite {
        stream,
        head: Some(greeting),
        out: Vec::new(),
    };
    let mut tls_stream = tokio::time::timeout(WAIT, tls.start(joined, Role::Client))
        .await
        .expect("TLS handshake in time")
        .expect("TLS handshake");
    // The protocol goes on inside TLS: authentication, then a message.
    let up = tokio::time::timeout(WAIT, async {
        loop {
            while let Some(o) = conn.poll_output() {
                match o {
                    Output::Transmit(b) => tls_stream.write_all(&b).await.unwrap(),
                    Output::Closed(e) => panic!("{e}"),
                    _ => {}
                }
            }
            tls_stream.flush().await.unwrap();
            if conn.session().is_some() {
                return;
            }
            let n = tls_stream.read(&mut buf).await.unwrap();
            assert!(n > 0, "the node closed");
            conn.handle_input(&buf[..n]);
        }
    })
    .await;
    assert!(up.is_ok(), "authenticated over TLS in time");
    conn.send(&Value::Array(vec![t("inbox"), t("through tls")]).encode())
        .unwrap();
    while let Some(o) = conn.poll_output() {
        if let Output::Transmit(b) = o {
            tls_stream.write_all(&b).await.unwrap();
        }
    }
    tls_stream.flush().await.unwrap();
    assert_eq!(recv(&mut inbox).await, [t("through tls")]);
    assert!(node.is_up("bp-tlspeer").await.unwrap());
    // The ClientHello did come in the greeting's read.
    assert!(logged_by("bp-tls", "bytes read ahead").await);
}
