//! The cluster-wide sandbox registry, and the [`SandboxDirectory`] actor
//! through which other nodes reach this node's sandboxes.
//!
//! **Registry.** A sandbox id no longer names its owner: every
//! [`crate::sandbox::SandboxActor`] (one per sandbox the node owns,
//! running or paused — a paused sandbox keeps its actor, which holds its
//! snapshot) joins the process group named after its sandbox id in its
//! node's registry scope, [`scope`]`(node id)`. ractor_cluster syncs
//! process groups to every peer with an actor session, so any node finds
//! a sandbox's owner by asking, for each member, whether that member's
//! scope holds the id ([`registered_on`]): a few hash lookups, no call.
//! The actor leaves its group when it stops (the sandbox was killed or
//! lost, or moved), and a peer's groups vanish with its session.
//!
//! Sync is asynchronous (a create on node B reaches node C's groups a
//! moment later), so a miss is not an answer: the node's front then asks
//! every live peer's directory ([`SandboxCall::Locate`], in parallel,
//! short timeout) and remembers the answer. What the groups showed is
//! also remembered ([`Registry`], fed by a monitor on every scope), so
//! that a sandbox whose owner died — whose groups went with its session —
//! is still known to be that node's: a call on it is a 503 naming the
//! node, not a 404.
//!
//! **Directory.** Each node's [`SandboxDirectory`] joins the process
//! group [`group`]`(node id)`. Its one remote message,
//! [`DirectoryMsg::Remote`], carries an rkyv [`SandboxCall`] (validated
//! with bytecheck on arrival): `Locate`, answered from the node's live
//! sandboxes, and `Rest`, a client's REST call on one of the node's
//! sandboxes, which the directory hands to the node's REST front
//! ([`RemoteFront`], set by the node once its app exists) in a task of
//! its own — calls on different sandboxes do not wait for each other,
//! and the front's handlers call the sandbox's actor as a local call
//! would.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};

use ractor::message::{BoxedDowncastErr, SerializedMessage};
use ractor::pg::GroupChangeMessage;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};
use schema::mesh::{ErrorKind, MAX_SANDBOX_PAYLOAD, RestRequest, SandboxCall, SandboxReply};

use crate::sandbox::Shared;

/// Prefix of every registry scope.
const SCOPE_PREFIX: &str = "sandmesh.on.";

/// The process-group scope in which node `node_id`'s sandbox actors
/// register, one group per sandbox id.
pub fn scope(node_id: &str) -> String {
    format!("{SCOPE_PREFIX}{node_id}")
}

/// The process group of node `node_id`'s [`SandboxDirectory`].
pub fn group(node_id: &str) -> String {
    format!("sandmesh.sandboxes.{node_id}")
}

/// Which of `nodes` has a sandbox actor registered for `sandbox_id` in
/// the process groups this process sees (its own and those its actor
/// sessions synced).
pub fn registered_on<'a>(
    sandbox_id: &str,
    nodes: impl IntoIterator<Item = &'a str>,
) -> Option<&'a str> {
    nodes
        .into_iter()
        .find(|n| !ractor::pg::get_scoped_members(&scope(n), &sandbox_id.to_owned()).is_empty())
}

/// Sandbox ids remembered per owner, at most this many (then forgotten
/// all at once: the groups and the miss fallback find them again).
pub const MAX_REMEMBERED: usize = 100_000;

/// What this node has learnt about sandboxes' owners: from the process
/// groups as they changed, and from answers to [`SandboxCall::Locate`].
/// Advice, not authority: the owner itself is asked before anything is
/// served, and a node that no longer has a sandbox says so.
#[derive(Clone, Default)]
pub struct Registry {
    owners: Arc<Mutex<HashMap<String, String>>>,
}

impl Registry {
    /// Remember that node `node` owns `sandbox_id`.
    pub fn remember(&self, sandbox_id: &str, node: &str) {
        let mut owners = lock(&self.owners);
        if owners.len() >= MAX_REMEMBERED && !owners.contains_key(sandbox_id) {
            owners.clear();
        }
        owners.insert(sandbox_id.to_owned(), node.to_owned());
    }

