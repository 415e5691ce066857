//! `strait demo`: the real gateway on an embedded configuration, with demo workloads on
//! loopback, each a TLS server with its own SPIFFE certificate from a fresh mesh CA.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

use crate::cli::app::{self, RunError, Source};
use crate::tls::certs::load_identity;
use crate::tls::spiffe::SpiffeId;

/// Ports the demo listens on (all on 127.0.0.1).
#[derive(Debug, Clone, Copy)]
pub struct DemoPorts {
    pub gateway: u16,
    pub status: u16,
    pub metrics: u16,
    pub admin: u16,
}

impl Default for DemoPorts {
    fn default() -> Self {
        DemoPorts {
            gateway: 15443,
            status: 15021,
            metrics: 15090,
            admin: 15000,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("demo setup: {0}")]
    Setup(String),
    #[error("{0}")]
    Run(#[from] RunError),
}

struct DemoWorkload {
    name: &'static str,
    sa: &'static str,
    service: &'static str,
    version: &'static str,
}

const WORKLOADS: [DemoWorkload; 3] = [
    DemoWorkload {
        name: "reviews-v1",
        sa: "reviews-v1",
        service: "reviews",
        version: "v1",
    },
    DemoWorkload {
        name: "reviews-v2",
        sa: "reviews-v2",
        service: "reviews",
        version: "v2",
    },
    DemoWorkload {
        name: "ratings-v1",
        sa: "ratings",
        service: "ratings",
        version: "v1",
    },
];

/// Runs the demo until Ctrl-C.
pub fn run(ports: DemoPorts) -> Result<(), DemoError> {
    let dir = std::env::temp_dir().join(format!("strait-demo-{}", std::process::id()));
    let setup = |e: &dyn std::fmt::Display| DemoError::Setup(e.to_string());
    let _ = std::fs::remove_dir_all(&dir);
    let ca_dir = dir.join("ca");
    crate::identity::ca::init_ca("cluster.local", &ca_dir, Duration::from_secs(24 * 3600))
        .map_err(|e| setup(&e))?;
    let rt = app::runtime(None)?;
    let result = rt.block_on(async {
        let mut workload_ports = Vec::new();
        for w in &WORKLOADS {
            let id = SpiffeId::parse(&format!("spiffe://cluster.local/ns/default/sa/{}", w.sa))
                .map_err(|e| setup(&e))?;
            let out = dir.join(w.name);
            crate::identity::ca::issue_svid(&ca_dir, &id, &out, Duration::from_secs(24 * 3600))
                .map_err(|e| setup(&e))?;
            let addr = start_workload(w.name, &out).await.map_err(|e| setup(&e))?;
            workload_ports.push(addr.port());
        }
        let yaml = config(ports, &workload_ports);
        let config_path = dir.join("demo.yaml");
        std::fs::write(&config_path, &yaml).map_err(|e| setup(&e))?;
        let source = Source::Paths(vec![config_path.clone()]);
        let loaded =
            crate::config::load_paths(std::slice::from_ref(&config_path)).map_err(|e| setup(&e))?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        let banner = banner(ports, &dir, &config_path);
        tokio::spawn(async move {
            if rx.await.is_ok() {
                println!("{banner}");
            }
        });
        app::run(source, loaded, Some(tx), app::Handover::default()).await?;
        Ok::<(), DemoError>(())
    });
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// A demo workload: TLS with its SVID, ALPN `istio`; echoes each line prefixed by its name.
async fn start_workload(name: &'static str, certs: &Path) -> Result<SocketAddr, String> {
    let id = load_identity(certs).map_err(|e| e.to_string())?;
    let mut config =
        rustls::ServerConfig::builder_with_provider(crate::tls::provider::server_provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_no_client_auth()
            .with_single_cert(id.chain.clone(), id.key.clone_key())
            .map_err(|e| e.to_string())?;
    config.alpn_protocols = vec![b"istio".to_vec(), b"istio-peer-exchange".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| e.to_string())?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(stream).await else {
                    return;
                };
                let (r, mut w) = tokio::io::split(tls);
                let mut lines = BufReader::new(r).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    let reply = format!("[{name}] {line}\n");
                    if w.write_all(reply.as_bytes()).await.is_err() {
                        break;
                    }
                }
                let _ = w.shutdown().await;
            });
        }
    });
    Ok(addr)
}

