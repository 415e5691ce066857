//! SPIFFE-aware mTLS for ISTIO_MUTUAL and the bridge: rustls server and client
//! configurations whose verifiers check the chain with webpki and then the peer's
//! SPIFFE ID, and the mapping of a refused handshake to one reason.
//!
//! Trust works per trust domain, as SPIFFE federation prescribes: a peer's certificate
//! names its trust domain; the mesh's own domain and its aliases validate against the
//! mesh roots, a federated domain validates against exactly its own bundle, and any other
//! domain is refused. So a federated root can never vouch for a mesh identity, nor the
//! mesh root for a federated one.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, Error, OtherError, RootCertStore,
    SignatureScheme,
};

use super::certs::{CertError, Identity, PeerIdError, peer_spiffe_id};
use super::spiffe::SpiffeId;

/// Which trust domains a mesh endpoint accepts, and with which anchors.
#[derive(Debug, Clone, Default)]
pub struct TrustConfig {
    /// The mesh's own trust domain (`meshConfig.trustDomain`), validated against the
    /// identity's roots.
    pub trust_domain: String,
    /// Other names of the same mesh (`trustDomainAliases`), also validated against the
    /// identity's roots.
    pub aliases: Vec<String>,
    /// Federated trust domains, each validated only against its own bundle.
    pub federated: BTreeMap<String, Vec<CertificateDer<'static>>>,
}

impl TrustConfig {
    /// Whether `trust_domain` is the mesh's own, under its name or an alias.
    pub fn is_mesh_domain(&self, trust_domain: &str) -> bool {
        self.trust_domain == trust_domain || self.aliases.iter().any(|a| a == trust_domain)
    }

    fn describe(&self) -> String {
        let mut s = self.trust_domain.clone();
        if !self.aliases.is_empty() {
            s += &format!(" (or aliases [{}])", self.aliases.join(", "));
        }
        if !self.federated.is_empty() {
            let names: Vec<&str> = self.federated.keys().map(String::as_str).collect();
            s += &format!(" (or federated [{}])", names.join(", "));
        }
        s
    }
}

/// Why a handshake was refused; one metric label each.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Refusal {
    /// The client sent no certificate where one is required.
    NoClientCert,
    /// The chain does not lead to the trust anchors of the peer's trust domain.
    UntrustedChain,
    /// A certificate in the chain is expired or not yet valid.
    Expired,
    /// The leaf does not carry exactly one valid SPIFFE ID.
    BadSpiffeId,
    /// The peer's trust domain is neither the mesh's, an alias, nor federated.
    UntrustedTrustDomain,
    /// The peer's SPIFFE ID is not the one expected.
    IdentityMismatch,
    /// The client offered nothing the server accepts (protocol version, cipher suites,
    /// key exchange groups): e.g. TLS 1.2 to a TLS 1.3-only listener.
    Incompatible,
    /// None of the client's ALPN protocols is one the listener serves.
    NoApplicationProtocol,
    /// Anything else: I/O, protocol errors, alerts from the peer.
    Other,
}

