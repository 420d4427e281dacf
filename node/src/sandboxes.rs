//! The sandbox lifecycle on one node, on ractor actors.
//!
//! [`Sandboxes`] is the service the REST handlers and the proxy call.
//! [`SandboxSupervisor`] supervises one [`SandboxActor`] per sandbox. The
//! actor runs `runtime.create` and envd's `/init` (in `pre_start`), then
//! holds the deadline timer, and it alone kills the sandbox (on `DELETE`,
//! at the deadline, or when the runtime lost it). Every call for one id
//! goes through its actor, so runtime calls for an id never overlap, as the
//! runtime contract requires.
//!
//! - **Restart**: sandboxes outlive the node. [`Sandboxes::start`] re-adopts
//!   every sandbox sled remembers that the runtime still runs (same id,
//!   token, metadata and deadline) and cleans up the rest.
//! - **Runtime crash**: the supervisor compares the live sandboxes with
//!   `runtime.list()` every [`SWEEP_EVERY`]; a sandbox whose runtime
//!   process died is cleaned up and later calls for it say why (404/502
//!   "... was lost (...)"). A failed actor (error or panic) has its sandbox
//!   killed; the node goes on.
//! - **Capacity**: at most [`Config::max_sandboxes`] running or being
//!   created; beyond that a create is refused at once (429).

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use actors::runtime::{ENVD_PORT, Limits, Runtime, RuntimeError, SandboxId, Template, TemplateId};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use ractor::rpc::CallResult;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};
use schema::e2b::{self, NewSandbox, RuntimeName, SandboxStateName};
use tokio::sync::oneshot;

use crate::store::{RecordState, SandboxRecord, Store, StoreError, random_bytes};

/// Node-wide settings of the sandbox lifecycle.
#[derive(Debug, Clone)]
pub struct Config {
    /// When a create names no timeout (the SDK then omits it).
    pub default_timeout: Duration,
    /// The longest timeout a create or `set_timeout` may ask for.
    pub max_timeout: Duration,
    /// `clientID` in every response: this node's name.
    pub client_id: String,
    /// `domain` in the create response; `None` lets the SDK use its own.
    pub domain: Option<String>,
    /// Resources of every sandbox (per-template limits come later).
    pub limits: Limits,
    /// Sandboxes this node runs at most (running + being created); a
    /// create beyond it is refused with 429, never queued.
    pub max_sandboxes: usize,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            default_timeout: Duration::from_secs(300),
            max_timeout: Duration::from_secs(24 * 3600),
            client_id: "sandmesh".into(),
            domain: None,
            limits: Limits::default(),
            max_sandboxes: 64,
        }
    }
}

/// Why a lifecycle call failed; [`SandboxError::status`] is the HTTP status.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("sandbox {0} not found")]
    NotFound(String),
    #[error("sandbox {0} not found: it was lost ({1})")]
    Lost(String, String),
    #[error("template {0:?} not found: this node serves {1}")]
    UnknownTemplate(String, String),
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotImplemented(String),
    #[error("this node is at capacity ({0} sandboxes): kill a sandbox or retry later")]
    AtCapacity(usize),
    #[error("sandbox {0} is already running")]
    AlreadyRunning(String),
    #[error("the sandbox runtime failed: {0}")]
    Runtime(#[from] RuntimeError),
    #[error("envd of sandbox {id} refused /init: {detail}")]
    Init { id: String, detail: String },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the node is shutting down")]
    Stopping,
    #[error("sandbox actors: {0}")]
    Actor(String),
}

impl SandboxError {
    pub fn status(&self) -> u16 {
        match self {
            Self::NotFound(_) | Self::Lost(..) | Self::UnknownTemplate(..) => 404,
            Self::BadRequest(_) => 400,
            Self::AlreadyRunning(_) => 409,
            Self::AtCapacity(_) => 429,
            Self::NotImplemented(_) => 501,
            Self::Stopping => 503,
            Self::Runtime(_) | Self::Init { .. } | Self::Store(_) | Self::Actor(_) => 500,
        }
    }
}

