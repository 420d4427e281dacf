//! `GET /files` (download) and `POST /files` (upload), as E2B's envd.
//!
//! Bodies are streamed both ways, never held whole in memory. A failed or
//! aborted upload leaves nothing behind: a new file is written in place (so
//! watchers see create, chmod, write on its name, as upstream's do) and
//! removed on failure; a file being replaced is written to a temporary file
//! beside it and renamed over it once complete, so it keeps its old content
//! until then. With an access token set, a request needs it (`X-Access-Token`,
//! checked by `http::require_access_token`) or a signature made with it
//! (checked here): `v1_` + unpadded base64 of
//! `sha256("<path>:<read|write>:<username>:<token>[:<expiration>]")`.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_compression::tokio::bufread::{GzipDecoder, GzipEncoder};
use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, FromRequest, Multipart, Query, Request, State as AxState};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures_util::{Stream, StreamExt, TryStreamExt};
use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;
use tokio_util::io::{ReaderStream, StreamReader};

use crate::State;
use crate::filesystem::access::{Access, R};
use crate::filesystem::metadata::MetadataError;
use crate::http::{ApiError, constant_time_eq};
use crate::users::User;

pub fn routes() -> axum::Router<Arc<State>> {
    axum::Router::new()
        .route("/files", get(download).post(upload))
        // Uploads are streamed to disk: only the disk limits their size.
        .layer(DefaultBodyLimit::disable())
}

/// The query of `/files`.
#[derive(Debug, Default, Deserialize)]
pub struct FileParams {
    pub path: Option<String>,
    pub username: Option<String>,
    pub signature: Option<String>,
    pub signature_expiration: Option<String>,
}

/// One uploaded file, as the SDK expects it back.
#[derive(Debug, Serialize)]
pub struct UploadedEntry {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub path: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metadata: Option<HashMap<String, String>>,
}

fn unauthorized(message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::UNAUTHORIZED, message)
}

fn bad_request(message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, message)
}

/// With an access token set: the token in the header, or a valid signature
/// for this path, operation and user that has not expired.
fn authorize(
    state: &State,
    headers: &HeaderMap,
    p: &FileParams,
    operation: &str,
) -> Result<(), ApiError> {
    let Some(token) = state.init().access_token else {
        return Ok(());
    };
    if let Some(given) = headers.get("x-access-token") {
        return if constant_time_eq(given.as_bytes(), token.as_bytes()) {
            Ok(())
        } else {
            Err(unauthorized(
                "access token present in header but does not match",
            ))
        };
    }
    let Some(sig) = &p.signature else {
        return Err(unauthorized("missing signature query parameter"));
    };
    let expiration = match &p.signature_expiration {
        None => None,
        Some(s) => Some(
            s.parse::<i64>()
                .map_err(|_| bad_request(format!("invalid signature_expiration {s:?}")))?,
        ),
    };
    let expected = schema::envd::file_signature(
        p.path.as_deref().unwrap_or(""),
        operation,
        p.username.as_deref().unwrap_or(""),
        &token,
        expiration.map(|e| e.to_string()).as_deref(),
    );
    if !constant_time_eq(expected.as_bytes(), sig.as_bytes()) {
        return Err(unauthorized("invalid signature"));
    }
    if let Some(exp) = expiration {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        if exp < now {
            return Err(unauthorized("signature is already expired"));
        }
    }
    Ok(())
}

fn user(state: &State, p: &FileParams) -> Result<User, ApiError> {
    // As upstream: an unknown user is an authentication failure.
    state
        .user(p.username.as_deref())
        .map_err(|e| unauthorized(e.message))
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("file task failed: {e}"),
        )
    })?
}

