//! [`SandboxActor`]: owns one sandbox — its create, deadline, pause,
//! resume and kill — so that runtime calls for one id never overlap.

use super::envd::{envd_sync, init_envd};
use super::*;
use crate::objects::{ClaimState, KnownChunks, ObjectsError, SnapshotMetadata};

/// Messages of a [`SandboxActor`].
pub enum SandboxMsg {
    /// Move the deadline to `end_at_ms` (only later, when `only_extend`).
    SetDeadline {
        end_at_ms: u64,
        only_extend: bool,
        reply: RpcReplyPort<SandboxRecord>,
    },
    Kill {
        reply: RpcReplyPort<Result<(), SandboxError>>,
    },
    /// The deadline timer fired.
    Deadline,
    /// The runtime no longer runs the sandbox (its process died).
    Lost { reason: String },
    /// Save the sandbox to a snapshot and stop it (E2B pause).
    Pause {
        reply: RpcReplyPort<Result<SandboxRecord, SandboxError>>,
    },
    /// Record in the object store that this node runs the new sandbox, so
    /// that if the node dies the others can say it was lost with it (and
    /// kill it). Sent by the actor to itself once the create answered.
    ClaimCreated,
    /// Fetch the paused sandbox's snapshot from the object store now, so
    /// that its resume is local (sent after a take-over).
    Prefetch,
    /// Save a copy of the running sandbox into the new directory `dest`
    /// and keep it running (snapshots and forks start from the copy);
    /// `files_only`: its filesystem alone (the guest's cached writes
    /// flushed first), for sandboxes that boot afresh from it.
    Copy {
        dest: std::path::PathBuf,
        files_only: bool,
        reply: RpcReplyPort<Result<SandboxRecord, SandboxError>>,
    },
    /// Start a paused sandbox again from its snapshot; it then dies (or
    /// pauses) at `end_at_ms`.
    Resume {
        end_at_ms: u64,
        reply: RpcReplyPort<Result<SandboxRecord, SandboxError>>,
    },
}

// With ractor's `cluster` feature on (ractor_cluster is in the graph)
// every message type says whether it can cross nodes. The actor is the
// sandbox's entry in the cluster's registry (`crate::directory`), and
// ractor_cluster syncs only the process groups of actors that "support
// remoting": so it says it does, but no message of it serializes. Calls
// from other nodes go to the node's `SandboxDirectory`, which serves
// them through the node's front, which calls this actor locally.
impl ractor::Message for SandboxMsg {
    fn serializable() -> bool {
        true
    }
}

/// How a [`SandboxActor`] comes to own its sandbox.
pub(crate) enum Start {
    /// Create it from a template, then `/init` envd.
    Create {
        template: Template,
        limits: Limits,
        env_vars: BTreeMap<String, String>,
    },
    /// Restore it from `snapshot`, a copy of another sandbox (a fork, or
    /// a create from a user snapshot), then `/init` envd with its own
    /// identity and token (`source_token`: the one the copy's envd holds).
    Restore {
        template: Template,
        snapshot: crate::runtime::Snapshot,
        limits: Limits,
        env_vars: BTreeMap<String, String>,
        source_token: String,
    },
    /// Boot it from `template`'s root tree with the filesystem changes of
    /// `files` (a filesystem-only user snapshot) over it, then `/init`
    /// envd: fresh processes, the snapshot's files.
    BootWithFiles {
        template: Template,
        files: crate::runtime::Snapshot,
        limits: Limits,
        env_vars: BTreeMap<String, String>,
    },
    /// It already runs, or is paused (a node restart found it): take it
    /// over. `from`: the node it is taken over from (paused, from the
    /// object store); `None`: this node, after a restart.
    Adopt { from: Option<String> },
}

/// How a [`SandboxActor`]'s start went.
enum Began {
    Created(crate::runtime::Instance),
    Adopted { from: Option<String> },
}

/// Owns one sandbox: creates it (runtime create + envd `/init`) in
/// `pre_start`, then holds its deadline timer, and alone pauses, resumes
/// and kills it. States: creating -> running <-> paused -> killed (a
/// runtime crash or a failed save: lost).
pub struct SandboxActor;

pub struct SandboxArgs {
    pub(crate) shared: Arc<Shared>,
    pub(crate) record: SandboxRecord,
    pub(crate) start: Start,
    /// The create's outcome, for the REST call waiting on it.
    pub(crate) ready: oneshot::Sender<Result<SandboxRecord, SandboxError>>,
}

pub struct SandboxState {
    shared: Arc<Shared>,
    id: SandboxId,
    record: SandboxRecord,
    timer: Option<tokio::task::JoinHandle<Result<(), ractor::MessagingErr<SandboxMsg>>>>,
}

impl SandboxState {
    /// Start the deadline timer (a paused sandbox has none).
    fn arm(&mut self, myself: &ActorRef<SandboxMsg>) {
        self.disarm();
        if self.record.state != RecordState::Running {
            return;
        }
        let left = Duration::from_millis(self.record.end_at_ms.saturating_sub(now_ms()));
        self.timer = Some(myself.send_after(left, || SandboxMsg::Deadline));
    }

