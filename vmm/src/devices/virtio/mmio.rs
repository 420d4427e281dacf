//! The virtio-mmio transport, version 2 (virtio 1.x §4.2.2).
//!
//! One 4 KiB window per device in the 32-bit MMIO gap. Registers below
//! 0x100 are 32-bit and accessed as such (other widths are ignored, reads
//! as zero); the device config space starts at 0x100 and takes any width.
//!
//! The driver's sequence, which the status register enforces: reset (0) →
//! ACKNOWLEDGE → DRIVER → read DeviceFeatures, write DriverFeatures →
//! FEATURES_OK (refused — the bit stays clear — when the driver took a
//! feature not offered or did not take VIRTIO_F_VERSION_1) → queue set-up
//! (QueueSel, QueueNum, addresses, QueueReady; only between FEATURES_OK and
//! DRIVER_OK) → DRIVER_OK, which activates the device. An activation that
//! fails (a queue outside guest memory, say) sets DEVICE_NEEDS_RESET and
//! raises a config interrupt; the driver then resets. FAILED is sticky until
//! reset. A status write that is not the next step is ignored.
//!
//! [`MmioSlotAllocator`] hands out the window and IRQ for each device, and
//! [`MmioSlot::cmdline_fragment`] is what tells a Linux guest (which has no
//! firmware tables to find them) where they are, as Firecracker does.

use std::sync::{Arc, Mutex};

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTIO_F_VERSION_1,
};
use virtio_queue::{Queue, QueueT};

use super::{IrqType, VirtioDevice};
use crate::arch::x86_64::layout;
use crate::devices::BusDevice;
use crate::vstate::memory::GuestMemoryMmap;

/// "virt", little-endian.
pub const MMIO_MAGIC_VALUE: u32 = 0x7472_6976;
/// The modern (virtio 1.x) register layout.
pub const MMIO_VERSION: u32 = 2;
/// Our vendor id ("SMSH").
pub const VENDOR_ID: u32 = 0x4853_4d53;

/// Register offsets.
pub mod regs {
    pub const MAGIC_VALUE: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const VENDOR_ID: u64 = 0x00c;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_AVAIL_LOW: u64 = 0x090;
    pub const QUEUE_AVAIL_HIGH: u64 = 0x094;
    pub const QUEUE_USED_LOW: u64 = 0x0a0;
    pub const QUEUE_USED_HIGH: u64 = 0x0a4;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    pub const CONFIG: u64 = 0x100;
}

/// Size of one device's register window.
pub const MMIO_SLOT_LEN: u64 = 0x1000;
/// First IRQ for virtio devices (0..=4 are the PC's: timer, keyboard,
/// cascade, COM2, COM1).
pub const FIRST_VIRTIO_IRQ: u32 = 5;
/// Last IO-APIC pin.
pub const LAST_VIRTIO_IRQ: u32 = layout::IOAPIC_PINS as u32 - 1;
/// Windows stay below the IO-APIC (and the KVM-private pages above it).
pub const MMIO_SLOTS_END: u64 = layout::IOAPIC_ADDR as u64;

/// Out of windows or IRQs.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SlotError {
    #[error(
        "no IRQ left for another virtio device ({FIRST_VIRTIO_IRQ}..={LAST_VIRTIO_IRQ} in use)"
    )]
    OutOfIrqs,
    #[error("no room left in the MMIO gap for another virtio device")]
    OutOfSpace,
}

/// A device's register window and interrupt line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmioSlot {
    pub base: u64,
    pub len: u64,
    /// IO-APIC pin (GSI) of the device's irqfd.
    pub irq: u32,
}

impl MmioSlot {
    /// `virtio_mmio.device=4K@0xd0000000:5`: how Linux learns of the device
    /// (`drivers/virtio/virtio_mmio.c`, `vm_cmdline_set`).
    pub fn cmdline_fragment(&self) -> String {
        format!(
            "virtio_mmio.device={}K@{:#x}:{}",
            self.len / 1024,
            self.base,
            self.irq
        )
    }
}

