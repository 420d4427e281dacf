//! The jail: `sandmesh vmm --jail-dir` confines the VMM the way
//! Firecracker's jailer does, built into the VMM instead of a separate
//! binary.
//!
//! A guest escape lands in the VMM process, so the VMM must hold as little
//! as possible. Jailed, it runs
//! - in its own mount, PID, IPC, UTS and network namespaces, as PID 1 of its
//!   PID namespace (so it cannot signal or see other processes, and when it
//!   dies the kernel kills anything it might have left),
//! - with `pivot_root` into a per-VM directory holding only its sockets and
//!   its disk files (the shared base image bind-mounted read-only, the
//!   overlay), so it cannot see host paths or other VMs' files,
//! - as an unprivileged uid/gid with no supplementary groups, no
//!   capabilities (bounding set emptied too) and `no_new_privs`,
//! - under a seccomp filter allowing only the system calls the running VMM
//!   makes ([`seccomp`]),
//! - in a cgroup limiting its CPU and memory, where a cgroup hierarchy is
//!   writable ([`cgroup`]).
//!
//! # Order
//!
//! As root, before anything is forked ([`enter`]): the jail directory is
//! created ([`fs`]) and the cgroup is made ([`cgroup`]); `/dev/kvm` and the
//! console log are already open (the runner opens them before calling
//! [`enter`], so neither needs to exist in the jail). Then
//! `unshare(CLONE_NEWPID)` and `fork` ([`process`]): the child is PID 1 of a
//! new PID namespace. The parent stays outside as the jail's *supervisor*:
//! it puts the child into the cgroup, lets it go on, forwards termination
//! signals, and when the child ends removes the jail directory and the
//! cgroup and exits with the child's status — it never returns. The child
//! unshares the other namespaces, bind-mounts its disks, pivots into the
//! jail ([`namespaces`], [`fs`]) and returns to the runner, which builds
//! the machine with the jail-relative paths of [`JailPaths`]. Before the
//! runner starts any thread it calls [`lock_down`]: credentials are dropped
//! ([`creds`]) and the seccomp filter is installed last, so every thread the
//! VMM later starts (vCPUs, control socket, vsock poller) inherits it.
//!
//! A restore (`runner::restore`) goes the same way: its snapshot chain is
//! mounted read-only under `/snapshots/`, the whole VM is rebuilt inside
//! the jail (every `KVM_SET_*` made, memory mapped `MAP_PRIVATE`), then
//! [`lock_down`], then the vCPUs start. Snapshots the jailed VMM takes are
//! written inside its root and go with the jail directory when it ends.
//!
//! Mounts are made only in the child's private mount namespace, so they
//! disappear with it: nothing mounted can leak on the host.

pub mod cgroup;
pub mod creds;
pub mod fs;
pub mod namespaces;
pub mod process;
pub mod seccomp;

use std::io;
use std::path::{Path, PathBuf};

pub use cgroup::CgroupLimits;

/// How to jail one VMM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JailConfig {
    /// The per-VM jail directory (e.g. `<data>/run/jails/<vm-id>`). It must
    /// not exist: the VMM creates it and removes it when it ends. The VMM's
    /// new root is its `root/` subdirectory ([`JailConfig::root_dir`]); its
    /// file name names the cgroup.
    pub dir: PathBuf,
    /// The unprivileged user and group the VMM runs as (not 0).
    pub uid: u32,
    pub gid: u32,
    /// CPU and memory limits; `None` runs without a cgroup.
    pub cgroup: Option<CgroupLimits>,
}

impl JailConfig {
    /// The directory the VMM sees as `/`.
    pub fn root_dir(&self) -> PathBuf {
        self.dir.join("root")
    }

    /// The host path of a file the VMM sees as `/<name>` (e.g. its control
    /// socket).
    pub fn host_path(&self, name: &str) -> PathBuf {
        self.root_dir().join(name)
    }

    /// The VM's name: the jail directory's file name.
    pub fn vm_name(&self) -> Result<String, JailError> {
        self.dir
            .file_name()
            .and_then(|n| n.to_str())
            .filter(|n| !n.is_empty())
            .map(str::to_owned)
            .ok_or_else(|| JailError::DirName(self.dir.clone()))
    }
}

/// The host files the jailed VMM needs, by their host paths.
#[derive(Debug, Clone)]
pub struct HostDisks {
    /// The base image: bind-mounted read-only at `/rootfs`.
    pub rootfs: PathBuf,
    /// A caller-chosen overlay that must outlive the VMM: created empty on
    /// the host, bind-mounted at `/overlay`, and its map copied back beside
    /// it when the VMM ends. `None`: a temporary overlay inside the jail.
    pub overlay: Option<PathBuf>,
    /// Keep the caller's overlay as it is (a restore: a copy of the
    /// snapshot's overlay) instead of starting it empty; its map
    /// `<overlay>.map` is copied into the jail as `overlay.map`.
    pub keep_overlay: bool,
    /// Snapshot directories (a restore's chain), each bind-mounted
    /// read-only at `/snapshots/<its name>`. (The restore opens their
    /// files before privileges are dropped.)
    pub snapshots: Vec<PathBuf>,
}

