//! The double-HBONE peers of `interop/hbone` through the reference gateway: `hbone-peer
//! source` (Istio's `pkg/hbone` dialer for the outer level) → a stock Envoy configured as
//! Istio's ambient east-west gateway on 15008 (AMBIENT.md §6) → `hbone-peer dest`, on
//! loopback. What these tests assert is the behaviour a 15008 listener must match: the
//! tunnel's bytes come back, the inner TLS runs from the source to the destination (the
//! destination sees the source's identity, the source checks the destination's), the
//! `:authority` arrives unchanged, every tunnel of a source shares one outer connection
//! and gets its own upstream connection, and an authority the gateway does not serve
//! gets `404` on its stream while the connection keeps serving.
//!
//! Skipped, loudly, where the peers or Envoy are missing, except under CI.

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use common::hbone::{
    DestStream, HbonePeer, HboneSource, hbone_dest, hbone_peer_bin, reference_gateway_bootstrap,
    tunnel_exchange, tunnel_round_trip,
};
use common::xds::{Envoy, EnvoyOptions};
use common::{TempDir, fill_pattern, free_port, mesh_ca, mesh_cert};

const ECHO: &str = "echo.echo.svc.cluster.local:80";
const UNKNOWN: &str = "nope.echo.svc.cluster.local:80";
const SOURCE_ID: &str = "spiffe://cluster.local/ns/sleep/sa/sleep";
const GATEWAY_ID: &str = "spiffe://cluster.local/ns/istio-system/sa/istio-eastwestgateway";
const DEST_ID: &str = "spiffe://cluster.local/ns/echo/sa/echo";
const FOREIGN_ID: &str = "spiffe://other.example/ns/sleep/sa/sleep";
const WITHIN: Duration = Duration::from_secs(10);

/// SVIDs of one mesh (`strait ca init`, `strait cert issue`), in Istio's file layout.
struct Certs {
    _dir: TempDir,
    source: PathBuf,
    gateway: PathBuf,
    dest: PathBuf,
    /// A source of another trust domain, signed by the same root.
    foreign: PathBuf,
}

fn certs() -> Certs {
    let dir = TempDir::new("hbone-peers");
    let ca = mesh_ca(dir.path(), "cluster.local");
    let issue = |id: &str, name: &str| mesh_cert(&ca, id, &dir.path().join(name));
    Certs {
        source: issue(SOURCE_ID, "source"),
        gateway: issue(GATEWAY_ID, "gateway"),
        dest: issue(DEST_ID, "dest"),
        foreign: issue(FOREIGN_ID, "foreign"),
        _dir: dir,
    }
}

fn loopback() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}

/// The destination `dest-a` and Envoy as the gateway serving [`ECHO`] from it.
struct Reference {
    dest: HbonePeer,
    envoy: Envoy,
    gateway: SocketAddr,
}

async fn reference(certs: &Certs) -> Option<Reference> {
    hbone_peer_bin()?;
    let dest_addr = loopback();
    let dest = hbone_dest(dest_addr, &certs.dest, "dest-a", None).await?;
    let gateway = loopback();
    let admin = loopback();
    let bootstrap = reference_gateway_bootstrap(
        gateway,
        admin,
        &certs.gateway,
        "cluster.local",
        &[(ECHO, &[dest_addr])],
    );
    let envoy = Envoy::launch(
        &bootstrap,
        admin,
        EnvoyOptions {
            delta: false,
            listener: gateway,
        },
        None,
    )
    .await?;
    Some(Reference {
        dest,
        envoy,
        gateway,
    })
}

fn source(certs: &Certs, gateway: SocketAddr, maps: &[(SocketAddr, &str)]) -> HboneSource {
    let mut s = HboneSource::new(gateway, &certs.source);
    s.gateway_id = Some(GATEWAY_ID.into());
    s.dest_id = Some(DEST_ID.into());
    s.network = Some("network2".into());
    s.maps = maps.iter().map(|(a, h)| (*a, h.to_string())).collect();
    s
}

fn stream(authority: &str) -> DestStream {
    DestStream {
        name: "dest-a".into(),
        authority: authority.into(),
        peer: SOURCE_ID.into(),
        network: "network2".into(),
    }
}

/// Envoy's count of connections accepted by the listener on `addr`.
fn downstream_cx(addr: SocketAddr) -> String {
    format!("listener.{}_{}.downstream_cx_total", addr.ip(), addr.port())
}

fn echoed(payload: &[u8]) -> Vec<u8> {
    [b"[dest-a] ".as_slice(), payload].concat()
}

