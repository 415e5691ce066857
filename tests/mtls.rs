//! The mesh CA and SPIFFE mTLS over real loopback sockets: certificates made by
//! `strait::identity::ca`, checked by openssl, and rustls configurations from `strait::tls`
//! accepting and refusing peers the way an ISTIO_MUTUAL gateway and a bridge must.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use strait::identity::ca;
use strait::tls::{
    Identity, Refusal, SpiffeId, TrustConfig, classify_handshake_error, client_config,
    handshake_error_detail, load_identity, load_trust_bundle, peer_spiffe_id, server_config,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};

const DAY: Duration = Duration::from_secs(86_400);
const GATEWAY_ID: &str = "spiffe://cluster.local/ns/istio-system/sa/eastwest";
const CLIENT_ID: &str = "spiffe://cluster.local/ns/default/sa/sleep";
/// The SNI a bridge sends: an Istio subset key, not a host name of the gateway.
const SUBSET_SNI: &str = "outbound_.9080_._.reviews.default.svc.cluster.local";
const ALPN: &[&[u8]] = &[b"istio"];

// ---------------------------------------------------------------------------------
// Helpers: temp dirs, CAs and SVIDs, a TLS server/client pair on loopback.
// ---------------------------------------------------------------------------------

/// A unique directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let dir = std::env::temp_dir().join(format!(
            "strait-mtls-{name}-{}-{nanos}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.0.join(rel)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn id(s: &str) -> SpiffeId {
    SpiffeId::parse(s).unwrap()
}

fn new_ca(tmp: &TempDir, name: &str, trust_domain: &str) -> PathBuf {
    let dir = tmp.path(name);
    ca::init_ca(trust_domain, &dir, 365 * DAY).unwrap();
    dir
}

fn issue(tmp: &TempDir, ca_dir: &Path, spiffe_id: &str, name: &str) -> Identity {
    let out = tmp.path(name);
    ca::issue_svid(ca_dir, &id(spiffe_id), &out, DAY).unwrap();
    load_identity(&out).unwrap()
}

fn mesh_trust() -> TrustConfig {
    TrustConfig {
        trust_domain: "cluster.local".into(),
        ..TrustConfig::default()
    }
}

/// What the server saw of a completed connection.
#[derive(Debug)]
struct ServerSaw {
    peer: SpiffeId,
    alpn: Option<Vec<u8>>,
    received: Vec<u8>,
}

struct Outcome {
    server: io::Result<ServerSaw>,
    client: io::Result<Vec<u8>>,
}

/// Runs one connection: the client sends "hello", the server answers "world" and
/// closes. Both sides' results are returned, whichever side refused.
async fn connect_pair(
    server: Arc<rustls::ServerConfig>,
    client: Arc<rustls::ClientConfig>,
) -> Outcome {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server_task = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await?;
        serve_one(server, tcp).await
    });
    let client = tokio::time::timeout(Duration::from_secs(10), client_one(client, addr))
        .await
        .expect("client timed out");
    let server = tokio::time::timeout(Duration::from_secs(10), server_task)
        .await
        .expect("server timed out")
        .unwrap();
    Outcome { server, client }
}

async fn serve_one(config: Arc<rustls::ServerConfig>, tcp: TcpStream) -> io::Result<ServerSaw> {
    let mut tls = TlsAcceptor::from(config).accept(tcp).await?;
    let (_, conn) = tls.get_ref();
    let leaf = conn.peer_certificates().and_then(|c| c.first()).unwrap();
    let peer = peer_spiffe_id(leaf).unwrap();
    let alpn = conn.alpn_protocol().map(<[u8]>::to_vec);
    let mut received = vec![0; 5];
    tls.read_exact(&mut received).await?;
    tls.write_all(b"world").await?;
    tls.shutdown().await?;
    Ok(ServerSaw {
        peer,
        alpn,
        received,
    })
}

