//! Remote actors over the mesh: every node runs a ractor_cluster
//! `NodeServer` whose sessions ride the mesh's mutual-TLS QUIC
//! connections, one bidirectional stream per pair of nodes, never a port
//! of their own (the NodeServer runs without its TCP listener, see
//! `actors/vendor/ractor_cluster/PATCHES.md`).
//!
//! - **Who dials**: of two verified members (they answered a mesh ping
//!   with the cluster's certificate for their id), the one with the
//!   smaller node id opens the session, so a pair has one session and no
//!   election. The stream's first frame is a [`SessionHeader`]; the other
//!   side checks that the opener's certificate names the id it claims and
//!   that it speaks [`ACTOR_PROTOCOL`] (ractor_cluster's version and our
//!   message set), refuses anything else with a log line naming the node,
//!   and hands the stream to its NodeServer
//!   (`NodeServerMessage::ConnectionOpenedExternal`).
//! - **Authentication** is the mesh's mTLS: ractor_cluster's own cookie
//!   handshake still runs, with the cluster id as the cookie (a check that
//!   both ends belong to one cluster, not a secret).
//! - **What crosses**: ractor_cluster syncs process groups, so a node's
//!   [`actors::placement`] actor (group `placement::group(node id)`) and
//!   its [`actors::directory`] actor (group `directory::group(node id)`)
//!   appear on every peer as remote `ActorRef`s, and its sandbox actors
//!   as the cluster's registry (scope `directory::scope(node id)`, one
//!   group per sandbox id). The placement actor's remote message carries
//!   an rkyv [`ClusterCall`] (reserve, release), the directory's an rkyv
//!   [`SandboxCall`] (locate a sandbox; a REST call on one), both
//!   validated with bytecheck on arrival.
//! - **A session that ends** (peer killed, connection lost) fails every
//!   call in flight on it at once (the caller sees "the actor session with
//!   N ended"), drops the peer's actors from the groups, and is dialled
//!   again by the verification loop once the peer answers again.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use super::lock;
use actors::directory::{self, DirectoryMsg};
use actors::placement::{self, PlacementMsg};
use ractor::rpc::CallResult;
use ractor::{Actor, ActorRef};
use ractor_cluster::{BoxRead, BoxWrite, ClusterBidiStream, NodeServer, NodeServerMessage};
use schema::mesh::{
    ACTOR_PROTOCOL, ClusterCall, ClusterReply, ErrorKind, MAX_SANDBOX_PAYLOAD, NodeInfo,
    SandboxCall, SandboxReply, SessionHeader,
};
use tokio::io::{AsyncRead, AsyncWrite};

/// How long a remote actor call may take before the caller gives up.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// How long after a failed dial the session is tried again.
pub const REDIAL_AFTER: Duration = Duration::from_secs(2);

/// Largest ractor_cluster frame accepted from a peer: a sandbox call's
/// payload (a REST body or answer, at most [`MAX_SANDBOX_PAYLOAD`]) and
/// the frame around it (placement calls are a few hundred bytes, pg
/// syncs a few KiB).
pub const MAX_SESSION_FRAME: u64 = MAX_SANDBOX_PAYLOAD as u64 + (64 << 10);

/// A session this node dialled, by peer id.
enum Dial {
    /// Being opened, or up: `serial` tells this dial's guard from a newer
    /// one's.
    Open { serial: u64 },
    /// Failed; not tried again before `until`.
    Failed { until: Instant },
}

type Dials = Mutex<HashMap<String, Dial>>;

/// This node's NodeServer and the sessions it dialled.
pub struct Remote {
    node_id: String,
    server: ActorRef<NodeServerMessage>,
    dials: Arc<Dials>,
    serial: std::sync::atomic::AtomicU64,
}

