//! The jail's directory: created on the host before the fork, its disks
//! bind-mounted and `pivot_root` into it in the child, removed by the
//! supervisor when the VMM ends.
//!
//! Layout (`<dir>` is `--jail-dir`):
//! - `<dir>/` root-owned, 0700: nobody else on the host looks inside.
//! - `<dir>/root/` the VMM's `/`, owned by the jailed uid (it binds its
//!   sockets here and rewrites its overlay map by rename), 0700.
//! - `<dir>/root/rootfs` the base image, bind-mounted read-only (the file
//!   on the host is an empty mount point; the base is shared by every VM, so
//!   a hard link would let a write through a wrong permission reach them
//!   all).
//! - `<dir>/root/overlay` the copy-on-write overlay: a file of the jail when
//!   the overlay is temporary, else the caller's overlay bind-mounted; its
//!   map `overlay.map` is always written inside the jail and copied back
//!   beside the caller's overlay at the end.
//! - `<dir>/root/snapshots/<name>` a restore's snapshot directories (the
//!   snapshot and the bases of its diff chain), each bind-mounted
//!   read-only; the memory files are mapped `MAP_PRIVATE` from there.
//! - snapshots the VMM takes, wherever the control request puts them
//!   (e.g. `/snap`, on the host `<dir>/root/snap`). They go with the jail
//!   directory when the VMM ends: move or hard-link them out first.
//! - the sockets, under the names given on the command line. Host-side
//!   listeners for guest-initiated vsock connections (`<vsock name>_<port>`)
//!   belong here too, and the jailed uid must be able to connect to them
//!   (own them, or mode 0777: connecting needs write permission).
//!
//! The kernel is not in the jail: it is read into memory before.

use std::ffi::CString;
use std::fs::{DirBuilder, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use super::{HostDisks, JailConfig, JailError, JailPaths};

/// The base image's name in the jail.
pub const ROOTFS_NAME: &str = "rootfs";
/// The overlay's name in the jail.
pub const OVERLAY_NAME: &str = "overlay";
/// The directory holding a restore's snapshot directories in the jail.
pub const SNAPSHOTS_NAME: &str = "snapshots";
/// Largest overlay map copied back (a 2 TiB disk's map is 64 MiB).
const MAX_MAP_BYTES: u64 = 64 << 20;

/// A created jail directory.
#[derive(Debug)]
pub struct JailDir {
    pub dir: PathBuf,
    pub root: PathBuf,
    /// The caller's overlay, whose map is copied back at the end.
    host_overlay: Option<PathBuf>,
    /// The snapshot directories' names under `/snapshots`.
    snapshot_names: Vec<String>,
}

fn dir_name(dir: &Path) -> Option<&str> {
    dir.file_name().and_then(|n| n.to_str())
}

/// Snapshot directories must have distinct UTF-8 names (each is mounted at
/// `/snapshots/<name>`).
pub fn check_snapshot_names(dirs: &[PathBuf]) -> Result<(), JailError> {
    for (i, a) in dirs.iter().enumerate() {
        if dir_name(a).is_none() {
            return Err(JailError::DirName(a.clone()));
        }
        if let Some(b) = dirs[..i].iter().find(|b| dir_name(b) == dir_name(a)) {
            return Err(JailError::SnapshotNames(b.clone(), a.clone()));
        }
    }
    Ok(())
}

fn cpath(path: &Path) -> Result<CString, JailError> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| {
        JailError::io(
            "path",
            path,
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "contains a NUL byte"),
        )
    })
}

fn chown(path: &Path, uid: u32, gid: u32) -> Result<(), JailError> {
    std::os::unix::fs::chown(path, Some(uid), Some(gid))
        .map_err(|e| JailError::io("cannot chown", path, e))
}