async fn client_one(config: Arc<rustls::ClientConfig>, addr: SocketAddr) -> io::Result<Vec<u8>> {
    let tcp = TcpStream::connect(addr).await?;
    let sni = ServerName::try_from(SUBSET_SNI).unwrap();
    let mut tls = TlsConnector::from(config).connect(sni, tcp).await?;
    tls.write_all(b"hello").await?;
    let mut answer = Vec::new();
    tls.read_to_end(&mut answer).await?;
    Ok(answer)
}

/// The gateway's server config and a config for `client` that trusts the gateway's
/// mesh roots whatever CA issued the client, so only the server's decision is under test.
fn gateway_and_client(
    gateway: &Identity,
    trust: &TrustConfig,
    client: &Identity,
) -> (Arc<rustls::ServerConfig>, Arc<rustls::ClientConfig>) {
    let server = server_config(gateway, trust, ALPN).unwrap();
    let trusting_gateway = Identity {
        chain: client.chain.clone(),
        key: client.key.clone_key(),
        roots: gateway.roots.clone(),
        spiffe_id: client.spiffe_id.clone(),
        not_after: client.not_after,
    };
    let client = client_config(&trusting_gateway, &mesh_trust(), None, ALPN).unwrap();
    (server, client)
}

fn assert_server_refused(outcome: Outcome, want: Refusal, detail_contains: &str) {
    let err = outcome.server.expect_err("server should refuse the client");
    assert_eq!(
        classify_handshake_error(&err),
        want,
        "server error: {err} / {}",
        handshake_error_detail(&err)
    );
    let detail = handshake_error_detail(&err);
    assert!(detail.contains(detail_contains), "{detail}");
    assert!(
        outcome.client.is_err(),
        "client must not get data from a refusing server"
    );
}

fn assert_flows(outcome: Outcome, client_id: &str) {
    let saw = outcome.server.expect("server handshake");
    assert_eq!(saw.peer, id(client_id));
    assert_eq!(saw.received, b"hello");
    assert_eq!(saw.alpn.as_deref(), Some(&b"istio"[..]));
    assert_eq!(outcome.client.expect("client"), b"world");
}

// ---------------------------------------------------------------------------------
// The gateway (server side) accepts mesh peers and refuses the rest, each for its reason.
// ---------------------------------------------------------------------------------

#[tokio::test]
async fn mesh_client_is_accepted_and_data_flows() {
    let tmp = TempDir::new("ok");
    let mesh = new_ca(&tmp, "mesh", "cluster.local");
    let gateway = issue(&tmp, &mesh, GATEWAY_ID, "gw");
    let client = issue(&tmp, &mesh, CLIENT_ID, "client");
    let server = server_config(&gateway, &mesh_trust(), ALPN).unwrap();
    let client_cfg = client_config(&client, &mesh_trust(), Some(&id(GATEWAY_ID)), ALPN).unwrap();
    assert_flows(connect_pair(server, client_cfg).await, CLIENT_ID);
}

#[tokio::test]
async fn client_from_another_ca_is_untrusted_chain() {
    let tmp = TempDir::new("otherca");
    let mesh = new_ca(&tmp, "mesh", "cluster.local");
    let rogue = new_ca(&tmp, "rogue", "cluster.local");
    let gateway = issue(&tmp, &mesh, GATEWAY_ID, "gw");
    let client = issue(&tmp, &rogue, CLIENT_ID, "client");
    let (server, client_cfg) = gateway_and_client(&gateway, &mesh_trust(), &client);
    let outcome = connect_pair(server, client_cfg).await;
    // Both CAs have the same names, so webpki finds the mesh root and the signature fails.
    assert_server_refused(outcome, Refusal::UntrustedChain, "BadSignature");
}

