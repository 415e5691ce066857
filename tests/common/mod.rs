//! Shared test helpers: free ports, a test CA, TLS echo workloads, a running `strait`
//! process with a configuration, TLS clients and a tiny HTTP client.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, SanType};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub const REVIEWS: &str = "reviews.default.svc.cluster.local";
pub const RATINGS: &str = "ratings.default.svc.cluster.local";

pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The key-exchange group `name` of the crypto provider strait is built with (ring, or
/// aws-lc-rs with the `aws-lc-rs` feature).
pub fn kx_group(name: rustls::NamedGroup) -> &'static dyn rustls::crypto::SupportedKxGroup {
    #[cfg(feature = "aws-lc-rs")]
    let all = rustls::crypto::aws_lc_rs::ALL_KX_GROUPS;
    #[cfg(not(feature = "aws-lc-rs"))]
    let all = rustls::crypto::ring::ALL_KX_GROUPS;
    all.iter()
        .copied()
        .find(|g| g.name() == name)
        .unwrap_or_else(|| panic!("{name:?} is not a group of {}", strait::tls::provider::NAME))
}

/// strait's crypto provider with only `groups`, in this order, for a peer that offers or
/// accepts exactly those.
pub fn provider_with_groups(groups: &[rustls::NamedGroup]) -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::CryptoProvider {
        kx_groups: groups.iter().map(|&g| kx_group(g)).collect(),
        ..(*strait::tls::provider::provider()).clone()
    })
}

/// Accepts a server certificate that chains to the mesh roots, whatever names it holds
/// (an SVID has only its SPIFFE ID): for clients whose key-exchange groups and versions a
/// test or bench chooses, with the chain still verified.
#[derive(Debug)]
pub struct MeshRoots(Arc<rustls::client::WebPkiServerVerifier>);

impl rustls::client::danger::ServerCertVerifier for MeshRoots {
    fn verify_server_cert(
        &self,
        end_entity: &rustls::pki_types::CertificateDer<'_>,
        intermediates: &[rustls::pki_types::CertificateDer<'_>],
        name: &rustls::pki_types::ServerName<'_>,
        ocsp: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        use rustls::CertificateError::{NotValidForName, NotValidForNameContext};
        match self
            .0
            .verify_server_cert(end_entity, intermediates, name, ocsp, now)
        {
            Err(rustls::Error::InvalidCertificate(
                NotValidForName | NotValidForNameContext { .. },
            )) => Ok(rustls::client::danger::ServerCertVerified::assertion()),
            other => other,
        }
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// A rustls client with the SVID in `certs` (Istio's file layout), trusting the mesh roots
/// there, offering exactly `groups` (key share for the first) and `versions`, ALPN `alpn`,
/// without session resumption: every connection makes a full handshake.
pub fn mesh_client_config(
    certs: &Path,
    groups: &[rustls::NamedGroup],
    versions: &[&'static rustls::SupportedProtocolVersion],
    alpn: &[&str],
) -> Result<Arc<rustls::ClientConfig>, String> {
    let id = strait::tls::load_identity(certs).map_err(|e| e.to_string())?;
    let mut roots = rustls::RootCertStore::empty();
    for r in &id.roots {
        roots.add(r.clone()).map_err(|e| e.to_string())?;
    }
    let provider = provider_with_groups(groups);
    let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .map_err(|e| e.to_string())?;
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(MeshRoots(inner)))
        .with_client_auth_cert(id.chain.clone(), id.key.clone_key())
        .map_err(|e| e.to_string())?;
    config.alpn_protocols = alpn.iter().map(|a| a.as_bytes().to_vec()).collect();
    config.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(config))
}

/// A loopback port reserved for this test process, for a server that another process (a
/// `strait` under test) or a later bind will take.
///
/// A port from `bind(0)` comes from the kernel's ephemeral range, which every outgoing
/// connection of every test also draws from: between closing the probe and the real bind,
/// it can be taken. The ports handed out here lie outside that range
/// (`/proc/sys/net/ipv4/ip_local_port_range`), so only an explicit bind can take them;
/// each is handed out once per process (a counter) and held for the life of the process
/// by an exclusive `flock` on a file named after it, so that no other test process
/// (another test binary, a second `cargo test`) hands it out too; and it is checked free
/// by binding it before it is returned.
pub fn free_port() -> u16 {
    ports::reserve()
}

mod ports {
    use std::fs::File;
    use std::net::TcpListener;
    use std::os::fd::AsRawFd;
    use std::sync::Mutex;

    /// Next candidate offset, and the lock files held (never closed before exit).
    static STATE: Mutex<(usize, Vec<File>)> = Mutex::new((0, Vec::new()));

    /// Ports outside the ephemeral range, above 10000 (below it sit well-known services),
    /// and outside Istio's 15000–15099 and 15443, which `strait demo` and the Istio peers
    /// of other tests bind as they are, without asking here.
    fn candidates() -> Vec<u16> {
        let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
            .unwrap_or_else(|_| "32768 60999".into());
        let mut it = range
            .split_whitespace()
            .filter_map(|p| p.parse::<u32>().ok());
        let (lo, hi) = (it.next().unwrap_or(32768), it.next().unwrap_or(60999));
        (10_000u32..=65_535)
            .filter(|p| *p < lo || *p > hi)
            .filter(|p| !(15_000..=15_099).contains(p) && *p != 15_443)
            .map(|p| p as u16)
            .collect()
    }

    pub fn reserve() -> u16 {
        let candidates = candidates();
        assert!(
            candidates.len() > 1000,
            "the ephemeral port range leaves too few ports for tests"
        );
        let dir = std::env::temp_dir().join("strait-test-ports");
        std::fs::create_dir_all(&dir).unwrap();
        let mut state = STATE.lock().unwrap_or_else(|e| e.into_inner());
        if state.0 == 0 {
            // Start where another test process is unlikely to be, to skip fewer locks.
            state.0 = 1 + (std::process::id() as usize * 7919) % candidates.len();
        }
        for _ in 0..candidates.len() {
            let port = candidates[state.0 % candidates.len()];
            state.0 += 1;
            let Ok(file) = File::create(dir.join(port.to_string())) else {
                continue;
            };
            // SAFETY: flock on a file descriptor this function owns.
            let locked = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
            if locked != 0 {
                continue; // another test process holds it
            }
            if TcpListener::bind(("127.0.0.1", port)).is_err() {
                continue; // something outside the tests listens there
            }
            state.1.push(file);
            return port;
        }
        panic!("no free test port outside the ephemeral range");
    }
}

/// A unique scratch directory, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: AtomicU64 = AtomicU64::new(0);
        let p = std::env::temp_dir().join(format!(
            "strait-test-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.0.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A throwaway CA for workload certificates.
pub struct TestCa {
    pub root: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
}

impl TestCa {
    pub fn new() -> TestCa {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "strait test root");
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        TestCa {
            root: cert.der().clone(),
            issuer: Issuer::new(params, key),
        }
    }

    /// A leaf certificate with DNS name `workload.test` and the given SPIFFE URI.
    pub fn issue(&self, spiffe: &str) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        let mut params = CertificateParams::new(vec!["workload.test".to_string()]).unwrap();
        params
            .subject_alt_names
            .push(SanType::URI(spiffe.try_into().unwrap()));
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (
            vec![cert.der().clone()],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        )
    }

    /// The root certificate in PEM.
    pub fn root_pem(&self) -> String {
        use base64::Engine;
        let b64 = base64::engine::general_purpose::STANDARD.encode(self.root.as_ref());
        let mut pem = String::from("-----BEGIN CERTIFICATE-----\n");
        for line in b64.as_bytes().chunks(64) {
            pem.push_str(std::str::from_utf8(line).unwrap_or_default());
            pem.push('\n');
        }
        pem.push_str("-----END CERTIFICATE-----\n");
        pem
    }

    pub fn root_store(&self) -> rustls::RootCertStore {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.root.clone()).unwrap();
        roots
    }
}

/// A TLS server standing in for a meshed workload: terminates TLS with its own
/// certificate and echoes every byte back. Counts connections it accepted.
pub struct Workload {
    pub addr: SocketAddr,
    pub spiffe: String,
    pub accepted: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Workload {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Workload {
    pub async fn start(ca: &TestCa, spiffe: &str) -> Workload {
        // A reserved port, not an ephemeral one: tests stop a workload and start it again
        // on the same address.
        Workload::start_at(ca, spiffe, SocketAddr::from(([127, 0, 0, 1], free_port()))).await
    }

    /// Like [`Workload::start`], on a chosen address: brings a stopped workload back on
    /// the port its endpoint names, or serves at an address of a test's own network.
    pub async fn start_at(ca: &TestCa, spiffe: &str, addr: SocketAddr) -> Workload {
        let (chain, key) = ca.issue(spiffe);
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .unwrap();
        // A sidecar accepts the Istio ALPNs; h2 stands in for an app protocol.
        config.alpn_protocols = vec![
            b"istio".to_vec(),
            b"istio-peer-exchange".to_vec(),
            b"h2".to_vec(),
        ];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicU64::new(0));
        let count = accepted.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                count.fetch_add(1, Ordering::Relaxed);
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let _ = stream.set_nodelay(true);
                    let Ok(tls) = acceptor.accept(stream).await else {
                        return;
                    };
                    let (mut r, mut w) = tokio::io::split(tls);
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        match r.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                // rustls may keep what the socket did not take at once;
                                // without a flush it waits there for the next write,
                                // which an echo that now waits to read never makes.
                                if w.write_all(&buf[..n]).await.is_err() || w.flush().await.is_err()
                                {
                                    return;
                                }
                            }
                        }
                    }
                    // Echo done: close our side after the client's close.
                    let _ = w.shutdown().await;
                });
            }
        });
        Workload {
            addr,
            spiffe: spiffe.to_string(),
            accepted,
            task,
        }
    }

    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }

    /// Stops the workload and returns once its listener is closed, so the next dial of
    /// its address is refused. Dropping it only asks its task to stop: until the runtime
    /// runs the cancellation, the listener still accepts (a gateway's next connection
    /// would then be reset, or even answered, instead of refused).
    pub async fn stop(mut self) {
        self.task.abort();
        let _ = (&mut self.task).await;
    }
}

