//! The manifest: what a snapshot is, written last.
//!
//! `snapshots/<name>/manifest.json` lists every directory and file of the
//! snapshot directory with its permission bits, size and chunk list. It is
//! the commit point of an upload: the chunks go first, the manifest after
//! the last of them, so a snapshot that is visible is complete.
//!
//! A manifest is input from the store, and the store may be shared or
//! damaged, so [`Manifest::validate`] checks everything a restore relies on
//! before a single file is written: paths stay below the destination, a
//! path's parent is a directory of the same manifest (so no path runs
//! through a file), chunk lengths add up to sizes and stay within
//! [`CHUNK_MAX`].
//!
//! Version 2 records each chunk's length: chunks are cut where the content
//! says (see `chunks.rs`), so offsets are no longer index × chunk size but
//! the sums of the lengths before. Version 3 adds what a sandbox's
//! writable layer holds besides directories and files: owners, symlinks,
//! overlay whiteouts (a deleted file of the template) and opaque
//! directories, FIFOs and sockets; version 2 is still read (its entries
//! are owned by root, as they were written). Version 1 (fixed chunks) is
//! refused, not read: nothing stored in it is kept.

use std::collections::HashSet;

use serde::{Deserialize, Serialize};

use super::chunks::{CHUNK_MAX, ChunkId};

/// The manifest format this code writes.
pub const MANIFEST_VERSION: u32 = 3;

/// The oldest manifest format this code reads.
pub const OLDEST_READ_VERSION: u32 = 2;

/// Longest relative path accepted (Linux's PATH_MAX).
const MAX_PATH: usize = 4096;

/// Permission bits kept and restored. Setuid, setgid and sticky are left
/// out on purpose: a snapshot fetched from a shared store must not grant
/// privileges on the host that restores it.
pub const MODE_MASK: u32 = 0o777;

/// A snapshot as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub version: u32,
    /// The snapshot's name; `snapshots/<name>/manifest.json`.
    pub name: String,
    /// When the upload finished, milliseconds since the Unix epoch.
    pub created_unix_ms: u64,
    pub metadata: SnapshotMetadata,
    /// Directories and files, parents before children.
    pub entries: Vec<Entry>,
}

/// What the caller says about a snapshot. The store does not interpret it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SnapshotMetadata {
    /// What the snapshot is, e.g. `template` or `pause`.
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template_id: Option<String>,
    /// `microvm` or `gvisor`: a snapshot restores only under its runtime.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox_id: Option<String>,
    /// Anything else the caller wants to keep with the snapshot.
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub extra: serde_json::Value,
}

/// One entry of the snapshot directory, by its path relative to it
/// (`/`-separated, UTF-8), with its owner (`uid`, `gid`; root when a
/// version 2 manifest leaves them out).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Entry {
    Dir {
        path: String,
        mode: u32,
        #[serde(default)]
        uid: u32,
        #[serde(default)]
        gid: u32,
        /// An overlay opaque directory (`trusted.overlay.opaque=y`): it
        /// hides what the layers below have at its path.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        opaque: bool,
    },
    File {
        path: String,
        mode: u32,
        #[serde(default)]
        uid: u32,
        #[serde(default)]
        gid: u32,
        size: u64,
        /// The file's chunks in order; their lengths add up to `size`.
        chunks: Vec<ChunkRef>,
    },
    /// A symbolic link to `target`, restored as it is (a link is never
    /// followed while a snapshot is restored: links are made last, and no
    /// entry's parent can be one).
    Symlink {
        path: String,
        target: String,
        uid: u32,
        gid: u32,
    },
    /// An overlay whiteout (a character device 0:0): the layers below
    /// have a file at this path that was deleted.
    Whiteout { path: String, uid: u32, gid: u32 },
    Fifo {
        path: String,
        mode: u32,
        uid: u32,
        gid: u32,
    },
    /// A Unix socket's file (a new one is made: nothing listens on it).
    Socket {
        path: String,
        mode: u32,
        uid: u32,
        gid: u32,
    },
}

