//! The node-to-node protocol of the mesh: what one sandmesh node gossips
//! about itself and what it asks another over QUIC.
//!
//! Two encodings, both parsed here so that untrusted bytes are checked in
//! one place:
//! - **Gossip** ([`NodeInfo::gossip_keys`], [`NodeInfo::from_gossip`]):
//!   chitchat carries string key/value pairs per node, so a node's
//!   [`NodeInfo`] is spread over a few small keys. Gossip is unauthenticated
//!   (see `mesh/`), so nothing decided from it may be a security decision.
//! - **Frames** on QUIC streams: a u32 big-endian length, then an
//!   [`HEADER_LEN`]-byte header (magic, [`PROTOCOL_VERSION`], kind) and the
//!   rkyv archive of one message. The version sits outside the archive
//!   because rkyv is not self-describing: a peer of another version must be
//!   refused by its header, never misread. Every archive is validated
//!   (`rkyv` with bytecheck) after being copied into an aligned buffer;
//!   nothing here uses `access_unchecked`.
//!
//! Bodies (E2B REST JSON, for instance) travel as opaque `Vec<u8>`: the
//! mesh forwards them and the node parses them with the serde types of
//! [`crate::e2b`], so no serde type has to be rkyv-encodable.

use std::fmt;
use std::net::SocketAddr;

use rkyv::rancor;
use rkyv::util::AlignedVec;

/// The version of the frame format and of every message in it. Bump it on
/// any change to a type in this module (rkyv has no schema evolution).
pub const PROTOCOL_VERSION: u16 = 3;

/// First bytes of every frame header: catches a peer speaking something
/// else entirely before the version is even looked at.
pub const MAGIC: [u8; 2] = *b"SM";

/// Bytes of the frame header: magic (2), version (2, big-endian), kind (1),
/// reserved (3, zero). Eight, so the archive after it starts 8-aligned.
pub const HEADER_LEN: usize = 8;

/// Largest frame (header and archive, not counting the length prefix).
/// Requests and responses are small control messages; anything large
/// (file uploads, sandbox traffic) goes over a raw stream instead. The
/// bound is what keeps a peer from making a receiver allocate without
/// limit.
pub const MAX_FRAME: usize = 8 << 20;

/// Longest node id. The id is the DNS name in the node's certificate (so
/// one DNS label). Sandbox ids made before the cluster registry ended
/// with their node id (`<16 random>-<node id>`) and still route by it;
/// such an id must fit a DNS label after the port prefix of a sandbox
/// host name (`49983-<sandbox id>.<domain>`): 6 + 16 + 1 + 40 = 63.
pub const MAX_NODE_ID_LEN: usize = 40;

/// At most this many template ids are gossiped per node: a node's whole
/// state has to fit in one UDP datagram (about 64 KiB) next to everyone
/// else's digest. Placement only needs the hot ones.
pub const MAX_GOSSIP_TEMPLATES: usize = 128;

/// What a frame carries; the kind is in the header so a receiver knows
/// which archive type to validate against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameKind {
    Request = 1,
    Response = 2,
    /// First frame of a raw stream: a [`StreamHeader`].
    StreamOpen = 3,
    /// The answer to a [`StreamHeader`]: a [`StreamReply`].
    StreamReply = 4,
    /// Header-only frame sent back to a peer whose frame had another
    /// version; its header carries the sender's version.
    VersionMismatch = 5,
    /// First frame of a stream that carries a ractor_cluster session: a
    /// [`SessionHeader`], answered by a [`StreamReply`].
    SessionOpen = 6,
}

impl FrameKind {
    fn from_u8(b: u8) -> Option<Self> {
        Some(match b {
            1 => Self::Request,
            2 => Self::Response,
            3 => Self::StreamOpen,
            4 => Self::StreamReply,
            5 => Self::VersionMismatch,
            6 => Self::SessionOpen,
            _ => return None,
        })
    }
}

