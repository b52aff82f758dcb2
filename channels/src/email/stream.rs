//! The byte streams the e-mail clients run over: any connected stream (a broker `connect` fd
//! in the adapter, a loopback `TcpStream` in tests), boxed so that one client type serves the
//! stream before and after TLS, and a read budget per command.

use std::fmt;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A stream the IMAP and SMTP clients can run over.
pub trait MailStream: AsyncRead + AsyncWrite + Unpin + Send + fmt::Debug {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + fmt::Debug> MailStream for T {}

/// A stream of either kind (before or after TLS), so one client type serves every security
/// setting.
pub type BoxStream = Box<dyn MailStream>;

/// A read budget shared between a [`Budgeted`] stream and its owner: the owner sets it before
/// each command, and the stream fails reads beyond it, so a server cannot make the client
/// buffer more than one answer's worth (the IMAP library itself would grow to 512 MiB).
#[derive(Debug, Clone, Default)]
pub struct Budget(Arc<AtomicUsize>);

impl Budget {
    /// Allow `bytes` more bytes to be read.
    pub fn set(&self, bytes: usize) {
        self.0.store(bytes, Ordering::SeqCst);
    }
}

/// A stream whose reads draw from a [`Budget`].
pub struct Budgeted {
    inner: BoxStream,
    budget: Budget,
}

impl fmt::Debug for Budgeted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Budgeted")
            .field("remaining", &self.budget.0.load(Ordering::SeqCst))
            .finish_non_exhaustive()
    }
}

impl Budgeted {
    pub fn new(inner: BoxStream, budget: Budget) -> Budgeted {
        Budgeted { inner, budget }
    }

    pub fn into_inner(self) -> (BoxStream, Budget) {
        (self.inner, self.budget)
    }
}

impl AsyncRead for Budgeted {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let remaining = this.budget.0.load(Ordering::SeqCst);
        if remaining == 0 {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "the server sent more than this client reads in answer to one command",
            )));
        }
        let room = buf.remaining().min(remaining);
        let mut limited = ReadBuf::new(buf.initialize_unfilled_to(room));
        let res = Pin::new(&mut this.inner).poll_read(cx, &mut limited);
        let n = limited.filled().len();
        if let Poll::Ready(Ok(())) = res {
            buf.advance(n);
            this.budget.0.fetch_sub(n, Ordering::SeqCst);
        }
        res
    }
}

impl AsyncWrite for Budgeted {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn reads_stop_at_the_budget() {
        let (a, mut b) = tokio::io::duplex(1 << 16);
        let budget = Budget::default();
        budget.set(10);
        let mut s = Budgeted::new(Box::new(a), budget.clone());
        b.write_all(&[7u8; 100]).await.unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 64];
        let err = loop {
            match s.read(&mut buf).await {
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) => break e,
            }
        };
        assert_eq!(got.len(), 10);
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        // A fresh budget lets the rest through.
        budget.set(1000);
        let n = s.read(&mut buf).await.unwrap();
        assert!(n > 0);
    }
}
