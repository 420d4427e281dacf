//! envd: the agent inside every sandbox, wire-compatible with E2B's envd.
//!
//! It serves, on one port (49983, TCP and vsock):
//! - the Connect RPC services `process.Process` and `filesystem.Filesystem`
//!   (`connect/` is the protocol, `process/` and `filesystem/` the services);
//! - plain HTTP: `/health`, `/init`, `/envs`, `/metrics`, `/sync` (`http.rs`) and
//!   `/files` upload/download (`files.rs`).
//!
//! The same binary runs as a plain host process serving a directory as the
//! sandbox's root (`--root`), which is how its API tests run without a VM.

pub mod connect;
pub mod files;
pub mod filesystem;
pub mod http;
pub mod interpreter;
pub mod listener;
pub mod paths;
pub mod process;
pub mod state;
pub mod users;

use std::sync::Arc;

use axum::Router;
use axum::extract::Request;
use axum::response::IntoResponse;
use axum::routing::{get, post};

pub use state::State;

/// The whole envd API for `state`.
pub fn router(state: Arc<State>) -> Router {
    let rpc = Arc::new(
        connect::Router::new()
            .merge(process::router(state.clone()))
            .merge(filesystem::router(state.clone())),
    );
    Router::new()
        .route("/health", get(http::health))
        .route("/init", post(http::init))
        .route("/envs", get(http::envs))
        .route("/metrics", get(http::metrics))
        .route("/sync", post(http::sync))
        .merge(files::routes())
        .fallback(move |req: Request| {
            let rpc = rpc.clone();
            async move {
                // RPCs are POSTs; anything else on an unknown path is a plain 404.
                if req.method() == axum::http::Method::POST {
                    rpc.call(req).await
                } else {
                    let path = req.uri().path().to_owned();
                    http::ApiError::new(
                        axum::http::StatusCode::NOT_FOUND,
                        format!("no such endpoint: {path}"),
                    )
                    .into_response()
                }
            }
        })
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            http::require_access_token,
        ))
        .with_state(state)
}
