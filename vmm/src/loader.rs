//! Loading the guest kernel for direct 64-bit entry.
//!
//! The image is first checked by [`crate::guest_kernel::check_elf`] (so a
//! bzImage or a non-x86 ELF gets the clear error from there), then its
//! `PT_LOAD` segments are copied to their physical addresses by
//! linux-loader's ELF loader. The entry point returned is the ELF entry,
//! which for an x86-64 `vmlinux` is the physical address of `startup_64`.

use std::io::Cursor;

use linux_loader::loader::{KernelLoader, elf::Elf};
use vm_memory::{GuestAddress, GuestMemoryBackend};

use crate::arch::x86_64::layout;
use crate::guest_kernel::{self, KernelImageError};

/// Errors loading a kernel.
#[derive(Debug, thiserror::Error)]
pub enum LoaderError {
    #[error(transparent)]
    Image(#[from] KernelImageError),
    #[error("cannot load the kernel into guest memory: {0}")]
    Load(linux_loader::loader::Error),
}

/// Where the kernel was put.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadedKernel {
    /// The first instruction to run.
    pub entry: GuestAddress,
    /// First byte after the highest loaded segment.
    pub end: u64,
}

/// Check `image` and copy it into `mem`. Segments must lie at or above
/// [`layout::HIMEM_START`] (below it are the VMM's boot structures).
pub fn load_kernel<M: GuestMemoryBackend>(
    mem: &M,
    image: &[u8],
) -> Result<LoadedKernel, LoaderError> {
    guest_kernel::check_elf(image)?;
    let result = Elf::load(
        mem,
        None,
        &mut Cursor::new(image),
        Some(GuestAddress(layout::HIMEM_START)),
    )
    .map_err(LoaderError::Load)?;
    Ok(LoadedKernel {
        entry: result.kernel_load,
        end: result.kernel_end,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryMmap};

    /// A minimal ELF64 x86-64 executable: one PT_LOAD segment of `code` at
    /// physical address `paddr`, entry at `paddr`.
    pub(crate) fn tiny_elf(paddr: u64, code: &[u8]) -> Vec<u8> {
        let mut e = vec![0u8; 64 + 56];
        e[0..4].copy_from_slice(b"\x7fELF");
        e[4] = 2; // 64-bit
        e[5] = 1; // little endian
        e[6] = 1; // version
        e[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
        e[18..20].copy_from_slice(&62u16.to_le_bytes()); // x86-64
        e[20..24].copy_from_slice(&1u32.to_le_bytes());
        e[24..32].copy_from_slice(&paddr.to_le_bytes()); // e_entry
        e[32..40].copy_from_slice(&64u64.to_le_bytes()); // e_phoff
        e[52..54].copy_from_slice(&64u16.to_le_bytes()); // e_ehsize
        e[54..56].copy_from_slice(&56u16.to_le_bytes()); // e_phentsize
        e[56..58].copy_from_slice(&1u16.to_le_bytes()); // e_phnum
        let ph = 64;
        e[ph..ph + 4].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
        e[ph + 4..ph + 8].copy_from_slice(&5u32.to_le_bytes()); // R+X
        e[ph + 8..ph + 16].copy_from_slice(&120u64.to_le_bytes()); // p_offset
        e[ph + 16..ph + 24].copy_from_slice(&paddr.to_le_bytes()); // p_vaddr
        e[ph + 24..ph + 32].copy_from_slice(&paddr.to_le_bytes()); // p_paddr
        e[ph + 32..ph + 40].copy_from_slice(&(code.len() as u64).to_le_bytes());
        e[ph + 40..ph + 48].copy_from_slice(&(code.len() as u64).to_le_bytes());
        e[ph + 48..ph + 56].copy_from_slice(&0x1000u64.to_le_bytes());
        e.extend_from_slice(code);
        e
    }

    #[test]
    fn loads_segments_at_their_physical_address() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 4 << 20)]).expect("mem");
        let image = tiny_elf(0x20_0000, &[0xf4, 0xeb, 0xfe]);
        let k = load_kernel(&mem, &image).expect("load");
        assert_eq!(k.entry, GuestAddress(0x20_0000));
        let mut code = [0u8; 3];
        mem.read_slice(&mut code, GuestAddress(0x20_0000))
            .expect("read");
        assert_eq!(code, [0xf4, 0xeb, 0xfe]);
    }

    #[test]
    fn rejects_non_elf_and_low_segments() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 4 << 20)]).expect("mem");
        let mut bz = vec![0u8; 1024];
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        assert!(matches!(
            load_kernel(&mem, &bz),
            Err(LoaderError::Image(KernelImageError::NotElf))
        ));
        // A segment over the boot structures is refused by the loader.
        let low = tiny_elf(0x1000, &[0xf4]);
        assert!(matches!(load_kernel(&mem, &low), Err(LoaderError::Load(_))));
        // A segment past the end of guest memory too.
        let high = tiny_elf(8 << 20, &[0xf4]);
        assert!(matches!(
            load_kernel(&mem, &high),
            Err(LoaderError::Load(_))
        ));
    }
}
