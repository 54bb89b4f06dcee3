//! TLS started mid-stream with certificates made here, with rcgen and as AnyEvent::MP makes
//! them (`openssl req`, see `reference_pem`): the same network certificate, a node
//! certificate signed by it, RSA or ECDSA, the key first, extra CA certificates connect;
//! another network, an expired or not yet valid certificate, a missing client certificate
//! are refused; OpenSSL set up as AnyEvent::MP sets it up accepts our `gencert` file. These
//! tests need the `openssl` command (scripts/setup installs it).

use std::sync::Arc;

use aemp_host::Value;
use aemp_host::tls::{Role, TlsConfig, generate_ca, generate_network_pem, generate_node_pem};
use aemp_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_with_one_network_certificate_talk_over_tls() {
    let (ca, ca_key) = generate_ca().unwrap();
    let pem_a = generate_node_pem(&ca, &ca_key).unwrap();
    let pem_b = generate_node_pem(&ca, &ca_key).unwrap();
    let tls = |pem: &str| TlsConfig::from_pem(pem.as_bytes()).unwrap();
    let a = builder("tls-a", "s")
        .tls(tls(&pem_a))
        .start()
        .await
        .unwrap();
    let b = builder("tls-b", "s")
        .tls(tls(&pem_b))
        .start()
        .await
        .unwrap();
    let mut port = a.port().await.unwrap();
    b.connect(&addr(&a)).await.unwrap();
    b.wait_up("tls-a", WAIT).await.unwrap();
    b.send(
        port.id(),
        vec![t("secret stuff"), Value::Bytes(vec![1, 2, 3])],
    )
    .await
    .unwrap();
    assert_eq!(
        recv(&mut port).await,
        [t("secret stuff"), Value::Bytes(vec![1, 2, 3])]
    );
    assert!(
        logged_by(
            "tls-a",
            "connected as tls-b (tls_sha3_512/tls_sha3_512 cbor/cbor, tls)"
        )
        .await
    );
    // What `Node::info` (and `aemp info`) shows of it.
    let info = a.info().await.unwrap();
    let from_b = info
        .connections
        .iter()
        .find(|c| c.node.as_deref() == Some("tls-b"))
        .expect("b's connection");
    assert!(
        from_b.tls && from_b.incoming && from_b.working,
        "{from_b:?}"
    );
    assert_eq!(from_b.auth.as_deref(), Some("tls_sha3_512/tls_sha3_512"));
    assert_eq!(from_b.messages_in, 1, "{from_b:?}");
    // The shared network file works the same.
    let shared = generate_network_pem().unwrap();
    let c = builder("tls-c", "s")
        .tls(tls(&shared))
        .start()
        .await
        .unwrap();
    let d = builder("tls-d", "s")
        .tls(tls(&shared))
        .start()
        .await
        .unwrap();
    d.connect(&addr(&c)).await.unwrap();
    d.wait_up("tls-c", WAIT).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_ca_is_refused() {
    let a = builder("ca-a", "s")
        .tls(TlsConfig::from_pem(generate_network_pem().unwrap().as_bytes()).unwrap())
        .start()
        .await
        .unwrap();
    let b = builder("ca-b", "s")
        .tls(TlsConfig::from_pem(generate_network_pem().unwrap().as_bytes()).unwrap())
        .start()
        .await
        .unwrap();
    b.connect(&addr(&a)).await.unwrap();
    // The side that checks the foreign certificate first (it depends on the TLS roles,
    // which the nonces decide) fails the handshake; the other may only see the
    // connection close.
    let a_failed = logged_by("ca-a", "TLS handshake failed");
    let b_failed = logged_by("ca-b", "TLS handshake failed");
    let (a_failed, b_failed) = tokio::join!(a_failed, b_failed);
    assert!(a_failed || b_failed);
    assert!(
        b.wait_up("ca-a", std::time::Duration::from_secs(2))
            .await
            .is_err()
    );
    assert!(!a.is_up("ca-b").await.unwrap());
}

/// A peer that speaks AEMP with `tls=1.0` but has no client certificate: it takes the TLS
/// client role (its nonce sorts lowest) and the node, as server, refuses it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_client_certificate_is_refused() {
    client_without_certificate_is_refused("nocert-a", &generate_network_pem().unwrap()).await;
}

/// The same with the file AnyEvent::MP's `aemp gencert` makes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_client_certificate_is_refused_with_reference_file() {
    client_without_certificate_is_refused("nocert-ref", &reference_pem(RSA)).await;
}

