//! Register and memory state for direct 64-bit entry: page tables, GDT/IDT
//! in guest memory, and the `kvm_sregs`/`kvm_regs`/`kvm_fpu` that go with
//! them.
//!
//! Linux's 64-bit entry point (`startup_64`) expects long mode with paging
//! on, an identity mapping covering the kernel, the zero page and the
//! command line, flat segments and RSI = zero page. The VMM therefore maps
//! the first 1 GiB 1:1 with 2 MiB pages — the kernel is loaded at 16 MiB and
//! builds its own page tables before it touches anything higher.

use kvm_bindings::{kvm_dtable, kvm_fpu, kvm_regs, kvm_sregs};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

use super::gdt::{self, kvm_segment_from_gdt};
use super::layout;

// Control register and EFER bits.
pub const X86_CR0_PE: u64 = 1 << 0;
pub const X86_CR0_ET: u64 = 1 << 4;
pub const X86_CR0_NW: u64 = 1 << 29;
pub const X86_CR0_CD: u64 = 1 << 30;
pub const X86_CR0_PG: u64 = 1 << 31;
pub const X86_CR4_PAE: u64 = 1 << 5;
pub const EFER_LME: u64 = 1 << 8;
pub const EFER_LMA: u64 = 1 << 10;

/// RFLAGS bit 1 is reserved and always reads as 1.
pub const RFLAGS_RESERVED: u64 = 1 << 1;
/// RFLAGS IOPL = 3: lets CPL3 code use `in`/`out` without an IO bitmap.
pub const RFLAGS_IOPL3: u64 = 3 << 12;

// Page-table entry bits.
const PTE_PRESENT: u64 = 1 << 0;
const PTE_WRITABLE: u64 = 1 << 1;
const PTE_USER: u64 = 1 << 2;
const PDE_PAGE_SIZE: u64 = 1 << 7;

/// Size of one large page in the boot page tables.
pub const LARGE_PAGE_SIZE: u64 = 2 << 20;
/// The boot page tables identity-map `[0, IDENTITY_MAPPED_SIZE)`.
pub const IDENTITY_MAPPED_SIZE: u64 = 512 * LARGE_PAGE_SIZE;

/// The privilege level the boot vCPU starts at.
///
/// A kernel is always entered at CPL0. `User` starts the vCPU directly at
/// CPL3 with user segments, user-accessible pages and IOPL 3: it exists for
/// test payloads and the KVM probe, because on nested-PVM hosts guest CPL0 is
/// emulated (slowly, and incompletely) while CPL3 runs natively.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryMode {
    Kernel,
    User,
}

/// Errors writing the boot structures into guest memory.
#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    #[error("cannot write the boot GDT into guest memory: {0}")]
    WriteGdt(vm_memory::GuestMemoryError),
    #[error("cannot write the boot IDT into guest memory: {0}")]
    WriteIdt(vm_memory::GuestMemoryError),
    #[error("cannot write the boot page tables into guest memory: {0}")]
    WritePageTables(vm_memory::GuestMemoryError),
}

/// Write the identity-mapping page tables (PML4 → one PDPT → one PD of 512
/// 2 MiB pages) and return the value for CR3. With `user` the pages are also
/// accessible from CPL3.
pub fn setup_page_tables<M: GuestMemoryBackend>(mem: &M, user: bool) -> Result<u64, RegsError> {
    let flags = PTE_PRESENT | PTE_WRITABLE | if user { PTE_USER } else { 0 };
    let pml4 = GuestAddress(layout::PML4_START);
    let pdpt = GuestAddress(layout::PDPTE_START);
    let pd = GuestAddress(layout::PDE_START);

    mem.write_obj(pdpt.raw_value() | flags, pml4)
        .map_err(RegsError::WritePageTables)?;
    mem.write_obj(pd.raw_value() | flags, pdpt)
        .map_err(RegsError::WritePageTables)?;
    // Build the whole page directory in one buffer: one write instead of 512.
    let mut entries = [0u8; 512 * 8];
    for (i, chunk) in entries.chunks_exact_mut(8).enumerate() {
        let entry = ((i as u64) * LARGE_PAGE_SIZE) | flags | PDE_PAGE_SIZE;
        chunk.copy_from_slice(&entry.to_le_bytes());
    }
    mem.write_slice(&entries, pd)
        .map_err(RegsError::WritePageTables)?;
    Ok(pml4.raw_value())
}

