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

use std::num::NonZeroUsize;

use vm_memory::bitmap::AtomicBitmap;
use vm_memory::mmap::{MmapRegionBuilder, MmapRegionError};
use vm_memory::{FileOffset, GuestAddress, GuestRegionCollectionError, GuestRegionMmap};

/// The guest memory type used throughout the VMM. The `AtomicBitmap`
/// records the pages the VMM itself writes (virtio used rings, request
/// data): KVM's dirty log only sees the guest's writes, and a diff snapshot
/// needs both.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<AtomicBitmap>;

/// Guest page size, the granularity of dirty tracking and diff files.
pub const PAGE_SIZE: u64 = 4096;
const PAGE: NonZeroUsize = match NonZeroUsize::new(PAGE_SIZE as usize) {
    Some(p) => p,
    None => unreachable!(),
};

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
        let bitmap = AtomicBitmap::new(len, PAGE);
        let builder = MmapRegionBuilder::new_with_bitmap(len, bitmap).with_mmap_prot(prot);
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

/// A page-aligned byte range of the memory layout (guest RAM regions back
/// to back, as a memory file stores them).
pub type LayoutRange = schema::snapshot::PageRange;

/// Errors reading or writing memory files.
#[derive(Debug, thiserror::Error)]
pub enum MemoryFileError {
    #[error("range {offset:#x}+{len:#x} is not page aligned or not inside guest memory")]
    BadRange { offset: u64, len: u64 },
    #[error("cannot map {len:#x} bytes of the diff file at {offset:#x}: {source}")]
    Overlay {
        offset: u64,
        len: u64,
        source: std::io::Error,
    },
    #[error("cannot copy guest memory to or from the file: {0}")]
    Io(#[from] std::io::Error),
    #[error("cannot access guest memory: {0}")]
    Guest(String),
}

/// `(host address, layout offset, size)` of every region, in layout order.
fn layout(mem: &GuestMemoryMmap) -> Vec<(u64, u64, u64)> {
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    let mut offset = 0;
    mem.iter()
        .map(|r| {
            let entry = (r.as_ptr() as u64, offset, r.len());
            offset += r.len();
            entry
        })
        .collect()
}

/// Total size of the memory layout.
pub fn layout_len(mem: &GuestMemoryMmap) -> u64 {
    layout(mem).iter().map(|&(_, _, size)| size).sum()
}

/// Map `ranges` of `file` (at the same offsets in the file as in the
/// layout) over guest memory, `MAP_PRIVATE | MAP_FIXED`: a diff snapshot's
/// pages laid over its base's without reading them, still lazily loaded
/// and shared copy-on-write with every other VM restored from the file.
pub fn overlay_file_ranges(
    mem: &GuestMemoryMmap,
    file: &File,
    ranges: &[LayoutRange],
) -> Result<(), MemoryFileError> {
    use std::os::fd::AsRawFd;
    let regions = layout(mem);
    for r in ranges {
        let bad = MemoryFileError::BadRange {
            offset: r.offset,
            len: r.len,
        };
        if r.len == 0 || r.offset % PAGE_SIZE != 0 || r.len % PAGE_SIZE != 0 {
            return Err(bad);
        }
        let end = r.offset.checked_add(r.len).ok_or(bad)?;
        // A range may cross from one region into the next.
        let mut at = r.offset;
        while at < end {
            let Some(&(host, start, size)) = regions
                .iter()
                .find(|&&(_, start, size)| at >= start && at < start + size)
            else {
                return Err(MemoryFileError::BadRange {
                    offset: r.offset,
                    len: r.len,
                });
            };
            let len = (end.min(start + size)) - at;
            let addr = host + (at - start);
            // SAFETY: [addr, addr+len) lies inside a mapping owned by `mem`
            // (checked against its regions above), so MAP_FIXED replaces
            // only guest RAM pages, with pages of a file of the same
            // protection; KVM's memory slot keeps pointing at the same
            // addresses and sees the new pages on its next fault. The
            // mapping is released with the region's (munmap of the whole
            // range).
            let p = unsafe {
                libc::mmap(
                    addr as *mut libc::c_void,
                    len as usize,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_FIXED | libc::MAP_NORESERVE,
                    file.as_raw_fd(),
                    at as libc::off_t,
                )
            };
            if p == libc::MAP_FAILED {
                return Err(MemoryFileError::Overlay {
                    offset: at,
                    len,
                    source: std::io::Error::last_os_error(),
                });
            }
            at += len;
        }
    }
    Ok(())
}

/// Read `ranges` of `file` (at the same offsets in the file as in the
/// layout) into guest memory: the fallback for a diff with too many ranges
/// to map one by one (each mapping is a VMA, and a process has a bounded
/// number). The pages become private to this VM.
pub fn copy_file_ranges(
    mem: &GuestMemoryMmap,
    file: &File,
    ranges: &[LayoutRange],
) -> Result<(), MemoryFileError> {
    use std::os::unix::fs::FileExt;
    use vm_memory::{Address, Bytes, GuestMemoryBackend, GuestMemoryRegion};
    const CHUNK: u64 = 2 << 20;
    let regions = layout(mem);
    let mut buf = vec![0u8; CHUNK as usize];
    for r in ranges {
        let end = r
            .offset
            .checked_add(r.len)
            .ok_or(MemoryFileError::BadRange {
                offset: r.offset,
                len: r.len,
            })?;
        let mut at = r.offset;
        while at < end {
            let Some((index, &(_, start, size))) = regions
                .iter()
                .enumerate()
                .find(|&(_, &(_, start, size))| at >= start && at < start + size)
            else {
                return Err(MemoryFileError::BadRange {
                    offset: r.offset,
                    len: r.len,
                });
            };
            let n = (end.min(start + size) - at).min(CHUNK) as usize;
            file.read_exact_at(&mut buf[..n], at)?;
            let region = mem.iter().nth(index).ok_or(MemoryFileError::BadRange {
                offset: r.offset,
                len: r.len,
            })?;
            mem.write_slice(&buf[..n], region.start_addr().unchecked_add(at - start))
                .map_err(|e| MemoryFileError::Guest(e.to_string()))?;
            at += n as u64;
        }
    }
    Ok(())
}

/// Copy `len` bytes of guest memory at layout offset `offset` into `buf`.
fn read_layout(
    mem: &GuestMemoryMmap,
    regions: &[(u64, u64, u64)],
    offset: u64,
    buf: &mut [u8],
) -> Result<(), MemoryFileError> {
    use vm_memory::{Address, Bytes, GuestMemoryBackend, GuestMemoryRegion};
    let mut done = 0usize;
    while done < buf.len() {
        let at = offset + done as u64;
        let Some((index, &(_, start, size))) = regions
            .iter()
            .enumerate()
            .find(|&(_, &(_, start, size))| at >= start && at < start + size)
        else {
            return Err(MemoryFileError::BadRange {
                offset,
                len: buf.len() as u64,
            });
        };
        let n = ((start + size - at) as usize).min(buf.len() - done);
        let region = mem.iter().nth(index).ok_or(MemoryFileError::BadRange {
            offset,
            len: buf.len() as u64,
        })?;
        let guest = region.start_addr().unchecked_add(at - start);
        mem.read_slice(&mut buf[done..done + n], guest)
            .map_err(|e| MemoryFileError::Guest(e.to_string()))?;
        done += n;
    }
    Ok(())
}

/// Write all of guest memory to `file` (a full snapshot's memory file),
/// skipping all-zero pages so the file is sparse: a mostly idle guest's
/// memory costs disk (and later page cache) only for what it used.
pub fn write_full(mem: &GuestMemoryMmap, file: &File) -> Result<(), MemoryFileError> {
    let total = layout_len(mem);
    file.set_len(total)?;
    let all = [LayoutRange {
        offset: 0,
        len: total,
    }];
    write_ranges(mem, file, &all, true)
}

/// Write `ranges` of guest memory to `file` at their layout offsets (a
/// diff snapshot's memory file: the same size as a full one, sparse, with
/// only these pages present). With `skip_zero`, all-zero pages are left
/// as holes (only right for a file that was empty there).
pub fn write_ranges(
    mem: &GuestMemoryMmap,
    file: &File,
    ranges: &[LayoutRange],
    skip_zero: bool,
) -> Result<(), MemoryFileError> {
    use std::os::unix::fs::FileExt;
    const CHUNK: usize = 2 << 20;
    let regions = layout(mem);
    let total = layout_len(mem);
    if file.metadata()?.len() < total {
        file.set_len(total)?;
    }
    let mut buf = vec![0u8; CHUNK];
    for r in ranges {
        let mut at = r.offset;
        let end = r.offset.saturating_add(r.len);
        if end > total {
            return Err(MemoryFileError::BadRange {
                offset: r.offset,
                len: r.len,
            });
        }
        while at < end {
            let n = ((end - at) as usize).min(CHUNK);
            let chunk = &mut buf[..n];
            read_layout(mem, &regions, at, chunk)?;
            if !skip_zero {
                file.write_all_at(chunk, at)?;
            } else {
                // Write runs of non-zero pages.
                let mut page = 0usize;
                while page < n {
                    let run_start = page;
                    while page < n && !is_zero(&chunk[page..(page + PAGE_SIZE as usize).min(n)]) {
                        page += PAGE_SIZE as usize;
                    }
                    if page > run_start {
                        let stop = page.min(n);
                        file.write_all_at(&chunk[run_start..stop], at + run_start as u64)?;
                    }
                    page += PAGE_SIZE as usize;
                }
            }
            at += n as u64;
        }
    }
    Ok(())
}

fn is_zero(b: &[u8]) -> bool {
    let mut words = b.chunks_exact(16);
    words
        .by_ref()
        .all(|w| <[u8; 16]>::try_from(w).is_ok_and(|a| u128::from_ne_bytes(a) == 0))
        && words.remainder().iter().all(|&x| x == 0)
}

/// Pages the VMM wrote since the last call (from the regions' bitmaps), as
/// one bitmap word vector per region (bit i = page i), cleared as read.
pub fn take_vmm_dirty(mem: &GuestMemoryMmap) -> Vec<Vec<u64>> {
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    mem.iter()
        .map(|r| {
            let pages = (r.len() / PAGE_SIZE) as usize;
            let mut words = vec![0u64; pages.div_ceil(64)];
            let bitmap: &AtomicBitmap = vm_memory::mmap::MmapRegion::bitmap(r);
            for (page, word) in (0..pages).map(|p| (p, p / 64)) {
                if bitmap.is_bit_set(page) {
                    words[word] |= 1 << (page % 64);
                }
            }
            bitmap.reset_addr_range(0, r.len() as usize);
            words
        })
        .collect()
}

/// Turn per-region page bitmaps into sorted, merged layout ranges.
pub fn bitmaps_to_ranges(mem: &GuestMemoryMmap, bitmaps: &[Vec<u64>]) -> Vec<LayoutRange> {
    let mut out: Vec<LayoutRange> = Vec::new();
    for (&(_, start, size), words) in layout(mem).iter().zip(bitmaps) {
        let pages = size / PAGE_SIZE;
        for page in 0..pages {
            let (w, b) = ((page / 64) as usize, page % 64);
            if words.get(w).is_some_and(|x| x & (1 << b) != 0) {
                let offset = start + page * PAGE_SIZE;
                match out.last_mut() {
                    Some(last) if last.offset + last.len == offset => last.len += PAGE_SIZE,
                    _ => out.push(LayoutRange {
                        offset,
                        len: PAGE_SIZE,
                    }),
                }
            }
        }
    }
    out
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
    fn vmm_writes_are_tracked_and_memory_files_roundtrip_with_diffs_mapped_over() {
        use std::os::unix::fs::MetadataExt;
        let regions = [(0, 1 << 20), (2 << 20, 1 << 20)];
        let mem = create_guest_memory(&regions, &MemoryBacking::Anonymous).expect("memory");
        assert!(take_vmm_dirty(&mem).iter().flatten().all(|&w| w == 0));
        mem.write_obj(0xabu8, GuestAddress(0x3000)).expect("write");
        mem.write_obj(0xcdu8, GuestAddress((2 << 20) + 0x1000))
            .expect("write");
        let dirty = take_vmm_dirty(&mem);
        let ranges = bitmaps_to_ranges(&mem, &dirty);
        // Layout offsets: the second region follows the first at 1 MiB.
        assert_eq!(
            ranges,
            vec![
                LayoutRange {
                    offset: 0x3000,
                    len: PAGE_SIZE
                },
                LayoutRange {
                    offset: (1 << 20) + 0x1000,
                    len: PAGE_SIZE
                }
            ]
        );
        assert!(
            take_vmm_dirty(&mem).iter().flatten().all(|&w| w == 0),
            "cleared"
        );

        // Full file: sparse, the two pages present.
        let full = vmm_sys_util::tempfile::TempFile::new()
            .expect("tmp")
            .into_file();
        write_full(&mem, &full).expect("write full");
        assert_eq!(full.metadata().expect("meta").len(), 2 << 20);
        assert!(
            full.metadata().expect("meta").blocks() * 512 <= 64 << 10,
            "sparse"
        );

        // A diff: one page changed, mapped over a restore of the full file.
        mem.write_obj(0xeeu8, GuestAddress((2 << 20) + 0x1000))
            .expect("write");
        let changed = bitmaps_to_ranges(&mem, &take_vmm_dirty(&mem));
        let diff = vmm_sys_util::tempfile::TempFile::new()
            .expect("tmp")
            .into_file();
        write_ranges(&mem, &diff, &changed, false).expect("write diff");
        let backing = MemoryBacking::PrivateFile {
            file: Arc::new(full),
            offset: 0,
        };
        let restored = create_guest_memory(&regions, &backing).expect("restore");
        assert_eq!(
            restored
                .read_obj::<u8>(GuestAddress((2 << 20) + 0x1000))
                .expect("r"),
            0xcd
        );
        let copied = create_guest_memory(&regions, &backing).expect("restore");
        copy_file_ranges(&copied, &diff, &changed).expect("copy");
        assert_eq!(
            copied
                .read_obj::<u8>(GuestAddress((2 << 20) + 0x1000))
                .expect("r"),
            0xee
        );
        overlay_file_ranges(&restored, &diff, &changed).expect("overlay");
        assert_eq!(
            restored
                .read_obj::<u8>(GuestAddress((2 << 20) + 0x1000))
                .expect("r"),
            0xee
        );
        assert_eq!(
            restored.read_obj::<u8>(GuestAddress(0x3000)).expect("r"),
            0xab
        );
        let bad = [LayoutRange {
            offset: 0x10,
            len: PAGE_SIZE,
        }];
        assert!(overlay_file_ranges(&restored, &diff, &bad).is_err());
        let outside = [LayoutRange {
            offset: 2 << 20,
            len: PAGE_SIZE,
        }];
        assert!(overlay_file_ranges(&restored, &diff, &outside).is_err());
    }

    #[test]
    fn empty_region_is_rejected() {
        assert!(matches!(
            create_guest_memory(&[(0, 0)], &MemoryBacking::Anonymous),
            Err(MemoryError::InvalidRegion { .. })
        ));
    }
}