/// Why a frame was refused. Every variant is a property of the bytes
/// received; none of them may take the receiver down.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {len} bytes is larger than the limit of {max}")]
    TooLarge { len: usize, max: usize },
    #[error("frame of {len} bytes is shorter than its {HEADER_LEN}-byte header")]
    TooShort { len: usize },
    #[error("frame does not start with the sandmesh magic")]
    BadMagic,
    #[error("peer speaks mesh protocol version {theirs}, we speak {ours}")]
    VersionMismatch { ours: u16, theirs: u16 },
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    #[error("expected a {expected:?} frame, got {got:?}")]
    UnexpectedKind { expected: FrameKind, got: FrameKind },
    #[error("malformed archive: {0}")]
    Malformed(String),
    #[error("cannot encode message: {0}")]
    Encode(String),
}

/// A checked frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub version: u16,
    pub kind: FrameKind,
}

impl FrameHeader {
    /// Header of a frame of this build's version.
    pub fn new(kind: FrameKind) -> Self {
        Self {
            version: PROTOCOL_VERSION,
            kind,
        }
    }

    pub fn to_bytes(self) -> [u8; HEADER_LEN] {
        let v = self.version.to_be_bytes();
        [MAGIC[0], MAGIC[1], v[0], v[1], self.kind as u8, 0, 0, 0]
    }

    /// Parse the header at the start of a frame body. The version is
    /// returned as found (a [`FrameKind::VersionMismatch`] answer carries
    /// the peer's version); [`decode_body`] is what refuses other versions.
    pub fn parse(body: &[u8]) -> Result<Self, FrameError> {
        if body.len() < HEADER_LEN {
            return Err(FrameError::TooShort { len: body.len() });
        }
        if body[..2] != MAGIC {
            return Err(FrameError::BadMagic);
        }
        let version = u16::from_be_bytes([body[2], body[3]]);
        let kind = FrameKind::from_u8(body[4]).ok_or(FrameError::UnknownKind(body[4]))?;
        Ok(Self { version, kind })
    }
}

/// Length of the frame body announced by a 4-byte prefix, checked against
/// [`MAX_FRAME`] before anything is read or allocated.
pub fn body_len(prefix: [u8; 4]) -> Result<usize, FrameError> {
    let len = u32::from_be_bytes(prefix) as usize;
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge {
            len,
            max: MAX_FRAME,
        });
    }
    if len < HEADER_LEN {
        return Err(FrameError::TooShort { len });
    }
    Ok(len)
}

/// A whole header-only frame (prefix included) telling a peer which
/// version we speak.
pub fn version_mismatch_frame() -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + HEADER_LEN);
    out.extend_from_slice(&(HEADER_LEN as u32).to_be_bytes());
    out.extend_from_slice(&FrameHeader::new(FrameKind::VersionMismatch).to_bytes());
    out
}

/// Check a frame body's header for `kind` and this build's version, and
/// return the archive bytes after it.
fn payload(body: &[u8], kind: FrameKind) -> Result<&[u8], FrameError> {
    if body.len() > MAX_FRAME {
        return Err(FrameError::TooLarge {
            len: body.len(),
            max: MAX_FRAME,
        });
    }
    let header = FrameHeader::parse(body)?;
    if header.version != PROTOCOL_VERSION {
        return Err(FrameError::VersionMismatch {
            ours: PROTOCOL_VERSION,
            theirs: header.version,
        });
    }
    if header.kind != kind {
        return Err(FrameError::UnexpectedKind {
            expected: kind,
            got: header.kind,
        });
    }
    Ok(&body[HEADER_LEN..])
}

/// A message that travels in a frame of its own kind.
pub trait Message: Sized {
    const KIND: FrameKind;
    /// The whole frame: length prefix, header, archive.
    fn encode(&self) -> Result<Vec<u8>, FrameError>;
    /// Validate and decode a frame body (what follows the length prefix).
    fn decode_body(body: &[u8]) -> Result<Self, FrameError>;
}

/// Also `pub` for the fuzz target and tests: the decode of a body, whatever
/// its kind, through the same checks a receiver applies.
pub fn decode_body<M: Message>(body: &[u8]) -> Result<M, FrameError> {
    M::decode_body(body)
}