    fn disarm(&mut self) {
        if let Some(t) = self.timer.take() {
            t.abort();
        }
    }

    /// Save the record in sled and in `live`, with an event for the log.
    fn save(&self, event: Option<SandboxLogEntry>) -> Result<(), SandboxError> {
        let saved = self.shared.store.put_sandbox(&self.record);
        if let Some(l) = self.shared.live.lock().unwrap().get_mut(self.id.as_str()) {
            l.record = self.record.clone();
            if let Some(e) = event {
                push_bounded(&mut l.events, MAX_EVENTS, e);
            }
        }
        saved.map_err(Into::into)
    }

    /// Pause: save the sandbox into a new snapshot directory
    /// ([`SandboxState::checkpoint_into`]) and publish it. A save that
    /// fails with the sandbox still running leaves it running (409 with
    /// the reason); one that loses the sandbox reports it lost.
    async fn pause(&mut self, why: &str) -> Result<SandboxRecord, SandboxError> {
        if self.record.state == RecordState::Paused {
            return Err(SandboxError::AlreadyPaused(self.record.id.clone()));
        }
        let started = std::time::Instant::now();
        let dest = self
            .shared
            .snapshots_dir
            .join(format!("{}-{}", self.record.id, now_ms()));
        self.checkpoint_into(&dest).await?;
        let published = match self.publish(&dest).await {
            Ok(p) => p,
            Err(e) => return Err(self.resume_after_failed_publish(e).await),
        };
        let took = started.elapsed();
        metrics::counter!(crate::metrics::PAUSES, "result" => "ok").increment(1);
        metrics::histogram!(crate::metrics::PAUSE_SECONDS).record(took.as_secs_f64());
        tracing::info!(sandbox = %self.id, ?took, why, "sandbox paused");
        self.save(Some(log_entry(
            LogLevel::Info,
            "sandbox paused",
            [
                ("why", why.to_owned()),
                ("took_ms", took.as_millis().to_string()),
                ("snapshot_bytes", dir_size(&dest).to_string()),
                ("published", published),
            ],
        )))?;
        Ok(self.record.clone())
    }

    /// After a pause or a copy: when `r` says the save lost the sandbox,
    /// remember why and clean up; true when the actor must stop.
    async fn lost_in_a_save<T>(&mut self, r: &Result<T, SandboxError>) -> bool {
        let Err(SandboxError::Lost(_, why)) = r else {
            return false;
        };
        tracing::error!(sandbox = %self.id, "lost while saving: {why}");
        self.shared.remember_lost(self.id.as_str(), why);
        metrics::counter!(crate::metrics::LOST).increment(1);
        if let Err(e) = kill(&self.shared, &self.id, self.record.snapshot_dir.as_deref()).await {
            tracing::error!(sandbox = %self.id, "cleaning up after a failed save: {e}");
        }
        true
    }

    /// Stop routing to the running sandbox, reset the connections into
    /// it, and checkpoint it into the new directory `dest`: then it is
    /// paused there. A save refused or failed with the sandbox still
    /// running leaves it running (`PauseRefused`, `dest` removed); one
    /// that loses the sandbox is `Lost`.
    async fn checkpoint_into(
        &mut self,
        dest: &std::path::Path,
    ) -> Result<crate::runtime::Snapshot, SandboxError> {
        self.record.state = RecordState::Pausing;
        self.record.snapshot_dir = Some(dest.to_path_buf());
        // In sled before the runtime writes anything: a node that dies in
        // the middle finds the snapshot (complete only with its manifest).
        if let Err(e) = self.save(None) {
            self.record.state = RecordState::Running;
            self.record.snapshot_dir = None;
            let _ = self.save(None);
            return Err(e);
        }
        self.shared.cut_connections(self.id.as_str());
        let saved = self.shared.runtime.checkpoint(&self.id, dest).await;
        match saved {
            Ok(snapshot) => {
                self.record.state = RecordState::Paused;
                self.disarm();
                Ok(snapshot)
            }
            // The sandbox still runs: refused before saving (connections
            // that would not close), or a save that failed without harm.
            Err(
                RuntimeError::CheckpointRefused { reason, .. }
                | RuntimeError::CheckpointFailed {
                    reason,
                    sandbox_lost: false,
                    ..
                },
            ) => {
                metrics::counter!(crate::metrics::PAUSES, "result" => "refused").increment(1);
                self.record.state = RecordState::Running;
                self.record.snapshot_dir = None;
                // The connections were cut for the save; new ones may come.
                self.shared.reconnectable(self.id.as_str());
                let _ = std::fs::remove_dir_all(dest);
                tracing::warn!(sandbox = %self.id, "pause refused: {reason}");
                self.save(Some(log_entry(
                    LogLevel::Warn,
                    "pause refused; the sandbox keeps running",
                    [("reason", reason.clone())],
                )))?;
                Err(SandboxError::PauseRefused(self.record.id.clone(), reason))
            }
            Err(e) => {
                metrics::counter!(crate::metrics::PAUSES, "result" => "lost").increment(1);
                Err(SandboxError::Lost(
                    self.record.id.clone(),
                    format!("saving it failed: {e}"),
                ))
            }
        }
    }

