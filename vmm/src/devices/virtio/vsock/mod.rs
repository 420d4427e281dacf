//! virtio-vsock with Firecracker's hybrid host side: guest stream sockets
//! spliced to unix sockets on the host.
//!
//! - `packet.rs`: the 44-byte header and the checked scatter-gather
//!   reading and writing of packets in descriptor chains.
//! - `connection.rs`: one connection, its buffers and credit accounting.
//! - `unix/muxer.rs`: the connection table and the unix sockets
//!   (`CONNECT <port>\n` / `OK <port>\n` for host-initiated connections,
//!   `<uds>_<port>` for guest-initiated ones).
//! - `device.rs`: the device — RX (0), TX (1) and event (2) queues,
//!   config space (`guest_cid`), and the queue processing.
//! - `event_handler.rs`: queue notifications and host-socket polling.
//! - `persist.rs`: the snapshot state (connections are not saved: on
//!   restore they are gone and the guest is sent TRANSPORT_RESET).

pub mod connection;
pub mod device;
pub mod event_handler;
pub mod packet;
pub mod persist;
pub mod unix;

pub use device::Vsock;

/// The host's CID (`VMADDR_CID_HOST`).
pub const HOST_CID: u64 = 2;
/// Descriptors in each queue.
pub const QUEUE_SIZE: u16 = 256;
/// RX, TX, event.
pub const NUM_QUEUES: usize = 3;
pub const RXQ: usize = 0;
pub const TXQ: usize = 1;
pub const EVQ: usize = 2;
/// `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET`.
pub const EVENT_TRANSPORT_RESET: u32 = 0;

#[cfg(test)]
mod tests;