/// Allocates windows upward from the start of the MMIO gap, and IRQs
/// upward from [`FIRST_VIRTIO_IRQ`].
#[derive(Debug, Clone)]
pub struct MmioSlotAllocator {
    next_base: u64,
    next_irq: u32,
}

impl Default for MmioSlotAllocator {
    fn default() -> Self {
        Self {
            next_base: layout::MMIO_MEM_START,
            next_irq: FIRST_VIRTIO_IRQ,
        }
    }
}

impl MmioSlotAllocator {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn allocate(&mut self) -> Result<MmioSlot, SlotError> {
        if self.next_irq > LAST_VIRTIO_IRQ {
            return Err(SlotError::OutOfIrqs);
        }
        let end = self.next_base + MMIO_SLOT_LEN;
        if end > MMIO_SLOTS_END {
            return Err(SlotError::OutOfSpace);
        }
        let slot = MmioSlot {
            base: self.next_base,
            len: MMIO_SLOT_LEN,
            irq: self.next_irq,
        };
        self.next_base = end;
        self.next_irq += 1;
        Ok(slot)
    }
}

const S_ACK: u32 = VIRTIO_CONFIG_S_ACKNOWLEDGE;
const S_DRIVER: u32 = VIRTIO_CONFIG_S_DRIVER;
const S_FEATURES_OK: u32 = VIRTIO_CONFIG_S_FEATURES_OK;
const S_DRIVER_OK: u32 = VIRTIO_CONFIG_S_DRIVER_OK;
const S_FAILED: u32 = VIRTIO_CONFIG_S_FAILED;
const S_NEEDS_RESET: u32 = VIRTIO_CONFIG_S_NEEDS_RESET;

/// A shared device handle (the transport and, later, the event loop).
pub type SharedVirtioDevice = Arc<Mutex<dyn VirtioDevice>>;

/// The transport state of one device: what the driver selected, the
/// features it wrote, and the status register.
pub struct MmioTransport {
    device: SharedVirtioDevice,
    mem: GuestMemoryMmap,
    device_features_sel: u32,
    driver_features_sel: u32,
    /// What the driver wrote to DriverFeatures, checked at FEATURES_OK.
    driver_features: u64,
    queue_sel: u32,
    status: u32,
    config_generation: u32,
}

impl std::fmt::Debug for MmioTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmioTransport")
            .field("status", &self.status)
            .field("queue_sel", &self.queue_sel)
            .field("driver_features", &self.driver_features)
            .finish_non_exhaustive()
    }
}

impl MmioTransport {
    pub fn new(mem: GuestMemoryMmap, device: SharedVirtioDevice) -> Self {
        Self {
            device,
            mem,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            status: 0,
            config_generation: 0,
        }
    }

    pub fn device(&self) -> &SharedVirtioDevice {
        &self.device
    }

    /// The status register.
    pub fn status(&self) -> u32 {
        self.status
    }

