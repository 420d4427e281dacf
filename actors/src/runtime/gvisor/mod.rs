//! The gvisor runtime: one `runsc` sandbox (platform `systrap`, or `ptrace`
//! where runsc predates 2024-07; gVisor's own network stack) per sandmesh
//! sandbox.
//!
//! # On disk
//!
//! ```text
//! <data_dir>/run/runsc/                  runsc --root: runsc's state files
//! <data_dir>/run/sandboxes/<id>/
//!     meta.json                          written first: id, template, limits
//!     config.json                        the OCI bundle (bundle.rs); root = rootfs
//!     boot_id                            the guest's /proc/sys/kernel/random/boot_id
//!     upper/ work/                       the overlay's writable layer
//!     rootfs/                            overlay: lowerdir = template root (never written)
//!     console.log                        the guest's stdout and stderr (envd's log)
//! <data_dir>/cache/templates/<template>/gvisor/   the template snapshot
//! <snapshot dir>/
//!     image/checkpoint.img               runsc checkpoint --image-path
//!     upper/                             the sandbox's writable layer
//!     manifest.json                      written last: template, runsc version
//! ```
//!
//! Host objects per sandbox: network namespaces `smh-<id>` and `smh-<id>-h`
//! with a veth pair (network.rs), the cgroup `/sandmesh/<id>` (memory limit,
//! CPU quota from `linux.resources`; runsc creates it and applies both on a
//! cgroup v1 host, checked: `memory.limit_in_bytes`, `cpu.cfs_quota_us`;
//! the runtime removes it), and the runsc sandbox, gofer and ptrace stub
//! processes, which run detached from the node.
//!
//! # What this runsc (Debian's 2022-12 build) can and cannot save
//!
//! gVisor's checkpoint fails, and then **stops the sandbox**, when the guest
//! has (a) a TCP connection to outside the sandbox in any state but closed
//! (TIME_WAIT included), or (b) a listening TCP socket registered in an
//! epoll set ("endpoint still has waiters upon save"). (a) is why the node's
//! sockets into the guest close with a reset ([`network::socket_in`]) and
//! why [`GvisorRuntime`] checks the guest's `/proc/net/tcp` before saving,
//! refusing with the sandbox still running. (b) cannot be seen from outside:
//! a guest server must accept on a blocking thread (or with poll/select)
//! rather than keep its listener in epoll, and that includes envd.
//! Connections over the guest's loopback are saved fine.

mod bundle;
mod fs;
mod gate;
pub mod network;
mod runsc;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use self::gate::{Gated, Gates};
use self::network::{NetnsPair, OnClose};
use self::runsc::{Enter, RUNSC_TIMEOUT, Runsc};
use super::{
    BoxFuture, BoxStream, ENVD_PORT, Instance, Limits, Origin, Result, Runtime, RuntimeError,
    RuntimeKind, SandboxId, SandboxRecord, SandboxState, Snapshot, Template, TemplateId, Usage,
    now_unix, read_json, write_json,
};

/// How long `create` and `restore` wait for envd's `/health`.
pub const READY_TIMEOUT: Duration = Duration::from_secs(15);
/// How long `checkpoint` waits for connections into the guest to close.
const QUIESCE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a paused sandbox rests before `runsc checkpoint` (see
/// `Inner::checkpoint_quiet`).
const SETTLE_BEFORE_SAVE: Duration = Duration::from_millis(20);
/// How long the last envd round trip before a save may take.
const BARRIER_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a SIGKILLed sandbox takes to be gone, at most: its processes
/// and then its cgroups. An exit is not instant: the sentry tears down its
/// memory file and the guest's address spaces, and on a loaded host that
/// took over 2 s (a CI run lost a good snapshot to a 2 s limit).
const EXIT_TIMEOUT: Duration = Duration::from_secs(15);
/// Snapshot manifest format.
const SNAPSHOT_FORMAT: u32 = 1;

/// The gvisor runtime. Cheap to clone; every clone drives the same sandboxes.
#[derive(Clone, Debug)]
pub struct GvisorRuntime {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    data_dir: PathBuf,
    runsc: Runsc,
    /// Every host socket into a sandbox holds a ticket; a checkpoint closes
    /// the sandbox's gate and waits for them (see gate.rs).
    gates: Gates,
}

/// `meta.json` of a sandbox directory.
#[derive(Debug, Serialize, Deserialize)]
struct Meta {
    id: SandboxId,
    template: TemplateId,
    rootfs_dir: PathBuf,
    limits: Limits,
    created_unix: u64,
}

/// `manifest.json` of a snapshot directory.
#[derive(Debug, Serialize, Deserialize)]
struct Manifest {
    format: u32,
    runtime: RuntimeKind,
    template: TemplateId,
    runsc_version: String,
    /// The id the sandbox had when it was saved (information only).
    source: SandboxId,
    limits: Limits,
    created_unix: u64,
}

impl GvisorRuntime {
    /// A gvisor runtime keeping its state under `data_dir`. Fails with what
    /// to install when runsc or the host tools are missing, and when not
    /// running as root.
    pub fn new(data_dir: impl Into<PathBuf>) -> Result<Self> {
        Self::with_runsc(data_dir, None)
    }

    /// Like [`GvisorRuntime::new`] with an explicit runsc binary.
    pub fn with_runsc(data_dir: impl Into<PathBuf>, runsc_bin: Option<PathBuf>) -> Result<Self> {
        let data_dir = data_dir.into();
        let runsc = Runsc::locate(runsc_bin, data_dir.join("run").join("runsc"))?;
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err(RuntimeError::NotRoot {
                runtime: RuntimeKind::Gvisor,
            });
        }
        for (what, package) in [("ip", "iproute2"), ("cp", "coreutils")] {
            if runsc::find_in_path(what).is_none() {
                return Err(RuntimeError::ToolMissing { what, package });
            }
        }
        let data_dir = std::path::absolute(&data_dir)
            .map_err(|e| RuntimeError::io("resolving", &data_dir, e))?;
        let runsc = Runsc {
            root: data_dir.join("run").join("runsc"),
            ..runsc
        };
        for dir in [&runsc.root, &data_dir.join("run").join("sandboxes")] {
            std::fs::create_dir_all(dir).map_err(|e| RuntimeError::io("creating", dir, e))?;
        }
        Ok(Self {
            inner: Arc::new(Inner {
                data_dir,
                runsc,
                gates: Gates::default(),
            }),
        })
    }

    /// The first line of `runsc --version`.
    pub fn runsc_version(&self) -> &str {
        &self.inner.runsc.version
    }

    /// The directory of sandbox `id` (see the module docs).
    pub fn sandbox_dir(&self, id: &SandboxId) -> PathBuf {
        self.inner.sandbox_dir(id)
    }

    pub fn data_dir(&self) -> &Path {
        &self.inner.data_dir
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Inner) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || f(&inner))
            .await
            .map_err(|e| RuntimeError::Command {
                command: "gvisor runtime worker".into(),
                detail: e.to_string(),
            })?
    }

    /// Start `id` (booting, or restoring a snapshot) and wait for envd.
    /// Undoes everything on error.
    async fn start(
        &self,
        id: &SandboxId,
        template: &Template,
        limits: Limits,
        origin: Origin,
    ) -> Result<Instance> {
        let t0 = Instant::now();
        let runtime_start = {
            let (id, template) = (id.clone(), template.clone());
            self.blocking(move |inner| inner.start(&id, &template, limits, &origin))
                .await?
        };
        let tq = Instant::now();
        let r = self.wait_ready(id, READY_TIMEOUT).await;
        tracing::debug!(sandbox = %id, "step: wait_ready {:?}", tq.elapsed());
        if let Err(e) = r {
            let _ = self.kill(id).await;
            return Err(e);
        }
        Ok(Instance {
            id: id.clone(),
            runtime: RuntimeKind::Gvisor,
            template: template.id.clone(),
            limits,
            ready_after: t0.elapsed(),
            runtime_start,
        })
    }

    /// Poll envd's `/health` until it answers 204, failing early when the
    /// sandbox dies.
    async fn wait_ready(&self, id: &SandboxId, timeout: Duration) -> Result<()> {
        let t0 = Instant::now();
        let mut pause = Duration::from_millis(5);
        let mut last;
        loop {
            match self.health(id).await {
                Ok(204) => return Ok(()),
                Ok(status) => last = format!("/health answered {status}"),
                Err(e) => last = e.to_string(),
            }
            if !self.inner.alive(id) {
                let console =
                    runsc::file_tail(&self.inner.sandbox_dir(id).join("console.log"), 2000);
                return Err(RuntimeError::NotReady {
                    id: id.clone(),
                    waited: t0.elapsed(),
                    detail: format!("the sandbox exited ({last}); its console: {console}"),
                });
            }
            if t0.elapsed() > timeout {
                return Err(RuntimeError::NotReady {
                    id: id.clone(),
                    waited: t0.elapsed(),
                    detail: last,
                });
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(50));
        }
    }

    /// The last step before a save, with the sandbox's gate closed: one
    /// `GET /health` to envd on a connection the node closes gracefully
    /// first (FIN, then envd's FIN; the guest's socket ends CLOSED, not in
    /// TIME_WAIT, which gVisor cannot save). Its answer proves that envd's
    /// event loop runs and has accepted every connection queued before it
    /// (accept is FIFO). A silent envd refuses the save: a snapshot of a
    /// wedged envd would never answer again.
    async fn envd_barrier(&self, id: &SandboxId) -> Result<()> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let netns = NetnsPair::of(id);
        let round_trip = async {
            let socket = network::socket_in(&netns.host_path(), OnClose::Graceful).await?;
            let addr = std::net::SocketAddr::from((network::GUEST_ADDR, ENVD_PORT));
            let mut stream = socket.connect(addr).await?;
            let status = super::http_status(&mut stream, "/health").await?;
            stream.shutdown().await?;
            // envd's FIN: it has dropped the connection.
            let mut rest = [0u8; 512];
            while stream.read(&mut rest).await? > 0 {}
            Ok::<_, std::io::Error>(status)
        };
        let refuse = |why: String| RuntimeError::CheckpointRefused {
            id: id.clone(),
            reason: format!("envd did not answer before the save ({why})"),
        };
        match tokio::time::timeout(BARRIER_TIMEOUT, round_trip).await {
            Ok(Ok(204)) => Ok(()),
            Ok(Ok(status)) => Err(refuse(format!("/health answered {status}"))),
            Ok(Err(e)) => Err(refuse(e.to_string())),
            Err(_) => Err(refuse(format!("no answer within {BARRIER_TIMEOUT:?}"))),
        }
    }

    /// One `GET /health` to envd; the HTTP status. Dropping the stream
    /// resets the connection (SO_LINGER 0).
    async fn health(&self, id: &SandboxId) -> Result<u16> {
        let mut stream = self.connect(id, ENVD_PORT).await?;
        super::http_status(&mut stream, "/health")
            .await
            .map_err(|e| RuntimeError::Connect {
                id: id.clone(),
                port: ENVD_PORT,
                source: e,
            })
    }
}

