//! Who may connect: AuthorizationPolicy and istiod's RBAC filters, judged against the
//! peer's SPIFFE ID and the connection's addresses.

pub mod authz;
