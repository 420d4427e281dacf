//! E2B's template build API (`Template.build` in the SDK): request a
//! build, upload the files of its COPY steps, start it, follow its status
//! and log. The builds themselves are the actors crate's
//! (`actors::service`, `builds.rs`).

use axum::Router;
use axum::extract::{Path, RawQuery, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, patch, post, put};
use http_body_util::BodyExt;
use schema::e2b::LogLevel;
use schema::template::{BuildLogs, BuildRequest, BuildStart, FileUpload, MAX_LOG_ENTRIES};
use tokio::io::AsyncWriteExt;

use crate::api::{ApiError, Json};
use crate::http::query_pairs;
use actors::service::Sandboxes;

pub fn router(sandboxes: Sandboxes) -> Router {
    Router::new()
        .route("/v3/templates", post(request_build))
        .route("/templates/{id}/files/{hash}", get(file_upload_link))
        .route("/templates/{id}/files/{hash}/upload", put(upload_files))
        .route("/v2/templates/{id}/builds/{build}", post(start_build))
        .route("/templates/{id}/builds/{build}/status", get(build_status))
        .route("/templates/{id}/builds/{build}/logs", get(build_logs))
        .route("/v2/templates", get(list_v2))
        .route("/v2/templates/{id}", patch(update_template))
        .route("/templates/tags", post(assign_tags).delete(remove_tags))
        .route("/templates/{id}/tags", get(template_tags))
        .with_state(sandboxes)
}

/// Request a build: 202 with the template and build ids.
#[utoipa::path(post, path = "/v3/templates", request_body = BuildRequest,
    responses((status = 202, body = schema::template::BuildRequestAnswer),
        (status = 400, body = schema::e2b::ApiError)))]
pub async fn request_build(
    State(s): State<Sandboxes>,
    Json(req): Json<BuildRequest>,
) -> Result<Response, ApiError> {
    let answer = s.request_build(req).await?;
    Ok((StatusCode::ACCEPTED, axum::Json(answer)).into_response())
}

/// Where to upload the files of a COPY step (201), unless they are stored
/// already. The link is this node's upload endpoint; the headers carry
/// the caller's API key, which the upload needs as any call does.
#[utoipa::path(get, path = "/templates/{id}/files/{hash}",
    params(("id" = String, Path), ("hash" = String, Path)),
    responses((status = 201, body = FileUpload), (status = 400, body = schema::e2b::ApiError)))]
pub async fn file_upload_link(
    State(s): State<Sandboxes>,
    Path((id, hash)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let present = s.build_files_present(&id, &hash).await?;
    let (url, headers) = if present {
        (None, None)
    } else {
        let host = headers
            .get(axum::http::header::HOST)
            .and_then(|h| h.to_str().ok())
            .ok_or_else(|| ApiError::bad_request("the request has no Host header"))?;
        let scheme = headers
            .get("x-forwarded-proto")
            .and_then(|h| h.to_str().ok())
            .filter(|p| *p == "https")
            .unwrap_or("http");
        let key = headers
            .get("x-api-key")
            .and_then(|h| h.to_str().ok())
            .unwrap_or_default();
        (
            Some(format!(
                "{scheme}://{host}/templates/{id}/files/{hash}/upload"
            )),
            Some(std::collections::BTreeMap::from([(
                "X-API-Key".to_owned(),
                key.to_owned(),
            )])),
        )
    };
    Ok((
        StatusCode::CREATED,
        axum::Json(FileUpload {
            present,
            url,
            headers,
        }),
    )
        .into_response())
}

/// The upload itself: the tar (gzipped or not) of a COPY step's files,
/// at most the node's `--max-template-upload-mb` (413 beyond).
pub async fn upload_files(
    State(s): State<Sandboxes>,
    Path((id, hash)): Path<(String, String)>,
    req: Request,
) -> Result<Response, ApiError> {
    let max = s.max_build_upload();
    let declared = req
        .headers()
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let too_large = || {
        ApiError(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "the upload is larger than this node takes ({} MiB): leave large files out of the build context (.dockerignore) or raise --max-template-upload-mb",
                max >> 20
            ),
        )
    };
    if declared.is_some_and(|n| n > max) {
        return Err(too_large());
    }
    // Checked before the body is read: a bad name loses nothing.
    if !actors::build::is_files_hash(&hash) {
        return Err(ApiError::bad_request(format!(
            "files hash {hash:?}: 64 lowercase hex digits (SHA-256)"
        )));
    }
    let dir = s.build_upload_dir()?;
    let written = async {
        let path = dir.join("context.tar");
        let mut file = tokio::fs::File::create(&path).await.map_err(|e| {
            ApiError(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("{}: {e}", path.display()),
            )
        })?;
        let mut body = req.into_body();
        let mut total = 0u64;
        while let Some(frame) = body.frame().await {
            let frame =
                frame.map_err(|e| ApiError::bad_request(format!("reading the upload: {e}")))?;
            let Ok(chunk) = frame.into_data() else {
                continue;
            };
            total += chunk.len() as u64;
            if total > max {
                return Err(too_large());
            }
            file.write_all(&chunk).await.map_err(|e| {
                ApiError(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("{}: {e}", path.display()),
                )
            })?;
        }
        file.sync_all().await.map_err(|e| {
            ApiError(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("{}: {e}", path.display()),
            )
        })?;
        Ok(())
    }
    .await;
    if let Err(e) = written {
        let _ = std::fs::remove_dir_all(&dir);
        return Err(e);
    }
    s.store_build_files(&id, &hash, &dir).await?;
    Ok(StatusCode::OK.into_response())
}

