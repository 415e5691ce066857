//! The bidirectional pump: bytes both ways until both sides have closed.
//!
//! Each direction reads only when the socket is readable and writes everything it read
//! before reading again, so a slow reader on one side holds back its writer instead of
//! growing a buffer (backpressure, not buffering). A direction that sees end-of-stream
//! shuts down the write side of the other socket and the opposite direction keeps
//! flowing (half-close). Buffers start small, grow while reads fill them, and are
//! released whenever a socket runs dry, so an idle connection holds no buffer at all.
//!
//! Between two TCP sockets, a read that fills a 64 KiB buffer marks a bulk transfer: the
//! direction then moves bytes socket → pipe → socket with `splice(2)`, never copying them
//! through user space, until the socket runs dry, when the pipe is closed again (so idle
//! and chatty connections hold no pipe). Where the kernel cannot splice, the buffered
//! copy carries on. `benches/README.md` has the measurements behind these choices.

use std::future::Future;
use std::io;
use std::net::Shutdown;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use prometheus::IntCounter;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, Interest};
use tokio::net::TcpStream;

/// First read buffer of a burst; small so short exchanges stay cheap.
const INITIAL_BUFFER: usize = 4 * 1024;
/// Largest read buffer; reached only by bulk transfers that cannot splice.
const MAX_BUFFER: usize = 256 * 1024;
/// A read that fills a buffer this big marks a bulk transfer, which then moves through
/// a pipe with `splice(2)` (no copy through user space) until the socket runs dry.
const SPLICE_AFTER: usize = 64 * 1024;
/// Pipe size asked for, and most bytes moved per `splice(2)` call.
const SPLICE_CHUNK: usize = 256 * 1024;

/// Why the pump stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyEnd {
    /// Both directions reached end-of-stream.
    Closed,
    /// No bytes moved either way for the idle timeout.
    IdleTimeout,
    /// The connection reached its maximum duration.
    DurationTimeout,
    /// Cut short by the drain deadline.
    Drained,
    /// A socket error (usually a reset) ended it.
    Error,
}

/// Bytes moved and how it ended.
#[derive(Debug, Clone, Copy)]
pub struct CopyOutcome {
    /// Bytes from downstream to upstream.
    pub to_upstream: u64,
    /// Bytes from upstream to downstream.
    pub to_downstream: u64,
    pub end: CopyEnd,
}

/// Limits that end a connection from the outside.
#[derive(Debug, Clone, Copy)]
pub struct CopyLimits {
    pub idle_timeout: Duration,
    pub max_duration: Option<Duration>,
}

/// Counters that the pump adds to as bytes move, so metrics are exact and live.
pub struct ByteCounters<'a> {
    pub to_upstream: Option<&'a IntCounter>,
    pub to_downstream: Option<&'a IntCounter>,
}

/// Shared between both directions and the idle watchdog.
struct Activity {
    origin: Instant,
    last_ms: AtomicU64,
    to_upstream: AtomicU64,
    to_downstream: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Activity {
            origin: Instant::now(),
            last_ms: AtomicU64::new(0),
            to_upstream: AtomicU64::new(0),
            to_downstream: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        let ms = self.origin.elapsed().as_millis() as u64;
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    fn idle_for(&self) -> Duration {
        let now = self.origin.elapsed().as_millis() as u64;
        Duration::from_millis(now.saturating_sub(self.last_ms.load(Ordering::Relaxed)))
    }
}

/// Copies between two TCP sockets until both directions have closed, a limit fires, or
/// `shutdown` completes.
pub async fn copy_tcp(
    downstream: &TcpStream,
    upstream: &TcpStream,
    limits: CopyLimits,
    counters: ByteCounters<'_>,
    shutdown: impl Future<Output = ()>,
) -> CopyOutcome {
    let activity = Activity::new();
    let pumps = async {
        let (a, b) = tokio::join!(
            pump_tcp(
                downstream,
                upstream,
                &activity,
                &activity.to_upstream,
                counters.to_upstream
            ),
            pump_tcp(
                upstream,
                downstream,
                &activity,
                &activity.to_downstream,
                counters.to_downstream
            ),
        );
        if a.is_err() || b.is_err() {
            CopyEnd::Error
        } else {
            CopyEnd::Closed
        }
    };
    let end = supervise(pumps, &activity, limits, shutdown).await;
    CopyOutcome {
        to_upstream: activity.to_upstream.load(Ordering::Relaxed),
        to_downstream: activity.to_downstream.load(Ordering::Relaxed),
        end,
    }
}

/// Copies between any two byte streams (TLS on either side). Uses fixed 16 KiB buffers:
/// a TLS record is at most 16 KiB of plaintext.
pub async fn copy_streams<D, U>(
    downstream: D,
    upstream: U,
    limits: CopyLimits,
    counters: ByteCounters<'_>,
    shutdown: impl Future<Output = ()>,
) -> CopyOutcome
where
    D: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let activity = Activity::new();
    let (mut dr, mut dw) = tokio::io::split(downstream);
    let (mut ur, mut uw) = tokio::io::split(upstream);
    let pumps = async {
        let (a, b) = tokio::join!(
            pump_stream(
                &mut dr,
                &mut uw,
                &activity,
                &activity.to_upstream,
                counters.to_upstream
            ),
            pump_stream(
                &mut ur,
                &mut dw,
                &activity,
                &activity.to_downstream,
                counters.to_downstream
            ),
        );
        if a.is_err() || b.is_err() {
            CopyEnd::Error
        } else {
            CopyEnd::Closed
        }
    };
    let end = supervise(pumps, &activity, limits, shutdown).await;
    CopyOutcome {
        to_upstream: activity.to_upstream.load(Ordering::Relaxed),
        to_downstream: activity.to_downstream.load(Ordering::Relaxed),
        end,
    }
}

