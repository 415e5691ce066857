//! What operators observe, against the real binary: the Prometheus exposition (checked
//! by promtool), exact counters after a scripted mix of traffic, readiness through
//! start and drain, the admin endpoints, the access log, and the servers under abuse.

mod common;

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::*;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const DEAD: &str = "dead.default.svc.cluster.local";
const SPIFFE_V1: &str = "spiffe://cluster.local/ns/default/sa/reviews-v1";
const SPIFFE_V2: &str = "spiffe://cluster.local/ns/default/sa/reviews-v2";
const SPIFFE_RATINGS: &str = "spiffe://cluster.local/ns/default/sa/ratings";

fn sni(subset: &str, host: &str) -> String {
    format!("outbound_.9080_.{subset}_.{host}")
}

/// reviews (v1, v2 subsets), ratings, and `dead`, whose only endpoint refuses
/// connections and is ejected after two failures.
struct Mesh {
    ca: TestCa,
    v1: Workload,
    v2: Workload,
    ratings: Workload,
    dead_port: u16,
    /// Keeps `dead_port` reserved (bound, not listening) for the test's life.
    _dead: socket2::Socket,
}

impl Mesh {
    async fn start() -> Mesh {
        let ca = TestCa::new();
        let (dead_port, dead) = dead_port();
        Mesh {
            v1: Workload::start(&ca, SPIFFE_V1).await,
            v2: Workload::start(&ca, SPIFFE_V2).await,
            ratings: Workload::start(&ca, SPIFFE_RATINGS).await,
            dead_port,
            _dead: dead,
            ca,
        }
    }

    fn config(&self, ports: &Ports, bootstrap_extra: &str) -> String {
        format!(
            r#"{bootstrap}---
{gateway}---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: reviews, namespace: default}}
spec:
  hosts: [{REVIEWS}]
  location: MESH_INTERNAL
  resolution: STATIC
  ports:
  - {{number: 9080, name: tcp-reviews, protocol: TCP}}
  endpoints:
  - address: 127.0.0.1
    ports: {{tcp-reviews: {v1}}}
    locality: us-east/zone-a
    labels: {{app: reviews, version: v1, security.istio.io/tlsMode: istio}}
  - address: 127.0.0.1
    ports: {{tcp-reviews: {v2}}}
    labels: {{app: reviews, version: v2, security.istio.io/tlsMode: istio}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: reviews, namespace: default}}
spec:
  host: {REVIEWS}
  subsets:
  - name: v1
    labels: {{version: v1}}
  - name: v2
    labels: {{version: v2}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: ratings, namespace: default}}
spec:
  hosts: [{RATINGS}]
  resolution: STATIC
  ports:
  - {{number: 9080, name: tcp, protocol: TCP, targetPort: {ratings}}}
  endpoints:
  - address: 127.0.0.1
    labels: {{app: ratings, security.istio.io/tlsMode: istio}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: dead, namespace: default}}
spec:
  hosts: [{DEAD}]
  resolution: STATIC
  ports:
  - {{number: 9080, name: tcp, protocol: TCP, targetPort: {dead}}}
  endpoints:
  - address: 127.0.0.1
    labels: {{app: dead, security.istio.io/tlsMode: istio}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: dead, namespace: default}}
spec:
  host: {DEAD}
  trafficPolicy:
    outlierDetection: {{consecutiveErrors: 2, baseEjectionTime: 60s, maxEjectionPercent: 100}}
"#,
            bootstrap = ports.bootstrap(bootstrap_extra),
            gateway = ports.gateway_doc(&["*.local"]),
            v1 = self.v1.addr.port(),
            v2 = self.v2.addr.port(),
            ratings = self.ratings.addr.port(),
            dead = self.dead_port,
        )
    }

    fn gateway(&self, bootstrap_extra: &str) -> Strait {
        let ports = Ports::new();
        Strait::start(ports, &self.config(&ports, bootstrap_extra))
    }
}

/// Bytes a client put on the wire and took off it, counted below TLS.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
struct Wire {
    written: u64,
    read: u64,
}

