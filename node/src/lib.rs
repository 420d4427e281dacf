//! The node library: the E2B REST API, the sandbox-traffic proxy, API keys
//! and sandbox records in sled, and the sandbox lifecycle service the
//! `sandmesh node` command runs.

pub mod api;
pub mod cluster;
pub mod http;
pub mod metrics;
pub mod ops;
pub mod proxy;
pub mod sandboxes;
pub mod server;
pub mod store;
pub mod supervisor;
pub mod templates;