impl Runtime for GvisorRuntime {
    fn kind(&self) -> RuntimeKind {
        RuntimeKind::Gvisor
    }

    fn prepare_template<'a>(
        &'a self,
        template: &'a Template,
        limits: Limits,
    ) -> BoxFuture<'a, Result<Template>> {
        Box::pin(async move {
            static SEQ: AtomicU64 = AtomicU64::new(0);
            let n = SEQ.fetch_add(1, Ordering::Relaxed);
            let id = SandboxId::new(format!("tpl-{}-{n}", std::process::id()))?;
            let dir = self.inner.template_dir(&template.id);
            let tmp = dir.join(format!(".gvisor.tmp-{}-{n}", std::process::id()));
            let dest = dir.join("gvisor");
            std::fs::create_dir_all(&dir).map_err(|e| RuntimeError::io("creating", &dir, e))?;
            let booted = Template {
                snapshot: None,
                ..template.clone()
            };
            self.start(&id, &booted, limits, Origin::Boot).await?;
            let snapshot = match self.checkpoint(&id, &tmp).await {
                Ok(s) => s,
                Err(e) => {
                    let _ = self.kill(&id).await;
                    let _ = fs::remove_dir(&tmp);
                    return Err(e);
                }
            };
            let publish = || -> Result<()> {
                fs::remove_dir(&dest)?;
                std::fs::rename(&snapshot.dir, &dest)
                    .map_err(|e| RuntimeError::io("publishing template snapshot", &dest, e))
            };
            if let Err(e) = publish() {
                let _ = fs::remove_dir(&tmp);
                return Err(e);
            }
            Ok(Template {
                snapshot: Some(Snapshot {
                    dir: dest,
                    ..snapshot
                }),
                ..template.clone()
            })
        })
    }

    fn engine(&self) -> String {
        format!("gvisor: runsc {}", self.inner.runsc.version)
    }

    fn cached_template(&self, _template: &Template, _limits: Limits) -> Option<Template> {
        None
    }

    fn adopt_template<'a>(
        &'a self,
        template: &'a Template,
        snapshot: &'a Snapshot,
    ) -> BoxFuture<'a, Result<Template>> {
        Box::pin(async move {
            self.inner.check_snapshot(template, snapshot)?;
            let dir = self.inner.template_dir(&template.id);
            let dest = dir.join("gvisor");
            std::fs::create_dir_all(&dir).map_err(|e| RuntimeError::io("creating", &dir, e))?;
            fs::remove_dir(&dest)?;
            std::fs::rename(&snapshot.dir, &dest)
                .map_err(|e| RuntimeError::io("adopting template snapshot", &dest, e))?;
            Ok(Template {
                snapshot: Some(Snapshot {
                    dir: dest,
                    ..snapshot.clone()
                }),
                ..template.clone()
            })
        })
    }

    fn create<'a>(
        &'a self,
        id: &'a SandboxId,
        template: &'a Template,
        limits: Limits,
    ) -> BoxFuture<'a, Result<Instance>> {
        Box::pin(async move {
            match &template.snapshot {
                Some(snapshot) => self.restore(id, template, snapshot, limits).await,
                None => self.start(id, template, limits, Origin::Boot).await,
            }
        })
    }

    fn checkpoint<'a>(
        &'a self,
        id: &'a SandboxId,
        dest: &'a Path,
    ) -> BoxFuture<'a, Result<Snapshot>> {
        Box::pin(async move {
            let meta = {
                let (id, dest) = (id.clone(), dest.to_owned());
                self.blocking(move |inner| inner.close_for_checkpoint(&id, &dest))
                    .await?
            };
            // The gate is closed: no host socket into the guest exists or
            // is being made. Now make sure envd has taken in and put away
            // every connection, then save.
            let saved = match self.envd_barrier(id).await {
                Ok(()) => {
                    let (id, dest) = (id.clone(), dest.to_owned());
                    self.blocking(move |inner| inner.checkpoint_quiet(&id, &dest, meta))
                        .await
                }
                Err(e) => {
                    let id = id.clone();
                    self.blocking(move |inner| Ok(inner.refused_or_lost(&id, e)))
                        .await
                        .and_then(Err)
                }
            };
            // A sandbox that still runs (a refused or survived save) takes
            // connections again; one that is gone starts afresh.
            if self.inner.alive(id) {
                self.inner.gates.reopen(id);
            } else {
                self.inner.gates.forget(id);
            }
            saved
        })
    }

    fn restore<'a>(
        &'a self,
        id: &'a SandboxId,
        template: &'a Template,
        snapshot: &'a Snapshot,
        limits: Limits,
    ) -> BoxFuture<'a, Result<Instance>> {
        Box::pin(async move {
            self.inner.check_snapshot(template, snapshot)?;
            self.start(id, template, limits, Origin::Restore(snapshot.dir.clone()))
                .await
        })
    }

    fn keep_files_only<'a>(&'a self, snapshot: &'a Snapshot) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let dir = snapshot.dir.clone();
            self.blocking(move |_| {
                let image = dir.join("image");
                std::fs::remove_dir_all(&image).map_err(|e| RuntimeError::io("removing", &image, e))
            })
            .await
        })
    }

    fn boot_with_files<'a>(
        &'a self,
        id: &'a SandboxId,
        template: &'a Template,
        snapshot: &'a Snapshot,
        limits: Limits,
    ) -> BoxFuture<'a, Result<Instance>> {
        Box::pin(async move {
            self.inner.check_files(template, snapshot)?;
            self.start(id, template, limits, Origin::Files(snapshot.dir.clone()))
                .await
        })
    }

    fn kill<'a>(&'a self, id: &'a SandboxId) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let id = id.clone();
            self.blocking(move |inner| inner.cleanup(&id)).await
        })
    }

    fn connect<'a>(&'a self, id: &'a SandboxId, port: u16) -> BoxFuture<'a, Result<BoxStream>> {
        Box::pin(async move {
            let netns = NetnsPair::of(id);
            if !netns.host_path().exists() {
                return Err(RuntimeError::NotFound(id.clone()));
            }
            let err = |source| RuntimeError::Connect {
                id: id.clone(),
                port,
                source,
            };
            // Held until the stream is dropped, and while connecting: a
            // checkpoint waits for every ticket (the guest must have no
            // connection to outside it when it is saved).
            let ticket = self.inner.gates.ticket(id).map_err(|gate::Closed| {
                err(std::io::Error::new(
                    std::io::ErrorKind::ConnectionRefused,
                    "the sandbox is being paused",
                ))
            })?;
            let socket = network::socket_in(&netns.host_path(), OnClose::Reset)
                .await
                .map_err(err)?;
            let addr = std::net::SocketAddr::from((network::GUEST_ADDR, port));
            let stream = tokio::time::timeout(Duration::from_secs(5), socket.connect(addr))
                .await
                .map_err(|_| err(std::io::ErrorKind::TimedOut.into()))?
                .map_err(err)?;
            Ok(Box::new(Gated::new(stream, ticket)) as BoxStream)
        })
    }

    fn host_listener<'a>(
        &'a self,
        id: &'a SandboxId,
        port: u16,
    ) -> BoxFuture<'a, Result<(tokio::net::TcpListener, std::net::SocketAddr)>> {
        Box::pin(async move {
            let netns = NetnsPair::of(id);
            if !netns.host_path().exists() {
                return Err(RuntimeError::NotFound(id.clone()));
            }
            let addr = std::net::SocketAddr::from((network::HOST_ADDR, port));
            let listener = network::listener_in(&netns.host_path(), addr)
                .await
                .map_err(|source| RuntimeError::Connect {
                    id: id.clone(),
                    port,
                    source,
                })?;
            Ok((listener, addr))
        })
    }

    fn console<'a>(&'a self, id: &'a SandboxId, max_bytes: u64) -> BoxFuture<'a, Result<String>> {
        Box::pin(async move {
            let id = id.clone();
            self.blocking(move |inner| {
                let dir = inner.sandbox_dir(&id);
                if !dir.exists() {
                    return Err(RuntimeError::NotFound(id));
                }
                let path = dir.join("console.log");
                super::file_tail_lines(&path, max_bytes)
                    .map_err(|e| RuntimeError::io("reading", &path, e))
            })
            .await
        })
    }

    fn usage<'a>(&'a self, id: &'a SandboxId) -> BoxFuture<'a, Result<Usage>> {
        Box::pin(async move {
            let id = id.clone();
            self.blocking(move |inner| inner.usage(&id)).await
        })
    }

    fn list(&self) -> BoxFuture<'_, Result<Vec<SandboxRecord>>> {
        Box::pin(async move { self.blocking(|inner| inner.list()).await })
    }
}

