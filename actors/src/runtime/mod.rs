//! The sandbox runtime contract: what a `SandboxActor` needs from the thing
//! that runs its sandbox, whether that is our VMM (`microvm`) or gVisor's
//! `runsc` (`gvisor`, see [`gvisor`]).
//!
//! # States
//!
//! For one runtime on one node, a sandbox id is in one of these states:
//!
//! ```text
//!            create / restore                 checkpoint (ok)
//!  absent ──────────────────────▶ running ───────────────────▶ absent (+ snapshot)
//!    ▲                              │  │
//!    │            kill              │  │ the guest dies, the host reboots,
//!    └──────────────────────────────┘  ▼ a step of create fails half-way
//!    ▲                               stopped (leftovers on disk)
//!    └───────────── kill ──────────────┘
//! ```
//!
//! - **absent**: nothing of the sandbox exists on the node (no process, no
//!   mount, no network namespace, no directory). `create` and `restore`
//!   start from here and refuse an id that is not absent.
//! - **running**: [`Runtime::create`] or [`Runtime::restore`] returned an
//!   [`Instance`]: the guest runs and envd answers `GET /health` on port
//!   [`ENVD_PORT`]. [`Runtime::connect`] and [`Runtime::usage`] work.
//! - **stopped**: something is left on disk but no guest runs (the guest
//!   died, or the node rebooted, or the node crashed in the middle of a
//!   create). [`Runtime::list`] reports it; the only thing to do with it is
//!   [`Runtime::kill`].
//!
//! A snapshot ([`Snapshot`]) is a directory, not a sandbox state: a
//! successful [`Runtime::checkpoint`] leaves the sandbox **absent** and its
//! whole state (memory, processes, the files it wrote) in the snapshot, from
//! which [`Runtime::restore`] brings it back, under the same id or any other,
//! as many times as wanted (a template snapshot is restored for every
//! create from that template).
//!
//! # Guarantees
//!
//! - **Every failed call undoes its own work.** A `create` or `restore` that
//!   fails leaves the id absent (every step it took is undone) and says why;
//!   a `restore` of a snapshot that is corrupt, incomplete, from another
//!   template or from another runtime version is refused before anything
//!   is started, or cleaned up if the runtime itself rejects it.
//! - **`kill` is idempotent and total**: it removes every trace of the id
//!   (processes, mounts, network namespaces, runtime state, directories)
//!   from whatever state it finds, including half-created and half-killed
//!   sandboxes, and succeeds on an absent id.
//! - **A snapshot is complete or ignored**: its manifest is written last, so
//!   a snapshot directory without a manifest (a crash in the middle of a
//!   checkpoint) is refused by `restore`.
//! - **A failed checkpoint may lose the sandbox.** Where the runtime can
//!   see in advance that the state cannot be saved (gvisor: TCP connections
//!   into the sandbox still open) it refuses and the sandbox keeps running
//!   ([`RuntimeError::CheckpointRefused`]). If the save itself fails, gVisor
//!   stops the sandbox; the runtime then cleans it up (absent) and says so
//!   ([`RuntimeError::CheckpointFailed`] with `sandbox_lost: true`).
//! - **Sandboxes outlive the node process.** They run detached from the
//!   node, so a node that crashes or restarts finds them running with
//!   [`Runtime::list`] and adopts them (connect, usage, checkpoint and kill
//!   need nothing but the id). After a host reboot they are listed as
//!   stopped and must be killed (their snapshots, if any, are intact).
//!
//! # Concurrency
//!
//! Calls for different ids may run concurrently. Calls for one id must not
//! overlap: the SandboxActor that owns the id serializes them.

pub mod gvisor;
pub mod microvm;
pub mod select;

use std::fmt;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite};

/// The port envd listens on inside every guest.
pub use schema::envd::ENVD_PORT;

/// A boxed future, so that [`Runtime`] can be used as a trait object.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A byte stream to a port inside a sandbox.
pub trait GuestStream: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> GuestStream for T {}

/// What [`Runtime::connect`] returns.
pub type BoxStream = Box<dyn GuestStream>;

/// Which runtime runs a sandbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RuntimeKind {
    /// Our VMM on KVM: hardware isolation.
    Microvm,
    /// gVisor's `runsc`: a user-space kernel.
    Gvisor,
}

impl fmt::Display for RuntimeKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Microvm => "microvm",
            Self::Gvisor => "gvisor",
        })
    }
}