/// A whole TLS session through the gateway: handshake, `payload` bytes echoed, close
/// both ways, read to EOF. Returns the exact bytes each way on the TCP connection.
async fn echo_session(
    gateway: std::net::SocketAddr,
    ca: &TestCa,
    sni: &str,
    payload: usize,
) -> Wire {
    let (config, _) = client_config(ca, &["istio"]);
    let tcp = TcpStream::connect(gateway).await.unwrap();
    tcp.set_nodelay(true).unwrap();
    let counting = Counting::new(tcp);
    let (written, read) = (counting.written.clone(), counting.read.clone());
    let mut tls = tokio_rustls::TlsConnector::from(config)
        .connect(ServerName::try_from(sni.to_string()).unwrap(), counting)
        .await
        .unwrap();
    let data: Vec<u8> = (0..payload).map(|i| (i % 251) as u8).collect();
    assert_eq!(echo_once(&mut tls, &data).await, data);
    tls.shutdown().await.unwrap();
    let mut rest = Vec::new();
    // The workload answers close_notify with its own and closes; anything after the
    // echo is TLS framing, counted by the wrapper.
    let _ = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut rest)).await;
    assert!(rest.is_empty(), "unexpected data after echo");
    Wire {
        written: written.load(Ordering::Relaxed),
        read: read.load(Ordering::Relaxed),
    }
}

/// Sends `bytes` (nothing: just closes) on a raw connection and waits for the gateway to close it.
async fn raw_session(gateway: std::net::SocketAddr, bytes: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(gateway).await.unwrap();
    if bytes.is_empty() {
        // A client that leaves without a word.
        s.shutdown().await.unwrap();
    } else {
        s.write_all(bytes).await.unwrap();
    }
    read_until_close(&mut s, Duration::from_secs(3))
        .await
        .expect("gateway closes a refused connection promptly")
}

fn expect_metric(text: &str, name: &str, labels: &[(&str, &str)], want: f64) {
    let got = metric_value(text, name, labels);
    assert_eq!(got, want, "{name}{labels:?}");
}

