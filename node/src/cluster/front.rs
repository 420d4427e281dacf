//! The REST front's cluster half: which node serves a call, and carrying
//! it there.
//!
//! Called by the front door after the API key was checked. A call on a
//! sandbox goes to its owner as found by [`Cluster::owner`] (the
//! registry), carried as a remote actor call to the owner's sandbox
//! directory ([`actors::directory`], over the actor session of
//! [`super::remote`]): the client's request as it came (headers, API key
//! included: the owner checks it again), its answer relayed as is. A
//! create goes to the first node in the placement actor's ranking
//! ([`actors::placement`]) whose placement actor reserves a slot for it
//! (a remote actor call too), and is then sent there, with the
//! reservation's token, as a mesh `Request::Rest`; a list asks every live
//! node the same way and merges.
//!
//! Sandbox traffic (envd, ports) is not a REST call: [`traffic`] opens a
//! raw QUIC stream to the owner (found the same way), which pipes it to
//! the sandbox port, so a body of any size streams through with QUIC flow
//! control bounding what is in flight.

use axum::body::Body;
use axum::extract::Request;
use axum::http::{HeaderName, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::Response;
use schema::mesh::{self as wire, ErrorKind, NodeInfo, NodeState, PROTOCOL_VERSION};
use std::time::Duration;

use super::{Cluster, Forwarded, Owner};
use crate::api::{Cursor, Order};
use crate::http::{RESERVATION_HEADER, Reservation, closing, error_response, query_pairs};
use crate::proxy::{self, Target};
use actors::sandbox::TakeOver;

/// Largest REST request body carried to another node. E2B's REST bodies
/// are small JSON documents (files go through envd, as traffic).
pub const MAX_REST_BODY: usize = 1 << 20;

/// Largest REST response body carried back: what fits a mesh frame.
pub const MAX_REST_RESPONSE: usize = wire::MAX_FRAME - (64 << 10);

/// Nodes a create is sent to (each after its placement actor reserved a
/// slot) before giving up. Reservations themselves are asked of every
/// ranked node in turn: a refusal costs one small remote call.
pub const MAX_PLACEMENT_TRIES: usize = 3;

/// What a REST call is, for routing.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Call {
    /// Served by whichever node got it (templates, cluster status, ...).
    Local,
    Create,
    List,
    Sandbox(String),
    /// A template build's start, status or log: served by the node that
    /// runs it.
    Build(String),
}

/// The build a template build call names: `POST
/// /v2/templates/{id}/builds/{build}`, `GET
/// /templates/{id}/builds/{build}/status` and `.../logs`.
fn build_of(path: &str) -> Option<&str> {
    let rest = path
        .strip_prefix("/v2/templates/")
        .or_else(|| path.strip_prefix("/templates/"))?;
    let mut parts = rest.split('/');
    let (_template, builds, build) = (parts.next()?, parts.next()?, parts.next()?);
    let tail = parts.next();
    let ok = builds == "builds"
        && !build.is_empty()
        && parts.next().is_none()
        && matches!(tail, None | Some("status") | Some("logs"));
    ok.then_some(build)
}

pub(crate) fn classify(method: &Method, path: &str) -> Call {
    if let Some(build) = build_of(path) {
        return Call::Build(build.to_owned());
    }
    let Some(rest) = path
        .strip_prefix("/v2/sandboxes")
        .or_else(|| path.strip_prefix("/sandboxes"))
    else {
        return Call::Local;
    };
    match rest {
        "" | "/" if method == Method::POST => Call::Create,
        "" | "/" if method == Method::GET => Call::List,
        _ => match rest.strip_prefix('/').and_then(|r| r.split('/').next()) {
            Some(id) if !id.is_empty() => Call::Sandbox(id.to_owned()),
            _ => Call::Local,
        },
    }
}

#[cfg(test)]
#[test]
fn build_calls_are_told_from_other_template_calls() {
    assert_eq!(build_of("/v2/templates/app/builds/b-1"), Some("b-1"));
    assert_eq!(build_of("/templates/app/builds/b-1/status"), Some("b-1"));
    assert_eq!(build_of("/templates/app/builds/b-1/logs"), Some("b-1"));
    assert_eq!(build_of("/templates/app/builds/b-1/other"), None);
    assert_eq!(build_of("/templates/app/files/abc"), None);
    assert_eq!(build_of("/templates/app"), None);
    assert_eq!(build_of("/v3/templates"), None);
}

fn is_hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "host"
            | "content-length"
    )
}