#[tokio::test]
async fn expired_client_is_expired() {
    let tmp = TempDir::new("expired");
    let mesh = new_ca(&tmp, "mesh", "cluster.local");
    let gateway = issue(&tmp, &mesh, GATEWAY_ID, "gw");
    let now = SystemTime::now();
    let out = tmp.path("client");
    ca::issue_svid_with_validity(&mesh, &id(CLIENT_ID), &out, now - 2 * DAY, now - DAY).unwrap();
    let client = load_identity(&out).unwrap();
    let (server, client_cfg) = gateway_and_client(&gateway, &mesh_trust(), &client);
    let outcome = connect_pair(server, client_cfg).await;
    assert_server_refused(outcome, Refusal::Expired, "expired");
}

#[tokio::test]
async fn client_with_two_uri_sans_is_bad_spiffe_id() {
    let tmp = TempDir::new("twosans");
    let mesh = new_ca(&tmp, "mesh", "cluster.local");
    let gateway = issue(&tmp, &mesh, GATEWAY_ID, "gw");
    let client = issue_raw(
        &mesh,
        &[CLIENT_ID, "spiffe://cluster.local/ns/default/sa/other"],
    );
    let (server, client_cfg) = gateway_and_client(&gateway, &mesh_trust(), &client);
    let outcome = connect_pair(server, client_cfg).await;
    assert_server_refused(outcome, Refusal::BadSpiffeId, "has 2 URI SANs");
}

#[tokio::test]
async fn client_without_certificate_is_no_client_cert() {
    let tmp = TempDir::new("nocert");
    let mesh = new_ca(&tmp, "mesh", "cluster.local");
    let gateway = issue(&tmp, &mesh, GATEWAY_ID, "gw");
    let server = server_config(&gateway, &mesh_trust(), ALPN).unwrap();
    let anonymous = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .dangerous()
    .with_custom_certificate_verifier(Arc::new(AcceptAnyServer))
    .with_no_client_auth();
    let outcome = connect_pair(server, Arc::new(anonymous)).await;
    assert_server_refused(outcome, Refusal::NoClientCert, "peer sent no certificates");
}

#[tokio::test]
async fn client_from_unlisted_trust_domain_is_untrusted_trust_domain() {
    let tmp = TempDir::new("unlisted");
    let mesh = new_ca(&tmp, "mesh", "cluster.local");
    let gateway = issue(&tmp, &mesh, GATEWAY_ID, "gw");
    // Signed by the mesh root itself: the chain is fine, the trust domain is not.
    let client = issue(&tmp, &mesh, "spiffe://other.td/ns/x/sa/y", "client");
    let trust = TrustConfig {
        aliases: vec!["old.local".into()],
        ..mesh_trust()
    };
    let (server, client_cfg) = gateway_and_client(&gateway, &trust, &client);
    let outcome = connect_pair(server, client_cfg).await;
    assert_server_refused(
        outcome,
        Refusal::UntrustedTrustDomain,
        "peer presented spiffe://other.td/ns/x/sa/y; trust domain cluster.local (or aliases [old.local]) expected",
    );
}

#[tokio::test]
async fn client_from_alias_trust_domain_is_accepted() {
    let tmp = TempDir::new("alias");
    let mesh = new_ca(&tmp, "mesh", "cluster.local");
    let gateway = issue(&tmp, &mesh, GATEWAY_ID, "gw");
    // An alias is another name of the same mesh: the mesh root signs its IDs.
    let alias_id = "spiffe://old.local/ns/default/sa/sleep";
    let client = issue(&tmp, &mesh, alias_id, "client");
    let trust = TrustConfig {
        aliases: vec!["old.local".into()],
        ..mesh_trust()
    };
    let (server, client_cfg) = gateway_and_client(&gateway, &trust, &client);
    assert_flows(connect_pair(server, client_cfg).await, alias_id);

    // Without the alias the same certificate is refused.
    let (server, client_cfg) = gateway_and_client(&gateway, &mesh_trust(), &client);
    let outcome = connect_pair(server, client_cfg).await;
    assert_server_refused(
        outcome,
        Refusal::UntrustedTrustDomain,
        "spiffe://old.local/",
    );
}

