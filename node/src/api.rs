//! The E2B REST API handlers (the sandbox endpoints the SDK calls). Every
//! error is JSON `{code, message}` with the status the SDK maps to its
//! exceptions; endpoints that have not landed answer 501 the same way.

use std::collections::BTreeMap;

use axum::Router;
use axum::body::Body;
use axum::extract::{FromRequest, Path, RawQuery, Request, State};
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use schema::e2b::{
    ConnectRequest, ListedSandbox, NewSandbox, RefreshRequest, SandboxStateName, TimeoutRequest,
};
use serde::de::DeserializeOwned;

use crate::sandboxes::{SandboxError, Sandboxes};

/// A JSON error response.
pub fn error_response(status: StatusCode, message: impl Into<String>) -> Response {
    let body = schema::e2b::ApiError {
        code: status.as_u16(),
        message: message.into(),
    };
    (status, axum::Json(body)).into_response()
}

/// An error of a handler.
pub struct ApiError(pub StatusCode, pub String);

impl ApiError {
    pub fn bad_request(msg: impl Into<String>) -> Self {
        Self(StatusCode::BAD_REQUEST, msg.into())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        error_response(self.0, self.1)
    }
}

impl From<SandboxError> for ApiError {
    fn from(e: SandboxError) -> Self {
        let status = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        if status.is_server_error() {
            tracing::error!("{e}");
        }
        Self(status, e.to_string())
    }
}

/// A JSON body whose rejections are JSON errors too (axum's are text,
/// which the SDK cannot parse). The content type is not checked.
pub struct Json<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for Json<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let bytes = bytes::Bytes::from_request(req, state)
            .await
            .map_err(|r| ApiError(r.status(), r.body_text()))?;
        serde_json::from_slice(&bytes)
            .map(Json)
            .map_err(|e| ApiError::bad_request(format!("malformed JSON body: {e}")))
    }
}

pub fn router(sandboxes: Sandboxes) -> Router {
    Router::new()
        .route("/v2/sandboxes", post(create).get(list_v2))
        .route("/sandboxes", post(create).get(list_v1))
        .route("/sandboxes/{id}", get(get_one).delete(kill))
        .route("/sandboxes/{id}/timeout", post(set_timeout))
        .route("/sandboxes/{id}/refreshes", post(refresh))
        .route("/sandboxes/{id}/connect", post(connect))
        .route("/v2/sandboxes/{id}/connect", post(connect))
        .route("/sandboxes/{id}/pause", post(pause))
        .route("/sandboxes/{id}/resume", post(resume))
        .fallback(not_implemented)
        .with_state(sandboxes)
}

async fn create(
    State(s): State<Sandboxes>,
    Json(req): Json<NewSandbox>,
) -> Result<Response, ApiError> {
    let sbx = s.create(req).await?;
    Ok((StatusCode::CREATED, axum::Json(sbx)).into_response())
}

fn found(s: &Sandboxes, id: &str) -> Result<crate::store::SandboxRecord, ApiError> {
    s.get(id).ok_or_else(|| s.not_found(id).into())
}

async fn get_one(State(s): State<Sandboxes>, Path(id): Path<String>) -> Result<Response, ApiError> {
    let r = found(&s, &id)?;
    Ok(axum::Json(s.detail(&r)).into_response())
}

async fn kill(State(s): State<Sandboxes>, Path(id): Path<String>) -> Result<StatusCode, ApiError> {
    s.kill(&id).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn set_timeout(
    State(s): State<Sandboxes>,
    Path(id): Path<String>,
    Json(req): Json<TimeoutRequest>,
) -> Result<StatusCode, ApiError> {
    s.set_timeout(&id, req.timeout).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn refresh(
    State(s): State<Sandboxes>,
    Path(id): Path<String>,
    body: bytes::Bytes,
) -> Result<StatusCode, ApiError> {
    let req: RefreshRequest = if body.is_empty() {
        RefreshRequest::default()
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| ApiError::bad_request(format!("malformed JSON body: {e}")))?
    };
    // E2B's refresh keeps the sandbox alive for `duration` more seconds
    // (default: the node's default timeout).
    let secs = req
        .duration
        .unwrap_or(s.config().default_timeout.as_secs() as i64);
    s.set_timeout(&id, secs).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn connect(
    State(s): State<Sandboxes>,
    Path(id): Path<String>,
    body: bytes::Bytes,
) -> Result<Response, ApiError> {
    let req: ConnectRequest = if body.is_empty() {
        ConnectRequest::default()
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| ApiError::bad_request(format!("malformed JSON body: {e}")))?
    };
    let sbx = s.connect(&id, req.timeout).await?;
    Ok((StatusCode::OK, axum::Json(sbx)).into_response())
}

async fn pause(State(s): State<Sandboxes>, Path(id): Path<String>) -> Result<StatusCode, ApiError> {
    found(&s, &id)?;
    Err(SandboxError::NotImplemented("pause lands with the snapshot issue".into()).into())
}

async fn resume(
    State(s): State<Sandboxes>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    found(&s, &id)?;
    // Nothing is ever paused yet, so a known sandbox is a running one.
    Err(SandboxError::AlreadyRunning(id).into())
}

async fn not_implemented(req: Request<Body>) -> ApiError {
    ApiError(
        StatusCode::NOT_IMPLEMENTED,
        format!(
            "{} {} is not implemented by this sandmesh node yet",
            req.method(),
            req.uri().path()
        ),
    )
}

// ------------------------------------------------------------- listing

/// Percent-decode once (`+` is a space, as in form encoding).
fn percent_decode(s: &str, plus_is_space: bool) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                let hex = std::str::from_utf8(&b[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(v) => {
                        out.push(v);
                        i += 3;
                        continue;
                    }
                    None => out.push(b'%'),
                }
            }
            b'+' if plus_is_space => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `k=v&...` pairs of a query string, each part decoded once.
pub(crate) fn query_pairs(q: &str) -> Vec<(String, String)> {
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k, true), percent_decode(v, true))
        })
        .collect()
}