/// Route an authenticated REST call.
pub async fn route(cluster: &Cluster, req: Request, next: Next) -> Response {
    let call = classify(req.method(), req.uri().path());
    if req.extensions().get::<Forwarded>().is_some() {
        // Placement chose this node, or it owns the sandbox: serve here.
        if call == Call::Create && cluster.state() != NodeState::Ready {
            return error_response(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "node {} is {}: it takes no new sandboxes",
                    cluster.node_id(),
                    cluster.state()
                ),
            );
        }
        return next.run(req).await;
    }
    match call {
        Call::Local => next.run(req).await,
        Call::Build(build) => {
            let sandboxes = cluster.sandboxes();
            if sandboxes.has_build(&build) {
                return next.run(req).await;
            }
            let runner = match sandboxes.build_node(&build).await {
                Some(n) => cluster.live_member(&n).await,
                None => None,
            };
            let Some(info) = runner else {
                // Here, or its node is gone: the store knows the build if
                // it finished; else a 404.
                return next.run(req).await;
            };
            let rest = match to_rest(req).await {
                Ok(r) => r,
                Err(resp) => return resp,
            };
            match cluster.dispatch(&info, rest).await {
                Ok(resp) => resp,
                Err(e) => error_response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!(
                        "template build {build} runs on node {}, which did not answer: {e}",
                        info.id
                    ),
                ),
            }
        }
        Call::Create => create(cluster, req).await,
        Call::List => list(cluster, req).await,
        Call::Sandbox(id) => match cluster.owner(&id).await {
            Owner::Local if cluster.sandboxes().get(&id).is_some() => next.run(req).await,
            // Nobody has it: the object store may hold it paused.
            Owner::Local => unowned(cluster, &id, Unowned::Nobody, req, next).await,
            Owner::Remote(info) => to_owner(cluster, &id, &info, req).await,
            Owner::Dead(_) | Owner::Unknown(_) if cluster.sandboxes().known_gone(&id) => {
                next.run(req).await
            }
            Owner::Dead(info) => unowned(cluster, &id, Unowned::Dead(info), req, next).await,
            Owner::Unknown(node) => unowned(cluster, &id, Unowned::Unknown(node), req, next).await,
        },
    }
}

/// Why no live node this node knows of has a sandbox.
enum Unowned {
    /// Nobody said they have it.
    Nobody,
    /// Its owner is dead.
    Dead(NodeInfo),
    /// Its owner is no member this node knows.
    Unknown(String),
}

/// A call on sandbox `id`, which no live node this node knows of has: the
/// object store's claim decides. Paused on a node that is gone: taken over
/// here and served here. Held by a live node (one that took it over, or
/// that this node has not heard of yet): carried there. Running on a node
/// that is gone: lost (see [`lost`]). The store knows nothing: not found,
/// or the dead owner's 503. Answers without reading the body where it does
/// not carry the call (see `http::closing`).
async fn unowned(cluster: &Cluster, id: &str, why: Unowned, req: Request, next: Next) -> Response {
    match take_over(cluster, id).await {
        Ok(TakeOver::Taken) => return next.run(req).await,
        Ok(TakeOver::LostWith(node)) => return lost(cluster, id, &node, is_kill(&req, id)).await,
        Ok(TakeOver::HeldBy(node)) => {
            if let Some(info) = live_holder(cluster, id, &node).await {
                return to_owner(cluster, id, &info, req).await;
            }
        }
        Ok(TakeOver::Unknown) => {}
        Err(resp) => return closing(resp),
    }
    match why {
        Unowned::Nobody => next.run(req).await,
        Unowned::Dead(info) => {
            count("sandbox", "dead");
            closing(owner_dead(id, &info.id))
        }
        Unowned::Unknown(node) => closing(error_response(
            StatusCode::NOT_FOUND,
            format!("sandbox {id} not found: its node {node} is not a member of this cluster"),
        )),
    }
}

/// Carry a call on sandbox `id` to its owner `info` and relay the answer.
async fn to_owner(cluster: &Cluster, id: &str, info: &NodeInfo, req: Request) -> Response {
    let rest = match to_rest(req).await {
        Ok(r) => r,
        Err(resp) => return resp,
    };
    match cluster.call_owner(info, rest).await {
        Ok(resp) => {
            count("sandbox", "ok");
            resp
        }
        Err(OwnerError::Died) => {
            count("sandbox", "dead");
            owner_dead(id, &info.id)
        }
        Err(OwnerError::Failed(e)) => {
            count("sandbox", "unreachable");
            owner_unreachable(id, &info.id, &e)
        }
    }
}

