//! The store end to end on `file://` stores in temporary directories: real
//! files, real object_store, faults injected only where a store must fail
//! part-way.

use std::fs::{self, File};
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use futures::stream::BoxStream;
use object_store::path::Path as ObjectPath;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    ObjectStoreExt, PutMultipartOptions, PutOptions, PutPayload, PutResult,
};

use std::collections::HashSet;

use super::chunks::{self, ChunkId};
use super::*;

const MIB: u64 = 1 << 20;

/// Bytes that neither compress to nothing nor repeat: a xorshift stream.
pub(super) fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A snapshot directory like a paused microVM's:
///
/// - `memory`: 64 MiB, sparse, data in its first MiB, 4 KiB at 20 MiB and
///   the last byte;
/// - `vmstate`: 1000 bytes, mode 0600 (one chunk);
/// - `overlay/disk/diff.img`: 5 MiB + 3 bytes of data;
/// - `overlay/empty`: an empty file; `overlay/logs`: an empty directory.
///
/// Where the chunks of data fall is up to the chunker, but no chunk is
/// longer than 4 MiB, so the chunks that touch data in `memory` cover at
/// most 5 + 8 + 4 = 17 MiB of it, and at least 47 MiB of it is in
/// twelve or more zero chunks.
fn make_snapshot(dir: &Path) {
    fs::create_dir_all(dir.join("overlay/disk")).unwrap();
    fs::create_dir_all(dir.join("overlay/logs")).unwrap();
    let memory = File::create(dir.join("memory")).unwrap();
    memory.set_len(64 * MIB).unwrap();
    memory.write_all_at(&noise(1, MIB as usize), 0).unwrap();
    memory
        .write_all_at(&noise(2, 4096), 20 * MIB + 12345)
        .unwrap();
    memory.write_all_at(&[0xff], 64 * MIB - 1).unwrap();
    fs::write(dir.join("vmstate"), noise(3, 1000)).unwrap();
    fs::set_permissions(dir.join("vmstate"), fs::Permissions::from_mode(0o600)).unwrap();
    fs::write(
        dir.join("overlay/disk/diff.img"),
        noise(4, (5 * MIB + 3) as usize),
    )
    .unwrap();
    fs::write(dir.join("overlay/empty"), b"").unwrap();
    fs::set_permissions(dir.join("overlay/logs"), fs::Permissions::from_mode(0o750)).unwrap();
}

/// Every path below `root` with its kind, mode and contents, sorted.
fn tree(root: &Path) -> Vec<(String, u32, Option<Vec<u8>>)> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<(String, u32, Option<Vec<u8>>)>) {
        for child in fs::read_dir(dir).unwrap() {
            let path = child.unwrap().path();
            let rel = path
                .strip_prefix(root)
                .unwrap()
                .to_str()
                .unwrap()
                .to_owned();
            let meta = fs::symlink_metadata(&path).unwrap();
            let mode = meta.permissions().mode() & 0o7777;
            if meta.is_dir() {
                out.push((rel, mode, None));
                walk(root, &path, out);
            } else {
                out.push((rel, mode, Some(fs::read(&path).unwrap())));
            }
        }
    }
    let mut out = Vec::new();
    walk(root, root, &mut out);
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

struct Fixture {
    tmp: tempfile::TempDir,
    store: SnapshotStore,
}

impl Fixture {
    fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let url = StoreUrl::Local {
            dir: tmp.path().join("store"),
        };
        let store = SnapshotStore::open(&url, &OpenOptions::default()).unwrap();
        Self { tmp, store }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.tmp.path().join(rel)
    }

    /// The store's file for a chunk.
    fn chunk_file(&self, id: &ChunkId) -> PathBuf {
        self.path("store/chunks").join(id.to_hex())
    }

    fn snapshot(&self, rel: &str) -> PathBuf {
        let dir = self.path(rel);
        make_snapshot(&dir);
        dir
    }
}

fn meta(kind: &str) -> SnapshotMetadata {
    SnapshotMetadata {
        kind: kind.into(),
        template_id: Some("base".into()),
        runtime: Some("microvm".into()),
        sandbox_id: None,
        extra: serde_json::Value::Null,
    }
}

fn data_chunks(manifest: &Manifest) -> Vec<(String, ChunkId)> {
    manifest
        .entries
        .iter()
        .flat_map(|e| match e {
            Entry::File { path, chunks, .. } => chunks
                .iter()
                .filter_map(|c| c.id)
                .map(|id| (path.clone(), id))
                .collect(),
            _ => Vec::new(),
        })
        .collect()
}

/// The distinct chunks a manifest refers to.
fn distinct(manifest: &Manifest) -> HashSet<ChunkId> {
    data_chunks(manifest)
        .into_iter()
        .map(|(_, id)| id)
        .collect()
}

/// The chunk list of file `path`.
fn chunks_of<'a>(manifest: &'a Manifest, path: &str) -> &'a [ChunkRef] {
    manifest
        .entries
        .iter()
        .find_map(|e| match e {
            Entry::File {
                path: p, chunks, ..
            } if p == path => Some(chunks.as_slice()),
            _ => None,
        })
        .unwrap()
}