    /// Save a copy of the running sandbox into the new directory `dest`
    /// and keep it running (same id, token and deadline): checkpoint, then
    /// restore from the copy, which stays (a runtime's restore leaves its
    /// snapshot unchanged). What snapshots and forks start from. A
    /// restore that fails leaves the sandbox paused with `dest` as its
    /// snapshot (the error says so), so the caller must not use `dest`.
    async fn copy(&mut self, dest: &std::path::Path, files_only: bool) -> Result<(), SandboxError> {
        match self.record.state {
            RecordState::Running => {}
            RecordState::Paused | RecordState::Pausing => {
                return Err(SandboxError::Paused(self.record.id.clone()));
            }
            RecordState::Creating => return Err(SandboxError::NotFound(self.record.id.clone())),
        }
        let started = std::time::Instant::now();
        // A fresh boot reads the disk, not the guest's page cache.
        if files_only
            && let Err(e) = envd_sync(
                &*self.shared.runtime,
                &self.id,
                &self.record.envd_access_token,
            )
            .await
        {
            return Err(SandboxError::Envd {
                id: self.record.id.clone(),
                detail: format!(
                    "/sync, to flush the guest's writes to its disk, failed ({e}); nothing was saved"
                ),
            });
        }
        let snapshot = self.checkpoint_into(dest).await?;
        self.resume_claimed(self.record.end_at_ms, false, true)
            .await
            .map_err(|e| {
                SandboxError::Io(format!(
                    "sandbox {} was saved, but running it again from the copy failed: {e}; it stays paused (resume it)",
                    self.record.id
                ))
            })?;
        if files_only {
            self.shared.runtime.keep_files_only(&snapshot).await?;
        }
        tracing::info!(sandbox = %self.id, took = ?started.elapsed(), files_only, "sandbox copied");
        Ok(())
    }

    /// Resume: restore the snapshot under the same id, `/init` envd again
    /// (fresh clock), then drop the snapshot. A failed restore leaves the
    /// sandbox paused with its snapshot.
    async fn resume(&mut self, end_at_ms: u64) -> Result<SandboxRecord, SandboxError> {
        self.resume_claimed(end_at_ms, true, false).await
    }

    /// [`SandboxState::resume`]; `claim`: record in the object store that
    /// the sandbox runs here first (false when the store never learned
    /// that it paused: a pause that failed to publish, a copy); `keep`:
    /// leave the snapshot directory in place (a copy's).
    async fn resume_claimed(
        &mut self,
        end_at_ms: u64,
        claim: bool,
        keep: bool,
    ) -> Result<SandboxRecord, SandboxError> {
        if self.record.state == RecordState::Running {
            return Err(SandboxError::AlreadyRunning(self.record.id.clone()));
        }
        let started = std::time::Instant::now();
        let template = self.shared.template(&self.record.template).await?;
        let claimed_at = self.record.claim_epoch;
        if claim {
            self.claim(ClaimState::Running, None).await?;
        }
        let dir = match self.local_snapshot().await {
            Ok(dir) => dir,
            Err(e) => {
                self.unclaim_running(claimed_at).await;
                return Err(e);
            }
        };
        let snapshot = crate::runtime::Snapshot {
            dir: dir.clone(),
            template: template.template.id.clone(),
            runtime: self.shared.runtime.kind(),
        };
        let limits = Limits {
            vcpus: self.record.vcpus,
            memory_mib: self.record.memory_mib,
        };
        let restored = async {
            let rt = &self.shared.runtime;
            let i = match rt
                .restore(&self.id, &template.template, &snapshot, limits)
                .await
            {
                // The restored guest died before envd answered (runsc
                // 2022-12 does this now and then): a failed restore undoes
                // itself and leaves the snapshot unchanged, so try once more.
                Err(e @ RuntimeError::NotReady { .. }) => {
                    tracing::warn!(sandbox = %self.id, "restore failed, retrying once: {e}");
                    rt.restore(&self.id, &template.template, &snapshot, limits)
                        .await?
                }
                r => r?,
            };
            init_envd(
                &*self.shared.runtime,
                &self.id,
                &BTreeMap::new(),
                &self.record.envd_access_token,
                None,
            )
            .await
            .map_err(|detail| SandboxError::Init {
                id: self.record.id.clone(),
                detail,
            })?;
            Ok::<_, SandboxError>(i)
        }
        .await;
        let instance = match restored {
            Ok(i) => i,
            Err(e) => {
                tracing::warn!(sandbox = %self.id, "resume failed: {e}");
                if let Err(k) = self.shared.runtime.kill(&self.id).await {
                    tracing::error!(sandbox = %self.id, "cleaning up after a failed resume: {k}");
                }
                self.unclaim_running(claimed_at).await;
                let _ = self.save(Some(log_entry(
                    LogLevel::Error,
                    "resume failed; the sandbox stays paused",
                    [("error", e.to_string())],
                )));
                return Err(e);
            }
        };
        self.record.state = RecordState::Running;
        self.record.snapshot_dir = None;
        self.record.end_at_ms = end_at_ms;
        self.shared.reconnectable(self.id.as_str());
        let took = started.elapsed();
        metrics::histogram!(crate::metrics::RESUME_SECONDS).record(took.as_secs_f64());
        tracing::info!(sandbox = %self.id, ?took, "sandbox resumed");
        self.save(Some(log_entry(
            LogLevel::Info,
            "sandbox resumed",
            [
                ("took_ms", took.as_millis().to_string()),
                (
                    "ready_after_ms",
                    instance.ready_after.as_millis().to_string(),
                ),
            ],
        )))?;
        // Only now: until the record says running, the snapshot is the
        // sandbox.
        if !keep && let Err(e) = std::fs::remove_dir_all(&dir) {
            tracing::error!(sandbox = %self.id, "removing the used snapshot {}: {e}", dir.display());
        }
        Ok(self.record.clone())
    }
}

