//! [`Sandboxes`]: this node's sandboxes as the REST handlers and the
//! proxy call them — create, get/list, timeout, pause, resume, connect,
//! logs, metrics — in front of the actor tree it starts
//! ([`crate::node_supervisor`]).
//!
//! - **Restart**: sandboxes outlive the node. [`Sandboxes::start`] re-adopts
//!   every sandbox sled remembers that the runtime still runs (same id,
//!   token, metadata and deadline) and cleans up the rest.
//! - **Capacity**: at most [`Config::max_sandboxes`] running, being
//!   created or reserved; beyond that a create (or a reservation) is
//!   refused at once (429). A reservation ([`ClusterCall::Reserve`], asked
//!   of the placement actor by whichever node placed the create) holds a
//!   slot for [`RESERVATION_TTL`]; the create that names its token takes
//!   that slot over instead of competing for a free one.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mesh::membership::Member;
use ractor::rpc::CallResult;
use ractor::{Actor, ActorRef};
use schema::e2b::{self, LogLevel, NewSandbox, RuntimeName, SandboxLogEntry, SandboxMetric};
use schema::mesh::{ClusterCall, ClusterReply, NodeInfo};
use tokio::sync::oneshot;

mod builds;
mod images;
mod snapshots;
mod templates;

pub use builds::{BUILD_METADATA, BuildOptions, mapped_image, split_name};
pub use snapshots::{MAX_FORKS, is_snapshot_id};

use crate::clock::{now_ms, rfc3339_ms};
use crate::directory::{DirectoryArgs, FrontSlot, Registry, RemoteFront};
use crate::node_supervisor::{NodeArgs, NodeMsg, NodeSupervisor};
use crate::placement::{PlacementArgs, PlacementMsg, SlotKeeper};
use crate::runtime::{Runtime, RuntimeError, SandboxId, Template, TemplateId};
use crate::sandbox::{
    MAX_SAMPLES, Refs, SandboxActor, SandboxArgs, SandboxError, SandboxMsg, Shared, Start,
    TakeOver, envd_metrics, new_sandbox_id, push_bounded, readopt, state_name,
};
use crate::store::{RecordState, SandboxRecord, Store, random_bytes};
use crate::template_cache::{TemplateEntry, TemplateMsg, TemplateSpec};

/// Node-wide settings of the sandbox lifecycle.
#[derive(Debug, Clone)]
pub struct Config {
    /// When a create names no timeout (the SDK then omits it).
    pub default_timeout: Duration,
    /// The longest timeout a create or `set_timeout` may ask for.
    pub max_timeout: Duration,
    /// This node's id in the cluster: its sandboxes register under it
    /// (`crate::directory`), and it is the `clientID` of every response.
    pub node_id: String,
    /// `domain` in the create response; `None` lets the SDK use its own.
    pub domain: Option<String>,
    /// Sandboxes this node runs at most (running + being created; paused
    /// ones do not count); a create or resume beyond it is refused with
    /// 429, never queued.
    pub max_sandboxes: usize,
    /// Where paused sandboxes' snapshots go (the node's `server::start`
    /// sets it to `<data_dir>/snapshots`).
    pub snapshots_dir: std::path::PathBuf,
    /// The object store that paused sandboxes' snapshots are published to
    /// (the node opens `--object-store`; `None`: snapshots stay local).
    pub objects: Option<crate::objects::SnapshotStore>,
    /// Template builds.
    pub builds: BuildOptions,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            default_timeout: Duration::from_secs(300),
            max_timeout: Duration::from_secs(24 * 3600),
            node_id: "local".into(),
            domain: None,
            max_sandboxes: 64,
            snapshots_dir: "./.sandmesh/snapshots".into(),
            objects: None,
            builds: BuildOptions::default(),
        }
    }
}

/// How long a reserved slot waits for its create. A create is sent right
/// after the reservation, so this only bounds what a caller that died in
/// between (or a create that never arrived) holds.
pub const RESERVATION_TTL: Duration = Duration::from_secs(15);

struct Inner {
    shared: Arc<Shared>,
    config: Config,
    node: ActorRef<NodeMsg>,
    /// Where the node puts the front the sandbox directory serves other
    /// nodes' calls through.
    front: FrontSlot,
    registry: Registry,
    /// One take-over from the object store at a time: they are rare, and
    /// two calls for the same sandbox must not both adopt it.
    taking_over: tokio::sync::Mutex<()>,
    /// One fetch of a user snapshot into this node's cache at a time.
    snapshot_cache: tokio::sync::Mutex<()>,
    /// Template builds asked of this node, by build id.
    builds: Mutex<HashMap<String, builds::BuildEntry>>,
    /// Finished builds read from the object store, by manifest name.
    built: Mutex<HashMap<String, builds::BuiltTemplate>>,
}

/// The node's capacity as the placement actor answers it: the same count
/// as a create's ([`Sandboxes::create`]), under the same lock.
struct Slots {
    shared: Arc<Shared>,
    max: usize,
}

