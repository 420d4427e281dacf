//! `filesystem.Filesystem` (filled by the envd issue's filesystem work).

use std::sync::Arc;

use crate::{State, connect};

pub fn router(_state: Arc<State>) -> connect::Router {
    connect::Router::new()
}
