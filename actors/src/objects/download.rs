//! Downloading a snapshot into a new directory, all or nothing. A chunk
//! starts where the one before it ends (the manifest records lengths) and
//! must decompress to exactly its recorded length and hash to its name.

use std::fs::File;
use std::os::unix::fs::{DirBuilderExt, FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use object_store::ObjectStoreExt;

use super::chunks::{self, ChunkId};
use super::manifest::{Entry, Manifest};
use super::{ObjectsError, SnapshotStore, chunk_path, cstring};
use crate::metrics;

/// What a download did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DownloadStats {
    pub files: u64,
    pub dirs: u64,
    /// Chunks of all files, zero ones included.
    pub chunks: u64,
    /// Chunks of zeros, left as holes.
    pub zero_chunks: u64,
    /// Chunks fetched from the store.
    pub fetched_chunks: u64,
    /// Chunks taken from the local chunk cache.
    pub cached_chunks: u64,
    /// Compressed bytes fetched from the store.
    pub bytes_downloaded: u64,
    /// Bytes written into files (holes not counted).
    pub bytes_written: u64,
    pub elapsed: Duration,
}

/// One data chunk to fetch and write.
struct Job {
    file: usize,
    id: ChunkId,
    offset: u64,
    len: u64,
}

/// Where a chunk came from.
enum Source {
    Cache,
    Store(u64),
}

/// A file being restored, shared by its chunks' tasks.
struct Target {
    file: File,
    /// Where it is being written, for I/O errors.
    path: PathBuf,
    /// The manifest path, for chunk errors.
    rel: String,
}

/// The temporary directory of a download; removed unless kept.
struct Partial {
    path: PathBuf,
    keep: bool,
}

impl Drop for Partial {
    fn drop(&mut self) {
        if !self.keep {
            remove_tree(&self.path);
        }
    }
}

/// Distinguishes the temporary directories of concurrent downloads in
/// one process (the pid distinguishes processes).
static PARTIAL_COUNTER: AtomicU64 = AtomicU64::new(0);

