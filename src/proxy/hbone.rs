//! Ambient's double HBONE on 15008: terminate the source ztunnel's mTLS (TLS 1.3, ALPN
//! `h2`) with the gateway's SVID, apply AuthorizationPolicy to the client's SPIFFE ID, then
//! serve HTTP/2. Each `CONNECT` stream (RFC 9113 §8.5) is one tunnel: its `:authority`
//! (`<service host>:<service port>`) names a service port, an HBONE-capable endpoint of it
//! is picked and dialled on port 15008, the stream is answered `200`, and its bytes (the
//! inner tunnel's TLS, end to end between the two ztunnels) are copied both ways unread.
//!
//! A tunnel is balanced, counted, logged and refused on its own: a name the gateway does
//! not serve gets `404` on that stream, a service without a reachable endpoint `503`, and
//! the other streams of the connection go on. Flow control is per stream, so a slow
//! destination holds back only its own stream (and at most its stream window of the
//! connection's).
//!
//! Floods are bounded per outer connection and counted in `strait_hbone_refusals_total`:
//! the `h2` crate's own limits (see `h2_refusals`), and Envoy's rule against streams the
//! client resets before they are answered ([`PrematureResets`]).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use bytes::Bytes;
use h2::server::SendResponse;
use h2::{Ping, PingPong, Reason, RecvStream};
use http::{Method, Request, Response, StatusCode};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use super::copy::{ByteCounters, CopyEnd};
use super::h2_copy::copy_h2_tcp;
use super::h2_refusals::{Refusals, Watched};
use super::upstream_leg::{Opened, copy_limits, open_upstream, record_copy};
use super::{DrainState, LiveGuard, OpenGuard, Shared};
use crate::model::{Http2Settings, ServerTlsMode, ServicePort};
use crate::policy::authz::{RbacConn, check_rbac};
use crate::route;
use crate::telemetry::{Accepted, ConnectionResult, IstioLabels, ResponseFlag, RouteMetrics};
use crate::tls::spiffe::SpiffeId;
use crate::tls::{classify_handshake_error, handshake_error_detail, peer_spiffe_id};
use crate::upstream::Purpose;

/// Largest frame the client may send (ztunnel sends up to 1 MiB).
const MAX_FRAME: u32 = 1 << 20;
/// Largest header list a stream may carry; a `CONNECT` needs a few hundred bytes.
const MAX_HEADER_LIST: u32 = 16 << 10;

/// Envoy's defaults against streams reset before they are answered (CVE-2023-44487's
/// second half, which a concurrent-stream limit does not stop): a stream the client resets
/// before its response, within this time of its start, is premature …
const PREMATURE_RESET_LIFETIME: Duration = Duration::from_secs(1);
/// … and a connection is closed once half of its ended streams were premature, counting
/// at least this many (`overload.premature_reset_total_stream_count`).
const PREMATURE_RESET_STREAMS: u32 = 500;

/// The ended streams of one outer connection, and how many were reset prematurely.
#[derive(Default)]
struct PrematureResets {
    ended: AtomicU32,
    premature: AtomicU32,
    /// Told once the rule is broken: the accept loop closes the connection.
    broken: tokio::sync::Notify,
}

impl PrematureResets {
    /// Counts one ended stream; wakes the accept loop when the connection must close.
    fn ended(&self, premature: bool) {
        let ended = self.ended.fetch_add(1, Ordering::Relaxed) + 1;
        let premature = if premature {
            self.premature.fetch_add(1, Ordering::Relaxed) + 1
        } else {
            self.premature.load(Ordering::Relaxed)
        };
        // Envoy's test: below the count, as soon as the premature ones alone would reach
        // half of it; from then on, half of all ended.
        let broken = 2 * premature >= ended.max(PREMATURE_RESET_STREAMS);
        if broken {
            self.broken.notify_one();
        }
    }
}

/// What every tunnel of one outer connection shares, and what keeps the connection
/// counted (for the drain and `maxConnections`) until its last tunnel has finished.
struct Outer {
    listener: SocketAddr,
    downstream: SocketAddr,
    identity: SpiffeId,
    resets: PrematureResets,
    /// The `istio_tcp_*` series of this connection's tunnels, by destination service:
    /// their labels are the client's identity and the service's host and namespace, so
    /// each is looked up once per connection and service ([`Outer::route`]).
    routes: std::sync::Mutex<Vec<(String, String, Arc<RouteMetrics>)>>,
    _live: LiveGuard,
    _open: OpenGuard,
}

