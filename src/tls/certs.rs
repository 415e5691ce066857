//! Certificate files and what is read out of certificates: a workload's identity
//! (Istio's `cert-chain.pem`, `key.pem`, `root-cert.pem`), trust bundles (PEM or SPIFFE
//! bundle JSON), a certificate's expiry and a peer's SPIFFE ID.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

use super::spiffe::{SpiffeId, SpiffeIdError};

/// Workload file names, as Istio mounts them in `/etc/certs`.
pub const CERT_CHAIN: &str = "cert-chain.pem";
pub const KEY: &str = "key.pem";
pub const ROOT_CERT: &str = "root-cert.pem";

/// What a workload presents and trusts: its SVID chain and key, and the mesh roots.
#[derive(Debug)]
pub struct Identity {
    /// Leaf first, then intermediates.
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    /// The mesh trust anchors (`root-cert.pem`).
    pub roots: Vec<CertificateDer<'static>>,
    /// The leaf's SPIFFE ID, when it carries exactly one valid one.
    pub spiffe_id: Option<SpiffeId>,
    /// When the leaf expires.
    pub not_after: SystemTime,
}

/// Why certificate files or a TLS configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("{}: {source}", .path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("{}: {reason}", .path.display())]
    File { path: PathBuf, reason: String },
    #[error("certificate is not valid X.509: {0}")]
    X509(String),
    #[error("{what}: {reason}")]
    Trust { what: String, reason: String },
    #[error("TLS configuration refused the identity: {0}")]
    Rustls(#[from] rustls::Error),
}

/// Why a peer certificate does not name a SPIFFE identity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeerIdError {
    #[error("peer certificate is not valid X.509: {0}")]
    Unparseable(String),
    #[error("peer certificate has no URI SAN; exactly one spiffe:// URI SAN is required")]
    NoUriSan,
    #[error("peer certificate has {0} URI SANs; exactly one spiffe:// URI SAN is required")]
    MultipleUriSans(usize),
    #[error("peer certificate URI SAN {uri:?} is not a SPIFFE ID: {error}")]
    Invalid { uri: String, error: SpiffeIdError },
}

/// Loads `cert-chain.pem`, `key.pem` and `root-cert.pem` from `dir`.
pub fn load_identity(dir: &Path) -> Result<Identity, CertError> {
    let chain = read_certs(&dir.join(CERT_CHAIN))?;
    let key = read_key(&dir.join(KEY))?;
    let roots = read_certs(&dir.join(ROOT_CERT))?;
    // `read_certs` never returns an empty list.
    let leaf = &chain[0];
    let not_after = cert_not_after(leaf).map_err(|e| CertError::File {
        path: dir.join(CERT_CHAIN),
        reason: e.to_string(),
    })?;
    Ok(Identity {
        spiffe_id: peer_spiffe_id(leaf).ok(),
        chain,
        key,
        roots,
        not_after,
    })
}

/// The certificate's notAfter, for `strait_cert_expiry_timestamp_seconds`.
pub fn cert_not_after(cert: &CertificateDer) -> Result<SystemTime, CertError> {
    let (_, x509) = X509Certificate::from_der(cert).map_err(|e| CertError::X509(e.to_string()))?;
    let secs = x509.validity().not_after.timestamp();
    let offset = Duration::from_secs(secs.unsigned_abs());
    let time = if secs >= 0 {
        UNIX_EPOCH.checked_add(offset)
    } else {
        UNIX_EPOCH.checked_sub(offset)
    };
    time.ok_or_else(|| CertError::X509(format!("notAfter {secs} is out of range")))
}

/// Whether a resumed session's peer chain is outside its validity period at `now`.
///
/// A full handshake checks every certificate's period as it verifies the chain; a resumed
/// one brings back the chain verified when the session was made, which a ticket can outlive
/// by hours. So a server checks the periods again on resumption: a session never outlives
/// a certificate it was made with. A certificate that cannot be read counts as outside.
pub fn resumed_chain_expired(chain: &[CertificateDer], now: SystemTime) -> bool {
    let Ok(since_epoch) = now.duration_since(UNIX_EPOCH) else {
        return true;
    };
    let now = since_epoch.as_secs() as i64;
    chain
        .iter()
        .any(|cert| match X509Certificate::from_der(cert) {
            Ok((_, x509)) => {
                let v = x509.validity();
                now < v.not_before.timestamp() || now > v.not_after.timestamp()
            }
            Err(_) => true,
        })
}

