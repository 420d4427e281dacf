//! The microvm runtime: one `sandmesh vmm` process per sandbox — our own
//! KVM VMM, jailed — booting the template's kernel and root image, or
//! restoring a snapshot with copy-on-write memory.
//!
//! # On disk
//!
//! ```text
//! <data_dir>/run/microvm/<id>/
//!     meta.json          written first: id, template, limits, the VMM's pid
//!     overlay, overlay.map   the root disk's copy-on-write layer (the base
//!                        image is never written)
//!     vmm.log            the VMM process's own stderr
//!     jail-<id>/root/    the VMM's whole world when jailed: its sockets
//!                        (v.sock, c.sock), the disks bind-mounted in
//!     console.log        the guest's serial console (envd's log)
//! <data_dir>/cache/templates/<template>/microvm/   the template snapshot
//! <snapshot dir>/
//!     vm/                `sandmesh vmm` snapshot: state, memory file(s),
//!                        the overlay and its map
//!     manifest.json      written last: template, limits, source id
//! ```
//!
//! The VMM runs detached (its own session), so sandboxes outlive the node;
//! `list` finds them by `meta.json` and the pid. envd is reached through
//! the VMM's hybrid vsock socket (`CONNECT <port>\n` → `OK <port>\n`).
//!
//! # Where it runs
//!
//! Only where KVM runs guest kernel mode natively ([`vmm::probe`]); the
//! node's `--runtime auto` picks it there. On nested-PVM hosts (this
//! project's CI) the guest kernel cannot boot, and a create fails with
//! envd never answering — cleanly, which the tests check.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{
    BoxFuture, BoxStream, ENVD_PORT, Instance, Limits, Origin, Result, Runtime, RuntimeError,
    RuntimeKind, SandboxId, SandboxRecord, SandboxState, Snapshot, Template, TemplateId, Usage,
    now_unix, read_json, write_json,
};

/// How long `create` and `restore` wait for envd's `/health`.
pub const READY_TIMEOUT: Duration = Duration::from_secs(15);
/// Snapshot manifest format.
const SNAPSHOT_FORMAT: u32 = 1;
/// Socket names inside the sandbox (or jail root) directory.
const VSOCK: &str = "v.sock";
const CONTROL: &str = "c.sock";

/// How the VMMs are confined.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Confinement {
    /// `sandmesh vmm --jail-dir`: namespaces, pivot_root, seccomp, cgroup,
    /// running as this unprivileged user and group.
    Jailed { uid: u32, gid: u32 },
    /// A plain child process (development only).
    Unjailed,
}

/// What the runtime needs to start VMMs.
#[derive(Debug, Clone)]
pub struct MicrovmConfig {
    /// The `sandmesh` binary (its `vmm` subcommand is the VMM).
    pub vmm_bin: PathBuf,
    /// The guest kernel (an uncompressed ELF vmlinux).
    pub kernel: PathBuf,
    pub confinement: Confinement,
    pub ready_timeout: Duration,
}

/// The microvm runtime. Cheap to clone.
#[derive(Clone, Debug)]
pub struct MicrovmRuntime {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    data_dir: PathBuf,
    config: MicrovmConfig,
}

/// `meta.json` of a sandbox directory.
#[derive(Debug, Serialize, Deserialize)]
struct Meta {
    id: SandboxId,
    template: TemplateId,
    limits: Limits,
    /// The VMM process (the jail's supervisor when jailed).
    pid: i32,
    created_unix: u64,
}

/// `manifest.json` of a snapshot directory.
#[derive(Debug, Serialize, Deserialize)]
struct Manifest {
    format: u32,
    runtime: RuntimeKind,
    template: TemplateId,
    source: SandboxId,
    limits: Limits,
    created_unix: u64,
}

/// Copy a (sparse) file keeping its holes: `cp --sparse=always`.
fn copy_sparse(from: &Path, to: &Path) -> Result<()> {
    let out = Command::new("cp")
        .arg("--sparse=always")
        .arg(from)
        .arg(to)
        .output()
        .map_err(|e| RuntimeError::io("running cp for", from, e))?;
    if !out.status.success() {
        return Err(RuntimeError::Command {
            command: format!("cp --sparse=always {} {}", from.display(), to.display()),
            detail: String::from_utf8_lossy(&out.stderr).into_owned(),
        });
    }
    Ok(())
}

/// Whether `pid` is a live (not zombie) process whose command line names
/// `id`.
fn vmm_alive(pid: i32, id: &SandboxId) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // The state follows the parenthesised command name.
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next());
    if matches!(state, Some("Z" | "X") | None) {
        return false;
    }
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| String::from_utf8_lossy(&c).contains(id.as_str()))
        .unwrap_or(false)
}