/// One chunk of a file: `{"id": "<sha256 hex>" | null, "len": N}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkRef {
    /// The chunk's name; `null` for a chunk of zeros, which is not stored
    /// and is restored as a hole. Required (`deserialize_with` turns off
    /// serde's default of `None` for a missing `Option`): a manifest that
    /// lost the field must not restore zeros.
    #[serde(deserialize_with = "Option::deserialize")]
    pub id: Option<ChunkId>,
    /// Uncompressed bytes, 1..=[`CHUNK_MAX`].
    pub len: u64,
}

impl Entry {
    pub fn path(&self) -> &str {
        match self {
            Entry::Dir { path, .. }
            | Entry::File { path, .. }
            | Entry::Symlink { path, .. }
            | Entry::Whiteout { path, .. }
            | Entry::Fifo { path, .. }
            | Entry::Socket { path, .. } => path,
        }
    }

    /// Permission bits (0 for a symlink or a whiteout, which have none of
    /// their own).
    pub fn mode(&self) -> u32 {
        match self {
            Entry::Dir { mode, .. }
            | Entry::File { mode, .. }
            | Entry::Fifo { mode, .. }
            | Entry::Socket { mode, .. } => *mode,
            Entry::Symlink { .. } | Entry::Whiteout { .. } => 0,
        }
    }

    /// `(uid, gid)`.
    pub fn owner(&self) -> (u32, u32) {
        match self {
            Entry::Dir { uid, gid, .. }
            | Entry::File { uid, gid, .. }
            | Entry::Symlink { uid, gid, .. }
            | Entry::Whiteout { uid, gid, .. }
            | Entry::Fifo { uid, gid, .. }
            | Entry::Socket { uid, gid, .. } => (*uid, *gid),
        }
    }
}

/// Why a manifest (or a path for one) is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    #[error(
        "manifest version {0} is not supported (this build reads versions {OLDEST_READ_VERSION} to {MANIFEST_VERSION})"
    )]
    Version(u32),
    #[error("manifest names snapshot {found:?}, expected {expected:?}")]
    Name { expected: String, found: String },
    #[error("path {path:?} is refused: {reason}")]
    Path { path: String, reason: &'static str },
    #[error("path {0:?} appears twice")]
    Duplicate(String),
    #[error("path {0:?} comes before its parent directory, or its parent is not a directory")]
    Orphan(String),
    #[error("mode {mode:#o} of {path:?} has bits outside {MODE_MASK:#o}")]
    Mode { path: String, mode: u32 },
    #[error("chunk {index} of {path:?} has length {len}, outside 1..={CHUNK_MAX}")]
    ChunkLen {
        path: String,
        index: usize,
        len: u64,
    },
    #[error("the chunks of {path:?} add up to {sum} bytes, but the file has {size}")]
    ChunkSum { path: String, size: u64, sum: u128 },
}

/// Check a relative path as it appears in a manifest: non-empty, relative,
/// `/`-separated, no empty, `.` or `..` component, no NUL. This is what
/// keeps a restore inside its destination directory.
pub fn check_relative_path(path: &str) -> Result<(), ManifestError> {
    let refuse = |reason| {
        Err(ManifestError::Path {
            path: path.to_owned(),
            reason,
        })
    };
    if path.is_empty() {
        return refuse("it is empty");
    }
    if path.len() > MAX_PATH {
        return refuse("it is longer than 4096 bytes");
    }
    if path.starts_with('/') {
        return refuse("it is absolute");
    }
    if path.contains('\0') {
        return refuse("it contains a NUL byte");
    }
    for component in path.split('/') {
        match component {
            "" => return refuse("it has an empty component (// or a trailing /)"),
            "." => return refuse("it has a '.' component"),
            ".." => return refuse("it has a '..' component"),
            _ => {}
        }
    }
    Ok(())
}

/// The parent of a checked relative path; `None` for a top-level entry.
fn parent(path: &str) -> Option<&str> {
    path.rsplit_once('/').map(|(parent, _)| parent)
}