/// Sandbox `id` is on no live node: if the object store holds it paused
/// (its node died, or this node lost its record), take it over here
/// ([`TakeOver::Taken`]: this node has it now, paused).
async fn take_over(cluster: &Cluster, id: &str) -> Result<TakeOver, Response> {
    let alive = cluster.live_peer_ids();
    cluster
        .sandboxes()
        .take_over(id, &|n| alive.contains(n))
        .await
        .map_err(|e| {
            error_response(
                StatusCode::from_u16(e.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
                e.to_string(),
            )
        })
}

/// Whether `req` kills sandbox `id` (`DELETE /sandboxes/{id}`).
fn is_kill(req: &Request, id: &str) -> bool {
    let path = req.uri().path();
    req.method() == Method::DELETE
        && (path == format!("/sandboxes/{id}") || path == format!("/v2/sandboxes/{id}"))
}

/// Node `node`, which the object store says holds sandbox `id`, when it is
/// a live member (remembered as the sandbox's owner: gossip may not have
/// said so yet).
async fn live_holder(cluster: &Cluster, id: &str, node: &str) -> Option<NodeInfo> {
    let info = cluster.live_member(node).await?;
    cluster.sandboxes().registry().remember(id, node);
    Some(info)
}

/// The answer for sandbox `id`, which was running on `node` when that
/// node died: a kill (`DELETE /sandboxes/{id}`) removes what the cluster
/// keeps of it; anything else is a 503 saying so.
async fn lost(cluster: &Cluster, id: &str, node: &str, is_kill: bool) -> Response {
    count("sandbox", "lost");
    if is_kill {
        match cluster.sandboxes().kill_lost(id, node).await {
            Ok(true) => {
                let mut resp = Response::new(Body::empty());
                *resp.status_mut() = StatusCode::NO_CONTENT;
                return resp;
            }
            Ok(false) => {}
            Err(e) => {
                return closing(error_response(
                    StatusCode::from_u16(e.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
                    e.to_string(),
                ));
            }
        }
    }
    closing(error_response(
        StatusCode::SERVICE_UNAVAILABLE,
        format!(
            "sandbox {id} was running on node {node}, which is dead: the sandbox is lost unless that node comes back (kill it to free what the cluster keeps of it)"
        ),
    ))
}

/// Why a call carried to a sandbox's owner got no answer.
#[derive(Debug, thiserror::Error)]
pub(crate) enum OwnerError {
    /// Gossip declared the owner dead while the call waited.
    #[error("the node died during the call")]
    Died,
    /// The call could not be made, or its session ended, or it timed out.
    #[error("{0}")]
    Failed(String),
}

/// How long a carried sandbox call may take (a pause or a resume on a
/// loaded host takes seconds; the owner dying ends the wait sooner).
pub const SANDBOX_CALL_TIMEOUT: Duration = Duration::from_secs(60);

/// How long a call waits for the actor session with a verified owner
/// (it opens within a moment of the verification).
pub const SESSION_WAIT: Duration = Duration::from_secs(2);

fn count(kind: &'static str, outcome: &'static str) {
    metrics::counter!(crate::metrics::MESH_FORWARDS, "kind" => kind, "outcome" => outcome)
        .increment(1);
}

fn owner_dead(id: &str, node: &str) -> Response {
    error_response(
        StatusCode::SERVICE_UNAVAILABLE,
        format!(
            "sandbox {id} is on node {node}, which is dead (it stopped answering the cluster); the sandbox is reachable again if that node comes back"
        ),
    )
}

fn owner_unreachable(id: &str, node: &str, e: &str) -> Response {
    error_response(
        StatusCode::SERVICE_UNAVAILABLE,
        format!("sandbox {id} is on node {node}, which did not answer: {e}"),
    )
}

/// The request as a mesh message (body read, at most [`MAX_REST_BODY`]).
async fn to_rest(req: Request) -> Result<wire::RestRequest, Response> {
    let (parts, body) = req.into_parts();
    let body = axum::body::to_bytes(body, MAX_REST_BODY)
        .await
        .map_err(|_| {
            closing(error_response(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("request body larger than {MAX_REST_BODY} bytes"),
            ))
        })?;
    Ok(wire::RestRequest {
        method: parts.method.as_str().to_owned(),
        path: parts.uri.path().to_owned(),
        query: parts.uri.query().unwrap_or("").to_owned(),
        headers: wire_headers(&parts.headers),
        body: body.to_vec(),
    })
}

/// The end-to-end headers of a request or response, for the mesh.
fn wire_headers(headers: &axum::http::HeaderMap) -> Vec<wire::Header> {
    headers
        .iter()
        .filter(|(n, _)| !is_hop_by_hop(n))
        .map(|(n, v)| wire::Header {
            name: n.as_str().to_owned(),
            value: v.as_bytes().to_vec(),
        })
        .collect()
}

/// A mesh message back into a request for this node's app, marked as
/// forwarded so it is served here.
pub(crate) fn from_rest(rest: wire::RestRequest, from: String) -> Result<Request, String> {
    let uri = if rest.query.is_empty() {
        rest.path
    } else {
        format!("{}?{}", rest.path, rest.query)
    };
    let mut builder = axum::http::Request::builder()
        .method(rest.method.as_str())
        .uri(uri);
    for h in rest.headers {
        let name = HeaderName::from_bytes(h.name.as_bytes()).map_err(|e| e.to_string())?;
        if is_hop_by_hop(&name) {
            continue;
        }
        let value = HeaderValue::from_bytes(&h.value).map_err(|e| e.to_string())?;
        builder = builder.header(name, value);
    }
    let mut req = builder
        .body(Body::from(rest.body))
        .map_err(|e| e.to_string())?;
    // From a node's front, never a client's (front::create removes the
    // header from what a client sends).
    if let Some(v) = req.headers_mut().remove(RESERVATION_HEADER) {
        let token = v
            .to_str()
            .ok()
            .and_then(|t| t.parse().ok())
            .ok_or("malformed reservation token")?;
        req.extensions_mut().insert(Reservation(token));
    }
    req.extensions_mut().insert(Forwarded { from });
    Ok(req)
}

/// A response of this node's app as a mesh message.
pub(crate) async fn to_rest_response(resp: Response) -> wire::Response {
    match rest_response(resp, MAX_REST_RESPONSE).await {
        Ok(r) => wire::Response::Rest(r),
        Err(message) => wire::Response::Error {
            kind: ErrorKind::Internal,
            message,
        },
    }
}

/// A response of this node's app as a remote actor's answer.
pub(crate) async fn to_sandbox_reply(resp: Response) -> wire::SandboxReply {
    // Room for the rest of the payload around the body.
    match rest_response(resp, wire::MAX_SANDBOX_PAYLOAD - (64 << 10)).await {
        Ok(r) => wire::SandboxReply::Rest(r),
        Err(message) => wire::SandboxReply::Error {
            kind: ErrorKind::Internal,
            message,
        },
    }
}

/// A response of this node's app, its body read (at most `max` bytes).
async fn rest_response(resp: Response, max: usize) -> Result<wire::RestResponse, String> {
    let (parts, body) = resp.into_parts();
    match axum::body::to_bytes(body, max).await {
        Ok(body) => Ok(wire::RestResponse {
            status: parts.status.as_u16(),
            headers: wire_headers(&parts.headers),
            body: body.to_vec(),
        }),
        Err(e) => Err(format!(
            "the answer is too large to forward (over {max} bytes): {e}"
        )),
    }
}

/// A mesh answer as the response to relay to the client.
fn from_rest_response(r: wire::RestResponse) -> Response {
    let mut resp = Response::new(Body::from(r.body));
    *resp.status_mut() = StatusCode::from_u16(r.status).unwrap_or(StatusCode::BAD_GATEWAY);
    for h in r.headers {
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(h.name.as_bytes()),
            HeaderValue::from_bytes(&h.value),
        ) && !is_hop_by_hop(&n)
        {
            resp.headers_mut().append(n, v);
        }
    }
    resp
}

pub(crate) fn status_of(kind: ErrorKind) -> StatusCode {
    match kind {
        ErrorKind::BadRequest => StatusCode::BAD_REQUEST,
        ErrorKind::NotFound => StatusCode::NOT_FOUND,
        ErrorKind::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        ErrorKind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// Whether a call may be sent again after the connection failed under it
/// (the peer may have restarted): true for calls whose repetition does no
/// harm (lists; a create carries a reservation and is not repeated).
fn idempotent(rest: &wire::RestRequest) -> bool {
    matches!(rest.method.as_str(), "GET" | "HEAD")
}

impl Cluster {
    /// Carry `rest`, a call on one of node `info`'s sandboxes, to that
    /// node's sandbox directory as a remote actor call, and relay its
    /// answer. Fails at once when the actor session ends during the call
    /// (ractor_cluster fails the calls in flight on it), or as soon as
    /// gossip declares the owner dead (a killed node's QUIC connection
    /// would only time out).
    pub(crate) async fn call_owner(
        &self,
        info: &NodeInfo,
        rest: wire::RestRequest,
    ) -> Result<Response, OwnerError> {
        let Some(remote) = self.remote() else {
            return Err(OwnerError::Failed("this node is not in a mesh".into()));
        };
        let waited = std::time::Instant::now();
        while !remote.has_directory(&info.id) && waited.elapsed() < SESSION_WAIT {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let call = wire::SandboxCall::Rest {
            from: self.node_id().to_owned(),
            request: rest,
        };
        let answer = tokio::select! {
            answer = remote.sandbox_call(info, call, SANDBOX_CALL_TIMEOUT) => answer,
            () = self.died(&info.id) => return Err(OwnerError::Died),
        };
        match answer.map_err(OwnerError::Failed)? {
            wire::SandboxReply::Rest(r) => Ok(from_rest_response(r)),
            wire::SandboxReply::Error { kind, message } => {
                Ok(error_response(status_of(kind), message))
            }
            wire::SandboxReply::Located { .. } => Err(OwnerError::Failed(
                "answered a REST call with something else".into(),
            )),
        }
    }

    /// Have node `info` serve `rest` (this node serves it itself).
    /// `Err`: the node could not be asked or did not answer.
    pub(crate) async fn dispatch(
        &self,
        info: &NodeInfo,
        rest: wire::RestRequest,
    ) -> Result<Response, String> {
        if info.id == self.node_id() {
            return Ok(self.serve_local(rest, self.node_id().to_owned()).await);
        }
        let Some(transport) = self.transport() else {
            return Err("this node is not in a mesh".into());
        };
        let retry = idempotent(&rest);
        let request = wire::Request::Rest(rest);
        let mut answer = transport.call(info.quic_addr, &info.id, &request).await;
        if retry
            && matches!(
                answer,
                Err(mesh::transport::TransportError::Connection { .. })
            )
        {
            // A connection cached from before the peer restarted fails
            // once; the call redials.
            answer = transport.call(info.quic_addr, &info.id, &request).await;
        }
        match answer {
            Ok(wire::Response::Rest(r)) => Ok(from_rest_response(r)),
            Ok(wire::Response::Error { kind, message }) => {
                Ok(error_response(status_of(kind), message))
            }
            Ok(wire::Response::Pong { .. } | wire::Response::SignedBy { .. }) => {
                Err("answered a REST call with something else".into())
            }
            Err(e) => Err(e.to_string()),
        }
    }

    /// Serve `rest` through this node's own app, as a forwarded call.
    pub(crate) async fn serve_local(&self, rest: wire::RestRequest, from: String) -> Response {
        use tower::ServiceExt;
        let Some(app) = self.app() else {
            return error_response(StatusCode::SERVICE_UNAVAILABLE, "the node is starting");
        };
        match from_rest(rest, from) {
            Ok(req) => match app.oneshot(req).await {
                Ok(resp) => resp,
                Err(never) => match never {},
            },
            Err(e) => error_response(
                StatusCode::BAD_REQUEST,
                format!("malformed forwarded call: {e}"),
            ),
        }
    }
}

/// `POST /sandboxes`: reserve a slot on the best-ranked node whose
/// placement actor has one, and send the create there with the token.
async fn create(cluster: &Cluster, req: Request) -> Response {
    let mut rest = match to_rest(req).await {
        Ok(r) => r,
        Err(resp) => return resp,
    };
    // Only a node's front sets a reservation.
    rest.headers
        .retain(|h| !h.name.eq_ignore_ascii_case(RESERVATION_HEADER));
    // A body that is not JSON is the chosen node's to refuse (400).
    let template = serde_json::from_slice::<serde_json::Value>(&rest.body)
        .ok()
        .and_then(|v| {
            v.get("templateID")
                .and_then(|t| t.as_str())
                .map(str::to_owned)
        })
        .unwrap_or_else(|| "base".to_owned());
    let memory = match cluster.sandboxes().template(&template).await {
        Ok(Some(entry)) => entry.limits.memory_mib,
        _ => 0,
    };
    let mut members = cluster.members().await;
    members.retain(|m| cluster.is_verified(&m.info));
    let ranked = match cluster
        .sandboxes()
        .rank(members.clone(), &template, memory)
        .await
    {
        Ok(ranked) => ranked,
        Err(e) => {
            return axum::response::IntoResponse::into_response(crate::api::ApiError::from(e));
        }
    };
    if ranked.is_empty() {
        return no_room(&members);
    }
    let mut refusals: Vec<(StatusCode, String)> = Vec::new();
    let mut last: Option<Response> = None;
    let mut failures = Vec::new();
    let mut sent = 0;
    for info in ranked {
        if sent == MAX_PLACEMENT_TRIES {
            break;
        }
        let remote = info.id != cluster.node_id();
        let call = wire::ClusterCall::Reserve {
            template: template.clone(),
            memory_mib: memory,
        };
        let token = match cluster.placement_call(&info, call).await {
            Ok(wire::ClusterReply::Reserved { token, .. }) => {
                if remote {
                    count("reserve", "ok");
                }
                token
            }
            Ok(wire::ClusterReply::Refused { status, message }) => {
                if remote {
                    count("reserve", "refused");
                }
                tracing::debug!(node = %info.id, status, "placement: node refused a reservation: {message}");
                let status =
                    StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
                refusals.push((status, format!("{}: {message}", info.id)));
                continue;
            }
            Ok(other) => {
                failures.push(format!(
                    "{}: answered a reservation with {other:?}",
                    info.id
                ));
                continue;
            }
            Err(e) => {
                if remote {
                    count("reserve", "unreachable");
                }
                tracing::warn!(node = %info.id, "placement: no reservation: {e}");
                failures.push(format!("{}: {e}", info.id));
                continue;
            }
        };
        sent += 1;
        let mut with_token = rest.clone();
        with_token.headers.push(wire::Header {
            name: RESERVATION_HEADER.to_owned(),
            value: token.to_string().into_bytes(),
        });
        let answer = cluster.dispatch(&info, with_token).await;
        if remote {
            count("create", if answer.is_ok() { "ok" } else { "unreachable" });
        }
        let refused = match answer {
            Ok(resp) if resp.status().is_success() => return resp,
            // Draining since it reserved, or without this template: the
            // next node may take it.
            Ok(resp)
                if matches!(
                    resp.status(),
                    StatusCode::TOO_MANY_REQUESTS
                        | StatusCode::SERVICE_UNAVAILABLE
                        | StatusCode::NOT_FOUND
                ) =>
            {
                tracing::debug!(node = %info.id, status = %resp.status(), "placement: node refused the create");
                last = Some(resp);
                true
            }
            Ok(resp) => {
                // Refused for good (a bad request, say): the create took
                // no slot, so give the reservation back at once; left to
                // lapse, it would hold a slot for 15 s per bad request.
                release(cluster, info, token);
                return resp;
            }
            Err(e) => {
                tracing::warn!(node = %info.id, "placement: node did not answer a create: {e}");
                failures.push(format!("{}: {e}", info.id));
                true
            }
        };
        if refused {
            // The create did not take the slot: give it back now rather
            // than when the reservation lapses.
            release(cluster, info, token);
        }
    }
    if let Some(resp) = last {
        return resp;
    }
    if !refusals.is_empty() && failures.is_empty() {
        // Every node asked was full (or draining): one clean answer.
        let status = if refusals
            .iter()
            .any(|(s, _)| *s == StatusCode::TOO_MANY_REQUESTS)
        {
            StatusCode::TOO_MANY_REQUESTS
        } else {
            refusals[0].0
        };
        let why: Vec<&str> = refusals.iter().map(|(_, m)| m.as_str()).collect();
        return error_response(
            status,
            format!("no node has room for the sandbox ({})", why.join("; ")),
        );
    }
    let why: Vec<String> = refusals
        .into_iter()
        .map(|(_, m)| m)
        .chain(failures)
        .collect();
    error_response(
        StatusCode::SERVICE_UNAVAILABLE,
        format!("no node could take the sandbox: {}", why.join("; ")),
    )
}

/// Give back reservation `token` on `info`'s node, in the background.
fn release(cluster: &Cluster, info: NodeInfo, token: u64) {
    let cluster = cluster.clone();
    tokio::spawn(async move {
        let _ = cluster
            .placement_call(&info, wire::ClusterCall::Release { token })
            .await;
    });
}

/// The answer when placement finds no node at all.
fn no_room(members: &[mesh::membership::Member]) -> Response {
    let states: Vec<String> = members
        .iter()
        .map(|m| {
            let i = &m.info;
            let state = if !m.live {
                "dead".to_owned()
            } else if m.protocol_version != PROTOCOL_VERSION {
                format!("speaks mesh protocol {}", m.protocol_version)
            } else if i.state != NodeState::Ready {
                i.state.to_string()
            } else {
                format!("{}/{} sandboxes", i.sandboxes, i.max_sandboxes)
            };
            format!("{} {state}", i.id)
        })
        .collect();
    let any_ready = members.iter().any(|m| {
        m.live && m.protocol_version == PROTOCOL_VERSION && m.info.state == NodeState::Ready
    });
    let (status, what) = if any_ready {
        (
            StatusCode::TOO_MANY_REQUESTS,
            "every ready node is at capacity (its sandbox limit, or out of memory): kill a sandbox or retry later",
        )
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "no node takes new sandboxes",
        )
    };
    error_response(status, format!("{what} ({})", states.join(", ")))
}

/// `GET /sandboxes` and `/v2/sandboxes`: every live node's list, merged in
/// the order each node lists in ([`Order`]: start time, then id), paged
/// over the merge. Each node answers its first `limit` sandboxes after the
/// cursor in that order, so the merge's first `limit` are the cluster's:
/// order and paging hold cluster-wide.
async fn list(cluster: &Cluster, req: Request) -> Response {
    let v2 = req.uri().path().starts_with("/v2/");
    let pairs = query_pairs(req.uri().query().unwrap_or(""));
    let limit = pairs
        .iter()
        .find(|(k, _)| k == "limit")
        .and_then(|(_, v)| v.parse::<usize>().ok())
        .unwrap_or(crate::api::MAX_LIST_LIMIT);
    // A bad `order` is refused by every node (400), answered below.
    let order = pairs
        .iter()
        .find(|(k, _)| k == "order")
        .and_then(|(_, v)| Order::parse(v))
        .unwrap_or_default();
    let rest = match to_rest(req).await {
        Ok(r) => r,
        Err(resp) => return resp,
    };
    let members: Vec<NodeInfo> = cluster
        .members()
        .await
        .into_iter()
        .filter(|m| cluster.callable(m))
        .map(|m| m.info)
        .collect();
    let mut asks = tokio::task::JoinSet::new();
    for info in members {
        let (c, rest) = (cluster.clone(), rest.clone());
        asks.spawn(async move {
            let answer = c.dispatch(&info, rest).await;
            if info.id != c.node_id() {
                count("list", if answer.is_ok() { "ok" } else { "unreachable" });
            }
            (info.id, answer)
        });
    }
    let mut items: Vec<serde_json::Value> = Vec::new();
    let mut more = false;
    let mut missing = Vec::new();
    while let Some(joined) = asks.join_next().await {
        let Ok((node, answer)) = joined else { continue };
        let resp = match answer {
            Ok(resp) => resp,
            Err(e) => {
                tracing::warn!(%node, "listing sandboxes: node did not answer: {e}");
                missing.push(node);
                continue;
            }
        };
        if resp.status() != StatusCode::OK {
            // A bad query is refused the same way by every node.
            return resp;
        }
        more |= resp.headers().contains_key("x-next-token");
        let body = match axum::body::to_bytes(resp.into_body(), MAX_REST_RESPONSE).await {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(%node, "listing sandboxes: reading the answer: {e}");
                missing.push(node);
                continue;
            }
        };
        match serde_json::from_slice::<Vec<serde_json::Value>>(&body) {
            Ok(list) => items.extend(list),
            Err(e) => {
                tracing::warn!(%node, "listing sandboxes: not a JSON list: {e}");
                missing.push(node);
            }
        }
    }
    let (items, next) = merge_page(items, order, v2.then_some(limit), more);
    let mut resp = axum::response::IntoResponse::into_response(axum::Json(items));
    if let Some(next) = next.and_then(|n| HeaderValue::from_str(&n).ok()) {
        resp.headers_mut().insert("x-next-token", next);
    }
    if !missing.is_empty() {
        missing.sort();
        if let Ok(v) = HeaderValue::from_str(&missing.join(",")) {
            // The list lacks these nodes' sandboxes.
            resp.headers_mut().insert("x-sandmesh-unreachable-nodes", v);
        }
    }
    resp
}

/// The (start ms, id) of a listed sandbox as a node answered it.
fn position(v: &serde_json::Value) -> (u64, String) {
    let s = |k: &str| v.get(k).and_then(|x| x.as_str()).unwrap_or("");
    (
        schema::e2b::parse_rfc3339_ms(s("startedAt")).unwrap_or(0),
        s("sandboxID").to_owned(),
    )
}

/// The nodes' answers merged in `order`, cut to `limit` (v2; `None`: v1,
/// one page), with the next page's token when there is more: `more` says
/// whether some node had more than it answered.
fn merge_page(
    mut items: Vec<serde_json::Value>,
    order: Order,
    limit: Option<usize>,
    more: bool,
) -> (Vec<serde_json::Value>, Option<String>) {
    let mut keyed: Vec<((u64, String), serde_json::Value)> =
        items.drain(..).map(|v| (position(&v), v)).collect();
    keyed.sort_by(|(a, _), (b, _)| order.compare((a.0, a.1.as_str()), (b.0, b.1.as_str())));
    let Some(limit) = limit else {
        return (keyed.into_iter().map(|(_, v)| v).collect(), None);
    };
    let more = more || keyed.len() > limit;
    keyed.truncate(limit);
    let next = more
        .then(|| keyed.last())
        .flatten()
        .map(|((started_ms, id), _)| {
            Cursor {
                started_ms: *started_ms,
                id: id.clone(),
            }
            .token()
        });
    (keyed.into_iter().map(|(_, v)| v).collect(), next)
}

/// The sandbox, on another node, that a signed `/files` URL is for (no
/// sandbox of this node matched it): every live node is asked at once.
pub async fn find_signed(cluster: &Cluster, method: &Method, query: &str) -> Option<Target> {
    let transport = cluster.transport()?.clone();
    let mut asks = tokio::task::JoinSet::new();
    for m in cluster.members().await {
        if m.info.id == cluster.node_id() || !cluster.callable(&m) {
            continue;
        }
        let transport = transport.clone();
        let request = wire::Request::WhoSigned {
            method: method.as_str().to_owned(),
            query: query.to_owned(),
        };
        asks.spawn(async move {
            let answer = transport.call(m.info.quic_addr, &m.info.id, &request).await;
            count("signed", if answer.is_ok() { "ok" } else { "unreachable" });
            (m.info.id, answer)
        });
    }
    while let Some(joined) = asks.join_next().await {
        match joined {
            Ok((
                node,
                Ok(wire::Response::SignedBy {
                    sandbox_id: Some(id),
                }),
            )) if actors::sandbox::owner_of(&id).is_none_or(|o| o == node) => {
                // Let the other asks finish: aborting one mid-handshake
                // would throw away a connection being made.
                asks.detach_all();
                cluster.sandboxes().registry().remember(&id, &node);
                return Some(Target {
                    sandbox_id: id,
                    port: schema::envd::ENVD_PORT,
                });
            }
            Ok((node, Err(e))) => {
                tracing::debug!(%node, "asking who signed a file URL: {e}");
            }
            _ => {}
        }
    }
    None
}

/// Sandbox traffic for `target`: to the sandbox here, or over a raw mesh
/// stream to its owner.
pub async fn traffic(cluster: &Cluster, target: Target, req: Request) -> Response {
    let owner = match cluster.owner(&target.sandbox_id).await {
        // The object store's claim says where it went (see `unowned`).
        Owner::Dead(info) => match take_over(cluster, &target.sandbox_id).await {
            // Paused here now: the proxy answers as for any paused one
            // (and resumes it if it was created with autoResume).
            Ok(TakeOver::Taken) => Owner::Local,
            Ok(TakeOver::HeldBy(node)) => {
                match live_holder(cluster, &target.sandbox_id, &node).await {
                    Some(holder) => Owner::Remote(holder),
                    None => Owner::Dead(info),
                }
            }
            Ok(_) => Owner::Dead(info),
            Err(resp) => return closing(resp),
        },
        owner => owner,
    };
    match owner {
        Owner::Local => proxy::forward(cluster.sandboxes(), target, req).await,
        Owner::Dead(info) => {
            count("traffic", "dead");
            closing(owner_dead(&target.sandbox_id, &info.id))
        }
        Owner::Unknown(node) => closing(error_response(
            StatusCode::BAD_GATEWAY,
            format!(
                "The sandbox {} was not found: its node {node} is not a member of this cluster",
                target.sandbox_id
            ),
        )),
        Owner::Remote(info) => {
            let Some(transport) = cluster.transport() else {
                return closing(owner_unreachable(&target.sandbox_id, &info.id, "no mesh"));
            };
            let header = wire::StreamHeader {
                sandbox_id: target.sandbox_id.clone(),
                port: target.port,
            };
            let mut opened = transport
                .open_stream(info.quic_addr, &info.id, &header)
                .await;
            if matches!(
                opened,
                Err(mesh::transport::TransportError::Connection { .. })
            ) {
                // Nothing was sent on a failed connection: dial again.
                opened = transport
                    .open_stream(info.quic_addr, &info.id, &header)
                    .await;
            }
            count(
                "traffic",
                if opened.is_ok()
                    || matches!(
                        opened,
                        Err(mesh::transport::TransportError::Rejected { .. })
                    )
                {
                    "ok"
                } else {
                    "unreachable"
                },
            );
            match opened {
                Ok((send, recv)) => {
                    let stream: actors::runtime::BoxStream = Box::new(tokio::io::join(recv, send));
                    proxy::relay(stream, None, target, req).await
                }
                Err(mesh::transport::TransportError::Rejected { reason, .. }) => {
                    closing(error_response(StatusCode::BAD_GATEWAY, reason))
                }
                Err(e) => closing(owner_unreachable(
                    &target.sandbox_id,
                    &info.id,
                    &e.to_string(),
                )),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_are_classified() {
        let get = Method::GET;
        let post = Method::POST;
        assert_eq!(classify(&post, "/sandboxes"), Call::Create);
        assert_eq!(classify(&post, "/v2/sandboxes"), Call::Create);
        assert_eq!(classify(&get, "/sandboxes"), Call::List);
        assert_eq!(classify(&get, "/v2/sandboxes/"), Call::List);
        assert_eq!(
            classify(&get, "/sandboxes/abc-n1"),
            Call::Sandbox("abc-n1".into())
        );
        assert_eq!(
            classify(&post, "/v2/sandboxes/abc-n1/connect"),
            Call::Sandbox("abc-n1".into())
        );
        assert_eq!(classify(&Method::DELETE, "/sandboxes"), Call::Local);
        assert_eq!(classify(&get, "/sandboxesx"), Call::Local);
        assert_eq!(classify(&get, "/templates"), Call::Local);
        assert_eq!(classify(&get, "/sandboxes//x"), Call::Local);
    }

    #[test]
    fn rest_round_trips_into_a_forwarded_request() {
        let rest = wire::RestRequest {
            method: "POST".into(),
            path: "/sandboxes/x-n1/timeout".into(),
            query: "a=1".into(),
            headers: vec![
                wire::Header {
                    name: "x-api-key".into(),
                    value: b"k".to_vec(),
                },
                wire::Header {
                    name: "host".into(),
                    value: b"evil".to_vec(),
                },
            ],
            body: b"{}".to_vec(),
        };
        let req = from_rest(rest, "n2".into()).unwrap();
        assert_eq!(req.uri(), "/sandboxes/x-n1/timeout?a=1");
        assert_eq!(req.headers()["x-api-key"], "k");
        assert!(req.headers().get("host").is_none());
        assert_eq!(req.extensions().get::<Forwarded>().unwrap().from, "n2");
        let bad = wire::RestRequest {
            method: "GET".into(),
            path: "/".into(),
            query: String::new(),
            headers: vec![wire::Header {
                name: "bad name".into(),
                value: vec![],
            }],
            body: vec![],
        };
        assert!(from_rest(bad, "n2".into()).is_err());
    }

    #[test]
    fn pages_of_the_merge_are_the_clusters_pages() {
        use serde_json::json;
        // Two nodes' sandboxes, as each answers a page of 2 (newest
        // first): the merge pages through all five in one order.
        let at = |ms: u64| {
            schema::e2b::format_rfc3339(std::time::UNIX_EPOCH + Duration::from_millis(ms))
        };
        let sbx = |ms: u64, id: &str| json!({"sandboxID": id, "startedAt": at(ms)});
        let n1 = [sbx(5, "e"), sbx(3, "c"), sbx(1, "a")];
        let n2 = [sbx(4, "d"), sbx(2, "b")];
        for (order, want) in [
            (Order::Desc, ["e", "d", "c", "b", "a"]),
            (Order::Asc, ["a", "b", "c", "d", "e"]),
        ] {
            let mut seen = Vec::new();
            let mut cursor: Option<Cursor> = None;
            loop {
                // What each node answers: its own order, after the cursor.
                let (mut items, mut more) = (Vec::new(), false);
                for node in [&n1[..], &n2[..]] {
                    let mut mine: Vec<_> = node
                        .iter()
                        .filter(|v| {
                            let (ms, id) = position(v);
                            cursor
                                .as_ref()
                                .is_none_or(|c| c.before(order, (ms, id.as_str())))
                        })
                        .cloned()
                        .collect();
                    mine.sort_by(|a, b| {
                        let (a, b) = (position(a), position(b));
                        order.compare((a.0, a.1.as_str()), (b.0, b.1.as_str()))
                    });
                    more |= mine.len() > 2;
                    mine.truncate(2);
                    items.extend(mine);
                }
                let (page, next) = merge_page(items, order, Some(2), more);
                seen.extend(page.iter().map(|v| position(v).1));
                match next {
                    Some(t) => cursor = Cursor::parse(&t),
                    None => break,
                }
            }
            assert_eq!(seen, want, "{order:?}");
        }
        // v1: one page, every item, in order.
        let (all, next) = merge_page(vec![sbx(1, "a"), sbx(2, "b")], Order::Desc, None, true);
        assert_eq!(next, None);
        assert_eq!(position(&all[0]).1, "b");
    }
}