/// Whether the client asked for (and accepts) a gzip response body.
fn wants_gzip(headers: &HeaderMap) -> Result<bool, ApiError> {
    let Some(value) = headers
        .get(header::ACCEPT_ENCODING)
        .and_then(|v| v.to_str().ok())
    else {
        return Ok(false);
    };
    let mut codings: Vec<(String, f32)> = value
        .split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|item| {
            let mut parts = item.split(';');
            let name = parts.next().unwrap_or("").trim().to_ascii_lowercase();
            let q = parts
                .filter_map(|p| {
                    p.trim()
                        .strip_prefix("q=")
                        .and_then(|q| q.trim().parse::<f32>().ok())
                })
                .next()
                .unwrap_or(1.0);
            (name, q)
        })
        .collect();
    codings.sort_by(|a, b| b.1.total_cmp(&a.1));
    let identity_rejected = codings.iter().any(|(n, q)| n == "identity" && *q == 0.0);
    for (name, q) in &codings {
        if *q == 0.0 {
            continue;
        }
        match name.as_str() {
            "identity" => return Ok(false),
            "*" => return Ok(identity_rejected),
            "gzip" | "x-gzip" => return Ok(true),
            _ => {}
        }
    }
    if identity_rejected {
        return Err(ApiError::new(
            StatusCode::NOT_ACCEPTABLE,
            "no acceptable encoding; supported: gzip, identity",
        ));
    }
    Ok(false)
}

/// `Content-Disposition` naming the file (RFC 6266, with a UTF-8 form).
fn content_disposition(name: &str) -> HeaderValue {
    let ascii: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_graphic() && c != '"' && c != '\\' || c == ' ' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let encoded: String = name
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"!#$&+-.^_`|~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect();
    HeaderValue::from_str(&format!(
        "attachment; filename=\"{ascii}\"; filename*=UTF-8''{encoded}"
    ))
    .unwrap_or_else(|_| HeaderValue::from_static("attachment"))
}

async fn download(
    AxState(state): AxState<Arc<State>>,
    Query(p): Query<FileParams>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    authorize(&state, &headers, &p, "read")?;
    let user = user(&state, &p)?;
    let (guest, host) = state.root.resolve(&user, p.path.as_deref().unwrap_or(""))?;
    let gzip = wants_gzip(&headers)?;
    let st = state.clone();
    let g = guest.clone();
    let (file, len) = blocking(move || {
        Access::new(&st.root, &user).check(&g, R, "read")?;
        let meta = std::fs::metadata(&host).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => ApiError::new(
                StatusCode::NOT_FOUND,
                format!("path '{}' does not exist", g.display()),
            ),
            _ => ApiError::from(crate::connect::ConnectError::from_io(
                &e,
                &g.display().to_string(),
            )),
        })?;
        if meta.is_dir() {
            return Err(bad_request(format!(
                "path '{}' is a directory",
                g.display()
            )));
        }
        let file = std::fs::File::open(&host).map_err(|e| {
            ApiError::from(crate::connect::ConnectError::from_io(
                &e,
                &g.display().to_string(),
            ))
        })?;
        Ok((file, meta.len()))
    })
    .await?;
    let file = tokio::fs::File::from_std(file);
    let name = guest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mime = mime_guess::from_path(&guest)
        .first_raw()
        .unwrap_or("application/octet-stream");
    let mut resp = Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, mime)
        .header(header::CONTENT_DISPOSITION, content_disposition(&name))
        .header(header::VARY, "Accept-Encoding");
    let body = if gzip {
        resp = resp.header(header::CONTENT_ENCODING, "gzip");
        let reader = tokio::io::BufReader::with_capacity(64 * 1024, file);
        Body::from_stream(ReaderStream::with_capacity(
            GzipEncoder::new(reader),
            64 * 1024,
        ))
    } else {
        resp = resp.header(header::CONTENT_LENGTH, len);
        Body::from_stream(ReaderStream::with_capacity(file, 64 * 1024))
    };
    resp.body(body)
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))
}

