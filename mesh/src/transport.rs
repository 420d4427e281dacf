//! The QUIC transport between nodes: typed request/response calls and raw
//! bidirectional streams, over one quinn endpoint per node that is both
//! server and client, with mutual TLS under the cluster CA ([`crate::tls`]).
//!
//! Every exchange is one bidirectional QUIC stream, so a slow call never
//! holds up another (no head-of-line blocking) and a bad one is torn down
//! alone:
//! - a **call** sends one [`Request`] frame and reads one [`Response`]
//!   frame;
//! - a **raw stream** sends a [`StreamHeader`] frame, reads a
//!   [`StreamReply`], and then carries unframed bytes both ways until
//!   either side finishes: this is how a node pipes sandbox traffic to the
//!   owner (the bytes are never buffered whole, QUIC flow control bounds
//!   what is in flight).
//!
//! Frames are those of `schema::mesh`: length-limited before anything is
//! allocated, version-checked by header, validated by rkyv's bytecheck.
//! What an authenticated peer sends may still be garbage (a bug, another
//! build): a bad frame is logged, its stream reset, and the receiver goes
//! on serving every other stream.
//!
//! One connection per peer is kept and shared by all calls to it; a
//! connection that closed is replaced on next use.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{Connection, Endpoint, RecvStream, SendStream, VarInt};
use rustls::pki_types::CertificateDer;
use schema::mesh::{
    self, ErrorKind, FrameError, FrameHeader, FrameKind, Message, PROTOCOL_VERSION, Request,
    Response, SessionHeader, StreamHeader, StreamReply,
};
use tokio::io::AsyncReadExt;
use tracing::{debug, info, warn};

use crate::tls::{self, NodeIdentity, TlsError, TrustRoot};

/// QUIC application error code on a stream reset for a malformed frame.
pub const ERR_MALFORMED: VarInt = VarInt::from_u32(1);
/// ... for a peer of another protocol version.
pub const ERR_VERSION: VarInt = VarInt::from_u32(2);
/// ... for a first frame that did not come in time.
pub const ERR_TIMEOUT: VarInt = VarInt::from_u32(3);
/// Application close code of a connection when the transport shuts down.
pub const CLOSE_SHUTDOWN: VarInt = VarInt::from_u32(0);

/// Timeouts and limits. The defaults suit a LAN cluster.
#[derive(Debug, Clone)]
pub struct TransportConfig {
    /// Dial plus handshake.
    pub connect_timeout: Duration,
    /// A whole call: dial (if needed), request, response.
    pub call_timeout: Duration,
    /// How long an accepted stream may take to send its first frame; a peer
    /// that opens streams and says nothing does not hold tasks forever.
    pub first_frame_timeout: Duration,
    /// A connection with no traffic for this long is dead (keep-alives
    /// keep a healthy one open).
    pub idle_timeout: Duration,
    pub keep_alive: Duration,
    /// Concurrent streams a peer may have open to us: calls plus proxied
    /// sandbox connections. Also what bounds the frame memory a peer can
    /// pin: `max_streams * schema::mesh::MAX_FRAME` at worst.
    pub max_streams: u32,
}

impl Default for TransportConfig {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(5),
            call_timeout: Duration::from_secs(30),
            first_frame_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(10),
            keep_alive: Duration::from_secs(3),
            max_streams: 1024,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("{what} timed out after {after:?}")]
    Timeout { what: &'static str, after: Duration },
    /// The TLS handshake failed: one side has no certificate of this
    /// cluster, or the server is not the node that was dialled.
    #[error("TLS refused talking to {peer}: {reason}")]
    Refused { peer: SocketAddr, reason: String },
    #[error("peer {peer} speaks mesh protocol {theirs}, we speak {ours}")]
    VersionMismatch {
        peer: SocketAddr,
        ours: u16,
        theirs: u16,
    },
    #[error("bad frame from {peer}: {source}")]
    Frame {
        peer: SocketAddr,
        #[source]
        source: FrameError,
    },
    #[error("cannot encode frame: {0}")]
    Encode(FrameError),
    #[error("{peer} rejected the stream ({kind:?}): {reason}")]
    Rejected {
        peer: SocketAddr,
        kind: ErrorKind,
        reason: String,
    },
    #[error("{peer} closed the stream before answering")]
    Closed { peer: SocketAddr },
    #[error("connection to {peer}: {source}")]
    Connection {
        peer: SocketAddr,
        #[source]
        source: quinn::ConnectionError,
    },
    #[error("dial {peer}: {source}")]
    Connect {
        peer: SocketAddr,
        #[source]
        source: quinn::ConnectError,
    },
    #[error("stream to {peer}: {reason}")]
    Stream { peer: SocketAddr, reason: String },
    #[error("bind {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Tls(#[from] TlsError),
}

