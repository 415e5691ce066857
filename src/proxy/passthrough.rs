//! One downstream connection on a gateway listener: admit, read the ClientHello, route
//! by SNI, connect to an endpoint, replay the ClientHello and splice bytes.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpStream;

use super::copy::{ByteCounters, CopyEnd, CopyLimits, copy_tcp};
use super::hello::{Alert, HelloError, read_client_hello, refuse_with_alert};
use super::{Shared, closing};
use crate::model::ServerTlsMode;
use crate::route::{self, RouteMiss};
use crate::telemetry::{ConnectionResult, IstioLabels, ResponseFlag};
use crate::upstream::{self, AttemptFailure, ConnectError, ConnectObserver, Purpose};

/// Upstream connect attempts per connection, each to a distinct endpoint.
pub(crate) const MAX_CONNECT_ATTEMPTS: usize = 3;

pub(super) async fn handle(
    shared: Arc<Shared>,
    listener: SocketAddr,
    mut stream: TcpStream,
    peer: SocketAddr,
) {
    let mut result = ConnectionResult::new(shared.telemetry.clone(), listener, peer);
    let Some(_open) = shared.admit() else {
        result.refuse(ResponseFlag::UpstreamOverflow, "max_connections");
        tracing::debug!(%peer, "refused: maxConnections reached");
        // Close at once: the point of the limit is to spend nothing on the excess.
        return;
    };
    let _ = stream.set_nodelay(true);

    let hello_timeout = shared.runtime.load().snapshot.settings.client_hello_timeout;
    let mut buf = Vec::new();
    let offer = match read_client_hello(&stream, &mut buf, hello_timeout).await {
        Ok(offer) => offer,
        Err(e) => {
            result.received = buf.len() as u64;
            let flag = match e {
                HelloError::Closed(_) => ResponseFlag::DownstreamConnectionTermination,
                _ => ResponseFlag::DownstreamProtocolError,
            };
            result.refuse(flag, e.reason());
            tracing::debug!(%peer, error = %e, "refused before routing");
            if !matches!(e, HelloError::Closed(_)) {
                refuse_with_alert(&mut stream, None).await;
            }
            return;
        }
    };
    let metrics = &shared.telemetry.metrics;
    metrics.client_hello_bytes.observe(offer.hello_bytes as f64);
    metrics
        .client_hello_seconds
        .observe(result.elapsed().as_secs_f64());
    result.received = buf.len() as u64;
    result.sni = offer.sni.clone();
    result.alpn = Some(offer.alpn_display.clone());

    // Route against the configuration in force now; the connection keeps it to the end.
    let runtime = shared.runtime.load_full();
    let settings = &runtime.snapshot.settings;
    let servers = runtime.servers_for(&listener);
    let routed = route::resolve(servers, &runtime.snapshot.services, offer.sni.as_deref());
    let route = match routed {
        Ok(r) => r,
        Err(miss) => {
            return refuse_no_route(&mut stream, &mut result, &miss).await;
        }
    };
    let mode = servers[route.server].mode;
    if mode == ServerTlsMode::AutoPassthrough
        && !route::alpn_allowed(offer.alpn_iter(), &settings.passthrough_alpn)
    {
        let miss = RouteMiss::AlpnNotAllowed {
            offered: offer.alpn_display.clone(),
            allowed: settings.passthrough_alpn.join(", "),
        };
        return refuse_no_route(&mut stream, &mut result, &miss).await;
    }
    if mode == ServerTlsMode::IstioMutual {
        // Terminating mTLS needs the gateway's SVID; see `mutual`.
        result.refuse(ResponseFlag::NoRoute, "istio_mutual_unavailable");
        refuse_with_alert(&mut stream, Some(Alert::HandshakeFailure)).await;
        return;
    }

    result.service = Some(route.service.host.clone());
    result.subset = route.subset.map(str::to_string);
    let Some(cluster) = runtime
        .clusters
        .get(&route.service.key())
        .and_then(|c| c.get(route.subset))
    else {
        result.refuse(ResponseFlag::NoHealthyUpstream, "no_cluster");
        refuse_with_alert(&mut stream, Some(Alert::HandshakeFailure)).await;
        return;
    };
    let labels = IstioLabels::new(
        &shared.telemetry.identity,
        &route.service.host,
        &route.service.namespace,
        route.subset,
        None,
        false,
    );
    let counters = result.open_route(labels);
    counters.received.inc_by(buf.len() as u64);

    let Some(_slot) = cluster.admit() else {
        result.refuse(ResponseFlag::UpstreamOverflow, "cluster_max_connections");
        refuse_with_alert(&mut stream, Some(Alert::InternalError)).await;
        return;
    };
    let connect_timeout = cluster.connect_timeout(settings.connect_timeout);
    let observer = MetricsObserver(&shared);
    // Connected means the endpoint answered the replayed ClientHello, so one that
    // accepts and then resets is a failed attempt, and the next endpoint is tried.
    let connected = upstream::connect_and_replay(
        cluster,
        Purpose::Passthrough,
        settings,
        connect_timeout,
        MAX_CONNECT_ATTEMPTS,
        &observer,
        &buf,
    )
    .await;
    let upstream = match connected {
        Ok(c) => c,
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
                %peer,
                sni = offer.sni.as_deref().unwrap_or("-"),
                service = %route.service.host,
                subset = route.subset.unwrap_or("-"),
                error = %e,
                "refused: {}", flag.as_str()
            );
            refuse_with_alert(&mut stream, Some(alert)).await;
            return;
        }
    };
    result.upstream = Some(upstream.addr);

    drop(buf);
    let limits = CopyLimits {
        idle_timeout: cluster.idle_timeout(settings.idle_timeout),
        max_duration: cluster.max_connection_duration(),
    };
    let outcome = copy_tcp(
        &stream,
        &upstream.stream,
        limits,
        ByteCounters {
            to_upstream: Some(&counters.received),
            to_downstream: Some(&counters.sent),
        },
        closing(shared.subscribe_drain()),
    )
    .await;
    result.received += outcome.to_upstream;
    result.sent = outcome.to_downstream;
    match outcome.end {
        CopyEnd::Closed | CopyEnd::Error | CopyEnd::Drained => {}
        CopyEnd::IdleTimeout => result.refuse(ResponseFlag::IdleTimeout, "idle_timeout"),
        CopyEnd::DurationTimeout => {
            result.refuse(ResponseFlag::DurationTimeout, "max_connection_duration")
        }
    }
}

async fn refuse_no_route(stream: &mut TcpStream, result: &mut ConnectionResult, miss: &RouteMiss) {
    result.refuse(ResponseFlag::NoRoute, miss.reason());
    result.detail = Some(miss.to_string());
    tracing::info!(
        peer = %result.downstream,
        sni = result.sni.as_deref().unwrap_or("-"),
        alpn = result.alpn.as_deref().unwrap_or("-"),
        "refused NR: {miss}"
    );
    refuse_with_alert(stream, Some(Alert::UnrecognizedName)).await;
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
}
