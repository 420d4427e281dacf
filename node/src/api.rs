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
    ConnectRequest, ForkRequest, ForkResult, ListedSandbox, LogLevel, NewSandbox, RefreshRequest,
    ResumeRequest, SandboxDetail, SandboxLog, SandboxLogEntry, SandboxLogs, SandboxLogsV2,
    SandboxMetric, SnapshotInfo, SnapshotRequest, TemplateAliasResponse, TemplateInfo,
    TimeoutRequest,
};
use serde::de::DeserializeOwned;
use utoipa::OpenApi;

use crate::http::{closing, error_response, percent_decode, query_pairs};
use actors::clock::rfc3339_ms;
use actors::sandbox::{SandboxError, state_name};
use actors::service::Sandboxes;
use actors::store::SandboxRecord;
use actors::template_cache::infos;

/// An error of a handler.
pub struct ApiError(pub StatusCode, pub String);

impl ApiError {
    pub fn bad_request(msg: impl Into<String>) -> Self {
        Self(StatusCode::BAD_REQUEST, msg.into())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let resp = error_response(self.0, self.1);
        if self.0 == StatusCode::PAYLOAD_TOO_LARGE {
            // The rest of the body was never read: the connection closes
            // after this answer, so the client must not reuse it.
            closing(resp)
        } else {
            resp
        }
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

/// The OpenAPI document of this API, generated from the handlers and the
/// wire types in `schema::e2b` (served at `/openapi.json`).
#[derive(OpenApi)]
#[openapi(
    info(
        title = "sandmesh node API",
        description = "The E2B sandbox REST API as a sandmesh node serves it. Every call needs the X-API-KEY header. Sandbox traffic (envd, ports) goes to the same port, routed by Host `<port>-<sandboxID>.<domain>` or the E2b-Sandbox-Id / E2b-Sandbox-Port headers."
    ),
    paths(
        create, list_v2, list_v1, get_one, kill, set_timeout, refresh, connect, pause, resume,
        sandbox_logs, sandbox_logs_v2, sandbox_metrics, templates, template, template_alias,
        create_snapshot, fork, list_snapshots, delete_template,
        crate::template_api::request_build, crate::template_api::file_upload_link,
        crate::template_api::start_build, crate::template_api::build_status,
        crate::template_api::build_logs
    ),
    components(schemas(schema::e2b::ApiError)),
    modifiers(&ApiKeyAuth)
)]
pub struct ApiDoc;

struct ApiKeyAuth;

impl utoipa::Modify for ApiKeyAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{ApiKey, ApiKeyValue, SecurityRequirement, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "ApiKeyAuth",
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::new("X-API-KEY"))),
        );
        openapi.security = Some(vec![SecurityRequirement::new(
            "ApiKeyAuth",
            Vec::<String>::new(),
        )]);
    }
}

async fn openapi_json() -> Response {
    axum::Json(ApiDoc::openapi()).into_response()
}

pub fn router(sandboxes: Sandboxes) -> Router {
    Router::new()
        .route("/openapi.json", get(openapi_json))
        .route("/templates", get(templates))
        .route(
            "/templates/{id}",
            get(template)
                .delete(delete_template)
                .patch(crate::template_api::update_template),
        )
        .route("/snapshots", get(list_snapshots))
        .route("/sandboxes/{id}/snapshots", post(create_snapshot))
        .route("/sandboxes/{id}/fork", post(fork))
        .route("/templates/aliases/{alias}", get(template_alias))
        .route("/sandboxes/{id}/logs", get(sandbox_logs))
        .route("/v2/sandboxes/{id}/logs", get(sandbox_logs_v2))
        .route("/sandboxes/{id}/metrics", get(sandbox_metrics))
        .route("/v2/sandboxes", post(create).get(list_v2))
        .route("/sandboxes", post(create).get(list_v1))
        .route("/sandboxes/{id}", get(get_one).delete(kill))
        .route("/sandboxes/{id}/timeout", post(set_timeout))
        .route("/sandboxes/{id}/refreshes", post(refresh))
        .route("/sandboxes/{id}/connect", post(connect))
        .route("/v2/sandboxes/{id}/connect", post(connect))
        .route("/sandboxes/{id}/pause", post(pause))
        .route("/sandboxes/{id}/resume", post(resume))
        .with_state(sandboxes.clone())
        .merge(crate::template_api::router(sandboxes))
        .fallback(not_implemented)
}

