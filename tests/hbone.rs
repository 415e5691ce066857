//! Ambient's double HBONE on 15008, from files: a Gateway API `istio-east-west` Gateway,
//! the real strait binary, real mTLS and HTTP/2 from a Rust h2 client standing in for a
//! source ztunnel, and plain TCP servers on `<endpoint ip>:15008` standing in for the
//! destination ztunnels (the bytes strait copies are opaque to it, so a tunnel end that
//! answers with its name shows which endpoint each tunnel reached). The same strait
//! serves 15443 in the same test. Envoy, configured as Istio's ambient east-west gateway
//! (AMBIENT.md §6), answers the same inputs with the same statuses. Floods of streams and
//! headers, written frame by frame by a raw HTTP/2 client, are refused by both; strait
//! counts and names each refusal.

mod common;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes};
use common::*;
use common::{hbone, xds};
use rustls::pki_types::ServerName;
use strait::tls::{SpiffeId, TrustConfig, client_config, load_identity};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

const GW_ID: &str = "spiffe://cluster.local/ns/istio-system/sa/eastwest";
const SLEEP_ID: &str = "spiffe://cluster.local/ns/foo/sa/sleep";
const HBONE_PORT: u16 = 15008;
const WAIT: Duration = Duration::from_secs(10);

fn strait(args: &[&str]) {
    let out = Command::new(strait_bin()).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "strait {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A mesh CA (`strait ca init`), the gateway's SVID and a source workload's, as
/// `strait cert issue` writes them.
struct Certs {
    dir: TempDir,
    ca: PathBuf,
    gateway: PathBuf,
}

impl Certs {
    fn new() -> Certs {
        let dir = TempDir::new("hbone-certs");
        let ca = dir.path().join("ca");
        strait(&[
            "ca",
            "init",
            "--trust-domain",
            "cluster.local",
            "--out",
            ca.to_str().unwrap(),
        ]);
        let certs = Certs {
            gateway: dir.path().join("gw"),
            dir,
            ca,
        };
        certs.issue(GW_ID, "gw");
        certs
    }

    fn issue(&self, id: &str, name: &str) -> PathBuf {
        let out = self.dir.path().join(name);
        strait(&[
            "cert",
            "issue",
            "--ca",
            self.ca.to_str().unwrap(),
            "--id",
            id,
            "--out",
            out.to_str().unwrap(),
        ]);
        out
    }
}

/// A loopback address of its own for each endpoint, so each can listen on 15008.
fn endpoint_ip() -> Ipv4Addr {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    let pid = std::process::id();
    loop {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let ip = Ipv4Addr::new(
            127,
            (200 + pid % 50) as u8,
            ((pid / 50) % 250) as u8,
            (n % 250 + 1) as u8,
        );
        if std::net::TcpListener::bind((ip, HBONE_PORT)).is_ok() {
            return ip;
        }
    }
}

/// What a stand-in destination ztunnel does with a tunnel's bytes.
#[derive(Clone, Copy, PartialEq)]
enum Behaviour {
    /// Writes `[name] `, then echoes; closes its side after the client's close.
    Echo,
    /// Accepts and never reads.
    Stall,
}

/// A TCP server on `<ip>:15008`.
struct Dest {
    ip: Ipv4Addr,
    accepted: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Dest {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Dest {
    async fn start(name: &str, behaviour: Behaviour) -> Dest {
        let ip = endpoint_ip();
        let listener = TcpListener::bind((ip, HBONE_PORT)).await.unwrap();
        let accepted = Arc::new(AtomicU64::new(0));
        let count = accepted.clone();
        let name = name.to_string();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = listener.accept().await else {
                    continue;
                };
                count.fetch_add(1, Ordering::Relaxed);
                let name = name.clone();
                tokio::spawn(async move {
                    if behaviour == Behaviour::Stall {
                        tokio::time::sleep(Duration::from_secs(3600)).await;
                        drop(s);
                        return;
                    }
                    if s.write_all(format!("[{name}] ").as_bytes()).await.is_err() {
                        return;
                    }
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                    let _ = w.shutdown().await;
                });
            }
        });
        Dest { ip, accepted, task }
    }

    fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }
}

/// A ServiceEntry endpoint at `ip`, HBONE-capable when `tunnel` is given.
fn endpoint(ip: Ipv4Addr, tunnel: Option<&str>, network: &str) -> String {
    let label = tunnel
        .map(|t| format!(", networking.istio.io/tunnel: \"{t}\""))
        .unwrap_or_default();
    format!("  - {{address: {ip}, network: {network}, labels: {{app: x{label}}}}}\n")
}

/// A WorkloadEntry of `app: reviews` at `ip`, HBONE-capable when `tunnel` is given.
fn workload_entry(name: &str, ip: Ipv4Addr, tunnel: Option<&str>, network: &str) -> String {
    let label = tunnel
        .map(|t| format!(", networking.istio.io/tunnel: \"{t}\""))
        .unwrap_or_default();
    format!(
        "---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {{name: reviews-{name}, namespace: default}}
spec:
  address: {ip}
  network: {network}
  labels: {{app: reviews{label}}}
"
    )
}

fn service(host: &str, endpoints: &str) -> String {
    format!(
        "---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: {name}, namespace: default}}
spec:
  hosts: [{host}]
  ports: [{{number: 9080, name: tcp, targetPort: 9080}}]
  resolution: STATIC
  endpoints:
{endpoints}",
        name = host.split('.').next().unwrap()
    )
}

/// The Gateway Istio's ambient east-west gateway is made from.
fn east_west_gateway(port: u16) -> String {
    format!(
        "---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata:
  name: istio-eastwestgateway
  namespace: istio-system
  labels: {{topology.istio.io/network: net1}}
spec:
  gatewayClassName: istio-east-west
  listeners:
  - name: mesh
    port: {port}
    protocol: HBONE
    tls:
      mode: Terminate
      options:
        gateway.istio.io/tls-terminate-mode: ISTIO_MUTUAL
"
    )
}

/// Bootstrap (network net1, the gateway's SVID), the HBONE Gateway on `hbone`, and `rest`.
fn config(ports: &Ports, hbone: u16, certs: &Certs, rest: &str) -> String {
    format!(
        "{}{}{rest}",
        ports.bootstrap(&format!(
            "  network: net1\n  certificates: {{dir: {}}}\n",
            certs.gateway.display()
        )),
        east_west_gateway(hbone)
    )
}

/// strait on `config(…, rest)`, with its HBONE listener on a port of its own (reached on
/// loopback), and that address.
fn start_gateway(certs: &Certs, rest: &str) -> (Strait, SocketAddr) {
    let ports = Ports::new();
    let port = free_port();
    let gw = Strait::start(ports, &config(&ports, port, certs, rest));
    (gw, SocketAddr::from(([127, 0, 0, 1], port)))
}