/// An id that is not valid for a sandbox or a template.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {what} id {id:?}: {rule}")]
pub struct InvalidId {
    pub what: &'static str,
    pub id: String,
    pub rule: &'static str,
}

/// A sandbox id: 1 to 40 of `[a-z0-9-]`. It names host objects (network
/// namespaces, directories, runsc containers), hence the strict alphabet.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct SandboxId(String);

impl SandboxId {
    /// A sandbox id is the E2B sandbox id, which a host name carries as
    /// `<port>-<id>.<domain>`: 57 keeps that first label within DNS's 63.
    pub const MAX_LEN: usize = 57;

    pub fn new(id: impl Into<String>) -> Result<Self, InvalidId> {
        let id = id.into();
        let ok = !id.is_empty()
            && id.len() <= Self::MAX_LEN
            && id
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if ok {
            Ok(Self(id))
        } else {
            Err(InvalidId {
                what: "sandbox",
                id,
                rule: "1 to 57 characters of a-z, 0-9 and -",
            })
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for SandboxId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for SandboxId {
    type Err = InvalidId;
    fn from_str(s: &str) -> Result<Self, InvalidId> {
        Self::new(s)
    }
}

impl TryFrom<String> for SandboxId {
    type Error = InvalidId;
    fn try_from(s: String) -> Result<Self, InvalidId> {
        Self::new(s)
    }
}

impl From<SandboxId> for String {
    fn from(id: SandboxId) -> String {
        id.0
    }
}

/// A template id: 1 to 64 of `[a-z0-9._-]`, not starting with `.`. It
/// names cache directories.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct TemplateId(String);

impl TemplateId {
    pub fn new(id: impl Into<String>) -> Result<Self, InvalidId> {
        let id = id.into();
        let ok = !id.is_empty()
            && id.len() <= 64
            && !id.starts_with('.')
            && id.bytes().all(|b| {
                b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'_' | b'.')
            });
        if ok {
            Ok(Self(id))
        } else {
            Err(InvalidId {
                what: "template",
                id,
                rule: "1 to 64 characters of a-z, 0-9, ., _ and -, not starting with .",
            })
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for TemplateId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<String> for TemplateId {
    type Error = InvalidId;
    fn try_from(s: String) -> Result<Self, InvalidId> {
        Self::new(s)
    }
}

impl From<TemplateId> for String {
    fn from(id: TemplateId) -> String {
        id.0
    }
}

/// Resources of one sandbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// CPUs the guest may use at once (gvisor: a CFS quota of this many CPUs).
    pub vcpus: u32,
    /// Memory of the guest in MiB (gvisor: the sandbox's memory cgroup limit
    /// and the memory the guest kernel reports).
    pub memory_mib: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            vcpus: 2,
            memory_mib: 512,
        }
    }
}

/// A template: the root filesystem sandboxes start from, and once prepared
/// ([`Runtime::prepare_template`]) the snapshot they are restored from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Template {
    pub id: TemplateId,
    /// The root tree (for gvisor the lower layer of every sandbox's overlay;
    /// never written). It must hold `/usr/local/bin/envd` and `/usr/bin/tini`.
    pub rootfs_dir: PathBuf,
    /// The same tree as an ext4 image: the root disk a microVM boots
    /// (read-only, under a per-sandbox copy-on-write overlay).
    #[serde(default)]
    pub rootfs_image: Option<PathBuf>,
    /// The template snapshot: envd booted and healthy. When set, `create`
    /// restores it instead of booting.
    pub snapshot: Option<Snapshot>,
}

/// A saved sandbox: a directory written by [`Runtime::checkpoint`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    pub dir: PathBuf,
    /// The template the sandbox was made from; `restore` refuses a snapshot
    /// whose manifest names another.
    pub template: TemplateId,
    pub runtime: RuntimeKind,
}

/// What a runtime starts a sandbox from.
#[derive(Debug, Clone)]
pub(crate) enum Origin {
    /// The template's root tree, booted.
    Boot,
    /// The template's root tree with the filesystem changes of the
    /// snapshot in this directory over it, booted.
    Files(PathBuf),
    /// The snapshot in this directory, restored.
    Restore(PathBuf),
}