/// Whether `conn` resumed a session whose peer chain has left its validity period since
/// ([`resumed_chain_expired`]): such a connection is refused as `expired`, as its full
/// handshake would be.
pub fn resumed_past_validity(conn: &rustls::ServerConnection) -> bool {
    conn.handshake_kind() == Some(rustls::HandshakeKind::Resumed)
        && conn
            .peer_certificates()
            .is_some_and(|chain| resumed_chain_expired(chain, SystemTime::now()))
}

/// The SPIFFE ID of a peer's leaf certificate: exactly one URI SAN, a valid SPIFFE ID.
pub fn peer_spiffe_id(cert: &CertificateDer) -> Result<SpiffeId, PeerIdError> {
    let (_, x509) =
        X509Certificate::from_der(cert).map_err(|e| PeerIdError::Unparseable(e.to_string()))?;
    let san = x509
        .subject_alternative_name()
        .map_err(|e| PeerIdError::Unparseable(e.to_string()))?;
    let mut uris = san
        .into_iter()
        .flat_map(|ext| ext.value.general_names.iter())
        .filter_map(|name| match name {
            GeneralName::URI(uri) => Some(*uri),
            _ => None,
        });
    let uri = match (uris.next(), uris.count()) {
        (None, _) => return Err(PeerIdError::NoUriSan),
        (Some(uri), 0) => uri,
        (Some(_), more) => return Err(PeerIdError::MultipleUriSans(more + 1)),
    };
    SpiffeId::parse(uri).map_err(|error| PeerIdError::Invalid {
        uri: uri.to_owned(),
        error,
    })
}

/// Loads trust anchors from a PEM file or a SPIFFE trust bundle (JSON, `keys[]` with
/// `"use": "x509-svid"` and a one-element `x5c`).
pub fn load_trust_bundle(path: &Path) -> Result<Vec<CertificateDer<'static>>, CertError> {
    let bytes = fs::read(path).map_err(|source| CertError::Io {
        path: path.to_owned(),
        source,
    })?;
    let is_json = bytes.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{');
    let certs = if is_json {
        spiffe_bundle_certs(&bytes)
    } else {
        pem_certs(&bytes)
    }
    .map_err(|reason| CertError::File {
        path: path.to_owned(),
        reason,
    })?;
    if certs.is_empty() {
        return Err(CertError::File {
            path: path.to_owned(),
            reason: if is_json {
                "SPIFFE bundle has no x509-svid keys".into()
            } else {
                "no CERTIFICATE found (expected PEM or SPIFFE bundle JSON)".into()
            },
        });
    }
    Ok(certs)
}

fn spiffe_bundle_certs(bytes: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    let doc: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| format!("not valid JSON: {e}"))?;
    let keys = doc
        .get("keys")
        .and_then(|k| k.as_array())
        .ok_or("SPIFFE bundle has no \"keys\" array")?;
    let mut certs = Vec::new();
    for (i, key) in keys.iter().enumerate() {
        if key.get("use").and_then(|u| u.as_str()) != Some("x509-svid") {
            continue; // jwt-svid keys and others carry no X.509 authority
        }
        let x5c = match key.get("x5c").and_then(|x| x.as_array()) {
            Some(x5c) if x5c.len() == 1 => &x5c[0],
            _ => return Err(format!("keys[{i}]: x5c must hold exactly one certificate")),
        };
        let b64 = x5c
            .as_str()
            .ok_or_else(|| format!("keys[{i}]: x5c[0] is not a string"))?;
        let der = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .map_err(|e| format!("keys[{i}]: x5c[0] is not base64: {e}"))?;
        X509Certificate::from_der(&der)
            .map_err(|e| format!("keys[{i}]: x5c[0] is not an X.509 certificate: {e}"))?;
        certs.push(CertificateDer::from(der));
    }
    Ok(certs)
}

fn pem_certs(bytes: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    rustls_pemfile::certs(&mut &bytes[..])
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("not valid PEM: {e}"))
}