/// Count a create against the capacity: take over the reservation
/// `token` names when it is held, else a free slot (`AtCapacity` when
/// there is none). The caller then counts it in `creating`.
fn take_slot(shared: &Shared, max: usize, token: Option<u64>) -> Result<(), SandboxError> {
    use std::sync::atomic::Ordering::SeqCst;
    let live = shared.live.lock().unwrap();
    let mut held = shared.reservations.lock().unwrap();
    let now = std::time::Instant::now();
    held.retain(|_, until| *until > now);
    if token.is_some_and(|t| held.remove(&t).is_some()) {
        shared.creating.fetch_add(1, SeqCst);
        return Ok(());
    }
    let running = live
        .values()
        .filter(|l| l.record.state != RecordState::Paused)
        .count();
    if running + shared.creating.load(SeqCst) + held.len() >= max {
        return Err(SandboxError::AtCapacity(max));
    }
    shared.creating.fetch_add(1, SeqCst);
    Ok(())
}

impl SlotKeeper for Slots {
    fn answer(&self, call: ClusterCall) -> ClusterReply {
        match call {
            ClusterCall::Reserve { .. } => {
                if self.shared.store.draining().unwrap_or(false) {
                    return ClusterReply::Refused {
                        status: 503,
                        message: "the node is draining: it takes no new sandboxes".into(),
                    };
                }
                let token = match random_bytes(8) {
                    Ok(b) => u64::from_le_bytes(b.try_into().unwrap_or([0; 8])),
                    Err(e) => {
                        return ClusterReply::Refused {
                            status: 500,
                            message: e.to_string(),
                        };
                    }
                };
                let live = self.shared.live.lock().unwrap();
                let mut held = self.shared.reservations.lock().unwrap();
                let now = std::time::Instant::now();
                held.retain(|_, until| *until > now);
                let running = live
                    .values()
                    .filter(|l| l.record.state != RecordState::Paused)
                    .count();
                let creating = self
                    .shared
                    .creating
                    .load(std::sync::atomic::Ordering::SeqCst);
                if running + creating + held.len() >= self.max {
                    let e = SandboxError::AtCapacity(self.max);
                    return ClusterReply::Refused {
                        status: e.status(),
                        message: e.to_string(),
                    };
                }
                held.insert(token, now + RESERVATION_TTL);
                ClusterReply::Reserved {
                    token,
                    ttl_ms: RESERVATION_TTL.as_millis() as u64,
                }
            }
            ClusterCall::Release { token } => {
                self.shared.reservations.lock().unwrap().remove(&token);
                ClusterReply::Released
            }
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // The sandboxes keep running (they outlive the node); their actors
        // stop with the supervisors.
        if let Some(refs) = self.shared.refs.lock().unwrap().take() {
            refs.sandboxes.stop(None);
            refs.placement.stop(None);
            refs.templates.stop(None);
        }
        self.node.stop(None);
    }
}

/// The sandboxes of this node. Cheap to clone.
#[derive(Clone)]
pub struct Sandboxes {
    inner: Arc<Inner>,
}

impl Sandboxes {
    /// Prepare the templates with the runtime (a template snapshot each,
    /// so that creates are restores), start the node's actors and re-adopt
    /// the sandboxes that outlived a previous node process.
    pub async fn start(
        runtime: Arc<dyn Runtime>,
        store: Store,
        templates: Vec<TemplateSpec>,
        config: Config,
    ) -> Result<Self, SandboxError> {
        let mut prepared = Vec::new();
        // Template snapshots fetched from the object store (their names,
        // for deduplication), and those to publish there.
        let mut fetched = Vec::new();
        let mut to_publish = Vec::new();
        for spec in templates {
            let id = TemplateId::new(spec.name.clone()).map_err(RuntimeError::from)?;
            let t = Template {
                id,
                rootfs_dir: spec.rootfs_dir,
                rootfs_image: spec.rootfs_image,
                snapshot: None,
            };
            let started = std::time::Instant::now();
            let prepared_at_ms = now_ms();
            let name = templates::object_name(&*runtime, &t, spec.limits, &config.node_id);
            let cached = runtime.cached_template(&t, spec.limits);
            let from_store = match (&cached, &config.objects) {
                (None, Some(objects)) => {
                    templates::fetch(objects, &*runtime, &t, &name, &config.snapshots_dir).await
                }
                _ => None,
            };
            let (t, source) = match (cached, from_store) {
                (Some(t), _) => (t, "cached"),
                (None, Some(t)) => {
                    fetched.push((spec.name.clone(), name.clone()));
                    (t, "fetched")
                }
                (None, None) => (runtime.prepare_template(&t, spec.limits).await?, "prepared"),
            };
            if source != "fetched"
                && let Some(snapshot) = &t.snapshot
            {
                to_publish.push((spec.name.clone(), name, snapshot.dir.clone()));
            }
            metrics::counter!(crate::metrics::TEMPLATE_SNAPSHOTS, "source" => source).increment(1);
            tracing::info!(template = %spec.name, took = ?started.elapsed(), source, "template ready");
            prepared.push(TemplateEntry {
                template: t,
                limits: spec.limits,
                build_id: crate::template_cache::new_uuid()?,
                prepared_at_ms,
                prepare_ms: started.elapsed().as_millis() as u64,
                spawn_count: 0,
                last_spawned_at_ms: None,
                hidden: false,
            });
        }
        let shared = Arc::new(Shared {
            node_id: config.node_id.clone(),
            runtime,
            store,
            live: Mutex::new(HashMap::new()),
            refs: Mutex::new(None),
            lost: Mutex::new(HashMap::new()),
            creating: std::sync::atomic::AtomicUsize::new(0),
            reservations: Mutex::new(HashMap::new()),
            snapshots_dir: config.snapshots_dir.clone(),
            objects: config.objects.clone(),
            template_objects: Mutex::new(fetched.into_iter().collect()),
        });
        if let Some(objects) = &config.objects {
            templates::publish(&shared, objects.clone(), to_publish);
        }
        std::fs::create_dir_all(&config.snapshots_dir).map_err(|e| {
            SandboxError::Io(format!(
                "creating the snapshot directory {}: {e}",
                config.snapshots_dir.display()
            ))
        })?;
        // The image roots of templates built on images, kept from before.
        prepared.extend(images::kept(&config.snapshots_dir));
        let names: std::collections::HashSet<String> =
            prepared.iter().map(|t| t.name().to_owned()).collect();
        let front = crate::directory::FrontSlot::default();
        let registry = crate::directory::Registry::default();
        let args = NodeArgs {
            shared: shared.clone(),
            templates: prepared,
            directory: DirectoryArgs {
                node_id: config.node_id.clone(),
                shared: shared.clone(),
                front: front.clone(),
                registry: registry.clone(),
            },
            placement: PlacementArgs {
                node_id: config.node_id.clone(),
                slots: Arc::new(Slots {
                    shared: shared.clone(),
                    max: config.max_sandboxes,
                }),
            },
        };
        let (node, _) = Actor::spawn(None, NodeSupervisor, args)
            .await
            .map_err(|e| SandboxError::Actor(e.to_string()))?;
        let me = Self {
            inner: Arc::new(Inner {
                shared,
                config,
                node,
                front,
                registry,
                taking_over: tokio::sync::Mutex::new(()),
                snapshot_cache: tokio::sync::Mutex::new(()),
                builds: Mutex::new(HashMap::new()),
                built: Mutex::new(HashMap::new()),
            }),
        };
        let refs = me.refs()?;
        readopt(&me.inner.shared, &refs.sandboxes, &|t| names.contains(t)).await?;
        Ok(me)
    }

