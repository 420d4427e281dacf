//! envd: the agent inside every sandbox.
//!
//! It serves E2B's envd API (today `GET /health`; the process and
//! filesystem services land with the envd issue) on TCP and on vsock port
//! 49983. The same binary runs as a plain host process for fast tests.

use axum::Router;
use axum::http::StatusCode;
use axum::routing::get;

/// The HTTP API of envd.
pub fn router() -> Router {
    Router::new().route("/health", get(health))
}

/// Liveness probe used by the SDK and the node: 204 as E2B's envd answers.
async fn health() -> StatusCode {
    StatusCode::NO_CONTENT
}