impl MicrovmRuntime {
    /// A microvm runtime keeping its state under `data_dir`. Refuses hosts
    /// where KVM does not run guest kernels natively (with the probe's
    /// reason), and non-root users when jailing.
    pub fn new(data_dir: impl Into<PathBuf>, config: MicrovmConfig) -> Result<Self> {
        let probe = vmm::probe::probe_kvm();
        if !probe.native {
            return Err(RuntimeError::Unavailable {
                runtime: RuntimeKind::Microvm,
                reason: probe.reason,
            });
        }
        Self::new_unprobed(data_dir, config)
    }

    /// [`MicrovmRuntime::new`] without the KVM probe: for tests that check
    /// how a create fails where the guest cannot boot.
    pub fn new_unprobed(data_dir: impl Into<PathBuf>, config: MicrovmConfig) -> Result<Self> {
        let data_dir = data_dir.into();
        // SAFETY: geteuid has no preconditions.
        if matches!(config.confinement, Confinement::Jailed { .. })
            && unsafe { libc::geteuid() } != 0
        {
            return Err(RuntimeError::NotRoot {
                runtime: RuntimeKind::Microvm,
            });
        }
        for (what, path) in [
            ("the sandmesh binary", &config.vmm_bin),
            ("the guest kernel", &config.kernel),
        ] {
            if !path.is_file() {
                return Err(RuntimeError::Unavailable {
                    runtime: RuntimeKind::Microvm,
                    reason: format!("{what} {} does not exist", path.display()),
                });
            }
        }
        check_guest_kernel(&config.kernel).map_err(|reason| RuntimeError::Unavailable {
            runtime: RuntimeKind::Microvm,
            reason,
        })?;
        let data_dir = std::path::absolute(&data_dir)
            .map_err(|e| RuntimeError::io("resolving", &data_dir, e))?;
        let inner = Inner { data_dir, config };
        let dir = inner.sandboxes_dir();
        std::fs::create_dir_all(&dir).map_err(|e| RuntimeError::io("creating", &dir, e))?;
        Ok(Self {
            inner: Arc::new(inner),
        })
    }

    pub fn sandbox_dir(&self, id: &SandboxId) -> PathBuf {
        self.inner.sandbox_dir(id)
    }
}

/// Refuse a kernel that is not a sandmesh guest kernel up front — an
/// uncompressed x86-64 vmlinux whose embedded configuration has every
/// option the guest needs — instead of every create failing later with
/// envd never answering.
fn check_guest_kernel(path: &Path) -> std::result::Result<(), String> {
    use vmm::guest_kernel::{REQUIRED_FRAGMENT, check_elf, embedded_config, missing_required};
    let not_ours = |why: String| {
        format!(
            "the guest kernel {} is not a sandmesh guest kernel: {why} (build it with `cargo xtask guest`)",
            path.display()
        )
    };
    let image = std::fs::read(path).map_err(|e| not_ours(e.to_string()))?;
    check_elf(&image).map_err(|e| not_ours(e.to_string()))?;
    let config = embedded_config(&image).map_err(|e| not_ours(e.to_string()))?;
    let missing = missing_required(REQUIRED_FRAGMENT, &config);
    if !missing.is_empty() {
        return Err(not_ours(format!("it lacks {}", missing.join(", "))));
    }
    Ok(())
}

