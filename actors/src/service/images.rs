//! Image roots: the root trees of images pulled for template builds
//! (`FROM 127.0.0.1:5000/debian:bookworm`).
//!
//! A pulled image becomes a hidden node template named `img-<16 hex of
//! its config digest>`: its layers unpacked (`crate::build::image`), with
//! what the runtime needs added — envd, the gvisor init, `tini` when the
//! image has none, sudo's daemon and the E2B user `user` (uid 1000, in
//! the image's passwd/group files, edited as text: nothing of the image
//! runs on the host). It is kept in `<snapshots>/images/<hex>/rootfs` and
//! published to the object store as `image-roots/<hex>`, from where any
//! node fetches it when it first creates a sandbox of a template built on
//! it. A node re-registers the roots it keeps when it starts.

use std::path::{Path, PathBuf};

use super::*;
use crate::build::image::{self, ImageConfig, ImageRef, PullOptions};
use crate::objects::{KnownChunks, ObjectsError, SnapshotMetadata};
use crate::runtime::Limits;

const IMAGE_ROOTS: &str = "image-roots";

/// What of the base template's tree an image root gets (path, mode); the
/// ones marked `true` only where the image lacks the path.
const GUEST_FILES: &[(&str, u32, bool)] = &[
    ("usr/local/bin/envd", 0o755, false),
    ("usr/local/sbin/sandmesh-gvisor-init", 0o755, false),
    ("usr/local/sbin/sandmesh-sudod", 0o755, false),
    ("usr/local/bin/sudo", 0o755, false),
    ("usr/bin/tini", 0o755, true),
];

/// The E2B user every sandbox has.
const USER_UID: u32 = 1000;

/// Where this node keeps image roots.
pub(super) fn images_dir(snapshots_dir: &Path) -> PathBuf {
    snapshots_dir.join("images")
}

/// The template name of the image root kept in `<images>/<hex>`.
fn template_name(hex: &str) -> String {
    format!("img-{hex}")
}

/// The entry of an image root at `dir/rootfs`.
fn entry(hex: &str, dir: &Path) -> Result<TemplateEntry, SandboxError> {
    let id = TemplateId::new(template_name(hex)).map_err(RuntimeError::from)?;
    Ok(TemplateEntry {
        template: Template {
            id,
            rootfs_dir: dir.join("rootfs"),
            rootfs_image: None,
            snapshot: None,
        },
        limits: Limits::default(),
        build_id: crate::template_cache::new_uuid()?,
        prepared_at_ms: now_ms(),
        prepare_ms: 0,
        spawn_count: 0,
        last_spawned_at_ms: None,
        hidden: true,
    })
}

/// The image roots this node keeps (`Sandboxes::start` serves them).
pub(super) fn kept(snapshots_dir: &Path) -> Vec<TemplateEntry> {
    let Ok(dirs) = std::fs::read_dir(images_dir(snapshots_dir)) else {
        return Vec::new();
    };
    dirs.flatten()
        .filter_map(|d| {
            let hex = d.file_name().to_str()?.to_owned();
            let ok = hex.len() == 16 && hex.bytes().all(|b| b.is_ascii_hexdigit());
            (ok && d.path().join("rootfs").is_dir())
                .then(|| entry(&hex, &d.path()).ok())
                .flatten()
        })
        .collect()
}