    /// Give the sandbox directory the node's REST front, through which it
    /// serves the calls other nodes carry here (until then it answers
    /// them "starting"). Set once; later calls are ignored.
    pub fn set_remote_front(&self, front: Arc<dyn RemoteFront>) {
        let _ = self.inner.front.set(front);
    }

    /// What this node knows of the cluster's sandboxes' owners beyond the
    /// process groups (see [`crate::directory`]).
    pub fn registry(&self) -> &Registry {
        &self.inner.registry
    }

    /// The node supervisor (restart counts; tests make a child fail).
    pub fn node_supervisor(&self) -> &ActorRef<NodeMsg> {
        &self.inner.node
    }

    fn refs(&self) -> Result<Refs, SandboxError> {
        self.inner.shared.refs()
    }

    /// Every template of this node, by name.
    pub async fn templates(&self) -> Result<Vec<TemplateEntry>, SandboxError> {
        let refs = self.refs()?;
        match refs
            .templates
            .call(|reply| TemplateMsg::List { reply }, None)
            .await
        {
            Ok(CallResult::Success(v)) => Ok(v),
            _ => Err(SandboxError::Actor(
                "the template cache did not answer".into(),
            )),
        }
    }

    /// One template.
    pub async fn template(&self, name: &str) -> Result<Option<TemplateEntry>, SandboxError> {
        match self.inner.shared.template(name).await {
            Ok(t) => Ok(Some(t)),
            Err(SandboxError::UnknownTemplate(..)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub fn runtime(&self) -> &Arc<dyn Runtime> {
        &self.inner.shared.runtime
    }

    pub fn store(&self) -> &Store {
        &self.inner.shared.store
    }

    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    /// `timeout` seconds from now, checked against the node's maximum.
    fn end_at(&self, timeout: Option<i64>) -> Result<u64, SandboxError> {
        let max = self.inner.config.max_timeout.as_secs();
        let secs = match timeout {
            None => self.inner.config.default_timeout.as_secs(),
            Some(t) if t < 0 || t as u64 > max => {
                return Err(SandboxError::BadRequest(format!(
                    "timeout {t} s is out of range: it must be between 0 and {max} seconds"
                )));
            }
            Some(t) => t as u64,
        };
        Ok(now_ms() + secs * 1000)
    }

    /// Create a sandbox: returns once envd answers and has the env vars and
    /// the access token.
    pub async fn create(&self, req: NewSandbox) -> Result<e2b::Sandbox, SandboxError> {
        self.create_reserved(req, None).await
    }

    /// [`Sandboxes::create`] into the slot that reservation `token` holds
    /// (placement reserved it with [`ClusterCall::Reserve`]); an unknown or
    /// lapsed token competes for a free slot like any create.
    pub async fn create_reserved(
        &self,
        req: NewSandbox,
        token: Option<u64>,
    ) -> Result<e2b::Sandbox, SandboxError> {
        let inner = &self.inner;
        let end_at_ms = self.end_at(req.timeout)?;
        check_lifecycle(&req)?;
        let refs = self.refs()?;
        let name = req.template_id.clone();
        let entry = match refs
            .templates
            .call(|reply| TemplateMsg::Spawn { name, reply }, None)
            .await
        {
            Ok(CallResult::Success(found)) => found,
            _ => {
                return Err(SandboxError::Actor(
                    "the template cache did not answer".into(),
                ));
            }
        };
        // Not a node template: it may be a user snapshot (`snapshots.rs`)
        // or a user template (`builds.rs`), both copies of a sandbox.
        let (mut entry, copy_of) = match entry {
            Ok(entry) => (entry, None),
            Err(unknown) => match self.user_snapshot(&req.template_id).await? {
                Some(snap) => (snap.entry, Some((snap.source, snap.dir, snap.files_only))),
                None => match self.user_template(&req.template_id).await? {
                    Some(t) => {
                        let mut source = self.new_record(t.entry.name(), 0, t.limits)?;
                        source.envd_access_token = t.token;
                        let mut entry = t.entry;
                        entry.limits = t.limits;
                        (entry, Some((source, t.dir, false)))
                    }
                    None => return Err(unknown.into()),
                },
            },
        };
        if let Some((source, ..)) = &copy_of {
            entry.limits = crate::runtime::Limits {
                vcpus: source.vcpus,
                memory_mib: source.memory_mib,
            };
        }
        let _slot = self.reserve_slot(token)?;
        let template = copy_of
            .as_ref()
            .map_or(&req.template_id, |(source, ..)| &source.template);
        let mut record = self.new_record(template, end_at_ms, entry.limits)?;
        if copy_of.is_some() {
            record.template_name = Some(req.template_id.clone());
        }
        record.metadata = req.metadata.unwrap_or_default();
        record.auto_pause = req.auto_pause.unwrap_or(false);
        record.auto_resume = req.auto_resume.is_some_and(|a| a.enabled);
        // `end_at` refused a negative one already.
        record.timeout_secs = req.timeout.map_or(0, |t| t.max(0) as u64);
        let env_vars = req.env_vars.unwrap_or_default();
        let start = match copy_of {
            None => Start::Create {
                template: entry.template,
                limits: entry.limits,
                env_vars,
            },
            Some((source, dir, files_only)) => {
                let snapshot = crate::runtime::Snapshot {
                    dir,
                    template: entry.template.id.clone(),
                    runtime: inner.shared.runtime.kind(),
                };
                if files_only {
                    Start::BootWithFiles {
                        template: entry.template,
                        files: snapshot,
                        limits: entry.limits,
                        env_vars,
                    }
                } else {
                    Start::Restore {
                        snapshot,
                        template: entry.template,
                        limits: entry.limits,
                        env_vars,
                        source_token: source.envd_access_token,
                    }
                }
            }
        };
        self.start_sandbox(record, start).await
    }

    /// A new sandbox's record, `creating`: fresh id and access token.
    fn new_record(
        &self,
        template: &str,
        end_at_ms: u64,
        limits: crate::runtime::Limits,
    ) -> Result<SandboxRecord, SandboxError> {
        Ok(SandboxRecord {
            id: new_sandbox_id()?,
            template: template.to_owned(),
            metadata: BTreeMap::new(),
            envd_access_token: hex::encode(random_bytes(24)?),
            started_at_ms: now_ms(),
            end_at_ms,
            vcpus: limits.vcpus,
            memory_mib: limits.memory_mib,
            runtime: self.inner.shared.runtime.kind().to_string(),
            state: RecordState::Creating,
            auto_pause: false,
            auto_resume: false,
            timeout_secs: 0,
            snapshot_dir: None,
            snapshot_object: None,
            claim_epoch: None,
            template_name: None,
        })
    }

    /// Start the actor of new sandbox `record` (in its slot, taken by the
    /// caller) and wait until the sandbox runs.
    async fn start_sandbox(
        &self,
        record: SandboxRecord,
        start: Start,
    ) -> Result<e2b::Sandbox, SandboxError> {
        let inner = &self.inner;
        let refs = self.refs()?;
        let started = std::time::Instant::now();
        // Written before the runtime starts anything, so that a node that
        // crashes in the middle of the create finds the leftovers.
        inner.shared.store.put_sandbox(&record)?;
        let (ready, ready_rx) = oneshot::channel();
        let args = SandboxArgs {
            shared: inner.shared.clone(),
            record,
            start,
            ready,
        };
        let supervisor = refs.sandboxes.get_cell();
        // In its own task, so that a client that goes away in the middle
        // does not cut the create short (the actor then lives on until the
        // sandbox's timeout).
        tokio::spawn(async move {
            if let Err(e) = Actor::spawn_linked(None, SandboxActor, args, supervisor).await {
                tracing::debug!("sandbox actor did not start: {e}");
            }
        });
        let record = ready_rx.await.map_err(|_| SandboxError::Stopping)?;
        let result = if record.is_ok() { "ok" } else { "error" };
        metrics::counter!(crate::metrics::CREATES, "result" => result).increment(1);
        let record = record?;
        metrics::histogram!(crate::metrics::CREATE_SECONDS).record(started.elapsed().as_secs_f64());
        Ok(self.sandbox_json(&record))
    }

    /// Count a create against the node's capacity until the guard drops
    /// (by then the sandbox is in `live`, or the create failed).
    fn reserve_slot(&self, token: Option<u64>) -> Result<impl Drop + use<>, SandboxError> {
        use std::sync::atomic::Ordering::SeqCst;
        struct Slot(Arc<Shared>);
        impl Drop for Slot {
            fn drop(&mut self) {
                self.0.creating.fetch_sub(1, SeqCst);
            }
        }
        let shared = &self.inner.shared;
        take_slot(shared, self.inner.config.max_sandboxes, token)?;
        Ok(Slot(shared.clone()))
    }

    /// Ask this node's placement actor a [`ClusterCall`] (what a peer asks
    /// it over ractor_cluster).
    pub async fn placement_call(&self, call: ClusterCall) -> Result<ClusterReply, SandboxError> {
        let refs = self.refs()?;
        match refs
            .placement
            .call(|reply| PlacementMsg::Remote { call, reply }, None)
            .await
        {
            Ok(CallResult::Success(r)) => Ok(r),
            _ => Err(SandboxError::Actor(
                "the placement actor did not answer".into(),
            )),
        }
    }

    fn sandbox_json(&self, r: &SandboxRecord) -> e2b::Sandbox {
        e2b::Sandbox {
            template_id: r
                .template_name
                .clone()
                .unwrap_or_else(|| r.template.clone()),
            sandbox_id: r.id.clone(),
            client_id: self.inner.config.node_id.clone(),
            envd_version: schema::envd::ENVD_VERSION.into(),
            envd_access_token: Some(r.envd_access_token.clone()),
            domain: self.inner.config.domain.clone(),
            runtime: runtime_name(r),
        }
    }

    pub fn detail(&self, r: &SandboxRecord) -> e2b::SandboxDetail {
        e2b::SandboxDetail {
            template_id: r
                .template_name
                .clone()
                .unwrap_or_else(|| r.template.clone()),
            sandbox_id: r.id.clone(),
            client_id: self.inner.config.node_id.clone(),
            started_at: rfc3339_ms(r.started_at_ms),
            end_at: rfc3339_ms(r.end_at_ms),
            envd_version: schema::envd::ENVD_VERSION.into(),
            envd_access_token: Some(r.envd_access_token.clone()),
            cpu_count: r.vcpus,
            memory_mb: r.memory_mib,
            // No disk quota is enforced yet: the writable layer grows into
            // the node's disk. 0 says "no limit" rather than invent one.
            disk_size_mb: 0,
            state: state_name(r.state),
            metadata: r.metadata.clone(),
            domain: self.inner.config.domain.clone(),
            lifecycle: Some(e2b::SandboxLifecycle {
                auto_resume: r.auto_resume,
                on_timeout: if r.auto_pause {
                    e2b::OnTimeout::Pause
                } else {
                    e2b::OnTimeout::Kill
                },
            }),
            runtime: runtime_name(r),
        }
    }

    /// Sandboxes running, being created, and paused.
    pub fn counts(&self) -> (usize, usize, usize) {
        let shared = &self.inner.shared;
        let live = shared.live.lock().unwrap();
        let paused = live
            .values()
            .filter(|l| l.record.state == RecordState::Paused)
            .count();
        let creating = shared.creating.load(std::sync::atomic::Ordering::SeqCst);
        (live.len() - paused, creating, paused)
    }

    /// Where traffic for sandbox `id` may go: its record, and the signal
    /// that cuts the connection (pause, kill). `Err`: not running.
    pub fn route(
        &self,
        id: &str,
    ) -> Result<(SandboxRecord, tokio::sync::watch::Receiver<bool>), SandboxError> {
        let live = self.inner.shared.live.lock().unwrap();
        let l = live.get(id).ok_or_else(|| self.not_found(id))?;
        if l.record.state != RecordState::Running {
            return Err(SandboxError::Paused(id.to_owned()));
        }
        Ok((l.record.clone(), l.cut.subscribe()))
    }

    /// Not found, with the reason when the sandbox died under the node.
    pub fn not_found(&self, id: &str) -> SandboxError {
        match self.inner.shared.lost.lock().unwrap().get(id) {
            Some(reason) => SandboxError::Lost(id.into(), reason.clone()),
            None => SandboxError::NotFound(id.into()),
        }
    }

    /// The record of a sandbox of this node (running or paused).
    pub fn get(&self, id: &str) -> Option<SandboxRecord> {
        let live = self.inner.shared.live.lock().unwrap();
        live.get(id).map(|l| l.record.clone())
    }

    /// Every sandbox (running or paused), oldest first.
    pub fn list(&self) -> Vec<SandboxRecord> {
        let live = self.inner.shared.live.lock().unwrap();
        let mut v: Vec<_> = live.values().map(|l| l.record.clone()).collect();
        v.sort_by(|a, b| (a.started_at_ms, &a.id).cmp(&(b.started_at_ms, &b.id)));
        v
    }

    /// The sandbox's log: what happened to it on this node and its
    /// console (init's and envd's output), oldest first, from `start_ms`
    /// on, at most `limit` entries (the newest).
    pub async fn logs(
        &self,
        id: &str,
        start_ms: Option<u64>,
        limit: usize,
    ) -> Result<Vec<SandboxLogEntry>, SandboxError> {
        let (record, mut entries) = {
            let live = self.inner.shared.live.lock().unwrap();
            let l = live.get(id).ok_or_else(|| self.not_found(id))?;
            (l.record.clone(), Vec::from_iter(l.events.iter().cloned()))
        };
        let sid = SandboxId::new(id.to_owned()).map_err(RuntimeError::from)?;
        // A paused sandbox has no console until it runs again.
        let console = match self.inner.shared.runtime.console(&sid, CONSOLE_TAIL).await {
            Err(RuntimeError::NotFound(_)) if record.state != RecordState::Running => String::new(),
            c => c?,
        };
        let started = rfc3339_ms(record.started_at_ms);
        entries.extend(
            console
                .lines()
                .filter(|l| !l.trim().is_empty())
                .map(|line| {
                    let (timestamp, level) = console_line_meta(line);
                    SandboxLogEntry {
                        timestamp: timestamp.unwrap_or_else(|| started.clone()),
                        message: line.to_owned(),
                        level,
                        fields: BTreeMap::from([("source".to_owned(), "console".to_owned())]),
                    }
                }),
        );
        // RFC 3339 in UTC with fixed digits: text order is time order.
        entries.sort_by(|a, b| a.timestamp.cmp(&b.timestamp));
        if let Some(start) = start_ms {
            let from = rfc3339_ms(start);
            entries.retain(|e| e.timestamp >= from);
        }
        let skip = entries.len().saturating_sub(limit);
        entries.drain(..skip);
        Ok(entries)
    }

    /// Take a metrics sample from the sandbox's envd and return every
    /// sample taken between `start` and `end` (unix seconds, inclusive).
    pub async fn metrics(
        &self,
        id: &str,
        start: Option<i64>,
        end: Option<i64>,
    ) -> Result<Vec<SandboxMetric>, SandboxError> {
        let (record, _) = self.route(id)?;
        let sid = SandboxId::new(id.to_owned()).map_err(RuntimeError::from)?;
        let sample = envd_metrics(&*self.inner.shared.runtime, &sid, &record.envd_access_token)
            .await
            .map_err(|detail| SandboxError::Envd {
                id: id.to_owned(),
                detail,
            })?;
        let mut live = self.inner.shared.live.lock().unwrap();
        let l = live.get_mut(id).ok_or_else(|| self.not_found(id))?;
        push_bounded(&mut l.samples, MAX_SAMPLES, sample);
        Ok(l.samples
            .iter()
            .filter(|m| start.is_none_or(|s| m.timestamp_unix >= s))
            .filter(|m| end.is_none_or(|e| m.timestamp_unix <= e))
            .cloned()
            .collect())
    }

    fn actor(&self, id: &str) -> Result<ActorRef<SandboxMsg>, SandboxError> {
        let live = self.inner.shared.live.lock().unwrap();
        live.get(id)
            .map(|l| l.actor.clone())
            .ok_or_else(|| self.not_found(id))
    }

    /// Sandbox `id` is not on this node and no live node answers for it:
    /// if the object store holds it paused and no node that `alive`
    /// accepts holds it, take it over (it is this node's, paused, when
    /// this returns [`TakeOver::Taken`]). See `objects::claims`.
    pub async fn take_over(
        &self,
        id: &str,
        alive: &(dyn Fn(&str) -> bool + Sync),
    ) -> Result<TakeOver, SandboxError> {
        if self.inner.shared.objects.is_none() {
            return Ok(TakeOver::Unknown);
        }
        let _one = self.inner.taking_over.lock().await;
        let refs = self.refs()?;
        crate::sandbox::take_over(&self.inner.shared, &refs.sandboxes, id, alive).await
    }

    /// Kill sandbox `id`, which was running on node `node` when that node
    /// died (a [`TakeOver::LostWith`]): its records in the object store
    /// go, so that nobody takes it for alive, and the node, if it comes
    /// back, kills its copy. `Ok(false)`: the store says otherwise now.
    pub async fn kill_lost(&self, id: &str, node: &str) -> Result<bool, SandboxError> {
        let Some(objects) = self.inner.shared.objects.clone() else {
            return Ok(false);
        };
        let _one = self.inner.taking_over.lock().await;
        match objects.claim(id).await {
            Ok(Some(c)) if c.node == node && c.state == crate::objects::ClaimState::Running => {}
            Ok(_) => return Ok(false),
            Err(e) => {
                return Err(SandboxError::ObjectStore(format!(
                    "killing lost sandbox {id}: the object store ({}): {e}",
                    objects.describe()
                )));
            }
        }
        crate::sandbox::forget_in_store(&objects, id).await;
        // Calls naming it are a 404 from now on, not "its node is dead".
        self.inner.registry.forget(id);
        self.inner
            .shared
            .remember_lost(id, &format!("it was killed after its node {node} died"));
        tracing::info!(sandbox = %id, %node, "lost sandbox killed: its records are gone");
        Ok(true)
    }

    /// Whether this node knows sandbox `id` is gone (lost under it, or
    /// killed through it after its node died): calls naming it get the
    /// 404 that says why.
    pub fn known_gone(&self, id: &str) -> bool {
        self.inner.shared.lost.lock().unwrap().contains_key(id)
    }

    /// Node `dead` was declared dead: take over the paused sandboxes the
    /// object store says it held (in random order, so that the nodes that
    /// do this at once share them out; each sandbox goes to one). Returns
    /// how many this node took.
    pub async fn take_over_from(
        &self,
        dead: &str,
        alive: &(dyn Fn(&str) -> bool + Sync),
    ) -> Result<usize, SandboxError> {
        let Some(objects) = self.inner.shared.objects.clone() else {
            return Ok(0);
        };
        let mut held: Vec<String> = objects
            .claims()
            .await
            .map_err(|e| {
                SandboxError::ObjectStore(format!(
                    "listing the sandboxes of dead node {dead} in the object store ({}): {e}",
                    objects.describe()
                ))
            })?
            .into_iter()
            .filter(|c| c.node == dead && c.state == crate::objects::ClaimState::Paused)
            .map(|c| c.sandbox_id)
            .collect();
        shuffle(&mut held);
        let mut taken = 0;
        for id in held {
            match self.take_over(&id, alive).await {
                Ok(TakeOver::Taken) => {
                    taken += 1;
                    // Resumes here will be local: calls for it come here.
                    if let Ok(actor) = self.actor(&id) {
                        let _ = actor.cast(SandboxMsg::Prefetch);
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(sandbox = %id, "taking over a paused sandbox of dead node {dead}: {e}")
                }
            }
        }
        Ok(taken)
    }

    /// Kill a running sandbox now.
    pub async fn kill(&self, id: &str) -> Result<(), SandboxError> {
        let actor = self.actor(id)?;
        match actor.call(|reply| SandboxMsg::Kill { reply }, None).await {
            Ok(CallResult::Success(r)) => r,
            // The actor stopped in between: killed by its deadline.
            _ => Err(SandboxError::NotFound(id.into())),
        }
    }

    /// The sandbox dies `timeout` seconds from now (earlier or later than
    /// before).
    pub async fn set_timeout(&self, id: &str, timeout: i64) -> Result<SandboxRecord, SandboxError> {
        let end_at_ms = self.end_at(Some(timeout))?;
        self.set_deadline(id, end_at_ms, false).await
    }

    /// Pause a running sandbox (E2B pause): 409 when it is paused already.
    pub async fn pause(&self, id: &str) -> Result<(), SandboxError> {
        let actor = self.actor(id)?;
        match actor.call(|reply| SandboxMsg::Pause { reply }, None).await {
            Ok(CallResult::Success(r)) => r.map(|_| ()),
            _ => Err(self.not_found(id)),
        }
    }

    /// Resume a paused sandbox; it then lives `timeout` seconds (the
    /// default when `None`). 409 when it runs already.
    pub async fn resume(
        &self,
        id: &str,
        timeout: Option<i64>,
    ) -> Result<e2b::Sandbox, SandboxError> {
        let end_at_ms = self.end_at(timeout)?;
        let actor = self.actor(id)?;
        if self
            .get(id)
            .is_some_and(|r| r.state == RecordState::Running)
        {
            return Err(SandboxError::AlreadyRunning(id.to_owned()));
        }
        // A resumed sandbox counts against the node's capacity again.
        let _slot = self.reserve_slot(None)?;
        match actor
            .call(|reply| SandboxMsg::Resume { end_at_ms, reply }, None)
            .await
        {
            Ok(CallResult::Success(r)) => Ok(self.sandbox_json(&r?)),
            _ => Err(self.not_found(id)),
        }
    }

    /// Traffic reached sandbox `id` while it is paused (or pausing): resume
    /// it when it was created with `autoResume` (E2B's auto-resume: the
    /// sandbox then lives the create's timeout again). `Ok(false)`: it
    /// was not, and the traffic gets today's "paused" answer. `Ok(true)`:
    /// it runs now (resumed here, or by a concurrent call).
    pub async fn wake(&self, id: &str) -> Result<bool, SandboxError> {
        let Some(r) = self.get(id) else {
            return Err(self.not_found(id));
        };
        if !r.auto_resume {
            return Ok(false);
        }
        if r.state == RecordState::Running {
            return Ok(true);
        }
        let timeout = (r.timeout_secs > 0).then_some(r.timeout_secs as i64);
        tracing::info!(sandbox = %id, "traffic for a paused sandbox: resuming it (autoResume)");
        match self.resume(id, timeout).await {
            Ok(_) | Err(SandboxError::AlreadyRunning(_)) => Ok(true),
            Err(e) => Err(e),
        }
    }

    /// `connect`: a paused sandbox is resumed (`true` in the answer); for a
    /// running one the timeout only grows. Returns the create response
    /// again (token included).
    pub async fn connect(
        &self,
        id: &str,
        timeout: Option<i64>,
    ) -> Result<(e2b::Sandbox, bool), SandboxError> {
        // Being paused counts: the resume waits for the pause to finish.
        let paused = self
            .get(id)
            .is_some_and(|r| matches!(r.state, RecordState::Paused | RecordState::Pausing));
        if paused {
            match self.resume(id, timeout).await {
                Ok(s) => return Ok((s, true)),
                // Resumed by another call in between: connect as usual.
                Err(SandboxError::AlreadyRunning(_)) => {}
                Err(e) => return Err(e),
            }
        }
        let record = match timeout {
            Some(t) => {
                let end_at_ms = self.end_at(Some(t))?;
                self.set_deadline(id, end_at_ms, true).await?
            }
            None => self
                .get(id)
                .ok_or_else(|| SandboxError::NotFound(id.into()))?,
        };
        Ok((self.sandbox_json(&record), false))
    }

    async fn set_deadline(
        &self,
        id: &str,
        end_at_ms: u64,
        only_extend: bool,
    ) -> Result<SandboxRecord, SandboxError> {
        let actor = self.actor(id)?;
        let sent = actor
            .call(
                |reply| SandboxMsg::SetDeadline {
                    end_at_ms,
                    only_extend,
                    reply,
                },
                None,
            )
            .await;
        match sent {
            Ok(CallResult::Success(r)) => Ok(r),
            _ => Err(SandboxError::NotFound(id.into())),
        }
    }

    /// Rank `members` for a sandbox of `template` needing `memory_mib`
    /// (0 when unknown), best first: the placement actor takes `members`
    /// (this node's view of the cluster now, the members it may place on)
    /// as its snapshot and answers from it.
    pub async fn rank(
        &self,
        members: Vec<Member>,
        template: &str,
        memory_mib: u64,
    ) -> Result<Vec<NodeInfo>, SandboxError> {
        let refs = self.refs()?;
        let unanswered = || SandboxError::Actor("the placement actor did not answer".into());
        refs.placement
            .cast(PlacementMsg::Members(members))
            .map_err(|_| unanswered())?;
        let template = template.to_owned();
        match refs
            .placement
            .call(
                |reply| PlacementMsg::Rank {
                    template,
                    memory_mib,
                    reply,
                },
                None,
            )
            .await
        {
            Ok(CallResult::Success(ranked)) => Ok(ranked),
            _ => Err(unanswered()),
        }
    }
}

/// How much of the console `GET .../logs` reads.
const CONSOLE_TAIL: u64 = 64 * 1024;

/// The timestamp (`2026-01-02T03:04:05...Z` at the start of the line, as
/// `tracing` writes it) and level of a console line, when it has them.
fn console_line_meta(line: &str) -> (Option<String>, LogLevel) {
    let b = line.as_bytes();
    let looks_like_time = b.len() >= 20
        && b[4] == b'-'
        && b[7] == b'-'
        && b[10] == b'T'
        && b[13] == b':'
        && b[..4].iter().all(u8::is_ascii_digit);
    let timestamp = looks_like_time
        .then(|| line.split_whitespace().next().map(str::to_owned))
        .flatten();
    let level = match line
        .split_whitespace()
        .nth(usize::from(timestamp.is_some()))
    {
        Some("ERROR") => LogLevel::Error,
        Some("WARN") => LogLevel::Warn,
        Some("DEBUG" | "TRACE") => LogLevel::Debug,
        _ => LogLevel::Info,
    };
    (timestamp, level)
}

/// E2B's checks of a create's lifecycle fields: `autoPauseMemory=false`
/// (a filesystem-only auto-pause) means nothing without `autoPause`, and a
/// filesystem-only snapshot cannot be resumed by traffic.
fn check_lifecycle(req: &NewSandbox) -> Result<(), SandboxError> {
    if req.auto_pause_memory != Some(false) {
        return Ok(());
    }
    if req.auto_pause != Some(true) {
        return Err(SandboxError::BadRequest(
            "autoPauseMemory=false only applies when autoPause is true.".into(),
        ));
    }
    if req.auto_resume.is_some_and(|a| a.enabled) {
        return Err(SandboxError::BadRequest(
            "autoPauseMemory=false (filesystem-only auto-pause) cannot be combined with autoResume: a filesystem-only snapshot cannot be auto-resumed by traffic and must be resumed explicitly.".into(),
        ));
    }
    Ok(())
}

/// The runtime a sandbox record names, as the API reports it.
fn runtime_name(r: &SandboxRecord) -> RuntimeName {
    if r.runtime == "microvm" {
        RuntimeName::Microvm
    } else {
        RuntimeName::Gvisor
    }
}

/// Shuffle `items` in place (Fisher-Yates over OS randomness; order only,
/// nothing secret).
fn shuffle<T>(items: &mut [T]) {
    for i in (1..items.len()).rev() {
        let r = random_bytes(8)
            .map(|b| u64::from_le_bytes(b.try_into().unwrap_or([0; 8])))
            .unwrap_or(0);
        items.swap(i, (r % (i as u64 + 1)) as usize);
    }
}
