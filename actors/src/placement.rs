//! Where a new sandbox goes: [`rank`], a pure ranking of the members, so
//! the rule is testable apart from the network, and the [`Placement`]
//! actor that answers with it from the node's view of the cluster.
//!
//! Only live, ready members of this protocol version with a free sandbox
//! slot and enough free memory take sandboxes. Among them:
//! 1. a node with the template's snapshot cached (a create there is a
//!    restore, not a template preparation),
//! 2. then the most free memory, in steps of [`MEMORY_STEP_MIB`] so that
//!    nodes within noise of each other are not told apart by it,
//! 3. then the fewest sandboxes,
//! 4. then the node id, so every node ranks a tie the same way.
//!
//! The caller tries the ranking in order: a node that refuses (full,
//! draining since it was gossiped, unreachable) passes the create on to
//! the next.
//!
//! Why an actor around a pure function: it holds the latest members
//! snapshot the node gave it (a rank costs microseconds, so serializing
//! them costs nothing), and it is this node's **remote actor**: every
//! node's Placement joins the process group [`group`]`(node id)`, which
//! ractor_cluster syncs to the node's peers over the mesh (see
//! `node/src/cluster/remote.rs`). A create is sent to a node only after
//! that node's Placement reserved one of its slots
//! ([`PlacementMsg::Remote`] with [`ClusterCall::Reserve`]): reservations
//! are counted with the sandboxes running and being created, under one
//! lock, so concurrent creates from any number of nodes cannot
//! oversubscribe a node, and a full node costs a caller one small call,
//! not a forwarded create.

use std::cmp::Reverse;
use std::sync::Arc;

use mesh::membership::Member;
use ractor::message::{BoxedDowncastErr, SerializedMessage};
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use schema::mesh::{
    ClusterCall, ClusterReply, MAX_ACTOR_PAYLOAD, NodeInfo, NodeState, PROTOCOL_VERSION,
};

/// The process group of node `node_id`'s Placement actor, cluster-wide.
pub fn group(node_id: &str) -> String {
    format!("sandmesh.placement.{node_id}")
}

/// What answers a [`ClusterCall`]: the node's capacity (implemented over
/// the sandboxes it runs, in `service/`).
pub trait SlotKeeper: Send + Sync + 'static {
    fn answer(&self, call: ClusterCall) -> ClusterReply;
}

/// Free memory is compared in steps this large.
pub const MEMORY_STEP_MIB: u64 = 512;

/// The members that may take a sandbox of `template` needing `memory_mib`
/// (0 when unknown), best first.
pub fn rank<'a>(members: &'a [Member], template: &str, memory_mib: u64) -> Vec<&'a NodeInfo> {
    let mut eligible: Vec<&NodeInfo> = members
        .iter()
        .filter(|m| m.live && m.protocol_version == PROTOCOL_VERSION)
        .map(|m| &m.info)
        .filter(|i| {
            i.state == NodeState::Ready
                && i.sandboxes < i.max_sandboxes
                && i.free_memory_mib >= memory_mib
        })
        .collect();
    eligible.sort_by_key(|i| {
        (
            !i.templates.iter().any(|t| t == template),
            Reverse(i.free_memory_mib / MEMORY_STEP_MIB),
            i.sandboxes,
            i.id.clone(),
        )
    });
    eligible
}

/// Messages of the [`Placement`] actor.
pub enum PlacementMsg {
    /// The cluster as the node sees it now (the members it may place on):
    /// replaces the snapshot.
    Members(Vec<Member>),
    /// [`rank`] over the snapshot: the members that may take a sandbox of
    /// `template` needing `memory_mib` (0 when unknown), best first.
    Rank {
        template: String,
        memory_mib: u64,
        reply: RpcReplyPort<Vec<NodeInfo>>,
    },
    /// A [`ClusterCall`] from this node or another: the one variant that
    /// crosses nodes (rkyv-encoded, bytecheck-validated on arrival).
    Remote {
        call: ClusterCall,
        reply: RpcReplyPort<ClusterReply>,
    },
}

/// The name [`PlacementMsg::Remote`] travels under.
const REMOTE_VARIANT: &str = "sandmesh.ClusterCall";

impl ractor::Message for PlacementMsg {
    fn serializable() -> bool {
        true
    }

    fn serialize(self) -> Result<SerializedMessage, BoxedDowncastErr> {
        let PlacementMsg::Remote { call, reply } = self else {
            // Members and Rank are this node's own business.
            return Err(BoxedDowncastErr);
        };
        crate::wire::to_wire(REMOTE_VARIANT, &call, reply, MAX_ACTOR_PAYLOAD)
    }

