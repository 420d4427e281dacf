//! The jailed VMM's cgroup: a CPU quota and a memory limit.
//!
//! Chosen by probing, in order:
//! 1. cgroup v2, when our own cgroup on the unified hierarchy offers both
//!    `cpu` and `memory` (enabled for children through
//!    `cgroup.subtree_control` if need be): `sandmesh-<vm>` below it, with
//!    `cpu.max` and `memory.max`.
//! 2. cgroup v1 (hybrid hosts): `sandmesh-<vm>` below our own cgroup in the
//!    `cpu` hierarchy (`cpu.cfs_quota_us`/`cpu.cfs_period_us`) and the
//!    `memory` hierarchy (`memory.limit_in_bytes`), each where writable.
//! 3. Neither writable: a warning, and the VMM runs unlimited.
//!
//! The group sits below the supervisor's own cgroup, so the VMM stays
//! inside whatever limits the node itself runs under.

use std::io;
use std::path::{Path, PathBuf};

use super::JailError;

/// The CFS period the quota is expressed in.
pub const CPU_PERIOD_US: u64 = 100_000;
/// Memory the VMM process needs beyond the guest's RAM (its own heap,
/// stacks, device buffers).
pub const VMM_OVERHEAD_MIB: u64 = 128;

/// Limits for one VMM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CgroupLimits {
    /// CPU time per [`CPU_PERIOD_US`], in microseconds.
    pub cpu_quota_us: u64,
    /// Memory limit in bytes.
    pub memory_bytes: u64,
}

impl CgroupLimits {
    /// One CPU per vCPU; guest memory plus [`VMM_OVERHEAD_MIB`].
    pub fn for_vm(vcpus: u8, memory_mib: u64) -> Self {
        Self {
            cpu_quota_us: u64::from(vcpus.max(1)) * CPU_PERIOD_US,
            memory_bytes: memory_mib.saturating_add(VMM_OVERHEAD_MIB) << 20,
        }
    }
}

/// A created cgroup (one directory per hierarchy on v1).
#[derive(Debug)]
pub struct Cgroup {
    /// The group's directories; the VMM's pid goes into each `cgroup.procs`.
    pub dirs: Vec<PathBuf>,
    pub version: u8,
}

/// A mount from `/proc/self/mountinfo`: mount point, fstype, super options.
struct Mount {
    point: PathBuf,
    fstype: String,
    options: Vec<String>,
}

fn mounts() -> Vec<Mount> {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    info.lines()
        .filter_map(|line| {
            let (pre, post) = line.split_once(" - ")?;
            let point = pre.split(' ').nth(4)?;
            let mut post = post.split(' ');
            let fstype = post.next()?.to_owned();
            let _source = post.next()?;
            let options = post.next()?.split(',').map(str::to_owned).collect();
            Some(Mount {
                // mountinfo escapes spaces as \040; such paths are not
                // cgroup mounts we can use.
                point: PathBuf::from(point),
                fstype,
                options,
            })
        })
        .collect()
}

/// `/proc/self/cgroup`: (controllers, path) per hierarchy.
fn own_cgroups() -> Vec<(Vec<String>, String)> {
    let Ok(text) = std::fs::read_to_string("/proc/self/cgroup") else {
        return Vec::new();
    };
    text.lines()
        .filter_map(|l| {
            let mut f = l.splitn(3, ':');
            let _id = f.next()?;
            let ctrls = f
                .next()?
                .split(',')
                .filter(|c| !c.is_empty())
                .map(str::to_owned);
            Some((ctrls.collect(), f.next()?.to_owned()))
        })
        .collect()
}

fn under(mount: &Path, cgroup_path: &str) -> PathBuf {
    mount.join(cgroup_path.trim_start_matches('/'))
}

fn write(path: &Path, value: &str) -> Result<(), JailError> {
    std::fs::write(path, value).map_err(|source| JailError::Cgroup {
        path: path.to_owned(),
        source,
    })
}

