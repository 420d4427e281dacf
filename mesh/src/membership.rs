//! Cluster membership: who is in the cluster, alive or dead, and what each
//! node said about itself ([`NodeInfo`]).
//!
//! Built on chitchat (scuttlebutt anti-entropy gossip over UDP, with a
//! phi-accrual failure detector), as Quickwit does. A node joins by naming
//! one or more seeds; everyone then learns everyone through gossip, with no
//! coordinator. Each node's [`NodeInfo`] is published as a handful of
//! gossip keys (`schema::mesh::NodeInfo::gossip_keys`).
//!
//! Identity: a chitchat member is (node id, generation, gossip address). A
//! restarted node comes back with a new generation (its start time), so
//! peers treat it as a new member and drop the old one's state once the old
//! one is declared dead. Two members with one node id — a restart not yet
//! noticed, or two hosts configured with the same id — are resolved by
//! **newest wins**: [`Membership::members`] shows, per id, the live member
//! before a dead one and then the higher generation; the older instance of
//! a live duplicate sees itself superseded ([`Membership::is_superseded`]),
//! logs an error, and the node may stop.
//!
//! Clocks: nothing here compares wall clocks between hosts. Liveness is
//! judged from heartbeat counters and each observer's own monotonic clock,
//! so clock skew between hosts does not make a node look dead or alive.
//! Only the generation comes from a wall clock (once, at start), and only
//! its order among restarts of the same node matters.
//!
//! Gossip is neither authenticated nor encrypted (the only check is the
//! cluster id): never base a security decision on it. The QUIC transport
//! checks certificates; gossip only says where to dial.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use chitchat::transport::UdpTransport;
use chitchat::{
    Chitchat, ChitchatConfig, ChitchatHandle, ChitchatId, FailureDetectorConfig, ProtocolVersion,
    spawn_chitchat,
};
use schema::mesh::NodeInfo;
use tokio::sync::{Mutex, watch};
use tokio::task::JoinHandle;
use tracing::{debug, error, info, warn};

/// Gossip round period. Each round a node sends its digest to three
/// random live peers, so news reaches n nodes in about log3(n) rounds.
pub const DEFAULT_GOSSIP_INTERVAL: Duration = Duration::from_millis(100);

/// A node is declared dead once the time since its last heartbeat exceeds
/// this many times the mean interval between its heartbeats as observed
/// (chitchat's phi is `elapsed / mean`). With 100 ms rounds the observed
/// mean is about 0.1-0.2 s, so detection takes about 1-3 s: inside the
/// 5 s budget with room for a loaded host, and far enough above one mean
/// interval that a late datagram or a busy core does not flap a node.
pub const DEFAULT_PHI_THRESHOLD: f64 = 12.0;

/// How long a dead member's state is kept (then forgotten). Long enough
/// for the node to report the dead node's sandboxes as lost and to show it
/// in `sandmesh status`.
pub const DEFAULT_DEAD_NODE_GRACE: Duration = Duration::from_secs(3600);

/// First notice that no peer answers comes after this long; later ones
/// back off to [`MAX_ALONE_NOTICE`].
const FIRST_ALONE_NOTICE: Duration = Duration::from_secs(2);
const MAX_ALONE_NOTICE: Duration = Duration::from_secs(60);

#[derive(Debug, Clone)]
pub struct MembershipConfig {
    /// Nodes of other clusters are refused (chitchat's only check).
    pub cluster_id: String,
    pub node_id: String,
    /// Grows across restarts of this node; [`MembershipConfig::new`] uses
    /// the start time in unix milliseconds. A host whose clock went back
    /// across a restart should carry the last generation forward instead.
    pub generation: u64,
    /// UDP address to listen on. It must name a port (not 0): the address
    /// is part of the member's identity and is gossiped before binding.
    pub listen_addr: SocketAddr,
    /// Address peers gossip to (differs from `listen_addr` behind NAT or
    /// when listening on 0.0.0.0).
    pub advertise_addr: SocketAddr,
    /// `host:port` of nodes to join through. Empty for the first node.
    pub seeds: Vec<String>,
    pub gossip_interval: Duration,
    pub phi_threshold: f64,
    pub dead_node_grace: Duration,
}

impl MembershipConfig {
    pub fn new(cluster_id: &str, node_id: &str, gossip_addr: SocketAddr) -> Self {
        Self {
            cluster_id: cluster_id.to_owned(),
            node_id: node_id.to_owned(),
            generation: unix_millis(),
            listen_addr: gossip_addr,
            advertise_addr: gossip_addr,
            seeds: Vec::new(),
            gossip_interval: DEFAULT_GOSSIP_INTERVAL,
            phi_threshold: DEFAULT_PHI_THRESHOLD,
            dead_node_grace: DEFAULT_DEAD_NODE_GRACE,
        }
    }

