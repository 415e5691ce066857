//! The sidecar-less bridge on loopback: a `Bridge` in network1 carries a local app's
//! plaintext through network2's gateway (127.0.0.2) to the workload, with mTLS from the
//! bridge's SVID; both far-end modes, both wrong-identity refusals, and failover
//! between networks. `tests/netns.rs` runs the same path across real namespaces.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const MIB: u64 = 1024 * 1024;
const SNI: &str = "outbound_.9080_.v1_.reviews.default.svc.cluster.local";

fn at(ip: &str, port: u16) -> SocketAddr {
    format!("{ip}:{port}").parse().unwrap()
}

fn str_of<'a>(line: &'a serde_json::Value, key: &str) -> &'a str {
    line[key].as_str().unwrap_or("")
}

/// The far end for `far`: a plaintext echo (ISTIO_MUTUAL) or a workload terminating
/// mTLS itself (AUTO_PASSTHROUGH), on 127.0.0.3.
enum Far {
    Plain(RawEcho),
    Meshed(MeshedEcho),
}

impl Far {
    fn start(far: FarEnd, mesh: &Mesh) -> Far {
        let l = std::net::TcpListener::bind("127.0.0.3:0").unwrap();
        match far {
            FarEnd::IstioMutual => Far::Plain(raw_echo_on(l)),
            FarEnd::AutoPassthrough => {
                Far::Meshed(MeshedEcho::start_on(l, &mesh.workload, "cluster.local"))
            }
        }
    }

    fn addr(&self) -> SocketAddr {
        match self {
            Far::Plain(e) => e.addr,
            Far::Meshed(e) => e.addr,
        }
    }
}