/// Objects below the store's `chunks/`.
fn stored_chunks(fx: &Fixture) -> usize {
    fs::read_dir(fx.path("store/chunks")).unwrap().count()
}

/// Write a manifest as is, bypassing the upload.
async fn put_raw_manifest(fx: &Fixture, name: &str, json: &serde_json::Value) {
    fx.store
        .store
        .put(
            &manifest_path(name),
            PutPayload::from(serde_json::to_vec(json).unwrap()),
        )
        .await
        .unwrap();
}

/// Nothing at `dest`, and no partial download beside it.
fn assert_nothing_at(dest: &Path) {
    assert!(!dest.exists(), "{} exists", dest.display());
    let leftovers: Vec<_> = fs::read_dir(dest.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n.to_string_lossy().contains("partial"))
        .collect();
    assert!(leftovers.is_empty(), "left behind: {leftovers:?}");
}

/// Zero, deduplicated and uploaded chunks: every chunk is one of them.
fn stats_sum(stats: &UploadStats) -> u64 {
    stats.zero_chunks + stats.deduplicated_chunks + stats.uploaded_chunks
}

fn set_age(path: &Path, age: Duration) {
    File::options()
        .write(true)
        .open(path)
        .unwrap()
        .set_modified(SystemTime::now() - age)
        .unwrap();
}

#[tokio::test]
async fn round_trip_keeps_contents_modes_empty_things_and_holes() {
    let fx = Fixture::new();
    let src = fx.snapshot("src");
    let (manifest, up) = fx
        .store
        .put_dir(&src, "sandboxes/abc/1", meta("pause"), &KnownChunks::new())
        .await
        .unwrap();
    assert_eq!((up.files, up.dirs), (4, 3));
    let ids = distinct(&manifest);
    let listed: usize = [
        "memory",
        "vmstate",
        "overlay/disk/diff.img",
        "overlay/empty",
    ]
    .iter()
    .map(|f| chunks_of(&manifest, f).len())
    .sum();
    assert_eq!(up.chunks, listed as u64);
    // Zero regions are zero chunks, all of them in the memory file (the
    // rest is noise), and none of them is stored.
    assert!(up.zero_chunks >= 12, "{} zero chunks", up.zero_chunks);
    let zeros_in_memory = chunks_of(&manifest, "memory")
        .iter()
        .filter(|c| c.id.is_none())
        .count();
    assert_eq!(zeros_in_memory as u64, up.zero_chunks);
    // Noise does not repeat: every data chunk is new, and stored once.
    assert_eq!(up.chunks - up.zero_chunks, ids.len() as u64);
    assert_eq!(
        (up.uploaded_chunks, up.deduplicated_chunks),
        (ids.len() as u64, 0)
    );
    assert_eq!(stored_chunks(&fx), ids.len(), "zero chunks are not stored");
    assert_eq!(chunks_of(&manifest, "vmstate").len(), 1);
    assert!(chunks_of(&manifest, "overlay/empty").is_empty());
    assert_eq!(up.bytes_read, 64 * MIB + 1000 + 5 * MIB + 3);
    assert!(up.bytes_uploaded > 6 * MIB, "noise does not compress");

    let dest = fx.path("restore/here");
    let (got, down) = fx
        .store
        .get_dir("sandboxes/abc/1", &dest, None)
        .await
        .unwrap();
    assert_eq!(got, manifest);
    assert_eq!(got.metadata, meta("pause"));
    assert_eq!((down.files, down.dirs, down.chunks), (4, 3, up.chunks));
    assert_eq!(
        (down.zero_chunks, down.fetched_chunks),
        (up.zero_chunks, ids.len() as u64)
    );
    assert_eq!(down.bytes_downloaded, up.bytes_uploaded);
    assert_eq!(tree(&dest), tree(&src));
    assert_eq!(
        fs::metadata(&dest).unwrap().permissions().mode() & 0o777,
        0o700
    );

    // The holes stayed holes: at most the 17 MiB of chunks that touch
    // data, not 64 MiB.
    let blocks = fs::metadata(dest.join("memory")).unwrap().blocks() * 512;
    assert!(
        blocks <= 17 * MIB + 64 * 1024,
        "memory file takes {blocks} bytes on disk"
    );
    eprintln!(
        "file:// 64 MiB sparse dir: upload {:?} ({} chunks, {} bytes), download {:?}",
        up.elapsed, up.uploaded_chunks, up.bytes_uploaded, down.elapsed
    );

    // Into an existing directory: refused, and that directory untouched.
    let err = fx
        .store
        .get_dir("sandboxes/abc/1", &dest, None)
        .await
        .unwrap_err();
    assert!(
        matches!(err, ObjectsError::DestinationExists { .. }),
        "{err}"
    );
    assert_eq!(tree(&dest), tree(&src));
}

