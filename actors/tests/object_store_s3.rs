//! The snapshot store against a real S3 server on loopback: s3s-fs, an S3
//! implementation over a local directory (a bucket is a directory under
//! its root), started by the test with its own credentials.
//!
//! The binary comes from `SANDMESH_S3S_FS` (`cargo xtask test` installs it
//! into the cache and sets it). Without it the test prints `SKIP`, except
//! under `SANDMESH_REQUIRE_ARTIFACTS`, where it fails.

use std::fs::{self, File};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use actors::objects::{
    ClaimState, Credentials, KnownChunks, ObjectsError, OpenOptions, SnapshotMetadata,
    SnapshotStore, StoreUrl,
};
use object_store::{BackoffConfig, RetryConfig};
use schema::guest::REQUIRE_ENV;

/// The variable naming the s3s-fs binary.
const BIN_ENV: &str = "SANDMESH_S3S_FS";
const ACCESS_KEY: &str = "sandmesh-test";
const SECRET_KEY: &str = "sandmesh-test-secret";
const BUCKET: &str = "snapshots";
const MIB: u64 = 1 << 20;

/// An s3s-fs process; killed when dropped.
struct Server {
    bin: PathBuf,
    root: PathBuf,
    port: u16,
    child: Option<Child>,
}

impl Server {
    fn start(bin: &Path, root: &Path, port: u16) -> Self {
        let mut server = Self {
            bin: bin.to_owned(),
            root: root.to_owned(),
            port,
            child: None,
        };
        server.restart();
        server
    }

