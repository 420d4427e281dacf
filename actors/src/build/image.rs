//! Pulling a container image from a registry into a directory tree, the
//! start of a template build `FROM <registry image>`.
//!
//! [`pull`] resolves the reference to one linux/amd64 image manifest (an
//! index or Docker manifest list picks its linux/amd64 entry), reads the
//! image config, downloads every layer (the sha256 digest the manifest
//! names is checked before a byte of it is unpacked) and unpacks the layers
//! in order into a new directory. The registry protocol is `oci-client`'s
//! (bearer-token and basic auth, Docker and OCI media types); the
//! unpacking is ours, because the layers of an image are not plain tars:
//!
//! - **Whiteouts.** `dir/.wh.<name>` deletes `dir/<name>` that a lower
//!   layer made; `dir/.wh..wh..opq` makes `dir` opaque: everything lower
//!   layers put in it goes. Neither hides what the same layer writes,
//!   before or after the marker (the paths a layer writes are tracked).
//! - **Containment.** Every path is resolved as if `dest` were the root
//!   (a chroot): absolute entry paths and absolute symlink targets are
//!   relative to `dest`, a symlink's `..` stops at `dest`, and the last
//!   component of an entry is never followed (an existing symlink there is
//!   replaced, files are created `O_EXCL | O_NOFOLLOW`). An entry whose own
//!   path (or hard link target) has a `..` component is refused outright.
//!   The `tar` crate's `unpack_in` is not used: it refuses a parent that
//!   is a symlink leading out of `dest` instead of resolving it inside,
//!   and knows nothing of whiteouts.
//! - **Metadata.** Modes (setuid, setgid and sticky bits included),
//!   numeric owners (when running as root; the node does) and mtimes are
//!   kept; symlinks, hard links (within the tree) and FIFOs are made;
//!   character and block devices are skipped with a log line (a template's
//!   `/dev` is the runtime's). Extended attributes (file capabilities) are
//!   not restored.

use std::collections::HashSet;
use std::ffi::{CString, OsString};
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::pin::Pin;
use std::str::FromStr;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use oci_client::client::{ClientConfig, ClientProtocol, linux_amd64_resolver};
use oci_client::errors::{OciDistributionError, OciErrorCode};
use oci_client::manifest::OciDescriptor;
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference, RegistryOperation};
use serde::Deserialize;
use tokio::io::AsyncWrite;

/// The most layer downloads one pull runs at once.
const PARALLEL_DOWNLOADS: usize = 3;
/// An image config larger than this is refused (real ones are kilobytes).
const MAX_CONFIG_BYTES: u64 = 4 << 20;
/// Symlinks followed while resolving one path before giving up (Linux's
/// own limit).
const MAX_SYMLINK_HOPS: usize = 40;

/// An image reference: `[registry/]repository[:tag][@digest]`, with Docker
/// Hub's defaults (`debian:bookworm` is `docker.io/library/debian:bookworm`;
/// no tag and no digest means `:latest`). The first path component is the
/// registry when it contains `.` or `:` or is `localhost`.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct ImageRef {
    reference: Reference,
}

impl ImageRef {
    pub fn parse(s: &str) -> Result<ImageRef, ImageError> {
        let reference = Reference::from_str(s).map_err(|e| ImageError::InvalidReference {
            reference: s.to_owned(),
            reason: e.to_string(),
        })?;
        Ok(ImageRef { reference })
    }

    /// The registry host (with its port, if any): `docker.io` for Docker
    /// Hub names.
    pub fn registry(&self) -> &str {
        self.reference.registry()
    }

    /// The repository within the registry, e.g. `library/debian`.
    pub fn repository(&self) -> &str {
        self.reference.repository()
    }

    pub fn tag(&self) -> Option<&str> {
        self.reference.tag()
    }

    /// The pinned manifest digest (`sha256:<hex>`), if the reference has one.
    pub fn digest(&self) -> Option<&str> {
        self.reference.digest()
    }
}

impl FromStr for ImageRef {
    type Err = ImageError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ImageRef::parse(s)
    }
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.reference.fmt(f)
    }
}

impl fmt::Debug for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ImageRef({self})")
    }
}

/// How to pull.
#[derive(Debug, Clone)]
pub struct PullOptions {
    /// Speak plain `http://` to the registry: for a registry on loopback or
    /// one the operator named insecure. Otherwise HTTPS.
    pub plain_http: bool,
    /// Refuse an image whose layers (as the manifest sizes them, compressed)
    /// add up to more than this.
    pub max_bytes: u64,
    /// Stop unpacking once the layers, decompressed, add up to more than
    /// this (a small layer may inflate to anything).
    pub max_unpacked_bytes: u64,
}

impl Default for PullOptions {
    fn default() -> Self {
        Self {
            plain_http: false,
            max_bytes: 8 << 30,
            max_unpacked_bytes: 32 << 30,
        }
    }
}

/// What the image config says about running the image.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageConfig {
    /// `Env`, split at the first `=` (an entry without one has an empty value).
    pub env: Vec<(String, String)>,
    /// `WorkingDir`, if set and not empty.
    pub workdir: Option<String>,
    /// `User` (`name`, `uid`, `uid:gid`...), if set and not empty.
    pub user: Option<String>,
    pub cmd: Vec<String>,
    pub entrypoint: Vec<String>,
    /// The digest of the image manifest that was unpacked (for an index,
    /// of its linux/amd64 manifest): `<repository>@<digest>` pulls exactly
    /// this image again.
    pub digest: String,
    /// The digest of the config blob (Docker's "image ID").
    pub config_digest: String,
}

/// Why a pull failed.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("invalid image reference {reference:?}: {reason}")]
    InvalidReference { reference: String, reason: String },
    #[error("image {image} not found: {detail}")]
    NotFound { image: String, detail: String },
    #[error("registry refused access to {image}: {detail}")]
    Unauthorized { image: String, detail: String },
    #[error("registry {registry} unreachable: {detail}")]
    Unreachable { registry: String, detail: String },
    #[error("registry error pulling {image}: {detail}")]
    Registry { image: String, detail: String },
    #[error("digest mismatch for {what}: expected {expected}, got {actual}")]
    DigestMismatch {
        what: String,
        expected: String,
        actual: String,
    },
    #[error("image {image} has {size} bytes of layers, over the limit of {max}")]
    TooLarge { image: String, size: u64, max: u64 },
    #[error("image {image}: {reason}")]
    Unsupported { image: String, reason: String },
    #[error("layer {layer}: entry {path:?} refused: {reason}")]
    UnsafeEntry {
        layer: String,
        path: String,
        reason: String,
    },
    #[error("layer {layer}: {reason}")]
    Layer { layer: String, reason: String },
    #[error("image config {digest}: {reason}")]
    Config { digest: String, reason: String },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
}