#[tokio::test]
async fn a_second_upload_sends_nothing_and_a_changed_byte_at_most_two_chunks() {
    let fx = Fixture::new();
    let src = fx.snapshot("src");
    let none = KnownChunks::new();
    let (first, _) = fx
        .store
        .put_dir(&src, "a/1", meta("pause"), &none)
        .await
        .unwrap();
    let n = distinct(&first).len() as u64;

    // Found by HEAD.
    let (second, again) = fx
        .store
        .put_dir(&src, "a/2", meta("pause"), &none)
        .await
        .unwrap();
    assert_eq!(
        second.entries, first.entries,
        "the same bytes, the same cuts"
    );
    assert_eq!((again.uploaded_chunks, again.deduplicated_chunks), (0, n));
    assert_eq!(again.bytes_uploaded, 0);
    assert_eq!(again.dedup_ratio(), 1.0);

    // Known from the first manifest: no HEAD needed, same result.
    let known = KnownChunks::from_manifests([&first]);
    assert_eq!(known.len(), n as usize);
    let (_, known_run) = fx
        .store
        .put_dir(&src, "a/3", meta("pause"), &known)
        .await
        .unwrap();
    assert_eq!(
        (known_run.uploaded_chunks, known_run.deduplicated_chunks),
        (0, n)
    );

    // One byte of memory changes, in a zero region, so that its chunk
    // becomes data; the cuts after it may move, which can change the
    // chunk holding the last byte too.
    File::options()
        .write(true)
        .open(src.join("memory"))
        .unwrap()
        .write_all_at(&[7], 40 * MIB)
        .unwrap();
    let (changed, stats) = fx
        .store
        .put_dir(&src, "a/4", meta("pause"), &known)
        .await
        .unwrap();
    assert!(
        (1..=2).contains(&stats.uploaded_chunks),
        "{} uploaded",
        stats.uploaded_chunks
    );
    assert_eq!(
        stats.deduplicated_chunks + stats.uploaded_chunks,
        stats.chunks - stats.zero_chunks
    );
    let new: Vec<_> = data_chunks(&changed)
        .into_iter()
        .filter(|(_, id)| !known.contains(id))
        .collect();
    assert_eq!(new.len() as u64, stats.uploaded_chunks);
    assert!(new.iter().all(|(f, _)| f == "memory"), "{new:?}");
    assert_eq!(
        fx.store.list("a").await.unwrap(),
        ["a/1", "a/2", "a/3", "a/4"]
    );

    // A byte changed inside data: again one or two chunks.
    File::options()
        .write(true)
        .open(src.join("overlay/disk/diff.img"))
        .unwrap()
        .write_all_at(&[0], 100)
        .unwrap();
    let known = KnownChunks::from_manifests([&first, &changed]);
    let (_, stats) = fx
        .store
        .put_dir(&src, "a/5", meta("pause"), &known)
        .await
        .unwrap();
    assert!(
        (1..=2).contains(&stats.uploaded_chunks),
        "{} uploaded",
        stats.uploaded_chunks
    );
    assert_eq!(
        stats.deduplicated_chunks + stats.uploaded_chunks,
        stats.chunks - stats.zero_chunks
    );

    let dest = fx.path("out");
    fx.store.get_dir("a/5", &dest, None).await.unwrap();
    assert_eq!(tree(&dest), tree(&src));
}

#[tokio::test]
async fn a_chunk_repeated_within_a_snapshot_is_sent_once() {
    let fx = Fixture::new();
    let src = fx.path("src");
    fs::create_dir_all(&src).unwrap();
    // Two files of the same bytes, each a 4 MiB block three times over.
    let block = noise(9, 4 * MIB as usize);
    let mut data = block.clone();
    data.extend_from_slice(&block);
    data.extend_from_slice(&block);
    fs::write(src.join("a"), &data).unwrap();
    fs::write(src.join("b"), &data).unwrap();
    let (manifest, stats) = fx
        .store
        .put_dir(&src, "rep", meta("pause"), &KnownChunks::new())
        .await
        .unwrap();
    let ids = distinct(&manifest);
    assert_eq!(chunks_of(&manifest, "a"), chunks_of(&manifest, "b"));
    assert_eq!(stats.zero_chunks, 0);
    assert_eq!(stats.uploaded_chunks, ids.len() as u64);
    assert_eq!(stats_sum(&stats), stats.chunks);
    // All of b, and the chunks that repeat within a.
    assert!(stats.deduplicated_chunks >= stats.chunks / 2, "{stats:?}");
    assert_eq!(stored_chunks(&fx), ids.len());
    let dest = fx.path("out");
    fx.store.get_dir("rep", &dest, None).await.unwrap();
    assert_eq!(tree(&dest), tree(&src));
}

#[tokio::test]
async fn a_corrupt_chunk_is_detected_and_leaves_nothing() {
    let fx = Fixture::new();
    let src = fx.snapshot("src");
    let (manifest, _) = fx
        .store
        .put_dir(&src, "s", meta("pause"), &KnownChunks::new())
        .await
        .unwrap();
    let (file, victim) = data_chunks(&manifest)
        .into_iter()
        .find(|(f, _)| f == "vmstate")
        .unwrap();

    // A valid zstd frame of the right length but other bytes...
    let mut other = noise(3, 1000);
    other[500] ^= 1;
    fs::write(fx.chunk_file(&victim), chunks::compress(&other).unwrap()).unwrap();
    let dest = fx.path("out/dest");
    let err = fx.store.get_dir("s", &dest, None).await.unwrap_err();
    match &err {
        ObjectsError::CorruptChunk { hash, file: f, .. } => {
            assert_eq!((hash, f), (&victim, &file));
        }
        other => panic!("expected CorruptChunk, got {other}"),
    }
    assert!(err.to_string().contains(&victim.to_hex()), "{err}");
    assert_nothing_at(&dest);

    // ...and not zstd at all.
    fs::write(fx.chunk_file(&victim), b"rotten").unwrap();
    let err = fx.store.get_dir("s", &dest, None).await.unwrap_err();
    assert!(
        matches!(&err, ObjectsError::CorruptChunk { hash, .. } if *hash == victim),
        "{err}"
    );
    assert_nothing_at(&dest);
}