impl SnapshotStore {
    /// Restore snapshot `name` into `dest`, which must not exist (its parent
    /// is created). The files are written into a temporary directory beside
    /// `dest` and renamed to `dest` once all are complete and verified, so
    /// on any error nothing is left at `dest`. Every chunk is checked
    /// against its SHA-256 name. Zero chunks are left as holes.
    ///
    /// `cache`, if given, is a directory of stored chunks by hash that is
    /// tried before the store and filled from it. Cached chunks are
    /// verified like fetched ones; a bad one is dropped and fetched again.
    ///
    /// `dest` itself gets mode 0700: the snapshot's files are the guest's
    /// memory. Files are not fsynced: `dest` is a local copy that can be
    /// fetched again.
    pub async fn get_dir(
        &self,
        name: &str,
        dest: &Path,
        cache: Option<&Path>,
    ) -> Result<(Manifest, DownloadStats), ObjectsError> {
        let started = Instant::now();
        let manifest = self.manifest(name).await?;
        let mut stats = DownloadStats::default();

        let partial = {
            let dest = dest.to_owned();
            let cache = cache.map(Path::to_owned);
            tokio::task::spawn_blocking(move || prepare(&dest, cache.as_deref())).await??
        };
        // From here on, dropping `partial` (any error) removes it.
        let root = partial.path.clone();
        let entries = manifest.entries.clone();
        let targets = tokio::task::spawn_blocking(move || create_tree(&root, &entries)).await??;

        let mut jobs = Vec::new();
        let mut file_index = 0;
        for entry in &manifest.entries {
            match entry {
                Entry::Dir { .. } => stats.dirs += 1,
                Entry::Symlink { .. }
                | Entry::Whiteout { .. }
                | Entry::Fifo { .. }
                | Entry::Socket { .. } => {}
                Entry::File { chunks, .. } => {
                    stats.files += 1;
                    // A chunk starts where the one before it ends; the
                    // validated lengths add up to the file's size.
                    let mut offset = 0;
                    for chunk in chunks {
                        stats.chunks += 1;
                        let start = offset;
                        offset += chunk.len;
                        let Some(id) = chunk.id else {
                            stats.zero_chunks += 1;
                            continue;
                        };
                        jobs.push(Job {
                            file: file_index,
                            id,
                            offset: start,
                            len: chunk.len,
                        });
                    }
                    file_index += 1;
                }
            }
        }

        let cache = cache.map(|c| Arc::new(c.to_owned()));
        let mut results = futures::stream::iter(jobs)
            .map(|job| {
                let target = Arc::clone(&targets[job.file]);
                let cache = cache.clone();
                async move {
                    let len = job.len;
                    let source = self.fetch_chunk(target, job, cache).await?;
                    Ok::<_, ObjectsError>((len, source))
                }
            })
            .buffer_unordered(self.options.concurrency.max(1));
        while let Some((len, source)) = results.try_next().await? {
            stats.bytes_written += len;
            match source {
                Source::Cache => stats.cached_chunks += 1,
                Source::Store(bytes) => {
                    stats.fetched_chunks += 1;
                    stats.bytes_downloaded += bytes;
                    ::metrics::counter!(metrics::SNAPSHOT_BYTES_DOWNLOADED).increment(bytes);
                }
            }
        }
        drop(results);
        drop(targets);

        let root = partial.path.clone();
        let entries = manifest.entries.clone();
        let dest_owned = dest.to_owned();
        tokio::task::spawn_blocking(move || {
            finish_tree(&root, &entries)?;
            rename_noreplace(&root, &dest_owned)
        })
        .await??;
        let mut partial = partial;
        partial.keep = true;

        stats.elapsed = started.elapsed();
        ::metrics::histogram!(metrics::SNAPSHOT_DOWNLOAD_SECONDS)
            .record(stats.elapsed.as_secs_f64());
        tracing::info!(
            store = %self.describe,
            snapshot = name,
            dest = %dest.display(),
            files = stats.files,
            chunks = stats.chunks,
            zero = stats.zero_chunks,
            fetched = stats.fetched_chunks,
            cached = stats.cached_chunks,
            bytes_downloaded = stats.bytes_downloaded,
            secs = stats.elapsed.as_secs_f64(),
            "snapshot downloaded"
        );
        Ok((manifest, stats))
    }

    async fn fetch_chunk(
        &self,
        target: Arc<Target>,
        job: Job,
        cache: Option<Arc<PathBuf>>,
    ) -> Result<Source, ObjectsError> {
        let Job {
            id, offset, len, ..
        } = job;
        if let Some(cache) = &cache {
            let cache = Arc::clone(cache);
            let target = Arc::clone(&target);
            let hit = tokio::task::spawn_blocking(move || {
                let Some(data) = read_cached(&cache, &id, len) else {
                    return Ok(false);
                };
                write_at(&target, &data, offset)?;
                Ok::<_, ObjectsError>(true)
            })
            .await??;
            if hit {
                return Ok(Source::Cache);
            }
        }
        let path = chunk_path(&id);
        let got = match self.store.get(&path).await {
            Ok(got) => got.bytes().await,
            Err(err) => Err(err),
        };
        let stored = match got {
            Ok(bytes) => bytes,
            Err(object_store::Error::NotFound { .. }) => {
                return Err(ObjectsError::MissingChunk {
                    hash: id,
                    file: target.rel.clone(),
                });
            }
            Err(source) => return Err(ObjectsError::store("get", &path, source)),
        };
        let bytes = stored.len() as u64;
        tokio::task::spawn_blocking(move || {
            let data =
                chunks::decode(&id, &stored, len).map_err(|reason| ObjectsError::CorruptChunk {
                    hash: id,
                    file: target.rel.clone(),
                    reason: reason.to_string(),
                })?;
            write_at(&target, &data, offset)?;
            if let Some(cache) = &cache {
                write_cached(cache, &id, &stored);
            }
            Ok::<_, ObjectsError>(())
        })
        .await??;
        Ok(Source::Store(bytes))
    }
}

