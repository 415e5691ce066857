//! Who may connect: Istio's AuthorizationPolicy compiled into Envoy's network RBAC as
//! istiod compiles it (`compile`), and the RBAC filters of a server, from files or from
//! istiod alike, judged against the peer's SPIFFE ID and the connection's addresses
//! (`authz`).

pub mod authz;
pub mod compile;
