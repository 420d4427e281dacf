//! The node library: the E2B REST API, the sandbox-traffic proxy and the
//! cluster wiring that `sandmesh node` runs, over the actors of the
//! `actors` crate (sandbox lifecycle, templates, placement, sled records).

pub mod api;
pub mod cluster;
pub mod http;
pub mod metrics;
pub mod ops;
pub mod proxy;
pub mod server;
pub mod store_cli;
pub mod template_api;
pub mod template_cli;
