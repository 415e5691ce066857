//! Reading the ClientHello from a fresh connection without terminating TLS: read until
//! the parser is satisfied (bounded in bytes and time), keep the bytes for replay.

use std::cell::RefCell;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

use crate::tls::client_hello::{HelloParse, MAX_CLIENT_HELLO_BYTES, NotTls, parse_client_hello};

/// What the client offered, copied out of its ClientHello.
#[derive(Debug, Clone)]
pub struct Offer {
    pub sni: Option<String>,
    /// ALPN protocols in offered order.
    pub alpn: Vec<Vec<u8>>,
    pub alpn_display: String,
    /// Bytes of the TLS records that carried the ClientHello.
    pub hello_bytes: usize,
}

impl Offer {
    pub fn alpn_iter(&self) -> impl Iterator<Item = &[u8]> {
        self.alpn.iter().map(Vec::as_slice)
    }
}

/// Why no ClientHello could be had.
#[derive(Debug, thiserror::Error)]
pub enum HelloError {
    #[error("client sent no complete ClientHello within {0:?}")]
    Timeout(Duration),
    #[error("client closed after {0} bytes, before a complete ClientHello")]
    Closed(usize),
    #[error("not a TLS ClientHello: {0}")]
    NotTls(NotTls),
    #[error("reading ClientHello: {0}")]
    Io(#[from] io::Error),
}

impl HelloError {
    pub fn reason(&self) -> &'static str {
        match self {
            HelloError::Timeout(_) => "client_hello_timeout",
            HelloError::Closed(_) => "client_closed",
            HelloError::NotTls(n) => n.reason(),
            HelloError::Io(_) => "client_io_error",
        }
    }
}

/// Reads from `stream` into `buf` until a whole ClientHello has arrived, within
/// `timeout`.
///
/// Reads land in a per-thread scratch buffer and only what arrived is copied into
/// `buf` (kept for replay to the upstream), so a client stuck mid-ClientHello holds
/// just the bytes it has sent, never a read-sized buffer. `buf` grows at most to
/// [`MAX_CLIENT_HELLO_BYTES`] plus one record header.
pub fn read_client_hello<'a>(
    stream: &'a mut TcpStream,
    buf: &'a mut Vec<u8>,
    timeout: Duration,
) -> ReadHello<'a> {
    ReadHello {
        stream,
        buf,
        timeout,
        deadline: tokio::time::sleep(timeout),
    }
}

/// Largest single read while waiting for a ClientHello.
const SCRATCH_BYTES: usize = 16 * 1024;

thread_local! {
    static SCRATCH: RefCell<Box<[u8]>> = RefCell::new(vec![0u8; SCRATCH_BYTES].into_boxed_slice());
}

pin_project_lite::pin_project! {
    /// See [`read_client_hello`].
    pub struct ReadHello<'a> {
        stream: &'a mut TcpStream,
        buf: &'a mut Vec<u8>,
        timeout: Duration,
        #[pin]
        deadline: tokio::time::Sleep,
    }
}

impl Future for ReadHello<'_> {
    type Output = Result<Offer, HelloError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        loop {
            let room = (MAX_CLIENT_HELLO_BYTES + 5)
                .saturating_sub(this.buf.len())
                .max(1);
            let read = SCRATCH.with(|scratch| {
                // Borrowed only inside this closure, which does not re-enter itself.
                let mut scratch = scratch.borrow_mut();
                let len = room.min(scratch.len());
                let mut read = ReadBuf::new(&mut scratch[..len]);
                // Through `AsyncRead`: a short read marks the socket drained, so the copy
                // that follows does not spend a read to see it empty.
                ready!(Pin::new(&mut **this.stream).poll_read(cx, &mut read))?;
                // Amortised growth: at most twice what arrived, linear in a ClientHello
                // sent one byte per segment.
                this.buf.extend_from_slice(read.filled());
                Poll::Ready(Ok::<usize, io::Error>(read.filled().len()))
            });
            match read {
                Poll::Pending => {
                    return match this.deadline.poll(cx) {
                        Poll::Ready(()) => Poll::Ready(Err(HelloError::Timeout(*this.timeout))),
                        Poll::Pending => Poll::Pending,
                    };
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(HelloError::Io(e))),
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(HelloError::Closed(this.buf.len()))),
                Poll::Ready(Ok(_)) => {}
            }
            match parse_client_hello(this.buf) {
                HelloParse::Complete(hello) => {
                    return Poll::Ready(Ok(Offer {
                        sni: hello.sni().map(str::to_string),
                        alpn: hello.alpn().map(<[u8]>::to_vec).collect(),
                        alpn_display: hello.alpn_display(),
                        hello_bytes: hello.record_bytes(),
                    }));
                }
                HelloParse::NeedMore => {
                    if this.buf.len() > MAX_CLIENT_HELLO_BYTES {
                        // The parser bounds declared lengths; this guards the buffer too.
                        return Poll::Ready(Err(HelloError::NotTls(NotTls::TooLarge {
                            needed: this.buf.len(),
                        })));
                    }
                }
                HelloParse::NotTls(reason) => return Poll::Ready(Err(HelloError::NotTls(reason))),
            }
        }
    }
}

/// TLS alert descriptions the gateway sends (RFC 8446 §6).
#[derive(Debug, Clone, Copy)]
pub enum Alert {
    HandshakeFailure = 40,
    InternalError = 80,
    UnrecognizedName = 112,
    AccessDenied = 49,
}

/// Sends a fatal TLS alert in the clear, then closes gracefully: write side first, then
/// a short bounded drain of anything the client still sends, so the close is a FIN
/// and not a reset that could destroy the alert before the client reads it.
pub async fn refuse_with_alert(stream: &mut TcpStream, alert: Option<Alert>) {
    if let Some(alert) = alert {
        let record = [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, alert as u8];
        let _ = tokio::time::timeout(Duration::from_secs(1), stream.write_all(&record)).await;
    }
    close_gracefully(stream).await;
}

/// Half-closes, then discards what the peer still sends (at most 64 KiB or 1 second).
pub async fn close_gracefully(stream: &mut TcpStream) {
    let _ = stream.shutdown().await;
    let drain = async {
        let mut scratch = [0u8; 256];
        let mut total = 0usize;
        while total < 64 * 1024 {
            match stream.read(&mut scratch).await {
                Ok(0) | Err(_) => break,
                Ok(n) => total += n,
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), drain).await;
}
