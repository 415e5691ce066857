//! Certificate signatures verified once, not on every handshake.
//!
//! An ISTIO_MUTUAL server verifies three P-256 signatures per full handshake: the client's
//! CertificateVerify (over this handshake's transcript), its leaf's signature by the
//! intermediate CA, and the intermediate's by the mesh root. The last two are the same bytes
//! on every handshake of a client (a sidecar keeps its SVID for hours), and the
//! intermediate's on every handshake of every client of the mesh. A signature check is a
//! pure function of (algorithm, public key, message, signature): once it has passed, it
//! passes again. So the chain's checks go through [`memoizing`], which remembers the exact
//! inputs of the last [`CAPACITY`] checks that passed and answers those without the
//! arithmetic.
//!
//! Nothing else about a chain's verification changes: webpki still builds the path to a
//! trust anchor of the current configuration, checks every certificate's validity period,
//! key usage and constraints on every handshake, and strait still checks the SPIFFE ID and
//! authorization. Only passes are remembered (a signature that failed is checked again,
//! and fails again); the key is the whole input, compared byte for byte (no digest); the
//! CertificateVerify, which is different on every handshake, is not remembered.

use std::collections::HashSet;
use std::sync::{Mutex, OnceLock};

use rustls::SignatureScheme;
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::{
    AlgorithmIdentifier, FipsStatus, InvalidSignature, SignatureVerificationAlgorithm,
};

/// Signature checks remembered (each about a certificate's size); when full, forgotten all
/// at once.
pub const CAPACITY: usize = 256;

/// One algorithm, remembering the checks it passed.
#[derive(Debug)]
struct Memo {
    inner: &'static dyn SignatureVerificationAlgorithm,
    passed: &'static Passed,
}

#[derive(Debug, Default)]
pub(crate) struct Passed(Mutex<HashSet<Vec<u8>>>);

impl Passed {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashSet<Vec<u8>>> {
        // A set of byte strings stays consistent at every step; a poisoned lock is usable.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn contains(&self, key: &[u8]) -> bool {
        self.lock().contains(key)
    }

    fn insert(&self, key: Vec<u8>) {
        let mut set = self.lock();
        if set.len() >= CAPACITY {
            set.clear();
        }
        set.insert(key);
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().len()
    }
}

/// The whole input of a check, each part length-prefixed.
fn key(alg: &dyn SignatureVerificationAlgorithm, parts: [&[u8]; 3]) -> Vec<u8> {
    let (pk_alg, sig_alg) = (alg.public_key_alg_id(), alg.signature_alg_id());
    let ids: [&[u8]; 2] = [pk_alg.as_ref(), sig_alg.as_ref()];
    let mut key = Vec::with_capacity(ids.iter().chain(&parts).map(|p| p.len() + 4).sum());
    for part in ids.iter().chain(&parts) {
        key.extend_from_slice(&(part.len() as u32).to_be_bytes());
        key.extend_from_slice(part);
    }
    key
}

impl SignatureVerificationAlgorithm for Memo {
    fn verify_signature(
        &self,
        public_key: &[u8],
        message: &[u8],
        signature: &[u8],
    ) -> Result<(), InvalidSignature> {
        let key = key(self.inner, [public_key, message, signature]);
        if self.passed.contains(&key) {
            return Ok(());
        }
        self.inner
            .verify_signature(public_key, message, signature)?;
        self.passed.insert(key);
        Ok(())
    }

    fn public_key_alg_id(&self) -> AlgorithmIdentifier {
        self.inner.public_key_alg_id()
    }

    fn signature_alg_id(&self) -> AlgorithmIdentifier {
        self.inner.signature_alg_id()
    }

    fn fips_status(&self) -> FipsStatus {
        self.inner.fips_status()
    }

    fn fips(&self) -> bool {
        self.inner.fips()
    }
}

/// `algs` with every algorithm remembering the checks it passed, in a store shared by the
/// process (one per set of algorithms: the provider's, fixed for a build).
pub fn memoizing(algs: WebPkiSupportedAlgorithms) -> WebPkiSupportedAlgorithms {
    static MEMO: OnceLock<(usize, WebPkiSupportedAlgorithms)> = OnceLock::new();
    let (of, memo) = MEMO.get_or_init(|| (algs.all.as_ptr() as usize, wrap(algs, leak_passed())));
    if *of == algs.all.as_ptr() as usize {
        *memo
    } else {
        // Another set than the first one seen: its own store, built again (not expected
        // outside tests; bounded by the number of distinct sets).
        wrap(algs, leak_passed())
    }
}

fn leak_passed() -> &'static Passed {
    Box::leak(Box::default())
}

