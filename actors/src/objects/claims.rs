//! Which node holds a sandbox, as the object store records it, so that
//! exactly one node runs it and a paused one outlives its host.
//!
//! A pause publishes the sandbox's snapshot; on its own that would let any
//! node resume it at any time, even one whose copy is stale (the sandbox
//! was resumed since, and lost with its host). So every change of hands is
//! recorded as a *claim*: `claims/<sandbox id>/<epoch>`, a small JSON
//! document saying which node holds the sandbox, whether it is paused
//! (and at which snapshot) or running. The claim with the highest epoch is
//! the sandbox's state.
//!
//! A node moves a sandbox on by writing the next epoch with a
//! create-if-absent put (`PutMode::Create`: a hard link on a local
//! directory, `If-None-Match: *` on S3). Two nodes that try to take the
//! same sandbox write the same object name; one of them wins and the
//! other is told who holds it now ([`ObjectsError::ClaimTaken`]). Older
//! epochs are deleted after each write; a writer that read an epoch that
//! was deleted since could create it again, so every write lists the
//! claims afterwards and counts only if no higher epoch exists.
//!
//! States: a pause writes `paused` (with its snapshot), a resume writes
//! `running` first — it fails, and the resume with it, when another node
//! took the sandbox over while this one was cut off — and a node that
//! adopts the paused sandbox of a dead node writes `paused` on itself.
//! Kill deletes the claims. A sandbox that was never paused has none.

use futures::TryStreamExt;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStoreExt, PutMode, PutOptions, PutPayload};
use serde::{Deserialize, Serialize};

use super::{ObjectsError, SnapshotStore, check_name, unix_ms};

/// Where claims live in the store.
const CLAIMS: &str = "claims";

/// What the node named in a claim does with the sandbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClaimState {
    /// It runs there: its published snapshot (if any) is stale.
    Running,
    /// Nothing runs; [`Claim::snapshot`] is the sandbox.
    Paused,
}

/// One change of hands of a sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claim {
    pub sandbox_id: String,
    /// 1 for the first claim of the sandbox, then one more per change.
    pub epoch: u64,
    pub state: ClaimState,
    /// The node that holds the sandbox.
    pub node: String,
    /// The snapshot's name in this store, when paused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<String>,
    /// When it was written, milliseconds since the Unix epoch.
    pub at_ms: u64,
}

impl std::fmt::Display for Claim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = match self.state {
            ClaimState::Running => "running",
            ClaimState::Paused => "paused",
        };
        write!(f, "{state} on node {} (epoch {})", self.node, self.epoch)
    }
}

fn claims_dir(sandbox_id: &str) -> ObjectPath {
    ObjectPath::from(CLAIMS).join(sandbox_id)
}

/// Epochs are zero-padded so that names sort as numbers do.
fn claim_path(sandbox_id: &str, epoch: u64) -> ObjectPath {
    claims_dir(sandbox_id).join(format!("{epoch:020}"))
}

/// A sandbox id is one component of a snapshot name.
fn check_sandbox_id(sandbox_id: &str) -> Result<(), ObjectsError> {
    check_name(sandbox_id)?;
    if sandbox_id.contains('/') {
        return Err(ObjectsError::BadName {
            name: sandbox_id.to_owned(),
            reason: "a sandbox id has no '/'",
        });
    }
    Ok(())
}

impl SnapshotStore {
    /// The epochs of sandbox `sandbox_id`'s claims, ascending.
    async fn claim_epochs(&self, sandbox_id: &str) -> Result<Vec<u64>, ObjectsError> {
        let dir = claims_dir(sandbox_id);
        let mut epochs: Vec<u64> = self
            .store
            .list(Some(&dir))
            .map_err(|source| ObjectsError::store("list", &dir, source))
            .try_filter_map(|meta| async move {
                Ok(meta.location.filename().and_then(|f| f.parse::<u64>().ok()))
            })
            .try_collect()
            .await?;
        epochs.sort_unstable();
        Ok(epochs)
    }