impl Refusal {
    /// The snake_case label used in metrics and access logs.
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::NoClientCert => "no_client_cert",
            Refusal::UntrustedChain => "untrusted_chain",
            Refusal::Expired => "expired",
            Refusal::BadSpiffeId => "bad_spiffe_id",
            Refusal::UntrustedTrustDomain => "untrusted_trust_domain",
            Refusal::IdentityMismatch => "identity_mismatch",
            Refusal::Incompatible => "incompatible",
            Refusal::NoApplicationProtocol => "no_application_protocol",
            Refusal::Other => "other",
        }
    }

    /// The reason a rustls error stands for.
    pub fn from_rustls(err: &Error) -> Refusal {
        use CertificateError as C;
        match err {
            Error::NoCertificatesPresented => Refusal::NoClientCert,
            Error::PeerIncompatible(_) => Refusal::Incompatible,
            Error::NoApplicationProtocol => Refusal::NoApplicationProtocol,
            Error::InvalidCertificate(cert_err) => match cert_err {
                C::Expired
                | C::ExpiredContext { .. }
                | C::NotValidYet
                | C::NotValidYetContext { .. } => Refusal::Expired,
                C::Other(OtherError(inner)) => match inner.downcast_ref::<PeerRejection>() {
                    Some(rejection) => rejection.refusal(),
                    None => Refusal::Other,
                },
                C::UnknownIssuer
                | C::BadSignature
                | C::UnsupportedSignatureAlgorithmContext { .. }
                | C::UnsupportedSignatureAlgorithmForPublicKeyContext { .. }
                | C::UnknownRevocationStatus
                | C::BadEncoding
                | C::InvalidPurpose
                | C::InvalidPurposeContext { .. }
                | C::Revoked
                | C::UnhandledCriticalExtension
                | C::NotValidForName
                | C::NotValidForNameContext { .. } => Refusal::UntrustedChain,
                _ => Refusal::Other,
            },
            _ => Refusal::Other,
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.reason())
    }
}

/// Maps the `io::Error` from a tokio-rustls accept or connect to a reason.
pub fn classify_handshake_error(err: &std::io::Error) -> Refusal {
    rustls_error(err).map_or(Refusal::Other, Refusal::from_rustls)
}

/// A one-line account of a failed handshake for logs: for a SPIFFE refusal, what the
/// peer presented and what was expected; otherwise the error as rustls or the OS says it.
pub fn handshake_error_detail(err: &std::io::Error) -> String {
    match rustls_error(err) {
        Some(Error::InvalidCertificate(CertificateError::Other(OtherError(inner)))) => {
            match inner.downcast_ref::<PeerRejection>() {
                Some(rejection) => rejection.to_string(),
                None => inner.to_string(),
            }
        }
        Some(rustls_err) => rustls_err.to_string(),
        None => err.to_string(),
    }
}

fn rustls_error(err: &std::io::Error) -> Option<&Error> {
    err.get_ref()?.downcast_ref::<Error>()
}

/// A peer refused on its SPIFFE identity, after or instead of the chain check. Carried
/// through rustls as `CertificateError::Other` so the handshake error says exactly what
/// was presented and what was expected.
#[derive(thiserror::Error)]
pub enum PeerRejection {
    #[error(transparent)]
    BadSpiffeId(#[from] PeerIdError),
    #[error("peer presented {presented}; trust domain {expected} expected")]
    UntrustedTrustDomain {
        presented: SpiffeId,
        expected: String,
    },
    #[error("peer presented {presented}; {expected} expected")]
    IdentityMismatch {
        presented: SpiffeId,
        expected: SpiffeId,
    },
}

/// rustls prints a `CertificateError::Other` with `Debug`; printing the message there
/// keeps handshake errors readable wherever they end up.
impl fmt::Debug for PeerRejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl PeerRejection {
    fn refusal(&self) -> Refusal {
        match self {
            PeerRejection::BadSpiffeId(_) => Refusal::BadSpiffeId,
            PeerRejection::UntrustedTrustDomain { .. } => Refusal::UntrustedTrustDomain,
            PeerRejection::IdentityMismatch { .. } => Refusal::IdentityMismatch,
        }
    }
}

impl From<PeerRejection> for Error {
    fn from(rejection: PeerRejection) -> Error {
        Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(rejection))))
    }
}

/// A server configuration for ISTIO_MUTUAL termination: presents `id`'s SVID and
/// requires a client certificate trusted under `trust`.
///
/// Every server configuration (ISTIO_MUTUAL and HBONE) seals its TLS 1.3 sessions into
/// stateless tickets under a key of its own ([`super::provider::ticketer`]).
pub fn server_config(
    id: &Identity,
    trust: &TrustConfig,
    alpn: &[&[u8]],
) -> Result<Arc<rustls::ServerConfig>, CertError> {
    server_config_with(id, trust, alpn, ClientAuth::Required)
}

