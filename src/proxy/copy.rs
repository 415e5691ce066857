//! The bidirectional pump: bytes both ways until both sides have closed.
//!
//! Each direction reads only when the socket is readable and writes everything it read
//! before reading again, so a slow reader on one side holds back its writer instead of
//! growing a buffer (backpressure, not buffering). A direction that sees end-of-stream
//! shuts down the write side of the other socket and the opposite direction keeps
//! flowing (half-close). A socket error ends both directions at once; when the client's
//! side broke, the endpoint's side is reset rather than closed. Buffers start small, grow
//! while reads fill them, and are released whenever a socket runs dry, so an idle
//! connection holds no buffer at all.

use std::borrow::BorrowMut;
use std::future::Future;
use std::io;
use std::net::Shutdown;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use prometheus::IntCounter;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// First read buffer of a burst; small so short exchanges stay cheap.
const INITIAL_BUFFER: u32 = 4 * 1024;
/// Largest read buffer; reached only by bulk transfers.
const MAX_BUFFER: u32 = 256 * 1024;

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

/// The idle and maximum-duration limits as deadlines, served by one timer re-armed for
/// the nearer of the two.
#[derive(Debug, Clone, Copy)]
struct Deadlines {
    idle_timeout: Duration,
    hard: Option<tokio::time::Instant>,
}

impl Deadlines {
    /// The deadlines from now, and when the timer first fires.
    fn start(limits: CopyLimits) -> (Deadlines, tokio::time::Instant) {
        let now = tokio::time::Instant::now();
        let d = Deadlines {
            idle_timeout: limits.idle_timeout,
            hard: limits.max_duration.map(|m| now + m),
        };
        (d, d.nearer(now + limits.idle_timeout))
    }

    fn nearer(&self, idle_deadline: tokio::time::Instant) -> tokio::time::Instant {
        self.hard.map_or(idle_deadline, |h| h.min(idle_deadline))
    }

    /// When the timer fires, with no bytes moved for `idle_for`: how the connection
    /// ends, or when the timer should fire next.
    fn on_timer(&self, idle_for: Duration) -> Result<tokio::time::Instant, CopyEnd> {
        let now = tokio::time::Instant::now();
        if self.hard.is_some_and(|h| now >= h) {
            return Err(CopyEnd::DurationTimeout);
        }
        if idle_for >= self.idle_timeout {
            return Err(CopyEnd::IdleTimeout);
        }
        Ok(self.nearer(now + (self.idle_timeout - idle_for)))
    }
}

/// Counters that the pump adds to as bytes move, so metrics are exact and live.
pub struct ByteCounters {
    pub to_upstream: Option<IntCounter>,
    pub to_downstream: Option<IntCounter>,
}

/// Shared between both directions and the idle watchdog.
pub(super) struct Activity {
    origin: Instant,
    last_ms: AtomicU64,
    pub(super) to_upstream: AtomicU64,
    pub(super) to_downstream: AtomicU64,
}

