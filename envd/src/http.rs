//! envd's plain HTTP endpoints: `/health`, `/init`, `/envs`, `/metrics`, `/sync`,
//! and the access-token check every other request passes.

use std::collections::HashMap;
use std::sync::Arc;

use axum::Json;
use axum::extract::{Request, State as AxState};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use crate::state::State;

/// An error in envd's REST shape: `{"code": <http status>, "message": ...}`.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({ "code": self.status.as_u16(), "message": self.message });
        (self.status, Json(body)).into_response()
    }
}

impl From<crate::connect::ConnectError> for ApiError {
    fn from(e: crate::connect::ConnectError) -> Self {
        Self::new(e.code.http_status(), e.message)
    }
}

/// Liveness probe used by the SDK and the node: 204 as E2B's envd answers.
pub async fn health() -> StatusCode {
    StatusCode::NO_CONTENT
}

/// Body of `POST /init`, as E2B's orchestrator sends it.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct InitRequest {
    pub env_vars: Option<HashMap<String, String>>,
    pub access_token: Option<String>,
    /// Host wall clock (RFC 3339) to set the guest clock from, after restore.
    pub timestamp: Option<String>,
    pub default_user: Option<String>,
    pub default_workdir: Option<String>,
    /// sandmesh's: fresh random bytes from the host (base64, at most
    /// [`MAX_ENTROPY`]) to reseed the guest kernel's RNG. Every sandbox
    /// restored from one snapshot starts with the same RNG state.
    pub entropy: Option<String>,
}

/// Most bytes of `entropy` an `/init` may carry.
pub const MAX_ENTROPY: usize = 512;

pub async fn init(
    AxState(state): AxState<Arc<State>>,
    body: axum::body::Bytes,
) -> Result<StatusCode, ApiError> {
    let req: InitRequest = if body.is_empty() {
        InitRequest::default()
    } else {
        serde_json::from_slice(&body).map_err(|e| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("malformed /init body: {e}"),
            )
        })?
    };
    if let Some(user) = &req.default_user {
        // Refuse a default user that does not exist rather than fail later.
        state.user(Some(user))?;
    }
    if let Some(ts) = &req.timestamp {
        set_clock(ts, state.set_clock)?;
    }
    if let Some(seed) = &req.entropy {
        reseed(seed, state.set_clock)?;
    }
    state.update_init(|init| {
        if let Some(env) = req.env_vars {
            init.env_vars.extend(env);
        }
        if let Some(token) = req.access_token {
            init.access_token = (!token.is_empty()).then_some(token);
        }
        if let Some(user) = req.default_user {
            init.default_user = user;
        }
        if let Some(dir) = req.default_workdir {
            init.default_workdir = (!dir.is_empty()).then(|| dir.into());
        }
    });
    Ok(StatusCode::NO_CONTENT)
}

/// Set the wall clock from the host's (a restored snapshot's clock is as
/// old as the snapshot). Only where envd owns the clock (`--set-clock`, in a
/// guest); a host process for tests must not move the host's clock.
/// Failure to set it is logged, not fatal: the sandbox still works.
fn set_clock(ts: &str, allowed: bool) -> Result<(), ApiError> {
    let parsed = humantime_rfc3339(ts).ok_or_else(|| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("timestamp {ts:?} is not RFC 3339"),
        )
    })?;
    if !allowed {
        return Ok(());
    }
    let since_epoch = parsed
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let tv = libc::timespec {
        tv_sec: since_epoch.as_secs() as libc::time_t,
        tv_nsec: since_epoch.subsec_nanos() as libc::c_long,
    };
    // SAFETY: clock_settime reads a valid timespec we own.
    if unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &tv) } != 0 {
        tracing::warn!(
            "could not set the clock: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// Mix `seed` (base64) into the guest kernel's RNG and credit it, then
/// make the kernel reseed its CRNG at once. Like the clock, only where envd
/// owns the guest (`--set-clock`). A kernel without the ioctls (gVisor,
/// whose randomness comes from the host anyway) gets the bytes written to
/// `/dev/urandom` instead (mixed, not credited).
fn reseed(seed: &str, allowed: bool) -> Result<(), ApiError> {
    use base64::Engine;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(seed)
        .ok()
        .filter(|b| !b.is_empty() && b.len() <= MAX_ENTROPY)
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("entropy must be 1 to {MAX_ENTROPY} bytes of base64"),
            )
        })?;
    if !allowed {
        return Ok(());
    }
    use std::io::Write;
    use std::os::fd::AsRawFd;
    let mut urandom = match std::fs::OpenOptions::new().write(true).open("/dev/urandom") {
        Ok(f) => f,
        Err(e) => {
            tracing::warn!("could not open /dev/urandom to reseed: {e}");
            return Ok(());
        }
    };
    // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
    let mut info = Vec::with_capacity(8 + bytes.len());
    info.extend_from_slice(&((bytes.len() * 8) as i32).to_ne_bytes());
    info.extend_from_slice(&(bytes.len() as i32).to_ne_bytes());
    info.extend_from_slice(&bytes);
    const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
    const RNDRESEEDCRNG: libc::c_ulong = 0x5207;
    // SAFETY: the ioctls read `info`, a rand_pool_info we own, for its
    // stated length; RNDRESEEDCRNG takes no argument.
    let credited = unsafe { libc::ioctl(urandom.as_raw_fd(), RNDADDENTROPY, info.as_ptr()) } == 0
        && unsafe { libc::ioctl(urandom.as_raw_fd(), RNDRESEEDCRNG) } == 0;
    if !credited {
        tracing::debug!(
            "RNG ioctls unavailable ({}): mixing the seed in",
            std::io::Error::last_os_error()
        );
        if let Err(e) = urandom.write_all(&bytes) {
            tracing::warn!("could not reseed the RNG: {e}");
        }
    }
    Ok(())
}