/// Create a sandbox from a template; returns once envd answers.
#[utoipa::path(post, path = "/v2/sandboxes", request_body = NewSandbox,
    responses((status = 201, body = schema::e2b::Sandbox),
        (status = 400, body = schema::e2b::ApiError), (status = 404, description = "unknown template", body = schema::e2b::ApiError),
        (status = 429, description = "node at capacity", body = schema::e2b::ApiError)))]
async fn create(
    State(s): State<Sandboxes>,
    reservation: Option<axum::Extension<crate::http::Reservation>>,
    Json(req): Json<NewSandbox>,
) -> Result<Response, ApiError> {
    let token = reservation.map(|r| r.0.0);
    let sbx = s.create_reserved(req, token).await?;
    Ok((StatusCode::CREATED, axum::Json(sbx)).into_response())
}

fn found(s: &Sandboxes, id: &str) -> Result<SandboxRecord, ApiError> {
    s.get(id).ok_or_else(|| s.not_found(id).into())
}

#[utoipa::path(get, path = "/sandboxes/{id}", params(("id" = String, Path)),
    responses((status = 200, body = SandboxDetail), (status = 404, body = schema::e2b::ApiError)))]
async fn get_one(State(s): State<Sandboxes>, Path(id): Path<String>) -> Result<Response, ApiError> {
    let r = found(&s, &id)?;
    Ok(axum::Json(s.detail(&r)).into_response())
}

#[utoipa::path(delete, path = "/sandboxes/{id}", params(("id" = String, Path)),
    responses((status = 204), (status = 404, body = schema::e2b::ApiError)))]
async fn kill(State(s): State<Sandboxes>, Path(id): Path<String>) -> Result<StatusCode, ApiError> {
    s.kill(&id).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(post, path = "/sandboxes/{id}/timeout", params(("id" = String, Path)),
    request_body = TimeoutRequest,
    responses((status = 204), (status = 400, body = schema::e2b::ApiError), (status = 404, body = schema::e2b::ApiError)))]
async fn set_timeout(
    State(s): State<Sandboxes>,
    Path(id): Path<String>,
    Json(req): Json<TimeoutRequest>,
) -> Result<StatusCode, ApiError> {
    s.set_timeout(&id, req.timeout).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(post, path = "/sandboxes/{id}/refreshes", params(("id" = String, Path)),
    request_body(content = RefreshRequest, description = "optional"),
    responses((status = 204), (status = 404, body = schema::e2b::ApiError)))]
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

#[utoipa::path(post, path = "/v2/sandboxes/{id}/connect", params(("id" = String, Path)),
    request_body(content = ConnectRequest, description = "optional"),
    responses((status = 200, body = schema::e2b::Sandbox), (status = 404, body = schema::e2b::ApiError)))]
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
    let (sbx, resumed) = s.connect(&id, req.timeout).await?;
    let status = if resumed {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, axum::Json(sbx)).into_response())
}

#[utoipa::path(post, path = "/sandboxes/{id}/pause", params(("id" = String, Path)),
    responses((status = 204), (status = 404, body = schema::e2b::ApiError), (status = 409, description = "already paused", body = schema::e2b::ApiError)))]
async fn pause(State(s): State<Sandboxes>, Path(id): Path<String>) -> Result<StatusCode, ApiError> {
    // The body (`SandboxPauseRequest`, often `{}`) asks for nothing we
    // offer a choice of: a pause always keeps memory and files.
    s.pause(&id).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(post, path = "/sandboxes/{id}/resume", params(("id" = String, Path)),
    request_body(content = ResumeRequest, description = "optional"),
    responses((status = 201, body = schema::e2b::Sandbox), (status = 404, body = schema::e2b::ApiError), (status = 409, description = "already running", body = schema::e2b::ApiError)))]