impl MicrovmRuntime {
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Inner) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || f(&inner))
            .await
            .map_err(|e| RuntimeError::Command {
                command: "microvm runtime worker".into(),
                detail: e.to_string(),
            })?
    }

    /// Start `id` (boot, or restore `snapshot`), wait for envd; undo
    /// everything on error.
    async fn start(
        &self,
        id: &SandboxId,
        template: &Template,
        limits: Limits,
        origin: Origin,
    ) -> Result<Instance> {
        let t0 = Instant::now();
        let started = {
            let (id, template) = (id.clone(), template.clone());
            self.blocking(move |inner| inner.start(&id, &template, limits, &origin))
                .await
        };
        let runtime_start = match started {
            Ok(d) => d,
            Err(e) => {
                let _ = self.kill(id).await;
                return Err(e);
            }
        };
        if let Err(e) = self.wait_ready(id).await {
            let _ = self.kill(id).await;
            return Err(e);
        }
        Ok(Instance {
            id: id.clone(),
            runtime: RuntimeKind::Microvm,
            template: template.id.clone(),
            limits,
            ready_after: t0.elapsed(),
            runtime_start,
        })
    }

    /// Poll envd's `/health` until 204; fail early when the VMM exits.
    async fn wait_ready(&self, id: &SandboxId) -> Result<()> {
        let t0 = Instant::now();
        let timeout = self.inner.config.ready_timeout;
        let mut pause = Duration::from_millis(2);
        let mut last;
        loop {
            match self.connect(id, ENVD_PORT).await {
                Ok(mut stream) => match super::http_status(&mut stream, "/health").await {
                    Ok(204) => return Ok(()),
                    Ok(status) => last = format!("/health answered {status}"),
                    Err(e) => last = e.to_string(),
                },
                Err(e) => last = e.to_string(),
            }
            let alive = self.inner.alive(id);
            if !alive || t0.elapsed() > timeout {
                let dir = self.inner.sandbox_dir(id);
                let console =
                    super::file_tail_lines(&self.inner.console_path(id), 1500).unwrap_or_default();
                let vmm_log =
                    super::file_tail_lines(&dir.join("vmm.log"), 1500).unwrap_or_default();
                let why = if alive { "" } else { "the VMM exited; " };
                return Err(RuntimeError::NotReady {
                    id: id.clone(),
                    waited: t0.elapsed(),
                    detail: format!(
                        "{why}{last}; VMM log: {}; console: {}",
                        vmm_log.trim(),
                        console.trim()
                    ),
                });
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(50));
        }
    }
}

impl Inner {
    /// Where template `id`'s snapshot lives.
    fn template_snapshot_dir(&self, id: &TemplateId) -> PathBuf {
        self.data_dir
            .join("cache")
            .join("templates")
            .join(id.as_str())
            .join("microvm")
    }

    fn sandboxes_dir(&self) -> PathBuf {
        self.data_dir.join("run").join("microvm")
    }

    fn sandbox_dir(&self, id: &SandboxId) -> PathBuf {
        self.sandboxes_dir().join(id.as_str())
    }

    /// The VMM's jail directory. Its file name is the VM's name, which
    /// names its cgroup (`sandmesh-<name>`): it must differ between the
    /// sandboxes of a host, hence the id in it.
    fn jail_dir(&self, id: &SandboxId) -> PathBuf {
        self.sandbox_dir(id).join(format!("jail-{id}"))
    }

    /// Where the VMM's own files are seen from the host: the jail root, or
    /// the sandbox directory.
    fn vm_root(&self, id: &SandboxId) -> PathBuf {
        match self.config.confinement {
            Confinement::Jailed { .. } => self.jail_dir(id).join("root"),
            Confinement::Unjailed => self.sandbox_dir(id),
        }
    }

    fn console_path(&self, id: &SandboxId) -> PathBuf {
        self.sandbox_dir(id).join("console.log")
    }

    fn alive(&self, id: &SandboxId) -> bool {
        read_json::<Meta>(&self.sandbox_dir(id).join("meta.json"))
            .is_ok_and(|m| vmm_alive(m.pid, id))
    }