/// A running sandbox, as `create` and `restore` return it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instance {
    pub id: SandboxId,
    pub runtime: RuntimeKind,
    pub template: TemplateId,
    pub limits: Limits,
    /// From the first runtime step to envd answering `/health`.
    pub ready_after: Duration,
    /// The runtime's own start alone (`runsc run`/`restore`, or the VMM's
    /// boot/restore), without our set-up and the wait for envd: the
    /// baseline our overhead is measured against.
    pub runtime_start: Duration,
}

/// What a sandbox uses now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    /// Resident memory of the sandbox's host processes, shared pages counted
    /// in each process.
    pub memory_rss_bytes: u64,
    /// Proportional set size: shared pages split between their users (the
    /// fair per-sandbox figure).
    pub memory_pss_bytes: u64,
    /// CPU time (user + system) used since the sandbox started on this node.
    pub cpu_time: Duration,
    /// Disk used by the sandbox's writable layer.
    pub disk_bytes: u64,
}

/// A sandbox the runtime finds on disk ([`Runtime::list`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxRecord {
    pub id: SandboxId,
    /// `None` when the record is too damaged to say (kill it).
    pub template: Option<TemplateId>,
    pub state: SandboxState,
}

/// See the module documentation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SandboxState {
    Running,
    Stopped,
}

/// Why a runtime call failed. Each message says what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("runsc is not installed (looked for {looked_in}): apt-get install runsc")]
    RuntimeMissing { looked_in: String },
    #[error("{what} is not installed: apt-get install {package}")]
    ToolMissing {
        what: &'static str,
        package: &'static str,
    },
    #[error(
        "the {runtime} runtime needs root privileges (network namespaces, mounts): run the node as root"
    )]
    NotRoot { runtime: RuntimeKind },
    #[error("{runtime} runtime unavailable: {reason}")]
    Unavailable {
        runtime: RuntimeKind,
        reason: String,
    },
    #[error(transparent)]
    InvalidId(#[from] InvalidId),
    #[error("template {template} is not usable: {reason}")]
    BadTemplate {
        template: TemplateId,
        reason: String,
    },
    #[error("sandbox {0} already exists on this node: kill it first or pick another id")]
    AlreadyExists(SandboxId),
    #[error("sandbox {0} does not exist on this node")]
    NotFound(SandboxId),
    #[error("sandbox {0} is not running (its guest stopped): kill it to clean up")]
    NotRunning(SandboxId),
    #[error("snapshot {dir} cannot be restored: {reason}")]
    BadSnapshot { dir: PathBuf, reason: String },
    #[error("snapshot destination {0} already exists: choose a new directory or remove it")]
    SnapshotExists(PathBuf),
    #[error(
        "sandbox {id} cannot be paused now, it keeps running: {reason}; close every connection into the sandbox and retry"
    )]
    CheckpointRefused { id: SandboxId, reason: String },
    #[error(
        "checkpoint of sandbox {id} failed{}: {reason}",
        if *sandbox_lost { " and the sandbox was lost (its runtime stopped with the save); it has been cleaned up" } else { "; the sandbox keeps running" }
    )]
    CheckpointFailed {
        id: SandboxId,
        reason: String,
        sandbox_lost: bool,
    },
    #[error("sandbox {id}: envd did not answer /health within {waited:?}: {detail}")]
    NotReady {
        id: SandboxId,
        waited: Duration,
        detail: String,
    },
    #[error("`{command}` failed: {detail}")]
    Command { command: String, detail: String },
    #[error("{action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("connecting to port {port} of sandbox {id}: {source}")]
    Connect {
        id: SandboxId,
        port: u16,
        #[source]
        source: std::io::Error,
    },
    #[error("cleaning up sandbox {id} left {left}: retry kill, or remove it by hand")]
    Cleanup { id: SandboxId, left: String },
}

impl RuntimeError {
    pub(crate) fn io(action: &'static str, path: &Path, source: std::io::Error) -> Self {
        Self::Io {
            action,
            path: path.to_owned(),
            source,
        }
    }
}

pub type Result<T, E = RuntimeError> = std::result::Result<T, E>;

pub(crate) fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

pub(crate) fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T> {
    let bytes = std::fs::read(path).map_err(|e| RuntimeError::io("reading", path, e))?;
    serde_json::from_slice(&bytes)
        .map_err(|e| RuntimeError::io("parsing", path, std::io::Error::other(e.to_string())))
}

