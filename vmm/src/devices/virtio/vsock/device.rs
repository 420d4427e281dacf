//! The virtio-vsock device model.
//!
//! Queues: RX (0) carries packets to the guest, TX (1) packets from it,
//! the event queue (2) TRANSPORT_RESET events. The config space is the
//! guest's CID (u64). Only `VIRTIO_F_VERSION_1` is offered (stream
//! sockets; no SEQPACKET).
//!
//! [`Vsock::process`] is one full pass: TX chains are parsed
//! ([`packet::read_tx_packet`]) and handed to the muxer — a chain that is
//! not a valid packet (wrong direction, outside guest memory, short
//! header, `len` beyond the chain or 64 KiB) is returned unread and
//! counted; then the host sockets are polled; then pending packets fill
//! the RX buffers the guest posted, and a pending event fills the event
//! queue. Nothing a guest writes can panic the device or make it read or
//! write outside guest memory.

use std::os::fd::RawFd;
use std::path::Path;

use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_VSOCK;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::Bytes;
use vmm_sys_util::eventfd::EventFd;

use super::packet;
use super::unix::VsockMuxer;
use super::{EVENT_TRANSPORT_RESET, EVQ, HOST_CID, NUM_QUEUES, QUEUE_SIZE, RXQ, TXQ};
use crate::devices::virtio::{
    ActivateError, IrqTrigger, IrqType, VirtioDevice, activate_queues, new_queue_events,
    read_config_bytes,
};
use crate::vstate::memory::GuestMemoryMmap;

/// Counters (for metrics).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct VsockCounters {
    pub tx_packets: u64,
    pub rx_packets: u64,
    /// TX chains that were not valid packets, and RX chains too small or
    /// misdirected to carry one.
    pub malformed: u64,
    pub events: u64,
}

/// What one [`Vsock::process`] call did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ProcessOutcome {
    pub tx: u64,
    pub rx: u64,
    pub events: u64,
    /// An interrupt was raised.
    pub notified: bool,
}

/// Errors creating the device.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    #[error("guest CID {0} is reserved (a guest CID is at least 3 and below 2^32 - 1)")]
    Cid(u64),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

pub struct Vsock {
    pub(super) guest_cid: u64,
    pub(super) muxer: VsockMuxer,
    pub(super) avail_features: u64,
    pub(super) acked_features: u64,
    pub(super) queues: Vec<Queue>,
    /// Queue notifications (ioeventfds), one per queue.
    pub(super) queue_evts: Vec<EventFd>,
    pub(super) irq: IrqTrigger,
    pub(super) mem: Option<GuestMemoryMmap>,
    /// A TRANSPORT_RESET waits for an event buffer.
    pub(super) pending_reset_event: bool,
    pub counters: VsockCounters,
}

impl std::fmt::Debug for Vsock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vsock")
            .field("guest_cid", &self.guest_cid)
            .field("uds_path", &self.muxer.uds_path())
            .field("activated", &self.mem.is_some())
            .field("counters", &self.counters)
            .finish_non_exhaustive()
    }
}

impl Vsock {
    /// A device for the guest `guest_cid`, listening on `uds_path` (which
    /// must not exist; it is removed when the device is dropped).
    pub fn new(guest_cid: u64, uds_path: &Path) -> Result<Self, VsockError> {
        if guest_cid <= HOST_CID || guest_cid >= u64::from(u32::MAX) {
            return Err(VsockError::Cid(guest_cid));
        }
        let queues = (0..NUM_QUEUES)
            .map(|_| Queue::new(QUEUE_SIZE))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        Ok(Self {
            guest_cid,
            muxer: VsockMuxer::new(guest_cid, uds_path)?,
            avail_features: 1u64 << VIRTIO_F_VERSION_1,
            acked_features: 0,
            queues,
            queue_evts: new_queue_events(NUM_QUEUES)?,
            irq: IrqTrigger::new()?,
            mem: None,
            pending_reset_event: false,
            counters: VsockCounters::default(),
        })
    }

    pub fn guest_cid(&self) -> u64 {
        self.guest_cid
    }

    pub fn muxer(&self) -> &VsockMuxer {
        &self.muxer
    }

    /// One pass over TX, the host sockets, RX and the event queue; raises
    /// the interrupt if the driver wants one. Before activation only the
    /// host sockets are polled (connections wait for the driver).
    pub fn process(&mut self) -> ProcessOutcome {
        let mut out = ProcessOutcome::default();
        let Some(mem) = self.mem.clone() else {
            self.muxer.poll_host();
            self.muxer.update_interest();
            return out;
        };
        let mut notify = false;
        let (n, want) = self.process_tx(&mem);
        out.tx = n;
        notify |= want;
        self.muxer.poll_host();
        let (n, want) = self.process_rx(&mem);
        out.rx = n;
        notify |= want;
        let (n, want) = self.process_evq(&mem);
        out.events = n;
        notify |= want;
        self.muxer.update_interest();
        if notify {
            // A lost signal (eventfd saturated) still leaves the status bit.
            let _ = self.irq.trigger(IrqType::Vring);
            out.notified = true;
        }
        out
    }