/// An outer HBONE connection, as a source ztunnel opens it: TLS 1.3, ALPN h2, no SNI,
/// the workload's SVID, the gateway's SPIFFE ID checked.
struct Hbone {
    send: h2::client::SendRequest<Bytes>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Hbone {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A source ztunnel's outer TLS: the identity in `client`, the mesh root of `mesh`, ALPN
/// h2, no SNI, the gateway's SPIFFE ID checked.
fn source_config(client: &Path, mesh: &Path) -> rustls::ClientConfig {
    let mut id = load_identity(client).unwrap();
    id.roots = load_identity(mesh).unwrap().roots;
    let trust = TrustConfig {
        trust_domain: "cluster.local".into(),
        aliases: vec![],
        federated: Default::default(),
    };
    let expected = SpiffeId::parse(GW_ID).unwrap();
    let mut config = (*client_config(&id, &trust, Some(&expected), &[b"h2"]).unwrap()).clone();
    config.enable_sni = false;
    config
}

/// The outer TLS of an HBONE connection, as a source ztunnel opens it (a full handshake
/// each time).
async fn outer_tls(
    gw: SocketAddr,
    client: &Path,
    mesh: &Path,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, String> {
    let mut config = source_config(client, mesh);
    config.resumption = rustls::client::Resumption::disabled();
    let tcp = TcpStream::connect(gw).await.map_err(|e| e.to_string())?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("gateway").unwrap(), tcp)
        .await
        .map_err(|e| format!("TLS: {e}"))?;
    Ok(tls)
}

async fn hbone_connect(gw: SocketAddr, client: &Path, mesh: &Path) -> Result<Hbone, String> {
    hbone_over(outer_tls(gw, client, mesh).await?).await
}

/// HTTP/2 over an outer TLS connection, with ztunnel's windows.
async fn hbone_over(tls: tokio_rustls::client::TlsStream<TcpStream>) -> Result<Hbone, String> {
    let (send, conn) = h2::client::Builder::new()
        .initial_window_size(4 << 20)
        .initial_connection_window_size(16 << 20)
        .handshake::<_, Bytes>(tls)
        .await
        .map_err(|e| format!("HTTP/2: {e}"))?;
    let task = tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(Hbone { send, task })
}

impl Hbone {
    /// Sends `method` for `authority`; the status and the stream.
    async fn request(
        &self,
        method: http::Method,
        authority: &str,
    ) -> Result<(u16, Tunnel), String> {
        let uri = if method == http::Method::CONNECT {
            authority.to_string()
        } else {
            format!("https://{authority}/")
        };
        let req = http::Request::builder()
            .method(method)
            .uri(uri)
            .body(())
            .unwrap();
        let mut send = self.send.clone().ready().await.map_err(|e| e.to_string())?;
        let (resp, stream) = send.send_request(req, false).map_err(|e| e.to_string())?;
        let resp = tokio::time::timeout(WAIT, resp)
            .await
            .map_err(|_| "no response".to_string())?
            .map_err(|e| e.to_string())?;
        let status = resp.status().as_u16();
        Ok((
            status,
            Tunnel {
                recv: resp.into_body(),
                send: stream,
                pending: Bytes::new(),
            },
        ))
    }

    async fn connect(&self, authority: &str) -> Result<(u16, Tunnel), String> {
        self.request(http::Method::CONNECT, authority).await
    }
}

/// One stream as bytes.
struct Tunnel {
    recv: h2::RecvStream,
    send: h2::SendStream<Bytes>,
    pending: Bytes,
}

impl AsyncRead for Tunnel {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        while this.pending.is_empty() {
            match ready!(this.recv.poll_data(cx)) {
                None => return Poll::Ready(Ok(())),
                Some(Ok(d)) => this.pending = d,
                Some(Err(e)) => return Poll::Ready(Err(std::io::Error::other(e))),
            }
        }
        let n = this.pending.len().min(buf.remaining());
        buf.put_slice(&this.pending[..n]);
        this.pending.advance(n);
        let _ = this.recv.flow_control().release_capacity(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Tunnel {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = &mut *self;
        let mut cap = this.send.capacity();
        if cap == 0 {
            this.send.reserve_capacity(buf.len());
            while cap == 0 {
                cap = match ready!(this.send.poll_capacity(cx)) {
                    Some(Ok(n)) => n,
                    Some(Err(e)) => return Poll::Ready(Err(std::io::Error::other(e))),
                    None => return Poll::Ready(Err(std::io::ErrorKind::BrokenPipe.into())),
                };
            }
        }
        let n = cap.min(buf.len());
        this.send
            .send_data(Bytes::copy_from_slice(&buf[..n]), false)
            .map_err(std::io::Error::other)?;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let _ = self.send.send_data(Bytes::new(), true);
        Poll::Ready(Ok(()))
    }
}

impl Tunnel {
    /// Sends `line` and reads up to its echo: the tunnel end's `[name] ` greeting (on the
    /// first exchange) and the line. Returns what came back.
    async fn exchange(&mut self, line: &str, greeting: bool) -> String {
        self.write_all(line.as_bytes()).await.unwrap();
        let mut got = Vec::new();
        let want_brackets = if greeting { 1 } else { 0 };
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let text = String::from_utf8_lossy(&got).to_string();
            if text.matches(']').count() >= want_brackets && text.ends_with(line) {
                return text;
            }
            let mut buf = [0u8; 4096];
            let n = tokio::time::timeout_at(deadline, self.read(&mut buf))
                .await
                .unwrap_or_else(|_| panic!("no echo of {line:?}; got {text:?}"))
                .unwrap();
            assert!(
                n > 0,
                "tunnel closed before the echo of {line:?}; got {text:?}"
            );
            got.extend_from_slice(&buf[..n]);
        }
    }

    async fn body(mut self) -> String {
        let mut out = Vec::new();
        let _ = tokio::time::timeout(WAIT, self.read_to_end(&mut out)).await;
        String::from_utf8_lossy(&out).to_string()
    }
}

/// The name in a `[name] …` greeting.
fn greeted_by(text: &str) -> &str {
    text.trim_start_matches('[').split(']').next().unwrap_or("")
}

/// Many tunnels on one outer connection: each a balancing pick of its own over the
/// HBONE-capable endpoints of the gateway's network (one a ServiceEntry endpoint, one a
/// WorkloadEntry whose label lists `http` among others), never the endpoint without the
/// label nor the one in another network, although both listen on 15008. Unknown names
/// get 404 on their own stream while the others keep flowing. The same process serves
/// 15443 meanwhile. Metrics and the access log show each tunnel with the client's identity.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tunnels_are_balanced_per_stream_and_refused_per_stream() {
    let certs = Certs::new();
    let sleep = certs.issue(SLEEP_ID, "sleep");
    let (a, b) = (
        Dest::start("a", Behaviour::Echo).await,
        Dest::start("b", Behaviour::Echo).await,
    );
    let plain = Dest::start("no-hbone", Behaviour::Echo).await;
    let remote = Dest::start("net2", Behaviour::Echo).await;
    let ca = TestCa::new();
    let ratings = Workload::start(&ca, "spiffe://cluster.local/ns/default/sa/ratings").await;
    let ports = Ports::new();
    let hbone_port = free_port();
    // Endpoints from WorkloadEntries selected by the ServiceEntry, as Istio reads them.
    let rest = format!(
        "---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: reviews, namespace: default}}
spec:
  hosts: [{REVIEWS}]
  ports: [{{number: 9080, name: tcp, targetPort: 9080}}]
  resolution: STATIC
  workloadSelector: {{labels: {{app: reviews}}}}
{}{}{}{}{}---
{}",
        workload_entry("a", a.ip, Some("http"), "net1"),
        // Istio reads the label as a list.
        workload_entry("b", b.ip, Some("tcp,http"), "net1"),
        workload_entry("plain", plain.ip, None, "net1"),
        workload_entry("remote", remote.ip, Some("http"), "net2"),
        service(
            RATINGS,
            &format!(
                "  - {{address: 127.0.0.1, ports: {{tcp: {}}}}}\n",
                ratings.addr.port()
            )
        ),
        ports.gateway_doc(&["*.local"]),
    );
    let gw = Strait::start(ports, &config(&ports, hbone_port, &certs, &rest));
    let hbone_addr = SocketAddr::from(([127, 0, 0, 1], hbone_port));

    let client = Arc::new(
        hbone_connect(hbone_addr, &sleep, &certs.gateway)
            .await
            .unwrap(),
    );
    // A tunnel held open across the refusals below.
    let (status, mut held) = client.connect(&format!("{REVIEWS}:9080")).await.unwrap();
    assert_eq!(status, 200);
    let first = held.exchange("held 1\n", true).await;
    let mut tasks = Vec::new();
    for i in 0..12 {
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            let (status, mut t) = client.connect(&format!("{REVIEWS}:9080")).await.unwrap();
            assert_eq!(status, 200, "tunnel {i}");
            let text = t.exchange(&format!("hello {i}\n"), true).await;
            t.shutdown().await.unwrap();
            greeted_by(&text).to_string()
        }));
    }
    // Refusals on the same connection, while those tunnels run.
    for authority in [
        "nope.default.svc.cluster.local:9080",
        &format!("{REVIEWS}:9999"),
        // Not host:port.
        REVIEWS,
    ] {
        let (status, stream) = client.connect(authority).await.unwrap();
        assert_eq!(status, 404, "{authority}: {}", stream.body().await);
    }
    let mut picks = std::collections::BTreeMap::new();
    for t in tasks {
        *picks.entry(t.await.unwrap()).or_insert(0) += 1;
    }
    assert_eq!(
        picks.keys().map(String::as_str).collect::<Vec<_>>(),
        ["a", "b"],
        "{picks:?}"
    );
    // The held tunnel still flows, to the endpoint it picked.
    let again = held.exchange("held 2\n", false).await;
    assert!(again.ends_with("held 2\n"), "{again:?}");
    assert!(first.starts_with("[a] ") || first.starts_with("[b] "));
    assert_eq!(
        plain.accepted(),
        0,
        "the endpoint without HBONE was dialled"
    );
    assert_eq!(
        remote.accepted(),
        0,
        "the other network's endpoint was dialled"
    );
    assert_eq!(a.accepted() + b.accepted(), 13);
    held.shutdown().await.unwrap();
    drop(held);

    // 15443 on the same process.
    let (mut tls, seen) = tls_connect(
        gw.gateway,
        &ca,
        &format!("outbound_.9080_._.{RATINGS}"),
        &["istio"],
    )
    .await
    .unwrap();
    assert_eq!(seen, ratings.spiffe);
    assert_eq!(
        echo_once(&mut tls, b"passthrough\n").await,
        b"passthrough\n"
    );
    drop(tls);

    let waypoint = [
        ("reporter", "waypoint"),
        ("source_principal", SLEEP_ID),
        ("destination_service", REVIEWS),
        ("connection_security_policy", "mutual_tls"),
    ];
    assert!(
        gw.eventually(WAIT, || {
            gw.metric("istio_tcp_connections_closed_total", &waypoint) == 13.0
        }),
        "{}",
        gw.metrics_text()
    );
    assert_eq!(
        gw.metric("istio_tcp_connections_opened_total", &waypoint),
        13.0
    );
    // Received: the client's bytes; sent: the greeting and the echo.
    let received: usize =
        "held 1\nheld 2\n".len() + (0..12).map(|i| format!("hello {i}\n").len()).sum::<usize>();
    assert_eq!(
        gw.metric("istio_tcp_received_bytes_total", &waypoint),
        received as f64
    );
    assert_eq!(
        gw.metric("istio_tcp_sent_bytes_total", &waypoint),
        (received + 13 * "[a] ".len()) as f64
    );
    assert_eq!(gw.metric("strait_hbone_connections_total", &[]), 1.0);
    assert_eq!(gw.metric("strait_hbone_streams_total", &[]), 16.0);
    // A refused stream ends (and counts) after its client has read the 404: awaited.
    gw.wait_metric("strait_hbone_active_streams", &[], |v| v == 0.0);
    gw.wait_metric(
        "strait_refusals_total",
        &[("response_flag", "NR"), ("reason", "unknown_service")],
        |v| v == 2.0,
    );
    gw.wait_metric(
        "strait_refusals_total",
        &[("response_flag", "NR"), ("reason", "bad_authority")],
        |v| v == 1.0,
    );
    // The passthrough connection is reported as before, by its own reporter.
    assert!(gw.eventually(WAIT, || gw.metric(
        "istio_tcp_connections_closed_total",
        &[("reporter", "source"), ("destination_service", RATINGS)]
    ) == 1.0));

    // One access-log line per tunnel, with the outer identity and the :authority.
    assert!(
        gw.eventually(WAIT, || {
            gw.access_log()
                .iter()
                .filter(|l| l["authority"].is_string())
                .count()
                == 16
        }),
        "{:#?}",
        gw.access_log()
    );
    let log = gw.access_log();
    let tunnels: Vec<_> = log.iter().filter(|l| l["authority"].is_string()).collect();
    for l in &tunnels {
        assert_eq!(l["peer_identity"], SLEEP_ID, "{l}");
    }
    let ok: Vec<_> = tunnels
        .iter()
        .filter(|l| l["response_flag"] == "-")
        .collect();
    assert_eq!(ok.len(), 13);
    for l in &ok {
        assert_eq!(l["authority"], format!("{REVIEWS}:9080"));
        assert_eq!(l["service"], REVIEWS);
        let up = l["upstream"].as_str().unwrap();
        assert!(
            [a.ip, b.ip]
                .iter()
                .any(|ip| up == format!("{ip}:{HBONE_PORT}")),
            "{l}"
        );
    }
    let nope = tunnels
        .iter()
        .find(|l| l["authority"] == "nope.default.svc.cluster.local:9080")
        .unwrap();
    assert_eq!(nope["response_flag"], "NR");
    assert_eq!(nope["reason"], "unknown_service");
    // The outer connection itself is not a line: it was not refused.
    assert_eq!(
        log.iter()
            .filter(|l| l["peer_identity"] == SLEEP_ID && !l["authority"].is_string())
            .count(),
        0
    );
}

