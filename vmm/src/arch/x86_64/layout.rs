//! Guest physical memory layout of an x86-64 microVM.
//!
//! The low addresses follow Firecracker (`arch/x86_64/layout.rs`) so the
//! layout is one Linux is known to accept from a firmware-less VMM: every
//! structure the VMM writes lives below 1 MiB, in RAM that the e820 map
//! reports as usable and that the kernel reclaims after boot, and the kernel
//! itself is loaded at its ELF physical address above 1 MiB.

/// GDT written by the VMM for the boot vCPU (up to 8 entries of 8 bytes;
/// Firecracker writes 4 here, we add two user-mode entries).
pub const BOOT_GDT_OFFSET: u64 = 0x500;
/// Most GDT entries that fit before the IDT.
pub const BOOT_GDT_MAX_ENTRIES: usize = 8;
/// IDT (a single null entry: the kernel installs its own before enabling
/// interrupts, and until then any exception is a triple fault anyway).
pub const BOOT_IDT_OFFSET: u64 = 0x540;
/// The zero page (`struct boot_params`) whose address goes in RSI.
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer of the boot vCPU (grows down below the page tables).
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Level-4 page map (one 4 KiB page).
pub const PML4_START: u64 = 0x9000;
/// Page-directory-pointer table (one 4 KiB page).
pub const PDPTE_START: u64 = 0xa000;
/// Page directory mapping the first 1 GiB with 2 MiB pages.
pub const PDE_START: u64 = 0xb000;
/// The kernel command line, NUL-terminated.
pub const CMDLINE_START: u64 = 0x20000;
/// Largest command line we write (the kernel's own limit on x86 is 2048
/// bytes, `COMMAND_LINE_SIZE`).
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// Start of the extended BIOS data area; RAM from here up to 1 MiB is not
/// reported as usable, and the MP table lives here where Linux scans for it.
pub const EBDA_START: u64 = 0x9fc00;
/// The MP floating pointer and configuration table.
pub const MPTABLE_START: u64 = EBDA_START;
/// Start of "high" memory: the kernel is loaded at or above it.
pub const HIMEM_START: u64 = 0x10_0000;

/// Where KVM puts the three-page real-mode TSS it needs on Intel hosts
/// (`KVM_SET_TSS_ADDRESS`). It must be in the 32-bit space and outside guest
/// RAM; Firecracker and QEMU use this address, just below the BIOS area.
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;
/// The one-page EPT identity map KVM needs for unrestricted-guest-less Intel
/// hosts (`KVM_SET_IDENTITY_MAP_ADDR`), the page just below the TSS. This is
/// KVM's own default; setting it explicitly keeps it away from any region
/// we might map later.
pub const KVM_IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;

/// Start of the 32-bit MMIO gap: guest RAM stops here and resumes at 4 GiB.
/// virtio-mmio devices are placed from here up.
pub const MMIO_MEM_START: u64 = 0xd000_0000;
/// Size of the 32-bit MMIO gap (768 MiB, up to 4 GiB).
pub const MMIO_MEM_SIZE: u64 = FIRST_ADDR_PAST_32BITS - MMIO_MEM_START;
/// First address above the 32-bit space.
pub const FIRST_ADDR_PAST_32BITS: u64 = 1 << 32;

/// The IO-APIC's MMIO base (architectural default).
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
/// The local APIC's MMIO base (architectural default).
pub const APIC_ADDR: u32 = 0xfee0_0000;
/// Number of IO-APIC pins KVM's in-kernel IO-APIC provides.
pub const IOAPIC_PINS: u8 = 24;

/// Guest RAM ranges `(start, size)` for `mem_size` bytes of memory: one range
/// below the MMIO gap, and a second from 4 GiB if the memory does not fit
/// under it.
pub fn arch_memory_regions(mem_size: u64) -> Vec<(u64, u64)> {
    if mem_size <= MMIO_MEM_START {
        vec![(0, mem_size)]
    } else {
        vec![
            (0, MMIO_MEM_START),
            (FIRST_ADDR_PAST_32BITS, mem_size - MMIO_MEM_START),
        ]
    }
}

// The boot structures do not overlap: GDT below the IDT, the zero page
// below the stack, the page tables one page each, everything below the
// EBDA; the KVM-private pages sit in the MMIO gap.
const _: () = {
    assert!(BOOT_GDT_OFFSET + 8 * BOOT_GDT_MAX_ENTRIES as u64 <= BOOT_IDT_OFFSET);
    assert!(ZERO_PAGE_START + 0x1000 <= BOOT_STACK_POINTER);
    assert!(BOOT_STACK_POINTER < PML4_START);
    assert!(PDPTE_START == PML4_START + 0x1000);
    assert!(PDE_START == PDPTE_START + 0x1000);
    assert!(PDE_START + 0x1000 <= CMDLINE_START);
    assert!(CMDLINE_START + CMDLINE_MAX_SIZE as u64 <= MPTABLE_START);
    assert!(KVM_IDENTITY_MAP_ADDRESS + 0x1000 == KVM_TSS_ADDRESS);
    assert!(KVM_IDENTITY_MAP_ADDRESS >= MMIO_MEM_START);
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regions_split_around_the_mmio_gap() {
        assert_eq!(arch_memory_regions(128 << 20), vec![(0, 128 << 20)]);
        assert_eq!(
            arch_memory_regions(MMIO_MEM_START),
            vec![(0, MMIO_MEM_START)]
        );
        assert_eq!(
            arch_memory_regions(4 << 30),
            vec![
                (0, MMIO_MEM_START),
                (FIRST_ADDR_PAST_32BITS, (4 << 30) - MMIO_MEM_START)
            ]
        );
    }
}