/// A TLS alert ends a QUIC handshake as a CRYPTO_ERROR (0x100 + alert).
fn is_crypto(code: quinn::TransportErrorCode) -> bool {
    (0x100..0x200).contains(&u64::from(code))
}

fn conn_error(peer: SocketAddr, e: quinn::ConnectionError) -> TransportError {
    match &e {
        quinn::ConnectionError::TransportError(t) if is_crypto(t.code) => TransportError::Refused {
            peer,
            reason: e.to_string(),
        },
        quinn::ConnectionError::ConnectionClosed(c) if is_crypto(c.error_code) => {
            TransportError::Refused {
                peer,
                reason: e.to_string(),
            }
        }
        _ => TransportError::Connection { peer, source: e },
    }
}

fn read_error(peer: SocketAddr, e: quinn::ReadError) -> TransportError {
    match e {
        quinn::ReadError::ConnectionLost(c) => conn_error(peer, c),
        other => TransportError::Stream {
            peer,
            reason: other.to_string(),
        },
    }
}

fn write_error(peer: SocketAddr, e: quinn::WriteError) -> TransportError {
    match e {
        quinn::WriteError::ConnectionLost(c) => conn_error(peer, c),
        other => TransportError::Stream {
            peer,
            reason: other.to_string(),
        },
    }
}

/// Who is on the other end of an incoming stream. Its certificate chains to
/// the cluster CA (the handshake checked that); [`Peer::is_node`] tells
/// whether it is a given node's.
#[derive(Debug, Clone)]
pub struct Peer {
    pub addr: SocketAddr,
    certificate: Option<CertificateDer<'static>>,
}

impl Peer {
    /// Whether the peer's certificate names `node_id` (for instance, before
    /// acting on a call that claims to come from a sandbox's owner).
    pub fn is_node(&self, node_id: &str) -> bool {
        self.certificate
            .as_ref()
            .is_some_and(|c| tls::cert_names(c, node_id))
    }
}

/// A raw stream a peer opened, not yet answered: the handler looks at the
/// header, then accepts (and pipes) or rejects it. Dropping it unanswered
/// closes the stream, which the opener sees as an error. `H` is the first
/// frame: a [`StreamHeader`] (sandbox traffic) or a [`SessionHeader`] (a
/// ractor_cluster session).
pub struct IncomingStream<H = StreamHeader> {
    header: H,
    peer: SocketAddr,
    send: SendStream,
    recv: RecvStream,
}

impl<H> IncomingStream<H> {
    pub fn header(&self) -> &H {
        &self.header
    }

    /// Tell the opener yes; the streams then carry raw bytes.
    pub async fn accept(mut self) -> Result<(SendStream, RecvStream), TransportError> {
        let frame = StreamReply::Accepted
            .encode()
            .map_err(TransportError::Encode)?;
        let peer = self.peer;
        self.send
            .write_all(&frame)
            .await
            .map_err(|e| write_error(peer, e))?;
        Ok((self.send, self.recv))
    }

    /// Tell the opener no (no such sandbox, port closed), and close.
    pub async fn reject(mut self, kind: ErrorKind, reason: &str) {
        let reply = StreamReply::Rejected {
            kind,
            reason: reason.to_owned(),
        };
        if let Ok(frame) = reply.encode() {
            let _ = self.send.write_all(&frame).await;
        }
        let _ = self.send.finish();
        let _ = self.recv.stop(VarInt::from_u32(0));
    }
}

/// What a node does with what peers send it. Each call and each stream runs
/// in its own task; a handler that panics loses that stream only.
pub trait Handler: Send + Sync + 'static {
    /// Answer one call.
    fn request(&self, peer: Peer, request: Request) -> impl Future<Output = Response> + Send;
    /// Take (or refuse) one raw stream.
    fn stream(&self, peer: Peer, stream: IncomingStream) -> impl Future<Output = ()> + Send;
    /// Take (or refuse) a stream for a ractor_cluster session. By default
    /// refused: a handler without remote actors.
    fn session(
        &self,
        peer: Peer,
        session: IncomingStream<SessionHeader>,
    ) -> impl Future<Output = ()> + Send {
        let _ = peer;
        async move {
            session
                .reject(ErrorKind::Unavailable, "this node runs no remote actors")
                .await
        }
    }
}

type Slot = Arc<tokio::sync::Mutex<Option<Connection>>>;

struct Inner {
    endpoint: Endpoint,
    client: quinn::ClientConfig,
    config: TransportConfig,
    /// One slot per (node id, address); its lock is held while dialling so
    /// concurrent first calls to a peer share one connection, while calls
    /// to other peers are not held up.
    conns: Mutex<HashMap<(String, SocketAddr), Slot>>,
}

/// A node's QUIC endpoint: serves peers through a [`Handler`] and calls
/// them. Cheap to clone.
#[derive(Clone)]
pub struct Transport {
    inner: Arc<Inner>,
}