/// Write `value` to `path` atomically (temporary file, fsync, rename):
/// runtimes write their manifests with it, last.
pub(crate) fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let bytes = serde_json::to_vec_pretty(value)
        .map_err(|e| RuntimeError::io("encoding", path, std::io::Error::other(e.to_string())))?;
    let mut f = std::fs::File::create(&tmp).map_err(|e| RuntimeError::io("creating", &tmp, e))?;
    f.write_all(&bytes)
        .and_then(|()| f.sync_all())
        .map_err(|e| RuntimeError::io("writing", &tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| RuntimeError::io("renaming", &tmp, e))
}

/// The last `max` bytes of a file (all of it when shorter), from the first
/// line start in them; a missing file is empty. (Consoles and logs.)
pub fn file_tail_lines(path: &Path, max: u64) -> std::io::Result<String> {
    use std::io::{Read, Seek};
    let mut file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(String::new()),
        Err(e) => return Err(e),
    };
    let len = file.metadata()?.len();
    let cut = len > max;
    if cut {
        file.seek(std::io::SeekFrom::Start(len - max))?;
    }
    let mut buf = Vec::new();
    file.take(max).read_to_end(&mut buf)?;
    let text = String::from_utf8_lossy(&buf);
    Ok(match (cut, text.find('\n')) {
        (true, Some(nl)) => text[nl + 1..].to_owned(),
        _ => text.into_owned(),
    })
}

/// One `GET <path>` over a fresh stream into a guest; the HTTP status.
/// (How both runtimes wait for envd's `/health`.)
pub(crate) async fn http_status<S>(stream: &mut S, path: &str) -> std::io::Result<u16>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    stream
        .write_all(format!("GET {path} HTTP/1.1\r\nHost: sandbox\r\n\r\n").as_bytes())
        .await?;
    let mut buf = Vec::with_capacity(256);
    let mut chunk = [0u8; 256];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 8192 {
        let n = tokio::time::timeout(Duration::from_secs(2), stream.read(&mut chunk))
            .await
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let line = String::from_utf8_lossy(&buf);
    line.split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| {
            std::io::Error::other(format!(
                "not an HTTP answer: {:?}",
                line.lines().next().unwrap_or("")
            ))
        })
}

/// What a SandboxActor drives. Implemented by the gvisor runtime
/// ([`gvisor::GvisorRuntime`]) and the microvm runtime
/// ([`microvm::MicrovmRuntime`]).
/// See the module documentation for states and guarantees.
pub trait Runtime: Send + Sync {
    fn kind(&self) -> RuntimeKind;