/// Start a requested build with its steps: 202; the build runs on.
#[utoipa::path(post, path = "/v2/templates/{id}/builds/{build}", request_body = BuildStart,
    params(("id" = String, Path), ("build" = String, Path)),
    responses((status = 202), (status = 400, body = schema::e2b::ApiError),
        (status = 404, body = schema::e2b::ApiError)))]
pub async fn start_build(
    State(s): State<Sandboxes>,
    Path((id, build)): Path<(String, String)>,
    Json(start): Json<BuildStart>,
) -> Result<Response, ApiError> {
    s.start_build(&id, &build, start).await?;
    Ok(StatusCode::ACCEPTED.into_response())
}

fn level_of(v: &str) -> Result<LogLevel, ApiError> {
    serde_json::from_value(serde_json::Value::String(v.to_owned()))
        .map_err(|_| ApiError::bad_request(format!("level {v:?}: debug, info, warn or error")))
}

fn number(name: &str, v: &str) -> Result<usize, ApiError> {
    v.parse()
        .map_err(|_| ApiError::bad_request(format!("query parameter {name}={v:?} is not a number")))
}

/// A build's status and its log entries from `logsOffset` (at most
/// `limit`, 100).
#[utoipa::path(get, path = "/templates/{id}/builds/{build}/status",
    params(("id" = String, Path), ("build" = String, Path),
        ("logsOffset" = Option<usize>, Query), ("limit" = Option<usize>, Query),
        ("level" = Option<String>, Query)),
    responses((status = 200, body = schema::template::BuildStatus),
        (status = 404, body = schema::e2b::ApiError)))]
pub async fn build_status(
    State(s): State<Sandboxes>,
    Path((id, build)): Path<(String, String)>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let mut offset = 0;
    let mut limit = MAX_LOG_ENTRIES;
    let mut level = None;
    for (k, v) in query_pairs(query.as_deref().unwrap_or("")) {
        match k.as_str() {
            "logsOffset" => offset = number("logsOffset", &v)?,
            "limit" => limit = number("limit", &v)?,
            "level" => level = Some(level_of(&v)?),
            _ => {}
        }
    }
    let status = s.build_status(&id, &build, offset, limit, level).await?;
    Ok(axum::Json(status).into_response())
}

