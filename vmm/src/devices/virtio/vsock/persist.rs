//! The snapshot state of a virtio-vsock device.
//!
//! What is saved: the guest CID, the host socket path, the negotiated
//! features, the queues and whether the device was activated, the pending
//! interrupt bits. What is not: connections — their host ends are unix
//! streams of the old process. As in Firecracker, a restored device has
//! none, and queues a `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET` on the event
//! queue so the guest drops its side of every connection (Linux resets
//! every socket of the transport and re-reads the CID). The state is
//! validated on restore as if it came from the guest.

use super::NUM_QUEUES;
use super::device::{Vsock, VsockError};
use crate::devices::virtio::persist::{queue_snapshot, restore_queues};
use crate::devices::virtio::{IrqType, VIRTIO_MMIO_INT_CONFIG, VIRTIO_MMIO_INT_VRING};
use crate::vstate::memory::GuestMemoryMmap;

/// A virtio-vsock device's state (a `schema::snapshot` type: part of the
/// versioned state file).
pub use schema::snapshot::VsockState;

/// Errors restoring a device.
#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    #[error("the snapshot has {0} queues")]
    QueueCount(usize),
    #[error("queue {index} in the snapshot is invalid: {reason}")]
    Queue { index: usize, reason: String },
    #[error("the snapshot's features {0:#x} are not ones this device offers")]
    Features(u64),
    #[error(transparent)]
    Device(#[from] VsockError),
    #[error("cannot raise the interrupt: {0}")]
    Io(#[from] std::io::Error),
}

impl Vsock {
    /// The state to snapshot (with the vCPUs paused).
    pub fn save(&self) -> VsockState {
        VsockState {
            guest_cid: self.guest_cid,
            uds_path: schema::snapshot::path_bytes(self.muxer.uds_path()),
            avail_features: self.avail_features,
            acked_features: self.acked_features,
            activated: self.mem.is_some(),
            interrupt_status: self.irq.status(),
            queues: self
                .queues
                .iter()
                .map(|q| queue_snapshot(q.state()))
                .collect(),
        }
    }

    /// A device in `state` over the restored guest memory, listening on
    /// `uds_path` (normally `state.uds_path`; a restored VM may run
    /// elsewhere). No connection survives; an activated device sends the
    /// guest TRANSPORT_RESET as soon as it has an event buffer.
    pub fn restore(
        state: &VsockState,
        uds_path: &std::path::Path,
        mem: GuestMemoryMmap,
    ) -> Result<Self, PersistError> {
        if state.queues.len() != NUM_QUEUES {
            return Err(PersistError::QueueCount(state.queues.len()));
        }
        let mut dev = Vsock::new(state.guest_cid, uds_path)?;
        if state.avail_features != dev.avail_features
            || state.acked_features & !dev.avail_features != 0
        {
            return Err(PersistError::Features(state.acked_features));
        }
        dev.acked_features = state.acked_features;
        restore_queues(&mut dev.queues, &state.queues, &mem, state.activated)
            .map_err(|(index, reason)| PersistError::Queue { index, reason })?;
        if state.activated {
            dev.mem = Some(mem);
            dev.pending_reset_event = true;
            dev.process();
        }
        if state.interrupt_status & VIRTIO_MMIO_INT_VRING != 0 {
            dev.irq.trigger(IrqType::Vring)?;
        }
        if state.interrupt_status & VIRTIO_MMIO_INT_CONFIG != 0 {
            dev.irq.trigger(IrqType::Config)?;
        }
        Ok(dev)
    }
}
