//! The virtio-blk device model.
//!
//! A request is a descriptor chain: a 16-byte driver-readable header
//! (`type: u32, reserved: u32, sector: u64`), data descriptors
//! (device-writable for IN and GET_ID, device-readable for OUT), and a
//! device-writable status descriptor whose last byte receives
//! `VIRTIO_BLK_S_{OK,IOERR,UNSUPP}`. The used element's length is the
//! number of bytes the device wrote (data plus the status byte).
//!
//! Every field comes from the guest and is checked before any disk or
//! memory access: the header's size and direction, each data descriptor's
//! direction and that it lies in guest memory, the total length being whole
//! sectors, and `sector * 512 + len` (without overflow) inside the disk. A
//! request that fails any check gets IOERR (UNSUPP for an unknown type)
//! and touches nothing. A chain with no usable status descriptor cannot be
//! answered with a status: it is returned as used with length 0. A chain
//! whose head index is beyond the queue, or that loops, is cut short by
//! `virtio_queue` (a chain never yields more descriptors than the queue
//! size) and lands in one of the cases above.

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestMemoryBackend};
use vmm_sys_util::eventfd::EventFd;

use super::{BlockBackend, NUM_QUEUES, QUEUE_SIZE, SECTOR_SIZE};
use crate::devices::virtio::{
    ActivateError, IrqTrigger, IrqType, VirtioDevice, activate_queues, new_queue_events,
    read_config_bytes,
};
use crate::vstate::memory::GuestMemoryMmap;

/// Length of the request header.
pub const REQUEST_HEADER_LEN: u32 = 16;
/// Bytes moved between the disk and guest memory at a time.
const CHUNK: usize = 64 * 1024;

/// Why a request failed (the guest sees only the status byte).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RequestError {
    #[error("the header descriptor is missing, short or device-writable")]
    BadHeader,
    #[error("cannot read the request header from guest memory")]
    HeaderMemory,
    #[error("a data descriptor has the wrong direction")]
    DataDirection,
    #[error("a data descriptor is outside guest memory")]
    DataMemory,
    #[error("the data length {0} is not a whole number of sectors")]
    PartialSector(u64),
    #[error("sectors {sector}+{len} bytes are beyond the disk")]
    OutOfRange { sector: u64, len: u64 },
    #[error("the disk is read-only")]
    ReadOnly,
    #[error("request type {0} is not supported")]
    Unsupported(u32),
    #[error("disk I/O failed: {0}")]
    Io(std::io::ErrorKind),
}

impl RequestError {
    /// The status byte the driver sees.
    pub fn status(&self) -> u8 {
        match self {
            Self::Unsupported(_) => VIRTIO_BLK_S_UNSUPP as u8,
            _ => VIRTIO_BLK_S_IOERR as u8,
        }
    }
}

/// Counters (for metrics).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct BlockCounters {
    /// Chains returned to the driver.
    pub requests: u64,
    /// Requests answered with a status other than OK.
    pub failed: u64,
    /// Chains that could not even carry a status (returned with length 0),
    /// or heads that could not be returned at all.
    pub malformed: u64,
    pub read_bytes: u64,
    pub write_bytes: u64,
}

/// What one [`process_queue`] call did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ProcessOutcome {
    /// Used-ring entries added.
    pub used: u64,
    /// Whether the driver wants an interrupt for them.
    pub notify: bool,
}

/// The device's identity and the disk, as request execution sees them.
pub struct DiskContext<'a> {
    pub backend: &'a mut dyn BlockBackend,
    pub id: &'a [u8; VIRTIO_BLK_ID_BYTES as usize],
    pub read_only: bool,
    pub counters: &'a mut BlockCounters,
}

/// Serve every available chain of `queue`: parse, execute against the
/// disk, write the status, return the chain in the used ring.
///
/// This is the device's whole guest-facing surface in one call, with no
/// state but its arguments — the entry point for a fuzz target (issue 7
/// follow-up, `cargo fuzz` in a later crate): build a `GuestMemoryMmap`
/// from the input, a ready `Queue` over it, a [`super::MemBackend`], and
/// call this; it must neither panic nor touch memory outside `mem`.
pub fn process_queue(
    mem: &GuestMemoryMmap,
    queue: &mut Queue,
    disk: &mut DiskContext<'_>,
) -> ProcessOutcome {
    let mut outcome = ProcessOutcome::default();
    // At most one queue's worth per call: a guest can lay its used ring
    // over its available ring, so that every completion offers one more
    // request, and a loop until the ring is empty would never end (found
    // by the virtio_blk_queue fuzz target). The rest waits for the next
    // notification, as a real device's would.
    let mut budget = queue.size();
    while budget > 0
        && let Some(chain) = queue.pop_descriptor_chain(mem)
    {
        budget -= 1;
        let head = chain.head_index();
        // At most queue-size descriptors (virtio_queue's chain TTL).
        let descs: Vec<Descriptor> = chain.collect();
        let len = execute_chain(mem, &descs, disk);
        disk.counters.requests += 1;
        if queue.add_used(mem, head, len).is_err() {
            // A head beyond the queue cannot be returned; drop it.
            disk.counters.malformed += 1;
            continue;
        }
        outcome.used += 1;
    }
    if outcome.used > 0 {
        outcome.notify = queue.needs_notification(mem).unwrap_or(true);
    }
    outcome
}