/// What the jailed process gets from [`enter`]: its paths, and its link
/// to the supervisor, which [`lock_down`] needs.
#[derive(Debug)]
pub struct Inside {
    pub paths: JailPaths,
    supervisor: process::SupervisorLink,
}

/// Paths as the jailed VMM sees them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JailPaths {
    pub rootfs: PathBuf,
    pub overlay: PathBuf,
    /// [`HostDisks::snapshots`], in the same order.
    pub snapshots: Vec<PathBuf>,
}

/// File names inside the jail root that belong to the jail itself; socket
/// names may not take them.
pub const RESERVED_NAMES: &[&str] = &[
    fs::ROOTFS_NAME,
    fs::OVERLAY_NAME,
    fs::SNAPSHOTS_NAME,
    "overlay.map",
    "overlay.map.tmp",
];

/// Errors setting up or running a jail. Each says what to do.
#[derive(Debug, thiserror::Error)]
pub enum JailError {
    #[error(
        "--jail-dir needs root (running as uid {0}): run sandmesh vmm as root, or leave out --jail-dir"
    )]
    NotRoot(u32),
    #[error(
        "--uid and --gid must name an unprivileged user, not 0 (got uid {uid}, gid {gid}): pick an unused id such as 64000"
    )]
    PrivilegedIds { uid: u32, gid: u32 },
    #[error("--jail-dir {}: has no usable file name to name the VM by", .0.display())]
    DirName(PathBuf),
    #[error("--jail-dir {}: already exists (another VM's jail, or one left by a crash: remove it)", .0.display())]
    DirExists(PathBuf),
    #[error("--jail-dir {}: its parent directory does not exist (create it first)", .0.display())]
    DirParent(PathBuf),
    #[error(
        "{what} {name:?}: with --jail-dir give a plain file name (the socket is created inside the jail, at <jail-dir>/root/<name>)"
    )]
    SocketName { what: &'static str, name: PathBuf },
    #[error("{what} {name:?}: that name is taken by the jail itself (use another)")]
    ReservedName { what: &'static str, name: String },
    #[error("the VMM must still be single-threaded to be jailed, but has {0} threads (a bug)")]
    Threads(usize),
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("{what}: {source}")]
    Sys {
        what: &'static str,
        source: io::Error,
    },
    #[error("cgroup {}: {source}", path.display())]
    Cgroup { path: PathBuf, source: io::Error },
    #[error("the jail's supervisor went away before the VMM was released")]
    SupervisorGone,
    #[error(
        "snapshot directories {} and {} have the same name: a restoring jail mounts each at /snapshots/<name> (rename one, and restore from the renamed chain)", .0.display(), .1.display()
    )]
    SnapshotNames(PathBuf, PathBuf),
    #[error("the seccomp filter: {0}")]
    Seccomp(String),
}

impl JailError {
    fn io(what: &'static str, path: &Path, source: io::Error) -> Self {
        Self::Io {
            what,
            path: path.to_owned(),
            source,
        }
    }

    /// The last OS error of a failed `what`.
    fn last_os(what: &'static str) -> Self {
        Self::Sys {
            what,
            source: io::Error::last_os_error(),
        }
    }
}

/// Check a jail configuration before anything is created.
pub fn validate(cfg: &JailConfig) -> Result<(), JailError> {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    if euid != 0 {
        return Err(JailError::NotRoot(euid));
    }
    if cfg.uid == 0 || cfg.gid == 0 {
        return Err(JailError::PrivilegedIds {
            uid: cfg.uid,
            gid: cfg.gid,
        });
    }
    cfg.vm_name()?;
    if cfg.dir.symlink_metadata().is_ok() {
        return Err(JailError::DirExists(cfg.dir.clone()));
    }
    match cfg.dir.parent() {
        Some(p) if p.as_os_str().is_empty() || p.is_dir() => Ok(()),
        _ => Err(JailError::DirParent(cfg.dir.clone())),
    }
}

/// Check that a socket path given with `--jail-dir` is a plain file name
/// the jail does not use itself; returns it.
pub fn socket_name<'a>(what: &'static str, path: &'a Path) -> Result<&'a str, JailError> {
    let bad = || JailError::SocketName {
        what,
        name: path.to_owned(),
    };
    let mut components = path.components();
    let name = match (components.next(), components.next()) {
        (Some(std::path::Component::Normal(n)), None) => n.to_str().ok_or_else(bad)?,
        _ => return Err(bad()),
    };
    if RESERVED_NAMES.contains(&name) {
        return Err(JailError::ReservedName {
            what,
            name: name.to_owned(),
        });
    }
    Ok(name)
}