/// A service whose HBONE endpoints refuse connections gets 503 on that stream; a service
/// with endpoints but none HBONE-capable gets 503 without any being dialled; the other
/// tunnels of the connection are not disturbed. A request other than CONNECT gets what
/// Envoy answers (404: no route takes it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_services_get_503_on_their_own_stream() {
    let certs = Certs::new();
    let sleep = certs.issue(SLEEP_ID, "sleep");
    let a = Dest::start("a", Behaviour::Echo).await;
    let plain = Dest::start("plain", Behaviour::Echo).await;
    let dead = endpoint_ip(); // nothing listens there
    let rest = service(REVIEWS, &endpoint(a.ip, Some("http"), "net1"))
        + &service(
            "dead.default.svc.cluster.local",
            &endpoint(dead, Some("http"), "net1"),
        )
        + &service(
            "sidecar.default.svc.cluster.local",
            &endpoint(plain.ip, None, "net1"),
        );
    let (gw, hbone) = start_gateway(&certs, &rest);
    let client = hbone_connect(hbone, &sleep, &certs.gateway).await.unwrap();
    let (status, mut held) = client.connect(&format!("{REVIEWS}:9080")).await.unwrap();
    assert_eq!(status, 200);
    held.exchange("one\n", true).await;

    let (status, body) = client
        .connect("dead.default.svc.cluster.local:9080")
        .await
        .unwrap();
    assert_eq!(status, 503, "{}", body.body().await);
    let (status, body) = client
        .connect("sidecar.default.svc.cluster.local:9080")
        .await
        .unwrap();
    assert_eq!(status, 503, "{}", body.body().await);
    assert_eq!(plain.accepted(), 0);
    let (status, _) = client
        .request(http::Method::GET, &format!("{REVIEWS}:9080"))
        .await
        .unwrap();
    assert_eq!(status, 404);

    held.exchange("two\n", false).await;

    // `strait route` explains an :authority as the data path treats it.
    let route = |authority: &str| {
        let out = Command::new(strait_bin())
            .args(["route", "-c"])
            .arg(gw.config_path())
            .arg(authority)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).to_string(),
        )
    };
    let (code, text) = route(&format!("{REVIEWS}:9080"));
    assert_eq!(code, Some(0), "{text}");
    assert!(
        text.contains("result     routes (HBONE) to 1 candidate endpoint(s)"),
        "{text}"
    );
    let (code, text) = route("sidecar.default.svc.cluster.local:9080");
    assert_eq!(code, Some(1), "{text}");
    assert!(
        text.contains("excluded: not labelled networking.istio.io/tunnel: http"),
        "{text}"
    );
    let (code, text) = route(&format!("{REVIEWS}:9999"));
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("NR unknown_service"), "{text}");
    assert!(
        text.contains("(declared ports of that host: 9080)"),
        "{text}"
    );

    assert!(
        gw.eventually(WAIT, || {
            gw.metric(
                "strait_refusals_total",
                &[("response_flag", "UF"), ("reason", "connect_failed")],
            ) == 1.0
                && gw.metric(
                    "strait_refusals_total",
                    &[("response_flag", "UH"), ("reason", "no_healthy_endpoint")],
                ) == 1.0
                && gw.metric(
                    "strait_refusals_total",
                    &[("response_flag", "NR"), ("reason", "not_connect")],
                ) == 1.0
        }),
        "{}",
        gw.metrics_text()
    );
}

/// The outer handshake is ambient's: a client certificate from another CA, none at all,
/// TLS 1.2, or no `h2` in the ALPN offer is refused, and counted; a client the mesh root
/// vouches for but an AuthorizationPolicy denies is refused after the handshake.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_outer_connection_is_ambient_mtls() {
    let certs = Certs::new();
    let sleep = certs.issue(SLEEP_ID, "sleep");
    let banned = certs.issue("spiffe://cluster.local/ns/foo/sa/banned", "banned");
    let other = Certs::new();
    let stranger = other.issue(SLEEP_ID, "stranger");
    let a = Dest::start("a", Behaviour::Echo).await;
    let rest = service(REVIEWS, &endpoint(a.ip, Some("http"), "net1"))
        + "---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-banned, namespace: istio-system}
spec:
  action: DENY
  rules:
  - from: [{source: {principals: [cluster.local/ns/foo/sa/banned]}}]
";
    let (gw, hbone) = start_gateway(&certs, &rest);

    // The mesh's own client gets through.
    let ok = hbone_connect(hbone, &sleep, &certs.gateway).await.unwrap();
    let (status, mut t) = ok.connect(&format!("{REVIEWS}:9080")).await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(greeted_by(&t.exchange("hi\n", true).await), "a");

    // A certificate from another root (same SPIFFE ID): no tunnel.
    let refused = match hbone_connect(hbone, &stranger, &certs.gateway).await {
        Err(_) => true,
        Ok(c) => c.connect(&format!("{REVIEWS}:9080")).await.is_err(),
    };
    assert!(refused, "an untrusted client got a tunnel");
    // Denied by policy: the handshake completes, then the connection is closed.
    let denied = match hbone_connect(hbone, &banned, &certs.gateway).await {
        Err(_) => true,
        Ok(c) => c.connect(&format!("{REVIEWS}:9080")).await.is_err(),
    };
    assert!(denied, "a denied client got a tunnel");

    // TLS 1.2, and an offer without h2, are refused in the handshake.
    let id = load_identity(&sleep).unwrap();
    for (versions, alpn) in [
        (&[&rustls::version::TLS12][..], &b"h2"[..]),
        (&[&rustls::version::TLS13][..], &b"http/1.1"[..]),
    ] {
        let config = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(versions)
            .unwrap()
            .dangerous()
            // Any server certificate: only the version or the ALPN can fail this handshake.
            .with_custom_certificate_verifier(Arc::new(Unverified(provider())))
            .with_client_auth_cert(id.chain.clone(), id.key.clone_key())
            .unwrap();
        let mut config = config;
        config.alpn_protocols = vec![alpn.to_vec()];
        let tcp = TcpStream::connect(hbone).await.unwrap();
        let r = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(ServerName::try_from("gateway").unwrap(), tcp)
            .await;
        assert!(r.is_err(), "{versions:?} {alpn:?} was accepted");
    }

    assert!(
        gw.eventually(WAIT, || {
            let refused = |reason| {
                gw.metric(
                    "strait_refusals_total",
                    &[("response_flag", "UAEX"), ("reason", reason)],
                )
            };
            refused("untrusted_chain") == 1.0
                && refused("denied_by_policy") == 1.0
                && refused("incompatible") == 1.0
                && refused("no_application_protocol") == 1.0
        }),
        "{}",
        gw.metrics_text()
    );
    // Refused outer connections are logged, with the identity where there was one.
    assert!(gw.eventually(WAIT, || gw.access_log().iter().any(|l| {
        l["peer_identity"] == "spiffe://cluster.local/ns/foo/sa/banned"
            && l["response_flag"] == "UAEX"
    })));
    drop(t);
}

/// A session never outlives a certificate it was made with, on 15008 as on ISTIO_MUTUAL:
/// an outer connection that resumes a session whose client certificate has expired since
/// is refused as `expired` (as its full handshake would be), and gets no tunnel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outer_connection_does_not_resume_past_its_client_certificate() {
    use rustls::HandshakeKind::{Full, Resumed};
    let certs = Certs::new();
    let short = certs.dir.path().join("short");
    strait(&[
        "cert",
        "issue",
        "--ca",
        certs.ca.to_str().unwrap(),
        "--id",
        SLEEP_ID,
        "--out",
        short.to_str().unwrap(),
        "--valid-for",
        "3s",
    ]);
    let issued = std::time::Instant::now();
    let a = Dest::start("a", Behaviour::Echo).await;
    let (gw, hbone) = start_gateway(
        &certs,
        &service(REVIEWS, &endpoint(a.ip, Some("http"), "net1")),
    );
    // A source that keeps its tickets, as ztunnel's rustls client does.
    let config = Arc::new(source_config(&short, &certs.gateway));
    let tunnel = || async {
        let tcp = TcpStream::connect(hbone).await.map_err(|e| e.to_string())?;
        let tls = tokio_rustls::TlsConnector::from(config.clone())
            .connect(ServerName::try_from("gateway").unwrap(), tcp)
            .await
            .map_err(|e| format!("TLS: {e}"))?;
        let kind = tls.get_ref().1.handshake_kind();
        let outer = hbone_over(tls).await?;
        let (status, mut t) = outer.connect(&format!("{REVIEWS}:9080")).await?;
        let greeted = greeted_by(&t.exchange("hi\n", true).await).to_string();
        Ok::<_, String>((kind, status, greeted))
    };
    assert_eq!(tunnel().await, Ok((Some(Full), 200, "a".to_string())));
    assert_eq!(tunnel().await, Ok((Some(Resumed), 200, "a".to_string())));
    // notAfter is the issue time plus 3 s, in whole seconds.
    tokio::time::sleep(
        (issued + Duration::from_secs(5)).saturating_duration_since(std::time::Instant::now()),
    )
    .await;
    let late = tunnel().await;
    assert!(
        late.is_err(),
        "a tunnel after the client certificate expired: {late:?}"
    );
    gw.wait_metric("strait_refusals_total", &[("reason", "expired")], |v| {
        v == 1.0
    });
}

/// Each stream has its own flow control: a destination that never reads holds back its
/// own tunnel, while another tunnel on the same connection moves megabytes. Half-close
/// goes through: the client's END_STREAM reaches the endpoint as FIN, and the endpoint's
/// answer after it still arrives, followed by the end of the stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_destination_slows_only_its_stream_and_half_close_goes_through() {
    let certs = Certs::new();
    let sleep = certs.issue(SLEEP_ID, "sleep");
    let echo = Dest::start("echo", Behaviour::Echo).await;
    let stall = Dest::start("stall", Behaviour::Stall).await;
    let rest = service(REVIEWS, &endpoint(echo.ip, Some("http"), "net1"))
        + &service(
            "stall.default.svc.cluster.local",
            &endpoint(stall.ip, Some("http"), "net1"),
        );
    let (gw, hbone) = start_gateway(&certs, &rest);
    let client = hbone_connect(hbone, &sleep, &certs.gateway).await.unwrap();

    let (status, mut slow) = client
        .connect("stall.default.svc.cluster.local:9080")
        .await
        .unwrap();
    assert_eq!(status, 200);
    // Push into the stalled tunnel until it stops taking bytes.
    let pushed = Arc::new(AtomicU64::new(0));
    let count = pushed.clone();
    let pusher = tokio::spawn(async move {
        let chunk = vec![7u8; 64 * 1024];
        for _ in 0..(64 * 16) {
            if slow.write_all(&chunk).await.is_err() {
                break;
            }
            count.fetch_add(chunk.len() as u64, Ordering::Relaxed);
        }
        slow
    });
    let settled = settled(&pushed).await;
    assert!(
        settled < 64 << 20,
        "the stalled tunnel took {settled} bytes: no backpressure"
    );

    // Meanwhile another tunnel moves 8 MiB both ways.
    let (status, fast) = client.connect(&format!("{REVIEWS}:9080")).await.unwrap();
    assert_eq!(status, 200);
    let (mut r, mut w) = tokio::io::split(fast);
    let total = 8usize << 20;
    let writer = tokio::spawn(async move {
        let mut buf = vec![0u8; 64 * 1024];
        let mut off = 0u64;
        while (off as usize) < total {
            fill_pattern(1, off, &mut buf);
            w.write_all(&buf).await.unwrap();
            off += buf.len() as u64;
        }
        // Half-close: the endpoint sees FIN, still answers, then closes.
        w.shutdown().await.unwrap();
    });
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), r.read_to_end(&mut got))
        .await
        .expect("the fast tunnel was held back by the stalled one")
        .unwrap();
    writer.await.unwrap();
    let greeting = b"[echo] ";
    assert_eq!(&got[..greeting.len()], greeting);
    let body = &got[greeting.len()..];
    assert_eq!(body.len(), total);
    assert!(
        body.iter()
            .enumerate()
            .all(|(i, b)| *b == pattern_byte(1, i as u64)),
        "the echo differs from what was sent"
    );
    // The stalled tunnel is still held back, not failed.
    assert!(!pusher.is_finished());
    pusher.abort();
    assert_eq!(gw.metric("strait_hbone_active_connections", &[]), 1.0);
}

