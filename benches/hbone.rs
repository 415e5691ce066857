//! Ambient's double HBONE on 15008: tunnels per second and bytes per second, with 1 and
//! 100 streams per outer connection, memory per idle tunnel, CPU per tunnel and per GB,
//! strait against Envoy configured as Istio's ambient east-west gateway, in one run,
//! paired per round.
//!
//! Run with `cargo bench --bench hbone` (see `benches/README.md`). Certificates come from
//! `strait ca init` / `strait cert issue` (ECDSA P-256, Istio's file layout). The gateway
//! under test is pinned to CPU 0 with one worker; this process (the HBONE clients and the
//! destinations) runs on CPU 1. Loopback only; every load is bounded in time.
//!
//! Targets:
//! - **strait**: `strait run` with the Gateway API `Gateway` Istio's ambient east-west gateway
//!   is made from (`istio-east-west`, an `HBONE` listener), two ServiceEntry services whose
//!   endpoints carry `networking.istio.io/tunnel: http`;
//! - **envoy**: Envoy 1.40 (`--concurrency 1`) with the static configuration of
//!   `tests/common/hbone.rs` (`reference_gateway_bootstrap`: `connect_terminate` with TLS
//!   1.3, ALPN `h2`, a client certificate required, HTTP/2 `CONNECT` routed by
//!   `:authority` to `inbound-vip|9080|tcp|<host>` clusters that terminate the `CONNECT`
//!   into raw TCP, AMBIENT.md §6).
//!
//! The load is a source ztunnel's outer level: rustls (TLS 1.3, ALPN `h2`, the client's
//! SVID, no resumption; unlike a ztunnel, it does not verify the gateway's certificate on
//! each handshake, the same for both gateways, so that the client's core does not bound the
//! handshake rate: each gateway's chain is verified once, when it starts; both gateways
//! still verify the client's chain and signature in full) and the `h2` crate with ztunnel's windows (4 MiB per stream, 16 MiB
//! per connection), one `CONNECT` per tunnel with `:authority = <host>:9080`. The
//! destinations are plaintext TCP servers on `127.0.0.x:15008` (the endpoints' HBONE port):
//! an echo and a sink that counts what it receives.
//!
//! Scenarios:
//! - `t1`: tunnels per second, one stream per outer connection (each tunnel a new mTLS
//!   connection, `CONNECT`, one byte echoed, half-close), 32 at a time;
//! - `t100`: tunnels per second, 100 streams at a time on one outer connection (each a
//!   `CONNECT`, one byte echoed, half-close, then the next);
//! - `b1`, `b100`: Gbit/s uploaded to the sink over one outer connection with 1 or 100
//!   streams, counted by the sink;
//! - `idle`: KiB of gateway RSS per established idle tunnel (`BENCH_TUNNELS`, 100 per outer
//!   connection, one round trip each), each gateway on a fresh process.
//!
//! CPU per unit (µs per tunnel, ms per GB) is the gateway's own, from
//! `/proc/PID/task/*/schedstat`: the figure to trust on a shared machine.
//!
//! Environment: `BENCH_SECS` (1.5), `BENCH_ROUNDS` (3), `BENCH_TUNNELS` (5000),
//! `BENCH_PROXIES` (`strait,envoy`), `BENCH_SCENARIOS` (ids or prefixes),
//! `BENCH_STRAIT_ALT` (`label=/path/to/strait,...`: more strait builds as extra columns),
//! `BENCH_CLIENT_VERIFY=1` (the client verifies the gateway on every handshake),
//! `STRAIT_BIN`, `STRAIT_TEST_ENVOY`.

#[path = "../tests/common/mod.rs"]
mod common;
mod support;