impl Transport {
    /// Listen on `addr` (UDP; port 0 picks one) and serve `handler`. Must
    /// be called inside a tokio runtime.
    pub fn bind<H: Handler>(
        addr: SocketAddr,
        identity: &NodeIdentity,
        root: &TrustRoot,
        config: TransportConfig,
        handler: Arc<H>,
    ) -> Result<Self, TransportError> {
        let server_crypto = QuicServerConfig::try_from(tls::server_config(identity, root)?)
            .map_err(|e| TlsError::Quic(e.to_string()))?;
        let mut server = quinn::ServerConfig::with_crypto(Arc::new(server_crypto));
        server.transport_config(Arc::new(quic_transport(&config, config.max_streams)?));
        let endpoint = Endpoint::server(server, addr)
            .map_err(|source| TransportError::Bind { addr, source })?;
        let client = client_config(Some(identity), root, &config)?;
        let inner = Arc::new(Inner {
            endpoint: endpoint.clone(),
            client,
            config: config.clone(),
            conns: Mutex::new(HashMap::new()),
        });
        tokio::spawn(accept_loop(endpoint, config, handler));
        Ok(Self { inner })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.inner.endpoint.local_addr()
    }

    /// Call `peer_id` at `peer_addr`: one request, one response. The
    /// server's certificate must name `peer_id`.
    pub async fn call(
        &self,
        peer_addr: SocketAddr,
        peer_id: &str,
        request: &Request,
    ) -> Result<Response, TransportError> {
        let frame = request.encode().map_err(TransportError::Encode)?;
        let after = self.inner.config.call_timeout;
        tokio::time::timeout(after, async {
            let conn = self.connection(peer_addr, peer_id).await?;
            let (mut send, mut recv) =
                conn.open_bi().await.map_err(|e| conn_error(peer_addr, e))?;
            send.write_all(&frame)
                .await
                .map_err(|e| write_error(peer_addr, e))?;
            let _ = send.finish();
            read_message::<Response>(peer_addr, &mut recv).await
        })
        .await
        .map_err(|_| TransportError::Timeout {
            what: "call",
            after,
        })?
    }

    /// Open a raw stream to `peer_id` for `header`'s sandbox port; returns
    /// once the peer accepted it. The bytes written and read after that are
    /// the sandbox's.
    pub async fn open_stream(
        &self,
        peer_addr: SocketAddr,
        peer_id: &str,
        header: &StreamHeader,
    ) -> Result<(SendStream, RecvStream), TransportError> {
        self.open(peer_addr, peer_id, header).await
    }

    /// Open a stream to `peer_id` for a ractor_cluster session; returns
    /// once the peer accepted it. What follows is the session's bytes.
    pub async fn open_session(
        &self,
        peer_addr: SocketAddr,
        peer_id: &str,
        header: &SessionHeader,
    ) -> Result<(SendStream, RecvStream), TransportError> {
        self.open(peer_addr, peer_id, header).await
    }

    async fn open<M: Message>(
        &self,
        peer_addr: SocketAddr,
        peer_id: &str,
        header: &M,
    ) -> Result<(SendStream, RecvStream), TransportError> {
        let frame = header.encode().map_err(TransportError::Encode)?;
        let after = self.inner.config.call_timeout;
        tokio::time::timeout(after, async {
            let conn = self.connection(peer_addr, peer_id).await?;
            let (mut send, mut recv) =
                conn.open_bi().await.map_err(|e| conn_error(peer_addr, e))?;
            send.write_all(&frame)
                .await
                .map_err(|e| write_error(peer_addr, e))?;
            match read_message::<StreamReply>(peer_addr, &mut recv).await? {
                StreamReply::Accepted => Ok((send, recv)),
                StreamReply::Rejected { kind, reason } => Err(TransportError::Rejected {
                    peer: peer_addr,
                    kind,
                    reason,
                }),
            }
        })
        .await
        .map_err(|_| TransportError::Timeout {
            what: "stream open",
            after,
        })?
    }

    /// Close every connection and stop serving; waits (briefly) for peers
    /// to be told.
    pub async fn close(&self) {
        self.inner.endpoint.close(CLOSE_SHUTDOWN, b"shutdown");
        let _ = tokio::time::timeout(Duration::from_secs(1), self.inner.endpoint.wait_idle()).await;
    }

    /// Close the cached connection to a peer, if any (the next call
    /// dials): for a peer known to have restarted, whose old connection
    /// would otherwise linger, unanswered, until its idle timeout (a
    /// restarted endpoint cannot reset it: its stateless-reset key is new).
    pub async fn forget(&self, peer_addr: SocketAddr, peer_id: &str) {
        let slot = {
            let conns = self
                .inner
                .conns
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            conns.get(&(peer_id.to_owned(), peer_addr)).cloned()
        };
        if let Some(slot) = slot
            && let Some(conn) = slot.lock().await.take()
        {
            conn.close(CLOSE_SHUTDOWN, b"peer restarted");
        }
    }

