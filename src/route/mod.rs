//! Routing: SNI subset keys, Gateway host matching, service/subset/endpoint lookup.

pub mod sni;