    fn locked(&self) -> std::sync::MutexGuard<'_, dyn VirtioDevice + 'static> {
        // A device that panicked keeps serving with its own state (as the
        // bus does); the guest cannot make the VMM abort through it.
        self.device.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queue configuration is allowed between FEATURES_OK and DRIVER_OK.
    fn queue_config_allowed(&self) -> bool {
        self.status & (S_FEATURES_OK | S_DRIVER_OK | S_FAILED | S_NEEDS_RESET) == S_FEATURES_OK
    }

    fn with_selected_queue<T>(&self, f: impl FnOnce(&mut Queue) -> T) -> Option<T> {
        let mut dev = self.locked();
        dev.queues_mut().get_mut(self.queue_sel as usize).map(f)
    }

    fn reset(&mut self) {
        self.locked().reset();
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
        self.status = 0;
    }

    fn set_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        let old = self.status;
        if old & S_NEEDS_RESET != 0 {
            // Only a reset gets the device out of NEEDS_RESET; but the
            // driver may still say it gave up.
            self.status |= value & S_FAILED;
            return;
        }
        if value & S_FAILED != 0 {
            self.status |= S_FAILED;
            return;
        }
        if old & S_FAILED != 0 || value & old != old {
            // Bits are never cleared except by reset.
            return;
        }
        let added = value & !old;
        match (old, added) {
            (0, S_ACK) => self.status = value,
            (s, S_DRIVER) if s == S_ACK => self.status = value,
            (s, S_FEATURES_OK) if s == S_ACK | S_DRIVER => {
                let avail = self.locked().avail_features();
                let version_1 = 1u64 << VIRTIO_F_VERSION_1;
                if self.driver_features & !avail == 0 && self.driver_features & version_1 != 0 {
                    self.locked().set_acked_features(self.driver_features);
                    self.status = value;
                }
                // else: FEATURES_OK stays clear, which the driver reads
                // back as the device refusing the feature set.
            }
            (s, S_DRIVER_OK) if s == S_ACK | S_DRIVER | S_FEATURES_OK => {
                let mem = self.mem.clone();
                let mut dev = self.locked();
                match dev.activate(mem) {
                    Ok(()) => {
                        drop(dev);
                        self.status = value;
                    }
                    Err(_) => {
                        // The driver learns of it from the status and the
                        // config interrupt (virtio 1.x §2.1.2).
                        let _ = dev.interrupt().trigger(IrqType::Config);
                        drop(dev);
                        self.status = old | S_NEEDS_RESET;
                    }
                }
            }
            _ => {}
        }
    }

    fn read_register(&self, offset: u64) -> u32 {
        match offset {
            regs::MAGIC_VALUE => MMIO_MAGIC_VALUE,
            regs::VERSION => MMIO_VERSION,
            regs::DEVICE_ID => self.locked().device_type(),
            regs::VENDOR_ID => VENDOR_ID,
            regs::DEVICE_FEATURES => {
                let f = self.locked().avail_features();
                match self.device_features_sel {
                    0 => f as u32,
                    1 => (f >> 32) as u32,
                    _ => 0,
                }
            }
            regs::QUEUE_NUM_MAX => self.with_selected_queue(|q| q.max_size()).unwrap_or(0) as u32,
            regs::QUEUE_NUM => self.with_selected_queue(|q| q.size()).unwrap_or(0) as u32,
            regs::QUEUE_READY => self.with_selected_queue(|q| q.ready()).unwrap_or(false) as u32,
            regs::QUEUE_DESC_LOW => {
                self.with_selected_queue(|q| q.desc_table()).unwrap_or(0) as u32
            }
            regs::QUEUE_DESC_HIGH => {
                (self.with_selected_queue(|q| q.desc_table()).unwrap_or(0) >> 32) as u32
            }
            regs::QUEUE_AVAIL_LOW => {
                self.with_selected_queue(|q| q.avail_ring()).unwrap_or(0) as u32
            }
            regs::QUEUE_AVAIL_HIGH => {
                (self.with_selected_queue(|q| q.avail_ring()).unwrap_or(0) >> 32) as u32
            }
            regs::QUEUE_USED_LOW => self.with_selected_queue(|q| q.used_ring()).unwrap_or(0) as u32,
            regs::QUEUE_USED_HIGH => {
                (self.with_selected_queue(|q| q.used_ring()).unwrap_or(0) >> 32) as u32
            }
            regs::INTERRUPT_STATUS => self.locked().interrupt().status(),
            regs::STATUS => self.status,
            regs::CONFIG_GENERATION => self.config_generation,
            _ => 0,
        }
    }

