//! The socket under the TLS stacks of strait's stream copies (the ISTIO_MUTUAL server,
//! its re-encryption client, the Bridge's client). It first yields bytes already read
//! from the socket (the inspected ClientHello), then reads from the socket **ahead** of
//! what the TLS stack asks for, and writes one record per system call.
//!
//! rustls' buffered connection reads at most 4 KiB at a time (its record buffer grows by
//! 4 KiB per read up to one record), so a 16 KiB record straight from a socket costs
//! four or five `recvfrom` calls. Read ahead, one call takes what the socket has, up to
//! 64 KiB (four records), and rustls' reads are served from memory: one copy more in
//! user space for three or four system calls fewer per record. The buffer exists only
//! while it holds bytes: a connection waiting for its peer holds none.
//!
//! Writes: rustls offers a socket every record it has in one vectored write; this socket
//! takes the first record alone, and rustls writes the next at once, as Envoy's BoringSSL
//! writes each record to its socket. Measured both ways (`cargo bench --bench crypto`,
//! benches/README.md): over a single connection the peer starts on each record while the
//! next is written, and a download cost 0.70× the proxy CPU per GB of several records per
//! `writev`; with sixteen connections the `writev` was cheaper by a sixth, but one
//! connection's rate is where strait was behind.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// How much one read from the socket may take ahead of the TLS stack: four full records
/// with their headers and tags.
const READ_AHEAD: usize = 4 * (16 * 1024 + 5 + 256);

pub struct TlsIo<S> {
    /// Read from the socket and not yet taken; empty (no allocation) otherwise.
    ahead: BytesMut,
    inner: S,
}

impl<S> TlsIo<S> {
    /// `prefix`: bytes already read from the socket, yielded first.
    pub fn new(prefix: Vec<u8>, inner: S) -> Self {
        TlsIo {
            ahead: BytesMut::from(&prefix[..]),
            inner,
        }
    }

    /// A socket with nothing read from it yet.
    pub fn plain(inner: S) -> Self {
        TlsIo {
            ahead: BytesMut::new(),
            inner,
        }
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// Moves what was read ahead into `buf`; releases the buffer once it is all taken.
    fn take_ahead(&mut self, buf: &mut ReadBuf<'_>) {
        let n = self.ahead.len().min(buf.remaining());
        buf.put_slice(&self.ahead[..n]);
        self.ahead.advance(n);
        if self.ahead.is_empty() {
            self.ahead = BytesMut::new();
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for TlsIo<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if !this.ahead.is_empty() {
            this.take_ahead(buf);
            return Poll::Ready(Ok(()));
        }
        // A caller that asks for as much as a read ahead would take reads the socket itself.
        if buf.remaining() >= READ_AHEAD {
            return Pin::new(&mut this.inner).poll_read(cx, buf);
        }
        this.ahead.reserve(READ_AHEAD);
        match tokio_util::io::poll_read_buf(Pin::new(&mut this.inner), cx, &mut this.ahead) {
            Poll::Ready(Ok(_)) => {
                // Zero bytes read (end of stream) leaves `buf` as it is, which says so.
                this.take_ahead(buf);
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => {
                this.ahead = BytesMut::new();
                Poll::Ready(Err(e))
            }
            Poll::Pending => {
                // Nothing to hold while the peer is quiet.
                this.ahead = BytesMut::new();
                Poll::Pending
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for TlsIo<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    /// One record (the first non-empty slice) per call: see the module's comment.
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let first = bufs
            .iter()
            .find(|b| !b.is_empty())
            .map_or(&[][..], |b| &**b);
        Pin::new(&mut self.inner).poll_write(cx, first)
    }

    fn is_write_vectored(&self) -> bool {
        false
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (s, _) = l.accept().await.unwrap();
        (c, s)
    }

    fn pattern(i: usize) -> u8 {
        (i * 7 + i / 251) as u8
    }

    /// The prefix first, then the socket's bytes, in order and to the byte, read as rustls
    /// reads (a few KiB at a time, here odd sizes that straddle every boundary); the end
    /// of stream is passed on; and once the peer is quiet the buffer is gone.
    #[tokio::test]
    async fn small_reads_get_every_byte_in_order_and_hold_nothing_while_waiting() {
        let (mut peer, sock) = pair().await;
        let total = 300_000;
        let data: Vec<u8> = (0..total).map(pattern).collect();
        let (prefix, rest) = data.split_at(517);
        let mut io = TlsIo::new(prefix.to_vec(), sock);

        let sent = rest.to_vec();
        let writer = tokio::spawn(async move {
            peer.write_all(&sent).await.unwrap();
            peer
        });
        let mut got = Vec::with_capacity(total);
        let mut buf = [0u8; 4093];
        while got.len() < total {
            let n = io.read(&mut buf).await.unwrap();
            assert!(n > 0, "end of stream after {} of {total} bytes", got.len());
            got.extend_from_slice(&buf[..n]);
        }
        assert!(got == data, "bytes differ from what was sent");
        let mut peer = writer.await.unwrap();

        // Nothing more is there: the read waits, and waiting holds no buffer.
        let wait = tokio::time::timeout(Duration::from_millis(50), io.read(&mut buf)).await;
        assert!(wait.is_err(), "a read returned while the peer was quiet");
        assert_eq!(io.ahead.capacity(), 0, "a buffer is held while waiting");

        peer.shutdown().await.unwrap();
        assert_eq!(
            io.read(&mut buf).await.unwrap(),
            0,
            "end of stream not passed on"
        );
    }

    /// A read ahead takes what the socket has in one call, more than the caller asked.
    #[tokio::test]
    async fn one_small_read_takes_what_the_socket_has() {
        let (mut peer, sock) = pair().await;
        peer.write_all(&[7u8; 40_000]).await.unwrap();
        let mut io = TlsIo::plain(sock);
        let mut buf = [0u8; 4096];
        let mut first = 0;
        // The 40,000 bytes may reach the socket in more than one segment: wait for them
        // to be read ahead (bounded), then check the caller got only what it asked for.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            first += io.read(&mut buf).await.unwrap();
            if first + io.ahead.len() == 40_000 {
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "never read ahead");
        }
        assert!(io.ahead.len() > 30_000, "read {} ahead", io.ahead.len());
    }

    /// A vectored write takes one record, the first non-empty slice, and the rest follow
    /// in later calls, in order.
    #[tokio::test]
    async fn a_vectored_write_takes_one_record_at_a_time() {
        let (sock, mut peer) = pair().await;
        let mut io = TlsIo::plain(sock);
        assert!(!io.is_write_vectored());
        let (a, b, c) = ([1u8; 100], [2u8; 200], [3u8; 300]);
        let slices = [
            IoSlice::new(&[]),
            IoSlice::new(&a),
            IoSlice::new(&b),
            IoSlice::new(&c),
        ];
        let n = io.write_vectored(&slices).await.unwrap();
        assert_eq!(
            n, 100,
            "one vectored write took {n} bytes, not the first record's 100"
        );
        io.write_all(&b).await.unwrap();
        io.write_all(&c).await.unwrap();
        let mut got = vec![0u8; 600];
        peer.read_exact(&mut got).await.unwrap();
        assert!(got[..100].iter().all(|&x| x == 1), "first record");
        assert!(got[100..300].iter().all(|&x| x == 2), "second record");
        assert!(got[300..].iter().all(|&x| x == 3), "third record");
    }
}
