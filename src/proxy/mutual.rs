//! ISTIO_MUTUAL: terminate the client's mTLS with the gateway's SVID, learn the peer's
//! SPIFFE ID, apply AuthorizationPolicy, then forward the decrypted stream to the
//! routed endpoint (in plaintext, or re-encrypted where a DestinationRule asks for
//! ISTIO_MUTUAL).

use std::sync::Arc;

use rustls::pki_types::ServerName;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use super::copy::{ByteCounters, STREAM_SCRATCH, copy_streams};
use super::hello::{Alert, refuse_with_alert};
use super::upstream_leg::{Held, Opened, Splice, copy_limits, open_upstream};
use super::{Runtime, Shared};
use crate::model::{RbacFilter, ServicePort, UpstreamTls};
use crate::policy::authz::{RbacConn, check_rbac};
use crate::route::sni::build_subset_key;
use crate::telemetry::{ConnectionResult, IstioLabels, ResponseFlag};
use crate::tls::io::TlsIo;
use crate::tls::{classify_handshake_error, handshake_error_detail, peer_spiffe_id};
use crate::upstream::Purpose;

/// Where an ISTIO_MUTUAL connection goes once admitted, and what admits it.
pub(super) struct MutualRoute<'a> {
    pub service: Arc<ServicePort>,
    pub subset: Option<String>,
    /// The server's RBAC filters (from istiod, or compiled from files).
    pub rbac: &'a [RbacFilter],
    /// The ALPN protocols the client offered, in its order.
    pub offered_alpn: &'a [Vec<u8>],
}