    /// The claim of sandbox `sandbox_id` in force (the highest epoch);
    /// `None` when it has none (never paused, or killed).
    pub async fn claim(&self, sandbox_id: &str) -> Result<Option<Claim>, ObjectsError> {
        check_sandbox_id(sandbox_id)?;
        // Read again when the highest epoch went between the listing and
        // the read: a newer one replaced it (or a kill removed them all).
        for _ in 0..3 {
            let Some(&epoch) = self.claim_epochs(sandbox_id).await?.last() else {
                return Ok(None);
            };
            let path = claim_path(sandbox_id, epoch);
            let bytes = match self.store.get(&path).await {
                Ok(got) => got.bytes().await,
                Err(err) => Err(err),
            };
            match bytes {
                Ok(bytes) => {
                    let claim: Claim = serde_json::from_slice(&bytes).map_err(|source| {
                        ObjectsError::ClaimJson {
                            object: path.to_string(),
                            source,
                        }
                    })?;
                    if claim.sandbox_id != sandbox_id || claim.epoch != epoch {
                        return Err(ObjectsError::ClaimJson {
                            object: path.to_string(),
                            source: serde::de::Error::custom(
                                "its sandbox id or epoch is not the one its name says",
                            ),
                        });
                    }
                    return Ok(Some(claim));
                }
                Err(object_store::Error::NotFound { .. }) => continue,
                Err(source) => return Err(ObjectsError::store("get", &path, source)),
            }
        }
        Err(ObjectsError::ClaimBusy {
            sandbox_id: sandbox_id.to_owned(),
        })
    }

    /// Record that `node` now holds sandbox `sandbox_id` in `state`, if
    /// the claim in force is still epoch `after` (`None`: the sandbox has
    /// no claim yet). Fails with [`ObjectsError::ClaimTaken`], naming the
    /// claim in force, when another write came first.
    pub async fn write_claim(
        &self,
        sandbox_id: &str,
        after: Option<u64>,
        state: ClaimState,
        node: &str,
        snapshot: Option<&str>,
    ) -> Result<Claim, ObjectsError> {
        check_sandbox_id(sandbox_id)?;
        if let Some(name) = snapshot {
            check_name(name)?;
        }
        let claim = Claim {
            sandbox_id: sandbox_id.to_owned(),
            epoch: after.map_or(1, |e| e + 1),
            state,
            node: node.to_owned(),
            snapshot: snapshot.map(str::to_owned),
            at_ms: unix_ms(std::time::SystemTime::now()),
        };
        let path = claim_path(sandbox_id, claim.epoch);
        let json = serde_json::to_vec(&claim).map_err(|source| ObjectsError::ClaimJson {
            object: path.to_string(),
            source,
        })?;
        let taken = |current: Option<Claim>| ObjectsError::ClaimTaken {
            sandbox_id: sandbox_id.to_owned(),
            expected: after,
            current: current.map(Box::new),
        };
        let put = self
            .store
            .put_opts(
                &path,
                PutPayload::from(json),
                PutOptions::from(PutMode::Create),
            )
            .await;
        match put {
            Ok(_) => {}
            Err(
                object_store::Error::AlreadyExists { .. }
                | object_store::Error::Precondition { .. },
            ) => {
                return Err(taken(self.claim(sandbox_id).await?));
            }
            Err(source) => return Err(ObjectsError::store("put", &path, source)),
        }
        // A claim below a higher epoch was written after that epoch
        // deleted it (see the module doc): it does not count.
        let epochs = self.claim_epochs(sandbox_id).await?;
        if epochs.last().is_some_and(|&e| e > claim.epoch) {
            return Err(taken(self.claim(sandbox_id).await?));
        }
        let older = epochs.into_iter().filter(|&e| e < claim.epoch);
        if let Err(e) = self.delete_epochs(sandbox_id, older).await {
            // A leftover epoch only costs a listing entry.
            tracing::warn!(sandbox = %sandbox_id, "removing an old claim: {e}");
        }
        Ok(claim)
    }