/// Whether an ISTIO_MUTUAL server insists on a client certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    /// PeerAuthentication STRICT (and the default): no certificate, no connection.
    Required,
    /// PeerAuthentication PERMISSIVE: a client without a certificate is let through
    /// with no identity (so only policies that do not name a source can allow it); a
    /// certificate that is presented must still verify.
    Optional,
}

/// Like [`server_config`], with the client-certificate requirement chosen.
pub fn server_config_with(
    id: &Identity,
    trust: &TrustConfig,
    alpn: &[&[u8]],
    client_auth: ClientAuth,
) -> Result<Arc<rustls::ServerConfig>, CertError> {
    server_config_versions(id, trust, alpn, client_auth, rustls::DEFAULT_VERSIONS)
}

/// The server configuration of an ambient (HBONE) listener, as a source ztunnel expects
/// it and as Istio's `connect_terminate` listener is set: TLS 1.3 only, ALPN `h2` only,
/// a client certificate always required and checked as for ISTIO_MUTUAL.
pub fn hbone_server_config(
    id: &Identity,
    trust: &TrustConfig,
) -> Result<Arc<rustls::ServerConfig>, CertError> {
    server_config_versions(
        id,
        trust,
        &[b"h2"],
        ClientAuth::Required,
        &[&rustls::version::TLS13],
    )
}

fn server_config_versions(
    id: &Identity,
    trust: &TrustConfig,
    alpn: &[&[u8]],
    client_auth: ClientAuth,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> Result<Arc<rustls::ServerConfig>, CertError> {
    let provider = super::provider::server_provider();
    let mut verifier = SpiffeClientVerifier::new(id, trust, &provider)?;
    verifier.mandatory = client_auth == ClientAuth::Required;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)?
        .with_client_cert_verifier(Arc::new(verifier))
        .with_single_cert(id.chain.clone(), id.key.clone_key())?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    config.ticketer = super::provider::ticketer()?;
    Ok(Arc::new(config))
}

/// A client configuration for the bridge and ISTIO_MUTUAL origination: presents `id`'s
/// SVID and accepts a server trusted under `trust` whose SPIFFE ID is `expected_peer`
/// when given.
///
/// The server name is not checked against the certificate: the SNI sent is an Istio
/// subset key (`outbound_.9080_._.reviews…`), not the server's name, and the SPIFFE ID
/// is the identity that matters.
///
/// Each configuration keeps its own TLS 1.3 tickets ([`super::resume::TicketStore`]):
/// sessions are resumed only with the identities (this SVID, this expected peer) that
/// made them.
pub fn client_config(
    id: &Identity,
    trust: &TrustConfig,
    expected_peer: Option<&SpiffeId>,
    alpn: &[&[u8]],
) -> Result<Arc<rustls::ClientConfig>, CertError> {
    let provider = super::provider::client_provider();
    let verifier = SpiffeServerVerifier::new(id, trust, expected_peer, &provider)?;
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_auth_cert(id.chain.clone(), id.key.clone_key())?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    config.resumption =
        rustls::client::Resumption::store(Arc::new(super::resume::TicketStore::new()));
    Ok(Arc::new(config))
}

/// Trust anchors per trust domain: the mesh's (shared by its aliases) and each
/// federated domain's.
#[derive(Debug)]
struct Anchors<T> {
    /// The mesh's domain and aliases, with federated bundles left out (they live in
    /// `federated`, already built).
    mesh_domains: TrustConfig,
    /// What the peer's trust domain should have been, for refusals.
    accepted: String,
    mesh: T,
    federated: BTreeMap<String, T>,
}