/// Destination services whose series one outer connection keeps; a connection that
/// tunnels to more looks the others up per tunnel.
const ROUTES_PER_CONNECTION: usize = 16;

impl Outer {
    /// The `istio_tcp_*` series of a tunnel of this connection to `service`, as Istio's
    /// ambient gateway labels it (`reporter="waypoint"`, `source_principal` the client's).
    fn route(&self, shared: &Shared, service: &ServicePort) -> Arc<RouteMetrics> {
        // A poisoned lock only means another tunnel panicked mid-push; the list is whole.
        let mut routes = self.routes.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, _, route)) = routes
            .iter()
            .find(|(host, ns, _)| *host == service.host && *ns == service.namespace)
        {
            return route.clone();
        }
        let labels = IstioLabels::for_route(
            &shared.telemetry.identity,
            service,
            None,
            Some(&self.identity.principal()),
            true,
        )
        .as_waypoint();
        let route = shared.telemetry.metrics.route(labels);
        if routes.len() < ROUTES_PER_CONNECTION {
            routes.push((
                service.host.clone(),
                service.namespace.clone(),
                route.clone(),
            ));
        }
        route
    }
}

/// Counts a stream as ended when its task ends, premature when so marked.
struct StreamEnd<'a> {
    outer: &'a Outer,
    premature: bool,
}

impl Drop for StreamEnd<'_> {
    fn drop(&mut self) {
        self.outer.resets.ended(self.premature);
    }
}

/// Counts one outer connection as open in `strait_hbone_active_connections`.
struct ActiveOuter(Arc<Shared>);

impl Drop for ActiveOuter {
    fn drop(&mut self) {
        self.0.telemetry.metrics.hbone.active_connections.dec();
    }
}

