//! `EntryInfo` as E2B's envd fills it: for a symlink, the type and mode of
//! its target with `isSymlink` and the resolved `symlinkTarget`; `mode` is
//! the permission bits, `permissions` Go's `FileMode.String()`; metadata
//! are the file's `user.e2b.*` extended attributes.

use std::collections::HashMap;
use std::ffi::CString;
use std::fs::Metadata;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use schema::envd::filesystem::{EntryInfo, FileType};

use crate::paths::Root;
use crate::users;

/// The xattr namespace upload metadata live in (as upstream).
pub const METADATA_XATTR_PREFIX: &str = "user.e2b.";

/// Owner and group names, looked up once per id.
pub struct Names {
    root: PathBuf,
    users: HashMap<u32, String>,
    groups: HashMap<u32, String>,
}

impl Names {
    pub fn new(root: &Root) -> Self {
        Self {
            root: root.host_root().to_path_buf(),
            users: HashMap::new(),
            groups: HashMap::new(),
        }
    }

    fn user(&mut self, uid: u32) -> String {
        let root = &self.root;
        self.users
            .entry(uid)
            .or_insert_with(|| users::user_name(root, uid))
            .clone()
    }

    fn group(&mut self, gid: u32) -> String {
        let root = &self.root;
        self.groups
            .entry(gid)
            .or_insert_with(|| users::group_name(root, gid))
            .clone()
    }
}

/// The entry at `guest` (host path `host`), not following a final symlink.
pub fn entry_info(
    root: &Root,
    names: &mut Names,
    guest: &Path,
    host: &Path,
) -> io::Result<EntryInfo> {
    let meta = std::fs::symlink_metadata(host)?;
    Ok(from_metadata(root, names, guest, host, &meta))
}

/// [`entry_info`] from `lstat` data already at hand.
pub fn from_metadata(
    root: &Root,
    names: &mut Names,
    guest: &Path,
    host: &Path,
    meta: &Metadata,
) -> EntryInfo {
    let is_symlink = meta.file_type().is_symlink();
    let (ty, mode, symlink_target) = if is_symlink {
        let target = symlink_target(root, guest, host);
        match std::fs::metadata(host) {
            Ok(t) => (file_type(&t), t.mode() & 0o777, Some(target)),
            Err(_) => (FileType::Unspecified, 0, Some(target)),
        }
    } else {
        (file_type(meta), meta.mode() & 0o777, None)
    };
    let name = match guest.file_name() {
        Some(n) => n.to_string_lossy().into_owned(),
        None => "/".to_owned(),
    };
    EntryInfo {
        name,
        r#type: ty as i32,
        path: guest.display().to_string(),
        size: meta.size() as i64,
        mode,
        permissions: permissions(meta.mode()),
        owner: names.user(meta.uid()),
        group: names.group(meta.gid()),
        modified_time: Some(pbjson_types::Timestamp {
            seconds: meta.mtime(),
            nanos: meta.mtime_nsec() as i32,
        }),
        symlink_target,
        metadata: if is_symlink {
            HashMap::new()
        } else {
            read_metadata(host)
        },
        is_symlink,
    }
}

fn file_type(meta: &Metadata) -> FileType {
    let ft = meta.file_type();
    if ft.is_file() {
        FileType::File
    } else if ft.is_dir() {
        FileType::Directory
    } else if ft.is_symlink() {
        FileType::Symlink
    } else {
        FileType::Unspecified
    }
}

/// Where a symlink finally leads, as a guest path (upstream: `EvalSymlinks`,
/// or the link's own path when that fails).
fn symlink_target(root: &Root, guest: &Path, host: &Path) -> String {
    match std::fs::canonicalize(host) {
        Ok(resolved) => match root.to_guest(&resolved) {
            Some(g) => g.display().to_string(),
            // Outside the served root (host-process mode): the link's text.
            None => std::fs::read_link(host)
                .map_or_else(|_| guest.display().to_string(), |t| t.display().to_string()),
        },
        Err(_) => guest.display().to_string(),
    }
}