impl<T> Anchors<T> {
    fn new(
        id: &Identity,
        trust: &TrustConfig,
        build: impl Fn(Arc<RootCertStore>) -> Result<T, String>,
    ) -> Result<Anchors<T>, CertError> {
        let build_for = |certs: &[CertificateDer<'static>], what: &str| {
            let store = root_store(certs, what)?;
            build(store).map_err(|reason| trust_err(what, reason))
        };
        let mesh = build_for(&id.roots, "mesh roots (root-cert.pem)")?;
        let mut federated = BTreeMap::new();
        for (domain, bundle) in &trust.federated {
            let what = format!("trust bundle of federated domain {domain}");
            federated.insert(domain.clone(), build_for(bundle, &what)?);
        }
        Ok(Anchors {
            mesh_domains: TrustConfig {
                trust_domain: trust.trust_domain.clone(),
                aliases: trust.aliases.clone(),
                federated: BTreeMap::new(),
            },
            accepted: trust.describe(),
            mesh,
            federated,
        })
    }

    /// The anchors for the peer's trust domain, after reading the peer's SPIFFE ID. The
    /// mesh domain and aliases win over a federated entry of the same name.
    ///
    /// The ID is read before the chain is verified only to choose the anchors (SPIFFE's
    /// "bundle of the SVID's trust domain"); the caller trusts it only once the chain
    /// verifies against them.
    fn for_peer(&self, end_entity: &CertificateDer<'_>) -> Result<(SpiffeId, &T), PeerRejection> {
        let id = peer_spiffe_id(end_entity)?;
        let domain = id.trust_domain();
        if self.mesh_domains.is_mesh_domain(domain) {
            return Ok((id, &self.mesh));
        }
        match self.federated.get(domain) {
            Some(anchors) => Ok((id, anchors)),
            None => Err(PeerRejection::UntrustedTrustDomain {
                presented: id,
                expected: self.accepted.clone(),
            }),
        }
    }
}