async fn resume(
    State(s): State<Sandboxes>,
    Path(id): Path<String>,
    body: bytes::Bytes,
) -> Result<Response, ApiError> {
    let req: ResumeRequest = if body.is_empty() {
        ResumeRequest::default()
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| ApiError::bad_request(format!("malformed JSON body: {e}")))?
    };
    let sbx = s.resume(&id, req.timeout).await?;
    Ok((StatusCode::CREATED, axum::Json(sbx)).into_response())
}

/// The templates this node serves.
#[utoipa::path(get, path = "/templates", responses((status = 200, body = Vec<TemplateInfo>)))]
async fn templates(State(s): State<Sandboxes>) -> Result<Response, ApiError> {
    let mut all = infos(&s.templates().await?);
    all.extend(s.user_template_infos(false).await?);
    Ok(axum::Json(all).into_response())
}

/// One template, with its builds.
#[utoipa::path(get, path = "/templates/{id}", params(("id" = String, Path)),
    responses((status = 200, body = TemplateInfo), (status = 404, body = schema::e2b::ApiError)))]
async fn template(
    State(s): State<Sandboxes>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    match s.template(&id).await? {
        Some(t) => Ok(axum::Json(t.info(true)).into_response()),
        None if let Some(info) = s.user_template_info(&id, true).await? => {
            Ok(axum::Json(info).into_response())
        }
        None => {
            let names: Vec<String> = s
                .templates()
                .await?
                .iter()
                .map(|t| t.name().to_owned())
                .collect();
            Err(SandboxError::UnknownTemplate(id, names.join(", ")).into())
        }
    }
}

/// Whether a template goes by `alias` (`Template.exists`): 200 with its id
/// when it does, 404 when nothing does. A template's name is its one
/// alias here, and its only tag is `default` (E2B's default tag): `name`
/// and `name:default` exist, any other tag is a 404 naming it, and a
/// malformed alias is a 400, as E2B answers. Every template of a node is
/// the caller's (no teams), so E2B's 403 never arises.
#[utoipa::path(get, path = "/templates/aliases/{alias}", params(("alias" = String, Path)),
    responses((status = 200, body = TemplateAliasResponse), (status = 400, body = schema::e2b::ApiError),
        (status = 404, body = schema::e2b::ApiError)))]
async fn template_alias(
    State(s): State<Sandboxes>,
    Path(alias): Path<String>,
) -> Result<Response, ApiError> {
    let (name, tag) = match alias.split_once(':') {
        Some((name, tag)) => (name, Some(tag)),
        None => (alias.as_str(), None),
    };
    if name.is_empty() || tag.is_some_and(|t| t.is_empty() || t.contains(':')) {
        return Err(ApiError::bad_request(format!(
            "Invalid alias format: {alias:?} (use name or name:tag)"
        )));
    }
    let info = match s.template(name).await? {
        Some(t) => {
            if let Some(tag) = tag
                && tag != DEFAULT_TAG
            {
                return Err(ApiError(
                    StatusCode::NOT_FOUND,
                    format!("tag '{tag}' does not exist for template '{name}'"),
                ));
            }
            t.info(false)
        }
        None => match s.user_template_info(name, false).await? {
            Some(info) => {
                if let Some(tag) = tag
                    && tag != DEFAULT_TAG
                    && !s.user_template_has_tag(name, tag).await?
                {
                    return Err(ApiError(
                        StatusCode::NOT_FOUND,
                        format!("tag '{tag}' does not exist for template '{name}'"),
                    ));
                }
                info
            }
            None => {
                return Err(ApiError(
                    StatusCode::NOT_FOUND,
                    format!("template '{name}' not found"),
                ));
            }
        },
    };
    Ok(axum::Json(TemplateAliasResponse {
        template_id: info.template_id,
        public: info.public,
    })
    .into_response())
}

/// The one tag every template has (E2B's name for the build a bare name
/// means).
const DEFAULT_TAG: &str = "default";

/// Entries returned when the request names no `limit`, and at most.
const LOG_LIMIT: usize = 1000;

/// A number query parameter, or a 400 naming it.
fn number<T: std::str::FromStr>(name: &str, v: &str) -> Result<T, ApiError> {
    v.parse()
        .map_err(|_| ApiError::bad_request(format!("query parameter {name}={v:?} is not a number")))
}