macro_rules! message {
    ($ty:ty, $kind:expr) => {
        impl Message for $ty {
            const KIND: FrameKind = $kind;

            fn encode(&self) -> Result<Vec<u8>, FrameError> {
                let archive = rkyv::to_bytes::<rancor::Error>(self)
                    .map_err(|e| FrameError::Encode(e.to_string()))?;
                let len = HEADER_LEN + archive.len();
                if len > MAX_FRAME {
                    return Err(FrameError::TooLarge {
                        len,
                        max: MAX_FRAME,
                    });
                }
                let mut out = Vec::with_capacity(4 + len);
                out.extend_from_slice(&(len as u32).to_be_bytes());
                out.extend_from_slice(&FrameHeader::new(Self::KIND).to_bytes());
                out.extend_from_slice(&archive);
                Ok(out)
            }

            fn decode_body(body: &[u8]) -> Result<Self, FrameError> {
                let bytes = payload(body, Self::KIND)?;
                // Validation needs the archive aligned; a network buffer
                // gives no such promise, so copy (frames are small).
                let mut aligned = AlignedVec::<16>::with_capacity(bytes.len());
                aligned.extend_from_slice(bytes);
                rkyv::from_bytes::<Self, rancor::Error>(&aligned)
                    .map_err(|e| FrameError::Malformed(e.to_string()))
            }
        }
    };
}

message!(Request, FrameKind::Request);
message!(Response, FrameKind::Response);
message!(StreamHeader, FrameKind::StreamOpen);
message!(StreamReply, FrameKind::StreamReply);
message!(SessionHeader, FrameKind::SessionOpen);

/// What a node tells the cluster about itself. Placement reads it (free
/// capacity, cached templates, state); the REST front reads `rest_addr`;
/// the transport dials `quic_addr` and checks the peer's certificate
/// against `id`.
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct NodeInfo {
    /// Cluster-unique, a DNS label (see [`validate_node_id`]).
    pub id: String,
    /// Start time of this run of the node (unix milliseconds, or anything
    /// that grows across restarts): a restarted node is a new member, and
    /// of two members with one id the higher generation is the current one.
    pub generation: u64,
    pub quic_addr: SocketAddr,
    pub rest_addr: SocketAddr,
    pub state: NodeState,
    pub free_vcpus: u32,
    pub free_memory_mib: u64,
    pub sandboxes: u32,
    /// Sandboxes the node runs at most (`--max-sandboxes`): placement skips
    /// a node with no room left rather than have it answer 429.
    pub max_sandboxes: u32,
    /// Templates with a snapshot cached on this node (placement prefers
    /// them). At most [`MAX_GOSSIP_TEMPLATES`] are gossiped.
    pub templates: Vec<String>,
}

/// Whether a node takes new sandboxes.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize,
)]
pub enum NodeState {
    /// Takes new sandboxes.
    Ready,
    /// Serves the sandboxes it has, takes no new ones (maintenance).
    Draining,
    /// Up but failing its own checks; placement avoids it.
    Unhealthy,
}

impl NodeState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ready => "ready",
            Self::Draining => "draining",
            Self::Unhealthy => "unhealthy",
        }
    }
}

impl fmt::Display for NodeState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for NodeState {
    type Err = GossipError;
    fn from_str(s: &str) -> Result<Self, GossipError> {
        Ok(match s {
            "ready" => Self::Ready,
            "draining" => Self::Draining,
            "unhealthy" => Self::Unhealthy,
            _ => return Err(GossipError::Invalid { key: KEY_STATE }),
        })
    }
}

/// A node id is refused unless it is one lowercase DNS label: it is the
/// DNS name in the node's certificate, and a gossip/log token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid node id {0:?}: want 1-40 of a-z, 0-9 and '-', not starting or ending with '-'")]
pub struct InvalidNodeId(pub String);

pub fn validate_node_id(id: &str) -> Result<(), InvalidNodeId> {
    let ok = !id.is_empty()
        && id.len() <= MAX_NODE_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !id.starts_with('-')
        && !id.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(InvalidNodeId(id.to_owned()))
    }
}