/// Reads a PEM file that must hold at least one certificate.
pub(crate) fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, CertError> {
    let bytes = read(path)?;
    let certs = pem_certs(&bytes).map_err(|reason| CertError::File {
        path: path.to_owned(),
        reason,
    })?;
    if certs.is_empty() {
        return Err(CertError::File {
            path: path.to_owned(),
            reason: "no certificate found".into(),
        });
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, CertError> {
    let bytes = read(path)?;
    let file_err = |reason: String| CertError::File {
        path: path.to_owned(),
        reason,
    };
    rustls_pemfile::private_key(&mut &bytes[..])
        .map_err(|e| file_err(format!("not valid PEM: {e}")))?
        .ok_or_else(|| file_err("no private key found".into()))
}

fn read(path: &Path) -> Result<Vec<u8>, CertError> {
    fs::read(path).map_err(|source| CertError::Io {
        path: path.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, KeyPair, SanType};

    fn cert_with_sans(sans: Vec<SanType>) -> CertificateDer<'static> {
        let mut params = CertificateParams::default();
        params.subject_alt_names = sans;
        let key = KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().clone()
    }

    fn uri(s: &str) -> SanType {
        SanType::URI(s.try_into().unwrap())
    }

    #[test]
    fn one_spiffe_uri_san_is_the_identity() {
        let cert = cert_with_sans(vec![
            SanType::DnsName("reviews".try_into().unwrap()),
            uri("spiffe://cluster.local/ns/default/sa/reviews"),
        ]);
        let id = peer_spiffe_id(&cert).unwrap();
        assert_eq!(id.as_str(), "spiffe://cluster.local/ns/default/sa/reviews");
    }

    #[test]
    fn uri_san_count_and_form_are_checked() {
        let none = cert_with_sans(vec![SanType::DnsName("a".try_into().unwrap())]);
        assert_eq!(peer_spiffe_id(&none), Err(PeerIdError::NoUriSan));
        let two = cert_with_sans(vec![uri("spiffe://td/a"), uri("spiffe://td/b")]);
        assert_eq!(peer_spiffe_id(&two), Err(PeerIdError::MultipleUriSans(2)));
        let https = cert_with_sans(vec![uri("https://td/a")]);
        let err = peer_spiffe_id(&https).unwrap_err();
        assert!(matches!(err, PeerIdError::Invalid { .. }), "{err:?}");
        assert!(err.to_string().contains("\"https://td/a\""), "{err}");
        let garbage = CertificateDer::from(vec![0x30, 0x03, 0x01, 0x01, 0xff]);
        assert!(matches!(
            peer_spiffe_id(&garbage),
            Err(PeerIdError::Unparseable(_))
        ));
    }

    #[test]
    fn not_after_is_read() {
        let mut params = CertificateParams::default();
        params.not_after = rcgen::date_time_ymd(2031, 5, 6);
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        let t = cert_not_after(cert.der()).unwrap();
        // 2031-05-06T00:00:00Z
        assert_eq!(
            t.duration_since(UNIX_EPOCH).unwrap().as_secs(),
            1_935_792_000
        );
    }

    #[test]
    fn spiffe_bundle_json_is_read() {
        let cert = cert_with_sans(vec![uri("spiffe://td/x")]);
        let b64 = base64::engine::general_purpose::STANDARD.encode(cert.as_ref());
        let json = format!(
            r#"{{"keys":[{{"use":"jwt-svid","kty":"EC"}},{{"use":"x509-svid","kty":"EC","x5c":["{b64}"]}}],"spiffe_sequence":1}}"#
        );
        assert_eq!(spiffe_bundle_certs(json.as_bytes()).unwrap(), vec![cert]);
        let err = spiffe_bundle_certs(br#"{"keys":[{"use":"x509-svid","x5c":[]}]}"#).unwrap_err();
        assert_eq!(err, "keys[0]: x5c must hold exactly one certificate");
        let err =
            spiffe_bundle_certs(br#"{"keys":[{"use":"x509-svid","x5c":["!!"]}]}"#).unwrap_err();
        assert!(err.starts_with("keys[0]: x5c[0] is not base64"), "{err}");
        assert!(spiffe_bundle_certs(br#"{"nokeys":1}"#).is_err());
    }
}
