//! Binding listeners (with `SO_REUSEPORT`, so a new process can bind beside a draining
//! one) and the accept loop.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::TcpListener;

use super::{DrainState, Shared, passthrough};

#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error("cannot listen on {addr}: address already in use by another program")]
    InUse { addr: SocketAddr },
    #[error(
        "cannot listen on {addr}: permission denied (ports below 1024 need CAP_NET_BIND_SERVICE)"
    )]
    Permission { addr: SocketAddr },
    #[error("cannot listen on {addr}: {source}")]
    Other {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
}

/// Binds a TCP listener with `SO_REUSEADDR` and `SO_REUSEPORT`.
pub fn bind(addr: SocketAddr) -> Result<TcpListener, BindError> {
    let wrap = |source: io::Error| match source.kind() {
        io::ErrorKind::AddrInUse => BindError::InUse { addr },
        io::ErrorKind::PermissionDenied => BindError::Permission { addr },
        _ => BindError::Other { addr, source },
    };
    let socket =
        Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP)).map_err(wrap)?;
    socket.set_reuse_address(true).map_err(wrap)?;
    socket.set_reuse_port(true).map_err(wrap)?;
    socket.set_tcp_nodelay(true).map_err(wrap)?;
    socket.set_nonblocking(true).map_err(wrap)?;
    socket.bind(&addr.into()).map_err(wrap)?;
    socket.listen(4096).map_err(wrap)?;
    TcpListener::from_std(socket.into()).map_err(wrap)
}

/// Accepts until the gateway drains. Descriptor exhaustion pauses accepting briefly
/// instead of spinning; every other accept error is counted and skipped.
pub async fn accept_loop(listener: TcpListener, addr: SocketAddr, shared: Arc<Shared>) {
    let mut drain = shared.subscribe_drain();
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = drain.wait_for(|s| *s != DrainState::Serving) => {
                tracing::info!(%addr, "stopped accepting (draining)");
                return;
            }
        };
        match accepted {
            Ok((stream, peer)) => {
                let shared = shared.clone();
                tokio::spawn(passthrough::handle(shared, addr, stream, peer));
            }
            Err(e) => {
                let fd_exhausted = matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE));
                let kind = if fd_exhausted {
                    "fd_exhausted"
                } else {
                    "other"
                };
                shared
                    .telemetry
                    .metrics
                    .accept_errors
                    .with_label_values(&[kind])
                    .inc();
                if fd_exhausted {
                    tracing::warn!(%addr, error = %e, "out of file descriptors; pausing accept");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                } else {
                    tracing::debug!(%addr, error = %e, "accept failed");
                }
            }
        }
    }
}
