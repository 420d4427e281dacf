//! The content-addressed snapshot store, over `object_store`.
//!
//! A snapshot is a plain directory — a microVM's memory file (hundreds of
//! MiB, mostly zeros), its CPU state and disk overlay, or a gVisor
//! checkpoint image directory. In the store it is:
//!
//! ```text
//! chunks/<sha256 hex>                zstd of one chunk of some file (256 KiB..4 MiB)
//! snapshots/<name>/manifest.json     directories, files, modes, sizes, chunk lists
//! claims/<sandbox id>/<epoch>        which node holds a sandbox (claims.rs)
//! ```
//!
//! - Files are cut at content-defined boundaries (FastCDC, ~1 MiB on
//!   average, see `chunks.rs`), so bytes inserted early in a file change
//!   the chunks near the insertion only: two checkpoints of one gVisor
//!   sandbox, packed streams whose sections change size, share the rest.
//!   An upload first reads each file once to find its cuts and name its
//!   chunks, then reads again only the chunks it must send.
//! - Chunks are named by the SHA-256 of their uncompressed bytes, so the
//!   snapshots of one template share the memory they did not touch: an
//!   upload skips the chunks its caller knows ([`KnownChunks`]) and those a
//!   HEAD finds, and a download checks every chunk against its name.
//! - A chunk of zeros is never stored; the manifest records it as `null`
//!   and a download leaves a hole, so sparse files stay sparse.
//! - The manifest is written after the last chunk: a snapshot is visible
//!   complete or not at all. A download is written next to its destination
//!   and renamed into place when complete, so it too is all or nothing.
//! - Chunks no manifest refers to are garbage; [`SnapshotStore::gc`]
//!   deletes those older than a grace period, which covers the uploads
//!   that have chunks but no manifest yet.
//!
//! Meant for snapshot directories of a few files: every file is held open
//! while it is transferred.
//!
//! Stored: directories (with overlay opacity), regular files, symlinks,
//! overlay whiteouts, FIFOs and sockets, each with its owner and
//! permission bits — a gVisor snapshot's `upper/` is the guest's writable
//! layer, and holds whatever the guest made. Symlinks are made last, after
//! every file is written, and no entry's parent can be one, so a restore
//! never writes through a link. Devices other than whiteouts are refused,
//! naming the file.
//!
//! Pause publishes a sandbox's snapshot here and resume fetches it when
//! the local copy is gone (`sandbox/actor.rs`). Which node holds a
//! sandbox is recorded next to the snapshots (`claims/`, see `claims.rs`),
//! so that another node can take a paused sandbox over and a stale copy
//! is never resumed.

mod chunks;
mod claims;
mod download;
mod gc;
pub mod manifest;
#[cfg(test)]
mod tests;
mod upload;
pub mod url;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::TryStreamExt;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};

pub use chunks::{CHUNK_AVG, CHUNK_MAX, CHUNK_MIN, ChunkId, KnownChunks};
pub use claims::{Claim, ClaimState};
pub use download::DownloadStats;
pub use gc::GcStats;
pub use manifest::{ChunkRef, Entry, MANIFEST_VERSION, Manifest, ManifestError, SnapshotMetadata};
pub use upload::UploadStats;
pub use url::{Credentials, OpenOptions, StoreUrl, UrlError};

/// Where chunks live in the store.
const CHUNKS: &str = "chunks";
/// Where manifests live in the store.
const SNAPSHOTS: &str = "snapshots";
/// The manifest's object name below `snapshots/<name>/`.
const MANIFEST: &str = "manifest.json";
/// Longest snapshot name.
const MAX_NAME: usize = 256;

