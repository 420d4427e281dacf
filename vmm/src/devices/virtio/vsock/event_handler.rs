//! What drives the vsock device.
//!
//! Two sources of work, both delivered by the VMM's event loop
//! ([`crate::event_loop`]): the driver's QueueNotify (new TX packets, new
//! RX or event buffers: a queue's ioeventfd fired) and the host sockets
//! (new connections, data, hang-ups: the muxer's epoll descriptor is
//! readable). Either way one full [`Vsock::process`] pass runs, which
//! also re-arms the muxer's epoll set for what each connection can do
//! next.

use super::NUM_QUEUES;
use super::device::{ProcessOutcome, Vsock};

impl Vsock {
    /// The driver notified queue `index`; an index the device does not
    /// have (the guest chooses it) is ignored.
    pub fn handle_queue_notify(&mut self, index: u32) -> ProcessOutcome {
        match usize::try_from(index) {
            Ok(i) if i < NUM_QUEUES => self.process(),
            _ => ProcessOutcome::default(),
        }
    }

    /// The host sockets have work (the muxer's epoll is readable).
    pub fn handle_host_events(&mut self) -> ProcessOutcome {
        self.process()
    }
}