fn io_err(context: String) -> impl FnOnce(io::Error) -> ImageError {
    move |source| ImageError::Io { context, source }
}

/// Pulls `image` into `dest`, a directory this creates (its parent must
/// exist; `dest` must not). On any error `dest` is removed again. `auth` is
/// a user name and password (or token) for the registry; without it the
/// pull is anonymous (with the anonymous bearer token a registry hands out).
pub async fn pull(
    image: &ImageRef,
    auth: Option<(String, String)>,
    dest: &Path,
    opts: &PullOptions,
) -> Result<ImageConfig, ImageError> {
    let name = dest
        .file_name()
        .ok_or_else(|| ImageError::Io {
            context: format!("pull destination {}", dest.display()),
            source: io::Error::new(io::ErrorKind::InvalidInput, "has no file name"),
        })?
        .to_owned();
    fs::create_dir(dest).map_err(io_err(format!(
        "creating pull destination {}",
        dest.display()
    )))?;
    // Layers are downloaded beside `dest` and deleted once unpacked.
    let mut staging_name = OsString::from(".");
    staging_name.push(&name);
    staging_name.push(".layers");
    let staging = dest.with_file_name(staging_name);
    let result = pull_into(image, auth, dest, &staging, opts).await;
    let _ = fs::remove_dir_all(&staging);
    if result.is_err() {
        let _ = fs::remove_dir_all(dest);
    }
    result
}

async fn pull_into(
    image: &ImageRef,
    auth: Option<(String, String)>,
    dest: &Path,
    staging: &Path,
    opts: &PullOptions,
) -> Result<ImageConfig, ImageError> {
    install_crypto_provider();
    let reference = &image.reference;
    let client = Client::new(ClientConfig {
        protocol: if opts.plain_http {
            ClientProtocol::Http
        } else {
            ClientProtocol::Https
        },
        platform_resolver: Some(Box::new(linux_amd64_resolver)),
        connect_timeout: Some(Duration::from_secs(10)),
        read_timeout: Some(Duration::from_secs(120)),
        ..Default::default()
    });
    let auth = match auth {
        Some((user, password)) => RegistryAuth::Basic(user, password),
        None => RegistryAuth::Anonymous,
    };
    let ctx = ErrCtx {
        image: image.to_string(),
        registry: image.registry().to_owned(),
    };
    // Authenticate first: an unreachable registry or refused credentials
    // show up here by name (the pull calls below would hide them).
    client
        .auth(reference, &auth, RegistryOperation::Pull)
        .await
        .map_err(|e| ctx.map(e, "the registry"))?;
    let (manifest, digest) = client
        .pull_image_manifest(reference, &auth)
        .await
        .map_err(|e| ctx.map(e, "the manifest"))?;

    const IMAGE_CONFIG_TYPES: &[&str] = &[
        "application/vnd.oci.image.config.v1+json",
        "application/vnd.docker.container.image.v1+json",
    ];
    if !IMAGE_CONFIG_TYPES.contains(&manifest.config.media_type.as_str()) {
        return Err(ImageError::Unsupported {
            image: ctx.image,
            reason: format!(
                "not a container image (config media type {})",
                manifest.config.media_type
            ),
        });
    }
    let mut size: u64 = 0;
    for layer in &manifest.layers {
        let mt = layer.media_type.as_str();
        if !(mt.contains(".tar") || mt.contains("rootfs.diff")) {
            return Err(ImageError::Unsupported {
                image: ctx.image,
                reason: format!("layer {} has media type {mt}", layer.digest),
            });
        }
        size = size.saturating_add(u64::try_from(layer.size).unwrap_or(u64::MAX));
    }
    if size > opts.max_bytes {
        return Err(ImageError::TooLarge {
            image: ctx.image,
            size,
            max: opts.max_bytes,
        });
    }

    let config_desc = &manifest.config;
    let config_limit = u64::try_from(config_desc.size)
        .ok()
        .filter(|&s| s <= MAX_CONFIG_BYTES)
        .ok_or_else(|| ImageError::Config {
            digest: config_desc.digest.clone(),
            reason: format!(
                "size {} is over the limit of {MAX_CONFIG_BYTES}",
                config_desc.size
            ),
        })?;
    let mut config_bytes = Limited::new(Vec::new(), config_limit);
    client
        .pull_blob(reference, config_desc, &mut config_bytes)
        .await
        .map_err(|e| {
            ctx.map_blob(
                e,
                &format!("the image config {}", config_desc.digest),
                config_bytes.over,
            )
        })?;
    let config = parse_config(&config_bytes.inner, digest, &config_desc.digest)?;

    fs::create_dir_all(staging).map_err(io_err(format!(
        "creating layer staging directory {}",
        staging.display()
    )))?;
    let downloads = Arc::new(tokio::sync::Semaphore::new(PARALLEL_DOWNLOADS));
    let mut tasks = Tasks(Vec::new());
    for (i, layer) in manifest.layers.iter().enumerate() {
        let client = client.clone();
        let reference = reference.clone();
        let layer = layer.clone();
        let path = staging.join(format!("{i}.layer"));
        let downloads = downloads.clone();
        let ctx = ctx.clone();
        tasks.0.push(tokio::spawn(async move {
            let _permit = downloads.acquire_owned().await;
            download_layer(&client, &reference, &layer, &path, &ctx).await?;
            Ok::<_, ImageError>((path, layer.digest))
        }));
    }
    // Owners only as root (the node is); SAFETY: geteuid cannot fail.
    let chown = unsafe { libc::geteuid() } == 0;
    let mut stats = LayerStats::default();
    let mut budget = opts.max_unpacked_bytes;
    for task in tasks.0.iter_mut() {
        let (path, layer) = task.await.map_err(|e| ImageError::Io {
            context: "layer download task".into(),
            source: io::Error::other(e.to_string()),
        })??;
        let root = dest.to_owned();
        let layer_stats = tokio::task::spawn_blocking(move || {
            let file = File::open(&path).map_err(io_err(format!(
                "opening downloaded layer {}",
                path.display()
            )))?;
            let mut left = budget;
            let result = unpack_layer(&root, &layer, file, chown, &mut left);
            let _ = fs::remove_file(&path);
            result.map(|s| (s, left))
        })
        .await
        .map_err(|e| ImageError::Io {
            context: "layer unpack task".into(),
            source: io::Error::other(e.to_string()),
        })?;
        let (layer_stats, left) = layer_stats.map_err(|e| match e {
            ImageError::Layer { ref reason, .. } if reason.contains(UNPACKED_LIMIT) => {
                ImageError::TooLarge {
                    image: image.to_string(),
                    size: opts.max_unpacked_bytes + 1,
                    max: opts.max_unpacked_bytes,
                }
            }
            e => e,
        })?;
        budget = left;
        stats.add(&layer_stats);
    }
    tracing::info!(
        image = %image,
        digest = %config.digest,
        layers = manifest.layers.len(),
        compressed_bytes = size,
        files = stats.entries,
        skipped_devices = stats.skipped_devices,
        "pulled image"
    );
    Ok(config)
}