/// Messages of a [`SandboxActor`].
pub enum SandboxMsg {
    /// Move the deadline to `end_at_ms` (only later, when `only_extend`).
    SetDeadline {
        end_at_ms: u64,
        only_extend: bool,
        reply: RpcReplyPort<SandboxRecord>,
    },
    Kill {
        reply: RpcReplyPort<Result<(), SandboxError>>,
    },
    /// The deadline timer fired.
    Deadline,
    /// The runtime no longer runs the sandbox (its process died).
    Lost { reason: String },
}

struct Live {
    record: SandboxRecord,
    actor: ActorRef<SandboxMsg>,
}

/// What the actors share with the service.
pub struct Shared {
    runtime: Arc<dyn Runtime>,
    store: Store,
    limits: Limits,
    live: Mutex<HashMap<String, Live>>,
    /// Sandboxes that died under the node (runtime crash), with the reason,
    /// so that a later call for them says what happened.
    lost: Mutex<HashMap<String, String>>,
    /// Creates in flight (not in `live` yet), for the capacity check.
    creating: std::sync::atomic::AtomicUsize,
}

struct Inner {
    shared: Arc<Shared>,
    templates: HashMap<String, Template>,
    config: Config,
    supervisor: ActorRef<SupervisorMsg>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // The sandboxes keep running (they outlive the node); their actors
        // stop with the supervisor.
        self.supervisor.stop(None);
    }
}

/// The sandboxes of this node. Cheap to clone.
#[derive(Clone)]
pub struct Sandboxes {
    inner: Arc<Inner>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64
}

fn rfc3339_ms(ms: u64) -> String {
    e2b::format_rfc3339(UNIX_EPOCH + Duration::from_millis(ms))
}

/// A new sandbox id: 20 of `[a-z0-9]`, uniformly drawn.
fn new_sandbox_id() -> Result<String, StoreError> {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut id = String::with_capacity(20);
    while id.len() < 20 {
        for b in random_bytes(32)? {
            // 252 = 7 * 36: reject the rest so every letter is equally likely.
            if b < 252 && id.len() < 20 {
                id.push(ALPHABET[(b % 36) as usize] as char);
            }
        }
    }
    Ok(id)
}

impl Sandboxes {
    /// Prepare the templates (`name -> root tree`) with the runtime (a
    /// template snapshot each, so that creates are restores) and start
    /// with no sandboxes.
    pub async fn start(
        runtime: Arc<dyn Runtime>,
        store: Store,
        templates: Vec<(String, PathBuf)>,
        config: Config,
    ) -> Result<Self, SandboxError> {
        let mut prepared = HashMap::new();
        for (name, rootfs_dir) in templates {
            let id = TemplateId::new(name.clone()).map_err(RuntimeError::from)?;
            let t = Template {
                id,
                rootfs_dir,
                snapshot: None,
            };
            let started = std::time::Instant::now();
            let t = runtime.prepare_template(&t).await?;
            tracing::info!(template = %name, took = ?started.elapsed(), "template prepared");
            prepared.insert(name, t);
        }
        let shared = Arc::new(Shared {
            runtime,
            store,
            limits: config.limits,
            live: Mutex::new(HashMap::new()),
            lost: Mutex::new(HashMap::new()),
            creating: std::sync::atomic::AtomicUsize::new(0),
        });
        let (supervisor, _) = Actor::spawn(None, SandboxSupervisor, shared.clone())
            .await
            .map_err(|e| SandboxError::Actor(e.to_string()))?;
        let me = Self {
            inner: Arc::new(Inner {
                shared,
                templates: prepared,
                config,
                supervisor,
            }),
        };
        me.readopt().await?;
        Ok(me)
    }

