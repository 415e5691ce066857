//! The copy between one HTTP/2 stream and a TCP socket (a 15008 tunnel), without a
//! byte-stream adaptor in between, so strait's own code copies no byte of the tunnel
//! (rustls still copies the plaintext it decrypts into `h2`'s read buffer, and what it
//! encrypts into its records):
//!
//! - towards the destination, the DATA frames' payloads (`Bytes` cut from the
//!   connection's read buffer by `h2`) go to the socket as they are, several in one
//!   vectored write, and their window is given back only once the socket took them: the
//!   client can have at most its stream window in flight beyond what the destination
//!   accepted;
//! - towards the client, the destination's bytes are read into a buffer of their own,
//!   never larger than the send window the stream holds, and handed to `h2` as `Bytes`,
//!   cut in pieces whose frames fill whole TLS records (so `rustls` does not add a small
//!   record for every frame). Nothing is read from the destination while the client's
//!   window is closed: its bytes wait in its own socket.
//!
//! Half-close, resets, the idle and duration limits and the drain behave as in the
//! generic copy ([`super::copy`]); the byte counters count what the destination's
//! socket took and what was handed to the stream.

use std::collections::VecDeque;
use std::future::Future;
use std::io::{self, IoSlice};
use std::net::Shutdown;
use std::task::{Context, Poll, ready};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use h2::{RecvStream, SendStream};
use tokio::net::TcpStream;

use super::copy::{Activity, ByteCounters, CopyLimits, CopyOutcome, account, both_ways, supervise};

/// The most plaintext one TLS record carries.
const TLS_RECORD: usize = 16 * 1024;
/// An HTTP/2 frame header.
const FRAME_HEAD: usize = 9;
/// Sizes of the reads from the destination, smallest first: a read that fills its buffer
/// makes the next one bigger, a short one (the socket ran dry) smaller. Each is a whole
/// number of [`PIECE`]s, or one frame of exactly one TLS record.
const READ_SIZES: [usize; 3] = [TLS_RECORD - FRAME_HEAD, PIECE, 4 * PIECE];
/// The largest DATA payload handed to `h2` at once: with its header, four full TLS
/// records, which is also what `rustls` takes in one write by default (64 KiB), so one
/// frame is one write to the socket. A client that allows only 16 KiB frames gets them
/// cut by `h2`, three of four with a small record after them, as before.
const PIECE: usize = 4 * TLS_RECORD - FRAME_HEAD;
/// The most DATA payloads gathered into one vectored write to the destination.
const GATHER: usize = 64;

/// Copies between the stream (`recv`, `send`) and the destination's socket `up` until
/// both directions have ended, a limit fires, or `shutdown` completes. An error (a reset
/// on either side) ends both directions at once, as in [`super::copy::copy_streams`].
pub(super) async fn copy_h2_tcp(
    recv: &mut RecvStream,
    send: &mut SendStream<Bytes>,
    up: &TcpStream,
    limits: CopyLimits,
    counters: ByteCounters,
    shutdown: impl Future<Output = ()>,
) -> CopyOutcome {
    let activity = Activity::new();
    let mut to_up = ToDestination::default();
    let mut to_down = ToClient::default();
    let up_counter = counters.to_upstream.as_ref();
    let down_counter = counters.to_downstream.as_ref();
    let pumps = std::pin::pin!(both_ways(
        std::future::poll_fn(|cx| to_up.poll(cx, recv, up, &mut |n| {
            account(&activity, &activity.to_upstream, up_counter, n)
        })),
        std::future::poll_fn(|cx| to_down.poll(cx, up, send, &mut |n| {
            account(&activity, &activity.to_downstream, down_counter, n)
        })),
    ));
    let end = supervise(pumps, &activity, limits, shutdown).await;
    activity.outcome(end)
}

/// An `h2` error as the I/O error the copy reports.
pub(super) fn h2_io_error(e: h2::Error) -> io::Error {
    if e.is_io() {
        e.into_io()
            .unwrap_or_else(|| io::Error::from(io::ErrorKind::BrokenPipe))
    } else {
        io::Error::new(io::ErrorKind::ConnectionReset, e)
    }
}

/// From the stream to the destination.
#[derive(Default)]
struct ToDestination {
    /// Received and not yet written, oldest first. Its window is still taken.
    queue: VecDeque<Bytes>,
    /// END_STREAM received.
    ended: bool,
    /// The end passed on to the destination (FIN).
    done: bool,
}