/// Execute one chain; returns the used length (bytes written to the guest).
fn execute_chain(mem: &GuestMemoryMmap, descs: &[Descriptor], disk: &mut DiskContext<'_>) -> u32 {
    // The status byte is the last byte of the last descriptor, which must
    // be device-writable and not the header.
    let status_addr = match descs {
        [_, .., last] if last.is_write_only() && last.len() >= 1 => {
            match last.addr().checked_add(u64::from(last.len()) - 1) {
                Some(a) => a,
                None => {
                    disk.counters.malformed += 1;
                    return 0;
                }
            }
        }
        _ => {
            disk.counters.malformed += 1;
            return 0;
        }
    };
    let data = &descs[1..descs.len() - 1];
    let (status, written) = match execute_request(mem, &descs[0], data, disk) {
        Ok(n) => (VIRTIO_BLK_S_OK as u8, n),
        Err(e) => {
            disk.counters.failed += 1;
            (e.status(), 0)
        }
    };
    if mem.write_obj(status, status_addr).is_err() {
        disk.counters.malformed += 1;
        return 0;
    }
    written.saturating_add(1)
}

/// Total length of `data`, checking direction and guest-memory bounds.
fn data_len(
    mem: &GuestMemoryMmap,
    data: &[Descriptor],
    write_only: bool,
) -> Result<u64, RequestError> {
    let mut total = 0u64;
    for d in data {
        if d.is_write_only() != write_only {
            return Err(RequestError::DataDirection);
        }
        if !GuestMemoryBackend::check_range(mem, d.addr(), d.len() as usize) {
            return Err(RequestError::DataMemory);
        }
        total += u64::from(d.len());
    }
    Ok(total)
}

/// Byte offset of a transfer of `len` bytes at `sector`, if inside `size`.
fn disk_offset(sector: u64, len: u64, size: u64) -> Result<u64, RequestError> {
    if !len.is_multiple_of(SECTOR_SIZE) {
        return Err(RequestError::PartialSector(len));
    }
    sector
        .checked_mul(SECTOR_SIZE)
        .and_then(|off| Some((off, off.checked_add(len)?)))
        .filter(|&(_, end)| end <= size)
        .map(|(off, _)| off)
        .ok_or(RequestError::OutOfRange { sector, len })
}

fn io_err(e: std::io::Error) -> RequestError {
    RequestError::Io(e.kind())
}

/// Execute a request; returns the data bytes written to the guest.
fn execute_request(
    mem: &GuestMemoryMmap,
    header: &Descriptor,
    data: &[Descriptor],
    disk: &mut DiskContext<'_>,
) -> Result<u32, RequestError> {
    if header.is_write_only() || header.len() < REQUEST_HEADER_LEN {
        return Err(RequestError::BadHeader);
    }
    let mut raw = [0u8; REQUEST_HEADER_LEN as usize];
    mem.read_slice(&mut raw, header.addr())
        .map_err(|_| RequestError::HeaderMemory)?;
    let (ty, rest) = raw.split_at(4);
    let ty = u32::from_le_bytes([ty[0], ty[1], ty[2], ty[3]]);
    let mut sector = [0u8; 8];
    sector.copy_from_slice(&rest[4..12]);
    let sector = u64::from_le_bytes(sector);

    match ty {
        VIRTIO_BLK_T_IN => {
            let len = data_len(mem, data, true)?;
            let mut off = disk_offset(sector, len, disk.backend.size())?;
            let mut buf = vec![0u8; (len as usize).min(CHUNK)];
            for d in data {
                let mut done = 0u64;
                while done < u64::from(d.len()) {
                    let n = (u64::from(d.len()) - done).min(CHUNK as u64) as usize;
                    disk.backend.read_at(off, &mut buf[..n]).map_err(io_err)?;
                    mem.write_slice(&buf[..n], d.addr().unchecked_add(done))
                        .map_err(|_| RequestError::DataMemory)?;
                    done += n as u64;
                    off += n as u64;
                }
            }
            disk.counters.read_bytes += len;
            // A chain's total length is below 2^32 (virtio_queue stops
            // yielding descriptors past that).
            Ok(u32::try_from(len).unwrap_or(u32::MAX))
        }
        VIRTIO_BLK_T_OUT => {
            if disk.read_only {
                return Err(RequestError::ReadOnly);
            }
            let len = data_len(mem, data, false)?;
            let mut off = disk_offset(sector, len, disk.backend.size())?;
            let mut buf = vec![0u8; (len as usize).min(CHUNK)];
            for d in data {
                let mut done = 0u64;
                while done < u64::from(d.len()) {
                    let n = (u64::from(d.len()) - done).min(CHUNK as u64) as usize;
                    mem.read_slice(&mut buf[..n], d.addr().unchecked_add(done))
                        .map_err(|_| RequestError::DataMemory)?;
                    disk.backend.write_at(off, &buf[..n]).map_err(io_err)?;
                    done += n as u64;
                    off += n as u64;
                }
            }
            disk.counters.write_bytes += len;
            Ok(0)
        }
        VIRTIO_BLK_T_FLUSH => {
            disk.backend.flush().map_err(io_err)?;
            Ok(0)
        }
        VIRTIO_BLK_T_GET_ID => {
            data_len(mem, data, true)?;
            let mut written = 0usize;
            for d in data {
                let n = (d.len() as usize).min(disk.id.len() - written);
                if n == 0 {
                    break;
                }
                mem.write_slice(&disk.id[written..written + n], d.addr())
                    .map_err(|_| RequestError::DataMemory)?;
                written += n;
            }
            Ok(written as u32)
        }
        other => Err(RequestError::Unsupported(other)),
    }
}