///
/// Once authorized and connected, the copy runs as a task of its own holding only what
/// it needs (the two streams, the result, the guards), as passthrough's does: the
/// handshake, routing and connecting state, and the tasks that awaited this one, are
/// freed, so an idle connection costs that task alone.
pub(super) async fn serve(
    held: Held,
    shared: &Arc<Shared>,
    runtime: &Runtime,
    route: MutualRoute<'_>,
    mut stream: TcpStream,
    hello: Vec<u8>,
    mut result: ConnectionResult,
) {
    let MutualRoute {
        service,
        subset,
        rbac,
        offered_alpn,
    } = route;
    let settings = &runtime.snapshot.settings;
    result.service = Some(service.host.clone());
    result.subset = subset.clone();
    let Some(material) = shared.tls.load_full() else {
        result.refuse(ResponseFlag::NoRoute, "no_gateway_certificate");
        tracing::error!(
            "ISTIO_MUTUAL server has no certificate loaded from {}",
            settings.cert_dir.display()
        );
        refuse_with_alert(&mut stream, Some(Alert::HandshakeFailure)).await;
        return;
    };
    // A system call: only where a policy may read the destination address.
    let local = if rbac.is_empty() {
        result.listener
    } else {
        stream.local_addr().unwrap_or(result.listener)
    };

    // The handshake reads the ClientHello we already consumed, then the rest from the socket.
    let config = material.server_for(offered_alpn);
    let acceptor = tokio_rustls::TlsAcceptor::from(config.clone());
    let handshake = acceptor.accept(TlsIo::new(hello, stream));
    let tls = match tokio::time::timeout(settings.client_hello_timeout, handshake).await {
        Ok(Ok(mut tls)) => {
            let kind = tls.get_ref().1.handshake_kind();
            shared.telemetry.metrics.tls_handshakes.server(kind);
            tls.get_mut().1.set_buffer_limit(Some(STREAM_SCRATCH));
            tls
        }
        Ok(Err(e)) => {
            let refusal = classify_handshake_error(&e);
            result.refuse(ResponseFlag::Unauthorized, refusal.reason());
            let detail = handshake_error_detail(&e);
            tracing::info!(peer = %result.downstream, reason = refusal.reason(), "mTLS handshake refused: {detail}");
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
        tracing::info!(peer = %result.downstream, "refused: resumed a session whose client certificate has expired");
        let mut tls = tls;
        let _ = tls.shutdown().await;
        return;
    }
    // With PeerAuthentication PERMISSIVE a client may present no certificate; one that
    // is presented has been verified to carry exactly one SPIFFE ID.
    let peer_id = match tls.get_ref().1.peer_certificates().and_then(|c| c.first()) {
        None => None,
        Some(cert) => match peer_spiffe_id(cert) {
            Ok(id) => Some(id),
            Err(_) => {
                result.refuse(ResponseFlag::Unauthorized, "bad_spiffe_id");
                return;
            }
        },
    };
    result.peer_identity = peer_id.as_ref().map(ToString::to_string);

    let conn = RbacConn {
        principal: peer_id.as_ref().map(|id| id.as_str()),
        peer: result.downstream,
        local,
        sni: result.sni.as_deref(),
    };
    if let Err(denied) = check_rbac(rbac, &conn) {
        result.refuse(ResponseFlag::Unauthorized, denied.reason());
        tracing::info!(
            peer = %result.downstream,
            identity = result.peer_identity.as_deref().unwrap_or("(none)"),
            "refused: {denied}"
        );
        result.detail = Some(denied.to_string());
        let mut tls = tls;
        let _ = tls.shutdown().await;
        return;
    }

    let Some(cluster) = runtime
        .clusters
        .get(&service.key())
        .and_then(|c| c.get(subset.as_deref()))
        .cloned()
    else {
        result.refuse(ResponseFlag::NoHealthyUpstream, "no_cluster");
        return;
    };
    let labels = IstioLabels::for_route(
        &shared.telemetry.identity,
        &service,
        subset.as_deref(),
        peer_id.as_ref().map(|id| id.principal()).as_deref(),
        peer_id.is_some(),
    );
    let counters = result.open_route(labels);
    let upstream = match open_upstream(
        shared,
        settings,
        &cluster,
        Purpose::Terminated,
        None,
        &mut result,
    )
    .await
    {
        Ok(u) => u,
        Err(_) => {
            // The client's TLS session is ours: close it cleanly.
            let mut tls = tls;
            let _ = tls.shutdown().await;
            return;
        }
    };
    let limits = copy_limits(&cluster, settings);
    let counters = ByteCounters {
        to_upstream: Some(counters.received.clone()),
        to_downstream: Some(counters.sent.clone()),
    };
    let drain = shared.closing();
    let Opened {
        connected,
        _slot: slot,
    } = upstream;
    // Istio's auto mTLS, as a bridge does it and as istiod's `transport_socket_matches`
    // ask: an endpoint labelled `tlsMode: istio` has a sidecar that expects mTLS.
    let meshed = cluster
        .members
        .get(connected.member)
        .is_some_and(|m| m.endpoint.has_sidecar() && !m.endpoint.tls_disabled);
    if cluster.policy.tls == UpstreamTls::IstioMutual || meshed {
        let Some(client) = material.client(None) else {
            result.refuse(ResponseFlag::UpstreamConnectFailure, "no_client_config");
            return;
        };
        let sni = build_subset_key(service.port, subset.as_deref(), &service.host);
        let name = match ServerName::try_from(sni) {
            Ok(n) => n,
            Err(_) => {
                result.refuse(ResponseFlag::UpstreamConnectFailure, "bad_upstream_sni");
                return;
            }
        };
        let up = tokio_rustls::TlsConnector::from(client.clone())
            .connect(name, TlsIo::plain(connected.stream))
            .await;
        match up {
            Ok(mut up) => {
                up.get_mut().1.set_buffer_limit(Some(STREAM_SCRATCH));
                let kind = up.get_ref().1.handshake_kind();
                shared.telemetry.metrics.tls_handshakes.client(kind);
                let copy = copy_streams(tls, up, limits, counters, drain);
                tokio::spawn(Splice {
                    copy,
                    result,
                    _upstream: (slot, connected.guard),
                    _held: held,
                });
            }
            Err(e) => {
                let refusal = classify_handshake_error(&e);
                result.refuse(ResponseFlag::UpstreamConnectFailure, refusal.reason());
                result.detail = Some(handshake_error_detail(&e));
            }
        }
    } else {
        let copy = copy_streams(tls, connected.stream, limits, counters, drain);
        tokio::spawn(Splice {
            copy,
            result,
            _upstream: (slot, connected.guard),
            _held: held,
        });
    }
}
