//! `strait ca init` and `strait cert issue`: a mesh CA and SVIDs in Istio's file layouts.
//!
//! `ca init` writes Istio's plugged-CA layout (what `istiod` reads from the `cacerts`
//! secret): `root-cert.pem`, `ca-cert.pem`, `ca-key.pem`, `cert-chain.pem`. The root's
//! private key is used once, to sign the intermediate, and then dropped: nothing in a
//! mesh needs it, and a key that was never written cannot leak through a directory
//! mounted wholesale as a secret.
//!
//! `cert issue` signs a workload SVID with the intermediate and writes Istio's
//! file-mounted workload layout (`/etc/certs`): `cert-chain.pem`, `key.pem`,
//! `root-cert.pem`.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SanType,
};
use time::OffsetDateTime;

use crate::tls::spiffe::{SpiffeId, SpiffeIdError};

/// Plugged-CA and workload file names, as Istio spells them.
pub const ROOT_CERT: &str = "root-cert.pem";
pub const CA_CERT: &str = "ca-cert.pem";
pub const CA_KEY: &str = "ca-key.pem";
pub const CERT_CHAIN: &str = "cert-chain.pem";
pub const KEY: &str = "key.pem";

/// Certificates start this long before "now" so a peer whose clock is slightly behind
/// does not see them as not yet valid.
const BACKDATE: Duration = Duration::from_secs(60);

/// Why a CA or an SVID could not be made.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("{}: already exists; refusing to overwrite it (remove it or choose another --out)", .0.display())]
    Exists(PathBuf),
    #[error("ca dir {} has no {file}: run `strait ca init` first", .dir.display())]
    MissingCaFile { dir: PathBuf, file: &'static str },
    #[error("{}: {source}", .path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("{}: {reason}", .path.display())]
    BadCaFile { path: PathBuf, reason: String },
    #[error("invalid trust domain {domain:?}: {reason}")]
    TrustDomain { domain: String, reason: String },
    #[error("invalid validity: {0}")]
    Validity(String),
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
}

/// Creates a mesh CA for `trust_domain` in `out` (created if missing): a self-signed
/// root and an intermediate (path length 0) signed by it, both valid for `valid_for`.
/// Refuses to overwrite any existing file.
pub fn init_ca(trust_domain: &str, out: &Path, valid_for: Duration) -> Result<(), CaError> {
    validate_trust_domain(trust_domain)?;
    let names = [ROOT_CERT, CA_CERT, CA_KEY, CERT_CHAIN];
    refuse_existing(out, &names)?;
    let (not_before, not_after) = validity_from_now(valid_for)?;

    let root_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let root_params = ca_params(
        trust_domain,
        "Root CA",
        BasicConstraints::Unconstrained,
        not_before,
        not_after,
    );
    let root = root_params.self_signed(&root_key)?;
    let root_issuer = Issuer::from_params(&root_params, &root_key);

    let ca_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let ca_params = ca_params(
        trust_domain,
        "Intermediate CA",
        BasicConstraints::Constrained(0),
        not_before,
        not_after,
    );
    let ca = ca_params.signed_by(&ca_key, &root_issuer)?;

    create_dir(out)?;
    write_new(&out.join(ROOT_CERT), &root.pem(), PUBLIC)?;
    write_new(&out.join(CA_CERT), &ca.pem(), PUBLIC)?;
    write_new(&out.join(CA_KEY), &ca_key.serialize_pem(), SECRET)?;
    write_new(
        &out.join(CERT_CHAIN),
        &format!("{}{}", ca.pem(), root.pem()),
        PUBLIC,
    )?;
    Ok(())
}

/// Issues an SVID for `id` from the CA in `ca_dir` into `out` (created if missing),
/// valid from a minute ago for `valid_for`.
///
/// The ID's trust domain is not tied to the CA's: one mesh root signs the IDs of its
/// trust domain aliases too. Refuses to overwrite any existing file.
pub fn issue_svid(
    ca_dir: &Path,
    id: &SpiffeId,
    out: &Path,
    valid_for: Duration,
) -> Result<(), CaError> {
    let (not_before, not_after) = validity_from_now(valid_for)?;
    issue_svid_with_validity(ca_dir, id, out, not_before.into(), not_after.into())
}