/// Layer download tasks, aborted when dropped (a failed pull stops the
/// downloads still running).
struct Tasks(Vec<tokio::task::JoinHandle<Result<(PathBuf, String), ImageError>>>);

impl Drop for Tasks {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

async fn download_layer(
    client: &Client,
    reference: &Reference,
    layer: &OciDescriptor,
    path: &Path,
    ctx: &ErrCtx,
) -> Result<(), ImageError> {
    let file = tokio::fs::File::create(path)
        .await
        .map_err(io_err(format!("creating {}", path.display())))?;
    let declared = u64::try_from(layer.size).unwrap_or(0);
    let mut out = Limited::new(file, declared);
    let what = format!("layer {}", layer.digest);
    client
        .pull_blob(reference, layer, &mut out)
        .await
        .map_err(|e| ctx.map_blob(e, &what, out.over))?;
    Ok(())
}

fn install_crypto_provider() {
    // reqwest is built with rustls but no provider (the workspace is ring
    // only); it panics building a client unless one is installed.
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
}

/// What errors are about.
#[derive(Clone)]
struct ErrCtx {
    image: String,
    registry: String,
}

impl ErrCtx {
    fn map(&self, e: OciDistributionError, what: &str) -> ImageError {
        let image = self.image.clone();
        match e {
            OciDistributionError::RequestError(e) if e.is_connect() || e.is_timeout() => {
                ImageError::Unreachable {
                    registry: self.registry.clone(),
                    detail: error_chain(&e),
                }
            }
            OciDistributionError::RequestError(e) => ImageError::Registry {
                image,
                detail: format!("fetching {what}: {}", error_chain(&e)),
            },
            OciDistributionError::UnauthorizedError { url } => ImageError::Unauthorized {
                image,
                detail: format!("401 for {url}"),
            },
            OciDistributionError::AuthenticationFailure(reason) => ImageError::Unauthorized {
                image,
                detail: format!("token request refused: {}", reason.trim()),
            },
            OciDistributionError::RegistryError { envelope, url } => {
                let codes: Vec<&OciErrorCode> = envelope.errors.iter().map(|e| &e.code).collect();
                let detail = format!("{envelope} ({url})");
                if codes.iter().any(|c| {
                    matches!(
                        c,
                        OciErrorCode::ManifestUnknown
                            | OciErrorCode::NameUnknown
                            | OciErrorCode::BlobUnknown
                    )
                }) {
                    ImageError::NotFound { image, detail }
                } else if codes
                    .iter()
                    .any(|c| matches!(c, OciErrorCode::Unauthorized | OciErrorCode::Denied))
                {
                    ImageError::Unauthorized { image, detail }
                } else {
                    ImageError::Registry { image, detail }
                }
            }
            OciDistributionError::ServerError { code: 404, url, .. } => ImageError::NotFound {
                image,
                detail: format!("404 for {url}"),
            },
            OciDistributionError::ServerError { code, url, message } => ImageError::Registry {
                image,
                detail: format!("{code} for {url}: {}", message.trim()),
            },
            OciDistributionError::DigestError(
                oci_client::errors::DigestError::VerificationError { expected, actual },
            ) => ImageError::DigestMismatch {
                what: format!("{what} of {image}"),
                expected,
                actual,
            },
            OciDistributionError::ImageManifestNotFoundError(reason) => {
                ImageError::Unsupported { image, reason }
            }
            OciDistributionError::UnsupportedMediaTypeError(t) => ImageError::Unsupported {
                image,
                reason: format!("manifest media type {t}"),
            },
            OciDistributionError::UnsupportedSchemaVersionError(v) => ImageError::Unsupported {
                image,
                reason: format!("manifest schema version {v}"),
            },
            other => ImageError::Registry {
                image,
                detail: format!("fetching {what}: {other}"),
            },
        }
    }