/// Everything that can go wrong. Store errors say which operation on which
/// object failed; object_store's own message follows (it names the request
/// and its retries, never credentials).
#[derive(Debug, thiserror::Error)]
pub enum ObjectsError {
    #[error(transparent)]
    Url(#[from] UrlError),
    #[error(
        "the s3 store needs credentials: set {} and {} (or pass them to the store)",
        url::ACCESS_KEY_ENV,
        url::SECRET_KEY_ENV
    )]
    NoCredentials,
    #[error("object store: {op} {object} failed: {source}")]
    Store {
        op: &'static str,
        object: String,
        #[source]
        source: object_store::Error,
    },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("snapshot name {name:?} is refused: {reason}")]
    BadName { name: String, reason: &'static str },
    #[error(
        "{location} is not the manifest of a snapshot name this build reads; GC stops rather than guess what it refers to"
    )]
    ForeignManifest { location: String },
    #[error("snapshot {name:?} not found")]
    NotFound { name: String },
    #[error("manifest of snapshot {name:?} is not valid JSON of a manifest: {source}")]
    ManifestJson {
        name: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("manifest of snapshot {name:?} is refused: {source}")]
    BadManifest {
        name: String,
        #[source]
        source: ManifestError,
    },
    #[error("{}: {what} cannot be stored in a snapshot (only regular files and directories)", path.display())]
    Unsupported { path: PathBuf, what: &'static str },
    #[error("{}: file name is not UTF-8, which a manifest cannot record", path.display())]
    NotUtf8 { path: PathBuf },
    #[error("{}: the file changed while it was being uploaded", path.display())]
    Changed { path: PathBuf },
    #[error("chunk {hash} of {file:?} is missing from the store")]
    MissingChunk { hash: ChunkId, file: String },
    #[error("chunk {hash} of {file:?} is corrupt: {reason}")]
    CorruptChunk {
        hash: ChunkId,
        file: String,
        reason: String,
    },
    #[error("compressing chunk {hash}: {source}")]
    Compress {
        hash: ChunkId,
        #[source]
        source: std::io::Error,
    },
    #[error("{} already exists; a snapshot is restored only into a new directory", path.display())]
    DestinationExists { path: PathBuf },
    #[error("a worker thread failed: {0}")]
    Task(#[from] tokio::task::JoinError),
    #[error("a worker thread failed: {0}")]
    Worker(String),
    #[error(
        "sandbox {sandbox_id} changed hands: expected its claim at epoch {}, the store says {}",
        expected.map_or_else(|| "none".to_owned(), |e| e.to_string()),
        current.as_ref().map_or_else(|| "it has no claim".to_owned(), |c| format!("it is {c}"))
    )]
    ClaimTaken {
        sandbox_id: String,
        expected: Option<u64>,
        current: Option<Box<Claim>>,
    },
    #[error("claim {object} is not a claim document: {source}")]
    ClaimJson {
        object: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("the claims of sandbox {sandbox_id} kept changing while being read; retry")]
    ClaimBusy { sandbox_id: String },
}

impl ObjectsError {
    fn store(
        op: &'static str,
        object: impl std::fmt::Display,
        source: object_store::Error,
    ) -> Self {
        Self::Store {
            op,
            object: object.to_string(),
            source,
        }
    }

    fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }
}

/// Tuning shared by uploads and downloads.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// Chunks in flight at once, per upload or download. Each holds up to
    /// a chunk of memory uncompressed plus its compressed form. Also the
    /// files an upload's first pass cuts at once, each with a window of
    /// two chunks.
    pub concurrency: usize,
    /// A chunk an upload finds by HEAD but that was last written longer ago
    /// than this is written again rather than reused. It may be garbage
    /// (from a deleted snapshot) that a GC running now would delete before
    /// our manifest refers to it; rewriting makes it young, and young
    /// chunks are safe while the GC grace exceeds this plus the longest
    /// upload. Chunks from [`KnownChunks`] are not checked: live manifests
    /// refer to them.
    pub refresh_after: Duration,
    /// Uploads read, hash and compress at the scheduler's idle priority
    /// (SCHED_IDLE): for uploads nobody waits for (a template snapshot),
    /// which must never slow the node's own work.
    pub idle: bool,
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self {
            concurrency: 8,
            refresh_after: Duration::from_secs(60 * 60),
            idle: false,
        }
    }
}

/// A snapshot store: an object store holding chunks and manifests.
#[derive(Debug, Clone)]
pub struct SnapshotStore {
    store: Arc<dyn ObjectStore>,
    /// The URL or other description, for messages.
    describe: String,
    options: StoreOptions,
}

impl SnapshotStore {
    /// A snapshot store over any object store (tests wrap one to inject
    /// faults). [`SnapshotStore::open`] opens one from a URL.
    pub fn new(store: Arc<dyn ObjectStore>, describe: impl Into<String>) -> Self {
        Self {
            store,
            describe: describe.into(),
            options: StoreOptions::default(),
        }
    }

    pub fn with_options(mut self, options: StoreOptions) -> Self {
        self.options = options;
        self
    }

    pub fn options(&self) -> &StoreOptions {
        &self.options
    }

    pub fn describe(&self) -> &str {
        &self.describe
    }

    /// The manifest of snapshot `name`, validated.
    pub async fn manifest(&self, name: &str) -> Result<Manifest, ObjectsError> {
        check_name(name)?;
        let path = manifest_path(name);
        let bytes = match self.store.get(&path).await {
            Ok(got) => got.bytes().await,
            Err(err) => Err(err),
        };
        let bytes = match bytes {
            Ok(bytes) => bytes,
            Err(object_store::Error::NotFound { .. }) => {
                return Err(ObjectsError::NotFound {
                    name: name.to_owned(),
                });
            }
            Err(source) => return Err(ObjectsError::store("get", &path, source)),
        };
        let json_error = |source| ObjectsError::ManifestJson {
            name: name.to_owned(),
            source,
        };
        // The version first: a manifest of another version is refused as
        // such, not as JSON that does not fit this version's fields.
        #[derive(serde::Deserialize)]
        struct Versioned {
            version: u32,
        }
        let Versioned { version } = serde_json::from_slice(&bytes).map_err(json_error)?;
        if !(manifest::OLDEST_READ_VERSION..=MANIFEST_VERSION).contains(&version) {
            return Err(ObjectsError::BadManifest {
                name: name.to_owned(),
                source: ManifestError::Version(version),
            });
        }
        let manifest: Manifest = serde_json::from_slice(&bytes).map_err(json_error)?;
        manifest
            .validate(name)
            .map_err(|source| ObjectsError::BadManifest {
                name: name.to_owned(),
                source,
            })?;
        Ok(manifest)
    }