impl JailDir {
    /// Create `<dir>`, `<dir>/root` and the mount points; create (empty) the
    /// caller's overlay. On error everything created is removed.
    pub fn create(cfg: &JailConfig, disks: &HostDisks) -> Result<Self, JailError> {
        DirBuilder::new()
            .mode(0o700)
            .create(&cfg.dir)
            .map_err(|e| JailError::io("cannot create the jail directory", &cfg.dir, e))?;
        let jail = Self {
            dir: cfg.dir.clone(),
            root: cfg.root_dir(),
            host_overlay: disks.overlay.clone(),
            snapshot_names: disks
                .snapshots
                .iter()
                .filter_map(|d| dir_name(d).map(str::to_owned))
                .collect(),
        };
        match jail.populate(cfg, disks.keep_overlay) {
            Ok(()) => Ok(jail),
            Err(e) => {
                jail.remove();
                Err(e)
            }
        }
    }

    fn populate(&self, cfg: &JailConfig, keep_overlay: bool) -> Result<(), JailError> {
        DirBuilder::new()
            .mode(0o700)
            .create(&self.root)
            .map_err(|e| JailError::io("cannot create the jail root", &self.root, e))?;
        chown(&self.root, cfg.uid, cfg.gid)?;
        let mut targets = vec![ROOTFS_NAME];
        if let Some(overlay) = &self.host_overlay {
            if keep_overlay {
                // A restore, or a boot onto an existing overlay: the
                // overlay goes on where the snapshot left it, and its map is the jail's copy, owned by the VMM
                // (which rewrites it by rename).
                let mut src = overlay.as_os_str().to_owned();
                src.push(".map");
                let src = PathBuf::from(src);
                let dst = self.root.join("overlay.map");
                if src.exists() {
                    std::fs::copy(&src, &dst)
                        .map_err(|e| JailError::io("cannot copy the overlay map", &src, e))?;
                    chown(&dst, cfg.uid, cfg.gid)?;
                }
            } else {
                // The VMM starts every overlay afresh (as `CowDisk::create`).
                File::create(overlay)
                    .map_err(|e| JailError::io("cannot create overlay", overlay, e))?;
            }
            targets.push(OVERLAY_NAME);
        }
        if !self.snapshot_names.is_empty() {
            let dir = self.root.join(SNAPSHOTS_NAME);
            DirBuilder::new()
                .mode(0o755)
                .create(&dir)
                .map_err(|e| JailError::io("cannot create a mount point", &dir, e))?;
            for name in &self.snapshot_names {
                let target = dir.join(name);
                DirBuilder::new()
                    .mode(0o500)
                    .create(&target)
                    .map_err(|e| JailError::io("cannot create a mount point", &target, e))?;
            }
        }
        for name in targets {
            let target = self.root.join(name);
            OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o400)
                .open(&target)
                .map_err(|e| JailError::io("cannot create a mount point", &target, e))?;
        }
        Ok(())
    }

    /// In the child's private mount namespace: bind the disks into the jail.
    pub fn mount_disks(&self, disks: &HostDisks) -> Result<(), JailError> {
        bind(&disks.rootfs, &self.root.join(ROOTFS_NAME), libc::MS_RDONLY)?;
        if let Some(overlay) = &disks.overlay {
            bind(overlay, &self.root.join(OVERLAY_NAME), 0)?;
        }
        for (dir, name) in disks.snapshots.iter().zip(&self.snapshot_names) {
            bind(
                dir,
                &self.root.join(SNAPSHOTS_NAME).join(name),
                libc::MS_RDONLY,
            )?;
        }
        Ok(())
    }

    /// Where the jailed VMM finds its disks.
    pub fn jail_paths(&self) -> JailPaths {
        JailPaths {
            rootfs: Path::new("/").join(ROOTFS_NAME),
            overlay: Path::new("/").join(OVERLAY_NAME),
            snapshots: self
                .snapshot_names
                .iter()
                .map(|n| Path::new("/").join(SNAPSHOTS_NAME).join(n))
                .collect(),
        }
    }

    /// Copy the overlay map back beside the caller's overlay, then remove
    /// the jail directory. Called by the supervisor once the VMM (and with
    /// it its mount namespace) is gone; never fails, reports what it could
    /// not do.
    pub fn remove(self) {
        if let Some(overlay) = &self.host_overlay
            && let Err(e) = self.copy_map_back(overlay)
        {
            eprintln!("warning: {e}");
        }
        if let Err(e) = std::fs::remove_dir_all(&self.dir)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            eprintln!(
                "warning: cannot remove the jail directory {}: {e}",
                self.dir.display()
            );
        }
    }

    /// The map in the jail was written by the (untrusted) VMM: open it
    /// without following links and copy it only if it is a plain file with
    /// one link, so the VMM cannot make the supervisor copy a host file.
    fn copy_map_back(&self, overlay: &Path) -> Result<(), JailError> {
        let src = self.root.join("overlay.map");
        let mut map = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(&src)
            .map_err(|e| JailError::io("cannot open the overlay map", &src, e))?;
        let meta = map
            .metadata()
            .map_err(|e| JailError::io("cannot stat the overlay map", &src, e))?;
        if !meta.is_file() || meta.nlink() != 1 || meta.len() > MAX_MAP_BYTES {
            return Err(JailError::io(
                "refusing to copy back the overlay map",
                &src,
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    "not a plain single-link file of a map's size",
                ),
            ));
        }
        let mut raw = Vec::with_capacity(meta.len() as usize);
        map.read_to_end(&mut raw)
            .map_err(|e| JailError::io("cannot read the overlay map", &src, e))?;
        let mut dst = overlay.as_os_str().to_owned();
        dst.push(".map");
        let dst = PathBuf::from(dst);
        let mut tmp = dst.clone().into_os_string();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        let write = || -> std::io::Result<()> {
            let mut f = File::create(&tmp)?;
            f.write_all(&raw)?;
            f.sync_all()?;
            std::fs::rename(&tmp, &dst)
        };
        write().map_err(|e| JailError::io("cannot write the overlay map", &dst, e))
    }
}