/// Verifies the server's chain against the test root (name `workload.test`, whatever
/// SNI was sent) and remembers the certificate the client saw.
#[derive(Debug)]
pub struct WorkloadVerifier {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
    pub seen: Mutex<Option<CertificateDer<'static>>>,
}

impl rustls::client::danger::ServerCertVerifier for WorkloadVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        *self.seen.lock().unwrap() = Some(end_entity.clone().into_owned());
        let name = ServerName::try_from("workload.test").unwrap();
        self.inner
            .verify_server_cert(end_entity, intermediates, &name, ocsp, now)
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

pub fn client_config(
    ca: &TestCa,
    alpn: &[&str],
) -> (Arc<rustls::ClientConfig>, Arc<WorkloadVerifier>) {
    let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(
        Arc::new(ca.root_store()),
        provider(),
    )
    .build()
    .unwrap();
    let verifier = Arc::new(WorkloadVerifier {
        inner,
        seen: Mutex::new(None),
    });
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(verifier.clone())
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|a| a.as_bytes().to_vec()).collect();
    (Arc::new(config), verifier)
}

/// Opens TLS through the gateway; returns the stream and the SPIFFE URI of the
/// certificate the client saw.
pub async fn tls_connect(
    gateway: SocketAddr,
    ca: &TestCa,
    sni: &str,
    alpn: &[&str],
) -> std::io::Result<(tokio_rustls::client::TlsStream<TcpStream>, String)> {
    let (config, verifier) = client_config(ca, alpn);
    let tcp = TcpStream::connect(gateway).await?;
    tcp.set_nodelay(true)?;
    let name = ServerName::try_from(sni.to_string()).unwrap();
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await?;
    let seen = verifier
        .seen
        .lock()
        .unwrap()
        .clone()
        .expect("server cert seen");
    Ok((tls, spiffe_of(&seen)))
}

/// The URI SAN of a certificate.
pub fn spiffe_of(cert: &CertificateDer<'_>) -> String {
    let (_, x509) = x509_parser::parse_x509_certificate(cert.as_ref()).unwrap();
    for ext in x509.extensions() {
        if let x509_parser::extensions::ParsedExtension::SubjectAlternativeName(san) =
            ext.parsed_extension()
        {
            for name in &san.general_names {
                if let x509_parser::extensions::GeneralName::URI(u) = name {
                    return u.to_string();
                }
            }
        }
    }
    String::new()
}

/// Sends `line` and reads the echo.
pub async fn echo_once<S>(stream: &mut S, line: &[u8]) -> Vec<u8>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    stream.write_all(line).await.unwrap();
    let mut back = vec![0u8; line.len()];
    stream.read_exact(&mut back).await.unwrap();
    back
}

/// A `strait run` process on a configuration; killed on drop.
pub struct Strait {
    pub child: Child,
    pub dir: TempDir,
    pub status: SocketAddr,
    pub metrics: SocketAddr,
    pub admin: SocketAddr,
    pub gateway: SocketAddr,
    pub stdout: Arc<Mutex<Vec<String>>>,
    pub stderr: Arc<Mutex<Vec<String>>>,
}

/// Ports for a gateway under test.
#[derive(Clone, Copy)]
pub struct Ports {
    pub gateway: u16,
    pub status: u16,
    pub metrics: u16,
    pub admin: u16,
}

impl Ports {
    pub fn new() -> Ports {
        Ports {
            gateway: free_port(),
            status: free_port(),
            metrics: free_port(),
            admin: free_port(),
        }
    }

    /// The Bootstrap document for these ports, plus extra `spec` lines (indented 2).
    pub fn bootstrap(&self, extra: &str) -> String {
        format!(
            "apiVersion: strait.dev/v1alpha1\nkind: Bootstrap\nmetadata: {{name: test}}\nspec:\n  status: 127.0.0.1:{}\n  metrics: 127.0.0.1:{}\n  admin: 127.0.0.1:{}\n  clientHelloTimeout: 2s\n  connectTimeout: 5s\n  drainDuration: 5s\n{extra}",
            self.status, self.metrics, self.admin
        )
    }

    /// A Gateway with one AUTO_PASSTHROUGH server on 127.0.0.1:<gateway>.
    pub fn gateway_doc(&self, hosts: &[&str]) -> String {
        let hosts: Vec<String> = hosts.iter().map(|h| format!("\"{h}\"")).collect();
        format!(
            "apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {{name: cross-network-gateway, namespace: istio-system}}\nspec:\n  selector: {{istio: eastwestgateway}}\n  servers:\n  - port: {{number: {}, name: tls, protocol: TLS}}\n    bind: 127.0.0.1\n    tls: {{mode: AUTO_PASSTHROUGH}}\n    hosts: [{}]\n",
            self.gateway,
            hosts.join(", ")
        )
    }
}

