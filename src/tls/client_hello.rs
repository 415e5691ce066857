//! ClientHello inspection without terminating TLS.
