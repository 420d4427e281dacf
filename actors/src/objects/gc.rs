//! Garbage collection of chunks no manifest refers to.
//!
//! Order matters: the manifests are read first, the chunks listed after.
//! A manifest written in between refers to chunks that are either young
//! (uploaded by its upload) or were rewritten by it because they were old
//! (`StoreOptions::refresh_after`), so the grace period protects them as it
//! protects the chunks of uploads whose manifest is not written yet. The
//! grace must therefore exceed the longest upload plus `refresh_after`,
//! plus any clock skew between this node and the store (last-modified
//! times are the store's).
//!
//! A manifest that cannot be read or is refused stops the collection: what
//! it refers to is unknown, and deleting a snapshot's chunks is the one
//! mistake that cannot be undone.

use std::collections::HashSet;
use std::time::{Duration, SystemTime};

use futures::{StreamExt, TryStreamExt};
use object_store::ObjectStoreExt;
use object_store::path::Path as ObjectPath;

use super::chunks::{ChunkId, manifest_chunks};
use super::{CHUNKS, MANIFEST, ObjectsError, SNAPSHOTS, SnapshotStore, name_of_manifest, unix_ms};
use crate::metrics;

/// What a collection found and did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GcStats {
    pub manifests: u64,
    /// Chunk objects listed.
    pub chunks: u64,
    /// Listed chunks some manifest refers to.
    pub referenced: u64,
    /// Unreferenced chunks kept because they are younger than the grace.
    pub young: u64,
    pub deleted: u64,
    pub deleted_bytes: u64,
    /// Objects under `chunks/` whose name is not a chunk id; left alone.
    pub foreign: u64,
}

impl SnapshotStore {
    /// Delete the chunks that no manifest refers to and that were last
    /// written more than `grace` ago.
    pub async fn gc(&self, grace: Duration) -> Result<GcStats, ObjectsError> {
        let mut stats = GcStats::default();
        let mut referenced: HashSet<ChunkId> = HashSet::new();
        let snapshots = ObjectPath::from(SNAPSHOTS);
        let mut names = Vec::new();
        let mut listing = self.store.list(Some(&snapshots));
        while let Some(meta) = listing
            .try_next()
            .await
            .map_err(|source| ObjectsError::store("list", &snapshots, source))?
        {
            if meta.location.filename() != Some(MANIFEST) {
                continue;
            }
            // `list` skips such a manifest; GC must not: its chunks would go.
            let name =
                name_of_manifest(&meta.location).ok_or_else(|| ObjectsError::ForeignManifest {
                    location: meta.location.to_string(),
                })?;
            names.push(name);
        }
        drop(listing);
        for name in names {
            let manifest = match self.manifest(&name).await {
                Ok(m) => m,
                // Deleted since the listing: it refers to nothing any more.
                Err(ObjectsError::NotFound { .. }) => continue,
                Err(err) => return Err(err),
            };
            referenced.extend(manifest_chunks(&manifest));
            stats.manifests += 1;
        }

        let now_ms = unix_ms(SystemTime::now()) as i64;
        let grace_ms = i64::try_from(grace.as_millis()).unwrap_or(i64::MAX);
        let root = ObjectPath::from(CHUNKS);
        let mut doomed = Vec::new();
        let mut listing = self.store.list(Some(&root));
        while let Some(meta) = listing
            .try_next()
            .await
            .map_err(|source| ObjectsError::store("list", &root, source))?
        {
            stats.chunks += 1;
            let id = meta
                .location
                .filename()
                .and_then(ChunkId::from_hex)
                .filter(|_| meta.location.prefix_matches(&root));
            let Some(id) = id else {
                stats.foreign += 1;
                continue;
            };
            if referenced.contains(&id) {
                stats.referenced += 1;
            } else if now_ms.saturating_sub(meta.last_modified.timestamp_millis()) < grace_ms {
                stats.young += 1;
            } else {
                doomed.push((meta.location, meta.size));
            }
        }
        drop(listing);

        let mut deletes = futures::stream::iter(doomed)
            .map(|(path, size)| async move {
                match self.store.delete(&path).await {
                    Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(size),
                    Err(source) => Err(ObjectsError::store("delete", &path, source)),
                }
            })
            .buffer_unordered(self.options.concurrency.max(1));
        while let Some(size) = deletes.try_next().await? {
            stats.deleted += 1;
            stats.deleted_bytes += size;
            ::metrics::counter!(metrics::SNAPSHOT_GC_CHUNKS_DELETED).increment(1);
        }
        tracing::info!(
            store = %self.describe,
            manifests = stats.manifests,
            chunks = stats.chunks,
            deleted = stats.deleted,
            young = stats.young,
            "snapshot chunk GC done"
        );
        Ok(stats)
    }
}