/// `X-Metadata-<key>: <value>` headers (keys lowercased, first value wins).
fn metadata_headers(headers: &HeaderMap) -> HashMap<String, String> {
    let mut out = HashMap::new();
    for (name, value) in headers {
        let Some(key) = name.as_str().strip_prefix("x-metadata-") else {
            continue;
        };
        if key.is_empty() {
            continue;
        }
        if let Ok(v) = value.to_str() {
            out.entry(key.to_owned()).or_insert_with(|| v.to_owned());
        }
    }
    out
}

/// Undo `Content-Encoding: gzip` on the request body, as it streams.
fn decode_body(req: Request) -> Result<Request, ApiError> {
    let encoding = req
        .headers()
        .get(header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.trim().to_ascii_lowercase())
        .unwrap_or_default();
    match encoding.as_str() {
        "" | "identity" => Ok(req),
        "gzip" | "x-gzip" => {
            let (mut parts, body) = req.into_parts();
            parts.headers.remove(header::CONTENT_ENCODING);
            parts.headers.remove(header::CONTENT_LENGTH);
            let reader = StreamReader::new(body.into_data_stream().map_err(io::Error::other));
            let decoded = ReaderStream::with_capacity(GzipDecoder::new(reader), 64 * 1024);
            Ok(Request::from_parts(parts, Body::from_stream(decoded)))
        }
        other => Err(bad_request(format!(
            "unsupported Content-Encoding {other:?}; supported: gzip, identity"
        ))),
    }
}

async fn upload(
    AxState(state): AxState<Arc<State>>,
    Query(p): Query<FileParams>,
    req: Request,
) -> Result<Response, ApiError> {
    authorize(&state, req.headers(), &p, "write")?;
    let user = user(&state, &p)?;
    let metadata = metadata_headers(req.headers());
    let media = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(|v| v.trim().to_ascii_lowercase())
        .unwrap_or_default();
    crate::filesystem::metadata::validate(&metadata).map_err(|e| bad_request(e.to_string()))?;
    let req = decode_body(req)?;
    let mut uploaded = Vec::new();
    if media == "application/octet-stream" {
        let path = p
            .path
            .as_deref()
            .ok_or_else(|| bad_request("path query parameter is required for a raw body upload"))?;
        let (guest, host) = state.root.resolve(&user, path)?;
        let body = req.into_body().into_data_stream();
        uploaded.push(write_file(&state, &user, guest, host, body, &metadata).await?);
    } else if media.starts_with("multipart/") {
        let mut multipart = Multipart::from_request(req, &state)
            .await
            .map_err(|e| bad_request(format!("malformed multipart body: {e}")))?;
        let mut seen: Vec<PathBuf> = Vec::new();
        loop {
            let field = match multipart.next_field().await {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => return Err(bad_request(format!("malformed multipart body: {e}"))),
            };
            if field.name() != Some("file") {
                continue;
            }
            let path = match (&p.path, field.file_name()) {
                (Some(path), _) => path.clone(),
                (None, Some(name)) => name.to_owned(),
                (None, None) => {
                    return Err(bad_request(
                        "a file part has no file name and no path was given",
                    ));
                }
            };
            let (guest, host) = state.root.resolve(&user, &path)?;
            if seen.contains(&guest) {
                return Err(bad_request(format!(
                    "you cannot upload multiple files to the same path '{}' in one upload request",
                    guest.display()
                )));
            }
            seen.push(guest.clone());
            uploaded.push(write_file(&state, &user, guest, host, field, &metadata).await?);
        }
    } else {
        return Err(bad_request(format!(
            "unsupported content type {media:?}, expected multipart/form-data or application/octet-stream"
        )));
    }
    Ok(Json(uploaded).into_response())
}

/// Removes an incomplete upload unless disarmed (also when the handler is
/// dropped because the client went away).
struct TempFile(Option<PathBuf>);

