//! Handing the listening sockets to a replacement process (`strait run --handover PATH`).
//!
//! A replacement that binds its own socket beside the old one (`SO_REUSEPORT`) leaves a
//! gap: when the old process closes its socket, the kernel resets whatever was queued
//! on it (see `proxy::listener`). Handing over the socket itself leaves none: the kernel
//! object, with its accept queue and the handshakes in flight on it, stays open in the
//! new process, and from then on both processes accept from the same queue until the
//! old one stops. Envoy's hot restart and HAProxy's `-x` work the same way.
//!
//! The running process serves a Unix stream socket at PATH. The exchange:
//!
//! 1. The new process connects. The old one sends one message per gateway or bridge
//!    listener, the byte `L` carrying the socket as `SCM_RIGHTS`, then the byte `E`.
//! 2. The new process binds its configuration, taking an inherited socket wherever its
//!    local address is one the configuration asks for (the rest are closed), takes PATH
//!    over for the next replacement, and writes `ready\n`.
//! 3. On `ready` the old process stops accepting at once and drains as on SIGTERM. If
//!    the new process closes the connection or exits before that, the old one keeps
//!    serving and waits for the next replacement.

use std::collections::HashMap;
use std::io::{self, BufRead, BufReader, IoSlice, IoSliceMut, Write};
use std::mem::MaybeUninit;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};
use tokio::sync::{mpsc, oneshot};

/// How long the old process waits for `ready` after sending its sockets. Covers loading
/// certificates and binding; a replacement slower than this is treated as failed.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// How long either side waits on a single read or write of the exchange.
const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// Listener sockets received from the process being replaced.
#[derive(Default)]
pub struct Inherited {
    listeners: HashMap<SocketAddr, TcpListener>,
    old: Option<UnixStream>,
}

impl Inherited {
    /// Asks the process serving `path` for its listeners. Nothing serving there (no
    /// file, or a stale one nobody listens on) is a first start: no sockets, no error.
    pub fn receive(path: &Path) -> io::Result<Inherited> {
        let stream = match UnixStream::connect(path) {
            Ok(s) => s,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
                ) =>
            {
                return Ok(Inherited::default());
            }
            Err(e) => return Err(e),
        };
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
        stream.set_write_timeout(Some(IO_TIMEOUT))?;
        let mut listeners = HashMap::new();
        loop {
            let (tag, fd) = recv_one(&stream)?;
            match (tag, fd) {
                (b'L', Some(fd)) => {
                    let listener = TcpListener::from(fd);
                    // Keyed by what the kernel says the socket is bound to, not by
                    // anything the sender claims.
                    let addr = listener.local_addr()?;
                    listeners.insert(addr, listener);
                }
                (b'E', None) => break,
                (tag, _) => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("unexpected hand-over message {tag:#04x}"),
                    ));
                }
            }
        }
        Ok(Inherited {
            listeners,
            old: Some(stream),
        })
    }

    /// The inherited socket bound to `addr`, ready for the reactor, if there is one.
    pub fn take(&mut self, addr: SocketAddr) -> Option<io::Result<TcpListener>> {
        let l = self.listeners.remove(&addr)?;
        Some(l.set_nonblocking(true).map(|()| l))
    }

    /// Whether a process handed its sockets over.
    pub fn from_process(&self) -> bool {
        self.old.is_some()
    }

    /// Closes the sockets nobody took (listeners the new configuration dropped); returns
    /// how many there were.
    pub fn close_unused(&mut self) -> usize {
        let n = self.listeners.len();
        self.listeners.clear();
        n
    }

    /// Tells the old process that this one serves now, so it stops accepting and drains.
    pub fn confirm(&mut self) -> io::Result<()> {
        match self.old.take() {
            Some(mut s) => s.write_all(b"ready\n"),
            None => Ok(()),
        }
    }
}

fn recv_one(stream: &UnixStream) -> io::Result<(u8, Option<OwnedFd>)> {
    let mut tag = [0u8; 1];
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let msg = rustix::net::recvmsg(
        stream,
        &mut [IoSliceMut::new(&mut tag)],
        &mut control,
        RecvFlags::CMSG_CLOEXEC,
    )?;
    if msg.bytes == 0 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the old process closed the hand-over before sending every listener",
        ));
    }
    let mut fd = None;
    for m in control.drain() {
        if let RecvAncillaryMessage::ScmRights(fds) = m {
            for f in fds {
                // More than one descriptor in a message is not part of the exchange;
                // extras are closed as they drop.
                if fd.is_none() {
                    fd = Some(f);
                }
            }
        }
    }
    Ok((tag[0], fd))
}