#[tokio::test]
async fn a_missing_chunk_is_named_with_its_file_and_leaves_nothing() {
    let fx = Fixture::new();
    let src = fx.snapshot("src");
    let (manifest, _) = fx
        .store
        .put_dir(&src, "s", meta("pause"), &KnownChunks::new())
        .await
        .unwrap();
    let (file, victim) = data_chunks(&manifest)
        .into_iter()
        .find(|(f, _)| f == "overlay/disk/diff.img")
        .unwrap();
    fs::remove_file(fx.chunk_file(&victim)).unwrap();
    let dest = fx.path("out/dest");
    let err = fx.store.get_dir("s", &dest, None).await.unwrap_err();
    match &err {
        ObjectsError::MissingChunk { hash, file: f } => assert_eq!((hash, f), (&victim, &file)),
        other => panic!("expected MissingChunk, got {other}"),
    }
    let text = err.to_string();
    assert!(
        text.contains(&victim.to_hex()) && text.contains("overlay/disk/diff.img"),
        "{text}"
    );
    assert_nothing_at(&dest);
}

/// A store whose chunk puts fail after the first `ok_puts`: an upload that
/// dies part-way, as when the server goes away.
#[derive(Debug)]
struct FailingPuts {
    inner: Arc<dyn ObjectStore>,
    ok_puts: usize,
    puts: AtomicUsize,
}

impl std::fmt::Display for FailingPuts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "FailingPuts({})", self.inner)
    }
}

#[async_trait]
impl ObjectStore for FailingPuts {
    async fn put_opts(
        &self,
        location: &ObjectPath,
        payload: PutPayload,
        opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        if location.as_ref().starts_with("chunks/")
            && self.puts.fetch_add(1, Ordering::SeqCst) >= self.ok_puts
        {
            return Err(object_store::Error::Generic {
                store: "FailingPuts",
                source: "injected fault: the store went away".into(),
            });
        }
        self.inner.put_opts(location, payload, opts).await
    }

    async fn put_multipart_opts(
        &self,
        location: &ObjectPath,
        opts: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(
        &self,
        location: &ObjectPath,
        options: GetOptions,
    ) -> object_store::Result<GetResult> {
        self.inner.get_opts(location, options).await
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, object_store::Result<ObjectPath>>,
    ) -> BoxStream<'static, object_store::Result<ObjectPath>> {
        self.inner.delete_stream(locations)
    }

    fn list(
        &self,
        prefix: Option<&ObjectPath>,
    ) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        self.inner.list(prefix)
    }

    async fn list_with_delimiter(
        &self,
        prefix: Option<&ObjectPath>,
    ) -> object_store::Result<ListResult> {
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy_opts(
        &self,
        from: &ObjectPath,
        to: &ObjectPath,
        options: CopyOptions,
    ) -> object_store::Result<()> {
        self.inner.copy_opts(from, to, options).await
    }
}

#[tokio::test]
async fn an_upload_that_fails_part_way_leaves_no_snapshot() {
    let fx = Fixture::new();
    let src = fx.snapshot("src");
    let failing = SnapshotStore::new(
        Arc::new(FailingPuts {
            inner: Arc::clone(&fx.store.store),
            ok_puts: 2,
            puts: AtomicUsize::new(0),
        }),
        "failing",
    )
    // One chunk at a time, so exactly two land before the fault.
    .with_options(StoreOptions {
        concurrency: 1,
        ..StoreOptions::default()
    });
    let err = failing
        .put_dir(&src, "s", meta("pause"), &KnownChunks::new())
        .await
        .unwrap_err();
    assert!(
        matches!(&err, ObjectsError::Store { op: "put", .. }),
        "{err}"
    );
    assert!(err.to_string().contains("injected fault"), "{err}");
    // Two chunks made it; no manifest did.
    assert_eq!(stored_chunks(&fx), 2);
    assert!(fx.store.list("").await.unwrap().is_empty());
    let dest = fx.path("out/dest");
    let err = fx.store.get_dir("s", &dest, None).await.unwrap_err();
    assert!(
        matches!(&err, ObjectsError::NotFound { name } if name == "s"),
        "{err}"
    );
    assert!(!dest.exists() && !fx.path("out").exists());

    // The same upload through a healthy store reuses what got through.
    let (manifest, stats) = fx
        .store
        .put_dir(&src, "s", meta("pause"), &KnownChunks::new())
        .await
        .unwrap();
    let n = distinct(&manifest).len() as u64;
    assert_eq!(
        (stats.uploaded_chunks, stats.deduplicated_chunks),
        (n - 2, 2)
    );
    let dest = fx.path("out/dest");
    fx.store.get_dir("s", &dest, None).await.unwrap();
    assert_eq!(tree(&dest), tree(&src));
}

