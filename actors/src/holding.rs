//! A byte stream that keeps a value alive exactly as long as itself.
//!
//! Why: some resources must live while a stream is in use and be released
//! only once the socket under it is closed — the gvisor runtime's gate
//! ticket for a connection into a sandbox, the mesh's dial guard for an
//! actor session's read half. Attaching the value to the stream ties the
//! two lifetimes together without a task watching either.

use std::io::IoSlice;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// `inner`, holding `held` until dropped. Field order matters: `inner`
/// (the socket) drops first, then `held`.
pub struct Holding<S, H> {
    inner: S,
    _held: H,
}

impl<S, H> Holding<S, H> {
    pub fn new(inner: S, held: H) -> Self {
        Self { inner, _held: held }
    }
}

impl<S: AsyncRead + Unpin, H: Unpin> AsyncRead for Holding<S, H> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin, H: Unpin> AsyncWrite for Holding<S, H> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}
