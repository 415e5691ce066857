//! TLS: ClientHello inspection, SPIFFE identities, rustls configurations and certificate files.

pub mod certs;
pub mod client_hello;
pub mod io;
pub mod material;
pub mod memo;
pub mod provider;
pub mod resume;
pub mod spiffe;
pub mod verify;

pub use certs::{
    CertError, Identity, PeerIdError, cert_not_after, load_identity, load_trust_bundle,
    peer_spiffe_id, resumed_chain_expired, resumed_past_validity,
};
pub use spiffe::{SpiffeId, SpiffeIdError};
pub use verify::{
    ClientAuth, PeerRejection, Refusal, TrustConfig, classify_handshake_error, client_config,
    handshake_error_detail, server_config, server_config_with,
};
