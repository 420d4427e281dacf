//! What this node does with what peers send it over the mesh: answer
//! pings, serve forwarded creates and list shares as its own, serve the
//! sandbox calls its directory receives as remote actor calls
//! ([`PeerFront`]), and pipe raw streams to its sandboxes' ports.

use std::sync::{Arc, Weak};

use mesh::transport::{Handler, IncomingStream, Peer};
use schema::mesh::{ErrorKind, Request, Response, RestRequest, SandboxReply, SessionHeader};

use super::front::{Call, classify};
use super::{Cluster, Inner, MeshHandler};

/// The node's REST front as its sandbox directory serves other nodes'
/// calls through it (`actors::directory::RemoteFront`): the call runs
/// through this node's whole app, marked forwarded, so the API key is
/// checked again and it is never sent further. Holds the cluster weakly
/// (the cluster holds the directory).
pub struct PeerFront(Weak<Inner>);

impl PeerFront {
    pub fn new(cluster: &Cluster) -> Arc<Self> {
        Arc::new(Self(Arc::downgrade(&cluster.inner)))
    }
}

impl actors::directory::RemoteFront for PeerFront {
    fn serve(&self, from: String, request: RestRequest) -> actors::directory::Answer {
        let inner = self.0.upgrade();
        Box::pin(async move {
            let Some(inner) = inner else {
                return SandboxReply::Error {
                    kind: ErrorKind::Unavailable,
                    message: "the node is stopping".into(),
                };
            };
            let method = request.method.parse().unwrap_or(axum::http::Method::GET);
            if !matches!(classify(&method, &request.path), Call::Sandbox(_)) {
                // One mechanism per job: creates and lists are mesh calls.
                return SandboxReply::Error {
                    kind: ErrorKind::BadRequest,
                    message: format!(
                        "{} {} is not a call on a sandbox",
                        request.method.escape_debug(),
                        request.path.escape_debug()
                    ),
                };
            }
            let resp = Cluster { inner }.serve_local(request, from).await;
            super::front::to_sandbox_reply(resp).await
        })
    }
}

/// What a peer hears from a node whose cluster is not attached yet (the
/// transport binds before the cluster exists): a moment's wait, not a fault.
const STARTING: &str = "the node is starting: try again in a moment";

impl Handler for MeshHandler {
    async fn request(&self, peer: Peer, request: Request) -> Response {
        let Some(cluster) = self.cluster.get() else {
            return Response::Error {
                kind: ErrorKind::Unavailable,
                message: STARTING.into(),
            };
        };
        match request {
            Request::Ping { .. } => Response::Pong {
                info: cluster.local_info().await,
                unix_ms: mesh::membership::unix_millis(),
            },
            Request::Rest(rest) => {
                let method = rest.method.parse().unwrap_or(axum::http::Method::GET);
                if let Call::Sandbox(_) = classify(&method, &rest.path) {
                    // Calls on a sandbox travel to its owner's directory
                    // as remote actor calls, never as mesh RPC.
                    return Response::Error {
                        kind: ErrorKind::BadRequest,
                        message: "calls on a sandbox are remote actor calls to its owner's sandbox directory, not mesh requests".into(),
                    };
                }
                tracing::debug!(peer = %peer.addr, method = %rest.method, path = %rest.path, "forwarded call");
                let resp = cluster.serve_local(rest, peer.addr.to_string()).await;
                super::front::to_rest_response(resp).await
            }
            Request::WhoSigned { method, query } => {
                let method = method.parse().unwrap_or(axum::http::Method::GET);
                let found = crate::proxy::local_signed_target(
                    cluster.sandboxes(),
                    &method,
                    "/files",
                    Some(&query),
                );
                Response::SignedBy {
                    sandbox_id: found.flatten().map(|t| t.sandbox_id),
                }
            }
        }
    }

    async fn session(&self, peer: Peer, incoming: IncomingStream<SessionHeader>) {
        let Some(cluster) = self.cluster.get() else {
            incoming.reject(ErrorKind::Unavailable, STARTING).await;
            return;
        };
        let header = incoming.header().clone();
        let Some(remote) = cluster.remote() else {
            incoming
                .reject(ErrorKind::Unavailable, "this node is not in a mesh")
                .await;
            return;
        };
        if let Some((kind, why)) =
            super::remote::refusal(cluster.node_id(), &header, peer.is_node(&header.node_id))
        {
            tracing::warn!(peer = %peer.addr, "actor session refused: {why}");
            incoming.reject(kind, &why).await;
            return;
        }
        match incoming.accept().await {
            Ok((send, recv)) => remote.accept(&header, send, recv),
            Err(e) => {
                tracing::debug!(node = %header.node_id, "accepting an actor session: {e}")
            }
        }
    }

    async fn stream(&self, peer: Peer, incoming: IncomingStream) {
        let Some(cluster) = self.cluster.get() else {
            incoming.reject(ErrorKind::Unavailable, STARTING).await;
            return;
        };
        let header = incoming.header().clone();
        let opened =
            crate::proxy::open_local(cluster.sandboxes(), &header.sandbox_id, header.port).await;
        let (mut sandbox, mut cut) = match opened {
            Ok(o) => o,
            Err(r) => {
                let kind = if r.not_found {
                    ErrorKind::NotFound
                } else {
                    ErrorKind::Unavailable
                };
                incoming.reject(kind, &r.message).await;
                return;
            }
        };
        let (send, recv) = match incoming.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(peer = %peer.addr, "accepting a traffic stream: {e}");
                return;
            }
        };
        let mut mesh_side = tokio::io::join(recv, send);
        tokio::select! {
            r = tokio::io::copy_bidirectional(&mut mesh_side, &mut sandbox) => {
                if let Err(e) = r {
                    tracing::debug!(sandbox = %header.sandbox_id, "traffic stream ended: {e}");
                }
            }
            // Paused or killed: dropping both ends resets the stream.
            _ = cut.wait_for(|c| *c) => {
                tracing::debug!(sandbox = %header.sandbox_id, "traffic stream cut (pause or kill)");
            }
        }
    }
}
