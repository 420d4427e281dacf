//! Test helpers: guest memory, a driver that programs the MMIO registers
//! as Linux's `virtio_mmio.c` does, and split virtqueues laid out by hand
//! in guest memory (descriptor table, available ring, used ring), as a
//! guest driver would.

use std::sync::{Arc, Mutex};

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FEATURES_OK,
};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

use super::mmio::{MmioTransport, regs};
use super::{ActivateError, IrqTrigger, VirtioDevice};
use crate::devices::BusDevice;
use crate::vstate::memory::GuestMemoryMmap;

/// Descriptor flags.
pub const F_NEXT: u16 = 1;
pub const F_WRITE: u16 = 2;

/// 1 MiB of guest memory at 0.
pub fn test_memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).expect("test memory")
}

/// A device that records what the transport does to it.
pub struct DummyDevice {
    pub queues: Vec<Queue>,
    pub acked: u64,
    pub activated: bool,
    pub notified: Vec<u32>,
    pub irq: IrqTrigger,
    pub queue_evts: Vec<vmm_sys_util::eventfd::EventFd>,
    pub config: [u8; 8],
}

impl DummyDevice {
    pub const ID: u32 = 42;

    pub fn new(queues: usize) -> Self {
        Self {
            queues: (0..queues)
                .map(|_| Queue::new(16).expect("queue"))
                .collect(),
            acked: 0,
            activated: false,
            notified: Vec::new(),
            irq: IrqTrigger::new().expect("irq"),
            queue_evts: super::new_queue_events(queues).expect("queue events"),
            config: *b"abcdefgh",
        }
    }

    pub fn transport(
        mem: &GuestMemoryMmap,
        queues: usize,
    ) -> (MmioTransport, Arc<Mutex<DummyDevice>>) {
        let dev = Arc::new(Mutex::new(Self::new(queues)));
        (MmioTransport::new(mem.clone(), dev.clone()), dev)
    }
}

impl VirtioDevice for DummyDevice {
    fn device_type(&self) -> u32 {
        Self::ID
    }
    fn avail_features(&self) -> u64 {
        (1 << 32) | 1
    }
    fn acked_features(&self) -> u64 {
        self.acked
    }
    fn set_acked_features(&mut self, features: u64) {
        self.acked = features;
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
        super::read_config_bytes(&self.config, offset, data);
    }
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    fn activate(&mut self, mem: GuestMemoryMmap) -> Result<(), ActivateError> {
        for (i, q) in self.queues.iter().enumerate() {
            if !q.is_valid(&mem) {
                return Err(ActivateError::InvalidQueue(i));
            }
        }
        self.activated = true;
        Ok(())
    }
    fn is_activated(&self) -> bool {
        self.activated
    }
    fn reset(&mut self) {
        self.queues.iter_mut().for_each(|q| q.reset());
        self.acked = 0;
        self.activated = false;
        self.irq.reset();
    }
    fn queue_events(&self) -> &[vmm_sys_util::eventfd::EventFd] {
        &self.queue_evts
    }
    fn queue_notify(&mut self, index: u32) {
        self.notified.push(index);
    }
}

/// Drives a transport's registers with 32-bit accesses.
pub struct MmioDriver<'a> {
    t: &'a mut MmioTransport,
}

impl<'a> MmioDriver<'a> {
    pub fn new(t: &'a mut MmioTransport) -> Self {
        Self { t }
    }

