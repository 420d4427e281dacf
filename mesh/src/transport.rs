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
    Response, StreamHeader, StreamReply,
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
        quinn::ConnectionError::TransportError(t) if is_crypto(t.code) => {
            TransportError::Refused {
                peer,
                reason: e.to_string(),
            }
        }
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
/// closes the stream, which the opener sees as an error.
pub struct IncomingStream {
    header: StreamHeader,
    peer: SocketAddr,
    send: SendStream,
    recv: RecvStream,
}

impl IncomingStream {
    pub fn header(&self) -> &StreamHeader {
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
        let endpoint =
            Endpoint::server(server, addr).map_err(|source| TransportError::Bind { addr, source })?;
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
            let (mut send, mut recv) = conn
                .open_bi()
                .await
                .map_err(|e| conn_error(peer_addr, e))?;
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
        let frame = header.encode().map_err(TransportError::Encode)?;
        let after = self.inner.config.call_timeout;
        tokio::time::timeout(after, async {
            let conn = self.connection(peer_addr, peer_id).await?;
            let (mut send, mut recv) = conn
                .open_bi()
                .await
                .map_err(|e| conn_error(peer_addr, e))?;
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
    let header = FrameHeader::parse(&body).map_err(|source| TransportError::Frame { peer, source })?;
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
