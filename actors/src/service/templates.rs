//! Template snapshots in the object store.
//!
//! A node prepares each template by booting it and taking a snapshot
//! (`Runtime::prepare_template`). That snapshot is published to the
//! object store as `templates/<template>/<fingerprint>`, so that:
//! - a node that starts later with the same template fetches it instead of
//!   booting it (`fetch`), and
//! - pauses and user snapshots deduplicate against it: what a sandbox did
//!   not change of its booted template is never sent again.
//!
//! The fingerprint names what a template snapshot restores with: the
//! runtime's engine (`Runtime::engine`), the limits, and the build id of
//! the template's root (`etc/sandmesh-build-id`, written by whoever built
//! it — `cargo xtask guest` writes a random one per build). Two roots
//! built apart never share an id, so a snapshot is only ever restored
//! over the very root it was taken with. A root without an id is this
//! node's alone: its snapshot is published under the node's name, for
//! deduplication only.
//!
//! Publishing runs in the background at idle priority (`StoreOptions::
//! idle`): a microVM template's memory file is hundreds of MiB of which a
//! node under load must not pay a second.

use std::path::Path;
use std::sync::Arc;

use sha2::{Digest, Sha256};

use crate::objects::{KnownChunks, ObjectsError, SnapshotMetadata, SnapshotStore};
use crate::runtime::{Limits, Runtime, Snapshot, Template};
use crate::sandbox::Shared;

/// Where template snapshots live in the object store.
const TEMPLATES: &str = "templates";

/// The file of a template's root that names its build.
const BUILD_ID_FILE: &str = "etc/sandmesh-build-id";

/// The object name of `template`'s snapshot made with `limits` by
/// `runtime` on node `node_id`.
pub(super) fn object_name(
    runtime: &dyn Runtime,
    template: &Template,
    limits: Limits,
    node_id: &str,
) -> String {
    let build = build_id(&template.rootfs_dir).unwrap_or_else(|| format!("node {node_id}"));
    let mut h = Sha256::new();
    for part in [
        runtime.engine(),
        build,
        limits.vcpus.to_string(),
        limits.memory_mib.to_string(),
    ] {
        h.update(part.as_bytes());
        h.update([0]);
    }
    let fingerprint = hex::encode(&h.finalize()[..16]);
    format!("{TEMPLATES}/{}/{fingerprint}", template.id)
}

/// The build id recorded in the root tree `rootfs`, if it has a sound one.
pub(super) fn build_id(rootfs: &Path) -> Option<String> {
    let text = std::fs::read_to_string(rootfs.join(BUILD_ID_FILE)).ok()?;
    let id = text.trim();
    (!id.is_empty()
        && id.len() <= 128
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'))
    .then(|| id.to_owned())
}

/// `template` with the snapshot `name` fetched from the store and adopted
/// by the runtime; `None` (logged) when the
/// store has none or it does not restore here — the caller prepares the
/// template itself.
pub(super) async fn fetch(
    objects: &SnapshotStore,
    runtime: &dyn Runtime,
    template: &Template,
    name: &str,
    scratch: &Path,
) -> Option<Template> {
    let dir = scratch.join(format!(".template-{}-{}", template.id, std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let started = std::time::Instant::now();
    match objects.get_dir(name, &dir, None).await {
        Ok(_) => {}
        Err(ObjectsError::NotFound { .. }) => return None,
        Err(e) => {
            tracing::warn!(template = %template.id, "fetching its snapshot {name}: {e}; preparing it here");
            return None;
        }
    }
    let snapshot = Snapshot {
        dir: dir.clone(),
        template: template.id.clone(),
        runtime: runtime.kind(),
    };
    match runtime.adopt_template(template, &snapshot).await {
        Ok(t) => {
            tracing::info!(template = %template.id, snapshot = name, took = ?started.elapsed(),
                "template snapshot fetched from the object store");
            Some(t)
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(&dir);
            tracing::warn!(template = %template.id, "its snapshot {name} does not restore here ({e}); preparing it here");
            None
        }
    }
}

/// Publish the template snapshots this node prepared, in the background
/// at idle priority, and keep their manifests for deduplication. A
/// snapshot already in the store (another node published it) is not sent
/// again. A failure costs only the deduplication.
pub(super) fn publish(
    shared: &Arc<Shared>,
    objects: SnapshotStore,
    snapshots: Vec<(String, String, std::path::PathBuf)>,
) {
    if snapshots.is_empty() {
        return;
    }
    let idle = objects.clone().with_options(crate::objects::StoreOptions {
        idle: true,
        ..objects.options().clone()
    });
    let shared = shared.clone();
    tokio::spawn(async move {
        for (template, name, dir) in snapshots {
            if idle.manifest(&name).await.is_ok() {
                shared.remember_template_object(&template, &name);
                continue;
            }
            let metadata = SnapshotMetadata {
                kind: "template".into(),
                template_id: Some(template.clone()),
                runtime: Some(shared.runtime.kind().to_string()),
                sandbox_id: None,
                extra: serde_json::Value::Null,
            };
            let started = std::time::Instant::now();
            match idle
                .put_dir(&dir, &name, metadata, &KnownChunks::new())
                .await
            {
                Ok((_, stats)) => {
                    tracing::info!(%template, snapshot = %name, took = ?started.elapsed(),
                        chunks = stats.chunks, uploaded = stats.uploaded_chunks,
                        "template snapshot published");
                    shared.remember_template_object(&template, &name);
                }
                Err(e) => tracing::warn!(%template, "publishing its snapshot: {e}"),
            }
        }
    });
}
