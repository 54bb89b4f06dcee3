//! Whom a node trusts: the one decision both TLS roles make about the peer's
//! certificate, matching what OpenSSL decides for AnyEvent::MP.
//!
//! A peer certificate that is byte for byte one of the certificates of our
//! file is trusted while it is within its validity period, whatever its basic
//! constraints say: `aemp gencert` (like AnyEvent::MP's) makes one self-signed
//! CA:TRUE certificate that every node presents and trusts. Any other
//! certificate must chain to one of ours under webpki's rules (which refuse a
//! CA:TRUE or X.509 v1 end entity), without a host-name check. Handshake
//! signatures are always verified by rustls with the peer certificate's key.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::verify_server_cert_signed_by_trust_anchor;
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme,
};
use x509_parser::prelude::{FromDer, X509Certificate};

use super::TlsError;

/// Which side the peer plays, so a chained certificate is checked for the
/// matching extended key usage (as OpenSSL checks its purpose).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Peer {
    Server,
    Client,
}

/// The trust decision over the certificates of a node's file; serves as both
/// the server certificate verifier (we are the TLS client) and the client
/// certificate verifier (we are the TLS server).
#[derive(Debug)]
pub(super) struct PeerTrust {
    /// The file's certificates, compared byte for byte with the peer's.
    trusted: Vec<CertificateDer<'static>>,
    /// The same certificates as webpki trust anchors, for chains.
    roots: Arc<RootCertStore>,
    /// Their subjects, sent as acceptable CAs in the certificate request.
    subjects: Vec<DistinguishedName>,
    /// webpki's client-certificate chain check over `roots`.
    client_chains: Arc<dyn ClientCertVerifier>,
    /// The provider's signature algorithms, for chains and handshakes.
    algorithms: WebPkiSupportedAlgorithms,
}

impl PeerTrust {
    /// Trusts `certs` (the whole file), with `provider`'s algorithms.
    pub(super) fn new(
        certs: &[CertificateDer<'static>],
        provider: &Arc<CryptoProvider>,
    ) -> Result<PeerTrust, TlsError> {
        let roots = Arc::new(root_store(certs)?);
        // build() without allow_unauthenticated() makes the client
        // certificate mandatory, as AnyEvent::MP's verify_require_client_cert.
        let client_chains =
            WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
                .build()
                .map_err(TlsError::Verifier)?;
        Ok(PeerTrust {
            trusted: certs.to_vec(),
            subjects: roots.subjects(),
            roots,
            client_chains,
            algorithms: provider.signature_verification_algorithms,
        })
    }

    /// Whether the certificate a `peer` presented (with its chain) is trusted
    /// at `now`.
    fn verify(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        peer: Peer,
    ) -> Result<(), rustls::Error> {
        if self
            .trusted
            .iter()
            .any(|t| t.as_ref() == end_entity.as_ref())
        {
            return check_validity(end_entity, now);
        }
        refuse_foreign_self_issued_ca(end_entity)?;
        match peer {
            Peer::Server => verify_server_cert_signed_by_trust_anchor(
                &ParsedCertificate::try_from(end_entity)?,
                &self.roots,
                intermediates,
                now,
                self.algorithms.all,
            ),
            Peer::Client => self
                .client_chains
                .verify_client_cert(end_entity, intermediates, now)
                .map(|_| ()),
        }
    }

    /// Checks a TLS 1.2 handshake signature with the peer certificate's key,
    /// by rustls with the provider's algorithms.
    fn tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    /// Checks a TLS 1.3 handshake signature, as [`PeerTrust::tls12_signature`].
    fn tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }
}

/// Trust anchors from every certificate of the node's file, as the
/// reference passes the same file as cert and ca_cert.
pub(super) fn root_store(certs: &[CertificateDer<'static>]) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in certs {
        roots
            .add(cert.clone())
            .map_err(TlsError::InvalidCertificate)?;
    }
    Ok(roots)
}

/// Parses a certificate for the checks webpki does not do for us.
fn parse<'a>(cert: &'a CertificateDer<'_>) -> Result<X509Certificate<'a>, rustls::Error> {
    X509Certificate::from_der(cert.as_ref())
        .map(|(_, parsed)| parsed)
        .map_err(|_| CertificateError::BadEncoding.into())
}