    /// Make `template` ready for fast creates: boot a sandbox from its root
    /// tree with `limits` (the template's own: a microVM snapshot fixes
    /// the vCPUs and memory of every sandbox restored from it), wait for
    /// envd, and checkpoint it as the template snapshot. Returns the
    /// template with [`Template::snapshot`] set.
    fn prepare_template<'a>(
        &'a self,
        template: &'a Template,
        limits: Limits,
    ) -> BoxFuture<'a, Result<Template>>;

    /// What this runtime's snapshots depend on besides the template's root
    /// and the limits (the runsc version; the VMM's snapshot format and
    /// confinement): a template snapshot made by a node whose engine is
    /// the same restores here.
    fn engine(&self) -> String;

    /// The template snapshot of `template` with `limits` that this node
    /// kept from an earlier start and `prepare_template` would reuse, if
    /// any (the microVM keeps them; gVisor boots its templates afresh).
    fn cached_template(&self, template: &Template, limits: Limits) -> Option<Template>;

    /// Take `snapshot`, a template snapshot of `template` made elsewhere
    /// (fetched from the object store), as this node's: check it, move it
    /// to where the runtime keeps template snapshots, and return the
    /// template with [`Template::snapshot`] set, as `prepare_template` does.
    fn adopt_template<'a>(
        &'a self,
        template: &'a Template,
        snapshot: &'a Snapshot,
    ) -> BoxFuture<'a, Result<Template>>;

    /// Start sandbox `id` from `template`: restore its snapshot when it has
    /// one, else boot its root tree. Returns once envd answers `/health`.
    fn create<'a>(
        &'a self,
        id: &'a SandboxId,
        template: &'a Template,
        limits: Limits,
    ) -> BoxFuture<'a, Result<Instance>>;

    /// Pause: save the whole sandbox to the new directory `dest` and remove
    /// it from the node (absent afterwards). Connections into the sandbox
    /// must be closed first (drop every [`BoxStream`] from `connect`).
    fn checkpoint<'a>(
        &'a self,
        id: &'a SandboxId,
        dest: &'a Path,
    ) -> BoxFuture<'a, Result<Snapshot>>;

    /// Resume: start sandbox `id` (the one saved or any other id) from
    /// `snapshot`, a snapshot of a sandbox made from `template`. Returns
    /// once envd answers `/health`; the snapshot is left unchanged.
    fn restore<'a>(
        &'a self,
        id: &'a SandboxId,
        template: &'a Template,
        snapshot: &'a Snapshot,
        limits: Limits,
    ) -> BoxFuture<'a, Result<Instance>>;

    /// Make `snapshot` (written by `checkpoint`) filesystem-only: drop its
    /// memory, keep the sandbox's filesystem changes, which is all
    /// [`Runtime::boot_with_files`] uses. E2B's `mode="filesystem"`: much
    /// smaller, and sandboxes made from it start fresh processes.
    fn keep_files_only<'a>(&'a self, snapshot: &'a Snapshot) -> BoxFuture<'a, Result<()>>;

    /// Start sandbox `id` by booting `template`'s root tree with the
    /// filesystem changes of `snapshot` over it (its memory, if it has any,
    /// is not used). Returns once envd answers `/health`; the snapshot is
    /// left unchanged.
    fn boot_with_files<'a>(
        &'a self,
        id: &'a SandboxId,
        template: &'a Template,
        snapshot: &'a Snapshot,
        limits: Limits,
    ) -> BoxFuture<'a, Result<Instance>>;

    /// Remove every trace of sandbox `id`. Idempotent.
    fn kill<'a>(&'a self, id: &'a SandboxId) -> BoxFuture<'a, Result<()>>;

    /// A byte stream to TCP `port` inside sandbox `id`. Dropping it resets
    /// the connection at once, so that nothing of it stays in the guest.
    fn connect<'a>(&'a self, id: &'a SandboxId, port: u16) -> BoxFuture<'a, Result<BoxStream>>;

    /// A TCP listener on the host that sandbox `id` reaches at the returned
    /// address (and nothing else outside the sandbox does): how a template
    /// build serves its sandbox an egress proxy. Dropping the listener
    /// closes it.
    fn host_listener<'a>(
        &'a self,
        id: &'a SandboxId,
        port: u16,
    ) -> BoxFuture<'a, Result<(tokio::net::TcpListener, std::net::SocketAddr)>>;

    /// The last `max_bytes` (at most) of the guest's console: its init's
    /// and envd's stdout and stderr, from a line start.
    fn console<'a>(&'a self, id: &'a SandboxId, max_bytes: u64) -> BoxFuture<'a, Result<String>>;

    /// What sandbox `id` uses now.
    fn usage<'a>(&'a self, id: &'a SandboxId) -> BoxFuture<'a, Result<Usage>>;

    /// Every sandbox this runtime has on this node, for re-adoption after a
    /// node restart.
    fn list(&self) -> BoxFuture<'_, Result<Vec<SandboxRecord>>>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sandbox_ids_are_validated() {
        assert!(SandboxId::new("abc-123").is_ok());
        assert!(SandboxId::new("a".repeat(57)).is_ok());
        for bad in ["", "A", "a_b", "a/b", "..", "a b", &"a".repeat(58)] {
            let err = SandboxId::new(bad).unwrap_err();
            assert!(err.to_string().contains("a-z, 0-9 and -"), "{err}");
        }
        let parsed: std::result::Result<SandboxId, _> = serde_json::from_str("\"x/y\"");
        assert!(parsed.is_err());
    }

    #[test]
    fn template_ids_are_validated() {
        assert!(TemplateId::new("base").is_ok());
        assert!(TemplateId::new("code-interpreter_v1.2").is_ok());
        for bad in ["", ".hidden", "..", "a/b", "Base", &"a".repeat(65)] {
            assert!(TemplateId::new(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn errors_say_what_to_do() {
        let e = RuntimeError::RuntimeMissing {
            looked_in: "PATH".into(),
        };
        assert!(e.to_string().contains("apt-get install runsc"));
        let e = RuntimeError::CheckpointFailed {
            id: SandboxId::new("x").unwrap(),
            reason: "r".into(),
            sandbox_lost: true,
        };
        assert!(e.to_string().contains("cleaned up"), "{e}");
        assert_eq!(
            Limits::default(),
            Limits {
                vcpus: 2,
                memory_mib: 512
            }
        );
    }
}