fn write_at(target: &Target, data: &[u8], offset: u64) -> Result<(), ObjectsError> {
    target
        .file
        .write_all_at(data, offset)
        .map_err(|e| ObjectsError::io(&target.path, e))
}

/// A verified chunk from the cache, or `None` (absent or bad: a bad one is
/// removed so that the store's copy replaces it).
fn read_cached(cache: &Path, id: &ChunkId, len: u64) -> Option<Vec<u8>> {
    let path = cache.join(id.to_hex());
    let stored = std::fs::read(&path).ok()?;
    match chunks::decode(id, &stored, len) {
        Ok(data) => Some(data),
        Err(err) => {
            tracing::warn!(chunk = %id, cache = %cache.display(), "dropping a bad cached chunk: {err}");
            let _ = std::fs::remove_file(&path);
            None
        }
    }
}

/// Keep a verified chunk in the cache. Best effort: a full disk must not
/// fail a restore that has the chunk in hand.
fn write_cached(cache: &Path, id: &ChunkId, stored: &[u8]) {
    let path = cache.join(id.to_hex());
    if path.exists() {
        return;
    }
    let tmp = cache.join(format!(
        ".{}.{}-{}",
        id.to_hex(),
        std::process::id(),
        PARTIAL_COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let result = std::fs::write(&tmp, stored).and_then(|()| std::fs::rename(&tmp, &path));
    if let Err(err) = result {
        let _ = std::fs::remove_file(&tmp);
        tracing::warn!(chunk = %id, cache = %cache.display(), "not caching a chunk: {err}");
    }
}

/// Check `dest`, make its parent and the cache, and create the temporary
/// directory beside `dest`.
fn prepare(dest: &Path, cache: Option<&Path>) -> Result<Partial, ObjectsError> {
    if dest.symlink_metadata().is_ok() {
        return Err(ObjectsError::DestinationExists {
            path: dest.to_owned(),
        });
    }
    let invalid = || {
        ObjectsError::io(
            dest,
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "a destination must end in a file name",
            ),
        )
    };
    let file_name = dest.file_name().ok_or_else(invalid)?;
    let parent = match dest.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(parent).map_err(|e| ObjectsError::io(parent, e))?;
    if let Some(cache) = cache {
        std::fs::create_dir_all(cache).map_err(|e| ObjectsError::io(cache, e))?;
    }
    let path = parent.join(format!(
        ".{}.partial-{}-{}",
        file_name.to_string_lossy(),
        std::process::id(),
        PARTIAL_COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&path)
        .map_err(|e| ObjectsError::io(&path, e))?;
    Ok(Partial { path, keep: false })
}

/// Create the manifest's directories and files, each file at its full
/// size: a new file extended by `set_len` is one hole, so the zero chunks
/// need no writes at all; FIFOs, sockets and whiteouts too. Symlinks,
/// owners and modes come last ([`finish_tree`]): a read-only directory
/// could not be filled, and no write may go through a link.
fn create_tree(root: &Path, entries: &[Entry]) -> Result<Vec<Arc<Target>>, ObjectsError> {
    let mut targets = Vec::new();
    for entry in entries {
        // Validated: relative, no `..`, parents are directories created
        // just before, so this stays below `root`.
        let path = root.join(entry.path());
        match entry {
            Entry::Dir { .. } => std::fs::DirBuilder::new()
                .mode(0o700)
                .create(&path)
                .map_err(|e| ObjectsError::io(&path, e))?,
            Entry::Whiteout { .. } => make_node(&path, libc::S_IFCHR)?,
            Entry::Fifo { .. } => make_node(&path, libc::S_IFIFO)?,
            Entry::Socket { .. } => make_node(&path, libc::S_IFSOCK)?,
            Entry::Symlink { .. } => {}
            Entry::File { size, .. } => {
                let file = File::create_new(&path).map_err(|e| ObjectsError::io(&path, e))?;
                file.set_len(*size)
                    .map_err(|e| ObjectsError::io(&path, e))?;
                targets.push(Arc::new(Target {
                    file,
                    path,
                    rel: entry.path().to_owned(),
                }));
            }
        }
    }
    Ok(targets)
}

/// A FIFO, socket or (device 0:0) whiteout at `path`, mode 0600 for now.
fn make_node(path: &Path, kind: libc::mode_t) -> Result<(), ObjectsError> {
    let c = cstring(path)?;
    // SAFETY: `c` is a NUL-terminated path that outlives the call.
    if unsafe { libc::mknod(c.as_ptr(), kind | 0o600, 0) } != 0 {
        return Err(ObjectsError::io(path, std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Make the symlinks (now that every file is written), then give every
/// entry its owner and mode — the owner first (chown clears mode bits),
/// directories last and deepest first — and opaque directories their
/// overlay mark.
fn finish_tree(root: &Path, entries: &[Entry]) -> Result<(), ObjectsError> {
    for entry in entries {
        if let Entry::Symlink { path, target, .. } = entry {
            let link = root.join(path);
            std::os::unix::fs::symlink(target, &link).map_err(|e| ObjectsError::io(&link, e))?;
        }
    }
    let others = entries.iter().filter(|e| !matches!(e, Entry::Dir { .. }));
    let dirs = entries
        .iter()
        .rev()
        .filter(|e| matches!(e, Entry::Dir { .. }));
    for entry in others.chain(dirs) {
        let path = root.join(entry.path());
        let (uid, gid) = entry.owner();
        std::os::unix::fs::lchown(&path, Some(uid), Some(gid))
            .map_err(|e| ObjectsError::io(&path, e))?;
        if let Entry::Dir { opaque: true, .. } = entry {
            let c = cstring(&path)?;
            // SAFETY: NUL-terminated strings and a value of the given
            // length, all outliving the call.
            let rc = unsafe {
                libc::lsetxattr(
                    c.as_ptr(),
                    c"trusted.overlay.opaque".as_ptr(),
                    b"y".as_ptr().cast(),
                    1,
                    0,
                )
            };
            if rc != 0 {
                return Err(ObjectsError::io(&path, std::io::Error::last_os_error()));
            }
        }
        if matches!(entry, Entry::Symlink { .. }) {
            continue;
        }
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(entry.mode()))
            .map_err(|e| ObjectsError::io(&path, e))?;
    }
    Ok(())
}

/// Rename `from` to `to` unless `to` exists (`renameat2(RENAME_NOREPLACE)`):
/// a directory that appeared at `to` since we checked is not replaced.
fn rename_noreplace(from: &Path, to: &Path) -> Result<(), ObjectsError> {
    let (c_from, c_to) = (cstring(from)?, cstring(to)?);
    // SAFETY: both are valid NUL-terminated strings that outlive the call.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            c_from.as_ptr(),
            libc::AT_FDCWD,
            c_to.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if rc == 0 {
        return Ok(());
    }
    let err = std::io::Error::last_os_error();
    if err.kind() == std::io::ErrorKind::AlreadyExists {
        return Err(ObjectsError::DestinationExists {
            path: to.to_owned(),
        });
    }
    Err(ObjectsError::io(to, err))
}

/// Remove a partial download, also where a restored mode made a directory
/// unwritable (which stops removal for a non-root user).
fn remove_tree(path: &Path) {
    if std::fs::remove_dir_all(path).is_ok() || !path.exists() {
        return;
    }
    fn open_up(dir: &Path) {
        let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
        if let Ok(read) = std::fs::read_dir(dir) {
            for child in read.flatten() {
                if child.file_type().is_ok_and(|t| t.is_dir()) {
                    open_up(&child.path());
                }
            }
        }
    }
    open_up(path);
    if let Err(err) = std::fs::remove_dir_all(path) {
        tracing::warn!(path = %path.display(), "could not remove a partial download: {err}");
    }
}
