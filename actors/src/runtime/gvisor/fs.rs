//! Files of a gvisor sandbox: the overlay root, copies of writable layers,
//! and disk usage.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::runsc::tool;
use crate::runtime::{Result, RuntimeError};

/// Mount an overlay at `target`: `lower` read-only below, `upper` (with its
/// `work` dir) taking every write.
pub fn mount_overlay(lower: &Path, upper: &Path, work: &Path, target: &Path) -> Result<()> {
    for p in [lower, upper, work, target] {
        if p.as_os_str()
            .as_bytes()
            .iter()
            .any(|b| matches!(b, b',' | b':'))
        {
            return Err(RuntimeError::io(
                "mounting overlay",
                p,
                std::io::Error::other(
                    "path contains ',' or ':', which overlayfs options cannot hold",
                ),
            ));
        }
    }
    let opts = format!(
        "lowerdir={},upperdir={},workdir={}",
        lower.display(),
        upper.display(),
        work.display()
    );
    let c = |p: &Path| {
        CString::new(p.as_os_str().as_bytes())
            .map_err(|e| RuntimeError::io("mounting overlay", p, std::io::Error::other(e)))
    };
    let target_c = c(target)?;
    let opts_c = CString::new(opts)
        .map_err(|e| RuntimeError::io("mounting overlay", target, std::io::Error::other(e)))?;
    let overlay = c"overlay";
    // SAFETY: mount(2) with valid C strings.
    let rc = unsafe {
        libc::mount(
            overlay.as_ptr(),
            target_c.as_ptr(),
            overlay.as_ptr(),
            0,
            opts_c.as_ptr().cast(),
        )
    };
    if rc != 0 {
        return Err(RuntimeError::io(
            "mounting overlay on",
            target,
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}

/// Every mount point at or under `dir`, deepest first (from
/// /proc/self/mounts).
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let Ok(text) = std::fs::read_to_string("/proc/self/mounts") else {
        return Vec::new();
    };
    let mut found: Vec<PathBuf> = text
        .lines()
        .filter_map(|line| line.split(' ').nth(1))
        .map(|p| PathBuf::from(unescape_mount_path(p)))
        .filter(|p| p.starts_with(dir))
        .collect();
    found.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    found.dedup();
    found
}

/// /proc/mounts escapes space, tab, newline and backslash as octal.
fn unescape_mount_path(p: &str) -> String {
    let mut out = String::with_capacity(p.len());
    let mut chars = p.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\\' {
            let code: String = chars.clone().take(3).collect();
            if code.len() == 3
                && let Ok(v) = u8::from_str_radix(&code, 8)
            {
                out.push(v as char);
                for _ in 0..3 {
                    chars.next();
                }
                continue;
            }
        }
        out.push(c);
    }
    out
}

/// Unmount everything at or under `dir`. A busy mount is detached (lazy).
pub fn unmount_all(dir: &Path) -> Result<()> {
    for mount in mounts_under(dir) {
        let c = CString::new(mount.as_os_str().as_bytes())
            .map_err(|e| RuntimeError::io("unmounting", &mount, std::io::Error::other(e)))?;
        // SAFETY: umount2(2) with a valid C string.
        if unsafe { libc::umount2(c.as_ptr(), 0) } != 0
            && unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } != 0
        {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EINVAL) && e.raw_os_error() != Some(libc::ENOENT) {
                return Err(RuntimeError::io("unmounting", &mount, e));
            }
        }
    }
    Ok(())
}

/// Copy the tree `from` to the new or empty directory `to`, keeping owners,
/// modes, xattrs (overlay opaque markers), device nodes (overlay whiteouts),
/// hard links and sparse files: `cp -a`, which does all of it correctly.
pub fn copy_tree(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to).map_err(|e| RuntimeError::io("creating", to, e))?;
    let src = format!("{}/.", from.display());
    let dst = to.display().to_string();
    tool(
        "cp",
        &["-a", "--reflink=auto", &src, &dst],
        Duration::from_secs(300),
    )?;
    Ok(())
}

/// Move the tree `from` to `to` (a rename, or a copy and delete across file
/// systems).
pub fn move_tree(from: &Path, to: &Path) -> Result<()> {
    match std::fs::rename(from, to) {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {
            copy_tree(from, to)?;
            std::fs::remove_dir_all(from).map_err(|e| RuntimeError::io("removing", from, e))
        }
        Err(e) => Err(RuntimeError::io("moving", from, e)),
    }
}

/// Bytes of disk the tree at `dir` takes (allocated blocks; hard links
/// counted once).
pub fn disk_usage(dir: &Path) -> u64 {
    use std::collections::HashSet;
    use std::os::unix::fs::MetadataExt;
    let mut seen = HashSet::new();
    let mut total = 0u64;
    let mut stack = vec![dir.to_owned()];
    while let Some(path) = stack.pop() {
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        if meta.nlink() > 1 && !meta.is_dir() && !seen.insert((meta.dev(), meta.ino())) {
            continue;
        }
        total += meta.blocks() * 512;
        if meta.is_dir()
            && let Ok(entries) = std::fs::read_dir(&path)
        {
            stack.extend(entries.flatten().map(|e| e.path()));
        }
    }
    total
}

/// Remove `dir` and everything in it, if it exists. Refuses while anything
/// is still mounted under it (so a failed unmount never deletes the
/// template through an overlay).
pub fn remove_dir(dir: &Path) -> Result<()> {
    if !mounts_under(dir).is_empty() {
        return Err(RuntimeError::io(
            "removing",
            dir,
            std::io::Error::other("something is still mounted under it"),
        ));
    }
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(RuntimeError::io("removing", dir, e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_paths_are_unescaped() {
        assert_eq!(unescape_mount_path(r"/a\040b"), "/a b");
        assert_eq!(unescape_mount_path(r"/plain"), "/plain");
        assert_eq!(unescape_mount_path(r"/x\\"), r"/x\\");
    }

    #[test]
    fn disk_usage_counts_files() {
        let dir = std::env::temp_dir().join(format!("smh-du-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("f"), vec![1u8; 64 * 1024]).unwrap();
        assert!(disk_usage(&dir) >= 64 * 1024);
        remove_dir(&dir).unwrap();
        assert!(!dir.exists());
        remove_dir(&dir).unwrap();
    }
}
