//! What the HTTP/2 layer of the 15008 listener refuses on its own, named and counted.
//!
//! The `h2` crate bounds what a client may send (concurrent streams, header list size,
//! CONTINUATION frames, streams reset before they were accepted, streams it had to refuse)
//! and answers each excess itself: a stream with `RST_STREAM REFUSED_STREAM` or `431`, the
//! connection with `GOAWAY ENHANCE_YOUR_CALM` (whose debug data names the limit) before
//! closing it. None of that reaches the code that accepts streams, so [`Watched`] wraps the
//! outer TLS stream and reads the frame headers `h2` writes: every refusal it sends is
//! counted in `strait_hbone_refusals_total` by reason, and logged once per connection and
//! reason. The payload of other frames is skipped, never copied.
//!
//! A connection closed with such a GOAWAY lingers as Envoy's do (`delayed_close_timeout`):
//! what the client still sends is read and dropped until it closes or [`DELAYED_CLOSE`]
//! passes, so that closing with its flood unread does not reset the TCP connection and
//! destroy the GOAWAY before the client has read it.

use std::io::{self, IoSlice};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use prometheus::IntCounterVec;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// How long a connection closed for a refusal keeps reading before it closes.
const DELAYED_CLOSE: Duration = Duration::from_secs(1);

const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const GOAWAY: u8 = 0x7;
const END_STREAM: u8 = 0x1;

const PROTOCOL_ERROR: u32 = 0x1;
const FLOW_CONTROL_ERROR: u32 = 0x3;
const REFUSED_STREAM: u32 = 0x7;

/// GOAWAY debug data `h2` writes, as the reasons they become.
const GOAWAY_REASONS: [&str; 6] = [
    "too_many_resets",
    "too_many_internal_resets",
    "too_many_continuations",
    "header_list_way_too_large",
    "too_many_data_frames",
    // The gateway's own: see `hbone::PrematureResets`.
    "too_many_premature_resets",
];

/// The refusals of one outer connection: what its access log line and its end report.
pub(super) struct Refusals {
    counter: IntCounterVec,
    peer: SocketAddr,
    identity: String,
    /// The reason of the GOAWAY with an error code, once one is written.
    goaway: OnceLock<&'static str>,
    /// Why the gateway itself asked `h2` for a GOAWAY without debug data.
    local: OnceLock<&'static str>,
    /// Reasons already logged for this connection, and streams refused in all.
    logged: Mutex<(Vec<&'static str>, u64)>,
}

impl Refusals {
    pub(super) fn new(counter: IntCounterVec, peer: SocketAddr, identity: String) -> Arc<Self> {
        Arc::new(Refusals {
            counter,
            peer,
            identity,
            goaway: OnceLock::new(),
            local: OnceLock::new(),
            logged: Mutex::new((Vec::new(), 0)),
        })
    }

    /// Names the GOAWAY the gateway is about to have `h2` send (with no debug data).
    pub(super) fn closing_for(&self, reason: &'static str) {
        let _ = self.local.set(reason);
    }

    /// The reason of the connection's GOAWAY, if it was closed for one.
    pub(super) fn goaway(&self) -> Option<&'static str> {
        self.goaway.get().copied()
    }

    /// Streams `h2` refused on this connection.
    pub(super) fn streams_refused(&self) -> u64 {
        self.logged.lock().map_or(0, |l| l.1)
    }

    fn stream(&self, reason: &'static str, stream: u32) {
        self.counter.with_label_values(&[reason]).inc();
        let first = match self.logged.lock() {
            Ok(mut l) => {
                l.1 += 1;
                let first = !l.0.contains(&reason);
                if first {
                    l.0.push(reason);
                }
                first
            }
            Err(_) => false,
        };
        if first {
            tracing::info!(
                peer = %self.peer,
                identity = %self.identity,
                stream,
                reason,
                "HBONE stream refused by the HTTP/2 limits (more on this connection are counted, not logged)"
            );
        }
    }

