//! The port-49999 API the `e2b-code-interpreter` SDK calls: `POST
//! /execute` (streamed lines, see [`super::output`]), `POST`/`GET
//! /contexts`, `POST /contexts/{id}/restart`, `DELETE /contexts/{id}` and
//! `GET /health`. Errors are JSON `{"code", "message"}` (the SDK shows the
//! body: a 404 becomes its `NotFoundException`).
//!
//! `/execute` runs code, so it is authenticated like envd: its
//! `X-Access-Token` is checked by asking envd for the sandbox's
//! environment variables with it (`GET /envs`), which also gives the
//! values the kernel must see.

use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use crate::listener::ThreadedTcpListener;
use axum::body::{Body, Bytes};
use axum::extract::connect_info::Connected;
use axum::extract::{ConnectInfo, Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::serve::IncomingStream;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;
use tokio::sync::mpsc;

use super::contexts::{Context, ContextError, Contexts};
use super::kernel::Outcome;
use super::{envs, output};

/// What the handlers share.
pub struct Server {
    pub contexts: Contexts,
    /// envd's address (`http://127.0.0.1:49983`); None: no envd to ask
    /// (the interpreter run on its own, in tests), so no token and no
    /// sandbox variables.
    pub envd: Option<String>,
    pub http: reqwest::Client,
    pub max_output: usize,
}

pub fn router(server: Arc<Server>) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/execute", post(execute))
        .route("/contexts", post(create_context).get(list_contexts))
        .route("/contexts/{id}/restart", post(restart_context))
        .route("/contexts/{id}", delete(remove_context))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "no such endpoint") })
        .with_state(server)
}

/// An error answer: E2B's `{"code", "message"}`.
pub struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(json!({"code": self.status.as_u16(), "message": self.message})),
        )
            .into_response()
    }
}

impl From<ContextError> for ApiError {
    fn from(e: ContextError) -> Self {
        let status = match &e {
            ContextError::NotFound(_) => StatusCode::NOT_FOUND,
            ContextError::UnknownLanguage { .. } | ContextError::NoSuchDirectory(_) => {
                StatusCode::BAD_REQUEST
            }
            ContextError::Kernel(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError::new(status, e.to_string())
    }
}

/// A JSON body, whatever its Content-Type says (E2B's server reads JSON
/// the same way).
fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let body = if body.iter().all(u8::is_ascii_whitespace) {
        b"{}".as_slice()
    } else {
        body
    };
    serde_json::from_slice(body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("the request body is not the JSON expected: {e}"),
        )
    })
}

async fn health() -> Json<&'static str> {
    Json("OK")
}

#[derive(Deserialize)]
struct ExecuteRequest {
    code: String,
    #[serde(default)]
    context_id: Option<String>,
    #[serde(default)]
    language: Option<String>,
    #[serde(default)]
    env_vars: Option<HashMap<String, String>>,
}

async fn execute(
    State(server): State<Arc<Server>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let request: ExecuteRequest = parse(&body)?;
    if request.context_id.is_some() && request.language.is_some() {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "give context_id or language, not both",
        ));
    }
    let call_envs = request.env_vars.unwrap_or_default();
    envs::check_names(call_envs.keys())
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.to_string()))?;
    let token = headers
        .get("x-access-token")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let sandbox_envs = server.sandbox_envs(token.as_deref()).await?;
    let context = match &request.context_id {
        Some(id) => server
            .contexts
            .get(id)
            .ok_or_else(|| ContextError::NotFound(id.clone()))?,
        None => {
            server
                .contexts
                .default_for(request.language.as_deref())
                .await?
        }
    };
    let (lines, body) = mpsc::unbounded_channel::<Bytes>();
    let server2 = server.clone();
    tokio::spawn(async move {
        run(
            &server2,
            &context,
            &request.code,
            call_envs,
            sandbox_envs,
            lines,
            peer,
        )
        .await
    });
    let stream = tokio_stream_of(body);
    Ok((
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(stream),
    )
        .into_response())
}

fn tokio_stream_of(
    mut body: mpsc::UnboundedReceiver<Bytes>,
) -> impl futures_util::Stream<Item = Result<Bytes, std::io::Error>> {
    futures_util::stream::poll_fn(move |cx| body.poll_recv(cx).map(|l| l.map(Ok)))
}

