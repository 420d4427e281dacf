//! [`SandboxSupervisor`] and the re-adoption of sandboxes after a node
//! restart.

use super::*;

/// After a node restart: take over every sandbox sled remembers that the
/// runtime still runs, and every paused one whose snapshot is complete;
/// clean up the rest (sandboxes that died while the node was down, creates
/// cut short by a crash, runtime leftovers and snapshot directories sled
/// does not know). `known_template` says whether this node still serves a
/// template.
///
/// A pause cut short by a crash counts only if the runtime wrote the
/// snapshot's manifest (it writes it last); otherwise the sandbox is still
/// running (the save never began) or lost. A resume cut short after the
/// runtime restored the sandbox finds it running: it is adopted as such.
pub(crate) async fn readopt(
    shared: &Arc<Shared>,
    supervisor: &ActorRef<SupervisorMsg>,
    known_template: &(dyn Fn(&str) -> bool + Sync),
) -> Result<(), SandboxError> {
    let on_node = shared.runtime.list().await?;
    let running: HashMap<String, crate::runtime::SandboxState> = on_node
        .iter()
        .map(|r| (r.id.as_str().to_owned(), r.state))
        .collect();
    let records = shared.store.sandboxes()?;
    for record in &records {
        let mut record = record.clone();
        let alive = running.get(&record.id) == Some(&crate::runtime::SandboxState::Running);
        let complete = record
            .snapshot_dir
            .as_ref()
            .is_some_and(|d| d.join("manifest.json").is_file());
        match record.state {
            RecordState::Pausing | RecordState::Paused if alive => {
                // Saved and restored again, or never saved: it runs.
                if let Some(dir) = record.snapshot_dir.take() {
                    let _ = std::fs::remove_dir_all(dir);
                }
                record.state = RecordState::Running;
                shared.store.put_sandbox(&record)?;
            }
            RecordState::Pausing if complete => {
                record.state = RecordState::Paused;
                shared.store.put_sandbox(&record)?;
            }
            _ => {}
        }
        let usable = match record.state {
            RecordState::Running => alive && record.end_at_ms > now_ms(),
            // The local copy is only a cache of a published snapshot: the
            // resume fetches it again.
            RecordState::Paused => complete || record.snapshot_object.is_some(),
            RecordState::Creating | RecordState::Pausing => false,
        } && known_template(&record.template);
        if usable && !still_ours(shared, &mut record).await {
            let forgotten = match SandboxId::new(record.id.clone()) {
                Ok(id) => forget(shared, &id, record.snapshot_dir.as_deref()).await,
                Err(_) => shared.store.remove_sandbox(&record.id).map_err(Into::into),
            };
            if let Err(e) = forgotten {
                tracing::error!(sandbox = %record.id, "forgetting a sandbox another node holds: {e}");
            }
            continue;
        }
        if usable {
            adopt(shared, &record, supervisor, None).await?;
            continue;
        }
        tracing::warn!(sandbox = %record.id, state = ?record.state, alive,
            "sandbox not re-adopted (gone, stopped, half-created or past its timeout): cleaning up");
        // A failed clean-up keeps the record: the next start retries.
        let cleaned = match SandboxId::new(record.id.clone()) {
            Ok(id) => kill(shared, &id, record.snapshot_dir.as_deref()).await,
            Err(_) => shared.store.remove_sandbox(&record.id).map_err(Into::into),
        };
        if let Err(e) = cleaned {
            tracing::error!(sandbox = %record.id, "cleaning up: {e}");
        }
    }
    for r in on_node {
        if !records.iter().any(|rec| rec.id == r.id.as_str()) {
            tracing::warn!(sandbox = %r.id, "runtime leftover unknown to the node: killing it");
            if let Err(e) = shared.runtime.kill(&r.id).await {
                tracing::error!(sandbox = %r.id, "killing a runtime leftover: {e}");
            }
        }
    }
    // Snapshot directories no record names: resumed (the removal was cut
    // short) or never finished.
    let named: Vec<std::path::PathBuf> = shared
        .store
        .sandboxes()?
        .into_iter()
        .filter_map(|r| r.snapshot_dir)
        .collect();
    if let Ok(entries) = std::fs::read_dir(&shared.snapshots_dir) {
        for e in entries.flatten() {
            if !named.contains(&e.path()) {
                tracing::warn!(dir = %e.path().display(), "snapshot no sandbox names: removing it");
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
    Ok(())
}

/// Supervises the [`SandboxActor`]s. A sandbox actor that fails (an error
/// or a panic in its handler) is reported here: its sandbox is removed from
/// routing and killed, and the node goes on. (ractor's default would stop
/// the supervisor with its child.)
pub struct SandboxSupervisor;

/// How often the supervisor checks that the runtime still runs every
/// sandbox (a cheap `runtime.list()`).
pub const SWEEP_EVERY: Duration = Duration::from_secs(2);

pub enum SupervisorMsg {
    /// Compare the live sandboxes with what the runtime runs.
    Sweep,
    /// Fail, as a bug would (tests of the node supervisor's restart).
    #[doc(hidden)]
    Fail,
}

// Local only: with ractor's `cluster` feature on (ractor_cluster is in the
// graph) every message type says whether it can cross nodes; this one cannot.
impl ractor::Message for SupervisorMsg {}

/// Whether the object store still says this node holds sandbox `record`
/// (a node that was down or cut off may find that another took its paused
/// sandbox over, or that a sandbox was killed through another node while
/// this one was dead). A store that cannot be asked now leaves the answer
/// to the resume, which claims the sandbox first.
///
/// A claim naming this node is this node's whatever its epoch (a write
/// whose answer was lost leaves the record one behind): the record takes
/// its epoch.
async fn still_ours(shared: &Shared, record: &mut SandboxRecord) -> bool {
    let (Some(objects), Some(_)) = (&shared.objects, record.claim_epoch) else {
        return true;
    };
    match objects.claim(&record.id).await {
        Ok(Some(c)) if c.node == shared.node_id => {
            if record.claim_epoch != Some(c.epoch) {
                record.claim_epoch = Some(c.epoch);
                if let Err(e) = shared.store.put_sandbox(record) {
                    tracing::warn!(sandbox = %record.id, "saving the claim's epoch: {e}");
                }
            }
            true
        }
        Ok(current) => {
            let now = current.map_or_else(|| "no claim (killed)".to_owned(), |c| c.to_string());
            tracing::warn!(sandbox = %record.id, "sandbox held elsewhere now ({now}): dropping this node's copy");
            false
        }
        Err(e) => {
            tracing::warn!(sandbox = %record.id, "cannot check who holds the sandbox: {e}; keeping it");
            true
        }
    }
}

/// What the object store says about a sandbox this node does not have.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TakeOver {
    /// It is this node's now, paused (taken over, or it was already).
    Taken,
    /// A live node holds it.
    HeldBy(String),
    /// It ran on `node` when last recorded: lost with that node.
    LostWith(String),
    /// The store knows nothing of it (never paused, killed, or no store).
    Unknown,
}

/// Take over paused sandbox `id` from the object store (its node is dead,
/// or this node lost its record of it), unless a node that `alive` accepts
/// holds it. The claim decides: of nodes that try at once, one wins.
pub(crate) async fn take_over(
    shared: &Arc<Shared>,
    supervisor: &ActorRef<SupervisorMsg>,
    id: &str,
    alive: &(dyn Fn(&str) -> bool + Sync),
) -> Result<TakeOver, SandboxError> {
    let Some(objects) = shared.objects.clone() else {
        return Ok(TakeOver::Unknown);
    };
    // An id no sandbox can have (the 404 says so) is not looked up.
    if SandboxId::new(id.to_owned()).is_err() || crate::objects::check_name(id).is_err() {
        return Ok(TakeOver::Unknown);
    }
    let store_error = |e: crate::objects::ObjectsError| {
        SandboxError::ObjectStore(format!(
            "sandbox {id} is not on a live node; asking the object store ({}) for it failed: {e}",
            objects.describe()
        ))
    };
    // A lost race is followed by another look: the winner may have been
    // this node's own concurrent call, or a node that died since.
    for _ in 0..3 {
        if shared.live.lock().unwrap().contains_key(id) {
            return Ok(TakeOver::Taken);
        }
        let Some(claim) = objects.claim(id).await.map_err(store_error)? else {
            return Ok(TakeOver::Unknown);
        };
        let from_elsewhere = claim.node != shared.node_id;
        if from_elsewhere && alive(&claim.node) {
            return Ok(TakeOver::HeldBy(claim.node));
        }
        if claim.state == crate::objects::ClaimState::Running {
            return Ok(TakeOver::LostWith(claim.node));
        }
        let Some(snapshot) = claim.snapshot.clone() else {
            return Err(SandboxError::ObjectStore(format!(
                "sandbox {id}: its claim says paused but names no snapshot"
            )));
        };
        let manifest = objects.manifest(&snapshot).await.map_err(store_error)?;
        let mut record: SandboxRecord = serde_json::from_value(manifest.metadata.extra.clone())
            .map_err(|e| {
                SandboxError::ObjectStore(format!(
                    "sandbox {id}: snapshot {snapshot} carries no sandbox record this node reads: {e}"
                ))
            })?;
        if record.id != id {
            return Err(SandboxError::ObjectStore(format!(
                "sandbox {id}: snapshot {snapshot} is of sandbox {}",
                record.id
            )));
        }
        let runtime = shared.runtime.kind().to_string();
        if record.runtime != runtime {
            return Err(SandboxError::ObjectStore(format!(
                "sandbox {id} was paused by the {} runtime; this node runs {runtime} and cannot restore it",
                record.runtime
            )));
        }
        // Refused before claiming: a node without the template must leave
        // the sandbox to one that has it.
        shared.template(&record.template).await?;
        let taken = match objects
            .write_claim(
                id,
                Some(claim.epoch),
                crate::objects::ClaimState::Paused,
                &shared.node_id,
                Some(&snapshot),
            )
            .await
        {
            Ok(c) => c,
            Err(crate::objects::ObjectsError::ClaimTaken { .. }) => continue,
            Err(e) => return Err(store_error(e)),
        };
        record.state = RecordState::Paused;
        record.snapshot_dir = None;
        record.snapshot_object = Some(snapshot.clone());
        record.claim_epoch = Some(taken.epoch);
        shared.store.put_sandbox(&record)?;
        let from = from_elsewhere.then(|| claim.node.clone());
        adopt(shared, &record, supervisor, from.clone()).await?;
        metrics::counter!(crate::metrics::TAKEN_OVER).increment(1);
        tracing::info!(sandbox = %id, from = from.as_deref().unwrap_or("this node"), %snapshot,
            "paused sandbox taken over from the object store");
        return Ok(TakeOver::Taken);
    }
    Err(SandboxError::ObjectStore(format!(
        "sandbox {id} kept changing hands while this node tried to take it over; retry"
    )))
}

/// Start a SandboxActor under `supervisor` that takes over the running or
/// paused sandbox of `record`, and wait until it has. `from`: the node it
/// is taken over from (`None`: this node, after a restart).
async fn adopt(
    shared: &Arc<Shared>,
    record: &SandboxRecord,
    supervisor: &ActorRef<SupervisorMsg>,
    from: Option<String>,
) -> Result<(), SandboxError> {
    let (ready, ready_rx) = oneshot::channel();
    let args = SandboxArgs {
        shared: shared.clone(),
        record: record.clone(),
        start: Start::Adopt { from },
        ready,
    };
    Actor::spawn_linked(None, SandboxActor, args, supervisor.get_cell())
        .await
        .map_err(|e| SandboxError::Actor(e.to_string()))?;
    ready_rx.await.map_err(|_| SandboxError::Stopping)??;
    Ok(())
}

/// After the sandbox supervisor was replaced: its actors went with it
/// (ractor stops an actor's children when it ends), the sandboxes did not.
/// Start a new actor for each sandbox in `live` (it takes the sandbox over
/// as after a node restart, keeping its log), and clean up creates that
/// were cut short. Returns how many sandboxes were taken over.
pub(crate) async fn adopt_orphans(
    shared: &Arc<Shared>,
    supervisor: &ActorRef<SupervisorMsg>,
) -> Result<usize, SandboxError> {
    let records: Vec<SandboxRecord> = {
        let live = shared.live.lock().unwrap();
        live.values().map(|l| l.record.clone()).collect()
    };
    for record in &records {
        adopt(shared, record, supervisor, None).await?;
    }
    for record in shared.store.sandboxes()? {
        if record.state == RecordState::Creating
            && !shared.live.lock().unwrap().contains_key(&record.id)
            && let Ok(id) = SandboxId::new(record.id.clone())
        {
            tracing::warn!(sandbox = %id, "a create was cut short by the supervisor's failure: cleaning up");
            if let Err(e) = kill(shared, &id, None).await {
                tracing::error!(sandbox = %id, "cleaning up a cut-short create: {e}");
            }
        }
    }
    Ok(records.len())
}

impl Actor for SandboxSupervisor {
    type Msg = SupervisorMsg;
    type State = Arc<Shared>;
    type Arguments = Arc<Shared>;

    async fn pre_start(
        &self,
        myself: ActorRef<SupervisorMsg>,
        shared: Arc<Shared>,
    ) -> Result<Arc<Shared>, ActorProcessingErr> {
        // The interval task ends when the supervisor stops.
        myself.send_interval(SWEEP_EVERY, || SupervisorMsg::Sweep);
        Ok(shared)
    }

    async fn handle(
        &self,
        _myself: ActorRef<SupervisorMsg>,
        msg: SupervisorMsg,
        shared: &mut Arc<Shared>,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            SupervisorMsg::Fail => return Err("asked to fail".into()),
            SupervisorMsg::Sweep => {
                // Live first, then the runtime: a sandbox that enters `live`
                // in between was created before the listing, so it shows
                // as running there (the other order would report a
                // sandbox created in between as lost).
                let live: Vec<(String, ActorRef<SandboxMsg>)> = {
                    let live = shared.live.lock().unwrap();
                    live.iter()
                        .filter(|(_, l)| l.record.state == RecordState::Running)
                        .map(|(id, l)| (id.clone(), l.actor.clone()))
                        .collect()
                };
                let on_node = match shared.runtime.list().await {
                    Ok(l) => l,
                    Err(e) => {
                        tracing::warn!("checking the runtime's sandboxes: {e}");
                        return Ok(());
                    }
                };
                for (id, actor) in live {
                    let reason = match on_node.iter().find(|r| r.id.as_str() == id) {
                        Some(r) if r.state == crate::runtime::SandboxState::Running => continue,
                        Some(_) => "its runtime process died (the guest stopped)",
                        None => "the runtime no longer has it",
                    };
                    let _ = actor.cast(SandboxMsg::Lost {
                        reason: reason.into(),
                    });
                }
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<SupervisorMsg>,
        event: SupervisionEvent,
        shared: &mut Arc<Shared>,
    ) -> Result<(), ActorProcessingErr> {
        if let SupervisionEvent::ActorFailed(cell, err) = event {
            let failed = {
                let mut live = shared.live.lock().unwrap();
                let id = live
                    .iter()
                    .find(|(_, l)| l.actor.get_id() == cell.get_id())
                    .map(|(id, _)| id.clone());
                id.and_then(|id| live.remove(&id).map(|l| l.record))
            };
            if let Some(record) = failed.clone()
                && record.state == RecordState::Paused
            {
                // Nothing runs: a new actor takes the snapshot over, rather
                // than lose the user's paused sandbox to our bug.
                tracing::error!(sandbox = %record.id, "actor of a paused sandbox failed: {err}; a new one takes over");
                let (ready, _) = oneshot::channel();
                let args = SandboxArgs {
                    shared: shared.clone(),
                    record,
                    start: Start::Adopt { from: None },
                    ready,
                };
                Actor::spawn_linked(None, SandboxActor, args, myself.get_cell()).await?;
            } else if let Some(record) = failed {
                tracing::error!(sandbox = %record.id, "sandbox actor failed: {err}; killing the sandbox");
                let shared = shared.clone();
                tokio::spawn(async move {
                    if let Ok(id) = SandboxId::new(record.id.clone())
                        && let Err(e) = kill(&shared, &id, record.snapshot_dir.as_deref()).await
                    {
                        tracing::error!(sandbox = %id, "cleaning up after a failed actor: {e}");
                    }
                });
            }
        }
        Ok(())
    }
}
