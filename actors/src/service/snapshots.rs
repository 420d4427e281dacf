//! Copies of running sandboxes: E2B's fork and user snapshots.
//!
//! Both start with a copy: the sandbox's actor checkpoints it into a new
//! directory and restores it from there at once, so it keeps running with
//! its id, token and deadline (its connections are reset meanwhile, as by
//! a pause). Then:
//! - a fork restores `count` new sandboxes from the copy on this node,
//!   each with its own id and access token (envd is `/init`ed again with
//!   the source's token as its key), and drops the copy;
//! - a snapshot publishes the copy to the object store as
//!   `user-snapshots/<snapshot id>`, deduplicated against the sandbox's
//!   pause snapshot, with the source's record in its metadata; the copy
//!   stays as this node's cache of it. A create whose `templateID` is a
//!   snapshot id restores from it on any node (fetched once per node).

use std::path::PathBuf;

use super::*;
use crate::objects::{KnownChunks, ObjectsError, SnapshotMetadata};
use crate::runtime::{Limits, Snapshot};

/// Most forks one call makes (E2B's limit).
pub const MAX_FORKS: i64 = 20;

/// Where user snapshots live in the object store.
const USER_SNAPSHOTS: &str = "user-snapshots";

/// Longest snapshot name a client may give.
const MAX_SNAPSHOT_NAME: usize = 128;

/// A user snapshot as a create needs it.
pub(super) struct UserSnapshot {
    /// The record of the sandbox it is a copy of.
    pub source: SandboxRecord,
    /// Its template (the copy restores over the template's root).
    pub entry: TemplateEntry,
    /// This node's copy of it.
    pub dir: PathBuf,
    /// Filesystem only (E2B's `mode="filesystem"`): sandboxes boot from
    /// the template with its files, rather than restoring its memory.
    pub files_only: bool,
}

impl Sandboxes {
    /// A copy of running sandbox `id` in a new directory (of its files
    /// alone when `files_only`), and the sandbox's record.
    pub(super) async fn copy(
        &self,
        id: &str,
        what: &str,
        files_only: bool,
    ) -> Result<(SandboxRecord, PathBuf), SandboxError> {
        let actor = self.actor(id)?;
        let dest = self
            .inner
            .shared
            .snapshots_dir
            .join(format!("{id}-{what}-{}", now_ms()));
        let sent = actor
            .call(
                |reply| SandboxMsg::Copy {
                    dest: dest.clone(),
                    files_only,
                    reply,
                },
                None,
            )
            .await;
        match sent {
            Ok(CallResult::Success(r)) => Ok((r?, dest)),
            _ => Err(self.not_found(id)),
        }
    }