/// Gossip keys of a [`NodeInfo`]. The id and generation are not keys:
/// chitchat carries them in the member's identity.
pub const KEY_PROTOCOL: &str = "mesh_protocol";
pub const KEY_QUIC_ADDR: &str = "quic_addr";
pub const KEY_REST_ADDR: &str = "rest_addr";
pub const KEY_STATE: &str = "state";
pub const KEY_FREE_VCPUS: &str = "free_vcpus";
pub const KEY_FREE_MEMORY_MIB: &str = "free_memory_mib";
pub const KEY_SANDBOXES: &str = "sandboxes";
pub const KEY_MAX_SANDBOXES: &str = "max_sandboxes";
pub const KEY_TEMPLATES: &str = "templates";

/// A member's gossiped keys that do not make a [`NodeInfo`]: a node that
/// just joined (its keys not all received yet) or a peer of another build.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GossipError {
    #[error("gossip key {key} missing")]
    Missing { key: &'static str },
    #[error("gossip key {key} has an invalid value")]
    Invalid { key: &'static str },
}

impl NodeInfo {
    /// The key/value pairs that publish this info (and the protocol
    /// version the node speaks). Template ids containing ',' cannot be
    /// listed and are left out, as are those past [`MAX_GOSSIP_TEMPLATES`].
    pub fn gossip_keys(&self) -> Vec<(String, String)> {
        let templates: Vec<&str> = self
            .templates
            .iter()
            .map(String::as_str)
            .filter(|t| !t.is_empty() && !t.contains(','))
            .take(MAX_GOSSIP_TEMPLATES)
            .collect();
        vec![
            (KEY_PROTOCOL.into(), PROTOCOL_VERSION.to_string()),
            (KEY_QUIC_ADDR.into(), self.quic_addr.to_string()),
            (KEY_REST_ADDR.into(), self.rest_addr.to_string()),
            (KEY_STATE.into(), self.state.as_str().into()),
            (KEY_FREE_VCPUS.into(), self.free_vcpus.to_string()),
            (KEY_FREE_MEMORY_MIB.into(), self.free_memory_mib.to_string()),
            (KEY_SANDBOXES.into(), self.sandboxes.to_string()),
            (KEY_MAX_SANDBOXES.into(), self.max_sandboxes.to_string()),
            (KEY_TEMPLATES.into(), templates.join(",")),
        ]
    }

    /// Rebuild a member's info from its gossiped keys (`get` looks one up).
    /// Returns the info and the mesh protocol version the member speaks.
    pub fn from_gossip<'a>(
        id: &str,
        generation: u64,
        get: impl Fn(&str) -> Option<&'a str>,
    ) -> Result<(NodeInfo, u16), GossipError> {
        fn parse<'a, T: std::str::FromStr>(
            get: &dyn Fn(&str) -> Option<&'a str>,
            key: &'static str,
        ) -> Result<T, GossipError> {
            get(key)
                .ok_or(GossipError::Missing { key })?
                .parse()
                .map_err(|_| GossipError::Invalid { key })
        }
        let get: &dyn Fn(&str) -> Option<&'a str> = &get;
        let templates = get(KEY_TEMPLATES)
            .ok_or(GossipError::Missing { key: KEY_TEMPLATES })?
            .split(',')
            .filter(|t| !t.is_empty())
            .take(MAX_GOSSIP_TEMPLATES)
            .map(str::to_owned)
            .collect();
        let info = NodeInfo {
            id: id.to_owned(),
            generation,
            quic_addr: parse(get, KEY_QUIC_ADDR)?,
            rest_addr: parse(get, KEY_REST_ADDR)?,
            state: get(KEY_STATE)
                .ok_or(GossipError::Missing { key: KEY_STATE })?
                .parse()?,
            free_vcpus: parse(get, KEY_FREE_VCPUS)?,
            free_memory_mib: parse(get, KEY_FREE_MEMORY_MIB)?,
            sandboxes: parse(get, KEY_SANDBOXES)?,
            max_sandboxes: parse(get, KEY_MAX_SANDBOXES)?,
            templates,
        };
        Ok((info, parse(get, KEY_PROTOCOL)?))
    }
}

/// One HTTP header of a forwarded request or response. Values are bytes:
/// HTTP allows non-UTF-8 header values.
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct Header {
    pub name: String,
    pub value: Vec<u8>,
}

