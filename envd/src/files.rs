//! `GET /files` and `POST /files` (filled by the envd issue's files work).

use std::sync::Arc;

use crate::State;

pub fn routes() -> axum::Router<Arc<State>> {
    axum::Router::new()
}