    /// Spawn the VMM; returns how long the spawn took (the runtime's own
    /// start; envd's readiness is waited for by the caller).
    fn start(
        &self,
        id: &SandboxId,
        template: &Template,
        limits: Limits,
        origin: &Origin,
    ) -> Result<Duration> {
        let t0 = Instant::now();
        let dir = self.sandbox_dir(id);
        if dir.exists() {
            return Err(RuntimeError::AlreadyExists(id.clone()));
        }
        std::fs::create_dir_all(&dir).map_err(|e| RuntimeError::io("creating", &dir, e))?;
        let overlay = dir.join("overlay");
        let mut cmd = Command::new(&self.config.vmm_bin);
        cmd.arg("vmm");
        // Each sandbox gets its own copy of a snapshot's disk layer (a boot
        // onto an existing overlay keeps it).
        if let Origin::Restore(snap) | Origin::Files(snap) = origin {
            let vm = snap.join("vm");
            copy_sparse(&vm.join("overlay"), &overlay)?;
            copy_sparse(&vm.join("overlay.map"), &dir.join("overlay.map"))?;
        }
        match origin {
            Origin::Restore(snap) => {
                let vm = snap.join("vm");
                cmd.arg("--restore").arg(&vm);
                // A jailed snapshot names its base image by the jail's
                // `/rootfs`; the jailed restore mounts this one there.
                if let (Confinement::Jailed { .. }, Some(image)) =
                    (self.config.confinement, &template.rootfs_image)
                {
                    cmd.arg("--rootfs").arg(image);
                }
            }
            Origin::Boot | Origin::Files(_) => {
                let image =
                    template
                        .rootfs_image
                        .as_ref()
                        .ok_or_else(|| {
                            RuntimeError::BadTemplate {
                        template: template.id.clone(),
                        reason:
                            "it has no root disk image (the microvm runtime boots an ext4 image)"
                                .into(),
                    }
                        })?;
                vmm::guest_rootfs::check_image(image).map_err(|e| RuntimeError::BadTemplate {
                    template: template.id.clone(),
                    reason: format!("{}: {e}", image.display()),
                })?;
                cmd.arg("--kernel")
                    .arg(&self.config.kernel)
                    .arg("--rootfs")
                    .arg(image)
                    .arg("--vcpus")
                    .arg(limits.vcpus.to_string())
                    .arg("--memory-mib")
                    .arg(limits.memory_mib.to_string());
            }
        }
        cmd.arg("--overlay").arg(&overlay);
        match self.config.confinement {
            Confinement::Jailed { uid, gid } => {
                cmd.arg("--jail-dir")
                    .arg(self.jail_dir(id))
                    .arg("--uid")
                    .arg(uid.to_string())
                    .arg("--gid")
                    .arg(gid.to_string())
                    .arg("--vsock-uds")
                    .arg(VSOCK)
                    .arg("--control")
                    .arg(CONTROL);
            }
            Confinement::Unjailed => {
                cmd.arg("--vsock-uds")
                    .arg(dir.join(VSOCK))
                    .arg("--control")
                    .arg(dir.join(CONTROL));
            }
        }
        cmd.arg("--console-log").arg(self.console_path(id));
        let log = std::fs::File::create(dir.join("vmm.log"))
            .map_err(|e| RuntimeError::io("creating", &dir.join("vmm.log"), e))?;
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(log);
        // Its own session: the VMM outlives the node (and its terminal).
        use std::os::unix::process::CommandExt;
        // SAFETY: setsid is async-signal-safe and touches no memory.
        unsafe {
            cmd.pre_exec(|| {
                if libc::setsid() < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .map_err(|e| RuntimeError::io("starting", &self.config.vmm_bin, e))?;
        let meta = Meta {
            id: id.clone(),
            template: template.id.clone(),
            limits,
            pid: child.id() as i32,
            created_unix: now_unix(),
        };
        // The child is reaped by whoever waits for it; a detached VMM whose
        // node died is reaped by init.
        std::mem::forget(child);
        write_json(&dir.join("meta.json"), &meta)?;
        Ok(t0.elapsed())
    }

    fn control(
        &self,
        id: &SandboxId,
        request: schema::vmm::Request,
    ) -> Result<schema::vmm::Response> {
        let root = self.vm_root(id);
        let (_dir, path) =
            socket_path(&root, CONTROL).map_err(|e| RuntimeError::io("opening", &root, e))?;
        let mut stream = std::os::unix::net::UnixStream::connect(&path)
            .map_err(|e| RuntimeError::io("connecting to", &root.join(CONTROL), e))?;
        let _ = stream.set_read_timeout(Some(Duration::from_secs(60)));
        schema::vmm::call(&mut stream, request).map_err(|e| RuntimeError::Command {
            command: format!("VMM control request to sandbox {id}"),
            detail: e.to_string(),
        })
    }

    /// Stop the VMM (SIGKILL; when jailed, SIGTERM to the supervisor, which
    /// kills the VMM and removes the jail), then remove the directory.
    fn cleanup(&self, id: &SandboxId) -> Result<()> {
        let dir = self.sandbox_dir(id);
        if let Ok(meta) = read_json::<Meta>(&dir.join("meta.json"))
            && vmm_alive(meta.pid, id)
        {
            let signal = match self.config.confinement {
                Confinement::Jailed { .. } => libc::SIGTERM,
                Confinement::Unjailed => libc::SIGKILL,
            };
            // SAFETY: kill has no memory-safety preconditions.
            unsafe { libc::kill(meta.pid, signal) };
            let t0 = Instant::now();
            while vmm_alive(meta.pid, id) {
                if t0.elapsed() > Duration::from_secs(5) {
                    // SAFETY: as above.
                    unsafe { libc::kill(meta.pid, libc::SIGKILL) };
                }
                if t0.elapsed() > Duration::from_secs(10) {
                    return Err(RuntimeError::Cleanup {
                        id: id.clone(),
                        left: format!("VMM process {} that survives SIGKILL", meta.pid),
                    });
                }
                // Reap it if it is our child (no effect otherwise).
                // SAFETY: waitpid on a pid with WNOHANG and no status pointer.
                unsafe { libc::waitpid(meta.pid, std::ptr::null_mut(), libc::WNOHANG) };
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(RuntimeError::Cleanup {
                id: id.clone(),
                left: format!("{} ({e})", dir.display()),
            }),
        }
    }

    /// Snapshot the VM into `dest` (see the module docs) and stop it.
    fn checkpoint(&self, id: &SandboxId, dest: &Path) -> Result<Snapshot> {
        let dir = self.sandbox_dir(id);
        let meta: Meta = read_json(&dir.join("meta.json")).map_err(|_| {
            if dir.exists() {
                RuntimeError::NotRunning(id.clone())
            } else {
                RuntimeError::NotFound(id.clone())
            }
        })?;
        if !vmm_alive(meta.pid, id) {
            return Err(RuntimeError::NotRunning(id.clone()));
        }
        if dest.exists()
            && std::fs::read_dir(dest)
                .map(|mut d| d.next().is_some())
                .unwrap_or(true)
        {
            return Err(RuntimeError::SnapshotExists(dest.to_owned()));
        }
        // The VMM writes inside its own root; the result moves to `dest`.
        let (seen_by_vmm, on_host) = match self.config.confinement {
            Confinement::Jailed { .. } => ("/snap".to_owned(), self.vm_root(id).join("snap")),
            Confinement::Unjailed => {
                let p = dir.join("snap");
                (p.display().to_string(), p)
            }
        };
        let saved = self.control(
            id,
            schema::vmm::Request::Snapshot {
                dir: seen_by_vmm,
                kind: schema::vmm::SnapshotKind::Full,
                resume: false,
            },
        );
        let refused = |reason: String| RuntimeError::CheckpointFailed {
            id: id.clone(),
            reason,
            sandbox_lost: false,
        };
        match saved {
            Ok(schema::vmm::Response::Snapshot { .. }) => {}
            Ok(schema::vmm::Response::Error { message }) => {
                let _ = self.control(id, schema::vmm::Request::Resume);
                let _ = std::fs::remove_dir_all(&on_host);
                return Err(refused(message));
            }
            Ok(other) => {
                let _ = self.control(id, schema::vmm::Request::Resume);
                return Err(refused(format!("unexpected VMM answer {other:?}")));
            }
            Err(e) => {
                // No answer: a VMM that died mid-save took the sandbox
                // with it (what it wrote is thrown away: the snapshot's
                // manifest was never written, so it is never restored).
                let lost = !vmm_alive(meta.pid, id);
                if lost {
                    let _ = std::fs::remove_dir_all(&on_host);
                }
                return Err(RuntimeError::CheckpointFailed {
                    id: id.clone(),
                    reason: e.to_string(),
                    sandbox_lost: lost,
                });
            }
        }
        // The VM is paused and saved. A jailed VMM removes its jail, `/snap`
        // included, when it ends: take the snapshot out of it first (the
        // VMM writes nothing more there), then stop the VMM, which writes
        // the overlay's map back, and keep the disk layer.
        let taken = dir.join("snap-taken");
        if let Err(e) = move_dir(&on_host, &taken) {
            let _ = self.control(id, schema::vmm::Request::Resume);
            let _ = std::fs::remove_dir_all(&on_host);
            return Err(refused(format!(
                "taking the snapshot out of the VMM's jail: {e}"
            )));
        }
        let _ = self.control(id, schema::vmm::Request::Shutdown);
        let t0 = Instant::now();
        while vmm_alive(meta.pid, id) && t0.elapsed() < Duration::from_secs(5) {
            // SAFETY: waitpid with WNOHANG on a pid; no status pointer.
            unsafe { libc::waitpid(meta.pid, std::ptr::null_mut(), libc::WNOHANG) };
            std::thread::sleep(Duration::from_millis(2));
        }
        let finish = || -> Result<()> {
            let vm = dest.join("vm");
            std::fs::create_dir_all(dest).map_err(|e| RuntimeError::io("creating", dest, e))?;
            move_dir(&taken, &vm)?;
            copy_sparse(&dir.join("overlay"), &vm.join("overlay"))?;
            copy_sparse(&dir.join("overlay.map"), &vm.join("overlay.map"))?;
            // Written last: a snapshot without its manifest is never restored.
            write_json(
                &dest.join("manifest.json"),
                &Manifest {
                    format: SNAPSHOT_FORMAT,
                    runtime: RuntimeKind::Microvm,
                    template: meta.template.clone(),
                    source: id.clone(),
                    limits: meta.limits,
                    created_unix: now_unix(),
                },
            )
        };
        let finished = finish();
        let cleaned = self.cleanup(id);
        if let Err(e) = finished {
            let _ = std::fs::remove_dir_all(dest);
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
            runtime: RuntimeKind::Microvm,
        })
    }

    /// Check that `snapshot` is a whole microvm snapshot of `template`;
    /// its manifest.
    fn check_snapshot(&self, template: &Template, snapshot: &Snapshot) -> Result<Manifest> {
        let bad = |reason: String| RuntimeError::BadSnapshot {
            dir: snapshot.dir.clone(),
            reason,
        };
        let manifest: Manifest = read_json(&snapshot.dir.join("manifest.json")).map_err(|e| {
            bad(format!(
                "no readable manifest (an unfinished snapshot?): {e}"
            ))
        })?;
        if manifest.format != SNAPSHOT_FORMAT || manifest.runtime != RuntimeKind::Microvm {
            return Err(bad(format!(
                "format {} of runtime {}, expected format {SNAPSHOT_FORMAT} of microvm",
                manifest.format, manifest.runtime
            )));
        }
        if manifest.template != template.id {
            return Err(bad(format!(
                "it was made from template {}, not {}",
                manifest.template, template.id
            )));
        }
        Ok(manifest)
    }

    fn list(&self) -> Result<Vec<SandboxRecord>> {
        let dir = self.sandboxes_dir();
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(RuntimeError::io("listing", &dir, e)),
        };
        let mut out = Vec::new();
        for entry in entries.flatten() {
            let Ok(id) = SandboxId::new(entry.file_name().to_string_lossy().into_owned()) else {
                continue;
            };
            let meta = read_json::<Meta>(&entry.path().join("meta.json")).ok();
            let running = meta.as_ref().is_some_and(|m| vmm_alive(m.pid, &id));
            out.push(SandboxRecord {
                id,
                template: meta.map(|m| m.template),
                state: if running {
                    SandboxState::Running
                } else {
                    SandboxState::Stopped
                },
            });
        }
        Ok(out)
    }

    fn usage(&self, id: &SandboxId) -> Result<Usage> {
        let meta: Meta = read_json(&self.sandbox_dir(id).join("meta.json"))
            .map_err(|_| RuntimeError::NotFound(id.clone()))?;
        if !vmm_alive(meta.pid, id) {
            return Err(RuntimeError::NotRunning(id.clone()));
        }
        // The jailed VMM is the supervisor's child: count the whole tree.
        let mut pids = vec![meta.pid];
        if let Ok(children) =
            std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", meta.pid))
        {
            pids.extend(
                children
                    .split_whitespace()
                    .filter_map(|p| p.parse::<i32>().ok()),
            );
        }
        let mut usage = Usage::default();
        for pid in pids {
            if let Ok(rollup) = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")) {
                let kib = |key: &str| {
                    rollup
                        .lines()
                        .find(|l| l.starts_with(key))
                        .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
                        .unwrap_or(0)
                        * 1024
                };
                usage.memory_rss_bytes += kib("Rss:");
                usage.memory_pss_bytes += kib("Pss:");
            }
            if let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat"))
                && let Some((_, rest)) = stat.rsplit_once(')')
            {
                let f: Vec<u64> = rest
                    .split_whitespace()
                    .filter_map(|v| v.parse().ok())
                    .collect();
                // utime and stime are fields 14 and 15; `rest` starts at 3.
                let ticks = f.get(10).copied().unwrap_or(0) + f.get(11).copied().unwrap_or(0);
                // SAFETY: sysconf has no preconditions.
                let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
                usage.cpu_time += Duration::from_millis(ticks * 1000 / hz);
            }
        }
        use std::os::unix::fs::MetadataExt;
        usage.disk_bytes = std::fs::metadata(self.sandbox_dir(id).join("overlay"))
            .map(|m| m.blocks() * 512)
            .unwrap_or(0);
        Ok(usage)
    }
}

/// A path to `dir/name` short enough for a unix socket address (108
/// bytes): the directory through an open descriptor, `/proc/self/fd/N`,
/// when the plain path is too long. Keep the returned file open while the
/// path is used.
fn socket_path(dir: &Path, name: &str) -> std::io::Result<(Option<std::fs::File>, PathBuf)> {
    let plain = dir.join(name);
    if plain.as_os_str().len() < 100 {
        return Ok((None, plain));
    }
    use std::os::fd::AsRawFd;
    let d = std::fs::File::open(dir)?;
    let short = PathBuf::from(format!("/proc/self/fd/{}/{name}", d.as_raw_fd()));
    Ok((Some(d), short))
}

/// Move a directory (rename; copy across file systems).
fn move_dir(from: &Path, to: &Path) -> Result<()> {
    if std::fs::rename(from, to).is_ok() {
        return Ok(());
    }
    let out = Command::new("cp")
        .arg("-a")
        .arg("--sparse=always")
        .arg(from)
        .arg(to)
        .output()
        .map_err(|e| RuntimeError::io("copying", from, e))?;
    if !out.status.success() {
        return Err(RuntimeError::Command {
            command: format!("cp -a {} {}", from.display(), to.display()),
            detail: String::from_utf8_lossy(&out.stderr).into_owned(),
        });
    }
    std::fs::remove_dir_all(from).map_err(|e| RuntimeError::io("removing", from, e))
}

impl Runtime for MicrovmRuntime {
    fn kind(&self) -> RuntimeKind {
        RuntimeKind::Microvm
    }