impl SandboxState {
    /// Publish the snapshot in `dir` (just written by a pause) to the
    /// object store as `sandboxes/<id>/<ms>`, deduplicated against the
    /// sandbox's previous one, which it then replaces. Returns what the
    /// pause's log entry says about it.
    async fn publish(&mut self, dir: &std::path::Path) -> Result<String, ObjectsError> {
        let Some(objects) = self.shared.objects.clone() else {
            return Ok("no object store".into());
        };
        let previous = self.record.snapshot_object.clone();
        let mut known = Vec::new();
        if let Some(name) = &previous {
            // A previous snapshot that cannot be read only costs dedup.
            match objects.manifest(name).await {
                Ok(m) => known.push(m),
                Err(e) => tracing::warn!(sandbox = %self.id, "previous snapshot {name}: {e}"),
            }
        }
        // What the sandbox did not change of its booted template.
        known.extend(self.shared.template_manifest(&self.record.template).await);
        let known = KnownChunks::from_manifests(&known);
        let name = format!("sandboxes/{}/{}", self.id, now_ms());
        let mut record = self.record.clone();
        record.snapshot_dir = None;
        record.snapshot_object = Some(name.clone());
        let metadata = SnapshotMetadata {
            kind: "pause".into(),
            template_id: Some(self.record.template.clone()),
            runtime: Some(self.shared.runtime.kind().to_string()),
            sandbox_id: Some(self.record.id.clone()),
            // The record travels with the snapshot: another node resumes
            // the sandbox from it (same id, token, metadata, deadline).
            extra: serde_json::to_value(&record).unwrap_or_default(),
        };
        let (_, stats) = objects.put_dir(dir, &name, metadata, &known).await?;
        // The snapshot is the sandbox only once the claim says so: until
        // then another node that took the sandbox over would resume its
        // own older snapshot.
        let claim = match self
            .write_own_claim(&objects, ClaimState::Paused, Some(&name))
            .await
        {
            Ok(c) => c,
            Err(e) => {
                if let Err(d) = objects.delete(&name).await {
                    tracing::warn!(sandbox = %self.id, "removing the unclaimed snapshot {name}: {d}");
                }
                return Err(e);
            }
        };
        self.record.claim_epoch = Some(claim.epoch);
        self.record.snapshot_object = Some(name.clone());
        if let Some(old) = previous
            && old != name
            && let Err(e) = objects.delete(&old).await
        {
            // Its chunks are shared with the new one; the manifest alone
            // leaks until the sandbox is killed.
            tracing::warn!(sandbox = %self.id, "removing the previous snapshot {old}: {e}");
        }
        Ok(format!(
            "{name}: {} uploaded, {} deduplicated, {} zero of {} chunks; {} bytes sent in {} ms",
            stats.uploaded_chunks,
            stats.deduplicated_chunks,
            stats.zero_chunks,
            stats.chunks,
            stats.bytes_uploaded,
            stats.elapsed.as_millis()
        ))
    }

    /// Record in the object store that this node holds the sandbox in
    /// `state`, after the claim this node wrote last. Nothing to do for a
    /// sandbox never claimed (never published) or without a store. When
    /// another node took the sandbox over meanwhile, this node's copy is
    /// stale: [`SandboxError::Moved`] (the caller forgets the copy).
    async fn claim(
        &mut self,
        state: ClaimState,
        snapshot: Option<&str>,
    ) -> Result<(), SandboxError> {
        let (Some(objects), Some(_)) = (self.shared.objects.clone(), self.record.claim_epoch)
        else {
            return Ok(());
        };
        match self.write_own_claim(&objects, state, snapshot).await {
            Ok(claim) => {
                self.record.claim_epoch = Some(claim.epoch);
                self.save(None)
            }
            Err(ObjectsError::ClaimTaken { current, .. }) => {
                let holder = current.map_or_else(|| "none (it was killed)".to_owned(), |c| c.node);
                Err(SandboxError::Moved(self.record.id.clone(), holder))
            }
            Err(e) => Err(SandboxError::ObjectStore(format!(
                "sandbox {} stays paused: the object store ({}) must record that this node runs it, and failed: {e}; retry when the store is back",
                self.record.id,
                objects.describe()
            ))),
        }
    }

