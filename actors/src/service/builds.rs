//! Template builds (E2B's `Template.build`): see [`crate::build`] for the
//! model. This side runs a build's steps in a build sandbox of this node,
//! keeps its status and log for the status endpoint, and publishes layers
//! and the finished template to the object store:
//!
//! ```text
//! template-files/<template>/<hash>    a COPY step's uploaded tar
//! template-layers/<key>               files after a step (filesystem-only copy)
//! user-templates/<template>/<build>   a finished build (a full copy: creates restore it)
//! ```
//!
//! A build's status and log live on the node that runs it (a finished
//! build is in the store, which every node reads); a template is served by
//! every node of the store.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use schema::e2b::{TemplateBuild, TemplateBuildStatus, TemplateInfo};
use schema::template::{
    BuildLogEntry, BuildRequest, BuildRequestAnswer, BuildStart, BuildStatus, BuildStatusReason,
    MAX_LOG_ENTRIES, StepKind,
};
use tokio::sync::watch;

use super::*;
use crate::build::{self, BuildLog, BuildState, COPY_ARCHIVE, COPY_SCRIPT};
use crate::objects::{KnownChunks, ObjectsError, SnapshotMetadata};
use crate::runtime::{Limits, Snapshot};
use crate::sandbox::process::{self, Output};
use crate::template_cache::{MEMORY_MIB, VCPUS, new_uuid};

/// The metadata key that marks a build sandbox (its value: the build id);
/// sandbox lists leave such sandboxes out.
pub const BUILD_METADATA: &str = "sandmesh.build";

const FILES: &str = "template-files";
const LAYERS: &str = "template-layers";
const TEMPLATES: &str = "user-templates";
const TAGS: &str = "user-template-tags";
const BUILDS: &str = "template-builds";

/// The port of the build proxy in the build sandbox's network.
const PROXY_PORT: u16 = 3128;
/// Where the extra CA certificates of build steps go in the build sandbox
/// (tmpfs: never in a layer or the template).
const CA_FILE: &str = "/tmp/.sandmesh-build-ca.pem";
/// Longest wait for a template's ready command.
const READY_WAIT: Duration = Duration::from_secs(600);
/// How often the ready command is tried.
const READY_EVERY: Duration = Duration::from_secs(1);

/// How long a build sandbox outlives its build's deadline.
const SANDBOX_GRACE: Duration = Duration::from_secs(20);
/// How often a running step's disk use is checked.
const DISK_CHECK_EVERY: Duration = Duration::from_secs(2);

/// Template builds on a node.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    /// The longest a build may run; its sandbox is killed then.
    pub timeout: Duration,
    /// The most a build may write to its sandbox's disk, in bytes.
    pub max_disk: u64,
    /// Largest COPY upload, in bytes (413 beyond).
    pub max_upload: u64,
    /// Extra CA certificates (PEM) that build steps trust, for hosts whose
    /// egress goes through a TLS-intercepting proxy.
    pub ca_bundle: Option<PathBuf>,
}

impl Default for BuildOptions {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(3600),
            max_disk: 10 << 30,
            max_upload: 1 << 30,
            ca_bundle: None,
        }
    }
}

/// A build this node was asked for (`POST /v3/templates`) or runs.
#[derive(Debug)]
pub(super) struct BuildEntry {
    template: String,
    tags: Vec<String>,
    limits: Option<Limits>,
    status: TemplateBuildStatus,
    reason: Option<BuildStatusReason>,
    log: BuildLog,
    created_ms: u64,
}

/// Builds a node remembers at most, and how long a build that never
/// started waits for its steps.
const KEPT_BUILDS: usize = 200;
const UNSTARTED_FOR_MS: u64 = 24 * 3600 * 1000;

/// Forget the oldest finished builds beyond [`KEPT_BUILDS`] and builds
/// requested a day ago and never started (their logs are memory; a
/// finished build's template is in the store either way).
fn forget_old_builds(builds: &mut HashMap<String, BuildEntry>, now: u64) {
    builds.retain(|_, b| {
        b.status != TemplateBuildStatus::Waiting
            || now.saturating_sub(b.created_ms) < UNSTARTED_FOR_MS
    });
    let mut finished: Vec<(u64, String)> = builds
        .iter()
        .filter(|(_, b)| {
            matches!(
                b.status,
                TemplateBuildStatus::Ready | TemplateBuildStatus::Error
            )
        })
        .map(|(id, b)| (b.created_ms, id.clone()))
        .collect();
    if builds.len() > KEPT_BUILDS {
        finished.sort();
        let excess = builds.len() - KEPT_BUILDS;
        for (_, id) in finished.into_iter().take(excess) {
            builds.remove(&id);
        }
    }
}

/// What a finished build's manifest carries (metadata `extra`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct BuiltTemplate {
    template: String,
    build_id: String,
    tags: Vec<String>,
    /// The node template it builds on (`base`).
    root: String,
    /// The last layer of its files (what a build on it starts from).
    layer: Option<String>,
    state: BuildState,
    vcpus: u32,
    memory_mib: u64,
    created_ms: u64,
    finished_ms: u64,
    /// The build sandbox's record (its envd token is the copy's).
    record: SandboxRecord,
    /// The build id of the root's tree (`etc/sandmesh-build-id`) it was
    /// built over: its memory image restores over that tree only. `None`:
    /// a record from before this was kept, or a root without one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    root_build: Option<String>,
}

/// What a layer's manifest carries.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct LayerInfo {
    root: String,
    state: BuildState,
}

use serde::{Deserialize, Serialize};

/// A user template's build, as a create needs it.
pub(super) struct UserTemplate {
    pub entry: TemplateEntry,
    pub dir: PathBuf,
    pub limits: Limits,
    pub token: String,
}

fn bad(msg: impl Into<String>) -> SandboxError {
    SandboxError::BadRequest(msg.into())
}

fn is_tag(t: &str) -> bool {
    !t.is_empty()
        && t.len() <= 64
        && t.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-')
        })
}

/// `name` or `name:tag`, checked.
pub fn split_name(full: &str) -> Result<(String, Option<String>), SandboxError> {
    let (name, tag) = match full.split_once(':') {
        Some((n, t)) => (n, Some(t)),
        None => (full, None),
    };
    TemplateId::new(name).map_err(|e| bad(e.to_string()))?;
    if is_snapshot_id(name) {
        return Err(bad(format!(
            "template name {name:?} is reserved for snapshots: choose another"
        )));
    }
    if let Some(t) = tag
        && !is_tag(t)
    {
        return Err(bad(format!(
            "tag {t:?}: 1 to 64 of a-z, 0-9, '.', '_' and '-'"
        )));
    }
    Ok((name.to_owned(), tag.map(str::to_owned)))
}

impl Sandboxes {
    fn objects_for_builds(&self) -> Result<crate::objects::SnapshotStore, SandboxError> {
        self.inner.shared.objects.clone().ok_or_else(|| {
            SandboxError::NotImplemented(
                "template builds need an object store: start the node with --object-store".into(),
            )
        })
    }