impl Drop for TempFile {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

fn is_no_space(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
        || matches!(
            e.kind(),
            io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded
        )
}

fn write_error(e: &io::Error, guest: &Path) -> ApiError {
    if is_no_space(e) {
        ApiError::new(
            StatusCode::INSUFFICIENT_STORAGE,
            format!("not enough disk space to write {}", guest.display()),
        )
    } else {
        // The caller's mistakes (a name longer than the filesystem takes,
        // a path through a file, a directory in the way, no permission)
        // are 4xx, as everywhere else in envd; only the rest is ours.
        let mapped = crate::connect::ConnectError::from_io(e, &guest.display().to_string());
        if mapped.code == crate::connect::Code::Internal {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("writing {}: {e}", guest.display()),
            )
        } else {
            ApiError::from(mapped)
        }
    }
}

/// What an upload's temporary file is called: `.<name>.envd-upload-<12 hex>`.
/// Watches hide files so named (`filesystem::watch`).
fn upload_temp_name(base: &str) -> String {
    let mut rnd = [0u8; 6];
    let _ = getrandom::fill(&mut rnd);
    let suffix: String = rnd.iter().map(|b| format!("{b:02x}")).collect();
    format!(".{base}{UPLOAD_TEMP_MARK}{suffix}")
}

const UPLOAD_TEMP_MARK: &str = ".envd-upload-";

