//! The gateway's SVID from the mesh CA: Istio's `IstioCertificateService/CreateCertificate`
//! on istiod's 15012 (or any Istio-compatible CA), as pilot-agent and ztunnel call it.
//!
//! The key is a P-256 key made in memory and never written anywhere; the CSR's only SAN is
//! the gateway's SPIFFE ID. The answer is checked before use — it chains to the mesh root,
//! its leaf carries exactly the identity asked for, it is valid now — and a bad answer is
//! refused and retried while the certificate held keeps serving. Renewal comes at half the
//! lifetime, with jitter so a fleet does not renew together, and failures back off.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use prometheus::{IntCounterVec, Opts};
use rcgen::{CertificateParams, DistinguishedName, KeyPair, PKCS_ECDSA_P256_SHA256, SanType};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, UnixTime};
use tonic::codegen::http::uri::PathAndQuery;

use crate::model::MeshCa;
use crate::proxy::Shared;
use crate::tls::certs::{Identity, cert_not_after, peer_spiffe_id};
use crate::xds::connect;

/// `istio.v1.auth.IstioCertificateRequest` (istio/api `security/v1alpha1/ca.proto`).
#[derive(Clone, PartialEq, prost::Message)]
pub struct IstioCertificateRequest {
    #[prost(string, tag = "1")]
    pub csr: String,
    #[prost(int64, tag = "3")]
    pub validity_duration: i64,
    #[prost(message, optional, tag = "4")]
    pub metadata: Option<envoy_types::pb::google::protobuf::Struct>,
}

/// `istio.v1.auth.IstioCertificateResponse`: PEM certificates, leaf first, root last.
#[derive(Clone, PartialEq, prost::Message)]
pub struct IstioCertificateResponse {
    #[prost(string, repeated, tag = "1")]
    pub cert_chain: Vec<String>,
}

pub const CREATE_CERTIFICATE: &str = "/istio.v1.auth.IstioCertificateService/CreateCertificate";

const RETRY_FIRST: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(60);

/// Why a certificate was not obtained; one metric label each.
#[derive(Debug, thiserror::Error)]
pub enum SvidError {
    #[error("{0}")]
    Connect(#[from] connect::ConnectError),
    #[error("the CA refused the request: {0}")]
    Refused(String),
    #[error("the CA's answer cannot be used: {0}")]
    BadAnswer(String),
    #[error("the CA's certificate does not chain to the mesh root: {0}")]
    Untrusted(String),
    #[error("the CA issued {got} where {want} was asked for")]
    WrongIdentity { got: String, want: String },
    #[error("the CA's certificate is not valid now: {0}")]
    NotValidNow(String),
    #[error("cannot make a key or CSR: {0}")]
    Csr(String),
}

impl SvidError {
    pub fn reason(&self) -> &'static str {
        match self {
            SvidError::Connect(e) => e.reason(),
            SvidError::Refused(_) => "refused",
            SvidError::BadAnswer(_) => "bad_answer",
            SvidError::Untrusted(_) => "untrusted_chain",
            SvidError::WrongIdentity { .. } => "wrong_identity",
            SvidError::NotValidNow(_) => "not_valid_now",
            SvidError::Csr(_) => "csr",
        }
    }
}

/// `strait_ca_failures_total{reason}`.
pub fn failures_metric(r: &prometheus::Registry) -> IntCounterVec {
    // A fixed, valid name and label: construction cannot fail.
    let c = IntCounterVec::new(
        Opts::new(
            "strait_ca_failures_total",
            "Certificate requests to the mesh CA that failed or whose answer was refused, by reason",
        ),
        &["reason"],
    )
    .expect("valid metric");
    if let Err(e) = r.register(Box::new(c.clone())) {
        tracing::error!("cannot register strait_ca_failures_total: {e}");
    }
    c
}