    /// Write the sandbox's next claim, naming this node, after the one
    /// this node wrote last. A claim in force that names this node is this
    /// node's own (a write whose answer was lost): the write follows it.
    async fn write_own_claim(
        &mut self,
        objects: &crate::objects::SnapshotStore,
        state: ClaimState,
        snapshot: Option<&str>,
    ) -> Result<crate::objects::Claim, ObjectsError> {
        let me = self.shared.node_id.clone();
        let id = self.id.as_str().to_owned();
        match objects
            .write_claim(&id, self.record.claim_epoch, state, &me, snapshot)
            .await
        {
            Err(ObjectsError::ClaimTaken {
                current: Some(c), ..
            }) if c.node == me => {
                objects
                    .write_claim(&id, Some(c.epoch), state, &me, snapshot)
                    .await
            }
            r => r,
        }
    }

    /// A resume that claimed the sandbox as running failed before it ran:
    /// claim it paused again at its snapshot, so that it is not taken for
    /// lost if this node dies. `claimed_at`: the epoch before the resume.
    async fn unclaim_running(&mut self, claimed_at: Option<u64>) {
        if self.record.claim_epoch == claimed_at {
            return;
        }
        let snapshot = self.record.snapshot_object.clone();
        if let Err(e) = self.claim(ClaimState::Paused, snapshot.as_deref()).await {
            tracing::warn!(sandbox = %self.id, "claiming the sandbox paused again after a failed resume: {e}");
        }
    }

    /// The pause could not publish its snapshot: bring the sandbox back
    /// from the local copy so that it keeps running, and say so.
    async fn resume_after_failed_publish(&mut self, e: ObjectsError) -> SandboxError {
        metrics::counter!(crate::metrics::PAUSES, "result" => "store_failed").increment(1);
        let store = self
            .shared
            .objects
            .as_ref()
            .map_or_else(String::new, |o| o.describe().to_owned());
        tracing::warn!(sandbox = %self.id, "publishing the snapshot to {store} failed: {e}");
        let _ = self.save(None);
        match self
            .resume_claimed(self.record.end_at_ms, false, false)
            .await
        {
            Ok(_) => SandboxError::ObjectStore(format!(
                "pausing sandbox {} failed: the object store ({store}) refused its snapshot: {e}; \
                 the sandbox keeps running — retry the pause when the store is back",
                self.record.id
            )),
            Err(r) => SandboxError::ObjectStore(format!(
                "pausing sandbox {} failed: the object store ({store}) refused its snapshot: {e}; \
                 resuming it from its local snapshot failed too ({r}), so it stays paused on \
                 this node only",
                self.record.id
            )),
        }
    }

    /// The local copy of the paused sandbox's snapshot if it is there
    /// whole (with the runtime's manifest), else a new one fetched from the
    /// object store.
    async fn local_snapshot(&mut self) -> Result<std::path::PathBuf, SandboxError> {
        let local = self.record.snapshot_dir.clone();
        if let Some(dir) = &local
            && dir.join("manifest.json").is_file()
        {
            return Ok(dir.clone());
        }
        let (Some(objects), Some(name)) = (
            self.shared.objects.clone(),
            self.record.snapshot_object.clone(),
        ) else {
            let why = match &local {
                Some(dir) => format!("its snapshot {} is gone", dir.display()),
                None => "paused without a snapshot".into(),
            };
            return Err(SandboxError::Lost(self.record.id.clone(), why));
        };
        if let Some(dir) = &local {
            // Incomplete: it would only be in the way.
            let _ = std::fs::remove_dir_all(dir);
        }
        let dest = self
            .shared
            .snapshots_dir
            .join(format!("{}-{}", self.record.id, now_ms()));
        let (_, stats) = objects.get_dir(&name, &dest, None).await.map_err(|e| {
            SandboxError::ObjectStore(format!(
                "resuming sandbox {} needs its snapshot {name} from the object store ({}): {e}; \
                 it stays paused",
                self.record.id,
                objects.describe()
            ))
        })?;
        tracing::info!(sandbox = %self.id, snapshot = %name, took = ?stats.elapsed,
            bytes = stats.bytes_downloaded, "snapshot fetched from the object store");
        self.record.snapshot_dir = Some(dest.clone());
        self.save(None)?;
        Ok(dest)
    }
}

/// Bytes of the files under `dir` (a snapshot's size), 0 if unreadable.
fn dir_size(dir: &std::path::Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => dir_size(&e.path()),
            Ok(t) if t.is_file() => e.metadata().map(|m| m.len()).unwrap_or(0),
            _ => 0,
        })
        .sum()
}