    /// The cached connection to a peer, dialled if there is none or it
    /// closed.
    pub(crate) async fn connection(
        &self,
        peer_addr: SocketAddr,
        peer_id: &str,
    ) -> Result<Connection, TransportError> {
        let slot = {
            let mut conns = self
                .inner
                .conns
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            conns
                .entry((peer_id.to_owned(), peer_addr))
                .or_default()
                .clone()
        };
        let mut slot = slot.lock().await;
        if let Some(conn) = slot.as_ref().filter(|c| c.close_reason().is_none()) {
            return Ok(conn.clone());
        }
        let after = self.inner.config.connect_timeout;
        let connecting = self
            .inner
            .endpoint
            .connect_with(self.inner.client.clone(), peer_addr, peer_id)
            .map_err(|source| TransportError::Connect {
                peer: peer_addr,
                source,
            })?;
        let conn = tokio::time::timeout(after, connecting)
            .await
            .map_err(|_| TransportError::Timeout {
                what: "connect",
                after,
            })?
            .map_err(|e| conn_error(peer_addr, e))?;
        debug!(peer = %peer_addr, peer_id, "mesh connection up");
        *slot = Some(conn.clone());
        Ok(conn)
    }
}

fn quic_transport(
    config: &TransportConfig,
    max_streams: u32,
) -> Result<quinn::TransportConfig, TlsError> {
    let mut t = quinn::TransportConfig::default();
    let idle = quinn::IdleTimeout::try_from(config.idle_timeout)
        .map_err(|e| TlsError::Quic(format!("idle timeout: {e}")))?;
    t.max_idle_timeout(Some(idle))
        .keep_alive_interval(Some(config.keep_alive))
        .max_concurrent_bidi_streams(VarInt::from_u32(max_streams))
        .max_concurrent_uni_streams(VarInt::from_u32(0));
    Ok(t)
}

/// The dialling side's config. Peers never open streams toward the dialler
/// (each node dials the other for its own calls), hence 0 streams.
pub(crate) fn client_config(
    identity: Option<&NodeIdentity>,
    root: &TrustRoot,
    config: &TransportConfig,
) -> Result<quinn::ClientConfig, TransportError> {
    let crypto = QuicClientConfig::try_from(tls::client_config(identity, root)?)
        .map_err(|e| TlsError::Quic(e.to_string()))?;
    let mut client = quinn::ClientConfig::new(Arc::new(crypto));
    client.transport_config(Arc::new(quic_transport(config, 0)?));
    Ok(client)
}

/// Read one frame body (after its length prefix). Memory grows with the
/// bytes that actually arrive, never beyond [`mesh::MAX_FRAME`], whatever
/// length the prefix claims.
async fn read_frame(peer: SocketAddr, recv: &mut RecvStream) -> Result<Vec<u8>, TransportError> {
    let mut prefix = [0u8; 4];
    recv.read_exact(&mut prefix).await.map_err(|e| match e {
        quinn::ReadExactError::FinishedEarly(_) => TransportError::Closed { peer },
        quinn::ReadExactError::ReadError(e) => read_error(peer, e),
    })?;
    let len = mesh::body_len(prefix).map_err(|source| TransportError::Frame { peer, source })?;
    let mut body = Vec::with_capacity(len.min(64 * 1024));
    let got = recv
        .take(len as u64)
        .read_to_end(&mut body)
        .await
        .map_err(|e| TransportError::Stream {
            peer,
            reason: e.to_string(),
        })?;
    if got < len {
        return Err(TransportError::Frame {
            peer,
            source: FrameError::TooShort { len: got },
        });
    }
    Ok(body)
}

/// Read and decode one message; a peer answering with a version-mismatch
/// frame (or any frame of another version) is reported as such.
async fn read_message<M: Message>(
    peer: SocketAddr,
    recv: &mut RecvStream,
) -> Result<M, TransportError> {
    let body = read_frame(peer, recv).await?;
    let header =
        FrameHeader::parse(&body).map_err(|source| TransportError::Frame { peer, source })?;
    if header.version != PROTOCOL_VERSION || header.kind == FrameKind::VersionMismatch {
        return Err(TransportError::VersionMismatch {
            peer,
            ours: PROTOCOL_VERSION,
            theirs: header.version,
        });
    }
    M::decode_body(&body).map_err(|source| TransportError::Frame { peer, source })
}

async fn accept_loop<H: Handler>(endpoint: Endpoint, config: TransportConfig, handler: Arc<H>) {
    while let Some(incoming) = endpoint.accept().await {
        let handler = handler.clone();
        let config = config.clone();
        tokio::spawn(async move {
            let addr = incoming.remote_address();
            let conn = match incoming.await {
                Ok(conn) => conn,
                Err(e) => {
                    // Most often a node without a cluster certificate.
                    warn!(peer = %addr, error = %e, "mesh connection refused");
                    return;
                }
            };
            serve_connection(conn, config, handler).await;
        });
    }
    debug!("mesh endpoint closed");
}