/// Three tunnels through Envoy: each one's bytes (256 KiB for one, half-closed) come
/// back behind the destination's name; the destination saw the `:authority`, the
/// source's SPIFFE ID (its inner TLS client certificate, which Envoy cannot present)
/// and `x-forwarded-network`; Envoy saw one outer connection carrying three streams,
/// and opened one upstream connection per tunnel. Both peers exit 0 on SIGTERM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn double_hbone_through_envoy_is_end_to_end() {
    let certs = certs();
    let Some(Reference {
        mut dest,
        envoy,
        gateway,
    }) = reference(&certs).await
    else {
        return;
    };
    let local = loopback();
    let mut src = source(&certs, gateway, &[(local, ECHO)])
        .start(None)
        .await
        .expect("hbone-peer is built");

    let mut big = vec![0u8; 256 << 10];
    fill_pattern(7, 0, &mut big);
    for payload in [b"hello\n".as_slice(), &big, b"third"] {
        let got = tunnel_round_trip(local, payload, WITHIN).await;
        assert!(
            got.as_deref() == Some(echoed(payload).as_slice()),
            "tunnel of {} bytes: got {:?} bytes\nsource: {:?}\n{}\nenvoy:\n{}",
            payload.len(),
            got.as_ref().map(Vec::len),
            src.lines(),
            src.log(),
            envoy.log()
        );
    }
    let ok = src
        .wait_lines(3, WITHIN, |l| l == format!("TUNNEL-OK authority={ECHO}"))
        .await;
    assert_eq!(ok.len(), 3, "{:?}", src.lines());
    assert_eq!(
        dest.wait_streams(3, WITHIN).await,
        vec![stream(ECHO); 3],
        "{:?}",
        dest.lines()
    );

    let cx = envoy
        .wait_stat(&downstream_cx(gateway), WITHIN, |v| v >= 1)
        .await;
    assert_eq!(cx, Some(1), "one outer connection for every tunnel");
    let streams = envoy
        .wait_stat("http.connect_terminate.downstream_rq_total", WITHIN, |v| {
            v >= 3
        })
        .await;
    assert_eq!(streams, Some(3), "one CONNECT stream per tunnel");
    let upstream = "cluster.inbound-vip|80|tcp|echo.echo.svc.cluster.local.upstream_cx_total";
    assert_eq!(
        envoy.wait_stat(upstream, WITHIN, |v| v >= 3).await,
        Some(3),
        "one upstream connection per tunnel"
    );

    assert_eq!(src.stop(), Some(0), "source exit on SIGTERM");
    assert_eq!(dest.stop(), Some(0), "dest exit on SIGTERM");
}

/// A `:authority` Envoy does not serve gets `404` on its stream, which the source
/// reports as `TUNNEL-ERROR … status=404` and closes the local connection; the outer
/// connection stays up and carries the next tunnel; the destination never sees the
/// refused one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_authority_gets_404_on_its_stream_only() {
    let certs = certs();
    let Some(Reference {
        dest,
        envoy,
        gateway,
    }) = reference(&certs).await
    else {
        return;
    };
    let (known, unknown) = (loopback(), loopback());
    let src = source(&certs, gateway, &[(known, ECHO), (unknown, UNKNOWN)])
        .start(None)
        .await
        .expect("hbone-peer is built");

    assert_eq!(
        tunnel_round_trip(known, b"before", WITHIN).await,
        Some(echoed(b"before"))
    );
    assert_eq!(
        tunnel_round_trip(unknown, b"lost", WITHIN).await,
        Some(Vec::new()),
        "the refused tunnel's local connection is closed with nothing written"
    );
    let refused = src
        .wait_lines(1, WITHIN, |l| l.starts_with("TUNNEL-ERROR"))
        .await;
    assert_eq!(refused.len(), 1, "{:?}", src.lines());
    assert!(
        refused[0].starts_with(&format!("TUNNEL-ERROR authority={UNKNOWN} status=404 ")),
        "{}",
        refused[0]
    );
    assert_eq!(
        tunnel_round_trip(known, b"after", WITHIN).await,
        Some(echoed(b"after"))
    );
    assert_eq!(
        envoy
            .wait_stat("http.connect_terminate.downstream_rq_total", WITHIN, |v| v
                >= 3)
            .await,
        Some(3)
    );
    assert_eq!(
        envoy.stat(&downstream_cx(gateway)).await,
        Some(1),
        "the 404 left the outer connection serving"
    );
    assert_eq!(
        envoy
            .wait_stat("http.connect_terminate.downstream_rq_4xx", WITHIN, |v| v
                >= 1)
            .await,
        Some(1)
    );
    assert_eq!(
        dest.wait_streams(2, WITHIN).await,
        vec![stream(ECHO); 2],
        "{:?}",
        dest.lines()
    );
}

/// The inner TLS ends at the destination, not at the gateway: a source expecting another
/// destination identity refuses the real destination's certificate (a status of 0: the
/// failure is the source's own, after the gateway answered 200), and nothing reaches
/// the destination's application.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_source_checks_the_destination_identity_through_the_gateway() {
    let certs = certs();
    let Some(Reference {
        dest,
        gateway,
        envoy: _envoy,
    }) = reference(&certs).await
    else {
        return;
    };
    let local = loopback();
    let mut wrong = source(&certs, gateway, &[(local, ECHO)]);
    wrong.dest_id = Some("spiffe://cluster.local/ns/echo/sa/other".into());
    let src = wrong.start(None).await.expect("hbone-peer is built");

    assert_eq!(
        tunnel_round_trip(local, b"secret", WITHIN).await,
        Some(Vec::new())
    );
    let refused = src
        .wait_lines(1, WITHIN, |l| l.starts_with("TUNNEL-ERROR"))
        .await;
    assert_eq!(refused.len(), 1, "{:?}", src.lines());
    assert!(
        refused[0].starts_with(&format!("TUNNEL-ERROR authority={ECHO} status=0 "))
            && refused[0].contains(&format!("peer is \"{DEST_ID}\"")),
        "{}",
        refused[0]
    );
    assert!(dest.streams().is_empty(), "{:?}", dest.lines());
}

