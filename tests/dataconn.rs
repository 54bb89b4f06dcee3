//! Data connections between nodes on loopback: asked for with `Node::data_connect`,
//! served by `Node::handle_data_connections`, both directions of who connects, inside
//! TLS, and the failures the asking side is told about.

use std::time::Duration;

use aemp_host::tls::{TlsConfig, generate_ca, generate_node_pem};
use aemp_host::{DataConnections, DataStream, Node, NodeError, Value};
use aemp_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Serves every data connection of `incoming` by sending back what it brings.
fn echo(mut incoming: DataConnections) {
    tokio::spawn(async move {
        while let Some(stream) = incoming.accept().await {
            tokio::spawn(async move {
                let (mut from, mut to) = tokio::io::split(stream);
                tokio::io::copy(&mut from, &mut to).await.unwrap();
                to.shutdown().await.unwrap();
            });
        }
    });
}

/// `len` bytes that differ from their neighbours, so that a lost or moved chunk shows.
fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
}

/// Writes `data` to `stream` while reading everything back until the end of the stream.
async fn round_trip(stream: DataStream, data: &[u8]) -> Vec<u8> {
    let (mut from, mut to) = tokio::io::split(stream);
    let write = async {
        to.write_all(data).await.unwrap();
        to.shutdown().await.unwrap();
    };
    let read = async {
        let mut back = Vec::new();
        from.read_to_end(&mut back).await.unwrap();
        back
    };
    let ((), back) = tokio::time::timeout(WAIT, async { tokio::join!(write, read) })
        .await
        .expect("the echo ends within the wait");
    back
}

/// `len` bytes through `stream` come back as they went.
async fn echoes(stream: DataStream, len: usize) {
    let data = pattern(len);
    assert!(
        round_trip(stream, &data).await == data,
        "echoed bytes differ"
    );
}

