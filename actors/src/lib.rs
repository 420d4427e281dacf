//! The actors of a node: `NodeSupervisor` -> `SandboxSupervisor` -> one
//! `SandboxActor` per sandbox, the `TemplateCache` and `Placement`, and the
//! runtime contract (microvm, gvisor) they drive.
//!
//! Filled by the runtime and node issues; no code lands here before it has a
//! caller.