    /// `POST /v3/templates`: a new build of template `name` (created with
    /// its first build), waiting for its steps.
    pub async fn request_build(
        &self,
        req: BuildRequest,
    ) -> Result<BuildRequestAnswer, SandboxError> {
        self.objects_for_builds()?;
        let full = req
            .name
            .or(req.alias)
            .ok_or_else(|| bad("give the template a name"))?;
        let (name, tag) = split_name(&full)?;
        if self.template(&name).await?.is_some() {
            return Err(bad(format!(
                "template {name} is one of the node's own (from its configuration): choose another name"
            )));
        }
        let mut tags: Vec<String> = tag.into_iter().collect();
        for t in req.tags.unwrap_or_default() {
            if !is_tag(&t) {
                return Err(bad(format!(
                    "tag {t:?}: 1 to 64 of a-z, 0-9, '.', '_' and '-'"
                )));
            }
            if !tags.contains(&t) {
                tags.push(t);
            }
        }
        let limits = match (req.cpu_count, req.memory_mb) {
            (None, None) => None,
            (cpu, mem) => {
                let d = Limits::default();
                let vcpus = cpu.unwrap_or(d.vcpus);
                let memory_mib = mem.unwrap_or(d.memory_mib);
                if !VCPUS.contains(&vcpus) {
                    return Err(bad(format!("cpuCount {vcpus} must be in 1..=16")));
                }
                if !MEMORY_MIB.contains(&memory_mib) {
                    return Err(bad(format!("memoryMB {memory_mib} must be in 128..=32768")));
                }
                Some(Limits { vcpus, memory_mib })
            }
        };
        let build_id = new_uuid()?;
        {
            let mut builds = self.inner.builds.lock().unwrap();
            forget_old_builds(&mut builds, now_ms());
            builds.insert(
                build_id.clone(),
                BuildEntry {
                    template: name.clone(),
                    tags: tags.clone(),
                    limits,
                    status: TemplateBuildStatus::Waiting,
                    reason: None,
                    log: BuildLog::default(),
                    created_ms: now_ms(),
                },
            );
        }
        // Where the build runs, for the other nodes (a balancer may send
        // its start and status calls to any of them).
        self.write_marker(
            &format!("{BUILDS}/{build_id}"),
            "template-build",
            serde_json::json!({ "node": self.inner.shared.node_id, "template": name }),
        )
        .await?;
        tracing::info!(template = %name, build = %build_id, "template build requested");
        Ok(BuildRequestAnswer {
            template_id: name.clone(),
            build_id,
            public: false,
            names: vec![name.clone()],
            tags,
            aliases: vec![name],
        })
    }

    fn files_object(template: &str, hash: &str) -> Result<String, SandboxError> {
        TemplateId::new(template).map_err(|e| bad(e.to_string()))?;
        if !build::is_files_hash(hash) {
            return Err(bad(format!(
                "files hash {hash:?}: 64 lowercase hex digits (SHA-256)"
            )));
        }
        Ok(format!("{FILES}/{template}/{hash}"))
    }

    /// Whether the COPY files `hash` of `template` are stored already.
    pub async fn build_files_present(
        &self,
        template: &str,
        hash: &str,
    ) -> Result<bool, SandboxError> {
        let objects = self.objects_for_builds()?;
        let name = Self::files_object(template, hash)?;
        match objects.manifest(&name).await {
            Ok(_) => Ok(true),
            Err(ObjectsError::NotFound { .. }) => Ok(false),
            Err(e) => Err(SandboxError::ObjectStore(format!(
                "the object store ({}): {e}",
                objects.describe()
            ))),
        }
    }

    /// Largest COPY upload this node takes.
    pub fn max_build_upload(&self) -> u64 {
        self.inner.config.builds.max_upload
    }

    /// A directory for an upload in progress (the caller writes
    /// `context.tar` in it, then calls [`Sandboxes::store_build_files`]).
    pub fn build_upload_dir(&self) -> Result<PathBuf, SandboxError> {
        let dir = self
            .inner
            .shared
            .snapshots_dir
            .join(format!("upload-{}", hex::encode(random_bytes(8)?)));
        std::fs::create_dir_all(&dir)
            .map_err(|e| SandboxError::Io(format!("creating {}: {e}", dir.display())))?;
        Ok(dir)
    }

    /// Store the uploaded `dir` (holding `context.tar`) as the COPY files
    /// `hash` of `template`; `dir` is removed.
    pub async fn store_build_files(
        &self,
        template: &str,
        hash: &str,
        dir: &Path,
    ) -> Result<(), SandboxError> {
        let result = async {
            let objects = self.objects_for_builds()?;
            let name = Self::files_object(template, hash)?;
            let metadata = SnapshotMetadata {
                kind: "template-files".into(),
                template_id: Some(template.to_owned()),
                runtime: None,
                sandbox_id: None,
                extra: serde_json::Value::Null,
            };
            objects
                .put_dir(dir, &name, metadata, &KnownChunks::new())
                .await
                .map_err(|e| {
                    SandboxError::ObjectStore(format!(
                        "storing the upload in the object store ({}): {e}",
                        objects.describe()
                    ))
                })?;
            Ok(())
        }
        .await;
        let _ = std::fs::remove_dir_all(dir);
        result
    }

    /// `POST /v2/templates/{id}/builds/{buildID}`: check the steps and run
    /// the build in the background.
    pub async fn start_build(
        &self,
        template: &str,
        build_id: &str,
        start: BuildStart,
    ) -> Result<(), SandboxError> {
        {
            let builds = self.inner.builds.lock().unwrap();
            let Some(entry) = builds.get(build_id).filter(|b| b.template == template) else {
                return Err(SandboxError::NotFound(format!(
                    "build {build_id} of template {template}"
                )));
            };
            if entry.status != TemplateBuildStatus::Waiting {
                return Err(bad(format!("build {build_id} was started already")));
            }
        }
        build::check_steps(&start.steps).map_err(|e| bad(e.to_string()))?;
        let base = self.build_base(&start).await?;
        {
            let mut builds = self.inner.builds.lock().unwrap();
            let Some(entry) = builds.get_mut(build_id) else {
                return Err(SandboxError::NotFound(format!("build {build_id}")));
            };
            if entry.status != TemplateBuildStatus::Waiting {
                return Err(bad(format!("build {build_id} was started already")));
            }
            entry.status = TemplateBuildStatus::Building;
            if let Base::Ready(b) = &base
                && let Some(note) = &b.note
            {
                entry.log.push(LogLevel::Info, "base", note.clone());
            }
        }
        let me = self.clone();
        let build_id = build_id.to_owned();
        tokio::spawn(async move {
            let base = match base {
                Base::Ready(b) => Ok(*b),
                Base::Pull { image, auth } => me
                    .pulled_base(&build_id, &image, auth)
                    .await
                    .map_err(|e| Failure::new("base", e)),
            };
            let outcome = match base {
                Ok(base) => me.run_build(&build_id, start, base).await,
                Err(e) => Err(e),
            };
            let mut builds = me.inner.builds.lock().unwrap();
            if let Some(entry) = builds.get_mut(&build_id) {
                match outcome {
                    Ok(()) => {
                        entry.log.push(
                            LogLevel::Info,
                            "finalize",
                            "Build finished: the template is ready",
                        );
                        entry.status = TemplateBuildStatus::Ready;
                    }
                    Err(failure) => {
                        let tail = entry.log.tail(&failure.step, 20);
                        entry
                            .log
                            .push(LogLevel::Error, &failure.step, failure.message.clone());
                        entry.status = TemplateBuildStatus::Error;
                        entry.reason = Some(BuildStatusReason {
                            message: failure.message,
                            step: Some(failure.step),
                            log_entries: tail,
                        });
                    }
                }
                tracing::info!(build = %build_id, status = ?entry.status, "template build ended");
            }
        });
        Ok(())
    }

    /// What a build starts from.
    async fn build_base(&self, start: &BuildStart) -> Result<Base, SandboxError> {
        let (from, note) = match (&start.from_template, &start.from_image) {
            (Some(t), _) => (t.clone(), None),
            (None, Some(image)) => match mapped_image(image) {
                Some(t) => (
                    t.to_owned(),
                    Some(format!(
                        "FROM {image}: Docker Hub is not pulled from; mapped to template {t} (Debian bookworm with Python)"
                    )),
                ),
                None => {
                    crate::build::image::ImageRef::parse(image).map_err(|e| bad(e.to_string()))?;
                    return Ok(Base::Pull {
                        image: image.clone(),
                        auth: registry_auth(start.from_image_registry.as_ref())?,
                    });
                }
            },
            (None, None) => ("base".to_owned(), None),
        };
        if let Some(entry) = self.template(&from).await? {
            let name = super::templates::object_name(
                &*self.inner.shared.runtime,
                &entry.template,
                entry.limits,
                &self.inner.shared.node_id,
            );
            return Ok(Base::Ready(Box::new(BuildBase {
                root: entry,
                key: build::root_key(&name, None),
                state: BuildState::default(),
                layer: None,
                note,
            })));
        }
        let (name, tag) = split_name(&from)?;
        let Some((built, _)) = self.latest_build(&name, tag.as_deref()).await? else {
            return Err(SandboxError::UnknownTemplate(
                from.clone(),
                self.served_names().await,
            ));
        };
        let root = self.root_entry(&built.root).await?;
        Ok(Base::Ready(Box::new(BuildBase {
            root,
            key: build::root_key(&built.root, Some(&built.build_id)),
            state: built.state.clone(),
            layer: built.layer.clone(),
            note,
        })))
    }