    fn write_register(&mut self, offset: u64, v: u32) {
        match offset {
            regs::DEVICE_FEATURES_SEL => self.device_features_sel = v,
            regs::DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            regs::DRIVER_FEATURES => {
                // Only while negotiating.
                if self.status & (S_ACK | S_DRIVER | S_FEATURES_OK | S_FAILED) != S_ACK | S_DRIVER {
                    return;
                }
                let shift = match self.driver_features_sel {
                    0 => 0,
                    1 => 32,
                    _ => return,
                };
                self.driver_features =
                    (self.driver_features & !(0xffff_ffffu64 << shift)) | (u64::from(v) << shift);
            }
            regs::QUEUE_SEL => self.queue_sel = v,
            regs::QUEUE_NUM if self.queue_config_allowed() => {
                if let Ok(size) = u16::try_from(v) {
                    // `set_size` refuses (keeps the old size) anything
                    // above the maximum or not a power of two.
                    self.with_selected_queue(|q| q.set_size(size));
                }
            }
            regs::QUEUE_READY if self.queue_config_allowed() => {
                self.with_selected_queue(|q| q.set_ready(v == 1));
            }
            regs::QUEUE_DESC_LOW if self.queue_config_allowed() => {
                self.with_selected_queue(|q| q.set_desc_table_address(Some(v), None));
            }
            regs::QUEUE_DESC_HIGH if self.queue_config_allowed() => {
                self.with_selected_queue(|q| q.set_desc_table_address(None, Some(v)));
            }
            regs::QUEUE_AVAIL_LOW if self.queue_config_allowed() => {
                self.with_selected_queue(|q| q.set_avail_ring_address(Some(v), None));
            }
            regs::QUEUE_AVAIL_HIGH if self.queue_config_allowed() => {
                self.with_selected_queue(|q| q.set_avail_ring_address(None, Some(v)));
            }
            regs::QUEUE_USED_LOW if self.queue_config_allowed() => {
                self.with_selected_queue(|q| q.set_used_ring_address(Some(v), None));
            }
            regs::QUEUE_USED_HIGH if self.queue_config_allowed() => {
                self.with_selected_queue(|q| q.set_used_ring_address(None, Some(v)));
            }
            regs::QUEUE_NOTIFY => {
                // Under KVM a valid notify never gets here: the queue's
                // ioeventfd takes the write in the kernel. A write that
                // does (a harness without KVM) signals the same EventFd,
                // so queues are only ever served by the event loop. An
                // index without a queue is the guest's mistake: ignored.
                let dev = self.locked();
                if let Some(evt) = usize::try_from(v)
                    .ok()
                    .and_then(|i| dev.queue_events().get(i))
                {
                    let _ = evt.write(1);
                }
            }
            regs::INTERRUPT_ACK => self.locked().interrupt().ack(v),
            regs::STATUS => self.set_status(v),
            _ => {}
        }
    }
}

/// The transport's snapshot state (the device's own is saved by the
/// device's `persist.rs`); the type is part of the state file format.
pub use schema::snapshot::MmioTransportState;

impl MmioTransport {
    pub fn save(&self) -> MmioTransportState {
        MmioTransportState {
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            driver_features: self.driver_features,
            queue_sel: self.queue_sel,
            status: self.status,
            config_generation: self.config_generation,
        }
    }