#[tokio::test]
async fn crafted_manifests_that_escape_the_destination_are_refused() {
    let fx = Fixture::new();
    let id = ChunkId::of(b"x");
    for (entries, what) in [
        (
            serde_json::json!([{"type": "file", "path": "../escape", "mode": 420, "size": 1, "chunks": [{"id": id, "len": 1}]}]),
            "'..'",
        ),
        (
            serde_json::json!([{"type": "file", "path": "/tmp/escape", "mode": 420, "size": 1, "chunks": [{"id": id, "len": 1}]}]),
            "absolute",
        ),
        (
            serde_json::json!([
                {"type": "dir", "path": "d", "mode": 493},
                {"type": "file", "path": "d/../../escape", "mode": 420, "size": 1, "chunks": [{"id": id, "len": 1}]}
            ]),
            "'..'",
        ),
    ] {
        let manifest = serde_json::json!({
            "version": MANIFEST_VERSION, "name": "evil",
            "created_unix_ms": 0, "metadata": {"kind": "pause"}, "entries": entries,
        });
        fx.store
            .store
            .put(
                &manifest_path("evil"),
                PutPayload::from(serde_json::to_vec(&manifest).unwrap()),
            )
            .await
            .unwrap();
        let dest = fx.path("out/dest");
        let err = fx.store.get_dir("evil", &dest, None).await.unwrap_err();
        assert!(
            matches!(err, ObjectsError::BadManifest { .. }) && err.to_string().contains(what),
            "{err}"
        );
        assert!(!dest.exists() && !fx.path("out").exists() && !fx.path("escape").exists());
    }

    // Not a manifest at all.
    fx.store
        .store
        .put(
            &manifest_path("junk"),
            PutPayload::from_static(b"{\"version\": 1"),
        )
        .await
        .unwrap();
    let err = fx.store.manifest("junk").await.unwrap_err();
    assert!(matches!(err, ObjectsError::ManifestJson { .. }), "{err}");
}

#[tokio::test]
async fn gc_deletes_only_unreferenced_chunks_past_the_grace() {
    let fx = Fixture::new();
    let src = fx.snapshot("src");
    let none = KnownChunks::new();
    let (keep, _) = fx
        .store
        .put_dir(&src, "keep", meta("pause"), &none)
        .await
        .unwrap();
    // A second snapshot with two chunks of its own.
    let memory = File::options()
        .write(true)
        .open(src.join("memory"))
        .unwrap();
    memory.write_all_at(&noise(20, 100), 30 * MIB).unwrap();
    memory.write_all_at(&noise(21, 100), 50 * MIB).unwrap();
    let (gone, _) = fx
        .store
        .put_dir(&src, "gone", meta("pause"), &none)
        .await
        .unwrap();
    let keep_ids: Vec<ChunkId> = distinct(&keep).into_iter().collect();
    let only_gone: Vec<ChunkId> = data_chunks(&gone)
        .into_iter()
        .map(|(_, id)| id)
        .filter(|id| !keep_ids.contains(id))
        .collect();
    // The chunks that took the writes; perhaps also the one holding the
    // last byte, if the cuts before it moved.
    assert!((2..=3).contains(&only_gone.len()), "{only_gone:?}");
    let all = keep_ids.len() + only_gone.len();

    // Referenced by both: nothing goes, whatever the age.
    for id in keep_ids.iter().chain(&only_gone) {
        set_age(&fx.chunk_file(id), Duration::from_secs(7200));
    }
    let stats = fx.store.gc(Duration::from_secs(3600)).await.unwrap();
    assert_eq!(
        (stats.manifests, stats.chunks, stats.deleted),
        (2, all as u64, 0)
    );

    fx.store.delete("gone").await.unwrap();
    assert!(matches!(
        fx.store.delete("gone").await,
        Err(ObjectsError::NotFound { .. })
    ));
    // One orphan is young (an upload in progress, as far as GC can
    // tell), the others old.
    set_age(&fx.chunk_file(&only_gone[1]), Duration::from_secs(60));
    // Something else below chunks/ is not ours to delete.
    fs::write(fx.path("store/chunks/README"), b"hands off").unwrap();
    set_age(&fx.path("store/chunks/README"), Duration::from_secs(7200));

    let stats = fx.store.gc(Duration::from_secs(3600)).await.unwrap();
    assert_eq!(stats.manifests, 1);
    assert_eq!(stats.referenced, keep_ids.len() as u64);
    assert_eq!(
        (stats.deleted, stats.young, stats.foreign),
        (only_gone.len() as u64 - 1, 1, 1)
    );
    assert!(!fx.chunk_file(&only_gone[0]).exists());
    assert!(fx.chunk_file(&only_gone[1]).exists());
    assert!(fx.path("store/chunks/README").exists());
    for id in &keep_ids {
        assert!(fx.chunk_file(id).exists());
    }

    // With no grace the young orphan goes too; the kept snapshot restores.
    let stats = fx.store.gc(Duration::ZERO).await.unwrap();
    assert_eq!(stats.deleted, 1);
    let dest = fx.path("out");
    fx.store.get_dir("keep", &dest, None).await.unwrap();

    // A manifest that cannot be read stops GC before it deletes anything.
    fx.store
        .store
        .put(&manifest_path("broken"), PutPayload::from_static(b"nope"))
        .await
        .unwrap();
    fx.store.delete("keep").await.unwrap();
    let err = fx.store.gc(Duration::ZERO).await.unwrap_err();
    assert!(matches!(err, ObjectsError::ManifestJson { .. }), "{err}");
    for id in &keep_ids {
        assert!(fx.chunk_file(id).exists());
    }
    // So does a manifest under a name this build would not write (`list`
    // does not show it, GC must not ignore it).
    fx.store.delete("broken").await.unwrap();
    fx.store
        .store
        .put(
            &ObjectPath::from("snapshots/not a name/manifest.json"),
            PutPayload::from_static(b"{}"),
        )
        .await
        .unwrap();
    assert!(fx.store.list("").await.unwrap().is_empty());
    let err = fx.store.gc(Duration::ZERO).await.unwrap_err();
    assert!(matches!(err, ObjectsError::ForeignManifest { .. }), "{err}");
    for id in &keep_ids {
        assert!(fx.chunk_file(id).exists());
    }
}