impl Actor for SandboxActor {
    type Msg = SandboxMsg;
    type State = SandboxState;
    type Arguments = SandboxArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<SandboxMsg>,
        args: SandboxArgs,
    ) -> Result<SandboxState, ActorProcessingErr> {
        let SandboxArgs {
            shared,
            mut record,
            start,
            ready,
        } = args;
        let id = SandboxId::new(record.id.clone())?;
        let created = async {
            let (instance, env_vars, current_token) = match start {
                Start::Create {
                    template,
                    limits,
                    env_vars,
                } => (
                    shared.runtime.create(&id, &template, limits).await?,
                    env_vars,
                    None,
                ),
                Start::Restore {
                    template,
                    snapshot,
                    limits,
                    env_vars,
                    source_token,
                } => (
                    shared
                        .runtime
                        .restore(&id, &template, &snapshot, limits)
                        .await?,
                    env_vars,
                    Some(source_token),
                ),
                Start::BootWithFiles {
                    template,
                    files,
                    limits,
                    env_vars,
                } => (
                    shared
                        .runtime
                        .boot_with_files(&id, &template, &files, limits)
                        .await?,
                    env_vars,
                    None,
                ),
                Start::Adopt { from } => return Ok(Began::Adopted { from }),
            };
            // Every sandbox from one template snapshot starts identical:
            // its identity comes with /init (as E2B's does).
            let mut env_vars = env_vars;
            env_vars.insert("E2B_SANDBOX".into(), "true".into());
            env_vars.insert("E2B_SANDBOX_ID".into(), record.id.clone());
            env_vars.insert("E2B_TEMPLATE_ID".into(), record.template.clone());
            if let Err(detail) = init_envd(
                &*shared.runtime,
                &id,
                &env_vars,
                &record.envd_access_token,
                current_token.as_deref(),
            )
            .await
            {
                return Err(SandboxError::Init {
                    id: record.id.clone(),
                    detail,
                });
            }
            record.state = RecordState::Running;
            shared.store.put_sandbox(&record)?;
            Ok(Began::Created(instance))
        }
        .await;
        let instance = match created {
            Ok(i) => i,
            Err(e) => {
                tracing::warn!(sandbox = %id, "create failed: {e}");
                // create undoes itself; a failed /init leaves a running guest.
                match shared.runtime.kill(&id).await {
                    Ok(()) => {
                        let _ = shared.store.remove_sandbox(&record.id);
                    }
                    Err(k) => {
                        tracing::error!(sandbox = %id, "cleaning up after a failed create: {k}")
                    }
                }
                let msg = e.to_string();
                let _ = ready.send(Err(e));
                return Err(msg.into());
            }
        };
        let created = matches!(instance, Began::Created(_));
        let first = match instance {
            Began::Created(i) => {
                tracing::info!(sandbox = %id, template = %record.template,
                    ready_after = ?i.ready_after, "sandbox created");
                log_entry(
                    LogLevel::Info,
                    "sandbox created",
                    [
                        ("template", record.template.clone()),
                        ("runtime", record.runtime.clone()),
                        ("vcpus", record.vcpus.to_string()),
                        ("memory_mib", record.memory_mib.to_string()),
                        ("ready_after_us", i.ready_after.as_micros().to_string()),
                        ("runtime_start_us", i.runtime_start.as_micros().to_string()),
                    ],
                )
            }
            Began::Adopted { from: Some(from) } => log_entry(
                LogLevel::Warn,
                "paused sandbox taken over from the object store",
                [
                    ("from_node", from),
                    (
                        "snapshot",
                        record.snapshot_object.clone().unwrap_or_default(),
                    ),
                ],
            ),
            Began::Adopted { from: None } => {
                tracing::info!(sandbox = %id, template = %record.template, state = ?record.state,
                    "sandbox re-adopted after a node restart");
                log_entry(
                    LogLevel::Warn,
                    "sandbox re-adopted after a node restart",
                    [
                        ("template", record.template.clone()),
                        ("state", format!("{:?}", record.state).to_lowercase()),
                    ],
                )
            }
        };
        {
            let mut live = shared.live.lock().unwrap();
            match live.get_mut(&record.id) {
                // Taken over from a failed actor: keep its log.
                Some(l) => {
                    l.actor = myself.clone();
                    l.record = record.clone();
                    push_bounded(&mut l.events, MAX_EVENTS, first);
                }
                None => {
                    live.insert(
                        record.id.clone(),
                        Live {
                            record: record.clone(),
                            actor: myself.clone(),
                            events: VecDeque::from([first]),
                            samples: VecDeque::new(),
                            cut: tokio::sync::watch::channel(false).0,
                        },
                    );
                }
            }
        }
        // Registered while this actor lives: a stopped actor leaves its
        // groups by itself (and a replacement joins again).
        ractor::pg::join_scoped(
            crate::directory::scope(&shared.node_id),
            record.id.clone(),
            vec![myself.get_cell()],
        );
        let mut state = SandboxState {
            shared,
            id,
            record: record.clone(),
            timer: None,
        };
        state.arm(&myself);
        if created && state.shared.objects.is_some() {
            let _ = myself.cast(SandboxMsg::ClaimCreated);
        }
        if ready.send(Ok(record)).is_err() {
            tracing::warn!(sandbox = %state.id, "the create request went away; the sandbox keeps running until its timeout");
        }
        Ok(state)
    }

    async fn handle(
        &self,
        myself: ActorRef<SandboxMsg>,
        msg: SandboxMsg,
        st: &mut SandboxState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            SandboxMsg::Deadline => {
                if now_ms() < st.record.end_at_ms {
                    // A timer that fired as the deadline moved: re-arm.
                    st.arm(&myself);
                    return Ok(());
                }
                if st.record.state != RecordState::Running {
                    return Ok(());
                }
                metrics::counter!(crate::metrics::TIMED_OUT).increment(1);
                if st.record.auto_pause {
                    tracing::info!(sandbox = %st.id, "timeout reached: pausing (autoPause)");
                    match st.pause("timeout (autoPause)").await {
                        Ok(_) => return Ok(()),
                        Err(e) => {
                            tracing::error!(sandbox = %st.id, "auto-pause failed, killing instead: {e}")
                        }
                    }
                } else {
                    tracing::info!(sandbox = %st.id, "timeout reached: killing");
                }
                if let Err(e) = kill(&st.shared, &st.id, st.record.snapshot_dir.as_deref()).await {
                    tracing::error!(sandbox = %st.id, "kill at timeout failed: {e}");
                }
                myself.stop(Some("timeout".into()));
            }
            SandboxMsg::SetDeadline {
                end_at_ms,
                only_extend,
                reply,
            } => {
                if !only_extend || end_at_ms > st.record.end_at_ms {
                    st.record.end_at_ms = end_at_ms;
                    if let Err(e) = st.shared.store.put_sandbox(&st.record) {
                        tracing::error!(sandbox = %st.id, "saving the new deadline: {e}");
                    }
                    if let Some(l) = st.shared.live.lock().unwrap().get_mut(st.id.as_str()) {
                        l.record.end_at_ms = end_at_ms;
                        push_bounded(
                            &mut l.events,
                            MAX_EVENTS,
                            log_entry(
                                LogLevel::Info,
                                "timeout set",
                                [("end_at", rfc3339_ms(end_at_ms))],
                            ),
                        );
                    }
                    st.arm(&myself);
                }
                let _ = reply.send(st.record.clone());
            }
            SandboxMsg::Lost { reason } => {
                if st.record.state != RecordState::Running
                    || !st.shared.live.lock().unwrap().contains_key(st.id.as_str())
                {
                    // Paused (nothing runs), or being killed already.
                    return Ok(());
                }
                tracing::error!(sandbox = %st.id, "sandbox lost: {reason}; cleaning up");
                metrics::counter!(crate::metrics::LOST).increment(1);
                st.shared.remember_lost(st.id.as_str(), &reason);
                if let Err(e) = kill(&st.shared, &st.id, None).await {
                    tracing::error!(sandbox = %st.id, "cleaning up a lost sandbox: {e}");
                }
                myself.stop(Some("lost".into()));
            }
            SandboxMsg::Kill { reply } => {
                let r = kill(&st.shared, &st.id, st.record.snapshot_dir.as_deref()).await;
                let _ = reply.send(r);
                myself.stop(Some("killed".into()));
            }
            SandboxMsg::Pause { reply } => {
                let r = st.pause("requested").await;
                if r.is_err() && st.record.state == RecordState::Running {
                    // Refused, or brought back after the store failed.
                    st.arm(&myself);
                }
                let lost = st.lost_in_a_save(&r).await;
                let _ = reply.send(r);
                if lost {
                    myself.stop(Some("lost".into()));
                }
            }
            SandboxMsg::ClaimCreated => {
                if let Some(objects) = st.shared.objects.clone()
                    && st.record.claim_epoch.is_none()
                    && st.record.state == RecordState::Running
                {
                    match objects
                        .write_claim(
                            st.id.as_str(),
                            None,
                            ClaimState::Running,
                            &st.shared.node_id,
                            None,
                        )
                        .await
                    {
                        Ok(c) => {
                            st.record.claim_epoch = Some(c.epoch);
                            if let Err(e) = st.save(None) {
                                tracing::error!(sandbox = %st.id, "saving the claim: {e}");
                            }
                        }
                        // Only costs what others can say if this node dies.
                        Err(e) => {
                            tracing::warn!(sandbox = %st.id, "recording the new sandbox in the object store: {e}")
                        }
                    }
                }
            }
            SandboxMsg::Prefetch => {
                if st.record.state == RecordState::Paused
                    && let Err(e) = st.local_snapshot().await
                {
                    tracing::warn!(sandbox = %st.id, "fetching the snapshot ahead of a resume: {e}");
                }
            }
            SandboxMsg::Copy {
                dest,
                files_only,
                reply,
            } => {
                let r = st.copy(&dest, files_only).await.map(|()| st.record.clone());
                if st.record.state == RecordState::Running {
                    st.arm(&myself);
                }
                let lost = st.lost_in_a_save(&r).await;
                let _ = reply.send(r);
                if lost {
                    myself.stop(Some("lost".into()));
                }
            }
            SandboxMsg::Resume { end_at_ms, reply } => {
                let r = st.resume(end_at_ms).await;
                if r.is_ok() {
                    st.arm(&myself);
                }
                let moved = matches!(r, Err(SandboxError::Moved(..)));
                if let Err(SandboxError::Moved(_, holder)) = &r {
                    tracing::warn!(sandbox = %st.id, %holder, "another node took the paused sandbox over: forgetting this node's copy");
                    if let Err(e) =
                        forget(&st.shared, &st.id, st.record.snapshot_dir.as_deref()).await
                    {
                        tracing::error!(sandbox = %st.id, "forgetting a sandbox another node holds: {e}");
                    }
                }
                let _ = reply.send(r);
                if moved {
                    myself.stop(Some("moved".into()));
                }
            }
        }
        Ok(())
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<SandboxMsg>,
        st: &mut SandboxState,
    ) -> Result<(), ActorProcessingErr> {
        if let Some(t) = st.timer.take() {
            t.abort();
        }
        Ok(())
    }
}