impl Activity {
    pub(super) fn new() -> Self {
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

    pub(super) fn outcome(&self, end: CopyEnd) -> CopyOutcome {
        CopyOutcome {
            to_upstream: self.to_upstream.load(Ordering::Relaxed),
            to_downstream: self.to_downstream.load(Ordering::Relaxed),
            end,
        }
    }

    fn idle_for(&self) -> Duration {
        let now = self.origin.elapsed().as_millis() as u64;
        Duration::from_millis(now.saturating_sub(self.last_ms.load(Ordering::Relaxed)))
    }
}

/// Copies between two TCP sockets until both directions have closed, a limit fires, or
/// `shutdown` completes. The sockets may be owned or borrowed.
pub fn copy_tcp<S: BorrowMut<TcpStream>, F: Future<Output = ()>>(
    downstream: S,
    upstream: S,
    limits: CopyLimits,
    counters: ByteCounters,
    shutdown: F,
) -> CopyTcp<S, F> {
    let (deadlines, first) = Deadlines::start(limits);
    CopyTcp {
        downstream,
        upstream,
        to_upstream: Pump::new(),
        to_downstream: Pump::new(),
        counters,
        deadlines,
        last_activity: tokio::time::Instant::now(),
        timer: tokio::time::sleep_until(first),
        shutdown,
    }
}

pin_project_lite::pin_project! {
    /// The TCP-to-TCP copy as one hand-written future: both directions, the idle and
    /// maximum-duration timer and the drain in a few hundred bytes, because an idle
    /// connection is mostly this state. Each direction waits for readiness without a
    /// buffer, reads through `AsyncRead` (a short read marks the socket drained, so no
    /// read is spent to see it empty) and writes everything it read before reading
    /// again, so a slow reader holds back its writer instead of growing a buffer.
    pub struct CopyTcp<S, F> {
        downstream: S,
        upstream: S,
        to_upstream: Pump,
        to_downstream: Pump,
        counters: ByteCounters,
        deadlines: Deadlines,
        last_activity: tokio::time::Instant,
        #[pin]
        timer: tokio::time::Sleep,
        #[pin]
        shutdown: F,
    }
}

impl<S: BorrowMut<TcpStream>, F: Future<Output = ()>> Future for CopyTcp<S, F> {
    type Output = CopyOutcome;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<CopyOutcome> {
        let mut this = self.project();
        let mut moved = false;
        let (downstream, upstream) = (this.downstream.borrow_mut(), this.upstream.borrow_mut());
        let up = this.to_upstream.poll_pump(
            cx,
            downstream,
            upstream,
            this.counters.to_upstream.as_ref(),
            &mut moved,
        );
        let down = this.to_downstream.poll_pump(
            cx,
            upstream,
            downstream,
            this.counters.to_downstream.as_ref(),
            &mut moved,
        );
        let outcome = |end| CopyOutcome {
            to_upstream: this.to_upstream.total,
            to_downstream: this.to_downstream.total,
            end,
        };
        // A socket error on either side (usually a reset) ends the connection at once:
        // a broken connection cannot deliver what is still in flight either way.
        let client_broke = match (&up, &down) {
            (Poll::Ready(Err(b)), _) => Some(*b == Broke::From),
            (_, Poll::Ready(Err(b))) => Some(*b == Broke::To),
            _ => None,
        };
        if let Some(client_broke) = client_broke {
            if client_broke {
                // The client aborted: the endpoint is owed nothing more, and gets a reset
                // rather than a FIN, as it would without the gateway in between. An
                // aborted stream is not taken for a complete one, and no TIME_WAIT is
                // left here for it. (An endpoint that breaks still sees the client's
                // FIN: whatever it sent before is delivered first.)
                let _ = socket2::SockRef::from(&*upstream).set_linger(Some(Duration::ZERO));
            }
            return Poll::Ready(outcome(CopyEnd::Error));
        }
        if up.is_ready() && down.is_ready() {
            return Poll::Ready(outcome(CopyEnd::Closed));
        }
        if moved {
            *this.last_activity = tokio::time::Instant::now();
        }
        if this.shutdown.as_mut().poll(cx).is_ready() {
            return Poll::Ready(outcome(CopyEnd::Drained));
        }
        while this.timer.as_mut().poll(cx).is_ready() {
            match this.deadlines.on_timer(this.last_activity.elapsed()) {
                Ok(next) => this.timer.as_mut().reset(next),
                Err(end) => return Poll::Ready(outcome(end)),
            }
        }
        Poll::Pending
    }
}

/// Which socket of a direction failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Broke {
    /// The one read from.
    From,
    /// The one written to.
    To,
}

/// One direction of [`CopyTcp`].
struct Pump {
    /// Read buffer; `None` while waiting for the socket, so an idle direction holds none.
    buf: Option<Box<[u8]>>,
    /// `buf[written..filled]` is read and not yet written (`u32`: buffers stay far below
    /// 4 GiB, and every byte of this struct is paid per connection).
    filled: u32,
    written: u32,
    /// Size of the next buffer: grows while reads fill it, shrinks when the socket runs dry.
    size: u32,
    total: u64,
    done: bool,
    /// The last read filled its buffer (more is likely waiting).
    full: bool,
}

impl Pump {
    fn new() -> Pump {
        Pump {
            buf: None,
            filled: 0,
            written: 0,
            size: INITIAL_BUFFER,
            total: 0,
            done: false,
            full: false,
        }
    }