#[tokio::test]
async fn an_old_chunk_found_by_head_is_rewritten_so_gc_cannot_take_it() {
    let fx = Fixture::new();
    let src = fx.snapshot("src");
    let none = KnownChunks::new();
    let (first, _) = fx
        .store
        .put_dir(&src, "one", meta("pause"), &none)
        .await
        .unwrap();
    fx.store.delete("one").await.unwrap();
    let ids: Vec<ChunkId> = data_chunks(&first).into_iter().map(|(_, id)| id).collect();
    // Orphans now; one of them old.
    set_age(&fx.chunk_file(&ids[0]), Duration::from_secs(7200));
    let (_, stats) = fx
        .store
        .put_dir(&src, "two", meta("pause"), &none)
        .await
        .unwrap();
    assert_eq!(
        (stats.uploaded_chunks, stats.deduplicated_chunks),
        (1, ids.len() as u64 - 1)
    );
    let age = fs::metadata(fx.chunk_file(&ids[0]))
        .unwrap()
        .modified()
        .unwrap()
        .elapsed()
        .unwrap_or_default();
    assert!(age < Duration::from_secs(600), "not rewritten: {age:?} old");
}

#[tokio::test]
async fn the_chunk_cache_serves_a_second_download_and_drops_bad_entries() {
    let fx = Fixture::new();
    let src = fx.snapshot("src");
    let (manifest, _) = fx
        .store
        .put_dir(&src, "s", meta("pause"), &KnownChunks::new())
        .await
        .unwrap();
    let n = distinct(&manifest).len() as u64;
    let cache = fx.path("cache");
    let (_, first) = fx
        .store
        .get_dir("s", &fx.path("d1"), Some(&cache))
        .await
        .unwrap();
    assert_eq!((first.fetched_chunks, first.cached_chunks), (n, 0));
    assert_eq!(fs::read_dir(&cache).unwrap().count() as u64, n);

    let (_, second) = fx
        .store
        .get_dir("s", &fx.path("d2"), Some(&cache))
        .await
        .unwrap();
    assert_eq!((second.fetched_chunks, second.cached_chunks), (0, n));
    assert_eq!(second.bytes_downloaded, 0);
    assert_eq!(tree(&fx.path("d2")), tree(&src));

    // A damaged cache entry is refetched (and repaired), not trusted.
    let (_, id) = data_chunks(&manifest)[0].clone();
    fs::write(cache.join(id.to_hex()), b"bitrot").unwrap();
    let (_, third) = fx
        .store
        .get_dir("s", &fx.path("d3"), Some(&cache))
        .await
        .unwrap();
    assert_eq!((third.fetched_chunks, third.cached_chunks), (1, n - 1));
    assert_eq!(tree(&fx.path("d3")), tree(&src));
    let (_, fourth) = fx
        .store
        .get_dir("s", &fx.path("d4"), Some(&cache))
        .await
        .unwrap();
    assert_eq!(fourth.cached_chunks, n);
}