/// A mesh that federates with `fed.td`, whose bundle is a SPIFFE bundle JSON file.
fn federated_trust(tmp: &TempDir, fed_ca: &Path) -> TrustConfig {
    let root_pem = fs::read_to_string(fed_ca.join("root-cert.pem")).unwrap();
    let root = rustls_pemfile::certs(&mut root_pem.as_bytes())
        .next()
        .unwrap()
        .unwrap();
    let bundle = tmp.path("fed-bundle.json");
    fs::write(
        &bundle,
        format!(
            r#"{{"spiffe_sequence": 3, "keys": [{{"use": "x509-svid", "kty": "EC", "crv": "P-256", "x5c": ["{}"]}}]}}"#,
            base64_encode(root.as_ref())
        ),
    )
    .unwrap();
    let loaded = load_trust_bundle(&bundle).unwrap();
    assert_eq!(loaded, vec![root]);
    assert_eq!(
        load_trust_bundle(&fed_ca.join("root-cert.pem")).unwrap(),
        loaded,
        "PEM and JSON forms of the bundle agree"
    );
    TrustConfig {
        federated: BTreeMap::from([("fed.td".to_owned(), loaded)]),
        ..mesh_trust()
    }
}

#[tokio::test]
async fn federated_client_is_accepted_only_with_its_own_root() {
    let tmp = TempDir::new("fed");
    let mesh = new_ca(&tmp, "mesh", "cluster.local");
    let fed = new_ca(&tmp, "fed", "fed.td");
    let gateway = issue(&tmp, &mesh, GATEWAY_ID, "gw");
    let trust = federated_trust(&tmp, &fed);
    let fed_id = "spiffe://fed.td/ns/shop/sa/cart";

    let client = issue(&tmp, &fed, fed_id, "fed-client");
    let (server, client_cfg) = gateway_and_client(&gateway, &trust, &client);
    assert_flows(connect_pair(server, client_cfg).await, fed_id);

    // The mesh root may not vouch for a federated identity...
    let forged = issue(&tmp, &mesh, fed_id, "mesh-signed-fed");
    let (server, client_cfg) = gateway_and_client(&gateway, &trust, &forged);
    let outcome = connect_pair(server, client_cfg).await;
    assert_server_refused(outcome, Refusal::UntrustedChain, "UnknownIssuer");

    // ...nor the federated root for a mesh identity.
    let forged = issue(&tmp, &fed, CLIENT_ID, "fed-signed-mesh");
    let (server, client_cfg) = gateway_and_client(&gateway, &trust, &forged);
    let outcome = connect_pair(server, client_cfg).await;
    assert_server_refused(outcome, Refusal::UntrustedChain, "UnknownIssuer");
}

// ---------------------------------------------------------------------------------
// The bridge (client side) checks the gateway's SPIFFE ID instead of a host name.
// ---------------------------------------------------------------------------------

async fn client_refusal(
    server: Arc<rustls::ServerConfig>,
    client: Arc<rustls::ClientConfig>,
) -> io::Error {
    let outcome = connect_pair(server, client).await;
    assert!(
        outcome.server.is_err(),
        "server must see the client give up"
    );
    outcome.client.expect_err("client should refuse the server")
}

#[tokio::test]
async fn client_refuses_unexpected_server_identity() {
    let tmp = TempDir::new("mismatch");
    let mesh = new_ca(&tmp, "mesh", "cluster.local");
    let gateway = issue(&tmp, &mesh, GATEWAY_ID, "gw");
    let client = issue(&tmp, &mesh, CLIENT_ID, "client");
    let server = server_config(&gateway, &mesh_trust(), ALPN).unwrap();
    let expected = id("spiffe://cluster.local/ns/istio-system/sa/other-gateway");
    let client_cfg = client_config(&client, &mesh_trust(), Some(&expected), ALPN).unwrap();
    let err = client_refusal(server, client_cfg).await;
    assert_eq!(classify_handshake_error(&err), Refusal::IdentityMismatch);
    assert_eq!(
        handshake_error_detail(&err),
        format!("peer presented {GATEWAY_ID}; {expected} expected")
    );
}