pub fn strait_bin() -> &'static str {
    env!("CARGO_BIN_EXE_strait")
}

impl Strait {
    /// Writes `config` to a file and runs `strait run -c <file>`, waiting for readiness.
    pub fn start(ports: Ports, config: &str) -> Strait {
        Self::start_with(ports, config, &[])
    }

    pub fn start_with(ports: Ports, config: &str, env: &[(&str, &str)]) -> Strait {
        let dir = TempDir::new("gw");
        let path = dir.write("strait.yaml", config);
        let mut cmd = Command::new(strait_bin());
        cmd.arg("run")
            .arg("-c")
            .arg(&path)
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let s = Strait::from_command(cmd, dir, ports);
        s.wait_ready(Duration::from_secs(20));
        s
    }

    /// Spawns `cmd` (a configured `strait` command), collecting its stdout and stderr.
    fn from_command(mut cmd: Command, dir: TempDir, ports: Ports) -> Strait {
        let mut child = cmd.spawn().unwrap();
        let stdout = Arc::new(Mutex::new(Vec::new()));
        let stderr = Arc::new(Mutex::new(Vec::new()));
        pump_lines(child.stdout.take().unwrap(), stdout.clone());
        pump_lines(child.stderr.take().unwrap(), stderr.clone());
        Strait {
            child,
            dir,
            status: SocketAddr::from(([127, 0, 0, 1], ports.status)),
            metrics: SocketAddr::from(([127, 0, 0, 1], ports.metrics)),
            admin: SocketAddr::from(([127, 0, 0, 1], ports.admin)),
            gateway: SocketAddr::from(([127, 0, 0, 1], ports.gateway)),
            stdout,
            stderr,
        }
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("strait.yaml")
    }