    /// The node template or image root a user template is built over.
    async fn root_entry(&self, name: &str) -> Result<TemplateEntry, SandboxError> {
        match self.ensure_image_root(name).await? {
            Some(e) => Ok(e),
            None => self.inner.shared.template(name).await,
        }
    }

    /// Pull the image a build starts from; what the build then starts
    /// from.
    async fn pulled_base(
        &self,
        build_id: &str,
        image: &str,
        auth: Option<(String, String)>,
    ) -> Result<BuildBase, SandboxError> {
        self.log(build_id, LogLevel::Info, "base", format!("pulling {image}"));
        let started = Instant::now();
        let pulled = self.pull_image(image, auth).await?;
        let config = &pulled.config;
        self.log(
            build_id,
            LogLevel::Info,
            "base",
            format!(
                "pulled {image} ({}) in {:.1}s",
                config.digest,
                started.elapsed().as_secs_f64()
            ),
        );
        for note in &pulled.notes {
            self.log(build_id, LogLevel::Info, "base", note.clone());
        }
        let mut state = BuildState {
            env: config.env.iter().cloned().collect(),
            ..Default::default()
        };
        if let Some(w) = &config.workdir {
            state.workdir = w.clone();
        }
        if let Some(u) = &config.user {
            state.user = u.clone();
        }
        Ok(BuildBase {
            root: pulled.entry,
            key: build::root_key(&format!("image {}", config.config_digest), None),
            state,
            layer: None,
            note: None,
        })
    }

    async fn served_names(&self) -> String {
        self.templates()
            .await
            .map(|t| {
                t.iter()
                    .map(|e| e.name().to_owned())
                    .collect::<Vec<_>>()
                    .join(", ")
            })
            .unwrap_or_default()
    }

    fn log(&self, build_id: &str, level: LogLevel, step: &str, msg: impl Into<String>) {
        if let Some(e) = self.inner.builds.lock().unwrap().get_mut(build_id) {
            e.log.push(level, step, msg);
        }
    }

    fn log_output(&self, build_id: &str, step: &str, bytes: &[u8]) {
        if let Some(e) = self.inner.builds.lock().unwrap().get_mut(build_id) {
            e.log.output(step, bytes);
        }
    }

    fn log_flush(&self, build_id: &str, step: &str) {
        if let Some(e) = self.inner.builds.lock().unwrap().get_mut(build_id) {
            e.log.flush(step);
        }
    }

    /// Run a build to its end; the build sandbox is gone afterwards.
    async fn run_build(
        &self,
        build_id: &str,
        start: BuildStart,
        base: BuildBase,
    ) -> Result<(), Failure> {
        let objects = self
            .objects_for_builds()
            .map_err(|e| Failure::new("base", e))?;
        let (template, tags, limits, created_ms) = {
            let builds = self.inner.builds.lock().unwrap();
            let e = builds
                .get(build_id)
                .ok_or_else(|| Failure::new("base", "the build is gone"))?;
            (e.template.clone(), e.tags.clone(), e.limits, e.created_ms)
        };
        let limits = limits.unwrap_or(base.root.limits);
        let deadline = Instant::now() + self.inner.config.builds.timeout;
        let steps = &start.steps;
        let n = steps.len();
        // The key after each step, and the last step the cache may serve.
        let mut keys = Vec::with_capacity(n);
        let mut parent = base.key.clone();
        for s in steps {
            parent = build::layer_key(&parent, s);
            keys.push(parent.clone());
        }
        let first_forced = if start.force {
            0
        } else {
            steps.iter().position(|s| s.force).unwrap_or(n)
        };
        let mut cached: Option<(usize, LayerInfo)> = None;
        for i in (0..first_forced).rev() {
            let kind = StepKind::parse(&steps[i].kind).expect("checked");
            if !build::changes_files(kind) {
                continue;
            }
            if let Ok(m) = objects.manifest(&format!("{LAYERS}/{}", keys[i])).await
                && let Ok(info) = serde_json::from_value::<LayerInfo>(m.metadata.extra.clone())
            {
                cached = Some((i, info));
                break;
            }
        }
        let mut state = base.state.clone();
        let mut layer = base.layer.clone();
        let mut next = 0;
        if let Some((i, info)) = cached {
            for (j, s) in steps.iter().enumerate().take(i + 1) {
                self.log(
                    build_id,
                    LogLevel::Info,
                    &(j + 1).to_string(),
                    format!("CACHED [{}/{n}] {}", j + 1, describe(s)),
                );
            }
            state = info.state;
            layer = Some(keys[i].clone());
            next = i + 1;
        }
        // The build sandbox.
        let sandbox = self
            .build_sandbox(build_id, &base.root, limits, layer.as_deref(), deadline)
            .await
            .map_err(|e| Failure::new("base", format!("starting the build sandbox: {e}")))?;
        let result = self
            .run_steps(
                build_id, &template, &sandbox, &start, &keys, next, &mut state, &mut layer, &base,
                deadline,
            )
            .await;
        let result = match result {
            Ok(()) => {
                self.finish_build(
                    build_id, &template, &tags, &sandbox, &start, &state, layer, &base, limits,
                    created_ms, deadline,
                )
                .await
            }
            Err(e) => Err(e),
        };
        sandbox.stop_proxy().await;
        if let Err(e) = self.kill(&sandbox.id).await {
            tracing::warn!(build = %build_id, sandbox = %sandbox.id, "killing the build sandbox: {e}");
        }
        result
    }

    /// Start the build sandbox over `root`, with the files of `layer`.
    async fn build_sandbox(
        &self,
        build_id: &str,
        root: &TemplateEntry,
        limits: Limits,
        layer: Option<&str>,
        deadline: Instant,
    ) -> Result<BuildSandbox, SandboxError> {
        // A grace past the build's deadline: a step's own time-out (envd
        // kills its process) ends it first, and the build says so.
        let end_at_ms = now_ms()
            + (deadline.saturating_duration_since(Instant::now()) + SANDBOX_GRACE).as_millis()
                as u64;
        let mut record = self.new_record(root.name(), end_at_ms, limits)?;
        record
            .metadata
            .insert(BUILD_METADATA.into(), build_id.to_owned());
        let token = record.envd_access_token.clone();
        let id = record.id.clone();
        let _slot = self.reserve_slot(None)?;
        let start = match layer {
            None => Start::Create {
                template: root.template.clone(),
                limits,
                env_vars: BTreeMap::new(),
            },
            Some(key) => {
                let dir = self
                    .fetch_cached(&format!("{LAYERS}/{key}"), &format!("layer-{key}"))
                    .await?;
                Start::BootWithFiles {
                    template: root.template.clone(),
                    files: Snapshot {
                        dir,
                        template: root.template.id.clone(),
                        runtime: self.inner.shared.runtime.kind(),
                    },
                    limits,
                    env_vars: BTreeMap::new(),
                }
            }
        };
        self.start_sandbox(record, start).await?;
        drop(_slot);
        let sid = SandboxId::new(id.clone()).map_err(RuntimeError::from)?;
        let mut sandbox = BuildSandbox {
            id,
            sid,
            token,
            env: BTreeMap::new(),
            proxy_stop: std::sync::Mutex::new(None),
        };
        self.start_proxy(build_id, &mut sandbox).await;
        Ok(sandbox)
    }