/// Write the boot GDT and a null IDT into guest memory and return the
/// descriptor-table registers for them.
pub fn write_gdt_and_idt<M: GuestMemoryBackend>(
    mem: &M,
    gdt_table: &[u64],
) -> Result<(kvm_dtable, kvm_dtable), RegsError> {
    debug_assert!(gdt_table.len() <= layout::BOOT_GDT_MAX_ENTRIES);
    let mut bytes = Vec::with_capacity(gdt_table.len() * 8);
    for entry in gdt_table {
        bytes.extend_from_slice(&entry.to_le_bytes());
    }
    mem.write_slice(&bytes, GuestAddress(layout::BOOT_GDT_OFFSET))
        .map_err(RegsError::WriteGdt)?;
    mem.write_obj(0u64, GuestAddress(layout::BOOT_IDT_OFFSET))
        .map_err(RegsError::WriteIdt)?;
    let gdt = kvm_dtable {
        base: layout::BOOT_GDT_OFFSET,
        limit: (bytes.len() - 1) as u16,
        ..Default::default()
    };
    let idt = kvm_dtable {
        base: layout::BOOT_IDT_OFFSET,
        limit: 7,
        ..Default::default()
    };
    Ok((gdt, idt))
}

/// Write the boot GDT, IDT and page tables into `mem` and return `sregs`
/// (as read from a freshly created vCPU) switched to 64-bit long mode.
pub fn long_mode_sregs<M: GuestMemoryBackend>(
    mem: &M,
    mut sregs: kvm_sregs,
    mode: EntryMode,
) -> Result<kvm_sregs, RegsError> {
    let table = gdt::boot_gdt();
    let (gdt, idt) = write_gdt_and_idt(mem, &table)?;
    sregs.gdt = gdt;
    sregs.idt = idt;

    let (code_index, data_index) = match mode {
        EntryMode::Kernel => (gdt::KERNEL_CODE_INDEX, gdt::KERNEL_DATA_INDEX),
        EntryMode::User => (gdt::USER_CODE_INDEX, gdt::USER_DATA_INDEX),
    };
    let code = kvm_segment_from_gdt(table[code_index as usize], code_index);
    let data = kvm_segment_from_gdt(table[data_index as usize], data_index);
    let tss = kvm_segment_from_gdt(table[gdt::TSS_INDEX as usize], gdt::TSS_INDEX);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;

    sregs.cr3 = setup_page_tables(mem, mode == EntryMode::User)?;
    sregs.cr4 |= X86_CR4_PAE;
    // The reset value of CR0 has caching disabled (CD|NW); a kernel entered
    // without firmware never gets them cleared by a BIOS, so clear them here.
    sregs.cr0 = (sregs.cr0 & !(X86_CR0_CD | X86_CR0_NW)) | X86_CR0_PE | X86_CR0_PG | X86_CR0_ET;
    sregs.efer |= EFER_LME | EFER_LMA;
    Ok(sregs)
}

/// General-purpose registers at entry: RIP at `entry`, the boot stack, and
/// RSI = the zero page (Linux's 64-bit boot protocol).
pub fn boot_regs(entry: GuestAddress, mode: EntryMode) -> kvm_regs {
    let rflags = match mode {
        EntryMode::Kernel => RFLAGS_RESERVED,
        EntryMode::User => RFLAGS_RESERVED | RFLAGS_IOPL3,
    };
    kvm_regs {
        rflags,
        rip: entry.raw_value(),
        rsp: layout::BOOT_STACK_POINTER,
        rbp: layout::BOOT_STACK_POINTER,
        rsi: layout::ZERO_PAGE_START,
        ..Default::default()
    }
}