    /// Waits for `/healthz/ready` to answer 200. Stops at once, showing the exit status and
    /// stderr, if the process exits first.
    pub fn wait_ready(&self, within: Duration) {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Ok((200, _)) = http_get(self.status, "/healthz/ready") {
                return;
            }
            if let Some(status) = self.exit_status() {
                // Let the stderr pump take the last lines.
                std::thread::sleep(Duration::from_millis(100));
                panic!(
                    "strait exited before it was ready ({status}); stderr:\n{}",
                    self.stderr_text()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!(
            "strait not ready within {within:?}; stderr:\n{}",
            self.stderr_text()
        );
    }

    /// How the process ended, if it has, without reaping it (`waitid` with `WNOWAIT`), so
    /// `child.wait()` and `try_wait()` still work afterwards.
    pub fn exit_status(&self) -> Option<String> {
        // SAFETY: `waitid` writes into a zeroed `siginfo_t` owned by this frame.
        unsafe {
            let mut info: libc::siginfo_t = std::mem::zeroed();
            let r = libc::waitid(
                libc::P_PID,
                self.child.id() as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
            );
            if r != 0 || info.si_pid() == 0 {
                return None;
            }
            Some(match info.si_code {
                libc::CLD_EXITED => format!("exit code {}", info.si_status()),
                _ => format!("killed by signal {}", info.si_status()),
            })
        }
    }

    pub fn metrics_text(&self) -> String {
        http_get(self.metrics, "/stats/prometheus").unwrap().1
    }

    /// The value of one sample line (`name{labels}`), summing every series whose labels
    /// include all of `labels`.
    pub fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        metric_value(&self.metrics_text(), name, labels)
    }

    /// Access log lines (JSON), parsed.
    pub fn access_log(&self) -> Vec<serde_json::Value> {
        self.stdout
            .lock()
            .unwrap()
            .iter()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    pub fn stderr_text(&self) -> String {
        self.stderr.lock().unwrap().join("\n")
    }

    pub fn signal(&self, sig: i32) {
        unsafe {
            libc::kill(self.child.id() as i32, sig);
        }
    }

    /// Waits for the process to exit; returns its exit code. Once it has exited, also
    /// waits for its stdout and stderr to be read to the end, so that what it printed
    /// last is in `stdout`/`stderr`.
    pub fn wait_exit(&mut self, within: Duration) -> Option<i32> {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                // Each pump thread drops its handle on the buffer at end of file.
                let drained = Instant::now() + Duration::from_secs(5);
                while (Arc::strong_count(&self.stdout) > 1 || Arc::strong_count(&self.stderr) > 1)
                    && Instant::now() < drained
                {
                    std::thread::sleep(Duration::from_millis(5));
                }
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// Polls until `f` holds or `within` passes.
    pub fn eventually(&self, within: Duration, mut f: impl FnMut() -> bool) -> bool {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if f() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        false
    }

    /// The value of `name{labels}` (summed as [`Strait::metric`] sums it) once `ok` holds
    /// for it, polled for at most ten seconds: for a sample another task of the gateway
    /// writes, which may come after the event the test has seen (a connection counts its
    /// close, its refusal and its duration after the client sees it close). Panics with
    /// the last value and the metrics text if `ok` never holds.
    pub fn wait_metric(
        &self,
        name: &str,
        labels: &[(&str, &str)],
        ok: impl Fn(f64) -> bool,
    ) -> f64 {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let text = self.metrics_text();
            let value = metric_value(&text, name, labels);
            if ok(value) {
                return value;
            }
            if Instant::now() >= deadline {
                panic!("{name}{labels:?} is {value}, not the value awaited; metrics:\n{text}");
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }
}

impl Drop for Strait {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn pump_lines(r: impl Read + Send + 'static, into: Arc<Mutex<Vec<String>>>) {
    std::thread::spawn(move || {
        for line in BufReader::new(r).lines() {
            let Ok(line) = line else { break };
            into.lock().unwrap().push(line);
        }
    });
}

/// Sums the samples of `name` whose label set includes `labels`.
pub fn metric_value(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    let mut total = 0.0;
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let (series, value) = match line.rsplit_once(' ') {
            Some(x) => x,
            None => continue,
        };
        let (metric, label_text) = match series.split_once('{') {
            Some((m, rest)) => (m, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        if metric != name {
            continue;
        }
        if labels
            .iter()
            .all(|(k, v)| label_text.contains(&format!("{k}=\"{v}\"")))
        {
            total += value.parse::<f64>().unwrap_or(0.0);
        }
    }
    total
}

/// A blocking HTTP/1.1 GET; returns status and body.
pub fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    let status = resp
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = resp
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// Reads whatever the gateway sends before closing (e.g. a TLS alert), bounded.
pub async fn read_until_close(stream: &mut TcpStream, within: Duration) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    let r = tokio::time::timeout(within, stream.read_to_end(&mut out)).await;
    match r {
        Ok(Ok(_)) => Some(out),
        Ok(Err(_)) => Some(out),
        Err(_) => None,
    }
}

/// A ClientHello as rustls would send it, for raw-socket tests.
pub fn client_hello_bytes(sni: &str, alpn: &[&str]) -> Vec<u8> {
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|a| a.as_bytes().to_vec()).collect();
    let mut conn = rustls::ClientConnection::new(
        Arc::new(config),
        ServerName::try_from(sni.to_string()).unwrap(),
    )
    .unwrap();
    let mut out = Vec::new();
    conn.write_tls(&mut out).unwrap();
    out
}

impl Strait {
    /// Runs `strait [args] run -c <file>` with `env` set and `env_remove` unset, without
    /// waiting for readiness (for tests that watch startup itself).
    pub fn spawn(
        ports: Ports,
        config: &str,
        args: &[&str],
        env: &[(&str, &str)],
        env_remove: &[&str],
    ) -> Strait {
        let dir = TempDir::new("gw");
        let path = dir.write("strait.yaml", config);
        let mut cmd = Command::new(strait_bin());
        cmd.args(args)
            .arg("run")
            .arg("-c")
            .arg(&path)
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        for k in env_remove {
            cmd.env_remove(k);
        }
        Strait::from_command(cmd, dir, ports)
    }
}

/// Checks a Prometheus text exposition with `promtool check metrics` (Debian package
/// `prometheus`). `None` when promtool is not installed; the caller decides how loudly
/// to skip.
pub fn promtool_check(text: &str) -> Option<Result<(), String>> {
    let mut child = match Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(c) => c,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => return Some(Err(format!("cannot run promtool: {e}"))),
    };
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Some(if out.status.success() && report.trim().is_empty() {
        Ok(())
    } else {
        Err(report)
    })
}

/// A byte stream that counts what passes through it each way, to compare with what the
/// gateway reports.
pub struct Counting<S> {
    pub inner: S,
    pub written: Arc<AtomicU64>,
    pub read: Arc<AtomicU64>,
}

impl<S> Counting<S> {
    pub fn new(inner: S) -> Counting<S> {
        Counting {
            inner,
            written: Arc::new(AtomicU64::new(0)),
            read: Arc::new(AtomicU64::new(0)),
        }
    }
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Counting<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        self.read.fetch_add(n as u64, Ordering::Relaxed);
        r
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Counting<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let r = std::pin::Pin::new(&mut self.inner).poll_write(cx, buf);
        if let std::task::Poll::Ready(Ok(n)) = &r {
            self.written.fetch_add(*n as u64, Ordering::Relaxed);
        }
        r
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Sends raw bytes to an HTTP server and returns everything it answers before closing
/// (bounded by `within`); `None` if it neither answered nor closed in time.
pub fn http_raw(addr: SocketAddr, request: &[u8], within: Duration) -> Option<String> {
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(within)).ok()?;
    // The server may close before reading everything; that is an answer too.
    let _ = s.write_all(request);
    let mut out = Vec::new();
    match s.read_to_end(&mut out) {
        Ok(_) => Some(String::from_utf8_lossy(&out).into_owned()),
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            None
        }
        Err(_) => Some(String::from_utf8_lossy(&out).into_owned()),
    }
}

impl Strait {
    /// The admin `/clusters` document.
    pub fn clusters(&self) -> serde_json::Value {
        let (status, body) = http_get(self.admin, "/clusters").unwrap();
        assert_eq!(status, 200, "{body}");
        serde_json::from_str(&body).unwrap()
    }

    /// One endpoint's entry in `/clusters` (cluster named by its SNI key, endpoint by
    /// `host:port`).
    pub fn endpoint_state(&self, cluster: &str, endpoint: &str) -> serde_json::Value {
        let doc = self.clusters();
        let c = doc["clusters"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == cluster)
            .unwrap_or_else(|| panic!("no cluster {cluster} in {doc}"))
            .clone();
        c["endpoints"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["address"] == endpoint)
            .unwrap_or_else(|| panic!("no endpoint {endpoint} in {c}"))
            .clone()
    }
}

/// One TLS connection through the gateway to `sni` that echoes a line and closes;
/// returns the SPIFFE ID of the workload that answered.
pub async fn round_trip(gateway: SocketAddr, ca: &TestCa, sni: &str) -> std::io::Result<String> {
    let (mut tls, seen) = tls_connect(gateway, ca, sni, &["istio"]).await?;
    assert_eq!(echo_once(&mut tls, b"ping\n").await, b"ping\n");
    let _ = tls.shutdown().await;
    Ok(seen)
}

// ---- Lifecycle helpers: plain TCP upstreams, verified byte streams, launching options.

/// The byte at `offset` of stream `seed`: a pattern that catches lost, repeated and
/// reordered bytes.
pub fn pattern_byte(seed: u64, offset: u64) -> u8 {
    let x = offset.wrapping_add(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    (x ^ (x >> 8) ^ (x >> 17) ^ (x >> 29)) as u8
}

pub fn fill_pattern(seed: u64, offset: u64, buf: &mut [u8]) {
    for (i, b) in buf.iter_mut().enumerate() {
        *b = pattern_byte(seed, offset + i as u64);
    }
}

/// A plain TCP echo server standing in for a workload: after the gateway replays the
/// ClientHello, every byte comes back as sent. Cheap enough for heavy load tests.
pub struct RawEcho {
    pub addr: SocketAddr,
    pub accepted: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for RawEcho {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl RawEcho {
    pub async fn start() -> RawEcho {
        raw_echo_on(StdListener::bind("127.0.0.1:0").unwrap())
    }

    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }

    /// Stops the echo and returns once its listener is closed ([`Workload::stop`]).
    pub async fn stop(mut self) {
        self.task.abort();
        let _ = (&mut self.task).await;
    }
}

/// A plain TCP server that, once it has read the replayed ClientHello, writes `limit`
/// bytes of pattern (seed 0) as fast as the connection takes them, then closes.
/// `pushed` counts bytes the kernel accepted from it, over all connections.
pub struct Firehose {
    pub addr: SocketAddr,
    pub pushed: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Firehose {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Firehose {
    pub async fn start(limit: u64) -> Firehose {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let pushed = Arc::new(AtomicU64::new(0));
        let total = pushed.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut stream, _)) = listener.accept().await else {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                let total = total.clone();
                tokio::spawn(async move {
                    let mut hello = [0u8; 4096];
                    if !matches!(stream.read(&mut hello).await, Ok(n) if n > 0) {
                        return;
                    }
                    let mut chunk = vec![0u8; 64 * 1024];
                    let mut offset = 0u64;
                    while offset < limit {
                        let n = (limit - offset).min(chunk.len() as u64) as usize;
                        fill_pattern(0, offset, &mut chunk[..n]);
                        if stream.write_all(&chunk[..n]).await.is_err() {
                            return;
                        }
                        offset += n as u64;
                        total.fetch_add(n as u64, Ordering::Relaxed);
                    }
                    let _ = stream.shutdown().await;
                });
            }
        });
        Firehose { addr, pushed, task }
    }

    pub fn pushed(&self) -> u64 {
        self.pushed.load(Ordering::Relaxed)
    }
}

/// How a verified stream through the gateway failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamFailure {
    /// The TCP connect itself failed (nothing listening, or reset during the handshake).
    Refused(String),
    /// Connected, but closed or reset before the ClientHello came back.
    NotServed(String),
    /// Broke after `verified` bytes of echo had arrived intact.
    Broken { verified: u64, error: String },
    /// A byte came back different from what was sent.
    Corrupt { at: u64 },
}

/// A raw session through the gateway to an echo upstream: ClientHello with `sni`, then
/// verified pattern bytes.
pub struct RawSession {
    pub stream: TcpStream,
    seed: u64,
    offset: u64,
}

impl RawSession {
    /// Connects, sends a ClientHello for `sni` and waits (up to `within`) for its echo.
    pub async fn open(
        gateway: SocketAddr,
        sni: &str,
        seed: u64,
        within: Duration,
    ) -> Result<RawSession, StreamFailure> {
        let mut stream = TcpStream::connect(gateway)
            .await
            .map_err(|e| StreamFailure::Refused(e.to_string()))?;
        let _ = stream.set_nodelay(true);
        let hello = client_hello_bytes(sni, &["istio"]);
        let round = async {
            stream.write_all(&hello).await?;
            let mut back = vec![0u8; hello.len()];
            stream.read_exact(&mut back).await?;
            Ok::<_, std::io::Error>(back)
        };
        match tokio::time::timeout(within, round).await {
            Ok(Ok(back)) if back == hello => Ok(RawSession {
                stream,
                seed,
                offset: 0,
            }),
            Ok(Ok(_)) => Err(StreamFailure::Corrupt { at: 0 }),
            Ok(Err(e)) => Err(StreamFailure::NotServed(e.to_string())),
            Err(_) => Err(StreamFailure::NotServed(format!(
                "no ClientHello echo within {within:?}"
            ))),
        }
    }

