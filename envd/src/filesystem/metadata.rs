//! File metadata: the `X-Metadata-*` headers of an upload, returned in every
//! `EntryInfo.metadata` of the file (stat, list, move, watch entries).
//!
//! Upstream envd keeps them as `user.e2b.<key>` extended attributes, and so
//! do we wherever the filesystem takes user xattrs (the microVM's ext4 root,
//! a host-process root on ext4/tmpfs): they then follow the file through
//! any rename, in or out of envd, and ones set inside the sandbox with
//! `setfattr` show too. gVisor's gofer-backed root refuses user xattrs
//! (`EOPNOTSUPP`), so there the metadata go to envd's own store instead: a
//! JSON map from the file's canonical guest path to its metadata, kept in
//! the guest filesystem (`/var/lib/envd/file-metadata.json`), so it is part
//! of what a pause saves and a resume restores, on either runtime, and
//! survives an envd restart. envd moves and drops its entries when it moves
//! or removes files (`Move`, `Remove`, an upload replacing a file); a rename
//! or delete made by a process in the sandbox is not seen, so there a moved
//! file loses its metadata (and a new file made at a removed one's path
//! before envd hears of the removal inherits them). Reading prefers the
//! file's xattrs and falls back to the store.

use std::collections::{BTreeMap, HashMap};
use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::paths::Root;

/// The xattr namespace upload metadata live in (as upstream).
pub const METADATA_XATTR_PREFIX: &str = "user.e2b.";
/// Linux limits an xattr name to 255 bytes, prefix included (as upstream).
pub const MAX_KEY_LEN: usize = 255 - METADATA_XATTR_PREFIX.len();
/// The most one file's metadata may hold: names (with the prefix) plus
/// values, what one ext4 block takes (as upstream).
pub const MAX_TOTAL_LEN: usize = 4096;
/// Where the store lives, as a guest path.
pub const STORE_PATH: &str = "/var/lib/envd/file-metadata.json";

/// Why metadata could not be kept.
#[derive(Debug, thiserror::Error)]
pub enum MetadataError {
    /// The request's metadata break a limit (answered 400, as upstream).
    #[error("invalid metadata: {0}")]
    Invalid(String),
    /// No room for them (answered 507, as upstream).
    #[error("not enough space for file metadata: {0}")]
    NoSpace(io::Error),
    #[error("storing file metadata: {0}")]
    Io(io::Error),
}

impl From<io::Error> for MetadataError {
    fn from(e: io::Error) -> Self {
        if matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT)) {
            Self::NoSpace(e)
        } else {
            Self::Io(e)
        }
    }
}

/// Check metadata as upstream does before anything is written: non-empty
/// keys of at most [`MAX_KEY_LEN`] bytes, printable US-ASCII keys and
/// values, at most [`MAX_TOTAL_LEN`] bytes in all.
pub fn validate(metadata: &HashMap<String, String>) -> Result<(), MetadataError> {
    let printable = |s: &str| s.bytes().all(|b| (0x20..=0x7e).contains(&b));
    let mut total = 0;
    for (k, v) in metadata {
        if k.is_empty() {
            return Err(MetadataError::Invalid(
                "metadata key must not be empty".into(),
            ));
        }
        if k.len() > MAX_KEY_LEN {
            return Err(MetadataError::Invalid(format!(
                "metadata key {k:?} exceeds {MAX_KEY_LEN} bytes"
            )));
        }
        if !printable(k) {
            return Err(MetadataError::Invalid(format!(
                "metadata key {k:?} is not printable US-ASCII"
            )));
        }
        if !printable(v) {
            return Err(MetadataError::Invalid(format!(
                "metadata value for key {k:?} is not printable US-ASCII"
            )));
        }
        total += METADATA_XATTR_PREFIX.len() + k.len() + v.len();
    }
    if total > MAX_TOTAL_LEN {
        return Err(MetadataError::Invalid(format!(
            "total metadata size {total} exceeds {MAX_TOTAL_LEN} bytes"
        )));
    }
    Ok(())
}