/// Waits until `n` stops growing for half a second (bounded); its value then.
async fn settled(n: &AtomicU64) -> u64 {
    let mut last = u64::MAX;
    for _ in 0..40 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = n.load(Ordering::Relaxed);
        if now == last {
            return now;
        }
        last = now;
    }
    last
}

/// A client that resets its stream ends that tunnel at once, even while its destination
/// reads nothing and the gateway's writes towards it are blocked: the tunnel is counted
/// closed and logged, and another tunnel on the same connection goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_ends_its_tunnel_while_the_destination_stalls() {
    let certs = Certs::new();
    let sleep = certs.issue(SLEEP_ID, "sleep");
    let echo = Dest::start("echo", Behaviour::Echo).await;
    let stall = Dest::start("stall", Behaviour::Stall).await;
    const STALL: &str = "stall.default.svc.cluster.local";
    let rest = service(REVIEWS, &endpoint(echo.ip, Some("http"), "net1"))
        + &service(STALL, &endpoint(stall.ip, Some("http"), "net1"));
    let (gw, hbone) = start_gateway(&certs, &rest);
    let client = hbone_connect(hbone, &sleep, &certs.gateway).await.unwrap();
    let (status, mut fast) = client.connect(&format!("{REVIEWS}:9080")).await.unwrap();
    assert_eq!(status, 200);
    fast.exchange("before\n", true).await;

    let (status, mut slow) = client.connect(&format!("{STALL}:9080")).await.unwrap();
    assert_eq!(status, 200);
    // Push until the tunnel stops taking bytes: its window is spent and the gateway's
    // socket towards the destination is full.
    let chunk = vec![7u8; 64 * 1024];
    let mut pushed = 0usize;
    while pushed < 256 << 20 {
        match tokio::time::timeout(Duration::from_millis(500), slow.write_all(&chunk)).await {
            Ok(written) => written.unwrap(),
            Err(_) => break,
        }
        pushed += chunk.len();
    }
    assert!(pushed < 256 << 20, "the stalled tunnel took {pushed} bytes");
    assert_eq!(gw.metric("strait_hbone_active_streams", &[]), 2.0);

    slow.send.send_reset(h2::Reason::CANCEL);
    let stalled = [("reporter", "waypoint"), ("destination_service", STALL)];
    assert!(
        gw.eventually(WAIT, || {
            gw.metric("istio_tcp_connections_closed_total", &stalled) == 1.0
                && gw.metric("strait_hbone_active_streams", &[]) == 1.0
        }),
        "the reset tunnel is still open: {}",
        gw.metrics_text()
    );
    assert!(gw.eventually(WAIT, || {
        gw.access_log()
            .iter()
            .any(|l| l["authority"] == format!("{STALL}:9080"))
    }));
    // The other tunnel is untouched.
    fast.exchange("after\n", false).await;
    assert_eq!(stall.accepted(), 1);
}

/// Envoy as Istio's ambient east-west gateway, serving each `(host, endpoint ip)` on port
/// 9080 (the endpoint's HBONE port 15008), with the gateway's SVID; its HBONE address.
/// `None` when Envoy is not installed.
async fn reference_envoy(
    certs: &Certs,
    services: &[(&str, Ipv4Addr)],
) -> Option<(xds::Envoy, SocketAddr)> {
    let listen = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let endpoints: Vec<(String, [SocketAddr; 1])> = services
        .iter()
        .map(|(host, ip)| {
            (
                format!("{host}:9080"),
                [SocketAddr::from((*ip, HBONE_PORT))],
            )
        })
        .collect();
    let services: Vec<(&str, &[SocketAddr])> = endpoints
        .iter()
        .map(|(a, e)| (a.as_str(), &e[..]))
        .collect();
    let envoy = xds::Envoy::launch(
        &hbone::reference_gateway_bootstrap(
            listen,
            admin,
            &certs.gateway,
            "cluster.local",
            &services,
        ),
        admin,
        xds::EnvoyOptions {
            delta: true,
            listener: listen,
        },
        None,
    )
    .await?;
    Some((envoy, listen))
}

/// The same streams, on one connection each, through strait and through Envoy as Istio's
/// ambient east-west gateway: the same status for a served name, an unknown name, an
/// unknown port, a service whose endpoints refuse, and a request other than CONNECT; and
/// the same tunnel bytes where both answer 200.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strait_answers_each_stream_as_envoy_does() {
    let certs = Certs::new();
    let sleep = certs.issue(SLEEP_ID, "sleep");
    let a = Dest::start("a", Behaviour::Echo).await;
    let dead = endpoint_ip();
    let dead_host = "dead.default.svc.cluster.local";
    let rest = service(REVIEWS, &endpoint(a.ip, Some("http"), "net1"))
        + &service(dead_host, &endpoint(dead, Some("http"), "net1"));
    let (gw, hbone) = start_gateway(&certs, &rest);
    let Some((envoy, listen)) =
        reference_envoy(&certs, &[(REVIEWS, a.ip), (dead_host, dead)]).await
    else {
        return;
    };
    let cases: [(http::Method, String); 6] = [
        (http::Method::CONNECT, format!("{REVIEWS}:9080")),
        (
            http::Method::CONNECT,
            "nope.default.svc.cluster.local:9080".into(),
        ),
        (http::Method::CONNECT, format!("{REVIEWS}:9999")),
        (http::Method::CONNECT, REVIEWS.into()),
        (http::Method::CONNECT, format!("{dead_host}:9080")),
        (http::Method::GET, format!("{REVIEWS}:9080")),
    ];
    let mut seen = Vec::new();
    for (who, addr) in [("strait", hbone), ("envoy", listen)] {
        let client = hbone_connect(addr, &sleep, &certs.gateway)
            .await
            .unwrap_or_else(|e| panic!("{who}: {e}\n{}", envoy.log()));
        let mut statuses = Vec::new();
        for (method, authority) in &cases {
            let (status, mut t) = client
                .request(method.clone(), authority)
                .await
                .unwrap_or_else(|e| panic!("{who} {method} {authority}: {e}\n{}", envoy.log()));
            if status == 200 {
                let text = t.exchange("through\n", true).await;
                assert_eq!(text, "[a] through\n", "{who}");
                t.shutdown().await.unwrap();
            }
            statuses.push(status);
        }
        seen.push((who, statuses));
    }
    assert_eq!(seen[0].1, seen[1].1, "strait and Envoy differ: {seen:?}");
    assert_eq!(seen[0].1, [200, 404, 404, 404, 503, 404], "{seen:?}");
    drop(gw);
}

/// SIGTERM drains 15008 as it drains 15443: readiness fails, the outer connection gets
/// GOAWAY (new streams on it are refused), the tunnel already open keeps flowing until the
/// client ends it, and then strait exits 0 without waiting for the drain deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_sends_goaway_and_lets_open_tunnels_finish() {
    let certs = Certs::new();
    let sleep = certs.issue(SLEEP_ID, "sleep");
    let a = Dest::start("a", Behaviour::Echo).await;
    let ports = Ports::new();
    let hbone_port = free_port();
    let rest = service(REVIEWS, &endpoint(a.ip, Some("http"), "net1"));
    let mut gw = Strait::start(
        ports,
        &config(&ports, hbone_port, &certs, &rest)
            .replace("drainDuration: 5s", "drainDuration: 30s"),
    );
    let hbone = SocketAddr::from(([127, 0, 0, 1], hbone_port));
    let client = hbone_connect(hbone, &sleep, &certs.gateway).await.unwrap();
    let authority = format!("{REVIEWS}:9080");
    let (status, mut open) = client.connect(&authority).await.unwrap();
    assert_eq!(status, 200);
    open.exchange("before\n", true).await;

    let began = std::time::Instant::now();
    gw.signal(libc::SIGTERM);
    // Streams opened before the GOAWAY arrives are ended at once (dropped: reset).
    let mut refused = false;
    for _ in 0..100 {
        match client.connect(&authority).await {
            Err(_) => {
                refused = true;
                break;
            }
            Ok((_, t)) => drop(t),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(refused, "new streams still accepted after SIGTERM");
    assert!(gw.eventually(WAIT, || {
        http_get(gw.status, "/healthz/ready").is_ok_and(|(s, _)| s == 503)
    }));

    let after = open.exchange("after\n", false).await;
    assert!(after.ends_with("after\n"), "{after:?}");
    open.shutdown().await.unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(WAIT, open.read_to_end(&mut rest))
        .await
        .expect("the tunnel did not end after the client's END_STREAM")
        .unwrap();
    drop(open);
    drop(client);
    assert_eq!(gw.wait_exit(Duration::from_secs(20)), Some(0));
    assert!(
        began.elapsed() < Duration::from_secs(25),
        "strait waited for the drain deadline: {:?}",
        began.elapsed()
    );
}

/// End to end with Istio's own HBONE code on both sides: `hbone-peer source` (a source
/// ztunnel on Istio's `pkg/hbone` dialer) → strait's 15008 → `hbone-peer dest` (a
/// destination ztunnel) on the endpoint's 15008. The inner TLS is end to end: the
/// destination sees the source workload's SPIFFE ID, never strait's, and the source
/// checked the destination's; strait reports the tunnel with the source's identity.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn istios_source_reaches_istios_destination_through_strait() {
    let certs = Certs::new();
    let sleep = certs.issue(SLEEP_ID, "sleep");
    let reviews_id = "spiffe://cluster.local/ns/default/sa/reviews";
    let reviews = certs.issue(reviews_id, "reviews");
    let ip = endpoint_ip();
    let Some(dest) = hbone::hbone_dest(
        SocketAddr::from((ip, HBONE_PORT)),
        &reviews,
        "reviews-a",
        None,
    )
    .await
    else {
        return;
    };
    let rest = service(REVIEWS, &endpoint(ip, Some("http"), "net1"));
    let (gw, hbone_addr) = start_gateway(&certs, &rest);
    let listen = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let authority = format!("{REVIEWS}:9080");
    let mut source = hbone::HboneSource::new(hbone_addr, &sleep);
    source.gateway_id = Some(GW_ID.into());
    source.dest_id = Some(reviews_id.into());
    source.network = Some("net0".into());
    source.maps = vec![(listen, authority.clone())];
    let Some(src) = source.start(None).await else {
        return;
    };

    for i in 0..3 {
        let line = format!("hello {i}\n");
        let back = hbone::tunnel_round_trip(listen, line.as_bytes(), WAIT)
            .await
            .unwrap_or_else(|| panic!("no answer; source:\n{}", src.log()));
        assert_eq!(
            String::from_utf8_lossy(&back),
            format!("[reviews-a] {line}"),
            "source:\n{}\ndest:\n{}",
            src.log(),
            dest.log()
        );
    }
    let streams = dest.wait_streams(3, WAIT).await;
    assert_eq!(streams.len(), 3, "{streams:?}");
    for s in &streams {
        assert_eq!(s.authority, authority);
        // The destination's TLS client is the source workload, not the gateway.
        assert_eq!(s.peer, SLEEP_ID);
        assert_eq!(s.network, "net0");
    }
    let waypoint = [
        ("reporter", "waypoint"),
        ("source_principal", SLEEP_ID),
        ("destination_service", REVIEWS),
    ];
    assert!(
        gw.eventually(WAIT, || gw
            .metric("istio_tcp_connections_closed_total", &waypoint)
            == 3.0),
        "{}",
        gw.metrics_text()
    );
    // The source's dialer pools one outer connection for the three tunnels.
    assert_eq!(gw.metric("strait_hbone_connections_total", &[]), 1.0);
    assert!(gw.eventually(WAIT, || {
        gw.access_log()
            .iter()
            .filter(|l| l["authority"] == authority.as_str() && l["peer_identity"] == SLEEP_ID)
            .count()
            == 3
    }));
}

