//! This node as a member of the cluster: what it gossips about itself,
//! who owns a sandbox, where a new one goes, and how calls and sandbox
//! traffic reach the owner in one hop.
//!
//! Every node runs the same code and the REST front on every node takes
//! any call. A sandbox id does not name its owner: the cluster's registry
//! does ([`actors::directory`]: each sandbox actor is in a process group
//! of its node's scope, which ractor_cluster syncs to every peer over the
//! actor sessions of [`remote`]). [`Cluster::owner`] reads it; on a miss
//! (a sandbox made a moment ago on another node, not synced yet) it asks
//! every live peer's directory and remembers the answer; an old id
//! (`<16 random>-<node id>`) the registry does not know routes by its
//! suffix. A call on a sandbox this node owns is served here; any other
//! goes to the owner's directory as a remote actor call (rkyv over the
//! mesh's QUIC, mutual TLS), which serves it as its own and never
//! forwards it again. Creates go where placement (`actors::placement`)
//! says; lists ask every live node.
//!
//! A node started without a mesh (tests, embedding) is a cluster of one:
//! the same code paths, with itself as the only member.

pub mod admin;
pub mod certs;
pub mod front;
pub mod remote;
pub mod serve;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use axum::Router;
use mesh::membership::{Member, Membership, MembershipConfig};
use mesh::transport::{Transport, TransportConfig};
use schema::mesh::{NodeInfo, NodeState, PROTOCOL_VERSION};

use actors::service::Sandboxes;

/// How often a node republishes its capacity (only changed keys travel).
pub const PUBLISH_EVERY: Duration = Duration::from_secs(1);

/// How soon a member that failed verification is pinged again.
pub const VERIFY_RETRY: Duration = Duration::from_secs(1);

/// How long `GET /cluster?ping=true` waits for each member's ping.
pub const PING_TIMEOUT: Duration = Duration::from_secs(1);

/// How long the registry's miss fallback waits for each peer's answer
/// to "is this sandbox yours?".
pub const LOCATE_TIMEOUT: Duration = Duration::from_secs(1);

/// How a node joins the mesh.
#[derive(Clone)]
pub struct MeshOptions {
    /// UDP address of gossip; port 0 picks a free one.
    pub gossip_listen: SocketAddr,
    /// UDP address of the QUIC transport; port 0 picks a free one.
    pub quic_listen: SocketAddr,
    /// The address peers reach this node at (gossip, QUIC and REST).
    pub advertise: std::net::IpAddr,
    /// Gossip addresses (`host:port`) of nodes to join through.
    pub seeds: Vec<String>,
    pub files: certs::ClusterFiles,
}

impl std::fmt::Debug for MeshOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Not the files: they hold the node's private key.
        f.debug_struct("MeshOptions")
            .field("gossip_listen", &self.gossip_listen)
            .field("quic_listen", &self.quic_listen)
            .field("advertise", &self.advertise)
            .field("seeds", &self.seeds)
            .field("node_id", &self.files.node_id)
            .finish()
    }
}

/// How long after its start a node begins to take over the paused
/// sandboxes of members gossip shows dead.
pub const TAKE_OVER_AFTER_START: Duration = Duration::from_secs(10);

/// Marks a request that another node (or this node's own placement)
/// handed to this node to serve itself: it must not be forwarded again.
/// An extension, not a header, so a client cannot set it.
#[derive(Debug, Clone)]
pub struct Forwarded {
    /// The node it came from.
    pub from: String,
}

/// Where a sandbox lives, as this node sees the cluster.
#[derive(Debug, Clone)]
pub enum Owner {
    /// This node, or no node (nobody owns it: this node answers the
    /// 404, or why it was lost).
    Local,
    /// A live member.
    Remote(NodeInfo),
    /// A member the failure detector declared dead.
    Dead(NodeInfo),
    /// No member of that id is known (never was, or forgotten).
    Unknown(String),
}

/// The mesh handler: bound before the cluster exists (the transport is
/// part of it), attached right after. What it answers is `serve.rs`; the
/// type lives here so that the cluster, which binds it, does not import
/// the module that serves through the cluster.
#[derive(Default)]
pub struct MeshHandler {
    cluster: OnceLock<Cluster>,
}