/// One execution, from the context's lock to `end_of_execution`.
async fn run(
    server: &Server,
    context: &Context,
    code: &str,
    call_envs: HashMap<String, String>,
    sandbox_envs: HashMap<String, String>,
    lines: mpsc::UnboundedSender<Bytes>,
    peer: Peer,
) {
    let send = |value: serde_json::Value| {
        let _ = lines.send(Bytes::from(output::line(&value)));
    };
    let gone = {
        let lines = lines.clone();
        async move {
            tokio::select! {
                _ = lines.closed() => {}
                _ = peer.hung_up() => {}
            }
        }
    };
    let mut slot = context.slot.lock().await;
    if slot.kernel.is_none()
        && let Err(e) = context
            .respawn(&mut slot, &server.contexts.runtime_dir)
            .await
    {
        send(output::error("KernelStartError", &e.to_string(), ""));
        send(output::end_of_execution());
        return;
    }
    let language = context.language().to_owned();
    // The sandbox's variables, set once per kernel (and again if they
    // changed); then the call's own.
    let mut setup = HashMap::new();
    if slot.global_envs.as_ref() != Some(&sandbox_envs) {
        setup.extend(sandbox_envs.clone());
        slot.global_envs = Some(sandbox_envs.clone());
    }
    setup.extend(call_envs.clone());
    let Some(kernel) = slot.kernel.as_mut() else {
        return;
    };
    if let Some(code) = envs::set(&language, &setup) {
        let _ = kernel
            .execute(&code, true, |_| {}, std::future::pending())
            .await;
    }
    let mut budget = output::Budget::new(server.max_output);
    let outcome = kernel
        .execute(
            code,
            false,
            |event| {
                for value in budget.admit(event) {
                    send(value);
                }
            },
            gone,
        )
        .await;
    match outcome {
        Ok(Outcome::Finished) | Ok(Outcome::Interrupted) => {
            if let Some(code) = envs::restore(&language, &call_envs, &sandbox_envs) {
                let _ = kernel
                    .execute(&code, true, |_| {}, std::future::pending())
                    .await;
            }
        }
        Ok(Outcome::KernelDied(status)) => {
            tracing::warn!(context = %context.info.id, %status, "kernel died during an execution; starting a new one");
            send(output::error(
                "KernelDied",
                &format!(
                    "the {language} kernel exited during the execution ({status}); its state is lost and a new kernel was started for this context"
                ),
                "",
            ));
            if let Err(e) = context
                .respawn(&mut slot, &server.contexts.runtime_dir)
                .await
            {
                tracing::warn!(context = %context.info.id, error = %e, "restarting a dead kernel");
                slot.kernel = None;
            }
        }
        Err(e) => {
            tracing::warn!(context = %context.info.id, error = %e, "execution failed; restarting the kernel");
            send(output::error("KernelError", &e.to_string(), ""));
            if context
                .respawn(&mut slot, &server.contexts.runtime_dir)
                .await
                .is_err()
            {
                slot.kernel = None;
            }
        }
    }
    if budget.dropped() > 0 {
        tracing::info!(context = %context.info.id, dropped = budget.dropped(), "output past the limit dropped");
    }
    send(output::end_of_execution());
}

impl Server {
    /// The sandbox's environment variables, asked of envd with the
    /// caller's token (which envd checks: a wrong one is a 401 here too).
    async fn sandbox_envs(&self, token: Option<&str>) -> Result<HashMap<String, String>, ApiError> {
        let Some(envd) = &self.envd else {
            return Ok(HashMap::new());
        };
        let mut request = self.http.get(format!("{envd}/envs"));
        if let Some(token) = token {
            request = request.header("X-Access-Token", token);
        }
        let response = request.send().await.map_err(|e| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("asking envd for the sandbox's variables: {e}"),
            )
        })?;
        match response.status() {
            s if s.is_success() => response.json().await.map_err(|e| {
                ApiError::new(StatusCode::BAD_GATEWAY, format!("envd's /envs answer: {e}"))
            }),
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "missing or wrong access token (X-Access-Token: the sandbox's envdAccessToken)",
            )),
            s => Err(ApiError::new(
                StatusCode::BAD_GATEWAY,
                format!("envd answered {s} to /envs"),
            )),
        }
    }
}

#[derive(Deserialize, Default)]
struct CreateContext {
    #[serde(default)]
    language: Option<String>,
    #[serde(default)]
    cwd: Option<String>,
}

async fn create_context(
    State(server): State<Arc<Server>>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let request: CreateContext = parse(&body)?;
    let context = server
        .contexts
        .create(request.language.as_deref(), request.cwd.as_deref())
        .await?;
    Ok(Json(context.info.clone()).into_response())
}

async fn list_contexts(State(server): State<Arc<Server>>) -> Response {
    Json(server.contexts.list()).into_response()
}

async fn restart_context(
    State(server): State<Arc<Server>>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    server.contexts.restart(&id).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn remove_context(
    State(server): State<Arc<Server>>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    server.contexts.remove(&id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The caller's TCP connection, to notice it hanging up while an execution
/// streams nothing (HTTP servers only notice a gone peer when they write,
/// and a quiet loop writes nothing — E2B's server sends keepalive lines for
/// this, which would also reset the SDK's read timeout and so keep the
/// call's `timeout` from ever firing).
#[derive(Clone)]
pub struct Peer(Option<Arc<OwnedFd>>);

impl Connected<IncomingStream<'_, ThreadedTcpListener>> for Peer {
    fn connect_info(stream: IncomingStream<'_, ThreadedTcpListener>) -> Self {
        Peer(stream.io().as_fd().try_clone_to_owned().ok().map(Arc::new))
    }
}

impl Peer {
    /// Resolves once the peer has closed its side (or the socket failed).
    async fn hung_up(&self) {
        let Some(fd) = &self.0 else {
            return std::future::pending().await;
        };
        loop {
            let mut poll = libc::pollfd {
                fd: fd.as_raw_fd(),
                events: libc::POLLRDHUP,
                revents: 0,
            };
            // SAFETY: one valid pollfd, zero timeout.
            let ready = unsafe { libc::poll(&mut poll, 1, 0) };
            if ready > 0 && poll.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}