fn log_limit(v: &str) -> Result<usize, ApiError> {
    let n: usize = number("limit", v)?;
    if n == 0 || n > LOG_LIMIT {
        return Err(ApiError::bad_request(format!(
            "limit {n} must be between 1 and {LOG_LIMIT}"
        )));
    }
    Ok(n)
}

/// What happened to the sandbox on this node and its console output
/// (init's and envd's), oldest first.
#[utoipa::path(get, path = "/sandboxes/{id}/logs",
    params(("id" = String, Path), ("start" = Option<u64>, Query, description = "unix milliseconds"), ("limit" = Option<u32>, Query)),
    responses((status = 200, body = SandboxLogs), (status = 404, body = schema::e2b::ApiError)))]
async fn sandbox_logs(
    State(s): State<Sandboxes>,
    Path(id): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let (mut start, mut limit) = (None, LOG_LIMIT);
    for (k, v) in query_pairs(raw.as_deref().unwrap_or("")) {
        match k.as_str() {
            "start" => start = Some(number::<u64>("start", &v)?),
            "limit" => limit = log_limit(&v)?,
            _ => {}
        }
    }
    let entries = s.logs(&id, start, limit).await?;
    let logs = entries
        .iter()
        .map(|e| SandboxLog {
            timestamp: e.timestamp.clone(),
            line: e.message.clone(),
        })
        .collect();
    Ok(axum::Json(SandboxLogs {
        logs,
        log_entries: entries,
    })
    .into_response())
}

/// The same log, with a cursor, a direction, a minimum level and a search.
#[utoipa::path(get, path = "/v2/sandboxes/{id}/logs",
    params(("id" = String, Path), ("cursor" = Option<u64>, Query, description = "unix milliseconds"),
        ("limit" = Option<u32>, Query), ("direction" = Option<String>, Query, description = "forward or backward"),
        ("level" = Option<String>, Query, description = "debug, info, warn or error: that level and above"),
        ("search" = Option<String>, Query)),
    responses((status = 200, body = SandboxLogsV2), (status = 400, body = schema::e2b::ApiError), (status = 404, body = schema::e2b::ApiError)))]
async fn sandbox_logs_v2(
    State(s): State<Sandboxes>,
    Path(id): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let (mut cursor, mut limit, mut backward, mut level, mut search) =
        (None, LOG_LIMIT, false, LogLevel::Debug, None);
    for (k, v) in query_pairs(raw.as_deref().unwrap_or("")) {
        match k.as_str() {
            "cursor" => cursor = Some(number::<u64>("cursor", &v)?),
            "limit" => limit = log_limit(&v)?,
            "direction" => {
                backward = match v.as_str() {
                    "forward" => false,
                    "backward" => true,
                    _ => {
                        return Err(ApiError::bad_request(format!(
                            "direction {v:?}: use forward or backward"
                        )));
                    }
                }
            }
            "level" => {
                level =
                    serde_json::from_value(serde_json::Value::String(v.clone())).map_err(|_| {
                        ApiError::bad_request(format!(
                            "level {v:?}: use debug, info, warn or error"
                        ))
                    })?
            }
            "search" => search = Some(v),
            _ => {}
        }
    }
    let mut entries: Vec<SandboxLogEntry> = s
        .logs(&id, None, usize::MAX)
        .await?
        .into_iter()
        .filter(|e| e.level >= level)
        .filter(|e| {
            search
                .as_ref()
                .is_none_or(|q| e.message.contains(q.as_str()))
        })
        .collect();
    if let Some(c) = cursor {
        let at = rfc3339_ms(c);
        if backward {
            entries.retain(|e| e.timestamp <= at);
        } else {
            entries.retain(|e| e.timestamp >= at);
        }
    }
    if backward {
        entries.reverse();
    }
    entries.truncate(limit);
    Ok(axum::Json(SandboxLogsV2 { logs: entries }).into_response())
}