impl MeshHandler {
    fn attach(&self, cluster: Cluster) {
        let _ = self.cluster.set(cluster);
    }
}

struct MeshParts {
    membership: Membership,
    transport: Transport,
    /// The ractor_cluster node server whose sessions ride `transport`.
    remote: remote::Remote,
    quic_addr: SocketAddr,
    cluster_id: String,
}

struct Inner {
    node_id: String,
    generation: u64,
    rest_addr: SocketAddr,
    sandboxes: Sandboxes,
    draining: AtomicBool,
    /// Whether the last self-check failed (to log changes only).
    unhealthy: AtomicBool,
    /// Whether "another node has this id" was logged (once is enough).
    superseded_logged: AtomicBool,
    /// Node id -> the generation a mesh ping verified.
    verified: Mutex<HashMap<String, u64>>,
    /// Node ids with a verifying ping in flight.
    verifying: Mutex<HashSet<String>>,
    mesh: Option<MeshParts>,
    /// The node's whole HTTP app: forwarded calls are served through it,
    /// so they pass the same API-key check and handlers as direct ones.
    app: OnceLock<Router>,
}

/// This node's view of, and part in, the cluster. Cheap to clone.
#[derive(Clone)]
pub struct Cluster {
    inner: Arc<Inner>,
}

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("binding the mesh's QUIC endpoint on {addr}: {source}")]
    Transport {
        addr: SocketAddr,
        source: mesh::transport::TransportError,
    },
    #[error("joining the mesh's gossip on {addr}: {source}")]
    Gossip {
        addr: SocketAddr,
        source: mesh::membership::MembershipError,
    },
    #[error("no free UDP port on {0}: {1}")]
    NoPort(std::net::IpAddr, std::io::Error),
    #[error("{0}")]
    Actors(String),
}

/// `addr`, with a free port picked when it names port 0 (gossip needs its
/// port before binding: the address is part of the member's identity).
fn with_port(addr: SocketAddr) -> Result<SocketAddr, ClusterError> {
    if addr.port() != 0 {
        return Ok(addr);
    }
    let socket = std::net::UdpSocket::bind(addr).map_err(|e| ClusterError::NoPort(addr.ip(), e))?;
    socket
        .local_addr()
        .map_err(|e| ClusterError::NoPort(addr.ip(), e))
}