/// Whether `host[:port]` is this machine's loopback (plain HTTP is used
/// for a registry there; anywhere else, HTTPS).
fn is_loopback(registry: &str) -> bool {
    let host = registry
        .rsplit_once(':')
        .filter(|(h, p)| !h.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
        .map_or(registry, |(h, _)| h);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Add what the runtime needs to the image tree at `root` (see the module
/// documentation), taking the files from the base template's `base`.
fn add_guest(root: &Path, base: &Path) -> std::io::Result<Vec<String>> {
    use std::os::unix::fs::{PermissionsExt, chown};
    let mut notes = Vec::new();
    for (path, mode, only_if_missing) in GUEST_FILES {
        let to = root.join(path);
        if *only_if_missing && (to.exists() || to.is_symlink()) {
            continue;
        }
        if let Some(parent) = to.parent() {
            std::fs::create_dir_all(parent)?;
        }
        // Never write through a link the image put there.
        if to.is_symlink() {
            std::fs::remove_file(&to)?;
        }
        std::fs::copy(base.join(path), &to)?;
        std::fs::set_permissions(&to, std::fs::Permissions::from_mode(*mode))?;
        chown(&to, Some(0), Some(0))?;
    }
    let etc = root.join("etc");
    std::fs::create_dir_all(&etc)?;
    let read = |name: &str| std::fs::read_to_string(etc.join(name)).unwrap_or_default();
    let passwd = read("passwd");
    let has_user = passwd.lines().any(|l| {
        let f: Vec<&str> = l.split(':').collect();
        f.first() == Some(&"user") || f.get(2) == Some(&"1000")
    });
    if !has_user {
        let shell = if root.join("bin/bash").exists() || root.join("usr/bin/bash").exists() {
            "/bin/bash"
        } else {
            "/bin/sh"
        };
        append(
            &etc.join("passwd"),
            &format!("user:x:{USER_UID}:{USER_UID}::/home/user:{shell}\n"),
        )?;
        let group = read("group");
        if !group.lines().any(|l| l.starts_with("user:")) {
            append(&etc.join("group"), &format!("user:x:{USER_UID}:\n"))?;
        }
        if etc.join("shadow").exists() {
            append(&etc.join("shadow"), "user:!:19000:0:99999:7:::\n")?;
        }
        if etc.join("sudoers.d").is_dir() {
            let file = etc.join("sudoers.d/user");
            std::fs::write(&file, "user ALL=(ALL:ALL) NOPASSWD: ALL\n")?;
            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o440))?;
        }
        notes.push(format!("added the user `user` (uid {USER_UID})"));
    }
    let home = root.join("home/user");
    if !home.exists() {
        std::fs::create_dir_all(&home)?;
        chown(&home, Some(USER_UID), Some(USER_UID))?;
    }
    Ok(notes)
}

fn append(file: &Path, line: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut existing = std::fs::read(file).unwrap_or_default();
    if !existing.is_empty() && !existing.ends_with(b"\n") {
        existing.push(b'\n');
    }
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .open(file)?;
    f.write_all(&existing)?;
    f.write_all(line.as_bytes())
}

/// A pulled image, ready to build on.
pub(super) struct PulledImage {
    pub entry: TemplateEntry,
    pub config: ImageConfig,
    pub notes: Vec<String>,
}

impl Sandboxes {
    /// Serve `entry` (an image root) from now on.
    async fn serve_image_root(&self, entry: TemplateEntry) -> Result<TemplateEntry, SandboxError> {
        let refs = self.refs()?;
        let e = entry.clone();
        refs.templates
            .call(
                |reply| TemplateMsg::Add {
                    entry: Box::new(e),
                    reply,
                },
                None,
            )
            .await
            .map_err(|e| SandboxError::Actor(format!("the template cache: {e}")))?;
        Ok(entry)
    }

    /// Pull `image` from its registry and make it an image root of this
    /// node, published to the object store.
    pub(super) async fn pull_image(
        &self,
        image: &str,
        auth: Option<(String, String)>,
    ) -> Result<PulledImage, SandboxError> {
        let reference =
            ImageRef::parse(image).map_err(|e| SandboxError::BadRequest(e.to_string()))?;
        let base = self.inner.shared.template("base").await.map_err(|_| {
            SandboxError::BadRequest(
                "building on an image needs the node's `base` template (envd and the init come from it)".into(),
            )
        })?;
        let images = images_dir(&self.inner.shared.snapshots_dir);
        std::fs::create_dir_all(&images)
            .map_err(|e| SandboxError::Io(format!("creating {}: {e}", images.display())))?;
        let work = images.join(format!(".pull-{}", hex::encode(random_bytes(8)?)));
        std::fs::create_dir_all(&work)
            .map_err(|e| SandboxError::Io(format!("creating {}: {e}", work.display())))?;
        let opts = PullOptions {
            plain_http: is_loopback(reference.registry()),
            // An image root takes the node's disk as a build's files do.
            max_unpacked_bytes: self.inner.config.builds.max_disk,
            ..Default::default()
        };
        let pulled = image::pull(&reference, auth, &work.join("rootfs"), &opts).await;
        let config = match pulled {
            Ok(c) => c,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&work);
                return Err(match e {
                    image::ImageError::NotFound { .. } => SandboxError::NotFound(e.to_string()),
                    image::ImageError::InvalidReference { .. }
                    | image::ImageError::TooLarge { .. } => SandboxError::BadRequest(e.to_string()),
                    _ => SandboxError::BadRequest(format!("pulling {image}: {e}")),
                });
            }
        };
        let hex: String = config
            .config_digest
            .trim_start_matches("sha256:")
            .chars()
            .take(16)
            .collect();
        let root = work.join("rootfs");
        let base_root = base.template.rootfs_dir.clone();
        let notes = tokio::task::spawn_blocking(move || add_guest(&root, &base_root))
            .await
            .map_err(|e| SandboxError::Io(e.to_string()))?
            .map_err(|e| SandboxError::Io(format!("adding envd to the image: {e}")))?;
        let dir = images.join(&hex);
        if dir.join("rootfs").is_dir() {
            // Pulled before: keep the root that sandboxes may run over.
            let _ = std::fs::remove_dir_all(&work);
        } else if let Err(e) = std::fs::rename(&work, &dir) {
            let _ = std::fs::remove_dir_all(&work);
            return Err(SandboxError::Io(format!(
                "keeping the image in {}: {e}",
                dir.display()
            )));
        }
        let entry = self.serve_image_root(entry(&hex, &dir)?).await?;
        self.publish_image_root(&hex, &dir, image).await?;
        Ok(PulledImage {
            entry,
            config,
            notes,
        })
    }

    async fn publish_image_root(
        &self,
        hex: &str,
        dir: &Path,
        image: &str,
    ) -> Result<(), SandboxError> {
        let Some(objects) = self.inner.shared.objects.clone() else {
            return Ok(());
        };
        let name = format!("{IMAGE_ROOTS}/{hex}");
        match objects.manifest(&name).await {
            Ok(_) => return Ok(()),
            Err(ObjectsError::NotFound { .. }) => {}
            Err(e) => {
                return Err(SandboxError::ObjectStore(format!(
                    "the object store ({}): {e}",
                    objects.describe()
                )));
            }
        }
        let metadata = SnapshotMetadata {
            kind: "image-root".into(),
            template_id: Some(template_name(hex)),
            runtime: None,
            sandbox_id: None,
            extra: serde_json::json!({ "image": image }),
        };
        objects
            .put_dir(&dir.join("rootfs"), &name, metadata, &KnownChunks::new())
            .await
            .map_err(|e| {
                SandboxError::ObjectStore(format!(
                    "publishing the image root to the object store ({}): {e}",
                    objects.describe()
                ))
            })?;
        Ok(())
    }

    /// Serve image root `name` (`img-<hex>`), fetched from the object store
    /// when this node does not keep it; `Ok(None)` when `name` is no image
    /// root's.
    pub(super) async fn ensure_image_root(
        &self,
        name: &str,
    ) -> Result<Option<TemplateEntry>, SandboxError> {
        let Some(hex) = name
            .strip_prefix("img-")
            .filter(|h| h.len() == 16 && h.bytes().all(|b| b.is_ascii_hexdigit()))
        else {
            return Ok(None);
        };
        if let Ok(e) = self.inner.shared.template(name).await {
            return Ok(Some(e));
        }
        let images = images_dir(&self.inner.shared.snapshots_dir);
        let dir = images.join(hex);
        if !dir.join("rootfs").is_dir() {
            let objects = self.objects_for_images()?;
            std::fs::create_dir_all(&images)
                .map_err(|e| SandboxError::Io(format!("creating {}: {e}", images.display())))?;
            let _one = self.inner.snapshot_cache.lock().await;
            if !dir.join("rootfs").is_dir() {
                let work = images.join(format!(".fetch-{}", hex::encode(random_bytes(8)?)));
                let got = objects
                    .get_dir(&format!("{IMAGE_ROOTS}/{hex}"), &work.join("rootfs"), None)
                    .await;
                if let Err(e) = got {
                    let _ = std::fs::remove_dir_all(&work);
                    return Err(SandboxError::ObjectStore(format!(
                        "image root {hex} in the object store ({}): {e}",
                        objects.describe()
                    )));
                }
                if let Err(e) = std::fs::rename(&work, &dir) {
                    let _ = std::fs::remove_dir_all(&work);
                    return Err(SandboxError::Io(format!("keeping {}: {e}", dir.display())));
                }
            }
        }
        Ok(Some(self.serve_image_root(entry(hex, &dir)?).await?))
    }

    fn objects_for_images(&self) -> Result<crate::objects::SnapshotStore, SandboxError> {
        self.inner
            .shared
            .objects
            .clone()
            .ok_or_else(|| SandboxError::NotImplemented("image roots need an object store".into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_registries_are_spoken_to_in_plain_http() {
        assert!(is_loopback("127.0.0.1:5000"));
        assert!(is_loopback("localhost:5000"));
        assert!(is_loopback("[::1]:5000"));
        assert!(!is_loopback("registry.example.com"));
        assert!(!is_loopback("10.0.0.1:5000"));
        assert!(!is_loopback("docker.io"));
    }

    #[test]
    fn the_guest_is_added_without_running_anything_of_the_image() {
        let tmp = tempfile::tempdir().unwrap();
        let base = tmp.path().join("base");
        for (path, ..) in GUEST_FILES {
            let p = base.join(path);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(&p, format!("base {path}")).unwrap();
        }
        let root = tmp.path().join("image");
        std::fs::create_dir_all(root.join("etc/sudoers.d")).unwrap();
        std::fs::create_dir_all(root.join("usr/bin")).unwrap();
        std::fs::write(root.join("usr/bin/tini"), "the image's own").unwrap();
        std::fs::write(root.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh").unwrap();
        std::fs::write(root.join("etc/group"), "root:x:0:\n").unwrap();
        let notes = add_guest(&root, &base).unwrap();
        assert_eq!(notes.len(), 1);
        let passwd = std::fs::read_to_string(root.join("etc/passwd")).unwrap();
        assert_eq!(
            passwd,
            "root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000::/home/user:/bin/sh\n"
        );
        assert!(
            std::fs::read_to_string(root.join("etc/group"))
                .unwrap()
                .ends_with("user:x:1000:\n")
        );
        assert!(root.join("etc/sudoers.d/user").is_file());
        assert!(root.join("home/user").is_dir());
        assert_eq!(
            std::fs::read_to_string(root.join("usr/local/bin/envd")).unwrap(),
            "base usr/local/bin/envd"
        );
        // The image's tini stays.
        assert_eq!(
            std::fs::read_to_string(root.join("usr/bin/tini")).unwrap(),
            "the image's own"
        );
        // Twice changes nothing more.
        assert!(add_guest(&root, &base).unwrap().is_empty());
    }
}