/// Go's `os.FileMode.String()` of an `st_mode`: type letters
/// (`dalTLDpSugct?`, `-` when none) then `rwxrwxrwx`.
pub fn permissions(st_mode: u32) -> String {
    let fmt = st_mode & libc::S_IFMT;
    let mut s = String::with_capacity(12);
    if fmt == libc::S_IFDIR {
        s.push('d');
    }
    if fmt == libc::S_IFLNK {
        s.push('L');
    }
    if fmt == libc::S_IFBLK || fmt == libc::S_IFCHR {
        s.push('D');
    }
    if fmt == libc::S_IFIFO {
        s.push('p');
    }
    if fmt == libc::S_IFSOCK {
        s.push('S');
    }
    if st_mode & libc::S_ISUID != 0 {
        s.push('u');
    }
    if st_mode & libc::S_ISGID != 0 {
        s.push('g');
    }
    if fmt == libc::S_IFCHR {
        s.push('c');
    }
    if st_mode & libc::S_ISVTX != 0 {
        s.push('t');
    }
    if s.is_empty() {
        s.push('-');
    }
    for (i, c) in "rwxrwxrwx".chars().enumerate() {
        s.push(if st_mode & (1 << (8 - i)) != 0 {
            c
        } else {
            '-'
        });
    }
    s
}

fn c_path(path: &Path) -> Option<CString> {
    CString::new(path.as_os_str().as_bytes()).ok()
}

/// The `user.e2b.*` extended attributes of `host` (empty where unsupported).
pub fn read_metadata(host: &Path) -> HashMap<String, String> {
    let mut out = HashMap::new();
    let Some(p) = c_path(host) else { return out };
    // SAFETY: a NULL buffer of size 0 asks for the needed size.
    let size = unsafe { libc::listxattr(p.as_ptr(), std::ptr::null_mut(), 0) };
    if size <= 0 {
        return out;
    }
    let mut buf = vec![0u8; size as usize];
    // SAFETY: buf is valid for buf.len() bytes.
    let n = unsafe { libc::listxattr(p.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if n <= 0 {
        return out;
    }
    buf.truncate(n as usize);
    for name in buf.split(|b| *b == 0).filter(|n| !n.is_empty()) {
        let Some(key) = name.strip_prefix(METADATA_XATTR_PREFIX.as_bytes()) else {
            continue;
        };
        let Ok(cname) = CString::new(name) else {
            continue;
        };
        let mut value = vec![0u8; 4096];
        // SAFETY: value is valid for value.len() bytes.
        let len = unsafe {
            libc::getxattr(
                p.as_ptr(),
                cname.as_ptr(),
                value.as_mut_ptr().cast(),
                value.len(),
            )
        };
        if len < 0 {
            continue;
        }
        value.truncate(len as usize);
        out.insert(
            String::from_utf8_lossy(key).into_owned(),
            String::from_utf8_lossy(&value).into_owned(),
        );
    }
    out
}

/// Store `metadata` as `user.e2b.*` extended attributes of `host`.
pub fn write_metadata(host: &Path, metadata: &HashMap<String, String>) -> io::Result<()> {
    let p = c_path(host).ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
    for (k, v) in metadata {
        let name = CString::new(format!("{METADATA_XATTR_PREFIX}{k}"))
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: all pointers are valid for the given lengths.
        let r = unsafe { libc::setxattr(p.as_ptr(), name.as_ptr(), v.as_ptr().cast(), v.len(), 0) };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::permissions;

    #[test]
    fn permissions_match_go_file_mode_string() {
        assert_eq!(permissions(libc::S_IFREG | 0o644), "-rw-r--r--");
        assert_eq!(permissions(libc::S_IFDIR | 0o755), "drwxr-xr-x");
        assert_eq!(permissions(libc::S_IFDIR | 0o1777), "dtrwxrwxrwx");
        assert_eq!(permissions(libc::S_IFLNK | 0o777), "Lrwxrwxrwx");
        assert_eq!(
            permissions(libc::S_IFREG | libc::S_ISUID | 0o755),
            "urwxr-xr-x"
        );
        assert_eq!(permissions(libc::S_IFCHR | 0o666), "Dcrw-rw-rw-");
    }
}