/// A build's log (`cursor`: entries from that Unix millisecond on).
#[utoipa::path(get, path = "/templates/{id}/builds/{build}/logs",
    params(("id" = String, Path), ("build" = String, Path),
        ("cursor" = Option<u64>, Query), ("limit" = Option<usize>, Query),
        ("level" = Option<String>, Query)),
    responses((status = 200, body = BuildLogs), (status = 404, body = schema::e2b::ApiError)))]
pub async fn build_logs(
    State(s): State<Sandboxes>,
    Path((id, build)): Path<(String, String)>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let mut cursor = 0u64;
    let mut limit = MAX_LOG_ENTRIES;
    let mut level = None;
    let mut backward = false;
    for (k, v) in query_pairs(query.as_deref().unwrap_or("")) {
        match k.as_str() {
            "cursor" => cursor = number("cursor", &v)? as u64,
            "limit" => limit = number("limit", &v)?,
            "level" => level = Some(level_of(&v)?),
            "direction" => backward = v == "backward",
            _ => {}
        }
    }
    let status = s.build_status(&id, &build, 0, usize::MAX, level).await?;
    let mut logs: Vec<_> = status
        .log_entries
        .into_iter()
        .filter(|e| schema::e2b::parse_rfc3339_ms(&e.timestamp).is_none_or(|t| t >= cursor))
        .collect();
    if backward {
        logs.reverse();
    }
    logs.truncate(limit.min(MAX_LOG_ENTRIES));
    Ok(axum::Json(BuildLogs { logs }).into_response())
}

/// `PATCH /templates/{id}` and `/v2/templates/{id}` (`{"public": bool}`):
/// accepted for any template this node serves; a node has no teams, so
/// every template is every API key's whatever `public` says.
pub async fn update_template(
    State(s): State<Sandboxes>,
    Path(id): Path<String>,
    Json(body): Json<serde_json::Value>,
) -> Result<Response, ApiError> {
    if !body.is_object() || body.get("public").is_some_and(|p| !p.is_boolean()) {
        return Err(ApiError::bad_request("give {\"public\": true|false}"));
    }
    let known =
        s.template(&id).await?.is_some() || s.user_template_info(&id, false).await?.is_some();
    if !known {
        return Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("template '{id}' not found"),
        ));
    }
    Ok(axum::Json(serde_json::json!({ "names": [id] })).into_response())
}

/// `POST /templates/tags`: tag the build `target` (`name[:tag]`) names.
pub async fn assign_tags(
    State(s): State<Sandboxes>,
    Json(req): Json<schema::template::AssignTags>,
) -> Result<Response, ApiError> {
    let assigned = s.assign_tags(&req.target, req.tags).await?;
    Ok((StatusCode::CREATED, axum::Json(assigned)).into_response())
}

/// `DELETE /templates/tags`: 204.
pub async fn remove_tags(
    State(s): State<Sandboxes>,
    Json(req): Json<schema::template::DeleteTags>,
) -> Result<Response, ApiError> {
    s.remove_tags(&req.name, &req.tags).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// `GET /templates/{id}/tags`.
pub async fn template_tags(
    State(s): State<Sandboxes>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    if let Some(t) = s.template(&id).await? {
        // A node's own template has its one build, `default`.
        let info = t.info(false);
        return Ok(axum::Json(vec![schema::template::TemplateTag {
            tag: "default".into(),
            build_id: info.build_id,
            created_at: info.created_at,
        }])
        .into_response());
    }
    match s.template_tags(&id).await? {
        Some(tags) => Ok(axum::Json(tags).into_response()),
        None => Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("template '{id}' not found"),
        )),
    }
}

/// `GET /v2/templates`: every template, the node's own and the built ones.
pub async fn list_v2(State(s): State<Sandboxes>) -> Result<Response, ApiError> {
    let mut all = actors::template_cache::infos(&s.templates().await?);
    all.extend(s.user_template_infos(false).await?);
    Ok(axum::Json(all).into_response())
}

#[cfg(test)]
mod tests {
    #[test]
    fn levels_parse_as_the_sdk_sends_them() {
        assert_eq!(
            super::level_of("warn").ok(),
            Some(schema::e2b::LogLevel::Warn)
        );
        assert!(super::level_of("loud").is_err());
    }
}