    fn connection(&self, code: u32, debug: &[u8]) {
        let reason = GOAWAY_REASONS
            .iter()
            .copied()
            .find(|r| r.as_bytes() == debug)
            .or_else(|| self.local.get().copied())
            .unwrap_or(match code {
                PROTOCOL_ERROR => "protocol_error",
                FLOW_CONTROL_ERROR => "flow_control_error",
                0x6 => "frame_size_error",
                0x9 => "compression_error",
                0xb => "enhance_your_calm",
                _ => "http2_error",
            });
        if self.goaway.set(reason).is_err() {
            return;
        }
        self.counter.with_label_values(&[reason]).inc();
        tracing::info!(
            peer = %self.peer,
            identity = %self.identity,
            reason,
            code,
            streams_refused = self.streams_refused(),
            "HBONE connection closed with GOAWAY by the HTTP/2 limits"
        );
    }
}

/// Where the outbound frame parser is.
#[derive(Default)]
struct Parser {
    head: [u8; 9],
    /// Bytes of `head` filled.
    have: usize,
    /// Payload bytes of the current frame still to come.
    left: usize,
    /// The start of the payload of a frame being read (RST_STREAM, GOAWAY), bounded.
    keep: Vec<u8>,
    /// The stream of the last `431` (HEADERS with END_STREAM): its reset is the same refusal.
    last_431: u32,
}

/// The most of a GOAWAY payload kept: ids, code and the longest known debug data.
const KEEP: usize = 8 + 32;

impl Parser {
    fn kind(&self) -> u8 {
        self.head[3]
    }

    fn stream(&self) -> u32 {
        u32::from_be_bytes([self.head[5], self.head[6], self.head[7], self.head[8]]) & 0x7fff_ffff
    }

    fn feed(&mut self, mut bytes: &[u8], refusals: &Refusals) {
        while !bytes.is_empty() {
            if self.have < 9 {
                let n = (9 - self.have).min(bytes.len());
                self.head[self.have..self.have + n].copy_from_slice(&bytes[..n]);
                self.have += n;
                bytes = &bytes[n..];
                if self.have == 9 {
                    self.left =
                        u32::from_be_bytes([0, self.head[0], self.head[1], self.head[2]]) as usize;
                    self.keep.clear();
                    if self.left == 0 {
                        self.frame_done(refusals);
                    }
                }
                continue;
            }
            let n = self.left.min(bytes.len());
            if matches!(self.kind(), RST_STREAM | GOAWAY) && self.keep.len() < KEEP {
                let k = n.min(KEEP - self.keep.len());
                self.keep.extend_from_slice(&bytes[..k]);
            }
            self.left -= n;
            bytes = &bytes[n..];
            if self.left == 0 {
                self.frame_done(refusals);
            }
        }
    }

    fn frame_done(&mut self, refusals: &Refusals) {
        let code = |at: usize| {
            self.keep
                .get(at..at + 4)
                .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
        };
        let stream = self.stream();
        match self.kind() {
            // The gateway's own answers never end a stream in their HEADERS (a refused
            // tunnel's status is followed by a body); h2's 431 does.
            HEADERS if self.head[4] & END_STREAM != 0 => {
                self.last_431 = stream;
                refusals.stream("header_list_too_large", stream);
            }
            RST_STREAM => match code(0) {
                Some(REFUSED_STREAM) => refusals.stream("max_concurrent_streams", stream),
                Some(PROTOCOL_ERROR) if stream != self.last_431 => {
                    refusals.stream("malformed_stream", stream)
                }
                Some(FLOW_CONTROL_ERROR) => refusals.stream("stream_flow_control", stream),
                _ => {}
            },
            GOAWAY => {
                if let Some(c) = code(4).filter(|&c| c != 0) {
                    refusals.connection(c, self.keep.get(8..).unwrap_or_default());
                }
            }
            _ => {}
        }
        self.have = 0;
    }
}