fn config(p: DemoPorts, workload_ports: &[u16]) -> String {
    let (r1, r2, ra) = (workload_ports[0], workload_ports[1], workload_ports[2]);
    format!(
        r#"# strait demo: a passthrough east-west gateway in front of three demo workloads.
apiVersion: strait.dev/v1alpha1
kind: Bootstrap
metadata: {{name: demo}}
spec:
  network: demo-network
  status: 127.0.0.1:{status}
  metrics: 127.0.0.1:{metrics}
  admin: 127.0.0.1:{admin}
  drainDuration: 5s
---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {{name: cross-network-gateway, namespace: istio-system}}
spec:
  selector: {{istio: eastwestgateway}}
  servers:
  - port: {{number: {gw}, name: tls, protocol: TLS}}
    bind: 127.0.0.1
    tls: {{mode: AUTO_PASSTHROUGH}}
    hosts: ["*.local"]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: reviews, namespace: default}}
spec:
  hosts: [reviews.default.svc.cluster.local]
  location: MESH_INTERNAL
  resolution: STATIC
  ports:
  - {{number: 9080, name: tcp-reviews, protocol: TCP}}
  endpoints:
  - address: 127.0.0.1
    ports: {{tcp-reviews: {r1}}}
    labels: {{app: reviews, version: v1, security.istio.io/tlsMode: istio}}
  - address: 127.0.0.1
    ports: {{tcp-reviews: {r2}}}
    labels: {{app: reviews, version: v2, security.istio.io/tlsMode: istio}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: reviews, namespace: default}}
spec:
  host: reviews.default.svc.cluster.local
  subsets:
  - name: v1
    labels: {{version: v1}}
  - name: v2
    labels: {{version: v2}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: ratings, namespace: default}}
spec:
  hosts: [ratings.default.svc.cluster.local]
  location: MESH_INTERNAL
  resolution: STATIC
  ports:
  - {{number: 9080, name: tcp-ratings, protocol: TCP, targetPort: {ra}}}
  endpoints:
  - address: 127.0.0.1
    labels: {{app: ratings, version: v1, security.istio.io/tlsMode: istio}}
"#,
        status = p.status,
        metrics = p.metrics,
        admin = p.admin,
        gw = p.gateway,
    )
}

fn banner(p: DemoPorts, dir: &Path, config: &Path) -> String {
    let exe = std::env::current_exe()
        .ok()
        .map(|e| e.display().to_string())
        .unwrap_or_else(|| "strait".into());
    let root = dir.join("ca").join("root-cert.pem");
    let v2 = "outbound_.9080_.v2_.reviews.default.svc.cluster.local";
    let ratings = "outbound_.9080_._.ratings.default.svc.cluster.local";
    let roots = root.display();
    let gw = p.gateway;
    let workloads: Vec<String> = WORKLOADS
        .iter()
        .map(|w| {
            format!(
                "  {:<11} {}.default.svc.cluster.local:9080 subset {}  spiffe://cluster.local/ns/default/sa/{}",
                w.name, w.service, w.version, w.sa
            )
        })
        .collect();
    let config = PathBuf::from(config).display().to_string();
    format!(
        r#"
strait demo is running: an AUTO_PASSTHROUGH gateway on 127.0.0.1:{gw} in front of
{workloads}

Paste these into another terminal:

# TLS goes end to end: the workload (not the gateway) answers, and echoes your line.
(echo hello through strait; sleep 1) | openssl s_client -quiet -no_ign_eof -connect 127.0.0.1:{gw} -servername {v2} -alpn istio -CAfile {roots} -verify_return_error

# The certificate the client sees is the workload's SPIFFE SVID.
openssl s_client -connect 127.0.0.1:{gw} -servername {ratings} -alpn istio -CAfile {roots} </dev/null 2>/dev/null | openssl x509 -noout -ext subjectAltName

# Metrics: connections and bytes per service.
curl -s 127.0.0.1:{metrics}/stats/prometheus | grep -E '^istio_tcp_connections_opened_total|^strait_refusals_total'

# How a name routes, and why another does not.
{exe} route -c {config} {v2}
{exe} route -c {config} outbound_.9080_.v3_.reviews.default.svc.cluster.local

# Endpoint state and the configuration in force.
curl -s 127.0.0.1:{admin}/clusters

Access log lines (JSON) follow on stdout. Ctrl-C drains and exits.
"#,
        workloads = workloads.join("\n"),
        metrics = p.metrics,
        admin = p.admin,
    )
}
