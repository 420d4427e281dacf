//! The sandmesh VMM: one process per microVM, on KVM.
//!
//! The VMM boots the guest kernel that `cargo xtask guest` builds from
//! `vmm/guest/kernel.config` by direct 64-bit entry. This crate grows with
//! the VMM issue (vCPU state, devices, the jail); today it holds the checks
//! that a kernel image is one we can boot.

pub mod arch;
pub mod builder;
pub mod devices;
pub mod guest_kernel;
pub mod loader;
pub mod vstate;
