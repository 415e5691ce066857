//! AUTO_PASSTHROUGH end to end: real rustls clients through the `strait` binary to real
//! rustls workloads, over loopback.

mod common;

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use common::*;
use rustls::pki_types::ServerName;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

const SPIFFE_V1: &str = "spiffe://cluster.local/ns/default/sa/reviews-v1";
const SPIFFE_V2: &str = "spiffe://cluster.local/ns/default/sa/reviews-v2";
const SPIFFE_RATINGS: &str = "spiffe://cluster.local/ns/default/sa/ratings";

fn sni(port: u16, subset: &str, host: &str) -> String {
    format!("outbound_.{port}_.{subset}_.{host}")
}

struct Mesh {
    ca: TestCa,
    v1: Workload,
    v2: Workload,
    ratings: Workload,
    /// A workload without a sidecar: labelled tlsMode disabled, never a passthrough target.
    plain: Workload,
}

impl Mesh {
    async fn start() -> Mesh {
        let ca = TestCa::new();
        Mesh {
            v1: Workload::start(&ca, SPIFFE_V1).await,
            v2: Workload::start(&ca, SPIFFE_V2).await,
            ratings: Workload::start(&ca, SPIFFE_RATINGS).await,
            plain: Workload::start(&ca, "spiffe://cluster.local/ns/default/sa/plain").await,
            ca,
        }
    }

    /// ServiceEntries and a DestinationRule for reviews (v1, v2, a plaintext endpoint and
    /// `extra_endpoint`, if any) and ratings.
    fn services(&self, extra_reviews_endpoint: Option<u16>) -> String {
        let extra = extra_reviews_endpoint
            .map(|p| {
                format!(
                    "  - address: 127.0.0.1\n    ports: {{tcp-reviews: {p}}}\n    labels: {{app: reviews, version: v1, security.istio.io/tlsMode: istio}}\n"
                )
            })
            .unwrap_or_default();
        format!(
            r#"apiVersion: networking.istio.io/v1
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
    labels: {{app: reviews, version: v1, security.istio.io/tlsMode: istio}}
  - address: 127.0.0.1
    ports: {{tcp-reviews: {v2}}}
    labels: {{app: reviews, version: v2, security.istio.io/tlsMode: istio}}
  - address: 127.0.0.1
    ports: {{tcp-reviews: {plain}}}
    labels: {{app: reviews, version: v2, security.istio.io/tlsMode: disabled}}
{extra}---
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
"#,
            v1 = self.v1.addr.port(),
            v2 = self.v2.addr.port(),
            plain = self.plain.addr.port(),
            ratings = self.ratings.addr.port(),
        )
    }

    fn config(
        &self,
        ports: &Ports,
        bootstrap_extra: &str,
        hosts: &[&str],
        extra: Option<u16>,
    ) -> String {
        format!(
            "{}---\n{}---\n{}",
            ports.bootstrap(bootstrap_extra),
            ports.gateway_doc(hosts),
            self.services(extra)
        )
    }

    fn gateway(&self, bootstrap_extra: &str) -> Strait {
        let ports = Ports::new();
        Strait::start(
            ports,
            &self.config(&ports, bootstrap_extra, &["*.local"], None),
        )
    }
}

