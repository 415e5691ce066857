//! strait: an east-west gateway for multi-network service meshes.
//!
//! A connection's life, in the order of the modules: `config` turns Istio YAML into a
//! `model::Snapshot`; `proxy` accepts it, `tls` inspects its ClientHello, `route` finds
//! the service, subset and endpoints, `upstream` picks and dials one, `proxy::copy`
//! splices the bytes, and `telemetry` records what happened. `admin` serves status,
//! metrics and the admin API; `ca` issues mesh certificates.

pub mod admin;
pub mod app;
pub mod authz;
pub mod ca;
pub mod config;
pub mod demo;
pub mod explain;
pub mod handover;
pub mod model;
pub mod proxy;
pub mod route;
pub mod svid;
pub mod telemetry;
pub mod tls;
pub mod upstream;
pub mod xds;
