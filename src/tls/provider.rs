//! The cryptography under every TLS connection strait terminates or originates: which
//! rustls crypto provider, and which key-exchange groups each side offers, in which order.
//!
//! The provider is ring by default and aws-lc-rs with the `aws-lc-rs` cargo feature. Only
//! aws-lc-rs has the post-quantum hybrid X25519MLKEM768 (what Istio's `COMPLIANCE_POLICY=pqc`
//! requires of its proxies), and its P-384 is several times cheaper than ring's.
//!
//! The groups are chosen here, not left to the provider's defaults, so that an update of
//! rustls or of a provider cannot change them (rustls' own clients have changed their first
//! key share between patch releases); `tests/istio_mutual.rs` and `tests/bridge.rs` pin them
//! against real peers.
//!
//! - **As a server** (ISTIO_MUTUAL): X25519MLKEM768 (aws-lc-rs only), X25519, P-256 — Envoy's
//!   server groups, plus the hybrid. rustls takes the first group of the *client's* list that
//!   the server accepts, and asks for it with a HelloRetryRequest when the client sent no key
//!   share for it. So a client whose first key share is P-384 (several times the cost of
//!   X25519, and not accepted by Envoy's server either) is asked again for its next group, and
//!   one offering P-384 alone is refused, as Envoy refuses it. Between the cheap groups the
//!   client's order stands: an HelloRetryRequest costs the client a round trip and a second
//!   key share, more than the server saves by preferring X25519 to P-256. A client that offers
//!   the hybrid first gets it: it is the stronger exchange, and what a client under a
//!   post-quantum policy needs.
//! - **As a client** (the Bridge, ISTIO_MUTUAL origination to sidecars, istiod): X25519 first,
//!   with its key share, then P-256, then X25519MLKEM768 (aws-lc-rs only). Envoy sidecars
//!   (BoringSSL, default curves X25519 and P-256), ztunnel (rustls: X25519, P-256, P-384) and
//!   istiod (Go) all take X25519 in one round trip; a peer that accepts only the hybrid (Istio's
//!   `pqc` policy) asks for it with a HelloRetryRequest and gets it. Offering the hybrid first
//!   would add 1.2 KB and an ML-KEM key generation to every ClientHello for peers that mostly
//!   ignore it.
//!
//! Cipher suites: as a server strait keeps the client's order (as BoringSSL does with AES
//! instructions); as a client it offers them in the order Envoy's upstream does (BoringSSL on
//! a CPU with AES instructions, Envoy's default TLS 1.2 list): AES-128-GCM first, then
//! AES-256-GCM, then ChaCha20-Poly1305, so that a sidecar (which keeps the client's order)
//! picks for strait what it picks for an Envoy gateway. rustls' own order puts AES-256-GCM
//! first, which costs the record path more AES rounds per byte and the handshake a SHA-384
//! key schedule. All of them are suites Istio's proxies accept.

use std::sync::Arc;

use rustls::NamedGroup;
use rustls::crypto::{CryptoProvider, SupportedKxGroup};

#[cfg(feature = "aws-lc-rs")]
use rustls::crypto::aws_lc_rs as imp;
#[cfg(not(feature = "aws-lc-rs"))]
use rustls::crypto::ring as imp;

/// The provider's name, as the benches and logs print it.
pub const NAME: &str = if cfg!(feature = "aws-lc-rs") {
    "aws-lc-rs"
} else {
    "ring"
};

/// Whether the provider has the post-quantum hybrid X25519MLKEM768.
pub const POST_QUANTUM: bool = cfg!(feature = "aws-lc-rs");

/// The provider with its own defaults: for certificate verification and anything that
/// makes no key exchange.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(imp::default_provider())
}

/// What an ISTIO_MUTUAL server accepts, in this order (see the module's text).
pub fn server_groups() -> Vec<&'static dyn SupportedKxGroup> {
    use imp::kx_group::{SECP256R1, X25519};
    let mut groups: Vec<&'static dyn SupportedKxGroup> = Vec::new();
    #[cfg(feature = "aws-lc-rs")]
    groups.push(imp::kx_group::X25519MLKEM768);
    groups.extend([X25519, SECP256R1]);
    groups
}