/// Refuses a certificate outside notBefore..=notAfter at `now`, with
/// rustls' own errors so the message reads as for a chained certificate.
fn check_validity(cert: &CertificateDer<'_>, now: UnixTime) -> Result<(), rustls::Error> {
    let parsed = parse(cert)?;
    let validity = parsed.validity();
    let now_secs = i64::try_from(now.as_secs()).unwrap_or(i64::MAX);
    let not_before = validity.not_before.timestamp();
    let not_after = validity.not_after.timestamp();
    if now_secs < not_before {
        return Err(CertificateError::NotValidYetContext {
            time: now,
            not_before: unix_time(not_before),
        }
        .into());
    }
    if now_secs > not_after {
        return Err(CertificateError::ExpiredContext {
            time: now,
            not_after: unix_time(not_after),
        }
        .into());
    }
    Ok(())
}

/// A certificate timestamp for an error message (times before 1970 as 0).
fn unix_time(secs: i64) -> UnixTime {
    UnixTime::since_unix_epoch(std::time::Duration::from_secs(
        u64::try_from(secs).unwrap_or(0),
    ))
}

/// webpki refuses every CA:TRUE end entity with `CaUsedAsEndEntity`, which
/// for the usual case, another network's self-signed certificate, hides the
/// reason: it is not one of ours. Say so instead; the decision is the same.
/// A certificate x509-parser cannot read is left to webpki to judge.
fn refuse_foreign_self_issued_ca(cert: &CertificateDer<'_>) -> Result<(), rustls::Error> {
    match parse(cert) {
        Ok(parsed) if parsed.is_ca() && parsed.subject().as_raw() == parsed.issuer().as_raw() => {
            Err(CertificateError::UnknownIssuer.into())
        }
        _ => Ok(()),
    }
}

impl ServerCertVerifier for PeerTrust {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        // Nodes are named by node id, not by DNS: no name to check.
        _server_name: &ServerName<'_>,
        // AnyEvent::MP checks no revocation either.
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.verify(end_entity, intermediates, now, Peer::Server)
            .map(|()| ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }

    fn root_hint_subjects(&self) -> Option<&[DistinguishedName]> {
        Some(&self.subjects)
    }
}

impl ClientCertVerifier for PeerTrust {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &self.subjects
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.verify(end_entity, intermediates, now, Peer::Client)
            .map(|()| ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    use time::{Duration, OffsetDateTime};

    /// A certificate named `name`, CA:TRUE or not, valid from `from` to
    /// `until` days from now, signed by `issuer` or self-signed.
    fn cert(
        name: &str,
        ca: bool,
        from: i64,
        until: i64,
        issuer: Option<&Issuer<'_, KeyPair>>,
    ) -> (CertificateDer<'static>, KeyPair) {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = if ca {
            IsCa::Ca(BasicConstraints::Unconstrained)
        } else {
            IsCa::ExplicitNoCa
        };
        let now = OffsetDateTime::now_utc();
        params.not_before = now + Duration::days(from);
        params.not_after = now + Duration::days(until);
        let cert = match issuer {
            Some(issuer) => params.signed_by(&key, issuer).unwrap(),
            None => params.self_signed(&key).unwrap(),
        };
        (cert.der().clone(), key)
    }

    /// A valid self-signed CA:TRUE certificate and its issuer handle.
    fn ca(name: &str) -> (CertificateDer<'static>, Issuer<'static, KeyPair>) {
        let (der, key) = cert(name, true, -1, 30, None);
        let issuer = Issuer::from_ca_cert_der(&der, key).unwrap();
        (der, issuer)
    }