/// Istio's own `NewDoubleDialer`, running both levels, and the source peer (Istio's
/// dialer for the outer level, its own inner level) look alike through Envoy and to the
/// destination: the same bytes back, the same `:authority` and source identity at the
/// destination, the same `404` for an unknown authority, one outer connection each.
/// Only `x-forwarded-network` differs: `NewDoubleDialer` ignores `Config.Headers`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn istios_double_dialer_and_the_source_peer_agree() {
    let certs = certs();
    let Some(Reference {
        dest,
        envoy,
        gateway,
    }) = reference(&certs).await
    else {
        return;
    };
    let mut payload = vec![0u8; 64 << 10];
    fill_pattern(11, 0, &mut payload);
    let mut seen = Vec::new();
    for double_dialer in [true, false] {
        let (known, unknown) = (loopback(), loopback());
        let mut s = source(&certs, gateway, &[(known, ECHO), (unknown, UNKNOWN)]);
        s.double_dialer = double_dialer;
        let src = s.start(None).await.expect("hbone-peer is built");
        let want = echoed(&payload);
        let got = tunnel_exchange(known, &payload, want.len(), WITHIN).await;
        assert!(
            got.as_deref() == Some(want.as_slice()),
            "double_dialer={double_dialer}: {:?} bytes back\n{:?}\n{}",
            got.as_ref().map(Vec::len),
            src.lines(),
            src.log()
        );
        assert_eq!(
            tunnel_exchange(unknown, b"lost", 1, WITHIN).await,
            Some(Vec::new()),
            "double_dialer={double_dialer}"
        );
        let refused = src
            .wait_lines(1, WITHIN, |l| l.starts_with("TUNNEL-ERROR"))
            .await;
        assert_eq!(refused.len(), 1, "{:?}", src.lines());
        seen.push((
            refused[0].split(" err=").next().unwrap().to_string(),
            src.lines()
                .into_iter()
                .filter(|l| l.starts_with("TUNNEL-OK"))
                .collect::<Vec<_>>(),
        ));
    }
    assert_eq!(seen[0], seen[1], "NewDoubleDialer, then the source peer");
    assert_eq!(
        seen[0].0,
        format!("TUNNEL-ERROR authority={UNKNOWN} status=404")
    );
    let mut without_network = stream(ECHO);
    without_network.network = String::new();
    assert_eq!(
        dest.wait_streams(2, WITHIN).await,
        [without_network, stream(ECHO)],
        "{:?}",
        dest.lines()
    );
    assert_eq!(
        envoy
            .wait_stat("http.connect_terminate.downstream_rq_total", WITHIN, |v| v
                >= 4)
            .await,
        Some(4)
    );
    assert_eq!(
        envoy.stat(&downstream_cx(gateway)).await,
        Some(2),
        "one outer connection per source"
    );
}

/// The gateway admits only its trust domain: a source whose certificate chains to the
/// mesh root but names another trust domain fails the outer handshake (Envoy counts a
/// SAN verification failure), its tunnel is refused with no HTTP status, and nothing
/// reaches the destination.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_of_another_trust_domain_is_refused_at_the_handshake() {
    let certs = certs();
    let Some(Reference {
        dest,
        envoy,
        gateway,
    }) = reference(&certs).await
    else {
        return;
    };
    let local = loopback();
    let mut foreign = source(&certs, gateway, &[(local, ECHO)]);
    foreign.cert_dir = certs.foreign.clone();
    let src = foreign.start(None).await.expect("hbone-peer is built");

    assert_eq!(
        tunnel_round_trip(local, b"hello", WITHIN).await,
        Some(Vec::new())
    );
    let refused = src
        .wait_lines(1, WITHIN, |l| l.starts_with("TUNNEL-ERROR"))
        .await;
    assert_eq!(refused.len(), 1, "{:?}", src.lines());
    assert!(
        refused[0].starts_with(&format!(
            "TUNNEL-ERROR authority={ECHO} status=0 err=outer CONNECT"
        )),
        "{}",
        refused[0]
    );
    let san = format!(
        "listener.{}_{}.ssl.fail_verify_san",
        gateway.ip(),
        gateway.port()
    );
    assert_eq!(envoy.wait_stat(&san, WITHIN, |v| v >= 1).await, Some(1));
    assert_eq!(
        envoy
            .stat("http.connect_terminate.downstream_rq_total")
            .await
            .unwrap_or(0),
        0
    );
    assert!(dest.streams().is_empty(), "{:?}", dest.lines());
}