    /// Sends `len` pattern bytes and checks their echo.
    pub async fn exchange(&mut self, len: usize) -> Result<(), StreamFailure> {
        let mut out = vec![0u8; len];
        fill_pattern(self.seed, self.offset, &mut out);
        let broken = |verified: u64, e: std::io::Error| StreamFailure::Broken {
            verified,
            error: e.to_string(),
        };
        self.stream
            .write_all(&out)
            .await
            .map_err(|e| broken(self.offset, e))?;
        let mut back = vec![0u8; len];
        let mut got = 0;
        while got < len {
            match tokio::time::timeout(Duration::from_secs(10), self.stream.read(&mut back[got..]))
                .await
            {
                Ok(Ok(0)) => {
                    return Err(broken(
                        self.offset + got as u64,
                        std::io::Error::from(std::io::ErrorKind::UnexpectedEof),
                    ));
                }
                Ok(Ok(n)) => got += n,
                Ok(Err(e)) => return Err(broken(self.offset + got as u64, e)),
                Err(_) => {
                    return Err(broken(
                        self.offset + got as u64,
                        std::io::Error::from(std::io::ErrorKind::TimedOut),
                    ));
                }
            }
        }
        if let Some(i) = out.iter().zip(&back).position(|(a, b)| a != b) {
            return Err(StreamFailure::Corrupt {
                at: self.offset + i as u64,
            });
        }
        self.offset += len as u64;
        Ok(())
    }

    /// Closes our side and expects the echo side to close cleanly with nothing extra.
    pub async fn finish(mut self) -> Result<u64, StreamFailure> {
        let verified = self.offset;
        let _ = self.stream.shutdown().await;
        let mut rest = Vec::new();
        match tokio::time::timeout(Duration::from_secs(10), self.stream.read_to_end(&mut rest))
            .await
        {
            Ok(Ok(_)) if rest.is_empty() => Ok(verified),
            Ok(Ok(_)) => Err(StreamFailure::Corrupt { at: verified }),
            Ok(Err(e)) => Err(StreamFailure::Broken {
                verified,
                error: e.to_string(),
            }),
            Err(_) => Err(StreamFailure::Broken {
                verified,
                error: "no close from the far side".into(),
            }),
        }
    }
}

/// One verified stream: `chunks` exchanges of `chunk` bytes, `pause` apart, then a
/// clean close. Returns the bytes verified.
pub async fn echo_stream(
    gateway: SocketAddr,
    sni: &str,
    seed: u64,
    chunks: usize,
    chunk: usize,
    pause: Duration,
) -> Result<u64, StreamFailure> {
    let mut s = RawSession::open(gateway, sni, seed, Duration::from_secs(10)).await?;
    for i in 0..chunks {
        if i > 0 && !pause.is_zero() {
            tokio::time::sleep(pause).await;
        }
        s.exchange(chunk).await?;
    }
    s.finish().await
}

impl Strait {
    /// Runs `strait run -c PATHS...` without waiting for readiness. `nofile`, if set,
    /// lowers the child's RLIMIT_NOFILE before it starts.
    pub fn launch(ports: Ports, dir: TempDir, paths: &[PathBuf], nofile: Option<u64>) -> Strait {
        Self::launch_args(ports, dir, paths, &[], nofile)
    }

    /// [`Strait::launch`] with `--handover SOCKET`.
    pub fn launch_handover(ports: Ports, dir: TempDir, paths: &[PathBuf], socket: &Path) -> Strait {
        Self::launch_args(
            ports,
            dir,
            paths,
            &[std::ffi::OsStr::new("--handover"), socket.as_os_str()],
            None,
        )
    }

