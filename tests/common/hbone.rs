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
/// istiod names it (`inbound-vip|<port>|tcp|<host>`) with CONNECT terminated into raw
/// TCP to the endpoints (their HBONE ports). Any other authority gets 404.
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