#[tokio::test]
async fn an_overlay_layer_round_trips_with_owners_links_whiteouts_and_opaque_dirs() {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let fx = Fixture::new();
    let src = fx.path("src");
    fs::create_dir_all(src.join("home/user/new")).unwrap();
    fs::create_dir_all(src.join("etc")).unwrap();
    fs::write(src.join("home/user/note"), b"the user's").unwrap();
    std::os::unix::fs::chown(src.join("home/user"), Some(1000), Some(1000)).unwrap();
    std::os::unix::fs::chown(src.join("home/user/note"), Some(1000), Some(1001)).unwrap();
    std::os::unix::fs::symlink("/etc/passwd", src.join("home/user/link")).unwrap();
    std::os::unix::fs::lchown(src.join("home/user/link"), Some(1000), Some(1000)).unwrap();
    let node = |path: &Path, kind: libc::mode_t| {
        let c = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mknod(c.as_ptr(), kind | 0o640, 0) }, 0);
    };
    // A template file the guest deleted, a pipe and a socket it made.
    node(&src.join("etc/hostname"), libc::S_IFCHR);
    node(&src.join("home/user/pipe"), libc::S_IFIFO);
    node(&src.join("home/user/sock"), libc::S_IFSOCK);
    // A directory deleted and made again: overlayfs marks it opaque.
    let opaque = std::ffi::CString::new(src.join("home/user/new").to_str().unwrap()).unwrap();
    // SAFETY: NUL-terminated strings and a 1-byte value.
    let rc = unsafe {
        libc::lsetxattr(
            opaque.as_ptr(),
            c"trusted.overlay.opaque".as_ptr(),
            b"y".as_ptr().cast(),
            1,
            0,
        )
    };
    assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());

    let (manifest, _) = fx
        .store
        .put_dir(&src, "s", meta("pause"), &KnownChunks::new())
        .await
        .unwrap();
    let dest = fx.path("dest");
    fx.store.get_dir("s", &dest, None).await.unwrap();
    let owner = |rel: &str| {
        let m = fs::symlink_metadata(dest.join(rel)).unwrap();
        (m.uid(), m.gid())
    };
    assert_eq!(owner("home/user"), (1000, 1000));
    assert_eq!(owner("home/user/note"), (1000, 1001));
    assert_eq!(owner("home/user/link"), (1000, 1000));
    assert_eq!(owner("etc"), (0, 0));
    assert_eq!(
        fs::read(dest.join("home/user/note")).unwrap(),
        b"the user's"
    );
    assert_eq!(
        fs::read_link(dest.join("home/user/link")).unwrap(),
        Path::new("/etc/passwd")
    );
    let whiteout = fs::symlink_metadata(dest.join("etc/hostname")).unwrap();
    assert!(whiteout.file_type().is_char_device() && whiteout.rdev() == 0);
    let pipe = fs::symlink_metadata(dest.join("home/user/pipe")).unwrap();
    assert!(pipe.file_type().is_fifo() && pipe.mode() & 0o777 == 0o640);
    assert!(
        fs::symlink_metadata(dest.join("home/user/sock"))
            .unwrap()
            .file_type()
            .is_socket()
    );
    let opaque_dirs: Vec<&str> = manifest
        .entries
        .iter()
        .filter(|e| matches!(e, Entry::Dir { opaque: true, .. }))
        .map(|e| e.path())
        .collect();
    assert_eq!(opaque_dirs, ["home/user/new"]);
    let mut value = [0u8; 4];
    let restored = std::ffi::CString::new(dest.join("home/user/new").to_str().unwrap()).unwrap();
    // SAFETY: NUL-terminated strings and a writable buffer of its length.
    let n = unsafe {
        libc::lgetxattr(
            restored.as_ptr(),
            c"trusted.overlay.opaque".as_ptr(),
            value.as_mut_ptr().cast(),
            value.len(),
        )
    };
    assert_eq!(&value[..n.max(0) as usize], b"y");

    // A real device is refused, by name.
    let dev = fx.path("dev");
    fs::create_dir_all(&dev).unwrap();
    let null = std::ffi::CString::new(dev.join("null").to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(
        unsafe { libc::mknod(null.as_ptr(), libc::S_IFCHR | 0o600, libc::makedev(1, 3)) },
        0
    );
    let err = fx
        .store
        .put_dir(&dev, "d", meta("pause"), &KnownChunks::new())
        .await
        .unwrap_err();
    assert!(
        matches!(err, ObjectsError::Unsupported { .. }) && err.to_string().contains("null"),
        "{err}"
    );

    let err = fx
        .store
        .put_dir(&fx.path("nope"), "s2", meta("pause"), &KnownChunks::new())
        .await
        .unwrap_err();
    assert!(matches!(err, ObjectsError::Io { .. }), "{err}");
}

