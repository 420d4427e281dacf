//! Device models and the buses the vCPU run loop dispatches exits to.
//!
//! - [`bus`]: address ranges → devices, one bus for port IO and one for MMIO.
//! - [`legacy`]: the PC devices a Linux guest needs without firmware: the
//!   16550 serial console and the i8042's reset line.
//!
//! To come (issue 7): `virtio/{mmio,block,vsock}/` with `device.rs`,
//! `event_handler.rs` and `persist.rs` per device.

pub mod bus;
pub mod legacy;

pub use bus::{Bus, BusDevice, BusError};