/// The guest's CPU, memory and disk use as envd samples it: a sample is
/// taken on each call, and every sample taken in `[start, end]` returned.
#[utoipa::path(get, path = "/sandboxes/{id}/metrics",
    params(("id" = String, Path), ("start" = Option<i64>, Query, description = "unix seconds"), ("end" = Option<i64>, Query, description = "unix seconds")),
    responses((status = 200, body = Vec<SandboxMetric>), (status = 404, body = schema::e2b::ApiError)))]
async fn sandbox_metrics(
    State(s): State<Sandboxes>,
    Path(id): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let (mut start, mut end) = (None, None);
    for (k, v) in query_pairs(raw.as_deref().unwrap_or("")) {
        match k.as_str() {
            "start" => start = Some(number::<i64>("start", &v)?),
            "end" => end = Some(number::<i64>("end", &v)?),
            _ => {}
        }
    }
    let samples = s.metrics(&id, start, end).await?;
    Ok(axum::Json(samples).into_response())
}

/// A JSON body that may be empty (then the type's default).
fn optional_body<T: DeserializeOwned + Default>(body: &[u8]) -> Result<T, ApiError> {
    if body.is_empty() {
        return Ok(T::default());
    }
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("malformed JSON body: {e}")))
}

/// A copy of the running sandbox, published to the object store: the
/// sandbox keeps running; `Sandbox.create(template=<snapshotID>)` creates
/// from it on any node.
#[utoipa::path(post, path = "/sandboxes/{id}/snapshots", params(("id" = String, Path)),
    request_body(content = SnapshotRequest, description = "optional"),
    responses((status = 201, body = SnapshotInfo), (status = 404, body = schema::e2b::ApiError),
        (status = 409, description = "paused: resume it first", body = schema::e2b::ApiError)))]
async fn create_snapshot(
    State(s): State<Sandboxes>,
    Path(id): Path<String>,
    body: bytes::Bytes,
) -> Result<Response, ApiError> {
    let req: SnapshotRequest = optional_body(&body)?;
    let info = s.snapshot(&id, req).await?;
    Ok((StatusCode::CREATED, axum::Json(info)).into_response())
}

/// `count` (1 to 20, default 1) new sandboxes, each a copy of the running
/// sandbox as it is now, on its node; the source keeps running. One entry
/// per fork: the sandbox, or the error of that fork.
#[utoipa::path(post, path = "/sandboxes/{id}/fork", params(("id" = String, Path)),
    request_body(content = ForkRequest, description = "optional"),
    responses((status = 201, body = Vec<ForkResult>), (status = 400, body = schema::e2b::ApiError),
        (status = 404, body = schema::e2b::ApiError)))]
async fn fork(
    State(s): State<Sandboxes>,
    Path(id): Path<String>,
    body: bytes::Bytes,
) -> Result<Response, ApiError> {
    let req: ForkRequest = optional_body(&body)?;
    let forks = s.fork(&id, req.count.unwrap_or(1), req.timeout).await?;
    let answer: Vec<ForkResult> = forks
        .into_iter()
        .map(|f| match f {
            Ok(sandbox) => ForkResult {
                sandbox: Some(sandbox),
                error: None,
            },
            Err(e) => {
                let ApiError(status, message) = e.into();
                ForkResult {
                    sandbox: None,
                    error: Some(schema::e2b::ApiError {
                        code: status.as_u16(),
                        message,
                    }),
                }
            }
        })
        .collect();
    Ok((StatusCode::CREATED, axum::Json(answer)).into_response())
}

/// The snapshots in the object store, by id; those of `sandboxID`, named
/// `name`, when given; `limit` per page (default and most 100), the next
/// page's token in `x-next-token`.
#[utoipa::path(get, path = "/snapshots",
    params(("sandboxID" = Option<String>, Query), ("name" = Option<String>, Query),
        ("limit" = Option<u32>, Query), ("nextToken" = Option<String>, Query)),
    responses((status = 200, body = Vec<SnapshotInfo>), (status = 400, body = schema::e2b::ApiError)))]