/// Whether a file name is one [`upload_temp_name`] makes.
pub fn is_upload_temp(name: &std::ffi::OsStr) -> bool {
    let Some(name) = name.to_str() else {
        return false;
    };
    let Some(rest) = name.strip_prefix('.') else {
        return false;
    };
    let Some(at) = rest.rfind(UPLOAD_TEMP_MARK) else {
        return false;
    };
    let suffix = &rest[at + UPLOAD_TEMP_MARK.len()..];
    at > 0 && suffix.len() == 12 && suffix.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Stream `body` into a new file at `guest`, owned by `user`.
async fn write_file<S, E>(
    state: &Arc<State>,
    user: &User,
    guest: PathBuf,
    host: PathBuf,
    body: S,
    metadata: &HashMap<String, String>,
) -> Result<UploadedEntry, ApiError>
where
    S: Stream<Item = Result<Bytes, E>> + Unpin,
    E: std::fmt::Display,
{
    let (st, u, g, h) = (state.clone(), user.clone(), guest.clone(), host.clone());
    let (file, guard, via_temp) = blocking(move || {
        let access = Access::new(&st.root, &u);
        let parent = g.parent().ok_or_else(|| bad_request("cannot write to /"))?;
        let existing = match std::fs::metadata(&h) {
            Ok(m) if m.is_dir() => {
                return Err(bad_request(format!(
                    "path '{}' is a directory",
                    g.display()
                )));
            }
            Ok(m) => Some(m),
            Err(_) => None,
        };
        access.ensure_dirs(parent)?;
        access.check_write_dir(parent)?;
        if existing.is_some() {
            access.check_unlink(&g)?;
        }
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        let create = |path: &Path| {
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o644)
                .open(path)
        };
        // A new file is written in place (watchers see create, chmod, write
        // on its name, as with upstream) and removed if the upload fails.
        if existing.is_none() {
            match create(&h) {
                Ok(file) => {
                    let guard = TempFile(Some(h.clone()));
                    access.chown(&h).map_err(|e| write_error(&e, &g))?;
                    return Ok((file, guard, false));
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(write_error(&e, &g)),
            }
        }
        // A file being replaced keeps its old content until the new one is
        // complete: it is written beside it and renamed over it.
        let host_parent = h.parent().unwrap_or(Path::new("/"));
        let base = h
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let temp_path = host_parent.join(upload_temp_name(&base));
        let file = create(&temp_path).map_err(|e| write_error(&e, &g))?;
        let guard = TempFile(Some(temp_path.clone()));
        access.chown(&temp_path).map_err(|e| write_error(&e, &g))?;
        if let Some(m) = existing {
            // The replacement keeps the permission bits.
            let _ = std::fs::set_permissions(
                &temp_path,
                std::fs::Permissions::from_mode(m.permissions().mode() & 0o7777),
            );
        }
        Ok((file, guard, true))
    })
    .await?;
    let mut file = tokio::fs::File::from_std(file);
    let mut body = body;
    while let Some(chunk) = body.next().await {
        let chunk = chunk
            .map_err(|e| bad_request(format!("reading the upload of {}: {e}", guest.display())))?;
        file.write_all(&chunk)
            .await
            .map_err(|e| write_error(&e, &guest))?;
    }
    file.flush().await.map_err(|e| write_error(&e, &guest))?;
    drop(file);
    let written = guard.0.clone().unwrap_or_default();
    if via_temp {
        tokio::fs::rename(&written, &host)
            .await
            .map_err(|e| write_error(&e, &guest))?;
    }
    // Always set, even to nothing: an upload replaces the file's metadata
    // whole (as upstream's), and envd's store must forget a replaced
    // file's. A new file that cannot get them is removed with the guard.
    let (st, h, md) = (state.clone(), host.clone(), metadata.clone());
    let kept = blocking(move || {
        st.metadata.set(&h, &md).map_err(|e| match e {
            MetadataError::Invalid(_) => bad_request(e.to_string()),
            MetadataError::NoSpace(_) => {
                ApiError::new(StatusCode::INSUFFICIENT_STORAGE, e.to_string())
            }
            MetadataError::Io(_) => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        })?;
        // What was kept, read back (as upstream answers).
        Ok(st.metadata.get(&h))
    })
    .await?;
    let mut guard = guard;
    guard.0 = None;
    Ok(UploadedEntry {
        name: guest
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        kind: "file",
        path: guest.display().to_string(),
        metadata: (!kept.is_empty()).then_some(kept),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_encoding_picks_gzip_only_when_asked() {
        let h = |v: &str| {
            let mut m = HeaderMap::new();
            m.insert(header::ACCEPT_ENCODING, HeaderValue::from_str(v).unwrap());
            m
        };
        assert!(!wants_gzip(&HeaderMap::new()).unwrap());
        assert!(wants_gzip(&h("gzip")).unwrap());
        assert!(wants_gzip(&h("gzip, deflate")).unwrap());
        assert!(!wants_gzip(&h("identity")).unwrap());
        assert!(!wants_gzip(&h("br")).unwrap());
        assert!(!wants_gzip(&h("gzip;q=0")).unwrap());
        assert!(wants_gzip(&h("*, identity;q=0")).unwrap());
        assert!(wants_gzip(&h("identity;q=0.1, gzip;q=0.9")).unwrap());
        assert_eq!(
            wants_gzip(&h("br, identity;q=0")).unwrap_err().status,
            StatusCode::NOT_ACCEPTABLE
        );
    }

    #[test]
    fn upload_temporaries_are_told_from_other_files() {
        use std::ffi::OsStr;
        let name = upload_temp_name("report.txt");
        assert!(name.starts_with(".report.txt.envd-upload-"), "{name}");
        assert!(is_upload_temp(OsStr::new(&name)));
        assert!(is_upload_temp(OsStr::new(&upload_temp_name(".hidden"))));
        for other in [
            "report.txt",
            ".envd-upload-0123456789ab",
            ".x.envd-upload-tail",
            ".x.envd-upload-0123456789abc",
            "x.envd-upload-0123456789ab",
        ] {
            assert!(!is_upload_temp(OsStr::new(other)), "{other}");
        }
    }

    #[test]
    fn metadata_headers_are_lowercased_and_first_wins() {
        let mut m = HeaderMap::new();
        m.append("X-Metadata-Author", HeaderValue::from_static("first"));
        m.append("x-metadata-author", HeaderValue::from_static("second"));
        m.append("X-Metadata-", HeaderValue::from_static("ignored"));
        m.append("X-Access-Token", HeaderValue::from_static("t"));
        assert_eq!(
            metadata_headers(&m),
            HashMap::from([("author".to_owned(), "first".to_owned())])
        );
    }
}