/// Node `id` with the network file `pem` refuses a TLS client without a certificate.
async fn client_without_certificate_is_refused(id: &str, pem: &str) {
    let a = builder(id, "s")
        .tls(TlsConfig::from_pem(pem.as_bytes()).unwrap())
        .start()
        .await
        .unwrap();
    let mut stream = tokio::net::TcpStream::connect(addr(&a)).await.unwrap();
    let mut config = aemp_engine::Config::new("nocert");
    config.tls = true;
    // A nonce whose base64 is all '+', the lowest base64 character: we are the client.
    let lowest: [u8; 66] = std::array::from_fn(|i| [0xfb, 0xef, 0xbe][i % 3]);
    let mut conn = aemp_engine::Connection::new(config, lowest, 0).unwrap();
    let mut buf = vec![0; 65536];
    let leftover = loop {
        let mut start = None;
        while let Some(o) = conn.poll_output() {
            match o {
                aemp_engine::Output::Transmit(b) => stream.write_all(&b).await.unwrap(),
                aemp_engine::Output::Greeting(_) => {
                    conn.handle_verdict(aemp_engine::Verdict::Accept)
                }
                aemp_engine::Output::StartTls { role, leftover } => {
                    assert_eq!(role, aemp_engine::TlsRole::Client);
                    // What follows (the auth line) belongs inside TLS.
                    start = Some(leftover);
                    break;
                }
                other => panic!("{other:?}"),
            }
        }
        if let Some(leftover) = start {
            break leftover;
        }
        let n = stream.read(&mut buf).await.unwrap();
        conn.handle_input(&buf[..n]);
    };
    assert!(leftover.is_empty());
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let client = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(TrustAnything(provider)))
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
    let name = rustls::pki_types::ServerName::try_from("aemp.invalid").unwrap();
    // With TLS 1.3 the client may finish before the server checks its certificate; the
    // refusal shows on the server, and the stream dies.
    if let Ok(mut tls) = connector.connect(name, stream).await {
        let _ = tls.write_all(b"x").await;
        let _ = tls.read(&mut buf).await;
    }
    assert!(logged_by(id, "TLS handshake failed: peer sent no certificates").await);
    assert!(!a.is_up("nocert").await.unwrap());
}

/// Accepts any server certificate, so only the missing client certificate can fail.
#[derive(Debug)]
struct TrustAnything(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for TrustAnything {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Nodes `a` and `b` with these PEM files: `b` connects to `a`, a message crosses, and `a`
/// reports the TLS session.
async fn talk_over_tls(a_id: &str, pem_a: &str, b_id: &str, pem_b: &str) {
    let a = builder(a_id, "s").tls(tls(pem_a)).start().await.unwrap();
    let b = builder(b_id, "s").tls(tls(pem_b)).start().await.unwrap();
    let mut port = a.port().await.unwrap();
    b.connect(&addr(&a)).await.unwrap();
    b.wait_up(a_id, WAIT).await.unwrap();
    b.send(port.id(), vec![t("over tls")]).await.unwrap();
    assert_eq!(recv(&mut port).await, [t("over tls")]);
    let session = format!("connected as {b_id} (tls_sha3_512/tls_sha3_512 cbor/cbor, tls)");
    assert!(
        logged_by(a_id, &session).await,
        "{a_id} did not log {session:?}"
    );
}

/// Nodes `a` and `b` with these PEM files never come up for each other; a side that checks
/// the other's certificate fails the handshake with `reason`.
async fn refused(a_id: &str, pem_a: &str, b_id: &str, pem_b: &str, reason: &str) {
    let a = builder(a_id, "s").tls(tls(pem_a)).start().await.unwrap();
    let b = builder(b_id, "s").tls(tls(pem_b)).start().await.unwrap();
    b.connect(&addr(&a)).await.unwrap();
    let failure = format!("TLS handshake failed: invalid peer certificate: {reason}");
    let (a_failed, b_failed) = tokio::join!(logged_by(a_id, &failure), logged_by(b_id, &failure));
    assert!(a_failed || b_failed, "neither node logged {failure:?}");
    assert!(
        b.wait_up(a_id, std::time::Duration::from_secs(2))
            .await
            .is_err()
    );
    assert!(!a.is_up(b_id).await.unwrap());
}

/// TLS settings from PEM text.
fn tls(pem: &str) -> TlsConfig {
    TlsConfig::from_pem(pem.as_bytes()).unwrap()
}

/// The file AnyEvent::MP's `aemp gencert` makes (self-signed, CA:TRUE, RSA 2048), shared
/// by both nodes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reference_gencert_file_connects() {
    let pem = reference_pem(RSA);
    talk_over_tls("ref-rsa-a", &pem, "ref-rsa-b", &pem).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reference_file_with_ecdsa_key_connects() {
    let pem = reference_pem(ECDSA);
    talk_over_tls("ref-ec-a", &pem, "ref-ec-b", &pem).await;
}

/// AnyEvent::MP's `setcert` documents the key first, then the certificate(s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_before_certificate_connects() {
    let pem = reference_pem(RSA);
    let (cert, key) = pem
        .split_once("-----BEGIN PRIVATE KEY-----")
        .expect("certificate then key");
    let key_first = format!("-----BEGIN PRIVATE KEY-----{key}{cert}");
    assert!(key_first.starts_with("-----BEGIN PRIVATE KEY-----"));
    talk_over_tls("keyfirst-a", &key_first, "keyfirst-b", &key_first).await;
}

/// Extra CA certificates after the node's own are trusted too and change nothing else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_with_an_extra_ca_certificate_connects() {
    let other = reference_pem(ECDSA);
    let (other_cert, _) = other
        .split_once("-----BEGIN PRIVATE KEY-----")
        .expect("certificate then key");
    let pem = reference_pem(RSA) + other_cert;
    talk_over_tls("extra-a", &pem, "extra-b", &pem).await;
}

