//! Uploading a snapshot directory: scan, cut and name the chunks of every
//! file (one blocking read of each), deduplicate, upload what is new, and
//! the manifest last.

use std::collections::HashSet;
use std::fs::File;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use futures::{StreamExt, TryStreamExt};
use object_store::{ObjectStoreExt, PutPayload};

use super::chunks::{self, ChunkId, KnownChunks};
use super::manifest::{ChunkRef, Entry, MANIFEST_VERSION, MODE_MASK, Manifest, SnapshotMetadata};
use super::{ObjectsError, SnapshotStore, check_name, chunk_path, unix_ms};
use crate::metrics;

/// What an upload did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct UploadStats {
    pub files: u64,
    pub dirs: u64,
    /// Chunks of all files, zero ones included.
    pub chunks: u64,
    /// Chunks of zeros: recorded, not stored.
    pub zero_chunks: u64,
    /// Chunks not uploaded because the store has them: known from earlier
    /// manifests, found by HEAD, or met earlier in this same upload.
    pub deduplicated_chunks: u64,
    pub uploaded_chunks: u64,
    /// Bytes of all files (holes read as zeros), each read once to find
    /// and name its chunks; the chunks uploaded are read a second time.
    pub bytes_read: u64,
    /// Compressed bytes sent to the store.
    pub bytes_uploaded: u64,
    pub elapsed: Duration,
}

impl UploadStats {
    /// Deduplicated chunks over the chunks that hold data: 1.0 when nothing
    /// needed uploading, 0.0 when everything did. 1.0 for no data at all.
    pub fn dedup_ratio(&self) -> f64 {
        let data = self.chunks - self.zero_chunks;
        if data == 0 {
            1.0
        } else {
            self.deduplicated_chunks as f64 / data as f64
        }
    }
}

/// An entry found under the snapshot directory: a file to chunk, or
/// anything else, whole.
enum Scanned {
    File {
        rel: String,
        abs: PathBuf,
        mode: u32,
        uid: u32,
        gid: u32,
        size: u64,
    },
    Other(Entry),
}

/// Walk `root`, parents before children, children sorted by name, so the
/// same directory always gives the same manifest. Refuses what a manifest
/// cannot hold, naming the file.
fn scan(root: &Path) -> Result<Vec<Scanned>, ObjectsError> {
    let meta = std::fs::metadata(root).map_err(|e| ObjectsError::io(root, e))?;
    if !meta.is_dir() {
        return Err(ObjectsError::io(
            root,
            std::io::Error::new(std::io::ErrorKind::NotADirectory, "not a directory"),
        ));
    }
    let mut out = Vec::new();
    scan_into(root, "", &mut out)?;
    Ok(out)
}

fn scan_into(dir: &Path, rel_dir: &str, out: &mut Vec<Scanned>) -> Result<(), ObjectsError> {
    let mut children: Vec<std::fs::DirEntry> = std::fs::read_dir(dir)
        .map_err(|e| ObjectsError::io(dir, e))?
        .collect::<Result<_, _>>()
        .map_err(|e| ObjectsError::io(dir, e))?;
    children.sort_by_key(|c| c.file_name());
    for child in children {
        let abs = child.path();
        let name = child
            .file_name()
            .into_string()
            .map_err(|_| ObjectsError::NotUtf8 { path: abs.clone() })?;
        let rel = if rel_dir.is_empty() {
            name
        } else {
            format!("{rel_dir}/{name}")
        };
        let meta = std::fs::symlink_metadata(&abs).map_err(|e| ObjectsError::io(&abs, e))?;
        let kind = meta.file_type();
        let mode = meta.permissions().mode() & MODE_MASK;
        let (uid, gid) = (meta.uid(), meta.gid());
        if kind.is_dir() {
            out.push(Scanned::Other(Entry::Dir {
                path: rel.clone(),
                mode,
                uid,
                gid,
                opaque: is_opaque(&abs)?,
            }));
            scan_into(&abs, &rel, out)?;
        } else if kind.is_file() {
            out.push(Scanned::File {
                rel,
                abs,
                mode,
                uid,
                gid,
                size: meta.len(),
            });
        } else if kind.is_symlink() {
            let target = std::fs::read_link(&abs)
                .map_err(|e| ObjectsError::io(&abs, e))?
                .into_os_string()
                .into_string()
                .map_err(|_| ObjectsError::NotUtf8 { path: abs.clone() })?;
            out.push(Scanned::Other(Entry::Symlink {
                path: rel,
                target,
                uid,
                gid,
            }));
        } else if kind.is_char_device() && meta.rdev() == 0 {
            out.push(Scanned::Other(Entry::Whiteout {
                path: rel,
                uid,
                gid,
            }));
        } else if kind.is_fifo() {
            out.push(Scanned::Other(Entry::Fifo {
                path: rel,
                mode,
                uid,
                gid,
            }));
        } else if kind.is_socket() {
            out.push(Scanned::Other(Entry::Socket {
                path: rel,
                mode,
                uid,
                gid,
            }));
        } else {
            let what = if kind.is_block_device() {
                "a block device"
            } else if kind.is_char_device() {
                "a character device (other than an overlay whiteout)"
            } else {
                "a special file"
            };
            return Err(ObjectsError::Unsupported { path: abs, what });
        }
    }
    Ok(())
}