impl Manifest {
    /// Everything a restore relies on. `name` is the name the manifest was
    /// read under; a manifest copied to another name is refused, since its
    /// metadata would describe another snapshot.
    pub fn validate(&self, name: &str) -> Result<(), ManifestError> {
        if !(OLDEST_READ_VERSION..=MANIFEST_VERSION).contains(&self.version) {
            return Err(ManifestError::Version(self.version));
        }
        if self.name != name {
            return Err(ManifestError::Name {
                expected: name.to_owned(),
                found: self.name.clone(),
            });
        }
        let mut dirs: HashSet<&str> = HashSet::new();
        let mut seen: HashSet<&str> = HashSet::new();
        for entry in &self.entries {
            let path = entry.path();
            check_relative_path(path)?;
            if !seen.insert(path) {
                return Err(ManifestError::Duplicate(path.to_owned()));
            }
            if let Some(parent) = parent(path)
                && !dirs.contains(parent)
            {
                return Err(ManifestError::Orphan(path.to_owned()));
            }
            if entry.mode() & !MODE_MASK != 0 {
                return Err(ManifestError::Mode {
                    path: path.to_owned(),
                    mode: entry.mode(),
                });
            }
            match entry {
                Entry::Dir { .. } => {
                    dirs.insert(path);
                }
                Entry::Symlink { target, .. } => {
                    if target.is_empty() || target.len() > MAX_PATH || target.contains('\0') {
                        return Err(ManifestError::Path {
                            path: path.to_owned(),
                            reason: "its link target is empty, too long or holds a NUL",
                        });
                    }
                }
                Entry::Whiteout { .. } | Entry::Fifo { .. } | Entry::Socket { .. } => {}
                Entry::File { size, chunks, .. } => {
                    // A reader decompresses a chunk into a buffer of its
                    // length: this bound is also a memory bound.
                    if let Some((index, chunk)) = chunks
                        .iter()
                        .enumerate()
                        .find(|(_, c)| !(1..=u64::from(CHUNK_MAX)).contains(&c.len))
                    {
                        return Err(ManifestError::ChunkLen {
                            path: path.to_owned(),
                            index,
                            len: chunk.len,
                        });
                    }
                    // u128: no list of u64 lengths a JSON file can hold
                    // overflows it.
                    let sum: u128 = chunks.iter().map(|c| u128::from(c.len)).sum();
                    if sum != u128::from(*size) {
                        return Err(ManifestError::ChunkSum {
                            path: path.to_owned(),
                            size: *size,
                            sum,
                        });
                    }
                }
            }
        }
        Ok(())
    }

