//! Bridge: a plaintext listener for one service, on behalf of local applications
//! without a sidecar.
//!
//! Each connection picks an endpoint of the bridge's service (and subset) with the
//! same balancer, locality plan and outlier state as the gateway, with one rule of its
//! own ([`Purpose::Bridge`]): endpoints in the bridge's own network are preferred, and
//! endpoints of other networks take traffic only while none of those is healthy.
//!
//! How the chosen endpoint is reached:
//! - **own network, plain**: dialled directly, bytes forwarded as they are;
//! - **own network, meshed** (labelled `security.istio.io/tlsMode: istio`, or the
//!   DestinationRule asks for `ISTIO_MUTUAL`): dialled directly with mTLS, as Istio's
//!   auto-mTLS would, since a sidecar there expects it;
//! - **another network**: through one of that network's gateways from `meshNetworks`
//!   (at random when it has several), with mTLS from this process's SVID, SNI
//!   `outbound_.<port>_.<subset>_.<host>` and ALPN `istio`. An endpoint whose network
//!   has no gateway is unreachable and never picked.
//!
//! Every mTLS hop verifies that the far end (a gateway in ISTIO_MUTUAL, or the workload
//! itself behind an AUTO_PASSTHROUGH gateway) presents a SPIFFE ID of a trusted domain
//! and, when the Bridge names one, exactly the expected `identity`. A far end that fails
//! that check is refused at once (no other endpoint is tried: the configuration, not
//! the endpoint, is what is wrong, and failing over would hide it).

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use crate::tls::io::TlsIo;

use super::copy::{ByteCounters, CopyOutcome, STREAM_SCRATCH, copy_streams, copy_tcp};
use super::upstream_leg::{MAX_CONNECT_ATTEMPTS, MetricsObserver, copy_limits, record_copy};
use super::{Runtime, Shared};
use crate::model::{BridgeSpec, Endpoint, NetworkGateway, ServiceKey, Settings, UpstreamTls};
use crate::route::sni::build_subset_key;
use crate::telemetry::{ConnectionResult, IstioLabels, ResponseFlag};
use crate::tls::{Refusal, classify_handshake_error, handshake_error_detail, peer_spiffe_id};
use crate::upstream::{
    ActiveGuard, AttemptFailure, Cluster, ConnectObserver, Origin, Purpose, dial_address,
    dial_endpoint, in_network,
};

/// How one endpoint is reached from the bridge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hop<'a> {
    /// Dialled directly, plaintext.
    Direct,
    /// Dialled directly, mTLS to the endpoint's sidecar.
    DirectMutual,
    /// Through a gateway of the endpoint's network, mTLS.
    Gateway(&'a NetworkGateway),
}

impl Hop<'_> {
    fn mutual(self) -> bool {
        !matches!(self, Hop::Direct)
    }
}

/// The hop to `endpoint` from a bridge with `settings`, or `None` when it cannot be
/// reached (another network with no gateway in `meshNetworks`). `pick` chooses among a
/// network's gateways.
pub fn hop_for<'a>(
    endpoint: &Endpoint,
    settings: &'a Settings,
    upstream_tls: &UpstreamTls,
    pick: impl FnOnce(usize) -> usize,
) -> Option<Hop<'a>> {
    if in_network(endpoint, &settings.network) {
        let meshed = endpoint.has_sidecar() || *upstream_tls == UpstreamTls::IstioMutual;
        return Some(if meshed && !endpoint.tls_disabled {
            Hop::DirectMutual
        } else {
            Hop::Direct
        });
    }
    let gateways = settings.mesh_networks.get(&endpoint.network)?;
    if gateways.is_empty() {
        return None;
    }
    gateways
        .get(pick(gateways.len()).min(gateways.len() - 1))
        .map(Hop::Gateway)
}

/// The upstream side of a bridged connection.
enum Link {
    Plain(TcpStream),
    Mutual(Box<TlsStream<TlsIo<TcpStream>>>),
}

