//! One downstream connection on a gateway listener: admit, read the ClientHello, route
//! by SNI, connect to an endpoint, replay the ClientHello and splice bytes.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpStream;

use super::copy::{ByteCounters, copy_tcp};
use super::hello::{Alert, HelloError, Offer, read_client_hello, refuse_with_alert};
use super::upstream_leg::{Held, Opened, Splice, copy_limits, open_upstream};
use super::{LiveGuard, Shared};
use crate::model::ServerTlsMode;
use crate::policy::authz::{RbacConn, check_rbac};
use crate::route::{self, RouteMiss};
use crate::telemetry::{Accepted, ConnectionResult, IstioLabels, ResponseFlag};
use crate::upstream::{Connected, Purpose};

pub(super) async fn handle(
    shared: Arc<Shared>,
    listener: SocketAddr,
    mut stream: TcpStream,
    peer: SocketAddr,
    live: LiveGuard,
) {
    let accepted = Accepted::new(shared.telemetry.clone());
    let Some(open) = shared.admit() else {
        let mut result = accepted.into_result(listener, peer);
        result.refuse(ResponseFlag::UpstreamOverflow, "max_connections");
        tracing::debug!(%peer, "refused: maxConnections reached");
        // Close at once: the point of the limit is to spend nothing on the excess.
        return;
    };
    let _ = stream.set_nodelay(true);
    let held = Held {
        _live: live,
        _open: open,
    };
    let hello_timeout = shared.runtime.load().snapshot.settings.client_hello_timeout;
    let mut buf = Vec::new();
    let read = read_client_hello(&mut stream, &mut buf, hello_timeout).await;
    // Everything after the ClientHello is boxed: a connection still sending its
    // ClientHello holds only this small future, not the result, routing and copy state.
    let result = accepted.into_result(listener, peer);
    match read {
        Ok(offer) => Box::pin(forward(held, shared, listener, stream, buf, offer, result)).await,
        Err(e) => Box::pin(refuse_hello(held, stream, buf, e, result)).await,
    }
}

/// Records why no ClientHello could be had and closes, with an alert unless the client
/// has already gone.
async fn refuse_hello(
    _held: Held,
    mut stream: TcpStream,
    buf: Vec<u8>,
    e: HelloError,
    mut result: ConnectionResult,
) {
    result.received = buf.len() as u64;
    let flag = match e {
        HelloError::Closed(_) => ResponseFlag::DownstreamConnectionTermination,
        _ => ResponseFlag::DownstreamProtocolError,
    };
    result.refuse(flag, e.reason());
    tracing::debug!(peer = %result.downstream, error = %e, "refused before routing");
    if !matches!(e, HelloError::Closed(_)) {
        refuse_with_alert(&mut stream, None).await;
    }
}

/// Routes a connection whose ClientHello has arrived, connects, and splices bytes.
/// `held` comes first so it is dropped last, after `result` has queued the access log
/// line (the drain waits for the guards, then flushes the log).
async fn forward(
    held: Held,
    shared: Arc<Shared>,
    listener: SocketAddr,
    mut stream: TcpStream,
    buf: Vec<u8>,
    offer: Offer,
    mut result: ConnectionResult,
) {
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
    let allowed_alpn = servers[route.server]
        .alpn
        .as_deref()
        .unwrap_or(&settings.passthrough_alpn);
    if mode == ServerTlsMode::AutoPassthrough
        && !route::alpn_allowed(offer.alpn_iter(), allowed_alpn)
    {
        let miss = RouteMiss::AlpnNotAllowed {
            offered: offer.alpn_display.clone(),
            allowed: allowed_alpn.join(", "),
        };
        return refuse_no_route(&mut stream, &mut result, &miss).await;
    }
    if let Some(r) = route.route {
        result.routed_by(r, route.service, route.subset);
    }
    let rbac = &servers[route.server].rbac;
    if mode == ServerTlsMode::IstioMutual {
        let to = super::mutual::MutualRoute {
            service: route.service.clone(),
            subset: route.subset.map(str::to_string),
            rbac,
            offered_alpn: &offer.alpn,
        };
        // Boxed: the TLS-terminating path is far larger than passthrough, and an unboxed
        // await would size every passthrough connection's task for it.
        return Box::pin(super::mutual::serve(
            held, &shared, &runtime, to, stream, buf, result,
        ))
        .await;
    }
    // Without TLS terminated the client is unauthenticated: only addresses, ports and
    // the SNI can match. Refused as Envoy's RBAC filter refuses, by closing.
    // Asked only where a policy may read it: the local address costs a system call.
    if !rbac.is_empty() {
        let conn = RbacConn {
            principal: None,
            peer: result.downstream,
            local: stream.local_addr().unwrap_or(listener),
            sni: offer.sni.as_deref(),
        };
        if let Err(denied) = check_rbac(rbac, &conn) {
            result.refuse(ResponseFlag::Unauthorized, denied.reason());
            tracing::info!(peer = %result.downstream, "refused: {denied}");
            result.detail = Some(denied.to_string());
            return;
        }
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
    let route_metrics = cluster.passthrough_metrics.get_or_init(|| {
        shared.telemetry.metrics.route(IstioLabels::for_route(
            &shared.telemetry.identity,
            route.service,
            route.subset,
            None,
            false,
        ))
    });
    let counters = result.open_shared_route(route_metrics.clone());
    counters.received.inc_by(buf.len() as u64);

    let upstream = match open_upstream(
        &shared,
        settings,
        cluster,
        Purpose::of_server(mode),
        // The ClientHello goes to the endpoint exactly as received.
        Some(&buf),
        &mut result,
    )
    .await
    {
        Ok(u) => u,
        Err(alert) => {
            refuse_with_alert(&mut stream, Some(alert)).await;
            return;
        }
    };
    drop(buf);
    // The copy is a task of its own that holds only what it needs, so the routing and
    // connecting state above is freed: an idle connection costs this task alone.
    let Opened {
        connected: Connected {
            stream: up, guard, ..
        },
        _slot: slot,
    } = upstream;
    let counters = ByteCounters {
        to_upstream: Some(counters.received),
        to_downstream: Some(counters.sent),
    };
    tokio::spawn(Splice {
        copy: copy_tcp(
            stream,
            up,
            copy_limits(cluster, settings),
            counters,
            shared.closing(),
        ),
        result,
        _upstream: (slot, guard),
        _held: held,
    });
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