    /// As [`Self::map`], for a blob written through a [`Limited`] writer
    /// that ran `over` its declared size.
    fn map_blob(&self, e: OciDistributionError, what: &str, over: bool) -> ImageError {
        if over {
            return ImageError::Registry {
                image: self.image.clone(),
                detail: format!("{what}: the registry sent more bytes than the manifest declares"),
            };
        }
        match e {
            OciDistributionError::IoError(source) => ImageError::Io {
                context: format!("writing {what}"),
                source,
            },
            e => self.map(e, what),
        }
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        let text = inner.to_string();
        if !s.contains(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        source = inner.source();
    }
    s
}

/// A writer that fails once more than `limit` bytes come (a registry
/// streaming past a blob's declared size).
struct Limited<W> {
    inner: W,
    left: u64,
    over: bool,
}

impl<W> Limited<W> {
    fn new(inner: W, limit: u64) -> Self {
        Self {
            inner,
            left: limit,
            over: false,
        }
    }
}

impl<W: AsyncWrite + Unpin> AsyncWrite for Limited<W> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if buf.len() as u64 > self.left {
            self.over = true;
            return Poll::Ready(Err(io::Error::other("blob larger than declared")));
        }
        let this = &mut *self;
        let n = std::task::ready!(Pin::new(&mut this.inner).poll_write(cx, buf))?;
        this.left -= n as u64;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The parts of an image config (OCI or Docker, same field names) we use.
#[derive(Deserialize)]
struct ConfigBlob {
    #[serde(default)]
    config: Option<RunConfig>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase")]
struct RunConfig {
    env: Option<Vec<String>>,
    working_dir: Option<String>,
    user: Option<String>,
    cmd: Option<Vec<String>>,
    entrypoint: Option<Vec<String>>,
}

fn parse_config(
    bytes: &[u8],
    manifest_digest: String,
    config_digest: &str,
) -> Result<ImageConfig, ImageError> {
    let blob: ConfigBlob = serde_json::from_slice(bytes).map_err(|e| ImageError::Config {
        digest: config_digest.to_owned(),
        reason: e.to_string(),
    })?;
    let run = blob.config.unwrap_or_default();
    let env = run
        .env
        .unwrap_or_default()
        .into_iter()
        .map(|kv| match kv.split_once('=') {
            Some((k, v)) => (k.to_owned(), v.to_owned()),
            None => (kv, String::new()),
        })
        .collect();
    Ok(ImageConfig {
        env,
        workdir: run.working_dir.filter(|s| !s.is_empty()),
        user: run.user.filter(|s| !s.is_empty()),
        cmd: run.cmd.unwrap_or_default(),
        entrypoint: run.entrypoint.unwrap_or_default(),
        digest: manifest_digest,
        config_digest: config_digest.to_owned(),
    })
}

/// Counts from unpacking a layer.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct LayerStats {
    /// Entries made (files, directories, links, FIFOs).
    pub entries: u64,
    /// Whiteouts applied (opaque markers included).
    pub whiteouts: u64,
    /// Character and block devices skipped.
    pub skipped_devices: u64,
}

impl LayerStats {
    fn add(&mut self, other: &LayerStats) {
        self.entries += other.entries;
        self.whiteouts += other.whiteouts;
        self.skipped_devices += other.skipped_devices;
    }
}

const WHITEOUT_PREFIX: &str = ".wh.";
const OPAQUE_MARKER: &str = ".wh..wh..opq";

/// Unpacks one layer (a tar, gzip- or zstd-compressed or not: told apart
/// by their magic bytes) onto `root`, applying its whiteouts. `layer`
/// names it in errors. Owners are set only when `chown`. At most `budget`
/// bytes of tar are read (decompressed); what is left stays in `budget`.
pub(crate) fn unpack_layer(
    root: &Path,
    layer: &str,
    reader: impl Read,
    chown: bool,
    budget: &mut u64,
) -> Result<LayerStats, ImageError> {
    let layer_err = |reason: String| ImageError::Layer {
        layer: layer.to_owned(),
        reason,
    };
    let mut reader = BufReader::with_capacity(256 << 10, reader);
    let magic = reader
        .fill_buf()
        .map_err(|e| layer_err(format!("reading: {e}")))?;
    let decoded: Box<dyn Read> = if magic.starts_with(&[0x1f, 0x8b]) {
        Box::new(flate2::bufread::MultiGzDecoder::new(reader))
    } else if magic.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Box::new(
            zstd::stream::read::Decoder::with_buffer(reader)
                .map_err(|e| layer_err(format!("zstd: {e}")))?,
        )
    } else {
        Box::new(reader)
    };
    let mut unpacker = Unpacker {
        root,
        layer,
        chown,
        written: HashSet::new(),
        dirs: Vec::new(),
        stats: LayerStats::default(),
    };
    let mut archive = tar::Archive::new(UnpackBudget {
        inner: decoded,
        left: budget,
    });
    let entries = archive
        .entries()
        .map_err(|e| layer_err(format!("reading tar: {e}")))?;
    for entry in entries {
        let entry = entry.map_err(|e| layer_err(format!("reading tar: {e}")))?;
        unpacker.entry(entry)?;
    }
    // Directory modes and times last: making their entries changed the
    // times, and a read-only directory must stay writable until then.
    for (path, meta) in std::mem::take(&mut unpacker.dirs).iter().rev() {
        unpacker.set_meta(path, meta, false)?;
    }
    Ok(unpacker.stats)
}

/// What an [`UnpackBudget`] reader says when the budget is spent.
const UNPACKED_LIMIT: &str = "the image unpacks to more than the node allows";

/// A reader of at most `left` more bytes: a layer's tar is read through it
/// after decompression.
struct UnpackBudget<'a, R> {
    inner: R,
    left: &'a mut u64,
}

impl<R: Read> Read for UnpackBudget<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n as u64 > *self.left {
            return Err(io::Error::other(UNPACKED_LIMIT));
        }
        *self.left -= n as u64;
        Ok(n)
    }
}

/// Mode, owner and mtime of an entry.
struct Meta {
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: i64,
}

struct Unpacker<'a> {
    root: &'a Path,
    layer: &'a str,
    chown: bool,
    /// Paths (relative to `root`, symlinks resolved) this layer made, and
    /// their ancestors: whiteouts in the same layer leave them alone.
    written: HashSet<PathBuf>,
    /// Directories whose metadata is set at the end.
    dirs: Vec<(PathBuf, Meta)>,
    stats: LayerStats,
}