    fn launch_args(
        ports: Ports,
        dir: TempDir,
        paths: &[PathBuf],
        extra: &[&std::ffi::OsStr],
        nofile: Option<u64>,
    ) -> Strait {
        let mut cmd = Command::new(strait_bin());
        cmd.arg("run");
        for p in paths {
            cmd.arg("-c").arg(p);
        }
        cmd.args(extra);
        cmd.env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(n) = nofile {
            use std::os::unix::process::CommandExt;
            // SAFETY: setrlimit is async-signal-safe; nothing else runs between fork and exec.
            unsafe {
                cmd.pre_exec(move || {
                    let lim = libc::rlimit {
                        rlim_cur: n as libc::rlim_t,
                        rlim_max: n as libc::rlim_t,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        Strait::from_command(cmd, dir, ports)
    }

    /// Polls `f` until it has returned the same value for `quiet`, at most `within`;
    /// returns that value (or the last one seen). For a count another task is still
    /// writing, such as access log lines of connections that are ending.
    pub fn settled<T: PartialEq>(&self, within: Duration, quiet: Duration, f: impl Fn() -> T) -> T {
        let deadline = Instant::now() + within;
        let mut last = f();
        let mut since = Instant::now();
        loop {
            std::thread::sleep(Duration::from_millis(25));
            let now = f();
            if now != last {
                last = now;
                since = Instant::now();
            } else if since.elapsed() >= quiet || Instant::now() >= deadline {
                return last;
            }
        }
    }

    /// Waits until a stderr line contains `needle`.
    pub fn wait_stderr(&self, needle: &str, within: Duration) -> bool {
        self.eventually(within, || {
            self.stderr
                .lock()
                .unwrap()
                .iter()
                .any(|l| l.contains(needle))
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Resident memory of the process, in KiB (VmRSS).
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap()
    }

    /// CPU time used so far (user + system), in clock ticks.
    pub fn cpu_ticks(&self) -> u64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).unwrap();
        // Fields after the parenthesised command name; utime and stime are 14 and 15.
        let rest = &stat[stat.rfind(')').unwrap() + 2..];
        let f: Vec<&str> = rest.split_whitespace().collect();
        f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
    }

    /// Open file descriptors of the process.
    pub fn fd_count(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .map(|d| d.count())
            .unwrap_or(0)
    }
}

/// Writes `text` to `path` atomically (a temporary file renamed over it), the way
/// editors and config management replace files.
pub fn replace_file(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp~");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

// ---- Bridge helpers: mesh certificates from the CLI, echo workloads on given sockets,
// ---- bulk verified transfers, and Linux network namespaces.

/// Runs `strait ARGS` and asserts it succeeded.
pub fn strait_cli(args: &[&str]) {
    let out = Command::new(strait_bin()).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "strait {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `strait ca init --trust-domain TD --out DIR/ca-TD`; returns the CA directory.
pub fn mesh_ca(dir: &Path, trust_domain: &str) -> PathBuf {
    let p = dir.join(format!("ca-{trust_domain}"));
    strait_cli(&[
        "ca",
        "init",
        "--trust-domain",
        trust_domain,
        "--out",
        p.to_str().unwrap(),
    ]);
    p
}

/// `strait cert issue --ca CA --id ID --out OUT`; returns OUT.
pub fn mesh_cert(ca: &Path, id: &str, out: &Path) -> PathBuf {
    strait_cli(&[
        "cert",
        "issue",
        "--ca",
        ca.to_str().unwrap(),
        "--id",
        id,
        "--out",
        out.to_str().unwrap(),
    ]);
    out.to_path_buf()
}

/// A plain TCP echo serving on an already bound listener (e.g. one made inside a
/// network namespace).
pub fn raw_echo_on(listener: StdListener) -> RawEcho {
    listener.set_nonblocking(true).unwrap();
    let listener = TcpListener::from_std(listener).unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicU64::new(0));
    let count = accepted.clone();
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            };
            count.fetch_add(1, Ordering::Relaxed);
            tokio::spawn(async move {
                let (mut r, mut w) = stream.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    RawEcho {
        addr,
        accepted,
        task,
    }
}

/// A stand-in for a sidecar in front of a workload: terminates mTLS itself with an SVID
/// from `certs` (Istio's file layout), requires a client certificate of the mesh
/// (`trust_domain`), records each client's SPIFFE ID and echoes the decrypted bytes.
pub struct MeshedEcho {
    pub addr: SocketAddr,
    pub peers: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for MeshedEcho {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl MeshedEcho {
    pub fn start_on(listener: StdListener, certs: &Path, trust_domain: &str) -> MeshedEcho {
        let id = strait::tls::load_identity(certs).unwrap();
        let trust = strait::tls::TrustConfig {
            trust_domain: trust_domain.into(),
            aliases: Vec::new(),
            federated: Default::default(),
        };
        let config = strait::tls::server_config(&id, &trust, &[b"istio"]).unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(config);
        listener.set_nonblocking(true).unwrap();
        let listener = TcpListener::from_std(listener).unwrap();
        let addr = listener.local_addr().unwrap();
        let peers = Arc::new(Mutex::new(Vec::new()));
        let seen = peers.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                let acceptor = acceptor.clone();
                let seen = seen.clone();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(stream).await else {
                        return;
                    };
                    if let Some(cert) = tls.get_ref().1.peer_certificates().and_then(|c| c.first())
                    {
                        seen.lock().unwrap().push(spiffe_of(cert));
                    }
                    let (mut r, mut w) = tokio::io::split(tls);
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                    let _ = w.shutdown().await;
                });
            }
        });
        MeshedEcho { addr, peers, task }
    }
}

/// Sends `len` bytes of pattern through `stream` while reading the echo back
/// concurrently, checks every byte, then half-closes and expects a clean end with
/// nothing extra. Returns the bytes verified.
pub async fn bulk_echo(stream: TcpStream, seed: u64, len: u64) -> Result<u64, String> {
    let (mut r, mut w) = stream.into_split();
    let writer = async move {
        let mut buf = vec![0u8; 64 * 1024];
        let mut off = 0u64;
        while off < len {
            let n = buf.len().min((len - off) as usize);
            fill_pattern(seed, off, &mut buf[..n]);
            w.write_all(&buf[..n])
                .await
                .map_err(|e| format!("write at {off}: {e}"))?;
            off += n as u64;
        }
        w.shutdown().await.map_err(|e| format!("shutdown: {e}"))?;
        Ok::<_, String>(w)
    };
    let reader = async move {
        let mut buf = vec![0u8; 64 * 1024];
        let mut off = 0u64;
        loop {
            let n = r
                .read(&mut buf)
                .await
                .map_err(|e| format!("read at {off}: {e}"))?;
            if n == 0 {
                break;
            }
            for (i, b) in buf[..n].iter().enumerate() {
                if *b != pattern_byte(seed, off + i as u64) {
                    return Err(format!("corrupt byte at {}", off + i as u64));
                }
            }
            off += n as u64;
        }
        Ok(off)
    };
    let (w, got) = tokio::time::timeout(Duration::from_secs(60), async {
        tokio::join!(writer, reader)
    })
    .await
    .map_err(|_| "bulk echo timed out".to_string())?;
    w?;
    let got = got?;
    if got != len {
        return Err(format!("echo ended after {got} of {len} bytes"));
    }
    Ok(got)
}

/// A Linux network namespace made for one test, deleted on drop.
pub struct NetNs {
    pub name: String,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip {args:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl NetNs {
    /// Creates a namespace with a unique name and its loopback up.
    pub fn create(tag: &str) -> Result<NetNs, String> {
        static N: AtomicU64 = AtomicU64::new(0);
        let name = format!(
            "strait-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        ip(&["netns", "add", &name])?;
        // From here on, drop deletes it even if the next step fails.
        let ns = NetNs { name };
        ip(&["-n", &ns.name, "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Connects two namespaces with a veth pair: `a_cidr` on `a`'s end, `b_cidr` on `b`'s.
    pub fn link(a: &NetNs, a_cidr: &str, b: &NetNs, b_cidr: &str) -> Result<(), String> {
        NetNs::link_named(a, "veth-a", a_cidr, b, "veth-b", b_cidr)
    }

    /// [`NetNs::link`] with the interfaces' names chosen, for a namespace linked to
    /// several others.
    pub fn link_named(
        a: &NetNs,
        a_dev: &str,
        a_cidr: &str,
        b: &NetNs,
        b_dev: &str,
        b_cidr: &str,
    ) -> Result<(), String> {
        // Interfaces are created inside the namespaces, so their names only need to
        // be unique there; deleting a namespace deletes its end of the pair.
        ip(&[
            "link", "add", a_dev, "netns", &a.name, "type", "veth", "peer", "name", b_dev, "netns",
            &b.name,
        ])?;
        for (ns, cidr, dev) in [(a, a_cidr, a_dev), (b, b_cidr, b_dev)] {
            ip(&["-n", &ns.name, "addr", "add", cidr, "dev", dev])?;
            ip(&["-n", &ns.name, "link", "set", dev, "up"])?;
        }
        Ok(())
    }

    /// Runs `ip -n <this namespace> ARGS`.
    pub fn ip(&self, args: &[&str]) -> Result<(), String> {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        ip(&all)
    }

    /// Runs `f` on a thread that has entered this namespace: sockets it creates live
    /// there, and keep working from any thread afterwards.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = format!("/run/netns/{}", self.name);
        std::thread::scope(|s| {
            s.spawn(|| {
                let file = std::fs::File::open(&path).unwrap();
                use std::os::fd::AsRawFd;
                // SAFETY: setns on a valid namespace fd affects only this thread.
                let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
                f()
            })
            .join()
            .unwrap()
        })
    }

    /// A listener bound inside this namespace.
    pub fn listen(&self, addr: &str) -> StdListener {
        let addr = addr.to_string();
        self.run(move || StdListener::bind(addr).unwrap())
    }

    /// A tokio connection made from inside this namespace.
    pub fn connect(&self, addr: SocketAddr) -> std::io::Result<TcpStream> {
        let s =
            self.run(move || std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5)))?;
        s.set_nonblocking(true)?;
        TcpStream::from_std(s)
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        if let Err(e) = ip(&["netns", "del", &self.name]) {
            eprintln!("cleanup: {e}");
        }
    }
}

impl Strait {
    /// Runs `strait run -c <file>` inside network namespace `ns` (`ip netns exec`) and
    /// waits for readiness, probed from inside the namespace.
    pub fn start_in(ns: &NetNs, ports: Ports, config: &str) -> Strait {
        Strait::start_in_at(ns, [127, 0, 0, 1].into(), ports, config)
    }

    /// [`Strait::start_in`] for a configuration that binds its ports where they are
    /// reached at `ip` (the namespace's own address, from outside it).
    pub fn start_in_at(ns: &NetNs, ip: std::net::IpAddr, ports: Ports, config: &str) -> Strait {
        let s = Strait::launch_in_at(ns, ip, ports, config, Path::new(strait_bin()), &[]);
        ns.run(|| s.wait_ready(Duration::from_secs(20)));
        s
    }

    /// [`Strait::start_in_at`] with binary `bin` (a release build, or a script that execs
    /// one, so the PID stays strait's) and `env` on top of `RUST_LOG=info`, without
    /// waiting for readiness.
    pub fn launch_in_at(
        ns: &NetNs,
        ip: std::net::IpAddr,
        ports: Ports,
        config: &str,
        bin: &Path,
        env: &[(&str, &str)],
    ) -> Strait {
        let dir = TempDir::new("gw");
        let path = dir.write("strait.yaml", config);
        let mut child = Command::new("ip")
            .args(["netns", "exec", &ns.name])
            .arg(bin)
            .args(["run", "-c"])
            .arg(&path)
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = Arc::new(Mutex::new(Vec::new()));
        let stderr = Arc::new(Mutex::new(Vec::new()));
        pump_lines(child.stdout.take().unwrap(), stdout.clone());
        pump_lines(child.stderr.take().unwrap(), stderr.clone());
        Strait {
            child,
            dir,
            status: SocketAddr::new(ip, ports.status),
            metrics: SocketAddr::new(ip, ports.metrics),
            admin: SocketAddr::new(ip, ports.admin),
            gateway: SocketAddr::new(ip, ports.gateway),
            stdout,
            stderr,
        }
    }

    /// Waits until an access log line satisfies `f`; returns it.
    pub fn wait_log(
        &self,
        within: Duration,
        f: impl Fn(&serde_json::Value) -> bool,
    ) -> Option<serde_json::Value> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(l) = self.access_log().into_iter().find(|l| f(l)) {
                return Some(l);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }
}

// ---- A cross-network world: a bridge in network1, a gateway in network2.

pub const GATEWAY_ID: &str = "spiffe://cluster.local/ns/istio-system/sa/eastwest";
pub const BRIDGE_ID: &str = "spiffe://cluster.local/ns/default/sa/bridge";
pub const WORKLOAD_ID: &str = "spiffe://cluster.local/ns/default/sa/reviews";

/// How network2's gateway treats the bridge's connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FarEnd {
    /// The gateway terminates mTLS, authorizes the bridge and forwards plaintext to a
    /// sidecar-less workload.
    IstioMutual,
    /// The gateway passes TLS through to a workload that terminates mTLS itself.
    AutoPassthrough,
}

/// A mesh CA (trust domain cluster.local) and SVIDs issued by the CLI.
pub struct Mesh {
    pub dir: TempDir,
    pub ca: PathBuf,
    pub bridge: PathBuf,
    pub gateway: PathBuf,
    pub workload: PathBuf,
}

impl Mesh {
    pub fn new() -> Mesh {
        let dir = TempDir::new("mesh");
        let ca = mesh_ca(dir.path(), "cluster.local");
        let bridge = mesh_cert(&ca, BRIDGE_ID, &dir.path().join("bridge"));
        let gateway = mesh_cert(&ca, GATEWAY_ID, &dir.path().join("gateway"));
        let workload = mesh_cert(&ca, WORKLOAD_ID, &dir.path().join("workload"));
        Mesh {
            dir,
            ca,
            bridge,
            gateway,
            workload,
        }
    }

    /// Another SVID from the mesh CA.
    pub fn issue(&self, id: &str, name: &str) -> PathBuf {
        mesh_cert(&self.ca, id, &self.dir.path().join(name))
    }
}

/// network2's gateway: a `far` server on `bind:ports.gateway` for the reviews service,
/// whose one endpoint is `workload`; ISTIO_MUTUAL allows only the bridge's identity.
pub fn network2_gateway(
    ports: &Ports,
    bind: &str,
    certs: &Path,
    far: FarEnd,
    workload: SocketAddr,
) -> String {
    let (mode, tls_mode, policy) = match far {
        FarEnd::IstioMutual => (
            "ISTIO_MUTUAL",
            "disabled",
            format!(
                "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: bridges-only, namespace: istio-system}}\nspec:\n  action: ALLOW\n  rules:\n  - from:\n    - source: {{principals: [\"{}\"]}}\n",
                BRIDGE_ID.trim_start_matches("spiffe://")
            ),
        ),
        FarEnd::AutoPassthrough => ("AUTO_PASSTHROUGH", "istio", String::new()),
    };
    format!(
        r#"{bootstrap}---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {{name: cross-network-gateway, namespace: istio-system}}
spec:
  servers:
  - port: {{number: {port}, name: tls, protocol: TLS}}
    bind: {bind}
    tls: {{mode: {mode}}}
    hosts: ["*.local"]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: reviews, namespace: default}}
spec:
  hosts: [{REVIEWS}]
  ports: [{{number: 9080, name: tcp, targetPort: {wport}}}]
  resolution: STATIC
  endpoints:
  - address: {wip}
    network: network2
    labels: {{version: v1, security.istio.io/tlsMode: {tls_mode}}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: reviews, namespace: default}}
spec:
  host: {REVIEWS}
  subsets:
  - name: v1
    labels: {{version: v1}}
{policy}"#,
        bootstrap = ports.bootstrap(&format!(
            "  cluster: cluster2\n  network: network2\n  trustDomain: cluster.local\n  certificates: {{dir: {}}}\n",
            certs.display()
        )),
        port = ports.gateway,
        wport = workload.port(),
        wip = workload.ip(),
    )
}

/// network1's bridge on `listen` for reviews v1: one endpoint in network2 (reached via
/// `gateway`), plus `local` endpoints in network1; `identity` is the far end expected.
/// `traffic_policy` goes under the DestinationRule's `trafficPolicy` (indented 4).
pub fn network1_bridge(
    ports: &Ports,
    listen: SocketAddr,
    certs: &Path,
    gateway: SocketAddr,
    identity: &str,
    local: &[SocketAddr],
    traffic_policy: &str,
) -> String {
    let mut endpoints = String::from(
        "  - address: 10.255.0.7\n    network: network2\n    labels: {version: v1, security.istio.io/tlsMode: istio}\n",
    );
    for l in local {
        endpoints.push_str(&format!(
            "  - address: {}\n    ports: {{tcp: {}}}\n    network: network1\n    labels: {{version: v1}}\n",
            l.ip(),
            l.port()
        ));
    }
    let policy = if traffic_policy.is_empty() {
        String::new()
    } else {
        format!("  trafficPolicy:\n{traffic_policy}")
    };
    format!(
        r#"{bootstrap}---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: reviews, namespace: default}}
spec:
  hosts: [{REVIEWS}]
  ports: [{{number: 9080, name: tcp}}]
  resolution: STATIC
  endpoints:
{endpoints}---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: reviews, namespace: default}}
spec:
  host: {REVIEWS}
{policy}  subsets:
  - name: v1
    labels: {{version: v1}}
---
apiVersion: strait.dev/v1alpha1
kind: Bridge
metadata: {{name: reviews}}
spec:
  listen: "{listen}"
  host: {REVIEWS}
  port: 9080
  subset: v1
  identity: {identity}
"#,
        bootstrap = ports.bootstrap(&format!(
            "  cluster: cluster1\n  network: network1\n  trustDomain: cluster.local\n  certificates: {{dir: {}}}\n  meshNetworks:\n    networks:\n      network2:\n        endpoints: [{{fromRegistry: cluster2}}]\n        gateways: [{{address: {}, port: {}}}]\n",
            certs.display(),
            gateway.ip(),
            gateway.port()
        )),
    )
}

/// A port that refuses connections and stays reserved while the returned socket lives
/// (bound, never listening), so no parallel test can start a server on it.
pub fn dead_port() -> (u16, socket2::Socket) {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    s.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .unwrap();
    let port = s.local_addr().unwrap().as_socket().unwrap().port();
    (port, s)
}
pub mod ca;
pub mod hbone;
pub mod istiod;
pub mod jwt;
pub mod xds;

/// A plaintext workload on a reserved loopback port, serving each connection with
/// `serve` in its own task.
async fn plaintext_workload<F, Fut>(serve: F) -> (SocketAddr, tokio::task::JoinHandle<()>)
where
    F: Fn(TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    plaintext_workload_at(SocketAddr::from(([127, 0, 0, 1], free_port())), serve).await
}

async fn plaintext_workload_at<F, Fut>(
    addr: SocketAddr,
    serve: F,
) -> (SocketAddr, tokio::task::JoinHandle<()>)
where
    F: Fn(TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let l = TcpListener::bind(addr).await.unwrap();
    let addr = l.local_addr().unwrap();
    let task = tokio::spawn(async move {
        loop {
            if let Ok((s, _)) = l.accept().await {
                tokio::spawn(serve(s));
            }
        }
    });
    (addr, task)
}

/// A sidecar-less workload: plaintext TCP echo.
pub async fn plaintext_echo() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    plaintext_workload(|mut s| async move {
        let (mut r, mut w) = s.split();
        let _ = tokio::io::copy(&mut r, &mut w).await;
    })
    .await
}

/// A sidecar-less workload that answers every read with its own name and a newline.
pub async fn named_server(name: &'static str) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    named_server_at(name, SocketAddr::from(([127, 0, 0, 1], free_port()))).await
}

/// [`named_server`] on a chosen address.
pub async fn named_server_at(
    name: &'static str,
    addr: SocketAddr,
) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    plaintext_workload_at(addr, move |mut s| async move {
        let mut buf = [0u8; 64];
        while let Ok(n) = s.read(&mut buf).await {
            if n == 0 || s.write_all(format!("{name}\n").as_bytes()).await.is_err() {
                break;
            }
        }
    })
    .await
}