/// One request: a fresh key and CSR, the call, the checks.
pub async fn request(ca: &MeshCa) -> Result<Identity, SvidError> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
        .map_err(|e| SvidError::Csr(e.to_string()))?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names =
        vec![SanType::URI(ca.identity.clone().try_into().map_err(
            |e| SvidError::Csr(format!("{}: {e}", ca.identity)),
        )?)];
    let csr = params
        .serialize_request(&key)
        .and_then(|r| r.pem())
        .map_err(|e| SvidError::Csr(e.to_string()))?;
    let channel = connect::channel(&ca.server).await?;
    let headers = connect::headers(&ca.server)?;
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|e| SvidError::Refused(format!("not ready: {e}")))?;
    let mut req = tonic::Request::new(IstioCertificateRequest {
        csr,
        // 0: the CA's own default lifetime.
        validity_duration: ca.ttl.map_or(0, |t| t.as_secs() as i64),
        metadata: None,
    });
    for (k, v) in headers {
        req.metadata_mut().insert(k, v);
    }
    let codec =
        tonic_prost::ProstCodec::<IstioCertificateRequest, IstioCertificateResponse>::default();
    let answer = grpc
        .unary(req, PathAndQuery::from_static(CREATE_CERTIFICATE), codec)
        .await
        .map_err(|s| SvidError::Refused(format!("{:?}: {}", s.code(), s.message())))?
        .into_inner();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    check(ca, answer, key)
}

/// The checks an answer must pass: a leaf and its chain in PEM, chaining to the mesh root
/// of `ca.server.root_cert`, carrying exactly `ca.identity`, valid now.
pub fn check(
    ca: &MeshCa,
    answer: IstioCertificateResponse,
    key: PrivateKeyDer<'static>,
) -> Result<Identity, SvidError> {
    let mut chain: Vec<CertificateDer<'static>> = Vec::new();
    for pem in &answer.cert_chain {
        for cert in rustls_pemfile::certs(&mut pem.as_bytes()) {
            chain.push(cert.map_err(|e| SvidError::BadAnswer(format!("not PEM: {e}")))?);
        }
    }
    if chain.is_empty() {
        return Err(SvidError::BadAnswer("no certificate in cert_chain".into()));
    }
    let roots = crate::tls::certs::read_certs(&ca.server.root_cert)
        .map_err(|e| SvidError::Untrusted(e.to_string()))?;
    // The answer ends with the CA's root (istiod's does); it must be one of the roots
    // the file gives, or the two sources of the mesh root disagree.
    if let Some(last) = chain.get(1..).and_then(<[_]>::last)
        && is_self_issued_ca(last)
        && !roots.contains(last)
    {
        return Err(SvidError::Untrusted(format!(
            "the root the CA returned (last in its chain, {}) is not a root of {}",
            subject_of(last),
            ca.server.root_cert.display()
        )));
    }
    // Trust comes from the configured root only.
    let intermediates: Vec<CertificateDer<'static>> = chain[1..]
        .iter()
        .filter(|c| !roots.contains(c))
        .cloned()
        .collect();
    let leaf = chain[0].clone();
    let id = peer_spiffe_id(&leaf).map_err(|e| SvidError::WrongIdentity {
        got: e.to_string(),
        want: ca.identity.clone(),
    })?;
    if id.as_str() != ca.identity {
        return Err(SvidError::WrongIdentity {
            got: id.as_str().to_string(),
            want: ca.identity.clone(),
        });
    }
    let mut store = rustls::RootCertStore::empty();
    for r in &roots {
        store
            .add(r.clone())
            .map_err(|e| SvidError::Untrusted(format!("mesh root: {e}")))?;
    }
    let provider = crate::tls::provider::provider();
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(store), provider)
            .build()
            .map_err(|e| SvidError::Untrusted(e.to_string()))?;
    match verifier.verify_client_cert(&leaf, &intermediates, UnixTime::now()) {
        Ok(_) => {}
        Err(rustls::Error::InvalidCertificate(
            e @ (rustls::CertificateError::Expired
            | rustls::CertificateError::ExpiredContext { .. }
            | rustls::CertificateError::NotValidYet
            | rustls::CertificateError::NotValidYetContext { .. }),
        )) => return Err(SvidError::NotValidNow(format!("{e:?}"))),
        Err(e) => return Err(SvidError::Untrusted(e.to_string())),
    }
    let not_after = cert_not_after(&leaf).map_err(|e| SvidError::BadAnswer(e.to_string()))?;
    let mut full = vec![leaf];
    full.extend(intermediates);
    Ok(Identity {
        chain: full,
        key,
        roots,
        spiffe_id: Some(id),
        not_after,
    })
}