impl Unpacker<'_> {
    fn unsafe_entry(&self, path: &Path, reason: impl Into<String>) -> ImageError {
        ImageError::UnsafeEntry {
            layer: self.layer.to_owned(),
            path: path.display().to_string(),
            reason: reason.into(),
        }
    }

    fn io(&self, what: &str, path: &Path) -> impl FnOnce(io::Error) -> ImageError + use<> {
        io_err(format!("layer {}: {what} {}", self.layer, path.display()))
    }

    fn entry<R: Read>(&mut self, mut entry: tar::Entry<'_, R>) -> Result<(), ImageError> {
        let raw_path = entry
            .path()
            .map_err(|e| ImageError::Layer {
                layer: self.layer.to_owned(),
                reason: format!("entry path: {e}"),
            })?
            .into_owned();
        let kind = entry.header().entry_type();
        if matches!(
            kind,
            tar::EntryType::XGlobalHeader
                | tar::EntryType::XHeader
                | tar::EntryType::GNULongName
                | tar::EntryType::GNULongLink
        ) {
            return Ok(());
        }
        let comps = clean(&raw_path).map_err(|r| self.unsafe_entry(&raw_path, r))?;
        let header = entry.header();
        let meta = Meta {
            mode: header.mode().unwrap_or(0o644) & 0o7777,
            uid: header
                .uid()
                .ok()
                .and_then(|u| u32::try_from(u).ok())
                .unwrap_or(0),
            gid: header
                .gid()
                .ok()
                .and_then(|g| u32::try_from(g).ok())
                .unwrap_or(0),
            mtime: header
                .mtime()
                .ok()
                .and_then(|t| i64::try_from(t).ok())
                .unwrap_or(0),
        };

        let Some((name, parent)) = comps.split_last() else {
            // The root itself (`./`): keep its metadata, if a directory.
            if kind.is_dir() {
                self.dirs.push((self.root.to_owned(), meta));
                return Ok(());
            }
            return Err(self.unsafe_entry(&raw_path, "the layer root is not a directory"));
        };

        if let Some(hidden) = name.to_str().and_then(|n| n.strip_prefix(WHITEOUT_PREFIX)) {
            // Whiteouts refer to what lower layers made: nothing to do when
            // the directory is not there.
            let Some(dir) = self.resolve_dir(parent, false, &raw_path)? else {
                return Ok(());
            };
            self.stats.whiteouts += 1;
            if name == OPAQUE_MARKER {
                return self.clear_lower(&dir);
            }
            if hidden.is_empty() || hidden == "." || hidden == ".." || hidden.contains('/') {
                return Err(self.unsafe_entry(&raw_path, "whiteout of no name"));
            }
            let rel = dir.join(hidden);
            if !self.written.contains(&rel) {
                remove_any(&self.root.join(&rel)).map_err(self.io("whiting out", &rel))?;
            }
            return Ok(());
        }

        let dir = self
            .resolve_dir(parent, true, &raw_path)?
            .expect("created when missing");
        let rel = dir.join(name);
        let full = self.root.join(&rel);
        match kind {
            tar::EntryType::Directory => {
                let existing = fs::symlink_metadata(&full);
                if !existing.as_ref().is_ok_and(|m| m.is_dir()) {
                    if existing.is_ok() {
                        remove_any(&full).map_err(self.io("replacing", &rel))?;
                    }
                    fs::create_dir(&full).map_err(self.io("creating directory", &rel))?;
                }
                self.dirs.push((full, meta));
            }
            tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::GNUSparse => {
                remove_any(&full).map_err(self.io("replacing", &rel))?;
                let mut file = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .custom_flags(libc::O_NOFOLLOW)
                    .open(&full)
                    .map_err(self.io("creating", &rel))?;
                io::copy(&mut entry, &mut file).map_err(self.io("writing", &rel))?;
                if self.chown {
                    std::os::unix::fs::fchown(&file, Some(meta.uid), Some(meta.gid))
                        .map_err(self.io("chown", &rel))?;
                }
                // After chown, which clears setuid and setgid.
                file.set_permissions(fs::Permissions::from_mode(meta.mode))
                    .map_err(self.io("chmod", &rel))?;
                drop(file);
                set_mtime(&full, meta.mtime).map_err(self.io("setting mtime of", &rel))?;
            }
            tar::EntryType::Symlink => {
                let target = entry
                    .link_name()
                    .map_err(|e| self.unsafe_entry(&raw_path, format!("link name: {e}")))?
                    .ok_or_else(|| self.unsafe_entry(&raw_path, "symlink without a target"))?
                    .into_owned();
                remove_any(&full).map_err(self.io("replacing", &rel))?;
                // The target is stored as it is: only our own path
                // resolution ever follows it, inside the root.
                std::os::unix::fs::symlink(&target, &full)
                    .map_err(self.io("creating symlink", &rel))?;
                self.set_meta(&full, &meta, true)?;
            }
            tar::EntryType::Link => {
                let target = entry
                    .link_name()
                    .map_err(|e| self.unsafe_entry(&raw_path, format!("link name: {e}")))?
                    .ok_or_else(|| self.unsafe_entry(&raw_path, "hard link without a target"))?
                    .into_owned();
                let target_comps = clean(&target).map_err(|r| {
                    self.unsafe_entry(&raw_path, format!("hard link target {target:?} {r}"))
                })?;
                let Some((target_name, target_parent)) = target_comps.split_last() else {
                    return Err(self.unsafe_entry(&raw_path, "hard link to the layer root"));
                };
                let target_dir = self
                    .resolve_dir(target_parent, false, &raw_path)?
                    .ok_or_else(|| {
                        self.unsafe_entry(&raw_path, format!("hard link target {target:?} missing"))
                    })?;
                let target_rel = target_dir.join(target_name);
                if target_rel == rel {
                    return Ok(());
                }
                let target_full = self.root.join(&target_rel);
                match fs::symlink_metadata(&target_full) {
                    Ok(m) if !m.is_dir() => {}
                    _ => {
                        return Err(self.unsafe_entry(
                            &raw_path,
                            format!("hard link target {target:?} is missing or a directory"),
                        ));
                    }
                }
                remove_any(&full).map_err(self.io("replacing", &rel))?;
                // linkat without AT_SYMLINK_FOLLOW: a symlink target is
                // linked itself, never followed.
                fs::hard_link(&target_full, &full).map_err(self.io("hard-linking", &rel))?;
            }
            tar::EntryType::Fifo => {
                remove_any(&full).map_err(self.io("replacing", &rel))?;
                let c = CString::new(full.as_os_str().as_bytes())
                    .map_err(|_| self.unsafe_entry(&raw_path, "NUL in path"))?;
                // SAFETY: `c` is a NUL-terminated path that outlives the call.
                if unsafe { libc::mkfifo(c.as_ptr(), 0o600) } != 0 {
                    return Err(self.io("mkfifo", &rel)(io::Error::last_os_error()));
                }
                self.set_meta(&full, &meta, false)?;
            }
            tar::EntryType::Char | tar::EntryType::Block => {
                tracing::debug!(layer = self.layer, path = %rel.display(), "skipping device node");
                self.stats.skipped_devices += 1;
                return Ok(());
            }
            other => {
                tracing::debug!(layer = self.layer, path = %rel.display(), kind = ?other, "skipping tar entry of unknown type");
                return Ok(());
            }
        }
        self.stats.entries += 1;
        self.mark_written(rel);
        Ok(())
    }

    /// Records `rel` and its ancestors as made by this layer.
    fn mark_written(&mut self, rel: PathBuf) {
        let mut path = Some(rel.as_path());
        while let Some(p) = path {
            if p.as_os_str().is_empty() || !self.written.insert(p.to_owned()) {
                break;
            }
            path = p.parent();
        }
    }

    /// Resolves the directory `comps` names inside the root, following
    /// symlinks as if the root were `/`; returns it relative to the root.
    /// Missing directories are made (0755, root-owned) when `create`, else
    /// `None` is returned.
    fn resolve_dir(
        &self,
        comps: &[OsString],
        create: bool,
        entry: &Path,
    ) -> Result<Option<PathBuf>, ImageError> {
        let mut resolved = PathBuf::new();
        let mut pending: Vec<OsString> = comps.iter().rev().cloned().collect();
        let mut hops = 0;
        while let Some(c) = pending.pop() {
            if c == ".." {
                resolved.pop();
                continue;
            }
            if c.is_empty() || c == "." {
                continue;
            }
            let candidate = resolved.join(&c);
            let full = self.root.join(&candidate);
            match fs::symlink_metadata(&full) {
                Ok(m) if m.is_dir() => resolved = candidate,
                Ok(m) if m.file_type().is_symlink() => {
                    hops += 1;
                    if hops > MAX_SYMLINK_HOPS {
                        return Err(self.unsafe_entry(entry, "too many levels of symlinks"));
                    }
                    let target =
                        fs::read_link(&full).map_err(self.io("reading symlink", &candidate))?;
                    if target.is_absolute() {
                        resolved = PathBuf::new();
                    }
                    for t in target.components().rev() {
                        match t {
                            Component::Normal(n) => pending.push(n.to_owned()),
                            Component::ParentDir => pending.push("..".into()),
                            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
                        }
                    }
                }
                Ok(_) => {
                    return Err(self.unsafe_entry(
                        entry,
                        format!("{} is not a directory", candidate.display()),
                    ));
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    if !create {
                        return Ok(None);
                    }
                    fs::create_dir(&full).map_err(self.io("creating directory", &candidate))?;
                    resolved = candidate;
                }
                Err(e) => return Err(self.io("inspecting", &candidate)(e)),
            }
        }
        Ok(Some(resolved))
    }

    /// Opaque directory: removes what lower layers put in `dir` (relative,
    /// resolved), keeping what this layer wrote.
    fn clear_lower(&self, dir: &Path) -> Result<(), ImageError> {
        let full = self.root.join(dir);
        let children = fs::read_dir(&full).map_err(self.io("listing", dir))?;
        for child in children {
            let child = child.map_err(self.io("listing", dir))?;
            let rel = dir.join(child.file_name());
            if self.written.contains(&rel) {
                let is_dir = child.file_type().is_ok_and(|t| t.is_dir());
                if is_dir {
                    self.clear_lower(&rel)?;
                }
            } else {
                remove_any(&child.path()).map_err(self.io("clearing opaque", &rel))?;
            }
        }
        Ok(())
    }

    /// Owner, mode and mtime of a made path (never following a symlink).
    fn set_meta(&self, full: &Path, meta: &Meta, symlink: bool) -> Result<(), ImageError> {
        let rel = full.strip_prefix(self.root).unwrap_or(full);
        if self.chown {
            std::os::unix::fs::lchown(full, Some(meta.uid), Some(meta.gid))
                .map_err(self.io("chown", rel))?;
        }
        if !symlink {
            // `full` is a directory or FIFO we made (not a symlink): chmod
            // cannot be redirected.
            fs::set_permissions(full, fs::Permissions::from_mode(meta.mode))
                .map_err(self.io("chmod", rel))?;
        }
        set_mtime(full, meta.mtime).map_err(self.io("setting mtime of", rel))
    }
}