pub(super) async fn handle(
    shared: Arc<Shared>,
    listener: SocketAddr,
    stream: TcpStream,
    peer: SocketAddr,
    live: LiveGuard,
) {
    let accepted = Accepted::new(shared.telemetry.clone());
    let Some(open) = shared.admit() else {
        let mut result = accepted.into_result(listener, peer);
        result.refuse(ResponseFlag::UpstreamOverflow, "max_connections");
        return;
    };
    let mut result = accepted.into_result(listener, peer);
    result.hbone_outer();
    let _ = stream.set_nodelay(true);
    let runtime = shared.runtime.load_full();
    let settings = &runtime.snapshot.settings;
    let Some(material) = shared.tls.load_full() else {
        result.refuse(ResponseFlag::NoRoute, "no_gateway_certificate");
        tracing::error!("HBONE listener {listener} has no gateway certificate loaded");
        return;
    };
    let acceptor = tokio_rustls::TlsAcceptor::from(material.hbone.clone());
    let tls = match tokio::time::timeout(settings.client_hello_timeout, acceptor.accept(stream))
        .await
    {
        Ok(Ok(tls)) => {
            let kind = tls.get_ref().1.handshake_kind();
            shared.telemetry.metrics.tls_handshakes.server(kind);
            tls
        }
        Ok(Err(e)) => {
            let refusal = classify_handshake_error(&e);
            result.refuse(ResponseFlag::Unauthorized, refusal.reason());
            let detail = handshake_error_detail(&e);
            tracing::info!(%peer, reason = refusal.reason(), "HBONE mTLS handshake refused: {detail}");
            result.detail = Some(detail);
            return;
        }
        Err(_) => {
            result.refuse(ResponseFlag::DownstreamProtocolError, "handshake_timeout");
            return;
        }
    };
    if crate::tls::resumed_past_validity(tls.get_ref().1) {
        result.refuse(
            ResponseFlag::Unauthorized,
            crate::tls::Refusal::Expired.reason(),
        );
        tracing::info!(%peer, "HBONE refused: resumed a session whose client certificate has expired");
        let mut tls = tls;
        let _ = tls.shutdown().await;
        return;
    }
    result.alpn = Some("h2".into());
    // The verifier required a certificate with exactly one SPIFFE ID of a trusted domain.
    let identity = match tls.get_ref().1.peer_certificates().and_then(|c| c.first()) {
        Some(cert) => match peer_spiffe_id(cert) {
            Ok(id) => id,
            Err(_) => {
                result.refuse(ResponseFlag::Unauthorized, "bad_spiffe_id");
                return;
            }
        },
        None => {
            result.refuse(ResponseFlag::Unauthorized, "no_client_certificate");
            return;
        }
    };
    result.peer_identity = Some(identity.to_string());

    // AuthorizationPolicy applies to the outer identity: the source workload's own. The
    // server's RBAC filters are compiled from files or sent by istiod.
    let servers = runtime.servers_for(&listener);
    let server = servers.iter().find(|s| s.mode == ServerTlsMode::Hbone);
    let rbac = server.map_or(&[][..], |s| s.rbac.as_slice());
    // The settings in force when the connection came; a later change applies to the next.
    let http2 = server.map(|s| s.http2).unwrap_or_default();
    // A system call: only where a policy may read the destination address.
    let local = if rbac.is_empty() {
        listener
    } else {
        tls.get_ref().0.local_addr().unwrap_or(listener)
    };
    let verdict = check_rbac(
        rbac,
        &RbacConn {
            principal: Some(identity.as_str()),
            peer,
            local,
            sni: None,
        },
    );
    if let Err(denied) = verdict {
        result.refuse(ResponseFlag::Unauthorized, denied.reason());
        tracing::info!(%peer, identity = %identity, "HBONE connection refused: {denied}");
        result.detail = Some(denied.to_string());
        let mut tls = tls;
        let _ = tls.shutdown().await;
        return;
    }
    drop(runtime);

    let refusals = Refusals::new(
        shared.telemetry.metrics.hbone.refusals.clone(),
        peer,
        identity.to_string(),
    );
    let tls = Watched::new(tls, refusals.clone());
    // Flow control is per stream: a stalled stream holds at most its own window of the
    // connection's, so one slow destination cannot stop the others.
    let handshake = h2::server::Builder::new()
        .initial_window_size(http2.initial_stream_window_size)
        .initial_connection_window_size(http2.initial_connection_window_size)
        .max_frame_size(MAX_FRAME)
        .max_header_list_size(MAX_HEADER_LIST)
        .max_concurrent_streams(http2.max_concurrent_streams)
        .handshake::<_, Bytes>(tls);
    let hello_timeout = shared.runtime.load().snapshot.settings.client_hello_timeout;
    let mut conn = match tokio::time::timeout(hello_timeout, handshake).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            result.refuse(ResponseFlag::DownstreamProtocolError, "http2_preface");
            result.detail = Some(e.to_string());
            return;
        }
        Err(_) => {
            result.refuse(
                ResponseFlag::DownstreamProtocolError,
                "http2_preface_timeout",
            );
            return;
        }
    };
    let metrics = &shared.telemetry.metrics.hbone;
    metrics.connections.inc();
    metrics.active_connections.inc();
    let _active = ActiveOuter(shared.clone());
    let outer = Arc::new(Outer {
        listener,
        downstream: peer,
        identity,
        resets: PrematureResets::default(),
        routes: Default::default(),
        _live: live,
        _open: open,
    });

    serve_streams(&shared, &outer, &mut conn, &mut result, &refusals, &http2).await;
    if let Some(reason) = refusals.goaway() {
        result.refuse(ResponseFlag::DownstreamProtocolError, reason);
        result.detail = Some(format!(
            "GOAWAY {reason} after {} streams refused",
            refusals.streams_refused()
        ));
    }
    // The result is recorded (and its line queued) before the guards let a drain finish.
    drop(result);
    drop(outer);
}