    /// Names of the snapshots whose name is `prefix` or starts with
    /// `prefix/` (whole name components, as object stores list), sorted.
    /// An empty prefix lists all.
    pub async fn list(&self, prefix: &str) -> Result<Vec<String>, ObjectsError> {
        let mut root = ObjectPath::from(SNAPSHOTS);
        if !prefix.is_empty() {
            check_name(prefix)?;
            root = prefix.split('/').fold(root, |p, part| p.join(part));
        }
        let mut names: Vec<String> = self
            .store
            .list(Some(&root))
            .map_err(|source| ObjectsError::store("list", &root, source))
            .try_filter_map(|meta| async move { Ok(name_of_manifest(&meta.location)) })
            .try_collect()
            .await?;
        names.sort();
        Ok(names)
    }

    /// Delete snapshot `name`'s manifest. Its chunks stay until
    /// [`SnapshotStore::gc`] finds no other manifest refers to them.
    pub async fn delete(&self, name: &str) -> Result<(), ObjectsError> {
        check_name(name)?;
        let path = manifest_path(name);
        match self.store.head(&path).await {
            Ok(_) => {}
            Err(object_store::Error::NotFound { .. }) => {
                return Err(ObjectsError::NotFound {
                    name: name.to_owned(),
                });
            }
            Err(source) => return Err(ObjectsError::store("head", &path, source)),
        }
        self.store
            .delete(&path)
            .await
            .map_err(|source| ObjectsError::store("delete", &path, source))
    }

    /// Write a manifest: the last step of an upload.
    async fn put_manifest(&self, manifest: &Manifest) -> Result<(), ObjectsError> {
        let path = manifest_path(&manifest.name);
        let json =
            serde_json::to_vec_pretty(manifest).map_err(|source| ObjectsError::ManifestJson {
                name: manifest.name.clone(),
                source,
            })?;
        self.store
            .put(&path, PutPayload::from(json))
            .await
            .map_err(|source| ObjectsError::store("put", &path, source))?;
        Ok(())
    }
}

/// `p` as a C string for a system call; a path holding a NUL byte is an
/// I/O error naming it.
pub(crate) fn cstring(p: &std::path::Path) -> Result<std::ffi::CString, ObjectsError> {
    use std::os::unix::ffi::OsStrExt;
    std::ffi::CString::new(p.as_os_str().as_bytes()).map_err(|_| {
        ObjectsError::io(
            p,
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "path has a NUL byte"),
        )
    })
}

/// A snapshot name: `/`-separated components of `[A-Za-z0-9._-]`, none
/// empty, `.` or `..`, at most 256 bytes, e.g. `templates/base` or
/// `sandboxes/abc123/3`. It becomes part of object names as is.
pub fn check_name(name: &str) -> Result<(), ObjectsError> {
    let refuse = |reason| {
        Err(ObjectsError::BadName {
            name: name.to_owned(),
            reason,
        })
    };
    if name.is_empty() {
        return refuse("it is empty");
    }
    if name.len() > MAX_NAME {
        return refuse("it is longer than 256 bytes");
    }
    for part in name.split('/') {
        if part.is_empty() || part == "." || part == ".." {
            return refuse("it has an empty, '.' or '..' component");
        }
        if !part
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        {
            return refuse("only A-Z a-z 0-9 . _ - and / are allowed");
        }
    }
    Ok(())
}

fn manifest_path(name: &str) -> ObjectPath {
    name.split('/')
        .fold(ObjectPath::from(SNAPSHOTS), |p, part| p.join(part))
        .join(MANIFEST)
}

fn chunk_path(id: &ChunkId) -> ObjectPath {
    ObjectPath::from(CHUNKS).join(id.to_hex())
}

/// `snapshots/<name>/manifest.json` -> `<name>`.
fn name_of_manifest(location: &ObjectPath) -> Option<String> {
    let rest = location
        .as_ref()
        .strip_prefix(SNAPSHOTS)?
        .strip_prefix('/')?;
    let name = rest.strip_suffix(MANIFEST)?.strip_suffix('/')?;
    check_name(name).ok()?;
    Some(name.to_owned())
}

fn unix_ms(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
