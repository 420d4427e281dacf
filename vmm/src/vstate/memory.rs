//! Guest memory.
//!
//! Guest RAM is a [`GuestMemoryMmap`] whose regions are mapped into the VMM
//! process and registered with KVM as memory slots. Two backings exist:
//!
//! - [`MemoryBacking::Anonymous`]: private anonymous memory, zero-filled and
//!   populated lazily by page faults (cold boot).
//! - [`MemoryBacking::PrivateFile`]: a `MAP_PRIVATE` mapping of a file, the
//!   seam for snapshot restore: guest pages are read from the snapshot file
//!   on first touch, writes go to private copy-on-write pages, and the file
//!   (shared by every sandbox restored from one template) is never written.
//!
//! Both use `MAP_NORESERVE`: a guest's memory size is a ceiling, not a
//! reservation, so a host can hold many mostly-idle guests.

use std::fs::File;
use std::sync::Arc;

use vm_memory::mmap::{MmapRegionBuilder, MmapRegionError};
use vm_memory::{FileOffset, GuestAddress, GuestRegionCollectionError, GuestRegionMmap};

/// The guest memory type used throughout the VMM. (The bitmap type `()`
/// tracks nothing; dirty tracking of VMM writes for diff snapshots will
/// swap in `AtomicBitmap` here.)
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<()>;

/// Where guest RAM comes from.
#[derive(Debug, Clone)]
pub enum MemoryBacking {
    /// Fresh zero-filled private memory.
    Anonymous,
    /// Private copy-on-write mapping of `file`: region `i` maps the file
    /// from `offset` plus the sizes of regions `0..i` (the guest's RAM laid
    /// out contiguously, as a snapshot writes it).
    PrivateFile { file: Arc<File>, offset: u64 },
}

/// Errors creating guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("guest memory region at {start:#x} of {size:#x} bytes is invalid")]
    InvalidRegion { start: u64, size: u64 },
    #[error("cannot map guest memory region at {start:#x} ({size:#x} bytes): {source}")]
    Mmap {
        start: u64,
        size: u64,
        source: MmapRegionError,
    },
    #[error("cannot assemble guest memory: {0}")]
    Collection(#[from] GuestRegionCollectionError),
}

/// Map guest RAM for `regions` (`(guest start, size)`, sorted, e.g. from
/// [`crate::arch::x86_64::layout::arch_memory_regions`]).
pub fn create_guest_memory(
    regions: &[(u64, u64)],
    backing: &MemoryBacking,
) -> Result<GuestMemoryMmap, MemoryError> {
    let mut mapped = Vec::with_capacity(regions.len());
    let mut file_offset = match backing {
        MemoryBacking::Anonymous => 0,
        MemoryBacking::PrivateFile { offset, .. } => *offset,
    };
    for &(start, size) in regions {
        let len = usize::try_from(size).map_err(|_| MemoryError::InvalidRegion { start, size })?;
        if len == 0 {
            return Err(MemoryError::InvalidRegion { start, size });
        }
        let prot = libc::PROT_READ | libc::PROT_WRITE;
        let builder = MmapRegionBuilder::new(len).with_mmap_prot(prot);
        let builder = match backing {
            MemoryBacking::Anonymous => builder
                .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE),
            MemoryBacking::PrivateFile { file, .. } => builder
                .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
                .with_file_offset(FileOffset::from_arc(Arc::clone(file), file_offset)),
        };
        let region = builder.build().map_err(|source| MemoryError::Mmap {
            start,
            size,
            source,
        })?;
        let region = GuestRegionMmap::new(region, GuestAddress(start))
            .ok_or(MemoryError::InvalidRegion { start, size })?;
        mapped.push(region);
        file_offset += size;
    }
    Ok(GuestMemoryMmap::from_regions(mapped)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek, SeekFrom, Write};
    use vm_memory::{Bytes, GuestMemoryBackend};

    #[test]
    fn anonymous_memory_is_zeroed_and_writable() {
        let mem = create_guest_memory(
            &[(0, 1 << 20), (1 << 21, 1 << 20)],
            &MemoryBacking::Anonymous,
        )
        .expect("memory");
        assert_eq!(mem.num_regions(), 2);
        assert_eq!(mem.read_obj::<u64>(GuestAddress(0x1000)).expect("read"), 0);
        mem.write_obj(0xdead_beefu32, GuestAddress((1 << 21) + 8))
            .expect("write");
        assert_eq!(
            mem.read_obj::<u32>(GuestAddress((1 << 21) + 8))
                .expect("read"),
            0xdead_beef
        );
        // The hole between the regions is not guest memory.
        assert!(mem.read_obj::<u8>(GuestAddress(1 << 20)).is_err());
    }

    #[test]
    fn private_file_memory_reads_the_file_and_never_writes_it() {
        let tmp = vmm_sys_util::tempfile::TempFile::new().expect("tempfile");
        let mut file = tmp.into_file();
        let page = 4096usize;
        let mut content = vec![0u8; 3 * page];
        content[page] = 0x11; // file offset 4096: start of guest memory
        content[2 * page + 5] = 0x22; // second region's byte 5
        file.write_all(&content).expect("write file");
        let file = Arc::new(file);
        let backing = MemoryBacking::PrivateFile {
            file: Arc::clone(&file),
            offset: page as u64,
        };
        let mem = create_guest_memory(&[(0, page as u64), (0x10_0000, page as u64)], &backing)
            .expect("memory");
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0)).expect("read"), 0x11);
        assert_eq!(
            mem.read_obj::<u8>(GuestAddress(0x10_0005)).expect("read"),
            0x22
        );
        mem.write_obj(0x99u8, GuestAddress(0)).expect("write");
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0)).expect("read"), 0x99);
        let mut back = Vec::new();
        let mut f = file.as_ref();
        f.seek(SeekFrom::Start(0)).expect("seek");
        f.read_to_end(&mut back).expect("read file");
        assert_eq!(back, content, "the backing file is untouched");
    }

    #[test]
    fn empty_region_is_rejected() {
        assert!(matches!(
            create_guest_memory(&[(0, 0)], &MemoryBacking::Anonymous),
            Err(MemoryError::InvalidRegion { .. })
        ));
    }
}