    fn trust(certs: &[CertificateDer<'static>]) -> PeerTrust {
        PeerTrust::new(certs, &Arc::new(rustls::crypto::ring::default_provider())).unwrap()
    }

    /// The decision for `cert` presented by a server and by a client; both
    /// must agree.
    fn decide(trust: &PeerTrust, cert: &CertificateDer<'_>) -> Result<(), rustls::Error> {
        let now = UnixTime::now();
        let as_server = trust.verify(cert, &[], now, Peer::Server);
        let as_client = trust.verify(cert, &[], now, Peer::Client);
        // OtherError never compares equal; compare what it says.
        assert_eq!(format!("{as_server:?}"), format!("{as_client:?}"));
        as_server
    }

    fn certificate_error(result: Result<(), rustls::Error>) -> CertificateError {
        match result {
            Err(rustls::Error::InvalidCertificate(e)) => e,
            other => panic!("expected a certificate error, got {other:?}"),
        }
    }

    #[test]
    fn own_ca_certificate_is_trusted() {
        let (network, _) = ca("AnyEvent::MP");
        decide(&trust(std::slice::from_ref(&network)), &network).unwrap();
    }

    #[test]
    fn any_certificate_of_the_file_is_trusted() {
        let (network, _) = ca("AnyEvent::MP");
        let (extra, _) = ca("extra CA");
        let (leaf, _) = cert("self-signed leaf", false, -1, 30, None);
        let trust = trust(&[network.clone(), extra.clone(), leaf.clone()]);
        for c in [&network, &extra, &leaf] {
            decide(&trust, c).unwrap();
        }
    }

    #[test]
    fn expired_own_certificate_is_refused() {
        let (expired, _) = cert("AnyEvent::MP", true, -30, -1, None);
        let e = certificate_error(decide(&trust(std::slice::from_ref(&expired)), &expired));
        assert!(matches!(e, CertificateError::ExpiredContext { .. }), "{e}");
    }

    #[test]
    fn not_yet_valid_own_certificate_is_refused() {
        let (early, _) = cert("AnyEvent::MP", true, 1, 30, None);
        let e = certificate_error(decide(&trust(std::slice::from_ref(&early)), &early));
        assert!(
            matches!(e, CertificateError::NotValidYetContext { .. }),
            "{e}"
        );
    }

    #[test]
    fn leaf_signed_by_a_certificate_of_the_file_is_trusted() {
        let (root, issuer) = ca("network CA");
        let (leaf, _) = cert("node", false, -1, 30, Some(&issuer));
        decide(&trust(&[root]), &leaf).unwrap();
    }

    #[test]
    fn leaf_through_an_intermediate_it_presents_is_trusted() {
        let (root, root_issuer) = ca("network CA");
        let (mid, mid_key) = cert("intermediate", true, -1, 30, Some(&root_issuer));
        let mid_issuer = Issuer::from_ca_cert_der(&mid, mid_key).unwrap();
        let (leaf, _) = cert("node", false, -1, 30, Some(&mid_issuer));
        let trust = trust(&[root]);
        let now = UnixTime::now();
        for peer in [Peer::Server, Peer::Client] {
            trust
                .verify(&leaf, std::slice::from_ref(&mid), now, peer)
                .unwrap();
            assert!(trust.verify(&leaf, &[], now, peer).is_err());
        }
    }

    #[test]
    fn expired_leaf_of_our_ca_is_refused() {
        let (root, issuer) = ca("network CA");
        let (leaf, _) = cert("node", false, -30, -1, Some(&issuer));
        let e = certificate_error(decide(&trust(&[root]), &leaf));
        assert!(matches!(e, CertificateError::ExpiredContext { .. }), "{e}");
    }

    #[test]
    fn another_networks_certificate_is_refused() {
        let (ours, _) = ca("AnyEvent::MP");
        let (theirs, _) = ca("AnyEvent::MP");
        let e = certificate_error(decide(&trust(&[ours]), &theirs));
        assert_eq!(e, CertificateError::UnknownIssuer);
    }

    #[test]
    fn leaf_of_another_ca_is_refused() {
        let (ours, _) = ca("network CA");
        let trust = trust(&[ours]);
        let (_, other_issuer) = ca("other CA");
        let (leaf, _) = cert("node", false, -1, 30, Some(&other_issuer));
        let e = certificate_error(decide(&trust, &leaf));
        assert_eq!(e, CertificateError::UnknownIssuer);
        // Another CA with our CA's name: found by name, refused by signature.
        let (_, namesake_issuer) = ca("network CA");
        let (leaf, _) = cert("node", false, -1, 30, Some(&namesake_issuer));
        let e = certificate_error(decide(&trust, &leaf));
        assert_eq!(e, CertificateError::BadSignature);
    }

    /// webpki's rule, where OpenSSL would accept: a CA certificate that is
    /// not itself in the file is no end entity, even when ours signed it.
    #[test]
    fn ca_certificate_signed_by_ours_but_not_in_the_file_is_refused() {
        let (root, issuer) = ca("network CA");
        let (sub, _) = cert("sub CA", true, -1, 30, Some(&issuer));
        assert!(decide(&trust(&[root]), &sub).is_err());
    }
}