    /// E2B fork: `count` (1..=20) new sandboxes on this node, each a copy
    /// of running sandbox `id` as it is now, living `timeout` seconds (the
    /// default when `None`). The source keeps running. One answer per fork:
    /// a fork that fails (capacity, restore) does not fail the others.
    pub async fn fork(
        &self,
        id: &str,
        count: i64,
        timeout: Option<i64>,
    ) -> Result<Vec<Result<e2b::Sandbox, SandboxError>>, SandboxError> {
        if !(1..=MAX_FORKS).contains(&count) {
            return Err(SandboxError::BadRequest(format!(
                "count {count} is out of range: a fork makes 1 to {MAX_FORKS} sandboxes"
            )));
        }
        let end_at_ms = self.end_at(timeout)?;
        let (source, dir) = self.copy(id, "fork", false).await?;
        let forks = match self.inner.shared.template(&source.template).await {
            Ok(entry) => {
                let snapshot = Snapshot {
                    dir: dir.clone(),
                    template: entry.template.id.clone(),
                    runtime: self.inner.shared.runtime.kind(),
                };
                let limits = Limits {
                    vcpus: source.vcpus,
                    memory_mib: source.memory_mib,
                };
                let forks = (0..count).map(|_| {
                    let mut record = self.new_record(&source.template, end_at_ms, limits)?;
                    record.metadata = source.metadata.clone();
                    record.auto_pause = source.auto_pause;
                    record.auto_resume = source.auto_resume;
                    record.timeout_secs = timeout.map_or(0, |t| t.max(0) as u64);
                    Ok::<_, SandboxError>(record)
                });
                let forks = forks.map(|record| async {
                    let record = record?;
                    let _slot = self.reserve_slot(None)?;
                    let start = Start::Restore {
                        template: entry.template.clone(),
                        snapshot: snapshot.clone(),
                        limits,
                        env_vars: BTreeMap::new(),
                        source_token: source.envd_access_token.clone(),
                    };
                    self.start_sandbox(record, start).await
                });
                futures::future::join_all(forks).await
            }
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(e);
            }
        };
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            tracing::warn!(sandbox = %id, "removing the fork's copy {}: {e}", dir.display());
        }
        let made = forks.iter().filter(|f| f.is_ok()).count();
        tracing::info!(sandbox = %id, asked = count, made, "sandbox forked");
        Ok(forks)
    }

    /// E2B `create_snapshot`: a copy of running sandbox `id`, published to
    /// the object store; the sandbox keeps running. Sandboxes are created
    /// from it by its id as `templateID`, on any node of the store.
    pub async fn snapshot(
        &self,
        id: &str,
        req: e2b::SnapshotRequest,
    ) -> Result<e2b::SnapshotInfo, SandboxError> {
        let files_only = req.memory == Some(false);
        let names = match req.name {
            Some(name) => {
                if name.is_empty()
                    || name.len() > MAX_SNAPSHOT_NAME
                    || name.chars().any(char::is_control)
                {
                    return Err(SandboxError::BadRequest(format!(
                        "snapshot name {name:?}: give 1 to {MAX_SNAPSHOT_NAME} printable characters"
                    )));
                }
                vec![name]
            }
            None => Vec::new(),
        };
        let objects = self.inner.shared.objects.clone().ok_or_else(|| {
            SandboxError::NotImplemented(
                "snapshots need an object store: start the node with --object-store".into(),
            )
        })?;
        let (source, dir) = self.copy(id, "snapshot", files_only).await?;
        let snapshot_id = format!("snap-{}", new_sandbox_id()?);
        let name = format!("{USER_SNAPSHOTS}/{snapshot_id}");
        let mut record = source.clone();
        record.snapshot_dir = None;
        record.snapshot_object = None;
        record.claim_epoch = None;
        let metadata = SnapshotMetadata {
            kind: "snapshot".into(),
            template_id: Some(source.template.clone()),
            runtime: Some(self.inner.shared.runtime.kind().to_string()),
            sandbox_id: Some(source.id.clone()),
            extra: serde_json::json!({ "record": record, "names": names, "files_only": files_only }),
        };
        // What the sandbox's last pause published is mostly this too.
        let mut known = Vec::new();
        if let Some(previous) = &source.snapshot_object
            && let Ok(m) = objects.manifest(previous).await
        {
            known.push(m);
        }
        known.extend(self.inner.shared.template_manifest(&source.template).await);
        let known = KnownChunks::from_manifests(&known);
        let published = objects.put_dir(&dir, &name, metadata, &known).await;
        let cache = self.snapshot_cache(&snapshot_id);
        match published {
            Ok((_, stats)) => {
                tracing::info!(sandbox = %id, snapshot = %snapshot_id,
                    uploaded = stats.uploaded_chunks, deduplicated = stats.deduplicated_chunks,
                    "snapshot published");
                // The copy is this node's cache of the snapshot now.
                if std::fs::rename(&dir, &cache).is_err() {
                    let _ = std::fs::remove_dir_all(&dir);
                }
                Ok(e2b::SnapshotInfo { snapshot_id, names })
            }
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                Err(SandboxError::ObjectStore(format!(
                    "snapshot of sandbox {id} failed: the object store ({}) refused it: {e}; the sandbox keeps running",
                    objects.describe()
                )))
            }
        }
    }

    /// E2B `list_snapshots`: the user snapshots in the object store, by
    /// id, those of sandbox `sandbox_id` and named (or with id) `name` when
    /// given; at
    /// most `limit` after `after` (a previous page's last id). Returns the
    /// page and the next page's token.
    pub async fn snapshots(
        &self,
        sandbox_id: Option<&str>,
        name: Option<&str>,
        limit: usize,
        after: Option<&str>,
    ) -> Result<(Vec<e2b::SnapshotInfo>, Option<String>), SandboxError> {
        let Some(objects) = self.inner.shared.objects.clone() else {
            return Ok((Vec::new(), None));
        };
        let store_error = |e: ObjectsError| {
            SandboxError::ObjectStore(format!(
                "listing snapshots in the object store ({}): {e}",
                objects.describe()
            ))
        };
        let mut page = Vec::new();
        let mut more = false;
        for full in objects.list(USER_SNAPSHOTS).await.map_err(store_error)? {
            let Some(id) = full
                .strip_prefix(USER_SNAPSHOTS)
                .and_then(|r| r.strip_prefix('/'))
            else {
                continue;
            };
            if after.is_some_and(|a| id <= a) {
                continue;
            }
            let manifest = match objects.manifest(&full).await {
                Ok(m) => m,
                // Deleted since the listing.
                Err(ObjectsError::NotFound { .. }) => continue,
                Err(e) => return Err(store_error(e)),
            };
            let names: Vec<String> =
                serde_json::from_value(manifest.metadata.extra["names"].clone())
                    .unwrap_or_default();
            if sandbox_id.is_some_and(|s| manifest.metadata.sandbox_id.as_deref() != Some(s))
                || name.is_some_and(|n| n != id && !names.iter().any(|x| x == n))
            {
                continue;
            }
            if page.len() == limit {
                more = true;
                break;
            }
            page.push(e2b::SnapshotInfo {
                snapshot_id: id.to_owned(),
                names,
            });
        }
        let next = more
            .then(|| page.last().map(|s| s.snapshot_id.clone()))
            .flatten();
        Ok((page, next))
    }

    /// E2B `delete_snapshot`: `Ok(false)` when there is no such snapshot.
    /// Sandboxes created from it live on (they have their own state).
    pub async fn delete_snapshot(&self, snapshot_id: &str) -> Result<bool, SandboxError> {
        let Some(objects) = self.inner.shared.objects.clone() else {
            return Ok(false);
        };
        if !is_snapshot_id(snapshot_id) {
            return Ok(false);
        }
        let _ = std::fs::remove_dir_all(self.snapshot_cache(snapshot_id));
        match objects
            .delete(&format!("{USER_SNAPSHOTS}/{snapshot_id}"))
            .await
        {
            Ok(()) => Ok(true),
            Err(ObjectsError::NotFound { .. }) => Ok(false),
            Err(e) => Err(SandboxError::ObjectStore(format!(
                "deleting snapshot {snapshot_id} from the object store ({}): {e}",
                objects.describe()
            ))),
        }
    }

    /// The user snapshot `snapshot_id`, with this node's copy of it
    /// (fetched from the store the first time); `None` when there is no
    /// such snapshot.
    pub(super) async fn user_snapshot(
        &self,
        snapshot_id: &str,
    ) -> Result<Option<UserSnapshot>, SandboxError> {
        let Some(objects) = self.inner.shared.objects.clone() else {
            return Ok(None);
        };
        if !is_snapshot_id(snapshot_id) {
            return Ok(None);
        }
        let name = format!("{USER_SNAPSHOTS}/{snapshot_id}");
        let store_error = |e: ObjectsError| {
            SandboxError::ObjectStore(format!(
                "snapshot {snapshot_id} in the object store ({}): {e}",
                objects.describe()
            ))
        };
        // Asked every time, so that a deleted snapshot is not served from
        // a node's cache.
        let manifest = match objects.manifest(&name).await {
            Ok(m) => m,
            Err(ObjectsError::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(store_error(e)),
        };
        let source: SandboxRecord =
            serde_json::from_value(manifest.metadata.extra["record"].clone()).map_err(|e| {
                SandboxError::ObjectStore(format!(
                    "snapshot {snapshot_id} carries no sandbox record this node reads: {e}"
                ))
            })?;
        let runtime = self.inner.shared.runtime.kind().to_string();
        if source.runtime != runtime {
            return Err(SandboxError::BadRequest(format!(
                "snapshot {snapshot_id} was taken by the {} runtime; this node runs {runtime}",
                source.runtime
            )));
        }
        let files_only = manifest.metadata.extra["files_only"] == serde_json::Value::Bool(true);
        let entry = self.inner.shared.template(&source.template).await?;
        let dir = self.snapshot_cache(snapshot_id);
        let _one = self.inner.snapshot_cache.lock().await;
        if !dir.join("manifest.json").is_file() {
            let _ = std::fs::remove_dir_all(&dir);
            let (_, stats) = objects
                .get_dir(&name, &dir, None)
                .await
                .map_err(store_error)?;
            tracing::info!(snapshot = %snapshot_id, took = ?stats.elapsed,
                bytes = stats.bytes_downloaded, "snapshot fetched from the object store");
        }
        Ok(Some(UserSnapshot {
            source,
            entry,
            dir,
            files_only,
        }))
    }

    /// Where this node keeps its copy of user snapshot `snapshot_id`.
    fn snapshot_cache(&self, snapshot_id: &str) -> PathBuf {
        self.inner
            .shared
            .snapshots_dir
            .join(format!("user-{snapshot_id}"))
    }
}

/// Whether `s` can be a user snapshot's id (`snap-` and a sandbox id).
pub fn is_snapshot_id(s: &str) -> bool {
    s.strip_prefix("snap-").is_some_and(|rest| {
        !rest.is_empty()
            && rest.len() <= 64
            && rest
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
    })
}