    /// A transport in `state` over an already restored device. Selectors
    /// are guest-chosen values anyway (any is harmless); the status is
    /// taken as saved.
    pub fn restore(
        mem: GuestMemoryMmap,
        device: SharedVirtioDevice,
        state: &MmioTransportState,
    ) -> Self {
        Self {
            device,
            mem,
            device_features_sel: state.device_features_sel,
            driver_features_sel: state.driver_features_sel,
            driver_features: state.driver_features,
            queue_sel: state.queue_sel,
            status: state.status,
            config_generation: state.config_generation,
        }
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= regs::CONFIG {
            self.locked().read_config(offset - regs::CONFIG, data);
            return;
        }
        if data.len() != 4 || !offset.is_multiple_of(4) {
            data.fill(0);
            return;
        }
        data.copy_from_slice(&self.read_register(offset).to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= regs::CONFIG {
            // Config writes are only meaningful once the driver is there.
            if self.status & S_DRIVER != 0 {
                self.locked().write_config(offset - regs::CONFIG, data);
            }
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            return;
        };
        if !offset.is_multiple_of(4) {
            return;
        }
        self.write_register(offset, u32::from_le_bytes(bytes));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::test_utils::{DummyDevice, MmioDriver, test_memory};

    #[test]
    fn slots_are_page_windows_in_the_gap_with_distinct_irqs() {
        let mut a = MmioSlotAllocator::new();
        let s0 = a.allocate().expect("slot 0");
        let s1 = a.allocate().expect("slot 1");
        assert_eq!(s0.base, layout::MMIO_MEM_START);
        assert_eq!(s1.base, layout::MMIO_MEM_START + MMIO_SLOT_LEN);
        assert_eq!((s0.irq, s1.irq), (5, 6));
        assert_eq!(s0.cmdline_fragment(), "virtio_mmio.device=4K@0xd0000000:5");
        let mut n = 2;
        while a.allocate().is_ok() {
            n += 1;
        }
        assert_eq!(n, (LAST_VIRTIO_IRQ - FIRST_VIRTIO_IRQ + 1) as usize);
        assert_eq!(a.allocate(), Err(SlotError::OutOfIrqs));
    }

    #[test]
    fn identification_registers() {
        let mem = test_memory();
        let (mut t, _) = DummyDevice::transport(&mem, 2);
        let mut d = MmioDriver::new(&mut t);
        assert_eq!(d.read(regs::MAGIC_VALUE), MMIO_MAGIC_VALUE);
        assert_eq!(d.read(regs::VERSION), 2);
        assert_eq!(d.read(regs::DEVICE_ID), DummyDevice::ID);
        assert_eq!(d.read(regs::VENDOR_ID), VENDOR_ID);
        d.write(regs::DEVICE_FEATURES_SEL, 1);
        assert_eq!(d.read(regs::DEVICE_FEATURES), 1, "VERSION_1 is bit 32");
        d.write(regs::DEVICE_FEATURES_SEL, 7);
        assert_eq!(d.read(regs::DEVICE_FEATURES), 0);
        // Odd widths and offsets neither panic nor answer.
        let mut b = [0xaau8; 2];
        t.read(regs::MAGIC_VALUE, &mut b);
        assert_eq!(b, [0, 0]);
        let mut b = [0xaau8; 4];
        t.read(1, &mut b);
        assert_eq!(b, [0; 4]);
        t.write(regs::STATUS, &[1, 0]);
        t.write(regs::STATUS + 1, &[1, 0, 0, 0]);
        assert_eq!(t.status(), 0);
    }

    #[test]
    fn status_follows_the_driver_sequence_only() {
        let mem = test_memory();
        let (mut t, dev) = DummyDevice::transport(&mem, 1);
        let mut d = MmioDriver::new(&mut t);
        // Skipping ACKNOWLEDGE is ignored.
        d.write(regs::STATUS, S_ACK | S_DRIVER);
        assert_eq!(d.read(regs::STATUS), 0);
        d.write(regs::STATUS, S_ACK);
        d.write(regs::STATUS, S_ACK | S_DRIVER);
        // Features without VERSION_1: FEATURES_OK refused.
        d.write(regs::DRIVER_FEATURES_SEL, 1);
        d.write(regs::DRIVER_FEATURES, 0);
        d.write(regs::STATUS, S_ACK | S_DRIVER | S_FEATURES_OK);
        assert_eq!(d.read(regs::STATUS), S_ACK | S_DRIVER);
        // A feature not offered: refused.
        d.write(regs::DRIVER_FEATURES, 1 | 2);
        d.write(regs::STATUS, S_ACK | S_DRIVER | S_FEATURES_OK);
        assert_eq!(d.read(regs::STATUS), S_ACK | S_DRIVER);
        d.write(regs::DRIVER_FEATURES, 1);
        d.write(regs::STATUS, S_ACK | S_DRIVER | S_FEATURES_OK);
        assert_eq!(d.read(regs::STATUS), S_ACK | S_DRIVER | S_FEATURES_OK);
        assert_eq!(dev.lock().expect("dev").acked, 1 << 32);
        // Clearing bits is ignored; DRIVER_OK with a queue that is not
        // ready fails activation → NEEDS_RESET and a config interrupt.
        d.write(regs::STATUS, S_ACK);
        assert_eq!(d.read(regs::STATUS), S_ACK | S_DRIVER | S_FEATURES_OK);
        d.write(regs::STATUS, S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
        assert_eq!(
            d.read(regs::STATUS),
            S_ACK | S_DRIVER | S_FEATURES_OK | S_NEEDS_RESET
        );
        assert_eq!(d.read(regs::INTERRUPT_STATUS), VIRTIO_MMIO_INT_CONFIG_BIT);
        d.write(regs::INTERRUPT_ACK, VIRTIO_MMIO_INT_CONFIG_BIT);
        assert_eq!(d.read(regs::INTERRUPT_STATUS), 0);
        // Reset, then a full bring-up.
        d.write(regs::STATUS, 0);
        assert_eq!(d.read(regs::STATUS), 0);
        d.bring_up(1 << 32, &[(0x1000, 0x2000, 0x3000, 16)])
            .expect("bring-up");
        assert!(dev.lock().expect("dev").activated);
        // FAILED is sticky until reset.
        d.write(regs::STATUS, S_FAILED);
        assert_ne!(d.read(regs::STATUS) & S_FAILED, 0);
        d.write(regs::STATUS, 0);
        assert_eq!(d.read(regs::STATUS), 0);
        assert!(!dev.lock().expect("dev").activated);
    }

    const VIRTIO_MMIO_INT_CONFIG_BIT: u32 = super::super::VIRTIO_MMIO_INT_CONFIG;

    #[test]
    fn queue_registers_only_between_features_ok_and_driver_ok() {
        let mem = test_memory();
        let (mut t, dev) = DummyDevice::transport(&mem, 2);
        let mut d = MmioDriver::new(&mut t);
        // Before FEATURES_OK: ignored.
        d.write(regs::QUEUE_NUM, 8);
        assert_eq!(d.read(regs::QUEUE_NUM), 16);
        d.bring_up(
            1 << 32,
            &[(0x1000, 0x2000, 0x3000, 8), (0x4000, 0x5000, 0x6000, 4)],
        )
        .expect("bring-up");
        d.write(regs::QUEUE_SEL, 1);
        assert_eq!(d.read(regs::QUEUE_NUM_MAX), 16);
        assert_eq!(d.read(regs::QUEUE_NUM), 4);
        assert_eq!(d.read(regs::QUEUE_DESC_LOW), 0x4000);
        assert_eq!(d.read(regs::QUEUE_READY), 1);
        // After DRIVER_OK: ignored.
        d.write(regs::QUEUE_DESC_LOW, 0x8000);
        assert_eq!(d.read(regs::QUEUE_DESC_LOW), 0x4000);
        // A queue that does not exist reads as absent.
        d.write(regs::QUEUE_SEL, 2);
        assert_eq!(d.read(regs::QUEUE_NUM_MAX), 0);
        d.write(regs::QUEUE_NOTIFY, 1);
        d.write(regs::QUEUE_NOTIFY, 99);
        let mut dev = dev.lock().expect("dev");
        // Signalled, not served: that is the event loop's job.
        assert!(dev.notified.is_empty());
        assert_eq!(crate::event_loop::dispatch_queue_events(&mut *dev), 1);
        assert_eq!(dev.notified, vec![1]);
    }
}