/// Did a mkdir fail because this hierarchy is not ours to write?
fn not_writable(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EACCES | libc::EPERM | libc::EROFS)
    )
}

/// A cgroup directory with no process in it (`cgroup.procs` empty).
fn is_empty_cgroup(path: &Path) -> bool {
    std::fs::read_to_string(path.join("cgroup.procs")).is_ok_and(|p| p.trim().is_empty())
}

fn make_dir(path: &Path) -> Result<bool, JailError> {
    match std::fs::create_dir(path) {
        Ok(()) => Ok(true),
        Err(e) if not_writable(&e) => Ok(false),
        // Left by a VMM that was killed outright (its supervisor removes
        // it otherwise): nothing runs in it, so it is taken back. A cgroup
        // with processes is another live VM of this name.
        Err(e)
            if e.kind() == io::ErrorKind::AlreadyExists
                && is_empty_cgroup(path)
                && std::fs::remove_dir(path).is_ok() =>
        {
            make_dir(path)
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Err(JailError::Cgroup {
            path: path.to_owned(),
            source: io::Error::new(
                e.kind(),
                "already exists with processes in it (another running VM of this name)",
            ),
        }),
        Err(source) => Err(JailError::Cgroup {
            path: path.to_owned(),
            source,
        }),
    }
}

impl Cgroup {
    /// Create `sandmesh-<vm>` with `limits` (see the module docs); `None`
    /// (with a warning) when no hierarchy is writable.
    pub fn create(vm: &str, limits: &CgroupLimits) -> Result<Option<Self>, JailError> {
        let name = format!("sandmesh-{vm}");
        let mounts = mounts();
        let own = own_cgroups();
        if let Some(cg) = Self::create_v2(&name, limits, &mounts, &own)? {
            return Ok(Some(cg));
        }
        if let Some(cg) = Self::create_v1(&name, limits, &mounts, &own)? {
            return Ok(Some(cg));
        }
        eprintln!(
            "warning: no writable cgroup (v2 with cpu and memory, or v1 cpu/memory): the jailed VMM runs without CPU and memory limits"
        );
        Ok(None)
    }

    fn create_v2(
        name: &str,
        limits: &CgroupLimits,
        mounts: &[Mount],
        own: &[(Vec<String>, String)],
    ) -> Result<Option<Self>, JailError> {
        let Some(mount) = mounts.iter().find(|m| m.fstype == "cgroup2") else {
            return Ok(None);
        };
        let Some((_, path)) = own.iter().find(|(c, _)| c.is_empty()) else {
            return Ok(None);
        };
        let parent = under(&mount.point, path);
        let has = |file: &str, want: &[&str]| {
            std::fs::read_to_string(parent.join(file)).is_ok_and(|s| {
                let words: Vec<&str> = s.split_whitespace().collect();
                want.iter().all(|w| words.contains(w))
            })
        };
        if !has("cgroup.controllers", &["cpu", "memory"]) {
            return Ok(None);
        }
        if !has("cgroup.subtree_control", &["cpu", "memory"])
            && std::fs::write(parent.join("cgroup.subtree_control"), "+cpu +memory").is_err()
        {
            // A non-root cgroup with processes in it cannot delegate
            // controllers (the no-internal-processes rule).
            return Ok(None);
        }
        let dir = parent.join(name);
        if !make_dir(&dir)? {
            return Ok(None);
        }
        let cg = Self {
            dirs: vec![dir.clone()],
            version: 2,
        };
        let set = || {
            write(
                &dir.join("cpu.max"),
                &format!("{} {CPU_PERIOD_US}", limits.cpu_quota_us),
            )?;
            write(&dir.join("memory.max"), &limits.memory_bytes.to_string())
        };
        match set() {
            Ok(()) => Ok(Some(cg)),
            Err(e) => {
                cg.remove();
                Err(e)
            }
        }
    }

    fn create_v1(
        name: &str,
        limits: &CgroupLimits,
        mounts: &[Mount],
        own: &[(Vec<String>, String)],
    ) -> Result<Option<Self>, JailError> {
        let mut cg = Self {
            dirs: Vec::new(),
            version: 1,
        };
        for controller in ["cpu", "memory"] {
            let mount = mounts
                .iter()
                .find(|m| m.fstype == "cgroup" && m.options.iter().any(|o| o == controller));
            let path = own.iter().find(|(c, _)| c.iter().any(|c| c == controller));
            let (Some(mount), Some((_, path))) = (mount, path) else {
                continue;
            };
            let dir = under(&mount.point, path).join(name);
            let made = match make_dir(&dir) {
                Ok(made) => made,
                Err(e) => {
                    cg.remove();
                    return Err(e);
                }
            };
            if !made {
                eprintln!(
                    "warning: the cgroup v1 {controller} hierarchy is not writable: no {controller} limit for the jailed VMM"
                );
                continue;
            }
            cg.dirs.push(dir.clone());
            let set = || match controller {
                "cpu" => {
                    write(&dir.join("cpu.cfs_period_us"), &CPU_PERIOD_US.to_string())?;
                    write(
                        &dir.join("cpu.cfs_quota_us"),
                        &limits.cpu_quota_us.to_string(),
                    )
                }
                _ => write(
                    &dir.join("memory.limit_in_bytes"),
                    &limits.memory_bytes.to_string(),
                ),
            };
            if let Err(e) = set() {
                cg.remove();
                return Err(e);
            }
        }
        Ok((!cg.dirs.is_empty()).then_some(cg))
    }

    /// Move `pid` into the group.
    pub fn add(&self, pid: libc::pid_t) -> Result<(), JailError> {
        for dir in &self.dirs {
            write(&dir.join("cgroup.procs"), &pid.to_string())?;
        }
        Ok(())
    }

    /// Remove the group, once its processes are gone. The kernel may take
    /// a moment to let go of a just-reaped process (EBUSY): retried for up
    /// to a second. Reports, never fails.
    pub fn remove(self) {
        for dir in &self.dirs {
            let mut tries = 0;
            loop {
                match std::fs::remove_dir(dir) {
                    Ok(()) => break,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => break,
                    Err(e) if e.raw_os_error() == Some(libc::EBUSY) && tries < 100 => {
                        tries += 1;
                        std::thread::sleep(std::time::Duration::from_millis(10));
                    }
                    Err(e) => {
                        eprintln!("warning: cannot remove cgroup {}: {e}", dir.display());
                        break;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    //! The probing and the files written, on a fake hierarchy in a
    //! temporary directory (this development host has no cgroup v2
    //! controllers to try the real thing on; `node/tests/vmm_jail.rs`
    //! checks the real v1 limits).
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("smjail-cg-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn mount(point: &Path, fstype: &str, options: &[&str]) -> Mount {
        Mount {
            point: point.to_owned(),
            fstype: fstype.into(),
            options: options.iter().map(|o| o.to_string()).collect(),
        }
    }

    #[test]
    fn v2_delegates_and_writes_cpu_max_and_memory_max() {
        let root = scratch("v2");
        let own = root.join("node.slice");
        std::fs::create_dir_all(&own).unwrap();
        std::fs::write(
            own.join("cgroup.controllers"),
            "cpuset cpu io memory pids\n",
        )
        .unwrap();
        std::fs::write(own.join("cgroup.subtree_control"), "").unwrap();
        let limits = CgroupLimits::for_vm(2, 256);
        let cg = Cgroup::create_v2(
            "sandmesh-vm1",
            &limits,
            &[mount(&root, "cgroup2", &["rw"])],
            &[(Vec::new(), "/node.slice".into())],
        )
        .unwrap()
        .expect("a v2 group");
        let dir = own.join("sandmesh-vm1");
        assert_eq!(cg.version, 2);
        assert_eq!(cg.dirs, std::slice::from_ref(&dir));
        let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap();
        assert_eq!(read("cpu.max"), "200000 100000");
        assert_eq!(
            read("memory.max"),
            ((256 + VMM_OVERHEAD_MIB) << 20).to_string()
        );
        // The controllers were enabled for children.
        let subtree = std::fs::read_to_string(own.join("cgroup.subtree_control")).unwrap();
        assert_eq!(subtree, "+cpu +memory");
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn v2_without_the_controllers_is_not_used() {
        let root = scratch("v2none");
        std::fs::write(root.join("cgroup.controllers"), "pids\n").unwrap();
        let got = Cgroup::create_v2(
            "sandmesh-vm1",
            &CgroupLimits::for_vm(1, 128),
            &[mount(&root, "cgroup2", &["rw"])],
            &[(Vec::new(), "/".into())],
        )
        .unwrap();
        assert!(got.is_none());
        assert!(!root.join("sandmesh-vm1").exists());
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn v1_writes_cfs_quota_and_memory_limit_below_our_own_groups() {
        let root = scratch("v1");
        let (cpu, memory) = (root.join("cpu,cpuacct"), root.join("memory"));
        std::fs::create_dir_all(cpu.join("a")).unwrap();
        std::fs::create_dir_all(memory.join("b/c")).unwrap();
        let limits = CgroupLimits::for_vm(3, 1024);
        let cg = Cgroup::create_v1(
            "sandmesh-vm2",
            &limits,
            &[
                mount(&cpu, "cgroup", &["rw", "cpu", "cpuacct"]),
                mount(&memory, "cgroup", &["rw", "memory"]),
            ],
            &[
                (vec!["cpu".into(), "cpuacct".into()], "/a".into()),
                (vec!["memory".into()], "/b/c".into()),
            ],
        )
        .unwrap()
        .expect("a v1 group");
        let (c, m) = (cpu.join("a/sandmesh-vm2"), memory.join("b/c/sandmesh-vm2"));
        assert_eq!(cg.dirs, [c.clone(), m.clone()]);
        let read = |p: PathBuf| std::fs::read_to_string(p).unwrap();
        assert_eq!(read(c.join("cpu.cfs_period_us")), "100000");
        assert_eq!(read(c.join("cpu.cfs_quota_us")), "300000");
        assert_eq!(
            read(m.join("memory.limit_in_bytes")),
            ((1024 + VMM_OVERHEAD_MIB) << 20).to_string()
        );
        // A second VM of the same name, while a process is in the first,
        // is refused, and says why.
        std::fs::write(cpu.join("a/sandmesh-vm2/cgroup.procs"), "4242\n").unwrap();
        let again = Cgroup::create_v1(
            "sandmesh-vm2",
            &limits,
            &[mount(&cpu, "cgroup", &["rw", "cpu"])],
            &[(vec!["cpu".into()], "/a".into())],
        );
        let err = again.unwrap_err().to_string();
        assert!(err.contains("already exists with processes in it"), "{err}");
        assert!(!is_empty_cgroup(&cpu.join("a/sandmesh-vm2")));
        std::fs::write(cpu.join("a/sandmesh-vm2/cgroup.procs"), "").unwrap();
        assert!(is_empty_cgroup(&cpu.join("a/sandmesh-vm2")));
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn own_cgroup_and_mount_tables_parse() {
        // Whatever this host has: parsing must not fail, and a cgroup
        // mount, where one is listed, has a mount point.
        for m in mounts().iter().filter(|m| m.fstype.starts_with("cgroup")) {
            assert!(m.point.is_absolute(), "{}", m.point.display());
        }
        for (_, path) in own_cgroups() {
            assert!(path.starts_with('/'), "{path}");
        }
    }
}