/// Guest path → metadata, as stored.
type Entries = BTreeMap<String, BTreeMap<String, String>>;

/// Where file metadata are kept: xattrs first, envd's store otherwise.
pub struct MetadataStore {
    root: Root,
    /// Host path of the store file.
    file: PathBuf,
    /// Whether to try xattrs at all (off: the store only, as on gVisor; a
    /// test switch, `--metadata-store file`).
    xattrs: bool,
    /// Loaded on first use.
    entries: Mutex<Option<Entries>>,
}

impl MetadataStore {
    pub fn new(root: Root, xattrs: bool) -> Self {
        let file = root.to_host(Path::new(STORE_PATH));
        Self {
            root,
            file,
            xattrs,
            entries: Mutex::new(None),
        }
    }

    fn with_entries<T>(&self, f: impl FnOnce(&mut Entries) -> T) -> T {
        let mut guard = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        let entries = guard.get_or_insert_with(|| self.load());
        f(entries)
    }

    fn load(&self) -> Entries {
        match std::fs::read(&self.file) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                tracing::warn!(file = %self.file.display(), "file metadata store unreadable, starting empty: {e}");
                Entries::new()
            }),
            Err(_) => Entries::new(),
        }
    }

    /// Write the store whole (temp, fsync, rename: complete or absent).
    fn save(&self, entries: &Entries) -> io::Result<()> {
        let dir = self.file.parent().unwrap_or(Path::new("/"));
        std::fs::create_dir_all(dir)?;
        let tmp = self
            .file
            .with_extension(format!("tmp-{}", std::process::id()));
        let bytes = serde_json::to_vec(entries).map_err(io::Error::other)?;
        let write = || -> io::Result<()> {
            use std::io::Write;
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&bytes)?;
            f.sync_all()?;
            std::fs::rename(&tmp, &self.file)
        };
        write().inspect_err(|_| {
            let _ = std::fs::remove_file(&tmp);
        })
    }

    /// Change the store and save it; a failed save undoes the change.
    fn update(&self, f: impl FnOnce(&mut Entries) -> bool) -> io::Result<()> {
        self.with_entries(|entries| {
            let before = entries.clone();
            if !f(entries) {
                return Ok(());
            }
            self.save(entries).inspect_err(|_| *entries = before)
        })
    }

    /// The store's key of the file `host` is or leads to.
    fn key_followed(&self, host: &Path) -> Option<String> {
        let canonical = std::fs::canonicalize(host).ok()?;
        Some(self.root.to_guest(&canonical)?.display().to_string())
    }

    /// The store's key of `host` itself (a final symlink not followed):
    /// what a rename or unlink of `host` moves or drops.
    fn key_of_link(&self, host: &Path) -> Option<String> {
        let name = host.file_name()?;
        let parent = std::fs::canonicalize(host.parent()?).ok()?;
        Some(
            self.root
                .to_guest(&parent.join(name))?
                .display()
                .to_string(),
        )
    }

    /// The metadata of the file `host` is or leads to (empty when none).
    pub fn get(&self, host: &Path) -> HashMap<String, String> {
        if self.xattrs {
            let from_xattrs = read_xattrs(host);
            if !from_xattrs.is_empty() {
                return from_xattrs;
            }
        }
        if self.with_entries(|e| e.is_empty()) {
            return HashMap::new();
        }
        let Some(key) = self.key_followed(host) else {
            return HashMap::new();
        };
        self.with_entries(|e| {
            e.get(&key)
                .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
                .unwrap_or_default()
        })
    }

    /// Replace the metadata of the file `host` is or leads to with
    /// `metadata` (empty clears them: an upload without metadata replaces a
    /// file's old ones, as upstream's does).
    pub fn set(
        &self,
        host: &Path,
        metadata: &HashMap<String, String>,
    ) -> Result<(), MetadataError> {
        validate(metadata)?;
        if self.xattrs {
            match replace_xattrs(host, metadata) {
                Ok(()) => {
                    // The xattrs hold them now: no store entry may shadow them.
                    if let Some(key) = self.key_followed(host) {
                        self.update(|e| e.remove(&key).is_some())?;
                    }
                    return Ok(());
                }
                Err(e) if is_unsupported(&e) => {}
                Err(e) => return Err(e.into()),
            }
        }
        let Some(key) = self.key_followed(host) else {
            // Only a host-process envd has paths outside its root (a link
            // out of it): like a filesystem without xattrs upstream, the
            // file is kept without its metadata.
            tracing::warn!(path = %host.display(), "outside the served root: metadata not kept");
            return Ok(());
        };
        let value: BTreeMap<String, String> = metadata
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        self.update(|e| {
            if value.is_empty() {
                e.remove(&key).is_some()
            } else {
                let old = e.insert(key, value.clone());
                old.as_ref() != Some(&value)
            }
        })?;
        Ok(())
    }

    /// What moving `from` to `to` will do to the store: the key of `from`
    /// and of each path below it, to be passed to [`Self::moved`] once the
    /// rename is done. `None` when the store holds nothing there.
    pub fn before_move(&self, from: &Path) -> Option<String> {
        if self.with_entries(|e| e.is_empty()) {
            return None;
        }
        self.key_of_link(from)
    }

    /// `from_key` (from [`Self::before_move`]) was renamed to `to`: its
    /// entries, and those below it, follow.
    pub fn moved(&self, from_key: &str, to: &Path) {
        let Some(to_key) = self.key_of_link(to) else {
            return;
        };
        let result = self.update(|e| {
            let mut changed = e.remove(&to_key).is_some();
            let prefix = format!("{}/", to_key.trim_end_matches('/'));
            // The destination's old contents were replaced.
            e.retain(|k, _| {
                let keep = !k.starts_with(&prefix);
                changed |= !keep;
                keep
            });
            let from_prefix = format!("{}/", from_key.trim_end_matches('/'));
            let moving: Vec<String> = e
                .keys()
                .filter(|k| *k == from_key || k.starts_with(&from_prefix))
                .cloned()
                .collect();
            for k in moving {
                if let Some(v) = e.remove(&k) {
                    let new = format!("{to_key}{}", &k[from_key.len()..]);
                    e.insert(new, v);
                    changed = true;
                }
            }
            changed
        });
        if let Err(e) = result {
            tracing::warn!("file metadata store: recording a move: {e}");
        }
    }

    /// The key `host` will leave when removed (see [`Self::removed`]).
    pub fn before_remove(&self, host: &Path) -> Option<String> {
        self.before_move(host)
    }

    /// `key` (and everything below it) was removed.
    pub fn removed(&self, key: &str) {
        let prefix = format!("{}/", key.trim_end_matches('/'));
        let result = self.update(|e| {
            let before = e.len();
            e.retain(|k, _| k != key && !k.starts_with(&prefix));
            e.len() != before
        });
        if let Err(e) = result {
            tracing::warn!("file metadata store: recording a removal: {e}");
        }
    }
}