/// Writes `total` bytes of a deterministic pattern and reads the echo at the same time;
/// returns (hash sent, hash received, bytes received).
async fn stream_and_hash<S>(stream: S, total: usize, seed: u8) -> ([u8; 32], [u8; 32], usize)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut r, mut w) = tokio::io::split(stream);
    let writer = tokio::spawn(async move {
        let mut hasher = Sha256::new();
        let mut chunk = vec![0u8; 64 * 1024];
        let mut sent = 0usize;
        let mut x = seed as u32;
        while sent < total {
            let n = chunk.len().min(total - sent);
            for b in chunk[..n].iter_mut() {
                x = x.wrapping_mul(1_103_515_245).wrapping_add(12_345);
                *b = (x >> 16) as u8;
            }
            hasher.update(&chunk[..n]);
            w.write_all(&chunk[..n]).await.unwrap();
            sent += n;
        }
        w.flush().await.unwrap();
        (hasher.finalize(), w)
    });
    let mut hasher = Sha256::new();
    let mut got = 0usize;
    let mut buf = vec![0u8; 64 * 1024];
    while got < total {
        let n = r.read(&mut buf).await.unwrap();
        assert!(n > 0, "stream ended after {got} of {total} bytes");
        hasher.update(&buf[..n]);
        got += n;
    }
    let (sent_hash, _w) = writer.await.unwrap();
    (sent_hash.into(), hasher.finalize().into(), got)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tls_passes_through_and_64_mib_each_way_arrive_intact() {
    let mesh = Mesh::start().await;
    let gw = mesh.gateway("");
    let (tls, seen) = tls_connect(gw.gateway, &mesh.ca, &sni(9080, "", RATINGS), &["istio"])
        .await
        .unwrap();
    // The client verified the workload's own certificate: TLS went end to end.
    assert_eq!(seen, SPIFFE_RATINGS);
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"istio"[..]));
    let (sent, received, n) = stream_and_hash(tls, 64 << 20, 7).await;
    assert_eq!(n, 64 << 20);
    assert_eq!(sent, received, "echoed bytes differ from the bytes sent");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_hundred_concurrent_connections_stay_intact() {
    let mesh = Mesh::start().await;
    let gw = mesh.gateway("");
    let mut tasks = Vec::new();
    for i in 0..200u32 {
        let addr = gw.gateway;
        let (config, _) = client_config(&mesh.ca, &["istio"]);
        let name = sni(9080, if i % 2 == 0 { "v1" } else { "" }, REVIEWS);
        tasks.push(tokio::spawn(async move {
            let tcp = TcpStream::connect(addr).await.unwrap();
            let tls = tokio_rustls::TlsConnector::from(config)
                .connect(ServerName::try_from(name).unwrap(), tcp)
                .await
                .unwrap();
            // 200 × 336 KiB ≈ 64 MiB each way in total.
            stream_and_hash(tls, 336 * 1024, i as u8).await
        }));
    }
    for t in tasks {
        let Ok((sent, received, _)) = t.await else {
            panic!("a connection failed; gateway log:\n{}", gw.stderr_text());
        };
        assert_eq!(sent, received);
    }
}

type Transform = Box<dyn FnOnce(&[u8]) -> Vec<Vec<u8>> + Send + Unpin>;