/// FPU state at entry: the x87 control word and MXCSR at their reset
/// values (all exceptions masked), as the kernel expects.
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).expect("guest memory")
    }

    fn read_u64(mem: &GuestMemoryMmap, addr: u64) -> u64 {
        mem.read_obj(GuestAddress(addr)).expect("read")
    }

    #[test]
    fn page_tables_identity_map_first_gib_with_2mib_pages() {
        let m = mem();
        let cr3 = setup_page_tables(&m, false).expect("page tables");
        assert_eq!(cr3, layout::PML4_START);
        assert_eq!(read_u64(&m, layout::PML4_START), layout::PDPTE_START | 0x3);
        assert_eq!(read_u64(&m, layout::PML4_START + 8), 0);
        assert_eq!(read_u64(&m, layout::PDPTE_START), layout::PDE_START | 0x3);
        assert_eq!(read_u64(&m, layout::PDPTE_START + 8), 0);
        for i in 0..512u64 {
            assert_eq!(read_u64(&m, layout::PDE_START + i * 8), (i << 21) | 0x83);
        }
        // Walk a virtual address through the tables as the MMU would.
        let va = 0x3abc_def0u64;
        let pml4e = read_u64(&m, cr3 + ((va >> 39) & 0x1ff) * 8);
        let pdpte = read_u64(&m, (pml4e & !0xfff) + ((va >> 30) & 0x1ff) * 8);
        let pde = read_u64(&m, (pdpte & !0xfff) + ((va >> 21) & 0x1ff) * 8);
        assert_ne!(pde & PDE_PAGE_SIZE, 0);
        assert_eq!((pde & !0x1f_ffff & !(1 << 63)) | (va & 0x1f_ffff), va);
    }

    #[test]
    fn user_page_tables_set_the_user_bit_at_every_level() {
        let m = mem();
        setup_page_tables(&m, true).expect("page tables");
        assert_eq!(read_u64(&m, layout::PML4_START) & 0x7, 0x7);
        assert_eq!(read_u64(&m, layout::PDPTE_START) & 0x7, 0x7);
        assert_eq!(read_u64(&m, layout::PDE_START + 8), (1 << 21) | 0x87);
    }

    #[test]
    fn gdt_and_idt_are_written() {
        let m = mem();
        let table = gdt::boot_gdt();
        let (g, i) = write_gdt_and_idt(&m, &table).expect("gdt");
        assert_eq!(g.base, layout::BOOT_GDT_OFFSET);
        assert_eq!(usize::from(g.limit), table.len() * 8 - 1);
        for (n, e) in table.iter().enumerate() {
            assert_eq!(read_u64(&m, layout::BOOT_GDT_OFFSET + n as u64 * 8), *e);
        }
        assert_eq!((i.base, i.limit), (layout::BOOT_IDT_OFFSET, 7));
        assert_eq!(read_u64(&m, layout::BOOT_IDT_OFFSET), 0);
    }

    #[test]
    fn sregs_are_long_mode() {
        let m = mem();
        let reset = kvm_sregs {
            cr0: 0x6000_0010,
            ..Default::default()
        };
        let s = long_mode_sregs(&m, reset, EntryMode::Kernel).expect("sregs");
        assert_eq!(s.cr0, X86_CR0_PE | X86_CR0_PG | X86_CR0_ET);
        assert_eq!(s.cr3, layout::PML4_START);
        assert_ne!(s.cr4 & X86_CR4_PAE, 0);
        assert_eq!(s.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
        assert_eq!((s.cs.selector, s.cs.l, s.cs.dpl), (0x08, 1, 0));
        assert_eq!((s.ss.selector, s.ds.selector), (0x10, 0x10));
        assert_eq!(s.tr.selector, 0x18);

        let u = long_mode_sregs(&m, reset, EntryMode::User).expect("sregs");
        assert_eq!((u.cs.selector, u.cs.dpl, u.ss.selector), (0x2b, 3, 0x23));
    }

    #[test]
    fn regs_point_at_entry_and_zero_page() {
        let r = boot_regs(GuestAddress(0x100_0000), EntryMode::Kernel);
        assert_eq!(
            (r.rip, r.rsi, r.rflags),
            (0x100_0000, layout::ZERO_PAGE_START, 2)
        );
        let u = boot_regs(GuestAddress(0x1000), EntryMode::User);
        assert_eq!(u.rflags, 0x3002);
    }
}