/// The `metadata` filter as the SDK encodes it (wire reference §2.4): the
/// value (already decoded once as a query parameter) is `k=v&...` with each
/// part encoded twice more.
pub fn parse_metadata_filter(value: &str) -> BTreeMap<String, String> {
    query_pairs(value)
        .into_iter()
        .map(|(k, v)| (percent_decode(&k, false), percent_decode(&v, false)))
        .collect()
}

struct ListQuery {
    metadata: BTreeMap<String, String>,
    states: Option<Vec<String>>,
    limit: usize,
    next_token: Option<String>,
}

const MAX_LIMIT: usize = 100;

fn list_query(raw: Option<&str>) -> Result<ListQuery, ApiError> {
    let mut q = ListQuery {
        metadata: BTreeMap::new(),
        states: None,
        limit: MAX_LIMIT,
        next_token: None,
    };
    for (k, v) in query_pairs(raw.unwrap_or("")) {
        match k.as_str() {
            "metadata" => q.metadata.extend(parse_metadata_filter(&v)),
            "state" => {
                let states: Vec<String> = v
                    .split(',')
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned)
                    .collect();
                for st in &states {
                    if st != "running" && st != "paused" {
                        return Err(ApiError::bad_request(format!(
                            "unknown state {st:?}: use running or paused"
                        )));
                    }
                }
                q.states.get_or_insert_with(Vec::new).extend(states);
            }
            "limit" => {
                q.limit = v
                    .parse::<usize>()
                    .ok()
                    .filter(|l| (1..=MAX_LIMIT).contains(l))
                    .ok_or_else(|| {
                        ApiError::bad_request(format!(
                            "limit {v:?} must be a number from 1 to {MAX_LIMIT}"
                        ))
                    })?;
            }
            "nextToken" => q.next_token = Some(v).filter(|t| !t.is_empty()),
            _ => {}
        }
    }
    Ok(q)
}

/// Pagination token: the position after the last listed sandbox.
fn token_of(r: &crate::store::SandboxRecord) -> String {
    format!("{}.{}", r.started_at_ms, r.id)
}

fn filtered(s: &Sandboxes, q: &ListQuery) -> Vec<crate::store::SandboxRecord> {
    s.list()
        .into_iter()
        .filter(|_| {
            q.states
                .as_ref()
                .is_none_or(|st| st.iter().any(|x| x == SandboxStateName::Running.as_str()))
        })
        .filter(|r| q.metadata.iter().all(|(k, v)| r.metadata.get(k) == Some(v)))
        .collect()
}

async fn list_v2(
    State(s): State<Sandboxes>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let q = list_query(raw.as_deref())?;
    let mut all = filtered(&s, &q);
    if let Some(token) = &q.next_token {
        let (ms, id) = token
            .split_once('.')
            .and_then(|(ms, id)| Some((ms.parse::<u64>().ok()?, id.to_owned())))
            .ok_or_else(|| ApiError::bad_request(format!("invalid nextToken {token:?}")))?;
        all.retain(|r| (r.started_at_ms, &r.id) > (ms, &id));
    }
    let more = all.len() > q.limit;
    all.truncate(q.limit);
    let next = if more { all.last().map(token_of) } else { None };
    let body: Vec<ListedSandbox> = all.iter().map(|r| s.detail(r).into()).collect();
    let mut resp = axum::Json(body).into_response();
    if let Some(next) = next {
        resp.headers_mut().insert(
            "x-next-token",
            HeaderValue::from_str(&next).expect("token is ASCII"),
        );
    }
    Ok(resp)
}

async fn list_v1(
    State(s): State<Sandboxes>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let q = list_query(raw.as_deref())?;
    let body: Vec<ListedSandbox> = filtered(&s, &q)
        .iter()
        .map(|r| s.detail(r).into())
        .collect();
    Ok(axum::Json(body).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_filter_decodes_the_sdk_encoding() {
        // {"a b": "c&d", "x": "y"} as the SDK sends it, after the query
        // parameter itself was decoded once.
        let raw = "metadata=a%252520b%3Dc%252526d%26x%3Dy";
        let q = list_query(Some(raw)).ok().unwrap();
        assert_eq!(
            q.metadata,
            BTreeMap::from([("a b".into(), "c&d".into()), ("x".into(), "y".into())])
        );
        let q = list_query(Some("metadata=user%3Dalice&state=running&limit=5"))
            .ok()
            .unwrap();
        assert_eq!(
            q.metadata,
            BTreeMap::from([("user".into(), "alice".into())])
        );
        assert_eq!(q.states, Some(vec!["running".into()]));
        assert_eq!(q.limit, 5);
        assert!(list_query(Some("limit=0")).is_err());
        assert!(list_query(Some("limit=abc")).is_err());
        assert!(list_query(Some("state=dead")).is_err());
    }

    #[test]
    fn percent_decoding_is_lenient() {
        assert_eq!(percent_decode("a%2", false), "a%2");
        assert_eq!(percent_decode("%zz", false), "%zz");
        assert_eq!(percent_decode("a+b%20c", true), "a b c");
        assert_eq!(percent_decode("a+b", false), "a+b");
    }
}