/// A root: a CA certificate whose issuer is its own subject. (An answer that ends with
/// an intermediate instead carries no root to compare.)
fn is_self_issued_ca(cert: &CertificateDer<'_>) -> bool {
    x509_parser::parse_x509_certificate(cert.as_ref())
        .is_ok_and(|(_, x)| x.subject() == x.issuer() && x.is_ca())
}

fn subject_of(cert: &CertificateDer<'_>) -> String {
    x509_parser::parse_x509_certificate(cert.as_ref())
        .map(|(_, x)| format!("subject {}", x.subject()))
        .unwrap_or_else(|_| "unparsable".into())
}

/// When to renew a certificate valid from `issued` to `not_after`: at half its lifetime,
/// moved by up to a tenth of the lifetime either way.
pub fn renew_at(issued: SystemTime, not_after: SystemTime) -> SystemTime {
    let life = not_after.duration_since(issued).unwrap_or_default();
    let jitter = life.mul_f64(0.1 * (fastrand::f64() * 2.0 - 1.0).abs());
    let half = life / 2;
    if fastrand::bool() {
        issued + half + jitter
    } else {
        issued + half - jitter.min(half)
    }
}

/// Keeps a valid SVID in `shared.svid`, calling `installed` after each new one, until the
/// process ends.
pub async fn run(
    shared: Arc<Shared>,
    ca: MeshCa,
    failures: IntCounterVec,
    installed: impl Fn(&Shared) + Send + 'static,
) {
    let mut retry = RETRY_FIRST;
    tracing::info!(ca = %ca.server.address, identity = %ca.identity, "asking the mesh CA for the gateway's certificate");
    loop {
        let issued = SystemTime::now();
        let wait = match request(&ca).await {
            Ok(identity) => {
                let not_after = identity.not_after;
                tracing::info!(
                    identity = %ca.identity,
                    expires_in = ?not_after.duration_since(SystemTime::now()).unwrap_or_default(),
                    "certificate from the mesh CA installed"
                );
                shared.svid.store(Some(Arc::new(identity)));
                installed(&shared);
                retry = RETRY_FIRST;
                renew_at(issued, not_after)
                    .duration_since(SystemTime::now())
                    .unwrap_or_default()
                    .max(Duration::from_secs(1))
            }
            Err(e) => {
                failures.with_label_values(&[e.reason()]).inc();
                let held = shared.svid.load_full();
                let left = held
                    .as_ref()
                    .and_then(|h| h.not_after.duration_since(SystemTime::now()).ok());
                let wait = crate::xds::jitter(retry);
                retry = (retry * 2).min(RETRY_MAX);
                match left {
                    Some(left) => tracing::error!(
                        retry_in = ?wait,
                        held_expires_in = ?left,
                        "mesh CA: {e}; the certificate held keeps serving"
                    ),
                    None => tracing::error!(
                        retry_in = ?wait,
                        "mesh CA: {e}; no certificate held: ISTIO_MUTUAL servers and Bridges cannot serve"
                    ),
                }
                if held.is_some() && left.is_none() {
                    // Expired while the CA was failing: stop using it.
                    shared.svid.store(None);
                    installed(&shared);
                }
                wait
            }
        };
        tokio::time::sleep(wait).await;
    }
}