    /// The node last known to own `sandbox_id`.
    pub fn owner(&self, sandbox_id: &str) -> Option<String> {
        lock(&self.owners).get(sandbox_id).cloned()
    }

    /// Forget `sandbox_id` (its owner said it has no such sandbox).
    pub fn forget(&self, sandbox_id: &str) {
        lock(&self.owners).remove(sandbox_id);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A future the [`RemoteFront`] answers with.
pub type Answer = Pin<Box<dyn Future<Output = SandboxReply> + Send>>;

/// The node's REST front as the directory serves a carried call through
/// it (the node implements it over its own app, so the API key is
/// checked and the handlers run as for a client's call).
pub trait RemoteFront: Send + Sync + 'static {
    /// Serve `request`, which node `from` carried here.
    fn serve(&self, from: String, request: RestRequest) -> Answer;
}

/// Where the node's [`RemoteFront`] is put once its app exists (the app
/// is built after the actors).
pub type FrontSlot = Arc<OnceLock<Arc<dyn RemoteFront>>>;

/// Messages of the [`SandboxDirectory`].
pub enum DirectoryMsg {
    /// A [`SandboxCall`] from another node (or this one): the one
    /// variant, and it crosses nodes.
    Remote {
        call: SandboxCall,
        reply: RpcReplyPort<SandboxReply>,
    },
}

/// The name [`DirectoryMsg::Remote`] travels under.
const REMOTE_VARIANT: &str = "sandmesh.SandboxCall";

impl ractor::Message for DirectoryMsg {
    fn serializable() -> bool {
        true
    }

    fn serialize(self) -> Result<SerializedMessage, BoxedDowncastErr> {
        let DirectoryMsg::Remote { call, reply } = self;
        crate::wire::to_wire(REMOTE_VARIANT, &call, reply, MAX_SANDBOX_PAYLOAD)
    }

    fn deserialize(bytes: SerializedMessage) -> Result<Self, BoxedDowncastErr> {
        let (call, reply) = crate::wire::from_wire(bytes, REMOTE_VARIANT, MAX_SANDBOX_PAYLOAD)?;
        Ok(DirectoryMsg::Remote { call, reply })
    }
}

/// What a [`SandboxDirectory`] starts with (kept by the node supervisor
/// for a replacement).
#[derive(Clone)]
pub struct DirectoryArgs {
    pub node_id: String,
    pub shared: Arc<Shared>,
    pub front: FrontSlot,
    pub registry: Registry,
}

/// Answers other nodes about this node's sandboxes and serves the REST
/// calls they carry here (see the module documentation); keeps the
/// [`Registry`] current from the process groups' changes.
pub struct SandboxDirectory;

impl Actor for SandboxDirectory {
    type Msg = DirectoryMsg;
    type State = DirectoryArgs;
    type Arguments = DirectoryArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<DirectoryMsg>,
        args: DirectoryArgs,
    ) -> Result<DirectoryArgs, ActorProcessingErr> {
        // Every scope's joins, this process's and those synced from peers.
        ractor::pg::monitor_scope(
            ractor::pg::ALL_SCOPES_NOTIFICATION.to_owned(),
            myself.get_cell(),
        );
        // What synced before this actor started (a replacement).
        for key in ractor::pg::which_scopes_and_groups() {
            if let Some(node) = key.get_scope().strip_prefix(SCOPE_PREFIX) {
                args.registry.remember(&key.get_group(), node);
            }
        }
        ractor::pg::join(group(&args.node_id), vec![myself.get_cell()]);
        Ok(args)
    }