/// Whether directory `dir` is an overlay opaque directory
/// (`trusted.overlay.opaque` is `y`; reading it needs CAP_SYS_ADMIN, and
/// an unprivileged reader sees no trusted xattrs at all: not opaque).
fn is_opaque(dir: &Path) -> Result<bool, ObjectsError> {
    let path = super::cstring(dir)?;
    let mut value = [0u8; 8];
    // SAFETY: both strings are NUL-terminated and `value` is writable for
    // its length for the duration of the call.
    let n = unsafe {
        libc::lgetxattr(
            path.as_ptr(),
            c"trusted.overlay.opaque".as_ptr(),
            value.as_mut_ptr().cast(),
            value.len(),
        )
    };
    if n >= 0 {
        return Ok(&value[..n as usize] == b"y");
    }
    let err = std::io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::ENODATA) | Some(libc::ENOTSUP) | Some(libc::ERANGE) => Ok(false),
        _ => Err(ObjectsError::io(dir, err)),
    }
}

/// Run blocking `work` off the async threads, which also serve the
/// node's requests. With `idle`, on a thread of its own at the
/// scheduler's idle priority (SCHED_IDLE: it gets a CPU only when no
/// other thread wants one); never on the shared blocking pool, whose
/// threads must not keep that priority.
async fn blocking<T: Send + 'static>(
    idle: bool,
    work: impl FnOnce() -> Result<T, ObjectsError> + Send + 'static,
) -> Result<T, ObjectsError> {
    if !idle {
        return tokio::task::spawn_blocking(work).await?;
    }
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("objects-idle".into())
        .spawn(move || {
            let param = libc::sched_param { sched_priority: 0 };
            // SAFETY: pid 0 is the calling thread; `param` outlives the call.
            if unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) } != 0 {
                tracing::debug!(
                    "idle priority refused ({}); uploading at normal priority",
                    std::io::Error::last_os_error()
                );
            }
            let _ = tx.send(work());
        })
        .map_err(|e| ObjectsError::Worker(format!("starting an idle-priority thread: {e}")))?;
    rx.await
        .map_err(|_| ObjectsError::Worker("an idle-priority thread died".into()))?
}

/// One data chunk to upload, as the first pass found it.
struct Job {
    /// Index of the file among the scanned files.
    file: usize,
    id: ChunkId,
    offset: u64,
    len: u64,
}

/// What happened to one chunk.
enum Outcome {
    Deduplicated,
    /// Uploaded, with its compressed size.
    Uploaded(u64),
}

/// An open file being uploaded, shared by its chunks' tasks.
struct Source {
    file: File,
    path: PathBuf,
}