#[tokio::test]
async fn client_refuses_server_from_another_trust_domain_or_ca() {
    let tmp = TempDir::new("srvtd");
    let mesh = new_ca(&tmp, "mesh", "cluster.local");
    let client = issue(&tmp, &mesh, CLIENT_ID, "client");
    let client_cfg = client_config(&client, &mesh_trust(), None, ALPN).unwrap();
    // The server needs to accept the client so only the client decides.
    let server_trust = mesh_trust();

    let stranger = issue(
        &tmp,
        &mesh,
        "spiffe://other.td/ns/istio-system/sa/eastwest",
        "gw1",
    );
    let server = server_config(&stranger, &server_trust, ALPN).unwrap();
    let err = client_refusal(server, client_cfg.clone()).await;
    assert_eq!(
        classify_handshake_error(&err),
        Refusal::UntrustedTrustDomain
    );
    assert!(
        handshake_error_detail(&err).contains("peer presented spiffe://other.td/"),
        "{}",
        handshake_error_detail(&err)
    );

    let rogue = new_ca(&tmp, "rogue", "cluster.local");
    let mut impostor = issue(&tmp, &rogue, GATEWAY_ID, "gw2");
    impostor.roots = client.roots.clone();
    let server = server_config(&impostor, &server_trust, ALPN).unwrap();
    let err = client_refusal(server, client_cfg).await;
    assert_eq!(classify_handshake_error(&err), Refusal::UntrustedChain);
}

// ---------------------------------------------------------------------------------
// openssl interoperates with the rustls server configuration.
// ---------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openssl_s_client_completes_mtls_and_sees_spiffe_server_cert() {
    let tmp = TempDir::new("sclient");
    let mesh = new_ca(&tmp, "mesh", "cluster.local");
    let gateway = issue(&tmp, &mesh, GATEWAY_ID, "gw");
    let client_dir = tmp.path("client");
    ca::issue_svid(&mesh, &id(CLIENT_ID), &client_dir, DAY).unwrap();
    let server = server_config(&gateway, &mesh_trust(), ALPN).unwrap();
    // TLS 1.3 and 1.2 take different signature-verification paths in the verifier.
    for (version, shown) in [("-tls1_3", "New, TLSv1.3"), ("-tls1_2", "New, TLSv1.2")] {
        let (stdout, client_seen) = openssl_s_client(server.clone(), &client_dir, version).await;
        assert!(stdout.contains(shown), "{stdout}");
        assert!(stdout.contains("Verify return code: 0 (ok)"), "{stdout}");
        assert!(stdout.contains("hello from strait"), "{stdout}");
        assert_eq!(client_seen, id(CLIENT_ID));
        let server_pem = pem_blocks(&stdout).remove(0);
        let text = openssl_stdin(&["x509", "-noout", "-ext", "subjectAltName"], &server_pem);
        assert!(text.contains(&format!("URI:{GATEWAY_ID}")), "{text}");
    }
}