/// Each tunnel's `istio_tcp_*` series are its outer connection's client and its service:
/// two clients, each with one outer connection carrying tunnels to two services in turn,
/// and one tunnel refused (`UF`), are counted exactly under their own labels.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_tunnel_is_counted_under_its_client_and_service() {
    const CURL_ID: &str = "spiffe://cluster.local/ns/foo/sa/curl";
    const DETAILS: &str = "details.default.svc.cluster.local";
    const GONE: &str = "gone.default.svc.cluster.local";
    let certs = Certs::new();
    let clients = [
        (SLEEP_ID, certs.issue(SLEEP_ID, "sleep")),
        (CURL_ID, certs.issue(CURL_ID, "curl")),
    ];
    let reviews = Dest::start("r", Behaviour::Echo).await;
    let details = Dest::start("d", Behaviour::Echo).await;
    let rest = service(REVIEWS, &endpoint(reviews.ip, Some("http"), "net1"))
        + &service(DETAILS, &endpoint(details.ip, Some("http"), "net1"))
        + &service(GONE, &endpoint(endpoint_ip(), Some("http"), "net1"));
    let (gw, hbone) = start_gateway(&certs, &rest);
    // (client, service) → tunnels; sleep 3 + 2, curl 1 + 4, and one refused each.
    let plan = [(3usize, 2usize), (1, 4)];
    for ((_, dir), (to_reviews, to_details)) in clients.iter().zip(plan) {
        let client = hbone_connect(hbone, dir, &certs.gateway).await.unwrap();
        let mut turns: Vec<&str> = Vec::new();
        for i in 0..to_reviews.max(to_details) {
            if i < to_reviews {
                turns.push(REVIEWS);
            }
            if i < to_details {
                turns.push(DETAILS);
            }
        }
        turns.push(GONE);
        for host in turns {
            let (status, mut t) = client.connect(&format!("{host}:9080")).await.unwrap();
            if host == GONE {
                assert_eq!(status, 503);
                continue;
            }
            assert_eq!(status, 200);
            assert!(t.exchange("x\n", true).await.ends_with("x\n"));
            t.shutdown().await.unwrap();
        }
    }
    let count = |name: &str, principal: &str, host: &str, flag: &str| {
        gw.metric(
            name,
            &[
                ("reporter", "waypoint"),
                ("source_principal", principal),
                ("destination_service", host),
                ("response_flags", flag),
            ],
        )
    };
    gw.wait_metric("strait_hbone_active_streams", &[], |v| v == 0.0);
    for ((principal, _), (to_reviews, to_details)) in clients.iter().zip(plan) {
        for (host, n) in [(REVIEWS, to_reviews), (DETAILS, to_details)] {
            let n = n as f64;
            assert_eq!(
                count("istio_tcp_connections_opened_total", principal, host, "-"),
                n
            );
            assert_eq!(
                count("istio_tcp_connections_closed_total", principal, host, "-"),
                n
            );
            // Each tunnel's bytes: "x\n" up, the greeting and the echo down.
            assert_eq!(
                count("istio_tcp_received_bytes_total", principal, host, "-"),
                2.0 * n
            );
            assert_eq!(
                count("istio_tcp_sent_bytes_total", principal, host, "-"),
                6.0 * n
            );
        }
        assert_eq!(
            count("istio_tcp_connections_opened_total", principal, GONE, "-"),
            1.0
        );
        assert_eq!(
            count("istio_tcp_connections_closed_total", principal, GONE, "UF"),
            1.0
        );
    }
}

/// The tunnels' cluster (`inbound-vip|9080|tcp|<host>`) has the policy istiod gives an
/// ambient east-west gateway's, whatever the DestinationRule says: LEAST_REQUEST, no
/// outlier detection and no connection limit, with only the rule's top-level
/// `connectionPool.tcp.idleTimeout` on the tunnel. The same rule's outlier detection and
/// `maxConnections` hold on 15443: an endpoint 15443 ejected is still a tunnel destination,
/// and tunnels are not counted against the limit 15443 is refused at (`UO`). A dead
/// endpoint is skipped for another on both paths (every tunnel still succeeds).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_rules_policy_holds_on_15443_and_not_on_the_tunnels_cluster() {
    let certs = Certs::new();
    let sleep = certs.issue(SLEEP_ID, "sleep");
    let ca = TestCa::new();
    // `a` answers on 15008 and 9080; `b` on 15008 only (15443 fails on it); `dead` on neither.
    let a = Dest::start("a", Behaviour::Echo).await;
    let b = Dest::start("b", Behaviour::Echo).await;
    let dead = endpoint_ip();
    let app = Workload::start_at(
        &ca,
        "spiffe://cluster.local/ns/default/sa/reviews",
        SocketAddr::from((a.ip, 9080)),
    )
    .await;
    let ports = Ports::new();
    let hbone_port = free_port();
    let rest = service(
        REVIEWS,
        &(endpoint(a.ip, Some("http"), "net1")
            + &endpoint(b.ip, Some("http"), "net1")
            + &endpoint(dead, Some("http"), "net1")),
    ) + "---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: default}
spec:
  host: reviews.default.svc.cluster.local
  trafficPolicy:
    connectionPool: {tcp: {maxConnections: 1, idleTimeout: 7m}}
    outlierDetection: {consecutive5xxErrors: 1, interval: 1s, baseEjectionTime: 60s, maxEjectionPercent: 100}