/// An E2B REST call forwarded as is to the node that serves it (one hop:
/// the receiving node serves it locally, never forwards again).
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct RestRequest {
    pub method: String,
    pub path: String,
    /// The raw query string, without '?'; empty when none.
    pub query: String,
    pub headers: Vec<Header>,
    pub body: Vec<u8>,
}

/// The owner's answer to a forwarded call, relayed as is to the client.
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct RestResponse {
    pub status: u16,
    pub headers: Vec<Header>,
    pub body: Vec<u8>,
}

/// What one node asks another.
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub enum Request {
    /// Liveness and clock: the answer carries the peer's info and wall
    /// clock, so a caller can measure round trip and clock skew.
    Ping { sent_unix_ms: u64 },
    /// An E2B REST call for this node to serve itself, answered with
    /// [`Response::Rest`]: a create placement chose it for, or its share
    /// of a cluster-wide list. The receiver checks the client's API key
    /// again and never forwards it further. A call on a sandbox is not
    /// one of these (it is a remote actor call, [`SandboxCall::Rest`]),
    /// and is refused.
    Rest(RestRequest),
    /// Which of the receiver's sandboxes a signed `/files` URL (E2B's
    /// `download_url()`/`upload_url()`, which names no sandbox) is for:
    /// the signature is made with the sandbox's envd access token, which
    /// only its owner holds. `query` is the URL's query string. Answered
    /// with [`Response::SignedBy`].
    WhoSigned { method: String, query: String },
}

/// Coarse class of a mesh-level failure, for mapping to an HTTP status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub enum ErrorKind {
    BadRequest,
    NotFound,
    /// Draining, overloaded, or shutting down: try another node.
    Unavailable,
    Internal,
}

/// What a node answers.
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub enum Response {
    Pong {
        info: NodeInfo,
        unix_ms: u64,
    },
    Rest(RestResponse),
    /// The sandbox whose token makes a [`Request::WhoSigned`] signature
    /// valid, if the receiver owns it.
    SignedBy {
        sandbox_id: Option<String>,
    },
    /// The request could not be served at all (no REST answer to relay).
    Error {
        kind: ErrorKind,
        message: String,
    },
}

/// First frame of a raw bidirectional stream: which sandbox port the bytes
/// that follow are for. After the [`StreamReply`] the stream carries the
/// sandbox traffic unframed, end to end.
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct StreamHeader {
    pub sandbox_id: String,
    pub port: u16,
}

/// The owner's answer to a [`StreamHeader`], before any raw byte.
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub enum StreamReply {
    Accepted,
    Rejected { kind: ErrorKind, reason: String },
}

/// First frame of the stream a node opens to carry its ractor_cluster
/// session with a peer (remote actors, see `node/src/cluster/remote.rs`).
/// After the [`StreamReply`] the stream carries ractor_cluster's own
/// frames (length-prefixed protobuf) until either side closes it.
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct SessionHeader {
    /// The opener's node id; the receiver checks that the opener's
    /// certificate names it.
    pub node_id: String,
    /// [`ACTOR_PROTOCOL`] of the opener: the ractor_cluster wire protocol
    /// and the set of remote messages it speaks.
    pub actor_protocol: String,
}

/// What a node's remote actors speak: ractor_cluster's crate version (its
/// session protocol), and the version of [`ClusterCall`]/[`ClusterReply`]
/// and [`SandboxCall`]/[`SandboxReply`].
/// A session is refused unless both sides say the same.
pub const ACTOR_PROTOCOL: &str = "ractor_cluster-0.16.5/sandmesh-2";

/// What one node's actors ask another's over a ractor_cluster session.
/// Encoded with rkyv as the argument bytes of a remote actor message, and
/// validated with bytecheck on arrival ([`decode_actor_payload`]).
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub enum ClusterCall {
    /// Hold a slot of the node's capacity for one create of `template`
    /// (`memory_mib` of memory, 0 when unknown). Answered by
    /// [`ClusterReply::Reserved`] or [`ClusterReply::Refused`].
    Reserve { template: String, memory_mib: u64 },
    /// Give back a slot that no create will use.
    Release { token: u64 },
}