    /// After a restart: take over every sandbox sled remembers and the
    /// runtime still runs; clean up the rest (sandboxes that died while the
    /// node was down, creates cut short by a crash, runtime leftovers sled
    /// does not know).
    async fn readopt(&self) -> Result<(), SandboxError> {
        let shared = &self.inner.shared;
        let on_node = shared.runtime.list().await?;
        let running: HashMap<String, actors::runtime::SandboxState> = on_node
            .iter()
            .map(|r| (r.id.as_str().to_owned(), r.state))
            .collect();
        let records = shared.store.sandboxes()?;
        for record in &records {
            let alive = running.get(&record.id) == Some(&actors::runtime::SandboxState::Running);
            let usable = alive
                && record.state == RecordState::Running
                && record.end_at_ms > now_ms()
                && self.inner.templates.contains_key(&record.template);
            if usable {
                let (ready, ready_rx) = oneshot::channel();
                let args = SandboxArgs {
                    shared: shared.clone(),
                    record: record.clone(),
                    start: Start::Adopt,
                    ready,
                };
                Actor::spawn_linked(None, SandboxActor, args, self.inner.supervisor.get_cell())
                    .await
                    .map_err(|e| SandboxError::Actor(e.to_string()))?;
                ready_rx.await.map_err(|_| SandboxError::Stopping)??;
                continue;
            }
            tracing::warn!(sandbox = %record.id, state = ?record.state, alive,
                "sandbox not re-adopted (gone, stopped, half-created or past its timeout): cleaning up");
            // A failed clean-up keeps the record: the next start retries.
            let cleaned = match SandboxId::new(record.id.clone()) {
                Ok(id) => kill(shared, &id).await,
                Err(_) => shared.store.remove_sandbox(&record.id).map_err(Into::into),
            };
            if let Err(e) = cleaned {
                tracing::error!(sandbox = %record.id, "cleaning up: {e}");
            }
        }
        for r in on_node {
            if !records.iter().any(|rec| rec.id == r.id.as_str()) {
                tracing::warn!(sandbox = %r.id, "runtime leftover unknown to the node: killing it");
                if let Err(e) = shared.runtime.kill(&r.id).await {
                    tracing::error!(sandbox = %r.id, "killing a runtime leftover: {e}");
                }
            }
        }
        Ok(())
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
        let inner = &self.inner;
        let Some(template) = inner.templates.get(&req.template_id).cloned() else {
            let mut names: Vec<_> = inner.templates.keys().cloned().collect();
            names.sort();
            return Err(SandboxError::UnknownTemplate(
                req.template_id,
                names.join(", "),
            ));
        };
        let end_at_ms = self.end_at(req.timeout)?;
        let _slot = self.reserve_slot()?;
        let started = std::time::Instant::now();
        let id = new_sandbox_id()?;
        let token = hex::encode(random_bytes(24)?);
        let record = SandboxRecord {
            id: id.clone(),
            template: req.template_id.clone(),
            metadata: req.metadata.unwrap_or_default(),
            envd_access_token: token.clone(),
            started_at_ms: now_ms(),
            end_at_ms,
            vcpus: inner.config.limits.vcpus,
            memory_mib: inner.config.limits.memory_mib,
            runtime: inner.shared.runtime.kind().to_string(),
            state: RecordState::Creating,
        };
        // Written before the runtime starts anything, so that a node that
        // crashes in the middle of the create finds the leftovers.
        inner.shared.store.put_sandbox(&record)?;
        let (ready, ready_rx) = oneshot::channel();
        let args = SandboxArgs {
            shared: inner.shared.clone(),
            record,
            start: Start::Create {
                template,
                env_vars: req.env_vars.unwrap_or_default(),
            },
            ready,
        };
        let supervisor = inner.supervisor.get_cell();
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
    fn reserve_slot(&self) -> Result<impl Drop + use<>, SandboxError> {
        use std::sync::atomic::Ordering::SeqCst;
        struct Slot(Arc<Shared>);
        impl Drop for Slot {
            fn drop(&mut self) {
                self.0.creating.fetch_sub(1, SeqCst);
            }
        }
        let shared = &self.inner.shared;
        let max = self.inner.config.max_sandboxes;
        let live = shared.live.lock().unwrap();
        if live.len() + shared.creating.load(SeqCst) >= max {
            return Err(SandboxError::AtCapacity(max));
        }
        shared.creating.fetch_add(1, SeqCst);
        Ok(Slot(shared.clone()))
    }

    fn sandbox_json(&self, r: &SandboxRecord) -> e2b::Sandbox {
        e2b::Sandbox {
            template_id: r.template.clone(),
            sandbox_id: r.id.clone(),
            client_id: self.inner.config.client_id.clone(),
            envd_version: schema::envd::ENVD_VERSION.into(),
            envd_access_token: Some(r.envd_access_token.clone()),
            domain: self.inner.config.domain.clone(),
            runtime: runtime_name(r),
        }
    }

    pub fn detail(&self, r: &SandboxRecord) -> e2b::SandboxDetail {
        e2b::SandboxDetail {
            template_id: r.template.clone(),
            sandbox_id: r.id.clone(),
            client_id: self.inner.config.client_id.clone(),
            started_at: rfc3339_ms(r.started_at_ms),
            end_at: rfc3339_ms(r.end_at_ms),
            envd_version: schema::envd::ENVD_VERSION.into(),
            envd_access_token: Some(r.envd_access_token.clone()),
            cpu_count: r.vcpus,
            memory_mb: r.memory_mib,
            // No disk quota is enforced yet: the writable layer grows into
            // the node's disk. 0 says "no limit" rather than invent one.
            disk_size_mb: 0,
            state: SandboxStateName::Running,
            metadata: r.metadata.clone(),
            domain: self.inner.config.domain.clone(),
            runtime: runtime_name(r),
        }
    }

    /// Sandboxes running, and being created.
    pub fn counts(&self) -> (usize, usize) {
        let shared = &self.inner.shared;
        let running = shared.live.lock().unwrap().len();
        let creating = shared.creating.load(std::sync::atomic::Ordering::SeqCst);
        (running, creating)
    }

    /// Not found, with the reason when the sandbox died under the node.
    pub fn not_found(&self, id: &str) -> SandboxError {
        match self.inner.shared.lost.lock().unwrap().get(id) {
            Some(reason) => SandboxError::Lost(id.into(), reason.clone()),
            None => SandboxError::NotFound(id.into()),
        }
    }

    /// The record of a running sandbox.
    pub fn get(&self, id: &str) -> Option<SandboxRecord> {
        let live = self.inner.shared.live.lock().unwrap();
        live.get(id).map(|l| l.record.clone())
    }

    /// Every running sandbox, oldest first.
    pub fn list(&self) -> Vec<SandboxRecord> {
        let live = self.inner.shared.live.lock().unwrap();
        let mut v: Vec<_> = live.values().map(|l| l.record.clone()).collect();
        v.sort_by(|a, b| (a.started_at_ms, &a.id).cmp(&(b.started_at_ms, &b.id)));
        v
    }

    fn actor(&self, id: &str) -> Result<ActorRef<SandboxMsg>, SandboxError> {
        let live = self.inner.shared.live.lock().unwrap();
        live.get(id)
            .map(|l| l.actor.clone())
            .ok_or_else(|| self.not_found(id))
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

    /// `connect` of a running sandbox: the timeout only grows. Returns the
    /// create response again (token included).
    pub async fn connect(
        &self,
        id: &str,
        timeout: Option<i64>,
    ) -> Result<e2b::Sandbox, SandboxError> {
        let record = match timeout {
            Some(t) => {
                let end_at_ms = self.end_at(Some(t))?;
                self.set_deadline(id, end_at_ms, true).await?
            }
            None => self
                .get(id)
                .ok_or_else(|| SandboxError::NotFound(id.into()))?,
        };
        Ok(self.sandbox_json(&record))
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
}

/// POST /init to envd through the runtime's stream.
async fn init_envd(
    runtime: &dyn Runtime,
    id: &SandboxId,
    env_vars: &BTreeMap<String, String>,
    token: &str,
) -> Result<(), String> {
    let body = serde_json::json!({
        "envVars": env_vars,
        "accessToken": token,
        "timestamp": e2b::format_rfc3339(SystemTime::now()),
    });
    let stream = runtime
        .connect(id, ENVD_PORT)
        .await
        .map_err(|e| e.to_string())?;
    let req = hyper::Request::post("/init")
        .header(hyper::header::HOST, "localhost")
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("a valid request");
    let resp = crate::proxy::send(stream, req)
        .await
        .map_err(|e| e.to_string())?;
    let status = resp.status();
    if status.is_success() {
        return Ok(());
    }
    let body = resp
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    Err(format!("{status}: {}", String::from_utf8_lossy(&body)))
}

/// How a [`SandboxActor`] comes to own its sandbox.
enum Start {
    /// Create it from a template, then `/init` envd.
    Create {
        template: Template,
        env_vars: BTreeMap<String, String>,
    },
    /// It already runs (a node restart found it): take it over.
    Adopt,
}

/// Supervises the [`SandboxActor`]s. A sandbox actor that fails (an error
/// or a panic in its handler) is reported here: its sandbox is removed from
/// routing and killed, and the node goes on. (ractor's default would stop
/// the supervisor with its child.)
pub struct SandboxSupervisor;

/// How often the supervisor checks that the runtime still runs every
/// sandbox (a cheap `runtime.list()`).
pub const SWEEP_EVERY: Duration = Duration::from_secs(2);

pub enum SupervisorMsg {
    /// Compare the live sandboxes with what the runtime runs.
    Sweep,
}

impl Actor for SandboxSupervisor {
    type Msg = SupervisorMsg;
    type State = Arc<Shared>;
    type Arguments = Arc<Shared>;

    async fn pre_start(
        &self,
        myself: ActorRef<SupervisorMsg>,
        shared: Arc<Shared>,
    ) -> Result<Arc<Shared>, ActorProcessingErr> {
        // The interval task ends when the supervisor stops.
        myself.send_interval(SWEEP_EVERY, || SupervisorMsg::Sweep);
        Ok(shared)
    }

    async fn handle(
        &self,
        _myself: ActorRef<SupervisorMsg>,
        msg: SupervisorMsg,
        shared: &mut Arc<Shared>,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            SupervisorMsg::Sweep => {
                // Live first, then the runtime: a sandbox that enters `live`
                // in between was created before the listing, so it shows
                // as running there (the other order would report a
                // sandbox created in between as lost).
                let live: Vec<(String, ActorRef<SandboxMsg>)> = {
                    let live = shared.live.lock().unwrap();
                    live.iter()
                        .map(|(id, l)| (id.clone(), l.actor.clone()))
                        .collect()
                };
                let on_node = match shared.runtime.list().await {
                    Ok(l) => l,
                    Err(e) => {
                        tracing::warn!("checking the runtime's sandboxes: {e}");
                        return Ok(());
                    }
                };
                for (id, actor) in live {
                    let reason = match on_node.iter().find(|r| r.id.as_str() == id) {
                        Some(r) if r.state == actors::runtime::SandboxState::Running => continue,
                        Some(_) => "its runtime process died (the guest stopped)",
                        None => "the runtime no longer has it",
                    };
                    let _ = actor.cast(SandboxMsg::Lost {
                        reason: reason.into(),
                    });
                }
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        _myself: ActorRef<SupervisorMsg>,
        event: SupervisionEvent,
        shared: &mut Arc<Shared>,
    ) -> Result<(), ActorProcessingErr> {
        if let SupervisionEvent::ActorFailed(cell, err) = event {
            let failed = {
                let mut live = shared.live.lock().unwrap();
                let id = live
                    .iter()
                    .find(|(_, l)| l.actor.get_id() == cell.get_id())
                    .map(|(id, _)| id.clone());
                id.and_then(|id| live.remove(&id).map(|l| l.record))
            };
            if let Some(record) = failed {
                tracing::error!(sandbox = %record.id, "sandbox actor failed: {err}; killing the sandbox");
                let shared = shared.clone();
                tokio::spawn(async move {
                    if let Ok(id) = SandboxId::new(record.id.clone())
                        && let Err(e) = kill(&shared, &id).await
                    {
                        tracing::error!(sandbox = %id, "cleaning up after a failed actor: {e}");
                    }
                });
            }
        }
        Ok(())
    }
}

/// Owns one sandbox: creates it (runtime create + envd `/init`) in
/// `pre_start`, then holds its deadline timer and alone kills it.
pub struct SandboxActor;

pub struct SandboxArgs {
    shared: Arc<Shared>,
    record: SandboxRecord,
    start: Start,
    /// The create's outcome, for the REST call waiting on it.
    ready: oneshot::Sender<Result<SandboxRecord, SandboxError>>,
}

pub struct SandboxState {
    shared: Arc<Shared>,
    id: SandboxId,
    record: SandboxRecord,
    timer: Option<tokio::task::JoinHandle<Result<(), ractor::MessagingErr<SandboxMsg>>>>,
}

impl SandboxState {
    fn arm(&mut self, myself: &ActorRef<SandboxMsg>) {
        if let Some(t) = self.timer.take() {
            t.abort();
        }
        let left = Duration::from_millis(self.record.end_at_ms.saturating_sub(now_ms()));
        self.timer = Some(myself.send_after(left, || SandboxMsg::Deadline));
    }
}

impl Actor for SandboxActor {
    type Msg = SandboxMsg;
    type State = SandboxState;
    type Arguments = SandboxArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<SandboxMsg>,
        args: SandboxArgs,
    ) -> Result<SandboxState, ActorProcessingErr> {
        let SandboxArgs {
            shared,
            mut record,
            start,
            ready,
        } = args;
        let id = SandboxId::new(record.id.clone())?;
        let created = async {
            let (template, env_vars) = match start {
                Start::Create { template, env_vars } => (template, env_vars),
                Start::Adopt => return Ok(None),
            };
            let instance = shared.runtime.create(&id, &template, shared.limits).await?;
            if let Err(detail) =
                init_envd(&*shared.runtime, &id, &env_vars, &record.envd_access_token).await
            {
                return Err(SandboxError::Init {
                    id: record.id.clone(),
                    detail,
                });
            }
            record.state = RecordState::Running;
            shared.store.put_sandbox(&record)?;
            Ok(Some(instance))
        }
        .await;
        let instance = match created {
            Ok(i) => i,
            Err(e) => {
                tracing::warn!(sandbox = %id, "create failed: {e}");
                // create undoes itself; a failed /init leaves a running guest.
                match shared.runtime.kill(&id).await {
                    Ok(()) => {
                        let _ = shared.store.remove_sandbox(&record.id);
                    }
                    Err(k) => {
                        tracing::error!(sandbox = %id, "cleaning up after a failed create: {k}")
                    }
                }
                let msg = e.to_string();
                let _ = ready.send(Err(e));
                return Err(msg.into());
            }
        };
        match instance {
            Some(i) => tracing::info!(sandbox = %id, template = %record.template,
                ready_after = ?i.ready_after, "sandbox created"),
            None => tracing::info!(sandbox = %id, template = %record.template,
                "sandbox re-adopted after a node restart"),
        }
        shared.live.lock().unwrap().insert(
            record.id.clone(),
            Live {
                record: record.clone(),
                actor: myself.clone(),
            },
        );
        let mut state = SandboxState {
            shared,
            id,
            record: record.clone(),
            timer: None,
        };
        state.arm(&myself);
        if ready.send(Ok(record)).is_err() {
            tracing::warn!(sandbox = %state.id, "the create request went away; the sandbox keeps running until its timeout");
        }
        Ok(state)
    }

    async fn handle(
        &self,
        myself: ActorRef<SandboxMsg>,
        msg: SandboxMsg,
        st: &mut SandboxState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            SandboxMsg::Deadline => {
                if now_ms() < st.record.end_at_ms {
                    // A timer that fired as the deadline moved: re-arm.
                    st.arm(&myself);
                    return Ok(());
                }
                tracing::info!(sandbox = %st.id, "timeout reached: killing");
                metrics::counter!(crate::metrics::TIMED_OUT).increment(1);
                if let Err(e) = kill(&st.shared, &st.id).await {
                    tracing::error!(sandbox = %st.id, "kill at timeout failed: {e}");
                }
                myself.stop(Some("timeout".into()));
            }
            SandboxMsg::SetDeadline {
                end_at_ms,
                only_extend,
                reply,
            } => {
                if !only_extend || end_at_ms > st.record.end_at_ms {
                    st.record.end_at_ms = end_at_ms;
                    if let Err(e) = st.shared.store.put_sandbox(&st.record) {
                        tracing::error!(sandbox = %st.id, "saving the new deadline: {e}");
                    }
                    if let Some(l) = st.shared.live.lock().unwrap().get_mut(st.id.as_str()) {
                        l.record.end_at_ms = end_at_ms;
                    }
                    st.arm(&myself);
                }
                let _ = reply.send(st.record.clone());
            }
            SandboxMsg::Lost { reason } => {
                if !st.shared.live.lock().unwrap().contains_key(st.id.as_str()) {
                    // Being killed already.
                    return Ok(());
                }
                tracing::error!(sandbox = %st.id, "sandbox lost: {reason}; cleaning up");
                metrics::counter!(crate::metrics::LOST).increment(1);
                {
                    let mut lost = st.shared.lost.lock().unwrap();
                    if lost.len() >= 1024 {
                        lost.clear();
                    }
                    lost.insert(st.id.as_str().to_owned(), reason);
                }
                if let Err(e) = kill(&st.shared, &st.id).await {
                    tracing::error!(sandbox = %st.id, "cleaning up a lost sandbox: {e}");
                }
                myself.stop(Some("lost".into()));
            }
            SandboxMsg::Kill { reply } => {
                let r = kill(&st.shared, &st.id).await;
                let _ = reply.send(r);
                myself.stop(Some("killed".into()));
            }
        }
        Ok(())
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<SandboxMsg>,
        st: &mut SandboxState,
    ) -> Result<(), ActorProcessingErr> {
        if let Some(t) = st.timer.take() {
            t.abort();
        }
        Ok(())
    }
}

/// Stop routing to the sandbox, remove it from the runtime and forget it.
/// If the runtime cannot remove it, the record stays in sled so that the
/// next node start retries.
async fn kill(shared: &Shared, id: &SandboxId) -> Result<(), SandboxError> {
    shared.live.lock().unwrap().remove(id.as_str());
    shared.runtime.kill(id).await?;
    shared.store.remove_sandbox(id.as_str())?;
    tracing::info!(sandbox = %id, "sandbox killed");
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_have_the_e2b_shape() {
        let a = new_sandbox_id().unwrap();
        let b = new_sandbox_id().unwrap();
        assert_ne!(a, b);
        for id in [a, b] {
            assert_eq!(id.len(), 20);
            assert!(
                id.bytes()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
            );
            assert!(SandboxId::new(id).is_ok());
        }
    }
}
