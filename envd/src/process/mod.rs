//! `process.Process` (filled by the envd issue's process work).

use std::sync::Arc;

use crate::{State, connect};

pub fn router(_state: Arc<State>) -> connect::Router {
    connect::Router::new()
}