/// `algs` with each algorithm wrapped to remember into `passed`. The wrappers live for the
/// process (rustls takes the algorithms as `'static`); [`memoizing`] builds them once.
fn wrap(algs: WebPkiSupportedAlgorithms, passed: &'static Passed) -> WebPkiSupportedAlgorithms {
    let memo = |inner: &'static dyn SignatureVerificationAlgorithm| -> &'static dyn SignatureVerificationAlgorithm {
        Box::leak(Box::new(Memo { inner, passed }))
    };
    let all: Vec<&'static dyn SignatureVerificationAlgorithm> =
        algs.all.iter().map(|a| memo(*a)).collect();
    let all: &'static [&'static dyn SignatureVerificationAlgorithm] = Box::leak(all.into());
    // The mapping points at the same wrappers as `all` where it names the same algorithm.
    let same = |inner: &&'static dyn SignatureVerificationAlgorithm| {
        algs.all
            .iter()
            .position(|a| std::ptr::addr_eq(*a as *const _, *inner as *const _))
            .map_or_else(|| memo(*inner), |i| all[i])
    };
    let mapping: Vec<(
        SignatureScheme,
        &'static [&'static dyn SignatureVerificationAlgorithm],
    )> = algs
        .mapping
        .iter()
        .map(|(scheme, inners)| {
            let wrapped: Vec<_> = inners.iter().map(same).collect();
            let wrapped: &'static [&'static dyn SignatureVerificationAlgorithm] =
                Box::leak(wrapped.into());
            (*scheme, wrapped)
        })
        .collect();
    WebPkiSupportedAlgorithms {
        all,
        mapping: Box::leak(mapping.into()),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use rustls::pki_types::CertificateDer;

    use super::*;

    /// A real algorithm, counting the checks that reach it.
    #[derive(Debug)]
    struct Counted(&'static dyn SignatureVerificationAlgorithm, AtomicUsize);

    impl SignatureVerificationAlgorithm for Counted {
        fn verify_signature(
            &self,
            pk: &[u8],
            msg: &[u8],
            sig: &[u8],
        ) -> Result<(), InvalidSignature> {
            self.1.fetch_add(1, Ordering::Relaxed);
            self.0.verify_signature(pk, msg, sig)
        }
        fn public_key_alg_id(&self) -> AlgorithmIdentifier {
            self.0.public_key_alg_id()
        }
        fn signature_alg_id(&self) -> AlgorithmIdentifier {
            self.0.signature_alg_id()
        }
    }

    /// (issuer's public key, to-be-signed bytes, signature) of a real leaf made by
    /// `strait cert issue`'s code.
    fn real_signature() -> (Vec<u8>, Vec<u8>, Vec<u8>) {
        let dir = tempfile_dir();
        let ca = dir.join("ca");
        let day = std::time::Duration::from_secs(86400);
        crate::identity::ca::init_ca("cluster.local", &ca, day).unwrap();
        let leaf = dir.join("leaf");
        crate::identity::ca::issue_svid(
            &ca,
            &crate::tls::SpiffeId::parse("spiffe://cluster.local/ns/a/sa/b").unwrap(),
            &leaf,
            day,
        )
        .unwrap();
        let id = crate::tls::load_identity(&leaf).unwrap();
        let (cert, issuer): (&CertificateDer, &CertificateDer) = (&id.chain[0], &id.chain[1]);
        let _ = std::fs::remove_dir_all(&dir);
        use x509_parser::prelude::*;
        let (_, c) = X509Certificate::from_der(cert).unwrap();
        let (_, i) = X509Certificate::from_der(issuer).unwrap();
        (
            i.public_key().subject_public_key.data.to_vec(),
            c.tbs_certificate.as_ref().to_vec(),
            c.signature_value.data.to_vec(),
        )
    }

    fn tempfile_dir() -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!(
            "strait-memo-{}-{}",
            std::process::id(),
            fastrand::u64(..)
        ));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn a_passed_check_is_answered_again_and_a_failed_one_is_checked_again() {
        let p256: &'static dyn SignatureVerificationAlgorithm = crate::tls::provider::provider()
            .signature_verification_algorithms
            .all
            .iter()
            .copied()
            .find(|a| {
                let alg = rustls::pki_types::alg_id::ECDSA_SHA256;
                a.signature_alg_id() == alg
                    && a.public_key_alg_id() == rustls::pki_types::alg_id::ECDSA_P256
            })
            .expect("the provider verifies ECDSA P-256 with SHA-256");
        let counted: &'static Counted = Box::leak(Box::new(Counted(p256, AtomicUsize::new(0))));
        let passed: &'static Passed = leak_passed();
        let memo = Memo {
            inner: counted,
            passed,
        };
        let (pk, msg, sig) = real_signature();
        let calls = || counted.1.load(Ordering::Relaxed);

        memo.verify_signature(&pk, &msg, &sig).unwrap();
        memo.verify_signature(&pk, &msg, &sig).unwrap();
        assert_eq!(
            calls(),
            1,
            "the second check of the same bytes was computed again"
        );

        // One byte off anywhere: checked, and refused, every time.
        let mut bad_msg = msg.clone();
        bad_msg[10] ^= 1;
        let mut bad_sig = sig.clone();
        let last = bad_sig.len() - 3;
        bad_sig[last] ^= 1;
        for _ in 0..2 {
            assert!(memo.verify_signature(&pk, &bad_msg, &sig).is_err());
            assert!(memo.verify_signature(&pk, &msg, &bad_sig).is_err());
        }
        assert_eq!(calls(), 5);
        assert_eq!(passed.len(), 1, "only the pass is remembered");
    }

    #[test]
    fn the_store_is_bounded() {
        let passed = leak_passed();
        for i in 0..CAPACITY * 3 {
            passed.insert(i.to_be_bytes().to_vec());
            assert!(passed.len() <= CAPACITY);
        }
    }

    #[test]
    fn memoizing_keeps_the_providers_algorithms_and_schemes() {
        let algs = crate::tls::provider::provider().signature_verification_algorithms;
        let memo = memoizing(algs);
        assert_eq!(memo.all.len(), algs.all.len());
        assert_eq!(memo.supported_schemes(), algs.supported_schemes());
        for (a, m) in algs.all.iter().zip(memo.all) {
            assert_eq!(a.signature_alg_id(), m.signature_alg_id());
            assert_eq!(a.public_key_alg_id(), m.public_key_alg_id());
        }
        // Built once per set: the same wrappers on every call.
        assert!(std::ptr::eq(memo.all, memoizing(algs).all));
    }
}