/// The normal components of an entry path: a leading `/` and `.`
/// components are dropped; a `..` component is refused.
fn clean(path: &Path) -> Result<Vec<OsString>, &'static str> {
    let mut out = Vec::new();
    for c in path.components() {
        match c {
            Component::Normal(n) => out.push(n.to_owned()),
            Component::RootDir | Component::CurDir => {}
            Component::ParentDir => return Err("has a `..` component"),
            Component::Prefix(_) => return Err("has a path prefix"),
        }
    }
    Ok(out)
}

/// Removes whatever is at `path` (a directory with its contents; a symlink
/// itself); nothing there is fine.
fn remove_any(path: &Path) -> io::Result<()> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Sets atime and mtime of `path` itself (not a symlink's target).
fn set_mtime(path: &Path, mtime: i64) -> io::Result<()> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in path"))?;
    let t = libc::timespec {
        tv_sec: mtime as libc::time_t,
        tv_nsec: 0,
    };
    let times = [t, t];
    // SAFETY: `c` and `times` (two timespecs) outlive the call.
    let rc = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use super::*;

    const SHA: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn references_parse_with_docker_hub_defaults() {
        let r = ImageRef::parse("127.0.0.1:5000/debian:bookworm").unwrap();
        assert_eq!(
            (r.registry(), r.repository(), r.tag(), r.digest()),
            ("127.0.0.1:5000", "debian", Some("bookworm"), None)
        );
        let r = ImageRef::parse(&format!("registry.example.com/a/b@{SHA}")).unwrap();
        assert_eq!(
            (r.registry(), r.repository(), r.tag(), r.digest()),
            ("registry.example.com", "a/b", None, Some(SHA))
        );
        let r = ImageRef::parse("debian:bookworm").unwrap();
        assert_eq!(
            (r.registry(), r.repository(), r.tag()),
            ("docker.io", "library/debian", Some("bookworm"))
        );
        let r = ImageRef::parse("debian").unwrap();
        assert_eq!(
            (r.repository(), r.tag()),
            ("library/debian", Some("latest"))
        );
        let r = ImageRef::parse("someone/tool:1").unwrap();
        assert_eq!(
            (r.registry(), r.repository()),
            ("docker.io", "someone/tool")
        );
        let r = ImageRef::parse("localhost/tool").unwrap();
        assert_eq!((r.registry(), r.repository()), ("localhost", "tool"));
        let r = ImageRef::parse("host:5000/tool").unwrap();
        assert_eq!((r.registry(), r.repository()), ("host:5000", "tool"));
        assert_eq!(r.to_string(), "host:5000/tool:latest");
        let r: ImageRef = format!("x.io/y:t@{SHA}").parse().unwrap();
        assert_eq!((r.tag(), r.digest()), (Some("t"), Some(SHA)));

        for bad in ["", "Debian", "a b", "x.io/y@sha256:abc", "x.io/y:", "/x"] {
            let err = ImageRef::parse(bad).unwrap_err();
            assert!(
                matches!(&err, ImageError::InvalidReference { reference, .. } if reference == bad),
                "{bad:?}: {err}"
            );
        }
    }

    /// A tar under construction; paths are written raw, so tests can make
    /// what `tar::Builder` itself refuses (`..`, absolute paths).
    struct Tar(tar::Builder<Vec<u8>>);

    impl Tar {
        fn new() -> Self {
            Tar(tar::Builder::new(Vec::new()))
        }

        fn header(kind: tar::EntryType, path: &str, mode: u32) -> tar::Header {
            let mut h = tar::Header::new_gnu();
            let name = &mut h.as_old_mut().name;
            assert!(path.len() < name.len());
            name[..path.len()].copy_from_slice(path.as_bytes());
            h.set_entry_type(kind);
            h.set_mode(mode);
            h.set_mtime(1_700_000_000);
            h.set_size(0);
            h
        }

        fn add(&mut self, mut h: tar::Header, data: &[u8]) -> &mut Self {
            h.set_size(data.len() as u64);
            h.set_cksum();
            self.0.append(&h, data).unwrap();
            self
        }

        fn dir(&mut self, path: &str, mode: u32) -> &mut Self {
            self.add(Self::header(tar::EntryType::Directory, path, mode), b"")
        }

        fn file(&mut self, path: &str, data: &str) -> &mut Self {
            self.file_owned(path, data, 0o644, 0, 0)
        }

        fn file_owned(
            &mut self,
            path: &str,
            data: &str,
            mode: u32,
            uid: u64,
            gid: u64,
        ) -> &mut Self {
            let mut h = Self::header(tar::EntryType::Regular, path, mode);
            h.set_uid(uid);
            h.set_gid(gid);
            self.add(h, data.as_bytes())
        }

        fn link(&mut self, kind: tar::EntryType, path: &str, target: &str) -> &mut Self {
            let mut h = Self::header(kind, path, 0o777);
            let name = &mut h.as_old_mut().linkname;
            name[..target.len()].copy_from_slice(target.as_bytes());
            self.add(h, b"")
        }

        fn symlink(&mut self, path: &str, target: &str) -> &mut Self {
            self.link(tar::EntryType::Symlink, path, target)
        }

        fn hardlink(&mut self, path: &str, target: &str) -> &mut Self {
            self.link(tar::EntryType::Link, path, target)
        }

        fn bytes(&mut self) -> Vec<u8> {
            let b = std::mem::replace(&mut self.0, tar::Builder::new(Vec::new()));
            b.into_inner().unwrap()
        }
    }

    fn root() -> (tempfile::TempDir, PathBuf) {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("root");
        fs::create_dir(&root).unwrap();
        (tmp, root)
    }

    fn unpack(root: &Path, tar: &[u8]) -> Result<LayerStats, ImageError> {
        unpack_layer(root, "test", tar, unsafe { libc::geteuid() } == 0, &mut {
            u64::MAX
        })
    }

    fn read(root: &Path, p: &str) -> String {
        fs::read_to_string(root.join(p)).unwrap()
    }

    fn exists(root: &Path, p: &str) -> bool {
        fs::symlink_metadata(root.join(p)).is_ok()
    }

    #[test]
    fn layers_apply_whiteouts_and_opaque_directories_in_order() {
        let (_tmp, root) = root();
        let lower = Tar::new()
            .dir("./", 0o755)
            .dir("etc/", 0o755)
            .file_owned("etc/keep", "kept", 0o640, 1000, 1001)
            .file("etc/gone", "deleted above")
            .dir("etc/gonedir/", 0o755)
            .file("etc/gonedir/inner", "x")
            .dir("opq/", 0o750)
            .file("opq/lower", "hidden above")
            .dir("opq/sub/", 0o755)
            .file("opq/sub/lower2", "hidden above too")
            .file_owned("usr/bin/tool", "#!/bin/sh\n", 0o4755, 0, 0)
            .symlink("bin", "usr/bin")
            .symlink("etc/keep-link", "/etc/keep")
            .hardlink("etc/keep-hard", "etc/keep")
            .file("replaced-by-dir", "file")
            .dir("replaced-by-file/", 0o755)
            .file("replaced-by-file/x", "x")
            .bytes();
        let stats = unpack(&root, &lower).unwrap();
        assert_eq!(stats.whiteouts, 0);
        assert_eq!(read(&root, "bin/tool"), "#!/bin/sh\n");

        let upper = Tar::new()
            .file("etc/.wh.gone", "")
            .file("etc/.wh.gonedir", "")
            // Written before the opaque marker: kept.
            .file("opq/sub/new", "upper")
            .file("opq/.wh..wh..opq", "")
            .file("opq/after", "upper too")
            // Through the `bin` symlink: lands in usr/bin.
            .file("bin/added", "via symlink")
            .dir("replaced-by-dir/", 0o700)
            .file("replaced-by-file", "now a file")
            // A whiteout of something missing is no error.
            .file("nothing/.wh.here", "")
            .file(".wh.never-there", "")
            .bytes();
        let stats = unpack(&root, &upper).unwrap();
        assert_eq!(stats.whiteouts, 4, "gone, gonedir, opq, never-there");

        assert_eq!(read(&root, "etc/keep"), "kept");
        assert!(!exists(&root, "etc/gone"));
        assert!(!exists(&root, "etc/gonedir"));
        assert!(!exists(&root, "opq/lower"));
        assert!(!exists(&root, "opq/sub/lower2"));
        assert_eq!(read(&root, "opq/sub/new"), "upper");
        assert_eq!(read(&root, "opq/after"), "upper too");
        assert!(!exists(&root, "opq/.wh..wh..opq"));
        assert!(!exists(&root, "etc/.wh.gone"));
        assert!(!exists(&root, "nothing"), "a whiteout makes no directories");
        assert_eq!(read(&root, "usr/bin/added"), "via symlink");
        assert!(fs::symlink_metadata(root.join("bin")).unwrap().is_symlink());
        assert!(root.join("replaced-by-dir").is_dir());
        assert_eq!(read(&root, "replaced-by-file"), "now a file");

        let keep = fs::metadata(root.join("etc/keep")).unwrap();
        assert_eq!(keep.mode() & 0o7777, 0o640);
        assert_eq!(keep.mtime(), 1_700_000_000);
        assert_eq!(keep.nlink(), 2, "etc/keep-hard is a hard link");
        assert_eq!(
            fs::read_link(root.join("etc/keep-link")).unwrap(),
            Path::new("/etc/keep")
        );
        let tool = fs::metadata(root.join("usr/bin/tool")).unwrap();
        assert_eq!(tool.mode() & 0o7777, 0o4755, "setuid kept");
        assert_eq!(
            fs::metadata(root.join("opq")).unwrap().mode() & 0o7777,
            0o750
        );
        assert_eq!(
            fs::metadata(root.join("replaced-by-dir")).unwrap().mode() & 0o7777,
            0o700
        );
        if unsafe { libc::geteuid() } == 0 {
            assert_eq!((keep.uid(), keep.gid()), (1000, 1001));
        }
    }

    #[test]
    fn entries_cannot_escape_the_root() {
        let (tmp, root) = root();
        let outside = tmp.path().join("outside");
        fs::create_dir(&outside).unwrap();
        fs::write(outside.join("secret"), "host file").unwrap();
        let outside_abs = outside.to_str().unwrap();

        // `..` in an entry's own path is refused.
        for bad in ["../evil", "a/../../evil", "./../evil"] {
            let err = unpack(&root, &Tar::new().file(bad, "x").bytes()).unwrap_err();
            assert!(
                matches!(&err, ImageError::UnsafeEntry { reason, .. } if reason.contains("..")),
                "{bad}: {err}"
            );
        }
        assert!(!tmp.path().join("evil").exists());

        // Absolute paths are relative to the root.
        unpack(&root, &Tar::new().file("/abs/file", "in root").bytes()).unwrap();
        assert_eq!(read(&root, "abs/file"), "in root");

        // Symlinks in parents resolve inside the root: an absolute target
        // is the root's, `..` stops at the root.
        let layer = Tar::new()
            .symlink("out", outside_abs)
            .file("out/planted", "x")
            .symlink("up", "../../../..")
            .file("up/top", "y")
            .symlink("deep/up2", "../../../../")
            .file("deep/up2/top2", "z")
            .bytes();
        unpack(&root, &layer).unwrap();
        assert_eq!(read(&root, &format!("{}/planted", &outside_abs[1..])), "x");
        assert_eq!(read(&root, "top"), "y");
        assert_eq!(read(&root, "top2"), "z");
        assert_eq!(
            fs::read_dir(&outside).unwrap().count(),
            1,
            "nothing written outside"
        );

        // An entry at a symlink's path replaces the symlink, never writes
        // through it.
        let layer = Tar::new()
            .symlink("leak", &format!("{outside_abs}/secret"))
            .file("leak", "replaced")
            .bytes();
        unpack(&root, &layer).unwrap();
        assert_eq!(read(&root, "leak"), "replaced");
        assert_eq!(
            fs::read_to_string(outside.join("secret")).unwrap(),
            "host file"
        );

        // Hard links: `..` refused; absolute targets are the root's (there
        // is no <root>/<outside>/secret, so no link to the host file).
        let err = unpack(
            &root,
            &Tar::new().hardlink("h", "../outside/secret").bytes(),
        )
        .unwrap_err();
        assert!(matches!(err, ImageError::UnsafeEntry { .. }), "{err}");
        let err = unpack(
            &root,
            &Tar::new()
                .hardlink("h", &format!("{outside_abs}/secret"))
                .bytes(),
        )
        .unwrap_err();
        assert!(
            matches!(&err, ImageError::UnsafeEntry { reason, .. } if reason.contains("missing")),
            "{err}"
        );
        // ...nor through a symlinked parent.
        let err = unpack(
            &root,
            &Tar::new()
                .symlink("hostdir", outside_abs)
                .hardlink("h2", "hostdir/secret")
                .bytes(),
        )
        .unwrap_err();
        assert!(matches!(err, ImageError::UnsafeEntry { .. }), "{err}");
        assert_eq!(fs::metadata(outside.join("secret")).unwrap().nlink(), 1);

        // Whiteouts through a symlink delete inside the root only.
        let layer = Tar::new()
            .symlink("wh", outside_abs)
            .file("wh/.wh.secret", "")
            .bytes();
        unpack(&root, &layer).unwrap();
        assert!(outside.join("secret").exists());

        // Symlink loops end in an error, not a hang.
        let err = unpack(
            &root,
            &Tar::new()
                .symlink("loop1", "loop2")
                .symlink("loop2", "loop1")
                .file("loop1/x", "")
                .bytes(),
        )
        .unwrap_err();
        assert!(
            matches!(&err, ImageError::UnsafeEntry { reason, .. } if reason.contains("symlinks")),
            "{err}"
        );
    }

    #[test]
    fn compressed_layers_are_told_apart_by_magic() {
        let tar = Tar::new().file("a", "same").bytes();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        io::Write::write_all(&mut gz, &tar).unwrap();
        let gz = gz.finish().unwrap();
        let zst = zstd::encode_all(&tar[..], 3).unwrap();
        for layer in [tar.clone(), gz, zst] {
            let (_tmp, root) = root();
            unpack(&root, &layer).unwrap();
            assert_eq!(read(&root, "a"), "same");
        }
        let (_tmp, root) = root();
        let err = unpack(&root, b"not a tar at all, not even close; and some padding").unwrap_err();
        assert!(matches!(err, ImageError::Layer { .. }), "{err}");
    }

    #[test]
    fn a_layer_that_inflates_past_the_budget_is_refused() {
        let big = "0".repeat(1 << 20);
        let tar = Tar::new().file("big", &big).bytes();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        io::Write::write_all(&mut gz, &tar).unwrap();
        let gz = gz.finish().unwrap();
        assert!(gz.len() < 16 << 10, "{}", gz.len());
        let (_tmp, small) = root();
        let mut budget = 256 << 10;
        let err = unpack_layer(&small, "bomb", &gz[..], false, &mut budget).unwrap_err();
        assert!(err.to_string().contains(UNPACKED_LIMIT), "{err}");
        let (_tmp2, large) = root();
        let mut budget = 4 << 20;
        unpack_layer(&large, "fits", &gz[..], false, &mut budget).unwrap();
        assert!(budget < (4 << 20) - (1 << 20), "{budget}");
    }

    #[test]
    fn devices_are_skipped_and_fifos_made() {
        let (_tmp, root) = root();
        let layer = Tar::new()
            .add(Tar::header(tar::EntryType::Char, "dev/null", 0o666), b"")
            .add(Tar::header(tar::EntryType::Fifo, "run/pipe", 0o620), b"")
            .bytes();
        let stats = unpack(&root, &layer).unwrap();
        assert_eq!(stats.skipped_devices, 1);
        assert!(!exists(&root, "dev/null"));
        let pipe = fs::symlink_metadata(root.join("run/pipe")).unwrap();
        assert!(std::os::unix::fs::FileTypeExt::is_fifo(&pipe.file_type()));
        assert_eq!(pipe.mode() & 0o7777, 0o620);
    }

    #[test]
    fn config_fields_come_from_the_config_blob() {
        let blob = br#"{"architecture":"amd64","os":"linux","config":{
            "Env":["PATH=/usr/bin:/bin","EMPTY=","BARE","EQ=a=b"],
            "WorkingDir":"/srv","User":"1000:1000",
            "Cmd":["python3","-m","http.server"],"Entrypoint":null},
            "rootfs":{"type":"layers","diff_ids":[]}}"#;
        let c = parse_config(blob, "sha256:m".into(), "sha256:c").unwrap();
        assert_eq!(
            c.env,
            [
                ("PATH", "/usr/bin:/bin"),
                ("EMPTY", ""),
                ("BARE", ""),
                ("EQ", "a=b")
            ]
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
        );
        assert_eq!(c.workdir.as_deref(), Some("/srv"));
        assert_eq!(c.user.as_deref(), Some("1000:1000"));
        assert_eq!(c.cmd, ["python3", "-m", "http.server"]);
        assert!(c.entrypoint.is_empty());
        assert_eq!(
            (c.digest.as_str(), c.config_digest.as_str()),
            ("sha256:m", "sha256:c")
        );

        let c = parse_config(
            br#"{"config":{"WorkingDir":"","User":""}}"#,
            "d".into(),
            "c",
        )
        .unwrap();
        assert_eq!((c.workdir, c.user), (None, None));
        assert!(matches!(
            parse_config(b"{", "d".into(), "c"),
            Err(ImageError::Config { .. })
        ));
    }
}