    fn failure_detector(&self) -> FailureDetectorConfig {
        FailureDetectorConfig {
            phi_threshold: self.phi_threshold,
            // A short window adapts to the real heartbeat rate quickly.
            sampling_window_size: 200,
            // A gap this long is an outage, not a sample of the rate.
            max_interval: self.gossip_interval * 20,
            // The prior (weight 5) before real samples: a few rounds, so a
            // node that just joined is neither declared dead at once nor
            // kept alive for long after dying.
            initial_interval: self.gossip_interval * 3,
            dead_node_grace_period: self.dead_node_grace,
        }
    }
}

pub fn unix_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[derive(Debug, thiserror::Error)]
pub enum MembershipError {
    #[error(transparent)]
    NodeId(#[from] schema::mesh::InvalidNodeId),
    #[error("node info names node {info:?} but this member is {config:?}")]
    WrongNode { info: String, config: String },
    #[error("gossip listen address {0} has no port")]
    NoPort(SocketAddr),
    #[error("start gossip: {0}")]
    Start(String),
}

/// One member of the cluster as this node sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub info: NodeInfo,
    pub gossip_addr: SocketAddr,
    /// Alive per the failure detector (always true for this node).
    pub live: bool,
    /// The mesh protocol the member speaks: a node can only call members of
    /// its own version.
    pub protocol_version: u16,
}

/// This node's membership in the cluster. Dropping it stops gossip
/// (abruptly; [`Membership::shutdown`] is the orderly way).
pub struct Membership {
    handle: Option<ChitchatHandle>,
    chitchat: Arc<Mutex<Chitchat>>,
    self_id: ChitchatId,
    members: watch::Receiver<Arc<Vec<Member>>>,
    superseded: Arc<AtomicBool>,
    monitor: JoinHandle<()>,
}

impl Membership {
    /// Start gossiping as `config.node_id` with `info`, joining through the
    /// seeds. Returns at once: an unreachable seed does not fail the start
    /// (the node serves alone and keeps trying, logging with backoff).
    pub async fn start(config: MembershipConfig, info: &NodeInfo) -> Result<Self, MembershipError> {
        schema::mesh::validate_node_id(&config.node_id)?;
        if info.id != config.node_id {
            return Err(MembershipError::WrongNode {
                info: info.id.clone(),
                config: config.node_id.clone(),
            });
        }
        if config.listen_addr.port() == 0 || config.advertise_addr.port() == 0 {
            return Err(MembershipError::NoPort(config.listen_addr));
        }
        let self_id = ChitchatId::new(
            config.node_id.as_str(),
            config.generation,
            config.advertise_addr,
        );
        let seeds = config.seeds.clone();
        let chitchat_config = ChitchatConfig {
            chitchat_id: self_id.clone(),
            cluster_id: config.cluster_id.clone(),
            gossip_interval: config.gossip_interval,
            listen_addr: config.listen_addr,
            seed_nodes: config.seeds.clone(),
            failure_detector_config: config.failure_detector(),
            marked_for_deletion_grace_period: config.dead_node_grace,
            catchup_callback: None,
            extra_liveness_predicate: None,
            protocol_version: ProtocolVersion::V0,
        };
        let handle = spawn_chitchat(chitchat_config, info.gossip_keys(), &UdpTransport)
            .await
            .map_err(|e| MembershipError::Start(format!("{e:#}")))?;
        let chitchat = handle.chitchat();
        let initial = compute_members(&*chitchat.lock().await);
        let (tx, members) = watch::channel(Arc::new(initial));
        let superseded = Arc::new(AtomicBool::new(false));
        let monitor = tokio::spawn(monitor(
            chitchat.clone(),
            self_id.clone(),
            seeds,
            tx,
            superseded.clone(),
        ));
        info!(
            node_id = %config.node_id,
            generation = config.generation,
            gossip = %config.advertise_addr,
            seeds = ?config.seeds,
            "joined mesh gossip"
        );
        Ok(Self {
            handle: Some(handle),
            chitchat,
            self_id,
            members,
            superseded,
            monitor,
        })
    }

    pub fn node_id(&self) -> &str {
        &self.self_id.node_id
    }

    pub fn generation(&self) -> u64 {
        self.self_id.generation_id
    }

    pub fn gossip_addr(&self) -> SocketAddr {
        self.self_id.gossip_advertise_addr
    }

    /// Every member known, live and dead, this node included, one per node
    /// id (newest wins), sorted by id. Members whose keys have not all
    /// arrived yet are left out until they have.
    pub async fn members(&self) -> Vec<Member> {
        compute_members(&*self.chitchat.lock().await)
    }