/// Runs `openssl s_client` with the SVID in `client_dir` against one connection of a
/// server using `server`; returns its output and the client ID the server saw.
async fn openssl_s_client(
    server: Arc<rustls::ServerConfig>,
    client_dir: &Path,
    version: &'static str,
) -> (String, SpiffeId) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server_task = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await?;
        let mut tls = TlsAcceptor::from(server).accept(tcp).await?;
        let leaf = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
        tls.write_all(b"hello from strait\n").await?;
        tls.shutdown().await?;
        Ok::<_, io::Error>(peer_spiffe_id(&leaf).unwrap())
    });
    let client_dir = client_dir.to_owned();
    let output = tokio::task::spawn_blocking(move || {
        let chain = client_dir.join("cert-chain.pem");
        Command::new("openssl")
            .args(["s_client", version, "-connect", &addr.to_string()])
            .args(["-servername", SUBSET_SNI])
            .arg("-cert")
            .arg(&chain)
            .arg("-cert_chain")
            .arg(&chain)
            .arg("-key")
            .arg(client_dir.join("key.pem"))
            .arg("-CAfile")
            .arg(client_dir.join("root-cert.pem"))
            .args(["-verify_return_error", "-ign_eof"])
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{version}: {stdout}\n{stderr}");
    let client_seen = server_task.await.unwrap().unwrap();
    (stdout, client_seen)
}

// ---------------------------------------------------------------------------------
// `ca init` and `cert issue`: files, modes, openssl's verdict, refusals.
// ---------------------------------------------------------------------------------

#[test]
fn ca_init_writes_istio_plugged_layout() {
    let tmp = TempDir::new("cainit");
    let dir = new_ca(&tmp, "ca", "cluster.local");
    let mut names: Vec<String> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "ca-cert.pem",
            "ca-key.pem",
            "cert-chain.pem",
            "root-cert.pem"
        ]
    );
    assert_eq!(mode(&dir.join("ca-key.pem")), 0o600);
    assert_eq!(mode(&dir.join("root-cert.pem")) & 0o077, 0o044);

    let root = openssl(
        &["x509", "-noout", "-text", "-in"],
        &dir.join("root-cert.pem"),
    );
    assert!(root.contains("CA:TRUE"), "{root}");
    assert!(root.contains("Certificate Sign"), "{root}");
    assert!(root.contains("O = cluster.local"), "{root}");
    let inter = openssl(
        &["x509", "-noout", "-text", "-in"],
        &dir.join("ca-cert.pem"),
    );
    assert!(inter.contains("CA:TRUE, pathlen:0"), "{inter}");

    let verify = openssl_verify(&dir.join("root-cert.pem"), None, &dir.join("ca-cert.pem"));
    assert!(verify.0, "{}", verify.1);

    let chain = fs::read_to_string(dir.join("cert-chain.pem")).unwrap();
    let expected = fs::read_to_string(dir.join("ca-cert.pem")).unwrap()
        + &fs::read_to_string(dir.join("root-cert.pem")).unwrap();
    assert_eq!(chain, expected);
}

#[test]
fn cert_issue_writes_workload_layout_that_openssl_verifies() {
    let tmp = TempDir::new("issue");
    let ca_dir = new_ca(&tmp, "ca", "cluster.local");
    let out = tmp.path("reviews");
    let reviews = id("spiffe://cluster.local/ns/default/sa/reviews");
    ca::issue_svid(&ca_dir, &reviews, &out, DAY).unwrap();

    assert_eq!(mode(&out.join("key.pem")), 0o600);
    assert_eq!(
        fs::read(out.join("root-cert.pem")).unwrap(),
        fs::read(ca_dir.join("root-cert.pem")).unwrap()
    );
    let blocks = pem_blocks(&fs::read_to_string(out.join("cert-chain.pem")).unwrap());
    assert_eq!(blocks.len(), 2, "leaf + intermediate");
    assert_eq!(
        blocks[1],
        fs::read_to_string(ca_dir.join("ca-cert.pem")).unwrap()
    );
    let leaf = tmp.path("leaf.pem");
    fs::write(&leaf, &blocks[0]).unwrap();

    for purpose in ["sslclient", "sslserver"] {
        let (ok, text) = openssl_verify_purpose(
            &ca_dir.join("root-cert.pem"),
            Some(&ca_dir.join("ca-cert.pem")),
            &leaf,
            purpose,
        );
        assert!(ok && text.contains("OK"), "{purpose}: {text}");
    }
    // And openssl refuses it against another CA's root, so the check above can fail.
    let other = new_ca(&tmp, "other", "cluster.local");
    let (ok, text) = openssl_verify(
        &other.join("root-cert.pem"),
        Some(&ca_dir.join("ca-cert.pem")),
        &leaf,
    );
    assert!(!ok, "{text}");

    let text = openssl(&["x509", "-noout", "-text", "-in"], &leaf);
    assert!(
        text.contains("URI:spiffe://cluster.local/ns/default/sa/reviews"),
        "{text}"
    );
    assert_eq!(text.matches("URI:").count(), 1, "{text}");
    assert!(text.contains("CA:FALSE"), "{text}");
    assert!(
        text.contains("Digital Signature, Key Encipherment"),
        "{text}"
    );
    assert!(
        text.contains("TLS Web Server Authentication, TLS Web Client Authentication"),
        "{text}"
    );
    assert!(text.contains("prime256v1"), "{text}");
    assert!(
        text.contains("X509v3 Subject Alternative Name: critical"),
        "{text}"
    );

    let identity = load_identity(&out).unwrap();
    assert_eq!(identity.spiffe_id, Some(reviews));
    assert_eq!(identity.chain.len(), 2);
    let left = identity
        .not_after
        .duration_since(SystemTime::now())
        .unwrap();
    assert!(
        left > DAY - Duration::from_secs(120) && left <= DAY,
        "{left:?}"
    );
}

