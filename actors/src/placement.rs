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
//! Why an actor around a pure function: today it only holds the latest
//! members snapshot the node gave it, and a rank costs microseconds, so
//! serializing them costs nothing; it is where placement state will live
//! once creates reserve capacity across nodes (a reservation must be seen
//! by the next create, which a function of gossip alone cannot do).

use std::cmp::Reverse;

use mesh::membership::Member;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use schema::mesh::{NodeInfo, NodeState, PROTOCOL_VERSION};

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
}

/// Ranks the members of its snapshot for a create (see the module
/// documentation). It starts with no members: until the node gives it a
/// snapshot, every rank is empty.
pub struct Placement;

impl Actor for Placement {
    type Msg = PlacementMsg;
    type State = Vec<Member>;
    type Arguments = ();

    async fn pre_start(
        &self,
        _myself: ActorRef<PlacementMsg>,
        _args: (),
    ) -> Result<Vec<Member>, ActorProcessingErr> {
        Ok(Vec::new())
    }

    async fn handle(
        &self,
        _myself: ActorRef<PlacementMsg>,
        msg: PlacementMsg,
        members: &mut Vec<Member>,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
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

    #[tokio::test]
    async fn the_actor_ranks_its_latest_snapshot() {
        let (placement, handle) = Actor::spawn(None, Placement, ()).await.unwrap();
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
