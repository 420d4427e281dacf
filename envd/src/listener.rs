//! A TCP listener that accepts on a dedicated blocking thread.
//!
//! Why not tokio's listener: gVisor's checkpoint (runsc 2022-12, the one
//! Debian ships) refuses to save a sandbox while a listening socket is
//! registered in epoll ("endpoint still has waiters upon save"), and a
//! failed save kills the sandbox. tokio always registers its listeners in
//! epoll. Accepting with a blocking `accept(2)` on a plain thread and
//! handing each connection to tokio keeps the listener out of epoll, so a
//! sandbox running envd can be paused. Accepted connections are ordinary
//! tokio streams; they are closed before a checkpoint anyway.

use std::io;
use std::net::SocketAddr;

use tokio::net::TcpStream;
use tokio::sync::mpsc;

/// Accepted connections, fed by the accept thread. Implements axum's
/// [`axum::serve::Listener`].
pub struct ThreadedTcpListener {
    accepted: mpsc::Receiver<(TcpStream, SocketAddr)>,
    local_addr: SocketAddr,
}

impl ThreadedTcpListener {
    /// Bind `addr` and start the accept thread. Must be called inside a
    /// tokio runtime (accepted sockets are registered with it).
    pub fn bind(addr: SocketAddr) -> io::Result<Self> {
        let listener = std::net::TcpListener::bind(addr)?;
        let local_addr = listener.local_addr()?;
        let runtime = tokio::runtime::Handle::current();
        // A small queue: when the server falls behind, accept(2) waits and
        // the kernel's backlog holds the rest.
        let (tx, accepted) = mpsc::channel(64);
        std::thread::Builder::new()
            .name("envd-accept".into())
            .spawn(move || {
                loop {
                    let (stream, peer) = match listener.accept() {
                        Ok(c) => c,
                        Err(e) => {
                            // EMFILE and friends: back off instead of spinning.
                            tracing::warn!("accept failed: {e}");
                            std::thread::sleep(std::time::Duration::from_millis(50));
                            continue;
                        }
                    };
                    let registered = stream.set_nonblocking(true).and_then(|()| {
                        let _guard = runtime.enter();
                        TcpStream::from_std(stream)
                    });
                    match registered {
                        Ok(stream) => {
                            if tx.blocking_send((stream, peer)).is_err() {
                                return; // the server is gone
                            }
                        }
                        Err(e) => tracing::warn!(%peer, "cannot serve connection: {e}"),
                    }
                }
            })?;
        Ok(Self {
            accepted,
            local_addr,
        })
    }
}

impl axum::serve::Listener for ThreadedTcpListener {
    type Io = TcpStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.accepted.recv().await {
            Some(conn) => conn,
            // The accept thread only ends when the server is dropped.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        Ok(self.local_addr)
    }
}