#[test]
fn ca_and_cert_refuse_to_overwrite() {
    let tmp = TempDir::new("overwrite");
    let dir = new_ca(&tmp, "ca", "cluster.local");
    let before = fs::read(dir.join("ca-key.pem")).unwrap();
    let err = ca::init_ca("cluster.local", &dir, DAY).unwrap_err();
    assert!(
        err.to_string()
            .contains("already exists; refusing to overwrite"),
        "{err}"
    );
    assert_eq!(fs::read(dir.join("ca-key.pem")).unwrap(), before);

    let out = tmp.path("svid");
    ca::issue_svid(&dir, &id(CLIENT_ID), &out, DAY).unwrap();
    let err = ca::issue_svid(&dir, &id(CLIENT_ID), &out, DAY).unwrap_err();
    assert!(
        err.to_string().contains("cert-chain.pem: already exists"),
        "{err}"
    );
}

#[test]
fn cert_issue_errors_name_the_file_and_the_fix() {
    let tmp = TempDir::new("errors");
    let empty = tmp.path("empty");
    fs::create_dir_all(&empty).unwrap();
    let err = ca::issue_svid(&empty, &id(CLIENT_ID), &tmp.path("out"), DAY).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "ca dir {} has no ca-cert.pem: run `strait ca init` first",
            empty.display()
        )
    );

    // A key that belongs to another CA is caught before anything is signed.
    let a = new_ca(&tmp, "a", "cluster.local");
    let b = new_ca(&tmp, "b", "cluster.local");
    fs::remove_file(a.join("ca-key.pem")).unwrap();
    fs::copy(b.join("ca-key.pem"), a.join("ca-key.pem")).unwrap();
    let err = ca::issue_svid(&a, &id(CLIENT_ID), &tmp.path("out"), DAY).unwrap_err();
    assert!(
        err.to_string()
            .contains("ca-key.pem: does not match ca-cert.pem"),
        "{err}"
    );
    assert!(!tmp.path("out").exists());

    let err = ca::init_ca("Not A Domain", &tmp.path("bad"), DAY).unwrap_err();
    assert!(
        err.to_string()
            .starts_with("invalid trust domain \"Not A Domain\""),
        "{err}"
    );
}

#[test]
fn load_identity_errors_name_the_file() {
    let tmp = TempDir::new("loadid");
    let ca_dir = new_ca(&tmp, "ca", "cluster.local");
    let out = tmp.path("svid");
    ca::issue_svid(&ca_dir, &id(CLIENT_ID), &out, DAY).unwrap();
    fs::write(out.join("key.pem"), "").unwrap();
    let err = load_identity(&out).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("{}: no private key found", out.join("key.pem").display())
    );
    fs::remove_file(out.join("root-cert.pem")).unwrap();
    fs::write(
        out.join("key.pem"),
        fs::read(ca_dir.join("ca-key.pem")).unwrap(),
    )
    .unwrap();
    let err = load_identity(&out).unwrap_err();
    assert!(
        err.to_string()
            .starts_with(&format!("{}: ", out.join("root-cert.pem").display())),
        "{err}"
    );
}