/// Bind `src` on `dst`, then remount the bind with nosuid, nodev, noexec
/// and `extra` (a bind mount takes its flags only from a remount).
fn bind(src: &Path, dst: &Path, extra: libc::c_ulong) -> Result<(), JailError> {
    let (s, d) = (cpath(src)?, cpath(dst)?);
    // SAFETY: valid NUL-terminated strings; null fstype and data are
    // allowed for a bind mount.
    if unsafe {
        libc::mount(
            s.as_ptr(),
            d.as_ptr(),
            std::ptr::null(),
            libc::MS_BIND | libc::MS_REC,
            std::ptr::null(),
        )
    } != 0
    {
        return Err(JailError::io(
            "cannot bind-mount into the jail",
            src,
            std::io::Error::last_os_error(),
        ));
    }
    let flags = libc::MS_BIND
        | libc::MS_REMOUNT
        | libc::MS_NOSUID
        | libc::MS_NODEV
        | libc::MS_NOEXEC
        | extra;
    // SAFETY: as above.
    if unsafe {
        libc::mount(
            std::ptr::null(),
            d.as_ptr(),
            std::ptr::null(),
            flags,
            std::ptr::null(),
        )
    } != 0
    {
        return Err(JailError::io(
            "cannot remount in the jail",
            dst,
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}

/// Make `root` the process's `/` (in its own mount namespace): bind it on
/// itself (pivot_root needs a mount point), `pivot_root(".", ".")` and
/// detach the old root stacked underneath, so no host path stays reachable.
pub fn pivot_into(root: &Path) -> Result<(), JailError> {
    bind(root, root, 0)?;
    let r = cpath(root)?;
    // SAFETY: a valid NUL-terminated path.
    if unsafe { libc::chdir(r.as_ptr()) } != 0 {
        return Err(JailError::last_os("chdir into the jail"));
    }
    let dot = c".";
    // SAFETY: valid NUL-terminated paths; pivot_root has no wrapper.
    if unsafe { libc::syscall(libc::SYS_pivot_root, dot.as_ptr(), dot.as_ptr()) } != 0 {
        return Err(JailError::last_os("pivot_root into the jail"));
    }
    // SAFETY: as above.
    if unsafe { libc::umount2(dot.as_ptr(), libc::MNT_DETACH) } != 0 {
        return Err(JailError::last_os("detach the host root"));
    }
    // SAFETY: as above.
    if unsafe { libc::chdir(c"/".as_ptr()) } != 0 {
        return Err(JailError::last_os("chdir /"));
    }
    Ok(())
}