/// Issues an SVID for `id` with an explicit validity window (tests use it to make
/// expired or not-yet-valid certificates).
///
/// The leaf carries exactly one URI SAN (the SPIFFE ID), an empty subject (so the SAN
/// is critical, as in Istio's SVIDs), key usage digitalSignature + keyEncipherment,
/// extended key usage serverAuth + clientAuth, `CA:FALSE`, and an ECDSA P-256 key.
pub fn issue_svid_with_validity(
    ca_dir: &Path,
    id: &SpiffeId,
    out: &Path,
    not_before: SystemTime,
    not_after: SystemTime,
) -> Result<(), CaError> {
    if not_after <= not_before {
        return Err(CaError::Validity(
            "not_after must be later than not_before".into(),
        ));
    }
    let ca = SigningCa::load(ca_dir)?;
    refuse_existing(out, &[CERT_CHAIN, KEY, ROOT_CERT])?;

    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(id.as_str().try_into()?)];
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    params.not_before = OffsetDateTime::from(not_before);
    params.not_after = OffsetDateTime::from(not_after);
    let leaf = params.signed_by(&key, &ca.issuer)?;

    create_dir(out)?;
    write_new(
        &out.join(CERT_CHAIN),
        &format!("{}{}", leaf.pem(), ca.cert_pem),
        PUBLIC,
    )?;
    write_new(&out.join(KEY), &key.serialize_pem(), SECRET)?;
    write_new(&out.join(ROOT_CERT), &ca.root_pem, PUBLIC)?;
    Ok(())
}

/// The intermediate of a CA directory, ready to sign.
struct SigningCa {
    issuer: Issuer<'static, KeyPair>,
    /// `ca-cert.pem` as read: the intermediate (and any further intermediates).
    cert_pem: String,
    root_pem: String,
}

impl SigningCa {
    fn load(dir: &Path) -> Result<SigningCa, CaError> {
        let cert_pem = read_ca_file(dir, CA_CERT)?;
        let key_pem = read_ca_file(dir, CA_KEY)?;
        let root_pem = read_ca_file(dir, ROOT_CERT)?;
        let bad = |file: &str, reason: String| CaError::BadCaFile {
            path: dir.join(file),
            reason,
        };
        let key = KeyPair::from_pem(&key_pem)
            .map_err(|e| bad(CA_KEY, format!("not a PEM private key: {e}")))?;
        let cert_der = first_pem_cert(&cert_pem)
            .ok_or_else(|| bad(CA_CERT, "no CERTIFICATE block found".into()))?;
        let (_, cert) = x509_parser::parse_x509_certificate(&cert_der)
            .map_err(|e| bad(CA_CERT, format!("not an X.509 certificate: {e}")))?;
        if !cert.is_ca() {
            return Err(bad(CA_CERT, "is not a CA certificate (CA:FALSE)".into()));
        }
        if cert.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            return Err(bad(
                CA_KEY,
                format!("does not match {CA_CERT}; restore the pair written by `strait ca init`"),
            ));
        }
        if first_pem_cert(&root_pem).is_none() {
            return Err(bad(ROOT_CERT, "no CERTIFICATE block found".into()));
        }
        let issuer = Issuer::from_ca_cert_der(&cert_der.into(), key)
            .map_err(|e| bad(CA_CERT, format!("cannot sign with it: {e}")))?;
        Ok(SigningCa {
            issuer,
            cert_pem,
            root_pem,
        })
    }
}

fn first_pem_cert(pem: &str) -> Option<Vec<u8>> {
    rustls_pemfile::certs(&mut pem.as_bytes())
        .next()
        .and_then(Result::ok)
        .map(|der| der.to_vec())
}