    pub fn read(&mut self, offset: u64) -> u32 {
        let mut b = [0u8; 4];
        self.t.read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    pub fn write(&mut self, offset: u64, v: u32) {
        self.t.write(offset, &v.to_le_bytes());
    }

    /// Linux's probe: reset, ACKNOWLEDGE, DRIVER, features, FEATURES_OK
    /// (checked), queues `(desc, avail, used, size)`, DRIVER_OK (checked).
    /// Returns the status register on failure.
    pub fn bring_up(&mut self, features: u64, queues: &[(u64, u64, u64, u16)]) -> Result<(), u32> {
        self.write(regs::STATUS, 0);
        self.write(regs::STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE);
        let mut s = VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER;
        self.write(regs::STATUS, s);
        let mut offered = 0u64;
        for sel in 0..2 {
            self.write(regs::DEVICE_FEATURES_SEL, sel);
            offered |= u64::from(self.read(regs::DEVICE_FEATURES)) << (32 * sel);
        }
        let features = features & offered;
        self.write(regs::DRIVER_FEATURES_SEL, 0);
        self.write(regs::DRIVER_FEATURES, features as u32);
        self.write(regs::DRIVER_FEATURES_SEL, 1);
        self.write(regs::DRIVER_FEATURES, (features >> 32) as u32);
        s |= VIRTIO_CONFIG_S_FEATURES_OK;
        self.write(regs::STATUS, s);
        let got = self.read(regs::STATUS);
        if got != s {
            return Err(got);
        }
        for (i, &(desc, avail, used, size)) in queues.iter().enumerate() {
            self.write(regs::QUEUE_SEL, i as u32);
            if self.read(regs::QUEUE_READY) != 0 || self.read(regs::QUEUE_NUM_MAX) == 0 {
                return Err(self.read(regs::STATUS));
            }
            self.write(regs::QUEUE_NUM, u32::from(size));
            self.write(regs::QUEUE_DESC_LOW, desc as u32);
            self.write(regs::QUEUE_DESC_HIGH, (desc >> 32) as u32);
            self.write(regs::QUEUE_AVAIL_LOW, avail as u32);
            self.write(regs::QUEUE_AVAIL_HIGH, (avail >> 32) as u32);
            self.write(regs::QUEUE_USED_LOW, used as u32);
            self.write(regs::QUEUE_USED_HIGH, (used >> 32) as u32);
            self.write(regs::QUEUE_READY, 1);
        }
        s |= VIRTIO_CONFIG_S_DRIVER_OK;
        self.write(regs::STATUS, s);
        let got = self.read(regs::STATUS);
        if got != s {
            return Err(got);
        }
        Ok(())
    }
}

/// A split virtqueue in guest memory, from the driver's side.
pub struct GuestQueue<'a> {
    pub mem: &'a GuestMemoryMmap,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    pub size: u16,
    avail_idx: u16,
}

impl<'a> GuestQueue<'a> {
    /// Zero the table and rings.
    pub fn new(mem: &'a GuestMemoryMmap, desc: u64, avail: u64, used: u64, size: u16) -> Self {
        let n = usize::from(size);
        for (addr, len) in [(desc, 16 * n), (avail, 6 + 2 * n), (used, 6 + 8 * n)] {
            mem.write_slice(&vec![0u8; len], GuestAddress(addr))
                .expect("zero queue");
        }
        Self {
            mem,
            desc,
            avail,
            used,
            size,
            avail_idx: 0,
        }
    }

    /// `(desc, avail, used, size)` for [`MmioDriver::bring_up`].
    pub fn layout(&self) -> (u64, u64, u64, u16) {
        (self.desc, self.avail, self.used, self.size)
    }

    /// Write descriptor `i` (the index is not checked: tests write bad ones).
    pub fn set_desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let mut raw = [0u8; 16];
        raw[0..8].copy_from_slice(&addr.to_le_bytes());
        raw[8..12].copy_from_slice(&len.to_le_bytes());
        raw[12..14].copy_from_slice(&flags.to_le_bytes());
        raw[14..16].copy_from_slice(&next.to_le_bytes());
        self.mem
            .write_slice(&raw, GuestAddress(self.desc + 16 * u64::from(i)))
            .expect("descriptor");
    }

    /// Write a chain `(addr, len, write_only)` into descriptors
    /// `first..first + n`, linked in order; returns the head index.
    pub fn set_chain(&self, first: u16, chain: &[(u64, u32, bool)]) -> u16 {
        for (k, &(addr, len, write)) in chain.iter().enumerate() {
            let i = first + k as u16;
            let mut flags = if write { F_WRITE } else { 0 };
            if k + 1 < chain.len() {
                flags |= F_NEXT;
            }
            self.set_desc(i, addr, len, flags, i + 1);
        }
        first
    }

    /// Put `head` in the available ring and publish it.
    pub fn publish(&mut self, head: u16) {
        let slot = u64::from(self.avail_idx % self.size);
        self.mem
            .write_obj(head, GuestAddress(self.avail + 4 + 2 * slot))
            .expect("avail ring");
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.set_avail_idx(self.avail_idx);
    }

    /// The available index as the driver last published it.
    pub fn avail_idx(&self) -> u16 {
        self.avail_idx
    }

    /// Write the available index directly (tests of bad indices).
    pub fn set_avail_idx(&self, idx: u16) {
        self.mem
            .write_obj(idx, GuestAddress(self.avail + 2))
            .expect("avail idx");
    }

    pub fn used_idx(&self) -> u16 {
        self.mem
            .read_obj(GuestAddress(self.used + 2))
            .expect("used idx")
    }

    /// Used element `i`: `(descriptor head, bytes written)`.
    pub fn used_elem(&self, i: u16) -> (u32, u32) {
        let at = self.used + 4 + 8 * u64::from(i % self.size);
        let id: u32 = self.mem.read_obj(GuestAddress(at)).expect("used id");
        let len: u32 = self.mem.read_obj(GuestAddress(at + 4)).expect("used len");
        (id, len)
    }
}