/// The outer connection's byte stream, its outbound frames read as they are written.
pub(super) struct Watched<T> {
    inner: T,
    parser: Parser,
    refusals: Arc<Refusals>,
    /// The end of the delayed close, once it began.
    linger: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<T> Watched<T> {
    pub(super) fn new(inner: T, refusals: Arc<Refusals>) -> Self {
        Watched {
            inner,
            parser: Parser::default(),
            refusals,
            linger: None,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Watched<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Watched<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let n = std::task::ready!(Pin::new(&mut this.inner).poll_write(cx, buf))?;
        this.parser.feed(&buf[..n], &this.refusals);
        Poll::Ready(Ok(n))
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let mut n = std::task::ready!(Pin::new(&mut this.inner).poll_write_vectored(cx, bufs))?;
        let written = n;
        for b in bufs {
            if n == 0 {
                break;
            }
            let k = n.min(b.len());
            this.parser.feed(&b[..k], &this.refusals);
            n -= k;
        }
        Poll::Ready(Ok(written))
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        ready!(Pin::new(&mut this.inner).poll_shutdown(cx))?;
        if this.refusals.goaway().is_none() {
            return Poll::Ready(Ok(()));
        }
        let linger = this
            .linger
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(DELAYED_CLOSE)));
        let mut scratch = [0u8; 8 << 10];
        loop {
            if linger.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Ok(()));
            }
            let mut buf = ReadBuf::new(&mut scratch);
            match ready!(Pin::new(&mut this.inner).poll_read(cx, &mut buf)) {
                Ok(()) if !buf.filled().is_empty() => {}
                // The client closed (or broke) its side: nothing left to lose.
                _ => return Poll::Ready(Ok(())),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut f = (payload.len() as u32).to_be_bytes()[1..].to_vec();
        f.extend([kind, flags]);
        f.extend(stream.to_be_bytes());
        f.extend(payload);
        f
    }

    fn refusals() -> (Arc<Refusals>, IntCounterVec) {
        let c = IntCounterVec::new(prometheus::Opts::new("t", "t"), &["reason"]).unwrap();
        let r = Refusals::new(c.clone(), "127.0.0.1:1".parse().unwrap(), "id".into());
        (r, c)
    }

    /// Frames split anywhere between writes are read alike; DATA and a 200 are not refusals.
    #[test]
    fn refusals_are_read_from_frames_however_the_writes_split_them() {
        let mut bytes = frame(0x4, 0, 0, &[0, 3, 0, 0, 0, 100]);
        bytes.extend(frame(HEADERS, 0x4, 1, &[0x88]));
        bytes.extend(frame(0x0, 0, 1, &[7; 300]));
        bytes.extend(frame(RST_STREAM, 0, 201, &REFUSED_STREAM.to_be_bytes()));
        bytes.extend(frame(HEADERS, 0x5, 203, &[0x08, 0x03, b'4', b'3', b'1']));
        bytes.extend(frame(RST_STREAM, 0, 203, &PROTOCOL_ERROR.to_be_bytes()));
        bytes.extend(frame(RST_STREAM, 0, 205, &PROTOCOL_ERROR.to_be_bytes()));
        bytes.extend(frame(RST_STREAM, 0, 1, &0x8u32.to_be_bytes()));
        let mut goaway = 199u32.to_be_bytes().to_vec();
        goaway.extend(0xbu32.to_be_bytes());
        goaway.extend(b"too_many_internal_resets");
        bytes.extend(frame(GOAWAY, 0, 0, &goaway));
        for split in [1, 2, 7, 9, 10, 64, bytes.len()] {
            let (r, c) = refusals();
            let mut p = Parser::default();
            for piece in bytes.chunks(split) {
                p.feed(piece, &r);
            }
            let count = |reason: &str| c.with_label_values(&[reason]).get();
            assert_eq!(count("max_concurrent_streams"), 1, "split {split}");
            assert_eq!(count("header_list_too_large"), 1, "split {split}");
            assert_eq!(count("malformed_stream"), 1, "split {split}");
            assert_eq!(count("too_many_internal_resets"), 1, "split {split}");
            assert_eq!(r.goaway(), Some("too_many_internal_resets"));
            assert_eq!(r.streams_refused(), 3);
        }
    }

    /// A GOAWAY without debug data takes the reason the gateway gave; NO_ERROR is a drain.
    #[test]
    fn a_goaway_is_named_by_its_debug_data_the_gateway_or_its_code() {
        let goaway = |code: u32| {
            let mut g = 0u32.to_be_bytes().to_vec();
            g.extend(code.to_be_bytes());
            frame(GOAWAY, 0, 0, &g)
        };
        let (r, c) = refusals();
        Parser::default().feed(&goaway(0), &r);
        assert_eq!(r.goaway(), None);
        r.closing_for("too_many_premature_resets");
        Parser::default().feed(&goaway(0xb), &r);
        assert_eq!(r.goaway(), Some("too_many_premature_resets"));
        let (r, _) = refusals();
        Parser::default().feed(&goaway(0x9), &r);
        assert_eq!(r.goaway(), Some("compression_error"));
        assert_eq!(c.with_label_values(&["too_many_premature_resets"]).get(), 1);
    }
}