impl ToDestination {
    fn poll(
        &mut self,
        cx: &mut Context<'_>,
        recv: &mut RecvStream,
        to: &TcpStream,
        sent: &mut impl FnMut(usize),
    ) -> Poll<io::Result<()>> {
        loop {
            if self.done {
                return Poll::Ready(Ok(()));
            }
            // What the stream holds now, waiting only when nothing is left to write.
            while !self.ended && self.queue.len() < GATHER {
                match recv.poll_data(cx) {
                    Poll::Ready(Some(Ok(data))) => {
                        if !data.is_empty() {
                            self.queue.push_back(data);
                        }
                    }
                    Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(h2_io_error(e))),
                    Poll::Ready(None) => self.ended = true,
                    Poll::Pending if self.queue.is_empty() => {
                        // Quiet: hold no queue while waiting.
                        self.queue = VecDeque::new();
                        return Poll::Pending;
                    }
                    Poll::Pending => break,
                }
            }
            if self.queue.is_empty() {
                // The client's END_STREAM, after all its bytes: FIN to the destination,
                // whose answer may still flow the other way.
                let _ = socket2::SockRef::from(to).shutdown(Shutdown::Write);
                self.done = true;
                continue;
            }
            let n = ready!(self.poll_write(cx, to))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.consume(n);
            sent(n);
            // The window comes back only for bytes the destination took. Errors only when
            // the stream is gone, which the next `poll_data` reports.
            let _ = recv.flow_control().release_capacity(n);
        }
    }

    /// Writes what the queue holds, in one vectored write.
    fn poll_write(&self, cx: &mut Context<'_>, to: &TcpStream) -> Poll<io::Result<usize>> {
        let mut slices = [IoSlice::new(&[]); GATHER];
        let mut k = 0;
        for (slice, data) in slices.iter_mut().zip(&self.queue) {
            *slice = IoSlice::new(data);
            k += 1;
        }
        loop {
            ready!(to.poll_write_ready(cx))?;
            let written = if k == 1 {
                to.try_write(&slices[0])
            } else {
                to.try_write_vectored(&slices[..k])
            };
            match written {
                Ok(n) => return Poll::Ready(Ok(n)),
                // The readiness was stale and is cleared: wait for the next.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }

    /// Drops the first `n` bytes of the queue.
    fn consume(&mut self, mut n: usize) {
        while n > 0 {
            let Some(front) = self.queue.front_mut() else {
                return;
            };
            if n < front.len() {
                front.advance(n);
                return;
            }
            n -= front.len();
            self.queue.pop_front();
        }
    }
}

/// From the destination to the stream.
#[derive(Default)]
struct ToClient {
    /// Index of the next read's size in [`READ_SIZES`].
    step: u8,
    /// END_STREAM sent.
    done: bool,
}

impl ToClient {
    fn poll(
        &mut self,
        cx: &mut Context<'_>,
        from: &TcpStream,
        send: &mut SendStream<Bytes>,
        sent: &mut impl FnMut(usize),
    ) -> Poll<io::Result<()>> {
        loop {
            if self.done {
                return Poll::Ready(Ok(()));
            }
            if from.poll_read_ready(cx)?.is_pending() {
                // While the destination is quiet, a reset of the stream by the client still
                // ends the tunnel (the other direction may be waiting on a full socket).
                return match send.poll_reset(cx) {
                    Poll::Ready(Ok(reason)) => Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::ConnectionReset,
                        format!("stream reset by the client: {reason}"),
                    ))),
                    Poll::Ready(Err(e)) => Poll::Ready(Err(h2_io_error(e))),
                    Poll::Pending => Poll::Pending,
                };
            }
            let size = READ_SIZES[usize::from(self.step)];
            // Send window first: read no more than the client can take now.
            let mut capacity = send.capacity();
            if capacity == 0 {
                send.reserve_capacity(size);
                capacity = send.capacity();
                while capacity == 0 {
                    capacity = match ready!(send.poll_capacity(cx)) {
                        Some(Ok(n)) => n,
                        Some(Err(e)) => return Poll::Ready(Err(h2_io_error(e))),
                        None => return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
                    };
                }
            }
            let want = capacity.min(size);
            let mut buf = BytesMut::with_capacity(want);
            let n = match from.try_read_buf(&mut (&mut buf).limit(want)) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    // Stale readiness, now cleared: give the window back while waiting.
                    send.reserve_capacity(0);
                    continue;
                }
                Err(e) => return Poll::Ready(Err(e)),
            };
            if n == 0 {
                // The destination's FIN: END_STREAM. Fails only when the stream is
                // already reset, which the other direction reports.
                send.reserve_capacity(0);
                let _ = send.send_data(Bytes::new(), true);
                self.done = true;
                continue;
            }
            let mut data = buf.freeze();
            while !data.is_empty() {
                let piece = data.split_to(data.len().min(PIECE));
                send.send_data(piece, false).map_err(h2_io_error)?;
            }
            sent(n);
            if n == size {
                self.step = (self.step + 1).min(READ_SIZES.len() as u8 - 1);
            } else if n < want {
                // The socket ran dry: smaller reads, and the window this stream holds
                // beyond what it sent goes back to the connection's other streams.
                self.step = self.step.saturating_sub(1);
                send.reserve_capacity(0);
            }
        }
    }
}