/// Rewrites the first write (rustls' ClientHello record) with `transform`, sending the
/// result as separate writes spaced by `gap`; everything after passes through.
struct Reshape<S> {
    inner: S,
    transform: Option<Transform>,
    pending: std::collections::VecDeque<Vec<u8>>,
    consumed: usize,
    gap: Duration,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<S> Reshape<S> {
    fn new(
        inner: S,
        gap: Duration,
        f: impl FnOnce(&[u8]) -> Vec<Vec<u8>> + Send + Unpin + 'static,
    ) -> Self {
        Reshape {
            inner,
            transform: Some(Box::new(f)),
            pending: Default::default(),
            consumed: 0,
            gap,
            sleep: None,
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Reshape<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = &mut *self;
        if let Some(f) = this.transform.take() {
            this.pending = f(buf).into();
            this.consumed = buf.len();
        }
        while let Some(front) = this.pending.front_mut() {
            if let Some(s) = this.sleep.as_mut() {
                std::task::ready!(s.as_mut().poll(cx));
                this.sleep = None;
            }
            let n = std::task::ready!(Pin::new(&mut this.inner).poll_write(cx, front))?;
            front.drain(..n);
            if front.is_empty() {
                this.pending.pop_front();
                if !this.pending.is_empty() {
                    this.sleep = Some(Box::pin(tokio::time::sleep(this.gap)));
                }
            }
            if this.pending.is_empty() {
                return Poll::Ready(Ok(std::mem::take(&mut this.consumed)));
            }
        }
        Pin::new(&mut this.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Reshape<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

use std::future::Future;

/// Splits one handshake record into `n` records carrying consecutive fragments.
fn split_records(record: &[u8], n: usize) -> Vec<u8> {
    assert_eq!(record[0], 22);
    let body = &record[5..];
    let step = body.len().div_ceil(n);
    let mut out = Vec::new();
    for part in body.chunks(step) {
        out.extend_from_slice(&[22, record[1], record[2]]);
        out.extend_from_slice(&(part.len() as u16).to_be_bytes());
        out.extend_from_slice(part);
    }
    out
}

async fn connect_reshaped(
    gw: std::net::SocketAddr,
    ca: &TestCa,
    name: &str,
    alpn: &[&str],
    gap: Duration,
    f: impl FnOnce(&[u8]) -> Vec<Vec<u8>> + Send + Unpin + 'static,
) -> std::io::Result<(tokio_rustls::client::TlsStream<Reshape<TcpStream>>, String)> {
    let (config, verifier) = client_config(ca, alpn);
    let tcp = TcpStream::connect(gw).await?;
    tcp.set_nodelay(true)?;
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(
            ServerName::try_from(name.to_string()).unwrap(),
            Reshape::new(tcp, gap, f),
        )
        .await?;
    let seen = verifier.seen.lock().unwrap().clone().unwrap();
    Ok((tls, spiffe_of(&seen)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fragmented_and_large_client_hellos_are_routed() {
    let mesh = Mesh::start().await;
    let gw = mesh.gateway("");
    let name = sni(9080, "", RATINGS);

    // One byte per write.
    let (mut tls, seen) = connect_reshaped(
        gw.gateway,
        &mesh.ca,
        &name,
        &["istio"],
        Duration::from_millis(1),
        |b| b.iter().map(|&x| vec![x]).collect(),
    )
    .await
    .unwrap();
    assert_eq!(seen, SPIFFE_RATINGS);
    assert_eq!(
        echo_once(&mut tls, b"one byte at a time\n").await,
        b"one byte at a time\n"
    );

    // Three TLS records, each in its own write.
    let (mut tls, seen) = connect_reshaped(
        gw.gateway,
        &mesh.ca,
        &name,
        &["istio"],
        Duration::from_millis(5),
        |b| {
            let split = split_records(b, 3);
            assert_eq!(split.len(), b.len() + 10, "three records");
            vec![split]
        },
    )
    .await
    .unwrap();
    assert_eq!(seen, SPIFFE_RATINGS);
    assert_eq!(
        echo_once(&mut tls, b"three records\n").await,
        b"three records\n"
    );

    // An 8 KiB ClientHello (a long ALPN list), split into 1 KiB writes.
    let filler: Vec<String> = (0..44)
        .map(|i| format!("x-{i:03}-{}", "p".repeat(190)))
        .collect();
    let mut alpn: Vec<&str> = filler.iter().map(String::as_str).collect();
    alpn.push("istio");
    let hello_len = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let len = hello_len.clone();
    let (mut tls, seen) = connect_reshaped(
        gw.gateway,
        &mesh.ca,
        &name,
        &alpn,
        Duration::from_millis(1),
        move |b| {
            len.store(b.len(), std::sync::atomic::Ordering::Relaxed);
            b.chunks(1024).map(<[u8]>::to_vec).collect()
        },
    )
    .await
    .unwrap();
    assert!(hello_len.load(std::sync::atomic::Ordering::Relaxed) > 8 * 1024);
    assert_eq!(seen, SPIFFE_RATINGS);
    assert_eq!(
        echo_once(&mut tls, b"large hello\n").await,
        b"large hello\n"
    );
}

fn is_alert(err: &std::io::Error, alert: &str) -> bool {
    format!("{err:?}").contains(alert)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alpn_allow_list_is_enforced_and_configurable() {
    let mesh = Mesh::start().await;
    let gw = mesh.gateway("");
    let name = sni(9080, "", RATINGS);
    let err = tls_connect(gw.gateway, &mesh.ca, &name, &["h2", "http/1.1"])
        .await
        .expect_err("refused");
    assert!(is_alert(&err, "UnrecognisedName"), "{err:?}");
    let err = tls_connect(gw.gateway, &mesh.ca, &name, &[])
        .await
        .expect_err("refused");
    assert!(is_alert(&err, "UnrecognisedName"), "{err:?}");
    assert!(gw.eventually(Duration::from_secs(5), || gw.stderr_text().contains("alpn")));
    let log = gw.stderr_text();
    assert!(
        log.contains(&name) && log.contains("h2,http/1.1"),
        "refusal names the SNI and ALPN: {log}"
    );
    drop(gw);

    let gw = mesh.gateway("  passthroughAlpn: []\n");
    let (mut tls, seen) = tls_connect(gw.gateway, &mesh.ca, &name, &["h2"])
        .await
        .unwrap();
    assert_eq!(seen, SPIFFE_RATINGS);
    assert_eq!(echo_once(&mut tls, b"any alpn\n").await, b"any alpn\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subsets_select_endpoints_and_plaintext_endpoints_are_never_targets() {
    let mesh = Mesh::start().await;
    let gw = mesh.gateway("");
    for _ in 0..6 {
        let (_, seen) = tls_connect(gw.gateway, &mesh.ca, &sni(9080, "v2", REVIEWS), &["istio"])
            .await
            .unwrap();
        assert_eq!(seen, SPIFFE_V2, "subset v2 reaches only v2");
    }
    for _ in 0..4 {
        let (_, seen) = tls_connect(gw.gateway, &mesh.ca, &sni(9080, "v1", REVIEWS), &["istio"])
            .await
            .unwrap();
        assert_eq!(seen, SPIFFE_V1);
    }
    let mut seen_all = std::collections::BTreeSet::new();
    for _ in 0..8 {
        let (_, seen) = tls_connect(gw.gateway, &mesh.ca, &sni(9080, "", REVIEWS), &["istio"])
            .await
            .unwrap();
        seen_all.insert(seen);
    }
    assert_eq!(
        seen_all.into_iter().collect::<Vec<_>>(),
        vec![SPIFFE_V1.to_string(), SPIFFE_V2.to_string()],
        "no subset reaches every mTLS endpoint"
    );
    assert_eq!(
        mesh.plain.accepted(),
        0,
        "tlsMode: disabled endpoint was dialled"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_and_unmatched_names_get_unrecognized_name() {
    let mesh = Mesh::start().await;
    let ports = Ports::new();
    let gw = Strait::start(
        ports,
        &mesh.config(&ports, "", &["reviews.default.svc.cluster.local"], None),
    );
    for name in [
        sni(9080, "", "nope.default.svc.cluster.local"),
        sni(9080, "", RATINGS),   // declared, but outside this Gateway's hosts
        sni(9999, "", REVIEWS),   // undeclared port
        sni(9080, "v9", REVIEWS), // undeclared subset
        REVIEWS.to_string(),      // not a subset key
    ] {
        let err = tls_connect(gw.gateway, &mesh.ca, &name, &["istio"])
            .await
            .expect_err("refused");
        assert!(is_alert(&err, "UnrecognisedName"), "{name}: {err:?}");
    }
    let (_, seen) = tls_connect(gw.gateway, &mesh.ca, &sni(9080, "v1", REVIEWS), &["istio"])
        .await
        .unwrap();
    assert_eq!(seen, SPIFFE_V1);
    assert_eq!(mesh.ratings.accepted(), 0);
}

/// An SNI is a DNS name (RFC 4343): upper- and mixed-case spellings of a declared key,
/// prefix and subset included, reach the endpoints the lower-case name reaches, and the
/// access log keeps the name as the client sent it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_route_without_regard_to_case() {
    let mesh = Mesh::start().await;
    let gw = mesh.gateway("");
    let cases = [
        (
            "OUTBOUND_.9080_.V1_.REVIEWS.DEFAULT.SVC.CLUSTER.LOCAL",
            SPIFFE_V1,
            "v1",
        ),
        (
            "Outbound_.9080_.V2_.Reviews.Default.Svc.Cluster.Local",
            SPIFFE_V2,
            "v2",
        ),
        (
            "outbound_.9080_.v2_.REVIEWS.default.svc.CLUSTER.local",
            SPIFFE_V2,
            "v2",
        ),
        (
            "OUTBOUND_.9080_._.RATINGS.DEFAULT.SVC.CLUSTER.LOCAL",
            SPIFFE_RATINGS,
            "",
        ),
    ];
    for (name, workload, _) in cases {
        let seen = round_trip(gw.gateway, &mesh.ca, name)
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(seen, workload, "{name}");
    }
    assert!(
        gw.eventually(Duration::from_secs(5), || gw.access_log().len()
            >= cases.len()),
        "one access log line per connection: {:?}",
        gw.access_log()
    );
    let log = gw.access_log();
    for (name, _, subset) in cases {
        let line = log
            .iter()
            .find(|l| l["sni"] == name)
            .unwrap_or_else(|| panic!("no access log line with sni {name}: {log:?}"));
        assert_eq!(line["response_flag"], "-", "{line}");
        let host = if name.contains("RATINGS") {
            RATINGS
        } else {
            REVIEWS
        };
        assert_eq!(line["service"], host, "{line}");
        let subset = (!subset.is_empty()).then_some(subset);
        assert_eq!(line["subset"].as_str(), subset, "{line}");
    }

    // `strait route` agrees with the data path.
    let out = std::process::Command::new(strait_bin())
        .args(["route", "-c"])
        .arg(gw.config_path())
        .arg("OUTBOUND_.9080_.V1_.REVIEWS.DEFAULT.SVC.CLUSTER.LOCAL")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(text.contains("subset     v1 labels {version=v1}"), "{text}");
}

/// Case-insensitive matching does not widen the allow-list: a name that is not declared
/// in any case is still refused with `unrecognized_name`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undeclared_names_stay_refused_in_any_case() {
    let mesh = Mesh::start().await;
    let ports = Ports::new();
    let gw = Strait::start(
        ports,
        &mesh.config(&ports, "", &["reviews.default.svc.cluster.local"], None),
    );
    let names = [
        "OUTBOUND_.9080_._.NOPE.DEFAULT.SVC.CLUSTER.LOCAL",
        "OUTBOUND_.9080_._.RATINGS.DEFAULT.SVC.CLUSTER.LOCAL", // outside the Gateway's hosts
        "OUTBOUND_.9999_._.REVIEWS.DEFAULT.SVC.CLUSTER.LOCAL", // undeclared port
        "OUTBOUND_.9080_.V9_.REVIEWS.DEFAULT.SVC.CLUSTER.LOCAL", // undeclared subset
        "INBOUND_.9080_._.REVIEWS.DEFAULT.SVC.CLUSTER.LOCAL",  // not an outbound key
        "REVIEWS.DEFAULT.SVC.CLUSTER.LOCAL",                   // not a subset key
    ];
    for name in names {
        let err = tls_connect(gw.gateway, &mesh.ca, name, &["istio"])
            .await
            .expect_err("refused");
        assert!(is_alert(&err, "UnrecognisedName"), "{name}: {err:?}");
    }
    assert!(
        gw.eventually(Duration::from_secs(5), || gw.access_log().len()
            >= names.len()),
        "{:?}",
        gw.access_log()
    );
    for line in gw.access_log() {
        assert_eq!(line["response_flag"], "NR", "{line}");
        assert!(
            names.contains(&line["sni"].as_str().unwrap_or("")),
            "{line}"
        );
    }
    // The declared name, upper case, still routes on the same gateway.
    let seen = round_trip(
        gw.gateway,
        &mesh.ca,
        "OUTBOUND_.9080_.V1_.REVIEWS.DEFAULT.SVC.CLUSTER.LOCAL",
    )
    .await
    .unwrap();
    assert_eq!(seen, SPIFFE_V1);
    assert_eq!(mesh.ratings.accepted(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_silent_clients_are_closed_while_others_are_served() {
    let mesh = Mesh::start().await;
    let gw = mesh.gateway(""); // clientHelloTimeout: 2s

    let mut silent = TcpStream::connect(gw.gateway).await.unwrap();
    let mut trickle = TcpStream::connect(gw.gateway).await.unwrap();
    let hello = client_hello_bytes(&sni(9080, "", RATINGS), &["istio"]);
    trickle.write_all(&hello[..10]).await.unwrap();
    let mut garbage = TcpStream::connect(gw.gateway).await.unwrap();
    garbage
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let started = Instant::now();

    // Garbage is closed at once, with nothing sent back.
    let back = read_until_close(&mut garbage, Duration::from_secs(1))
        .await
        .expect("garbage closed promptly");
    assert!(back.is_empty(), "no TLS alert for non-TLS bytes: {back:?}");

    // A good client is served while the silent ones wait.
    let (mut tls, _) = tls_connect(gw.gateway, &mesh.ca, &sni(9080, "", RATINGS), &["istio"])
        .await
        .unwrap();
    assert_eq!(
        echo_once(&mut tls, b"still serving\n").await,
        b"still serving\n"
    );

    for s in [&mut silent, &mut trickle] {
        read_until_close(s, Duration::from_secs(4))
            .await
            .expect("closed after clientHelloTimeout");
    }
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(1800),
        "closed too early: {waited:?}"
    );
    assert!(
        waited < Duration::from_secs(4),
        "closed too late: {waited:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_endpoint_costs_no_connection() {
    let mesh = Mesh::start().await;
    let ports = Ports::new();
    let (dead, _reserved) = dead_port(); // refuses connections
    let gw = Strait::start(ports, &mesh.config(&ports, "", &["*.local"], Some(dead)));
    for i in 0..24 {
        let (mut tls, seen) =
            tls_connect(gw.gateway, &mesh.ca, &sni(9080, "v1", REVIEWS), &["istio"])
                .await
                .unwrap_or_else(|e| panic!("connection {i} failed: {e}"));
        assert_eq!(seen, SPIFFE_V1);
        assert_eq!(echo_once(&mut tls, b"ok\n").await, b"ok\n");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_close_keeps_the_reply_flowing() {
    let mesh = Mesh::start().await;
    let gw = mesh.gateway("");
    let (tls, _) = tls_connect(gw.gateway, &mesh.ca, &sni(9080, "", RATINGS), &["istio"])
        .await
        .unwrap();
    let (mut r, mut w) = tokio::io::split(tls);
    let payload: Vec<u8> = (0..(4 << 20)).map(|i| (i % 251) as u8).collect();
    let expected = payload.clone();
    let writer = tokio::spawn(async move {
        w.write_all(&payload).await.unwrap();
        // close_notify and FIN: the client will send nothing more.
        w.shutdown().await.unwrap();
        w
    });
    let mut back = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), r.read_to_end(&mut back))
        .await
        .expect("reply finished")
        .ok();
    let _w = writer.await.unwrap();
    assert_eq!(
        back.len(),
        expected.len(),
        "reply cut short after the client's FIN"
    );
    assert!(back == expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_explains_a_name_with_live_endpoint_health() {
    let mesh = Mesh::start().await;
    let gw = mesh.gateway("");
    let route = |name: String| {
        std::process::Command::new(strait_bin())
            .args(["route", "-c"])
            .arg(gw.config_path())
            .arg(name)
            .output()
            .unwrap()
    };
    let out = route(sni(9080, "v1", REVIEWS));
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(text.contains("subset     v1 labels {version=v1}"), "{text}");
    let v1 = format!("127.0.0.1:{}", mesh.v1.addr.port());
    let line = text
        .lines()
        .find(|l| l.contains(&v1))
        .expect("v1 endpoint listed");
    assert!(line.contains("healthy (live from"), "{line}");
    assert!(
        !text.contains(&format!("127.0.0.1:{}", mesh.v2.addr.port())),
        "{text}"
    );

    let out = route(sni(9080, "v9", REVIEWS));
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("does not route (NR unknown_subset)"),
        "{text}"
    );
    assert!(text.contains("declared: [v1, v2]"), "{text}");
}

/// An endpoint that answers each ClientHello with `answer` and reports how the
/// connection then ended: `Ok(bytes)` at a FIN, `Err(kind)` at an error.
async fn reporting_endpoint(
    answer: Vec<u8>,
    then_reset: bool,
) -> (
    std::net::SocketAddr,
    tokio::sync::mpsc::UnboundedReceiver<Result<usize, std::io::ErrorKind>>,
) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let mut hello = [0u8; 5];
            s.read_exact(&mut hello).await.unwrap();
            let len = u16::from_be_bytes([hello[3], hello[4]]) as usize;
            let mut body = vec![0u8; len];
            s.read_exact(&mut body).await.unwrap();
            s.write_all(&answer).await.unwrap();
            if then_reset {
                // Give the bytes time to leave, then reset (linger 0) instead of a FIN.
                tokio::time::sleep(Duration::from_millis(200)).await;
                socket2::SockRef::from(&s)
                    .set_linger(Some(Duration::ZERO))
                    .unwrap();
                drop(s);
                continue;
            }
            let mut rest = Vec::new();
            let _ = tx.send(s.read_to_end(&mut rest).await.map_err(|e| e.kind()));
        }
    });
    (addr, rx)
}

fn one_endpoint_config(ports: &Ports, endpoint: std::net::SocketAddr) -> String {
    format!(
        "{}---\n{}---\napiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: raw, namespace: default}}\nspec:\n  hosts: [raw.default.svc.cluster.local]\n  resolution: STATIC\n  ports:\n  - {{number: 9080, name: tcp, protocol: TCP}}\n  endpoints:\n  - address: 127.0.0.1\n    ports: {{tcp: {}}}\n    labels: {{security.istio.io/tlsMode: istio}}\n",
        ports.bootstrap(""),
        ports.gateway_doc(&["*.local"]),
        endpoint.port()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_abort_reaches_the_endpoint_as_a_reset_and_an_endpoint_abort_loses_nothing() {
    let raw_sni = sni(9080, "", "raw.default.svc.cluster.local");
    let hello = client_hello_bytes(&raw_sni, &["istio"]);

    // The client resets after the answer: the endpoint sees a reset, not a clean end.
    let (endpoint, mut ended) = reporting_endpoint(b"S".to_vec(), false).await;
    let ports = Ports::new();
    let gw = Strait::start(ports, &one_endpoint_config(&ports, endpoint));
    for _ in 0..3 {
        let mut client = TcpStream::connect(gw.gateway).await.unwrap();
        client.write_all(&hello).await.unwrap();
        let mut answer = [0u8; 1];
        client.read_exact(&mut answer).await.unwrap();
        assert_eq!(&answer, b"S");
        socket2::SockRef::from(&client)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        drop(client);
        let end = tokio::time::timeout(Duration::from_secs(5), ended.recv())
            .await
            .expect("the endpoint saw the end")
            .unwrap();
        assert_eq!(end, Err(std::io::ErrorKind::ConnectionReset));
    }
    drop(gw);

    // The endpoint sends 32 KiB and resets: the client still gets every byte, then the
    // end of the stream.
    let payload: Vec<u8> = (0..32 * 1024).map(|i| (i % 251) as u8).collect();
    let (endpoint, _ended) = reporting_endpoint(payload.clone(), true).await;
    let ports = Ports::new();
    let gw = Strait::start(ports, &one_endpoint_config(&ports, endpoint));
    let mut client = TcpStream::connect(gw.gateway).await.unwrap();
    client.write_all(&hello).await.unwrap();
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), client.read_to_end(&mut got))
        .await
        .expect("the stream ended")
        .unwrap();
    assert_eq!(got.len(), payload.len());
    assert!(got == payload);
    // One connection, counted closed once.
    assert!(gw.eventually(Duration::from_secs(3), || {
        gw.metric("istio_tcp_connections_closed_total", &[]) == 1.0
    }));
}

/// An endpoint that reads the replayed ClientHello, stays silent for `delay`, answers
/// `answer`, then reads everything else up to the client's FIN and reports all it
/// received, ClientHello included.
async fn slow_endpoint(
    delay: Duration,
    answer: &'static [u8],
) -> (
    std::net::SocketAddr,
    tokio::sync::mpsc::UnboundedReceiver<Vec<u8>>,
) {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", free_port()))
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut got = vec![0u8; 5];
                s.read_exact(&mut got).await.unwrap();
                let len = u16::from_be_bytes([got[3], got[4]]) as usize;
                got.resize(5 + len, 0);
                s.read_exact(&mut got[5..]).await.unwrap();
                tokio::time::sleep(delay).await;
                s.write_all(answer).await.unwrap();
                s.read_to_end(&mut got).await.unwrap();
                let _ = tx.send(got);
            });
        }
    });
    (addr, rx)
}

/// One raw connection through the gateway to `raw.default.svc.cluster.local`: sends a
/// ClientHello and, without waiting, 16 KiB more; reads `answer_len` bytes, then closes
/// its side. Returns what the endpoint received, the answer, and how long it took.
async fn send_before_the_answer(
    gw: &Strait,
    answer_len: usize,
    received: &mut tokio::sync::mpsc::UnboundedReceiver<Vec<u8>>,
) -> (Vec<u8>, Vec<u8>, Vec<u8>, Duration) {
    let hello = client_hello_bytes(&sni(9080, "", "raw.default.svc.cluster.local"), &["istio"]);
    let mut early = vec![0u8; 16 * 1024];
    fill_pattern(3, 0, &mut early);
    let sent = [hello.as_slice(), early.as_slice()].concat();
    let client = TcpStream::connect(gw.gateway).await.unwrap();
    let (mut r, mut w) = client.into_split();
    let started = Instant::now();
    let to_send = sent.clone();
    let writer = tokio::spawn(async move {
        w.write_all(&to_send).await.unwrap();
        w
    });
    let mut answer = vec![0u8; answer_len];
    tokio::time::timeout(Duration::from_secs(10), r.read_exact(&mut answer))
        .await
        .expect("the answer arrived")
        .unwrap();
    let took = started.elapsed();
    let mut w = writer.await.unwrap();
    w.shutdown().await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(10), received.recv())
        .await
        .expect("the endpoint saw the client's FIN")
        .unwrap();
    (sent, got, answer, took)
}

/// strait waits for the endpoint's first byte after replaying the ClientHello (so an
/// endpoint that accepts and closes can be retried elsewhere). A slow endpoint delays the
/// client but loses none of its bytes, and the wait is visible in its own histogram, not
/// in the TCP connect latency.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_endpoint_delays_but_does_not_lose_the_clients_bytes() {
    const DELAY: Duration = Duration::from_millis(600);
    let (endpoint, mut received) = slow_endpoint(DELAY, b"server hello").await;
    let ports = Ports::new();
    let gw = Strait::start(ports, &one_endpoint_config(&ports, endpoint)); // connectTimeout 5s
    let (sent, got, answer, took) = send_before_the_answer(&gw, 12, &mut received).await;
    assert_eq!(answer, b"server hello");
    assert!(
        took >= DELAY,
        "answered after {took:?}, before the endpoint spoke"
    );
    assert_eq!(
        got.len(),
        sent.len(),
        "bytes lost on the way to the endpoint"
    );
    assert!(
        got == sent,
        "the endpoint received other bytes than the client sent"
    );

    let answered = [("outcome", "answered")];
    assert!(
        gw.eventually(Duration::from_secs(5), || {
            gw.metric("strait_upstream_first_byte_seconds_count", &answered) == 1.0
        }),
        "{}",
        gw.metrics_text()
    );
    let waited = gw.metric("strait_upstream_first_byte_seconds_sum", &answered);
    assert!(
        waited >= DELAY.as_secs_f64() && waited < 5.0,
        "first-byte wait {waited}s, endpoint silent for {DELAY:?}, connectTimeout 5s"
    );
    let connect = gw.metric("strait_upstream_connect_duration_seconds_sum", &[]);
    assert!(
        connect < DELAY.as_secs_f64(),
        "the TCP connect latency ({connect}s) does not include the wait for the answer"
    );
}

/// The wait is bounded by `connectTimeout`: an endpoint still silent then keeps the
/// connection (it is slow, not broken), the copy starts, and nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_wait_for_the_first_byte_stops_at_connect_timeout() {
    const DELAY: Duration = Duration::from_millis(1200);
    let (endpoint, mut received) = slow_endpoint(DELAY, b"late").await;
    let ports = Ports::new();
    let config = format!(
        "{}---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: raw, namespace: default}}\nspec:\n  host: raw.default.svc.cluster.local\n  trafficPolicy:\n    connectionPool:\n      tcp: {{connectTimeout: 300ms}}\n",
        one_endpoint_config(&ports, endpoint)
    );
    let gw = Strait::start(ports, &config);
    let (sent, got, answer, took) = send_before_the_answer(&gw, 4, &mut received).await;
    assert_eq!(answer, b"late");
    assert!(took >= DELAY, "answered after {took:?}");
    assert!(
        got == sent,
        "the endpoint received other bytes than the client sent"
    );

    let timed_out = [("outcome", "timeout")];
    assert!(
        gw.eventually(Duration::from_secs(5), || {
            gw.metric("strait_upstream_first_byte_seconds_count", &timed_out) == 1.0
        }),
        "{}",
        gw.metrics_text()
    );
    let waited = gw.metric("strait_upstream_first_byte_seconds_sum", &timed_out);
    assert!(
        (0.3..DELAY.as_secs_f64()).contains(&waited),
        "waited {waited}s for the first byte; connectTimeout is 300ms"
    );
    assert_eq!(
        gw.metric("strait_upstream_connect_failures_total", &[]),
        0.0,
        "a silent endpoint is not a failed attempt"
    );
    assert!(
        gw.eventually(Duration::from_secs(5), || !gw.access_log().is_empty()),
        "no access log line"
    );
    assert_eq!(gw.access_log()[0]["response_flag"], "-");
}
