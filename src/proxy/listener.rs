//! Binding listeners (with `SO_REUSEPORT`, so a new process can bind beside a draining
//! one) and the accept loop.
//!
//! # Handing over to a new process
//!
//! Every listening socket of every strait process on one address joins one
//! `SO_REUSEPORT` group, and the kernel spreads new connections over the group by a
//! hash of the 4-tuple. Each socket has its own accept queue: when a process closes its
//! socket, whatever sits in that queue (handshake done, not yet accepted) is reset, and
//! so is a handshake in flight on it. Nothing short of a BPF steering program or the
//! `net.ipv4.tcp_migrate_req` sysctl moves them to a sibling socket.
//!
//! So a listener is never simply dropped. When told to stop, the accept loop takes the
//! socket out of the reactor and accepts whatever is queued without waiting, handing
//! each connection to the data path as usual, and closes the socket right after the
//! first empty accept. What is left is the time of one system call between that empty
//! accept and the close, during which a connection hashed to this socket would still be
//! reset; with `tcp_migrate_req=1` the kernel migrates even those. The drain
//! ([`super::Gateway::shutdown`]) keeps accepting for a short overlap before it stops,
//! so a replacement started together with the signal has time to bind. A restart that
//! must not lose even that hands the socket itself over instead (`super::handover`).

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

use super::{Shared, bridge, hbone, passthrough};
use crate::model::ServerTlsMode;

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

impl BindError {
    fn from_io(addr: SocketAddr, source: io::Error) -> BindError {
        match source.kind() {
            io::ErrorKind::AddrInUse => BindError::InUse { addr },
            io::ErrorKind::PermissionDenied => BindError::Permission { addr },
            _ => BindError::Other { addr, source },
        }
    }
}

/// Accept queue length asked of the kernel (capped by `net.core.somaxconn`).
const BACKLOG: i32 = 4096;

/// How long to wait before retrying accept when the process is out of descriptors.
const FD_EXHAUSTED_PAUSE: Duration = Duration::from_millis(100);

/// Upper bound on the final sweep of a stopping listener's accept queue.
const SWEEP_LIMIT: Duration = Duration::from_secs(1);

/// Binds a non-blocking TCP listener with `SO_REUSEADDR` and `SO_REUSEPORT`, so that a
/// second strait process (same user) can bind the same address while this one drains.
/// Used for the gateway listeners and the status/metrics/admin servers alike.
pub fn bind_reuseport(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    Ok(socket.into())
}

/// Binds a gateway listener (see [`bind_reuseport`]).
pub fn bind(addr: SocketAddr) -> Result<TcpListener, BindError> {
    let std = bind_reuseport(addr).map_err(|e| BindError::from_io(addr, e))?;
    TcpListener::from_std(std).map_err(|e| BindError::from_io(addr, e))
}

fn fd_exhausted(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE))
}

/// Accepts until `stop` fires (or its sender is dropped), then sweeps the accept queue
/// and closes the socket (see the module docs). Descriptor exhaustion pauses accepting
/// briefly instead of spinning: the connection waits in the kernel's queue until a
/// descriptor frees up. Every other accept error is counted and skipped.
pub async fn accept_loop(
    listener: TcpListener,
    addr: SocketAddr,
    shared: Arc<Shared>,
    mut stop: oneshot::Receiver<()>,
) {
    loop {
        let accepted = tokio::select! {
            biased;
            _ = &mut stop => break,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((stream, peer)) => serve(&shared, addr, stream, peer),
            Err(e) => {
                count_accept_error(&shared, &e);
                if fd_exhausted(&e) {
                    tracing::warn!(%addr, error = %e, "out of file descriptors; pausing accept");
                    // Still honour a stop while paused.
                    tokio::select! {
                        biased;
                        _ = &mut stop => break,
                        () = tokio::time::sleep(FD_EXHAUSTED_PAUSE) => {}
                    }
                } else {
                    tracing::debug!(%addr, error = %e, "accept failed");
                }
            }
        }
    }
    close_after_sweep(listener, addr, &shared).await;
}

/// Hands an accepted connection to its own task, tracked for the drain from this moment.
/// The configuration in force says what the address is: a Bridge or a Gateway listener.
fn serve(shared: &Arc<Shared>, addr: SocketAddr, stream: TcpStream, peer: SocketAddr) {
    let live = shared.track();
    let (is_bridge, is_hbone) = {
        let runtime = shared.runtime.load();
        (
            runtime.bridge_at(&addr).is_some(),
            runtime
                .servers_for(&addr)
                .first()
                .is_some_and(|s| s.mode == ServerTlsMode::Hbone),
        )
    };
    let shared = shared.clone();
    if is_hbone {
        // Boxed, as the bridge's: the HBONE connection's task is larger than passthrough's.
        tokio::spawn(Box::pin(hbone::handle(shared, addr, stream, peer, live)));
    } else if is_bridge {
        tokio::spawn(async move {
            // Boxed so a gateway connection's task is not sized for the bridge's.
            Box::pin(bridge::handle(shared, addr, stream, peer)).await;
            drop(live);
        });
    } else {
        // Spawned as is, not wrapped, so the task is exactly the ClientHello phase's
        // size; `live` is handed on to the copy task when the connection gets that far.
        tokio::spawn(passthrough::handle(shared, addr, stream, peer, live));
    }
}

fn count_accept_error(shared: &Shared, e: &io::Error) {
    let kind = if fd_exhausted(e) {
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
}

/// Accepts what is already queued without waiting, then closes the socket at once.
async fn close_after_sweep(listener: TcpListener, addr: SocketAddr, shared: &Arc<Shared>) {
    // Out of the reactor first, so the close below is the very next system call after
    // the accept that finds the queue empty.
    let listener = match listener.into_std() {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(%addr, error = %e, "cannot sweep the accept queue; closing");
            return;
        }
    };
    let give_up = Instant::now() + SWEEP_LIMIT;
    let mut swept = 0usize;
    loop {
        match listener.accept() {
            Ok((stream, peer)) => {
                swept += 1;
                let stream = stream
                    .set_nonblocking(true)
                    .and_then(|()| TcpStream::from_std(stream));
                match stream {
                    Ok(s) => serve(shared, addr, s, peer),
                    Err(e) => tracing::debug!(%addr, error = %e, "swept connection unusable"),
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) => {
                count_accept_error(shared, &e);
                if Instant::now() >= give_up {
                    tracing::warn!(%addr, error = %e, "giving up sweeping the accept queue");
                    break;
                }
                if fd_exhausted(&e) {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
        if Instant::now() >= give_up {
            break;
        }
    }
    drop(listener);
    tracing::info!(%addr, swept, "listener closed; its live connections continue");
}