/// Parse an RFC 3339 timestamp (`2026-11-23T09:30:00.123Z` or with an offset).
fn humantime_rfc3339(ts: &str) -> Option<std::time::SystemTime> {
    let t: pbjson_types::Timestamp =
        serde_json::from_value(serde_json::Value::String(ts.to_owned())).ok()?;
    let secs = u64::try_from(t.seconds).ok()?;
    Some(std::time::UNIX_EPOCH + std::time::Duration::new(secs, u32::try_from(t.nanos).ok()?))
}

/// `GET /envs`: the sandbox environment variables set by `/init`.
pub async fn envs(AxState(state): AxState<Arc<State>>) -> Json<HashMap<String, String>> {
    Json(state.init().env_vars)
}

/// Require the access token `/init` set on every request except `/health`
/// and signed `/files` URLs (which the files handler verifies itself).
pub async fn require_access_token(
    AxState(state): AxState<Arc<State>>,
    req: Request,
    next: Next,
) -> Response {
    let Some(token) = state.init().access_token else {
        return next.run(req).await;
    };
    let path = req.uri().path();
    if path == "/health" {
        return next.run(req).await;
    }
    let given = req.headers().get("x-access-token").map(|v| v.as_bytes());
    match given {
        Some(given) if constant_time_eq(given, token.as_bytes()) => next.run(req).await,
        // A signed file URL carries no header; the files handler checks the signature.
        None if path == "/files" && has_signature(req.uri().query()) => next.run(req).await,
        Some(_) => ApiError::new(StatusCode::UNAUTHORIZED, "invalid access token").into_response(),
        None => ApiError::new(
            StatusCode::UNAUTHORIZED,
            "missing access token (X-Access-Token header)",
        )
        .into_response(),
    }
}

fn has_signature(query: Option<&str>) -> bool {
    query.is_some_and(|q| q.split('&').any(|kv| kv.starts_with("signature=")))
}

/// Compare secrets without leaking where they differ through timing.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// `GET /metrics`: what the guest uses, in upstream envd's shape.
#[derive(Debug, serde::Serialize)]
pub struct Metrics {
    /// Unix seconds of the sample.
    pub ts: i64,
    pub cpu_count: u32,
    /// CPU busy since the previous sample (or since boot, for the first).
    pub cpu_used_pct: f32,
    pub mem_total: u64,
    pub mem_used: u64,
    /// Page cache (`Cached` of /proc/meminfo).
    pub mem_cache: u64,
    pub disk_used: u64,
    pub disk_total: u64,
}

/// `POST /sync`: write every cached file change through to the disk
/// (sync(2)), answering 204 when done. Not in E2B's envd: the node calls
/// it before it copies the sandbox's disk for a filesystem-only snapshot,
/// which a fresh boot reads without the guest's page cache.
pub async fn sync() -> Result<StatusCode, ApiError> {
    // SAFETY: sync(2) takes no arguments and cannot fail.
    tokio::task::spawn_blocking(|| unsafe { libc::sync() })
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn metrics(AxState(state): AxState<Arc<State>>) -> Result<Json<Metrics>, ApiError> {
    let root = state.root.host_root().to_owned();
    let sample = tokio::task::spawn_blocking(move || sample_metrics(&root))
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
        .map_err(|e| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("reading metrics: {e}"),
            )
        })?;
    Ok(Json(sample))
}

fn sample_metrics(root: &std::path::Path) -> std::io::Result<Metrics> {
    static LAST_CPU: std::sync::Mutex<Option<(u64, u64)>> = std::sync::Mutex::new(None);
    let stat = std::fs::read_to_string("/proc/stat")?;
    let cpu: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    let total: u64 = cpu.iter().sum();
    // idle + iowait
    let idle = cpu.get(3).copied().unwrap_or(0) + cpu.get(4).copied().unwrap_or(0);
    let mut last = LAST_CPU.lock().unwrap_or_else(|p| p.into_inner());
    let (prev_total, prev_idle) = last.unwrap_or((0, 0));
    *last = Some((total, idle));
    let dt = total.saturating_sub(prev_total);
    let di = idle.saturating_sub(prev_idle);
    let cpu_used_pct = if dt == 0 {
        0.0
    } else {
        100.0 * (dt - di.min(dt)) as f32 / dt as f32
    };

    let meminfo = std::fs::read_to_string("/proc/meminfo")?;
    let kib = |key: &str| {
        meminfo
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            .unwrap_or(0)
            * 1024
    };
    let mem_total = kib("MemTotal:");
    let mem_used = mem_total.saturating_sub(kib("MemAvailable:"));
    let mem_cache = kib("Cached:");

    let c_root = std::ffi::CString::new(root.as_os_str().as_encoded_bytes())
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    // SAFETY: statvfs writes into the zeroed struct we own; the path is NUL-terminated.
    let mut vfs: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c_root.as_ptr(), &mut vfs) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let frsize = vfs.f_frsize as u64;
    let disk_total = vfs.f_blocks as u64 * frsize;
    let disk_used = disk_total.saturating_sub(vfs.f_bfree as u64 * frsize);
    let cpu_count = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
    let ts = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    Ok(Metrics {
        ts,
        cpu_count,
        cpu_used_pct,
        mem_total,
        mem_used,
        mem_cache,
        disk_used,
        disk_total,
    })
}
