//! The root of the node's actor tree.
//!
//! ```text
//! NodeSupervisor
//! ├── TemplateCache        the prepared templates
//! ├── Placement            ranks the cluster's members for a create
//! ├── SandboxDirectory     other nodes' calls on this node's sandboxes
//! └── SandboxSupervisor    sweeps for sandboxes the runtime lost
//!     └── SandboxActor     one per sandbox: create, deadline, kill
//! ```
//!
//! ractor has no restart strategies, so this actor is one: when the
//! template cache, the placement actor, the sandbox directory or the
//! sandbox supervisor fails (an
//! error or a panic in a handler), it starts a new one in its place and
//! points the service at it. A new template cache starts from the prepared
//! templates (their snapshots stay on disk; spawn counts restart at zero);
//! a new placement actor has no members until the next create gives it
//! the cluster's; a new directory rejoins its group (calls in flight on
//! the old one fail, as on a lost session). The sandbox actors end with their failed supervisor
//! (ractor stops an actor's children with it), the sandboxes do not: the
//! new supervisor starts an actor per sandbox that takes it over as after
//! a node restart, so no sandbox notices; a create in flight at that
//! moment fails and is undone.

use std::sync::Arc;

use ractor::{Actor, ActorCell, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};

use crate::directory::{DirectoryArgs, DirectoryMsg, SandboxDirectory};
use crate::metrics::RESTARTS;
use crate::placement::{Placement, PlacementArgs};
use crate::sandbox::{Refs, SandboxSupervisor, Shared, SupervisorMsg, adopt_orphans};
use crate::template_cache::{TemplateCache, TemplateEntry};

pub struct NodeSupervisor;

pub struct NodeArgs {
    pub shared: Arc<Shared>,
    /// The prepared templates: what a restarted template cache starts from.
    pub templates: Vec<TemplateEntry>,
    /// What the placement actor (and its replacements) starts with.
    pub placement: PlacementArgs,
    /// What the sandbox directory (and its replacements) starts with.
    pub directory: DirectoryArgs,
}

pub struct NodeState {
    shared: Arc<Shared>,
    templates: Vec<TemplateEntry>,
    placement: PlacementArgs,
    directory_args: DirectoryArgs,
    /// Not in the service's refs: nothing on this node calls it.
    directory: ActorRef<DirectoryMsg>,
    restarts: u64,
}

/// Messages of the [`NodeSupervisor`].
pub enum NodeMsg {
    /// How many children it has restarted so far.
    Restarts(RpcReplyPort<u64>),
    /// Make the sandbox supervisor fail, as a bug in it would (tests of
    /// the restart path).
    FailSandboxSupervisor,
}

// Local only: with ractor's `cluster` feature on (ractor_cluster is in the
// graph) every message type says whether it can cross nodes; this one cannot.
impl ractor::Message for NodeMsg {}

impl Actor for NodeSupervisor {
    type Msg = NodeMsg;
    type State = NodeState;
    type Arguments = NodeArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<NodeMsg>,
        args: NodeArgs,
    ) -> Result<NodeState, ActorProcessingErr> {
        let (templates, _) = Actor::spawn_linked(
            None,
            TemplateCache,
            args.templates.clone(),
            myself.get_cell(),
        )
        .await?;
        let (placement, _) =
            Actor::spawn_linked(None, Placement, args.placement.clone(), myself.get_cell()).await?;
        let (directory, _) = Actor::spawn_linked(
            None,
            SandboxDirectory,
            args.directory.clone(),
            myself.get_cell(),
        )
        .await?;
        let (sandboxes, _) = Actor::spawn_linked(
            None,
            SandboxSupervisor,
            args.shared.clone(),
            myself.get_cell(),
        )
        .await?;
        *args.shared.refs.lock().unwrap() = Some(Refs {
            templates,
            placement,
            sandboxes,
        });
        Ok(NodeState {
            shared: args.shared,
            templates: args.templates,
            placement: args.placement,
            directory_args: args.directory,
            directory,
            restarts: 0,
        })
    }

    async fn handle(
        &self,
        _myself: ActorRef<NodeMsg>,
        msg: NodeMsg,
        st: &mut NodeState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            NodeMsg::Restarts(reply) => {
                let _ = reply.send(st.restarts);
            }
            NodeMsg::FailSandboxSupervisor => {
                let refs = st.shared.refs.lock().unwrap().clone();
                if let Some(refs) = refs {
                    let _ = refs.sandboxes.cast(SupervisorMsg::Fail);
                }
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<NodeMsg>,
        event: SupervisionEvent,
        st: &mut NodeState,
    ) -> Result<(), ActorProcessingErr> {
        let (cell, why): (ActorCell, String) = match event {
            SupervisionEvent::ActorFailed(cell, err) => (cell, format!("failed: {err}")),
            SupervisionEvent::ActorTerminated(cell, _, reason) => {
                (cell, format!("stopped ({})", reason.unwrap_or_default()))
            }
            _ => return Ok(()),
        };
        let Some(refs) = st.shared.refs.lock().unwrap().clone() else {
            // The node is stopping: its children go with it.
            return Ok(());
        };
        if cell.get_id() == refs.templates.get_id() {
            tracing::error!("the template cache {why}; starting a new one");
            let (templates, _) =
                Actor::spawn_linked(None, TemplateCache, st.templates.clone(), myself.get_cell())
                    .await?;
            metrics::counter!(RESTARTS, "actor" => "template_cache").increment(1);
            st.restarts += 1;
            if let Some(r) = st.shared.refs.lock().unwrap().as_mut() {
                r.templates = templates;
            }
        } else if cell.get_id() == refs.placement.get_id() {
            tracing::error!("the placement actor {why}; starting a new one");
            let (placement, _) =
                Actor::spawn_linked(None, Placement, st.placement.clone(), myself.get_cell())
                    .await?;
            metrics::counter!(RESTARTS, "actor" => "placement").increment(1);
            st.restarts += 1;
            if let Some(r) = st.shared.refs.lock().unwrap().as_mut() {
                r.placement = placement;
            }
        } else if cell.get_id() == st.directory.get_id() {
            tracing::error!("the sandbox directory {why}; starting a new one");
            let (directory, _) = Actor::spawn_linked(
                None,
                SandboxDirectory,
                st.directory_args.clone(),
                myself.get_cell(),
            )
            .await?;
            metrics::counter!(RESTARTS, "actor" => "sandbox_directory").increment(1);
            st.restarts += 1;
            st.directory = directory;
        } else if cell.get_id() == refs.sandboxes.get_id() {
            tracing::error!("the sandbox supervisor {why}; starting a new one");
            let (sandboxes, _) = Actor::spawn_linked(
                None,
                SandboxSupervisor,
                st.shared.clone(),
                myself.get_cell(),
            )
            .await?;
            if let Some(r) = st.shared.refs.lock().unwrap().as_mut() {
                r.sandboxes = sandboxes.clone();
            }
            let adopted = adopt_orphans(&st.shared, &sandboxes).await?;
            tracing::info!(
                adopted,
                "the new sandbox supervisor took over the sandboxes"
            );
            metrics::counter!(RESTARTS, "actor" => "sandbox_supervisor").increment(1);
            st.restarts += 1;
        }
        Ok(())
    }
}