impl SnapshotStore {
    /// Store the directory `dir` as snapshot `name` and return its
    /// manifest. Chunks in `known` are taken to be in the store already
    /// (see [`KnownChunks`]); others are looked up, and uploaded if absent.
    /// Every file is read once to find its chunks; a chunk to upload is read
    /// again and must hash to the same name, else the file changed while
    /// it was uploaded ([`ObjectsError::Changed`]). The manifest is written only after every chunk is, so on any error
    /// nothing new is visible (uploaded chunks stay until GC).
    ///
    /// A manifest of the same name is replaced.
    pub async fn put_dir(
        &self,
        dir: &Path,
        name: &str,
        metadata: SnapshotMetadata,
        known: &KnownChunks,
    ) -> Result<(Manifest, UploadStats), ObjectsError> {
        check_name(name)?;
        let started = Instant::now();
        let root = dir.to_owned();
        let idle = self.options.idle;
        let (scanned, sources) = blocking(idle, move || {
            let scanned = scan(&root)?;
            let mut sources = Vec::new();
            for entry in &scanned {
                if let Scanned::File { abs, .. } = entry {
                    let file = File::open(abs).map_err(|e| ObjectsError::io(abs, e))?;
                    sources.push(Arc::new(Source {
                        file,
                        path: abs.clone(),
                    }));
                }
            }
            Ok::<_, ObjectsError>((scanned, sources))
        })
        .await?;

        // First pass: cut and name every file's chunks. A blocking read of
        // the whole file (SHA-256 and the chunker are CPU work too), files
        // side by side up to the concurrency; each holds at most two
        // chunks of memory.
        let sizes: Vec<u64> = scanned
            .iter()
            .filter_map(|e| match e {
                Scanned::File { size, .. } => Some(*size),
                Scanned::Other(_) => None,
            })
            .collect();
        // Owned, not borrowed: the stream's futures must be `Send` for any
        // lifetime, which closures over borrows fail to prove.
        let files: Vec<(Arc<Source>, u64)> = sources.iter().cloned().zip(sizes.clone()).collect();
        let chunk_lists: Vec<Vec<ChunkRef>> = futures::stream::iter(files)
            .map(|(source, size)| async move {
                blocking(idle, move || {
                    chunks::cut_file(&source.file, size).map_err(|e| match e.kind() {
                        std::io::ErrorKind::UnexpectedEof => ObjectsError::Changed {
                            path: source.path.clone(),
                        },
                        _ => ObjectsError::io(&source.path, e),
                    })
                })
                .await
            })
            .buffered(self.options.concurrency.max(1))
            .try_collect()
            .await?;

        let mut stats = UploadStats::default();
        let mut jobs = Vec::new();
        for entry in &scanned {
            match entry {
                Scanned::Other(Entry::Dir { .. }) => stats.dirs += 1,
                Scanned::Other(_) => {}
                Scanned::File { size, .. } => {
                    stats.files += 1;
                    stats.bytes_read += size;
                }
            }
        }
        for (file, list) in chunk_lists.iter().enumerate() {
            let mut offset = 0;
            for chunk in list {
                stats.chunks += 1;
                match chunk.id {
                    None => stats.zero_chunks += 1,
                    Some(id) => jobs.push(Job {
                        file,
                        id,
                        offset,
                        len: chunk.len,
                    }),
                }
                offset += chunk.len;
            }
        }

        // Chunks some task of this upload has taken on, so a chunk that
        // repeats within the snapshot is looked up and sent once.
        let claimed = Mutex::new(HashSet::new());
        let mut results = futures::stream::iter(jobs)
            .map(|job| {
                let source = Arc::clone(&sources[job.file]);
                let claimed = &claimed;
                async move { self.upload_chunk(source, job, known, claimed).await }
            })
            .buffer_unordered(self.options.concurrency.max(1));
        while let Some(outcome) = results.try_next().await? {
            match outcome {
                Outcome::Deduplicated => {
                    stats.deduplicated_chunks += 1;
                    ::metrics::counter!(metrics::SNAPSHOT_CHUNKS_DEDUPLICATED).increment(1);
                }
                Outcome::Uploaded(bytes) => {
                    stats.uploaded_chunks += 1;
                    stats.bytes_uploaded += bytes;
                    ::metrics::counter!(metrics::SNAPSHOT_CHUNKS_UPLOADED).increment(1);
                    ::metrics::counter!(metrics::SNAPSHOT_BYTES_UPLOADED).increment(bytes);
                }
            }
        }
        drop(results);

        // A file that grew while we read it would be stored cut short.
        tokio::task::spawn_blocking(move || {
            for (source, size) in sources.iter().zip(sizes) {
                let now = source
                    .file
                    .metadata()
                    .map_err(|e| ObjectsError::io(&source.path, e))?;
                if now.len() != size {
                    return Err(ObjectsError::Changed {
                        path: source.path.clone(),
                    });
                }
            }
            Ok(())
        })
        .await??;

        let mut chunk_lists = chunk_lists.into_iter();
        let entries = scanned
            .into_iter()
            .map(|entry| match entry {
                Scanned::Other(entry) => entry,
                Scanned::File {
                    rel,
                    mode,
                    uid,
                    gid,
                    size,
                    ..
                } => Entry::File {
                    path: rel,
                    mode,
                    uid,
                    gid,
                    size,
                    chunks: chunk_lists.next().unwrap_or_default(),
                },
            })
            .collect();
        let manifest = Manifest {
            version: MANIFEST_VERSION,
            name: name.to_owned(),
            created_unix_ms: unix_ms(SystemTime::now()),
            metadata,
            entries,
        };
        self.put_manifest(&manifest).await?;

        stats.elapsed = started.elapsed();
        ::metrics::histogram!(metrics::SNAPSHOT_UPLOAD_SECONDS).record(stats.elapsed.as_secs_f64());
        tracing::info!(
            store = %self.describe,
            snapshot = name,
            files = stats.files,
            chunks = stats.chunks,
            zero = stats.zero_chunks,
            deduplicated = stats.deduplicated_chunks,
            uploaded = stats.uploaded_chunks,
            bytes_uploaded = stats.bytes_uploaded,
            secs = stats.elapsed.as_secs_f64(),
            "snapshot uploaded"
        );
        Ok((manifest, stats))
    }

