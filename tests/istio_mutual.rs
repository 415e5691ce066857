//! ISTIO_MUTUAL end to end: certificates made with the `strait ca` / `strait cert`
//! commands, the gateway terminating mTLS, policy deciding, plaintext to a sidecar-less
//! workload; refusals counted under their own reasons; certificate rotation.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime};

use common::*;
use rustls::pki_types::ServerName;
use strait::tls::{TrustConfig, client_config, load_identity};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const ECHO: &str = "echo.default.svc.cluster.local";
const GW_ID: &str = "spiffe://cluster.local/ns/istio-system/sa/eastwest";

fn strait(args: &[&str]) {
    let out = Command::new(strait_bin()).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "strait {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn ca_init(dir: &Path, td: &str) -> PathBuf {
    let p = dir.join(format!("ca-{td}"));
    strait(&[
        "ca",
        "init",
        "--trust-domain",
        td,
        "--out",
        p.to_str().unwrap(),
    ]);
    p
}

fn issue(ca: &Path, id: &str, out: &Path) -> PathBuf {
    strait(&[
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

fn config(ports: &Ports, certs: &Path, echo_port: u16, policies: &str) -> String {
    format!(
        r#"{bootstrap}---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {{name: mtls, namespace: istio-system}}
spec:
  servers:
  - port: {{number: {gw}, name: tls, protocol: TLS}}
    bind: 127.0.0.1
    tls: {{mode: ISTIO_MUTUAL}}
    hosts: ["*.local"]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: echo, namespace: default}}
spec:
  hosts: [{ECHO}]
  ports: [{{number: 9080, name: tcp, targetPort: {echo_port}}}]
  resolution: STATIC
  endpoints:
  - address: 127.0.0.1
    labels: {{app: echo, security.istio.io/tlsMode: disabled}}
{policies}"#,
        bootstrap = ports.bootstrap(&format!(
            "  trustDomain: cluster.local\n  trustDomainAliases: [old.local]\n  certificates: {{dir: {}}}\n",
            certs.display()
        )),
        gw = ports.gateway,
    )
}

/// Connects with the client identity in `certs`; the gateway must present `GW_ID`.
async fn mtls_connect(
    gw: std::net::SocketAddr,
    certs: &Path,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let mut tls = mtls_handshake(gw, certs).await?;
    // TLS 1.3 reports a refused client certificate only on the first read.
    tls.write_all(b"ping\n").await?;
    let mut back = [0u8; 5];
    tls.read_exact(&mut back).await?;
    assert_eq!(&back, b"ping\n");
    Ok(tls)
}

/// The handshake alone: presents the identity in `certs`, trusts the mesh root, and
/// requires the gateway to present `GW_ID`.
async fn mtls_handshake(
    gw: std::net::SocketAddr,
    certs: &Path,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let mut id = load_identity(certs).unwrap();
    // Whatever the client presents, it trusts the mesh root to verify the gateway.
    id.roots = load_identity(&certs.parent().unwrap().join("gw"))
        .unwrap()
        .roots;
    let trust = TrustConfig {
        trust_domain: "cluster.local".into(),
        aliases: vec!["old.local".into()],
        federated: Default::default(),
    };
    let expected = strait::tls::SpiffeId::parse(GW_ID).unwrap();
    let config = client_config(&id, &trust, Some(&expected), &[b"istio"]).unwrap();
    let tcp = TcpStream::connect(gw).await?;
    let name = ServerName::try_from(format!("outbound_.9080_._.{ECHO}")).unwrap();
    tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
}

struct Setup {
    dir: TempDir,
    mesh_ca: PathBuf,
    gw_certs: PathBuf,
}

impl Setup {
    /// A mesh client certificate for `spiffe://cluster.local/ns/foo/sa/sleep`, in `dir`.
    fn sleep(&self, dir: &str) -> PathBuf {
        issue(
            &self.mesh_ca,
            "spiffe://cluster.local/ns/foo/sa/sleep",
            &self.dir.path().join(dir),
        )
    }
}

fn setup() -> Setup {
    let dir = TempDir::new("mtls");
    let mesh_ca = ca_init(dir.path(), "cluster.local");
    let gw_certs = issue(&mesh_ca, GW_ID, &dir.path().join("gw"));
    Setup {
        dir,
        mesh_ca,
        gw_certs,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_clients_pass_and_every_bad_certificate_is_refused_with_its_reason() {
    let s = setup();
    let (echo, _task) = plaintext_echo().await;
    let ports = Ports::new();
    let gw = Strait::start(ports, &config(&ports, &s.gw_certs, echo.port(), ""));

    let good = s.sleep("good");
    let mut tls = mtls_connect(gw.gateway, &good).await.unwrap();
    assert_eq!(
        echo_once(&mut tls, b"decrypted and forwarded\n").await,
        b"decrypted and forwarded\n"
    );
    drop(tls);

    let alias = issue(
        &s.mesh_ca,
        "spiffe://old.local/ns/foo/sa/sleep",
        &s.dir.path().join("alias"),
    );
    mtls_connect(gw.gateway, &alias)
        .await
        .expect("trust-domain alias passes");

    let rogue_ca = ca_init(s.dir.path(), "rogue.example");
    let rogue = issue(
        &rogue_ca,
        "spiffe://cluster.local/ns/foo/sa/sleep",
        &s.dir.path().join("rogue"),
    );
    mtls_connect(gw.gateway, &rogue)
        .await
        .expect_err("another CA is refused");

    let foreign = issue(
        &s.mesh_ca,
        "spiffe://other.td/ns/foo/sa/sleep",
        &s.dir.path().join("foreign"),
    );
    mtls_connect(gw.gateway, &foreign)
        .await
        .expect_err("unlisted trust domain is refused");

    let expired_dir = s.dir.path().join("expired");
    let now = SystemTime::now();
    strait::identity::ca::issue_svid_with_validity(
        &s.mesh_ca,
        &strait::tls::SpiffeId::parse("spiffe://cluster.local/ns/foo/sa/sleep").unwrap(),
        &expired_dir,
        now - Duration::from_secs(7200),
        now - Duration::from_secs(3600),
    )
    .unwrap();
    mtls_connect(gw.gateway, &expired_dir)
        .await
        .expect_err("expired cert is refused");

    // No client certificate at all: openssl with only the CA file.
    let out = Command::new("openssl")
        .args([
            "s_client",
            "-connect",
            &gw.gateway.to_string(),
            "-servername",
        ])
        .arg(format!("outbound_.9080_._.{ECHO}"))
        .args(["-alpn", "istio", "-CAfile"])
        .arg(s.gw_certs.join("root-cert.pem"))
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(!text.contains("ping"), "{text}");

    let refused = |reason: &str| {
        gw.metric(
            "strait_refusals_total",
            &[("response_flag", "UAEX"), ("reason", reason)],
        )
    };
    let all_counted = || {
        [
            "no_client_cert",
            "untrusted_chain",
            "untrusted_trust_domain",
            "expired",
        ]
        .iter()
        .all(|r| refused(r) == 1.0)
    };
    assert!(
        gw.eventually(Duration::from_secs(5), all_counted),
        "{:?}",
        gw.access_log()
    );
    // No connection, the alias's included, ends as a refusal of another kind.
    let other = gw.settled(Duration::from_secs(5), Duration::from_millis(300), || {
        refused("other")
    });
    assert_eq!(other, 0.0, "{:?}", gw.access_log());
    let opened = gw.metric(
        "istio_tcp_connections_opened_total",
        &[
            ("connection_security_policy", "mutual_tls"),
            ("source_principal", "spiffe://cluster.local/ns/foo/sa/sleep"),
        ],
    );
    assert_eq!(
        opened,
        1.0,
        "{}",
        gw.metrics_text()
            .lines()
            .filter(|l| l.starts_with("istio_tcp_connections_opened"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    // The access log line is written when the connection ends, after the counter.
    let peers = || -> Vec<String> {
        gw.access_log()
            .iter()
            .filter_map(|l| l["peer_identity"].as_str().map(str::to_string))
            .collect()
    };
    assert!(
        gw.eventually(Duration::from_secs(5), || peers()
            .contains(&"spiffe://cluster.local/ns/foo/sa/sleep".to_string())),
        "{:?}",
        peers()
    );
}

/// `openssl s_client` through the gateway with the client identity in `certs`, offering
/// `alpn` (comma-separated): sends one line and returns (stdout, stderr).
async fn openssl_mtls(
    gw: std::net::SocketAddr,
    certs: &Path,
    alpn: &str,
    line: &str,
) -> (String, String) {
    openssl_mtls_with(gw, certs, &format!("-alpn {alpn}"), line).await
}

/// [`openssl_mtls`] with other `s_client` options.
async fn openssl_mtls_with(
    gw: std::net::SocketAddr,
    certs: &Path,
    options: &str,
    line: &str,
) -> (String, String) {
    let script = format!(
        "(echo {line}; sleep 1) | timeout 10 openssl s_client -no_ign_eof -connect {gw} -servername outbound_.9080_._.{ECHO} {options} -cert {c}/cert-chain.pem -cert_chain {c}/cert-chain.pem -key {c}/key.pem -CAfile {c}/root-cert.pem -verify_return_error",
        c = certs.display()
    );
    let out = tokio::task::spawn_blocking(move || {
        Command::new("sh").arg("-c").arg(script).output().unwrap()
    })
    .await
    .unwrap();
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openssl_client_with_a_mesh_certificate_reaches_the_workload() {
    let s = setup();
    let (echo, _task) = plaintext_echo().await;
    let ports = Ports::new();
    let gw = Strait::start(ports, &config(&ports, &s.gw_certs, echo.port(), ""));
    let client = s.sleep("c");
    let (stdout, stderr) = openssl_mtls(gw.gateway, &client, "istio", "hello-over-mtls").await;
    assert!(
        stdout.contains("hello-over-mtls"),
        "stdout: {stdout}\nstderr: {stderr}"
    );
    assert!(stderr.contains("verify return:1"), "{stderr}");
    assert!(stdout.contains("ALPN protocol: istio\n"), "{stdout}");
}

/// What Envoy does on istiod's ISTIO_MUTUAL gateway chains (`alpn_protocols`
/// `istio-peer-exchange, h2, http/1.1`): a client offering `h2` or `http/1.1` (curl, a
/// gRPC client) gets it, and one whose offer matches nothing is served without ALPN
/// rather than refused. A sidecar's offer still gets `istio`, never `istio-peer-exchange`,
/// whose metadata exchange strait does not speak.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_offering_any_alpn_are_served_and_get_the_protocol_envoy_would_pick() {
    let s = setup();
    let (echo, _task) = plaintext_echo().await;
    let ports = Ports::new();
    let gw = Strait::start(ports, &config(&ports, &s.gw_certs, echo.port(), ""));
    let client = s.sleep("c");
    let cases = [
        ("h2,http/1.1", "ALPN protocol: h2\n"),
        ("http/1.1", "ALPN protocol: http/1.1\n"),
        ("istio-peer-exchange,istio", "ALPN protocol: istio\n"),
        ("acme-tls/1", "No ALPN negotiated"),
    ];
    for (i, (offer, negotiated)) in cases.iter().enumerate() {
        let line = format!("alpn-case-{i}");
        let (stdout, stderr) = openssl_mtls(gw.gateway, &client, offer, &line).await;
        assert!(
            stdout.contains(&line),
            "offer {offer}: the line did not come back\nstdout: {stdout}\nstderr: {stderr}"
        );
        assert!(stdout.contains(negotiated), "offer {offer}: {stdout}");
    }
    assert_eq!(
        gw.metric("istio_tcp_connections_opened_total", &[]),
        cases.len() as f64,
        "{}",
        gw.metrics_text()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorization_policy_allows_and_denies_by_principal_and_namespace() {
    let s = setup();
    let (echo, _task) = plaintext_echo().await;
    let ports = Ports::new();
    let policies = r#"---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-foo, namespace: istio-system}
spec:
  action: ALLOW
  rules:
  - from:
    - source: {principals: ["cluster.local/ns/foo/*"]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-curl, namespace: istio-system}
spec:
  action: DENY
  rules:
  - from:
    - source: {principals: ["*/sa/curl"]}
"#;
    let gw = Strait::start(ports, &config(&ports, &s.gw_certs, echo.port(), policies));
    let id = |p: &str, n: &str| issue(&s.mesh_ca, p, &s.dir.path().join(n));
    mtls_connect(
        gw.gateway,
        &id("spiffe://cluster.local/ns/foo/sa/sleep", "a"),
    )
    .await
    .expect("allowed by allow-foo");
    mtls_connect(
        gw.gateway,
        &id("spiffe://cluster.local/ns/foo/sa/curl", "b"),
    )
    .await
    .expect_err("deny-curl wins over allow-foo");
    mtls_connect(
        gw.gateway,
        &id("spiffe://cluster.local/ns/bar/sa/sleep", "c"),
    )
    .await
    .expect_err("no ALLOW policy matches");
    let refused = |reason: &str| gw.metric("strait_refusals_total", &[("reason", reason)]);
    assert!(
        gw.eventually(Duration::from_secs(5), || refused("denied_by_policy")
            == 1.0
            && refused("not_allowed_by_policy") == 1.0),
        "{:?}",
        gw.access_log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotating_certificates_keeps_open_connections_and_serves_the_new_one() {
    let s = setup();
    let (echo, _task) = plaintext_echo().await;
    let ports = Ports::new();
    let gw = Strait::start(ports, &config(&ports, &s.gw_certs, echo.port(), ""));
    let client = s.sleep("c");
    let mut open = mtls_connect(gw.gateway, &client).await.unwrap();
    let first = open.get_ref().1.peer_certificates().unwrap()[0].clone();

    // Rotate: a new CA (root and all) and a new gateway SVID, written in place.
    let new_ca = ca_init(s.dir.path(), "cluster.local-2");
    let staged = s.dir.path().join("staged");
    issue(&new_ca, GW_ID, &staged);
    for f in ["cert-chain.pem", "key.pem", "root-cert.pem"] {
        let tmp = s.gw_certs.join(format!(".{f}.tmp"));
        std::fs::copy(staged.join(f), &tmp).unwrap();
        std::fs::rename(&tmp, s.gw_certs.join(f)).unwrap();
    }
    let new_client = issue(
        &new_ca,
        "spiffe://cluster.local/ns/foo/sa/sleep",
        &s.dir.path().join("c2"),
    );
    let mut rotated = None;
    for _ in 0..100 {
        if let Ok(tls) = mtls_connect(gw.gateway, &new_client).await {
            rotated = Some(tls);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let rotated = rotated.expect("new handshakes use the rotated certificate and root");
    let second = rotated.get_ref().1.peer_certificates().unwrap()[0].clone();
    assert_ne!(first, second, "gateway presents the new certificate");
    // The connection opened before the rotation still flows.
    assert_eq!(echo_once(&mut open, b"still here\n").await, b"still here\n");
    // A client of the old CA, whose chain passed (and whose signatures were remembered)
    // before the rotation, no longer chains to a trusted root.
    mtls_connect(gw.gateway, &client)
        .await
        .expect_err("the old CA's client is refused after the rotation");
    assert!(
        gw.eventually(Duration::from_secs(5), || gw
            .metric("strait_refusals_total", &[("reason", "untrusted_chain")])
            == 1.0),
        "{:?}",
        gw.access_log()
    );
}

/// A meshed workload that requires a mesh client certificate and reports the peer's
/// SPIFFE ID in its first line, then echoes.
async fn mtls_workload(certs: &Path) -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    let id = load_identity(certs).unwrap();
    let trust = TrustConfig {
        trust_domain: "cluster.local".into(),
        aliases: vec![],
        federated: Default::default(),
    };
    let config = strait::tls::server_config(&id, &trust, &[b"istio"]).unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let task = tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else {
                continue;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(s).await else {
                    return;
                };
                let peer = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
                let id = strait::tls::peer_spiffe_id(&peer).unwrap();
                let _ = tls.write_all(format!("peer {id}\n").as_bytes()).await;
                let _ = tls.flush().await;
                let mut buf = vec![0u8; 4096];
                loop {
                    match tls.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            // Flushed: rustls may hold what the socket did not take.
                            if tls.write_all(&buf[..n]).await.is_err() || tls.flush().await.is_err()
                            {
                                break;
                            }
                        }
                    }
                }
            });
        }
    });
    (addr, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destination_rule_istio_mutual_re_encrypts_with_the_gateway_identity() {
    let s = setup();
    let workload_certs = issue(
        &s.mesh_ca,
        "spiffe://cluster.local/ns/default/sa/echo",
        &s.dir.path().join("wl"),
    );
    let (wl, _task) = mtls_workload(&workload_certs).await;
    let ports = Ports::new();
    let dr = format!(
        "---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: echo, namespace: default}}\nspec:\n  host: {ECHO}\n  trafficPolicy:\n    tls: {{mode: ISTIO_MUTUAL}}\n"
    );
    let gw = Strait::start(ports, &config(&ports, &s.gw_certs, wl.port(), &dr));
    let client = s.sleep("c");
    let mut tls = mtls_handshake(gw.gateway, &client).await.unwrap();
    let mut first = vec![0u8; format!("peer {GW_ID}\n").len()];
    tls.read_exact(&mut first).await.unwrap();
    // The workload's mTLS peer is the gateway, not the original client.
    assert_eq!(String::from_utf8(first).unwrap(), format!("peer {GW_ID}\n"));
    assert_eq!(
        echo_once(&mut tls, b"re-encrypted\n").await,
        b"re-encrypted\n"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_expiry_is_exported() {
    let s = setup();
    let (echo, _task) = plaintext_echo().await;
    let ports = Ports::new();
    let gw = Strait::start(ports, &config(&ports, &s.gw_certs, echo.port(), ""));
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs() as f64;
    let leaf = gw.metric("strait_cert_expiry_timestamp_seconds", &[("role", "leaf")]);
    // `strait cert issue` defaults to 24h.
    assert!(
        leaf > now + 23.0 * 3600.0 && leaf < now + 25.0 * 3600.0,
        "{leaf} vs {now}"
    );
    assert!(gw.metric("strait_cert_expiry_timestamp_seconds", &[("role", "root")]) > leaf);
}

#[test]
fn a_missing_gateway_certificate_is_a_clear_error_at_start() {
    let dir = TempDir::new("nocert");
    let ports = Ports::new();
    let missing = dir.path().join("no-such-dir");
    let path = dir.write("strait.yaml", &config(&ports, &missing, 1, ""));
    let out = Command::new(strait_bin())
        .args(["run", "-c"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&missing.join("cert-chain.pem").display().to_string()),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// Runs openssl without a client certificate; returns what came back.
async fn openssl_without_cert(gw: std::net::SocketAddr, roots: &Path) -> String {
    let roots = roots.to_path_buf();
    tokio::task::spawn_blocking(move || {
        let script = format!(
            "(echo anonymous-hello; sleep 1) | timeout 10 openssl s_client -quiet -no_ign_eof -connect {gw} -servername outbound_.9080_._.{ECHO} -alpn istio -CAfile {}",
            roots.display()
        );
        let out = Command::new("sh").arg("-c").arg(script).output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permissive_peer_authentication_admits_clients_without_a_certificate() {
    let s = setup();
    let (echo, _task) = plaintext_echo().await;
    let permissive = "---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: default, namespace: istio-system}\nspec:\n  mtls: {mode: PERMISSIVE}\n";
    let ports = Ports::new();
    let gw = Strait::start(ports, &config(&ports, &s.gw_certs, echo.port(), permissive));
    let roots = s.gw_certs.join("root-cert.pem");
    assert!(
        openssl_without_cert(gw.gateway, &roots)
            .await
            .contains("anonymous-hello")
    );
    // A presented certificate must still verify.
    let rogue_ca = ca_init(s.dir.path(), "rogue.example");
    let rogue = issue(
        &rogue_ca,
        "spiffe://cluster.local/ns/foo/sa/sleep",
        &s.dir.path().join("rogue"),
    );
    mtls_connect(gw.gateway, &rogue)
        .await
        .expect_err("an untrusted certificate is still refused");
    drop(gw);

    // Istio's idiom for "authenticated only": DENY notPrincipals ["*"].
    let deny_anonymous = format!(
        "{permissive}---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: require-identity, namespace: istio-system}}\nspec:\n  action: DENY\n  rules:\n  - from:\n    - source: {{notPrincipals: [\"*\"]}}\n"
    );
    let ports = Ports::new();
    let gw = Strait::start(
        ports,
        &config(&ports, &s.gw_certs, echo.port(), &deny_anonymous),
    );
    assert!(
        !openssl_without_cert(gw.gateway, &roots)
            .await
            .contains("anonymous-hello")
    );
    let good = s.sleep("good");
    mtls_connect(gw.gateway, &good)
        .await
        .expect("an identified client passes");
    assert!(gw.eventually(Duration::from_secs(5), || {
        gw.metric("strait_refusals_total", &[("reason", "denied_by_policy")]) == 1.0
    }));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_weighted_tcp_route_splits_connections_by_weight_and_weight_zero_gets_none() {
    let s = setup();
    let (a, _ta) = named_server("a").await;
    let (b, _tb) = named_server("b").await;
    let (c, _tc) = named_server("c").await;
    let ports = Ports::new();
    let entry = |name: &str, port: u16| {
        format!(
            "---\napiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: {name}, namespace: default}}\nspec:\n  hosts: [{name}.default.svc.cluster.local]\n  ports: [{{number: 9080, name: tcp, targetPort: {port}}}]\n  resolution: STATIC\n  endpoints: [{{address: 127.0.0.1}}]\n"
        )
    };
    let routes = format!(
        "{}{}{}---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: split, namespace: istio-system}}\nspec:\n  hosts: [\"*.local\"]\n  gateways: [mtls]\n  tcp:\n  - match: [{{port: 1}}]\n    route: [{{destination: {{host: c.default.svc.cluster.local}}}}]\n  - match: [{{port: {gw}}}]\n    route:\n    - destination: {{host: a.default.svc.cluster.local, port: {{number: 9080}}}}\n      weight: 80\n    - destination: {{host: b.default.svc.cluster.local, port: {{number: 9080}}}}\n      weight: 20\n    - destination: {{host: c.default.svc.cluster.local, port: {{number: 9080}}}}\n      weight: 0\n",
        entry("a", a.port()),
        entry("b", b.port()),
        entry("c", c.port()),
        gw = ports.gateway,
    );
    let gw = Strait::start(ports, &config(&ports, &s.gw_certs, 1, &routes));
    let client = s.sleep("client");

    // 1,000 connections, 8 at a time; each asks once who answers.
    const N: usize = 1000;
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (next, client, addr) = (next.clone(), client.clone(), gw.gateway);
        tasks.push(tokio::spawn(async move {
            let mut got = Vec::new();
            while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < N {
                let mut tls = mtls_handshake(addr, &client).await.unwrap();
                tls.write_all(b"who\n").await.unwrap();
                let mut answer = [0u8; 2];
                tls.read_exact(&mut answer).await.unwrap();
                got.push(answer[0]);
            }
            got
        }));
    }
    let mut count = std::collections::BTreeMap::<u8, usize>::new();
    for t in tasks {
        for who in t.await.unwrap() {
            *count.entry(who).or_default() += 1;
        }
    }
    let to = |who: u8| count.get(&who).copied().unwrap_or(0);
    assert_eq!(to(b'a') + to(b'b'), N, "{count:?}");
    assert!(
        (750..=850).contains(&to(b'a')),
        "{count:?}: 80 % expected on a"
    );
    assert_eq!(
        to(b'c'),
        0,
        "weight 0, and a rule for another port: {count:?}"
    );
    let picks = |svc: &str| {
        gw.metric(
            "strait_route_destination_total",
            &[
                ("virtual_service", "istio-system/split"),
                ("destination_service", svc),
            ],
        )
    };
    assert_eq!(picks("a.default.svc.cluster.local"), to(b'a') as f64);
    assert_eq!(picks("b.default.svc.cluster.local"), to(b'b') as f64);
}

/// The group `openssl s_client` reports the key exchange used (`Server Temp Key:`),
/// or `None` when no handshake completed.
fn temp_key(out: &str) -> Option<String> {
    out.lines()
        .find_map(|l| l.strip_prefix("Server Temp Key: "))
        .map(|k| k.split(',').map(str::trim).collect::<Vec<_>>().join(" "))
}

/// Key exchange as Envoy's terminating server offers it, shown beside a real Envoy with
/// the same certificate and its default TLS parameters: a client whose first key share
/// is P-384 (rustls' own clients now send that first) gets the group Envoy asks it for
/// instead, with a HelloRetryRequest, and a client offering P-384 alone is refused by
/// both. Between X25519 and P-256 strait keeps the client's order where Envoy asks for
/// X25519 again (below).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_exchange_groups_are_the_ones_envoy_offers() {
    let s = setup();
    let (echo, _task) = plaintext_echo().await;
    let ports = Ports::new();
    let gw = Strait::start(ports, &config(&ports, &s.gw_certs, echo.port(), ""));
    let listen = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
    let admin = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
    let Some(envoy) = xds::Envoy::launch(
        &xds::mtls_envoy_bootstrap(listen, admin, echo, &s.gw_certs, None),
        admin,
        xds::EnvoyOptions {
            delta: true,
            listener: listen,
        },
        None,
    )
    .await
    else {
        return;
    };
    let client = s.sleep("groups");
    for groups in [
        "P-384:X25519",
        "P-384:P-256",
        "P-256:X25519",
        "X25519:P-256",
        "X25519",
        "P-256",
        "P-384",
    ] {
        let mut seen = Vec::new();
        for (who, addr) in [("strait", gw.gateway), ("envoy", listen)] {
            let (out, err) = openssl_mtls_with(
                addr,
                &client,
                &format!("-alpn istio -groups {groups}"),
                "through-the-gateway",
            )
            .await;
            let group = temp_key(&out);
            if who == "strait" {
                // Through strait the line also comes back: the handshake is the real one.
                // (It may follow the dump of a session ticket on the same line.)
                assert_eq!(
                    group.is_some(),
                    out.contains("through-the-gateway"),
                    "{groups}: a handshake must carry the line\n{out}\n{err}"
                );
            }
            seen.push((who, group));
        }
        if groups == "P-256:X25519" {
            // The one deliberate difference: Envoy's server prefers its own order and asks
            // a client whose key share is P-256 for X25519 with a HelloRetryRequest, a
            // round trip and a second key share for a group no cheaper; strait takes the
            // client's first cheap group as it comes.
            assert_eq!(
                (seen[0].1.as_deref(), seen[1].1.as_deref()),
                (Some("ECDH prime256v1 256 bits"), Some("X25519 253 bits")),
                "{}",
                envoy.log()
            );
            continue;
        }
        assert_eq!(
            seen[0].1,
            seen[1].1,
            "groups {groups}: strait and Envoy differ: {seen:?}\n{}",
            envoy.log()
        );
        if groups == "P-384" {
            assert_eq!(seen[0].1, None, "P-384 alone was accepted: {seen:?}");
        } else {
            assert!(
                seen[0].1.as_deref().is_some_and(|g| !g.contains("384")),
                "groups {groups}: {seen:?}"
            );
        }
    }
}

/// mTLS through strait as a rustls client offering `groups` in this order (rustls sends a
/// key share for the first); the group agreed, how the handshake went (with or without a
/// HelloRetryRequest) and the line that came back through the gateway.
async fn rustls_mtls_offering(
    gw: std::net::SocketAddr,
    certs: &Path,
    groups: &[rustls::NamedGroup],
) -> std::io::Result<(rustls::NamedGroup, rustls::HandshakeKind, String)> {
    let config = mesh_client_config(certs, groups, rustls::ALL_VERSIONS, &["istio"])
        .map_err(std::io::Error::other)?;
    let tcp = TcpStream::connect(gw).await?;
    let name = ServerName::try_from(format!("outbound_.9080_._.{ECHO}")).unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await?;
    let (_, conn) = tls.get_ref();
    let group = conn
        .negotiated_key_exchange_group()
        .map(|g| g.name())
        .ok_or_else(|| std::io::Error::other("no group after the handshake"))?;
    let kind = conn
        .handshake_kind()
        .ok_or_else(|| std::io::Error::other("no handshake kind"))?;
    tls.write_all(b"kx\n").await?;
    let mut back = [0u8; 3];
    tokio::time::timeout(Duration::from_secs(10), tls.read_exact(&mut back))
        .await
        .map_err(std::io::Error::other)??;
    Ok((group, kind, String::from_utf8_lossy(&back).into_owned()))
}

/// What strait's server does with a rustls client's offer, key share first: the first
/// group of the client's list that strait accepts wins; when the client sent no key share
/// for it (its first group is P-384, as rustls' own clients have sent it), strait asks with
/// a HelloRetryRequest instead of paying for P-384; between the cheap groups the client's
/// order stands (no extra round trip for it); P-384 alone is refused. With aws-lc-rs, a
/// client offering the post-quantum hybrid X25519MLKEM768 first gets it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_exchange_follows_the_clients_order_among_the_groups_strait_accepts() {
    use rustls::HandshakeKind::{Full, FullWithHelloRetryRequest};
    use rustls::NamedGroup::{X25519, secp256r1, secp384r1};
    let s = setup();
    let (echo, _task) = plaintext_echo().await;
    let ports = Ports::new();
    let gw = Strait::start(ports, &config(&ports, &s.gw_certs, echo.port(), ""));
    let client = s.sleep("kx");
    let mut cases = vec![
        (
            vec![secp384r1, X25519],
            Some((X25519, FullWithHelloRetryRequest)),
        ),
        (
            vec![secp384r1, secp256r1],
            Some((secp256r1, FullWithHelloRetryRequest)),
        ),
        (vec![X25519, secp256r1], Some((X25519, Full))),
        (vec![secp256r1, X25519], Some((secp256r1, Full))),
        (vec![secp384r1], None),
    ];
    if strait::tls::provider::POST_QUANTUM {
        use rustls::NamedGroup::X25519MLKEM768;
        cases.extend([
            (vec![X25519MLKEM768, X25519], Some((X25519MLKEM768, Full))),
            (vec![X25519, X25519MLKEM768], Some((X25519, Full))),
            (
                vec![secp384r1, X25519MLKEM768],
                Some((X25519MLKEM768, FullWithHelloRetryRequest)),
            ),
        ]);
    }
    for (groups, expected) in cases {
        let got = rustls_mtls_offering(gw.gateway, &client, &groups).await;
        match expected {
            Some((group, kind)) => {
                let (g, k, line) = got.unwrap_or_else(|e| panic!("{groups:?}: {e}"));
                assert_eq!((g, k), (group, kind), "offering {groups:?}");
                assert_eq!(line, "kx\n", "offering {groups:?}");
            }
            None => assert!(got.is_err(), "offering {groups:?}: {got:?}"),
        }
    }
}

/// The TLS 1.3 cipher suite `openssl s_client` reports (`Cipher is …`), or `None` when no
/// handshake completed.
fn cipher(out: &str) -> Option<String> {
    out.lines()
        .find_map(|l| l.split_once(", Cipher is "))
        .map(|(_, c)| c.trim().to_string())
}

/// The TLS 1.3 cipher suite, beside a real Envoy with the same certificate and its default
/// TLS parameters: BoringSSL's server (on a CPU with AES instructions) scores the AES-GCM
/// suites and ChaCha20-Poly1305 alike and keeps the client's order between them, and so does
/// strait. A client listing AES-256-GCM first (rustls, OpenSSL) gets it from both; an Envoy
/// sidecar lists AES-128-GCM first and gets that, and so does strait's own client (the
/// Bridge's and re-encryption's configuration), which offers the suites in Envoy's order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cipher_suite_is_the_clients_first_as_envoy_picks_it() {
    let s = setup();
    let (echo, _task) = plaintext_echo().await;
    let ports = Ports::new();
    let gw = Strait::start(ports, &config(&ports, &s.gw_certs, echo.port(), ""));
    let listen = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
    let admin = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
    let Some(envoy) = xds::Envoy::launch(
        &xds::mtls_envoy_bootstrap(listen, admin, echo, &s.gw_certs, None),
        admin,
        xds::EnvoyOptions {
            delta: true,
            listener: listen,
        },
        None,
    )
    .await
    else {
        return;
    };
    let client = s.sleep("suites");
    for (suites, first) in [
        (
            "TLS_AES_256_GCM_SHA384:TLS_AES_128_GCM_SHA256",
            "TLS_AES_256_GCM_SHA384",
        ),
        (
            "TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384",
            "TLS_AES_128_GCM_SHA256",
        ),
        (
            "TLS_CHACHA20_POLY1305_SHA256:TLS_AES_128_GCM_SHA256",
            "TLS_CHACHA20_POLY1305_SHA256",
        ),
    ] {
        for (who, addr) in [("strait", gw.gateway), ("envoy", listen)] {
            let (out, err) = openssl_mtls_with(
                addr,
                &client,
                &format!("-alpn istio -tls1_3 -ciphersuites {suites}"),
                "through-the-gateway",
            )
            .await;
            assert_eq!(
                cipher(&out).as_deref(),
                Some(first),
                "{who}, client offering {suites}\n{out}\n{err}\n{}",
                envoy.log()
            );
            if who == "strait" {
                // The echo may follow a ticket's dump on the same line.
                assert!(
                    out.contains("through-the-gateway"),
                    "{suites}: {out}\n{err}"
                );
            }
        }
    }
    let ours = resuming_client(&client);
    for (who, addr) in [("strait", gw.gateway), ("envoy", listen)] {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let name = ServerName::try_from(format!("outbound_.9080_._.{ECHO}")).unwrap();
        let tls = tokio_rustls::TlsConnector::from(ours.clone())
            .connect(name, tcp)
            .await
            .unwrap_or_else(|e| panic!("strait's client to {who}: {e}"));
        assert_eq!(
            tls.get_ref().1.negotiated_cipher_suite().map(|s| s.suite()),
            Some(rustls::CipherSuite::TLS13_AES_128_GCM_SHA256),
            "strait's client, served by {who}"
        );
    }
}

/// A client configuration for the identity in `certs` (trusting the mesh root, requiring
/// `GW_ID`) that keeps its TLS 1.3 tickets across connections, as strait's own clients do.
fn resuming_client(certs: &Path) -> std::sync::Arc<rustls::ClientConfig> {
    let mut id = load_identity(certs).unwrap();
    id.roots = load_identity(&certs.parent().unwrap().join("gw"))
        .unwrap()
        .roots;
    let trust = TrustConfig {
        trust_domain: "cluster.local".into(),
        aliases: vec!["old.local".into()],
        federated: Default::default(),
    };
    let expected = strait::tls::SpiffeId::parse(GW_ID).unwrap();
    client_config(&id, &trust, Some(&expected), &[b"istio"]).unwrap()
}

/// One connection with `config`: how its handshake went and whether a line came back
/// through the gateway.
async fn exchange_with(
    gw: std::net::SocketAddr,
    config: &std::sync::Arc<rustls::ClientConfig>,
) -> (Option<rustls::HandshakeKind>, bool) {
    let tcp = TcpStream::connect(gw).await.unwrap();
    let name = ServerName::try_from(format!("outbound_.9080_._.{ECHO}")).unwrap();
    let Ok(mut tls) = tokio_rustls::TlsConnector::from(config.clone())
        .connect(name, tcp)
        .await
    else {
        return (None, false);
    };
    let kind = tls.get_ref().1.handshake_kind();
    let echoed = async {
        tls.write_all(b"ping\n").await?;
        let mut back = [0u8; 5];
        tls.read_exact(&mut back).await?;
        std::io::Result::Ok(&back == b"ping\n")
    };
    let echoed = tokio::time::timeout(Duration::from_secs(10), echoed)
        .await
        .is_ok_and(|r| r.unwrap_or(false));
    (kind, echoed)
}

/// A resumed session carries the identity its full handshake verified, and that identity
/// goes through AuthorizationPolicy again on every connection: a client denied by policy
/// still completes the TLS handshake (and receives tickets, as from Envoy), and resuming
/// with them gets it refused again, not let through without an identity.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resumed_session_is_authorized_again_on_every_connection() {
    use rustls::HandshakeKind::{Full, Resumed};
    let s = setup();
    let (echo, _task) = plaintext_echo().await;
    let ports = Ports::new();
    let policies = r#"---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-curl, namespace: istio-system}
spec:
  action: DENY
  rules:
  - from:
    - source: {principals: ["cluster.local/ns/foo/sa/curl"]}
"#;
    let gw = Strait::start(ports, &config(&ports, &s.gw_certs, echo.port(), policies));
    let sleep = resuming_client(&s.sleep("sleep"));
    let curl = resuming_client(&issue(
        &s.mesh_ca,
        "spiffe://cluster.local/ns/foo/sa/curl",
        &s.dir.path().join("curl"),
    ));
    assert_eq!(exchange_with(gw.gateway, &sleep).await, (Some(Full), true));
    assert_eq!(
        exchange_with(gw.gateway, &sleep).await,
        (Some(Resumed), true)
    );
    assert_eq!(exchange_with(gw.gateway, &curl).await, (Some(Full), false));
    assert_eq!(
        exchange_with(gw.gateway, &curl).await,
        (Some(Resumed), false),
        "the denied client resumed and was let through"
    );
    let counted = || {
        (
            gw.metric("strait_refusals_total", &[("reason", "denied_by_policy")]),
            gw.metric(
                "strait_tls_handshakes_total",
                &[("role", "server"), ("session", "resumed")],
            ),
        )
    };
    assert!(
        gw.eventually(Duration::from_secs(5), || counted() == (2.0, 2.0)),
        "{:?}\n{:?}",
        counted(),
        gw.access_log()
    );
    let denied: Vec<_> = gw
        .access_log()
        .iter()
        .filter(|l| l["response_flag"] == "UAEX")
        .map(|l| l["peer_identity"].clone())
        .collect();
    assert_eq!(
        denied,
        vec![
            serde_json::json!("spiffe://cluster.local/ns/foo/sa/curl"),
            serde_json::json!("spiffe://cluster.local/ns/foo/sa/curl"),
        ]
    );
}

/// A session never outlives a certificate it was made with: a ticket lives for hours, a
/// client certificate may expire before it, and a resumed connection whose client chain
/// has expired since is refused as `expired`, as its full handshake would be; other
/// clients are served on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_does_not_resume_past_its_client_certificate() {
    use rustls::HandshakeKind::{Full, Resumed};
    let s = setup();
    let (echo, _task) = plaintext_echo().await;
    let ports = Ports::new();
    let gw = Strait::start(ports, &config(&ports, &s.gw_certs, echo.port(), ""));
    let short = s.dir.path().join("short");
    strait(&[
        "cert",
        "issue",
        "--ca",
        s.mesh_ca.to_str().unwrap(),
        "--id",
        "spiffe://cluster.local/ns/foo/sa/short",
        "--out",
        short.to_str().unwrap(),
        "--valid-for",
        "3s",
    ]);
    let issued = std::time::Instant::now();
    let client = resuming_client(&short);
    assert_eq!(exchange_with(gw.gateway, &client).await, (Some(Full), true));
    assert_eq!(
        exchange_with(gw.gateway, &client).await,
        (Some(Resumed), true)
    );
    // notAfter is the issue time plus 3 s, in whole seconds.
    tokio::time::sleep(
        (issued + Duration::from_secs(5)).saturating_duration_since(std::time::Instant::now()),
    )
    .await;
    assert_eq!(
        exchange_with(gw.gateway, &client).await,
        (Some(Resumed), false),
        "a session resumed past its client certificate's notAfter"
    );
    gw.wait_metric("strait_refusals_total", &[("reason", "expired")], |v| {
        v == 1.0
    });
    let sleep = resuming_client(&s.sleep("sleep"));
    assert_eq!(exchange_with(gw.gateway, &sleep).await, (Some(Full), true));
}

/// How `openssl s_client` says its handshake went: `New` or `Reused`.
fn session_kind(out: &str) -> Option<&'static str> {
    out.lines().find_map(|l| {
        if l.starts_with("Reused, ") {
            Some("Reused")
        } else if l.starts_with("New, ") {
            Some("New")
        } else {
            None
        }
    })
}

/// Tickets are stateless, as Envoy's: a client may present one ticket on several
/// connections (BoringSSL's clients, Envoy sidecars, keep one session per upstream and
/// offer it on every new connection), and each resumes, on strait as on a real Envoy with
/// the same certificate. A reload of the gateway's certificate ends every session made
/// before it: the same ticket then gets a full handshake.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_ticket_resumes_again_as_on_envoy_until_a_reload() {
    let s = setup();
    let (echo, _task) = plaintext_echo().await;
    let ports = Ports::new();
    let gw = Strait::start(ports, &config(&ports, &s.gw_certs, echo.port(), ""));
    let listen = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
    let admin = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
    let Some(envoy) = xds::Envoy::launch(
        &xds::mtls_envoy_bootstrap(listen, admin, echo, &s.gw_certs, None),
        admin,
        xds::EnvoyOptions {
            delta: true,
            listener: listen,
        },
        None,
    )
    .await
    else {
        return;
    };
    let client = s.sleep("tickets");
    for (who, addr) in [("strait", gw.gateway), ("envoy", listen)] {
        let session = s.dir.path().join(format!("{who}.session"));
        let opts = |io: &str| format!("-alpn istio -tls1_3 -sess_{io} {}", session.display());
        let (out, err) =
            openssl_mtls_with(addr, &client, &opts("out"), "through-the-gateway").await;
        assert_eq!(session_kind(&out), Some("New"), "{who}: {out}\n{err}");
        for again in 0..2 {
            let (out, err) =
                openssl_mtls_with(addr, &client, &opts("in"), "through-the-gateway").await;
            assert_eq!(
                session_kind(&out),
                Some("Reused"),
                "{who}, the ticket presented {} times: {out}\n{err}\n{}",
                again + 1,
                envoy.log()
            );
            // The echo may follow a ticket's dump on the same line.
            assert!(out.contains("through-the-gateway"), "{who}: {out}\n{err}");
        }
    }

    // A new gateway SVID from the same CA, written in place: strait reloads.
    let staged = s.dir.path().join("staged");
    issue(&s.mesh_ca, GW_ID, &staged);
    for f in ["cert-chain.pem", "key.pem"] {
        let tmp = s.gw_certs.join(format!(".{f}.tmp"));
        std::fs::copy(staged.join(f), &tmp).unwrap();
        std::fs::rename(&tmp, s.gw_certs.join(f)).unwrap();
    }
    let session = s.dir.path().join("strait.session");
    let opts = format!("-alpn istio -tls1_3 -sess_in {}", session.display());
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (out, err) = openssl_mtls_with(gw.gateway, &client, &opts, "through-the-gateway").await;
        match session_kind(&out) {
            Some("New") => {
                assert!(out.contains("through-the-gateway"), "{out}\n{err}");
                break;
            }
            kind => assert!(
                std::time::Instant::now() < deadline,
                "still {kind:?} 20 s after the reload: {out}\n{err}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