fn read_ca_file(dir: &Path, file: &'static str) -> Result<String, CaError> {
    let path = dir.join(file);
    fs::read_to_string(&path).map_err(|source| match source.kind() {
        io::ErrorKind::NotFound => CaError::MissingCaFile {
            dir: dir.to_owned(),
            file,
        },
        _ => CaError::Io { path, source },
    })
}

fn ca_params(
    trust_domain: &str,
    common_name: &str,
    constraints: BasicConstraints,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, trust_domain);
    dn.push(DnType::CommonName, common_name);
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(constraints);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.use_authority_key_identifier_extension = true;
    params.not_before = not_before;
    params.not_after = not_after;
    params
}

fn validate_trust_domain(trust_domain: &str) -> Result<(), CaError> {
    let invalid = |reason: String| CaError::TrustDomain {
        domain: trust_domain.to_owned(),
        reason,
    };
    let id = SpiffeId::parse(&format!("spiffe://{trust_domain}"))
        .map_err(|e: SpiffeIdError| invalid(e.to_string()))?;
    if !id.path().is_empty() {
        return Err(invalid(
            "a trust domain is a name like cluster.local, without '/'".into(),
        ));
    }
    Ok(())
}

fn validity_from_now(valid_for: Duration) -> Result<(OffsetDateTime, OffsetDateTime), CaError> {
    if valid_for.is_zero() {
        return Err(CaError::Validity(
            "validity must be longer than zero".into(),
        ));
    }
    let now = SystemTime::now();
    let not_before = now.checked_sub(BACKDATE).unwrap_or(now);
    let not_after = now
        .checked_add(valid_for)
        .filter(|t| OffsetDateTime::from(*t).year() <= 9999)
        .ok_or_else(|| CaError::Validity(format!("{valid_for:?} is too long")))?;
    Ok((not_before.into(), not_after.into()))
}

fn refuse_existing(dir: &Path, names: &[&str]) -> Result<(), CaError> {
    match names.iter().map(|n| dir.join(n)).find(|p| p.exists()) {
        Some(path) => Err(CaError::Exists(path)),
        None => Ok(()),
    }
}

fn create_dir(dir: &Path) -> Result<(), CaError> {
    fs::create_dir_all(dir).map_err(|source| CaError::Io {
        path: dir.to_owned(),
        source,
    })
}

const PUBLIC: u32 = 0o644;
const SECRET: u32 = 0o600;

/// Writes a file that must not exist yet, with `mode` from the moment it is created
/// (a key is never readable by others, not even briefly).
fn write_new(path: &Path, contents: &str, mode: u32) -> Result<(), CaError> {
    let io_err = |source: io::Error| match source.kind() {
        io::ErrorKind::AlreadyExists => CaError::Exists(path.to_owned()),
        _ => CaError::Io {
            path: path.to_owned(),
            source,
        },
    };
    let mut options = fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, mode);
    #[cfg(not(unix))]
    let _ = mode;
    let mut file = options.open(path).map_err(io_err)?;
    file.write_all(contents.as_bytes()).map_err(io_err)?;
    file.sync_all().map_err(io_err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trust_domain_is_validated() {
        assert!(validate_trust_domain("cluster.local").is_ok());
        let err = validate_trust_domain("Cluster.Local").unwrap_err();
        assert!(err.to_string().contains("invalid trust domain"), "{err}");
        let err = validate_trust_domain("td/ns").unwrap_err();
        assert!(err.to_string().contains("without '/'"), "{err}");
        assert!(validate_trust_domain("").is_err());
    }

    #[test]
    fn validity_must_be_positive_and_representable() {
        assert!(validity_from_now(Duration::ZERO).is_err());
        assert!(validity_from_now(Duration::from_secs(u64::MAX)).is_err());
        let (nb, na) = validity_from_now(Duration::from_secs(3600)).unwrap();
        assert_eq!((na - nb).whole_seconds(), 3600 + 60);
    }
}