    fn process_tx(&mut self, mem: &GuestMemoryMmap) -> (u64, bool) {
        let mut used = 0u64;
        let queue = &mut self.queues[TXQ];
        // One queue's worth per call: a guest whose used ring overlaps its
        // available ring must not keep the device busy forever.
        let mut budget = queue.size();
        while budget > 0 && !self.muxer.rx_backlogged() {
            budget -= 1;
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                break;
            };
            let head = chain.head_index();
            let descs: Vec<Descriptor> = chain.collect();
            match packet::read_tx_packet(mem, &descs) {
                Ok((hdr, data)) => {
                    self.counters.tx_packets += 1;
                    self.muxer.recv_from_guest(&hdr, &data);
                }
                Err(_) => self.counters.malformed += 1,
            }
            if queue.add_used(mem, head, 0).is_ok() {
                used += 1;
            } else {
                self.counters.malformed += 1;
            }
        }
        (
            used,
            used > 0 && queue.needs_notification(mem).unwrap_or(true),
        )
    }

    fn process_rx(&mut self, mem: &GuestMemoryMmap) -> (u64, bool) {
        let mut used = 0u64;
        let queue = &mut self.queues[RXQ];
        let mut budget = queue.size();
        while budget > 0 && self.muxer.has_rx() {
            budget -= 1;
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                break;
            };
            let head = chain.head_index();
            let descs: Vec<Descriptor> = chain.collect();
            let len = match packet::rx_capacity(mem, &descs) {
                Ok(cap) => match self.muxer.next_rx(cap) {
                    Some((hdr, data)) => {
                        match packet::write_rx_packet(mem, &descs, &hdr, &data) {
                            Ok(n) => {
                                self.counters.rx_packets += 1;
                                n
                            }
                            // Checked by rx_capacity; unreachable in practice.
                            Err(_) => {
                                self.counters.malformed += 1;
                                0
                            }
                        }
                    }
                    None => {
                        // Only data was pending and this buffer holds no
                        // payload: keep the buffer for later.
                        queue.go_to_previous_position();
                        break;
                    }
                },
                Err(_) => {
                    self.counters.malformed += 1;
                    0
                }
            };
            if queue.add_used(mem, head, len).is_ok() {
                used += 1;
            } else {
                self.counters.malformed += 1;
            }
        }
        (
            used,
            used > 0 && queue.needs_notification(mem).unwrap_or(true),
        )
    }

    fn process_evq(&mut self, mem: &GuestMemoryMmap) -> (u64, bool) {
        if !self.pending_reset_event {
            return (0, false);
        }
        let queue = &mut self.queues[EVQ];
        let Some(chain) = queue.pop_descriptor_chain(mem) else {
            return (0, false);
        };
        let head = chain.head_index();
        let descs: Vec<Descriptor> = chain.collect();
        let len = match descs.first() {
            Some(d)
                if d.is_write_only()
                    && d.len() >= 4
                    && mem.write_obj(EVENT_TRANSPORT_RESET, d.addr()).is_ok() =>
            {
                self.pending_reset_event = false;
                self.counters.events += 1;
                4
            }
            _ => {
                self.counters.malformed += 1;
                0
            }
        };
        if queue.add_used(mem, head, len).is_err() {
            self.counters.malformed += 1;
            return (0, false);
        }
        (1, queue.needs_notification(mem).unwrap_or(true))
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_VSOCK
    }
    fn avail_features(&self) -> u64 {
        self.avail_features
    }
    fn acked_features(&self) -> u64 {
        self.acked_features
    }
    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features & self.avail_features;
    }
    fn queues(&self) -> &[Queue] {
        &self.queues
    }
    fn queues_mut(&mut self) -> &mut [Queue] {
        &mut self.queues
    }
    fn interrupt(&self) -> &IrqTrigger {
        &self.irq
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.guest_cid.to_le_bytes(), offset, data);
    }
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // guest_cid is read-only.
    }
    fn activate(&mut self, mem: GuestMemoryMmap) -> Result<(), ActivateError> {
        if self.mem.is_some() {
            return Err(ActivateError::AlreadyActivated);
        }
        activate_queues(&mut self.queues, &mem)?;
        self.mem = Some(mem);
        Ok(())
    }
    fn is_activated(&self) -> bool {
        self.mem.is_some()
    }
    fn reset(&mut self) {
        self.queues.iter_mut().for_each(QueueT::reset);
        self.acked_features = 0;
        self.mem = None;
        self.irq.reset();
        self.muxer.reset();
        self.pending_reset_event = false;
    }
    fn queue_events(&self) -> &[EventFd] {
        &self.queue_evts
    }
    fn queue_notify(&mut self, index: u32) {
        self.handle_queue_notify(index);
    }
    fn host_event_fd(&self) -> Option<RawFd> {
        Some(self.muxer.epoll_fd())
    }
    fn handle_host_event(&mut self) {
        self.handle_host_events();
    }
}
