//! What happened to each connection: one [`ConnectionResult`] per connection writes the
//! metrics and the access log line when it ends, whichever way it ends.

mod access_log;
pub mod metrics;
mod result;

pub use access_log::AccessLog;
pub use metrics::{
    EndpointSample, FirstByte, GatewayIdentity, HboneMetrics, IstioLabels, Metrics, RouteCounters,
    RouteMetrics,
};
pub use result::{Accepted, ConnectionResult, ResponseFlag};

use std::sync::Arc;

/// Metrics, access log and the gateway's own identity, shared by every connection.
pub struct Telemetry {
    pub metrics: Metrics,
    pub access_log: AccessLog,
    pub identity: GatewayIdentity,
}

impl Telemetry {
    pub fn new(access_log: AccessLog, identity: GatewayIdentity) -> Arc<Self> {
        Arc::new(Telemetry {
            metrics: Metrics::new(),
            access_log,
            identity,
        })
    }
}