    /// Every sandbox that has a claim, with the claim in force, sorted by
    /// sandbox id. One read per sandbox: meant for the paused sandboxes of
    /// a cluster, not for millions.
    pub async fn claims(&self) -> Result<Vec<Claim>, ObjectsError> {
        let root = ObjectPath::from(CLAIMS);
        let mut ids: Vec<String> = self
            .store
            .list(Some(&root))
            .map_err(|source| ObjectsError::store("list", &root, source))
            .try_filter_map(|meta| async move {
                let mut parts = meta.location.parts();
                let _claims = parts.next();
                Ok(parts.next().map(|p| p.as_ref().to_owned()))
            })
            .try_collect()
            .await?;
        ids.sort();
        ids.dedup();
        let mut claims = Vec::with_capacity(ids.len());
        for id in ids {
            if check_sandbox_id(&id).is_err() {
                continue;
            }
            if let Some(claim) = self.claim(&id).await? {
                claims.push(claim);
            }
        }
        Ok(claims)
    }

    /// Delete every claim of sandbox `sandbox_id` (it was killed).
    pub async fn forget_claims(&self, sandbox_id: &str) -> Result<(), ObjectsError> {
        check_sandbox_id(sandbox_id)?;
        let epochs = self.claim_epochs(sandbox_id).await?;
        self.delete_epochs(sandbox_id, epochs).await
    }

