//! The sandbox lifecycle on one node, on ractor actors.
//!
//! [`SandboxSupervisor`] supervises one [`SandboxActor`] per sandbox. The
//! actor runs `runtime.create` and envd's `/init` (in `pre_start`), then
//! holds the deadline timer, and it alone kills the sandbox (on `DELETE`,
//! at the deadline, or when the runtime lost it). Every call for one id
//! goes through its actor, so runtime calls for an id never overlap, as the
//! runtime contract requires. The service the REST handlers and the proxy
//! call is [`crate::service::Sandboxes`]; [`Shared`] is what it and the
//! actors share.
//!
//! - **Restart**: sandboxes outlive the node. At start, [`readopt`]
//!   re-adopts every sandbox sled remembers that the runtime still runs
//!   (same id, token, metadata and deadline) and cleans up the rest.
//! - **Runtime crash**: the supervisor compares the live sandboxes with
//!   `runtime.list()` every [`SWEEP_EVERY`]; a sandbox whose runtime
//!   process died is cleaned up and later calls for it say why (404/502
//!   "... was lost (...)"). A failed actor (error or panic) has its sandbox
//!   killed; the node goes on.
//! - **Registry**: each actor (running or paused sandbox) is the
//!   sandbox's entry in the cluster's registry while it lives
//!   ([`crate::directory`]).

mod actor;
mod envd;
pub mod http;
pub mod process;
mod supervisor;

pub use actor::{SandboxActor, SandboxMsg};
pub(crate) use actor::{SandboxArgs, Start};
pub(crate) use envd::envd_metrics;
pub use supervisor::TakeOver;
pub use supervisor::{SWEEP_EVERY, SandboxSupervisor, SupervisorMsg};
pub(crate) use supervisor::{adopt_orphans, readopt, take_over};

pub(crate) use actor::forget_in_store;
use actor::{forget, kill};

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use ractor::rpc::CallResult;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};
use schema::e2b::{self, LogLevel, SandboxLogEntry, SandboxMetric, SandboxStateName};
use tokio::sync::oneshot;

use crate::clock::{now_ms, rfc3339_ms};
use crate::placement::PlacementMsg;
use crate::runtime::{ENVD_PORT, Limits, Runtime, RuntimeError, SandboxId, Template};
use crate::store::{RecordState, SandboxRecord, Store, StoreError, random_bytes};
use crate::template_cache::{TemplateEntry, TemplateMsg, UnknownTemplate};

/// Why a lifecycle call failed; [`SandboxError::status`] is the HTTP status.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("sandbox {0} not found")]
    NotFound(String),
    #[error("sandbox {0} not found: it was lost ({1})")]
    Lost(String, String),
    #[error("template {0:?} not found: this node serves {1}")]
    UnknownTemplate(String, String),
    #[error("{0}")]
    BadRequest(String),
    #[error(
        "template {0:?} was built over another build of its root template {1:?} than this node has (the guest root filesystem was rebuilt since): its saved memory cannot be restored here; build it again (`sandmesh template build`, or Template.build)"
    )]
    StaleTemplate(String, String),
    #[error("{0}")]
    NotImplemented(String),
    #[error("this node is at capacity ({0} sandboxes): kill a sandbox or retry later")]
    AtCapacity(usize),
    #[error("sandbox {0} is already running")]
    AlreadyRunning(String),
    #[error("sandbox {0} is already paused")]
    AlreadyPaused(String),
    #[error("sandbox {0} is paused: resume it first (Sandbox.connect)")]
    Paused(String),
    #[error("sandbox {0} could not be paused and keeps running: {1}")]
    PauseRefused(String, String),
    #[error("{0}")]
    Io(String),
    #[error("the sandbox runtime failed: {0}")]
    Runtime(#[from] RuntimeError),
    #[error("envd of sandbox {id} refused /init: {detail}")]
    Init { id: String, detail: String },
    #[error("envd of sandbox {id} did not answer: {detail}")]
    Envd { id: String, detail: String },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the node is shutting down")]
    Stopping,
    #[error("sandbox actors: {0}")]
    Actor(String),
    /// The object store failed; the message says what happened to the
    /// sandbox (a failed pause leaves it running).
    #[error("{0}")]
    ObjectStore(String),
    /// Another node took the paused sandbox over (this node was cut off
    /// from the cluster meanwhile): this node's copy is stale and gone.
    #[error(
        "sandbox {0} is held by node {1} now (it took the paused sandbox over while this node was unreachable); call again: the cluster routes the call there"
    )]
    Moved(String, String),
}