impl Inner {
    fn sandboxes_dir(&self) -> PathBuf {
        self.data_dir.join("run").join("sandboxes")
    }

    fn sandbox_dir(&self, id: &SandboxId) -> PathBuf {
        self.sandboxes_dir().join(id.as_str())
    }

    /// Where template `id`'s snapshot lives (in `gvisor/` below).
    fn template_dir(&self, id: &TemplateId) -> PathBuf {
        self.data_dir
            .join("cache")
            .join("templates")
            .join(id.as_str())
    }

    /// runsc's state files of `id` (`<id>_sandbox:<id>.state` and `.lock`),
    /// and the control socket `runsc-<id>.sock` that runsc from 2023 on
    /// binds there (older ones use an abstract socket): left behind, it
    /// makes the next start of that id fail ("unable to find location to
    /// write socket file"), i.e. every resume after a pause.
    /// Ids hold no `_`, so the prefix names one container only.
    fn runsc_state_files(&self, id: &SandboxId) -> Vec<PathBuf> {
        let prefix = format!("{id}_sandbox:");
        let control_socket = format!("runsc-{id}.sock");
        std::fs::read_dir(&self.runsc.root)
            .map(|entries| {
                entries
                    .flatten()
                    .filter(|e| {
                        let name = e.file_name();
                        let name = name.to_string_lossy();
                        name.starts_with(&prefix) || name == control_socket
                    })
                    .map(|e| e.path())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Host pids runsc recorded for `id`: the sandbox (sentry) and the gofer.
    fn runsc_pids(&self, id: &SandboxId) -> Vec<i32> {
        let mut pids = Vec::new();
        for file in self.runsc_state_files(id) {
            if file.extension().is_some_and(|e| e == "state")
                && let Ok(text) = std::fs::read_to_string(&file)
                && let Ok(state) = serde_json::from_str::<serde_json::Value>(&text)
            {
                for pid in [&state["sandbox"]["pid"], &state["goferPid"]] {
                    if let Some(pid) = pid.as_i64().filter(|p| *p > 0) {
                        pids.push(pid as i32);
                    }
                }
            }
        }
        pids
    }

    /// Whether `pid` is a runsc process of sandbox `id` (and not a reused pid).
    fn is_runsc_of(pid: i32, id: &SandboxId) -> bool {
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            return false;
        };
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        args.first().is_some_and(|a| a.starts_with(b"runsc"))
            && (args.iter().any(|a| *a == id.as_str().as_bytes())
                || args.iter().any(|a| a.starts_with(b"--bundle")))
    }

    /// Whether the sandbox process of `id` runs.
    fn alive(&self, id: &SandboxId) -> bool {
        self.runsc_pids(id)
            .first()
            .is_some_and(|pid| Self::is_runsc_of(*pid, id))
    }

    /// SIGKILL the sandbox (sentry) and gofer processes of `id` and wait
    /// (up to [`EXIT_TIMEOUT`]) until they are gone; whether they are. The guest's
    /// processes and the ptrace stubs die with the sentry.
    fn stop_processes(&self, id: &SandboxId) -> bool {
        let pids: Vec<i32> = self
            .runsc_pids(id)
            .into_iter()
            .filter(|pid| Self::is_runsc_of(*pid, id))
            .collect();
        for pid in &pids {
            // SAFETY: kill(2) of a pid just verified to be this sandbox's runsc.
            unsafe { libc::kill(*pid, libc::SIGKILL) };
        }
        let t0 = Instant::now();
        loop {
            let alive = pids.iter().any(|pid| Self::is_runsc_of(*pid, id));
            if !alive {
                return true;
            }
            if t0.elapsed() > EXIT_TIMEOUT {
                return false;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Boot or restore `id`; on error undo every step. Returns how long
    /// `runsc run`/`restore` itself took.
    fn start(
        &self,
        id: &SandboxId,
        template: &Template,
        limits: Limits,
        origin: &Origin,
    ) -> Result<Duration> {
        let dir = self.sandbox_dir(id);
        let leftovers =
            || dir.exists() || NetnsPair::of(id).exists() || !self.runsc_state_files(id).is_empty();
        // A resume finds what its pause could not remove (processes that
        // took longer than EXIT_TIMEOUT to die): nothing of `id` runs any
        // more, so that is clutter, removed now rather than failing the
        // resume of a good snapshot for ever.
        if matches!(origin, Origin::Restore(_)) && leftovers() && !self.alive(id) {
            tracing::info!(sandbox = %id, "removing what its pause left before resuming it");
            if let Err(e) = self.cleanup(id) {
                tracing::warn!(sandbox = %id, error = %e, "clean-up before resume failed");
            }
        }
        if leftovers() {
            return Err(RuntimeError::AlreadyExists(id.clone()));
        }
        check_template(template)?;
        let result = self.start_steps(id, template, limits, origin);
        if let Err(e) = &result {
            tracing::warn!(sandbox = %id, error = %e, "start failed; cleaning up");
            if let Err(c) = self.cleanup(id) {
                tracing::error!(sandbox = %id, error = %c, "clean-up after a failed start failed");
            }
        }
        result
    }

    fn start_steps(
        &self,
        id: &SandboxId,
        template: &Template,
        limits: Limits,
        origin: &Origin,
    ) -> Result<Duration> {
        let dir = self.sandbox_dir(id);
        std::fs::create_dir_all(&dir).map_err(|e| RuntimeError::io("creating", &dir, e))?;
        let meta = Meta {
            id: id.clone(),
            template: template.id.clone(),
            rootfs_dir: template.rootfs_dir.clone(),
            limits,
            created_unix: now_unix(),
        };
        write_json(&dir.join("meta.json"), &meta)?;
        let (upper, work, rootfs) = (dir.join("upper"), dir.join("work"), dir.join("rootfs"));
        for d in [&work, &rootfs] {
            std::fs::create_dir(d).map_err(|e| RuntimeError::io("creating", d, e))?;
        }
        match origin {
            Origin::Restore(snap) | Origin::Files(snap) => {
                fs::copy_tree(&snap.join("upper"), &upper)?
            }
            Origin::Boot => {
                std::fs::create_dir(&upper).map_err(|e| RuntimeError::io("creating", &upper, e))?
            }
        }
        let tq = Instant::now();
        fs::mount_overlay(&template.rootfs_dir, &upper, &work, &rootfs)?;
        let netns = NetnsPair::of(id);
        netns.create()?;
        tracing::debug!(sandbox = %id, "step: mount+netns {:?}", tq.elapsed());
        let tq = Instant::now();
        let boot_id = dir.join(bundle::BOOT_ID_FILE);
        std::fs::write(&boot_id, bundle::boot_id(id))
            .map_err(|e| RuntimeError::io("writing", &boot_id, e))?;
        write_json(&dir.join("config.json"), &bundle::config(id, limits, &dir))?;

        let console_path = dir.join("console.log");
        let console = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&console_path)
            .map_err(|e| RuntimeError::io("creating", &console_path, e))?;
        let console2 = console
            .try_clone()
            .map_err(|e| RuntimeError::io("opening", &console_path, e))?;
        let mut cmd = self
            .runsc
            .command(Enter::NetnsForStart(&netns.guest_path()))?;
        let image;
        let verb = match origin {
            Origin::Restore(snap) => {
                image = snap.join("image");
                cmd.arg("restore")
                    .arg("-detach")
                    .arg("--image-path")
                    .arg(&image);
                "restore"
            }
            Origin::Boot | Origin::Files(_) => {
                cmd.arg("run").arg("-detach");
                "run"
            }
        };
        cmd.arg("--bundle").arg(&dir).arg(id.as_str());
        // The guest's stdio is runsc's: a log file, never the node's terminal
        // (the guest would die with it).
        cmd.stdout(console).stderr(console2);
        let runsc_started = Instant::now();
        let child = cmd.spawn().map_err(|e| RuntimeError::Command {
            command: format!("runsc {verb}"),
            detail: format!("cannot start it: {e}"),
        })?;
        let status =
            wait_child(child, Duration::from_secs(60)).map_err(|e| RuntimeError::Command {
                command: format!("runsc {verb}"),
                detail: e,
            })?;
        tracing::debug!(sandbox = %id, "step: runsc {verb} {:?}", tq.elapsed());
        if !status.success() {
            return Err(RuntimeError::Command {
                command: format!("runsc {verb} {id}"),
                detail: format!("{status}: {}", runsc::file_tail(&console_path, 4000)),
            });
        }
        Ok(runsc_started.elapsed())
    }

    /// Refuse a snapshot that is incomplete, corrupt, from another template
    /// or another runsc, before anything is started.
    fn check_snapshot(&self, template: &Template, snapshot: &Snapshot) -> Result<()> {
        let manifest = self.check_files(template, snapshot)?;
        let bad = |reason: String| RuntimeError::BadSnapshot {
            dir: snapshot.dir.clone(),
            reason,
        };
        if manifest.runsc_version != self.runsc.version {
            return Err(bad(format!(
                "it was saved by {:?} and this node has {:?}: gVisor images restore only under the runsc that saved them",
                manifest.runsc_version, self.runsc.version
            )));
        }
        let image = snapshot.dir.join("image").join("checkpoint.img");
        match std::fs::metadata(&image) {
            Ok(m) if m.len() > 0 => Ok(()),
            Ok(_) => Err(bad("image/checkpoint.img is empty".into())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(bad(
                "it holds no memory image (a filesystem-only snapshot boots afresh; it cannot be restored)".into(),
            )),
            Err(e) => Err(bad(format!("image/checkpoint.img: {e}"))),
        }
    }

    /// Refuse a snapshot whose filesystem changes cannot go over
    /// `template`'s root: incomplete, corrupt, or of another template. Its
    /// memory image, if any, is not looked at (nor the runsc that saved
    /// it: files outlive runsc versions). Returns its manifest.
    fn check_files(&self, template: &Template, snapshot: &Snapshot) -> Result<Manifest> {
        let bad = |reason: String| RuntimeError::BadSnapshot {
            dir: snapshot.dir.clone(),
            reason,
        };
        if snapshot.runtime != RuntimeKind::Gvisor {
            return Err(bad(format!(
                "it was taken by the {} runtime; restore it there",
                snapshot.runtime
            )));
        }
        let path = snapshot.dir.join("manifest.json");
        let text = std::fs::read_to_string(&path).map_err(|e| {
            bad(format!(
                "no readable manifest.json ({e}): it is incomplete (a checkpoint that did not finish) or not a snapshot"
            ))
        })?;
        let manifest: Manifest = serde_json::from_str(&text)
            .map_err(|e| bad(format!("manifest.json is corrupt: {e}")))?;
        if manifest.format != SNAPSHOT_FORMAT || manifest.runtime != RuntimeKind::Gvisor {
            return Err(bad(format!(
                "unknown snapshot format {} ({}); this node reads format {SNAPSHOT_FORMAT} (gvisor)",
                manifest.format, manifest.runtime
            )));
        }
        if manifest.template != template.id || snapshot.template != template.id {
            return Err(bad(format!(
                "it was made from template {}, not {}: restore it with its own template",
                manifest.template, template.id
            )));
        }
        if !snapshot.dir.join("upper").is_dir() {
            return Err(bad("its writable layer upper/ is missing".into()));
        }
        Ok(manifest)
    }

    /// Before a checkpoint: check that `id` runs and `dest` is free, then
    /// close `id`'s gate and wait for every ticket. On `Ok` the gate stays
    /// closed (the caller reopens or forgets it); on `Err` it is open.
    fn close_for_checkpoint(&self, id: &SandboxId, dest: &Path) -> Result<Meta> {
        let dir = self.sandbox_dir(id);
        let meta: Meta = read_json(&dir.join("meta.json")).map_err(|_| {
            if dir.exists() {
                RuntimeError::NotRunning(id.clone())
            } else {
                RuntimeError::NotFound(id.clone())
            }
        })?;
        if !self.alive(id) {
            return Err(RuntimeError::NotRunning(id.clone()));
        }
        if dest.exists()
            && std::fs::read_dir(dest)
                .map(|mut d| d.next().is_some())
                .unwrap_or(true)
        {
            return Err(RuntimeError::SnapshotExists(dest.to_owned()));
        }
        // No host socket into the guest may exist or be in the making from
        // here on: close the gate, wait for the tickets. Then the guest's
        // own view (wait_quiet) can only get quieter.
        if let Err(gate::StillOpen(n)) = self.gates.close_and_drain(id, QUIESCE_TIMEOUT) {
            self.gates.reopen(id);
            return Err(RuntimeError::CheckpointRefused {
                id: id.clone(),
                reason: format!(
                    "{n} connection(s) into the sandbox stayed open for {QUIESCE_TIMEOUT:?}; gVisor cannot save them"
                ),
            });
        }
        Ok(meta)
    }

    /// Save `id` into `dest` (`runsc checkpoint`) once the guest has no
    /// connection to the node left; its gate is closed (see
    /// [`Inner::close_for_checkpoint`]).
    fn checkpoint_quiet(&self, id: &SandboxId, dest: &Path, meta: Meta) -> Result<Snapshot> {
        let dir = self.sandbox_dir(id);
        let netns = NetnsPair::of(id);
        let tq = Instant::now();
        // Until `runsc checkpoint` runs, nothing is saved: a failure here
        // refuses the save and leaves the sandbox running — unless it died
        // meanwhile (killed under us), which is a loss, cleaned up.
        let refuse = |e: RuntimeError| self.refused_or_lost(id, e);
        self.wait_quiet(id, &netns).map_err(refuse)?;
        tracing::debug!(sandbox = %id, "step: wait_quiet {:?}", tq.elapsed());

        let image = dest.join("image");
        std::fs::create_dir_all(&image).map_err(|e| RuntimeError::io("creating", &image, e))?;
        let image_arg = image.display().to_string();
        let mut cmd = self.runsc.command(Enter::Netns(&netns.guest_path()))?;
        // Uncompressed: the object store compresses (zstd, per chunk) and
        // deduplicates, and a deflate stream would change entirely with one
        // changed page, so no two pauses of a sandbox would share a chunk.
        cmd.arg("checkpoint");
        if self.runsc.uncompressed_checkpoints {
            cmd.arg("--compression=none");
        }
        cmd.args(["--image-path", &image_arg, id.as_str()]);
        // Freeze the whole guest first and let it settle; only then save.
        // This was a guess at issue 14's unresumable images, which turned
        // out to be gVisor re-delivering deleted epoll interests on restore
        // (fixed in envd's mio, see ARCHITECTURE.md); it costs one runsc
        // call and was in place for every measurement since, so it stays.
        let tq = Instant::now();
        if let Err(e) = self.runsc.run(
            Enter::Netns(&netns.guest_path()),
            &["pause", id.as_str()],
            RUNSC_TIMEOUT,
        ) {
            self.resume_after_refusal(id, &netns);
            return Err(refuse(e));
        }
        std::thread::sleep(SETTLE_BEFORE_SAVE);
        tracing::debug!(sandbox = %id, "step: runsc pause {:?}", tq.elapsed());
        // The whole output: the reason sits between long Go dumps.
        let saved = runsc::run_output(&mut cmd, Duration::from_secs(120)).and_then(|out| {
            if out.status.success() {
                Ok(())
            } else {
                Err(format!(
                    "{}: {}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr)
                ))
            }
            .map_err(|detail| RuntimeError::Command {
                command: format!("runsc checkpoint {id}"),
                detail,
            })
        });
        if let Err(e) = saved {
            let _ = fs::remove_dir(dest);
            // A failed save ends the sentry, a moment after runsc returns.
            let t0 = Instant::now();
            while self.alive(id) && t0.elapsed() < Duration::from_secs(1) {
                std::thread::sleep(Duration::from_millis(10));
            }
            let lost = !self.alive(id);
            if !lost {
                // The save failed and the sandbox is still there: let it run.
                self.resume_after_refusal(id, &netns);
            }
            if lost && let Err(c) = self.cleanup(id) {
                tracing::error!(sandbox = %id, error = %c, "clean-up after a failed checkpoint failed");
            }
            return Err(RuntimeError::CheckpointFailed {
                id: id.clone(),
                reason: explain_save_failure(&e.to_string()),
                sandbox_lost: lost,
            });
        }
        tracing::debug!(sandbox = %id, "step: runsc checkpoint {:?}", tq.elapsed());
        let tq = Instant::now();
        // The sandbox has stopped. Keep its writable layer, then remove it.
        let finish = || -> Result<()> {
            // The gofer outlives the checkpoint, and `runsc delete` waits
            // for it with a slow back-off: end it here. Then nothing holds
            // the overlay; `cleanup` below removes runsc's state.
            // The save has finished, so the image is whole: processes slow
            // to die cost tidiness (the overlay goes by a lazy unmount,
            // `cleanup` reports what stays), never the snapshot.
            if !self.stop_processes(id) {
                tracing::warn!(sandbox = %id, "runsc processes of the saved sandbox outlive SIGKILL for {EXIT_TIMEOUT:?}; keeping the snapshot");
            }
            fs::unmount_all(&dir)?;
            fs::move_tree(&dir.join("upper"), &dest.join("upper"))?;
            let manifest = Manifest {
                format: SNAPSHOT_FORMAT,
                runtime: RuntimeKind::Gvisor,
                template: meta.template.clone(),
                runsc_version: self.runsc.version.clone(),
                source: id.clone(),
                limits: meta.limits,
                created_unix: now_unix(),
            };
            // Written last: a snapshot without its manifest is never restored.
            write_json(&dest.join("manifest.json"), &manifest)
        };
        let finished = finish();
        tracing::debug!(sandbox = %id, "step: finish {:?}", tq.elapsed());
        let tq = Instant::now();
        let cleaned = self.cleanup(id);
        tracing::debug!(sandbox = %id, "step: cleanup {:?}", tq.elapsed());
        if let Err(e) = finished {
            let _ = fs::remove_dir(dest);
            return Err(RuntimeError::CheckpointFailed {
                id: id.clone(),
                reason: e.to_string(),
                sandbox_lost: true,
            });
        }
        if let Err(e) = cleaned {
            tracing::error!(sandbox = %id, error = %e, "clean-up after checkpoint failed");
        }
        Ok(Snapshot {
            dir: dest.to_owned(),
            template: meta.template,
            runtime: RuntimeKind::Gvisor,
        })
    }

    /// Wait until the guest has no TCP connection to outside itself (see the
    /// module docs) and none of envd's threads is running; refuse, the
    /// sandbox still running, if that does not happen in time.
    fn wait_quiet(&self, id: &SandboxId, netns: &NetnsPair) -> Result<()> {
        let t0 = Instant::now();
        loop {
            let out = match self.runsc.run(
                Enter::Netns(&netns.guest_path()),
                &["exec", id.as_str(), "/bin/sh", "-c", QUIET_PROBE],
                RUNSC_TIMEOUT,
            ) {
                Ok(out) if out.status.success() => out,
                Ok(out) => {
                    tracing::warn!(sandbox = %id, status = %out.status, "cannot look at the guest before checkpoint");
                    return Ok(());
                }
                Err(e) => {
                    // No shell in the template, say: go on and let gVisor judge.
                    tracing::warn!(sandbox = %id, error = %e, "cannot look at the guest before checkpoint");
                    return Ok(());
                }
            };
            let text = String::from_utf8_lossy(&out.stdout);
            let unsaveable = unsaveable_reasons(&text);
            if !unsaveable.is_empty() {
                return Err(RuntimeError::CheckpointRefused {
                    id: id.clone(),
                    reason: format!(
                        "the guest says it cannot be saved now: {}",
                        unsaveable.join("; ")
                    ),
                });
            }
            let open = open_connections(&text);
            let busy = running_envd_threads(&text);
            if open.is_empty() && busy.is_empty() {
                return Ok(());
            }
            if t0.elapsed() > QUIESCE_TIMEOUT {
                let reason = if open.is_empty() {
                    format!(
                        "envd stayed busy ({}); a save now risks an image that does not restore",
                        busy.join(", ")
                    )
                } else {
                    format!(
                        "gVisor cannot save TCP connections that leave the sandbox, and these are open: {}",
                        open.join(", ")
                    )
                };
                return Err(RuntimeError::CheckpointRefused {
                    id: id.clone(),
                    reason,
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// What a failure before the save is: `CheckpointRefused` while the
    /// sandbox still runs, else `CheckpointFailed` with the sandbox lost
    /// (and cleaned up).
    fn refused_or_lost(&self, id: &SandboxId, e: RuntimeError) -> RuntimeError {
        if self.alive(id) {
            return match e {
                e @ RuntimeError::CheckpointRefused { .. } => e,
                other => RuntimeError::CheckpointRefused {
                    id: id.clone(),
                    reason: other.to_string(),
                },
            };
        }
        if let Err(c) = self.cleanup(id) {
            tracing::error!(sandbox = %id, error = %c, "clean-up of a sandbox that died before its save failed");
        }
        RuntimeError::CheckpointFailed {
            id: id.clone(),
            reason: format!("the sandbox died before it could be saved ({e})"),
            sandbox_lost: true,
        }
    }

    /// `runsc resume` of a sandbox paused for a save that did not happen;
    /// logged, since the caller is already reporting the save's failure.
    fn resume_after_refusal(&self, id: &SandboxId, netns: &NetnsPair) {
        if let Err(e) = self.runsc.run(
            Enter::Netns(&netns.guest_path()),
            &["resume", id.as_str()],
            RUNSC_TIMEOUT,
        ) {
            tracing::error!(sandbox = %id, error = %e, "resuming the sandbox after a save that did not happen failed");
        }
    }

    /// Remove every trace of `id`; see [`Runtime::kill`].
    fn cleanup(&self, id: &SandboxId) -> Result<()> {
        self.gates.forget(id);
        let dir = self.sandbox_dir(id);
        let netns = NetnsPair::of(id);
        let mut left = Vec::new();

        if !self.runsc_state_files(id).is_empty() {
            let guest_path = netns.guest_path();
            let enter = if guest_path.exists() {
                Enter::Netns(&guest_path)
            } else {
                Enter::Host
            };
            // End the sentry (the guest's processes and the ptrace stubs die
            // with it) and the gofer ourselves: `runsc delete` does the same
            // but then waits a fixed second. Once they are gone, what runsc
            // keeps is its state files and the cgroup, removed below; runsc
            // delete is only the fallback for processes that would not die.
            if !self.stop_processes(id) {
                if let Err(e) =
                    self.runsc
                        .run(enter, &["delete", "--force", id.as_str()], RUNSC_TIMEOUT)
                {
                    tracing::warn!(sandbox = %id, error = %e, "runsc delete failed");
                }
                if !self.stop_processes(id) {
                    left.push("runsc processes that survive SIGKILL".into());
                }
            }
            for file in self.runsc_state_files(id) {
                if let Err(e) = std::fs::remove_file(&file)
                    && e.kind() != std::io::ErrorKind::NotFound
                {
                    left.push(format!("runsc state {} ({e})", file.display()));
                }
            }
        }
        for dir in remove_cgroups(id) {
            left.push(format!("cgroup {}", dir.display()));
        }
        if let Err(e) = fs::unmount_all(&dir) {
            left.push(e.to_string());
        }
        if let Err(e) = netns.delete() {
            left.push(e.to_string());
        }
        if let Err(e) = fs::remove_dir(&dir) {
            left.push(e.to_string());
        }
        if left.is_empty() {
            Ok(())
        } else {
            Err(RuntimeError::Cleanup {
                id: id.clone(),
                left: left.join("; "),
            })
        }
    }

    fn usage(&self, id: &SandboxId) -> Result<Usage> {
        let dir = self.sandbox_dir(id);
        if !dir.exists() {
            return Err(RuntimeError::NotFound(id.clone()));
        }
        if !self.alive(id) {
            return Err(RuntimeError::NotRunning(id.clone()));
        }
        let cgroup = bundle::cgroup_path(id);
        let cg = |controller: &str, file: &str| {
            std::fs::read_to_string(format!("/sys/fs/cgroup/{controller}{cgroup}/{file}")).ok()
        };
        let mut pids: Vec<i32> = cg("memory", "cgroup.procs")
            .or_else(|| cg("pids", "cgroup.procs"))
            .or_else(|| cg("", "cgroup.procs"))
            .map(|t| t.lines().filter_map(|l| l.trim().parse().ok()).collect())
            .unwrap_or_default();
        if pids.is_empty() {
            // No cgroup: the sandbox, the gofer, and the sandbox's children
            // (ptrace stubs).
            pids = self.runsc_pids(id);
            pids.extend(children_of(&pids));
        }
        let mut usage = Usage {
            disk_bytes: fs::disk_usage(&dir.join("upper")),
            ..Usage::default()
        };
        let mut cpu_ticks = 0u64;
        for pid in &pids {
            if let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")) {
                usage.memory_rss_bytes += kib_field(&text, "Rss:") * 1024;
                usage.memory_pss_bytes += kib_field(&text, "Pss:") * 1024;
            }
            cpu_ticks += proc_cpu_ticks(*pid);
        }
        usage.cpu_time = match cg("cpuacct", "cpuacct.usage").and_then(|t| t.trim().parse().ok()) {
            Some(ns) => Duration::from_nanos(ns),
            None => {
                // SAFETY: sysconf has no preconditions.
                let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
                Duration::from_millis(cpu_ticks * 1000 / hz)
            }
        };
        Ok(usage)
    }

    fn list(&self) -> Result<Vec<SandboxRecord>> {
        let dir = self.sandboxes_dir();
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(RuntimeError::io("listing", &dir, e)),
        };
        let mut records = Vec::new();
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Ok(id) = SandboxId::new(name.clone()) else {
                tracing::warn!(entry = %name, "not a sandbox directory; ignoring it");
                continue;
            };
            let template = read_json::<Meta>(&entry.path().join("meta.json"))
                .ok()
                .map(|m| m.template);
            let state = if self.alive(&id) {
                SandboxState::Running
            } else {
                SandboxState::Stopped
            };
            records.push(SandboxRecord {
                id,
                template,
                state,
            });
        }
        records.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(records)
    }
}

/// runsc's save errors dump whole Go structures; say what they mean.
fn explain_save_failure(detail: &str) -> String {
    if detail.contains("endpoint still has waiters upon save") {
        "a listening TCP socket in the guest is registered in an epoll set, which this runsc \
         (2022-12) cannot save; the guest's servers (envd included) must accept on a blocking \
         thread or with poll(2)"
            .into()
    } else if let Some(at) = detail.find("endpoint cannot be saved in connected state") {
        let rest = &detail[at..];
        let end = rest.find('\n').unwrap_or(rest.len()).min(200);
        format!(
            "a TCP connection of the guest to outside it was open ({}); close every connection first",
            rest[..end].trim_end_matches(':')
        )
    } else if detail.contains("hostinet") {
        "the sandbox uses the host network stack, which runsc cannot save".into()
    } else {
        runsc::tail(detail.as_bytes())
    }
}

/// The template must hold what the sandbox runs.
fn check_template(template: &Template) -> Result<()> {
    let bad = |reason: String| RuntimeError::BadTemplate {
        template: template.id.clone(),
        reason,
    };
    if !template.rootfs_dir.is_absolute() {
        return Err(bad(format!(
            "its root tree {} is not an absolute path",
            template.rootfs_dir.display()
        )));
    }
    if !template.rootfs_dir.is_dir() {
        return Err(bad(format!(
            "its root tree {} is not a directory (build it with `cargo xtask guest`)",
            template.rootfs_dir.display()
        )));
    }
    for (path, what) in [
        ("usr/local/bin/envd", "envd"),
        ("usr/bin/tini", "tini (Debian package tini)"),
        (
            "usr/local/sbin/sandmesh-gvisor-init",
            "the gvisor init script (vmm/guest/rootfs/, installed by `cargo xtask guest`)",
        ),
    ] {
        if !template.rootfs_dir.join(path).is_file() {
            return Err(bad(format!(
                "it has no {what} at /{path}; rebuild the template with it"
            )));
        }
    }
    Ok(())
}

/// What `wait_quiet` reads in the guest: its TCP sockets, then the state
/// line of every thread of envd (`/proc/<pid>/task/<tid>/stat`).
const QUIET_PROBE: &str = "cat /proc/net/tcp /proc/net/tcp6; \
    for p in /proc/[0-9]*; do \
      [ \"$(cat $p/comm 2>/dev/null)\" = envd ] && cat $p/task/*/stat; \
    done; \
    for f in /tmp/.sandmesh-unsaveable/*; do \
      [ -f \"$f\" ] && printf 'unsaveable: %s\\n' \"$(head -c 500 \"$f\" | tr '\\n' ' ')\"; \
    done; true";

/// The reasons guest programs gave for not being saveable now
/// (`schema::envd::UNSAVEABLE_DIR`), from `QUIET_PROBE`'s output.
fn unsaveable_reasons(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("unsaveable: "))
        .map(|r| r.trim().to_owned())
        .filter(|r| !r.is_empty())
        .collect()
}

/// envd's threads that are running (state `R`, not blocked in a system
/// call) in `/proc/<pid>/task/<tid>/stat` lines, as `tid (comm)`.
///
/// Why `wait_quiet` waits for none running: a save taken while envd was
/// at work has restored, on this runsc, to an envd that segfaulted in
/// tokio's `ScheduledIo::wake` (a corrupt waiter list) or spun forever in
/// a lock. Waiting for an idle envd narrows that; it does not close it: a
/// CPU-bound process beside envd still loses about one save in 6 to 90
/// (see ARCHITECTURE.md, gvisor runtime, known defect).
fn running_envd_threads(text: &str) -> Vec<String> {
    text.lines()
        .filter(|line| !line.starts_with("unsaveable: "))
        .filter_map(|line| {
            let (head, rest) = line.rsplit_once(") ")?;
            let state = rest.split_whitespace().next()?;
            (state == "R").then(|| format!("{head})"))
        })
        .collect()
}

/// Connections in `/proc/net/tcp{,6}` text that must be gone before a
/// save: any state but LISTEN and CLOSE, unless both ends are on the
/// loopback (gVisor cannot save them) — and a node connection (remote end
/// 10.0.2.1, the host side of the veth) in any state but LISTEN, CLOSE
/// included: a closed socket still listed is one envd has not dropped yet,
/// i.e. its event loop is still at work on it, and a save taken then has
/// restored to an envd that crashed or spun forever (see `checkpoint`).
fn open_connections(text: &str) -> Vec<String> {
    let mut open = Vec::new();
    for line in text.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() < 4 || !fields[0].ends_with(':') {
            continue;
        }
        let (local, remote, state) = (fields[1], fields[2], fields[3]);
        // 10.0.2.1 as /proc/net/tcp prints it (little-endian hex), in IPv4
        // and IPv4-mapped IPv6 form.
        let from_node = remote.starts_with("0102000A:")
            || remote.starts_with("0000000000000000FFFF00000102000A:");
        if state == "0A" || (state == "07" && !from_node) {
            continue;
        }
        let loopback = |addr: &str| {
            let ip = addr.split(':').next().unwrap_or("");
            ip.ends_with("7F") && ip.len() == 8
                || ip == "00000000000000000000000001000000"
                || ip.starts_with("0000000000000000FFFF0000") && ip.ends_with("7F")
        };
        if loopback(local) && loopback(remote) {
            continue;
        }
        open.push(format!("{local} -> {remote} (state {state})"));
    }
    open
}

/// Remove the sandbox's cgroups (`runsc delete` would; see `cleanup`). A
/// cgroup can only go once empty: what is still in it belongs to this
/// sandbox (ptrace stubs exiting after the sentry), so it is killed, and the
/// removal retried for up to [`EXIT_TIMEOUT`]. Returns the cgroups left.
fn remove_cgroups(id: &SandboxId) -> Vec<PathBuf> {
    let cgroup = bundle::cgroup_path(id);
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/sys/fs/cgroup")
        .map(|controllers| {
            controllers
                .flatten()
                .map(|c| PathBuf::from(format!("{}{cgroup}", c.path().display())))
                .collect()
        })
        .unwrap_or_default();
    dirs.push(PathBuf::from(format!("/sys/fs/cgroup{cgroup}")));
    dirs.retain(|d| d.is_dir());
    let t0 = Instant::now();
    while !dirs.is_empty() && t0.elapsed() < EXIT_TIMEOUT {
        dirs.retain(|dir| {
            if let Ok(procs) = std::fs::read_to_string(dir.join("cgroup.procs")) {
                for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
                    // SAFETY: kill(2); every process in this cgroup is the sandbox's.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
            std::fs::remove_dir(dir).is_err() && dir.is_dir()
        });
        if !dirs.is_empty() {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    dirs
}

fn children_of(parents: &[i32]) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|s| {
                    let after = s.rsplit_once(')')?.1;
                    after.split_whitespace().nth(1)?.parse::<i32>().ok()
                })
                .is_some_and(|ppid| parents.contains(&ppid))
        })
        .collect()
}

fn proc_cpu_ticks(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let fields: Vec<&str> = s.rsplit_once(')')?.1.split_whitespace().collect();
            // After the command: state is field 3, utime 14, stime 15.
            Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
        })
        .unwrap_or(0)
}

fn kib_field(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn wait_child(
    mut child: std::process::Child,
    timeout: Duration,
) -> Result<std::process::ExitStatus, String> {
    let t0 = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Ok(status),
            Ok(None) if t0.elapsed() > timeout => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("timed out after {timeout:?} and was killed"));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(2)),
            Err(e) => return Err(format!("waiting for it: {e}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_reasons_not_to_save_are_read_from_the_probe() {
        assert!(QUIET_PROBE.contains(schema::envd::UNSAVEABLE_DIR));
        let text = "  0: 0100007F:C383 00000000:0000 0A\n\
                    unsaveable: a Deno kernel (ctx 1) listens on TCP (R) \n\
                    12 (envd) S 1\n";
        assert_eq!(
            unsaveable_reasons(text),
            vec!["a Deno kernel (ctx 1) listens on TCP (R)"]
        );
        assert!(running_envd_threads(text).is_empty());
        assert!(unsaveable_reasons("unsaveable: \n").is_empty());
    }

    #[test]
    fn open_connections_ignores_listeners_loopback_and_closed_non_node_sockets() {
        let text = "  sl  local_address rem_address   st tx_queue rx_queue
   2: 00000000:C33F 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0
   3: 0202000A:1F40 0102000A:B400 06 00000000:00000000 00:00000000 00000000     0
   4: 0100007F:1F40 0100007F:9000 01 00000000:00000000 00:00000000 00000000     0
   5: 0202000A:1F41 0102000A:B401 07 00000000:00000000 00:00000000 00000000     0
   6: 0202000A:1F42 0505A8C0:0050 07 00000000:00000000 00:00000000 00000000     0
";
        let open = open_connections(text);
        // TIME_WAIT to the node, and a node connection closed but not yet
        // dropped by envd; not the listener, the loopback pair, or a closed
        // socket to another host.
        assert_eq!(open.len(), 2, "{open:?}");
        assert!(open[0].contains("state 06"));
        assert!(open[1].contains("B401 (state 07)"), "{open:?}");
    }

    #[test]
    fn busy_envd_threads_are_those_running() {
        let text =
            "   2: 00000000:C33F 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0
2 (envd) S 1 2 2 0 -1
3 (tokio-rt-worker) R 1 2 2 0 -1
5 (envd-accept) S 1 2 2 0 -1
";
        assert_eq!(running_envd_threads(text), vec!["3 (tokio-rt-worker)"]);
        assert!(running_envd_threads("2 (envd) S 1\n").is_empty());
    }

    #[test]
    fn template_without_envd_is_refused() {
        let dir = std::env::temp_dir().join(format!("smh-tpl-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("usr/bin")).unwrap();
        let t = Template {
            id: TemplateId::new("t").unwrap(),
            rootfs_dir: dir.clone(),
            rootfs_image: None,
            snapshot: None,
        };
        let err = check_template(&t).unwrap_err().to_string();
        assert!(err.contains("no envd"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn smaps_fields_parse() {
        let text = "Rss:                1234 kB\nPss:                 567 kB\n";
        assert_eq!(kib_field(text, "Rss:"), 1234);
        assert_eq!(kib_field(text, "Pss:"), 567);
        assert_eq!(kib_field(text, "Swap:"), 0);
    }
}