---
" + &ports.gateway_doc(&["*.local"]);
    let gw = Strait::start(ports, &config(&ports, hbone_port, &certs, &rest));
    let hbone_addr = SocketAddr::from(([127, 0, 0, 1], hbone_port));
    let sni = format!("outbound_.9080_._.{REVIEWS}");
    let outbound = sni.as_str();
    let inbound_vip = format!("inbound-vip|9080|tcp|{REVIEWS}");

    // The two clusters' policies, as /clusters and config_dump show them.
    let clusters = gw.clusters();
    let policy_of = |name: &str| {
        clusters["clusters"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == name)
            .unwrap_or_else(|| panic!("no cluster {name}: {clusters:#}"))["policy"]
            .clone()
    };
    let (router, tunnels) = (policy_of(outbound), policy_of(&inbound_vip));
    assert_eq!(router["maxConnections"], 1, "{router:#}");
    assert_eq!(
        router["outlierDetection"]["consecutiveErrors"], 1,
        "{router:#}"
    );
    assert_eq!(
        (
            &tunnels["loadBalancer"],
            &tunnels["maxConnections"],
            &tunnels["outlierDetection"],
            &tunnels["idleTimeout"],
            &tunnels["destinationRule"],
        ),
        (
            &serde_json::json!("LeastRequest"),
            &serde_json::Value::Null,
            &serde_json::Value::Null,
            &serde_json::json!("420s"),
            &serde_json::json!("default/reviews"),
        ),
        "{tunnels:#}"
    );
    let (code, body) = http_get(gw.admin, "/config_dump").unwrap();
    assert_eq!(code, 200);
    let dump: serde_json::Value = serde_json::from_str(&body).unwrap();
    let port = dump["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["host"] == REVIEWS)
        .unwrap()
        .clone();
    assert_eq!(port["policy"], router, "{port:#}");
    assert_eq!(port["tunnelPolicy"], tunnels, "{port:#}");

    // 15443 ejects the endpoints it fails on (each connection retried to `a`).
    let ejected = |e: &str| gw.metric("strait_endpoint_ejections_total", &[("endpoint", e)]) == 1.0;
    let (b_endpoint, dead_endpoint) = (format!("{}:9080", b.ip), format!("{dead}:9080"));
    let deadline = Instant::now() + WAIT;
    while !(ejected(&b_endpoint) && ejected(&dead_endpoint)) {
        assert!(Instant::now() < deadline, "{}", gw.metrics_text());
        // The slot of the connection before may not be free yet: a refusal is fine here.
        let _ = round_trip(gw.gateway, &ca, outbound).await;
    }
    for e in [&b_endpoint, &dead_endpoint] {
        assert_eq!(gw.endpoint_state(outbound, e)["health"], "ejected");
        assert_eq!(gw.endpoint_state(&inbound_vip, e)["health"], "healthy");
    }

    // One 15443 connection held: the next one is refused at maxConnections (UO).
    assert!(gw.eventually(WAIT, || {
        gw.clusters()["clusters"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["name"] == outbound && c["activeConnections"] == 0)
    }));
    let refused = |gw: &Strait| {
        gw.metric(
            "strait_refusals_total",
            &[
                ("response_flag", "UO"),
                ("reason", "cluster_max_connections"),
            ],
        )
    };
    let before = refused(&gw);
    let (mut held, _) = tls_connect(gw.gateway, &ca, outbound, &["istio"])
        .await
        .unwrap();
    assert_eq!(echo_once(&mut held, b"held\n").await, b"held\n");
    let mut second = tls_connect(gw.gateway, &ca, outbound, &["istio"]).await;
    if let Ok((tls, _)) = &mut second {
        // A handshake that completed locally is refused on its first read.
        let mut buf = [0u8; 1];
        let _ = tls.write_all(b"x").await;
        assert!(matches!(tls.read(&mut buf).await, Ok(0) | Err(_)));
    }
    gw.wait_metric(
        "strait_refusals_total",
        &[
            ("response_flag", "UO"),
            ("reason", "cluster_max_connections"),
        ],
        |v| v == before + 1.0,
    );

    // Meanwhile tunnels: four held at once (no connection limit on their cluster) …
    let client = hbone_connect(hbone_addr, &sleep, &certs.gateway)
        .await
        .unwrap();
    let mut open = Vec::new();
    for i in 0..4 {
        let (status, mut t) = client.connect(&format!("{REVIEWS}:9080")).await.unwrap();
        assert_eq!(status, 200, "held tunnel {i}: {}", gw.stderr_text());
        t.exchange(&format!("open {i}\n"), true).await;
        open.push(t);
    }
    // … then one after another: `b`, which 15443 ejected, is a destination, and `dead` is
    // skipped for another endpoint each time it is picked.
    let mut picks = std::collections::BTreeMap::new();
    for i in 0..20 {
        let (status, mut t) = client.connect(&format!("{REVIEWS}:9080")).await.unwrap();
        assert_eq!(status, 200, "tunnel {i}");
        let text = t.exchange("x\n", true).await;
        *picks.entry(greeted_by(&text).to_string()).or_insert(0) += 1;
        t.shutdown().await.unwrap();
    }
    assert!(picks.get("b").is_some_and(|n| *n > 0), "{picks:?}");
    assert!(b.accepted() > 0);
    for mut t in open {
        t.shutdown().await.unwrap();
    }
    drop(held);
    // The tunnels' failed dials of `dead` are counted, but not as the consecutive errors
    // 15443's outlier detection reads (its ejection had reset them).
    let dead_state = gw.endpoint_state(&inbound_vip, &dead_endpoint);
    assert_eq!(dead_state["consecutiveFailures"], 0, "{dead_state:#}");
    assert!(
        dead_state["connectFailures"].as_u64().unwrap() > 1,
        "{picks:?} {dead_state:#}"
    );
    assert!(a.accepted() > 0 && app.accepted() > 0);
}

/// The floods a source could send on one outer connection.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Flood {
    /// 101 CONNECTs at once: one more than the 100 concurrent streams allowed.
    OneStreamTooMany,
    /// 100 CONNECTs held open, then 1,100 more, each refused.
    RefusedStreams,
    /// 300 CONNECTs each reset by the client in the same write (rapid reset).
    RapidReset,
    /// 300 CONNECTs to a service whose endpoint never answers, each reset by the client a
    /// moment after it was sent, before any response.
    PrematureResets,
    /// One CONNECT carrying a header of this many bytes.
    OversizedHeaders(usize),
    /// A HEADERS frame without END_HEADERS, then 20,000 empty CONTINUATION frames.
    EndlessContinuation,
}

/// A fresh outer connection to `gw` carrying `flood` (`authority` answers, `hanging`
/// never does); the client, once the flood is written.
async fn flood(
    gw: SocketAddr,
    sleep: &Path,
    mesh: &Path,
    flood: Flood,
    authority: &str,
    hanging: &str,
) -> hbone::RawH2 {
    use hbone::*;
    let raw = RawH2::start(outer_tls(gw, sleep, mesh).await.unwrap());
    let ids = |n: u32| (0..n).map(|i| 1 + 2 * i);
    match flood {
        Flood::OneStreamTooMany => {
            raw.send(
                ids(101)
                    .flat_map(|id| connect_frame(id, authority))
                    .collect(),
            );
        }
        Flood::RefusedStreams => {
            raw.send(
                ids(100)
                    .flat_map(|id| connect_frame(id, authority))
                    .collect(),
            );
            raw.wait(WAIT, |s| {
                s.iter()
                    .filter(|e| matches!(e, Seen::Headers { .. }))
                    .count()
                    >= 100
            })
            .await;
            raw.send(
                ids(1200)
                    .skip(100)
                    .flat_map(|id| connect_frame(id, authority))
                    .collect(),
            );
        }
        Flood::RapidReset => {
            raw.send(
                ids(300)
                    .flat_map(|id| [connect_frame(id, authority), reset_frame(id, CANCEL)].concat())
                    .collect(),
            );
        }
        Flood::PrematureResets => {
            for id in ids(300) {
                raw.send(connect_frame(id, hanging));
                tokio::time::sleep(Duration::from_millis(3)).await;
                raw.send(reset_frame(id, CANCEL));
                if raw
                    .seen()
                    .iter()
                    .any(|s| matches!(s, Seen::GoAway { .. } | Seen::Closed))
                {
                    break;
                }
            }
        }
        Flood::OversizedHeaders(size) => {
            let big = vec![b'x'; size];
            let block = connect_block(authority, &[("x-big", &big)]);
            // In 16 KiB pieces, the largest frame every server takes.
            let mut pieces = block.chunks(16 << 10).peekable();
            let mut frames = Vec::new();
            let mut kind = HEADERS;
            while let Some(piece) = pieces.next() {
                let flags = if pieces.peek().is_none() {
                    END_HEADERS
                } else {
                    0
                };
                frames.extend(h2_frame(kind, flags, 1, piece));
                kind = CONTINUATION;
            }
            raw.send(frames);
        }
        Flood::EndlessContinuation => {
            let mut frames = h2_frame(HEADERS, 0, 1, &connect_block(authority, &[]));
            for _ in 0..20_000 {
                frames.extend(h2_frame(CONTINUATION, 0, 1, &[]));
            }
            raw.send(frames);
        }
    }
    raw
}

/// A TCP listener on `<ip>:15008` whose accept queue is full: connections to it hang.
fn hanging_endpoint() -> (Ipv4Addr, socket2::Socket, std::net::TcpStream) {
    let ip = endpoint_ip();
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    s.set_reuse_address(true).unwrap();
    s.bind(&SocketAddr::from((ip, HBONE_PORT)).into()).unwrap();
    s.listen(0).unwrap();
    let filler = std::net::TcpStream::connect((ip, HBONE_PORT)).unwrap();
    (ip, s, filler)
}

/// What a flooded outer connection showed its client.
#[derive(Debug, Default, PartialEq)]
struct Outcome {
    /// Streams answered 200.
    ok: usize,
    /// Other statuses, in order.
    statuses: Vec<u16>,
    /// Streams reset with REFUSED_STREAM.
    refused: usize,
    /// Other stream resets, by code.
    resets: Vec<u32>,
    /// The GOAWAY received (error code, debug data).
    goaway: Option<(u32, String)>,
    /// Whether the server closed the connection.
    closed: bool,
}

fn outcome(raw: &hbone::RawH2) -> Outcome {
    let mut o = Outcome::default();
    for s in raw.seen() {
        match s {
            hbone::Seen::Headers {
                status: Some(200), ..
            } => o.ok += 1,
            hbone::Seen::Headers { status, .. } => o.statuses.push(status.unwrap_or(0)),
            hbone::Seen::Reset {
                code: hbone::REFUSED_STREAM,
                ..
            } => o.refused += 1,
            hbone::Seen::Reset { code, .. } => o.resets.push(code),
            hbone::Seen::GoAway { code, debug, .. } => o.goaway = Some((code, debug)),
            hbone::Seen::Closed => o.closed = true,
            hbone::Seen::Data { .. }
            | hbone::Seen::Settings(_)
            | hbone::Seen::Ping(_)
            | hbone::Seen::WindowUpdate { .. } => {}
        }
    }
    o
}

