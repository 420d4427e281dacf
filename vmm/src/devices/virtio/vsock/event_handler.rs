//! What drives the vsock device.
//!
//! Two sources of work: the driver's QueueNotify (new TX packets, new RX
//! or event buffers) and the host sockets (new connections, data, hang-
//! ups). Until the VMM's event loop lands, the transport calls
//! [`Vsock::handle_queue_notify`] synchronously from the vCPU's MMIO exit,
//! and the VMM runs a host-side poller thread that calls
//! [`Vsock::handle_host_events`] every few milliseconds (see
//! `spawn_host_poller`). With the event loop, the queues' ioeventfds and
//! the muxer's sockets become epoll sources calling the same methods.

use std::sync::{Arc, Mutex};
use std::time::Duration;

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

    /// The host sockets may have work.
    pub fn handle_host_events(&mut self) -> ProcessOutcome {
        self.process()
    }
}

/// A thread polling `dev`'s host sockets every `interval` until `stop`
/// is set (a stopgap until the event loop owns the sockets).
pub fn spawn_host_poller(
    dev: Arc<Mutex<Vsock>>,
    interval: Duration,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("vsock-host".into())
        .spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Acquire) {
                dev.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .handle_host_events();
                std::thread::sleep(interval);
            }
        })
}