/// A virtio-blk device.
pub struct Block {
    pub(super) id: [u8; VIRTIO_BLK_ID_BYTES as usize],
    pub(super) backend: Box<dyn BlockBackend>,
    pub(super) read_only: bool,
    pub(super) avail_features: u64,
    pub(super) acked_features: u64,
    /// `struct virtio_blk_config` as far as we fill it: `capacity` (u64,
    /// in sectors). The rest reads as zero (its features are not offered).
    pub(super) config: [u8; 8],
    pub(super) queues: Vec<Queue>,
    /// Queue notifications (ioeventfds), one per queue.
    pub(super) queue_evts: Vec<EventFd>,
    pub(super) irq: IrqTrigger,
    /// Guest memory, once activated.
    pub(super) mem: Option<GuestMemoryMmap>,
    pub counters: BlockCounters,
}

impl std::fmt::Debug for Block {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Block")
            .field("id", &String::from_utf8_lossy(&self.id))
            .field("read_only", &self.read_only)
            .field("acked_features", &self.acked_features)
            .field("activated", &self.mem.is_some())
            .field("counters", &self.counters)
            .finish_non_exhaustive()
    }
}

impl Block {
    /// A device over `backend`; `id` (up to 20 bytes, truncated) is what
    /// GET_ID returns (`/sys/block/vda/serial` in the guest).
    pub fn new(id: &str, backend: Box<dyn BlockBackend>, read_only: bool) -> std::io::Result<Self> {
        let mut id_bytes = [0u8; VIRTIO_BLK_ID_BYTES as usize];
        let n = id.len().min(id_bytes.len());
        id_bytes[..n].copy_from_slice(&id.as_bytes()[..n]);
        let capacity = backend.size() / SECTOR_SIZE;
        let mut avail_features = (1u64 << VIRTIO_F_VERSION_1) | (1u64 << VIRTIO_BLK_F_FLUSH);
        if read_only {
            avail_features |= 1u64 << VIRTIO_BLK_F_RO;
        }
        let queues = (0..NUM_QUEUES)
            .map(|_| Queue::new(QUEUE_SIZE))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        Ok(Self {
            id: id_bytes,
            backend,
            read_only,
            avail_features,
            acked_features: 0,
            config: capacity.to_le_bytes(),
            queues,
            queue_evts: new_queue_events(NUM_QUEUES)?,
            irq: IrqTrigger::new()?,
            mem: None,
            counters: BlockCounters::default(),
        })
    }

    /// Capacity in sectors.
    pub fn capacity(&self) -> u64 {
        u64::from_le_bytes(self.config)
    }

    pub fn backend(&self) -> &dyn BlockBackend {
        self.backend.as_ref()
    }

    /// Serve queue `index` and raise the interrupt if the driver wants it.
    /// Nothing happens before activation or for a queue that does not
    /// exist.
    pub fn process_queue(&mut self, index: usize) -> ProcessOutcome {
        let Some(mem) = self.mem.as_ref() else {
            return ProcessOutcome::default();
        };
        let Some(queue) = self.queues.get_mut(index) else {
            return ProcessOutcome::default();
        };
        let mut disk = DiskContext {
            backend: self.backend.as_mut(),
            id: &self.id,
            read_only: self.read_only,
            counters: &mut self.counters,
        };
        let outcome = process_queue(mem, queue, &mut disk);
        if outcome.notify {
            // A lost interrupt (eventfd counter saturated) is not fatal:
            // the status bit is set and the next one delivers it.
            let _ = self.irq.trigger(IrqType::Vring);
        }
        outcome
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
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
        read_config_bytes(&self.config, offset, data);
    }
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // Nothing writable (no VIRTIO_BLK_F_CONFIG_WCE).
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
    }
    fn queue_events(&self) -> &[EventFd] {
        &self.queue_evts
    }
    fn queue_notify(&mut self, index: u32) {
        self.handle_queue_notify(index);
    }
}

#[cfg(test)]
#[path = "tests.rs"]
mod tests;
