//! The actors of a node and the runtime contract they drive.
//!
//! ```text
//! NodeSupervisor                   node_supervisor.rs
//! ├── TemplateCache                template_cache.rs
//! ├── Placement                    placement.rs
//! ├── SandboxDirectory             directory.rs
//! └── SandboxSupervisor            sandbox/supervisor.rs
//!     └── SandboxActor             sandbox/actor.rs, one per sandbox
//! ```
//!
//! [`service::Sandboxes`] is what the node's REST handlers and proxy call;
//! it starts the tree. The actors persist sandbox records in sled
//! ([`store`]) and run sandboxes through a [`runtime`] (microvm, gvisor).
//! Nothing here depends on the node crate: the node depends on this one.
//! [`objects`] stores snapshot directories in an object store (a leaf: it
//! uses only [`metrics`]).
//!
//! Modules import each other one way, leaves first: [`clock`], [`store`],
//! [`metrics`], [`wire`], [`holding`] <- [`template_cache`], [`placement`] <- [`sandbox`]
//! <- [`directory`] <- [`node_supervisor`] <- [`service`].

pub mod build;
pub mod clock;
pub mod directory;
pub mod holding;
pub mod metrics;
pub mod node_supervisor;
pub mod objects;
pub mod placement;
pub mod runtime;
pub mod sandbox;
pub mod service;
pub mod store;
pub mod template_cache;
pub mod wire;
