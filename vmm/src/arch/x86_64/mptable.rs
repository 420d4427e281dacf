//! The Intel MultiProcessor table (MP spec 1.4), minimal form.
//!
//! Without ACPI this is how the guest kernel finds its CPUs (one processor
//! entry per vCPU, APIC id = vCPU index), the IO-APIC, and how ISA IRQs
//! 0..23 are wired to IO-APIC pins (1:1, as KVM's in-kernel IO-APIC does),
//! plus the local-APIC LINT0 = ExtINT / LINT1 = NMI wiring. Linux scans the
//! EBDA for the `_MP_` floating pointer, so the table lives at
//! [`layout::MPTABLE_START`]. The layout mirrors Firecracker's `mptable.rs`;
//! the table is serialised by hand so every byte is visible here.

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use super::layout;

/// Most vCPUs the table may describe: it must fit between the EBDA start
/// and the end of conventional memory (0xa0000), and APIC ids are 8-bit.
pub const MAX_SUPPORTED_CPUS: u8 = 32;

const MPF_SIGNATURE: &[u8; 4] = b"_MP_";
const MPC_SIGNATURE: &[u8; 4] = b"PCMP";
const MPC_SPEC: u8 = 4;
const MPC_OEM: &[u8; 8] = b"SANDMESH";
const MPC_PRODUCT_ID: &[u8; 12] = b"000000000000";
/// Local/IO APIC version reported for the in-kernel APICs.
const APIC_VERSION: u8 = 0x14;
/// CPU signature (family 6) and feature flags (FPU, APIC) in CPU entries.
const CPU_STEPPING: u32 = 0x600;
const CPU_FEATURE_APIC: u32 = 0x200;
const CPU_FEATURE_FPU: u32 = 0x001;
const CPU_ENABLED: u8 = 1;
const CPU_BOOTPROCESSOR: u8 = 2;
const MPC_APIC_USABLE: u8 = 1;
const BUS_TYPE_ISA: &[u8; 6] = b"ISA   ";

// Entry types.
const MP_PROCESSOR: u8 = 0;
const MP_BUS: u8 = 1;
const MP_IOAPIC: u8 = 2;
const MP_INTSRC: u8 = 3;
const MP_LINTSRC: u8 = 4;
// Interrupt types.
const MP_INT: u8 = 0;
const MP_NMI: u8 = 1;
const MP_EXTINT: u8 = 3;
const MP_IRQPOL_DEFAULT: u16 = 0;

/// Size of the floating pointer structure.
pub const MPF_SIZE: usize = 16;
const MPC_HEADER_SIZE: usize = 44;
const MPC_CPU_SIZE: usize = 20;

/// Errors building the MP table.
#[derive(Debug, thiserror::Error)]
pub enum MptableError {
    #[error("the MP table supports 1..={MAX_SUPPORTED_CPUS} vCPUs, not {0}")]
    TooManyCpus(u8),
    #[error("the MP table ({0} bytes) does not fit below the end of conventional memory")]
    TooBig(usize),
    #[error("cannot write the MP table into guest memory: {0}")]
    Write(vm_memory::GuestMemoryError),
}

/// The IO-APIC's id: the first id after the CPUs' APIC ids.
pub fn ioapic_id(num_cpus: u8) -> u8 {
    num_cpus + 1
}

fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |s, b| s.wrapping_add(*b))
        .wrapping_neg()
}

/// Serialise the floating pointer followed by the configuration table for
/// `num_cpus` vCPUs, as it must appear at guest address `base`.
pub fn build_mptable(num_cpus: u8, base: u64) -> Result<Vec<u8>, MptableError> {
    if num_cpus == 0 || num_cpus > MAX_SUPPORTED_CPUS {
        return Err(MptableError::TooManyCpus(num_cpus));
    }
    let ioapic = ioapic_id(num_cpus);

    // The configuration table: header (filled in last), then entries.
    let mut table = vec![0u8; MPC_HEADER_SIZE];
    let mut entry_count: u16 = 0;
    for cpu in 0..num_cpus {
        let mut e = [0u8; MPC_CPU_SIZE];
        e[0] = MP_PROCESSOR;
        e[1] = cpu; // APIC id
        e[2] = APIC_VERSION;
        e[3] = CPU_ENABLED | if cpu == 0 { CPU_BOOTPROCESSOR } else { 0 };
        e[4..8].copy_from_slice(&CPU_STEPPING.to_le_bytes());
        e[8..12].copy_from_slice(&(CPU_FEATURE_APIC | CPU_FEATURE_FPU).to_le_bytes());
        table.extend_from_slice(&e);
        entry_count += 1;
    }
    // Bus 0: ISA.
    table.extend_from_slice(&[MP_BUS, 0]);
    table.extend_from_slice(BUS_TYPE_ISA);
    entry_count += 1;
    // The IO-APIC.
    table.extend_from_slice(&[MP_IOAPIC, ioapic, APIC_VERSION, MPC_APIC_USABLE]);
    table.extend_from_slice(&layout::IOAPIC_ADDR.to_le_bytes());
    entry_count += 1;
    // ISA IRQ i -> IO-APIC pin i.
    for irq in 0..layout::IOAPIC_PINS {
        table.extend_from_slice(&[MP_INTSRC, MP_INT]);
        table.extend_from_slice(&MP_IRQPOL_DEFAULT.to_le_bytes());
        table.extend_from_slice(&[0, irq, ioapic, irq]);
        entry_count += 1;
    }
    // LINT0 of the BSP is the 8259's ExtINT; LINT1 of every CPU is NMI.
    table.extend_from_slice(&[MP_LINTSRC, MP_EXTINT]);
    table.extend_from_slice(&MP_IRQPOL_DEFAULT.to_le_bytes());
    table.extend_from_slice(&[0, 0, 0, 0]);
    table.extend_from_slice(&[MP_LINTSRC, MP_NMI]);
    table.extend_from_slice(&MP_IRQPOL_DEFAULT.to_le_bytes());
    table.extend_from_slice(&[0, 0, 0xff, 1]);
    entry_count += 2;

    let len = table.len();
    table[0..4].copy_from_slice(MPC_SIGNATURE);
    table[4..6].copy_from_slice(&(len as u16).to_le_bytes());
    table[6] = MPC_SPEC;
    // table[7]: checksum, below.
    table[8..16].copy_from_slice(MPC_OEM);
    table[16..28].copy_from_slice(MPC_PRODUCT_ID);
    // oemptr, oemsize: 0.
    table[34..36].copy_from_slice(&entry_count.to_le_bytes());
    table[36..40].copy_from_slice(&layout::APIC_ADDR.to_le_bytes());
    table[7] = checksum(&table);

    let mut mpf = [0u8; MPF_SIZE];
    mpf[0..4].copy_from_slice(MPF_SIGNATURE);
    mpf[4..8].copy_from_slice(&((base + MPF_SIZE as u64) as u32).to_le_bytes());
    mpf[8] = 1; // length in 16-byte units
    mpf[9] = MPC_SPEC;
    mpf[10] = checksum(&mpf);

    let mut out = mpf.to_vec();
    out.extend_from_slice(&table);
    Ok(out)
}

