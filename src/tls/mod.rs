//! TLS: ClientHello inspection, SPIFFE identities, rustls configurations and certificate files.

pub mod client_hello;
pub mod spiffe;
