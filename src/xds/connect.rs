//! The connection to istiod: TCP, then TLS verified by the mesh root (or plaintext when
//! the address says `http://`), handed to tonic as an HTTP/2 channel; and the request
//! headers istiod authenticates (`authorization: Bearer <token>`, `clusterid`).
//!
//! The TLS handshake is done here rather than inside tonic so that a failure names its
//! cause: an unreadable root file, a certificate the root does not verify, a name it
//! does not carry.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tonic::metadata::MetadataValue;
use tonic::transport::{Channel, Endpoint};

use crate::model::ControlPlane;

/// TCP connect and TLS handshake together.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Why no stream could be opened; each names what an operator should look at.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("cannot resolve or reach {address}: {source}")]
    Tcp {
        address: String,
        source: std::io::Error,
    },
    #[error("root certificate {path}: {reason}")]
    Root { path: String, reason: String },
    #[error(
        "TLS handshake with {address} failed: {reason} (is istiod's certificate signed by the root in {root} and valid for {name}?)"
    )]
    Tls {
        address: String,
        root: String,
        name: String,
        reason: String,
    },
    #[error("token file {path}: {reason}")]
    Token { path: String, reason: String },
    #[error("HTTP/2 to {address}: {reason}")]
    Http2 { address: String, reason: String },
}

impl ConnectError {
    /// Bounded metric label.
    pub fn reason(&self) -> &'static str {
        match self {
            ConnectError::Tcp { .. } => "connect",
            ConnectError::Root { .. } => "root_cert",
            ConnectError::Tls { .. } => "tls",
            ConnectError::Token { .. } => "token",
            ConnectError::Http2 { .. } => "http2",
        }
    }
}

/// Opens one channel to istiod for one stream.
pub async fn channel(d: &ControlPlane) -> Result<Channel, ConnectError> {
    let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&d.address))
        .await
        .unwrap_or_else(|_| {
            Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "timed out",
            ))
        })
        .map_err(|source| ConnectError::Tcp {
            address: d.address.clone(),
            source,
        })?;
    let _ = tcp.set_nodelay(true);
    let _ = socket2::SockRef::from(&tcp).set_tcp_keepalive(
        &socket2::TcpKeepalive::new()
            .with_time(Duration::from_secs(300))
            .with_interval(Duration::from_secs(75)),
    );
    // HTTP/2 keep-alive finds a peer that vanished without a FIN.
    let endpoint = Endpoint::from_shared(format!("http://{}", d.address))
        .map_err(|e| ConnectError::Http2 {
            address: d.address.clone(),
            reason: e.to_string(),
        })?
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true);
    if d.plaintext {
        return hand_over(&endpoint, d, tcp).await;
    }
    let config = tls_config(d)?;
    let name = ServerName::try_from(d.server_name.clone()).map_err(|e| ConnectError::Tls {
        address: d.address.clone(),
        root: d.root_cert.display().to_string(),
        name: d.server_name.clone(),
        reason: format!("{:?} is not a DNS name or IP address: {e}", d.server_name),
    })?;
    let tls = tokio::time::timeout(
        CONNECT_TIMEOUT,
        tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, tcp),
    )
    .await
    .unwrap_or_else(|_| {
        Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "timed out",
        ))
    })
    .map_err(|e| ConnectError::Tls {
        address: d.address.clone(),
        root: d.root_cert.display().to_string(),
        name: d.server_name.clone(),
        reason: e.to_string(),
    })?;
    hand_over(&endpoint, d, tls).await
}

/// Gives tonic the connection already made; a reconnect inside tonic fails, so a lost
/// connection ends the stream and the client's own loop (with its backoff) reconnects.
async fn hand_over<S>(
    endpoint: &Endpoint,
    d: &ControlPlane,
    stream: S,
) -> Result<Channel, ConnectError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    let slot = Arc::new(Mutex::new(Some(stream)));
    let connector = tower::service_fn(move |_: tonic::codegen::http::Uri| {
        let taken = slot.lock().unwrap_or_else(|e| e.into_inner()).take();
        async move {
            taken.map(TokioIo::new).ok_or_else(|| {
                std::io::Error::new(
                    std::io::ErrorKind::NotConnected,
                    "connection to the control plane closed",
                )
            })
        }
    });
    endpoint
        .connect_with_connector(connector)
        .await
        .map_err(|e| ConnectError::Http2 {
            address: d.address.clone(),
            reason: error_chain(&e),
        })
}

fn tls_config(d: &ControlPlane) -> Result<rustls::ClientConfig, ConnectError> {
    let path = d.root_cert.display().to_string();
    let root_err = |reason: String| ConnectError::Root {
        path: path.clone(),
        reason,
    };
    let pem = std::fs::read(&d.root_cert).map_err(|e| root_err(e.to_string()))?;
    let mut roots = rustls::RootCertStore::empty();
    let mut found = 0;
    for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
        let cert = cert.map_err(|e| root_err(format!("not PEM: {e}")))?;
        roots
            .add(cert)
            .map_err(|e| root_err(format!("not a usable CA certificate: {e}")))?;
        found += 1;
    }
    if found == 0 {
        return Err(root_err("holds no certificate".into()));
    }
    let provider = crate::tls::provider::client_provider();
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| root_err(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// The headers istiod authenticates a stream by, read fresh for each stream: the
/// projected token rotates under the pod.
pub fn headers(
    d: &ControlPlane,
) -> Result<Vec<(&'static str, MetadataValue<tonic::metadata::Ascii>)>, ConnectError> {
    let mut out = Vec::new();
    if let Some(path) = &d.token {
        let shown = path.display().to_string();
        let err = |reason: String| ConnectError::Token {
            path: shown.clone(),
            reason,
        };
        let token = std::fs::read_to_string(path).map_err(|e| {
            err(if e.kind() == std::io::ErrorKind::NotFound {
                "missing (is the projected istio-token volume mounted?)".to_string()
            } else {
                e.to_string()
            })
        })?;
        let token = token.trim();
        if token.is_empty() {
            return Err(err("empty".into()));
        }
        let value = format!("Bearer {token}")
            .parse()
            .map_err(|_| err("not a valid header value".into()))?;
        out.push(("authorization", value));
    }
    if !d.cluster_id.is_empty()
        && let Ok(v) = d.cluster_id.parse()
    {
        out.push(("clusterid", v));
    }
    Ok(out)
}

/// An error with its sources, for a log line.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let next = c.to_string();
        if !s.contains(&next) {
            s.push_str(": ");
            s.push_str(&next);
        }
        cur = c.source();
    }
    s
}
