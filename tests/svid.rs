//! The gateway's SVID from the mesh CA (a fake `IstioCertificateService` on the fake
//! istiod's TLS port): no certificate file anywhere, an ISTIO_MUTUAL handshake a client
//! verifies against the mesh root, rotation without a failed handshake or a dropped
//! connection, a CA that goes away, and answers that must be refused.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::ca::{CaAnswer, FakeCa};
use common::xds::{FakeIstiod, ISTIOD_SERVER_NAME, IstiodOptions};
use common::*;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const GW: &str = "spiffe://cluster.local/ns/istio-system/sa/istio-eastwestgateway";
const CLIENT: &str = "spiffe://cluster.local/ns/default/sa/sleep";
const ECHO: &str = "echo.default.svc.cluster.local";
const TOKEN: &str = "gateway-token";

fn sni() -> String {
    format!("outbound_.9080_._.{ECHO}")
}

struct Setup {
    istiod: FakeIstiod,
    ca: FakeCa,
    ports: Ports,
    echo: SocketAddr,
    dir: TempDir,
}

impl Setup {
    async fn start(ttl: Duration) -> Setup {
        let ca = FakeCa::new(GW);
        ca.set_ttl(ttl);
        let istiod = FakeIstiod::start(IstiodOptions::tls().token(TOKEN).ca(&ca)).await;
        let dir = TempDir::new("svid");
        dir.write("istio-token", TOKEN);
        Setup {
            istiod,
            ca,
            ports: Ports::new(),
            echo: plaintext_echo().await.0,
            dir,
        }
    }

    /// An ISTIO_MUTUAL gateway whose certificates come from the CA; no `certificates.dir`.
    fn config(&self) -> String {
        format!(
            "{}---\napiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {{name: mtls, namespace: istio-system}}\nspec:\n  servers:\n  - port: {{number: {gw}, name: tls, protocol: TLS}}\n    bind: 127.0.0.1\n    tls: {{mode: ISTIO_MUTUAL}}\n    hosts: [\"*.local\"]\n---\napiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: echo, namespace: default}}\nspec:\n  hosts: [{ECHO}]\n  ports: [{{number: 9080, name: tcp, targetPort: {port}}}]\n  resolution: STATIC\n  endpoints:\n  - address: 127.0.0.1\n    labels: {{security.istio.io/tlsMode: disabled}}\n",
            self.ports.bootstrap(&ca_section(
                &self.istiod,
                &self.dir.path().join("istio-token")
            )),
            gw = self.ports.gateway,
            port = self.echo.port(),
        )
    }

    fn start_gateway(&self) -> Strait {
        Strait::spawn(
            self.ports,
            &self.config(),
            &[],
            &[
                ("SERVICE_ACCOUNT", "istio-eastwestgateway"),
                ("POD_NAMESPACE", "istio-system"),
            ],
            &[],
        )
    }

    fn gateway(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.ports.gateway))
    }

    fn mesh(&self) -> &TestCa {
        self.istiod.mesh_ca().expect("TLS fake istiod")
    }
}

fn ca_section(istiod: &FakeIstiod, token: &std::path::Path) -> String {
    format!(
        "  certificates:\n    ca:\n      address: {}\n      serverName: {ISTIOD_SERVER_NAME}\n      rootCert: {}\n      token: {}\n      clusterId: cluster1\n      ttl: 30s\n",
        istiod.addr,
        istiod.root_pem_path().unwrap().display(),
        token.display()
    )
}

/// Verifies the gateway's chain against the mesh root (as a SPIFFE peer: no DNS name, the
/// URI SAN is the identity) and keeps the certificate seen.
#[derive(Debug)]
struct MeshPeer {
    inner: Arc<dyn rustls::server::danger::ClientCertVerifier>,
    seen: Mutex<Option<CertificateDer<'static>>>,
}

impl rustls::client::danger::ServerCertVerifier for MeshPeer {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        now: UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        *self.seen.lock().unwrap() = Some(end_entity.clone().into_owned());
        // Istio SVIDs carry both serverAuth and clientAuth: webpki's path building for a
        // client certificate checks the chain, validity and key usage without a name.
        self.inner
            .verify_client_cert(end_entity, intermediates, now)
            .map(|_| rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(m, c, d)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(m, c, d)
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// An mTLS client with a mesh certificate; returns the stream and the certificate the
/// gateway presented.
async fn mtls(
    gw: SocketAddr,
    mesh: &TestCa,
) -> std::io::Result<(
    tokio_rustls::client::TlsStream<TcpStream>,
    CertificateDer<'static>,
)> {
    let inner = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(mesh.root_store()),
        provider(),
    )
    .build()
    .unwrap();
    let verifier = Arc::new(MeshPeer {
        inner,
        seen: Mutex::new(None),
    });
    let (chain, key) = mesh.issue(CLIENT);
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(verifier.clone())
        .with_client_auth_cert(chain, key)
        .unwrap();
    config.alpn_protocols = vec![b"istio".to_vec()];
    let tcp = TcpStream::connect(gw).await?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from(sni()).unwrap(), tcp)
        .await?;
    let seen = verifier
        .seen
        .lock()
        .unwrap()
        .clone()
        .expect("a certificate");
    Ok((tls, seen))
}