fn root_store(
    certs: &[CertificateDer<'static>],
    what: &str,
) -> Result<Arc<RootCertStore>, CertError> {
    if certs.is_empty() {
        return Err(trust_err(what, "no certificates".into()));
    }
    let mut store = RootCertStore::empty();
    for (i, cert) in certs.iter().enumerate() {
        store.add(cert.clone()).map_err(|e| {
            trust_err(
                what,
                format!("certificate #{} is not a usable trust anchor: {e}", i + 1),
            )
        })?;
    }
    Ok(Arc::new(store))
}

fn trust_err(what: &str, reason: String) -> CertError {
    CertError::Trust {
        what: what.to_owned(),
        reason,
    }
}

/// Verifies client certificates for a server: chain per trust domain, then SPIFFE ID.
#[derive(Debug)]
struct SpiffeClientVerifier {
    anchors: Anchors<Arc<dyn ClientCertVerifier>>,
    hints: Vec<DistinguishedName>,
    algorithms: WebPkiSupportedAlgorithms,
    mandatory: bool,
}

impl SpiffeClientVerifier {
    fn new(
        id: &Identity,
        trust: &TrustConfig,
        provider: &Arc<CryptoProvider>,
    ) -> Result<Self, CertError> {
        // The chain's signatures are remembered once they pass (`memo`'s text); the
        // CertificateVerify below goes to the provider's algorithms every time.
        let chain_provider = Arc::new(CryptoProvider {
            signature_verification_algorithms: super::memo::memoizing(
                provider.signature_verification_algorithms,
            ),
            ..(**provider).clone()
        });
        let anchors = Anchors::new(id, trust, |store| {
            WebPkiClientVerifier::builder_with_provider(store, chain_provider.clone())
                .build()
                .map_err(|e| e.to_string())
        })?;
        let hints = std::iter::once(&anchors.mesh)
            .chain(anchors.federated.values())
            .flat_map(|v| v.root_hint_subjects().iter().cloned())
            .collect();
        Ok(SpiffeClientVerifier {
            anchors,
            hints,
            algorithms: provider.signature_verification_algorithms,
            mandatory: true,
        })
    }
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &self.hints
    }

    fn client_auth_mandatory(&self) -> bool {
        self.mandatory
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        let (_, verifier) = self.anchors.for_peer(end_entity)?;
        verifier.verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// Verifies server certificates for a client: chain per trust domain, then SPIFFE ID
/// (and the expected one, when given) in place of the host name.
#[derive(Debug)]
struct SpiffeServerVerifier {
    anchors: Anchors<Arc<RootCertStore>>,
    expected: Option<SpiffeId>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl SpiffeServerVerifier {
    fn new(
        id: &Identity,
        trust: &TrustConfig,
        expected: Option<&SpiffeId>,
        provider: &Arc<CryptoProvider>,
    ) -> Result<Self, CertError> {
        Ok(SpiffeServerVerifier {
            anchors: Anchors::new(id, trust, Ok)?,
            expected: expected.cloned(),
            algorithms: provider.signature_verification_algorithms,
        })
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let (presented, roots) = self.anchors.for_peer(end_entity)?;
        let cert = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            roots,
            intermediates,
            now,
            self.algorithms.all,
        )?;
        match &self.expected {
            Some(expected) if *expected != presented => Err(PeerRejection::IdentityMismatch {
                presented,
                expected: expected.clone(),
            }
            .into()),
            _ => Ok(ServerCertVerified::assertion()),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn io_err(err: Error) -> std::io::Error {
        std::io::Error::new(std::io::ErrorKind::InvalidData, err)
    }

    #[test]
    fn reasons_are_distinct_snake_case() {
        let all = [
            Refusal::NoClientCert,
            Refusal::UntrustedChain,
            Refusal::Expired,
            Refusal::BadSpiffeId,
            Refusal::UntrustedTrustDomain,
            Refusal::IdentityMismatch,
            Refusal::Other,
        ];
        let labels: std::collections::BTreeSet<_> = all.iter().map(Refusal::reason).collect();
        assert_eq!(labels.len(), all.len());
        assert!(
            labels
                .iter()
                .all(|l| l.chars().all(|c| c.is_ascii_lowercase() || c == '_'))
        );
    }

    #[test]
    fn rustls_errors_are_classified() {
        let cases = [
            (Error::NoCertificatesPresented, Refusal::NoClientCert),
            (
                Error::InvalidCertificate(CertificateError::UnknownIssuer),
                Refusal::UntrustedChain,
            ),
            (
                Error::InvalidCertificate(CertificateError::Expired),
                Refusal::Expired,
            ),
            (
                Error::InvalidCertificate(CertificateError::NotValidYet),
                Refusal::Expired,
            ),
            (PeerIdError::NoUriSan.into(), Refusal::BadSpiffeId),
            (
                Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(
                    std::fmt::Error,
                )))),
                Refusal::Other,
            ),
            (
                Error::AlertReceived(rustls::AlertDescription::BadCertificate),
                Refusal::Other,
            ),
        ];
        for (err, want) in cases {
            let shown = err.to_string();
            assert_eq!(classify_handshake_error(&io_err(err)), want, "{shown}");
        }
        let reset = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
        assert_eq!(classify_handshake_error(&reset), Refusal::Other);
    }

    #[test]
    fn rejections_say_presented_and_expected() {
        let trust = TrustConfig {
            trust_domain: "cluster.local".into(),
            aliases: vec!["old.local".into()],
            federated: BTreeMap::new(),
        };
        let err = PeerRejection::UntrustedTrustDomain {
            presented: SpiffeId::parse("spiffe://other.td/ns/x/sa/y").unwrap(),
            expected: trust.describe(),
        };
        let io = io_err(err.into());
        assert_eq!(
            handshake_error_detail(&io),
            "peer presented spiffe://other.td/ns/x/sa/y; \
             trust domain cluster.local (or aliases [old.local]) expected"
        );
        assert!(
            io.to_string()
                .contains("peer presented spiffe://other.td/ns/x/sa/y;"),
            "{io}"
        );
        let expired = io_err(Error::InvalidCertificate(CertificateError::Expired));
        assert_eq!(
            handshake_error_detail(&expired),
            "invalid peer certificate: Expired"
        );
    }

    impl From<PeerIdError> for Error {
        fn from(e: PeerIdError) -> Error {
            PeerRejection::from(e).into()
        }
    }
}
