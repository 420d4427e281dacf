//! virtio devices over the virtio-mmio transport (virtio 1.x, "modern").
//!
//! Laid out after Firecracker's `devices/virtio`:
//! - [`mmio`]: the transport — the register window a driver programs
//!   (feature negotiation, queue addresses, the status state machine,
//!   interrupt status/ack, the device's config space at 0x100), the MMIO
//!   slot allocator for the 32-bit gap, and the
//!   `virtio_mmio.device=<size>@<base>:<irq>` command-line fragments.
//! - [`block`]: virtio-blk over a copy-on-write disk (`block/cow.rs`).
//! - [`vsock`]: virtio-vsock spliced to host unix sockets (Firecracker's
//!   hybrid vsock).
//!
//! A device implements [`VirtioDevice`]: it owns its queues (built from
//! `virtio_queue::Queue`, so their state is the device's, for snapshots)
//! and its interrupt line, an [`IrqTrigger`] whose `EventFd` the VMM
//! registers with KVM as an irqfd. The transport programs the queues
//! through [`VirtioDevice::queues_mut`] and activates the device when the
//! driver sets DRIVER_OK.
//!
//! Work reaches a device on the VMM's event loop ([`crate::event_loop`]),
//! never on a vCPU: each queue has an `EventFd` that KVM signals when the
//! driver writes the queue's index to QueueNotify (an ioeventfd, so the
//! vCPU does not even exit), and a device with host-side sources (the
//! vsock's unix sockets) exposes one pollable descriptor for them.
//!
//! Everything the guest writes — registers, rings, descriptors, request
//! headers — is hostile input: it is checked, never `unwrap`ped, and a bad
//! value fails the request (or sets FAILED/NEEDS_RESET), never the VMM.

use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU32, Ordering};

use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

use crate::vstate::memory::GuestMemoryMmap;

pub mod block;
pub mod mmio;
pub mod persist;
#[cfg(test)]
pub mod test_utils;
pub mod vsock;

pub use mmio::{MmioSlot, MmioSlotAllocator, MmioTransport};

/// Interrupt status bit: a used ring was updated.
pub const VIRTIO_MMIO_INT_VRING: u32 = virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_VRING;
/// Interrupt status bit: the device configuration changed.
pub const VIRTIO_MMIO_INT_CONFIG: u32 = virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_CONFIG;

/// Why an interrupt is raised.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IrqType {
    /// A used ring was updated.
    Vring,
    /// The config space (or the NEEDS_RESET status) changed.
    Config,
}

/// A device's interrupt line: the InterruptStatus register the transport
/// exposes, and the `EventFd` that KVM turns into an IO-APIC interrupt.
#[derive(Debug)]
pub struct IrqTrigger {
    status: AtomicU32,
    evt: EventFd,
}

impl IrqTrigger {
    pub fn new() -> io::Result<Self> {
        Ok(Self {
            status: AtomicU32::new(0),
            evt: EventFd::new(libc::EFD_NONBLOCK)?,
        })
    }

    /// Set the status bit for `kind` and signal the line.
    pub fn trigger(&self, kind: IrqType) -> io::Result<()> {
        let bit = match kind {
            IrqType::Vring => VIRTIO_MMIO_INT_VRING,
            IrqType::Config => VIRTIO_MMIO_INT_CONFIG,
        };
        self.status.fetch_or(bit, Ordering::SeqCst);
        self.evt.write(1)
    }

    /// The InterruptStatus register.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// InterruptACK: clear `bits`.
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// Clear every status bit (device reset).
    pub fn reset(&self) {
        self.status.store(0, Ordering::SeqCst);
    }

    /// The line, to register as an irqfd.
    pub fn event_fd(&self) -> &EventFd {
        &self.evt
    }
}

/// Errors activating a device at DRIVER_OK.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("queue {0} is not ready or does not fit in guest memory")]
    InvalidQueue(usize),
    #[error("device is already activated")]
    AlreadyActivated,
    #[error("cannot activate the device: {0}")]
    Io(#[from] io::Error),
}

/// A virtio device behind a transport.
pub trait VirtioDevice: Send {
    /// The virtio device id (`virtio_ids::VIRTIO_ID_*`).
    fn device_type(&self) -> u32;
    /// Features the device offers.
    fn avail_features(&self) -> u64;
    /// Features the driver accepted (a subset of `avail_features`).
    fn acked_features(&self) -> u64;
    fn set_acked_features(&mut self, features: u64);
    fn queues(&self) -> &[Queue];
    fn queues_mut(&mut self) -> &mut [Queue];
    fn interrupt(&self) -> &IrqTrigger;
    /// Read the device-specific config space (offset from 0x100). Bytes
    /// past its end read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Write the config space; read-only fields ignore writes.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Start serving the queues in `mem` (at DRIVER_OK).
    fn activate(&mut self, mem: GuestMemoryMmap) -> Result<(), ActivateError>;
    fn is_activated(&self) -> bool;
    /// Back to the state before feature negotiation (status 0): queues
    /// reset, features un-acked, deactivated.
    fn reset(&mut self);
    /// One `EventFd` per queue, in queue order: the VMM registers each as
    /// an ioeventfd on the transport's QueueNotify register with the
    /// queue's index as datamatch, and the event loop waits on them.
    fn queue_events(&self) -> &[EventFd];
    /// The driver notified queue `index` (its ioeventfd fired). Called on
    /// the event loop, only once the device is activated.
    fn queue_notify(&mut self, index: u32);
    /// A descriptor that is readable when host-side sources have work for
    /// the device (the vsock muxer's epoll); `None` for a device that
    /// only reacts to the guest.
    fn host_event_fd(&self) -> Option<RawFd> {
        None
    }
    /// [`VirtioDevice::host_event_fd`] is readable. Must consume what made
    /// it readable (or stop watching it), else the event loop spins.
    fn handle_host_event(&mut self) {}
}

/// `count` queue notification `EventFd`s (non-blocking).
pub fn new_queue_events(count: usize) -> io::Result<Vec<EventFd>> {
    (0..count)
        .map(|_| EventFd::new(libc::EFD_NONBLOCK))
        .collect()
}

/// Copy `config[offset..]` into `data`; what lies past the end reads as 0.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(off) = usize::try_from(offset) else {
        return;
    };
    if off >= config.len() {
        return;
    }
    let n = data.len().min(config.len() - off);
    data[..n].copy_from_slice(&config[off..off + n]);
}

/// Check a device's queues against guest memory at activation, and fix the
/// ring features we do not offer (VIRTIO_RING_F_EVENT_IDX).
pub fn activate_queues(queues: &mut [Queue], mem: &GuestMemoryMmap) -> Result<(), ActivateError> {
    for (i, q) in queues.iter_mut().enumerate() {
        if !q.is_valid(mem) {
            return Err(ActivateError::InvalidQueue(i));
        }
        q.set_event_idx(false);
    }
    Ok(())
}