/// Each node has its own certificate, signed by the network certificate in its file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_certificates_signed_by_the_network_certificate_connect() {
    let network = reference_pem(RSA);
    talk_over_tls(
        "chain-a",
        &leaf_pem(&network),
        "chain-b",
        &leaf_pem(&network),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_networks_reference_certificate_is_refused() {
    refused(
        "othernet-a",
        &reference_pem(RSA),
        "othernet-b",
        &reference_pem(RSA),
        "UnknownIssuer",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_network_certificate_is_refused() {
    let pem = reference_pem_valid("20200101000000Z", "20210101000000Z");
    refused("expired-a", &pem, "expired-b", &pem, "certificate expired").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_yet_valid_network_certificate_is_refused() {
    let pem = reference_pem_valid("20990101000000Z", "21000101000000Z");
    refused(
        "early-a",
        &pem,
        "early-b",
        &pem,
        "certificate not valid yet",
    )
    .await;
}

/// What `aemp gencert` stores loads in OpenSSL, as the Perl nodes need.
#[test]
fn gencert_file_loads_in_openssl() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("net.pem"), generate_network_pem().unwrap()).unwrap();
    openssl(dir.path(), &["x509", "-noout", "-in", "net.pem"]);
    openssl(dir.path(), &["pkey", "-noout", "-in", "net.pem"]);
}

/// OpenSSL, set up as AnyEvent::MP sets it up (the one file as certificate, key and CA list,
/// the peer verified, a client certificate required), accepts our `gencert` file in both
/// roles, and we accept it back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openssl_and_aemp_accept_each_other_with_gencert_file() {
    let dir = tempfile::tempdir().unwrap();
    let pem = generate_network_pem().unwrap();
    std::fs::write(dir.path().join("net.pem"), &pem).unwrap();
    let ours = tls(&pem);
    let file = ["-cert", "net.pem", "-key", "net.pem", "-CAfile", "net.pem"];

    // OpenSSL as TLS server: it reverses each line we send, once it accepted us.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let accept = format!("127.0.0.1:{port}");
    let mut args = vec!["s_server", "-accept", &accept, "-naccept", "1", "-rev"];
    args.extend(file);
    args.extend(["-Verify", "1", "-verify_return_error"]);
    let _server = openssl_process(dir.path(), &args);
    let deadline = tokio::time::Instant::now() + WAIT;
    let stream = loop {
        match tokio::net::TcpStream::connect(&accept).await {
            Ok(stream) => break stream,
            Err(e) if tokio::time::Instant::now() > deadline => panic!("openssl s_server: {e}"),
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(50)).await,
        }
    };
    let mut tls_stream = ours.start(stream, Role::Client).await.unwrap();
    tls_stream.write_all(b"ping\n").await.unwrap();
    tls_stream.flush().await.unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&got).contains("gnip") {
        let n = tokio::time::timeout(WAIT, tls_stream.read(&mut buf))
            .await
            .expect("openssl s_server answers")
            .expect("openssl s_server accepted our certificate");
        assert!(n > 0, "openssl s_server closed: it refused our certificate");
        got.extend_from_slice(&buf[..n]);
    }

    // OpenSSL as TLS client.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let connect = listener.local_addr().unwrap().to_string();
    let mut args = vec!["s_client", "-connect", &connect, "-ign_eof"];
    args.extend(file);
    args.extend(["-verify", "1", "-verify_return_error"]);
    let client = openssl_process(dir.path(), &args);
    let (stream, _) = tokio::time::timeout(WAIT, listener.accept())
        .await
        .unwrap()
        .unwrap();
    let mut tls_stream = ours.start(stream, Role::Server).await.unwrap();
    tls_stream.write_all(b"pong\n").await.unwrap();
    tls_stream.shutdown().await.unwrap();
    drop(tls_stream);
    let out = tokio::time::timeout(WAIT, client.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("Verify return code: 0 (ok)"), "{stdout}");
    assert!(stdout.contains("pong"), "{stdout}");
}

/// `openssl ARGS` in `dir` as a child process, killed when dropped.
fn openssl_process(dir: &std::path::Path, args: &[&str]) -> tokio::process::Child {
    tokio::process::Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run openssl ({e}): run scripts/setup as root or `apt-get install openssl`"
            )
        })
}