    /// Moves bytes from `from` to `to` until one of them is not ready (`Pending`), the
    /// end of stream has been passed on (`Ready(Ok)`, then always `Ready(Ok)`), or a
    /// socket error on one of them (`Ready(Err)`, saying which).
    fn poll_pump(
        &mut self,
        cx: &mut Context<'_>,
        from: &mut TcpStream,
        to: &mut TcpStream,
        counter: Option<&IntCounter>,
        moved: &mut bool,
    ) -> Poll<Result<(), Broke>> {
        loop {
            if self.done {
                return Poll::Ready(Ok(()));
            }
            if let Some(buf) = &self.buf
                && self.written < self.filled
            {
                let n = ready!(
                    Pin::new(&mut *to)
                        .poll_write(cx, &buf[self.written as usize..self.filled as usize],)
                )
                .map_err(|_| Broke::To)?;
                if n == 0 {
                    return Poll::Ready(Err(Broke::To));
                }
                // At most the rest of a buffer of at most MAX_BUFFER bytes.
                self.written += n as u32;
                self.sent(n, counter, moved);
                if self.written < self.filled {
                    continue;
                }
                // Bulk at full size keeps its buffer for the next read.
                if !(self.full && self.size == MAX_BUFFER) {
                    self.buf = None;
                    self.resize();
                }
            }
            if self.buf.is_none() {
                ready!(from.poll_read_ready(cx)).map_err(|_| Broke::From)?;
                if self.size == INITIAL_BUFFER {
                    ready!(self.poll_small(cx, from, to, counter, moved))?;
                    continue;
                }
            }
            let size = self.size as usize;
            let buf = self
                .buf
                .get_or_insert_with(|| vec![0u8; size].into_boxed_slice());
            let mut read = ReadBuf::new(buf);
            match Pin::new(&mut *from).poll_read(cx, &mut read) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(_)) => return Poll::Ready(Err(Broke::From)),
                Poll::Pending => {
                    // The readiness was stale: wait again without holding a buffer.
                    self.buf = None;
                    return Poll::Pending;
                }
            }
            // At most the buffer's length, itself at most MAX_BUFFER.
            self.filled = read.filled().len() as u32;
            self.written = 0;
            self.full = self.filled as usize == self.size as usize;
            if self.filled == 0 {
                self.end_of_stream(to);
            }
        }
    }

    /// End of stream one way: pass the FIN on, keep the other way open.
    fn end_of_stream(&mut self, to: &TcpStream) {
        let _ = socket2::SockRef::from(to).shutdown(Shutdown::Write);
        self.buf = None;
        self.done = true;
    }

    /// Counts `n` bytes written.
    fn sent(&mut self, n: usize, counter: Option<&IntCounter>, moved: &mut bool) {
        self.total += n as u64;
        if let Some(c) = counter {
            c.inc_by(n as u64);
        }
        *moved = true;
    }

    /// The next buffer size once a read's bytes are all written: bigger after a read
    /// that filled its buffer, smaller after a short one (the socket ran dry).
    fn resize(&mut self) {
        self.size = if self.full {
            (self.size * 4).min(MAX_BUFFER)
        } else {
            INITIAL_BUFFER.max(self.size / 4)
        };
    }

    /// One small read, into this thread's scratch buffer, written on at once: a message
    /// that fits and goes out whole costs no allocation. What the writer does not take
    /// now is kept in a buffer of its own size. `Ready(Ok)` once the read is dealt with
    /// (end of stream included); `Pending` only when the read itself would block.
    fn poll_small(
        &mut self,
        cx: &mut Context<'_>,
        from: &mut TcpStream,
        to: &mut TcpStream,
        counter: Option<&IntCounter>,
        moved: &mut bool,
    ) -> Poll<Result<(), Broke>> {
        SCRATCH.with(|scratch| {
            let mut scratch = scratch.borrow_mut();
            let mut read = ReadBuf::new(&mut scratch[..]);
            match Pin::new(&mut *from).poll_read(cx, &mut read) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(_)) => return Poll::Ready(Err(Broke::From)),
                Poll::Pending => return Poll::Pending,
            }
            let n = read.filled().len();
            if n == 0 {
                self.end_of_stream(to);
                return Poll::Ready(Ok(()));
            }
            self.full = n == scratch.len();
            let mut written = 0;
            while written < n {
                match Pin::new(&mut *to).poll_write(cx, &scratch[written..n]) {
                    Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => {
                        return Poll::Ready(Err(Broke::To));
                    }
                    Poll::Ready(Ok(k)) => {
                        written += k;
                        self.sent(k, counter, moved);
                    }
                    Poll::Pending => break,
                }
            }
            if written == n {
                self.resize();
            } else {
                // The writer is full: keep the rest (at most the scratch's 4 KiB) until it
                // takes it; the pump writes it before reading again.
                self.buf = Some(scratch[written..n].into());
                self.filled = (n - written) as u32;
                self.written = 0;
            }
            Poll::Ready(Ok(()))
        })
    }
}