    /// Serve the build sandbox its egress proxy (again after each copy: a
    /// copy restores the sandbox into a new network) and, the first time,
    /// the extra CAs.
    async fn start_proxy(&self, build_id: &str, sandbox: &mut BuildSandbox) {
        let runtime = self.inner.shared.runtime.clone();
        if let Some(addr) = self.listen_proxy(build_id, sandbox).await {
            let url = format!("http://{addr}");
            for k in ["http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"] {
                sandbox.env.insert(k.into(), url.clone());
            }
            sandbox
                .env
                .insert("no_proxy".into(), "localhost,127.0.0.1,::1".into());
        }
        if let Some(ca) = &self.inner.config.builds.ca_bundle {
            match std::fs::read(ca) {
                Ok(pem) => {
                    let wrote = process::write_file(
                        &*runtime,
                        &sandbox.sid,
                        &sandbox.token,
                        CA_FILE,
                        "root",
                        pem.into(),
                    )
                    .await;
                    match wrote {
                        Ok(()) => {
                            for k in [
                                "SSL_CERT_FILE",
                                "PIP_CERT",
                                "REQUESTS_CA_BUNDLE",
                                "CURL_CA_BUNDLE",
                                "GIT_SSL_CAINFO",
                                "NODE_EXTRA_CA_CERTS",
                            ] {
                                sandbox.env.insert(k.into(), CA_FILE.into());
                            }
                        }
                        Err(e) => self.log(
                            build_id,
                            LogLevel::Warn,
                            "base",
                            format!("the build's CA bundle: {e}"),
                        ),
                    }
                }
                Err(e) => self.log(
                    build_id,
                    LogLevel::Warn,
                    "base",
                    format!("reading the build's CA bundle {}: {e}", ca.display()),
                ),
            }
        }
    }

