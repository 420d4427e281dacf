//! Calls the actors make to a sandbox's envd through the runtime's stream:
//! `/init` (identity, env vars, token, clock, a fresh RNG seed),
//! `/sync` and `/metrics`.

use super::http::send;
use super::*;

/// POST /init to envd through the runtime's stream.
/// `/init` envd of sandbox `id`: env vars, the access token `token`, the
/// host's clock and fresh entropy. `current_token`: the token envd holds
/// now when it differs (a fork restored from another sandbox's copy).
pub(super) async fn init_envd(
    runtime: &dyn Runtime,
    id: &SandboxId,
    env_vars: &BTreeMap<String, String>,
    token: &str,
    current_token: Option<&str>,
) -> Result<(), String> {
    use base64::Engine;
    // Every sandbox from one snapshot starts with the same kernel RNG
    // state: each gets its own seed (and the host's clock) at create and
    // at every resume.
    let seed = random_bytes(64).map_err(|e| e.to_string())?;
    let body = serde_json::json!({
        "envVars": env_vars,
        "accessToken": token,
        "timestamp": e2b::format_rfc3339(SystemTime::now()),
        "entropy": base64::engine::general_purpose::STANDARD.encode(seed),
    });
    // Needed once envd has a token (a resume; a fork, whose envd still
    // holds its source's); harmless before.
    post(
        runtime,
        id,
        current_token.unwrap_or(token),
        "/init",
        "application/json",
        Bytes::from(body.to_string()),
    )
    .await
}

/// POST `body` to envd's `path` (query included) with the access token,
/// through the runtime's stream: `Ok` on a 2xx answer, else
/// `"<status>: <envd's body>"` (or why envd was not reached).
pub(crate) async fn post(
    runtime: &dyn Runtime,
    id: &SandboxId,
    token: &str,
    path: &str,
    content_type: &str,
    body: Bytes,
) -> Result<(), String> {
    let stream = runtime
        .connect(id, ENVD_PORT)
        .await
        .map_err(|e| e.to_string())?;
    let req = hyper::Request::post(path)
        .header(hyper::header::HOST, "localhost")
        .header(hyper::header::CONTENT_TYPE, content_type)
        .header("X-Access-Token", token)
        .body(Full::new(body))
        .map_err(|e| e.to_string())?;
    let resp = send(stream, req).await.map_err(|e| e.to_string())?;
    let status = resp.status();
    if status.is_success() {
        return Ok(());
    }
    let body = resp
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    Err(format!("{status}: {}", String::from_utf8_lossy(&body)))
}

/// A request without a body to envd's `path`, with the access token,
/// through the runtime's stream; envd's answer.
async fn bodiless(
    runtime: &dyn Runtime,
    id: &SandboxId,
    method: hyper::Method,
    path: &str,
    token: &str,
) -> Result<hyper::Response<hyper::body::Incoming>, String> {
    let stream = runtime
        .connect(id, ENVD_PORT)
        .await
        .map_err(|e| e.to_string())?;
    let req = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header(hyper::header::HOST, "localhost")
        .header("X-Access-Token", token)
        .body(http_body_util::Empty::<Bytes>::new())
        .expect("a valid request");
    send(stream, req).await.map_err(|e| e.to_string())
}

/// envd's `POST /sync` (sync(2) in the guest) through the runtime's
/// stream: the guest's cached writes are on its disk once it answers.
pub(super) async fn envd_sync(
    runtime: &dyn Runtime,
    id: &SandboxId,
    token: &str,
) -> Result<(), String> {
    let resp = bodiless(runtime, id, hyper::Method::POST, "/sync", token).await?;
    match resp.status() {
        status if status.is_success() => Ok(()),
        status => Err(format!("/sync answered {status}")),
    }
}

/// envd's `GET /metrics` through the runtime's stream, as a SandboxMetric.
pub(crate) async fn envd_metrics(
    runtime: &dyn Runtime,
    id: &SandboxId,
    token: &str,
) -> Result<SandboxMetric, String> {
    #[derive(serde::Deserialize)]
    struct EnvdMetrics {
        ts: i64,
        cpu_count: u32,
        cpu_used_pct: f64,
        mem_total: u64,
        mem_used: u64,
        #[serde(default)]
        mem_cache: u64,
        disk_used: u64,
        disk_total: u64,
    }
    let resp = bodiless(runtime, id, hyper::Method::GET, "/metrics", token).await?;
    let status = resp.status();
    let body = resp
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .map_err(|e| e.to_string())?;
    if !status.is_success() {
        return Err(format!("{status}: {}", String::from_utf8_lossy(&body)));
    }
    let m: EnvdMetrics = serde_json::from_slice(&body).map_err(|e| e.to_string())?;
    Ok(SandboxMetric {
        timestamp: e2b::format_rfc3339(UNIX_EPOCH + Duration::from_secs(m.ts.max(0) as u64)),
        timestamp_unix: m.ts,
        cpu_count: m.cpu_count,
        cpu_used_pct: m.cpu_used_pct,
        mem_used: m.mem_used,
        mem_total: m.mem_total,
        mem_cache: m.mem_cache,
        disk_used: m.disk_used,
        disk_total: m.disk_total,
    })
}