    fn restart(&mut self) {
        assert!(self.child.is_none(), "already running");
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.root.with_extension("log"))
            .unwrap();
        let child = Command::new(&self.bin)
            .args(["--host", "127.0.0.1", "--port", &self.port.to_string()])
            .args(["--access-key", ACCESS_KEY, "--secret-key", SECRET_KEY])
            .arg(&self.root)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", self.bin.display()));
        self.child = Some(child);
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "s3s-fs exited ({status}) before listening: {}",
                    fs::read_to_string(self.root.with_extension("log")).unwrap_or_default()
                );
            }
            assert!(
                Instant::now() < deadline,
                "s3s-fs did not listen within 30 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Bytes that do not compress or repeat.
fn noise(seed: u64, len: usize) -> Vec<u8> {
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

/// A paused microVM's directory in small: a 64 MiB sparse memory file with
/// three regions of data, a CPU state file (one chunk), a nested disk
/// diff, an empty file. Where the chunker cuts is its business, but with
/// chunks of at most 4 MiB at least 47 MiB of the memory file is in zero
/// chunks (twelve or more), which are never stored.
fn make_snapshot(dir: &Path) {
    fs::create_dir_all(dir.join("overlay/disk")).unwrap();
    let memory = File::create(dir.join("memory")).unwrap();
    memory.set_len(64 * MIB).unwrap();
    memory.write_all_at(&noise(1, MIB as usize), 0).unwrap();
    memory.write_all_at(&noise(2, 4096), 20 * MIB + 5).unwrap();
    memory.write_all_at(&[0xff], 64 * MIB - 1).unwrap();
    fs::write(dir.join("vmstate"), noise(3, 1000)).unwrap();
    fs::write(
        dir.join("overlay/disk/diff.img"),
        noise(4, (5 * MIB + 3) as usize),
    )
    .unwrap();
    fs::write(dir.join("overlay/empty"), b"").unwrap();
}

fn same_files(a: &Path, b: &Path) {
    for rel in [
        "memory",
        "vmstate",
        "overlay/disk/diff.img",
        "overlay/empty",
    ] {
        assert!(
            fs::read(a.join(rel)).unwrap() == fs::read(b.join(rel)).unwrap(),
            "{rel} differs"
        );
    }
}

fn meta() -> SnapshotMetadata {
    SnapshotMetadata {
        kind: "pause".into(),
        runtime: Some("microvm".into()),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_round_trip_through_s3s_fs_and_survive_its_death() {
    let Some(bin) = std::env::var_os(BIN_ENV).filter(|v| !v.is_empty()) else {
        if std::env::var_os(REQUIRE_ENV).is_some_and(|v| v != "0") {
            panic!("{BIN_ENV} is not set and {REQUIRE_ENV} requires this test to run");
        }
        eprintln!("SKIP object_store_s3: no s3s-fs (set {BIN_ENV}; cargo xtask test sets it)");
        return;
    };
    let bin = PathBuf::from(bin);
    assert!(bin.is_file(), "{BIN_ENV}={} is not a file", bin.display());
    // object_store's S3 client is reqwest on rustls without a provider of
    // its own (ring-only workspace); the store installs ring too, but a
    // test process must not depend on that.
    let _ = rustls::crypto::ring::default_provider().install_default();

    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("s3");
    fs::create_dir_all(root.join(BUCKET)).unwrap();
    let port = free_port();
    let mut server = Server::start(&bin, &root, port);

    let url: StoreUrl = format!("s3://{BUCKET}?endpoint=http://127.0.0.1:{port}&region=us-east-1")
        .parse()
        .unwrap();
    let options = OpenOptions {
        credentials: Some(Credentials {
            access_key_id: ACCESS_KEY.into(),
            secret_access_key: SECRET_KEY.into(),
            session_token: None,
        }),
        // Fail within seconds once the server is gone, not after minutes.
        retry: Some(RetryConfig {
            backoff: BackoffConfig {
                init_backoff: Duration::from_millis(50),
                max_backoff: Duration::from_millis(200),
                base: 2.0,
            },
            max_retries: 2,
            retry_timeout: Duration::from_secs(5),
        }),
    };
    let store = SnapshotStore::open(&url, &options).unwrap();
    // Neither the description nor Debug (object_store's included) shows the secret.
    assert!(!store.describe().contains(SECRET_KEY));
    assert!(!format!("{store:?}").contains(SECRET_KEY));

    let src = tmp.path().join("src");
    make_snapshot(&src);
    let none = KnownChunks::new();
    let (first, up) = store.put_dir(&src, "sb/1", meta(), &none).await.unwrap();
    // Noise does not repeat: every data chunk is distinct and uploaded.
    let n = up.chunks - up.zero_chunks;
    assert!(up.zero_chunks >= 12, "{up:?}");
    assert_eq!((up.uploaded_chunks, up.deduplicated_chunks), (n, 0));
    // The server's view: the objects are files under the bucket directory.
    assert_eq!(
        fs::read_dir(root.join(BUCKET).join("chunks"))
            .unwrap()
            .count() as u64,
        n
    );
    assert!(
        root.join(BUCKET)
            .join("snapshots/sb/1/manifest.json")
            .is_file()
    );

    let dest = tmp.path().join("restored/1");
    let (got, down) = store.get_dir("sb/1", &dest, None).await.unwrap();
    assert_eq!(got, first);
    assert_eq!(down.fetched_chunks, n);
    assert_eq!(down.bytes_downloaded, up.bytes_uploaded);
    same_files(&src, &dest);

    // Claims ride S3's create-if-absent put (If-None-Match: *): a node
    // that read an old claim cannot overwrite the newer one.
    let first_claim = store
        .write_claim("sbx", None, ClaimState::Paused, "n1", Some("sb/1"))
        .await
        .unwrap();
    store
        .write_claim(
            "sbx",
            Some(first_claim.epoch),
            ClaimState::Paused,
            "n2",
            Some("sb/1"),
        )
        .await
        .unwrap();
    let stale = store
        .write_claim(
            "sbx",
            Some(first_claim.epoch),
            ClaimState::Running,
            "n1",
            None,
        )
        .await;
    assert!(
        matches!(&stale, Err(ObjectsError::ClaimTaken { current: Some(c), .. }) if c.node == "n2"),
        "{stale:?}"
    );
    assert_eq!(store.claim("sbx").await.unwrap().unwrap().node, "n2");
    store.forget_claims("sbx").await.unwrap();
    assert_eq!(store.claim("sbx").await.unwrap(), None);

    // Everything is in the bucket already; found by HEAD.
    let (_, again) = store.put_dir(&src, "sb/2", meta(), &none).await.unwrap();
    assert_eq!((again.uploaded_chunks, again.deduplicated_chunks), (0, n));
    eprintln!(
        "s3s-fs, 64 MiB sparse dir: first upload {:?} ({} chunks, {} bytes), download {:?}, \
         second upload {:?} (dedup ratio {:.2}, {} uploaded)",
        up.elapsed,
        up.uploaded_chunks,
        up.bytes_uploaded,
        down.elapsed,
        again.elapsed,
        again.dedup_ratio(),
        again.uploaded_chunks
    );
    assert_eq!(store.list("sb").await.unwrap(), ["sb/1", "sb/2"]);

    // One byte of a data chunk changes, and the server dies.
    File::options()
        .write(true)
        .open(src.join("vmstate"))
        .unwrap()
        .write_all_at(&[0], 10)
        .unwrap();
    server.kill();
    let t0 = Instant::now();
    let err = store
        .put_dir(&src, "sb/3", meta(), &KnownChunks::from_manifests([&first]))
        .await
        .unwrap_err();
    eprintln!(
        "upload with the server dead failed after {:?}: {err}",
        t0.elapsed()
    );
    assert!(
        matches!(&err, ObjectsError::Store { op: "head" | "put", object, .. } if object.starts_with("chunks/")),
        "{err:?}"
    );
    assert!(t0.elapsed() < Duration::from_secs(60));

    server.restart();
    assert_eq!(store.list("").await.unwrap(), ["sb/1", "sb/2"]);
    let err = store
        .get_dir("sb/3", &tmp.path().join("restored/3"), None)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, ObjectsError::NotFound { name } if name == "sb/3"),
        "{err}"
    );
    assert!(!tmp.path().join("restored/3").exists());

    let (_, stats) = store
        .put_dir(&src, "sb/3", meta(), &KnownChunks::from_manifests([&first]))
        .await
        .unwrap();
    // vmstate is one chunk; the others are known.
    assert_eq!(
        (stats.uploaded_chunks, stats.deduplicated_chunks),
        (1, n - 1)
    );
    let dest3 = tmp.path().join("restored/3");
    store.get_dir("sb/3", &dest3, None).await.unwrap();
    same_files(&src, &dest3);

    // GC over S3: with the first two snapshots gone, only the old vmstate
    // chunk is garbage.
    store.delete("sb/1").await.unwrap();
    store.delete("sb/2").await.unwrap();
    let gc = store.gc(Duration::ZERO).await.unwrap();
    assert_eq!((gc.manifests, gc.chunks, gc.deleted), (1, n + 1, 1));
    let dest3b = tmp.path().join("restored/3b");
    store.get_dir("sb/3", &dest3b, None).await.unwrap();
    same_files(&src, &dest3b);

    // A chunk gone from the bucket is named, with its file.
    let manifest = store.manifest("sb/3").await.unwrap();
    let (file, victim) = manifest
        .entries
        .iter()
        .find_map(|e| match e {
            actors::objects::Entry::File { path, chunks, .. } if path == "vmstate" => {
                Some((path.clone(), chunks[0].id.unwrap()))
            }
            _ => None,
        })
        .unwrap();
    fs::remove_file(root.join(BUCKET).join("chunks").join(victim.to_hex())).unwrap();
    let err = store
        .get_dir("sb/3", &tmp.path().join("restored/missing"), None)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, ObjectsError::MissingChunk { hash, file: f } if *hash == victim && *f == file),
        "{err}"
    );
    assert!(!tmp.path().join("restored/missing").exists());
}
