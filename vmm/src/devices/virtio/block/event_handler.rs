//! Queue notifications for virtio-blk.
//!
//! Today the transport calls [`Block::handle_queue_notify`] synchronously
//! from the vCPU's MMIO exit on a QueueNotify write, so a request completes
//! before the vCPU re-enters the guest. When the VMM's event loop lands
//! (an event-manager thread, as Firecracker has), each queue gets an
//! `EventFd` registered with KVM as an ioeventfd on the QueueNotify
//! address, the write no longer exits to user space, and the loop calls
//! this same method when the queue's `EventFd` fires.

use super::device::{Block, ProcessOutcome};

impl Block {
    /// The driver notified queue `index`. An index the device does not
    /// have (the guest chooses it) is ignored.
    pub fn handle_queue_notify(&mut self, index: u32) -> ProcessOutcome {
        match usize::try_from(index) {
            Ok(i) if i < self.queues.len() => self.process_queue(i),
            _ => ProcessOutcome::default(),
        }
    }
}