/// The answer to a [`ClusterCall`].
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub enum ClusterReply {
    /// A slot is held under `token` until the create that names it
    /// arrives, or `ttl_ms` passes.
    Reserved {
        token: u64,
        ttl_ms: u64,
    },
    /// No slot: `status` is the HTTP status a create would get (429 full,
    /// 503 draining or unhealthy), `message` says why.
    Refused {
        status: u16,
        message: String,
    },
    Released,
}

/// Largest remote actor payload accepted (a [`ClusterCall`] or
/// [`ClusterReply`] is a few hundred bytes).
pub const MAX_ACTOR_PAYLOAD: usize = 64 << 10;

/// What one node asks another's sandbox directory (the per-node actor
/// that answers for the sandboxes the node owns) over a ractor_cluster
/// session. rkyv in the remote message's argument bytes, validated with
/// bytecheck on arrival ([`decode_actor_payload_within`] with
/// [`MAX_SANDBOX_PAYLOAD`]).
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub enum SandboxCall {
    /// Whether the receiver owns sandbox `sandbox_id` (running, or paused
    /// with its snapshot on the receiver): the registry's fallback when
    /// the process groups have not shown the sandbox yet. Answered by
    /// [`SandboxReply::Located`].
    Locate { sandbox_id: String },
    /// An E2B REST call on one of the receiver's sandboxes (get, kill,
    /// pause, resume, connect, timeout, refreshes, logs, metrics), carried
    /// as the client sent it, headers (API key included) and all: the
    /// receiver serves it through its own REST app, so it checks the key
    /// again, and never sends it further. `from` is the caller's node id
    /// (for logs). Answered by [`SandboxReply::Rest`].
    Rest { from: String, request: RestRequest },
}

/// The answer to a [`SandboxCall`].
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub enum SandboxReply {
    /// `owned`: whether the receiver owns the sandbox asked about.
    Located { owned: bool },
    /// The owner's answer, relayed as is to the client.
    Rest(RestResponse),
    /// The call could not be served at all (no REST answer to relay).
    Error { kind: ErrorKind, message: String },
}

/// Largest [`SandboxCall`]/[`SandboxReply`] accepted: a REST request body
/// of up to 1 MiB, or an answer such as a sandbox's log (its events and
/// console tail), with room to spare. A ractor_cluster session frame must
/// hold one (`node/src/cluster/remote.rs`).
pub const MAX_SANDBOX_PAYLOAD: usize = 4 << 20;

/// Encode a remote actor payload.
pub fn encode_actor_payload<T>(value: &T) -> Result<Vec<u8>, FrameError>
where
    T: for<'a> rkyv::Serialize<
            rkyv::api::high::HighSerializer<
                AlignedVec,
                rkyv::ser::allocator::ArenaHandle<'a>,
                rancor::Error,
            >,
        >,
{
    rkyv::to_bytes::<rancor::Error>(value)
        .map(|v| v.to_vec())
        .map_err(|e| FrameError::Encode(e.to_string()))
}

/// Validate (bytecheck) and decode a remote actor payload: untrusted bytes
/// from another node, refused with an error, never a panic.
pub fn decode_actor_payload<T>(bytes: &[u8]) -> Result<T, FrameError>
where
    T: rkyv::Archive,
    T::Archived: for<'a> rkyv::bytecheck::CheckBytes<rkyv::api::high::HighValidator<'a, rancor::Error>>
        + rkyv::Deserialize<T, rkyv::api::high::HighDeserializer<rancor::Error>>,
{
    decode_actor_payload_within(bytes, MAX_ACTOR_PAYLOAD)
}

