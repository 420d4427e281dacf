//! The zero page (`struct boot_params`) and the kernel command line.
//!
//! With direct 64-bit entry there is no real-mode setup code to fill the
//! zero page, so the VMM writes what the kernel's 64-bit entry reads from
//! it: the boot protocol header (magic, loader type, command line pointer)
//! and the e820 memory map, which is the only way the kernel learns how
//! much RAM it has.

use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use vm_memory::{Address, GuestAddress, GuestMemoryBackend};

use super::layout;

/// e820 type of usable RAM.
pub const E820_RAM: u32 = 1;
/// e820 type of reserved memory.
pub const E820_RESERVED: u32 = 2;

const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
/// "HdrS": the boot protocol header signature.
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
/// Loader type "undefined" (0xff): we are not one of the registered loaders.
const KERNEL_LOADER_OTHER: u8 = 0xff;
/// Alignment the kernel may assume for its load address (16 MiB).
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x0100_0000;

/// Errors building or writing the zero page and command line.
#[derive(Debug, thiserror::Error)]
pub enum BootParamsError {
    #[error("the e820 map needs more than {max} entries")]
    TooManyE820Entries { max: usize },
    #[error("the kernel command line is invalid: {0}")]
    Cmdline(linux_loader::cmdline::Error),
    #[error("the kernel command line is {len} bytes, more than the {max} allowed")]
    CmdlineTooLong { len: usize, max: usize },
    #[error("cannot write the kernel command line into guest memory: {0}")]
    WriteCmdline(linux_loader::loader::Error),
    #[error("cannot write the zero page into guest memory: {0}")]
    WriteZeroPage(linux_loader::configurator::Error),
}

/// The e820 map of a guest whose RAM is `regions` (`(start, size)`, as from
/// [`layout::arch_memory_regions`]).
///
/// Below 1 MiB only `[0, EBDA_START)` is RAM: the EBDA (holding the MP
/// table) and the legacy VGA/BIOS hole are not, as on a PC. The MMIO gap
/// below 4 GiB is simply absent from the map.
pub fn e820_map(regions: &[(u64, u64)]) -> Vec<boot_e820_entry> {
    let mut map = vec![boot_e820_entry {
        addr: 0,
        size: layout::EBDA_START,
        r#type: E820_RAM,
    }];
    for &(start, size) in regions {
        let end = start + size;
        let start = start.max(layout::HIMEM_START);
        if end > start {
            map.push(boot_e820_entry {
                addr: start,
                size: end - start,
                r#type: E820_RAM,
            });
        }
    }
    map
}

/// Build the zero page for a kernel whose command line (`cmdline_len`
/// bytes, without the NUL) is at [`layout::CMDLINE_START`].
pub fn build_boot_params(
    e820: &[boot_e820_entry],
    cmdline_len: usize,
) -> Result<boot_params, BootParamsError> {
    let mut params = boot_params::default();
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.cmd_line_ptr = layout::CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline_len as u32;
    params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;

    let max = params.e820_table.len();
    if e820.len() > max {
        return Err(BootParamsError::TooManyE820Entries { max });
    }
    params.e820_table[..e820.len()].copy_from_slice(e820);
    params.e820_entries = e820.len() as u8;
    Ok(params)
}

/// Write the command line to [`layout::CMDLINE_START`] and the zero page
/// (with the e820 map of `regions`) to [`layout::ZERO_PAGE_START`].
pub fn write_boot_params<M: GuestMemoryBackend>(
    mem: &M,
    regions: &[(u64, u64)],
    cmdline: &Cmdline,
) -> Result<(), BootParamsError> {
    let cstring = cmdline.as_cstring().map_err(BootParamsError::Cmdline)?;
    let len = cstring.as_bytes().len();
    if len >= layout::CMDLINE_MAX_SIZE {
        return Err(BootParamsError::CmdlineTooLong {
            len,
            max: layout::CMDLINE_MAX_SIZE - 1,
        });
    }
    linux_loader::loader::load_cmdline(mem, GuestAddress(layout::CMDLINE_START), cmdline)
        .map_err(BootParamsError::WriteCmdline)?;
    let params = build_boot_params(&e820_map(regions), len)?;
    let zero_page = GuestAddress(layout::ZERO_PAGE_START);
    debug_assert_eq!(zero_page.raw_value(), layout::ZERO_PAGE_START);
    LinuxBootConfigurator::write_bootparams(&BootParams::new(&params, zero_page), mem)
        .map_err(BootParamsError::WriteZeroPage)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryMmap};

    #[test]
    fn e820_covers_low_ram_and_high_ram() {
        let map = e820_map(&layout::arch_memory_regions(128 << 20));
        assert_eq!(map.len(), 2);
        assert_eq!(
            (map[0].addr, map[0].size, map[0].r#type),
            (0, layout::EBDA_START, E820_RAM)
        );
        assert_eq!(
            (map[1].addr, map[1].size),
            (layout::HIMEM_START, (128 << 20) - layout::HIMEM_START)
        );
        let big = e820_map(&layout::arch_memory_regions(8 << 30));
        assert_eq!(big.len(), 3);
        assert_eq!(big[1].addr + big[1].size, layout::MMIO_MEM_START);
        assert_eq!({ big[2].addr }, layout::FIRST_ADDR_PAST_32BITS);
        assert_eq!({ big[2].size }, (8u64 << 30) - layout::MMIO_MEM_START);
    }

    #[test]
    fn zero_page_and_cmdline_read_back_from_guest_memory() {
        let size = 64 << 20;
        let regions = layout::arch_memory_regions(size);
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), size as usize)])
            .expect("guest memory");
        let mut cmdline = Cmdline::new(layout::CMDLINE_MAX_SIZE).expect("cmdline");
        cmdline
            .insert_str("console=ttyS0 reboot=k panic=1")
            .expect("insert");
        write_boot_params(&mem, &regions, &cmdline).expect("write");

        let params: boot_params = mem
            .read_obj(GuestAddress(layout::ZERO_PAGE_START))
            .expect("read zero page");
        let hdr = params.hdr;
        assert_eq!({ hdr.boot_flag }, 0xaa55);
        assert_eq!({ hdr.header }, 0x5372_6448);
        assert_eq!({ hdr.type_of_loader }, 0xff);
        assert_eq!({ hdr.cmd_line_ptr }, layout::CMDLINE_START as u32);
        assert_eq!({ hdr.cmdline_size }, 30);
        assert_eq!(params.e820_entries, 2);
        let e1 = params.e820_table[1];
        assert_eq!(
            ({ e1.addr }, { e1.size }),
            (layout::HIMEM_START, size - layout::HIMEM_START)
        );

        let mut text = [0u8; 31];
        mem.read_slice(&mut text, GuestAddress(layout::CMDLINE_START))
            .expect("read cmdline");
        assert_eq!(&text[..], &b"console=ttyS0 reboot=k panic=1\0"[..]);
    }

    #[test]
    fn too_many_e820_entries_is_an_error() {
        let map = vec![boot_e820_entry::default(); 200];
        assert!(matches!(
            build_boot_params(&map, 0),
            Err(BootParamsError::TooManyE820Entries { max: 128 })
        ));
    }
}
