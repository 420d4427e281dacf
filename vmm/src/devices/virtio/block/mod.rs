//! virtio-blk: one request queue over a [`BlockBackend`], normally a
//! [`cow::CowDisk`] (the template's read-only root filesystem plus this
//! VM's sparse overlay).
//!
//! - `device.rs`: the device — features, config space (capacity), the
//!   request parser and executor (IN, OUT, FLUSH, GET_ID), and
//!   [`device::process_queue`], the entry point a fuzz target drives.
//! - `event_handler.rs`: what a queue notification does.
//! - `persist.rs`: the device's snapshot state.
//! - `cow.rs`: the copy-on-write disk.

use std::io;

pub mod cow;
pub mod device;
pub mod event_handler;
pub mod persist;

pub use cow::{CowDisk, CowPaths};
pub use device::Block;

/// Sector size of the virtio-blk protocol.
pub const SECTOR_SIZE: u64 = 512;
/// Descriptors in the request queue.
pub const QUEUE_SIZE: u16 = 256;
/// virtio-blk has one request queue here (no multi-queue).
pub const NUM_QUEUES: usize = 1;

/// The storage behind a block device. Offsets are bytes; the device only
/// asks for whole sectors inside [`BlockBackend::size`], but a backend
/// checks anyway.
pub trait BlockBackend: Send {
    /// Size in bytes (a multiple of [`SECTOR_SIZE`]).
    fn size(&self) -> u64;
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
    fn write_at(&mut self, offset: u64, buf: &[u8]) -> io::Result<()>;
    /// Make every completed write durable.
    fn flush(&mut self) -> io::Result<()>;
    /// Where a copy-on-write backend keeps its overlay (for snapshots).
    fn cow_paths(&self) -> Option<&CowPaths> {
        None
    }
}

/// A disk in memory: scratch disks, tests and fuzzing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemBackend(pub Vec<u8>);

impl MemBackend {
    fn range(&self, offset: u64, len: usize) -> io::Result<std::ops::Range<usize>> {
        let start = usize::try_from(offset).map_err(|_| io::ErrorKind::InvalidInput)?;
        let end = start.checked_add(len).ok_or(io::ErrorKind::InvalidInput)?;
        if end > self.0.len() {
            return Err(io::ErrorKind::InvalidInput.into());
        }
        Ok(start..end)
    }
}

impl BlockBackend for MemBackend {
    fn size(&self) -> u64 {
        self.0.len() as u64
    }
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let r = self.range(offset, buf.len())?;
        buf.copy_from_slice(&self.0[r]);
        Ok(())
    }
    fn write_at(&mut self, offset: u64, buf: &[u8]) -> io::Result<()> {
        let r = self.range(offset, buf.len())?;
        self.0[r].copy_from_slice(buf);
        Ok(())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