    fn prepare_template<'a>(
        &'a self,
        template: &'a Template,
        limits: Limits,
    ) -> BoxFuture<'a, Result<Template>> {
        Box::pin(async move {
            if let Some(t) = self.cached_template(template, limits) {
                return Ok(t);
            }
            let dest = self.inner.template_snapshot_dir(&template.id);
            let _ = std::fs::remove_dir_all(&dest);
            // A private id: never one of the node's sandboxes.
            let id = SandboxId::new(format!("tpl-{}-{}", std::process::id(), now_unix()))?;
            let booted = Template {
                snapshot: None,
                ..template.clone()
            };
            self.create(&id, &booted, limits).await?;
            let snapshot = self.checkpoint(&id, &dest).await;
            let _ = self.kill(&id).await;
            Ok(Template {
                snapshot: Some(snapshot?),
                ..template.clone()
            })
        })
    }

    fn engine(&self) -> String {
        let confinement = match self.inner.config.confinement {
            Confinement::Jailed { .. } => "jailed",
            Confinement::Unjailed => "unjailed",
        };
        format!(
            "microvm: snapshot format {}, {confinement}",
            schema::snapshot::FORMAT_VERSION
        )
    }

    fn cached_template(&self, template: &Template, limits: Limits) -> Option<Template> {
        let snapshot = Snapshot {
            dir: self.inner.template_snapshot_dir(&template.id),
            template: template.id.clone(),
            runtime: RuntimeKind::Microvm,
        };
        // A snapshot taken with other limits would give its sandboxes the
        // wrong vCPUs and memory: only one with these is reused.
        let reusable = self
            .inner
            .check_snapshot(template, &snapshot)
            .is_ok_and(|m| m.limits == limits);
        reusable.then(|| Template {
            snapshot: Some(snapshot),
            ..template.clone()
        })
    }

    fn adopt_template<'a>(
        &'a self,
        template: &'a Template,
        snapshot: &'a Snapshot,
    ) -> BoxFuture<'a, Result<Template>> {
        Box::pin(async move {
            self.inner.check_snapshot(template, snapshot)?;
            let dest = self.inner.template_snapshot_dir(&template.id);
            let _ = std::fs::remove_dir_all(&dest);
            if let Some(parent) = dest.parent() {
                std::fs::create_dir_all(parent)
                    .map_err(|e| RuntimeError::io("creating", parent, e))?;
            }
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
                Some(s) => {
                    self.inner.check_snapshot(template, s)?;
                    self.start(id, template, limits, Origin::Restore(s.dir.clone()))
                        .await
                }
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
            let (id, dest) = (id.clone(), dest.to_owned());
            self.blocking(move |inner| inner.checkpoint(&id, &dest))
                .await
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
            let vm = snapshot.dir.join("vm");
            self.blocking(move |_| {
                // Everything but the disk layer: VM state and memory.
                let entries =
                    std::fs::read_dir(&vm).map_err(|e| RuntimeError::io("reading", &vm, e))?;
                for entry in entries {
                    let entry = entry.map_err(|e| RuntimeError::io("reading", &vm, e))?;
                    let name = entry.file_name();
                    if name == "overlay" || name == "overlay.map" {
                        continue;
                    }
                    let path = entry.path();
                    let removed = if path.is_dir() {
                        std::fs::remove_dir_all(&path)
                    } else {
                        std::fs::remove_file(&path)
                    };
                    removed.map_err(|e| RuntimeError::io("removing", &path, e))?;
                }
                Ok(())
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
            self.inner.check_snapshot(template, snapshot)?;
            let vm = snapshot.dir.join("vm");
            if !vm.join("overlay").is_file() || !vm.join("overlay.map").is_file() {
                return Err(RuntimeError::BadSnapshot {
                    dir: snapshot.dir.clone(),
                    reason: "its disk layer vm/overlay (with its .map) is missing".into(),
                });
            }
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
            if !self.inner.sandbox_dir(id).exists() {
                return Err(RuntimeError::NotFound(id.clone()));
            }
            let err = |source| RuntimeError::Connect {
                id: id.clone(),
                port,
                source,
            };
            let (_dir, path) = socket_path(&self.inner.vm_root(id), VSOCK).map_err(err)?;
            let mut stream = tokio::net::UnixStream::connect(&path).await.map_err(err)?;
            vsock_handshake(&mut stream, port).await.map_err(err)?;
            Ok(Box::new(stream) as BoxStream)
        })
    }

    fn host_listener<'a>(
        &'a self,
        _id: &'a SandboxId,
        _port: u16,
    ) -> BoxFuture<'a, Result<(tokio::net::TcpListener, std::net::SocketAddr)>> {
        Box::pin(async move {
            // A microVM has no network device yet (virtio-net is issue 18's).
            Err(RuntimeError::Unavailable {
                runtime: RuntimeKind::Microvm,
                reason:
                    "a microVM has no network to the host yet: build templates on a gvisor node"
                        .into(),
            })
        })
    }

    fn console<'a>(&'a self, id: &'a SandboxId, max_bytes: u64) -> BoxFuture<'a, Result<String>> {
        Box::pin(async move {
            if !self.inner.sandbox_dir(id).exists() {
                return Err(RuntimeError::NotFound(id.clone()));
            }
            let path = self.inner.console_path(id);
            super::file_tail_lines(&path, max_bytes)
                .map_err(|e| RuntimeError::io("reading", &path, e))
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

/// The host side of the VMM's hybrid vsock: `CONNECT <port>\n`, then
/// `OK <host port>\n`; anything else (the guest has nothing listening: the
/// VMM closes the connection) is an error.
pub async fn vsock_handshake<S>(stream: &mut S, port: u16) -> std::io::Result<()>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    stream
        .write_all(format!("CONNECT {port}\n").as_bytes())
        .await?;
    // Byte by byte: what follows the line is the guest's data.
    let mut line = Vec::with_capacity(16);
    let read = async {
        loop {
            let mut b = [0u8; 1];
            if stream.read(&mut b).await? == 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::ConnectionRefused,
                    format!("nothing listens on vsock port {port} in the guest"),
                ));
            }
            if b[0] == b'\n' {
                return Ok(());
            }
            line.push(b[0]);
            if line.len() > 32 {
                return Err(std::io::Error::other("the VMM's vsock answer is too long"));
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(2), read)
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
    let text = String::from_utf8_lossy(&line);
    if !text.starts_with("OK ") {
        return Err(std::io::Error::other(format!(
            "the VMM answered {text:?} to CONNECT {port}"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn vsock_handshake_reads_exactly_the_answer_line() {
        let (mut host, mut vmm) = tokio::io::duplex(256);
        let peer = tokio::spawn(async move {
            let mut req = [0u8; 14];
            vmm.read_exact(&mut req).await.unwrap();
            assert_eq!(&req, b"CONNECT 49983\n");
            vmm.write_all(b"OK 1073741824\nguest data").await.unwrap();
            vmm
        });
        vsock_handshake(&mut host, 49983).await.unwrap();
        let mut rest = [0u8; 10];
        host.read_exact(&mut rest).await.unwrap();
        assert_eq!(&rest, b"guest data");
        drop(peer.await.unwrap());

        let (mut host, mut vmm) = tokio::io::duplex(256);
        tokio::spawn(async move {
            let mut req = [0u8; 14];
            let _ = vmm.read_exact(&mut req).await;
            // The VMM closes the connection: nothing listens in the guest.
        });
        let e = vsock_handshake(&mut host, 49983).await.unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused);

        let (mut host, mut vmm) = tokio::io::duplex(256);
        tokio::spawn(async move {
            let mut req = [0u8; 14];
            let _ = vmm.read_exact(&mut req).await;
            let _ = vmm.write_all(b"NOPE\n").await;
        });
        assert!(vsock_handshake(&mut host, 49983).await.is_err());
    }
}