use std::collections::BTreeMap;
use std::io::{self, Write as _};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{TempDir, free_port, mesh_ca, mesh_cert, mesh_client_config};
use rustls::NamedGroup;
use support::{CpuProbe, loadavg, median, on_path, pin_self_to};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const TRUST_DOMAIN: &str = "cluster.local";
const GATEWAY_ID: &str = "spiffe://cluster.local/ns/istio-system/sa/istio-eastwestgateway";
const CLIENT_ID: &str = "spiffe://cluster.local/ns/bench/sa/client";
const ECHO: &str = "echo.bench.svc.cluster.local";
const SINK: &str = "sink.bench.svc.cluster.local";
const HBONE_PORT: u16 = 15008;
/// Outer connections opened at a time for `t1`.
const CONNECTORS: usize = 32;
/// Bytes per DATA write of the uploads.
const CHUNK: usize = 256 * 1024;

/// Bytes the sink has received, all connections together.
static SINK_RECEIVED: AtomicU64 = AtomicU64::new(0);

/// A free loopback address whose port 15008 this process can listen on.
fn endpoint_ip() -> Ipv4Addr {
    let pid = std::process::id();
    for n in 1..250u32 {
        let ip = Ipv4Addr::new(127, 100 + (pid % 50) as u8, (n % 250) as u8, 7);
        if std::net::TcpListener::bind((ip, HBONE_PORT)).is_ok() {
            return ip;
        }
    }
    panic!("no free 127.x.y.7:15008");
}

/// The destinations: an echo (writes back what it reads, closes after the client's close)
/// and a sink (counts and drops).
async fn start_destination(sink: bool) -> Ipv4Addr {
    let ip = endpoint_ip();
    let listener = TcpListener::bind((ip, HBONE_PORT)).await.expect("bind");
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                continue;
            };
            let _ = s.set_nodelay(true);
            tokio::spawn(async move {
                let mut buf = vec![0u8; if sink { 256 << 10 } else { 16 << 10 }];
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) if sink => {
                            SINK_RECEIVED.fetch_add(n as u64, Ordering::Relaxed);
                        }
                        Ok(n) => {
                            if s.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    }
                }
                let _ = s.shutdown().await;
            });
        }
    });
    ip
}

// ---------------------------------------------------------------------------------------
// The HBONE client

#[derive(Clone)]
struct Target {
    name: String,
    addr: SocketAddr,
    pid: Option<u32>,
}

/// An outer HBONE connection: TLS 1.3 + h2 with ztunnel's windows.
async fn outer(
    t: &Target,
    tls: &Arc<rustls::ClientConfig>,
) -> io::Result<h2::client::SendRequest<Bytes>> {
    let tcp = TcpStream::connect(t.addr).await?;
    tcp.set_nodelay(true)?;
    // Closes with a reset: no TIME_WAIT after thousands of connections on loopback.
    socket2::SockRef::from(&tcp).set_linger(Some(Duration::ZERO))?;
    let name = rustls::pki_types::ServerName::try_from("gateway").map_err(io::Error::other)?;
    let tls = tokio_rustls::TlsConnector::from(tls.clone())
        .connect(name, tcp)
        .await?;
    let (send, conn) = h2::client::Builder::new()
        .initial_window_size(4 << 20)
        .initial_connection_window_size(16 << 20)
        .max_frame_size(1 << 20)
        .handshake::<_, Bytes>(tls)
        .await
        .map_err(io::Error::other)?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(send)
}

/// A `CONNECT` to `host:9080` on `send`, answered 200: the stream's two halves.
async fn connect(
    send: &h2::client::SendRequest<Bytes>,
    host: &str,
) -> io::Result<(h2::SendStream<Bytes>, h2::RecvStream)> {
    let req = http::Request::builder()
        .method(http::Method::CONNECT)
        .uri(format!("{host}:9080"))
        .body(())
        .map_err(io::Error::other)?;
    let mut send = send.clone().ready().await.map_err(io::Error::other)?;
    let (resp, stream) = send.send_request(req, false).map_err(io::Error::other)?;
    let resp = resp.await.map_err(io::Error::other)?;
    if resp.status() != 200 {
        return Err(io::Error::other(format!(
            "CONNECT answered {}",
            resp.status()
        )));
    }
    Ok((stream, resp.into_body()))
}