async fn carries_32_mib_each_way(far: FarEnd) {
    let mesh = Mesh::new();
    let workload = Far::start(far, &mesh);
    let gw_ports = Ports::new();
    let gateway = Strait::start(
        gw_ports,
        &network2_gateway(&gw_ports, "127.0.0.2", &mesh.gateway, far, workload.addr()),
    );
    let gw_addr = at("127.0.0.2", gw_ports.gateway);
    let br_ports = Ports::new();
    let listen = at("127.0.0.1", br_ports.gateway);
    let expected = match far {
        FarEnd::IstioMutual => GATEWAY_ID,
        FarEnd::AutoPassthrough => WORKLOAD_ID,
    };
    let bridge = Strait::start(
        br_ports,
        &network1_bridge(&br_ports, listen, &mesh.bridge, gw_addr, expected, &[], ""),
    );

    let app = TcpStream::connect(listen).await.unwrap();
    let moved = bulk_echo(app, 7, 32 * MIB).await;
    assert_eq!(
        moved,
        Ok(32 * MIB),
        "bridge stderr:\n{}\ngateway stderr:\n{}",
        bridge.stderr_text(),
        gateway.stderr_text()
    );

    // The bridge's half: the far end it verified, the gateway it went through, the SNI.
    let b = bridge
        .wait_log(Duration::from_secs(5), |l| {
            str_of(l, "listener") == listen.to_string()
        })
        .expect("bridge access log line");
    assert_eq!(str_of(&b, "response_flag"), "-", "{b}");
    assert_eq!(str_of(&b, "peer_identity"), expected);
    assert_eq!(str_of(&b, "upstream"), gw_addr.to_string());
    assert_eq!(str_of(&b, "upstream_network"), "network2");
    assert_eq!(str_of(&b, "sni"), SNI);
    assert_eq!(str_of(&b, "service"), REVIEWS);
    assert_eq!(str_of(&b, "subset"), "v1");
    assert_eq!(b["bytes_received"], 32 * MIB);
    assert_eq!(b["bytes_sent"], 32 * MIB);
    let labels = [
        ("destination_service", REVIEWS),
        ("destination_principal", expected),
        ("source_cluster", "cluster1"),
        ("connection_security_policy", "mutual_tls"),
    ];
    assert_eq!(
        bridge.metric("istio_tcp_received_bytes_total", &labels),
        (32 * MIB) as f64
    );
    assert_eq!(
        bridge.metric("istio_tcp_sent_bytes_total", &labels),
        (32 * MIB) as f64
    );

    // The gateway's half: the same SNI, and (where it terminates) the bridge's identity.
    let g = gateway
        .wait_log(Duration::from_secs(5), |l| str_of(l, "sni") == SNI)
        .expect("gateway access log line");
    assert_eq!(str_of(&g, "response_flag"), "-", "{g}");
    assert_eq!(str_of(&g, "service"), REVIEWS);
    assert_eq!(str_of(&g, "upstream"), workload.addr().to_string());
    match &workload {
        Far::Plain(_) => {
            assert_eq!(str_of(&g, "peer_identity"), BRIDGE_ID);
            let labels = [
                ("destination_service", REVIEWS),
                ("source_principal", BRIDGE_ID),
                ("source_cluster", "cluster2"),
                ("connection_security_policy", "mutual_tls"),
            ];
            assert_eq!(
                gateway.metric("istio_tcp_sent_bytes_total", &labels),
                (32 * MIB) as f64
            );
        }
        Far::Meshed(w) => {
            // The session is end to end: the workload itself saw the bridge's SVID.
            assert_eq!(*w.peers.lock().unwrap(), vec![BRIDGE_ID.to_string()]);
            // Ciphertext is a little larger than the plaintext it carries.
            assert!(g["bytes_received"].as_u64().unwrap() > 32 * MIB, "{g}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bridge_carries_32_mib_each_way_through_an_istio_mutual_gateway() {
    carries_32_mib_each_way(FarEnd::IstioMutual).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bridge_carries_32_mib_each_way_end_to_end_through_an_auto_passthrough_gateway() {
    carries_32_mib_each_way(FarEnd::AutoPassthrough).await;
}

/// Writes a line and reads until close: what the app gets back.
async fn app_exchange(listen: SocketAddr) -> Vec<u8> {
    let mut s = TcpStream::connect(listen).await.unwrap();
    let _ = s.write_all(b"hello\n").await;
    let mut back = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut back)).await;
    back
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_identities_fail_closed_with_a_reason_on_both_sides() {
    let mesh = Mesh::new();
    let workload = Far::start(FarEnd::IstioMutual, &mesh);

    // 1. network2's gateway holds an SVID of another trust domain: the bridge refuses it.
    let evil_ca = mesh_ca(mesh.dir.path(), "evil.local");
    let evil = mesh_cert(
        &evil_ca,
        "spiffe://evil.local/ns/istio-system/sa/eastwest",
        &mesh.dir.path().join("evil-gw"),
    );
    let gw_ports = Ports::new();
    let gateway = Strait::start(
        gw_ports,
        &network2_gateway(
            &gw_ports,
            "127.0.0.2",
            &evil,
            FarEnd::IstioMutual,
            workload.addr(),
        ),
    );
    let gw_addr = at("127.0.0.2", gw_ports.gateway);
    let br_ports = Ports::new();
    let listen = at("127.0.0.1", br_ports.gateway);
    let bridge = Strait::start(
        br_ports,
        &network1_bridge(
            &br_ports,
            listen,
            &mesh.bridge,
            gw_addr,
            GATEWAY_ID,
            &[],
            "",
        ),
    );
    assert_eq!(app_exchange(listen).await, b"", "nothing may pass");
    let b = bridge
        .wait_log(Duration::from_secs(5), |l| {
            str_of(l, "response_flag") != "-"
        })
        .expect("bridge refusal logged");
    assert_eq!(str_of(&b, "response_flag"), "UF", "{b}");
    assert_eq!(str_of(&b, "reason"), "untrusted_trust_domain", "{b}");
    assert!(
        str_of(&b, "detail").contains("spiffe://evil.local/ns/istio-system/sa/eastwest"),
        "{b}"
    );
    let g = gateway
        .wait_log(Duration::from_secs(5), |l| {
            str_of(l, "response_flag") != "-"
        })
        .expect("gateway refusal logged");
    assert_eq!(str_of(&g, "response_flag"), "UAEX", "{g}");
    assert!(!str_of(&g, "detail").is_empty(), "{g}");
    assert_eq!(
        bridge.metric(
            "strait_refusals_total",
            &[
                ("response_flag", "UF"),
                ("reason", "untrusted_trust_domain")
            ]
        ),
        1.0
    );
    drop((gateway, bridge));

    // 2. A bridge whose identity the gateway's policy does not allow.
    let gw_ports = Ports::new();
    let gateway = Strait::start(
        gw_ports,
        &network2_gateway(
            &gw_ports,
            "127.0.0.2",
            &mesh.gateway,
            FarEnd::IstioMutual,
            workload.addr(),
        ),
    );
    let gw_addr = at("127.0.0.2", gw_ports.gateway);
    let intruder = mesh.issue("spiffe://cluster.local/ns/default/sa/intruder", "intruder");
    let br_ports = Ports::new();
    let listen = at("127.0.0.1", br_ports.gateway);
    let bridge = Strait::start(
        br_ports,
        &network1_bridge(&br_ports, listen, &intruder, gw_addr, GATEWAY_ID, &[], ""),
    );
    assert_eq!(app_exchange(listen).await, b"", "nothing may pass");
    let g = gateway
        .wait_log(Duration::from_secs(5), |l| {
            str_of(l, "response_flag") != "-"
        })
        .expect("gateway refusal logged");
    assert_eq!(str_of(&g, "response_flag"), "UAEX", "{g}");
    assert_eq!(
        str_of(&g, "peer_identity"),
        "spiffe://cluster.local/ns/default/sa/intruder"
    );
    assert!(str_of(&g, "detail").contains("bridges-only"), "{g}");
    let b = bridge
        .wait_log(Duration::from_secs(5), |l| {
            str_of(l, "listener") == listen.to_string()
        })
        .expect("bridge line logged");
    assert_eq!(str_of(&b, "peer_identity"), GATEWAY_ID, "{b}");
    assert_eq!(str_of(&b, "reason"), "far_end_closed_without_data", "{b}");
    assert_eq!(b["bytes_sent"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bridge_prefers_its_own_network_fails_over_to_the_remote_one_and_returns() {
    let mesh = Mesh::new();
    let remote = Far::start(FarEnd::IstioMutual, &mesh);
    let gw_ports = Ports::new();
    let gateway = Strait::start(
        gw_ports,
        &network2_gateway(
            &gw_ports,
            "127.0.0.2",
            &mesh.gateway,
            FarEnd::IstioMutual,
            remote.addr(),
        ),
    );
    let gw_addr = at("127.0.0.2", gw_ports.gateway);
    let local_l = std::net::TcpListener::bind(("127.0.0.4", free_port())).unwrap();
    let local_addr = local_l.local_addr().unwrap();
    let local = raw_echo_on(local_l);
    let br_ports = Ports::new();
    let listen = at("127.0.0.1", br_ports.gateway);
    let bridge = Strait::start(
        br_ports,
        &network1_bridge(
            &br_ports,
            listen,
            &mesh.bridge,
            gw_addr,
            GATEWAY_ID,
            &[local_addr],
            "    outlierDetection: {consecutiveErrors: 1, interval: 1s, baseEjectionTime: 1s, maxEjectionPercent: 100}\n",
        ),
    );
    let round = || async {
        let app = TcpStream::connect(listen).await.unwrap();
        bulk_echo(app, 1, 4096).await
    };
    let gateway_lines = || {
        gateway
            .access_log()
            .iter()
            .filter(|l| str_of(l, "sni") == SNI)
            .count()
    };

    // Local endpoint healthy: all traffic stays in network1, dialled directly.
    for _ in 0..4 {
        assert_eq!(round().await, Ok(4096));
    }
    assert_eq!(local.accepted(), 4);
    // The gateway would log a connection only once it ended: none may come.
    let quiet = Duration::from_millis(300);
    assert_eq!(
        gateway.settled(Duration::from_secs(5), quiet, gateway_lines),
        0
    );

    // Local endpoint gone: every connection still succeeds, through network2.
    local.stop().await;
    for _ in 0..4 {
        assert_eq!(round().await, Ok(4096), "{}", bridge.stderr_text());
    }
    assert!(
        gateway.eventually(Duration::from_secs(5), || gateway_lines() == 4),
        "gateway saw {} connections",
        gateway_lines()
    );
    let b = bridge
        .wait_log(Duration::from_secs(5), |l| {
            str_of(l, "upstream_network") == "network2"
        })
        .unwrap();
    assert_eq!(str_of(&b, "peer_identity"), GATEWAY_ID);

    // Back again: once its ejection ends, traffic returns to network1.
    let local = raw_echo_on(std::net::TcpListener::bind(local_addr).unwrap());
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while local.accepted() == 0 && std::time::Instant::now() < deadline {
        assert_eq!(round().await, Ok(4096));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(local.accepted() > 0, "traffic never came back to network1");
    // The gateway logs a connection when it ends: count once the count stops moving.
    let via_gateway = gateway.settled(Duration::from_secs(5), quiet, gateway_lines);
    for _ in 0..4 {
        assert_eq!(round().await, Ok(4096));
    }
    assert_eq!(
        gateway.settled(Duration::from_secs(5), quiet, gateway_lines),
        via_gateway,
        "remote used while local healthy"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_moves_the_bridge_listener() {
    let mesh = Mesh::new();
    let local_l = std::net::TcpListener::bind(("127.0.0.4", free_port())).unwrap();
    let local_addr = local_l.local_addr().unwrap();
    let local = raw_echo_on(local_l);
    let ports = Ports::new();
    let first = at("127.0.0.1", ports.gateway);
    let gw = at("127.0.0.2", free_port());
    let bridge = Strait::start(
        ports,
        &network1_bridge(
            &ports,
            first,
            &mesh.bridge,
            gw,
            GATEWAY_ID,
            &[local_addr],
            "",
        ),
    );
    let app = TcpStream::connect(first).await.unwrap();
    assert_eq!(bulk_echo(app, 3, 1024).await, Ok(1024));

    let second = at("127.0.0.1", free_port());
    replace_file(
        &bridge.config_path(),
        &network1_bridge(
            &ports,
            second,
            &mesh.bridge,
            gw,
            GATEWAY_ID,
            &[local_addr],
            "",
        ),
    );
    let mut moved = false;
    for _ in 0..200 {
        if TcpStream::connect(second).await.is_ok() && TcpStream::connect(first).await.is_err() {
            moved = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        moved,
        "listener did not move; stderr:\n{}",
        bridge.stderr_text()
    );
    let app = TcpStream::connect(second).await.unwrap();
    assert_eq!(bulk_echo(app, 4, 1024).await, Ok(1024));
    assert!(local.accepted() >= 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mesh_virtual_service_splits_bridged_connections_by_weight() {
    let mesh = Mesh::new();
    let reviews_l = std::net::TcpListener::bind(("127.0.0.1", free_port())).unwrap();
    let reviews_addr = reviews_l.local_addr().unwrap();
    let reviews = raw_echo_on(reviews_l);
    let ratings_l = std::net::TcpListener::bind(("127.0.0.1", free_port())).unwrap();
    let ratings_port = ratings_l.local_addr().unwrap().port();
    let ratings = raw_echo_on(ratings_l);
    let ports = Ports::new();
    let listen = at("127.0.0.1", ports.gateway);
    // As a sidecar would: a VirtualService without `gateways` (the mesh) for the
    // Bridge's host sends half its connections to ratings.
    let config = format!(
        "{}---\napiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: ratings, namespace: default}}\nspec:\n  hosts: [ratings.default.svc.cluster.local]\n  ports: [{{number: 9080, name: tcp, targetPort: {ratings_port}}}]\n  resolution: STATIC\n  endpoints: [{{address: 127.0.0.1, network: network1}}]\n---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: reviews-split, namespace: default}}\nspec:\n  hosts: [reviews]\n  tcp:\n  - match: [{{port: 9080}}]\n    route:\n    - destination: {{host: reviews, subset: v1}}\n      weight: 50\n    - destination: {{host: ratings}}\n      weight: 50\n",
        network1_bridge(
            &ports,
            listen,
            &mesh.bridge,
            at("127.0.0.9", 1),
            GATEWAY_ID,
            &[reviews_addr],
            "",
        )
    );
    let bridge = Strait::start(ports, &config);
    const N: u64 = 200;
    for _ in 0..N {
        let app = TcpStream::connect(listen).await.unwrap();
        assert_eq!(
            bulk_echo(app, 2, 512).await,
            Ok(512),
            "{}",
            bridge.stderr_text()
        );
    }
    let (a, b) = (reviews.accepted(), ratings.accepted());
    assert_eq!(a + b, N);
    assert!(
        (70..=130).contains(&a),
        "reviews {a}, ratings {b}: 50 % expected"
    );
    assert!(bridge.eventually(Duration::from_secs(5), || {
        bridge.metric(
            "strait_route_destination_total",
            &[
                ("virtual_service", "default/reviews-split"),
                ("destination_service", "ratings.default.svc.cluster.local"),
            ],
        ) == b as f64
    }));
}

/// What a far-end TLS server saw of one handshake: the groups the client listed, in its
/// order, and the group agreed with how (`None`: the handshake failed).
type Seen = (
    Vec<rustls::NamedGroup>,
    Option<(rustls::NamedGroup, rustls::HandshakeKind)>,
);

/// Records the groups of each ClientHello while choosing the certificate.
#[derive(Debug)]
struct RecordGroups {
    key: std::sync::Arc<rustls::sign::CertifiedKey>,
    offered: std::sync::Arc<std::sync::Mutex<Vec<Vec<rustls::NamedGroup>>>>,
}

impl rustls::server::ResolvesServerCert for RecordGroups {
    fn resolve(
        &self,
        hello: rustls::server::ClientHello<'_>,
    ) -> Option<std::sync::Arc<rustls::sign::CertifiedKey>> {
        let groups = hello.named_groups().unwrap_or_default().to_vec();
        self.offered.lock().unwrap().push(groups);
        Some(self.key.clone())
    }
}

/// A stand-in for network2's gateway that accepts only the key-exchange `groups` (a rustls
/// server with the gateway's SVID), records what each client offered and agreed, and
/// echoes. `seen` holds one entry per connection.
async fn group_probe(
    mesh: &Mesh,
    groups: &[rustls::NamedGroup],
) -> (
    SocketAddr,
    std::sync::Arc<std::sync::Mutex<Vec<Seen>>>,
    tokio::task::JoinHandle<()>,
) {
    use std::sync::{Arc, Mutex};
    let id = strait::tls::load_identity(&mesh.gateway).unwrap();
    let provider = provider_with_groups(groups);
    let signer = provider
        .key_provider
        .load_private_key(id.key.clone_key())
        .unwrap();
    let offered = Arc::new(Mutex::new(Vec::new()));
    let resolver = RecordGroups {
        key: Arc::new(rustls::sign::CertifiedKey::new(id.chain.clone(), signer)),
        offered: offered.clone(),
    };
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(resolver));
    config.alpn_protocols = vec![b"istio".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.2:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = seen.clone();
    let task = tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let agreed = match acceptor.accept(tcp).await {
                Ok(mut tls) => {
                    let (_, conn) = tls.get_ref();
                    let agreed = conn
                        .negotiated_key_exchange_group()
                        .map(|g| g.name())
                        .zip(conn.handshake_kind());
                    let mut buf = [0u8; 64];
                    if let Ok(Ok(n)) =
                        tokio::time::timeout(Duration::from_secs(5), tls.read(&mut buf)).await
                    {
                        let _ = tls.write_all(&buf[..n]).await;
                        let _ = tls.shutdown().await;
                    }
                    agreed
                }
                Err(_) => None,
            };
            let first = offered.lock().unwrap().drain(..).next().unwrap_or_default();
            record.lock().unwrap().push((first, agreed));
        }
    });
    (addr, seen, task)
}

/// The groups the bridge offers as a client, pinned against real TLS servers that accept
/// only some: X25519 first (with its key share), then P-256, then, with aws-lc-rs, the
/// post-quantum hybrid; never P-384. A server accepting X25519 gets it in one round trip
/// (Envoy sidecars, ztunnel, istiod), one accepting only P-256 or only the hybrid (Istio's
/// `pqc` compliance policy) asks for it with a HelloRetryRequest and gets it, and one
/// accepting only P-384 gets no handshake. ISTIO_MUTUAL origination to a sidecar uses the
/// same client configuration (`strait::tls::client_config`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bridge_offers_x25519_first_then_p256_and_never_p384() {
    use rustls::HandshakeKind::{Full, FullWithHelloRetryRequest};
    use rustls::NamedGroup::{X25519, X25519MLKEM768, secp256r1, secp384r1};
    let pq = strait::tls::provider::POST_QUANTUM;
    let offered: Vec<rustls::NamedGroup> = [X25519, secp256r1]
        .into_iter()
        .chain(pq.then_some(X25519MLKEM768))
        .collect();
    let mut cases = vec![
        (vec![secp384r1, secp256r1, X25519], Some((X25519, Full))),
        (
            vec![secp256r1],
            Some((secp256r1, FullWithHelloRetryRequest)),
        ),
        (vec![secp384r1], None),
    ];
    if pq {
        cases.push((
            vec![X25519MLKEM768],
            Some((X25519MLKEM768, FullWithHelloRetryRequest)),
        ));
    }
    let mesh = Mesh::new();
    for (accepts, expected) in cases {
        let (far, seen, _task) = group_probe(&mesh, &accepts).await;
        let ports = Ports::new();
        let listen = at("127.0.0.1", ports.gateway);
        let bridge = Strait::start(
            ports,
            &network1_bridge(&ports, listen, &mesh.bridge, far, GATEWAY_ID, &[], ""),
        );
        let back = app_exchange(listen).await;
        let ok = bridge.eventually(Duration::from_secs(10), || !seen.lock().unwrap().is_empty());
        assert!(
            ok,
            "accepting {accepts:?}: no handshake seen\n{}",
            bridge.stderr_text()
        );
        let (groups, agreed) = seen.lock().unwrap()[0].clone();
        assert_eq!(groups, offered, "accepting {accepts:?}");
        assert_eq!(
            agreed,
            expected,
            "accepting {accepts:?}\n{}",
            bridge.stderr_text()
        );
        assert_eq!(
            !back.is_empty(),
            expected.is_some(),
            "accepting {accepts:?}: {back:?}"
        );
    }
}

/// Writes a line, half-closes and reads until close: what the app gets back.
async fn closing_exchange(listen: SocketAddr) -> Vec<u8> {
    let mut s = TcpStream::connect(listen).await.unwrap();
    let _ = s.write_all(b"hello\n").await;
    let _ = s.shutdown().await;
    let mut back = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut back)).await;
    back
}

/// `strait_tls_handshakes_total` of `s` for `role` and `session` (`new` or `resumed`).
fn handshakes(s: &Strait, role: &str, session: &str) -> f64 {
    s.metric(
        "strait_tls_handshakes_total",
        &[("role", role), ("session", session)],
    )
}

/// A bridge resumes its TLS sessions with the gateway (as Envoy's upstream TLS does):
/// after the first connection, both sides count resumed handshakes, and the gateway
/// still authorizes each resumed connection with the bridge's identity (its policy
/// allows only that principal). A second Bridge of the same process to the same gateway
/// and server name, expecting another identity, never rides the first one's sessions: it
/// makes its own full handshake, verifies the gateway's SVID and refuses it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bridge_resumes_gateway_sessions_only_under_the_identity_it_expects() {
    let mesh = Mesh::new();
    let workload = Far::start(FarEnd::IstioMutual, &mesh);
    let gw_ports = Ports::new();
    let gateway = Strait::start(
        gw_ports,
        &network2_gateway(
            &gw_ports,
            "127.0.0.2",
            &mesh.gateway,
            FarEnd::IstioMutual,
            workload.addr(),
        ),
    );
    let gw_addr = at("127.0.0.2", gw_ports.gateway);
    let br_ports = Ports::new();
    let listen = at("127.0.0.1", br_ports.gateway);
    let other_listen = at("127.0.0.1", Ports::new().gateway);
    let other_id = "spiffe://cluster.local/ns/istio-system/sa/another-gateway";
    let config = format!(
        "{}---\napiVersion: strait.dev/v1alpha1\nkind: Bridge\nmetadata: {{name: reviews-other}}\nspec:\n  listen: \"{other_listen}\"\n  host: {REVIEWS}\n  port: 9080\n  subset: v1\n  identity: {other_id}\n",
        network1_bridge(
            &br_ports,
            listen,
            &mesh.bridge,
            gw_addr,
            GATEWAY_ID,
            &[],
            ""
        )
    );
    let bridge = Strait::start(br_ports, &config);

    for i in 0..3 {
        assert_eq!(
            closing_exchange(listen).await,
            b"hello\n",
            "connection {i}\n{}\n{}",
            bridge.stderr_text(),
            gateway.stderr_text()
        );
    }
    let counted = bridge.eventually(Duration::from_secs(5), || {
        handshakes(&bridge, "client", "new") == 1.0
            && handshakes(&bridge, "client", "resumed") == 2.0
            && handshakes(&gateway, "server", "new") == 1.0
            && handshakes(&gateway, "server", "resumed") == 2.0
    });
    assert!(
        counted,
        "bridge new {} resumed {}; gateway new {} resumed {}",
        handshakes(&bridge, "client", "new"),
        handshakes(&bridge, "client", "resumed"),
        handshakes(&gateway, "server", "new"),
        handshakes(&gateway, "server", "resumed"),
    );
    // Every connection, resumed or not, was authorized as the bridge.
    let allowed = gateway.eventually(Duration::from_secs(5), || {
        let lines = gateway.access_log();
        lines.len() == 3
            && lines.iter().all(|l| {
                str_of(l, "response_flag") == "-" && str_of(l, "peer_identity") == BRIDGE_ID
            })
    });
    assert!(allowed, "{:?}", gateway.access_log());

    // The other Bridge: same gateway, same SNI, another expected identity.
    assert_eq!(
        closing_exchange(other_listen).await,
        b"",
        "nothing may pass"
    );
    let b = bridge
        .wait_log(Duration::from_secs(5), |l| {
            str_of(l, "listener") == other_listen.to_string()
        })
        .expect("the other bridge's refusal logged");
    assert_eq!(str_of(&b, "response_flag"), "UF", "{b}");
    assert_eq!(str_of(&b, "reason"), "identity_mismatch", "{b}");
    assert!(str_of(&b, "detail").contains(GATEWAY_ID), "{b}");
    assert_eq!(handshakes(&bridge, "client", "resumed"), 2.0);
    // The gateway counts a handshake when its own task finishes it, which may be after
    // the bridge has refused and logged.
    let resumed = gateway.settled(Duration::from_secs(5), Duration::from_millis(300), || {
        handshakes(&gateway, "server", "resumed")
    });
    assert_eq!(resumed, 2.0);
}

/// One connection from `from` to the gateway at `gw` with `tls` (a client keeping its
/// session tickets): whether it resumed, and what the echo behind the gateway sent back.
async fn resuming_exchange(
    tls: &std::sync::Arc<rustls::ClientConfig>,
    from: &str,
    gw: SocketAddr,
) -> (Option<rustls::HandshakeKind>, SocketAddr, Vec<u8>) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(at(from, 0)).unwrap();
    let tcp = socket.connect(gw).await.unwrap();
    let local = tcp.local_addr().unwrap();
    let name = rustls::pki_types::ServerName::try_from(SNI).unwrap();
    let mut s = tokio_rustls::TlsConnector::from(tls.clone())
        .connect(name, tcp)
        .await
        .unwrap();
    let kind = s.get_ref().1.handshake_kind();
    let _ = s.write_all(b"hello\n").await;
    let _ = s.shutdown().await;
    let mut back = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut back)).await;
    (kind, local, back)
}

/// The gateway's side of resumption, with a client that keeps its tickets: a resumed
/// connection carries the identity of the session it resumes, and authorization still
/// runs on it (a DENY by source address refuses a resumed connection from that address,
/// naming the session's identity); a client with another SVID gets a full handshake of
/// its own and is refused as itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_authorizes_every_resumed_connection_as_its_sessions_identity() {
    use rustls::HandshakeKind::{Full, Resumed};
    let mesh = Mesh::new();
    let workload = Far::start(FarEnd::IstioMutual, &mesh);
    let gw_ports = Ports::new();
    let deny = "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: deny-five, namespace: istio-system}\nspec:\n  action: DENY\n  rules:\n  - from:\n    - source: {ipBlocks: [\"127.0.0.5/32\"]}\n";
    let gateway = Strait::start(
        gw_ports,
        &format!(
            "{}{deny}",
            network2_gateway(
                &gw_ports,
                "127.0.0.2",
                &mesh.gateway,
                FarEnd::IstioMutual,
                workload.addr(),
            )
        ),
    );
    let gw_addr = at("127.0.0.2", gw_ports.gateway);
    let resuming = |certs: &std::path::Path| {
        let base = mesh_client_config(
            certs,
            &[rustls::NamedGroup::X25519],
            &[&rustls::version::TLS13],
            &["istio"],
        )
        .unwrap();
        let mut config = (*base).clone();
        config.resumption = rustls::client::Resumption::store(std::sync::Arc::new(
            strait::tls::resume::TicketStore::new(),
        ));
        std::sync::Arc::new(config)
    };
    let bridge = resuming(&mesh.bridge);
    let line = |local: SocketAddr| {
        gateway
            .wait_log(Duration::from_secs(5), |l| {
                str_of(l, "downstream") == local.to_string()
            })
            .expect("gateway access log line")
    };

    let (kind, local, back) = resuming_exchange(&bridge, "127.0.0.1", gw_addr).await;
    assert_eq!((kind, back.as_slice()), (Some(Full), &b"hello\n"[..]));
    assert_eq!(str_of(&line(local), "peer_identity"), BRIDGE_ID);

    let (kind, local, back) = resuming_exchange(&bridge, "127.0.0.1", gw_addr).await;
    assert_eq!((kind, back.as_slice()), (Some(Resumed), &b"hello\n"[..]));
    let l = line(local);
    assert_eq!(str_of(&l, "response_flag"), "-", "{l}");
    assert_eq!(str_of(&l, "peer_identity"), BRIDGE_ID, "{l}");

    // Resumed, from the denied address: refused, as the session's identity.
    let (kind, local, back) = resuming_exchange(&bridge, "127.0.0.5", gw_addr).await;
    assert_eq!((kind, back.as_slice()), (Some(Resumed), &b""[..]));
    let l = line(local);
    assert_eq!(str_of(&l, "response_flag"), "UAEX", "{l}");
    assert_eq!(str_of(&l, "peer_identity"), BRIDGE_ID, "{l}");
    assert!(str_of(&l, "detail").contains("deny-five"), "{l}");

    // Another SVID: its own full handshake, refused by the ALLOW policy as itself.
    let intruder =
        resuming(&mesh.issue("spiffe://cluster.local/ns/default/sa/intruder", "intruder"));
    let (kind, local, back) = resuming_exchange(&intruder, "127.0.0.1", gw_addr).await;
    assert_eq!((kind, back.as_slice()), (Some(Full), &b""[..]));
    let l = line(local);
    assert_eq!(str_of(&l, "response_flag"), "UAEX", "{l}");
    assert_eq!(
        str_of(&l, "peer_identity"),
        "spiffe://cluster.local/ns/default/sa/intruder",
        "{l}"
    );
    let counted = gateway.eventually(Duration::from_secs(5), || {
        handshakes(&gateway, "server", "new") == 2.0
            && handshakes(&gateway, "server", "resumed") == 2.0
    });
    assert!(counted, "{}", gateway.stderr_text());
}