/// Jail the calling process (see the module docs for the order).
///
/// Returns only in the jailed child, with the paths it must use. The
/// calling process becomes the supervisor and **does not return**: it exits
/// with the VMM's status once the VMM has ended and the jail is cleaned up.
/// An error before the fork is returned (and nothing is left behind).
pub fn enter(cfg: &JailConfig, disks: &HostDisks) -> Result<Inside, JailError> {
    validate(cfg)?;
    let threads = process::thread_count()?;
    if threads != 1 {
        return Err(JailError::Threads(threads));
    }
    fs::check_snapshot_names(&disks.snapshots)?;
    let dir = fs::JailDir::create(cfg, disks)?;
    let cgroup = match &cfg.cgroup {
        Some(limits) => match cgroup::Cgroup::create(&cfg.vm_name()?, limits) {
            Ok(cg) => cg,
            Err(e) => {
                dir.remove();
                return Err(e);
            }
        },
        None => None,
    };
    match process::fork_into_pid_namespace() {
        Ok(process::Forked::Child(release)) => {
            let supervisor = release.wait()?;
            namespaces::unshare_rest()?;
            namespaces::make_mounts_private()?;
            namespaces::set_hostname()?;
            dir.mount_disks(disks)?;
            fs::pivot_into(&dir.root)?;
            Ok(Inside {
                paths: dir.jail_paths(),
                supervisor,
            })
        }
        Ok(process::Forked::Parent(child)) => process::supervise(child, dir, cgroup),
        Err(e) => {
            if let Some(cg) = cgroup {
                cg.remove();
            }
            dir.remove();
            Err(e)
        }
    }
}

/// Drop every privilege and install the seccomp filter. Called by the
/// jailed VMM after it has opened everything it needs and before it starts
/// any thread, so every thread inherits the filter (it is also installed
/// with TSYNC, which fails rather than leave a thread unfiltered).
///
/// The kernel clears the parent-death signal when credentials change, so
/// it is set again here, and the supervisor checked to be still alive
/// (had it died in between, no signal would ever come).
pub fn lock_down(cfg: &JailConfig, inside: &Inside) -> Result<(), JailError> {
    creds::drop_privileges(cfg.uid, cfg.gid)?;
    inside.supervisor.die_with_it()?;
    seccomp::install()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_names_must_be_plain_and_free() {
        assert_eq!(
            socket_name("control socket", Path::new("c.sock")).ok(),
            Some("c.sock")
        );
        for bad in ["/tmp/c.sock", "a/c.sock", "..", ".", ""] {
            let e = socket_name("control socket", Path::new(bad)).unwrap_err();
            assert!(e.to_string().contains("plain file name"), "{bad}: {e}");
        }
        let e = socket_name("vsock socket", Path::new("overlay.map")).unwrap_err();
        assert!(e.to_string().contains("taken by the jail"), "{e}");
    }

    #[test]
    fn the_jail_dir_names_the_vm_and_holds_the_root() {
        let cfg = JailConfig {
            dir: PathBuf::from("/run/sandmesh/jails/vm-1"),
            uid: 1000,
            gid: 1000,
            cgroup: None,
        };
        assert_eq!(cfg.vm_name().unwrap(), "vm-1");
        assert_eq!(cfg.root_dir(), Path::new("/run/sandmesh/jails/vm-1/root"));
        assert_eq!(
            cfg.host_path("c.sock"),
            Path::new("/run/sandmesh/jails/vm-1/root/c.sock")
        );
        let root = JailConfig {
            dir: PathBuf::from("/"),
            ..cfg
        };
        assert!(matches!(root.vm_name(), Err(JailError::DirName(_))));
    }

    #[test]
    fn limits_follow_the_vm_shape() {
        let l = CgroupLimits::for_vm(2, 512);
        assert_eq!(l.cpu_quota_us, 200_000);
        assert_eq!(l.memory_bytes, (512 + cgroup::VMM_OVERHEAD_MIB) << 20);
    }

    #[test]
    fn refuses_root_ids_and_existing_dirs() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            let cfg = JailConfig {
                dir: std::env::temp_dir().join("smjail-unit-none"),
                uid: 1000,
                gid: 1000,
                cgroup: None,
            };
            assert!(matches!(validate(&cfg), Err(JailError::NotRoot(_))));
            return;
        }
        let mut cfg = JailConfig {
            dir: std::env::temp_dir().join(format!("smjail-unit-{}", std::process::id())),
            uid: 0,
            gid: 1000,
            cgroup: None,
        };
        assert!(matches!(
            validate(&cfg),
            Err(JailError::PrivilegedIds { .. })
        ));
        cfg.uid = 1000;
        assert!(validate(&cfg).is_ok());
        cfg.dir = std::env::temp_dir();
        assert!(matches!(validate(&cfg), Err(JailError::DirExists(_))));
        cfg.dir = PathBuf::from("/nonexistent-smjail/x");
        assert!(matches!(validate(&cfg), Err(JailError::DirParent(_))));
    }
}