/// Accepts streams, each a tunnel task of its own, until the connection ends, goes
/// quiet on keep-alive, or the drain deadline passes; a drain sends GOAWAY first.
async fn serve_streams<T>(
    shared: &Arc<Shared>,
    outer: &Arc<Outer>,
    conn: &mut h2::server::Connection<T, Bytes>,
    result: &mut ConnectionResult,
    refusals: &Refusals,
    http2: &Http2Settings,
) where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut drain = shared.subscribe_drain();
    let mut draining = false;
    let mut shut = false;
    if *drain.borrow_and_update() != DrainState::Serving {
        conn.graceful_shutdown();
        draining = true;
    }
    let mut closing = std::pin::pin!(shared.closing());
    let mut keepalive = std::pin::pin!(keepalive(conn.ping_pong(), http2));
    loop {
        tokio::select! {
            next = conn.accept() => match next {
                Some(Ok((request, respond))) => {
                    tokio::spawn(tunnel(shared.clone(), outer.clone(), request, respond));
                }
                Some(Err(e)) => {
                    if !e.is_io() && !e.is_go_away() {
                        result.refuse(ResponseFlag::DownstreamProtocolError, "http2_error");
                    }
                    result.detail = Some(e.to_string());
                    break;
                }
                None => break,
            },
            changed = drain.changed(), if !draining => {
                // A closed channel means the gateway is gone; stop taking streams either way.
                if changed.is_err() || *drain.borrow_and_update() != DrainState::Serving {
                    // GOAWAY: no new streams; those open go on until they end.
                    conn.graceful_shutdown();
                    draining = true;
                }
            }
            () = outer.resets.broken.notified(), if !shut => {
                // GOAWAY ENHANCE_YOUR_CALM, and the connection closes.
                refusals.closing_for("too_many_premature_resets");
                conn.abrupt_shutdown(Reason::ENHANCE_YOUR_CALM);
                shut = true;
            }
            () = &mut closing => return,
            () = &mut keepalive => {
                result.refuse(ResponseFlag::DownstreamProtocolError, "keepalive_timeout");
                return;
            }
        }
    }
    // The connection carries its streams' bytes: keep driving it until it closes.
    tokio::select! {
        _ = std::future::poll_fn(|cx| conn.poll_closed(cx)) => {}
        () = &mut closing => {}
    }
}

/// Pings the client every `keepalive_interval`; resolves when an answer takes longer than
/// `keepalive_timeout`. Never resolves when the connection is gone (the accept loop sees
/// that) or cannot ping.
async fn keepalive(ping: Option<PingPong>, http2: &Http2Settings) {
    let Some(mut ping) = ping else {
        return std::future::pending().await;
    };
    loop {
        tokio::time::sleep(http2.keepalive_interval).await;
        match tokio::time::timeout(http2.keepalive_timeout, ping.ping(Ping::opaque())).await {
            Ok(Ok(_)) => {}
            Ok(Err(_)) => return std::future::pending().await,
            Err(_) => return,
        }
    }
}

