//! The actors of a node: `NodeSupervisor` -> `SandboxSupervisor` -> one
//! `SandboxActor` per sandbox, the `TemplateCache` and `Placement`, and the
//! runtime contract (microvm, gvisor) they drive.
//!
//! Today: [`runtime`], the contract between a SandboxActor and the thing
//! that runs its sandbox, and its gvisor implementation. The actors land
//! with the node issue.

pub mod runtime;