thread_local! {
    /// Where small reads land before they are written on (see [`Pump::poll_small`]).
    static SCRATCH: std::cell::RefCell<Box<[u8]>> =
        std::cell::RefCell::new(vec![0u8; INITIAL_BUFFER as usize].into_boxed_slice());
}

/// Copies between any two byte streams (TLS on either side). Neither direction holds a
/// buffer of its own while it waits: reads land in this thread's scratch buffer and are
/// written on at once (see [`StreamPump`]).
pub async fn copy_streams<D, U>(
    downstream: D,
    upstream: U,
    limits: CopyLimits,
    counters: ByteCounters,
    shutdown: impl Future<Output = ()>,
) -> CopyOutcome
where
    D: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let activity = Activity::new();
    let (mut dr, mut dw) = tokio::io::split(downstream);
    let (mut ur, mut uw) = tokio::io::split(upstream);
    // Pinned in place: the pumps are the bulk of a connection's task, and moving them
    // into `supervise` would store them twice.
    let pumps = std::pin::pin!(both_ways(
        pump_stream(
            &mut dr,
            &mut uw,
            &activity,
            &activity.to_upstream,
            counters.to_upstream.as_ref()
        ),
        pump_stream(
            &mut ur,
            &mut dw,
            &activity,
            &activity.to_downstream,
            counters.to_downstream.as_ref()
        ),
    ));
    let end = supervise(pumps, &activity, limits, shutdown).await;
    activity.outcome(end)
}

/// Runs both directions to their end. A socket error on either (usually a reset) ends
/// the connection at once: the other direction is dropped unfinished and both sockets
/// close, as a broken connection cannot deliver what is still in flight either way.
pub(super) async fn both_ways(
    up: impl Future<Output = io::Result<()>>,
    down: impl Future<Output = io::Result<()>>,
) -> CopyEnd {
    match tokio::try_join!(up, down) {
        Ok(_) => CopyEnd::Closed,
        Err(_) => CopyEnd::Error,
    }
}

/// Runs the pumps until they finish, the connection idles out or reaches its maximum
/// duration, or the drain closes it. One timer serves both limits, re-armed for the
/// nearer deadline, to keep the per-connection task small.
pub(super) async fn supervise(
    mut pumps: Pin<&mut impl Future<Output = CopyEnd>>,
    activity: &Activity,
    limits: CopyLimits,
    shutdown: impl Future<Output = ()>,
) -> CopyEnd {
    let mut shutdown = std::pin::pin!(shutdown);
    let (deadlines, first) = Deadlines::start(limits);
    let mut timer = std::pin::pin!(tokio::time::sleep_until(first));
    loop {
        tokio::select! {
            end = &mut pumps => return end,
            () = &mut shutdown => return CopyEnd::Drained,
            () = &mut timer => match deadlines.on_timer(activity.idle_for()) {
                Ok(next) => timer.as_mut().reset(next),
                Err(end) => return end,
            },
        }
    }
}

/// One direction of [`copy_streams`] until end of stream (passed on as a shutdown of the
/// writer) or an error.
fn pump_stream<'a, R, W>(
    from: &'a mut R,
    to: &'a mut W,
    activity: &'a Activity,
    total: &'a AtomicU64,
    counter: Option<&'a IntCounter>,
) -> impl Future<Output = io::Result<()>> + 'a
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut pump = StreamPump::default();
    std::future::poll_fn(move |cx| {
        pump.poll(cx, &mut *from, &mut *to, &mut |n| {
            account(activity, total, counter, n)
        })
    })
}

