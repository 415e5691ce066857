//! The real istiod the way a pod meets it: strait on istiod's 15012, TLS verified by the
//! plugged root and the name `istiod.istio-system.svc`, a projected-style token that
//! istiod verifies with `JWT_RULE` against a JWKS the test serves, and the gateway's SVID
//! from istiod's own CA over the same connection. Each way this goes wrong in a cluster
//! is shown against the real istiod, as the operator sees it: the log line, the metric,
//! and readiness.
//!
//! Same lab as `tests/istiod.rs`: istiod, the JWKS and the clients in a hub network
//! namespace, strait in a spoke. Skipped, loudly, where the harness is missing, except
//! under CI.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::istiod::{
    GATEWAY_LABELS, GATEWAY_SPIFFE, ISTIOD_IP, Istiod, IstiodOptions, Lab, SECURE_XDS_PORT, Spoke,
    harness_bin,
};
use common::jwt::{AUDIENCE, TokenIssuer};
use common::{Ports, Strait, TempDir};

const WAIT: Duration = Duration::from_secs(30);
const POD: &str = "istio-eastwestgateway-strait";
const ISTIOD_NAME: &str = "istiod.istio-system.svc";

/// An ISTIO_MUTUAL server on 15444 routing to a sidecar-less echo workload, so that the
/// gateway's certificate is both needed and visible.
const MUTUAL: &str = "\
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: mutual-gateway, namespace: istio-system}
spec:
  selector: {istio: eastwestgateway}
  servers:
  - port: {number: 15444, name: tls-mutual, protocol: TLS}
    tls: {mode: ISTIO_MUTUAL}
    hosts: [\"*\"]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: echo, namespace: default}
spec:
  hosts: [\"*\"]
  gateways: [istio-system/mutual-gateway]
  tcp:
  - match: [{port: 15444}]
    route:
    - destination: {host: echo.default.svc.cluster.local, port: {number: 7070}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: echo, namespace: default}
spec:
  hosts: [echo.default.svc.cluster.local]
  location: MESH_INTERNAL
  ports: [{number: 7070, name: tcp-echo, protocol: TCP}]
  resolution: STATIC
  endpoints:
  - {address: 10.0.0.51, network: network1, ports: {tcp-echo: 7070}}
";

/// How strait reaches istiod in one case.
struct Secure<'a> {
    token: &'a Path,
    root: &'a Path,
    server_name: &'a str,
}

/// strait in `spoke` on istiod's 15012 as `deploy/strait-eastwest-xds.yaml` runs it:
/// TLS, token, the gateway's SVID from istiod's CA. Does not wait for readiness.
fn launch(spoke: &Spoke, secure: &Secure<'_>) -> Strait {
    let config = format!(
        "apiVersion: strait.dev/v1alpha1
kind: Bootstrap
metadata: {{name: strait}}
spec:
  status: 0.0.0.0:15021
  metrics: 0.0.0.0:15090
  admin: 0.0.0.0:15000
  network: network1
  cluster: cluster1
  labels: {GATEWAY_LABELS}
  discovery:
    address: {ISTIOD_IP}:{SECURE_XDS_PORT}
    serverName: {server_name}
    rootCert: {root}
    token: {token}
    clusterId: cluster1
    initialFetchTimeout: 5s
    node: {{ip: {ip}, podName: {POD}, namespace: istio-system, serviceAccount: istio-eastwestgateway}}
  certificates:
    ca: {{}}
",
        server_name = secure.server_name,
        root = secure.root.display(),
        token = secure.token.display(),
        ip = spoke.ip,
    );
    let ports = Ports {
        gateway: 15443,
        status: 15021,
        metrics: 15090,
        admin: 15000,
    };
    Strait::launch_in_at(
        &spoke.ns,
        IpAddr::V4(spoke.ip),
        ports,
        &config,
        Path::new(common::strait_bin()),
        &[],
    )
}

/// istiod with `JWT_RULE` for `issuer`, the echo server's configuration, and the
/// workload behind it.
async fn istiod_with_tokens(issuer: &TokenIssuer, env: &[(&str, &str)]) -> Istiod {
    let istiod = Istiod::start(IstiodOptions {
        debounce: Some("20ms".into()),
        jwt_rule: Some(issuer.rule()),
        env: env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ..Default::default()
    })
    .await;
    istiod.apply("mutual.yaml", MUTUAL);
    istiod
}

fn write(dir: &TempDir, name: &str, text: &str) -> PathBuf {
    dir.write(name, text)
}

/// `strait_xds_stream_failures_total{reason}` as strait exports it (0 before its
/// metrics listener is up).
fn failures(strait: &Strait, reason: &str) -> f64 {
    common::http_get(strait.metrics, "/stats/prometheus")
        .map(|(_, text)| {
            common::metric_value(
                &text,
                "strait_xds_stream_failures_total",
                &[("reason", reason)],
            )
        })
        .unwrap_or(0.0)
}

/// Who answered an mTLS connection through the ISTIO_MUTUAL server, and the chain the
/// client verified (leaf first), or the error.
async fn through_mutual(
    gateway: SocketAddr,
    client: &Path,
) -> std::io::Result<(String, Vec<rustls::pki_types::CertificateDer<'static>>)> {
    use strait::tls::{TrustConfig, client_config, load_identity};
    let id = load_identity(client).map_err(std::io::Error::other)?;
    let trust = TrustConfig {
        trust_domain: "cluster.local".into(),
        aliases: Vec::new(),
        federated: Default::default(),
    };
    let config =
        client_config(&id, &trust, None, &[b"istio".as_slice()]).map_err(std::io::Error::other)?;
    let tcp = tokio::net::TcpStream::connect(gateway).await?;
    let name = rustls::pki_types::ServerName::try_from("echo.default.svc.cluster.local")
        .map_err(std::io::Error::other)?;
    let mut tls = tokio::time::timeout(
        Duration::from_secs(10),
        tokio_rustls::TlsConnector::from(config).connect(name, tcp),
    )
    .await
    .map_err(|_| std::io::Error::other("handshake timed out"))??;
    let chain = tls
        .get_ref()
        .1
        .peer_certificates()
        .map(|c| c.iter().map(|c| c.clone().into_owned()).collect())
        .unwrap_or_default();
    let answer = common::echo_once(&mut tls, b"who\n").await;
    Ok((String::from_utf8_lossy(&answer).trim().to_string(), chain))
}

fn subject_and_issuer(cert: &rustls::pki_types::CertificateDer<'_>) -> (String, String) {
    let (_, x) = x509_parser::parse_x509_certificate(cert.as_ref()).unwrap();
    (x.subject().to_string(), x.issuer().to_string())
}

/// A pod's path: 15012 with a projected-style token verified by istiod's `JWT_RULE`,
/// the identity check passed, SYNCED; the gateway's SVID from istiod's
/// `CreateCertificate`, served by an ISTIO_MUTUAL server to a client that verifies it
/// against the plugged root, with the root as istiod returned it equal to the file's;
/// renewed, under istiod's short `DEFAULT_WORKLOAD_CERT_TTL`, without a failed handshake.
#[test]
fn a_pods_path_token_tls_and_the_gateway_certificate_from_istiods_ca() {
    if harness_bin().is_none() {
        return;
    }
    let lab = Lab::new("secure");
    lab.run(|| async {
        let dir = TempDir::new("secure");
        let issuer = TokenIssuer::start(dir.path()).await;
        let _echo = common::named_server_at("echo", "10.0.0.51:7070".parse().unwrap()).await;
        // Workload certificates of 20 s, renewed by strait at half their lifetime.
        let istiod = istiod_with_tokens(&issuer, &[("DEFAULT_WORKLOAD_CERT_TTL", "20s")]).await;
        let token = write(
            &dir,
            "istio-token",
            &issuer.token("istio-system", "istio-eastwestgateway", AUDIENCE, 3600),
        );
        let root = istiod.ca_dir().join("root-cert.pem");
        let spoke = lab.spoke("strait");
        let strait = launch(
            &spoke,
            &Secure {
                token: &token,
                root: &root,
                server_name: ISTIOD_NAME,
            },
        );
        let logs = || {
            format!(
                "--- strait\n{}\n--- istiod\n{}",
                strait.stderr_text(),
                istiod.log()
            )
        };
        strait.wait_ready(WAIT);
        let entry = istiod
            .wait_synced(&format!("{POD}.istio-system"), WAIT)
            .await
            .unwrap_or_else(|e| panic!("{e}\n{}", logs()));
        assert_eq!(entry["cluster_id"], "cluster1");

        // The SVID istiod's CA issued, as a client of the ISTIO_MUTUAL server sees it.
        let client = common::mesh_cert(
            &istiod.ca_dir(),
            "spiffe://cluster.local/ns/foo/sa/sleep",
            &dir.path().join("sleep"),
        );
        let gateway = SocketAddr::from((spoke.ip, 15444));
        let (who, chain) = through_mutual(gateway, &client)
            .await
            .unwrap_or_else(|e| panic!("ISTIO_MUTUAL with istiod's certificate: {e}\n{}", logs()));
        assert_eq!(who, "echo");
        assert_eq!(common::spiffe_of(&chain[0]), GATEWAY_SPIFFE);
        let ca_cert = std::fs::read(istiod.ca_dir().join("ca-cert.pem")).unwrap();
        let ca_der = rustls_pemfile::certs(&mut ca_cert.as_slice())
            .next()
            .unwrap()
            .unwrap();
        let (ca_subject, _) = subject_and_issuer(&ca_der);
        let (_, leaf_issuer) = subject_and_issuer(&chain[0]);
        assert_eq!(leaf_issuer, ca_subject, "the SVID is not istiod's CA's");
        let first_serial = chain[0].clone();

        // Renewal under a 20 s lifetime: handshakes keep succeeding while the
        // certificate changes.
        let deadline = Instant::now() + Duration::from_secs(40);
        let mut renewed = false;
        while Instant::now() < deadline {
            let (who, chain) = through_mutual(gateway, &client)
                .await
                .unwrap_or_else(|e| panic!("a handshake failed around renewal: {e}\n{}", logs()));
            assert_eq!(who, "echo");
            if chain[0] != first_serial {
                renewed = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert!(renewed, "the certificate was never renewed\n{}", logs());
        assert_eq!(failures(&strait, "auth"), 0.0);
    });
}

/// Each way a pod's connection to 15012 goes wrong in a cluster, against the real
/// istiod: strait is never ready, logs the cause with the hint the README gives,
/// counts it by reason, and retries with backoff.
#[test]
fn each_way_a_pod_is_refused_is_reported_and_retried() {
    if harness_bin().is_none() {
        return;
    }
    let lab = Lab::new("refused");
    lab.run(|| async {
        let dir = TempDir::new("refused");
        let issuer = TokenIssuer::start(dir.path()).await;
        let istiod = istiod_with_tokens(&issuer, &[]).await;
        let root = istiod.ca_dir().join("root-cert.pem");
        let good = issuer.token("istio-system", "istio-eastwestgateway", AUDIENCE, 3600);
        let other_root = dir.path().join("other-ca");
        common::strait_cli(&[
            "ca",
            "init",
            "--trust-domain",
            "cluster.local",
            "--out",
            other_root.to_str().unwrap(),
        ]);
        let other_root = other_root.join("root-cert.pem");
        let cases: Vec<(&str, String, &Path, &str, &str, &str)> = vec![
            (
                "a token for another service account",
                issuer.token("istio-system", "default", AUDIENCE, 3600),
                &root,
                ISTIOD_NAME,
                "auth",
                "PermissionDenied",
            ),
            (
                "an expired token",
                issuer.token("istio-system", "istio-eastwestgateway", AUDIENCE, -600),
                &root,
                ISTIOD_NAME,
                "auth",
                "Unauthenticated",
            ),
            (
                "a token for another audience",
                issuer.token("istio-system", "istio-eastwestgateway", "kubernetes", 3600),
                &root,
                ISTIOD_NAME,
                "auth",
                "Unauthenticated",
            ),
            (
                "a root that did not sign istiod's certificate",
                good.clone(),
                &other_root,
                ISTIOD_NAME,
                "tls",
                "TLS handshake with",
            ),
            (
                "the wrong server name",
                good.clone(),
                &root,
                "istiod.example.com",
                "tls",
                "TLS handshake with",
            ),
        ];
        for (i, (case, token, root, name, reason, says)) in cases.into_iter().enumerate() {
            let token = write(&dir, &format!("token-{i}"), &token);
            let spoke = lab.spoke(&format!("case{i}"));
            let strait = launch(
                &spoke,
                &Secure {
                    token: &token,
                    root,
                    server_name: name,
                },
            );
            let logs = || {
                format!(
                    "--- strait\n{}\n--- istiod\n{}",
                    strait.stderr_text(),
                    istiod.log()
                )
            };
            // Retried with backoff: the second refusal comes after the first.
            assert!(
                strait.eventually(WAIT, || failures(&strait, reason) >= 2.0),
                "{case}: not counted twice as {reason}\n{}",
                logs()
            );
            assert!(
                strait.wait_stderr("control plane refused the gateway", WAIT)
                    && strait.wait_stderr(says, WAIT),
                "{case}: the log does not say {says:?}\n{}",
                logs()
            );
            let (code, body) = common::http_get(strait.status, "/healthz/ready").unwrap();
            assert_eq!(code, 503, "{case}: ready without istiod: {body}");
            assert!(
                istiod.syncz().await.as_array().is_none_or(|a| a.is_empty()),
                "{case}: istiod accepted the stream"
            );
            drop(strait);
        }
    });
}

/// A token that expires after the gateway was ready (istiod restarted, so the stream
/// must authenticate again): strait stays ready on its last configuration and keeps
/// serving, says why it cannot reconnect, and recovers once the token is good again.
#[test]
fn a_token_gone_bad_after_ready_keeps_the_last_configuration_serving() {
    if harness_bin().is_none() {
        return;
    }
    let lab = Lab::new("stale");
    lab.run(|| async {
        let dir = TempDir::new("stale");
        let issuer = TokenIssuer::start(dir.path()).await;
        let _echo = common::named_server_at("echo", "10.0.0.51:7070".parse().unwrap()).await;
        let mut istiod = istiod_with_tokens(&issuer, &[]).await;
        let good = issuer.token("istio-system", "istio-eastwestgateway", AUDIENCE, 3600);
        let token = write(&dir, "istio-token", &good);
        let root = istiod.ca_dir().join("root-cert.pem");
        let spoke = lab.spoke("strait");
        let strait = launch(
            &spoke,
            &Secure {
                token: &token,
                root: &root,
                server_name: ISTIOD_NAME,
            },
        );
        let logs = |istiod: &Istiod| {
            format!(
                "--- strait\n{}\n--- istiod\n{}",
                strait.stderr_text(),
                istiod.log()
            )
        };
        istiod
            .wait_synced(&format!("{POD}.istio-system"), WAIT)
            .await
            .unwrap_or_else(|e| panic!("{e}\n{}", logs(&istiod)));
        let client = common::mesh_cert(
            &istiod.ca_dir(),
            "spiffe://cluster.local/ns/foo/sa/sleep",
            &dir.path().join("sleep"),
        );
        let gateway = SocketAddr::from((spoke.ip, 15444));
        let serving = || async {
            through_mutual(gateway, &client)
                .await
                .is_ok_and(|(who, _)| who == "echo")
        };
        let deadline = Instant::now() + WAIT;
        while !serving().await {
            assert!(Instant::now() < deadline, "never served\n{}", logs(&istiod));
            tokio::time::sleep(Duration::from_millis(100)).await;
        }

        // The token goes bad and istiod restarts: the stream must authenticate again.
        common::replace_file(
            &token,
            &issuer.token("istio-system", "istio-eastwestgateway", AUDIENCE, -600),
        );
        istiod.stop();
        istiod.restart().await;
        assert!(
            strait.eventually(WAIT, || failures(&strait, "auth") >= 1.0),
            "the expired token was not refused\n{}",
            logs(&istiod)
        );
        assert!(
            strait.wait_stderr("Unauthenticated", WAIT),
            "{}",
            logs(&istiod)
        );
        let (code, _) = common::http_get(strait.status, "/healthz/ready").unwrap();
        assert_eq!(code, 200, "readiness dropped on a refused reconnect");
        assert!(
            serving().await,
            "the last configuration stopped serving\n{}",
            logs(&istiod)
        );

        // A renewed token (the kubelet's rotation): the stream comes back by itself.
        common::replace_file(&token, &good);
        istiod
            .wait_synced(&format!("{POD}.istio-system"), Duration::from_secs(90))
            .await
            .unwrap_or_else(|e| panic!("no recovery with a good token: {e}\n{}", logs(&istiod)));
    });
}

/// A Bridge whose SVID comes from the real istiod's CA (`certificates.ca` on 15012 with
/// the bridge's token) crosses to network2, where an Envoy sidecar that requires a client
/// certificate from the mesh root and the bridge's exact SPIFFE ID fronts the app; the
/// bridge in turn verifies the sidecar's identity.
#[test]
fn a_bridge_crosses_networks_on_a_certificate_from_istiods_ca() {
    if harness_bin().is_none() || !common::istiod::peers_present() {
        return;
    }
    let lab = Lab::new("bridge");
    lab.run(|| async {
        let dir = TempDir::new("bridge");
        let issuer = TokenIssuer::start(dir.path()).await;
        let istiod = istiod_with_tokens(&issuer, &[]).await;
        let bridge_id = "spiffe://cluster.local/ns/default/sa/bridge";
        let app_id = "spiffe://cluster.local/ns/default/sa/reviews";
        let _app = common::named_server_at("reviews-app", "10.0.0.61:7070".parse().unwrap()).await;
        let sidecar_certs =
            common::mesh_cert(&istiod.ca_dir(), app_id, &dir.path().join("sidecar"));
        let sidecar = SocketAddr::from(([10, 0, 0, 60], 15443));
        let admin = SocketAddr::from(([10, 0, 0, 60], 15000));
        let envoy = common::xds::Envoy::launch(
            // A sidecar in front of the app, as network2 has it: mTLS with the bridge's
            // exact SPIFFE ID required, then plain TCP to the app.
            &common::xds::mtls_envoy_bootstrap(
                sidecar,
                admin,
                "10.0.0.61:7070".parse().unwrap(),
                &sidecar_certs,
                Some(bridge_id),
            ),
            admin,
            common::xds::EnvoyOptions {
                delta: true,
                listener: sidecar,
            },
            None,
        )
        .await
        .expect("envoy (checked by peers_present)");

        let token = write(
            &dir,
            "istio-token",
            &issuer.token("default", "bridge", AUDIENCE, 3600),
        );
        let root = istiod.ca_dir().join("root-cert.pem");
        let spoke = lab.spoke("bridge");
        let config = format!(
            "apiVersion: strait.dev/v1alpha1
kind: Bootstrap
metadata: {{name: bridge}}
spec:
  status: 0.0.0.0:15021
  metrics: 0.0.0.0:15090
  admin: 0.0.0.0:15000
  cluster: cluster1
  network: network1
  meshNetworks:
    networks:
      network2:
        gateways: [{{address: {gw_ip}, port: {gw_port}}}]
  certificates:
    ca:
      address: {ISTIOD_IP}:{SECURE_XDS_PORT}
      serverName: {ISTIOD_NAME}
      rootCert: {root}
      token: {token}
      clusterId: cluster1
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: reviews, namespace: default}}
spec:
  hosts: [reviews.default.svc.cluster.local]
  location: MESH_INTERNAL
  ports: [{{number: 9080, name: tcp}}]
  resolution: STATIC
  endpoints:
  - address: 10.255.0.7
    network: network2
    labels: {{security.istio.io/tlsMode: istio}}
---
apiVersion: strait.dev/v1alpha1
kind: Bridge
metadata: {{name: reviews}}
spec:
  listen: 0.0.0.0:9080
  host: reviews.default.svc.cluster.local
  port: 9080
  identity: {app_id}
",
            gw_ip = sidecar.ip(),
            gw_port = sidecar.port(),
            root = root.display(),
            token = token.display(),
        );
        let ports = Ports {
            gateway: 9080,
            status: 15021,
            metrics: 15090,
            admin: 15000,
        };
        let strait = Strait::launch_in_at(
            &spoke.ns,
            IpAddr::V4(spoke.ip),
            ports,
            &config,
            Path::new(common::strait_bin()),
            &[("POD_NAMESPACE", "default"), ("SERVICE_ACCOUNT", "bridge")],
        );
        let logs = || {
            format!(
                "--- strait\n{}\n--- envoy\n{}\n--- istiod\n{}",
                strait.stderr_text(),
                envoy.log(),
                istiod.log()
            )
        };
        strait.wait_ready(WAIT);
        // A plaintext app in network1 calls the bridge; the sidecar's app answers.
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut app = tokio::net::TcpStream::connect(SocketAddr::from((spoke.ip, 9080)))
            .await
            .unwrap();
        app.write_all(b"hello\n").await.unwrap();
        let mut answer = vec![0u8; 64];
        let n = tokio::time::timeout(Duration::from_secs(10), app.read(&mut answer))
            .await
            .unwrap_or_else(|_| panic!("no answer through the bridge\n{}", logs()))
            .unwrap();
        assert_eq!(&answer[..n], b"reviews-app\n", "{}", logs());
        // The bridge logs a connection when it ends.
        drop(app);
        // Envoy accepted the bridge's certificate (its SAN matcher names the bridge),
        // and the bridge logged the sidecar's verified identity.
        let handshakes = envoy
            .wait_stat("listener.10.0.0.60_15443.ssl.handshake", WAIT, |v| v >= 1)
            .await;
        assert!(handshakes.is_some_and(|v| v >= 1), "{}", logs());
        assert!(
            strait
                .wait_log(WAIT, |l| l["peer_identity"] == app_id)
                .is_some(),
            "the bridge did not log the sidecar's identity: {:?}",
            strait.access_log()
        );
    });
}
