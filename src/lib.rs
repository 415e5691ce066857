//! strait: an east-west gateway for multi-network service meshes.
//!
//! A connection's life: `config` (Istio YAML) or `xds` (istiod) builds a
//! `model::Snapshot`; `proxy` accepts the connection, `tls` inspects its ClientHello,
//! `route` finds the service, subset and endpoints, `policy` admits or denies it,
//! `upstream` picks and dials an endpoint, `proxy::copy` splices the bytes, and
//! `telemetry` records what happened. Authorization has one model, Envoy's network RBAC
//! (`model::RbacFilter`) on each server: `xds` reads istiod's filters, `config` has
//! `policy::compile` turn file AuthorizationPolicies into the same filters as istiod does,
//! and `policy::authz` judges them for every kind of server.
//!
//! The modules stand on floors, and each imports only from the floors below its own:
//! `model` is the ground; `tls`, `route`, `telemetry` and `policy` stand on it; then
//! `config` and `upstream`; then `xds`; then `proxy`; then `admin` (status, metrics, the
//! admin API and `strait route`'s explanation) and `identity` (the mesh CA and the
//! gateway's own SVID); and `cli` (`strait run`, `strait demo`) on top, under `main`.
//! `tests/floors.rs` reads the source and fails on an arrow that runs up, sideways or
//! both ways.

pub mod admin;
pub mod cli;
pub mod config;
pub mod identity;
pub mod model;
pub mod policy;
pub mod proxy;
pub mod route;
pub mod telemetry;
pub mod tls;
pub mod upstream;
pub mod xds;