/// The flood `f` on a fresh connection to `gw`; what it showed once the server closed
/// the connection, or once `settled` held.
async fn flood_outcome(
    gw: SocketAddr,
    sleep: &Path,
    mesh: &Path,
    f: Flood,
    hanging: &str,
    settled: impl Fn(&Outcome) -> bool,
) -> Outcome {
    let raw = flood(gw, sleep, mesh, f, &format!("{REVIEWS}:9080"), hanging).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let o = outcome(&raw);
        if o.closed || settled(&o) || tokio::time::Instant::now() >= deadline {
            return o;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// strait, and Envoy as Istio's ambient east-west gateway, each with `reviews` (an echo
/// endpoint) and `hang` (an endpoint whose accept queue is full, so that dials to it
/// hang); a well-behaved tunnel already open on each; and the flooding client's SVID.
struct FloodLab {
    gw: Strait,
    strait: SocketAddr,
    envoy: Option<(xds::Envoy, SocketAddr)>,
    certs: Certs,
    sleep: PathBuf,
    hanging: String,
    _dest: Dest,
    _hang: (socket2::Socket, std::net::TcpStream),
    good: Vec<(&'static str, Hbone, Tunnel)>,
    exchanges: usize,
}

impl Drop for FloodLab {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("strait's log:\n{}", self.gw.stderr_text());
            for l in self.gw.access_log() {
                eprintln!("ACCESS {l}");
            }
        }
    }
}

impl FloodLab {
    async fn start() -> FloodLab {
        let certs = Certs::new();
        let sleep = certs.issue(SLEEP_ID, "sleep");
        let dest = Dest::start("a", Behaviour::Echo).await;
        let (hang_ip, hang, filler) = hanging_endpoint();
        let hang_host = "hang.default.svc.cluster.local";
        let rest = service(REVIEWS, &endpoint(dest.ip, Some("http"), "net1"))
            + &service(hang_host, &endpoint(hang_ip, Some("http"), "net1"));
        let (gw, strait) = start_gateway(&certs, &rest);
        let envoy = reference_envoy(&certs, &[(REVIEWS, dest.ip), (hang_host, hang_ip)]).await;
        let mut lab = FloodLab {
            gw,
            strait,
            envoy,
            certs,
            sleep,
            hanging: format!("{hang_host}:9080"),
            _dest: dest,
            _hang: (hang, filler),
            good: Vec::new(),
            exchanges: 0,
        };
        for (who, addr) in lab.targets() {
            let client = hbone_connect(addr, &lab.sleep, &lab.certs.gateway)
                .await
                .unwrap();
            let (status, mut t) = client.connect(&format!("{REVIEWS}:9080")).await.unwrap();
            assert_eq!(status, 200, "{who}");
            t.exchange("open\n", true).await;
            lab.good.push((who, client, t));
        }
        lab
    }

    /// The gateways flooded: strait, and Envoy when it is installed.
    fn targets(&self) -> Vec<(&'static str, SocketAddr)> {
        let mut t = vec![("strait", self.strait)];
        t.extend(self.envoy.as_ref().map(|(_, a)| ("envoy", *a)));
        t
    }

    /// `f` against each gateway: what each showed its client.
    async fn flood(
        &self,
        f: Flood,
        settled: impl Fn(&Outcome) -> bool + Copy,
    ) -> Vec<(&'static str, Outcome)> {
        let mut out = Vec::new();
        for (who, addr) in self.targets() {
            let o = flood_outcome(
                addr,
                &self.sleep,
                &self.certs.gateway,
                f,
                &self.hanging,
                settled,
            )
            .await;
            out.push((who, o));
        }
        out
    }

    /// The tunnels opened before the floods still carry bytes, and a new connection to
    /// each gateway still opens a tunnel.
    async fn others_still_served(&mut self) {
        self.exchanges += 1;
        let line = format!("still {}\n", self.exchanges);
        for (who, _, t) in &mut self.good {
            let got = t.exchange(&line, false).await;
            assert!(got.ends_with(&line), "{who}: {got:?}");
        }
        for (who, addr) in self.targets() {
            let client = hbone_connect(addr, &self.sleep, &self.certs.gateway)
                .await
                .unwrap_or_else(|e| panic!("{who}: {e}"));
            let (status, mut t) = client.connect(&format!("{REVIEWS}:9080")).await.unwrap();
            assert_eq!(status, 200, "{who}");
            assert_eq!(t.exchange("new\n", true).await, "[a] new\n", "{who}");
        }
    }

    /// Waits for `strait_hbone_refusals_total{reason}` to reach `n`.
    fn refusals_reach(&self, reason: &str, n: f64) {
        let seen = || {
            self.gw
                .metric("strait_hbone_refusals_total", &[("reason", reason)])
        };
        assert!(
            self.gw.eventually(WAIT, || seen() >= n),
            "strait_hbone_refusals_total{{reason={reason:?}}} is {}, not {n}",
            seen()
        );
    }
}

/// Stream floods on one outer connection, each against strait and against Envoy as
/// Istio's ambient east-west gateway: one stream past the 100 allowed gets REFUSED_STREAM
/// from both, the connection serving on; a client that keeps opening streams past the
/// limit, one that resets streams in bursts (rapid reset), and one that resets each
/// stream before its answer get their connection closed by both (strait with a GOAWAY
/// ENHANCE_YOUR_CALM naming the cause, Envoy without one). strait counts each refusal in
/// `strait_hbone_refusals_total` by reason and logs the cause; tunnels on other
/// connections flow throughout, and new ones open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_floods_are_refused_counted_and_other_connections_served() {
    use hbone::ENHANCE_YOUR_CALM;
    let mut lab = FloodLab::start().await;

    let seen = lab
        .flood(Flood::OneStreamTooMany, |o| o.ok + o.refused >= 101)
        .await;
    for (who, o) in &seen {
        assert_eq!(
            o,
            &Outcome {
                ok: 100,
                refused: 1,
                ..Outcome::default()
            },
            "{who}"
        );
    }
    lab.refusals_reach("max_concurrent_streams", 1.0);
    lab.others_still_served().await;

    // h2 refuses up to 1,024 streams on a connection, then closes it.
    let seen = lab.flood(Flood::RefusedStreams, |_| false).await;
    for (who, o) in &seen {
        assert_eq!(o.ok, 100, "{who}: {o:?}");
        assert!(o.closed, "{who}: {o:?}");
    }
    assert_eq!(seen[0].1.refused, 1024, "{:?}", seen[0]);
    assert_eq!(
        seen[0].1.goaway,
        Some((ENHANCE_YOUR_CALM, "too_many_internal_resets".into()))
    );
    lab.refusals_reach("max_concurrent_streams", 1025.0);
    lab.refusals_reach("too_many_internal_resets", 1.0);
    lab.others_still_served().await;

    // More than 20 streams reset before they were accepted.
    let seen = lab.flood(Flood::RapidReset, |_| false).await;
    for (who, o) in &seen {
        assert!(o.closed && o.ok == 0, "{who}: {o:?}");
    }
    assert_eq!(
        seen[0].1.goaway,
        Some((ENHANCE_YOUR_CALM, "too_many_resets".into()))
    );
    lab.refusals_reach("too_many_resets", 1.0);
    lab.others_still_served().await;

    // Half of 500 streams reset before their answer: both close at the 250th.
    let seen = lab.flood(Flood::PrematureResets, |_| false).await;
    for (who, o) in &seen {
        assert!(o.closed && o.ok == 0, "{who}: {o:?}");
    }
    assert_eq!(seen[0].1.goaway, Some((ENHANCE_YOUR_CALM, String::new())));
    lab.refusals_reach("too_many_premature_resets", 1.0);
    assert!(
        lab.gw.eventually(WAIT, || {
            lab.gw.metric(
                "strait_refusals_total",
                &[("response_flag", "DC"), ("reason", "reset_before_response")],
            ) >= 250.0
        }),
        "the streams reset before their answer are not counted"
    );
    lab.others_still_served().await;

    // Each cause is logged, and the outer connection's access log line names it.
    for reason in [
        "too_many_internal_resets",
        "too_many_resets",
        "too_many_premature_resets",
    ] {
        assert!(
            lab.gw.wait_stderr(reason, WAIT),
            "no log line names {reason}:\n{}",
            lab.gw.stderr_text()
        );
        assert!(
            lab.gw.eventually(WAIT, || lab
                .gw
                .access_log()
                .iter()
                .any(|l| l["reason"] == reason && l["response_flag"] == "DPE")),
            "no access log line names {reason}"
        );
    }
    assert!(
        lab.gw.wait_stderr("max_concurrent_streams", WAIT),
        "{}",
        lab.gw.stderr_text()
    );
}

/// Header floods, each against strait and against Envoy: a 20 KiB header list gets 431
/// from strait on its own stream (its limit is 16 KiB; Envoy's 60 KiB admits it), the
/// connection serving on; a 100 KiB one and endless CONTINUATION frames get the
/// connection closed by both (strait with GOAWAY ENHANCE_YOUR_CALM naming the cause).
/// Counted, logged, and other connections served throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_floods_are_refused_counted_and_other_connections_served() {
    use hbone::ENHANCE_YOUR_CALM;
    let mut lab = FloodLab::start().await;

    let raw = flood(
        lab.strait,
        &lab.sleep,
        &lab.certs.gateway,
        Flood::OversizedHeaders(20 << 10),
        &format!("{REVIEWS}:9080"),
        &lab.hanging,
    )
    .await;
    assert!(
        raw.wait(WAIT, |s| s
            .iter()
            .any(|e| matches!(e, hbone::Seen::Headers { .. })))
            .await
    );
    assert_eq!(raw.status_of(1), Some(431), "{:?}", raw.seen());
    // The refusal is the stream's alone: the connection opens the next tunnel.
    raw.send(hbone::connect_frame(3, &format!("{REVIEWS}:9080")));
    assert!(
        raw.wait(WAIT, |_| raw.status_of(3).is_some()).await,
        "{:?}",
        raw.seen()
    );
    assert_eq!(raw.status_of(3), Some(200));
    lab.refusals_reach("header_list_too_large", 1.0);
    if let Some((_, envoy)) = &lab.envoy {
        let raw = flood(
            *envoy,
            &lab.sleep,
            &lab.certs.gateway,
            Flood::OversizedHeaders(20 << 10),
            &format!("{REVIEWS}:9080"),
            &lab.hanging,
        )
        .await;
        assert!(raw.wait(WAIT, |_| raw.status_of(1).is_some()).await);
        assert_eq!(raw.status_of(1), Some(200), "envoy: {:?}", raw.seen());
    }
    lab.others_still_served().await;

    let seen = lab
        .flood(Flood::OversizedHeaders(100 << 10), |_| false)
        .await;
    for (who, o) in &seen {
        assert!(o.closed && o.ok == 0 && o.goaway.is_some(), "{who}: {o:?}");
    }
    assert_eq!(
        seen[0].1.goaway,
        Some((ENHANCE_YOUR_CALM, "header_list_way_too_large".into()))
    );
    lab.refusals_reach("header_list_way_too_large", 1.0);
    lab.others_still_served().await;

    let seen = lab.flood(Flood::EndlessContinuation, |_| false).await;
    for (who, o) in &seen {
        assert!(o.closed && o.ok == 0, "{who}: {o:?}");
    }
    assert_eq!(
        seen[0].1.goaway,
        Some((ENHANCE_YOUR_CALM, "too_many_continuations".into()))
    );
    lab.refusals_reach("too_many_continuations", 1.0);
    lab.others_still_served().await;

    for reason in ["header_list_too_large", "too_many_continuations"] {
        assert!(
            lab.gw.wait_stderr(reason, WAIT),
            "no log line names {reason}:\n{}",
            lab.gw.stderr_text()
        );
    }
}