/// [`decode_actor_payload`] of a payload of at most `max` bytes (a
/// [`SandboxCall`] carries a REST body: [`MAX_SANDBOX_PAYLOAD`]).
pub fn decode_actor_payload_within<T>(bytes: &[u8], max: usize) -> Result<T, FrameError>
where
    T: rkyv::Archive,
    T::Archived: for<'a> rkyv::bytecheck::CheckBytes<rkyv::api::high::HighValidator<'a, rancor::Error>>
        + rkyv::Deserialize<T, rkyv::api::high::HighDeserializer<rancor::Error>>,
{
    if bytes.len() > max {
        return Err(FrameError::TooLarge {
            len: bytes.len(),
            max,
        });
    }
    let mut aligned = AlignedVec::<16>::with_capacity(bytes.len());
    aligned.extend_from_slice(bytes);
    rkyv::from_bytes::<T, rancor::Error>(&aligned).map_err(|e| FrameError::Malformed(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn actor_payloads_round_trip_and_garbage_is_refused() {
        let call = ClusterCall::Reserve {
            template: "base".into(),
            memory_mib: 512,
        };
        let bytes = encode_actor_payload(&call).unwrap();
        assert_eq!(decode_actor_payload::<ClusterCall>(&bytes).unwrap(), call);
        let reply = ClusterReply::Refused {
            status: 429,
            message: "full".into(),
        };
        let bytes = encode_actor_payload(&reply).unwrap();
        assert_eq!(decode_actor_payload::<ClusterReply>(&bytes).unwrap(), reply);
        // Truncations and bit flips: an error or a valid value, never a
        // panic; an out-of-range tag is an error.
        for cut in 0..bytes.len() {
            let _ = decode_actor_payload::<ClusterReply>(&bytes[..cut]);
        }
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0xff;
            let _ = decode_actor_payload::<ClusterReply>(&b);
        }
        assert!(decode_actor_payload::<ClusterCall>(&[0xff; 16]).is_err());
        let call = SandboxCall::Rest {
            from: "n1".into(),
            request: RestRequest {
                method: "DELETE".into(),
                path: "/sandboxes/abc".into(),
                query: String::new(),
                headers: vec![Header {
                    name: "x-api-key".into(),
                    value: b"k".to_vec(),
                }],
                body: vec![0; 100_000],
            },
        };
        let bytes = encode_actor_payload(&call).unwrap();
        assert!(
            decode_actor_payload::<SandboxCall>(&bytes).is_err(),
            "over 64 KiB"
        );
        assert_eq!(
            decode_actor_payload_within::<SandboxCall>(&bytes, MAX_SANDBOX_PAYLOAD).unwrap(),
            call
        );
        for i in (0..bytes.len()).step_by(97) {
            let mut b = bytes.clone();
            b[i] ^= 0xff;
            let _ = decode_actor_payload_within::<SandboxCall>(&b, MAX_SANDBOX_PAYLOAD);
        }
        let reply = SandboxReply::Located { owned: true };
        let bytes = encode_actor_payload(&reply).unwrap();
        assert_eq!(
            decode_actor_payload_within::<SandboxReply>(&bytes, MAX_SANDBOX_PAYLOAD).unwrap(),
            reply
        );
        assert!(decode_actor_payload_within::<SandboxReply>(&[0xff; 16], 1 << 20).is_err());
        assert!(decode_actor_payload::<ClusterCall>(&vec![0; MAX_ACTOR_PAYLOAD + 1]).is_err());
    }

    fn info() -> NodeInfo {
        NodeInfo {
            id: "node-a".into(),
            generation: 1_700_000_000_000,
            quic_addr: "10.0.0.1:7001".parse().unwrap(),
            rest_addr: "[::1]:3000".parse().unwrap(),
            state: NodeState::Draining,
            free_vcpus: 12,
            free_memory_mib: 4096,
            sandboxes: 3,
            max_sandboxes: 64,
            templates: vec!["base".into(), "code-interpreter".into()],
        }
    }

    fn body(frame: &[u8]) -> &[u8] {
        let len = body_len(frame[..4].try_into().unwrap()).unwrap();
        assert_eq!(len, frame.len() - 4);
        &frame[4..]
    }

    #[test]
    fn every_message_round_trips() {
        let req = Request::Rest(RestRequest {
            method: "POST".into(),
            path: "/sandboxes/abc/timeout".into(),
            query: "a=1".into(),
            headers: vec![Header {
                name: "x-api-key".into(),
                value: vec![0xff, 0],
            }],
            body: b"{\"timeout\":30}".to_vec(),
        });
        assert_eq!(
            decode_body::<Request>(body(&req.encode().unwrap())),
            Ok(req)
        );
        let resp = Response::Pong {
            info: info(),
            unix_ms: 5,
        };
        assert_eq!(
            decode_body::<Response>(body(&resp.encode().unwrap())),
            Ok(resp)
        );
        let h = StreamHeader {
            sandbox_id: "sbx".into(),
            port: 49983,
        };
        assert_eq!(
            decode_body::<StreamHeader>(body(&h.encode().unwrap())),
            Ok(h)
        );
        let r = StreamReply::Rejected {
            kind: ErrorKind::NotFound,
            reason: "no such sandbox".into(),
        };
        assert_eq!(
            decode_body::<StreamReply>(body(&r.encode().unwrap())),
            Ok(r)
        );
    }

    #[test]
    fn other_version_is_refused_by_header() {
        let mut frame = Request::Ping { sent_unix_ms: 1 }.encode().unwrap();
        frame[4 + 2..4 + 4].copy_from_slice(&(PROTOCOL_VERSION + 1).to_be_bytes());
        assert_eq!(
            decode_body::<Request>(&frame[4..]),
            Err(FrameError::VersionMismatch {
                ours: PROTOCOL_VERSION,
                theirs: PROTOCOL_VERSION + 1
            })
        );
        let answer = version_mismatch_frame();
        let h = FrameHeader::parse(body(&answer)).unwrap();
        assert_eq!(h.kind, FrameKind::VersionMismatch);
        assert_eq!(h.version, PROTOCOL_VERSION);
    }

    #[test]
    fn bad_frames_are_errors() {
        assert!(matches!(
            body_len(u32::MAX.to_be_bytes()),
            Err(FrameError::TooLarge { .. })
        ));
        assert!(matches!(
            body_len(3u32.to_be_bytes()),
            Err(FrameError::TooShort { .. })
        ));
        assert_eq!(
            decode_body::<Request>(b"XX\0\x01\x01\0\0\0"),
            Err(FrameError::BadMagic)
        );
        assert_eq!(
            decode_body::<Request>(b"SM\0\x01\x09\0\0\0"),
            Err(FrameError::UnknownKind(9))
        );
        let frame = Response::Rest(RestResponse {
            status: 200,
            headers: vec![],
            body: vec![1; 100],
        })
        .encode()
        .unwrap();
        assert!(matches!(
            decode_body::<Request>(&frame[4..]),
            Err(FrameError::UnexpectedKind { .. })
        ));
        // Every truncation and a garbage payload: errors, never panics.
        for cut in 4..frame.len() {
            let _ = decode_body::<Response>(&frame[4..cut]);
        }
        let mut garbage = FrameHeader::new(FrameKind::Response).to_bytes().to_vec();
        garbage.extend((0..200u32).map(|i| (i.wrapping_mul(7919) >> 3) as u8));
        assert!(matches!(
            decode_body::<Response>(&garbage),
            Err(FrameError::Malformed(_))
        ));
    }

    #[test]
    fn node_info_survives_gossip() {
        let i = info();
        let kvs = i.gossip_keys();
        let get = |k: &str| kvs.iter().find(|(kk, _)| kk == k).map(|(_, v)| v.as_str());
        let (back, version) = NodeInfo::from_gossip(&i.id, i.generation, get).unwrap();
        assert_eq!(back, i);
        assert_eq!(version, PROTOCOL_VERSION);
        let bad = |k: &str| {
            if k == KEY_FREE_VCPUS {
                Some("-1")
            } else {
                get(k)
            }
        };
        assert_eq!(
            NodeInfo::from_gossip(&i.id, 1, bad),
            Err(GossipError::Invalid {
                key: KEY_FREE_VCPUS
            })
        );
        let missing = |k: &str| if k == KEY_STATE { None } else { get(k) };
        assert_eq!(
            NodeInfo::from_gossip(&i.id, 1, missing),
            Err(GossipError::Missing { key: KEY_STATE })
        );
    }

    #[test]
    fn node_ids_are_dns_labels() {
        assert!(validate_node_id("node-1").is_ok());
        for bad in ["", "-a", "a-", "Node", "a.b", "a_b", &"a".repeat(41)] {
            assert!(validate_node_id(bad).is_err(), "{bad:?}");
        }
    }
}