    /// Listen for the build sandbox's proxy connections; the address the
    /// sandbox reaches it at.
    async fn listen_proxy(
        &self,
        build_id: &str,
        sandbox: &BuildSandbox,
    ) -> Option<std::net::SocketAddr> {
        sandbox.stop_proxy().await;
        match self
            .inner
            .shared
            .runtime
            .host_listener(&sandbox.sid, PROXY_PORT)
            .await
        {
            Ok((listener, addr)) => {
                let (stop_tx, stop) = watch::channel(false);
                let serving = tokio::spawn(build::proxy::serve(listener, stop));
                *sandbox.proxy_stop.lock().unwrap() = Some((stop_tx, serving));
                Some(addr)
            }
            Err(e) => {
                self.log(
                    build_id,
                    LogLevel::Warn,
                    "base",
                    format!("build steps have no network: {e}"),
                );
                None
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn run_steps(
        &self,
        build_id: &str,
        template: &str,
        sandbox: &BuildSandbox,
        start: &BuildStart,
        keys: &[String],
        from: usize,
        state: &mut BuildState,
        layer: &mut Option<String>,
        base: &BuildBase,
        deadline: Instant,
    ) -> Result<(), Failure> {
        let runtime = self.inner.shared.runtime.clone();
        let n = start.steps.len();
        for (i, s) in start.steps.iter().enumerate().skip(from) {
            let label = (i + 1).to_string();
            let kind = StepKind::parse(&s.kind).expect("checked");
            self.log(
                build_id,
                LogLevel::Info,
                &label,
                format!("[{}/{n}] {}", i + 1, describe(s)),
            );
            let started = Instant::now();
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Failure::new(&label, "the build ran out of time"));
            }
            match kind {
                StepKind::Env => {
                    for kv in s.args.chunks(2) {
                        state.env.insert(kv[0].clone(), kv[1].clone());
                    }
                }
                StepKind::User => state.user = s.args[0].clone(),
                StepKind::Workdir => {
                    let dir = build::resolve(&state.workdir, &s.args[0]);
                    let dir = dir.trim_end_matches('/');
                    let dir = if dir.is_empty() { "/" } else { dir }.to_owned();
                    let mut env = BTreeMap::new();
                    env.insert("DIR".to_owned(), dir.clone());
                    self.exec(
                        build_id,
                        &label,
                        sandbox,
                        "mkdir -p \"$DIR\"",
                        "root",
                        Some("/"),
                        &env,
                        left,
                    )
                    .await?;
                    state.workdir = dir;
                }
                StepKind::Run => {
                    let user = s
                        .args
                        .get(1)
                        .filter(|u| !u.is_empty())
                        .unwrap_or(&state.user)
                        .clone();
                    let mut env = state.env.clone();
                    env.extend(sandbox.env.clone());
                    let cwd = state.workdir.clone();
                    self.exec(
                        build_id,
                        &label,
                        sandbox,
                        &s.args[0],
                        &user,
                        Some(&cwd),
                        &env,
                        left,
                    )
                    .await?;
                }
                StepKind::Copy => {
                    let hash = s.files_hash.as_deref().expect("checked");
                    let tar = self
                        .fetch_cached(
                            &Self::files_object(template, hash)
                                .map_err(|e| Failure::new(&label, e))?,
                            &format!("files-{template}-{hash}"),
                        )
                        .await
                        .map_err(|e| {
                            Failure::new(
                                &label,
                                format!("the files of this COPY were not uploaded: {e}"),
                            )
                        })?;
                    let bytes = std::fs::read(tar.join("context.tar")).map_err(|e| {
                        Failure::new(&label, format!("reading the uploaded files: {e}"))
                    })?;
                    process::write_file(
                        &*runtime,
                        &sandbox.sid,
                        &sandbox.token,
                        COPY_ARCHIVE,
                        "root",
                        bytes.into(),
                    )
                    .await
                    .map_err(|e| Failure::new(&label, e))?;
                    let mut env = BTreeMap::new();
                    env.insert("ARCHIVE".to_owned(), COPY_ARCHIVE.to_owned());
                    env.insert("SRC".to_owned(), s.args[0].clone());
                    env.insert(
                        "DEST".to_owned(),
                        build::resolve(&state.workdir, &s.args[1]),
                    );
                    let owner = s
                        .args
                        .get(2)
                        .filter(|o| !o.is_empty())
                        .unwrap_or(&state.user);
                    env.insert("OWNER".to_owned(), owner.clone());
                    env.insert(
                        "MODE".to_owned(),
                        s.args.get(3).cloned().unwrap_or_default(),
                    );
                    self.exec(
                        build_id,
                        &label,
                        sandbox,
                        COPY_SCRIPT,
                        "root",
                        Some("/"),
                        &env,
                        left,
                    )
                    .await?;
                }
            }
            if build::changes_files(kind) {
                self.save_layer(
                    build_id,
                    &label,
                    sandbox,
                    &keys[i],
                    layer.as_deref(),
                    state,
                    &base.root,
                )
                .await?;
                *layer = Some(keys[i].clone());
            }
            self.log(
                build_id,
                LogLevel::Info,
                &label,
                format!(
                    "[{}/{n}] done in {:.1}s",
                    i + 1,
                    started.elapsed().as_secs_f64()
                ),
            );
        }
        Ok(())
    }

    /// Run `script` in the build sandbox; a non-zero exit fails the step.
    #[allow(clippy::too_many_arguments)]
    async fn exec(
        &self,
        build_id: &str,
        label: &str,
        sandbox: &BuildSandbox,
        script: &str,
        user: &str,
        cwd: Option<&str>,
        env: &BTreeMap<String, String>,
        timeout: Duration,
    ) -> Result<(), Failure> {
        let cmd = process::Command {
            script,
            user,
            cwd,
            envs: env,
            timeout: Some(timeout),
        };
        let started = Instant::now();
        let run = process::run(
            &*self.inner.shared.runtime,
            &sandbox.sid,
            &sandbox.token,
            &cmd,
            true,
            |_: Output, bytes: &[u8]| self.log_output(build_id, label, bytes),
        );
        // The build's disk: its sandbox's writable layer, watched while
        // the step runs (the step is abandoned, and the build fails and
        // kills its sandbox, once it is over).
        let max_disk = self.inner.config.builds.max_disk;
        let watch_disk = async {
            loop {
                tokio::time::sleep(DISK_CHECK_EVERY).await;
                if let Ok(usage) = self.inner.shared.runtime.usage(&sandbox.sid).await
                    && usage.disk_bytes > max_disk
                {
                    return usage.disk_bytes;
                }
            }
        };
        // A last resort should envd never answer.
        let run = tokio::time::timeout(timeout + SANDBOX_GRACE, run);
        let ended = tokio::select! {
            ended = run => ended.unwrap_or_else(|_| Err("envd stopped answering".into())),
            used = watch_disk => {
                self.log_flush(build_id, label);
                return Err(Failure::new(label, format!(
                    "step {label} stopped: the build ran out of disk ({} MiB written, the node allows {} MiB: --build-disk-mb)",
                    used >> 20, max_disk >> 20
                )));
            }
        };
        self.log_flush(build_id, label);
        if started.elapsed() + Duration::from_millis(100) >= timeout {
            return Err(Failure::new(
                label,
                format!(
                    "step {label} stopped: the build ran out of time (the node allows {}s: --build-timeout)",
                    self.inner.config.builds.timeout.as_secs()
                ),
            ));
        }
        match ended {
            Ok(Some(e)) if e.exit_code == 0 => Ok(()),
            Ok(Some(e)) => Err(Failure::new(
                label,
                format!("step {label} failed: exit code {}", e.exit_code),
            )),
            Ok(None) => Ok(()),
            Err(e) => Err(Failure::new(label, format!("step {label}: {e}"))),
        }
    }

    /// Publish the build sandbox's files as layer `key`.
    #[allow(clippy::too_many_arguments)]
    async fn save_layer(
        &self,
        build_id: &str,
        label: &str,
        sandbox: &BuildSandbox,
        key: &str,
        previous: Option<&str>,
        state: &BuildState,
        root: &TemplateEntry,
    ) -> Result<(), Failure> {
        let objects = self
            .objects_for_builds()
            .map_err(|e| Failure::new(label, e))?;
        // No connection may be open through the proxy while the sandbox
        // is saved; the copy restores it into a new network, where the
        // proxy listens again.
        sandbox.stop_proxy().await;
        let copied = self.copy_retrying(&sandbox.id, "layer", true).await;
        if sandbox.env.contains_key("http_proxy") {
            self.listen_proxy(build_id, sandbox).await;
        }
        let dir =
            copied.map_err(|e| Failure::new(label, format!("saving the step's files: {e}")))?;
        let mut known = Vec::new();
        if let Some(p) = previous
            && let Ok(m) = objects.manifest(&format!("{LAYERS}/{p}")).await
        {
            known.push(m);
        }
        let info = LayerInfo {
            root: root.name().to_owned(),
            state: state.clone(),
        };
        let metadata = SnapshotMetadata {
            kind: "template-layer".into(),
            template_id: Some(root.name().to_owned()),
            runtime: Some(self.inner.shared.runtime.kind().to_string()),
            sandbox_id: None,
            extra: serde_json::to_value(&info).unwrap_or_default(),
        };
        let published = objects
            .put_dir(
                &dir,
                &format!("{LAYERS}/{key}"),
                metadata,
                &KnownChunks::from_manifests(&known),
            )
            .await;
        let cache = self.inner.shared.snapshots_dir.join(format!("layer-{key}"));
        let _ = std::fs::remove_dir_all(&cache);
        if std::fs::rename(&dir, &cache).is_err() {
            let _ = std::fs::remove_dir_all(&dir);
        }
        let (_, stats) = published.map_err(|e| {
            Failure::new(
                label,
                format!(
                    "publishing the layer to the object store ({}): {e}",
                    objects.describe()
                ),
            )
        })?;
        self.log(
            build_id,
            LogLevel::Debug,
            label,
            format!(
                "layer {} saved: {} chunks uploaded, {} already stored",
                &key[..12],
                stats.uploaded_chunks,
                stats.deduplicated_chunks
            ),
        );
        Ok(())
    }

    /// [`Sandboxes::copy`], retried while the runtime refuses (a TCP
    /// connection of a step still closing).
    async fn copy_retrying(
        &self,
        id: &str,
        what: &str,
        files_only: bool,
    ) -> Result<PathBuf, SandboxError> {
        let mut tries = 0;
        loop {
            match self.copy(id, what, files_only).await {
                Ok((_, dir)) => return Ok(dir),
                Err(SandboxError::PauseRefused(..))
                | Err(SandboxError::Runtime(RuntimeError::CheckpointRefused { .. }))
                    if tries < 10 =>
                {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Start command, ready command, envd's defaults; then publish the
    /// whole build sandbox as the template's build.
    #[allow(clippy::too_many_arguments)]
    async fn finish_build(
        &self,
        build_id: &str,
        template: &str,
        tags: &[String],
        sandbox: &BuildSandbox,
        start: &BuildStart,
        state: &BuildState,
        layer: Option<String>,
        base: &BuildBase,
        limits: Limits,
        created_ms: u64,
        deadline: Instant,
    ) -> Result<(), Failure> {
        const STEP: &str = "finalize";
        let runtime = self.inner.shared.runtime.clone();
        // No proxy in the template: its sandboxes get their network from
        // the node's networking, not the build's.
        sandbox.stop_proxy().await;
        process::set_defaults(
            &*runtime,
            &sandbox.sid,
            &sandbox.token,
            &state.env,
            &state.user,
            &state.workdir,
        )
        .await
        .map_err(|e| Failure::new(STEP, e))?;
        if let Some(cmd) = start.start_cmd.as_deref().filter(|c| !c.trim().is_empty()) {
            self.log(
                build_id,
                LogLevel::Info,
                STEP,
                format!("start command: {cmd}"),
            );
            let c = process::Command {
                script: cmd,
                user: &state.user,
                cwd: Some(&state.workdir),
                envs: &state.env,
                // It runs for the sandbox's life: no deadline.
                timeout: None,
            };
            process::run(
                &*runtime,
                &sandbox.sid,
                &sandbox.token,
                &c,
                false,
                |_, _| {},
            )
            .await
            .map_err(|e| Failure::new(STEP, format!("the start command did not start: {e}")))?;
        }
        if let Some(ready) = start.ready_cmd.as_deref().filter(|c| !c.trim().is_empty()) {
            self.log(
                build_id,
                LogLevel::Info,
                STEP,
                format!("waiting for the ready command: {ready}"),
            );
            let until = (Instant::now() + READY_WAIT).min(deadline);
            loop {
                let left = until.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(Failure::new(
                        STEP,
                        format!(
                            "the ready command `{ready}` did not succeed within {}s",
                            READY_WAIT.min(self.inner.config.builds.timeout).as_secs()
                        ),
                    ));
                }
                let c = process::Command {
                    script: ready,
                    user: &state.user,
                    cwd: Some(&state.workdir),
                    envs: &state.env,
                    timeout: Some(left.min(Duration::from_secs(60))),
                };
                let mut out = Vec::new();
                let r = process::run(&*runtime, &sandbox.sid, &sandbox.token, &c, true, |_, b| {
                    out.extend_from_slice(b)
                })
                .await;
                if matches!(r, Ok(Some(ref e)) if e.exit_code == 0) {
                    break;
                }
                tokio::time::sleep(READY_EVERY).await;
            }
            self.log(build_id, LogLevel::Info, STEP, "ready");
        }
        self.log(
            build_id,
            LogLevel::Info,
            STEP,
            "saving the template snapshot",
        );
        let objects = self
            .objects_for_builds()
            .map_err(|e| Failure::new(STEP, e))?;
        let (record, dir) = {
            let mut tries = 0;
            loop {
                match self.copy(&sandbox.id, "template", false).await {
                    Ok(r) => break r,
                    Err(SandboxError::PauseRefused(..)) if tries < 10 => {
                        tries += 1;
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                    Err(e) => return Err(Failure::new(STEP, format!("saving the template: {e}"))),
                }
            }
        };
        let built = BuiltTemplate {
            template: template.to_owned(),
            build_id: build_id.to_owned(),
            tags: tags.to_vec(),
            root: base.root.name().to_owned(),
            layer,
            state: state.clone(),
            vcpus: limits.vcpus,
            memory_mib: limits.memory_mib,
            created_ms,
            finished_ms: now_ms(),
            record,
            root_build: super::templates::build_id(&base.root.template.rootfs_dir),
        };
        let metadata = SnapshotMetadata {
            kind: "template".into(),
            template_id: Some(base.root.name().to_owned()),
            runtime: Some(runtime.kind().to_string()),
            sandbox_id: None,
            extra: serde_json::to_value(&built).unwrap_or_default(),
        };
        let mut known = Vec::new();
        known.extend(self.inner.shared.template_manifest(base.root.name()).await);
        let name = format!("{TEMPLATES}/{template}/{build_id}");
        let published = objects
            .put_dir(&dir, &name, metadata, &KnownChunks::from_manifests(&known))
            .await;
        let cache = self.template_cache_dir(template, build_id);
        let _ = std::fs::remove_dir_all(&cache);
        if std::fs::rename(&dir, &cache).is_err() {
            let _ = std::fs::remove_dir_all(&dir);
        }
        published.map_err(|e| {
            Failure::new(
                STEP,
                format!(
                    "publishing the template to the object store ({}): {e}",
                    objects.describe()
                ),
            )
        })?;
        for tag in tags {
            self.write_tag(template, tag, build_id)
                .await
                .map_err(|e| Failure::new(STEP, format!("tagging the build {tag}: {e}")))?;
        }
        Ok(())
    }

    /// Point `tag` of user template `template` at `build_id` (a small
    /// object of its own: tags move between builds, builds never change).
    async fn write_tag(
        &self,
        template: &str,
        tag: &str,
        build_id: &str,
    ) -> Result<(), SandboxError> {
        self.write_marker(
            &format!("{TAGS}/{template}/{tag}"),
            "template-tag",
            serde_json::json!({ "build_id": build_id, "created_ms": now_ms() }),
        )
        .await
    }

    /// A small object of the store: an empty snapshot whose metadata is
    /// `extra`.
    async fn write_marker(
        &self,
        name: &str,
        kind: &str,
        extra: serde_json::Value,
    ) -> Result<(), SandboxError> {
        let objects = self.objects_for_builds()?;
        let empty = self
            .inner
            .shared
            .snapshots_dir
            .join(format!("marker-{}", hex::encode(random_bytes(8)?)));
        std::fs::create_dir_all(&empty)
            .map_err(|e| SandboxError::Io(format!("creating {}: {e}", empty.display())))?;
        let metadata = SnapshotMetadata {
            kind: kind.into(),
            template_id: None,
            runtime: None,
            sandbox_id: None,
            extra,
        };
        let put = objects
            .put_dir(&empty, name, metadata, &KnownChunks::new())
            .await;
        let _ = std::fs::remove_dir_all(&empty);
        put.map_err(|e| {
            SandboxError::ObjectStore(format!("the object store ({}): {e}", objects.describe()))
        })?;
        Ok(())
    }

    /// Whether this node holds build `build_id` (asked for here).
    pub fn has_build(&self, build_id: &str) -> bool {
        self.inner.builds.lock().unwrap().contains_key(build_id)
    }

    /// The node build `build_id` was asked of, as the object store says.
    pub async fn build_node(&self, build_id: &str) -> Option<String> {
        let objects = self.inner.shared.objects.clone()?;
        let ok =
            build_id.len() <= 64 && build_id.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-');
        if !ok {
            return None;
        }
        let m = objects
            .manifest(&format!("{BUILDS}/{build_id}"))
            .await
            .ok()?;
        m.metadata.extra["node"].as_str().map(str::to_owned)
    }

    /// The tags of user template `name`: (tag, build id, when assigned).
    async fn tags_of(&self, name: &str) -> Result<Vec<(String, String, u64)>, SandboxError> {
        let objects = self.objects_for_builds()?;
        let store_error = |e: ObjectsError| {
            SandboxError::ObjectStore(format!(
                "tags in the object store ({}): {e}",
                objects.describe()
            ))
        };
        let prefix = format!("{TAGS}/{name}");
        let mut out = Vec::new();
        for full in objects.list(&prefix).await.map_err(store_error)? {
            let Some(tag) = full.strip_prefix(&format!("{prefix}/")) else {
                continue;
            };
            match objects.manifest(&full).await {
                Ok(m) => {
                    let build = m.metadata.extra["build_id"].as_str().unwrap_or_default();
                    let at = m.metadata.extra["created_ms"].as_u64().unwrap_or_default();
                    out.push((tag.to_owned(), build.to_owned(), at));
                }
                Err(ObjectsError::NotFound { .. }) => continue,
                Err(e) => return Err(store_error(e)),
            }
        }
        Ok(out)
    }

    /// `POST /templates/tags`: `tags` for the build `target` (`name` or
    /// `name:tag`) names.
    pub async fn assign_tags(
        &self,
        target: &str,
        tags: Vec<String>,
    ) -> Result<schema::template::AssignedTags, SandboxError> {
        let (name, tag) = split_name(target)?;
        if tags.is_empty() {
            return Err(bad("give at least one tag"));
        }
        for t in &tags {
            if !is_tag(t) || t == "default" {
                return Err(bad(format!(
                    "tag {t:?}: 1 to 64 of a-z, 0-9, '.', '_' and '-', not `default` (the newest build)"
                )));
            }
        }
        let Some((built, _)) = self.latest_build(&name, tag.as_deref()).await? else {
            return Err(SandboxError::NotFound(format!("template {target}")));
        };
        for t in &tags {
            self.write_tag(&name, t, &built.build_id).await?;
        }
        Ok(schema::template::AssignedTags {
            tags,
            build_id: built.build_id,
        })
    }

    /// `DELETE /templates/tags`: remove `tags` of template `name`.
    pub async fn remove_tags(&self, name: &str, tags: &[String]) -> Result<(), SandboxError> {
        let objects = self.objects_for_builds()?;
        split_name(name)?;
        let have = self.tags_of(name).await?;
        for t in tags {
            if !have.iter().any(|(x, ..)| x == t) {
                return Err(SandboxError::NotFound(format!(
                    "tag {t} of template {name}"
                )));
            }
        }
        for t in tags {
            match objects.delete(&format!("{TAGS}/{name}/{t}")).await {
                Ok(()) | Err(ObjectsError::NotFound { .. }) => {}
                Err(e) => {
                    return Err(SandboxError::ObjectStore(format!(
                        "the object store ({}): {e}",
                        objects.describe()
                    )));
                }
            }
        }
        Ok(())
    }

    /// `GET /templates/{id}/tags`: `default` (the newest build) and every
    /// tag assigned; `None` when there is no such user template.
    pub async fn template_tags(
        &self,
        name: &str,
    ) -> Result<Option<Vec<schema::template::TemplateTag>>, SandboxError> {
        let Some((latest, _)) = self.latest_build(name, None).await? else {
            return Ok(None);
        };
        let mut out = vec![schema::template::TemplateTag {
            tag: "default".into(),
            build_id: latest.build_id.clone(),
            created_at: rfc3339_ms(latest.finished_ms),
        }];
        for (tag, build, at) in self.tags_of(name).await? {
            out.push(schema::template::TemplateTag {
                tag,
                build_id: build,
                created_at: rfc3339_ms(at),
            });
        }
        Ok(Some(out))
    }

    fn template_cache_dir(&self, template: &str, build_id: &str) -> PathBuf {
        self.inner
            .shared
            .snapshots_dir
            .join(format!("tpl-{template}-{build_id}"))
    }

    /// This node's copy of store object `name` in `<snapshots>/<local>`,
    /// fetched the first time.
    async fn fetch_cached(&self, name: &str, local: &str) -> Result<PathBuf, SandboxError> {
        let objects = self.objects_for_builds()?;
        let dir = self.inner.shared.snapshots_dir.join(local);
        let _one = self.inner.snapshot_cache.lock().await;
        if !dir.join("manifest.json").is_file() && !dir.join("context.tar").is_file() {
            let _ = std::fs::remove_dir_all(&dir);
            objects.get_dir(name, &dir, None).await.map_err(|e| {
                SandboxError::ObjectStore(format!(
                    "{name} in the object store ({}): {e}",
                    objects.describe()
                ))
            })?;
        }
        Ok(dir)
    }

    /// Every finished build of user template `name`, newest first.
    async fn builds_of(&self, name: &str) -> Result<Vec<BuiltTemplate>, SandboxError> {
        let Some(objects) = self.inner.shared.objects.clone() else {
            return Ok(Vec::new());
        };
        if TemplateId::new(name).is_err() {
            return Ok(Vec::new());
        }
        let store_error = |e: ObjectsError| {
            SandboxError::ObjectStore(format!(
                "templates in the object store ({}): {e}",
                objects.describe()
            ))
        };
        let mut out = Vec::new();
        for full in objects
            .list(&format!("{TEMPLATES}/{name}"))
            .await
            .map_err(store_error)?
        {
            // A build's manifest never changes once written: read once.
            if let Some(b) = self.inner.built.lock().unwrap().get(&full) {
                out.push(b.clone());
                continue;
            }
            match objects.manifest(&full).await {
                Ok(m) => {
                    if let Ok(b) = serde_json::from_value::<BuiltTemplate>(m.metadata.extra) {
                        self.inner.built.lock().unwrap().insert(full, b.clone());
                        out.push(b);
                    }
                }
                Err(ObjectsError::NotFound { .. }) => continue,
                Err(e) => return Err(store_error(e)),
            }
        }
        out.sort_by_key(|b| std::cmp::Reverse(b.finished_ms));
        Ok(out)
    }

    /// The newest build of user template `name` (with `tag`: tagged so;
    /// `default` is the newest), and how many builds it has.
    async fn latest_build(
        &self,
        name: &str,
        tag: Option<&str>,
    ) -> Result<Option<(BuiltTemplate, usize)>, SandboxError> {
        let all = self.builds_of(name).await?;
        let count = all.len();
        let build = match tag {
            None | Some("default") => None,
            Some(t) => match self.tags_of(name).await?.into_iter().find(|(x, ..)| x == t) {
                Some((_, build, _)) => Some(build),
                None => return Ok(None),
            },
        };
        let found = all
            .into_iter()
            .find(|b| build.as_ref().is_none_or(|id| &b.build_id == id));
        Ok(found.map(|b| (b, count)))
    }

    /// Whether a build of user template `name` has `tag`.
    pub async fn user_template_has_tag(&self, name: &str, tag: &str) -> Result<bool, SandboxError> {
        Ok(self.latest_build(name, Some(tag)).await?.is_some())
    }

    /// The user template a create names (`name` or `name:tag`), with this
    /// node's copy of its build; `None` when there is none.
    pub(super) async fn user_template(
        &self,
        full: &str,
    ) -> Result<Option<UserTemplate>, SandboxError> {
        let Ok((name, tag)) = split_name(full) else {
            return Ok(None);
        };
        let Some((built, _)) = self.latest_build(&name, tag.as_deref()).await? else {
            return Ok(None);
        };
        let entry = self.root_entry(&built.root).await?;
        if let Some(want) = &built.root_build
            && super::templates::build_id(&entry.template.rootfs_dir).as_deref()
                != Some(want.as_str())
        {
            return Err(SandboxError::StaleTemplate(full.to_owned(), built.root));
        }
        let local = format!("tpl-{name}-{}", built.build_id);
        let dir = self
            .fetch_cached(&format!("{TEMPLATES}/{name}/{}", built.build_id), &local)
            .await?;
        Ok(Some(UserTemplate {
            entry,
            dir,
            limits: Limits {
                vcpus: built.vcpus,
                memory_mib: built.memory_mib,
            },
            token: built.record.envd_access_token,
        }))
    }

    /// The user templates in the store, as `GET /templates` lists them.
    pub async fn user_template_infos(
        &self,
        with_builds: bool,
    ) -> Result<Vec<TemplateInfo>, SandboxError> {
        let Some(objects) = self.inner.shared.objects.clone() else {
            return Ok(Vec::new());
        };
        let names = objects.list(TEMPLATES).await.map_err(|e| {
            SandboxError::ObjectStore(format!(
                "templates in the object store ({}): {e}",
                objects.describe()
            ))
        })?;
        let mut seen: Vec<String> = names
            .iter()
            .filter_map(|n| {
                n.strip_prefix(&format!("{TEMPLATES}/"))?
                    .split('/')
                    .next()
                    .map(str::to_owned)
            })
            .collect();
        seen.dedup();
        let mut out = Vec::new();
        for name in seen {
            if let Some(info) = self.user_template_info(&name, with_builds).await? {
                out.push(info);
            }
        }
        Ok(out)
    }

    /// User template `name` as `GET /templates/{id}` answers it.
    pub async fn user_template_info(
        &self,
        name: &str,
        with_builds: bool,
    ) -> Result<Option<TemplateInfo>, SandboxError> {
        let all = self.builds_of(name).await?;
        let Some(latest) = all.first() else {
            return Ok(None);
        };
        let first = all
            .iter()
            .map(|b| b.created_ms)
            .min()
            .unwrap_or(latest.created_ms);
        let build = |b: &BuiltTemplate| TemplateBuild {
            build_id: b.build_id.clone(),
            status: TemplateBuildStatus::Ready,
            created_at: rfc3339_ms(b.created_ms),
            updated_at: rfc3339_ms(b.finished_ms),
            finished_at: Some(rfc3339_ms(b.finished_ms)),
            cpu_count: b.vcpus,
            memory_mb: b.memory_mib,
            disk_size_mb: Some(0),
            envd_version: Some(schema::envd::ENVD_VERSION.into()),
        };
        Ok(Some(TemplateInfo {
            template_id: name.to_owned(),
            build_id: latest.build_id.clone(),
            cpu_count: latest.vcpus,
            memory_mb: latest.memory_mib,
            disk_size_mb: 0,
            public: false,
            aliases: vec![name.to_owned()],
            names: vec![name.to_owned()],
            created_at: rfc3339_ms(first),
            updated_at: rfc3339_ms(latest.finished_ms),
            created_by: None,
            last_spawned_at: None,
            spawn_count: 0,
            build_count: all.len() as u64,
            envd_version: schema::envd::ENVD_VERSION.into(),
            build_status: TemplateBuildStatus::Ready,
            builds: with_builds.then(|| all.iter().map(build).collect()),
        }))
    }

    /// Delete user template `name` (every build); `Ok(false)` when there
    /// is none. Sandboxes made from it live on.
    pub async fn delete_user_template(&self, name: &str) -> Result<bool, SandboxError> {
        let Some(objects) = self.inner.shared.objects.clone() else {
            return Ok(false);
        };
        let all = self.builds_of(name).await?;
        for b in &all {
            let _ = std::fs::remove_dir_all(self.template_cache_dir(name, &b.build_id));
            let object = format!("{TEMPLATES}/{name}/{}", b.build_id);
            self.inner.built.lock().unwrap().remove(&object);
            match objects.delete(&object).await {
                Ok(()) | Err(ObjectsError::NotFound { .. }) => {}
                Err(e) => {
                    return Err(SandboxError::ObjectStore(format!(
                        "deleting template {name} from the object store ({}): {e}",
                        objects.describe()
                    )));
                }
            }
        }
        if let Ok(tags) = self.tags_of(name).await {
            for (t, ..) in tags {
                let _ = objects.delete(&format!("{TAGS}/{name}/{t}")).await;
            }
        }
        Ok(!all.is_empty())
    }

    /// `GET /templates/{id}/builds/{buildID}/status`: the status and the
    /// log entries from `offset` (at most `limit`, at least `level`).
    pub async fn build_status(
        &self,
        template: &str,
        build_id: &str,
        offset: usize,
        limit: usize,
        level: Option<LogLevel>,
    ) -> Result<BuildStatus, SandboxError> {
        {
            let builds = self.inner.builds.lock().unwrap();
            if let Some(e) = builds.get(build_id).filter(|e| e.template == template) {
                let entries: Vec<BuildLogEntry> = e
                    .log
                    .entries
                    .iter()
                    .skip(offset)
                    .filter(|l| level.is_none_or(|min| l.level >= min))
                    .take(limit.min(MAX_LOG_ENTRIES))
                    .cloned()
                    .collect();
                return Ok(BuildStatus {
                    logs: Vec::new(),
                    log_entries: entries,
                    template_id: template.to_owned(),
                    build_id: build_id.to_owned(),
                    status: e.status,
                    reason: e.reason.clone(),
                });
            }
        }
        // Built by another node (or before a restart): the store knows it
        // once it is ready.
        if self
            .builds_of(template)
            .await?
            .iter()
            .any(|b| b.build_id == build_id)
        {
            return Ok(BuildStatus {
                logs: Vec::new(),
                log_entries: Vec::new(),
                template_id: template.to_owned(),
                build_id: build_id.to_owned(),
                status: TemplateBuildStatus::Ready,
                reason: None,
            });
        }
        Err(SandboxError::NotFound(format!(
            "build {build_id} of template {template}"
        )))
    }
}

/// What a build starts from, once known.
enum Base {
    Ready(Box<BuildBase>),
    /// An image to pull first (in the build: it may take a while).
    Pull {
        image: String,
        auth: Option<(String, String)>,
    },
}

/// Registry credentials of a build (`fromImageRegistry` of type
/// `registry`); other registry types are refused by name.
fn registry_auth(
    registry: Option<&serde_json::Value>,
) -> Result<Option<(String, String)>, SandboxError> {
    let Some(r) = registry else {
        return Ok(None);
    };
    match r["type"].as_str() {
        Some("registry") => match (r["username"].as_str(), r["password"].as_str()) {
            (Some(u), Some(p)) => Ok(Some((u.to_owned(), p.to_owned()))),
            _ => Err(bad("fromImageRegistry: give username and password")),
        },
        Some(other) => Err(bad(format!(
            "fromImageRegistry type {other:?} is not supported here: use type \"registry\" with a username and password"
        ))),
        None => Err(bad("fromImageRegistry needs a type")),
    }
}

/// What a build starts from.
struct BuildBase {
    /// The node template underneath (its root tree).
    root: TemplateEntry,
    /// The key the first step's layer key chains from.
    key: String,
    state: BuildState,
    /// The files the base adds to the root (a user template's last layer).
    layer: Option<String>,
    /// Said in the log (an image mapped to a template).
    note: Option<String>,
}

/// A running build sandbox.
struct BuildSandbox {
    id: String,
    sid: SandboxId,
    token: String,
    /// What steps get besides the build's ENV: the proxy, the CA bundle.
    env: BTreeMap<String, String>,
    /// Stops the proxy, and the task serving it (done once every
    /// connection into the sandbox is reset).
    proxy_stop: std::sync::Mutex<Option<(watch::Sender<bool>, tokio::task::JoinHandle<()>)>>,
}

impl BuildSandbox {
    /// Stop the proxy; returns once no connection into the sandbox is
    /// left open (and the guest has had a moment to take the resets in),
    /// so that the sandbox can be saved.
    async fn stop_proxy(&self) {
        let taken = self.proxy_stop.lock().unwrap().take();
        if let Some((stop, serving)) = taken {
            let _ = stop.send(true);
            let _ = serving.await;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Why a build failed, and at which step (`base`, `1`.., `finalize`).
#[derive(Debug)]
struct Failure {
    step: String,
    message: String,
}

impl Failure {
    fn new(step: &str, message: impl ToString) -> Self {
        Self {
            step: step.to_owned(),
            message: message.to_string(),
        }
    }
}

/// A step as the log shows it.
fn describe(s: &schema::template::Step) -> String {
    let mut args = s.args.join(" ");
    if args.len() > 200 {
        let cut = (0..=200)
            .rev()
            .find(|&i| args.is_char_boundary(i))
            .unwrap_or(0);
        args.truncate(cut);
        args.push('…');
    }
    format!("{} {args}", s.kind)
}

/// The node template an image maps to when it is not pulled: Debian and
/// Python images (and E2B's base) are Debian bookworm with Python, which
/// `base` is.
pub fn mapped_image(image: &str) -> Option<&'static str> {
    let name = image.split('@').next().unwrap_or(image);
    let (repo, _tag) = name
        .rsplit_once(':')
        .filter(|(r, _)| !r.contains('/') || !r.is_empty())
        .unwrap_or((name, "latest"));
    let repo = repo
        .strip_prefix("docker.io/")
        .unwrap_or(repo)
        .strip_prefix("library/")
        .unwrap_or(repo.strip_prefix("docker.io/").unwrap_or(repo));
    match repo {
        "debian" | "python" | "e2bdev/base" | "e2bdev/code-interpreter" => Some("base"),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn images_map_to_base_only_when_they_are_debian_or_python() {
        assert_eq!(mapped_image("debian:bookworm"), Some("base"));
        assert_eq!(mapped_image("python:3.11"), Some("base"));
        assert_eq!(
            mapped_image("docker.io/library/debian:stable"),
            Some("base")
        );
        assert_eq!(mapped_image("e2bdev/base:latest"), Some("base"));
        assert_eq!(mapped_image("ubuntu:22.04"), None);
        assert_eq!(mapped_image("127.0.0.1:5000/debian:bookworm"), None);
    }

    #[test]
    fn old_builds_are_forgotten_running_ones_never() {
        let entry = |status, created_ms| BuildEntry {
            template: "t".into(),
            tags: Vec::new(),
            limits: None,
            status,
            reason: None,
            log: BuildLog::default(),
            created_ms,
        };
        let now = 10 * UNSTARTED_FOR_MS;
        let mut builds = HashMap::new();
        builds.insert("stale".to_owned(), entry(TemplateBuildStatus::Waiting, 0));
        builds.insert(
            "fresh".to_owned(),
            entry(TemplateBuildStatus::Waiting, now - 1),
        );
        builds.insert(
            "running".to_owned(),
            entry(TemplateBuildStatus::Building, 0),
        );
        for i in 0..KEPT_BUILDS as u64 {
            builds.insert(format!("done-{i}"), entry(TemplateBuildStatus::Ready, i));
        }
        forget_old_builds(&mut builds, now);
        assert_eq!(builds.len(), KEPT_BUILDS);
        assert!(!builds.contains_key("stale"));
        assert!(builds.contains_key("fresh") && builds.contains_key("running"));
        // The oldest finished ones went.
        assert!(!builds.contains_key("done-0") && builds.contains_key("done-199"));
    }

    #[test]
    fn names_and_tags_are_checked() {
        assert_eq!(
            split_name("my-app:v1").unwrap(),
            ("my-app".into(), Some("v1".into()))
        );
        assert_eq!(split_name("my-app").unwrap(), ("my-app".into(), None));
        assert!(split_name("My App").is_err());
        assert!(split_name("snap-abc").is_err());
        assert!(split_name("x:Bad Tag").is_err());
    }
}
