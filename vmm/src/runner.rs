//! `sandmesh vmm`: one microVM from its command-line configuration.
//!
//! [`validate`] checks every input before anything is created (so a bad
//! invocation leaves nothing behind); [`run`] builds the machine — serial
//! console to the log file, i8042, virtio-blk over the copy-on-write disk,
//! virtio-vsock on the hybrid unix socket, both on virtio-mmio — loads the
//! kernel, starts the device event loop, the vCPUs and the control socket,
//! and returns when the guest resets or powers off, or a control
//! `Shutdown` arrives.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use kvm_ioctls::Kvm;
use linux_loader::cmdline::Cmdline;

use crate::arch::x86_64::regs::EntryMode;
use crate::builder::{BuildError, Machine, MachineConfig};
use crate::control::{ControlServer, VmController};
use crate::devices::virtio::block::{Block, CowDisk, CowPaths};
use crate::devices::virtio::vsock::Vsock;
use crate::event_loop::{EventLoop, EventLoopError};
use crate::guest_kernel::{self, KernelImageError};
use crate::jail::{self, HostDisks, JailConfig, JailError};
use crate::vstate::exit::ExitReason;
use crate::vstate::vcpu::VcpuError;

/// The command line every guest gets; the virtio-mmio fragments and the
/// caller's extras follow.
pub const BASE_CMDLINE: &str = "console=ttyS0 reboot=k panic=1 pci=off root=/dev/vda rw \
                                init=/usr/local/sbin/sandmesh-init";
/// vCPUs a `sandmesh vmm` may have.
pub const VCPUS: std::ops::RangeInclusive<u8> = 1..=16;
/// Guest memory in MiB.
pub const MEMORY_MIB: std::ops::RangeInclusive<u64> = 128..=32768;
/// Longest kernel command line (x86 `COMMAND_LINE_SIZE`).
const CMDLINE_MAX: usize = 2048;

#[derive(Debug, Clone)]
pub struct VmmConfig {
    pub kernel: PathBuf,
    pub rootfs: PathBuf,
    /// The copy-on-write overlay; a temporary file (removed at exit) when
    /// absent.
    pub overlay: Option<PathBuf>,
    pub vcpus: u8,
    pub memory_mib: u64,
    pub cmdline_extra: Option<String>,
    pub vsock_uds: PathBuf,
    pub guest_cid: u64,
    pub control: PathBuf,
    pub console_log: PathBuf,
    /// Run jailed (see [`crate::jail`]). The sockets are then plain file
    /// names, created inside the jail (at `<jail dir>/root/<name>` on the
    /// host), and [`run`] returns only in the jailed process.
    pub jail: Option<JailConfig>,
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("vcpus must be in 1..=16, not {0}")]
    Vcpus(u8),
    #[error("memory must be in 128..=32768 MiB, not {0}")]
    MemoryRange(u64),
    #[error("{want} MiB of guest memory is more than this host has ({have} MiB)")]
    MemoryHost { want: u64, have: u64 },
    #[error("{what} {}: {reason}", path.display())]
    Path {
        what: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("kernel {}: {error}", path.display())]
    KernelImage {
        path: PathBuf,
        error: KernelImageError,
    },
    #[error("kernel command line: {0}")]
    Cmdline(String),
    #[error("cannot open /dev/kvm: {0}")]
    Kvm(kvm_ioctls::Error),
    #[error(transparent)]
    Build(#[from] BuildError),
    #[error("root disk: {0}")]
    Disk(String),
    #[error("vsock: {0}")]
    Vsock(String),
    #[error("control socket: {0}")]
    Control(std::io::Error),
    #[error("snapshot: {0}")]
    Snapshot(String),
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error(transparent)]
    Jail(#[from] JailError),
    #[error(transparent)]
    EventLoop(#[from] EventLoopError),
}

fn path_err(what: &'static str, path: &Path, reason: impl ToString) -> RunError {
    RunError::Path {
        what,
        path: path.to_owned(),
        reason: reason.to_string(),
    }
}

fn regular_file(what: &'static str, path: &Path) -> Result<(), RunError> {
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() => Ok(()),
        Ok(_) => Err(path_err(what, path, "not a regular file")),
        Err(e) => Err(path_err(what, path, e)),
    }
}