impl SandboxError {
    pub fn status(&self) -> u16 {
        match self {
            Self::NotFound(_) | Self::Lost(..) | Self::UnknownTemplate(..) => 404,
            Self::BadRequest(_) => 400,
            Self::AlreadyRunning(_)
            | Self::AlreadyPaused(_)
            | Self::Paused(_)
            | Self::PauseRefused(..)
            | Self::StaleTemplate(..)
            | Self::Moved(..) => 409,
            Self::AtCapacity(_) => 429,
            Self::NotImplemented(_) => 501,
            Self::Stopping | Self::ObjectStore(_) => 503,
            Self::Envd { .. } => 502,
            Self::Runtime(_)
            | Self::Init { .. }
            | Self::Store(_)
            | Self::Actor(_)
            | Self::Io(_) => 500,
        }
    }
}

impl From<UnknownTemplate> for SandboxError {
    fn from(e: UnknownTemplate) -> Self {
        Self::UnknownTemplate(e.name, e.served)
    }
}

/// A sandbox of this node (running or paused) and what is kept about it.
pub(crate) struct Live {
    pub(crate) record: SandboxRecord,
    pub(crate) actor: ActorRef<SandboxMsg>,
    /// What happened to the sandbox on this node (`GET .../logs`), newest
    /// last, at most [`MAX_EVENTS`].
    pub(crate) events: VecDeque<SandboxLogEntry>,
    /// Metrics samples taken so far (`GET .../metrics`), at most
    /// [`MAX_SAMPLES`].
    pub(crate) samples: VecDeque<SandboxMetric>,
    /// Set to `true` to reset every proxied connection into the sandbox
    /// (before a pause or a kill); replaced by a fresh one on resume.
    pub(crate) cut: tokio::sync::watch::Sender<bool>,
}

/// Lifecycle events kept per sandbox.
pub const MAX_EVENTS: usize = 256;
/// Metrics samples kept per sandbox.
pub const MAX_SAMPLES: usize = 720;

/// The actors the service talks to; replaced when the node supervisor
/// restarts one.
#[derive(Clone)]
pub(crate) struct Refs {
    pub templates: ActorRef<TemplateMsg>,
    pub placement: ActorRef<PlacementMsg>,
    pub sandboxes: ActorRef<SupervisorMsg>,
}

/// What the actors share with the service.
pub struct Shared {
    /// This node's id: its sandbox actors register in its scope of the
    /// cluster's registry ([`crate::directory::scope`]).
    pub(crate) node_id: String,
    pub(crate) runtime: Arc<dyn Runtime>,
    pub(crate) store: Store,
    pub(crate) live: Mutex<HashMap<String, Live>>,
    pub(crate) refs: Mutex<Option<Refs>>,
    /// Sandboxes that died under the node (runtime crash), with the reason,
    /// so that a later call for them says what happened.
    pub(crate) lost: Mutex<HashMap<String, String>>,
    /// Creates in flight (not in `live` yet), for the capacity check.
    pub(crate) creating: std::sync::atomic::AtomicUsize,
    /// Slots held for creates that placement sent (or is sending) here:
    /// token -> when the hold lapses. Counted with `live` and `creating`,
    /// under `live`'s lock (taken first).
    pub(crate) reservations: Mutex<HashMap<u64, std::time::Instant>>,
    pub(crate) snapshots_dir: std::path::PathBuf,
    /// Where pause snapshots are published (`None`: local only — tests of
    /// the lifecycle alone).
    pub(crate) objects: Option<crate::objects::SnapshotStore>,
    /// The names of the template snapshots in the object store, by
    /// template name (fetched, or published by this node): pauses and user
    /// snapshots deduplicate against their template's.
    pub(crate) template_objects: Mutex<HashMap<String, String>>,
}

impl Shared {
    pub(crate) fn remember_template_object(&self, template: &str, name: &str) {
        self.template_objects
            .lock()
            .unwrap()
            .insert(template.to_owned(), name.to_owned());
    }

    /// The manifest of template `template`'s snapshot in the object store,
    /// once it is known there. Read from the store each time, not kept:
    /// nodes that start together may each publish it, the last write wins,
    /// and the chunks of the others' are garbage a GC may delete — a
    /// snapshot deduplicated against them would miss them.
    pub(crate) async fn template_manifest(
        &self,
        template: &str,
    ) -> Option<crate::objects::Manifest> {
        let objects = self.objects.as_ref()?;
        let name = self
            .template_objects
            .lock()
            .unwrap()
            .get(template)
            .cloned()?;
        match objects.manifest(&name).await {
            Ok(m) => Some(m),
            Err(e) => {
                tracing::warn!(%template, "its snapshot {name} in the object store: {e}");
                None
            }
        }
    }

    /// Reset every proxied connection into sandbox `id` (they end at once,
    /// as the runtime contract requires before a checkpoint).
    fn cut_connections(&self, id: &str) {
        if let Some(l) = self.live.lock().unwrap().get(id) {
            l.cut.send_replace(true);
        }
    }