// ---------------------------------------------------------------------------------
// Small helpers: openssl, PEM, a certificate with arbitrary SANs.
// ---------------------------------------------------------------------------------

fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    fs::metadata(path).unwrap().permissions().mode() & 0o777
}

fn openssl(args: &[&str], file: &Path) -> String {
    let out = Command::new("openssl")
        .args(args)
        .arg(file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn openssl_stdin(args: &[&str], input: &str) -> String {
    use std::io::Write;
    let mut child = Command::new("openssl")
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn openssl_verify(root: &Path, untrusted: Option<&Path>, leaf: &Path) -> (bool, String) {
    openssl_verify_purpose(root, untrusted, leaf, "any")
}

fn openssl_verify_purpose(
    root: &Path,
    untrusted: Option<&Path>,
    leaf: &Path,
    purpose: &str,
) -> (bool, String) {
    let mut cmd = Command::new("openssl");
    cmd.args(["verify", "-purpose", purpose, "-CAfile"])
        .arg(root);
    if let Some(untrusted) = untrusted {
        cmd.arg("-untrusted").arg(untrusted);
    }
    let out = cmd.arg(leaf).output().unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

/// The PEM certificate blocks in `text`, each with its trailing newline.
fn pem_blocks(text: &str) -> Vec<String> {
    const END: &str = "-----END CERTIFICATE-----";
    let mut blocks = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find("-----BEGIN CERTIFICATE-----") {
        let end = rest[start..].find(END).unwrap() + start + END.len();
        blocks.push(format!("{}\n", &rest[start..end]));
        rest = &rest[end..];
    }
    blocks
}

/// An identity signed by the CA in `ca_dir` with the given URI SANs, for certificates
/// `cert issue` rightly refuses to make.
fn issue_raw(ca_dir: &Path, uris: &[&str]) -> Identity {
    use rcgen::{CertificateParams, ExtendedKeyUsagePurpose, Issuer, KeyPair, SanType};
    let ca_pem = fs::read_to_string(ca_dir.join("ca-cert.pem")).unwrap();
    let ca_key =
        KeyPair::from_pem(&fs::read_to_string(ca_dir.join("ca-key.pem")).unwrap()).unwrap();
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key).unwrap();
    let mut params = CertificateParams::default();
    params.subject_alt_names = uris
        .iter()
        .map(|u| SanType::URI((*u).try_into().unwrap()))
        .collect();
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let key = KeyPair::generate().unwrap();
    let leaf = params.signed_by(&key, &issuer).unwrap();
    let ca_der = rustls_pemfile::certs(&mut ca_pem.as_bytes())
        .next()
        .unwrap()
        .unwrap();
    let root_pem = fs::read_to_string(ca_dir.join("root-cert.pem")).unwrap();
    Identity {
        chain: vec![leaf.der().clone(), ca_der],
        key: rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        roots: rustls_pemfile::certs(&mut root_pem.as_bytes())
            .collect::<Result<_, _>>()
            .unwrap(),
        spiffe_id: None,
        not_after: SystemTime::now() + DAY,
    }
}

fn base64_encode(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// Accepts any server certificate: for a client that only tests the server's side.
#[derive(Debug)]
struct AcceptAnyServer;

impl ServerCertVerifier for AcceptAnyServer {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algs = rustls::crypto::ring::default_provider().signature_verification_algorithms;
        rustls::crypto::verify_tls12_signature(message, cert, dss, &algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algs = rustls::crypto::ring::default_provider().signature_verification_algorithms;
        rustls::crypto::verify_tls13_signature(message, cert, dss, &algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        rustls::crypto::ring::default_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}