/// Where [`StreamPump`] reads: sixteen TLS records of plaintext (256 KiB), so that one
/// read from a socket feeds sixteen records to a TLS writer (sent in vectored calls), and
/// up to sixteen records read from TLS go to a socket in one write: a bulk direction wakes
/// its receiver once per 256 KiB, as Envoy's writes of what one read event decrypted do.
/// One buffer per worker thread; what a full writer leaves is copied out (at most this
/// much per direction, a quarter of Envoy's default per-connection buffer limit).
///
/// A TLS connection this copy writes to takes as much at once
/// (`set_buffer_limit(Some(STREAM_SCRATCH))`; rustls' default is four records), so that it
/// encrypts a whole read into records in one call and nothing is left over for the copy
/// to keep aside while the socket is full. The bound on what one direction holds under
/// backpressure is the same.
pub(super) const STREAM_SCRATCH: usize = 16 * TLS_RECORD;
/// The most plaintext one TLS record carries.
const TLS_RECORD: usize = 16 * 1024;

thread_local! {
    static STREAM_SCRATCH_BUF: std::cell::RefCell<Box<[u8]>> =
        std::cell::RefCell::new(vec![0u8; STREAM_SCRATCH].into_boxed_slice());
}

/// One direction between two streams that may be TLS. It reads into this thread's
/// scratch buffer — more reads while they return data at once and room is left — and
/// writes what it read before reading again; only what the writer does not take at once
/// is copied into a buffer of its own, freed once written. So an idle direction holds
/// no buffer, and backpressure is kept: nothing more is read while anything is unwritten
/// or unflushed.
#[derive(Default)]
struct StreamPump {
    /// Read and not yet taken by the writer.
    pending: Vec<u8>,
    written: usize,
    /// Written and not yet flushed (a TLS writer may hold records back until flushed).
    unflushed: bool,
    /// End of stream or a read error: the writer is being shut down.
    closing: Option<io::Result<()>>,
}

impl StreamPump {
    fn poll<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        from: &mut R,
        to: &mut W,
        sent: &mut impl FnMut(usize),
    ) -> Poll<io::Result<()>>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        // A read in this same poll found the reader empty and registered to be woken:
        // once what it got is written, wait rather than spend a read to see it empty
        // again. Only within one poll: a wake-up spent on an earlier `Pending` (a full
        // writer) may have been the reader's, and the next poll must read.
        let mut drained = false;
        loop {
            while self.written < self.pending.len() {
                let n = ready!(Pin::new(&mut *to).poll_write(cx, &self.pending[self.written..]))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                self.written += n;
                sent(n);
            }
            if !self.pending.is_empty() {
                self.pending = Vec::new();
                self.written = 0;
            }
            if self.unflushed {
                ready!(Pin::new(&mut *to).poll_flush(cx))?;
                self.unflushed = false;
            }
            if self.closing.is_some() {
                // The writer learns of the end whatever its shutdown says; the end is
                // reported as the reader met it.
                let _ = ready!(Pin::new(&mut *to).poll_shutdown(cx));
                return Poll::Ready(self.closing.take().unwrap_or(Ok(())));
            }
            if drained {
                return Poll::Pending;
            }
            drained = ready!(self.poll_read_and_write(cx, from, to, sent))?;
        }
    }

    /// Reads what is there into the scratch buffer and writes it on; `Pending` only when
    /// nothing could be read; `Ready(Ok(true))` when the reader was left empty (and will
    /// wake the task).
    fn poll_read_and_write<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        from: &mut R,
        to: &mut W,
        sent: &mut impl FnMut(usize),
    ) -> Poll<io::Result<bool>>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        STREAM_SCRATCH_BUF.with(|scratch| {
            // Borrowed only within this synchronous call, which runs no other pump.
            let mut scratch = scratch.borrow_mut();
            let mut read = ReadBuf::new(&mut scratch[..]);
            if let Err(e) = ready!(Pin::new(&mut *from).poll_read(cx, &mut read)) {
                self.closing = Some(Err(e));
                return Poll::Ready(Ok(false));
            }
            if read.filled().is_empty() {
                self.closing = Some(Ok(()));
                return Poll::Ready(Ok(false));
            }
            let mut drained = false;
            // More while it comes at once: a TLS reader hands over one record a read, so a
            // full record's worth (16 KiB) says more may be waiting; anything shorter says
            // the reader ran dry, and no read is spent to see it empty. An end of stream or
            // an error met here is acted on once these bytes are written.
            let mut last = read.filled().len();
            while last == TLS_RECORD && read.remaining() > 0 {
                let before = read.filled().len();
                match Pin::new(&mut *from).poll_read(cx, &mut read) {
                    Poll::Ready(Ok(())) if read.filled().len() > before => {
                        last = read.filled().len() - before;
                    }
                    Poll::Ready(Ok(())) => {
                        self.closing = Some(Ok(()));
                        break;
                    }
                    Poll::Ready(Err(e)) => {
                        self.closing = Some(Err(e));
                        break;
                    }
                    Poll::Pending => {
                        drained = true;
                        break;
                    }
                }
            }
            let n = read.filled().len();
            let mut written = 0;
            while written < n {
                match Pin::new(&mut *to).poll_write(cx, &scratch[written..n]) {
                    Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                    Poll::Ready(Ok(k)) => {
                        written += k;
                        sent(k);
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => break,
                }
            }
            if written < n {
                self.pending = scratch[written..n].to_vec();
                self.written = 0;
            }
            self.unflushed = true;
            Poll::Ready(Ok(drained))
        })
    }
}