async fn list_snapshots(
    State(s): State<Sandboxes>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let (mut sandbox, mut name, mut limit, mut after) = (None, None, MAX_LIST_LIMIT, None);
    for (k, v) in query_pairs(raw.as_deref().unwrap_or("")) {
        match k.as_str() {
            "sandboxID" => sandbox = Some(v),
            "name" => name = Some(v),
            "limit" => {
                limit = match v.parse::<usize>() {
                    Ok(n) if (1..=MAX_LIST_LIMIT).contains(&n) => n,
                    _ => {
                        return Err(ApiError::bad_request(format!(
                            "limit {v:?}: give 1 to {MAX_LIST_LIMIT}"
                        )));
                    }
                }
            }
            "nextToken" => after = Some(v),
            _ => {}
        }
    }
    let (page, next) = s
        .snapshots(sandbox.as_deref(), name.as_deref(), limit, after.as_deref())
        .await?;
    let mut resp = axum::Json(page).into_response();
    if let Some(next) = next.and_then(|n| HeaderValue::from_str(&n).ok()) {
        resp.headers_mut().insert("x-next-token", next);
    }
    Ok(resp)
}

/// Delete a snapshot (the SDK's `delete_snapshot` calls this): 204, or
/// 404 when there is no such snapshot. Templates themselves come from the
/// node's configuration and are not deleted through the API.
#[utoipa::path(delete, path = "/templates/{id}", params(("id" = String, Path)),
    responses((status = 204), (status = 404, body = schema::e2b::ApiError),
        (status = 501, body = schema::e2b::ApiError)))]
async fn delete_template(
    State(s): State<Sandboxes>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    if s.delete_snapshot(&id).await? || s.delete_user_template(&id).await? {
        return Ok(StatusCode::NO_CONTENT);
    }
    if s.template(&id).await?.is_some() {
        return Err(ApiError(
            StatusCode::NOT_IMPLEMENTED,
            format!(
                "template {id} comes from the node's configuration and cannot be deleted through the API"
            ),
        ));
    }
    Err(ApiError(
        StatusCode::NOT_FOUND,
        format!("snapshot or template {id} not found"),
    ))
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

/// The `metadata` filter as the SDK encodes it (wire reference §2.4): the
/// value (already decoded once as a query parameter) is `k=v&...` with each
/// part encoded twice more.
pub fn parse_metadata_filter(value: &str) -> BTreeMap<String, String> {
    query_pairs(value)
        .into_iter()
        .map(|(k, v)| (percent_decode(&k, false), percent_decode(&v, false)))
        .collect()
}

/// The order of a list (`order`): by start time, E2B's default newest
/// first. Ties (one millisecond) go by id, ascending when newest first and
/// descending when oldest first — E2B's keyset order, so that paging
/// either way is the exact reverse of the other.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Order {
    #[default]
    Desc,
    Asc,
}

impl Order {
    /// The `order` query parameter; `None` for anything but `asc`/`desc`.
    pub fn parse(v: &str) -> Option<Self> {
        match v {
            "desc" => Some(Self::Desc),
            "asc" => Some(Self::Asc),
            _ => None,
        }
    }

    /// Where (start ms, id) `a` goes relative to `b` in this order.
    pub fn compare(self, a: (u64, &str), b: (u64, &str)) -> std::cmp::Ordering {
        match self {
            Self::Desc => b.0.cmp(&a.0).then_with(|| a.1.cmp(b.1)),
            Self::Asc => a.0.cmp(&b.0).then_with(|| b.1.cmp(a.1)),
        }
    }
}

/// A `nextToken`: the position (start ms, id) of the last sandbox listed.
/// It names no order: the SDK sends `order` with every page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    pub started_ms: u64,
    pub id: String,
}

impl Cursor {
    pub fn parse(token: &str) -> Option<Self> {
        let (ms, id) = token.split_once('.')?;
        Some(Self {
            started_ms: ms.parse().ok()?,
            id: id.to_owned(),
        })
    }

    pub fn token(&self) -> String {
        format!("{}.{}", self.started_ms, self.id)
    }

    /// Whether (start ms, id) comes after this cursor in `order`.
    pub fn before(&self, order: Order, item: (u64, &str)) -> bool {
        order.compare((self.started_ms, self.id.as_str()), item) == std::cmp::Ordering::Less
    }
}