/// Stop routing to the sandbox, remove it from the runtime and forget it.
/// If the runtime cannot remove it, the record stays in sled so that the
/// next node start retries.
pub(super) async fn kill(
    shared: &Shared,
    id: &SandboxId,
    snapshot: Option<&std::path::Path>,
) -> Result<(), SandboxError> {
    remove(shared, id, snapshot, Removal::Killed).await
}

/// Drop this node's copy of a sandbox that another node holds now (it
/// took the paused sandbox over).
pub(super) async fn forget(
    shared: &Shared,
    id: &SandboxId,
    snapshot: Option<&std::path::Path>,
) -> Result<(), SandboxError> {
    remove(shared, id, snapshot, Removal::HeldElsewhere).await
}

/// Why a sandbox leaves this node for good.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Removal {
    /// Killed: its published snapshots and claims go too.
    Killed,
    /// Another node holds it now: the object store, that node's now, is
    /// left alone.
    HeldElsewhere,
}

/// Remove sandbox `id` from this node: routing, the runtime's sandbox,
/// the local snapshot `snapshot` and the record (last: a node that dies
/// half-way finds the record and finishes on restart).
async fn remove(
    shared: &Shared,
    id: &SandboxId,
    snapshot: Option<&std::path::Path>,
    removal: Removal,
) -> Result<(), SandboxError> {
    shared.cut_connections(id.as_str());
    shared.live.lock().unwrap().remove(id.as_str());
    // A sandbox held elsewhere: only what this node's runtime has. Some of
    // an id's resources are named host-wide (gVisor's network
    // namespaces), and the node that holds the sandbox now may run it on
    // this same host.
    let here = removal == Removal::Killed
        || shared
            .runtime
            .list()
            .await
            .map_or(true, |l| l.iter().any(|r| r.id == *id));
    if here {
        shared.runtime.kill(id).await?;
    }
    remove_snapshot(snapshot)?;
    // Its published snapshots and claims go with a kill (chunks stay until
    // GC). A store that cannot be reached now leaves them behind, which
    // costs space but never a kill.
    if removal == Removal::Killed
        && let Some(objects) = &shared.objects
    {
        forget_in_store(objects, id.as_str()).await;
    }
    shared.store.remove_sandbox(id.as_str())?;
    match removal {
        Removal::Killed => tracing::info!(sandbox = %id, "sandbox killed"),
        Removal::HeldElsewhere => {
            tracing::info!(sandbox = %id, "sandbox forgotten: another node holds it")
        }
    }
    Ok(())
}