/// Through an ISTIO_MUTUAL server, as a sidecar would: mTLS with the SVID in `certs`
/// (`cert-chain.pem`, `key.pem`, `root-cert.pem`), ALPN `istio-peer-exchange, istio`,
/// SNI `sni`; asks once who answers. An error when the handshake fails or the gateway
/// closes without an answer (a refusal).
pub async fn mtls_who(gw: SocketAddr, certs: &Path, sni: &str) -> std::io::Result<String> {
    mtls_who_offering(gw, certs, sni, &["istio-peer-exchange", "istio"])
        .await
        .map(|(who, _)| who)
}

/// [`mtls_who`] from the local address `from` (one of the host's own).
pub async fn mtls_who_from(
    gw: SocketAddr,
    certs: &Path,
    sni: &str,
    from: std::net::IpAddr,
) -> std::io::Result<String> {
    mtls_exchange(
        gw,
        certs,
        sni,
        &["istio-peer-exchange", "istio"],
        Some(from),
    )
    .await
    .map(|(who, _)| who)
}

/// [`mtls_who`] with the client offering `alpn`; also returns the protocol the server
/// negotiated (`None`: no ALPN).
pub async fn mtls_who_offering(
    gw: SocketAddr,
    certs: &Path,
    sni: &str,
    alpn: &[&str],
) -> std::io::Result<(String, Option<String>)> {
    mtls_exchange(gw, certs, sni, alpn, None).await
}