impl Cluster {
    /// Join the mesh (or be a cluster of one when `mesh` is `None`) and
    /// start publishing this node's state. `rest_addr` is where peers send
    /// clients' REST calls (advertised as is).
    pub async fn start(
        sandboxes: Sandboxes,
        rest_addr: SocketAddr,
        mesh: Option<MeshOptions>,
    ) -> Result<Self, ClusterError> {
        let node_id = sandboxes.config().node_id.clone();
        let draining = sandboxes.store().draining().unwrap_or_else(|e| {
            tracing::error!("reading the drain flag: {e}; starting ready");
            false
        });
        let generation = mesh::membership::unix_millis();
        let handler = Arc::new(MeshHandler::default());
        let mesh = match mesh {
            None => None,
            Some(opts) => {
                let quic_listen = opts.quic_listen;
                let transport = Transport::bind(
                    quic_listen,
                    &opts.files.identity,
                    &opts.files.root,
                    TransportConfig::default(),
                    handler.clone(),
                )
                .map_err(|source| ClusterError::Transport {
                    addr: quic_listen,
                    source,
                })?;
                let quic_port = transport
                    .local_addr()
                    .map_err(|e| ClusterError::NoPort(quic_listen.ip(), e))?
                    .port();
                let gossip_listen = with_port(opts.gossip_listen)?;
                let mut config =
                    MembershipConfig::new(&opts.files.cluster_id, &node_id, gossip_listen);
                config.generation = generation;
                config.advertise_addr = SocketAddr::new(opts.advertise, gossip_listen.port());
                config.seeds = opts.seeds.clone();
                let quic_addr = SocketAddr::new(opts.advertise, quic_port);
                let info = NodeInfo {
                    id: node_id.clone(),
                    generation,
                    quic_addr,
                    rest_addr,
                    state: if draining {
                        NodeState::Draining
                    } else {
                        NodeState::Ready
                    },
                    free_vcpus: 0,
                    free_memory_mib: 0,
                    sandboxes: 0,
                    max_sandboxes: 0,
                    templates: Vec::new(),
                };
                let membership = Membership::start(config, &info).await.map_err(|source| {
                    ClusterError::Gossip {
                        addr: gossip_listen,
                        source,
                    }
                })?;
                let remote = remote::Remote::start(&node_id, &opts.files.cluster_id)
                    .await
                    .map_err(ClusterError::Actors)?;
                Some(MeshParts {
                    membership,
                    transport,
                    remote,
                    quic_addr,
                    cluster_id: opts.files.cluster_id.clone(),
                })
            }
        };
        let cluster = Self {
            inner: Arc::new(Inner {
                node_id,
                generation,
                rest_addr,
                sandboxes,
                draining: AtomicBool::new(draining),
                unhealthy: AtomicBool::new(false),
                superseded_logged: AtomicBool::new(false),
                verified: Mutex::new(HashMap::new()),
                verifying: Mutex::new(HashSet::new()),
                mesh,
                app: OnceLock::new(),
            }),
        };
        handler.attach(cluster.clone());
        if cluster.inner.mesh.is_some() {
            cluster.publish().await;
            let weak = Arc::downgrade(&cluster.inner);
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(PUBLISH_EVERY);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    let Some(inner) = weak.upgrade() else { break };
                    Cluster { inner }.publish().await;
                }
            });
            let weak = Arc::downgrade(&cluster.inner);
            let mut members = cluster
                .inner
                .mesh
                .as_ref()
                .map(|m| m.membership.watch())
                .expect("a mesh");
            tokio::spawn(async move {
                loop {
                    let Some(inner) = weak.upgrade() else { break };
                    let cluster = Cluster { inner };
                    cluster.verify_members();
                    cluster.open_actor_sessions();
                    drop(cluster);
                    // A new member is verified as soon as gossip shows it;
                    // one that failed is tried again a little later.
                    if let Ok(Err(_)) = tokio::time::timeout(VERIFY_RETRY, members.changed()).await
                    {
                        // Gossip stopped: keep to the retry pace.
                        tokio::time::sleep(VERIFY_RETRY).await;
                    }
                }
            });
        }
        if cluster.inner.mesh.is_some() {
            cluster.spawn_take_overs();
        }
        Ok(cluster)
    }

    /// Watch for members declared dead and take over the paused sandboxes
    /// they held (from the object store; every live node tries, the
    /// store's claims give each sandbox to one). A node back alive and
    /// dead again is looked at again.
    fn spawn_take_overs(&self) {
        let Some(mut members) = self.inner.mesh.as_ref().map(|m| m.membership.watch()) else {
            return;
        };
        let weak = Arc::downgrade(&self.inner);
        tokio::spawn(async move {
            // Gossip's first view after a start may show members as dead
            // that are only not heard from yet.
            tokio::time::sleep(TAKE_OVER_AFTER_START).await;
            let mut dead: HashSet<String> = HashSet::new();
            loop {
                let newly_dead: Vec<String> = {
                    let now = members.borrow_and_update();
                    let Some(inner) = weak.upgrade() else { break };
                    dead.retain(|id| now.iter().any(|m| &m.info.id == id && !m.live));
                    now.iter()
                        .filter(|m| !m.live && m.info.id != inner.node_id)
                        .filter(|m| dead.insert(m.info.id.clone()))
                        .map(|m| m.info.id.clone())
                        .collect()
                };
                for node in newly_dead {
                    let Some(inner) = weak.upgrade() else { return };
                    let cluster = Cluster { inner };
                    if cluster.state() != NodeState::Ready {
                        // A draining node takes no new work; the ready
                        // ones take these (or the first call for one).
                        continue;
                    }
                    tokio::spawn(async move {
                        let alive = cluster.live_peer_ids();
                        let alive = |n: &str| alive.contains(n);
                        match cluster.sandboxes().take_over_from(&node, &alive).await {
                            Ok(0) => {}
                            Ok(n) => {
                                tracing::info!(%node, taken = n, "took over paused sandboxes of a dead node")
                            }
                            Err(e) => {
                                tracing::warn!(%node, "taking over the paused sandboxes of a dead node: {e}")
                            }
                        }
                    });
                }
                if members.changed().await.is_err() {
                    break;
                }
            }
        });
    }

    /// Member `id` if it is live, verified and speaks this mesh protocol
    /// (not this node).
    pub(crate) async fn live_member(&self, id: &str) -> Option<NodeInfo> {
        if id == self.inner.node_id {
            return None;
        }
        self.members()
            .await
            .into_iter()
            .find(|m| m.info.id == id && self.callable(m))
            .map(|m| m.info)
    }

    /// The ids of the live members other than this node.
    pub(crate) fn live_peer_ids(&self) -> HashSet<String> {
        self.live_peers(|_| true)
            .into_iter()
            .map(|i| i.id)
            .collect()
    }

    /// Start a ping to each live member not verified yet under its
    /// current generation. The ping is a mesh call, so it succeeds only if
    /// the member presents a certificate of this cluster naming its id.
    fn verify_members(&self) {
        for info in self.live_peers(|_| true) {
            if self.is_verified(&info) {
                continue;
            }
            {
                let mut in_flight = lock(&self.inner.verifying);
                if !in_flight.insert(info.id.clone()) {
                    continue;
                }
            }
            let cluster = self.clone();
            let restarted = lock(&self.inner.verified)
                .get(&info.id)
                .is_some_and(|g| *g != info.generation);
            tokio::spawn(async move {
                let mut answer = cluster.ping(&info).await;
                if answer.is_err()
                    && restarted
                    && let Some(t) = cluster.transport()
                {
                    // The connection to its last run is dead but answers
                    // nothing until it times out: dial afresh. (Only once
                    // a ping on it failed: a forged generation in gossip
                    // must not cut a live node's connection.)
                    t.forget(info.quic_addr, &info.id).await;
                    answer = cluster.ping(&info).await;
                }
                match answer {
                    Ok(_) => {
                        tracing::info!(node = %info.id, generation = info.generation, "verified a cluster member over mTLS");
                        lock(&cluster.inner.verified).insert(info.id.clone(), info.generation);
                        cluster.open_actor_sessions();
                    }
                    Err(e) => tracing::warn!(
                        node = %info.id,
                        quic = %info.quic_addr,
                        "a gossip member did not answer a mesh ping with this cluster's certificate; it gets no sandboxes until it does: {e}"
                    ),
                }
                lock(&cluster.inner.verifying).remove(&info.id);
            });
        }
    }

    /// Open the actor session (see [`remote`]) with each live, verified
    /// member this node dials and has none with.
    fn open_actor_sessions(&self) {
        let Some(mesh) = &self.inner.mesh else { return };
        for info in self.live_peers(|m| m.protocol_version == PROTOCOL_VERSION) {
            if self.is_verified(&info) {
                mesh.remote.ensure(&mesh.transport, &info);
            }
        }
    }

    /// The live members other than this node that `keep` accepts (none
    /// without a mesh).
    fn live_peers(&self, keep: impl Fn(&Member) -> bool) -> Vec<NodeInfo> {
        let Some(mesh) = &self.inner.mesh else {
            return Vec::new();
        };
        mesh.membership
            .watch()
            .borrow()
            .iter()
            .filter(|m| m.live && m.info.id != self.inner.node_id && keep(m))
            .map(|m| m.info.clone())
            .collect()
    }

    /// The remote actors' half of the mesh; `None` without a mesh.
    pub(crate) fn remote(&self) -> Option<&remote::Remote> {
        self.inner.mesh.as_ref().map(|m| &m.remote)
    }

    /// Whether node `id`'s placement actor is reachable from here (always
    /// for this node; for another, once their actor session is up).
    pub fn has_actor_session(&self, id: &str) -> bool {
        id == self.inner.node_id || self.remote().is_some_and(|r| r.has_placement(id))
    }

    /// Ask node `info`'s placement actor `call`: this node's own directly,
    /// another's as a remote actor call over their actor session.
    pub(crate) async fn placement_call(
        &self,
        info: &NodeInfo,
        call: schema::mesh::ClusterCall,
    ) -> Result<schema::mesh::ClusterReply, String> {
        if info.id == self.inner.node_id {
            return self
                .inner
                .sandboxes
                .placement_call(call)
                .await
                .map_err(|e| e.to_string());
        }
        match self.remote() {
            Some(remote) => remote.placement_call(info, call).await,
            None => Err("this node is not in a mesh".into()),
        }
    }

    /// Whether this node may ask `m` to serve something: live, of this
    /// protocol version, verified (this node always is).
    pub fn callable(&self, m: &Member) -> bool {
        m.live && m.protocol_version == PROTOCOL_VERSION && self.is_verified(&m.info)
    }

    /// Whether `info`'s node answered a mesh ping (mutual TLS under the
    /// cluster CA, certificate naming its id) in its current generation.
    /// Gossip is unauthenticated: placement, lists and signed-URL lookups
    /// use verified members only, so a forged member cannot attract or
    /// stall creates.
    pub fn is_verified(&self, info: &NodeInfo) -> bool {
        info.id == self.inner.node_id
            || lock(&self.inner.verified).get(&info.id) == Some(&info.generation)
    }

    /// Give the cluster the node's HTTP app (built after the cluster,
    /// since the app routes through it).
    pub fn set_app(&self, app: Router) {
        let _ = self.inner.app.set(app);
    }

    pub(crate) fn app(&self) -> Option<Router> {
        self.inner.app.get().cloned()
    }

    pub fn node_id(&self) -> &str {
        &self.inner.node_id
    }

    /// The gossip address peers join through (`--seed`); `None` without a
    /// mesh.
    pub fn gossip_addr(&self) -> Option<SocketAddr> {
        self.inner.mesh.as_ref().map(|m| m.membership.gossip_addr())
    }

    pub fn sandboxes(&self) -> &Sandboxes {
        &self.inner.sandboxes
    }

    /// The cluster id (derived from the CA), `None` without a mesh.
    pub fn cluster_id(&self) -> Option<&str> {
        self.inner.mesh.as_ref().map(|m| m.cluster_id.as_str())
    }

    /// Ready or draining, as set by the operator (see [`Cluster::local_info`]
    /// for the state gossiped, which may also be unhealthy).
    pub fn state(&self) -> NodeState {
        if self.inner.draining.load(Ordering::Relaxed) {
            NodeState::Draining
        } else {
            NodeState::Ready
        }
    }

    /// Drain (take no new sandboxes; running ones stay) or make ready
    /// again. Kept across restarts; gossiped at once.
    pub async fn set_draining(&self, draining: bool) -> Result<(), actors::store::StoreError> {
        self.inner.sandboxes.store().set_draining(draining)?;
        self.inner.draining.store(draining, Ordering::Relaxed);
        tracing::info!(
            node = %self.inner.node_id,
            "node is now {}",
            self.state()
        );
        self.publish().await;
        Ok(())
    }

    /// What this node says about itself now.
    pub async fn local_info(&self) -> NodeInfo {
        let s = &self.inner.sandboxes;
        let (running, creating, _paused) = s.counts();
        let listed = s.templates().await;
        let mut templates: Vec<String> = match &listed {
            Ok(entries) => entries.iter().map(|t| t.name().to_owned()).collect(),
            Err(_) => Vec::new(),
        };
        templates.sort();
        let superseded = self
            .inner
            .mesh
            .as_ref()
            .is_some_and(|m| m.membership.is_superseded());
        let sick = match listed {
            // Two live nodes with one id would make sandbox ids ambiguous:
            // the older one takes no new sandboxes.
            _ if superseded => Some("a newer node with the same id is live".to_owned()),
            Err(e) => Some(format!("its template cache does not answer: {e}")),
            Ok(_) if templates.is_empty() => Some("it has no template prepared".to_owned()),
            Ok(_) => match free_disk_mib(&s.config().snapshots_dir) {
                Some(free) if free < MIN_FREE_DISK_MIB => Some(format!(
                    "its data directory has {free} MiB free (under {MIN_FREE_DISK_MIB}): snapshots and sandbox disks need room"
                )),
                _ => None,
            },
        };
        let was_sick = self.inner.unhealthy.swap(sick.is_some(), Ordering::Relaxed);
        match (&sick, was_sick) {
            (Some(why), false) => {
                tracing::warn!(node = %self.inner.node_id, "node is unhealthy, placement avoids it: {why}")
            }
            (None, true) => tracing::info!(node = %self.inner.node_id, "node is healthy again"),
            _ => {}
        }
        let state = match (self.state(), sick) {
            (NodeState::Ready, Some(_)) => NodeState::Unhealthy,
            (state, _) => state,
        };
        NodeInfo {
            id: self.inner.node_id.clone(),
            generation: self.inner.generation,
            quic_addr: self
                .inner
                .mesh
                .as_ref()
                .map_or(self.inner.rest_addr, |m| m.quic_addr),
            rest_addr: self.inner.rest_addr,
            state,
            free_vcpus: host_vcpus(),
            free_memory_mib: host_available_memory_mib().unwrap_or(0),
            sandboxes: u32::try_from(running + creating).unwrap_or(u32::MAX),
            max_sandboxes: u32::try_from(s.config().max_sandboxes).unwrap_or(u32::MAX),
            templates,
        }
    }

    async fn publish(&self) {
        let Some(mesh) = &self.inner.mesh else { return };
        let info = self.local_info().await;
        if let Err(e) = mesh.membership.set_info(&info).await {
            tracing::error!("publishing this node's state: {e}");
        }
        if mesh.membership.is_superseded()
            && !self.inner.superseded_logged.swap(true, Ordering::Relaxed)
        {
            tracing::error!(
                node = %self.inner.node_id,
                "another node with this node id and a newer start time is live: two hosts share the id, or this process is a stale copy; stop one of them"
            );
        }
    }

    /// Every member known, this node included (with its current state),
    /// live and dead, sorted by id.
    pub async fn members(&self) -> Vec<Member> {
        let me = Member {
            info: self.local_info().await,
            gossip_addr: self
                .inner
                .mesh
                .as_ref()
                .map_or(self.inner.rest_addr, |m| m.membership.gossip_addr()),
            live: true,
            protocol_version: PROTOCOL_VERSION,
        };
        let mut members: Vec<Member> = match &self.inner.mesh {
            None => Vec::new(),
            Some(m) => m
                .membership
                .watch()
                .borrow()
                .iter()
                .filter(|x| x.info.id != self.inner.node_id)
                .cloned()
                .collect(),
        };
        members.push(me);
        members.sort_by(|a, b| a.info.id.cmp(&b.info.id));
        members
    }

    /// Who owns sandbox `id`: this node if it has it; else the node whose
    /// registry scope holds it in the process groups; else the node the
    /// registry remembers (from the groups as they changed, or an earlier
    /// answer: a dead owner's groups went with its session); else, for an
    /// old-style id, the node it names; else whichever live peer says it
    /// has it when asked (all at once, [`LOCATE_TIMEOUT`] each: pg sync
    /// may not have brought a sandbox made a moment ago). Nobody: Local,
    /// so that this node answers the 404.
    pub async fn owner(&self, id: &str) -> Owner {
        let me = self.inner.node_id.as_str();
        if self.inner.sandboxes.get(id).is_some() {
            return Owner::Local;
        }
        let Some(mesh) = &self.inner.mesh else {
            return match actors::sandbox::owner_of(id) {
                Some(node) if node != me => Owner::Unknown(node.to_owned()),
                _ => Owner::Local,
            };
        };
        let members: Vec<Member> = mesh
            .membership
            .watch()
            .borrow()
            .iter()
            .filter(|m| m.info.id != me)
            .cloned()
            .collect();
        let classify = |node: &str| match members.iter().find(|m| m.info.id == node) {
            Some(m) if m.live => Owner::Remote(m.info.clone()),
            Some(m) => Owner::Dead(m.info.clone()),
            None => Owner::Unknown(node.to_owned()),
        };
        let registry = self.inner.sandboxes.registry();
        if let Some(node) =
            actors::directory::registered_on(id, members.iter().map(|m| m.info.id.as_str()))
        {
            return classify(node);
        }
        if let Some(node) = registry.owner(id).filter(|n| n != me) {
            return classify(&node);
        }
        if let Some(node) = actors::sandbox::owner_of(id) {
            return if node == me {
                Owner::Local
            } else {
                classify(node)
            };
        }
        match self.locate(id, &members).await {
            Some(node) => {
                registry.remember(id, &node);
                classify(&node)
            }
            None => Owner::Local,
        }
    }

    /// Ask every live, verified peer with an actor session whether it
    /// owns sandbox `id`; the first that says so.
    async fn locate(&self, id: &str, members: &[Member]) -> Option<String> {
        let remote = self.remote()?;
        let mut asks = tokio::task::JoinSet::new();
        for m in members {
            if !self.callable(m) || !remote.has_directory(&m.info.id) {
                continue;
            }
            let (cluster, info) = (self.clone(), m.info.clone());
            let call = schema::mesh::SandboxCall::Locate {
                sandbox_id: id.to_owned(),
            };
            asks.spawn(async move {
                let Some(remote) = cluster.remote() else {
                    return (info.id, Err("no mesh".to_owned()));
                };
                let answer = remote.sandbox_call(&info, call, LOCATE_TIMEOUT).await;
                (info.id, answer)
            });
        }
        while let Some(joined) = asks.join_next().await {
            match joined {
                Ok((node, Ok(schema::mesh::SandboxReply::Located { owned: true }))) => {
                    return Some(node);
                }
                Ok((node, Err(e))) => {
                    tracing::debug!(%node, sandbox = %id, "asking whether a node has a sandbox: {e}")
                }
                _ => {}
            }
        }
        None
    }

    /// Resolves once gossip declares member `id` dead (never without a
    /// mesh, or while it lives).
    pub(crate) async fn died(&self, id: &str) {
        let Some(mesh) = &self.inner.mesh else {
            return std::future::pending().await;
        };
        let mut watch = mesh.membership.watch();
        loop {
            let dead = watch
                .borrow_and_update()
                .iter()
                .any(|x| x.info.id == id && !x.live);
            if dead {
                return;
            }
            if watch.changed().await.is_err() {
                return std::future::pending().await;
            }
        }
    }

    /// Ping `info` over the mesh: the round trip, and how far its wall
    /// clock is ahead of ours (positive: ahead), assuming a symmetric path.
    pub async fn ping(&self, info: &NodeInfo) -> Result<(Duration, i64), String> {
        let transport = self.transport().ok_or("this node is not in a mesh")?;
        let sent_unix_ms = mesh::membership::unix_millis();
        let started = std::time::Instant::now();
        let request = schema::mesh::Request::Ping { sent_unix_ms };
        let call = transport.call(info.quic_addr, &info.id, &request);
        match tokio::time::timeout(PING_TIMEOUT, call).await {
            Err(_) => Err(format!("no answer within {PING_TIMEOUT:?}")),
            Ok(Err(e)) => Err(e.to_string()),
            Ok(Ok(schema::mesh::Response::Pong { unix_ms, .. })) => {
                let rtt = started.elapsed();
                let midpoint = sent_unix_ms as i128 + (rtt.as_millis() / 2) as i128;
                let offset = i64::try_from(unix_ms as i128 - midpoint).unwrap_or(i64::MAX);
                Ok((rtt, offset))
            }
            Ok(Ok(_)) => Err("answered a ping with something else".into()),
        }
    }

    pub(crate) fn transport(&self) -> Option<&Transport> {
        self.inner.mesh.as_ref().map(|m| &m.transport)
    }

    /// Leave: stop gossip (peers notice through their failure detector)
    /// and close connections.
    pub async fn shutdown(&self) {
        if let Some(m) = &self.inner.mesh {
            m.remote.stop();
            m.transport.close().await;
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A node whose data directory has less free space than this is unhealthy.
pub const MIN_FREE_DISK_MIB: u64 = 512;

/// Free space (for unprivileged users) of the file system holding `path`
/// or its nearest existing ancestor, in MiB.
fn free_disk_mib(path: &std::path::Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let existing = path.ancestors().find(|p| p.exists())?;
    let c_path = std::ffi::CString::new(existing.as_os_str().as_bytes()).ok()?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: a NUL-terminated path and a buffer of the right type; the
    // buffer is read only when the call succeeded.
    let st = unsafe {
        if libc::statvfs(c_path.as_ptr(), st.as_mut_ptr()) != 0 {
            return None;
        }
        st.assume_init()
    };
    Some((st.f_bavail as u64).saturating_mul(st.f_frsize as u64) >> 20)
}

/// CPUs of the host: what a node can give sandboxes (vCPUs overcommit, so
/// this is gossiped for operators, not used to refuse).
fn host_vcpus() -> u32 {
    std::thread::available_parallelism().map_or(1, |n| n.get() as u32)
}

/// `MemAvailable` of /proc/meminfo, in MiB.
fn host_available_memory_mib() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024)
}
