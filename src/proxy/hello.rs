//! Reading the ClientHello from a fresh connection without terminating TLS: read until
//! the parser is satisfied (bounded in bytes and time), keep the bytes for replay.

use std::io;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
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

/// Reads from `stream` into `buf` until a whole ClientHello has arrived.
///
/// The buffer is allocated only once the socket is readable, grows with what arrives
/// and never beyond [`MAX_CLIENT_HELLO_BYTES`] plus one read; every byte read stays in
/// `buf` for replay to the upstream.
pub async fn read_client_hello(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    timeout: Duration,
) -> Result<Offer, HelloError> {
    let work = async {
        loop {
            // Wait without a buffer: a silent client holds none.
            stream.readable().await?;
            if buf.capacity() == buf.len() {
                let grow = next_read_size(buf);
                buf.reserve_exact(grow.min(MAX_CLIENT_HELLO_BYTES + 5 - buf.len()).max(1));
            }
            // Through `AsyncRead`, reading at most the spare capacity: a short read marks
            // the socket drained, so the copy that follows does not spend a read to see
            // it empty.
            match stream.read_buf(buf).await {
                Ok(0) => return Err(HelloError::Closed(buf.len())),
                Ok(_) => {}
                Err(e) => return Err(HelloError::Io(e)),
            }
            match parse_client_hello(buf) {
                HelloParse::Complete(hello) => {
                    return Ok(Offer {
                        sni: hello.sni().map(str::to_string),
                        alpn: hello.alpn().map(<[u8]>::to_vec).collect(),
                        alpn_display: hello.alpn_display(),
                        hello_bytes: hello.record_bytes(),
                    });
                }
                HelloParse::NeedMore => {
                    if buf.len() > MAX_CLIENT_HELLO_BYTES {
                        // The parser bounds declared lengths; this guards the buffer too.
                        return Err(HelloError::NotTls(NotTls::TooLarge { needed: buf.len() }));
                    }
                }
                HelloParse::NotTls(reason) => return Err(HelloError::NotTls(reason)),
            }
        }
    };
    match tokio::time::timeout(timeout, work).await {
        Ok(r) => r,
        Err(_) => Err(HelloError::Timeout(timeout)),
    }
}

/// How much more to read: a small first read, then exactly the rest of the record the
/// header announces (plus the next header, for a ClientHello spread over records), so a
/// client stuck mid-ClientHello holds no more memory than it has sent.
fn next_read_size(buf: &[u8]) -> usize {
    const FIRST_READ: usize = 512;
    if buf.len() < 5 {
        return FIRST_READ - buf.len();
    }
    let record = 5 + u16::from_be_bytes([buf[3], buf[4]]) as usize;
    if record > buf.len() {
        record - buf.len() + 5
    } else {
        buf.len()
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
