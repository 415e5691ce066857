//! The upstream leg shared by every listener's connections: admit to the cluster, connect
//! to an endpoint with retry, fold the copy's outcome into the connection's result, and the
//! spliced connection's task that holds what keeps it counted until it ends.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use super::copy::{CopyEnd, CopyLimits, CopyOutcome};
use super::hello::Alert;
use super::{LiveGuard, OpenGuard, Shared};
use crate::model::Settings;
use crate::telemetry::{ConnectionResult, FirstByte, ResponseFlag};
use crate::upstream::{
    self, ActiveGuard, AttemptFailure, Cluster, ClusterSlot, ConnectError, ConnectObserver,
    Connected, Purpose,
};

/// Upstream connect attempts per connection, each to a distinct endpoint.
pub(crate) const MAX_CONNECT_ATTEMPTS: usize = 3;

/// Limits for the copy: the cluster's policy over the Bootstrap defaults.
pub(super) fn copy_limits(cluster: &Cluster, settings: &Settings) -> CopyLimits {
    CopyLimits {
        idle_timeout: cluster.idle_timeout(settings.idle_timeout),
        max_duration: cluster.max_connection_duration(),
    }
}

/// Adds the copy's bytes and end to the connection's result.
pub(super) fn record_copy(result: &mut ConnectionResult, outcome: &CopyOutcome) {
    result.received += outcome.to_upstream;
    result.sent += outcome.to_downstream;
    match outcome.end {
        CopyEnd::Closed | CopyEnd::Error | CopyEnd::Drained => {}
        CopyEnd::IdleTimeout => result.refuse(ResponseFlag::IdleTimeout, "idle_timeout"),
        CopyEnd::DurationTimeout => {
            result.refuse(ResponseFlag::DurationTimeout, "max_connection_duration")
        }
    }
}

/// An upstream connection, holding its place in the cluster's connection budget.
pub(super) struct Opened {
    pub connected: Connected,
    pub(super) _slot: ClusterSlot,
}

impl std::ops::Deref for Opened {
    type Target = Connected;
    fn deref(&self) -> &Connected {
        &self.connected
    }
}

/// Admits the connection to the cluster and connects to one of its endpoints, writing
/// `replay` (the ClientHello) first when given. On failure, records the refusal and
/// returns the TLS alert the client should get.
pub(super) async fn open_upstream(
    shared: &Shared,
    settings: &Settings,
    cluster: &Arc<Cluster>,
    purpose: Purpose,
    replay: Option<&[u8]>,
    result: &mut ConnectionResult,
) -> Result<Opened, Alert> {
    let Some(slot) = cluster.admit() else {
        result.refuse(ResponseFlag::UpstreamOverflow, "cluster_max_connections");
        tracing::info!(peer = %result.downstream, service = %cluster.service.host, "refused UO: connectionPool.tcp.maxConnections reached");
        return Err(Alert::InternalError);
    };
    let connect_timeout = cluster.connect_timeout(settings.connect_timeout);
    let observer = MetricsObserver(shared);
    // With a replay, connected means the endpoint answered the replayed ClientHello, so
    // one that accepts and then resets is a failed attempt and the next one is tried.
    let connected = upstream::connect(
        cluster,
        purpose,
        settings,
        connect_timeout,
        MAX_CONNECT_ATTEMPTS,
        &observer,
        replay,
    )
    .await;
    match connected {
        Ok(c) => {
            result.upstream = Some(c.addr);
            Ok(Opened {
                connected: c,
                _slot: slot,
            })
        }
        Err(e) => {
            let (flag, reason, alert) = match &e {
                ConnectError::NoHealthyEndpoint => (
                    ResponseFlag::NoHealthyUpstream,
                    "no_healthy_endpoint",
                    Alert::HandshakeFailure,
                ),
                ConnectError::AllFailed { .. } => (
                    ResponseFlag::UpstreamConnectFailure,
                    "connect_failed",
                    Alert::InternalError,
                ),
            };
            result.refuse(flag, reason);
            result.detail = Some(e.to_string());
            tracing::info!(
                peer = %result.downstream,
                sni = result.sni.as_deref().unwrap_or("-"),
                service = %cluster.service.host,
                subset = cluster.subset.as_deref().unwrap_or("-"),
                error = %e,
                "refused: {}", flag.as_str()
            );
            Err(alert)
        }
    }
}

/// Feeds connect attempts into the metrics.
pub(crate) struct MetricsObserver<'a>(pub(crate) &'a Shared);

impl ConnectObserver for MetricsObserver<'_> {
    fn attempt(&self) {
        self.0.telemetry.metrics.upstream_connect_attempts.inc();
    }

    fn failure(&self, kind: AttemptFailure, _took: std::time::Duration) {
        self.0
            .telemetry
            .metrics
            .upstream_connect_failures
            .with_label_values(&[kind.reason()])
            .inc();
    }

    fn success(&self, took: std::time::Duration) {
        self.0
            .telemetry
            .metrics
            .upstream_connect_seconds
            .observe(took.as_secs_f64());
    }

    fn first_byte(&self, outcome: FirstByte, waited: std::time::Duration) {
        self.0
            .telemetry
            .metrics
            .upstream_first_byte_seconds
            .get(outcome)
            .observe(waited.as_secs_f64());
    }
}

/// What keeps a connection counted: live for the drain, open for `maxConnections`.
/// Moves with the connection into its copy task.
pub(super) struct Held {
    pub(super) _live: LiveGuard,
    pub(super) _open: OpenGuard,
}

pin_project_lite::pin_project! {
    /// A routed, connected connection: the copy, then the record of how it ended.
    /// Fields drop in order: the sockets close, the access-log line is queued, and only
    /// then are the guards released (the drain waits for them, then flushes the log).
    /// Spawned as a task of its own (here and by ISTIO_MUTUAL termination) so that an
    /// idle connection holds only this.
    pub(super) struct Splice<C> {
        #[pin]
        pub(super) copy: C,
        pub(super) result: ConnectionResult,
        pub(super) _upstream: (ClusterSlot, ActiveGuard),
        pub(super) _held: Held,
    }
}

impl<C: Future<Output = CopyOutcome>> Future for Splice<C> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.project();
        let outcome = ready!(this.copy.poll(cx));
        record_copy(this.result, &outcome);
        Poll::Ready(())
    }
}
