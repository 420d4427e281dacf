//! `EntryInfo` as E2B's envd fills it: for a symlink, the type, mode and
//! metadata of its target and the resolved `symlinkTarget`, with `isSymlink`
//! left unset (upstream never sets it, and the SDK would then call the entry
//! a `symlink` where E2B's says `file`/`dir`); `mode` is the permission
//! bits, `permissions` Go's `FileMode.String()` of the entry itself; metadata
//! come from [`MetadataStore`].

use std::collections::HashMap;
use std::fs::Metadata;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use schema::envd::filesystem::{EntryInfo, FileType};

use super::metadata::MetadataStore;
use crate::paths::Root;
use crate::users;

/// What filling entries needs besides the entry: owner and group names,
/// looked up once per id, and where file metadata are kept.
pub struct Names {
    root: PathBuf,
    users: HashMap<u32, String>,
    groups: HashMap<u32, String>,
    metadata: Arc<MetadataStore>,
}

impl Names {
    pub fn new(root: &Root, metadata: Arc<MetadataStore>) -> Self {
        Self {
            root: root.host_root().to_path_buf(),
            users: HashMap::new(),
            groups: HashMap::new(),
            metadata,
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
        // A symlink's are its target's (upstream reads xattrs through it).
        metadata: names.metadata.get(host),
        is_symlink: false,
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