    fn deserialize(bytes: SerializedMessage) -> Result<Self, BoxedDowncastErr> {
        let (call, reply) = crate::wire::from_wire(bytes, REMOTE_VARIANT, MAX_ACTOR_PAYLOAD)?;
        Ok(PlacementMsg::Remote { call, reply })
    }
}

/// What a [`Placement`] starts with (kept by the node supervisor for a
/// replacement).
#[derive(Clone)]
pub struct PlacementArgs {
    /// This node's id: the actor joins [`group`] of it.
    pub node_id: String,
    pub slots: Arc<dyn SlotKeeper>,
}

/// Ranks the members of its snapshot for a create (see the module
/// documentation). It starts with no members: until the node gives it a
/// snapshot, every rank is empty.
pub struct Placement;

impl Actor for Placement {
    type Msg = PlacementMsg;
    type State = (Vec<Member>, Arc<dyn SlotKeeper>);
    type Arguments = PlacementArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<PlacementMsg>,
        args: PlacementArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        // Cluster-wide (ractor_cluster syncs process groups to peers); a
        // stopped actor leaves its groups by itself.
        ractor::pg::join(group(&args.node_id), vec![myself.get_cell()]);
        Ok((Vec::new(), args.slots))
    }

    async fn handle(
        &self,
        _myself: ActorRef<PlacementMsg>,
        msg: PlacementMsg,
        (members, slots): &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            PlacementMsg::Remote { call, reply } => {
                let _ = reply.send(slots.answer(call));
            }
            PlacementMsg::Members(now) => *members = now,
            PlacementMsg::Rank {
                template,
                memory_mib,
                reply,
            } => {
                let ranked = rank(members, &template, memory_mib)
                    .into_iter()
                    .cloned()
                    .collect();
                let _ = reply.send(ranked);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use schema::mesh::encode_actor_payload;

    fn member(id: &str, f: impl FnOnce(&mut NodeInfo)) -> Member {
        let mut info = NodeInfo {
            id: id.into(),
            generation: 1,
            quic_addr: "127.0.0.1:1".parse().unwrap(),
            rest_addr: "127.0.0.1:2".parse().unwrap(),
            state: NodeState::Ready,
            free_vcpus: 4,
            free_memory_mib: 8192,
            sandboxes: 0,
            max_sandboxes: 10,
            templates: vec!["base".into()],
        };
        f(&mut info);
        Member {
            info,
            gossip_addr: "127.0.0.1:3".parse().unwrap(),
            live: true,
            protocol_version: PROTOCOL_VERSION,
        }
    }

    fn ids(r: Vec<&NodeInfo>) -> Vec<&str> {
        r.into_iter().map(|i| i.id.as_str()).collect()
    }

    #[test]
    fn template_then_memory_then_count() {
        let members = vec![
            member("a", |i| i.free_memory_mib = 16_000),
            member("b", |i| {
                i.templates = vec!["base".into(), "py".into()];
                i.free_memory_mib = 2048;
            }),
            member("c", |i| {
                i.free_memory_mib = 16_100;
                i.sandboxes = 3;
            }),
            member("d", |i| {
                i.free_memory_mib = 16_200;
                i.sandboxes = 1;
            }),
        ];
        // "py" is cached on b only; a, c, d have equal memory steps
        // (16000..16200 MiB), so the fewest sandboxes wins among them.
        assert_eq!(ids(rank(&members, "py", 0)), ["b", "a", "d", "c"]);
        assert_eq!(ids(rank(&members, "base", 0)), ["a", "d", "c", "b"]);
    }

    #[test]
    fn never_a_node_that_cannot_take_it() {
        let mut dead = member("dead", |_| {});
        dead.live = false;
        let mut other_version = member("old", |_| {});
        other_version.protocol_version = PROTOCOL_VERSION + 1;
        let members = vec![
            dead,
            other_version,
            member("draining", |i| i.state = NodeState::Draining),
            member("sick", |i| i.state = NodeState::Unhealthy),
            member("full", |i| i.sandboxes = 10),
            member("small", |i| i.free_memory_mib = 256),
            member("ok", |_| {}),
        ];
        assert_eq!(ids(rank(&members, "base", 512)), ["ok"]);
        assert!(rank(&members[..6], "base", 512).is_empty());
    }

    /// Two slots; answers like the node's keeper, without sandboxes.
    struct TwoSlots(std::sync::Mutex<Vec<u64>>);

    impl SlotKeeper for TwoSlots {
        fn answer(&self, call: ClusterCall) -> ClusterReply {
            let mut held = self.0.lock().unwrap();
            match call {
                ClusterCall::Reserve { .. } if held.len() < 2 => {
                    let token = held.len() as u64 + 1;
                    held.push(token);
                    ClusterReply::Reserved { token, ttl_ms: 1 }
                }
                ClusterCall::Reserve { .. } => ClusterReply::Refused {
                    status: 429,
                    message: "full".into(),
                },
                ClusterCall::Release { token } => {
                    held.retain(|t| *t != token);
                    ClusterReply::Released
                }
            }
        }
    }

    fn args(node_id: &str) -> PlacementArgs {
        PlacementArgs {
            node_id: node_id.into(),
            slots: Arc::new(TwoSlots(Default::default())),
        }
    }

    #[tokio::test]
    async fn remote_calls_round_trip_through_their_serialized_form() {
        use ractor::Message;
        let (placement, handle) = Actor::spawn(None, Placement, args("node-r")).await.unwrap();
        // The actor is in its node's group.
        let members = ractor::pg::get_members(&group("node-r"));
        assert_eq!(members.len(), 1);
        // What a peer's session does with a call: serialize, then the
        // receiving side deserializes and the actor answers the bytes.
        let reserve = || ClusterCall::Reserve {
            template: "base".into(),
            memory_mib: 0,
        };
        for expect in [true, true, false] {
            let (tx, rx) = ractor::concurrency::oneshot::<ClusterReply>();
            let msg = PlacementMsg::Remote {
                call: reserve(),
                reply: RpcReplyPort::from((tx, std::time::Duration::from_secs(5))),
            };
            let wire = msg.serialize().expect("Remote serializes");
            let back = PlacementMsg::deserialize(wire).expect("and deserializes");
            placement.cast(back).unwrap();
            let answer = rx.await.unwrap();
            assert_eq!(
                matches!(answer, ClusterReply::Reserved { .. }),
                expect,
                "{answer:?}"
            );
        }
        // Local-only variants do not serialize.
        let (tx, _rx) = ractor::concurrency::oneshot::<Vec<NodeInfo>>();
        let rank = PlacementMsg::Rank {
            template: "base".into(),
            memory_mib: 0,
            reply: tx.into(),
        };
        assert!(rank.serialize().is_err());
        // Garbage and unknown variants are refused, never a panic.
        for (variant, args) in [
            (REMOTE_VARIANT, vec![0xffu8; 40]),
            (REMOTE_VARIANT, Vec::new()),
            ("Rank", encode_actor_payload(&reserve()).unwrap()),
        ] {
            let (tx, _rx) = ractor::concurrency::oneshot::<Vec<u8>>();
            let wire = SerializedMessage::Call {
                variant: variant.into(),
                args,
                reply: tx.into(),
                metadata: None,
            };
            assert!(PlacementMsg::deserialize(wire).is_err());
        }
        placement.stop(None);
        handle.await.unwrap();
        assert!(ractor::pg::get_members(&group("node-r")).is_empty());
    }

    #[tokio::test]
    async fn the_actor_ranks_its_latest_snapshot() {
        let (placement, handle) = Actor::spawn(None, Placement, args("node-a")).await.unwrap();
        let ask = |template: &str| {
            let template = template.to_owned();
            let placement = placement.clone();
            async move {
                let ranked = placement
                    .call(
                        |reply| PlacementMsg::Rank {
                            template,
                            memory_mib: 512,
                            reply,
                        },
                        None,
                    )
                    .await
                    .unwrap()
                    .unwrap();
                ranked.into_iter().map(|i| i.id).collect::<Vec<_>>()
            }
        };
        assert!(ask("base").await.is_empty(), "no snapshot yet");
        let members = vec![
            member("a", |_| {}),
            member("b", |i| i.templates = vec!["py".into()]),
        ];
        placement
            .cast(PlacementMsg::Members(members.clone()))
            .unwrap();
        assert_eq!(ask("py").await, ["b", "a"]);
        assert_eq!(
            ask("py").await,
            ids(rank(&members, "py", 512)),
            "the actor answers what rank says"
        );
        placement
            .cast(PlacementMsg::Members(vec![member("c", |_| {})]))
            .unwrap();
        assert_eq!(ask("py").await, ["c"], "a new snapshot replaces the old");
        placement.stop(None);
        handle.await.unwrap();
    }
}
