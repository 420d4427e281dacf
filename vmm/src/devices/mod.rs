//! Device models and the buses the vCPU run loop dispatches exits to.
//!
//! - [`bus`]: address ranges → devices, one bus for port IO and one for MMIO.
//! - [`legacy`]: the PC devices a Linux guest needs without firmware: the
//!   16550 serial console and the i8042's reset line.
//!
//! - [`virtio`]: the virtio-mmio transport and virtio-blk (over a
//!   copy-on-write disk). To come: virtio-vsock.

pub mod bus;
pub mod legacy;
pub mod virtio;

pub use bus::{Bus, BusDevice, BusError};