/// Fails (or skips loudly when promtool is absent) unless the exposition parses.
fn assert_exposition_parses(text: &str) {
    match promtool_check(text) {
        Some(Ok(())) => {}
        Some(Err(report)) => panic!("promtool check metrics failed:\n{report}\n---\n{text}"),
        None => eprintln!(
            "\n!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n\
             !!! SKIPPED: promtool not found; the Prometheus exposition was NOT validated. !!!\n\
             !!! Install it with `apt-get install -y prometheus` (.ci/run does).         !!!\n\
             !!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n"
        ),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_scripted_mix_is_counted_exactly_and_the_exposition_parses() {
    let mesh = Mesh::start().await;
    let gw = mesh.gateway("");
    let addr = gw.gateway;

    // Good sessions: three to reviews v1, two to ratings, with different sizes.
    let mut reviews = Wire::default();
    for i in 1..=3usize {
        let w = echo_session(addr, &mesh.ca, &sni("v1", REVIEWS), i * 40_000 + 17).await;
        reviews.written += w.written;
        reviews.read += w.read;
    }
    let mut ratings = Wire::default();
    for i in 1..=2usize {
        let w = echo_session(addr, &mesh.ca, &sni("", RATINGS), i * 3_000 + 5).await;
        ratings.written += w.written;
        ratings.read += w.read;
    }
    // Two unknown names, one client speaking HTTP, one that leaves without a word.
    let unknown = client_hello_bytes(&sni("", "nope.default.svc.cluster.local"), &["istio"]);
    raw_session(addr, &unknown).await;
    raw_session(addr, &client_hello_bytes(&sni("v9", REVIEWS), &["istio"])).await;
    raw_session(addr, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    raw_session(addr, b"").await;
    // The dead endpoint: refused twice (UF), then ejected, so the third finds none (UH).
    let dead_hello = client_hello_bytes(&sni("", DEAD), &["istio"]);
    for _ in 0..3 {
        let alert = raw_session(addr, &dead_hello).await;
        assert_eq!(alert.first(), Some(&0x15), "refusal is a TLS alert");
    }

    // A refused client sees the close a moment before the gateway records it.
    assert!(
        gw.eventually(Duration::from_secs(5), || {
            gw.metric("strait_connection_duration_seconds_count", &[]) == 12.0
        }),
        "12 connections recorded"
    );
    assert!(gw.eventually(Duration::from_secs(5), || {
        metric_value(&gw.metrics_text(), "strait_active_connections", &[]) == 0.0
    }));
    // After its duration, a connection counts its refusal, then its close: the last of
    // the twelve may still be doing so.
    gw.wait_metric("strait_refusals_total", &[], |v| v == 7.0);
    gw.wait_metric("istio_tcp_connections_closed_total", &[], |v| v == 8.0);
    let m = gw.metrics_text();
    assert_exposition_parses(&m);

    // Istio's TCP metrics, with the labels a gateway can fill.
    let rev = [
        ("reporter", "source"),
        ("destination_service", REVIEWS),
        ("destination_service_name", "reviews"),
        ("destination_service_namespace", "default"),
        ("destination_version", "v1"),
        ("source_workload", "istio-eastwestgateway"),
        ("request_protocol", "tcp"),
        ("connection_security_policy", "unknown"),
        ("source_principal", "unknown"),
    ];
    expect_metric(&m, "istio_tcp_connections_opened_total", &rev, 3.0);
    expect_metric(
        &m,
        "istio_tcp_connections_closed_total",
        &[("destination_service", REVIEWS), ("response_flags", "-")],
        3.0,
    );
    // Exact bytes: received = everything the client wrote (ClientHello included), sent =
    // everything it read.
    expect_metric(
        &m,
        "istio_tcp_received_bytes_total",
        &rev,
        reviews.written as f64,
    );
    expect_metric(&m, "istio_tcp_sent_bytes_total", &rev, reviews.read as f64);
    let rat = [
        ("destination_service", RATINGS),
        ("destination_version", "unknown"),
    ];
    expect_metric(&m, "istio_tcp_connections_opened_total", &rat, 2.0);
    expect_metric(
        &m,
        "istio_tcp_received_bytes_total",
        &rat,
        ratings.written as f64,
    );
    expect_metric(&m, "istio_tcp_sent_bytes_total", &rat, ratings.read as f64);
    let dead = [("destination_service", DEAD)];
    expect_metric(&m, "istio_tcp_connections_opened_total", &dead, 3.0);
    expect_metric(
        &m,
        "istio_tcp_connections_closed_total",
        &[("destination_service", DEAD), ("response_flags", "UF")],
        2.0,
    );
    expect_metric(
        &m,
        "istio_tcp_connections_closed_total",
        &[("destination_service", DEAD), ("response_flags", "UH")],
        1.0,
    );
    expect_metric(
        &m,
        "istio_tcp_received_bytes_total",
        &dead,
        3.0 * dead_hello.len() as f64,
    );
    expect_metric(&m, "istio_tcp_sent_bytes_total", &dead, 0.0);
    // Refused before routing: no Istio series at all.
    assert!(
        !m.contains("nope.default"),
        "an unknown name became a label"
    );

    // Gateway metrics.
    expect_metric(&m, "strait_downstream_connections_total", &[], 12.0);
    expect_metric(&m, "strait_refusals_total", &[("response_flag", "NR")], 2.0);
    expect_metric(
        &m,
        "strait_refusals_total",
        &[("response_flag", "DPE")],
        1.0,
    );
    expect_metric(&m, "strait_refusals_total", &[("response_flag", "DC")], 1.0);
    expect_metric(&m, "strait_refusals_total", &[("response_flag", "UF")], 2.0);
    expect_metric(&m, "strait_refusals_total", &[("response_flag", "UH")], 1.0);
    expect_metric(&m, "strait_refusals_total", &[], 7.0);
    expect_metric(&m, "strait_upstream_connect_attempts_total", &[], 7.0);
    expect_metric(
        &m,
        "strait_upstream_connect_failures_total",
        &[("reason", "refused")],
        2.0,
    );
    expect_metric(&m, "strait_upstream_connect_failures_total", &[], 2.0);
    expect_metric(
        &m,
        "strait_upstream_connect_duration_seconds_count",
        &[],
        5.0,
    );
    // Every connect that replayed a ClientHello waited for the endpoint's first byte.
    expect_metric(
        &m,
        "strait_upstream_first_byte_seconds_count",
        &[("outcome", "answered")],
        5.0,
    );
    expect_metric(&m, "strait_upstream_first_byte_seconds_count", &[], 5.0);
    expect_metric(&m, "strait_client_hello_bytes_count", &[], 10.0);
    expect_metric(&m, "strait_client_hello_wait_seconds_count", &[], 10.0);
    expect_metric(&m, "strait_connection_duration_seconds_count", &[], 12.0);
    expect_metric(
        &m,
        "strait_config_reloads_total",
        &[("result", "success")],
        1.0,
    );
    expect_metric(
        &m,
        "strait_config_reloads_total",
        &[("result", "failure")],
        0.0,
    );
    // Endpoint health: the dead endpoint is ejected, the others healthy.
    let dead_ep = format!("127.0.0.1:{}", mesh.dead_port);
    expect_metric(
        &m,
        "strait_endpoint_healthy",
        &[("endpoint", &dead_ep)],
        0.0,
    );
    expect_metric(
        &m,
        "strait_endpoint_ejections_total",
        &[("endpoint", &dead_ep)],
        1.0,
    );
    for ep in [mesh.v1.addr, mesh.v2.addr, mesh.ratings.addr] {
        expect_metric(
            &m,
            "strait_endpoint_healthy",
            &[("endpoint", &ep.to_string())],
            1.0,
        );
    }
    expect_metric(&m, "strait_endpoint_ejections_total", &[], 1.0);
    assert_eq!(
        m.lines()
            .filter(|l| l.starts_with("strait_endpoint_healthy{"))
            .count(),
        4,
        "one health series per declared endpoint"
    );

    // The access log tells the same story, one line per connection.
    assert!(gw.eventually(Duration::from_secs(3), || gw.access_log().len() == 12));
    let log = gw.access_log();
    let flags: Vec<&str> = log
        .iter()
        .map(|l| l["response_flag"].as_str().unwrap())
        .collect();
    for (flag, n) in [
        ("-", 5),
        ("NR", 2),
        ("DPE", 1),
        ("DC", 1),
        ("UF", 2),
        ("UH", 1),
    ] {
        assert_eq!(
            flags.iter().filter(|f| **f == flag).count(),
            n,
            "flag {flag}: {flags:?}"
        );
    }
    let good: Vec<_> = log.iter().filter(|l| l["response_flag"] == "-").collect();
    let sum = |svc: &str, field: &str| -> u64 {
        good.iter()
            .filter(|l| l["service"] == svc)
            .map(|l| l[field].as_u64().unwrap())
            .sum()
    };
    assert_eq!(sum(REVIEWS, "bytes_received"), reviews.written);
    assert_eq!(sum(REVIEWS, "bytes_sent"), reviews.read);
    assert_eq!(sum(RATINGS, "bytes_received"), ratings.written);
    assert_eq!(sum(RATINGS, "bytes_sent"), ratings.read);
    for l in &good {
        for field in [
            "start_time",
            "downstream",
            "sni",
            "service",
            "upstream",
            "duration_ms",
        ] {
            assert!(!l[field].is_null(), "{field} missing in {l}");
        }
    }
    let v1_line = good.iter().find(|l| l["service"] == REVIEWS).unwrap();
    assert_eq!(v1_line["subset"], "v1");
    assert_eq!(v1_line["upstream"], mesh.v1.addr.to_string());
    assert_eq!(v1_line["sni"], sni("v1", REVIEWS));
    let nr = log.iter().find(|l| l["response_flag"] == "NR").unwrap();
    assert_eq!(nr["bytes_received"].as_u64(), Some(unknown.len() as u64));
    let uf = log.iter().find(|l| l["response_flag"] == "UF").unwrap();
    assert_eq!(uf["service"], DEAD);
    assert!(uf["upstream"].is_null());

    // /clusters agrees with the gauges.
    let (code, body) = http_get(gw.admin, "/clusters").unwrap();
    assert_eq!(code, 200);
    let clusters: serde_json::Value = serde_json::from_str(&body).unwrap();
    let dead_cluster = clusters["clusters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["service"] == DEAD && c["subset"].is_null())
        .unwrap();
    assert_eq!(dead_cluster["endpoints"][0]["health"], "ejected");
    assert_eq!(dead_cluster["endpoints"][0]["ejections"], 1);
}

/// The set of series (name and labels, without values) in an exposition.
fn series(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.rsplit_once(' ').map(|(s, _)| s.to_string()))
        .collect()
}

fn random_label(n: usize) -> String {
    (0..n)
        .map(|_| (b'a' + fastrand::u8(0..26)) as char)
        .collect()
}

/// Random refused handshakes of every kind an attacker can vary: unknown hosts, hosts
/// outside the Gateway, undeclared subsets and ports, non-Istio ALPNs, no SNI at all.
async fn sni_flood(gateway: std::net::SocketAddr, n: usize) -> Vec<String> {
    let mut names = Vec::new();
    let mut tasks = Vec::new();
    for i in 0..n {
        let r = random_label(12);
        let (name, alpn) = match i % 5 {
            0 => (sni("", &format!("{r}.default.svc.cluster.local")), "istio"),
            1 => (format!("{r}.example.com"), "istio"),
            2 => (sni(&r, REVIEWS), "istio"),
            3 => (format!("outbound_.{}_._.{REVIEWS}", 10_000 + i), "istio"),
            _ => (sni("", REVIEWS), r.as_str()),
        };
        let hello = client_hello_bytes(&name, &[alpn]);
        names.push(r);
        tasks.push(tokio::spawn(
            async move { raw_session(gateway, &hello).await },
        ));
    }
    // A ClientHello without SNI: a raw record from an IP-addressed rustls client.
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    config.alpn_protocols = vec![b"istio".to_vec()];
    let mut conn = rustls::ClientConnection::new(
        std::sync::Arc::new(config),
        ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()),
    )
    .unwrap();
    let mut no_sni = Vec::new();
    conn.write_tls(&mut no_sni).unwrap();
    raw_session(gateway, &no_sni).await;
    for t in tasks {
        t.await.unwrap();
    }
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_flood_of_random_snis_leaves_the_series_bounded() {
    let mesh = Mesh::start().await;
    let gw = mesh.gateway("  accessLog: off\n");
    let before = series(&gw.metrics_text());
    let first = sni_flood(gw.gateway, 150).await;
    // A refused client sees the close a moment before the gateway records it.
    let recorded = |n: f64| gw.metric("strait_connection_duration_seconds_count", &[]) == n;
    // Each is refused (NR) just after its duration is recorded: the series are read
    // once every refusal is counted too.
    let refused = |n: f64| {
        gw.wait_metric("strait_refusals_total", &[("response_flag", "NR")], |v| {
            v == n
        })
    };
    assert!(gw.eventually(Duration::from_secs(5), || recorded(151.0)));
    refused(151.0);
    let after_first = series(&gw.metrics_text());
    let second = sni_flood(gw.gateway, 150).await;
    assert!(gw.eventually(Duration::from_secs(5), || recorded(302.0)));
    refused(302.0);
    let text = gw.metrics_text();
    let after_second = series(&text);

    // Refusal reasons are a small fixed set: the first flood may add a handful of
    // series (one per reason), the second, with all-new names, adds none.
    let added: Vec<_> = after_first.difference(&before).collect();
    assert!(
        added.len() <= 12,
        "first flood added {} series: {added:#?}",
        added.len()
    );
    let added_again: Vec<_> = after_second.difference(&after_first).collect();
    assert!(
        added_again.is_empty(),
        "second flood added series: {added_again:#?}"
    );
    for name in first.iter().chain(&second) {
        assert!(
            !text.contains(name.as_str()),
            "client-chosen {name} became a label"
        );
    }
    expect_metric(
        &text,
        "strait_refusals_total",
        &[("response_flag", "NR")],
        302.0,
    );
    assert_exposition_parses(&text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_is_never_200_before_the_listeners_are_bound() {
    let mesh = Mesh::start().await;
    let ports = Ports::new();
    let status = std::net::SocketAddr::from(([127, 0, 0, 1], ports.status));
    let gateway = std::net::SocketAddr::from(([127, 0, 0, 1], ports.gateway));
    // Poll as fast as we can from before the process exists; the first 200 must find
    // the data listener already accepting.
    let poller = std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut answers = Vec::new();
        while Instant::now() < deadline {
            match http_get(status, "/healthz/ready") {
                Ok((200, _)) => {
                    let bound =
                        std::net::TcpStream::connect_timeout(&gateway, Duration::from_secs(1))
                            .is_ok();
                    return (answers, bound);
                }
                Ok((code, _)) => answers.push(code),
                Err(_) => {}
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        panic!("never ready");
    });
    let gw = Strait::spawn(ports, &mesh.config(&ports, ""), &[], &[], &[]);
    let (earlier, bound) = poller.join().unwrap();
    assert!(
        bound,
        "readiness said 200 while the gateway port refused connections"
    );
    assert!(
        earlier.iter().all(|c| *c == 503),
        "before ready: {earlier:?}"
    );
    drop(gw);

    // A listener that cannot be bound: the process fails and is never ready.
    let ports = Ports::new();
    let _squatter = std::net::TcpListener::bind(("127.0.0.1", ports.gateway)).unwrap();
    let mut gw = Strait::spawn(ports, &mesh.config(&ports, ""), &[], &[], &[]);
    let code = gw.wait_exit(Duration::from_secs(10));
    assert!(matches!(code, Some(c) if c != 0), "exit code {code:?}");
    assert!(http_get(gw.status, "/healthz/ready").is_err());
    assert!(
        gw.wait_stderr(&ports.gateway.to_string(), Duration::from_secs(5)),
        "stderr names the port: {}",
        gw.stderr_text()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_turns_readiness_to_503_while_live_connections_drain() {
    let mesh = Mesh::start().await;
    let mut gw = mesh.gateway("");
    assert_eq!(
        http_get(gw.status, "/healthz/ready").unwrap(),
        (200, "ready\n".into())
    );
    let (mut live, _) = tls_connect(gw.gateway, &mesh.ca, &sni("", RATINGS), &["istio"])
        .await
        .unwrap();
    assert_eq!(echo_once(&mut live, b"before").await, b"before");

    gw.signal(libc::SIGTERM);
    assert!(
        gw.eventually(Duration::from_secs(2), || matches!(
            http_get(gw.status, "/healthz/ready"),
            Ok((503, _))
        )),
        "readiness still 200 after SIGTERM"
    );
    assert_eq!(
        http_get(gw.status, "/healthz/ready").unwrap().1,
        "draining\n"
    );
    // The live connection still works while readiness fails; after the short accept
    // overlap (which lets a replacement process bind), new ones are not taken.
    assert_eq!(echo_once(&mut live, b"during drain").await, b"during drain");
    let mut refused = false;
    for _ in 0..30 {
        if tls_connect(gw.gateway, &mesh.ca, &sni("", RATINGS), &["istio"])
            .await
            .is_err()
        {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(refused, "new connections still accepted 3 s into the drain");
    live.shutdown().await.unwrap();
    drop(live);
    assert_eq!(
        gw.wait_exit(Duration::from_secs(5)),
        Some(0),
        "drained and exited"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_shows_config_and_clusters_on_loopback_only() {
    let mesh = Mesh::start().await;
    let ports = Ports::new();
    let certs = TempDir::new("certs");
    certs.write(
        "key.pem",
        "-----BEGIN PRIVATE KEY-----\nc2VjcmV0\n-----END PRIVATE KEY-----\n",
    );
    let extra = format!("  certificates: {{dir: {}}}\n", certs.path().display());
    let gw = Strait::start(ports, &mesh.config(&ports, &extra));

    let (code, body) = http_get(gw.admin, "/config_dump").unwrap();
    assert_eq!(code, 200);
    assert!(
        !body.contains("PRIVATE KEY") && !body.contains("c2VjcmV0"),
        "key material in dump"
    );
    let dump: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(dump["listeners"][0]["address"], gw.gateway.to_string());
    assert_eq!(
        dump["listeners"][0]["servers"][0]["mode"],
        "AUTO_PASSTHROUGH"
    );
    assert_eq!(dump["bootstrap"]["admin"], gw.admin.to_string());
    let hosts: Vec<&str> = dump["services"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["host"].as_str().unwrap())
        .collect();
    assert_eq!(hosts, [DEAD, RATINGS, REVIEWS]);

    // With a connection open, /clusters shows it on the endpoint that serves it.
    let (mut live, _) = tls_connect(gw.gateway, &mesh.ca, &sni("v1", REVIEWS), &["istio"])
        .await
        .unwrap();
    assert_eq!(echo_once(&mut live, b"hi").await, b"hi");
    let clusters: serde_json::Value =
        serde_json::from_str(&http_get(gw.admin, "/clusters").unwrap().1).unwrap();
    let v1 = clusters["clusters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == sni("v1", REVIEWS))
        .expect("a cluster per subset");
    assert_eq!(v1["activeConnections"], 1);
    let ep = &v1["endpoints"][0];
    assert_eq!(ep["address"], mesh.v1.addr.to_string());
    assert_eq!(ep["locality"], "us-east/zone-a");
    assert_eq!(ep["health"], "healthy");
    assert_eq!(ep["activeConnections"], 1);
    assert!(ep["ejectedForMs"].is_null());
    let names: BTreeSet<&str> = clusters["clusters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    for s in [
        sni("", REVIEWS),
        sni("v2", REVIEWS),
        sni("", RATINGS),
        sni("", DEAD),
    ] {
        assert!(names.contains(s.as_str()), "{s} missing from {names:?}");
    }
    drop(live);

    // Each port answers its own paths only; unknown paths are 404, writes 405.
    assert_eq!(http_get(gw.admin, "/quitquitquit").unwrap().0, 404);
    assert_eq!(http_get(gw.admin, "/stats/prometheus").unwrap().0, 404);
    assert_eq!(http_get(gw.metrics, "/config_dump").unwrap().0, 404);
    assert_eq!(http_get(gw.status, "/clusters").unwrap().0, 404);
    assert_eq!(http_get(gw.status, "/").unwrap().0, 404);
    let post = http_raw(
        gw.admin,
        b"POST /config_dump HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        Duration::from_secs(2),
    )
    .unwrap();
    assert!(post.starts_with("HTTP/1.1 405"), "{post}");

    // The admin socket is bound to the configured address only, not to every address.
    let other = std::net::SocketAddr::from(([127, 0, 0, 2], ports.admin));
    assert!(std::net::TcpStream::connect_timeout(&other, Duration::from_secs(1)).is_err());
    if let Some(ip) = non_loopback_ip() {
        let addr = std::net::SocketAddr::new(ip, ports.admin);
        assert!(std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_err());
    }

    // With no `admin` in the Bootstrap, it is loopback:15000.
    let loaded = strait::config::load_str(
        "default.yaml",
        "apiVersion: strait.dev/v1alpha1\nkind: Bootstrap\nmetadata: {name: b}\nspec: {}\n",
    )
    .unwrap();
    let admin = loaded.snapshot.settings.admin_addr;
    assert!(admin.ip().is_loopback() && admin.port() == 15000, "{admin}");
}

/// An address of this host that is not loopback, if it has one.
fn non_loopback_ip() -> Option<std::net::IpAddr> {
    // Connecting a UDP socket sends nothing; it only picks the source address a route
    // would use.
    let s = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
    s.connect("10.255.255.1:9").ok()?;
    let ip = s.local_addr().ok()?.ip();
    (!ip.is_loopback() && !ip.is_unspecified()).then_some(ip)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_can_go_to_a_file_or_nowhere_and_diagnostics_go_to_stderr() {
    let mesh = Mesh::start().await;

    // To a file: JSON lines there, nothing on stdout.
    let logs = TempDir::new("access");
    let file = logs.path().join("access.log");
    let gw = mesh.gateway(&format!("  accessLog: {}\n", file.display()));
    echo_session(gw.gateway, &mesh.ca, &sni("v1", REVIEWS), 10).await;
    raw_session(gw.gateway, b"not tls at all").await;
    let lines = || -> Vec<serde_json::Value> {
        std::fs::read_to_string(&file)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    assert!(gw.eventually(Duration::from_secs(3), || lines().len() == 2));
    let flags: BTreeSet<String> = lines()
        .iter()
        .map(|l| l["response_flag"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(flags, BTreeSet::from(["-".to_string(), "DPE".to_string()]));
    let quiet = Duration::from_millis(300);
    let on_stdout = gw.settled(Duration::from_secs(3), quiet, || gw.access_log().len());
    assert_eq!(on_stdout, 0, "access log also on stdout");
    drop(gw);

    // Off: the connection is counted but not logged.
    let gw = mesh.gateway("  accessLog: off\n");
    echo_session(gw.gateway, &mesh.ca, &sni("v1", REVIEWS), 10).await;
    assert!(gw.eventually(Duration::from_secs(3), || {
        gw.metric("istio_tcp_connections_closed_total", &[]) == 1.0
    }));
    let on_stdout = gw.settled(Duration::from_secs(3), quiet, || gw.access_log().len());
    assert_eq!(on_stdout, 0);
    drop(gw);

    // Diagnostics: stderr, at the level of --log-level when RUST_LOG is unset.
    for (level, shown) in [("warn", false), ("info", true)] {
        let ports = Ports::new();
        let gw = Strait::spawn(
            ports,
            &mesh.config(&ports, ""),
            &["--log-level", level],
            &[],
            &["RUST_LOG"],
        );
        gw.wait_ready(Duration::from_secs(20));
        raw_session(
            gw.gateway,
            &client_hello_bytes(&sni("", "nope.local"), &["istio"]),
        )
        .await;
        // Shown: it arrives, however busy the machine. Hidden: nothing within a second,
        // long after the refusal itself was counted.
        let logged = gw.eventually(Duration::from_secs(if shown { 10 } else { 1 }), || {
            gw.stderr_text().contains("refused NR")
        });
        let err = gw.stderr_text();
        assert_eq!(logged, shown, "--log-level {level}:\n{err}");
        let stdout = gw.stdout.lock().unwrap().clone();
        assert!(
            stdout
                .iter()
                .all(|l| serde_json::from_str::<serde_json::Value>(l).is_ok()),
            "stdout holds only access log lines: {stdout:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn admin_servers_shrug_off_abuse_without_stalling_the_data_path() {
    let mesh = Mesh::start().await;
    let gw = mesh.gateway("  accessLog: off\n");

    // Huge headers: refused with 431 (or closed), never buffered without bound.
    let mut huge = b"GET /stats/prometheus HTTP/1.1\r\nHost: x\r\n".to_vec();
    for i in 0..400 {
        huge.extend_from_slice(format!("X-Filler-{i}: {}\r\n", "a".repeat(64)).as_bytes());
    }
    huge.extend_from_slice(b"\r\n");
    assert!(huge.len() > 16 * 1024);
    let answer = http_raw(gw.metrics, &huge, Duration::from_secs(3)).expect("answered or closed");
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 431"),
        "huge headers got: {}",
        answer.lines().next().unwrap_or("")
    );

    // A slow-loris client that never finishes its headers is cut off.
    let started = Instant::now();
    let mut slow = std::net::TcpStream::connect(gw.metrics).unwrap();
    std::io::Write::write_all(&mut slow, b"GET /stats/prometheus HTTP/1.1\r\nHost: x\r\n").unwrap();
    let dripper = std::thread::spawn(move || {
        let mut cut = false;
        for i in 0..40 {
            std::thread::sleep(Duration::from_millis(250));
            if std::io::Write::write_all(&mut slow, format!("X-{i}: y\r\n").as_bytes()).is_err() {
                cut = true;
                break;
            }
        }
        cut
    });

    // Hundreds of idle connections on the metrics and status ports.
    let mut idle = Vec::new();
    for _ in 0..300 {
        idle.push(TcpStream::connect(gw.metrics).await.unwrap());
        idle.push(TcpStream::connect(gw.status).await.unwrap());
    }
    // The data path answers promptly all the while.
    for i in 0..5 {
        let t = Instant::now();
        let (mut tls, _) = tls_connect(gw.gateway, &mesh.ca, &sni("", RATINGS), &["istio"])
            .await
            .unwrap();
        assert_eq!(echo_once(&mut tls, b"still here").await, b"still here");
        // A stall would be the abusers' whole lifetime (seconds); a busy machine costs
        // milliseconds.
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "echo {i} took {:?}",
            t.elapsed()
        );
    }
    assert!(
        dripper.join().unwrap(),
        "slow-loris client was never cut off"
    );
    assert!(
        started.elapsed() < Duration::from_secs(9),
        "slow-loris lasted {:?}",
        started.elapsed()
    );

    // Once the abusers leave, scrapes work again at once.
    drop(idle);
    assert!(gw.eventually(Duration::from_secs(8), || {
        http_get(gw.metrics, "/stats/prometheus").is_ok_and(|(c, _)| c == 200)
    }));
    assert_eq!(http_get(gw.status, "/healthz/ready").unwrap().0, 200);
    assert!(gw.eventually(Duration::from_secs(3), || {
        gw.metric(
            "istio_tcp_connections_closed_total",
            &[("destination_service", RATINGS)],
        ) == 5.0
    }));
}