async fn supervise(
    pumps: impl Future<Output = CopyEnd>,
    activity: &Activity,
    limits: CopyLimits,
    shutdown: impl Future<Output = ()>,
) -> CopyEnd {
    let idle = async {
        loop {
            let idle_for = activity.idle_for();
            if idle_for >= limits.idle_timeout {
                return;
            }
            tokio::time::sleep(limits.idle_timeout - idle_for).await;
        }
    };
    let max_duration = async {
        match limits.max_duration {
            Some(d) => tokio::time::sleep(d).await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        end = pumps => end,
        () = idle => CopyEnd::IdleTimeout,
        () = max_duration => CopyEnd::DurationTimeout,
        () = shutdown => CopyEnd::Drained,
    }
}

async fn pump_tcp(
    from: &TcpStream,
    to: &TcpStream,
    activity: &Activity,
    total: &AtomicU64,
    counter: Option<&IntCounter>,
) -> io::Result<()> {
    let mut size = INITIAL_BUFFER;
    let mut buf: Option<Vec<u8>> = None;
    let mut splice_ok = true;
    loop {
        from.readable().await?;
        let b = buf.get_or_insert_with(|| Vec::with_capacity(size));
        b.clear();
        match from.try_read_buf(b) {
            Ok(0) => {
                // End of stream one way: pass the FIN on, keep the other way open.
                let _ = socket2::SockRef::from(to).shutdown(Shutdown::Write);
                return Ok(());
            }
            Ok(n) => {
                write_all_tcp(to, &b[..n]).await?;
                account(activity, total, counter, n);
                if n == b.capacity() {
                    if size >= SPLICE_AFTER && splice_ok {
                        // A bulk transfer: move the rest through a pipe, no copies.
                        buf = None;
                        match splice_burst(from, to, activity, total, counter).await? {
                            Burst::Dry => size = INITIAL_BUFFER,
                            Burst::Eof => return Ok(()),
                            Burst::Unsupported => splice_ok = false,
                        }
                    } else if size < MAX_BUFFER {
                        size = (size * 4).min(MAX_BUFFER);
                        buf = None;
                    }
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                // The socket ran dry: give the buffer back while we wait.
                buf = None;
                size = INITIAL_BUFFER.max(size / 4);
            }
            Err(e) => {
                let _ = socket2::SockRef::from(to).shutdown(Shutdown::Write);
                return Err(e);
            }
        }
    }
}

/// How a run of `splice(2)` calls ended.
enum Burst {
    /// The source socket ran dry; the pipe is closed again.
    Dry,
    /// End of stream, already passed on as a FIN.
    Eof,
    /// The kernel cannot splice these sockets; nothing was moved.
    Unsupported,
}

/// Moves bytes `from` → pipe → `to` with `splice(2)` until `from` runs dry or ends.
/// Every byte that leaves the pipe is counted; the pipe is always empty on return
/// (other than on error, when the connection is over anyway).
async fn splice_burst(
    from: &TcpStream,
    to: &TcpStream,
    activity: &Activity,
    total: &AtomicU64,
    counter: Option<&IntCounter>,
) -> io::Result<Burst> {
    let Ok(pipe) = Pipe::new() else {
        // Out of descriptors: stay on the buffered copy rather than fail the connection.
        return Ok(Burst::Unsupported);
    };
    let mut first = true;
    loop {
        from.readable().await?;
        let moved = from.try_io(Interest::READABLE, || {
            splice(from.as_raw_fd(), pipe.write.as_raw_fd(), SPLICE_CHUNK)
        });
        let mut in_pipe = match moved {
            Ok(0) => {
                let _ = socket2::SockRef::from(to).shutdown(Shutdown::Write);
                return Ok(Burst::Eof);
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Burst::Dry),
            Err(e) if first && matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENOSYS)) => {
                return Ok(Burst::Unsupported);
            }
            Err(e) => {
                let _ = socket2::SockRef::from(to).shutdown(Shutdown::Write);
                return Err(e);
            }
        };
        first = false;
        while in_pipe > 0 {
            to.writable().await?;
            match to.try_io(Interest::WRITABLE, || {
                splice(pipe.read.as_raw_fd(), to.as_raw_fd(), in_pipe)
            }) {
                Ok(n) => {
                    in_pipe -= n;
                    account(activity, total, counter, n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
    }
}

/// A non-blocking pipe, the kernel-side buffer of a splice.
struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

impl Pipe {
    fn new() -> io::Result<Pipe> {
        let mut fds = [0 as libc::c_int; 2];
        // SAFETY: `fds` is a valid array of two ints for pipe2 to fill; on success both are
        // fresh descriptors that nothing else owns, so wrapping them in OwnedFd (which
        // closes them exactly once, on drop) is sound.
        let (read, write) = unsafe {
            if libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) != 0 {
                return Err(io::Error::last_os_error());
            }
            (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1]))
        };
        // A bigger pipe means fewer system calls per byte; the kernel may refuse (per-user
        // pipe page limits), and the default 64 KiB still works.
        // SAFETY: F_SETPIPE_SZ takes an int argument and touches no memory of ours.
        unsafe {
            libc::fcntl(
                write.as_raw_fd(),
                libc::F_SETPIPE_SZ,
                SPLICE_CHUNK as libc::c_int,
            );
        }
        Ok(Pipe { read, write })
    }
}

/// One non-blocking `splice(2)` between two descriptors, at most `len` bytes.
fn splice(fd_in: RawFd, fd_out: RawFd, len: usize) -> io::Result<usize> {
    // SAFETY: both descriptors are open for the whole call (borrowed from a live TcpStream
    // or the Pipe, which outlive it); the offsets must be null for pipes and sockets; the
    // kernel reads and writes no memory of ours.
    let n = unsafe {
        libc::splice(
            fd_in,
            std::ptr::null_mut(),
            fd_out,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_NONBLOCK | libc::SPLICE_F_MOVE,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Writes all of `data` to a TCP socket shared by reference.
pub(crate) async fn write_all_tcp(to: &TcpStream, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        to.writable().await?;
        match to.try_write(data) {
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

async fn pump_stream<R, W>(
    from: &mut R,
    to: &mut W,
    activity: &Activity,
    total: &AtomicU64,
    counter: Option<&IntCounter>,
) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(n) => n,
            Err(e) => {
                let _ = to.shutdown().await;
                return Err(e);
            }
        };
        if n == 0 {
            let _ = to.shutdown().await;
            return Ok(());
        }
        to.write_all(&buf[..n]).await?;
        to.flush().await?;
        account(activity, total, counter, n);
    }
}

fn account(activity: &Activity, total: &AtomicU64, counter: Option<&IntCounter>, n: usize) {
    total.fetch_add(n as u64, Ordering::Relaxed);
    if let Some(c) = counter {
        c.inc_by(n as u64);
    }
    activity.touch();
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (s, _) = l.accept().await.unwrap();
        (c, s)
    }

    fn pattern(i: usize) -> u8 {
        (i * 7 + i / 251) as u8
    }

    /// A bulk upload (long enough to take the splice path) arrives intact and counted to
    /// the byte, the FIN is passed on, and the reply still flows the other way after it.
    #[tokio::test]
    async fn bulk_then_reply_after_half_close() {
        const LEN: usize = 8 * 1024 * 1024 + 123;
        let (mut client, down) = pair().await;
        let (up, mut server) = pair().await;
        let pump = tokio::spawn(async move {
            copy_tcp(
                &down,
                &up,
                CopyLimits {
                    idle_timeout: Duration::from_secs(30),
                    max_duration: None,
                },
                ByteCounters {
                    to_upstream: None,
                    to_downstream: None,
                },
                std::future::pending(),
            )
            .await
        });
        let writer = tokio::spawn(async move {
            let data: Vec<u8> = (0..LEN).map(pattern).collect();
            for chunk in data.chunks(300 * 1024) {
                client.write_all(chunk).await.unwrap();
            }
            client.shutdown().await.unwrap();
            let mut reply = Vec::new();
            client.read_to_end(&mut reply).await.unwrap();
            reply
        });
        let mut got = Vec::with_capacity(LEN);
        server.read_to_end(&mut got).await.unwrap();
        assert_eq!(got.len(), LEN);
        assert!(got.iter().enumerate().all(|(i, &b)| b == pattern(i)));
        server.write_all(b"done").await.unwrap();
        server.shutdown().await.unwrap();
        assert_eq!(writer.await.unwrap(), b"done");
        let outcome = pump.await.unwrap();
        assert_eq!(outcome.to_upstream, LEN as u64);
        assert_eq!(outcome.to_downstream, 4);
        assert_eq!(outcome.end, CopyEnd::Closed);
    }
}