/// What strait offers as a client, in this order; the first gets a key share.
pub fn client_groups() -> Vec<&'static dyn SupportedKxGroup> {
    use imp::kx_group::{SECP256R1, X25519};
    let classical: Vec<&'static dyn SupportedKxGroup> = vec![X25519, SECP256R1];
    #[cfg(feature = "aws-lc-rs")]
    let classical = [classical, vec![imp::kx_group::X25519MLKEM768]].concat();
    classical
}

/// The provider for terminating servers.
pub fn server_provider() -> Arc<CryptoProvider> {
    Arc::new(CryptoProvider {
        kx_groups: server_groups(),
        ..imp::default_provider()
    })
}

/// What strait offers as a client, in this order (see the module's text): the provider's
/// suites, ordered as Envoy's upstream offers them.
pub fn client_suites() -> Vec<rustls::SupportedCipherSuite> {
    use rustls::CipherSuite as C;
    const ORDER: [C; 9] = [
        C::TLS13_AES_128_GCM_SHA256,
        C::TLS13_AES_256_GCM_SHA384,
        C::TLS13_CHACHA20_POLY1305_SHA256,
        C::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
        C::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
        C::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
        C::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
        C::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
        C::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
    ];
    let all = imp::default_provider().cipher_suites;
    ORDER
        .iter()
        .filter_map(|want| all.iter().find(|s| s.suite() == *want).copied())
        .collect()
}

/// The provider for strait's own TLS clients.
pub fn client_provider() -> Arc<CryptoProvider> {
    Arc::new(CryptoProvider {
        kx_groups: client_groups(),
        cipher_suites: client_suites(),
        ..imp::default_provider()
    })
}

/// Session tickets for one server configuration: stateless, as Envoy's BoringSSL issues
/// them. The session (its secret, the client's verified chain, SNI and cipher suite) is
/// sealed with a key that lives in this process only, made at random for this configuration
/// and rotated every 6 hours (a ticket sealed under the previous key still opens for 6 more).
///
/// Against rustls' default (a stateful cache of 256 sessions, each taken once) this lets
/// any number of clients resume, and a client present a ticket again (as BoringSSL's
/// clients, Envoy sidecars, do) while the configuration lives. It keeps what the cache
/// kept: a ticket opens only under the configuration that sealed it, so a reload of
/// certificates, trust or settings (which builds new configurations) ends every session
/// made before it; and the connection's peer identity is the chain stored in the
/// session, authorized again on every connection like a new one.
pub fn ticketer() -> Result<Arc<dyn rustls::server::ProducesTickets>, rustls::Error> {
    imp::Ticketer::new()
}

/// The names of `groups`, for logs and tests.
pub fn names(groups: &[&'static dyn SupportedKxGroup]) -> Vec<NamedGroup> {
    groups.iter().map(|g| g.name()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_are_the_chosen_ones_in_order() {
        let pq = POST_QUANTUM.then_some(NamedGroup::X25519MLKEM768);
        let server: Vec<NamedGroup> = pq
            .into_iter()
            .chain([NamedGroup::X25519, NamedGroup::secp256r1])
            .collect();
        assert_eq!(names(&server_groups()), server);
        let client: Vec<NamedGroup> = [NamedGroup::X25519, NamedGroup::secp256r1]
            .into_iter()
            .chain(pq)
            .collect();
        assert_eq!(names(&client_groups()), client);
        // The suites as Envoy's upstream offers them, and every one the provider has.
        use rustls::CipherSuite as C;
        let suites: Vec<C> = client_suites().iter().map(|s| s.suite()).collect();
        assert_eq!(
            suites,
            [
                C::TLS13_AES_128_GCM_SHA256,
                C::TLS13_AES_256_GCM_SHA384,
                C::TLS13_CHACHA20_POLY1305_SHA256,
                C::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
                C::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
                C::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
                C::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
                C::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
                C::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
            ]
        );
        assert_eq!(suites.len(), provider().cipher_suites.len());
        // Never P-384: several times X25519's cost, and refused by Envoy's server.
        for p in [server_provider(), client_provider()] {
            assert!(!names(&p.kx_groups).contains(&NamedGroup::secp384r1));
        }
    }
}