/// Write the MP table for `num_cpus` vCPUs at [`layout::MPTABLE_START`].
pub fn setup_mptable<M: GuestMemoryBackend>(mem: &M, num_cpus: u8) -> Result<(), MptableError> {
    let bytes = build_mptable(num_cpus, layout::MPTABLE_START)?;
    // Conventional memory ends at 640 KiB.
    if layout::MPTABLE_START + bytes.len() as u64 > 0xa0000 {
        return Err(MptableError::TooBig(bytes.len()));
    }
    mem.write_slice(&bytes, GuestAddress(layout::MPTABLE_START))
        .map_err(MptableError::Write)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |s, x| s.wrapping_add(*x))
    }

    /// Parse the table back from guest memory the way Linux's
    /// `smp_scan_config`/`smp_read_mpc` do, returning (cpu apic ids, bsp,
    /// ioapic (id, addr), intsrc count, lintsrc count).
    fn parse(mem: &GuestMemoryMmap) -> (Vec<u8>, Vec<u8>, (u8, u32), usize, usize) {
        let mut mpf = [0u8; MPF_SIZE];
        mem.read_slice(&mut mpf, GuestAddress(layout::MPTABLE_START))
            .expect("mpf");
        assert_eq!(&mpf[0..4], b"_MP_");
        assert_eq!(sum(&mpf), 0, "floating pointer checksum");
        let physptr = u32::from_le_bytes([mpf[4], mpf[5], mpf[6], mpf[7]]) as u64;
        let mut hdr = [0u8; MPC_HEADER_SIZE];
        mem.read_slice(&mut hdr, GuestAddress(physptr))
            .expect("mpc header");
        assert_eq!(&hdr[0..4], b"PCMP");
        let len = u16::from_le_bytes([hdr[4], hdr[5]]) as usize;
        let mut table = vec![0u8; len];
        mem.read_slice(&mut table, GuestAddress(physptr))
            .expect("mpc");
        assert_eq!(sum(&table), 0, "table checksum");
        assert_eq!(
            u32::from_le_bytes([table[36], table[37], table[38], table[39]]),
            layout::APIC_ADDR
        );
        let count = u16::from_le_bytes([table[34], table[35]]) as usize;

        let (mut cpus, mut bsp, mut ioapic, mut ints, mut lints) = (vec![], vec![], (0, 0), 0, 0);
        let mut off = MPC_HEADER_SIZE;
        for _ in 0..count {
            match table[off] {
                MP_PROCESSOR => {
                    cpus.push(table[off + 1]);
                    if table[off + 3] & CPU_BOOTPROCESSOR != 0 {
                        bsp.push(table[off + 1]);
                    }
                    off += MPC_CPU_SIZE;
                }
                MP_IOAPIC => {
                    let a = &table[off + 4..off + 8];
                    ioapic = (table[off + 1], u32::from_le_bytes([a[0], a[1], a[2], a[3]]));
                    off += 8;
                }
                MP_INTSRC => {
                    assert_eq!(table[off + 5], table[off + 7], "ISA irq n -> pin n");
                    ints += 1;
                    off += 8;
                }
                MP_LINTSRC => {
                    lints += 1;
                    off += 8;
                }
                MP_BUS => off += 8,
                t => panic!("unknown entry type {t}"),
            }
        }
        assert_eq!(off, len);
        (cpus, bsp, ioapic, ints, lints)
    }

    #[test]
    fn table_reads_back_with_cpus_and_ioapic() {
        for n in [1u8, 2, 16, MAX_SUPPORTED_CPUS] {
            let mem =
                GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).expect("mem");
            setup_mptable(&mem, n).expect("mptable");
            let (cpus, bsp, ioapic, ints, lints) = parse(&mem);
            assert_eq!(cpus, (0..n).collect::<Vec<_>>());
            assert_eq!(bsp, vec![0]);
            assert_eq!(ioapic, (n + 1, layout::IOAPIC_ADDR));
            assert_eq!(ints, 24);
            assert_eq!(lints, 2);
        }
    }

    #[test]
    fn cpu_count_is_checked() {
        assert!(matches!(
            build_mptable(0, 0),
            Err(MptableError::TooManyCpus(0))
        ));
        assert!(matches!(
            build_mptable(33, 0),
            Err(MptableError::TooManyCpus(33))
        ));
    }
}