struct Opened {
    link: Link,
    addr: SocketAddr,
    /// The far end's SPIFFE ID (mTLS hops).
    peer: Option<String>,
    /// The endpoint's network when it is not the bridge's own.
    network: Option<String>,
    _guard: ActiveGuard,
}

/// Why no upstream connection was made: (flag, reason, detail).
type Failure = (ResponseFlag, &'static str, String);

pub(super) async fn handle(
    shared: Arc<Shared>,
    listener: SocketAddr,
    mut stream: TcpStream,
    peer: SocketAddr,
) {
    let mut result = ConnectionResult::new(shared.telemetry.clone(), listener, peer);
    let Some(_open) = shared.admit() else {
        result.refuse(ResponseFlag::UpstreamOverflow, "max_connections");
        return;
    };
    let _ = stream.set_nodelay(true);
    let runtime = shared.runtime.load_full();
    let Some(bridge) = runtime.bridge_at(&listener) else {
        // The listener was removed by a reload while this connection was queued.
        result.refuse(ResponseFlag::NoRoute, "no_bridge");
        return;
    };
    // A VirtualService tcp route picks the destination per connection, as a sidecar's.
    let (key, subset) = match &bridge.route {
        Some(route) => match route.pick() {
            Some(d) => (d.service.clone(), d.subset.as_deref()),
            None => {
                result.refuse(ResponseFlag::NoRoute, "no_destination");
                return;
            }
        },
        None => (
            ServiceKey::new(&bridge.host, bridge.port),
            bridge.subset.as_deref(),
        ),
    };
    result.service = Some(key.host.clone());
    result.subset = subset.map(str::to_string);
    let (Some(service), Some(cluster)) = (
        runtime.snapshot.services.get(&key),
        runtime
            .clusters
            .get(&key)
            .and_then(|c| c.get(subset))
            .cloned(),
    ) else {
        result.refuse(ResponseFlag::NoHealthyUpstream, "no_cluster");
        return;
    };
    if let Some(route) = &bridge.route {
        result.routed_by(route, service, subset);
    }
    let Some(_slot) = cluster.admit() else {
        result.refuse(ResponseFlag::UpstreamOverflow, "cluster_max_connections");
        return;
    };
    let sni = build_subset_key(service.port, subset, &service.host);
    let opened = match open(&shared, &runtime, bridge, &cluster, &sni).await {
        Ok(o) => o,
        Err((flag, reason, detail)) => {
            tracing::info!(
                peer = %peer,
                bridge = %bridge.name,
                service = %service.host,
                "bridge refused {}: {detail}", flag.as_str()
            );
            result.refuse(flag, reason);
            result.detail = Some(detail);
            return;
        }
    };
    result.upstream = Some(opened.addr);
    result.upstream_network = opened.network.clone();
    let mut labels = IstioLabels::for_route(
        &shared.telemetry.identity,
        service,
        subset,
        None,
        opened.peer.is_some(),
    );
    if let Some(p) = &opened.peer {
        result.sni = Some(sni);
        result.peer_identity = Some(p.clone());
        labels = labels.with_destination_principal(p);
    }
    let counters = result.open_route(labels);
    let limits = copy_limits(&cluster, &runtime.snapshot.settings);
    let bytes = ByteCounters {
        to_upstream: Some(counters.received.clone()),
        to_downstream: Some(counters.sent.clone()),
    };
    let drain = shared.closing();
    let outcome = match opened.link {
        Link::Plain(mut up) => copy_tcp(&mut stream, &mut up, limits, bytes, drain).await,
        Link::Mutual(tls) => {
            let ended = Arc::new(OnceLock::new());
            let watched = ReadWatch {
                inner: tls,
                error: ended.clone(),
            };
            let outcome = copy_streams(stream, watched, limits, bytes, drain).await;
            explain_far_end(&mut result, &outcome, ended.get());
            outcome
        }
    };
    record_copy(&mut result, &outcome);
}

/// Puts into the result why an mTLS session ended before the far end sent anything.
/// A far end that refuses the bridge after the handshake (TLS 1.3 verifies the client
/// certificate after the client is done; policy runs after that) can only close the
/// session or send an alert: this is where the bridge learns it.
fn explain_far_end(result: &mut ConnectionResult, outcome: &CopyOutcome, error: Option<&String>) {
    if outcome.to_downstream > 0 {
        if let Some(e) = error {
            result.detail = Some(format!("far end ended the session: {e}"));
        }
        return;
    }
    match error {
        Some(e) => {
            result.refuse(ResponseFlag::UpstreamConnectFailure, "far_end_refused");
            result.detail = Some(format!(
                "far end refused the session before sending any data: {e}"
            ));
        }
        None => {
            // Not a refusal flag: a workload may close without answering. The reason
            // still tells an operator where to look (the far side's access log says why,
            // e.g. an AuthorizationPolicy denial).
            result.reason = "far_end_closed_without_data";
        }
    }
}

/// Connects to an endpoint of `cluster` for `bridge`: up to [`MAX_CONNECT_ATTEMPTS`]
/// distinct endpoints, own network first, each attempt (TCP connect and, for mTLS
/// hops, the handshake) bounded by the connect timeout.
async fn open(
    shared: &Shared,
    runtime: &Runtime,
    bridge: &BridgeSpec,
    cluster: &Cluster,
    sni: &str,
) -> Result<Opened, Failure> {
    let settings = &runtime.snapshot.settings;
    let timeout = cluster.connect_timeout(settings.connect_timeout);
    let observer = MetricsObserver(shared);
    let origin = Origin::from(settings);
    // Endpoints no hop reaches are set aside before picking, so they count as absent.
    let mut exclude: Vec<usize> = cluster
        .members
        .iter()
        .enumerate()
        .filter(|(_, m)| hop_for(&m.endpoint, settings, &cluster.policy.tls, |_| 0).is_none())
        .map(|(i, _)| i)
        .collect();
    let unreachable = exclude.len();
    let mut last = String::new();
    while exclude.len() - unreachable < MAX_CONNECT_ATTEMPTS {
        let Some(idx) = cluster.pick(Purpose::Bridge, origin, &exclude).member() else {
            break;
        };
        exclude.push(idx);
        let member = &cluster.members[idx];
        let Some(hop) = hop_for(&member.endpoint, settings, &cluster.policy.tls, |n| {
            fastrand::usize(..n)
        }) else {
            continue;
        };
        let guard = member.activate();
        observer.attempt();
        let started = Instant::now();
        let dialled = match hop {
            Hop::Direct | Hop::DirectMutual => {
                dial_endpoint(member, member.endpoint.port, timeout, None)
                    .await
                    .map(|(stream, addr, _)| (stream, addr))
            }
            Hop::Gateway(gw) => dial_address(&gw.address, gw.port, timeout).await,
        };
        let network = (!in_network(&member.endpoint, &settings.network))
            .then(|| member.endpoint.network.clone());
        let attempt = match dialled {
            Err(e) => Err(e),
            Ok((tcp, addr)) if !hop.mutual() => Ok((Link::Plain(tcp), addr, None)),
            Ok((tcp, addr)) => {
                let remaining = timeout.saturating_sub(started.elapsed());
                match handshake(shared, bridge, sni, tcp, remaining).await {
                    Ok((tls, peer)) => Ok((Link::Mutual(Box::new(tls)), addr, Some(peer))),
                    Err(Handshake::Rejected(reason, detail)) => {
                        // The endpoint answered; the identity is what is wrong.
                        cluster.record_success(idx);
                        let via = match hop {
                            Hop::Gateway(gw) => format!(" via {}:{}", gw.address, gw.port),
                            _ => String::new(),
                        };
                        return Err((
                            ResponseFlag::UpstreamConnectFailure,
                            reason,
                            format!("{}{via}: {detail}", member.endpoint.authority()),
                        ));
                    }
                    Err(Handshake::Failed(kind, msg)) => Err((kind, format!("{addr}: {msg}"))),
                }
            }
        };
        match attempt {
            Ok((link, addr, peer)) => {
                observer.success(started.elapsed());
                cluster.record_success(idx);
                return Ok(Opened {
                    link,
                    addr,
                    peer,
                    network,
                    _guard: guard,
                });
            }
            Err((kind, msg)) => {
                observer.failure(kind, started.elapsed());
                if let Some(time) = cluster.record_failure(idx) {
                    observer.ejected(cluster, idx, time);
                }
                tracing::debug!(endpoint = %member.endpoint.authority(), error = %msg, "bridge connect attempt failed");
                last = format!("{}: {msg}", member.endpoint.authority());
            }
        }
    }
    let tried = exclude.len() - unreachable;
    if tried == 0 {
        let detail = if unreachable > 0 {
            format!(
                "no healthy endpoint; {unreachable} endpoint(s) sit in networks with no gateway in meshNetworks"
            )
        } else {
            "no healthy endpoint".to_string()
        };
        return Err((
            ResponseFlag::NoHealthyUpstream,
            "no_healthy_endpoint",
            detail,
        ));
    }
    Err((
        ResponseFlag::UpstreamConnectFailure,
        "connect_failed",
        format!("all {tried} connect attempts failed; last: {last}"),
    ))
}

enum Handshake {
    /// The far end's certificate failed verification: refuse, do not fail over.
    Rejected(&'static str, String),
    /// Anything else (reset, timeout, an alert): a failed attempt like a refused connect.
    Failed(AttemptFailure, String),
}

async fn handshake(
    shared: &Shared,
    bridge: &BridgeSpec,
    sni: &str,
    tcp: TcpStream,
    timeout: Duration,
) -> Result<(TlsStream<TlsIo<TcpStream>>, String), Handshake> {
    let material = shared.tls.load_full().ok_or_else(|| {
        Handshake::Rejected(
            "no_bridge_certificate",
            "no SVID loaded for this process; set Bootstrap certificates.dir".to_string(),
        )
    })?;
    let client = material.client(bridge.identity.as_deref()).ok_or_else(|| {
        Handshake::Rejected(
            "no_client_config",
            format!(
                "no client configuration for expected identity {:?}; reload the certificates",
                bridge.identity
            ),
        )
    })?;
    let name = ServerName::try_from(sni.to_string()).map_err(|e| {
        Handshake::Rejected("bad_upstream_sni", format!("SNI {sni} is not usable: {e}"))
    })?;
    let connect = tokio_rustls::TlsConnector::from(client.clone()).connect(name, TlsIo::plain(tcp));
    let tls = match tokio::time::timeout(timeout, connect).await {
        Ok(Ok(mut tls)) => {
            let kind = tls.get_ref().1.handshake_kind();
            shared.telemetry.metrics.tls_handshakes.client(kind);
            tls.get_mut().1.set_buffer_limit(Some(STREAM_SCRATCH));
            tls
        }
        Ok(Err(e)) => {
            let refusal = classify_handshake_error(&e);
            let detail = handshake_error_detail(&e);
            return Err(match refusal {
                Refusal::Other | Refusal::NoClientCert => {
                    Handshake::Failed(AttemptFailure::Reset, format!("mTLS handshake: {detail}"))
                }
                r => Handshake::Rejected(r.reason(), detail),
            });
        }
        Err(_) => {
            return Err(Handshake::Failed(
                AttemptFailure::Timeout,
                format!("mTLS handshake timed out after {timeout:?}"),
            ));
        }
    };
    let peer = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .map(peer_spiffe_id);
    match peer {
        Some(Ok(id)) => Ok((tls, id.to_string())),
        // The verifier already required exactly one SPIFFE ID; this is a second guard.
        _ => Err(Handshake::Rejected(
            "bad_spiffe_id",
            "far end presented no usable SPIFFE ID".to_string(),
        )),
    }
}

/// Remembers the first read error of the stream it wraps (an alert from the far end),
/// which the copy would otherwise swallow.
struct ReadWatch<S> {
    inner: S,
    error: Arc<OnceLock<String>>,
}

impl<S: AsyncRead + Unpin> AsyncRead for ReadWatch<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Err(e)) = &polled {
            let _ = self.error.set(handshake_error_detail(e));
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for ReadWatch<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{EndpointAddress, Locality, TLS_MODE_LABEL};
    use std::collections::BTreeMap;

    fn endpoint(network: &str, tls_mode: Option<&str>) -> Endpoint {
        let mut labels = BTreeMap::new();
        if let Some(m) = tls_mode {
            labels.insert(TLS_MODE_LABEL.to_string(), m.to_string());
        }
        Endpoint {
            address: EndpointAddress::Ip([10, 0, 0, 1].into()),
            port: 8080,
            tls_disabled: tls_mode == Some("disabled"),
            reach: crate::model::Reach::Any,
            labels,
            locality: Locality::default(),
            network: network.into(),
            weight: 1,
            service_account: None,
            priority: None,
            locality_weight: None,
        }
    }

    fn settings() -> Settings {
        let mut s = Settings {
            network: "net1".into(),
            ..Default::default()
        };
        s.mesh_networks.insert(
            "net2".into(),
            vec![
                NetworkGateway {
                    address: "192.0.2.1".into(),
                    port: 15443,
                },
                NetworkGateway {
                    address: "gw.example".into(),
                    port: 15443,
                },
            ],
        );
        s.mesh_networks.insert("net3".into(), Vec::new());
        s
    }

    #[test]
    fn own_network_is_direct_and_meshed_endpoints_get_mtls() {
        let s = settings();
        let plain = UpstreamTls::Plaintext;
        let hop = |e: &Endpoint, tls: &UpstreamTls| hop_for(e, &s, tls, |_| 0);
        assert_eq!(hop(&endpoint("net1", None), &plain), Some(Hop::Direct));
        assert_eq!(hop(&endpoint("", None), &plain), Some(Hop::Direct));
        assert_eq!(
            hop(&endpoint("net1", Some("istio")), &plain),
            Some(Hop::DirectMutual)
        );
        assert_eq!(
            hop(&endpoint("", None), &UpstreamTls::IstioMutual),
            Some(Hop::DirectMutual)
        );
        // `disabled` wins over a DestinationRule: the endpoint cannot terminate mTLS.
        assert_eq!(
            hop(&endpoint("", Some("disabled")), &UpstreamTls::IstioMutual),
            Some(Hop::Direct)
        );
    }

    #[test]
    fn other_networks_go_through_their_gateways_or_nowhere() {
        let s = settings();
        let plain = UpstreamTls::Plaintext;
        let e = endpoint("net2", Some("istio"));
        assert_eq!(
            hop_for(&e, &s, &plain, |_| 1),
            Some(Hop::Gateway(&s.mesh_networks["net2"][1]))
        );
        // An out-of-range choice is clamped, never a panic.
        assert_eq!(
            hop_for(&e, &s, &plain, |n| n + 5),
            Some(Hop::Gateway(&s.mesh_networks["net2"][1]))
        );
        assert_eq!(hop_for(&endpoint("net3", None), &s, &plain, |_| 0), None);
        assert_eq!(hop_for(&endpoint("net4", None), &s, &plain, |_| 0), None);
        // A bridge with no network of its own still routes named networks via gateways.
        let mut anywhere = settings();
        anywhere.network.clear();
        assert!(matches!(
            hop_for(&e, &anywhere, &plain, |_| 0),
            Some(Hop::Gateway(_))
        ));
        assert_eq!(
            hop_for(&endpoint("", None), &anywhere, &plain, |_| 0),
            Some(Hop::Direct)
        );
    }
}
