//! A bus maps address ranges to devices.
//!
//! The vCPU run loop turns every `KVM_EXIT_IO` into a read or write on the
//! port-IO bus and every `KVM_EXIT_MMIO` into one on the MMIO bus. Ranges
//! never overlap (checked at insertion), so an address has at most one
//! device. Devices sit behind `Arc<Mutex<..>>` because every vCPU thread
//! holds a clone of the bus, and the VMM's event thread (virtio queues,
//! the serial input) reaches the same devices.
//!
//! Accesses nobody claims are answered as unclaimed hardware does: reads
//! return all ones, writes are dropped. A guest probing absent devices
//! (Linux probes many legacy ports) must neither crash nor stop the VM.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A device on a bus. `offset` is relative to the base the device was
/// inserted at; `data` is the access (1, 2, 4 or 8 bytes).
pub trait BusDevice: Send {
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// Errors inserting a device.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    #[error("bus range at {base:#x} has zero length")]
    ZeroLength { base: u64 },
    #[error("bus range {base:#x}+{len:#x} overflows the address space")]
    Overflow { base: u64, len: u64 },
    #[error("bus range {base:#x}+{len:#x} overlaps a device at {other:#x}")]
    Overlap { base: u64, len: u64, other: u64 },
}

/// A shared device handle.
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

#[derive(Clone)]
struct Entry {
    len: u64,
    device: SharedDevice,
}

/// Address ranges → devices. Cloning a bus shares its devices.
#[derive(Clone, Default)]
pub struct Bus {
    /// Keyed by range base.
    devices: BTreeMap<u64, Entry>,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.devices.iter().map(|(b, e)| (b, e.len)))
            .finish()
    }
}

impl Bus {
    pub fn new() -> Self {
        Self::default()
    }

    /// Put `device` at `[base, base + len)`.
    pub fn insert(&mut self, device: SharedDevice, base: u64, len: u64) -> Result<(), BusError> {
        if len == 0 {
            return Err(BusError::ZeroLength { base });
        }
        let end = base
            .checked_add(len)
            .ok_or(BusError::Overflow { base, len })?;
        // The nearest range starting at or below `base` must end before it;
        // the nearest starting above must start at or after `end`.
        if let Some((&other, e)) = self.devices.range(..=base).next_back()
            && other + e.len > base
        {
            return Err(BusError::Overlap { base, len, other });
        }
        if let Some((&other, _)) = self.devices.range(base..).next()
            && other < end
        {
            return Err(BusError::Overlap { base, len, other });
        }
        self.devices.insert(base, Entry { len, device });
        Ok(())
    }

    /// The device whose range wholly contains `[addr, addr + size)`, and
    /// the offset of `addr` in it.
    fn resolve(&self, addr: u64, size: usize) -> Option<(&SharedDevice, u64)> {
        let (&base, entry) = self.devices.range(..=addr).next_back()?;
        let offset = addr - base;
        let end = offset.checked_add(size as u64)?;
        (end <= entry.len).then_some((&entry.device, offset))
    }

    /// Read from `addr`; returns whether a device claimed the access
    /// (if not, `data` is filled with 0xff).
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.resolve(addr, data.len()) {
            Some((device, offset)) => {
                // A device that panicked while locked poisons its mutex;
                // its state is still the device's own, so keep serving it.
                let mut d = device.lock().unwrap_or_else(|e| e.into_inner());
                d.read(offset, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    /// Write to `addr`; returns whether a device claimed the access.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.resolve(addr, data.len()) {
            Some((device, offset)) => {
                let mut d = device.lock().unwrap_or_else(|e| e.into_inner());
                d.write(offset, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records accesses; reads return the offset.
    #[derive(Default)]
    struct Recorder {
        writes: Vec<(u64, Vec<u8>)>,
    }
    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.writes.push((offset, data.to_vec()));
        }
    }

    fn dev() -> Arc<Mutex<Recorder>> {
        Arc::new(Mutex::new(Recorder::default()))
    }

    #[test]
    fn dispatches_by_range_with_offsets() {
        let mut bus = Bus::new();
        let a = dev();
        let b = dev();
        bus.insert(a.clone(), 0x3f8, 8).expect("insert a");
        bus.insert(b.clone(), 0x400, 0x10).expect("insert b");
        assert!(bus.write(0x3f8, &[1]));
        assert!(bus.write(0x3ff, &[2]));
        assert!(bus.write(0x40c, &[3, 4, 5, 6]));
        let mut d = [0u8; 1];
        assert!(bus.read(0x3fb, &mut d));
        assert_eq!(d, [3]);
        assert_eq!(
            a.lock().expect("a").writes,
            vec![(0, vec![1]), (7, vec![2])]
        );
        assert_eq!(b.lock().expect("b").writes, vec![(0xc, vec![3, 4, 5, 6])]);
    }

    #[test]
    fn unclaimed_accesses_read_all_ones() {
        let mut bus = Bus::new();
        bus.insert(dev(), 0x10, 4).expect("insert");
        let mut d = [0u8; 2];
        assert!(!bus.read(0x0f, &mut d));
        assert_eq!(d, [0xff, 0xff]);
        assert!(!bus.read(0x14, &mut d));
        // Straddling the end of a range is not claimed either.
        assert!(!bus.read(0x13, &mut d));
        assert!(!bus.write(0x13, &[0, 0]));
        assert!(!bus.write(u64::MAX, &[0]));
    }

    #[test]
    fn overlaps_are_rejected() {
        let mut bus = Bus::new();
        bus.insert(dev(), 0x100, 0x10).expect("insert");
        for (base, len) in [(0x100, 1), (0xf8, 0x9), (0x10f, 4), (0x0, 0x1000)] {
            assert!(
                matches!(
                    bus.insert(dev(), base, len),
                    Err(BusError::Overlap { other: 0x100, .. })
                ),
                "{base:#x}+{len:#x}"
            );
        }
        bus.insert(dev(), 0xf0, 0x10).expect("adjacent below");
        bus.insert(dev(), 0x110, 0x10).expect("adjacent above");
        assert_eq!(
            bus.insert(dev(), 0x200, 0),
            Err(BusError::ZeroLength { base: 0x200 })
        );
        assert!(matches!(
            bus.insert(dev(), u64::MAX, 2),
            Err(BusError::Overflow { .. })
        ));
    }
}
