//! Operator endpoints (API key required, like every REST call):
//! `GET /cluster[?ping=true]` (what `sandmesh status` prints) and `POST`/`DELETE
//! /node/drain` (what `sandmesh node drain` calls).

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};

use super::Cluster;
use crate::http::{error_response, query_pairs};

/// One node in `GET /cluster`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct NodeStatus {
    #[serde(rename = "nodeID")]
    pub node_id: String,
    pub generation: u64,
    /// `ready`, `draining`, `unhealthy`, or `dead` (the failure detector
    /// gave up on it).
    pub state: String,
    /// The node that answered.
    #[serde(rename = "self")]
    pub is_self: bool,
    pub rest_address: String,
    pub quic_address: String,
    pub gossip_address: String,
    pub protocol_version: u16,
    pub free_vcpus: u32,
    #[serde(rename = "freeMemoryMiB")]
    pub free_memory_mib: u64,
    pub sandboxes: u32,
    pub max_sandboxes: u32,
    pub templates: Vec<String>,
    /// Whether the node proved, over mutual TLS, to hold this cluster's
    /// certificate for its id (gossip alone proves nothing); unverified
    /// nodes get no sandboxes.
    pub verified: bool,
    /// Whether the node's placement actor is reachable from the node that
    /// answered (itself, or over their ractor_cluster session on the
    /// mesh): placement reserves capacity through it.
    #[serde(default)]
    pub actors: bool,
    /// Round trip of a mesh ping from the node that answered (absent for
    /// itself, a dead node, or one that did not answer).
    #[serde(default, rename = "rttMs", skip_serializing_if = "Option::is_none")]
    pub rtt_ms: Option<f64>,
    /// How far this node's wall clock is ahead of the answering node's,
    /// measured by that ping. Nothing in the mesh depends on clocks
    /// agreeing, but sandbox times (startedAt, endAt) are the owner's.
    #[serde(
        default,
        rename = "clockOffsetMs",
        skip_serializing_if = "Option::is_none"
    )]
    pub clock_offset_ms: Option<i64>,
}

/// `GET /cluster`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ClusterStatus {
    /// `None` for a node without a mesh.
    #[serde(rename = "clusterID")]
    pub cluster_id: Option<String>,
    #[serde(rename = "nodeID")]
    pub node_id: String,
    pub nodes: Vec<NodeStatus>,
}

pub fn routes(cluster: Cluster) -> Router {
    Router::new()
        .route("/cluster", get(status))
        .route("/node/drain", post(drain).delete(undrain))
        .with_state(cluster)
}

/// The cluster as this node sees it; with `ping`, every other live member
/// is pinged over the mesh first (round trip, clock offset), which takes
/// up to [`super::PING_TIMEOUT`] when one does not answer.
pub async fn cluster_status(cluster: &Cluster, ping: bool) -> ClusterStatus {
    let members = cluster.members().await;
    // Ping every other live member at once.
    let mut pings = tokio::task::JoinSet::new();
    for m in &members {
        if ping && m.live && m.info.id != cluster.node_id() {
            let (c, info) = (cluster.clone(), m.info.clone());
            pings.spawn(async move { (info.id.clone(), c.ping(&info).await) });
        }
    }
    let mut measured = std::collections::HashMap::new();
    while let Some(joined) = pings.join_next().await {
        if let Ok((id, answer)) = joined {
            match answer {
                Ok(m) => {
                    measured.insert(id, m);
                }
                Err(e) => tracing::debug!(node = %id, "ping for the cluster status: {e}"),
            }
        }
    }
    let nodes = members
        .into_iter()
        .map(|m| {
            let ping = measured.get(&m.info.id);
            NodeStatus {
                is_self: m.info.id == cluster.node_id(),
                verified: cluster.is_verified(&m.info),
                actors: m.live && cluster.has_actor_session(&m.info.id),
                rtt_ms: ping.map(|(rtt, _)| rtt.as_secs_f64() * 1000.0),
                clock_offset_ms: ping.map(|(_, offset)| *offset),
                node_id: m.info.id,
                generation: m.info.generation,
                state: if m.live {
                    m.info.state.to_string()
                } else {
                    "dead".into()
                },
                rest_address: m.info.rest_addr.to_string(),
                quic_address: m.info.quic_addr.to_string(),
                gossip_address: m.gossip_addr.to_string(),
                protocol_version: m.protocol_version,
                free_vcpus: m.info.free_vcpus,
                free_memory_mib: m.info.free_memory_mib,
                sandboxes: m.info.sandboxes,
                max_sandboxes: m.info.max_sandboxes,
                templates: m.info.templates,
            }
        })
        .collect();
    ClusterStatus {
        cluster_id: cluster.cluster_id().map(str::to_owned),
        node_id: cluster.node_id().to_owned(),
        nodes,
    }
}

/// `GET /cluster[?ping=true]`.
async fn status(
    State(cluster): State<Cluster>,
    axum::extract::RawQuery(query): axum::extract::RawQuery,
) -> Response {
    let ping = query_pairs(query.as_deref().unwrap_or(""))
        .iter()
        .any(|(k, v)| k == "ping" && (v == "true" || v == "1"));
    axum::Json(cluster_status(&cluster, ping).await).into_response()
}

async fn set(cluster: &Cluster, draining: bool) -> Response {
    match cluster.set_draining(draining).await {
        Ok(()) => axum::Json(serde_json::json!({
            "nodeID": cluster.node_id(),
            "state": cluster.state().to_string(),
        }))
        .into_response(),
        Err(e) => error_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("saving the drain flag: {e}"),
        ),
    }
}

async fn drain(State(cluster): State<Cluster>) -> Response {
    set(&cluster, true).await
}

async fn undrain(State(cluster): State<Cluster>) -> Response {
    set(&cluster, false).await
}