/// Sends `data` on `stream` as flow control allows (`end` ends the stream with it).
async fn send_all(
    stream: &mut h2::SendStream<Bytes>,
    mut data: Bytes,
    end: bool,
) -> io::Result<()> {
    while !data.is_empty() {
        stream.reserve_capacity(data.len());
        let n = match std::future::poll_fn(|cx| stream.poll_capacity(cx)).await {
            Some(Ok(n)) => n.min(data.len()),
            Some(Err(e)) => return Err(io::Error::other(e)),
            None => return Err(io::ErrorKind::BrokenPipe.into()),
        };
        if n == 0 {
            continue;
        }
        let piece = data.split_to(n);
        stream
            .send_data(piece, end && data.is_empty())
            .map_err(io::Error::other)?;
    }
    Ok(())
}

/// Reads the stream to its end; the bytes received.
async fn read_to_end(recv: &mut h2::RecvStream) -> io::Result<usize> {
    let mut n = 0;
    while let Some(d) = recv.data().await {
        let d = d.map_err(io::Error::other)?;
        n += d.len();
        let _ = recv.flow_control().release_capacity(d.len());
    }
    Ok(n)
}

/// One tunnel to the echo on `send`: `CONNECT`, one byte and the half-close, the byte back
/// and the end.
async fn one_tunnel(send: &h2::client::SendRequest<Bytes>) -> io::Result<()> {
    let (mut s, mut r) = connect(send, ECHO).await?;
    send_all(&mut s, Bytes::from_static(b"x"), true).await?;
    match read_to_end(&mut r).await? {
        1 => Ok(()),
        n => Err(io::Error::other(format!("{n} bytes echoed, not 1"))),
    }
}

/// Runs `work` until `secs` pass (at most 15 s more); counts its successes and reports its
/// first failure.
async fn until<F, Fut>(name: &str, secs: f64, workers: usize, work: F) -> f64
where
    F: Fn() -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = io::Result<()>> + Send,
{
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(secs);
    let mut tasks = Vec::new();
    for _ in 0..workers {
        let work = work.clone();
        tasks.push(tokio::spawn(async move {
            let (mut n, mut failed) = (0u64, None);
            while Instant::now() < end {
                match tokio::time::timeout(Duration::from_secs(15), work()).await {
                    Ok(Ok(())) => n += 1,
                    Ok(Err(e)) => {
                        failed.get_or_insert(e.to_string());
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                    Err(_) => {
                        failed.get_or_insert("stalled 15 s".to_string());
                    }
                }
            }
            (n, failed)
        }));
    }
    let mut total = 0;
    for task in tasks {
        if let Ok((n, failed)) = task.await {
            total += n;
            if let Some(e) = failed {
                eprintln!("  {name}: a tunnel failed: {e}");
            }
        }
    }
    total as f64 / start.elapsed().as_secs_f64()
}

/// Tunnels per second, each on an outer connection of its own.
async fn tunnels_1(t: &Target, tls: &Arc<rustls::ClientConfig>, secs: f64) -> f64 {
    let (t2, tls) = (t.clone(), tls.clone());
    until(&t.name, secs, CONNECTORS, move || {
        let (t, tls) = (t2.clone(), tls.clone());
        async move {
            let send = outer(&t, &tls).await?;
            one_tunnel(&send).await
        }
    })
    .await
}

/// Tunnels per second, 100 at a time on one outer connection.
async fn tunnels_100(t: &Target, tls: &Arc<rustls::ClientConfig>, secs: f64) -> f64 {
    let send = match outer(t, tls).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("  {}: no outer connection: {e}", t.name);
            return 0.0;
        }
    };
    until(&t.name, secs, 100, move || {
        let send = send.clone();
        async move { one_tunnel(&send).await }
    })
    .await
}

