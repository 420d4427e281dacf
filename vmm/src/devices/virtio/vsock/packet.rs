//! The virtio-vsock packet: a 44-byte little-endian header
//! (`struct virtio_vsock_hdr`) followed by `len` payload bytes, carried by
//! a descriptor chain.
//!
//! The chain is treated as a scatter-gather list: the header and the
//! payload may be split across descriptors at any byte (Linux puts the
//! header and the payload of a TX packet in separate descriptors, and an
//! RX buffer in one). Every descriptor's direction and its range in guest
//! memory are checked before a byte is moved; a TX chain may carry at most
//! [`MAX_PKT_BUF_SIZE`] payload bytes and its header's `len` must fit in
//! the chain. We parse the header ourselves rather than through
//! `virtio-vsock`'s `VsockPacket`: the scatter-gather form accepts every
//! layout a driver may use, needs no raw pointers into guest memory, and
//! is the one function a fuzz target has to drive.

use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

use crate::vstate::memory::GuestMemoryMmap;

/// Size of `struct virtio_vsock_hdr`.
pub const HDR_SIZE: usize = 44;
/// Largest payload of one packet we accept from or give to the guest
/// (Linux's `VIRTIO_VSOCK_MAX_PKT_BUF_SIZE`).
pub const MAX_PKT_BUF_SIZE: u32 = 64 * 1024;

/// `type`: stream sockets, the only kind offered.
pub const TYPE_STREAM: u16 = 1;

pub const OP_INVALID: u16 = 0;
pub const OP_REQUEST: u16 = 1;
pub const OP_RESPONSE: u16 = 2;
pub const OP_RST: u16 = 3;
pub const OP_SHUTDOWN: u16 = 4;
pub const OP_RW: u16 = 5;
pub const OP_CREDIT_UPDATE: u16 = 6;
pub const OP_CREDIT_REQUEST: u16 = 7;

/// SHUTDOWN flag: the sender will receive no more data.
pub const SHUTDOWN_RCV: u32 = 1;
/// SHUTDOWN flag: the sender will send no more data.
pub const SHUTDOWN_SEND: u32 = 2;

/// `struct virtio_vsock_hdr`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PacketHeader {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub type_: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

impl PacketHeader {
    pub fn from_bytes(b: &[u8; HDR_SIZE]) -> Self {
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap_or([0; 8]));
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap_or([0; 4]));
        let u16_at = |o: usize| u16::from_le_bytes(b[o..o + 2].try_into().unwrap_or([0; 2]));
        Self {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            type_: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }

    pub fn to_bytes(&self) -> [u8; HDR_SIZE] {
        let mut b = [0u8; HDR_SIZE];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }
}

/// Why a chain could not carry a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PacketError {
    #[error("a descriptor has the wrong direction")]
    Direction,
    #[error("a descriptor is outside guest memory")]
    Memory,
    #[error("the chain is shorter than the 44-byte header")]
    ShortHeader,
    #[error(
        "the header's len {len} exceeds the chain ({avail} bytes) or the {MAX_PKT_BUF_SIZE}-byte limit"
    )]
    BadLength { len: u32, avail: u64 },
}

/// Sum of the descriptors' lengths, after checking each lies in guest
/// memory and has the direction `write_only`.
fn checked_len(
    mem: &GuestMemoryMmap,
    descs: &[Descriptor],
    write_only: bool,
) -> Result<u64, PacketError> {
    let mut total = 0u64;
    for d in descs {
        if d.is_write_only() != write_only {
            return Err(PacketError::Direction);
        }
        if !GuestMemoryBackend::check_range(mem, d.addr(), d.len() as usize) {
            return Err(PacketError::Memory);
        }
        total += u64::from(d.len());
    }
    Ok(total)
}