    /// Make sure the store has chunk `job`: known, claimed by another task
    /// of this upload, found by HEAD, or read again, checked against its
    /// name and put.
    async fn upload_chunk(
        &self,
        source: Arc<Source>,
        job: Job,
        known: &KnownChunks,
        claimed: &Mutex<HashSet<ChunkId>>,
    ) -> Result<Outcome, ObjectsError> {
        let Job {
            id, offset, len, ..
        } = job;
        if known.contains(&id) {
            return Ok(Outcome::Deduplicated);
        }
        let first = claimed.lock().map(|mut c| c.insert(id)).unwrap_or(true);
        if !first {
            return Ok(Outcome::Deduplicated);
        }
        let path = chunk_path(&id);
        match self.store.head(&path).await {
            Ok(meta) => {
                let age_ms =
                    unix_ms(SystemTime::now()) as i64 - meta.last_modified.timestamp_millis();
                if age_ms < self.options.refresh_after.as_millis() as i64 {
                    return Ok(Outcome::Deduplicated);
                }
                // Old enough to be garbage a GC may be deleting: rewrite.
            }
            Err(object_store::Error::NotFound { .. }) => {}
            Err(source) => return Err(ObjectsError::store("head", &path, source)),
        }
        // Reading, hashing and compressing up to 4 MiB is milliseconds of
        // CPU: off the async threads, which also serve the node's requests.
        let stored = blocking(self.options.idle, move || {
            let mut data = vec![0u8; len as usize];
            let changed = || ObjectsError::Changed {
                path: source.path.clone(),
            };
            source
                .file
                .read_exact_at(&mut data, offset)
                .map_err(|e| match e.kind() {
                    std::io::ErrorKind::UnexpectedEof => changed(),
                    _ => ObjectsError::io(&source.path, e),
                })?;
            // The bytes must still be those the first pass named, or the
            // store would hold a chunk under another chunk's name.
            if ChunkId::of(&data) != id {
                return Err(changed());
            }
            chunks::compress(&data).map_err(|source| ObjectsError::Compress { hash: id, source })
        })
        .await?;
        let bytes = stored.len() as u64;
        self.store
            .put(&path, PutPayload::from(stored))
            .await
            .map_err(|source| ObjectsError::store("put", &path, source))?;
        Ok(Outcome::Uploaded(bytes))
    }
}
