//! The sandmesh VMM: one process per microVM, on KVM.
//!
//! The VMM boots the guest kernel that `cargo xtask guest` builds from
//! `vmm/guest/kernel.config` by direct 64-bit entry. See ARCHITECTURE.md for
//! the map of its modules; `probe` answers whether this host's KVM can run a
//! guest kernel at all.

pub mod arch;
pub mod builder;
pub mod control;
pub mod devices;
pub mod event_loop;
pub mod guest_kernel;
pub mod guest_rootfs;
pub mod jail;
pub mod loader;
pub mod probe;
pub mod runner;
pub mod snapshot;
pub mod uds;
pub mod vstate;