/// Gbit/s uploaded to the sink over one outer connection carrying `streams` streams.
async fn bulk(t: &Target, tls: &Arc<rustls::ClientConfig>, streams: usize, secs: f64) -> f64 {
    let send = match outer(t, tls).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("  {}: no outer connection: {e}", t.name);
            return 0.0;
        }
    };
    let chunk = Bytes::from(vec![0x17u8; CHUNK]);
    let before = SINK_RECEIVED.load(Ordering::Relaxed);
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(secs);
    let mut tasks = Vec::new();
    for _ in 0..streams {
        let (send, chunk) = (send.clone(), chunk.clone());
        tasks.push(tokio::spawn(tokio::time::timeout(
            Duration::from_secs_f64(secs + 15.0),
            async move {
                let (mut s, mut r) = connect(&send, SINK).await?;
                while Instant::now() < end {
                    send_all(&mut s, chunk.clone(), false).await?;
                }
                s.send_data(Bytes::new(), true).map_err(io::Error::other)?;
                read_to_end(&mut r).await?;
                io::Result::Ok(())
            },
        )));
    }
    let mut failed = None;
    for task in tasks {
        match task.await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => {
                failed.get_or_insert(e.to_string());
            }
            Ok(Err(_)) => {
                failed.get_or_insert("stalled".to_string());
            }
            Err(e) => {
                failed.get_or_insert(e.to_string());
            }
        }
    }
    if let Some(e) = failed {
        eprintln!("  {}: an upload failed: {e}", t.name);
    }
    let got = SINK_RECEIVED.load(Ordering::Relaxed) - before;
    got as f64 * 8.0 / start.elapsed().as_secs_f64() / 1e9
}

/// KiB of gateway RSS per established idle tunnel: `tunnels` tunnels to the echo, 100 per
/// outer connection, one round trip each, held open.
async fn rss_per_idle_tunnel(
    t: &Target,
    tls: &Arc<rustls::ClientConfig>,
    tunnels: usize,
) -> Option<f64> {
    let pid = t.pid?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = support::proc_status_kib(pid, "VmRSS:")?;
    let mut held = Vec::new();
    let mut conns = Vec::new();
    let mut opened = 0;
    for c in 0..tunnels.div_ceil(100) {
        let Ok(send) = outer(t, tls).await else {
            continue;
        };
        let n = (tunnels - c * 100).min(100);
        let mut batch = Vec::new();
        for _ in 0..n {
            let send = send.clone();
            batch.push(tokio::spawn(async move {
                let open = async {
                    let (mut s, mut r) = connect(&send, ECHO).await?;
                    send_all(&mut s, Bytes::from_static(b"x"), false).await?;
                    let d = r.data().await.ok_or_else(|| io::Error::other("no echo"))?;
                    let d = d.map_err(io::Error::other)?;
                    let _ = r.flow_control().release_capacity(d.len());
                    io::Result::Ok((s, r))
                };
                tokio::time::timeout(Duration::from_secs(10), open)
                    .await
                    .map_err(|_| io::Error::other("no round trip within 10 s"))?
            }));
        }
        for task in batch {
            if let Ok(Ok(s)) = task.await {
                held.push(s);
                opened += 1;
            }
        }
        conns.push(send);
    }
    let after = support::settled_rss(pid, Duration::from_secs(5)).await?;
    drop(held);
    drop(conns);
    tokio::time::sleep(Duration::from_millis(300)).await;
    if opened < tunnels * 9 / 10 {
        eprintln!("  {}: only {opened} of {tunnels} tunnels opened", t.name);
    }
    Some((after - before) / opened.max(1) as f64)
}

// ---------------------------------------------------------------------------------------
// The gateways

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
}

fn service_entry(host: &str, ip: Ipv4Addr) -> String {
    format!(
        "---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: {name}, namespace: bench}}
spec:
  hosts: [{host}]
  ports: [{{number: 9080, name: tcp, targetPort: 9080}}]
  resolution: STATIC
  endpoints:
  - {{address: {ip}, network: net1, labels: {{app: {name}, networking.istio.io/tunnel: http}}}}
",
        name = host.split('.').next().unwrap_or("svc")
    )
}

/// strait as the ambient east-west gateway on `port`, one worker.
fn strait_config(port: u16, certs: &Path, echo: Ipv4Addr, sink: Ipv4Addr) -> String {
    format!(
        "apiVersion: strait.dev/v1alpha1
kind: Bootstrap
metadata: {{name: bench}}
spec:
  status: 127.0.0.1:{}
  metrics: 127.0.0.1:{}
  admin: 127.0.0.1:{}
  workers: 1
  accessLog: \"off\"
  trustDomain: {TRUST_DOMAIN}
  network: net1
  certificates: {{dir: {}}}
---
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
{}{}",
        free_port(),
        free_port(),
        free_port(),
        certs.display(),
        service_entry(ECHO, echo),
        service_entry(SINK, sink),
    )
}

