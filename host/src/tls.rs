//! TLS for AEMP connections, the way AnyEvent::MP uses it.
//!
//! A network shares one PEM file holding a node certificate (the first
//! certificate in the file), its private key and any CA certificates; often,
//! as `aemp gencert` makes it, just one self-signed certificate and its key.
//! Both sides must present a certificate that is one of the file's or chains
//! to one of them (see the `trust` module for exactly what is accepted), and
//! host names are not checked because nodes are named by node id, not by DNS.
//!
//! The TLS role is decided by the AEMP protocol, not by who connected, so
//! [`TlsConfig::start`] takes the role explicitly.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, ServerConfig};
use time::OffsetDateTime;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use trust::{PeerTrust, root_store};

mod trust;

/// Either side of an established TLS connection.
pub use tokio_rustls::TlsStream;

/// Server name the client hands to rustls. It is never checked (see
/// [`PeerTrust`]) and SNI is disabled, so it never leaves the host.
const PLACEHOLDER_SERVER_NAME: &str = "aemp.invalid";

/// Subject common name of `aemp gencert`'s certificate, as AnyEvent::MP's.
const NETWORK_COMMON_NAME: &str = "AnyEvent::MP";

/// How long generated certificates are valid: AnyEvent::MP's 3650 days.
const VALIDITY: Duration = Duration::from_secs(3650 * 24 * 60 * 60);

/// Subject common name of generated CA certificates.
const CA_COMMON_NAME: &str = "aemp network CA";

/// Subject common name of generated node certificates.
const NODE_COMMON_NAME: &str = "aemp node";

