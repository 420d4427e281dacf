//! Every type that crosses a process or machine boundary in sandmesh.
//!
//! Keeping them in one crate is what lets the node, the VMM, envd and the
//! build tooling change together: a wire type is never defined twice. The
//! crate grows with the protocols (E2B REST JSON, envd RPC messages, mesh
//! rkyv messages, VMM control).

pub mod dockerfile;
pub mod e2b;
pub mod envd;
pub mod guest;
pub mod mesh;
pub mod snapshot;
pub mod template;
pub mod vmm;