    /// Publish new info about this node (capacity, state, templates). Only
    /// changed keys are gossiped. The id and generation cannot change.
    pub async fn set_info(&self, info: &NodeInfo) -> Result<(), MembershipError> {
        if info.id != *self.self_id.node_id {
            return Err(MembershipError::WrongNode {
                info: info.id.clone(),
                config: self.self_id.node_id.to_string(),
            });
        }
        let mut chitchat = self.chitchat.lock().await;
        let state = chitchat.self_node_state();
        for (k, v) in info.gossip_keys() {
            state.set(k, v);
        }
        Ok(())
    }

    /// The member list, updated when a member joins, dies, comes back or
    /// changes its info (heartbeats alone do not wake it).
    pub fn watch(&self) -> watch::Receiver<Arc<Vec<Member>>> {
        self.members.clone()
    }

    /// Whether another live member uses this node's id with a newer
    /// generation: this instance is stale and should stop.
    pub fn is_superseded(&self) -> bool {
        self.superseded.load(Ordering::Relaxed)
    }

    /// Stop gossiping. Peers notice through their failure detector (there
    /// is no goodbye message in chitchat); a draining node should publish
    /// `Draining` first.
    pub async fn shutdown(mut self) {
        self.monitor.abort();
        if let Some(handle) = self.handle.take()
            && let Err(e) = handle.shutdown().await
        {
            warn!(error = %e, "gossip did not stop cleanly");
        }
    }
}

impl Drop for Membership {
    fn drop(&mut self) {
        self.monitor.abort();
        if let Some(handle) = &self.handle {
            handle.abort();
        }
    }
}

fn compute_members(chitchat: &Chitchat) -> Vec<Member> {
    let live: HashSet<&ChitchatId> = chitchat.live_nodes().collect();
    let mut by_id: BTreeMap<&str, Member> = BTreeMap::new();
    for (cid, state) in chitchat.node_states() {
        let (info, protocol_version) =
            match NodeInfo::from_gossip(&cid.node_id, cid.generation_id, |k| state.get(k)) {
                Ok(parsed) => parsed,
                Err(e) => {
                    debug!(member = ?cid, error = %e, "member info incomplete");
                    continue;
                }
            };
        let candidate = Member {
            info,
            gossip_addr: cid.gossip_advertise_addr,
            live: live.contains(cid),
            protocol_version,
        };
        let rank = |m: &Member| (m.live, m.info.generation);
        match by_id.get(&*cid.node_id) {
            Some(current) if rank(current) >= rank(&candidate) => {}
            _ => {
                by_id.insert(&cid.node_id, candidate);
            }
        }
    }
    by_id.into_values().collect()
}

/// Keeps the watch current, warns (with backoff) while no peer answers,
/// and notices a newer instance of this node id.
async fn monitor(
    chitchat: Arc<Mutex<Chitchat>>,
    self_id: ChitchatId,
    seeds: Vec<String>,
    tx: watch::Sender<Arc<Vec<Member>>>,
    superseded: Arc<AtomicBool>,
) {
    let mut live_rx = chitchat.lock().await.live_nodes_watcher();
    let started = tokio::time::Instant::now();
    let mut notice_every = FIRST_ALONE_NOTICE;
    let mut next_notice = started + FIRST_ALONE_NOTICE;
    let mut alone_noticed = false;
    loop {
        tokio::select! {
            changed = live_rx.changed() => if changed.is_err() { return },
            // Also on a timer: a dead member's changes and the alone check
            // do not wake the live-nodes watch.
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        let members = compute_members(&*chitchat.lock().await);
        let peers_live = members
            .iter()
            .filter(|m| m.live && *m.info.id != *self_id.node_id)
            .count();
        let now = tokio::time::Instant::now();
        if seeds.is_empty() || peers_live > 0 {
            if alone_noticed {
                info!(peers_live, "mesh peers reachable again");
            }
            alone_noticed = false;
            notice_every = FIRST_ALONE_NOTICE;
            next_notice = now + FIRST_ALONE_NOTICE;
        } else if now >= next_notice {
            warn!(
                seeds = ?seeds,
                alone_for = ?now.duration_since(started),
                "no mesh peer reachable: serving alone, still gossiping to the seeds every round; next notice in {notice_every:?}"
            );
            alone_noticed = true;
            next_notice = now + notice_every;
            notice_every = (notice_every * 2).min(MAX_ALONE_NOTICE);
        }
        if let Some(me) = members.iter().find(|m| *m.info.id == *self_id.node_id)
            && me.info.generation > self_id.generation_id
            && me.live
            && !superseded.swap(true, Ordering::Relaxed)
        {
            error!(
                node_id = %self_id.node_id,
                ours = self_id.generation_id,
                theirs = me.info.generation,
                other = %me.gossip_addr,
                "another node runs with this node id and a newer generation: this instance is superseded"
            );
        }
        tx.send_if_modified(|current| {
            if **current != members {
                *current = Arc::new(members);
                true
            } else {
                false
            }
        });
    }
}