/// Remove sandbox `id`'s claims and published snapshots from the object
/// store (their chunks stay until GC). Failures are logged: they cost
/// space, never a kill.
pub(crate) async fn forget_in_store(objects: &crate::objects::SnapshotStore, id: &str) {
    // The claims first: without them nobody takes the sandbox for alive.
    if let Err(e) = objects.forget_claims(id).await {
        tracing::warn!(sandbox = %id, "removing its claims: {e}");
    }
    let prefix = format!("sandboxes/{id}");
    match objects.list(&prefix).await {
        Ok(names) => {
            for name in names {
                if let Err(e) = objects.delete(&name).await {
                    tracing::warn!(sandbox = %id, "removing its snapshot {name}: {e}");
                }
            }
        }
        Err(e) => tracing::warn!(sandbox = %id, "listing its snapshots: {e}"),
    }
}

fn remove_snapshot(snapshot: Option<&std::path::Path>) -> Result<(), SandboxError> {
    if let Some(dir) = snapshot
        && let Err(e) = std::fs::remove_dir_all(dir)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        return Err(SandboxError::Io(format!(
            "removing the snapshot {}: {e}",
            dir.display()
        )));
    }
    Ok(())
}

/// A lifecycle event of a sandbox, stamped now.
pub(super) fn log_entry<const N: usize>(
    level: LogLevel,
    message: &str,
    fields: [(&str, String); N],
) -> SandboxLogEntry {
    SandboxLogEntry {
        timestamp: rfc3339_ms(now_ms()),
        message: message.to_owned(),
        level,
        fields: fields.into_iter().map(|(k, v)| (k.to_owned(), v)).collect(),
    }
}