/// istiod's `connect_terminate` (as `listener_waypoint.go` builds it) on `addr`: mutual
/// TLS with the gateway's SDS secrets, an HTTP connection manager terminating `CONNECT`
/// into `main_internal`, with `http2` as its `http2_protocol_options`.
fn connect_terminate(
    addr: SocketAddr,
    http2: envoy_types::pb::envoy::config::core::v3::Http2ProtocolOptions,
) -> envoy_types::pb::envoy::config::listener::v3::Listener {
    use envoy_types::pb::envoy::config::listener::v3::{Filter, filter};
    use envoy_types::pb::envoy::config::route::v3 as rds;
    use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3 as hcm;
    let mut l = xds::mutual_listener(
        "connect_terminate",
        addr,
        &[],
        &[],
        &[("main_internal", 1)],
        &[],
    );
    let manager = hcm::HttpConnectionManager {
        stat_prefix: "connect_terminate".into(),
        upgrade_configs: vec![hcm::http_connection_manager::UpgradeConfig {
            upgrade_type: "CONNECT".into(),
            ..Default::default()
        }],
        http2_protocol_options: Some(http2),
        route_specifier: Some(hcm::http_connection_manager::RouteSpecifier::RouteConfig(
            rds::RouteConfiguration {
                name: "local_route".into(),
                virtual_hosts: vec![rds::VirtualHost {
                    name: "connect".into(),
                    domains: vec!["*".into()],
                    routes: vec![rds::Route {
                        r#match: Some(rds::RouteMatch {
                            path_specifier: Some(rds::route_match::PathSpecifier::ConnectMatcher(
                                rds::route_match::ConnectMatcher {},
                            )),
                            ..Default::default()
                        }),
                        action: Some(rds::route::Action::Route(rds::RouteAction {
                            cluster_specifier: Some(rds::route_action::ClusterSpecifier::Cluster(
                                "main_internal".into(),
                            )),
                            ..Default::default()
                        })),
                        ..Default::default()
                    }],
                    ..Default::default()
                }],
                ..Default::default()
            },
        )),
        http_filters: vec![hcm::HttpFilter {
            name: "envoy.filters.http.router".into(),
            ..Default::default()
        }],
        ..Default::default()
    };
    let chain = &mut l.filter_chains[0];
    chain.filter_chain_match = None;
    chain.filters = vec![Filter {
        name: "envoy.filters.network.http_connection_manager".into(),
        config_type: Some(filter::ConfigType::TypedConfig(xds::to_any(&manager))),
    }];
    l
}

/// `http2_protocol_options` as istiod writes them, with these values.
fn http2_options(
    streams: u32,
    stream_window: u32,
    connection_window: u32,
    keepalive: (Duration, Duration),
) -> envoy_types::pb::envoy::config::core::v3::Http2ProtocolOptions {
    use envoy_types::pb::envoy::config::core::v3 as core;
    use envoy_types::pb::google::protobuf::{Duration as PbDuration, UInt32Value};
    let pb = |d: Duration| PbDuration {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    };
    core::Http2ProtocolOptions {
        allow_connect: true,
        max_concurrent_streams: Some(UInt32Value { value: streams }),
        initial_stream_window_size: Some(UInt32Value {
            value: stream_window,
        }),
        initial_connection_window_size: Some(UInt32Value {
            value: connection_window,
        }),
        connection_keepalive: Some(core::KeepaliveSettings {
            interval: Some(pb(keepalive.0)),
            timeout: Some(pb(keepalive.1)),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The SETTINGS a raw client saw first from the server, as a map.
fn server_settings(raw: &hbone::RawH2) -> Option<std::collections::BTreeMap<u16, u32>> {
    raw.seen().into_iter().find_map(|s| match s {
        hbone::Seen::Settings(p) => Some(p.into_iter().collect()),
        _ => None,
    })
}

const SETTINGS_INITIAL_WINDOW_SIZE: u16 = 0x4;
const SETTINGS_MAX_CONCURRENT_STREAMS: u16 = 0x3;

/// From istiod (the `waypoint` stream), the HTTP/2 terms of 15008 are those of
/// `connect_terminate`'s `http2_protocol_options`: a raw HTTP/2 client sees the
/// `SETTINGS_MAX_CONCURRENT_STREAMS` and `SETTINGS_INITIAL_WINDOW_SIZE` istiod sent, the
/// connection window raised to its size, a PING once the keep-alive interval has passed,
/// and its connection closed when it leaves the PINGs unanswered past the timeout (one
/// that answers stays). `config_dump` shows them on the HBONE server. A change applies to
/// new connections; a value Envoy's validation rejects is NACKed naming the field, and the
/// terms in force stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn istiods_http2_options_are_what_15008_serves() {
    let certs = Certs::new();
    let sleep = certs.issue(SLEEP_ID, "sleep");
    let istiod = xds::FakeIstiod::start(xds::IstiodOptions::plaintext()).await;
    let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let keepalive = (Duration::from_millis(400), Duration::from_millis(800));
    istiod.set_listener(&connect_terminate(
        addr,
        http2_options(7, 1 << 20, 3 << 20, keepalive),
    ));
    let ports = Ports::new();
    let gw = Strait::start(
        ports,
        &ports.bootstrap(&format!(
            "  network: net1\n  certificates: {{dir: {}}}\n  discovery:\n    address: {}\n    node: {{ip: 127.0.0.1, podName: istio-eastwestgateway-1, namespace: istio-system}}\n    waypoint: {{}}\n",
            certs.gateway.display(),
            istiod.url()
        )),
    );

    // config_dump: the HBONE server's terms, as istiod sent them.
    let http2_in_dump = || {
        let (_, body) = http_get(gw.admin, "/config_dump").expect("config_dump");
        let dump: serde_json::Value = serde_json::from_str(&body).expect("JSON");
        dump["listeners"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|l| l["servers"].as_array().cloned().unwrap_or_default())
            .find(|s| s["mode"] == "HBONE")
            .map(|s| s["http2"].clone())
    };
    let expected = serde_json::json!({
        "maxConcurrentStreams": 7,
        "initialStreamWindowSize": 1 << 20,
        "initialConnectionWindowSize": 3 << 20,
        "keepaliveInterval": "400ms",
        "keepaliveTimeout": "800ms",
    });
    assert!(
        gw.eventually(WAIT, || http2_in_dump() == Some(expected.clone())),
        "{:?}\n{}",
        http2_in_dump(),
        gw.stderr_text()
    );

    // A client that answers PINGs.
    let started = Instant::now();
    let raw = hbone::RawH2::start(outer_tls(addr, &sleep, &certs.gateway).await.unwrap());
    assert!(
        raw.wait(WAIT, |s| s
            .iter()
            .any(|e| matches!(e, hbone::Seen::Settings(_))))
            .await
    );
    let settings = server_settings(&raw).unwrap();
    assert_eq!(
        settings.get(&SETTINGS_MAX_CONCURRENT_STREAMS),
        Some(&7),
        "{settings:?}"
    );
    assert_eq!(
        settings.get(&SETTINGS_INITIAL_WINDOW_SIZE),
        Some(&(1 << 20)),
        "{settings:?}"
    );
    // The connection window starts at 65,535 (RFC 9113 §6.9.2); the server raises it.
    let raised = |s: &[hbone::Seen]| {
        s.iter()
            .filter_map(|e| match e {
                hbone::Seen::WindowUpdate {
                    stream: 0,
                    increment,
                } => Some(*increment as u64),
                _ => None,
            })
            .sum::<u64>()
    };
    assert!(
        raw.wait(WAIT, |s| raised(s) == (3 << 20) - 65_535).await,
        "{:?}",
        raw.seen()
    );
    // PINGs every interval, not before.
    let pings = |s: &[hbone::Seen]| -> Vec<Instant> {
        s.iter()
            .filter_map(|e| match e {
                hbone::Seen::Ping(at) => Some(*at),
                _ => None,
            })
            .collect()
    };
    assert!(
        raw.wait(WAIT, |s| pings(s).len() >= 3).await,
        "{:?}",
        raw.seen()
    );
    let at = pings(&raw.seen());
    assert!(
        at[0] - started >= keepalive.0,
        "first PING after {:?}",
        at[0] - started
    );
    for w in at.windows(2) {
        assert!(w[1] - w[0] >= keepalive.0, "PINGs {:?} apart", w[1] - w[0]);
    }
    assert!(
        !raw.seen().contains(&hbone::Seen::Closed),
        "answered PINGs keep the connection: {:?}",
        raw.seen()
    );

    // A client that leaves them unanswered is closed after the timeout.
    let deaf_started = Instant::now();
    let deaf = hbone::RawH2::start_deaf(outer_tls(addr, &sleep, &certs.gateway).await.unwrap());
    assert!(
        deaf.wait(WAIT, |s| s.contains(&hbone::Seen::Closed)).await,
        "{:?}",
        deaf.seen()
    );
    let first_ping = pings(&deaf.seen())[0];
    assert!(
        deaf_started.elapsed() >= keepalive.0 + keepalive.1
            && first_ping.elapsed() < keepalive.1 + Duration::from_secs(2),
        "closed {:?} after its start, {:?} after the PING",
        deaf_started.elapsed(),
        first_ping.elapsed()
    );
    assert!(
        !raw.seen().contains(&hbone::Seen::Closed),
        "the answering client's connection stays: {:?}",
        raw.seen()
    );

    // A change applies to the next connection.
    istiod.set_listener(&connect_terminate(
        addr,
        http2_options(
            9,
            1 << 20,
            3 << 20,
            (Duration::from_secs(10), Duration::from_secs(20)),
        ),
    ));
    istiod.push();
    assert!(
        gw.eventually(WAIT, || http2_in_dump()
            .is_some_and(|h| h["maxConcurrentStreams"] == 9)),
        "{:?}",
        http2_in_dump()
    );
    let next = hbone::RawH2::start(outer_tls(addr, &sleep, &certs.gateway).await.unwrap());
    assert!(
        next.wait(WAIT, |s| s
            .iter()
            .any(|e| matches!(e, hbone::Seen::Settings(_))))
            .await
    );
    assert_eq!(
        server_settings(&next)
            .unwrap()
            .get(&SETTINGS_MAX_CONCURRENT_STREAMS),
        Some(&9)
    );

    // Values Envoy's validation rejects: NACKed, naming the field; 9 stays in force.
    for (options, field) in [
        (
            http2_options(0, 1 << 20, 3 << 20, keepalive),
            "http2_protocol_options.max_concurrent_streams",
        ),
        (
            http2_options(9, 1000, 3 << 20, keepalive),
            "http2_protocol_options.initial_stream_window_size",
        ),
        (
            http2_options(9, 1 << 20, 3 << 20, (keepalive.0, Duration::ZERO)),
            "http2_protocol_options.connection_keepalive.timeout",
        ),
    ] {
        istiod.set_listener(&connect_terminate(addr, options));
        istiod.push();
        let field = field.to_string();
        assert!(
            istiod
                .wait_for(WAIT, |r| r.of_type(xds::LDS_TYPE).any(
                    |q| q.is_nack() && q.error.as_deref().is_some_and(|e| e.contains(&field))
                ))
                .await,
            "no NACK naming {field}: {:?}",
            istiod.requests(xds::LDS_TYPE)
        );
        let again = hbone::RawH2::start(outer_tls(addr, &sleep, &certs.gateway).await.unwrap());
        assert!(
            again
                .wait(WAIT, |s| s
                    .iter()
                    .any(|e| matches!(e, hbone::Seen::Settings(_))))
                .await
        );
        assert_eq!(
            server_settings(&again)
                .unwrap()
                .get(&SETTINGS_MAX_CONCURRENT_STREAMS),
            Some(&9),
            "{field}"
        );
    }
}