    /// Delete claims `epochs` of sandbox `sandbox_id` (gone already is
    /// fine); stops at the first the store refuses.
    async fn delete_epochs(
        &self,
        sandbox_id: &str,
        epochs: impl IntoIterator<Item = u64>,
    ) -> Result<(), ObjectsError> {
        for epoch in epochs {
            let path = claim_path(sandbox_id, epoch);
            match self.store.delete(&path).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(source) => return Err(ObjectsError::store("delete", &path, source)),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn local_store() -> (tempfile::TempDir, SnapshotStore) {
        let dir = tempfile::tempdir().unwrap();
        let fs = object_store::local::LocalFileSystem::new_with_prefix(dir.path()).unwrap();
        (dir, SnapshotStore::new(Arc::new(fs), "test"))
    }

    #[tokio::test]
    async fn claims_advance_one_epoch_at_a_time() {
        let (_dir, store) = local_store();
        assert_eq!(store.claim("sbx1").await.unwrap(), None);
        let c1 = store
            .write_claim(
                "sbx1",
                None,
                ClaimState::Paused,
                "n1",
                Some("sandboxes/sbx1/5"),
            )
            .await
            .unwrap();
        assert_eq!(c1.epoch, 1);
        assert_eq!(store.claim("sbx1").await.unwrap(), Some(c1.clone()));
        let c2 = store
            .write_claim("sbx1", Some(1), ClaimState::Running, "n1", None)
            .await
            .unwrap();
        assert_eq!((c2.epoch, c2.state), (2, ClaimState::Running));
        // The old epoch is gone; the new one is in force.
        assert_eq!(store.claim_epochs("sbx1").await.unwrap(), vec![2]);
        assert_eq!(store.claim("sbx1").await.unwrap(), Some(c2));
    }

    #[tokio::test]
    async fn a_stale_writer_is_told_who_holds_the_sandbox() {
        let (_dir, store) = local_store();
        store
            .write_claim(
                "sbx1",
                None,
                ClaimState::Paused,
                "n1",
                Some("sandboxes/sbx1/5"),
            )
            .await
            .unwrap();
        // n2 adopts it; then n1, which still thinks epoch 1, resumes.
        store
            .write_claim(
                "sbx1",
                Some(1),
                ClaimState::Paused,
                "n2",
                Some("sandboxes/sbx1/5"),
            )
            .await
            .unwrap();
        let err = store
            .write_claim("sbx1", Some(1), ClaimState::Running, "n1", None)
            .await
            .unwrap_err();
        match &err {
            ObjectsError::ClaimTaken {
                expected: Some(1),
                current: Some(c),
                ..
            } => assert_eq!((c.node.as_str(), c.epoch), ("n2", 2)),
            other => panic!("{other:?}"),
        }
        assert!(err.to_string().contains("n2"), "{err}");
        // A first claim where one exists is refused too.
        assert!(matches!(
            store
                .write_claim("sbx1", None, ClaimState::Paused, "n3", None)
                .await,
            Err(ObjectsError::ClaimTaken { .. })
        ));
    }

    #[tokio::test]
    async fn a_write_of_a_deleted_epoch_does_not_count() {
        let (_dir, store) = local_store();
        for (after, node) in [(None, "n1"), (Some(1), "n2"), (Some(2), "n3")] {
            store
                .write_claim("sbx1", after, ClaimState::Paused, node, None)
                .await
                .unwrap();
        }
        // Epochs 1 and 2 were deleted: a writer that read epoch 1 long ago
        // creates epoch 2 again, and must learn that epoch 3 rules.
        let err = store
            .write_claim("sbx1", Some(1), ClaimState::Running, "n1", None)
            .await
            .unwrap_err();
        assert!(
            matches!(&err, ObjectsError::ClaimTaken { current: Some(c), .. } if c.node == "n3"),
            "{err:?}"
        );
        assert_eq!(store.claim("sbx1").await.unwrap().unwrap().node, "n3");
    }

    #[tokio::test]
    async fn of_two_nodes_taking_a_sandbox_at_once_exactly_one_wins() {
        let (_dir, store) = local_store();
        store
            .write_claim(
                "sbx1",
                None,
                ClaimState::Paused,
                "n0",
                Some("sandboxes/sbx1/1"),
            )
            .await
            .unwrap();
        for round in 1..20u64 {
            let tries = (0..4).map(|i| {
                let store = store.clone();
                tokio::spawn(async move {
                    store
                        .write_claim(
                            "sbx1",
                            Some(round),
                            ClaimState::Paused,
                            &format!("n{i}"),
                            None,
                        )
                        .await
                })
            });
            let results = futures::future::join_all(tries).await;
            let won: Vec<&Claim> = results
                .iter()
                .filter_map(|r| r.as_ref().unwrap().as_ref().ok())
                .collect();
            assert_eq!(won.len(), 1, "round {round}: {results:?}");
            assert_eq!(store.claim("sbx1").await.unwrap().as_ref(), Some(won[0]));
        }
    }

    #[tokio::test]
    async fn claims_are_listed_and_forgotten() {
        let (_dir, store) = local_store();
        store
            .write_claim("b", None, ClaimState::Paused, "n1", Some("sandboxes/b/1"))
            .await
            .unwrap();
        store
            .write_claim("a", None, ClaimState::Running, "n2", None)
            .await
            .unwrap();
        store
            .write_claim(
                "a",
                Some(1),
                ClaimState::Paused,
                "n2",
                Some("sandboxes/a/7"),
            )
            .await
            .unwrap();
        let listed = store.claims().await.unwrap();
        let brief: Vec<(&str, u64, &str)> = listed
            .iter()
            .map(|c| (c.sandbox_id.as_str(), c.epoch, c.node.as_str()))
            .collect();
        assert_eq!(brief, vec![("a", 2, "n2"), ("b", 1, "n1")]);
        store.forget_claims("a").await.unwrap();
        assert_eq!(store.claim("a").await.unwrap(), None);
        assert_eq!(store.claims().await.unwrap().len(), 1);
        // A new life starts at epoch 1 again.
        assert_eq!(
            store
                .write_claim("a", None, ClaimState::Paused, "n1", None)
                .await
                .unwrap()
                .epoch,
            1
        );
    }

    #[tokio::test]
    async fn bad_ids_and_corrupt_claims_are_refused() {
        let (dir, store) = local_store();
        for bad in ["", "a/b", "..", "a b"] {
            assert!(
                matches!(store.claim(bad).await, Err(ObjectsError::BadName { .. })),
                "{bad:?}"
            );
        }
        let path = dir.path().join("claims/sbx1");
        std::fs::create_dir_all(&path).unwrap();
        std::fs::write(path.join(format!("{:020}", 1)), b"{not json").unwrap();
        assert!(matches!(
            store.claim("sbx1").await,
            Err(ObjectsError::ClaimJson { .. })
        ));
        // A claim whose body names another epoch than its name is refused.
        let other = Claim {
            sandbox_id: "sbx1".into(),
            epoch: 9,
            state: ClaimState::Paused,
            node: "n1".into(),
            snapshot: None,
            at_ms: 0,
        };
        std::fs::write(
            path.join(format!("{:020}", 2)),
            serde_json::to_vec(&other).unwrap(),
        )
        .unwrap();
        assert!(matches!(
            store.claim("sbx1").await,
            Err(ObjectsError::ClaimJson { .. })
        ));
    }
}