async fn mtls_exchange(
    gw: SocketAddr,
    certs: &Path,
    sni: &str,
    alpn: &[&str],
    from: Option<std::net::IpAddr>,
) -> std::io::Result<(String, Option<String>)> {
    use strait::tls::{TrustConfig, client_config, load_identity};
    let id = load_identity(certs).map_err(std::io::Error::other)?;
    let trust = TrustConfig {
        trust_domain: "cluster.local".into(),
        aliases: Vec::new(),
        federated: Default::default(),
    };
    let alpn: Vec<&[u8]> = alpn.iter().map(|a| a.as_bytes()).collect();
    let config = client_config(&id, &trust, None, &alpn).map_err(std::io::Error::other)?;
    let exchange = async {
        let tcp = match from {
            None => TcpStream::connect(gw).await?,
            Some(ip) => {
                let socket = match ip {
                    std::net::IpAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
                    std::net::IpAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
                };
                socket.bind(SocketAddr::new(ip, 0))?;
                socket.connect(gw).await?
            }
        };
        let name = ServerName::try_from(sni.to_string()).map_err(std::io::Error::other)?;
        let mut tls = tokio_rustls::TlsConnector::from(config)
            .connect(name, tcp)
            .await?;
        let negotiated = tls
            .get_ref()
            .1
            .alpn_protocol()
            .map(|p| String::from_utf8_lossy(p).into_owned());
        tls.write_all(b"who\n").await?;
        let mut line = Vec::new();
        let mut byte = [0u8; 1];
        loop {
            match tls.read(&mut byte).await? {
                0 => break,
                _ if byte[0] == b'\n' => break,
                _ => line.push(byte[0]),
            }
        }
        if line.is_empty() {
            return Err(std::io::Error::other("closed without an answer"));
        }
        Ok((String::from_utf8_lossy(&line).into_owned(), negotiated))
    };
    tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .map_err(|_| std::io::Error::other("no answer in 10 s"))?
}

/// A server certificate accepted without verification, for clients that test only the
/// server's side (`tests/hbone.rs`) and for the benches' load generator.
///
/// In the benches: a client's side of an mTLS handshake costs about what a server's does (a P-256
/// signature, three verifications, a key exchange), and the bench's clients share one core
/// with the workloads: verifying every proxy's chain and CertificateVerify kept the
/// handshake rates bounded by that core rather than by the proxy. The proxies do all of
/// their work as before (each verifies the client's chain and signature in full); only the
/// client skips checking the proxy, the same for every proxy. The chain each proxy presents
/// is checked once, when it is started (each bench's `start_proxy` probe verifies it).
#[derive(Debug)]
pub struct Unverified(pub std::sync::Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for Unverified {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }
    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
