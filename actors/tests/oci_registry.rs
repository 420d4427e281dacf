//! Pulling images from a real registry on loopback: Debian's
//! `docker-registry` (the CNCF distribution registry) over a directory,
//! filled by `skopeo` from an OCI image layout this test writes itself
//! (two layers made with the `tar` crate, the second with a whiteout and
//! an opaque directory; and an index with an arm64 and an amd64 image).
//!
//! Both programs are found on `PATH` (`cargo xtask test` installs the
//! Debian packages `docker-registry` and `skopeo`). Without them the test
//! prints `SKIP`, except under `SANDMESH_REQUIRE_ARTIFACTS`, where it fails.

use std::fs::{self, File};
use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use actors::build::image::{ImageError, ImageRef, PullOptions, pull};
use schema::guest::REQUIRE_ENV;
use sha2::{Digest, Sha256};

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(program))
        .find(|p| p.is_file())
}

/// A docker-registry process; killed when dropped.
struct Registry {
    child: Child,
    port: u16,
    storage: PathBuf,
}

impl Registry {
    fn start(bin: &Path, dir: &Path) -> Self {
        let port = free_port();
        let storage = dir.join("storage");
        let config = dir.join("config.yml");
        fs::write(
            &config,
            format!(
                "version: 0.1\n\
                 log:\n  level: info\n\
                 storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n\
                 http:\n  addr: 127.0.0.1:{port}\n",
                storage.display()
            ),
        )
        .unwrap();
        let log = File::create(dir.join("registry.log")).unwrap();
        let child = Command::new(bin)
            .arg("serve")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", bin.display()));
        let mut registry = Self {
            child,
            port,
            storage,
        };
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
            if let Some(status) = registry.child.try_wait().unwrap() {
                panic!(
                    "docker-registry exited ({status}) before listening: {}",
                    fs::read_to_string(dir.join("registry.log")).unwrap_or_default()
                );
            }
            assert!(Instant::now() < deadline, "registry did not listen in 30 s");
            std::thread::sleep(Duration::from_millis(50));
        }
        registry
    }

    fn image(&self, name: &str) -> ImageRef {
        ImageRef::parse(&format!("127.0.0.1:{}/{name}", self.port)).unwrap()
    }

    /// The registry's own copy of a blob.
    fn blob_path(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").unwrap();
        self.storage
            .join("docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// An OCI image layout under construction.
struct Layout {
    dir: PathBuf,
    refs: Vec<serde_json::Value>,
}

impl Layout {
    fn new(dir: &Path) -> Self {
        fs::create_dir_all(dir.join("blobs/sha256")).unwrap();
        fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
        Self {
            dir: dir.to_owned(),
            refs: Vec::new(),
        }
    }

    /// Stores a blob; returns its descriptor.
    fn blob(&self, media_type: &str, bytes: &[u8]) -> serde_json::Value {
        let digest = format!("sha256:{}", hex::encode(Sha256::digest(bytes)));
        fs::write(
            self.dir
                .join("blobs/sha256")
                .join(digest.strip_prefix("sha256:").unwrap()),
            bytes,
        )
        .unwrap();
        serde_json::json!({ "mediaType": media_type, "digest": digest, "size": bytes.len() })
    }

    fn json_blob(&self, media_type: &str, value: &serde_json::Value) -> serde_json::Value {
        self.blob(media_type, &serde_json::to_vec(value).unwrap())
    }

    /// An image of `layers` (tars, gzipped here) with `config`; returns
    /// its manifest's descriptor.
    fn image(&self, layers: &[Vec<u8>], config: serde_json::Value) -> serde_json::Value {
        let mut diff_ids = Vec::new();
        let mut descs = Vec::new();
        for tar in layers {
            diff_ids.push(format!("sha256:{}", hex::encode(Sha256::digest(tar))));
            let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            gz.write_all(tar).unwrap();
            descs.push(self.blob(OCI_LAYER_GZIP, &gz.finish().unwrap()));
        }
        let config = serde_json::json!({
            "architecture": "amd64",
            "os": "linux",
            "config": config,
            "rootfs": { "type": "layers", "diff_ids": diff_ids },
        });
        let config = self.json_blob(OCI_CONFIG, &config);
        self.json_blob(
            OCI_MANIFEST,
            &serde_json::json!({
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "config": config,
                "layers": descs,
            }),
        )
    }

    fn tag(&mut self, tag: &str, mut desc: serde_json::Value) {
        desc["annotations"] = serde_json::json!({ "org.opencontainers.image.ref.name": tag });
        self.refs.push(desc);
        fs::write(
            self.dir.join("index.json"),
            serde_json::to_vec(&serde_json::json!({
                "schemaVersion": 2,
                "mediaType": OCI_INDEX,
                "manifests": self.refs,
            }))
            .unwrap(),
        )
        .unwrap();
    }
}

/// Tar entries with explicit modes and owners.
struct Tar(tar::Builder<Vec<u8>>);

impl Tar {
    fn new() -> Self {
        Tar(tar::Builder::new(Vec::new()))
    }

    fn entry(&mut self, kind: tar::EntryType, path: &str, mode: u32, uid: u64, data: &[u8]) {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_uid(uid);
        h.set_gid(uid);
        h.set_mtime(1_700_000_000);
        h.set_size(data.len() as u64);
        self.0.append_data(&mut h, path, data).unwrap();
    }

    fn dir(mut self, path: &str, mode: u32) -> Self {
        self.entry(tar::EntryType::Directory, path, mode, 0, b"");
        self
    }

    fn file(mut self, path: &str, mode: u32, uid: u64, data: &str) -> Self {
        self.entry(tar::EntryType::Regular, path, mode, uid, data.as_bytes());
        self
    }

    fn symlink(mut self, path: &str, target: &str) -> Self {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_mode(0o777);
        h.set_size(0);
        self.0.append_link(&mut h, path, target).unwrap();
        self
    }

    fn bytes(self) -> Vec<u8> {
        self.0.into_inner().unwrap()
    }
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn plain() -> PullOptions {
    PullOptions {
        plain_http: true,
        max_bytes: 1 << 30,
        ..Default::default()
    }
}

#[tokio::test]
async fn images_pull_from_a_loopback_registry() {
    let (Some(registry_bin), Some(skopeo)) = (which("docker-registry"), which("skopeo")) else {
        if std::env::var_os(REQUIRE_ENV).is_some_and(|v| v != "0") {
            panic!("docker-registry or skopeo is not on PATH and {REQUIRE_ENV} requires this test");
        }
        eprintln!(
            "SKIP oci_registry: docker-registry and skopeo are needed \
             (apt-get install docker-registry skopeo; cargo xtask test installs them)"
        );
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let registry = Registry::start(&registry_bin, tmp.path());

    // The image: a base layer and one changing it.
    let mut layout = Layout::new(&tmp.path().join("layout"));
    let base = Tar::new()
        .dir("etc/", 0o755)
        .file("etc/os-release", 0o644, 0, "ID=test\n")
        .file("etc/obsolete", 0o644, 0, "deleted by the upper layer\n")
        .dir("var/cache/", 0o755)
        .file("var/cache/lower", 0o644, 0, "hidden by the opaque marker\n")
        .dir("home/user/", 0o750)
        .file("home/user/secret", 0o600, 1000, "owned by 1000\n")
        .file("usr/bin/hello", 0o755, 0, "#!/bin/sh\necho hello\n")
        .symlink("bin", "usr/bin")
        .bytes();
    let upper = Tar::new()
        .file("etc/.wh.obsolete", 0o644, 0, "")
        .file("var/cache/.wh..wh..opq", 0o644, 0, "")
        .file("var/cache/upper", 0o644, 0, "new cache\n")
        .file("etc/motd", 0o644, 0, "upper layer\n")
        .bytes();
    let config = serde_json::json!({
        "Env": ["PATH=/usr/local/bin:/usr/bin:/bin", "GREETING=hi there"],
        "WorkingDir": "/home/user",
        "User": "1000:1000",
        "Cmd": ["/bin/hello", "--loud"],
    });
    let amd64 = layout.image(&[base.clone(), upper], config.clone());
    layout.tag("v1", amd64.clone());
    // A multi-platform index: arm64 first, so choosing it would show.
    let arm64_layer = Tar::new()
        .file("ARM64", 0o644, 0, "wrong platform\n")
        .bytes();
    let arm64 = layout.image(&[base, arm64_layer], config);
    let entry = |desc: &serde_json::Value, arch: &str| {
        let mut d = desc.clone();
        d["platform"] = serde_json::json!({ "os": "linux", "architecture": arch });
        d
    };
    let index = layout.json_blob(
        OCI_INDEX,
        &serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [entry(&arm64, "arm64"), entry(&amd64, "amd64")],
        }),
    );
    layout.tag("multi", index);

    let push = |tag: &str, all: bool| {
        let mut cmd = Command::new(&skopeo);
        cmd.args(["--insecure-policy", "copy", "--dest-tls-verify=false"]);
        if all {
            cmd.arg("--all");
        }
        cmd.arg(format!("oci:{}:{tag}", layout.dir.display()))
            .arg(format!(
                "docker://127.0.0.1:{}/test/image:{tag}",
                registry.port
            ));
        run(&mut cmd);
    };
    let started = Instant::now();
    push("v1", false);
    push("multi", true);
    eprintln!("pushed two tags with skopeo in {:?}", started.elapsed());

    // Pull by tag.
    let dest = tmp.path().join("rootfs");
    let started = Instant::now();
    let got = pull(&registry.image("test/image:v1"), None, &dest, &plain())
        .await
        .unwrap();
    eprintln!("pulled test/image:v1 in {:?}", started.elapsed());
    let read = |p: &str| fs::read_to_string(dest.join(p)).unwrap();
    assert_eq!(read("etc/os-release"), "ID=test\n");
    assert_eq!(read("etc/motd"), "upper layer\n");
    assert!(!dest.join("etc/obsolete").exists(), "whiteout applied");
    assert!(!dest.join("var/cache/lower").exists(), "opaque dir cleared");
    assert_eq!(read("var/cache/upper"), "new cache\n");
    assert_eq!(
        fs::read_link(dest.join("bin")).unwrap(),
        Path::new("usr/bin")
    );
    assert_eq!(read("bin/hello"), "#!/bin/sh\necho hello\n");
    let hello = fs::metadata(dest.join("usr/bin/hello")).unwrap();
    assert_eq!(hello.mode() & 0o7777, 0o755);
    let secret = fs::metadata(dest.join("home/user/secret")).unwrap();
    assert_eq!(secret.mode() & 0o7777, 0o600);
    assert_eq!(
        fs::metadata(dest.join("home/user")).unwrap().mode() & 0o7777,
        0o750
    );
    if unsafe { libc::geteuid() } == 0 {
        assert_eq!((secret.uid(), secret.gid()), (1000, 1000));
    }
    assert!(!dest.join("ARM64").exists());
    assert_eq!(
        got.env,
        [
            ("PATH", "/usr/local/bin:/usr/bin:/bin"),
            ("GREETING", "hi there")
        ]
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
    );
    assert_eq!(got.workdir.as_deref(), Some("/home/user"));
    assert_eq!(got.user.as_deref(), Some("1000:1000"));
    assert_eq!(got.cmd, ["/bin/hello", "--loud"]);
    assert!(got.entrypoint.is_empty());
    assert_eq!(got.digest, amd64["digest"].as_str().unwrap());
    let staging: Vec<_> = fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n.to_string_lossy().ends_with(".layers"))
        .collect();
    assert!(staging.is_empty(), "downloads cleaned up: {staging:?}");

    // The index resolves to its linux/amd64 image; a digest pulls it too.
    let multi = tmp.path().join("multi");
    let got_multi = pull(&registry.image("test/image:multi"), None, &multi, &plain())
        .await
        .unwrap();
    assert_eq!(got_multi.digest, got.digest);
    assert!(!multi.join("ARM64").exists(), "linux/amd64 chosen");
    assert_eq!(
        fs::read_to_string(multi.join("etc/motd")).unwrap(),
        "upper layer\n"
    );
    let by_digest = tmp.path().join("by-digest");
    let pinned = pull(
        &registry.image(&format!("test/image@{}", got.digest)),
        None,
        &by_digest,
        &plain(),
    )
    .await
    .unwrap();
    assert_eq!(pinned, got);

    // Errors, each leaving no destination behind.
    let err_dest = tmp.path().join("failed");
    let expect_err = |result: Result<_, ImageError>| {
        let err = result.unwrap_err();
        assert!(!err_dest.exists(), "{err}: destination removed");
        eprintln!("as expected: {err}");
        err
    };
    let err = expect_err(
        pull(
            &registry.image("test/nothing:v1"),
            None,
            &err_dest,
            &plain(),
        )
        .await,
    );
    assert!(matches!(err, ImageError::NotFound { .. }), "{err}");
    let err = expect_err(pull(&registry.image("test/image:v2"), None, &err_dest, &plain()).await);
    assert!(matches!(err, ImageError::NotFound { .. }), "{err}");
    let zeros = format!("test/image@sha256:{}", "0".repeat(64));
    let err = expect_err(pull(&registry.image(&zeros), None, &err_dest, &plain()).await);
    assert!(matches!(err, ImageError::NotFound { .. }), "{err}");
    let small = PullOptions {
        plain_http: true,
        max_bytes: 100,
        ..Default::default()
    };
    let err = expect_err(pull(&registry.image("test/image:v1"), None, &err_dest, &small).await);
    assert!(
        matches!(err, ImageError::TooLarge { max: 100, .. }),
        "{err}"
    );
    let nobody = ImageRef::parse(&format!("127.0.0.1:{}/test/image:v1", free_port())).unwrap();
    let err = expect_err(pull(&nobody, None, &err_dest, &plain()).await);
    assert!(matches!(err, ImageError::Unreachable { .. }), "{err}");
    // HTTPS to a plain-HTTP registry fails by name too.
    let err = expect_err(
        pull(
            &registry.image("test/image:v1"),
            None,
            &err_dest,
            &PullOptions::default(),
        )
        .await,
    );
    assert!(
        matches!(
            err,
            ImageError::Unreachable { .. } | ImageError::Registry { .. }
        ),
        "{err}"
    );
    // An existing destination is refused and left alone.
    let err = pull(&registry.image("test/image:v1"), None, &dest, &plain())
        .await
        .unwrap_err();
    assert!(matches!(err, ImageError::Io { .. }), "{err}");
    assert!(dest.join("etc/motd").exists());

    // A layer the registry serves corrupted (same length, other bytes).
    let manifest: serde_json::Value = serde_json::from_slice(
        &fs::read(
            layout
                .dir
                .join("blobs/sha256")
                .join(got.digest.strip_prefix("sha256:").unwrap()),
        )
        .unwrap(),
    )
    .unwrap();
    let layer_digest = manifest["layers"][1]["digest"].as_str().unwrap();
    let blob = registry.blob_path(layer_digest);
    let mut bytes = fs::read(&blob).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    fs::write(&blob, &bytes).unwrap();
    let err = expect_err(pull(&registry.image("test/image:v1"), None, &err_dest, &plain()).await);
    assert!(
        matches!(&err, ImageError::DigestMismatch { what, expected, .. }
            if what.contains(layer_digest) && expected == layer_digest),
        "{err}"
    );
}
