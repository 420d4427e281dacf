//! GDT entries and the KVM segment registers that match them.
//!
//! In long mode the CPU ignores most of a code/data descriptor (base and
//! limit), but KVM validates the *cached* segment state it is given in
//! `KVM_SET_SREGS` against VMX guest-state rules, and the kernel reloads
//! segments from the GDT early on. So each segment register is derived from
//! the very descriptor written to guest memory: the two cannot disagree.

use kvm_bindings::kvm_segment;

/// Selector index of the flat 64-bit kernel code segment (0x08).
pub const KERNEL_CODE_INDEX: u16 = 1;
/// Selector index of the flat kernel data segment (0x10).
pub const KERNEL_DATA_INDEX: u16 = 2;
/// Selector index of the TSS (0x18). VMX requires a usable, busy TR even
/// though nothing switches stacks through it during early boot.
pub const TSS_INDEX: u16 = 3;
/// Selector index of the flat user data segment (0x20; 0x23 with RPL 3).
pub const USER_DATA_INDEX: u16 = 4;
/// Selector index of the flat 64-bit user code segment (0x28; 0x2b with RPL 3).
pub const USER_CODE_INDEX: u16 = 5;

/// Flags (access byte in bits 0..8, flags nibble in bits 12..16) of the
/// boot GDT's descriptors.
pub mod flags {
    /// Present, DPL 0, code, execute/read, accessed; L=1 (64-bit), G=1.
    pub const KERNEL_CODE64: u16 = 0xa09b;
    /// Present, DPL 0, data, read/write, accessed; D/B=1, G=1.
    pub const KERNEL_DATA: u16 = 0xc093;
    /// Present, system descriptor type 0xb (busy 64-bit TSS), G=1.
    pub const TSS: u16 = 0x808b;
    /// As `KERNEL_DATA` with DPL 3.
    pub const USER_DATA: u16 = 0xc0f3;
    /// As `KERNEL_CODE64` with DPL 3.
    pub const USER_CODE64: u16 = 0xa0fb;
}

/// The boot GDT: null, kernel code, kernel data, TSS, user data, user code.
/// Linux uses only the first three (and loads its own GDT soon after entry);
/// the user entries let a test guest drop to CPL3 with `iretq`.
pub fn boot_gdt() -> [u64; 6] {
    [
        gdt_entry(0, 0, 0),
        gdt_entry(flags::KERNEL_CODE64, 0, 0xfffff),
        gdt_entry(flags::KERNEL_DATA, 0, 0xfffff),
        gdt_entry(flags::TSS, 0, 0xfffff),
        gdt_entry(flags::USER_DATA, 0, 0xfffff),
        gdt_entry(flags::USER_CODE64, 0, 0xfffff),
    ]
}

/// Encode a segment descriptor from `flags` (see [`flags`]), base and a
/// 20-bit limit.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << (56 - 24))
        | ((flags as u64 & 0x0000_f0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << (48 - 16))
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

fn get_base(entry: u64) -> u64 {
    ((entry & 0xff00_0000_0000_0000) >> 32)
        | ((entry & 0x0000_00ff_0000_0000) >> 16)
        | ((entry & 0x0000_0000_ffff_0000) >> 16)
}

/// The limit in bytes: with G=1 the 20-bit limit counts 4 KiB pages.
fn get_limit(entry: u64) -> u32 {
    let limit = (((entry & 0x000f_0000_0000_0000) >> 32) | (entry & 0x0000_0000_0000_ffff)) as u32;
    if get_g(entry) == 1 {
        (limit << 12) | 0xfff
    } else {
        limit
    }
}

fn get_g(entry: u64) -> u8 {
    ((entry & 0x0080_0000_0000_0000) >> 55) as u8
}
fn get_db(entry: u64) -> u8 {
    ((entry & 0x0040_0000_0000_0000) >> 54) as u8
}
fn get_l(entry: u64) -> u8 {
    ((entry & 0x0020_0000_0000_0000) >> 53) as u8
}
fn get_avl(entry: u64) -> u8 {
    ((entry & 0x0010_0000_0000_0000) >> 52) as u8
}
fn get_p(entry: u64) -> u8 {
    ((entry & 0x0000_8000_0000_0000) >> 47) as u8
}
fn get_dpl(entry: u64) -> u8 {
    ((entry & 0x0000_6000_0000_0000) >> 45) as u8
}
fn get_s(entry: u64) -> u8 {
    ((entry & 0x0000_1000_0000_0000) >> 44) as u8
}
fn get_type(entry: u64) -> u8 {
    ((entry & 0x0000_0f00_0000_0000) >> 40) as u8
}

/// The KVM segment register for descriptor `entry` loaded through GDT slot
/// `table_index`; the selector's RPL is the descriptor's DPL.
pub fn kvm_segment_from_gdt(entry: u64, table_index: u16) -> kvm_segment {
    let dpl = get_dpl(entry);
    kvm_segment {
        base: get_base(entry),
        limit: get_limit(entry),
        selector: (table_index << 3) | u16::from(dpl),
        type_: get_type(entry),
        present: get_p(entry),
        dpl,
        db: get_db(entry),
        s: get_s(entry),
        l: get_l(entry),
        g: get_g(entry),
        avl: get_avl(entry),
        padding: 0,
        unusable: u8::from(get_p(entry) == 0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_code_segment_is_64bit_ring0() {
        let gdt = boot_gdt();
        let seg = kvm_segment_from_gdt(gdt[KERNEL_CODE_INDEX as usize], KERNEL_CODE_INDEX);
        assert_eq!(seg.selector, 0x08);
        assert_eq!(seg.type_, 0xb);
        assert_eq!(
            (seg.l, seg.db, seg.dpl, seg.present, seg.s, seg.g),
            (1, 0, 0, 1, 1, 1)
        );
        assert_eq!(seg.base, 0);
        assert_eq!(seg.limit, 0xffff_ffff);
        assert_eq!(seg.unusable, 0);
    }

    #[test]
    fn user_segments_have_rpl3() {
        let gdt = boot_gdt();
        let cs = kvm_segment_from_gdt(gdt[USER_CODE_INDEX as usize], USER_CODE_INDEX);
        let ss = kvm_segment_from_gdt(gdt[USER_DATA_INDEX as usize], USER_DATA_INDEX);
        assert_eq!((cs.selector, cs.dpl, cs.l), (0x2b, 3, 1));
        assert_eq!((ss.selector, ss.dpl, ss.type_), (0x23, 3, 3));
    }

    #[test]
    fn tss_is_busy_and_system() {
        let gdt = boot_gdt();
        let tr = kvm_segment_from_gdt(gdt[TSS_INDEX as usize], TSS_INDEX);
        assert_eq!((tr.selector, tr.type_, tr.s, tr.present), (0x18, 0xb, 0, 1));
    }

    #[test]
    fn entry_encoding_round_trips() {
        let e = gdt_entry(0x4092, 0x1234_5678, 0xabcde);
        let s = kvm_segment_from_gdt(e, 7);
        assert_eq!(s.base, 0x1234_5678);
        assert_eq!(s.limit, 0xabcde);
        assert_eq!(s.type_, 2);
        assert_eq!(s.db, 1);
        assert_eq!(s.g, 0);
        // Known value from Firecracker's table.
        assert_eq!(gdt_entry(0xa09b, 0, 0xfffff), 0x00af_9b00_0000_ffff);
        assert_eq!(kvm_segment_from_gdt(0, 0).unusable, 1);
    }
}