    /// Bytes of all files, holes included.
    pub fn total_size(&self) -> u64 {
        self.entries
            .iter()
            .map(|e| match e {
                Entry::File { size, .. } => *size,
                _ => 0,
            })
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(entries: Vec<Entry>) -> Manifest {
        Manifest {
            version: MANIFEST_VERSION,
            name: "t".into(),
            created_unix_ms: 1,
            metadata: SnapshotMetadata::default(),
            entries,
        }
    }

    /// A file of zero chunks with these lengths; its size is their sum.
    fn file(path: &str, lens: &[u64]) -> Entry {
        Entry::File {
            path: path.into(),
            mode: 0o644,
            uid: 0,
            gid: 0,
            size: lens.iter().sum(),
            chunks: lens.iter().map(|&len| ChunkRef { id: None, len }).collect(),
        }
    }

    /// `entry` claiming another size than its chunks add up to.
    fn sized(mut entry: Entry, new: u64) -> Entry {
        if let Entry::File { size, .. } = &mut entry {
            *size = new;
        }
        entry
    }

    fn dir(path: &str) -> Entry {
        Entry::Dir {
            path: path.into(),
            mode: 0o755,
            uid: 0,
            gid: 0,
            opaque: false,
        }
    }

    #[test]
    fn relative_paths_that_could_leave_the_destination_are_refused() {
        for ok in ["a", "a/b", "mem.snap", "..a", "a..", ".hidden", "a/.b/c"] {
            check_relative_path(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        for bad in [
            "",
            "/etc/passwd",
            "..",
            "../x",
            "a/../../x",
            "a/..",
            ".",
            "./a",
            "a//b",
            "a/",
            "a\0b",
        ] {
            assert!(
                matches!(check_relative_path(bad), Err(ManifestError::Path { .. })),
                "{bad:?} was accepted"
            );
        }
        assert!(check_relative_path(&"a".repeat(4097)).is_err());
    }

    #[test]
    fn a_good_manifest_passes_and_round_trips_through_json() {
        let mut m = manifest(vec![
            dir("d"),
            dir("d/e"),
            file("d/e/f", &[]),
            file("top", &[u64::from(CHUNK_MAX), 1]),
        ]);
        m.metadata = SnapshotMetadata {
            kind: "pause".into(),
            template_id: Some("base".into()),
            runtime: Some("microvm".into()),
            sandbox_id: None,
            extra: serde_json::json!({"vcpus": 2}),
        };
        if let Entry::File { chunks, .. } = &mut m.entries[3] {
            chunks[0].id = Some(ChunkId::of(b"x"));
        }
        m.validate("t").unwrap();
        let json = serde_json::to_string(&m).unwrap();
        assert!(json.contains("\"type\":\"file\""), "{json}");
        assert!(
            json.contains(&format!(
                "\"chunks\":[{{\"id\":\"{}\",\"len\":{CHUNK_MAX}}},{{\"id\":null,\"len\":1}}]",
                ChunkId::of(b"x")
            )),
            "{json}"
        );
        let back: Manifest = serde_json::from_str(&json).unwrap();
        assert_eq!(back, m);

        // A chunk without its id is not a zero chunk but a broken manifest.
        assert!(serde_json::from_str::<ChunkRef>(r#"{"len": 1}"#).is_err());
        assert!(serde_json::from_str::<ChunkRef>(r#"{"id": null}"#).is_err());
    }

    #[test]
    fn crafted_manifests_are_refused() {
        type Check = fn(&ManifestError) -> bool;
        let path: Check = |e| matches!(e, ManifestError::Path { .. });
        let orphan: Check = |e| matches!(e, ManifestError::Orphan(_));
        let cases: Vec<(Manifest, Check)> = vec![
            (manifest(vec![file("../escape", &[1])]), path),
            (manifest(vec![file("/abs", &[1])]), path),
            (manifest(vec![dir("d"), file("d/../../x", &[1])]), path),
            // A path below a file, or below a directory the manifest never
            // declared (which a restore would have to invent).
            (manifest(vec![file("f", &[1]), file("f/g", &[1])]), orphan),
            (manifest(vec![file("d/g", &[1])]), orphan),
            (manifest(vec![file("d/g", &[1]), dir("d")]), orphan),
            (manifest(vec![file("f", &[1]), file("f", &[1])]), |e| {
                matches!(e, ManifestError::Duplicate(_))
            }),
            // Lengths that do not add up to the size, either way.
            (manifest(vec![sized(file("f", &[100, 200]), 301)]), |e| {
                matches!(e, ManifestError::ChunkSum { sum: 300, .. })
            }),
            (manifest(vec![sized(file("f", &[100, 200]), 299)]), |e| {
                matches!(e, ManifestError::ChunkSum { .. })
            }),
            (manifest(vec![sized(file("f", &[]), 1)]), |e| {
                matches!(e, ManifestError::ChunkSum { .. })
            }),
            // An empty chunk, and one bigger than a reader's buffer.
            (manifest(vec![file("f", &[1, 0, 1])]), |e| {
                matches!(
                    e,
                    ManifestError::ChunkLen {
                        index: 1,
                        len: 0,
                        ..
                    }
                )
            }),
            (
                manifest(vec![file("f", &[u64::from(CHUNK_MAX) + 1])]),
                |e| matches!(e, ManifestError::ChunkLen { index: 0, .. }),
            ),
            (
                manifest(vec![Entry::File {
                    path: "suid".into(),
                    mode: 0o4755,
                    uid: 0,
                    gid: 0,
                    size: 0,
                    chunks: vec![],
                }]),
                |e| matches!(e, ManifestError::Mode { .. }),
            ),
        ];
        for (m, check) in cases {
            let err = m.validate("t").expect_err("refused");
            assert!(check(&err), "{:?}: {err}", m.entries);
        }
        let mut m = manifest(vec![]);
        m.version = 1;
        assert_eq!(m.validate("t"), Err(ManifestError::Version(1)));
        assert!(matches!(
            manifest(vec![]).validate("other"),
            Err(ManifestError::Name { .. })
        ));
    }
}