#[tokio::test]
async fn names_are_checked_and_listing_follows_name_components() {
    let fx = Fixture::new();
    let src = fx.path("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("f"), b"x").unwrap();
    for bad in [
        "",
        "/abs",
        "a//b",
        "a/../b",
        "..",
        "a b",
        "a/",
        "sp\u{e9}cial",
    ] {
        let err = fx
            .store
            .put_dir(&src, bad, meta("pause"), &KnownChunks::new())
            .await
            .unwrap_err();
        assert!(
            matches!(err, ObjectsError::BadName { .. }),
            "{bad:?}: {err}"
        );
    }
    assert!(check_name(&"a".repeat(257)).is_err());
    for name in [
        "templates/base",
        "sandboxes/a/1",
        "sandboxes/a/2",
        "sandboxes/ab/1",
    ] {
        fx.store
            .put_dir(&src, name, meta("pause"), &KnownChunks::new())
            .await
            .unwrap();
    }
    assert_eq!(
        fx.store.list("sandboxes/a").await.unwrap(),
        ["sandboxes/a/1", "sandboxes/a/2"]
    );
    assert_eq!(fx.store.list("").await.unwrap().len(), 4);
    assert!(fx.store.list("nothing").await.unwrap().is_empty());
    let err = fx.store.manifest("nothing").await.unwrap_err();
    assert!(matches!(err, ObjectsError::NotFound { .. }), "{err}");
}

/// What fixed 4 MiB chunks could not do: bytes inserted near the start of
/// a file (a gVisor checkpoint's sections change size between pauses)
/// shifted every later chunk, so a second upload sent the whole file.
#[tokio::test]
async fn bytes_inserted_near_the_start_upload_only_a_few_chunks() {
    let fx = Fixture::new();
    let src = fx.path("src");
    fs::create_dir_all(&src).unwrap();
    let data = noise(30, 20 * MIB as usize);
    fs::write(src.join("pages.img"), &data).unwrap();
    let (first, up) = fx
        .store
        .put_dir(&src, "sb/1", meta("pause"), &KnownChunks::new())
        .await
        .unwrap();
    let dest = fx.path("out1");
    let (_, down) = fx.store.get_dir("sb/1", &dest, None).await.unwrap();
    assert_eq!(tree(&dest), tree(&src));
    eprintln!(
        "file:// 20 MiB random file: upload {:?} ({} chunks, {} bytes), download {:?}",
        up.elapsed, up.uploaded_chunks, up.bytes_uploaded, down.elapsed
    );

    let mut inserted = data[..1000].to_vec();
    inserted.extend_from_slice(&noise(31, 100));
    inserted.extend_from_slice(&data[1000..]);
    fs::write(src.join("pages.img"), &inserted).unwrap();
    let known = KnownChunks::from_manifests([&first]);
    let (second, stats) = fx
        .store
        .put_dir(&src, "sb/2", meta("pause"), &known)
        .await
        .unwrap();
    eprintln!(
        "100 bytes inserted at 1000: {} of {} chunks uploaded ({} bytes)",
        stats.uploaded_chunks, stats.chunks, stats.bytes_uploaded
    );
    assert!(stats.chunks >= 8, "{stats:?}");
    assert!(stats.uploaded_chunks <= 3, "{stats:?}");
    assert_eq!(stats_sum(&stats), stats.chunks);
    assert!(stats.bytes_uploaded < 12 * MIB, "{stats:?}");
    let shared = distinct(&first).intersection(&distinct(&second)).count();
    assert!(shared as u64 >= stats.chunks - 3, "{shared} shared");
    let dest = fx.path("out2");
    fx.store.get_dir("sb/2", &dest, None).await.unwrap();
    assert_eq!(fs::read(dest.join("pages.img")).unwrap(), inserted);
}

#[tokio::test]
async fn chunk_lengths_that_do_not_add_up_or_do_not_match_are_refused() {
    let fx = Fixture::new();
    let src = fx.path("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("f"), noise(40, 3 * MIB as usize)).unwrap();
    let (manifest, _) = fx
        .store
        .put_dir(&src, "s", meta("pause"), &KnownChunks::new())
        .await
        .unwrap();
    let chunks = chunks_of(&manifest, "f").to_vec();
    assert!(chunks.len() >= 2, "{chunks:?}");
    let mut json = serde_json::to_value(&manifest).unwrap();

    // One byte short of the size.
    json["entries"][0]["chunks"][0]["len"] = (chunks[0].len - 1).into();
    put_raw_manifest(&fx, "s", &json).await;
    let err = fx
        .store
        .get_dir("s", &fx.path("out/a"), None)
        .await
        .unwrap_err();
    assert!(
        matches!(
            &err,
            ObjectsError::BadManifest {
                source: ManifestError::ChunkSum { .. },
                ..
            }
        ),
        "{err}"
    );
    assert!(!fx.path("out").exists());

    // Adds up, but the first chunk decompresses to a byte more than its
    // recorded length, and the second to a byte less.
    json["entries"][0]["chunks"][1]["len"] = (chunks[1].len + 1).into();
    put_raw_manifest(&fx, "s", &json).await;
    fx.store.manifest("s").await.unwrap();
    let dest = fx.path("out/b");
    let err = fx.store.get_dir("s", &dest, None).await.unwrap_err();
    match &err {
        ObjectsError::CorruptChunk { hash, file, .. } => {
            assert_eq!(file, "f");
            assert!(*hash == chunks[0].id.unwrap() || *hash == chunks[1].id.unwrap());
        }
        other => panic!("expected CorruptChunk, got {other}"),
    }
    assert_nothing_at(&dest);
}

#[tokio::test]
async fn a_version_1_manifest_is_refused_by_its_version() {
    let fx = Fixture::new();
    let id = ChunkId::of(b"x");
    let v1 = serde_json::json!({
        "version": 1, "name": "old", "chunk_size": 4 * MIB, "created_unix_ms": 0,
        "metadata": {"kind": "pause"},
        "entries": [{"type": "file", "path": "f", "mode": 420, "size": 1, "chunks": [id]}],
    });
    put_raw_manifest(&fx, "old", &v1).await;
    let err = fx.store.manifest("old").await.unwrap_err();
    assert!(
        matches!(
            &err,
            ObjectsError::BadManifest {
                source: ManifestError::Version(1),
                ..
            }
        ),
        "{err}"
    );
    assert!(
        err.to_string().contains("version 1 is not supported"),
        "{err}"
    );
    let dest = fx.path("out/dest");
    assert!(fx.store.get_dir("old", &dest, None).await.is_err());
    assert!(!fx.path("out").exists());
}
