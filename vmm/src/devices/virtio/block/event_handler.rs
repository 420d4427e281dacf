//! Queue notifications for virtio-blk.
//!
//! The driver's QueueNotify write is taken by KVM (the queue's ioeventfd)
//! and the VMM's event loop ([`crate::event_loop`]) calls
//! [`Block::handle_queue_notify`]: the request is served on the device
//! thread while the vCPU runs on, and the used-ring update raises the
//! irqfd.

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