struct ListQuery {
    metadata: BTreeMap<String, String>,
    states: Option<Vec<String>>,
    limit: usize,
    next_token: Option<Cursor>,
    order: Order,
    /// `startedAfter`, in microseconds: sandboxes started at or after it.
    started_after_us: Option<i64>,
    /// `template`: sandboxes of this template only.
    template: Option<String>,
}

/// Most sandboxes one `GET /v2/sandboxes` page lists.
pub(crate) const MAX_LIST_LIMIT: usize = 100;

fn list_query(raw: Option<&str>) -> Result<ListQuery, ApiError> {
    let mut q = ListQuery {
        metadata: BTreeMap::new(),
        states: None,
        limit: MAX_LIST_LIMIT,
        next_token: None,
        order: Order::Desc,
        started_after_us: None,
        template: None,
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
                    .filter(|l| (1..=MAX_LIST_LIMIT).contains(l))
                    .ok_or_else(|| {
                        ApiError::bad_request(format!(
                            "limit {v:?} must be a number from 1 to {MAX_LIST_LIMIT}"
                        ))
                    })?;
            }
            "nextToken" if !v.is_empty() => {
                q.next_token =
                    Some(Cursor::parse(&v).ok_or_else(|| {
                        ApiError::bad_request(format!("invalid nextToken {v:?}"))
                    })?);
            }
            "order" => {
                q.order = Order::parse(&v).ok_or_else(|| {
                    ApiError::bad_request(format!(
                        "Invalid order parameter: unknown order {v:?} (use asc or desc)"
                    ))
                })?;
            }
            "startedAfter" => {
                q.started_after_us = Some(schema::e2b::parse_rfc3339_us(&v).ok_or_else(|| {
                    ApiError::bad_request(format!(
                        "startedAfter {v:?} is not an RFC 3339 date-time"
                    ))
                })?);
            }
            "template" => {
                // A sandbox records its template, never a tag of it: a
                // tagged filter could not narrow anything (E2B refuses it).
                if v.contains(':') {
                    return Err(ApiError::bad_request(format!(
                        "Invalid template {v:?}: tags are not supported here because sandboxes are not tag-scoped"
                    )));
                }
                q.template = Some(v);
            }
            _ => {}
        }
    }
    Ok(q)
}

fn filtered(s: &Sandboxes, q: &ListQuery) -> Vec<SandboxRecord> {
    let mut all: Vec<SandboxRecord> = s
        .list()
        .into_iter()
        // A template build's sandbox is the build's, not the user's (E2B
        // lists none either).
        .filter(|r| !r.metadata.contains_key(actors::service::BUILD_METADATA))
        .filter(|r| {
            let state = state_name(r.state);
            q.states
                .as_ref()
                .is_none_or(|st| st.iter().any(|x| x == state.as_str()))
        })
        .filter(|r| q.metadata.iter().all(|(k, v)| r.metadata.get(k) == Some(v)))
        .filter(|r| q.template.as_ref().is_none_or(|t| &r.template == t))
        .filter(|r| {
            q.started_after_us
                .is_none_or(|after| r.started_at_ms as i64 * 1000 >= after)
        })
        .collect();
    all.sort_by(|a, b| {
        q.order.compare(
            (a.started_at_ms, a.id.as_str()),
            (b.started_at_ms, b.id.as_str()),
        )
    });
    all
}

/// Sandboxes, running and paused alike, filtered by `metadata`, `state`,
/// `template` and `startedAfter`, in `order` (newest first unless `asc`),
/// paged by `limit` and `nextToken` (the `x-next-token` response header).
#[utoipa::path(get, path = "/v2/sandboxes",
    params(("metadata" = Option<String>, Query), ("state" = Option<String>, Query),
        ("order" = Option<String>, Query, description = "asc or desc (default): by start time"),
        ("startedAfter" = Option<String>, Query, description = "RFC 3339: sandboxes started at or after it"),
        ("template" = Option<String>, Query, description = "template name"),
        ("limit" = Option<u32>, Query), ("nextToken" = Option<String>, Query)),
    responses((status = 200, body = Vec<ListedSandbox>), (status = 400, body = schema::e2b::ApiError)))]