async fn echo(tls: &mut tokio_rustls::client::TlsStream<TcpStream>, line: &[u8]) -> bool {
    if tls.write_all(line).await.is_err() {
        return false;
    }
    let mut buf = vec![0u8; line.len()];
    tokio::time::timeout(Duration::from_secs(5), tls.read_exact(&mut buf))
        .await
        .is_ok_and(|r| r.is_ok())
        && buf == line
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_no_certificate_file_the_gateway_gets_its_svid_from_the_mesh_ca_and_rotates_it() {
    let s = Setup::start(Duration::from_secs(30)).await;
    let gw = s.start_gateway();
    gw.wait_ready(Duration::from_secs(20));

    // What the CA was asked: a CSR whose only SAN is the gateway's SPIFFE ID, with the
    // token and the cluster id.
    let first = &s.ca.requests()[0];
    assert_eq!(first.csr_uris, [GW]);
    assert_eq!(first.authorization.as_deref(), Some("Bearer gateway-token"));
    assert_eq!(first.cluster_id.as_deref(), Some("cluster1"));
    assert_eq!(first.validity_duration, 30);

    // A client verifying against the mesh root sees the gateway's identity.
    let (mut held, cert) = mtls(s.gateway(), s.mesh()).await.expect("mTLS handshake");
    assert_eq!(spiffe_of(&cert), GW);
    assert!(echo(&mut held, b"first\n").await);
    let expiry = gw.metric("strait_cert_expiry_timestamp_seconds", &[("role", "leaf")]);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(
        expiry > now && expiry < now + 40.0,
        "leaf expiry {expiry}, now {now}"
    );

    // Renewed at about half its lifetime: new handshakes get the new certificate, none
    // fails meanwhile, the open connection keeps its session.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut handshakes = 0;
    let renewed = loop {
        assert!(
            Instant::now() < deadline,
            "no renewal within 30 s; stderr:\n{}",
            gw.stderr_text()
        );
        let (mut tls, seen) = mtls(s.gateway(), s.mesh())
            .await
            .unwrap_or_else(|e| panic!("handshake {handshakes} failed during rotation: {e}"));
        assert!(
            echo(&mut tls, b"ping\n").await,
            "handshake {handshakes}: no echo"
        );
        handshakes += 1;
        if seen != cert {
            break seen;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(spiffe_of(&renewed), GW);
    assert!(s.ca.requests().len() >= 2);
    assert!(echo(&mut held, b"across the rotation\n").await);

    // The key is nowhere to be read.
    let (_, dump) = http_get(gw.admin, "/config_dump").unwrap();
    assert!(!dump.contains("PRIVATE KEY"), "{dump}");
    assert!(!gw.stderr_text().contains("PRIVATE KEY"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_answers_are_refused_and_logged_and_the_certificate_held_keeps_serving() {
    let s = Setup::start(Duration::from_secs(10)).await;
    let gw = s.start_gateway();
    gw.wait_ready(Duration::from_secs(20));
    let (mut held, _) = mtls(s.gateway(), s.mesh()).await.unwrap();

    // Each bad kind of answer at a renewal: refused, counted, logged, and the certificate
    // held keeps serving; then a good answer renews it.
    for (answer, reason, log) in [
        (
            CaAnswer::WrongIdentity,
            "wrong_identity",
            "spiffe://cluster.local/ns/default/sa/intruder where",
        ),
        (CaAnswer::Expired, "not_valid_now", "not valid now"),
        (
            CaAnswer::Untrusted,
            "untrusted_chain",
            "does not chain to the mesh root",
        ),
        (CaAnswer::Refuse, "refused", "the CA refused the request"),
        (CaAnswer::ForeignRoot, "untrusted_chain", "is not a root of"),
    ] {
        let (_, current) = mtls(s.gateway(), s.mesh()).await.unwrap();
        s.ca.set_answer(answer);
        assert!(
            gw.eventually(Duration::from_secs(20), || gw
                .metric("strait_ca_failures_total", &[("reason", reason)])
                >= 1.0),
            "{answer:?} not counted; stderr:\n{}",
            gw.stderr_text()
        );
        // The counter is raised before the line is logged: wait for the line too.
        assert!(
            gw.wait_stderr(log, Duration::from_secs(10)),
            "{answer:?}: {}",
            gw.stderr_text()
        );
        let (mut tls, seen) = mtls(s.gateway(), s.mesh()).await.expect("still serving");
        assert_eq!(seen, current, "{answer:?} replaced the certificate");
        assert!(echo(&mut tls, b"still\n").await);
        assert_eq!(http_get(gw.status, "/healthz/ready").unwrap().0, 200);

        s.ca.set_answer(CaAnswer::Good);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let (_, seen) = mtls(s.gateway(), s.mesh()).await.unwrap();
            if seen != current {
                assert_eq!(spiffe_of(&seen), GW);
                break;
            }
            assert!(
                Instant::now() < deadline,
                "never renewed after {answer:?}; stderr:\n{}",
                gw.stderr_text()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    assert!(echo(&mut held, b"held throughout\n").await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn until_the_first_certificate_istio_mutual_is_not_ready_and_the_ca_coming_back_fixes_it() {
    let s = Setup::start(Duration::from_secs(30)).await;
    s.istiod.stop().await;
    let gw = s.start_gateway();
    assert!(gw.eventually(Duration::from_secs(10), || {
        http_get(gw.status, "/healthz/ready").is_ok()
    }));
    assert!(
        gw.eventually(Duration::from_secs(10), || gw
            .metric("strait_ca_failures_total", &[])
            >= 1.0),
        "{}",
        gw.stderr_text()
    );
    let (code, body) = http_get(gw.status, "/healthz/ready").unwrap();
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("no certificate from the mesh CA"), "{body}");
    assert!(
        mtls(s.gateway(), s.mesh()).await.is_err(),
        "served without a certificate"
    );
    assert!(
        gw.wait_stderr("no certificate held", Duration::from_secs(10)),
        "{}",
        gw.stderr_text()
    );

    s.istiod.restart().await;
    gw.wait_ready(Duration::from_secs(30));
    let (mut tls, seen) = mtls(s.gateway(), s.mesh()).await.unwrap();
    assert_eq!(spiffe_of(&seen), GW);
    assert!(echo(&mut tls, b"now\n").await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bridge_and_an_istio_mutual_gateway_with_svids_from_the_ca_cross_networks() {
    // One mesh CA for both sides, each caller known by its token.
    let ca = FakeCa::for_tokens(&[("gateway-token", GATEWAY_ID), ("bridge-token", BRIDGE_ID)]);
    let istiod = FakeIstiod::start(IstiodOptions::tls().token("unused").ca(&ca)).await;
    let dir = TempDir::new("svid-bridge");
    let gw_token = dir.write("gateway-token", "gateway-token");
    let br_token = dir.write("bridge-token", "bridge-token");
    let no_files = dir.path().join("no-certificates-here");
    let workload = plaintext_echo().await.0;

    let gw_ports = Ports::new();
    let gw_config = network2_gateway(
        &gw_ports,
        "127.0.0.2",
        &no_files,
        FarEnd::IstioMutual,
        workload,
    )
    .replace(
        &format!("  certificates: {{dir: {}}}\n", no_files.display()),
        &ca_section(&istiod, &gw_token),
    );
    assert!(!gw_config.contains("certificates: {dir"), "{gw_config}");
    let gateway = Strait::spawn(
        gw_ports,
        &gw_config,
        &[],
        &[
            ("SERVICE_ACCOUNT", "eastwest"),
            ("POD_NAMESPACE", "istio-system"),
        ],
        &[],
    );
    gateway.wait_ready(Duration::from_secs(20));
    let gw_addr = SocketAddr::from(([127, 0, 0, 2], gw_ports.gateway));

    let br_ports = Ports::new();
    let listen = SocketAddr::from(([127, 0, 0, 1], br_ports.gateway));
    let br_config = network1_bridge(&br_ports, listen, &no_files, gw_addr, GATEWAY_ID, &[], "")
        .replace(
            &format!("  certificates: {{dir: {}}}\n", no_files.display()),
            &ca_section(&istiod, &br_token),
        );
    let bridge = Strait::spawn(
        br_ports,
        &br_config,
        &[],
        &[("SERVICE_ACCOUNT", "bridge"), ("POD_NAMESPACE", "default")],
        &[],
    );
    bridge.wait_ready(Duration::from_secs(20));
    assert!(!no_files.exists());

    let mut app = TcpStream::connect(listen).await.unwrap();
    app.write_all(b"no certificate file anywhere\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 29];
    tokio::time::timeout(Duration::from_secs(10), app.read_exact(&mut buf))
        .await
        .expect("answer in time")
        .unwrap_or_else(|e| {
            panic!(
                "{e}\nbridge:\n{}\ngateway:\n{}",
                bridge.stderr_text(),
                gateway.stderr_text()
            )
        });
    assert_eq!(buf, b"no certificate file anywhere\n");
    // Access log lines are written when connections close.
    drop(app);
    let line = gateway
        .wait_log(Duration::from_secs(5), |l| l["peer_identity"] == BRIDGE_ID)
        .expect("the gateway verified the bridge's SVID");
    assert_eq!(line["response_flag"], "-", "{line}");
    let line = bridge
        .wait_log(Duration::from_secs(5), |l| l["peer_identity"] == GATEWAY_ID)
        .expect("the bridge verified the gateway's SVID");
    assert_eq!(line["upstream"], gw_addr.to_string());
}