async fn serve_connection<H: Handler>(conn: Connection, config: TransportConfig, handler: Arc<H>) {
    let peer = Peer {
        addr: conn.remote_address(),
        certificate: conn
            .peer_identity()
            .and_then(|any| any.downcast::<Vec<CertificateDer<'static>>>().ok())
            .and_then(|chain| chain.into_iter().next()),
    };
    debug!(peer = %peer.addr, "mesh peer connected");
    loop {
        let (send, recv) = match conn.accept_bi().await {
            Ok(streams) => streams,
            Err(
                quinn::ConnectionError::ApplicationClosed(_)
                | quinn::ConnectionError::LocallyClosed
                | quinn::ConnectionError::TimedOut
                | quinn::ConnectionError::Reset,
            ) => return,
            Err(e) => {
                info!(peer = %peer.addr, error = %e, "mesh connection lost");
                return;
            }
        };
        let handler = handler.clone();
        let peer = peer.clone();
        let first_frame_timeout = config.first_frame_timeout;
        tokio::spawn(serve_stream(peer, send, recv, first_frame_timeout, handler));
    }
}

/// Serve one stream: read its first frame and dispatch it. Every failure
/// ends here, logged, with this stream reset and nothing else touched.
async fn serve_stream<H: Handler>(
    peer: Peer,
    mut send: SendStream,
    mut recv: RecvStream,
    first_frame_timeout: Duration,
    handler: Arc<H>,
) {
    let addr = peer.addr;
    let body = match tokio::time::timeout(first_frame_timeout, read_frame(addr, &mut recv)).await {
        Ok(Ok(body)) => body,
        Ok(Err(TransportError::Closed { .. })) => return,
        Ok(Err(e)) => {
            warn!(peer = %addr, error = %e, "mesh stream refused: bad frame");
            let _ = send.reset(ERR_MALFORMED);
            let _ = recv.stop(ERR_MALFORMED);
            return;
        }
        Err(_) => {
            warn!(peer = %addr, "mesh stream refused: no frame within {first_frame_timeout:?}");
            let _ = send.reset(ERR_TIMEOUT);
            let _ = recv.stop(ERR_TIMEOUT);
            return;
        }
    };
    let refuse = |send: &mut SendStream, recv: &mut RecvStream, e: FrameError| {
        warn!(peer = %addr, error = %e, "mesh stream refused: bad frame");
        let _ = send.reset(ERR_MALFORMED);
        let _ = recv.stop(ERR_MALFORMED);
    };
    let header = match FrameHeader::parse(&body) {
        Ok(h) => h,
        Err(e) => return refuse(&mut send, &mut recv, e),
    };
    if header.version != PROTOCOL_VERSION {
        warn!(
            peer = %addr,
            theirs = header.version,
            ours = PROTOCOL_VERSION,
            "mesh stream refused: protocol version mismatch"
        );
        let _ = send.write_all(&mesh::version_mismatch_frame()).await;
        let _ = send.finish();
        let _ = recv.stop(ERR_VERSION);
        return;
    }
    match header.kind {
        FrameKind::Request => {
            let request = match Request::decode_body(&body) {
                Ok(r) => r,
                Err(e) => return refuse(&mut send, &mut recv, e),
            };
            drop(body);
            let response = handler.request(peer, request).await;
            let frame = match response.encode() {
                Ok(f) => f,
                Err(e) => {
                    warn!(peer = %addr, error = %e, "mesh response not sent: cannot encode");
                    let _ = send.reset(ERR_MALFORMED);
                    return;
                }
            };
            if let Err(e) = send.write_all(&frame).await {
                debug!(peer = %addr, error = %e, "mesh response not delivered");
                return;
            }
            let _ = send.finish();
        }
        FrameKind::StreamOpen => {
            let header = match StreamHeader::decode_body(&body) {
                Ok(h) => h,
                Err(e) => return refuse(&mut send, &mut recv, e),
            };
            let stream = IncomingStream {
                header,
                peer: addr,
                send,
                recv,
            };
            handler.stream(peer, stream).await;
        }
        FrameKind::SessionOpen => {
            let header = match SessionHeader::decode_body(&body) {
                Ok(h) => h,
                Err(e) => return refuse(&mut send, &mut recv, e),
            };
            let session = IncomingStream {
                header,
                peer: addr,
                send,
                recv,
            };
            handler.session(peer, session).await;
        }
        other => refuse(
            &mut send,
            &mut recv,
            FrameError::UnexpectedKind {
                expected: FrameKind::Request,
                got: other,
            },
        ),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use schema::mesh::{Header, NodeInfo, NodeState, RestRequest, RestResponse};
    use tokio::io::AsyncWriteExt;

    use super::*;
    use crate::tls::ClusterCa;

    /// Answers pings and echoes REST calls; counts raw-stream bytes.
    #[derive(Default)]
    pub(crate) struct Echo {
        pub calls: AtomicUsize,
        pub from_node_a: AtomicUsize,
    }

    pub(crate) fn info(id: &str) -> NodeInfo {
        NodeInfo {
            id: id.into(),
            generation: 1,
            quic_addr: "127.0.0.1:1".parse().unwrap(),
            rest_addr: "127.0.0.1:2".parse().unwrap(),
            state: NodeState::Ready,
            free_vcpus: 2,
            free_memory_mib: 1024,
            sandboxes: 0,
            max_sandboxes: 64,
            templates: vec![],
        }
    }

    impl Handler for Echo {
        async fn request(&self, peer: Peer, request: Request) -> Response {
            self.calls.fetch_add(1, Ordering::SeqCst);
            if peer.is_node("node-a") {
                self.from_node_a.fetch_add(1, Ordering::SeqCst);
            }
            match request {
                Request::Ping { sent_unix_ms } => Response::Pong {
                    info: info("node-b"),
                    unix_ms: sent_unix_ms,
                },
                Request::Rest(r) => Response::Rest(RestResponse {
                    status: 200,
                    headers: r.headers,
                    body: r.body,
                }),
                Request::WhoSigned { .. } => Response::SignedBy { sandbox_id: None },
            }
        }

        /// Port 0 is refused; any other port counts the bytes it gets,
        /// in 64 KiB reads, and answers the count.
        async fn stream(&self, _peer: Peer, stream: IncomingStream) {
            if stream.header().port == 0 {
                return stream.reject(ErrorKind::NotFound, "no such port").await;
            }
            let Ok((mut send, mut recv)) = stream.accept().await else {
                return;
            };
            let mut buf = vec![0u8; 64 * 1024];
            let mut total = 0u64;
            while let Ok(Some(n)) = recv.read(&mut buf).await {
                total += n as u64;
            }
            let _ = send.write_all(&total.to_be_bytes()).await;
            let _ = send.finish();
        }
    }

    pub(crate) fn node(
        ca: &ClusterCa,
        id: &str,
        config: TransportConfig,
    ) -> (Transport, Arc<Echo>) {
        let handler = Arc::new(Echo::default());
        let t = Transport::bind(
            "127.0.0.1:0".parse().unwrap(),
            &ca.issue(id).unwrap(),
            &ca.trust_root(),
            config,
            handler.clone(),
        )
        .unwrap();
        (t, handler)
    }

    fn quick() -> TransportConfig {
        TransportConfig {
            connect_timeout: Duration::from_secs(2),
            call_timeout: Duration::from_secs(5),
            first_frame_timeout: Duration::from_secs(2),
            ..TransportConfig::default()
        }
    }

    #[tokio::test]
    async fn a_session_stream_to_a_node_without_remote_actors_is_refused() {
        let ca = ClusterCa::generate().unwrap();
        let (a, _) = node(&ca, "node-a", quick());
        let (b, _) = node(&ca, "node-b", quick());
        let header = SessionHeader {
            node_id: "node-a".into(),
            actor_protocol: schema::mesh::ACTOR_PROTOCOL.into(),
        };
        let err = a
            .open_session(b.local_addr().unwrap(), "node-b", &header)
            .await
            .map(|_| ())
            .unwrap_err();
        assert!(
            matches!(
                err,
                TransportError::Rejected {
                    kind: ErrorKind::Unavailable,
                    ..
                }
            ),
            "{err}"
        );
        // And calls still work on the same connection.
        a.call(
            b.local_addr().unwrap(),
            "node-b",
            &Request::Ping { sent_unix_ms: 1 },
        )
        .await
        .unwrap();
    }

    #[tokio::test]
    async fn call_round_trips() {
        let ca = ClusterCa::generate().unwrap();
        let (a, _) = node(&ca, "node-a", quick());
        let (b, hb) = node(&ca, "node-b", quick());
        let b_addr = b.local_addr().unwrap();
        let pong = a
            .call(b_addr, "node-b", &Request::Ping { sent_unix_ms: 42 })
            .await
            .unwrap();
        assert_eq!(
            pong,
            Response::Pong {
                info: info("node-b"),
                unix_ms: 42
            }
        );
        let rest = RestRequest {
            method: "POST".into(),
            path: "/sandboxes/x/timeout".into(),
            query: String::new(),
            headers: vec![Header {
                name: "content-type".into(),
                value: b"application/json".to_vec(),
            }],
            body: vec![7; 1 << 20],
        };
        let Response::Rest(r) = a
            .call(b_addr, "node-b", &Request::Rest(rest.clone()))
            .await
            .unwrap()
        else {
            panic!("not a REST answer");
        };
        assert_eq!(
            (r.status, r.headers, r.body),
            (200, rest.headers, rest.body)
        );
        // Both calls rode one connection, and the server knew who called.
        assert_eq!(a.inner.conns.lock().unwrap().len(), 1);
        assert_eq!(hb.from_node_a.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn server_must_be_the_node_dialled() {
        let ca = ClusterCa::generate().unwrap();
        let (a, _) = node(&ca, "node-a", quick());
        let (b, hb) = node(&ca, "node-b", quick());
        let err = a
            .call(
                b.local_addr().unwrap(),
                "node-c",
                &Request::Ping { sent_unix_ms: 0 },
            )
            .await
            .unwrap_err();
        assert!(matches!(err, TransportError::Refused { .. }), "{err}");
        assert_eq!(hb.calls.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn node_of_another_ca_cannot_call_or_be_called() {
        let ca = ClusterCa::generate().unwrap();
        let rogue_ca = ClusterCa::generate().unwrap();
        let (b, hb) = node(&ca, "node-b", quick());
        // Same node id as a real member, but signed by another CA.
        let (rogue, hr) = node(&rogue_ca, "node-a", quick());
        let err = rogue
            .call(
                b.local_addr().unwrap(),
                "node-b",
                &Request::Ping { sent_unix_ms: 0 },
            )
            .await
            .unwrap_err();
        assert!(matches!(err, TransportError::Refused { .. }), "{err}");
        let err = b
            .call(
                rogue.local_addr().unwrap(),
                "node-a",
                &Request::Ping { sent_unix_ms: 0 },
            )
            .await
            .unwrap_err();
        assert!(matches!(err, TransportError::Refused { .. }), "{err}");
        assert_eq!(hb.calls.load(Ordering::SeqCst), 0);
        assert_eq!(hr.calls.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn client_without_certificate_is_refused() {
        let ca = ClusterCa::generate().unwrap();
        let (b, hb) = node(&ca, "node-b", quick());
        let mut endpoint = Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        endpoint
            .set_default_client_config(client_config(None, &ca.trust_root(), &quick()).unwrap());
        let b_addr = b.local_addr().unwrap();
        // The client may see its handshake finish (TLS 1.3 checks the
        // client's certificate last); the server refuses right after, so
        // the first exchange fails.
        let result = async {
            let conn = endpoint
                .connect(b_addr, "node-b")
                .map_err(|e| e.to_string())?
                .await
                .map_err(|e| e.to_string())?;
            let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
            let frame = Request::Ping { sent_unix_ms: 0 }.encode().unwrap();
            send.write_all(&frame).await.map_err(|e| e.to_string())?;
            let _ = send.finish();
            recv.read_to_end(1 << 20)
                .await
                .map_err(|e| format!("{e:?}"))
        };
        let err = tokio::time::timeout(Duration::from_secs(5), result)
            .await
            .unwrap()
            .unwrap_err();
        assert!(err.contains("certificate") || err.contains("116"), "{err}");
        assert_eq!(hb.calls.load(Ordering::SeqCst), 0);
    }

    /// Write raw bytes on a fresh stream of a real (authenticated)
    /// connection and return what the server answered, or its error.
    async fn send_raw(conn: &Connection, bytes: &[u8]) -> Result<Vec<u8>, String> {
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
        // The server may reset before taking it all: not an error here.
        let _ = send.write_all(bytes).await;
        let _ = send.finish();
        tokio::time::timeout(Duration::from_secs(5), recv.read_to_end(1 << 20))
            .await
            .map_err(|_| "timeout".to_string())?
            .map_err(|e| e.to_string())
    }

    #[tokio::test]
    async fn malformed_frames_are_refused_and_the_server_keeps_serving() {
        let ca = ClusterCa::generate().unwrap();
        let (a, _) = node(&ca, "node-a", quick());
        let (b, hb) = node(&ca, "node-b", quick());
        let b_addr = b.local_addr().unwrap();
        let conn = a.connection(b_addr, "node-b").await.unwrap();
        let good = Request::Ping { sent_unix_ms: 1 }.encode().unwrap();

        let mut random = vec![0u8; 4096];
        let mut x = 0x9e37_79b9_u32;
        for b in &mut random {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            *b = x as u8;
        }
        let mut garbage_archive = good[..4 + mesh::HEADER_LEN].to_vec();
        garbage_archive[..4].copy_from_slice(&(mesh::HEADER_LEN as u32 + 64).to_be_bytes());
        garbage_archive.extend_from_slice(&random[..64]);
        let oversized = u32::MAX.to_be_bytes().to_vec();
        let truncated = good[..good.len() - 3].to_vec();
        let mut wrong_kind = good.clone();
        wrong_kind[4 + 4] = FrameKind::Response as u8;

        for (name, bytes) in [
            ("random", &random),
            ("garbage archive", &garbage_archive),
            ("oversized length", &oversized),
            ("truncated", &truncated),
            ("wrong kind", &wrong_kind),
        ] {
            match send_raw(&conn, bytes).await {
                Err(e) => assert!(e.contains("reset") || e.contains("stopped"), "{name}: {e}"),
                Ok(answer) => panic!("{name}: answered {answer:?}"),
            }
        }

        // Another version is answered with ours, and the caller's error
        // says so.
        let mut newer = good.clone();
        newer[4 + 2..4 + 4].copy_from_slice(&(PROTOCOL_VERSION + 1).to_be_bytes());
        let answer = send_raw(&conn, &newer).await.unwrap();
        assert_eq!(answer, mesh::version_mismatch_frame());
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        send.write_all(&newer).await.unwrap();
        let err = read_message::<Response>(b_addr, &mut recv)
            .await
            .unwrap_err();
        assert!(
            matches!(err, TransportError::VersionMismatch { theirs, .. } if theirs == PROTOCOL_VERSION),
            "{err}"
        );

        // None of it reached the handler, and the server still serves,
        // on the same connection and on a new one.
        assert_eq!(hb.calls.load(Ordering::SeqCst), 0);
        assert!(send_raw(&conn, &good).await.is_ok());
        let (c, _) = node(&ca, "node-a", quick());
        assert!(matches!(
            c.call(b_addr, "node-b", &Request::Ping { sent_unix_ms: 2 })
                .await,
            Ok(Response::Pong { unix_ms: 2, .. })
        ));
        assert_eq!(hb.calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn silent_stream_is_dropped_after_the_first_frame_timeout() {
        let ca = ClusterCa::generate().unwrap();
        let config = TransportConfig {
            first_frame_timeout: Duration::from_millis(200),
            ..quick()
        };
        let (a, _) = node(&ca, "node-a", config.clone());
        let (b, _) = node(&ca, "node-b", config);
        let conn = a
            .connection(b.local_addr().unwrap(), "node-b")
            .await
            .unwrap();
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        send.write_all(&[0, 0]).await.unwrap(); // half a length prefix
        let err = tokio::time::timeout(Duration::from_secs(5), recv.read_to_end(16))
            .await
            .unwrap()
            .unwrap_err();
        assert!(err.to_string().contains("reset"), "{err}");
    }

    #[tokio::test]
    async fn unreachable_peer_times_out() {
        let ca = ClusterCa::generate().unwrap();
        let config = TransportConfig {
            connect_timeout: Duration::from_millis(300),
            ..quick()
        };
        let (a, _) = node(&ca, "node-a", config);
        // A bound UDP socket that never answers.
        let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let err = a
            .call(
                silent.local_addr().unwrap(),
                "node-b",
                &Request::Ping { sent_unix_ms: 0 },
            )
            .await
            .unwrap_err();
        assert!(matches!(err, TransportError::Timeout { .. }), "{err}");
    }

    fn rss_kib() -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn raw_stream_carries_100_mib_in_bounded_memory() {
        const TOTAL: u64 = 100 << 20;
        let ca = ClusterCa::generate().unwrap();
        let (a, _) = node(&ca, "node-a", quick());
        let (b, _) = node(&ca, "node-b", quick());
        let b_addr = b.local_addr().unwrap();

        let refused = a
            .open_stream(
                b_addr,
                "node-b",
                &StreamHeader {
                    sandbox_id: "s".into(),
                    port: 0,
                },
            )
            .await
            .unwrap_err();
        assert!(
            matches!(
                &refused,
                TransportError::Rejected {
                    kind: ErrorKind::NotFound,
                    ..
                }
            ),
            "{refused}"
        );

        let header = StreamHeader {
            sandbox_id: "sbx-1".into(),
            port: 49983,
        };
        let (mut send, mut recv) = a.open_stream(b_addr, "node-b", &header).await.unwrap();
        let before = rss_kib();
        let chunk = vec![0x5a; 64 * 1024];
        let started = std::time::Instant::now();
        for _ in 0..TOTAL / chunk.len() as u64 {
            send.write_all(&chunk).await.unwrap();
        }
        send.shutdown().await.unwrap();
        let mut count = [0u8; 8];
        recv.read_exact(&mut count).await.unwrap();
        let elapsed = started.elapsed();
        let grown = rss_kib().saturating_sub(before);
        eprintln!(
            "100 MiB raw stream: {:.1} MB/s, RSS grew {grown} KiB",
            TOTAL as f64 / 1e6 / elapsed.as_secs_f64()
        );
        assert_eq!(u64::from_be_bytes(count), TOTAL);
        // Flow-control windows (a few MiB), not the 100 MiB sent.
        assert!(grown < 32 * 1024, "RSS grew {grown} KiB");
    }
}