pub(super) fn account(
    activity: &Activity,
    total: &AtomicU64,
    counter: Option<&IntCounter>,
    n: usize,
) {
    total.fetch_add(n as u64, Ordering::Relaxed);
    if let Some(c) = counter {
        c.inc_by(n as u64);
    }
    activity.touch();
}
#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (s, _) = l.accept().await.unwrap();
        (c, s)
    }

    /// The copy between `down` and `up` as a task, with no limits in the way.
    fn spawn_copy(down: TcpStream, up: TcpStream) -> tokio::task::JoinHandle<CopyOutcome> {
        let limits = CopyLimits {
            idle_timeout: Duration::from_secs(30),
            max_duration: None,
        };
        let counters = ByteCounters {
            to_upstream: None,
            to_downstream: None,
        };
        tokio::spawn(copy_tcp(down, up, limits, counters, std::future::pending()))
    }

    fn pattern(i: usize) -> u8 {
        (i * 7 + i / 251) as u8
    }

    /// A bulk upload arrives intact and counted to
    /// the byte, the FIN is passed on, and the reply still flows the other way after it.
    #[tokio::test]
    async fn bulk_then_reply_after_half_close() {
        const LEN: usize = 8 * 1024 * 1024 + 123;
        let (mut client, down) = pair().await;
        let (up, mut server) = pair().await;
        let pump = spawn_copy(down, up);
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

    /// Small messages against a reader that stalls: small reads go through the scratch
    /// buffer, and what the stalled writer cannot take is kept, in order, to the byte.
    #[tokio::test]
    async fn small_messages_survive_a_stalled_reader() {
        const MESSAGES: usize = 600;
        let (mut client, down) = pair().await;
        let (up, mut server) = pair().await;
        // Small socket buffers towards the stalled reader, so the pump's writes block.
        socket2::SockRef::from(&up)
            .set_send_buffer_size(16 * 1024)
            .unwrap();
        socket2::SockRef::from(&server)
            .set_recv_buffer_size(16 * 1024)
            .unwrap();
        let pump = spawn_copy(down, up);
        let writer = tokio::spawn(async move {
            let mut sent = 0usize;
            for m in 0..MESSAGES {
                let len = 1 + (m * 37) % 700;
                let msg: Vec<u8> = (sent..sent + len).map(pattern).collect();
                client.write_all(&msg).await.unwrap();
                sent += len;
                // One message at a time, so the pump's reads are short ones.
                tokio::task::yield_now().await;
            }
            client.shutdown().await.unwrap();
            sent
        });
        // Let the socket buffers fill before reading, then read in small, slow pieces.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut got = Vec::new();
        let mut piece = [0u8; 1000];
        loop {
            let n = server.read(&mut piece).await.unwrap();
            if n == 0 {
                break;
            }
            got.extend_from_slice(&piece[..n]);
            if got.len() % 7 == 0 {
                tokio::task::yield_now().await;
            }
        }
        let sent = writer.await.unwrap();
        assert_eq!(got.len(), sent);
        assert!(got.iter().enumerate().all(|(i, &b)| b == pattern(i)));
        drop(server);
        let outcome = tokio::time::timeout(Duration::from_secs(5), pump)
            .await
            .expect("the pump ended")
            .unwrap();
        assert_eq!(outcome.to_upstream, sent as u64);
        assert_eq!(outcome.end, CopyEnd::Closed);
    }

    /// The stream copy (TLS on either side in the gateway) through in-memory pipes that
    /// take only 1,000 bytes at a time: every write is partial, so what the scratch read
    /// held is kept and written first, in order; both ways at once, each end of stream
    /// passed on, the reply flowing after the upload's end, counts exact.
    #[tokio::test]
    async fn streams_keep_order_through_partial_writes_both_ways() {
        streams_through_pipes(1000, 1000).await;
    }

    /// As above with the client's pipe holding one TLS record (16 KiB): reads come back
    /// full, as from a TLS reader with more records waiting, so the pump reads on until
    /// the reader is empty while the writer keeps refusing most of it. A wake-up for the
    /// reader that arrives while the pump waits for the writer must not be lost (it once
    /// was: the upload stalled).
    #[tokio::test]
    async fn full_record_reads_against_a_slow_writer_do_not_stall() {
        streams_through_pipes(16 * 1024, 1000).await;
    }

    async fn streams_through_pipes(client_pipe: usize, server_pipe: usize) {
        const LEN: usize = 3 * 1024 * 1024 + 77;
        let (mut client, down) = tokio::io::duplex(client_pipe);
        let (up, mut server) = tokio::io::duplex(server_pipe);
        let counters = ByteCounters {
            to_upstream: None,
            to_downstream: None,
        };
        let limits = CopyLimits {
            idle_timeout: Duration::from_secs(30),
            max_duration: None,
        };
        let pump = tokio::spawn(copy_streams(
            down,
            up,
            limits,
            counters,
            std::future::pending(),
        ));
        let (mut client_r, mut client_w) = tokio::io::split(&mut client);
        let upload = async {
            let data: Vec<u8> = (0..LEN).map(pattern).collect();
            for chunk in data.chunks(100 * 1024) {
                client_w.write_all(chunk).await.unwrap();
            }
            client_w.shutdown().await.unwrap();
        };
        let (mut server_r, mut server_w) = tokio::io::split(&mut server);
        let download = async {
            let data: Vec<u8> = (0..LEN / 2).map(|i| pattern(i + 5)).collect();
            server_w.write_all(&data).await.unwrap();
            server_w.shutdown().await.unwrap();
        };
        let mut at_server = Vec::new();
        let mut at_client = Vec::new();
        let (_, _, at_server_end, at_client_end) =
            tokio::time::timeout(Duration::from_secs(30), async {
                tokio::join!(
                    upload,
                    download,
                    server_r.read_to_end(&mut at_server),
                    client_r.read_to_end(&mut at_client),
                )
            })
            .await
            .expect("both directions finished");
        at_server_end.unwrap();
        at_client_end.unwrap();
        assert_eq!(at_server.len(), LEN);
        assert!(at_server.iter().enumerate().all(|(i, &b)| b == pattern(i)));
        assert_eq!(at_client.len(), LEN / 2);
        assert!(
            at_client
                .iter()
                .enumerate()
                .all(|(i, &b)| b == pattern(i + 5))
        );
        let outcome = pump.await.unwrap();
        assert_eq!(outcome.to_upstream, LEN as u64);
        assert_eq!(outcome.to_downstream, (LEN / 2) as u64);
        assert_eq!(outcome.end, CopyEnd::Closed);
    }
}