/// One stream: route its `:authority`, connect, answer, copy.
async fn tunnel(
    shared: Arc<Shared>,
    outer: Arc<Outer>,
    request: Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
) {
    let mut end = StreamEnd {
        outer: &outer,
        premature: false,
    };
    let mut result =
        ConnectionResult::tunnel(shared.telemetry.clone(), outer.listener, outer.downstream);
    result.peer_identity = Some(outer.identity.to_string());
    let authority = request.uri().authority().map(|a| a.as_str().to_string());
    result.authority = authority.clone();
    if request.method() != Method::CONNECT {
        result.refuse(ResponseFlag::NoRoute, "not_connect");
        result.detail = Some(format!(
            "{} request; an HBONE listener takes only CONNECT",
            request.method()
        ));
        return reply(&mut respond, NOT_CONNECT, "only CONNECT is served here\n");
    }
    let Some(authority) = authority else {
        // h2 refuses a CONNECT without :authority itself; kept for completeness.
        result.refuse(ResponseFlag::NoRoute, "bad_authority");
        return reply(&mut respond, StatusCode::NOT_FOUND, "no :authority\n");
    };

    // Route against the configuration in force now; the tunnel keeps it to the end.
    let runtime = shared.runtime.load_full();
    let settings = &runtime.snapshot.settings;
    let servers = runtime.servers_for(&outer.listener);
    let headers = request.headers();
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let routed = route::resolve_authority(servers, &runtime.snapshot.services, &authority, &header);
    let service = match routed {
        Ok(m) => {
            if let Some(s) = &m.source {
                tracing::debug!(peer = %outer.downstream, %authority, source = ?s.value, pick = ?s.pick, "HBONE tunnel dispatched on its source to {}:{}", m.service.host, m.service.port);
            }
            m.service.clone()
        }
        Err(miss) => {
            result.refuse(ResponseFlag::NoRoute, miss.reason());
            tracing::info!(peer = %outer.downstream, %authority, "HBONE tunnel refused NR: {miss}");
            result.detail = Some(miss.to_string());
            return reply(&mut respond, StatusCode::NOT_FOUND, "route not found\n");
        }
    };
    result.service = Some(service.host.clone());
    let clusters = runtime.clusters.get(&service.key());
    let Some(cluster) = clusters.and_then(|c| c.tunnels.clone()) else {
        if clusters.is_some() {
            // The service port has no endpoint that takes HBONE.
            result.refuse(ResponseFlag::NoHealthyUpstream, "no_healthy_endpoint");
            result.detail = Some("no endpoint of the service accepts HBONE".into());
        } else {
            result.refuse(ResponseFlag::NoHealthyUpstream, "no_cluster");
        }
        return reply(
            &mut respond,
            StatusCode::SERVICE_UNAVAILABLE,
            "no healthy upstream\n",
        );
    };
    let counters = result.open_shared_route(outer.route(&shared, &service));
    // A client that gives up before the answer stops the dial at once.
    let dialled = tokio::select! {
        opened = open_upstream(&shared, settings, &cluster, Purpose::Hbone, None, &mut result) => Ok(opened),
        reset = std::future::poll_fn(|cx| respond.poll_reset(cx)) => Err(reset),
    };
    let opened = match dialled {
        Ok(opened) => opened,
        Err(reset) => {
            end.premature = result.elapsed() <= PREMATURE_RESET_LIFETIME;
            result.refuse(
                ResponseFlag::DownstreamConnectionTermination,
                "reset_before_response",
            );
            result.detail = Some(match reset {
                Ok(reason) => format!("the client reset the stream ({reason}) before its answer"),
                Err(e) => format!("the stream ended before its answer: {e}"),
            });
            return;
        }
    };
    let Ok(opened) = opened else {
        let body = if result.flag == ResponseFlag::NoHealthyUpstream {
            "no healthy upstream\n"
        } else {
            "upstream connect error\n"
        };
        return reply(&mut respond, StatusCode::SERVICE_UNAVAILABLE, body);
    };
    let Opened {
        connected,
        _slot: slot,
    } = opened;
    let _slot = slot;
    let _guard = connected.guard;
    let up = connected.stream;
    let mut send = match respond.send_response(Response::new(()), false) {
        Ok(send) => send,
        Err(e) => {
            end.premature = result.elapsed() <= PREMATURE_RESET_LIFETIME;
            result.refuse(
                ResponseFlag::DownstreamConnectionTermination,
                "stream_closed",
            );
            result.detail = Some(e.to_string());
            return;
        }
    };
    let mut recv = request.into_body();
    let counters = ByteCounters {
        to_upstream: Some(counters.received),
        to_downstream: Some(counters.sent),
    };
    let limits = copy_limits(&cluster, settings);
    let outcome = copy_h2_tcp(
        &mut recv,
        &mut send,
        &up,
        limits,
        counters,
        shared.closing(),
    )
    .await;
    if outcome.end == CopyEnd::Error {
        // One side broke: the other is reset rather than closed, as RFC 9113 §8.5 asks
        // (a TCP reset becomes RST_STREAM CONNECT_ERROR, and a stream reset a TCP reset).
        let _ = socket2::SockRef::from(&up).set_linger(Some(Duration::ZERO));
        send.send_reset(Reason::CONNECT_ERROR);
    }
    record_copy(&mut result, &outcome);
}

/// What a request other than `CONNECT` gets: Envoy's answer on the same listener (no route
/// matches it).
const NOT_CONNECT: StatusCode = StatusCode::NOT_FOUND;

/// Answers a refused stream with `status` and a short text, ending it.
fn reply(respond: &mut SendResponse<Bytes>, status: StatusCode, body: &'static str) {
    let mut response = Response::new(());
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain"),
    );
    if let Ok(mut send) = respond.send_response(response, false) {
        let _ = send.send_data(Bytes::from_static(body.as_bytes()), true);
    }
}