    async fn handle(
        &self,
        _myself: ActorRef<DirectoryMsg>,
        msg: DirectoryMsg,
        st: &mut DirectoryArgs,
    ) -> Result<(), ActorProcessingErr> {
        let DirectoryMsg::Remote { call, reply } = msg;
        match call {
            SandboxCall::Locate { sandbox_id } => {
                let owned = st
                    .shared
                    .live
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .contains_key(&sandbox_id);
                let _ = reply.send(SandboxReply::Located { owned });
            }
            SandboxCall::Rest { from, request } => {
                let Some(front) = st.front.get().cloned() else {
                    let _ = reply.send(SandboxReply::Error {
                        kind: ErrorKind::Unavailable,
                        message: format!("node {} is starting", st.node_id),
                    });
                    return Ok(());
                };
                tracing::debug!(%from, method = %request.method, path = %request.path, "sandbox call from another node");
                // A pause or a resume takes seconds: never in the way of
                // the next call.
                tokio::spawn(async move {
                    let _ = reply.send(front.serve(from, request).await);
                });
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        _myself: ActorRef<DirectoryMsg>,
        event: SupervisionEvent,
        st: &mut DirectoryArgs,
    ) -> Result<(), ActorProcessingErr> {
        // Leaves are not forgotten: a peer's groups leave with its session
        // when it dies, and its sandboxes are still its own.
        if let SupervisionEvent::ProcessGroupChanged(GroupChangeMessage::Join(scope, group, _)) =
            event
            && let Some(node) = scope.strip_prefix(SCOPE_PREFIX)
        {
            st.registry.remember(&group, node);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ractor::Message;
    use schema::mesh::encode_actor_payload;

    #[test]
    fn registry_remembers_and_forgets() {
        let r = Registry::default();
        assert_eq!(r.owner("a"), None);
        r.remember("a", "n1");
        r.remember("a", "n2");
        assert_eq!(r.owner("a").as_deref(), Some("n2"));
        r.forget("a");
        assert_eq!(r.owner("a"), None);
    }

    #[tokio::test]
    async fn registered_on_reads_the_scoped_groups() {
        let (probe, handle) = Actor::spawn(None, Probe, ()).await.unwrap();
        ractor::pg::join_scoped(scope("reg-n2"), "sbxreg1".into(), vec![probe.get_cell()]);
        assert_eq!(
            registered_on("sbxreg1", ["reg-n1", "reg-n2"]),
            Some("reg-n2")
        );
        assert_eq!(registered_on("sbxreg2", ["reg-n1", "reg-n2"]), None);
        probe.stop(None);
        handle.await.unwrap();
        // A stopped actor leaves its groups by itself.
        assert_eq!(registered_on("sbxreg1", ["reg-n2"]), None);
    }

    struct Probe;
    struct Nothing;
    impl ractor::Message for Nothing {}
    impl Actor for Probe {
        type Msg = Nothing;
        type State = ();
        type Arguments = ();
        async fn pre_start(&self, _: ActorRef<Nothing>, _: ()) -> Result<(), ActorProcessingErr> {
            Ok(())
        }
    }

    #[tokio::test]
    async fn calls_round_trip_through_their_serialized_form_and_garbage_is_refused() {
        let request = RestRequest {
            method: "GET".into(),
            path: "/sandboxes/abc".into(),
            query: String::new(),
            headers: vec![],
            body: vec![],
        };
        let (tx, rx) = ractor::concurrency::oneshot::<SandboxReply>();
        let msg = DirectoryMsg::Remote {
            call: SandboxCall::Rest {
                from: "n1".into(),
                request: request.clone(),
            },
            reply: RpcReplyPort::from((tx, std::time::Duration::from_secs(5))),
        };
        let wire = msg.serialize().expect("serializes");
        let DirectoryMsg::Remote { call, reply } =
            DirectoryMsg::deserialize(wire).expect("and deserializes");
        assert_eq!(
            call,
            SandboxCall::Rest {
                from: "n1".into(),
                request
            }
        );
        reply
            .send(SandboxReply::Located { owned: true })
            .expect("the port is open");
        assert_eq!(rx.await.unwrap(), SandboxReply::Located { owned: true });
        for (variant, args) in [
            (REMOTE_VARIANT, vec![0xffu8; 40]),
            (REMOTE_VARIANT, Vec::new()),
            (REMOTE_VARIANT, vec![0; MAX_SANDBOX_PAYLOAD + 1]),
            (
                "sandmesh.ClusterCall",
                encode_actor_payload(&SandboxCall::Locate {
                    sandbox_id: "x".into(),
                })
                .unwrap(),
            ),
        ] {
            let (tx, _rx) = ractor::concurrency::oneshot::<Vec<u8>>();
            let wire = SerializedMessage::Call {
                variant: variant.into(),
                args,
                reply: tx.into(),
                metadata: None,
            };
            assert!(DirectoryMsg::deserialize(wire).is_err());
        }
    }
}
