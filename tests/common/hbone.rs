//! Ambient double-HBONE test peers: the `hbone-peer` program of `interop/hbone` (found by
//! [`hbone_peer_bin`]) as a source ztunnel ([`HboneSource`]: Istio's own `pkg/hbone`
//! dialer for the outer level) and a destination ztunnel ([`HboneDest`]), and the static
//! configuration of a stock Envoy as Istio's ambient east-west gateway on 15008
//! ([`reference_gateway_bootstrap`]), the reference a 15008 listener is compared with.
//!
//! The peers' standard output is their interface: `READY`; per tunnel at the source
//! `TUNNEL-OK authority=A` or `TUNNEL-ERROR authority=A status=S err=E`; per stream at the
//! destination one JSON line `{"name","authority","peer","network"}`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub use super::istiod::hbone_peer_bin;
use super::{TempDir, pump_lines};

/// A running `hbone-peer`; SIGTERM, then SIGKILL, on drop.
pub struct HbonePeer {
    child: Option<Child>,
    stdout: Arc<Mutex<Vec<String>>>,
    log: PathBuf,
    _dir: TempDir,
}

impl Drop for HbonePeer {
    fn drop(&mut self) {
        self.stop();
    }
}

impl HbonePeer {
    /// Runs `hbone-peer ARGS` (inside network namespace `netns` when given, else in the
    /// calling thread's) and waits for `READY`. `None`, after a loud `SKIPPED`, when the
    /// program is not built (a panic under CI).
    pub async fn spawn(args: &[String], netns: Option<&str>) -> Option<HbonePeer> {
        let bin = hbone_peer_bin()?;
        let dir = TempDir::new("hbone-peer");
        let log = dir.path().join("stderr.log");
        let mut command = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(&bin);
                c
            }
            None => Command::new(&bin),
        };
        let mut child = command
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).expect("hbone-peer log file"))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", bin.display()));
        let stdout = Arc::new(Mutex::new(Vec::new()));
        pump_lines(child.stdout.take().unwrap(), stdout.clone());
        let mut peer = HbonePeer {
            child: Some(child),
            stdout,
            log,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !peer.lines().iter().any(|l| l == "READY") {
            if let Some(Ok(Some(status))) = peer.child.as_mut().map(|c| c.try_wait()) {
                panic!(
                    "hbone-peer {args:?} exited ({status}) before READY:\n{}",
                    peer.log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "hbone-peer {args:?}: no READY after 20 s:\n{}",
                peer.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Some(peer)
    }

    /// Its standard output so far, line by line.
    pub fn lines(&self) -> Vec<String> {
        self.stdout.lock().unwrap().clone()
    }

    /// Its standard error (Istio's log, the peer's own complaints).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until at least `n` lines satisfy `pred`; returns those seen by then.
    pub async fn wait_lines(
        &self,
        n: usize,
        within: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> Vec<String> {
        let deadline = Instant::now() + within;
        loop {
            let seen: Vec<String> = self.lines().into_iter().filter(|l| pred(l)).collect();
            if seen.len() >= n || Instant::now() >= deadline {
                return seen;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGTERM, then SIGKILL after 5 s; the exit code (`None` for a kill or when not running).
    pub fn stop(&mut self) -> Option<i32> {
        let mut child = self.child.take()?;
        // SAFETY: kill(2) on the PID of a child this value spawned and has not reaped.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return status.code();
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// `hbone-peer source`: a source ztunnel. Each `maps` entry is a local plaintext
/// listener whose every connection becomes one double-HBONE tunnel with that `:authority`.
#[derive(Debug, Clone)]
pub struct HboneSource {
    /// The gateway's HBONE address (its 15008).
    pub gateway: SocketAddr,
    /// The source workload's `cert-chain.pem`, `key.pem`, `root-cert.pem`.
    pub cert_dir: PathBuf,
    /// The gateway's SPIFFE ID, checked on the outer TLS when given.
    pub gateway_id: Option<String>,
    /// The destination's SPIFFE ID, checked on the inner TLS when given.
    pub dest_id: Option<String>,
    /// `x-forwarded-network` on the inner CONNECT.
    pub network: Option<String>,
    /// Both levels by Istio's `NewDoubleDialer` (`--double-dialer`): no half-close (a
    /// local FIN is not passed on) and no `x-forwarded-network`.
    pub double_dialer: bool,
    pub maps: Vec<(SocketAddr, String)>,
}

impl HboneSource {
    pub fn new(gateway: SocketAddr, cert_dir: &Path) -> HboneSource {
        HboneSource {
            gateway,
            cert_dir: cert_dir.to_path_buf(),
            gateway_id: None,
            dest_id: None,
            network: None,
            double_dialer: false,
            maps: Vec::new(),
        }
    }

    pub fn args(&self) -> Vec<String> {
        let mut args = vec![
            "source".to_string(),
            "--gateway".into(),
            self.gateway.to_string(),
            "--cert-dir".into(),
            self.cert_dir.display().to_string(),
        ];
        for (flag, value) in [
            ("--gateway-id", &self.gateway_id),
            ("--dest-id", &self.dest_id),
            ("--network", &self.network),
        ] {
            if let Some(v) = value {
                args.extend([flag.to_string(), v.clone()]);
            }
        }
        if self.double_dialer {
            args.push("--double-dialer".into());
        }
        for (listen, authority) in &self.maps {
            args.extend(["--map".to_string(), format!("{listen}={authority}")]);
        }
        args
    }

    pub async fn start(&self, netns: Option<&str>) -> Option<HbonePeer> {
        HbonePeer::spawn(&self.args(), netns).await
    }
}

/// `hbone-peer dest`: a destination ztunnel on `listen`, presenting `cert_dir`'s SVID,
/// answering every stream with `[NAME] ` and an echo.
pub async fn hbone_dest(
    listen: SocketAddr,
    cert_dir: &Path,
    name: &str,
    netns: Option<&str>,
) -> Option<HbonePeer> {
    let args = [
        "dest".to_string(),
        "--listen".into(),
        listen.to_string(),
        "--cert-dir".into(),
        cert_dir.display().to_string(),
        "--name".into(),
        name.into(),
    ];
    HbonePeer::spawn(&args, netns).await
}

/// One stream as a destination printed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DestStream {
    pub name: String,
    pub authority: String,
    /// The URI SAN of the client of the inner TLS.
    pub peer: String,
    /// `x-forwarded-network` of the inner CONNECT.
    pub network: String,
}

impl HbonePeer {
    /// A destination's streams once it has printed at least `n` (or `within` passed).
    pub async fn wait_streams(&self, n: usize, within: Duration) -> Vec<DestStream> {
        self.wait_lines(n, within, |l| l.starts_with('{')).await;
        self.streams()
    }

    /// A destination's streams so far.
    pub fn streams(&self) -> Vec<DestStream> {
        self.lines()
            .iter()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .map(|v| {
                let field = |k: &str| v[k].as_str().unwrap_or_default().to_string();
                DestStream {
                    name: field("name"),
                    authority: field("authority"),
                    peer: field("peer"),
                    network: field("network"),
                }
            })
            .collect()
    }
}

/// Through a source's local listener `via`: sends `payload`, half-closes, and reads
/// until the tunnel closes (at most `within`; a reset ends the read too). `None` when
/// the connection was refused or did not close in time.
pub async fn tunnel_round_trip(
    via: SocketAddr,
    payload: &[u8],
    within: Duration,
) -> Option<Vec<u8>> {
    let (mut read, mut write) = TcpStream::connect(via).await.ok()?.into_split();
    let payload = payload.to_vec();
    // Written concurrently: the echo comes back while the payload goes out.
    let writer = tokio::spawn(async move {
        let _ = write.write_all(&payload).await;
        let _ = write.shutdown().await;
    });
    let mut out = Vec::new();
    let done = tokio::time::timeout(within, read.read_to_end(&mut out)).await;
    writer.abort();
    done.ok().map(|_| out)
}

/// Through a source's local listener `via`: sends `payload` without half-closing, and
/// reads until `len` bytes came back, the tunnel closed, or `within` passed; then closes.
/// For sources that cannot pass a half-close on (`--double-dialer`).
pub async fn tunnel_exchange(
    via: SocketAddr,
    payload: &[u8],
    len: usize,
    within: Duration,
) -> Option<Vec<u8>> {
    let mut stream = TcpStream::connect(via).await.ok()?;
    stream.write_all(payload).await.ok()?;
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 << 10];
    let deadline = tokio::time::Instant::now() + within;
    while out.len() < len {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Err(_) => return None,
        }
    }
    Some(out)
}

/// Envoy's static configuration as Istio's ambient east-west gateway for services
/// without waypoints (AMBIENT.md §6): `connect_terminate` on `listen` (TLS 1.3 only,
/// ALPN `h2`, the gateway's SVID from `gw_certs`, a client certificate required to
/// chain to the mesh root with a URI SAN under `spiffe://<trust_domain>/`), HTTP/2 with
/// `CONNECT`, one virtual host per `(authority, endpoints)` whose only domain is the
/// `:authority` (`<host>:<port>`), routed to a STATIC LEAST_REQUEST cluster named as
/// istiod names it (`inbound-vip|<port>|tcp|<host>`, with istiod's unlimited circuit
/// breakers) with CONNECT terminated into raw TCP to the endpoints (their HBONE ports).
/// Any other authority gets 404.
pub fn reference_gateway_bootstrap(
    listen: SocketAddr,
    admin: SocketAddr,
    gw_certs: &Path,
    trust_domain: &str,
    services: &[(&str, &[SocketAddr])],
) -> serde_json::Value {
    use serde_json::json;
    let addr = |a: &SocketAddr| json!({"socket_address": {"address": a.ip().to_string(), "port_value": a.port()}});
    let file = |name: &str| json!({"filename": gw_certs.join(name).display().to_string()});
    let cluster_name = |authority: &str| {
        let (host, port) = authority.rsplit_once(':').expect("authority is host:port");
        format!("inbound-vip|{port}|tcp|{host}")
    };
    let virtual_hosts: Vec<_> = services
        .iter()
        .map(|(authority, _)| {
            json!({
                "name": authority,
                "domains": [authority],
                "routes": [{
                    "match": {"connect_matcher": {}},
                    "route": {
                        "cluster": cluster_name(authority),
                        "timeout": "0s",
                        "upgrade_configs": [{"upgrade_type": "CONNECT", "connect_config": {}}]
                    }
                }]
            })
        })
        .collect();
    let clusters: Vec<_> = services
        .iter()
        .map(|(authority, endpoints)| {
            let name = cluster_name(authority);
            json!({
                "name": name,
                "type": "STATIC",
                "lb_policy": "LEAST_REQUEST",
                "connect_timeout": "2s",
                // istiod's defaults: no circuit-breaking limit unless a DestinationRule sets one.
                "circuit_breakers": {"thresholds": [{
                    "max_connections": 4294967295u32,
                    "max_pending_requests": 4294967295u32,
                    "max_requests": 4294967295u32,
                    "max_retries": 4294967295u32,
                    "track_remaining": true
                }]},
                "load_assignment": {
                    "cluster_name": name,
                    "endpoints": [{
                        "lb_endpoints": endpoints.iter()
                            .map(|e| json!({"endpoint": {"address": addr(e)}}))
                            .collect::<Vec<_>>()
                    }]
                }
            })
        })
        .collect();
    json!({
        "admin": {"address": addr(&admin)},
        "static_resources": {
            "listeners": [{
                "name": "connect_terminate",
                "address": addr(&listen),
                "filter_chains": [{
                    "transport_socket": {
                        "name": "envoy.transport_sockets.tls",
                        "typed_config": {
                            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
                            "require_client_certificate": true,
                            "common_tls_context": {
                                "tls_params": {
                                    "tls_minimum_protocol_version": "TLSv1_3",
                                    "tls_maximum_protocol_version": "TLSv1_3"
                                },
                                "alpn_protocols": ["h2"],
                                "tls_certificates": [{
                                    "certificate_chain": file("cert-chain.pem"),
                                    "private_key": file("key.pem")
                                }],
                                "validation_context": {
                                    "trusted_ca": file("root-cert.pem"),
                                    "match_typed_subject_alt_names": [{
                                        "san_type": "URI",
                                        "matcher": {"prefix": format!("spiffe://{trust_domain}/")}
                                    }]
                                }
                            }
                        }
                    },
                    "filters": [{
                        "name": "envoy.filters.network.http_connection_manager",
                        "typed_config": {
                            "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                            "stat_prefix": "connect_terminate",
                            "codec_type": "HTTP2",
                            "upgrade_configs": [{"upgrade_type": "CONNECT"}],
                            "http2_protocol_options": {
                                "allow_connect": true,
                                "max_concurrent_streams": 100
                            },
                            "stream_idle_timeout": "0s",
                            "http_filters": [{
                                "name": "envoy.filters.http.router",
                                "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}
                            }],
                            "route_config": {"name": "main_internal", "virtual_hosts": virtual_hosts}
                        }
                    }]
                }]
            }],
            "clusters": clusters
        }
    })
}

/// What a [`RawH2`] client received, frame by frame (acknowledgements of its own SETTINGS
/// and PINGs are skipped).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seen {
    /// The server's SETTINGS: `(identifier, value)` pairs, in order.
    Settings(Vec<(u16, u32)>),
    /// A PING from the server, and when it came.
    Ping(Instant),
    WindowUpdate {
        stream: u32,
        increment: u32,
    },
    /// A response HEADERS frame: its `:status` (`None` when the block does not start with
    /// one this decoder reads) and whether it ended the stream.
    Headers {
        stream: u32,
        status: Option<u16>,
        end: bool,
    },
    Data {
        stream: u32,
        len: usize,
    },
    Reset {
        stream: u32,
        code: u32,
    },
    GoAway {
        last: u32,
        code: u32,
        debug: String,
    },
    /// The server closed the TLS connection (or it broke).
    Closed,
}

/// RFC 9113 error codes, as a client sees them.
pub const NO_ERROR: u32 = 0x0;
pub const PROTOCOL_ERROR: u32 = 0x1;
pub const REFUSED_STREAM: u32 = 0x7;
pub const CANCEL: u32 = 0x8;
pub const COMPRESSION_ERROR: u32 = 0x9;
pub const ENHANCE_YOUR_CALM: u32 = 0xb;

/// An HTTP/2 client that writes frames exactly as told, over any byte stream (the outer
/// mTLS of an HBONE connection): for the inputs a well-behaved client never sends (more
/// streams than the server allows, resets in bursts, oversized headers, endless
/// CONTINUATION). Its SETTINGS ask for an HPACK table of size 0, so that every response
/// `:status` arrives indexed from the static table or as a literal, which [`Seen`]
/// decodes without a dynamic table.
pub struct RawH2 {
    writes: tokio::sync::mpsc::UnboundedSender<Vec<u8>>,
    seen: Arc<Mutex<Vec<Seen>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for RawH2 {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// A frame: 9-byte header and payload.
pub fn h2_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = Vec::with_capacity(9 + payload.len());
    f.extend_from_slice(&len.to_be_bytes()[1..]);
    f.push(kind);
    f.push(flags);
    f.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// An HPACK integer with an `n`-bit prefix whose high bits are `first`.
fn hpack_int(out: &mut Vec<u8>, first: u8, n: u8, mut value: usize) {
    let max = (1usize << n) - 1;
    if value < max {
        out.push(first | value as u8);
        return;
    }
    out.push(first | max as u8);
    value -= max;
    while value >= 128 {
        out.push((value % 128) as u8 | 0x80);
        value /= 128;
    }
    out.push(value as u8);
}

/// An HPACK string literal, not Huffman-coded.
fn hpack_str(out: &mut Vec<u8>, s: &[u8]) {
    hpack_int(out, 0, 7, s.len());
    out.extend_from_slice(s);
}

/// The header block of `CONNECT authority`, with `extra` headers (literal names and
/// values, never indexed): HPACK without a dynamic table.
pub fn connect_block(authority: &str, extra: &[(&str, &[u8])]) -> Vec<u8> {
    let mut b = Vec::new();
    // Literal without indexing, indexed name: 2 is `:method`, 1 is `:authority`.
    hpack_int(&mut b, 0x00, 4, 2);
    hpack_str(&mut b, b"CONNECT");
    hpack_int(&mut b, 0x00, 4, 1);
    hpack_str(&mut b, authority.as_bytes());
    for (name, value) in extra {
        b.push(0x00);
        hpack_str(&mut b, name.as_bytes());
        hpack_str(&mut b, value);
    }
    b
}

pub const DATA: u8 = 0x0;
pub const HEADERS: u8 = 0x1;
pub const RST_STREAM: u8 = 0x3;
pub const CONTINUATION: u8 = 0x9;
pub const END_STREAM: u8 = 0x1;
pub const END_HEADERS: u8 = 0x4;

/// HEADERS for a `CONNECT` to `authority` on `stream`, in one frame.
pub fn connect_frame(stream: u32, authority: &str) -> Vec<u8> {
    h2_frame(HEADERS, END_HEADERS, stream, &connect_block(authority, &[]))
}

/// RST_STREAM with `code`.
pub fn reset_frame(stream: u32, code: u32) -> Vec<u8> {
    h2_frame(RST_STREAM, 0, stream, &code.to_be_bytes())
}

/// The `:status` a response header block starts with, for a decoder with an HPACK table
/// of size 0: an indexed static entry (8–14) or a literal with name index 8 (its value
/// plain or Huffman-coded digits).
fn response_status(block: &[u8]) -> Option<u16> {
    let mut i = 0;
    let int = |i: &mut usize, n: u8| -> Option<usize> {
        let max = (1usize << n) - 1;
        let mut v = (*block.get(*i)? as usize) & max;
        *i += 1;
        if v < max {
            return Some(v);
        }
        let mut shift = 0;
        loop {
            let b = *block.get(*i)? as usize;
            *i += 1;
            v += (b & 0x7f) << shift;
            shift += 7;
            if b & 0x80 == 0 {
                return Some(v);
            }
        }
    };
    // Dynamic table size updates (`001xxxxx`) come first.
    while *block.get(i)? & 0xe0 == 0x20 {
        int(&mut i, 5)?;
    }
    let first = *block.get(i)?;
    let name = if first & 0x80 != 0 {
        let index = int(&mut i, 7)?;
        let statics = [200, 204, 206, 304, 400, 404, 500];
        return statics.get(index.checked_sub(8)?).copied();
    } else if first & 0xc0 == 0x40 {
        int(&mut i, 6)?
    } else {
        int(&mut i, 4)?
    };
    if name != 8 {
        return None;
    }
    let huffman = *block.get(i)? & 0x80 != 0;
    let len = int(&mut i, 7)?;
    let value = block.get(i..i + len)?;
    let text = if huffman {
        // Digits are 5-bit (`0`–`2`: 0–2) or 6-bit (`3`–`9`: 0x19–0x1f) codes; the
        // padding is ones.
        let bits: Vec<u8> = value
            .iter()
            .flat_map(|b| (0..8).rev().map(move |k| (b >> k) & 1))
            .collect();
        let mut out = String::new();
        let mut k = 0;
        while k + 5 <= bits.len() {
            let five = bits[k..k + 5].iter().fold(0u8, |a, b| a << 1 | b);
            if five < 3 {
                out.push((b'0' + five) as char);
                k += 5;
            } else if k + 6 <= bits.len() {
                let six = five << 1 | bits[k + 5];
                if !(0x19..=0x1f).contains(&six) {
                    break;
                }
                out.push((b'3' + six - 0x19) as char);
                k += 6;
            } else {
                break;
            }
        }
        out
    } else {
        String::from_utf8_lossy(value).to_string()
    };
    text.parse().ok()
}

impl RawH2 {
    /// Sends the client preface and SETTINGS (HPACK table 0, no push) on `io`, then records
    /// every frame the server sends, answering its SETTINGS and PINGs.
    pub fn start<S>(io: S) -> RawH2
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + 'static,
    {
        Self::start_with(io, true)
    }

    /// [`RawH2::start`], leaving the server's PINGs unanswered: a peer gone quiet.
    pub fn start_deaf<S>(io: S) -> RawH2
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + 'static,
    {
        Self::start_with(io, false)
    }

    fn start_with<S>(io: S, answer_pings: bool) -> RawH2
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + 'static,
    {
        let (mut read, mut write) = tokio::io::split(io);
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Vec<u8>>();
        let seen = Arc::new(Mutex::new(Vec::new()));
        // Queued first: the reader may answer the server's SETTINGS at once.
        let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        // SETTINGS_HEADER_TABLE_SIZE 0, SETTINGS_ENABLE_PUSH 0.
        hello.extend(h2_frame(0x4, 0, 0, &[0, 1, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0]));
        let _ = tx.send(hello);
        let writer = tokio::spawn(async move {
            while let Some(bytes) = rx.recv().await {
                if write.write_all(&bytes).await.is_err() {
                    return;
                }
            }
        });
        let answers = tx.clone();
        let log = seen.clone();
        let reader = tokio::spawn(async move {
            let mut buf = Vec::new();
            let mut chunk = vec![0u8; 64 << 10];
            loop {
                while buf.len() >= 9 {
                    let len = u32::from_be_bytes([0, buf[0], buf[1], buf[2]]) as usize;
                    if buf.len() < 9 + len {
                        break;
                    }
                    let kind = buf[3];
                    let flags = buf[4];
                    let stream = u32::from_be_bytes([buf[5], buf[6], buf[7], buf[8]]) & 0x7fff_ffff;
                    let payload: Vec<u8> = buf[9..9 + len].to_vec();
                    buf.drain(..9 + len);
                    let event = match kind {
                        0x0 => Some(Seen::Data { stream, len }),
                        0x1 => {
                            // PADDED and PRIORITY fields come before the block.
                            let mut block = &payload[..];
                            if flags & 0x8 != 0 && !block.is_empty() {
                                let pad = block[0] as usize;
                                block = &block[1..block.len().saturating_sub(pad)];
                            }
                            if flags & 0x20 != 0 && block.len() >= 5 {
                                block = &block[5..];
                            }
                            Some(Seen::Headers {
                                stream,
                                status: response_status(block),
                                end: flags & END_STREAM != 0,
                            })
                        }
                        0x3 if len == 4 => Some(Seen::Reset {
                            stream,
                            code: u32::from_be_bytes([
                                payload[0], payload[1], payload[2], payload[3],
                            ]),
                        }),
                        0x4 if flags & 0x1 == 0 => {
                            let _ = answers.send(h2_frame(0x4, 0x1, 0, &[]));
                            Some(Seen::Settings(
                                payload
                                    .chunks_exact(6)
                                    .map(|p| {
                                        (
                                            u16::from_be_bytes([p[0], p[1]]),
                                            u32::from_be_bytes([p[2], p[3], p[4], p[5]]),
                                        )
                                    })
                                    .collect(),
                            ))
                        }
                        0x6 if flags & 0x1 == 0 => {
                            if answer_pings {
                                let _ = answers.send(h2_frame(0x6, 0x1, 0, &payload));
                            }
                            Some(Seen::Ping(Instant::now()))
                        }
                        0x8 if len == 4 => Some(Seen::WindowUpdate {
                            stream,
                            increment: u32::from_be_bytes([
                                payload[0], payload[1], payload[2], payload[3],
                            ]) & 0x7fff_ffff,
                        }),
                        0x7 if len >= 8 => Some(Seen::GoAway {
                            last: u32::from_be_bytes([
                                payload[0], payload[1], payload[2], payload[3],
                            ]) & 0x7fff_ffff,
                            code: u32::from_be_bytes([
                                payload[4], payload[5], payload[6], payload[7],
                            ]),
                            debug: String::from_utf8_lossy(&payload[8..]).to_string(),
                        }),
                        _ => None,
                    };
                    if let Some(e) = event {
                        log.lock().unwrap().push(e);
                    }
                }
                match read.read(&mut chunk).await {
                    Ok(0) | Err(_) => {
                        log.lock().unwrap().push(Seen::Closed);
                        return;
                    }
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
        });
        RawH2 {
            writes: tx,
            seen,
            tasks: vec![writer, reader],
        }
    }

    /// Writes `bytes` (frames) as they are, in one write.
    pub fn send(&self, bytes: Vec<u8>) {
        let _ = self.writes.send(bytes);
    }

    /// Everything received so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// Waits until `pred` holds for what was received (at most `within`); whether it did.
    pub async fn wait(&self, within: Duration, pred: impl Fn(&[Seen]) -> bool) -> bool {
        let deadline = Instant::now() + within;
        loop {
            if pred(&self.seen()) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The first GOAWAY received, if any.
    pub fn go_away(&self) -> Option<Seen> {
        self.seen()
            .into_iter()
            .find(|s| matches!(s, Seen::GoAway { .. }))
    }

    /// The reset code received for `stream`, if any.
    pub fn reset_of(&self, stream: u32) -> Option<u32> {
        self.seen().into_iter().find_map(|s| match s {
            Seen::Reset { stream: id, code } if id == stream => Some(code),
            _ => None,
        })
    }

    /// The response status received for `stream`, if any.
    pub fn status_of(&self, stream: u32) -> Option<u16> {
        self.seen().into_iter().find_map(|s| match s {
            Seen::Headers {
                stream: id, status, ..
            } if id == stream => status,
            _ => None,
        })
    }
}