/// Starts `kind` pinned to CPU 0 and waits until a tunnel passes.
async fn start_proxy(
    name: &str,
    kind: &ProxyKind,
    certs: &Path,
    echo: Ipv4Addr,
    sink: Ipv4Addr,
    tls: &Arc<rustls::ClientConfig>,
) -> Result<Proxy, String> {
    let dir = TempDir::new(&format!("hbone-bench-{name}"));
    let port = free_port();
    let mut cmd = Command::new("taskset");
    cmd.arg("-c").arg("0");
    match kind {
        ProxyKind::Strait(bin) => {
            let cfg = dir.write("strait.yaml", &strait_config(port, certs, echo, sink));
            cmd.arg(bin)
                .arg("run")
                .arg("-c")
                .arg(&cfg)
                .env("RUST_LOG", "warn");
        }
        ProxyKind::Envoy(bin) => {
            let listen = SocketAddr::from(([127, 0, 0, 1], port));
            let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
            let json = common::hbone::reference_gateway_bootstrap(
                listen,
                admin,
                certs,
                TRUST_DOMAIN,
                &[
                    (
                        &format!("{ECHO}:9080"),
                        &[SocketAddr::from((echo, HBONE_PORT))],
                    ),
                    (
                        &format!("{SINK}:9080"),
                        &[SocketAddr::from((sink, HBONE_PORT))],
                    ),
                ],
            );
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
    }
    let log = std::fs::File::create(dir.path().join("stderr")).map_err(|e| e.to_string())?;
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .map_err(|e| format!("cannot start {name}: {e}"))?;
    let mut proxy = Proxy {
        target: Target {
            name: name.to_string(),
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            pid: Some(child.id()),
        },
        child,
        dir,
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut last;
    loop {
        let probe = async {
            let send = outer(&proxy.target, tls).await?;
            one_tunnel(&send).await
        };
        match tokio::time::timeout(Duration::from_secs(5), probe).await {
            Ok(Ok(())) => return Ok(proxy),
            Ok(Err(e)) => last = e.to_string(),
            Err(_) => last = "timed out".into(),
        }
        if let Ok(Some(status)) = proxy.child.try_wait() {
            let err = std::fs::read_to_string(proxy.dir.path().join("stderr")).unwrap_or_default();
            return Err(format!("{name} exited ({status}): {}", err.trim()));
        }
        if Instant::now() > deadline {
            let err = std::fs::read_to_string(proxy.dir.path().join("stderr")).unwrap_or_default();
            return Err(format!(
                "{name} did not pass a tunnel within 30s ({last}): {}",
                err.trim()
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---------------------------------------------------------------------------------------
// The table

struct Row {
    id: &'static str,
    label: &'static str,
    unit: &'static str,
}

const ROWS: [Row; 9] = [
    Row {
        id: "t1",
        label: "tunnels/s, 1 stream per connection",
        unit: "/s",
    },
    Row {
        id: "cpu_t1",
        label: "  CPU per tunnel",
        unit: "µs",
    },
    Row {
        id: "t100",
        label: "tunnels/s, 100 streams per connection",
        unit: "/s",
    },
    Row {
        id: "cpu_t100",
        label: "  CPU per tunnel",
        unit: "µs",
    },
    Row {
        id: "b1",
        label: "upload, 1 stream",
        unit: "Gbit/s",
    },
    Row {
        id: "cpu_b1",
        label: "  CPU per GB",
        unit: "ms",
    },
    Row {
        id: "b100",
        label: "upload, 100 streams on 1 connection",
        unit: "Gbit/s",
    },
    Row {
        id: "cpu_b100",
        label: "  CPU per GB",
        unit: "ms",
    },
    Row {
        id: "idle",
        label: "RSS per idle tunnel",
        unit: "KiB",
    },
];

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
    fn get(&self, target: &str, id: &str) -> Option<f64> {
        let v: Vec<f64> = self
            .0
            .get(&(target.into(), id.into()))?
            .iter()
            .map(|&(_, x)| x)
            .collect();
        median(&v)
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

fn main() {
    let secs: f64 = std::env::var("BENCH_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1.5);
    let rounds = support::env_usize("BENCH_ROUNDS", 3).max(1);
    let tunnels = support::env_usize("BENCH_TUNNELS", 5000);
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    raise_nofile();
    if !on_path("taskset") {
        eprintln!("taskset (util-linux) is required to pin the gateways");
        std::process::exit(2);
    }
    pin_self_to(1);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(run(secs, rounds, tunnels));
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

fn selected(only: &Option<String>, id: &str) -> bool {
    only.as_deref().is_none_or(|o| {
        o.split(',')
            .map(str::trim)
            .any(|x| !x.is_empty() && id.starts_with(x))
    })
}

async fn run(secs: f64, rounds: usize, tunnels: usize) {
    let wanted = std::env::var("BENCH_PROXIES").unwrap_or_else(|_| "strait,envoy".into());
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
            None => println!("note: envoy not found (STRAIT_TEST_ENVOY); running without it"),
        }
    }

    let dir = TempDir::new("hbone-bench-certs");
    let ca = mesh_ca(dir.path(), TRUST_DOMAIN);
    let gw_certs = mesh_cert(&ca, GATEWAY_ID, &dir.path().join("gateway"));
    let client_certs = mesh_cert(&ca, CLIENT_ID, &dir.path().join("client"));
    // The client that checks each gateway's chain once, when it starts, and the load
    // generator's: the gateway's certificate not verified ([`common::Unverified`]; with
    // `BENCH_CLIENT_VERIFY=1` verified on every handshake, as a source ztunnel does).
    let groups = [NamedGroup::X25519, NamedGroup::secp256r1];
    let source = |c: rustls::ClientConfig| {
        let mut c = c;
        c.enable_sni = false;
        c.resumption = rustls::client::Resumption::disabled();
        Arc::new(c)
    };
    let verified = source(
        (*mesh_client_config(&client_certs, &groups, &[&rustls::version::TLS13], &["h2"])
            .expect("client TLS"))
        .clone(),
    );
    let tls = if std::env::var("BENCH_CLIENT_VERIFY").is_ok_and(|v| v == "1") {
        verified.clone()
    } else {
        let id = strait::tls::load_identity(&client_certs).expect("client SVID");
        let provider = common::provider_with_groups(&groups);
        let mut c = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("versions")
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(common::Unverified(provider)))
            .with_client_auth_cert(id.chain.clone(), id.key.clone_key())
            .expect("client SVID");
        c.alpn_protocols = vec![b"h2".to_vec()];
        source(c)
    };
    let echo = start_destination(false).await;
    let sink = start_destination(true).await;

    println!(
        "strait HBONE bench: {secs}s per scenario, {rounds} round(s), {tunnels} idle tunnels for RSS; gateway on CPU 0, load + destinations on CPU 1; loadavg at start {}",
        loadavg()
    );
    println!("strait: {}", strait.display());

    let mut cells = Cells::default();
    let mut names = Vec::new();
    for (name, kind) in &proxies {
        if !want("idle") {
            break;
        }
        match start_proxy(name, kind, &gw_certs, echo, sink, &verified).await {
            Ok(p) => {
                if let Some(v) = rss_per_idle_tunnel(&p.target, &tls, tunnels).await {
                    cells.put(name, "idle", 0, v);
                }
            }
            Err(e) => println!("note: {e}"),
        }
    }
    let mut alive = Vec::new();
    for (name, kind) in &proxies {
        match start_proxy(name, kind, &gw_certs, echo, sink, &verified).await {
            Ok(p) => {
                names.push(name.clone());
                alive.push(p);
            }
            Err(e) => println!("note: {e}; running without it"),
        }
    }
    let targets: Vec<Target> = alive.iter().map(|p| p.target.clone()).collect();
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
        for id in ["t1", "t100", "b1", "b100"]
            .into_iter()
            .filter(|id| want(id))
        {
            eprintln!("  {id}");
            for t in &order {
                let probe = CpuProbe::start(t.pid);
                let v = match id {
                    "t1" => tunnels_1(t, &tls, secs).await,
                    "t100" => tunnels_100(t, &tls, secs).await,
                    "b1" => bulk(t, &tls, 1, secs).await,
                    _ => bulk(t, &tls, 100, secs).await,
                };
                cells.put(&t.name, id, round, v);
                let per = if id.starts_with('b') { v / 8.0 } else { v };
                if let Some(us) = probe.per_unit(per) {
                    let scaled = if id.starts_with('b') { us / 1000.0 } else { us };
                    cells.put(&t.name, &format!("cpu_{id}"), round, scaled);
                }
                // Let the closed connections settle before the next target.
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    let load_end = loadavg();
    drop(alive);
    print_table(&names, &cells);
    print_goals(&cells);
    println!("\nloadavg at the end of the load scenarios: {load_end}");
    let _ = io::stdout().flush();
}

fn print_table(names: &[String], cells: &Cells) {
    let has_envoy = names.iter().any(|n| n == "envoy");
    print!("\n{:<42}{:<8}", "scenario", "unit");
    for n in names {
        print!("{:>10}", n.chars().take(10).collect::<String>());
    }
    if has_envoy {
        print!("{:>10}", "str/env");
    }
    println!();
    for row in &ROWS {
        if !names.iter().any(|n| cells.get(n, row.id).is_some()) {
            continue;
        }
        print!("{:<42}{:<8}", row.label, row.unit);
        for n in names {
            match cells.get(n, row.id) {
                Some(v) if v >= 1000.0 => print!("{v:>10.0}"),
                Some(v) => print!("{v:>10.2}"),
                None => print!("{:>10}", "-"),
            }
        }
        if has_envoy {
            let r = if row.id == "idle" {
                cells
                    .get("strait", "idle")
                    .zip(cells.get("envoy", "idle"))
                    .map(|(s, e)| s / e)
            } else {
                cells.ratio("strait", "envoy", row.id)
            };
            match r {
                Some(r) => print!("{r:>10.2}"),
                None => print!("{:>10}", "-"),
            }
        }
        println!();
    }
    println!("\nper-round ratios, strait ÷ envoy (each figure one round, in round order):");
    for row in ROWS.iter().filter(|r| r.id != "idle") {
        let r = cells.ratios("strait", "envoy", row.id);
        if !r.is_empty() {
            let r: Vec<String> = r.iter().map(|x| format!("{x:.2}")).collect();
            println!("  {:<10} {}", row.id, r.join(" "));
        }
    }
}

fn print_goals(cells: &Cells) {
    println!("\ngoals (issue 26; paired per-round ratios, median):");
    let check = |what: &str, v: Option<f64>, goal: f64, at_least: bool| match v {
        Some(v) => {
            let ok = if at_least { v >= goal } else { v <= goal };
            println!(
                "  {what:<48} {v:>6.2} (goal {} {goal}) {}",
                if at_least { "≥" } else { "<" },
                if ok { "met" } else { "NOT MET" }
            );
        }
        None => println!("  {what:<48}    n/a"),
    };
    check(
        "tunnels/s, 1 stream (× envoy)",
        cells.ratio("strait", "envoy", "t1"),
        1.3,
        true,
    );
    check(
        "tunnels/s, 100 streams (× envoy)",
        cells.ratio("strait", "envoy", "t100"),
        1.3,
        true,
    );
    check(
        "bytes/s, 1 stream (× envoy)",
        cells.ratio("strait", "envoy", "b1"),
        1.1,
        true,
    );
    check(
        "bytes/s, 100 streams (× envoy)",
        cells.ratio("strait", "envoy", "b100"),
        1.1,
        true,
    );
    let idle = cells
        .get("strait", "idle")
        .zip(cells.get("envoy", "idle"))
        .map(|(s, e)| s / e);
    check("RSS per idle tunnel (× envoy)", idle, 1.0, false);
}