/// Copy `buf.len()` bytes starting `offset` bytes into the chain (read).
fn gather(
    mem: &GuestMemoryMmap,
    descs: &[Descriptor],
    mut offset: u64,
    buf: &mut [u8],
) -> Result<(), PacketError> {
    let mut done = 0usize;
    for d in descs {
        if done == buf.len() {
            break;
        }
        let len = u64::from(d.len());
        if offset >= len {
            offset -= len;
            continue;
        }
        let n = ((len - offset) as usize).min(buf.len() - done);
        let addr = d.addr().checked_add(offset).ok_or(PacketError::Memory)?;
        mem.read_slice(&mut buf[done..done + n], addr)
            .map_err(|_| PacketError::Memory)?;
        done += n;
        offset = 0;
    }
    if done == buf.len() {
        Ok(())
    } else {
        Err(PacketError::Memory)
    }
}

/// Copy `buf` into the chain starting `offset` bytes in (write).
fn scatter(
    mem: &GuestMemoryMmap,
    descs: &[Descriptor],
    mut offset: u64,
    buf: &[u8],
) -> Result<(), PacketError> {
    let mut done = 0usize;
    for d in descs {
        if done == buf.len() {
            break;
        }
        let len = u64::from(d.len());
        if offset >= len {
            offset -= len;
            continue;
        }
        let n = ((len - offset) as usize).min(buf.len() - done);
        let addr: GuestAddress = d.addr().checked_add(offset).ok_or(PacketError::Memory)?;
        mem.write_slice(&buf[done..done + n], addr)
            .map_err(|_| PacketError::Memory)?;
        done += n;
        offset = 0;
    }
    if done == buf.len() {
        Ok(())
    } else {
        Err(PacketError::Memory)
    }
}

/// Parse a driver-to-device (TX) chain: every descriptor driver-readable
/// and in guest memory, a whole header, and `len` payload bytes present
/// and within [`MAX_PKT_BUF_SIZE`]. The payload is read only for OP_RW;
/// for other ops it is ignored (the header's `len` is still checked).
pub fn read_tx_packet(
    mem: &GuestMemoryMmap,
    descs: &[Descriptor],
) -> Result<(PacketHeader, Vec<u8>), PacketError> {
    let total = checked_len(mem, descs, false)?;
    if total < HDR_SIZE as u64 {
        return Err(PacketError::ShortHeader);
    }
    let mut raw = [0u8; HDR_SIZE];
    gather(mem, descs, 0, &mut raw)?;
    let hdr = PacketHeader::from_bytes(&raw);
    let avail = total - HDR_SIZE as u64;
    if hdr.len > MAX_PKT_BUF_SIZE || u64::from(hdr.len) > avail {
        return Err(PacketError::BadLength {
            len: hdr.len,
            avail,
        });
    }
    let mut data = Vec::new();
    if hdr.op == OP_RW && hdr.len > 0 {
        data = vec![0u8; hdr.len as usize];
        gather(mem, descs, HDR_SIZE as u64, &mut data)?;
    }
    Ok((hdr, data))
}

/// Payload bytes a device-to-driver (RX) chain can take after the header,
/// after checking every descriptor is device-writable and in guest memory.
pub fn rx_capacity(mem: &GuestMemoryMmap, descs: &[Descriptor]) -> Result<u32, PacketError> {
    let total = checked_len(mem, descs, true)?;
    if total < HDR_SIZE as u64 {
        return Err(PacketError::ShortHeader);
    }
    Ok((total - HDR_SIZE as u64).min(u64::from(MAX_PKT_BUF_SIZE)) as u32)
}

/// Write a packet into an RX chain whose capacity [`rx_capacity`] checked;
/// `hdr.len` is set to `data.len()`. Returns the used length.
pub fn write_rx_packet(
    mem: &GuestMemoryMmap,
    descs: &[Descriptor],
    hdr: &PacketHeader,
    data: &[u8],
) -> Result<u32, PacketError> {
    let mut hdr = *hdr;
    hdr.len = u32::try_from(data.len()).map_err(|_| PacketError::BadLength {
        len: u32::MAX,
        avail: 0,
    })?;
    scatter(mem, descs, 0, &hdr.to_bytes())?;
    scatter(mem, descs, HDR_SIZE as u64, data)?;
    Ok(HDR_SIZE as u32 + hdr.len)
}