/// Two nodes up: `dialler` connected to `listener`.
async fn up(dialler: &Node, listener: &Node) {
    dialler.connect(&addr(listener)).await.unwrap();
    dialler.wait_up(listener.id(), WAIT).await.unwrap();
    listener.wait_up(dialler.id(), WAIT).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_asker_that_dialled_opens_the_data_connection_itself() {
    let server = builder("dc-server", "s").start().await.unwrap();
    let client = builder("dc-client", "s").start().await.unwrap();
    echo(server.handle_data_connections("echo").await.unwrap());
    up(&client, &server).await;
    let stream = client
        .data_connect("dc-server", WAIT, "echo", vec![])
        .await
        .unwrap();
    assert_eq!(stream.node(), "dc-server");
    assert_eq!(stream.handler(), "echo");
    echoes(stream, 4 << 20).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_other_node_connects_when_it_dialled_the_asker() {
    let asker = builder("dc-asker", "s").start().await.unwrap();
    let served = builder("dc-served", "s").start().await.unwrap();
    echo(served.handle_data_connections("echo").await.unwrap());
    // The served node dialled the asker, so it is told to connect (`_connect`).
    up(&served, &asker).await;
    let stream = asker
        .data_connect("dc-served", WAIT, "echo", vec![])
        .await
        .unwrap();
    echoes(stream, 1 << 20).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_handler_gets_the_askers_arguments_and_node() {
    let server = builder("dc-args-server", "s").start().await.unwrap();
    let client = builder("dc-args-client", "s").start().await.unwrap();
    let mut incoming = server.handle_data_connections("upload").await.unwrap();
    up(&client, &server).await;
    let args = vec![t("a.log"), Value::Int(3), Value::Bytes(vec![0, 255])];
    let asked = client.data_connect("dc-args-server", WAIT, "upload", args.clone());
    let (stream, mut served) = tokio::join!(asked, async {
        tokio::time::timeout(WAIT, incoming.accept())
            .await
            .unwrap()
            .unwrap()
    });
    let mut stream = stream.unwrap();
    assert_eq!(served.args(), args.as_slice());
    assert_eq!(served.node(), "dc-args-client");
    assert_eq!(served.id(), stream.id());
    assert!(stream.id().ends_with("@dc-args-client"), "{}", stream.id());
    // Written at once, before the other side reads: bytes that arrive with the last of
    // the handshake are the stream's first.
    stream.write_all(b"first bytes").await.unwrap();
    stream.shutdown().await.unwrap();
    let mut got = Vec::new();
    served.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, b"first bytes");
    // The other direction ends too.
    served.write_all(b"done").await.unwrap();
    drop(served);
    let mut back = Vec::new();
    stream.read_to_end(&mut back).await.unwrap();
    assert_eq!(back, b"done");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_connection_runs_inside_tls() {
    let (ca, ca_key) = generate_ca().unwrap();
    let tls = || {
        let pem = generate_node_pem(&ca, &ca_key).unwrap();
        TlsConfig::from_pem(pem.as_bytes()).unwrap()
    };
    let server = builder("dc-tls-server", "s")
        .tls(tls())
        .start()
        .await
        .unwrap();
    let client = builder("dc-tls-client", "s")
        .tls(tls())
        .start()
        .await
        .unwrap();
    echo(server.handle_data_connections("echo").await.unwrap());
    up(&client, &server).await;
    let stream = client
        .data_connect("dc-tls-server", WAIT, "echo", vec![])
        .await
        .unwrap();
    echoes(stream, 3 << 20).await;
    assert!(logged_by("dc-tls-server", "data connection").await);
}

/// The message of a failed data connection.
fn failure(result: Result<DataStream, NodeError>) -> String {
    match result {
        Err(NodeError::DataConnection(message)) => message,
        other => panic!("expected a data connection failure, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_the_other_node_does_not_have_is_refused_by_name() {
    let server = builder("dc-nohandler-server", "s").start().await.unwrap();
    let client = builder("dc-nohandler-client", "s").start().await.unwrap();
    up(&client, &server).await;
    let message = failure(
        client
            .data_connect("dc-nohandler-server", WAIT, "upload", vec![])
            .await,
    );
    assert_eq!(message, "upload: no such data connection handler");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_never_comes_up_times_out_with_the_references_message() {
    let client = builder("dc-alone", "s").start().await.unwrap();
    let started = tokio::time::Instant::now();
    let message = failure(
        client
            .data_connect("dc-nobody", Duration::from_secs(1), "echo", vec![])
            .await,
    );
    assert_eq!(
        message,
        "dc-nobody: unable to establish connection within 1 seconds"
    );
    assert!(started.elapsed() < WAIT, "took {:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_connection_to_our_own_node_is_a_pipe_to_its_handler() {
    let node = builder("dc-self", "s").start().await.unwrap();
    let message = failure(node.data_connect("dc-self", WAIT, "echo", vec![]).await);
    assert_eq!(message, "echo: no such data connection handler");
    echo(node.handle_data_connections("echo").await.unwrap());
    let stream = node
        .data_connect("dc-self#", WAIT, "echo", vec![t("x")])
        .await
        .unwrap();
    assert_eq!((stream.node(), stream.args()), ("dc-self", &[t("x")][..]));
    echoes(stream, 1 << 20).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_nobody_takes_is_closed_and_a_newer_handle_takes_over() {
    let server = builder("dc-handles-server", "s").start().await.unwrap();
    let client = builder("dc-handles-client", "s").start().await.unwrap();
    let mut first = server.handle_data_connections("h").await.unwrap();
    let mut second = server.handle_data_connections("h").await.unwrap();
    assert!(first.accept().await.is_none(), "the older handle ends");
    up(&client, &server).await;
    let asked = client.data_connect("dc-handles-server", WAIT, "h", vec![]);
    let (stream, served) = tokio::join!(asked, second.accept());
    assert!(stream.is_ok() && served.is_some());
    // Without a handle the engine still accepts (the handler is registered) and the
    // host closes the stream: the asker reads its end.
    drop(second);
    let mut stream = client
        .data_connect("dc-handles-server", WAIT, "h", vec![])
        .await
        .unwrap();
    let mut rest = Vec::new();
    let read = tokio::time::timeout(WAIT, stream.read_to_end(&mut rest)).await;
    assert!(
        matches!(read, Ok(Ok(0)) | Ok(Err(_))),
        "the stream ends: {read:?}"
    );
}

const EXPECT: &str = "AnyEvent::MP::DataConn::_expect";
const CONNECT: &str = "AnyEvent::MP::DataConn::_connect";

/// The transport settings of a Perl node `perl-peer` (AnyEvent::MP 2.02), for its
/// connection to the node or, with `dataconn_id`, for a data connection.
fn perl_config(dataconn_id: Option<&str>) -> aemp_engine::Config {
    let mut c = aemp_engine::Config::new("perl-peer");
    c.secret = Some(b"s".to_vec());
    c.greeting.push(("provider".into(), "AE-2.02".into()));
    if let Some(id) = dataconn_id {
        c.protocol = "aemp-dataconn".into();
        c.greeting.push(("dataconn_id".into(), id.into()));
    }
    c
}

/// A Perl node (no listener) connected to `node`.
async fn perl_peer(node: &Node) -> RawPeer {
    let mut peer = RawPeer::connect_with(&addr(node), perl_config(None)).await;
    peer.handshake().await.unwrap();
    peer
}

/// The Perl node announces data connection `id` for handler `echo` and its port
/// `perl-peer#p1`, as connect_to sends it.
async fn expect_echo(perl: &mut RawPeer, id: &str) {
    let request = vec![
        t(""),
        t(EXPECT),
        t(id),
        t("perl-peer#p1"),
        Value::Int(5),
        t("echo"),
    ];
    perl.send(request).await;
}

/// The first message `peer` gets (past the node's own chatter) that holds `needle`
/// as one of its items.
async fn message_with(peer: &mut RawPeer, needle: &str) -> Vec<Value> {
    loop {
        match peer.recv().await.expect("a message") {
            Value::Array(items) if items.contains(&t(needle)) => return items,
            _ => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_perl_node_opens_a_data_connection_into_the_node() {
    let node = builder("dc-perl-in", "s").start().await.unwrap();
    echo(node.handle_data_connections("echo").await.unwrap());
    let mut perl = perl_peer(&node).await;
    // connect_to as the reference sends it, then its round trip.
    let id = "1@perl-peer";
    expect_echo(&mut perl, id).await;
    perl.send(vec![t(""), t("snd"), t("perl-peer#rt")]).await;
    // (To a remote port, a message names the port without its node.)
    message_with(&mut perl, "rt").await;
    // The node listens: the Perl node connects, greeting with the id.
    let mut data = RawPeer::connect_with(&addr(&node), perl_config(Some(id))).await;
    data.handshake().await.unwrap();
    assert_eq!(data.handed_over.as_deref(), Some(&[][..]));
    data.stream.write_all(b"from perl").await.unwrap();
    data.stream.shutdown().await.unwrap();
    let mut back = Vec::new();
    tokio::time::timeout(WAIT, data.stream.read_to_end(&mut back))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(back, b"from perl");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_node_asks_a_perl_node_that_dialled_it_to_connect() {
    let node = builder("dc-perl-out", "s").start().await.unwrap();
    let mut perl = perl_peer(&node).await;
    node.wait_up("perl-peer", WAIT).await.unwrap();
    let asked = node.data_connect("perl-peer", WAIT, "pkg::receiver", vec![Value::Int(1)]);
    let perl_side = async {
        let items = message_with(&mut perl, EXPECT).await;
        let id = items[2].as_name().unwrap().to_string();
        assert_eq!(items[5..], [t("pkg::receiver"), Value::Int(1)]);
        // The round trip: the Perl node's kernel answers `snd` with an empty message.
        let snd = message_with(&mut perl, "snd").await;
        let rpc = snd[2].as_name().unwrap();
        let rpc = rpc.strip_prefix("dc-perl-out#").expect("our port");
        perl.send(vec![t(rpc)]).await;
        // It dialled us, so it is asked to connect.
        let connect = message_with(&mut perl, CONNECT).await;
        assert_eq!(connect, [t(""), t(CONNECT), t(&id), t("dc-perl-out")]);
        let mut data = RawPeer::connect_with(&addr(&node), perl_config(Some(&id))).await;
        data.handshake().await.unwrap();
        data.stream.write_all(b"to aemp").await.unwrap();
        data
    };
    let (stream, mut data) = tokio::join!(asked, perl_side);
    let mut stream = stream.unwrap();
    let mut got = [0; 7];
    stream.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"to aemp");
    stream.write_all(b"and back").await.unwrap();
    stream.shutdown().await.unwrap();
    let mut back = Vec::new();
    data.stream.read_to_end(&mut back).await.unwrap();
    assert_eq!(back, b"and back");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn neither_side_listening_for_the_other_kills_the_perl_port_with_why() {
    // The Perl node dialled in and asks us to connect to it, as connect_to does when it
    // knows no listener of ours: we only reached it on its own connection, so there is
    // nowhere to connect to.
    let node = builder("dc-perl-none", "s").start().await.unwrap();
    node.handle_data_connections("echo").await.unwrap();
    let mut perl = perl_peer(&node).await;
    let id = "1@perl-peer";
    expect_echo(&mut perl, id).await;
    perl.send(vec![t(""), t(CONNECT), t(id), t("perl-peer")])
        .await;
    let kill = message_with(&mut perl, "kil1").await;
    assert_eq!(
        kill,
        [
            t(""),
            t("kil1"),
            t("p1"),
            t("AnyEvent::MP::DataConn"),
            t("perl-peer: no listeners found"),
        ]
    );
}