fn send_one(stream: &UnixStream, tag: u8, fd: Option<&OwnedFd>) -> io::Result<()> {
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    let fds;
    if let Some(fd) = fd {
        fds = [fd.as_fd()];
        // The buffer is sized for exactly one descriptor, so this push fits.
        if !control.push(SendAncillaryMessage::ScmRights(&fds)) {
            return Err(io::Error::other("ancillary buffer too small"));
        }
    }
    rustix::net::sendmsg(
        stream,
        &[IoSlice::new(&[tag])],
        &mut control,
        SendFlags::empty(),
    )?;
    Ok(())
}

/// What the hand-over server asks of the process that owns the listeners.
pub enum Request {
    /// Duplicates of every listening socket, to send to a replacement.
    Listeners(oneshot::Sender<Vec<OwnedFd>>),
    /// A replacement confirmed it serves: stop accepting and drain.
    HandedOver,
}

/// The Unix socket a replacement connects to.
pub struct Server {
    path: PathBuf,
    /// Device and inode of the socket file this process created, to tell it apart from
    /// a successor's at the same path.
    file: (u64, u64),
    task: tokio::task::JoinHandle<()>,
}

impl Server {
    /// Serves `path`, replacing whatever is there. The socket is bound under a temporary
    /// name and renamed into place, so a replacement never finds the path missing.
    pub fn start(path: &Path, requests: mpsc::Sender<Request>) -> io::Result<Server> {
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(format!(".{}", std::process::id()));
        let tmp = PathBuf::from(tmp);
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let _ = std::fs::remove_file(&tmp);
        let std_listener = std::os::unix::net::UnixListener::bind(&tmp)?;
        // Whoever can connect gets the listening sockets: the owner only.
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))?;
        let meta = std::fs::metadata(&tmp)?;
        std::fs::rename(&tmp, path)?;
        std_listener.set_nonblocking(true)?;
        let listener = tokio::net::UnixListener::from_std(std_listener)?;
        let task = tokio::spawn(serve(listener, requests));
        Ok(Server {
            path: path.to_owned(),
            file: (meta.dev(), meta.ino()),
            task,
        })
    }

    /// Stops serving; removes the socket file unless a successor has replaced it.
    pub fn close(self) {
        self.task.abort();
        if let Ok(meta) = std::fs::metadata(&self.path)
            && (meta.dev(), meta.ino()) == self.file
        {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

async fn serve(listener: tokio::net::UnixListener, requests: mpsc::Sender<Request>) {
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::warn!(error = %e, "hand-over socket: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (reply, fds) = oneshot::channel();
        if requests.send(Request::Listeners(reply)).await.is_err() {
            return;
        }
        let Ok(fds) = fds.await else { return };
        let count = fds.len();
        // One replacement at a time; the exchange is short blocking I/O.
        let outcome = tokio::task::spawn_blocking(move || hand_over(stream, &fds)).await;
        match outcome {
            Ok(Ok(())) => {
                tracing::info!(
                    listeners = count,
                    "a replacement process took the listeners over; draining"
                );
                let _ = requests.send(Request::HandedOver).await;
                return;
            }
            Ok(Err(e)) => tracing::warn!(
                error = %e,
                "a replacement process did not confirm the hand-over; still serving"
            ),
            Err(e) => tracing::warn!(error = %e, "hand-over task failed; still serving"),
        }
    }
}

fn hand_over(stream: tokio::net::UnixStream, fds: &[OwnedFd]) -> io::Result<()> {
    let stream = stream.into_std()?;
    stream.set_nonblocking(false)?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    for fd in fds {
        send_one(&stream, b'L', Some(fd))?;
    }
    send_one(&stream, b'E', None)?;
    stream.set_read_timeout(Some(READY_TIMEOUT))?;
    let mut line = String::new();
    BufReader::new(&stream).read_line(&mut line)?;
    if line == "ready\n" {
        Ok(())
    } else if line.is_empty() {
        Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "it closed the connection (exited, or could not start)",
        ))
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("unexpected reply {line:?}"),
        ))
    }
}
