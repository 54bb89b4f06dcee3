//! TLS started mid-stream with certificates made here: the same network certificate
//! connects, another CA or a missing client certificate is refused.

use std::sync::Arc;

use aemp_host::Value;
use aemp_host::tls::{TlsConfig, generate_ca, generate_network_pem, generate_node_pem};
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
    b.connect(&addr(&a)).unwrap();
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
    d.connect(&addr(&c)).unwrap();
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
    b.connect(&addr(&a)).unwrap();
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
    let pem = generate_network_pem().unwrap();
    let a = builder("nocert-a", "s")
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
    assert!(
        logged_by(
            "nocert-a",
            "TLS handshake failed: peer sent no certificates"
        )
        .await
    );
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
