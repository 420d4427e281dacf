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

use std::collections::{BTreeMap, HashMap, HashSet};
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
/// mean is about 0.1 s, so detection takes about 1-2 s (measured: 1.2-1.9 s
/// for all 99 observers in the 100-member simulation, about 2 s with 3
/// members): inside the 5 s budget. The mean adapts: on a starved host
/// heartbeats are seen less often and detection slows rather than flapping
/// (12 was tried: 2-8 s in the simulation under load, over budget).
pub const DEFAULT_PHI_THRESHOLD: f64 = 8.0;

/// How long a dead member's state is kept (then forgotten). Long enough
/// for the node to report the dead node's sandboxes as lost and to show it
/// in `sandmesh status`.
pub const DEFAULT_DEAD_NODE_GRACE: Duration = Duration::from_secs(3600);

/// First notice that no peer answers comes after this long; later ones
/// back off to [`MAX_ALONE_NOTICE`].
const FIRST_ALONE_NOTICE: Duration = Duration::from_secs(2);
const MAX_ALONE_NOTICE: Duration = Duration::from_secs(60);

/// Least time between two rebuilds of the watched member list.
const WATCH_PAUSE: Duration = Duration::from_millis(50);

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
    cache: InfoCache,
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
        let cache = InfoCache::default();
        let initial = compute_members(&*chitchat.lock().await, &cache);
        let (tx, members) = watch::channel(Arc::new(initial));
        let superseded = Arc::new(AtomicBool::new(false));
        let monitor = tokio::spawn(monitor(
            chitchat.clone(),
            self_id.clone(),
            seeds,
            tx,
            superseded.clone(),
            cache.clone(),
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
            cache,
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
        compute_members(&*self.chitchat.lock().await, &self.cache)
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
    /// changes its info (heartbeats alone do not wake it). As with any
    /// tokio watch, do not hold a borrow of it across an await: the
    /// updater waits for it.
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

/// Parsed infos by member, re-parsed only when the member's state version
/// moves: the member list is rebuilt on every membership change and every
/// poll, and parsing every member's keys each time is what made a
/// 100-member process starve its own gossip.
type InfoCache = Arc<std::sync::Mutex<HashMap<ChitchatId, (u64, Option<(NodeInfo, u16)>)>>>;

fn compute_members(chitchat: &Chitchat, cache: &InfoCache) -> Vec<Member> {
    let live: HashSet<&ChitchatId> = chitchat.live_nodes().collect();
    let mut by_id: BTreeMap<&str, Member> = BTreeMap::new();
    let mut cache = cache.lock().unwrap_or_else(|p| p.into_inner());
    cache.retain(|cid, _| chitchat.node_states().contains_key(cid));
    for (cid, state) in chitchat.node_states() {
        let version = state.max_version();
        let parsed = match cache.get(cid) {
            Some((v, parsed)) if *v == version => parsed.clone(),
            _ => {
                let parsed = match NodeInfo::from_gossip(&cid.node_id, cid.generation_id, |k| {
                    state.get(k)
                }) {
                    Ok(parsed) => Some(parsed),
                    Err(e) => {
                        debug!(member = ?cid, error = %e, "member info incomplete");
                        None
                    }
                };
                cache.insert(cid.clone(), (version, parsed.clone()));
                parsed
            }
        };
        let Some((info, protocol_version)) = parsed else {
            continue;
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
    cache: InfoCache,
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
        let members = compute_members(&*chitchat.lock().await, &cache);
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
        // While members join, the live-nodes watch fires on every key
        // change of every member; one rebuild per pause is enough and
        // leaves the CPU to gossip (100 members share a core in the
        // simulation).
        tokio::time::sleep(WATCH_PAUSE).await;
    }
}

/// Helpers shared by these tests and the simulation in `tests/`.
#[doc(hidden)]
pub mod testing {
    use super::*;

    /// A loopback UDP port free right now (chitchat must know its port
    /// before binding it).
    pub fn free_udp_port() -> u16 {
        free_udp_ports(1)[0]
    }

    /// `n` distinct free loopback UDP ports (all held until all are found,
    /// so the kernel cannot hand out one twice).
    pub fn free_udp_ports(n: usize) -> Vec<u16> {
        let sockets: Vec<_> = (0..n)
            .filter_map(|_| std::net::UdpSocket::bind("127.0.0.1:0").ok())
            .collect();
        sockets
            .iter()
            .map(|s| s.local_addr().map_or(0, |a| a.port()))
            .collect()
    }

    pub fn info(id: &str, generation: u64) -> NodeInfo {
        NodeInfo {
            id: id.to_owned(),
            generation,
            quic_addr: SocketAddr::from(([127, 0, 0, 1], 7000)),
            rest_addr: SocketAddr::from(([127, 0, 0, 1], 3000)),
            state: schema::mesh::NodeState::Ready,
            free_vcpus: 4,
            free_memory_mib: 8192,
            sandboxes: 0,
            max_sandboxes: 64,
            templates: vec!["base".to_owned()],
        }
    }

    pub fn config(id: &str, port: u16, generation: u64, seeds: &[u16]) -> MembershipConfig {
        let mut c = MembershipConfig::new("test", id, SocketAddr::from(([127, 0, 0, 1], port)));
        c.generation = generation;
        c.seeds = seeds.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        c
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use schema::mesh::NodeState;

    use super::testing::*;
    use super::*;

    async fn start(id: &str, port: u16, generation: u64, seeds: &[u16]) -> Membership {
        Membership::start(config(id, port, generation, seeds), &info(id, generation))
            .await
            .unwrap()
    }

    /// Poll `cond` every 20 ms for up to `limit`; the time it took.
    async fn within<F: AsyncFnMut() -> bool>(limit: Duration, mut cond: F) -> Option<Duration> {
        let started = Instant::now();
        while started.elapsed() < limit {
            if cond().await {
                return Some(started.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        None
    }

    async fn sees(m: &Membership, id: &str, live: bool) -> bool {
        m.members()
            .await
            .iter()
            .any(|x| x.info.id == id && x.live == live)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn three_members_converge_detect_death_and_rejoin() {
        let [pa, pb, pc] = free_udp_ports(3)[..] else {
            unreachable!()
        };
        let a = start("node-a", pa, 1, &[]).await;
        let b = start("node-b", pb, 1, &[pa]).await;
        let c = start("node-c", pc, 1, &[pa]).await;
        let all = [&a, &b, &c];
        let converged = within(Duration::from_secs(10), async || {
            for m in all {
                let members = m.members().await;
                if members.len() != 3 || !members.iter().all(|x| x.live) {
                    return false;
                }
            }
            true
        })
        .await
        .expect("3 members did not converge in 10 s");

        // Info changes reach the others (through the watch, too).
        let mut watch = a.watch();
        let mut draining = info("node-b", 1);
        draining.state = NodeState::Draining;
        draining.sandboxes = 7;
        b.set_info(&draining).await.unwrap();
        // (The borrow `wait_for` returns is dropped at once: a held watch
        // borrow blocks the sender.)
        let seen = tokio::time::timeout(
            Duration::from_secs(5),
            watch.wait_for(|ms| ms.iter().any(|m| m.info == draining)),
        )
        .await
        .is_ok_and(|r| r.is_ok());
        assert!(seen, "a never saw b draining");
        assert!(matches!(
            b.set_info(&info("node-z", 1)).await,
            Err(MembershipError::WrongNode { .. })
        ));

        c.shutdown().await;
        let detected = within(Duration::from_secs(10), async || {
            sees(&a, "node-c", false).await && sees(&b, "node-c", false).await
        })
        .await
        .expect("death of node-c not detected in 10 s");

        // Restarted on the same address with a new generation: rejoins,
        // and the new generation replaces the old one in the view.
        let c2 = start("node-c", pc, 2, &[pa]).await;
        let rejoined = within(Duration::from_secs(10), async || {
            a.members()
                .await
                .iter()
                .any(|m| m.info.id == "node-c" && m.live && m.info.generation == 2)
        })
        .await
        .expect("node-c did not rejoin");
        let cs: Vec<_> = a
            .members()
            .await
            .into_iter()
            .filter(|m| m.info.id == "node-c")
            .collect();
        assert_eq!(cs.len(), 1);
        eprintln!(
            "3 members: converged in {converged:?}, death detected by both in {detected:?}, restart rejoined in {rejoined:?}"
        );
        assert!(
            detected <= Duration::from_secs(5),
            "detection took {detected:?}"
        );
        for m in [a, b, c2] {
            m.shutdown().await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn duplicate_node_id_newest_generation_wins() {
        let [pa, p1, p2] = free_udp_ports(3)[..] else {
            unreachable!()
        };
        let a = start("node-a", pa, 1, &[]).await;
        let old = start("node-x", p1, 100, &[pa]).await;
        let new = start("node-x", p2, 200, &[pa]).await;
        let resolved = within(Duration::from_secs(10), async || {
            let ms = a.members().await;
            let xs: Vec<_> = ms.iter().filter(|m| m.info.id == "node-x").collect();
            xs.len() == 1 && xs[0].info.generation == 200 && xs[0].gossip_addr.port() == p2
        })
        .await;
        assert!(resolved.is_some(), "a did not settle on the newest node-x");
        let superseded = within(Duration::from_secs(10), async || old.is_superseded()).await;
        assert!(
            superseded.is_some(),
            "the older node-x never saw itself superseded"
        );
        assert!(!new.is_superseded());
        for m in [a, old, new] {
            m.shutdown().await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn unreachable_seed_serves_alone_then_joins_when_it_appears() {
        let [pa, pseed] = free_udp_ports(2)[..] else {
            unreachable!()
        };
        let a = start("node-a", pa, 1, &[pseed]).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let alone = a.members().await;
        assert_eq!(alone.len(), 1);
        assert!(alone[0].live && alone[0].info.id == "node-a");
        // The seed comes up late: chitchat has kept gossiping to it.
        let seed = start("node-s", pseed, 1, &[]).await;
        let joined = within(Duration::from_secs(10), async || {
            sees(&a, "node-s", true).await && sees(&seed, "node-a", true).await
        })
        .await;
        assert!(joined.is_some(), "late seed never joined");
        a.shutdown().await;
        seed.shutdown().await;
    }

    #[tokio::test]
    async fn bad_configs_are_refused() {
        let c = config("Bad_Id", free_udp_port(), 1, &[]);
        assert!(matches!(
            Membership::start(c, &info("Bad_Id", 1)).await,
            Err(MembershipError::NodeId(_))
        ));
        let c = config("node-a", 0, 1, &[]);
        assert!(matches!(
            Membership::start(c, &info("node-a", 1)).await,
            Err(MembershipError::NoPort(_))
        ));
        let c = config("node-a", free_udp_port(), 1, &[]);
        assert!(matches!(
            Membership::start(c, &info("node-b", 1)).await,
            Err(MembershipError::WrongNode { .. })
        ));
    }
}