impl Remote {
    /// Start the NodeServer of node `node_id` in cluster `cluster_id`.
    pub async fn start(node_id: &str, cluster_id: &str) -> Result<Self, String> {
        // ractor_cluster names a node `name@host` and tells a connection to
        // itself by `host:port` too: the node id in both keeps them unique
        // (there is no port: 0).
        let server = NodeServer::new(
            0,
            cluster_id.to_owned(),
            node_id.to_owned(),
            node_id.to_owned(),
            None,
            None,
        )
        .without_listener()
        .with_max_inbound_frame_size(MAX_SESSION_FRAME);
        let (server, _) = Actor::spawn(None, server, ())
            .await
            .map_err(|e| format!("starting the ractor_cluster node server: {e}"))?;
        Ok(Self {
            node_id: node_id.to_owned(),
            server,
            dials: Arc::new(Mutex::new(HashMap::new())),
            serial: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// Whether this node dials the session with `peer` (the smaller id
    /// does).
    pub fn dials(&self, peer: &str) -> bool {
        self.node_id.as_str() < peer
    }

    /// Open the session with verified member `info` unless one is open or
    /// being opened, or the last try failed lately.
    pub fn ensure(&self, transport: &mesh::transport::Transport, info: &NodeInfo) {
        if !self.dials(&info.id) {
            return;
        }
        let serial = self
            .serial
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        {
            let mut dials = lock(&self.dials);
            match dials.get(&info.id) {
                Some(Dial::Open { .. }) => return,
                Some(Dial::Failed { until }) if *until > Instant::now() => return,
                _ => {}
            }
            dials.insert(info.id.clone(), Dial::Open { serial });
        }
        let guard = DialGuard {
            dials: Arc::downgrade(&self.dials),
            peer: info.id.clone(),
            serial,
        };
        let transport = transport.clone();
        let server = self.server.clone();
        let header = SessionHeader {
            node_id: self.node_id.clone(),
            actor_protocol: ACTOR_PROTOCOL.to_owned(),
        };
        let info = info.clone();
        let local = self.node_id.clone();
        tokio::spawn(async move {
            match transport
                .open_session(info.quic_addr, &info.id, &header)
                .await
            {
                Ok((send, recv)) => {
                    let stream = MeshSession {
                        send,
                        recv,
                        peer: info.id.clone(),
                        local,
                        guard: Some(guard),
                    };
                    if let Err(e) =
                        ractor_cluster::client_connect_external(&server, Box::new(stream)).await
                    {
                        tracing::warn!(node = %info.id, "handing the actor session to the node server: {e}");
                    } else {
                        tracing::info!(node = %info.id, "actor session opened over the mesh");
                    }
                }
                Err(e) => {
                    tracing::warn!(
                        node = %info.id,
                        quic = %info.quic_addr,
                        "actor session with node {} not opened: {e}",
                        info.id
                    );
                    guard.failed();
                }
            }
        });
    }

    /// Take a session a peer opened (its certificate names `header.node_id`,
    /// checked by the caller).
    pub fn accept<R, W>(&self, header: &SessionHeader, send: W, recv: R)
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let stream = MeshSession {
            send,
            recv,
            peer: header.node_id.clone(),
            local: self.node_id.clone(),
            guard: None,
        };
        match self
            .server
            .cast(NodeServerMessage::ConnectionOpenedExternal {
                stream: Box::new(stream),
                is_server: true,
            }) {
            Ok(()) => {
                tracing::info!(node = %header.node_id, "actor session accepted over the mesh")
            }
            Err(e) => {
                tracing::warn!(node = %header.node_id, "handing the actor session to the node server: {e}")
            }
        }
    }

    /// Whether node `id`'s placement actor is reachable from here (this
    /// node's own always is).
    pub fn has_placement(&self, id: &str) -> bool {
        id == self.node_id || !ractor::pg::get_members(&placement::group(id)).is_empty()
    }

    /// Whether node `id`'s sandbox directory is reachable from here.
    pub fn has_directory(&self, id: &str) -> bool {
        id == self.node_id || member(&directory::group(id)).is_some()
    }

    /// Ask node `info`'s placement actor `call` over its actor session.
    pub async fn placement_call(
        &self,
        info: &NodeInfo,
        call: ClusterCall,
    ) -> Result<ClusterReply, String> {
        let Some(cell) = member(&placement::group(&info.id)) else {
            return Err(format!("no actor session with node {} (yet)", info.id));
        };
        let actor: ActorRef<PlacementMsg> = cell.into();
        let sent = actor
            .call(
                |reply| PlacementMsg::Remote { call, reply },
                Some(CALL_TIMEOUT),
            )
            .await;
        answer(sent, &info.id, "placement actor", CALL_TIMEOUT)
    }

    /// Ask node `info`'s sandbox directory `call` over its actor session,
    /// waiting at most `timeout` for the answer.
    pub async fn sandbox_call(
        &self,
        info: &NodeInfo,
        call: SandboxCall,
        timeout: Duration,
    ) -> Result<SandboxReply, String> {
        let Some(cell) = member(&directory::group(&info.id)) else {
            return Err(format!("no actor session with node {} (yet)", info.id));
        };
        let actor: ActorRef<DirectoryMsg> = cell.into();
        let sent = actor
            .call(|reply| DirectoryMsg::Remote { call, reply }, Some(timeout))
            .await;
        answer(sent, &info.id, "sandbox directory", timeout)
    }

    pub fn stop(&self) {
        self.server.stop(None);
    }
}

impl Drop for Remote {
    fn drop(&mut self) {
        self.server.stop(None);
    }
}

/// The member of process group `group` to call: in one process (tests)
/// a group may also hold the peer's local actor; a remote member is the
/// one behind the session.
fn member(group: &str) -> Option<ractor::ActorCell> {
    let members = ractor::pg::get_members(&group.to_owned());
    members
        .iter()
        .find(|c| !c.get_id().is_local())
        .or(members.first())
        .cloned()
}

/// A remote call's outcome, with errors that name the node and say what
/// happened (the caller's answer to its client carries them).
fn answer<T>(
    sent: Result<CallResult<T>, impl std::fmt::Display>,
    node: &str,
    what: &str,
    timeout: Duration,
) -> Result<T, String> {
    match sent {
        Ok(CallResult::Success(r)) => Ok(r),
        Ok(CallResult::Timeout) => Err(format!(
            "node {node}'s {what} did not answer within {timeout:?}"
        )),
        Ok(CallResult::SenderError) => Err(format!(
            "the actor session with node {node} ended during the call"
        )),
        Err(e) => Err(format!("the actor session with node {node} is gone: {e}")),
    }
}

/// Why node `local` refuses the actor session a peer opened with
/// `header` (`None`: it takes it). `cert_names_it`: whether the peer's
/// certificate names the node id the header claims. The reason names the
/// peer, for the log line and for the peer.
pub fn refusal(
    local: &str,
    header: &SessionHeader,
    cert_names_it: bool,
) -> Option<(ErrorKind, String)> {
    let node = header.node_id.escape_debug();
    if !cert_names_it {
        return Some((
            ErrorKind::BadRequest,
            format!("the peer claims to be node {node}, but its certificate does not name it"),
        ));
    }
    if header.actor_protocol != ACTOR_PROTOCOL {
        return Some((
            ErrorKind::BadRequest,
            format!(
                "node {node} speaks {}, node {local} speaks {ACTOR_PROTOCOL}",
                header.actor_protocol.escape_debug()
            ),
        ));
    }
    if header.node_id.as_str() >= local {
        // The smaller id dials: a session the other way would be a second
        // one for the pair (or a node talking to itself).
        return Some((
            ErrorKind::BadRequest,
            format!("node {node} opened a session that node {local} opens (the smaller id dials)"),
        ));
    }
    None
}

/// Clears a dial's entry when its session's reader goes (the session
/// ended), so that the next verification round dials again.
struct DialGuard {
    dials: Weak<Dials>,
    peer: String,
    serial: u64,
}

impl DialGuard {
    fn failed(self) {
        if let Some(dials) = self.dials.upgrade() {
            let mut dials = lock(&dials);
            if matches!(dials.get(&self.peer), Some(Dial::Open { serial }) if *serial == self.serial)
            {
                dials.insert(
                    self.peer.clone(),
                    Dial::Failed {
                        until: Instant::now() + REDIAL_AFTER,
                    },
                );
            }
        }
        std::mem::forget(self);
    }
}

impl Drop for DialGuard {
    fn drop(&mut self) {
        if let Some(dials) = self.dials.upgrade() {
            let mut dials = lock(&dials);
            if matches!(dials.get(&self.peer), Some(Dial::Open { serial }) if *serial == self.serial)
            {
                // Dialled again by the verification loop (at most once a
                // second, or as soon as the peer is verified again).
                dials.remove(&self.peer);
                tracing::info!(node = %self.peer, "actor session ended");
            }
        }
    }
}

/// A QUIC stream pair as ractor_cluster's external transport.
struct MeshSession<R, W> {
    send: W,
    recv: R,
    peer: String,
    local: String,
    guard: Option<DialGuard>,
}

impl<R, W> ClusterBidiStream for MeshSession<R, W>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    fn split(self: Box<Self>) -> (BoxRead, BoxWrite) {
        // The read half holds the dial's guard for as long as the
        // session reads.
        let read = actors::holding::Holding::new(self.recv, self.guard);
        (Box::new(read), Box::new(self.send))
    }

    fn peer_label(&self) -> Option<String> {
        Some(format!("mesh:{}", self.peer))
    }

    fn local_label(&self) -> Option<String> {
        Some(format!("mesh:{}", self.local))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(node_id: &str, protocol: &str) -> SessionHeader {
        SessionHeader {
            node_id: node_id.into(),
            actor_protocol: protocol.into(),
        }
    }

    #[test]
    fn sessions_are_taken_only_from_the_named_node_of_this_protocol() {
        assert_eq!(refusal("n2", &header("n1", ACTOR_PROTOCOL), true), None);
        // Another ractor_cluster (or message set) version: refused, named.
        let (_, why) = refusal(
            "n2",
            &header("n1", "ractor_cluster-0.17.0/sandmesh-1"),
            true,
        )
        .expect("refused");
        assert!(why.contains("n1") && why.contains("0.17.0"), "{why}");
        // A certificate that does not name the claimed node.
        let (_, why) = refusal("n2", &header("n1", ACTOR_PROTOCOL), false).expect("refused");
        assert!(why.contains("n1") && why.contains("certificate"), "{why}");
        // The wrong direction, and oneself.
        assert!(refusal("n1", &header("n2", ACTOR_PROTOCOL), true).is_some());
        assert!(refusal("n1", &header("n1", ACTOR_PROTOCOL), true).is_some());
    }
}