async fn list_v2(
    State(s): State<Sandboxes>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let q = list_query(raw.as_deref())?;
    let mut all = filtered(&s, &q);
    if let Some(cursor) = &q.next_token {
        all.retain(|r| cursor.before(q.order, (r.started_at_ms, r.id.as_str())));
    }
    let more = all.len() > q.limit;
    all.truncate(q.limit);
    let next = if more {
        all.last().map(|r| {
            Cursor {
                started_ms: r.started_at_ms,
                id: r.id.clone(),
            }
            .token()
        })
    } else {
        None
    };
    let body: Vec<ListedSandbox> = all.iter().map(|r| s.detail(r).into()).collect();
    let mut resp = axum::Json(body).into_response();
    if let Some(next) = next.and_then(|n| HeaderValue::from_str(&n).ok()) {
        resp.headers_mut().insert("x-next-token", next);
    }
    Ok(resp)
}

/// E2B's v1 list: the same filters, newest first, one page.
#[utoipa::path(get, path = "/sandboxes", params(("metadata" = Option<String>, Query)),
    responses((status = 200, body = Vec<ListedSandbox>)))]
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
        assert_eq!(q.order, Order::Desc);
        assert!(list_query(Some("limit=0")).is_err());
        assert!(list_query(Some("limit=abc")).is_err());
        assert!(list_query(Some("state=dead")).is_err());
    }

    #[test]
    fn list_query_reads_order_started_after_template_and_token() {
        // As the SDK sends them: `started_after.astimezone().isoformat()`
        // (the `+` escaped by httpx), the template name, asc.
        let raw = "order=asc&startedAfter=2024-01-01T01%3A00%3A00.5%2B01%3A00&template=base&nextToken=1704067200000.abc";
        let q = list_query(Some(raw)).ok().unwrap();
        assert_eq!(q.order, Order::Asc);
        assert_eq!(q.started_after_us, Some(1_704_067_200_500_000));
        assert_eq!(q.template.as_deref(), Some("base"));
        assert_eq!(
            q.next_token,
            Some(Cursor {
                started_ms: 1_704_067_200_000,
                id: "abc".into()
            })
        );
        for bad in [
            "order=up",
            "startedAfter=yesterday",
            "template=base:v1",
            "nextToken=nodot",
        ] {
            let e = list_query(Some(bad)).err().unwrap();
            assert_eq!(e.0, StatusCode::BAD_REQUEST, "{bad}");
        }
        // An empty token is no token (the SDK never sends one, but a
        // client echoing an absent header might).
        assert_eq!(
            list_query(Some("nextToken=")).ok().unwrap().next_token,
            None
        );
    }

    #[test]
    fn order_and_cursor_page_both_ways_without_gaps_or_repeats() {
        // Three sandboxes started in the same millisecond and two others.
        let items = [(5u64, "b"), (7, "a"), (7, "c"), (7, "b"), (9, "z")];
        for order in [Order::Desc, Order::Asc] {
            let mut sorted = items.to_vec();
            sorted.sort_by(|a, b| order.compare(*a, *b));
            let mut seen = Vec::new();
            let mut cursor: Option<Cursor> = None;
            loop {
                let page: Vec<_> = sorted
                    .iter()
                    .filter(|i| cursor.as_ref().is_none_or(|c| c.before(order, **i)))
                    .take(2)
                    .copied()
                    .collect();
                let Some(last) = page.last() else { break };
                cursor = Some(Cursor {
                    started_ms: last.0,
                    id: last.1.to_owned(),
                });
                seen.extend(page);
            }
            assert_eq!(seen, sorted, "{order:?}");
        }
        let mut desc = items.to_vec();
        desc.sort_by(|a, b| Order::Desc.compare(*a, *b));
        // Newest first; E2B's tie order (id ascending).
        assert_eq!(desc, [(9, "z"), (7, "a"), (7, "b"), (7, "c"), (5, "b")]);
        let mut asc = items.to_vec();
        asc.sort_by(|a, b| Order::Asc.compare(*a, *b));
        desc.reverse();
        assert_eq!(asc, desc, "asc is the exact reverse of desc");
        let c = Cursor::parse("7.b").unwrap();
        assert_eq!(c.token(), "7.b");
    }
}