/// Errors from loading TLS material or generating certificates.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The PEM data contains no `CERTIFICATE` section.
    #[error("no certificate in PEM")]
    NoCertificate,
    /// The PEM data contains no (unencrypted) private key section.
    #[error("no private key in PEM")]
    NoPrivateKey,
    /// The PEM data is malformed.
    #[error("invalid PEM: {0}")]
    Pem(#[source] pem::Error),
    /// A certificate could not be used as a trust anchor.
    #[error("invalid certificate: {0}")]
    InvalidCertificate(#[source] rustls::Error),
    /// The certificate verifiers could not be built from the trust anchors.
    #[error("cannot build certificate verifier: {0}")]
    Verifier(#[source] rustls::client::VerifierBuilderError),
    /// rustls refused the certificate/key combination or protocol settings.
    #[error("cannot set up TLS with this certificate and key: {0}")]
    Config(#[source] rustls::Error),
    /// The PEM file could not be read.
    #[error("cannot read TLS PEM file {}: {source}", path.display())]
    Read {
        /// The file that could not be read.
        path: PathBuf,
        /// Why it could not be read.
        #[source]
        source: io::Error,
    },
    /// The PEM file was read but its contents are unusable.
    #[error("TLS PEM file {}: {source}", path.display())]
    InFile {
        /// The offending file.
        path: PathBuf,
        /// What is wrong with its contents.
        #[source]
        source: Box<TlsError>,
    },
    /// The CA certificate given for signing could not be understood.
    #[error("invalid CA certificate: {0}")]
    CaCertificate(String),
    /// The CA private key given for signing could not be used.
    #[error("invalid CA private key: {0}")]
    CaKey(#[source] rcgen::Error),
    /// rcgen failed to generate a key or certificate.
    #[error("certificate generation failed: {0}")]
    Generate(#[source] rcgen::Error),
    /// A freshly signed node certificate does not chain to the given CA,
    /// typically because the CA key does not belong to the CA certificate.
    #[error("new node certificate does not verify against the CA certificate: {0}")]
    CaMismatch(#[source] rustls::Error),
}

/// Which side of the TLS handshake this node plays.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Sends the ClientHello; still presents a certificate (mutual auth).
    Client,
    /// Answers the ClientHello and requires a client certificate.
    Server,
}

/// TLS settings of a node, from its PEM file.
#[derive(Clone, Debug)]
pub struct TlsConfig {
    client: Arc<ClientConfig>,
    server: Arc<ServerConfig>,
}

impl TlsConfig {
    /// Builds client and server settings from one PEM blob: the first
    /// certificate is this node's, followed by its chain/CA certificates; the
    /// first private key belongs to the first certificate. Every certificate
    /// in the blob becomes a trust anchor.
    pub fn from_pem(pem: &[u8]) -> Result<TlsConfig, TlsError> {
        let certs = CertificateDer::pem_slice_iter(pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(TlsError::Pem)?;
        if certs.is_empty() {
            return Err(TlsError::NoCertificate);
        }
        let key = PrivateKeyDer::from_pem_slice(pem).map_err(|e| match e {
            pem::Error::NoItemsFound => TlsError::NoPrivateKey,
            e => TlsError::Pem(e),
        })?;

        let provider = Arc::new(rustls::crypto::ring::default_provider());
        // One trust decision for both roles.
        let trust = Arc::new(PeerTrust::new(&certs, &provider)?);

        // The whole file is sent as the chain: the peer may only trust the
        // root, and extra CA certificates are harmless.
        let mut client = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(TlsError::Config)?
            .dangerous()
            .with_custom_certificate_verifier(trust.clone())
            .with_client_auth_cert(certs.clone(), key.clone_key())
            .map_err(TlsError::Config)?;
        // The server name is a placeholder; don't put it on the wire.
        client.enable_sni = false;

        let server = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(TlsError::Config)?
            .with_client_cert_verifier(trust)
            .with_single_cert(certs, key)
            .map_err(TlsError::Config)?;

        Ok(TlsConfig {
            client: Arc::new(client),
            server: Arc::new(server),
        })
    }

    /// Reads a PEM file and builds settings as [`TlsConfig::from_pem`];
    /// every error names the file.
    pub fn from_file(path: &Path) -> Result<TlsConfig, TlsError> {
        let pem = std::fs::read(path).map_err(|source| TlsError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_pem(&pem).map_err(|e| TlsError::InFile {
            path: path.to_path_buf(),
            source: Box::new(e),
        })
    }

    /// Runs the TLS handshake on `stream` in the given role.
    ///
    /// Handshake failures (including a rejected peer certificate) are
    /// reported as [`io::Error`]s, as tokio-rustls does.
    pub async fn start<S>(&self, stream: S, role: Role) -> io::Result<TlsStream<S>>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        match role {
            Role::Client => {
                let name = ServerName::try_from(PLACEHOLDER_SERVER_NAME)
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
                let connector = TlsConnector::from(self.client.clone());
                Ok(connector.connect(name, stream).await?.into())
            }
            Role::Server => {
                let acceptor = TlsAcceptor::from(self.server.clone());
                Ok(acceptor.accept(stream).await?.into())
            }
        }
    }
}

impl TlsConfig {
    /// A sans-IO TLS session in the given role, for a node that drives its sockets
    /// itself.
    pub(crate) fn session(&self, role: Role) -> Result<rustls::Connection, rustls::Error> {
        Ok(match role {
            Role::Client => {
                let name = ServerName::try_from(PLACEHOLDER_SERVER_NAME)
                    .map_err(|e| rustls::Error::General(e.to_string()))?;
                rustls::ClientConnection::new(self.client.clone(), name)?.into()
            }
            Role::Server => rustls::ServerConnection::new(self.server.clone())?.into(),
        })
    }
}

/// A new network certificate as AnyEvent::MP's `aemp gencert` makes it: one
/// self-signed certificate (subject `CN=AnyEvent::MP`, CA:TRUE, valid for
/// 3650 days from now) followed by its private key (PKCS#8), in one PEM that
/// every node of the network shares as its certificate and its trust. The
/// key is ECDSA P-256 where the reference's OpenSSL makes RSA 2048: ring, our
/// crypto provider, cannot generate RSA keys.
pub fn generate_network_pem() -> Result<String, TlsError> {
    let (cert, key) = self_signed_ca(NETWORK_COMMON_NAME)?;
    Ok(format!("{}{}", cert.pem(), key.serialize_pem()))
}

/// A new self-signed CA (subject "aemp network CA"), returned as
/// (CA certificate PEM, CA private key PEM in PKCS#8).
pub fn generate_ca() -> Result<(String, String), TlsError> {
    let (cert, key) = self_signed_ca(CA_COMMON_NAME)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// A fresh key and a self-signed CA:TRUE certificate for it named
/// `common_name`, valid from now for [`VALIDITY`].
fn self_signed_ca(common_name: &str) -> Result<(rcgen::Certificate, KeyPair), TlsError> {
    let key = KeyPair::generate().map_err(TlsError::Generate)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = OffsetDateTime::now_utc();
    params.not_after = params.not_before + VALIDITY;
    let cert = params.self_signed(&key).map_err(TlsError::Generate)?;
    Ok((cert, key))
}

/// A new node certificate and key signed by an existing CA, rendered as the
/// network PEM (node certificate, node private key, CA certificate).
///
/// `ca_cert_pem` holds the CA certificate (the first certificate is used) and
/// `ca_key_pem` its PKCS#8 private key (the first private key is used), so
/// both may also point into one combined PEM.
pub fn generate_node_pem(ca_cert_pem: &str, ca_key_pem: &str) -> Result<String, TlsError> {
    let ca_cert = CertificateDer::from_pem_slice(ca_cert_pem.as_bytes()).map_err(|e| match e {
        pem::Error::NoItemsFound => TlsError::NoCertificate,
        e => TlsError::Pem(e),
    })?;
    let ca_key_der = PrivateKeyDer::from_pem_slice(ca_key_pem.as_bytes()).map_err(|e| match e {
        pem::Error::NoItemsFound => TlsError::NoPrivateKey,
        e => TlsError::Pem(e),
    })?;
    let ca_key = KeyPair::try_from(&ca_key_der).map_err(TlsError::CaKey)?;

    let issuer = Issuer::from_ca_cert_der(&ca_cert, ca_key).map_err(TlsError::Generate)?;

    let node_key = KeyPair::generate().map_err(TlsError::Generate)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, NODE_COMMON_NAME);
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    // Roles are decided per connection, so every node acts as both.
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    // OpenSSL (the Perl reference) uses the AKI to find the issuer; only
    // emit it when it can match the CA's own SKI.
    params.use_authority_key_identifier_extension = true;
    let node_cert = params
        .signed_by(&node_key, &issuer)
        .map_err(TlsError::Generate)?;

    // Catch a CA key that does not belong to the CA certificate (or a subject
    // we re-encoded differently) now rather than at the first connection.
    check_signed_by(node_cert.der(), &ca_cert)?;

    let ca_cert_pem = pem_encode_certificate(&ca_cert);
    Ok(format!(
        "{}{}{}",
        node_cert.pem(),
        node_key.serialize_pem(),
        ca_cert_pem
    ))
}

/// Verifies that `node` chains to `ca` alone, as a peer would.
fn check_signed_by(
    node: &CertificateDer<'_>,
    ca: &CertificateDer<'static>,
) -> Result<(), TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let roots = Arc::new(root_store(std::slice::from_ref(ca))?);
    let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider)
        .build()
        .map_err(TlsError::Verifier)?;
    verifier
        .verify_client_cert(node, &[], UnixTime::now())
        .map_err(TlsError::CaMismatch)?;
    Ok(())
}

/// Re-encodes a certificate as PEM so the output does not depend on how the
/// caller's CA PEM was formatted.
fn pem_encode_certificate(cert: &CertificateDer<'_>) -> String {
    let config = ::pem::EncodeConfig::new().set_line_ending(::pem::LineEnding::LF);
    ::pem::encode_config(&::pem::Pem::new("CERTIFICATE", cert.to_vec()), config)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, duplex};

    /// Runs both handshakes concurrently over an in-memory pipe.
    async fn handshake(
        client: &TlsConfig,
        server: &TlsConfig,
    ) -> (
        io::Result<TlsStream<tokio::io::DuplexStream>>,
        io::Result<TlsStream<tokio::io::DuplexStream>>,
    ) {
        let (a, b) = duplex(64 * 1024);
        tokio::join!(client.start(a, Role::Client), server.start(b, Role::Server))
    }

    /// Removes every PEM section whose label contains `label`.
    fn strip_sections(pem: &str, label: &str) -> String {
        let mut out = String::new();
        let mut skipping = false;
        for line in pem.lines() {
            if line.starts_with("-----BEGIN ") && line.contains(label) {
                skipping = true;
            }
            if !skipping {
                out.push_str(line);
                out.push('\n');
            }
            if line.starts_with("-----END ") && line.contains(label) {
                skipping = false;
            }
        }
        out
    }

    async fn exchange(
        mut client: TlsStream<tokio::io::DuplexStream>,
        mut server: TlsStream<tokio::io::DuplexStream>,
    ) {
        client.write_all(b"ping from client").await.unwrap();
        client.flush().await.unwrap();
        let mut buf = [0u8; 16];
        server.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"ping from client");

        server.write_all(b"pong from server").await.unwrap();
        server.flush().await.unwrap();
        client.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"pong from server");
    }

    #[test]
    fn network_pem_is_the_references_layout() {
        let pem = generate_network_pem().unwrap();
        let labels: Vec<&str> = pem
            .lines()
            .filter(|l| l.starts_with("-----BEGIN "))
            .collect();
        assert_eq!(
            labels,
            ["-----BEGIN CERTIFICATE-----", "-----BEGIN PRIVATE KEY-----"]
        );
        let der = CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
        let (_, cert) =
            <x509_parser::certificate::X509Certificate as x509_parser::prelude::FromDer<_>>::from_der(&der)
                .unwrap();
        assert_eq!(cert.subject().to_string(), "CN=AnyEvent::MP");
        assert_eq!(cert.issuer(), cert.subject());
        assert!(cert.is_ca());
        let validity = cert.validity();
        assert_eq!(
            validity.not_after.timestamp() - validity.not_before.timestamp(),
            3650 * 24 * 60 * 60
        );
        let now = OffsetDateTime::now_utc().unix_timestamp();
        assert!((validity.not_before.timestamp() - now).abs() < 60);

        // The CA certificate is re-encoded from DER; rcgen's PEM must survive.
        let (ca_cert, ca_key) = generate_ca().unwrap();
        assert!(
            generate_node_pem(&ca_cert, &ca_key)
                .unwrap()
                .ends_with(&ca_cert)
        );
    }

    const BAD_SIGNATURE: rustls::Error =
        rustls::Error::InvalidCertificate(rustls::CertificateError::BadSignature);

    /// The rustls error inside a failed handshake's I/O error.
    fn rustls_error(err: &io::Error) -> Option<&rustls::Error> {
        err.get_ref().and_then(|e| e.downcast_ref())
    }

    /// A peer presenting the network's certificate without its key (here
    /// with another key) cannot sign the handshake, in either role.
    #[tokio::test]
    async fn network_certificate_with_another_key_is_refused() {
        let pem = generate_network_pem().unwrap();
        let ours = TlsConfig::from_pem(pem.as_bytes()).unwrap();
        let certs = vec![CertificateDer::from_pem_slice(pem.as_bytes()).unwrap()];
        let other_pem = generate_network_pem().unwrap();
        let other_key = PrivateKeyDer::from_pem_slice(other_pem.as_bytes()).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let signer = provider.key_provider.load_private_key(other_key).unwrap();
        let impostor_key = Arc::new(rustls::sign::SingleCertAndKey::from(
            rustls::sign::CertifiedKey::new(certs.clone(), signer),
        ));
        let trust = Arc::new(PeerTrust::new(&certs, &provider).unwrap());
        let impostor = TlsConfig {
            client: Arc::new(
                ClientConfig::builder_with_provider(provider.clone())
                    .with_safe_default_protocol_versions()
                    .unwrap()
                    .dangerous()
                    .with_custom_certificate_verifier(trust.clone())
                    .with_client_cert_resolver(impostor_key.clone()),
            ),
            server: Arc::new(
                ServerConfig::builder_with_provider(provider)
                    .with_safe_default_protocol_versions()
                    .unwrap()
                    .with_client_cert_verifier(trust)
                    .with_cert_resolver(impostor_key),
            ),
        };

        let (c, s) = handshake(&ours, &impostor).await;
        let err = c.expect_err("client must refuse the impostor server");
        assert_eq!(rustls_error(&err), Some(&BAD_SIGNATURE), "{err}");
        drop(s);
        let (c, s) = handshake(&impostor, &ours).await;
        let err = s.expect_err("server must refuse the impostor client");
        assert_eq!(rustls_error(&err), Some(&BAD_SIGNATURE), "{err}");
        drop(c);
    }

    #[tokio::test]
    async fn same_network_pem_handshakes_and_exchanges() {
        let pem = generate_network_pem().unwrap();
        let a = TlsConfig::from_pem(pem.as_bytes()).unwrap();
        let b = TlsConfig::from_pem(pem.as_bytes()).unwrap();
        let (c, s) = handshake(&a, &b).await;
        let (c, s) = (c.expect("client handshake"), s.expect("server handshake"));
        assert!(matches!(c, TlsStream::Client(_)));
        assert!(matches!(s, TlsStream::Server(_)));
        exchange(c, s).await;
    }

    #[tokio::test]
    async fn different_nodes_of_one_ca_handshake_in_both_roles() {
        let (ca_cert, ca_key) = generate_ca().unwrap();
        let a =
            TlsConfig::from_pem(generate_node_pem(&ca_cert, &ca_key).unwrap().as_bytes()).unwrap();
        let b =
            TlsConfig::from_pem(generate_node_pem(&ca_cert, &ca_key).unwrap().as_bytes()).unwrap();
        for (client, server) in [(&a, &b), (&b, &a)] {
            let (c, s) = handshake(client, server).await;
            exchange(c.expect("client handshake"), s.expect("server handshake")).await;
        }
    }

    #[tokio::test]
    async fn node_of_other_ca_is_refused() {
        let a = TlsConfig::from_pem(generate_network_pem().unwrap().as_bytes()).unwrap();
        let b = TlsConfig::from_pem(generate_network_pem().unwrap().as_bytes()).unwrap();
        for (client, server) in [(&a, &b), (&b, &a)] {
            let (c, s) = handshake(client, server).await;
            assert!(
                !(c.is_ok() && s.is_ok()),
                "handshake across networks must fail"
            );
            // The client checks the server's certificate first.
            assert!(c.is_err());
        }
    }

    #[tokio::test]
    async fn foreign_node_cert_with_our_ca_in_file_is_refused() {
        // A node that trusts our CA but whose own certificate is from another
        // CA must be refused by us, whichever role it plays.
        let (ca1_cert, ca1_key) = generate_ca().unwrap();
        let (ca2_cert, ca2_key) = generate_ca().unwrap();
        let ours = TlsConfig::from_pem(generate_node_pem(&ca1_cert, &ca1_key).unwrap().as_bytes())
            .unwrap();
        let foreign_pem = format!(
            "{}{}",
            generate_node_pem(&ca2_cert, &ca2_key).unwrap(),
            ca1_cert
        );
        let foreign = TlsConfig::from_pem(foreign_pem.as_bytes()).unwrap();

        let (c, s) = handshake(&foreign, &ours).await;
        assert!(s.is_err(), "server must refuse foreign client certificate");
        drop(c);
        let (c, s) = handshake(&ours, &foreign).await;
        assert!(c.is_err(), "client must refuse foreign server certificate");
        drop(s);
    }

    #[tokio::test]
    async fn client_without_certificate_is_refused() {
        let pem = generate_network_pem().unwrap();
        let server = TlsConfig::from_pem(pem.as_bytes()).unwrap();

        let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let trust = Arc::new(PeerTrust::new(&certs, &provider).unwrap());
        let config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(trust)
            .with_no_client_auth();
        let connector = TlsConnector::from(Arc::new(config));

        let (a, b) = duplex(64 * 1024);
        let name = ServerName::try_from(PLACEHOLDER_SERVER_NAME).unwrap();
        let (c, s) = tokio::join!(connector.connect(name, a), server.start(b, Role::Server));
        assert!(s.is_err(), "server must require a client certificate");
        drop(c);
    }

    #[test]
    fn from_pem_reports_missing_parts() {
        let pem = generate_network_pem().unwrap();

        let no_key = strip_sections(&pem, "PRIVATE KEY");
        let err = TlsConfig::from_pem(no_key.as_bytes()).unwrap_err();
        assert!(matches!(err, TlsError::NoPrivateKey), "{err}");
        assert_eq!(err.to_string(), "no private key in PEM");

        let no_cert = strip_sections(&pem, "CERTIFICATE");
        let err = TlsConfig::from_pem(no_cert.as_bytes()).unwrap_err();
        assert!(matches!(err, TlsError::NoCertificate), "{err}");
        assert_eq!(err.to_string(), "no certificate in PEM");

        let err = TlsConfig::from_pem(b"").unwrap_err();
        assert!(matches!(err, TlsError::NoCertificate), "{err}");
    }

    #[test]
    fn from_pem_rejects_garbage_certificate() {
        let pem = generate_network_pem().unwrap();
        let bad = format!("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n{pem}");
        let err = TlsConfig::from_pem(bad.as_bytes()).unwrap_err();
        assert!(
            err.to_string().starts_with("invalid certificate: "),
            "{err}"
        );
    }

    #[test]
    fn from_file_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("net.pem");

        let err = TlsConfig::from_file(&path).unwrap_err();
        assert!(
            err.to_string().contains(&path.display().to_string()),
            "{err}"
        );

        std::fs::write(&path, "not a pem").unwrap();
        let err = TlsConfig::from_file(&path).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains(&path.display().to_string()), "{msg}");
        assert!(msg.contains("no certificate in PEM"), "{msg}");

        std::fs::write(&path, generate_network_pem().unwrap()).unwrap();
        TlsConfig::from_file(&path).unwrap();
    }

    #[test]
    fn node_pem_needs_matching_ca_key() {
        let (ca1_cert, _) = generate_ca().unwrap();
        let (_, ca2_key) = generate_ca().unwrap();
        let err = generate_node_pem(&ca1_cert, &ca2_key).unwrap_err();
        assert!(matches!(err, TlsError::CaMismatch(_)), "{err}");
    }
}