fn free_path(what: &'static str, path: &Path) -> Result<(), RunError> {
    if path.symlink_metadata().is_ok() {
        return Err(path_err(what, path, "already exists (in use?)"));
    }
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if !parent.is_dir() {
        return Err(path_err(what, path, "its directory does not exist"));
    }
    Ok(())
}

fn host_memory_mib() -> u64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let (pages, size) = unsafe {
        (
            libc::sysconf(libc::_SC_PHYS_PAGES),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    if pages <= 0 || size <= 0 {
        return u64::MAX;
    }
    (pages as u64).saturating_mul(size as u64) >> 20
}

/// Check every input; returns the kernel image.
pub fn validate(cfg: &VmmConfig) -> Result<Vec<u8>, RunError> {
    // First, so that a caller without root hears that before anything else.
    // The jail directory is new, so socket names inside it are free.
    if let Some(j) = &cfg.jail {
        jail::validate(j)?;
        jail::socket_name("vsock socket", &cfg.vsock_uds)?;
        jail::socket_name("control socket", &cfg.control)?;
    }
    if !VCPUS.contains(&cfg.vcpus) {
        return Err(RunError::Vcpus(cfg.vcpus));
    }
    if !MEMORY_MIB.contains(&cfg.memory_mib) {
        return Err(RunError::MemoryRange(cfg.memory_mib));
    }
    let have = host_memory_mib();
    if cfg.memory_mib > have {
        return Err(RunError::MemoryHost {
            want: cfg.memory_mib,
            have,
        });
    }
    regular_file("kernel", &cfg.kernel)?;
    let image = std::fs::read(&cfg.kernel).map_err(|e| path_err("kernel", &cfg.kernel, e))?;
    guest_kernel::check_elf(&image).map_err(|error| RunError::KernelImage {
        path: cfg.kernel.clone(),
        error,
    })?;
    regular_file("root disk", &cfg.rootfs)?;
    crate::guest_rootfs::check_image(&cfg.rootfs)
        .map_err(|e| path_err("root disk", &cfg.rootfs, e))?;
    if let Some(overlay) = &cfg.overlay
        && overlay.exists()
    {
        regular_file("overlay", overlay)?;
    }
    if cfg.jail.is_none() {
        free_path("vsock socket", &cfg.vsock_uds)?;
        free_path("control socket", &cfg.control)?;
    }
    if let Some(p) = cfg.console_log.parent()
        && !p.as_os_str().is_empty()
        && !p.is_dir()
    {
        return Err(path_err(
            "console log",
            &cfg.console_log,
            "its directory does not exist",
        ));
    }
    if cfg.vsock_uds == cfg.control {
        return Err(path_err(
            "control socket",
            &cfg.control,
            "is also the vsock socket",
        ));
    }
    cmdline(cfg, &[])?;
    Ok(image)
}

fn cmdline(cfg: &VmmConfig, fragments: &[String]) -> Result<Cmdline, RunError> {
    let err = |e: linux_loader::cmdline::Error| RunError::Cmdline(e.to_string());
    let mut c = Cmdline::new(CMDLINE_MAX).map_err(err)?;
    c.insert_str(BASE_CMDLINE).map_err(err)?;
    for f in fragments {
        c.insert_str(f).map_err(err)?;
    }
    if let Some(extra) = &cfg.cmdline_extra
        && !extra.trim().is_empty()
    {
        c.insert_str(extra.trim()).map_err(err)?;
    }
    Ok(c)
}

/// The paths the VMM opens: the host's, or the jail's.
struct RunPaths {
    rootfs: PathBuf,
    overlay: Option<PathBuf>,
    vsock_uds: PathBuf,
    control: PathBuf,
}

/// Removes a temporary overlay (and its map) at exit.
struct TempOverlay(Option<CowPaths>);
impl Drop for TempOverlay {
    fn drop(&mut self) {
        if let Some(p) = &self.0 {
            let _ = std::fs::remove_file(&p.overlay);
            let _ = std::fs::remove_file(&p.map);
        }
    }
}

/// Boot and run the microVM until it ends; returns why.
///
/// With [`VmmConfig::jail`], descriptors inherited above stderr are
/// closed (so the process must hold none it still needs), `/dev/kvm` and
/// the console log are opened, then the process forks into the jail: the
/// calling process supervises the jailed child and exits with its status
/// (it does not return), while the child goes on below with jail-relative
/// paths and locks itself down before it starts any thread.
pub fn run(cfg: &VmmConfig) -> Result<ExitReason, RunError> {
    if cfg.jail.is_some() {
        jail::process::close_inherited_fds()?;
    }
    let image = validate(cfg)?;
    // An overlay already there with its map is the disk's state to boot
    // onto (a filesystem-only snapshot's); otherwise the disk starts as
    // the base image.
    let onto_overlay = cfg
        .overlay
        .as_ref()
        .is_some_and(|o| CowPaths::new(&cfg.rootfs, o).map.is_file() && o.is_file());
    let kvm = Kvm::new().map_err(RunError::Kvm)?;
    let console =
        File::create(&cfg.console_log).map_err(|e| path_err("console log", &cfg.console_log, e))?;
    let mut inside = None;
    let paths = match &cfg.jail {
        Some(j) => {
            let entered = jail::enter(
                j,
                &HostDisks {
                    rootfs: cfg.rootfs.clone(),
                    overlay: cfg.overlay.clone(),
                    keep_overlay: onto_overlay,
                    snapshots: Vec::new(),
                },
            )?;
            // The socket names were validated as plain file names.
            let paths = RunPaths {
                rootfs: entered.paths.rootfs.clone(),
                overlay: Some(entered.paths.overlay.clone()),
                vsock_uds: Path::new("/").join(&cfg.vsock_uds),
                control: Path::new("/").join(&cfg.control),
            };
            inside = Some(entered);
            paths
        }
        None => RunPaths {
            rootfs: cfg.rootfs.clone(),
            overlay: cfg.overlay.clone(),
            vsock_uds: cfg.vsock_uds.clone(),
            control: cfg.control.clone(),
        },
    };
    let mem_size = cfg.memory_mib << 20;
    let mut machine = Machine::new(
        &kvm,
        MachineConfig::new(cfg.vcpus, mem_size),
        Box::new(console),
    )?;

    let (overlay_path, mut temp) = match &paths.overlay {
        Some(p) => (p.clone(), TempOverlay(None)),
        None => (
            std::env::temp_dir().join(format!("sandmesh-overlay-{}", std::process::id())),
            TempOverlay(None),
        ),
    };
    let disk_paths = CowPaths::new(&paths.rootfs, &overlay_path);
    if cfg.overlay.is_none() {
        temp.0 = Some(disk_paths.clone());
    }
    let disk = if onto_overlay {
        CowDisk::open(disk_paths)
    } else {
        CowDisk::create(disk_paths)
    }
    .map_err(|e| RunError::Disk(e.to_string()))?;
    let block = Block::new("sandmesh-root", Box::new(disk), false)
        .map_err(|e| RunError::Disk(e.to_string()))?;
    let blk_slot = machine.add_block_device(Arc::new(Mutex::new(block)))?;

    let vsock =
        Vsock::new(cfg.guest_cid, &paths.vsock_uds).map_err(|e| RunError::Vsock(e.to_string()))?;
    let vsock = Arc::new(Mutex::new(vsock));
    let vsock_slot = machine.add_vsock_device(vsock.clone())?;

    let cmdline = cmdline(
        cfg,
        &[blk_slot.cmdline_fragment(), vsock_slot.cmdline_fragment()],
    )?;
    let kernel = machine.load_kernel(&image, &cmdline)?;
    let vcpus = machine.create_vcpus(kernel.entry, EntryMode::Kernel)?;
    let devices = machine.event_loop()?;
    // Everything is open: from here on only the seccomp allowlist, and
    // every thread `serve` starts inherits it.
    if let (Some(j), Some(inside)) = (&cfg.jail, &inside) {
        jail::lock_down(j, inside)?;
    }
    serve(
        Arc::new(machine),
        vcpus,
        devices,
        cfg.memory_mib,
        &paths.control,
    )
}

/// Start the device event loop, the vCPUs and the control socket
/// (snapshots enabled), and wait for the VM to end.
fn serve(
    machine: Arc<Machine>,
    vcpus: Vec<crate::vstate::vcpu::Vcpu>,
    devices: EventLoop,
    memory_mib: u64,
    control: &Path,
) -> Result<ExitReason, RunError> {
    let devices = devices.start().map_err(EventLoopError::from)?;
    let mut handles = Vec::new();
    for v in vcpus {
        handles.push(v.start()?);
    }
    let controller = Arc::new(
        VmController::new(handles, memory_mib, machine.exit.clone()).with_machine(machine.clone()),
    );
    let server = ControlServer::spawn(control, controller.clone());
    let result = match server {
        Ok(server) => {
            let r = controller.run_until_exit();
            drop(server);
            r.map_err(RunError::from)
        }
        Err(e) => {
            controller.shutdown();
            let _ = controller.run_until_exit();
            Err(RunError::Control(e))
        }
    };
    devices.stop();
    result
}

/// `sandmesh vmm --restore`: a microVM from a snapshot directory.
#[derive(Debug, Clone)]
pub struct RestoreConfig {
    pub snapshot: PathBuf,
    /// This VM's root-disk overlay (a copy of the snapshot's, with its
    /// `.map` beside it); the snapshot's own overlay when absent. Needed
    /// jailed.
    pub overlay: Option<PathBuf>,
    /// The root disk's base image; the path the snapshot saved when
    /// absent. Only jailed (a jailed snapshot saves the jail's `/rootfs`).
    pub rootfs: Option<PathBuf>,
    pub vsock_uds: PathBuf,
    pub control: PathBuf,
    pub console_log: PathBuf,
    /// Run jailed, as [`VmmConfig::jail`]. The snapshot directory and the
    /// bases of its diff chain are bind-mounted read-only into the jail;
    /// the cgroup's limits follow the snapshot's shape.
    pub jail: Option<JailConfig>,
}

fn no_jailed_overlay(cfg: &RestoreConfig) -> RunError {
    path_err(
        "snapshot",
        &cfg.snapshot,
        "a jailed --restore needs --overlay: this VM's copy of the snapshot's overlay, its .map beside it",
    )
}

/// The host-side inputs of a jailed restore: the snapshot chain and the
/// base image.
fn jailed_restore_disks(
    cfg: &RestoreConfig,
    state: &schema::snapshot::SnapshotState,
) -> Result<HostDisks, RunError> {
    let overlay = cfg.overlay.clone().ok_or_else(|| no_jailed_overlay(cfg))?;
    regular_file("overlay", &overlay)?;
    let rootfs = match &cfg.rootfs {
        Some(r) => r.clone(),
        None => state
            .devices
            .virtio
            .iter()
            .find_map(|d| match &d.device {
                schema::snapshot::VirtioDeviceState::Block(b) => b.overlay.as_ref(),
                _ => None,
            })
            .map(|p| schema::snapshot::bytes_path(&p.base))
            .ok_or_else(|| path_err("snapshot", &cfg.snapshot, "has no copy-on-write root disk"))?,
    };
    regular_file(
        "root disk (give --rootfs: the snapshot's base image)",
        &rootfs,
    )?;
    let snapshots = crate::snapshot::chain_dirs(&cfg.snapshot)
        .map_err(|e| RunError::Snapshot(e.to_string()))?;
    Ok(HostDisks {
        rootfs,
        overlay: Some(overlay),
        keep_overlay: true,
        snapshots,
    })
}

/// Restore the microVM snapshotted in `cfg.snapshot` and run it until it
/// ends; returns why. Memory is mapped copy-on-write from the snapshot's
/// memory file; dirty pages are logged so the VM can take diff snapshots.
///
/// Jailed, the order is [`run`]'s: inputs checked and `/dev/kvm` and the
/// console opened on the host, the jail entered (the calling process
/// becomes its supervisor and does not return), then the whole VM restored
/// inside it with jail paths — every `KVM_SET_*` made — and only then
/// [`jail::lock_down`], before any thread starts.
pub fn restore(cfg: &RestoreConfig) -> Result<ExitReason, RunError> {
    if cfg.jail.is_some() {
        jail::process::close_inherited_fds()?;
    }
    if !cfg.snapshot.is_dir() {
        return Err(path_err("snapshot", &cfg.snapshot, "not a directory"));
    }
    if let Some(j) = &cfg.jail {
        jail::validate(j)?;
        jail::socket_name("vsock socket", &cfg.vsock_uds)?;
        jail::socket_name("control socket", &cfg.control)?;
        if cfg.overlay.is_none() {
            return Err(no_jailed_overlay(cfg));
        }
    } else {
        if let Some(overlay) = &cfg.overlay {
            regular_file("overlay", overlay)?;
        }
        if let Some(rootfs) = &cfg.rootfs {
            return Err(path_err(
                "root disk",
                rootfs,
                "--rootfs goes with --restore only jailed",
            ));
        }
        free_path("vsock socket", &cfg.vsock_uds)?;
        free_path("control socket", &cfg.control)?;
    }
    if cfg.vsock_uds == cfg.control {
        return Err(path_err(
            "control socket",
            &cfg.control,
            "is also the vsock socket",
        ));
    }
    // The state file is checked before anything is created.
    let (state, _) = crate::snapshot::load_state(&cfg.snapshot)
        .map_err(|e| RunError::Snapshot(e.to_string()))?;
    let jailed = match &cfg.jail {
        Some(j) => {
            let mut j = j.clone();
            if j.cgroup.is_some() {
                j.cgroup = Some(jail::CgroupLimits::for_vm(
                    state.machine.vcpus,
                    state.machine.mem_size >> 20,
                ));
            }
            Some((j, jailed_restore_disks(cfg, &state)?))
        }
        None => None,
    };
    let kvm = Kvm::new().map_err(RunError::Kvm)?;
    let console_existed = cfg.console_log.exists();
    let console =
        File::create(&cfg.console_log).map_err(|e| path_err("console log", &cfg.console_log, e))?;
    let mut inside = None;
    let (snapshot, options, control) = match &jailed {
        Some((j, disks)) => {
            let entered = jail::enter(j, disks)?;
            let top = entered.paths.snapshots.last().cloned().ok_or_else(|| {
                path_err("snapshot", &cfg.snapshot, "has no snapshot chain (a bug)")
            })?;
            let options = crate::snapshot::RestoreOptions {
                track_dirty_pages: true,
                vsock_uds: Some(Path::new("/").join(&cfg.vsock_uds)),
                block_overlay: Some(entered.paths.overlay.clone()),
                block_base: Some(entered.paths.rootfs.clone()),
            };
            inside = Some(entered);
            (top, options, Path::new("/").join(&cfg.control))
        }
        None => (
            cfg.snapshot.clone(),
            crate::snapshot::RestoreOptions {
                track_dirty_pages: true,
                vsock_uds: Some(cfg.vsock_uds.clone()),
                block_overlay: cfg.overlay.clone(),
                block_base: None,
            },
            cfg.control.clone(),
        ),
    };
    let restored = crate::snapshot::restore(&kvm, &snapshot, Box::new(console), &options)
        .and_then(|r| Ok((r.create_vcpus()?, r)));
    let (vcpus, restored) = match restored {
        Ok(r) => r,
        Err(e) => {
            // A failed restore leaves nothing behind (the vsock socket of
            // a half-restored device went with it).
            if !console_existed && inside.is_none() {
                let _ = std::fs::remove_file(&cfg.console_log);
            }
            return Err(RunError::Snapshot(e.to_string()));
        }
    };
    // The loop's start-up kick serves what the guest queued before the
    // snapshot.
    let devices = restored.machine.event_loop()?;
    // Everything is restored: from here on only the seccomp allowlist.
    if let (Some((j, _)), Some(inside)) = (&jailed, &inside) {
        jail::lock_down(j, inside)?;
    }
    let memory_mib = restored.machine.config.mem_size >> 20;
    serve(
        Arc::new(restored.machine),
        vcpus,
        devices,
        memory_mib,
        &control,
    )
}