    /// After a resume: new connections get a fresh cut signal.
    fn reconnectable(&self, id: &str) {
        if let Some(l) = self.live.lock().unwrap().get_mut(id) {
            l.cut = tokio::sync::watch::channel(false).0;
        }
    }

    /// Remember why sandbox `id` was lost, for later calls naming it.
    pub(crate) fn remember_lost(&self, id: &str, reason: &str) {
        let mut lost = self.lost.lock().unwrap();
        if lost.len() >= 1024 {
            lost.clear();
        }
        lost.insert(id.to_owned(), reason.to_owned());
    }

    pub(crate) fn refs(&self) -> Result<Refs, SandboxError> {
        self.refs
            .lock()
            .unwrap()
            .clone()
            .ok_or(SandboxError::Stopping)
    }

    /// A template by name (not counted as a spawn).
    pub(crate) async fn template(&self, name: &str) -> Result<TemplateEntry, SandboxError> {
        let refs = self.refs()?;
        let asked = name.to_owned();
        match refs
            .templates
            .call(|reply| TemplateMsg::Get { name: asked, reply }, None)
            .await
        {
            Ok(CallResult::Success(Some(t))) => Ok(t),
            Ok(CallResult::Success(None)) => Err(SandboxError::UnknownTemplate(
                name.to_owned(),
                "no template by that name any more".into(),
            )),
            _ => Err(SandboxError::Actor(
                "the template cache did not answer".into(),
            )),
        }
    }
}

/// Characters of a sandbox id: 36^20 (about 2^103) ids, cluster-wide.
const SANDBOX_ID_LEN: usize = 20;

/// Random characters at the start of an old-style id (`<16>-<node id>`).
const OLD_ID_RANDOM: usize = 16;

/// A new sandbox id: 20 of `[a-z0-9]`, uniformly drawn (E2B's shape). It
/// does not name the node that owns it: the cluster's registry does
/// ([`crate::directory`]), so that a sandbox can change owner.
pub(crate) fn new_sandbox_id() -> Result<String, StoreError> {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut id = String::with_capacity(SANDBOX_ID_LEN);
    while id.len() < SANDBOX_ID_LEN {
        for b in random_bytes(32)? {
            // 252 = 7 * 36: reject the rest so every letter is equally likely.
            if b < 252 && id.len() < SANDBOX_ID_LEN {
                id.push(ALPHABET[(b % 36) as usize] as char);
            }
        }
    }
    Ok(id)
}

/// The node named by an old-style sandbox id (`<16 random>-<node id>`,
/// as nodes made them before the registry); `None` for any other id,
/// new ones included. Such ids keep routing by their suffix when the
/// registry does not know them.
pub fn owner_of(id: &str) -> Option<&str> {
    let (random, owner) = id.split_at_checked(OLD_ID_RANDOM)?;
    let owner = owner.strip_prefix('-')?;
    (random
        .bytes()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        && schema::mesh::validate_node_id(owner).is_ok())
    .then_some(owner)
}

/// Append `item`, dropping the oldest beyond `max`.
pub(crate) fn push_bounded<T>(q: &mut VecDeque<T>, max: usize, item: T) {
    if q.len() >= max {
        q.pop_front();
    }
    q.push_back(item);
}

/// The E2B state of a record: a sandbox being paused is reported paused
/// (it no longer answers).
pub fn state_name(s: RecordState) -> SandboxStateName {
    match s {
        RecordState::Pausing | RecordState::Paused => SandboxStateName::Paused,
        RecordState::Creating | RecordState::Running => SandboxStateName::Running,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_have_the_e2b_shape() {
        let a = new_sandbox_id().unwrap();
        let b = new_sandbox_id().unwrap();
        assert_ne!(a, b);
        for id in [a, b] {
            assert_eq!(id.len(), 20);
            assert!(
                id.bytes()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
            );
            // No owner in it: the registry says where it is.
            assert_eq!(owner_of(&id), None);
            assert!(SandboxId::new(id.clone()).is_ok());
            assert!(format!("49983-{id}").len() <= 63);
        }
    }

    #[test]
    fn owners_are_read_from_ids() {
        assert_eq!(owner_of("abcdefghij012345-a"), Some("a"));
        assert_eq!(owner_of("abcdefghij012345-node-2"), Some("node-2"));
        for none in [
            "",
            "abc",
            "abcdefghij0123456789",
            "abcdefghij012345-",
            "abcdefghij012345_a",
            "ABCDEFGHIJ012345-a",
            "abcdefghij012345--a",
        ] {
            assert_eq!(owner_of(none), None, "{none}");
        }
    }
}