/// `ENOTSUP`/`EOPNOTSUPP` (one value on Linux): no user xattrs here.
fn is_unsupported(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::EOPNOTSUPP)
}

fn c_path(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
}

/// The names of `host`'s extended attributes (following symlinks).
fn list_xattrs(host: &Path) -> io::Result<Vec<Vec<u8>>> {
    let p = c_path(host)?;
    // SAFETY: a NULL buffer of size 0 asks for the needed size.
    let size = unsafe { libc::listxattr(p.as_ptr(), std::ptr::null_mut(), 0) };
    if size < 0 {
        return Err(io::Error::last_os_error());
    }
    if size == 0 {
        return Ok(Vec::new());
    }
    let mut buf = vec![0u8; size as usize];
    // SAFETY: buf is valid for buf.len() bytes.
    let n = unsafe { libc::listxattr(p.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    buf.truncate(n as usize);
    Ok(buf
        .split(|b| *b == 0)
        .filter(|n| !n.is_empty())
        .map(<[u8]>::to_vec)
        .collect())
}

/// The `user.e2b.*` extended attributes of `host` (empty where unsupported;
/// non-UTF-8 ones are skipped, as upstream: a proto map needs UTF-8).
pub fn read_xattrs(host: &Path) -> HashMap<String, String> {
    let mut out = HashMap::new();
    let (Ok(names), Ok(p)) = (list_xattrs(host), c_path(host)) else {
        return out;
    };
    for name in names {
        let Some(key) = name.strip_prefix(METADATA_XATTR_PREFIX.as_bytes()) else {
            continue;
        };
        let Ok(cname) = CString::new(name.clone()) else {
            continue;
        };
        // SAFETY: a NULL buffer of size 0 asks for the value's size.
        let size = unsafe { libc::getxattr(p.as_ptr(), cname.as_ptr(), std::ptr::null_mut(), 0) };
        if size < 0 {
            continue;
        }
        let mut value = vec![0u8; size as usize];
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
        if let (Ok(k), Ok(v)) = (String::from_utf8(key.to_vec()), String::from_utf8(value)) {
            out.insert(k, v);
        }
    }
    out
}

/// Make `host`'s `user.e2b.*` xattrs exactly `metadata`.
fn replace_xattrs(host: &Path, metadata: &HashMap<String, String>) -> io::Result<()> {
    let p = c_path(host)?;
    for name in list_xattrs(host)? {
        let Some(key) = name.strip_prefix(METADATA_XATTR_PREFIX.as_bytes()) else {
            continue;
        };
        if std::str::from_utf8(key).is_ok_and(|k| metadata.contains_key(k)) {
            continue;
        }
        let cname = CString::new(name).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: both pointers are valid C strings.
        if unsafe { libc::removexattr(p.as_ptr(), cname.as_ptr()) } != 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::ENODATA) {
                return Err(e);
            }
        }
    }
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
    use super::*;

    fn md(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn validation_follows_upstreams_limits() {
        assert!(validate(&md(&[("a", "b c")])).is_ok());
        assert!(validate(&md(&[("", "x")])).is_err());
        assert!(validate(&md(&[("k", "caf\u{e9}")])).is_err());
        assert!(validate(&md(&[(&"k".repeat(MAX_KEY_LEN + 1), "v")])).is_err());
        assert!(validate(&md(&[("k", &"v".repeat(MAX_TOTAL_LEN))])).is_err());
    }

    #[test]
    fn the_store_follows_moves_and_removals_and_persists() {
        let dir = tempfile::tempdir().unwrap();
        let root = Root::new(std::fs::canonicalize(dir.path()).unwrap());
        let host = |g: &str| root.to_host(Path::new(g));
        std::fs::create_dir_all(host("/d/sub")).unwrap();
        std::fs::write(host("/d/sub/f"), "x").unwrap();
        std::fs::write(host("/g"), "y").unwrap();
        std::os::unix::fs::symlink("g", host("/link")).unwrap();

        let store = MetadataStore::new(root.clone(), false);
        store.set(&host("/d/sub/f"), &md(&[("a", "1")])).unwrap();
        store.set(&host("/link"), &md(&[("b", "2")])).unwrap();
        assert_eq!(
            store.get(&host("/g")),
            md(&[("b", "2")]),
            "through the link"
        );

        let key = store.before_move(&host("/d")).unwrap();
        std::fs::rename(host("/d"), host("/e")).unwrap();
        store.moved(&key, &host("/e"));
        assert_eq!(store.get(&host("/e/sub/f")), md(&[("a", "1")]));

        // A fresh store (an envd restart) reads what was saved.
        let again = MetadataStore::new(root.clone(), false);
        assert_eq!(again.get(&host("/e/sub/f")), md(&[("a", "1")]));

        let key = again.before_remove(&host("/e")).unwrap();
        std::fs::remove_dir_all(host("/e")).unwrap();
        again.removed(&key);
        std::fs::create_dir_all(host("/e/sub")).unwrap();
        std::fs::write(host("/e/sub/f"), "new").unwrap();
        assert!(again.get(&host("/e/sub/f")).is_empty());

        again.set(&host("/g"), &HashMap::new()).unwrap();
        assert!(again.get(&host("/g")).is_empty(), "an empty set clears");
    }
}
