//! Sandboxed nodes on real loopback sockets.

use aemp_engine::Framing;
use aemp_host::Value;
use aemp_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_exchange_messages_in_json_and_cbor() {
    for framing in Framing::ALL {
        let a = builder(&format!("a-{}", framing.name()), "s")
            .framings(&[framing])
            .start()
            .await
            .unwrap();
        let b = builder(&format!("b-{}", framing.name()), "s")
            .framings(&[framing])
            .start()
            .await
            .unwrap();
        let mut pa = a.port().await.unwrap();
        let mut pb = b.named_port("inbox").await.unwrap();
        b.connect(&addr(&a)).await.unwrap();
        b.wait_up(a.id(), WAIT).await.unwrap();
        let bytes = Value::Bytes(vec![0, 255]);
        b.send(pa.id(), vec![t(pb.id()), Value::Int(1), bytes.clone()])
            .await
            .unwrap();
        let got = recv(&mut pa).await;
        // Byte strings survive cbor; json turns them into text (as Perl would).
        let expect_bytes = if framing == Framing::Cbor {
            bytes.clone()
        } else {
            t("\u{0}\u{ff}")
        };
        assert_eq!(got, [t(pb.id()), Value::Int(1), expect_bytes]);
        a.send(pb.id(), vec![t("pong")]).await.unwrap();
        assert_eq!(recv(&mut pb).await, [t("pong")]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_all_talk() {
    let a = builder("three-a", "s").start().await.unwrap();
    let b = builder("three-b", "s").start().await.unwrap();
    let c = builder("three-c", "s").start().await.unwrap();
    b.connect(&addr(&a)).await.unwrap();
    c.connect(&addr(&a)).await.unwrap();
    c.connect(&addr(&b)).await.unwrap();
    for (x, y) in [(&b, &a), (&c, &a), (&c, &b)] {
        x.wait_up(y.id(), WAIT).await.unwrap();
    }
    let nodes = [&a, &b, &c];
    let mut ports = Vec::new();
    for n in nodes {
        ports.push(n.port().await.unwrap());
    }
    for (i, from) in nodes.iter().enumerate() {
        for (j, port) in ports.iter().enumerate() {
            if i != j {
                from.send(port.id(), vec![t(from.id())]).await.unwrap();
            }
        }
    }
    for (j, port) in ports.iter_mut().enumerate() {
        let mut senders = [recv(port).await, recv(port).await];
        senders.sort_by_key(|m| format!("{m:?}"));
        let expected: Vec<Vec<Value>> = nodes
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != j)
            .map(|(_, n)| vec![t(n.id())])
            .collect();
        assert_eq!(senders.to_vec(), expected);
    }
    // A relay through a's node port reaches c's port from b.
    b.send(
        &format!("{}#", a.id()),
        vec![t("snd"), t(ports[2].id()), t("relayed")],
    )
    .await
    .unwrap();
    assert_eq!(recv(&mut ports[2]).await, [t("relayed")]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_last_handle_stops_the_node_and_frees_its_port() {
    let node = builder("dropped", "s").start().await.unwrap();
    let addr = addr(&node);
    drop(node);
    // Once the driver has noticed (it wakes on the closed command channel), the listening
    // socket is closed: a connection is refused, not left waiting in the backlog.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(
        tokio::net::TcpStream::connect(&addr).await.is_err(),
        "{addr} still listens"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rust_values_travel_as_serialized_arguments() {
    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct Job {
        id: u64,
        tags: Vec<String>,
        due: Option<f64>,
    }
    let a = builder("ser-a", "s").start().await.unwrap();
    let b = builder("ser-b", "s").start().await.unwrap();
    b.connect(&addr(&a)).await.unwrap();
    b.wait_up(a.id(), WAIT).await.unwrap();
    let mut inbox = a.port().await.unwrap();
    let job = Job {
        id: 7,
        tags: vec!["x".into()],
        due: None,
    };
    b.send_ser(inbox.id(), &("job", &job)).await.unwrap();
    let got = recv(&mut inbox).await;
    assert_eq!(got[0], t("job"));
    assert_eq!(aemp_host::from_value::<Job>(&got[1]).unwrap(), job);
    // Arguments are a sequence; anything else is refused before it is sent.
    let refused = b.send_ser(inbox.id(), &job).await.unwrap_err();
    assert!(
        matches!(
            refused,
            aemp_host::NodeError::Value(aemp_host::ValueError::NotASequence(_))
        ),
        "{refused:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_delivers_what_was_sent_even_to_a_node_not_up_yet() {
    let a = builder("shut-a", "s").start().await.unwrap();
    let mut inbox = a.named_port("inbox").await.unwrap();
    let b = builder("shut-b", "s").start().await.unwrap();
    let watcher = b.clone();
    // A slow link: the proxy lets b's connection through only after 300 ms, so the
    // messages wait in b's queue for a when the shutdown begins.
    let proxy = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let via = proxy.local_addr().unwrap().to_string();
    let target = addr(&a);
    tokio::spawn(async move {
        let (mut from_b, _) = proxy.accept().await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        let mut to_a = tokio::net::TcpStream::connect(target).await.unwrap();
        let _ = tokio::io::copy_bidirectional(&mut from_b, &mut to_a).await;
    });
    b.connect(&via).await.unwrap();
    b.send_batch(
        (0..100)
            .map(|i| ("shut-a#inbox".to_owned(), vec![Value::Int(i)]))
            .collect(),
    )
    .await
    .unwrap();
    b.shutdown(WAIT).await.unwrap();
    for i in 0..100 {
        assert_eq!(recv(&mut inbox).await, [Value::Int(i)]);
    }
    let stopped = tokio::time::timeout(WAIT, watcher.closed()).await.unwrap();
    assert!(
        matches!(&stopped, aemp_host::NodeError::Stopped(why) if why == "shut down"),
        "{stopped:?}"
    );
    assert!(watcher.send("shut-a#inbox", vec![]).await.is_err());
}

/// The batch API both ways: `SendBatch` messages alternating between two ports of the
/// other node (so one engine batch holds runs for both), raw pushes among them, taken with
/// `recv_batch` from inboxes far smaller than the batch (split chunks, held messages):
/// every message arrives once, in order, at its own port.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_reach_two_ports_in_order_through_small_inboxes() {
    let a = builder("batch-a", "s")
        .port_capacity(7)
        .start()
        .await
        .unwrap();
    let b = builder("batch-b", "s").start().await.unwrap();
    let mut even = a.named_port("even").await.unwrap();
    let mut odd = a.named_port("odd").await.unwrap();
    b.connect(&addr(&a)).await.unwrap();
    b.wait_up(a.id(), WAIT).await.unwrap();
    const N: i128 = 3000;
    let mut batch = aemp_host::SendBatch::new();
    for i in 0..N {
        let port = if i % 2 == 0 { even.id() } else { odd.id() };
        if i % 3 == 0 {
            batch.push_raw(port, &Value::Array(vec![Value::Int(i)]).encode());
        } else {
            batch.push(port, &[Value::Int(i)]);
        }
    }
    assert_eq!(batch.len(), N as usize);
    b.send_messages(batch).await.unwrap();
    tokio::join!(take(&mut even, 0, N), take(&mut odd, 1, N));
}

/// Takes messages `[first]`, `[first + 2]`, ... below `end` from `port`, five at most at once.
async fn take(port: &mut aemp_host::Port, first: i128, end: i128) {
    let mut next = first;
    while next < end {
        let got = tokio::time::timeout(WAIT, port.recv_batch(5))
            .await
            .unwrap()
            .unwrap();
        assert!((1..=5).contains(&got.len()));
        for args in got.decode() {
            assert_eq!(args, [Value::Int(next)]);
            next += 2;
        }
    }
}
